/* Private to medlinkd's core: the structures broker.c (sessions, transport,
 * delivery), flow.c (cases, deadlines, escalations, dead letters) and
 * admin.c (medlinkctl's requests) share, and the functions they call in each
 * other. Loop thread only, like everything in them. */
#ifndef ML_BROKER_INT_H
#define ML_BROKER_INT_H

#include <stdint.h>

#include <uv.h>

#include "broker.h"
#include "casetab.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_frame.h"
#include "ml_tls.h"
#include "ml_zloop.h"
#include "queue.h"
#include "ml_sbuf.h"
#include "store.h"

#define S_RECV_BUDGET 512
#define S_FRAME_MAX (256 * 1024)
#define S_FLUSH_THRESHOLD (64 * 1024)
#define S_BUCKETS 4096
#define S_RID_MAX 255
/* Puts waiting for the store hold a copy of their envelope: bound them so
 * a burst cannot grow the broker past its memory budget. */
#define S_STORE_BACKLOG_MAX 16384
#define S_STORE_BACKLOG_BYTES (32u * 1024 * 1024)
/* Envelopes for connected recipients are kept in memory up to this many
 * bytes, so that steady traffic is delivered without reading each message
 * back from SQLite (a read that costs ~10% of the broker's CPU, since every
 * commit invalidates the reader's page cache). Backlogs beyond it, and
 * everything for offline nodes, are read from the store at delivery time,
 * which keeps memory flat however long a clinic stays offline. */
#define S_CACHE_BYTES (8u * 1024 * 1024)
/* Output queued for a session past session_output_bytes: deliveries stop
 * there, so only answers to what the peer sends can add more; a session
 * that reaches session_output_bytes + max_record + this is not reading and
 * is closed. */
#define S_REPLY_SLACK (1u * 1024 * 1024)
/* Sessions of one node without deliveries (medlinkctl next to its agent)
 * kept at once; a newer one closes the oldest. */
#define S_SIDE_SESSIONS_MAX 4
/* How often a session that libzmq would not take more from is tried again. */
#define S_BLOCKED_RETRY_MS 10
/* How long shutdown lets libzmq write the close_notify frames it holds. */
#define S_SHUTDOWN_LINGER_MS 500
/* Heartbeats of one session answered at most this often. */
#define S_HB_ANSWER_MS 100

enum { S_HANDSHAKE = 0, S_AWAIT_HELLO, S_READY, S_CLOSED };

typedef struct ml_session ml_session_t;

typedef struct {
    char id[ML_ULID_LEN + 1];
    uint8_t duplicate;
} ml_accid_t;

/* Most ids in one cumulative Accepted (~110 KB record). */
#define S_ACC_MAX 4096
typedef struct ml_put ml_put_t;

typedef struct {
    ml_qitem_t item;
    int64_t sent_at;
    int acked;
} ml_inflight_t;

/* At most ML_BK_LOG_BURST lines per ML_BK_LOG_WINDOW_MS for one source
 * (a node's refused messages): a registered node refused at its rate limit
 * for ever must not fill the disk with log lines (about 600 bytes each).
 * What is left out is counted and said on the next line logged. */
#define ML_BK_LOG_BURST 10
#define ML_BK_LOG_WINDOW_MS 60000
typedef struct {
    int64_t window_at; /* monotonic ms the window began */
    uint32_t logged;   /* lines in this window */
    uint64_t dropped;  /* lines left out since the last one logged */
} ml_bk_loglimit_t;
/* 1 when a line may be logged now; then *dropped is how many were left
 * out before it (and the count starts again). */
int ml_bk_loglimit(ml_bk_loglimit_t *l, int64_t now, uint64_t *dropped);

typedef struct {
    const ml_node_t *node;
    ml_queue_t queue;
    /* In-flight deliveries, in send order, in slots [if_head, if_head +
     * if_len). Acks normally come in order, so an ack is O(1): it hits the
     * head slot and the head advances. An out-of-order ack only flags its
     * slot. n_inflight counts the unacked slots. */
    ml_inflight_t *inflight;
    size_t if_head;
    size_t if_len;
    size_t n_inflight;
    size_t cap_inflight;
    ml_session_t *deliver;
    int online;
    int64_t last_seen;
    uint64_t delivered;
    /* Both count open cases whether they are in memory or only in the
     * store (flow.c, s_target_count). */
    uint32_t open_cases;       /* open cases this node is the target of */
    uint32_t opened;           /* open cases this node opened (open_cases_per_node) */
    uint32_t index;            /* in b->nodes, for ever (cases refer to nodes by it) */
    double rate_tokens;        /* node_rate token bucket */
    int64_t rate_at;           /* its last refill, monotonic ms */
    ml_bk_loglimit_t refusals; /* log lines for this node's refused messages */
    int removed;               /* taken out of the registry by a reload */
    ml_node_t own;             /* a removed node's registry entry (node points here) */
} ml_nodestate_t;

