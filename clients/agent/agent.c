/* The agent's event-driven core. Everything happens on one libuv loop:
 * the channel reports envelopes and state changes, a timer (and an
 * fs-event watcher on outbox/) drives the outbox scan, and a uv_check
 * handle runs once per loop iteration to commit what that iteration
 * collected (broker answers here, deliveries through the receive batch of
 * inbox.c) in one transaction each, so that a burst of a thousand
 * deliveries costs one fsync, not a thousand.
 *
 * Sending reads two streams of the outbox: ordinary messages first, then
 * imaging chunks, whose envelopes are built from the blob copies as they
 * go. What is in flight is bounded by count (send_window) and by bytes
 * (send_window_bytes), so a study of a few hundred MiB never fills the
 * link and a referral dropped in the middle of it goes out at once. The
 * copying of a study into blob copies runs on the libuv thread pool
 * (img_send.c). */
#include "agent.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

#include "astore.h"
#include "imaging.h"
#include "inbox.h"
#include "ml_channel.h"
#include "ml_common.h"
#include "ml_crypt.h"
#include "ml_env.h"
#include "ml_nack.h"
#include "ml_sdnotify.h"
#include "ml_text.h"
#include "ml_tls.h"
#include "spool.h"

#define S_LOG "agent"
#define S_SOFTWARE "medlink-agent/0.1.0"
/* Files taken per scan: bounds the time one scan holds the loop. */
#define S_SCAN_BATCH 500
#define S_RETRY_MIN_MS 1000
#define S_RETRY_MAX_MS 60000
/* Delay before trying again when the channel pushes back (ML_EFULL). */
#define S_BLOCKED_MS 20

/* Chunk rows read per walk: their number in flight is bounded by bytes. */
#define S_CHUNK_BATCH 64
/* Bytes a chunk's envelope adds to its data, for the window estimate. */
#define S_CHUNK_FRAMING 512

/* Ids of messages sent and not yet answered, with their sizes: open
 * addressing with tombstones, O(1) expected per operation. */
#define S_TOMB ((char *)&s_tomb)
static char s_tomb;
typedef struct {
    char *id;
    size_t bytes;
} s_slot_t;
typedef struct {
    s_slot_t *slot;
    size_t cap;   /* power of two */
    size_t count; /* live ids */
    size_t used;  /* live ids + tombstones */
    size_t bytes; /* sum of the live ids' bytes */
} s_idset_t;

/* An answer from the broker waiting for the iteration's transaction. */
typedef struct {
    char *id;
    int accepted;
    char *reason;
} s_answer_t;

struct ml_agent {
    uv_loop_t *loop;
    char *node_id;
    char *outbox_dir;
    uint32_t scan_ms;
    uint32_t window;

    size_t window_bytes;

    void *zctx;
    ml_tls_ctx_t *tls;
    ml_keyring_t *keys; /* store_key and store_old_keys, or NULL */
    ml_astore_t *store;
    ml_spool_t *spool;
    ml_aimg_t *img;
    ml_channel_t *ch;

    uv_timer_t scan_timer;
    uv_timer_t pump_timer;
    uv_timer_t retention_timer;
    int64_t retention_ms;      /* settled rows (-1: kept) */
    int64_t sent_retention_ms; /* sent/ files (0: kept) */
    uv_check_t check;
    uv_fs_event_t fs_event;
    int handles_open;
    int fs_event_on;

    int up;
    int stopping;
    int scan_due;
    int pump_due;
    /* Highest outbox seq sent in this session, per stream
     * (ML_OUTBOX_MESSAGES, ML_OUTBOX_CHUNKS). */
    int64_t cursor[2];
    uint32_t backoff_ms;
    /* A row was refused for now: nothing newer is sent until the retry
     * timer resends from the first pending row, so that the refused rows go
     * ahead of everything queued after them (the broker holds the rest of
     * the window it refused, but not rows sent after that hold ends). */
    int waiting;
    s_idset_t inflight;
    /* This session's sending, for the log line when it ends. */
    uint64_t sent_msgs, sent_chunks, sent_chunk_bytes;

    s_answer_t *answers;
    size_t n_answers, cap_answers;
    /* Deliveries of this iteration, stored at its end (inbox.h). */
    ml_inbox_t *inbox;
};

static uint64_t s_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    while (*s)
        h = (h ^ (uint8_t)*s++) * 1099511628211ULL;
    return h;
}

static void s_idset_clear(s_idset_t *set)
{
    for (size_t i = 0; i < set->cap; i++) {
        if (set->slot[i].id && set->slot[i].id != S_TOMB)
            free(set->slot[i].id);
    }
    free(set->slot);
    memset(set, 0, sizeof *set);
}

/* Index of id, or of the slot where it would go (-1 if not present when
 * for_insert is 0). */
