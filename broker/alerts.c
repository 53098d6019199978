/* Ops alerts (see alerts.h). Each thing watched is an episode record:
 * inactive, or active since a moment, with the sentence that was sent.
 * A check turns what it sees into "should be active or not"; s_raise and
 * s_resolve are the only places that change an episode, send the
 * Escalation to the ops nodes and log, so that "once per episode" holds
 * by construction. The broker is read through query.h; the Escalations go
 * out through ops_cmd.h (ml_ops_escalate). */
#include "alerts.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "config.h"
#include "expiry.h"
#include "metrics.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ops_cmd.h"
#include "query.h"

#define S_CHECK_MS 1000
#define S_SLOW_MS 2000
#define S_DAY_MS (86400LL * 1000)
#define S_EXPIRY_MAX 16
/* A store that raised its alert ends the episode only once it is this many
 * percentage points under store_alert_percent: the WAL grows and is
 * checkpointed all day, and an alert that comes and goes with it would be
 * noise. */
#define S_STORE_HYSTERESIS 5

enum { S_NODE_OFFLINE = 0, S_EXPIRY, S_STORE_FULL, S_DLQ, S_KINDS };

static const char *const s_kind_name[S_KINDS] = {"node_offline", "expiry", "store_full", "dlq"};
static const int s_reason[S_KINDS] = {
    MEDLINK__V1__ESCALATION_REASON__ESCALATION_NODE_OFFLINE,
    MEDLINK__V1__ESCALATION_REASON__ESCALATION_EXPIRY,
    MEDLINK__V1__ESCALATION_REASON__ESCALATION_STORE_FULL,
    MEDLINK__V1__ESCALATION_REASON__ESCALATION_DLQ,
};

typedef struct {
    int active;
    int64_t since; /* Unix ms the episode began */
    char detail[1024];
} s_episode_t;

typedef struct {
    s_episode_t ep;
    char what[400]; /* the subject (ml_bk_expiry_t.what); "" = free slot */
    int past;       /* the "expired" notice was sent in this episode */
} s_expiry_t;

struct ml_bk_alerts {
    s_episode_t *nodes; /* indexed like the nodes (ml_query_node_t.index) */
    size_t n_nodes;
    s_expiry_t expiry[S_EXPIRY_MAX];
    s_episode_t store;
    s_episode_t dlq;
    int64_t dlq_seen;   /* dead letters at the last count (-1: none yet) */
    uint64_t dead_seen; /* dead letters made (dead_total) at the last count */
    int64_t store_max;  /* max_store_bytes the store was opened with */
    uint64_t raised[S_KINDS];
    int64_t checked_at; /* monotonic ms */
    int64_t slow_at;
};

int ml_bk_alerts_init(ml_broker_t *b)
{
    ml_bk_alerts_t *a = calloc(1, sizeof *a);
    if (!a)
        return ML_ENOMEM;
    a->dlq_seen = -1;
    a->checked_at = a->slow_at = INT64_MIN / 2;
    const ml_broker_config_t *cfg = ml_query_config(b);
    a->store_max = cfg->max_store_bytes;
    ml_query_set_alerts(b, a);
    return 0;
}

void ml_bk_alerts_free(ml_broker_t *b)
{
    ml_bk_alerts_t *a = ml_query_alerts(b);
    if (!a)
        return;
    free(a->nodes);
    free(a);
    ml_query_set_alerts(b, NULL);
}

/* Sets the sentence of an episode (cut at its size). */
static void s_detail(s_episode_t *ep, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void s_detail(s_episode_t *ep, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ep->detail, sizeof ep->detail, fmt, ap);
    va_end(ap);
}

/* Sends the episode's Escalation to whoever gets ops alerts ([escalation]
 * notify, else every OPS node, as flow.c's escalations). Returns to how
 * many nodes. */
static int s_send(ml_broker_t *b, int kind, const s_episode_t *ep, const char *target, int resolved)
{
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    Medlink__V1__Escalation esc = MEDLINK__V1__ESCALATION__INIT;
    esc.reason = s_reason[kind];
    esc.case_id = id; /* names no case: the notice's own id, as a summary's */
    esc.target = (char *)target;
    esc.detail = (char *)ep->detail;
    esc.resolved = resolved;
    esc.since = ep->since;
    return ml_ops_escalate(b, &esc);
}

/* Starts an episode (or, with again, says more about one in progress):
 * the Escalation and a WARN line. */
