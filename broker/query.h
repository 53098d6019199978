/* What the ops modules (admin.c, http.c, metrics.c, web.c, alerts.c) may
 * read of the broker: read-only snapshots in plain structs and iterators
 * with a callback, so that none of them sees the broker's structures
 * (broker_int.h: sessions, nodes, cases, the store's backlog). The few
 * things ops staff may change (a dead letter replayed or purged, a store
 * prune, an escalation, an admin reply) are in ops_cmd.h, which the
 * modules that only show things (http.c, metrics.c, web.c) never include.
 *
 * Every view is borrowed: its strings and pointers are valid during the
 * callback (or until the broker next changes, for a function that fills a
 * struct), never across a turn of the loop. Loop thread only. */
#ifndef ML_BK_QUERY_H
#define ML_BK_QUERY_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "config.h"
#include "expiry.h"
#include "ml_tls.h"
#include "store.h"

typedef struct ml_broker ml_broker_t;
typedef struct ml_session ml_session_t;
struct ml_bk_http;
struct ml_bk_metrics;
struct ml_bk_web;
struct ml_bk_alerts;

/* ---- what the broker runs on ------------------------------------------ */

/* The broker's loop, its configuration as loaded now (replaced by a
 * reload: do not keep it across turns), its TLS context (NULL for a
 * broker without TLS, as some unit tests build). O(1). */
uv_loop_t *ml_query_loop(const ml_broker_t *b);
const ml_broker_config_t *ml_query_config(const ml_broker_t *b);
ml_tls_ctx_t *ml_query_tls(const ml_broker_t *b);

/* The ops modules' own state, kept on the broker (several brokers may live
 * in one process, as in the unit tests): each module gets and sets only
 * its own. O(1). */
struct ml_bk_http *ml_query_http(const ml_broker_t *b);
void ml_query_set_http(ml_broker_t *b, struct ml_bk_http *h);
struct ml_bk_metrics *ml_query_metrics(const ml_broker_t *b);
void ml_query_set_metrics(ml_broker_t *b, struct ml_bk_metrics *m);
struct ml_bk_web *ml_query_web(const ml_broker_t *b);
void ml_query_set_web(ml_broker_t *b, struct ml_bk_web *w);
struct ml_bk_alerts *ml_query_alerts(const ml_broker_t *b);
void ml_query_set_alerts(ml_broker_t *b, struct ml_bk_alerts *a);

/* ---- counters and readiness ------------------------------------------- */

typedef struct {
    int64_t started_at; /* Unix ms */
    uint64_t accepted_total;
    uint64_t delivered_total;
    uint64_t refused_total;
    uint64_t dead_total; /* dead letters made since start-up */
} ml_query_counters_t;
/* The broker's running totals (its id is ml_query_config's broker_id).
 * O(1). */
void ml_query_counters(const ml_broker_t *b, ml_query_counters_t *out);

typedef struct {
    uint64_t open;      /* cases not in a final state, in memory or only in the store */
    uint64_t overdue;   /* open cases whose deadline is at or before now */
    uint64_t in_memory; /* cases resident in memory */
} ml_query_case_counts_t;
/* Open cases are counted as they change; an overdue one has a deadline
 * running, so it is always in memory, which is walked: O(resident cases). */
void ml_query_case_counts(ml_broker_t *b, int64_t now, ml_query_case_counts_t *out);

typedef struct {
    int listening;         /* the ROUTER socket is bound */
    int store_open;        /* the store is open */
    uint64_t puts_pending; /* messages waiting to be written */
    int backlog_full;      /* the store's backlog is at its bound: new messages are refused */
} ml_query_ready_t;
/* What /readyz judges, O(1). */
void ml_query_ready(const ml_broker_t *b, ml_query_ready_t *out);

/* What ctx depends on that expires (ml_bk_expiry_list with the broker's
 * TLS context and crl_warn_days), as of now. Returns how many entries
 * there are (at most cap written). O(CAs). */
size_t ml_query_expiry(const ml_broker_t *b, int64_t now, ml_bk_expiry_t *out, size_t cap);

/* ---- sessions ----------------------------------------------------------- */

enum {
    ML_QUERY_SESSION_HANDSHAKE = 0, /* in the TLS handshake or before Hello */
    ML_QUERY_SESSION_READY = 1,     /* past Hello: a node's session */
    ML_QUERY_SESSION_CLOSED = 2,    /* a tombstone, gone at the next housekeeping */
};

typedef struct {
    int state;            /* ML_QUERY_SESSION_* */
    int sink;             /* a plaintext session whose output is dropped (tests, fuzzing) */
    uint64_t serial;      /* unique for the broker's life: finds it again later */
    const char *node_id;  /* the node it authenticated as; NULL before Hello */
    int role;             /* that node's ML_ROLE_*, 0 before Hello */
    const char *peer;     /* its routing id in hex */
    int64_t connected_at; /* Unix ms */
    int64_t last_seen;    /* Unix ms of the last record received */
    uint64_t in_flight;   /* its node's in-flight deliveries when it is the delivering session */
} ml_query_session_t;

/* Calls cb for every session, newest first (the order status lists them
 * in). O(sessions). */
