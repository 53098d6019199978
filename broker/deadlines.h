/* The flow timer: messages past their own deadline leave the queues,
 * deliveries whose case record failed are recorded again, and cases whose
 * deadline passed are escalated (one summary to ops when several miss in
 * one tick) and, for an unaccepted EMERGENCY referral, redirected to the
 * fallback hospital. Loop thread only. */
#ifndef ML_BK_DEADLINES_H
#define ML_BK_DEADLINES_H

#include "broker_int.h"

/* Starts the flow timer (b->flow_timer, every timer_ms): expired messages
 * leave the queues, deliveries are recorded again, missed deadlines are
 * escalated. */
void ml_deadlines_start(ml_broker_t *b);

#endif
