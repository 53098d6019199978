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
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

#include "broker_int.h"
#include "delivery.h"
#include "ingress.h"
#include "metrics.h"
#include "ml_channel.h"
#include "ml_frame.h"
#include "ml_hash.h"
#include "session.h"
#include "submit.h"
#include "wire.h"

/* ------------------------------------------------------------------ */
/* Session table                                                       */

/* FNV-1a, for the slot of a source address in the fixed handshakes_per_s
 * table (s_handshake_allowed): a collision only starts the other address's
 * bucket afresh, so a public hash does no harm there. The session table
 * itself is an ml_hash. */
static uint32_t s_hash(const uint8_t *p, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 16777619u;
    }
    return h;
}

/* The session of a routing id (closed ones included, until they expire),
 * or NULL. The table is an ml_hash with a secret key: routing ids are the
 * peers' to choose, and colliding ones must not turn every lookup into a
 * scan. O(1) expected. */
static ml_session_t *s_find(ml_broker_t *b, const uint8_t *rid, size_t len)
{
    return b->by_rid ? ml_hash_get(b->by_rid, rid, len) : NULL;
}

static ml_session_t *s_session_new(ml_broker_t *b, const uint8_t *rid, size_t len)
{
    ml_session_t *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->tls = ml_tls_session_new(b->tls);
    s->reader = ml_frame_reader_new((size_t)b->cfg->max_record);
    if (!s->tls || !s->reader) {
        ml_tls_session_destroy(&s->tls);
        ml_frame_reader_destroy(&s->reader);
        free(s);
        return NULL;
    }
    memcpy(s->rid, rid, len);
    s->rid_len = len;
    /* The key is borrowed from the session (ML_HASH_BORROW_KEYS). */
    if (!b->by_rid || ml_hash_put(b->by_rid, s->rid, len, s) != 0) {
        ml_tls_session_destroy(&s->tls);
        ml_frame_reader_destroy(&s->reader);
        free(s);
        return NULL;
    }
    s->serial = ++b->next_serial;
    s->created = s->last_rx = ml_mono_ms();
    /* A short printable tag for logs: the first bytes of the routing id. */
    for (size_t i = 0; i < len && i < 8; i++)
        snprintf(s->peer_hex + 2 * i, 3, "%02x", rid[i]);
    s->next = b->sessions;
    if (b->sessions)
        b->sessions->prev = s;
    b->sessions = s;
    b->n_live++;
    s->preauth = 1;
    s->pa_prev = b->pa_tail;
    if (b->pa_tail)
        b->pa_tail->pa_next = s;
    else
        b->pa_head = s;
    b->pa_tail = s;
    b->n_preauth++;
    return s;
}

/* The session is no longer unauthenticated (its handshake ended, or it
 * closed): it leaves the max_preauth_sessions budget. O(1). */
static void s_preauth_leave(ml_broker_t *b, ml_session_t *s)
{
    if (!s->preauth)
        return;
    if (s->pa_prev)
        s->pa_prev->pa_next = s->pa_next;
    else
        b->pa_head = s->pa_next;
    if (s->pa_next)
        s->pa_next->pa_prev = s->pa_prev;
    else
        b->pa_tail = s->pa_prev;
    s->pa_prev = s->pa_next = NULL;
    s->preauth = 0;
    b->n_preauth--;
}

void ml_session_free(ml_broker_t *b, ml_session_t *s)
{
    if (b->by_rid)
        ml_hash_del(b->by_rid, s->rid, s->rid_len, NULL);
    if (s->prev)
        s->prev->next = s->next;
    else
        b->sessions = s->next;
    if (s->next)
        s->next->prev = s->prev;
    if (s->dirty) {
        ml_session_t **dp = &b->dirty;
        while (*dp && *dp != s)
            dp = &(*dp)->dirty_next;
        if (*dp)
            *dp = s->dirty_next;
    }
    if (s->blocked) {
        ml_session_t **bp = &b->blocked;
        while (*bp && *bp != s)
            bp = &(*bp)->blocked_next;
        if (*bp)
            *bp = s->blocked_next;
    }
    s_preauth_leave(b, s);
    free(s->held);
    ml_tls_session_destroy(&s->tls);
    ml_frame_reader_destroy(&s->reader);
    free(s->peer_id);
    free(s->out);
    free(s->acc);
    free(s->holds);
    free(s);
}

