/* SQLite implementation of the agent's imaging tables. The statements are
 * prepared once on the astore's connection; every SQLITE_* result becomes
 * an ML_E* code here. The caller brackets the writes with
 * ml_astore_begin/commit so that a chunk's record commits together with
 * the inbox rows and outbox rows of the same loop iteration.
 *
 * When the astore has keys, the columns that carry what a clinic wrote or
 * what identifies a study are sealed like the envelopes (ml_astore_bind,
 * ml_astore_column), each under associated data naming its table, column
 * and row ("img_in.reason:<case>", "img_in_object.file_name:<case>/<idx>";
 * an orphan chunk under its message id): the study, series and instance
 * UIDs, an object's file name, a transfer's reason (free text from the
 * clinic or the reading centre) and early chunks (their data holds the
 * DICOM header). Ids, node names, counters, sizes and digests stay in clear:
 * the queries select and join on them. */
#include "istore.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <sqlite3.h>

#include "ml_common.h"

#define S_AAD_MAX 512
#define S_P_STUDY "img_in.study_uid:"
#define S_P_REASON "img_in.reason:"
#define S_P_FILE "img_in_object.file_name:"
#define S_P_SOP "img_in_object.sop_uid:"
#define S_P_SERIES "img_in_object.series_uid:"

enum {
    S_OUT_ADD,
    S_OUT_GET,
    S_OUT_ASSIGNED,
    S_OUT_CLOSE,
    S_OUT_WALK,
    S_OUT_WALK_ALL,
    S_IN_ADD,
    S_IN_GET,
    S_IN_STATE,
    S_IN_WALK,
    S_IN_WALK_ALL,
    S_OBJ_ADD,
    S_OBJ_WALK,
    S_OBJ_GET,
    S_OBJ_GOOD,
    S_OBJ_VERIFIED,
    S_OBJ_RESET,
    S_OBJ_RESET_CHUNKS,
    S_CHUNK_GET,
    S_CHUNK_PUT,
    S_ORPHAN_ADD,
    S_ORPHAN_WALK,
    S_ORPHAN_DROP,
    S_ORPHAN_COUNT,
    S_NSTMT
};

#define S_OUT_COLS                                                                                 \
    "case_id, consult_id, recipient, priority, blob_dir, objects, chunks, total_bytes, "           \
    "chunk_size, coalesce(assigned_to, ''), state, created_at"
#define S_IN_COLS                                                                                  \
    "case_id, consult_id, sender, priority, study_uid, chunk_size, objects, total_bytes, state, "  \
    "coalesce(reason, ''), coalesce(folder, ''), opened_at"
#define S_OBJ_COLS                                                                                 \
    "idx, file_name, size, chunks, sha256, coalesce(sop_uid, ''), coalesce(series_uid, ''), "      \
    "good, verified, coalesce(verified_at, 0), attempts, case_id"

