/* The broker's durable store: SQLite in WAL mode behind one store thread
 * that owns the write connection and commits in groups. The loop thread
 * queues requests (each one allocation holding a copy of its data); the
 * store thread takes everything queued, up to batch_max, runs it as one
 * BEGIN IMMEDIATE ... COMMIT with synchronous=FULL (one fsync of the WAL for
 * the whole group), then hands the settled puts back through a uv_async, and
 * the loop thread calls their callbacks in request order. While one group
 * commits, the next one accumulates, so the batch size follows the load by
 * itself: one message per transaction when idle, thousands under pressure.
 *
 * A second, read-only connection serves the loop thread's synchronous reads
 * (start-up scan, fetch for delivery); WAL lets it read committed data while
 * the store thread writes. Neither connection memory-maps the file and both
 * cap their page cache, so the broker's memory does not grow with the number
 * of queued messages: envelopes stay on disk until fetched one at a time.
 *
 * A third connection belongs to the checkpointer thread, which copies WAL
 * frames into the database every 50 ms with PASSIVE checkpoints (they never
 * block the writer). Checkpointing is ~20% of the write work; done on the
 * store thread it sits on the path every Accepted waits for, done here it
 * runs on the other core. Measured with per-thread CPU: the store thread's
 * time per 200,000 messages fell from 2.0-2.8 s to 1.6-1.9 s and end-to-end
 * throughput rose 10-30% (docs/performance.md).
 *
 * The async handle keeps the loop alive only while puts are in flight, the
 * way libuv's own handles behave: uv_run(UV_RUN_DEFAULT) returns once every
 * callback has run. ml_store_close is synchronous for the database (it
 * commits what is queued and closes both connections before returning) but
 * the struct itself is freed by the uv_close callback of its async handle,
 * so the caller must let the loop run once more (uv_run) before
 * uv_loop_close, as for any other closed handle. */
#include "store.h"

#include <assert.h>
#include <stdarg.h>
#include <stdio.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include "ml_common.h"

#define S_COMPONENT "store"
#define S_SCHEMA_VERSION 1
#define S_BATCH_MAX_DEFAULT 4096
/* Page cache per connection, in KiB (negative cache_size means KiB). Two
 * connections, so at most ~16 MiB of cache whatever the queue length. */
#define S_CACHE_KIB 8000
/* A busy writer or a WAL recovery can make a connection wait; past this the
 * statement fails with SQLITE_BUSY and is reported as ML_ESTORE. */
#define S_BUSY_MS 5000

enum { S_OP_PUT, S_OP_DELIVERED, S_OP_DEAD };

/* One queued request. The strings and the envelope of a put, or the reason
 * of a mark_dead, live in the same allocation right after the struct, so a
 * request is one malloc and one free whatever it carries. */
typedef struct ml_store_req {
    struct ml_store_req *next;
    int op;
    ml_store_put_cb cb;
    void *arg;
    int64_t seq; /* in: the row a mark is for; out: the row a put made */
    int rc;      /* out: the put's result */
    int duplicate;
    const char *id;
    const char *case_id;
    const char *sender;
    const char *recipient;
    int kind;
    int priority;
    int64_t created_at;
    int64_t deadline;
    const uint8_t *envelope; /* never NULL for a put, even when empty */
    size_t envelope_len;
    const char *reason;
} ml_store_req_t;

struct ml_store {
    uv_loop_t *loop;
    uv_async_t async; /* store thread -> loop: settled puts are waiting */
    uv_thread_t thread;
    uv_mutex_t mu;
    uv_cond_t cv;
    char *path;
    int batch_max;
    int64_t max_bytes;
    int64_t page_size;
    int mu_ok;
    int async_ok;

    /* The checkpointer: its own connection and thread copy WAL frames into
     * the database (PASSIVE checkpoints, which never block the writer), so
     * that work stays off the store thread, the serial path every Accepted
     * waits on. The writer keeps a high wal_autocheckpoint as a backstop in
     * case the checkpointer falls behind. */
    uv_thread_t ckpt_thread;
    uv_cond_t ckpt_cv;
    sqlite3 *ck;
    int ckpt_ok;

    /* Guarded by mu. */
    ml_store_req_t *head, *tail;           /* waiting for the store thread */
    ml_store_req_t *done_head, *done_tail; /* settled puts, callbacks due */
    int stopping;
    ml_store_stats_t stats;

    /* Loop thread only. */
    int closed;
    uint64_t inflight; /* puts whose callback has not run yet */
    sqlite3 *rd;
    sqlite3_stmt *scan;
    sqlite3_stmt *fetch;

    /* Store thread only (the opener uses them before the thread starts, the
     * closer after it has been joined). */
    sqlite3 *wr;
    sqlite3_stmt *begin;
    sqlite3_stmt *commit;
    sqlite3_stmt *rollback;
    sqlite3_stmt *insert;
    sqlite3_stmt *lookup;
    sqlite3_stmt *insert_body;
    sqlite3_stmt *delivered;
    sqlite3_stmt *dead;
    sqlite3_stmt *page_count;
    int disk_full;  /* the last batch failed with SQLITE_FULL */
    int quota_full; /* the last put was refused for max_bytes */
};

