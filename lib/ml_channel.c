/* Client side of a medlink connection: DEALER socket + TLS 1.3 session +
 * length-prefixed Envelope records, with Hello/Welcome, heartbeats and
 * reconnects. See ml_channel.h for the contract.
 *
 * Output path: records are appended to a plaintext buffer; the buffer is
 * pushed through TLS and the ciphertext sent as ZeroMQ frames either when it
 * grows past a threshold or from a uv_check handle at the end of the loop
 * iteration. That coalesces many small envelopes into few TLS records and
 * few frames, which is where the throughput comes from.
 *
 * A connection's life: new DEALER with a random routing id -> connect ->
 * TLS handshake (client speaks first) -> Hello -> Welcome = up. Any TLS
 * failure, a socket-monitor DISCONNECTED event, or broker silence past
 * timeout_ms throws the whole connection away; a fresh one follows after a
 * back-off. libzmq's own reconnect is disabled because a re-established TCP
 * connection under the same routing id would carry a broken TLS stream. */
#include "ml_channel.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/rand.h>
#include <zmq.h>

#include "ml_common.h"
#include "ml_frame.h"
#include "ml_zloop.h"

#define S_FLUSH_THRESHOLD (64 * 1024)
#define S_FRAME_MAX (256 * 1024)
#define S_RECV_BUDGET 256

enum { S_DOWN = 0, S_HANDSHAKE, S_HELLO_SENT, S_UP };

struct ml_channel {
    uv_loop_t *loop;
    void *zctx;
    ml_channel_config_t cfg;
    char *endpoint;
    char *node_id;
    char *broker_id;
    char *software;

    void *sock;
    void *mon;
    ml_zwatch_t *watch;
    ml_zwatch_t *mon_watch;
    ml_tls_session_t *tls;
    ml_frame_reader_t *reader;
    ml_envelope_t *welcome_env;
    /* The send window the broker stated last (Welcome, then each Accepted):
     * 0 until it states one. */
    uint32_t credit_msgs;
    uint64_t credit_bytes;
    int state;
    unsigned conn_no;

    uint8_t *out;
    size_t out_len;
    size_t out_cap;

    uv_timer_t hb_timer;
    uv_timer_t retry_timer;
    uv_check_t flush_check;
    int open_handles;
    int destroyed;
    int64_t last_rx;
    int64_t last_tx;
    int64_t conn_started;
    uint32_t backoff;
    uint8_t *rxbuf;
    char fatal[1024]; /* set before s_teardown: the failure needs an operator */
};

static void s_teardown(ml_channel_t *ch, const char *reason);
static void s_connect(ml_channel_t *ch);
static void s_flush(ml_channel_t *ch);
static void s_retry_cb(uv_timer_t *t);

static char *s_strdup(const char *s)
{
    return s ? strdup(s) : NULL;
}

/* Sends all pending ciphertext as frames of at most S_FRAME_MAX bytes. */
static int s_send_cipher(ml_channel_t *ch)
{
    uint8_t buf[S_FRAME_MAX];
    while (ch->tls && ch->sock && ml_tls_session_pending_out(ch->tls) > 0) {
        size_t n = ml_tls_session_take_out(ch->tls, buf, sizeof buf);
        if (n == 0)
            break;
        /* Never block the loop: SNDHWM is 0 (unlimited), so EAGAIN here
         * means the DEALER has no connected peer at all (the broker went
         * away and libzmq's own reconnect is off): the connection is lost.
         * Memory is bounded by max_buffered above us. */
        if (zmq_send(ch->sock, buf, n, ZMQ_DONTWAIT) < 0) {
            if (zmq_errno() == EINTR)
                continue;
            return ML_EIO;
        }
        ch->last_tx = ml_mono_ms();
    }
    return 0;
}

static void s_flush(ml_channel_t *ch)
{
    if (!ch->tls)
        return;
    if (ch->out_len > 0 && ml_tls_session_established(ch->tls)) {
        int rc = ml_tls_session_write(ch->tls, ch->out, ch->out_len);
        if (rc != 0) {
            s_teardown(ch, ml_tls_session_error(ch->tls));
            return;
        }
        ch->out_len = 0;
    }
    if (s_send_cipher(ch) != 0)
        s_teardown(ch, "cannot send to the broker (no connection)");
}

