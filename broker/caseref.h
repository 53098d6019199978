/* Cases in memory: lookup (memory, else read back from the store),
 * references and eviction, the per-node open counts, the store row of a
 * case, the broker's own case changes handed to the store and how a failed
 * change is settled (memory read back once every change after it has been
 * answered). Below submit and notices, which call it; it calls only
 * delivery's node table, the store and the counters. Loop thread only. */
#ifndef ML_BK_CASEREF_H
#define ML_BK_CASEREF_H

#include "broker_int.h"

/* The config's copy of a service name (borrowed for the broker's life). */
const char *ml_caseref_service_name(ml_broker_t *b, const char *name);

/* Keeps each node's count of the open cases it is the target of, which is
 * how a service picks its least busy consumer, and of the open cases it
 * opened, which open_cases_per_node bounds, and the broker's total. A case
 * counts from its opening until it is final, whether it is in memory or
 * not: the counts start from the store's (ml_caseref_load), a case that
 * leaves memory open keeps its counts (ml_caseref_maybe_evict), and one read back
 * does not add them again (s_load_one, s_resync). */
void ml_caseref_count(ml_broker_t *b, ml_case_t *c, int delta);

/* The row of the store for c as it is in memory. */
void ml_caseref_row(ml_broker_t *b, const ml_case_t *c, ml_store_case_t *r);

/* Counts the open cases of the store per node and loads those with a
 * deadline running into b->cases (start-up). Returns 0 or ML_ESTORE. */
int ml_caseref_load(ml_broker_t *b);

/* Frees c once nothing needs it in memory (no reference, no change in
 * flight, no deadline running): the store keeps it and ml_caseref_lookup
 * reads it back. A count only memory has is stored first. */
void ml_caseref_maybe_evict(ml_broker_t *b, ml_case_t *c);

/* Drops a case reference (frees a final or gone case nobody needs). Safe
 * on NULL. */
void ml_caseref_release(ml_broker_t *b, ml_case_t *c);

/* The case with this id: from memory, else (a final case, or an open one
 * nothing needed in memory) read back from the store into memory. *out is
 * NULL when there is none, or when it cannot be read: then the return is
 * ML_ESTORE or ML_ENOMEM (a message for it is refused for now, since the
 * case may well exist), else 0. The caller takes a reference or calls
 * ml_caseref_maybe_evict when done. */
int ml_caseref_lookup(ml_broker_t *b, const char *id, ml_case_t **out);

/* The case a pending message loaded at start-up belongs to (a reference is
 * taken), or NULL. */
ml_case_t *ml_caseref_for_row(ml_broker_t *b, const char *case_id, int kind);

/* One more change of c handed to the store (answered by
 * ml_caseref_settle). Safe on NULL. */
void ml_caseref_pending(ml_case_t *c);

/* The store answered one change of c (failed: it was not made as the broker
 * made it in memory). Changes handed to the store after it were checked
 * against it, so they fail too (their versions follow it); memory is read
 * back only once every one of them has been answered. Reading it earlier
 * would take in a store that is about to move (a change still queued would
 * land on top of what was read, and memory would lag the store by it), and
 * a message checked against that memory could then be stored on top of a
 * change that never was. Until then the case takes no new change
 * (ingress.c, s_stale_refuse). */
void ml_caseref_settle(ml_broker_t *b, ml_case_t *c, int failed);

/* Frees what the broker's own unanswered case changes hold (after the
 * store is closed: their callbacks never come). */
void ml_caseref_free_changes(ml_broker_t *b);

/* Stores a change the broker makes by itself (ops), holding c until the
 * store answers; a failed one is settled (the case read back) and its
 * delivery, when redo is given, recorded again later. */
void ml_caseref_apply(ml_broker_t *b, ml_case_t *c, const ml_store_caseop_t *ops, size_t n,
                      const ml_redo_t *redo);

/* Keeps an acknowledged delivery whose change could not be made, to be
 * recorded again by the flow timer once the case is back in step. Each
 * entry holds a reference, so a case that closes meanwhile stays in memory
 * until its deliveries are recorded. */
void ml_caseref_redo_push(ml_case_t *c, const ml_redo_t *r);

/* A reload is about to replace b->cfg with nc: cases that name a service
 * take nc's copy of the name (or a broker-owned one when nc has none). */
void ml_caseref_reload(ml_broker_t *b, ml_broker_config_t *nc);

#endif