static const char *const s_sql[S_NSTMT] = {
    [S_OUT_ADD] = "INSERT INTO img_out (case_id, consult_id, recipient, priority, blob_dir, "
                  "objects, chunks, total_bytes, chunk_size, state, created_at, updated_at) "
                  "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0, ?10, ?10)",
    [S_OUT_GET] = "SELECT " S_OUT_COLS " FROM img_out WHERE case_id = ?1",
    [S_OUT_ASSIGNED] = "UPDATE img_out SET assigned_to = ?2, updated_at = ?3 WHERE case_id = ?1",
    [S_OUT_CLOSE] = "UPDATE img_out SET state = 1, updated_at = ?2 WHERE case_id = ?1 AND "
                    "state = 0",
    [S_OUT_WALK] = "SELECT " S_OUT_COLS " FROM img_out WHERE state = ?1 ORDER BY created_at",
    [S_OUT_WALK_ALL] = "SELECT " S_OUT_COLS " FROM img_out ORDER BY created_at",
    [S_IN_ADD] = "INSERT INTO img_in (case_id, consult_id, sender, priority, study_uid, "
                 "chunk_size, objects, total_bytes, state, reason, opened_at, updated_at) "
                 "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11)",
    [S_IN_GET] = "SELECT " S_IN_COLS " FROM img_in WHERE case_id = ?1",
    [S_IN_STATE] = "UPDATE img_in SET state = ?2, reason = coalesce(?3, reason), "
                   "folder = coalesce(?4, folder), updated_at = ?5 WHERE case_id = ?1",
    [S_IN_WALK] = "SELECT " S_IN_COLS " FROM img_in WHERE state = ?1 ORDER BY opened_at",
    [S_IN_WALK_ALL] = "SELECT " S_IN_COLS " FROM img_in ORDER BY opened_at",
    [S_OBJ_ADD] = "INSERT INTO img_in_object (case_id, idx, file_name, size, chunks, sha256, "
                  "sop_uid, series_uid) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    [S_OBJ_WALK] = "SELECT " S_OBJ_COLS " FROM img_in_object WHERE case_id = ?1 ORDER BY idx",
    [S_OBJ_GET] = "SELECT " S_OBJ_COLS " FROM img_in_object WHERE case_id = ?1 AND idx = ?2",
    [S_OBJ_GOOD] = "UPDATE img_in_object SET good = good + 1 WHERE case_id = ?1 AND idx = ?2",
    [S_OBJ_VERIFIED] = "UPDATE img_in_object SET verified = 1, verified_at = ?3 WHERE "
                       "case_id = ?1 AND idx = ?2",
    [S_OBJ_RESET] = "UPDATE img_in_object SET good = 0, verified = 0, attempts = attempts + 1 "
                    "WHERE case_id = ?1 AND idx = ?2",
    [S_OBJ_RESET_CHUNKS] = "DELETE FROM img_in_chunk WHERE case_id = ?1 AND idx = ?2",
    [S_CHUNK_GET] = "SELECT good, bad_count FROM img_in_chunk WHERE case_id = ?1 AND idx = ?2 "
                    "AND chunk = ?3",
    [S_CHUNK_PUT] = "INSERT OR REPLACE INTO img_in_chunk (case_id, idx, chunk, good, bad_count, "
                    "received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    [S_ORPHAN_ADD] = "INSERT OR IGNORE INTO img_orphan (id, case_id, received_at, envelope) "
                     "VALUES (?1, ?2, ?3, ?4)",
    [S_ORPHAN_WALK] = "SELECT id, envelope FROM img_orphan WHERE case_id = ?1 ORDER BY rowid",
    [S_ORPHAN_DROP] = "DELETE FROM img_orphan WHERE case_id = ?1",
    [S_ORPHAN_COUNT] = "SELECT count(*) FROM img_orphan",
};

