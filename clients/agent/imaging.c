/* Imaging consults in the agent: the module's core. The sender
 * (img_send.c) stages a study from the spool folder into blob copies and
 * chunk rows, builds chunk envelopes when they are sent and follows the
 * broker's answers and the reading centre's requests; the receiver
 * (img_recv.c) reassembles, verifies and publishes a study as a plug-in of
 * the agent's receive batch (inbox.c). This file holds what both use (the
 * folder names, the outbox queueing, the end of a case), the spool hook for
 * messages this node queued itself, start-up recovery, the timer and the
 * module's life. The order of every step is chosen so that a crash
 * anywhere leaves either nothing recorded (and the step is redone) or
 * everything recorded on disk:
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

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "img_int.h"
#include "ml_common.h"
#include "ml_fs.h"
#include "ml_imaging.h"

void *aimg__vec_push(aimg_vec_t *v)
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

void *aimg__vec_at(const aimg_vec_t *v, size_t i)
{
    return (char *)v->v + i * v->size;
}

void aimg__vec_free(aimg_vec_t *v)
{
    free(v->v);
    v->v = NULL;
    v->n = v->cap = 0;
}

/* Adds case_id to a vector of case ids unless it is there. */
int aimg__case_push(aimg_vec_t *v, const char *case_id)
{
    for (size_t i = 0; i < v->n; i++)
        if (strcmp(aimg__vec_at(v, i), case_id) == 0)
            return 0;
    char *slot = aimg__vec_push(v);
    if (!slot)
        return ML_ENOMEM;
    snprintf(slot, 129, "%s", case_id);
    return 0;
}

/* The folder name of a case under blobs/ and incoming/: the case id when it
 * is made of plain characters (ULIDs are), else "~" and its SHA-256, so no
 * case id can name a path outside those folders or collide with another. */
void aimg__case_dir(const char *case_id, char out[160])
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

int aimg__fmt(char *out, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out, len, fmt, ap);
    va_end(ap);
    return (n < 0 || (size_t)n >= len) ? ML_EINVAL : 0;
}

int aimg__join(char *out, size_t len, const char *a, const char *b)
{
    return aimg__fmt(out, len, "%s/%s", a, b);
}

void aimg__remove_dir(const char *path, const char *what)
{
    if (ml_fs_rmtree(path) < 0)
        ml_log(ML_LOG_WARN, S_LOG, "cannot delete %s %s: %s", what, path, strerror(errno));
}

int aimg__blob_dir(const ml_aimg_t *img, const char *case_id, char *rel, size_t rlen, char *abs,
                   size_t alen)
{
    char cd[160];
    aimg__case_dir(case_id, cd);
    int n = snprintf(rel, rlen, "blobs/%s", cd);
    if (n < 0 || (size_t)n >= rlen)
        return ML_EINVAL;
    return aimg__join(abs, alen, img->data_dir, rel);
}

int aimg__incoming_dir(const ml_aimg_t *img, const char *case_id, char *out, size_t len)
{
    char cd[160], rel[200];
    aimg__case_dir(case_id, cd);
    snprintf(rel, sizeof rel, "incoming/%s", cd);
    return aimg__join(out, len, img->data_dir, rel);
}

int aimg__part_path(const ml_aimg_t *img, const char *case_id, uint32_t idx, char *out, size_t len)
{
    char dir[S_PATH];
    if (aimg__incoming_dir(img, case_id, dir, sizeof dir) < 0)
        return ML_EINVAL;
    int n = snprintf(out, len, "%s/%u.part", dir, idx);
    return (n < 0 || (size_t)n >= len) ? ML_EINVAL : 0;
}

int aimg__dup(char **field, const char *v)
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
int aimg__queue(ml_aimg_t *img, ml_envelope_t *e, const char *what)
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

