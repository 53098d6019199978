/* Cases in memory: lookup (memory, else read back from the store),
 * references and eviction, the per-node open counts, the store row of a
 * case, the broker's own case changes handed to the store and how a failed
 * change is settled (memory read back once every change after it has been
 * answered). Below submit and notices, which call it; it calls only
 * delivery's node table, the store and the counters. Loop thread only. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broker_int.h"
#include "caseref.h"
#include "cases.h"
#include "delivery.h"
#include "metrics.h"

/* The config's copy of a service name (borrowed for the broker's life). */
const char *ml_caseref_service_name(ml_broker_t *b, const char *name)
{
    for (size_t i = 0; name && *name && i < b->cfg->n_nodes; i++)
        for (size_t j = 0; j < b->cfg->nodes[i].n_services; j++)
            if (strcmp(b->cfg->nodes[i].services[j], name) == 0)
                return b->cfg->nodes[i].services[j];
    return NULL;
}

/* The name a case read back from the store keeps: the config's copy, or,
 * for a service a reload removed, the broker's own copy (shared with
 * s_remap_service), so that the opener may still address the case's
 * messages to it and the stored row keeps it. NULL for none (or out of
 * memory: the name is only shown and matched, the target is fixed). */
static const char *s_service_keep(ml_broker_t *b, const char *name)
{
    const char *cfg = ml_caseref_service_name(b, name);
    if (cfg || !name || !*name)
        return cfg;
    for (size_t i = 0; i < b->n_services_gone; i++)
        if (strcmp(b->services_gone[i], name) == 0)
            return b->services_gone[i];
    char **grown = realloc(b->services_gone, (b->n_services_gone + 1) * sizeof *grown);
    if (grown)
        b->services_gone = grown;
    char *copy = grown ? strdup(name) : NULL;
    if (!copy)
        return NULL;
    b->services_gone[b->n_services_gone++] = copy;
    return copy;
}

/* Keeps each node's count of the open cases it is the target of, which is
 * how a service picks its least busy consumer, and of the open cases it
 * opened, which open_cases_per_node bounds, and the broker's total. A case
 * counts from its opening until it is final, whether it is in memory or
 * not: the counts start from the store's (ml_caseref_load), a case that
 * leaves memory open keeps its counts (ml_caseref_maybe_evict), and one read back
 * does not add them again (s_load_one, s_resync). */
void ml_caseref_count(ml_broker_t *b, ml_case_t *c, int delta)
{
    if (c->closed || c->gone)
        return;
    ml_bk_metrics_case(b, c->kind, c->state, delta);
    if (delta < 0 && b->open_total > 0)
        b->open_total--;
    else if (delta > 0)
        b->open_total++;
    ml_nodestate_t *ns = ml_delivery_node_at(b, c->target);
    if (ns && delta < 0 && ns->open_cases > 0)
        ns->open_cases--;
    else if (ns && delta > 0)
        ns->open_cases++;
    ml_nodestate_t *op = ml_delivery_node_at(b, c->opener);
    if (op && delta < 0 && op->opened > 0)
        op->opened--;
    else if (op && delta > 0)
        op->opened++;
}

/* The row of the store for c as it is in memory. */
void ml_caseref_row(ml_broker_t *b, const ml_case_t *c, ml_store_case_t *r)
{
    memset(r, 0, sizeof *r);
    r->case_id = c->id;
    r->kind = c->kind;
    r->state = c->state;
    r->priority = c->priority;
    r->opener = ml_delivery_node_name(b, c->opener);
    r->target = ml_delivery_node_name(b, c->target);
    r->service = c->service;
    r->linked = c->linked;
    r->opening_id = c->opening_id;
    r->opened_at = c->opened_at;
    r->updated_at = c->updated_at;
    r->deadline_at = c->deadline_at;
    r->deadline_state = c->deadline_state;
    r->escalations = c->escalations;
    r->follow_ups = c->follow_ups;
    r->closed = c->closed;
    r->n_objects = c->n_objects;
    r->chunks_expected = c->chunks_expected;
    r->chunks = c->chunks;
    r->dup_chunks = c->dup_chunks;
    r->chunk_bytes = c->chunk_bytes;
    r->fired = c->fired;
    r->version = c->version;
}

