/* An imaging consult and its chunks (see study.h). The chunks are
 * envelopes of their own in the consult's case, to the same service, with
 * the consult's priority and deadline: the broker stores, acknowledges and
 * delivers each like any other message, which is what lets a transfer
 * resume after a dropped link. */
#include "study.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "build.h"
#include "ml_common.h"
#include "ml_frame.h"
#include "ml_imaging.h"

#define S_MAX_DEPTH 16

/* The file of an object is opened again for every read (a study may have
 * more files than the process may hold open), and each open must find the
 * very file that was hashed: same device and inode, a regular file, and for
 * a file found under --dicom-dir no symbolic link. A file swapped for
 * another (or for a link to one) between the checks is refused, never sent
 * (a local user of the folder, docs/security.md). */
typedef struct {
    dev_t dev;
    ino_t ino;
    int known;    /* dev and ino are set */
    int nofollow; /* found by the walk: a link there is refused */
} s_ident_t;

struct ctl_study {
    ml_envelope_t *consult;
    char **paths; /* one per object, same order */
    s_ident_t *ids;
    size_t n_paths;
    uint64_t chunks, bytes;
    size_t max_message;
    int consult_given;
    size_t obj;     /* next chunk: object index */
    uint32_t chunk; /* and chunk index within it */
    ml_envelope_t *cur;
    const char *node;
};

static void s_push(char ***v, size_t *n, char *s)
{
    char **nv = realloc(*v, (*n + 1) * sizeof *nv);
    if (!nv || !s)
        ctl_oom();
    nv[(*n)++] = s;
    *v = nv;
}

static int s_cmp_path(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Opens the file of an object for reading, checked as s_ident_t says (and
 * recorded there the first time). Returns the fd, or -1 after saying why. */
static int s_open_object(const char *path, s_ident_t *id)
{
    int fd =
        open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK | (id->nofollow ? O_NOFOLLOW : 0));
    if (fd < 0) {
        ctl_fail(CTL_EXIT_FAIL, "cannot read %s: %s", path,
                 errno == ELOOP ? "it is a symbolic link (--dicom-dir takes regular files only)"
                                : strerror(errno));
        return -1;
    }
    struct stat st;
    const char *why = NULL;
    if (fstat(fd, &st) != 0)
        why = strerror(errno);
    else if (!S_ISREG(st.st_mode))
        why = "not a regular file";
    else if (id->known && (st.st_dev != id->dev || st.st_ino != id->ino))
        why = "it was replaced by another file after it was listed or hashed";
    if (why) {
        close(fd);
        ctl_fail(CTL_EXIT_FAIL, "cannot read %s: %s", path, why);
        return -1;
    }
    id->dev = st.st_dev;
    id->ino = st.st_ino;
    id->known = 1;
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        (void)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    return fd;
}

/* Every regular file under dir, depth first; hidden names and DICOMDIR
 * (the media index, not an image) are skipped, other non-regular entries
 * too; a symbolic link is refused (name a linked image with --dicom). */
static int s_walk(const char *dir, int depth, char ***v, size_t *n)
{
    if (depth > S_MAX_DEPTH)
        return ctl_fail(CTL_EXIT_FAIL, "%s: folders nested deeper than %d", dir, S_MAX_DEPTH);
    DIR *d = opendir(dir);
    if (!d)
        return ctl_fail(CTL_EXIT_FAIL, "cannot open %s: %s", dir, strerror(errno));
    int rc = CTL_EXIT_OK;
    struct dirent *de;
    while (rc == CTL_EXIT_OK && (de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.' || strcasecmp(de->d_name, "DICOMDIR") == 0)
            continue;
        size_t len = strlen(dir) + strlen(de->d_name) + 2;
        char *path = malloc(len);
        if (!path)
            ctl_oom();
        snprintf(path, len, "%s/%s", dir, de->d_name);
        struct stat st;
        if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
            rc = ctl_fail(CTL_EXIT_FAIL, "cannot stat %s: %s", path, strerror(errno));
            free(path);
        } else if (S_ISLNK(st.st_mode)) {
            rc = ctl_fail(CTL_EXIT_FAIL,
                          "%s is a symbolic link: --dicom-dir takes the regular files under it "
                          "(name a linked image with --dicom)",
                          path);
            free(path);
        } else if (S_ISDIR(st.st_mode)) {
            rc = s_walk(path, depth + 1, v, n);
            free(path);
        } else if (S_ISREG(st.st_mode)) {
            s_push(v, n, path);
        } else {
            free(path);
        }
    }
    closedir(d);
    return rc;
}

