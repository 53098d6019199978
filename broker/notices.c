/* The broker's own envelopes: notices (DELIVERED, ASSIGNED,
 * RE_REFERRED), forwarded referrals, escalations and dead letters, and the
 * case changes the broker makes by itself when a delivery is acknowledged.
 * Each is built here and handed to submit; the case change is stored as a
 * separate request (caseref.c), so that a store refusing the message only
 * delays it (ml_submit_retry_own). Loop thread only. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker_int.h"
#include "case_engine.h"
#include "caseref.h"
#include "cases.h"
#include "delivery.h"
#include "metrics.h"
#include "notices.h"
#include "submit.h"

int ml_notices_emit(ml_broker_t *b, ml_envelope_t *env, ml_nodestate_t *recipient, ml_case_t *cs,
                    const ml_store_caseop_t *ops, size_t n_ops)
{
    char id[ML_ULID_LEN + 1];
    if (!env->id || !*env->id) {
        ml_ulid_new(id);
        env->id = id;
    }
    if (!env->from || !*env->from)
        env->from = b->cfg->broker_id;
    env->to = (char *)recipient->node->id;
    env->created_at = ml_now_ms();
    env->kind = ml_env_kind_of_payload(env->payload_case);
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc = ml_env_pack(env, &buf, &len);
    if (rc == 0) {
        ml_bk_msg_t m = {
            .recipient = recipient,
            .id = env->id,
            .case_id = env->case_id,
            .sender = env->from,
            .kind = env->kind,
            .priority = env->priority,
            .created_at = env->created_at,
            .deadline = env->deadline,
            .rec = buf,
            .len = len,
            .ops = ops,
            .n_ops = n_ops,
            .cs = cs,
            .notice = strcmp(env->from, b->cfg->broker_id) == 0,
            .fresh = 1,
        };
        rc = ml_submit_put(b, &m);
    }
    free(buf);
    if (rc != 0)
        ml_log(ML_LOG_ERROR, "router", "cannot send %s %s to %s: %s", ml_kind_name(env->kind),
               env->id, recipient->node->id, ml_strerror(rc));
    return rc;
}

#define K_(x) MEDLINK__V1__KIND__KIND_##x
#define NACK_(x) MEDLINK__V1__NACK_CODE__NACK_##x
#define REF_(x) MEDLINK__V1__REFERRAL_STATUS__REFERRAL_##x
#define IMG_(x) MEDLINK__V1__IMAGING_STATUS__IMAGING_##x
#define DT_(x) MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_##x

int ml_notices_is_ops(ml_broker_t *b, const ml_nodestate_t *ns)
{
    if (b->cfg->n_escalate_to == 0)
        return ns->node->role == ML_ROLE_OPS;
    for (size_t i = 0; i < b->cfg->n_escalate_to; i++)
        if (strcmp(b->cfg->escalate_to[i], ns->node->id) == 0)
            return 1;
    return 0;
}

/* Sends an Escalation to the ops nodes and to also_to (when not one of
 * them), after queueing ops (the case change that goes with it). The
 * change and the messages are separate store requests: the messages carry
 * no change, so that a store refusing them (a full disk) only delays them
 * (ml_submit_retry_own), and a change that fails is read back from the store
 * and made again (a deadline fires again). about may be NULL. */
void ml_notices_escalate(ml_broker_t *b, ml_case_t *c, int reason, const char *detail,
                         const char *expected, const char *message_id, const char *redirected_to,
                         ml_nodestate_t *also_to, const ml_store_caseop_t *ops, size_t n_ops,
                         const ml_notices_about_t *about)
{
    Medlink__V1__Escalation esc = MEDLINK__V1__ESCALATION__INIT;
    esc.reason = reason;
    esc.case_id = c ? c->id : (char *)"";
    esc.case_kind = c ? c->kind : 0;
    esc.state = c ? (char *)ml_case_state_name(c->kind, c->state) : (char *)"";
    esc.expected_state = (char *)(expected ? expected : "");
    esc.deadline_at = about ? about->deadline_at : c ? c->deadline_at : 0;
    esc.target = about && about->target ? (char *)about->target
                 : c                    ? (char *)ml_delivery_node_name(b, c->target)
                                        : (char *)"";
    esc.redirected_to = (char *)(redirected_to ? redirected_to : "");
    esc.message_id = (char *)(message_id ? message_id : "");
    esc.detail = (char *)(detail ? detail : "");
    int sent = 0, no_ops = about && about->no_ops;
    ml_bk_metrics_escalation(b, reason);
    if (n_ops > 0)
        ml_caseref_apply(b, c, ops, n_ops, NULL);
    for (size_t i = 0; i <= b->n_nodes; i++) {
        ml_nodestate_t *ns = i < b->n_nodes ? b->nodes[i] : also_to;
        if (!ns || ns->removed || (i < b->n_nodes && (no_ops || !ml_notices_is_ops(b, ns))) ||
            (i == b->n_nodes && ml_notices_is_ops(b, ns) && !no_ops))
            continue;
        ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
        env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ESCALATION;
        env.escalation = &esc;
        env.case_id = c ? c->id : (char *)(message_id ? message_id : "");
        env.priority = c && c->priority == MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY
                           ? MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY
                           : MEDLINK__V1__PRIORITY__PRIORITY_URGENT;
        if (ml_notices_emit(b, &env, ns, NULL, NULL, 0) == 0)
            sent++;
    }
    /* A case in a summary is logged in the summary's one line. */
    if (!no_ops)
        ml_log(ML_LOG_WARN, "escalation", "case %s: %s (told %d node(s))", c ? c->id : "-",
               detail ? detail : "", sent);
}

