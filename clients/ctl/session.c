/* medlinkctl's exchange with the broker (see session.h). Everything runs
 * on one libuv loop: the channel's callbacks move the exchange on, two
 * timers bound it (progress: --timeout without an answer; retry: resend
 * after back-pressure or a transient Nack), and s_finish ends it by
 * closing the timers and the channel so that uv_run returns. */
#include "session.h"

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>
#include <zmq.h>

#include "ml_channel.h"
#include "ml_common.h"
#include "ml_nack.h"

#ifndef ML_VERSION
#define ML_VERSION "0.1.0"
#endif

/* Back-off after ML_EFULL from the channel (its buffer is draining). */
#define S_FULL_RETRY_MS 20
/* Back-off after a transient Nack: 500 ms, doubling, at most 8 s. */
#define S_NACK_RETRY_MS 500
#define S_NACK_RETRY_MAX_MS 8000

/* A message sent (or to be sent) and not yet Accepted. */
typedef struct {
    char id[ML_ULID_LEN + 1];
    uint64_t seq; /* 0-based, in the source's order */
    uint8_t *buf; /* the serialised envelope, resent as is */
    size_t len;
    int sent;           /* sent on the current connection */
    int attempts;       /* transient Nacks so far */
    int64_t not_before; /* mono ms: not resent before (after a transient Nack) */
} s_item_t;

typedef struct {
    const ctl_opts_t *o;
    ctl_result_t *res;
    uv_loop_t loop;
    void *zctx;
    ml_channel_t *ch;
    uv_timer_t progress;
    uv_timer_t retry;
    int64_t retry_due; /* mono ms the retry timer fires at, 0 if idle */
    int done;
    int rc;
    /* admin */
    const Medlink__V1__AdminRequest *req;
    char req_id[ML_ULID_LEN + 1];
    ml_envelope_t *reply;
    /* stream */
    const ctl_source_t *src;
    s_item_t *items; /* in send order */
    size_t n_items, cap_items;
    size_t bytes; /* of items */
    uint64_t seq;
    int src_done;
    char transient[1100]; /* the last transient refusal, for the timeout message */
    /* a connection kept for many requests (ctl_conn_*) */
    int persist;
    int64_t req_timeout_ms;
    int pending;                  /* a request is out and unanswered */
    int was_up;                   /* the channel has been up once */
    int event;                    /* a key or a signal stopped the loop */
    int key_ready;                /* watch_fd became readable */
    int signo;                    /* the last signal caught */
    int waited;                   /* ctl_conn_wait's time passed */
    int fatal;                    /* on_fatal came: retrying will not help (why says why) */
    Medlink__V1__AdminRequest rq; /* the request in flight (its strings: the caller's) */
    uv_timer_t wait;
    uv_poll_t kbd;
    int kbd_on;
    uv_signal_t sig[5];
    int n_sig;
    char why[1200]; /* why the last request failed (nothing is printed) */
} s_sess_t;

/* The reason for a failure: on stderr for a one-shot exchange; kept in
 * ss->why for a kept connection, whose caller owns the terminal. */
__attribute__((format(printf, 3, 4))) static void s_say(s_sess_t *ss, int code, const char *fmt,
                                                        ...)
{
    char msg[1200];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (ss->persist)
        snprintf(ss->why, sizeof ss->why, "%s", msg);
    else
        ctl_fail(code, "%s", msg);
}

static void s_finish(s_sess_t *ss, int rc)
{
    /* A kept connection stays: only the request ends, and uv_run returns
     * to ctl_conn_admin. */
    if (ss->persist) {
        ss->pending = 0;
        ss->rc = rc;
        uv_timer_stop(&ss->progress);
        uv_stop(&ss->loop);
        return;
    }
    if (ss->done)
        return;
    ss->done = 1;
    ss->rc = rc;
    uv_timer_stop(&ss->progress);
    uv_timer_stop(&ss->retry);
    uv_close((uv_handle_t *)&ss->progress, NULL);
    uv_close((uv_handle_t *)&ss->retry, NULL);
    ml_channel_destroy(&ss->ch);
}

static void s_refused(s_sess_t *ss, const Medlink__V1__Nack *n)
{
    snprintf(ss->res->nack_id, sizeof ss->res->nack_id, "%s", n->message_id ? n->message_id : "");
    ss->res->nack_code = (int)n->code;
    snprintf(ss->res->nack_reason, sizeof ss->res->nack_reason, "%s", n->reason ? n->reason : "");
    s_finish(ss, ML_EDENIED);
}