static int s_add_object(ctl_study_t *s, const char *path, s_ident_t *id, uint32_t chunk_size,
                        int from_dir)
{
    Medlink__V1__ImagingConsult *c = s->consult->imaging_consult;
    Medlink__V1__DicomObject *obj = NULL;
    ml_dicom_info_t info;
    char err[512] = "";
    id->nofollow = from_dir;
    int fd = s_open_object(path, id);
    if (fd < 0)
        return CTL_EXIT_FAIL;
    int rc = ml_imaging_object_from_fd(fd, path, chunk_size, &obj, &info, err, sizeof err);
    int saved = errno;
    close(fd);
    errno = saved;
    if (rc == ML_EIO)
        return ctl_fail(CTL_EXIT_FAIL, "cannot read %s: %s", path, strerror(errno));
    if (rc < 0)
        return ctl_fail(CTL_EXIT_FAIL, "%s: %s%s", path, *err ? err : ml_strerror(rc),
                        from_dir ? " (--dicom-dir takes every file under it: move other files "
                                   "away, or name the images with --dicom)"
                                 : "");
    Medlink__V1__DicomObject **nv = realloc(c->object, (c->n_object + 1) * sizeof *nv);
    if (!nv)
        ctl_oom();
    c->object = nv;
    c->object[c->n_object++] = obj;

    /* One consult is one study: its objects must agree on the study. */
    if (*info.study_instance_uid) {
        if (!*c->study_instance_uid)
            ctl_set(&c->study_instance_uid, info.study_instance_uid);
        else if (strcmp(c->study_instance_uid, info.study_instance_uid) != 0)
            return ctl_fail(CTL_EXIT_FAIL,
                            "%s belongs to study %s, not %s: one consult carries one study", path,
                            info.study_instance_uid, c->study_instance_uid);
    }
    if (!*c->modality && *info.modality)
        ctl_set(&c->modality, info.modality);
    for (size_t i = 0; i + 1 < c->n_object; i++)
        if (*obj->sop_instance_uid &&
            strcmp(c->object[i]->sop_instance_uid, obj->sop_instance_uid) == 0)
            return ctl_fail(CTL_EXIT_FAIL, "%s and %s are the same object (SOP Instance UID %s)",
                            s->paths[i], path, obj->sop_instance_uid);
    s->chunks += obj->chunks;
    s->bytes += obj->size;
    return CTL_EXIT_OK;
}

/* Every message must fit in one record (ML_FRAME_DEFAULT_MAX, the channel's
 * and the broker's default limit): measured on the consult and on a chunk
 * of the largest size with the widest indices, so that a study that cannot
 * go is refused before its consult opens a case. */
static int s_check_sizes(ctl_study_t *s)
{
    const ml_envelope_t *c = s->consult;
    const Medlink__V1__ImagingConsult *ic = c->imaging_consult;
    uint64_t largest = 0;
    uint32_t most_chunks = 0;
    for (size_t i = 0; i < ic->n_object; i++) {
        uint64_t sz = ic->object[i]->size;
        if (sz > largest)
            largest = sz;
        if (ic->object[i]->chunks > most_chunks)
            most_chunks = ic->object[i]->chunks;
    }
    ml_envelope_t e = *c; /* the consult's id, case, from, to: same lengths */
    Medlink__V1__ImagingChunk ch = MEDLINK__V1__IMAGING_CHUNK__INIT;
    char sha[ML_SHA256_HEX + 1];
    memset(sha, 'f', ML_SHA256_HEX);
    sha[ML_SHA256_HEX] = '\0';
    ch.study_instance_uid = ic->study_instance_uid;
    ch.object_index = (uint32_t)(ic->n_object - 1);
    ch.chunk_index = most_chunks ? most_chunks - 1 : 0;
    ch.offset = largest;
    ch.sha256 = sha;
    /* get_packed_size reads only the length of bytes fields. */
    ch.data.len = largest < ic->chunk_size ? (size_t)largest : ic->chunk_size;
    e.kind = MEDLINK__V1__KIND__KIND_IMAGING_CHUNK;
    e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CHUNK;
    e.imaging_chunk = &ch;
    size_t chunk_msg = medlink__v1__envelope__get_packed_size(&e);
    size_t consult_msg = medlink__v1__envelope__get_packed_size(c);
    if (consult_msg > ML_FRAME_DEFAULT_MAX)
        return ctl_fail(CTL_EXIT_USAGE,
                        "the consult lists %zu objects and is %zu bytes, over the %u-byte record "
                        "limit: send the study as several consults",
                        ic->n_object, consult_msg, ML_FRAME_DEFAULT_MAX);
    if (chunk_msg > ML_FRAME_DEFAULT_MAX)
        return ctl_fail(CTL_EXIT_USAGE,
                        "chunk size %u makes chunk messages of %zu bytes, over the %u-byte record "
                        "limit: use --chunk-size %zu or less",
                        ic->chunk_size, chunk_msg, ML_FRAME_DEFAULT_MAX,
                        (size_t)ic->chunk_size - (chunk_msg - ML_FRAME_DEFAULT_MAX));
    s->max_message = chunk_msg > consult_msg ? chunk_msg : consult_msg;
    return CTL_EXIT_OK;
}