int aimg__queue_update(ml_aimg_t *img, const char *case_id, const char *to, int priority,
                       Medlink__V1__ImagingUpdate *u, const char *what)
{
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.case_id = (char *)case_id;
    e.to = (char *)to;
    e.priority = (Medlink__V1__Priority)priority;
    e.payload_case = P_(IMAGING_UPDATE);
    e.imaging_update = u;
    return aimg__queue(img, &e, what);
}

/* Ends a case this node sent: no more chunks, blob copies deleted after
 * the commit. Inside the caller's transaction. */
int aimg__close_out(ml_aimg_t *img, const char *case_id, const char *why)
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
    return aimg__case_push(&img->drop_out, case_id);
}

/* After a commit: deletes the blob copies and incoming files of the cases
 * that ended. */
void aimg__drop_files(ml_aimg_t *img)
{
    for (size_t i = 0; i < img->drop_out.n; i++) {
        const char *case_id = aimg__vec_at(&img->drop_out, i);
        char rel[200], abs[S_PATH];
        if (aimg__blob_dir(img, case_id, rel, sizeof rel, abs, sizeof abs) == 0)
            aimg__remove_dir(abs, "blob copies");
        img_send__forget(img, case_id);
    }
    for (size_t i = 0; i < img->drop_in.n; i++) {
        char dir[S_PATH];
        if (aimg__incoming_dir(img, aimg__vec_at(&img->drop_in, i), dir, sizeof dir) == 0)
            aimg__remove_dir(dir, "incoming files");
    }
    img->drop_out.n = img->drop_in.n = 0;
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
        rc = aimg__close_out(img, e->case_id, "cancelled by this clinic");
    if (rc >= 0 && !cancel && ml_istore_in_get(img->is, e->case_id, &t) == 0 &&
        t.state == ML_IMG_IN_RECEIVING) {
        rc = ml_istore_in_set_state(img->is, t.case_id, ML_IMG_IN_REJECTED,
                                    e->imaging_update->reason, NULL, ml_now_ms());
        if (rc >= 0)
            rc = aimg__case_push(&img->drop_in, t.case_id);
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
        aimg__drop_files(img);
    }
    ml_env_free(&e);
}

typedef struct {
    ml_aimg_t *img;
    aimg_vec_t cases; /* char[129] */
} s_walk_ctx_t;

static int s_out_collect_cb(const ml_img_out_t *o, void *arg)
{
    s_walk_ctx_t *c = arg;
    return aimg__case_push(&c->cases, o->case_id);
}

static int s_in_collect_cb(const ml_img_in_t *t, void *arg)
{
    s_walk_ctx_t *c = arg;
    return aimg__case_push(&c->cases, t->case_id);
}

/* Deletes folders under data_dir/sub whose case is not in keep (by folder
 * name). */
static void s_gc(ml_aimg_t *img, const char *sub, const aimg_vec_t *keep)
{
    char dir[S_PATH];
    if (aimg__join(dir, sizeof dir, img->data_dir, sub) < 0)
        return;
    /* data_dir is the agent's own: opened by name like the rest of it. */
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    ml_fs_entry_t *e = NULL;
    size_t n = 0;
    if (dfd < 0)
        return;
    if (ml_fs_list(dfd, NULL, NULL, &e, &n) < 0)
        n = 0;
    close(dfd);
    for (size_t k = 0; k < n; k++) {
        int wanted = 0;
        for (size_t i = 0; i < keep->n && !wanted; i++) {
            char cd[160];
            aimg__case_dir(aimg__vec_at(keep, i), cd);
            wanted = strcmp(cd, e[k].name) == 0;
        }
        if (wanted)
            continue;
        char p[S_PATH];
        if (aimg__join(p, sizeof p, dir, e[k].name) == 0) {
            ml_log(ML_LOG_INFO, S_LOG, "deleting %s (no open case uses it)", p);
            aimg__remove_dir(p, "leftover");
        }
    }
    ml_fs_list_free(e, n);
}

