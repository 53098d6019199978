/* medlinkctl's exchange with the broker: one mutually authenticated
 * channel (deliveries off: medlinkctl never takes messages meant for an
 * agent), over which it either asks one admin question and waits for the
 * AdminReply, or sends a stream of messages and waits until the broker has
 * Accepted every one.
 *
 * A stream keeps at most CTL_WINDOW_BYTES (and CTL_WINDOW_MESSAGES) sent
 * but not yet Accepted, so a large imaging study flows at the speed the
 * broker stores it. When the connection drops, everything unanswered is
 * sent again, same ids, on the next session (the broker drops duplicates,
 * and says so in Accepted.duplicate_ids). A transient Nack (store busy or
 * full, rate limited, conflict) is retried after a back-off; any other
 * Nack ends the stream. --timeout bounds the wait for an answer: for a
 * stream, the time without any message being Accepted. */
#ifndef CTL_SESSION_H
#define CTL_SESSION_H

#include <stdint.h>

#include "cli.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_tls.h"

#define CTL_WINDOW_BYTES (8u << 20)
#define CTL_WINDOW_MESSAGES 1000

/* What a stream sends, pulled one message at a time as the window opens. */
typedef struct {
    /* The next message: returns 1 with *env (borrowed until the next call;
     * the session serialises it at once), 0 at the end, or a negative
     * value after saying why on stderr. */
    int (*next)(void *arg, ml_envelope_t **env);
    /* 1: the first message must be Accepted before any other is sent
     * (an imaging consult opens the case its chunks belong to). */
    int first_alone;
    /* Serialised size of the largest message it will give: when the
     * broker's Welcome announces a smaller max_record, nothing is sent. */
    size_t max_len;
    void *arg;
} ctl_source_t;

typedef struct {
    uint64_t sent;       /* messages the source gave */
    uint64_t accepted;   /* of them, Accepted */
    uint64_t duplicates; /* of those, ones the broker already had */
    int first_duplicate; /* the first message was a duplicate */
    /* Set when a Nack ended it (ML_EDENIED): */
    char nack_id[ML_ULID_LEN + 1]; /* "" for a Nack about the session */
    int nack_code;
    char nack_reason[1024];
} ctl_result_t;

/* Sends req to the broker (to = the broker id from Welcome) and waits for
 * the AdminReply. On success *reply is the reply envelope (the caller's,
 * ml_env_free). Returns 0; ML_EDENIED when a Nack refused it (res says
 * why, nothing printed); ML_ETLS at once when the TLS session cannot be
 * made and retrying will not help (expired or revoked certificate,
 * unknown CA, broker CN mismatch); another ML_E* after saying why on
 * stderr (timeout, connection). */
int ctl_session_admin(const ctl_opts_t *o, ml_tls_ctx_t *tls, const Medlink__V1__AdminRequest *req,
                      ml_envelope_t **reply, ctl_result_t *res);

/* Sends every message of src and waits until each is Accepted. Returns 0;
 * ML_EDENIED when a Nack refused one (res says which and why, nothing
 * printed); ML_ETLS as ctl_session_admin; another ML_E* after saying why
 * on stderr. */
int ctl_session_send(const ctl_opts_t *o, ml_tls_ctx_t *tls, const ctl_source_t *src,
                     ctl_result_t *res);

/* A connection kept open for many admin requests (medlinkctl top: one
 * session for every refresh, not one per screen). Besides the channel it
 * watches watch_fd (>= 0: readable, e.g. the keyboard) and the signals
 * SIGINT, SIGTERM, SIGHUP, SIGWINCH and SIGTSTP: either one stops a wait or a
 * request (CTL_CONN_EVENT) so the caller can act on it at once. Nothing is
 * printed: the reason of a failure is in ctl_conn_why. One thread. */
typedef struct ctl_conn ctl_conn_t;

#define CTL_CONN_EVENT 1

/* Opens *c (the caller's; ctl_conn_destroy) and starts connecting.
 * Returns 0, or an ML_E* after saying why on stderr. */
int ctl_conn_open(const ctl_opts_t *o, ml_tls_ctx_t *tls, int watch_fd, ctl_conn_t **c);
/* Sends req (a new request id each call) and waits up to timeout_ms for
 * its reply: 0 with *reply (the caller's, ml_env_free); CTL_CONN_EVENT
 * when a key or signal came first (the request is given up); ML_ECLOSED
 * at once when the channel, up before, is down now (it reconnects on its
 * own), or when it drops while waiting; ML_ETIMEDOUT; ML_EDENIED (a
 * Nack); ML_ETLS when the session cannot be made and retrying will not
 * help. */
int ctl_conn_admin(ctl_conn_t *c, const Medlink__V1__AdminRequest *req, int timeout_ms,
                   ml_envelope_t **reply);
/* Keeps the connection alive (heartbeats, reconnects) for ms, or less
 * when an event comes: returns 1 then, else 0. */
int ctl_conn_wait(ctl_conn_t *c, int ms);
/* The events since the last call, cleared: *key_ready 1 when watch_fd is
 * readable (read it before the next wait), *signo the last signal or 0. */
void ctl_conn_take_event(ctl_conn_t *c, int *key_ready, int *signo);
/* Why the last ctl_conn_admin failed ("" after a success). */
const char *ctl_conn_why(const ctl_conn_t *c);
/* Closes the channel and frees *c; safe on NULL, clears *c. */
void ctl_conn_destroy(ctl_conn_t **c);

#endif