int ctl_study_new(const ctl_opts_t *o, ctl_study_t **out)
{
    ctl_study_t *s = calloc(1, sizeof *s);
    char **files = NULL;
    size_t n_files = 0;
    if (!s)
        ctl_oom();
    s->node = o->node;
    int rc = ctl_build_message(o, &s->consult);
    if (rc != CTL_EXIT_OK)
        goto out;
    Medlink__V1__ImagingConsult *c = s->consult->imaging_consult;
    if (c->n_object > 0) {
        rc = ctl_fail(CTL_EXIT_USAGE,
                      "%s lists objects already; medlinkctl builds the list from the DICOM files",
                      o->file);
        goto out;
    }
    uint32_t chunk_size = c->chunk_size ? c->chunk_size : ML_IMAGING_CHUNK_DEFAULT;
    if (o->chunk_size) {
        char *end;
        unsigned long v = strtoul(o->chunk_size, &end, 10);
        /* Out of range or not a number: 0, refused just below. */
        chunk_size = *end || o->chunk_size[0] == '-' || v > ML_IMAGING_CHUNK_MAX ? 0 : (uint32_t)v;
    }
    if (chunk_size < ML_IMAGING_CHUNK_MIN || chunk_size > ML_IMAGING_CHUNK_MAX) {
        rc = ctl_fail(CTL_EXIT_USAGE, "chunk size %s: expected %u..%u bytes",
                      o->chunk_size ? o->chunk_size : "in the file", ML_IMAGING_CHUNK_MIN,
                      ML_IMAGING_CHUNK_MAX);
        goto out;
    }
    for (size_t i = 0; i < o->dicom.n; i++)
        s_push(&files, &n_files, strdup(o->dicom.v[i]));
    if (o->dicom_dir) {
        size_t first = n_files;
        if ((rc = s_walk(o->dicom_dir, 0, &files, &n_files)) != CTL_EXIT_OK)
            goto out;
        qsort(files + first, n_files - first, sizeof *files, s_cmp_path);
        if (n_files == first) {
            rc = ctl_fail(CTL_EXIT_FAIL, "%s holds no files", o->dicom_dir);
            goto out;
        }
    }
    if (n_files == 0) {
        rc = ctl_fail(CTL_EXIT_USAGE, "send imaging needs --dicom FILE... or --dicom-dir DIR");
        goto out;
    }
    s->paths = calloc(n_files, sizeof *s->paths);
    s->ids = calloc(n_files, sizeof *s->ids);
    if (!s->paths || !s->ids)
        ctl_oom();
    for (size_t i = 0; i < n_files; i++) {
        s->paths[s->n_paths++] = files[i];
        files[i] = NULL;
        if ((rc = s_add_object(s, s->paths[i], &s->ids[i], chunk_size, i >= o->dicom.n)) !=
            CTL_EXIT_OK)
            goto out;
    }
    c->chunk_size = chunk_size;
    c->total_bytes = s->bytes;
    if ((rc = ctl_build_finish(o, s->consult)) == CTL_EXIT_OK)
        rc = s_check_sizes(s);
out:
    for (size_t i = 0; i < n_files; i++)
        free(files[i]);
    free(files);
    if (rc != CTL_EXIT_OK)
        ctl_study_destroy(&s);
    *out = s;
    return rc;
}

