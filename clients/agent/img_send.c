/* The sending side of an imaging consult (requesting clinic): a consult
 * dropped as outbox/NAME.json with its DICOM files in outbox/NAME.d/ is
 * staged off the loop thread, one at a time (one disk), on the libuv thread
 * pool: every file is opened once without following a link, probed,
 * copied with fsync to data_dir/blobs/<case>/<index>.dcm while it is hashed
 * (ml_fs_copy_hash), and the consult's object list filled in. The loop
 * thread then stores one consult row and one held outbox row per chunk,
 * which references (blob file, offset, length); the chunk's envelope is
 * built from the blob when it is sent. The broker's answers are followed
 * for the progress log lines and the resume line; an ImagingResend from the
 * reading centre queues chunks again within a resend budget (F3). The
 * staging queue is this file's own (uv_queue_work, one job at a time): it
 * is not a general thread pool, so it has no module of its own. */
#include "img_send.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "img_int.h"
#include "ml_common.h"
#include "ml_fs.h"
#include "ml_imaging.h"

/* One consult being staged. */
typedef struct aimg_job {
    struct aimg_job *next;
    uv_work_t work;
    ml_aimg_t *img;
    char *name;            /* pending/<name> */
    char dir[S_PATH];      /* its NAME.d (for messages) */
    int dfd;               /* NAME.d, opened once (O_NOFOLLOW); -1 when not yet */
    char blob_rel[200];    /* "blobs/<case dir>" */
    char blob_abs[S_PATH]; /* data_dir/blob_rel */
    ml_envelope_t *env;    /* the consult; the worker fills its objects */
    uint32_t chunk_size;
    size_t max_record;
    int rc; /* 0, ML_EINVAL/ML_EIO (reason says why), ML_ECLOSED (stopped) */
    char reason[1024];
} aimg_job_t;

static void s_free_names(char **names, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
}

static int s_visible(const char *name, void *arg)
{
    (void)arg;
    return name[0] != '.';
}

/* The files of a study folder in name order: regular files, names starting
 * with '.' skipped. A sub-folder, a link or a FIFO is refused (reason set):
 * ml_fs_list only names them, it never opens or follows one. */
static int s_list_study(aimg_job_t *job, char ***out, size_t *count)
{
    const char *dname = strrchr(job->dir, '/') ? strrchr(job->dir, '/') + 1 : job->dir;
    ml_fs_entry_t *e = NULL;
    size_t n = 0;
    char **names = NULL;
    int rc = ml_fs_list(job->dfd, s_visible, NULL, &e, &n);
    if (rc == ML_ENOMEM) {
        ml_seterr(job->reason, sizeof job->reason, "out of memory");
        return rc;
    }
    if (rc < 0) {
        ml_seterr(job->reason, sizeof job->reason, "cannot read %s: %s", dname, strerror(errno));
        return ML_EIO;
    }
    /* A first look, for an early and clear refusal; what counts is the
     * fstat of the fd each file is then read through (s_open_study). */
    for (size_t i = 0; i < n; i++) {
        if (!S_ISREG((mode_t)e[i].mode)) {
            ml_seterr(job->reason, sizeof job->reason,
                      "%s/%s: is a %s, not a regular file (sub-folders, links and FIFOs are not "
                      "taken, links are never followed; put every DICOM file itself directly in "
                      "%s)",
                      dname, e[i].name, ml_file_type_name(e[i].mode), dname);
            ml_fs_list_free(e, n);
            return ML_EINVAL;
        }
    }
    if (n > 0 && !(names = malloc(n * sizeof *names))) {
        ml_fs_list_free(e, n);
        ml_seterr(job->reason, sizeof job->reason, "out of memory");
        return ML_ENOMEM;
    }
    for (size_t i = 0; i < n; i++)
        names[i] = e[i].name;
    free(e);
    *out = names;
    *count = n;
    return 0;
}

/* Opens file name of NAME.d once for probing, hashing and copying: no
 * link is followed and a FIFO does not block (ml_file_open_regular), and
 * the fd must be a regular file with one link. The owner is not checked
 * (the hospital system's account writes these files), but a second hard
 * link is refused: it is the one way left to put a file the writer cannot
 * read itself (the agent's key, its database) into the study. Returns the
 * fd or a negative ML_E* with job->reason set. */
static int s_open_study(aimg_job_t *job, const char *name, struct stat *st)
{
    const char *dname = strrchr(job->dir, '/') ? strrchr(job->dir, '/') + 1 : job->dir;
    int fd = ml_file_open_regular(job->dfd, name, st);
    if (fd == ML_EINVAL) {
        ml_seterr(job->reason, sizeof job->reason,
                  "%s/%s: is a %s, not a regular file (put every DICOM file itself directly in "
                  "%s)",
                  dname, name, ml_file_type_name((unsigned)st->st_mode), dname);
        return ML_EINVAL;
    }
    if (fd < 0 && errno == ELOOP) {
        ml_seterr(job->reason, sizeof job->reason,
                  "%s/%s: is a symbolic link; links in the spool are never followed (copy the "
                  "DICOM file itself into %s)",
                  dname, name, dname);
        return ML_EINVAL;
    }
    if (fd < 0) {
        ml_seterr(job->reason, sizeof job->reason, "%s/%s: cannot open: %s", dname, name,
                  strerror(errno));
        return ML_EIO;
    }
    if (st->st_nlink > 1) {
        ml_seterr(job->reason, sizeof job->reason,
                  "%s/%s: has %lu hard links; study files must be copied into %s, not linked",
                  dname, name, (unsigned long)st->st_nlink, dname);
        close(fd);
        return ML_EINVAL;
    }
    return fd;
}

static void s_free_objects(Medlink__V1__DicomObject **objs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (objs[i])
            protobuf_c_message_free_unpacked(&objs[i]->base, NULL);
    free(objs);
}

