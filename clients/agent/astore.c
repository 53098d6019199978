/* SQLite implementation of the agent's outbox and inbox. Statements are
 * prepared once at open; every SQLITE_* result is turned into an ML_E* code
 * here, and sqlite3_errmsg is kept available for the caller's log line.
 * With a keyring, envelopes are sealed on their way in and opened on their
 * way out (ml_crypt.h), so the modules above never see a sealed value. */
#include "astore.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <sqlite3.h>

#include "ml_common.h"

enum {
    S_BEGIN,
    S_COMMIT,
    S_ROLLBACK,
    S_OUT_ADD,
    S_OUT_SETTLE,
    S_OUT_GET,
    S_OUT_BY_FILE,
    S_OUT_PENDING,
    S_OUT_COUNT,
    S_OUT_COUNT_ALL,
    S_IN_ADD,
    S_IN_SPOOLED,
    S_IN_UNSPOOLED,
    S_IN_GET,
    S_IN_COUNT,
    S_OUT_INSERT,
    S_OUT_NEXT_MSG,
    S_OUT_NEXT_CHUNK,
    S_OUT_RELEASE,
    S_OUT_CASCADE,
    S_OUT_CASE_STATS,
    S_OUT_CASE_FIRST,
    S_OUT_CASE_DROP,
    S_OUT_HELD_IDS,
    S_OUT_CASE_IDS,
    S_OUT_DROP_ONE,
    S_NSTMT
};

#define S_OUT_COLS                                                                                 \
    "seq, id, file_name, envelope, state, coalesce(reason, ''), created_at, updated_at, "          \
    "coalesce(case_id, ''), coalesce(blob_path, ''), coalesce(blob_off, 0), "                      \
    "coalesce(blob_len, 0), coalesce(hold_for, ''), held"
#define S_IN_COLS "id, received_at, case_id, sender, kind, envelope, spooled"

/* A refusal reason may quote a peer's free text (an ImagingUpdate's
 * reason), so with keys it is sealed like the envelope, under its row's
 * id: "outbox.reason:<id>". */
#define S_P_REASON "outbox.reason:"

static const char *const s_sql[S_NSTMT] = {
    [S_BEGIN] = "BEGIN IMMEDIATE",
    [S_COMMIT] = "COMMIT",
    [S_ROLLBACK] = "ROLLBACK",
    [S_OUT_ADD] = "INSERT INTO outbox (id, file_name, envelope, state, created_at, updated_at) "
                  "VALUES (?1, ?2, ?3, 0, ?4, ?4)",
    [S_OUT_SETTLE] = "UPDATE outbox SET state = ?2, reason = ?3, updated_at = ?4 "
                     "WHERE id = ?1 AND state = 0",
    [S_OUT_GET] = "SELECT " S_OUT_COLS " FROM outbox WHERE id = ?1",
    [S_OUT_BY_FILE] = "SELECT " S_OUT_COLS " FROM outbox WHERE file_name = ?1 "
                      "ORDER BY seq DESC LIMIT 1",
    [S_OUT_PENDING] = "SELECT " S_OUT_COLS " FROM outbox WHERE state = 0 AND seq > ?1 "
                      "ORDER BY seq LIMIT ?2",
    [S_OUT_COUNT] = "SELECT count(*) FROM outbox WHERE state = ?1",
    [S_OUT_COUNT_ALL] = "SELECT count(*) FROM outbox",
    [S_IN_ADD] = "INSERT OR IGNORE INTO inbox (id, received_at, case_id, sender, kind, envelope, "
                 "spooled) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)",
    [S_IN_SPOOLED] = "UPDATE inbox SET spooled = 1 WHERE id = ?1",
    [S_IN_UNSPOOLED] = "SELECT " S_IN_COLS " FROM inbox WHERE spooled = 0 ORDER BY received_at",
    [S_IN_GET] = "SELECT " S_IN_COLS " FROM inbox WHERE id = ?1",
    [S_IN_COUNT] = "SELECT count(*) FROM inbox",
    [S_OUT_INSERT] = "INSERT INTO outbox (id, file_name, envelope, state, created_at, updated_at, "
                     "case_id, blob_path, blob_off, blob_len, hold_for, held) "
                     "VALUES (?1, ?2, ?3, 0, ?4, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    [S_OUT_NEXT_MSG] = "SELECT " S_OUT_COLS " FROM outbox WHERE state = 0 AND held = 0 AND "
                       "blob_path IS NULL AND seq > ?1 ORDER BY seq LIMIT ?2",
    [S_OUT_NEXT_CHUNK] = "SELECT " S_OUT_COLS " FROM outbox WHERE state = 0 AND held = 0 AND "
                         "blob_path IS NOT NULL AND seq > ?1 ORDER BY seq LIMIT ?2",
    [S_OUT_RELEASE] = "UPDATE outbox SET held = 0 WHERE held = 1 AND hold_for = ?1",
    [S_OUT_CASCADE] = "UPDATE outbox SET state = 2, held = 0, reason = ?2, updated_at = ?3 "
                      "WHERE held = 1 AND hold_for = ?1 AND state = 0",
    [S_OUT_CASE_STATS] =
        "SELECT count(*), coalesce(sum(blob_len), 0), coalesce(sum(state = 1), 0), "
        "coalesce(sum(CASE WHEN state = 1 THEN blob_len ELSE 0 END), 0), "
        "coalesce(sum(state = 2), 0) FROM outbox WHERE case_id = ?1 AND blob_path IS NOT NULL",
    [S_OUT_CASE_FIRST] = "SELECT " S_OUT_COLS " FROM outbox WHERE case_id = ?1 AND blob_path IS "
                         "NOT NULL AND state = 0 ORDER BY seq LIMIT 1",
    [S_OUT_CASE_DROP] = "UPDATE outbox SET state = 2, held = 0, reason = ?2, updated_at = ?3 "
                        "WHERE case_id = ?1 AND blob_path IS NOT NULL AND state = 0",
    /* With keys every refused row gets its own sealed reason: the rows
     * S_OUT_CASCADE and S_OUT_CASE_DROP would change, one by one. */
    [S_OUT_HELD_IDS] = "SELECT id FROM outbox WHERE held = 1 AND hold_for = ?1 AND state = 0",
    [S_OUT_CASE_IDS] = "SELECT id FROM outbox WHERE case_id = ?1 AND blob_path IS NOT NULL AND "
                       "state = 0",
    [S_OUT_DROP_ONE] = "UPDATE outbox SET state = 2, held = 0, reason = ?2, updated_at = ?3 "
                       "WHERE id = ?1 AND state = 0",
};