static const char s_schema[] =
    "CREATE TABLE IF NOT EXISTS messages ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " id TEXT NOT NULL UNIQUE,"
    " case_id TEXT,"
    " sender TEXT,"
    " recipient TEXT,"
    " kind INTEGER,"
    " priority INTEGER,"
    " created_at INTEGER,"
    " deadline INTEGER,"
    " accepted_at INTEGER,"
    " state INTEGER,"
    " delivered_at INTEGER,"
    " attempts INTEGER DEFAULT 0,"
    " dead_reason TEXT,"
    " size INTEGER NOT NULL DEFAULT 0);"
    /* Envelopes live apart from the metadata: settling a message (an UPDATE
     * of its state) then rewrites a row of a few dozen bytes instead of a
     * row carrying the whole envelope, which halves the bytes written per
     * delivered message. */
    "CREATE TABLE IF NOT EXISTS bodies ("
    " seq INTEGER PRIMARY KEY,"
    " envelope BLOB NOT NULL);"
    /* Partial: a delivered or dead row leaves the index, so the start-up
     * scan and the index itself stay proportional to the queue, not to the
     * history. The order matches ml_store_scan_pending's. */
    "CREATE INDEX IF NOT EXISTS messages_pending ON messages(priority DESC, seq)"
    " WHERE state = 0;"
    /* No index on case_id yet: nothing reads by case in this version, and
     * maintaining it cost ~20% of the broker's CPU per message under load.
     * Case lookups will come with a cases table of their own. */
    "";

static int s_prepare(sqlite3 *db, const char *sql, sqlite3_stmt **out)
{
    /* PERSISTENT: these statements live as long as the store, which tells
     * SQLite not to take them from its short-lived lookaside memory. */
    return sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, out, NULL);
}

/* Steps a statement that returns no row we need, and resets it at once so
 * that it never holds a read snapshot or a lock between uses. Returns the
 * step's result code. */
static int s_run(sqlite3_stmt *stmt)
{
    int src = sqlite3_step(stmt);
    while (src == SQLITE_ROW)
        src = sqlite3_step(stmt);
    sqlite3_reset(stmt);
    sqlite3_clear_bindings(stmt);
    return src;
}

/* Applies the pragmas both connections share. */
static int s_tune(sqlite3 *db)
{
    char sql[128];
    snprintf(sql, sizeof sql, "PRAGMA cache_size=-%d; PRAGMA mmap_size=0;", S_CACHE_KIB);
    sqlite3_busy_timeout(db, S_BUSY_MS);
    return sqlite3_exec(db, sql, NULL, NULL, NULL);
}

/* Reads a single integer from a query (a pragma, usually). */
static int s_query_int(sqlite3 *db, const char *sql, int64_t *out)
{
    sqlite3_stmt *stmt = NULL;
    int src = sqlite3_prepare_v2(db, sql, -1, &stmt, NULL);
    if (src != SQLITE_OK)
        goto out;
    src = sqlite3_step(stmt);
    if (src == SQLITE_ROW) {
        *out = sqlite3_column_int64(stmt, 0);
        src = SQLITE_OK;
    }
out:
    sqlite3_finalize(stmt);
    return src;
}

/* Opens the write connection, switches it to WAL, and creates or checks the
 * schema. Opener thread, before the store thread exists. */
