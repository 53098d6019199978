/* The flow timer: messages past their own deadline leave the queues,
 * deliveries whose case record failed are recorded again, and cases whose
 * deadline passed are escalated (one summary to ops when several miss in
 * one tick) and, for an unaccepted EMERGENCY referral, redirected to the
 * fallback hospital. Loop thread only. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker_int.h"
#include "case_engine.h"
#include "caseref.h"
#include "cases.h"
#include "deadlines.h"
#include "delivery.h"
#include "metrics.h"
#include "notices.h"
#include "submit.h"

#define K_(x) MEDLINK__V1__KIND__KIND_##x
#define NACK_(x) MEDLINK__V1__NACK_CODE__NACK_##x
#define REF_(x) MEDLINK__V1__REFERRAL_STATUS__REFERRAL_##x
#define IMG_(x) MEDLINK__V1__IMAGING_STATUS__IMAGING_##x
#define DT_(x) MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_##x

/* The cases whose deadline passed in one tick of the flow timer. When
 * there are several, the ops nodes get one summary Escalation ("N cases
 * overdue: ...", every case id in Escalation.case_ids) and the log one
 * line, instead of one of each per case: 2,000 cases that miss their
 * deadline together are one event for the IT desk, not 2,000 (F8). The
 * openers still hear of each of their own cases. */
typedef struct {
    const char **ids;     /* borrowed: the cases are held until the summary is sent */
    const char **targets; /* who missed each deadline (node ids, borrowed) */
    size_t n, cap;
} s_overdue_t;

static void s_overdue_add(s_overdue_t *o, const char *id, const char *target)
{
    if (o->n == o->cap) {
        size_t cap = o->cap ? o->cap * 2 : 64;
        const char **ids = realloc(o->ids, cap * sizeof *ids);
        if (ids)
            o->ids = ids;
        const char **tg = ids ? realloc(o->targets, cap * sizeof *tg) : NULL;
        if (tg)
            o->targets = tg;
        if (!ids || !tg)
            return; /* the case is still escalated to its opener, and counted below */
        o->cap = cap;
    }
    o->ids[o->n] = id;
    o->targets[o->n] = target;
    o->n++;
}

/* How many case ids a summary's detail sentence and log line name; the
 * Escalation's case_ids field names every one (up to S_SUMMARY_IDS_MAX). */
#define S_SUMMARY_NAMED 20
#define S_SUMMARY_IDS_MAX 10000

/* Sends the summary of o (n >= 1 cases, total of them overdue) to every
 * ops node, and logs it once. */
static void s_overdue_send(ml_broker_t *b, const s_overdue_t *o, size_t total)
{
    char detail[2048];
    size_t used = 0;
    int n = snprintf(detail, sizeof detail, "%zu cases overdue:", total);
    used = n > 0 ? (size_t)n : 0;
    for (size_t i = 0; i < o->n && i < S_SUMMARY_NAMED && used < sizeof detail; i++) {
        n = snprintf(detail + used, sizeof detail - used, "%s %s (%s)", i ? "," : "", o->ids[i],
                     o->targets[i] && *o->targets[i] ? o->targets[i] : "?");
        used += n > 0 ? (size_t)n : 0;
    }
    if (total > S_SUMMARY_NAMED && used < sizeof detail)
        snprintf(detail + used, sizeof detail - used, ", and %zu more", total - S_SUMMARY_NAMED);

    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    Medlink__V1__Escalation esc = MEDLINK__V1__ESCALATION__INIT;
    esc.reason = MEDLINK__V1__ESCALATION_REASON__ESCALATION_DEADLINE_MISSED;
    esc.case_id = id; /* names no case: the summary's own id */
    esc.detail = detail;
    esc.n_case_ids = o->n < S_SUMMARY_IDS_MAX ? o->n : S_SUMMARY_IDS_MAX;
    esc.case_ids = (char **)o->ids;
    int sent = 0;
    for (size_t i = 0; i < b->n_nodes; i++) {
        ml_nodestate_t *ns = b->nodes[i];
        if (ns->removed || !ml_notices_is_ops(b, ns))
            continue;
        ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
        env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ESCALATION;
        env.escalation = &esc;
        env.case_id = id;
        env.priority = MEDLINK__V1__PRIORITY__PRIORITY_URGENT;
        if (ml_notices_emit(b, &env, ns, NULL, NULL, 0) == 0)
            sent++;
    }
    ml_log(ML_LOG_WARN, "escalation", "%s (summary %s, told %d ops node(s))", detail, id, sent);
}

