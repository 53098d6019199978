/* The receiving side of an imaging consult (reading centre), a plug-in of
 * the agent's receive batch (inbox.h): a delivered consult opens a
 * transfer; each delivered chunk is checked against its SHA-256, written
 * at its offset into data_dir/incoming/<case>/<index>.part and recorded
 * (fsync before the commit, commit before the Ack). A damaged chunk is
 * asked for again. A complete object is checked against its own SHA-256; a
 * complete study is published atomically as spool inbox/study-<case>/ with
 * a manifest.json, and IMAGING_STUDY_RECEIVED goes back to the clinic. A
 * transfer not complete within incoming_expire_s is ended and refused.
 * Updates, reports and resend requests about cases this node sent arrive
 * here too and are handed to the sender's side (img_send.c). */
#include "img_recv.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "img_int.h"
#include "ml_common.h"
#include "ml_fs.h"
#include "ml_imaging.h"
#include "ml_json.h"

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
        int rc = aimg__queue(img, &e, "IMAGING_RESEND");
        if (rc < 0)
            return rc;
    }
    return 0;
}

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
    if ((rc = aimg__queue_update(img, t->case_id, t->sender, t->priority, &u, "IMAGING_REJECTED")) <
        0)
        return rc;
    ml_log(ML_LOG_ERROR, S_LOG, "case %s: consult from %s refused: %s", t->case_id, t->sender,
           reason);
    return aimg__case_push(&img->drop_in, t->case_id);
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
        aimg_part_t *p = aimg__vec_at(&img->parts, i);
        if (p->idx == idx && strcmp(p->case_id, case_id) == 0)
            return p->fd;
    }
    char dir[S_PATH], path[S_PATH];
    if (aimg__incoming_dir(img, case_id, dir, sizeof dir) < 0 ||
        aimg__part_path(img, case_id, idx, path, sizeof path) < 0)
        return -1;
    if (ml_mkdirs(dir) < 0)
        return -1;
    int fd = open(path, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0640);
    if (fd < 0)
        return -1;
    aimg_part_t *p = aimg__vec_push(&img->parts);
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
        aimg_touch_t *t = aimg__vec_at(&img->touched, i);
        if (t->idx == idx && strcmp(t->case_id, case_id) == 0)
            return 0;
    }
    aimg_touch_t *t = aimg__vec_push(&img->touched);
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
        aimg_bad_t *b = aimg__vec_push(&img->bad);
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
    const aimg_bad_t *x = a, *y = b;
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
    qsort(img->bad.v, img->bad.n, sizeof(aimg_bad_t), s_cmp_bad);
    uint32_t *idx = malloc(img->bad.n * sizeof *idx);
    if (!idx)
        return ML_ENOMEM;
    int rc = 0;
    for (size_t i = 0; i < img->bad.n && rc == 0;) {
        aimg_bad_t *first = aimg__vec_at(&img->bad, i);
        size_t n = 0;
        size_t j = i;
        for (; j < img->bad.n; j++) {
            aimg_bad_t *b = aimg__vec_at(&img->bad, j);
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
        aimg_part_t *p = aimg__vec_at(&img->parts, i);
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
            aimg_part_t *p = aimg__vec_at(&img->parts, i);
            char dir[S_PATH];
            int seen = 0;
            for (size_t j = 0; j < i; j++)
                if (strcmp(((aimg_part_t *)aimg__vec_at(&img->parts, j))->case_id, p->case_id) == 0)
                    seen = 1;
            if (!seen && aimg__incoming_dir(img, p->case_id, dir, sizeof dir) == 0 &&
                ml_fs_fsync_dir(AT_FDCWD, dir) < 0 && errno != ENOENT && errno != ELOOP &&
                errno != ENOTDIR)
                ml_log(ML_LOG_WARN, S_LOG, "fsync %s: %s", dir, strerror(errno));
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
        rc = img_send__on_resend(img, e);
        break;
    case P_(IMAGING_REPORT):
        snprintf(why, sizeof why, "report received from %s", e->from);
        rc = aimg__close_out(img, e->case_id, why);
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
            rc = aimg__close_out(img, e->case_id, why);
            break;
        case ST_(REJECTED):
        case ST_(CANCELLED):
        case ST_(CLOSED):
            snprintf(why, sizeof why, "%s by %s%s%s", name, e->from,
                     u->reason && *u->reason ? ": " : "", u->reason ? u->reason : "");
            rc = aimg__close_out(img, e->case_id, why);
            if (rc >= 0 && (int)u->status == ST_(CANCELLED) &&
                ml_istore_in_get(img->is, e->case_id, &t) == 0 && t.state == ML_IMG_IN_RECEIVING) {
                rc = ml_istore_in_set_state(img->is, t.case_id, ML_IMG_IN_CANCELLED, why, NULL,
                                            ml_now_ms());
                if (rc >= 0)
                    rc = aimg__case_push(&img->drop_in, t.case_id);
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
    if (aimg__part_path(img, t->case_id, o->idx, path, sizeof path) < 0)
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
    aimg__case_dir(t->case_id, cd);
    snprintf(folder, flen, "study-%s", cd);
    int ifd = ml_spool_folder_fd(img->spool, "inbox");
    if (ifd < 0 || aimg__fmt(tmp, sizeof tmp, ".%s.tmp", folder) < 0 ||
        aimg__incoming_dir(img, t->case_id, incoming, sizeof incoming) < 0)
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
                ml_fs_copy_file(pfd, part, tfd, o->file_name) < 0) {
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
int img_recv__advance(ml_aimg_t *img, const char *case_id)
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
        (rc = aimg__queue_update(img, case_id, t.sender, t.priority, &u,
                                 "IMAGING_STUDY_RECEIVED")) < 0 ||
        (rc = ml_astore_commit(img->store)) < 0) {
        ml_astore_rollback(img->store);
        goto out;
    }
    ml_log(ML_LOG_INFO, S_LOG,
           "case %s: study %s from %s published as inbox/%s/ (%zu object(s), %llu bytes)", case_id,
           t.study_uid, t.sender, folder, objs.n, (unsigned long long)bytes);
    char dir[S_PATH];
    if (aimg__incoming_dir(img, case_id, dir, sizeof dir) == 0)
        aimg__remove_dir(dir, "incoming files");
out:
    free(objs.v);
    if (rc < 0)
        ml_log(ML_LOG_ERROR, S_LOG, "case %s: cannot record the transfer: %s; retried later",
               case_id, ml_astore_errmsg(img->store));
    if (rc < 0)
        img->retry = 1;
    return rc;
}

void img_recv__batch_reset(ml_aimg_t *img)
{
    s_close_parts(img, 0);
    img->touched.n = 0;
    img->bad.n = 0;
    img->drop_out.n = 0;
    img->drop_in.n = 0;
}

/* The plug-in's part of the inbox transaction: messages first, so that a
 * consult opens its transfer before chunks that came in the same batch
 * (only new messages act; duplicates acted already), then the chunks into
 * their .part files and records, the resend requests for damaged ones, and
 * the fsync of the chunk data, which are on disk before their records
 * commit. */
static int s_on_batch(void *arg, const ml_spool_msg_t *msgs, size_t n, ml_spool_msg_t *chunks,
                      size_t nc)
{
    ml_aimg_t *img = arg;
    int rc;
    for (size_t i = 0; i < n; i++)
        if (msgs[i].inserted && (rc = s_on_message(img, &msgs[i])) < 0)
            return rc;
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
            return rc;
    }
    if ((rc = s_flush_bad(img)) < 0)
        return rc;
    return s_close_parts(img, 1);
}