static long s_idset_find(const s_idset_t *set, const char *id, int for_insert)
{
    if (set->cap == 0)
        return -1;
    size_t mask = set->cap - 1;
    long tomb = -1;
    for (size_t i = s_hash(id) & mask, n = 0; n < set->cap; i = (i + 1) & mask, n++) {
        char *s = set->slot[i].id;
        if (!s)
            return for_insert ? (tomb >= 0 ? tomb : (long)i) : -1;
        if (s == S_TOMB) {
            if (tomb < 0)
                tomb = (long)i;
        } else if (strcmp(s, id) == 0) {
            return (long)i;
        }
    }
    return for_insert ? tomb : -1;
}

static int s_idset_grow(s_idset_t *set)
{
    size_t cap = set->cap ? set->cap : 64;
    while (set->count * 2 + 2 > cap / 2)
        cap *= 2;
    s_idset_t n = {calloc(cap, sizeof(s_slot_t)), cap, 0, 0, set->bytes};
    if (!n.slot)
        return ML_ENOMEM;
    for (size_t i = 0; i < set->cap; i++) {
        char *s = set->slot[i].id;
        if (!s || s == S_TOMB)
            continue;
        long j = s_idset_find(&n, s, 1);
        n.slot[j] = set->slot[i];
        n.count++;
        n.used++;
    }
    free(set->slot);
    *set = n;
    return 0;
}

static int s_idset_has(const s_idset_t *set, const char *id)
{
    return s_idset_find(set, id, 0) >= 0;
}

static int s_idset_add(s_idset_t *set, const char *id, size_t bytes)
{
    if ((set->used + 1) * 2 > set->cap && s_idset_grow(set) < 0)
        return ML_ENOMEM;
    long i = s_idset_find(set, id, 1);
    if (set->slot[i].id && set->slot[i].id != S_TOMB)
        return 0;
    char *c = strdup(id);
    if (!c)
        return ML_ENOMEM;
    if (!set->slot[i].id)
        set->used++;
    set->slot[i].id = c;
    set->slot[i].bytes = bytes;
    set->count++;
    set->bytes += bytes;
    return 0;
}

/* Returns 1 when id was there. */
static int s_idset_del(s_idset_t *set, const char *id)
{
    long i = s_idset_find(set, id, 0);
    if (i < 0)
        return 0;
    free(set->slot[i].id);
    set->slot[i].id = S_TOMB;
    set->count--;
    set->bytes -= set->slot[i].bytes;
    set->slot[i].bytes = 0;
    return 1;
}

static void s_schedule_pump(ml_agent_t *a, uint64_t delay_ms);

/* ---- answers and deliveries, flushed once per loop iteration ---- */

static void s_push_answer(ml_agent_t *a, const char *id, int accepted, const char *reason)
{
    if (a->n_answers == a->cap_answers) {
        size_t cap = a->cap_answers ? a->cap_answers * 2 : 64;
        s_answer_t *n = realloc(a->answers, cap * sizeof *n);
        if (!n)
            goto nomem;
        a->answers = n;
        a->cap_answers = cap;
    }
    s_answer_t *ans = &a->answers[a->n_answers];
    ans->id = strdup(id);
    ans->reason = reason ? strdup(reason) : NULL;
    ans->accepted = accepted;
    if (!ans->id || (reason && !ans->reason)) {
        free(ans->id);
        free(ans->reason);
        goto nomem;
    }
    a->n_answers++;
    return;
nomem:
    /* The row stays pending and is sent again after the next reconnect;
     * the broker then answers again. */
    ml_log(ML_LOG_ERROR, S_LOG, "out of memory recording the answer for %s", id);
}

static void s_flush_answers(ml_agent_t *a)
{
    if (a->n_answers == 0)
        return;
    ml_spool_result_t *res = calloc(a->n_answers, sizeof *res);
    if (res) {
        for (size_t i = 0; i < a->n_answers; i++) {
            res[i].message_id = a->answers[i].id;
            res[i].accepted = a->answers[i].accepted;
            res[i].reason = a->answers[i].reason;
        }
        /* On failure the rows stay pending: they are resent after a retry
         * delay and the broker answers again (as duplicates). */
        if (ml_spool_settle(a->spool, res, a->n_answers) < 0) {
            a->backoff_ms = a->backoff_ms ? a->backoff_ms : S_RETRY_MIN_MS;
            s_schedule_pump(a, a->backoff_ms);
        } else if (ml_aimg_settled(a->img, res, a->n_answers)) {
            /* A consult was accepted: its chunks, released now, may lie
             * behind the chunk cursor. */
            a->cursor[ML_OUTBOX_CHUNKS] = 0;
            a->pump_due = 1;
        }
        free(res);
    }
    for (size_t i = 0; i < a->n_answers; i++) {
        free(a->answers[i].id);
        free(a->answers[i].reason);
    }
    a->n_answers = 0;
}

/* Sends a control record to the broker: env has its payload set; id,
 * from, to, kind and created_at are filled here. Returns as
 * ml_channel_send. */