static void s_retry_cb(uv_timer_t *t);

/* Makes the retry timer fire within delay_ms (an earlier due time wins). */
static void s_arm_retry(s_sess_t *ss, int64_t delay_ms)
{
    int64_t due = ml_mono_ms() + delay_ms;
    if (ss->retry_due && ss->retry_due <= due)
        return;
    ss->retry_due = due;
    uv_timer_start(&ss->retry, s_retry_cb, (uint64_t)(delay_ms > 0 ? delay_ms : 0), 0);
}

/* Sends one item. Returns 1 sent, 0 not now (buffer full: retry armed;
 * or the channel is down: on_state resends), -1 after finishing. */
static int s_send_item(s_sess_t *ss, s_item_t *it)
{
    int rc = ml_channel_send_raw(ss->ch, it->buf, it->len);
    if (rc == ML_EFULL) {
        s_arm_retry(ss, S_FULL_RETRY_MS);
        return 0;
    }
    if (rc == ML_ECLOSED)
        return 0;
    if (rc < 0) {
        ctl_fail(CTL_EXIT_FAIL, "cannot send message %s (%zu bytes): %s", it->id, it->len,
                 ml_strerror(rc));
        s_finish(ss, rc);
        return -1;
    }
    it->sent = 1;
    return 1;
}

/* Moves the stream on: resends what is due, then takes new messages from
 * the source while the window is open. O(unanswered) per call. */
static void s_pump(s_sess_t *ss)
{
    if (ss->done || !ml_channel_is_up(ss->ch))
        return;
    int64_t now = ml_mono_ms(), next = 0;
    for (size_t i = 0; i < ss->n_items; i++) {
        s_item_t *it = &ss->items[i];
        if (it->sent)
            continue;
        if (it->not_before > now) {
            if (!next || it->not_before < next)
                next = it->not_before;
            continue;
        }
        if (s_send_item(ss, it) <= 0)
            return;
    }
    while (!ss->src_done) {
        if (ss->src->first_alone && ss->seq == 1 && ss->n_items > 0)
            break;
        if (ss->n_items >= CTL_WINDOW_MESSAGES ||
            (ss->n_items > 0 && ss->bytes >= CTL_WINDOW_BYTES))
            break;
        ml_envelope_t *env = NULL;
        int rc = ss->src->next(ss->src->arg, &env);
        if (rc == 0) {
            ss->src_done = 1;
            break;
        }
        if (rc < 0) {
            s_finish(ss, ML_EIO);
            return;
        }
        if (ss->n_items == ss->cap_items) {
            size_t cap = ss->cap_items ? ss->cap_items * 2 : 64;
            s_item_t *v = realloc(ss->items, cap * sizeof *v);
            if (!v)
                ctl_oom();
            ss->items = v;
            ss->cap_items = cap;
        }
        s_item_t *it = &ss->items[ss->n_items];
        memset(it, 0, sizeof *it);
        if (ml_env_pack(env, &it->buf, &it->len) < 0)
            ctl_oom();
        snprintf(it->id, sizeof it->id, "%s", env->id);
        it->seq = ss->seq++;
        ss->n_items++;
        ss->bytes += it->len;
        ss->res->sent++;
        if (s_send_item(ss, it) <= 0)
            return;
    }
    if (next)
        s_arm_retry(ss, next - now);
    if (ss->src_done && ss->n_items == 0)
        s_finish(ss, 0);
}

static void s_retry_cb(uv_timer_t *t)
{
    s_sess_t *ss = t->data;
    ss->retry_due = 0;
    s_pump(ss);
}

static void s_send_admin(s_sess_t *ss)
{
    const Medlink__V1__Welcome *w = ml_channel_welcome(ss->ch);
    ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
    env.id = ss->req_id;
    env.from = ss->o->node;
    env.to = w && w->broker ? w->broker : "";
    env.kind = MEDLINK__V1__KIND__KIND_ADMIN_REQUEST;
    env.created_at = ml_now_ms();
    env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REQUEST;
    env.admin_request = (Medlink__V1__AdminRequest *)ss->req;
    int rc = ml_channel_send(ss->ch, &env);
    if (rc < 0 && rc != ML_ECLOSED) {
        s_say(ss, CTL_EXIT_FAIL, "cannot send the request: %s", ml_strerror(rc));
        s_finish(ss, rc);
    }
}