/* A heap DicomObject with every string allocated. */
static Medlink__V1__DicomObject *s_object_new(void)
{
    Medlink__V1__DicomObject *o = malloc(sizeof *o);
    if (!o)
        return NULL;
    medlink__v1__dicom_object__init(o);
    o->sop_instance_uid = o->file_name = o->sha256 = o->series_instance_uid = NULL;
    if (aimg__dup(&o->sop_instance_uid, "") < 0 || aimg__dup(&o->file_name, "") < 0 ||
        aimg__dup(&o->sha256, "") < 0 || aimg__dup(&o->series_instance_uid, "") < 0) {
        protobuf_c_message_free_unpacked(&o->base, NULL);
        return NULL;
    }
    return o;
}

/* Staging work, on a thread-pool thread (or the caller's, in tests): never
 * touches the store or the spool. Each file is opened once (s_open_study),
 * and probed, hashed and copied through that one fd, so a file swapped
 * for a link (to the agent's key) after the listing is either refused or
 * never seen: what is sent is what was checked. Then the consult is filled
 * in and validated. */
static void s_stage_run(aimg_job_t *job)
{
    char **names = NULL;
    size_t n = 0;
    ml_dicom_info_t *info = NULL;
    Medlink__V1__DicomObject **objs = NULL;
    size_t *order = NULL;
    Medlink__V1__ImagingConsult *c = job->env->imaging_consult;
    const char *dname = strrchr(job->dir, '/') ? strrchr(job->dir, '/') + 1 : job->dir;
    char err[512];
    int sfd = -1, bfd = -1;

    job->rc = s_list_study(job, &names, &n);
    if (job->rc < 0)
        goto out;
    job->rc = ML_EINVAL;
    if (n == 0) {
        ml_seterr(job->reason, sizeof job->reason,
                  "%s holds no DICOM files (write the study's .dcm files into %s before renaming "
                  "the consult in)",
                  dname, dname);
        goto out;
    }
    info = calloc(n, sizeof *info);
    objs = calloc(n, sizeof *objs);
    order = calloc(n, sizeof *order);
    if (!info || !objs || !order) {
        ml_seterr(job->reason, sizeof job->reason, "out of memory");
        goto out;
    }

    /* Which file becomes object i: the consult's own order when it lists
     * its objects (each must match a file), else name order. */
    if (c->n_object > 0) {
        if (c->n_object != n) {
            ml_seterr(job->reason, sizeof job->reason,
                      "the consult lists %zu object(s) but %s holds %zu file(s)", c->n_object,
                      dname, n);
            goto out;
        }
        char *used = calloc(n, 1);
        if (!used) {
            ml_seterr(job->reason, sizeof job->reason, "out of memory");
            goto out;
        }
        for (size_t i = 0; i < n; i++) {
            const char *want =
                c->object[i] && c->object[i]->file_name ? c->object[i]->file_name : "";
            size_t j = 0;
            while (j < n && (used[j] || strcmp(names[j], want) != 0))
                j++;
            if (j == n) {
                ml_seterr(job->reason, sizeof job->reason,
                          "imaging_consult.object[%zu].file_name \"%.128s\" is not a file in %s", i,
                          want, dname);
                free(used);
                goto out;
            }
            used[j] = 1;
            order[i] = j;
        }
        free(used);
    } else {
        for (size_t i = 0; i < n; i++)
            order[i] = i;
    }

    if (ml_mkdirs(job->blob_abs) < 0 || (bfd = ml_dir_open(AT_FDCWD, job->blob_abs)) < 0) {
        job->rc = ML_EIO;
        ml_seterr(job->reason, sizeof job->reason, "cannot create %s: %s", job->blob_abs,
                  strerror(errno));
        goto out;
    }
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        char dst[64], sha[ML_SHA256_HEX + 1];
        const char *name = names[order[i]];
        ml_dicom_info_t *in = &info[i];
        uint64_t size = 0;
        struct stat st;
        if ((sfd = s_open_study(job, name, &st)) < 0) {
            job->rc = sfd == ML_EIO ? ML_EIO : ML_EINVAL;
            sfd = -1;
            goto out;
        }
        int rc = ml_dicom_probe_fd(sfd, in, err, sizeof err);
        if (rc < 0) {
            job->rc = rc == ML_ENOMEM ? ML_EIO : rc;
            ml_seterr(job->reason, sizeof job->reason, "%s/%s: %s", dname, name, err);
            goto out;
        }
        if (!in->study_instance_uid[0]) {
            ml_seterr(job->reason, sizeof job->reason, "%s/%s: no Study Instance UID (0020,000D)",
                      dname, name);
            goto out;
        }
        const char *study = c->study_instance_uid && *c->study_instance_uid
                                ? c->study_instance_uid
                                : info[0].study_instance_uid;
        if (strcmp(in->study_instance_uid, study) != 0) {
            ml_seterr(job->reason, sizeof job->reason,
                      "%s/%s: its Study Instance UID %s differs from the study's %s (%s)", dname,
                      name, in->study_instance_uid, study,
                      c->study_instance_uid && *c->study_instance_uid ? "as the consult names it"
                                                                      : "of the first file");
            goto out;
        }
        const Medlink__V1__DicomObject *given = c->n_object ? c->object[i] : NULL;
        if (given && given->sop_instance_uid && *given->sop_instance_uid &&
            strcmp(given->sop_instance_uid, in->sop_instance_uid) != 0) {
            ml_seterr(job->reason, sizeof job->reason,
                      "%s/%s: its SOP Instance UID %s differs from imaging_consult.object[%zu]'s "
                      "%.64s",
                      dname, name, in->sop_instance_uid, i, given->sop_instance_uid);
            goto out;
        }
        aimg__fmt(dst, sizeof dst, "%zu.dcm", i);
        rc = ml_fs_copy_hash(sfd, bfd, dst, &job->img->cancel, &size, sha);
        close(sfd);
        sfd = -1;
        if (rc == ML_ECLOSED) {
            job->rc = rc;
            ml_seterr(job->reason, sizeof job->reason, "the agent is stopping");
            goto out;
        }
        if (rc < 0) {
            job->rc = ML_EIO;
            ml_seterr(job->reason, sizeof job->reason, "cannot copy %s/%s into %s: %s", dname, name,
                      job->blob_abs, strerror(errno));
            goto out;
        }
        if (given && ((given->size && given->size != size) ||
                      (given->sha256 && *given->sha256 && strcmp(given->sha256, sha) != 0))) {
            ml_seterr(job->reason, sizeof job->reason,
                      "%s/%s: %llu bytes with SHA-256 %s, but imaging_consult.object[%zu] says "
                      "%llu bytes, %.64s",
                      dname, name, (unsigned long long)size, sha, i,
                      (unsigned long long)given->size, given->sha256 ? given->sha256 : "");
            goto out;
        }
        uint32_t chunks = ml_imaging_chunk_count(size, job->chunk_size);
        if (chunks == 0) {
            ml_seterr(job->reason, sizeof job->reason, "%s/%s: too large to cut into chunks", dname,
                      name);
            goto out;
        }
        Medlink__V1__DicomObject *o = s_object_new();
        if (!o || aimg__dup(&o->file_name, name) < 0 || aimg__dup(&o->sha256, sha) < 0 ||
            aimg__dup(&o->sop_instance_uid, info[i].sop_instance_uid) < 0 ||
            aimg__dup(&o->series_instance_uid, info[i].series_instance_uid) < 0) {
            if (o)
                protobuf_c_message_free_unpacked(&o->base, NULL);
            job->rc = ML_EIO;
            ml_seterr(job->reason, sizeof job->reason, "out of memory");
            goto out;
        }
        o->size = size;
        o->chunks = chunks;
        objs[i] = o;
        total += size;
    }
    if (fsync(bfd) != 0)
        ml_log(ML_LOG_WARN, S_LOG, "fsync %s: %s", job->blob_abs, strerror(errno));

    /* Fill in the consult. */
    s_free_objects(c->object, c->n_object);
    c->object = objs;
    c->n_object = n;
    objs = NULL;
    c->chunk_size = job->chunk_size;
    c->total_bytes = total;
    if ((!c->study_instance_uid || !*c->study_instance_uid) &&
        aimg__dup(&c->study_instance_uid, info[0].study_instance_uid) < 0)
        goto nomem;
    if ((!c->modality || !*c->modality) && info[0].modality[0] &&
        aimg__dup(&c->modality, info[0].modality) < 0)
        goto nomem;
    int rc = ml_env_validate(job->env, err, sizeof err);
    if (rc < 0) {
        job->rc = ML_EINVAL;
        ml_seterr(job->reason, sizeof job->reason, "%s", err);
        goto out;
    }
    size_t packed = medlink__v1__envelope__get_packed_size(job->env);
    if (packed > job->max_record) {
        ml_seterr(job->reason, sizeof job->reason,
                  "the consult with its %zu objects is %zu bytes, over max_record (%zu); send the "
                  "study as several consults",
                  n, packed, job->max_record);
        goto out;
    }
    job->rc = 0;
    goto out;
