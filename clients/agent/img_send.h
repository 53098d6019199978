/* The sending side of the agent's imaging module (requesting clinic):
 * staging a consult's study into blob copies and chunk rows on the libuv
 * thread pool, building a chunk's envelope from its blob copy when it is
 * sent, following the broker's answers (progress, resume) and the reading
 * centre's resend requests within a budget. See imaging.h for the module
 * and its crash points. Loop thread only. */
#ifndef ML_AGENT_IMG_SEND_H
#define ML_AGENT_IMG_SEND_H

#include <stddef.h>
#include <stdint.h>

#include "astore.h"
#include "spool.h"

typedef struct ml_aimg ml_aimg_t;

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

#endif