static const char s_schema[] = "CREATE TABLE IF NOT EXISTS img_out ("
                               " case_id TEXT PRIMARY KEY,"
                               " consult_id TEXT NOT NULL,"
                               " recipient TEXT NOT NULL,"
                               " priority INTEGER NOT NULL,"
                               " blob_dir TEXT NOT NULL,"
                               " objects INTEGER NOT NULL,"
                               " chunks INTEGER NOT NULL,"
                               " total_bytes INTEGER NOT NULL,"
                               " chunk_size INTEGER NOT NULL,"
                               " assigned_to TEXT,"
                               " state INTEGER NOT NULL DEFAULT 0,"
                               " created_at INTEGER NOT NULL,"
                               " updated_at INTEGER NOT NULL);"
                               "CREATE TABLE IF NOT EXISTS img_in ("
                               " case_id TEXT PRIMARY KEY,"
                               " consult_id TEXT NOT NULL,"
                               " sender TEXT NOT NULL,"
                               " priority INTEGER NOT NULL,"
                               " study_uid TEXT NOT NULL,"
                               " chunk_size INTEGER NOT NULL,"
                               " objects INTEGER NOT NULL,"
                               " total_bytes INTEGER NOT NULL,"
                               " state INTEGER NOT NULL DEFAULT 0,"
                               " reason TEXT,"
                               " folder TEXT,"
                               " opened_at INTEGER NOT NULL,"
                               " updated_at INTEGER NOT NULL);"
                               "CREATE TABLE IF NOT EXISTS img_in_object ("
                               " case_id TEXT NOT NULL,"
                               " idx INTEGER NOT NULL,"
                               " file_name TEXT NOT NULL,"
                               " size INTEGER NOT NULL,"
                               " chunks INTEGER NOT NULL,"
                               " sha256 TEXT NOT NULL,"
                               " sop_uid TEXT,"
                               " series_uid TEXT,"
                               " good INTEGER NOT NULL DEFAULT 0,"
                               " verified INTEGER NOT NULL DEFAULT 0,"
                               " verified_at INTEGER,"
                               " attempts INTEGER NOT NULL DEFAULT 0,"
                               " PRIMARY KEY (case_id, idx)) WITHOUT ROWID;"
                               "CREATE TABLE IF NOT EXISTS img_in_chunk ("
                               " case_id TEXT NOT NULL,"
                               " idx INTEGER NOT NULL,"
                               " chunk INTEGER NOT NULL,"
                               " good INTEGER NOT NULL,"
                               " bad_count INTEGER NOT NULL DEFAULT 0,"
                               " received_at INTEGER NOT NULL,"
                               " PRIMARY KEY (case_id, idx, chunk)) WITHOUT ROWID;"
                               "CREATE TABLE IF NOT EXISTS img_orphan ("
                               " id TEXT PRIMARY KEY,"
                               " case_id TEXT NOT NULL,"
                               " received_at INTEGER NOT NULL,"
                               " envelope BLOB NOT NULL);"
                               "CREATE INDEX IF NOT EXISTS img_orphan_case ON img_orphan(case_id);";

struct ml_istore {
    ml_astore_t *st; /* borrowed */
    sqlite3 *db;     /* the astore's connection */
    sqlite3_stmt *stmt[S_NSTMT];
};

/* The sealed columns, for ml_astore_reseal. */
static const ml_astore_reseal_t s_reseal[] = {
    {"img_in study UID",
     "SELECT case_id, 0, study_uid FROM img_in WHERE case_id > ?1 ORDER BY case_id LIMIT ?3",
     "UPDATE img_in SET study_uid = ?1 WHERE case_id = ?2", S_P_STUDY, 0},
    {"img_in reason",
     "SELECT case_id, 0, reason FROM img_in WHERE case_id > ?1 ORDER BY case_id LIMIT ?3",
     "UPDATE img_in SET reason = ?1 WHERE case_id = ?2", S_P_REASON, 0},
    {"img_in_object file name",
     "SELECT case_id, idx, file_name FROM img_in_object WHERE (case_id, idx) > (?1, ?2) "
     "ORDER BY case_id, idx LIMIT ?3",
     "UPDATE img_in_object SET file_name = ?1 WHERE case_id = ?2 AND idx = ?3", S_P_FILE, 1},
    {"img_in_object SOP instance UID",
     "SELECT case_id, idx, sop_uid FROM img_in_object WHERE (case_id, idx) > (?1, ?2) "
     "ORDER BY case_id, idx LIMIT ?3",
     "UPDATE img_in_object SET sop_uid = ?1 WHERE case_id = ?2 AND idx = ?3", S_P_SOP, 1},
    {"img_in_object series UID",
     "SELECT case_id, idx, series_uid FROM img_in_object WHERE (case_id, idx) > (?1, ?2) "
     "ORDER BY case_id, idx LIMIT ?3",
     "UPDATE img_in_object SET series_uid = ?1 WHERE case_id = ?2 AND idx = ?3", S_P_SERIES, 1},
    {"img_orphan envelope",
     "SELECT id, 0, envelope FROM img_orphan WHERE id > ?1 ORDER BY id LIMIT ?3",
     "UPDATE img_orphan SET envelope = ?1 WHERE id = ?2", NULL, 0},
};

/* Binds text v (NULL: SQL NULL) to parameter i, sealed under aad prefix,
 * key and sub (sub < 0: none) when the store has keys. Returns 0 or
 * ML_ESTORE. */
