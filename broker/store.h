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
 * on the loop thread; WAL lets it read while the store thread writes.
 *
 * Schema 5: the envelopes are not in SQLite but in append-only segment
 * files next to the database (PATH-seg/NNNNNNNN.seg), each written once and
 * synced before the COMMIT of the row that points at it; a fetch is one
 * row lookup and one pread. A database of an older schema is refused at
 * open with its version named (nothing was deployed with one). */
#ifndef ML_BROKER_STORE_H
#define ML_BROKER_STORE_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

typedef struct ml_store ml_store_t;

/* Message states in the store. */
enum { ML_MSG_QUEUED = 0, ML_MSG_DELIVERED = 1, ML_MSG_DEAD = 2 };

/* A case as the broker keeps it: one row of the cases table. Strings are
 * borrowed (copied by the calls that take one). */
typedef struct {
    const char *case_id;
    int kind;     /* ML_CASE_* (cases.h) */
    int state;    /* a value of the kind's status enum */
    int priority; /* of the opening message */
    const char *opener;
    const char *target;
    const char *service; /* "" or NULL when addressed to a node */
    const char *linked;  /* the case this one came from or led to */
    const char *opening_id;
    int64_t opened_at;
    int64_t updated_at;
    int64_t deadline_at; /* 0 = no deadline running */
    int deadline_state;
    int escalations;
    int follow_ups;
    int closed;
    uint32_t n_objects;
    uint32_t chunks_expected;
    uint32_t chunks;
    uint32_t dup_chunks;
    uint64_t chunk_bytes;
    int fired;       /* the running deadline has been escalated */
    int64_t version; /* 1 when opened, +1 for every change */
} ml_store_case_t;

/* One timeline entry; strings borrowed, NULL reads as "". */
typedef struct {
    int64_t at;
    const char *node;
    const char *event;
    const char *from_state;
    const char *to_state;
    const char *message_id;
    const char *kind;
    const char *detail;
    size_t detail_len; /* the store's own use (a sealed detail); 0 for callers */
} ml_store_event_t;

/* A change to one case, applied in the same transaction as the message it
 * comes with (or alone, ml_store_case_apply). open = 1 inserts row (its
 * version must be 1; an existing case_id fails the request with
 * ML_EDUP); otherwise row replaces the stored one only if the stored
 * version is row.version - 1, else the request fails with ML_EDENIED: the
 * broker's memory and the store disagree (after a failed batch), and the
 * caller reloads the case. When the message turns out to be a duplicate the
 * row and the events are not written, but the stored version still moves
 * to row.version, so the caller's later changes keep applying. */
typedef struct {
    ml_store_case_t row;
    int open;
    const ml_store_event_t *events;
    size_t n_events;
} ml_store_caseop_t;

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
    const ml_store_caseop_t *ops; /* case changes that commit with it (copied) */
    size_t n_ops;
    int fresh; /* 1: an id the broker just made, never a duplicate (saves a lookup) */
    /* SHA-256 of the record as its sender sent it (ML_STORE_DIGEST_LEN
     * bytes), or NULL for the broker's own messages. A put whose id is
     * stored already is a duplicate only when the earlier row has the same
     * sender and the same digest (or no digest: a row of schema 3 or
     * older); anything else is ML_EIDUSED (F7). */
    const uint8_t *digest;
    /* The sender's stream (non-zero: the broker passes its session's
     * serial). Once a put of a stream fails for now (room, I/O, a case
     * version), the stream's later puts fail the same way without being
     * tried, until the loop has run that failure's callback: a put queued
     * behind the failed one cannot commit ahead of it (a full disk frees
     * a little room between groups), so the sender's order holds. */
    uint64_t stream;
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
    int64_t deadline; /* Unix ms, 0 = none */
    int attempts;
    size_t envelope_len;
} ml_store_row_t;

/* A dead letter as listed; strings borrowed for the callback. */
typedef struct {
    int64_t seq;
    const char *id;
    const char *case_id;
    const char *sender;
    const char *recipient;
    int kind;
    int priority;
    int64_t accepted_at;
    int64_t dead_at;
    int attempts;
    size_t size;
    const char *reason;
    int64_t deadline;
} ml_store_dead_t;

typedef struct ml_keyring ml_keyring_t;

