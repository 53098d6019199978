/* The case rules that need no broker: which party a node is in a case,
 * the state a message asks for, the timeline line of a message and the
 * deadline rules (when a deadline starts and when it is met). Pure
 * functions of a case, an envelope and the configuration, so they can be
 * tested in-process like cases.c. */
#ifndef ML_BK_CASE_ENGINE_H
#define ML_BK_CASE_ENGINE_H

#include <stdint.h>

#include "casetab.h"
#include "config.h"
#include "ml_env.h"

/* The one refusal for a case a node may not see: a case that does not
 * exist, and one that exists but is none of the sender's, get the same code
 * (NACK_NOT_PARTY) and this same sentence, so the answer says nothing about
 * whether the case exists or what kind it is (F11). */
void ml_ce_not_party(const char *sender, const char *case_id, char *err, size_t len);

int ml_ce_party(const ml_case_t *c, uint32_t idx);

/* The state a message asks its case to move to, or -1 for messages that
 * do not change it (chunks, resend requests). */
int ml_ce_msg_state(const ml_envelope_t *e);

/* A line for the timeline: what the message says beyond its state. */
void ml_ce_detail(const ml_envelope_t *e, char *buf, size_t len);

int ml_ce_met(const ml_case_t *c, int state);

/* Applies the deadline rules to a case that moved from old (0 = it was
 * just opened) to its current state. */
void ml_ce_deadline_step(const ml_broker_config_t *cfg, ml_case_t *c, int old, int64_t now);

/* The checks of what a message asks that need nothing but the case and the
 * message: the fields a referral state requires, the down-transfer
 * follow-up numbering, incoming_expired only with a rejection, an object
 * index the consult declared. Returns 0, or a Nack code with err filled
 * in (err is a sentence for people). */
int ml_ce_check_content(const ml_case_t *c, const ml_envelope_t *env, int st, char *err,
                        size_t errlen);

#endif
