/* Tests of the store's segment files (broker/store.c, schema 5): bodies
 * live in append-only segments next to broker.db, written and synced
 * before the COMMIT of the rows that point at them. A torn tail (a group
 * cut short by a crash) is cut at start-up without losing a committed
 * body; a process killed at random moments loses nothing it reported
 * stored; delivered, dead and replayed marks hold across a restart; and
 * segments whose bodies retention dropped are removed. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <sqlite3.h>
#include <uv.h>

#include "ml_common.h"
#include "store.h"
#include "support.h"

/* ---- helpers ---------------------------------------------------------- */

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

/* Body i: len(i) bytes derived from i, so a read-back proves the bytes. */
static size_t s_len(int i)
{
    return 200 + (size_t)(i * 37) % 1800;
}

static void s_body(uint8_t *buf, size_t len, int i)
{
    for (size_t k = 0; k < len; k++)
        buf[k] = (uint8_t)(i * 131 + k * 7 + (k >> 5));
}

static ml_store_msg_t s_msg(const char *id, const uint8_t *env, size_t len)
{
    return (ml_store_msg_t){.id = id,
                            .sender = "clinic-a",
                            .recipient = "hospital-b",
                            .kind = 1,
                            .created_at = ml_now_ms(),
                            .envelope = env,
                            .envelope_len = len};
}

static void s_path(char *out, size_t len)
{
    char dir[512];
    ml_test_tmpdir(dir, sizeof dir);
    snprintf(out, len, "%s/broker.db", dir);
}

static ml_store_t *s_open(uv_loop_t *loop, const char *path, const ml_store_opts_t *o)
{
    ml_store_t *st = NULL;
    char err[256];
    int rc = ml_store_open(loop, path, o, &st, err, sizeof err);
    cr_assert_eq(rc, 0, "ml_store_open: %s (%s)", ml_strerror(rc), err);
    return st;
}

static void s_close(uv_loop_t *loop, ml_store_t **st)
{
    ml_store_close(st);
    uv_run(loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(loop), 0);
}

/* Puts bodies first..first+n-1, in groups as the store makes them. */
static void s_put_range(uv_loop_t *loop, ml_store_t *st, rec_t *recs, int first, int n)
{
    for (int i = 0; i < n; i++) {
        size_t len = s_len(first + i);
        uint8_t *b = malloc(len);
        s_body(b, len, first + i);
        recs[i] = (rec_t){0};
        ml_ulid_new(recs[i].id);
        ml_store_msg_t m = s_msg(recs[i].id, b, len);
        cr_assert_eq(ml_store_put(st, &m, s_put_cb, &recs[i]), 0);
        free(b);
    }
    uv_run(loop, UV_RUN_DEFAULT);
    for (int i = 0; i < n; i++)
        cr_assert(recs[i].called == 1 && recs[i].rc == 0, "put %d: %d", first + i, recs[i].rc);
}

static void s_expect_body(ml_store_t *st, int64_t seq, int i)
{
    uint8_t *got = NULL;
    size_t len = 0;
    int rc = ml_store_fetch(st, seq, &got, &len);
    cr_assert_eq(rc, 0, "fetch of seq %lld: %s", (long long)seq, ml_strerror(rc));
    size_t want = s_len(i);
    uint8_t *b = malloc(want);
    s_body(b, want, i);
    cr_assert_eq(len, want, "seq %lld: %zu bytes, %zu expected", (long long)seq, len, want);
    cr_assert_eq(memcmp(got, b, want), 0, "seq %lld: other bytes", (long long)seq);
    free(b);
    free(got);
}

static long long s_file_size(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 ? (long long)sb.st_size : -1;
}

typedef struct {
    int n;
    int64_t seq[4096];
    char id[4096][ML_ULID_LEN + 1];
} scan_t;