/* Copies a stored row into c (whose id is already the row's). */
static void s_from_row(ml_broker_t *b, ml_case_t *c, const ml_store_case_t *r)
{
    c->kind = (uint8_t)r->kind;
    c->state = (uint8_t)r->state;
    c->priority = (uint8_t)r->priority;
    c->opener = ml_delivery_node_idx(b, r->opener);
    c->target = ml_delivery_node_idx(b, r->target);
    c->service = s_service_keep(b, r->service);
    free(c->linked);
    c->linked = r->linked && *r->linked ? strdup(r->linked) : NULL;
    snprintf(c->opening_id, sizeof c->opening_id, "%s", r->opening_id ? r->opening_id : "");
    c->opened_at = r->opened_at;
    c->updated_at = r->updated_at;
    c->deadline_at = r->deadline_at;
    c->deadline_state = (uint8_t)r->deadline_state;
    c->escalations = (uint16_t)r->escalations;
    c->follow_ups = (uint16_t)r->follow_ups;
    c->closed = (uint8_t)(r->closed != 0);
    c->n_objects = r->n_objects;
    c->chunks_expected = r->chunks_expected;
    c->chunks = r->chunks;
    c->dup_chunks = r->dup_chunks;
    c->chunk_bytes = r->chunk_bytes;
    c->fired = (uint8_t)(r->fired != 0);
    c->version = r->version;
    c->unsaved = 0;
}

typedef struct {
    ml_broker_t *b;
    ml_case_t *c;
    int rc;
} s_load_t;

/* Reads a stored case into memory. It is counted already (see
 * ml_caseref_count): an open one since start-up or its opening, a final one
 * not at all. */
static void s_load_one(void *arg, const ml_store_case_t *r)
{
    s_load_t *ld = arg;
    ml_case_t *c = ml_case_new(r->case_id);
    if (!c || ml_casetab_add(&ld->b->cases, c) != 0) {
        ml_case_free(c);
        ld->rc = ML_ENOMEM;
        return;
    }
    s_from_row(ld->b, c, r);
    ld->c = c;
}

static void s_count_open(void *arg, const char *opener, const char *target, int64_t n)
{
    ml_broker_t *b = arg;
    uint32_t k = n > 0 ? (uint32_t)n : 0;
    ml_nodestate_t *op = opener && *opener ? ml_delivery_node(b, opener) : NULL;
    ml_nodestate_t *tg = target && *target ? ml_delivery_node(b, target) : NULL;
    if (op)
        op->opened += k;
    if (tg)
        tg->open_cases += k;
    b->open_total += k;
}

int ml_caseref_load(ml_broker_t *b)
{
    /* The counts come from the store, where every open case is; memory
     * gets only the cases whose deadline the flow timer must watch. Cases
     * with messages still queued come in as those are queued again
     * (ml_caseref_for_row). */
    int rc = ml_store_cases_open_counts(b->store, s_count_open, b);
    if (rc != 0)
        return rc;
    s_load_t ld = {b, NULL, 0};
    rc = ml_store_cases_timed(b->store, s_load_one, &ld);
    return rc ? rc : ld.rc;
}

/* Frees c once nothing needs it in memory (the store keeps it): no queued
 * or in-flight message, no put or change in flight, no delivery to record
 * again (each holds a reference), and no deadline running, since the
 * deadline scan (deadlines.c, s_collect_due) and the overdue count of the status walk
 * memory only. An open case keeps its counts (ml_caseref_count) and is read
 * back by s_lookup when a message for it comes: ~240 bytes a case that
 * nobody is working on is not kept for months. */
void ml_caseref_maybe_evict(ml_broker_t *b, ml_case_t *c)
{
    if (c->refs > 0)
        return;
    if (c->unsaved && !c->gone && !c->stale && !c->pending) {
        /* A count only memory has (a duplicate chunk) is stored first, as
         * a change of the row alone (no timeline entry, updated_at kept):
         * the change holds the case until the store has it. */
        c->unsaved = 0;
        ml_store_caseop_t op = {.n_events = 0};
        c->version++;
        ml_caseref_row(b, c, &op.row);
        ml_caseref_apply(b, c, &op, 1, NULL);
        return;
    }
    if (c->gone) {
        ml_case_free(c); /* already out of the table */
    } else if (c->closed ||
               (!c->deadline_at && !c->stale && !c->pending && !c->redo && !c->unstored)) {
        ml_casetab_remove(&b->cases, c);
        ml_case_free(c);
    }
}

void ml_caseref_release(ml_broker_t *b, ml_case_t *c)
{
    if (!c)
        return;
    if (c->refs > 0)
        c->refs--;
    ml_caseref_maybe_evict(b, c);
}

