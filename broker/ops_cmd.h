/* What ops staff may change in the broker, and the few ways the ops modules
 * speak: a dead letter replayed or purged, retention run now, a timeline
 * note that someone read a stored envelope, an ops alert sent as an
 * Escalation, an admin reply or refusal to a medlinkctl session. Kept apart
 * from query.h (reads only) so that the modules that only show things
 * (http.c, metrics.c, web.c) cannot change anything: they never include
 * this header (tests/tools/ops_layering.sh checks it). admin.c and alerts.c
 * do. Loop thread only. */
#ifndef ML_BK_OPS_CMD_H
#define ML_BK_OPS_CMD_H

#include <stddef.h>
#include <stdint.h>

#include "ml_env.h"
#include "store.h"

typedef struct ml_broker ml_broker_t;
typedef struct ml_session ml_session_t;

/* ---- answers to a medlinkctl session ---------------------------------- */

/* Sends an admin (or control) envelope from the broker to s's peer (id,
 * from, to, created_at and kind are filled in). Returns 0 or ML_E*. */
int ml_ops_reply(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env);
/* Refuses msg_id of s with a Nack of code (logged within the node's
 * budget, counted as a refusal). */
void ml_ops_refuse(ml_broker_t *b, ml_session_t *s, const char *msg_id, int code,
                   const char *reason);

/* ---- ops alerts --------------------------------------------------------- */

/* Sends esc, URGENT, in the case named by esc->case_id, to every node that
 * gets the ops nodes' Escalations ([escalation] notify, else every OPS
 * node), each a message of its own stored and delivered like any other.
 * Returns how many nodes it was queued for. O(nodes). */
int ml_ops_escalate(ml_broker_t *b, Medlink__V1__Escalation *esc);

/* ---- dead letters ------------------------------------------------------- */

/* 1 while a replay or purge of the dead letter at seq waits for the store
 * to commit it: it is no longer a dead letter for anyone who asks now.
 * O(requests waiting). */
int ml_ops_dlq_busy(const ml_broker_t *b, int64_t seq);

/* Records in d's case timeline (when the case still exists) that who read
 * its stored envelope. */
void ml_ops_dead_letter_read(ml_broker_t *b, const char *who, const ml_store_dead_t *d);

typedef struct {
    int rc;            /* 0, or the store's error (the marks are retried until they commit) */
    uint32_t affected; /* dead letters replayed or purged */
    int failed_all;    /* one message was asked for and could not be done */
    const char *error; /* the last one that could not be done, or NULL */
} ml_ops_dlq_result_t;
typedef void (*ml_ops_dlq_cb)(void *arg, const ml_ops_dlq_result_t *r);

/* Replays (replay 1: queued for its recipient again) or purges the dead
 * letter message_id, or every one with all. The changes are queued to the
 * store in order with what follows; done runs once the store has tried
 * them (ml_store_barrier), or before this returns when nothing was queued.
 * Returns 0 (done will run), or ML_ENOTFOUND / ML_ESTORE / ML_ENOMEM with
 * a sentence for people in err (done will not run). who names the asker
 * in log lines and timelines. O(dead letters named). */
int ml_ops_dlq_change(ml_broker_t *b, const char *who, const char *message_id, int all, int replay,
                      char *err, size_t errlen, ml_ops_dlq_cb done, void *arg);

/* ---- the store ---------------------------------------------------------- */

/* Runs retention now (ml_store_prune: bounded steps between groups; cb
 * when the run is over, with ML_ECLOSED when the store closes first).
 * Returns 0 or ML_E*. */
int ml_ops_store_prune(ml_broker_t *b, ml_store_prune_cb cb, void *arg);

/* At broker destroy, after the store is closed (the barriers' callbacks
 * never come): every waiting dlq change gets its done with r NULL, to free
 * what arg holds without answering, and is freed. */
void ml_ops_free(ml_broker_t *b);

#endif