static void s_on_state(ml_channel_t *ch, int up, const char *reason, void *arg)
{
    s_sess_t *ss = arg;
    if (ss->done)
        return;
    if (!up) {
        if (ss->o->verbose)
            ml_log(ML_LOG_INFO, "ctl", "connection lost (%s); retrying", reason ? reason : "?");
        /* Everything unanswered goes again on the next session. */
        for (size_t i = 0; i < ss->n_items; i++)
            ss->items[i].sent = 0;
        /* A kept connection's caller is told at once (it shows that the
         * broker went away); the channel reconnects meanwhile. */
        if (ss->persist && ss->pending) {
            s_say(ss, CTL_EXIT_FAIL, "connection to %s lost: %s", ss->o->broker,
                  reason ? reason : "?");
            s_finish(ss, ML_ECLOSED);
        }
        return;
    }
    ss->was_up = 1;
    if (ss->req) {
        if (!ss->persist || ss->pending)
            s_send_admin(ss);
        return;
    }
    const Medlink__V1__Welcome *w = ml_channel_welcome(ss->ch);
    if (w && w->max_record && ss->src->max_len > w->max_record) {
        ctl_fail(CTL_EXIT_FAIL,
                 "broker %s takes records of at most %u bytes, and this needs %zu%s: nothing "
                 "was sent",
                 w->broker, w->max_record, ss->src->max_len,
                 ss->src->first_alone ? " (use a smaller --chunk-size)" : "");
        s_finish(ss, ML_ETOOBIG);
        return;
    }
    s_pump(ss);
}

/* The TLS session cannot be made for a reason retrying will not fix (our
 * certificate expired or revoked, an unknown CA, the broker's CN not
 * broker_id): end at once with that reason instead of waiting out
 * --timeout. */
static void s_on_fatal(ml_channel_t *ch, const char *reason, void *arg)
{
    s_sess_t *ss = arg;
    (void)ch;
    if (ss->done)
        return;
    s_say(ss, CTL_EXIT_TLS, "cannot connect to broker %s: %s", ss->o->broker, reason);
    ss->fatal = 1;
    s_finish(ss, ML_ETLS);
}

static int s_lists(char **ids, size_t n, const char *id)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(ids[i], id) == 0)
            return 1;
    return 0;
}

/* Cumulative: one Accepted may answer many of our messages. O(ids x
 * unanswered). */
static void s_on_accepted(s_sess_t *ss, const Medlink__V1__Accepted *acc)
{
    int progress = 0;
    for (size_t k = 0; k < acc->n_message_ids; k++) {
        for (size_t i = 0; i < ss->n_items; i++) {
            s_item_t *it = &ss->items[i];
            if (strcmp(it->id, acc->message_ids[k]) != 0)
                continue;
            int dup = s_lists(acc->duplicate_ids, acc->n_duplicate_ids, it->id);
            ss->res->accepted++;
            ss->res->duplicates += (uint64_t)dup;
            if (it->seq == 0)
                ss->res->first_duplicate = dup;
            ss->bytes -= it->len;
            free(it->buf);
            memmove(it, it + 1, (ss->n_items - i - 1) * sizeof *it);
            ss->n_items--;
            progress = 1;
            break;
        }
    }
    if (progress) {
        uv_timer_again(&ss->progress);
        if (ss->o->verbose && ss->res->sent > 1)
            ml_log(ML_LOG_INFO, "ctl", "%llu messages accepted",
                   (unsigned long long)ss->res->accepted);
    }
    s_pump(ss);
}

