/* fault-check: the end-of-soak judge. After a clean shutdown of every
 * daemon of a soak world it reads the real SQLite files (each agent's
 * agent.db, the broker's broker.db), the spool folders and the driver's
 * record of its cases, and checks what medlink promises:
 *
 *   - every message an agent recorded as Accepted is in broker.db, and every
 *     message in broker.db (agents' and the broker's own notices) reached its
 *     recipient: in the recipient agent's inbox table exactly once (imaging
 *     chunks, which agents keep as chunk records instead, marked delivered);
 *     none is dead, still queued, or delivered to another node;
 *   - per (sender, recipient, priority) the recipient's receive order (inbox
 *     rowid) is the sender's order (outbox seq; ordinary messages and
 *     imaging chunks are two send streams) and the broker's acceptance order;
 *   - no outbox row is still pending or was refused (imaging chunk rows the
 *     agent dropped because the reading centre already had the whole study
 *     are counted apart: moot_chunks);
 *   - every case replays: its case_events, from "opened", are each a legal
 *     step of its lifecycle (ml_case_check from broker/cases.c) from the
 *     state the previous one left, made by a party allowed to; the replay
 *     ends in the state the cases row holds; every stored clinical message
 *     that opens or moves a case has its event and every transition its
 *     stored message;
 *   - with --cases, every case the driver opened ended in the state its plan
 *     leads to;
 *   - every study a clinic sent was published at the reading centre with
 *     the SHA-256 digests the clinic computed.
 *
 *   fault-check --world DIR --broker-id ID --nodes ID,ID,... [--cases FILE]
 *               [--broker-db FILE] [--exclude ID,ID,...] [--quiet]
 *
 * --exclude names nodes whose traffic is not judged (the soak's hostile
 * clinic and the hospital it floods): every message they sent or were sent,
 * and every case they opened or were the target of, is left out of every
 * check and counted as "excluded".
 *
 * Prints "check messages N lost L duplicated D ..." and up to 20 lines per
 * kind of failure; exits 1 when any invariant fails, 2 on usage or I/O
 * errors. */
#include <dirent.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>
#include <sqlite3.h>

#include "cases.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_imaging.h"

#define S_PATH 1024
#define S_MAX_NODES 32
#define S_SHOW 20
#define K_(x) MEDLINK__V1__KIND__KIND_##x

/* ---- a string -> index map ---------------------------------------------- */

typedef struct {
    char **keys;
    long *vals;
    size_t cap, n;
} s_map_t;

static uint64_t s_hash(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

static long *s_map_get(const s_map_t *m, const char *key)
{
    if (!m->cap || !key)
        return NULL;
    for (size_t i = s_hash(key) & (m->cap - 1);; i = (i + 1) & (m->cap - 1)) {
        if (!m->keys[i])
            return NULL;
        if (strcmp(m->keys[i], key) == 0)
            return &m->vals[i];
    }
}

static void s_map_put(s_map_t *m, const char *key, long val)
{
    long *v = s_map_get(m, key);
    if (v) {
        *v = val;
        return;
    }
    if ((m->n + 1) * 2 > m->cap) {
        s_map_t n = {calloc(m->cap ? m->cap * 2 : 1024, sizeof(char *)),
                     calloc(m->cap ? m->cap * 2 : 1024, sizeof(long)), m->cap ? m->cap * 2 : 1024,
                     0};
        if (!n.keys || !n.vals) {
            fprintf(stderr, "fault-check: out of memory\n");
            exit(2);
        }
        for (size_t i = 0; i < m->cap; i++) {
            if (m->keys[i]) {
                s_map_put(&n, m->keys[i], m->vals[i]);
                free(m->keys[i]);
            }
        }
        free(m->keys);
        free(m->vals);
        *m = n;
    }
    size_t i = s_hash(key) & (m->cap - 1);
    while (m->keys[i])
        i = (i + 1) & (m->cap - 1);
    m->keys[i] = strdup(key);
    m->vals[i] = val;
    m->n++;
}

/* ---- what was read ------------------------------------------------------ */

typedef struct {
    char *id, *sender, *recipient, *case_id;
    long long seq;
    int priority, kind, state;
    int node_recipient; /* index in nodes, -1 when not a checked node */
    long long out_seq;  /* the sender's outbox seq, 0 if not from an agent */
    int chunk_stream;   /* sent from the agent's chunk stream */
    long long rx_rowid; /* rowid in the recipient's inbox, 0 if absent */
    int has_event;      /* a case event names it as its message */
} s_msg_t;

typedef struct {
    char id[128];
    sqlite3 *db;
    s_map_t inbox; /* id -> rowid */
} s_node_t;

static struct {
    char world[S_PATH];
    char broker_db[S_PATH + 64];
    const char *broker_id;
    s_node_t nodes[S_MAX_NODES];
    int n_nodes;
    s_msg_t *msgs;
    long n_msgs;
    s_map_t by_id; /* message id -> index in msgs */
    int quiet;
    char *exclude[S_MAX_NODES];
    int n_exclude;

    long excluded, excluded_cases;
    long messages, from_agents, notices, chunks;
    long lost, duplicated, order, order_broker, unsettled, rejected, dead, undelivered, unmarked;
    long phantom;
    long cases, bad_cases, stuck, expected_cases, studies, studies_bad, dup_chunks, moot_chunks;
    long events, transitions;
} G;

/* Counts one failure of a kind and shows the first S_SHOW of each. */
static void s_fail(long *counter, const char *what, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void s_fail(long *counter, const char *what, const char *fmt, ...)
{
    (*counter)++;
    if (*counter > S_SHOW || G.quiet)
        return;
    va_list ap;
    va_start(ap, fmt);
    printf("  %s: ", what);
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
}

static void s_die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "fault-check: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static char *s_col(sqlite3_stmt *st, int i)
{
    const unsigned char *t = sqlite3_column_text(st, i);
    return strdup(t ? (const char *)t : "");
}

static sqlite3 *s_open(const char *path)
{
    sqlite3 *db = NULL;
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK)
        s_die("cannot open %s: %s", path, db ? sqlite3_errmsg(db) : "?");
    sqlite3_busy_timeout(db, 5000);
    return db;
}

static sqlite3_stmt *s_prepare(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) != SQLITE_OK)
        s_die("%s: %s", sql, sqlite3_errmsg(db));
    return st;
}

