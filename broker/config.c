/* medlinkd's configuration: reads the INI file through ml_ini, applies
 * defaults and range checks, resolves relative paths against the file's
 * folder, and builds the node registry and the ACL. Every error names the
 * file, the section and the key, because the reader is an operator with the
 * file open in an editor. Keys the broker does not know are refused rather
 * than ignored: a misspelt "hearbeat_ms" would otherwise leave the default
 * in force without a word. */
#include "config.h"

#include "cases.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "ml_check.h"
#include "ml_common.h"
#include "ml_crypt.h"
#include "ml_env.h"
#include "ml_ini.h"
#include "ml_tls.h"

#define S_BROKER "broker"
#define S_NODE_ID_MAX 255

static const char *const s_role_names[ML_ROLE_COUNT] = {
    [ML_ROLE_UNKNOWN] = "UNKNOWN",
    [ML_ROLE_TOWNSHIP_CLINIC] = "TOWNSHIP_CLINIC",
    [ML_ROLE_VILLAGE_CLINIC] = "VILLAGE_CLINIC",
    [ML_ROLE_COUNTY_HOSPITAL] = "COUNTY_HOSPITAL",
    [ML_ROLE_CITY_HOSPITAL] = "CITY_HOSPITAL",
    [ML_ROLE_IMAGING_CENTRE] = "IMAGING_CENTRE",
    [ML_ROLE_OPS] = "OPS",
};

const char *ml_role_name(int role)
{
    if (role <= ML_ROLE_UNKNOWN || role >= ML_ROLE_COUNT)
        return "UNKNOWN";
    return s_role_names[role];
}

int ml_role_parse(const char *s, int *role)
{
    if (!s)
        return ML_EINVAL;
    for (int r = ML_ROLE_UNKNOWN + 1; r < ML_ROLE_COUNT; r++) {
        if (strcasecmp(s_role_names[r], s) == 0) {
            *role = r;
            return 0;
        }
    }
    return ML_EINVAL;
}

/* Load state handed to the ml_ini callbacks. */
struct s_load {
    const ml_ini_t *ini;
    ml_broker_config_t *cfg;
    const char *section; /* the section being read, for messages */
    int acl_role;
    int rc;
    char *err;
    size_t errlen;
};

static int s_fail(struct s_load *ld, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Writes "path: message" and returns rc (non-zero, so ml_ini walks stop). */
static int s_fail(struct s_load *ld, int rc, const char *fmt, ...)
{
    char msg[384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (ld->err && ld->errlen)
        snprintf(ld->err, ld->errlen, "%s: %s", ld->cfg->path, msg);
    ld->rc = rc;
    return rc;
}

static int s_node_id_valid(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > S_NODE_ID_MAX)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && s[i] != '.' && s[i] != '_' && s[i] != '-')
            return 0;
    return 1;
}

/* Copies a [broker] string key into *out (NULL when absent or empty and not
 * required); relative paths are joined to the config file's folder. */
static int s_get_str(struct s_load *ld, const char *key, int required, int is_path, const char *def,
                     char **out)
{
    const char *v = ml_ini_get(ld->ini, S_BROKER, key, def);
    *out = NULL;
    if (!v || !*v) {
        if (required)
            return s_fail(ld, ML_ECONFIG, "[%s] %s is required", S_BROKER, key);
        return 0;
    }
    if (is_path && v[0] != '/') {
        const char *dir = ml_ini_dir(ld->ini);
        size_t n = strlen(dir) + strlen(v) + 2;
        if ((*out = malloc(n)))
            snprintf(*out, n, "%s/%s", dir, v);
    } else {
        *out = strdup(v);
    }
    if (!*out)
        return s_fail(ld, ML_ENOMEM, "out of memory");
    return 0;
}

/* Every section and key medlinkd reads (see ml_ini_check): a key missing
 * here is refused with "FILE:LINE: [broker] KEY: unknown key", so a new key
 * is one row here, next to the code below that reads it. */