struct ml_session {
    uint8_t rid[S_RID_MAX];
    size_t rid_len;
    uint32_t hash;
    ml_session_t *hnext;
    ml_session_t *prev;
    ml_session_t *next;
    ml_session_t *dirty_next;
    int dirty;
    /* Unauthenticated sessions (TLS handshake not done) in creation order,
     * so that the oldest is the one evicted when max_preauth_sessions are
     * in progress. */
    ml_session_t *pa_prev;
    ml_session_t *pa_next;
    int preauth; /* on that list, counted in b->n_preauth */
    int authed;  /* past the handshake, counted in b->n_auth (max_sessions) */
    /* libzmq refused more output (the peer's pipe is at SNDHWM): the
     * ciphertext frame it did not take, and the list of such sessions that
     * a short timer tries again. */
    uint8_t *held;
    size_t held_len;
    ml_session_t *blocked_next;
    int blocked;
    int64_t hb_answered; /* last Heartbeat answered, monotonic ms */
    int sink;            /* a plaintext session of ml_broker_feed_plaintext: output is dropped */
    /* Per recipient (as addressed), the first message of this session
     * refused for now (a transient Nack): until it comes again, every later
     * message to that recipient is refused for now too, so that the order
     * per (sender, recipient) survives a busy or full broker. */
    struct ml_hold *holds;
    size_t n_holds;
    int state;
    int deliveries;
    uint64_t serial;
    ml_tls_session_t *tls;
    ml_frame_reader_t *reader;
    char *peer_id;
    ml_nodestate_t *ns;
    int64_t created;
    int64_t last_rx;
    int64_t expire_at;
    uint8_t *out;
    size_t out_len;
    size_t out_cap;
    ml_put_t *puts;
    /* Accepted answers not yet sent: one cumulative Accepted per flush. */
    ml_accid_t *acc;
    size_t n_acc;
    size_t cap_acc;
    char peer_hex[24];
};

/* A store put in progress; the session may go away before it completes. */
struct ml_put {
    ml_broker_t *b;
    ml_session_t *session;
    ml_put_t **head; /* the list it is on: its session's, or orphans */
    ml_put_t *prev;
    ml_put_t *next;
    ml_nodestate_t *recipient;
    int priority;
    int kind;
    int64_t deadline;
    uint32_t size;
    uint8_t *blob; /* copy of the envelope when it may be delivered at once */
    char id[ML_ULID_LEN + 1];
    /* Case work (flow.c): the cases this put changes (counted references)
     * and what to do once it is committed. */
    ml_case_t *cs;
    ml_case_t *linked;
    int has_ops;
    int action;      /* ML_BK_AFTER_* */
    int chunk_bytes; /* an imaging chunk's data bytes (counters) */
    int notice;      /* the broker's own message (ML_QI_NOTICE) */
    char to[256];    /* as the sender addressed it (holds, see ml_session) */
    int own;         /* the broker's own message: stored again until it is */
    /* The "case ... opened" log line of an opening, logged once the store
     * has it: a refused opening (an id in use, a full store) logs only its
     * refusal, within its node's budget. */
    char opened[768];
};

struct ml_broker {
    uv_loop_t *loop;
    ml_broker_config_t *cfg;
    ml_tls_ctx_t *tls;
    ml_keyring_t *keys; /* seals what the store writes, or NULL */
    ml_store_t *store;
    void *zctx;
    void *router;
    ml_zwatch_t *watch;
    char endpoint[256];

    ml_session_t *buckets[S_BUCKETS];
    ml_session_t *sessions; /* all sessions, including tombstones */
    ml_session_t *dirty;
    size_t n_live;
    size_t n_auth;         /* sessions past the TLS handshake: max_sessions */
    size_t n_preauth;      /* sessions in the TLS handshake: max_preauth_sessions */
    ml_session_t *pa_head; /* oldest unauthenticated session */
    ml_session_t *pa_tail;
    uint64_t preauth_evicted;          /* evictions not yet logged */
    ml_bk_loglimit_t preauth_refusals; /* refusals before a node is known */
    int64_t preauth_logged;            /* last eviction log line, monotonic ms */
    ml_session_t *blocked;             /* sessions libzmq would not take more from */
    uv_timer_t blocked_timer;
    uint64_t next_serial;

