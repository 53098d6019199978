/* medlinkd's answers to medlinkctl: status (sessions, nodes, queues),
 * cases (one with its timeline, or a filtered list), and the dead-letter
 * queue (list, show, replay, purge). Only OPS nodes may ask. Reads come
 * from memory and from the store's committed rows; replay and purge are
 * queued to the store like every other write, in order with the
 * deliveries that follow them. Replies carry no patient data: ops staff see
 * where a case is and what failed, not who it is about. The broker is read
 * only through query.h and changed only through ops_cmd.h: this file builds
 * requests and replies, checks who asks and logs. Loop thread only. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "admin.h"
#include "alerts.h"
#include "cases.h"
#include "config.h"
#include "expiry.h"
#include "http.h"
#include "ml_adminjson.h"
#include "ml_text.h"
#include "ops_cmd.h"
#include "query.h"

#define S_LIMIT_DEFAULT 100
#define S_LIMIT_MAX 10000

/* Who asked: a medlinkctl session (the reply goes back as an AdminReply),
 * or an /api/v1 request (the reply becomes the JSON medlinkctl --json
 * prints for it, ml_adminjson.h). The read operations serve both. */
typedef struct {
    ml_session_t *s;      /* a session, or NULL */
    ml_http_resp_t *http; /* an HTTP reply to fill, or NULL */
    int json;             /* ML_ADMIN_JSON_* of the HTTP answer */
    const char *who;      /* for log lines and timelines */
} s_to_t;

/* Every reply names the request it answers (AdminRequest.request_id). */
static void s_answer(ml_broker_t *b, const s_to_t *to, const Medlink__V1__AdminRequest *rq,
                     Medlink__V1__AdminReply *reply)
{
    if (to->http) {
        char *json = NULL, err[256];
        if (ml_admin_json(reply, to->json, &json, err, sizeof err) != 0) {
            ml_http_error(to->http, 500, "cannot render the answer: %s", err);
            return;
        }
        to->http->status = 200;
        to->http->content_type = "application/json";
        ml_sbuf_puts(&to->http->body, json);
        ml_sbuf_puts(&to->http->body, "\n");
        free(json);
        return;
    }
    reply->request_id = rq && rq->request_id ? rq->request_id : (char *)"";
    ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
    env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REPLY;
    env.admin_reply = reply;
    ml_ops_reply(b, to->s, &env);
}

