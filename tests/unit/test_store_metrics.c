/* What the store hands the broker for /metrics (broker/store.c): the group
 * histograms the store thread fills (sizes and commit times, one
 * observation per group, counted under the store's mutex) and the open
 * cases by kind and state read at start-up. */
#include <stdio.h>
#include <string.h>

#include <criterion/criterion.h>
#include <uv.h>

#include "ml_common.h"
#include "store.h"
#include "support.h"

typedef struct {
    int called;
    int rc;
} s_put_t;

static void s_put_cb(void *arg, int rc, int64_t seq, int duplicate)
{
    s_put_t *p = arg;
    (void)seq;
    (void)duplicate;
    p->called++;
    p->rc = rc;
}

static ml_store_t *s_open(uv_loop_t *loop, const ml_store_opts_t *opts)
{
    char dir[512], path[600], err[256];
    ml_test_tmpdir(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/store.db", dir);
    ml_store_t *st = NULL;
    int rc = ml_store_open(loop, path, opts, &st, err, sizeof err);
    cr_assert_eq(rc, 0, "ml_store_open: %s (%s)", ml_strerror(rc), err);
    return st;
}

static void s_close(uv_loop_t *loop, ml_store_t **st)
{
    ml_store_close(st);
    uv_run(loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(loop), 0);
}

/* Puts n messages of a case each (case ids case-0 ...) with the opening
 * row given by kind and state, and runs the loop until all are settled. */
static void s_put_cases(uv_loop_t *loop, ml_store_t *st, int n, int kind, int state, int closed,
                        const char *prefix)
{
    static s_put_t puts[512];
    cr_assert_leq(n, 512);
    for (int i = 0; i < n; i++) {
        char id[ML_ULID_LEN + 1], case_id[64];
        ml_ulid_new(id);
        snprintf(case_id, sizeof case_id, "%s-%d", prefix, i);
        uint8_t env[32] = {(uint8_t)i};
        ml_store_caseop_t op = {0};
        op.row.case_id = case_id;
        op.row.kind = kind;
        op.row.state = state;
        op.row.opener = "clinic-a";
        op.row.target = "hospital-b";
        op.row.opening_id = id;
        op.row.opened_at = op.row.updated_at = ml_now_ms();
        op.row.closed = closed;
        op.open = 1;
        op.row.version = 1;
        ml_store_msg_t m = {.id = id,
                            .case_id = case_id,
                            .sender = "clinic-a",
                            .recipient = "hospital-b",
                            .kind = 20,
                            .created_at = ml_now_ms(),
                            .envelope = env,
                            .envelope_len = sizeof env,
                            .ops = &op,
                            .n_ops = 1};
        puts[i] = (s_put_t){0};
        cr_assert_eq(ml_store_put(st, &m, s_put_cb, &puts[i]), 0);
    }
    uv_run(loop, UV_RUN_DEFAULT);
    for (int i = 0; i < n; i++)
        cr_assert(puts[i].called == 1 && puts[i].rc == 0, "put %d: %d calls, rc %d", i,
                  puts[i].called, puts[i].rc);
}

Test(store_metrics, group_histograms_count_every_group)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_opts_t opts = {.batch_max = 8};
    ml_store_t *st = s_open(&loop, &opts);
    s_put_cases(&loop, st, 200, 1, 1, 0, "h");
    ml_store_stats_t k;
    ml_store_stats(st, &k);
    cr_assert_gt(k.groups, 0);
    cr_assert_geq(k.groups, 200 / 8, "batch_max 8 makes at least 25 groups of 200 puts");
    cr_assert_eq(k.group_requests, 200, "every put is in exactly one group");
    uint64_t n = 0, m = 0;
    for (int i = 0; i < ML_STORE_GROUP_BUCKETS; i++)
        n += k.group_hist[i];
    for (int i = 0; i < ML_STORE_COMMIT_BUCKETS; i++)
        m += k.commit_hist[i];
    cr_assert_eq(n, k.groups);
    cr_assert_eq(m, k.groups);
    /* No group is over batch_max: the buckets above 16 stay empty. */
    for (int i = 0; i < ML_STORE_GROUP_BUCKETS; i++)
        if (i == ML_STORE_GROUP_BUCKETS - 1 || ml_store_group_le[i] > 16)
            cr_assert_eq(k.group_hist[i], 0, "a group in bucket %d", i);
    /* synchronous=FULL: each group waits for an fsync, which takes time. */
    cr_assert_gt(k.commit_us, 0);
    uint64_t db = 0, wal = 0;
    ml_store_file_sizes(st, &db, &wal);
    cr_assert_gt(db + wal, 0);
    s_close(&loop, &st);
}

typedef struct {
    int64_t n[4][16];
} s_states_t;

static void s_state_cb(void *arg, int kind, int state, int64_t n)
{
    s_states_t *s = arg;
    cr_assert(kind >= 0 && kind < 4 && state >= 0 && state < 16);
    s->n[kind][state] += n;
}

Test(store_metrics, open_cases_by_kind_and_state)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = s_open(&loop, NULL);
    s_put_cases(&loop, st, 3, 1, 1, 0, "sent");
    s_put_cases(&loop, st, 2, 2, 2, 0, "assigned");
    s_put_cases(&loop, st, 4, 1, 4, 1, "rejected"); /* final: not counted */
    s_states_t s;
    memset(&s, 0, sizeof s);
    cr_assert_eq(ml_store_cases_open_states(st, s_state_cb, &s), 0);
    cr_assert_eq(s.n[1][1], 3);
    cr_assert_eq(s.n[2][2], 2);
    cr_assert_eq(s.n[1][4], 0);
    s_close(&loop, &st);
}
