/* Delivery: the node table (lookup by id or index), each node's queue and
 * in-flight window, and the pump that hands queued messages to the node's
 * delivering session (from the in-memory copy when there is one, else read
 * back from the store). Acks and refusals take their slot out of the window
 * here (ml_delivery_take); what they mean for the case is the caller's. A
 * message that can never go becomes a dead letter through
 * b->hooks.dead_letter (notices.c). Loop thread only. */
#ifndef ML_BK_DELIVERY_H
#define ML_BK_DELIVERY_H

#include "broker_int.h"

void ml_delivery_cache_release(ml_broker_t *b, uint8_t **blob, uint32_t size);

ml_nodestate_t *ml_delivery_node(ml_broker_t *b, const char *id);

/* Puts every in-flight message of ns back at the head of its queue, in the
 * original order, so the next delivering session gets them first. */
void ml_delivery_requeue(ml_nodestate_t *ns);

/* Appends a slot for a new delivery. Returns it, or NULL out of memory. */
ml_inflight_t *ml_delivery_inflight_add(ml_nodestate_t *ns);

uint32_t ml_delivery_node_index(const ml_broker_t *b, const ml_nodestate_t *ns);

void ml_delivery_pump(ml_broker_t *b, ml_nodestate_t *ns);

/* Takes the in-flight slot of msg_id out of ns's window (for an ack or a
 * refusal). Returns 1 with *out filled, or 0 when it is not in flight. */
int ml_delivery_take(ml_nodestate_t *ns, const char *msg_id, ml_qitem_t *out);

ml_nodestate_t *ml_delivery_node_at(ml_broker_t *b, uint32_t idx);

const char *ml_delivery_node_name(ml_broker_t *b, uint32_t idx);

uint32_t ml_delivery_node_idx(ml_broker_t *b, const char *id);

/* Deliveries not acknowledged within ack_timeout_ms go back to the head of
 * their queue and are sent again. O(nodes). */
void ml_delivery_tick(ml_broker_t *b, int64_t now);

#endif
