/* Submit: a message on its way to the store and what happens when the
 * store answers. The sender gets Accepted (or a Nack) from the commit
 * callback; a committed message joins its recipient's queue or, when the
 * recipient is connected and idle, goes out at once from the copy held
 * here; the case work of the put is settled (caseref.c) and the actions
 * that follow a commit (a forward, a notice) are handed up through
 * b->hooks.after_commit. The broker's own messages a full store refused
 * are kept and stored again (retry_own). Loop thread only. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker_int.h"
#include "caseref.h"
#include "delivery.h"
#include "metrics.h"
#include "submit.h"
#include "verdict.h"
#include "wire.h"

#define K_(x) MEDLINK__V1__KIND__KIND_##x

/* A put with case work settled (rc as from the store); releases the put's
 * references. */
static void s_committed(ml_broker_t *b, ml_put_t *p, int rc, int duplicate);

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

/* What the store's refusal rc of a put means for its sender. Pure. */
static void s_store_verdict(int rc, ml_verdict_t *v)
{
    if (rc == ML_EFULL)
        ml_verdict_set(v, MEDLINK__V1__NACK_CODE__NACK_STORE_FULL,
                       "store full: the broker cannot accept new messages until space is freed");
    else if (rc == ML_EDENIED)
        ml_verdict_set(v, MEDLINK__V1__NACK_CODE__NACK_CONFLICT,
                       "the case changed while this message was being stored; retry");
    else if (rc == ML_EDUP)
        ml_verdict_set(v, MEDLINK__V1__NACK_CODE__NACK_INVALID,
                       "case_id is already in use by another case; a new case needs a new "
                       "case_id");
    else if (rc == ML_EIDUSED)
        ml_verdict_set(v, MEDLINK__V1__NACK_CODE__NACK_ID_IN_USE,
                       "message id is already used by a different message (another sender's, "
                       "or other content); a new message needs a new id");
    else
        ml_verdict_set(v, MEDLINK__V1__NACK_CODE__NACK_STORE,
                       "store error: the message was not stored, retry later");
}

static void s_put_done(void *arg, int rc, int64_t seq, int duplicate)
{
    ml_put_t *p = arg;
    ml_broker_t *b = p->b;
    ml_session_t *s = p->session;
    b->puts_pending--;
    b->puts_pending_bytes -= p->size;
    if (!p->own && b->credit.session_puts > 0)
        b->credit.session_puts--;
    s_put_unlink(p);
    if (s && !s->puts && p->head == &s->puts && b->credit.n_waiting > 0)
        b->credit.n_waiting--;
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
                ns->n_inflight < (size_t)b->cfg->delivery_window && ml_wire_room(b, ds)) {
                ml_inflight_t *f = ml_delivery_inflight_add(ns);
                if (f) {
                    it.attempts = 1;
                    f->item = it;
                    f->sent_at = ml_mono_ms();
                    ml_wire_append(b, ds, p->blob, p->size);
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
                ml_delivery_cache_release(b, &it.blob, it.size);
                if (it.cs)
                    ml_caseref_release(b, it.cs);
            }
            ml_delivery_pump(b, p->recipient);
        }
    answered:
        if (s && s->state == S_READY) {
            /* Every Accepted restates the sender's window (ml_wire_credit). */
            uint32_t cm;
            uint64_t cb;
            ml_submit_credit(b, s, &cm, &cb);
            ml_wire_credit(s, ml_submit_credit_grow(s->credit_msgs, cm), cb);
            ml_wire_accepted(b, s, p->id, duplicate);
        }
    } else if (s && s->state == S_READY) {
        /* The refusal is of this put's message (the kind it counts
         * under); the session reads no record meanwhile (session.c, s_record). */
        s->rx_kind = p->kind;
        /* A message to a service is held under the node it went to too. */
        if (rc != ML_EDUP && rc != ML_EIDUSED && p->kind != MEDLINK__V1__KIND__KIND_IMAGING_CHUNK &&
            strcmp(p->to, p->recipient->node->id) != 0)
            ml_wire_hold_also(s, p->recipient->node->id, p->id);
        ml_verdict_t v;
        s_store_verdict(rc, &v);
        ml_wire_refuse_verdict(b, s, p->id, p->to, &v);
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
        s_committed(b, p, rc, duplicate);
    ml_delivery_cache_release(b, &p->blob, p->size);
    free(p);
}