nomem:
    job->rc = ML_EIO;
    ml_seterr(job->reason, sizeof job->reason, "out of memory");
out:
    if (sfd >= 0)
        close(sfd);
    if (bfd >= 0)
        close(bfd);
    s_free_names(names, n);
    free(info);
    free(order);
    if (objs)
        s_free_objects(objs, n);
}

static void s_job_free(aimg_job_t *job)
{
    if (!job)
        return;
    free(job->name);
    if (job->dfd >= 0)
        close(job->dfd);
    ml_env_free(&job->env);
    free(job);
}

/* The envelope stored for one chunk: the ImagingChunk without data and
 * digest, which ml_aimg_chunk_envelope fills in at send time. */
static int s_chunk_template(const ml_envelope_t *consult, uint32_t object, uint32_t chunk,
                            uint32_t chunk_size, const char *id, uint8_t **out, size_t *len)
{
    Medlink__V1__ImagingChunk ch = MEDLINK__V1__IMAGING_CHUNK__INIT;
    ch.study_instance_uid = consult->imaging_consult->study_instance_uid;
    ch.object_index = object;
    ch.chunk_index = chunk;
    ch.offset = (uint64_t)chunk * chunk_size;
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = (char *)id;
    e.case_id = consult->case_id;
    e.kind = K_(IMAGING_CHUNK);
    e.from = consult->from;
    e.to = consult->to;
    e.priority = consult->priority;
    e.created_at = ml_now_ms();
    e.deadline = consult->deadline;
    e.payload_case = P_(IMAGING_CHUNK);
    e.imaging_chunk = &ch;
    return ml_env_pack(&e, out, len);
}

/* Stores a staged consult: the consult row, one held row per chunk, the
 * img_out row; one transaction. */
static int s_store_consult(ml_aimg_t *img, aimg_job_t *job, char *why, size_t whylen)
{
    const ml_envelope_t *e = job->env;
    const Medlink__V1__ImagingConsult *c = e->imaging_consult;
    uint8_t *blob = NULL, *tpl = NULL;
    size_t len = 0, tlen = 0;
    uint32_t chunks = 0;
    int64_t now = ml_now_ms();
    int rc = ml_env_pack(e, &blob, &len);
    if (rc < 0)
        return rc;
    if ((rc = ml_astore_begin(img->store)) < 0)
        goto out;
    ml_outbox_new_t row = {.id = e->id,
                           .file_name = job->name,
                           .case_id = e->case_id,
                           .envelope = blob,
                           .envelope_len = len};
    if ((rc = ml_astore_outbox_insert(img->store, &row, now)) < 0) {
        if (rc == ML_EDUP)
            snprintf(why, whylen, "message id %s was already used by an earlier message", e->id);
        goto rollback;
    }
    for (uint32_t i = 0; i < c->n_object; i++) {
        const Medlink__V1__DicomObject *o = c->object[i];
        char path[256];
        snprintf(path, sizeof path, "%s/%u.dcm", job->blob_rel, i);
        for (uint32_t k = 0; k < o->chunks; k++) {
            char id[ML_ULID_LEN + 1];
            ml_ulid_new(id);
            if ((rc = s_chunk_template(e, i, k, c->chunk_size, id, &tpl, &tlen)) < 0)
                goto rollback;
            uint64_t off = (uint64_t)k * c->chunk_size;
            uint64_t left = o->size - off;
            ml_outbox_new_t cr = {.id = id,
                                  .case_id = e->case_id,
                                  .envelope = tpl,
                                  .envelope_len = tlen,
                                  .blob_path = path,
                                  .blob_off = off,
                                  .blob_len = left < c->chunk_size ? (size_t)left : c->chunk_size,
                                  .hold_for = e->id};
            rc = ml_astore_outbox_insert(img->store, &cr, now);
            free(tpl);
            tpl = NULL;
            if (rc < 0)
                goto rollback;
            chunks++;
        }
    }
    ml_img_out_t out;
    memset(&out, 0, sizeof out);
    snprintf(out.case_id, sizeof out.case_id, "%s", e->case_id);
    snprintf(out.consult_id, sizeof out.consult_id, "%s", e->id);
    snprintf(out.recipient, sizeof out.recipient, "%s", e->to);
    out.priority = e->priority;
    snprintf(out.blob_dir, sizeof out.blob_dir, "%s", job->blob_rel);
    out.objects = (uint32_t)c->n_object;
    out.chunks = chunks;
    out.total_bytes = c->total_bytes;
    out.chunk_size = c->chunk_size;
    if ((rc = ml_istore_out_add(img->is, &out, now)) < 0) {
        if (rc == ML_EDUP)
            snprintf(why, whylen, "case %s already has an imaging consult", e->case_id);
        goto rollback;
    }
    rc = ml_astore_commit(img->store);
    goto out;
rollback:
    ml_astore_rollback(img->store);
out:
    free(blob);
    free(tpl);
    return rc;
}

