/* Tests of the durable store (broker/store.c): group commit and callback
 * order, duplicates, reload after reopen, fetch, the max_bytes quota, a
 * disk that fills up and empties again (a fault-injecting SQLite VFS), and a
 * process killed in the middle of committing, after which everything it had
 * reported stored must still be there. Each test runs its own uv loop in its
 * own temp folder. */
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <sqlite3.h>
#include <uv.h>

#include "ml_common.h"
#include "ml_imaging.h"
#include "store.h"
#include "support.h"

/* ---- helpers ---------------------------------------------------------- */

typedef struct put_log put_log_t;

/* One put's outcome, filled by its callback. */
typedef struct {
    put_log_t *log;
    int index;
    int called;
    int rc;
    int64_t seq;
    int duplicate;
    char id[ML_ULID_LEN + 1];
} put_rec_t;

struct put_log {
    int ncalls;
    int *order; /* order[k] = index of the k-th callback */
    int cap;
};

static void put_cb(void *arg, int rc, int64_t seq, int duplicate)
{
    put_rec_t *p = arg;
    p->called++;
    p->rc = rc;
    p->seq = seq;
    p->duplicate = duplicate;
    if (p->log->ncalls < p->log->cap)
        p->log->order[p->log->ncalls] = p->index;
    p->log->ncalls++;
}

/* A recognisable envelope for message i: len bytes derived from i. */
static void make_envelope(uint8_t *buf, size_t len, int i)
{
    for (size_t k = 0; k < len; k++)
        buf[k] = (uint8_t)(i * 31 + k * 7 + (k >> 8));
}

static ml_store_msg_t make_msg(const char *id, int priority, const uint8_t *env, size_t len)
{
    return (ml_store_msg_t){.id = id,
                            .case_id = "case-1",
                            .sender = "clinic-a",
                            .recipient = "hospital-b",
                            .kind = 1,
                            .priority = priority,
                            .created_at = ml_now_ms(),
                            .deadline = 0,
                            .envelope = env,
                            .envelope_len = len};
}

static void db_path(char *out, size_t len)
{
    char dir[512];
    ml_test_tmpdir(dir, sizeof dir);
    snprintf(out, len, "%s/store.db", dir);
}

static ml_store_t *open_store(uv_loop_t *loop, const char *path, const ml_store_opts_t *opts)
{
    ml_store_t *st = NULL;
    char err[256];
    int rc = ml_store_open(loop, path, opts, &st, err, sizeof err);
    cr_assert_eq(rc, 0, "ml_store_open: %s (%s)", ml_strerror(rc), err);
    cr_assert_not_null(st);
    return st;
}

/* Closes the store and lets the loop free it, then closes the loop: any
 * handle left behind would make uv_loop_close fail. */
static void close_all(uv_loop_t *loop, ml_store_t **st)
{
    ml_store_close(st);
    cr_assert_null(*st);
    ml_store_close(st); /* safe twice */
    uv_run(loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(loop), 0, "a handle outlived ml_store_close");
}

/* Collects the pending rows of a scan (ids copied). */
typedef struct {
    int n, cap;
    int64_t *seq;
    int *priority;
    size_t *len;
    char (*id)[ML_ULID_LEN + 1];
} scan_t;

static void scan_cb(void *arg, const ml_store_row_t *row)
{
    scan_t *s = arg;
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 64;
        s->seq = realloc(s->seq, s->cap * sizeof *s->seq);
        s->priority = realloc(s->priority, s->cap * sizeof *s->priority);
        s->len = realloc(s->len, s->cap * sizeof *s->len);
        s->id = realloc(s->id, s->cap * sizeof *s->id);
        cr_assert(s->seq && s->priority && s->len && s->id);
    }
    s->seq[s->n] = row->seq;
    s->priority[s->n] = row->priority;
    s->len[s->n] = row->envelope_len;
    snprintf(s->id[s->n], sizeof s->id[s->n], "%s", row->id);
    s->n++;
}

static void scan_free(scan_t *s)
{
    free(s->seq);
    free(s->priority);
    free(s->len);
    free(s->id);
    memset(s, 0, sizeof *s);
}

static int scan_has_seq(const scan_t *s, int64_t seq)
{
    for (int i = 0; i < s->n; i++)
        if (s->seq[i] == seq)
            return 1;
    return 0;
}

/* Puts n messages (envelope_len bytes each, priority from prio(i) or 0)
 * and runs the loop until every callback has run. */
static void put_many(uv_loop_t *loop, ml_store_t *st, put_rec_t *recs, put_log_t *log, int n,
                     size_t envelope_len, int (*prio)(int))
{
    uint8_t *env = malloc(envelope_len ? envelope_len : 1);
    cr_assert_not_null(env);
    for (int i = 0; i < n; i++) {
        recs[i] = (put_rec_t){.log = log, .index = i};
        ml_ulid_new(recs[i].id);
        make_envelope(env, envelope_len, i);
        ml_store_msg_t m = make_msg(recs[i].id, prio ? prio(i) : 0, env, envelope_len);
        cr_assert_eq(ml_store_put(st, &m, put_cb, &recs[i]), 0);
    }
    free(env);
    /* The store keeps the loop alive exactly while puts are in flight. */
    uv_run(loop, UV_RUN_DEFAULT);
    for (int i = 0; i < n; i++)
        cr_assert_eq(recs[i].called, 1, "callback %d called %d times", i, recs[i].called);
}

/* ---- tests ------------------------------------------------------------ */