    /* Every node ever registered since start-up, in registration order: a
     * reload that removes a node marks it removed and one that adds a node
     * appends it, so indexes (which cases keep) never change. */
    ml_nodestate_t **nodes;
    size_t n_nodes;

    uv_timer_t housekeeping;
    uv_check_t flush_check;
    int open_handles;
    uint64_t puts_pending;
    uint64_t puts_pending_bytes;
    ml_put_t *orphans;   /* puts whose session closed before the commit */
    ml_put_t *retry_own; /* the broker's own messages a full store refused: sent again */
    struct s_change
        *changes;         /* the broker's own case changes the store has not answered (flow.c) */
    uint64_t cache_bytes; /* envelope copies held for delivery (S_CACHE_BYTES) */
    struct ml_dlq_wait *dlq_waits; /* replays and purges waiting for the store (admin.c) */

    ml_casetab_t cases;
    /* Cases not in a final state, in memory or only in the store (flow.c
     * keeps it with the per-node counts): the status' open count. */
    uint64_t open_total;
    char **services_gone; /* service names of cases whose service a reload removed */
    size_t n_services_gone;
    uint32_t rr; /* round robin among a service's consumers */
    uv_timer_t flow_timer;
    /* New connections per source address (handshakes_per_s): a
     * direct-mapped table of token buckets; a collision simply starts the
     * other address afresh, so memory stays fixed whatever the attacker. */
    struct {
        char addr[48];
        double tokens;
        int64_t at;
        int64_t logged; /* last refusal logged for it, monotonic ms */
    } hs[1024];

    int64_t started_at;
    uint64_t accepted_total;
    uint64_t delivered_total;
    uint64_t refused_total;
    uint64_t dead_total;
    int64_t max_sessions_logged;
    int64_t expiry_checked_at; /* Unix ms of the last expiry check (expiry.c) */
    int64_t expiry_logged_at;  /* Unix ms of the last expiry warnings logged */
    uint8_t *rxbuf;

    /* Ops' view (http.c, metrics.c, web.c, alerts.c): each module owns
     * its structure. */
    struct ml_bk_http *http;
    struct ml_bk_metrics *metrics;
    struct ml_bk_web *web;
    struct ml_bk_alerts *alerts;
};

/* ---- broker.c ---------------------------------------------------------- */

/* Sends a control or admin envelope from the broker to the session's peer
 * (id, from, to, created_at and kind are filled in). Returns 0 or ML_E*. */
int ml_bk_reply(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env);
/* Logs a refusal and answers the peer with a Nack. */
void ml_bk_refuse(ml_broker_t *b, ml_session_t *s, const char *msg_id, int code,
                  const char *reason);
/* A refusal for now (a transient code: RATE_LIMITED, STORE, STORE_FULL,
 * CONFLICT) of a message to `to`: also holds the session's later messages
 * to `to` until this one comes again (see ml_session.holds). */
void ml_bk_refuse_for_now(ml_broker_t *b, ml_session_t *s, const char *msg_id, const char *to,
                          int code, const char *reason);
/* What a hold is kept under for env: its `to`, with imaging chunks apart
 * (agents send chunks as a stream of their own, behind their other
 * messages, so a held chunk must not hold a referral, nor the reverse). */
const char *ml_bk_hold_key(const ml_envelope_t *env, char *buf, size_t len);
/* Holds the session's later messages to `to` too until msg_id comes again
 * (a message addressed to a service is held under the node it went to as
 * well: the session's messages to that node keep their order). */
void ml_bk_hold_also(ml_session_t *s, const char *to, const char *msg_id);
/* 1 when the session's messages to `to` are held for another message than
 * msg_id: the peer has been told (a transient Nack). 0 otherwise. */
int ml_bk_held(ml_broker_t *b, ml_session_t *s, const char *to, const char *msg_id);
/* The state of a registered node, or NULL (also for a removed one).
 * O(nodes). */
ml_nodestate_t *ml_bk_node(ml_broker_t *b, const char *id);
/* Index of ns in b->nodes. */
uint32_t ml_bk_node_index(const ml_broker_t *b, const ml_nodestate_t *ns);
/* Delivers what ns's queue and window allow. */
void ml_bk_pump(ml_broker_t *b, ml_nodestate_t *ns);

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
int ml_bk_submit(ml_broker_t *b, const ml_bk_msg_t *m);