static int s_node_index(const char *id)
{
    for (int i = 0; i < G.n_nodes; i++)
        if (strcmp(G.nodes[i].id, id) == 0)
            return i;
    return -1;
}

static int s_excluded(const char *id)
{
    for (int i = 0; i < G.n_exclude; i++)
        if (strcmp(G.exclude[i], id) == 0)
            return 1;
    return 0;
}

/* ---- loading ------------------------------------------------------------ */

static void s_load_broker(sqlite3 *db)
{
    sqlite3_stmt *st = s_prepare(db, "SELECT count(*) FROM messages");
    long n = sqlite3_step(st) == SQLITE_ROW ? (long)sqlite3_column_int64(st, 0) : 0;
    sqlite3_finalize(st);
    G.msgs = calloc((size_t)n + 1, sizeof *G.msgs);
    st = s_prepare(db, "SELECT seq, id, sender, recipient, priority, kind, state, case_id, "
                       "coalesce((SELECT opener || ' ' || coalesce(target, '') FROM cases c "
                       "WHERE c.case_id = messages.case_id), '') "
                       "FROM messages ORDER BY seq");
    while (sqlite3_step(st) == SQLITE_ROW && G.n_msgs < n) {
        const char *snd = (const char *)sqlite3_column_text(st, 2);
        const char *rcp = (const char *)sqlite3_column_text(st, 3);
        const char *parties = (const char *)sqlite3_column_text(st, 8);
        if (G.n_exclude && (s_excluded(snd ? snd : "") || s_excluded(rcp ? rcp : ""))) {
            G.excluded++;
            continue;
        }
        if (G.n_exclude && parties && *parties) {
            char a[256] = "", b[256] = "";
            sscanf(parties, "%255s %255s", a, b);
            if (s_excluded(a) || s_excluded(b)) {
                G.excluded++;
                continue;
            }
        }
        s_msg_t *m = &G.msgs[G.n_msgs];
        m->seq = sqlite3_column_int64(st, 0);
        m->id = s_col(st, 1);
        m->sender = s_col(st, 2);
        m->recipient = s_col(st, 3);
        m->priority = sqlite3_column_int(st, 4);
        m->kind = sqlite3_column_int(st, 5);
        m->state = sqlite3_column_int(st, 6);
        m->case_id = s_col(st, 7);
        m->node_recipient = s_node_index(m->recipient);
        s_map_put(&G.by_id, m->id, G.n_msgs);
        G.n_msgs++;
    }
    sqlite3_finalize(st);
}