Test(store, group_commit_in_order)
{
    enum { N = 1000 };
    char path[600];
    db_path(path, sizeof path);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = open_store(&loop, path, NULL);

    static put_rec_t recs[N];
    int order[N];
    put_log_t log = {.order = order, .cap = N};
    put_many(&loop, st, recs, &log, N, 200, NULL);

    cr_assert_eq(log.ncalls, N);
    for (int k = 0; k < N; k++) {
        cr_assert_eq(order[k], k, "callback %d was for put %d", k, order[k]);
        cr_assert_eq(recs[k].rc, 0, "put %d: %s", k, ml_strerror(recs[k].rc));
        cr_assert_eq(recs[k].duplicate, 0);
        if (k > 0)
            cr_assert_gt(recs[k].seq, recs[k - 1].seq);
    }
    ml_store_stats_t stats;
    ml_store_stats(st, &stats);
    cr_assert_eq(stats.puts, N);
    cr_assert_eq(stats.duplicates, 0);
    cr_assert_eq(stats.failures, 0);
    cr_assert_eq(stats.queue_len, 0);
    cr_assert_geq(stats.transactions, 1);
    cr_assert_lt(stats.transactions, N, "no grouping: %llu transactions for %d puts",
                 (unsigned long long)stats.transactions, N);
    close_all(&loop, &st);
}

Test(store, batch_max_bounds_groups)
{
    enum { N = 100 };
    char path[600];
    db_path(path, sizeof path);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_opts_t opts = {.batch_max = 10};
    ml_store_t *st = open_store(&loop, path, &opts);
    static put_rec_t recs[N];
    int order[N];
    put_log_t log = {.order = order, .cap = N};
    put_many(&loop, st, recs, &log, N, 16, NULL);
    ml_store_stats_t stats;
    ml_store_stats(st, &stats);
    cr_assert_eq(stats.puts, N);
    cr_assert_geq(stats.transactions, N / 10);
    close_all(&loop, &st);
}

/* F7: a put of a stored id is a duplicate only for the same sender with the
 * same digest; another sender, or the same sender with other content, is
 * refused with ML_EIDUSED and the stored row stays as it was. A put without
 * a digest (the broker's own) compares senders only. */