/* After the commit: files of ended cases go, touched transfers are
 * verified and published, the pump is woken for what was queued. */
static void s_on_commit(void *arg)
{
    ml_aimg_t *img = arg;
    aimg__drop_files(img);
    for (size_t i = 0; i < img->touched.n; i++) {
        aimg_touch_t *t = aimg__vec_at(&img->touched, i);
        /* Once per case is enough: img_recv__advance looks at every
         * object. */
        int seen = 0;
        for (size_t j = 0; j < i; j++)
            if (strcmp(((aimg_touch_t *)aimg__vec_at(&img->touched, j))->case_id, t->case_id) == 0)
                seen = 1;
        if (!seen)
            img_recv__advance(img, t->case_id);
    }
    aimg__drop_files(img);
    img->touched.n = 0;
    if (img->queued && img->wake) {
        img->queued = 0;
        img->wake(img->arg);
    }
}

/* After a rollback: nothing of the batch happened. */
static void s_on_abort(void *arg)
{
    ml_aimg_t *img = arg;
    img_recv__batch_reset(img);
    img->queued = 0;
}

void ml_aimg_inbox_plugin(ml_aimg_t *img, ml_inbox_plugin_t *p)
{
    memset(p, 0, sizeof *p);
    p->kind_mask = ML_INBOX_KIND(K_(IMAGING_CHUNK));
    p->on_batch = s_on_batch;
    p->on_commit = s_on_commit;
    p->on_abort = s_on_abort;
    p->arg = img;
}

/* Transfers still receiving whose consult arrived before cutoff. */
typedef struct {
    int64_t cutoff;
    aimg_vec_t cases; /* char[129] */
} s_expire_ctx_t;

static int s_expired_cb(const ml_img_in_t *t, void *arg)
{
    s_expire_ctx_t *x = arg;
    return t->opened_at <= x->cutoff ? aimg__case_push(&x->cases, t->case_id) : 0;
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
    if ((rc = aimg__queue_update(img, case_id, t.sender, t.priority, &u, "IMAGING_REJECTED")) < 0)
        return rc;
    ml_log(ML_LOG_WARN, S_LOG, "case %s: incoming study %s from %s expired: %s", case_id,
           t.study_uid, t.sender, reason);
    return aimg__case_push(&img->drop_in, case_id);
}

/* Looks for expired incoming studies at most every S_EXPIRE_CHECK_MS;
 * O(transfers receiving) per look. Each is ended in a transaction of its
 * own, so that one failure does not keep the others. */
void img_recv__expire(ml_aimg_t *img)
{
    int64_t mono = ml_mono_ms();
    if (mono < img->expire_check_at)
        return;
    img->expire_check_at = mono + S_EXPIRE_CHECK_MS;
    s_expire_ctx_t x = {ml_now_ms() - img->incoming_expire_ms, {NULL, 0, 0, 129}};
    if (ml_istore_in_walk(img->is, ML_IMG_IN_RECEIVING, s_expired_cb, &x) < 0) {
        aimg__vec_free(&x.cases);
        return;
    }
    for (size_t i = 0; i < x.cases.n; i++) {
        const char *case_id = aimg__vec_at(&x.cases, i);
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
        aimg__drop_files(img);
    }
    aimg__vec_free(&x.cases);
}