static int s_state_cb(const ml_outbox_row_t *r, void *arg)
{
    *(int *)arg = r->state;
    return 1;
}

static int s_refused_consult_cb(const ml_img_out_t *o, void *arg)
{
    s_walk_ctx_t *c = arg;
    int state = -1;
    if (ml_astore_outbox_get(c->img->store, o->consult_id, s_state_cb, &state) == 1 &&
        state == ML_OUTBOX_REJECTED)
        return aimg__case_push(&c->cases, o->case_id);
    return 0;
}

/* A study folder s_publish was building when the agent stopped. */
static int s_half_built(const char *name, void *arg)
{
    (void)arg;
    size_t n = strlen(name);
    return strncmp(name, ".study-", 7) == 0 && n > 4 && strcmp(name + n - 4, ".tmp") == 0;
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
            rc = aimg__close_out(img, aimg__vec_at(&c.cases, i), "the consult was refused");
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
    ml_fs_entry_t *e = NULL;
    size_t ne = 0;
    if (ifd >= 0 && ml_fs_list(ifd, s_half_built, NULL, &e, &ne) == 0) {
        for (size_t i = 0; i < ne; i++)
            if (ml_rmtree_at(ifd, e[i].name) < 0)
                ml_log(ML_LOG_WARN, S_LOG, "cannot delete half-built study folder inbox/%s: %s",
                       e[i].name, strerror(errno));
        ml_fs_list_free(e, ne);
    }
    /* Verify and publish what a crash interrupted. */
    for (size_t i = 0; i < c.cases.n; i++)
        img_recv__advance(img, aimg__vec_at(&c.cases, i));
    aimg__drop_files(img);
    rc = 0;
out:
    aimg__vec_free(&c.cases);
    if (rc < 0)
        ml_log(ML_LOG_ERROR, S_LOG, "cannot recover imaging transfers: %s",
               ml_astore_errmsg(img->store));
    if (img->queued && img->wake) {
        img->queued = 0;
        img->wake(img->arg);
    }
    return rc < 0 ? ML_ESTORE : 0;
}

void ml_aimg_tick(ml_aimg_t *img)
{
    if (!img)
        return;
    img_recv__expire(img);
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
            img_recv__advance(img, aimg__vec_at(&c.cases, i));
    aimg__vec_free(&c.cases);
    aimg__drop_files(img);
    if (img->queued && img->wake) {
        img->queued = 0;
        img->wake(img->arg);
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
    img->progs.size = sizeof(aimg_prog_t);
    img->resends.size = sizeof(aimg_resend_t);
    img->resend_window_ms =
        1000LL * (cfg->resend_window_s ? cfg->resend_window_s : S_RESEND_WINDOW_S);
    img->incoming_expire_ms =
        1000LL * (cfg->incoming_expire_s ? cfg->incoming_expire_s : S_INCOMING_EXPIRE_S);
    img->touched.size = sizeof(aimg_touch_t);
    img->parts.size = sizeof(aimg_part_t);
    img->bad.size = sizeof(aimg_bad_t);
    img->drop_out.size = img->drop_in.size = 129;
    if ((rc = ml_istore_open(cfg->store, &img->is, err, errlen)) < 0)
        goto out;
    ml_spool_hooks_t hooks = {img_send__consult_cb, s_queued_cb, img};
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
    img_send__close(img);
    if (img->spool)
        ml_spool_set_hooks(img->spool, NULL);
    img_recv__batch_reset(img);
    aimg__vec_free(&img->touched);
    aimg__vec_free(&img->parts);
    aimg__vec_free(&img->bad);
    aimg__vec_free(&img->drop_out);
    aimg__vec_free(&img->drop_in);
    ml_istore_destroy(&img->is);
    free(img->data_dir);
    free(img->spool_dir);
    free(img->node_id);
    free(img);
    *self_p = NULL;
}
