/* The agent's durable store: one SQLite file (WAL, synchronous=FULL) with
 * the outbox (messages this node sends, until the broker accepts or refuses
 * them, imaging chunks among them as references to blob files) and the
 * inbox (messages delivered to this node, deduplicated by message id). A commit returns only once
 * the data is on disk, which is what lets the agent answer Ack and the spool move files.
 *
 * Opened with a keyring (store_key), every stored envelope is sealed with
 * AES-256-GCM (ml_crypt.h) under the message id as associated data, and so
 * is an outbox row's refusal reason (under "outbox.reason:<id>": it may
 * quote a peer's free text); both are opened again as they are read, so
 * callers see plaintext either way. Values
 * stored in clear before a key was configured, or sealed under an older
 * key, are re-sealed under the current key when the store is opened, so
 * that turning encryption on or rotating the key loses nothing and leaves
 * nothing behind in clear.
 *
 * Transactions are explicit (ml_astore_begin/commit) so that callers group
 * a whole batch (one outbox scan, one loop iteration of deliveries) into
 * one fsync. Loop thread only; not thread-safe. */
#ifndef ML_ASTORE_H
#define ML_ASTORE_H

#include <stddef.h>
#include <stdint.h>

#include "ml_crypt.h"

typedef struct ml_astore ml_astore_t;

/* Outbox row states (stored as integers; do not renumber). */
enum { ML_OUTBOX_PENDING = 0, ML_OUTBOX_ACCEPTED = 1, ML_OUTBOX_REJECTED = 2 };

/* The two streams the agent sends from, each in seq order: ordinary
 * messages (first, they are small and may be urgent) and imaging chunks
 * (bulk, bounded by bytes in flight). */
enum { ML_OUTBOX_MESSAGES = 0, ML_OUTBOX_CHUNKS = 1 };

/* One outbox row; every pointer is borrowed for the duration of a callback.
 * A chunk row (blob_path not "") holds in envelope an ImagingChunk envelope
 * without data and sha256; its data are blob_len bytes at blob_off of the
 * file data_dir/blob_path. */
typedef struct {
    int64_t seq;
    const char *id;
    const char *file_name; /* "" for rows without a spool file */
    const uint8_t *envelope;
    size_t envelope_len;
    int state;
    const char *reason; /* "" when none */
    int64_t created_at;
    int64_t updated_at;
    const char *case_id;   /* "" when not recorded */
    const char *blob_path; /* "" for an ordinary message */
    uint64_t blob_off;
    size_t blob_len;
    const char *hold_for; /* "" when the row does not wait for another */
    int held;             /* 1 while it waits for hold_for's Accepted */
} ml_outbox_row_t;

/* A row to insert (ml_astore_outbox_insert). NULL or "" for what is absent.
 * A row with hold_for is kept back (held) until the row with that id is
 * Accepted, and refused with it if it is refused. */
typedef struct {
    const char *id;
    const char *file_name;
    const char *case_id;
    const uint8_t *envelope;
    size_t envelope_len;
    const char *blob_path;
    uint64_t blob_off;
    size_t blob_len;
    const char *hold_for;
} ml_outbox_new_t;

/* The chunk rows of one case. */
typedef struct {
    int64_t chunks;          /* rows, resends included */
    uint64_t bytes;          /* their data bytes */
    int64_t accepted;        /* rows the broker Accepted */
    uint64_t accepted_bytes; /* and their data bytes */
    int64_t refused;         /* rows refused or dropped */
} ml_outbox_case_stats_t;

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

/* Opens (creating if needed) the database at path and its schema, storing
 * everything in clear. A database that holds sealed values (opened with a
 * key before) is refused: without the key it cannot be read. Returns 0, or
 * ML_ESTORE / ML_ECONFIG with a sentence in err. */
