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
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include <sys/stat.h>
#include <unistd.h>

#include "cases.h"
#include "ml_common.h"
#include "ml_crypt.h"
#include "ml_hash.h"
#include "medlink/v1/envelope.pb-c.h"
#include "medlink/v1/imaging.pb-c.h"

#define S_COMPONENT "store"
#define S_SCHEMA_VERSION 6
#define S_BATCH_MAX_DEFAULT 4096
/* Page cache per connection, in KiB (negative cache_size means KiB). Two
 * connections, so at most ~16 MiB of cache whatever the queue length. */
#define S_CACHE_KIB 8000
/* A busy writer or a WAL recovery can make a connection wait; past this the
 * statement fails with SQLITE_BUSY and is reported as ML_ESTORE. */
#define S_BUSY_MS 5000

enum {
    S_OP_PUT,
    S_OP_DELIVERED,
    S_OP_DEAD,
    S_OP_CASE,
    S_OP_REPLAY,
    S_OP_PURGE,
    S_OP_REOPEN,
    S_OP_DEAD_DELIVERED,
    S_OP_PRUNE
};

/* Puts and case changes have results and callbacks; marks do not. */
static int s_has_result(int op)
{
    return op == S_OP_PUT || op == S_OP_CASE;
}

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
    const uint8_t *envelope; /* never NULL for a put, even when empty (sealed with a key) */
    size_t envelope_len;
    size_t plain_len; /* the envelope's own length (the size column) */
    uint32_t crc;     /* of the stored body, for its segment record */
    const char *reason;
    int attempts;
    int fresh; /* a put whose id cannot be a duplicate */
    int has_digest;
    uint8_t digest[ML_STORE_DIGEST_LEN];
    uint64_t stream; /* see ml_store_msg_t.stream; for S_OP_REOPEN, the stream */
    uint64_t gen;    /* the closing of its stream a failed put belongs to */
    /* Case changes (one allocation of their own, see s_ops_dup). */
    ml_store_caseop_t *ops;
    size_t n_ops;
    /* S_OP_PRUNE: who to tell, and what the run removed. */
    ml_store_prune_cb prune_cb;
    ml_store_pruned_t pruned;
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
    const ml_keyring_t *keys; /* seal envelopes and details (NULL: clear) */
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
    ml_store_req_t *prune_wait; /* ml_store_prune calls the next run answers */
    ml_store_pruned_t last_prune;
    /* What the last group found about writing (ml_store_health): 0, or
     * ML_EFULL / ML_ESTORE with a sentence. */
    int health_rc;
    char health_why[320];

    /* Loop thread only. */
    int closed;
    uint64_t inflight; /* puts whose callback has not run yet */
    sqlite3 *rd;
    sqlite3_stmt *scan;
    sqlite3_stmt *fetch;
    sqlite3_stmt *rd_lookup;
    sqlite3_stmt *rd_case;

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
    sqlite3_stmt *pend_add; /* schema 6: queued and delivered as rows of */
    sqlite3_stmt *pend_del; /* their own (see s_schema) */
    sqlite3_stmt *dlv_del;
    /* Node names as integers (schema 6, table "names"): name -> id of
     * the names committed or written in the open transaction. Store
     * thread. Emptied when a transaction rolls back, which may take the
     * rows of names it added with it. */
    ml_hash_t *names;
    sqlite3_stmt *name_add;
    sqlite3_stmt *name_get;
    sqlite3_stmt *dead_delivered;
    sqlite3_stmt *page_count;
    sqlite3_stmt *case_insert;
    sqlite3_stmt *case_update;
    sqlite3_stmt *case_bump;
    sqlite3_stmt *event_insert;
    sqlite3_stmt *replay;
    sqlite3_stmt *purge_body;
    sqlite3_stmt *purge_msg;
    sqlite3_stmt *sp_begin;
    sqlite3_stmt *sp_rollback;
    sqlite3_stmt *sp_release;
    sqlite3_stmt *seg_count;
    sqlite3_stmt *seg_drop;
    sqlite3_stmt *purge_seg;
    /* Segments (see "segments" below). The store thread appends; the
     * loop thread reads through descriptors of its own. */
    char *seg_dir;
    uint32_t seg_no;  /* the segment being appended to */
    int seg_fd;       /* its descriptor (store thread) */
    uint64_t seg_end; /* where the next group's records go */
    int seg_failed;   /* the last failure was a segment write's */
    int seg_new;      /* seg_no was created and its directory entry not synced yet */
    uint8_t *sbuf;    /* the group's records, written before its COMMIT */
    size_t slen, scap;
    uint64_t seg_refs; /* bodies the group's staged records give seg_no */
    int rd_fd[4];      /* loop thread: S_SEG_RD_FDS open segments */
    uint32_t rd_no[4];
    unsigned rd_next;
    int64_t wal_frames; /* frames in the WAL after the last commit (atomic) */
    uint64_t seg_max;   /* start a new segment past this */
    uint64_t seg_bytes; /* every segment's size (atomic: any thread reads it) */
    /* Retention (see ml_store_opts_t and s_prune_step). A run goes
     * through the messages in seq order from a cursor, then the final
     * cases, then vacuums, one bounded step at a time. */
    int64_t retention_ms, timeline_ms, prune_interval_ms;
    int prune_batch, vacuum_pages;
    int prune_phase;      /* S_PRUNE_* */
    int64_t prune_cursor; /* the last message seq a run has looked at */
    int64_t prune_next;   /* monotonic ms the next periodic run is due */
    ml_store_pruned_t prune_run;
    ml_store_req_t *prune_asked; /* waiting for the run in progress to finish */
    sqlite3_stmt *prune_scan;
    sqlite3_stmt *prune_del_msg;
    sqlite3_stmt *prune_del_body;
    sqlite3_stmt *prune_cases;
    sqlite3_stmt *prune_del_events;
    sqlite3_stmt *prune_del_case;
    int disk_full;       /* the last batch failed with SQLITE_FULL */
    int quota_full;      /* the last put was refused for max_bytes */
    int batch_rc;        /* the last group's first attempt: 0, ML_EFULL or ML_ESTORE */
    char write_err[200]; /* SQLite's reason for the last failed write */
    /* Closed streams (store thread; see ml_store_msg_t.stream): a handful
     * at most, one per sender whose put failed and whose failure the loop
     * has not seen yet. Reopened by S_OP_REOPEN for the same closing. */
    struct s_closed {
        uint64_t stream, gen;
        int rc;
    } * closed_streams;
    size_t n_closed, cap_closed;
    uint64_t close_gen;
};

static const char s_schema[] =
    "CREATE TABLE IF NOT EXISTS msgs ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " id TEXT NOT NULL UNIQUE,"
    " case_id TEXT,"
    /* Ids in "names": a node's name is written once, not in every row. */
    " sender INTEGER,"
    " recipient INTEGER,"
    " kind INTEGER,"
    " priority INTEGER,"
    " created_at INTEGER,"
    " deadline INTEGER,"
    " accepted_at INTEGER,"
    " state INTEGER,"
    " attempts INTEGER DEFAULT 0,"
    " dead_reason TEXT,"
    " size INTEGER NOT NULL DEFAULT 0,"
    " dead_at INTEGER,"
    /* SHA-256 of the record as its sender sent it: a second put of an id
     * is a duplicate only for the same sender and the same digest (F7).
     * NULL for the broker's own messages and for rows of schema 3. */
    " digest BLOB,"
    /* Where the envelope is (see "segments"): segment number, offset of
     * its record and its stored (sealed) length; seg NULL once retention
     * dropped the body of a kept row. */
    " seg INTEGER, off INTEGER, blen INTEGER);"
    /* Which rows still have a body, for ops and tests: the bodies table of
     * schema 4 as a view (no write costs anything). */
    "CREATE VIEW IF NOT EXISTS bodies AS SELECT seq, blen AS size FROM msgs"
    " WHERE seg IS NOT NULL;"
    /* Live bodies per segment file: a segment goes when its count is 0. */
    /* end_off: where the last committed group's records in it end. */
    "CREATE TABLE IF NOT EXISTS segments (seg INTEGER PRIMARY KEY, live INTEGER NOT NULL,"
    " end_off INTEGER NOT NULL DEFAULT 0);"
    /* Schema 6: a message row is written once. Whether it is still queued
     * or was delivered is not a column rewritten in place (that rewrote
     * the row's 4 KiB page, in a later group than the one that wrote it,
     * for every message) but membership in two narrow tables: "pending"
     * holds the seq of every queued message (msgs.state = 0 and no
     * delivered row), "delivered" the seq and time of every delivered one.
     * Their rows are a few bytes, so a group's inserts and deletes touch a
     * handful of pages. msgs.state is only 0 or 2 (dead); the view
     * "messages" gives ops and tests the columns of schema 5 (state 0
     * queued, 1 delivered, 2 dead, and delivered_at). "pending" keeps the
     * start-up scan proportional to the queue, as the partial index of
     * schema 5 did. */
    "CREATE TABLE IF NOT EXISTS names (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);"
    "CREATE TABLE IF NOT EXISTS pending (seq INTEGER PRIMARY KEY);"
    "CREATE TABLE IF NOT EXISTS delivered (seq INTEGER PRIMARY KEY, at INTEGER NOT NULL);"
    "CREATE VIEW IF NOT EXISTS messages AS SELECT m.seq AS seq, m.id AS id,"
    " m.case_id AS case_id, sn.name AS sender, rn.name AS recipient, m.kind AS kind,"
    " m.priority AS priority, m.created_at AS created_at, m.deadline AS deadline,"
    " m.accepted_at AS accepted_at,"
    " CASE WHEN m.state = 2 THEN 2 WHEN d.seq IS NOT NULL THEN 1 ELSE 0 END AS state,"
    " d.at AS delivered_at, m.attempts AS attempts, m.dead_reason AS dead_reason,"
    " m.size AS size, m.dead_at AS dead_at, m.digest AS digest, m.seg AS seg, m.off AS off,"
    " m.blen AS blen FROM msgs m LEFT JOIN delivered d ON d.seq = m.seq"
    " LEFT JOIN names sn ON sn.id = m.sender LEFT JOIN names rn ON rn.id = m.recipient;"
    /* No index on messages.case_id: maintaining it cost ~20% of the
     * broker's CPU per message under load. Cases have a table of their own,
     * and their timelines one more, indexed by case. */
    "CREATE TABLE IF NOT EXISTS cases ("
    " case_id TEXT PRIMARY KEY,"
    " kind INTEGER, state INTEGER, priority INTEGER,"
    " opener TEXT, target TEXT, service TEXT, linked TEXT, opening_id TEXT,"
    " opened_at INTEGER, updated_at INTEGER, deadline_at INTEGER, deadline_state INTEGER,"
    " escalations INTEGER, follow_ups INTEGER, closed INTEGER,"
    " n_objects INTEGER, chunks_expected INTEGER, chunks INTEGER, dup_chunks INTEGER,"
    " chunk_bytes INTEGER, fired INTEGER, version INTEGER) WITHOUT ROWID;"
    /* Keyed by (case, the version its change made, its place in that
     * change) WITHOUT ROWID: one B-tree to write per event instead of a
     * table and an index, and a case's timeline is one range in it. */
    "CREATE TABLE IF NOT EXISTS case_events ("
    " case_id TEXT NOT NULL, version INTEGER NOT NULL, n INTEGER NOT NULL,"
    " at INTEGER, node TEXT, event TEXT, from_state TEXT,"
    " to_state TEXT, message_id TEXT, kind TEXT, detail TEXT,"
    " PRIMARY KEY (case_id, version, n)) WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS messages_dead ON msgs(dead_at) WHERE state = 2;"
    /* Final cases by their last change, for timeline retention: partial,
     * so open cases (every change of which rewrites updated_at) never
     * touch it; a case enters it once, when it becomes final. */
    "CREATE INDEX IF NOT EXISTS cases_final ON cases(updated_at) WHERE closed = 1;"
    "";

/* The columns of a case row, in the order s_bind_case binds them. */
#define S_CASE_COLS                                                                                \
    "case_id, kind, state, priority, opener, target, service, linked, opening_id, opened_at,"      \
    " updated_at, deadline_at, deadline_state, escalations, follow_ups, closed, n_objects,"        \
    " chunks_expected, chunks, dup_chunks, chunk_bytes, fired, version"

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

/* Binds seq as ?1 of s and runs it (s_run). */
static int s_bind_seq_run(sqlite3_stmt *s, int64_t seq)
{
    sqlite3_bind_int64(s, 1, seq);
    return s_run(s);
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

/* ---- segments: the bodies, written once -------------------------------- */

/* Envelopes do not live in SQLite: in WAL mode every byte written there is
 * written twice (the WAL frame, then the checkpoint into broker.db), and a
 * 1 KiB body made up most of the 6.4 KiB the store wrote per referral
 * (docs/performance.md, "Store v5"). Each body is appended once to a
 * segment file, PATH-seg/NNNNNNNN.seg, as the record
 *
 *     [u32 len][u32 crc32c(body)][u64 seq][body: len bytes]
 *
 * (little endian), and its message row holds (seg, off, blen). A group's
 * records go out in one pwrite and one fdatasync before its COMMIT, so a
 * committed row never points at a body that is not durable. A record of a
 * group that did not commit is garbage nothing points at; it is never
 * reused, because the append offset moves past a group's records as soon
 * as they are synced (a COMMIT that fails after that leaves a hole, not a
 * record that a later row could be mistaken for). The segments row of the
 * segment written to records, in the group's transaction, where its
 * records end; at start-up the newest segment is truncated there: what
 * follows belongs to groups that never committed (a torn tail among
 * them), and a damaged record before it is kept for reads to report, not
 * cut with every committed record after it.
 *
 * Space comes back whole segments at a time: the segments table counts the
 * rows whose body each segment holds (+n per group, -1 per body retention
 * or purge drops), and a segment other than the one being appended to goes
 * once its count is 0: its row in one transaction, then the file. A file
 * with no row (a crash between the two) goes at the next start-up. */

#define S_SEG_HDR 16u
/* A new segment is started by the first group that finds the current one
 * past this; a segment can exceed it by one group. */
#define S_SEG_MAX (64u * 1024u * 1024u)
#define S_SEG_RD_FDS 4

static uint32_t s_crc_table[8][256];
static uv_once_t s_crc_once = UV_ONCE_INIT;

static void s_crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        s_crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            s_crc_table[t][i] =
                (s_crc_table[t - 1][i] >> 8) ^ s_crc_table[0][s_crc_table[t - 1][i] & 0xff];
}

/* CRC-32C (Castagnoli), slicing by eight: ~1 byte per cycle, a few hundred
 * nanoseconds for a 1 KiB body, against the ~30 us SQLite spent writing it
 * twice. */
static uint32_t s_crc32c(uint32_t crc, const void *data, size_t n)
{
    const uint8_t *p = data;
    crc = ~crc;
    while (n >= 8) {
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                             (uint32_t)p[3] << 24);
        crc = s_crc_table[7][lo & 0xff] ^ s_crc_table[6][(lo >> 8) & 0xff] ^
              s_crc_table[5][(lo >> 16) & 0xff] ^ s_crc_table[4][lo >> 24] ^ s_crc_table[3][p[4]] ^
              s_crc_table[2][p[5]] ^ s_crc_table[1][p[6]] ^ s_crc_table[0][p[7]];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = (crc >> 8) ^ s_crc_table[0][(crc ^ *p++) & 0xff];
    return ~crc;
}

static void s_put_u32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void s_put_u64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t s_get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t s_get_u64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* A record's crc covers its body only, so that the loop thread computes
 * it when it copies the put (ml_store_put), off the store thread, before
 * the seq exists; the header's seq is checked against the row's instead. */
static uint32_t s_rec_crc(const uint8_t *body, size_t len)
{
    return s_crc32c(0, body, len);
}

static void s_seg_name(const ml_store_t *st, uint32_t no, char *out, size_t n)
{
    snprintf(out, n, "%s/%08u.seg", st->seg_dir, no);
}