/* clang-format off */
static const ml_ini_key_t s_schema[] = {
    {S_BROKER, "id"},
    {S_BROKER, "listen"},
    {S_BROKER, "port_file"},
    {S_BROKER, "data_dir"},
    {S_BROKER, "ca"},
    {S_BROKER, "cert"},
    {S_BROKER, "key"},
    {S_BROKER, "crl"},
    {S_BROKER, "log_level"},
    {S_BROKER, "max_record"},
    {S_BROKER, "heartbeat_ms"},
    {S_BROKER, "session_timeout_ms"},
    {S_BROKER, "handshake_timeout_ms"},
    {S_BROKER, "max_sessions"},
    {S_BROKER, "session_buffer"},
    {S_BROKER, "delivery_window"},
    {S_BROKER, "ack_timeout_ms"},
    {S_BROKER, "max_delivery_attempts"},
    {S_BROKER, "max_store_bytes"},
    {S_BROKER, "handshakes_per_s"},
    {S_BROKER, "store_key"},
    {S_BROKER, "store_old_keys"},
    {S_BROKER, "node_rate"},
    {S_BROKER, "node_queue_bytes"},
    {S_BROKER, "timer_ms"},
    {S_BROKER, "notify_delivered"},
    {S_BROKER, "crl_warn_days"},
    {S_BROKER, "retention_days"},
    {S_BROKER, "timeline_retention_days"},
    {S_BROKER, "retention_seconds"},
    {S_BROKER, "timeline_retention_seconds"},
    {S_BROKER, "retention_interval_s"},
    {S_BROKER, "retention_batch"},
    {S_BROKER, "max_preauth_sessions"},
    {S_BROKER, "session_output_bytes"},
    {S_BROKER, "open_cases_per_node"},
    {S_BROKER, "log_format"},
    {S_BROKER, "max_credit"},
    {S_BROKER, "store_backlog"},
    {S_BROKER, "store_backlog_bytes"},
    {"http", "listen"},
    {"http", "tls"},
    {"http", "max_connections"},
    /* offline_alert_after[.ROLE], store_alert_percent,
     * dlq_alert_threshold: s_alert_key_cb checks them. */
    {"alerts", "*"},
    {"node *", "offline_alert_after"},
    {"node *", "role"},
    {"node *", "community"},
    {"node *", "name"},
    {"node *", "services"},
    /* Keys of [acl ROLE] are message kinds and keys of [deadlines] are
     * KIND[.PRIORITY]: their parsers below check them. */
    {"acl *", "*"},
    {"deadlines", "*"},
    {"escalation", "notify"},
    {"escalation", "redirect_emergency"},
    {"community *", "fallback"},
    {NULL, NULL},
};
/* clang-format on */

/* yes/no, true/false, on/off, 1/0 (case-insensitive); def when absent. */
static int s_get_bool(struct s_load *ld, const char *section, const char *key, int def, int *out)
{
    const char *v = ml_ini_get(ld->ini, section, key, NULL);
    *out = def;
    if (!v || !*v)
        return 0;
    static const char *const yes[] = {"yes", "true", "on", "1"};
    static const char *const no[] = {"no", "false", "off", "0"};
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(v, yes[i]) == 0) {
            *out = 1;
            return 0;
        }
        if (strcasecmp(v, no[i]) == 0) {
            *out = 0;
            return 0;
        }
    }
    return s_fail(ld, ML_ECONFIG, "[%s] %s = %s: expected yes or no", section, key, v);
}

/* Splits a list of words separated by spaces or commas into a malloc'd
 * array of malloc'd strings. Returns 0 or ML_ENOMEM; words longer than 255
 * characters are refused with ML_EINVAL. */
static int s_words(const char *value, char ***out, size_t *n_out)
{
    char **words = NULL;
    size_t n = 0;
    const char *p = value;
    *out = NULL;
    *n_out = 0;
    while (p && *p) {
        while (*p && (isspace((unsigned char)*p) || *p == ','))
            p++;
        if (!*p)
            break;
        const char *start = p;
        while (*p && !isspace((unsigned char)*p) && *p != ',')
            p++;
        size_t len = (size_t)(p - start);
        char **grown = realloc(words, (n + 1) * sizeof *words);
        char *w = len <= S_NODE_ID_MAX ? strndup(start, len) : NULL;
        if (grown)
            words = grown;
        if (!grown || !w) {
            free(w);
            for (size_t i = 0; i < n; i++)
                free(words[i]);
            free(words);
            return len > S_NODE_ID_MAX ? ML_EINVAL : ML_ENOMEM;
        }
        words[n++] = w;
    }
    *out = words;
    *n_out = n;
    return 0;
}

static void s_words_free(char **words, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(words[i]);
    free(words);
}

int ml_duration_parse(const char *s, int64_t *ms)
{
    if (!s)
        return ML_EINVAL;
    char *end = NULL;
    while (isspace((unsigned char)*s))
        s++;
    if (!isdigit((unsigned char)*s))
        return ML_EINVAL;
    long long v = strtoll(s, &end, 10);
    if (v < 0 || v > 1000000000LL)
        return ML_EINVAL;
    static const struct {
        const char *unit;
        int64_t ms;
    } units[] = {{"ms", 1}, {"s", 1000}, {"m", 60000}, {"h", 3600000}, {"d", 86400000}};
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
        if (strcmp(end, units[i].unit) == 0) {
            *ms = (int64_t)v * units[i].ms;
            return 0;
        }
    }
    return ML_EINVAL;
}

