/* The broker's durable store: one SQLite database in WAL mode, written by a
 * dedicated store thread with group commit (every request queued while the
 * previous transaction was committing goes into the next one: many messages,
 * one fsync). Results come back to the loop thread through uv_async, in the
 * order the requests were made. A message is reported stored only after its
 * transaction has committed with synchronous=FULL, which is what lets the
 * broker answer Accepted.
 *
 * Reads the loop thread needs (fetching a queued envelope for delivery,
 * scanning pending messages at start-up) use a second, read-only connection
 * on the loop thread; WAL lets it read while the store thread writes. */
#ifndef ML_BROKER_STORE_H
#define ML_BROKER_STORE_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

typedef struct ml_store ml_store_t;

/* Message states in the store. */
enum { ML_MSG_QUEUED = 0, ML_MSG_DELIVERED = 1, ML_MSG_DEAD = 2 };

typedef struct {
    const char *id; /* ULID, unique across the store */
    const char *case_id;
    const char *sender;
    const char *recipient;
    int kind;
    int priority;
    int64_t created_at;      /* sender's clock, Unix ms */
    int64_t deadline;        /* Unix ms, 0 = none */
    const uint8_t *envelope; /* the serialised Envelope as received */
    size_t envelope_len;
} ml_store_msg_t;

/* A pending (queued, undelivered) message as listed at start-up. Strings
 * are borrowed for the duration of the callback. */
typedef struct {
    int64_t seq;
    const char *id;
    const char *case_id;
    const char *sender;
    const char *recipient;
    int kind;
    int priority;
    int64_t accepted_at;
    size_t envelope_len;
} ml_store_row_t;

typedef struct {
    int batch_max;     /* most requests per transaction (default 4096) */
    int64_t max_bytes; /* refuse puts with ML_EFULL once the database
                          file exceeds this (0 = no limit) */
} ml_store_opts_t;

/* Called on the loop thread once the put is settled: rc 0 with the row's
 * seq (duplicate = 1 when a message with this id was already stored; seq is
 * then the earlier row's), or ML_EFULL (disk or quota full), or ML_ESTORE. */
typedef void (*ml_store_put_cb)(void *arg, int rc, int64_t seq, int duplicate);

/* Opens (creating if needed) the database at path, applies the schema, and
 * starts the store thread. opts may be NULL. On error returns ML_ESTORE with
 * err naming the file and the SQLite reason. */
int ml_store_open(uv_loop_t *loop, const char *path, const ml_store_opts_t *opts, ml_store_t **out,
                  char *err, size_t errlen);
/* Commits everything still queued, stops the thread, closes both
 * connections. Callbacks for requests still in flight are not called.
 * The uv_async handle is closed with uv_close, so the caller must run the
 * loop once more before uv_loop_close. Loop thread; clears *self_p; safe
 * on NULL. */
void ml_store_close(ml_store_t **self_p);

/* Queues an insert (the data is copied). cb is called later on the loop
 * thread. Returns 0 or ML_ENOMEM / ML_ECLOSED. Loop thread only. */
int ml_store_put(ml_store_t *st, const ml_store_msg_t *m, ml_store_put_cb cb, void *arg);
/* Queues "seq was delivered (acknowledged by its recipient)" for the next
 * transaction. No callback; a crash before that commit means the message is
 * delivered again, which the recipient's dedupe absorbs. */
int ml_store_mark_delivered(ml_store_t *st, int64_t seq);
/* Queues "seq is a dead letter" with a reason. */
int ml_store_mark_dead(ml_store_t *st, int64_t seq, const char *reason);

/* Calls cb for every queued message in (priority DESC, seq ASC) order.
 * Synchronous, loop thread, meant for start-up. Returns 0 or ML_ESTORE. */
int ml_store_scan_pending(ml_store_t *st, void (*cb)(void *arg, const ml_store_row_t *row),
                          void *arg);
/* Reads the serialised envelope of seq into a malloc'd buffer (the
 * caller's). Synchronous, loop thread; O(log n). Returns 0, ML_ENOTFOUND or
 * ML_ESTORE. */
int ml_store_fetch(ml_store_t *st, int64_t seq, uint8_t **blob, size_t *len);

typedef struct {
    uint64_t transactions; /* committed write transactions */
    uint64_t puts;         /* messages inserted */
    uint64_t duplicates;
    uint64_t failures;
    uint64_t queue_len; /* requests waiting for the store thread */
} ml_store_stats_t;
void ml_store_stats(ml_store_t *st, ml_store_stats_t *out);

#endif
