/* Case lifecycles: which state changes are legal and who may make them.
 * Pure functions over the state enums of proto/ (no I/O, no allocation),
 * so that the broker, medlinkctl and the tests share one definition.
 *
 * Upward referral (states are Medlink__V1__ReferralStatus values):
 *
 *   SENT -> DELIVERED                      broker, when the target acks it
 *   SENT | DELIVERED | REDIRECTED
 *        -> ACCEPTED | REJECTED | REDIRECTED   target hospital
 *   ACCEPTED | NO_SHOW | SCHEDULED -> SCHEDULED   target (schedule, reschedule)
 *   SCHEDULED -> ARRIVED | NO_SHOW         target
 *   ARRIVED -> ADMITTED                    target
 *   ADMITTED -> DISCHARGED                 target (with an outcome summary)
 *   DISCHARGED | ARRIVED | NO_SHOW -> CLOSED   target or referrer
 *   SENT | DELIVERED | REDIRECTED | ACCEPTED | SCHEDULED -> CANCELLED   referrer
 *   REDIRECTED -> DELIVERED                broker, when the new target acks it
 *
 * REJECTED, CANCELLED and CLOSED are terminal. */
#ifndef ML_BROKER_CASES_H
#define ML_BROKER_CASES_H

#include <stddef.h>

/* Who is asking for a transition, relative to the case. */
enum {
    ML_PARTY_BROKER = 0,   /* the broker itself (deliveries) */
    ML_PARTY_REFERRER = 1, /* the node that opened the case */
    ML_PARTY_TARGET = 2,   /* the node currently responsible for it */
    ML_PARTY_OTHER = 3     /* any other node: never allowed */
};

/* Checks a referral transition from -> to requested by party. Returns 0 if
 * legal, or ML_EDENIED with err saying why in a sentence that names the
 * current and the attempted state and, where it is the party that is wrong,
 * who may make it, e.g.
 *   "illegal transition: case is REFERRAL_ARRIVED, REFERRAL_ACCEPTED is not
 *    allowed from it"
 *   "REFERRAL_SCHEDULED may only be set by the receiving hospital"
 * The message updates that carry extra data (REJECTED/CANCELLED need a
 * reason, REDIRECTED a redirect_to, SCHEDULED a time) are checked by
 * ml_env_validate, not here. */
int ml_case_referral_check(int from, int to, int party, char *err, size_t errlen);

/* 1 if no transition leaves state (REJECTED, CANCELLED, CLOSED). */
int ml_case_referral_terminal(int state);

/* "REFERRAL_ACCEPTED" etc. (static), "UNKNOWN" for other values. */
const char *ml_case_referral_state_name(int state);

/* The FHIR R4 Task.status a referral state maps to (static string):
 * docs/workflows.md has the table and the reasoning. */
const char *ml_case_referral_fhir_status(int state);

#endif