static int s_fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int r = fsync(fd);
    close(fd);
    return r;
}

/* Reads exactly n bytes at off; 0, or -1 (error or end of file). */
static int s_pread_all(int fd, void *buf, size_t n, uint64_t off)
{
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t k = pread(fd, p, n, (off_t)off);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return -1;
        p += k;
        n -= (size_t)k;
        off += (uint64_t)k;
    }
    return 0;
}

static int s_pwrite_all(int fd, const void *buf, size_t n, uint64_t off)
{
    const uint8_t *p = buf;
    while (n > 0) {
        ssize_t k = pwrite(fd, p, n, (off_t)off);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0)
            return -1;
        p += k;
        n -= (size_t)k;
        off += (uint64_t)k;
    }
    return 0;
}

/* How many bytes from start on are whole records whose crc holds (for
 * the start-up log line only). */
static uint64_t s_seg_valid_end_from(int fd, uint64_t start, uint64_t size)
{
    uint64_t off = start;
    uint8_t hdr[S_SEG_HDR];
    uint8_t *buf = NULL;
    size_t cap = 0;
    while (off + S_SEG_HDR <= size && s_pread_all(fd, hdr, S_SEG_HDR, off) == 0) {
        uint32_t len = s_get_u32(hdr);
        if (len > size - off - S_SEG_HDR)
            break;
        if (len > cap) {
            uint8_t *n = realloc(buf, len);
            if (!n)
                break;
            buf = n;
            cap = len;
        }
        if (s_pread_all(fd, buf, len, off + S_SEG_HDR) != 0 ||
            s_rec_crc(buf, len) != s_get_u32(hdr + 4))
            break;
        off += S_SEG_HDR + len;
    }
    free(buf);
    return off - start;
}

/* Opens (creating) PATH-seg, finds the newest segment, truncates its torn
 * tail and opens it for appending. Opener thread. */
static int s_seg_open(ml_store_t *st, char *err, size_t errlen)
{
    uv_once(&s_crc_once, s_crc_init);
    size_t n = strlen(st->path) + 5;
    if (!(st->seg_dir = malloc(n)))
        return ML_ENOMEM;
    snprintf(st->seg_dir, n, "%s-seg", st->path);
    if (mkdir(st->seg_dir, 0700) != 0 && errno != EEXIST) {
        ml_seterr(err, errlen, "cannot create %s: %s", st->seg_dir, strerror(errno));
        return ML_ESTORE;
    }
    DIR *d = opendir(st->seg_dir);
    if (!d) {
        ml_seterr(err, errlen, "cannot read %s: %s", st->seg_dir, strerror(errno));
        return ML_ESTORE;
    }
    uint32_t newest = 0;
    uint64_t total = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        unsigned no;
        char tail;
        if (sscanf(e->d_name, "%8u.se%c", &no, &tail) != 2 || tail != 'g' ||
            strlen(e->d_name) != 12)
            continue;
        struct stat sb;
        char name[PATH_MAX];
        s_seg_name(st, no, name, sizeof name);
        if (stat(name, &sb) == 0)
            total += (uint64_t)sb.st_size;
        if (no > newest)
            newest = no;
    }
    closedir(d);
    int created = newest == 0;
    st->seg_no = created ? 1 : newest;
    char name[PATH_MAX];
    s_seg_name(st, st->seg_no, name, sizeof name);
    st->seg_fd = open(name, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (st->seg_fd < 0) {
        ml_seterr(err, errlen, "cannot open %s: %s", name, strerror(errno));
        return ML_ESTORE;
    }
    struct stat sb;
    if (fstat(st->seg_fd, &sb) != 0) {
        ml_seterr(err, errlen, "cannot stat %s: %s", name, strerror(errno));
        return ML_ESTORE;
    }
    /* What the last committed group wrote ends at end_off (same
     * transaction as its rows): anything after it belongs to a group that
     * never committed, a write cut short by a crash among them. A record
     * damaged before it is not cut (that would lose the committed ones
     * after it): a read finds it does not authenticate. */
    int64_t committed = 0;
    char sql[96];
    snprintf(sql, sizeof sql, "SELECT coalesce(max(end_off), 0) FROM segments WHERE seg = %u",
             st->seg_no);
    if (s_query_int(st->wr, sql, &committed) != SQLITE_OK) {
        ml_seterr(err, errlen, "cannot read the segments of %s: %s", st->path,
                  sqlite3_errmsg(st->wr));
        return ML_ESTORE;
    }
    uint64_t end = (uint64_t)committed;
    if (end > (uint64_t)sb.st_size) {
        ml_seterr(err, errlen, "%s is %lld bytes, shorter than its committed %lld", name,
                  (long long)sb.st_size, (long long)committed);
        return ML_ESTORE;
    }
    if (end < (uint64_t)sb.st_size) {
        uint64_t whole = end + s_seg_valid_end_from(st->seg_fd, end, (uint64_t)sb.st_size);
        ml_log(ML_LOG_WARN, S_COMPONENT,
               "%s: %llu byte(s) after the last committed record truncated (%llu of them whole "
               "records of a group that did not commit, the rest a write cut short)",
               name, (unsigned long long)((uint64_t)sb.st_size - end),
               (unsigned long long)(whole - end));
        if (ftruncate(st->seg_fd, (off_t)end) != 0 || fdatasync(st->seg_fd) != 0) {
            ml_seterr(err, errlen, "cannot truncate %s: %s", name, strerror(errno));
            return ML_ESTORE;
        }
        total -= (uint64_t)sb.st_size - end;
    }
    if (created && s_fsync_dir(st->seg_dir) != 0) {
        ml_seterr(err, errlen, "cannot sync %s: %s", st->seg_dir, strerror(errno));
        return ML_ESTORE;
    }
    st->seg_end = end;
    __atomic_store_n(&st->seg_bytes, total, __ATOMIC_RELAXED);
    for (int i = 0; i < S_SEG_RD_FDS; i++)
        st->rd_fd[i] = -1;
    return 0;
}

/* Removes the files of segments that no row needs: those the segments
 * table lists with no live body, and those it does not list at all (their
 * row went, a crash came before the file did), never the current one.
 * Opener thread or store thread (outside a transaction). */
static void s_seg_reclaim(ml_store_t *st)
{
    sqlite3_stmt *q = NULL;
    if (sqlite3_prepare_v2(st->wr, "SELECT seg FROM segments WHERE live > 0", -1, &q, NULL) !=
        SQLITE_OK)
        return;
    uint32_t *keep = NULL;
    size_t n_keep = 0, cap = 0;
    while (sqlite3_step(q) == SQLITE_ROW) {
        if (n_keep == cap) {
            size_t nc = cap ? cap * 2 : 16;
            uint32_t *nk = realloc(keep, nc * sizeof *nk);
            if (!nk)
                goto out;
            keep = nk;
            cap = nc;
        }
        keep[n_keep++] = (uint32_t)sqlite3_column_int64(q, 0);
    }
    sqlite3_finalize(q);
    q = NULL;
    char del[96];
    snprintf(del, sizeof del, "DELETE FROM segments WHERE live <= 0 AND seg < %u", st->seg_no);
    if (sqlite3_exec(st->wr, del, NULL, NULL, NULL) != SQLITE_OK)
        goto out;
    /* The segment being appended to starts again from 0 once no body in
     * it is live (a quiet store would otherwise keep up to a whole
     * segment of delivered bodies). Its end is recorded first: a crash
     * between the two then finds a file longer than its end, not
     * shorter. */
    int active_live = 0;
    for (size_t i = 0; i < n_keep; i++)
        active_live |= keep[i] == st->seg_no;
    if (!active_live && st->seg_end > 0 && st->slen == 0) {
        char sql[96];
        snprintf(sql, sizeof sql, "UPDATE segments SET end_off = 0 WHERE seg = %u", st->seg_no);
        if (sqlite3_exec(st->wr, sql, NULL, NULL, NULL) == SQLITE_OK &&
            ftruncate(st->seg_fd, 0) == 0 && fdatasync(st->seg_fd) == 0) {
            __atomic_sub_fetch(&st->seg_bytes, st->seg_end, __ATOMIC_RELAXED);
            st->seg_end = 0;
        }
    }
    DIR *d = opendir(st->seg_dir);
    if (!d)
        goto out;
    struct dirent *e;
    int removed = 0;
    while ((e = readdir(d))) {
        unsigned no;
        char tail;
        if (sscanf(e->d_name, "%8u.se%c", &no, &tail) != 2 || tail != 'g' || no >= st->seg_no)
            continue;
        int needed = 0;
        for (size_t i = 0; i < n_keep && !needed; i++)
            needed = keep[i] == no;
        if (needed)
            continue;
        char name[PATH_MAX];
        s_seg_name(st, no, name, sizeof name);
        struct stat sb;
        uint64_t size = stat(name, &sb) == 0 ? (uint64_t)sb.st_size : 0;
        if (unlink(name) == 0) {
            __atomic_sub_fetch(&st->seg_bytes, size, __ATOMIC_RELAXED);
            removed++;
        }
    }
    closedir(d);
    if (removed) {
        s_fsync_dir(st->seg_dir);
        ml_log(ML_LOG_INFO, S_COMPONENT, "%s: %d segment(s) with no live body removed", st->seg_dir,
               removed);
    }
out:
    sqlite3_finalize(q);
    free(keep);
}

/* Where the next record staged for this group will be. Store thread. */
static void s_seg_next_loc(const ml_store_t *st, uint32_t *seg, uint64_t *off)
{
    *seg = st->seg_no;
    *off = st->seg_end + st->slen;
}

/* Appends the record of seq to the group's staging buffer (the row
 * pointing at it is already inserted). Store thread. */
static int s_seg_stage(ml_store_t *st, int64_t seq, const uint8_t *body, size_t len, uint32_t crc)
{
    size_t need = st->slen + S_SEG_HDR + len;
    if (need > st->scap) {
        size_t cap = st->scap ? st->scap : 65536;
        while (cap < need)
            cap *= 2;
        uint8_t *n = realloc(st->sbuf, cap);
        if (!n)
            return SQLITE_NOMEM;
        st->sbuf = n;
        st->scap = cap;
    }
    uint8_t *p = st->sbuf + st->slen;
    s_put_u32(p, (uint32_t)len);
    s_put_u32(p + 4, crc);
    s_put_u64(p + 8, (uint64_t)seq);
    if (len)
        memcpy(p + S_SEG_HDR, body, len);
    st->slen = need;
    st->seg_refs++;
    return SQLITE_DONE;
}

/* Starts a group: nothing staged; a new segment when the current one is
 * full. Returns an SQLite code (SQLITE_DONE). Store thread. */
static int s_seg_group_begin(ml_store_t *st)
{
    st->slen = 0;
    st->seg_refs = 0;
    if (st->seg_end < st->seg_max)
        return SQLITE_DONE;
    char name[PATH_MAX];
    s_seg_name(st, st->seg_no + 1, name, sizeof name);
    int fd = open(name, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(st->write_err, sizeof st->write_err, "cannot create segment %08u: %s",
                 st->seg_no + 1, strerror(errno));
        st->seg_failed = 1;
        return errno == ENOSPC ? SQLITE_FULL : SQLITE_IOERR;
    }
    close(st->seg_fd);
    st->seg_fd = fd;
    st->seg_no++;
    st->seg_end = 0;
    st->seg_new = 1;
    return SQLITE_DONE;
}

/* Makes the group's records durable before its COMMIT, and counts them in
 * the segments table (inside the transaction). Store thread. */
static int s_seg_group_flush(ml_store_t *st)
{
    if (st->slen == 0)
        return SQLITE_DONE;
    if (s_pwrite_all(st->seg_fd, st->sbuf, st->slen, st->seg_end) != 0 ||
        fdatasync(st->seg_fd) != 0 || (st->seg_new && s_fsync_dir(st->seg_dir) != 0)) {
        int full = errno == ENOSPC || errno == EDQUOT;
        snprintf(st->write_err, sizeof st->write_err, "cannot write segment %08u: %s", st->seg_no,
                 strerror(errno));
        ml_log(ML_LOG_ERROR, S_COMPONENT, "%s: %s", st->seg_dir, st->write_err);
        st->seg_failed = 1;
        return full ? SQLITE_FULL : SQLITE_IOERR;
    }
    st->seg_new = 0;
    /* Past these bytes for good, whether COMMIT works or not (see the
     * section comment). */
    st->seg_end += st->slen;
    __atomic_add_fetch(&st->seg_bytes, st->slen, __ATOMIC_RELAXED);
    st->slen = 0;
    sqlite3_stmt *u = st->seg_count;
    sqlite3_bind_int64(u, 1, st->seg_no);
    sqlite3_bind_int64(u, 2, (sqlite3_int64)st->seg_refs);
    sqlite3_bind_int64(u, 3, (sqlite3_int64)st->seg_end);
    return s_run(u);
}