static int s_open_writer(ml_store_t *st, char *err, size_t errlen)
{
    int rc = ML_ESTORE;
    int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;
    const char *what = "open";
    char why[128] = ""; /* set when the failure is ours, not SQLite's */
    int in_txn = 0;
    int64_t version = 0;
    sqlite3_stmt *mode = NULL;
    int src = sqlite3_open_v2(st->path, &st->wr, flags, NULL);
    if (src != SQLITE_OK)
        goto out;

    what = "configure";
    if ((src = s_tune(st->wr)) != SQLITE_OK)
        goto out;
    /* journal_mode answers with the mode it ended up in rather than an
     * error: a file system without shared memory support keeps "delete". */
    src = sqlite3_prepare_v2(st->wr, "PRAGMA journal_mode=WAL", -1, &mode, NULL);
    if (src != SQLITE_OK || (src = sqlite3_step(mode)) != SQLITE_ROW)
        goto out;
    if (sqlite3_stricmp((const char *)sqlite3_column_text(mode, 0), "wal") != 0) {
        snprintf(why, sizeof why, "cannot switch to WAL mode (journal_mode is %s)",
                 (const char *)sqlite3_column_text(mode, 0));
        goto out;
    }
    /* Finalized now: an unfinished pragma statement would block the COMMIT
     * below ("SQL statements in progress"). */
    sqlite3_finalize(mode);
    mode = NULL;
    /* FULL makes every commit fsync the WAL: a put is reported stored only
     * once it survives power loss, not merely a crash of the process. The
     * checkpoint runs every 10000 pages (~40 MiB of WAL) rather than 1000,
     * so pages rewritten by several commits (a row inserted, then marked
     * delivered) are copied to the database once: ~7% less CPU under load.
     * The journal size limit trims the WAL file after a checkpoint so that one
     * burst does not leave a huge file behind. */
    src = sqlite3_exec(
        st->wr,
        "PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF; PRAGMA wal_autocheckpoint=16384;"
        " PRAGMA journal_size_limit=67108864;",
        NULL, NULL, NULL);
    if (src != SQLITE_OK)
        goto out;

    what = "create the schema in";
    if ((src = sqlite3_exec(st->wr, "BEGIN IMMEDIATE", NULL, NULL, NULL)) != SQLITE_OK)
        goto out;
    in_txn = 1;
    if ((src = s_query_int(st->wr, "PRAGMA user_version", &version)) != SQLITE_OK)
        goto out;
    if (version > S_SCHEMA_VERSION) {
        snprintf(why, sizeof why, "schema version %lld is newer than this broker's (%d)",
                 (long long)version, S_SCHEMA_VERSION);
        goto out;
    }
    if ((src = sqlite3_exec(st->wr, s_schema, NULL, NULL, NULL)) != SQLITE_OK)
        goto out;
    if (version < S_SCHEMA_VERSION) {
        char sql[64];
        snprintf(sql, sizeof sql, "PRAGMA user_version=%d", S_SCHEMA_VERSION);
        if ((src = sqlite3_exec(st->wr, sql, NULL, NULL, NULL)) != SQLITE_OK)
            goto out;
    }
    if ((src = sqlite3_exec(st->wr, "COMMIT", NULL, NULL, NULL)) != SQLITE_OK)
        goto out;
    in_txn = 0;

    what = "read the page size of";
    if ((src = s_query_int(st->wr, "PRAGMA page_size", &st->page_size)) != SQLITE_OK)
        goto out;
    rc = 0;
out:
    if (rc != 0 && why[0])
        ml_seterr(err, errlen, "%s: %s", st->path, why);
    else if (rc != 0)
        ml_seterr(err, errlen, "cannot %s %s: %s", what, st->path,
                  st->wr ? sqlite3_errmsg(st->wr) : sqlite3_errstr(src));
    if (in_txn && !sqlite3_get_autocommit(st->wr))
        sqlite3_exec(st->wr, "ROLLBACK", NULL, NULL, NULL);
    sqlite3_finalize(mode);
    return rc;
}

static int s_prepare_all(ml_store_t *st, char *err, size_t errlen)
{
    struct {
        sqlite3 *db;
        sqlite3_stmt **stmt;
        const char *sql;
    } all[] = {
        {st->wr, &st->begin, "BEGIN IMMEDIATE"},
        {st->wr, &st->commit, "COMMIT"},
        {st->wr, &st->rollback, "ROLLBACK"},
        /* OR IGNORE turns a second put of an id into a no-op the caller
         * can detect with sqlite3_changes(), inside the same transaction
         * (a duplicate within one group sees the earlier insert). */
        {st->wr, &st->insert,
         "INSERT OR IGNORE INTO messages (id, case_id, sender, recipient, kind, priority,"
         " created_at, deadline, accepted_at, state, attempts, size)"
         " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0, 0, ?10)"},
        {st->wr, &st->insert_body, "INSERT INTO bodies (seq, envelope) VALUES (?1, ?2)"},
        {st->wr, &st->lookup, "SELECT seq FROM messages WHERE id = ?1"},
        /* state = 0 guards: a message settles once; a late or repeated mark
         * does not turn a delivered message into a dead one or back. */
        {st->wr, &st->delivered,
         "UPDATE messages SET state = 1, delivered_at = ?2 WHERE seq = ?1 AND state = 0"},
        {st->wr, &st->dead,
         "UPDATE messages SET state = 2, dead_reason = ?2 WHERE seq = ?1 AND state = 0"},
        {st->wr, &st->page_count, "PRAGMA page_count"},
        {st->rd, &st->scan,
         "SELECT seq, id, case_id, sender, recipient, kind, priority, accepted_at,"
         " size FROM messages WHERE state = 0 ORDER BY priority DESC, seq ASC"},
        {st->rd, &st->fetch, "SELECT envelope FROM bodies WHERE seq = ?1"},
    };
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        if (s_prepare(all[i].db, all[i].sql, all[i].stmt) != SQLITE_OK) {
            ml_seterr(err, errlen, "cannot prepare statements on %s: %s", st->path,
                      sqlite3_errmsg(all[i].db));
            return ML_ESTORE;
        }
    }
    return 0;
}

static void s_free_list(ml_store_req_t *r)
{
    while (r) {
        ml_store_req_t *next = r->next;
        free(r);
        r = next;
    }
}

