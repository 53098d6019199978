/* Internal to the agent's imaging module (imaging.c, img_send.c,
 * img_recv.c): the state they share and the helpers each file offers the
 * other two. Not for any other file: the module's API is imaging.h,
 * img_send.h and img_recv.h. Internal functions are named by the file that
 * defines them (aimg__ for imaging.c, img_send__, img_recv__), as Mosquitto
 * names its internal functions. Loop thread only, except where a staging
 * job says otherwise. */
#ifndef ML_AGENT_IMG_INT_H
#define ML_AGENT_IMG_INT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "astore.h"
#include "imaging.h"
#include "istore.h"
#include "ml_env.h"
#include "spool.h"

#define S_LOG "imaging"
#define S_PATH 4096
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

/* One consult being staged (img_send.c). */
typedef struct aimg_job aimg_job_t;

/* Sending progress of a case, kept for the log lines. */
typedef struct {
    char case_id[129];
    int64_t chunks, accepted, refused;
    uint64_t bytes, accepted_bytes;
    uint32_t n_objects;
    uint32_t *object_chunks; /* chunks per object, from the consult */
    int fresh;               /* loaded during this settle: counts include it */
    int done_logged;
} aimg_prog_t;

/* Work for after the receive commit. */
typedef struct {
    char case_id[129];
    uint32_t idx; /* object (touched) */
} aimg_touch_t;

typedef struct {
    char case_id[129];
    uint32_t idx;
    int fd;
} aimg_part_t;

typedef struct {
    char case_id[129];
    uint32_t idx;
    uint32_t chunk;
} aimg_bad_t;

/* Resend budget of one consult this node sent (F3): chunks queued again in
 * the current window. Kept in memory only: a restart of this agent is not
 * something the peer asking for resends can cause. */
typedef struct {
    char case_id[129];
    int64_t window_start; /* ml_mono_ms */
    uint64_t used;        /* chunks queued again since window_start */
} aimg_resend_t;

/* A growable array of fixed-size records. */
typedef struct {
    void *v;
    size_t n, cap, size;
} aimg_vec_t;

/* The module. The sender (img_send.c) owns the staging queue, progs and
 * resends; the receiver (img_recv.c) the receive batch (touched, parts,
 * bad); drop_out/drop_in and queued are filled by both and emptied by
 * aimg__drop_files and the wake-ups. */
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

    aimg_job_t *head, *tail;
    aimg_job_t *running;
    atomic_int cancel;
    int started; /* ml_aimg_start: staging may use the thread pool */
    int stopping;

    aimg_vec_t progs; /* aimg_prog_t */

    /* Resend limits (clinic) and incoming expiry (reading centre). */
    int64_t resend_window_ms;
    int64_t incoming_expire_ms;
    int64_t expire_check_at; /* ml_mono_ms of the next look */
    aimg_vec_t resends;      /* aimg_resend_t */

    /* One receive batch. */
    aimg_vec_t touched;  /* aimg_touch_t: objects with new good chunks */
    aimg_vec_t parts;    /* aimg_part_t: open .part files */
    aimg_vec_t bad;      /* aimg_bad_t: chunks to ask for again */
    aimg_vec_t drop_out; /* char[129]: cases whose blob copies go */
    aimg_vec_t drop_in;  /* char[129]: cases whose incoming files go */
    int queued;          /* outbox rows added */
    int retry;           /* a publication failed; ml_aimg_tick retries */
    int64_t retry_at;    /* not before this (ml_mono_ms) */
};

/* ---- imaging.c: shared helpers ---- */

/* A growable array of fixed-size records: a slot zeroed, or NULL out of
 * memory. */
void *aimg__vec_push(aimg_vec_t *v);
void *aimg__vec_at(const aimg_vec_t *v, size_t i);
void aimg__vec_free(aimg_vec_t *v);
/* Adds case_id to a vector of case ids (char[129]) unless it is there.
 * Returns 0 or ML_ENOMEM. */
int aimg__case_push(aimg_vec_t *v, const char *case_id);
/* The folder name of a case under blobs/ and incoming/. */
void aimg__case_dir(const char *case_id, char out[160]);
/* snprintf that reports truncation: 0 or ML_EINVAL. */
int aimg__fmt(char *out, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int aimg__join(char *out, size_t len, const char *a, const char *b);
/* rm -rf of path (ml_fs_rmtree), logging a failure. */
void aimg__remove_dir(const char *path, const char *what);
int aimg__blob_dir(const ml_aimg_t *img, const char *case_id, char *rel, size_t rlen, char *abs,
                   size_t alen);
int aimg__incoming_dir(const ml_aimg_t *img, const char *case_id, char *out, size_t len);
int aimg__part_path(const ml_aimg_t *img, const char *case_id, uint32_t idx, char *out, size_t len);
/* Replaces a protobuf string field with a copy of v. 0 or ML_ENOMEM. */
int aimg__dup(char **field, const char *v);
/* Adds an outgoing message to the outbox inside the caller's transaction
 * (id, from, created_at filled; validated). Returns 0 or negative ML_E*. */
int aimg__queue(ml_aimg_t *img, ml_envelope_t *e, const char *what);
int aimg__queue_update(ml_aimg_t *img, const char *case_id, const char *to, int priority,
                       Medlink__V1__ImagingUpdate *u, const char *what);
/* Ends a case this node sent, in the caller's transaction; the blob copies
 * go after the commit (aimg__drop_files). */
int aimg__close_out(ml_aimg_t *img, const char *case_id, const char *why);
/* After a commit: deletes the blob copies and incoming files of the cases
 * that ended. */
void aimg__drop_files(ml_aimg_t *img);

/* ---- img_send.c ---- */

/* hooks.consult of the spool: queues a consult for staging. */
void img_send__consult_cb(void *arg, const char *name, ml_envelope_t *env);
/* An ImagingResend for a case this node sent, in the caller's
 * transaction. Returns 0 or negative ML_E* (roll back). */
int img_send__on_resend(ml_aimg_t *img, const ml_envelope_t *e);
/* Forgets the progress and resend budget of a case that ended. */
void img_send__forget(ml_aimg_t *img, const char *case_id);
/* Frees the staging queue, progress records and resend budgets
 * (ml_aimg_destroy). */
void img_send__close(ml_aimg_t *img);

/* ---- img_recv.c ---- */

/* Verifies the complete objects of a transfer and publishes it when all
 * are verified; each step commits on its own. Returns 0 or ML_E*. */
int img_recv__advance(ml_aimg_t *img, const char *case_id);
/* Ends the incoming transfers that expired (at most every second). */
void img_recv__expire(ml_aimg_t *img);
/* Drops the state of a receive batch that did not commit. */
void img_recv__batch_reset(ml_aimg_t *img);

#endif