static int s_append_record(ml_channel_t *ch, const uint8_t *data, size_t len)
{
    size_t need = ch->out_len + ML_FRAME_HEADER + len;
    if (need > ch->out_cap) {
        size_t cap = ch->out_cap ? ch->out_cap : 64 * 1024;
        while (cap < need)
            cap *= 2;
        uint8_t *p = realloc(ch->out, cap);
        if (!p)
            return ML_ENOMEM;
        ch->out = p;
        ch->out_cap = cap;
    }
    ml_frame_write_header(ch->out + ch->out_len, len);
    memcpy(ch->out + ch->out_len + ML_FRAME_HEADER, data, len);
    ch->out_len += ML_FRAME_HEADER + len;
    if (ch->out_len >= S_FLUSH_THRESHOLD)
        s_flush(ch);
    return 0;
}

static int s_send_env_internal(ml_channel_t *ch, const ml_envelope_t *env)
{
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc = ml_env_pack(env, &buf, &len);
    if (rc != 0)
        return rc;
    if (len > ch->cfg.max_record) {
        free(buf);
        return ML_ETOOBIG;
    }
    rc = s_append_record(ch, buf, len);
    free(buf);
    return rc;
}

static void s_send_hello(ml_channel_t *ch)
{
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    Medlink__V1__Hello hello = MEDLINK__V1__HELLO__INIT;
    hello.node_id = ch->node_id;
    hello.software = ch->software;
    hello.protocol_version = 1;
    hello.deliveries = ch->cfg.deliveries ? 1 : 0;
    ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
    env.id = id;
    env.kind = MEDLINK__V1__KIND__KIND_HELLO;
    env.from = ch->node_id;
    env.created_at = ml_now_ms();
    env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_HELLO;
    env.hello = &hello;
    if (s_send_env_internal(ch, &env) == 0) {
        ch->state = S_HELLO_SENT;
        s_flush(ch);
    }
}

static void s_send_heartbeat(ml_channel_t *ch)
{
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    Medlink__V1__Heartbeat hb = MEDLINK__V1__HEARTBEAT__INIT;
    hb.sent_at = ml_now_ms();
    ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
    env.id = id;
    env.kind = MEDLINK__V1__KIND__KIND_HEARTBEAT;
    env.from = ch->node_id;
    env.created_at = hb.sent_at;
    env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_HEARTBEAT;
    env.heartbeat = &hb;
    if (s_send_env_internal(ch, &env) == 0)
        s_flush(ch);
}

/* Handles one decoded record. Returns 0, or an error that tears down. */
static int s_handle_record(ml_channel_t *ch, const uint8_t *rec, size_t len)
{
    ml_envelope_t *env = NULL;
    if (ml_env_unpack(rec, len, &env) != 0) {
        ml_log(ML_LOG_WARN, "channel", "%s: malformed envelope from broker (%zu bytes)",
               ch->node_id, len);
        return ML_EPROTO;
    }
    switch (env->payload_case) {
    case MEDLINK__V1__ENVELOPE__PAYLOAD_WELCOME:
        ml_env_free(&ch->welcome_env);
        ch->welcome_env = env;
        ch->credit_msgs = env->welcome->credit_msgs;
        ch->credit_bytes = env->welcome->credit_bytes;
        ch->state = S_UP;
        ch->backoff = ch->cfg.reconnect_ms;
        ml_log(ML_LOG_INFO, "channel", "%s: session up with broker %s (role %s)", ch->node_id,
               env->welcome->broker, env->welcome->role);
        if (ch->cfg.on_state)
            ch->cfg.on_state(ch, 1, "welcome", ch->cfg.arg);
        return 0;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_HEARTBEAT:
        break;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED:
        /* A window, not an increment: the latest one replaces the last
         * (docs/protocol.md, "Credit"). Taken before on_envelope, which
         * then sends within it. */
        if (env->accepted->credit_msgs) {
            ch->credit_msgs = env->accepted->credit_msgs;
            ch->credit_bytes = env->accepted->credit_bytes;
        }
        if (ch->state == S_UP && ch->cfg.on_envelope)
            ch->cfg.on_envelope(ch, env, ch->cfg.arg);
        break;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_NACK:
        if (ch->state != S_UP) {
            /* The broker refused the session itself (e.g. unknown node). */
            ml_log(ML_LOG_ERROR, "channel", "%s: broker refused the session: %s", ch->node_id,
                   env->nack->reason);
            ml_env_free(&env);
            return ML_EDENIED;
        }
        if ((!env->nack->message_id || !*env->nack->message_id) &&
            env->nack->code == MEDLINK__V1__NACK_CODE__NACK_IDENTITY && env->nack->reason &&
            strcmp(env->nack->reason, ML_SESSION_SUPERSEDED) == 0) {
            /* Said once, clearly, in the line s_teardown writes; the
             * longer back-off keeps two programs with one certificate from
             * flapping every 200 ms. */
            ml_env_free(&env);
            ch->backoff = ch->cfg.reconnect_ms * 8;
            s_teardown(ch, "the broker closed this session: " ML_SESSION_SUPERSEDED
                           " (is another program connected with this node's certificate?)");
            return ML_ECLOSED;
        }
        /* fall through */
    default:
        if (ch->state == S_UP && ch->cfg.on_envelope)
            ch->cfg.on_envelope(ch, env, ch->cfg.arg);
        break;
    }
    ml_env_free(&env);
    return 0;
}

