/* The broker's case engine: what makes medlinkd more than a message pipe.
 *
 * Every clinical message belongs to a case. The message that opens a case
 * (Referral, ImagingConsult, DownTransfer) creates it; every later message
 * is checked against it before it is stored: the sender must have a part in
 * the case, the change must be a legal step of the case's lifecycle
 * (cases.h), and it must go to the other party. A refusal is a Nack that
 * names the current and the attempted state; nothing is stored, so nothing
 * is lost and the case is unchanged.
 *
 * The case table (casetab.h) is checked and changed on the loop thread when
 * a message arrives, and the change is stored in the same transaction as
 * the message (store.h, versioned). If that transaction fails, the case is
 * read back from the store, which is the truth.
 *
 * The broker also makes changes of its own: a delivery acknowledged by the
 * target moves a referral to DELIVERED and an imaging consult to ASSIGNED
 * (and tells the opener); a deadline missed raises an Escalation to the ops
 * nodes and the opener, and may redirect an unaccepted EMERGENCY referral to
 * the community's fallback hospital; a message that cannot be delivered
 * becomes a dead letter (stored, escalated, visible in `medlinkctl dlq`).
 *
 * Services: a message that opens a case may be addressed to a service
 * ("imaging.ct"); the broker picks one of the nodes serving it (connected
 * ones first, then the one with the fewest open cases, round robin among
 * equals) when the message arrives, and every later message of the case
 * goes to that node. Loop thread only. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker_int.h"
#include "cases.h"

#define S_NO_NODE UINT32_MAX

#define K_(x) MEDLINK__V1__KIND__KIND_##x
#define NACK_(x) MEDLINK__V1__NACK_CODE__NACK_##x
#define REF_(x) MEDLINK__V1__REFERRAL_STATUS__REFERRAL_##x
#define IMG_(x) MEDLINK__V1__IMAGING_STATUS__IMAGING_##x
#define DT_(x) MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_##x

/* ------------------------------------------------------------------ */
/* Cases in memory                                                     */

static ml_nodestate_t *s_node_at(ml_broker_t *b, uint32_t idx)
{
    return idx < b->n_nodes && !b->nodes[idx]->removed ? b->nodes[idx] : NULL;
}

static const char *s_node_name(ml_broker_t *b, uint32_t idx)
{
    ml_nodestate_t *ns = s_node_at(b, idx);
    return ns ? ns->node->id : "";
}

static uint32_t s_node_idx(ml_broker_t *b, const char *id)
{
    ml_nodestate_t *ns = id && *id ? ml_bk_node(b, id) : NULL;
    return ns ? ml_bk_node_index(b, ns) : S_NO_NODE;
}

/* The config's copy of a service name (borrowed for the broker's life). */
static const char *s_service_name(ml_broker_t *b, const char *name)
{
    for (size_t i = 0; name && *name && i < b->cfg->n_nodes; i++)
        for (size_t j = 0; j < b->cfg->nodes[i].n_services; j++)
            if (strcmp(b->cfg->nodes[i].services[j], name) == 0)
                return b->cfg->nodes[i].services[j];
    return NULL;
}

/* The name a case read back from the store keeps: the config's copy, or,
 * for a service a reload removed, the broker's own copy (shared with
 * s_remap_service), so that the opener may still address the case's
 * messages to it and the stored row keeps it. NULL for none (or out of
 * memory: the name is only shown and matched, the target is fixed). */
static const char *s_service_keep(ml_broker_t *b, const char *name)
{
    const char *cfg = s_service_name(b, name);
    if (cfg || !name || !*name)
        return cfg;
    for (size_t i = 0; i < b->n_services_gone; i++)
        if (strcmp(b->services_gone[i], name) == 0)
            return b->services_gone[i];
    char **grown = realloc(b->services_gone, (b->n_services_gone + 1) * sizeof *grown);
    if (grown)
        b->services_gone = grown;
    char *copy = grown ? strdup(name) : NULL;
    if (!copy)
        return NULL;
    b->services_gone[b->n_services_gone++] = copy;
    return copy;
}

/* Keeps each node's count of the open cases it is the target of, which is
 * how a service picks its least busy consumer, and of the open cases it
 * opened, which open_cases_per_node bounds, and the broker's total. A case
 * counts from its opening until it is final, whether it is in memory or
 * not: the counts start from the store's (ml_bk_flow_load), a case that
 * leaves memory open keeps its counts (s_maybe_evict), and one read back
 * does not add them again (s_load_one, s_resync). */
static void s_target_count(ml_broker_t *b, ml_case_t *c, int delta)
{
    if (c->closed || c->gone)
        return;
    if (delta < 0 && b->open_total > 0)
        b->open_total--;
    else if (delta > 0)
        b->open_total++;
    ml_nodestate_t *ns = s_node_at(b, c->target);
    if (ns && delta < 0 && ns->open_cases > 0)
        ns->open_cases--;
    else if (ns && delta > 0)
        ns->open_cases++;
    ml_nodestate_t *op = s_node_at(b, c->opener);
    if (op && delta < 0 && op->opened > 0)
        op->opened--;
    else if (op && delta > 0)
        op->opened++;
}

/* The row of the store for c as it is in memory. */
static void s_row(ml_broker_t *b, const ml_case_t *c, ml_store_case_t *r)
{
    memset(r, 0, sizeof *r);
    r->case_id = c->id;
    r->kind = c->kind;
    r->state = c->state;
    r->priority = c->priority;
    r->opener = s_node_name(b, c->opener);
    r->target = s_node_name(b, c->target);
    r->service = c->service;
    r->linked = c->linked;
    r->opening_id = c->opening_id;
    r->opened_at = c->opened_at;
    r->updated_at = c->updated_at;
    r->deadline_at = c->deadline_at;
    r->deadline_state = c->deadline_state;
    r->escalations = c->escalations;
    r->follow_ups = c->follow_ups;
    r->closed = c->closed;
    r->n_objects = c->n_objects;
    r->chunks_expected = c->chunks_expected;
    r->chunks = c->chunks;
    r->dup_chunks = c->dup_chunks;
    r->chunk_bytes = c->chunk_bytes;
    r->fired = c->fired;
    r->version = c->version;
}

/* Copies a stored row into c (whose id is already the row's). */
static void s_from_row(ml_broker_t *b, ml_case_t *c, const ml_store_case_t *r)
{
    c->kind = (uint8_t)r->kind;
    c->state = (uint8_t)r->state;
    c->priority = (uint8_t)r->priority;
    c->opener = s_node_idx(b, r->opener);
    c->target = s_node_idx(b, r->target);
    c->service = s_service_keep(b, r->service);
    free(c->linked);
    c->linked = r->linked && *r->linked ? strdup(r->linked) : NULL;
    snprintf(c->opening_id, sizeof c->opening_id, "%s", r->opening_id ? r->opening_id : "");
    c->opened_at = r->opened_at;
    c->updated_at = r->updated_at;
    c->deadline_at = r->deadline_at;
    c->deadline_state = (uint8_t)r->deadline_state;
    c->escalations = (uint16_t)r->escalations;
    c->follow_ups = (uint16_t)r->follow_ups;
    c->closed = (uint8_t)(r->closed != 0);
    c->n_objects = r->n_objects;
    c->chunks_expected = r->chunks_expected;
    c->chunks = r->chunks;
    c->dup_chunks = r->dup_chunks;
    c->chunk_bytes = r->chunk_bytes;
    c->fired = (uint8_t)(r->fired != 0);
    c->version = r->version;
    c->unsaved = 0;
}