static int s_send_control(ml_agent_t *a, ml_envelope_t *env)
{
    const Medlink__V1__Welcome *w = ml_channel_welcome(a->ch);
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    env->id = id;
    env->from = a->node_id;
    env->to = w && w->broker ? w->broker : "";
    env->kind = ml_env_kind_of_payload((int)env->payload_case);
    env->created_at = ml_now_ms();
    return ml_channel_send(a->ch, env);
}

/* Tells the broker that delivery id cannot be taken (Nack REFUSED): it
 * becomes a dead letter there, with why, instead of being delivered again
 * for ever. */
static void s_send_refusal(void *arg, const char *id, const char *why)
{
    ml_agent_t *a = arg;
    ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
    Medlink__V1__Nack nack = MEDLINK__V1__NACK__INIT;
    nack.message_id = (char *)id;
    nack.code = MEDLINK__V1__NACK_CODE__NACK_REFUSED;
    nack.reason = (char *)why;
    env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_NACK;
    env.nack = &nack;
    if (s_send_control(a, &env) < 0)
        ml_log(ML_LOG_DEBUG, S_LOG, "refusal of %s not sent; it is refused again when redelivered",
               id);
}

/* Acknowledges n stored deliveries with one cumulative Ack (the inbox's
 * send_ack). Nothing goes out while the channel is down: the broker
 * delivers them again in the next session and they are acked then. */
static void s_send_ack(void *arg, char **message_ids, size_t n)
{
    ml_agent_t *a = arg;
    if (!ml_channel_is_up(a->ch))
        return;
    ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
    Medlink__V1__Ack ack = MEDLINK__V1__ACK__INIT;
    ack.n_message_ids = n;
    ack.message_ids = message_ids;
    env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ACK;
    env.ack = &ack;
    int rc = s_send_control(a, &env);
    if (rc < 0)
        /* Stored already; the broker resends and we ack the duplicate. */
        ml_log(ML_LOG_DEBUG, S_LOG, "ack for %zu message(s) not sent (%s); broker will redeliver",
               n, ml_strerror(rc));
}

/* Stores this iteration's deliveries in one transaction and acks them. */
static void s_flush_rx(ml_agent_t *a)
{
    if (ml_inbox_pending(a->inbox) == 0)
        return;
    /* Resend requests and updates may have queued messages. */
    if (ml_inbox_flush(a->inbox) != ML_ENOMEM)
        a->pump_due = 1;
}

/* ---- sending ---- */

typedef struct {
    ml_agent_t *a;
    int stream; /* ML_OUTBOX_MESSAGES or ML_OUTBOX_CHUNKS */
    int stop;   /* the channel pushed back or is closed */
    int full;   /* the window is full */
    size_t rows;
} s_pump_t;

/* The window the agent sends within: its own (send_window,
 * send_window_bytes) or the broker's credit, the smaller (docs/protocol.md,
 * "Credit"). O(1). */
static void s_window(const ml_agent_t *a, size_t *msgs, size_t *bytes)
{
    uint32_t cm = UINT32_MAX;
    uint64_t cb = UINT64_MAX;
    ml_channel_credit(a->ch, &cm, &cb);
    *msgs = a->window < cm ? a->window : cm;
    *bytes = (uint64_t)a->window_bytes < cb ? a->window_bytes : (size_t)cb;
}

static int s_send_row_cb(const ml_outbox_row_t *row, void *arg)
{
    s_pump_t *p = arg;
    ml_agent_t *a = p->a;
    int64_t *cursor = &a->cursor[p->stream];
    int chunk = *row->blob_path != '\0';
    p->rows++;
    if (s_idset_has(&a->inflight, row->id)) {
        *cursor = row->seq;
        return 0;
    }
    /* At least one message is always let through, however large. */
    size_t est = row->envelope_len + row->blob_len + (chunk ? S_CHUNK_FRAMING : 0);
    size_t win, win_bytes;
    s_window(a, &win, &win_bytes);
    if ((a->inflight.count > 0 && a->inflight.count >= win) ||
        (a->inflight.bytes > 0 && a->inflight.bytes + est > win_bytes)) {
        p->full = 1;
        return 1;
    }
    uint8_t *built = NULL;
    const uint8_t *data = row->envelope;
    size_t len = row->envelope_len;
    if (chunk) {
        char err[1024];
        int rc = ml_aimg_chunk_envelope(a->img, row, &built, &len, err, sizeof err);
        if (rc == ML_ENOMEM) {
            s_schedule_pump(a, S_BLOCKED_MS);
            p->stop = 1;
            return 1;
        }
        if (rc < 0) {
            /* The blob copy is gone or damaged: this chunk can never go.
             * It is refused here; the reading centre asks for it again
             * if the study still needs it. */
            char why[1200];
            snprintf(why, sizeof why, "imaging chunk cannot be sent: %s", err);
            ml_log(ML_LOG_ERROR, "imaging", "case %s: %s", row->case_id, why);
            s_push_answer(a, row->id, 0, why);
            *cursor = row->seq;
            return 0;
        }
        data = built;
    }
    int rc = ml_channel_send_raw(a->ch, data, len);
    free(built);
    if (rc == ML_ETOOBIG) {
        /* The broker's limit (Welcome.max_record) is below ours: this
         * message can never go, so it is refused here with the reason. */
        char why[256];
        snprintf(why, sizeof why,
                 "NACK_TOO_LARGE: message is %zu bytes, over the limit of the "
                 "connection",
                 len);
        s_push_answer(a, row->id, 0, why);
        *cursor = row->seq;
        return 0;
    }
    if (rc == ML_EFULL) {
        s_schedule_pump(a, S_BLOCKED_MS);
        p->stop = 1;
        return 1;
    }
    if (rc < 0) {
        /* Closed or out of memory: the next on_state(up) starts over. */
        p->stop = 1;
        return 1;
    }
    if (s_idset_add(&a->inflight, row->id, len) < 0) {
        p->stop = 1;
        return 1;
    }
    if (chunk) {
        a->sent_chunks++;
        a->sent_chunk_bytes += row->blob_len;
        ml_log(ML_LOG_DEBUG, "imaging", "case %s: sent chunk %s (%zu bytes at offset %llu of %s)",
               row->case_id, row->id, row->blob_len, (unsigned long long)row->blob_off,
               row->blob_path);
    } else {
        a->sent_msgs++;
    }
    *cursor = row->seq;
    return 0;
}