/* Reads all plaintext TLS holds, decoding records. */
static int s_drain_plaintext(ml_channel_t *ch)
{
    for (;;) {
        if (!ch->tls)
            return ML_ECLOSED;
        int n = ml_tls_session_read(ch->tls, ch->rxbuf, 64 * 1024);
        if (n == 0)
            return 0;
        if (n < 0)
            return n;
        int rc = ml_frame_reader_feed(ch->reader, ch->rxbuf, (size_t)n);
        if (rc != 0)
            return rc;
        const uint8_t *rec;
        size_t len;
        while ((rc = ml_frame_reader_next(ch->reader, &rec, &len)) == 1) {
            unsigned conn = ch->conn_no;
            rc = s_handle_record(ch, rec, len);
            if (rc != 0)
                return rc;
            /* A callback may have reset or destroyed the channel. */
            if (ch->destroyed || conn != ch->conn_no || !ch->tls)
                return ML_ECLOSED;
        }
        if (rc < 0)
            return rc;
    }
}

static void s_sock_cb(ml_zwatch_t *w, void *zsock, void *arg)
{
    ml_channel_t *ch = arg;
    unsigned conn = ch->conn_no;
    for (int i = 0; i < S_RECV_BUDGET; i++) {
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, zsock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&msg);
            break;
        }
        ch->last_rx = ml_mono_ms();
        if (ch->state == S_HANDSHAKE && zmq_msg_size(&msg) > ML_REFUSED_PREFIX_LEN &&
            memcmp(zmq_msg_data(&msg), ML_REFUSED_PREFIX, ML_REFUSED_PREFIX_LEN) == 0) {
            /* The broker turned the connection away before TLS (a limit):
             * its one plaintext frame says why. Back off for longer. */
            char why[300];
            size_t n = zmq_msg_size(&msg) - ML_REFUSED_PREFIX_LEN;
            if (n > sizeof why - 40)
                n = sizeof why - 40;
            int k = snprintf(why, sizeof why, "broker refused the connection: ");
            for (size_t j = 0; j < n; j++) {
                char c = ((const char *)zmq_msg_data(&msg))[ML_REFUSED_PREFIX_LEN + j];
                why[k++] = c >= 32 && c < 127 ? c : '?';
            }
            why[k] = '\0';
            zmq_msg_close(&msg);
            ml_log(ML_LOG_WARN, "channel", "%s: %s", ch->node_id, why);
            ch->backoff = ch->cfg.reconnect_ms * 8;
            s_teardown(ch, why);
            return;
        }
        int rc = ml_tls_session_feed(ch->tls, zmq_msg_data(&msg), zmq_msg_size(&msg));
        zmq_msg_close(&msg);
        if (rc != 0) {
            s_teardown(ch, ml_tls_session_error(ch->tls));
            return;
        }
        if (ch->state == S_HANDSHAKE) {
            rc = ml_tls_session_handshake(ch->tls);
            if (rc < 0) {
                s_teardown(ch, ml_tls_session_error(ch->tls));
                return;
            }
            if (rc == 1) {
                const char *peer = ml_tls_session_peer_id(ch->tls);
                if (ch->broker_id && (!peer || strcmp(peer, ch->broker_id) != 0)) {
                    snprintf(ch->fatal, sizeof ch->fatal,
                             "broker CN mismatch: the server's certificate names '%s', not the "
                             "expected broker '%s' (broker_id)",
                             peer ? peer : "", ch->broker_id);
                    s_teardown(ch, ch->fatal);
                    return;
                }
                s_send_hello(ch);
            }
            if (conn != ch->conn_no || !ch->tls)
                return;
        }
        if (ml_tls_session_established(ch->tls)) {
            rc = s_drain_plaintext(ch);
            if (ch->destroyed || conn != ch->conn_no)
                return;
            if (rc != 0) {
                s_teardown(ch, rc == ML_ECLOSED ? "broker closed the session"
                               : rc == ML_ETLS  ? ml_tls_session_error(ch->tls)
                                                : ml_strerror(rc));
                return;
            }
        }
        s_flush(ch);
        if (conn != ch->conn_no || !ch->tls)
            return;
    }
}