static void s_on_nack(s_sess_t *ss, const Medlink__V1__Nack *n)
{
    if (ss->persist && !ss->pending)
        return;
    /* A Nack without a message id is about the session itself. */
    if (!n->message_id || !*n->message_id) {
        s_refused(ss, n);
        return;
    }
    if (ss->req) {
        if (strcmp(n->message_id, ss->req_id) == 0)
            s_refused(ss, n);
        return;
    }
    for (size_t i = 0; i < ss->n_items; i++) {
        s_item_t *it = &ss->items[i];
        if (strcmp(it->id, n->message_id) != 0)
            continue;
        if (!ml_nack_is_transient((int)n->code)) {
            s_refused(ss, n);
            return;
        }
        int64_t delay = (int64_t)S_NACK_RETRY_MS << (it->attempts < 5 ? it->attempts : 5);
        if (delay > S_NACK_RETRY_MAX_MS)
            delay = S_NACK_RETRY_MAX_MS;
        it->attempts++;
        it->sent = 0;
        it->not_before = ml_mono_ms() + delay;
        snprintf(ss->transient, sizeof ss->transient, "%s: %s", ml_nack_name((int)n->code),
                 n->reason ? n->reason : "");
        if (ss->o->verbose)
            ml_log(ML_LOG_INFO, "ctl", "message %s refused for now (%s); again in %lld ms", it->id,
                   ss->transient, (long long)delay);
        s_arm_retry(ss, delay);
        return;
    }
}

static void s_on_envelope(ml_channel_t *ch, ml_envelope_t *env, void *arg)
{
    s_sess_t *ss = arg;
    if (ss->done)
        return;
    switch (env->payload_case) {
    case MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REPLY: {
        if (!ss->req || (ss->persist && !ss->pending))
            return;
        /* A reply names the request it answers; one that names another
         * (an answer to an earlier request, resent after a reconnect) is
         * not ours. A broker older than request ids sends none. */
        const char *rid = env->admin_reply->request_id;
        if (rid && *rid && strcmp(rid, ss->req_id) != 0) {
            if (ss->o->verbose)
                ml_log(ML_LOG_INFO, "ctl", "ignoring a reply to request %s (ours is %s)", rid,
                       ss->req_id);
            return;
        }
        /* env is borrowed for the call: keep a copy. */
        uint8_t *buf = NULL;
        size_t len = 0;
        if (ml_env_pack(env, &buf, &len) < 0 || ml_env_unpack(buf, len, &ss->reply) < 0)
            ctl_oom();
        free(buf);
        s_finish(ss, 0);
        return;
    }
    case MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED:
        if (ss->src)
            s_on_accepted(ss, env->accepted);
        return;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_NACK:
        s_on_nack(ss, env->nack);
        return;
    default:
        return;
    }
}

static void s_progress_cb(uv_timer_t *t)
{
    s_sess_t *ss = t->data;
    const ctl_opts_t *o = ss->o;
    if (ss->src && ss->res->sent > 1)
        s_say(ss, CTL_EXIT_FAIL,
              "no progress from broker %s within %d s: %llu of %llu messages accepted%s%s",
              o->broker, o->timeout_s, (unsigned long long)ss->res->accepted,
              (unsigned long long)ss->res->sent, *ss->transient ? "; last refusal: " : "",
              ss->transient);
    else if (ss->persist)
        s_say(ss, CTL_EXIT_FAIL, "%s broker %s within %lld ms",
              ss->was_up ? "no answer from" : "cannot reach", o->broker,
              (long long)ss->req_timeout_ms);
    else
        s_say(ss, CTL_EXIT_FAIL, "no answer from broker %s within %d s%s%s", o->broker,
              o->timeout_s, *ss->transient ? "; last refusal: " : "", ss->transient);
    s_finish(ss, ML_ETIMEDOUT);
}

/* Makes the loop, the ZeroMQ context, the timers and the channel (which
 * connects on its own). Returns 0, or an ML_E* after saying why (then
 * s_end still has to run when the loop was made: *made says so). */
static int s_start(s_sess_t *ss, ml_tls_ctx_t *tls, int *made)
{
    const ctl_opts_t *o = ss->o;
    int rc;
    *made = 0;
    if (uv_loop_init(&ss->loop) < 0) {
        ctl_fail(CTL_EXIT_FAIL, "cannot create an event loop");
        return ML_EIO;
    }
    ss->zctx = zmq_ctx_new();
    if (!ss->zctx) {
        uv_loop_close(&ss->loop);
        ctl_fail(CTL_EXIT_FAIL, "cannot create a ZeroMQ context");
        return ML_EIO;
    }
    *made = 1;
    zmq_ctx_set(ss->zctx, ZMQ_BLOCKY, 0);
    uv_timer_init(&ss->loop, &ss->progress);
    uv_timer_init(&ss->loop, &ss->retry);
    ss->progress.data = ss;
    ss->retry.data = ss;
    ml_channel_config_t cc = {0};
    cc.endpoint = o->broker;
    cc.tls = tls;
    cc.node_id = o->node;
    cc.broker_id = o->broker_id;
    cc.software = "medlinkctl/" ML_VERSION;
    cc.deliveries = 0;
    cc.on_envelope = s_on_envelope;
    cc.on_state = s_on_state;
    cc.on_fatal = s_on_fatal;
    cc.arg = ss;
    if ((rc = ml_channel_new(&ss->loop, ss->zctx, &cc, &ss->ch)) < 0) {
        ctl_fail(CTL_EXIT_FAIL, "cannot connect to %s: %s", o->broker, ml_strerror(rc));
        return rc;
    }
    return 0;
}

