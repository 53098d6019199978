/* Client side of a medlink connection: a ZeroMQ DEALER socket carrying a
 * TLS 1.3 session (mutually authenticated) carrying length-prefixed
 * Envelope records, on a libuv loop.
 *
 * The channel connects, handshakes, sends Hello, and is "up" once the broker
 * answers Welcome. It sends Heartbeats while idle, and when the broker stays
 * silent past the heartbeat timeout (or the TLS session fails) it throws
 * away the socket and TLS session and reconnects with a fresh DEALER and a
 * fresh random routing id after a back-off. Reliability is not the
 * channel's job: callers keep their own outbox and resend after on_up.
 * Loop thread only. */
#ifndef ML_CHANNEL_H
#define ML_CHANNEL_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "ml_env.h"
#include "ml_tls.h"

typedef struct ml_channel ml_channel_t;

/* A broker that turns a connection away before TLS (too many sessions, too
 * many handshakes from one address) sends one plaintext frame: this prefix
 * and a reason in ASCII. No data of any node is in it. */
#define ML_REFUSED_PREFIX "MEDLINK-REFUSED "
#define ML_REFUSED_PREFIX_LEN (sizeof ML_REFUSED_PREFIX - 1)

/* The reason of the Nack (code NACK_IDENTITY, no message id) a broker sends
 * to a session just before it closes it because a newer session of the
 * same node took over. The channel logs it as "the broker closed this
 * session: " + this, backs off longer and reconnects (an operator may be
 * running a second program with this node's certificate). */
#define ML_SESSION_SUPERSEDED "a newer session of the same node took over"

typedef struct {
    const char *endpoint;  /* e.g. "tcp://127.0.0.1:7400" */
    ml_tls_ctx_t *tls;     /* client context (borrowed; outlives the channel) */
    const char *node_id;   /* our node id; must match our certificate CN */
    const char *broker_id; /* if set, the broker's certificate CN must equal it: any node
                              of the community CA could otherwise pose as the broker
                              (recommended; NULL accepts any CA-signed server) */
    const char *software;  /* sent in Hello, e.g. "medlink-agent/0.1.0" */
    uint32_t heartbeat_ms; /* idle heartbeat interval (default 2000) */
    uint32_t timeout_ms;   /* silence before reconnect (default 3 x heartbeat) */
    uint32_t reconnect_ms; /* first back-off, doubles up to 8x (default 200) */
    size_t max_record;     /* max record size (default ML_FRAME_DEFAULT_MAX) */
    size_t max_buffered;   /* max plaintext queued while TLS is busy (default 64 MiB) */
    int deliveries;        /* 1: ask the broker for deliveries (agents) */

    /* A routed or control envelope arrived (borrowed for the call). Not
     * called for Welcome and Heartbeat, which the channel handles. */
    void (*on_envelope)(ml_channel_t *ch, ml_envelope_t *env, void *arg);
    /* The channel came up (Welcome received) or went down. */
    void (*on_state)(ml_channel_t *ch, int up, const char *reason, void *arg);
    /* A connection attempt failed in a way that retrying cannot fix until
     * an operator acts: our certificate expired or revoked, a CA the other
     * side does not know, the broker's certificate expired or not ours, a
     * broker CN other than broker_id, a CRL past its next update. The
     * reason names the kind ("own certificate expired", "unknown CA",
     * "broker CN mismatch", ...). The channel keeps retrying, backing off
     * up to fatal_backoff_ms; without on_fatal it logs the reason as an
     * ERROR itself. May destroy the channel. */
    void (*on_fatal)(ml_channel_t *ch, const char *reason, void *arg);
    uint32_t fatal_backoff_ms; /* longest back-off after such a failure (default 60000) */
    void *arg;
} ml_channel_config_t;

/* Creates the channel and starts connecting. zctx is a ZeroMQ context the
 * caller owns. The config strings are copied. Returns 0, ML_ENOMEM or
 * ML_EINVAL. */
int ml_channel_new(uv_loop_t *loop, void *zctx, const ml_channel_config_t *cfg, ml_channel_t **out);
/* Closes the socket and timers; safe on NULL and twice; clears *self_p.
 * Handles are freed in their close callbacks, so run the loop once more. */
void ml_channel_destroy(ml_channel_t **self_p);

/* Queues env for the broker. Returns 0, ML_ECLOSED when not up, ML_ETOOBIG
 * over max_record, ML_EFULL when the send buffer is over max_buffered
 * (back-pressure: retry after on_writable), or ML_ENOMEM. */
int ml_channel_send(ml_channel_t *ch, const ml_envelope_t *env);
/* Sends a serialised envelope as is (same return codes). */
int ml_channel_send_raw(ml_channel_t *ch, const uint8_t *data, size_t len);
int ml_channel_is_up(const ml_channel_t *ch);
/* The send window the broker granted the current session (Welcome, then
 * restated by every Accepted; docs/protocol.md, "Credit"): at most *msgs
 * messages and *bytes bytes sent and not yet answered (Accepted or Nack).
 * A caller sends within min(its own window, this), and always at least one
 * record when nothing is unanswered. UINT32_MAX / UINT64_MAX when the
 * broker states no window. Returns 0, or ML_ECLOSED (not up; both 0). O(1). */
int ml_channel_credit(const ml_channel_t *ch, uint32_t *msgs, uint64_t *bytes);
/* The Welcome the broker sent for the current session, or NULL. */
const Medlink__V1__Welcome *ml_channel_welcome(const ml_channel_t *ch);
/* Drops the current connection and reconnects (tests, SIGHUP). */
void ml_channel_reset(ml_channel_t *ch, const char *reason);

#endif