/* Reads one agent's inbox (id -> rowid, the receive order) and checks
 * that every row the hospital system is meant to read is in its spool
 * folder as inbox/<id>.json (the soak's systems never delete them). */
static void s_load_inbox(s_node_t *nd)
{
    sqlite3_stmt *st =
        s_prepare(nd->db, "SELECT rowid, id, kind, spooled FROM inbox ORDER BY rowid");
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char *id = (const char *)sqlite3_column_text(st, 1);
        int kind = sqlite3_column_int(st, 2);
        if (s_map_get(&nd->inbox, id))
            s_fail(&G.duplicated, "duplicated", "%s twice in the inbox of %s", id, nd->id);
        s_map_put(&nd->inbox, id, (long)sqlite3_column_int64(st, 0));
        if (kind == K_(IMAGING_RESEND) || kind == K_(IMAGING_CHUNK))
            continue; /* stored, never written to inbox/ */
        char path[S_PATH * 2];
        snprintf(path, sizeof path, "%s/spool/%s/inbox/%s.json", G.world, nd->id, id);
        if (access(path, F_OK) != 0)
            s_fail(&G.lost, "lost", "%s is in the inbox table of %s but not in its inbox/ folder%s",
                   id, nd->id, sqlite3_column_int(st, 3) ? "" : " (never spooled)");
    }
    sqlite3_finalize(st);
}

/* Walks one agent's outbox: every row settled, every Accepted one in
 * broker.db as sent by this node. */
static void s_walk_outbox(int ni)
{
    s_node_t *nd = &G.nodes[ni];
    sqlite3_stmt *st =
        s_prepare(nd->db, "SELECT seq, id, state, coalesce(reason, ''), coalesce(blob_path, ''), "
                          "coalesce(file_name, '') FROM outbox ORDER BY seq");
    while (sqlite3_step(st) == SQLITE_ROW) {
        long long seq = sqlite3_column_int64(st, 0);
        const char *id = (const char *)sqlite3_column_text(st, 1);
        int state = sqlite3_column_int(st, 2);
        const char *reason = (const char *)sqlite3_column_text(st, 3);
        int chunk = *(const char *)sqlite3_column_text(st, 4) != '\0';
        const char *file = (const char *)sqlite3_column_text(st, 5);
        if (state == 0) {
            s_fail(&G.unsettled, "unsettled", "%s outbox row %lld (%s%s) still pending", nd->id,
                   seq, id, chunk ? ", chunk" : "");
            continue;
        }
        if (state == 2 && chunk && strncmp(reason, "not sent:", 9) == 0) {
            /* The agent dropped a chunk row because the case was over (the
             * reading centre had the whole study): the study check covers
             * its data. It may have been in flight and stored all the same. */
            G.moot_chunks++;
            continue;
        }
        if (state == 2) {
            s_fail(&G.rejected, "rejected", "%s refused %s %s%s: %s", nd->id, chunk ? "chunk" : "",
                   id, *file ? file : "", reason);
            continue;
        }
        G.from_agents++;
        long *mi = s_map_get(&G.by_id, id);
        if (!mi) {
            s_fail(&G.lost, "lost", "%s has %s Accepted, broker.db does not have it", nd->id, id);
            continue;
        }
        s_msg_t *m = &G.msgs[*mi];
        if (strcmp(m->sender, nd->id) != 0)
            s_fail(&G.phantom, "phantom", "%s sent %s but broker.db says it came from %s", nd->id,
                   id, m->sender);
        m->out_seq = seq;
        m->chunk_stream = chunk;
    }
    sqlite3_finalize(st);
}

/* ---- deliveries and order ----------------------------------------------- */

