/* Ingress: one routed record of an authenticated session, checked in the
 * order docs/architecture.md gives (held, from, rate, validity, then the
 * case: party, lifecycle step, content, recipient, ACL, quotas) and handed
 * to submit, or refused with a Nack naming what is wrong. Also the Acks and
 * Nacks a recipient sends about its deliveries. Every later message of a
 * case is checked against the case as memory has it, including changes not
 * yet committed (caseref.c settles a failed one). Loop thread only. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker_int.h"
#include "case_engine.h"
#include "caseref.h"
#include "cases.h"
#include "delivery.h"
#include "ingress.h"
#include "metrics.h"
#include "ml_imaging.h"
#include "notices.h"
#include "submit.h"
#include "verdict.h"
#include "wire.h"

#define K_(x) MEDLINK__V1__KIND__KIND_##x
#define NACK_(x) MEDLINK__V1__NACK_CODE__NACK_##x
#define REF_(x) MEDLINK__V1__REFERRAL_STATUS__REFERRAL_##x
#define IMG_(x) MEDLINK__V1__IMAGING_STATUS__IMAGING_##x
#define DT_(x) MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_##x

/* Routes a clinical message: the case checks, then ml_submit_put, or a Nack
 * naming what is wrong. digest is the SHA-256 of rec as the sender sent it
 * (see ml_bk_msg_t.digest). */
static void s_route_case(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env, const uint8_t *rec,
                         size_t len, const uint8_t *digest, int repack);

void ml_ingress_ack(ml_broker_t *b, ml_session_t *s, const char *msg_id)
{
    ml_nodestate_t *ns = s->ns;
    ml_qitem_t it;
    if (!ml_delivery_take(ns, msg_id, &it)) {
        /* An ack for something not in flight: a late ack after a resend. */
        ml_log(ML_LOG_DEBUG, "delivery", "ack for %s from %s not in flight (already acked)", msg_id,
               ml_wire_who(s));
        return;
    }
    ml_store_mark_delivered(b->store, it.seq);
    ns->delivered++;
    b->delivered_total++;
    ml_bk_metrics_delivered(b, it.kind);
    if (it.cs) {
        ml_notices_delivered(b, ns, &it);
        ml_caseref_release(b, it.cs);
    }
    ml_delivery_pump(b, ns);
}

/* The recipient refused a delivery (a Nack naming it): it can never take
 * it, so it becomes a dead letter rather than being resent forever. */
void ml_ingress_refused(ml_broker_t *b, ml_session_t *s, const Medlink__V1__Nack *n)
{
    ml_nodestate_t *ns = s->ns;
    ml_qitem_t it;
    if (!n->message_id || !ml_delivery_take(ns, n->message_id, &it)) {
        ml_log(ML_LOG_WARN, "delivery", "%s sent a Nack for %s, which is not in flight: %s",
               ml_wire_who(s), n->message_id ? n->message_id : "-", n->reason ? n->reason : "");
        return;
    }
    char why[512];
    snprintf(why, sizeof why, "refused by the recipient %s: %s", ns->node->id,
             n->reason && *n->reason ? n->reason : "no reason given");
    ml_notices_dead_letter(b, ns, &it, why);
    ml_delivery_pump(b, ns);
}