static void s_raise(ml_broker_t *b, int kind, s_episode_t *ep, const char *target, int64_t since,
                    int again)
{
    if (!again) {
        ep->active = 1;
        ep->since = since;
    }
    ml_query_alerts(b)->raised[kind]++;
    ml_bk_metrics_escalation(b, s_reason[kind]);
    int sent = s_send(b, kind, ep, target, 0);
    ml_log(ML_LOG_WARN, "alert", "%s: %s (told %d ops node(s))", s_kind_name[kind], ep->detail,
           sent);
}

/* Ends an episode with a resolved notice and an INFO line. */
static void s_resolve(ml_broker_t *b, int kind, s_episode_t *ep, const char *target)
{
    if (!ep->active)
        return;
    int sent = s_send(b, kind, ep, target, 1);
    ml_log(ML_LOG_INFO, "alert", "%s resolved: %s (told %d ops node(s))", s_kind_name[kind],
           ep->detail, sent);
    ep->active = 0;
    ep->since = 0;
}

/* "3 h 12 min", "45 s": how long, for people. */
static void s_span(int64_t ms, char *buf, size_t len)
{
    int64_t s = ms / 1000;
    if (s < 120)
        snprintf(buf, len, "%" PRId64 " s", s);
    else if (s < 7200)
        snprintf(buf, len, "%" PRId64 " min", s / 60);
    else if (s < 2 * 86400)
        snprintf(buf, len, "%" PRId64 " h %" PRId64 " min", s / 3600, s / 60 % 60);
    else
        snprintf(buf, len, "%" PRId64 " days", s / 86400);
}

/* ---- nodes -------------------------------------------------------------- */

static int s_nodes_fit(ml_bk_alerts_t *a, size_t n)
{
    if (n <= a->n_nodes)
        return 0;
    s_episode_t *p = realloc(a->nodes, n * sizeof *p);
    if (!p)
        return ML_ENOMEM;
    memset(p + a->n_nodes, 0, (n - a->n_nodes) * sizeof *p);
    a->nodes = p;
    a->n_nodes = n;
    return 0;
}

typedef struct {
    ml_broker_t *b;
    ml_bk_alerts_t *a;
    const ml_broker_config_t *cfg;
    int64_t started_at;
    int64_t now;
} s_nodes_t;

static void s_check_node(void *arg, const ml_query_node_t *ns)
{
    const s_nodes_t *k = arg;
    ml_broker_t *b = k->b;
    int64_t now = k->now;
    if (ns->index >= k->a->n_nodes)
        return; /* registered after the count (cannot happen within one walk) */
    s_episode_t *ep = &k->a->nodes[ns->index];
    const char *id = ns->node->id;
    char span[64];
    if (ns->removed) {
        if (ep->active) {
            s_detail(ep, "node %s was removed from the registry (reload); no longer watched", id);
            s_resolve(b, S_NODE_OFFLINE, ep, id);
        }
        return;
    }
    int64_t limit = ml_broker_config_offline_alert(k->cfg, ns->node);
    int64_t since = ns->last_seen > 0 ? ns->last_seen : k->started_at;
    if (ns->online > 0) {
        if (ep->active) {
            s_span(now - ep->since, span, sizeof span);
            s_detail(ep, "node %s is back online after %s offline", id, span);
            s_resolve(b, S_NODE_OFFLINE, ep, id);
        }
        return;
    }
    if (limit <= 0) {
        if (ep->active) {
            s_detail(ep,
                     "node %s is still offline, but offline_alert_after is now 0 (never): "
                     "no longer watched",
                     id);
            s_resolve(b, S_NODE_OFFLINE, ep, id);
        }
        return;
    }
    if (ep->active || now - since < limit)
        return;
    char date[40], lim[64];
    ml_time_format(since, date, sizeof date);
    s_span(now - since, span, sizeof span);
    s_span(limit, lim, sizeof lim);
    const char *name = ns->node->display_name ? ns->node->display_name : "";
    if (ns->last_seen > 0)
        s_detail(ep,
                 "node %s (%s, %s) has been offline for %s, since %s, longer than "
                 "offline_alert_after (%s)",
                 id, name, ml_role_name(ns->node->role), span, date, lim);
    else
        s_detail(ep,
                 "node %s (%s, %s) has not connected since the broker started %s ago, on %s, "
                 "longer than offline_alert_after (%s)",
                 id, name, ml_role_name(ns->node->role), span, date, lim);
    s_raise(b, S_NODE_OFFLINE, ep, id, since, 0);
}

