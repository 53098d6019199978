/* The broker's own envelopes: notices (DELIVERED, ASSIGNED,
 * RE_REFERRED), forwarded referrals, escalations and dead letters, and the
 * case changes the broker makes by itself when a delivery is acknowledged.
 * Each is built here and handed to submit; the case change is stored as a
 * separate request (caseref.c), so that a store refusing the message only
 * delays it (ml_submit_retry_own). Loop thread only. */
#ifndef ML_BK_NOTICES_H
#define ML_BK_NOTICES_H

#include "broker_int.h"

/* Who an Escalation is about when it is not simply c as it is now: after a
 * deadline fallback, c names the fallback hospital and its new deadline,
 * while the Escalation must name the hospital that missed the old one
 * (control.proto: "who had the case"). */
typedef struct {
    const char *target; /* NULL: c's target */
    int64_t deadline_at;
    int no_ops; /* the ops nodes get this in a summary of the tick (deadlines.c, s_overdue_t) */
} ml_notices_about_t;

/* Sends the broker's own message env (a notification, an escalation, a
 * forwarded referral) to recipient: fills id (when empty), from (when
 * empty: the broker's id), created_at and kind, packs and submits it with
 * the given case changes. Returns 0 or ML_E* (logged). */
int ml_notices_emit(ml_broker_t *b, ml_envelope_t *env, ml_nodestate_t *recipient, ml_case_t *cs,
                    const ml_store_caseop_t *ops, size_t n_ops);

/* 1 when ns gets the ops nodes' Escalations: named in [escalation] notify,
 * or an OPS node when notify is empty (alerts.c sends its own). */
int ml_notices_is_ops(ml_broker_t *b, const ml_nodestate_t *ns);

/* Sends an Escalation to the ops nodes and to also_to (when not one of
 * them), after queueing ops (the case change that goes with it). The
 * change and the messages are separate store requests: the messages carry
 * no change, so that a store refusing them (a full disk) only delays them
 * (ml_submit_retry_own), and a change that fails is read back from the store
 * and made again (a deadline fires again). about may be NULL. */
void ml_notices_escalate(ml_broker_t *b, ml_case_t *c, int reason, const char *detail,
                         const char *expected, const char *message_id, const char *redirected_to,
                         ml_nodestate_t *also_to, const ml_store_caseop_t *ops, size_t n_ops,
                         const ml_notices_about_t *about);

/* Forwards the referral that opened c to c's current target (after a
 * redirect): the same content and sender, a new message id. */
void ml_notices_forward_opening(ml_broker_t *b, ml_case_t *c);

/* The recipient ns acked it: the delivery is recorded in its case (a
 * referral moves to DELIVERED, a consult to ASSIGNED, and the opener is
 * told). */
void ml_notices_delivered(ml_broker_t *b, ml_nodestate_t *ns, const ml_qitem_t *it);

/* Deliveries whose record could not be made before: made now that the
 * case is in step with the store. The caller holds a reference to c. */
void ml_notices_redo(ml_broker_t *b, ml_case_t *c);

/* Makes it (taken from a queue or the in-flight window of ns) a dead
 * letter with reason: stored as such, escalated, recorded in its case. The
 * item's blob and case reference are released. Also b->hooks.dead_letter. */
void ml_notices_dead_letter(ml_broker_t *b, ml_nodestate_t *ns, ml_qitem_t *it, const char *reason);

/* Records an event the broker makes by itself (a replay, a delivery) in
 * c's timeline. */
void ml_notices_case_event(ml_broker_t *b, ml_case_t *c, const char *node, const char *event,
                           const char *message_id, int kind, const char *detail);

/* What follows a committed put (b->hooks.after_commit, submit.c): the
 * forward of a redirected referral, the RE_REFERRED notice to a
 * down-transfer's hospital, the dead letter of an expired study. */
void ml_notices_after_commit(ml_broker_t *b, int action, ml_case_t *c, ml_case_t *lc);

#endif
