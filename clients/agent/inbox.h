/* The agent's receive batch: every delivery of one loop iteration is
 * stored in one transaction and acknowledged once it is durable.
 *
 *   push      a delivery is checked (F6: UTF-8 strings, ids that are ids;
 *             one that fails is refused with Nack REFUSED and never
 *             acknowledged) and kept, packed, until the flush;
 *   flush     begin; the spool stores the messages (ml_spool_receive_tx);
 *             each plug-in gets the messages and the deliveries of its
 *             kinds (kind_mask: an imaging chunk goes to img_recv.c's
 *             .part files, never through the spool); commit; the spool
 *             writes its inbox files; each plug-in's on_commit; then one
 *             cumulative Ack per 4096 ids: every message, and each plug-in
 *             delivery whose ack the plug-in set. On any failure everything
 *             is rolled back, each plug-in's on_abort runs and nothing is
 *             acknowledged: the broker delivers it all again.
 *
 * A burst of a thousand deliveries thus costs one fsync, not a thousand.
 * Crash points: before the commit nothing is recorded and nothing acked
 * (redelivered); after the commit and before the Ack the deliveries are
 * stored and come again as duplicates, which the spool recognises by id
 * and which are acknowledged again. Loop thread only. */
#ifndef ML_AGENT_INBOX_H
#define ML_AGENT_INBOX_H

#include <stddef.h>
#include <stdint.h>

#include "astore.h"
#include "ml_env.h"
#include "spool.h"

typedef struct ml_inbox ml_inbox_t;

/* The kind_mask bit of an envelope kind (all kinds are below 64). */
#define ML_INBOX_KIND(k) ((uint64_t)1 << (unsigned)(k))
/* Plug-ins an inbox takes. */
#define ML_INBOX_PLUGINS_MAX 4

/* A module that takes part in the batch transaction. */
typedef struct {
    /* Kinds the plug-in takes instead of the spool (ML_INBOX_KIND bits). */
    uint64_t kind_mask;
    /* Inside the transaction, after the spool stored msgs[0..n) (their
     * inserted says which are new): taken[0..nt) are the deliveries of
     * this plug-in's kinds, in arrival order, ack 0; the plug-in sets ack
     * to 1 for each that may be acknowledged. Returns 0, or a negative
     * ML_E* to roll the whole batch back. */
    int (*on_batch)(void *arg, const ml_spool_msg_t *msgs, size_t n, ml_spool_msg_t *taken,
                    size_t nt);
    /* After the commit and the spool's inbox files; may be NULL. */
    void (*on_commit)(void *arg);
    /* After a rollback (nothing of the batch happened); may be NULL. */
    void (*on_abort)(void *arg);
    void *arg;
} ml_inbox_plugin_t;

typedef struct {
    ml_astore_t *store; /* borrowed; outlives the inbox */
    ml_spool_t *spool;  /* borrowed; outlives the inbox */
    /* Sends one cumulative Ack for ids[0..n) (n <= 4096); NULL: none is
     * sent (tests, the fuzzer). A failure is the sender's to log: the
     * deliveries are stored and the broker delivers them again. */
    void (*send_ack)(void *arg, char **ids, size_t n);
    /* Sends Nack REFUSED for a delivery that cannot be stored; NULL: none
     * is sent. */
    void (*send_refusal)(void *arg, const char *id, const char *why);
    void *arg;
} ml_inbox_config_t;

/* Returns 0 or ML_ENOMEM. */
int ml_inbox_new(const ml_inbox_config_t *cfg, ml_inbox_t **out);
/* Frees the inbox and any delivery not flushed (not acknowledged, so the
 * broker delivers it again); safe on NULL and twice; clears *self_p. */
void ml_inbox_destroy(ml_inbox_t **self_p);
/* Adds a plug-in (copied). Its kinds must not overlap another's. Returns 0
 * or ML_EINVAL (full, or overlapping kinds). */
int ml_inbox_add_plugin(ml_inbox_t *ib, const ml_inbox_plugin_t *p);
/* Removes every plug-in whose arg is arg (before that module is freed). */
void ml_inbox_remove_plugins(ml_inbox_t *ib, void *arg);

/* Keeps a delivery for the next flush (packed again: env stays the
 * caller's). A delivery without an id is dropped with a log line; one that
 * cannot be spooled is refused (send_refusal) and dropped. Returns 0 when
 * kept, 1 when dropped or refused, ML_ENOMEM (not kept: the broker
 * delivers it again). O(size of env). */
int ml_inbox_push(ml_inbox_t *ib, const ml_envelope_t *env);
/* Deliveries kept since the last flush. */
size_t ml_inbox_pending(const ml_inbox_t *ib);
/* Stores the kept deliveries in one transaction (ml_inbox_receive) and,
 * when that succeeded, acknowledges them; the batch is then empty either
 * way. Returns 0 (also when there was nothing), ML_ENOMEM or ML_ESTORE
 * (nothing acknowledged). */
int ml_inbox_flush(ml_inbox_t *ib);
/* Drops the kept deliveries unstored and unacknowledged (the broker
 * delivers them again). */
void ml_inbox_discard(ml_inbox_t *ib);

/* The transaction itself over deliveries the caller holds: msgs[0..n) go
 * through the spool, taken[0..nt) to the plug-ins by kind (their ack is
 * set; one whose kind no plug-in takes is not acknowledged). Sends
 * nothing. On 0 every msgs[i] may be acknowledged, and taken[i] when its
 * ack is 1. Returns 0, ML_ENOMEM or ML_ESTORE (acknowledge nothing; every
 * ack 0). */
int ml_inbox_receive(ml_inbox_t *ib, ml_spool_msg_t *msgs, size_t n, ml_spool_msg_t *taken,
                     size_t nt);

#endif
