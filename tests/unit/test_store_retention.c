/* Tests of the store's retention (broker/store.c): which rows a pruning run
 * removes and which it keeps (queued messages, dead letters, messages of
 * open cases), ml_store_prune's answer, ml_store_info's counts, and the
 * one-time conversion of an older file to incremental auto-vacuum. Each
 * test runs its own uv loop in its own temp folder. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>
#include <sqlite3.h>
#include <uv.h>

#include "cases.h"
#include "ml_common.h"
#include "store.h"
#include "support.h"

typedef struct {
    int called, rc;
    ml_store_pruned_t r;
} prune_res_t;

static void s_prune_cb(void *arg, int rc, const ml_store_pruned_t *r)
{
    prune_res_t *p = arg;
    p->called++;
    p->rc = rc;
    p->r = *r;
}

static void s_put_cb(void *arg, int rc, int64_t seq, int duplicate)
{
    (void)duplicate;
    int64_t *out = arg;
    *out = rc == 0 ? seq : -1;
}

/* Puts a message of 300 bytes (case_id may be NULL) and waits for it. */
static int64_t s_put(uv_loop_t *loop, ml_store_t *st, const char *case_id,
                     const ml_store_caseop_t *op)
{
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    uint8_t env[300];
    memset(env, 'e', sizeof env);
    ml_store_msg_t m = {.id = id,
                        .case_id = case_id,
                        .sender = "township.a.clinic",
                        .recipient = "county.a.hospital",
                        .kind = 10,
                        .created_at = ml_now_ms(),
                        .envelope = env,
                        .envelope_len = sizeof env,
                        .ops = op,
                        .n_ops = op ? 1 : 0};
    int64_t seq = 0;
    cr_assert_eq(ml_store_put(st, &m, s_put_cb, &seq), 0);
    uv_run(loop, UV_RUN_DEFAULT);
    cr_assert_gt(seq, 0, "put failed");
    return seq;
}

static ml_store_t *s_open(uv_loop_t *loop, const char *path, int64_t retention_ms)
{
    ml_store_opts_t o = {.retention_ms = retention_ms, .timeline_ms = -1, .prune_batch = 7};
    ml_store_t *st = NULL;
    char err[256];
    int rc = ml_store_open(loop, path, &o, &st, err, sizeof err);
    cr_assert_eq(rc, 0, "ml_store_open: %s", err);
    return st;
}

static prune_res_t s_prune(uv_loop_t *loop, ml_store_t *st)
{
    prune_res_t p = {0};
    cr_assert_eq(ml_store_prune(st, s_prune_cb, &p), 0);
    uv_run(loop, UV_RUN_DEFAULT);
    cr_assert_eq(p.called, 1);
    return p;
}

/* Waits until the marks queued so far have committed: a put behind them
 * settles after them. */
static void s_sync(uv_loop_t *loop, ml_store_t *st)
{
    s_put(loop, st, NULL, NULL);
}

Test(store_retention, prunes_delivered_keeps_queued_dead_and_open_cases)
{
    char dir[512], path[600];
    ml_test_tmpdir(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/broker.db", dir);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = s_open(&loop, path, 0);

    /* An open case with one delivered message. */
    ml_store_case_t row = {.case_id = "01CASEOPEN0000000000000000",
                           .kind = ML_CASE_REFERRAL,
                           .state = 1,
                           .opener = "township.a.clinic",
                           .target = "county.a.hospital",
                           .opened_at = ml_now_ms(),
                           .updated_at = ml_now_ms(),
                           .version = 1};
    ml_store_caseop_t op = {.row = row, .open = 1};
    int64_t in_open = s_put(&loop, st, row.case_id, &op);
    ml_store_mark_delivered(st, in_open);
    /* 20 delivered messages without a case, 3 queued, 2 dead. */
    int64_t seqs[25];
    for (int i = 0; i < 25; i++)
        seqs[i] = s_put(&loop, st, NULL, NULL);
    for (int i = 0; i < 20; i++)
        ml_store_mark_delivered(st, seqs[i]);
    ml_store_mark_dead(st, seqs[23], "test", 3);
    ml_store_mark_dead(st, seqs[24], "test", 3);
    s_sync(&loop, st);

    ml_store_info_t in;
    cr_assert_eq(ml_store_info(st, &in), 0);
    cr_assert_eq(in.msg_rows[ML_MSG_DELIVERED], 21);
    cr_assert_eq(in.msg_rows[ML_MSG_DEAD], 2);
    cr_assert_eq(in.body_rows, in.msg_rows[0] + in.msg_rows[1] + in.msg_rows[2]);
    cr_assert_eq(in.open_cases, 1);
    cr_assert_eq(in.auto_vacuum, 2, "a new file is incremental");

    /* Batches of 7: the run takes several steps and still removes all. */
    prune_res_t p = s_prune(&loop, st);
    cr_assert_eq(p.rc, 0);
    cr_assert_eq(p.r.messages, 20);
    cr_assert_eq(p.r.bodies, 20);
    cr_assert_eq(p.r.payload_bytes, 20 * 300);
    cr_assert_gt(p.r.started_at, 0);
    cr_assert_eq(ml_store_info(st, &in), 0);
    cr_assert_eq(in.msg_rows[ML_MSG_DELIVERED], 1, "the open case's message stays");
    cr_assert_eq(in.msg_rows[ML_MSG_DEAD], 2, "dead letters stay");
    cr_assert_geq(in.msg_rows[ML_MSG_QUEUED], 3, "queued messages stay");
    cr_assert_eq(in.last.messages, 20);
    uint8_t *blob = NULL;
    size_t len = 0;
    cr_assert_eq(ml_store_fetch(st, seqs[0], &blob, &len), ML_ENOTFOUND);
    cr_assert_eq(ml_store_fetch(st, seqs[21], &blob, &len), 0, "a queued body stays");
    free(blob);

    ml_store_close(&st);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(&loop), 0);
}

Test(store_retention, keep_for_ever_removes_nothing)
{
    char dir[512], path[600];
    ml_test_tmpdir(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/broker.db", dir);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = s_open(&loop, path, -1);
    int64_t seq = s_put(&loop, st, NULL, NULL);
    ml_store_mark_delivered(st, seq);
    s_sync(&loop, st);
    prune_res_t p = s_prune(&loop, st);
    cr_assert_eq(p.rc, 0);
    cr_assert_eq(p.r.messages, 0);
    cr_assert_eq(p.r.bodies, 0);
    ml_store_close(&st);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(&loop), 0);
}

Test(store_retention, older_file_converted_to_incremental_vacuum)
{
    char dir[512], path[600];
    ml_test_tmpdir(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/broker.db", dir);
    /* A file as an older broker left it: tables, no auto-vacuum, schema 2. */
    sqlite3 *db = NULL;
    cr_assert_eq(sqlite3_open(path, &db), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(db,
                              "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES(1);"
                              " PRAGMA user_version=2;",
                              NULL, NULL, NULL),
                 SQLITE_OK);
    sqlite3_close(db);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = s_open(&loop, path, 0);
    ml_store_info_t in;
    cr_assert_eq(ml_store_info(st, &in), 0);
    cr_assert_eq(in.auto_vacuum, 2, "not converted (auto_vacuum %d)", in.auto_vacuum);
    ml_store_close(&st);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(&loop), 0);
}