int ml_submit_put(ml_broker_t *b, const ml_bk_msg_t *m)
{
    if (m->session) {
        /* A refused sender is an active one too: its share stays counted. */
        ml_submit_credit_note(b, m->session, (int64_t)uv_now(b->loop));
        if (ml_submit_backlog_full(b)) {
            ml_bk_metrics_refused_reason(b, ML_BK_REFUSED_BACKLOG);
            return ML_EAGAIN;
        }
    }
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
        ml_delivery_cache_release(b, &p->blob, p->size);
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
        ml_caseref_pending(p->cs);
        ml_caseref_pending(p->linked);
    }
    b->puts_pending++;
    b->puts_pending_bytes += p->size;
    ml_put_t **head = m->session ? &m->session->puts : &b->orphans;
    if (m->session && !*head)
        b->credit.n_waiting++;
    if (m->session)
        b->credit.session_puts++;
    p->head = head;
    p->next = *head;
    if (*head)
        (*head)->prev = p;
    *head = p;
    return 0;
}

void ml_submit_retry_own(ml_broker_t *b)
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
            if (ml_submit_put(b, &m) != 0) {
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
        ml_caseref_release(b, p->cs); /* the new put holds its own reference */
        ml_caseref_release(b, p->linked);
        ml_delivery_cache_release(b, &p->blob, p->size);
        free(p);
        p = next;
    }
}

/* ------------------------------------------------------------------ */
/* Lifecycle                                                           */

static void s_load_pending(void *arg, const ml_store_row_t *row)
{
    ml_broker_t *b = arg;
    ml_nodestate_t *ns = ml_delivery_node(b, row->recipient);
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
    it.cs = ml_caseref_for_row(b, row->case_id, row->kind);
    if (ml_queue_push(&ns->queue, &it) != 0 && it.cs)
        ml_caseref_release(b, it.cs);
}

/* Is a message with this id already stored, or on its way to the store?
 * Asked only when a message would be refused: an agent that resends after
 * a reconnect must get Accepted (as a duplicate), not a refusal for a step
 * its first copy already made. */
int ml_submit_known_id(ml_broker_t *b, ml_session_t *s, const char *id)
{
    if (ml_store_lookup(b->store, id, NULL, NULL) == 0)
        return 1;
    ml_put_t *lists[] = {b->orphans, s ? s->puts : NULL};
    for (size_t i = 0; i < 2; i++)
        for (ml_put_t *p = lists[i]; p; p = p->next)
            if (strcmp(p->id, id) == 0)
                return 1;
    return 0;
}

static void s_committed(ml_broker_t *b, ml_put_t *p, int rc, int duplicate)
{
    ml_case_t *c = p->cs, *lc = p->linked;
    /* The opening is stored: the case is this one (see s_resync). */
    if (c && c->unstored && rc == 0 && !duplicate && strcmp(p->id, c->opening_id) == 0)
        c->unstored = 0;
    if (p->has_ops) {
        /* A failure, or a resend whose first copy made the change already
         * (an opening sent again after its case left memory, say): memory
         * follows the store. (A chunk the broker had already only moved the
         * version on, as memory did; its count is taken back below.) */
        int failed = rc != 0 || (duplicate && p->kind != K_(IMAGING_CHUNK));
        /* An id in use is the sender's mistake, refused (and logged
         * within its node's budget) like any other. */
        if (rc != 0)
            ml_log(rc == ML_EIDUSED ? ML_LOG_DEBUG : ML_LOG_WARN, "cases",
                   "case %s: change with message %s not stored (%s); reloading", c ? c->id : "-",
                   p->id, ml_strerror(rc));
        ml_caseref_settle(b, c, failed);
        ml_caseref_settle(b, lc, failed);
    }
    if (rc == 0 && duplicate && c && p->kind == K_(IMAGING_CHUNK)) {
        /* A chunk the broker already had: it does not count twice. */
        if (c->chunks > 0)
            c->chunks--;
        uint64_t n = (uint64_t)p->chunk_bytes;
        c->chunk_bytes -= c->chunk_bytes >= n ? n : c->chunk_bytes;
        c->dup_chunks++;
        c->unsaved = 1; /* the store did not write the row of a duplicate */
    } else if (rc == 0 && !duplicate) {
        if (p->action != ML_BK_AFTER_NONE && c)
            b->hooks.after_commit(b, p->action, c, lc);
    }
    ml_caseref_release(b, c);
    ml_caseref_release(b, lc);
}

static void s_load_pending(void *arg, const ml_store_row_t *row);

int ml_submit_load_pending(ml_broker_t *b)
{
    return ml_store_scan_pending(b->store, s_load_pending, b);
}