typedef struct {
    ml_broker_t *b;
    ml_case_t *c;
    int rc;
} s_load_t;

/* Reads a stored case into memory. It is counted already (see
 * s_target_count): an open one since start-up or its opening, a final one
 * not at all. */
static void s_load_one(void *arg, const ml_store_case_t *r)
{
    s_load_t *ld = arg;
    ml_case_t *c = ml_case_new(r->case_id);
    if (!c || ml_casetab_add(&ld->b->cases, c) != 0) {
        ml_case_free(c);
        ld->rc = ML_ENOMEM;
        return;
    }
    s_from_row(ld->b, c, r);
    ld->c = c;
}

static void s_count_open(void *arg, const char *opener, const char *target, int64_t n)
{
    ml_broker_t *b = arg;
    uint32_t k = n > 0 ? (uint32_t)n : 0;
    ml_nodestate_t *op = opener && *opener ? ml_bk_node(b, opener) : NULL;
    ml_nodestate_t *tg = target && *target ? ml_bk_node(b, target) : NULL;
    if (op)
        op->opened += k;
    if (tg)
        tg->open_cases += k;
    b->open_total += k;
}

int ml_bk_flow_load(ml_broker_t *b)
{
    /* The counts come from the store, where every open case is; memory
     * gets only the cases whose deadline the flow timer must watch. Cases
     * with messages still queued come in as those are queued again
     * (ml_bk_case_for_row). */
    int rc = ml_store_cases_open_counts(b->store, s_count_open, b);
    if (rc != 0)
        return rc;
    s_load_t ld = {b, NULL, 0};
    rc = ml_store_cases_timed(b->store, s_load_one, &ld);
    return rc ? rc : ld.rc;
}

/* Frees c once nothing needs it in memory (the store keeps it): no queued
 * or in-flight message, no put or change in flight, no delivery to record
 * again (each holds a reference), and no deadline running, since the
 * deadline scan (s_collect_due) and the overdue count of the status walk
 * memory only. An open case keeps its counts (s_target_count) and is read
 * back by s_lookup when a message for it comes: ~240 bytes a case that
 * nobody is working on is not kept for months. */
static void s_apply(ml_broker_t *b, ml_case_t *c, const ml_store_caseop_t *ops, size_t n,
                    const ml_redo_t *redo);

static void s_maybe_evict(ml_broker_t *b, ml_case_t *c)
{
    if (c->refs > 0)
        return;
    if (c->unsaved && !c->gone && !c->stale && !c->pending) {
        /* A count only memory has (a duplicate chunk) is stored first, as
         * a change of the row alone (no timeline entry, updated_at kept):
         * the change holds the case until the store has it. */
        c->unsaved = 0;
        ml_store_caseop_t op = {.n_events = 0};
        c->version++;
        s_row(b, c, &op.row);
        s_apply(b, c, &op, 1, NULL);
        return;
    }
    if (c->gone) {
        ml_case_free(c); /* already out of the table */
    } else if (c->closed ||
               (!c->deadline_at && !c->stale && !c->pending && !c->redo && !c->unstored)) {
        ml_casetab_remove(&b->cases, c);
        ml_case_free(c);
    }
}

void ml_bk_case_release(ml_broker_t *b, ml_case_t *c)
{
    if (!c)
        return;
    if (c->refs > 0)
        c->refs--;
    s_maybe_evict(b, c);
}

/* The case with this id: from memory, else (a final case, or an open one
 * nothing needed in memory) read back from the store into memory. *out is
 * NULL when there is none, or when it cannot be read: then the return is
 * ML_ESTORE or ML_ENOMEM (a message for it is refused for now, since the
 * case may well exist), else 0. The caller takes a reference or calls
 * s_maybe_evict when done. */
static int s_lookup_rc(ml_broker_t *b, const char *id, ml_case_t **out)
{
    *out = NULL;
    if (!id || !*id)
        return 0;
    if ((*out = ml_casetab_find(&b->cases, id)) != NULL)
        return 0;
    s_load_t ld = {b, NULL, 0};
    int rc = ml_store_case_get(b->store, id, s_load_one, &ld);
    if (rc == ML_ENOTFOUND)
        return 0;
    if (rc == 0 && ld.rc != 0)
        rc = ld.rc;
    *out = rc == 0 ? ld.c : NULL;
    return rc;
}

static ml_case_t *s_lookup(ml_broker_t *b, const char *id)
{
    ml_case_t *c;
    s_lookup_rc(b, id, &c);
    return c;
}

ml_case_t *ml_bk_case_for_row(ml_broker_t *b, const char *case_id, int kind)
{
    if (ml_case_kind_of_message(kind) == ML_CASE_NONE)
        return NULL;
    ml_case_t *c = s_lookup(b, case_id);
    if (c)
        c->refs++;
    return c;
}

typedef struct {
    ml_broker_t *b;
    ml_case_t *c;
} s_resync_t;