int ml_astore_open(const char *path, ml_astore_t **out, char *err, size_t errlen);
/* Like ml_astore_open, but with keys (borrowed; must outlive the store; NULL
 * is ml_astore_open) every envelope is sealed as it is written. The first
 * open under a new current key re-seals what is stored in clear or under an
 * older key, in batches of one transaction each (O(stored bytes), once per
 * key), then truncates the WAL; it sets PRAGMA secure_delete so that
 * overwritten values do not linger in free pages. A value sealed under a key
 * the keyring lacks, or one that does not authenticate, is refused with err
 * naming the row and the key id. Returns 0, ML_ESTORE or ML_ECONFIG. */
int ml_astore_open_sealed(const char *path, const ml_keyring_t *keys, ml_astore_t **out, char *err,
                          size_t errlen);
/* The keyring the store seals with (borrowed), or NULL. */
const ml_keyring_t *ml_astore_keys(const ml_astore_t *st);
/* Closes the database; safe on NULL and twice; clears *self_p. An open
 * transaction is rolled back. */
void ml_astore_destroy(ml_astore_t **self_p);
/* The last SQLite error message (borrowed, never NULL). */
const char *ml_astore_errmsg(const ml_astore_t *st);
/* The connection, for modules that keep tables of their own in agent.db
 * and take part in its transactions (istore). Borrowed. */
struct sqlite3;
struct sqlite3 *ml_astore_db(ml_astore_t *st);

/* ---- sealing, for modules with tables of their own in agent.db ---- */

struct sqlite3_stmt;
/* Binds len bytes at v to parameter i of s: sealed under the current key
 * with aad (a BLOB) when the store has keys, else as TEXT (as_text) or a
 * BLOB. A sealed copy belongs to SQLite, which frees it when the binding
 * is cleared. Returns 0, ML_ENOMEM or ML_ETLS. */
int ml_astore_bind(ml_astore_t *st, struct sqlite3_stmt *s, int i, const void *v, size_t len,
                   int as_text, const char *aad);
/* Reads column col of s's current row: a sealed BLOB is opened with aad
 * into *owned (malloc'd, the caller frees it; NUL-terminated) and *v points
 * at it; anything else is returned as stored (*owned NULL, *v borrowed
 * until the next step, "" for NULL). A value that does not open is logged
 * with what names it (aad) and refused: ML_ENOTFOUND (a key the keyring
 * lacks, or no keyring), ML_EPROTO (damaged or moved), ML_ENOMEM. */
int ml_astore_column(ml_astore_t *st, struct sqlite3_stmt *s, int col, const char *aad,
                     const uint8_t **v, size_t *len, uint8_t **owned);
/* Writes the associated data of a sealed column into out: prefix (for
 * example "img_in.reason:") then key, then "/sub" when sub >= 0. Returns
 * out. */
char *ml_astore_aad(char *out, size_t cap, const char *prefix, const char *key, int64_t sub);

/* One column to re-seal (ml_astore_reseal). select has ?1 (TEXT key), ?2
 * (INTEGER sub-key) and ?3 (a limit), and returns (key, sub, value) for
 * the rows after (?1, ?2) in key order; update sets the value ?1 of the row
 * (?2, ?3). The associated data is ml_astore_aad(prefix, key, sub), or key
 * alone when prefix is NULL (sub is then ignored). */
typedef struct {
    const char *what; /* "outbox envelope", for messages */
    const char *select;
    const char *update;
    const char *prefix;
    int has_sub; /* the sub-key is part of the associated data */
} ml_astore_reseal_t;
/* Re-seals, under the current key, every value of the n columns that is in
 * clear or sealed under another key, unless part (a name of the caller's)
 * was already done under this key; then records it. No-op without keys.
 * Returns 0, ML_ESTORE, ML_ENOTFOUND or ML_EPROTO (err names the row and,
 * for an unknown key, its id). */
int ml_astore_reseal(ml_astore_t *st, const char *part, const ml_astore_reseal_t *cols, size_t n,
                     char *err, size_t errlen);