static void s_check_nodes(ml_broker_t *b, int64_t now)
{
    ml_bk_alerts_t *a = ml_query_alerts(b);
    size_t n = ml_query_node_count(b);
    if (s_nodes_fit(a, n) != 0) {
        ml_log(ML_LOG_ERROR, "alert", "out of memory watching %zu nodes", n);
        return;
    }
    ml_query_counters_t c;
    ml_query_counters(b, &c);
    s_nodes_t k = {b, a, ml_query_config(b), c.started_at, now};
    ml_query_nodes(b, s_check_node, &k);
}

/* ---- expiry ------------------------------------------------------------- */

static void s_check_expiry(ml_broker_t *b, int64_t now)
{
    ml_bk_alerts_t *a = ml_query_alerts(b);
    const long warn_days = ml_query_config(b)->crl_warn_days;
    ml_bk_expiry_t e[S_EXPIRY_MAX];
    size_t n = ml_query_expiry(b, now, e, S_EXPIRY_MAX);
    if (n > S_EXPIRY_MAX)
        n = S_EXPIRY_MAX;
    int seen[S_EXPIRY_MAX] = {0};
    for (size_t i = 0; i < n; i++) {
        /* The slot of this subject, or a free one. */
        s_expiry_t *x = NULL, *free_slot = NULL;
        for (size_t k = 0; k < S_EXPIRY_MAX; k++) {
            if (a->expiry[k].what[0] && strcmp(a->expiry[k].what, e[i].what) == 0) {
                x = &a->expiry[k];
                seen[k] = 1;
                break;
            }
            if (!a->expiry[k].what[0] && !free_slot)
                free_slot = &a->expiry[k];
        }
        if (e[i].state == ML_BK_EXPIRY_OK) {
            if (x) {
                s_detail(&x->ep, "%s was renewed: %lld day(s) left, outside crl_warn_days (%ld)",
                         x->what, (long long)e[i].days_left, warn_days);
                s_resolve(b, S_EXPIRY, &x->ep, x->what);
                memset(x, 0, sizeof *x);
            }
            continue;
        }
        char date[40];
        ml_time_format(e[i].not_after, date, sizeof date);
        if (!x) {
            if (!free_slot)
                continue; /* cannot happen: at most S_EXPIRY_MAX subjects are listed */
            x = free_slot;
            seen[x - a->expiry] = 1;
            ml_seterr(x->what, sizeof x->what, "%s", e[i].what);
            x->past = e[i].state == ML_BK_EXPIRY_PAST;
            if (x->past)
                s_detail(&x->ep,
                         "%s EXPIRED on %s: every TLS handshake it affects is refused until it is "
                         "renewed",
                         x->what, date);
            else
                s_detail(&x->ep,
                         "%s expires in %lld day(s), on %s (crl_warn_days = %ld); renew it before "
                         "then",
                         x->what, (long long)e[i].days_left, date, warn_days);
            /* The episode began when it entered the window, which gives
             * the same `since` after a restart. */
            int64_t since = e[i].not_after - (int64_t)warn_days * S_DAY_MS;
            s_raise(b, S_EXPIRY, &x->ep, x->what, since < now ? since : now, 0);
        } else if (!x->past && e[i].state == ML_BK_EXPIRY_PAST) {
            /* Still the same episode, but what was a warning is now an
             * outage: ops hear of it once more. */
            x->past = 1;
            s_detail(&x->ep,
                     "%s EXPIRED on %s: every TLS handshake it affects is refused until it is "
                     "renewed",
                     x->what, date);
            s_raise(b, S_EXPIRY, &x->ep, x->what, x->ep.since, 1);
        }
    }
    /* A subject no longer listed (a reload changed the CRL): ended. */
    for (size_t k = 0; k < S_EXPIRY_MAX; k++) {
        s_expiry_t *x = &a->expiry[k];
        if (!x->what[0] || seen[k])
            continue;
        s_detail(&x->ep, "%s is no longer used by the broker (reload)", x->what);
        s_resolve(b, S_EXPIRY, &x->ep, x->what);
        memset(x, 0, sizeof *x);
    }
}

/* ---- store and dead letters ---------------------------------------------- */