/* Stores again the broker's own messages a failing store refused (a
 * forwarded referral, a notice, an escalation copy). Timer, loop thread. */
void ml_bk_retry_own(ml_broker_t *b);

/* Sends the broker's own message env (a notification, an escalation, a
 * forwarded referral) to recipient: fills id (when empty), from (when
 * empty: the broker's id), created_at and kind, packs and submits it with
 * the given case changes. Returns 0 or ML_E* (logged). */
int ml_bk_emit(ml_broker_t *b, ml_envelope_t *env, ml_nodestate_t *recipient, ml_case_t *cs,
               const ml_store_caseop_t *ops, size_t n_ops);

/* ---- flow.c ------------------------------------------------------------ */

enum {
    ML_BK_AFTER_NONE = 0,
    ML_BK_AFTER_FORWARD = 1,    /* forward the case's referral to its (new) target */
    ML_BK_AFTER_REREFERRED = 2, /* tell the down-transfer's hospital it went back up */
    ML_BK_AFTER_EXPIRED = 3,    /* the study expired at the reading centre: dead letter */
};

/* Counts the open cases of the store per node and loads those with a
 * deadline running into b->cases (start-up). Returns 0 or ML_ESTORE. */
int ml_bk_flow_load(ml_broker_t *b);
/* The case a pending message loaded at start-up belongs to (a reference is
 * taken), or NULL. */
ml_case_t *ml_bk_case_for_row(ml_broker_t *b, const char *case_id, int kind);
/* Routes a clinical message of a session: the case checks, then
 * ml_bk_submit, or a Nack naming what is wrong. digest is the SHA-256 of
 * rec as the sender sent it (see ml_bk_msg_t.digest). */
void ml_bk_flow_route(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env, const uint8_t *rec,
                      size_t len, const uint8_t *digest, int repack);
/* A put with case work settled (rc as from the store). Releases the put's
 * references. */
void ml_bk_flow_committed(ml_broker_t *b, ml_put_t *p, int rc, int duplicate);
/* The recipient acked item (delivery recorded in its case). */
void ml_bk_flow_delivered(ml_broker_t *b, ml_nodestate_t *ns, const ml_qitem_t *it);
/* Makes item (taken from a queue or the in-flight window of ns) a dead
 * letter with reason: stored as such, escalated, recorded in its case. The
 * item's blob and case reference are released. */
void ml_bk_dead_letter(ml_broker_t *b, ml_nodestate_t *ns, ml_qitem_t *it, const char *reason);
/* Drops a case reference (frees a final or gone case nobody needs). */
void ml_bk_case_release(ml_broker_t *b, ml_case_t *c);
/* One more change of c handed to the store (answered in
 * ml_bk_flow_committed or by the store's callback). */
void ml_bk_case_pending(ml_case_t *c);
/* Frees what the broker's own unanswered case changes hold (after the
 * store is closed: their callbacks never come). */
void ml_bk_flow_free_changes(ml_broker_t *b);
/* Starts the deadline and expiry timer. */
void ml_bk_flow_start(ml_broker_t *b);
/* Records an event the broker makes by itself (a replay, a delivery) in
 * c's timeline. */
void ml_bk_case_event(ml_broker_t *b, ml_case_t *c, const char *node, const char *event,
                      const char *message_id, int kind, const char *detail);
/* A reload is about to replace b->cfg with nc: cases that name a service
 * take nc's copy of the name (or a broker-owned one when nc has none). */
void ml_bk_flow_reload(ml_broker_t *b, ml_broker_config_t *nc);
/* The store row of c as it is in memory. */
void ml_bk_case_row(ml_broker_t *b, const ml_case_t *c, ml_store_case_t *row);
/* 1 when ns gets the ops nodes' Escalations: named in [escalation] notify,
 * or an OPS node when notify is empty (alerts.c sends its own). */
int ml_bk_is_ops(ml_broker_t *b, const ml_nodestate_t *ns);

/* ---- admin.c ----------------------------------------------------------- */

/* Answers an AdminRequest from an OPS session. */
void ml_bk_admin(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env);
/* Frees the replies still waiting for the store (after it is closed: their
 * callbacks never come). */
void ml_bk_admin_free(ml_broker_t *b);

#endif