typedef struct {
    int batch_max;     /* most requests per transaction (default 4096) */
    int64_t max_bytes; /* refuse puts with ML_EFULL once the database
                          file exceeds this (0 = no limit) */
    /* When set (borrowed; outlives the store), every envelope and every
     * timeline detail is sealed with AES-256-GCM (ml_crypt.h) before it is
     * written, bound to its message id / case id; values sealed under an
     * older key of the ring still open, and plaintext rows written before a
     * key was configured are still read. */
    const ml_keyring_t *keys;
    /* Retention (docs/operations.md, "Retention"). A delivered message
     * (its row and its body) goes once its case is final, or it has no
     * case, and retention_ms has passed since the later of its delivery
     * and its case's last change; < 0 keeps them for ever. A delivered
     * imaging chunk's body goes as soon as its case has reached
     * STUDY_RECEIVED (its row stays with the message). A final case's row
     * and timeline go timeline_ms after its last change, never before
     * retention_ms (< 0: kept for ever). Pruning runs every
     * prune_interval_ms (0 = only when asked, ml_store_prune) in
     * transactions of at most prune_batch rows (default 1000), each
     * followed by at most vacuum_pages pages of incremental vacuum
     * (default 256), between the store thread's groups. */
    int64_t retention_ms;
    int64_t timeline_ms;
    int64_t prune_interval_ms;
    int prune_batch;
    int vacuum_pages;
    /* Bodies are appended to segment files (PATH-seg/); a new one starts
     * once the current one is past this many bytes (0: 64 MiB). Space
     * comes back whole segments at a time, so tests use small ones. */
    int64_t segment_bytes;
} ml_store_opts_t;

/* What one pruning run removed. */
typedef struct {
    uint64_t messages;       /* message rows deleted (with their bodies) */
    uint64_t bodies;         /* bodies deleted, chunk bodies included */
    uint64_t chunk_bodies;   /* imaging chunk bodies dropped at STUDY_RECEIVED */
    uint64_t payload_bytes;  /* bytes of the bodies deleted (as stored) */
    uint64_t cases;          /* final cases deleted with their timelines */
    uint64_t events;         /* timeline entries deleted */
    uint64_t pages_vacuumed; /* pages returned to the file system */
    uint64_t bytes_freed;    /* pages_vacuumed x page size: what the file shrank by */
    uint64_t free_pages;     /* free pages left inside the file afterwards */
    int64_t started_at;      /* Unix ms */
    int64_t took_ms;
} ml_store_pruned_t;

/* What the database holds, for medlinkctl store stats. */
typedef struct {
    uint64_t file_bytes; /* broker.db */
    uint64_t wal_bytes;  /* broker.db-wal */
    uint64_t seg_bytes;  /* the segment files holding the bodies (broker.db-seg/) */
    uint64_t page_size, page_count, free_pages;
    int auto_vacuum; /* 0 none, 1 full, 2 incremental */
    /* Rows and the oldest row's time (Unix ms, 0 when none) per table and
     * state: messages by state (accepted_at), bodies (their message's
     * accepted_at), cases open / final (opened_at / updated_at), case_events
     * (at). */
    uint64_t msg_rows[3];
    int64_t msg_oldest[3];
    uint64_t body_rows;
    int64_t body_oldest;
    uint64_t open_cases, final_cases;
    int64_t open_oldest, final_oldest;
    uint64_t event_rows;
    int64_t event_oldest;
    ml_store_pruned_t last; /* the last pruning run (started_at 0: none yet) */
} ml_store_info_t;

/* The bytes the store holds for one message of envelope_len bytes: its
 * body plus ML_STORE_ROW_OVERHEAD, the measured cost of the rest: the
 * metadata row, its two index entries, B-tree page slack, and the case row
 * and timeline entry a message usually brings. Measured once by inserting
 * 20,000 125-byte messages into this schema (page_count growth / rows):
 * ~205 bytes a message alone, ~510 with a case row and one timeline entry
 * (docs/operations.md). node_queue_bytes counts this, not the envelope
 * alone. */
#define ML_STORE_ROW_OVERHEAD 512u
static inline uint64_t ml_store_cost(size_t envelope_len)
{
    return (uint64_t)envelope_len + ML_STORE_ROW_OVERHEAD;
}

#define ML_STORE_DIGEST_LEN 32

/* Called on the loop thread once the put is settled: rc 0 with the row's
 * seq (duplicate = 1 when the same sender's same message was already
 * stored; seq is then the earlier row's), or ML_EIDUSED (the id is stored
 * for a different message or sender), ML_EFULL (disk or quota full),
 * ML_EDENIED / ML_EDUP (a case change did not apply: see
 * ml_store_caseop_t), or ML_ESTORE. */
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
/* Queues "seq is a dead letter" with a reason and the number of delivery
 * attempts made. */
int ml_store_mark_dead(ml_store_t *st, int64_t seq, const char *reason, int attempts);
/* Queues "seq is a dead letter" for a message queued or already delivered:
 * an imaging consult whose study never arrived whole at its reading centre
 * (the centre expired it), so that ops staff see it in the dead letters. */