/* Transactions. begin/commit return 0 or ML_ESTORE; a failed commit leaves
 * no transaction open (it is rolled back). rollback is safe without one. */
int ml_astore_begin(ml_astore_t *st);
int ml_astore_commit(ml_astore_t *st);
void ml_astore_rollback(ml_astore_t *st);

/* Adds a pending outbox row. Returns 0, ML_EDUP when id is already in the
 * outbox, or ML_ESTORE. O(log N). */
int ml_astore_outbox_add(ml_astore_t *st, const char *id, const char *file_name,
                         const uint8_t *envelope, size_t len, int64_t now_ms);
/* Adds a pending row with everything ml_outbox_new_t holds. Returns 0,
 * ML_EDUP when the id is already in the outbox, or ML_ESTORE. O(log N). */
int ml_astore_outbox_insert(ml_astore_t *st, const ml_outbox_new_t *r, int64_t now_ms);
/* Sets the state (and reason, may be NULL) of the row with this id, but only
 * while it is still pending: a second Accepted for a settled row changes
 * nothing. Rows held for it are released (Accepted) or refused with a reason
 * naming it (refused), in the same transaction. Returns 1 when the row
 * changed, 0 when it was already settled, ML_ENOTFOUND when there is no such
 * id, ML_ESTORE on failure. O(log N + rows held for it). */
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
/* Walks the rows of one send stream (ML_OUTBOX_MESSAGES or _CHUNKS) that
 * are pending and not held, with seq > after_seq, in seq order, at most
 * limit. Returns 0, cb's non-zero value, or ML_ESTORE. O(log N + limit). */
int ml_astore_outbox_next(ml_astore_t *st, int stream, int64_t after_seq, int64_t limit,
                          ml_outbox_row_cb cb, void *arg);
/* Number of outbox rows in state (or all rows for state < 0). */
int ml_astore_outbox_count(ml_astore_t *st, int state, int64_t *n);
/* Counts of the chunk rows of case_id. Returns 0 or ML_ESTORE. O(chunks of
 * the case). */
int ml_astore_outbox_case_stats(ml_astore_t *st, const char *case_id, ml_outbox_case_stats_t *out);
/* Calls cb with the first pending chunk row of case_id (held or not).
 * Returns cb's value, ML_ENOTFOUND or ML_ESTORE. */
int ml_astore_outbox_case_first(ml_astore_t *st, const char *case_id, ml_outbox_row_cb cb,
                                void *arg);
/* Calls cb with the blob_off of every pending chunk row (queued or in
 * flight, held or not) of case_id whose blob is blob_path: the chunks of
 * that object a resend must not queue twice. Returns 0 or ML_ESTORE.
 * O(chunk rows of the case). */
int ml_astore_outbox_case_pending_offsets(ml_astore_t *st, const char *case_id,
                                          const char *blob_path,
                                          void (*cb)(uint64_t blob_off, void *arg), void *arg);
/* Refuses every pending chunk row of case_id with reason (the case is
 * over: reported, cancelled, refused). Returns the number of rows changed
 * or ML_ESTORE. */
int ml_astore_outbox_case_drop(ml_astore_t *st, const char *case_id, const char *reason,
                               int64_t now_ms);

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

/* Retention: deletes at most limit settled outbox rows (accepted or
 * rejected, updated_at <= before_ms) and at most limit inbox rows already
 * written to inbox/ (received_at <= before_ms), in one transaction, then
 * runs one bounded incremental vacuum step when the file allows it.
 * Pending rows and unspooled inbox rows are never touched. Counts go to
 * *outbox_n / *inbox_n (may be NULL). Not inside another transaction.
 * O(limit log n). Returns 0 or ML_ESTORE. */
int ml_astore_prune(ml_astore_t *st, int64_t before_ms, int64_t limit, int64_t *outbox_n,
                    int64_t *inbox_n);

#endif