/* ------------------------------------------------------------------ */
/* Session input                                                       */

/* Closes old, a session of the same node as the newer session s: both
 * ends say so in their logs (the peer gets a Nack with
 * ML_SESSION_SUPERSEDED before close_notify, which ml_channel logs). */
static void s_supersede(ml_broker_t *b, ml_session_t *old, ml_session_t *s)
{
    ml_log(ML_LOG_WARN, "session",
           "%s session %s closed: a newer session %s of the same node took over (%s per node)",
           ml_wire_who(old), old->peer_hex, s->peer_hex,
           old->deliveries ? "one delivering session" : "a few sessions without deliveries");
    ml_wire_nack(b, old, NULL, MEDLINK__V1__NACK_CODE__NACK_IDENTITY, ML_SESSION_SUPERSEDED);
    ml_wire_flush(b, old);
    ml_session_close(b, old, NULL);
}

static void s_hello(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env)
{
    if (env->payload_case != MEDLINK__V1__ENVELOPE__PAYLOAD_HELLO) {
        ml_wire_refuse(b, s, env->id, MEDLINK__V1__NACK_CODE__NACK_NOT_HELLO,
                       "the first message of a session must be Hello");
        ml_session_close(b, s, "no Hello");
        return;
    }
    if (strcmp(env->hello->node_id, s->peer_id) != 0) {
        char err[512];
        snprintf(err, sizeof err, "Hello names node '%s' but the certificate names '%s'",
                 env->hello->node_id, s->peer_id);
        ml_wire_refuse(b, s, env->id, MEDLINK__V1__NACK_CODE__NACK_IDENTITY, err);
        ml_session_close(b, s, "Hello identity mismatch");
        return;
    }
    ml_nodestate_t *ns = s->ns;
    s->state = S_READY;
    s->deliveries = env->hello->deliveries;
    ns->online++;
    ns->last_seen = ml_now_ms();
    if (s->deliveries) {
        /* One delivering session per node, the newest: an agent that
         * reconnected has a fresh routing id and the old session is a dead
         * link (or a second agent runs with this node's certificate, which
         * both logs say). */
        if (ns->deliver && ns->deliver != s)
            s_supersede(b, ns->deliver, s);
        ns->deliver = s;
    } else {
        /* Sessions without deliveries (medlinkctl next to the agent): a
         * few at once, the newest win, so one certificate cannot hold
         * sessions (and their output) without bound. */
        ml_session_t *oldest = NULL;
        size_t n = 0;
        for (ml_session_t *x = b->sessions; x; x = x->next) {
            if (x == s || x->ns != ns || x->state != S_READY || x->deliveries || x->sink)
                continue;
            n++;
            if (!oldest || x->created < oldest->created)
                oldest = x;
        }
        if (n >= S_SIDE_SESSIONS_MAX && oldest)
            s_supersede(b, oldest, s);
    }
    ml_log(ML_LOG_INFO, "session", "%s session %s up (%s, deliveries %s)", s->peer_id, s->peer_hex,
           env->hello->software, s->deliveries ? "on" : "off");
    Medlink__V1__Welcome w = MEDLINK__V1__WELCOME__INIT;
    w.node_id = s->peer_id;
    w.role = (char *)ml_role_name(ns->node->role);
    w.community = ns->node->community ? ns->node->community : "";
    w.heartbeat_ms = (uint32_t)b->cfg->heartbeat_ms;
    w.max_record = (uint32_t)b->cfg->max_record;
    w.broker = b->cfg->broker_id;
    /* Its first window (docs/protocol.md, "Credit"); the first Accepted
     * restates it at the full share. */
    ml_submit_credit(b, s, &w.credit_msgs, &w.credit_bytes);
    if (w.credit_msgs > ML_SUBMIT_CREDIT_WELCOME)
        w.credit_msgs = ML_SUBMIT_CREDIT_WELCOME;
    ml_envelope_t out = MEDLINK__V1__ENVELOPE__INIT;
    out.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_WELCOME;
    out.welcome = &w;
    ml_wire_reply(b, s, &out);
    if (s->deliveries)
        ml_delivery_pump(b, ns);
}