/* ------------------------------------------------------------------ */
/* Timers: deadlines and expiry                                        */

/* Escalates the deadline c missed (and, for an unaccepted EMERGENCY
 * referral, redirects it to the fallback hospital). With sum, the ops
 * nodes hear of it in the tick's summary instead of on their own. */
static void s_deadline_missed(ml_broker_t *b, ml_case_t *c, int64_t now, s_overdue_t *sum)
{
    const char *expected = ml_case_state_name(c->kind, c->deadline_state);
    ml_nodestate_t *opener = ml_delivery_node_at(b, c->opener);
    ml_nodestate_t *old_target = ml_delivery_node_at(b, c->target);
    ml_notices_about_t about = {.target = ml_delivery_node_name(b, c->target),
                                .deadline_at = c->deadline_at,
                                .no_ops = sum != NULL};
    if (sum)
        s_overdue_add(sum, c->id, about.target);
    char detail[600], when[32];
    snprintf(detail, sizeof detail, "%s case not %s by %s by its deadline %s (it is %s)",
             ml_priority_name(c->priority), expected, ml_delivery_node_name(b, c->target),
             ml_time_format(c->deadline_at, when, sizeof when),
             ml_case_state_name(c->kind, c->state));
    c->fired = 1;
    c->escalations++;
    c->updated_at = now;
    c->version++;
    ml_store_event_t ev[2] = {{
        .at = now,
        .node = b->cfg->broker_id,
        .event = "deadline missed",
        .from_state = ml_case_state_name(c->kind, c->state),
        .to_state = ml_case_state_name(c->kind, c->state),
        .detail = detail,
    }};
    size_t n_ev = 1;

    /* An EMERGENCY referral nobody accepted goes to the fallback hospital
     * of the referring clinic's community. */
    const char *fb_id = opener ? ml_broker_config_fallback(b->cfg, opener->node->community) : NULL;
    ml_nodestate_t *fb = fb_id ? ml_delivery_node(b, fb_id) : NULL;
    char redir[400] = "";
    int redirected = 0;
    if (c->kind == ML_CASE_REFERRAL && c->priority == MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY &&
        b->cfg->redirect_emergency && fb && fb != old_target && fb != opener &&
        ml_acl_allows(b->cfg, opener->node->role, K_(REFERRAL), fb->node->role) &&
        ml_case_check(c->kind, c->state, REF_(REDIRECTED), ML_PARTY_BROKER, NULL, 0) == 0) {
        int old = c->state;
        ml_caseref_count(b, c, -1);
        c->state = REF_(REDIRECTED);
        c->target = ml_delivery_node_index(b, fb);
        ml_caseref_count(b, c, +1);
        const ml_deadline_rule_t *r = ml_broker_config_deadline(b->cfg, c->kind, c->priority);
        c->deadline_at = r->set ? now + r->ms : 0;
        c->fired = 0;
        snprintf(redir, sizeof redir,
                 "not %s by %s in time: redirected by the broker to %s, the fallback hospital of "
                 "community %s",
                 expected, old_target ? old_target->node->id : "?", fb->node->id,
                 opener->node->community);
        ev[1] = (ml_store_event_t){
            .at = now,
            .node = b->cfg->broker_id,
            .event = ml_case_state_name(c->kind, c->state),
            .from_state = ml_case_state_name(c->kind, old),
            .to_state = ml_case_state_name(c->kind, c->state),
            .detail = redir,
        };
        n_ev = 2;
        redirected = 1;
    }
    ml_store_caseop_t op = {.events = ev, .n_events = n_ev};
    ml_caseref_row(b, c, &op.row);
    ml_notices_escalate(b, c, MEDLINK__V1__ESCALATION_REASON__ESCALATION_DEADLINE_MISSED,
                        redirected ? redir : detail, expected, NULL,
                        redirected ? fb->node->id : NULL, opener, &op, 1, &about);
    if (!redirected)
        return;
    ml_notices_forward_opening(b, c);
    /* The clinic learns where its patient goes; the first hospital learns
     * that the case is no longer its own. */
    ml_nodestate_t *tell[2] = {opener, old_target};
    for (size_t i = 0; i < 2; i++) {
        if (!tell[i])
            continue;
        Medlink__V1__ReferralUpdate u = MEDLINK__V1__REFERRAL_UPDATE__INIT;
        u.status = REF_(REDIRECTED);
        u.redirect_to = (char *)fb->node->id;
        u.reason = redir;
        ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
        env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL_UPDATE;
        env.referral_update = &u;
        env.case_id = c->id;
        env.priority = c->priority;
        ml_notices_emit(b, &env, tell[i], c, NULL, 0);
    }
}

