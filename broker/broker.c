/* medlinkd's core: sessions, identity, ACL, routing, delivery, admin.
 *
 * Every ZeroMQ message on the ROUTER socket is [routing id][TLS bytes]. The
 * routing id keys a session; an unknown id starts a TLS handshake. Once TLS
 * is up, the peer's identity is its certificate's CN, which must name a
 * registered node; the first record must be that node's Hello, answered by
 * Welcome. After that each record is one Envelope:
 *
 *   routed kinds (REFERRAL, ...): checked (from == identity, content valid,
 *   recipient registered, ACL allows the route), then handed to the store;
 *   the sender gets Accepted only from the store's commit callback, i.e.
 *   when the message is durable. It then joins the recipient's queue.
 *   ACK: the recipient stored a delivery; the store marks it delivered.
 *   HEARTBEAT: answered with a Heartbeat. ADMIN_REQUEST: OPS nodes only.
 *
 * Delivery: each node has an in-memory queue of index entries (queue.h) and
 * at most delivery_window messages in flight to its one delivering session
 * (the newest session whose Hello asked for deliveries). Envelopes are read
 * back from the store at delivery time. When that session ends, or an ack
 * does not come within ack_timeout_ms, in-flight messages go back to the head
 * of the queue and are sent again; recipients drop duplicates by id.
 *
 * A session that breaks the protocol is closed and kept as a tombstone
 * until it expires, so the rest of a garbage stream on the same routing id
 * is dropped quietly instead of starting handshake after handshake. */
#include "broker.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

#include "broker_int.h"
#include "cases.h"
#include "alerts.h"
#include "expiry.h"
#include "http.h"
#include "metrics.h"
#include "web.h"
#include "ml_channel.h"
#include "ml_crypt.h"
#include "ml_frame.h"
#include "ml_imaging.h"

static void s_session_close(ml_broker_t *b, ml_session_t *s, const char *reason);

static void s_cache_release(ml_broker_t *b, uint8_t **blob, uint32_t size)
{
    if (*blob) {
        free(*blob);
        *blob = NULL;
        b->cache_bytes -= size;
    }
}
void ml_bk_pump(ml_broker_t *b, ml_nodestate_t *ns);

/* ------------------------------------------------------------------ */
/* Session table                                                       */

static uint32_t s_hash(const uint8_t *p, size_t n)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 16777619u;
    }
    return h;
}

static ml_session_t *s_find(ml_broker_t *b, const uint8_t *rid, size_t len)
{
    uint32_t h = s_hash(rid, len);
    for (ml_session_t *s = b->buckets[h % S_BUCKETS]; s; s = s->hnext) {
        if (s->hash == h && s->rid_len == len && memcmp(s->rid, rid, len) == 0)
            return s;
    }
    return NULL;
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
    s->hash = s_hash(rid, len);
    s->serial = ++b->next_serial;
    s->created = s->last_rx = ml_mono_ms();
    /* A short printable tag for logs: the first bytes of the routing id. */
    for (size_t i = 0; i < len && i < 8; i++)
        snprintf(s->peer_hex + 2 * i, 3, "%02x", rid[i]);
    uint32_t bkt = s->hash % S_BUCKETS;
    s->hnext = b->buckets[bkt];
    b->buckets[bkt] = s;
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

static void s_session_free(ml_broker_t *b, ml_session_t *s)
{
    ml_session_t **pp = &b->buckets[s->hash % S_BUCKETS];
    while (*pp && *pp != s)
        pp = &(*pp)->hnext;
    if (*pp)
        *pp = s->hnext;
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

static const char *s_who(const ml_session_t *s)
{
    return s->peer_id ? s->peer_id : "(unauthenticated)";
}

/* ------------------------------------------------------------------ */
/* Output                                                              */

static void s_mark_dirty(ml_broker_t *b, ml_session_t *s)
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
static int s_out_room(const ml_broker_t *b, const ml_session_t *s)
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
 * bytes (s_flush), so a peer that does not read costs a bounded amount. */
static int s_send_cipher(ml_broker_t *b, ml_session_t *s)
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

static void s_flush(ml_broker_t *b, ml_session_t *s)
{
    if (s->sink) {
        /* ml_broker_feed_plaintext: there is no peer to send to. */
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
            s_session_close(b, s, ml_tls_session_error(s->tls));
            return;
        }
        s->out_len = 0;
    }
    int rc = s_send_cipher(b, s);
    if (rc == ML_EAGAIN) {
        /* Deliveries stop at session_output_bytes (s_out_room); only
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
            s_session_close(b, s, why);
            return;
        }
        s_block(b, s);
    } else if (rc == ML_ENOMEM) {
        s_session_close(b, s, "out of memory queueing output");
    } else if (rc != 0) {
        s_session_close(b, s, "peer unreachable");
    }
}

static int s_append(ml_broker_t *b, ml_session_t *s, const uint8_t *rec, size_t len)
{
    if (s->state == S_CLOSED)
        return ML_ECLOSED;
    size_t need = s->out_len + ML_FRAME_HEADER + len;
    if (s->out_len > 0 && need > (size_t)b->cfg->session_buffer) {
        /* session_buffer bounds the plaintext waiting for TLS: push out what
         * is there first (then it holds one record, <= max_record). */
        s_flush(b, s);
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
        s_flush(b, s);
    else
        s_mark_dirty(b, s);
    return 0;
}

/* Sends a control envelope from the broker to the session's peer. */
int ml_bk_reply(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env)
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
        rc = s_append(b, s, buf, len);
    free(buf);
    return rc;
}

static void s_send_nack(ml_broker_t *b, ml_session_t *s, const char *msg_id, int code,
                        const char *reason)
{
    Medlink__V1__Nack nack = MEDLINK__V1__NACK__INIT;
    nack.message_id = (char *)(msg_id ? msg_id : "");
    nack.code = code;
    nack.reason = (char *)reason;
    ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
    env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_NACK;
    env.nack = &nack;
    ml_bk_reply(b, s, &env);
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
    ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
    env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED;
    env.accepted = &acc;
    ml_bk_reply(b, s, &env);
    free(ids);
    free(dups);
}

/* Collects an Accepted answer; it goes out with the session's next flush
 * (end of this loop iteration), together with the others committed in the
 * same group. O(1) amortised. */
static void s_send_accepted(ml_broker_t *b, ml_session_t *s, const char *msg_id, int dup)
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
        s_mark_dirty(b, s);
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

const char *ml_bk_hold_key(const ml_envelope_t *env, char *buf, size_t len)
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

void ml_bk_hold_also(ml_session_t *s, const char *to, const char *msg_id)
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

void ml_bk_refuse_for_now(ml_broker_t *b, ml_session_t *s, const char *msg_id, const char *to,
                          int code, const char *reason)
{
    ml_bk_hold_also(s, to, msg_id);
    ml_bk_refuse(b, s, msg_id, code, reason);
}

int ml_bk_held(ml_broker_t *b, ml_session_t *s, const char *to, const char *msg_id)
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
    s_send_nack(b, s, msg_id, MEDLINK__V1__NACK_CODE__NACK_RATE_LIMITED, err);
    return 1;
}

int ml_bk_loglimit(ml_bk_loglimit_t *l, int64_t now, uint64_t *dropped)
{
    if (now - l->window_at >= ML_BK_LOG_WINDOW_MS) {
        l->window_at = now;
        l->logged = 0;
    }
    if (l->logged >= ML_BK_LOG_BURST) {
        l->dropped++;
        return 0;
    }
    l->logged++;
    *dropped = l->dropped;
    l->dropped = 0;
    return 1;
}