static void s_resync_row(void *arg, const ml_store_case_t *r)
{
    s_resync_t *rs = arg;
    s_from_row(rs->b, rs->c, r);
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

static void s_target_count(ml_broker_t *b, ml_case_t *c, int delta);

static void s_unsnap(ml_broker_t *b, ml_case_t *c, const s_snap_t *s)
{
    s_target_count(b, c, -1);
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
    s_target_count(b, c, +1);
}

/* After a change failed to commit: the store is the truth. A case whose
 * opening did not commit is not a case: it leaves the table now and memory
 * once nothing points to it. */
static void s_resync(ml_broker_t *b, ml_case_t *c)
{
    if (!c || c->gone)
        return;
    s_target_count(b, c, -1);
    s_resync_t rs = {b, c};
    int rc = ml_store_case_get(b->store, c->id, s_resync_row, &rs);
    if (rc == 0 && c->unstored) {
        /* The opening was refused (an id in use) or was a resend: the row
         * read is the case that already had the id, which left memory
         * counted (s_target_count) and must not count twice. */
        c->unstored = 0;
        return;
    }
    if (rc == ML_ENOTFOUND) {
        ml_casetab_remove(&b->cases, c);
        c->gone = 1;
        /* Deliveries waiting to be recorded have no case to go to. */
        while (c->redo) {
            ml_redo_t *r = c->redo;
            c->redo = r->next;
            free(r);
            if (c->refs > 0)
                c->refs--; /* the caller holds one: no eviction here */
        }
        return;
    }
    if (rc != 0)
        ml_log(ML_LOG_ERROR, "cases", "case %s: cannot read it back from the store", c->id);
    s_target_count(b, c, +1);
}

void ml_bk_case_pending(ml_case_t *c)
{
    if (c)
        c->pending++;
}

/* The store answered one change of c (failed: it was not made as the broker
 * made it in memory). Changes handed to the store after it were checked
 * against it, so they fail too (their versions follow it); memory is read
 * back only once every one of them has been answered. Reading it earlier
 * would take in a store that is about to move (a change still queued would
 * land on top of what was read, and memory would lag the store by it), and
 * a message checked against that memory could then be stored on top of a
 * change that never was. Until then the case takes no new change
 * (s_stale_refuse). */
static void s_settle(ml_broker_t *b, ml_case_t *c, int failed)
{
    if (!c)
        return;
    if (c->pending > 0)
        c->pending--;
    if (failed)
        c->stale = 1;
    if (c->stale && c->pending == 0) {
        c->stale = 0;
        s_resync(b, c);
    }
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
    ml_bk_refuse_for_now(b, s, env->id, ml_bk_hold_key(env, k, sizeof k), NACK_(CONFLICT), err);
    return 1;
}

/* ------------------------------------------------------------------ */
/* Reading messages                                                    */

/* The one refusal for a case a node may not see: a case that does not
 * exist, and one that exists but is none of the sender's, get the same code
 * (NACK_NOT_PARTY) and this same sentence, so the answer says nothing about
 * whether the case exists or what kind it is (F11). */
static void s_not_party(const ml_nodestate_t *sender, const char *case_id, char *err, size_t len)
{
    snprintf(err, len,
             "node %s has no part in case %s: there is no such case, or the node neither opened "
             "it nor is responsible for it",
             sender->node->id, case_id);
}

static int s_party(ml_broker_t *b, const ml_case_t *c, const ml_nodestate_t *sender)
{
    uint32_t idx = ml_bk_node_index(b, sender);
    if (idx == c->opener)
        return ML_PARTY_OPENER;
    if (idx == c->target)
        return ML_PARTY_TARGET;
    return ML_PARTY_OTHER;
}

/* The state a message asks its case to move to, or -1 for messages that
 * do not change it (chunks, resend requests). */
static int s_msg_state(const ml_envelope_t *e)
{
    switch (e->payload_case) {
    case MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL_UPDATE:
        return (int)e->referral_update->status;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_UPDATE:
        return (int)e->imaging_update->status;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_REPORT:
        return IMG_(REPORTED);
    case MEDLINK__V1__ENVELOPE__PAYLOAD_DOWN_TRANSFER_UPDATE:
        return (int)e->down_transfer_update->status;
    default:
        return -1;
    }
}

static int s_nonempty(const char *s)
{
    return s && *s;
}

/* A line for the timeline: what the message says beyond its state. */
static void s_detail(const ml_envelope_t *e, char *buf, size_t len)
{
    char t[32];
    buf[0] = '\0';
    switch (e->payload_case) {
    case MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL_UPDATE: {
        const Medlink__V1__ReferralUpdate *u = e->referral_update;
        if (s_nonempty(u->redirect_to))
            snprintf(buf, len, "redirected to %s%s%s", u->redirect_to,
                     s_nonempty(u->reason) ? ": " : "", s_nonempty(u->reason) ? u->reason : "");
        else if (u->scheduled_at)
            snprintf(buf, len, "appointment %s%s%s", ml_time_format(u->scheduled_at, t, sizeof t),
                     s_nonempty(u->department) ? ", " : "",
                     s_nonempty(u->department) ? u->department : "");
        else if (s_nonempty(u->reason))
            snprintf(buf, len, "%s", u->reason);
        else if (s_nonempty(u->outcome_summary))
            snprintf(buf, len, "outcome: %s", u->outcome_summary);
        else if (s_nonempty(u->notes))
            snprintf(buf, len, "%s", u->notes);
        break;
    }
    case MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_UPDATE: {
        const Medlink__V1__ImagingUpdate *u = e->imaging_update;
        if (u->status == IMG_(STUDY_RECEIVED))
            snprintf(buf, len, "%u object(s), %llu bytes verified", u->objects_received,
                     (unsigned long long)u->bytes_received);
        else if (s_nonempty(u->reason))
            snprintf(buf, len, "%s", u->reason);
        else if (s_nonempty(u->notes))
            snprintf(buf, len, "%s", u->notes);
        break;
    }
    case MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_REPORT: {
        const Medlink__V1__ImagingReport *r = e->imaging_report;
        snprintf(buf, len, "%sreport signed by %s", r->critical_finding ? "CRITICAL " : "",
                 r->reader && s_nonempty(r->reader->name) ? r->reader->name : "the reader");
        break;
    }
    case MEDLINK__V1__ENVELOPE__PAYLOAD_DOWN_TRANSFER_UPDATE: {
        const Medlink__V1__DownTransferUpdate *u = e->down_transfer_update;
        if (u->status == DT_(FOLLOW_UP))
            snprintf(buf, len, "follow-up %u%s%s", u->follow_up_number,
                     s_nonempty(u->notes) ? ": " : "", s_nonempty(u->notes) ? u->notes : "");
        else if (s_nonempty(u->reason))
            snprintf(buf, len, "%s", u->reason);
        else if (s_nonempty(u->notes))
            snprintf(buf, len, "%s", u->notes);
        break;
    }
    case MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_RESEND: {
        const Medlink__V1__ImagingResend *r = e->imaging_resend;
        snprintf(buf, len, "object %u: %zu chunk(s) asked for again%s%s", r->object_index,
                 r->n_chunk_index, s_nonempty(r->reason) ? ": " : "",
                 s_nonempty(r->reason) ? r->reason : "");
        break;
    }
    default:
        break;
    }
}

/* Is a message with this id already stored, or on its way to the store?
 * Asked only when a message would be refused: an agent that resends after
 * a reconnect must get Accepted (as a duplicate), not a refusal for a step
 * its first copy already made. */
static int s_known_id(ml_broker_t *b, ml_session_t *s, const char *id)
{
    if (ml_store_lookup(b->store, id, NULL, NULL) == 0)
        return 1;
    ml_put_t *lists[] = {b->orphans, s ? s->puts : NULL};
    for (size_t i = 0; i < 2; i++)
        for (ml_put_t *p = lists[i]; p; p = p->next)
            if (strcmp(p->id, id) == 0)
                return 1;
    return 0;
}

static void s_refuse_submit(ml_broker_t *b, ml_session_t *s, const ml_envelope_t *env, int rc)
{
    char k[300];
    if (rc == ML_EAGAIN)
        ml_bk_refuse_for_now(b, s, env->id, ml_bk_hold_key(env, k, sizeof k), NACK_(RATE_LIMITED),
                             "broker busy: store backlog full, retry later");
    else
        ml_bk_refuse_for_now(b, s, env->id, ml_bk_hold_key(env, k, sizeof k), NACK_(STORE),
                             "store unavailable, retry later");
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
        .to = ml_bk_hold_key(env, hold_key, sizeof hold_key),
    };
    int rc = ml_bk_submit(b, &m);
    if (rc != 0)
        s_refuse_submit(b, s, env, rc);
}

/* ------------------------------------------------------------------ */
/* Deadlines                                                           */

static int s_met(const ml_case_t *c, int state)
{
    return ml_case_terminal(c->kind, state) ||
           ml_case_rank(c->kind, state) >= ml_case_rank(c->kind, c->deadline_state);
}

/* Applies the deadline rules to a case that moved from old (0 = it was
 * just opened) to its current state. */
