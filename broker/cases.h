/* Case lifecycles: which state changes are legal and who may make them.
 * Pure functions over the state enums of proto/ (no I/O, no allocation),
 * so that the broker, medlinkctl and the tests share one definition.
 *
 * A case has a kind (the CaseKind values of control.proto), is opened by
 * one message (Referral, ImagingConsult, DownTransfer) and moves through the
 * states of its kind's status enum. Two nodes have a part in it: the opener
 * (the referring clinic, the requesting clinic, the discharging hospital)
 * and the target (the node now responsible: the receiving hospital, the
 * reading centre, the receiving township clinic). The broker makes the
 * transitions nobody sends (delivery, assignment, re-referral).
 *
 * Upward referral (ReferralStatus):
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
 *   SENT | DELIVERED | REDIRECTED -> REDIRECTED   broker (deadline fallback)
 *
 *   REJECTED, CANCELLED and CLOSED are terminal.
 *
 * Imaging consult (ImagingStatus):
 *
 *   REQUESTED -> ASSIGNED                  broker, when a reading centre acks it
 *   REQUESTED | ASSIGNED -> STUDY_RECEIVED target (every object verified)
 *   STUDY_RECEIVED | REPORTED -> REPORTED  target (ImagingReport; again = amended)
 *   REPORTED -> CLOSED                     opener or target
 *   REQUESTED | ASSIGNED | STUDY_RECEIVED -> REJECTED    target
 *   REQUESTED | ASSIGNED | STUDY_RECEIVED -> CANCELLED   opener
 *   ImagingChunk (opener) and ImagingResend (target) do not change the
 *   state and are allowed in REQUESTED and ASSIGNED only.
 *
 *   REJECTED, CANCELLED and CLOSED are terminal.
 *
 * Rehab down-transfer (DownTransferStatus):
 *
 *   OFFERED -> ACCEPTED | DECLINED         target clinic
 *   OFFERED | ACCEPTED -> CANCELLED        opener hospital
 *   ACCEPTED -> ARRIVED                    target
 *   ARRIVED | FOLLOW_UP -> FOLLOW_UP       target (numbered 1, 2, ...)
 *   ARRIVED | FOLLOW_UP -> COMPLETED       target
 *   ARRIVED | FOLLOW_UP -> RE_REFERRED     broker, from a Referral whose
 *                                          linked_case_id names this case
 *
 *   DECLINED, COMPLETED, RE_REFERRED and CANCELLED are terminal. */
#ifndef ML_BROKER_CASES_H
#define ML_BROKER_CASES_H

#include <stddef.h>

/* Case kinds: the CaseKind values of control.proto. */
enum {
    ML_CASE_NONE = 0,
    ML_CASE_REFERRAL = 1,
    ML_CASE_IMAGING = 2,
    ML_CASE_DOWN_TRANSFER = 3,
    ML_CASE_KIND_COUNT = 4
};

/* Who is asking for a transition, relative to the case. */
enum {
    ML_PARTY_BROKER = 0,   /* the broker itself (deliveries, fallbacks) */
    ML_PARTY_REFERRER = 1, /* the node that opened the case */
    ML_PARTY_TARGET = 2,   /* the node currently responsible for it */
    ML_PARTY_OTHER = 3     /* any other node: never allowed */
};
#define ML_PARTY_OPENER ML_PARTY_REFERRER

/* ---- every kind ------------------------------------------------------ */

/* "referral", "imaging", "down_transfer" (static); "" for others. */
const char *ml_case_kind_name(int case_kind);
/* Parses those names (case-insensitive; "down-transfer" and the CaseKind
 * spellings "CASE_REFERRAL"... too). Returns 0 or ML_EINVAL. */
int ml_case_kind_parse(const char *s, int *case_kind);

/* The case kind a message kind (Kind enum of envelope.proto) belongs to, or
 * ML_CASE_NONE (control kinds, ESCALATION). */
