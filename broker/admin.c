/* medlinkd's answers to medlinkctl: status (sessions, nodes, queues),
 * cases (one with its timeline, or a filtered list), and the dead-letter
 * queue (list, show, replay, purge). Only OPS nodes may ask. Reads come
 * from memory and from the store's committed rows; replay and purge are
 * queued to the store like every other write, in order with the
 * deliveries that follow them. Replies carry no patient data: ops staff see
 * where a case is and what failed, not who it is about. Loop thread only. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "alerts.h"
#include "broker_int.h"
#include "expiry.h"
#include "cases.h"
#include "http.h"
#include "ml_adminjson.h"
#include "ml_text.h"

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
    ml_bk_reply(b, to->s, &env);
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

/* The same for the operations only a session may ask for. */
static void s_send(ml_broker_t *b, ml_session_t *s, const Medlink__V1__AdminRequest *rq,
                   Medlink__V1__AdminReply *reply)
{
    s_to_t to = {.s = s, .who = s->peer_id};
    s_answer(b, &to, rq, reply);
}

static void s_error(ml_broker_t *b, ml_session_t *s, const Medlink__V1__AdminRequest *rq,
                    const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static void s_error(ml_broker_t *b, ml_session_t *s, const Medlink__V1__AdminRequest *rq,
                    const char *fmt, ...)
{
    s_to_t to = {.s = s, .who = s->peer_id};
    va_list ap;
    va_start(ap, fmt);
    s_vfail(b, &to, rq, fmt, ap);
    va_end(ap);
}

typedef struct {
    uint64_t overdue;
    int64_t now;
} s_counts_t;

static void s_count_one(ml_case_t *c, void *arg)
{
    s_counts_t *k = arg;
    if (c->closed || c->gone)
        return;
    if (c->deadline_at && c->deadline_at <= k->now)
        k->overdue++;
}

/* Open cases are counted by flow.c, in memory or not (most leave memory
 * while nobody works on them); an overdue case has a deadline running, so
 * it is always in memory and memory is walked for those. */
static void s_count_cases(ml_broker_t *b, uint64_t *open, uint64_t *overdue, int64_t now)
{
    s_counts_t k = {0, now};
    ml_casetab_each(&b->cases, s_count_one, &k);
    *open = b->open_total;
    *overdue = k.overdue;
}

static void s_admin_status(ml_broker_t *b, const s_to_t *to, const Medlink__V1__AdminRequest *rq)
{
    Medlink__V1__BrokerStatus st = MEDLINK__V1__BROKER_STATUS__INIT;
    Medlink__V1__AdminReply reply = MEDLINK__V1__ADMIN_REPLY__INIT;
    size_t n_sess = 0;
    for (ml_session_t *x = b->sessions; x; x = x->next)
        if (x->state == S_READY)
            n_sess++;
    Medlink__V1__SessionInfo *si = calloc(n_sess ? n_sess : 1, sizeof *si);
    Medlink__V1__SessionInfo **sip = calloc(n_sess ? n_sess : 1, sizeof *sip);
    Medlink__V1__NodeStatus *ni = calloc(b->n_nodes ? b->n_nodes : 1, sizeof *ni);
    Medlink__V1__NodeStatus **nip = calloc(b->n_nodes ? b->n_nodes : 1, sizeof *nip);
    if (!si || !sip || !ni || !nip)
        goto out;
    int64_t mono = ml_mono_ms(), now = ml_now_ms();
    size_t k = 0;
    for (ml_session_t *x = b->sessions; x; x = x->next) {
        if (x->state != S_READY)
            continue;
        medlink__v1__session_info__init(&si[k]);
        si[k].node_id = x->peer_id;
        si[k].peer = x->peer_hex;
        si[k].connected_at = now - (mono - x->created);
        si[k].last_seen = now - (mono - x->last_rx);
        si[k].in_flight = x->ns->deliver == x ? x->ns->n_inflight : 0;
        sip[k] = &si[k];
        k++;
    }
    size_t n_nodes = 0;
    for (size_t j = 0; j < b->n_nodes; j++) {
        ml_nodestate_t *ns = b->nodes[j];
        if (ns->removed)
            continue; /* taken out of the registry by a reload */
        size_t i = n_nodes++;
        medlink__v1__node_status__init(&ni[i]);
        ni[i].node_id = ns->node->id;
        ni[i].role = (char *)ml_role_name(ns->node->role);
        ni[i].community = ns->node->community ? ns->node->community : "";
        ni[i].display_name = ns->node->display_name ? ns->node->display_name : "";
        ni[i].online = ns->online > 0;
        ni[i].last_seen = ns->last_seen;
        ni[i].queue_depth = ml_queue_len(&ns->queue) + ns->n_inflight;
        int64_t oldest = ml_queue_oldest(&ns->queue);
        for (size_t f = ns->if_head; f < ns->if_head + ns->if_len; f++) {
            if (ns->inflight[f].acked)
                continue;
            int64_t t = ns->inflight[f].item.accepted_at;
            if (oldest == 0 || t < oldest)
                oldest = t;
        }
        ni[i].oldest_queued_at = oldest;
        ni[i].in_flight = ns->n_inflight;
        ni[i].delivered = ns->delivered;
        ni[i].open_cases_opened = ns->opened;
        ni[i].open_cases_limit = (uint64_t)b->cfg->open_cases_per_node;
        nip[i] = &ni[i];
    }
    st.broker = b->cfg->broker_id;
    st.started_at = b->started_at;
    st.now = now;
    st.sessions = n_sess;
    st.accepted_total = b->accepted_total;
    st.delivered_total = b->delivered_total;
    st.refused_total = b->refused_total;
    s_count_cases(b, &st.open_cases, &st.overdue_cases, now);
    st.cases_in_memory = b->cases.count;
    int64_t dead = 0;
    if (ml_store_dead_count(b->store, &dead) == 0)
        st.dead_letters = (uint64_t)dead;
    st.n_session = n_sess;
    st.session = sip;
    st.n_node = n_nodes;
    st.node = nip;
    /* The clock: what expires, and whether it is inside crl_warn_days. */
    ml_bk_expiry_t ex[16];
    Medlink__V1__Expiry ei[16], *eip[16];
    size_t n_ex = ml_bk_expiry_list(b->tls, b->cfg->crl_warn_days, now, ex, 16);
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
    free(si);
    free(sip);
    free(ni);
    free(nip);
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
    /* Memory first: it has the changes still being committed. */
    ml_case_t *c = ml_casetab_find(&b->cases, rq->case_id);
    if (c && !c->gone) {
        ml_store_case_t row;
        ml_bk_case_row(b, c, &row);
        s_case_cb(&k, &row);
    } else if (ml_store_case_get(b->store, rq->case_id, s_case_cb, &k) == ML_ENOTFOUND) {
        s_fail(b, to, rq, "no case %s", rq->case_id);
        return;
    }
    if (k.failed || k.n != 1) {
        s_fail(b, to, rq, "cannot read case %s", rq->case_id);
        goto out;
    }
    if (ml_store_case_events(b->store, rq->case_id, s_event_cb, k.list[0]) != 0) {
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
    int rc =
        ml_store_cases_query(b->store, kind, state, rq->overdue ? k.now : 0, limit, s_case_cb, &k);
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

typedef struct {
    ml_store_dead_t d;
    char *id, *case_id, *sender, *recipient, *reason;
} s_dead_copy_t;

typedef struct {
    s_dead_copy_t *list;
    size_t n, cap;
    int failed;
} s_deads_t;

static void s_dead_cb(void *arg, const ml_store_dead_t *d)
{
    s_deads_t *k = arg;
    if (k->n == k->cap) {
        size_t cap = k->cap ? k->cap * 2 : 16;
        s_dead_copy_t *p = realloc(k->list, cap * sizeof *p);
        if (!p) {
            k->failed = 1;
            return;
        }
        k->list = p;
        k->cap = cap;
    }
    s_dead_copy_t *x = &k->list[k->n++];
    x->d = *d;
    x->d.id = x->id = s_dup(d->id);
    x->d.case_id = x->case_id = s_dup(d->case_id);
    x->d.sender = x->sender = s_dup(d->sender);
    x->d.recipient = x->recipient = s_dup(d->recipient);
    x->d.reason = x->reason = s_dup(d->reason);
}

static void s_deads_free(s_deads_t *k)
{
    for (size_t i = 0; i < k->n; i++) {
        free(k->list[i].id);
        free(k->list[i].case_id);
        free(k->list[i].sender);
        free(k->list[i].recipient);
        free(k->list[i].reason);
    }
    free(k->list);
}

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

/* A replay or purge whose store change is queued but not yet committed:
 * the reply waits for it (ml_store_barrier), so that once medlinkctl has
 * its answer, a list or a second request sees the change; and while it
 * waits, the dead letters it names are "busy": a purge of a message being
 * replayed (or the reverse) is refused with a reason instead of being
 * answered as done and then matching no row. */
struct ml_dlq_wait {
    struct ml_dlq_wait *next;
    ml_broker_t *b;
    uint64_t serial; /* of the session that asked (it may close meanwhile) */
    char *request_id;
    char *error; /* --all: the last one that could not be done; or NULL */
    uint32_t affected;
    int failed_all; /* a single message that could not be done: an error reply */
    int64_t *seqs;  /* the dead letters it changes */
    size_t n_seqs;
};

static int s_dlq_busy(const ml_broker_t *b, int64_t seq)
{
    for (const struct ml_dlq_wait *w = b->dlq_waits; w; w = w->next)
        for (size_t i = 0; i < w->n_seqs; i++)
            if (w->seqs[i] == seq)
                return 1;
    return 0;
}

static void s_dlq_wait_free(struct ml_dlq_wait *w)
{
    if (!w)
        return;
    free(w->request_id);
    free(w->error);
    free(w->seqs);
    free(w);
}

void ml_bk_admin_free(ml_broker_t *b)
{
    while (b->dlq_waits) {
        struct ml_dlq_wait *w = b->dlq_waits;
        b->dlq_waits = w->next;
        s_dlq_wait_free(w);
    }
}

static void s_dlq_list(ml_broker_t *b, const s_to_t *to, const Medlink__V1__AdminRequest *rq,
                       int with_envelope)
{
    s_deads_t k = {0};
    int rc;
    if (with_envelope) {
        if (!rq->message_id || !*rq->message_id) {
            s_fail(b, to, rq, "dlq show needs a message id");
            return;
        }
        rc = ml_store_dead_get(b->store, rq->message_id, s_dead_cb, &k);
        if (rc == ML_ENOTFOUND) {
            s_fail(b, to, rq, "no dead letter %s", rq->message_id);
            return;
        }
    } else {
        rc = ml_store_dead_list(b->store, s_limit(rq), s_dead_cb, &k);
    }
    Medlink__V1__DeadLetter *items = calloc(k.n ? k.n : 1, sizeof *items);
    Medlink__V1__DeadLetter **ptrs = calloc(k.n ? k.n : 1, sizeof *ptrs);
    uint8_t *blob = NULL;
    size_t blen = 0, n = 0;
    if (rc != 0 || k.failed || !items || !ptrs) {
        s_fail(b, to, rq, "cannot read the dead-letter queue: %s",
               ml_strerror(rc ? rc : ML_ENOMEM));
        goto out;
    }
    for (size_t i = 0; i < k.n; i++) {
        /* Being replayed or purged by another request: no longer a dead
         * letter for anyone who asks now. */
        if (s_dlq_busy(b, k.list[i].d.seq))
            continue;
        s_dead_info(&k.list[i].d, &items[n]);
        ptrs[n] = &items[n];
        n++;
    }
    if (with_envelope && n == 0) {
        s_fail(b, to, rq, "no dead letter %s (it is being replayed or purged)", rq->message_id);
        goto out;
    }
    if (with_envelope && ml_store_fetch(b->store, k.list[0].d.seq, &blob, &blen) == 0) {
        /* The stored envelope is patient data: only an OPS node gets here
         * (ml_bk_admin), and who read which message is logged and kept in
         * the case's timeline; the content itself never is. */
        items[0].envelope.data = blob;
        items[0].envelope.len = blen;
        const ml_store_dead_t *d = &k.list[0].d;
        ml_log(ML_LOG_WARN, "admin",
               "%s read the stored envelope of dead letter %s (%s of case %s for %s, %zu bytes)",
               to->who, d->id, ml_kind_name(d->kind), d->case_id, d->recipient, blen);
        ml_case_t *c = ml_bk_case_for_row(b, d->case_id, d->kind);
        if (c) {
            char detail[300];
            snprintf(detail, sizeof detail,
                     "%s read the stored envelope of dead letter %s (%s) with medlinkctl dlq show",
                     to->who, d->id, ml_kind_name(d->kind));
            ml_bk_case_event(b, c, to->who, "dead letter read", d->id, d->kind, detail);
            ml_bk_case_release(b, c);
        }
    }
    Medlink__V1__AdminReply reply = MEDLINK__V1__ADMIN_REPLY__INIT;
    reply.n_dead_letter = n;
    reply.dead_letter = ptrs;
    s_answer(b, to, rq, &reply);
out:
    free(blob);
    free(items);
    free(ptrs);
    s_deads_free(&k);
}

/* Replays or purges one dead letter (queued to the store in order).
 * Returns 0, or an error sentence in err. */
static int s_dlq_apply(ml_broker_t *b, ml_session_t *s, const ml_store_dead_t *d, int replay,
                       char *err, size_t errlen)
{
    if (s_dlq_busy(b, d->seq)) {
        snprintf(err, errlen,
                 "not %s: dead letter %s is being replayed or purged by an earlier request",
                 replay ? "replayed" : "purged", d->id);
        return ML_EAGAIN;
    }
    if (!replay) {
        if (ml_store_purge(b->store, d->seq) != 0) {
            snprintf(err, errlen, "cannot purge %s: the store is closing", d->id);
            return ML_ESTORE;
        }
        ml_log(ML_LOG_INFO, "admin", "%s purged dead letter %s (%s for %s)", s->peer_id, d->id,
               ml_kind_name(d->kind), d->recipient);
        return 0;
    }
    ml_nodestate_t *ns = ml_bk_node(b, d->recipient);
    if (!ns) {
        snprintf(err, errlen,
                 "cannot replay %s: its recipient %s is not in the node registry; register it "
                 "first",
                 d->id, d->recipient);
        return ML_ENOTFOUND;
    }
    if (ml_store_replay(b->store, d->seq) != 0) {
        snprintf(err, errlen, "cannot replay %s: the store is closing", d->id);
        return ML_ESTORE;
    }
    ml_qitem_t it;
    memset(&it, 0, sizeof it);
    it.seq = d->seq;
    it.accepted_at = ml_now_ms();
    it.size = (uint32_t)d->size;
    it.priority = (uint8_t)d->priority;
    it.kind = (uint8_t)d->kind;
    it.flags = strcmp(d->sender, b->cfg->broker_id) == 0 ? ML_QI_NOTICE : 0;
    snprintf(it.id, sizeof it.id, "%s", d->id);
    it.cs = ml_bk_case_for_row(b, d->case_id, d->kind);
    if (it.cs) {
        char detail[300];
        snprintf(detail, sizeof detail, "%s %s replayed from the dead-letter queue by %s",
                 ml_kind_name(d->kind), d->id, s->peer_id);
        ml_bk_case_event(b, it.cs, s->peer_id, "replayed", d->id, d->kind, detail);
    }
    if (ml_queue_push(&ns->queue, &it) != 0) {
        ml_bk_case_release(b, it.cs);
        snprintf(err, errlen, "out of memory queueing %s; it is delivered after a restart", d->id);
        return ML_ENOMEM;
    }
    ml_log(ML_LOG_INFO, "admin", "%s replayed dead letter %s (%s for %s)", s->peer_id, d->id,
           ml_kind_name(d->kind), d->recipient);
    ml_bk_pump(b, ns);
    return 0;
}

/* The store has tried everything queued before the barrier, the dead
 * letters' changes among them: the answer goes out now. */
static void s_dlq_done(void *arg, int rc, int64_t seq, int duplicate)
{
    struct ml_dlq_wait *w = arg;
    ml_broker_t *b = w->b;
    (void)seq;
    (void)duplicate;
    for (struct ml_dlq_wait **pp = &b->dlq_waits; *pp; pp = &(*pp)->next)
        if (*pp == w) {
            *pp = w->next;
            break;
        }
    ml_session_t *s = b->sessions;
    while (s && !(s->serial == w->serial && s->state == S_READY))
        s = s->next;
    if (s) {
        Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
        rq.request_id = w->request_id;
        char note[600];
        const char *error = w->error;
        if (rc != 0) {
            /* The mark is retried by the store until it commits. */
            snprintf(note, sizeof note,
                     "%s%sthe store could not commit it yet (%s): it is retried until it does",
                     error ? error : "", error ? "; " : "", ml_strerror(rc));
            error = note;
        }
        if (w->failed_all) {
            s_error(b, s, &rq, "%s", error ? error : "not done");
        } else {
            Medlink__V1__AdminReply reply = MEDLINK__V1__ADMIN_REPLY__INIT;
            reply.affected = w->affected;
            if (error)
                reply.error = (char *)error;
            s_send(b, s, &rq, &reply);
        }
    }
    s_dlq_wait_free(w);
}

/* Why a message that is not (or no longer) a dead letter cannot be
 * replayed or purged, in err. */
static void s_not_dead(ml_broker_t *b, const char *id, int replay, char *err, size_t errlen)
{
    int state = -1;
    int64_t seq = 0;
    const char *verb = replay ? "replayed" : "purged";
    if (ml_store_lookup(b->store, id, &seq, &state) != 0)
        snprintf(err, errlen, "no dead letter %s (no message has this id)", id);
    else if (state == ML_MSG_DELIVERED)
        snprintf(err, errlen,
                 "not %s: %s is not a dead letter; it was replayed and has been delivered", verb,
                 id);
    else if (state == ML_MSG_QUEUED)
        snprintf(err, errlen,
                 "not %s: %s is not a dead letter; it was replayed and is queued for delivery",
                 verb, id);
    else
        snprintf(err, errlen, "no dead letter %s", id);
}

static void s_dlq_change(ml_broker_t *b, ml_session_t *s, const Medlink__V1__AdminRequest *rq,
                         int replay)
{
    s_deads_t k = {0};
    int rc;
    char err[512] = "";
    if (rq->all)
        rc = ml_store_dead_list(b->store, -1, s_dead_cb, &k);
    else if (rq->message_id && *rq->message_id)
        rc = ml_store_dead_get(b->store, rq->message_id, s_dead_cb, &k);
    else {
        s_error(b, s, rq, "dlq %s needs a message id or --all", replay ? "replay" : "purge");
        return;
    }
    if (rc == ML_ENOTFOUND) {
        /* Said plainly, with affected = 0: a purge that finds a message
         * replayed meanwhile did not purge it. */
        s_not_dead(b, rq->message_id, replay, err, sizeof err);
        s_error(b, s, rq, "%s", err);
        return;
    }
    if (rc != 0 || k.failed) {
        s_error(b, s, rq, "cannot read the dead-letter queue: %s",
                ml_strerror(rc ? rc : ML_ENOMEM));
        s_deads_free(&k);
        return;
    }
    struct ml_dlq_wait *w = calloc(1, sizeof *w);
    int64_t *seqs = calloc(k.n ? k.n : 1, sizeof *seqs);
    char *request_id = strdup(rq->request_id ? rq->request_id : "");
    if (!w || !seqs || !request_id) {
        free(w);
        free(seqs);
        free(request_id);
        s_error(b, s, rq, "out of memory");
        s_deads_free(&k);
        return;
    }
    uint32_t done = 0;
    for (size_t i = 0; i < k.n; i++) {
        if (s_dlq_apply(b, s, &k.list[i].d, replay, err, sizeof err) == 0) {
            done++;
            seqs[w->n_seqs++] = k.list[i].d.seq;
        } else if (!rq->all) {
            break;
        }
    }
    w->b = b;
    w->serial = s->serial;
    w->request_id = request_id;
    w->seqs = seqs;
    w->affected = done;
    w->failed_all = !rq->all && done == 0;
    w->error = err[0] ? strdup(err) : NULL;
    w->next = b->dlq_waits;
    b->dlq_waits = w;
    if (w->n_seqs == 0 || ml_store_barrier(b->store, s_dlq_done, w) != 0) {
        /* Nothing queued, or a store that is closing: answer now. */
        w->n_seqs = 0;
        s_dlq_done(w, 0, 0, 0);
    }
    s_deads_free(&k);
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
    int rc = ml_store_info(b->store, &in);
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
    ml_broker_config_retention(b->cfg, &st.retention_ms, &st.timeline_retention_ms);
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
    ml_session_t *s = b->sessions;
    while (s && !(s->serial == w->serial && s->state == S_READY))
        s = s->next;
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
    w->b = b;
    w->serial = s->serial;
    snprintf(w->who, sizeof w->who, "%s", s->peer_id);
    snprintf(w->request_id, sizeof w->request_id, "%s", rq->request_id ? rq->request_id : "");
    int rc = ml_store_prune(b->store, s_store_pruned_cb, w);
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
    if (s->ns->node->role != ML_ROLE_OPS) {
        char err[256];
        snprintf(err, sizeof err, "admin requests need an OPS node; %s has role %s", s->peer_id,
                 ml_role_name(s->ns->node->role));
        ml_bk_refuse(b, s, env->id, MEDLINK__V1__NACK_CODE__NACK_FORBIDDEN, err);
        return;
    }
    const Medlink__V1__AdminRequest *rq = env->admin_request;
    const ProtobufCEnumValue *op =
        protobuf_c_enum_descriptor_get_value(&medlink__v1__admin_request__op__descriptor, rq->op);
    ml_log(ML_LOG_INFO, "admin", "%s asked for %s (request %s)%s%s", s->peer_id,
           op ? op->name : "?", s_log_id(rq->request_id), rq->case_id && *rq->case_id ? " " : "",
           rq->case_id && *rq->case_id ? rq->case_id
                                       : (rq->message_id && *rq->message_id ? rq->message_id : ""));
    s_to_t to = {.s = s, .who = s->peer_id};
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