/* Sends pending rows after the cursors, messages before chunks, until the
 * window (send_window messages, send_window_bytes bytes) is full. O(window)
 * rows read per call. */
static void s_pump(ml_agent_t *a)
{
    a->pump_due = 0;
    if (!a->up || a->stopping || a->waiting)
        return;
    for (int stream = ML_OUTBOX_MESSAGES; stream <= ML_OUTBOX_CHUNKS; stream++) {
        for (;;) {
            size_t win, win_bytes;
            s_window(a, &win, &win_bytes);
            if (win == 0)
                win = 1; /* at least one record always (not up: the send fails) */
            if (a->inflight.count >= win)
                return;
            s_pump_t p = {a, stream, 0, 0, 0};
            int64_t limit = (int64_t)(win - a->inflight.count);
            if (stream == ML_OUTBOX_CHUNKS && limit > S_CHUNK_BATCH)
                limit = S_CHUNK_BATCH;
            int rc = ml_astore_outbox_next(a->store, stream, a->cursor[stream], limit,
                                           s_send_row_cb, &p);
            if (rc < 0) {
                ml_log(ML_LOG_ERROR, S_LOG, "cannot read the outbox: %s",
                       ml_astore_errmsg(a->store));
                s_schedule_pump(a, S_RETRY_MIN_MS);
                return;
            }
            if (p.stop || p.full)
                return;
            if (p.rows == 0)
                break;
        }
    }
}

static void s_pump_timer_cb(uv_timer_t *t)
{
    ml_agent_t *a = t->data;
    /* Start from the first pending row again: rows refused for now
     * (transient Nack) are behind the cursor. Rows in flight are skipped. */
    a->cursor[ML_OUTBOX_MESSAGES] = a->cursor[ML_OUTBOX_CHUNKS] = 0;
    a->waiting = 0;
    s_pump(a);
}

static void s_schedule_pump(ml_agent_t *a, uint64_t delay_ms)
{
    if (a->stopping)
        return;
    /* Keep an earlier wake-up if one is already set. */
    if (uv_is_active((uv_handle_t *)&a->pump_timer) &&
        uv_timer_get_due_in(&a->pump_timer) <= delay_ms)
        return;
    uv_timer_start(&a->pump_timer, s_pump_timer_cb, delay_ms, 0);
}

/* ---- channel callbacks ---- */