static void s_scan_cb(void *arg, const ml_store_row_t *row)
{
    scan_t *s = arg;
    if (s->n < 4096) {
        s->seq[s->n] = row->seq;
        snprintf(s->id[s->n], sizeof s->id[0], "%s", row->id);
    }
    s->n++;
}

static int s_scan_has(const scan_t *s, int64_t seq)
{
    for (int i = 0; i < s->n && i < 4096; i++)
        if (s->seq[i] == seq)
            return 1;
    return 0;
}

/* ---- torn tail ---------------------------------------------------------- */

Test(store_seg, torn_segment_tail_is_cut_and_committed_bodies_stay)
{
    enum { N = 120 };
    char path[600], seg[700];
    s_path(path, sizeof path);
    snprintf(seg, sizeof seg, "%s-seg/00000001.seg", path);
    static rec_t recs[N + 20];
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = s_open(&loop, path, NULL);
    s_put_range(&loop, st, recs, 0, N);
    s_close(&loop, &st);
    long long committed = s_file_size(seg);
    cr_assert_gt(committed, 0);

    /* A group that never committed: two whole records and a third cut in
     * its middle, as a crash during the pwrite would leave them. */
    int fd = open(seg, O_WRONLY | O_APPEND);
    cr_assert_geq(fd, 0);
    uint8_t junk[16 + 900];
    for (int r = 0; r < 3; r++) {
        memset(junk, 0, sizeof junk);
        junk[0] = (uint8_t)(900 & 0xff);
        junk[1] = (uint8_t)(900 >> 8);
        for (size_t k = 16; k < sizeof junk; k++)
            junk[k] = (uint8_t)k;
        size_t n = r < 2 ? sizeof junk : 16 + 300;
        cr_assert_eq(write(fd, junk, n), (ssize_t)n);
    }
    close(fd);
    cr_assert_gt(s_file_size(seg), committed);

    uv_loop_init(&loop);
    st = s_open(&loop, path, NULL);
    cr_assert_eq(s_file_size(seg), committed, "the torn tail was not cut at the committed end");
    for (int i = 0; i < N; i++)
        s_expect_body(st, recs[i].seq, i);
    /* Appending goes on from the cut: new bodies read back too. */
    s_put_range(&loop, st, recs + N, N, 20);
    for (int i = 0; i < 20; i++)
        s_expect_body(st, recs[N + i].seq, N + i);
    s_close(&loop, &st);

    /* And after another restart, every one of them. */
    uv_loop_init(&loop);
    st = s_open(&loop, path, NULL);
    for (int i = 0; i < N + 20; i++)
        s_expect_body(st, recs[i].seq, i);
    scan_t *s = calloc(1, sizeof *s);
    cr_assert_eq(ml_store_scan_pending(st, s_scan_cb, s), 0);
    cr_assert_eq(s->n, N + 20, "rows: %d", s->n);
    free(s);
    s_close(&loop, &st);
}

/* A damaged record in the middle of a segment is reported by the read of
 * that message (ML_EPROTO, which the broker turns into a dead letter),
 * and it does not take the committed records after it with it. */
Test(store_seg, damaged_record_fails_its_read_only)
{
    enum { N = 10 };
    char path[600], seg[700];
    s_path(path, sizeof path);
    snprintf(seg, sizeof seg, "%s-seg/00000001.seg", path);
    static rec_t recs[N];
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = s_open(&loop, path, NULL);
    s_put_range(&loop, st, recs, 0, N);
    s_close(&loop, &st);
    /* The first record's body starts at byte 16. */
    int fd = open(seg, O_RDWR);
    uint8_t c;
    cr_assert_eq(pread(fd, &c, 1, 16 + 50), 1);
    c ^= 0xff;
    cr_assert_eq(pwrite(fd, &c, 1, 16 + 50), 1);
    close(fd);
    uv_loop_init(&loop);
    st = s_open(&loop, path, NULL);
    uint8_t *got = NULL;
    size_t len = 0;
    cr_assert_eq(ml_store_fetch(st, recs[0].seq, &got, &len), ML_EPROTO);
    for (int i = 1; i < N; i++)
        s_expect_body(st, recs[i].seq, i);
    s_close(&loop, &st);
}