static int s_bind_text(ml_istore_t *is, sqlite3_stmt *s, int i, const char *v, const char *prefix,
                       const char *key, int64_t sub)
{
    if (!v) {
        sqlite3_bind_null(s, i);
        return 0;
    }
    char aad[S_AAD_MAX];
    ml_astore_aad(aad, sizeof aad, prefix, key, sub);
    return ml_astore_bind(is->st, s, i, v, strlen(v), 1, aad) < 0 ? ML_ESTORE : 0;
}

/* Copies column col, opened when sealed, into out (truncated to cap).
 * Returns 0 or ML_ESTORE (it does not open; logged by the astore). */
static int s_open_text(ml_istore_t *is, sqlite3_stmt *s, int col, const char *prefix,
                       const char *key, int64_t sub, char *out, size_t cap)
{
    char aad[S_AAD_MAX];
    const uint8_t *v = NULL;
    size_t n = 0;
    uint8_t *owned = NULL;
    ml_astore_aad(aad, sizeof aad, prefix, key, sub);
    if (ml_astore_column(is->st, s, col, aad, &v, &n, &owned) < 0) {
        out[0] = '\0';
        return ML_ESTORE;
    }
    snprintf(out, cap, "%.*s", (int)(n < cap ? n : cap - 1), (const char *)v);
    if (owned) {
        OPENSSL_cleanse(owned, n);
        free(owned);
    }
    return 0;
}

int ml_istore_open(ml_astore_t *st, ml_istore_t **out, char *err, size_t errlen)
{
    char *msg = NULL;
    ml_istore_t *is = calloc(1, sizeof *is);
    if (!is) {
        ml_seterr(err, errlen, "out of memory");
        return ML_ENOMEM;
    }
    is->st = st;
    is->db = ml_astore_db(st);
    if (sqlite3_exec(is->db, s_schema, NULL, NULL, &msg) != SQLITE_OK) {
        ml_seterr(err, errlen, "cannot create the imaging tables: %s",
                  msg ? msg : sqlite3_errmsg(is->db));
        sqlite3_free(msg);
        goto failed;
    }
    for (int i = 0; i < S_NSTMT; i++) {
        if (sqlite3_prepare_v3(is->db, s_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &is->stmt[i],
                               NULL) != SQLITE_OK) {
            ml_seterr(err, errlen, "cannot prepare an imaging statement: %s",
                      sqlite3_errmsg(is->db));
            goto failed;
        }
    }
    int rc = ml_astore_reseal(st, "imaging", s_reseal, sizeof s_reseal / sizeof s_reseal[0], err,
                              errlen);
    if (rc < 0) {
        ml_istore_destroy(&is);
        return rc == ML_ESTORE ? ML_ESTORE : ML_ECONFIG;
    }
    *out = is;
    return 0;
failed:
    ml_istore_destroy(&is);
    return ML_ESTORE;
}

void ml_istore_destroy(ml_istore_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    for (int i = 0; i < S_NSTMT; i++)
        sqlite3_finalize((*self_p)->stmt[i]);
    free(*self_p);
    *self_p = NULL;
}

/* Runs a statement without rows. Returns the number of rows changed, or
 * ML_EDUP (constraint) / ML_ESTORE. */
static int s_exec(ml_istore_t *is, sqlite3_stmt *s)
{
    int rc = sqlite3_step(s);
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    if (rc == SQLITE_DONE)
        return sqlite3_changes(is->db);
    return rc == SQLITE_CONSTRAINT ? ML_EDUP : ML_ESTORE;
}

static void s_text(char *out, size_t cap, sqlite3_stmt *s, int col)
{
    const char *v = (const char *)sqlite3_column_text(s, col);
    snprintf(out, cap, "%s", v ? v : "");
}

/* Steps a query; for each row fill(row) then cb. Returns ML_ENOTFOUND when
 * want_one and no row, cb's value, 0 or ML_ESTORE. */
typedef void (*s_any_fn)(void);
typedef int (*s_row_fn)(ml_istore_t *is, sqlite3_stmt *s, s_any_fn cb, void *arg);