/* Loop thread: records what the staging work found. */
static void s_stage_finish(ml_aimg_t *img, aimg_job_t *job)
{
    char why[1024] = "";
    const ml_envelope_t *e = job->env;
    if (job->rc == ML_ECLOSED) {
        aimg__remove_dir(job->blob_abs, "blob copies");
        ml_spool_staged_retry(img->spool, job->name);
        ml_log(ML_LOG_INFO, S_LOG,
               "pending/%s: staging stopped; it is staged again at the next "
               "start",
               job->name);
        return;
    }
    if (job->rc < 0) {
        aimg__remove_dir(job->blob_abs, "blob copies");
        ml_spool_staged_reject(img->spool, job->name, e->id, job->reason);
        return;
    }
    int rc = s_store_consult(img, job, why, sizeof why);
    if (rc == ML_EDUP) {
        aimg__remove_dir(job->blob_abs, "blob copies");
        ml_spool_staged_reject(img->spool, job->name, e->id, why);
        return;
    }
    if (rc < 0) {
        ml_log(ML_LOG_ERROR, S_LOG, "cannot store imaging consult pending/%s: %s; will retry",
               job->name, ml_astore_errmsg(img->store));
        aimg__remove_dir(job->blob_abs, "blob copies");
        ml_spool_staged_retry(img->spool, job->name);
        return;
    }
    ml_spool_staged_done(img->spool, job->name);
    const Medlink__V1__ImagingConsult *c = e->imaging_consult;
    uint64_t chunks = 0;
    for (size_t i = 0; i < c->n_object; i++)
        chunks += c->object[i]->chunks;
    ml_log(ML_LOG_INFO, S_LOG,
           "pending/%s queued as message %s (%s IMAGING_CONSULT to %s, case %s): study %s, %zu "
           "object(s), %llu bytes in %llu chunk(s) of %u bytes",
           job->name, e->id, ml_priority_name(e->priority), e->to, e->case_id,
           c->study_instance_uid, c->n_object, (unsigned long long)c->total_bytes,
           (unsigned long long)chunks, c->chunk_size);
    if (img->wake)
        img->wake(img->arg);
}

/* Loop thread, before a job runs: its folder, and a case not yet used.
 * Returns 0 to run it, 1 when it was refused here. */
static int s_precheck(ml_aimg_t *img, aimg_job_t *job)
{
    const ml_envelope_t *e = job->env;
    ml_img_out_t o;
    int rc = ml_istore_out_get(img->is, e->case_id, &o);
    if (rc == 0) {
        ml_seterr(job->reason, sizeof job->reason,
                  "case %s already has an imaging consult (message %s); use a new case id",
                  e->case_id, o.consult_id);
        goto refuse;
    }
    if (rc != ML_ENOTFOUND) {
        ml_log(ML_LOG_ERROR, S_LOG, "cannot read img_out: %s", ml_astore_errmsg(img->store));
        ml_spool_staged_retry(img->spool, job->name);
        return 1;
    }
    if (job->dfd >= 0) {
        close(job->dfd);
        job->dfd = -1;
    }
    rc = ml_spool_staged_open(img->spool, job->name, job->dir, sizeof job->dir);
    if (rc >= 0)
        job->dfd = rc;
    if (rc < 0) {
        size_t n = strlen(job->name);
        ml_seterr(job->reason, sizeof job->reason,
                  "no folder %.*s.d next to %s: write the study's DICOM files into outbox/%.*s.d "
                  "first, then rename the consult into outbox/",
                  (int)(n > 5 ? n - 5 : n), job->name, job->name, (int)(n > 5 ? n - 5 : n),
                  job->name);
        goto refuse;
    }
    /* Leftovers of an interrupted staging of the same case. */
    aimg__remove_dir(job->blob_abs, "old blob copies");
    return 0;
refuse:
    ml_spool_staged_reject(img->spool, job->name, e->id, job->reason);
    return 1;
}

static void s_kick(ml_aimg_t *img);

static void s_work_cb(uv_work_t *w)
{
    s_stage_run(w->data);
}

static void s_after_work_cb(uv_work_t *w, int status)
{
    aimg_job_t *job = w->data;
    ml_aimg_t *img = job->img;
    if (status == UV_ECANCELED) {
        job->rc = ML_ECLOSED;
        ml_seterr(job->reason, sizeof job->reason, "cancelled");
    }
    img->running = NULL;
    s_stage_finish(img, job);
    s_job_free(job);
    s_kick(img);
}

static aimg_job_t *s_pop(ml_aimg_t *img)
{
    aimg_job_t *job = img->head;
    if (job) {
        img->head = job->next;
        if (!img->head)
            img->tail = NULL;
        job->next = NULL;
    }
    return job;
}