/* Releases everything but the struct and its async handle: statements,
 * connections, the queues, the mutex. Runs with no store thread alive. */
static void s_release(ml_store_t *st)
{
    sqlite3_stmt **stmts[] = {&st->scan,      &st->fetch,  &st->begin,     &st->commit,
                              &st->rollback,  &st->insert, &st->lookup,    &st->insert_body,
                              &st->delivered, &st->dead,   &st->page_count};
    for (size_t i = 0; i < sizeof stmts / sizeof stmts[0]; i++) {
        sqlite3_finalize(*stmts[i]);
        *stmts[i] = NULL;
    }
    /* The reader goes first so that the writer is the last connection: the
     * last one to close checkpoints the WAL into the database and removes
     * the -wal and -shm files. */
    if (sqlite3_close(st->rd) != SQLITE_OK)
        ml_log(ML_LOG_ERROR, S_COMPONENT, "closing the reader of %s: %s", st->path,
               sqlite3_errmsg(st->rd));
    sqlite3_close(st->ck);
    st->ck = NULL;
    if (sqlite3_close(st->wr) != SQLITE_OK)
        ml_log(ML_LOG_ERROR, S_COMPONENT, "closing %s: %s", st->path, sqlite3_errmsg(st->wr));
    st->rd = st->wr = NULL;
    s_free_list(st->head);
    s_free_list(st->done_head);
    st->head = st->tail = st->done_head = st->done_tail = NULL;
    if (st->mu_ok) {
        uv_cond_destroy(&st->cv);
        uv_mutex_destroy(&st->mu);
        st->mu_ok = 0;
    }
}

static void s_free(ml_store_t *st)
{
    free(st->path);
    free(st);
}

static void s_async_close_cb(uv_handle_t *h)
{
    s_free(h->data);
}

/* Maps a failed SQLite call of the store thread to an ML_E* code, logging
 * it. A full disk is logged once when it starts, not for every batch. */
static int s_write_error(ml_store_t *st, int src)
{
    if ((src & 0xff) == SQLITE_FULL) {
        if (!st->disk_full)
            ml_log(ML_LOG_WARN, S_COMPONENT, "%s: disk full, refusing messages until it has room",
                   st->path);
        st->disk_full = 1;
        return ML_EFULL;
    }
    ml_log(ML_LOG_ERROR, S_COMPONENT, "%s: write failed: %s (%s)", st->path, sqlite3_errmsg(st->wr),
           sqlite3_errstr(src));
    return ML_ESTORE;
}

/* Inserts one put inside the open transaction, or refuses it for the quota
 * (r->rc = ML_EFULL; not an error of the transaction). Returns an SQLite
 * result code: SQLITE_DONE when the transaction may go on. */
static int s_insert(ml_store_t *st, ml_store_req_t *r, int64_t now)
{
    int src;
    if (st->max_bytes > 0) {
        /* In a write transaction page_count already counts this group's
         * pages, so the check is per put and the quota overshoots by at most
         * one message. It is read from the pager's memory: no I/O. */
        src = sqlite3_step(st->page_count);
        int64_t pages = src == SQLITE_ROW ? sqlite3_column_int64(st->page_count, 0) : 0;
        sqlite3_reset(st->page_count);
        if (src != SQLITE_ROW)
            return src == SQLITE_DONE ? SQLITE_ERROR : src;
        if (pages * st->page_size > st->max_bytes) {
            if (!st->quota_full)
                ml_log(ML_LOG_WARN, S_COMPONENT,
                       "%s: %lld bytes is over max_bytes %lld, refusing messages", st->path,
                       (long long)(pages * st->page_size), (long long)st->max_bytes);
            st->quota_full = 1;
            r->rc = ML_EFULL;
            return SQLITE_DONE;
        }
        st->quota_full = 0;
    }

    sqlite3_stmt *s = st->insert;
    sqlite3_bind_text(s, 1, r->id, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, r->case_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 3, r->sender, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 4, r->recipient, -1, SQLITE_STATIC);
    sqlite3_bind_int(s, 5, r->kind);
    sqlite3_bind_int(s, 6, r->priority);
    sqlite3_bind_int64(s, 7, r->created_at);
    sqlite3_bind_int64(s, 8, r->deadline);
    sqlite3_bind_int64(s, 9, now);
    /* r->envelope is never NULL, so an empty envelope is stored as an empty
     * blob, not as NULL. */
    sqlite3_bind_int64(s, 10, (sqlite3_int64)r->envelope_len);
    src = s_run(s);
    if (src != SQLITE_DONE)
        return src;
    if (sqlite3_changes(st->wr) == 1) {
        r->seq = sqlite3_last_insert_rowid(st->wr);
        sqlite3_stmt *b = st->insert_body;
        sqlite3_bind_int64(b, 1, r->seq);
        sqlite3_bind_blob64(b, 2, r->envelope, r->envelope_len, SQLITE_STATIC);
        src = s_run(b);
        if (src != SQLITE_DONE)
            return src;
        r->rc = 0;
        return SQLITE_DONE;
    }

    sqlite3_bind_text(st->lookup, 1, r->id, -1, SQLITE_STATIC);
    src = sqlite3_step(st->lookup);
    if (src == SQLITE_ROW) {
        r->seq = sqlite3_column_int64(st->lookup, 0);
        r->duplicate = 1;
        r->rc = 0;
        src = SQLITE_DONE;
    } else if (src == SQLITE_DONE) {
        /* Ignored yet absent: some other constraint refused the row. */
        ml_log(ML_LOG_ERROR, S_COMPONENT, "%s: message %s was refused by the schema", st->path,
               r->id);
        r->rc = ML_ESTORE;
    }
    sqlite3_reset(st->lookup);
    sqlite3_clear_bindings(st->lookup);
    return src;
}

