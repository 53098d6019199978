/* medlinkd's configuration: listen endpoint, TLS files, data folder, limits,
 * the node registry (node id -> role, community, display name) and the ACL
 * (which roles may send which kinds to which roles). Loaded from an INI file;
 * relative paths are resolved against the file's folder.
 *
 *   [broker]
 *   id = medlinkd.zhaozhou
 *   listen = tcp://127.0.0.1:7400   ; port 0: one the system picks
 *   port_file = run/medlinkd.port   ; optional: the ports it got (see below)
 *   data_dir = data/broker
 *   ca = pki/ca.crt
 *   cert = pki/medlinkd.zhaozhou.crt
 *   key = pki/medlinkd.zhaozhou.key
 *   crl =                       ; optional
 *   log_level = info
 *   max_record = 4194304        ; bytes per record
 *   heartbeat_ms = 2000         ; told to clients in Welcome
 *   session_timeout_ms = 10000  ; silent sessions are expired
 *   handshake_timeout_ms = 5000
 *   max_sessions = 4096
 *   session_buffer = 8388608    ; max bytes buffered per session
 *   delivery_window = 256       ; unacked deliveries in flight per node
 *   ack_timeout_ms = 30000      ; resend unacked deliveries after this
 *   crl_warn_days = 7           ; warn before the CRL, certificate or CA expire
 *
 *   [node county.zhaozhou.hospital]
 *   role = COUNTY_HOSPITAL
 *   community = zhaozhou
 *   name = Zhaozhou County People's Hospital
 *
 *   [acl TOWNSHIP_CLINIC]
 *   REFERRAL = COUNTY_HOSPITAL CITY_HOSPITAL
 *   REFERRAL_UPDATE = COUNTY_HOSPITAL CITY_HOSPITAL
 *
 * Services (competing consumers): a node lists the services it serves,
 *   [node reading.shijiazhuang.imaging]
 *   role = IMAGING_CENTRE
 *   services = imaging.ct imaging.dr
 * and a message addressed to "imaging.ct" goes to one of those nodes.
 *
 * Deadlines per case kind and priority (a key without a priority applies to
 * every priority not given its own line): the state the case must reach,
 * within how long of being opened, or of entering another state:
 *   [deadlines]
 *   referral.emergency = ACCEPTED 15m
 *   referral.urgent = ACCEPTED 2h
 *   imaging.emergency = REPORTED 1h
 *   down_transfer = ARRIVED 3d after ACCEPTED
 * Durations take a unit: ms, s, m, h or d.
 *
 *   [escalation]
 *   notify = ops.zhaozhou.admin   ; who gets Escalations (default: every OPS node)
 *   redirect_emergency = yes      ; an unaccepted EMERGENCY referral goes to the
 *                                 ; community's fallback hospital
 *   [community zhaozhou]
 *   fallback = city.shijiazhuang.hospital
 *
 * Ops' view (docs/operations.md):
 *   [http]
 *   listen = 127.0.0.1:9474     ; empty: no HTTP endpoint
 *   tls = no                    ; yes: HTTPS, client certificate of an OPS node
 *   max_connections = 64
 *
 *   [alerts]
 *   offline_alert_after = 1h    ; 0: never
 *   offline_alert_after.TOWNSHIP_CLINIC = 4h
 *   store_alert_percent = 90    ; of max_store_bytes
 *   dlq_alert_threshold = 1     ; dead letters waiting
 * and per node, [node ID] offline_alert_after = 30m.
 *
 * The port file ([broker] port_file, read at start only): once the ZeroMQ
 * endpoint and the HTTP endpoint are bound, and before systemd hears
 * READY=1, medlinkd writes there (temp file + rename, mode 0644) what it
 * actually got, one key=value a line:
 *   broker=tcp://127.0.0.1:41873
 *   http=127.0.0.1:39211          ; absent when [http] is off
 * so that "listen = tcp://127.0.0.1:0" (a port the system picks) can be
 * found by whoever started it; it is removed at a clean stop.
 */
