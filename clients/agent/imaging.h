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
 * staging work it runs on the libuv thread pool itself. */
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

/* Sending progress of one case (ml_aimg_progress). */
typedef struct {
    int64_t chunks;          /* chunk rows, resends included */
    int64_t accepted;        /* of them Accepted by the broker */
    int64_t refused;         /* refused or dropped */
    uint64_t bytes;          /* data bytes of all chunk rows */
    uint64_t accepted_bytes; /* of the Accepted ones */
    int consult_accepted;    /* 1 once the consult itself is Accepted */
    int has_next;            /* a chunk row is still pending: */
    uint32_t next_object;    /* its object index */
    uint32_t next_chunk;     /* and chunk index */
} ml_aimg_progress_t;

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
/* Lets staging work run on the loop's thread pool (consults found until
 * now wait in a queue): call once nothing can fail any more, because a
 * module with work running cannot be destroyed before the loop runs. */
void ml_aimg_start(ml_aimg_t *img);
/* Stops staging: queued consults stay in pending/ for the next start, the
 * one being copied is abandoned at its next block. */
void ml_aimg_stop(ml_aimg_t *img);
/* Runs every queued staging job on the calling thread (no loop: tests).
 * Returns the number of jobs run. */
size_t ml_aimg_run_jobs(ml_aimg_t *img);

/* ---- sending ---- */

/* Builds the envelope of a chunk row (row->blob_path not ""): reads
 * blob_len bytes at blob_off of data_dir/blob_path, puts them and their
 * SHA-256 into the stored ImagingChunk. *out is malloc'd, the caller's.
 * Returns 0, ML_EIO (blob unreadable or short; err says why; the row can
 * never be sent), ML_EPROTO (stored template unreadable) or ML_ENOMEM.
 * O(blob_len). */
int ml_aimg_chunk_envelope(ml_aimg_t *img, const ml_outbox_row_t *row, uint8_t **out, size_t *len,
                           char *err, size_t errlen);
/* Applies broker answers already settled by ml_spool_settle: logs chunk
 * progress, and ends the case of a refused consult. Returns 1 when a
 * consult was Accepted (its chunks are released: restart the chunk stream
 * from its start), else 0. O(n log N). */
int ml_aimg_settled(ml_aimg_t *img, const ml_spool_result_t *res, size_t n);
/* Logs, for every case with chunks still to send, where sending resumes
 * ("resuming case X at chunk k of n (B bytes already accepted)"). Call when
 * the channel comes up. */
void ml_aimg_log_resume(ml_aimg_t *img);
/* Progress of the case this node sent. Returns 0, ML_ENOTFOUND or
 * ML_ESTORE. */
int ml_aimg_progress(ml_aimg_t *img, const char *case_id, ml_aimg_progress_t *p);

/* ---- receiving ---- */

/* Stores one loop iteration's deliveries in one transaction: msgs (every
 * routed kind but ImagingChunk) through the spool, chunks into their
 * .part files and records; then writes inbox files, verifies completed
 * objects and publishes completed studies. On 0 every msgs[i] may be
 * acknowledged, and chunks[i] when chunks[i].ack is 1 (a chunk that could
 * not be written is left for the broker to deliver again). Returns 0 or
 * ML_ESTORE (acknowledge nothing). */
int ml_aimg_receive(ml_aimg_t *img, ml_spool_msg_t *msgs, size_t n, ml_spool_msg_t *chunks,
                    size_t nc);

#endif