void ml_bk_refuse(ml_broker_t *b, ml_session_t *s, const char *msg_id, int code, const char *reason)
{
    b->refused_total++;
    ml_bk_metrics_refused(b, s->rx_kind, code);
    /* Per node (sessions before Hello share the broker's own budget): the
     * Nack always goes out, the log line only within the budget. */
    ml_bk_loglimit_t *lim = s->ns ? &s->ns->refusals : &b->preauth_refusals;
    uint64_t dropped = 0;
    if (ml_bk_loglimit(lim, ml_mono_ms(), &dropped)) {
        char more[96] = "";
        if (dropped)
            snprintf(more, sizeof more, " (%llu earlier refusal(s) of %s not logged)",
                     (unsigned long long)dropped, s_who(s));
        ml_log(ML_LOG_WARN, "router", "refused message %s from %s: %s%s", msg_id ? msg_id : "-",
               s_who(s), reason, more);
    }
    s_send_nack(b, s, msg_id, code, reason);
}

/* ------------------------------------------------------------------ */
/* Delivery                                                            */

ml_nodestate_t *ml_bk_node(ml_broker_t *b, const char *id)
{
    for (size_t i = 0; i < b->n_nodes; i++) {
        if (!b->nodes[i]->removed && strcmp(b->nodes[i]->node->id, id) == 0)
            return b->nodes[i];
    }
    return NULL;
}

/* Puts every in-flight message of ns back at the head of its queue, in the
 * original order, so the next delivering session gets them first. */
static void s_requeue_inflight(ml_nodestate_t *ns)
{
    for (size_t i = ns->if_head + ns->if_len; i > ns->if_head; i--) {
        if (!ns->inflight[i - 1].acked)
            ml_queue_push_front(&ns->queue, &ns->inflight[i - 1].item);
    }
    ns->if_head = ns->if_len = ns->n_inflight = 0;
}

/* Appends a slot for a new delivery. Returns it, or NULL out of memory. */
static ml_inflight_t *s_inflight_add(ml_nodestate_t *ns)
{
    if (ns->if_head + ns->if_len == ns->cap_inflight) {
        if (ns->if_head > 0) {
            memmove(ns->inflight, ns->inflight + ns->if_head, ns->if_len * sizeof *ns->inflight);
            ns->if_head = 0;
        } else {
            size_t cap = ns->cap_inflight ? ns->cap_inflight * 2 : 64;
            ml_inflight_t *p = realloc(ns->inflight, cap * sizeof *p);
            if (!p)
                return NULL;
            ns->inflight = p;
            ns->cap_inflight = cap;
        }
    }
    ml_inflight_t *f = &ns->inflight[ns->if_head + ns->if_len];
    ns->if_len++;
    ns->n_inflight++;
    f->acked = 0;
    return f;
}

/* The oldest unacked delivery, or NULL. */
static ml_inflight_t *s_inflight_oldest(ml_nodestate_t *ns)
{
    return ns->if_len > 0 ? &ns->inflight[ns->if_head] : NULL;
}

uint32_t ml_bk_node_index(const ml_broker_t *b, const ml_nodestate_t *ns)
{
    return ns->index;
}

/* 1 while an item's own deadline has not passed. */
static int s_expired(const ml_qitem_t *it, int64_t now)
{
    return it->deadline > 0 && it->deadline <= now;
}

void ml_bk_pump(ml_broker_t *b, ml_nodestate_t *ns)
{
    ml_session_t *s = ns->deliver;
    if (!s || s->state != S_READY)
        return;
    size_t window = (size_t)b->cfg->delivery_window;
    int64_t now = ml_now_ms();
    while (ns->n_inflight < window && s_out_room(b, s)) {
        ml_qitem_t it;
        if (!ml_queue_pop(&ns->queue, &it))
            break;
        /* Nothing is dropped silently: a message past its own deadline, or
         * one its recipient never acknowledged in max_delivery_attempts
         * tries, becomes a dead letter that ops staff can see and replay. */
        if (s_expired(&it, now)) {
            ml_bk_dead_letter(b, ns, &it, "expired: its deadline passed before it was delivered");
            continue;
        }
        if (it.attempts >= b->cfg->max_delivery_attempts) {
            char why[160];
            snprintf(why, sizeof why,
                     "undeliverable: %u delivery attempts without an acknowledgement",
                     (unsigned)it.attempts);
            ml_bk_dead_letter(b, ns, &it, why);
            continue;
        }
        uint8_t *blob = it.blob;
        size_t len = it.size;
        int rc = blob ? 0 : ml_store_fetch(b->store, it.seq, &blob, &len);
        if (rc == ML_EPROTO || rc == ML_ECONFIG) {
            /* It will never read: a dead letter (replayable once the key
             * is back in the config), not a queue stuck behind it. */
            ml_bk_dead_letter(b, ns, &it,
                              rc == ML_EPROTO
                                  ? "unreadable: its stored envelope does not authenticate "
                                    "(damaged on disk)"
                                  : "unreadable: sealed under a key that store_key / "
                                    "store_old_keys do not name");
            continue;
        }
        if (rc != 0) {
            /* The index says queued but the row cannot be read: leave it
             * queued and try again on the next pump rather than lose it. */
            ml_log(ML_LOG_ERROR, "delivery", "cannot read message %s (seq %lld) for %s: %s", it.id,
                   (long long)it.seq, ns->node->id, ml_strerror(rc));
            ml_queue_push_front(&ns->queue, &it);
            break;
        }
        ml_inflight_t *f = s_inflight_add(ns);
        if (!f) {
            if (!it.blob)
                free(blob);
            ml_queue_push_front(&ns->queue, &it);
            break;
        }
        it.attempts++;
        f->item = it;
        f->item.blob = NULL;
        f->sent_at = ml_mono_ms();
        rc = s_append(b, s, blob, len);
        if (it.blob)
            s_cache_release(b, &it.blob, it.size);
        else
            free(blob);
        if (rc != 0 || ns->deliver != s)
            break; /* the session closed under us; its close requeued */
    }
}

/* Takes the in-flight slot of msg_id out of ns's window (for an ack or a
 * refusal). Returns 1 with *out filled, or 0 when it is not in flight. */
static int s_inflight_take(ml_nodestate_t *ns, const char *msg_id, ml_qitem_t *out)
{
    for (size_t i = ns->if_head; i < ns->if_head + ns->if_len; i++) {
        ml_inflight_t *f = &ns->inflight[i];
        if (f->acked || strcmp(f->item.id, msg_id) != 0)
            continue;
        *out = f->item;
        f->acked = 1;
        ns->n_inflight--;
        while (ns->if_len > 0 && ns->inflight[ns->if_head].acked) {
            ns->if_head++;
            ns->if_len--;
        }
        if (ns->if_len == 0)
            ns->if_head = 0;
        return 1;
    }
    return 0;
}

static void s_on_ack(ml_broker_t *b, ml_session_t *s, const char *msg_id)
{
    ml_nodestate_t *ns = s->ns;
    ml_qitem_t it;
    if (!s_inflight_take(ns, msg_id, &it)) {
        /* An ack for something not in flight: a late ack after a resend. */
        ml_log(ML_LOG_DEBUG, "delivery", "ack for %s from %s not in flight (already acked)", msg_id,
               s_who(s));
        return;
    }
    ml_store_mark_delivered(b->store, it.seq);
    ns->delivered++;
    b->delivered_total++;
    ml_bk_metrics_delivered(b, it.kind);
    if (it.cs) {
        ml_bk_flow_delivered(b, ns, &it);
        ml_bk_case_release(b, it.cs);
    }
    ml_bk_pump(b, ns);
}

/* The recipient refused a delivery (a Nack naming it): it can never take
 * it, so it becomes a dead letter rather than being resent forever. */
