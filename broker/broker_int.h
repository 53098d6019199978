/* Private to medlinkd's core: the structures the broker's modules share
 * (ml_broker_t, ml_session_t, ml_nodestate_t, ml_put_t). Functions live in
 * their modules' headers (wire.h, delivery.h, caseref.h, submit.h,
 * notices.h, deadlines.h, ingress.h, session.h); this header declares only
 * admin.c's entry points and, at its end, the old ml_bk_* names the ops
 * files still use. Loop thread only, like everything in them. */
#ifndef ML_BROKER_INT_H
#define ML_BROKER_INT_H

#include <stdint.h>

#include <uv.h>

#include "broker.h"
#include "casetab.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_frame.h"
#include "ml_loglimit.h"
#include "ml_tls.h"
#include "ml_zloop.h"
#include "queue.h"
#include "ml_sbuf.h"
#include "store.h"

#define S_RECV_BUDGET 512
#define S_FRAME_MAX (256 * 1024)
#define S_FLUSH_THRESHOLD (64 * 1024)
#define S_RID_MAX 255
/* Puts waiting for the store hold a copy of their envelope: bound them so
 * a burst cannot grow the broker past its memory budget. These are the
 * defaults of [broker] store_backlog / store_backlog_bytes, the budget the
 * senders' credit windows share (submit.c, ml_submit_credit); a session's
 * message is refused only past twice that (a peer ignoring its window). */
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
     * store (caseref.c, ml_caseref_count). */
    uint32_t open_cases;    /* open cases this node is the target of */
    uint32_t opened;        /* open cases this node opened (open_cases_per_node) */
    uint32_t index;         /* in b->nodes, for ever (cases refer to nodes by it) */
    double rate_tokens;     /* node_rate token bucket */
    int64_t rate_at;        /* its last refill, monotonic ms */
    ml_loglimit_t refusals; /* log lines for this node's refused messages (ml_loglimit.h) */
    int removed;            /* taken out of the registry by a reload */
    ml_node_t own;          /* a removed node's registry entry (node points here) */
} ml_nodestate_t;

struct ml_session {
    uint8_t rid[S_RID_MAX];
    size_t rid_len;
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
    int rx_kind; /* Kind of the message being handled, for the refusal metrics (session.c, s_record)
                  */
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
    /* Credit (submit.c): the window stamped on the next Accepted (wire.c,
     * ml_wire_credit), and the second (uv_now / 1000) this session last
     * sent a routed record plus one, which makes it one of the active
     * senders the backlog is divided among (0: never). */
    uint32_t credit_msgs;
    uint64_t credit_bytes;
    int64_t credit_seen;
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
    /* Case work (ingress.c, notices.c): the cases this put changes (counted references)
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

    struct ml_hash *by_rid; /* routing id -> session (session.c), keys borrowed */
    ml_session_t *sessions; /* all sessions, including tombstones */
    ml_session_t *dirty;
    size_t n_live;
    size_t n_auth;         /* sessions past the TLS handshake: max_sessions */
    size_t n_preauth;      /* sessions in the TLS handshake: max_preauth_sessions */
    ml_session_t *pa_head; /* oldest unauthenticated session */
    ml_session_t *pa_tail;
    uint64_t preauth_evicted;       /* evictions not yet logged */
    ml_loglimit_t preauth_refusals; /* refusals before a node is known */
    int64_t preauth_logged;         /* last eviction log line, monotonic ms */
    ml_session_t *blocked;          /* sessions libzmq would not take more from */
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
    /* Sessions that sent a routed record in second `epoch` (n_cur) and in
     * the second before (n_prev): the active senders of the last 1-2 s
     * (submit.c, ml_submit_credit). */
    struct {
        int64_t epoch;
        uint32_t n_cur;
        uint32_t n_prev;
        /* Sessions with puts waiting for the store: active too, however
         * long the store takes (a sender with a full window sends nothing). */
        uint32_t n_waiting;
        /* Puts of sessions waiting for the store (puts_pending less the
         * broker's own notices): what the windows bound and the hard limit
         * checks. */
        uint64_t session_puts;
    } credit;
    ml_put_t *orphans;   /* puts whose session closed before the commit */
    ml_put_t *retry_own; /* the broker's own messages a full store refused: sent again */
    struct s_change
        *changes;         /* the broker's own case changes the store has not answered (caseref.c) */
    uint64_t cache_bytes; /* envelope copies held for delivery (S_CACHE_BYTES) */
    struct ml_dlq_wait *dlq_waits; /* replays and purges waiting for the store (admin.c) */