static int s_mark(ml_store_t *st, ml_store_req_t *r, int64_t now)
{
    sqlite3_stmt *s = r->op == S_OP_DELIVERED ? st->delivered : st->dead;
    sqlite3_bind_int64(s, 1, r->seq);
    if (r->op == S_OP_DELIVERED)
        sqlite3_bind_int64(s, 2, now);
    else
        sqlite3_bind_text(s, 2, r->reason, -1, SQLITE_STATIC);
    return s_run(s);
}

/* Runs the batch as one write transaction. With with_puts = 0 the puts are
 * skipped (a retry of the marks alone after the puts broke the first try).
 * Returns 0 once committed, or ML_EFULL / ML_ESTORE after rolling back, in
 * which case the puts' own results are meaningless. Store thread. */
static int s_exec_batch(ml_store_t *st, ml_store_req_t *batch, int with_puts)
{
    int rc = 0;
    int64_t now = ml_now_ms();
    int src = s_run(st->begin);
    if (src != SQLITE_DONE)
        goto out;
    for (ml_store_req_t *r = batch; r; r = r->next) {
        if (r->op == S_OP_PUT)
            src = with_puts ? s_insert(st, r, now) : SQLITE_DONE;
        else
            src = s_mark(st, r, now);
        if (src != SQLITE_DONE)
            goto out;
    }
    src = s_run(st->commit);
out:
    if (src != SQLITE_DONE) {
        rc = s_write_error(st, src);
        /* SQLite rolls back by itself after some errors (a full disk among
         * them); after the others the transaction is still open. */
        if (!sqlite3_get_autocommit(st->wr))
            s_run(st->rollback);
    } else if (st->disk_full) {
        ml_log(ML_LOG_INFO, S_COMPONENT, "%s: disk has room again", st->path);
        st->disk_full = 0;
    }
    return rc;
}

/* Settles one batch: fills every put's rc, seq and duplicate. Returns the
 * number of requests that failed and counts committed transactions. Store
 * thread. */
static uint64_t s_settle_batch(ml_store_t *st, ml_store_req_t *batch, uint64_t *transactions)
{
    int has_puts = 0, has_marks = 0;
    for (ml_store_req_t *r = batch; r; r = r->next) {
        if (r->op == S_OP_PUT)
            has_puts = 1;
        else
            has_marks = 1;
    }
    int rc = s_exec_batch(st, batch, 1);
    int mark_rc = rc;
    if (rc == 0) {
        (*transactions)++;
    } else {
        for (ml_store_req_t *r = batch; r; r = r->next) {
            if (r->op == S_OP_PUT) {
                r->rc = rc;
                r->seq = 0;
                r->duplicate = 0;
            }
        }
        /* A put can break a transaction the marks alone would not (a full
         * quota or disk grows the file only for inserts), so the marks get a
         * second chance; losing one means a redelivery, not a loss. */
        if (has_puts && has_marks && (mark_rc = s_exec_batch(st, batch, 0)) == 0)
            (*transactions)++;
    }
    uint64_t failed = 0;
    for (ml_store_req_t *r = batch; r; r = r->next)
        failed += r->op == S_OP_PUT ? r->rc != 0 : mark_rc != 0;
    return failed;
}

/* Every S_CKPT_MS, copies committed WAL frames into the database. */
#define S_CKPT_MS 50
static void s_ckpt_main(void *arg)
{
    pthread_setname_np(pthread_self(), "ml-ckpt");
    ml_store_t *st = arg;
    uv_mutex_lock(&st->mu);
    while (!st->stopping) {
        uv_cond_timedwait(&st->ckpt_cv, &st->mu, (uint64_t)S_CKPT_MS * 1000000u);
        if (st->stopping)
            break;
        uv_mutex_unlock(&st->mu);
        int nlog = 0, nckpt = 0;
        int src = sqlite3_wal_checkpoint_v2(st->ck, NULL, SQLITE_CHECKPOINT_PASSIVE, &nlog, &nckpt);
        if (src != SQLITE_OK && src != SQLITE_BUSY)
            ml_log(ML_LOG_WARN, S_COMPONENT, "checkpoint of %s: %s", st->path,
                   sqlite3_errmsg(st->ck));
        uv_mutex_lock(&st->mu);
    }
    uv_mutex_unlock(&st->mu);
}