/* Runs the loop until every handle is closed, then frees it. */
static void s_end(s_sess_t *ss)
{
    uv_run(&ss->loop, UV_RUN_DEFAULT);
    uv_loop_close(&ss->loop);
    zmq_ctx_term(ss->zctx);
}

static int s_run(s_sess_t *ss, ml_tls_ctx_t *tls)
{
    int made, rc = s_start(ss, tls, &made);
    if (!made)
        return rc;
    if (rc == 0) {
        uint64_t ms = (uint64_t)ss->o->timeout_s * 1000;
        uv_timer_start(&ss->progress, s_progress_cb, ms, ms);
    } else {
        s_finish(ss, rc);
    }
    s_end(ss);
    return ss->rc;
}

int ctl_session_admin(const ctl_opts_t *o, ml_tls_ctx_t *tls, const Medlink__V1__AdminRequest *req,
                      ml_envelope_t **reply, ctl_result_t *res)
{
    s_sess_t ss = {0};
    memset(res, 0, sizeof *res);
    ss.o = o;
    ss.res = res;
    /* The request id is the envelope's id: the broker echoes it in
     * AdminReply.request_id. */
    ml_ulid_new(ss.req_id);
    Medlink__V1__AdminRequest rq = *req;
    rq.request_id = ss.req_id;
    ss.req = &rq;
    int rc = s_run(&ss, tls);
    if (rc == 0)
        *reply = ss.reply;
    else
        ml_env_free(&ss.reply);
    return rc;
}

int ctl_session_send(const ctl_opts_t *o, ml_tls_ctx_t *tls, const ctl_source_t *src,
                     ctl_result_t *res)
{
    s_sess_t ss = {0};
    memset(res, 0, sizeof *res);
    ss.o = o;
    ss.res = res;
    ss.src = src;
    int rc = s_run(&ss, tls);
    for (size_t i = 0; i < ss.n_items; i++)
        free(ss.items[i].buf);
    free(ss.items);
    return rc;
}

/* ---- a connection kept for many requests ---- */

struct ctl_conn {
    s_sess_t ss;
    ctl_result_t res;
};

static void s_event_stop(s_sess_t *ss)
{
    ss->event = 1;
    uv_stop(&ss->loop);
}

static void s_kbd_cb(uv_poll_t *p, int status, int events)
{
    s_sess_t *ss = p->data;
    (void)events;
    (void)status;
    /* Level-triggered: stopped until the caller has read what came. */
    uv_poll_stop(p);
    ss->key_ready = 1;
    s_event_stop(ss);
}

static void s_signal_cb(uv_signal_t *h, int signum)
{
    s_sess_t *ss = h->data;
    ss->signo = signum;
    s_event_stop(ss);
}

static void s_wait_cb(uv_timer_t *t)
{
    s_sess_t *ss = t->data;
    ss->waited = 1;
    uv_stop(&ss->loop);
}

int ctl_conn_open(const ctl_opts_t *o, ml_tls_ctx_t *tls, int watch_fd, ctl_conn_t **c)
{
    static const int sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGWINCH, SIGTSTP};
    ctl_conn_t *cn = calloc(1, sizeof *cn);
    if (!cn)
        ctl_oom();
    s_sess_t *ss = &cn->ss;
    ss->o = o;
    ss->res = &cn->res;
    ss->persist = 1;
    ss->req = &ss->rq;
    medlink__v1__admin_request__init(&ss->rq);
    int made, rc = s_start(ss, tls, &made);
    if (!made) {
        free(cn);
        return rc;
    }
    uv_timer_init(&ss->loop, &ss->wait);
    ss->wait.data = ss;
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) {
        uv_signal_init(&ss->loop, &ss->sig[i]);
        ss->sig[i].data = ss;
        uv_signal_start(&ss->sig[i], s_signal_cb, sigs[i]);
        ss->n_sig++;
    }
    if (watch_fd >= 0 && uv_poll_init(&ss->loop, &ss->kbd, watch_fd) == 0) {
        ss->kbd.data = ss;
        ss->kbd_on = 1;
        uv_poll_start(&ss->kbd, UV_READABLE, s_kbd_cb);
    }
    *c = cn;
    if (rc < 0) {
        ctl_conn_destroy(c);
        return rc;
    }
    return 0;
}