static void s_check_store(ml_broker_t *b)
{
    ml_bk_alerts_t *a = ml_query_alerts(b);
    if (a->store_max <= 0)
        return;
    /* What the disk holds for the store, as the store counts it for
     * max_store_bytes: the database with its body segments, and the WAL
     * (two stat calls and a counter; no SQLite, no counting of rows). */
    uint64_t db = 0, wal = 0;
    ml_query_store_files(b, &db, &wal);
    uint64_t size = db + wal;
    long pct = ml_query_config(b)->store_alert_percent;
    uint64_t pct_now = size * 100 / (uint64_t)a->store_max;
    if (!a->store.active && pct_now >= (uint64_t)pct) {
        s_detail(&a->store,
                 "the store uses %" PRIu64 " bytes on disk (database and segments %" PRIu64
                 ", WAL %" PRIu64 "), %" PRIu64
                 "%% of max_store_bytes (%lld), the size past which new messages "
                 "are refused (alert at store_alert_percent = %ld%%)",
                 size, db, wal, pct_now, (long long)a->store_max, pct);
        s_raise(b, S_STORE_FULL, &a->store, "store", ml_now_ms(), 0);
    } else if (a->store.active && pct_now + S_STORE_HYSTERESIS < (uint64_t)pct) {
        s_detail(&a->store,
                 "the store holds %" PRIu64 " bytes, %" PRIu64 "%% of max_store_bytes (%lld)", size,
                 pct_now, (long long)a->store_max);
        s_resolve(b, S_STORE_FULL, &a->store, "store");
    }
}

static void s_check_dlq(ml_broker_t *b)
{
    ml_bk_alerts_t *a = ml_query_alerts(b);
    int64_t n = 0;
    if (ml_query_dead_count(b, &n) != 0)
        return; /* logged by the store; tried again next time */
    ml_query_counters_t c;
    ml_query_counters(b, &c);
    a->dead_seen = c.dead_total;
    long th = ml_query_config(b)->dlq_alert_threshold;
    if (!a->dlq.active && n >= th && n > (a->dlq_seen < 0 ? 0 : a->dlq_seen)) {
        s_detail(&a->dlq,
                 "the dead-letter queue holds %lld message(s) that could not be delivered "
                 "(dlq_alert_threshold = %ld); see medlinkctl dlq list, then replay or purge",
                 (long long)n, th);
        s_raise(b, S_DLQ, &a->dlq, "dlq", ml_now_ms(), 0);
    } else if (a->dlq.active && n < th) {
        s_detail(&a->dlq,
                 "the dead-letter queue holds %lld message(s), under dlq_alert_threshold (%ld)",
                 (long long)n, th);
        s_resolve(b, S_DLQ, &a->dlq, "dlq");
    }
    a->dlq_seen = n;
}

void ml_bk_alerts_tick(ml_broker_t *b)
{
    ml_bk_alerts_t *a = ml_query_alerts(b);
    if (!a)
        return;
    int64_t mono = ml_mono_ms();
    if (mono - a->checked_at >= S_CHECK_MS) {
        a->checked_at = mono;
        int64_t now = ml_now_ms();
        s_check_nodes(b, now);
        s_check_expiry(b, now);
    }
    /* A new dead letter is counted at once, the rest every S_SLOW_MS. */
    ml_query_counters_t c;
    ml_query_counters(b, &c);
    if (mono - a->slow_at >= S_SLOW_MS || c.dead_total != a->dead_seen) {
        a->slow_at = mono;
        s_check_store(b);
        s_check_dlq(b);
    }
}

void ml_bk_alerts_recheck(ml_broker_t *b)
{
    ml_bk_alerts_t *a = ml_query_alerts(b);
    if (!a)
        return;
    a->checked_at = a->slow_at = INT64_MIN / 2;
    ml_bk_alerts_tick(b);
}

/* ---- what others show --------------------------------------------------- */

/* A label value of the text exposition format: \, " and newline escaped. */
static void s_label(ml_sbuf_t *out, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\')
            ml_sbuf_puts(out, "\\\\");
        else if (*s == '"')
            ml_sbuf_puts(out, "\\\"");
        else if (*s == '\n')
            ml_sbuf_puts(out, "\\n");
        else
            ml_sbuf_add(out, s, 1);
    }
}

typedef void (*s_each_cb)(void *arg, int kind, const char *subject, const s_episode_t *ep);