static void s_on_answer(ml_agent_t *a, const ml_envelope_t *env)
{
    if (env->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED) {
        for (size_t i = 0; i < env->accepted->n_message_ids; i++) {
            const char *id = env->accepted->message_ids[i];
            if (!id || !*id)
                continue;
            s_idset_del(&a->inflight, id);
            s_push_answer(a, id, 1, NULL);
        }
        a->backoff_ms = 0;
        a->pump_due = 1;
        /* Progress: rows refused for now go again soon, not at the end of
         * a long back-off. */
        if (uv_is_active((uv_handle_t *)&a->pump_timer) &&
            uv_timer_get_due_in(&a->pump_timer) > S_RETRY_MIN_MS)
            uv_timer_start(&a->pump_timer, s_pump_timer_cb, S_RETRY_MIN_MS, 0);
        return;
    }
    const Medlink__V1__Nack *n = env->nack;
    const char *id = n->message_id ? n->message_id : "";
    const char *code = ml_nack_name(n->code);
    if (!*id || !s_idset_del(&a->inflight, id)) {
        /* Not about one of our messages in flight (e.g. a Nack for a
         * control record): nothing to settle. */
        ml_log(ML_LOG_WARN, S_LOG, "broker refused %s: %s: %s", *id ? id : "a record", code,
               n->reason ? n->reason : "");
        if (!*id)
            return;
    }
    if (ml_nack_is_transient(n->code)) {
        a->waiting = 1;
        /* One doubling per round of retries: a busy broker refuses (or
         * holds) a whole window at once, which is one refusal, not many. */
        if (!a->backoff_ms)
            a->backoff_ms = S_RETRY_MIN_MS;
        else if (!uv_is_active((uv_handle_t *)&a->pump_timer))
            a->backoff_ms *= 2;
        if (a->backoff_ms > S_RETRY_MAX_MS)
            a->backoff_ms = S_RETRY_MAX_MS;
        ml_log(ML_LOG_WARN, S_LOG, "message %s refused for now (%s: %s); retrying in %u ms", id,
               code, n->reason ? n->reason : "", a->backoff_ms);
        s_schedule_pump(a, a->backoff_ms);
        return;
    }
    char why[1024];
    snprintf(why, sizeof why, "%s: %s", code, n->reason && *n->reason ? n->reason : "refused");
    s_push_answer(a, id, 0, why);
    a->pump_due = 1;
}

static void s_on_envelope(ml_channel_t *ch, ml_envelope_t *env, void *arg)
{
    ml_agent_t *a = arg;
    switch (env->payload_case) {
    case MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED:
    case MEDLINK__V1__ENVELOPE__PAYLOAD_NACK:
        s_on_answer(a, env);
        return;
    default:
        break;
    }
    if (ml_env_kind_is_routed(env->kind)) {
        (void)ml_inbox_push(a->inbox, env);
        return;
    }
    ml_log(ML_LOG_DEBUG, S_LOG, "ignored a %s record from the broker", ml_kind_name(env->kind));
}

/* The broker cannot be reached for a reason that retrying will not fix
 * (a certificate, CA, CRL or broker identity matter): an ERROR for the
 * operator. The channel keeps trying, backing off up to a minute, so that
 * fixing the certificate is enough. */
static void s_on_fatal(ml_channel_t *ch, const char *reason, void *arg)
{
    (void)ch;
    (void)arg;
    ml_log(ML_LOG_ERROR, S_LOG,
           "cannot connect to the broker, and retrying will not help until this is fixed: %s "
           "(still retrying, at most once a minute)",
           reason);
}

static void s_on_state(ml_channel_t *ch, int up, const char *reason, void *arg)
{
    ml_agent_t *a = arg;
    /* Whatever was in flight is sent again on the next session: the broker
     * drops duplicates by id and answers them again. */
    s_idset_clear(&a->inflight);
    a->cursor[ML_OUTBOX_MESSAGES] = a->cursor[ML_OUTBOX_CHUNKS] = 0;
    a->waiting = 0; /* a new session resends every pending row, in order */
    a->up = up;
    if (up) {
        const Medlink__V1__Welcome *w = ml_channel_welcome(ch);
        int64_t pending = 0;
        ml_astore_outbox_count(a->store, ML_OUTBOX_PENDING, &pending);
        ml_log(ML_LOG_INFO, S_LOG,
               "connected to broker %s as %s (role %s); %lld message(s) to send (imaging "
               "chunks included)",
               w && w->broker ? w->broker : "?", a->node_id, w && w->role ? w->role : "?",
               (long long)pending);
        /* systemctl status shows the link's state (no-op without systemd). */
        ml_sdnotify_status("connected to broker %.200s as %.200s", w && w->broker ? w->broker : "?",
                           a->node_id);
        a->sent_msgs = a->sent_chunks = a->sent_chunk_bytes = 0;
        /* Sending resumes at the first chunk not yet Accepted. */
        ml_aimg_log_resume(a->img);
        s_pump(a);
    } else {
        ml_log(ML_LOG_WARN, S_LOG,
               "disconnected from broker: %s (this session sent %llu message(s) and %llu imaging "
               "chunk(s), %llu bytes of image data)",
               reason ? reason : "unknown", (unsigned long long)a->sent_msgs,
               (unsigned long long)a->sent_chunks, (unsigned long long)a->sent_chunk_bytes);
        ml_sdnotify_status("disconnected from broker: %.400s (retrying; files are still "
                           "taken into the outbox)",
                           reason ? reason : "unknown");
    }
}

/* ---- loop handles ---- */

/* The imaging module added outbox rows (a staged consult, a resend). */
static void s_wake_cb(void *arg)
{
    ml_agent_t *a = arg;
    a->pump_due = 1;
}

static void s_scan(ml_agent_t *a)
{
    ml_spool_scan_stats_t st;
    a->scan_due = 0;
    if (a->stopping)
        return;
    if (ml_spool_scan(a->spool, S_SCAN_BATCH, &st) == 0 && st.queued > 0)
        a->pump_due = 1;
    /* A full batch means more files are waiting: come back next iteration. */
    if (st.queued + st.rejected >= S_SCAN_BATCH)
        a->scan_due = 1;
}