/* ---- kill -9 at random moments ---------------------------------------- */

#define S_LINE 40 /* "ID INDEX\n", padded */

typedef struct {
    int fd, index;
    char id[ML_ULID_LEN + 1];
} crash_t;

static void s_crash_cb(void *arg, int rc, int64_t seq, int duplicate)
{
    (void)seq;
    (void)duplicate;
    crash_t *p = arg;
    if (rc != 0)
        _exit(3);
    char line[S_LINE + 1];
    snprintf(line, sizeof line, "%-26s %-11d\n", p->id, p->index);
    /* One write of under PIPE_BUF per ack: atomic; sent only once the
     * callback said stored. */
    if (write(p->fd, line, S_LINE) != S_LINE)
        _exit(4);
    free(p);
}

static void s_crash_child(const char *path, int fd, int base)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = NULL;
    /* Small groups and small segments: many commits and several segment
     * starts for the kill to land in. */
    ml_store_opts_t o = {.batch_max = 16, .segment_bytes = 256 * 1024};
    if (ml_store_open(&loop, path, &o, &st, NULL, 0) != 0)
        _exit(2);
    uint8_t *b = malloc(4096);
    for (int i = base;; i++) {
        crash_t *p = malloc(sizeof *p);
        p->fd = fd;
        p->index = i;
        ml_ulid_new(p->id);
        size_t len = s_len(i);
        s_body(b, len, i);
        ml_store_msg_t m = s_msg(p->id, b, len);
        if (ml_store_put(st, &m, s_crash_cb, p) != 0)
            _exit(5);
        if (i % 40 == 39)
            uv_run(&loop, UV_RUN_NOWAIT);
    }
}

Test(store_seg, kill_9_at_random_moments_loses_no_acknowledged_body, .timeout = 240)
{
    enum { ROUNDS = 50, MAX_ACKS = 200000 };
    char path[600];
    s_path(path, sizeof path);
    srand((unsigned)time(NULL));
    typedef struct {
        char id[ML_ULID_LEN + 1];
        int index;
    } ack_t;
    ack_t *acks = calloc(MAX_ACKS, sizeof *acks);
    int n_acks = 0;
    char *buf = malloc(1 << 20);
    for (int round = 0; round < ROUNDS; round++) {
        int pfd[2];
        cr_assert_eq(pipe(pfd), 0);
        fflush(NULL);
        pid_t pid = fork();
        cr_assert_neq(pid, -1);
        if (pid == 0) {
            close(pfd[0]);
            s_crash_child(path, pfd[1], round * 1000000);
        }
        close(pfd[1]);
        /* The kill: at a random moment 5-80 ms after the first ack. */
        fcntl(pfd[0], F_SETFL, O_NONBLOCK);
        size_t used = 0;
        int64_t kill_at = 0;
        int killed = 0;
        for (;;) {
            ssize_t got = read(pfd[0], buf + used, (1 << 20) - used);
            if (got > 0) {
                used += (size_t)got;
                if (!kill_at)
                    kill_at = ml_mono_ms() + 5 + rand() % 76;
            } else if (got == 0) {
                break;
            } else if (errno != EAGAIN && errno != EINTR) {
                cr_assert_fail("read: %s", strerror(errno));
            } else {
                struct pollfd w = {.fd = pfd[0], .events = POLLIN};
                (void)poll(&w, 1, 1);
            }
            if (!killed && kill_at && ml_mono_ms() >= kill_at) {
                cr_assert_eq(kill(pid, SIGKILL), 0);
                killed = 1;
            }
            if (used + 4096 > (1 << 20) && !killed) {
                cr_assert_eq(kill(pid, SIGKILL), 0);
                killed = 1;
            }
        }
        close(pfd[0]);
        int status = 0;
        cr_assert_eq(waitpid(pid, &status, 0), pid);
        cr_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "child status %#x", status);
        cr_assert_eq(used % S_LINE, 0);
        for (size_t k = 0; k < used / S_LINE && n_acks < MAX_ACKS; k++) {
            char *line = buf + k * S_LINE;
            memcpy(acks[n_acks].id, line, ML_ULID_LEN);
            acks[n_acks].id[ML_ULID_LEN] = '\0';
            acks[n_acks].index = atoi(line + ML_ULID_LEN + 1);
            n_acks++;
        }

        /* Every acknowledged put of every round so far is there with its
         * whole body. Looked up by id (seq from the lookup). */
        uv_loop_t loop;
        uv_loop_init(&loop);
        ml_store_t *st = s_open(&loop, path, NULL);
        for (int a = 0; a < n_acks; a++) {
            int64_t seq = 0;
            int state = -1;
            cr_assert_eq(ml_store_lookup(st, acks[a].id, &seq, &state), 0,
                         "round %d: acknowledged %s (#%d) lost", round, acks[a].id, acks[a].index);
            s_expect_body(st, seq, acks[a].index);
        }
        s_close(&loop, &st);
    }
    cr_log_info("%d rounds, %d acknowledged puts checked", ROUNDS, n_acks);
    cr_assert_gt(n_acks, ROUNDS, "the children acknowledged almost nothing");
    free(buf);
    free(acks);
}