static void s_thread_main(void *arg)
{
    /* A name in top/perf: the store thread is the broker's other core. */
    pthread_setname_np(pthread_self(), "ml-store");
    ml_store_t *st = arg;
    uv_mutex_lock(&st->mu);
    for (;;) {
        while (!st->head && !st->stopping)
            uv_cond_wait(&st->cv, &st->mu);
        if (!st->head)
            break; /* stopping, and everything queued is committed */

        /* Take up to batch_max requests; the rest wait for the next group. */
        ml_store_req_t *batch = st->head, *last = st->head;
        uint64_t n = 1;
        while (last->next && n < (uint64_t)st->batch_max) {
            last = last->next;
            n++;
        }
        st->head = last->next;
        if (!st->head)
            st->tail = NULL;
        last->next = NULL;
        st->stats.queue_len -= n;
        uv_mutex_unlock(&st->mu);

        uint64_t transactions = 0;
        uint64_t failed = s_settle_batch(st, batch, &transactions);

        uv_mutex_lock(&st->mu);
        st->stats.transactions += transactions;
        st->stats.failures += failed;
        int notify = 0;
        for (ml_store_req_t *r = batch, *next; r; r = next) {
            next = r->next;
            if (r->op != S_OP_PUT) {
                free(r);
                continue;
            }
            if (r->rc == 0 && r->duplicate)
                st->stats.duplicates++;
            else if (r->rc == 0)
                st->stats.puts++;
            r->next = NULL;
            if (st->done_tail)
                st->done_tail->next = r;
            else
                st->done_head = r;
            st->done_tail = r;
            notify = 1;
        }
        /* uv_async_send is safe from any thread; the handle outlives this
         * thread because ml_store_close joins it before uv_close. */
        if (notify)
            uv_async_send(&st->async);
    }
    uv_mutex_unlock(&st->mu);
}

/* Loop thread: runs the callbacks of every settled put, in request order. */
static void s_async_cb(uv_async_t *h)
{
    ml_store_t *st = h->data;
    uv_mutex_lock(&st->mu);
    ml_store_req_t *r = st->done_head;
    st->done_head = st->done_tail = NULL;
    uv_mutex_unlock(&st->mu);

    while (r) {
        ml_store_req_t *next = r->next;
        /* A callback may close the store: the rest are then dropped without
         * their callbacks, as ml_store_close promises. st itself stays valid
         * until the close callback, which runs after this one returns. */
        if (!st->closed) {
            assert(st->inflight > 0);
            if (--st->inflight == 0)
                uv_unref((uv_handle_t *)&st->async);
            if (r->cb)
                r->cb(r->arg, r->rc, r->rc == 0 ? r->seq : 0, r->duplicate);
        }
        free(r);
        r = next;
    }
}