static int s_load_broker(struct s_load *ld)
{
    ml_broker_config_t *c = ld->cfg;
    int rc;
    ld->section = S_BROKER;
    if ((rc = s_get_str(ld, "id", 1, 0, "medlinkd", &c->broker_id)) != 0 ||
        (rc = s_get_str(ld, "listen", 1, 0, NULL, &c->listen)) != 0 ||
        (rc = s_get_str(ld, "data_dir", 1, 1, NULL, &c->data_dir)) != 0 ||
        (rc = s_get_str(ld, "ca", 1, 1, NULL, &c->ca)) != 0 ||
        (rc = s_get_str(ld, "cert", 1, 1, NULL, &c->cert)) != 0 ||
        (rc = s_get_str(ld, "key", 1, 1, NULL, &c->key)) != 0 ||
        (rc = s_get_str(ld, "crl", 0, 1, NULL, &c->crl)) != 0 ||
        (rc = s_get_str(ld, "port_file", 0, 1, NULL, &c->port_file)) != 0 ||
        (rc = s_get_str(ld, "store_key", 0, 1, NULL, &c->store_key)) != 0)
        return rc;
    char why[256];
    if (ml_check_endpoint(c->listen, 1, why, sizeof why) != 0) {
        /* Checked here, at start: zmq_bind would only say "Invalid
         * argument". */
        ml_seterr(ld->err, ld->errlen, "%s:%d: [%s] listen = %s: %s", c->path,
                  ml_ini_line(ld->ini, S_BROKER, "listen"), S_BROKER, c->listen, why);
        ld->rc = ML_ECONFIG;
        return ML_ECONFIG;
    }
    if (!s_node_id_valid(c->broker_id))
        return s_fail(ld, ML_ECONFIG,
                      "[%s] id \"%s\" may only contain letters, digits, '.', '_' and '-'", S_BROKER,
                      c->broker_id);

    const char *level = ml_ini_get(ld->ini, S_BROKER, "log_level", "info");
    if (!*level)
        level = "info";
    if (ml_log_parse_level(level, &c->log_level) != 0)
        return s_fail(ld, ML_ECONFIG, "[%s] log_level = %s: expected debug, info, warn or error",
                      S_BROKER, level);

    /* Ranges: wide enough for any sane deployment, narrow enough to catch
     * a unit mistake (seconds where milliseconds are meant). Values told
     * to clients in Welcome must also fit its uint32 fields. */
    static const struct {
        const char *key;
        long def, min, max;
        size_t off;
    } nums[] = {
        {"max_record", 4194304, 4096, 256L * 1024 * 1024, offsetof(ml_broker_config_t, max_record)},
        {"heartbeat_ms", 2000, 100, 600000, offsetof(ml_broker_config_t, heartbeat_ms)},
        {"session_timeout_ms", 10000, 500, 3600000,
         offsetof(ml_broker_config_t, session_timeout_ms)},
        {"handshake_timeout_ms", 5000, 100, 600000,
         offsetof(ml_broker_config_t, handshake_timeout_ms)},
        {"max_sessions", 4096, 1, 1000000, offsetof(ml_broker_config_t, max_sessions)},
        {"session_buffer", 8388608, 65536, 4L * 1024 * 1024 * 1024,
         offsetof(ml_broker_config_t, session_buffer)},
        {"delivery_window", 256, 1, 65536, offsetof(ml_broker_config_t, delivery_window)},
        {"ack_timeout_ms", 30000, 100, 86400000, offsetof(ml_broker_config_t, ack_timeout_ms)},
        {"max_delivery_attempts", 10, 1, 100000,
         offsetof(ml_broker_config_t, max_delivery_attempts)},
        {"timer_ms", 1000, 10, 60000, offsetof(ml_broker_config_t, timer_ms)},
        {"max_store_bytes", 0, 0, 1L << 50, offsetof(ml_broker_config_t, max_store_bytes)},
        {"handshakes_per_s", 50, 1, 100000, offsetof(ml_broker_config_t, handshakes_per_s)},
        {"node_rate", 5000, 1, 10000000, offsetof(ml_broker_config_t, node_rate)},
        {"node_queue_bytes", 4L * 1024 * 1024 * 1024, 1024 * 1024, 1L << 50,
         offsetof(ml_broker_config_t, node_queue_bytes)},
        {"crl_warn_days", 7, 0, 3650, offsetof(ml_broker_config_t, crl_warn_days)},
        {"retention_days", 30, -1, 36500, offsetof(ml_broker_config_t, retention_days)},
        {"timeline_retention_days", 3650, -1, 36500,
         offsetof(ml_broker_config_t, timeline_retention_days)},
        {"retention_seconds", -1, -1, 36500L * 86400,
         offsetof(ml_broker_config_t, retention_seconds)},
        {"timeline_retention_seconds", -1, -1, 36500L * 86400,
         offsetof(ml_broker_config_t, timeline_retention_seconds)},
        {"retention_interval_s", 60, 1, 86400, offsetof(ml_broker_config_t, retention_interval_s)},
        {"retention_batch", 1000, 10, 100000, offsetof(ml_broker_config_t, retention_batch)},
        {"max_preauth_sessions", 256, 1, 1000000,
         offsetof(ml_broker_config_t, max_preauth_sessions)},
        {"session_output_bytes", 4L * 1024 * 1024, 64 * 1024, 1L << 30,
         offsetof(ml_broker_config_t, session_output_bytes)},
        {"open_cases_per_node", 5000, 1, 100000000,
         offsetof(ml_broker_config_t, open_cases_per_node)},
        /* Credit (docs/protocol.md): the store backlog shared among the
         * senders, and the most one session is granted. */
        {"max_credit", 4096, 1, 1000000, offsetof(ml_broker_config_t, max_credit)},
        {"store_backlog", 16384, 1, 1000000, offsetof(ml_broker_config_t, store_backlog)},
        {"store_backlog_bytes", 32L * 1024 * 1024, 4096, 1L << 34,
         offsetof(ml_broker_config_t, store_backlog_bytes)},
    };
    for (size_t i = 0; i < sizeof nums / sizeof nums[0]; i++) {
        long *dst = (long *)((char *)c + nums[i].off);
        rc = ml_ini_get_long(ld->ini, S_BROKER, nums[i].key, nums[i].def, nums[i].min, nums[i].max,
                             dst, ld->err, ld->errlen);
        if (rc != 0)
            return ld->rc = rc;
    }
    /* A session silent for less than a heartbeat would be expired while
     * perfectly healthy, and a buffer smaller than a record could never
     * hold one. */
    if (c->session_timeout_ms <= c->heartbeat_ms)
        return s_fail(ld, ML_ECONFIG,
                      "[%s] session_timeout_ms (%ld) must be greater than heartbeat_ms (%ld)",
                      S_BROKER, c->session_timeout_ms, c->heartbeat_ms);
    if (c->session_buffer < c->max_record)
        return s_fail(ld, ML_ECONFIG, "[%s] session_buffer (%ld) must be at least max_record (%ld)",
                      S_BROKER, c->session_buffer, c->max_record);
    const char *old = ml_ini_get(ld->ini, S_BROKER, "store_old_keys", NULL);
    if (old && *old) {
        if (!c->store_key)
            return s_fail(ld, ML_ECONFIG,
                          "[%s] store_old_keys needs store_key (the key that seals from now on)",
                          S_BROKER);
        if (s_words(old, &c->store_old_keys, &c->n_store_old_keys) != 0)
            return s_fail(ld, ML_ECONFIG, "[%s] store_old_keys: cannot read \"%s\"", S_BROKER, old);
        for (size_t i = 0; i < c->n_store_old_keys; i++) {
            char *p = c->store_old_keys[i];
            if (p[0] == '/')
                continue;
            const char *dir = ml_ini_dir(ld->ini);
            size_t n = strlen(dir) + strlen(p) + 2;
            char *full = malloc(n);
            if (!full)
                return s_fail(ld, ML_ENOMEM, "out of memory");
            snprintf(full, n, "%s/%s", dir, p);
            free(p);
            c->store_old_keys[i] = full;
        }
    }
    const char *fmt = ml_ini_get(ld->ini, S_BROKER, "log_format", "text");
    if (!*fmt || strcmp(fmt, "text") == 0)
        c->log_format = ML_LOG_FORMAT_TEXT;
    else if (strcmp(fmt, "json") == 0)
        c->log_format = ML_LOG_FORMAT_JSON;
    else
        return s_fail(ld, ML_ECONFIG, "[%s] log_format = %s: expected text or json", S_BROKER, fmt);
    return s_get_bool(ld, S_BROKER, "notify_delivered", 1, &c->notify_delivered);
}