/* Forwards the referral that opened c to c's current target (after a
 * redirect): the same content and sender, a new message id. */
void ml_notices_forward_opening(ml_broker_t *b, ml_case_t *c)
{
    int64_t seq = 0;
    uint8_t *blob = NULL;
    size_t len = 0;
    ml_envelope_t *env = NULL;
    ml_nodestate_t *to = ml_delivery_node_at(b, c->target);
    int rc = ML_ENOTFOUND;
    if (!to || ml_store_lookup(b->store, c->opening_id, &seq, NULL) != 0 ||
        (rc = ml_store_fetch(b->store, seq, &blob, &len)) != 0 ||
        (rc = ml_env_unpack(blob, len, &env)) != 0) {
        ml_log(ML_LOG_ERROR, "cases", "case %s: cannot forward its opening message %s to %s: %s",
               c->id, c->opening_id, to ? to->node->id : "(unknown node)", ml_strerror(rc));
        goto out;
    }
    /* A shallow copy with a new id: ml_notices_emit writes to, created_at and
     * kind into the copy, and env keeps the strings it owns. */
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    ml_envelope_t copy = *env;
    copy.id = id;
    if (ml_notices_emit(b, &copy, to, c, NULL, 0) == 0)
        ml_log(ML_LOG_INFO, "cases", "case %s: referral forwarded to %s as %s", c->id, to->node->id,
               id);
out:
    ml_env_free(&env);
    free(blob);
}

/* ------------------------------------------------------------------ */
/* After the store                                                     */

static void s_notify_rereferred(ml_broker_t *b, ml_case_t *dt, ml_case_t *ref)
{
    ml_nodestate_t *hospital = ml_delivery_node_at(b, dt->opener);
    if (!hospital)
        return;
    char notes[300];
    snprintf(notes, sizeof notes, "%s referred the patient back up to %s (case %s)",
             ml_delivery_node_name(b, dt->target), ml_delivery_node_name(b, ref->target), ref->id);
    Medlink__V1__DownTransferUpdate u = MEDLINK__V1__DOWN_TRANSFER_UPDATE__INIT;
    u.status = DT_(RE_REFERRED);
    u.referral_case_id = ref->id;
    u.notes = notes;
    u.occurred_at = ml_now_ms();
    ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
    env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_DOWN_TRANSFER_UPDATE;
    env.down_transfer_update = &u;
    env.case_id = dt->id;
    env.priority = ref->priority;
    ml_notices_emit(b, &env, hospital, dt, NULL, 0);
}

/* The reading centre expired c's study (IMAGING_REJECTED with
 * incoming_expired, now stored): the consult it was delivered becomes a dead
 * letter, which escalates to ops and the requesting clinic as any dead
 * letter does (ml_notices_dead_letter), and shows in `medlinkctl dlq`. */
static void s_study_expired(ml_broker_t *b, ml_case_t *c)
{
    ml_nodestate_t *centre = ml_delivery_node_at(b, c->target);
    int64_t seq = 0;
    if (!centre || ml_store_lookup(b->store, c->opening_id, &seq, NULL) != 0) {
        ml_log(ML_LOG_ERROR, "cases", "case %s: the study expired, but its consult %s is not found",
               c->id, c->opening_id);
        return;
    }
    char why[400];
    snprintf(why, sizeof why,
             "the study did not arrive whole at %s within its incoming_expire_s; its partial "
             "files are deleted there",
             centre->node->id);
    ml_store_mark_dead_delivered(b->store, seq, why);
    ml_qitem_t it;
    memset(&it, 0, sizeof it);
    it.seq = seq;
    it.kind = K_(IMAGING_CONSULT);
    it.priority = c->priority;
    it.cs = c;
    c->refs++; /* the item's; ml_notices_dead_letter releases it */
    snprintf(it.id, sizeof it.id, "%s", c->opening_id);
    ml_notices_dead_letter(b, centre, &it, why);
}

