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

/* Frees an in-memory envelope copy and takes it off b->cache_bytes. Safe
 * on NULL; clears *blob. */
void ml_delivery_cache_release(ml_broker_t *b, uint8_t **blob, uint32_t size);

/* The state of a registered node, or NULL (also for a removed one).
 * O(nodes). */
ml_nodestate_t *ml_delivery_node(ml_broker_t *b, const char *id);

/* Puts every in-flight message of ns back at the head of its queue, in the
 * original order, so the next delivering session gets them first. */
void ml_delivery_requeue(ml_nodestate_t *ns);

/* Appends a slot for a new delivery. Returns it, or NULL out of memory. */
ml_inflight_t *ml_delivery_inflight_add(ml_nodestate_t *ns);

/* Index of ns in b->nodes (for ever: cases refer to nodes by it). */
uint32_t ml_delivery_node_index(const ml_broker_t *b, const ml_nodestate_t *ns);

/* Delivers what ns's queue and window allow to its delivering session. A
 * message past its deadline, out of attempts or unreadable goes to
 * b->hooks.dead_letter. */
void ml_delivery_pump(ml_broker_t *b, ml_nodestate_t *ns);

/* Takes the in-flight slot of msg_id out of ns's window (for an ack or a
 * refusal). Returns 1 with *out filled, or 0 when it is not in flight. */
int ml_delivery_take(ml_nodestate_t *ns, const char *msg_id, ml_qitem_t *out);

/* The node at idx, or NULL (out of range or removed). */
ml_nodestate_t *ml_delivery_node_at(ml_broker_t *b, uint32_t idx);

/* The id of the node at idx, or "" (borrowed). */
const char *ml_delivery_node_name(ml_broker_t *b, uint32_t idx);

/* The index of the registered node id, or UINT32_MAX. O(nodes). */
uint32_t ml_delivery_node_idx(ml_broker_t *b, const char *id);

/* Deliveries not acknowledged within ack_timeout_ms go back to the head of
 * their queue and are sent again. O(nodes). */
void ml_delivery_tick(ml_broker_t *b, int64_t now);

#endif