/* "15m" and the like into ms, for a key of section (0 allowed: never). */
static int s_get_duration(struct s_load *ld, const char *section, const char *key, int64_t def,
                          int64_t *out)
{
    const char *v = ml_ini_get(ld->ini, section, key, NULL);
    *out = def;
    if (!v || !*v)
        return 0;
    if (strcmp(v, "0") == 0) {
        *out = 0;
        return 0;
    }
    if (ml_duration_parse(v, out) != 0 || *out < 0)
        return s_fail(ld, ML_ECONFIG,
                      "[%s] %s = %s: expected a duration with a unit (30s, 15m, 2h, 3d) or 0",
                      section, key, v);
    return 0;
}

/* [http]: where the ops endpoint listens, "HOST:PORT" with an IPv4
 * address or a bracketed IPv6 one (names would need a resolver at start). */
static int s_load_http(struct s_load *ld)
{
    ml_broker_config_t *c = ld->cfg;
    int rc;
    ld->section = "http";
    const char *v = ml_ini_get(ld->ini, "http", "listen", "127.0.0.1:9474");
    if (*v) {
        const char *colon = strrchr(v, ':');
        char *end = NULL;
        long port = colon ? strtol(colon + 1, &end, 10) : -1;
        size_t hl = colon ? (size_t)(colon - v) : 0;
        char host[64];
        int ok = colon && end && *end == '\0' && end != colon + 1 && port >= 0 && port <= 65535 &&
                 hl > 0 && hl < sizeof host;
        if (ok) {
            memcpy(host, v, hl);
            host[hl] = '\0';
            unsigned char a[16];
            if (host[0] == '[' && hl > 2 && host[hl - 1] == ']') {
                host[hl - 1] = '\0';
                ok = inet_pton(AF_INET6, host + 1, a) == 1;
            } else {
                ok = inet_pton(AF_INET, host, a) == 1;
            }
        }
        if (!ok)
            return s_fail(ld, ML_ECONFIG,
                          "[http] listen = %s: expected ADDRESS:PORT, an IPv4 address or a "
                          "bracketed IPv6 one (e.g. 127.0.0.1:9474), or nothing to turn it off",
                          v);
        if (!(c->http_listen = strdup(v)))
            return s_fail(ld, ML_ENOMEM, "out of memory");
    }
    if ((rc = s_get_bool(ld, "http", "tls", 0, &c->http_tls)) != 0)
        return rc;
    return ld->rc = ml_ini_get_long(ld->ini, "http", "max_connections", 64, 1, 100000,
                                    &c->http_max_connections, ld->err, ld->errlen);
}