static void s_on_refused(ml_broker_t *b, ml_session_t *s, const Medlink__V1__Nack *n)
{
    ml_nodestate_t *ns = s->ns;
    ml_qitem_t it;
    if (!n->message_id || !s_inflight_take(ns, n->message_id, &it)) {
        ml_log(ML_LOG_WARN, "delivery", "%s sent a Nack for %s, which is not in flight: %s",
               s_who(s), n->message_id ? n->message_id : "-", n->reason ? n->reason : "");
        return;
    }
    char why[512];
    snprintf(why, sizeof why, "refused by the recipient %s: %s", ns->node->id,
             n->reason && *n->reason ? n->reason : "no reason given");
    ml_bk_dead_letter(b, ns, &it, why);
    ml_bk_pump(b, ns);
}

/* ------------------------------------------------------------------ */
/* Routing                                                             */

static void s_put_unlink(ml_put_t *p)
{
    if (p->prev)
        p->prev->next = p->next;
    else
        *p->head = p->next;
    if (p->next)
        p->next->prev = p->prev;
}

static void s_put_done(void *arg, int rc, int64_t seq, int duplicate)
{
    ml_put_t *p = arg;
    ml_broker_t *b = p->b;
    ml_session_t *s = p->session;
    b->puts_pending--;
    b->puts_pending_bytes -= p->size;
    s_put_unlink(p);
    if (rc == 0) {
        if (!duplicate && p->opened[0])
            ml_log(ML_LOG_INFO, "cases", "%s", p->opened);
        if (!duplicate) {
            b->accepted_total++;
            ml_bk_metrics_accepted(b, p->kind);
            ml_qitem_t it;
            memset(&it, 0, sizeof it);
            it.seq = seq;
            it.accepted_at = ml_now_ms();
            it.deadline = p->deadline;
            it.size = p->size;
            it.priority = (uint8_t)p->priority;
            it.kind = (uint8_t)p->kind;
            it.flags = p->notice ? ML_QI_NOTICE : 0;
            memcpy(it.id, p->id, sizeof it.id);
            if (p->cs) {
                /* The queued message keeps the case in memory until its
                 * delivery has been recorded there. */
                it.cs = p->cs;
                it.cs->refs++;
            }
            ml_nodestate_t *ns = p->recipient;
            ml_session_t *ds = ns->deliver;
            /* Fast path: the recipient is connected, nothing is queued ahead
             * of this message and the window has room, so deliver from the
             * copy we hold instead of reading the row back. Same order as
             * the queue would give. */
            if (p->blob && ds && ds->state == S_READY && ml_queue_len(&ns->queue) == 0 &&
                ns->n_inflight < (size_t)b->cfg->delivery_window && s_out_room(b, ds)) {
                ml_inflight_t *f = s_inflight_add(ns);
                if (f) {
                    it.attempts = 1;
                    f->item = it;
                    f->sent_at = ml_mono_ms();
                    s_append(b, ds, p->blob, p->size);
                    goto answered;
                }
            }
            /* The queued item takes over the copy (and its accounting). */
            it.blob = p->blob;
            p->blob = NULL;
            if (ml_queue_push(&p->recipient->queue, &it) != 0) {
                ml_log(ML_LOG_ERROR, "router",
                       "out of memory queueing %s; it stays in the store "
                       "and is delivered after restart",
                       p->id);
                s_cache_release(b, &it.blob, it.size);
                if (it.cs)
                    ml_bk_case_release(b, it.cs);
            }
            ml_bk_pump(b, p->recipient);
        }
    answered:
        if (s && s->state == S_READY)
            s_send_accepted(b, s, p->id, duplicate);
    } else if (s && s->state == S_READY) {
        /* The refusal is of this put's message (the kind it counts
         * under); the session reads no record meanwhile (s_record). */
        s->rx_kind = p->kind;
        /* A message to a service is held under the node it went to too. */
        if (rc != ML_EDUP && rc != ML_EIDUSED && p->kind != MEDLINK__V1__KIND__KIND_IMAGING_CHUNK &&
            strcmp(p->to, p->recipient->node->id) != 0)
            ml_bk_hold_also(s, p->recipient->node->id, p->id);
        if (rc == ML_EFULL)
            ml_bk_refuse_for_now(
                b, s, p->id, p->to, MEDLINK__V1__NACK_CODE__NACK_STORE_FULL,
                "store full: the broker cannot accept new messages until space is freed");
        else if (rc == ML_EDENIED)
            ml_bk_refuse_for_now(b, s, p->id, p->to, MEDLINK__V1__NACK_CODE__NACK_CONFLICT,
                                 "the case changed while this message was being stored; retry");
        else if (rc == ML_EDUP)
            ml_bk_refuse(b, s, p->id, MEDLINK__V1__NACK_CODE__NACK_INVALID,
                         "case_id is already in use by another case; a new case needs a new "
                         "case_id");
        else if (rc == ML_EIDUSED)
            ml_bk_refuse(b, s, p->id, MEDLINK__V1__NACK_CODE__NACK_ID_IN_USE,
                         "message id is already used by a different message (another sender's, "
                         "or other content); a new message needs a new id");
        else
            ml_bk_refuse_for_now(b, s, p->id, p->to, MEDLINK__V1__NACK_CODE__NACK_STORE,
                                 "store error: the message was not stored, retry later");
        s->rx_kind = 0;
    } else if (p->own && rc != ML_EDUP && !p->has_ops && p->blob) {
        /* A forwarded referral, a notice: nothing else will make it again,
         * so it is kept and stored again by the flow timer. (A message
         * carrying a case change is remade from the case instead: its
         * change is read back from the store and redone.) */
        ml_log(ML_LOG_WARN, "router",
               "the broker's own message %s could not be stored yet (%s); storing it again shortly",
               p->id, ml_strerror(rc));
        p->prev = NULL;
        p->next = b->retry_own;
        b->retry_own = p;
        return;
    } else if (p->own) {
        ml_log(ML_LOG_ERROR, "router", "the broker's own message %s was not stored: %s", p->id,
               ml_strerror(rc));
    }
    if (p->cs || p->linked)
        ml_bk_flow_committed(b, p, rc, duplicate);
    s_cache_release(b, &p->blob, p->size);
    free(p);
}

int ml_bk_submit(ml_broker_t *b, const ml_bk_msg_t *m)
{
    if (m->session &&
        (b->puts_pending >= S_STORE_BACKLOG_MAX || b->puts_pending_bytes >= S_STORE_BACKLOG_BYTES))
        return ML_EAGAIN;
    ml_put_t *p = calloc(1, sizeof *p);
    if (!p)
        return ML_ENOMEM;
    ml_nodestate_t *rs = m->recipient;
    p->b = b;
    p->session = m->session;
    p->recipient = rs;
    p->priority = m->priority;
    p->kind = m->kind;
    p->deadline = m->deadline;
    p->size = (uint32_t)m->len;
    p->action = m->action;
    p->chunk_bytes = m->chunk_bytes;
    p->notice = m->notice;
    p->own = m->session == NULL;
    snprintf(p->to, sizeof p->to, "%s", m->to ? m->to : "");
    snprintf(p->opened, sizeof p->opened, "%s", m->opened ? m->opened : "");
    p->has_ops = m->n_ops > 0;
    /* Keep a copy for a connected recipient while the cache has room, and
     * always of the broker's own messages (stored again if the store
     * refuses them). */
    if ((rs->deliver && b->cache_bytes + m->len <= S_CACHE_BYTES) || !m->session) {
        p->blob = malloc(m->len ? m->len : 1);
        if (p->blob) {
            memcpy(p->blob, m->rec, m->len);
            b->cache_bytes += m->len;
        }
    }
    snprintf(p->id, sizeof p->id, "%s", m->id);
    ml_store_msg_t sm = {
        .id = m->id,
        .case_id = m->case_id,
        .sender = m->sender,
        .recipient = rs->node->id,
        .kind = m->kind,
        .priority = m->priority,
        .created_at = m->created_at,
        .deadline = m->deadline,
        .envelope = m->rec,
        .envelope_len = m->len,
        .digest = m->digest,
        .ops = m->ops,
        .n_ops = m->n_ops,
        .fresh = m->fresh,
        .stream = m->session ? m->session->serial : 0,
    };
    int rc = ml_store_put(b->store, &sm, s_put_done, p);
    if (rc != 0) {
        s_cache_release(b, &p->blob, p->size);
        free(p);
        return rc;
    }
    if (m->cs) {
        p->cs = m->cs;
        p->cs->refs++;
    }
    if (m->linked) {
        p->linked = m->linked;
        p->linked->refs++;
    }
    if (p->has_ops) {
        ml_bk_case_pending(p->cs);
        ml_bk_case_pending(p->linked);
    }
    b->puts_pending++;
    b->puts_pending_bytes += p->size;
    ml_put_t **head = m->session ? &m->session->puts : &b->orphans;
    p->head = head;
    p->next = *head;
    if (*head)
        (*head)->prev = p;
    *head = p;
    return 0;
}