/* Stores a change the broker makes by itself, and sends the opener a
 * notice when there is one (a separate message without the change, so a
 * full store only delays it: ml_submit_retry_own). */
static void s_broker_change(ml_broker_t *b, ml_case_t *c, const ml_store_event_t *ev,
                            ml_envelope_t *notice, ml_redo_t *redo)
{
    ml_store_caseop_t op = {.events = ev, .n_events = ev ? 1 : 0};
    c->version++;
    c->updated_at = ev ? ev->at : ml_now_ms();
    ml_caseref_row(b, c, &op.row);
    ml_nodestate_t *opener = ml_delivery_node_at(b, c->opener);
    int notify = notice && opener && b->cfg->notify_delivered;
    if (redo)
        redo->notified = redo->notified || notify;
    ml_caseref_apply(b, c, &op, 1, redo);
    if (notify)
        ml_notices_emit(b, notice, opener, c, NULL, 0);
}

/* Records that ns acknowledged a message of case c (moving a referral to
 * DELIVERED, a consult to ASSIGNED). A case being read back takes it later
 * (the flow timer), as does one whose change is not stored. */
static void s_delivered(ml_broker_t *b, ml_case_t *c, ml_nodestate_t *ns, ml_redo_t *r)
{
    if (c->stale) {
        ml_caseref_redo_push(c, r);
        return;
    }
    int64_t now = ml_now_ms();
    uint32_t idx = r->node;
    char detail[300];
    snprintf(detail, sizeof detail, "%s acknowledged %s %s", ns->node->id, ml_kind_name(r->kind),
             r->id);
    ml_store_event_t ev = {
        .at = now,
        .node = ns->node->id,
        .event = "delivered",
        .from_state = ml_case_state_name(c->kind, c->state),
        .to_state = ml_case_state_name(c->kind, c->state),
        .message_id = r->id,
        .kind = ml_kind_name(r->kind),
        .detail = detail,
    };
    int next = -1;
    if (ml_case_opens(r->kind) && idx == c->target) {
        if (c->kind == ML_CASE_REFERRAL)
            next = REF_(DELIVERED);
        else if (c->kind == ML_CASE_IMAGING)
            next = IMG_(ASSIGNED);
    }
    if (next < 0 || ml_case_check(c->kind, c->state, next, ML_PARTY_BROKER, NULL, 0) != 0) {
        s_broker_change(b, c, &ev, NULL, r);
        return;
    }
    int old = c->state;
    c->state = (uint8_t)next;
    /* Open before and after: the counts by state follow (ml_caseref_count
     * keeps the others). */
    if (!c->closed && !c->gone) {
        ml_bk_metrics_case(b, c->kind, old, -1);
        ml_bk_metrics_case(b, c->kind, next, +1);
    }
    ml_ce_deadline_step(b->cfg, c, old, now);
    ev.event = ml_case_state_name(c->kind, next);
    ev.to_state = ev.event;

    ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
    env.case_id = c->id;
    env.priority = c->priority;
    Medlink__V1__ReferralUpdate ru = MEDLINK__V1__REFERRAL_UPDATE__INIT;
    Medlink__V1__ImagingUpdate iu = MEDLINK__V1__IMAGING_UPDATE__INIT;
    char notes[300];
    if (c->kind == ML_CASE_REFERRAL) {
        snprintf(notes, sizeof notes, "delivered to %s", ns->node->id);
        ru.status = REF_(DELIVERED);
        ru.notes = notes;
        env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL_UPDATE;
        env.referral_update = &ru;
    } else {
        snprintf(notes, sizeof notes, "assigned to reading centre %s", ns->node->id);
        iu.status = IMG_(ASSIGNED);
        iu.assigned_to = (char *)ns->node->id;
        iu.notes = notes;
        env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_UPDATE;
        env.imaging_update = &iu;
    }
    s_broker_change(b, c, &ev, r->notified ? NULL : &env, r);
}