static void s_fail(ml_broker_t *b, const s_to_t *to, const Medlink__V1__AdminRequest *rq,
                   const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static void s_vfail(ml_broker_t *b, const s_to_t *to, const Medlink__V1__AdminRequest *rq,
                    const char *fmt, va_list ap)
{
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    if (to->http) {
        /* A sentence that begins "cannot" is the broker's own failure (a
         * store read); the rest are about the request. */
        ml_http_resp_t *r = to->http;
        r->status = strncmp(msg, "cannot ", 7) == 0 ? 500 : strncmp(msg, "no ", 3) == 0 ? 404 : 400;
        r->content_type = "application/json";
        ml_sbuf_free(&r->body);
        ml_sbuf_puts(&r->body, "{\"error\": \"");
        ml_sbuf_json_str(&r->body, msg);
        ml_sbuf_puts(&r->body, "\"}\n");
        return;
    }
    Medlink__V1__AdminReply reply = MEDLINK__V1__ADMIN_REPLY__INIT;
    reply.status = 1;
    reply.error = msg;
    s_answer(b, to, rq, &reply);
}

static void s_fail(ml_broker_t *b, const s_to_t *to, const Medlink__V1__AdminRequest *rq,
                   const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    s_vfail(b, to, rq, fmt, ap);
    va_end(ap);
}

/* The node a session authenticated as (borrowed for this turn). */
static const char *s_peer(ml_broker_t *b, const ml_session_t *s)
{
    ml_query_session_t v;
    ml_query_session(b, s, &v);
    return v.node_id;
}

/* The same for the operations only a session may ask for. */
static void s_send(ml_broker_t *b, ml_session_t *s, const Medlink__V1__AdminRequest *rq,
                   Medlink__V1__AdminReply *reply)
{
    s_to_t to = {.s = s, .who = s_peer(b, s)};
    s_answer(b, &to, rq, reply);
}

static void s_error(ml_broker_t *b, ml_session_t *s, const Medlink__V1__AdminRequest *rq,
                    const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static void s_error(ml_broker_t *b, ml_session_t *s, const Medlink__V1__AdminRequest *rq,
                    const char *fmt, ...)
{
    s_to_t to = {.s = s, .who = s_peer(b, s)};
    va_list ap;
    va_start(ap, fmt);
    s_vfail(b, &to, rq, fmt, ap);
    va_end(ap);
}

typedef struct {
    Medlink__V1__SessionInfo *si;
    Medlink__V1__SessionInfo **sip;
    size_t n, cap;
} s_sessions_t;

static void s_session_count_cb(void *arg, const ml_query_session_t *v)
{
    if (v->state == ML_QUERY_SESSION_READY)
        ((s_sessions_t *)arg)->cap++;
}

static void s_session_cb(void *arg, const ml_query_session_t *v)
{
    s_sessions_t *k = arg;
    if (v->state != ML_QUERY_SESSION_READY || k->n >= k->cap)
        return;
    Medlink__V1__SessionInfo *x = &k->si[k->n];
    medlink__v1__session_info__init(x);
    x->node_id = (char *)v->node_id;
    x->peer = (char *)v->peer;
    x->connected_at = v->connected_at;
    x->last_seen = v->last_seen;
    x->in_flight = v->in_flight;
    k->sip[k->n++] = x;
}

typedef struct {
    Medlink__V1__NodeStatus *ni;
    Medlink__V1__NodeStatus **nip;
    size_t n, cap;
    uint64_t limit; /* open_cases_per_node */
} s_nodes_t;

static void s_node_cb(void *arg, const ml_query_node_t *v)
{
    s_nodes_t *k = arg;
    if (v->removed || k->n >= k->cap)
        return; /* taken out of the registry by a reload */
    Medlink__V1__NodeStatus *x = &k->ni[k->n];
    medlink__v1__node_status__init(x);
    x->node_id = v->node->id;
    x->role = (char *)ml_role_name(v->node->role);
    x->community = v->node->community ? v->node->community : "";
    x->display_name = v->node->display_name ? v->node->display_name : "";
    x->online = v->online > 0;
    x->last_seen = v->last_seen;
    x->queue_depth = v->queued + v->in_flight;
    x->oldest_queued_at = v->oldest_at;
    x->in_flight = v->in_flight;
    x->delivered = v->delivered;
    x->open_cases_opened = v->opened;
    x->open_cases_limit = k->limit;
    k->nip[k->n++] = x;
}

static void s_admin_status(ml_broker_t *b, const s_to_t *to, const Medlink__V1__AdminRequest *rq)
{
    Medlink__V1__BrokerStatus st = MEDLINK__V1__BROKER_STATUS__INIT;
    Medlink__V1__AdminReply reply = MEDLINK__V1__ADMIN_REPLY__INIT;
    const ml_broker_config_t *cfg = ml_query_config(b);
    s_sessions_t ks = {0};
    ml_query_sessions(b, s_session_count_cb, &ks);
    size_t n_nodes = ml_query_node_count(b);
    s_nodes_t kn = {.cap = n_nodes, .limit = (uint64_t)cfg->open_cases_per_node};
    ks.si = calloc(ks.cap ? ks.cap : 1, sizeof *ks.si);
    ks.sip = calloc(ks.cap ? ks.cap : 1, sizeof *ks.sip);
    kn.ni = calloc(n_nodes ? n_nodes : 1, sizeof *kn.ni);
    kn.nip = calloc(n_nodes ? n_nodes : 1, sizeof *kn.nip);
    if (!ks.si || !ks.sip || !kn.ni || !kn.nip)
        goto out;
    int64_t now = ml_now_ms();
    ml_query_sessions(b, s_session_cb, &ks);
    ml_query_nodes(b, s_node_cb, &kn);
    ml_query_counters_t c;
    ml_query_counters(b, &c);
    st.broker = cfg->broker_id;
    st.started_at = c.started_at;
    st.now = now;
    st.sessions = ks.n;
    st.accepted_total = c.accepted_total;
    st.delivered_total = c.delivered_total;
    st.refused_total = c.refused_total;
    ml_query_case_counts_t cc;
    ml_query_case_counts(b, now, &cc);
    st.open_cases = cc.open;
    st.overdue_cases = cc.overdue;
    st.cases_in_memory = cc.in_memory;
    int64_t dead = 0;
    if (ml_query_dead_count(b, &dead) == 0)
        st.dead_letters = (uint64_t)dead;
    st.n_session = ks.n;
    st.session = ks.sip;
    st.n_node = kn.n;
    st.node = kn.nip;
    /* The clock: what expires, and whether it is inside crl_warn_days. */
    ml_bk_expiry_t ex[16];
    Medlink__V1__Expiry ei[16], *eip[16];
    size_t n_ex = ml_query_expiry(b, now, ex, 16);
    if (n_ex > 16)
        n_ex = 16;
    for (size_t i = 0; i < n_ex; i++) {
        medlink__v1__expiry__init(&ei[i]);
        ei[i].what = ex[i].what;
        ei[i].not_after = ex[i].not_after;
        ei[i].days_left = ex[i].days_left;
        ei[i].warning = ex[i].state != ML_BK_EXPIRY_OK;
        ei[i].expired = ex[i].state == ML_BK_EXPIRY_PAST;
        eip[i] = &ei[i];
    }
    st.n_expiry = n_ex;
    st.expiry = eip;
    /* Ops alerts in progress (an allocation failure leaves them out). */
    ml_bk_alerts_status(b, &st);
    reply.broker_status = &st;
    s_answer(b, to, rq, &reply);
    ml_bk_alerts_status_free(&st);
out:
    free(ks.si);
    free(ks.sip);
    free(kn.ni);
    free(kn.nip);
}

/* ---- cases ------------------------------------------------------------ */

static char *s_dup(const char *s)
{
    return strdup(s ? s : "");
}

/* A heap CaseInfo for a row (freed with s_case_info_free). */
static Medlink__V1__CaseInfo *s_case_info(const ml_store_case_t *r, int64_t now)
{
    Medlink__V1__CaseInfo *ci = calloc(1, sizeof *ci);
    if (!ci)
        return NULL;
    medlink__v1__case_info__init(ci);
    ci->case_id = s_dup(r->case_id);
    ci->kind = r->kind;
    ci->state = s_dup(ml_case_state_name(r->kind, r->state));
    ci->fhir_status = s_dup(ml_case_fhir_status(r->kind, r->state));
    ci->opened_by = s_dup(r->opener);
    ci->target = s_dup(r->target);
    ci->service = s_dup(r->service);
    ci->priority = s_dup(ml_priority_name(r->priority));
    ci->opened_at = r->opened_at;
    ci->updated_at = r->updated_at;
    ci->deadline_at = r->deadline_at;
    ci->deadline_state =
        s_dup(r->deadline_at ? ml_case_state_name(r->kind, r->deadline_state) : "");
    ci->overdue = r->deadline_at > 0 && r->deadline_at <= now;
    ci->escalations = (uint32_t)r->escalations;
    ci->linked_case_id = s_dup(r->linked);
    ci->closed = r->closed != 0;
    ci->follow_ups = (uint32_t)r->follow_ups;
    ci->chunks = r->chunks;
    ci->chunk_bytes = r->chunk_bytes;
    ci->duplicate_chunks = r->dup_chunks;
    ci->objects = r->n_objects;
    ci->chunks_expected = r->chunks_expected;
    return ci;
}

static void s_case_info_free(Medlink__V1__CaseInfo *ci)
{
    if (!ci)
        return;
    char **strs[] = {&ci->case_id,   &ci->state,          &ci->fhir_status,
                     &ci->opened_by, &ci->target,         &ci->service,
                     &ci->priority,  &ci->deadline_state, &ci->linked_case_id};
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++)
        free(*strs[i]);
    for (size_t i = 0; i < ci->n_timeline; i++) {
        Medlink__V1__TimelineEntry *t = ci->timeline[i];
        free(t->node);
        free(t->event);
        free(t->from_state);
        free(t->to_state);
        free(t->message_id);
        free(t->kind);
        free(t->detail);
        free(t);
    }
    free(ci->timeline);
    free(ci);
}

typedef struct {
    Medlink__V1__CaseInfo **list;
    size_t n, cap;
    int64_t now;
    int failed;
} s_cases_t;

static void s_case_cb(void *arg, const ml_store_case_t *r)
{
    s_cases_t *k = arg;
    if (k->n == k->cap) {
        size_t cap = k->cap ? k->cap * 2 : 16;
        Medlink__V1__CaseInfo **p = realloc(k->list, cap * sizeof *p);
        if (!p) {
            k->failed = 1;
            return;
        }
        k->list = p;
        k->cap = cap;
    }
    Medlink__V1__CaseInfo *ci = s_case_info(r, k->now);
    if (!ci) {
        k->failed = 1;
        return;
    }
    k->list[k->n++] = ci;
}

static void s_event_cb(void *arg, const ml_store_event_t *e)
{
    Medlink__V1__CaseInfo *ci = arg;
    Medlink__V1__TimelineEntry **p =
        realloc(ci->timeline, (ci->n_timeline + 1) * sizeof *ci->timeline);
    Medlink__V1__TimelineEntry *t = calloc(1, sizeof *t);
    if (p)
        ci->timeline = p;
    if (!p || !t) {
        free(t);
        return;
    }
    medlink__v1__timeline_entry__init(t);
    t->at = e->at;
    t->node = s_dup(e->node);
    t->event = s_dup(e->event);
    t->from_state = s_dup(e->from_state);
    t->to_state = s_dup(e->to_state);
    t->message_id = s_dup(e->message_id);
    t->kind = s_dup(e->kind);
    t->detail = s_dup(e->detail);
    ci->timeline[ci->n_timeline++] = t;
}

static void s_case_show(ml_broker_t *b, const s_to_t *to, const Medlink__V1__AdminRequest *rq)
{
    if (!rq->case_id || !*rq->case_id) {
        s_fail(b, to, rq, "case show needs a case id");
        return;
    }
    s_cases_t k = {.now = ml_now_ms()};
    /* Memory first (ml_query_case): it has the changes still being
     * committed. */
    if (ml_query_case(b, rq->case_id, s_case_cb, &k) == ML_ENOTFOUND) {
        s_fail(b, to, rq, "no case %s", rq->case_id);
        return;
    }
    if (k.failed || k.n != 1) {
        s_fail(b, to, rq, "cannot read case %s", rq->case_id);
        goto out;
    }
    if (ml_query_case_events(b, rq->case_id, s_event_cb, k.list[0]) != 0) {
        s_fail(b, to, rq, "cannot read the timeline of case %s", rq->case_id);
        goto out;
    }
    Medlink__V1__AdminReply reply = MEDLINK__V1__ADMIN_REPLY__INIT;
    reply.case_info = k.list[0];
    s_answer(b, to, rq, &reply);
out:
    for (size_t i = 0; i < k.n; i++)
        s_case_info_free(k.list[i]);
    free(k.list);
}

static void s_cases(ml_broker_t *b, const s_to_t *to, const Medlink__V1__AdminRequest *rq)
{
    int kind = 0, state = -1;
    if (rq->case_kind && *rq->case_kind && ml_case_kind_parse(rq->case_kind, &kind) != 0) {
        s_fail(b, to, rq, "unknown case kind \"%s\" (expected referral, imaging or down_transfer)",
               rq->case_kind);
        return;
    }
    if (rq->state && *rq->state) {
        int found = 0, fk = 0, fs = 0;
        for (int k = ML_CASE_REFERRAL; k < ML_CASE_KIND_COUNT; k++) {
            int v;
            if ((kind == 0 || kind == k) && ml_case_state_parse(k, rq->state, &v) == 0) {
                found++;
                fk = k;
                fs = v;
            }
        }
        if (found == 0) {
            s_fail(b, to, rq, "unknown state \"%s\"%s%s", rq->state, kind ? " for a " : "",
                   kind ? ml_case_kind_name(kind) : "");
            return;
        }
        if (found > 1) {
            s_fail(b, to, rq,
                   "state \"%s\" is a state of several case kinds: give the kind or the full "
                   "name (e.g. REFERRAL_%s)",
                   rq->state, rq->state);
            return;
        }
        kind = fk;
        state = fs;
    }
    int limit = rq->limit ? (int)rq->limit : S_LIMIT_DEFAULT;
    if (limit > S_LIMIT_MAX)
        limit = S_LIMIT_MAX;
    s_cases_t k = {.now = ml_now_ms()};
    ml_query_case_filter_t f = {
        .kind = kind, .state = state, .overdue_at = rq->overdue ? k.now : 0, .limit = limit};
    int rc = ml_query_cases(b, &f, s_case_cb, &k);
    if (rc != 0 || k.failed) {
        s_fail(b, to, rq, "cannot list cases: %s", ml_strerror(rc ? rc : ML_ENOMEM));
    } else {
        Medlink__V1__AdminReply reply = MEDLINK__V1__ADMIN_REPLY__INIT;
        reply.n_cases = k.n;
        reply.cases = k.list;
        s_answer(b, to, rq, &reply);
    }
    for (size_t i = 0; i < k.n; i++)
        s_case_info_free(k.list[i]);
    free(k.list);
}

/* ---- dead letters ------------------------------------------------------ */

static void s_dead_info(const ml_store_dead_t *d, Medlink__V1__DeadLetter *out)
{
    medlink__v1__dead_letter__init(out);
    out->message_id = (char *)d->id;
    out->case_id = (char *)d->case_id;
    out->kind = (char *)ml_kind_name(d->kind);
    out->from = (char *)d->sender;
    out->to = (char *)d->recipient;
    out->priority = (char *)ml_priority_name(d->priority);
    out->reason = (char *)d->reason;
    out->accepted_at = d->accepted_at;
    out->dead_at = d->dead_at;
    out->attempts = (uint32_t)d->attempts;
    out->size = d->size;
}

static int s_limit(const Medlink__V1__AdminRequest *rq)
{
    int limit = rq->limit ? (int)rq->limit : S_LIMIT_DEFAULT;
    return limit > S_LIMIT_MAX ? S_LIMIT_MAX : limit;
}

void ml_bk_admin_free(ml_broker_t *b)
{
    ml_ops_free(b);
}

static void s_dlq_list(ml_broker_t *b, const s_to_t *to, const Medlink__V1__AdminRequest *rq,
                       int with_envelope)
{
    ml_query_deads_t k = {0};
    int rc;
    if (with_envelope) {
        if (!rq->message_id || !*rq->message_id) {
            s_fail(b, to, rq, "dlq show needs a message id");
            return;
        }
        rc = ml_query_dlq(b, rq->message_id, 0, &k);
        if (rc == ML_ENOTFOUND) {
            s_fail(b, to, rq, "no dead letter %s", rq->message_id);
            return;
        }
    } else {
        rc = ml_query_dlq(b, NULL, s_limit(rq), &k);
    }
    Medlink__V1__DeadLetter *items = calloc(k.n ? k.n : 1, sizeof *items);
    Medlink__V1__DeadLetter **ptrs = calloc(k.n ? k.n : 1, sizeof *ptrs);
    uint8_t *blob = NULL;
    size_t blen = 0, n = 0;
    if (rc != 0 || !items || !ptrs) {
        s_fail(b, to, rq, "cannot read the dead-letter queue: %s",
               ml_strerror(rc ? rc : ML_ENOMEM));
        goto out;
    }
    for (size_t i = 0; i < k.n; i++) {
        /* Being replayed or purged by another request: no longer a dead
         * letter for anyone who asks now. */
        if (ml_ops_dlq_busy(b, k.items[i].seq))
            continue;
        s_dead_info(&k.items[i], &items[n]);
        ptrs[n] = &items[n];
        n++;
    }
    if (with_envelope && n == 0) {
        s_fail(b, to, rq, "no dead letter %s (it is being replayed or purged)", rq->message_id);
        goto out;
    }
    if (with_envelope && ml_query_fetch(b, k.items[0].seq, &blob, &blen) == 0) {
        /* The stored envelope is patient data: only an OPS node gets here
         * (ml_bk_admin), and who read which message is logged and kept in
         * the case's timeline; the content itself never is. */
        items[0].envelope.data = blob;
        items[0].envelope.len = blen;
        const ml_store_dead_t *d = &k.items[0];
        ml_log(ML_LOG_WARN, "admin",
               "%s read the stored envelope of dead letter %s (%s of case %s for %s, %zu bytes)",
               to->who, d->id, ml_kind_name(d->kind), d->case_id, d->recipient, blen);
        ml_ops_dead_letter_read(b, to->who, d);
    }
    Medlink__V1__AdminReply reply = MEDLINK__V1__ADMIN_REPLY__INIT;
    reply.n_dead_letter = n;
    reply.dead_letter = ptrs;
    s_answer(b, to, rq, &reply);
out:
    free(blob);
    free(items);
    free(ptrs);
    ml_query_deads_free(&k);
}

/* A replay or purge waiting for the store: the session is found again by
 * its serial, since it may have closed (or its slot been reused)
 * meanwhile. */
typedef struct {
    ml_broker_t *b;
    uint64_t serial;
    char *request_id; /* echoed in the reply */
} s_dlq_wait_t;

/* The store has tried the dead letters' changes (ml_ops_dlq_change): the
 * answer goes out now; r NULL when the broker closes first. */
static void s_dlq_done(void *arg, const ml_ops_dlq_result_t *r)
{
    s_dlq_wait_t *w = arg;
    ml_broker_t *b = w->b;
    ml_session_t *s = r ? ml_query_session_find(b, w->serial) : NULL;
    if (s) {
        Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
        rq.request_id = w->request_id;
        char note[600];
        const char *error = r->error;
        if (r->rc != 0) {
            /* The mark is retried by the store until it commits. */
            snprintf(note, sizeof note,
                     "%s%sthe store could not commit it yet (%s): it is retried until it does",
                     error ? error : "", error ? "; " : "", ml_strerror(r->rc));
            error = note;
        }
        if (r->failed_all) {
            s_error(b, s, &rq, "%s", error ? error : "not done");
        } else {
            Medlink__V1__AdminReply reply = MEDLINK__V1__ADMIN_REPLY__INIT;
            reply.affected = r->affected;
            if (error)
                reply.error = (char *)error;
            s_send(b, s, &rq, &reply);
        }
    }
    free(w->request_id);
    free(w);
}

static void s_dlq_change(ml_broker_t *b, ml_session_t *s, const Medlink__V1__AdminRequest *rq,
                         int replay)
{
    if (!rq->all && !(rq->message_id && *rq->message_id)) {
        s_error(b, s, rq, "dlq %s needs a message id or --all", replay ? "replay" : "purge");
        return;
    }
    s_dlq_wait_t *w = calloc(1, sizeof *w);
    char *request_id = strdup(rq->request_id ? rq->request_id : "");
    if (!w || !request_id) {
        free(w);
        free(request_id);
        s_error(b, s, rq, "out of memory");
        return;
    }
    ml_query_session_t v;
    ml_query_session(b, s, &v);
    w->b = b;
    w->serial = v.serial;
    w->request_id = request_id;
    char err[512] = "";
    if (ml_ops_dlq_change(b, v.node_id, rq->message_id, rq->all, replay, err, sizeof err,
                          s_dlq_done, w) != 0) {
        s_error(b, s, rq, "%s", err);
        free(w->request_id);
        free(w);
    }
}

/* ---- store retention (OP_STORE_STATS, OP_STORE_PRUNE) ------------------- */

static void s_prune_info(const ml_store_pruned_t *r, Medlink__V1__StorePrune *p)
{
    p->messages = r->messages;
    p->bodies = r->bodies;
    p->chunk_bodies = r->chunk_bodies;
    p->payload_bytes = r->payload_bytes;
    p->cases = r->cases;
    p->events = r->events;
    p->pages_vacuumed = r->pages_vacuumed;
    p->bytes_freed = r->bytes_freed;
    p->free_pages = r->free_pages;
    p->started_at = r->started_at;
    p->took_ms = r->took_ms;
}

/* Sizes and rows of broker.db. The counts read every table once, on the
 * loop thread: a few tens of ms for a million rows, which is why this is
 * an ops command and not part of status. */
static void s_store_stats(ml_broker_t *b, ml_session_t *s, const Medlink__V1__AdminRequest *rq)
{
    ml_store_info_t in;
    int rc = ml_query_store_info(b, &in);
    if (rc != 0) {
        s_error(b, s, rq, "cannot read the store: %s", ml_strerror(rc));
        return;
    }
    static const char *const msg_states[] = {"queued", "delivered", "dead"};
    Medlink__V1__StoreTable t[8], *tp[8];
    size_t n = 0;
    for (int i = 0; i < 3; i++, n++) {
        medlink__v1__store_table__init(&t[n]);
        t[n].table = "messages";
        t[n].state = (char *)msg_states[i];
        t[n].rows = in.msg_rows[i];
        t[n].oldest_at = in.msg_oldest[i];
    }
    struct {
        const char *table, *state;
        uint64_t rows;
        int64_t oldest;
    } more[] = {{"bodies", "", in.body_rows, in.body_oldest},
                {"cases", "open", in.open_cases, in.open_oldest},
                {"cases", "final", in.final_cases, in.final_oldest},
                {"case_events", "", in.event_rows, in.event_oldest}};
    for (size_t i = 0; i < sizeof more / sizeof more[0]; i++, n++) {
        medlink__v1__store_table__init(&t[n]);
        t[n].table = (char *)more[i].table;
        t[n].state = (char *)more[i].state;
        t[n].rows = more[i].rows;
        t[n].oldest_at = more[i].oldest;
    }
    for (size_t i = 0; i < n; i++)
        tp[i] = &t[i];
    Medlink__V1__StorePrune last = MEDLINK__V1__STORE_PRUNE__INIT;
    s_prune_info(&in.last, &last);
    Medlink__V1__StoreStats st = MEDLINK__V1__STORE_STATS__INIT;
    st.file_bytes = in.file_bytes;
    st.wal_bytes = in.wal_bytes;
    st.page_size = in.page_size;
    st.page_count = in.page_count;
    st.free_pages = in.free_pages;
    st.auto_vacuum = (char *)(in.auto_vacuum == 2   ? "incremental"
                              : in.auto_vacuum == 1 ? "full"
                                                    : "none");
    st.n_table = n;
    st.table = tp;
    ml_broker_config_retention(ml_query_config(b), &st.retention_ms, &st.timeline_retention_ms);
    st.last_prune = &last;
    Medlink__V1__AdminReply reply = MEDLINK__V1__ADMIN_REPLY__INIT;
    reply.store_stats = &st;
    s_send(b, s, rq, &reply);
}

/* A store prune waiting for its run: the session is found again by its
 * serial, since it may have closed (or its slot been reused) meanwhile. */
typedef struct {
    ml_broker_t *b;
    uint64_t serial;
    char who[256];
    char request_id[160]; /* echoed in the reply */
} s_prune_wait_t;

static void s_store_pruned_cb(void *arg, int rc, const ml_store_pruned_t *r)
{
    s_prune_wait_t *w = arg;
    if (rc == ML_ECLOSED) {
        free(w); /* the store is closing with the broker: nobody to answer */
        return;
    }
    ml_broker_t *b = w->b;
    ml_log(ML_LOG_INFO, "admin",
           "store prune for %s: %llu message(s), %llu body(ies), %llu case(s) removed, %llu "
           "bytes freed%s%s",
           w->who, (unsigned long long)r->messages, (unsigned long long)r->bodies,
           (unsigned long long)r->cases, (unsigned long long)r->bytes_freed, rc ? ": " : "",
           rc ? ml_strerror(rc) : "");
    ml_session_t *s = ml_query_session_find(b, w->serial);
    Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
    rq.request_id = w->request_id;
    if (!s)
        goto out;
    if (rc != 0) {
        s_error(b, s, &rq, "store prune failed after removing part: %s", ml_strerror(rc));
        goto out;
    }
    Medlink__V1__StorePrune p = MEDLINK__V1__STORE_PRUNE__INIT;
    s_prune_info(r, &p);
    Medlink__V1__AdminReply reply = MEDLINK__V1__ADMIN_REPLY__INIT;
    reply.store_prune = &p;
    s_send(b, s, &rq, &reply);
out:
    free(w);
}

/* Runs retention now. The store does it in its usual bounded steps between
 * groups, so the answer comes when the run is over, not at once. */
static void s_store_prune(ml_broker_t *b, ml_session_t *s, const Medlink__V1__AdminRequest *rq)
{
    s_prune_wait_t *w = calloc(1, sizeof *w);
    if (!w) {
        s_error(b, s, rq, "out of memory");
        return;
    }
    ml_query_session_t v;
    ml_query_session(b, s, &v);
    w->b = b;
    w->serial = v.serial;
    snprintf(w->who, sizeof w->who, "%s", v.node_id);
    snprintf(w->request_id, sizeof w->request_id, "%s", rq->request_id ? rq->request_id : "");
    int rc = ml_ops_store_prune(b, s_store_pruned_cb, w);
    if (rc != 0) {
        free(w);
        s_error(b, s, rq, "cannot run retention: %s", ml_strerror(rc));
    }
}

/* A request id as it may appear in the log: it comes from the peer, so one
 * with characters outside a plain id's (a newline would forge a log line) or
 * longer than a ULID's few times is shown as "(not shown)"; the reply still
 * echoes it as sent. */
static const char *s_log_id(const char *id)
{
    if (!id || !*id)
        return "-";
    size_t n = strspn(id, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-");
    return id[n] == '\0' && n <= 128 ? id : "(not shown)";
}

void ml_bk_admin(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env)
{
    ml_query_session_t v;
    ml_query_session(b, s, &v);
    const char *peer = v.node_id;
    if (v.role != ML_ROLE_OPS) {
        char err[256];
        snprintf(err, sizeof err, "admin requests need an OPS node; %s has role %s", peer,
                 ml_role_name(v.role));
        ml_ops_refuse(b, s, env->id, MEDLINK__V1__NACK_CODE__NACK_FORBIDDEN, err);
        return;
    }
    const Medlink__V1__AdminRequest *rq = env->admin_request;
    const ProtobufCEnumValue *op =
        protobuf_c_enum_descriptor_get_value(&medlink__v1__admin_request__op__descriptor, rq->op);
    ml_log(ML_LOG_INFO, "admin", "%s asked for %s (request %s)%s%s", peer, op ? op->name : "?",
           s_log_id(rq->request_id), rq->case_id && *rq->case_id ? " " : "",
           rq->case_id && *rq->case_id ? rq->case_id
                                       : (rq->message_id && *rq->message_id ? rq->message_id : ""));
    s_to_t to = {.s = s, .who = peer};
    switch (rq->op) {
    case MEDLINK__V1__ADMIN_REQUEST__OP__OP_STATUS:
        s_admin_status(b, &to, rq);
        break;
    case MEDLINK__V1__ADMIN_REQUEST__OP__OP_CASE_SHOW:
        s_case_show(b, &to, rq);
        break;
    case MEDLINK__V1__ADMIN_REQUEST__OP__OP_CASES:
        s_cases(b, &to, rq);
        break;
    case MEDLINK__V1__ADMIN_REQUEST__OP__OP_DLQ_LIST:
        s_dlq_list(b, &to, rq, 0);
        break;
    case MEDLINK__V1__ADMIN_REQUEST__OP__OP_DLQ_SHOW:
        s_dlq_list(b, &to, rq, 1);
        break;
    case MEDLINK__V1__ADMIN_REQUEST__OP__OP_DLQ_REPLAY:
        s_dlq_change(b, s, rq, 1);
        break;
    case MEDLINK__V1__ADMIN_REQUEST__OP__OP_DLQ_PURGE:
        s_dlq_change(b, s, rq, 0);
        break;
    case MEDLINK__V1__ADMIN_REQUEST__OP__OP_STORE_STATS:
        s_store_stats(b, s, rq);
        break;
    case MEDLINK__V1__ADMIN_REQUEST__OP__OP_STORE_PRUNE:
        s_store_prune(b, s, rq);
        break;
    default:
        s_error(b, s, rq, "unknown admin operation %d", (int)rq->op);
    }
}

/* ---- /api/v1 (http.h) --------------------------------------------------- */

/* A query parameter into buf; 0 when absent, -1 after answering 400. */
static int s_param(const ml_http_req_t *rq, ml_http_resp_t *resp, const char *name, char *buf,
                   size_t len)
{
    int rc = ml_http_query_get(rq->query, name, buf, len);
    if (rc < 0) {
        ml_http_error(resp, 400, "query parameter %s: malformed or longer than %zu bytes", name,
                      len - 1);
        return -1;
    }
    if (rc == 0)
        buf[0] = '\0';
    return rc;
}

/* "1", "true", "yes" (and nothing else) are true. */
static int s_truthy(const char *v)
{
    return strcmp(v, "1") == 0 || strcmp(v, "true") == 0 || strcmp(v, "yes") == 0;
}

int ml_bk_api(ml_broker_t *b, const ml_http_req_t *rq, ml_http_resp_t *resp)
{
    static const char pre[] = "/api/v1/";
    if (strncmp(rq->path, pre, sizeof pre - 1) != 0)
        return 1;
    const char *what = rq->path + sizeof pre - 1;
    char who[300];
    snprintf(who, sizeof who, "%s", rq->peer && *rq->peer ? rq->peer : "http");
    s_to_t to = {.http = resp, .who = who};
    Medlink__V1__AdminRequest q = MEDLINK__V1__ADMIN_REQUEST__INIT;
    char state[64], kind[32], overdue[8], limit[16], case_id[ML_TEXT_ID_MAX + 1];
    if (strcmp(what, "status") == 0 || strcmp(what, "nodes") == 0) {
        to.json = what[0] == 's' ? ML_ADMIN_JSON_STATUS : ML_ADMIN_JSON_NODES;
        s_admin_status(b, &to, &q);
    } else if (strcmp(what, "cases") == 0) {
        if (s_param(rq, resp, "state", state, sizeof state) < 0 ||
            s_param(rq, resp, "kind", kind, sizeof kind) < 0 ||
            s_param(rq, resp, "overdue", overdue, sizeof overdue) < 0 ||
            s_param(rq, resp, "limit", limit, sizeof limit) < 0)
            return 0;
        q.state = state;
        q.case_kind = kind;
        q.overdue = s_truthy(overdue);
        if (*limit) {
            char *end;
            unsigned long n = strtoul(limit, &end, 10);
            if (*end || n == 0 || n > S_LIMIT_MAX) {
                ml_http_error(resp, 400, "limit: expected a number from 1 to %d", S_LIMIT_MAX);
                return 0;
            }
            q.limit = (uint32_t)n;
        }
        to.json = ML_ADMIN_JSON_CASES;
        s_cases(b, &to, &q);
    } else if (strncmp(what, "cases/", 6) == 0) {
        /* One case with its timeline: where it is and what happened,
         * never who it is about (CaseInfo has no patient data). */
        if (!ml_text_id_valid(what + 6, ML_TEXT_ID_MAX)) {
            ml_http_error(resp, 400, "not a case id");
            return 0;
        }
        snprintf(case_id, sizeof case_id, "%s", what + 6);
        q.case_id = case_id;
        to.json = ML_ADMIN_JSON_CASE;
        s_case_show(b, &to, &q);
    } else if (strcmp(what, "dlq") == 0) {
        if (s_param(rq, resp, "limit", limit, sizeof limit) < 0)
            return 0;
        if (*limit) {
            char *end;
            unsigned long n = strtoul(limit, &end, 10);
            if (*end || n == 0 || n > S_LIMIT_MAX) {
                ml_http_error(resp, 400, "limit: expected a number from 1 to %d", S_LIMIT_MAX);
                return 0;
            }
            q.limit = (uint32_t)n;
        }
        to.json = ML_ADMIN_JSON_DLQ;
        s_dlq_list(b, &to, &q, 0);
    } else {
        return 1;
    }
    ml_log(ML_LOG_DEBUG, "admin", "%s: GET %s -> %d", who, rq->path, resp->status);
    return 0;
}
