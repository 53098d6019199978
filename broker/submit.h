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

/* Queues m for the store. Returns 0, or ML_EAGAIN (a session's message
 * with the store backlog past its hard limit, ml_submit_backlog_full),
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

/* ---- credit (docs/protocol.md, "Credit") ------------------------------ */

/* The most messages a Welcome grants, whatever the share: a burst of new
 * sessions (64 clinics coming up together) would otherwise each be granted
 * the share of the few active before them. The first Accepted grants the
 * full share. */
#define ML_SUBMIT_CREDIT_WELCOME 64

/* One sender's share of the store backlog: budget / active senders,
 * clamped to [1, max_credit] messages and [max_record, budget_bytes]
 * bytes (never below one max_record, so the largest record fits). active
 * 0 counts as 1. Pure, O(1). */
void ml_submit_credit_share(uint64_t budget_msgs, uint64_t budget_bytes, uint64_t active,
                            uint64_t max_credit, uint64_t max_record, uint32_t *msgs,
                            uint64_t *bytes);

/* The window to state next, from the one stated before (prev, 0 for the
 * Welcome's) and the share: a shrink at once, a growth at most doubling
 * per Accepted. Senders that came up together and were each counted
 * before the others had sent would otherwise all jump to a large share on
 * their first Accepted and overrun the backlog together (measured: 354 to
 * 7,858 refusals per 64-clinic run without it). Pure, O(1). */
uint32_t ml_submit_credit_grow(uint32_t prev, uint32_t share);

/* s sent a routed record at now_ms (monotonic, the loop's uv_now): it is
 * one of the active senders for the next 1-2 s. ml_submit_put calls it.
 * O(1). */
void ml_submit_credit_note(ml_broker_t *b, ml_session_t *s, int64_t now_ms);

/* s closes (ml_submit_orphan calls it): it is no longer an active sender.
 * O(1). */
void ml_submit_credit_forget(ml_broker_t *b, ml_session_t *s, int64_t now_ms);

/* The active senders at now_ms: the sessions that sent a routed record in
 * the last 1-2 s, or, if more, those with puts waiting for the store (a
 * stalled store must not age its waiting senders out). O(1). */
uint64_t ml_submit_credit_active(ml_broker_t *b, int64_t now_ms);

/* The send window of s at now_ms: its share of [broker] store_backlog /
 * store_backlog_bytes among the active senders, counting s among them
 * when it is not yet. O(1). */
void ml_submit_credit_at(ml_broker_t *b, const ml_session_t *s, int64_t now_ms, uint32_t *msgs,
                         uint64_t *bytes);

/* ml_submit_credit_at now (the loop's time): what Welcome (capped at
 * ML_SUBMIT_CREDIT_WELCOME messages) and every Accepted tell s. */
void ml_submit_credit(ml_broker_t *b, const ml_session_t *s, uint32_t *msgs, uint64_t *bytes);

/* 1 when the store backlog is past its hard limit: the sessions' puts
 * waiting for the store (the broker's own notices not counted) at twice
 * [broker] store_backlog, or all puts' bytes at twice store_backlog_bytes.
 * Only a peer ignoring its window
 * gets there, and its messages are refused (RATE_LIMITED). O(1). */
int ml_submit_backlog_full(const ml_broker_t *b);

#endif