static void s_mon_cb(ml_zwatch_t *w, void *zsock, void *arg)
{
    ml_channel_t *ch = arg;
    for (int i = 0; i < 16; i++) {
        zmq_msg_t m1, m2;
        zmq_msg_init(&m1);
        if (zmq_msg_recv(&m1, zsock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m1);
            return;
        }
        uint16_t event = 0;
        if (zmq_msg_size(&m1) >= 2)
            memcpy(&event, zmq_msg_data(&m1), 2);
        int more = zmq_msg_more(&m1);
        zmq_msg_close(&m1);
        if (more) {
            zmq_msg_init(&m2);
            zmq_msg_recv(&m2, zsock, 0);
            zmq_msg_close(&m2);
        }
        if (event == ZMQ_EVENT_DISCONNECTED) {
            s_teardown(ch, "connection to broker lost");
            return;
        }
    }
}

static void s_close_mon(ml_channel_t *ch)
{
    ml_zwatch_destroy(&ch->mon_watch);
    if (ch->mon) {
        zmq_close(ch->mon);
        ch->mon = NULL;
    }
}

/* Words for a certificate failure that retrying cannot fix, saying what
 * the operator has to do. The peer refusing our certificate as expired is
 * either our certificate (we can see its date) or the broker's CRL past
 * its next update (OpenSSL sends the same alert for both). */
static void s_fatal_words(ml_channel_t *ch, ml_tls_fail_t f, const char *detail, char *out,
                          size_t len)
{
    char date[40];
    int64_t own = ml_tls_ctx_own_not_after(ch->cfg.tls);
    ml_time_format(own, date, sizeof date);
    switch (f) {
    case ML_TLS_FAIL_REFUSED_EXPIRED:
        if (own && own <= ml_now_ms())
            ml_seterr(out, len,
                      "own certificate expired: the certificate of %s expired on %s; the broker "
                      "refused it (%s)",
                      ch->node_id, date, detail);
        else
            ml_seterr(out, len,
                      "the broker refused our certificate as expired, yet it is valid until %s: "
                      "the broker's CRL has probably expired (see the broker's log) (%s)",
                      date, detail);
        break;
    case ML_TLS_FAIL_REFUSED_REVOKED:
        ml_seterr(out, len,
                  "own certificate revoked: the broker refused the certificate of %s (%s)",
                  ch->node_id, detail);
        break;
    case ML_TLS_FAIL_REFUSED_UNKNOWN_CA:
        ml_seterr(out, len, "unknown CA: the broker does not trust the CA of our certificate (%s)",
                  detail);
        break;
    case ML_TLS_FAIL_PEER_UNKNOWN_CA:
        ml_seterr(out, len, "unknown CA: the broker's certificate is not signed by our CA (%s)",
                  detail);
        break;
    case ML_TLS_FAIL_PEER_EXPIRED:
        ml_seterr(out, len, "the broker's certificate has expired or is not valid yet (%s)",
                  detail);
        break;
    case ML_TLS_FAIL_PEER_REVOKED:
        ml_seterr(out, len, "the broker's certificate is revoked (%s)", detail);
        break;
    default:
        ml_seterr(out, len, "%s (%s)", ml_tls_fail_name(f), detail);
        break;
    }
}

