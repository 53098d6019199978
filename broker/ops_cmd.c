/* The ops modules' commands (see ops_cmd.h): the only ops file besides
 * query.c that sees broker_int.h. A replay builds the queue item and pumps
 * the recipient here, not in admin.c, so that when delivery gets its own
 * module (ml_delivery_enqueue) this is the one place that changes. Loop
 * thread only. */
#include "ops_cmd.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker_int.h"
#include "metrics.h"
#include "query.h"

int ml_ops_reply(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env)
{
    return ml_bk_reply(b, s, env);
}

void ml_ops_refuse(ml_broker_t *b, ml_session_t *s, const char *msg_id, int code,
                   const char *reason)
{
    ml_bk_refuse(b, s, msg_id, code, reason);
}

int ml_ops_escalate(ml_broker_t *b, Medlink__V1__Escalation *esc)
{
    int sent = 0;
    for (size_t i = 0; i < b->n_nodes; i++) {
        ml_nodestate_t *ns = b->nodes[i];
        if (ns->removed || !ml_bk_is_ops(b, ns))
            continue;
        /* A fresh envelope each: ml_bk_emit gives each copy its own id. */
        ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
        env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ESCALATION;
        env.escalation = esc;
        env.case_id = esc->case_id;
        env.priority = MEDLINK__V1__PRIORITY__PRIORITY_URGENT;
        if (ml_bk_emit(b, &env, ns, NULL, NULL, 0) == 0)
            sent++;
    }
    return sent;
}

/* ---- dead letters ------------------------------------------------------- */

/* A replay or purge whose store change is queued but not yet committed:
 * the answer waits for it (ml_store_barrier), so that once medlinkctl has
 * it, a list or a second request sees the change; and while it waits, the
 * dead letters it names are "busy": a purge of a message being replayed (or
 * the reverse) is refused with a reason instead of being answered as done
 * and then matching no row. */
struct ml_dlq_wait {
    struct ml_dlq_wait *next;
    ml_broker_t *b;
    ml_ops_dlq_cb done;
    void *arg;
    char *error; /* --all: the last one that could not be done; or NULL */
    uint32_t affected;
    int failed_all; /* a single message that could not be done */
    int64_t *seqs;  /* the dead letters it changes */
    size_t n_seqs;
};

int ml_ops_dlq_busy(const ml_broker_t *b, int64_t seq)
{
    for (const struct ml_dlq_wait *w = b->dlq_waits; w; w = w->next)
        for (size_t i = 0; i < w->n_seqs; i++)
            if (w->seqs[i] == seq)
                return 1;
    return 0;
}

static void s_wait_free(struct ml_dlq_wait *w)
{
    if (!w)
        return;
    free(w->error);
    free(w->seqs);
    free(w);
}

void ml_ops_free(ml_broker_t *b)
{
    while (b->dlq_waits) {
        struct ml_dlq_wait *w = b->dlq_waits;
        b->dlq_waits = w->next;
        w->done(w->arg, NULL);
        s_wait_free(w);
    }
}

void ml_ops_dead_letter_read(ml_broker_t *b, const char *who, const ml_store_dead_t *d)
{
    ml_case_t *c = ml_bk_case_for_row(b, d->case_id, d->kind);
    if (!c)
        return;
    char detail[300];
    snprintf(detail, sizeof detail,
             "%s read the stored envelope of dead letter %s (%s) with medlinkctl dlq show", who,
             d->id, ml_kind_name(d->kind));
    ml_bk_case_event(b, c, who, "dead letter read", d->id, d->kind, detail);
    ml_bk_case_release(b, c);
}

/* Replays or purges one dead letter (queued to the store in order).
 * Returns 0, or an error sentence in err. */
static int s_apply(ml_broker_t *b, const char *who, const ml_store_dead_t *d, int replay, char *err,
                   size_t errlen)
{
    if (ml_ops_dlq_busy(b, d->seq)) {
        snprintf(err, errlen,
                 "not %s: dead letter %s is being replayed or purged by an earlier request",
                 replay ? "replayed" : "purged", d->id);
        return ML_EAGAIN;
    }
    if (!replay) {
        if (ml_store_purge(b->store, d->seq) != 0) {
            snprintf(err, errlen, "cannot purge %s: the store is closing", d->id);
            return ML_ESTORE;
        }
        ml_log(ML_LOG_INFO, "admin", "%s purged dead letter %s (%s for %s)", who, d->id,
               ml_kind_name(d->kind), d->recipient);
        return 0;
    }
    ml_nodestate_t *ns = ml_bk_node(b, d->recipient);
    if (!ns) {
        snprintf(err, errlen,
                 "cannot replay %s: its recipient %s is not in the node registry; register it "
                 "first",
                 d->id, d->recipient);
        return ML_ENOTFOUND;
    }
    if (ml_store_replay(b->store, d->seq) != 0) {
        snprintf(err, errlen, "cannot replay %s: the store is closing", d->id);
        return ML_ESTORE;
    }
    ml_qitem_t it;
    memset(&it, 0, sizeof it);
    it.seq = d->seq;
    it.accepted_at = ml_now_ms();
    it.size = (uint32_t)d->size;
    it.priority = (uint8_t)d->priority;
    it.kind = (uint8_t)d->kind;
    it.flags = strcmp(d->sender, b->cfg->broker_id) == 0 ? ML_QI_NOTICE : 0;
    snprintf(it.id, sizeof it.id, "%s", d->id);
    it.cs = ml_bk_case_for_row(b, d->case_id, d->kind);
    if (it.cs) {
        char detail[300];
        snprintf(detail, sizeof detail, "%s %s replayed from the dead-letter queue by %s",
                 ml_kind_name(d->kind), d->id, who);
        ml_bk_case_event(b, it.cs, who, "replayed", d->id, d->kind, detail);
    }
    if (ml_queue_push(&ns->queue, &it) != 0) {
        ml_bk_case_release(b, it.cs);
        snprintf(err, errlen, "out of memory queueing %s; it is delivered after a restart", d->id);
        return ML_ENOMEM;
    }
    ml_log(ML_LOG_INFO, "admin", "%s replayed dead letter %s (%s for %s)", who, d->id,
           ml_kind_name(d->kind), d->recipient);
    ml_bk_pump(b, ns);
    return 0;
}

