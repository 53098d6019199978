/* The medlink agent: ties the spool folder and the agent store to one
 * channel to the broker on one libuv loop. It sends every pending outbox
 * row (at most send_window unanswered at a time, in seq order, all again
 * after each reconnect), records the broker's Accepted/Nack answers, and
 * stores deliveries before acknowledging them. Loop thread only. */
#ifndef ML_AGENT_H
#define ML_AGENT_H

#include <stddef.h>

#include <uv.h>

#include "aconfig.h"

typedef struct ml_agent ml_agent_t;

/* Opens the store, creates the spool folders, recovers from a previous
 * crash, builds the TLS context and starts the channel, the outbox scan and
 * the per-iteration flush on loop. cfg is copied where needed. Returns 0,
 * or ML_ECONFIG / ML_ESTORE / ML_EIO / ML_ETLS / ML_ENOMEM with a sentence
 * in err. */
int ml_agent_new(uv_loop_t *loop, const ml_aconfig_t *cfg, ml_agent_t **out, char *err,
                 size_t errlen);
/* SIGHUP: takes the keys of cfg that a running agent applies at once (the
 * outbox scan period, the send windows, the retention ages and period; see
 * ml_aconfig_live_apply) and logs what changed. The other keys of cfg are
 * ignored: the caller decides what needs a restart. A scan or retention
 * period that changed restarts its timer with the new period. Does nothing
 * once stopping. Loop thread only. */
void ml_agent_reload(ml_agent_t *a, const ml_aconfig_t *cfg);
/* Clean shutdown: stops scanning, flushes answers and deliveries that are
 * waiting for their transaction, destroys the channel and closes the
 * agent's handles. Safe twice. Run the loop until it returns, then call
 * ml_agent_destroy. */
void ml_agent_stop(ml_agent_t *a);
/* Frees the agent after ml_agent_stop and the loop has run dry; safe on
 * NULL and twice; clears *self_p. */
void ml_agent_destroy(ml_agent_t **self_p);

#endif