typedef struct {
    const ml_bk_alerts_t *a;
    s_each_cb cb;
    void *arg;
} s_each_t;

static void s_each_node(void *arg, const ml_query_node_t *n)
{
    const s_each_t *k = arg;
    if (n->index < k->a->n_nodes && k->a->nodes[n->index].active)
        k->cb(k->arg, S_NODE_OFFLINE, n->node->id, &k->a->nodes[n->index]);
}

/* Calls cb for every episode in progress. O(nodes + fixed). */
static void s_each_active(ml_broker_t *b, s_each_cb cb, void *arg)
{
    ml_bk_alerts_t *a = ml_query_alerts(b);
    s_each_t each = {a, cb, arg};
    ml_query_nodes(b, s_each_node, &each);
    for (size_t k = 0; k < S_EXPIRY_MAX; k++)
        if (a->expiry[k].ep.active)
            cb(arg, S_EXPIRY, a->expiry[k].what, &a->expiry[k].ep);
    if (a->store.active)
        cb(arg, S_STORE_FULL, "store", &a->store);
    if (a->dlq.active)
        cb(arg, S_DLQ, "dlq", &a->dlq);
}

static void s_metric_cb(void *arg, int kind, const char *subject, const s_episode_t *ep)
{
    (void)ep;
    ml_sbuf_t *out = arg;
    ml_sbuf_printf(out, "medlink_alert_active{alert=\"%s\",subject=\"", s_kind_name[kind]);
    s_label(out, subject);
    ml_sbuf_puts(out, "\"} 1\n");
}

void ml_bk_alerts_metrics(ml_broker_t *b, ml_sbuf_t *out)
{
    const ml_bk_alerts_t *a = ml_query_alerts(b);
    if (!a)
        return;
    ml_sbuf_puts(out, "# HELP medlink_alert_active Ops alerts in progress (1 while an episode "
                      "lasts): node_offline, expiry, store_full, dlq.\n"
                      "# TYPE medlink_alert_active gauge\n");
    s_each_active(b, s_metric_cb, out);
    ml_sbuf_puts(out, "# HELP medlink_alerts_raised_total Ops alerts raised since the broker "
                      "started (Escalations to the ops nodes).\n"
                      "# TYPE medlink_alerts_raised_total counter\n");
    for (int k = 0; k < S_KINDS; k++)
        ml_sbuf_printf(out, "medlink_alerts_raised_total{alert=\"%s\"} %" PRIu64 "\n",
                       s_kind_name[k], a->raised[k]);
}

typedef struct {
    Medlink__V1__Alert *items;
    Medlink__V1__Alert **ptrs;
    size_t n, cap;
} s_status_t;

static void s_count_cb(void *arg, int kind, const char *subject, const s_episode_t *ep)
{
    (void)kind;
    (void)subject;
    (void)ep;
    ((s_status_t *)arg)->cap++;
}

static void s_status_cb(void *arg, int kind, const char *subject, const s_episode_t *ep)
{
    s_status_t *k = arg;
    if (k->n >= k->cap)
        return;
    Medlink__V1__Alert *al = &k->items[k->n];
    medlink__v1__alert__init(al);
    al->kind = (char *)s_kind_name[kind];
    al->subject = (char *)subject;
    al->detail = (char *)ep->detail;
    al->since = ep->since;
    k->ptrs[k->n++] = al;
}

int ml_bk_alerts_status(ml_broker_t *b, Medlink__V1__BrokerStatus *st)
{
    st->n_alert = 0;
    st->alert = NULL;
    if (!ml_query_alerts(b))
        return 0;
    s_status_t k = {0};
    s_each_active(b, s_count_cb, &k);
    if (k.cap == 0)
        return 0;
    k.items = calloc(k.cap, sizeof *k.items);
    k.ptrs = calloc(k.cap, sizeof *k.ptrs);
    if (!k.items || !k.ptrs) {
        free(k.items);
        free(k.ptrs);
        return ML_ENOMEM;
    }
    s_each_active(b, s_status_cb, &k);
    st->n_alert = k.n;
    st->alert = k.ptrs;
    return 0;
}

void ml_bk_alerts_status_free(Medlink__V1__BrokerStatus *st)
{
    /* The items are one array: the first pointer is its start. */
    if (st->alert && st->n_alert > 0)
        free(st->alert[0]);
    free(st->alert);
    st->alert = NULL;
    st->n_alert = 0;
}