int ml_store_mark_dead_delivered(ml_store_t *st, int64_t seq, const char *reason);
/* Queues "dead letter seq is queued again": state back to queued, attempts
 * and deadline cleared. Only a dead row changes. */
int ml_store_replay(ml_store_t *st, int64_t seq);
/* Queues the deletion of dead letter seq (only a dead row goes). */
int ml_store_purge(ml_store_t *st, int64_t seq);
/* Queues case changes without a message (a delivery recorded, a deadline
 * missed). cb (may be NULL) gets rc 0 or ML_EDENIED / ML_EFULL /
 * ML_ESTORE as for puts; seq and duplicate are 0. */
int ml_store_case_apply(ml_store_t *st, const ml_store_caseop_t *ops, size_t n_ops,
                        ml_store_put_cb cb, void *arg);

/* Called on the loop thread when a pruning run asked for with
 * ml_store_prune has finished: rc 0 with what it removed, or ML_ESTORE /
 * ML_EFULL (then r counts what went before the failure). */
typedef void (*ml_store_prune_cb)(void *arg, int rc, const ml_store_pruned_t *r);
/* Runs retention now: a whole pruning run (every table, then incremental
 * vacuum until no free page is left), in the same bounded steps as the
 * periodic one, between groups; a periodic run in progress is finished
 * first (not counted) and then a fresh run made, so everything settled
 * before the call is covered. cb runs once it is done, or from ml_store_close
 * with ML_ECLOSED when the store closes first. Loop thread. Returns 0,
 * ML_ENOMEM or ML_ECLOSED. */
int ml_store_prune(ml_store_t *st, ml_store_prune_cb cb, void *arg);
/* Fills out from committed data (the reader connection). O(rows): it
 * counts every table. Loop thread. Returns 0 or ML_ESTORE. */
int ml_store_info(ml_store_t *st, ml_store_info_t *out);
/* Queues a request that changes nothing: cb runs on the loop thread once
 * every request queued before it has been tried (committed, or answered
 * with its failure; a mark that failed is retried behind it), so that what
 * they changed is visible to the synchronous reads below. rc is 0 when its
 * transaction committed. Returns 0 or ML_ENOMEM / ML_ECLOSED. */
int ml_store_barrier(ml_store_t *st, ml_store_put_cb cb, void *arg);

/* ---- synchronous reads on the loop thread (committed data only) ---- */

typedef void (*ml_store_case_cb)(void *arg, const ml_store_case_t *row);
typedef void (*ml_store_event_cb)(void *arg, const ml_store_event_t *ev);
typedef void (*ml_store_dead_cb)(void *arg, const ml_store_dead_t *d);

/* Calls cb for every case not in a final state. For start-up. Returns 0 or
 * ML_ESTORE. */
int ml_store_cases_open(ml_store_t *st, ml_store_case_cb cb, void *arg);
/* Calls cb for every case not in a final state whose deadline is running
 * (deadline_at > 0): the open cases the broker keeps in memory from
 * start-up, since its deadline scan walks memory only. Returns 0 or
 * ML_ESTORE. */
int ml_store_cases_timed(ml_store_t *st, ml_store_case_cb cb, void *arg);
typedef void (*ml_store_count_cb)(void *arg, const char *opener, const char *target, int64_t n);
/* Calls cb with the number of cases not in a final state for each
 * (opener, target) pair. For start-up: the broker's per-node counts of
 * open cases include the ones it does not keep in memory. Returns 0 or
 * ML_ESTORE. */
int ml_store_cases_open_counts(ml_store_t *st, ml_store_count_cb cb, void *arg);
typedef void (*ml_store_state_count_cb)(void *arg, int kind, int state, int64_t n);
/* Calls cb with the number of cases not in a final state for each (kind,
 * state). For start-up: the open cases by state of /metrics, counted from
 * then on as they change (metrics.c). Returns 0 or ML_ESTORE. */
int ml_store_cases_open_states(ml_store_t *st, ml_store_state_count_cb cb, void *arg);
/* Calls cb with case_id's row. Returns 0, ML_ENOTFOUND or ML_ESTORE. */
int ml_store_case_get(ml_store_t *st, const char *case_id, ml_store_case_cb cb, void *arg);
/* Cases matching the filters, most recently updated first: kind 0 = any,
 * state < 0 = any, overdue_at > 0 = only those with 0 < deadline_at <=
 * overdue_at, at most limit. O(cases). Returns 0 or ML_ESTORE. */
int ml_store_cases_query(ml_store_t *st, int kind, int state, int64_t overdue_at, int limit,
                         ml_store_case_cb cb, void *arg);