static void s_scan_timer_cb(uv_timer_t *t)
{
    ml_agent_t *a = t->data;
    ml_aimg_tick(a->img);
    s_scan(a);
    if (a->pump_due)
        s_pump(a);
}

/* Retention: settled outbox rows, spooled inbox rows and old sent/ files,
 * in bounded batches (one transaction each) so that one tick never stalls
 * the loop; a tick that filled its batch comes back at once. */
#define S_PRUNE_BATCH 1000
static void s_retention_timer_cb(uv_timer_t *t)
{
    ml_agent_t *a = t->data;
    int64_t now = ml_now_ms(), o = 0, i = 0;
    size_t files = 0;
    if (a->retention_ms >= 0 &&
        ml_astore_prune(a->store, now - a->retention_ms, S_PRUNE_BATCH, &o, &i) != 0)
        ml_log(ML_LOG_WARN, S_LOG, "retention: cannot prune agent.db: %s",
               ml_astore_errmsg(a->store));
    if (a->sent_retention_ms > 0)
        ml_spool_prune_sent(a->spool, now - a->sent_retention_ms, S_PRUNE_BATCH, &files);
    if (o || i || files)
        ml_log(ML_LOG_INFO, S_LOG,
               "retention: %lld outbox row(s), %lld inbox row(s) and %zu sent/ file(s) removed",
               (long long)o, (long long)i, files);
    if (o == S_PRUNE_BATCH || i == S_PRUNE_BATCH || files == S_PRUNE_BATCH)
        uv_timer_start(&a->retention_timer, s_retention_timer_cb, 0, uv_timer_get_repeat(t));
}

static void s_fs_event_cb(uv_fs_event_t *h, const char *name, int events, int status)
{
    ml_agent_t *a = h->data;
    /* Scan in the check phase: a burst of renames gives one scan. */
    if (status == 0 && name && name[0] != '.')
        a->scan_due = 1;
}

static void s_check_cb(uv_check_t *h)
{
    ml_agent_t *a = h->data;
    s_flush_answers(a);
    s_flush_rx(a);
    if (a->scan_due)
        s_scan(a);
    if (a->pump_due)
        s_pump(a);
}

static void s_close_cb(uv_handle_t *h)
{
    ml_agent_t *a = h->data;
    a->handles_open--;
}

static void s_close(ml_agent_t *a, uv_handle_t *h)
{
    if (!uv_is_closing(h)) {
        h->data = a;
        uv_close(h, s_close_cb);
    }
}

void ml_agent_reload(ml_agent_t *a, const ml_aconfig_t *cfg)
{
    if (!a || a->stopping)
        return;
    if (cfg->scan_ms != a->scan_ms) {
        ml_log(ML_LOG_INFO, S_LOG, "reload: scan_ms %u -> %u", a->scan_ms, cfg->scan_ms);
        a->scan_ms = cfg->scan_ms;
        uv_timer_start(&a->scan_timer, s_scan_timer_cb, a->scan_ms, a->scan_ms);
    }
    /* A smaller window only holds back new sends until enough of what is
     * in flight has been answered (s_send_row_cb compares, never
     * subtracts). */
    if (cfg->send_window != a->window) {
        ml_log(ML_LOG_INFO, S_LOG, "reload: send_window %u -> %u", a->window, cfg->send_window);
        a->window = cfg->send_window;
        a->pump_due = 1;
    }
    if (cfg->send_window_bytes && cfg->send_window_bytes != a->window_bytes) {
        ml_log(ML_LOG_INFO, S_LOG, "reload: send_window_bytes %zu -> %zu", a->window_bytes,
               cfg->send_window_bytes);
        a->window_bytes = cfg->send_window_bytes;
        a->pump_due = 1;
    }
    if (cfg->retention_ms != a->retention_ms || cfg->sent_retention_ms != a->sent_retention_ms) {
        ml_log(ML_LOG_INFO, S_LOG, "reload: retention %lld ms -> %lld ms, sent/ %lld ms -> %lld ms",
               (long long)a->retention_ms, (long long)cfg->retention_ms,
               (long long)a->sent_retention_ms, (long long)cfg->sent_retention_ms);
        a->retention_ms = cfg->retention_ms;
        a->sent_retention_ms = cfg->sent_retention_ms;
    }
    uint64_t every = (uint64_t)cfg->retention_interval_ms;
    if (every != uv_timer_get_repeat(&a->retention_timer)) {
        ml_log(ML_LOG_INFO, S_LOG, "reload: retention_interval_s now %llu",
               (unsigned long long)(every / 1000));
        uv_timer_start(&a->retention_timer, s_retention_timer_cb, every, every);
    }
}

