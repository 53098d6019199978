/* The ops modules' read API (see query.h). This file and ops_cmd.c are the
 * only ops files that see broker_int.h: when the broker's structures move
 * (sessions, nodes, cases into their own modules), only these two change,
 * and each function here is a plain copy of fields into a view. Loop thread
 * only. */
#include "query.h"

#include <stdlib.h>
#include <string.h>

#include "broker_int.h"
#include "submit.h"

uv_loop_t *ml_query_loop(const ml_broker_t *b)
{
    return b->loop;
}

const ml_broker_config_t *ml_query_config(const ml_broker_t *b)
{
    return b->cfg;
}

ml_tls_ctx_t *ml_query_tls(const ml_broker_t *b)
{
    return b->tls;
}

struct ml_bk_http *ml_query_http(const ml_broker_t *b)
{
    return b->http;
}

void ml_query_set_http(ml_broker_t *b, struct ml_bk_http *h)
{
    b->http = h;
}

struct ml_bk_metrics *ml_query_metrics(const ml_broker_t *b)
{
    return b->metrics;
}

void ml_query_set_metrics(ml_broker_t *b, struct ml_bk_metrics *m)
{
    b->metrics = m;
}

struct ml_bk_web *ml_query_web(const ml_broker_t *b)
{
    return b->web;
}

void ml_query_set_web(ml_broker_t *b, struct ml_bk_web *w)
{
    b->web = w;
}

struct ml_bk_alerts *ml_query_alerts(const ml_broker_t *b)
{
    return b->alerts;
}

void ml_query_set_alerts(ml_broker_t *b, struct ml_bk_alerts *a)
{
    b->alerts = a;
}

/* ---- counters and readiness ------------------------------------------- */

void ml_query_counters(const ml_broker_t *b, ml_query_counters_t *out)
{
    out->started_at = b->started_at;
    out->accepted_total = b->accepted_total;
    out->delivered_total = b->delivered_total;
    out->refused_total = b->refused_total;
    out->dead_total = b->dead_total;
}

typedef struct {
    uint64_t overdue;
    int64_t now;
} s_overdue_t;

static void s_overdue_cb(ml_case_t *c, void *arg)
{
    s_overdue_t *k = arg;
    if (c->closed || c->gone)
        return;
    if (c->deadline_at && c->deadline_at <= k->now)
        k->overdue++;
}

void ml_query_case_counts(ml_broker_t *b, int64_t now, ml_query_case_counts_t *out)
{
    s_overdue_t k = {0, now};
    ml_casetab_each(&b->cases, s_overdue_cb, &k);
    out->open = b->open_total;
    out->overdue = k.overdue;
    out->in_memory = b->cases.count;
}

void ml_query_ready(const ml_broker_t *b, ml_query_ready_t *out)
{
    out->listening = b->router && b->endpoint[0];
    out->store_open = b->store != NULL;
    out->puts_pending = b->puts_pending;
    out->backlog_full = ml_submit_backlog_full(b);
}

size_t ml_query_expiry(const ml_broker_t *b, int64_t now, ml_bk_expiry_t *out, size_t cap)
{
    return ml_bk_expiry_list(b->tls, b->cfg->crl_warn_days, now, out, cap);
}

/* ---- sessions ----------------------------------------------------------- */

static void s_session_view(const ml_session_t *x, int64_t now, int64_t mono, ml_query_session_t *v)
{
    v->state = x->state == S_READY    ? ML_QUERY_SESSION_READY
               : x->state == S_CLOSED ? ML_QUERY_SESSION_CLOSED
                                      : ML_QUERY_SESSION_HANDSHAKE;
    v->sink = x->sink;
    v->serial = x->serial;
    v->node_id = x->peer_id;
    v->role = x->ns ? x->ns->node->role : 0;
    v->peer = x->peer_hex;
    v->connected_at = now - (mono - x->created);
    v->last_seen = now - (mono - x->last_rx);
    v->in_flight = x->ns && x->ns->deliver == x ? x->ns->n_inflight : 0;
}

void ml_query_sessions(ml_broker_t *b, void (*cb)(void *arg, const ml_query_session_t *s),
                       void *arg)
{
    int64_t mono = ml_mono_ms(), now = ml_now_ms();
    for (const ml_session_t *x = b->sessions; x; x = x->next) {
        ml_query_session_t v;
        s_session_view(x, now, mono, &v);
        cb(arg, &v);
    }
}

void ml_query_session(ml_broker_t *b, const ml_session_t *s, ml_query_session_t *out)
{
    (void)b;
    s_session_view(s, ml_now_ms(), ml_mono_ms(), out);
}

ml_session_t *ml_query_session_find(ml_broker_t *b, uint64_t serial)
{
    ml_session_t *s = b->sessions;
    while (s && !(s->serial == serial && s->state == S_READY))
        s = s->next;
    return s;
}

/* ---- nodes -------------------------------------------------------------- */

size_t ml_query_node_count(const ml_broker_t *b)
{
    return b->n_nodes;
}