static void s_deadline_step(ml_broker_t *b, ml_case_t *c, int old, int64_t now)
{
    if (c->deadline_at && s_met(c, c->state)) {
        c->deadline_at = 0;
        c->fired = 0;
    }
    const ml_deadline_rule_t *r = ml_broker_config_deadline(b->cfg, c->kind, c->priority);
    if (!r->set || c->deadline_at || c->closed)
        return;
    int starts = r->after_state ? (c->state == r->after_state && old != c->state) : old == 0;
    if (!starts)
        return;
    c->deadline_state = (uint8_t)r->target_state;
    if (s_met(c, c->state))
        return;
    c->deadline_at = now + r->ms;
    c->fired = 0;
}

/* ------------------------------------------------------------------ */
/* Escalations and notices                                             */

typedef struct s_change {
    struct s_change *prev, *next; /* in b->changes until the store answers */
    ml_broker_t *b;
    ml_case_t *c;
    ml_redo_t redo; /* a delivery to record again if the change fails */
    int has_redo;
} s_change_t;

static void s_change_unlink(s_change_t *x)
{
    if (x->prev)
        x->prev->next = x->next;
    else
        x->b->changes = x->next;
    if (x->next)
        x->next->prev = x->prev;
    x->prev = x->next = NULL;
}

void ml_bk_flow_free_changes(ml_broker_t *b)
{
    while (b->changes) {
        s_change_t *x = b->changes;
        s_change_unlink(x);
        free(x); /* its case goes with the case table */
    }
}

/* The callback argument of a broker-made change: holds a reference to the
 * case until the store has answered. NULL out of memory (the change is
 * then stored without an answer). */
static s_change_t *s_change_arg(ml_broker_t *b, ml_case_t *c)
{
    s_change_t *x = c ? calloc(1, sizeof *x) : NULL;
    if (x) {
        x->b = b;
        x->c = c;
        c->refs++;
    }
    return x;
}

static void s_resync(ml_broker_t *b, ml_case_t *c);
static void s_change_done(void *arg, int rc, int64_t seq, int duplicate);

static void s_apply(ml_broker_t *b, ml_case_t *c, const ml_store_caseop_t *ops, size_t n,
                    const ml_redo_t *redo)
{
    s_change_t *x = s_change_arg(b, c);
    if (x) {
        x->redo = redo ? *redo : (ml_redo_t){0};
        x->has_redo = redo != NULL;
    }
    if (ml_store_case_apply(b->store, ops, n, x ? s_change_done : NULL, x) != 0) {
        if (x) {
            ml_bk_case_release(b, c);
            free(x);
        }
        return;
    }
    if (x) {
        x->prev = NULL;
        x->next = b->changes;
        if (b->changes)
            b->changes->prev = x;
        b->changes = x;
        ml_bk_case_pending(c);
    }
}

/* Keeps an acknowledged delivery whose change could not be made, to be
 * recorded again by the flow timer once the case is back in step. Each
 * entry holds a reference, so a case that closes meanwhile stays in memory
 * until its deliveries are recorded. */
static void s_redo_push(ml_case_t *c, const ml_redo_t *r)
{
    ml_redo_t *n = malloc(sizeof *n);
    if (!n) {
        ml_log(ML_LOG_ERROR, "cases", "case %s: out of memory: delivery of %s not recorded", c->id,
               r->id);
        return;
    }
    *n = *r;
    n->next = NULL;
    ml_redo_t **tail = &c->redo;
    while (*tail)
        tail = &(*tail)->next;
    *tail = n;
    c->refs++;
}

/* A change the broker made by itself was committed, or not: then the case
 * is read back from the store (and, for a deadline, fires again). */
static void s_change_done(void *arg, int rc, int64_t seq, int duplicate)
{
    s_change_t *x = arg;
    (void)seq;
    (void)duplicate;
    if (!x)
        return;
    s_change_unlink(x);
    if (rc != 0) {
        ml_log(ML_LOG_WARN, "cases",
               "case %s: the broker's own change was not stored (%s); reloading", x->c->id,
               ml_strerror(rc));
        if (x->has_redo && !x->c->gone)
            s_redo_push(x->c, &x->redo);
    }
    s_settle(x->b, x->c, rc != 0);
    ml_bk_case_release(x->b, x->c);
    free(x);
}

static int s_is_ops(ml_broker_t *b, const ml_nodestate_t *ns)
{
    if (b->cfg->n_escalate_to == 0)
        return ns->node->role == ML_ROLE_OPS;
    for (size_t i = 0; i < b->cfg->n_escalate_to; i++)
        if (strcmp(b->cfg->escalate_to[i], ns->node->id) == 0)
            return 1;
    return 0;
}

int ml_bk_is_ops(ml_broker_t *b, const ml_nodestate_t *ns)
{
    return s_is_ops(b, ns);
}

/* Who an Escalation is about when it is not simply c as it is now: after a
 * deadline fallback, c names the fallback hospital and its new deadline,
 * while the Escalation must name the hospital that missed the old one
 * (control.proto: "who had the case"). */
typedef struct {
    const char *target; /* NULL: c's target */
    int64_t deadline_at;
    int no_ops; /* the ops nodes get this in a summary of the tick (s_overdue_t) */
} s_esc_about_t;

/* Sends an Escalation to the ops nodes and to also_to (when not one of
 * them), after queueing ops (the case change that goes with it). The
 * change and the messages are separate store requests: the messages carry
 * no change, so that a store refusing them (a full disk) only delays them
 * (ml_bk_retry_own), and a change that fails is read back from the store
 * and made again (a deadline fires again). about may be NULL. */
static void s_escalate(ml_broker_t *b, ml_case_t *c, int reason, const char *detail,
                       const char *expected, const char *message_id, const char *redirected_to,
                       ml_nodestate_t *also_to, const ml_store_caseop_t *ops, size_t n_ops,
                       const s_esc_about_t *about)
{
    Medlink__V1__Escalation esc = MEDLINK__V1__ESCALATION__INIT;
    esc.reason = reason;
    esc.case_id = c ? c->id : (char *)"";
    esc.case_kind = c ? c->kind : 0;
    esc.state = c ? (char *)ml_case_state_name(c->kind, c->state) : (char *)"";
    esc.expected_state = (char *)(expected ? expected : "");
    esc.deadline_at = about ? about->deadline_at : c ? c->deadline_at : 0;
    esc.target = about && about->target ? (char *)about->target
                 : c                    ? (char *)s_node_name(b, c->target)
                                        : (char *)"";
    esc.redirected_to = (char *)(redirected_to ? redirected_to : "");
    esc.message_id = (char *)(message_id ? message_id : "");
    esc.detail = (char *)(detail ? detail : "");
    int sent = 0, no_ops = about && about->no_ops;
    if (n_ops > 0)
        s_apply(b, c, ops, n_ops, NULL);
    for (size_t i = 0; i <= b->n_nodes; i++) {
        ml_nodestate_t *ns = i < b->n_nodes ? b->nodes[i] : also_to;
        if (!ns || ns->removed || (i < b->n_nodes && (no_ops || !s_is_ops(b, ns))) ||
            (i == b->n_nodes && s_is_ops(b, ns) && !no_ops))
            continue;
        ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
        env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ESCALATION;
        env.escalation = &esc;
        env.case_id = c ? c->id : (char *)(message_id ? message_id : "");
        env.priority = c && c->priority == MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY
                           ? MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY
                           : MEDLINK__V1__PRIORITY__PRIORITY_URGENT;
        if (ml_bk_emit(b, &env, ns, NULL, NULL, 0) == 0)
            sent++;
    }
    /* A case in a summary is logged in the summary's one line. */
    if (!no_ops)
        ml_log(ML_LOG_WARN, "escalation", "case %s: %s (told %d node(s))", c ? c->id : "-",
               detail ? detail : "", sent);
}

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
        if (ns->removed || !s_is_ops(b, ns))
            continue;
        ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
        env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ESCALATION;
        env.escalation = &esc;
        env.case_id = id;
        env.priority = MEDLINK__V1__PRIORITY__PRIORITY_URGENT;
        if (ml_bk_emit(b, &env, ns, NULL, NULL, 0) == 0)
            sent++;
    }
    ml_log(ML_LOG_WARN, "escalation", "%s (summary %s, told %d ops node(s))", detail, id, sent);
}