void ml_agent_stop(ml_agent_t *a)
{
    if (!a || a->stopping)
        return;
    ml_log(ML_LOG_INFO, S_LOG, "stopping");
    a->stopping = 1;
    /* A study being copied is abandoned at its next block; it stays in
     * pending/ and is staged again at the next start. */
    ml_aimg_stop(a->img);
    uv_timer_stop(&a->scan_timer);
    uv_timer_stop(&a->pump_timer);
    uv_timer_stop(&a->retention_timer);
    if (a->fs_event_on)
        uv_fs_event_stop(&a->fs_event);
    /* Commit what this iteration collected; deliveries are acked while the
     * channel still exists. */
    s_flush_answers(a);
    s_flush_rx(a);
    ml_channel_destroy(&a->ch);
    a->up = 0;
    if (a->handles_open > 0) {
        s_close(a, (uv_handle_t *)&a->scan_timer);
        s_close(a, (uv_handle_t *)&a->pump_timer);
        s_close(a, (uv_handle_t *)&a->retention_timer);
        s_close(a, (uv_handle_t *)&a->check);
        if (a->fs_event_on)
            s_close(a, (uv_handle_t *)&a->fs_event);
    }
}

void ml_agent_destroy(ml_agent_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    ml_agent_t *a = *self_p;
    /* Handles not yet closed would point into freed memory. */
    if (a->handles_open > 0) {
        ml_log(ML_LOG_ERROR, S_LOG, "ml_agent_destroy before the loop closed its handles");
        abort();
    }
    ml_channel_destroy(&a->ch);
    for (size_t i = 0; i < a->n_answers; i++) {
        free(a->answers[i].id);
        free(a->answers[i].reason);
    }
    free(a->answers);
    ml_inbox_destroy(&a->inbox);
    s_idset_clear(&a->inflight);
    /* Before the store: its statements live on the store's connection. */
    ml_aimg_destroy(&a->img);
    ml_spool_destroy(&a->spool);
    ml_astore_destroy(&a->store);
    ml_keyring_destroy(&a->keys);
    ml_tls_ctx_destroy(&a->tls);
    if (a->zctx)
        zmq_ctx_term(a->zctx);
    free(a->node_id);
    free(a->outbox_dir);
    free(a);
    *self_p = NULL;
}