void ml_ingress_route(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env, const uint8_t *rec,
                      size_t len)
{
    char err[512];
    const char *id = env->id;
    int kind_was_set = env->kind != MEDLINK__V1__KIND__KIND_UNSPECIFIED;
    char hkey[300];
    if (env->to && ml_wire_held(b, s, ml_wire_hold_key(env, hkey, sizeof hkey), id))
        return;
    /* It came again: every hold it made is released. */
    ml_wire_hold_release(s, id);
    if (strcmp(env->from, s->peer_id) != 0) {
        snprintf(err, sizeof err, "from '%s' differs from the authenticated node '%s'", env->from,
                 s->peer_id);
        ml_wire_refuse(b, s, id, MEDLINK__V1__NACK_CODE__NACK_IDENTITY, err);
        return;
    }
    /* node_rate: a token bucket per node (a second's worth of burst). A
     * node over it gets a transient Nack and its agent sends again later.
     * Before validation: every record a node sends counts, so that a node
     * sending invalid ones is held to its rate like any other. */
    ml_nodestate_t *ns = s->ns;
    int64_t now = ml_mono_ms();
    double rate = (double)b->cfg->node_rate;
    if (ns->rate_at == 0)
        ns->rate_tokens = rate;
    double t = ns->rate_tokens + (double)(now - ns->rate_at) * rate / 1000.0;
    ns->rate_tokens = t > rate ? rate : t;
    ns->rate_at = now;
    if (ns->rate_tokens < 1.0) {
        snprintf(err, sizeof err,
                 "rate limit: node %s may send %ld messages per second; retry later", ns->node->id,
                 b->cfg->node_rate);
        ml_wire_refuse_for_now(b, s, id, ml_wire_hold_key(env, hkey, sizeof hkey),
                               MEDLINK__V1__NACK_CODE__NACK_RATE_LIMITED, err);
        return;
    }
    ns->rate_tokens -= 1.0;
    if (ml_env_validate(env, err, sizeof err) != 0) {
        ml_wire_refuse(b, s, id, MEDLINK__V1__NACK_CODE__NACK_INVALID, err);
        return;
    }
    /* What the sender sent, before any repack: its resend has the same
     * digest (F7). Without one (no memory) the store compares senders
     * only. */
    uint8_t digest[ML_STORE_DIGEST_LEN];
    int have_digest = ml_sha256(rec, len, digest) == 0;
    /* The recipient should see the envelope with its kind: when the sender
     * left it out, s_route_case packs it again. */
    s_route_case(b, s, env, rec, len, have_digest ? digest : NULL, !kind_was_set);
}

/* What a message changes in a case, kept so that the change can be undone
 * when the message never reaches the store (a full store backlog): reading
 * the case back from the store would be wrong then, since changes queued
 * before this one (the case's opening, even) are not committed yet. */
typedef struct {
    int64_t updated_at, deadline_at, version;
    uint64_t chunk_bytes;
    uint32_t chunks, dup_chunks, target;
    uint16_t escalations, follow_ups;
    uint8_t state, deadline_state, fired, closed;
} s_snap_t;

static void s_snap(const ml_case_t *c, s_snap_t *s)
{
    *s = (s_snap_t){c->updated_at,     c->deadline_at, c->version,     c->chunk_bytes, c->chunks,
                    c->dup_chunks,     c->target,      c->escalations, c->follow_ups,  c->state,
                    c->deadline_state, c->fired,       c->closed};
}

static void s_unsnap(ml_broker_t *b, ml_case_t *c, const s_snap_t *s)
{
    ml_caseref_count(b, c, -1);
    c->updated_at = s->updated_at;
    c->deadline_at = s->deadline_at;
    c->version = s->version;
    c->chunk_bytes = s->chunk_bytes;
    c->chunks = s->chunks;
    c->dup_chunks = s->dup_chunks;
    c->target = s->target;
    c->escalations = s->escalations;
    c->follow_ups = s->follow_ups;
    c->state = s->state;
    c->deadline_state = s->deadline_state;
    c->fired = s->fired;
    c->closed = s->closed;
    ml_caseref_count(b, c, +1);
}

/* A message for a case that is being read back is refused for now: the
 * sender sends it again (after the rest of what it sent to that node, which
 * the refusal holds). Returns 1 when refused. */
static int s_stale_refuse(ml_broker_t *b, ml_session_t *s, const ml_envelope_t *env,
                          const ml_case_t *c)
{
    if (!c || !c->stale)
        return 0;
    char k[300], err[200];
    snprintf(err, sizeof err,
             "case %s is being read back from the store after a change that was not stored; "
             "retry",
             c->id);
    ml_wire_refuse_for_now(b, s, env->id, ml_wire_hold_key(env, k, sizeof k), NACK_(CONFLICT), err);
    return 1;
}

static int s_nonempty(const char *s)
{
    return s && *s;
}

static void s_refuse_submit(ml_broker_t *b, ml_session_t *s, const ml_envelope_t *env, int rc)
{
    char k[300];
    ml_verdict_t v;
    if (rc == ML_EAGAIN)
        ml_verdict_set(&v, NACK_(RATE_LIMITED), "broker busy: store backlog full, retry later");
    else
        ml_verdict_set(&v, NACK_(STORE), "store unavailable, retry later");
    ml_wire_refuse_verdict(b, s, env->id, ml_wire_hold_key(env, k, sizeof k), &v);
}

/* Hands a resent message to the store without case changes; the store
 * finds the earlier copy and the sender gets Accepted (duplicate). */