#ifndef ML_BROKER_CONFIG_H
#define ML_BROKER_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "ml_check.h"
#include "ml_common.h" /* ML_LOG_FORMAT_TEXT / ML_LOG_FORMAT_JSON (ml_log_set_format) */

enum {
    ML_ROLE_UNKNOWN = 0,
    ML_ROLE_TOWNSHIP_CLINIC,
    ML_ROLE_VILLAGE_CLINIC,
    ML_ROLE_COUNTY_HOSPITAL,
    ML_ROLE_CITY_HOSPITAL,
    ML_ROLE_IMAGING_CENTRE,
    ML_ROLE_OPS,
    ML_ROLE_COUNT
};

#define ML_ACL_MAX_KIND 64 /* kinds are < 64 */

typedef struct {
    char *id;
    int role;
    char *community;
    char *display_name;
    char **services; /* service names this node serves */
    size_t n_services;
    int64_t offline_alert_ms; /* [node] offline_alert_after; -1: its role's, or [alerts]' */
} ml_node_t;

/* "the case must reach target_state within ms of being opened (after_state
 * 0) or of entering after_state". set = 0: no deadline. */
typedef struct {
    int set;
    int target_state;
    int after_state;
    int64_t ms;
} ml_deadline_rule_t;

typedef struct {
    char *name;
    char *fallback; /* a registered node id, or NULL */
} ml_community_t;

#define ML_CFG_CASE_KINDS 4 /* ML_CASE_KIND_COUNT of cases.h */
#define ML_CFG_PRIORITIES 3

typedef struct {
    char *path; /* the file it was loaded from */
    char *broker_id;
    char *listen;
    char *port_file; /* where main.c writes the bound endpoints, or NULL */
    char *data_dir;
    char *ca;
    char *cert;
    char *key;
    char *crl;             /* NULL when not configured */
    char *store_key;       /* key file sealing stored payloads, or NULL */
    char **store_old_keys; /* older key files that still open what they sealed */
    size_t n_store_old_keys;
    int log_level;
    long max_record;
    long heartbeat_ms;
    long session_timeout_ms;
    long handshake_timeout_ms;
    long max_sessions;
    long session_buffer;
    long delivery_window;
    long ack_timeout_ms;
    long max_delivery_attempts; /* then the message is a dead letter */
    long max_store_bytes;       /* refuse new messages past this database size (0 = none) */
    long handshakes_per_s;      /* new connections per second from one address */
    long node_rate;             /* routed messages per second from one node */
    long node_queue_bytes;      /* bytes waiting for one recipient before senders are refused */
    long open_cases_per_node;   /* open cases one node may have opened; more are refused */
    long timer_ms;              /* deadline and expiry checks */
    int notify_delivered;       /* tell openers when their case is delivered */
    long crl_warn_days;         /* warn this many days before the CRL, certificate or CA expire */
    /* Retention (docs/operations.md): delivered messages go retention_days
     * after their case became final, final cases' timelines
     * timeline_retention_days after (-1 = keep for ever). The *_seconds
     * keys override the days for tests and benchmarks (-1 = not set). */
    long retention_days;
    long timeline_retention_days;
    long retention_seconds;
    long timeline_retention_seconds;
    long retention_interval_s; /* how often pruning runs */
    long retention_batch;      /* rows per pruning transaction */
    long max_preauth_sessions; /* sessions still in the TLS handshake (oldest evicted) */
    long session_output_bytes; /* output queued for one session before deliveries pause */
    int log_format;            /* ML_LOG_FORMAT_TEXT or ML_LOG_FORMAT_JSON ([broker] log_format) */
    /* Credit (submit.c, ml_submit_credit): the store backlog (messages,
     * bytes) divided among the active senders as their send windows, at
     * most max_credit messages each; twice the backlog is the hard limit
     * past which a session's messages are refused (RATE_LIMITED). */
    long max_credit;
    long store_backlog;
    long store_backlog_bytes;

    /* [http]: the ops endpoint (http.h). listen NULL: off. */
    char *http_listen;         /* "127.0.0.1:9474" by default; "" in the file turns it off */
    int http_tls;              /* TLS with client certificates of the CA, OPS role only */
    long http_max_connections; /* connections at once; more are refused at accept */

    /* [alerts] (alerts.h). A node's offline alert comes after its own
     * offline_alert_after, else its role's offline_alert_after.ROLE, else
     * offline_alert_after; 0 means never. */
    int64_t offline_alert_ms;
    int64_t offline_alert_role_ms[ML_ROLE_COUNT]; /* by role; -1: not set */
    long store_alert_percent;                     /* of max_store_bytes (when set) */
    long dlq_alert_threshold; /* dead letters in the queue that raise the alert */

    ml_deadline_rule_t deadlines[ML_CFG_CASE_KINDS][ML_CFG_PRIORITIES];
    char **escalate_to; /* node ids; empty = every OPS node */
    size_t n_escalate_to;
    int redirect_emergency;
    ml_community_t *communities;
    size_t n_communities;

    ml_node_t *nodes;
    size_t n_nodes;
    /* acl[from_role][kind] is a bit mask of destination roles (1 << role). */
    uint32_t acl[ML_ROLE_COUNT][ML_ACL_MAX_KIND];
} ml_broker_config_t;