/* Throws the connection away and schedules a reconnect. */
static void s_teardown(ml_channel_t *ch, const char *reason)
{
    /* reason often points into the TLS session destroyed below: copy it. */
    char why[1024];
    snprintf(why, sizeof why, "%s", reason ? reason : "unknown reason");
    reason = why;
    int was_up = ch->state == S_UP;
    ml_tls_fail_t f = ch->tls ? ml_tls_session_fail_kind(ch->tls) : ML_TLS_FAIL_NONE;
    int fatal = ch->fatal[0] != '\0';
    if (!fatal && ml_tls_fail_permanent(f) && !ch->destroyed) {
        s_fatal_words(ch, f, why, ch->fatal, sizeof ch->fatal);
        fatal = 1;
    }
    if (fatal) {
        snprintf(why, sizeof why, "%s", ch->fatal);
        ch->fatal[0] = '\0';
        /* Retrying cannot help until an operator acts: say so loudly
         * (on_fatal's owner does, when there is one), and try again
         * slowly in case one has. */
        ml_log(ch->cfg.on_fatal ? ML_LOG_INFO : ML_LOG_ERROR, "channel",
               "%s: connection refused, retrying will not help: %s", ch->node_id, reason);
    } else if (ch->state != S_DOWN || ch->sock) {
        ml_log(was_up ? ML_LOG_WARN : ML_LOG_INFO, "channel", "%s: connection dropped: %s",
               ch->node_id, reason);
    }
    ch->conn_no++;
    ml_zwatch_destroy(&ch->watch);
    if (ch->sock) {
        if (ch->sock && ch->mon)
            zmq_socket_monitor(ch->sock, NULL, 0);
        zmq_close(ch->sock);
        ch->sock = NULL;
    }
    s_close_mon(ch);
    ml_tls_session_destroy(&ch->tls);
    ml_frame_reader_destroy(&ch->reader);
    ml_env_free(&ch->welcome_env);
    ch->credit_msgs = 0;
    ch->credit_bytes = 0;
    ch->out_len = 0;
    ch->state = S_DOWN;
    if (was_up && ch->cfg.on_state)
        ch->cfg.on_state(ch, 0, reason, ch->cfg.arg);
    if (ch->destroyed)
        return;
    if (fatal && ch->cfg.on_fatal) {
        ch->cfg.on_fatal(ch, reason, ch->cfg.arg);
        if (ch->destroyed)
            return;
    }
    uv_timer_start(&ch->retry_timer, s_retry_cb, ch->backoff, 0);
    uint32_t max = fatal ? ch->cfg.fatal_backoff_ms : ch->cfg.reconnect_ms * 8;
    if (max < ch->cfg.reconnect_ms * 8)
        max = ch->cfg.reconnect_ms * 8;
    ch->backoff = ch->backoff * 2 > max ? max : ch->backoff * 2;
}