/* Starts the next job on the thread pool, one at a time (one disk). */
static void s_kick(ml_aimg_t *img)
{
    while (img->loop && img->started && !img->running && !img->stopping && img->head) {
        aimg_job_t *job = s_pop(img);
        if (s_precheck(img, job) != 0) {
            s_job_free(job);
            continue;
        }
        job->work.data = job;
        img->running = job;
        if (uv_queue_work(img->loop, &job->work, s_work_cb, s_after_work_cb) != 0) {
            img->running = NULL;
            ml_spool_staged_retry(img->spool, job->name);
            s_job_free(job);
        }
    }
}

size_t ml_aimg_run_jobs(ml_aimg_t *img)
{
    size_t n = 0;
    aimg_job_t *job;
    while ((job = s_pop(img)) != NULL) {
        if (s_precheck(img, job) == 0) {
            s_stage_run(job);
            s_stage_finish(img, job);
        }
        s_job_free(job);
        n++;
    }
    return n;
}

/* hooks.consult */
void img_send__consult_cb(void *arg, const char *name, ml_envelope_t *env)
{
    ml_aimg_t *img = arg;
    aimg_job_t *job = calloc(1, sizeof *job);
    if (!job || !(job->name = strdup(name))) {
        ml_log(ML_LOG_ERROR, S_LOG, "out of memory staging pending/%s", name);
        free(job);
        ml_env_free(&env);
        ml_spool_staged_retry(img->spool, name);
        return;
    }
    job->dfd = -1;
    job->img = img;
    job->env = env;
    job->chunk_size = img->chunk_size;
    job->max_record = img->max_record;
    if (aimg__blob_dir(img, env->case_id, job->blob_rel, sizeof job->blob_rel, job->blob_abs,
                       sizeof job->blob_abs) < 0) {
        ml_spool_staged_reject(img->spool, name, env->id, "case id too long for a folder name");
        s_job_free(job);
        return;
    }
    if (img->tail)
        img->tail->next = job;
    else
        img->head = job;
    img->tail = job;
    s_kick(img);
}

int ml_aimg_chunk_envelope(ml_aimg_t *img, const ml_outbox_row_t *row, uint8_t **out, size_t *len,
                           char *err, size_t errlen)
{
    char path[S_PATH], sha[ML_SHA256_HEX + 1];
    uint8_t *data = NULL;
    ml_envelope_t *e = NULL;
    struct stat st;
    int rc = ML_EIO;
    int fd = -1;
    if (aimg__join(path, sizeof path, img->data_dir, row->blob_path) < 0) {
        ml_seterr(err, errlen, "blob path too long");
        return ML_EIO;
    }
    if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0 || fstat(fd, &st) != 0) {
        ml_seterr(err, errlen, "cannot read the blob copy %s: %s", path, strerror(errno));
        goto out;
    }
    if ((uint64_t)st.st_size < row->blob_off + row->blob_len) {
        ml_seterr(err, errlen, "the blob copy %s has %lld bytes, the chunk needs %llu", path,
                  (long long)st.st_size, (unsigned long long)(row->blob_off + row->blob_len));
        goto out;
    }
    if (!(data = malloc(row->blob_len ? row->blob_len : 1))) {
        rc = ML_ENOMEM;
        goto out;
    }
    for (size_t got = 0; got < row->blob_len;) {
        ssize_t r = pread(fd, data + got, row->blob_len - got, (off_t)(row->blob_off + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            ml_seterr(err, errlen, "cannot read the blob copy %s: %s", path,
                      r < 0 ? strerror(errno) : "short file");
            goto out;
        }
        got += (size_t)r;
    }
    if ((rc = ml_env_unpack(row->envelope, row->envelope_len, &e)) < 0 ||
        e->payload_case != P_(IMAGING_CHUNK)) {
        ml_seterr(err, errlen, "stored chunk envelope is unreadable");
        rc = ML_EPROTO;
        goto out;
    }
    ml_sha256_hex(data, row->blob_len, sha);
    if ((rc = aimg__dup(&e->imaging_chunk->sha256, sha)) < 0)
        goto out;
    /* The envelope takes the buffer; free_unpacked frees it. */
    e->imaging_chunk->data.data = data;
    e->imaging_chunk->data.len = row->blob_len;
    data = NULL;
    rc = ml_env_pack(e, out, len);
out:
    if (fd >= 0)
        close(fd);
    free(data);
    ml_env_free(&e);
    return rc;
}

static void s_prog_clear(aimg_prog_t *p)
{
    free(p->object_chunks);
    p->object_chunks = NULL;
}

static void s_prog_drop(ml_aimg_t *img, const char *case_id)
{
    for (size_t i = 0; i < img->progs.n; i++) {
        aimg_prog_t *p = aimg__vec_at(&img->progs, i);
        if (strcmp(p->case_id, case_id) == 0) {
            s_prog_clear(p);
            *p = *(aimg_prog_t *)aimg__vec_at(&img->progs, img->progs.n - 1);
            img->progs.n--;
            return;
        }
    }
}

static void s_resend_drop(ml_aimg_t *img, const char *case_id)
{
    for (size_t i = 0; i < img->resends.n; i++) {
        aimg_resend_t *r = aimg__vec_at(&img->resends, i);
        if (strcmp(r->case_id, case_id) == 0) {
            *r = *(aimg_resend_t *)aimg__vec_at(&img->resends, img->resends.n - 1);
            img->resends.n--;
            return;
        }
    }
}

typedef struct {
    ml_envelope_t *e;
} s_env_box_t;

static int s_unpack_row_cb(const ml_outbox_row_t *r, void *arg)
{
    s_env_box_t *b = arg;
    return ml_env_unpack(r->envelope, r->envelope_len, &b->e) < 0 ? ML_EPROTO : 1;
}