void ctl_study_destroy(ctl_study_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    ctl_study_t *s = *self_p;
    for (size_t i = 0; i < s->n_paths; i++)
        free(s->paths[i]);
    free(s->paths);
    free(s->ids);
    ml_env_free(&s->consult);
    ml_env_free(&s->cur);
    free(s);
    *self_p = NULL;
}

const ml_envelope_t *ctl_study_consult(const ctl_study_t *s)
{
    return s->consult;
}

uint32_t ctl_study_objects(const ctl_study_t *s)
{
    return (uint32_t)s->consult->imaging_consult->n_object;
}

uint64_t ctl_study_chunks(const ctl_study_t *s)
{
    return s->chunks;
}

uint64_t ctl_study_bytes(const ctl_study_t *s)
{
    return s->bytes;
}

size_t ctl_study_max_message(const ctl_study_t *s)
{
    return s->max_message;
}

int ctl_study_next(ctl_study_t *s, ml_envelope_t **env)
{
    const ml_envelope_t *c = s->consult;
    const Medlink__V1__ImagingConsult *ic = c->imaging_consult;
    ml_env_free(&s->cur);
    if (!s->consult_given) {
        s->consult_given = 1;
        *env = s->consult;
        return 1;
    }
    if (s->obj >= ic->n_object)
        return 0;
    const Medlink__V1__DicomObject *obj = ic->object[s->obj];
    const char *path = s->paths[s->obj];
    uint8_t *data = NULL;
    size_t len = 0;
    char sha[ML_SHA256_HEX + 1], err[512];
    uint64_t offset = (uint64_t)s->chunk * ic->chunk_size;
    uint64_t expect = obj->size - offset < ic->chunk_size ? obj->size - offset : ic->chunk_size;
    int fd = s_open_object(path, &s->ids[s->obj]);
    if (fd < 0)
        return -CTL_EXIT_FAIL;
    int rc = ml_imaging_read_chunk_fd(fd, ic->chunk_size, s->chunk, &data, &len, sha);
    int saved = errno;
    close(fd);
    errno = saved;
    if (rc == ML_EIO)
        return -ctl_fail(CTL_EXIT_FAIL, "cannot read %s: %s", path, strerror(errno));
    if (rc < 0 || len != expect) {
        free(data);
        return -ctl_fail(CTL_EXIT_FAIL,
                         "%s changed after its SHA-256 was taken (chunk %u is %zu bytes, "
                         "expected %llu): send the study again",
                         path, s->chunk, rc < 0 ? (size_t)0 : len, (unsigned long long)expect);
    }
    ml_envelope_t *e = CTL_NEW(ml_envelope_t, medlink__v1__envelope__init);
    Medlink__V1__ImagingChunk *ch =
        CTL_NEW(Medlink__V1__ImagingChunk, medlink__v1__imaging_chunk__init);
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    ctl_set(&e->id, id);
    ctl_set(&e->case_id, c->case_id);
    ctl_set(&e->from, c->from);
    ctl_set(&e->to, c->to);
    e->priority = c->priority;
    e->deadline = c->deadline;
    e->created_at = ml_now_ms();
    e->kind = MEDLINK__V1__KIND__KIND_IMAGING_CHUNK;
    e->payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CHUNK;
    e->imaging_chunk = ch;
    ctl_set(&ch->study_instance_uid, ic->study_instance_uid);
    ch->object_index = (uint32_t)s->obj;
    ch->chunk_index = s->chunk;
    ch->offset = offset;
    ch->data.data = data;
    ch->data.len = len;
    ctl_set(&ch->sha256, sha);
    s->cur = e;
    if (++s->chunk >= obj->chunks) {
        s->obj++;
        s->chunk = 0;
    }
    if (ml_env_validate(e, err, sizeof err) < 0)
        return -ctl_fail(CTL_EXIT_FAIL, "chunk %u of %s is not valid: %s", ch->chunk_index, path,
                         err);
    *env = e;
    return 1;
}
