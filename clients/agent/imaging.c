/* Imaging consults in the agent: staging a study from the spool folder into
 * blob copies and chunk rows (clinic), building chunk envelopes when they
 * are sent, following the broker's answers and the reading centre's
 * requests; reassembling, verifying and publishing a study (reading
 * centre). The order of every step is chosen so that a crash anywhere
 * leaves either nothing recorded (and the step is redone) or everything
 * recorded on disk:
 *
 *   staging   blob files are written and fsync'd before the rows that name
 *             them commit; a blob folder without an img_out row is garbage
 *             and deleted at start-up; the consult file stays in pending/
 *             without a row, so ml_spool_recover stages it again.
 *   chunks    data are pwrite'd, the .part files fsync'd, then the chunk
 *             records commit, then the Ack goes out. A chunk written but
 *             not recorded is simply delivered and written again.
 *   publish   the study folder is built under a hidden name and renamed;
 *             img_in is marked published (and STUDY_RECEIVED queued) in
 *             one transaction afterwards; a folder already in place at
 *             start-up means "published, record it". */
#include "imaging.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#include <openssl/evp.h>

#include "istore.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_imaging.h"
#include "ml_json.h"

#define S_LOG "imaging"
#define S_PATH 4096
#define S_COPY_BLOCK (256u * 1024)
/* A chunk that arrives damaged this often ends the consult (REJECTED):
 * something between the two agents corrupts it every time. */
#define S_MAX_BAD 5
/* Between attempts to publish a study after a failure (a full disk). */
#define S_RETRY_MS 10000
/* Whole-object digest failures before the consult is refused. */
#define S_MAX_ATTEMPTS 3
/* Chunk indexes per ImagingResend (keeps the record small). */
#define S_RESEND_MAX 4096
/* Defaults of the agent's resend_window_s and incoming_expire_s. */
#define S_RESEND_WINDOW_S 3600u
#define S_INCOMING_EXPIRE_S (72u * 3600)
/* Between two looks for expired incoming studies. */
#define S_EXPIRE_CHECK_MS 1000

#define K_(x) MEDLINK__V1__KIND__KIND_##x
#define P_(x) MEDLINK__V1__ENVELOPE__PAYLOAD_##x
#define ST_(x) MEDLINK__V1__IMAGING_STATUS__IMAGING_##x

/* One consult being staged. */
typedef struct s_job {
    struct s_job *next;
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
} s_job_t;

/* Sending progress of a case, kept for the log lines. */
typedef struct {
    char case_id[129];
    int64_t chunks, accepted, refused;
    uint64_t bytes, accepted_bytes;
    uint32_t n_objects;
    uint32_t *object_chunks; /* chunks per object, from the consult */
    int fresh;               /* loaded during this settle: counts include it */
    int done_logged;
} s_prog_t;

/* Work for after the receive commit. */
typedef struct {
    char case_id[129];
    uint32_t idx; /* object (touched) */
} s_touch_t;

typedef struct {
    char case_id[129];
    uint32_t idx;
    int fd;
} s_part_t;

typedef struct {
    char case_id[129];
    uint32_t idx;
    uint32_t chunk;
} s_bad_t;

/* Resend budget of one consult this node sent (F3): chunks queued again in
 * the current window. Kept in memory only: a restart of this agent is not
 * something the peer asking for resends can cause. */
typedef struct {
    char case_id[129];
    int64_t window_start; /* ml_mono_ms */
    uint64_t used;        /* chunks queued again since window_start */
} s_resend_t;

/* A growable array of fixed-size records. */
typedef struct {
    void *v;
    size_t n, cap, size;
} s_vec_t;

struct ml_aimg {
    char *data_dir;
    char *spool_dir;
    char *node_id;
    uint32_t chunk_size;
    size_t max_record;
    ml_astore_t *store;
    ml_spool_t *spool;
    ml_istore_t *is;
    uv_loop_t *loop;
    void (*wake)(void *arg);
    void *arg;

    s_job_t *head, *tail;
    s_job_t *running;
    atomic_int cancel;
    int started; /* ml_aimg_start: staging may use the thread pool */
    int stopping;

    s_vec_t progs; /* s_prog_t */

    /* Resend limits (clinic) and incoming expiry (reading centre). */
    int64_t resend_window_ms;
    int64_t incoming_expire_ms;
    int64_t expire_check_at; /* ml_mono_ms of the next look */
    s_vec_t resends;         /* s_resend_t */

    /* One receive batch. */
    s_vec_t touched;  /* s_touch_t: objects with new good chunks */
    s_vec_t parts;    /* s_part_t: open .part files */
    s_vec_t bad;      /* s_bad_t: chunks to ask for again */
    s_vec_t drop_out; /* char[129]: cases whose blob copies go */
    s_vec_t drop_in;  /* char[129]: cases whose incoming files go */
    int queued;       /* outbox rows added */
    int retry;        /* a publication failed; ml_aimg_tick retries */
    int64_t retry_at; /* not before this (ml_mono_ms) */
};

/* ---- small helpers ---------------------------------------------------- */

static void *s_vec_push(s_vec_t *v)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 16;
        void *n = realloc(v->v, cap * v->size);
        if (!n)
            return NULL;
        v->v = n;
        v->cap = cap;
    }
    void *slot = (char *)v->v + v->n * v->size;
    memset(slot, 0, v->size);
    v->n++;
    return slot;
}

static void *s_vec_at(const s_vec_t *v, size_t i)
{
    return (char *)v->v + i * v->size;
}

static void s_vec_free(s_vec_t *v)
{
    free(v->v);
    v->v = NULL;
    v->n = v->cap = 0;
}

/* Adds case_id to a vector of case ids unless it is there. */
static int s_case_push(s_vec_t *v, const char *case_id)
{
    for (size_t i = 0; i < v->n; i++)
        if (strcmp(s_vec_at(v, i), case_id) == 0)
            return 0;
    char *slot = s_vec_push(v);
    if (!slot)
        return ML_ENOMEM;
    snprintf(slot, 129, "%s", case_id);
    return 0;
}

/* The folder name of a case under blobs/ and incoming/: the case id when it
 * is made of plain characters (ULIDs are), else "~" and its SHA-256, so no
 * case id can name a path outside those folders or collide with another. */