/* The progress record of a case, loaded from the store when first needed. */
static aimg_prog_t *s_prog(ml_aimg_t *img, const char *case_id)
{
    for (size_t i = 0; i < img->progs.n; i++) {
        aimg_prog_t *p = aimg__vec_at(&img->progs, i);
        if (strcmp(p->case_id, case_id) == 0)
            return p;
    }
    ml_img_out_t o;
    ml_outbox_case_stats_t st;
    if (ml_istore_out_get(img->is, case_id, &o) < 0 ||
        ml_astore_outbox_case_stats(img->store, case_id, &st) < 0)
        return NULL;
    s_env_box_t box = {NULL};
    if (ml_astore_outbox_get(img->store, o.consult_id, s_unpack_row_cb, &box) != 1 ||
        box.e->payload_case != P_(IMAGING_CONSULT)) {
        ml_env_free(&box.e);
        return NULL;
    }
    const Medlink__V1__ImagingConsult *c = box.e->imaging_consult;
    aimg_prog_t *p = aimg__vec_push(&img->progs);
    if (!p) {
        ml_env_free(&box.e);
        return NULL;
    }
    snprintf(p->case_id, sizeof p->case_id, "%s", case_id);
    p->chunks = st.chunks;
    p->accepted = st.accepted;
    p->refused = st.refused;
    p->bytes = st.bytes;
    p->accepted_bytes = st.accepted_bytes;
    p->fresh = 1;
    p->done_logged = st.accepted + st.refused >= st.chunks;
    p->n_objects = (uint32_t)c->n_object;
    p->object_chunks = calloc(c->n_object ? c->n_object : 1, sizeof *p->object_chunks);
    for (size_t i = 0; p->object_chunks && i < c->n_object; i++)
        p->object_chunks[i] = c->object[i]->chunks;
    ml_env_free(&box.e);
    return p;
}

/* What settle needs to know of a row. */
typedef struct {
    int found;
    int is_chunk;
    char case_id[129];
    size_t blob_len;
    uint32_t object, chunk;
} s_rowinfo_t;

static int s_rowinfo_cb(const ml_outbox_row_t *r, void *arg)
{
    s_rowinfo_t *ri = arg;
    ri->found = 1;
    ri->is_chunk = *r->blob_path != '\0';
    snprintf(ri->case_id, sizeof ri->case_id, "%s", r->case_id);
    ri->blob_len = r->blob_len;
    if (ri->is_chunk) {
        ml_envelope_t *e = NULL;
        if (ml_env_unpack(r->envelope, r->envelope_len, &e) == 0 && e->imaging_chunk) {
            ri->object = e->imaging_chunk->object_index;
            ri->chunk = e->imaging_chunk->chunk_index;
        }
        ml_env_free(&e);
    }
    return 1;
}

int ml_aimg_settled(ml_aimg_t *img, const ml_spool_result_t *res, size_t n)
{
    int released = 0, closed = 0;
    for (size_t i = 0; i < n; i++) {
        s_rowinfo_t ri;
        memset(&ri, 0, sizeof ri);
        if (ml_astore_outbox_get(img->store, res[i].message_id, s_rowinfo_cb, &ri) != 1 ||
            !*ri.case_id)
            continue;
        if (ri.is_chunk) {
            aimg_prog_t *p = s_prog(img, ri.case_id);
            if (!p)
                continue;
            uint32_t of =
                ri.object < p->n_objects && p->object_chunks ? p->object_chunks[ri.object] : 0;
            if (res[i].accepted) {
                if (!p->fresh) {
                    p->accepted++;
                    p->accepted_bytes += ri.blob_len;
                }
                ml_log(ML_LOG_INFO, S_LOG,
                       "case %s: chunk %u/%u of object %u accepted (%llu of %llu bytes, %d%%)",
                       ri.case_id, ri.chunk + 1, of, ri.object,
                       (unsigned long long)p->accepted_bytes, (unsigned long long)p->bytes,
                       p->bytes ? (int)(p->accepted_bytes * 100 / p->bytes) : 100);
                if (p->accepted + p->refused >= p->chunks && !p->done_logged) {
                    p->done_logged = 1;
                    ml_log(ML_LOG_INFO, S_LOG,
                           "case %s: all %lld chunk(s) (%llu bytes) accepted by the broker",
                           ri.case_id, (long long)p->accepted,
                           (unsigned long long)p->accepted_bytes);
                }
            } else {
                if (!p->fresh)
                    p->refused++;
                ml_log(p->refused == 1 ? ML_LOG_WARN : ML_LOG_DEBUG, S_LOG,
                       "case %s: chunk %u/%u of object %u refused: %s", ri.case_id, ri.chunk + 1,
                       of, ri.object, res[i].reason ? res[i].reason : "");
            }
            continue;
        }
        ml_img_out_t o;
        if (ml_istore_out_get(img->is, ri.case_id, &o) != 0 ||
            strcmp(o.consult_id, res[i].message_id) != 0)
            continue;
        if (res[i].accepted) {
            released = 1;
            ml_log(ML_LOG_INFO, S_LOG,
                   "case %s: consult accepted by the broker; sending %u chunk(s), %llu bytes",
                   ri.case_id, o.chunks, (unsigned long long)o.total_bytes);
            continue;
        }
        /* The held chunk rows were refused with it (astore); the blob
         * copies have no use any more. */
        if (ml_astore_begin(img->store) == 0) {
            if (aimg__close_out(img, ri.case_id, "the consult was refused") >= 0 &&
                ml_astore_commit(img->store) == 0)
                closed = 1;
            else
                ml_astore_rollback(img->store);
        }
    }
    for (size_t i = 0; i < img->progs.n; i++)
        ((aimg_prog_t *)aimg__vec_at(&img->progs, i))->fresh = 0;
    if (closed)
        aimg__drop_files(img);
    return released;
}

static int s_first_cb(const ml_outbox_row_t *r, void *arg)
{
    ml_aimg_progress_t *p = arg;
    ml_envelope_t *e = NULL;
    if (ml_env_unpack(r->envelope, r->envelope_len, &e) == 0 && e->imaging_chunk) {
        p->has_next = 1;
        p->next_object = e->imaging_chunk->object_index;
        p->next_chunk = e->imaging_chunk->chunk_index;
    }
    ml_env_free(&e);
    return 1;
}

