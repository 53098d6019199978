/* The agent's imaging tables, kept in agent.db next to the outbox and inbox
 * and written in the same transactions (ml_astore_begin/commit):
 *
 *   img_out         one row per consult this node sent: where its blob
 *                   copies are and whether they are still needed
 *   img_in          one row per consult delivered to this node (a reading
 *                   centre): the transfer being reassembled
 *   img_in_object   its objects: declared size, chunks and SHA-256, the
 *                   number of good chunks so far, verified or not
 *   img_in_chunk    every chunk seen: good (written and fsync'd) or bad
 *   img_orphan      chunks that arrived before their consult
 *
 * Loop thread only, like the store it shares. */
#ifndef ML_ISTORE_H
#define ML_ISTORE_H

#include <stddef.h>
#include <stdint.h>

#include "astore.h"

typedef struct ml_istore ml_istore_t;

/* img_out.state */
enum { ML_IMG_OUT_ACTIVE = 0, ML_IMG_OUT_CLOSED = 1 };
/* img_in.state */
enum {
    ML_IMG_IN_RECEIVING = 0,
    ML_IMG_IN_PUBLISHED = 1,
    ML_IMG_IN_REJECTED = 2, /* we refused it (invalid, or chunks keep failing) */
    ML_IMG_IN_CANCELLED = 3 /* the requesting clinic withdrew it */
};

typedef struct {
    char case_id[129];
    char consult_id[64];
    char recipient[256];
    int priority;
    char blob_dir[320]; /* relative to data_dir: "blobs/<case dir>" */
    uint32_t objects;
    uint32_t chunks;
    uint64_t total_bytes;
    uint32_t chunk_size;
    char assigned_to[256];
    int state;
    int64_t created_at;
} ml_img_out_t;

typedef struct {
    char case_id[129];
    char consult_id[64];
    char sender[256];
    int priority;
    char study_uid[65];
    uint32_t chunk_size;
    uint32_t objects;
    uint64_t total_bytes;
    int state;
    char reason[512];
    char folder[320]; /* "study-<case dir>" once published */
    int64_t opened_at;
} ml_img_in_t;

typedef struct {
    uint32_t idx;
    char file_name[160]; /* the name it is published under */
    uint64_t size;
    uint32_t chunks;
    char sha256[65];
    char sop_uid[65];
    char series_uid[65];
    uint32_t good; /* chunks written and recorded */
    int verified;  /* whole-object SHA-256 checked */
    int64_t verified_at;
    uint32_t attempts; /* whole-object mismatches so far */
} ml_img_obj_t;

typedef int (*ml_img_out_cb)(const ml_img_out_t *o, void *arg);
typedef int (*ml_img_in_cb)(const ml_img_in_t *t, void *arg);
typedef int (*ml_img_obj_cb)(const ml_img_obj_t *o, void *arg);
typedef int (*ml_img_orphan_cb)(const char *id, const uint8_t *env, size_t len, void *arg);

/* Creates the tables if needed and prepares the statements on st's
 * connection. When st has keys, the study, series and instance UIDs, object
 * file names, transfer reasons and orphan chunks are sealed like st's
 * envelopes, and what is in clear or under an older key is re-sealed here
 * (ml_astore_reseal). Returns 0, or ML_ESTORE / ML_ECONFIG (a value sealed
 * under a key st lacks, or damaged) with a sentence in err. */
int ml_istore_open(ml_astore_t *st, ml_istore_t **out, char *err, size_t errlen);
/* Safe on NULL and twice; clears *self_p. Call before closing st (its
 * statements must be finalized before the connection closes). */
void ml_istore_destroy(ml_istore_t **self_p);

/* Every function below returns 0 (or what it says), ML_ENOTFOUND where a
 * row is looked up, or ML_ESTORE. Walks return cb's non-zero value. */

/* ---- sending side ---- */
/* ML_EDUP when a consult for this case exists. */
int ml_istore_out_add(ml_istore_t *is, const ml_img_out_t *o, int64_t now_ms);
int ml_istore_out_get(ml_istore_t *is, const char *case_id, ml_img_out_t *o);
/* Also 0 when there is no such case. */
int ml_istore_out_set_assigned(ml_istore_t *is, const char *case_id, const char *node,
                               int64_t now_ms);
/* Marks the case closed (its blob copies may go). Returns 1 when it was
 * active, 0 when not (or unknown). */
int ml_istore_out_close(ml_istore_t *is, const char *case_id, int64_t now_ms);
/* Rows in state (all for state < 0) by creation time. */
int ml_istore_out_walk(ml_istore_t *is, int state, ml_img_out_cb cb, void *arg);

/* ---- receiving side ---- */
/* ML_EDUP when the case has a transfer. */
int ml_istore_in_add(ml_istore_t *is, const ml_img_in_t *t, int64_t now_ms);
int ml_istore_in_get(ml_istore_t *is, const char *case_id, ml_img_in_t *t);
/* Sets state, and reason and folder unless NULL. */
int ml_istore_in_set_state(ml_istore_t *is, const char *case_id, int state, const char *reason,
                           const char *folder, int64_t now_ms);
int ml_istore_in_walk(ml_istore_t *is, int state, ml_img_in_cb cb, void *arg);

int ml_istore_obj_add(ml_istore_t *is, const char *case_id, const ml_img_obj_t *o);
/* The objects of a case by index. */
int ml_istore_obj_walk(ml_istore_t *is, const char *case_id, ml_img_obj_cb cb, void *arg);
int ml_istore_obj_get(ml_istore_t *is, const char *case_id, uint32_t idx, ml_img_obj_t *o);
/* One more good chunk. */
int ml_istore_obj_add_good(ml_istore_t *is, const char *case_id, uint32_t idx);
int ml_istore_obj_set_verified(ml_istore_t *is, const char *case_id, uint32_t idx, int64_t now_ms);
/* The whole object failed its digest: forget its chunks (good = 0, the
 * chunk records deleted) and count the attempt. */
int ml_istore_obj_reset(ml_istore_t *is, const char *case_id, uint32_t idx);

/* A chunk's record: *good 1/0 and how often it arrived damaged. */
int ml_istore_chunk_get(ml_istore_t *is, const char *case_id, uint32_t idx, uint32_t chunk,
                        int *good, uint32_t *bad_count);
int ml_istore_chunk_put(ml_istore_t *is, const char *case_id, uint32_t idx, uint32_t chunk,
                        int good, uint32_t bad_count, int64_t now_ms);

/* Deletes the chunk records of a transfer (its study expired: the .part
 * files they describe are deleted too). */
int ml_istore_in_forget_chunks(ml_istore_t *is, const char *case_id);

/* Returns 1 inserted, 0 already there. */
int ml_istore_orphan_add(ml_istore_t *is, const char *id, const char *case_id, const uint8_t *env,
                         size_t len, int64_t now_ms);
/* The orphans of a case in arrival order. */
int ml_istore_orphan_walk(ml_istore_t *is, const char *case_id, ml_img_orphan_cb cb, void *arg);
int ml_istore_orphan_drop(ml_istore_t *is, const char *case_id);
int ml_istore_orphan_count(ml_istore_t *is, int64_t *n);

#endif