static void s_submit_duplicate(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env,
                               const uint8_t *rec, size_t len, const uint8_t *digest,
                               ml_nodestate_t *recipient)
{
    char hold_key[300];
    ml_bk_msg_t m = {
        .session = s,
        .recipient = recipient ? recipient : s->ns,
        .id = env->id,
        .case_id = env->case_id,
        .sender = env->from,
        .kind = env->kind,
        .priority = env->priority,
        .created_at = env->created_at,
        .deadline = env->deadline,
        .rec = rec,
        .len = len,
        .digest = digest,
        .to = ml_wire_hold_key(env, hold_key, sizeof hold_key),
    };
    int rc = ml_submit_put(b, &m);
    if (rc != 0)
        s_refuse_submit(b, s, env, rc);
}

/* ------------------------------------------------------------------ */
/* Routing clinical messages                                           */

/* Picks the node that gets a new case addressed to a service. Returns
 * NULL when no node serving it may receive kind from from_role. */
static ml_nodestate_t *s_pick_consumer(ml_broker_t *b, const char *service, int from_role, int kind)
{
    ml_nodestate_t *best = NULL;
    int best_online = 0;
    uint32_t best_load = 0;
    size_t n = b->n_nodes;
    /* Start the walk at a rotating offset so that equals take turns. */
    uint32_t start = b->rr++;
    for (size_t k = 0; k < n; k++) {
        ml_nodestate_t *ns = b->nodes[(start + k) % n];
        if (ns->removed || !ml_node_serves(ns->node, service) ||
            !ml_acl_allows(b->cfg, from_role, kind, ns->node->role))
            continue;
        int online = ns->deliver != NULL;
        if (!best || online > best_online ||
            (online == best_online && ns->open_cases < best_load)) {
            best = ns;
            best_online = online;
            best_load = ns->open_cases;
        }
    }
    return best;
}

/* node_queue_bytes: a recipient that is far behind (offline for long) does
 * not let its senders fill the broker's disk; they get a transient Nack
 * and their agents keep the messages until it catches up. */
static int s_quota_refuse(ml_broker_t *b, ml_session_t *s, const ml_envelope_t *env,
                          const ml_nodestate_t *to)
{
    if (to->queue.bytes < (uint64_t)b->cfg->node_queue_bytes)
        return 0;
    char err[512];
    snprintf(err, sizeof err,
             "quota: %s has %llu bytes waiting, over its node_queue_bytes of %ld; retry later",
             to->node->id, (unsigned long long)to->queue.bytes, b->cfg->node_queue_bytes);
    char k[300];
    ml_wire_refuse_for_now(b, s, env->id, ml_wire_hold_key(env, k, sizeof k), NACK_(RATE_LIMITED),
                           err);
    return 1;
}

/* open_cases_per_node: one node cannot make the broker keep an unbounded
 * number of cases (memory, disk, deadlines, escalations) by opening cases
 * nobody closes (F8). The refusal is permanent (NACK_FORBIDDEN, the agent
 * moves the file to rejected/ with the reason): a transient one would hold
 * every later message of the sender to that recipient (ml_wire_refuse_for_now),
 * the updates that close cases and free the quota among them. */
static int s_open_quota_refuse(ml_broker_t *b, ml_session_t *s, const ml_envelope_t *env)
{
    if ((long)s->ns->opened < b->cfg->open_cases_per_node)
        return 0;
    char err[512];
    snprintf(err, sizeof err,
             "quota: %s has %u open cases, its open_cases_per_node limit of %ld; close or cancel "
             "some of them, then send this again",
             s->ns->node->id, s->ns->opened, b->cfg->open_cases_per_node);
    ml_wire_refuse(b, s, env->id, NACK_(FORBIDDEN), err);
    return 1;
}

static int s_acl_refuse(ml_broker_t *b, ml_session_t *s, const ml_envelope_t *env,
                        const ml_nodestate_t *to)
{
    int from_role = s->ns->node->role, to_role = to->node->role;
    if (ml_acl_allows(b->cfg, from_role, env->kind, to_role))
        return 0;
    char err[512];
    snprintf(err, sizeof err, "forbidden route: role %s may not send %s to role %s (%s)",
             ml_role_name(from_role), ml_kind_name(env->kind), ml_role_name(to_role), to->node->id);
    ml_wire_refuse(b, s, env->id, NACK_(FORBIDDEN), err);
    return 1;
}

/* Packs env again when the stored form must differ from what the sender
 * sent (kind filled in, priority raised). *rec and *len then point into
 * *owned, which the caller frees. */