void ml_query_nodes(ml_broker_t *b, void (*cb)(void *arg, const ml_query_node_t *n), void *arg)
{
    for (size_t j = 0; j < b->n_nodes; j++) {
        const ml_nodestate_t *ns = b->nodes[j];
        ml_query_node_t v = {
            .index = j,
            .node = ns->node,
            .removed = ns->removed,
            .online = ns->online,
            .last_seen = ns->last_seen,
            .queued = ml_queue_len(&ns->queue),
            .queue_oldest_at = ml_queue_oldest(&ns->queue),
            .in_flight = ns->n_inflight,
            .delivered = ns->delivered,
            .opened = ns->opened,
        };
        int64_t oldest = v.queue_oldest_at;
        for (size_t f = ns->if_head; f < ns->if_head + ns->if_len; f++) {
            if (ns->inflight[f].acked)
                continue;
            int64_t t = ns->inflight[f].item.accepted_at;
            if (oldest == 0 || t < oldest)
                oldest = t;
        }
        v.oldest_at = oldest;
        cb(arg, &v);
    }
}

/* ---- cases -------------------------------------------------------------- */

int ml_query_case(ml_broker_t *b, const char *case_id, ml_store_case_cb cb, void *arg)
{
    ml_case_t *c = ml_casetab_find(&b->cases, case_id);
    if (c && !c->gone) {
        ml_store_case_t row;
        ml_bk_case_row(b, c, &row);
        cb(arg, &row);
        return 0;
    }
    return ml_store_case_get(b->store, case_id, cb, arg);
}

int ml_query_case_events(ml_broker_t *b, const char *case_id, ml_store_event_cb cb, void *arg)
{
    return ml_store_case_events(b->store, case_id, cb, arg);
}

int ml_query_cases(ml_broker_t *b, const ml_query_case_filter_t *f, ml_store_case_cb cb, void *arg)
{
    return ml_store_cases_query(b->store, f->kind, f->state, f->overdue_at, f->limit, cb, arg);
}

int ml_query_cases_open_states(ml_broker_t *b, ml_store_state_count_cb cb, void *arg)
{
    return ml_store_cases_open_states(b->store, cb, arg);
}

/* ---- dead letters ------------------------------------------------------- */

int ml_query_dead_count(ml_broker_t *b, int64_t *n)
{
    return ml_store_dead_count(b->store, n);
}

static char *s_dup(const char *s)
{
    return strdup(s ? s : "");
}

static void s_dead_cb(void *arg, const ml_store_dead_t *d)
{
    ml_query_deads_t *k = arg;
    if (k->failed)
        return;
    if (k->n == k->cap) {
        size_t cap = k->cap ? k->cap * 2 : 16;
        ml_store_dead_t *p = realloc(k->items, cap * sizeof *p);
        if (!p) {
            k->failed = 1;
            return;
        }
        k->items = p;
        k->cap = cap;
    }
    ml_store_dead_t *x = &k->items[k->n++];
    *x = *d;
    x->id = s_dup(d->id);
    x->case_id = s_dup(d->case_id);
    x->sender = s_dup(d->sender);
    x->recipient = s_dup(d->recipient);
    x->reason = s_dup(d->reason);
    if (!x->id || !x->case_id || !x->sender || !x->recipient || !x->reason)
        k->failed = 1;
}

void ml_query_deads_free(ml_query_deads_t *l)
{
    if (!l)
        return;
    for (size_t i = 0; i < l->n; i++) {
        /* The copies s_dead_cb made (the struct's fields are const for
         * the store's borrowed rows). */
        free((char *)l->items[i].id);
        free((char *)l->items[i].case_id);
        free((char *)l->items[i].sender);
        free((char *)l->items[i].recipient);
        free((char *)l->items[i].reason);
    }
    free(l->items);
    l->items = NULL;
    l->n = l->cap = 0;
    l->failed = 0;
}

int ml_query_dlq(ml_broker_t *b, const char *id, int limit, ml_query_deads_t *out)
{
    memset(out, 0, sizeof *out);
    int rc = id ? ml_store_dead_get(b->store, id, s_dead_cb, out)
                : ml_store_dead_list(b->store, limit, s_dead_cb, out);
    if (rc == 0 && out->failed)
        rc = ML_ENOMEM;
    if (rc != 0)
        ml_query_deads_free(out);
    return rc;
}

int ml_query_fetch(ml_broker_t *b, int64_t seq, uint8_t **blob, size_t *len)
{
    return ml_store_fetch(b->store, seq, blob, len);
}

/* ---- the store ---------------------------------------------------------- */

int ml_query_store_info(ml_broker_t *b, ml_store_info_t *out)
{
    return ml_store_info(b->store, out);
}

void ml_query_store_stats(ml_broker_t *b, ml_store_stats_t *out)
{
    ml_store_stats(b->store, out);
}

void ml_query_store_files(ml_broker_t *b, uint64_t *db_bytes, uint64_t *wal_bytes)
{
    ml_store_file_sizes(b->store, db_bytes, wal_bytes);
}

int ml_query_store_health(ml_broker_t *b, char *why, size_t len)
{
    return ml_store_health(b->store, why, len);
}