void ml_bk_retry_own(ml_broker_t *b)
{
    ml_put_t *p = b->retry_own;
    b->retry_own = NULL;
    while (p) {
        ml_put_t *next = p->next;
        ml_envelope_t *env = NULL;
        if (!p->recipient->removed && ml_env_unpack(p->blob, p->size, &env) == 0) {
            ml_bk_msg_t m = {
                .recipient = p->recipient,
                .id = env->id,
                .case_id = env->case_id,
                .sender = env->from,
                .kind = p->kind,
                .priority = p->priority,
                .created_at = env->created_at,
                .deadline = p->deadline,
                .rec = p->blob,
                .len = p->size,
                .to = p->to,
                .cs = p->cs,
                .notice = p->notice,
                .fresh = 1,
            };
            if (ml_bk_submit(b, &m) != 0) {
                /* Still no room for it: the next tick tries again. */
                ml_env_free(&env);
                p->next = b->retry_own;
                b->retry_own = p;
                p = next;
                continue;
            }
        } else {
            ml_log(ML_LOG_ERROR, "router", "the broker's own message %s is given up: %s", p->id,
                   p->recipient->removed ? "its recipient was removed" : "it does not decode");
        }
        ml_env_free(&env);
        ml_bk_case_release(b, p->cs); /* the new put holds its own reference */
        ml_bk_case_release(b, p->linked);
        s_cache_release(b, &p->blob, p->size);
        free(p);
        p = next;
    }
}

int ml_bk_emit(ml_broker_t *b, ml_envelope_t *env, ml_nodestate_t *recipient, ml_case_t *cs,
               const ml_store_caseop_t *ops, size_t n_ops)
{
    char id[ML_ULID_LEN + 1];
    if (!env->id || !*env->id) {
        ml_ulid_new(id);
        env->id = id;
    }
    if (!env->from || !*env->from)
        env->from = b->cfg->broker_id;
    env->to = (char *)recipient->node->id;
    env->created_at = ml_now_ms();
    env->kind = ml_env_kind_of_payload(env->payload_case);
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc = ml_env_pack(env, &buf, &len);
    if (rc == 0) {
        ml_bk_msg_t m = {
            .recipient = recipient,
            .id = env->id,
            .case_id = env->case_id,
            .sender = env->from,
            .kind = env->kind,
            .priority = env->priority,
            .created_at = env->created_at,
            .deadline = env->deadline,
            .rec = buf,
            .len = len,
            .ops = ops,
            .n_ops = n_ops,
            .cs = cs,
            .notice = strcmp(env->from, b->cfg->broker_id) == 0,
            .fresh = 1,
        };
        rc = ml_bk_submit(b, &m);
    }
    free(buf);
    if (rc != 0)
        ml_log(ML_LOG_ERROR, "router", "cannot send %s %s to %s: %s", ml_kind_name(env->kind),
               env->id, recipient->node->id, ml_strerror(rc));
    return rc;
}

static void s_route(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env, const uint8_t *rec,
                    size_t len)
{
    char err[512];
    const char *id = env->id;
    int kind_was_set = env->kind != MEDLINK__V1__KIND__KIND_UNSPECIFIED;
    char hkey[300];
    if (env->to && ml_bk_held(b, s, ml_bk_hold_key(env, hkey, sizeof hkey), id))
        return;
    /* It came again: every hold it made is released. */
    for (size_t i = 0; id && *id && i < s->n_holds;) {
        if (strcmp(s->holds[i].id, id) == 0)
            s->holds[i] = s->holds[--s->n_holds];
        else
            i++;
    }
    if (strcmp(env->from, s->peer_id) != 0) {
        snprintf(err, sizeof err, "from '%s' differs from the authenticated node '%s'", env->from,
                 s->peer_id);
        ml_bk_refuse(b, s, id, MEDLINK__V1__NACK_CODE__NACK_IDENTITY, err);
        return;
    }
    /* node_rate: a token bucket per node (a second's worth of burst). A
     * node over it gets a transient Nack and its agent sends again later.
     * Before validation: every record a node sends counts, so that a node
     * sending invalid ones is held to its rate like any other. */
    ml_nodestate_t *ns = s->ns;
    int64_t now = ml_mono_ms();
    double rate = (double)b->cfg->node_rate;
    if (ns->rate_at == 0)
        ns->rate_tokens = rate;
    double t = ns->rate_tokens + (double)(now - ns->rate_at) * rate / 1000.0;
    ns->rate_tokens = t > rate ? rate : t;
    ns->rate_at = now;
    if (ns->rate_tokens < 1.0) {
        snprintf(err, sizeof err,
                 "rate limit: node %s may send %ld messages per second; retry later", ns->node->id,
                 b->cfg->node_rate);
        ml_bk_refuse_for_now(b, s, id, ml_bk_hold_key(env, hkey, sizeof hkey),
                             MEDLINK__V1__NACK_CODE__NACK_RATE_LIMITED, err);
        return;
    }
    ns->rate_tokens -= 1.0;
    if (ml_env_validate(env, err, sizeof err) != 0) {
        ml_bk_refuse(b, s, id, MEDLINK__V1__NACK_CODE__NACK_INVALID, err);
        return;
    }
    /* What the sender sent, before any repack: its resend has the same
     * digest (F7). Without one (no memory) the store compares senders
     * only. */
    uint8_t digest[ML_STORE_DIGEST_LEN];
    int have_digest = ml_sha256(rec, len, digest) == 0;
    /* The recipient should see the envelope with its kind: when the sender
     * left it out, flow.c packs it again. */
    ml_bk_flow_route(b, s, env, rec, len, have_digest ? digest : NULL, !kind_was_set);
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
           s_who(old), old->peer_hex, s->peer_hex,
           old->deliveries ? "one delivering session" : "a few sessions without deliveries");
    s_send_nack(b, old, NULL, MEDLINK__V1__NACK_CODE__NACK_IDENTITY, ML_SESSION_SUPERSEDED);
    s_flush(b, old);
    s_session_close(b, old, NULL);
}

