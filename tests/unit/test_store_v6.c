/* Tests of the store's schema 6 (broker/store.c): a message row is written
 * once. Queued and delivered are rows of two narrow tables ("pending",
 * "delivered") rather than a state column rewritten in place, and the view
 * "messages" gives ops, tests and the soak's checker the columns of
 * schema 5 (state 0 queued, 1 delivered, 2 dead; delivered_at; sender and
 * recipient as names, which the rows hold as ids of "names"). A file of
 * schema 5 is refused, as schema 5 refused schema 4. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>
#include <sqlite3.h>
#include <uv.h>

#include "ml_common.h"
#include "store.h"
#include "support.h"

typedef struct {
    int called, rc;
    int64_t seq;
    char id[ML_ULID_LEN + 1];
} rec_t;

static void s_put_cb(void *arg, int rc, int64_t seq, int duplicate)
{
    (void)duplicate;
    rec_t *r = arg;
    r->called++;
    r->rc = rc;
    r->seq = seq;
}

static void s_path(char *out, size_t len)
{
    char dir[512];
    ml_test_tmpdir(dir, sizeof dir);
    snprintf(out, len, "%s/broker.db", dir);
}

static ml_store_t *s_open(uv_loop_t *loop, const char *path)
{
    ml_store_t *st = NULL;
    char err[256];
    int rc = ml_store_open(loop, path, NULL, &st, err, sizeof err);
    cr_assert_eq(rc, 0, "ml_store_open: %s (%s)", ml_strerror(rc), err);
    return st;
}

static void s_close(uv_loop_t *loop, ml_store_t **st)
{
    ml_store_close(st);
    uv_run(loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(loop), 0);
}

static void s_put_n(uv_loop_t *loop, ml_store_t *st, rec_t *recs, int n)
{
    static const uint8_t body[64] = {1, 2, 3};
    for (int i = 0; i < n; i++) {
        recs[i] = (rec_t){0};
        ml_ulid_new(recs[i].id);
        ml_store_msg_t m = {.id = recs[i].id,
                            .sender = "clinic-a",
                            .recipient = "hospital-b",
                            .kind = 1,
                            .created_at = ml_now_ms(),
                            .envelope = body,
                            .envelope_len = sizeof body};
        cr_assert_eq(ml_store_put(st, &m, s_put_cb, &recs[i]), 0);
    }
    uv_run(loop, UV_RUN_DEFAULT);
    for (int i = 0; i < n; i++)
        cr_assert(recs[i].called == 1 && recs[i].rc == 0, "put %d: %d", i, recs[i].rc);
}

static void s_barrier_cb(void *arg, int rc, int64_t seq, int duplicate)
{
    (void)seq;
    (void)duplicate;
    *(int *)arg = rc + 1;
}

static void s_barrier(uv_loop_t *loop, ml_store_t *st)
{
    int done = 0;
    cr_assert_eq(ml_store_barrier(st, s_barrier_cb, &done), 0);
    uv_run(loop, UV_RUN_DEFAULT);
    cr_assert_eq(done, 1);
}

/* One integer from an SQL query with one seq parameter, on a connection of
 * the test's own (as ops and the soak's checker read the file). */
static long long s_q(const char *path, const char *sql, int64_t seq)
{
    sqlite3 *db = NULL;
    cr_assert_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    sqlite3_stmt *s = NULL;
    cr_assert_eq(sqlite3_prepare_v2(db, sql, -1, &s, NULL), SQLITE_OK, "%s: %s", sql,
                 sqlite3_errmsg(db));
    if (sqlite3_bind_parameter_count(s) > 0)
        sqlite3_bind_int64(s, 1, seq);
    long long v = -1;
    if (sqlite3_step(s) == SQLITE_ROW)
        v = sqlite3_column_type(s, 0) == SQLITE_NULL ? -2 : sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
    sqlite3_close(db);
    return v;
}

static const char s_view_state[] = "SELECT state FROM messages WHERE seq = ?1";

/* A file of schema 5 (its "messages" a table) is named, not converted. */
Test(store_v6, schema_5_file_is_refused_with_its_version)
{
    char path[600];
    s_path(path, sizeof path);
    sqlite3 *db = NULL;
    cr_assert_eq(sqlite3_open(path, &db), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(db,
                              "CREATE TABLE messages (seq INTEGER PRIMARY KEY, id TEXT,"
                              " state INTEGER, delivered_at INTEGER, seg INTEGER);"
                              " PRAGMA user_version = 5;",
                              NULL, NULL, NULL),
                 SQLITE_OK);
    sqlite3_close(db);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = NULL;
    char err[256] = "";
    cr_assert_eq(ml_store_open(&loop, path, NULL, &st, err, sizeof err), ML_ESTORE);
    cr_assert_null(st);
    cr_assert(strstr(err, "schema version 5"), "error: %s", err);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(&loop), 0);
}

