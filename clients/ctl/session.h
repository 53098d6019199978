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

#endif
