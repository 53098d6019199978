/* medlinkd's configuration: listen endpoint, TLS files, data folder, limits,
 * the node registry (node id -> role, community, display name) and the ACL
 * (which roles may send which kinds to which roles). Loaded from an INI file;
 * relative paths are resolved against the file's folder.
 *
 *   [broker]
 *   id = medlinkd.zhaozhou
 *   listen = tcp://127.0.0.1:7400
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
 *
 *   [node county.zhaozhou.hospital]
 *   role = COUNTY_HOSPITAL
 *   community = zhaozhou
 *   name = Zhaozhou County People's Hospital
 *
 *   [acl TOWNSHIP_CLINIC]
 *   REFERRAL = COUNTY_HOSPITAL CITY_HOSPITAL
 *   REFERRAL_UPDATE = COUNTY_HOSPITAL CITY_HOSPITAL
 */
#ifndef ML_BROKER_CONFIG_H
#define ML_BROKER_CONFIG_H

#include <stddef.h>
#include <stdint.h>

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
} ml_node_t;

typedef struct {
    char *path; /* the file it was loaded from */
    char *broker_id;
    char *listen;
    char *data_dir;
    char *ca;
    char *cert;
    char *key;
    char *crl; /* NULL when not configured */
    int log_level;
    long max_record;
    long heartbeat_ms;
    long session_timeout_ms;
    long handshake_timeout_ms;
    long max_sessions;
    long session_buffer;
    long delivery_window;
    long ack_timeout_ms;

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

/* Looks a node up by id. O(n) over the registry; NULL when unknown. */
const ml_node_t *ml_broker_config_node(const ml_broker_config_t *cfg, const char *id);

/* 1 if a node of from_role may send kind to a node of to_role, else 0. */
int ml_acl_allows(const ml_broker_config_t *cfg, int from_role, int kind, int to_role);

/* "TOWNSHIP_CLINIC", ... (static); ml_role_parse returns 0 or ML_EINVAL. */
const char *ml_role_name(int role);
int ml_role_parse(const char *s, int *role);

#endif