static void s_check_deliveries(void)
{
    for (long i = 0; i < G.n_msgs; i++) {
        s_msg_t *m = &G.msgs[i];
        G.messages++;
        int from_broker = strcmp(m->sender, G.broker_id) == 0;
        G.notices += from_broker;
        if (m->state == 2) {
            s_fail(&G.dead, "dead", "%s (%s %s -> %s) is a dead letter", m->id,
                   ml_kind_name(m->kind), m->sender, m->recipient);
            continue;
        }
        if (m->node_recipient < 0) {
            s_fail(&G.undelivered, "undelivered", "%s to %s: not a node this check reads", m->id,
                   m->recipient);
            continue;
        }
        /* Nobody else may have it. */
        for (int n = 0; n < G.n_nodes; n++)
            if (n != m->node_recipient && s_map_get(&G.nodes[n].inbox, m->id))
                s_fail(&G.duplicated, "misdelivered", "%s for %s is in the inbox of %s", m->id,
                       m->recipient, G.nodes[n].id);
        if (m->kind == K_(IMAGING_CHUNK)) {
            G.chunks++;
            if (m->state == 1)
                continue;
            /* Agents keep chunk records, not inbox rows: a chunk of a study
             * the reading centre published verified has arrived. */
            char path[S_PATH * 2];
            snprintf(path, sizeof path, "%s/spool/%s/inbox/study-%s/manifest.json", G.world,
                     m->recipient, m->case_id);
            if (access(path, F_OK) == 0)
                s_fail(&G.unmarked, "unmarked",
                       "chunk %s of a study %s published is still queued in broker.db", m->id,
                       m->recipient);
            else
                s_fail(&G.undelivered, "undelivered",
                       "chunk %s to %s still queued in broker.db, its study not published", m->id,
                       m->recipient);
            continue;
        }
        long *row = s_map_get(&G.nodes[m->node_recipient].inbox, m->id);
        if (!row && m->state == 0) {
            s_fail(&G.undelivered, "undelivered", "%s (%s %s -> %s) still queued in broker.db",
                   m->id, ml_kind_name(m->kind), m->sender, m->recipient);
            continue;
        }
        if (!row) {
            s_fail(&G.lost, "lost", "%s (%s %s -> %s) marked delivered, not in the inbox of %s",
                   m->id, ml_kind_name(m->kind), m->sender, m->recipient, m->recipient);
            continue;
        }
        m->rx_rowid = *row;
        if (m->state != 1)
            /* In the inbox, yet broker.db says queued: its delivered mark was
             * lost, so a restart delivers it again (the agent drops the
             * duplicate). Not a loss; after a clean drain, a fault. */
            s_fail(&G.unmarked, "unmarked", "%s is in the inbox of %s but queued in broker.db",
                   m->id, m->recipient);
    }
    /* Every inbox row is a stored message for that node. */
    for (int n = 0; n < G.n_nodes; n++) {
        s_map_t *in = &G.nodes[n].inbox;
        for (size_t k = 0; k < in->cap; k++) {
            if (!in->keys[k])
                continue;
            long *mi = s_map_get(&G.by_id, in->keys[k]);
            if (!mi)
                s_fail(&G.phantom, "phantom", "%s in the inbox of %s is not in broker.db",
                       in->keys[k], G.nodes[n].id);
            else if (G.msgs[*mi].node_recipient != n)
                s_fail(&G.phantom, "phantom", "%s in the inbox of %s was for %s", in->keys[k],
                       G.nodes[n].id, G.msgs[*mi].recipient);
        }
    }
}

static int s_cmp_out(const void *a, const void *b)
{
    const s_msg_t *x = *(s_msg_t *const *)a, *y = *(s_msg_t *const *)b;
    long long kx = x->out_seq ? x->out_seq : x->seq, ky = y->out_seq ? y->out_seq : y->seq;
    return kx < ky ? -1 : kx > ky;
}