/* The schema (version 1). An outbox row is either an ordinary message
 * (blob_path NULL: the envelope is complete) or an imaging chunk (blob_path
 * names a file under data_dir and the envelope is the ImagingChunk without
 * its data and digest, filled in from blob_off/blob_len at send time, so
 * the bytes are on disk once, not twice). held = 1 keeps a row back until
 * the row hold_for names is Accepted (the chunks wait for their consult).
 * The partial indexes keep both send streams O(log N + window) even with
 * years of settled rows in the table. */
#define S_SCHEMA_VERSION 1
/* Version 2 is version 1 whose values may be sealed: an agent without the
 * key, or one from before sealing existed, must not open it (it would take
 * sealed bytes for envelopes), and SQLite's user_version is what every
 * version of the agent checks. A store opened with a key is raised to 2. */
#define S_SCHEMA_SEALED 2
static const char s_schema[] = "CREATE TABLE IF NOT EXISTS outbox ("
                               " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                               " id TEXT UNIQUE NOT NULL,"
                               " file_name TEXT,"
                               " envelope BLOB NOT NULL,"
                               " state INTEGER NOT NULL DEFAULT 0,"
                               " reason TEXT,"
                               " created_at INTEGER NOT NULL,"
                               " updated_at INTEGER NOT NULL,"
                               " case_id TEXT,"
                               " blob_path TEXT,"
                               " blob_off INTEGER,"
                               " blob_len INTEGER,"
                               " hold_for TEXT,"
                               " held INTEGER NOT NULL DEFAULT 0);"
                               "CREATE TABLE IF NOT EXISTS inbox ("
                               " id TEXT PRIMARY KEY,"
                               " received_at INTEGER NOT NULL,"
                               " case_id TEXT,"
                               " sender TEXT,"
                               " kind INTEGER,"
                               " envelope BLOB NOT NULL,"
                               " spooled INTEGER NOT NULL DEFAULT 0);";

/* Version 0 (before imaging) had the first eight outbox columns only. */
static const char s_migrate_v1[] = "ALTER TABLE outbox ADD COLUMN case_id TEXT;"
                                   "ALTER TABLE outbox ADD COLUMN blob_path TEXT;"
                                   "ALTER TABLE outbox ADD COLUMN blob_off INTEGER;"
                                   "ALTER TABLE outbox ADD COLUMN blob_len INTEGER;"
                                   "ALTER TABLE outbox ADD COLUMN hold_for TEXT;"
                                   "ALTER TABLE outbox ADD COLUMN held INTEGER NOT NULL DEFAULT 0;";

/* Which parts of agent.db have been re-sealed under which key
 * (ml_astore_reseal), so that the pass runs once per key, not per start. */
static const char s_keys_table[] = "CREATE TABLE IF NOT EXISTS store_keys ("
                                   " part TEXT PRIMARY KEY,"
                                   " key_id TEXT NOT NULL);";

static const char s_indexes[] =
    "CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(state, seq);"
    "CREATE INDEX IF NOT EXISTS outbox_file ON outbox(file_name);"
    "CREATE INDEX IF NOT EXISTS outbox_msgs ON outbox(seq) "
    " WHERE state = 0 AND held = 0 AND blob_path IS NULL;"
    "CREATE INDEX IF NOT EXISTS outbox_chunks ON outbox(seq) "
    " WHERE state = 0 AND held = 0 AND blob_path IS NOT NULL;"
    "CREATE INDEX IF NOT EXISTS outbox_hold ON outbox(hold_for) WHERE held = 1;"
    "CREATE INDEX IF NOT EXISTS outbox_case ON outbox(case_id) WHERE blob_path IS NOT NULL;"
    "CREATE INDEX IF NOT EXISTS inbox_unspooled ON inbox(spooled) WHERE spooled = 0;";

#define S_LOG "astore"
/* Re-sealing takes rows in batches of at most this many rows or bytes, one
 * transaction each, so that memory stays bounded whatever the history. */
#define S_RESEAL_ROWS 256
#define S_RESEAL_BYTES (8u * 1024 * 1024)
#define S_AAD_MAX 512

struct ml_astore {
    sqlite3 *db;
    sqlite3_stmt *stmt[S_NSTMT];
    int in_tx;
    const ml_keyring_t *keys; /* borrowed; NULL: values in clear */
    /* Why the last call failed when it was not SQLite's doing (a value
     * that does not open); cleared by the next call that reads values. */
    char err[300];
};

const char *ml_astore_errmsg(const ml_astore_t *st)
{
    if (st && st->err[0])
        return st->err;
    return st && st->db ? sqlite3_errmsg(st->db) : "no database";
}

const ml_keyring_t *ml_astore_keys(const ml_astore_t *st)
{
    return st->keys;
}

char *ml_astore_aad(char *out, size_t cap, const char *prefix, const char *key, int64_t sub)
{
    if (sub >= 0)
        snprintf(out, cap, "%s%s/%lld", prefix ? prefix : "", key ? key : "", (long long)sub);
    else
        snprintf(out, cap, "%s%s", prefix ? prefix : "", key ? key : "");
    return out;
}

int ml_astore_bind(ml_astore_t *st, sqlite3_stmt *s, int i, const void *v, size_t len, int as_text,
                   const char *aad)
{
    if (!st->keys) {
        if (as_text)
            sqlite3_bind_text64(s, i, v, len, SQLITE_STATIC, SQLITE_UTF8);
        else
            sqlite3_bind_blob64(s, i, v ? v : "", len, SQLITE_STATIC);
        return 0;
    }
    uint8_t *sealed = NULL;
    size_t n = 0;
    int rc = ml_seal(st->keys, v, len, (const uint8_t *)aad, strlen(aad), &sealed, &n);
    if (rc < 0) {
        snprintf(st->err, sizeof st->err, "cannot seal %s: %s", aad, ml_strerror(rc));
        return rc;
    }
    /* SQLite owns the copy from here, and frees it even if binding fails. */
    sqlite3_bind_blob64(s, i, sealed, n, free);
    return 0;
}

/* ml_astore_column; logs a value that does not open when log is set (the
 * re-sealing at open reports it through err instead). */
