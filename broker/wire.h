/* The broker's per-peer output: records framed into the session's buffer,
 * pushed through TLS and out as ROUTER frames; a peer whose pipe is full is
 * tried again on a short timer (blocked list). The answers the broker makes
 * to what a peer sends live here too: cumulative Accepted, Nack (with the
 * per-node log budget) and the holds that keep a sender's order after a
 * refusal for now. Lowest broker layer: it calls up only through
 * b->hooks (close_session, drained). Loop thread only. */
#ifndef ML_BK_WIRE_H
#define ML_BK_WIRE_H

#include "broker_int.h"
#include "verdict.h"

/* The peer's node id for logs, or "(unauthenticated)". Borrowed. */
const char *ml_wire_who(const ml_session_t *s);

/* s has output to flush at the end of this loop iteration (ml_wire_flush_cb). O(1). */
void ml_wire_mark_dirty(ml_broker_t *b, ml_session_t *s);

/* 1 when s may be handed more deliveries: its queued output is under
 * session_output_bytes. A peer that does not read stops getting them (they
 * stay queued, in the store) until what it has drains. */
int ml_wire_room(const ml_broker_t *b, const ml_session_t *s);

/* Sends the session's ciphertext as frames of at most S_FRAME_MAX bytes.
 * Returns 0 (all sent), ML_EAGAIN (the peer's pipe is full: the rest stays
 * queued here, the frame libzmq refused in s->held, for s_blocked_cb to try
 * again), ML_ECLOSED (peer gone) or ML_ENOMEM. A peer's pipe is bounded in
 * frames (SNDHWM, set from session_output_bytes), what stays here in
 * bytes (ml_wire_flush), so a peer that does not read costs a bounded amount. */
int ml_wire_send_cipher(ml_broker_t *b, ml_session_t *s);

/* Pushes s's buffered plaintext (and the collected Accepted) through TLS and
 * out. A peer whose pipe is full goes on the blocked list; a failure closes
 * the session through b->hooks.close_session. */
void ml_wire_flush(ml_broker_t *b, ml_session_t *s);

/* Queues one record (copied) for s, flushing first when session_buffer would
 * be passed. Returns 0, ML_ECLOSED (s is closed) or ML_ENOMEM. */
int ml_wire_append(ml_broker_t *b, ml_session_t *s, const uint8_t *rec, size_t len);

/* Sends a control or admin envelope from the broker to the session's peer
 * (id, from, to, created_at and kind are filled in). Returns 0 or ML_E*. */
int ml_wire_reply(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env);

/* Sends a Nack for msg_id (may be NULL) without logging or counting it:
 * ml_wire_refuse is the usual way. */
void ml_wire_nack(ml_broker_t *b, ml_session_t *s, const char *msg_id, int code,
                  const char *reason);

/* Collects an Accepted answer; it goes out with the session's next flush
 * (end of this loop iteration), together with the others committed in the
 * same group. O(1) amortised. */
void ml_wire_accepted(ml_broker_t *b, ml_session_t *s, const char *msg_id, int dup);

/* The send window (docs/protocol.md, "Credit") stamped on s's next
 * Accepted; submit.c sizes it (ml_submit_credit) as it collects an answer.
 * A window replaces the one before, so only the latest counts. O(1). */
void ml_wire_credit(ml_session_t *s, uint32_t msgs, uint64_t bytes);

/* What a hold is kept under for env: its `to`, with imaging chunks apart
 * (agents send chunks as a stream of their own, behind their other
 * messages, so a held chunk must not hold a referral, nor the reverse).
 * Returns env->to, "" or buf. */
const char *ml_wire_hold_key(const ml_envelope_t *env, char *buf, size_t len);

/* Holds the session's later messages to `to` too until msg_id comes again
 * (a message addressed to a service is held under the node it went to as
 * well: the session's messages to that node keep their order). */
void ml_wire_hold_also(ml_session_t *s, const char *to, const char *msg_id);

/* A refusal for now (a transient code: RATE_LIMITED, STORE, STORE_FULL,
 * CONFLICT) of a message to `to`: also holds the session's later messages
 * to `to` until this one comes again (see ml_session.holds). */
void ml_wire_refuse_for_now(ml_broker_t *b, ml_session_t *s, const char *msg_id, const char *to,
                            int code, const char *reason);

/* 1 when the session's messages to `to` are held for another message than
 * msg_id: the peer has been told (a transient Nack). 0 otherwise. */
int ml_wire_held(ml_broker_t *b, ml_session_t *s, const char *to, const char *msg_id);

/* Logs a refusal (within the node's log budget, ml_loglimit.h; sessions
 * before Hello share the broker's own), counts it and answers the
 * peer with a Nack. */
void ml_wire_refuse(ml_broker_t *b, ml_session_t *s, const char *msg_id, int code,
                    const char *reason);

/* The uv_check_t callback (data: the broker) that flushes every session
 * marked dirty in this loop iteration. */
void ml_wire_flush_cb(uv_check_t *h);

/* Releases every hold msg_id made on s: it came again. O(holds). */
void ml_wire_hold_release(ml_session_t *s, const char *msg_id);

/* Answers a verdict of a lower module (v->code != 0): refused for now
 * (ml_wire_refuse_for_now, holding the sender's later messages to `to`)
 * when it is transient, else refused. */
void ml_wire_refuse_verdict(ml_broker_t *b, ml_session_t *s, const char *msg_id, const char *to,
                            const ml_verdict_t *v);

#endif