int ml_agent_new(uv_loop_t *loop, const ml_aconfig_t *cfg, ml_agent_t **out, char *err,
                 size_t errlen)
{
    int rc = ML_ENOMEM;
    char path[4096];
    ml_agent_t *a = calloc(1, sizeof *a);
    if (!a) {
        snprintf(err, errlen, "out of memory");
        return ML_ENOMEM;
    }
    a->loop = loop;
    a->scan_ms = cfg->scan_ms;
    a->window = cfg->send_window;
    a->window_bytes = cfg->send_window_bytes ? cfg->send_window_bytes : 8u * 1024 * 1024;
    a->node_id = strdup(cfg->node_id);
    if (!a->node_id)
        goto nomem;
    snprintf(path, sizeof path, "%s/outbox", cfg->spool_dir);
    if (!(a->outbox_dir = strdup(path)))
        goto nomem;

    if (ml_mkdirs(cfg->data_dir) < 0) {
        snprintf(err, errlen, "cannot create data_dir %s: %s", cfg->data_dir, strerror(errno));
        rc = ML_EIO;
        goto out;
    }
    snprintf(path, sizeof path, "%s/agent.db", cfg->data_dir);
    if (cfg->store_key) {
        if ((rc = ml_keyring_load(cfg->store_key, (const char *const *)cfg->store_old_keys,
                                  cfg->n_store_old_keys, &a->keys, err, errlen)) < 0) {
            rc = ML_ECONFIG;
            goto out;
        }
        ml_log(ML_LOG_INFO, S_LOG,
               "payloads in %s are sealed with AES-256-GCM under key %s (%s; %zu older key(s))",
               path, ml_keyring_current_id(a->keys), cfg->store_key, ml_keyring_count(a->keys) - 1);
    } else {
        ml_log(ML_LOG_WARN, S_LOG,
               "no store_key: message payloads (patient data) are stored in clear in %s; set "
               "store_key in [agent] (docs/operations.md, Encryption at rest)",
               path);
    }
    if ((rc = ml_astore_open_sealed(path, a->keys, &a->store, err, errlen)) < 0)
        goto out;
    ml_spool_config_t scfg = {cfg->spool_dir, cfg->node_id, cfg->max_record, a->store};
    if ((rc = ml_spool_new(&scfg, &a->spool, err, errlen)) < 0)
        goto out;
    ml_aimg_config_t icfg = {.data_dir = cfg->data_dir,
                             .node_id = cfg->node_id,
                             .chunk_size = cfg->chunk_size,
                             .max_record = cfg->max_record,
                             .store = a->store,
                             .spool = a->spool,
                             .loop = loop,
                             .wake = s_wake_cb,
                             .arg = a,
                             .resend_window_s = cfg->resend_window_s,
                             .incoming_expire_s = cfg->incoming_expire_s};
    if ((rc = ml_aimg_new(&icfg, &a->img, err, errlen)) < 0)
        goto out;
    ml_inbox_config_t bcfg = {.store = a->store,
                              .spool = a->spool,
                              .send_ack = s_send_ack,
                              .send_refusal = s_send_refusal,
                              .arg = a};
    ml_inbox_plugin_t plugin;
    ml_aimg_inbox_plugin(a->img, &plugin);
    if (ml_inbox_new(&bcfg, &a->inbox) < 0 || ml_inbox_add_plugin(a->inbox, &plugin) < 0)
        goto nomem;
    /* Imaging first: it clears leftovers in blobs/ that a consult staged
     * again by the spool's recovery must not find. */
    if ((rc = ml_aimg_recover(a->img)) < 0) {
        snprintf(err, errlen, "cannot recover imaging transfers: %s", ml_astore_errmsg(a->store));
        goto out;
    }
    if ((rc = ml_spool_recover(a->spool)) < 0) {
        snprintf(err, errlen, "cannot recover the spool: %s", ml_astore_errmsg(a->store));
        goto out;
    }

    ml_tls_config_t tcfg = {cfg->ca, cfg->cert, cfg->key, NULL, 0};
    if ((rc = ml_tls_ctx_new(&tcfg, &a->tls, err, errlen)) < 0)
        goto out;
    const char *cn = ml_tls_ctx_own_id(a->tls);
    if (cn && strcmp(cn, cfg->node_id) != 0) {
        snprintf(err, errlen, "certificate %s is for %s, but node_id is %s", cfg->cert, cn,
                 cfg->node_id);
        rc = ML_ECONFIG;
        goto out;
    }

    if (!(a->zctx = zmq_ctx_new()))
        goto nomem;
    /* Sockets default to linger 0, so shutdown never waits on a broker
     * that is gone: unsent records are resent by the next run anyway. */
    zmq_ctx_set(a->zctx, ZMQ_BLOCKY, 0);

    ml_channel_config_t ccfg = {0};
    ccfg.endpoint = cfg->broker;
    ccfg.tls = a->tls;
    ccfg.node_id = cfg->node_id;
    ccfg.broker_id = cfg->broker_id;
    if (!cfg->broker_id)
        ml_log(ML_LOG_WARN, S_LOG,
               "broker_id is not set: any certificate of the community CA would be taken for "
               "the broker; set broker_id in [agent]");
    ccfg.software = S_SOFTWARE;
    ccfg.heartbeat_ms = cfg->heartbeat_ms;
    ccfg.max_record = cfg->max_record;
    ccfg.deliveries = 1;
    ccfg.on_envelope = s_on_envelope;
    ccfg.on_state = s_on_state;
    ccfg.on_fatal = s_on_fatal;
    ccfg.arg = a;
    if ((rc = ml_channel_new(loop, a->zctx, &ccfg, &a->ch)) < 0) {
        snprintf(err, errlen, "cannot start the channel to %s: %s", cfg->broker, ml_strerror(rc));
        goto out;
    }
    /* The loop handles come last so that every failure above can free
     * the agent at once, with no close callbacks to wait for. */
    uv_timer_init(loop, &a->scan_timer);
    uv_timer_init(loop, &a->pump_timer);
    uv_check_init(loop, &a->check);
    uv_timer_init(loop, &a->retention_timer);
    a->scan_timer.data = a->pump_timer.data = a->check.data = a->retention_timer.data = a;
    a->handles_open = 4;
    a->retention_ms = cfg->retention_ms;
    a->sent_retention_ms = cfg->sent_retention_ms;
    if (uv_fs_event_init(loop, &a->fs_event) == 0) {
        a->fs_event.data = a;
        a->handles_open++;
        a->fs_event_on = 1;
        if (uv_fs_event_start(&a->fs_event, s_fs_event_cb, a->outbox_dir, 0) != 0)
            /* Not fatal: the periodic scan still finds every file. */
            ml_log(ML_LOG_WARN, S_LOG, "cannot watch %s; scanning every %u ms only", a->outbox_dir,
                   a->scan_ms);
    }
    uv_check_start(&a->check, s_check_cb);
    uv_timer_start(&a->scan_timer, s_scan_timer_cb, 0, a->scan_ms);
    uv_timer_start(&a->retention_timer, s_retention_timer_cb, (uint64_t)cfg->retention_interval_ms,
                   (uint64_t)cfg->retention_interval_ms);
    /* Consults the recovery found in pending/ are staged from now on. */
    ml_aimg_start(a->img);

    ml_log(ML_LOG_INFO, S_LOG, "%s started: node %s, broker %s, spool %s", S_SOFTWARE, cfg->node_id,
           cfg->broker, cfg->spool_dir);
    *out = a;
    return 0;
nomem:
    snprintf(err, errlen, "out of memory");
    rc = ML_ENOMEM;
out:
    ml_agent_destroy(&a);
    return rc;
}