static int s_column(ml_astore_t *st, sqlite3_stmt *s, int col, const char *aad, const uint8_t **v,
                    size_t *len, uint8_t **owned, int log)
{
    *owned = NULL;
    int type = sqlite3_column_type(s, col);
    const uint8_t *d = type == SQLITE_BLOB ? sqlite3_column_blob(s, col)
                                           : (const uint8_t *)sqlite3_column_text(s, col);
    size_t n = (size_t)sqlite3_column_bytes(s, col);
    if (!d) {
        d = (const uint8_t *)"";
        n = 0;
    }
    /* Only a BLOB can be sealed: text stored in clear that happens to
     * start with the magic is still text. */
    if (type != SQLITE_BLOB || !ml_is_sealed(d, n)) {
        *v = d;
        *len = n;
        return 0;
    }
    int rc = st->keys ? ml_open(st->keys, d, n, (const uint8_t *)aad, strlen(aad), owned, len)
                      : ML_ENOTFOUND;
    if (rc == 0) {
        *v = *owned;
        return 0;
    }
    char id[17] = "";
    ml_sealed_key_id(d, n, id);
    if (rc == ML_ENOTFOUND)
        snprintf(st->err, sizeof st->err,
                 "%s is sealed under key %s, which is neither store_key nor in store_old_keys", aad,
                 id);
    else if (rc == ML_EPROTO)
        snprintf(st->err, sizeof st->err,
                 "%s does not authenticate under key %s: damaged, or moved from another row", aad,
                 id);
    else
        snprintf(st->err, sizeof st->err, "cannot open %s: %s", aad, ml_strerror(rc));
    if (log)
        ml_log(ML_LOG_ERROR, S_LOG, "%s", st->err);
    return rc;
}

int ml_astore_column(ml_astore_t *st, sqlite3_stmt *s, int col, const char *aad, const uint8_t **v,
                     size_t *len, uint8_t **owned)
{
    return s_column(st, s, col, aad, v, len, owned, 1);
}

/* Brings an older database up to S_SCHEMA_VERSION (S_SCHEMA_SEALED with
 * keys) in one transaction, and refuses one written by a newer agent, or a
 * sealed one without keys. Returns an SQLITE_* code (*msg set for errors of
 * our own). */
static int s_migrate(ml_astore_t *st, char **msg)
{
    sqlite3_stmt *s = NULL;
    int version = 0;
    int rc = sqlite3_prepare_v2(st->db, "PRAGMA user_version", -1, &s, NULL);
    if (rc != SQLITE_OK)
        return rc;
    if (sqlite3_step(s) == SQLITE_ROW)
        version = sqlite3_column_int(s, 0);
    sqlite3_finalize(s);
    if (version > S_SCHEMA_SEALED) {
        *msg = sqlite3_mprintf("schema version %d is newer than this agent's (%d)", version,
                               S_SCHEMA_SEALED);
        return SQLITE_ERROR;
    }
    if (version == S_SCHEMA_SEALED && !st->keys) {
        *msg = sqlite3_mprintf("it holds sealed payloads (it was opened with store_key before); "
                               "without the key it cannot be read: set store_key (and "
                               "store_old_keys) in [agent]");
        return SQLITE_ERROR;
    }
    int want = st->keys ? S_SCHEMA_SEALED : S_SCHEMA_VERSION;
    if (version == want)
        return SQLITE_OK;
    /* A table created just now by s_schema has the columns already; one
     * from version 0 lacks them. */
    int has =
        sqlite3_prepare_v2(st->db, "SELECT held FROM outbox LIMIT 0", -1, &s, NULL) == SQLITE_OK;
    sqlite3_finalize(s);
    if ((rc = sqlite3_exec(st->db, "BEGIN IMMEDIATE", NULL, NULL, msg)) != SQLITE_OK)
        return rc;
    if (!has && (rc = sqlite3_exec(st->db, s_migrate_v1, NULL, NULL, msg)) != SQLITE_OK)
        goto failed;
    char sql[64];
    snprintf(sql, sizeof sql, "PRAGMA user_version = %d", want);
    if ((rc = sqlite3_exec(st->db, sql, NULL, NULL, msg)) != SQLITE_OK)
        goto failed;
    return sqlite3_exec(st->db, "COMMIT", NULL, NULL, msg);
failed:
    sqlite3_exec(st->db, "ROLLBACK", NULL, NULL, NULL);
    return rc;
}

struct sqlite3 *ml_astore_db(ml_astore_t *st)
{
    return st->db;
}

int ml_astore_open(const char *path, ml_astore_t **out, char *err, size_t errlen)
{
    return ml_astore_open_sealed(path, NULL, out, err, errlen);
}

/* The envelope columns of agent.db, with the message id as associated
 * data. */
static const ml_astore_reseal_t s_reseal[] = {
    {"outbox envelope", "SELECT id, 0, envelope FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?3",
     "UPDATE outbox SET envelope = ?1 WHERE id = ?2", NULL, 0},
    {"outbox reason", "SELECT id, 0, reason FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?3",
     "UPDATE outbox SET reason = ?1 WHERE id = ?2", S_P_REASON, 0},
    {"inbox envelope", "SELECT id, 0, envelope FROM inbox WHERE id > ?1 ORDER BY id LIMIT ?3",
     "UPDATE inbox SET envelope = ?1 WHERE id = ?2", NULL, 0},
};