/* Loads and validates path. Returns 0, or ML_ECONFIG with err naming the
 * file, section, key and what was wrong (unknown role, unknown kind, missing
 * key, duplicate node, out-of-range number...). */
int ml_broker_config_load(const char *path, ml_broker_config_t **out, char *err, size_t errlen);
void ml_broker_config_destroy(ml_broker_config_t **self_p);

/* What medlinkd --check-config adds to loading: every file cfg names
 * exists and is readable, the TLS key and the store keys are private
 * (mode 0600 or 0400), the key matches the certificate, the CA and CRL
 * load, the store keys are key files, and data_dir is (or can be made) a
 * writable folder. Each problem is added to c. Returns 0 or ML_ECONFIG. */
int ml_broker_config_check(const ml_broker_config_t *cfg, ml_check_t *c);
/* The retention periods in ms (-1 = kept for ever): the *_seconds keys
 * when set, else the *_days ones. */
void ml_broker_config_retention(const ml_broker_config_t *cfg, int64_t *retention_ms,
                                int64_t *timeline_ms);

/* How long node may be offline before the offline alert (ms, 0: never):
 * its own setting, else its role's, else [alerts] offline_alert_after. */
int64_t ml_broker_config_offline_alert(const ml_broker_config_t *cfg, const ml_node_t *node);

/* Looks a node up by id. O(n) over the registry; NULL when unknown. */
const ml_node_t *ml_broker_config_node(const ml_broker_config_t *cfg, const char *id);

/* 1 if name is a service some registered node serves. O(nodes x services). */
int ml_broker_config_is_service(const ml_broker_config_t *cfg, const char *name);
/* 1 if node serves the service name. */
int ml_node_serves(const ml_node_t *node, const char *name);
/* The fallback hospital of a community, or NULL. */
const char *ml_broker_config_fallback(const ml_broker_config_t *cfg, const char *community);
/* The deadline rule for a case kind and priority (never NULL for valid
 * arguments; .set = 0 when there is none). */
const ml_deadline_rule_t *ml_broker_config_deadline(const ml_broker_config_t *cfg, int case_kind,
                                                    int priority);
/* Parses "15m", "2h", "3d", "30s", "500ms" into milliseconds. Returns 0 or
 * ML_EINVAL. */
int ml_duration_parse(const char *s, int64_t *ms);

/* 1 if a node of from_role may send kind to a node of to_role, else 0. */
int ml_acl_allows(const ml_broker_config_t *cfg, int from_role, int kind, int to_role);

/* "TOWNSHIP_CLINIC", ... (static); ml_role_parse returns 0 or ML_EINVAL. */
const char *ml_role_name(int role);
int ml_role_parse(const char *s, int *role);

#endif