static int s_walk(ml_istore_t *is, sqlite3_stmt *s, int want_one, s_row_fn fn, s_any_fn cb,
                  void *arg)
{
    int rc = 0, n = 0, step;
    while ((step = sqlite3_step(s)) == SQLITE_ROW) {
        n++;
        if ((rc = fn(is, s, cb, arg)) != 0)
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

/* ---- img_out ---- */

static int s_out_row(ml_istore_t *is, sqlite3_stmt *s, s_any_fn cb, void *arg)
{
    (void)is;
    ml_img_out_t o;
    memset(&o, 0, sizeof o);
    s_text(o.case_id, sizeof o.case_id, s, 0);
    s_text(o.consult_id, sizeof o.consult_id, s, 1);
    s_text(o.recipient, sizeof o.recipient, s, 2);
    o.priority = sqlite3_column_int(s, 3);
    s_text(o.blob_dir, sizeof o.blob_dir, s, 4);
    o.objects = (uint32_t)sqlite3_column_int64(s, 5);
    o.chunks = (uint32_t)sqlite3_column_int64(s, 6);
    o.total_bytes = (uint64_t)sqlite3_column_int64(s, 7);
    o.chunk_size = (uint32_t)sqlite3_column_int64(s, 8);
    s_text(o.assigned_to, sizeof o.assigned_to, s, 9);
    o.state = sqlite3_column_int(s, 10);
    o.created_at = sqlite3_column_int64(s, 11);
    return ((ml_img_out_cb)cb)(&o, arg);
}

static int s_copy_out_cb(const ml_img_out_t *o, void *arg)
{
    *(ml_img_out_t *)arg = *o;
    return 0;
}

int ml_istore_out_add(ml_istore_t *is, const ml_img_out_t *o, int64_t now_ms)
{
    sqlite3_stmt *s = is->stmt[S_OUT_ADD];
    sqlite3_bind_text(s, 1, o->case_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, o->consult_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 3, o->recipient, -1, SQLITE_STATIC);
    sqlite3_bind_int(s, 4, o->priority);
    sqlite3_bind_text(s, 5, o->blob_dir, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 6, o->objects);
    sqlite3_bind_int64(s, 7, o->chunks);
    sqlite3_bind_int64(s, 8, (sqlite3_int64)o->total_bytes);
    sqlite3_bind_int64(s, 9, o->chunk_size);
    sqlite3_bind_int64(s, 10, now_ms);
    int rc = s_exec(is, s);
    return rc < 0 ? rc : 0;
}

int ml_istore_out_get(ml_istore_t *is, const char *case_id, ml_img_out_t *o)
{
    sqlite3_stmt *s = is->stmt[S_OUT_GET];
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    return s_walk(is, s, 1, s_out_row, (s_any_fn)s_copy_out_cb, o);
}

int ml_istore_out_set_assigned(ml_istore_t *is, const char *case_id, const char *node,
                               int64_t now_ms)
{
    sqlite3_stmt *s = is->stmt[S_OUT_ASSIGNED];
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, node, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 3, now_ms);
    int rc = s_exec(is, s);
    return rc < 0 ? rc : 0;
}

int ml_istore_out_close(ml_istore_t *is, const char *case_id, int64_t now_ms)
{
    sqlite3_stmt *s = is->stmt[S_OUT_CLOSE];
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 2, now_ms);
    int rc = s_exec(is, s);
    return rc < 0 ? rc : rc > 0;
}

int ml_istore_out_walk(ml_istore_t *is, int state, ml_img_out_cb cb, void *arg)
{
    sqlite3_stmt *s = is->stmt[state < 0 ? S_OUT_WALK_ALL : S_OUT_WALK];
    if (state >= 0)
        sqlite3_bind_int(s, 1, state);
    return s_walk(is, s, 0, s_out_row, (s_any_fn)cb, arg);
}

/* ---- img_in ---- */

