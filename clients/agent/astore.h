/* The agent's durable store: one SQLite file (WAL, synchronous=FULL) with
 * the outbox (messages this node sends, until the broker accepts or refuses
 * them) and the inbox (messages delivered to this node, deduplicated by
 * message id). A commit returns only once the data is on disk, which is
 * what lets the agent answer Ack and the spool move files.
 *
 * Transactions are explicit (ml_astore_begin/commit) so that callers group
 * a whole batch (one outbox scan, one loop iteration of deliveries) into
 * one fsync. Loop thread only; not thread-safe. */
#ifndef ML_ASTORE_H
#define ML_ASTORE_H

#include <stddef.h>
#include <stdint.h>

typedef struct ml_astore ml_astore_t;

/* Outbox row states (stored as integers; do not renumber). */
enum { ML_OUTBOX_PENDING = 0, ML_OUTBOX_ACCEPTED = 1, ML_OUTBOX_REJECTED = 2 };

/* One outbox row; every pointer is borrowed for the duration of a callback. */
typedef struct {
    int64_t seq;
    const char *id;
    const char *file_name;
    const uint8_t *envelope;
    size_t envelope_len;
    int state;
    const char *reason; /* "" when none */
    int64_t created_at;
    int64_t updated_at;
} ml_outbox_row_t;

/* One inbox row; pointers borrowed for the duration of a callback. */
typedef struct {
    const char *id;
    int64_t received_at;
    const char *case_id;
    const char *sender;
    int kind;
    const uint8_t *envelope;
    size_t envelope_len;
    int spooled;
} ml_inbox_row_t;

/* Row callbacks return 0 to go on or non-zero to stop (that value is then
 * returned by the walking function). */
typedef int (*ml_outbox_row_cb)(const ml_outbox_row_t *row, void *arg);
typedef int (*ml_inbox_row_cb)(const ml_inbox_row_t *row, void *arg);

/* Opens (creating if needed) the database at path and its schema. Returns
 * 0, or ML_ESTORE with a sentence in err. */
int ml_astore_open(const char *path, ml_astore_t **out, char *err, size_t errlen);
/* Closes the database; safe on NULL and twice; clears *self_p. An open
 * transaction is rolled back. */
void ml_astore_destroy(ml_astore_t **self_p);
/* The last SQLite error message (borrowed, never NULL). */
const char *ml_astore_errmsg(const ml_astore_t *st);

/* Transactions. begin/commit return 0 or ML_ESTORE; a failed commit leaves
 * no transaction open (it is rolled back). rollback is safe without one. */
int ml_astore_begin(ml_astore_t *st);
int ml_astore_commit(ml_astore_t *st);
void ml_astore_rollback(ml_astore_t *st);

/* Adds a pending outbox row. Returns 0, ML_EDUP when id is already in the
 * outbox, or ML_ESTORE. O(log N). */
int ml_astore_outbox_add(ml_astore_t *st, const char *id, const char *file_name,
                         const uint8_t *envelope, size_t len, int64_t now_ms);
/* Sets the state (and reason, may be NULL) of the row with this id, but only
 * while it is still pending: a second Accepted for a settled row changes
 * nothing. Returns 1 when the row changed, 0 when it was already settled,
 * ML_ENOTFOUND when there is no such id, ML_ESTORE on failure. */
int ml_astore_outbox_settle(ml_astore_t *st, const char *id, int state, const char *reason,
                            int64_t now_ms);
/* Calls cb with the row for id. Returns cb's value, ML_ENOTFOUND or
 * ML_ESTORE. */
int ml_astore_outbox_get(ml_astore_t *st, const char *id, ml_outbox_row_cb cb, void *arg);
/* Calls cb with the newest row whose file_name is name. Same returns. */
int ml_astore_outbox_by_file(ml_astore_t *st, const char *name, ml_outbox_row_cb cb, void *arg);
/* Walks pending rows with seq > after_seq in seq order, at most limit of
 * them. Returns 0, cb's non-zero value, or ML_ESTORE. */
int ml_astore_outbox_pending(ml_astore_t *st, int64_t after_seq, int64_t limit, ml_outbox_row_cb cb,
                             void *arg);
/* Number of outbox rows in state (or all rows for state < 0). */
int ml_astore_outbox_count(ml_astore_t *st, int state, int64_t *n);

/* INSERT OR IGNORE into the inbox. Returns 1 when inserted, 0 when the id
 * was already there (a redelivery), ML_ESTORE on failure. */
int ml_astore_inbox_add(ml_astore_t *st, const char *id, int64_t received_at, const char *case_id,
                        const char *sender, int kind, const uint8_t *envelope, size_t len);
/* Marks the row spooled (its inbox/<id>.json is written). Returns 0,
 * ML_ENOTFOUND or ML_ESTORE. */
int ml_astore_inbox_set_spooled(ml_astore_t *st, const char *id);
/* Walks rows with spooled = 0, oldest first. Returns 0, cb's value or
 * ML_ESTORE. */
int ml_astore_inbox_unspooled(ml_astore_t *st, ml_inbox_row_cb cb, void *arg);
/* Calls cb with the inbox row for id. Returns cb's value, ML_ENOTFOUND or
 * ML_ESTORE. */
int ml_astore_inbox_get(ml_astore_t *st, const char *id, ml_inbox_row_cb cb, void *arg);
/* Number of inbox rows. */
int ml_astore_inbox_count(ml_astore_t *st, int64_t *n);

#endif