static int s_repack(ml_envelope_t *env, const uint8_t **rec, size_t *len, uint8_t **owned)
{
    size_t plen = 0;
    if (ml_env_pack(env, owned, &plen) != 0)
        return ML_ENOMEM;
    *rec = *owned;
    *len = plen;
    return 0;
}

static void s_route_open(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env, const uint8_t *rec,
                         size_t len, const uint8_t *digest, int repack)
{
    char err[512], hold_key[300];
    int64_t now = ml_now_ms();
    int ck = ml_case_kind_of_message(env->kind);
    ml_nodestate_t *sender = s->ns;

    /* Memory only: a case that has left memory (a final one, or an open
     * one nothing needed in memory) is found by the store, which refuses
     * the opening (ML_EDUP) or, for a resend of the opening message itself,
     * reports a duplicate; the case made here is then replaced by the
     * stored one (s_resync, c->unstored). Reading the store here would cost
     * every new case a synchronous query. */
    ml_case_t *exist = ml_casetab_find(&b->cases, env->case_id);
    if (exist && exist->gone)
        exist = NULL;
    if (exist) {
        if (strcmp(exist->opening_id, env->id) == 0) {
            /* The opening message sent again (its Accepted was lost). */
            s_submit_duplicate(b, s, env, rec, len, digest, ml_delivery_node_at(b, exist->target));
        } else {
            snprintf(err, sizeof err,
                     "case_id %s is already in use by another case; a new case needs a new "
                     "case_id",
                     env->case_id);
            ml_wire_refuse(b, s, env->id, NACK_(INVALID), err);
        }
        return;
    }

    const char *service = ml_caseref_service_name(b, env->to);
    ml_nodestate_t *rs;
    if (service) {
        rs = s_pick_consumer(b, service, sender->node->role, env->kind);
        if (!rs) {
            snprintf(err, sizeof err,
                     "forbidden route: no node serving %s may receive %s from role %s", service,
                     ml_kind_name(env->kind), ml_role_name(sender->node->role));
            ml_wire_refuse(b, s, env->id, NACK_(FORBIDDEN), err);
            return;
        }
    } else {
        rs = ml_delivery_node(b, env->to);
        if (!rs) {
            snprintf(err, sizeof err, "unknown recipient node '%s'", env->to);
            ml_wire_refuse(b, s, env->id, NACK_(UNKNOWN_NODE), err);
            return;
        }
        if (s_acl_refuse(b, s, env, rs))
            return;
    }
    if (rs == sender) {
        ml_wire_refuse(b, s, env->id, NACK_(INVALID), "a node cannot open a case with itself");
        return;
    }
    /* Addressed to a service, it joins the sender's stream to the node it
     * goes to: a message to that node refused for now holds it too. Held,
     * it is itself refused for now, so it holds its own address as well:
     * otherwise the next message to the service, assigned to another node
     * (or to this one once the hold is gone), would overtake it. */
    if (service && ml_wire_held(b, s, rs->node->id, env->id)) {
        char k[300];
        ml_wire_hold_also(s, ml_wire_hold_key(env, k, sizeof k), env->id);
        return;
    }
    if (s_quota_refuse(b, s, env, rs)) {
        if (service)
            ml_wire_hold_also(s, rs->node->id, env->id);
        return;
    }
    /* A resend of an opening whose case left memory counts in the quota
     * already: it is answered as the duplicate it is, not refused. */
    if ((long)sender->opened >= b->cfg->open_cases_per_node && ml_submit_known_id(b, s, env->id)) {
        s_submit_duplicate(b, s, env, rec, len, digest, rs);
        return;
    }
    if (s_open_quota_refuse(b, s, env))
        return;

    /* A referral back up from a rehab down-transfer closes that case. */
    ml_case_t *lc = NULL;
    if (env->kind == K_(REFERRAL) && s_nonempty(env->referral->linked_case_id)) {
        const char *lid = env->referral->linked_case_id;
        if (ml_caseref_lookup(b, lid, &lc) != 0) {
            s_refuse_submit(b, s, env, ML_ESTORE);
            return;
        }
        int code = 0;
        if (!lc || ml_ce_party(lc, sender->index) == ML_PARTY_OTHER) {
            /* As for updates: unknown and not yours read the same (F11). */
            code = NACK_(NOT_PARTY);
            ml_ce_not_party(sender->node->id, lid, err, sizeof err);
        } else if (lc->kind != ML_CASE_DOWN_TRANSFER) {
            code = NACK_(INVALID);
            snprintf(err, sizeof err, "referral.linked_case_id %s is not a rehab down-transfer",
                     lid);
        } else if (ml_ce_party(lc, sender->index) != ML_PARTY_TARGET) {
            code = NACK_(NOT_PARTY);
            snprintf(err, sizeof err,
                     "only the clinic that received down-transfer %s may refer its patient back "
                     "up",
                     lid);
        } else if (ml_case_check(ML_CASE_DOWN_TRANSFER, lc->state, DT_(RE_REFERRED),
                                 ML_PARTY_BROKER, err, sizeof err) != 0) {
            code = NACK_(ILLEGAL_TRANSITION);
        }
        if (code) {
            if (lc)
                ml_caseref_maybe_evict(b, lc);
            ml_wire_refuse(b, s, env->id, code, err);
            return;
        }
        lc->refs++; /* held while this function works on it */
        if (s_stale_refuse(b, s, env, lc)) {
            ml_caseref_release(b, lc);
            return;
        }
    }
    s_snap_t lc_snap = {0};
    if (lc)
        s_snap(lc, &lc_snap);

    ml_case_t *c = ml_case_new(env->case_id);
    if (!c || ml_casetab_add(&b->cases, c) != 0) {
        ml_case_free(c);
        ml_caseref_release(b, lc);
        char k[300];
        ml_wire_refuse_for_now(b, s, env->id, ml_wire_hold_key(env, k, sizeof k), NACK_(STORE),
                               "out of memory");
        return;
    }
    c->kind = (uint8_t)ck;
    c->state = (uint8_t)ml_case_initial_state(ck);
    c->priority = (uint8_t)env->priority;
    c->opener = ml_delivery_node_index(b, sender);
    c->target = ml_delivery_node_index(b, rs);
    c->service = service;
    c->opened_at = c->updated_at = now;
    snprintf(c->opening_id, sizeof c->opening_id, "%s", env->id);
    c->version = 1;
    c->unstored = 1;
    if (env->kind == K_(IMAGING_CONSULT)) {
        const Medlink__V1__ImagingConsult *ic = env->imaging_consult;
        c->n_objects = (uint32_t)ic->n_object;
        for (size_t i = 0; i < ic->n_object; i++)
            c->chunks_expected += ic->object[i]->chunks;
    }
    if (lc)
        c->linked = strdup(lc->id);
    ml_ce_deadline_step(b->cfg, c, 0, now);
    ml_caseref_count(b, c, +1);

    char detail[400];
    if (service)
        snprintf(detail, sizeof detail, "for service %s, assigned to %s", service, rs->node->id);
    else
        snprintf(detail, sizeof detail, "to %s", rs->node->id);
    if (lc) {
        size_t n = strlen(detail);
        snprintf(detail + n, sizeof detail - n, "; re-referral from down-transfer %s", lc->id);
    }
    ml_store_event_t ev_open = {
        .at = now,
        .node = sender->node->id,
        .event = "opened",
        .to_state = ml_case_state_name(ck, c->state),
        .message_id = env->id,
        .kind = ml_kind_name(env->kind),
        .detail = detail,
    };
    ml_store_caseop_t ops[2];
    memset(ops, 0, sizeof ops);
    ml_caseref_row(b, c, &ops[0].row);
    ops[0].open = 1;
    ops[0].events = &ev_open;
    ops[0].n_events = 1;
    size_t n_ops = 1;

    char lc_detail[300];
    ml_store_event_t ev_lc;
    if (lc) {
        int old = lc->state;
        ml_caseref_count(b, lc, -1);
        lc->state = DT_(RE_REFERRED);
        lc->closed = 1;
        lc->deadline_at = 0;
        lc->updated_at = now;
        lc->version++;
        if (!lc->linked)
            lc->linked = strdup(c->id);
        snprintf(lc_detail, sizeof lc_detail, "referred back up to %s as case %s", rs->node->id,
                 c->id);
        ev_lc = (ml_store_event_t){
            .at = now,
            .node = sender->node->id,
            .event = ml_case_state_name(ML_CASE_DOWN_TRANSFER, lc->state),
            .from_state = ml_case_state_name(ML_CASE_DOWN_TRANSFER, old),
            .to_state = ml_case_state_name(ML_CASE_DOWN_TRANSFER, lc->state),
            .message_id = env->id,
            .kind = ml_kind_name(env->kind),
            .detail = lc_detail,
        };
        ml_caseref_row(b, lc, &ops[1].row);
        ops[1].events = &ev_lc;
        ops[1].n_events = 1;
        n_ops = 2;
    }

    char opened[768];
    snprintf(opened, sizeof opened, "case %s opened by %s: %s %s", c->id, sender->node->id,
             ml_kind_name(env->kind), detail);
    uint8_t *owned = NULL;
    int rc = repack ? s_repack(env, &rec, &len, &owned) : 0;
    if (rc == 0) {
        ml_bk_msg_t m = {
            .session = s,
            .recipient = rs,
            .id = env->id,
            .case_id = env->case_id,
            .sender = env->from,
            .kind = env->kind,
            .priority = env->priority,
            .created_at = env->created_at,
            .deadline = env->deadline,
            .rec = rec,
            .len = len,
            .digest = digest,
            .to = ml_wire_hold_key(env, hold_key, sizeof hold_key),
            .ops = ops,
            .n_ops = n_ops,
            .cs = c,
            .linked = lc,
            .opened = opened,
            .action = lc ? ML_BK_AFTER_REREFERRED : ML_BK_AFTER_NONE,
        };
        rc = ml_submit_put(b, &m);
    }
    free(owned);
    if (rc != 0) {
        /* Nothing was queued: the case never existed. */
        ml_caseref_count(b, c, -1);
        ml_casetab_remove(&b->cases, c);
        ml_case_free(c);
        if (lc)
            s_unsnap(b, lc, &lc_snap);
        ml_caseref_release(b, lc);
        if (service)
            ml_wire_hold_also(s, rs->node->id, env->id);
        s_refuse_submit(b, s, env, rc);
        return;
    }
    ml_caseref_release(b, lc);
}

