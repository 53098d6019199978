/* Delivery: the node table (lookup by id or index), each node's queue and
 * in-flight window, and the pump that hands queued messages to the node's
 * delivering session (from the in-memory copy when there is one, else read
 * back from the store). Acks and refusals take their slot out of the window
 * here (ml_delivery_take); what they mean for the case is the caller's. A
 * message that can never go becomes a dead letter through
 * b->hooks.dead_letter (notices.c). Loop thread only. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker_int.h"
#include "delivery.h"
#include "wire.h"

void ml_delivery_cache_release(ml_broker_t *b, uint8_t **blob, uint32_t size)
{
    if (*blob) {
        free(*blob);
        *blob = NULL;
        b->cache_bytes -= size;
    }
}

/* ------------------------------------------------------------------ */
/* Delivery                                                            */

ml_nodestate_t *ml_delivery_node(ml_broker_t *b, const char *id)
{
    for (size_t i = 0; i < b->n_nodes; i++) {
        if (!b->nodes[i]->removed && strcmp(b->nodes[i]->node->id, id) == 0)
            return b->nodes[i];
    }
    return NULL;
}

/* Puts every in-flight message of ns back at the head of its queue, in the
 * original order, so the next delivering session gets them first. */
void ml_delivery_requeue(ml_nodestate_t *ns)
{
    for (size_t i = ns->if_head + ns->if_len; i > ns->if_head; i--) {
        if (!ns->inflight[i - 1].acked)
            ml_queue_push_front(&ns->queue, &ns->inflight[i - 1].item);
    }
    ns->if_head = ns->if_len = ns->n_inflight = 0;
}

/* Appends a slot for a new delivery. Returns it, or NULL out of memory. */
ml_inflight_t *ml_delivery_inflight_add(ml_nodestate_t *ns)
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

uint32_t ml_delivery_node_index(const ml_broker_t *b, const ml_nodestate_t *ns)
{
    return ns->index;
}

/* 1 while an item's own deadline has not passed. */
static int s_expired(const ml_qitem_t *it, int64_t now)
{
    return it->deadline > 0 && it->deadline <= now;
}

void ml_delivery_pump(ml_broker_t *b, ml_nodestate_t *ns)
{
    ml_session_t *s = ns->deliver;
    if (!s || s->state != S_READY)
        return;
    size_t window = (size_t)b->cfg->delivery_window;
    int64_t now = ml_now_ms();
    while (ns->n_inflight < window && ml_wire_room(b, s)) {
        ml_qitem_t it;
        if (!ml_queue_pop(&ns->queue, &it))
            break;
        /* Nothing is dropped silently: a message past its own deadline, or
         * one its recipient never acknowledged in max_delivery_attempts
         * tries, becomes a dead letter that ops staff can see and replay. */
        if (s_expired(&it, now)) {
            b->hooks.dead_letter(b, ns, &it,
                                 "expired: its deadline passed before it was delivered");
            continue;
        }
        if (it.attempts >= b->cfg->max_delivery_attempts) {
            char why[160];
            snprintf(why, sizeof why,
                     "undeliverable: %u delivery attempts without an acknowledgement",
                     (unsigned)it.attempts);
            b->hooks.dead_letter(b, ns, &it, why);
            continue;
        }
        uint8_t *blob = it.blob;
        size_t len = it.size;
        int rc = blob ? 0 : ml_store_fetch(b->store, it.seq, &blob, &len);
        if (rc == ML_EPROTO || rc == ML_ECONFIG) {
            /* It will never read: a dead letter (replayable once the key
             * is back in the config), not a queue stuck behind it. */
            b->hooks.dead_letter(b, ns, &it,
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
        ml_inflight_t *f = ml_delivery_inflight_add(ns);
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
        rc = ml_wire_append(b, s, blob, len);
        if (it.blob)
            ml_delivery_cache_release(b, &it.blob, it.size);
        else
            free(blob);
        if (rc != 0 || ns->deliver != s)
            break; /* the session closed under us; its close requeued */
    }
}

/* Takes the in-flight slot of msg_id out of ns's window (for an ack or a
 * refusal). Returns 1 with *out filled, or 0 when it is not in flight. */
int ml_delivery_take(ml_nodestate_t *ns, const char *msg_id, ml_qitem_t *out)
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

#define S_NO_NODE UINT32_MAX

/* ------------------------------------------------------------------ */
/* Cases in memory                                                     */

ml_nodestate_t *ml_delivery_node_at(ml_broker_t *b, uint32_t idx)
{
    return idx < b->n_nodes && !b->nodes[idx]->removed ? b->nodes[idx] : NULL;
}

const char *ml_delivery_node_name(ml_broker_t *b, uint32_t idx)
{
    ml_nodestate_t *ns = ml_delivery_node_at(b, idx);
    return ns ? ns->node->id : "";
}

uint32_t ml_delivery_node_idx(ml_broker_t *b, const char *id)
{
    ml_nodestate_t *ns = id && *id ? ml_delivery_node(b, id) : NULL;
    return ns ? ml_delivery_node_index(b, ns) : S_NO_NODE;
}

/* Deliveries not acknowledged within ack_timeout_ms go back to the head of
 * their queue and are sent again (recipients drop duplicates by id).
 * O(nodes). */
void ml_delivery_tick(ml_broker_t *b, int64_t now)
{
    for (size_t i = 0; i < b->n_nodes; i++) {
        ml_nodestate_t *ns = b->nodes[i];
        ml_inflight_t *oldest = s_inflight_oldest(ns);
        if (oldest && now - oldest->sent_at > b->cfg->ack_timeout_ms) {
            ml_log(ML_LOG_WARN, "delivery",
                   "%s: no ack within %ld ms for %zu message(s); "
                   "resending",
                   ns->node->id, b->cfg->ack_timeout_ms, ns->n_inflight);
            ml_delivery_requeue(ns);
            ml_delivery_pump(b, ns);
        }
    }
}