/* The id of a record refused as too large, read from the first bytes of
 * its body (ml_frame_reader_refused_head): field 1 of the Envelope, which
 * encoders write first, as tag 0x0a and a one-byte length. Returns out, or
 * NULL when those bytes did not come with the header or do not start with
 * a ULID (the Nack then has no message_id). */
static const char *s_refused_id(const ml_frame_reader_t *r, char out[ML_ULID_LEN + 1])
{
    const uint8_t *h;
    size_t n = ml_frame_reader_refused_head(r, &h);
    if (n < 2 + ML_ULID_LEN || h[0] != 0x0a || h[1] != ML_ULID_LEN)
        return NULL;
    memcpy(out, h + 2, ML_ULID_LEN);
    out[ML_ULID_LEN] = '\0';
    return ml_ulid_valid(out) ? out : NULL;
}

static void s_record(ml_broker_t *b, ml_session_t *s, const uint8_t *rec, size_t len)
{
    ml_envelope_t *env = NULL;
    s->rx_kind = 0;
    if (ml_env_unpack(rec, len, &env) != 0) {
        char err[128];
        snprintf(err, sizeof err, "malformed envelope (%zu bytes could not be decoded)", len);
        ml_wire_refuse(b, s, NULL, MEDLINK__V1__NACK_CODE__NACK_MALFORMED, err);
        if (s->state != S_READY)
            ml_session_close(b, s, "malformed first record");
        return;
    }
    /* What a refusal of this record counts under: the kind its payload
     * is (a sender may leave Envelope.kind unset, or set it wrong). */
    s->rx_kind = ml_env_kind_of_payload(env->payload_case);
    if (s->state == S_AWAIT_HELLO) {
        s_hello(b, s, env);
        goto out;
    }
    s->ns->last_seen = ml_now_ms();
    switch (env->payload_case) {
    case MEDLINK__V1__ENVELOPE__PAYLOAD_HEARTBEAT: {
        /* Answered at most once per S_HB_ANSWER_MS (clients send one when
         * they have sent nothing for their heartbeat interval, which is
         * longer), and not at all to a session whose output is not being
         * read: heartbeats must not be a way to make the broker queue. */
        int64_t now = ml_mono_ms();
        if (now - s->hb_answered < S_HB_ANSWER_MS || !ml_wire_room(b, s))
            break;
        s->hb_answered = now;
        Medlink__V1__Heartbeat hb = MEDLINK__V1__HEARTBEAT__INIT;
        hb.sent_at = ml_now_ms();
        ml_envelope_t out = MEDLINK__V1__ENVELOPE__INIT;
        out.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_HEARTBEAT;
        out.heartbeat = &hb;
        ml_wire_reply(b, s, &out);
        break;
    }
    case MEDLINK__V1__ENVELOPE__PAYLOAD_ACK:
        for (size_t i = 0; i < env->ack->n_message_ids && s->state == S_READY; i++)
            ml_ingress_ack(b, s, env->ack->message_ids[i]);
        break;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REQUEST:
        ml_bk_admin(b, s, env);
        break;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_NACK:
        ml_ingress_refused(b, s, env->nack);
        break;
    default:
        if (ml_env_kind_is_routed(ml_env_kind_of_payload(env->payload_case))) {
            ml_ingress_route(b, s, env, rec, len);
        } else {
            char err[128];
            snprintf(err, sizeof err, "unexpected message kind %s from a client",
                     ml_kind_name(ml_env_kind_of_payload(env->payload_case)));
            ml_wire_refuse(b, s, env->id, MEDLINK__V1__NACK_CODE__NACK_MALFORMED, err);
        }
    }
out:
    s->rx_kind = 0;
    ml_env_free(&env);
}