/* Forwards the referral that opened c to c's current target (after a
 * redirect): the same content and sender, a new message id. */
static void s_forward_opening(ml_broker_t *b, ml_case_t *c)
{
    int64_t seq = 0;
    uint8_t *blob = NULL;
    size_t len = 0;
    ml_envelope_t *env = NULL;
    ml_nodestate_t *to = s_node_at(b, c->target);
    int rc = ML_ENOTFOUND;
    if (!to || ml_store_lookup(b->store, c->opening_id, &seq, NULL) != 0 ||
        (rc = ml_store_fetch(b->store, seq, &blob, &len)) != 0 ||
        (rc = ml_env_unpack(blob, len, &env)) != 0) {
        ml_log(ML_LOG_ERROR, "cases", "case %s: cannot forward its opening message %s to %s: %s",
               c->id, c->opening_id, to ? to->node->id : "(unknown node)", ml_strerror(rc));
        goto out;
    }
    /* A shallow copy with a new id: ml_bk_emit writes to, created_at and
     * kind into the copy, and env keeps the strings it owns. */
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    ml_envelope_t copy = *env;
    copy.id = id;
    if (ml_bk_emit(b, &copy, to, c, NULL, 0) == 0)
        ml_log(ML_LOG_INFO, "cases", "case %s: referral forwarded to %s as %s", c->id, to->node->id,
               id);
out:
    ml_env_free(&env);
    free(blob);
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
    ml_bk_refuse_for_now(b, s, env->id, ml_bk_hold_key(env, k, sizeof k), NACK_(RATE_LIMITED), err);
    return 1;
}

