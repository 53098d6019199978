/* The agent's receive batch (inbox.h): deliveries kept packed until the
 * end of the loop iteration, then stored in one transaction with the
 * plug-ins' work and acknowledged. Moved here from agent.c (the batching)
 * and imaging.c (the transaction, which it owned for every delivery), so
 * that the agent, the imaging receiver and the fuzzer share one copy. */
#include "inbox.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ml_common.h"
#include "ml_text.h"

#define S_LOG "agent"
/* Ids per Ack: keeps the record well under max_record. */
#define S_ACK_IDS 4096

/* A delivery waiting for the batch's transaction. */
typedef struct {
    char *id;
    char *case_id;
    char *sender;
    int kind;
    uint8_t *blob;
    size_t len;
} s_rx_t;

struct ml_inbox {
    ml_astore_t *store;
    ml_spool_t *spool;
    void (*send_ack)(void *arg, char **ids, size_t n);
    void (*send_refusal)(void *arg, const char *id, const char *why);
    void *arg;

    ml_inbox_plugin_t plugins[ML_INBOX_PLUGINS_MAX];
    size_t n_plugins;
    uint64_t taken_mask; /* the union of the plug-ins' kind_mask */

    s_rx_t *rx;
    size_t n_rx, cap_rx;
};

/* The mask bit of a kind; 0 for a value no mask can name (a peer's
 * envelope may carry any number there). */
static uint64_t s_bit(int kind)
{
    return kind >= 0 && kind < 64 ? ML_INBOX_KIND(kind) : 0;
}

static void s_rx_clear(s_rx_t *r)
{
    free(r->id);
    free(r->case_id);
    free(r->sender);
    free(r->blob);
}

int ml_inbox_new(const ml_inbox_config_t *cfg, ml_inbox_t **out)
{
    ml_inbox_t *ib = calloc(1, sizeof *ib);
    if (!ib)
        return ML_ENOMEM;
    ib->store = cfg->store;
    ib->spool = cfg->spool;
    ib->send_ack = cfg->send_ack;
    ib->send_refusal = cfg->send_refusal;
    ib->arg = cfg->arg;
    *out = ib;
    return 0;
}

void ml_inbox_destroy(ml_inbox_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    ml_inbox_t *ib = *self_p;
    ml_inbox_discard(ib);
    free(ib->rx);
    free(ib);
    *self_p = NULL;
}

int ml_inbox_add_plugin(ml_inbox_t *ib, const ml_inbox_plugin_t *p)
{
    if (ib->n_plugins == ML_INBOX_PLUGINS_MAX || (ib->taken_mask & p->kind_mask) != 0)
        return ML_EINVAL;
    ib->plugins[ib->n_plugins++] = *p;
    ib->taken_mask |= p->kind_mask;
    return 0;
}

void ml_inbox_remove_plugins(ml_inbox_t *ib, void *arg)
{
    if (!ib)
        return;
    size_t k = 0;
    ib->taken_mask = 0;
    for (size_t i = 0; i < ib->n_plugins; i++) {
        if (ib->plugins[i].arg == arg)
            continue;
        ib->plugins[k++] = ib->plugins[i];
        ib->taken_mask |= ib->plugins[i].kind_mask;
    }
    ib->n_plugins = k;
}

/* 0 when a delivery can be spooled: its strings are UTF-8 (the inbox file
 * is JSON) and its ids are ids (they name files and rows). Else -1 with why
 * naming the field, never quoting its value. A broker checks all of this
 * before it accepts a message; this is for one that did not (F6). */
static int s_spoolable(const ml_envelope_t *env, char *why, size_t len)
{
    if (ml_env_check_text(&env->base, why, len) < 0)
        return -1;
    if (!ml_ulid_valid(env->id)) {
        snprintf(why, len, "id is not a ULID");
        return -1;
    }
    if (env->case_id && *env->case_id && !ml_text_id_valid(env->case_id, 0)) {
        snprintf(why, len, "case_id is not an id of [A-Za-z0-9._:@-], 1 to %d characters",
                 ML_TEXT_ID_MAX);
        return -1;
    }
    return 0;
}

int ml_inbox_push(ml_inbox_t *ib, const ml_envelope_t *env)
{
    if (!env->id || !*env->id) {
        ml_log(ML_LOG_WARN, S_LOG, "dropped a delivered %s without a message id",
               ml_kind_name(env->kind));
        return 1;
    }
    char why[512];
    if (s_spoolable(env, why, sizeof why) < 0) {
        /* Never acknowledged: an Ack would lose it, and a delivery that
         * cannot be written would come back for ever. */
        ml_log(ML_LOG_ERROR, S_LOG,
               "refused delivered %s %s from %s: %s (it becomes a dead letter at the broker)",
               ml_kind_name(env->kind), env->id, env->from ? env->from : "-", why);
        if (ib->send_refusal)
            ib->send_refusal(ib->arg, env->id, why);
        return 1;
    }
    if (ib->n_rx == ib->cap_rx) {
        size_t cap = ib->cap_rx ? ib->cap_rx * 2 : 64;
        s_rx_t *n = realloc(ib->rx, cap * sizeof *n);
        if (!n)
            goto nomem;
        ib->rx = n;
        ib->cap_rx = cap;
    }
    s_rx_t *r = &ib->rx[ib->n_rx];
    memset(r, 0, sizeof *r);
    r->id = strdup(env->id);
    r->case_id = strdup(env->case_id ? env->case_id : "");
    r->sender = strdup(env->from ? env->from : "");
    r->kind = env->kind;
    if (!r->id || !r->case_id || !r->sender || ml_env_pack(env, &r->blob, &r->len) < 0) {
        s_rx_clear(r);
        goto nomem;
    }
    ib->n_rx++;
    return 0;
nomem:
    /* Not stored, so not acked: the broker delivers it again. */
    ml_log(ML_LOG_ERROR, S_LOG, "out of memory receiving %s; it will be delivered again", env->id);
    return ML_ENOMEM;
}

