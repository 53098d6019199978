/* The case rules that need no broker: which party a node is in a case,
 * the state a message asks for, the timeline line of a message and the
 * deadline rules (when a deadline starts and when it is met). Pure
 * functions of a case, an envelope and the configuration, so they can be
 * tested in-process like cases.c. */
#include <stdio.h>
#include <string.h>

#include "case_engine.h"
#include "cases.h"

#define K_(x) MEDLINK__V1__KIND__KIND_##x
#define NACK_(x) MEDLINK__V1__NACK_CODE__NACK_##x
#define REF_(x) MEDLINK__V1__REFERRAL_STATUS__REFERRAL_##x
#define IMG_(x) MEDLINK__V1__IMAGING_STATUS__IMAGING_##x
#define DT_(x) MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_##x

/* ------------------------------------------------------------------ */
/* Reading messages                                                    */

/* The one refusal for a case a node may not see: a case that does not
 * exist, and one that exists but is none of the sender's, get the same code
 * (NACK_NOT_PARTY) and this same sentence, so the answer says nothing about
 * whether the case exists or what kind it is (F11). */
void ml_ce_not_party(const char *sender, const char *case_id, char *err, size_t len)
{
    snprintf(err, len,
             "node %s has no part in case %s: there is no such case, or the node neither opened "
             "it nor is responsible for it",
             sender, case_id);
}

int ml_ce_party(const ml_case_t *c, uint32_t idx)
{
    if (idx == c->opener)
        return ML_PARTY_OPENER;
    if (idx == c->target)
        return ML_PARTY_TARGET;
    return ML_PARTY_OTHER;
}

/* The state a message asks its case to move to, or -1 for messages that
 * do not change it (chunks, resend requests). */
int ml_ce_msg_state(const ml_envelope_t *e)
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
void ml_ce_detail(const ml_envelope_t *e, char *buf, size_t len)
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

/* ------------------------------------------------------------------ */
/* Deadlines                                                           */

int ml_ce_met(const ml_case_t *c, int state)
{
    return ml_case_terminal(c->kind, state) ||
           ml_case_rank(c->kind, state) >= ml_case_rank(c->kind, c->deadline_state);
}

/* Applies the deadline rules to a case that moved from old (0 = it was
 * just opened) to its current state. */
void ml_ce_deadline_step(const ml_broker_config_t *cfg, ml_case_t *c, int old, int64_t now)
{
    if (c->deadline_at && ml_ce_met(c, c->state)) {
        c->deadline_at = 0;
        c->fired = 0;
    }
    const ml_deadline_rule_t *r = ml_broker_config_deadline(cfg, c->kind, c->priority);
    if (!r->set || c->deadline_at || c->closed)
        return;
    int starts = r->after_state ? (c->state == r->after_state && old != c->state) : old == 0;
    if (!starts)
        return;
    c->deadline_state = (uint8_t)r->target_state;
    if (ml_ce_met(c, c->state))
        return;
    c->deadline_at = now + r->ms;
    c->fired = 0;
}

/* The checks of what a message asks that need nothing but the case and the
 * message (the ones that need the node registry or the store are
 * ingress.c's): the fields a referral state requires, the down-transfer
 * follow-up numbering, incoming_expired only with a rejection, an object
 * index the consult declared. Returns 0, or a Nack code with err filled
 * in. */
int ml_ce_check_content(const ml_case_t *c, const ml_envelope_t *env, int st, char *err,
                        size_t errlen)
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
        break;
    default:
        break;
    }
    return 0;
}