/* The case with this id: from memory, else (a final case, or an open one
 * nothing needed in memory) read back from the store into memory. *out is
 * NULL when there is none, or when it cannot be read: then the return is
 * ML_ESTORE or ML_ENOMEM (a message for it is refused for now, since the
 * case may well exist), else 0. The caller takes a reference or calls
 * ml_caseref_maybe_evict when done. */
int ml_caseref_lookup(ml_broker_t *b, const char *id, ml_case_t **out)
{
    *out = NULL;
    if (!id || !*id)
        return 0;
    if ((*out = ml_casetab_find(&b->cases, id)) != NULL)
        return 0;
    s_load_t ld = {b, NULL, 0};
    int rc = ml_store_case_get(b->store, id, s_load_one, &ld);
    if (rc == ML_ENOTFOUND)
        return 0;
    if (rc == 0 && ld.rc != 0)
        rc = ld.rc;
    *out = rc == 0 ? ld.c : NULL;
    return rc;
}

static ml_case_t *s_lookup(ml_broker_t *b, const char *id)
{
    ml_case_t *c;
    ml_caseref_lookup(b, id, &c);
    return c;
}

ml_case_t *ml_caseref_for_row(ml_broker_t *b, const char *case_id, int kind)
{
    if (ml_case_kind_of_message(kind) == ML_CASE_NONE)
        return NULL;
    ml_case_t *c = s_lookup(b, case_id);
    if (c)
        c->refs++;
    return c;
}

typedef struct {
    ml_broker_t *b;
    ml_case_t *c;
} s_resync_t;

static void s_resync_row(void *arg, const ml_store_case_t *r)
{
    s_resync_t *rs = arg;
    s_from_row(rs->b, rs->c, r);
}

/* After a change failed to commit: the store is the truth. A case whose
 * opening did not commit is not a case: it leaves the table now and memory
 * once nothing points to it. */
static void s_resync(ml_broker_t *b, ml_case_t *c)
{
    if (!c || c->gone)
        return;
    ml_caseref_count(b, c, -1);
    s_resync_t rs = {b, c};
    int rc = ml_store_case_get(b->store, c->id, s_resync_row, &rs);
    if (rc == 0 && c->unstored) {
        /* The opening was refused (an id in use) or was a resend: the row
         * read is the case that already had the id, which left memory
         * counted (ml_caseref_count) and must not count twice. */
        c->unstored = 0;
        return;
    }
    if (rc == ML_ENOTFOUND) {
        ml_casetab_remove(&b->cases, c);
        c->gone = 1;
        /* Deliveries waiting to be recorded have no case to go to. */
        while (c->redo) {
            ml_redo_t *r = c->redo;
            c->redo = r->next;
            free(r);
            if (c->refs > 0)
                c->refs--; /* the caller holds one: no eviction here */
        }
        return;
    }
    if (rc != 0)
        ml_log(ML_LOG_ERROR, "cases", "case %s: cannot read it back from the store", c->id);
    ml_caseref_count(b, c, +1);
}

void ml_caseref_pending(ml_case_t *c)
{
    if (c)
        c->pending++;
}

/* The store answered one change of c (failed: it was not made as the broker
 * made it in memory). Changes handed to the store after it were checked
 * against it, so they fail too (their versions follow it); memory is read
 * back only once every one of them has been answered. Reading it earlier
 * would take in a store that is about to move (a change still queued would
 * land on top of what was read, and memory would lag the store by it), and
 * a message checked against that memory could then be stored on top of a
 * change that never was. Until then the case takes no new change
 * (ingress.c, s_stale_refuse). */
void ml_caseref_settle(ml_broker_t *b, ml_case_t *c, int failed)
{
    if (!c)
        return;
    if (c->pending > 0)
        c->pending--;
    if (failed)
        c->stale = 1;
    if (c->stale && c->pending == 0) {
        c->stale = 0;
        s_resync(b, c);
    }
}

/* ------------------------------------------------------------------ */
/* Escalations and notices                                             */

typedef struct s_change {
    struct s_change *prev, *next; /* in b->changes until the store answers */
    ml_broker_t *b;
    ml_case_t *c;
    ml_redo_t redo; /* a delivery to record again if the change fails */
    int has_redo;
} s_change_t;

static void s_change_unlink(s_change_t *x)
{
    if (x->prev)
        x->prev->next = x->next;
    else
        x->b->changes = x->next;
    if (x->next)
        x->next->prev = x->prev;
    x->prev = x->next = NULL;
}