static int s_state_cb(const ml_outbox_row_t *r, void *arg)
{
    *(int *)arg = r->state;
    return 1;
}

int ml_aimg_progress(ml_aimg_t *img, const char *case_id, ml_aimg_progress_t *p)
{
    ml_img_out_t o;
    ml_outbox_case_stats_t st;
    memset(p, 0, sizeof *p);
    int rc = ml_istore_out_get(img->is, case_id, &o);
    if (rc < 0)
        return rc;
    if ((rc = ml_astore_outbox_case_stats(img->store, case_id, &st)) < 0)
        return rc;
    p->chunks = st.chunks;
    p->accepted = st.accepted;
    p->refused = st.refused;
    p->bytes = st.bytes;
    p->accepted_bytes = st.accepted_bytes;
    int state = -1;
    if (ml_astore_outbox_get(img->store, o.consult_id, s_state_cb, &state) == 1)
        p->consult_accepted = state == ML_OUTBOX_ACCEPTED;
    rc = ml_astore_outbox_case_first(img->store, case_id, s_first_cb, p);
    return rc < 0 && rc != ML_ENOTFOUND ? rc : 0;
}

static int s_resume_cb(const ml_img_out_t *o, void *arg)
{
    ml_aimg_t *img = arg;
    ml_aimg_progress_t p;
    if (ml_aimg_progress(img, o->case_id, &p) < 0 || !p.has_next)
        return 0;
    if (!p.consult_accepted) {
        ml_log(ML_LOG_INFO, S_LOG,
               "case %s: %lld chunk(s), %llu bytes, wait for the consult to be accepted",
               o->case_id, (long long)(p.chunks - p.accepted - p.refused),
               (unsigned long long)(p.bytes - p.accepted_bytes));
        return 0;
    }
    ml_log(ML_LOG_INFO, S_LOG,
           "resuming case %s at chunk %lld of %lld (object %u, chunk %u; %llu bytes already "
           "accepted, %llu to go)",
           o->case_id, (long long)(p.accepted + p.refused + 1), (long long)p.chunks, p.next_object,
           p.next_chunk, (unsigned long long)p.accepted_bytes,
           (unsigned long long)(p.bytes - p.accepted_bytes));
    return 0;
}

void ml_aimg_log_resume(ml_aimg_t *img)
{
    /* The counters are read again from the store: they are the truth. */
    for (size_t i = 0; i < img->progs.n; i++)
        s_prog_clear(aimg__vec_at(&img->progs, i));
    img->progs.n = 0;
    ml_istore_out_walk(img->is, ML_IMG_OUT_ACTIVE, s_resume_cb, img);
}

/* The resend budget record of case_id, made when first needed; NULL out
 * of memory. Records whose window has passed are reused first, which keeps
 * the vector no larger than the consults asked for within one window. */
static aimg_resend_t *s_resend_budget(ml_aimg_t *img, const char *case_id, int64_t now)
{
    aimg_resend_t *free_slot = NULL;
    for (size_t i = 0; i < img->resends.n; i++) {
        aimg_resend_t *r = aimg__vec_at(&img->resends, i);
        if (strcmp(r->case_id, case_id) == 0) {
            if (now - r->window_start >= img->resend_window_ms) {
                r->window_start = now;
                r->used = 0;
            }
            return r;
        }
        if (!free_slot && now - r->window_start >= img->resend_window_ms)
            free_slot = r;
    }
    aimg_resend_t *r = free_slot ? free_slot : aimg__vec_push(&img->resends);
    if (!r)
        return NULL;
    snprintf(r->case_id, sizeof r->case_id, "%s", case_id);
    r->window_start = now;
    r->used = 0;
    return r;
}

static int s_cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Marks, in a byte per chunk, the chunks of one object still queued. */
typedef struct {
    uint8_t *queued;
    uint32_t chunks;
    uint32_t chunk_size;
} s_queued_map_t;

static void s_queued_off_cb(uint64_t off, void *arg)
{
    s_queued_map_t *m = arg;
    uint64_t k = m->chunk_size ? off / m->chunk_size : 0;
    if (k < m->chunks)
        m->queued[k] = 1;
}

/* An ImagingResend for a case this node sent: the listed chunks are queued
 * again as new messages from the blob copy. A resend request is peer input
 * that makes this node upload, so it is bounded (F3): the indexes are
 * deduplicated, those beyond the object's chunk count are ignored, a chunk
 * still queued or in flight is not queued twice, and per consult at most
 * the study's chunk count is queued again per resend window; what exceeds
 * that is refused with a log line. Cost O(k log k + chunk rows of the
 * case) for k listed indexes. */