static int s_in_row(ml_istore_t *is, sqlite3_stmt *s, s_any_fn cb, void *arg)
{
    ml_img_in_t t;
    memset(&t, 0, sizeof t);
    s_text(t.case_id, sizeof t.case_id, s, 0);
    s_text(t.consult_id, sizeof t.consult_id, s, 1);
    s_text(t.sender, sizeof t.sender, s, 2);
    t.priority = sqlite3_column_int(s, 3);
    if (s_open_text(is, s, 4, S_P_STUDY, t.case_id, -1, t.study_uid, sizeof t.study_uid) < 0 ||
        s_open_text(is, s, 9, S_P_REASON, t.case_id, -1, t.reason, sizeof t.reason) < 0)
        return ML_ESTORE;
    t.chunk_size = (uint32_t)sqlite3_column_int64(s, 5);
    t.objects = (uint32_t)sqlite3_column_int64(s, 6);
    t.total_bytes = (uint64_t)sqlite3_column_int64(s, 7);
    t.state = sqlite3_column_int(s, 8);
    s_text(t.folder, sizeof t.folder, s, 10);
    t.opened_at = sqlite3_column_int64(s, 11);
    return ((ml_img_in_cb)cb)(&t, arg);
}

static int s_copy_in_cb(const ml_img_in_t *t, void *arg)
{
    *(ml_img_in_t *)arg = *t;
    return 0;
}

int ml_istore_in_add(ml_istore_t *is, const ml_img_in_t *t, int64_t now_ms)
{
    sqlite3_stmt *s = is->stmt[S_IN_ADD];
    sqlite3_bind_text(s, 1, t->case_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, t->consult_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 3, t->sender, -1, SQLITE_STATIC);
    sqlite3_bind_int(s, 4, t->priority);
    sqlite3_bind_int64(s, 6, t->chunk_size);
    sqlite3_bind_int64(s, 7, t->objects);
    sqlite3_bind_int64(s, 8, (sqlite3_int64)t->total_bytes);
    sqlite3_bind_int(s, 9, t->state);
    sqlite3_bind_int64(s, 11, now_ms);
    if (s_bind_text(is, s, 5, t->study_uid, S_P_STUDY, t->case_id, -1) < 0 ||
        s_bind_text(is, s, 10, t->reason[0] ? t->reason : NULL, S_P_REASON, t->case_id, -1) < 0) {
        sqlite3_clear_bindings(s);
        return ML_ESTORE;
    }
    int rc = s_exec(is, s);
    return rc < 0 ? rc : 0;
}

int ml_istore_in_get(ml_istore_t *is, const char *case_id, ml_img_in_t *t)
{
    sqlite3_stmt *s = is->stmt[S_IN_GET];
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    return s_walk(is, s, 1, s_in_row, (s_any_fn)s_copy_in_cb, t);
}