void ml_caseref_free_changes(ml_broker_t *b)
{
    while (b->changes) {
        s_change_t *x = b->changes;
        s_change_unlink(x);
        free(x); /* its case goes with the case table */
    }
}

/* The callback argument of a broker-made change: holds a reference to the
 * case until the store has answered. NULL out of memory (the change is
 * then stored without an answer). */
static s_change_t *s_change_arg(ml_broker_t *b, ml_case_t *c)
{
    s_change_t *x = c ? calloc(1, sizeof *x) : NULL;
    if (x) {
        x->b = b;
        x->c = c;
        c->refs++;
    }
    return x;
}

static void s_resync(ml_broker_t *b, ml_case_t *c);
static void s_change_done(void *arg, int rc, int64_t seq, int duplicate);

void ml_caseref_apply(ml_broker_t *b, ml_case_t *c, const ml_store_caseop_t *ops, size_t n,
                      const ml_redo_t *redo)
{
    s_change_t *x = s_change_arg(b, c);
    if (x) {
        x->redo = redo ? *redo : (ml_redo_t){0};
        x->has_redo = redo != NULL;
    }
    if (ml_store_case_apply(b->store, ops, n, x ? s_change_done : NULL, x) != 0) {
        if (x) {
            ml_caseref_release(b, c);
            free(x);
        }
        return;
    }
    if (x) {
        x->prev = NULL;
        x->next = b->changes;
        if (b->changes)
            b->changes->prev = x;
        b->changes = x;
        ml_caseref_pending(c);
    }
}

/* Keeps an acknowledged delivery whose change could not be made, to be
 * recorded again by the flow timer once the case is back in step. Each
 * entry holds a reference, so a case that closes meanwhile stays in memory
 * until its deliveries are recorded. */
void ml_caseref_redo_push(ml_case_t *c, const ml_redo_t *r)
{
    ml_redo_t *n = malloc(sizeof *n);
    if (!n) {
        ml_log(ML_LOG_ERROR, "cases", "case %s: out of memory: delivery of %s not recorded", c->id,
               r->id);
        return;
    }
    *n = *r;
    n->next = NULL;
    ml_redo_t **tail = &c->redo;
    while (*tail)
        tail = &(*tail)->next;
    *tail = n;
    c->refs++;
}

/* A change the broker made by itself was committed, or not: then the case
 * is read back from the store (and, for a deadline, fires again). */
static void s_change_done(void *arg, int rc, int64_t seq, int duplicate)
{
    s_change_t *x = arg;
    (void)seq;
    (void)duplicate;
    if (!x)
        return;
    s_change_unlink(x);
    if (rc != 0) {
        ml_log(ML_LOG_WARN, "cases",
               "case %s: the broker's own change was not stored (%s); reloading", x->c->id,
               ml_strerror(rc));
        if (x->has_redo && !x->c->gone)
            ml_caseref_redo_push(x->c, &x->redo);
    }
    ml_caseref_settle(x->b, x->c, rc != 0);
    ml_caseref_release(x->b, x->c);
    free(x);
}

typedef struct {
    ml_broker_t *b;
    ml_broker_config_t *nc;
} s_remap_t;

static void s_remap_service(ml_case_t *c, void *arg)
{
    s_remap_t *r = arg;
    if (!c->service)
        return;
    for (size_t i = 0; i < r->nc->n_nodes; i++)
        for (size_t j = 0; j < r->nc->nodes[i].n_services; j++)
            if (strcmp(r->nc->nodes[i].services[j], c->service) == 0) {
                c->service = r->nc->nodes[i].services[j];
                return;
            }
    ml_broker_t *b = r->b;
    for (size_t i = 0; i < b->n_services_gone; i++)
        if (strcmp(b->services_gone[i], c->service) == 0) {
            c->service = b->services_gone[i];
            return;
        }
    char **grown = realloc(b->services_gone, (b->n_services_gone + 1) * sizeof *grown);
    char *copy = strdup(c->service);
    if (grown)
        b->services_gone = grown;
    if (!grown || !copy) {
        free(copy);
        c->service = NULL; /* only shown and matched; the target is fixed */
        return;
    }
    b->services_gone[b->n_services_gone++] = copy;
    c->service = copy;
}

void ml_caseref_reload(ml_broker_t *b, ml_broker_config_t *nc)
{
    s_remap_t r = {b, nc};
    ml_casetab_each(&b->cases, s_remap_service, &r);
}