/* open_cases_per_node: one node cannot make the broker keep an unbounded
 * number of cases (memory, disk, deadlines, escalations) by opening cases
 * nobody closes (F8). The refusal is permanent (NACK_FORBIDDEN, the agent
 * moves the file to rejected/ with the reason): a transient one would hold
 * every later message of the sender to that recipient (ml_bk_refuse_for_now),
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
    ml_bk_refuse(b, s, env->id, NACK_(FORBIDDEN), err);
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
    ml_bk_refuse(b, s, env->id, NACK_(FORBIDDEN), err);
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
            s_submit_duplicate(b, s, env, rec, len, digest, s_node_at(b, exist->target));
        } else {
            snprintf(err, sizeof err,
                     "case_id %s is already in use by another case; a new case needs a new "
                     "case_id",
                     env->case_id);
            ml_bk_refuse(b, s, env->id, NACK_(INVALID), err);
        }
        return;
    }

    const char *service = s_service_name(b, env->to);
    ml_nodestate_t *rs;
    if (service) {
        rs = s_pick_consumer(b, service, sender->node->role, env->kind);
        if (!rs) {
            snprintf(err, sizeof err,
                     "forbidden route: no node serving %s may receive %s from role %s", service,
                     ml_kind_name(env->kind), ml_role_name(sender->node->role));
            ml_bk_refuse(b, s, env->id, NACK_(FORBIDDEN), err);
            return;
        }
    } else {
        rs = ml_bk_node(b, env->to);
        if (!rs) {
            snprintf(err, sizeof err, "unknown recipient node '%s'", env->to);
            ml_bk_refuse(b, s, env->id, NACK_(UNKNOWN_NODE), err);
            return;
        }
        if (s_acl_refuse(b, s, env, rs))
            return;
    }
    if (rs == sender) {
        ml_bk_refuse(b, s, env->id, NACK_(INVALID), "a node cannot open a case with itself");
        return;
    }
    /* Addressed to a service, it joins the sender's stream to the node it
     * goes to: a message to that node refused for now holds it too. */
    if (service && ml_bk_held(b, s, rs->node->id, env->id))
        return;
    if (s_quota_refuse(b, s, env, rs)) {
        if (service)
            ml_bk_hold_also(s, rs->node->id, env->id);
        return;
    }
    /* A resend of an opening whose case left memory counts in the quota
     * already: it is answered as the duplicate it is, not refused. */
    if ((long)sender->opened >= b->cfg->open_cases_per_node && s_known_id(b, s, env->id)) {
        s_submit_duplicate(b, s, env, rec, len, digest, rs);
        return;
    }
    if (s_open_quota_refuse(b, s, env))
        return;

    /* A referral back up from a rehab down-transfer closes that case. */
    ml_case_t *lc = NULL;
    if (env->kind == K_(REFERRAL) && s_nonempty(env->referral->linked_case_id)) {
        const char *lid = env->referral->linked_case_id;
        if (s_lookup_rc(b, lid, &lc) != 0) {
            s_refuse_submit(b, s, env, ML_ESTORE);
            return;
        }
        int code = 0;
        if (!lc || s_party(b, lc, sender) == ML_PARTY_OTHER) {
            /* As for updates: unknown and not yours read the same (F11). */
            code = NACK_(NOT_PARTY);
            s_not_party(sender, lid, err, sizeof err);
        } else if (lc->kind != ML_CASE_DOWN_TRANSFER) {
            code = NACK_(INVALID);
            snprintf(err, sizeof err, "referral.linked_case_id %s is not a rehab down-transfer",
                     lid);
        } else if (s_party(b, lc, sender) != ML_PARTY_TARGET) {
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
                s_maybe_evict(b, lc);
            ml_bk_refuse(b, s, env->id, code, err);
            return;
        }
        lc->refs++; /* held while this function works on it */
        if (s_stale_refuse(b, s, env, lc)) {
            ml_bk_case_release(b, lc);
            return;
        }
    }
    s_snap_t lc_snap;
    if (lc)
        s_snap(lc, &lc_snap);

    ml_case_t *c = ml_case_new(env->case_id);
    if (!c || ml_casetab_add(&b->cases, c) != 0) {
        ml_case_free(c);
        ml_bk_case_release(b, lc);
        char k[300];
        ml_bk_refuse_for_now(b, s, env->id, ml_bk_hold_key(env, k, sizeof k), NACK_(STORE),
                             "out of memory");
        return;
    }
    c->kind = (uint8_t)ck;
    c->state = (uint8_t)ml_case_initial_state(ck);
    c->priority = (uint8_t)env->priority;
    c->opener = ml_bk_node_index(b, sender);
    c->target = ml_bk_node_index(b, rs);
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
    s_deadline_step(b, c, 0, now);
    s_target_count(b, c, +1);

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
    s_row(b, c, &ops[0].row);
    ops[0].open = 1;
    ops[0].events = &ev_open;
    ops[0].n_events = 1;
    size_t n_ops = 1;

    char lc_detail[300];
    ml_store_event_t ev_lc;
    if (lc) {
        int old = lc->state;
        s_target_count(b, lc, -1);
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
        s_row(b, lc, &ops[1].row);
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
            .to = ml_bk_hold_key(env, hold_key, sizeof hold_key),
            .ops = ops,
            .n_ops = n_ops,
            .cs = c,
            .linked = lc,
            .opened = opened,
            .action = lc ? ML_BK_AFTER_REREFERRED : ML_BK_AFTER_NONE,
        };
        rc = ml_bk_submit(b, &m);
    }
    free(owned);
    if (rc != 0) {
        /* Nothing was queued: the case never existed. */
        s_target_count(b, c, -1);
        ml_casetab_remove(&b->cases, c);
        ml_case_free(c);
        if (lc)
            s_unsnap(b, lc, &lc_snap);
        ml_bk_case_release(b, lc);
        if (service)
            ml_bk_hold_also(s, rs->node->id, env->id);
        s_refuse_submit(b, s, env, rc);
        return;
    }
    ml_bk_case_release(b, lc);
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
    switch (env->payload_case) {
    case MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL_UPDATE: {
        /* The fields the workflow table asks for with this state. */
        const Medlink__V1__ReferralUpdate *u = env->referral_update;
        const char *field = ml_case_required_field(ML_CASE_REFERRAL, st);
        int missing = (st == REF_(SCHEDULED) && u->scheduled_at <= 0) ||
                      (st == REF_(DISCHARGED) && !s_nonempty(u->outcome_summary));
        if (field && missing) {
            snprintf(err, errlen, "%s is required when status is %s", field,
                     ml_case_state_name(ML_CASE_REFERRAL, st));
            return NACK_(INVALID);
        }
        if (st == REF_(REDIRECTED)) {
            const char *to = env->referral_update->redirect_to;
            ml_nodestate_t *ns = ml_bk_node(b, to);
            ml_nodestate_t *opener = s_node_at(b, c->opener);
            if (!ns) {
                snprintf(err, errlen, "referral_update.redirect_to names unknown node '%s'", to);
                return NACK_(UNKNOWN_NODE);
            }
            if (ml_bk_node_index(b, ns) == c->target || ns == opener) {
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
                         ml_role_name(ns->node->role), s_node_name(b, c->opener));
                return NACK_(FORBIDDEN);
            }
            *redirect = ns;
        }
        break;
    }
    case MEDLINK__V1__ENVELOPE__PAYLOAD_DOWN_TRANSFER_UPDATE:
        if (st == DT_(RE_REFERRED)) {
            snprintf(err, errlen,
                     "DOWN_TRANSFER_RE_REFERRED is set by the broker: send a Referral whose "
                     "linked_case_id is %s",
                     c->id);
            return NACK_(INVALID);
        }
        if (st == DT_(FOLLOW_UP) &&
            env->down_transfer_update->follow_up_number != (uint32_t)c->follow_ups + 1) {
            snprintf(err, errlen,
                     "down_transfer_update.follow_up_number %u: case %s has %u follow-up(s), so "
                     "the next one is %u",
                     env->down_transfer_update->follow_up_number, c->id, c->follow_ups,
                     c->follow_ups + 1);
            return NACK_(INVALID);
        }
        break;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_UPDATE:
        if (env->imaging_update->incoming_expired && st != IMG_(REJECTED)) {
            snprintf(err, errlen,
                     "imaging_update.incoming_expired is set only with IMAGING_REJECTED");
            return NACK_(INVALID);
        }
        break;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CHUNK:
        if (env->imaging_chunk->object_index >= c->n_objects) {
            snprintf(err, errlen,
                     "imaging_chunk.object_index %u: the consult of case %s has %u object(s)",
                     env->imaging_chunk->object_index, c->id, c->n_objects);
            return NACK_(INVALID);
        }
        break;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_RESEND:
        if (env->imaging_resend->object_index >= c->n_objects) {
            snprintf(err, errlen,
                     "imaging_resend.object_index %u: the consult of case %s has %u object(s)",
                     env->imaging_resend->object_index, c->id, c->n_objects);
            return NACK_(INVALID);
        }
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
    if (s_lookup_rc(b, env->case_id, &c) != 0) {
        s_refuse_submit(b, s, env, ML_ESTORE);
        return;
    }
    /* The party first: a node with no part in the case gets the very answer
     * it would get for a case that does not exist, so it learns neither
     * that the case exists nor its kind (F11). */
    int outsider = !c || s_party(b, c, sender) == ML_PARTY_OTHER;
    if (outsider || c->kind != ck) {
        if (s_known_id(b, s, env->id)) {
            s_submit_duplicate(b, s, env, rec, len, digest, NULL);
        } else if (outsider) {
            s_not_party(sender, env->case_id, err, sizeof err);
            ml_bk_refuse(b, s, env->id, NACK_(NOT_PARTY), err);
        } else {
            snprintf(err, sizeof err, "case %s is not a%s %s case, so it takes no %s", env->case_id,
                     ck == ML_CASE_IMAGING ? "n" : "", ml_case_kind_name(ck),
                     ml_kind_name(env->kind));
            ml_bk_refuse(b, s, env->id, NACK_(INVALID), err);
        }
        if (c)
            s_maybe_evict(b, c);
        return;
    }
    c->refs++; /* held while this function works on it */
    if (s_stale_refuse(b, s, env, c))
        goto out;
    int party = s_party(b, c, sender);
    int st = s_msg_state(env);
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
        to = s_node_at(b, party == ML_PARTY_OPENER ? c->target : c->opener);
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
        if (s_known_id(b, s, env->id))
            s_submit_duplicate(b, s, env, rec, len, digest, to);
        else
            ml_bk_refuse(b, s, env->id, code, err);
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
        s_target_count(b, c, -1);
        c->state = (uint8_t)st;
        c->closed = (uint8_t)ml_case_terminal(ck, st);
        if (env->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_UPDATE &&
            env->imaging_update->incoming_expired)
            action = ML_BK_AFTER_EXPIRED;
        if (redirect) {
            c->target = ml_bk_node_index(b, redirect);
            action = ML_BK_AFTER_FORWARD;
            /* The new hospital gets the full time to decide. */
            c->deadline_at = 0;
            c->fired = 0;
            const ml_deadline_rule_t *r = ml_broker_config_deadline(b->cfg, ck, c->priority);
            if (r->set && !r->after_state) {
                c->deadline_state = (uint8_t)r->target_state;
                if (!s_met(c, st))
                    c->deadline_at = now + r->ms;
            }
        }
        s_target_count(b, c, +1);
        if (st == DT_(FOLLOW_UP) && ck == ML_CASE_DOWN_TRANSFER)
            c->follow_ups++;
        s_deadline_step(b, c, old, now);
    }
    if (env->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CHUNK) {
        chunk_bytes = (int)env->imaging_chunk->data.len;
        c->chunks++;
        c->chunk_bytes += (uint64_t)chunk_bytes;
    }
    c->updated_at = now;
    c->version++;

    char detail[400];
    s_detail(env, detail, sizeof detail);
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
    s_row(b, c, &op.row);

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
            .to = ml_bk_hold_key(env, hold_key, sizeof hold_key),
            .ops = &op,
            .n_ops = 1,
            .cs = c,
            .action = action,
            .chunk_bytes = chunk_bytes,
        };
        rc = ml_bk_submit(b, &m);
    }
    free(owned);
    if (rc != 0) {
        s_unsnap(b, c, &snap); /* nothing reached the store */
        s_refuse_submit(b, s, env, rc);
    }