int ml_astore_open_sealed(const char *path, const ml_keyring_t *keys, ml_astore_t **out, char *err,
                          size_t errlen)
{
    int rc = ML_ESTORE;
    char *msg = NULL;
    ml_astore_t *st = calloc(1, sizeof *st);
    if (!st) {
        snprintf(err, errlen, "%s: out of memory", path);
        return ML_ENOMEM;
    }
    st->keys = keys;
    if (sqlite3_open_v2(path, &st->db,
                        SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                        NULL) != SQLITE_OK) {
        snprintf(err, errlen, "%s: cannot open database: %s", path, ml_astore_errmsg(st));
        goto out;
    }
    /* WAL keeps readers off the writer's back; synchronous=FULL makes every
     * commit durable before we Ack or move a file, which is the whole point
     * of the store. busy_timeout covers an operator's sqlite3 shell.
     * auto_vacuum only takes on a new file (before its first table): it
     * lets retention give pages back (ml_astore_prune). */
    if (sqlite3_exec(st->db,
                     "PRAGMA auto_vacuum=INCREMENTAL; PRAGMA journal_mode=WAL;"
                     " PRAGMA synchronous=FULL;"
                     "PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;",
                     NULL, NULL, &msg) != SQLITE_OK ||
        sqlite3_exec(st->db, s_schema, NULL, NULL, &msg) != SQLITE_OK ||
        s_migrate(st, &msg) != SQLITE_OK ||
        sqlite3_exec(st->db, s_indexes, NULL, NULL, &msg) != SQLITE_OK) {
        snprintf(err, errlen, "%s: cannot set up database: %s", path,
                 msg ? msg : ml_astore_errmsg(st));
        goto out;
    }
    /* secure_delete: what a re-sealed or deleted value leaves behind is
     * overwritten with zeros rather than left in a free page. */
    if (keys && (sqlite3_exec(st->db, "PRAGMA secure_delete=ON", NULL, NULL, &msg) != SQLITE_OK ||
                 sqlite3_exec(st->db, s_keys_table, NULL, NULL, &msg) != SQLITE_OK)) {
        snprintf(err, errlen, "%s: cannot set up database: %s", path,
                 msg ? msg : ml_astore_errmsg(st));
        goto out;
    }
    for (int i = 0; i < S_NSTMT; i++) {
        if (sqlite3_prepare_v3(st->db, s_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &st->stmt[i],
                               NULL) != SQLITE_OK) {
            snprintf(err, errlen, "%s: cannot prepare statement: %s", path, ml_astore_errmsg(st));
            goto out;
        }
    }
    char rerr[512];
    if ((rc = ml_astore_reseal(st, "messages", s_reseal, sizeof s_reseal / sizeof s_reseal[0], rerr,
                               sizeof rerr)) < 0) {
        snprintf(err, errlen, "%s: %s", path, rerr);
        rc = rc == ML_ESTORE ? ML_ESTORE : ML_ECONFIG;
        goto out;
    }
    *out = st;
    st = NULL;
    rc = 0;
out:
    sqlite3_free(msg);
    ml_astore_destroy(&st);
    return rc;
}

/* One value waiting to be written back by s_reseal_batch. */
typedef struct {
    char *key;
    int64_t sub;
    uint8_t *sealed;
    size_t len;
} s_reseal_row_t;

/* Reads one batch of column c after the cursor (key, sub) and seals what
 * needs it, then writes those values back; all in the caller's
 * transaction. *seen is the number of rows read (0: the column is done),
 * *changed grows by the values re-sealed. */
static int s_reseal_batch(ml_astore_t *st, const ml_astore_reseal_t *c, sqlite3_stmt *sel,
                          sqlite3_stmt *upd, char **key, int64_t *sub, size_t *seen,
                          int64_t *changed, char *err, size_t errlen)
{
    s_reseal_row_t rows[S_RESEAL_ROWS];
    size_t n = 0, bytes = 0;
    int rc = 0, step = SQLITE_DONE;
    *seen = 0;
    sqlite3_bind_text(sel, 1, *key ? *key : "", -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(sel, 2, *sub);
    sqlite3_bind_int64(sel, 3, S_RESEAL_ROWS);
    while (n < S_RESEAL_ROWS && bytes < S_RESEAL_BYTES &&
           (step = sqlite3_step(sel)) == SQLITE_ROW) {
        const char *k = (const char *)sqlite3_column_text(sel, 0);
        int64_t sk = sqlite3_column_int64(sel, 1);
        char *kc = strdup(k ? k : "");
        if (!kc) {
            rc = ML_ENOMEM;
            break;
        }
        free(*key);
        *key = kc;
        *sub = sk;
        (*seen)++;
        int type = sqlite3_column_type(sel, 2);
        if (type == SQLITE_NULL)
            continue;
        const uint8_t *d = type == SQLITE_BLOB ? sqlite3_column_blob(sel, 2)
                                               : (const uint8_t *)sqlite3_column_text(sel, 2);
        size_t dn = (size_t)sqlite3_column_bytes(sel, 2);
        if (type == SQLITE_BLOB && ml_keyring_is_current(st->keys, d, dn))
            continue;
        char aad[S_AAD_MAX];
        if (c->prefix)
            ml_astore_aad(aad, sizeof aad, c->prefix, kc, c->has_sub ? sk : -1);
        else
            ml_astore_aad(aad, sizeof aad, NULL, kc, -1);
        const uint8_t *plain = d ? d : (const uint8_t *)"";
        size_t plen = d ? dn : 0;
        uint8_t *opened = NULL;
        if (type == SQLITE_BLOB && ml_is_sealed(d, dn)) {
            if ((rc = s_column(st, sel, 2, aad, &plain, &plen, &opened, 0)) < 0) {
                ml_seterr(err, errlen, "%s %s", c->what, st->err);
                break;
            }
        }
        uint8_t *sealed = NULL;
        size_t slen = 0;
        rc = ml_seal(st->keys, plain, plen, (const uint8_t *)aad, strlen(aad), &sealed, &slen);
        if (opened) {
            OPENSSL_cleanse(opened, plen);
            free(opened);
        }
        if (rc < 0) {
            ml_seterr(err, errlen, "cannot seal %s %s: %s", c->what, aad, ml_strerror(rc));
            break;
        }
        if (!(rows[n].key = strdup(kc))) {
            free(sealed);
            rc = ML_ENOMEM;
            break;
        }
        rows[n].sub = sk;
        rows[n].sealed = sealed;
        rows[n].len = slen;
        bytes += slen;
        n++;
    }
    if (rc == 0 && n < S_RESEAL_ROWS && bytes < S_RESEAL_BYTES && step != SQLITE_DONE) {
        ml_seterr(err, errlen, "cannot read the %ss: %s", c->what, sqlite3_errmsg(st->db));
        rc = ML_ESTORE;
    }
    sqlite3_reset(sel);
    sqlite3_clear_bindings(sel);
    /* Written after the read is over: changing rows under a running SELECT
     * is not something to rely on. */
    for (size_t i = 0; i < n; i++) {
        if (rc == 0) {
            sqlite3_bind_blob64(upd, 1, rows[i].sealed, rows[i].len, SQLITE_STATIC);
            sqlite3_bind_text(upd, 2, rows[i].key, -1, SQLITE_STATIC);
            if (sqlite3_bind_parameter_count(upd) >= 3)
                sqlite3_bind_int64(upd, 3, rows[i].sub);
            if (sqlite3_step(upd) != SQLITE_DONE) {
                ml_seterr(err, errlen, "cannot re-seal %s %s: %s", c->what, rows[i].key,
                          sqlite3_errmsg(st->db));
                rc = ML_ESTORE;
            } else {
                (*changed)++;
            }
            sqlite3_reset(upd);
            sqlite3_clear_bindings(upd);
        }
        free(rows[i].key);
        free(rows[i].sealed);
    }
    return rc;
}

/* Whether part was re-sealed under the current key already: 1, 0, or
 * ML_ESTORE. */
static int s_resealed(ml_astore_t *st, const char *part, int record)
{
    sqlite3_stmt *s = NULL;
    const char *sql = record ? "INSERT OR REPLACE INTO store_keys (part, key_id) VALUES (?1, ?2)"
                             : "SELECT 1 FROM store_keys WHERE part = ?1 AND key_id = ?2";
    if (sqlite3_prepare_v2(st->db, sql, -1, &s, NULL) != SQLITE_OK)
        return ML_ESTORE;
    sqlite3_bind_text(s, 1, part, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, ml_keyring_current_id(st->keys), -1, SQLITE_STATIC);
    int rc = sqlite3_step(s);
    sqlite3_finalize(s);
    if (rc == SQLITE_ROW)
        return 1;
    return rc == SQLITE_DONE ? 0 : ML_ESTORE;
}

int ml_astore_reseal(ml_astore_t *st, const char *part, const ml_astore_reseal_t *cols, size_t n,
                     char *err, size_t errlen)
{
    if (!st->keys)
        return 0;
    int rc = s_resealed(st, part, 0);
    if (rc != 0) {
        if (rc < 0)
            ml_seterr(err, errlen, "cannot read store_keys: %s", sqlite3_errmsg(st->db));
        return rc < 0 ? rc : 0;
    }
    int64_t changed = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        sqlite3_stmt *sel = NULL, *upd = NULL;
        char *key = NULL;
        int64_t sub = INT64_MIN;
        size_t seen = 1;
        if (sqlite3_prepare_v2(st->db, cols[i].select, -1, &sel, NULL) != SQLITE_OK ||
            sqlite3_prepare_v2(st->db, cols[i].update, -1, &upd, NULL) != SQLITE_OK) {
            ml_seterr(err, errlen, "cannot prepare the re-sealing of %ss: %s", cols[i].what,
                      sqlite3_errmsg(st->db));
            rc = ML_ESTORE;
        }
        while (rc == 0 && seen > 0) {
            if ((rc = ml_astore_begin(st)) < 0) {
                ml_seterr(err, errlen, "cannot begin: %s", sqlite3_errmsg(st->db));
                break;
            }
            rc = s_reseal_batch(st, &cols[i], sel, upd, &key, &sub, &seen, &changed, err, errlen);
            if (rc < 0) {
                ml_astore_rollback(st);
            } else if ((rc = ml_astore_commit(st)) < 0) {
                ml_seterr(err, errlen, "cannot commit re-sealed %ss: %s", cols[i].what,
                          sqlite3_errmsg(st->db));
            }
        }
        free(key);
        sqlite3_finalize(sel);
        sqlite3_finalize(upd);
    }
    if (rc == 0 && s_resealed(st, part, 1) < 0) {
        ml_seterr(err, errlen, "cannot write store_keys: %s", sqlite3_errmsg(st->db));
        rc = ML_ESTORE;
    }
    if (rc == 0 && changed > 0) {
        /* The WAL still holds the pages as they were; empty it. */
        sqlite3_wal_checkpoint_v2(st->db, NULL, SQLITE_CHECKPOINT_TRUNCATE, NULL, NULL);
        ml_log(ML_LOG_INFO, S_LOG, "re-sealed %lld stored value(s) (%s) under key %s",
               (long long)changed, part, ml_keyring_current_id(st->keys));
    }
    return rc;
}