static void s_hello(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env)
{
    if (env->payload_case != MEDLINK__V1__ENVELOPE__PAYLOAD_HELLO) {
        ml_bk_refuse(b, s, env->id, MEDLINK__V1__NACK_CODE__NACK_NOT_HELLO,
                     "the first message of a session must be Hello");
        s_session_close(b, s, "no Hello");
        return;
    }
    if (strcmp(env->hello->node_id, s->peer_id) != 0) {
        char err[512];
        snprintf(err, sizeof err, "Hello names node '%s' but the certificate names '%s'",
                 env->hello->node_id, s->peer_id);
        ml_bk_refuse(b, s, env->id, MEDLINK__V1__NACK_CODE__NACK_IDENTITY, err);
        s_session_close(b, s, "Hello identity mismatch");
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
    ml_envelope_t out = MEDLINK__V1__ENVELOPE__INIT;
    out.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_WELCOME;
    out.welcome = &w;
    ml_bk_reply(b, s, &out);
    if (s->deliveries)
        ml_bk_pump(b, ns);
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
        ml_bk_refuse(b, s, NULL, MEDLINK__V1__NACK_CODE__NACK_MALFORMED, err);
        if (s->state != S_READY)
            s_session_close(b, s, "malformed first record");
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
        if (now - s->hb_answered < S_HB_ANSWER_MS || !s_out_room(b, s))
            break;
        s->hb_answered = now;
        Medlink__V1__Heartbeat hb = MEDLINK__V1__HEARTBEAT__INIT;
        hb.sent_at = ml_now_ms();
        ml_envelope_t out = MEDLINK__V1__ENVELOPE__INIT;
        out.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_HEARTBEAT;
        out.heartbeat = &hb;
        ml_bk_reply(b, s, &out);
        break;
    }
    case MEDLINK__V1__ENVELOPE__PAYLOAD_ACK:
        for (size_t i = 0; i < env->ack->n_message_ids && s->state == S_READY; i++)
            s_on_ack(b, s, env->ack->message_ids[i]);
        break;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REQUEST:
        ml_bk_admin(b, s, env);
        break;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_NACK:
        s_on_refused(b, s, env->nack);
        break;
    default:
        if (ml_env_kind_is_routed(ml_env_kind_of_payload(env->payload_case))) {
            s_route(b, s, env, rec, len);
        } else {
            char err[128];
            snprintf(err, sizeof err, "unexpected message kind %s from a client",
                     ml_kind_name(ml_env_kind_of_payload(env->payload_case)));
            ml_bk_refuse(b, s, env->id, MEDLINK__V1__NACK_CODE__NACK_MALFORMED, err);
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
    s->ns = cn ? ml_bk_node(b, cn) : NULL;
    if (s->ns && b->n_auth >= (size_t)b->cfg->max_sessions && !s->ns->online) {
        /* max_sessions counts authenticated sessions; a node that has one
         * already may replace it (the newest wins), others wait. */
        char err[200];
        snprintf(err, sizeof err, "the broker is at max_sessions (%ld); retry later",
                 b->cfg->max_sessions);
        ml_log(ML_LOG_WARN, "session", "refused session %s of %s: %s", s->peer_hex, cn, err);
        b->refused_total++;
        s_send_nack(b, s, NULL, MEDLINK__V1__NACK_CODE__NACK_RATE_LIMITED, err);
        s_flush(b, s);
        s_session_close(b, s, NULL);
        return;
    }
    s->authed = 1;
    b->n_auth++;
    if (!s->ns) {
        char err[512];
        snprintf(err, sizeof err, "certificate names unregistered node '%s'", cn ? cn : "");
        ml_log(ML_LOG_WARN, "session", "refused session %s: %s", s->peer_hex, err);
        b->refused_total++;
        s_send_nack(b, s, NULL, MEDLINK__V1__NACK_CODE__NACK_UNKNOWN_NODE, err);
        s_flush(b, s);
        s_session_close(b, s, NULL);
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
            s_send_cipher(b, s);
            s_session_close(b, s, NULL);
        } else {
            s_session_close(b, s, ml_tls_session_error(s->tls));
        }
        return;
    }
    if (s->state == S_HANDSHAKE) {
        int rc = ml_tls_session_handshake(s->tls);
        if (rc < 0) {
            s_log_refused_tls(s);
            b->refused_total++;
            ml_bk_metrics_tls_failure(b, ml_tls_session_fail_kind(s->tls));
            s_send_cipher(b, s);
            s_session_close(b, s, NULL);
            return;
        }
        if (rc == 0) {
            s_mark_dirty(b, s);
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
            s_session_close(
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
            ml_bk_refuse(b, s, s_refused_id(s->reader, id), MEDLINK__V1__NACK_CODE__NACK_TOO_LARGE,
                         err);
            s_flush(b, s);
            s_session_close(b, s, err);
            return;
        }
    }
    s_mark_dirty(b, s);
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
    s_session_close(b, old, NULL);
}

static void s_router_cb(ml_zwatch_t *w, void *zsock, void *arg)
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
static void s_session_close(ml_broker_t *b, ml_session_t *s, const char *reason)
{
    if (s->state == S_CLOSED)
        return;
    if (reason)
        ml_log(s->state == S_READY ? ML_LOG_INFO : ML_LOG_WARN, "session",
               "%s session %s closed: %s", s_who(s), s->peer_hex, reason);
    if (s->tls && ml_tls_session_established(s->tls)) {
        /* Tell the peer now (what is buffered, then close_notify) rather
         * than let it find out at its heartbeat timeout. Best effort and
         * without s_flush, which would come back here on a failure. */
        if (s->out_len > 0)
            ml_tls_session_write(s->tls, s->out, s->out_len);
        ml_tls_session_close(s->tls);
        s_send_cipher(b, s);
    }
    if (s->state == S_READY) {
        ml_nodestate_t *ns = s->ns;
        ns->online--;
        if (ns->deliver == s) {
            ns->deliver = NULL;
            s_requeue_inflight(ns);
        }
    }
    /* Their commits still complete (and queue the messages); only the
     * answer to this session is no longer possible. */
    while (s->puts) {
        ml_put_t *p = s->puts;
        s->puts = p->next;
        p->session = NULL;
        p->head = &b->orphans;
        p->prev = NULL;
        p->next = b->orphans;
        if (b->orphans)
            b->orphans->prev = p;
        b->orphans = p;
    }
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

/* ------------------------------------------------------------------ */
/* Timers                                                              */

static void s_flush_cb(uv_check_t *h)
{
    ml_broker_t *b = h->data;
    while (b->dirty) {
        ml_session_t *s = b->dirty;
        b->dirty = s->dirty_next;
        s->dirty = 0;
        s->dirty_next = NULL;
        s_flush(b, s);
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
        s_flush(b, s);
        if (!s->blocked && s->state == S_READY && s->ns && s->ns->deliver == s)
            ml_bk_pump(b, s->ns);
    }
    if (!b->blocked)
        uv_timer_stop(&b->blocked_timer);
}

static void s_housekeeping_cb(uv_timer_t *t)
{
    ml_broker_t *b = t->data;
    int64_t now = ml_mono_ms();
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
                s_session_close(b, s, NULL);
            }
            break;
        case S_READY:
            if (now - s->last_rx > b->cfg->session_timeout_ms)
                s_session_close(b, s, "silent past session_timeout_ms");
            break;
        case S_CLOSED:
            if (now >= s->expire_at)
                s_session_free(b, s);
            break;
        }
    }
    for (size_t i = 0; i < b->n_nodes; i++) {
        ml_nodestate_t *ns = b->nodes[i];
        ml_inflight_t *oldest = s_inflight_oldest(ns);
        if (oldest && now - oldest->sent_at > b->cfg->ack_timeout_ms) {
            ml_log(ML_LOG_WARN, "delivery",
                   "%s: no ack within %ld ms for %zu message(s); "
                   "resending",
                   ns->node->id, b->cfg->ack_timeout_ms, ns->n_inflight);
            s_requeue_inflight(ns);
            ml_bk_pump(b, ns);
        }
    }
    ml_bk_expiry_tick(b);
    ml_bk_web_tick(b);
    ml_bk_alerts_tick(b);
}

/* ------------------------------------------------------------------ */
/* Lifecycle                                                           */