int ml_store_open(uv_loop_t *loop, const char *path, const ml_store_opts_t *opts, ml_store_t **out,
                  char *err, size_t errlen)
{
    int rc = ML_ESTORE;
    ml_seterr(err, errlen, "%s", "");
    if (!loop || !path || !out) {
        ml_seterr(err, errlen, "ml_store_open: missing argument");
        return ML_EINVAL;
    }
    *out = NULL;
    if (!sqlite3_threadsafe()) {
        ml_seterr(err, errlen, "%s: SQLite was built without thread support", path);
        return ML_ESTORE;
    }
    ml_store_t *st = calloc(1, sizeof *st);
    if (!st || !(st->path = strdup(path))) {
        free(st);
        ml_seterr(err, errlen, "%s: out of memory", path);
        return ML_ENOMEM;
    }
    st->loop = loop;
    st->batch_max = opts && opts->batch_max > 0 ? opts->batch_max : S_BATCH_MAX_DEFAULT;
    st->max_bytes = opts && opts->max_bytes > 0 ? opts->max_bytes : 0;

    if ((rc = s_open_writer(st, err, errlen)) != 0)
        goto out;
    rc = ML_ESTORE;
    /* The reader opens after the writer has made the file WAL and created
     * the schema: a read-only connection can do neither. */
    int src = sqlite3_open_v2(path, &st->rd, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
    if (src == SQLITE_OK)
        src = s_tune(st->rd);
    if (src != SQLITE_OK) {
        ml_seterr(err, errlen, "cannot open %s for reading: %s", path,
                  st->rd ? sqlite3_errmsg(st->rd) : sqlite3_errstr(src));
        goto out;
    }
    if ((rc = s_prepare_all(st, err, errlen)) != 0)
        goto out;

    rc = ML_ESTORE;
    if (uv_mutex_init(&st->mu) != 0) {
        ml_seterr(err, errlen, "%s: cannot create the store mutex", path);
        goto out;
    }
    if (uv_cond_init(&st->cv) != 0) {
        uv_mutex_destroy(&st->mu);
        ml_seterr(err, errlen, "%s: cannot create the store condition", path);
        goto out;
    }
    st->mu_ok = 1;
    int uvrc = uv_async_init(loop, &st->async, s_async_cb);
    if (uvrc != 0) {
        ml_seterr(err, errlen, "%s: cannot create the store's wake-up: %s", path,
                  uv_strerror(uvrc));
        goto out;
    }
    st->async.data = st;
    st->async_ok = 1;
    /* Idle until a put is in flight (see the file comment). */
    uv_unref((uv_handle_t *)&st->async);
    if ((uvrc = uv_thread_create(&st->thread, s_thread_main, st)) != 0) {
        ml_seterr(err, errlen, "%s: cannot start the store thread: %s", path, uv_strerror(uvrc));
        goto out;
    }
    /* Without a checkpointer the writer's own autocheckpoint still keeps
     * the WAL bounded, so a failure here is worth a warning only. */
    if (sqlite3_open_v2(path, &st->ck, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL) ==
            SQLITE_OK &&
        s_tune(st->ck) == SQLITE_OK && uv_cond_init(&st->ckpt_cv) == 0) {
        if (uv_thread_create(&st->ckpt_thread, s_ckpt_main, st) == 0)
            st->ckpt_ok = 1;
        else
            uv_cond_destroy(&st->ckpt_cv);
    }
    if (!st->ckpt_ok)
        ml_log(ML_LOG_WARN, S_COMPONENT, "%s: no checkpoint thread; the writer checkpoints", path);
    rc = 0;
out:
    if (rc != 0) {
        s_release(st);
        /* Once initialised, the async handle belongs to the loop until its
         * close callback, which frees the struct. */
        if (st->async_ok)
            uv_close((uv_handle_t *)&st->async, s_async_close_cb);
        else
            s_free(st);
        return rc;
    }
    *out = st;
    return 0;
}

void ml_store_close(ml_store_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    ml_store_t *st = *self_p;
    *self_p = NULL;
    st->closed = 1;

    uv_mutex_lock(&st->mu);
    st->stopping = 1;
    uv_cond_signal(&st->cv);
    if (st->ckpt_ok)
        uv_cond_signal(&st->ckpt_cv);
    uv_mutex_unlock(&st->mu);
    /* The thread commits everything still queued before it returns. */
    uv_thread_join(&st->thread);
    if (st->ckpt_ok) {
        uv_thread_join(&st->ckpt_thread);
        uv_cond_destroy(&st->ckpt_cv);
        st->ckpt_ok = 0;
    }
    ml_log(ML_LOG_INFO, S_COMPONENT,
           "%s closed: %llu messages stored in %llu transactions (%llu duplicates, %llu failed)",
           st->path, (unsigned long long)st->stats.puts, (unsigned long long)st->stats.transactions,
           (unsigned long long)st->stats.duplicates, (unsigned long long)st->stats.failures);

    s_release(st);
    uv_close((uv_handle_t *)&st->async, s_async_close_cb);
}

/* Appends a request to the store thread's queue. Loop thread. */
static int s_enqueue(ml_store_t *st, ml_store_req_t *r)
{
    uv_mutex_lock(&st->mu);
    if (st->stopping) {
        uv_mutex_unlock(&st->mu);
        free(r);
        return ML_ECLOSED;
    }
    if (st->tail)
        st->tail->next = r;
    else
        st->head = r;
    st->tail = r;
    st->stats.queue_len++;
    /* The thread is either waiting (and needs the signal) or committing
     * (and will find this request when it comes back for more). */
    uv_cond_signal(&st->cv);
    uv_mutex_unlock(&st->mu);
    return 0;
}

/* Copies s (which may be NULL) into the request's trailing buffer. */
static const char *s_copy_str(char **p, const char *s)
{
    if (!s)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = memcpy(*p, s, n);
    *p += n;
    return d;
}

int ml_store_put(ml_store_t *st, const ml_store_msg_t *m, ml_store_put_cb cb, void *arg)
{
    if (!st || !m || !m->id || (!m->envelope && m->envelope_len > 0))
        return ML_EINVAL;
    if (st->closed)
        return ML_ECLOSED;
    size_t size = sizeof(ml_store_req_t) + strlen(m->id) + 1 + m->envelope_len;
    const char *strs[] = {m->case_id, m->sender, m->recipient};
    for (size_t i = 0; i < 3; i++)
        size += strs[i] ? strlen(strs[i]) + 1 : 0;
    ml_store_req_t *r = malloc(size);
    if (!r)
        return ML_ENOMEM;
    *r = (ml_store_req_t){.op = S_OP_PUT,
                          .cb = cb,
                          .arg = arg,
                          .kind = m->kind,
                          .priority = m->priority,
                          .created_at = m->created_at,
                          .deadline = m->deadline,
                          .envelope_len = m->envelope_len};
    char *p = (char *)(r + 1);
    /* The envelope goes first: its pointer is then never NULL, even for an
     * empty envelope, which keeps SQLite from binding NULL. */
    if (m->envelope_len)
        memcpy(p, m->envelope, m->envelope_len);
    r->envelope = (const uint8_t *)p;
    p += m->envelope_len;
    r->id = s_copy_str(&p, m->id);
    r->case_id = s_copy_str(&p, m->case_id);
    r->sender = s_copy_str(&p, m->sender);
    r->recipient = s_copy_str(&p, m->recipient);

    int rc = s_enqueue(st, r);
    if (rc == 0 && st->inflight++ == 0)
        uv_ref((uv_handle_t *)&st->async);
    return rc;
}

static int s_mark_req(ml_store_t *st, int op, int64_t seq, const char *reason)
{
    if (!st)
        return ML_EINVAL;
    if (st->closed)
        return ML_ECLOSED;
    size_t size = sizeof(ml_store_req_t) + (reason ? strlen(reason) + 1 : 0);
    ml_store_req_t *r = malloc(size);
    if (!r)
        return ML_ENOMEM;
    *r = (ml_store_req_t){.op = op, .seq = seq};
    char *p = (char *)(r + 1);
    r->reason = s_copy_str(&p, reason);
    return s_enqueue(st, r);
}

int ml_store_mark_delivered(ml_store_t *st, int64_t seq)
{
    return s_mark_req(st, S_OP_DELIVERED, seq, NULL);
}

int ml_store_mark_dead(ml_store_t *st, int64_t seq, const char *reason)
{
    return s_mark_req(st, S_OP_DEAD, seq, reason);
}

int ml_store_scan_pending(ml_store_t *st, void (*cb)(void *arg, const ml_store_row_t *row),
                          void *arg)
{
    if (!st || !cb)
        return ML_EINVAL;
    /* A callback that scans again would reset the statement under us. */
    if (sqlite3_stmt_busy(st->scan))
        return ML_EINVAL;
    int rc = 0, src;
    sqlite3_stmt *s = st->scan;
    /* The statement reads row by row from the cache-capped connection:
     * memory stays flat however long the queue. length() of a blob does not
     * read the blob itself. */
    while ((src = sqlite3_step(s)) == SQLITE_ROW) {
        ml_store_row_t row = {
            .seq = sqlite3_column_int64(s, 0),
            .id = (const char *)sqlite3_column_text(s, 1),
            .case_id = (const char *)sqlite3_column_text(s, 2),
            .sender = (const char *)sqlite3_column_text(s, 3),
            .recipient = (const char *)sqlite3_column_text(s, 4),
            .kind = sqlite3_column_int(s, 5),
            .priority = sqlite3_column_int(s, 6),
            .accepted_at = sqlite3_column_int64(s, 7),
            .envelope_len = (size_t)sqlite3_column_int64(s, 8),
        };
        cb(arg, &row);
    }
    if (src != SQLITE_DONE) {
        ml_log(ML_LOG_ERROR, S_COMPONENT, "%s: scanning pending messages: %s", st->path,
               sqlite3_errmsg(st->rd));
        rc = ML_ESTORE;
    }
    /* Reset at once: a statement left mid-way keeps its read snapshot, which
     * stops checkpoints and lets the WAL grow without bound. */
    sqlite3_reset(s);
    return rc;
}

int ml_store_fetch(ml_store_t *st, int64_t seq, uint8_t **blob, size_t *len)
{
    if (!st || !blob || !len)
        return ML_EINVAL;
    int rc = 0;
    sqlite3_stmt *s = st->fetch;
    sqlite3_bind_int64(s, 1, seq);
    int src = sqlite3_step(s);
    if (src == SQLITE_DONE) {
        rc = ML_ENOTFOUND;
        goto out;
    }
    if (src != SQLITE_ROW) {
        ml_log(ML_LOG_ERROR, S_COMPONENT, "%s: fetching message %lld: %s", st->path, (long long)seq,
               sqlite3_errmsg(st->rd));
        rc = ML_ESTORE;
        goto out;
    }
    /* column_blob before column_bytes, as SQLite advises; an empty blob
     * comes back as NULL with length 0. */
    const void *data = sqlite3_column_blob(s, 0);
    size_t n = (size_t)sqlite3_column_bytes(s, 0);
    uint8_t *copy = malloc(n ? n : 1);
    if (!copy) {
        rc = ML_ENOMEM;
        goto out;
    }
    if (n)
        memcpy(copy, data, n);
    *blob = copy;
    *len = n;
out:
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    return rc;
}

void ml_store_stats(ml_store_t *st, ml_store_stats_t *out)
{
    if (!out)
        return;
    if (!st) {
        memset(out, 0, sizeof *out);
        return;
    }
    uv_mutex_lock(&st->mu);
    *out = st->stats;
    uv_mutex_unlock(&st->mu);
}