int ml_istore_in_set_state(ml_istore_t *is, const char *case_id, int state, const char *reason,
                           const char *folder, int64_t now_ms)
{
    sqlite3_stmt *s = is->stmt[S_IN_STATE];
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    sqlite3_bind_int(s, 2, state);
    if (s_bind_text(is, s, 3, reason, S_P_REASON, case_id, -1) < 0) {
        sqlite3_clear_bindings(s);
        return ML_ESTORE;
    }
    if (folder)
        sqlite3_bind_text(s, 4, folder, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(s, 4);
    sqlite3_bind_int64(s, 5, now_ms);
    int rc = s_exec(is, s);
    return rc < 0 ? rc : 0;
}

int ml_istore_in_walk(ml_istore_t *is, int state, ml_img_in_cb cb, void *arg)
{
    sqlite3_stmt *s = is->stmt[state < 0 ? S_IN_WALK_ALL : S_IN_WALK];
    if (state >= 0)
        sqlite3_bind_int(s, 1, state);
    return s_walk(is, s, 0, s_in_row, (s_any_fn)cb, arg);
}

/* ---- img_in_object ---- */

static int s_obj_row(ml_istore_t *is, sqlite3_stmt *s, s_any_fn cb, void *arg)
{
    ml_img_obj_t o;
    memset(&o, 0, sizeof o);
    o.idx = (uint32_t)sqlite3_column_int64(s, 0);
    const char *case_id = (const char *)sqlite3_column_text(s, 11);
    if (!case_id)
        case_id = "";
    if (s_open_text(is, s, 1, S_P_FILE, case_id, o.idx, o.file_name, sizeof o.file_name) < 0 ||
        s_open_text(is, s, 5, S_P_SOP, case_id, o.idx, o.sop_uid, sizeof o.sop_uid) < 0 ||
        s_open_text(is, s, 6, S_P_SERIES, case_id, o.idx, o.series_uid, sizeof o.series_uid) < 0)
        return ML_ESTORE;
    o.size = (uint64_t)sqlite3_column_int64(s, 2);
    o.chunks = (uint32_t)sqlite3_column_int64(s, 3);
    s_text(o.sha256, sizeof o.sha256, s, 4);
    o.good = (uint32_t)sqlite3_column_int64(s, 7);
    o.verified = sqlite3_column_int(s, 8);
    o.verified_at = sqlite3_column_int64(s, 9);
    o.attempts = (uint32_t)sqlite3_column_int64(s, 10);
    return ((ml_img_obj_cb)cb)(&o, arg);
}

static int s_copy_obj_cb(const ml_img_obj_t *o, void *arg)
{
    *(ml_img_obj_t *)arg = *o;
    return 0;
}

int ml_istore_obj_add(ml_istore_t *is, const char *case_id, const ml_img_obj_t *o)
{
    sqlite3_stmt *s = is->stmt[S_OBJ_ADD];
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 2, o->idx);
    sqlite3_bind_int64(s, 4, (sqlite3_int64)o->size);
    sqlite3_bind_int64(s, 5, o->chunks);
    sqlite3_bind_text(s, 6, o->sha256, -1, SQLITE_STATIC);
    if (s_bind_text(is, s, 3, o->file_name, S_P_FILE, case_id, o->idx) < 0 ||
        s_bind_text(is, s, 7, o->sop_uid, S_P_SOP, case_id, o->idx) < 0 ||
        s_bind_text(is, s, 8, o->series_uid, S_P_SERIES, case_id, o->idx) < 0) {
        sqlite3_clear_bindings(s);
        return ML_ESTORE;
    }
    int rc = s_exec(is, s);
    return rc < 0 ? rc : 0;
}

int ml_istore_obj_walk(ml_istore_t *is, const char *case_id, ml_img_obj_cb cb, void *arg)
{
    sqlite3_stmt *s = is->stmt[S_OBJ_WALK];
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    return s_walk(is, s, 0, s_obj_row, (s_any_fn)cb, arg);
}

int ml_istore_obj_get(ml_istore_t *is, const char *case_id, uint32_t idx, ml_img_obj_t *o)
{
    sqlite3_stmt *s = is->stmt[S_OBJ_GET];
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 2, idx);
    return s_walk(is, s, 1, s_obj_row, (s_any_fn)s_copy_obj_cb, o);
}

static int s_obj_exec(ml_istore_t *is, int which, const char *case_id, uint32_t idx, int64_t now_ms)
{
    sqlite3_stmt *s = is->stmt[which];
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 2, idx);
    if (which == S_OBJ_VERIFIED)
        sqlite3_bind_int64(s, 3, now_ms);
    int rc = s_exec(is, s);
    return rc < 0 ? rc : 0;
}

int ml_istore_obj_add_good(ml_istore_t *is, const char *case_id, uint32_t idx)
{
    return s_obj_exec(is, S_OBJ_GOOD, case_id, idx, 0);
}

int ml_istore_obj_set_verified(ml_istore_t *is, const char *case_id, uint32_t idx, int64_t now_ms)
{
    return s_obj_exec(is, S_OBJ_VERIFIED, case_id, idx, now_ms);
}

int ml_istore_obj_reset(ml_istore_t *is, const char *case_id, uint32_t idx)
{
    int rc = s_obj_exec(is, S_OBJ_RESET, case_id, idx, 0);
    return rc < 0 ? rc : s_obj_exec(is, S_OBJ_RESET_CHUNKS, case_id, idx, 0);
}

/* ---- img_in_chunk ---- */