void ml_astore_destroy(ml_astore_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    ml_astore_t *st = *self_p;
    if (st->in_tx)
        ml_astore_rollback(st);
    for (int i = 0; i < S_NSTMT; i++)
        sqlite3_finalize(st->stmt[i]);
    sqlite3_close(st->db);
    free(st);
    *self_p = NULL;
}

/* Runs a statement that returns no rows; resets it for reuse. */
static int s_exec(ml_astore_t *st, sqlite3_stmt *s)
{
    int rc = sqlite3_step(s);
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    return rc == SQLITE_DONE ? 0 : ML_ESTORE;
}

int ml_astore_begin(ml_astore_t *st)
{
    if (st->in_tx)
        return ML_EINVAL;
    int rc = s_exec(st, st->stmt[S_BEGIN]);
    if (rc == 0)
        st->in_tx = 1;
    return rc;
}

int ml_astore_commit(ml_astore_t *st)
{
    if (!st->in_tx)
        return ML_EINVAL;
    int rc = s_exec(st, st->stmt[S_COMMIT]);
    if (rc < 0) {
        /* A failed COMMIT may leave the transaction open (e.g. SQLITE_BUSY);
         * roll back so the caller's view ("nothing was stored") is true. */
        if (!sqlite3_get_autocommit(st->db))
            s_exec(st, st->stmt[S_ROLLBACK]);
    }
    st->in_tx = 0;
    return rc;
}

void ml_astore_rollback(ml_astore_t *st)
{
    if (!sqlite3_get_autocommit(st->db))
        s_exec(st, st->stmt[S_ROLLBACK]);
    st->in_tx = 0;
}

int ml_astore_outbox_add(ml_astore_t *st, const char *id, const char *file_name,
                         const uint8_t *envelope, size_t len, int64_t now_ms)
{
    sqlite3_stmt *s = st->stmt[S_OUT_ADD];
    st->err[0] = '\0';
    sqlite3_bind_text(s, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, file_name, -1, SQLITE_STATIC);
    if (ml_astore_bind(st, s, 3, envelope, len, 0, id) < 0) {
        sqlite3_clear_bindings(s);
        return ML_ESTORE;
    }
    sqlite3_bind_int64(s, 4, now_ms);
    int rc = sqlite3_step(s);
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    if (rc == SQLITE_DONE)
        return 0;
    if (rc == SQLITE_CONSTRAINT)
        return ML_EDUP;
    return ML_ESTORE;
}