static void s_case_dir(const char *case_id, char out[160])
{
    size_t n = strlen(case_id);
    int safe = n > 0 && n <= 128;
    for (size_t i = 0; safe && i < n; i++) {
        char c = case_id[i];
        safe = (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
               c == '-' || c == '_';
    }
    if (safe) {
        snprintf(out, 160, "%s", case_id);
    } else {
        char h[ML_SHA256_HEX + 1];
        ml_sha256_hex(case_id, n, h);
        snprintf(out, 160, "~%s", h);
    }
}

/* snprintf that reports truncation: 0 or ML_EINVAL. */
static int s_fmt(char *out, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int s_fmt(char *out, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out, len, fmt, ap);
    va_end(ap);
    return (n < 0 || (size_t)n >= len) ? ML_EINVAL : 0;
}

static int s_join(char *out, size_t len, const char *a, const char *b)
{
    return s_fmt(out, len, "%s/%s", a, b);
}

static void s_fsync_path(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return;
    if (fsync(fd) != 0)
        ml_log(ML_LOG_WARN, S_LOG, "fsync %s: %s", path, strerror(errno));
    close(fd);
}

/* rm -rf of path: its folder is opened (refusing a link as the last
 * component) and the tree is removed through directory fds with unlinkat
 * (ml_rmtree_at), so a link planted anywhere inside, or swapped in while
 * it runs, is removed itself and never followed. */
static int s_rmtree(const char *path)
{
    char parent[S_PATH];
    if (s_fmt(parent, sizeof parent, "%s", path) < 0)
        return ML_EIO;
    char *slash = strrchr(parent, '/');
    if (!slash || !slash[1])
        return ML_EINVAL;
    *slash = '\0';
    int dfd = ml_dir_open(AT_FDCWD, parent[0] ? parent : "/");
    if (dfd < 0)
        return errno == ENOENT ? 0 : ML_EIO;
    int rc = ml_rmtree_at(dfd, slash + 1);
    int saved = errno;
    close(dfd);
    errno = saved;
    return rc;
}

static void s_remove_dir(const char *path, const char *what)
{
    if (s_rmtree(path) < 0)
        ml_log(ML_LOG_WARN, S_LOG, "cannot delete %s %s: %s", what, path, strerror(errno));
}

static int s_blob_dir(const ml_aimg_t *img, const char *case_id, char *rel, size_t rlen, char *abs,
                      size_t alen)
{
    char cd[160];
    s_case_dir(case_id, cd);
    int n = snprintf(rel, rlen, "blobs/%s", cd);
    if (n < 0 || (size_t)n >= rlen)
        return ML_EINVAL;
    return s_join(abs, alen, img->data_dir, rel);
}

static int s_incoming_dir(const ml_aimg_t *img, const char *case_id, char *out, size_t len)
{
    char cd[160], rel[200];
    s_case_dir(case_id, cd);
    snprintf(rel, sizeof rel, "incoming/%s", cd);
    return s_join(out, len, img->data_dir, rel);
}

static int s_part_path(const ml_aimg_t *img, const char *case_id, uint32_t idx, char *out,
                       size_t len)
{
    char dir[S_PATH];
    if (s_incoming_dir(img, case_id, dir, sizeof dir) < 0)
        return ML_EINVAL;
    int n = snprintf(out, len, "%s/%u.part", dir, idx);
    return (n < 0 || (size_t)n >= len) ? ML_EINVAL : 0;
}

static int s_dup(char **field, const char *v)
{
    char *c = strdup(v ? v : "");
    if (!c)
        return ML_ENOMEM;
    if (*field && *field != protobuf_c_empty_string)
        free(*field);
    *field = c;
    return 0;
}

/* Adds an outgoing message to the outbox inside the caller's transaction:
 * fills id, from and created_at, validates, stores. e's strings may be
 * borrowed (e is not freed here). */
static int s_queue(ml_aimg_t *img, ml_envelope_t *e, const char *what)
{
    char id[ML_ULID_LEN + 1], err[512];
    uint8_t *blob = NULL;
    size_t len = 0;
    ml_ulid_new(id);
    e->id = id;
    e->from = img->node_id;
    e->created_at = ml_now_ms();
    int rc = ml_env_validate(e, err, sizeof err);
    if (rc < 0) {
        ml_log(ML_LOG_ERROR, S_LOG, "case %s: cannot send %s: %s", e->case_id, what, err);
        return rc;
    }
    if ((rc = ml_env_pack(e, &blob, &len)) < 0)
        return rc;
    ml_outbox_new_t row = {.id = id, .case_id = e->case_id, .envelope = blob, .envelope_len = len};
    rc = ml_astore_outbox_insert(img->store, &row, ml_now_ms());
    free(blob);
    if (rc < 0)
        return rc == ML_EDUP ? ML_ESTORE : rc;
    img->queued++;
    ml_log(ML_LOG_INFO, S_LOG, "case %s: queued %s to %s as message %s", e->case_id, what, e->to,
           id);
    return 0;
}

static int s_queue_update(ml_aimg_t *img, const char *case_id, const char *to, int priority,
                          Medlink__V1__ImagingUpdate *u, const char *what)
{
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.case_id = (char *)case_id;
    e.to = (char *)to;
    e.priority = (Medlink__V1__Priority)priority;
    e.payload_case = P_(IMAGING_UPDATE);
    e.imaging_update = u;
    return s_queue(img, &e, what);
}

/* Queues ImagingResend messages for chunks idx[0..n) of one object. */
static int s_queue_resend(ml_aimg_t *img, const ml_img_in_t *t, uint32_t object, uint32_t *idx,
                          size_t n, const char *reason)
{
    for (size_t off = 0; off < n; off += S_RESEND_MAX) {
        Medlink__V1__ImagingResend r = MEDLINK__V1__IMAGING_RESEND__INIT;
        r.object_index = object;
        r.chunk_index = idx + off;
        r.n_chunk_index = n - off < S_RESEND_MAX ? n - off : S_RESEND_MAX;
        r.reason = (char *)reason;
        ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
        e.case_id = (char *)t->case_id;
        e.to = (char *)t->sender;
        e.priority = (Medlink__V1__Priority)t->priority;
        e.payload_case = P_(IMAGING_RESEND);
        e.imaging_resend = &r;
        int rc = s_queue(img, &e, "IMAGING_RESEND");
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* ---- staging (clinic) ------------------------------------------------- */

static int s_cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void s_free_names(char **names, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
}

/* The files of a study folder in name order: regular files, names starting
 * with '.' skipped. A sub-folder is refused (reason set). */
static int s_list_study(s_job_t *job, char ***out, size_t *count)
{
    /* A fresh open file description of NAME.d: the listing has its own
     * position, and job->dfd stays for the openat of each file. */
    int lfd = openat(job->dfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    DIR *d = lfd >= 0 ? fdopendir(lfd) : NULL;
    const char *dname = strrchr(job->dir, '/') ? strrchr(job->dir, '/') + 1 : job->dir;
    char **names = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    if (!d) {
        ml_seterr(job->reason, sizeof job->reason, "cannot read %s: %s", dname, strerror(errno));
        if (lfd >= 0)
            close(lfd);
        return ML_EIO;
    }
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        struct stat st;
        /* A first look, for an early and clear refusal; what counts is the
         * fstat of the fd each file is then read through (s_open_study). */
        if (fstatat(job->dfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
            ml_seterr(job->reason, sizeof job->reason, "%s/%s: cannot read", dname, de->d_name);
            rc = ML_EIO;
            goto out;
        }
        if (!S_ISREG(st.st_mode)) {
            ml_seterr(job->reason, sizeof job->reason,
                      "%s/%s: is a %s, not a regular file (sub-folders, links and FIFOs are not "
                      "taken, links are never followed; put every DICOM file itself directly in "
                      "%s)",
                      dname, de->d_name, ml_file_type_name((unsigned)st.st_mode), dname);
            rc = ML_EINVAL;
            goto out;
        }
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 64;
            char **nn = realloc(names, ncap * sizeof *nn);
            if (!nn) {
                rc = ML_ENOMEM;
                goto out;
            }
            names = nn;
            cap = ncap;
        }
        if (!(names[n] = strdup(de->d_name))) {
            rc = ML_ENOMEM;
            goto out;
        }
        n++;
    }
    if (n > 1)
        qsort(names, n, sizeof *names, s_cmp_str);
    *out = names;
    *count = n;
    names = NULL;
    n = 0;
out:
    closedir(d);
    s_free_names(names, n);
    if (rc == ML_ENOMEM)
        ml_seterr(job->reason, sizeof job->reason, "out of memory");
    return rc;
}

/* Opens file name of NAME.d once for probing, hashing and copying: no
 * link is followed and a FIFO does not block (ml_file_open_regular), and
 * the fd must be a regular file with one link. The owner is not checked
 * (the hospital system's account writes these files), but a second hard
 * link is refused: it is the one way left to put a file the writer cannot
 * read itself (the agent's key, its database) into the study. Returns the
 * fd or a negative ML_E* with job->reason set. */
static int s_open_study(s_job_t *job, const char *name, struct stat *st)
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

/* Copies the open file in (from offset 0, with pread) to dst_name in the
 * blob folder bfd (through a new dst_name.tmp, fsync'd, renamed) while
 * hashing it. Stops early when the agent is stopping. */
static int s_copy_hash(s_job_t *job, int in, int bfd, const char *dst_name, uint64_t *size,
                       char sha[ML_SHA256_HEX + 1])
{
    int rc = ML_EIO, out = -1, made = 0;
    char tmp[256];
    uint8_t *buf = NULL;
    uint64_t total = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx || !(buf = malloc(S_COPY_BLOCK))) {
        rc = ML_ENOMEM;
        goto out;
    }
    if (s_fmt(tmp, sizeof tmp, "%s.tmp", dst_name) < 0) {
        errno = ENAMETOOLONG;
        goto out;
    }
    /* The blob folder is the agent's own and was made empty for this job:
     * anything at the name is a leftover, never to be written through. */
    unlinkat(bfd, tmp, 0);
    if ((out = ml_file_create_excl(bfd, tmp, 0640)) < 0)
        goto out;
    made = 1;
    if (EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1)
        goto out;
    for (;;) {
        if (atomic_load(&job->img->cancel)) {
            rc = ML_ECLOSED;
            goto out;
        }
        ssize_t r = pread(in, buf, S_COPY_BLOCK, (off_t)total);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            goto out;
        }
        if (r == 0)
            break;
        if (EVP_DigestUpdate(ctx, buf, (size_t)r) != 1)
            goto out;
        for (ssize_t w = 0; w < r;) {
            ssize_t k = write(out, buf + w, (size_t)(r - w));
            if (k < 0) {
                if (errno == EINTR)
                    continue;
                goto out;
            }
            w += k;
        }
        total += (uint64_t)r;
    }
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (EVP_DigestFinal_ex(ctx, md, &mdlen) != 1 || mdlen != 32)
        goto out;
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        sha[2 * i] = hex[md[i] >> 4];
        sha[2 * i + 1] = hex[md[i] & 15];
    }
    sha[ML_SHA256_HEX] = '\0';
    if (fsync(out) != 0)
        goto out;
    if (close(out) != 0) {
        out = -1;
        goto out;
    }
    out = -1;
    if (renameat(bfd, tmp, bfd, dst_name) != 0)
        goto out;
    *size = total;
    rc = 0;
out : {
    int saved = errno;
    if (out >= 0)
        close(out);
    if (rc < 0 && made)
        unlinkat(bfd, tmp, 0);
    free(buf);
    EVP_MD_CTX_free(ctx);
    errno = saved;
}
    return rc;
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
    if (s_dup(&o->sop_instance_uid, "") < 0 || s_dup(&o->file_name, "") < 0 ||
        s_dup(&o->sha256, "") < 0 || s_dup(&o->series_instance_uid, "") < 0) {
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
static void s_stage_run(s_job_t *job)
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
        s_fmt(dst, sizeof dst, "%zu.dcm", i);
        rc = s_copy_hash(job, sfd, bfd, dst, &size, sha);
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
        if (!o || s_dup(&o->file_name, name) < 0 || s_dup(&o->sha256, sha) < 0 ||
            s_dup(&o->sop_instance_uid, info[i].sop_instance_uid) < 0 ||
            s_dup(&o->series_instance_uid, info[i].series_instance_uid) < 0) {
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
        s_dup(&c->study_instance_uid, info[0].study_instance_uid) < 0)
        goto nomem;
    if ((!c->modality || !*c->modality) && info[0].modality[0] &&
        s_dup(&c->modality, info[0].modality) < 0)
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

static void s_job_free(s_job_t *job)
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
static int s_store_consult(ml_aimg_t *img, s_job_t *job, char *why, size_t whylen)
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
static void s_stage_finish(ml_aimg_t *img, s_job_t *job)
{
    char why[1024] = "";
    const ml_envelope_t *e = job->env;
    if (job->rc == ML_ECLOSED) {
        s_remove_dir(job->blob_abs, "blob copies");
        ml_spool_staged_retry(img->spool, job->name);
        ml_log(ML_LOG_INFO, S_LOG,
               "pending/%s: staging stopped; it is staged again at the next "
               "start",
               job->name);
        return;
    }
    if (job->rc < 0) {
        s_remove_dir(job->blob_abs, "blob copies");
        ml_spool_staged_reject(img->spool, job->name, e->id, job->reason);
        return;
    }
    int rc = s_store_consult(img, job, why, sizeof why);
    if (rc == ML_EDUP) {
        s_remove_dir(job->blob_abs, "blob copies");
        ml_spool_staged_reject(img->spool, job->name, e->id, why);
        return;
    }
    if (rc < 0) {
        ml_log(ML_LOG_ERROR, S_LOG, "cannot store imaging consult pending/%s: %s; will retry",
               job->name, ml_astore_errmsg(img->store));
        s_remove_dir(job->blob_abs, "blob copies");
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
static int s_precheck(ml_aimg_t *img, s_job_t *job)
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
    s_remove_dir(job->blob_abs, "old blob copies");
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
    s_job_t *job = w->data;
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

static s_job_t *s_pop(ml_aimg_t *img)
{
    s_job_t *job = img->head;
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
        s_job_t *job = s_pop(img);
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
    s_job_t *job;
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
static void s_consult_cb(void *arg, const char *name, ml_envelope_t *env)
{
    ml_aimg_t *img = arg;
    s_job_t *job = calloc(1, sizeof *job);
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
    if (s_blob_dir(img, env->case_id, job->blob_rel, sizeof job->blob_rel, job->blob_abs,
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

/* ---- sending (clinic) -------------------------------------------------- */

int ml_aimg_chunk_envelope(ml_aimg_t *img, const ml_outbox_row_t *row, uint8_t **out, size_t *len,
                           char *err, size_t errlen)
{
    char path[S_PATH], sha[ML_SHA256_HEX + 1];
    uint8_t *data = NULL;
    ml_envelope_t *e = NULL;
    struct stat st;
    int rc = ML_EIO;
    int fd = -1;
    if (s_join(path, sizeof path, img->data_dir, row->blob_path) < 0) {
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
    if ((rc = s_dup(&e->imaging_chunk->sha256, sha)) < 0)
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

static void s_prog_clear(s_prog_t *p)
{
    free(p->object_chunks);
    p->object_chunks = NULL;
}

static void s_prog_drop(ml_aimg_t *img, const char *case_id)
{
    for (size_t i = 0; i < img->progs.n; i++) {
        s_prog_t *p = s_vec_at(&img->progs, i);
        if (strcmp(p->case_id, case_id) == 0) {
            s_prog_clear(p);
            *p = *(s_prog_t *)s_vec_at(&img->progs, img->progs.n - 1);
            img->progs.n--;
            return;
        }
    }
}

static void s_resend_drop(ml_aimg_t *img, const char *case_id)
{
    for (size_t i = 0; i < img->resends.n; i++) {
        s_resend_t *r = s_vec_at(&img->resends, i);
        if (strcmp(r->case_id, case_id) == 0) {
            *r = *(s_resend_t *)s_vec_at(&img->resends, img->resends.n - 1);
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
static s_prog_t *s_prog(ml_aimg_t *img, const char *case_id)
{
    for (size_t i = 0; i < img->progs.n; i++) {
        s_prog_t *p = s_vec_at(&img->progs, i);
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
    s_prog_t *p = s_vec_push(&img->progs);
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

/* Ends a case this node sent: no more chunks, blob copies deleted after
 * the commit. Inside the caller's transaction. */
static int s_close_out(ml_aimg_t *img, const char *case_id, const char *why)
{
    int rc = ml_istore_out_close(img->is, case_id, ml_now_ms());
    if (rc <= 0)
        return rc;
    char reason[512];
    snprintf(reason, sizeof reason, "not sent: %s", why);
    int dropped = ml_astore_outbox_case_drop(img->store, case_id, reason, ml_now_ms());
    if (dropped < 0)
        return dropped;
    ml_log(ML_LOG_INFO, S_LOG, "case %s: %s; %d unsent chunk(s) dropped, blob copies deleted",
           case_id, why, dropped);
    return s_case_push(&img->drop_out, case_id);
}

/* After a commit: deletes the blob copies and incoming files of the cases
 * that ended. */
static void s_drop_files(ml_aimg_t *img)
{
    for (size_t i = 0; i < img->drop_out.n; i++) {
        const char *case_id = s_vec_at(&img->drop_out, i);
        char rel[200], abs[S_PATH];
        if (s_blob_dir(img, case_id, rel, sizeof rel, abs, sizeof abs) == 0)
            s_remove_dir(abs, "blob copies");
        s_prog_drop(img, case_id);
        s_resend_drop(img, case_id);
    }
    for (size_t i = 0; i < img->drop_in.n; i++) {
        char dir[S_PATH];
        if (s_incoming_dir(img, s_vec_at(&img->drop_in, i), dir, sizeof dir) == 0)
            s_remove_dir(dir, "incoming files");
    }
    img->drop_out.n = img->drop_in.n = 0;
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
            s_prog_t *p = s_prog(img, ri.case_id);
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
            if (s_close_out(img, ri.case_id, "the consult was refused") >= 0 &&
                ml_astore_commit(img->store) == 0)
                closed = 1;
            else
                ml_astore_rollback(img->store);
        }
    }
    for (size_t i = 0; i < img->progs.n; i++)
        ((s_prog_t *)s_vec_at(&img->progs, i))->fresh = 0;
    if (closed)
        s_drop_files(img);
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
        s_prog_clear(s_vec_at(&img->progs, i));
    img->progs.n = 0;
    ml_istore_out_walk(img->is, ML_IMG_OUT_ACTIVE, s_resume_cb, img);
}

/* The resend budget record of case_id, made when first needed; NULL out
 * of memory. Records whose window has passed are reused first, which keeps
 * the vector no larger than the consults asked for within one window. */
static s_resend_t *s_resend_budget(ml_aimg_t *img, const char *case_id, int64_t now)
{
    s_resend_t *free_slot = NULL;
    for (size_t i = 0; i < img->resends.n; i++) {
        s_resend_t *r = s_vec_at(&img->resends, i);
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
    s_resend_t *r = free_slot ? free_slot : s_vec_push(&img->resends);
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
static int s_on_resend(ml_aimg_t *img, const ml_envelope_t *e)
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
    if (s_fmt(path, sizeof path, "%s/%u.dcm", o.blob_dir, r->object_index) < 0) {
        rc = 0;
        goto out;
    }
    s_join(abs, sizeof abs, img->data_dir, path);

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
    s_resend_t *budget = s_resend_budget(img, e->case_id, mono);
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

/* ---- receiving (reading centre) ---------------------------------------- */

/* A plain, unused file name for object idx in the published folder. */
static void s_publish_name(const char *want, uint32_t idx, char **used, size_t n_used,
                           char out[160])
{
    size_t n = want ? strlen(want) : 0;
    int ok = n > 0 && n < 128 && want[0] != '.' && strcmp(want, "manifest.json") != 0;
    for (size_t i = 0; ok && i < n; i++) {
        unsigned char c = (unsigned char)want[i];
        if (c == '/' || c == '\\' || c < 0x20 || c == 0x7f)
            ok = 0;
    }
    for (size_t i = 0; ok && i < n_used; i++)
        if (strcmp(used[i], want) == 0)
            ok = 0;
    if (ok) {
        snprintf(out, 160, "%s", want);
        return;
    }
    /* "object-<idx>.dcm" cannot be taken by an earlier fallback (indexes
     * differ) but could be a sender's own name: add a counter then. */
    snprintf(out, 160, "object-%04u.dcm", idx);
    for (int k = 2;; k++) {
        int taken = 0;
        for (size_t i = 0; i < n_used; i++)
            if (strcmp(used[i], out) == 0)
                taken = 1;
        if (!taken)
            return;
        snprintf(out, 160, "object-%04u-%d.dcm", idx, k);
    }
}

/* Refuses a transfer: state REJECTED, IMAGING_REJECTED to the clinic,
 * incoming files deleted after the commit. In the caller's transaction. */
static int s_reject_in(ml_aimg_t *img, const ml_img_in_t *t, const char *reason)
{
    int rc =
        ml_istore_in_set_state(img->is, t->case_id, ML_IMG_IN_REJECTED, reason, NULL, ml_now_ms());
    if (rc < 0)
        return rc;
    Medlink__V1__ImagingUpdate u = MEDLINK__V1__IMAGING_UPDATE__INIT;
    u.status = ST_(REJECTED);
    u.reason = (char *)reason;
    if ((rc = s_queue_update(img, t->case_id, t->sender, t->priority, &u, "IMAGING_REJECTED")) < 0)
        return rc;
    ml_log(ML_LOG_ERROR, S_LOG, "case %s: consult from %s refused: %s", t->case_id, t->sender,
           reason);
    return s_case_push(&img->drop_in, t->case_id);
}

static int s_handle_chunk(ml_aimg_t *img, const ml_spool_msg_t *m, const ml_envelope_t *e,
                          int *ack);

typedef struct {
    ml_aimg_t *img;
    int rc;
} s_orphan_ctx_t;

static int s_orphan_cb(const char *id, const uint8_t *env, size_t len, void *arg)
{
    s_orphan_ctx_t *ctx = arg;
    ml_envelope_t *e = NULL;
    int ack = 0;
    if (ml_env_unpack(env, len, &e) < 0)
        return 0;
    ml_spool_msg_t m = {.id = id,
                        .case_id = e->case_id,
                        .sender = e->from,
                        .kind = e->kind,
                        .envelope = env,
                        .envelope_len = len};
    int rc = s_handle_chunk(ctx->img, &m, e, &ack);
    ml_env_free(&e);
    if (rc < 0) {
        ctx->rc = rc;
        return rc;
    }
    return 0;
}

/* A delivered consult opens a transfer (or refuses one that cannot be
 * received), then takes the chunks that came before it. */
static int s_open_transfer(ml_aimg_t *img, const ml_spool_msg_t *m, ml_envelope_t *e)
{
    ml_img_in_t t;
    char err[512];
    char **used = NULL;
    int rc = ml_istore_in_get(img->is, e->case_id, &t);
    if (rc == 0) {
        ml_log(ML_LOG_WARN, S_LOG,
               "case %s: a second consult (%s) for a case already open; "
               "ignored",
               e->case_id, m->id);
        return 0;
    }
    if (rc != ML_ENOTFOUND)
        return rc;
    const Medlink__V1__ImagingConsult *c = e->imaging_consult;
    memset(&t, 0, sizeof t);
    snprintf(t.case_id, sizeof t.case_id, "%s", e->case_id);
    snprintf(t.consult_id, sizeof t.consult_id, "%s", m->id);
    snprintf(t.sender, sizeof t.sender, "%s", e->from);
    snprintf(t.study_uid, sizeof t.study_uid, "%s", c->study_instance_uid);
    t.priority = e->priority;
    t.chunk_size = c->chunk_size;
    t.objects = (uint32_t)c->n_object;
    t.total_bytes = c->total_bytes;
    t.state = ML_IMG_IN_RECEIVING;
    /* The broker validated it; this agent writes files by what it says, so
     * it checks again. */
    if (ml_env_validate(e, err, sizeof err) < 0 || strlen(e->case_id) >= sizeof t.case_id) {
        t.state = ML_IMG_IN_REJECTED;
        ml_seterr(t.reason, sizeof t.reason, "the consult cannot be received: %s", err);
    }
    if ((rc = ml_istore_in_add(img->is, &t, ml_now_ms())) < 0)
        return rc;
    if (t.state == ML_IMG_IN_REJECTED) {
        char reason[600];
        snprintf(reason, sizeof reason, "%s", t.reason);
        return s_reject_in(img, &t, reason);
    }
    if (!(used = calloc(c->n_object ? c->n_object : 1, sizeof *used)))
        return ML_ENOMEM;
    for (uint32_t i = 0; i < c->n_object; i++) {
        const Medlink__V1__DicomObject *o = c->object[i];
        ml_img_obj_t ob;
        memset(&ob, 0, sizeof ob);
        ob.idx = i;
        s_publish_name(o->file_name, i, used, i, ob.file_name);
        ob.size = o->size;
        ob.chunks = o->chunks;
        snprintf(ob.sha256, sizeof ob.sha256, "%s", o->sha256);
        snprintf(ob.sop_uid, sizeof ob.sop_uid, "%s", o->sop_instance_uid);
        snprintf(ob.series_uid, sizeof ob.series_uid, "%s", o->series_instance_uid);
        if (!(used[i] = strdup(ob.file_name))) {
            rc = ML_ENOMEM;
            goto out;
        }
        if ((rc = ml_istore_obj_add(img->is, t.case_id, &ob)) < 0)
            goto out;
    }
    ml_log(ML_LOG_INFO, S_LOG,
           "case %s: receiving study %s from %s: %u object(s), %llu bytes in chunks of %u bytes",
           t.case_id, t.study_uid, t.sender, t.objects, (unsigned long long)t.total_bytes,
           t.chunk_size);
    s_orphan_ctx_t ctx = {img, 0};
    if ((rc = ml_istore_orphan_walk(img->is, t.case_id, s_orphan_cb, &ctx)) < 0 ||
        (rc = ctx.rc) < 0)
        goto out;
    rc = ml_istore_orphan_drop(img->is, t.case_id);
out:
    for (uint32_t i = 0; used && i < c->n_object; i++)
        free(used[i]);
    free(used);
    return rc;
}

/* The open .part file of an object in this batch (opened on first use). */
static int s_part_fd(ml_aimg_t *img, const char *case_id, uint32_t idx)
{
    for (size_t i = 0; i < img->parts.n; i++) {
        s_part_t *p = s_vec_at(&img->parts, i);
        if (p->idx == idx && strcmp(p->case_id, case_id) == 0)
            return p->fd;
    }
    char dir[S_PATH], path[S_PATH];
    if (s_incoming_dir(img, case_id, dir, sizeof dir) < 0 ||
        s_part_path(img, case_id, idx, path, sizeof path) < 0)
        return -1;
    if (ml_mkdirs(dir) < 0)
        return -1;
    int fd = open(path, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0640);
    if (fd < 0)
        return -1;
    s_part_t *p = s_vec_push(&img->parts);
    if (!p) {
        close(fd);
        return -1;
    }
    snprintf(p->case_id, sizeof p->case_id, "%s", case_id);
    p->idx = idx;
    p->fd = fd;
    return fd;
}

static int s_touch(ml_aimg_t *img, const char *case_id, uint32_t idx)
{
    for (size_t i = 0; i < img->touched.n; i++) {
        s_touch_t *t = s_vec_at(&img->touched, i);
        if (t->idx == idx && strcmp(t->case_id, case_id) == 0)
            return 0;
    }
    s_touch_t *t = s_vec_push(&img->touched);
    if (!t)
        return ML_ENOMEM;
    snprintf(t->case_id, sizeof t->case_id, "%s", case_id);
    t->idx = idx;
    return 0;
}

/* One delivered chunk, inside the batch transaction. *ack says whether it
 * may be acknowledged. Returns 0 or ML_ESTORE/ML_ENOMEM (roll back). */
static int s_handle_chunk(ml_aimg_t *img, const ml_spool_msg_t *m, const ml_envelope_t *e, int *ack)
{
    const Medlink__V1__ImagingChunk *ch = e->imaging_chunk;
    ml_img_in_t t;
    ml_img_obj_t o;
    *ack = 1;
    if (!ch) {
        ml_log(ML_LOG_WARN, S_LOG, "dropped %s: IMAGING_CHUNK without a chunk", m->id);
        return 0;
    }
    int rc = ml_istore_in_get(img->is, e->case_id, &t);
    if (rc == ML_ENOTFOUND) {
        /* The broker sends a consult before its chunks; should a chunk come
         * first all the same, it waits here for its consult. */
        if ((rc = ml_istore_orphan_add(img->is, m->id, e->case_id, m->envelope, m->envelope_len,
                                       ml_now_ms())) < 0)
            return rc;
        ml_log(ML_LOG_WARN, S_LOG,
               "case %s: chunk %u of object %u arrived before its consult; kept until it comes",
               e->case_id, ch->chunk_index, ch->object_index);
        return 0;
    }
    if (rc < 0)
        return rc;
    if (t.state != ML_IMG_IN_RECEIVING) {
        ml_log(ML_LOG_DEBUG, S_LOG, "case %s: chunk %u of object %u after the transfer ended",
               t.case_id, ch->chunk_index, ch->object_index);
        return 0;
    }
    if (strcmp(e->from, t.sender) != 0) {
        ml_log(ML_LOG_WARN, S_LOG, "case %s: dropped a chunk from %s (the consult came from %s)",
               t.case_id, e->from, t.sender);
        return 0;
    }
    rc = ch->object_index < t.objects ? ml_istore_obj_get(img->is, t.case_id, ch->object_index, &o)
                                      : ML_ENOTFOUND;
    if (rc < 0 && rc != ML_ENOTFOUND)
        return rc;
    if (rc == ML_ENOTFOUND || ch->chunk_index >= o.chunks) {
        ml_log(ML_LOG_WARN, S_LOG,
               "case %s: dropped chunk %u of object %u: the consult has no "
               "such chunk",
               t.case_id, ch->chunk_index, ch->object_index);
        return 0;
    }
    int good = 0;
    uint32_t bad_count = 0;
    rc = ml_istore_chunk_get(img->is, t.case_id, o.idx, ch->chunk_index, &good, &bad_count);
    if (rc < 0 && rc != ML_ENOTFOUND)
        return rc;
    if (rc == 0 && good) {
        ml_log(ML_LOG_DEBUG, S_LOG, "case %s: chunk %u of object %u again (duplicate)", t.case_id,
               ch->chunk_index, o.idx);
        return 0;
    }
    uint64_t off = (uint64_t)ch->chunk_index * t.chunk_size;
    uint64_t want = o.size - off < t.chunk_size ? o.size - off : t.chunk_size;
    char sha[ML_SHA256_HEX + 1];
    const char *why = NULL;
    if (ch->offset != off)
        why = "its offset does not match its index";
    else if (ch->data.len != want)
        why = "its length does not match the object's size";
    else {
        ml_sha256_hex(ch->data.data, ch->data.len, sha);
        if (!ch->sha256 || strcmp(sha, ch->sha256) != 0)
            why = "its data do not match its SHA-256";
    }
    int64_t now = ml_now_ms();
    if (why) {
        bad_count++;
        if ((rc = ml_istore_chunk_put(img->is, t.case_id, o.idx, ch->chunk_index, 0, bad_count,
                                      now)) < 0)
            return rc;
        if (bad_count >= S_MAX_BAD) {
            char reason[512];
            snprintf(reason, sizeof reason,
                     "chunk %u of object %u (%s) arrived damaged %u times; the study cannot be "
                     "received",
                     ch->chunk_index, o.idx, o.file_name, bad_count);
            return s_reject_in(img, &t, reason);
        }
        ml_log(ML_LOG_WARN, S_LOG,
               "case %s: chunk %u/%u of object %u is damaged (%s); asking "
               "for it again",
               t.case_id, ch->chunk_index + 1, o.chunks, o.idx, why);
        s_bad_t *b = s_vec_push(&img->bad);
        if (!b)
            return ML_ENOMEM;
        snprintf(b->case_id, sizeof b->case_id, "%s", t.case_id);
        b->idx = o.idx;
        b->chunk = ch->chunk_index;
        return 0;
    }
    int fd = s_part_fd(img, t.case_id, o.idx);
    const uint8_t *p = ch->data.data;
    size_t left = ch->data.len;
    uint64_t at = off;
    while (fd >= 0 && left > 0) {
        ssize_t w = pwrite(fd, p, left, (off_t)at);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            fd = -1;
            break;
        }
        p += w;
        left -= (size_t)w;
        at += (uint64_t)w;
    }
    if (fd < 0) {
        /* Not recorded, not acked: the broker delivers it again. */
        ml_log(ML_LOG_ERROR, S_LOG, "case %s: cannot write chunk %u of object %u: %s", t.case_id,
               ch->chunk_index, o.idx, strerror(errno));
        *ack = 0;
        return 0;
    }
    if ((rc = ml_istore_chunk_put(img->is, t.case_id, o.idx, ch->chunk_index, 1, bad_count, now)) <
            0 ||
        (rc = ml_istore_obj_add_good(img->is, t.case_id, o.idx)) < 0)
        return rc;
    ml_log(ML_LOG_DEBUG, S_LOG, "case %s: chunk %u/%u of object %u received (%zu bytes)", t.case_id,
           ch->chunk_index + 1, o.chunks, o.idx, ch->data.len);
    return s_touch(img, t.case_id, o.idx);
}

static int s_cmp_bad(const void *a, const void *b)
{
    const s_bad_t *x = a, *y = b;
    int c = strcmp(x->case_id, y->case_id);
    if (c)
        return c;
    if (x->idx != y->idx)
        return x->idx < y->idx ? -1 : 1;
    return x->chunk < y->chunk ? -1 : x->chunk > y->chunk;
}

/* One ImagingResend per object with damaged chunks in this batch. */
static int s_flush_bad(ml_aimg_t *img)
{
    if (img->bad.n == 0)
        return 0;
    qsort(img->bad.v, img->bad.n, sizeof(s_bad_t), s_cmp_bad);
    uint32_t *idx = malloc(img->bad.n * sizeof *idx);
    if (!idx)
        return ML_ENOMEM;
    int rc = 0;
    for (size_t i = 0; i < img->bad.n && rc == 0;) {
        s_bad_t *first = s_vec_at(&img->bad, i);
        size_t n = 0;
        size_t j = i;
        for (; j < img->bad.n; j++) {
            s_bad_t *b = s_vec_at(&img->bad, j);
            if (b->idx != first->idx || strcmp(b->case_id, first->case_id) != 0)
                break;
            if (n == 0 || idx[n - 1] != b->chunk)
                idx[n++] = b->chunk;
        }
        ml_img_in_t t;
        if (ml_istore_in_get(img->is, first->case_id, &t) == 0 && t.state == ML_IMG_IN_RECEIVING)
            rc = s_queue_resend(img, &t, first->idx, idx, n,
                                "chunk SHA-256 check failed on "
                                "arrival");
        i = j;
    }
    free(idx);
    img->bad.n = 0;
    return rc;
}

/* Fsyncs and closes the .part files of the batch. Returns 0 or ML_EIO. */
static int s_close_parts(ml_aimg_t *img, int sync)
{
    int rc = 0;
    for (size_t i = 0; i < img->parts.n; i++) {
        s_part_t *p = s_vec_at(&img->parts, i);
        if (sync && fsync(p->fd) != 0) {
            ml_log(ML_LOG_ERROR, S_LOG, "case %s: fsync of object %u failed: %s", p->case_id,
                   p->idx, strerror(errno));
            rc = ML_EIO;
        }
        close(p->fd);
    }
    if (sync && img->parts.n > 0) {
        /* New .part files must survive a crash by name too. */
        for (size_t i = 0; i < img->parts.n; i++) {
            s_part_t *p = s_vec_at(&img->parts, i);
            char dir[S_PATH];
            int seen = 0;
            for (size_t j = 0; j < i; j++)
                if (strcmp(((s_part_t *)s_vec_at(&img->parts, j))->case_id, p->case_id) == 0)
                    seen = 1;
            if (!seen && s_incoming_dir(img, p->case_id, dir, sizeof dir) == 0)
                s_fsync_path(dir);
        }
    }
    img->parts.n = 0;
    return rc;
}

/* Updates, reports and resends for cases this node is part of. */
static int s_on_message(ml_aimg_t *img, const ml_spool_msg_t *m)
{
    int kind = m->kind;
    if (kind != K_(IMAGING_CONSULT) && kind != K_(IMAGING_RESEND) && kind != K_(IMAGING_UPDATE) &&
        kind != K_(IMAGING_REPORT))
        return 0;
    ml_envelope_t *e = NULL;
    if (ml_env_unpack(m->envelope, m->envelope_len, &e) < 0)
        return 0;
    int rc = 0;
    ml_img_in_t t;
    char why[512];
    switch (e->payload_case) {
    case P_(IMAGING_CONSULT):
        rc = s_open_transfer(img, m, e);
        break;
    case P_(IMAGING_RESEND):
        rc = s_on_resend(img, e);
        break;
    case P_(IMAGING_REPORT):
        snprintf(why, sizeof why, "report received from %s", e->from);
        rc = s_close_out(img, e->case_id, why);
        break;
    case P_(IMAGING_UPDATE): {
        const Medlink__V1__ImagingUpdate *u = e->imaging_update;
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(
            &medlink__v1__imaging_status__descriptor, (int)u->status);
        const char *name = ev ? ev->name : "?";
        switch ((int)u->status) {
        case ST_(ASSIGNED):
            if (u->assigned_to && *u->assigned_to) {
                rc = ml_istore_out_set_assigned(img->is, e->case_id, u->assigned_to, ml_now_ms());
                ml_log(ML_LOG_INFO, S_LOG, "case %s: assigned to reading centre %s", e->case_id,
                       u->assigned_to);
            }
            break;
        case ST_(STUDY_RECEIVED):
            /* Verified at the reading centre; the broker takes no more
             * chunks for the case, so the copies are of no further use. */
            snprintf(why, sizeof why, "%s has the whole study (%u object(s), %llu bytes)", e->from,
                     u->objects_received, (unsigned long long)u->bytes_received);
            rc = s_close_out(img, e->case_id, why);
            break;
        case ST_(REJECTED):
        case ST_(CANCELLED):
        case ST_(CLOSED):
            snprintf(why, sizeof why, "%s by %s%s%s", name, e->from,
                     u->reason && *u->reason ? ": " : "", u->reason ? u->reason : "");
            rc = s_close_out(img, e->case_id, why);
            if (rc >= 0 && (int)u->status == ST_(CANCELLED) &&
                ml_istore_in_get(img->is, e->case_id, &t) == 0 && t.state == ML_IMG_IN_RECEIVING) {
                rc = ml_istore_in_set_state(img->is, t.case_id, ML_IMG_IN_CANCELLED, why, NULL,
                                            ml_now_ms());
                if (rc >= 0)
                    rc = s_case_push(&img->drop_in, t.case_id);
                ml_log(ML_LOG_INFO, S_LOG, "case %s: transfer ended: %s", t.case_id, why);
            }
            break;
        default:
            break;
        }
        break;
    }
    default:
        break;
    }
    ml_env_free(&e);
    return rc < 0 ? rc : 0;
}

/* Reads the whole object back and checks it against the consult. Bytes
 * past the object's size (a write a crash interrupted, never recorded) are
 * cut off first: every recorded chunk lies within the size. */
static int s_verify(ml_aimg_t *img, const ml_img_in_t *t, const ml_img_obj_t *o)
{
    char path[S_PATH], sha[ML_SHA256_HEX + 1];
    uint64_t size = 0;
    struct stat st;
    if (s_part_path(img, t->case_id, o->idx, path, sizeof path) < 0)
        return 0;
    if (stat(path, &st) == 0 && (uint64_t)st.st_size > o->size) {
        int fd = open(path, O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0 || ftruncate(fd, (off_t)o->size) != 0 || fsync(fd) != 0)
            ml_log(ML_LOG_WARN, S_LOG, "case %s: cannot trim %s: %s", t->case_id, path,
                   strerror(errno));
        if (fd >= 0)
            close(fd);
    }
    if (ml_sha256_file(path, sha, &size) < 0)
        return 0;
    return size == o->size && strcmp(sha, o->sha256) == 0;
}

typedef struct {
    ml_img_obj_t *v;
    size_t n, cap;
} s_objs_t;

static int s_collect_obj_cb(const ml_img_obj_t *o, void *arg)
{
    s_objs_t *a = arg;
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 16;
        ml_img_obj_t *n = realloc(a->v, cap * sizeof *n);
        if (!n)
            return ML_ENOMEM;
        a->v = n;
        a->cap = cap;
    }
    a->v[a->n++] = *o;
    return 0;
}

/* Copies src in folder sfd to a new dst in folder dfd with fsync
 * (publication across file systems). Neither name is followed if it is a
 * link; dst must not exist. */
static int s_copy_file(int sfd, const char *src, int dfd, const char *dst)
{
    int rc = ML_EIO, in = -1, out = -1;
    uint8_t *buf = malloc(S_COPY_BLOCK);
    if (!buf)
        return ML_ENOMEM;
    if ((in = ml_file_open_regular(sfd, src, NULL)) < 0 ||
        (out = ml_file_create_excl(dfd, dst, 0640)) < 0)
        goto out;
    for (;;) {
        ssize_t r = read(in, buf, S_COPY_BLOCK);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            goto out;
        if (r == 0)
            break;
        for (ssize_t w = 0; w < r;) {
            ssize_t k = write(out, buf + w, (size_t)(r - w));
            if (k < 0 && errno == EINTR)
                continue;
            if (k < 0)
                goto out;
            w += k;
        }
    }
    if (fsync(out) != 0)
        goto out;
    rc = 0;
out:
    if (in >= 0)
        close(in);
    if (out >= 0)
        close(out);
    free(buf);
    return rc;
}

static json_t *s_message_json(const ProtobufCMessage *m)
{
    char *text = NULL, err[256];
    if (!m || ml_json_encode(m, 0, &text, err, sizeof err) < 0)
        return NULL;
    json_t *j = json_loads(text, 0, NULL);
    free(text);
    return j;
}

static int s_inbox_env_cb(const ml_inbox_row_t *r, void *arg)
{
    return ml_env_unpack(r->envelope, r->envelope_len, arg) < 0 ? ML_EPROTO : 1;
}

/* The manifest a hospital system reads first: the case, the study and every
 * object with its name in the folder and its digest. */
static char *s_manifest(ml_aimg_t *img, const ml_img_in_t *t, const s_objs_t *objs)
{
    ml_envelope_t *e = NULL;
    char ts[32];
    json_t *m = json_object();
    json_t *arr = json_array();
    if (!m || !arr)
        goto fail;
    ml_astore_inbox_get(img->store, t->consult_id, s_inbox_env_cb, &e);
    const Medlink__V1__ImagingConsult *c = e && e->imaging_consult ? e->imaging_consult : NULL;
    json_object_set_new(m, "caseId", json_string(t->case_id));
    json_object_set_new(m, "consultMessageId", json_string(t->consult_id));
    json_object_set_new(m, "requestingNode", json_string(t->sender));
    json_object_set_new(m, "priority", json_string(ml_priority_name(t->priority)));
    json_object_set_new(m, "studyInstanceUid", json_string(t->study_uid));
    if (c) {
        json_object_set_new(m, "modality", json_string(c->modality ? c->modality : ""));
        json_object_set_new(m, "bodyPart", json_string(c->body_part ? c->body_part : ""));
        json_object_set_new(m, "clinicalQuestion",
                            json_string(c->clinical_question ? c->clinical_question : ""));
        if (c->study_description && *c->study_description)
            json_object_set_new(m, "studyDescription", json_string(c->study_description));
        if (c->accession_number && *c->accession_number)
            json_object_set_new(m, "accessionNumber", json_string(c->accession_number));
        json_t *p = s_message_json(c->patient ? &c->patient->base : NULL);
        if (p)
            json_object_set_new(m, "patient", p);
        json_t *d = s_message_json(c->requesting_doctor ? &c->requesting_doctor->base : NULL);
        if (d)
            json_object_set_new(m, "requestingDoctor", d);
    }
    json_object_set_new(m, "receivedAt", json_string(ml_time_format(ml_now_ms(), ts, sizeof ts)));
    json_object_set_new(m, "totalBytes", json_integer((json_int_t)t->total_bytes));
    for (size_t i = 0; i < objs->n; i++) {
        const ml_img_obj_t *o = &objs->v[i];
        json_t *jo = json_object();
        if (!jo)
            goto fail;
        json_object_set_new(jo, "index", json_integer(o->idx));
        json_object_set_new(jo, "fileName", json_string(o->file_name));
        json_object_set_new(jo, "sopInstanceUid", json_string(o->sop_uid));
        json_object_set_new(jo, "seriesInstanceUid", json_string(o->series_uid));
        json_object_set_new(jo, "size", json_integer((json_int_t)o->size));
        json_object_set_new(jo, "sha256", json_string(o->sha256));
        json_object_set_new(jo, "receivedAt",
                            json_string(ml_time_format(o->verified_at, ts, sizeof ts)));
        json_array_append_new(arr, jo);
    }
    json_object_set_new(m, "objects", arr);
    arr = NULL;
    char *text = json_dumps(m, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    json_decref(m);
    ml_env_free(&e);
    return text;
fail:
    json_decref(arr);
    json_decref(m);
    ml_env_free(&e);
    return NULL;
}

/* Builds inbox/study-<case>/ under a hidden name and renames it into place.
 * An existing final folder means an earlier run got this far. inbox/ is
 * writable by the hospital system, so everything happens relative to the
 * spool's held inbox/ fd and to an fd of the folder just made (mkdirat,
 * then opened with O_NOFOLLOW and checked to be ours): a link planted at
 * the hidden name is removed, never followed. Returns 0 or ML_EIO. */
static int s_publish(ml_aimg_t *img, const ml_img_in_t *t, const s_objs_t *objs, char *folder,
                     size_t flen)
{
    char cd[160], tmp[S_PATH], incoming[S_PATH];
    char *manifest = NULL;
    int rc = ML_EIO, tfd = -1, pfd = -1, made = 0;
    struct stat st;
    s_case_dir(t->case_id, cd);
    snprintf(folder, flen, "study-%s", cd);
    int ifd = ml_spool_folder_fd(img->spool, "inbox");
    if (ifd < 0 || s_fmt(tmp, sizeof tmp, ".%s.tmp", folder) < 0 ||
        s_incoming_dir(img, t->case_id, incoming, sizeof incoming) < 0)
        return ML_EIO;
    if (fstatat(ifd, folder, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode))
        return 0;
    ml_rmtree_at(ifd, tmp);
    if (mkdirat(ifd, tmp, 0750) != 0) {
        ml_log(ML_LOG_ERROR, S_LOG, "case %s: cannot create inbox/%s: %s", t->case_id, tmp,
               strerror(errno));
        return ML_EIO;
    }
    made = 1;
    if ((tfd = ml_dir_open(ifd, tmp)) < 0 || fstat(tfd, &st) != 0 || st.st_uid != geteuid()) {
        ml_log(ML_LOG_ERROR, S_LOG,
               "case %s: inbox/%s was replaced while the study was being placed in it; will retry",
               t->case_id, tmp);
        goto out;
    }
    if ((pfd = ml_dir_open(AT_FDCWD, incoming)) < 0) {
        ml_log(ML_LOG_ERROR, S_LOG, "case %s: cannot open %s: %s", t->case_id, incoming,
               strerror(errno));
        goto out;
    }
    for (size_t i = 0; i < objs->n; i++) {
        char part[32];
        const ml_img_obj_t *o = &objs->v[i];
        snprintf(part, sizeof part, "%u.part", o->idx);
        /* A hard link shares the fsync'd .part; another file system means
         * a copy. linkat without AT_SYMLINK_FOLLOW links the entry itself. */
        if (linkat(pfd, part, tfd, o->file_name, 0) != 0) {
            if ((errno != EXDEV && errno != EPERM && errno != ENOTSUP && errno != EMLINK) ||
                s_copy_file(pfd, part, tfd, o->file_name) < 0) {
                ml_log(ML_LOG_ERROR, S_LOG, "case %s: cannot place %s in inbox/%s: %s", t->case_id,
                       o->file_name, tmp, strerror(errno));
                goto out;
            }
        }
    }
    if (!(manifest = s_manifest(img, t, objs))) {
        ml_log(ML_LOG_ERROR, S_LOG, "case %s: cannot build the manifest", t->case_id);
        goto out;
    }
    size_t mlen = strlen(manifest);
    manifest[mlen++] = '\n'; /* json_dumps leaves room: it was NUL */
    if (ml_write_file_at(tfd, "manifest.json", manifest, mlen, 0640) < 0) {
        ml_log(ML_LOG_ERROR, S_LOG, "case %s: cannot write inbox/%s/manifest.json: %s", t->case_id,
               tmp, strerror(errno));
        goto out;
    }
    if (fsync(tfd) != 0)
        ml_log(ML_LOG_WARN, S_LOG, "fsync inbox/%s: %s", tmp, strerror(errno));
    if (renameat(ifd, tmp, ifd, folder) != 0) {
        ml_log(ML_LOG_ERROR, S_LOG, "case %s: cannot rename inbox/%s to inbox/%s: %s", t->case_id,
               tmp, folder, strerror(errno));
        goto out;
    }
    if (fsync(ifd) != 0)
        ml_log(ML_LOG_WARN, S_LOG, "fsync inbox/: %s", strerror(errno));
    rc = 0;
out:
    free(manifest);
    if (tfd >= 0)
        close(tfd);
    if (pfd >= 0)
        close(pfd);
    if (rc < 0 && made)
        ml_rmtree_at(ifd, tmp);
    return rc;
}

/* Verifies the complete objects of a transfer and publishes it when all are
 * verified. Each step commits on its own, and each is repeated safely after
 * a crash. */
static int s_advance(ml_aimg_t *img, const char *case_id)
{
    ml_img_in_t t;
    s_objs_t objs = {0};
    int rc = ml_istore_in_get(img->is, case_id, &t);
    if (rc < 0 || t.state != ML_IMG_IN_RECEIVING)
        return rc == ML_ENOTFOUND ? 0 : rc;
    if ((rc = ml_istore_obj_walk(img->is, case_id, s_collect_obj_cb, &objs)) < 0)
        goto out;
    int all = objs.n == t.objects;
    for (size_t i = 0; i < objs.n; i++) {
        ml_img_obj_t *o = &objs.v[i];
        if (o->verified)
            continue;
        if (o->good < o->chunks) {
            all = 0;
            continue;
        }
        int ok = s_verify(img, &t, o);
        if ((rc = ml_astore_begin(img->store)) < 0)
            goto out;
        if (ok) {
            o->verified = 1;
            o->verified_at = ml_now_ms();
            rc = ml_istore_obj_set_verified(img->is, case_id, o->idx, o->verified_at);
            ml_log(ML_LOG_INFO, S_LOG,
                   "case %s: object %u (%s, %llu bytes) complete; SHA-256 verified", case_id,
                   o->idx, o->file_name, (unsigned long long)o->size);
        } else if (o->attempts + 1 >= S_MAX_ATTEMPTS) {
            char reason[512];
            snprintf(reason, sizeof reason,
                     "object %u (%s) failed its SHA-256 check %u times after reassembly", o->idx,
                     o->file_name, o->attempts + 1);
            rc = ml_istore_obj_reset(img->is, case_id, o->idx);
            if (rc >= 0)
                rc = s_reject_in(img, &t, reason);
            all = 0;
        } else {
            /* Every chunk was good on its own, yet the whole is not what
             * the consult declared: ask for all of it again. */
            ml_log(ML_LOG_ERROR, S_LOG,
                   "case %s: object %u (%s) does not match its SHA-256 after reassembly; asking "
                   "for all %u chunk(s) again",
                   case_id, o->idx, o->file_name, o->chunks);
            rc = ml_istore_obj_reset(img->is, case_id, o->idx);
            uint32_t *idx = rc >= 0 ? malloc(o->chunks * sizeof *idx) : NULL;
            if (rc >= 0 && !idx)
                rc = ML_ENOMEM;
            for (uint32_t k = 0; idx && k < o->chunks; k++)
                idx[k] = k;
            if (rc >= 0)
                rc = s_queue_resend(img, &t, o->idx, idx, o->chunks,
                                    "object SHA-256 check failed after reassembly");
            free(idx);
            all = 0;
        }
        if (rc < 0 || (rc = ml_astore_commit(img->store)) < 0) {
            ml_astore_rollback(img->store);
            goto out;
        }
    }
    if (!all)
        goto out;
    char folder[200];
    uint64_t bytes = 0;
    for (size_t i = 0; i < objs.n; i++)
        bytes += objs.v[i].size;
    if (s_publish(img, &t, &objs, folder, sizeof folder) < 0) {
        img->retry = 1;
        rc = 0;
        goto out;
    }
    if ((rc = ml_astore_begin(img->store)) < 0)
        goto out;
    Medlink__V1__ImagingUpdate u = MEDLINK__V1__IMAGING_UPDATE__INIT;
    u.status = ST_(STUDY_RECEIVED);
    u.objects_received = (uint32_t)objs.n;
    u.bytes_received = bytes;
    if ((rc = ml_istore_in_set_state(img->is, case_id, ML_IMG_IN_PUBLISHED, NULL, folder,
                                     ml_now_ms())) < 0 ||
        (rc = s_queue_update(img, case_id, t.sender, t.priority, &u, "IMAGING_STUDY_RECEIVED")) <
            0 ||
        (rc = ml_astore_commit(img->store)) < 0) {
        ml_astore_rollback(img->store);
        goto out;
    }
    ml_log(ML_LOG_INFO, S_LOG,
           "case %s: study %s from %s published as inbox/%s/ (%zu object(s), %llu bytes)", case_id,
           t.study_uid, t.sender, folder, objs.n, (unsigned long long)bytes);
    char dir[S_PATH];
    if (s_incoming_dir(img, case_id, dir, sizeof dir) == 0)
        s_remove_dir(dir, "incoming files");
out:
    free(objs.v);
    if (rc < 0)
        ml_log(ML_LOG_ERROR, S_LOG, "case %s: cannot record the transfer: %s; retried later",
               case_id, ml_astore_errmsg(img->store));
    if (rc < 0)
        img->retry = 1;
    return rc;
}

static void s_batch_reset(ml_aimg_t *img)
{
    s_close_parts(img, 0);
    img->touched.n = 0;
    img->bad.n = 0;
    img->drop_out.n = 0;
    img->drop_in.n = 0;
}

int ml_aimg_receive(ml_aimg_t *img, ml_spool_msg_t *msgs, size_t n, ml_spool_msg_t *chunks,
                    size_t nc)
{
    int rc;
    if (n + nc == 0)
        return 0;
    for (size_t i = 0; i < nc; i++)
        chunks[i].ack = 0;
    if ((rc = ml_astore_begin(img->store)) < 0)
        goto failed;
    if ((rc = ml_spool_receive_tx(img->spool, msgs, n)) < 0)
        goto rollback;
    /* Messages first: a consult opens its transfer before chunks that came
     * in the same batch. Only new messages act; duplicates acted already. */
    for (size_t i = 0; i < n; i++)
        if (msgs[i].inserted && (rc = s_on_message(img, &msgs[i])) < 0)
            goto rollback;
    for (size_t i = 0; i < nc; i++) {
        ml_envelope_t *e = NULL;
        if (ml_env_unpack(chunks[i].envelope, chunks[i].envelope_len, &e) < 0) {
            ml_log(ML_LOG_WARN, S_LOG, "dropped chunk %s: cannot parse it", chunks[i].id);
            chunks[i].ack = 1;
            continue;
        }
        rc = s_handle_chunk(img, &chunks[i], e, &chunks[i].ack);
        ml_env_free(&e);
        if (rc < 0)
            goto rollback;
    }
    if ((rc = s_flush_bad(img)) < 0)
        goto rollback;
    /* The chunk data are on disk before their records commit. */
    if ((rc = s_close_parts(img, 1)) < 0)
        goto rollback;
    if ((rc = ml_astore_commit(img->store)) < 0)
        goto failed;
    ml_spool_receive_done(img->spool, msgs, n);
    s_drop_files(img);
    for (size_t i = 0; i < img->touched.n; i++) {
        s_touch_t *t = s_vec_at(&img->touched, i);
        /* Once per case is enough: s_advance looks at every object. */
        int seen = 0;
        for (size_t j = 0; j < i; j++)
            if (strcmp(((s_touch_t *)s_vec_at(&img->touched, j))->case_id, t->case_id) == 0)
                seen = 1;
        if (!seen)
            s_advance(img, t->case_id);
    }
    s_drop_files(img);
    img->touched.n = 0;
    if (img->queued && img->wake) {
        img->queued = 0;
        img->wake(img->arg);
    }
    return 0;
rollback:
    ml_astore_rollback(img->store);
failed:
    ml_log(ML_LOG_ERROR, S_LOG, "cannot store %zu delivered message(s) and %zu chunk(s): %s", n, nc,
           ml_astore_errmsg(img->store));
    s_batch_reset(img);
    img->queued = 0;
    for (size_t i = 0; i < nc; i++)
        chunks[i].ack = 0;
    return ML_ESTORE;
}

/* hooks.queued: a cancellation this clinic sent ends its case; a rejection
 * this reading centre sent ends its transfer. */
static void s_queued_cb(void *arg, const char *id, const uint8_t *blob, size_t len)
{
    ml_aimg_t *img = arg;
    ml_envelope_t *e = NULL;
    if (ml_env_unpack(blob, len, &e) < 0)
        return;
    if (e->payload_case != P_(IMAGING_UPDATE) ||
        ((int)e->imaging_update->status != ST_(CANCELLED) &&
         (int)e->imaging_update->status != ST_(REJECTED))) {
        ml_env_free(&e);
        return;
    }
    int cancel = (int)e->imaging_update->status == ST_(CANCELLED);
    ml_img_in_t t;
    int rc = ml_astore_begin(img->store);
    if (rc == 0 && cancel)
        rc = s_close_out(img, e->case_id, "cancelled by this clinic");
    if (rc >= 0 && !cancel && ml_istore_in_get(img->is, e->case_id, &t) == 0 &&
        t.state == ML_IMG_IN_RECEIVING) {
        rc = ml_istore_in_set_state(img->is, t.case_id, ML_IMG_IN_REJECTED,
                                    e->imaging_update->reason, NULL, ml_now_ms());
        if (rc >= 0)
            rc = s_case_push(&img->drop_in, t.case_id);
        ml_log(ML_LOG_INFO, S_LOG, "case %s: transfer ended: rejected by this reading centre",
               t.case_id);
    }
    if (rc >= 0)
        rc = ml_astore_commit(img->store);
    else
        ml_astore_rollback(img->store);
    if (rc < 0) {
        ml_log(ML_LOG_ERROR, S_LOG, "case %s: cannot record the end of the case: %s", e->case_id,
               ml_astore_errmsg(img->store));
        img->drop_out.n = img->drop_in.n = 0;
    } else {
        s_drop_files(img);
    }
    ml_env_free(&e);
}

/* ---- recovery and lifecycle --------------------------------------------- */

typedef struct {
    ml_aimg_t *img;
    s_vec_t cases; /* char[129] */
} s_walk_ctx_t;

static int s_out_collect_cb(const ml_img_out_t *o, void *arg)
{
    s_walk_ctx_t *c = arg;
    return s_case_push(&c->cases, o->case_id);
}

static int s_in_collect_cb(const ml_img_in_t *t, void *arg)
{
    s_walk_ctx_t *c = arg;
    return s_case_push(&c->cases, t->case_id);
}

/* Deletes folders under data_dir/sub whose case is not in keep (by folder
 * name). */
static void s_gc(ml_aimg_t *img, const char *sub, const s_vec_t *keep)
{
    char dir[S_PATH];
    if (s_join(dir, sizeof dir, img->data_dir, sub) < 0)
        return;
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        int wanted = 0;
        for (size_t i = 0; i < keep->n && !wanted; i++) {
            char cd[160];
            s_case_dir(s_vec_at(keep, i), cd);
            wanted = strcmp(cd, de->d_name) == 0;
        }
        if (wanted)
            continue;
        char p[S_PATH];
        if (s_join(p, sizeof p, dir, de->d_name) == 0) {
            ml_log(ML_LOG_INFO, S_LOG, "deleting %s (no open case uses it)", p);
            s_remove_dir(p, "leftover");
        }
    }
    closedir(d);
}

static int s_refused_consult_cb(const ml_img_out_t *o, void *arg)
{
    s_walk_ctx_t *c = arg;
    int state = -1;
    if (ml_astore_outbox_get(c->img->store, o->consult_id, s_state_cb, &state) == 1 &&
        state == ML_OUTBOX_REJECTED)
        return s_case_push(&c->cases, o->case_id);
    return 0;
}

int ml_aimg_recover(ml_aimg_t *img)
{
    int rc;
    s_walk_ctx_t c = {img, {NULL, 0, 0, 129}};

    /* Cases whose consult was refused before their end was recorded. */
    if ((rc = ml_istore_out_walk(img->is, ML_IMG_OUT_ACTIVE, s_refused_consult_cb, &c)) < 0)
        goto out;
    if (c.cases.n > 0 && (rc = ml_astore_begin(img->store)) == 0) {
        for (size_t i = 0; i < c.cases.n && rc >= 0; i++)
            rc = s_close_out(img, s_vec_at(&c.cases, i), "the consult was refused");
        if (rc >= 0)
            rc = ml_astore_commit(img->store);
        else
            ml_astore_rollback(img->store);
        if (rc < 0)
            goto out;
        img->drop_out.n = 0; /* the GC below deletes their folders */
    }
    /* Blob copies: only active cases keep them. */
    c.cases.n = 0;
    if ((rc = ml_istore_out_walk(img->is, ML_IMG_OUT_ACTIVE, s_out_collect_cb, &c)) < 0)
        goto out;
    s_gc(img, "blobs", &c.cases);
    /* Incoming files: only transfers still receiving keep them. */
    c.cases.n = 0;
    if ((rc = ml_istore_in_walk(img->is, ML_IMG_IN_RECEIVING, s_in_collect_cb, &c)) < 0)
        goto out;
    s_gc(img, "incoming", &c.cases);
    /* Half-built study folders (hidden names) are built again. */
    int ifd = ml_spool_folder_fd(img->spool, "inbox");
    int lfd = ifd >= 0 ? openat(ifd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;
    if (lfd >= 0) {
        DIR *d = fdopendir(lfd);
        if (!d)
            close(lfd);
        struct dirent *de;
        while (d && (de = readdir(d)) != NULL) {
            size_t n = strlen(de->d_name);
            if (strncmp(de->d_name, ".study-", 7) == 0 && n > 4 &&
                strcmp(de->d_name + n - 4, ".tmp") == 0) {
                if (ml_rmtree_at(ifd, de->d_name) < 0)
                    ml_log(ML_LOG_WARN, S_LOG, "cannot delete half-built study folder inbox/%s: %s",
                           de->d_name, strerror(errno));
            }
        }
        if (d)
            closedir(d);
    }
    /* Verify and publish what a crash interrupted. */
    for (size_t i = 0; i < c.cases.n; i++)
        s_advance(img, s_vec_at(&c.cases, i));
    s_drop_files(img);
    rc = 0;
out:
    s_vec_free(&c.cases);
    if (rc < 0)
        ml_log(ML_LOG_ERROR, S_LOG, "cannot recover imaging transfers: %s",
               ml_astore_errmsg(img->store));
    if (img->queued && img->wake) {
        img->queued = 0;
        img->wake(img->arg);
    }
    return rc < 0 ? ML_ESTORE : 0;
}

/* Transfers still receiving whose consult arrived before cutoff. */
typedef struct {
    int64_t cutoff;
    s_vec_t cases; /* char[129] */
} s_expire_ctx_t;

static int s_expired_cb(const ml_img_in_t *t, void *arg)
{
    s_expire_ctx_t *x = arg;
    return t->opened_at <= x->cutoff ? s_case_push(&x->cases, t->case_id) : 0;
}

/* Ends one expired transfer inside the caller's transaction: its chunk
 * records go, the transfer is marked refused, and IMAGING_REJECTED with
 * incoming_expired goes back to the clinic, which the broker turns into a
 * dead letter and an escalation (F9). The .part files go after the commit
 * (drop_in). */
static int s_expire_one(ml_aimg_t *img, const char *case_id)
{
    ml_img_in_t t;
    int rc = ml_istore_in_get(img->is, case_id, &t);
    if (rc < 0 || t.state != ML_IMG_IN_RECEIVING)
        return rc == ML_ENOTFOUND ? 0 : rc;
    char reason[512];
    snprintf(reason, sizeof reason,
             "the study did not arrive whole within %lld s (incoming_expire_s); its partial files "
             "are deleted",
             (long long)(img->incoming_expire_ms / 1000));
    if ((rc = ml_istore_in_forget_chunks(img->is, case_id)) < 0 ||
        (rc = ml_istore_in_set_state(img->is, case_id, ML_IMG_IN_REJECTED, reason, NULL,
                                     ml_now_ms())) < 0)
        return rc;
    Medlink__V1__ImagingUpdate u = MEDLINK__V1__IMAGING_UPDATE__INIT;
    u.status = ST_(REJECTED);
    u.reason = reason;
    u.incoming_expired = 1;
    if ((rc = s_queue_update(img, case_id, t.sender, t.priority, &u, "IMAGING_REJECTED")) < 0)
        return rc;
    ml_log(ML_LOG_WARN, S_LOG, "case %s: incoming study %s from %s expired: %s", case_id,
           t.study_uid, t.sender, reason);
    return s_case_push(&img->drop_in, case_id);
}

/* Looks for expired incoming studies at most every S_EXPIRE_CHECK_MS;
 * O(transfers receiving) per look. Each is ended in a transaction of its
 * own, so that one failure does not keep the others. */
static void s_expire_incoming(ml_aimg_t *img)
{
    int64_t mono = ml_mono_ms();
    if (mono < img->expire_check_at)
        return;
    img->expire_check_at = mono + S_EXPIRE_CHECK_MS;
    s_expire_ctx_t x = {ml_now_ms() - img->incoming_expire_ms, {NULL, 0, 0, 129}};
    if (ml_istore_in_walk(img->is, ML_IMG_IN_RECEIVING, s_expired_cb, &x) < 0) {
        s_vec_free(&x.cases);
        return;
    }
    for (size_t i = 0; i < x.cases.n; i++) {
        const char *case_id = s_vec_at(&x.cases, i);
        if (ml_astore_begin(img->store) != 0)
            break;
        int rc = s_expire_one(img, case_id);
        if (rc < 0 || ml_astore_commit(img->store) != 0) {
            ml_astore_rollback(img->store);
            img->drop_in.n = 0;
            ml_log(ML_LOG_ERROR, S_LOG, "case %s: cannot expire the incoming study: %s", case_id,
                   rc < 0 ? ml_strerror(rc) : ml_astore_errmsg(img->store));
            continue;
        }
        s_drop_files(img);
    }
    s_vec_free(&x.cases);
}

void ml_aimg_tick(ml_aimg_t *img)
{
    if (!img)
        return;
    s_expire_incoming(img);
    if (img->queued && img->wake && !img->retry) {
        img->queued = 0;
        img->wake(img->arg);
    }
    if (!img->retry || ml_mono_ms() < img->retry_at)
        return;
    img->retry = 0;
    img->retry_at = ml_mono_ms() + S_RETRY_MS;
    s_walk_ctx_t c = {img, {NULL, 0, 0, 129}};
    if (ml_istore_in_walk(img->is, ML_IMG_IN_RECEIVING, s_in_collect_cb, &c) == 0)
        for (size_t i = 0; i < c.cases.n; i++)
            s_advance(img, s_vec_at(&c.cases, i));
    s_vec_free(&c.cases);
    s_drop_files(img);
    if (img->queued && img->wake) {
        img->queued = 0;
        img->wake(img->arg);
    }
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
    s_job_t *job;
    while ((job = s_pop(img)) != NULL) {
        ml_spool_staged_retry(img->spool, job->name);
        s_job_free(job);
    }
}

int ml_aimg_new(const ml_aimg_config_t *cfg, ml_aimg_t **out, char *err, size_t errlen)
{
    int rc = ML_ENOMEM;
    ml_aimg_t *img = calloc(1, sizeof *img);
    if (!img)
        goto nomem;
    img->data_dir = strdup(cfg->data_dir);
    img->spool_dir = strdup(ml_spool_dir(cfg->spool));
    img->node_id = strdup(cfg->node_id);
    if (!img->data_dir || !img->spool_dir || !img->node_id)
        goto nomem;
    img->chunk_size = cfg->chunk_size ? cfg->chunk_size : ML_IMAGING_CHUNK_DEFAULT;
    img->max_record = cfg->max_record;
    img->store = cfg->store;
    img->spool = cfg->spool;
    img->loop = cfg->loop;
    img->wake = cfg->wake;
    img->arg = cfg->arg;
    atomic_init(&img->cancel, 0);
    img->progs.size = sizeof(s_prog_t);
    img->resends.size = sizeof(s_resend_t);
    img->resend_window_ms =
        1000LL * (cfg->resend_window_s ? cfg->resend_window_s : S_RESEND_WINDOW_S);
    img->incoming_expire_ms =
        1000LL * (cfg->incoming_expire_s ? cfg->incoming_expire_s : S_INCOMING_EXPIRE_S);
    img->touched.size = sizeof(s_touch_t);
    img->parts.size = sizeof(s_part_t);
    img->bad.size = sizeof(s_bad_t);
    img->drop_out.size = img->drop_in.size = 129;
    if ((rc = ml_istore_open(cfg->store, &img->is, err, errlen)) < 0)
        goto out;
    ml_spool_hooks_t hooks = {s_consult_cb, s_queued_cb, img};
    ml_spool_set_hooks(cfg->spool, &hooks);
    *out = img;
    return 0;
nomem:
    ml_seterr(err, errlen, "out of memory");
    rc = ML_ENOMEM;
out:
    ml_aimg_destroy(&img);
    return rc;
}

void ml_aimg_destroy(ml_aimg_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    ml_aimg_t *img = *self_p;
    if (img->running) {
        /* Its after-work callback would use freed memory. */
        ml_log(ML_LOG_ERROR, S_LOG, "ml_aimg_destroy while staging runs");
        abort();
    }
    s_job_t *job;
    while ((job = s_pop(img)) != NULL)
        s_job_free(job);
    if (img->spool)
        ml_spool_set_hooks(img->spool, NULL);
    s_batch_reset(img);
    for (size_t i = 0; i < img->progs.n; i++)
        s_prog_clear(s_vec_at(&img->progs, i));
    s_vec_free(&img->progs);
    s_vec_free(&img->resends);
    s_vec_free(&img->touched);
    s_vec_free(&img->parts);
    s_vec_free(&img->bad);
    s_vec_free(&img->drop_out);
    s_vec_free(&img->drop_in);
    ml_istore_destroy(&img->is);
    free(img->data_dir);
    free(img->spool_dir);
    free(img->node_id);
    free(img);
    *self_p = NULL;
}