/* The chunk count of each object of imaging case c, read from its stored
 * consult (the opening message) the first time an ImagingResend needs it
 * and kept with the case: n_objects words, bounded by what one consult
 * record can list. Synchronous read on the loop thread, O(consult size)
 * once per case in memory. Returns 0, or ML_ENOTFOUND / ML_EPROTO /
 * ML_ESTORE / ML_ENOMEM (the resend cannot be checked now). */
static int s_object_chunks(ml_broker_t *b, ml_case_t *c)
{
    if (c->obj_chunks || c->n_objects == 0)
        return 0;
    int64_t seq = 0;
    uint8_t *blob = NULL;
    size_t len = 0;
    ml_envelope_t *e = NULL;
    int rc = ml_store_lookup(b->store, c->opening_id, &seq, NULL);
    if (rc == 0)
        rc = ml_store_fetch(b->store, seq, &blob, &len);
    if (rc == 0)
        rc = ml_env_unpack(blob, len, &e) < 0 ? ML_EPROTO : 0;
    free(blob);
    if (rc == 0 && (e->payload_case != MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CONSULT ||
                    e->imaging_consult->n_object != c->n_objects))
        rc = ML_EPROTO;
    if (rc == 0 && !(c->obj_chunks = calloc(c->n_objects, sizeof *c->obj_chunks)))
        rc = ML_ENOMEM;
    for (uint32_t i = 0; rc == 0 && i < c->n_objects; i++)
        c->obj_chunks[i] = e->imaging_consult->object[i]->chunks;
    ml_env_free(&e);
    return rc;
}