/* Binds text, or NULL for a NULL or empty string. */
static void s_bind_opt(sqlite3_stmt *s, int i, const char *v)
{
    if (v && *v)
        sqlite3_bind_text(s, i, v, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(s, i);
}

int ml_astore_outbox_insert(ml_astore_t *st, const ml_outbox_new_t *r, int64_t now_ms)
{
    sqlite3_stmt *s = st->stmt[S_OUT_INSERT];
    st->err[0] = '\0';
    sqlite3_bind_text(s, 1, r->id, -1, SQLITE_STATIC);
    s_bind_opt(s, 2, r->file_name);
    if (ml_astore_bind(st, s, 3, r->envelope, r->envelope_len, 0, r->id) < 0) {
        sqlite3_clear_bindings(s);
        return ML_ESTORE;
    }
    sqlite3_bind_int64(s, 4, now_ms);
    s_bind_opt(s, 5, r->case_id);
    s_bind_opt(s, 6, r->blob_path);
    if (r->blob_path && *r->blob_path) {
        sqlite3_bind_int64(s, 7, (sqlite3_int64)r->blob_off);
        sqlite3_bind_int64(s, 8, (sqlite3_int64)r->blob_len);
    } else {
        sqlite3_bind_null(s, 7);
        sqlite3_bind_null(s, 8);
    }
    s_bind_opt(s, 9, r->hold_for);
    sqlite3_bind_int(s, 10, r->hold_for && *r->hold_for ? 1 : 0);
    int rc = sqlite3_step(s);
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    if (rc == SQLITE_DONE)
        return 0;
    if (rc == SQLITE_CONSTRAINT)
        return ML_EDUP;
    return ML_ESTORE;
}

/* Binds a refusal reason (NULL: SQL NULL) for row id, sealed with keys.
 * Returns 0 or ML_ESTORE (the statement's bindings cleared). */
static int s_bind_reason(ml_astore_t *st, sqlite3_stmt *s, int i, const char *id,
                         const char *reason)
{
    char aad[S_AAD_MAX];
    if (!reason) {
        sqlite3_bind_null(s, i);
        return 0;
    }
    ml_astore_aad(aad, sizeof aad, S_P_REASON, id, -1);
    if (ml_astore_bind(st, s, i, reason, strlen(reason), 1, aad) < 0) {
        sqlite3_clear_bindings(s);
        return ML_ESTORE;
    }
    return 0;
}

/* Refuses with reason every pending row that bulk (?1 = key, ?2 = reason,
 * ?3 = now) would: in one statement in clear; with keys row by row, the
 * ids read first by ids (?1 = key), so that each reason is sealed under its
 * own row. Returns the number of rows changed or ML_ESTORE. O(rows). */
static int s_refuse(ml_astore_t *st, int bulk, int ids, const char *key, const char *reason,
                    int64_t now_ms)
{
    if (!st->keys) {
        sqlite3_stmt *s = st->stmt[bulk];
        sqlite3_bind_text(s, 1, key, -1, SQLITE_STATIC);
        sqlite3_bind_text(s, 2, reason, -1, SQLITE_STATIC);
        sqlite3_bind_int64(s, 3, now_ms);
        if (s_exec(st, s) < 0)
            return ML_ESTORE;
        return sqlite3_changes(st->db);
    }
    char **v = NULL;
    size_t n = 0, cap = 0;
    int rc = 0, step;
    sqlite3_stmt *q = st->stmt[ids];
    sqlite3_bind_text(q, 1, key, -1, SQLITE_STATIC);
    while ((step = sqlite3_step(q)) == SQLITE_ROW) {
        const char *id = (const char *)sqlite3_column_text(q, 0);
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 64;
            char **g = realloc(v, ncap * sizeof *g);
            if (!g) {
                rc = ML_ESTORE;
                break;
            }
            v = g;
            cap = ncap;
        }
        if (!(v[n] = strdup(id ? id : ""))) {
            rc = ML_ESTORE;
            break;
        }
        n++;
    }
    if (rc == 0 && step != SQLITE_DONE)
        rc = ML_ESTORE;
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    int changed = 0;
    sqlite3_stmt *u = st->stmt[S_OUT_DROP_ONE];
    for (size_t i = 0; i < n && rc == 0; i++) {
        sqlite3_bind_text(u, 1, v[i], -1, SQLITE_STATIC);
        if (s_bind_reason(st, u, 2, v[i], reason) < 0) {
            rc = ML_ESTORE;
            break;
        }
        sqlite3_bind_int64(u, 3, now_ms);
        if (s_exec(st, u) < 0)
            rc = ML_ESTORE;
        else
            changed += sqlite3_changes(st->db);
    }
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
    return rc < 0 ? rc : changed;
}