int img_send__on_resend(ml_aimg_t *img, const ml_envelope_t *e)
{
    const Medlink__V1__ImagingResend *r = e->imaging_resend;
    ml_img_out_t o;
    s_env_box_t box = {NULL};
    uint32_t *want = NULL;
    s_queued_map_t map = {NULL, 0, 0};
    int rc = ml_istore_out_get(img->is, e->case_id, &o);
    if (rc == ML_ENOTFOUND || (rc == 0 && o.state != ML_IMG_OUT_ACTIVE)) {
        ml_log(ML_LOG_WARN, S_LOG, "case %s: %s asked for chunks again, but %s", e->case_id,
               e->from,
               rc == 0 ? "the case is over and its blob copies are gone"
                       : "this node sent no such consult");
        return 0;
    }
    if (rc < 0)
        return rc;
    if (o.assigned_to[0] && strcmp(o.assigned_to, e->from) != 0) {
        ml_log(ML_LOG_WARN, S_LOG, "case %s: ignored a resend request from %s (assigned to %s)",
               e->case_id, e->from, o.assigned_to);
        return 0;
    }
    if ((rc = ml_astore_outbox_get(img->store, o.consult_id, s_unpack_row_cb, &box)) != 1)
        return rc < 0 ? rc : ML_ESTORE;
    const Medlink__V1__ImagingConsult *c = box.e->imaging_consult;
    if (!c || r->object_index >= c->n_object) {
        ml_log(ML_LOG_WARN, S_LOG, "case %s: resend request for object %u, which does not exist",
               e->case_id, r->object_index);
        rc = 0;
        goto out;
    }
    const Medlink__V1__DicomObject *obj = c->object[r->object_index];
    char path[256], abs[S_PATH];
    if (aimg__fmt(path, sizeof path, "%s/%u.dcm", o.blob_dir, r->object_index) < 0) {
        rc = 0;
        goto out;
    }
    aimg__join(abs, sizeof abs, img->data_dir, path);

    /* The distinct chunk indexes that exist, in order. */
    size_t n_want = 0, beyond = 0;
    if (r->n_chunk_index > 0 && !(want = malloc(r->n_chunk_index * sizeof *want))) {
        rc = ML_ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < r->n_chunk_index; i++) {
        if (r->chunk_index[i] < obj->chunks)
            want[n_want++] = r->chunk_index[i];
        else
            beyond++;
    }
    if (n_want > 1)
        qsort(want, n_want, sizeof *want, s_cmp_u32);
    size_t n_unique = 0;
    for (size_t i = 0; i < n_want; i++)
        if (n_unique == 0 || want[n_unique - 1] != want[i])
            want[n_unique++] = want[i];
    if (beyond > 0)
        ml_log(ML_LOG_WARN, S_LOG,
               "case %s: %s asked for %zu chunk index(es) of object %u beyond its %u chunk(s); "
               "ignored",
               e->case_id, e->from, beyond, r->object_index, obj->chunks);

    /* Asked for every chunk: the whole object failed its digest there.
     * If our copy is what is wrong, sending it again cannot help. */
    if (obj->chunks > 0 && n_unique >= obj->chunks) {
        char sha[ML_SHA256_HEX + 1];
        uint64_t size = 0;
        if (ml_sha256_file(abs, sha, &size) < 0 || size != obj->size ||
            strcmp(sha, obj->sha256) != 0) {
            ml_log(ML_LOG_ERROR, S_LOG,
                   "case %s: the blob copy of object %u (%s) no longer matches its SHA-256; "
                   "not sending it again",
                   e->case_id, r->object_index, abs);
            rc = 0;
            goto out;
        }
    }

    /* A chunk still queued or in flight goes out anyway: a second copy
     * would only be stored as a duplicate. */
    map.chunks = obj->chunks;
    map.chunk_size = c->chunk_size;
    if (n_unique > 0) {
        if (!(map.queued = calloc(obj->chunks, 1))) {
            rc = ML_ENOMEM;
            goto out;
        }
        if ((rc = ml_astore_outbox_case_pending_offsets(img->store, e->case_id, path,
                                                        s_queued_off_cb, &map)) < 0)
            goto out;
    }

    int64_t now = ml_now_ms(), mono = ml_mono_ms();
    aimg_resend_t *budget = s_resend_budget(img, e->case_id, mono);
    if (!budget) {
        rc = ML_ENOMEM;
        goto out;
    }
    uint64_t limit = o.chunks > 0 ? o.chunks : obj->chunks;
    uint32_t queued = 0, already = 0, over = 0;
    uint64_t bytes = 0;
    for (size_t i = 0; i < n_unique; i++) {
        uint32_t k = want[i];
        if (map.queued[k]) {
            already++;
            continue;
        }
        if (budget->used >= limit) {
            over++;
            continue;
        }
        char id[ML_ULID_LEN + 1];
        uint8_t *tpl = NULL;
        size_t tlen = 0;
        ml_ulid_new(id);
        if ((rc = s_chunk_template(box.e, r->object_index, k, c->chunk_size, id, &tpl, &tlen)) < 0)
            goto out;
        uint64_t off = (uint64_t)k * c->chunk_size;
        size_t len = obj->size - off < c->chunk_size ? (size_t)(obj->size - off) : c->chunk_size;
        ml_outbox_new_t cr = {.id = id,
                              .case_id = e->case_id,
                              .envelope = tpl,
                              .envelope_len = tlen,
                              .blob_path = path,
                              .blob_off = off,
                              .blob_len = len};
        rc = ml_astore_outbox_insert(img->store, &cr, now);
        free(tpl);
        if (rc < 0)
            goto out;
        map.queued[k] = 1;
        budget->used++;
        queued++;
        bytes += len;
    }
    img->queued += queued > 0;
    s_prog_drop(img, e->case_id);
    if (over > 0)
        ml_log(ML_LOG_WARN, S_LOG,
               "case %s: refused to send %u chunk(s) of object %u again for %s: the resend limit "
               "of this consult (%llu chunk(s) per %lld s, resend_window_s) is reached",
               e->case_id, over, r->object_index, e->from, (unsigned long long)limit,
               (long long)(img->resend_window_ms / 1000));
    ml_log(ML_LOG_INFO, S_LOG,
           "case %s: %s asked for %zu chunk(s) of object %u again (%s); %zu distinct, %u queued "
           "(%llu bytes), %u already queued",
           e->case_id, e->from, r->n_chunk_index, r->object_index,
           r->reason && *r->reason ? r->reason : "no reason given", n_unique, queued,
           (unsigned long long)bytes, already);
    rc = 0;
out:
    free(want);
    free(map.queued);
    ml_env_free(&box.e);
    return rc;
}

void ml_aimg_start(ml_aimg_t *img)
{
    img->started = 1;
    s_kick(img);
}

void ml_aimg_stop(ml_aimg_t *img)
{
    if (!img || img->stopping)
        return;
    img->stopping = 1;
    atomic_store(&img->cancel, 1);
    aimg_job_t *job;
    while ((job = s_pop(img)) != NULL) {
        ml_spool_staged_retry(img->spool, job->name);
        s_job_free(job);
    }
}

void img_send__forget(ml_aimg_t *img, const char *case_id)
{
    s_prog_drop(img, case_id);
    s_resend_drop(img, case_id);
}

void img_send__close(ml_aimg_t *img)
{
    aimg_job_t *job;
    while ((job = s_pop(img)) != NULL)
        s_job_free(job);
    for (size_t i = 0; i < img->progs.n; i++)
        s_prog_clear(aimg__vec_at(&img->progs, i));
    aimg__vec_free(&img->progs);
    aimg__vec_free(&img->resends);
}