static int s_alert_key_cb(const char *key, const char *value, void *arg)
{
    (void)value;
    struct s_load *ld = arg;
    const char *pre = "offline_alert_after.";
    if (strcmp(key, "offline_alert_after") == 0 || strcmp(key, "store_alert_percent") == 0 ||
        strcmp(key, "dlq_alert_threshold") == 0)
        return 0;
    if (strncmp(key, pre, strlen(pre)) != 0)
        return s_fail(ld, ML_ECONFIG,
                      "[alerts] %s: unknown key (expected offline_alert_after, "
                      "offline_alert_after.ROLE, store_alert_percent or dlq_alert_threshold)",
                      key);
    int role;
    if (ml_role_parse(key + strlen(pre), &role) != 0)
        return s_fail(ld, ML_ECONFIG, "[alerts] %s: unknown role %s", key, key + strlen(pre));
    return s_get_duration(ld, "alerts", key, 0, &ld->cfg->offline_alert_role_ms[role]);
}

static int s_load_alerts(struct s_load *ld)
{
    ml_broker_config_t *c = ld->cfg;
    int rc;
    ld->section = "alerts";
    for (size_t i = 0; i < sizeof c->offline_alert_role_ms / sizeof c->offline_alert_role_ms[0];
         i++)
        c->offline_alert_role_ms[i] = -1;
    if ((rc = s_get_duration(ld, "alerts", "offline_alert_after", 3600000, &c->offline_alert_ms)) !=
            0 ||
        (rc = ml_ini_keys(ld->ini, "alerts", s_alert_key_cb, ld)) != 0)
        return rc;
    if ((rc = ml_ini_get_long(ld->ini, "alerts", "store_alert_percent", 90, 1, 100,
                              &c->store_alert_percent, ld->err, ld->errlen)) != 0 ||
        (rc = ml_ini_get_long(ld->ini, "alerts", "dlq_alert_threshold", 1, 1, 100000000,
                              &c->dlq_alert_threshold, ld->err, ld->errlen)) != 0)
        return ld->rc = rc;
    return 0;
}

int64_t ml_broker_config_offline_alert(const ml_broker_config_t *cfg, const ml_node_t *node)
{
    if (node->offline_alert_ms >= 0)
        return node->offline_alert_ms;
    if (node->role > 0 && node->role < ML_ROLE_COUNT && cfg->offline_alert_role_ms[node->role] >= 0)
        return cfg->offline_alert_role_ms[node->role];
    return cfg->offline_alert_ms;
}

static int s_dup_opt(struct s_load *ld, const char *v, char **out)
{
    *out = NULL;
    if (!v || !*v)
        return 0;
    if (!(*out = strdup(v)))
        return s_fail(ld, ML_ENOMEM, "out of memory");
    return 0;
}

static int s_node_cb(const ml_ini_t *ini, const char *section, const char *name, void *arg)
{
    struct s_load *ld = arg;
    ml_broker_config_t *c = ld->cfg;
    int rc;
    ld->section = section;
    if (!s_node_id_valid(name))
        return s_fail(ld, ML_ECONFIG,
                      "[%s]: node id \"%s\" must be 1 to %d letters, digits, '.', '_' or '-'",
                      section, name, S_NODE_ID_MAX);
    /* ml_ini refuses a repeated section header; this catches the same id
     * written with different spacing ("node a" and "node  a"). */
    if (ml_broker_config_node(c, name))
        return s_fail(ld, ML_ECONFIG, "[%s]: node %s is defined twice", section, name);

    const char *role = ml_ini_get(ini, section, "role", NULL);
    if (!role || !*role)
        return s_fail(ld, ML_ECONFIG, "[%s] role is required", section);
    ml_node_t n = {0};
    if (ml_role_parse(role, &n.role) != 0)
        return s_fail(ld, ML_ECONFIG,
                      "[%s] role = %s: unknown role (expected TOWNSHIP_CLINIC, VILLAGE_CLINIC, "
                      "COUNTY_HOSPITAL, CITY_HOSPITAL, IMAGING_CENTRE or OPS)",
                      section, role);

    ml_node_t *nodes = realloc(c->nodes, (c->n_nodes + 1) * sizeof *nodes);
    if (!nodes)
        return s_fail(ld, ML_ENOMEM, "out of memory");
    c->nodes = nodes;
    /* Count the node in first so that destroy frees whatever was copied. */
    ml_node_t *slot = &c->nodes[c->n_nodes++];
    *slot = n;
    if (!(slot->id = strdup(name)))
        return s_fail(ld, ML_ENOMEM, "out of memory");
    if ((rc = s_get_duration(ld, section, "offline_alert_after", -1, &slot->offline_alert_ms)) != 0)
        return rc;
    if ((rc = s_dup_opt(ld, ml_ini_get(ini, section, "community", NULL), &slot->community)) ||
        (rc = s_dup_opt(ld, ml_ini_get(ini, section, "name", NULL), &slot->display_name)))
        return rc;
    const char *svc = ml_ini_get(ini, section, "services", NULL);
    if (svc && *svc) {
        rc = s_words(svc, &slot->services, &slot->n_services);
        if (rc == ML_ENOMEM)
            return s_fail(ld, ML_ENOMEM, "out of memory");
        if (rc != 0)
            return s_fail(ld, ML_ECONFIG, "[%s] services: a name is too long", section);
        for (size_t i = 0; i < slot->n_services; i++)
            if (!s_node_id_valid(slot->services[i]))
                return s_fail(ld, ML_ECONFIG,
                              "[%s] services: \"%s\" may only contain letters, digits, '.', "
                              "'_' and '-'",
                              section, slot->services[i]);
    }
    return 0;
}