int ml_astore_outbox_settle(ml_astore_t *st, const char *id, int state, const char *reason,
                            int64_t now_ms)
{
    sqlite3_stmt *s = st->stmt[S_OUT_SETTLE];
    st->err[0] = '\0';
    sqlite3_bind_text(s, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_int(s, 2, state);
    if (s_bind_reason(st, s, 3, id, reason) < 0)
        return ML_ESTORE;
    sqlite3_bind_int64(s, 4, now_ms);
    if (s_exec(st, s) < 0)
        return ML_ESTORE;
    if (sqlite3_changes(st->db) > 0) {
        /* Rows waiting for this one go now, or share its fate. */
        if (state == ML_OUTBOX_ACCEPTED) {
            sqlite3_stmt *h = st->stmt[S_OUT_RELEASE];
            sqlite3_bind_text(h, 1, id, -1, SQLITE_STATIC);
            return s_exec(st, h) < 0 ? ML_ESTORE : 1;
        }
        char why[1200];
        snprintf(why, sizeof why, "not sent: message %s, which it waits for, was refused (%s)", id,
                 reason && *reason ? reason : "no reason given");
        return s_refuse(st, S_OUT_CASCADE, S_OUT_HELD_IDS, id, why, now_ms) < 0 ? ML_ESTORE : 1;
    }
    /* Nothing changed: either settled already or unknown. */
    int64_t exists = 0;
    sqlite3_stmt *g = st->stmt[S_OUT_GET];
    sqlite3_bind_text(g, 1, id, -1, SQLITE_STATIC);
    int rc = sqlite3_step(g);
    if (rc == SQLITE_ROW)
        exists = 1;
    sqlite3_reset(g);
    sqlite3_clear_bindings(g);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return ML_ESTORE;
    return exists ? 0 : ML_ENOTFOUND;
}

/* Fills r from the current row; a sealed envelope and reason are opened
 * into *owned and *owned_reason (the caller frees them after the callback,
 * also on failure). Returns 0 or what ml_astore_column returns. */
static int s_outbox_row(ml_astore_t *st, sqlite3_stmt *s, ml_outbox_row_t *r, uint8_t **owned,
                        uint8_t **owned_reason)
{
    r->seq = sqlite3_column_int64(s, 0);
    r->id = (const char *)sqlite3_column_text(s, 1);
    if (!r->id)
        r->id = "";
    int rc = ml_astore_column(st, s, 3, r->id, &r->envelope, &r->envelope_len, owned);
    if (rc < 0)
        return rc;
    r->file_name = (const char *)sqlite3_column_text(s, 2);
    if (!r->file_name)
        r->file_name = "";
    r->state = sqlite3_column_int(s, 4);
    char aad[S_AAD_MAX];
    const uint8_t *reason = NULL;
    size_t rlen = 0;
    ml_astore_aad(aad, sizeof aad, S_P_REASON, r->id, -1);
    if ((rc = ml_astore_column(st, s, 5, aad, &reason, &rlen, owned_reason)) < 0)
        return rc;
    r->reason = (const char *)reason;
    r->created_at = sqlite3_column_int64(s, 6);
    r->updated_at = sqlite3_column_int64(s, 7);
    r->case_id = (const char *)sqlite3_column_text(s, 8);
    r->blob_path = (const char *)sqlite3_column_text(s, 9);
    r->blob_off = (uint64_t)sqlite3_column_int64(s, 10);
    r->blob_len = (size_t)sqlite3_column_int64(s, 11);
    r->hold_for = (const char *)sqlite3_column_text(s, 12);
    r->held = sqlite3_column_int(s, 13);
    if (!r->case_id)
        r->case_id = "";
    if (!r->blob_path)
        r->blob_path = "";
    if (!r->hold_for)
        r->hold_for = "";
    return 0;
}

/* Steps an outbox query, calling cb per row. Returns ML_ENOTFOUND when
 * want_one and no row came. */
static int s_outbox_walk(ml_astore_t *st, sqlite3_stmt *s, int want_one, ml_outbox_row_cb cb,
                         void *arg)
{
    int rc = 0, n = 0, step;
    st->err[0] = '\0';
    while ((step = sqlite3_step(s)) == SQLITE_ROW) {
        ml_outbox_row_t r;
        uint8_t *owned = NULL, *owned_reason = NULL;
        if (s_outbox_row(st, s, &r, &owned, &owned_reason) < 0) {
            /* Logged where it was found; to the caller it is a store
             * that cannot give what it holds. */
            free(owned);
            rc = ML_ESTORE;
            break;
        }
        n++;
        rc = cb(&r, arg);
        if (owned) {
            OPENSSL_cleanse(owned, r.envelope_len);
            free(owned);
        }
        free(owned_reason);
        if (rc != 0)
            break;
    }
    if (rc == 0 && step != SQLITE_DONE && step != SQLITE_ROW)
        rc = ML_ESTORE;
    else if (rc == 0 && want_one && n == 0)
        rc = ML_ENOTFOUND;
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    return rc;
}

int ml_astore_outbox_get(ml_astore_t *st, const char *id, ml_outbox_row_cb cb, void *arg)
{
    sqlite3_stmt *s = st->stmt[S_OUT_GET];
    sqlite3_bind_text(s, 1, id, -1, SQLITE_STATIC);
    return s_outbox_walk(st, s, 1, cb, arg);
}

int ml_astore_outbox_by_file(ml_astore_t *st, const char *name, ml_outbox_row_cb cb, void *arg)
{
    sqlite3_stmt *s = st->stmt[S_OUT_BY_FILE];
    sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
    return s_outbox_walk(st, s, 1, cb, arg);
}

int ml_astore_outbox_pending(ml_astore_t *st, int64_t after_seq, int64_t limit, ml_outbox_row_cb cb,
                             void *arg)
{
    sqlite3_stmt *s = st->stmt[S_OUT_PENDING];
    sqlite3_bind_int64(s, 1, after_seq);
    sqlite3_bind_int64(s, 2, limit);
    return s_outbox_walk(st, s, 0, cb, arg);
}

int ml_astore_outbox_next(ml_astore_t *st, int stream, int64_t after_seq, int64_t limit,
                          ml_outbox_row_cb cb, void *arg)
{
    sqlite3_stmt *s = st->stmt[stream == ML_OUTBOX_CHUNKS ? S_OUT_NEXT_CHUNK : S_OUT_NEXT_MSG];
    sqlite3_bind_int64(s, 1, after_seq);
    sqlite3_bind_int64(s, 2, limit);
    return s_outbox_walk(st, s, 0, cb, arg);
}

int ml_astore_outbox_case_stats(ml_astore_t *st, const char *case_id, ml_outbox_case_stats_t *out)
{
    sqlite3_stmt *s = st->stmt[S_OUT_CASE_STATS];
    memset(out, 0, sizeof *out);
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    int rc = sqlite3_step(s);
    if (rc == SQLITE_ROW) {
        out->chunks = sqlite3_column_int64(s, 0);
        out->bytes = (uint64_t)sqlite3_column_int64(s, 1);
        out->accepted = sqlite3_column_int64(s, 2);
        out->accepted_bytes = (uint64_t)sqlite3_column_int64(s, 3);
        out->refused = sqlite3_column_int64(s, 4);
    }
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    return rc == SQLITE_ROW ? 0 : ML_ESTORE;
}

int ml_astore_outbox_case_first(ml_astore_t *st, const char *case_id, ml_outbox_row_cb cb,
                                void *arg)
{
    sqlite3_stmt *s = st->stmt[S_OUT_CASE_FIRST];
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    return s_outbox_walk(st, s, 1, cb, arg);
}

int ml_astore_outbox_case_pending_offsets(ml_astore_t *st, const char *case_id,
                                          const char *blob_path,
                                          void (*cb)(uint64_t blob_off, void *arg), void *arg)
{
    /* Rare (one call per resend request), so prepared here rather than
     * kept: it reads only clear columns, never an envelope to open. */
    sqlite3_stmt *s = NULL;
    if (sqlite3_prepare_v2(st->db,
                           "SELECT blob_off FROM outbox WHERE case_id = ?1 AND blob_path = ?2 "
                           "AND state = 0",
                           -1, &s, NULL) != SQLITE_OK)
        return ML_ESTORE;
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, blob_path, -1, SQLITE_STATIC);
    int rc;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW)
        cb((uint64_t)sqlite3_column_int64(s, 0), arg);
    sqlite3_finalize(s);
    return rc == SQLITE_DONE ? 0 : ML_ESTORE;
}

int ml_astore_outbox_case_drop(ml_astore_t *st, const char *case_id, const char *reason,
                               int64_t now_ms)
{
    st->err[0] = '\0';
    return s_refuse(st, S_OUT_CASE_DROP, S_OUT_CASE_IDS, case_id, reason, now_ms);
}