static void s_load_pending(void *arg, const ml_store_row_t *row)
{
    ml_broker_t *b = arg;
    ml_nodestate_t *ns = ml_bk_node(b, row->recipient);
    if (!ns) {
        /* Nothing is dropped silently: the message becomes a dead letter
         * that ops staff see with `medlinkctl dlq list` and can replay once
         * the node is registered again. */
        char why[400];
        snprintf(why, sizeof why, "undeliverable: recipient %s is no longer in the node registry",
                 row->recipient);
        ml_log(ML_LOG_WARN, "store", "queued message %s is a dead letter: %s", row->id, why);
        ml_store_mark_dead(b->store, row->seq, why, row->attempts);
        ml_bk_metrics_dead_letter(b);
        return;
    }
    ml_qitem_t it;
    memset(&it, 0, sizeof it);
    it.seq = row->seq;
    it.accepted_at = row->accepted_at;
    it.deadline = row->deadline;
    it.size = (uint32_t)row->envelope_len;
    it.priority = (uint8_t)row->priority;
    it.kind = (uint8_t)row->kind;
    it.flags = row->sender && strcmp(row->sender, b->cfg->broker_id) == 0 ? ML_QI_NOTICE : 0;
    snprintf(it.id, sizeof it.id, "%s", row->id);
    it.cs = ml_bk_case_for_row(b, row->case_id, row->kind);
    if (ml_queue_push(&ns->queue, &it) != 0 && it.cs)
        ml_bk_case_release(b, it.cs);
}

/* The store's retention from the configuration: the *_seconds keys,
 * when set, win over the days (tests and benchmarks). */
/* The store's retention from the configuration. */
static void s_retention_opts(const ml_broker_config_t *cfg, ml_store_opts_t *so)
{
    ml_broker_config_retention(cfg, &so->retention_ms, &so->timeline_ms);
    so->prune_interval_ms = cfg->retention_interval_s * 1000L;
    so->prune_batch = (int)cfg->retention_batch;
}