static void s_connect(ml_channel_t *ch)
{
    if (ch->destroyed || ch->sock)
        return;
    if (uv_is_active((uv_handle_t *)&ch->retry_timer))
        uv_timer_stop(&ch->retry_timer);
    const char *why = "cannot create socket";
    ch->sock = zmq_socket(ch->zctx, ZMQ_DEALER);
    if (!ch->sock)
        goto fail;

    /* A fresh random routing id per connection: the broker keys TLS
     * sessions by it, and must never mix a new stream into an old session.
     * The first byte must not be zero (reserved by libzmq). */
    uint8_t rid[16];
    RAND_bytes(rid, sizeof rid);
    rid[0] |= 0x80;
    int zero = 0, neg = -1, linger = 0;
    zmq_setsockopt(ch->sock, ZMQ_ROUTING_ID, rid, sizeof rid);
    zmq_setsockopt(ch->sock, ZMQ_SNDHWM, &zero, sizeof zero);
    zmq_setsockopt(ch->sock, ZMQ_RCVHWM, &zero, sizeof zero);
    zmq_setsockopt(ch->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(ch->sock, ZMQ_RECONNECT_IVL, &neg, sizeof neg);
    int64_t maxmsg = (int64_t)S_FRAME_MAX * 4;
    zmq_setsockopt(ch->sock, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);

    char mon_ep[96];
    snprintf(mon_ep, sizeof mon_ep, "inproc://ml-chan-mon-%p-%u", (void *)ch, ch->conn_no);
    if (zmq_socket_monitor(ch->sock, mon_ep, ZMQ_EVENT_DISCONNECTED) == 0) {
        ch->mon = zmq_socket(ch->zctx, ZMQ_PAIR);
        if (ch->mon && zmq_connect(ch->mon, mon_ep) == 0)
            ml_zwatch_new(ch->loop, ch->mon, s_mon_cb, ch, &ch->mon_watch);
    }

    why = "cannot connect";
    if (zmq_connect(ch->sock, ch->endpoint) != 0)
        goto fail;
    why = "out of memory";
    ch->tls = ml_tls_session_new(ch->cfg.tls);
    ch->reader = ml_frame_reader_new(ch->cfg.max_record);
    if (!ch->tls || !ch->reader)
        goto fail;
    if (ml_zwatch_new(ch->loop, ch->sock, s_sock_cb, ch, &ch->watch) != 0)
        goto fail;
    ch->state = S_HANDSHAKE;
    ch->conn_started = ch->last_rx = ml_mono_ms();
    if (ml_tls_session_handshake(ch->tls) < 0) {
        why = ml_tls_session_error(ch->tls);
        goto fail;
    }
    s_send_cipher(ch);
    ml_log(ML_LOG_DEBUG, "channel", "%s: connecting to %s", ch->node_id, ch->endpoint);
    return;
fail:
    ml_log(ML_LOG_ERROR, "channel", "%s: %s (%s): %s", ch->node_id, why, ch->endpoint,
           zmq_strerror(zmq_errno()));
    s_teardown(ch, why);
}

static void s_retry_cb(uv_timer_t *t)
{
    s_connect(t->data);
}

static void s_hb_cb(uv_timer_t *t)
{
    ml_channel_t *ch = t->data;
    if (!ch->sock)
        return;
    int64_t now = ml_mono_ms();
    if (ch->state != S_UP) {
        if (now - ch->conn_started > (int64_t)ch->cfg.timeout_ms)
            s_teardown(ch, "no session within the handshake deadline");
        return;
    }
    if (now - ch->last_rx > (int64_t)ch->cfg.timeout_ms) {
        s_teardown(ch, "broker silent past the heartbeat timeout");
        return;
    }
    if (now - ch->last_tx >= (int64_t)ch->cfg.heartbeat_ms)
        s_send_heartbeat(ch);
}

static void s_check_cb(uv_check_t *h)
{
    ml_channel_t *ch = h->data;
    if (ch->out_len > 0 || (ch->tls && ml_tls_session_pending_out(ch->tls) > 0))
        s_flush(ch);
}

int ml_channel_new(uv_loop_t *loop, void *zctx, const ml_channel_config_t *cfg, ml_channel_t **out)
{
    if (!loop || !zctx || !cfg || !cfg->endpoint || !cfg->tls || !cfg->node_id)
        return ML_EINVAL;
    ml_channel_t *ch = calloc(1, sizeof *ch);
    if (!ch)
        return ML_ENOMEM;
    ch->loop = loop;
    ch->zctx = zctx;
    ch->cfg = *cfg;
    if (!ch->cfg.heartbeat_ms)
        ch->cfg.heartbeat_ms = 2000;
    if (!ch->cfg.timeout_ms)
        ch->cfg.timeout_ms = ch->cfg.heartbeat_ms * 3;
    if (!ch->cfg.reconnect_ms)
        ch->cfg.reconnect_ms = 200;
    if (!ch->cfg.fatal_backoff_ms)
        ch->cfg.fatal_backoff_ms = 60000;
    if (!ch->cfg.max_record)
        ch->cfg.max_record = ML_FRAME_DEFAULT_MAX;
    if (!ch->cfg.max_buffered)
        ch->cfg.max_buffered = 64u * 1024 * 1024;
    ch->endpoint = s_strdup(cfg->endpoint);
    ch->node_id = s_strdup(cfg->node_id);
    ch->broker_id = cfg->broker_id && *cfg->broker_id ? s_strdup(cfg->broker_id) : NULL;
    ch->software = s_strdup(cfg->software ? cfg->software
                                          : "libmedlink/"
                                            "0.1.0");
    ch->rxbuf = malloc(64 * 1024);
    if (!ch->endpoint || !ch->node_id || !ch->software || !ch->rxbuf) {
        free(ch->endpoint);
        free(ch->node_id);
        free(ch->broker_id);
        free(ch->software);
        free(ch->rxbuf);
        free(ch);
        return ML_ENOMEM;
    }
    ch->cfg.endpoint = ch->endpoint;
    ch->cfg.node_id = ch->node_id;
    ch->cfg.broker_id = ch->broker_id;
    ch->cfg.software = ch->software;
    ch->backoff = ch->cfg.reconnect_ms;
    uv_timer_init(loop, &ch->hb_timer);
    uv_timer_init(loop, &ch->retry_timer);
    uv_check_init(loop, &ch->flush_check);
    ch->hb_timer.data = ch->retry_timer.data = ch->flush_check.data = ch;
    ch->open_handles = 3;
    uint64_t tick = ch->cfg.heartbeat_ms / 4 ? ch->cfg.heartbeat_ms / 4 : 1;
    uv_timer_start(&ch->hb_timer, s_hb_cb, tick, tick);
    uv_check_start(&ch->flush_check, s_check_cb);
    s_connect(ch);
    *out = ch;
    return 0;
}

static void s_close_cb(uv_handle_t *h)
{
    ml_channel_t *ch = h->data;
    if (--ch->open_handles == 0) {
        free(ch->endpoint);
        free(ch->node_id);
        free(ch->broker_id);
        free(ch->software);
        free(ch->out);
        free(ch->rxbuf);
        free(ch);
    }
}

void ml_channel_destroy(ml_channel_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    ml_channel_t *ch = *self_p;
    *self_p = NULL;
    if (ch->tls && ml_tls_session_established(ch->tls)) {
        /* Best effort: push out what is buffered and a close_notify. */
        s_flush(ch);
        if (ch->tls) {
            ml_tls_session_close(ch->tls);
            s_send_cipher(ch);
        }
    }
    ch->destroyed = 1;
    s_teardown(ch, "channel closed");
    uv_timer_stop(&ch->hb_timer);
    uv_timer_stop(&ch->retry_timer);
    uv_check_stop(&ch->flush_check);
    uv_close((uv_handle_t *)&ch->hb_timer, s_close_cb);
    uv_close((uv_handle_t *)&ch->retry_timer, s_close_cb);
    uv_close((uv_handle_t *)&ch->flush_check, s_close_cb);
}

int ml_channel_send(ml_channel_t *ch, const ml_envelope_t *env)
{
    if (ch->state != S_UP)
        return ML_ECLOSED;
    if (ch->out_len > ch->cfg.max_buffered)
        return ML_EFULL;
    return s_send_env_internal(ch, env);
}

int ml_channel_send_raw(ml_channel_t *ch, const uint8_t *data, size_t len)
{
    if (ch->state != S_UP)
        return ML_ECLOSED;
    if (len > ch->cfg.max_record)
        return ML_ETOOBIG;
    if (ch->out_len > ch->cfg.max_buffered)
        return ML_EFULL;
    return s_append_record(ch, data, len);
}

int ml_channel_is_up(const ml_channel_t *ch)
{
    return ch && ch->state == S_UP;
}

int ml_channel_credit(const ml_channel_t *ch, uint32_t *msgs, uint64_t *bytes)
{
    if (!ch || ch->state != S_UP) {
        *msgs = 0;
        *bytes = 0;
        return ML_ECLOSED;
    }
    if (ch->credit_msgs == 0) {
        /* A broker that states no window: the caller's own binds. */
        *msgs = UINT32_MAX;
        *bytes = UINT64_MAX;
        return 0;
    }
    *msgs = ch->credit_msgs;
    *bytes = ch->credit_bytes ? ch->credit_bytes : UINT64_MAX;
    return 0;
}

const Medlink__V1__Welcome *ml_channel_welcome(const ml_channel_t *ch)
{
    return ch && ch->welcome_env ? ch->welcome_env->welcome : NULL;
}

void ml_channel_reset(ml_channel_t *ch, const char *reason)
{
    if (ch->sock)
        s_teardown(ch, reason ? reason : "reset");
}