void ml_query_sessions(ml_broker_t *b, void (*cb)(void *arg, const ml_query_session_t *s),
                       void *arg);
/* The view of one session the caller was handed (an admin request's). */
void ml_query_session(ml_broker_t *b, const ml_session_t *s, ml_query_session_t *out);
/* The ready session with this serial, or NULL when it has closed since
 * (an answer that waited for the store). O(sessions). */
ml_session_t *ml_query_session_find(ml_broker_t *b, uint64_t serial);

/* ---- nodes -------------------------------------------------------------- */

typedef struct {
    size_t index;            /* for ever (a reload only appends), from 0 */
    const ml_node_t *node;   /* its registry entry (id, role, names, community) */
    int removed;             /* taken out of the registry by a reload */
    int online;              /* > 0 while it has a delivery session */
    int64_t last_seen;       /* Unix ms it last sent anything, 0 if never since start */
    size_t queued;           /* messages queued, not in flight */
    int64_t queue_oldest_at; /* accepted_at of the oldest queued one, 0 if none */
    size_t in_flight;        /* delivered, not yet acked */
    int64_t oldest_at;       /* the oldest queued or unacked in-flight one, 0 if none */
    uint64_t delivered;      /* acked since start-up */
    uint32_t opened;         /* open cases it opened (open_cases_per_node) */
} ml_query_node_t;

/* How many nodes were ever registered since start-up, removed ones
 * included: every index below it is a node. O(1). */
size_t ml_query_node_count(const ml_broker_t *b);
/* Calls cb for every node ever registered, in index order, removed ones
 * included (with removed set). O(nodes + in-flight windows). */
void ml_query_nodes(ml_broker_t *b, void (*cb)(void *arg, const ml_query_node_t *n), void *arg);

/* ---- cases -------------------------------------------------------------- */

/* Calls cb with case_id's row: from memory when the case is resident (it
 * has the changes still being committed), else from the store. Returns 0,
 * ML_ENOTFOUND or ML_ESTORE. */
int ml_query_case(ml_broker_t *b, const char *case_id, ml_store_case_cb cb, void *arg);
/* The case's timeline as committed, oldest first. Returns 0 or ML_ESTORE. */
int ml_query_case_events(ml_broker_t *b, const char *case_id, ml_store_event_cb cb, void *arg);

typedef struct {
    int kind;           /* ML_CASE_*, 0 = any */
    int state;          /* a state of kind, -1 = any */
    int64_t overdue_at; /* only cases with a deadline at or before it; 0 = any */
    int limit;          /* most rows */
} ml_query_case_filter_t;
/* Committed cases matching f, most recently updated first. Returns 0 or
 * ML_ESTORE. O(matching rows) with the store's indexes. */
int ml_query_cases(ml_broker_t *b, const ml_query_case_filter_t *f, ml_store_case_cb cb, void *arg);

/* Committed open cases counted by kind and state (one GROUP BY: start-up
 * only). Returns 0 or ML_ESTORE. */
int ml_query_cases_open_states(ml_broker_t *b, ml_store_state_count_cb cb, void *arg);

/* ---- dead letters ------------------------------------------------------- */

/* Dead letters in the store now. Returns 0 or ML_ESTORE. */
int ml_query_dead_count(ml_broker_t *b, int64_t *n);
/* Copies of dead letters (the caller's until ml_query_deads_free): with
 * id, the one with this message id; else the newest first, at most limit
 * (-1: all). Those a replay or purge is committing are still listed: see
 * ml_ops_dlq_busy. Returns 0, ML_ENOTFOUND (no dead letter with id),
 * ML_ESTORE or ML_ENOMEM; the list is empty after a failure. */
typedef struct {
    ml_store_dead_t *items; /* strings owned by the list */
    size_t n;
    size_t cap;
    int failed;
} ml_query_deads_t;
int ml_query_dlq(ml_broker_t *b, const char *id, int limit, ml_query_deads_t *out);
/* NULL-safe, safe twice. */
void ml_query_deads_free(ml_query_deads_t *l);
/* The stored envelope of the message at seq (patient data: the caller
 * logs who read it). *blob is the caller's. Returns 0, ML_ENOTFOUND,
 * ML_ESTORE or ML_ENOMEM. */
int ml_query_fetch(ml_broker_t *b, int64_t seq, uint8_t **blob, size_t *len);

/* ---- the store ---------------------------------------------------------- */

/* Sizes and rows of broker.db from committed data: O(rows), an ops
 * command, not for a page refreshed every few seconds. Returns 0 or
 * ML_ESTORE. */
int ml_query_store_info(ml_broker_t *b, ml_store_info_t *out);
/* The store thread's group and commit histograms. O(1). */
void ml_query_store_stats(ml_broker_t *b, ml_store_stats_t *out);
/* Sizes of broker.db and its WAL (two stat(2) calls). */
void ml_query_store_files(ml_broker_t *b, uint64_t *db_bytes, uint64_t *wal_bytes);
/* 0 when the store can write, else ML_E* with a sentence in why. */
int ml_query_store_health(ml_broker_t *b, char *why, size_t len);

#endif