/* A delivered mark adds a narrow row and removes the queued one; the
 * message row keeps what its insert wrote (its state column still 0),
 * while the view reads as schema 5 did: delivered with its time. A late
 * dead mark does not undo it; the explicit one (F9) does, and a replay
 * queues the message again and forgets the delivery. */
Test(store_v6, delivered_mark_leaves_the_message_row_as_inserted)
{
    char path[600];
    s_path(path, sizeof path);
    static rec_t recs[4];
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = s_open(&loop, path);
    s_put_n(&loop, st, recs, 4);
    int64_t t0 = ml_now_ms();
    cr_assert_eq(ml_store_mark_delivered(st, recs[0].seq), 0);
    cr_assert_eq(ml_store_mark_delivered(st, recs[1].seq), 0);
    cr_assert_eq(ml_store_mark_dead(st, recs[2].seq, "test", 3), 0);
    s_barrier(&loop, st);
    /* Late and repeated marks of a settled message change nothing. */
    cr_assert_eq(ml_store_mark_dead(st, recs[0].seq, "late", 3), 0);
    cr_assert_eq(ml_store_mark_delivered(st, recs[0].seq), 0);
    cr_assert_eq(ml_store_mark_delivered(st, recs[2].seq), 0);
    s_barrier(&loop, st);

    /* Node names once, in "names"; rows hold their ids; the view names them. */
    cr_assert_eq(s_q(path, "SELECT count(*) FROM names", 0), 2);
    cr_assert_eq(s_q(path, "SELECT count(*) FROM msgs WHERE typeof(sender) = 'integer'", 0), 4);
    cr_assert_eq(s_q(path,
                     "SELECT count(*) FROM messages WHERE sender = 'clinic-a'"
                     " AND recipient = 'hospital-b'",
                     0),
                 4);
    cr_assert_eq(s_q(path, s_view_state, recs[0].seq), 1);
    cr_assert_eq(s_q(path, s_view_state, recs[2].seq), 2);
    cr_assert_eq(s_q(path, s_view_state, recs[3].seq), 0);
    cr_assert_geq(s_q(path, "SELECT delivered_at FROM messages WHERE seq = ?1", recs[0].seq), t0);
    cr_assert_eq(s_q(path, "SELECT delivered_at FROM messages WHERE seq = ?1", recs[3].seq), -2);
    cr_assert_eq(s_q(path, "SELECT state FROM msgs WHERE seq = ?1", recs[0].seq), 0,
                 "the delivered mark rewrote the message row");
    cr_assert_eq(s_q(path, "SELECT count(*) FROM pending", 0), 1);
    cr_assert_eq(s_q(path, "SELECT count(*) FROM delivered", 0), 2);

    /* F9: a delivered consult whose study never came whole is dead. */
    cr_assert_eq(ml_store_mark_dead_delivered(st, recs[1].seq, "study incomplete"), 0);
    s_barrier(&loop, st);
    cr_assert_eq(s_q(path, s_view_state, recs[1].seq), 2);
    cr_assert_eq(ml_store_replay(st, recs[1].seq), 0);
    s_barrier(&loop, st);
    cr_assert_eq(s_q(path, s_view_state, recs[1].seq), 0);
    cr_assert_eq(s_q(path, "SELECT count(*) FROM delivered WHERE seq = ?1", recs[1].seq), 0);
    /* Purged: no delivered row is left behind either. */
    cr_assert_eq(ml_store_purge(st, recs[2].seq), 0);
    s_barrier(&loop, st);
    cr_assert_eq(s_q(path, "SELECT count(*) FROM messages WHERE seq = ?1", recs[2].seq), 0);

    s_close(&loop, &st);
    cr_assert_eq(s_q(path, "SELECT count(*) FROM pending", 0), 2);
    cr_assert_eq(s_q(path, "SELECT count(*) FROM messages WHERE state = 0", 0), 2);
    cr_assert_eq(s_q(path, "SELECT count(*) FROM messages WHERE state = 1", 0), 1);
}