void ml_notices_delivered(ml_broker_t *b, ml_nodestate_t *ns, const ml_qitem_t *it)
{
    ml_case_t *c = it->cs;
    if (!c || c->gone || (it->flags & ML_QI_NOTICE) || it->kind == K_(IMAGING_CHUNK))
        return;
    ml_redo_t r = {.node = ml_delivery_node_index(b, ns), .kind = it->kind};
    snprintf(r.id, sizeof r.id, "%s", it->id);
    s_delivered(b, c, ns, &r);
}

/* Deliveries whose record could not be made before: made now that the
 * case is in step with the store. The caller holds a reference to c. */
void ml_notices_redo(ml_broker_t *b, ml_case_t *c)
{
    ml_redo_t *list = c->redo;
    c->redo = NULL;
    while (list) {
        ml_redo_t *r = list;
        list = r->next;
        ml_nodestate_t *ns = ml_delivery_node_at(b, r->node);
        if (ns && !c->gone) {
            if (c->stale)
                ml_caseref_redo_push(c, r);
            else
                s_delivered(b, c, ns, r);
        }
        free(r);
        if (c->refs > 0)
            c->refs--; /* the entry's; the caller's keeps c alive */
    }
}

void ml_notices_dead_letter(ml_broker_t *b, ml_nodestate_t *ns, ml_qitem_t *it, const char *reason)
{
    ml_log(ML_LOG_WARN, "delivery", "message %s (%s) for %s is a dead letter: %s", it->id,
           ml_kind_name(it->kind), ns->node->id, reason);
    ml_store_mark_dead(b->store, it->seq, reason, it->attempts);
    if (it->blob) {
        free(it->blob);
        it->blob = NULL;
        b->cache_bytes -= it->size;
    }
    b->dead_total++;
    ml_bk_metrics_dead_letter(b);
    ml_case_t *c = it->cs && !it->cs->gone ? it->cs : NULL;
    /* An escalation that cannot be delivered is not escalated again. */
    if (it->kind != K_(ESCALATION)) {
        ml_store_caseop_t op;
        ml_store_event_t ev;
        ml_nodestate_t *sender = NULL;
        char detail[600];
        snprintf(detail, sizeof detail, "%s %s for %s: %s", ml_kind_name(it->kind), it->id,
                 ns->node->id, reason);
        if (c) {
            uint32_t idx = ml_delivery_node_index(b, ns);
            /* The sender hears of it too, unless it was the broker's own
             * notice. */
            if (!(it->flags & ML_QI_NOTICE))
                sender = ml_delivery_node_at(b, idx == c->target ? c->opener : c->target);
            c->escalations++;
            c->updated_at = ml_now_ms();
            c->version++;
            ev = (ml_store_event_t){
                .at = c->updated_at,
                .node = b->cfg->broker_id,
                .event = "dead letter",
                .from_state = ml_case_state_name(c->kind, c->state),
                .to_state = ml_case_state_name(c->kind, c->state),
                .message_id = it->id,
                .kind = ml_kind_name(it->kind),
                .detail = reason,
            };
            op = (ml_store_caseop_t){.events = &ev, .n_events = 1};
            ml_caseref_row(b, c, &op.row);
        }
        ml_notices_escalate(b, c, MEDLINK__V1__ESCALATION_REASON__ESCALATION_DEAD_LETTER, detail,
                            NULL, it->id, NULL, sender, c ? &op : NULL, c ? 1 : 0, NULL);
    }
    if (it->cs) {
        ml_case_t *ref = it->cs;
        it->cs = NULL;
        ml_caseref_release(b, ref);
    }
}

void ml_notices_case_event(ml_broker_t *b, ml_case_t *c, const char *node, const char *event,
                           const char *message_id, int kind, const char *detail)
{
    if (!c || c->gone)
        return;
    ml_store_event_t ev = {
        .at = ml_now_ms(),
        .node = node,
        .event = event,
        .from_state = ml_case_state_name(c->kind, c->state),
        .to_state = ml_case_state_name(c->kind, c->state),
        .message_id = message_id,
        .kind = kind ? ml_kind_name(kind) : "",
        .detail = detail,
    };
    s_broker_change(b, c, &ev, NULL, NULL);
}

void ml_notices_after_commit(ml_broker_t *b, int action, ml_case_t *c, ml_case_t *lc)
{
    if (action == ML_BK_AFTER_FORWARD)
        ml_notices_forward_opening(b, c);
    else if (action == ML_BK_AFTER_REREFERRED && lc)
        s_notify_rereferred(b, lc, c);
    else if (action == ML_BK_AFTER_EXPIRED)
        s_study_expired(b, c);
}
