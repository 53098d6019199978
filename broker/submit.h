/* Submit: a message on its way to the store and what happens when the
 * store answers. The sender gets Accepted (or a Nack) from the commit
 * callback; a committed message joins its recipient's queue or, when the
 * recipient is connected and idle, goes out at once from the copy held
 * here; the case work of the put is settled (caseref.c) and the actions
 * that follow a commit (a forward, a notice) are handed up through
 * b->hooks.after_commit. The broker's own messages a full store refused
 * are kept and stored again (retry_own). Loop thread only. */
#ifndef ML_BK_SUBMIT_H
#define ML_BK_SUBMIT_H

#include "broker_int.h"

enum {
    ML_BK_AFTER_NONE = 0,
    ML_BK_AFTER_FORWARD = 1,    /* forward the case's referral to its (new) target */
    ML_BK_AFTER_REREFERRED = 2, /* tell the down-transfer's hospital it went back up */
    ML_BK_AFTER_EXPIRED = 3,    /* the study expired at the reading centre: dead letter */
};

/* A message to store and then deliver: from a session (its sender gets
 * Accepted once it is committed) or from the broker itself (session NULL). */
typedef struct {
    ml_session_t *session;
    ml_nodestate_t *recipient;
    const char *id;
    const char *case_id;
    const char *sender;
    int kind;
    int priority;
    int64_t created_at;
    int64_t deadline;
    const uint8_t *rec; /* the serialised envelope as it will be delivered */
    size_t len;
    /* SHA-256 of the record as its sender sent it (before any repack),
     * NULL for the broker's own: the store tells a resend (same sender,
     * same digest: Accepted as a duplicate) from a different message
     * reusing the id (Nack ID_IN_USE). */
    const uint8_t *digest;
    const char *to; /* as the sender addressed it (a node or a service) */
    const ml_store_caseop_t *ops;
    size_t n_ops;
    ml_case_t *cs;     /* the case it belongs to (the put takes a reference) */
    ml_case_t *linked; /* a second case it changes (idem) */
    int action;        /* ML_BK_AFTER_* */
    int chunk_bytes;
    int notice;         /* the broker's own message */
    int fresh;          /* an id the broker just made: never a duplicate */
    const char *opened; /* see ml_put_t.opened, or NULL */
} ml_bk_msg_t;

/* Queues m for the store. Returns 0, or ML_EAGAIN (store backlog full),
 * ML_ENOMEM / ML_ECLOSED; the caller then refuses the message. */
int ml_submit_put(ml_broker_t *b, const ml_bk_msg_t *m);

/* Stores again the broker's own messages a failing store refused (a
 * forwarded referral, a notice, an escalation copy). Timer, loop thread. */
void ml_submit_retry_own(ml_broker_t *b);

/* Is a message with this id already stored, or on its way to the store?
 * Asked only when a message would be refused: an agent that resends after
 * a reconnect must get Accepted (as a duplicate), not a refusal for a step
 * its first copy already made. */
int ml_submit_known_id(ml_broker_t *b, ml_session_t *s, const char *id);

/* Re-queues the messages the store holds as pending (start-up): each joins
 * its recipient's queue; one for a node no longer registered becomes a dead
 * letter. Returns 0 or ML_ESTORE. */
int ml_submit_load_pending(ml_broker_t *b);
/* s closes: its puts still complete (and queue their messages), only the
 * answer to s is no longer possible. O(puts of s). */
void ml_submit_orphan(ml_broker_t *b, ml_session_t *s);
/* Frees the puts whose callbacks never come (after the store is closed). */
void ml_submit_free(ml_broker_t *b);

#endif
