/* Ingress: one routed record of an authenticated session, checked in the
 * order docs/architecture.md gives (held, from, rate, validity, then the
 * case: party, lifecycle step, content, recipient, ACL, quotas) and handed
 * to submit, or refused with a Nack naming what is wrong. Also the Acks and
 * Nacks a recipient sends about its deliveries. Every later message of a
 * case is checked against the case as memory has it, including changes not
 * yet committed (caseref.c settles a failed one). Loop thread only. */
#ifndef ML_BK_INGRESS_H
#define ML_BK_INGRESS_H

#include "broker_int.h"

/* The recipient s acked msg_id: the delivery leaves the window, is marked
 * in the store and recorded in its case; the queue moves on. */
void ml_ingress_ack(ml_broker_t *b, ml_session_t *s, const char *msg_id);

/* The recipient refused a delivery (a Nack naming it): it can never take
 * it, so it becomes a dead letter rather than being resent forever. */
void ml_ingress_refused(ml_broker_t *b, ml_session_t *s, const Medlink__V1__Nack *n);

/* A routed record env (rec, len as received) of the READY session s: held,
 * from, rate and validity checks, then the case checks and the store, or a
 * Nack naming what is wrong. */
void ml_ingress_route(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env, const uint8_t *rec,
                      size_t len);

#endif