static int s_cmp_broker(const void *a, const void *b)
{
    const s_msg_t *x = *(s_msg_t *const *)a, *y = *(s_msg_t *const *)b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

static int s_cmp_key(const void *a, const void *b)
{
    const s_msg_t *x = *(s_msg_t *const *)a, *y = *(s_msg_t *const *)b;
    int c = strcmp(x->sender, y->sender);
    if (!c)
        c = strcmp(x->recipient, y->recipient);
    if (!c)
        c = x->priority - y->priority;
    return c;
}

/* Counts messages of one (sender, recipient, priority) group that the
 * recipient took before one that came earlier in the given order. */
static long s_inversions(s_msg_t **v, size_t n, const char *what)
{
    long bad = 0;
    long long max = 0;
    const s_msg_t *at_max = NULL;
    for (size_t i = 0; i < n; i++) {
        if (v[i]->rx_rowid < max) {
            bad++;
            if (!G.quiet && bad <= 5)
                printf("  %s: %s -> %s prio %d: %s (%s) received before %s (%s) though sent "
                       "after it\n",
                       what, v[i]->sender, v[i]->recipient, v[i]->priority, at_max->id,
                       ml_kind_name(at_max->kind), v[i]->id, ml_kind_name(v[i]->kind));
        } else {
            max = v[i]->rx_rowid;
            at_max = v[i];
        }
    }
    return bad;
}

static void s_check_order(void)
{
    s_msg_t **v = calloc((size_t)G.n_msgs + 1, sizeof *v);
    size_t n = 0;
    for (long i = 0; i < G.n_msgs; i++)
        if (G.msgs[i].rx_rowid > 0 && !G.msgs[i].chunk_stream)
            v[n++] = &G.msgs[i];
    qsort(v, n, sizeof *v, s_cmp_key);
    for (size_t i = 0; i < n;) {
        size_t j = i;
        while (j < n && s_cmp_key(&v[i], &v[j]) == 0)
            j++;
        qsort(v + i, j - i, sizeof *v, s_cmp_out);
        G.order += s_inversions(v + i, j - i, "order");
        qsort(v + i, j - i, sizeof *v, s_cmp_broker);
        G.order_broker += s_inversions(v + i, j - i, "order_broker");
        i = j;
    }
    free(v);
}

/* ---- cases -------------------------------------------------------------- */

typedef struct {
    char *case_id;
    int kind, state;
    char *opener, *target;
} s_case_t;

static int s_parse_state(int kind, const char *name, int *state)
{
    return name && *name && ml_case_state_parse(kind, name, state) == 0 ? 0 : -1;
}

/* Replays the events of one case (rows of ev from its first). Returns 0
 * when every step was legal and the replay ends in the stored state. */
static void s_replay(const s_case_t *c, sqlite3_stmt *ev)
{
    int cur = -1, n = 0;
    char why[512];
    int ok = 1;
    while (ok && sqlite3_step(ev) == SQLITE_ROW) {
        const char *node = (const char *)sqlite3_column_text(ev, 0);
        const char *event = (const char *)sqlite3_column_text(ev, 1);
        const char *from_s = (const char *)sqlite3_column_text(ev, 2);
        const char *to_s = (const char *)sqlite3_column_text(ev, 3);
        const char *mid = (const char *)sqlite3_column_text(ev, 4);
        node = node ? node : "";
        event = event ? event : "";
        G.events++;
        int from = -1, to = -1;
        if (n++ == 0) {
            if (strcmp(event, "opened") != 0 || s_parse_state(c->kind, to_s, &to) < 0 ||
                to != ml_case_initial_state(c->kind)) {
                s_fail(&G.bad_cases, "bad case", "%s: first event is %s -> %s, not its opening",
                       c->case_id, event, to_s ? to_s : "");
                ok = 0;
                break;
            }
            cur = to;
            if (!mid || !s_map_get(&G.by_id, mid))
                s_fail(&G.bad_cases, "bad case", "%s: opened by %s, which broker.db does not hold",
                       c->case_id, mid ? mid : "(none)");
            else
                G.msgs[*s_map_get(&G.by_id, mid)].has_event = 1;
            continue;
        }
        if (s_parse_state(c->kind, from_s, &from) < 0 || s_parse_state(c->kind, to_s, &to) < 0) {
            s_fail(&G.bad_cases, "bad case", "%s: event %s names states %s -> %s of no %s case",
                   c->case_id, event, from_s ? from_s : "", to_s ? to_s : "",
                   ml_case_kind_name(c->kind));
            ok = 0;
            break;
        }
        if (from != cur) {
            s_fail(&G.bad_cases, "bad case", "%s: event %s by %s starts from %s, the case was %s",
                   c->case_id, event, node, from_s, ml_case_state_name(c->kind, cur));
            ok = 0;
            break;
        }
        if (strcmp(event, to_s) == 0) {
            /* A transition: legal for the party that made it. The broker's
             * own steps (DELIVERED, ASSIGNED, RE_REFERRED) are recorded under
             * the node whose message caused them, hence the BROKER party as
             * the alternative. */
            G.transitions++;
            int party = strcmp(node, G.broker_id) == 0 ? ML_PARTY_BROKER
                        : strcmp(node, c->opener) == 0 ? ML_PARTY_REFERRER
                                                       : ML_PARTY_TARGET;
            long *mi = mid && *mid ? s_map_get(&G.by_id, mid) : NULL;
            if (ml_case_check(c->kind, from, to, party, why, sizeof why) != 0 &&
                ml_case_check(c->kind, from, to, ML_PARTY_BROKER, NULL, 0) != 0) {
                s_fail(&G.bad_cases, "bad case", "%s: %s -> %s by %s is not a legal step: %s",
                       c->case_id, from_s, to_s, node, why);
                if (mi)
                    G.msgs[*mi].has_event = 1;
                ok = 0;
                break;
            }
            if (!mi)
                s_fail(&G.bad_cases, "bad case", "%s: %s -> %s names message %s, not in broker.db",
                       c->case_id, from_s, to_s, mid ? mid : "(none)");
            else
                G.msgs[*mi].has_event = 1;
            cur = to;
        } else if (to != from) {
            s_fail(&G.bad_cases, "bad case", "%s: event %s moved the case %s -> %s", c->case_id,
                   event, from_s, to_s);
            ok = 0;
        }
    }
    /* After a bad step the rest of the timeline is not replayed; its
     * messages still have their events. */
    while (!ok && sqlite3_step(ev) == SQLITE_ROW) {
        const char *event = (const char *)sqlite3_column_text(ev, 1);
        const char *to_s = (const char *)sqlite3_column_text(ev, 3);
        const char *mid = (const char *)sqlite3_column_text(ev, 4);
        long *mi = mid && *mid ? s_map_get(&G.by_id, mid) : NULL;
        if (mi && event && to_s && strcmp(event, to_s) == 0)
            G.msgs[*mi].has_event = 1;
    }
    if (ok && n == 0)
        s_fail(&G.bad_cases, "bad case", "%s has no timeline", c->case_id);
    else if (ok && cur != c->state)
        s_fail(&G.bad_cases, "bad case", "%s: the timeline ends in %s, the case row says %s",
               c->case_id, ml_case_state_name(c->kind, cur), ml_case_state_name(c->kind, c->state));
}

static s_case_t *s_cases;
static long s_n_cases;
static s_map_t s_case_map;

static void s_check_cases(sqlite3 *db)
{
    sqlite3_stmt *st = s_prepare(db, "SELECT count(*) FROM cases");
    long n = sqlite3_step(st) == SQLITE_ROW ? (long)sqlite3_column_int64(st, 0) : 0;
    sqlite3_finalize(st);
    s_cases = calloc((size_t)n + 1, sizeof *s_cases);
    st = s_prepare(db, "SELECT case_id, kind, state, coalesce(opener, ''), coalesce(target, ''),"
                       " coalesce(dup_chunks, 0) FROM cases");
    while (sqlite3_step(st) == SQLITE_ROW && s_n_cases < n) {
        if (G.n_exclude) {
            const char *o = (const char *)sqlite3_column_text(st, 3);
            const char *t = (const char *)sqlite3_column_text(st, 4);
            if (s_excluded(o ? o : "") || s_excluded(t ? t : "")) {
                G.excluded_cases++;
                continue;
            }
        }
        s_case_t *c = &s_cases[s_n_cases];
        c->case_id = s_col(st, 0);
        c->kind = sqlite3_column_int(st, 1);
        c->state = sqlite3_column_int(st, 2);
        c->opener = s_col(st, 3);
        c->target = s_col(st, 4);
        G.dup_chunks += sqlite3_column_int64(st, 5);
        s_map_put(&s_case_map, c->case_id, s_n_cases);
        s_n_cases++;
    }
    sqlite3_finalize(st);
    /* Schema 1 numbered events with seq; schema 2 keys them (case, version,
     * n): the order of the timeline either way. */
    st = s_prepare(db, "SELECT count(*) FROM pragma_table_info('case_events') "
                       "WHERE name = 'version'");
    int keyed = sqlite3_step(st) == SQLITE_ROW && sqlite3_column_int(st, 0) > 0;
    sqlite3_finalize(st);
    sqlite3_stmt *ev = s_prepare(db, keyed ? "SELECT node, event, from_state, to_state, message_id "
                                             "FROM case_events WHERE case_id = ?1 "
                                             "ORDER BY version, n"
                                           : "SELECT node, event, from_state, to_state, message_id "
                                             "FROM case_events WHERE case_id = ?1 ORDER BY seq");
    for (long i = 0; i < s_n_cases; i++) {
        G.cases++;
        if (ml_case_rank(s_cases[i].kind, s_cases[i].state) == 0) {
            s_fail(&G.bad_cases, "bad case", "%s (%s) is in state %d, not a state of its kind",
                   s_cases[i].case_id, ml_case_kind_name(s_cases[i].kind), s_cases[i].state);
            continue;
        }
        sqlite3_bind_text(ev, 1, s_cases[i].case_id, -1, SQLITE_STATIC);
        s_replay(&s_cases[i], ev);
        sqlite3_reset(ev);
    }
    sqlite3_finalize(ev);
    /* The other direction: a message that opens or moves a case was stored
     * with its case change. */
    for (long i = 0; i < G.n_msgs; i++) {
        s_msg_t *m = &G.msgs[i];
        int k = m->kind;
        int moves = k == K_(REFERRAL) || k == K_(IMAGING_CONSULT) || k == K_(DOWN_TRANSFER) ||
                    k == K_(REFERRAL_UPDATE) || k == K_(IMAGING_UPDATE) ||
                    k == K_(IMAGING_REPORT) || k == K_(DOWN_TRANSFER_UPDATE);
        /* The broker's notices, and a referral it forwards after a
         * redirect, tell about a change rather than make one. */
        if (!moves || strcmp(m->sender, G.broker_id) == 0 || m->has_event)
            continue;
        s_fail(&G.bad_cases, "bad case", "%s (%s from %s, case %s) has no event in its case", m->id,
               ml_kind_name(k), m->sender, m->case_id);
    }
}

/* The driver's cases: each in the state its plan ends in. */
static void s_check_expected(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        s_die("cannot read %s", path);
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        char token[32], kind[8], plan[8], case_id[128], want[64];
        int done = 0;
        if (sscanf(line, "%31s %7s %7s %127s %63s %d", token, kind, plan, case_id, want, &done) !=
            6)
            continue;
        G.expected_cases++;
        char *last = strrchr(line, '\t');
        if (last)
            last[strcspn(last, "\n")] = '\0';
        long *ci = s_map_get(&s_case_map, case_id);
        if (!ci) {
            s_fail(&G.stuck, "stuck", "driver case %s (%s%s) never reached the other side (%s)",
                   token, kind, plan, last ? last + 1 : "");
            continue;
        }
        const s_case_t *c = &s_cases[*ci];
        const char *got = ml_case_state_name(c->kind, c->state);
        if (strcmp(got, want) != 0 || !done)
            s_fail(&G.stuck, "stuck", "driver case %s (%s%s) %s is %s, its plan ends in %s%s (%s)",
                   token, kind, plan, case_id, got, want, done ? "" : ", the driver saw no end",
                   last ? last + 1 : "");
    }
    fclose(f);
}