/* After every node is known: a service name must not also be a node id,
 * or "to" would be ambiguous. */
static int s_check_services(struct s_load *ld)
{
    ml_broker_config_t *c = ld->cfg;
    for (size_t i = 0; i < c->n_nodes; i++)
        for (size_t j = 0; j < c->nodes[i].n_services; j++)
            if (ml_broker_config_node(c, c->nodes[i].services[j]))
                return s_fail(ld, ML_ECONFIG,
                              "[node %s] services: %s is also a node id; a service needs a "
                              "name of its own",
                              c->nodes[i].id, c->nodes[i].services[j]);
    return 0;
}

/* One line of [deadlines]: "KIND[.PRIORITY] = STATE DURATION [after STATE]". */
static int s_deadline_key_cb(const char *key, const char *value, void *arg)
{
    struct s_load *ld = arg;
    char kindbuf[64];
    const char *dot = strchr(key, '.');
    size_t klen = dot ? (size_t)(dot - key) : strlen(key);
    int kind = 0, prio = -1;
    if (klen >= sizeof kindbuf)
        return s_fail(ld, ML_ECONFIG, "[deadlines] %s: unknown case kind", key);
    memcpy(kindbuf, key, klen);
    kindbuf[klen] = '\0';
    if (ml_case_kind_parse(kindbuf, &kind) != 0)
        return s_fail(ld, ML_ECONFIG,
                      "[deadlines] %s: unknown case kind \"%s\" (expected referral, imaging or "
                      "down_transfer)",
                      key, kindbuf);
    if (dot && ml_priority_parse(dot + 1, &prio) != 0)
        return s_fail(ld, ML_ECONFIG,
                      "[deadlines] %s: unknown priority \"%s\" (expected routine, urgent or "
                      "emergency)",
                      key, dot + 1);
    char **w = NULL;
    size_t n = 0;
    if (s_words(value, &w, &n) != 0)
        return s_fail(ld, ML_ECONFIG, "[deadlines] %s: cannot read \"%s\"", key, value);
    ml_deadline_rule_t r = {.set = 1};
    int rc = 0;
    if (!(n == 2 || (n == 4 && strcasecmp(w[2], "after") == 0))) {
        rc = s_fail(ld, ML_ECONFIG,
                    "[deadlines] %s = %s: expected \"STATE DURATION\" or \"STATE DURATION after "
                    "STATE\", e.g. \"ACCEPTED 15m\"",
                    key, value);
    } else if (ml_case_state_parse(kind, w[0], &r.target_state) != 0) {
        rc = s_fail(ld, ML_ECONFIG, "[deadlines] %s: %s is not a state of a %s case", key, w[0],
                    ml_case_kind_name(kind));
    } else if (ml_duration_parse(w[1], &r.ms) != 0 || r.ms <= 0) {
        rc = s_fail(ld, ML_ECONFIG,
                    "[deadlines] %s: duration \"%s\" needs a number and a unit (ms, s, m, h, "
                    "d), e.g. 15m",
                    key, w[1]);
    } else if (n == 4 && ml_case_state_parse(kind, w[3], &r.after_state) != 0) {
        rc = s_fail(ld, ML_ECONFIG, "[deadlines] %s: %s is not a state of a %s case", key, w[3],
                    ml_case_kind_name(kind));
    } else if (ml_case_rank(kind, r.target_state) <=
               (r.after_state ? ml_case_rank(kind, r.after_state) : 1)) {
        rc = s_fail(
            ld, ML_ECONFIG,
            "[deadlines] %s: %s does not come after %s, so the deadline could never run", key,
            ml_case_state_name(kind, r.target_state),
            ml_case_state_name(kind, r.after_state ? r.after_state : ml_case_initial_state(kind)));
    }
    s_words_free(w, n);
    if (rc != 0)
        return rc;
    ml_broker_config_t *c = ld->cfg;
    for (int p = 0; p < ML_CFG_PRIORITIES; p++) {
        /* A line for one priority wins over a line for all of them,
         * whatever their order in the file. */
        if (prio >= 0 && p != prio)
            continue;
        if (prio < 0 && c->deadlines[kind][p].set == 2)
            continue;
        c->deadlines[kind][p] = r;
        if (prio >= 0)
            c->deadlines[kind][p].set = 2;
    }
    return 0;
}

static int s_check_node_ref(struct s_load *ld, const char *section, const char *key, const char *id)
{
    if (!ml_broker_config_node(ld->cfg, id))
        return s_fail(ld, ML_ECONFIG, "[%s] %s: %s is not a registered node", section, key, id);
    return 0;
}

static int s_load_escalation(struct s_load *ld)
{
    ml_broker_config_t *c = ld->cfg;
    int rc;
    ld->section = "escalation";
    const char *notify = ml_ini_get(ld->ini, "escalation", "notify", NULL);
    if (notify && *notify) {
        if (s_words(notify, &c->escalate_to, &c->n_escalate_to) != 0)
            return s_fail(ld, ML_ECONFIG, "[escalation] notify: cannot read \"%s\"", notify);
        for (size_t i = 0; i < c->n_escalate_to; i++)
            if ((rc = s_check_node_ref(ld, "escalation", "notify", c->escalate_to[i])) != 0)
                return rc;
    }
    return s_get_bool(ld, "escalation", "redirect_emergency", 1, &c->redirect_emergency);
}