size_t ml_inbox_pending(const ml_inbox_t *ib)
{
    return ib->n_rx;
}

void ml_inbox_discard(ml_inbox_t *ib)
{
    for (size_t i = 0; i < ib->n_rx; i++)
        s_rx_clear(&ib->rx[i]);
    ib->n_rx = 0;
}

int ml_inbox_receive(ml_inbox_t *ib, ml_spool_msg_t *msgs, size_t n, ml_spool_msg_t *taken,
                     size_t nt)
{
    int rc = 0;
    ml_spool_msg_t *sub = NULL;
    size_t *idx = NULL;
    if (n + nt == 0)
        return 0;
    for (size_t i = 0; i < nt; i++)
        taken[i].ack = 0;
    if (nt > 0 && (!(sub = malloc(nt * sizeof *sub)) || !(idx = malloc(nt * sizeof *idx)))) {
        free(sub);
        ml_log(ML_LOG_ERROR, S_LOG, "out of memory storing %zu delivered message(s)", n + nt);
        return ML_ENOMEM;
    }
    if ((rc = ml_astore_begin(ib->store)) < 0)
        goto failed;
    if ((rc = ml_spool_receive_tx(ib->spool, msgs, n)) < 0)
        goto rollback;
    for (size_t p = 0; p < ib->n_plugins; p++) {
        const ml_inbox_plugin_t *pl = &ib->plugins[p];
        size_t k = 0;
        for (size_t i = 0; i < nt; i++)
            if (pl->kind_mask & s_bit(taken[i].kind)) {
                sub[k] = taken[i];
                idx[k++] = i;
            }
        if (pl->on_batch && (rc = pl->on_batch(pl->arg, msgs, n, sub, k)) < 0)
            goto rollback;
        for (size_t j = 0; j < k; j++)
            taken[idx[j]].ack = sub[j].ack;
    }
    if ((rc = ml_astore_commit(ib->store)) < 0)
        goto failed;
    ml_spool_receive_done(ib->spool, msgs, n);
    for (size_t p = 0; p < ib->n_plugins; p++)
        if (ib->plugins[p].on_commit)
            ib->plugins[p].on_commit(ib->plugins[p].arg);
    free(sub);
    free(idx);
    return 0;
rollback:
    ml_astore_rollback(ib->store);
failed:
    ml_log(ML_LOG_ERROR, S_LOG, "cannot store %zu delivered message(s) and %zu chunk(s): %s", n, nt,
           ml_astore_errmsg(ib->store));
    for (size_t p = 0; p < ib->n_plugins; p++)
        if (ib->plugins[p].on_abort)
            ib->plugins[p].on_abort(ib->plugins[p].arg);
    for (size_t i = 0; i < nt; i++)
        taken[i].ack = 0;
    free(sub);
    free(idx);
    return ML_ESTORE;
}

int ml_inbox_flush(ml_inbox_t *ib)
{
    size_t total = ib->n_rx;
    if (total == 0)
        return 0;
    int rc = ML_ENOMEM;
    ml_spool_msg_t *m = calloc(total, sizeof *m);
    char **ids = malloc(total * sizeof *ids);
    if (!m || !ids) {
        ml_log(ML_LOG_ERROR, S_LOG, "out of memory storing %zu delivered message(s)", total);
        goto out;
    }
    /* The plug-ins' kinds (imaging chunks) apart from everything else,
     * which goes through the spool; both in one transaction. */
    size_t n = 0, nt = total;
    for (size_t i = 0; i < total; i++) {
        s_rx_t *r = &ib->rx[i];
        ml_spool_msg_t *x = (ib->taken_mask & s_bit(r->kind)) ? &m[--nt] : &m[n++];
        x->id = r->id;
        x->case_id = r->case_id;
        x->sender = r->sender;
        x->kind = r->kind;
        x->envelope = r->blob;
        x->envelope_len = r->len;
    }
    /* The taken ones were filled from the end: put them back in arrival
     * order. */
    for (size_t i = nt, j = total - 1; i < j; i++, j--) {
        ml_spool_msg_t t = m[i];
        m[i] = m[j];
        m[j] = t;
    }
    /* Ack only what is durably stored, duplicates included (the broker
     * needs the Ack to stop resending). */
    rc = ml_inbox_receive(ib, m, n, m + nt, total - nt);
    if (rc == 0 && ib->send_ack) {
        size_t k = 0;
        for (size_t i = 0; i < total; i++)
            if (i < n || m[i].ack)
                ids[k++] = (char *)m[i].id;
        for (size_t i = 0; i < k; i += S_ACK_IDS)
            ib->send_ack(ib->arg, ids + i, k - i < S_ACK_IDS ? k - i : S_ACK_IDS);
    }
out:
    free(ids);
    free(m);
    ml_inbox_discard(ib);
    return rc;
}