int ml_broker_new(uv_loop_t *loop, ml_broker_config_t **cfg_p, ml_broker_t **out, char *err,
                  size_t errlen)
{
    int rc = ML_ENOMEM;
    ml_broker_t *b = calloc(1, sizeof *b);
    if (!b) {
        snprintf(err, errlen, "out of memory");
        return ML_ENOMEM;
    }
    b->loop = loop;
    b->cfg = *cfg_p;
    *cfg_p = NULL;
    b->started_at = ml_now_ms();
    b->rxbuf = malloc(64 * 1024);
    b->nodes = calloc(b->cfg->n_nodes ? b->cfg->n_nodes : 1, sizeof *b->nodes);
    if (!b->rxbuf || !b->nodes) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < b->cfg->n_nodes; i++) {
        ml_nodestate_t *ns = calloc(1, sizeof *ns);
        if (!ns) {
            snprintf(err, errlen, "out of memory");
            goto fail;
        }
        ns->node = &b->cfg->nodes[i];
        ns->index = (uint32_t)i;
        ml_queue_init(&ns->queue);
        b->nodes[b->n_nodes++] = ns;
    }
    ml_casetab_init(&b->cases);

    ml_tls_config_t tc = {.ca_file = b->cfg->ca,
                          .cert_file = b->cfg->cert,
                          .key_file = b->cfg->key,
                          .crl_file = b->cfg->crl,
                          .is_server = 1};
    rc = ml_tls_ctx_new(&tc, &b->tls, err, errlen);
    if (rc != 0)
        goto fail;

    char path[4096];
    if (ml_mkdirs(b->cfg->data_dir) != 0) {
        snprintf(err, errlen, "cannot create data_dir %s: %s", b->cfg->data_dir, strerror(errno));
        rc = ML_EIO;
        goto fail;
    }
    snprintf(path, sizeof path, "%s/broker.db", b->cfg->data_dir);
    if (b->cfg->store_key) {
        rc = ml_keyring_load(b->cfg->store_key, (const char *const *)b->cfg->store_old_keys,
                             b->cfg->n_store_old_keys, &b->keys, err, errlen);
        if (rc != 0)
            goto fail;
        ml_log(ML_LOG_INFO, "store", "payloads are sealed with AES-256-GCM under key %s (%s)",
               ml_keyring_current_id(b->keys), b->cfg->store_key);
    } else {
        ml_log(ML_LOG_WARN, "store",
               "no store_key: message payloads are stored in clear in %s/broker.db",
               b->cfg->data_dir);
    }
    ml_store_opts_t so = {.max_bytes = b->cfg->max_store_bytes, .keys = b->keys};
    s_retention_opts(b->cfg, &so);
    rc = ml_store_open(loop, path, &so, &b->store, err, errlen);
    if (rc != 0)
        goto fail;
    /* Before the store's contents are read: the metrics count from them. */
    if ((rc = ml_bk_metrics_init(b)) != 0) {
        snprintf(err, errlen, "cannot read the store's counts from %s", path);
        goto fail;
    }
    if ((rc = ml_bk_flow_load(b)) != 0) {
        snprintf(err, errlen, "cannot read the open cases from %s", path);
        goto fail;
    }
    rc = ml_store_scan_pending(b->store, s_load_pending, b);
    if (rc != 0) {
        snprintf(err, errlen, "cannot read pending messages from %s", path);
        goto fail;
    }
    size_t queued = 0;
    for (size_t i = 0; i < b->n_nodes; i++)
        queued += ml_queue_len(&b->nodes[i]->queue);

    rc = ML_EIO;
    b->zctx = zmq_ctx_new();
    b->router = b->zctx ? zmq_socket(b->zctx, ZMQ_ROUTER) : NULL;
    if (!b->router) {
        snprintf(err, errlen, "cannot create ZeroMQ socket: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    int one = 1, zero = 0, linger = 0;
    int64_t maxmsg = S_FRAME_MAX * 4;
    zmq_setsockopt(b->router, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    /* Per-peer outbound queue, in frames of at most S_FRAME_MAX bytes:
     * session_output_bytes' worth. A peer that reads less than we send
     * fills it; the rest then waits in its session, where it is counted in
     * bytes (s_flush, s_out_room), so a peer that never reads costs about
     * twice session_output_bytes plus a record, not a delivery window of
     * maximum-size records. */
    long hwm = b->cfg->session_output_bytes / S_FRAME_MAX;
    int sndhwm = (int)(hwm < 16 ? 16 : hwm);
    zmq_setsockopt(b->router, ZMQ_SNDHWM, &sndhwm, sizeof sndhwm);
    zmq_setsockopt(b->router, ZMQ_RCVHWM, &zero, sizeof zero);
    zmq_setsockopt(b->router, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(b->router, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    if (zmq_bind(b->router, b->cfg->listen) != 0) {
        snprintf(err, errlen, "cannot listen on %s: %s", b->cfg->listen, zmq_strerror(zmq_errno()));
        goto fail;
    }
    size_t eplen = sizeof b->endpoint;
    zmq_getsockopt(b->router, ZMQ_LAST_ENDPOINT, b->endpoint, &eplen);
    if (ml_zwatch_new(loop, b->router, s_router_cb, b, &b->watch) != 0) {
        snprintf(err, errlen, "cannot watch the ZeroMQ socket");
        goto fail;
    }
    uv_timer_init(loop, &b->housekeeping);
    uv_check_init(loop, &b->flush_check);
    uv_timer_init(loop, &b->flow_timer);
    uv_timer_init(loop, &b->blocked_timer);
    b->housekeeping.data = b->flush_check.data = b->flow_timer.data = b->blocked_timer.data = b;
    b->open_handles = 4;
    uv_timer_start(&b->housekeeping, s_housekeeping_cb, 250, 250);
    uv_check_start(&b->flush_check, s_flush_cb);
    ml_bk_flow_start(b);
    if (ml_bk_web_init(b) != 0 || ml_bk_alerts_init(b) != 0) {
        rc = ML_ENOMEM;
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    if ((rc = ml_bk_http_start(b, err, errlen)) != 0)
        goto fail;
    ml_log(ML_LOG_INFO, "broker",
           "%s listening on %s; %zu nodes registered; %zu message(s) "
           "queued and %llu case(s) open in the store (%zu in memory)",
           b->cfg->broker_id, b->endpoint, b->n_nodes, queued, (unsigned long long)b->open_total,
           b->cases.count);
    ml_bk_expiry_log(b, "at start");
    *out = b;
    return 0;
fail : {
    ml_broker_t *tmp = b;
    ml_broker_destroy(&tmp);
}
    return rc;
}

/* ------------------------------------------------------------------ */
/* Reload (SIGHUP)                                                     */

/* A removed node keeps its own copy of its registry entry. */
static void s_node_own_free(ml_nodestate_t *ns)
{
    free(ns->own.id);
    free(ns->own.community);
    free(ns->own.display_name);
    for (size_t i = 0; i < ns->own.n_services; i++)
        free(ns->own.services[i]);
    free(ns->own.services);
    memset(&ns->own, 0, sizeof ns->own);
}

static int s_node_own_copy(ml_nodestate_t *ns, const ml_node_t *n)
{
    ml_node_t c = {.role = n->role};
    c.id = strdup(n->id);
    c.community = n->community ? strdup(n->community) : NULL;
    c.display_name = n->display_name ? strdup(n->display_name) : NULL;
    if (!c.id || (n->community && !c.community) || (n->display_name && !c.display_name)) {
        free(c.id);
        free(c.community);
        free(c.display_name);
        return ML_ENOMEM;
    }
    s_node_own_free(ns);
    ns->own = c; /* services are not kept: a removed node serves nothing */
    ns->node = &ns->own;
    return 0;
}

/* The item of a removed node's queue: every one becomes a dead letter. */
static int s_keep_none(const ml_qitem_t *it, void *arg)
{
    return 0;
}

typedef struct {
    ml_broker_t *b;
    ml_nodestate_t *ns;
} s_gone_t;

static void s_gone_cb(ml_qitem_t *it, void *arg)
{
    s_gone_t *g = arg;
    char why[400];
    snprintf(why, sizeof why, "undeliverable: recipient %s was removed from the node registry",
             g->ns->node->id);
    ml_bk_dead_letter(g->b, g->ns, it, why);
}

/* Why a reload may not change a key at runtime: it is used only at start-up. */
static void s_keep_startup_key(const char *key, char **now, char **loaded)
{
    const char *a = *now ? *now : "", *b = *loaded ? *loaded : "";
    if (strcmp(a, b) != 0)
        ml_log(ML_LOG_WARN, "broker", "reload: [broker] %s changed; it applies after a restart",
               key);
    char *tmp = *loaded;
    *loaded = *now;
    *now = tmp;
}

int ml_broker_reload(ml_broker_t *b, char *err, size_t errlen)
{
    ml_broker_config_t *nc = NULL;
    int rc = ml_broker_config_load(b->cfg->path, &nc, err, errlen);
    if (rc != 0) {
        ml_log(ML_LOG_ERROR, "broker", "reload refused, the running configuration stays: %s", err);
        return rc;
    }
    /* Keys used only at start-up keep their running values (so b->cfg
     * always describes what runs). */
    s_keep_startup_key("id", &b->cfg->broker_id, &nc->broker_id);
    s_keep_startup_key("listen", &b->cfg->listen, &nc->listen);
    s_keep_startup_key("data_dir", &b->cfg->data_dir, &nc->data_dir);
    s_keep_startup_key("ca", &b->cfg->ca, &nc->ca);
    s_keep_startup_key("cert", &b->cfg->cert, &nc->cert);
    s_keep_startup_key("key", &b->cfg->key, &nc->key);
    s_keep_startup_key("store_key", &b->cfg->store_key, &nc->store_key);
    if (nc->max_store_bytes != b->cfg->max_store_bytes)
        ml_log(ML_LOG_WARN, "broker",
               "reload: [broker] max_store_bytes changed; it applies after a restart");
    nc->max_store_bytes = b->cfg->max_store_bytes;
    {
        ml_store_opts_t was = {0}, now = {0};
        s_retention_opts(b->cfg, &was);
        s_retention_opts(nc, &now);
        if (was.retention_ms != now.retention_ms || was.timeline_ms != now.timeline_ms ||
            was.prune_interval_ms != now.prune_interval_ms || was.prune_batch != now.prune_batch)
            ml_log(ML_LOG_WARN, "broker",
                   "reload: [broker] retention keys changed; they apply after a restart");
    }
    nc->retention_days = b->cfg->retention_days;
    nc->timeline_retention_days = b->cfg->timeline_retention_days;
    nc->retention_seconds = b->cfg->retention_seconds;
    nc->timeline_retention_seconds = b->cfg->timeline_retention_seconds;
    nc->retention_interval_s = b->cfg->retention_interval_s;
    nc->retention_batch = b->cfg->retention_batch;

    /* The CRL first: if it cannot be loaded nothing changes. */
    if (nc->crl || b->cfg->crl) {
        rc = ml_tls_ctx_reload_crl(b->tls, nc->crl, err, errlen);
        if (rc != 0) {
            ml_log(ML_LOG_ERROR, "broker", "reload refused, the running configuration stays: %s",
                   err);
            ml_broker_config_destroy(&nc);
            return rc;
        }
    }

    /* Nodes: known ones take their new entry, new ones are appended, and
     * the ones no longer listed are marked removed (indexes never move). */
    size_t cap = b->n_nodes + nc->n_nodes;
    ml_nodestate_t **grown = realloc(b->nodes, (cap ? cap : 1) * sizeof *grown);
    if (!grown) {
        ml_seterr(err, errlen, "out of memory");
        ml_broker_config_destroy(&nc);
        return ML_ENOMEM;
    }
    b->nodes = grown;
    char *seen = calloc(b->n_nodes + 1, 1);
    if (!seen) {
        ml_seterr(err, errlen, "out of memory");
        ml_broker_config_destroy(&nc);
        return ML_ENOMEM;
    }
    size_t added = 0, removed = 0, old_n = b->n_nodes;
    for (size_t i = 0; i < nc->n_nodes; i++) {
        ml_nodestate_t *ns = NULL;
        for (size_t j = 0; j < old_n && !ns; j++)
            if (strcmp(b->nodes[j]->node->id, nc->nodes[i].id) == 0)
                ns = b->nodes[j];
        if (ns) {
            seen[ns->index] = 1;
            ns->node = &nc->nodes[i];
            if (ns->removed) {
                ns->removed = 0;
                added++;
            }
            s_node_own_free(ns);
            continue;
        }
        ns = calloc(1, sizeof *ns);
        if (!ns) {
            ml_log(ML_LOG_ERROR, "broker", "reload: out of memory adding node %s", nc->nodes[i].id);
            continue;
        }
        ns->node = &nc->nodes[i];
        ns->index = (uint32_t)b->n_nodes;
        ml_queue_init(&ns->queue);
        b->nodes[b->n_nodes++] = ns;
        added++;
    }
    for (size_t j = 0; j < old_n; j++) {
        ml_nodestate_t *ns = b->nodes[j];
        if (seen[j] || ns->removed)
            continue;
        if (s_node_own_copy(ns, ns->node) != 0) {
            /* Without a copy the entry would dangle; keep the node. */
            ml_log(ML_LOG_ERROR, "broker", "reload: out of memory removing node %s", ns->node->id);
            continue;
        }
        ns->removed = 1;
        removed++;
    }
    free(seen);

    /* Cases keep their service name; the new configuration owns it now. */
    ml_bk_flow_reload(b, nc);
    ml_broker_config_t *old = b->cfg;
    b->cfg = nc;
    ml_broker_config_destroy(&old);

    /* Sessions of removed nodes, and of nodes whose certificate the new CRL
     * revokes, end now; their next handshake is refused. */
    size_t closed = 0;
    for (ml_session_t *x = b->sessions; x; x = x->next) {
        if (x->state == S_CLOSED || x->sink)
            continue;
        char why[512];
        if (x->ns && x->ns->removed) {
            snprintf(why, sizeof why, "node %s was removed from the registry (reload)",
                     x->ns->node->id);
        } else if (x->tls && ml_tls_session_established(x->tls) &&
                   ml_tls_session_recheck(x->tls, b->tls, why, sizeof why) != 0) {
            /* why says so, e.g. "... no longer verifies: certificate revoked" */
        } else {
            continue;
        }
        ml_log(ML_LOG_WARN, "session", "closing %s session %s: %s", s_who(x), x->peer_hex, why);
        ml_bk_refuse(b, x, NULL, MEDLINK__V1__NACK_CODE__NACK_IDENTITY, why);
        s_flush(b, x);
        s_session_close(b, x, NULL);
        closed++;
    }
    /* Messages queued for removed nodes can never go: dead letters. */
    for (size_t j = 0; j < b->n_nodes; j++) {
        ml_nodestate_t *ns = b->nodes[j];
        if (!ns->removed || ml_queue_len(&ns->queue) == 0)
            continue;
        s_gone_t g = {b, ns};
        ml_queue_filter(&ns->queue, s_keep_none, s_gone_cb, &g);
    }
    uv_timer_set_repeat(&b->flow_timer, (uint64_t)b->cfg->timer_ms);
    ml_log(ML_LOG_INFO, "broker",
           "reloaded %s: %zu node(s) registered (%zu added, %zu removed), CRL %s, %zu "
           "session(s) closed",
           b->cfg->path, b->cfg->n_nodes, added, removed, b->cfg->crl ? b->cfg->crl : "none",
           closed);
    ml_bk_expiry_log(b, "after reload");
    /* What the alerts watch may have changed (nodes, the CRL, limits):
     * judged now, so that a status right after the reload is current. */
    ml_bk_alerts_recheck(b);
    return 0;
}

static void s_close_cb(uv_handle_t *h)
{
    ml_broker_t *b = h->data;
    if (--b->open_handles == 0)
        free(b);
}

void ml_broker_destroy(ml_broker_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    ml_broker_t *b = *self_p;
    *self_p = NULL;
    /* Ops' view first: nothing of it may run on a broker being torn down. */
    ml_bk_http_stop(b);
    ml_bk_alerts_free(b);
    ml_bk_web_free(b);
    ml_bk_metrics_free(b);
    /* Say goodbye to live sessions, then drop everything. */
    for (ml_session_t *s = b->sessions; s; s = s->next) {
        if (s->state != S_CLOSED && s->tls && ml_tls_session_established(s->tls)) {
            s_flush(b, s);
            if (s->tls) {
                ml_tls_session_close(s->tls);
                s_send_cipher(b, s);
            }
        }
    }
    /* A session whose peer's pipe was full still holds its last output and
     * close_notify: libzmq takes more as the peer reads, so try again for a
     * bounded time (a peer that does not read does not hold us longer). */
    int64_t until = ml_mono_ms() + S_SHUTDOWN_LINGER_MS;
    for (;;) {
        size_t left = 0;
        for (ml_session_t *s = b->sessions; s; s = s->next) {
            if (s->state == S_CLOSED || !s->tls || s->sink ||
                (!s->held && ml_tls_session_pending_out(s->tls) == 0))
                continue;
            if (s_send_cipher(b, s) == ML_EAGAIN)
                left++;
        }
        if (left == 0 || ml_mono_ms() >= until)
            break;
        uv_sleep(2);
    }
    while (b->sessions) {
        ml_session_t *s = b->sessions;
        s_session_close(b, s, NULL);
        s_session_free(b, s);
    }
    ml_zwatch_destroy(&b->watch);
    if (b->router) {
        /* The close_notify frames queued above are still in libzmq's
         * pipes: with a linger of 0 zmq_close would drop them (a few
         * sessions in every shutdown lost theirs). Give libzmq a bounded
         * time to write them; a peer that is not reading does not hold the
         * shutdown longer than that. */
        int linger = S_SHUTDOWN_LINGER_MS;
        zmq_setsockopt(b->router, ZMQ_LINGER, &linger, sizeof linger);
        zmq_close(b->router);
    }
    if (b->zctx)
        zmq_ctx_term(b->zctx);
    /* Commits whatever is still queued for the store (those callbacks are
     * not called: the senders get no Accepted and will resend, which the
     * unique id turns into a duplicate). */
    ml_store_close(&b->store);
    ml_bk_flow_free_changes(b);
    ml_bk_admin_free(b);
    while (b->orphans) {
        ml_put_t *p = b->orphans;
        b->orphans = p->next;
        free(p->blob);
        free(p);
    }
    while (b->retry_own) {
        ml_put_t *p = b->retry_own;
        b->retry_own = p->next;
        free(p->blob);
        free(p);
    }
    /* Queues and windows point into the case table: they go first. */
    ml_tls_ctx_destroy(&b->tls);
    ml_keyring_destroy(&b->keys);
    for (size_t i = 0; b->nodes && i < b->n_nodes; i++) {
        ml_queue_close(&b->nodes[i]->queue);
        free(b->nodes[i]->inflight);
        s_node_own_free(b->nodes[i]);
        free(b->nodes[i]);
    }
    ml_casetab_close(&b->cases);
    for (size_t i = 0; i < b->n_services_gone; i++)
        free(b->services_gone[i]);
    free(b->services_gone);
    free(b->nodes);
    free(b->rxbuf);
    ml_broker_config_destroy(&b->cfg);
    if (b->open_handles) {
        uv_timer_stop(&b->housekeeping);
        uv_check_stop(&b->flush_check);
        uv_timer_stop(&b->flow_timer);
        uv_timer_stop(&b->blocked_timer);
        uv_close((uv_handle_t *)&b->housekeeping, s_close_cb);
        uv_close((uv_handle_t *)&b->flush_check, s_close_cb);
        uv_close((uv_handle_t *)&b->flow_timer, s_close_cb);
        uv_close((uv_handle_t *)&b->blocked_timer, s_close_cb);
    } else {
        free(b);
    }
}

const char *ml_broker_endpoint(const ml_broker_t *b)
{
    return b->endpoint;
}

int ml_broker_feed_plaintext(ml_broker_t *b, const char *node_id, const uint8_t *data, size_t len)
{
    char rid[S_RID_MAX];
    int n = snprintf(rid, sizeof rid, "plaintext:%s", node_id ? node_id : "");
    if (n < 0 || (size_t)n >= sizeof rid)
        return ML_EINVAL;
    ml_nodestate_t *ns = node_id ? ml_bk_node(b, node_id) : NULL;
    if (!ns)
        return ML_ENOTFOUND;
    ml_session_t *s = s_find(b, (const uint8_t *)rid, (size_t)n);
    if (s && s->state == S_CLOSED) {
        s_session_free(b, s);
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
            s_session_close(b, s, NULL);
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
        ml_bk_refuse(b, s, s_refused_id(s->reader, id), MEDLINK__V1__NACK_CODE__NACK_TOO_LARGE,
                     err);
        s_session_close(b, s, err);
    }
    return 0;
}