out:
    ml_bk_case_release(b, c);
}

void ml_bk_flow_route(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env, const uint8_t *rec,
                      size_t len, const uint8_t *digest, int repack)
{
    if (ml_case_kind_of_message(env->kind) == ML_CASE_NONE) {
        char err[160];
        snprintf(err, sizeof err, "%s messages are sent by the broker only",
                 ml_kind_name(env->kind));
        ml_bk_refuse(b, s, env->id, NACK_(FORBIDDEN), err);
        return;
    }
    if (ml_case_opens(env->kind))
        s_route_open(b, s, env, rec, len, digest, repack);
    else
        s_route_update(b, s, env, rec, len, digest, repack);
}

/* ------------------------------------------------------------------ */
/* After the store                                                     */

static void s_notify_rereferred(ml_broker_t *b, ml_case_t *dt, ml_case_t *ref)
{
    ml_nodestate_t *hospital = s_node_at(b, dt->opener);
    if (!hospital)
        return;
    char notes[300];
    snprintf(notes, sizeof notes, "%s referred the patient back up to %s (case %s)",
             s_node_name(b, dt->target), s_node_name(b, ref->target), ref->id);
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
    ml_bk_emit(b, &env, hospital, dt, NULL, 0);
}

/* The reading centre expired c's study (IMAGING_REJECTED with
 * incoming_expired, now stored): the consult it was delivered becomes a dead
 * letter, which escalates to ops and the requesting clinic as any dead
 * letter does (ml_bk_dead_letter), and shows in `medlinkctl dlq`. */
static void s_study_expired(ml_broker_t *b, ml_case_t *c)
{
    ml_nodestate_t *centre = s_node_at(b, c->target);
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
    c->refs++; /* the item's; ml_bk_dead_letter releases it */
    snprintf(it.id, sizeof it.id, "%s", c->opening_id);
    ml_bk_dead_letter(b, centre, &it, why);
}

void ml_bk_flow_committed(ml_broker_t *b, ml_put_t *p, int rc, int duplicate)
{
    ml_case_t *c = p->cs, *lc = p->linked;
    /* The opening is stored: the case is this one (see s_resync). */
    if (c && c->unstored && rc == 0 && !duplicate && strcmp(p->id, c->opening_id) == 0)
        c->unstored = 0;
    if (p->has_ops) {
        /* A failure, or a resend whose first copy made the change already
         * (an opening sent again after its case left memory, say): memory
         * follows the store. (A chunk the broker had already only moved the
         * version on, as memory did; its count is taken back below.) */
        int failed = rc != 0 || (duplicate && p->kind != K_(IMAGING_CHUNK));
        /* An id in use is the sender's mistake, refused (and logged
         * within its node's budget) like any other. */
        if (rc != 0)
            ml_log(rc == ML_EIDUSED ? ML_LOG_DEBUG : ML_LOG_WARN, "cases",
                   "case %s: change with message %s not stored (%s); reloading", c ? c->id : "-",
                   p->id, ml_strerror(rc));
        s_settle(b, c, failed);
        s_settle(b, lc, failed);
    }
    if (rc == 0 && duplicate && c && p->kind == K_(IMAGING_CHUNK)) {
        /* A chunk the broker already had: it does not count twice. */
        if (c->chunks > 0)
            c->chunks--;
        uint64_t n = (uint64_t)p->chunk_bytes;
        c->chunk_bytes -= c->chunk_bytes >= n ? n : c->chunk_bytes;
        c->dup_chunks++;
        c->unsaved = 1; /* the store did not write the row of a duplicate */
    } else if (rc == 0 && !duplicate) {
        if (p->action == ML_BK_AFTER_FORWARD && c)
            s_forward_opening(b, c);
        else if (p->action == ML_BK_AFTER_REREFERRED && c && lc)
            s_notify_rereferred(b, lc, c);
        else if (p->action == ML_BK_AFTER_EXPIRED && c)
            s_study_expired(b, c);
    }
    ml_bk_case_release(b, c);
    ml_bk_case_release(b, lc);
}

/* Stores a change the broker makes by itself, and sends the opener a
 * notice when there is one (a separate message without the change, so a
 * full store only delays it: ml_bk_retry_own). */
static void s_broker_change(ml_broker_t *b, ml_case_t *c, const ml_store_event_t *ev,
                            ml_envelope_t *notice, ml_redo_t *redo)
{
    ml_store_caseop_t op = {.events = ev, .n_events = ev ? 1 : 0};
    c->version++;
    c->updated_at = ev ? ev->at : ml_now_ms();
    s_row(b, c, &op.row);
    ml_nodestate_t *opener = s_node_at(b, c->opener);
    int notify = notice && opener && b->cfg->notify_delivered;
    if (redo)
        redo->notified = redo->notified || notify;
    s_apply(b, c, &op, 1, redo);
    if (notify)
        ml_bk_emit(b, notice, opener, c, NULL, 0);
}

/* Records that ns acknowledged a message of case c (moving a referral to
 * DELIVERED, a consult to ASSIGNED). A case being read back takes it later
 * (the flow timer), as does one whose change is not stored. */
static void s_delivered(ml_broker_t *b, ml_case_t *c, ml_nodestate_t *ns, ml_redo_t *r)
{
    if (c->stale) {
        s_redo_push(c, r);
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
    s_deadline_step(b, c, old, now);
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

void ml_bk_flow_delivered(ml_broker_t *b, ml_nodestate_t *ns, const ml_qitem_t *it)
{
    ml_case_t *c = it->cs;
    if (!c || c->gone || (it->flags & ML_QI_NOTICE) || it->kind == K_(IMAGING_CHUNK))
        return;
    ml_redo_t r = {.node = ml_bk_node_index(b, ns), .kind = it->kind};
    snprintf(r.id, sizeof r.id, "%s", it->id);
    s_delivered(b, c, ns, &r);
}

/* Deliveries whose record could not be made before: made now that the
 * case is in step with the store. The caller holds a reference to c. */
static void s_redo(ml_broker_t *b, ml_case_t *c)
{
    ml_redo_t *list = c->redo;
    c->redo = NULL;
    while (list) {
        ml_redo_t *r = list;
        list = r->next;
        ml_nodestate_t *ns = s_node_at(b, r->node);
        if (ns && !c->gone) {
            if (c->stale)
                s_redo_push(c, r);
            else
                s_delivered(b, c, ns, r);
        }
        free(r);
        if (c->refs > 0)
            c->refs--; /* the entry's; the caller's keeps c alive */
    }
}

void ml_bk_dead_letter(ml_broker_t *b, ml_nodestate_t *ns, ml_qitem_t *it, const char *reason)
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
            uint32_t idx = ml_bk_node_index(b, ns);
            /* The sender hears of it too, unless it was the broker's own
             * notice. */
            if (!(it->flags & ML_QI_NOTICE))
                sender = s_node_at(b, idx == c->target ? c->opener : c->target);
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
            s_row(b, c, &op.row);
        }
        s_escalate(b, c, MEDLINK__V1__ESCALATION_REASON__ESCALATION_DEAD_LETTER, detail, NULL,
                   it->id, NULL, sender, c ? &op : NULL, c ? 1 : 0, NULL);
    }
    if (it->cs) {
        ml_case_t *ref = it->cs;
        it->cs = NULL;
        ml_bk_case_release(b, ref);
    }
}