static int s_count(ml_astore_t *st, sqlite3_stmt *s, int64_t *n)
{
    int rc = sqlite3_step(s);
    if (rc == SQLITE_ROW)
        *n = sqlite3_column_int64(s, 0);
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    (void)st;
    return rc == SQLITE_ROW ? 0 : ML_ESTORE;
}

int ml_astore_outbox_count(ml_astore_t *st, int state, int64_t *n)
{
    if (state < 0)
        return s_count(st, st->stmt[S_OUT_COUNT_ALL], n);
    sqlite3_bind_int(st->stmt[S_OUT_COUNT], 1, state);
    return s_count(st, st->stmt[S_OUT_COUNT], n);
}

int ml_astore_inbox_add(ml_astore_t *st, const char *id, int64_t received_at, const char *case_id,
                        const char *sender, int kind, const uint8_t *envelope, size_t len)
{
    sqlite3_stmt *s = st->stmt[S_IN_ADD];
    st->err[0] = '\0';
    sqlite3_bind_text(s, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 2, received_at);
    sqlite3_bind_text(s, 3, case_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 4, sender, -1, SQLITE_STATIC);
    sqlite3_bind_int(s, 5, kind);
    if (ml_astore_bind(st, s, 6, envelope, len, 0, id) < 0) {
        sqlite3_clear_bindings(s);
        return ML_ESTORE;
    }
    if (s_exec(st, s) < 0)
        return ML_ESTORE;
    return sqlite3_changes(st->db) > 0 ? 1 : 0;
}

int ml_astore_inbox_set_spooled(ml_astore_t *st, const char *id)
{
    sqlite3_stmt *s = st->stmt[S_IN_SPOOLED];
    sqlite3_bind_text(s, 1, id, -1, SQLITE_STATIC);
    if (s_exec(st, s) < 0)
        return ML_ESTORE;
    return sqlite3_changes(st->db) > 0 ? 0 : ML_ENOTFOUND;
}

static int s_inbox_walk(ml_astore_t *st, sqlite3_stmt *s, int want_one, ml_inbox_row_cb cb,
                        void *arg)
{
    int rc = 0, n = 0, step;
    st->err[0] = '\0';
    while ((step = sqlite3_step(s)) == SQLITE_ROW) {
        ml_inbox_row_t r;
        uint8_t *owned = NULL;
        r.id = (const char *)sqlite3_column_text(s, 0);
        if (!r.id)
            r.id = "";
        if (ml_astore_column(st, s, 5, r.id, &r.envelope, &r.envelope_len, &owned) < 0) {
            rc = ML_ESTORE;
            break;
        }
        r.received_at = sqlite3_column_int64(s, 1);
        r.case_id = (const char *)sqlite3_column_text(s, 2);
        r.sender = (const char *)sqlite3_column_text(s, 3);
        r.kind = sqlite3_column_int(s, 4);
        r.spooled = sqlite3_column_int(s, 6);
        if (!r.case_id)
            r.case_id = "";
        if (!r.sender)
            r.sender = "";
        n++;
        rc = cb(&r, arg);
        if (owned) {
            OPENSSL_cleanse(owned, r.envelope_len);
            free(owned);
        }
        if (rc != 0)
            break;
    }
    if (rc == 0 && step != SQLITE_DONE && step != SQLITE_ROW)
        rc = ML_ESTORE;
    else if (rc == 0 && want_one && n == 0)
        rc = ML_ENOTFOUND;
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    return rc;
}

int ml_astore_inbox_unspooled(ml_astore_t *st, ml_inbox_row_cb cb, void *arg)
{
    return s_inbox_walk(st, st->stmt[S_IN_UNSPOOLED], 0, cb, arg);
}

int ml_astore_inbox_get(ml_astore_t *st, const char *id, ml_inbox_row_cb cb, void *arg)
{
    sqlite3_stmt *s = st->stmt[S_IN_GET];
    sqlite3_bind_text(s, 1, id, -1, SQLITE_STATIC);
    return s_inbox_walk(st, s, 1, cb, arg);
}

int ml_astore_inbox_count(ml_astore_t *st, int64_t *n)
{
    return s_count(st, st->stmt[S_IN_COUNT], n);
}

/* Runs sql with ?1 = before_ms, ?2 = limit; *n = rows changed. */
static int s_prune_one(ml_astore_t *st, const char *sql, int64_t before_ms, int64_t limit,
                       int64_t *n)
{
    sqlite3_stmt *s = NULL;
    int src = sqlite3_prepare_v2(st->db, sql, -1, &s, NULL);
    if (src == SQLITE_OK) {
        sqlite3_bind_int64(s, 1, before_ms);
        sqlite3_bind_int64(s, 2, limit);
        src = sqlite3_step(s);
    }
    sqlite3_finalize(s);
    if (src != SQLITE_DONE)
        return ML_ESTORE;
    *n = sqlite3_changes(st->db);
    return 0;
}

int ml_astore_prune(ml_astore_t *st, int64_t before_ms, int64_t limit, int64_t *outbox_n,
                    int64_t *inbox_n)
{
    int64_t o = 0, i = 0;
    if (!st || st->in_tx)
        return ML_ESTORE;
    int rc = ml_astore_begin(st);
    if (rc != 0)
        return rc;
    /* Settled rows only (state 1 accepted, 2 rejected): a pending row is
     * work still to do, and its file is in pending/. */
    rc = s_prune_one(st,
                     "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox WHERE state <> 0"
                     " AND held = 0 AND updated_at <= ?1 ORDER BY seq LIMIT ?2)",
                     before_ms, limit, &o);
    if (rc == 0)
        rc = s_prune_one(st,
                         "DELETE FROM inbox WHERE id IN (SELECT id FROM inbox WHERE spooled = 1"
                         " AND received_at <= ?1 LIMIT ?2)",
                         before_ms, limit, &i);
    if (rc != 0) {
        ml_astore_rollback(st);
        return rc;
    }
    if ((rc = ml_astore_commit(st)) != 0)
        return rc;
    /* A file made with incremental auto-vacuum gives pages back here; on
     * an older file the pragma does nothing and the free pages are reused
     * by later rows. */
    if (o || i)
        sqlite3_exec(st->db, "PRAGMA incremental_vacuum(256)", NULL, NULL, NULL);
    if (outbox_n)
        *outbox_n = o;
    if (inbox_n)
        *inbox_n = i;
    return 0;
}