static void s_established(ml_broker_t *b, ml_session_t *s)
{
    const char *cn = ml_tls_session_peer_id(s->tls);
    s_preauth_leave(b, s);
    s->peer_id = strdup(cn ? cn : "");
    s->ns = cn ? ml_delivery_node(b, cn) : NULL;
    if (s->ns && b->n_auth >= (size_t)b->cfg->max_sessions && !s->ns->online) {
        /* max_sessions counts authenticated sessions; a node that has one
         * already may replace it (the newest wins), others wait. */
        char err[200];
        snprintf(err, sizeof err, "the broker is at max_sessions (%ld); retry later",
                 b->cfg->max_sessions);
        ml_log(ML_LOG_WARN, "session", "refused session %s of %s: %s", s->peer_hex, cn, err);
        b->refused_total++;
        ml_wire_nack(b, s, NULL, MEDLINK__V1__NACK_CODE__NACK_RATE_LIMITED, err);
        ml_wire_flush(b, s);
        ml_session_close(b, s, NULL);
        return;
    }
    s->authed = 1;
    b->n_auth++;
    if (!s->ns) {
        char err[512];
        snprintf(err, sizeof err, "certificate names unregistered node '%s'", cn ? cn : "");
        ml_log(ML_LOG_WARN, "session", "refused session %s: %s", s->peer_hex, err);
        b->refused_total++;
        ml_wire_nack(b, s, NULL, MEDLINK__V1__NACK_CODE__NACK_UNKNOWN_NODE, err);
        ml_wire_flush(b, s);
        ml_session_close(b, s, NULL);
        return;
    }
    s->state = S_AWAIT_HELLO;
}

/* Logs a refused TLS handshake naming the peer's CN (when it presented a
 * certificate) and the reason: expired, revoked, unknown CA, CRL expired.
 * A CRL past its nextUpdate refuses everyone, so that one is an ERROR. */
static void s_log_refused_tls(const ml_session_t *s)
{
    ml_tls_fail_t f = ml_tls_session_fail_kind(s->tls);
    const char *cn = ml_tls_session_peer_cn(s->tls);
    char who[300];
    if (cn && *cn)
        snprintf(who, sizeof who, "CN '%s'", cn);
    else
        snprintf(who, sizeof who, "no certificate");
    if (f == ML_TLS_FAIL_CRL_EXPIRED)
        ml_log(ML_LOG_ERROR, "session",
               "refused session %s (%s): CRL expired: the CRL in force is past its next "
               "update, so every handshake fails until a fresh one is loaded (deploy/pki.sh "
               "--crl, then systemctl reload medlinkd): %s",
               s->peer_hex, who, ml_tls_session_error(s->tls));
    else
        ml_log(ML_LOG_WARN, "session", "refused session %s (%s): %s: %s", s->peer_hex, who,
               ml_tls_fail_name(f), ml_tls_session_error(s->tls));
}

static void s_input(ml_broker_t *b, ml_session_t *s, const uint8_t *data, size_t len)
{
    s->last_rx = ml_mono_ms();
    if (ml_tls_session_feed(s->tls, data, len) != 0) {
        if (s->state == S_HANDSHAKE) {
            s_log_refused_tls(s);
            b->refused_total++;
            ml_bk_metrics_tls_failure(b, ml_tls_session_fail_kind(s->tls));
            /* Let the alert reach the peer so it can log a reason too. */
            ml_wire_send_cipher(b, s);
            ml_session_close(b, s, NULL);
        } else {
            ml_session_close(b, s, ml_tls_session_error(s->tls));
        }
        return;
    }
    if (s->state == S_HANDSHAKE) {
        int rc = ml_tls_session_handshake(s->tls);
        if (rc < 0) {
            s_log_refused_tls(s);
            b->refused_total++;
            ml_bk_metrics_tls_failure(b, ml_tls_session_fail_kind(s->tls));
            ml_wire_send_cipher(b, s);
            ml_session_close(b, s, NULL);
            return;
        }
        if (rc == 0) {
            ml_wire_mark_dirty(b, s);
            return;
        }
        s_established(b, s);
        if (s->state == S_CLOSED)
            return;
    }
    uint64_t serial = s->serial;
    for (;;) {
        int n = ml_tls_session_read(s->tls, b->rxbuf, 64 * 1024);
        if (n == 0)
            break;
        if (n < 0) {
            ml_session_close(
                b, s, n == ML_ECLOSED ? "peer closed the session" : ml_tls_session_error(s->tls));
            return;
        }
        int rc = ml_frame_reader_feed(s->reader, b->rxbuf, (size_t)n);
        const uint8_t *rec;
        size_t rlen;
        while (rc == 0 && (rc = ml_frame_reader_next(s->reader, &rec, &rlen)) == 1) {
            s_record(b, s, rec, rlen);
            if (s->state == S_CLOSED || s->serial != serial)
                return;
            rc = 0;
        }
        if (rc < 0) {
            char err[160], id[ML_ULID_LEN + 1];
            snprintf(err, sizeof err, "record over the %ld-byte limit", b->cfg->max_record);
            ml_wire_refuse(b, s, s_refused_id(s->reader, id),
                           MEDLINK__V1__NACK_CODE__NACK_TOO_LARGE, err);
            ml_wire_flush(b, s);
            ml_session_close(b, s, err);
            return;
        }
    }
    ml_wire_mark_dirty(b, s);
}

