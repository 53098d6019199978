/* The broker's per-peer output: records framed into the session's buffer,
 * pushed through TLS and out as ROUTER frames; a peer whose pipe is full is
 * tried again on a short timer (blocked list). The answers the broker makes
 * to what a peer sends live here too: cumulative Accepted, Nack (with the
 * per-node log budget) and the holds that keep a sender's order after a
 * refusal for now. Lowest broker layer: it calls up only through
 * b->hooks (close_session, drained). Loop thread only. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

#include "broker_int.h"
#include "wire.h"
#include "metrics.h"
#include "ml_frame.h"
#include "ml_loglimit.h"

const char *ml_wire_who(const ml_session_t *s)
{
    return s->peer_id ? s->peer_id : "(unauthenticated)";
}

/* ------------------------------------------------------------------ */
/* Output                                                              */

void ml_wire_mark_dirty(ml_broker_t *b, ml_session_t *s)
{
    if (!s->dirty) {
        s->dirty = 1;
        s->dirty_next = b->dirty;
        b->dirty = s;
    }
}

/* Output queued for s and not yet taken by libzmq: plaintext, ciphertext
 * in the TLS write BIO and a frame libzmq refused. O(1). */
static size_t s_out_queued(const ml_session_t *s)
{
    return s->out_len + (s->tls ? ml_tls_session_pending_out(s->tls) : 0) + s->held_len;
}

/* 1 when s may be handed more deliveries: its queued output is under
 * session_output_bytes. A peer that does not read stops getting them (they
 * stay queued, in the store) until what it has drains. */
int ml_wire_room(const ml_broker_t *b, const ml_session_t *s)
{
    return s_out_queued(s) < (size_t)b->cfg->session_output_bytes;
}

/* One frame to the peer: 0, ML_EAGAIN (its pipe is at SNDHWM: not now) or
 * ML_ECLOSED (ROUTER_MANDATORY says the peer is gone). */