/* ---- marks across a restart -------------------------------------------- */

typedef struct {
    int n;
    int64_t seq[16];
} dead_t;

static void s_dead_cb(void *arg, const ml_store_dead_t *d)
{
    dead_t *x = arg;
    if (x->n < 16)
        x->seq[x->n] = d->seq;
    x->n++;
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

Test(store_seg, delivered_dead_and_replayed_marks_hold_across_restart)
{
    enum { N = 12 };
    char path[600];
    s_path(path, sizeof path);
    static rec_t recs[N];
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = s_open(&loop, path, NULL);
    s_put_range(&loop, st, recs, 0, N);
    for (int i = 0; i < 5; i++)
        cr_assert_eq(ml_store_mark_delivered(st, recs[i].seq), 0);
    cr_assert_eq(ml_store_mark_dead(st, recs[5].seq, "test", 3), 0);
    cr_assert_eq(ml_store_mark_dead(st, recs[6].seq, "test", 3), 0);
    s_barrier(&loop, st);
    s_close(&loop, &st);

    uv_loop_init(&loop);
    st = s_open(&loop, path, NULL);
    scan_t *s = calloc(1, sizeof *s);
    cr_assert_eq(ml_store_scan_pending(st, s_scan_cb, s), 0);
    cr_assert_eq(s->n, N - 7, "queued after restart: %d", s->n);
    for (int i = 0; i < N; i++)
        cr_assert_eq(s_scan_has(s, recs[i].seq), i >= 7, "seq %lld", (long long)recs[i].seq);
    dead_t d = {0};
    cr_assert_eq(ml_store_dead_list(st, 10, s_dead_cb, &d), 0);
    cr_assert_eq(d.n, 2);
    /* Replay one, purge the other. */
    cr_assert_eq(ml_store_replay(st, recs[5].seq), 0);
    cr_assert_eq(ml_store_purge(st, recs[6].seq), 0);
    s_barrier(&loop, st);
    s_close(&loop, &st);

    uv_loop_init(&loop);
    st = s_open(&loop, path, NULL);
    memset(s, 0, sizeof *s);
    cr_assert_eq(ml_store_scan_pending(st, s_scan_cb, s), 0);
    cr_assert_eq(s->n, N - 6);
    cr_assert(s_scan_has(s, recs[5].seq), "the replayed letter is not queued again");
    cr_assert(!s_scan_has(s, recs[6].seq));
    s_expect_body(st, recs[5].seq, 5);
    uint8_t *got = NULL;
    size_t len = 0;
    cr_assert_eq(ml_store_fetch(st, recs[6].seq, &got, &len), ML_ENOTFOUND);
    d.n = 0;
    cr_assert_eq(ml_store_dead_list(st, 10, s_dead_cb, &d), 0);
    cr_assert_eq(d.n, 0);
    free(s);
    s_close(&loop, &st);
}

/* ---- segments go when retention has dropped all their bodies ----------- */

static void s_prune_cb(void *arg, int rc, const ml_store_pruned_t *r)
{
    (void)r;
    *(int *)arg = rc + 1;
}

static int s_count_segments(const char *path)
{
    char dir[700];
    snprintf(dir, sizeof dir, "%s-seg", path);
    int n = 0;
    for (int no = 1; no < 1000; no++) {
        char f[800];
        snprintf(f, sizeof f, "%s/%08d.seg", dir, no);
        n += s_file_size(f) >= 0;
    }
    return n;
}

Test(store_seg, segments_without_live_bodies_are_removed)
{
    enum { N = 400 };
    char path[600];
    s_path(path, sizeof path);
    static rec_t recs[N];
    ml_store_opts_t o = {.retention_ms = 0, .timeline_ms = -1, .segment_bytes = 32 * 1024};
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = s_open(&loop, path, &o);
    /* Groups of 50 (each put range is its own set of groups). */
    for (int k = 0; k < N / 50; k++)
        s_put_range(&loop, st, recs + k * 50, k * 50, 50);
    int before = s_count_segments(path);
    cr_assert_geq(before, 4, "segments: %d", before);
    /* The first 300 delivered: retention drops them (no case: 0 ms). */
    for (int i = 0; i < 300; i++)
        cr_assert_eq(ml_store_mark_delivered(st, recs[i].seq), 0);
    s_barrier(&loop, st);
    uint64_t db0 = 0, wal0 = 0;
    ml_store_file_sizes(st, &db0, &wal0);
    int done = 0;
    cr_assert_eq(ml_store_prune(st, s_prune_cb, &done), 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(done, 1);
    int after = s_count_segments(path);
    cr_assert_lt(after, before, "no segment removed (%d)", after);
    uint64_t db1 = 0, wal1 = 0;
    ml_store_file_sizes(st, &db1, &wal1);
    cr_assert_lt(db1, db0, "the store's size did not shrink");
    for (int i = 300; i < N; i++)
        s_expect_body(st, recs[i].seq, i);
    s_close(&loop, &st);
    /* And after a restart, still every body that is left. */
    uv_loop_init(&loop);
    st = s_open(&loop, path, &o);
    for (int i = 300; i < N; i++)
        s_expect_body(st, recs[i].seq, i);
    cr_assert_eq(s_count_segments(path), after);
    s_close(&loop, &st);
}

/* ---- a file of schema 4 --------------------------------------------------- */

/* Schema 5 is not a conversion of 4 (bodies moved out of the file):
 * opening an older store fails and says which version it found. */
Test(store_seg, schema_4_file_is_refused_with_its_version)
{
    char path[600];
    s_path(path, sizeof path);
    sqlite3 *db = NULL;
    cr_assert_eq(sqlite3_open(path, &db), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(db,
                              "CREATE TABLE messages (seq INTEGER PRIMARY KEY, id TEXT);"
                              " CREATE TABLE bodies (seq INTEGER PRIMARY KEY, envelope BLOB);"
                              " PRAGMA user_version = 4;",
                              NULL, NULL, NULL),
                 SQLITE_OK);
    sqlite3_close(db);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_store_t *st = NULL;
    char err[256] = "";
    cr_assert_eq(ml_store_open(&loop, path, NULL, &st, err, sizeof err), ML_ESTORE);
    cr_assert_null(st);
    cr_assert(strstr(err, "schema version 4"), "error: %s", err);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(&loop), 0);
}
