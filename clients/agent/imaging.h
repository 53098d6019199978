/* The agent's side of imaging consults, for both ends of one.
 *
 * Requesting clinic: a consult dropped as outbox/NAME.json with its DICOM
 * files in outbox/NAME.d/ is staged off the loop thread (probe every file,
 * copy it with fsync to data_dir/blobs/<case>/<index>.dcm while hashing it,
 * fill in the object list), then stored as one consult row and one outbox
 * row per chunk that references (blob file, offset, length) and is held
 * until the consult is Accepted. The chunk's envelope is built from the
 * blob when it is sent. An ImagingResend from the reading centre queues the
 * chunks again; a report, a STUDY_RECEIVED, a rejection or a cancellation
 * ends the case and deletes its blob copies.
 *
 * Reading centre: a delivered consult opens a transfer; each delivered
 * chunk is checked against its SHA-256, written at its offset into
 * data_dir/incoming/<case>/<index>.part and recorded (fsync before the
 * commit, commit before the Ack). A damaged chunk is asked for again. A
 * complete object is checked against its own SHA-256; a complete study is
 * published atomically as spool inbox/study-<case>/ with a manifest.json,
 * and IMAGING_STUDY_RECEIVED goes back to the clinic.
 *
 * Every step is restart-safe: what is recorded is on disk, what is not is
 * redone (redelivered by the broker, re-staged from pending/, re-verified
 * and re-published by ml_aimg_recover). Loop thread only, except the
 * staging work it runs on the libuv thread pool itself.
 *
 * The module is three files: imaging.c (this header: the module's life,
 * recovery, the timer and what both sides share), img_send.[ch] (the
 * clinic's side: staging, chunk envelopes, answers, resends) and
 * img_recv.[ch] (the reading centre's side, a plug-in of the agent's
 * receive batch, inbox.h). This header includes the other two, so a user
 * of the module includes imaging.h only. */
#ifndef ML_AGENT_IMAGING_H
#define ML_AGENT_IMAGING_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "astore.h"
#include "spool.h"

typedef struct ml_aimg ml_aimg_t;

typedef struct {
    const char *data_dir;    /* holds blobs/ and incoming/ */
    const char *node_id;     /* this node */
    uint32_t chunk_size;     /* for consults this node sends */
    size_t max_record;       /* a consult must pack within it */
    ml_astore_t *store;      /* borrowed; outlives the module */
    ml_spool_t *spool;       /* borrowed; its hooks are set to this module */
    uv_loop_t *loop;         /* staging runs on its thread pool; NULL: in ml_aimg_run_jobs */
    void (*wake)(void *arg); /* rows were added to the outbox (pump) */
    void *arg;
    /* Resend limit (clinic): per consult, at most the study's chunk count
     * is queued again per this many seconds; 0 = 3600. */
    uint32_t resend_window_s;
    /* Incoming expiry (reading centre): a study not complete this many
     * seconds after its consult arrived is deleted and refused; 0 = 72 h. */
    uint32_t incoming_expire_s;
} ml_aimg_config_t;

/* Opens the imaging tables (ml_istore_open) and installs the spool hooks.
 * Returns 0, ML_ESTORE, ML_ECONFIG or ML_ENOMEM with a sentence in err. */
int ml_aimg_new(const ml_aimg_config_t *cfg, ml_aimg_t **out, char *err, size_t errlen);
/* Frees the module once no staging work runs (after ml_aimg_stop and the
 * loop has run dry); safe on NULL and twice; clears *self_p. */
void ml_aimg_destroy(ml_aimg_t **self_p);
/* Start-up, before ml_spool_recover: deletes blob copies and partial files
 * nobody needs, closes cases whose consult was refused, verifies and
 * publishes transfers a crash interrupted. Returns 0 or ML_ESTORE. */
int ml_aimg_recover(ml_aimg_t *img);
/* Retries publications that failed (a full disk, say), at most every 10 s;
 * cheap when there is nothing to retry. At most every second, also ends the
 * incoming transfers whose consult arrived more than incoming_expire_s ago
 * and that are still not published: their partial files and chunk records
 * are deleted and IMAGING_REJECTED (incoming_expired) goes to the clinic.
 * Call from a timer. */
void ml_aimg_tick(ml_aimg_t *img);
#include "img_recv.h"
#include "img_send.h"

#endif
