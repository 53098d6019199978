/* The agent's configuration: the [agent] section of an INI file, with
 * defaults, range checks and relative paths resolved against the folder of
 * the file, so that an agent can be started from any working directory. */
#ifndef ML_ACONFIG_H
#define ML_ACONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "ml_check.h"

typedef struct {
    char *node_id;   /* our node id (the CN of our certificate) */
    char *broker;    /* ZeroMQ endpoint, e.g. "tcp://127.0.0.1:7400" */
    char *broker_id; /* the broker's certificate CN, or NULL (not pinned) */
    char *ca;        /* PEM CA bundle */
    char *cert;      /* PEM certificate of this node */
    char *key;       /* PEM private key of this node */
    char *data_dir;  /* holds agent.db */
    char *spool_dir; /* holds outbox/, pending/, sent/, rejected/, inbox/ */
    int log_level;   /* ML_LOG_* */
    int log_format;  /* ML_LOG_FORMAT_TEXT or ML_LOG_FORMAT_JSON ([agent] log_format) */
    uint32_t heartbeat_ms;
    uint32_t scan_ms;     /* period of the outbox/ scan */
    size_t max_record;    /* max record size on the wire */
    uint32_t send_window; /* unacknowledged sends in flight */
    /* Imaging: bytes per ImagingChunk this agent cuts objects into, and
     * the bytes it lets be in flight (sent, not yet Accepted), so that a
     * study of a few hundred MiB cannot fill the link. */
    uint32_t chunk_size;
    size_t send_window_bytes;
    /* Encryption at rest: the key file that seals what agent.db stores
     * from now on (NULL: stored in clear), and older key files that still
     * open what they sealed (rotation). Paths resolved like the others. */
    char *store_key;
    char **store_old_keys;
    size_t n_store_old_keys;
    /* Imaging limits: per consult this node sent, at most the study's
     * chunk count is sent again per resend_window_s (default 3600); a study
     * still incomplete in incoming/ incoming_expire_s after its consult
     * arrived (default 259200, 72 h) is deleted and refused. */
    uint32_t resend_window_s;
    uint32_t incoming_expire_s;
    /* Retention (docs/operations.md): settled outbox rows and spooled
     * inbox rows go retention_ms after they settled (retention_days,
     * default 30; -1 keeps them); files in sent/ go sent_retention_ms after
     * they arrived there (sent_retention_days, default 0 = kept). The
     * *_seconds keys override the days, for tests. Checked every
     * retention_interval_ms (retention_interval_s, default 60). */
    int64_t retention_ms;
    int64_t sent_retention_ms;
    int64_t retention_interval_ms;
} ml_aconfig_t;

/* Loads the [agent] section of path into cfg (zeroed first). Required keys:
 * node_id, broker, ca, cert, key, data_dir, spool_dir. store_old_keys (paths
 * separated by white space) needs store_key. chunk_size must lie
 * within ML_IMAGING_CHUNK_MIN..MAX and leave room for the envelope within
 * max_record. Returns 0, or
 * ML_ECONFIG / ML_ENOMEM with a sentence in err naming the file and key.
 * On failure cfg holds nothing to free. */
int ml_aconfig_load(const char *path, ml_aconfig_t *cfg, char *err, size_t errlen);
/* What medlink-agent --check-config adds to loading: every file cfg names
 * exists and is readable, the TLS key and the store keys are private
 * (mode 0600 or 0400), the key matches the certificate, the CA loads, the
 * store keys are key files, and data_dir and spool_dir are (or can be made)
 * writable folders. path is the file cfg came from, for the messages.
 * Each problem is added to c. Returns 0 or ML_ECONFIG. */
int ml_aconfig_check(const ml_aconfig_t *cfg, const char *path, ml_check_t *c);
/* SIGHUP (docs/operations.md, "Logs and systemd"): what a running agent
 * can take from a new file and what needs a restart. ml_aconfig_live_apply
 * copies the keys applied without a restart (log_level, log_format,
 * scan_ms, send_window, send_window_bytes, the retention keys) from next
 * into cur. ml_aconfig_restart_keys writes into out (outlen bytes) the
 * names, separated by ", ", of the keys whose value differs between cur and
 * next but that apply only at start-up (node_id, broker, broker_id, ca,
 * cert, key, data_dir, spool_dir, store_key, store_old_keys, heartbeat_ms,
 * max_record, chunk_size, resend_window_s, incoming_expire_s), and returns
 * how many there are. Neither takes ownership of anything. */
void ml_aconfig_live_apply(ml_aconfig_t *cur, const ml_aconfig_t *next);
int ml_aconfig_restart_keys(const ml_aconfig_t *cur, const ml_aconfig_t *next, char *out,
                            size_t outlen);
/* Frees the strings of cfg; safe on a zeroed or already cleared cfg. */
void ml_aconfig_clear(ml_aconfig_t *cfg);

#endif