/* Turns a new connection away before TLS with one plaintext frame that
 * says why (ML_REFUSED_PREFIX), so the client can log a reason. */
static void s_refuse_connection(ml_broker_t *b, const uint8_t *rid, size_t rid_len, const char *why)
{
    char frame[300];
    int n = snprintf(frame, sizeof frame, "%s%s", ML_REFUSED_PREFIX, why);
    if (n < 0)
        return;
    if (zmq_send(b->router, rid, rid_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0)
        zmq_send(b->router, frame, (size_t)n < sizeof frame ? (size_t)n : sizeof frame - 1,
                 ZMQ_DONTWAIT);
}

/* handshakes_per_s for one source address: 1 if a new connection from it
 * may start a handshake now. A token bucket (burst of one second's worth)
 * in a fixed table. *log_it says whether to log a refusal (once a second
 * per address, so a flood cannot flood the log). */
static int s_handshake_allowed(ml_broker_t *b, const char *addr, int *log_it)
{
    uint32_t h = s_hash((const uint8_t *)addr, strlen(addr));
    size_t slot = h % (sizeof b->hs / sizeof b->hs[0]);
    int64_t now = ml_mono_ms();
    double rate = (double)b->cfg->handshakes_per_s;
    if (strncmp(b->hs[slot].addr, addr, sizeof b->hs[0].addr) != 0) {
        snprintf(b->hs[slot].addr, sizeof b->hs[0].addr, "%s", addr);
        b->hs[slot].tokens = rate;
        b->hs[slot].at = now;
        b->hs[slot].logged = 0;
    }
    double t = b->hs[slot].tokens + (double)(now - b->hs[slot].at) * rate / 1000.0;
    b->hs[slot].tokens = t > rate ? rate : t;
    b->hs[slot].at = now;
    if (b->hs[slot].tokens >= 1.0) {
        b->hs[slot].tokens -= 1.0;
        return 1;
    }
    *log_it = now - b->hs[slot].logged >= 1000;
    if (*log_it)
        b->hs[slot].logged = now;
    return 0;
}

/* max_preauth_sessions handshakes are in progress: the oldest gives way
 * to the new one. A flood of half-open handshakes then only ever holds
 * that many slots and each for a short while, while a real node's
 * handshake (a few round trips) completes long before it is the oldest;
 * authenticated sessions are never touched. Logged once a second with a
 * count, so a flood cannot flood the log. O(1). */
static void s_preauth_evict(ml_broker_t *b)
{
    ml_session_t *old = b->pa_head;
    int64_t now = ml_mono_ms();
    b->refused_total++;
    b->preauth_evicted++;
    if (now - b->preauth_logged >= 1000) {
        ml_log(ML_LOG_WARN, "session",
               "max_preauth_sessions (%ld) handshakes in progress: evicted the oldest, %s (%lld "
               "ms old); %llu evicted since the last such line",
               b->cfg->max_preauth_sessions, old->peer_hex, (long long)(now - old->created),
               (unsigned long long)b->preauth_evicted);
        b->preauth_logged = now;
        b->preauth_evicted = 0;
    }
    ml_session_close(b, old, NULL);
}

void ml_session_router_cb(ml_zwatch_t *w, void *zsock, void *arg)
{
    ml_broker_t *b = arg;
    for (int i = 0; i < S_RECV_BUDGET; i++) {
        zmq_msg_t rid, data;
        zmq_msg_init(&rid);
        if (zmq_msg_recv(&rid, zsock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&rid);
            return;
        }
        if (!zmq_msg_more(&rid)) {
            zmq_msg_close(&rid);
            continue;
        }
        zmq_msg_init(&data);
        zmq_msg_recv(&data, zsock, 0);
        int extra = zmq_msg_more(&data);
        while (extra) {
            /* Our peers send one frame per message; drop anything else. */
            zmq_msg_t junk;
            zmq_msg_init(&junk);
            zmq_msg_recv(&junk, zsock, 0);
            extra = zmq_msg_more(&junk);
            zmq_msg_close(&junk);
        }
        size_t rlen = zmq_msg_size(&rid);
        if (rlen == 0 || rlen > S_RID_MAX)
            goto next;
        ml_session_t *s = s_find(b, zmq_msg_data(&rid), rlen);
        if (!s) {
            char why[200];
            const char *addr = zmq_msg_gets(&data, "Peer-Address");
            int log_it = 1;
            if (b->n_auth >= (size_t)b->cfg->max_sessions) {
                snprintf(why, sizeof why, "the broker is at max_sessions (%ld); retry later",
                         b->cfg->max_sessions);
                b->refused_total++;
                if (b->max_sessions_logged + 1000 <= ml_mono_ms()) {
                    b->max_sessions_logged = ml_mono_ms();
                    ml_log(ML_LOG_WARN, "session", "refused new connection from %s: %s",
                           addr ? addr : "?", why);
                }
                s_refuse_connection(b, zmq_msg_data(&rid), rlen, why);
                goto next;
            }
            if (!s_handshake_allowed(b, addr ? addr : "?", &log_it)) {
                snprintf(why, sizeof why,
                         "too many new connections from %s (limit %ld per second); retry later",
                         addr ? addr : "?", b->cfg->handshakes_per_s);
                b->refused_total++;
                if (log_it)
                    ml_log(ML_LOG_WARN, "session", "refused new connection: %s", why);
                s_refuse_connection(b, zmq_msg_data(&rid), rlen, why);
                goto next;
            }
            if (b->n_preauth >= (size_t)b->cfg->max_preauth_sessions && b->pa_head)
                s_preauth_evict(b);
            s = s_session_new(b, zmq_msg_data(&rid), rlen);
            if (!s)
                goto next;
        }
        if (s->state != S_CLOSED)
            s_input(b, s, zmq_msg_data(&data), zmq_msg_size(&data));
    next:
        zmq_msg_close(&rid);
        zmq_msg_close(&data);
    }
}

/* Closes a session: TLS gone, deliveries requeued, pending puts detached,
 * the entry kept as a tombstone until it expires. reason NULL = already
 * logged. */
void ml_session_close(ml_broker_t *b, ml_session_t *s, const char *reason)
{
    if (s->state == S_CLOSED)
        return;
    if (reason)
        ml_log(s->state == S_READY ? ML_LOG_INFO : ML_LOG_WARN, "session",
               "%s session %s closed: %s", ml_wire_who(s), s->peer_hex, reason);
    if (s->tls && ml_tls_session_established(s->tls)) {
        /* Tell the peer now (what is buffered, then close_notify) rather
         * than let it find out at its heartbeat timeout. Best effort and
         * without ml_wire_flush, which would come back here on a failure. */
        if (s->out_len > 0)
            ml_tls_session_write(s->tls, s->out, s->out_len);
        ml_tls_session_close(s->tls);
        ml_wire_send_cipher(b, s);
    }
    if (s->state == S_READY) {
        ml_nodestate_t *ns = s->ns;
        ns->online--;
        if (ns->deliver == s) {
            ns->deliver = NULL;
            ml_delivery_requeue(ns);
        }
    }
    /* Their commits still complete (and queue the messages); only the
     * answer to this session is no longer possible. */
    ml_submit_orphan(b, s);
    s_preauth_leave(b, s);
    if (s->authed) {
        s->authed = 0;
        b->n_auth--;
    }
    free(s->held);
    s->held = NULL;
    s->held_len = 0;
    s->state = S_CLOSED;
    s->serial = ++b->next_serial;
    ml_tls_session_destroy(&s->tls);
    ml_frame_reader_destroy(&s->reader);
    free(s->out);
    s->out = NULL;
    s->out_len = s->out_cap = 0;
    s->expire_at = ml_mono_ms() + b->cfg->session_timeout_ms;
    b->n_live--;
}

/* Housekeeping of the session table: handshakes and Hellos past
 * handshake_timeout_ms are refused, silent sessions closed, tombstones
 * freed once they expire. O(sessions). */
void ml_session_tick(ml_broker_t *b, int64_t now)
{
    ml_session_t *next;
    for (ml_session_t *s = b->sessions; s; s = next) {
        next = s->next;
        switch (s->state) {
        case S_HANDSHAKE:
        case S_AWAIT_HELLO:
            if (now - s->created > b->cfg->handshake_timeout_ms) {
                b->refused_total++;
                if (s->state == S_HANDSHAKE)
                    ml_bk_metrics_tls_failure(b, ML_BK_TLS_FAIL_TIMEOUT);
                ml_log(ML_LOG_WARN, "session",
                       "refused session %s: no %s within the %ld ms "
                       "handshake deadline",
                       s->peer_hex, s->state == S_HANDSHAKE ? "TLS handshake" : "Hello",
                       b->cfg->handshake_timeout_ms);
                ml_session_close(b, s, NULL);
            }
            break;
        case S_READY:
            if (now - s->last_rx > b->cfg->session_timeout_ms)
                ml_session_close(b, s, "silent past session_timeout_ms");
            break;
        case S_CLOSED:
            if (now >= s->expire_at)
                ml_session_free(b, s);
            break;
        }
    }
}

int ml_session_feed_plaintext(ml_broker_t *b, const char *node_id, const uint8_t *data, size_t len)
{
    char rid[S_RID_MAX];
    int n = snprintf(rid, sizeof rid, "plaintext:%s", node_id ? node_id : "");
    if (n < 0 || (size_t)n >= sizeof rid)
        return ML_EINVAL;
    ml_nodestate_t *ns = node_id ? ml_delivery_node(b, node_id) : NULL;
    if (!ns)
        return ML_ENOTFOUND;
    ml_session_t *s = s_find(b, (const uint8_t *)rid, (size_t)n);
    if (s && s->state == S_CLOSED) {
        ml_session_free(b, s);
        s = NULL;
    }
    if (!s) {
        s = s_session_new(b, (const uint8_t *)rid, (size_t)n);
        if (!s)
            return ML_ENOMEM;
        /* As s_established leaves a session whose TLS handshake verified
         * node_id's certificate: waiting for its Hello. */
        ml_tls_session_destroy(&s->tls);
        s_preauth_leave(b, s);
        s->authed = 1;
        b->n_auth++;
        s->sink = 1;
        s->peer_id = strdup(node_id);
        s->ns = ns;
        s->state = S_AWAIT_HELLO;
        if (!s->peer_id) {
            ml_session_close(b, s, NULL);
            return ML_ENOMEM;
        }
    }
    uint64_t serial = s->serial;
    s->last_rx = ml_mono_ms();
    int rc = ml_frame_reader_feed(s->reader, data, len);
    const uint8_t *rec;
    size_t rlen;
    while (rc == 0 && (rc = ml_frame_reader_next(s->reader, &rec, &rlen)) == 1) {
        s_record(b, s, rec, rlen);
        if (s->state == S_CLOSED || s->serial != serial)
            return 0;
        rc = 0;
    }
    if (rc < 0) {
        char err[160], id[ML_ULID_LEN + 1];
        snprintf(err, sizeof err, "record over the %ld-byte limit", b->cfg->max_record);
        ml_wire_refuse(b, s, s_refused_id(s->reader, id), MEDLINK__V1__NACK_CODE__NACK_TOO_LARGE,
                       err);
        ml_session_close(b, s, err);
    }
    return 0;
}