static int s_community_cb(const ml_ini_t *ini, const char *section, const char *name, void *arg)
{
    struct s_load *ld = arg;
    ml_broker_config_t *c = ld->cfg;
    int rc;
    ld->section = section;
    ml_community_t *grown = realloc(c->communities, (c->n_communities + 1) * sizeof *grown);
    if (!grown)
        return s_fail(ld, ML_ENOMEM, "out of memory");
    c->communities = grown;
    ml_community_t *slot = &c->communities[c->n_communities++];
    memset(slot, 0, sizeof *slot);
    if (!(slot->name = strdup(name)))
        return s_fail(ld, ML_ENOMEM, "out of memory");
    const char *fb = ml_ini_get(ini, section, "fallback", NULL);
    if ((rc = s_dup_opt(ld, fb, &slot->fallback)) != 0)
        return rc;
    if (slot->fallback && (rc = s_check_node_ref(ld, section, "fallback", slot->fallback)) != 0)
        return rc;
    return 0;
}

/* One line of an [acl ROLE] section: "KIND = ROLE ROLE ...". Destination
 * roles may be separated by spaces or commas. A repeated kind adds to the
 * earlier line. */
static int s_acl_key_cb(const char *key, const char *value, void *arg)
{
    struct s_load *ld = arg;
    int kind;
    if (ml_kind_parse(key, &kind) != 0)
        return s_fail(ld, ML_ECONFIG, "[%s] %s: unknown message kind", ld->section, key);
    if (!ml_env_kind_is_routed(kind) || kind >= ML_ACL_MAX_KIND)
        return s_fail(ld, ML_ECONFIG,
                      "[%s] %s: not a routed kind (session and admin messages need no ACL)",
                      ld->section, key);
    uint32_t mask = 0;
    const char *p = value;
    while (*p) {
        while (*p && (isspace((unsigned char)*p) || *p == ','))
            p++;
        if (!*p)
            break;
        const char *start = p;
        while (*p && !isspace((unsigned char)*p) && *p != ',')
            p++;
        char word[64] = "";
        int role = ML_ROLE_UNKNOWN;
        int n = (int)(p - start);
        if (n < (int)sizeof word) {
            memcpy(word, start, (size_t)n);
            word[n] = '\0';
        }
        if (!*word || ml_role_parse(word, &role) != 0)
            return s_fail(ld, ML_ECONFIG, "[%s] %s: unknown role \"%.*s\"", ld->section, key,
                          n > 64 ? 64 : n, start);
        mask |= 1u << role;
    }
    ld->cfg->acl[ld->acl_role][kind] |= mask;
    return 0;
}

static int s_acl_cb(const ml_ini_t *ini, const char *section, const char *name, void *arg)
{
    struct s_load *ld = arg;
    ld->section = section;
    if (ml_role_parse(name, &ld->acl_role) != 0)
        return s_fail(ld, ML_ECONFIG, "[%s]: unknown role %s", section, name);
    return ml_ini_keys(ini, section, s_acl_key_cb, ld);
}

int ml_broker_config_load(const char *path, ml_broker_config_t **out, char *err, size_t errlen)
{
    ml_ini_t *ini = NULL;
    struct s_load ld = {.err = err, .errlen = errlen};
    int rc;

    ld.cfg = calloc(1, sizeof *ld.cfg);
    if (!ld.cfg || !(ld.cfg->path = strdup(path ? path : ""))) {
        if (err && errlen)
            snprintf(err, errlen, "out of memory");
        rc = ML_ENOMEM;
        goto out;
    }
    rc = ml_ini_load(path, &ini, err, errlen);
    if (rc != 0)
        goto out;
    ld.ini = ini;
    /* Unknown sections and keys first: a misspelt [brokr] would otherwise
     * surface as "[broker] listen is required", pointing at the wrong line. */
    if ((rc = ml_ini_check(ini, s_schema, err, errlen)) != 0)
        goto out;
    if ((rc = s_load_broker(&ld)) != 0 || (rc = s_load_http(&ld)) != 0 ||
        (rc = s_load_alerts(&ld)) != 0)
        goto out;
    if ((rc = ml_ini_sections(ini, "node", s_node_cb, &ld)) != 0)
        goto out;
    if ((rc = ml_ini_sections(ini, "acl", s_acl_cb, &ld)) != 0)
        goto out;
    if ((rc = s_check_services(&ld)) != 0)
        goto out;
    ld.section = "deadlines";
    if ((rc = ml_ini_keys(ini, "deadlines", s_deadline_key_cb, &ld)) != 0)
        goto out;
    if ((rc = s_load_escalation(&ld)) != 0)
        goto out;
    if ((rc = ml_ini_sections(ini, "community", s_community_cb, &ld)) != 0)
        goto out;
    *out = ld.cfg;
    ld.cfg = NULL;
out:
    /* Everything here is an ML_ECONFIG to the caller except running out of
     * memory. */
    if (rc != 0 && rc != ML_ENOMEM)
        rc = ML_ECONFIG;
    ml_broker_config_destroy(&ld.cfg);
    ml_ini_destroy(&ini);
    return rc;
}

