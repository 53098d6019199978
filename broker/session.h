/* Sessions: the ROUTER's input side. Every ZeroMQ message is [routing
 * id][TLS bytes]; the routing id keys a session (the session table), an
 * unknown id starts a TLS handshake within the pre-authentication limits
 * (max_sessions, handshakes_per_s, max_preauth_sessions). Once TLS is up the
 * peer's certificate CN must name a registered node and its first record be
 * that node's Hello, answered by Welcome; after that each record is
 * dispatched: routed kinds to ingress, Ack and Nack to ingress, Heartbeat
 * answered here, AdminRequest to admin.c. A session that breaks the
 * protocol is closed and kept as a tombstone until it expires, so the rest
 * of a garbage stream on the same routing id is dropped quietly. Loop
 * thread only. */
#ifndef ML_BK_SESSION_H
#define ML_BK_SESSION_H

#include "broker_int.h"

/* Frees a session (closed or not) and takes it out of the table. */
void ml_session_free(ml_broker_t *b, ml_session_t *s);

/* The ROUTER socket's watcher callback (arg: the broker): reads up to
 * S_RECV_BUDGET messages and feeds each to its session. */
void ml_session_router_cb(ml_zwatch_t *w, void *zsock, void *arg);

/* Closes a session: TLS gone, deliveries requeued, pending puts detached,
 * the entry kept as a tombstone until it expires. reason NULL = already
 * logged. */
void ml_session_close(ml_broker_t *b, ml_session_t *s, const char *reason);

/* Housekeeping of the session table (handshake deadlines, silent sessions,
 * tombstones). O(sessions). */
void ml_session_tick(ml_broker_t *b, int64_t now);

/* ml_broker_feed_plaintext (broker.h): records for node_id as if they
 * came from its authenticated session, output dropped (fuzzing). */
int ml_session_feed_plaintext(ml_broker_t *b, const char *node_id, const uint8_t *data, size_t len);

#endif