/* Checks that go beyond the lifecycle table: what the message asks must
 * fit this case. Returns 0, or a Nack code with err filled in. */
static int s_check_content(ml_broker_t *b, ml_case_t *c, const ml_envelope_t *env, int st,
                           ml_nodestate_t **redirect, char *err, size_t errlen)
{
    /* What the case and the message alone decide comes first, as it always
     * did in each branch below. */
    int code = ml_ce_check_content(c, env, st, err, errlen);
    if (code != 0)
        return code;
    switch (env->payload_case) {
    case MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL_UPDATE: {
        if (st == REF_(REDIRECTED)) {
            const char *to = env->referral_update->redirect_to;
            ml_nodestate_t *ns = ml_delivery_node(b, to);
            ml_nodestate_t *opener = ml_delivery_node_at(b, c->opener);
            if (!ns) {
                snprintf(err, errlen, "referral_update.redirect_to names unknown node '%s'", to);
                return NACK_(UNKNOWN_NODE);
            }
            if (ml_delivery_node_index(b, ns) == c->target || ns == opener) {
                snprintf(err, errlen,
                         "referral_update.redirect_to %s: a referral is redirected to another "
                         "hospital",
                         to);
                return NACK_(INVALID);
            }
            if (!opener ||
                !ml_acl_allows(b->cfg, opener->node->role, K_(REFERRAL), ns->node->role)) {
                snprintf(err, errlen,
                         "forbidden route: %s (role %s) may not receive a referral from %s", to,
                         ml_role_name(ns->node->role), ml_delivery_node_name(b, c->opener));
                return NACK_(FORBIDDEN);
            }
            *redirect = ns;
        }
        break;
    }
    case MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_RESEND:
        /* Every index must name a chunk the consult declared: a resend
         * makes the clinic upload again, so one that asks for chunks that
         * do not exist is refused here rather than left to the clinic
         * (F3). Duplicates are the clinic's to fold. */
        if (s_object_chunks(b, c) != 0) {
            snprintf(err, errlen, "the consult of case %s cannot be read to check the resend",
                     c->id);
            return NACK_(STORE);
        } else {
            const Medlink__V1__ImagingResend *r = env->imaging_resend;
            uint32_t n = c->obj_chunks[r->object_index];
            for (size_t i = 0; i < r->n_chunk_index; i++) {
                if (r->chunk_index[i] >= n) {
                    snprintf(err, errlen,
                             "imaging_resend.chunk_index[%zu] %u: object %u of case %s has %u "
                             "chunk(s)",
                             i, r->chunk_index[i], r->object_index, c->id, n);
                    return NACK_(INVALID);
                }
            }
        }
        break;
    default:
        break;
    }
    return 0;
}

