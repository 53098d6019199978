/* medlinkd's configuration: reads the INI file through ml_ini, applies
 * defaults and range checks, resolves relative paths against the file's
 * folder, and builds the node registry and the ACL. Every error names the
 * file, the section and the key, because the reader is an operator with the
 * file open in an editor. Keys the broker does not know are refused rather
 * than ignored: a misspelt "hearbeat_ms" would otherwise leave the default
 * in force without a word. */
#include "config.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "ml_common.h"
#include "ml_env.h"
#include "ml_ini.h"

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

static int s_is_one_of(const char *key, const char *const *keys)
{
    for (size_t i = 0; keys[i]; i++)
        if (strcmp(keys[i], key) == 0)
            return 1;
    return 0;
}

static const char *const s_broker_keys[] = {"id",
                                            "listen",
                                            "data_dir",
                                            "ca",
                                            "cert",
                                            "key",
                                            "crl",
                                            "log_level",
                                            "max_record",
                                            "heartbeat_ms",
                                            "session_timeout_ms",
                                            "handshake_timeout_ms",
                                            "max_sessions",
                                            "session_buffer",
                                            "delivery_window",
                                            "ack_timeout_ms",
                                            NULL};

static const char *const s_node_keys[] = {"role", "community", "name", NULL};

static int s_check_key_cb(const char *key, const char *value, void *arg)
{
    struct s_load *ld = arg;
    const char *const *keys = strcmp(ld->section, S_BROKER) == 0 ? s_broker_keys : s_node_keys;
    (void)value;
    if (!s_is_one_of(key, keys))
        return s_fail(ld, ML_ECONFIG, "[%s] %s: unknown key", ld->section, key);
    return 0;
}

static int s_load_broker(struct s_load *ld)
{
    ml_broker_config_t *c = ld->cfg;
    int rc;
    ld->section = S_BROKER;
    if ((rc = ml_ini_keys(ld->ini, S_BROKER, s_check_key_cb, ld)) != 0)
        return rc;
    if ((rc = s_get_str(ld, "id", 1, 0, "medlinkd", &c->broker_id)) != 0 ||
        (rc = s_get_str(ld, "listen", 1, 0, NULL, &c->listen)) != 0 ||
        (rc = s_get_str(ld, "data_dir", 1, 1, NULL, &c->data_dir)) != 0 ||
        (rc = s_get_str(ld, "ca", 1, 1, NULL, &c->ca)) != 0 ||
        (rc = s_get_str(ld, "cert", 1, 1, NULL, &c->cert)) != 0 ||
        (rc = s_get_str(ld, "key", 1, 1, NULL, &c->key)) != 0 ||
        (rc = s_get_str(ld, "crl", 0, 1, NULL, &c->crl)) != 0)
        return rc;
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
    return 0;
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
    if ((rc = ml_ini_keys(ini, section, s_check_key_cb, ld)) != 0)
        return rc;
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
    if ((rc = s_dup_opt(ld, ml_ini_get(ini, section, "community", NULL), &slot->community)) ||
        (rc = s_dup_opt(ld, ml_ini_get(ini, section, "name", NULL), &slot->display_name)))
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
                      "[%s] %s: not a routed kind (only REFERRAL and REFERRAL_UPDATE can be "
                      "allowed)",
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
    if ((rc = s_load_broker(&ld)) != 0)
        goto out;
    if ((rc = ml_ini_sections(ini, "node", s_node_cb, &ld)) != 0)
        goto out;
    if ((rc = ml_ini_sections(ini, "acl", s_acl_cb, &ld)) != 0)
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
    }
    free(c->nodes);
    free(c->path);
    free(c->broker_id);
    free(c->listen);
    free(c->data_dir);
    free(c->ca);
    free(c->cert);
    free(c->key);
    free(c->crl);
    free(c);
    *self_p = NULL;
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