void ml_broker_config_destroy(ml_broker_config_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    ml_broker_config_t *c = *self_p;
    for (size_t i = 0; i < c->n_nodes; i++) {
        free(c->nodes[i].id);
        free(c->nodes[i].community);
        free(c->nodes[i].display_name);
        s_words_free(c->nodes[i].services, c->nodes[i].n_services);
    }
    s_words_free(c->escalate_to, c->n_escalate_to);
    for (size_t i = 0; i < c->n_communities; i++) {
        free(c->communities[i].name);
        free(c->communities[i].fallback);
    }
    free(c->communities);
    free(c->nodes);
    free(c->path);
    free(c->broker_id);
    free(c->listen);
    free(c->http_listen);
    free(c->data_dir);
    free(c->ca);
    free(c->cert);
    free(c->key);
    free(c->crl);
    free(c->port_file);
    free(c->store_key);
    s_words_free(c->store_old_keys, c->n_store_old_keys);
    free(c);
    *self_p = NULL;
}

void ml_broker_config_retention(const ml_broker_config_t *cfg, int64_t *retention_ms,
                                int64_t *timeline_ms)
{
    long d = cfg->retention_days, td = cfg->timeline_retention_days;
    *retention_ms = cfg->retention_seconds >= 0 ? (int64_t)cfg->retention_seconds * 1000
                    : d >= 0                    ? (int64_t)d * 86400000
                                                : -1;
    *timeline_ms = cfg->timeline_retention_seconds >= 0
                       ? (int64_t)cfg->timeline_retention_seconds * 1000
                   : td >= 0 ? (int64_t)td * 86400000
                             : -1;
}

const ml_node_t *ml_broker_config_node(const ml_broker_config_t *cfg, const char *id)
{
    if (!cfg || !id)
        return NULL;
    for (size_t i = 0; i < cfg->n_nodes; i++)
        if (cfg->nodes[i].id && strcmp(cfg->nodes[i].id, id) == 0)
            return &cfg->nodes[i];
    return NULL;
}

int ml_acl_allows(const ml_broker_config_t *cfg, int from_role, int kind, int to_role)
{
    if (!cfg || from_role <= ML_ROLE_UNKNOWN || from_role >= ML_ROLE_COUNT ||
        to_role <= ML_ROLE_UNKNOWN || to_role >= ML_ROLE_COUNT || kind < 0 ||
        kind >= ML_ACL_MAX_KIND)
        return 0;
    return (cfg->acl[from_role][kind] >> to_role) & 1u;
}

int ml_node_serves(const ml_node_t *node, const char *name)
{
    for (size_t i = 0; node && name && i < node->n_services; i++)
        if (strcmp(node->services[i], name) == 0)
            return 1;
    return 0;
}

int ml_broker_config_is_service(const ml_broker_config_t *cfg, const char *name)
{
    for (size_t i = 0; cfg && i < cfg->n_nodes; i++)
        if (ml_node_serves(&cfg->nodes[i], name))
            return 1;
    return 0;
}

const char *ml_broker_config_fallback(const ml_broker_config_t *cfg, const char *community)
{
    for (size_t i = 0; cfg && community && i < cfg->n_communities; i++)
        if (strcmp(cfg->communities[i].name, community) == 0)
            return cfg->communities[i].fallback;
    return NULL;
}

const ml_deadline_rule_t *ml_broker_config_deadline(const ml_broker_config_t *cfg, int case_kind,
                                                    int priority)
{
    static const ml_deadline_rule_t none = {0};
    if (!cfg || case_kind <= 0 || case_kind >= ML_CFG_CASE_KINDS || priority < 0 ||
        priority >= ML_CFG_PRIORITIES)
        return &none;
    return &cfg->deadlines[case_kind][priority];
}

int ml_broker_config_check(const ml_broker_config_t *cfg, ml_check_t *c)
{
    char prefix[600], err[1024];
    int n = c->n;
    snprintf(prefix, sizeof prefix, "%s: [%s]", cfg->path, S_BROKER);
    ml_tls_config_t tls = {cfg->ca, cfg->cert, cfg->key, cfg->crl, 1};
    ml_tls_check(&tls, prefix, NULL, c);
    if (cfg->store_key) {
        int bad = 0;
        char what[700];
        snprintf(what, sizeof what, "%s store_key", prefix);
        bad |= ml_check_file(c, what, cfg->store_key, ML_CHECK_PRIVATE);
        snprintf(what, sizeof what, "%s store_old_keys", prefix);
        for (size_t i = 0; i < cfg->n_store_old_keys; i++)
            bad |= ml_check_file(c, what, cfg->store_old_keys[i], ML_CHECK_PRIVATE);
        ml_keyring_t *kr = NULL;
        /* The files are there and private: now their contents. */
        if (!bad && ml_keyring_load(cfg->store_key, (const char *const *)cfg->store_old_keys,
                                    cfg->n_store_old_keys, &kr, err, sizeof err) != 0)
            ml_check_add(c, "%s store_key: %s", prefix, err);
        ml_keyring_destroy(&kr);
    }
    char what[700];
    snprintf(what, sizeof what, "%s data_dir", prefix);
    ml_check_dir(c, what, cfg->data_dir);
    return c->n > n ? ML_ECONFIG : 0;
}