    ml_casetab_t cases;
    /* Cases not in a final state, in memory or only in the store (caseref.c
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

    /* The calls a lower module makes up, registered by broker.c
     * (ml_broker_new): a module calls these instead of a function of a
     * module above it (broker/LAYERS). */
    struct {
        /* wire: s's output failed (TLS, memory, a peer not reading). */
        void (*close_session)(ml_broker_t *b, ml_session_t *s, const char *reason);
        /* wire: s's output drained after libzmq had refused some. */
        void (*drained)(ml_broker_t *b, ml_session_t *s);
        /* delivery: it (taken from ns's queue) can never be delivered. */
        void (*dead_letter)(ml_broker_t *b, ml_nodestate_t *ns, ml_qitem_t *it, const char *reason);
        /* submit: a put of case c (and lc) with action ML_BK_AFTER_* committed. */
        void (*after_commit)(ml_broker_t *b, int action, ml_case_t *c, ml_case_t *lc);
    } hooks;

    /* Ops' view (http.c, metrics.c, web.c, alerts.c): each module owns
     * its structure. */
    struct ml_bk_http *http;
    struct ml_bk_metrics *metrics;
    struct ml_bk_web *web;
    struct ml_bk_alerts *alerts;
};

/* ---- admin.c ----------------------------------------------------------- */

/* Answers an AdminRequest from an OPS session. */
void ml_bk_admin(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env);
/* Frees the replies still waiting for the store (after it is closed: their
 * callbacks never come). */
void ml_bk_admin_free(ml_broker_t *b);

/* ---- old names ---------------------------------------------------------- */

/* Temporary: the ops files (admin.c, alerts.c, http.c) still call these
 * functions by the names they had before broker.c and flow.c were split.
 * They go once those files read the broker through query.h. The
 * declarations repeat the modules' own (same types), so that this header
 * needs no module header above it. */
#define ml_bk_reply ml_wire_reply
#define ml_bk_refuse ml_wire_refuse
#define ml_bk_node ml_delivery_node
#define ml_bk_pump ml_delivery_pump
#define ml_bk_case_release ml_caseref_release
#define ml_bk_case_for_row ml_caseref_for_row
#define ml_bk_case_row ml_caseref_row
#define ml_bk_case_event ml_notices_case_event
#define ml_bk_emit ml_notices_emit
#define ml_bk_is_ops ml_notices_is_ops
int ml_wire_reply(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env);
void ml_wire_refuse(ml_broker_t *b, ml_session_t *s, const char *msg_id, int code,
                    const char *reason);
ml_nodestate_t *ml_delivery_node(ml_broker_t *b, const char *id);
void ml_delivery_pump(ml_broker_t *b, ml_nodestate_t *ns);
void ml_caseref_release(ml_broker_t *b, ml_case_t *c);
ml_case_t *ml_caseref_for_row(ml_broker_t *b, const char *case_id, int kind);
void ml_caseref_row(ml_broker_t *b, const ml_case_t *c, ml_store_case_t *row);
void ml_notices_case_event(ml_broker_t *b, ml_case_t *c, const char *node, const char *event,
                           const char *message_id, int kind, const char *detail);
int ml_notices_emit(ml_broker_t *b, ml_envelope_t *env, ml_nodestate_t *recipient, ml_case_t *cs,
                    const ml_store_caseop_t *ops, size_t n_ops);
int ml_notices_is_ops(ml_broker_t *b, const ml_nodestate_t *ns);

#endif