/* The store has tried everything queued before the barrier, the dead
 * letters' changes among them: the answer goes out now. */
static void s_done(void *arg, int rc, int64_t seq, int duplicate)
{
    struct ml_dlq_wait *w = arg;
    ml_broker_t *b = w->b;
    (void)seq;
    (void)duplicate;
    for (struct ml_dlq_wait **pp = &b->dlq_waits; *pp; pp = &(*pp)->next)
        if (*pp == w) {
            *pp = w->next;
            break;
        }
    ml_ops_dlq_result_t r = {
        .rc = rc, .affected = w->affected, .failed_all = w->failed_all, .error = w->error};
    w->done(w->arg, &r);
    s_wait_free(w);
}

/* Why a message that is not (or no longer) a dead letter cannot be
 * replayed or purged, in err. */
static void s_not_dead(ml_broker_t *b, const char *id, int replay, char *err, size_t errlen)
{
    int state = -1;
    int64_t seq = 0;
    const char *verb = replay ? "replayed" : "purged";
    if (ml_store_lookup(b->store, id, &seq, &state) != 0)
        snprintf(err, errlen, "no dead letter %s (no message has this id)", id);
    else if (state == ML_MSG_DELIVERED)
        snprintf(err, errlen,
                 "not %s: %s is not a dead letter; it was replayed and has been delivered", verb,
                 id);
    else if (state == ML_MSG_QUEUED)
        snprintf(err, errlen,
                 "not %s: %s is not a dead letter; it was replayed and is queued for delivery",
                 verb, id);
    else
        snprintf(err, errlen, "no dead letter %s", id);
}

int ml_ops_dlq_change(ml_broker_t *b, const char *who, const char *message_id, int all, int replay,
                      char *err, size_t errlen, ml_ops_dlq_cb done, void *arg)
{
    ml_query_deads_t k;
    int rc = ml_query_dlq(b, all ? NULL : message_id, -1, &k);
    if (rc == ML_ENOTFOUND) {
        /* Said plainly, with affected = 0: a purge that finds a message
         * replayed meanwhile did not purge it. */
        s_not_dead(b, message_id, replay, err, errlen);
        return rc;
    }
    if (rc != 0) {
        snprintf(err, errlen, "cannot read the dead-letter queue: %s", ml_strerror(rc));
        return rc;
    }
    struct ml_dlq_wait *w = calloc(1, sizeof *w);
    int64_t *seqs = calloc(k.n ? k.n : 1, sizeof *seqs);
    if (!w || !seqs) {
        free(w);
        free(seqs);
        snprintf(err, errlen, "out of memory");
        ml_query_deads_free(&k);
        return ML_ENOMEM;
    }
    char why[512] = "";
    uint32_t n_done = 0;
    for (size_t i = 0; i < k.n; i++) {
        if (s_apply(b, who, &k.items[i], replay, why, sizeof why) == 0) {
            n_done++;
            seqs[w->n_seqs++] = k.items[i].seq;
        } else if (!all) {
            break;
        }
    }
    ml_bk_metrics_dead_gone(b, n_done);
    w->b = b;
    w->done = done;
    w->arg = arg;
    w->seqs = seqs;
    w->affected = n_done;
    w->failed_all = !all && n_done == 0;
    w->error = why[0] ? strdup(why) : NULL;
    w->next = b->dlq_waits;
    b->dlq_waits = w;
    if (w->n_seqs == 0 || ml_store_barrier(b->store, s_done, w) != 0) {
        /* Nothing queued, or a store that is closing: answer now. */
        w->n_seqs = 0;
        s_done(w, 0, 0, 0);
    }
    ml_query_deads_free(&k);
    return 0;
}

/* ---- the store ---------------------------------------------------------- */

int ml_ops_store_prune(ml_broker_t *b, ml_store_prune_cb cb, void *arg)
{
    return ml_store_prune(b->store, cb, arg);
}