/* ------------------------------------------------------------------ */
/* Timers: deadlines and expiry                                        */

/* Escalates the deadline c missed (and, for an unaccepted EMERGENCY
 * referral, redirects it to the fallback hospital). With sum, the ops
 * nodes hear of it in the tick's summary instead of on their own. */
static void s_deadline_missed(ml_broker_t *b, ml_case_t *c, int64_t now, s_overdue_t *sum)
{
    const char *expected = ml_case_state_name(c->kind, c->deadline_state);
    ml_nodestate_t *opener = s_node_at(b, c->opener);
    ml_nodestate_t *old_target = s_node_at(b, c->target);
    s_esc_about_t about = {
        .target = s_node_name(b, c->target), .deadline_at = c->deadline_at, .no_ops = sum != NULL};
    if (sum)
        s_overdue_add(sum, c->id, about.target);
    char detail[600], when[32];
    snprintf(detail, sizeof detail, "%s case not %s by %s by its deadline %s (it is %s)",
             ml_priority_name(c->priority), expected, s_node_name(b, c->target),
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
    ml_nodestate_t *fb = fb_id ? ml_bk_node(b, fb_id) : NULL;
    char redir[400] = "";
    int redirected = 0;
    if (c->kind == ML_CASE_REFERRAL && c->priority == MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY &&
        b->cfg->redirect_emergency && fb && fb != old_target && fb != opener &&
        ml_acl_allows(b->cfg, opener->node->role, K_(REFERRAL), fb->node->role) &&
        ml_case_check(c->kind, c->state, REF_(REDIRECTED), ML_PARTY_BROKER, NULL, 0) == 0) {
        int old = c->state;
        s_target_count(b, c, -1);
        c->state = REF_(REDIRECTED);
        c->target = ml_bk_node_index(b, fb);
        s_target_count(b, c, +1);
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
    s_row(b, c, &op.row);
    s_escalate(b, c, MEDLINK__V1__ESCALATION_REASON__ESCALATION_DEADLINE_MISSED,
               redirected ? redir : detail, expected, NULL, redirected ? fb->node->id : NULL,
               opener, &op, 1, &about);
    if (!redirected)
        return;
    s_forward_opening(b, c);
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
        ml_bk_emit(b, &env, tell[i], c, NULL, 0);
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
} s_due_t;

static void s_collect_due(ml_case_t *c, void *arg)
{
    s_due_t *d = arg;
    if (c->redo && !c->stale && !c->gone)
        s_cases_push(&d->redo, c);
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
    ml_bk_dead_letter(x->b, x->ns, it, "expired: its deadline passed before it was delivered");
}

static void s_flow_timer_cb(uv_timer_t *t)
{
    ml_broker_t *b = t->data;
    int64_t now = ml_now_ms();
    if (b->retry_own)
        ml_bk_retry_own(b);
    /* Messages past their own deadline leave the queues of offline nodes
     * too (a connected node's queue is also checked as it is pumped). */
    for (size_t i = 0; i < b->n_nodes; i++) {
        s_expire_t x = {b, b->nodes[i], now};
        ml_queue_filter(&b->nodes[i]->queue, s_keep_unexpired, s_expired_cb, &x);
    }
    s_due_t d = {.now = now};
    ml_casetab_each(&b->cases, s_collect_due, &d);
    /* Every case collected is held until both lists are done: one list's
     * work must not free a case the other still names. */
    for (size_t i = 0; i < d.redo.n; i++)
        d.redo.v[i]->refs++;
    for (size_t i = 0; i < d.due.n; i++)
        d.due.v[i]->refs++;
    for (size_t i = 0; i < d.redo.n; i++)
        s_redo(b, d.redo.v[i]);
    /* Several deadlines in one tick: one summary to ops (s_overdue_t). */
    s_overdue_t sum = {0};
    for (size_t i = 0; i < d.due.n; i++)
        s_deadline_missed(b, d.due.v[i], now, d.due.n > 1 ? &sum : NULL);
    if (d.due.n > 1)
        s_overdue_send(b, &sum, d.due.n);
    free(sum.ids);
    free(sum.targets);
    for (size_t i = 0; i < d.redo.n; i++)
        ml_bk_case_release(b, d.redo.v[i]);
    for (size_t i = 0; i < d.due.n; i++)
        ml_bk_case_release(b, d.due.v[i]);
    free(d.redo.v);
    free(d.due.v);
}

void ml_bk_flow_start(ml_broker_t *b)
{
    uv_timer_start(&b->flow_timer, s_flow_timer_cb, (uint64_t)b->cfg->timer_ms,
                   (uint64_t)b->cfg->timer_ms);
}

void ml_bk_case_row(ml_broker_t *b, const ml_case_t *c, ml_store_case_t *row)
{
    s_row(b, c, row);
}

void ml_bk_case_event(ml_broker_t *b, ml_case_t *c, const char *node, const char *event,
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

typedef struct {
    ml_broker_t *b;
    ml_broker_config_t *nc;
} s_remap_t;

static void s_remap_service(ml_case_t *c, void *arg)
{
    s_remap_t *r = arg;
    if (!c->service)
        return;
    for (size_t i = 0; i < r->nc->n_nodes; i++)
        for (size_t j = 0; j < r->nc->nodes[i].n_services; j++)
            if (strcmp(r->nc->nodes[i].services[j], c->service) == 0) {
                c->service = r->nc->nodes[i].services[j];
                return;
            }
    ml_broker_t *b = r->b;
    for (size_t i = 0; i < b->n_services_gone; i++)
        if (strcmp(b->services_gone[i], c->service) == 0) {
            c->service = b->services_gone[i];
            return;
        }
    char **grown = realloc(b->services_gone, (b->n_services_gone + 1) * sizeof *grown);
    char *copy = strdup(c->service);
    if (grown)
        b->services_gone = grown;
    if (!grown || !copy) {
        free(copy);
        c->service = NULL; /* only shown and matched; the target is fixed */
        return;
    }
    b->services_gone[b->n_services_gone++] = copy;
    c->service = copy;
}

void ml_bk_flow_reload(ml_broker_t *b, ml_broker_config_t *nc)
{
    s_remap_t r = {b, nc};
    ml_casetab_each(&b->cases, s_remap_service, &r);
}