/* A reader's descriptor for segment no (loop thread; a few kept open). */
static int s_seg_rd_fd(ml_store_t *st, uint32_t no)
{
    for (int i = 0; i < S_SEG_RD_FDS; i++)
        if (st->rd_fd[i] >= 0 && st->rd_no[i] == no)
            return st->rd_fd[i];
    char name[PATH_MAX];
    s_seg_name(st, no, name, sizeof name);
    int fd = open(name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int slot = st->rd_next++ % S_SEG_RD_FDS;
    if (st->rd_fd[slot] >= 0)
        close(st->rd_fd[slot]);
    st->rd_fd[slot] = fd;
    st->rd_no[slot] = no;
    return fd;
}

/* Reads the record of seq at (no, off), blen bytes, into a malloc'd
 * buffer. ML_EPROTO when it is not there whole or its crc fails. */
static int s_seg_read(ml_store_t *st, uint32_t no, uint64_t off, size_t blen, int64_t seq,
                      uint8_t **out)
{
    int fd = s_seg_rd_fd(st, no);
    if (fd < 0)
        return ML_EPROTO;
    uint8_t *buf = malloc(S_SEG_HDR + blen);
    if (!buf)
        return ML_ENOMEM;
    if (s_pread_all(fd, buf, S_SEG_HDR + blen, off) != 0 || s_get_u32(buf) != blen ||
        s_get_u64(buf + 8) != (uint64_t)seq ||
        s_rec_crc(buf + S_SEG_HDR, blen) != s_get_u32(buf + 4)) {
        free(buf);
        return ML_EPROTO;
    }
    memmove(buf, buf + S_SEG_HDR, blen);
    *out = buf;
    return 0;
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
    /* Incremental auto-vacuum lets retention hand pages back to the file
     * system in bounded steps (PRAGMA incremental_vacuum) instead of one
     * VACUUM that would stop every write for as long as it takes. It can
     * only be chosen before the first table exists; an older file is
     * converted once, below. */
    int64_t pages = 0, autovac = 0;
    if ((src = s_query_int(st->wr, "PRAGMA page_count", &pages)) != SQLITE_OK)
        goto out;
    if (pages == 0 && (src = sqlite3_exec(st->wr, "PRAGMA auto_vacuum=INCREMENTAL", NULL, NULL,
                                          NULL)) != SQLITE_OK)
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
    /* Schema 5 keeps bodies in segment files and schema 6 the delivered
     * state in tables of its own (nothing was deployed with an older one,
     * so there is no migration): a file of an older broker is named, not
     * converted. Its "messages" is a table; schema 6's is a view. */
    int64_t tables = 0;
    if ((src = s_query_int(st->wr,
                           "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND"
                           " name IN ('messages', 'msgs')",
                           &tables)) != SQLITE_OK)
        goto out;
    if (tables > 0 && version < S_SCHEMA_VERSION) {
        snprintf(why, sizeof why,
                 "schema version %lld is older than this broker's (%d) and is not converted",
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

    /* A file made before schema version 3 has no auto-vacuum: the one
     * VACUUM that converts it rewrites the whole file (it needs as much
     * free disk again). If it fails the broker runs on: retention still
     * frees pages inside the file for reuse, the file just does not
     * shrink. */
    if ((src = s_query_int(st->wr, "PRAGMA auto_vacuum", &autovac)) != SQLITE_OK)
        goto out;
    if (autovac != 2) {
        ml_log(ML_LOG_INFO, S_COMPONENT,
               "%s: converting to incremental auto-vacuum (a one-time VACUUM of the whole file)",
               st->path);
        if (sqlite3_exec(st->wr, "PRAGMA auto_vacuum=INCREMENTAL; VACUUM", NULL, NULL, NULL) !=
            SQLITE_OK)
            ml_log(ML_LOG_WARN, S_COMPONENT,
                   "%s: cannot convert to incremental auto-vacuum (%s): retention frees pages "
                   "for reuse but the file will not shrink",
                   st->path, sqlite3_errmsg(st->wr));
    }

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
         "INSERT OR IGNORE INTO msgs (id, case_id, sender, recipient, kind, priority,"
         " created_at, deadline, accepted_at, state, attempts, size, digest, seg, off, blen)"
         " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 0, 0, ?10, ?11, ?12, ?13, ?14)"},
        {st->wr, &st->seg_count,
         "INSERT INTO segments (seg, live, end_off) VALUES (?1, ?2, ?3)"
         " ON CONFLICT (seg) DO UPDATE SET live = live + excluded.live,"
         " end_off = excluded.end_off"},
        {st->wr, &st->seg_drop, "UPDATE segments SET live = live - 1 WHERE seg = ?1"},
        {st->wr, &st->lookup,
         "SELECT m.seq, n.name, m.digest FROM msgs m LEFT JOIN names n ON n.id = m.sender"
         " WHERE m.id = ?1"},
        /* The pending row guards: a message settles once (the mark that
         * deletes it goes on, see s_mark); a late or repeated mark does not
         * turn a delivered message into a dead one or back. */
        {st->wr, &st->delivered, "INSERT OR IGNORE INTO delivered (seq, at) VALUES (?1, ?2)"},
        {st->wr, &st->dead,
         "UPDATE msgs SET state = 2, dead_reason = ?2, attempts = ?3, dead_at = ?4"
         " WHERE seq = ?1 AND state = 0"},
        {st->wr, &st->name_add, "INSERT INTO names (name) VALUES (?1)"},
        {st->wr, &st->name_get, "SELECT id FROM names WHERE name = ?1"},
        {st->wr, &st->pend_add, "INSERT OR IGNORE INTO pending (seq) VALUES (?1)"},
        {st->wr, &st->pend_del, "DELETE FROM pending WHERE seq = ?1"},
        {st->wr, &st->dlv_del, "DELETE FROM delivered WHERE seq = ?1"},
        /* An imaging consult whose study never arrived whole (F9): it was
         * delivered, but what it stands for was not. Asked for explicitly
         * (ml_store_mark_dead_delivered), never by a late mark. */
        {st->wr, &st->dead_delivered,
         "UPDATE msgs SET state = 2, dead_reason = ?2, attempts = ?3, dead_at = ?4"
         " WHERE seq = ?1 AND state = 0"},
        {st->wr, &st->page_count, "PRAGMA page_count"},
        {st->wr, &st->case_insert,
         "INSERT OR IGNORE INTO cases (" S_CASE_COLS ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8,"
         " ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)"},
        {st->wr, &st->case_update,
         "UPDATE cases SET kind = ?2, state = ?3, priority = ?4, opener = ?5, target = ?6,"
         " service = ?7, linked = ?8, opening_id = ?9, opened_at = ?10, updated_at = ?11,"
         " deadline_at = ?12, deadline_state = ?13, escalations = ?14, follow_ups = ?15,"
         " closed = ?16, n_objects = ?17, chunks_expected = ?18, chunks = ?19,"
         " dup_chunks = ?20, chunk_bytes = ?21, fired = ?22, version = ?23"
         " WHERE case_id = ?1 AND version = ?23 - 1"},
        {st->wr, &st->case_bump,
         "UPDATE cases SET version = ?2 WHERE case_id = ?1 AND version = ?2 - 1"},
        {st->wr, &st->event_insert,
         "INSERT INTO case_events (case_id, at, node, event, from_state, to_state, message_id,"
         " kind, detail, version, n) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"},
        {st->wr, &st->replay,
         "UPDATE msgs SET state = 0, attempts = 0, deadline = 0, dead_reason = NULL,"
         " dead_at = NULL WHERE seq = ?1 AND state = 2"},
        {st->wr, &st->purge_seg,
         "UPDATE segments SET live = live - 1 WHERE seg ="
         " (SELECT seg FROM msgs WHERE seq = ?1 AND state = 2)"},
        {st->wr, &st->purge_msg, "DELETE FROM msgs WHERE seq = ?1 AND state = 2"},
        {st->wr, &st->sp_begin, "SAVEPOINT ml_req"},
        {st->wr, &st->sp_rollback, "ROLLBACK TO ml_req"},
        {st->wr, &st->sp_release, "RELEASE ml_req"},
        /* Retention. length() of a blob reads its size from the record
         * header, not the blob. */
        {st->wr, &st->prune_scan,
         "SELECT m.seq, m.kind,"
         " CASE WHEN m.state = 2 THEN 2 WHEN d.seq IS NOT NULL THEN 1 ELSE 0 END, d.at,"
         " c.case_id IS NOT NULL, c.closed,"
         " c.updated_at, c.kind, c.state, m.seg IS NOT NULL, m.blen, m.seg"
         " FROM msgs m LEFT JOIN delivered d ON d.seq = m.seq"
         " LEFT JOIN cases c ON c.case_id = m.case_id"
         " WHERE m.seq > ?1 ORDER BY m.seq LIMIT ?2"},
        {st->wr, &st->prune_del_msg,
         "DELETE FROM msgs WHERE seq = ?1 AND state = 0"
         " AND EXISTS (SELECT 1 FROM delivered WHERE seq = ?1)"},
        {st->wr, &st->prune_del_body,
         "UPDATE msgs SET seg = NULL WHERE seq = ?1 AND seg IS NOT NULL"},
        {st->wr, &st->prune_cases,
         "SELECT case_id FROM cases WHERE closed = 1 AND updated_at <= ?1"
         " ORDER BY updated_at LIMIT ?2"},
        {st->wr, &st->prune_del_events, "DELETE FROM case_events WHERE case_id = ?1"},
        {st->wr, &st->prune_del_case, "DELETE FROM cases WHERE case_id = ?1 AND closed = 1"},
        {st->rd, &st->scan,
         "SELECT m.seq, m.id, m.case_id, sn.name, rn.name, m.kind, m.priority, m.accepted_at,"
         " m.size, m.deadline, m.attempts FROM msgs m LEFT JOIN names sn ON sn.id = m.sender"
         " LEFT JOIN names rn ON rn.id = m.recipient WHERE m.seq IN (SELECT seq FROM pending)"
         " ORDER BY m.priority DESC, m.seq ASC"},
        {st->rd, &st->fetch,
         "SELECT seg, off, blen, id FROM msgs WHERE seq = ?1 AND seg IS NOT NULL"},
        {st->rd, &st->rd_lookup, "SELECT seq, state FROM messages WHERE id = ?1"},
        {st->rd, &st->rd_case, "SELECT " S_CASE_COLS " FROM cases WHERE case_id = ?1"},
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

static void s_req_free(ml_store_req_t *r)
{
    free(r->ops);
    free(r);
}

static void s_free_list(ml_store_req_t *r)
{
    while (r) {
        ml_store_req_t *next = r->next;
        s_req_free(r);
        r = next;
    }
}

/* Releases everything but the struct and its async handle: statements,
 * connections, the queues, the mutex. Runs with no store thread alive. */
static void s_release(ml_store_t *st)
{
    sqlite3_stmt **stmts[] = {
        &st->scan,           &st->fetch,          &st->begin,        &st->commit,
        &st->rollback,       &st->insert,         &st->lookup,       &st->seg_count,
        &st->delivered,      &st->dead,           &st->page_count,   &st->case_insert,
        &st->case_update,    &st->case_bump,      &st->event_insert, &st->replay,
        &st->purge_seg,      &st->purge_msg,      &st->sp_begin,     &st->sp_rollback,
        &st->sp_release,     &st->rd_lookup,      &st->rd_case,      &st->prune_scan,
        &st->prune_del_msg,  &st->prune_del_body, &st->prune_cases,  &st->prune_del_events,
        &st->prune_del_case, &st->dead_delivered, &st->seg_drop,     &st->pend_add,
        &st->pend_del,       &st->dlv_del,        &st->name_add,     &st->name_get};
    for (size_t i = 0; i < sizeof stmts / sizeof stmts[0]; i++) {
        sqlite3_stmt **slot = stmts[i];
        sqlite3_finalize(*slot);
        *slot = NULL;
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
    if (st->seg_fd > 0)
        close(st->seg_fd);
    st->seg_fd = -1;
    for (int i = 0; i < S_SEG_RD_FDS; i++)
        if (st->rd_fd[i] >= 0)
            close(st->rd_fd[i]);
    for (int i = 0; i < S_SEG_RD_FDS; i++)
        st->rd_fd[i] = -1;
    free(st->sbuf);
    st->sbuf = NULL;
    ml_hash_destroy(&st->names);
    s_free_list(st->head);
    s_free_list(st->done_head);
    s_free_list(st->prune_wait);
    s_free_list(st->prune_asked);
    st->prune_wait = st->prune_asked = NULL;
    st->head = st->tail = st->done_head = st->done_tail = NULL;
    if (st->mu_ok) {
        uv_cond_destroy(&st->cv);
        uv_mutex_destroy(&st->mu);
        st->mu_ok = 0;
    }
}

static void s_free(ml_store_t *st)
{
    free(st->seg_dir);
    free(st->closed_streams);
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
    if (st->seg_failed) {
        /* A segment write: its reason is in write_err already. */
        st->seg_failed = 0;
        if ((src & 0xff) != SQLITE_FULL)
            return ML_ESTORE;
    }
    if ((src & 0xff) == SQLITE_FULL) {
        if (!st->disk_full)
            ml_log(ML_LOG_WARN, S_COMPONENT, "%s: disk full, refusing messages until it has room",
                   st->path);
        st->disk_full = 1;
        return ML_EFULL;
    }
    snprintf(st->write_err, sizeof st->write_err, "%s (%s)", sqlite3_errmsg(st->wr),
             sqlite3_errstr(src));
    ml_log(ML_LOG_ERROR, S_COMPONENT, "%s: write failed: %s", st->path, st->write_err);
    return ML_ESTORE;
}

static void s_bind_opt_text(sqlite3_stmt *s, int i, const char *v)
{
    sqlite3_bind_text(s, i, v ? v : "", -1, SQLITE_STATIC);
}

/* Binds a case row as ?1..?23 in S_CASE_COLS order. */
static void s_bind_case(sqlite3_stmt *s, const ml_store_case_t *c)
{
    sqlite3_bind_text(s, 1, c->case_id, -1, SQLITE_STATIC);
    sqlite3_bind_int(s, 2, c->kind);
    sqlite3_bind_int(s, 3, c->state);
    sqlite3_bind_int(s, 4, c->priority);
    s_bind_opt_text(s, 5, c->opener);
    s_bind_opt_text(s, 6, c->target);
    s_bind_opt_text(s, 7, c->service);
    s_bind_opt_text(s, 8, c->linked);
    s_bind_opt_text(s, 9, c->opening_id);
    sqlite3_bind_int64(s, 10, c->opened_at);
    sqlite3_bind_int64(s, 11, c->updated_at);
    sqlite3_bind_int64(s, 12, c->deadline_at);
    sqlite3_bind_int(s, 13, c->deadline_state);
    sqlite3_bind_int(s, 14, c->escalations);
    sqlite3_bind_int(s, 15, c->follow_ups);
    sqlite3_bind_int(s, 16, c->closed);
    sqlite3_bind_int64(s, 17, c->n_objects);
    sqlite3_bind_int64(s, 18, c->chunks_expected);
    sqlite3_bind_int64(s, 19, c->chunks);
    sqlite3_bind_int64(s, 20, c->dup_chunks);
    sqlite3_bind_int64(s, 21, (sqlite3_int64)c->chunk_bytes);
    sqlite3_bind_int(s, 22, c->fired);
    sqlite3_bind_int64(s, 23, c->version);
}

/* Reads a case row from the columns of S_CASE_COLS (strings point into
 * the statement: valid until it steps again). */
static void s_read_case(sqlite3_stmt *s, ml_store_case_t *c)
{
    memset(c, 0, sizeof *c);
    c->case_id = (const char *)sqlite3_column_text(s, 0);
    c->kind = sqlite3_column_int(s, 1);
    c->state = sqlite3_column_int(s, 2);
    c->priority = sqlite3_column_int(s, 3);
    c->opener = (const char *)sqlite3_column_text(s, 4);
    c->target = (const char *)sqlite3_column_text(s, 5);
    c->service = (const char *)sqlite3_column_text(s, 6);
    c->linked = (const char *)sqlite3_column_text(s, 7);
    c->opening_id = (const char *)sqlite3_column_text(s, 8);
    c->opened_at = sqlite3_column_int64(s, 9);
    c->updated_at = sqlite3_column_int64(s, 10);
    c->deadline_at = sqlite3_column_int64(s, 11);
    c->deadline_state = sqlite3_column_int(s, 12);
    c->escalations = sqlite3_column_int(s, 13);
    c->follow_ups = sqlite3_column_int(s, 14);
    c->closed = sqlite3_column_int(s, 15);
    c->n_objects = (uint32_t)sqlite3_column_int64(s, 16);
    c->chunks_expected = (uint32_t)sqlite3_column_int64(s, 17);
    c->chunks = (uint32_t)sqlite3_column_int64(s, 18);
    c->dup_chunks = (uint32_t)sqlite3_column_int64(s, 19);
    c->chunk_bytes = (uint64_t)sqlite3_column_int64(s, 20);
    c->fired = sqlite3_column_int(s, 21);
    c->version = sqlite3_column_int64(s, 22);
}

/* Applies one case change inside the open transaction. *denied is set when
 * it cannot apply (the case exists already / has another version). Returns
 * an SQLite result code; SQLITE_DONE when the transaction may go on. Store
 * thread. */
static int s_case_write(ml_store_t *st, const ml_store_caseop_t *op, int *denied)
{
    sqlite3_stmt *s = op->open ? st->case_insert : st->case_update;
    s_bind_case(s, &op->row);
    int src = s_run(s);
    if (src != SQLITE_DONE)
        return src;
    if (sqlite3_changes(st->wr) != 1) {
        if (!op->open)
            ml_log(ML_LOG_WARN, S_COMPONENT,
                   "%s: case %s not updated (version %lld expected): the broker reloads it",
                   st->path, op->row.case_id, (long long)op->row.version - 1);
        *denied = op->open ? ML_EDUP : ML_EDENIED;
        return SQLITE_DONE;
    }
    for (size_t i = 0; i < op->n_events; i++) {
        const ml_store_event_t *e = &op->events[i];
        sqlite3_stmt *ev = st->event_insert;
        sqlite3_bind_text(ev, 1, op->row.case_id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(ev, 2, e->at);
        s_bind_opt_text(ev, 3, e->node);
        s_bind_opt_text(ev, 4, e->event);
        s_bind_opt_text(ev, 5, e->from_state);
        s_bind_opt_text(ev, 6, e->to_state);
        s_bind_opt_text(ev, 7, e->message_id);
        s_bind_opt_text(ev, 8, e->kind);
        if (e->detail_len)
            sqlite3_bind_blob64(ev, 9, e->detail, e->detail_len, SQLITE_STATIC);
        else
            s_bind_opt_text(ev, 9, e->detail);
        sqlite3_bind_int64(ev, 10, op->row.version);
        sqlite3_bind_int64(ev, 11, (sqlite3_int64)i);
        if ((src = s_run(ev)) != SQLITE_DONE)
            return src;
    }
    return SQLITE_DONE;
}

/* Applies every case change of r so that a change that cannot apply
 * leaves none of the request's changes behind (r->rc = ML_EDUP for an
 * opening whose case exists, ML_EDENIED for a stale version). One change
 * needs no savepoint: the conditional write that may be refused is its
 * first write. Several are wrapped in one. *applied is 1 when they all
 * applied. Store thread. */
static int s_cases_apply(ml_store_t *st, ml_store_req_t *r, int *applied)
{
    int denied = 0;
    *applied = 0;
    int sp = r->n_ops > 1;
    int src = sp ? s_run(st->sp_begin) : SQLITE_DONE;
    for (size_t i = 0; src == SQLITE_DONE && !denied && i < r->n_ops; i++)
        src = s_case_write(st, &r->ops[i], &denied);
    if (src != SQLITE_DONE)
        return src;
    if (denied) {
        r->rc = denied;
        if (sp && (src = s_run(st->sp_rollback)) != SQLITE_DONE)
            return src;
    } else {
        *applied = 1;
    }
    return sp ? s_run(st->sp_release) : SQLITE_DONE;
}

/* A duplicate message does not change its cases, but their versions move
 * on as the broker expects (see ml_store_caseop_t). Store thread. */
static int s_cases_bump(ml_store_t *st, ml_store_req_t *r)
{
    for (size_t i = 0; i < r->n_ops; i++) {
        if (r->ops[i].open)
            continue;
        sqlite3_bind_text(st->case_bump, 1, r->ops[i].row.case_id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st->case_bump, 2, r->ops[i].row.version);
        int src = s_run(st->case_bump);
        if (src != SQLITE_DONE)
            return src;
    }
    return SQLITE_DONE;
}

static int s_insert_msg(ml_store_t *st, ml_store_req_t *r, int64_t now);

/* Looks for a stored message with r's id. *found = 1 when there is one:
 * then r is a duplicate (rc 0, seq the earlier row's) when the earlier row
 * has r's sender and r's digest (or no digest, a row of schema 3), and is
 * refused with ML_EIDUSED otherwise: a different message reusing an id must
 * not be answered Accepted and dropped (F7). Returns an SQLite result code,
 * SQLITE_DONE when the transaction may go on. Store thread. */
static int s_find_earlier(ml_store_t *st, ml_store_req_t *r, int *found)
{
    sqlite3_stmt *q = st->lookup;
    sqlite3_bind_text(q, 1, r->id, -1, SQLITE_STATIC);
    int src = sqlite3_step(q);
    *found = src == SQLITE_ROW;
    if (src == SQLITE_ROW) {
        const char *sender = (const char *)sqlite3_column_text(q, 1);
        const void *digest = sqlite3_column_blob(q, 2);
        int dlen = sqlite3_column_bytes(q, 2);
        int same = sender && r->sender && strcmp(sender, r->sender) == 0;
        if (same && digest && r->has_digest)
            same =
                dlen == ML_STORE_DIGEST_LEN && memcmp(digest, r->digest, ML_STORE_DIGEST_LEN) == 0;
        if (same) {
            r->seq = sqlite3_column_int64(q, 0);
            r->duplicate = 1;
            r->rc = 0;
        } else {
            r->rc = ML_EIDUSED;
        }
        src = SQLITE_DONE;
    }
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    return src;
}

/* Inserts one put inside the open transaction, or refuses it for the quota
 * (r->rc = ML_EFULL; not an error of the transaction) or for a case change
 * that does not apply (r->rc = ML_EDENIED). Returns an SQLite result code:
 * SQLITE_DONE when the transaction may go on. */
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
        int64_t held = pages * st->page_size + (int64_t)st->slen +
                       (int64_t)__atomic_load_n(&st->seg_bytes, __ATOMIC_RELAXED);
        if (held > st->max_bytes) {
            if (!st->quota_full)
                ml_log(ML_LOG_WARN, S_COMPONENT,
                       "%s: %lld bytes (database and segments) is over max_bytes %lld, refusing "
                       "messages",
                       st->path, (long long)held, (long long)st->max_bytes);
            st->quota_full = 1;
            r->rc = ML_EFULL;
            return SQLITE_DONE;
        }
        st->quota_full = 0;
    }
    if (r->n_ops == 0)
        return s_insert_msg(st, r, now);

    /* With case changes: a duplicate must be known before they apply,
     * unless the id was just made by the broker itself. */
    if (r->fresh) {
        int applied = 0;
        if ((src = s_cases_apply(st, r, &applied)) != SQLITE_DONE || !applied)
            return src;
        return s_insert_msg(st, r, now);
    }
    int found = 0;
    if ((src = s_find_earlier(st, r, &found)) != SQLITE_DONE)
        return src;
    if (found)
        return r->rc == 0 ? s_cases_bump(st, r) : SQLITE_DONE;
    int applied = 0;
    if ((src = s_cases_apply(st, r, &applied)) != SQLITE_DONE || !applied)
        return src;
    return s_insert_msg(st, r, now);
}

/* The id of name in "names" (*id; NULL names are left alone), added in
 * the open transaction if it is new. Must not be called inside a
 * savepoint that may be rolled back: the cache would keep an id whose row
 * is gone (a whole transaction's rollback empties the cache, see
 * s_exec_batch). Returns an SQLite code, SQLITE_DONE on success. Store
 * thread. */
static int s_name_id(ml_store_t *st, const char *name, int64_t *id)
{
    if (!name)
        return SQLITE_DONE;
    size_t len = strlen(name);
    void *v = ml_hash_get(st->names, name, len);
    if (v) {
        *id = (int64_t)(intptr_t)v;
        return SQLITE_DONE;
    }
    sqlite3_stmt *q = st->name_get;
    sqlite3_bind_text(q, 1, name, (int)len, SQLITE_STATIC);
    int src = sqlite3_step(q);
    if (src == SQLITE_ROW)
        *id = sqlite3_column_int64(q, 0);
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    if (src == SQLITE_DONE) {
        sqlite3_bind_text(st->name_add, 1, name, (int)len, SQLITE_STATIC);
        if ((src = s_run(st->name_add)) != SQLITE_DONE)
            return src;
        *id = sqlite3_last_insert_rowid(st->wr);
    } else if (src != SQLITE_ROW) {
        return src;
    }
    /* Out of memory only costs the next lookup a query. */
    (void)ml_hash_put(st->names, name, len, (void *)(intptr_t)*id);
    return SQLITE_DONE;
}

/* Inserts the message of a put (OR IGNORE: a duplicate id is reported,
 * not an error). Store thread. */
static int s_insert_msg(ml_store_t *st, ml_store_req_t *r, int64_t now)
{
    int src;
    sqlite3_stmt *s = st->insert;
    sqlite3_bind_text(s, 1, r->id, -1, SQLITE_STATIC);
    sqlite3_bind_text(s, 2, r->case_id, -1, SQLITE_STATIC);
    int64_t sender = 0, recipient = 0;
    if ((src = s_name_id(st, r->sender, &sender)) != SQLITE_DONE ||
        (src = s_name_id(st, r->recipient, &recipient)) != SQLITE_DONE)
        return src;
    if (r->sender)
        sqlite3_bind_int64(s, 3, sender);
    if (r->recipient)
        sqlite3_bind_int64(s, 4, recipient);
    sqlite3_bind_int(s, 5, r->kind);
    sqlite3_bind_int(s, 6, r->priority);
    sqlite3_bind_int64(s, 7, r->created_at);
    sqlite3_bind_int64(s, 8, r->deadline);
    sqlite3_bind_int64(s, 9, now);
    /* r->envelope is never NULL, so an empty envelope is stored as an empty
     * blob, not as NULL. */
    sqlite3_bind_int64(s, 10, (sqlite3_int64)r->plain_len);
    if (r->has_digest)
        sqlite3_bind_blob(s, 11, r->digest, ML_STORE_DIGEST_LEN, SQLITE_STATIC);
    /* The row names where its body's record will be; the record (which
     * carries the seq) is staged once the insert has made the seq. */
    uint32_t seg;
    uint64_t off;
    s_seg_next_loc(st, &seg, &off);
    sqlite3_bind_int64(s, 12, seg);
    sqlite3_bind_int64(s, 13, (sqlite3_int64)off);
    sqlite3_bind_int64(s, 14, (sqlite3_int64)r->envelope_len);
    src = s_run(s);
    if (src != SQLITE_DONE)
        return src;
    if (sqlite3_changes(st->wr) == 1) {
        r->seq = sqlite3_last_insert_rowid(st->wr);
        if ((src = s_bind_seq_run(st->pend_add, r->seq)) != SQLITE_DONE)
            return src;
        if ((src = s_seg_stage(st, r->seq, r->envelope, r->envelope_len, r->crc)) != SQLITE_DONE)
            return src;
        r->rc = 0;
        return SQLITE_DONE;
    }

    int found = 0;
    if ((src = s_find_earlier(st, r, &found)) != SQLITE_DONE)
        return src;
    if (!found) {
        /* Ignored yet absent: some other constraint refused the row. */
        ml_log(ML_LOG_ERROR, S_COMPONENT, "%s: message %s was refused by the schema", st->path,
               r->id);
        r->rc = ML_ESTORE;
    }
    return SQLITE_DONE;
}

/* A message's state lives in three places (see s_schema): msgs.state 2
 * for dead, a "delivered" row, a "pending" row while queued. Each mark
 * keeps them consistent: a message is in "pending" exactly when it is
 * neither dead nor delivered. Store thread, inside the group's
 * transaction. */
static int s_mark(ml_store_t *st, ml_store_req_t *r, int64_t now)
{
    sqlite3_stmt *s;
    int src;
    switch (r->op) {
    case S_OP_DELIVERED:
        /* Only a queued message becomes delivered: its pending row is the
         * guard, and the message row itself is not written. */
        if ((src = s_bind_seq_run(st->pend_del, r->seq)) != SQLITE_DONE ||
            sqlite3_changes(st->wr) == 0)
            return src;
        s = st->delivered;
        sqlite3_bind_int64(s, 1, r->seq);
        sqlite3_bind_int64(s, 2, now);
        return s_run(s);
    case S_OP_DEAD:
    case S_OP_DEAD_DELIVERED:
        if ((src = s_bind_seq_run(st->pend_del, r->seq)) != SQLITE_DONE)
            return src;
        /* A plain dead mark applies to a queued message only; the
         * explicit one (F9) to a delivered one too. */
        if (r->op == S_OP_DEAD && sqlite3_changes(st->wr) == 0)
            return SQLITE_DONE;
        s = r->op == S_OP_DEAD ? st->dead : st->dead_delivered;
        sqlite3_bind_int64(s, 1, r->seq);
        sqlite3_bind_text(s, 2, r->reason, -1, SQLITE_STATIC);
        sqlite3_bind_int(s, 3, r->attempts);
        sqlite3_bind_int64(s, 4, now);
        return s_run(s);
    case S_OP_REPLAY:
        /* Queued again: no longer delivered (F9's dead consult was). */
        if ((src = s_bind_seq_run(st->replay, r->seq)) != SQLITE_DONE ||
            sqlite3_changes(st->wr) == 0)
            return src;
        if ((src = s_bind_seq_run(st->dlv_del, r->seq)) != SQLITE_DONE)
            return src;
        return s_bind_seq_run(st->pend_add, r->seq);
    default: { /* S_OP_PURGE */
        if ((src = s_bind_seq_run(st->purge_seg, r->seq)) != SQLITE_DONE)
            return src;
        if ((src = s_bind_seq_run(st->purge_msg, r->seq)) != SQLITE_DONE ||
            sqlite3_changes(st->wr) == 0)
            return src;
        return s_bind_seq_run(st->dlv_del, r->seq);
    }
    }
}

static struct s_closed *s_closed_find(ml_store_t *st, uint64_t stream)
{
    for (size_t i = 0; stream && i < st->n_closed; i++)
        if (st->closed_streams[i].stream == stream)
            return &st->closed_streams[i];
    return NULL;
}

/* A put failed for now: its stream closes (if it is not closed already),
 * and the put records which closing it belongs to. Store thread. */
static void s_stream_close(ml_store_t *st, ml_store_req_t *r)
{
    if (!r->stream || r->op != S_OP_PUT)
        return;
    struct s_closed *c = s_closed_find(st, r->stream);
    if (!c) {
        if (st->n_closed == st->cap_closed) {
            size_t cap = st->cap_closed ? st->cap_closed * 2 : 8;
            struct s_closed *n = realloc(st->closed_streams, cap * sizeof *n);
            if (!n)
                return; /* out of memory: order is then only kept by the loop's holds */
            st->closed_streams = n;
            st->cap_closed = cap;
        }
        c = &st->closed_streams[st->n_closed++];
        *c = (struct s_closed){r->stream, ++st->close_gen, r->rc};
    }
    r->gen = c->gen;
}

static void s_stream_reopen(ml_store_t *st, uint64_t stream, uint64_t gen)
{
    struct s_closed *c = s_closed_find(st, stream);
    if (c && c->gen == gen)
        *c = st->closed_streams[--st->n_closed];
}

static int s_transient(int rc)
{
    return rc == ML_EFULL || rc == ML_ESTORE || rc == ML_EDENIED;
}

/* Publishes what the group just settled found out about writing, for
 * ml_store_health. Store thread, mu held. */
static void s_health_update(ml_store_t *st)
{
    if (st->disk_full) {
        st->health_rc = ML_EFULL;
        snprintf(st->health_why, sizeof st->health_why, "the disk under %s is full", st->path);
    } else if (st->quota_full) {
        st->health_rc = ML_EFULL;
        snprintf(st->health_why, sizeof st->health_why, "%s is past max_store_bytes (%lld)",
                 st->path, (long long)st->max_bytes);
    } else if (st->batch_rc == ML_ESTORE) {
        st->health_rc = ML_ESTORE;
        snprintf(st->health_why, sizeof st->health_why, "the last write to %s failed: %s", st->path,
                 st->write_err);
    } else {
        st->health_rc = 0;
        st->health_why[0] = '\0';
    }
}

/* After a rollback: names the transaction added are gone with it. */
static void s_names_forget(ml_store_t *st)
{
    ml_hash_iter_t it = {0};
    const void *key;
    size_t len;
    while (ml_hash_next(st->names, &it, &key, &len, NULL) == 1)
        ml_hash_del(st->names, key, len, NULL);
}

/* Runs the batch as one write transaction. With with_puts = 0 the puts are
 * skipped (a retry of the marks alone after the puts broke the first try).
 * Returns 0 once committed, or ML_EFULL / ML_ESTORE after rolling back, in
 * which case the puts' own results are meaningless. Store thread. */
static int s_exec_batch(ml_store_t *st, ml_store_req_t *batch, int with_puts)
{
    int rc = 0;
    int64_t now = ml_now_ms();
    int src = s_seg_group_begin(st);
    if (src != SQLITE_DONE)
        goto out;
    if ((src = s_run(st->begin)) != SQLITE_DONE)
        goto out;
    for (ml_store_req_t *r = batch; r; r = r->next) {
        struct s_closed *cl = r->op == S_OP_PUT && with_puts ? s_closed_find(st, r->stream) : NULL;
        if (cl) {
            r->rc = cl->rc; /* not tried: its stream is closed */
            src = SQLITE_DONE;
        } else if (r->op == S_OP_PUT) {
            src = with_puts ? s_insert(st, r, now) : SQLITE_DONE;
            /* Refused on its own (quota, case version): the stream's next
             * puts, in this group too, are not tried. */
            if (with_puts && src == SQLITE_DONE && s_transient(r->rc))
                s_stream_close(st, r);
        } else if (r->op == S_OP_CASE) {
            int applied;
            src = with_puts ? s_cases_apply(st, r, &applied) : SQLITE_DONE;
        } else {
            src = s_mark(st, r, now);
        }
        if (src != SQLITE_DONE)
            goto out;
    }
    /* The bodies are durable before the rows that point at them. */
    if ((src = s_seg_group_flush(st)) != SQLITE_DONE)
        goto out;
    src = s_run(st->commit);
out:
    st->slen = 0;
    if (src != SQLITE_DONE) {
        rc = s_write_error(st, src);
        /* SQLite rolls back by itself after some errors (a full disk among
         * them); after the others the transaction is still open. */
        if (!sqlite3_get_autocommit(st->wr))
            s_run(st->rollback);
        s_names_forget(st);
    } else if (st->disk_full) {
        ml_log(ML_LOG_INFO, S_COMPONENT, "%s: disk has room again", st->path);
        st->disk_full = 0;
    }
    return rc;
}

/* Settles one batch: fills every put's rc, seq and duplicate. Returns the
 * number of requests that failed and counts committed transactions. Store
 * thread. */
static uint64_t s_settle_batch(ml_store_t *st, ml_store_req_t *batch, uint64_t *transactions,
                               int *marks_failed)
{
    int has_puts = 0, has_marks = 0;
    for (ml_store_req_t *r = batch; r; r = r->next) {
        if (s_has_result(r->op))
            has_puts = 1;
        else
            has_marks = 1;
    }
    int rc = s_exec_batch(st, batch, 1);
    int mark_rc = rc;
    st->batch_rc = rc;
    if (rc == 0) {
        (*transactions)++;
    } else {
        for (ml_store_req_t *r = batch; r; r = r->next) {
            if (s_has_result(r->op)) {
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
    for (ml_store_req_t *r = batch; r; r = r->next) {
        failed += s_has_result(r->op) ? r->rc != 0 : mark_rc != 0;
        if (s_has_result(r->op) && s_transient(r->rc))
            s_stream_close(st, r);
    }
    *marks_failed = has_marks && mark_rc != 0;
    return failed;
}

/* The checkpointer looks every S_CKPT_MS and copies the WAL into the
 * database once S_CKPT_FRAMES frames have been committed since its last
 * copy, or S_CKPT_IDLE_MS have passed with anything new. Copying every
 * 50 ms whatever the WAL held wrote the hot pages (the last leaf of each
 * tree, rewritten by every group) into broker.db ~20 times a second;
 * waiting for 16 MiB of WAL copies each of them once per 16 MiB instead
 * (docs/performance.md, "Store v5": the checkpointer wrote 1.6 KiB per
 * referral, now 1.0). */
#define S_CKPT_MS 50
#define S_CKPT_FRAMES 4096
#define S_CKPT_IDLE_MS 1000

/* The writer's commit hook: how many frames the WAL holds (the checkpointer
 * reads it), and the backstop autocheckpoint this hook replaces. */
static int s_wal_hook(void *arg, sqlite3 *db, const char *name, int frames)
{
    ml_store_t *st = arg;
    __atomic_store_n(&st->wal_frames, (int64_t)frames, __ATOMIC_RELAXED);
    if (frames >= 4 * 16384)
        sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
    return SQLITE_OK;
}

static void s_ckpt_main(void *arg)
{
    pthread_setname_np(pthread_self(), "ml-ckpt");
    ml_store_t *st = arg;
    long failing = 0;
    int64_t done = 0, last_at = ml_mono_ms();
    uv_mutex_lock(&st->mu);
    while (!st->stopping) {
        uv_cond_timedwait(&st->ckpt_cv, &st->mu, (uint64_t)S_CKPT_MS * 1000000u);
        if (st->stopping)
            break;
        int64_t frames = __atomic_load_n(&st->wal_frames, __ATOMIC_RELAXED);
        if (frames < done)
            done = 0; /* the WAL started again from its beginning */
        int64_t mono = ml_mono_ms();
        if (frames - done < S_CKPT_FRAMES && (frames == done || mono - last_at < S_CKPT_IDLE_MS))
            continue;
        last_at = mono;
        uv_mutex_unlock(&st->mu);
        int nlog = 0, nckpt = 0;
        int src = sqlite3_wal_checkpoint_v2(st->ck, NULL, SQLITE_CHECKPOINT_PASSIVE, &nlog, &nckpt);
        if (src == SQLITE_OK)
            done = nckpt;
        /* Once per episode: a full disk fails every attempt (every
         * S_CKPT_MS) until space returns. */
        if (src != SQLITE_OK && src != SQLITE_BUSY) {
            if (failing++ == 0)
                ml_log(ML_LOG_WARN, S_COMPONENT, "checkpoint of %s: %s (retrying quietly)",
                       st->path, sqlite3_errmsg(st->ck));
        } else if (src == SQLITE_OK && failing) {
            ml_log(ML_LOG_INFO, S_COMPONENT, "checkpoint of %s works again after %ld failure(s)",
                   st->path, failing);
            failing = 0;
        }
        uv_mutex_lock(&st->mu);
    }
    uv_mutex_unlock(&st->mu);
}

/* ---- retention ---------------------------------------------------------- */

enum { S_PRUNE_IDLE, S_PRUNE_MESSAGES, S_PRUNE_CASES, S_PRUNE_VACUUM };

/* Rows a messages step looks at per deleted row it may make: most rows of
 * a busy store are young or in open cases, and the scan is what bounds a
 * step's time. */
#define S_PRUNE_SCAN_FACTOR 4

/* What a messages step does with one row. */
enum { S_KEEP, S_DROP_BODY, S_DROP_ROW };

typedef struct {
    int64_t seq;
    int action;
    int had_body;
    int64_t body_len;
    int64_t seg;
    int chunk;
} s_prune_row_t;

static int s_prune_due(const ml_store_t *st, int64_t mono)
{
    if (st->prune_phase != S_PRUNE_IDLE || st->prune_asked || st->prune_wait)
        return 1;
    return st->prune_interval_ms > 0 && mono >= st->prune_next;
}

/* Decides one row of the messages scan (the columns of prune_scan). */
static int s_prune_decide(const ml_store_t *st, sqlite3_stmt *q, int64_t now)
{
    int kind = sqlite3_column_int(q, 1);
    int state = sqlite3_column_int(q, 2);
    int64_t delivered_at = sqlite3_column_int64(q, 3);
    int has_case = sqlite3_column_int(q, 4);
    int closed = sqlite3_column_int(q, 5);
    int64_t case_at = sqlite3_column_int64(q, 6);
    int case_kind = sqlite3_column_int(q, 7);
    int case_state = sqlite3_column_int(q, 8);
    int has_body = sqlite3_column_int(q, 9);
    /* Queued messages wait for their recipient and dead letters for ops
     * (dlq replay / purge): neither is retention's to drop. */
    if (state != ML_MSG_DELIVERED)
        return S_KEEP;
    if (st->retention_ms >= 0 && (!has_case || closed)) {
        int64_t final_at = has_case && case_at > delivered_at ? case_at : delivered_at;
        if (final_at <= now - st->retention_ms)
            return S_DROP_ROW;
    }
    /* A chunk is only there to reach the reading centre: once it has the
     * whole study (or the case is over) the broker has no use for it. */
    if (has_body && kind == MEDLINK__V1__KIND__KIND_IMAGING_CHUNK && has_case &&
        case_kind == ML_CASE_IMAGING &&
        (closed ||
         ml_case_rank(ML_CASE_IMAGING, case_state) >=
             ml_case_rank(ML_CASE_IMAGING, MEDLINK__V1__IMAGING_STATUS__IMAGING_STUDY_RECEIVED)))
        return S_DROP_BODY;
    return S_KEEP;
}

/* One messages step: looks at up to S_PRUNE_SCAN_FACTOR x prune_batch rows
 * after the cursor and deletes what retention allows, in one transaction.
 * *end is set once the scan has reached the newest row. Returns an SQLite
 * code, SQLITE_DONE on success. Store thread. */
static int s_prune_messages(ml_store_t *st, int64_t now, int *end)
{
    size_t cap = (size_t)st->prune_batch * S_PRUNE_SCAN_FACTOR, n = 0;
    s_prune_row_t *rows = malloc(cap * sizeof *rows);
    if (!rows)
        return SQLITE_NOMEM;
    int src = s_run(st->begin);
    if (src != SQLITE_DONE)
        goto out;
    /* Read first, then delete: the scan must not step over rows it is
     * deleting. */
    sqlite3_stmt *q = st->prune_scan;
    sqlite3_bind_int64(q, 1, st->prune_cursor);
    sqlite3_bind_int64(q, 2, (sqlite3_int64)cap);
    size_t drops = 0;
    while ((src = sqlite3_step(q)) == SQLITE_ROW) {
        s_prune_row_t *r = &rows[n++];
        r->seq = sqlite3_column_int64(q, 0);
        r->action = drops < (size_t)st->prune_batch ? s_prune_decide(st, q, now) : S_KEEP;
        r->had_body = sqlite3_column_int(q, 9);
        r->body_len = sqlite3_column_int64(q, 10);
        r->seg = sqlite3_column_int64(q, 11);
        r->chunk = sqlite3_column_int(q, 1) == MEDLINK__V1__KIND__KIND_IMAGING_CHUNK;
        if (r->action != S_KEEP)
            drops++;
        /* Stop the scan where the batch is full so that the cursor does
         * not pass rows that were not decided. */
        if (drops >= (size_t)st->prune_batch)
            break;
    }
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    if (src != SQLITE_ROW && src != SQLITE_DONE)
        goto out;
    *end = src == SQLITE_DONE && n < cap;
    src = SQLITE_DONE;
    uint64_t msgs = 0, bodies = 0, chunks = 0, bytes = 0;
    for (size_t i = 0; i < n && src == SQLITE_DONE; i++) {
        s_prune_row_t *r = &rows[i];
        if (r->action == S_KEEP)
            continue;
        int dropped = 0;
        if (r->action == S_DROP_ROW) {
            sqlite3_bind_int64(st->prune_del_msg, 1, r->seq);
            if ((src = s_run(st->prune_del_msg)) != SQLITE_DONE)
                break;
            int n_del = sqlite3_changes(st->wr);
            if (n_del > 0 && (src = s_bind_seq_run(st->dlv_del, r->seq)) != SQLITE_DONE)
                break;
            msgs += (uint64_t)n_del;
            dropped = n_del > 0 && r->had_body;
        } else if (r->had_body) {
            sqlite3_bind_int64(st->prune_del_body, 1, r->seq);
            if ((src = s_run(st->prune_del_body)) != SQLITE_DONE)
                break;
            dropped = sqlite3_changes(st->wr) > 0;
        }
        if (dropped) {
            bodies++;
            bytes += (uint64_t)r->body_len;
            chunks += r->action == S_DROP_BODY;
            sqlite3_bind_int64(st->seg_drop, 1, r->seg);
            if ((src = s_run(st->seg_drop)) != SQLITE_DONE)
                break;
        }
    }
    if (src == SQLITE_DONE && (src = s_run(st->commit)) == SQLITE_DONE) {
        if (bodies)
            s_seg_reclaim(st);
        st->prune_run.messages += msgs;
        st->prune_run.bodies += bodies;
        st->prune_run.chunk_bodies += chunks;
        st->prune_run.payload_bytes += bytes;
        if (n > 0)
            st->prune_cursor = rows[n - 1].seq;
    }
out:
    if (src != SQLITE_DONE && !sqlite3_get_autocommit(st->wr))
        s_run(st->rollback);
    free(rows);
    return src;
}

/* One timelines step: deletes up to prune_batch final cases (their rows
 * and timelines) whose last change is older than timeline_ms, and never
 * younger than retention_ms, so that a case outlives its messages.
 * *end is set when fewer were due. Store thread. */
static int s_prune_cases(ml_store_t *st, int64_t now, int *end)
{
    *end = 1;
    if (st->timeline_ms < 0)
        return SQLITE_DONE;
    int64_t keep = st->timeline_ms > st->retention_ms ? st->timeline_ms : st->retention_ms;
    if (st->retention_ms < 0)
        return SQLITE_DONE; /* messages are kept for ever: so are their cases */
    size_t cap = (size_t)st->prune_batch, n = 0;
    char **ids = calloc(cap, sizeof *ids);
    if (!ids)
        return SQLITE_NOMEM;
    int src = s_run(st->begin);
    if (src != SQLITE_DONE)
        goto out;
    sqlite3_stmt *q = st->prune_cases;
    sqlite3_bind_int64(q, 1, now - keep);
    sqlite3_bind_int64(q, 2, (sqlite3_int64)cap);
    while (n < cap && (src = sqlite3_step(q)) == SQLITE_ROW) {
        const char *id = (const char *)sqlite3_column_text(q, 0);
        if (!(ids[n] = strdup(id ? id : ""))) {
            src = SQLITE_NOMEM;
            break;
        }
        n++;
    }
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    if (src != SQLITE_ROW && src != SQLITE_DONE)
        goto out;
    *end = n < cap;
    src = SQLITE_DONE;
    uint64_t cases = 0, events = 0;
    for (size_t i = 0; i < n && src == SQLITE_DONE; i++) {
        sqlite3_bind_text(st->prune_del_events, 1, ids[i], -1, SQLITE_STATIC);
        if ((src = s_run(st->prune_del_events)) != SQLITE_DONE)
            break;
        events += (uint64_t)sqlite3_changes(st->wr);
        sqlite3_bind_text(st->prune_del_case, 1, ids[i], -1, SQLITE_STATIC);
        if ((src = s_run(st->prune_del_case)) != SQLITE_DONE)
            break;
        cases += (uint64_t)sqlite3_changes(st->wr);
    }
    if (src == SQLITE_DONE && (src = s_run(st->commit)) == SQLITE_DONE) {
        st->prune_run.cases += cases;
        st->prune_run.events += events;
    }
out:
    if (src != SQLITE_DONE && !sqlite3_get_autocommit(st->wr))
        s_run(st->rollback);
    for (size_t i = 0; i < n; i++)
        free(ids[i]);
    free(ids);
    return src;
}

/* One vacuum step: gives at most vacuum_pages free pages back to the file
 * system (each incremental_vacuum is a short write transaction of its
 * own). *end is set when no free page is left. Store thread. */
static int s_prune_vacuum(ml_store_t *st, int *end)
{
    int64_t before = 0, after = 0, free_pages = 0;
    int src = s_query_int(st->wr, "PRAGMA page_count", &before);
    if (src != SQLITE_OK)
        return src;
    char sql[64];
    snprintf(sql, sizeof sql, "PRAGMA incremental_vacuum(%d)", st->vacuum_pages);
    /* The pragma returns one row per page it frees; s_query_int would stop
     * after the first, so it is stepped to the end here. */
    sqlite3_stmt *v = NULL;
    if ((src = sqlite3_prepare_v2(st->wr, sql, -1, &v, NULL)) != SQLITE_OK)
        return src;
    src = s_run(v);
    sqlite3_finalize(v);
    if (src != SQLITE_DONE)
        return src;
    if ((src = s_query_int(st->wr, "PRAGMA page_count", &after)) != SQLITE_OK ||
        (src = s_query_int(st->wr, "PRAGMA freelist_count", &free_pages)) != SQLITE_OK)
        return src;
    if (before > after) {
        st->prune_run.pages_vacuumed += (uint64_t)(before - after);
        st->prune_run.bytes_freed += (uint64_t)((before - after) * st->page_size);
    }
    st->prune_run.free_pages = (uint64_t)free_pages;
    /* No progress means the file is not incremental (a conversion that
     * failed): stop rather than come back for ever. */
    *end = free_pages == 0 || before == after;
    return SQLITE_DONE;
}

/* Ends a run: records it, and hands it to every ml_store_prune waiting
 * for it (through the done list; mu held). Store thread. */
static int s_prune_finish(ml_store_t *st, int rc, int64_t mono)
{
    ml_store_pruned_t *r = &st->prune_run;
    r->took_ms = ml_now_ms() - r->started_at;
    st->prune_phase = S_PRUNE_IDLE;
    st->prune_cursor = 0;
    st->prune_next = mono + st->prune_interval_ms;
    if (r->messages || r->bodies || r->cases || r->pages_vacuumed)
        ml_log(ML_LOG_INFO, S_COMPONENT,
               "retention: %llu message(s), %llu body(ies) (%llu imaging chunk(s), %llu bytes),"
               " %llu final case(s) with %llu timeline entr(ies) removed; %llu bytes returned by"
               " vacuum in %lld ms",
               (unsigned long long)r->messages, (unsigned long long)r->bodies,
               (unsigned long long)r->chunk_bodies, (unsigned long long)r->payload_bytes,
               (unsigned long long)r->cases, (unsigned long long)r->events,
               (unsigned long long)r->bytes_freed, (long long)r->took_ms);
    int notify = 0;
    st->last_prune = *r;
    while (st->prune_asked) {
        ml_store_req_t *q = st->prune_asked;
        st->prune_asked = q->next;
        q->next = NULL;
        q->rc = rc;
        q->pruned = *r;
        if (st->done_tail)
            st->done_tail->next = q;
        else
            st->done_head = q;
        st->done_tail = q;
        notify = 1;
    }
    return notify;
}

/* Runs one bounded step of retention (one transaction, or one vacuum
 * step) if one is due. Called with mu held, between groups; releases it
 * while it works. Returns 1 when the loop needs waking. Store thread. */
static int s_prune_step(ml_store_t *st)
{
    int64_t mono = ml_mono_ms();
    /* Asked-for runs wait for the run in progress to end, then start a
     * fresh one: rows the running one has already passed are looked at
     * again, so "prune now" covers everything settled before it. */
    while (st->prune_phase == S_PRUNE_IDLE && st->prune_wait) {
        ml_store_req_t *q = st->prune_wait;
        st->prune_wait = q->next;
        q->next = st->prune_asked;
        st->prune_asked = q;
    }
    if (!s_prune_due(st, mono))
        return 0;
    if (st->prune_phase == S_PRUNE_IDLE) {
        memset(&st->prune_run, 0, sizeof st->prune_run);
        st->prune_run.started_at = ml_now_ms();
        st->prune_cursor = 0;
        st->prune_phase = S_PRUNE_MESSAGES;
    }
    int phase = st->prune_phase;
    uv_mutex_unlock(&st->mu);
    int end = 0, src;
    int64_t now = ml_now_ms();
    if (phase == S_PRUNE_MESSAGES)
        /* Even with messages kept for ever, chunk bodies still go. */
        src = s_prune_messages(st, now, &end);
    else if (phase == S_PRUNE_CASES)
        src = s_prune_cases(st, now, &end);
    else
        src = s_prune_vacuum(st, &end);
    int rc = 0;
    if (src != SQLITE_DONE)
        rc = s_write_error(st, src);
    uv_mutex_lock(&st->mu);
    if (rc != 0)
        return s_prune_finish(st, rc, mono);
    if (end && ++st->prune_phase > S_PRUNE_VACUUM)
        return s_prune_finish(st, 0, mono);
    return 0;
}

const uint32_t ml_store_group_le[ML_STORE_GROUP_BUCKETS - 1] = {1,   4,    16,   64,
                                                                256, 1024, 4096, 16384};
const uint32_t ml_store_commit_le_us[ML_STORE_COMMIT_BUCKETS - 1] = {
    500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000, 1000000};

/* Store thread, under mu: one group of n requests took us microseconds
 * (its transaction, fsync included), for the histograms of /metrics. */
static void s_observe_group(ml_store_stats_t *k, uint64_t n, uint64_t us)
{
    size_t i = 0;
    while (i < ML_STORE_GROUP_BUCKETS - 1 && n > ml_store_group_le[i])
        i++;
    k->group_hist[i]++;
    k->groups++;
    k->group_requests += n;
    i = 0;
    while (i < ML_STORE_COMMIT_BUCKETS - 1 && us > ml_store_commit_le_us[i])
        i++;
    k->commit_hist[i]++;
    k->commit_us += us;
}

static void s_thread_main(void *arg)
{
    /* A name in top/perf: the store thread is the broker's other core. */
    pthread_setname_np(pthread_self(), "ml-store");
    ml_store_t *st = arg;
    uv_mutex_lock(&st->mu);
    for (;;) {
        while (!st->head && !st->stopping) {
            /* Idle: retention gets the thread, one bounded step at a
             * time, so a put arriving meanwhile waits for one step at
             * most. */
            int64_t mono = ml_mono_ms();
            if (st->prune_wait || s_prune_due(st, mono)) {
                if (s_prune_step(st))
                    uv_async_send(&st->async);
                continue;
            }
            if (st->prune_interval_ms > 0)
                uv_cond_timedwait(&st->cv, &st->mu, (uint64_t)(st->prune_next - mono) * 1000000u);
            else
                uv_cond_wait(&st->cv, &st->mu);
        }
        if (!st->head)
            break; /* stopping, and everything queued is committed */

        if (st->head->op == S_OP_REOPEN) {
            /* The loop has run the callback of the put that closed this
             * stream (and held the sender's later messages): what comes
             * after this is tried again. */
            ml_store_req_t *r = st->head;
            st->head = r->next;
            if (!st->head)
                st->tail = NULL;
            st->stats.queue_len--;
            uv_mutex_unlock(&st->mu);
            s_stream_reopen(st, r->stream, r->gen);
            s_req_free(r);
            uv_mutex_lock(&st->mu);
            continue;
        }
        /* Take up to batch_max requests; the rest wait for the next group.
         * A reopening ends the group: what comes after it is tried. */
        ml_store_req_t *batch = st->head, *last = st->head;
        uint64_t n = 1;
        while (last->next && last->next->op != S_OP_REOPEN && n < (uint64_t)st->batch_max) {
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
        int marks_failed = 0;
        int64_t group_at = ml_mono_ms();
        uint64_t group_ns = uv_hrtime();
        uint64_t failed = s_settle_batch(st, batch, &transactions, &marks_failed);
        int64_t group_ms = ml_mono_ms() - group_at;
        uint64_t group_us = (uv_hrtime() - group_ns) / 1000u;

        uv_mutex_lock(&st->mu);
        st->stats.transactions += transactions;
        st->stats.failures += failed;
        s_observe_group(&st->stats, n, group_us);
        s_health_update(st);
        int notify = 0;
        ml_store_req_t *again = NULL, **again_tail = &again; /* marks to retry */
        for (ml_store_req_t *r = batch, *next; r; r = next) {
            next = r->next;
            if (marks_failed && !s_has_result(r->op)) {
                /* A delivered, dead, replay or purge mark that did not
                 * commit (a full disk) goes again with the next group:
                 * dropped, a delivered message would stay queued in the
                 * store and be delivered again after a restart. */
                r->next = NULL;
                *again_tail = r;
                again_tail = &r->next;
                continue;
            }
            if (!s_has_result(r->op) || (r->op == S_OP_CASE && !r->cb)) {
                s_req_free(r);
                continue;
            }
            if (r->op == S_OP_PUT && r->rc == 0 && r->duplicate)
                st->stats.duplicates++;
            else if (r->op == S_OP_PUT && r->rc == 0)
                st->stats.puts++;
            r->next = NULL;
            if (st->done_tail)
                st->done_tail->next = r;
            else
                st->done_head = r;
            st->done_tail = r;
            notify = 1;
        }
        if (again) {
            /* Back at the head, in their order, ahead of newer requests. */
            ml_store_req_t *end = again;
            uint64_t n_again = 1;
            while (end->next) {
                end = end->next;
                n_again++;
            }
            end->next = st->head;
            if (!st->head)
                st->tail = end;
            st->head = again;
            st->stats.queue_len += n_again;
        }
        /* Under load the queue never empties: retention then takes one
         * step between groups, so it neither starves nor holds up a group
         * for longer than one step. */
        if (!st->stopping && !again) {
            /* Steps until they have taken as long as the group did (at
             * least one): under a steady firehose retention then gets up
             * to half of this thread, which is about what deleting a
             * message costs next to storing it, so it keeps pace instead of
             * falling ever further behind; a put waits for one more group
             * at most. */
            int64_t until = ml_mono_ms() + group_ms;
            do {
                if (!st->prune_wait && !s_prune_due(st, ml_mono_ms()))
                    break;
                notify |= s_prune_step(st);
            } while (!st->head || ml_mono_ms() < until);
        }
        /* uv_async_send is safe from any thread; the handle outlives this
         * thread because ml_store_close joins it before uv_close. */
        if (notify)
            uv_async_send(&st->async);
        if (again && !st->stopping)
            /* The disk is full: give it a moment rather than spin. */
            uv_cond_timedwait(&st->cv, &st->mu, 100u * 1000000u);
    }
    uv_mutex_unlock(&st->mu);
}

static int s_enqueue(ml_store_t *st, ml_store_req_t *r);

/* Loop thread: reopens a stream once the callback of the put that closed
 * it has run, behind everything handed to the store until then. */
static void s_queue_reopen(ml_store_t *st, uint64_t stream, uint64_t gen)
{
    ml_store_req_t *r = calloc(1, sizeof *r);
    if (!r) {
        ml_log(ML_LOG_ERROR, S_COMPONENT, "%s: out of memory reopening a sender's stream",
               st->path);
        return;
    }
    r->op = S_OP_REOPEN;
    r->stream = stream;
    r->gen = gen;
    s_enqueue(st, r); /* frees it when closing */
}

/* Loop thread: runs the callbacks of every settled put, in request order. */
static void s_async_cb(uv_async_t *h)
{
    ml_store_t *st = h->data;
    uv_mutex_lock(&st->mu);
    ml_store_req_t *r = st->done_head;
    st->done_head = st->done_tail = NULL;
    uv_mutex_unlock(&st->mu);
    uint64_t last_gen = 0;

    while (r) {
        ml_store_req_t *next = r->next;
        /* A callback may close the store: the rest are then dropped without
         * their callbacks, as ml_store_close promises. st itself stays valid
         * until the close callback, which runs after this one returns. */
        if (!st->closed) {
            assert(st->inflight > 0);
            if (--st->inflight == 0)
                uv_unref((uv_handle_t *)&st->async);
            if (r->op == S_OP_PRUNE && r->prune_cb)
                r->prune_cb(r->arg, r->rc, &r->pruned);
            else if (r->cb)
                r->cb(r->arg, r->rc, r->rc == 0 ? r->seq : 0, r->duplicate);
            /* The callback has held the sender's later messages: its
             * stream can take puts again, behind those queued so far. A
             * put refused by the same closing reopens nothing new. */
            if (r->gen && !st->closed && r->gen != last_gen)
                s_queue_reopen(st, r->stream, r->gen);
            last_gen = r->gen ? r->gen : last_gen;
        }
        s_req_free(r);
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
    st->keys = opts ? opts->keys : NULL;
    st->retention_ms = opts ? opts->retention_ms : -1;
    st->timeline_ms = opts ? opts->timeline_ms : -1;
    st->prune_interval_ms = opts && opts->prune_interval_ms > 0 ? opts->prune_interval_ms : 0;
    st->prune_batch = opts && opts->prune_batch > 0 ? opts->prune_batch : 1000;
    st->vacuum_pages = opts && opts->vacuum_pages > 0 ? opts->vacuum_pages : 256;
    st->prune_next = ml_mono_ms() + st->prune_interval_ms;

    st->seg_max = opts && opts->segment_bytes > 0 ? (uint64_t)opts->segment_bytes : S_SEG_MAX;
    st->seg_fd = -1;
    for (int i = 0; i < S_SEG_RD_FDS; i++)
        st->rd_fd[i] = -1;
    if ((rc = s_open_writer(st, err, errlen)) != 0 || (rc = s_seg_open(st, err, errlen)) != 0)
        goto out;
    s_seg_reclaim(st);
    /* A store already past max_bytes refuses the first put: say so from
     * the start (ml_store_health), not only once a put has been refused. */
    int64_t pages0 = 0;
    if (st->max_bytes > 0 && s_query_int(st->wr, "PRAGMA page_count", &pages0) == SQLITE_OK &&
        pages0 * st->page_size + (int64_t)st->seg_bytes > st->max_bytes) {
        ml_log(ML_LOG_WARN, S_COMPONENT,
               "%s: %lld bytes (database and segments) is over max_bytes %lld, refusing messages",
               st->path, (long long)(pages0 * st->page_size + (int64_t)st->seg_bytes),
               (long long)st->max_bytes);
        st->quota_full = 1;
    }
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
    if ((rc = ml_hash_new(64, 0, &st->names)) != 0) {
        ml_seterr(err, errlen, "%s: out of memory", path);
        goto out;
    }
    if ((rc = s_prepare_all(st, err, errlen)) != 0)
        goto out;
    /* Replaces wal_autocheckpoint's own hook (s_wal_hook keeps a backstop). */
    sqlite3_wal_hook(st->wr, s_wal_hook, st);

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
    s_health_update(st); /* no store thread yet: mu not needed */
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

    /* Runs retention was asked for and did not finish: their callers
     * hear ML_ECLOSED now, so that they can free what they passed. */
    ml_store_req_t *lists[] = {st->prune_wait, st->prune_asked, st->done_head};
    for (size_t i = 0; i < sizeof lists / sizeof lists[0]; i++)
        for (ml_store_req_t *r = lists[i]; r; r = r->next)
            if (r->op == S_OP_PRUNE && r->prune_cb)
                r->prune_cb(r->arg, ML_ECLOSED, &r->pruned);
    s_release(st);
    uv_close((uv_handle_t *)&st->async, s_async_close_cb);
}

/* Appends a request to the store thread's queue. Loop thread. */
static int s_enqueue(ml_store_t *st, ml_store_req_t *r)
{
    uv_mutex_lock(&st->mu);
    if (st->stopping) {
        uv_mutex_unlock(&st->mu);
        s_req_free(r);
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

static size_t s_strsize(const char *s)
{
    return s ? strlen(s) + 1 : 0;
}

/* Seals a timeline detail (bound to its case) when the store has keys.
 * Returns the sealed value (malloc'd) or NULL (no key, no detail, or out of
 * memory: then *fail is set). */
static uint8_t *s_seal_detail(const ml_store_t *st, const char *case_id, const char *detail,
                              size_t *len, int *fail)
{
    uint8_t *out = NULL;
    *len = 0;
    if (!st->keys || !detail || !*detail)
        return NULL;
    if (ml_seal(st->keys, (const uint8_t *)detail, strlen(detail), (const uint8_t *)case_id,
                strlen(case_id), &out, len) != 0) {
        *fail = 1;
        return NULL;
    }
    return out;
}

/* Deep-copies n case changes into one allocation: the array, then the
 * events, then every string (details sealed when the store has keys).
 * Returns NULL out of memory. */
static ml_store_caseop_t *s_ops_dup(const ml_store_t *st, const ml_store_caseop_t *ops, size_t n)
{
    size_t size = n * sizeof *ops, nev = 0;
    for (size_t i = 0; i < n; i++) {
        const ml_store_case_t *c = &ops[i].row;
        const char *strs[] = {c->case_id, c->opener, c->target,
                              c->service, c->linked, c->opening_id};
        for (size_t k = 0; k < sizeof strs / sizeof strs[0]; k++)
            size += s_strsize(strs[k]);
        for (size_t j = 0; j < ops[i].n_events; j++) {
            const ml_store_event_t *e = &ops[i].events[j];
            size += s_strsize(e->node) + s_strsize(e->event) + s_strsize(e->from_state) +
                    s_strsize(e->to_state) + s_strsize(e->message_id) + s_strsize(e->kind) +
                    s_strsize(e->detail) + (st->keys ? ML_SEAL_OVERHEAD : 0);
        }
        nev += ops[i].n_events;
    }
    size += nev * sizeof(ml_store_event_t);
    ml_store_caseop_t *out = malloc(size);
    if (!out)
        return NULL;
    ml_store_event_t *evs = (ml_store_event_t *)(out + n);
    char *p = (char *)(evs + nev);
    for (size_t i = 0; i < n; i++) {
        out[i] = ops[i];
        ml_store_case_t *c = &out[i].row;
        c->case_id = s_copy_str(&p, c->case_id);
        c->opener = s_copy_str(&p, c->opener);
        c->target = s_copy_str(&p, c->target);
        c->service = s_copy_str(&p, c->service);
        c->linked = s_copy_str(&p, c->linked);
        c->opening_id = s_copy_str(&p, c->opening_id);
        out[i].events = evs;
        for (size_t j = 0; j < ops[i].n_events; j++) {
            ml_store_event_t *e = &evs[j];
            *e = ops[i].events[j];
            e->node = s_copy_str(&p, e->node);
            e->event = s_copy_str(&p, e->event);
            e->from_state = s_copy_str(&p, e->from_state);
            e->to_state = s_copy_str(&p, e->to_state);
            e->message_id = s_copy_str(&p, e->message_id);
            e->kind = s_copy_str(&p, e->kind);
            size_t slen = 0;
            int fail = 0;
            uint8_t *sealed = s_seal_detail(st, ops[i].row.case_id, e->detail, &slen, &fail);
            if (fail) {
                free(out);
                return NULL;
            }
            if (sealed) {
                memcpy(p, sealed, slen);
                e->detail = p;
                e->detail_len = slen;
                p += slen;
                free(sealed);
            } else {
                e->detail = s_copy_str(&p, e->detail);
                e->detail_len = 0;
            }
        }
        evs += ops[i].n_events;
    }
    return out;
}

int ml_store_put(ml_store_t *st, const ml_store_msg_t *m, ml_store_put_cb cb, void *arg)
{
    if (!st || !m || !m->id || (!m->envelope && m->envelope_len > 0))
        return ML_EINVAL;
    if (st->closed)
        return ML_ECLOSED;
    /* Sealed here, on the loop thread: the store thread is the serial path
     * every Accepted waits on. */
    uint8_t *sealed = NULL;
    size_t sealed_len = 0;
    if (st->keys && ml_seal(st->keys, m->envelope, m->envelope_len, (const uint8_t *)m->id,
                            strlen(m->id), &sealed, &sealed_len) != 0)
        return ML_ENOMEM;
    const uint8_t *body = sealed ? sealed : m->envelope;
    size_t body_len = sealed ? sealed_len : m->envelope_len;
    size_t size = sizeof(ml_store_req_t) + strlen(m->id) + 1 + body_len;
    const char *strs[] = {m->case_id, m->sender, m->recipient};
    for (size_t i = 0; i < 3; i++)
        size += strs[i] ? strlen(strs[i]) + 1 : 0;
    ml_store_req_t *r = malloc(size);
    if (!r) {
        free(sealed);
        return ML_ENOMEM;
    }
    *r = (ml_store_req_t){.op = S_OP_PUT,
                          .cb = cb,
                          .arg = arg,
                          .kind = m->kind,
                          .priority = m->priority,
                          .created_at = m->created_at,
                          .deadline = m->deadline,
                          .fresh = m->fresh,
                          .has_digest = m->digest != NULL,
                          .stream = m->stream,
                          .envelope_len = body_len,
                          .plain_len = m->envelope_len};
    char *p = (char *)(r + 1);
    /* The envelope goes first: its pointer is then never NULL, even for an
     * empty envelope, which keeps SQLite from binding NULL. */
    if (body_len)
        memcpy(p, body, body_len);
    free(sealed);
    r->envelope = (const uint8_t *)p;
    r->crc = s_rec_crc(r->envelope, body_len);
    p += body_len;
    if (m->digest)
        memcpy(r->digest, m->digest, ML_STORE_DIGEST_LEN);
    r->id = s_copy_str(&p, m->id);
    r->case_id = s_copy_str(&p, m->case_id);
    r->sender = s_copy_str(&p, m->sender);
    r->recipient = s_copy_str(&p, m->recipient);
    if (m->n_ops > 0) {
        if (!(r->ops = s_ops_dup(st, m->ops, m->n_ops))) {
            free(r);
            return ML_ENOMEM;
        }
        r->n_ops = m->n_ops;
    }

    int rc = s_enqueue(st, r);
    if (rc == 0 && st->inflight++ == 0)
        uv_ref((uv_handle_t *)&st->async);
    return rc;
}

int ml_store_case_apply(ml_store_t *st, const ml_store_caseop_t *ops, size_t n_ops,
                        ml_store_put_cb cb, void *arg)
{
    if (!st || !ops || n_ops == 0)
        return ML_EINVAL;
    if (st->closed)
        return ML_ECLOSED;
    ml_store_req_t *r = calloc(1, sizeof *r);
    if (!r)
        return ML_ENOMEM;
    r->op = S_OP_CASE;
    r->cb = cb;
    r->arg = arg;
    if (!(r->ops = s_ops_dup(st, ops, n_ops))) {
        free(r);
        return ML_ENOMEM;
    }
    r->n_ops = n_ops;
    int rc = s_enqueue(st, r);
    if (rc == 0 && cb && st->inflight++ == 0)
        uv_ref((uv_handle_t *)&st->async);
    return rc;
}

int ml_store_barrier(ml_store_t *st, ml_store_put_cb cb, void *arg)
{
    if (!st || !cb)
        return ML_EINVAL;
    if (st->closed)
        return ML_ECLOSED;
    /* A case request with no case in it: it goes through the store thread
     * in order, writes nothing, and is answered like any other. */
    ml_store_req_t *r = calloc(1, sizeof *r);
    if (!r)
        return ML_ENOMEM;
    r->op = S_OP_CASE;
    r->cb = cb;
    r->arg = arg;
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

static int s_dead_req(ml_store_t *st, int op, int64_t seq, const char *reason, int attempts)
{
    if (!st)
        return ML_EINVAL;
    if (st->closed)
        return ML_ECLOSED;
    size_t size = sizeof(ml_store_req_t) + s_strsize(reason);
    ml_store_req_t *r = malloc(size);
    if (!r)
        return ML_ENOMEM;
    *r = (ml_store_req_t){.op = op, .seq = seq, .attempts = attempts};
    char *p = (char *)(r + 1);
    r->reason = s_copy_str(&p, reason);
    return s_enqueue(st, r);
}

int ml_store_mark_dead(ml_store_t *st, int64_t seq, const char *reason, int attempts)
{
    return s_dead_req(st, S_OP_DEAD, seq, reason, attempts);
}

int ml_store_mark_dead_delivered(ml_store_t *st, int64_t seq, const char *reason)
{
    return s_dead_req(st, S_OP_DEAD_DELIVERED, seq, reason, 0);
}

int ml_store_replay(ml_store_t *st, int64_t seq)
{
    return s_mark_req(st, S_OP_REPLAY, seq, NULL);
}

int ml_store_purge(ml_store_t *st, int64_t seq)
{
    return s_mark_req(st, S_OP_PURGE, seq, NULL);
}

int ml_store_prune(ml_store_t *st, ml_store_prune_cb cb, void *arg)
{
    if (!st)
        return ML_EINVAL;
    if (st->closed)
        return ML_ECLOSED;
    ml_store_req_t *r = calloc(1, sizeof *r);
    if (!r)
        return ML_ENOMEM;
    r->op = S_OP_PRUNE;
    r->prune_cb = cb;
    r->arg = arg;
    uv_mutex_lock(&st->mu);
    if (st->stopping) {
        uv_mutex_unlock(&st->mu);
        free(r);
        return ML_ECLOSED;
    }
    r->next = st->prune_wait;
    st->prune_wait = r;
    uv_cond_signal(&st->cv);
    uv_mutex_unlock(&st->mu);
    if (st->inflight++ == 0)
        uv_ref((uv_handle_t *)&st->async);
    return 0;
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
            .deadline = sqlite3_column_int64(s, 9),
            .attempts = sqlite3_column_int(s, 10),
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
    uint8_t *data = NULL;
    size_t n = (size_t)sqlite3_column_int64(s, 2);
    const char *id = (const char *)sqlite3_column_text(s, 3);
    rc = s_seg_read(st, (uint32_t)sqlite3_column_int64(s, 0), (uint64_t)sqlite3_column_int64(s, 1),
                    n, seq, &data);
    if (rc == ML_EPROTO)
        ml_log(ML_LOG_ERROR, S_COMPONENT,
               "%s: message %s (seq %lld) cannot be read: its record in segment %08lld does not "
               "authenticate (damaged on disk)",
               st->seg_dir, id ? id : "?", (long long)seq, (long long)sqlite3_column_int64(s, 0));
    if (rc != 0)
        goto out;
    if (ml_is_sealed(data, n)) {
        rc = st->keys
                 ? ml_open(st->keys, data, n, (const uint8_t *)id, id ? strlen(id) : 0, blob, len)
                 : ML_ENOTFOUND;
        if (rc != 0) {
            ml_log(ML_LOG_ERROR, S_COMPONENT, "%s: message %s (seq %lld) cannot be opened: %s",
                   st->path, id ? id : "?", (long long)seq,
                   rc == ML_ENOTFOUND ? "sealed under a key that is not in store_key / "
                                        "store_old_keys"
                   : rc == ML_EPROTO  ? "it does not authenticate (damaged on disk)"
                                      : ml_strerror(rc));
            /* Damaged on disk, or sealed under a key the config no
             * longer names: reading again will not help. */
            rc = rc == ML_ENOMEM ? ML_ENOMEM : rc == ML_ENOTFOUND ? ML_ECONFIG : ML_EPROTO;
        }
        free(data);
        goto out;
    }
    *blob = data;
    *len = n;
out:
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    return rc;
}

int ml_store_health(ml_store_t *st, char *why, size_t len)
{
    uv_mutex_lock(&st->mu);
    int rc = st->health_rc;
    if (len > 0)
        snprintf(why, len, "%s", st->health_why);
    uv_mutex_unlock(&st->mu);
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

/* ---- synchronous reads ------------------------------------------------- */

/* Steps a freshly prepared read statement to the end, calling row for each
 * row; finalizes it. Returns 0 or ML_ESTORE (logged with what). */
static int s_read_all(ml_store_t *st, sqlite3_stmt *s, const char *what,
                      void (*row)(sqlite3_stmt *s, void *arg), void *arg)
{
    int src;
    while ((src = sqlite3_step(s)) == SQLITE_ROW)
        row(s, arg);
    int rc = 0;
    if (src != SQLITE_DONE) {
        ml_log(ML_LOG_ERROR, S_COMPONENT, "%s: %s: %s", st->path, what, sqlite3_errmsg(st->rd));
        rc = ML_ESTORE;
    }
    sqlite3_finalize(s);
    return rc;
}

static int s_prepare_rd(ml_store_t *st, const char *sql, sqlite3_stmt **out)
{
    if (sqlite3_prepare_v2(st->rd, sql, -1, out, NULL) != SQLITE_OK) {
        ml_log(ML_LOG_ERROR, S_COMPONENT, "%s: cannot prepare a query: %s", st->path,
               sqlite3_errmsg(st->rd));
        return ML_ESTORE;
    }
    return 0;
}

typedef struct {
    ml_store_case_cb cb;
    void *arg;
} s_case_walk_t;

static void s_case_row(sqlite3_stmt *s, void *arg)
{
    s_case_walk_t *w = arg;
    ml_store_case_t c;
    s_read_case(s, &c);
    w->cb(w->arg, &c);
}

int ml_store_cases_open(ml_store_t *st, ml_store_case_cb cb, void *arg)
{
    sqlite3_stmt *s = NULL;
    if (!st || !cb)
        return ML_EINVAL;
    if (s_prepare_rd(st, "SELECT " S_CASE_COLS " FROM cases WHERE closed = 0", &s) != 0)
        return ML_ESTORE;
    s_case_walk_t w = {cb, arg};
    return s_read_all(st, s, "loading open cases", s_case_row, &w);
}

int ml_store_cases_timed(ml_store_t *st, ml_store_case_cb cb, void *arg)
{
    sqlite3_stmt *s = NULL;
    if (!st || !cb)
        return ML_EINVAL;
    if (s_prepare_rd(st, "SELECT " S_CASE_COLS " FROM cases WHERE closed = 0 AND deadline_at > 0",
                     &s) != 0)
        return ML_ESTORE;
    s_case_walk_t w = {cb, arg};
    return s_read_all(st, s, "loading the open cases with a deadline", s_case_row, &w);
}

typedef struct {
    ml_store_count_cb cb;
    void *arg;
} s_count_walk_t;

static void s_count_row(sqlite3_stmt *s, void *arg)
{
    s_count_walk_t *w = arg;
    w->cb(w->arg, (const char *)sqlite3_column_text(s, 0), (const char *)sqlite3_column_text(s, 1),
          sqlite3_column_int64(s, 2));
}

int ml_store_cases_open_counts(ml_store_t *st, ml_store_count_cb cb, void *arg)
{
    sqlite3_stmt *s = NULL;
    if (!st || !cb)
        return ML_EINVAL;
    if (s_prepare_rd(st,
                     "SELECT opener, target, count(*) FROM cases WHERE closed = 0"
                     " GROUP BY opener, target",
                     &s) != 0)
        return ML_ESTORE;
    s_count_walk_t w = {cb, arg};
    return s_read_all(st, s, "counting the open cases", s_count_row, &w);
}

typedef struct {
    ml_store_state_count_cb cb;
    void *arg;
} s_state_walk_t;

static void s_state_row(sqlite3_stmt *s, void *arg)
{
    s_state_walk_t *w = arg;
    w->cb(w->arg, sqlite3_column_int(s, 0), sqlite3_column_int(s, 1), sqlite3_column_int64(s, 2));
}

int ml_store_cases_open_states(ml_store_t *st, ml_store_state_count_cb cb, void *arg)
{
    sqlite3_stmt *s = NULL;
    if (!st || !cb)
        return ML_EINVAL;
    if (s_prepare_rd(st,
                     "SELECT kind, state, count(*) FROM cases WHERE closed = 0"
                     " GROUP BY kind, state",
                     &s) != 0)
        return ML_ESTORE;
    s_state_walk_t w = {cb, arg};
    return s_read_all(st, s, "counting the open cases by state", s_state_row, &w);
}

int ml_store_case_get(ml_store_t *st, const char *case_id, ml_store_case_cb cb, void *arg)
{
    if (!st || !case_id || !cb)
        return ML_EINVAL;
    sqlite3_stmt *s = st->rd_case;
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    int src = sqlite3_step(s), rc = 0;
    if (src == SQLITE_ROW) {
        ml_store_case_t c;
        s_read_case(s, &c);
        cb(arg, &c);
    } else if (src == SQLITE_DONE) {
        rc = ML_ENOTFOUND;
    } else {
        ml_log(ML_LOG_ERROR, S_COMPONENT, "%s: reading case %s: %s", st->path, case_id,
               sqlite3_errmsg(st->rd));
        rc = ML_ESTORE;
    }
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    return rc;
}

int ml_store_cases_query(ml_store_t *st, int kind, int state, int64_t overdue_at, int limit,
                         ml_store_case_cb cb, void *arg)
{
    sqlite3_stmt *s = NULL;
    if (!st || !cb)
        return ML_EINVAL;
    if (s_prepare_rd(st,
                     "SELECT " S_CASE_COLS " FROM cases WHERE (?1 = 0 OR kind = ?1)"
                     " AND (?2 < 0 OR state = ?2)"
                     " AND (?3 = 0 OR (deadline_at > 0 AND deadline_at <= ?3))"
                     " ORDER BY updated_at DESC, case_id LIMIT ?4",
                     &s) != 0)
        return ML_ESTORE;
    sqlite3_bind_int(s, 1, kind);
    sqlite3_bind_int(s, 2, state);
    sqlite3_bind_int64(s, 3, overdue_at);
    sqlite3_bind_int(s, 4, limit > 0 ? limit : -1);
    s_case_walk_t w = {cb, arg};
    return s_read_all(st, s, "listing cases", s_case_row, &w);
}

typedef struct {
    ml_store_event_cb cb;
    void *arg;
    const ml_store_t *st;
    const char *case_id;
} s_event_walk_t;

static void s_event_row(sqlite3_stmt *s, void *arg)
{
    s_event_walk_t *w = arg;
    ml_store_event_t e = {
        .at = sqlite3_column_int64(s, 0),
        .node = (const char *)sqlite3_column_text(s, 1),
        .event = (const char *)sqlite3_column_text(s, 2),
        .from_state = (const char *)sqlite3_column_text(s, 3),
        .to_state = (const char *)sqlite3_column_text(s, 4),
        .message_id = (const char *)sqlite3_column_text(s, 5),
        .kind = (const char *)sqlite3_column_text(s, 6),
    };
    uint8_t *plain = NULL;
    const void *d = sqlite3_column_blob(s, 7);
    size_t n = (size_t)sqlite3_column_bytes(s, 7);
    if (ml_is_sealed(d, n)) {
        size_t plen = 0;
        uint8_t *out = NULL;
        if (w->st->keys && ml_open(w->st->keys, d, n, (const uint8_t *)w->case_id,
                                   strlen(w->case_id), &out, &plen) == 0) {
            plain = malloc(plen + 1);
            if (plain) {
                memcpy(plain, out, plen);
                plain[plen] = '\0';
            }
            free(out);
        }
        e.detail = plain ? (const char *)plain : "(sealed under a key this broker does not have)";
    } else {
        e.detail = (const char *)sqlite3_column_text(s, 7);
    }
    w->cb(w->arg, &e);
    free(plain);
}

int ml_store_case_events(ml_store_t *st, const char *case_id, ml_store_event_cb cb, void *arg)
{
    sqlite3_stmt *s = NULL;
    if (!st || !case_id || !cb)
        return ML_EINVAL;
    if (s_prepare_rd(st,
                     "SELECT at, node, event, from_state, to_state, message_id, kind, detail"
                     " FROM case_events WHERE case_id = ?1 ORDER BY version, n",
                     &s) != 0)
        return ML_ESTORE;
    sqlite3_bind_text(s, 1, case_id, -1, SQLITE_STATIC);
    s_event_walk_t w = {cb, arg, st, case_id};
    return s_read_all(st, s, "reading a timeline", s_event_row, &w);
}

int ml_store_lookup(ml_store_t *st, const char *id, int64_t *seq, int *state)
{
    if (!st || !id)
        return ML_EINVAL;
    sqlite3_stmt *s = st->rd_lookup;
    sqlite3_bind_text(s, 1, id, -1, SQLITE_STATIC);
    int src = sqlite3_step(s), rc = 0;
    if (src == SQLITE_ROW) {
        if (seq)
            *seq = sqlite3_column_int64(s, 0);
        if (state)
            *state = sqlite3_column_int(s, 1);
    } else if (src == SQLITE_DONE) {
        rc = ML_ENOTFOUND;
    } else {
        ml_log(ML_LOG_ERROR, S_COMPONENT, "%s: looking up message %s: %s", st->path, id,
               sqlite3_errmsg(st->rd));
        rc = ML_ESTORE;
    }
    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    return rc;
}

#define S_DEAD_COLS                                                                                \
    "m.seq, m.id, m.case_id, sn.name, rn.name, m.kind, m.priority, m.accepted_at, m.dead_at,"      \
    " m.attempts, m.size, m.dead_reason, m.deadline FROM msgs m"                                   \
    " LEFT JOIN names sn ON sn.id = m.sender LEFT JOIN names rn ON rn.id = m.recipient"

typedef struct {
    ml_store_dead_cb cb;
    void *arg;
    int n;
} s_dead_walk_t;

static void s_dead_row(sqlite3_stmt *s, void *arg)
{
    s_dead_walk_t *w = arg;
    ml_store_dead_t d = {
        .seq = sqlite3_column_int64(s, 0),
        .id = (const char *)sqlite3_column_text(s, 1),
        .case_id = (const char *)sqlite3_column_text(s, 2),
        .sender = (const char *)sqlite3_column_text(s, 3),
        .recipient = (const char *)sqlite3_column_text(s, 4),
        .kind = sqlite3_column_int(s, 5),
        .priority = sqlite3_column_int(s, 6),
        .accepted_at = sqlite3_column_int64(s, 7),
        .dead_at = sqlite3_column_int64(s, 8),
        .attempts = sqlite3_column_int(s, 9),
        .size = (size_t)sqlite3_column_int64(s, 10),
        .reason = (const char *)sqlite3_column_text(s, 11),
        .deadline = sqlite3_column_int64(s, 12),
    };
    w->n++;
    w->cb(w->arg, &d);
}

int ml_store_dead_list(ml_store_t *st, int limit, ml_store_dead_cb cb, void *arg)
{
    sqlite3_stmt *s = NULL;
    if (!st || !cb)
        return ML_EINVAL;
    if (s_prepare_rd(st,
                     "SELECT " S_DEAD_COLS " WHERE m.state = 2"
                     " ORDER BY m.dead_at DESC, m.seq DESC LIMIT ?1",
                     &s) != 0)
        return ML_ESTORE;
    sqlite3_bind_int(s, 1, limit > 0 ? limit : -1);
    s_dead_walk_t w = {cb, arg, 0};
    return s_read_all(st, s, "listing dead letters", s_dead_row, &w);
}

int ml_store_dead_get(ml_store_t *st, const char *id, ml_store_dead_cb cb, void *arg)
{
    sqlite3_stmt *s = NULL;
    if (!st || !id || !cb)
        return ML_EINVAL;
    if (s_prepare_rd(st, "SELECT " S_DEAD_COLS " WHERE m.state = 2 AND m.id = ?1", &s) != 0)
        return ML_ESTORE;
    sqlite3_bind_text(s, 1, id, -1, SQLITE_STATIC);
    s_dead_walk_t w = {cb, arg, 0};
    int rc = s_read_all(st, s, "reading a dead letter", s_dead_row, &w);
    return rc == 0 && w.n == 0 ? ML_ENOTFOUND : rc;
}

int ml_store_dead_count(ml_store_t *st, int64_t *n)
{
    if (!st || !n)
        return ML_EINVAL;
    int src = s_query_int(st->rd, "SELECT count(*) FROM msgs WHERE state = 2", n);
    if (src != SQLITE_OK) {
        ml_log(ML_LOG_ERROR, S_COMPONENT, "%s: counting dead letters: %s", st->path,
               sqlite3_errmsg(st->rd));
        return ML_ESTORE;
    }
    return 0;
}

/* Reads "count, oldest" from a query returning them as one row. */
static int s_count_oldest(ml_store_t *st, const char *sql, int bind, uint64_t *n, int64_t *oldest)
{
    sqlite3_stmt *s = NULL;
    if (s_prepare_rd(st, sql, &s) != 0)
        return ML_ESTORE;
    if (bind >= 0)
        sqlite3_bind_int(s, 1, bind);
    int src = sqlite3_step(s), rc = 0;
    if (src == SQLITE_ROW) {
        *n = (uint64_t)sqlite3_column_int64(s, 0);
        *oldest = sqlite3_column_int64(s, 1);
    } else {
        ml_log(ML_LOG_ERROR, S_COMPONENT, "%s: counting rows: %s", st->path,
               sqlite3_errmsg(st->rd));
        rc = ML_ESTORE;
    }
    sqlite3_finalize(s);
    return rc;
}

static uint64_t s_file_size(const char *path, const char *suffix)
{
    char p[4096];
    struct stat sb;
    snprintf(p, sizeof p, "%s%s", path, suffix);
    return stat(p, &sb) == 0 ? (uint64_t)sb.st_size : 0;
}

void ml_store_file_sizes(ml_store_t *st, uint64_t *db_bytes, uint64_t *wal_bytes)
{
    *db_bytes =
        st ? s_file_size(st->path, "") + __atomic_load_n(&st->seg_bytes, __ATOMIC_RELAXED) : 0;
    *wal_bytes = st ? s_file_size(st->path, "-wal") : 0;
}

int ml_store_info(ml_store_t *st, ml_store_info_t *out)
{
    if (!st || !out)
        return ML_EINVAL;
    memset(out, 0, sizeof *out);
    out->file_bytes = s_file_size(st->path, "");
    out->wal_bytes = s_file_size(st->path, "-wal");
    out->seg_bytes = __atomic_load_n(&st->seg_bytes, __ATOMIC_RELAXED);
    int64_t v = 0;
    if (s_query_int(st->rd, "PRAGMA page_size", &v) != SQLITE_OK)
        goto fail;
    out->page_size = (uint64_t)v;
    if (s_query_int(st->rd, "PRAGMA page_count", &v) != SQLITE_OK)
        goto fail;
    out->page_count = (uint64_t)v;
    if (s_query_int(st->rd, "PRAGMA freelist_count", &v) != SQLITE_OK)
        goto fail;
    out->free_pages = (uint64_t)v;
    if (s_query_int(st->rd, "PRAGMA auto_vacuum", &v) != SQLITE_OK)
        goto fail;
    out->auto_vacuum = (int)v;
    /* Every count below reads one partial index or table once; the
     * messages ones the table of their state (see s_schema). */
    static const char *const by_state[3] = {
        "SELECT count(*), coalesce(min(m.accepted_at), 0) FROM pending p"
        " JOIN msgs m ON m.seq = p.seq",
        "SELECT count(*), coalesce(min(m.accepted_at), 0) FROM delivered d"
        " JOIN msgs m ON m.seq = d.seq WHERE m.state = 0",
        "SELECT count(*), coalesce(min(accepted_at), 0) FROM msgs WHERE state = 2",
    };
    for (int state = 0; state < 3; state++)
        if (s_count_oldest(st, by_state[state], -1, &out->msg_rows[state],
                           &out->msg_oldest[state]) != 0)
            return ML_ESTORE;
    if (s_count_oldest(st,
                       "SELECT (SELECT count(*) FROM bodies), coalesce((SELECT m.accepted_at"
                       " FROM bodies b JOIN msgs m ON m.seq = b.seq ORDER BY b.seq LIMIT 1),"
                       " 0)",
                       -1, &out->body_rows, &out->body_oldest) != 0 ||
        s_count_oldest(st,
                       "SELECT count(*), coalesce(min(opened_at), 0) FROM cases WHERE closed = 0",
                       -1, &out->open_cases, &out->open_oldest) != 0 ||
        s_count_oldest(st,
                       "SELECT count(*), coalesce(min(updated_at), 0) FROM cases WHERE closed = 1",
                       -1, &out->final_cases, &out->final_oldest) != 0 ||
        s_count_oldest(st, "SELECT count(*), coalesce(min(at), 0) FROM case_events", -1,
                       &out->event_rows, &out->event_oldest) != 0)
        return ML_ESTORE;
    uv_mutex_lock(&st->mu);
    out->last = st->last_prune;
    uv_mutex_unlock(&st->mu);
    return 0;
fail:
    ml_log(ML_LOG_ERROR, S_COMPONENT, "%s: reading its size: %s", st->path, sqlite3_errmsg(st->rd));
    return ML_ESTORE;
}

/* ---- offline access to one body ------------------------------------------ */

static int s_offline_open(const char *path, sqlite3 **db)
{
    if (sqlite3_open_v2(path, db, SQLITE_OPEN_READWRITE, NULL) != SQLITE_OK) {
        sqlite3_close(*db);
        *db = NULL;
        return ML_ESTORE;
    }
    sqlite3_busy_timeout(*db, S_BUSY_MS);
    return 0;
}

/* The segment, offset and length of id's body. */
static int s_offline_loc(sqlite3 *db, const char *id, int64_t *seq, int64_t *seg, int64_t *off,
                         int64_t *blen)
{
    sqlite3_stmt *q = NULL;
    int rc = ML_ESTORE;
    if (sqlite3_prepare_v2(db,
                           "SELECT seq, seg, off, blen FROM msgs WHERE id = ?1 AND seg IS NOT"
                           " NULL",
                           -1, &q, NULL) != SQLITE_OK)
        goto out;
    sqlite3_bind_text(q, 1, id, -1, SQLITE_STATIC);
    int src = sqlite3_step(q);
    if (src == SQLITE_ROW) {
        *seq = sqlite3_column_int64(q, 0);
        *seg = sqlite3_column_int64(q, 1);
        *off = sqlite3_column_int64(q, 2);
        *blen = sqlite3_column_int64(q, 3);
        rc = 0;
    } else if (src == SQLITE_DONE) {
        rc = ML_ENOTFOUND;
    }
out:
    sqlite3_finalize(q);
    return rc;
}

int ml_store_offline_body(const char *path, const char *id, uint8_t **body, size_t *len)
{
    uv_once(&s_crc_once, s_crc_init);
    sqlite3 *db = NULL;
    int64_t seq, seg, off, blen;
    int rc = s_offline_open(path, &db);
    if (rc == 0)
        rc = s_offline_loc(db, id, &seq, &seg, &off, &blen);
    sqlite3_close(db);
    if (rc != 0)
        return rc;
    char name[PATH_MAX];
    snprintf(name, sizeof name, "%s-seg/%08u.seg", path, (unsigned)seg);
    int fd = open(name, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return ML_ESTORE;
    uint8_t *buf = malloc((size_t)blen + 1);
    rc = buf && s_pread_all(fd, buf, (size_t)blen, (uint64_t)off + S_SEG_HDR) == 0 ? 0 : ML_ESTORE;
    close(fd);
    if (rc != 0) {
        free(buf);
        return rc;
    }
    *body = buf;
    *len = (size_t)blen;
    return 0;
}

int ml_store_offline_replace_body(const char *path, const char *id, const uint8_t *body, size_t len)
{
    uv_once(&s_crc_once, s_crc_init);
    sqlite3 *db = NULL;
    int64_t seq, seg, off, blen, newest = 0, end = 0;
    int rc = s_offline_open(path, &db);
    if (rc == 0)
        rc = s_offline_loc(db, id, &seq, &seg, &off, &blen);
    if (rc == 0 &&
        (s_query_int(db, "SELECT coalesce(max(seg), 0) FROM segments", &newest) != SQLITE_OK ||
         newest == 0))
        rc = ML_ESTORE;
    char sql[160];
    snprintf(sql, sizeof sql, "SELECT end_off FROM segments WHERE seg = %lld", (long long)newest);
    if (rc == 0 && s_query_int(db, sql, &end) != SQLITE_OK)
        rc = ML_ESTORE;
    char name[PATH_MAX];
    snprintf(name, sizeof name, "%s-seg/%08u.seg", path, (unsigned)newest);
    int fd = rc == 0 ? open(name, O_RDWR | O_CLOEXEC) : -1;
    uint8_t *rec = rc == 0 ? malloc(S_SEG_HDR + len + 1) : NULL;
    if (rc == 0 && (fd < 0 || !rec))
        rc = ML_ESTORE;
    if (rc == 0) {
        s_put_u32(rec, (uint32_t)len);
        s_put_u32(rec + 4, s_rec_crc(body, len));
        s_put_u64(rec + 8, (uint64_t)seq);
        memcpy(rec + S_SEG_HDR, body, len);
        if (s_pwrite_all(fd, rec, S_SEG_HDR + len, (uint64_t)end) != 0 || fdatasync(fd) != 0)
            rc = ML_ESTORE;
    }
    if (rc == 0) {
        char upd[400];
        snprintf(upd, sizeof upd,
                 "BEGIN; UPDATE msgs SET seg = %lld, off = %lld, blen = %zu WHERE seq = %lld;"
                 " UPDATE segments SET live = live - 1 WHERE seg = %lld;"
                 " UPDATE segments SET live = live + 1, end_off = %lld WHERE seg = %lld; COMMIT;",
                 (long long)newest, (long long)end, len, (long long)seq, (long long)seg,
                 (long long)(end + (int64_t)(S_SEG_HDR + len)), (long long)newest);
        if (sqlite3_exec(db, upd, NULL, NULL, NULL) != SQLITE_OK)
            rc = ML_ESTORE;
    }
    if (fd >= 0)
        close(fd);
    free(rec);
    sqlite3_close(db);
    return rc;
}