Test(store, security_f7_id_reuse_is_not_a_duplicate)
{
    char path[600];
    db_path(path, sizeof path);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = open_store(&loop, path, NULL);

    enum { N = 5 };
    put_rec_t recs[N];
    int order[N];
    put_log_t log = {.order = order, .cap = N};
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    uint8_t env[] = {1, 2, 3}, other_env[] = {1, 2, 4};
    uint8_t d1[ML_STORE_DIGEST_LEN], d2[ML_STORE_DIGEST_LEN];
    cr_assert_eq(ml_sha256(env, sizeof env, d1), 0);
    cr_assert_eq(ml_sha256(other_env, sizeof other_env, d2), 0);
    struct {
        const char *sender;
        const uint8_t *digest;
        int rc, duplicate;
    } cases[N] = {
        {"clinic-a", d1, 0, 0},          /* the first */
        {"clinic-a", d1, 0, 1},          /* its resend */
        {"clinic-b", d1, ML_EIDUSED, 0}, /* another sender, same bytes */
        {"clinic-a", d2, ML_EIDUSED, 0}, /* same sender, other content */
        {"clinic-a", NULL, 0, 1},        /* no digest: sender only */
    };
    for (int i = 0; i < N; i++) {
        recs[i] = (put_rec_t){.log = &log, .index = i};
        ml_store_msg_t m = make_msg(id, 0, i == 3 ? other_env : env, sizeof env);
        m.sender = cases[i].sender;
        m.digest = cases[i].digest;
        cr_assert_eq(ml_store_put(st, &m, put_cb, &recs[i]), 0);
        /* Half in one group, half in separate transactions. */
        if (i % 2)
            uv_run(&loop, UV_RUN_DEFAULT);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    for (int i = 0; i < N; i++) {
        cr_assert_eq(recs[i].called, 1);
        cr_assert_eq(recs[i].rc, cases[i].rc, "put %d: rc %d, want %d", i, recs[i].rc, cases[i].rc);
        cr_assert_eq(recs[i].duplicate, cases[i].duplicate, "put %d", i);
    }
    ml_store_stats_t stats;
    ml_store_stats(st, &stats);
    cr_assert_eq(stats.puts, 1);
    close_all(&loop, &st);
}

Test(store, duplicate_id)
{
    char path[600];
    db_path(path, sizeof path);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = open_store(&loop, path, NULL);

    put_rec_t recs[4];
    int order[4];
    put_log_t log = {.order = order, .cap = 4};
    char id[ML_ULID_LEN + 1], other[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    ml_ulid_new(other);
    uint8_t env[] = {1, 2, 3};
    /* Same id twice, queued back to back (usually one group, where the
     * second insert must see the first, uncommitted one), another id between
     * them, then the id again in a later transaction. */
    const char *ids[] = {id, other, id};
    for (int i = 0; i < 3; i++) {
        recs[i] = (put_rec_t){.log = &log, .index = i};
        ml_store_msg_t m = make_msg(ids[i], 0, env, sizeof env);
        cr_assert_eq(ml_store_put(st, &m, put_cb, &recs[i]), 0);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    recs[3] = (put_rec_t){.log = &log, .index = 3};
    ml_store_msg_t m = make_msg(id, 5, env, sizeof env);
    cr_assert_eq(ml_store_put(st, &m, put_cb, &recs[3]), 0);
    uv_run(&loop, UV_RUN_DEFAULT);

    for (int i = 0; i < 4; i++) {
        cr_assert_eq(recs[i].called, 1);
        cr_assert_eq(recs[i].rc, 0);
    }
    cr_assert_eq(recs[0].duplicate, 0);
    cr_assert_eq(recs[1].duplicate, 0);
    cr_assert_eq(recs[2].duplicate, 1);
    cr_assert_eq(recs[3].duplicate, 1);
    cr_assert_eq(recs[2].seq, recs[0].seq);
    cr_assert_eq(recs[3].seq, recs[0].seq);
    cr_assert_neq(recs[1].seq, recs[0].seq);

    ml_store_stats_t stats;
    ml_store_stats(st, &stats);
    cr_assert_eq(stats.puts, 2);
    cr_assert_eq(stats.duplicates, 2);

    scan_t s = {0};
    cr_assert_eq(ml_store_scan_pending(st, scan_cb, &s), 0);
    cr_assert_eq(s.n, 2, "a duplicate made a row");
    scan_free(&s);
    close_all(&loop, &st);
}

static int prio_of(int i)
{
    return i % 3; /* 0, 1, 2, 0, 1, 2, ... */
}

Test(store, reopen_scan_order_and_delivery)
{
    enum { N = 300 };
    char path[600];
    db_path(path, sizeof path);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = open_store(&loop, path, NULL);
    static put_rec_t recs[N];
    int order[N];
    put_log_t log = {.order = order, .cap = N};
    put_many(&loop, st, recs, &log, N, 64, prio_of);
    /* Settle a few: delivered and dead messages leave the pending list. */
    cr_assert_eq(ml_store_mark_delivered(st, recs[0].seq), 0);
    cr_assert_eq(ml_store_mark_delivered(st, recs[5].seq), 0);
    cr_assert_eq(ml_store_mark_dead(st, recs[7].seq, "deadline passed", 0), 0);
    /* A mark for a message that does not exist changes nothing. */
    cr_assert_eq(ml_store_mark_delivered(st, 999999), 0);
    /* Closing commits the marks still queued. */
    close_all(&loop, &st);

    uv_loop_init(&loop);
    st = open_store(&loop, path, NULL);
    scan_t s = {0};
    cr_assert_eq(ml_store_scan_pending(st, scan_cb, &s), 0);
    cr_assert_eq(s.n, N - 3);
    cr_assert(!scan_has_seq(&s, recs[0].seq));
    cr_assert(!scan_has_seq(&s, recs[5].seq));
    cr_assert(!scan_has_seq(&s, recs[7].seq));
    for (int k = 1; k < s.n; k++) {
        int ordered = s.priority[k - 1] > s.priority[k] ||
                      (s.priority[k - 1] == s.priority[k] && s.seq[k - 1] < s.seq[k]);
        cr_assert(ordered, "row %d (prio %d seq %lld) after (prio %d seq %lld)", k, s.priority[k],
                  (long long)s.seq[k], s.priority[k - 1], (long long)s.seq[k - 1]);
        cr_assert_eq(s.len[k], 64);
    }
    cr_assert_eq(s.priority[0], 2);
    cr_assert_eq(s.priority[s.n - 1], 0);

    /* The ids survived; a put of one of them after the reopen is a
     * duplicate, with the original seq. */
    put_rec_t again = {.log = &log};
    log.ncalls = 0;
    uint8_t env[4] = {0};
    ml_store_msg_t m = make_msg(recs[42].id, 0, env, sizeof env);
    cr_assert_eq(ml_store_put(st, &m, put_cb, &again), 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(again.rc, 0);
    cr_assert_eq(again.duplicate, 1);
    cr_assert_eq(again.seq, recs[42].seq);

    /* A delivered message no longer pending is still readable. */
    uint8_t *blob = NULL;
    size_t len = 0;
    cr_assert_eq(ml_store_fetch(st, recs[0].seq, &blob, &len), 0);
    free(blob);
    scan_free(&s);
    close_all(&loop, &st);
}

Test(store, fetch_exact_bytes)
{
    char path[600];
    db_path(path, sizeof path);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = open_store(&loop, path, NULL);

    /* Sizes around SQLite's page and overflow boundaries, and empty. */
    static const size_t sizes[] = {0, 1, 1000, 4096, 4097, 70000};
    enum { K = sizeof sizes / sizeof sizes[0] };
    put_rec_t recs[K];
    int order[K];
    put_log_t log = {.order = order, .cap = K};
    for (int i = 0; i < K; i++) {
        uint8_t *env = malloc(sizes[i] + 1);
        make_envelope(env, sizes[i], i);
        recs[i] = (put_rec_t){.log = &log, .index = i};
        ml_ulid_new(recs[i].id);
        ml_store_msg_t m = make_msg(recs[i].id, 0, env, sizes[i]);
        if (sizes[i] == 0)
            m.envelope = NULL; /* allowed when empty */
        cr_assert_eq(ml_store_put(st, &m, put_cb, &recs[i]), 0);
        free(env); /* the store copied it */
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    for (int i = 0; i < K; i++) {
        cr_assert_eq(recs[i].rc, 0);
        uint8_t *blob = NULL;
        size_t len = 99;
        cr_assert_eq(ml_store_fetch(st, recs[i].seq, &blob, &len), 0);
        cr_assert_not_null(blob);
        cr_assert_eq(len, sizes[i]);
        uint8_t *want = malloc(sizes[i] + 1);
        make_envelope(want, sizes[i], i);
        cr_assert(memcmp(blob, want, len) == 0, "envelope %d differs", i);
        free(want);
        free(blob);
    }
    scan_t s = {0};
    cr_assert_eq(ml_store_scan_pending(st, scan_cb, &s), 0);
    cr_assert_eq(s.n, K);
    for (int i = 0; i < K; i++)
        cr_assert_eq(s.len[i], sizes[i]);
    scan_free(&s);
    close_all(&loop, &st);
}

Test(store, fetch_unknown)
{
    char path[600];
    db_path(path, sizeof path);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = open_store(&loop, path, NULL);
    uint8_t *blob = (uint8_t *)"untouched";
    size_t len = 7;
    cr_assert_eq(ml_store_fetch(st, 12345, &blob, &len), ML_ENOTFOUND);
    cr_assert_str_eq((char *)blob, "untouched");
    cr_assert_eq(len, 7);
    close_all(&loop, &st);
}

Test(store, max_bytes_quota)
{
    enum { N = 200 };
    char path[600];
    db_path(path, sizeof path);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_opts_t opts = {.max_bytes = 256 * 1024};
    ml_store_t *st = open_store(&loop, path, &opts);

    /* 200 x 4 KiB is about three times the quota. */
    static put_rec_t recs[N];
    int order[N];
    put_log_t log = {.order = order, .cap = N};
    put_many(&loop, st, recs, &log, N, 4096, NULL);
    int ok = 0;
    for (int i = 0; i < N; i++) {
        if (recs[i].rc == 0) {
            /* The file only grows, so the refusals are a suffix. */
            cr_assert_eq(ok, i, "put %d stored after an earlier refusal", i);
            ok++;
        } else {
            cr_assert_eq(recs[i].rc, ML_EFULL, "put %d: %s", i, ml_strerror(recs[i].rc));
            cr_assert_eq(recs[i].seq, 0);
        }
    }
    cr_assert_gt(ok, 10);
    cr_assert_lt(ok, N);
    ml_store_stats_t stats;
    ml_store_stats(st, &stats);
    cr_assert_eq(stats.puts, (uint64_t)ok);
    cr_assert_eq(stats.failures, (uint64_t)(N - ok));

    /* Full, yet deliveries still settle. */
    cr_assert_eq(ml_store_mark_delivered(st, recs[0].seq), 0);
    cr_assert_eq(ml_store_mark_dead(st, recs[1].seq, "expired", 0), 0);
    put_rec_t more = {.log = &log};
    uint8_t env[4096] = {0};
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    ml_store_msg_t m = make_msg(id, 0, env, sizeof env);
    cr_assert_eq(ml_store_put(st, &m, put_cb, &more), 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(more.rc, ML_EFULL);

    scan_t s = {0};
    cr_assert_eq(ml_store_scan_pending(st, scan_cb, &s), 0);
    cr_assert_eq(s.n, ok - 2);
    cr_assert(!scan_has_seq(&s, recs[0].seq));
    cr_assert(!scan_has_seq(&s, recs[1].seq));
    scan_free(&s);
    close_all(&loop, &st);
}

/* ---- a disk that fills up: a fault-injecting VFS ------------------------
 * Registered as the default VFS of this test's process (criterion runs each
 * test in its own), it forwards everything to the real one but fails every
 * write with SQLITE_FULL while s_disk_full is set, which is what the unix
 * VFS reports for ENOSPC. */

typedef struct {
    sqlite3_file base;
    sqlite3_file *real;
} ff_file_t;

static sqlite3_vfs *s_real_vfs;
static sqlite3_vfs s_ff_vfs;
static atomic_int s_disk_full;

#define FF_REAL(f) (((ff_file_t *)(f))->real)
#define FF_CALL(f, m, ...) FF_REAL(f)->pMethods->m(FF_REAL(f), __VA_ARGS__)

static int ff_close(sqlite3_file *f)
{
    return FF_REAL(f)->pMethods->xClose(FF_REAL(f));
}
static int ff_read(sqlite3_file *f, void *buf, int n, sqlite3_int64 off)
{
    return FF_CALL(f, xRead, buf, n, off);
}
static int ff_write(sqlite3_file *f, const void *buf, int n, sqlite3_int64 off)
{
    if (atomic_load(&s_disk_full))
        return SQLITE_FULL;
    return FF_CALL(f, xWrite, buf, n, off);
}
static int ff_truncate(sqlite3_file *f, sqlite3_int64 size)
{
    return FF_CALL(f, xTruncate, size);
}
static int ff_sync(sqlite3_file *f, int flags)
{
    return FF_CALL(f, xSync, flags);
}
static int ff_file_size(sqlite3_file *f, sqlite3_int64 *size)
{
    return FF_CALL(f, xFileSize, size);
}
static int ff_lock(sqlite3_file *f, int lock)
{
    return FF_CALL(f, xLock, lock);
}
static int ff_unlock(sqlite3_file *f, int lock)
{
    return FF_CALL(f, xUnlock, lock);
}
static int ff_check_reserved(sqlite3_file *f, int *out)
{
    return FF_CALL(f, xCheckReservedLock, out);
}
static int ff_file_control(sqlite3_file *f, int op, void *arg)
{
    return FF_CALL(f, xFileControl, op, arg);
}
static int ff_sector_size(sqlite3_file *f)
{
    return FF_REAL(f)->pMethods->xSectorSize(FF_REAL(f));
}
static int ff_device_chars(sqlite3_file *f)
{
    return FF_REAL(f)->pMethods->xDeviceCharacteristics(FF_REAL(f));
}
static int ff_shm_map(sqlite3_file *f, int pg, int pgsz, int extend, void volatile **pp)
{
    return FF_CALL(f, xShmMap, pg, pgsz, extend, pp);
}
static int ff_shm_lock(sqlite3_file *f, int offset, int n, int flags)
{
    return FF_CALL(f, xShmLock, offset, n, flags);
}
static void ff_shm_barrier(sqlite3_file *f)
{
    FF_REAL(f)->pMethods->xShmBarrier(FF_REAL(f));
}
static int ff_shm_unmap(sqlite3_file *f, int del)
{
    return FF_CALL(f, xShmUnmap, del);
}
static int ff_fetch(sqlite3_file *f, sqlite3_int64 off, int n, void **pp)
{
    return FF_CALL(f, xFetch, off, n, pp);
}
static int ff_unfetch(sqlite3_file *f, sqlite3_int64 off, void *p)
{
    return FF_CALL(f, xUnfetch, off, p);
}

static const sqlite3_io_methods s_ff_io = {
    .iVersion = 3,
    .xClose = ff_close,
    .xRead = ff_read,
    .xWrite = ff_write,
    .xTruncate = ff_truncate,
    .xSync = ff_sync,
    .xFileSize = ff_file_size,
    .xLock = ff_lock,
    .xUnlock = ff_unlock,
    .xCheckReservedLock = ff_check_reserved,
    .xFileControl = ff_file_control,
    .xSectorSize = ff_sector_size,
    .xDeviceCharacteristics = ff_device_chars,
    .xShmMap = ff_shm_map,
    .xShmLock = ff_shm_lock,
    .xShmBarrier = ff_shm_barrier,
    .xShmUnmap = ff_shm_unmap,
    .xFetch = ff_fetch,
    .xUnfetch = ff_unfetch,
};

static int ff_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *file, int flags,
                   int *out_flags)
{
    ff_file_t *f = (ff_file_t *)file;
    f->real = (sqlite3_file *)(f + 1);
    int rc = s_real_vfs->xOpen(s_real_vfs, name, f->real, flags, out_flags);
    /* SQLite calls xClose only when pMethods is set, so it mirrors the
     * real file's. */
    f->base.pMethods = f->real->pMethods ? &s_ff_io : NULL;
    return rc;
}

static void ff_install(void)
{
    s_real_vfs = sqlite3_vfs_find(NULL);
    cr_assert_not_null(s_real_vfs);
    cr_assert_geq(s_real_vfs->iVersion, 3);
    s_ff_vfs = *s_real_vfs;
    s_ff_vfs.zName = "ml-test-full";
    s_ff_vfs.szOsFile = (int)sizeof(ff_file_t) + s_real_vfs->szOsFile;
    s_ff_vfs.xOpen = ff_open;
    s_ff_vfs.pNext = NULL;
    cr_assert_eq(sqlite3_vfs_register(&s_ff_vfs, 1), SQLITE_OK);
}

Test(store, disk_full_then_room)
{
    enum { N = 50 };
    ff_install();
    char path[600];
    db_path(path, sizeof path);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = open_store(&loop, path, NULL);
    static put_rec_t a[N], b[N], c[N];
    int order[N];
    put_log_t log = {.order = order, .cap = N};

    put_many(&loop, st, a, &log, N, 512, NULL);
    for (int i = 0; i < N; i++)
        cr_assert_eq(a[i].rc, 0);

    /* The disk fills up: every put fails with ML_EFULL, and a delivery
     * mark queued alongside is kept and committed once there is room. */
    atomic_store(&s_disk_full, 1);
    cr_assert_eq(ml_store_mark_delivered(st, a[0].seq), 0);
    log.ncalls = 0;
    put_many(&loop, st, b, &log, N, 512, NULL);
    for (int i = 0; i < N; i++)
        cr_assert_eq(b[i].rc, ML_EFULL, "put %d: %s", i, ml_strerror(b[i].rc));
    ml_store_stats_t stats;
    ml_store_stats(st, &stats);
    cr_assert_geq(stats.failures, N);

    /* Space comes back: the same store goes on without a restart. */
    atomic_store(&s_disk_full, 0);
    log.ncalls = 0;
    put_many(&loop, st, c, &log, N, 512, NULL);
    for (int i = 0; i < N; i++)
        cr_assert_eq(c[i].rc, 0, "put %d after the disk emptied: %s", i, ml_strerror(c[i].rc));
    cr_assert_eq(ml_store_mark_delivered(st, a[1].seq), 0);
    close_all(&loop, &st);

    uv_loop_init(&loop);
    st = open_store(&loop, path, NULL);
    scan_t s = {0};
    cr_assert_eq(ml_store_scan_pending(st, scan_cb, &s), 0);
    cr_assert_eq(s.n, 2 * N - 2, "%d pending", s.n);
    for (int i = 0; i < N; i++) {
        cr_assert(i <= 1 || scan_has_seq(&s, a[i].seq));
        cr_assert(i > 1 || !scan_has_seq(&s, a[i].seq), "the mark of a[%d] was lost", i);
        cr_assert(scan_has_seq(&s, c[i].seq));
    }
    for (int k = 0; k < s.n; k++)
        for (int i = 0; i < N; i++)
            cr_assert_str_neq(s.id[k], b[i].id, "a refused put was stored");
    scan_free(&s);
    close_all(&loop, &st);
}

/* ---- crash: what was acknowledged survives SIGKILL --------------------- */

typedef struct {
    int fd;
    char id[ML_ULID_LEN + 1];
} crash_put_t;

static void crash_put_cb(void *arg, int rc, int64_t seq, int duplicate)
{
    crash_put_t *p = arg;
    if (rc != 0)
        _exit(3);
    char line[ML_ULID_LEN + 2];
    memcpy(line, p->id, ML_ULID_LEN);
    line[ML_ULID_LEN] = '\n';
    /* One write per ack, under PIPE_BUF: atomic, so the parent never sees
     * half an id. The ack leaves only once the callback has said stored. */
    if (write(p->fd, line, sizeof line - 1) != (ssize_t)sizeof line - 1)
        _exit(4);
}

/* Puts n messages and acknowledges each on fd as its callback reports it
 * stored; never returns (the parent kills it). */
static void crash_child(const char *path, int fd, int n)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = NULL;
    /* Small groups: many transactions, so the kill is likely to land inside
     * a commit rather than after the last one. */
    ml_store_opts_t opts = {.batch_max = 50};
    if (ml_store_open(&loop, path, &opts, &st, NULL, 0) != 0)
        _exit(2);
    crash_put_t *puts = calloc(n, sizeof *puts);
    uint8_t env[1024];
    for (int i = 0; i < n; i++) {
        puts[i].fd = fd;
        ml_ulid_new(puts[i].id);
        make_envelope(env, sizeof env, i);
        ml_store_msg_t m = make_msg(puts[i].id, 0, env, sizeof env);
        if (ml_store_put(st, &m, crash_put_cb, &puts[i]) != 0)
            _exit(5);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    /* Everything committed before the kill came: wait for it anyway, so
     * the child always dies the same way. */
    for (;;)
        pause();
}

static int cmp_id(const void *a, const void *b)
{
    return strcmp(a, b);
}

Test(store, acknowledged_puts_survive_sigkill)
{
    enum { N = 20000, KILL_AFTER = 1777 };
    enum { LINE = ML_ULID_LEN + 1 };
    char path[600];
    db_path(path, sizeof path);
    int pfd[2];
    cr_assert_eq(pipe(pfd), 0);
    fflush(NULL);
    pid_t pid = fork();
    cr_assert_neq(pid, -1);
    if (pid == 0) {
        close(pfd[0]);
        crash_child(path, pfd[1], N);
    }
    close(pfd[1]);

    /* Read acks; after KILL_AFTER of them, kill the child while it is still
     * committing (from outside, as a crash would: the child gets no say),
     * then read whatever it acknowledged before dying until EOF. */
    size_t cap = (size_t)N * LINE + 1, used = 0;
    char *buf = malloc(cap);
    int killed = 0;
    for (;;) {
        ssize_t got = read(pfd[0], buf + used, cap - 1 - used);
        if (got < 0 && errno == EINTR)
            continue;
        cr_assert_geq(got, 0);
        if (got == 0)
            break;
        used += (size_t)got;
        if (!killed && used / LINE >= KILL_AFTER) {
            cr_assert_eq(kill(pid, SIGKILL), 0);
            killed = 1;
        }
    }
    close(pfd[0]);
    int status = 0;
    cr_assert_eq(waitpid(pid, &status, 0), pid);
    cr_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL,
              "child did not die by SIGKILL (status %#x)", status);
    cr_assert_eq(used % LINE, 0);
    int acked = (int)(used / LINE);
    cr_assert_geq(acked, KILL_AFTER);

    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = open_store(&loop, path, NULL);
    scan_t s = {0};
    cr_assert_eq(ml_store_scan_pending(st, scan_cb, &s), 0);
    cr_log_info("%d of %d puts acknowledged before the kill, %d rows after it", acked, N, s.n);
    cr_assert_geq(s.n, acked);
    cr_assert_leq(s.n, N);
    qsort(s.id, s.n, sizeof s.id[0], cmp_id);
    for (int i = 0; i < acked; i++) {
        char id[ML_ULID_LEN + 1];
        memcpy(id, buf + (size_t)i * LINE, ML_ULID_LEN);
        id[ML_ULID_LEN] = '\0';
        cr_assert_not_null(bsearch(id, s.id, s.n, sizeof s.id[0], cmp_id),
                           "acknowledged %s (#%d) lost", id, i);
    }
    /* And the rows are whole: every envelope reads back complete. */
    for (int k = 0; k < s.n; k++)
        cr_assert_eq(s.len[k], 1024);
    free(buf);
    scan_free(&s);
    close_all(&loop, &st);
}

/* ---- cases and dead letters ------------------------------------------- */

typedef struct {
    int n;
    char state[8][32];
    int64_t version;
    int kind, closed, last_state;
} case_seen_t;

static void case_cb(void *arg, const ml_store_case_t *c)
{
    case_seen_t *s = arg;
    if (s->n < 8)
        snprintf(s->state[s->n], sizeof s->state[0], "%s", c->case_id);
    s->n++;
    s->version = c->version;
    s->kind = c->kind;
    s->closed = c->closed;
    s->last_state = c->state;
}

static void event_cb(void *arg, const ml_store_event_t *e)
{
    char *out = arg;
    size_t n = strlen(out);
    snprintf(out + n, 512 - n, "%s%s", n ? "," : "", e->event);
}

static ml_store_case_t case_row(const char *id, int state, int64_t version, int closed)
{
    return (ml_store_case_t){.case_id = id,
                             .kind = 1,
                             .state = state,
                             .priority = 2,
                             .opener = "clinic-a",
                             .target = "hospital-b",
                             .opening_id = id,
                             .opened_at = 1000,
                             .updated_at = 1000 + version,
                             .closed = closed,
                             .version = version};
}

/* Puts one message with one case change and runs the loop until it is
 * settled. */
static put_rec_t put_with_case(uv_loop_t *loop, ml_store_t *st, const char *id,
                               ml_store_caseop_t *op)
{
    static put_log_t log;
    static int order[16];
    log.order = order;
    log.cap = 16;
    put_rec_t rec = {.log = &log};
    uint8_t env[32];
    make_envelope(env, sizeof env, 1);
    ml_store_msg_t m = make_msg(id, 2, env, sizeof env);
    m.ops = op;
    m.n_ops = 1;
    cr_assert_eq(ml_store_put(st, &m, put_cb, &rec), 0);
    while (!rec.called)
        uv_run(loop, UV_RUN_ONCE);
    return rec;
}

typedef struct {
    char pairs[4][80];
    int64_t n[4];
    int k;
} count_seen_t;

static void count_cb(void *arg, const char *opener, const char *target, int64_t n)
{
    count_seen_t *s = arg;
    if (s->k < 4) {
        snprintf(s->pairs[s->k], sizeof s->pairs[0], "%s>%s", opener ? opener : "",
                 target ? target : "");
        s->n[s->k] = n;
    }
    s->k++;
}

/* The broker keeps in memory only the open cases with a deadline running
 * and counts the others from the store at start-up (F8): the two reads
 * it does that with. */
Test(store, open_cases_counted_and_timed_ones_listed)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    char path[600];
    db_path(path, sizeof path);
    ml_store_t *st = open_store(&loop, path, NULL);
    const char *cases[4] = {"idle-1", "idle-2", "timed", "final"};
    for (int i = 0; i < 4; i++) {
        char id[ML_ULID_LEN + 1];
        ml_ulid_new(id);
        ml_store_caseop_t op = {.row = case_row(cases[i], 1, 1, i == 3), .open = 1};
        op.row.opening_id = id;
        if (i == 2)
            op.row.deadline_at = 5000;
        if (i == 3)
            op.row.opener = "clinic-c";
        cr_assert_eq(put_with_case(&loop, st, id, &op).rc, 0);
    }
    count_seen_t k = {0};
    cr_assert_eq(ml_store_cases_open_counts(st, count_cb, &k), 0);
    cr_assert_eq(k.k, 1, "%d (opener, target) pairs", k.k);
    cr_assert_str_eq(k.pairs[0], "clinic-a>hospital-b");
    cr_assert_eq(k.n[0], 3, "a final case is not open");
    case_seen_t seen = {0};
    cr_assert_eq(ml_store_cases_timed(st, case_cb, &seen), 0);
    cr_assert_eq(seen.n, 1);
    cr_assert_str_eq(seen.state[0], "timed");
    close_all(&loop, &st);
}

Test(store, case_changes_commit_with_their_message_and_are_versioned)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    char path[600];
    db_path(path, sizeof path);
    ml_store_t *st = open_store(&loop, path, NULL);
    char id1[ML_ULID_LEN + 1], id2[ML_ULID_LEN + 1], id3[ML_ULID_LEN + 1];
    ml_ulid_new(id1);
    ml_ulid_new(id2);
    ml_ulid_new(id3);

    ml_store_event_t ev = {.at = 1, .node = "clinic-a", .event = "opened", .message_id = id1};
    ml_store_caseop_t op = {
        .row = case_row("case-1", 1, 1, 0), .open = 1, .events = &ev, .n_events = 1};
    put_rec_t r = put_with_case(&loop, st, id1, &op);
    cr_assert_eq(r.rc, 0);
    /* Opening the same case again is refused, message and all. */
    op.row.opening_id = id2;
    r = put_with_case(&loop, st, id2, &op);
    cr_assert_eq(r.rc, ML_EDUP);
    int64_t seq;
    cr_assert_eq(ml_store_lookup(st, id2, &seq, NULL), ML_ENOTFOUND,
                 "a refused change must not store its message");

    /* Version 2 follows version 1; a stale version 2 again is refused. */
    ml_store_event_t ev2 = {.at = 2, .node = "hospital-b", .event = "REFERRAL_ACCEPTED"};
    ml_store_caseop_t up = {.row = case_row("case-1", 3, 2, 0), .events = &ev2, .n_events = 1};
    r = put_with_case(&loop, st, id2, &up);
    cr_assert_eq(r.rc, 0);
    r = put_with_case(&loop, st, id3, &up);
    cr_assert_eq(r.rc, ML_EDENIED);
    /* The same message again is a duplicate: the row is not rewritten but
     * the version moves to the one the broker expects next. */
    up.row = case_row("case-1", 9, 3, 0);
    r = put_with_case(&loop, st, id2, &up);
    cr_assert_eq(r.rc, 0);
    cr_assert(r.duplicate);
    case_seen_t seen = {0};
    cr_assert_eq(ml_store_case_get(st, "case-1", case_cb, &seen), 0);
    cr_assert_eq(seen.version, 3);
    cr_assert_eq(seen.last_state, 3, "a duplicate must not change the state");
    char events[512] = "";
    cr_assert_eq(ml_store_case_events(st, "case-1", event_cb, events), 0);
    cr_assert_str_eq(events, "opened,REFERRAL_ACCEPTED");

    /* A change without a message; then the case closes and leaves the
     * open list but not the store. */
    ml_store_event_t ev3 = {.at = 3, .node = "broker", .event = "REFERRAL_CLOSED"};
    ml_store_caseop_t fin = {.row = case_row("case-1", 11, 4, 1), .events = &ev3, .n_events = 1};
    put_rec_t done = {0};
    put_log_t log = {.order = (int[4]){0}, .cap = 4};
    done.log = &log;
    cr_assert_eq(ml_store_case_apply(st, &fin, 1, put_cb, &done), 0);
    while (!done.called)
        uv_run(&loop, UV_RUN_ONCE);
    cr_assert_eq(done.rc, 0);
    memset(&seen, 0, sizeof seen);
    cr_assert_eq(ml_store_cases_open(st, case_cb, &seen), 0);
    cr_assert_eq(seen.n, 0);
    cr_assert_eq(ml_store_cases_query(st, 1, 11, 0, 10, case_cb, &seen), 0);
    cr_assert_eq(seen.n, 1);
    cr_assert(seen.closed);
    memset(&seen, 0, sizeof seen);
    cr_assert_eq(ml_store_cases_query(st, 2, -1, 0, 10, case_cb, &seen), 0);
    cr_assert_eq(seen.n, 0, "kind filter");
    close_all(&loop, &st);

    /* Everything survives a reopen. */
    uv_loop_init(&loop);
    st = open_store(&loop, path, NULL);
    memset(&seen, 0, sizeof seen);
    cr_assert_eq(ml_store_case_get(st, "case-1", case_cb, &seen), 0);
    cr_assert_eq(seen.version, 4);
    events[0] = '\0';
    cr_assert_eq(ml_store_case_events(st, "case-1", event_cb, events), 0);
    cr_assert_str_eq(events, "opened,REFERRAL_ACCEPTED,REFERRAL_CLOSED");
    close_all(&loop, &st);
}

typedef struct {
    int n;
    char id[4][ML_ULID_LEN + 1];
    char reason[4][64];
    int attempts[4];
} dead_seen_t;

static void dead_cb(void *arg, const ml_store_dead_t *d)
{
    dead_seen_t *s = arg;
    if (s->n < 4) {
        snprintf(s->id[s->n], sizeof s->id[0], "%s", d->id);
        snprintf(s->reason[s->n], sizeof s->reason[0], "%s", d->reason);
        s->attempts[s->n] = d->attempts;
    }
    s->n++;
}

Test(store, dead_letters_listed_replayed_and_purged)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    char path[600];
    db_path(path, sizeof path);
    ml_store_t *st = open_store(&loop, path, NULL);
    put_rec_t recs[3];
    put_log_t log = {0};
    put_many(&loop, st, recs, &log, 3, 32, NULL);
    cr_assert_eq(ml_store_mark_dead(st, recs[0].seq, "expired", 0), 0);
    cr_assert_eq(ml_store_mark_dead(st, recs[1].seq, "refused by the recipient", 4), 0);
    /* A put flushes the marks before it (one queue, in order). */
    put_rec_t more[1];
    put_log_t mlog = {0};
    put_many(&loop, st, more, &mlog, 1, 32, NULL);

    dead_seen_t seen = {0};
    int64_t n = 0;
    cr_assert_eq(ml_store_dead_count(st, &n), 0);
    cr_assert_eq(n, 2);
    cr_assert_eq(ml_store_dead_list(st, 10, dead_cb, &seen), 0);
    cr_assert_eq(seen.n, 2);
    memset(&seen, 0, sizeof seen);
    cr_assert_eq(ml_store_dead_get(st, recs[1].id, dead_cb, &seen), 0);
    cr_assert_str_eq(seen.reason[0], "refused by the recipient");
    cr_assert_eq(seen.attempts[0], 4);
    cr_assert_eq(ml_store_dead_get(st, recs[2].id, dead_cb, &seen), ML_ENOTFOUND,
                 "a queued message is not a dead letter");

    /* Replay makes it pending again; purge removes the other for good. */
    cr_assert_eq(ml_store_replay(st, recs[0].seq), 0);
    cr_assert_eq(ml_store_purge(st, recs[1].seq), 0);
    cr_assert_eq(ml_store_purge(st, recs[2].seq), 0); /* not dead: untouched */
    put_many(&loop, st, more, &mlog, 1, 32, NULL);
    cr_assert_eq(ml_store_dead_count(st, &n), 0);
    cr_assert_eq(n, 0);
    int state = -1;
    cr_assert_eq(ml_store_lookup(st, recs[0].id, NULL, &state), 0);
    cr_assert_eq(state, ML_MSG_QUEUED);
    cr_assert_eq(ml_store_lookup(st, recs[1].id, NULL, NULL), ML_ENOTFOUND);
    cr_assert_eq(ml_store_lookup(st, recs[2].id, NULL, &state), 0);
    cr_assert_eq(state, ML_MSG_QUEUED);
    scan_t sc = {0};
    cr_assert_eq(ml_store_scan_pending(st, scan_cb, &sc), 0);
    cr_assert(scan_has_seq(&sc, recs[0].seq), "the replayed message is pending again");
    scan_free(&sc);
    close_all(&loop, &st);
}

/* A put refused for now (here: a stale case version) closes its sender's
 * stream: the stream's puts queued behind it are refused the same way
 * without being tried, even those that would have been stored, until the
 * loop has run the refused put's callback. Another stream is not held up,
 * and the stream takes puts again afterwards. */
Test(store, a_refused_put_closes_its_stream_until_its_callback_ran)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    char path[600];
    db_path(path, sizeof path);
    ml_store_t *st = open_store(&loop, path, NULL);
    char ids[6][ML_ULID_LEN + 1];
    for (int i = 0; i < 6; i++)
        ml_ulid_new(ids[i]);
    ml_store_event_t ev = {.at = 1, .node = "clinic-a", .event = "opened", .message_id = ids[0]};
    ml_store_caseop_t op = {
        .row = case_row("case-1", 1, 1, 0), .open = 1, .events = &ev, .n_events = 1};
    cr_assert_eq(put_with_case(&loop, st, ids[0], &op).rc, 0);

    static put_rec_t rec[5];
    int order[8];
    put_log_t log = {.order = order, .cap = 8};
    uint8_t env[64];
    make_envelope(env, sizeof env, 3);
    /* 1: stream 7, a change expecting version 4 of a case at version 1. */
    ml_store_event_t ev2 = {.at = 2, .node = "hospital-b", .event = "REFERRAL_ACCEPTED"};
    ml_store_caseop_t stale = {.row = case_row("case-1", 3, 5, 0), .events = &ev2, .n_events = 1};
    ml_store_msg_t m = make_msg(ids[1], 0, env, sizeof env);
    m.ops = &stale;
    m.n_ops = 1;
    m.stream = 7;
    rec[0] = (put_rec_t){.log = &log, .index = 0};
    cr_assert_eq(ml_store_put(st, &m, put_cb, &rec[0]), 0);
    /* 2: stream 7 again, a plain message that would be stored; 3: stream
     * 9; 4: no stream. All queued before any callback runs. */
    const uint64_t streams[] = {7, 9, 0};
    for (int i = 1; i <= 3; i++) {
        m = make_msg(ids[i + 1], 0, env, sizeof env);
        m.stream = streams[i - 1];
        rec[i] = (put_rec_t){.log = &log, .index = i};
        cr_assert_eq(ml_store_put(st, &m, put_cb, &rec[i]), 0);
    }
    while (log.ncalls < 4)
        uv_run(&loop, UV_RUN_ONCE);
    cr_assert_eq(rec[0].rc, ML_EDENIED);
    cr_assert_eq(rec[1].rc, ML_EDENIED, "a put behind a refused one of its stream was tried: %s",
                 ml_strerror(rec[1].rc));
    cr_assert_eq(rec[2].rc, 0, "another stream was held up: %s", ml_strerror(rec[2].rc));
    cr_assert_eq(rec[3].rc, 0);
    int64_t seq;
    cr_assert_eq(ml_store_lookup(st, ids[2], &seq, NULL), ML_ENOTFOUND);

    /* The callbacks ran: the stream is open again. */
    m = make_msg(ids[5], 0, env, sizeof env);
    m.stream = 7;
    rec[4] = (put_rec_t){.log = &log, .index = 4};
    cr_assert_eq(ml_store_put(st, &m, put_cb, &rec[4]), 0);
    while (!rec[4].called)
        uv_run(&loop, UV_RUN_ONCE);
    cr_assert_eq(rec[4].rc, 0, "the stream stayed closed: %s", ml_strerror(rec[4].rc));
    cr_assert_eq(ml_store_lookup(st, ids[5], &seq, NULL), 0);
    close_all(&loop, &st);
}