static void s_route_update(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env, const uint8_t *rec,
                           size_t len, const uint8_t *digest, int repack)
{
    char err[512], hold_key[300];
    int64_t now = ml_now_ms();
    ml_nodestate_t *sender = s->ns;
    int ck = ml_case_kind_of_message(env->kind);

    ml_case_t *c;
    if (ml_caseref_lookup(b, env->case_id, &c) != 0) {
        s_refuse_submit(b, s, env, ML_ESTORE);
        return;
    }
    /* The party first: a node with no part in the case gets the very answer
     * it would get for a case that does not exist, so it learns neither
     * that the case exists nor its kind (F11). */
    int outsider = !c || ml_ce_party(c, sender->index) == ML_PARTY_OTHER;
    if (outsider || c->kind != ck) {
        if (ml_submit_known_id(b, s, env->id)) {
            s_submit_duplicate(b, s, env, rec, len, digest, NULL);
        } else if (outsider) {
            ml_ce_not_party(sender->node->id, env->case_id, err, sizeof err);
            ml_wire_refuse(b, s, env->id, NACK_(NOT_PARTY), err);
        } else {
            snprintf(err, sizeof err, "case %s is not a%s %s case, so it takes no %s", env->case_id,
                     ck == ML_CASE_IMAGING ? "n" : "", ml_case_kind_name(ck),
                     ml_kind_name(env->kind));
            ml_wire_refuse(b, s, env->id, NACK_(INVALID), err);
        }
        if (c)
            ml_caseref_maybe_evict(b, c);
        return;
    }
    c->refs++; /* held while this function works on it */
    if (s_stale_refuse(b, s, env, c))
        goto out;
    int party = ml_ce_party(c, sender->index);
    int st = ml_ce_msg_state(env);
    int code = 0;
    ml_nodestate_t *redirect = NULL;
    if ((st < 0 ? ml_case_check_message(ck, c->state, env->kind, party, err, sizeof err)
                : ml_case_check(ck, c->state, st, party, err, sizeof err)) != 0) {
        code = NACK_(ILLEGAL_TRANSITION);
    } else {
        code = s_check_content(b, c, env, st, &redirect, err, sizeof err);
    }
    ml_nodestate_t *to = NULL;
    if (code == 0) {
        to = ml_delivery_node_at(b, party == ML_PARTY_OPENER ? c->target : c->opener);
        if (!to) {
            code = NACK_(UNKNOWN_NODE);
            snprintf(err, sizeof err, "the other party of case %s is no longer registered", c->id);
        } else if (strcmp(env->to, to->node->id) != 0 &&
                   !(party == ML_PARTY_OPENER && c->service && strcmp(env->to, c->service) == 0)) {
            code = NACK_(INVALID);
            snprintf(err, sizeof err, "messages of case %s from %s go to %s, not %s", c->id,
                     sender->node->id, to->node->id, env->to);
        }
    }
    if (code != 0) {
        if (ml_submit_known_id(b, s, env->id))
            s_submit_duplicate(b, s, env, rec, len, digest, to);
        else
            ml_wire_refuse(b, s, env->id, code, err);
        goto out;
    }
    if (s_acl_refuse(b, s, env, to) || s_quota_refuse(b, s, env, to))
        goto out;

    /* A report with a critical finding travels as EMERGENCY whatever its
     * sender chose: it overtakes everything queued for the clinic. */
    if (env->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_REPORT &&
        env->imaging_report->critical_finding &&
        env->priority != MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY) {
        env->priority = MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY;
        repack = 1;
    }

    /* The change, in memory first (later messages are checked against
     * it), then stored with the message. */
    s_snap_t snap;
    s_snap(c, &snap);
    int old = c->state;
    int chunk_bytes = 0;
    int action = ML_BK_AFTER_NONE;
    if (st >= 0) {
        ml_caseref_count(b, c, -1);
        c->state = (uint8_t)st;
        c->closed = (uint8_t)ml_case_terminal(ck, st);
        if (env->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_UPDATE &&
            env->imaging_update->incoming_expired)
            action = ML_BK_AFTER_EXPIRED;
        if (redirect) {
            c->target = ml_delivery_node_index(b, redirect);
            action = ML_BK_AFTER_FORWARD;
            /* The new hospital gets the full time to decide. */
            c->deadline_at = 0;
            c->fired = 0;
            const ml_deadline_rule_t *r = ml_broker_config_deadline(b->cfg, ck, c->priority);
            if (r->set && !r->after_state) {
                c->deadline_state = (uint8_t)r->target_state;
                if (!ml_ce_met(c, st))
                    c->deadline_at = now + r->ms;
            }
        }
        ml_caseref_count(b, c, +1);
        if (st == DT_(FOLLOW_UP) && ck == ML_CASE_DOWN_TRANSFER)
            c->follow_ups++;
        ml_ce_deadline_step(b->cfg, c, old, now);
    }
    if (env->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CHUNK) {
        chunk_bytes = (int)env->imaging_chunk->data.len;
        c->chunks++;
        c->chunk_bytes += (uint64_t)chunk_bytes;
    }
    c->updated_at = now;
    c->version++;

    char detail[400];
    ml_ce_detail(env, detail, sizeof detail);
    ml_store_event_t ev = {
        .at = now,
        .node = sender->node->id,
        .event = st >= 0 ? ml_case_state_name(ck, st) : "resend requested",
        .from_state = ml_case_state_name(ck, old),
        .to_state = ml_case_state_name(ck, c->state),
        .message_id = env->id,
        .kind = ml_kind_name(env->kind),
        .detail = detail,
    };
    ml_store_caseop_t op = {.events = &ev, .n_events = 1};
    if (env->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CHUNK)
        op.n_events = 0; /* counted, not listed: a study is hundreds of chunks */
    ml_caseref_row(b, c, &op.row);

    uint8_t *owned = NULL;
    int rc = repack ? s_repack(env, &rec, &len, &owned) : 0;
    if (rc == 0) {
        ml_bk_msg_t m = {
            .session = s,
            .recipient = to,
            .id = env->id,
            .case_id = env->case_id,
            .sender = env->from,
            .kind = env->kind,
            .priority = env->priority,
            .created_at = env->created_at,
            .deadline = env->deadline,
            .rec = rec,
            .len = len,
            .digest = digest,
            .to = ml_wire_hold_key(env, hold_key, sizeof hold_key),
            .ops = &op,
            .n_ops = 1,
            .cs = c,
            .action = action,
            .chunk_bytes = chunk_bytes,
        };
        rc = ml_submit_put(b, &m);
    }
    free(owned);
    if (rc != 0) {
        s_unsnap(b, c, &snap); /* nothing reached the store */
        s_refuse_submit(b, s, env, rc);
    }
out:
    ml_caseref_release(b, c);
}

static void s_route_case(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env, const uint8_t *rec,
                         size_t len, const uint8_t *digest, int repack)
{
    if (ml_case_kind_of_message(env->kind) == ML_CASE_NONE) {
        char err[160];
        snprintf(err, sizeof err, "%s messages are sent by the broker only",
                 ml_kind_name(env->kind));
        ml_wire_refuse(b, s, env->id, NACK_(FORBIDDEN), err);
        return;
    }
    if (ml_case_opens(env->kind))
        s_route_open(b, s, env, rec, len, digest, repack);
    else
        s_route_update(b, s, env, rec, len, digest, repack);
}