typedef struct {
    ml_case_t **v;
    size_t n, cap;
} s_cases_t;

/* Appends c; out of memory, the next tick takes it. */
static void s_cases_push(s_cases_t *l, ml_case_t *c)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 16;
        ml_case_t **p = realloc(l->v, cap * sizeof *p);
        if (!p)
            return;
        l->v = p;
        l->cap = cap;
    }
    l->v[l->n++] = c;
}

typedef struct {
    s_cases_t due;
    s_cases_t redo; /* cases with deliveries to record again */
    int64_t now;
    uint64_t overdue; /* open cases past their deadline (medlink_cases_overdue) */
} s_due_t;

static void s_collect_due(ml_case_t *c, void *arg)
{
    s_due_t *d = arg;
    if (c->redo && !c->stale && !c->gone)
        s_cases_push(&d->redo, c);
    /* As the status counts them (admin.c): an overdue case has a deadline
     * running, so it is in memory, and this walk sees it. */
    if (!c->closed && !c->gone && c->deadline_at && c->deadline_at <= d->now)
        d->overdue++;
    /* A case being read back fires once it is in step again. */
    if (!(c->closed || c->gone || c->stale || !c->deadline_at || c->fired ||
          c->deadline_at > d->now))
        s_cases_push(&d->due, c);
}

typedef struct {
    ml_broker_t *b;
    ml_nodestate_t *ns;
    int64_t now;
} s_expire_t;

static int s_keep_unexpired(const ml_qitem_t *it, void *arg)
{
    const s_expire_t *x = arg;
    return !(it->deadline > 0 && it->deadline <= x->now);
}

static void s_expired_cb(ml_qitem_t *it, void *arg)
{
    s_expire_t *x = arg;
    ml_notices_dead_letter(x->b, x->ns, it, "expired: its deadline passed before it was delivered");
}

static void s_flow_timer_cb(uv_timer_t *t)
{
    ml_broker_t *b = t->data;
    int64_t now = ml_now_ms();
    if (b->retry_own)
        ml_submit_retry_own(b);
    /* Messages past their own deadline leave the queues of offline nodes
     * too (a connected node's queue is also checked as it is pumped). */
    for (size_t i = 0; i < b->n_nodes; i++) {
        s_expire_t x = {b, b->nodes[i], now};
        ml_queue_filter(&b->nodes[i]->queue, s_keep_unexpired, s_expired_cb, &x);
    }
    s_due_t d = {.now = now};
    ml_casetab_each(&b->cases, s_collect_due, &d);
    ml_bk_metrics_overdue(b, d.overdue);
    /* Every case collected is held until both lists are done: one list's
     * work must not free a case the other still names. */
    for (size_t i = 0; i < d.redo.n; i++)
        d.redo.v[i]->refs++;
    for (size_t i = 0; i < d.due.n; i++)
        d.due.v[i]->refs++;
    for (size_t i = 0; i < d.redo.n; i++)
        ml_notices_redo(b, d.redo.v[i]);
    /* Several deadlines in one tick: one summary to ops (s_overdue_t). */
    s_overdue_t sum = {0};
    for (size_t i = 0; i < d.due.n; i++)
        s_deadline_missed(b, d.due.v[i], now, d.due.n > 1 ? &sum : NULL);
    if (d.due.n > 1)
        s_overdue_send(b, &sum, d.due.n);
    free(sum.ids);
    free(sum.targets);
    for (size_t i = 0; i < d.redo.n; i++)
        ml_caseref_release(b, d.redo.v[i]);
    for (size_t i = 0; i < d.due.n; i++)
        ml_caseref_release(b, d.due.v[i]);
    free(d.redo.v);
    free(d.due.v);
}

void ml_deadlines_start(ml_broker_t *b)
{
    uv_timer_start(&b->flow_timer, s_flow_timer_cb, (uint64_t)b->cfg->timer_ms,
                   (uint64_t)b->cfg->timer_ms);
}