static int s_zsend(ml_broker_t *b, ml_session_t *s, const uint8_t *buf, size_t n)
{
    /* The routing-id part is where libzmq checks the peer's pipe; once it
     * is taken, the data part always is. */
    if (zmq_send(b->router, s->rid, s->rid_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0)
        return zmq_errno() == EAGAIN ? ML_EAGAIN : ML_ECLOSED;
    if (zmq_send(b->router, buf, n, ZMQ_DONTWAIT) < 0)
        return ML_ECLOSED;
    return 0;
}

/* Sends the session's ciphertext as frames of at most S_FRAME_MAX bytes.
 * Returns 0 (all sent), ML_EAGAIN (the peer's pipe is full: the rest stays
 * queued here, the frame libzmq refused in s->held, for s_blocked_cb to try
 * again), ML_ECLOSED (peer gone) or ML_ENOMEM. A peer's pipe is bounded in
 * frames (SNDHWM, set from session_output_bytes), what stays here in
 * bytes (ml_wire_flush), so a peer that does not read costs a bounded amount. */
int ml_wire_send_cipher(ml_broker_t *b, ml_session_t *s)
{
    uint8_t buf[S_FRAME_MAX];
    if (s->held) {
        int rc = s_zsend(b, s, s->held, s->held_len);
        if (rc != 0)
            return rc;
        free(s->held);
        s->held = NULL;
        s->held_len = 0;
    }
    while (s->tls && ml_tls_session_pending_out(s->tls) > 0) {
        size_t n = ml_tls_session_take_out(s->tls, buf, sizeof buf);
        if (n == 0)
            break;
        int rc = s_zsend(b, s, buf, n);
        if (rc == ML_EAGAIN) {
            /* The bytes are out of the BIO: keep them, in order, ahead of
             * the rest (a stream with a hole would be useless). */
            s->held = malloc(n);
            if (!s->held)
                return ML_ENOMEM;
            memcpy(s->held, buf, n);
            s->held_len = n;
        }
        if (rc != 0)
            return rc;
    }
    return 0;
}

static void s_blocked_cb(uv_timer_t *t);

/* Puts s on the list of sessions libzmq would not take more from, tried
 * again every S_BLOCKED_RETRY_MS while the list is not empty. O(1). */
static void s_block(ml_broker_t *b, ml_session_t *s)
{
    if (s->blocked)
        return;
    s->blocked = 1;
    s->blocked_next = b->blocked;
    b->blocked = s;
    if (!uv_is_active((uv_handle_t *)&b->blocked_timer))
        uv_timer_start(&b->blocked_timer, s_blocked_cb, S_BLOCKED_RETRY_MS, S_BLOCKED_RETRY_MS);
}

/* Pushes buffered plaintext through TLS and out. */
static void s_emit_accepted(ml_broker_t *b, ml_session_t *s);

void ml_wire_flush(ml_broker_t *b, ml_session_t *s)
{
    if (s->sink) {
        /* ml_session_feed_plaintext: there is no peer to send to. */
        s->n_acc = 0;
        s->out_len = 0;
        return;
    }
    if (s->state == S_CLOSED || !s->tls)
        return;
    if (s->n_acc > 0)
        s_emit_accepted(b, s);
    if (s->state == S_CLOSED)
        return;
    if (s->out_len > 0 && ml_tls_session_established(s->tls)) {
        if (ml_tls_session_write(s->tls, s->out, s->out_len) != 0) {
            b->hooks.close_session(b, s, ml_tls_session_error(s->tls));
            return;
        }
        s->out_len = 0;
    }
    int rc = ml_wire_send_cipher(b, s);
    if (rc == ML_EAGAIN) {
        /* Deliveries stop at session_output_bytes (ml_wire_room); only
         * answers to what the peer sends can go past it, so a session this
         * far past it sends and does not read. */
        size_t q = s_out_queued(s);
        size_t cap =
            (size_t)b->cfg->session_output_bytes + (size_t)b->cfg->max_record + S_REPLY_SLACK;
        if (q > cap) {
            char why[200];
            snprintf(why, sizeof why,
                     "peer is not reading: %zu bytes of output queued (session_output_bytes is "
                     "%ld)",
                     q, b->cfg->session_output_bytes);
            b->hooks.close_session(b, s, why);
            return;
        }
        s_block(b, s);
    } else if (rc == ML_ENOMEM) {
        b->hooks.close_session(b, s, "out of memory queueing output");
    } else if (rc != 0) {
        b->hooks.close_session(b, s, "peer unreachable");
    }
}

int ml_wire_append(ml_broker_t *b, ml_session_t *s, const uint8_t *rec, size_t len)
{
    if (s->state == S_CLOSED)
        return ML_ECLOSED;
    size_t need = s->out_len + ML_FRAME_HEADER + len;
    if (s->out_len > 0 && need > (size_t)b->cfg->session_buffer) {
        /* session_buffer bounds the plaintext waiting for TLS: push out what
         * is there first (then it holds one record, <= max_record). */
        ml_wire_flush(b, s);
        if (s->state == S_CLOSED)
            return ML_ECLOSED;
        need = ML_FRAME_HEADER + len;
    }
    if (need > s->out_cap) {
        size_t cap = s->out_cap ? s->out_cap : 16 * 1024;
        while (cap < need)
            cap *= 2;
        uint8_t *p = realloc(s->out, cap);
        if (!p)
            return ML_ENOMEM;
        s->out = p;
        s->out_cap = cap;
    }
    ml_frame_write_header(s->out + s->out_len, len);
    memcpy(s->out + s->out_len + ML_FRAME_HEADER, rec, len);
    s->out_len += ML_FRAME_HEADER + len;
    if (s->out_len >= S_FLUSH_THRESHOLD)
        ml_wire_flush(b, s);
    else
        ml_wire_mark_dirty(b, s);
    return 0;
}

/* Sends a control envelope from the broker to the session's peer. */
int ml_wire_reply(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env)
{
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    env->id = id;
    env->from = b->cfg->broker_id;
    env->to = s->peer_id ? s->peer_id : "";
    env->created_at = ml_now_ms();
    env->kind = ml_env_kind_of_payload(env->payload_case);
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc = ml_env_pack(env, &buf, &len);
    if (rc == 0)
        rc = ml_wire_append(b, s, buf, len);
    free(buf);
    return rc;
}

void ml_wire_nack(ml_broker_t *b, ml_session_t *s, const char *msg_id, int code, const char *reason)
{
    Medlink__V1__Nack nack = MEDLINK__V1__NACK__INIT;
    nack.message_id = (char *)(msg_id ? msg_id : "");
    nack.code = code;
    nack.reason = (char *)reason;
    ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
    env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_NACK;
    env.nack = &nack;
    ml_wire_reply(b, s, &env);
}

/* Sends one Accepted for every answer collected since the last one. */
static void s_emit_accepted(ml_broker_t *b, ml_session_t *s)
{
    size_t n = s->n_acc;
    if (n == 0 || s->state != S_READY)
        return;
    s->n_acc = 0; /* s_reply may flush, which comes back here */
    char **ids = malloc(n * sizeof *ids);
    char **dups = malloc(n * sizeof *dups);
    if (!ids || !dups) {
        /* The senders resend after their next reconnect; the store turns
         * that into duplicates. */
        free(ids);
        free(dups);
        return;
    }
    size_t nd = 0;
    for (size_t i = 0; i < n; i++) {
        ids[i] = s->acc[i].id;
        if (s->acc[i].duplicate)
            dups[nd++] = s->acc[i].id;
    }
    Medlink__V1__Accepted acc = MEDLINK__V1__ACCEPTED__INIT;
    acc.n_message_ids = n;
    acc.message_ids = ids;
    acc.n_duplicate_ids = nd;
    acc.duplicate_ids = dups;
    acc.credit_msgs = s->credit_msgs;
    acc.credit_bytes = s->credit_bytes;
    ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
    env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED;
    env.accepted = &acc;
    ml_wire_reply(b, s, &env);
    free(ids);
    free(dups);
}

void ml_wire_credit(ml_session_t *s, uint32_t msgs, uint64_t bytes)
{
    s->credit_msgs = msgs;
    s->credit_bytes = bytes;
}

/* Collects an Accepted answer; it goes out with the session's next flush
 * (end of this loop iteration), together with the others committed in the
 * same group. O(1) amortised. */
void ml_wire_accepted(ml_broker_t *b, ml_session_t *s, const char *msg_id, int dup)
{
    if (s->n_acc == s->cap_acc) {
        size_t cap = s->cap_acc ? s->cap_acc * 2 : 64;
        ml_accid_t *p = realloc(s->acc, cap * sizeof *p);
        if (!p)
            return; /* the sender resends; see s_emit_accepted */
        s->acc = p;
        s->cap_acc = cap;
    }
    snprintf(s->acc[s->n_acc].id, sizeof s->acc[0].id, "%s", msg_id);
    s->acc[s->n_acc].duplicate = dup ? 1 : 0;
    s->n_acc++;
    if (s->n_acc >= S_ACC_MAX)
        s_emit_accepted(b, s);
    else
        ml_wire_mark_dirty(b, s);
}

struct ml_hold {
    char to[256];
    char id[ML_ULID_LEN + 1];
};

/* The held message id for `to`, or NULL. O(holds), a handful at most. */
static struct ml_hold *s_hold_find(ml_session_t *s, const char *to)
{
    for (size_t i = 0; i < s->n_holds; i++)
        if (strcmp(s->holds[i].to, to) == 0)
            return &s->holds[i];
    return NULL;
}

const char *ml_wire_hold_key(const ml_envelope_t *env, char *buf, size_t len)
{
    if (!env->to)
        return "";
    if (env->payload_case != MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CHUNK)
        return env->to;
    snprintf(buf, len, "%s (chunks)", env->to);
    return buf;
}

/* Holds per session: an agent addresses a handful of nodes and services; a
 * node refused for now under ever new `to` names must not grow the session
 * without bound. Past it a key is refused without a hold (its order is then
 * the sender's to keep, as any agent does). */
#define S_HOLDS_MAX 64

void ml_wire_hold_also(ml_session_t *s, const char *to, const char *msg_id)
{
    if (msg_id && *msg_id && to && *to && s->state == S_READY && s->n_holds < S_HOLDS_MAX &&
        !s_hold_find(s, to)) {
        struct ml_hold *h = realloc(s->holds, (s->n_holds + 1) * sizeof *h);
        if (h) {
            s->holds = h;
            h = &s->holds[s->n_holds++];
            snprintf(h->to, sizeof h->to, "%s", to);
            snprintf(h->id, sizeof h->id, "%s", msg_id);
        }
    }
}

void ml_wire_refuse_for_now(ml_broker_t *b, ml_session_t *s, const char *msg_id, const char *to,
                            int code, const char *reason)
{
    ml_wire_hold_also(s, to, msg_id);
    ml_wire_refuse(b, s, msg_id, code, reason);
}

int ml_wire_held(ml_broker_t *b, ml_session_t *s, const char *to, const char *msg_id)
{
    struct ml_hold *h = to && *to ? s_hold_find(s, to) : NULL;
    if (!h || (msg_id && strcmp(msg_id, h->id) == 0))
        return 0;
    /* Not logged one by one: a busy broker would log every message behind
     * the held one. */
    char err[512];
    snprintf(err, sizeof err,
             "held: message %s to %s was refused for now and must come again first, so that "
             "order is kept; retry",
             h->id, h->to);
    b->refused_total++;
    ml_bk_metrics_refused(b, s->rx_kind, MEDLINK__V1__NACK_CODE__NACK_RATE_LIMITED);
    ml_bk_metrics_refused_reason(b, ML_BK_REFUSED_HELD);
    ml_wire_nack(b, s, msg_id, MEDLINK__V1__NACK_CODE__NACK_RATE_LIMITED, err);
    return 1;
}

void ml_wire_refuse(ml_broker_t *b, ml_session_t *s, const char *msg_id, int code,
                    const char *reason)
{
    b->refused_total++;
    ml_bk_metrics_refused(b, s->rx_kind, code);
    /* Per node (sessions before Hello share the broker's own budget): the
     * Nack always goes out, the log line only within the budget. */
    ml_loglimit_t *lim = s->ns ? &s->ns->refusals : &b->preauth_refusals;
    uint64_t dropped = 0;
    if (ml_loglimit_take(lim, ml_mono_ms(), &dropped)) {
        char more[96] = "";
        if (dropped)
            snprintf(more, sizeof more, " (%llu earlier refusal(s) of %s not logged)",
                     (unsigned long long)dropped, ml_wire_who(s));
        ml_log(ML_LOG_WARN, "router", "refused message %s from %s: %s%s", msg_id ? msg_id : "-",
               ml_wire_who(s), reason, more);
    }
    ml_wire_nack(b, s, msg_id, code, reason);
}

/* ------------------------------------------------------------------ */
/* Timers                                                              */

void ml_wire_flush_cb(uv_check_t *h)
{
    ml_broker_t *b = h->data;
    while (b->dirty) {
        ml_session_t *s = b->dirty;
        b->dirty = s->dirty_next;
        s->dirty = 0;
        s->dirty_next = NULL;
        ml_wire_flush(b, s);
    }
}

/* Tries again the sessions libzmq would not take more from; those that
 * drained get deliveries again. */
static void s_blocked_cb(uv_timer_t *t)
{
    ml_broker_t *b = t->data;
    ml_session_t *list = b->blocked;
    b->blocked = NULL;
    while (list) {
        ml_session_t *s = list;
        list = s->blocked_next;
        s->blocked = 0;
        s->blocked_next = NULL;
        if (s->state == S_CLOSED)
            continue;
        ml_wire_flush(b, s);
        if (!s->blocked)
            b->hooks.drained(b, s);
    }
    if (!b->blocked)
        uv_timer_stop(&b->blocked_timer);
}

void ml_wire_hold_release(ml_session_t *s, const char *msg_id)
{
    for (size_t i = 0; msg_id && *msg_id && i < s->n_holds;) {
        if (strcmp(s->holds[i].id, msg_id) == 0)
            s->holds[i] = s->holds[--s->n_holds];
        else
            i++;
    }
}

void ml_wire_refuse_verdict(ml_broker_t *b, ml_session_t *s, const char *msg_id, const char *to,
                            const ml_verdict_t *v)
{
    if (v->transient)
        ml_wire_refuse_for_now(b, s, msg_id, to, v->code, v->reason);
    else
        ml_wire_refuse(b, s, msg_id, v->code, v->reason);
}