/* The timeline of case_id in order. Returns 0 or ML_ESTORE. */
int ml_store_case_events(ml_store_t *st, const char *case_id, ml_store_event_cb cb, void *arg);
/* The seq of the message with this id, and its state (ML_MSG_*). Returns 0,
 * ML_ENOTFOUND or ML_ESTORE. O(log n). */
int ml_store_lookup(ml_store_t *st, const char *id, int64_t *seq, int *state);
/* Number of dead letters. Returns 0 or ML_ESTORE. */
int ml_store_dead_count(ml_store_t *st, int64_t *n);
/* Dead letters, newest first, at most limit. Returns 0 or ML_ESTORE. */
int ml_store_dead_list(ml_store_t *st, int limit, ml_store_dead_cb cb, void *arg);
/* The dead letter with this message id. Returns 0, ML_ENOTFOUND or
 * ML_ESTORE. */
int ml_store_dead_get(ml_store_t *st, const char *id, ml_store_dead_cb cb, void *arg);

/* Calls cb for every queued message in (priority DESC, seq ASC) order.
 * Synchronous, loop thread, meant for start-up. Returns 0 or ML_ESTORE. */
int ml_store_scan_pending(ml_store_t *st, void (*cb)(void *arg, const ml_store_row_t *row),
                          void *arg);
/* Reads the serialised envelope of seq into a malloc'd buffer (the
 * caller's), opening it when it is sealed. Synchronous, loop thread;
 * O(log n). Returns 0, ML_ENOTFOUND (no such row), ML_EPROTO (a sealed
 * envelope that does not authenticate: damaged on disk), ML_ECONFIG (sealed
 * under a key neither store_key nor store_old_keys names) or ML_ESTORE. */
int ml_store_fetch(ml_store_t *st, int64_t seq, uint8_t **blob, size_t *len);

#define ML_STORE_GROUP_BUCKETS 9
#define ML_STORE_COMMIT_BUCKETS 12
/* The finite upper bounds of those buckets (one fewer than the buckets). */
extern const uint32_t ml_store_group_le[ML_STORE_GROUP_BUCKETS - 1];
extern const uint32_t ml_store_commit_le_us[ML_STORE_COMMIT_BUCKETS - 1];

typedef struct {
    uint64_t transactions; /* committed write transactions */
    uint64_t puts;         /* messages inserted */
    uint64_t duplicates;
    uint64_t failures;
    uint64_t queue_len; /* requests waiting for the store thread */
    /* Histograms of the groups the store thread commits (/metrics): how
     * many requests each took (puts, delivery and dead marks, case
     * changes) and how long it took, from BEGIN to a COMMIT's fsync done.
     * Counts per bucket, not cumulative; the upper bounds are
     * ml_store_group_le and ml_store_commit_le_us, the last bucket +Inf. */
    uint64_t groups;
    uint64_t group_requests; /* the sum of the group sizes */
    uint64_t group_hist[ML_STORE_GROUP_BUCKETS];
    uint64_t commit_us; /* the sum of the group durations, microseconds */
    uint64_t commit_hist[ML_STORE_COMMIT_BUCKETS];
} ml_store_stats_t;
/* A copy of the counters (taken under the store's mutex, which the store
 * thread holds only briefly between groups). Any thread. O(1). */
void ml_store_stats(ml_store_t *st, ml_store_stats_t *out);
/* The sizes of the store and of its WAL, in bytes: db_bytes is broker.db
 * plus the segment files that hold the bodies (broker.db-seg/, counted as
 * they are written), what max_bytes is compared with. Two stat(2) calls; 0
 * for a file that is not there. Loop thread. */
void ml_store_file_sizes(ml_store_t *st, uint64_t *db_bytes, uint64_t *wal_bytes);

/* Whether the store can take new messages, as its last group of writes
 * found out (or, before any, the database's size at open): 0 when it can,
 * else ML_EFULL (the disk is full, or the database is past max_bytes) or
 * ML_ESTORE (the last transaction failed), with a sentence naming the
 * file and the reason in why ("" when 0). A store that refused for a full
 * disk says so until a later group commits. Loop thread (holds the
 * store's mutex for a copy); O(1). */
int ml_store_health(ml_store_t *st, char *why, size_t len);

/* ---- offline access to one stored body (the broker stopped) ----
 * For repair tools and tests that need the bytes as stored (sealed when
 * a store key is set): the body of message id as it is on disk, and its
 * replacement by other bytes (appended as a new record to the newest
 * segment, synced, then the row repointed in one transaction). path is
 * broker.db. Must not run while a broker has the store open. Return 0,
 * ML_ENOTFOUND (no such message or no body) or ML_ESTORE. */
int ml_store_offline_body(const char *path, const char *id, uint8_t **body, size_t *len);
int ml_store_offline_replace_body(const char *path, const char *id, const uint8_t *body,
                                  size_t len);

#endif