int ml_case_kind_of_message(int msg_kind);
/* 1 if msg_kind opens a case (REFERRAL, IMAGING_CONSULT, DOWN_TRANSFER). */
int ml_case_opens(int msg_kind);
/* The state a case is opened in (REFERRAL_SENT, IMAGING_REQUESTED,
 * DOWN_TRANSFER_OFFERED), or 0 for ML_CASE_NONE. */
int ml_case_initial_state(int case_kind);

/* Checks a transition from -> to of a case of case_kind requested by
 * party. Returns 0 if legal, or ML_EDENIED with err saying why in a
 * sentence that names the current and the attempted state and, where it is
 * the party that is wrong, who may make it, e.g.
 *   "illegal transition: case is REFERRAL_ARRIVED, REFERRAL_ACCEPTED is not
 *    allowed from it"
 *   "REFERRAL_SCHEDULED may only be set by the receiving hospital (case is
 *    REFERRAL_ACCEPTED)"
 * ML_PARTY_OTHER is refused without naming the case's state (a node with no
 * part in the case learns nothing about it). Fields a message must carry
 * with a state (a reason, a redirect target...) are ml_env_validate's. */
int ml_case_check(int case_kind, int from, int to, int party, char *err, size_t errlen);

/* Checks a message that does not change the state (IMAGING_CHUNK from the
 * opener, IMAGING_RESEND from the target) against the case's state and the
 * sender's party. Same returns and sentences as ml_case_check, e.g.
 *   "illegal message: case is IMAGING_REPORTED, IMAGING_CHUNK is only
 *    accepted while it is IMAGING_REQUESTED or IMAGING_ASSIGNED" */
int ml_case_check_message(int case_kind, int state, int msg_kind, int party, char *err,
                          size_t errlen);

/* The field an update that moves a case of case_kind to state `to` must
 * carry, beyond what ml_env_validate checks for every message, as the
 * workflow tables of docs/workflows.md ask ("referral_update.scheduled_at"
 * for REFERRAL_SCHEDULED: the appointment; "referral_update.outcome_summary"
 * for REFERRAL_DISCHARGED), or NULL when there is none. Static string; the
 * broker refuses an update without it (Nack INVALID naming the field). */
const char *ml_case_required_field(int case_kind, int to);

/* 1 if no transition leaves state. */
int ml_case_terminal(int case_kind, int state);

/* Progress order of the states of a kind, for deadlines: a deadline to
 * reach state T is met once the case is in a state s with rank(s) >=
 * rank(T), or in a terminal state. Ranks start at 1 for the initial state;
 * 0 for values that are not states of the kind. */
int ml_case_rank(int case_kind, int state);

/* The enum value name ("REFERRAL_ACCEPTED", "IMAGING_ASSIGNED",
 * "DOWN_TRANSFER_FOLLOW_UP"; static), "UNKNOWN" for other values. */
const char *ml_case_state_name(int case_kind, int state);
/* Parses a state of case_kind by its full name or without the kind's
 * prefix ("ACCEPTED"), case-insensitive. Returns 0 or ML_EINVAL. */
int ml_case_state_parse(int case_kind, const char *s, int *state);

/* The FHIR R4 Task.status a state maps to (static string; "" for values
 * that are not states): docs/workflows.md has the tables and the reasons. */
const char *ml_case_fhir_status(int case_kind, int state);

/* ---- upward referral (kept for existing callers) ---------------------- */

/* ml_case_check(ML_CASE_REFERRAL, ...). */
int ml_case_referral_check(int from, int to, int party, char *err, size_t errlen);
/* 1 if no transition leaves state (REJECTED, CANCELLED, CLOSED). */
int ml_case_referral_terminal(int state);
/* "REFERRAL_ACCEPTED" etc. (static), "UNKNOWN" for other values. */
const char *ml_case_referral_state_name(int state);
/* The FHIR R4 Task.status a referral state maps to (static string). */
const char *ml_case_referral_fhir_status(int state);

#endif