void ml_submit_orphan(ml_broker_t *b, ml_session_t *s)
{
    ml_submit_credit_forget(b, s, b->loop ? (int64_t)uv_now(b->loop) : 0);
    if (s->puts && b->credit.n_waiting > 0)
        b->credit.n_waiting--;
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
}

void ml_submit_free(ml_broker_t *b)
{
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
}

/* ------------------------------------------------------------------ */
/* Credit                                                              */

/* The active senders are counted per second (uv_now / 1000): n_cur
 * sessions last sent in the current second, n_prev in the one before; a
 * session's credit_seen (second + 1) says which count holds it, so that
 * moving it or taking it out is O(1) and no list is scanned. */
static void s_credit_roll(ml_broker_t *b, int64_t epoch)
{
    if (epoch <= b->credit.epoch)
        return; /* uv_now is monotonic; an earlier time changes nothing */
    if (epoch == b->credit.epoch + 1) {
        b->credit.n_prev = b->credit.n_cur;
    } else {
        b->credit.n_prev = 0;
    }
    b->credit.n_cur = 0;
    b->credit.epoch = epoch;
}

static int64_t s_epoch(int64_t now_ms)
{
    return now_ms / 1000;
}

void ml_submit_credit_share(uint64_t budget_msgs, uint64_t budget_bytes, uint64_t active,
                            uint64_t max_credit, uint64_t max_record, uint32_t *msgs,
                            uint64_t *bytes)
{
    uint64_t a = active ? active : 1;
    uint64_t m = budget_msgs / a;
    if (m > max_credit)
        m = max_credit;
    if (m > UINT32_MAX)
        m = UINT32_MAX;
    *msgs = m ? (uint32_t)m : 1;
    uint64_t by = budget_bytes / a;
    *bytes = by < max_record ? max_record : by;
}

uint32_t ml_submit_credit_grow(uint32_t prev, uint32_t share)
{
    uint64_t cap = 2 * (uint64_t)(prev ? prev : ML_SUBMIT_CREDIT_WELCOME);
    return share > cap ? (uint32_t)cap : share;
}

void ml_submit_credit_note(ml_broker_t *b, ml_session_t *s, int64_t now_ms)
{
    int64_t e = s_epoch(now_ms);
    s_credit_roll(b, e);
    if (s->credit_seen == e + 1)
        return;
    if (s->credit_seen == e && b->credit.n_prev > 0)
        b->credit.n_prev--; /* it was counted in the second before (seen = e - 1) */
    b->credit.n_cur++;
    s->credit_seen = e + 1;
}

void ml_submit_credit_forget(ml_broker_t *b, ml_session_t *s, int64_t now_ms)
{
    int64_t e = s_epoch(now_ms);
    s_credit_roll(b, e);
    if (s->credit_seen == e + 1 && b->credit.n_cur > 0)
        b->credit.n_cur--;
    else if (s->credit_seen == e && b->credit.n_prev > 0)
        b->credit.n_prev--;
    s->credit_seen = 0;
}

uint64_t ml_submit_credit_active(ml_broker_t *b, int64_t now_ms)
{
    s_credit_roll(b, s_epoch(now_ms));
    uint64_t recent = (uint64_t)b->credit.n_cur + b->credit.n_prev;
    return recent > b->credit.n_waiting ? recent : b->credit.n_waiting;
}

void ml_submit_credit_at(ml_broker_t *b, const ml_session_t *s, int64_t now_ms, uint32_t *msgs,
                         uint64_t *bytes)
{
    int64_t e = s_epoch(now_ms);
    uint64_t a = ml_submit_credit_active(b, now_ms);
    /* A session about to send (its Welcome, say) takes a share as well. */
    if (!s || (s->credit_seen != e + 1 && s->credit_seen != e))
        a++;
    ml_submit_credit_share((uint64_t)b->cfg->store_backlog, (uint64_t)b->cfg->store_backlog_bytes,
                           a, (uint64_t)b->cfg->max_credit, (uint64_t)b->cfg->max_record, msgs,
                           bytes);
}

void ml_submit_credit(ml_broker_t *b, const ml_session_t *s, uint32_t *msgs, uint64_t *bytes)
{
    ml_submit_credit_at(b, s, (int64_t)uv_now(b->loop), msgs, bytes);
}

int ml_submit_backlog_full(const ml_broker_t *b)
{
    /* The broker's own notices (DELIVERED, forwards) are not refused and
     * no window bounds them, so they do not count against the senders. */
    return b->credit.session_puts >= 2 * (uint64_t)b->cfg->store_backlog ||
           b->puts_pending_bytes >= 2 * (uint64_t)b->cfg->store_backlog_bytes;
}