int ctl_conn_admin(ctl_conn_t *c, const Medlink__V1__AdminRequest *req, int timeout_ms,
                   ml_envelope_t **reply)
{
    s_sess_t *ss = &c->ss;
    *reply = NULL;
    ml_env_free(&ss->reply);
    if (ss->event)
        return CTL_CONN_EVENT;
    /* Even between requests: a certificate revoked meanwhile ends it. */
    if (ss->fatal)
        return ML_ETLS;
    ss->why[0] = '\0';
    /* Once it has been up, a channel that is down is said at once: the
     * caller shows it and asks again later, while it reconnects. */
    if (ss->was_up && !ml_channel_is_up(ss->ch)) {
        snprintf(ss->why, sizeof ss->why, "not connected to %s", ss->o->broker);
        return ML_ECLOSED;
    }
    ss->rq = *req;
    ml_ulid_new(ss->req_id);
    ss->rq.request_id = ss->req_id;
    ss->pending = 1;
    ss->rc = 0;
    ss->req_timeout_ms = timeout_ms;
    uv_timer_start(&ss->progress, s_progress_cb, (uint64_t)timeout_ms, 0);
    if (ml_channel_is_up(ss->ch))
        s_send_admin(ss);
    while (ss->pending && !ss->event)
        uv_run(&ss->loop, UV_RUN_DEFAULT);
    if (ss->pending) {
        /* A key or a signal came first: the request is given up (a late
         * reply names a request id no longer awaited and is dropped). */
        ss->pending = 0;
        uv_timer_stop(&ss->progress);
        return CTL_CONN_EVENT;
    }
    if (ss->rc == ML_EDENIED)
        snprintf(ss->why, sizeof ss->why, "refused: %s", c->res.nack_reason);
    if (ss->rc == 0) {
        *reply = ss->reply;
        ss->reply = NULL;
    }
    return ss->rc;
}

int ctl_conn_wait(ctl_conn_t *c, int ms)
{
    s_sess_t *ss = &c->ss;
    if (ss->event)
        return 1;
    ss->waited = 0;
    uv_timer_start(&ss->wait, s_wait_cb, (uint64_t)(ms > 0 ? ms : 0), 0);
    while (!ss->waited && !ss->event)
        uv_run(&ss->loop, UV_RUN_DEFAULT);
    uv_timer_stop(&ss->wait);
    return ss->event;
}

void ctl_conn_take_event(ctl_conn_t *c, int *key_ready, int *signo)
{
    s_sess_t *ss = &c->ss;
    *key_ready = ss->key_ready;
    *signo = ss->signo;
    ss->key_ready = 0;
    ss->signo = 0;
    ss->event = 0;
    if (ss->kbd_on && *key_ready)
        uv_poll_start(&ss->kbd, UV_READABLE, s_kbd_cb);
}

const char *ctl_conn_why(const ctl_conn_t *c)
{
    return c->ss.why;
}

void ctl_conn_destroy(ctl_conn_t **c)
{
    if (!c || !*c)
        return;
    s_sess_t *ss = &(*c)->ss;
    uv_timer_stop(&ss->progress);
    uv_timer_stop(&ss->retry);
    uv_close((uv_handle_t *)&ss->progress, NULL);
    uv_close((uv_handle_t *)&ss->retry, NULL);
    uv_close((uv_handle_t *)&ss->wait, NULL);
    for (int i = 0; i < ss->n_sig; i++)
        uv_close((uv_handle_t *)&ss->sig[i], NULL);
    if (ss->kbd_on)
        uv_close((uv_handle_t *)&ss->kbd, NULL);
    ml_channel_destroy(&ss->ch);
    ml_env_free(&ss->reply);
    s_end(ss);
    free(*c);
    *c = NULL;
}