/* ---- studies ------------------------------------------------------------ */

static void s_check_study(const char *clinic, const char *sent_json)
{
    json_error_t jerr;
    json_t *j = json_load_file(sent_json, 0, &jerr);
    json_t *ic = j ? json_object_get(j, "imagingConsult") : NULL;
    if (!ic) {
        json_decref(j);
        return;
    }
    G.studies++;
    const char *case_id = json_string_value(json_object_get(j, "caseId"));
    long *ci = s_map_get(&s_case_map, case_id);
    if (!ci) {
        s_fail(&G.studies_bad, "study", "%s: case %s unknown to the broker", sent_json,
               case_id ? case_id : "?");
        json_decref(j);
        return;
    }
    const char *target = s_cases[*ci].target;
    char dir[S_PATH * 2], path[S_PATH * 3];
    snprintf(dir, sizeof dir, "%s/spool/%s/inbox/study-%s", G.world, target, case_id);
    snprintf(path, sizeof path, "%s/manifest.json", dir);
    json_t *man = json_load_file(path, 0, &jerr);
    json_t *sent_objs = json_object_get(ic, "object");
    json_t *got_objs = man ? json_object_get(man, "objects") : NULL;
    if (!man || json_array_size(sent_objs) != json_array_size(got_objs) ||
        json_array_size(sent_objs) == 0) {
        s_fail(&G.studies_bad, "study", "case %s from %s: no complete study at %s", case_id, clinic,
               dir);
        json_decref(man);
        json_decref(j);
        return;
    }
    for (size_t i = 0; i < json_array_size(sent_objs); i++) {
        const char *want =
            json_string_value(json_object_get(json_array_get(sent_objs, i), "sha256"));
        json_t *o = json_array_get(got_objs, i);
        const char *fn = json_string_value(json_object_get(o, "fileName"));
        char got[ML_SHA256_HEX + 1] = "";
        uint64_t size = 0;
        snprintf(path, sizeof path, "%s/%s", dir, fn ? fn : "?");
        if (!want || !fn || ml_sha256_file(path, got, &size) != 0 || strcmp(want, got) != 0) {
            s_fail(&G.studies_bad, "study", "case %s: %s differs from what %s sent", case_id, path,
                   clinic);
            break;
        }
    }
    json_decref(man);
    json_decref(j);
}