int ml_istore_chunk_get(ml_istore_t *is, const char *case_id, uint32_t idx, uint32_t chunk,
                        int *good, uint32_t *bad_count)
{
    sqlite3_stmt *s = is->stmt[S_CHUNK_GET];
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 2, idx);
    sqlite3_bind_int64(s, 3, chunk);
    int rc = sqlite3_step(s);
    if (rc == SQLITE_ROW) {
        *good = sqlite3_column_int(s, 0);
        *bad_count = (uint32_t)sqlite3_column_int64(s, 1);
    }
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    if (rc == SQLITE_ROW)
        return 0;
    return rc == SQLITE_DONE ? ML_ENOTFOUND : ML_ESTORE;
}

int ml_istore_chunk_put(ml_istore_t *is, const char *case_id, uint32_t idx, uint32_t chunk,
                        int good, uint32_t bad_count, int64_t now_ms)
{
    sqlite3_stmt *s = is->stmt[S_CHUNK_PUT];
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 2, idx);
    sqlite3_bind_int64(s, 3, chunk);
    sqlite3_bind_int(s, 4, good);
    sqlite3_bind_int64(s, 5, bad_count);
    sqlite3_bind_int64(s, 6, now_ms);
    int rc = s_exec(is, s);
    return rc < 0 ? rc : 0;
}

/* ---- img_orphan ---- */

int ml_istore_orphan_add(ml_istore_t *is, const char *id, const char *case_id, const uint8_t *env,
                         size_t len, int64_t now_ms)
{
    sqlite3_stmt *s = is->stmt[S_ORPHAN_ADD];
    sqlite3_bind_text(s, 1, id, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, case_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(s, 3, now_ms);
    if (ml_astore_bind(is->st, s, 4, env, len, 0, id) < 0) {
        sqlite3_clear_bindings(s);
        return ML_ESTORE;
    }
    int rc = s_exec(is, s);
    return rc < 0 ? rc : rc > 0;
}

static int s_orphan_row(ml_istore_t *is, sqlite3_stmt *s, s_any_fn cb, void *arg)
{
    const char *id = (const char *)sqlite3_column_text(s, 0);
    const uint8_t *env = NULL;
    size_t len = 0;
    uint8_t *owned = NULL;
    if (!id)
        id = "";
    if (ml_astore_column(is->st, s, 1, id, &env, &len, &owned) < 0)
        return ML_ESTORE;
    int rc = ((ml_img_orphan_cb)cb)(id, env, len, arg);
    if (owned) {
        OPENSSL_cleanse(owned, len);
        free(owned);
    }
    return rc;
}

int ml_istore_orphan_walk(ml_istore_t *is, const char *case_id, ml_img_orphan_cb cb, void *arg)
{
    sqlite3_stmt *s = is->stmt[S_ORPHAN_WALK];
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    return s_walk(is, s, 0, s_orphan_row, (s_any_fn)cb, arg);
}

int ml_istore_orphan_drop(ml_istore_t *is, const char *case_id)
{
    sqlite3_stmt *s = is->stmt[S_ORPHAN_DROP];
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    int rc = s_exec(is, s);
    return rc < 0 ? rc : 0;
}

int ml_istore_in_forget_chunks(ml_istore_t *is, const char *case_id)
{
    /* Rare (a study expiring), so prepared here rather than kept. */
    sqlite3_stmt *s = NULL;
    if (sqlite3_prepare_v2(is->db, "DELETE FROM img_in_chunk WHERE case_id = ?1", -1, &s, NULL) !=
        SQLITE_OK)
        return ML_ESTORE;
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    int rc = sqlite3_step(s);
    sqlite3_finalize(s);
    return rc == SQLITE_DONE ? 0 : ML_ESTORE;
}

int ml_istore_orphan_count(ml_istore_t *is, int64_t *n)
{
    sqlite3_stmt *s = is->stmt[S_ORPHAN_COUNT];
    int rc = sqlite3_step(s);
    if (rc == SQLITE_ROW)
        *n = sqlite3_column_int64(s, 0);
    sqlite3_reset(s);
    return rc == SQLITE_ROW ? 0 : ML_ESTORE;
}