static void s_check_studies(void)
{
    for (int n = 0; n < G.n_nodes; n++) {
        char dir[S_PATH * 2];
        snprintf(dir, sizeof dir, "%s/spool/%s/sent", G.world, G.nodes[n].id);
        DIR *d = opendir(dir);
        if (!d)
            continue;
        struct dirent *e;
        while ((e = readdir(d))) {
            size_t l = strlen(e->d_name);
            if (l < 6 || strcmp(e->d_name + l - 5, ".json") != 0 ||
                strncmp(e->d_name, "img-", 4) != 0)
                continue;
            char path[S_PATH * 3];
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            s_check_study(G.nodes[n].id, path);
        }
        closedir(d);
    }
}

/* ---- main --------------------------------------------------------------- */

int main(int argc, char **argv)
{
    const char *nodes = NULL, *cases = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--quiet")) {
            G.quiet = 1;
            continue;
        }
        if (!v)
            s_die("option %s needs a value", a);
        i++;
        if (!strcmp(a, "--world"))
            snprintf(G.world, sizeof G.world, "%s", v);
        else if (!strcmp(a, "--broker-id"))
            G.broker_id = v;
        else if (!strcmp(a, "--nodes"))
            nodes = v;
        else if (!strcmp(a, "--cases"))
            cases = v;
        else if (!strcmp(a, "--broker-db"))
            snprintf(G.broker_db, sizeof G.broker_db, "%s", v);
        else if (!strcmp(a, "--exclude")) {
            char *ex = strdup(v), *sv = NULL;
            for (char *t = strtok_r(ex, ",", &sv); t && G.n_exclude < S_MAX_NODES;
                 t = strtok_r(NULL, ",", &sv))
                G.exclude[G.n_exclude++] = strdup(t);
            free(ex);
        } else
            s_die("unknown option %s", a);
    }
    if (!G.world[0] || !G.broker_id || !nodes)
        s_die("usage: fault-check --world DIR --broker-id ID --nodes ID,ID,... [--cases FILE] "
              "[--broker-db FILE] [--exclude ID,...] [--quiet]");
    if (!G.broker_db[0])
        snprintf(G.broker_db, sizeof G.broker_db, "%s/data/broker/broker.db", G.world);
    char *copy = strdup(nodes), *save = NULL;
    for (char *t = strtok_r(copy, ",", &save); t && G.n_nodes < S_MAX_NODES;
         t = strtok_r(NULL, ",", &save)) {
        s_node_t *nd = &G.nodes[G.n_nodes++];
        snprintf(nd->id, sizeof nd->id, "%s", t);
        char path[S_PATH * 2];
        snprintf(path, sizeof path, "%s/data/%s/agent.db", G.world, t);
        nd->db = s_open(path);
    }
    free(copy);

    sqlite3 *bdb = s_open(G.broker_db);
    s_load_broker(bdb);
    for (int i = 0; i < G.n_nodes; i++)
        s_load_inbox(&G.nodes[i]);
    for (int i = 0; i < G.n_nodes; i++)
        s_walk_outbox(i);
    s_check_deliveries();
    s_check_order();
    s_check_cases(bdb);
    if (cases)
        s_check_expected(cases);
    s_check_studies();

    printf("check messages %ld from_agents %ld notices %ld chunks %ld lost %ld duplicated %ld "
           "order %ld order_broker %ld unsettled %ld rejected %ld dead %ld undelivered %ld "
           "unmarked %ld phantom %ld cases %ld events %ld transitions %ld bad_cases %ld "
           "expected_cases %ld "
           "stuck %ld studies %ld studies_bad %ld dup_chunks %ld moot_chunks %ld excluded %ld "
           "excluded_cases %ld\n",
           G.messages, G.from_agents, G.notices, G.chunks, G.lost, G.duplicated, G.order,
           G.order_broker, G.unsettled, G.rejected, G.dead, G.undelivered, G.unmarked, G.phantom,
           G.cases, G.events, G.transitions, G.bad_cases, G.expected_cases, G.stuck, G.studies,
           G.studies_bad, G.dup_chunks, G.moot_chunks, G.excluded, G.excluded_cases);
    long bad = G.lost + G.duplicated + G.order + G.order_broker + G.unsettled + G.rejected +
               G.dead + G.undelivered + G.unmarked + G.phantom + G.bad_cases + G.stuck +
               G.studies_bad;
    sqlite3_close(bdb);
    for (int i = 0; i < G.n_nodes; i++)
        sqlite3_close(G.nodes[i].db);
    for (int i = 0; i < G.n_exclude; i++)
        free(G.exclude[i]);
    return bad ? 1 : 0;
}
