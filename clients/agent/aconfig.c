/* Loading of the agent's INI configuration ([agent] section). Every error
 * names the file and the key, because the person reading it is an operator
 * at a clinic with the file open in an editor. */
#include "aconfig.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ml_check.h"
#include "ml_common.h"
#include "ml_crypt.h"
#include "ml_imaging.h"
#include "ml_ini.h"
#include "ml_tls.h"

#define S_SECTION "agent"
/* Room for the envelope around an ImagingChunk's data: ids, node names,
 * the study UID and the digest take well under this. */
#define S_CHUNK_OVERHEAD 4096u

/* Every key the agent reads (see ml_ini_check): any other key or section is
 * refused with "FILE:LINE: [agent] KEY: unknown key", so that a misspelt
 * scan_msec is not silently left at its default. A new key is one row here,
 * next to the code below that reads it. */
/* One row per line (clang-format would pack them), so that a key added on
 * another branch merges as one line. */
/* clang-format off */
static const ml_ini_key_t s_schema[] = {
    {S_SECTION, "node_id"},
    {S_SECTION, "broker"},
    {S_SECTION, "broker_id"},
    {S_SECTION, "ca"},
    {S_SECTION, "cert"},
    {S_SECTION, "key"},
    {S_SECTION, "data_dir"},
    {S_SECTION, "spool_dir"},
    {S_SECTION, "log_level"},
    {S_SECTION, "log_format"},
    {S_SECTION, "heartbeat_ms"},
    {S_SECTION, "scan_ms"},
    {S_SECTION, "max_record"},
    {S_SECTION, "send_window"},
    {S_SECTION, "chunk_size"},
    {S_SECTION, "send_window_bytes"},
    {S_SECTION, "store_key"},
    {S_SECTION, "store_old_keys"},
    {S_SECTION, "resend_window_s"},
    {S_SECTION, "incoming_expire_s"},
    {S_SECTION, "retention_days"},
    {S_SECTION, "retention_seconds"},
    {S_SECTION, "sent_retention_days"},
    {S_SECTION, "sent_retention_seconds"},
    {S_SECTION, "retention_interval_s"},
    {NULL, NULL},
};
/* clang-format on */

/* Copies a required string key into *out; relative paths (when is_path) are
 * joined to the config file's folder. */
static int s_get_str(const ml_ini_t *ini, const char *path, const char *key, int required,
                     int is_path, const char *def, char **out, char *err, size_t errlen)
{
    const char *v = ml_ini_get(ini, S_SECTION, key, def);
    if (!v || !*v) {
        if (!required) {
            *out = NULL;
            return 0;
        }
        snprintf(err, errlen, "%s: [%s] %s is required", path, S_SECTION, key);
        return ML_ECONFIG;
    }
    if (is_path && v[0] != '/') {
        const char *dir = ml_ini_dir(ini);
        size_t n = strlen(dir) + strlen(v) + 2;
        *out = malloc(n);
        if (*out)
            snprintf(*out, n, "%s/%s", dir, v);
    } else {
        *out = strdup(v);
    }
    if (!*out) {
        snprintf(err, errlen, "%s: out of memory", path);
        return ML_ENOMEM;
    }
    return 0;
}

/* Joins a relative path to the config file's folder; malloc'd or NULL. */
static char *s_resolve(const ml_ini_t *ini, const char *v, size_t n)
{
    const char *dir = v[0] == '/' ? "" : ml_ini_dir(ini);
    size_t cap = strlen(dir) + n + 2;
    char *out = malloc(cap);
    if (out)
        snprintf(out, cap, "%s%s%.*s", dir, *dir ? "/" : "", (int)n, v);
    return out;
}

/* store_old_keys: white-space separated paths, each resolved like the
 * others. Returns 0 or ML_ENOMEM. */
static int s_get_paths(const ml_ini_t *ini, const char *v, char ***out, size_t *count)
{
    *out = NULL;
    *count = 0;
    for (const char *p = v; *p;) {
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p)
            break;
        size_t n = strcspn(p, " \t");
        char **grown = realloc(*out, (*count + 1) * sizeof *grown);
        if (!grown)
            return ML_ENOMEM;
        *out = grown;
        if (!((*out)[*count] = s_resolve(ini, p, n)))
            return ML_ENOMEM;
        (*count)++;
        p += n;
    }
    return 0;
}

int ml_aconfig_load(const char *path, ml_aconfig_t *cfg, char *err, size_t errlen)
{
    int rc;
    ml_ini_t *ini = NULL;
    long v;

    memset(cfg, 0, sizeof *cfg);
    rc = ml_ini_load(path, &ini, err, errlen);
    if (rc < 0)
        goto out;
    if ((rc = ml_ini_check(ini, s_schema, err, errlen)) < 0)
        goto out;

    if ((rc = s_get_str(ini, path, "node_id", 1, 0, NULL, &cfg->node_id, err, errlen)) < 0 ||
        (rc = s_get_str(ini, path, "broker", 1, 0, NULL, &cfg->broker, err, errlen)) < 0 ||
        (rc = s_get_str(ini, path, "broker_id", 0, 0, NULL, &cfg->broker_id, err, errlen)) < 0 ||
        (rc = s_get_str(ini, path, "ca", 1, 1, NULL, &cfg->ca, err, errlen)) < 0 ||
        (rc = s_get_str(ini, path, "cert", 1, 1, NULL, &cfg->cert, err, errlen)) < 0 ||
        (rc = s_get_str(ini, path, "key", 1, 1, NULL, &cfg->key, err, errlen)) < 0 ||
        (rc = s_get_str(ini, path, "data_dir", 1, 1, NULL, &cfg->data_dir, err, errlen)) < 0 ||
        (rc = s_get_str(ini, path, "spool_dir", 1, 1, NULL, &cfg->spool_dir, err, errlen)) < 0)
        goto out;

    /* Checked here, at start: a bare "127.0.0.1:7400" would otherwise make
     * every connection attempt fail with "Invalid argument", which reads
     * like a network error and is retried for ever. */
    char why[256];
    if (ml_check_endpoint(cfg->broker, 0, why, sizeof why) < 0) {
        snprintf(err, errlen, "%s:%d: [%s] broker = %s: %s", path,
                 ml_ini_line(ini, S_SECTION, "broker"), S_SECTION, cfg->broker, why);
        rc = ML_ECONFIG;
        goto out;
    }

    const char *level = ml_ini_get(ini, S_SECTION, "log_level", "info");
    if (ml_log_parse_level(level, &cfg->log_level) < 0) {
        snprintf(err, errlen, "%s: [%s] log_level = \"%s\": expected debug, info, warn or error",
                 path, S_SECTION, level);
        rc = ML_ECONFIG;
        goto out;
    }
    const char *format = ml_ini_get(ini, S_SECTION, "log_format", "text");
    if (ml_log_parse_format(format, &cfg->log_format) < 0) {
        snprintf(err, errlen, "%s:%d: [%s] log_format = \"%s\": expected text or json", path,
                 ml_ini_line(ini, S_SECTION, "log_format"), S_SECTION, format);
        rc = ML_ECONFIG;
        goto out;
    }
    rc = ml_ini_get_long(ini, S_SECTION, "heartbeat_ms", 2000, 100, 600000, &v, err, errlen);
    if (rc < 0)
        goto out;
    cfg->heartbeat_ms = (uint32_t)v;
    rc = ml_ini_get_long(ini, S_SECTION, "scan_ms", 200, 10, 3600000, &v, err, errlen);
    if (rc < 0)
        goto out;
    cfg->scan_ms = (uint32_t)v;
    rc = ml_ini_get_long(ini, S_SECTION, "max_record", 4194304, 4096, 256L * 1024 * 1024, &v, err,
                         errlen);
    if (rc < 0)
        goto out;
    cfg->max_record = (size_t)v;
    rc = ml_ini_get_long(ini, S_SECTION, "send_window", 1000, 1, 1000000, &v, err, errlen);
    if (rc < 0)
        goto out;
    cfg->send_window = (uint32_t)v;
    rc = ml_ini_get_long(ini, S_SECTION, "chunk_size", ML_IMAGING_CHUNK_DEFAULT,
                         ML_IMAGING_CHUNK_MIN, ML_IMAGING_CHUNK_MAX, &v, err, errlen);
    if (rc < 0)
        goto out;
    cfg->chunk_size = (uint32_t)v;
    /* A chunk travels in one record with its envelope around it. */
    if ((size_t)cfg->chunk_size + S_CHUNK_OVERHEAD > cfg->max_record) {
        snprintf(err, errlen,
                 "%s: [%s] chunk_size = %u does not fit in max_record = %zu (a chunk needs "
                 "%u bytes more for its envelope)",
                 path, S_SECTION, cfg->chunk_size, cfg->max_record, S_CHUNK_OVERHEAD);
        rc = ML_ECONFIG;
        goto out;
    }
    rc = ml_ini_get_long(ini, S_SECTION, "send_window_bytes", 8L * 1024 * 1024, 64L * 1024,
                         1024L * 1024 * 1024, &v, err, errlen);
    if (rc < 0)
        goto out;
    cfg->send_window_bytes = (size_t)v;
    rc = ml_ini_get_long(ini, S_SECTION, "resend_window_s", 3600, 1, 7L * 24 * 3600, &v, err,
                         errlen);
    if (rc < 0)
        goto out;
    cfg->resend_window_s = (uint32_t)v;
    rc = ml_ini_get_long(ini, S_SECTION, "incoming_expire_s", 72L * 3600, 1, 365L * 24 * 3600, &v,
                         err, errlen);
    if (rc < 0)
        goto out;
    cfg->incoming_expire_s = (uint32_t)v;
    /* Retention: the days, unless a *_seconds key (tests) is set. */
    long days, secs;
    if ((rc = ml_ini_get_long(ini, S_SECTION, "retention_days", 30, -1, 36500, &days, err,
                              errlen)) < 0 ||
        (rc = ml_ini_get_long(ini, S_SECTION, "retention_seconds", -1, -1, 36500L * 86400, &secs,
                              err, errlen)) < 0)
        goto out;
    cfg->retention_ms = secs >= 0   ? (int64_t)secs * 1000
                        : days >= 0 ? (int64_t)days * 86400000
                                    : -1;
    if ((rc = ml_ini_get_long(ini, S_SECTION, "sent_retention_days", 0, 0, 36500, &days, err,
                              errlen)) < 0 ||
        (rc = ml_ini_get_long(ini, S_SECTION, "sent_retention_seconds", -1, -1, 36500L * 86400,
                              &secs, err, errlen)) < 0)
        goto out;
    cfg->sent_retention_ms = secs >= 0 ? (int64_t)secs * 1000 : (int64_t)days * 86400000;
    if ((rc = ml_ini_get_long(ini, S_SECTION, "retention_interval_s", 60, 1, 86400, &v, err,
                              errlen)) < 0)
        goto out;
    cfg->retention_interval_ms = (int64_t)v * 1000;
    if ((rc = s_get_str(ini, path, "store_key", 0, 1, NULL, &cfg->store_key, err, errlen)) < 0)
        goto out;
    const char *old = ml_ini_get(ini, S_SECTION, "store_old_keys", NULL);
    if (old && *old) {
        if (!cfg->store_key) {
            snprintf(err, errlen,
                     "%s: [%s] store_old_keys needs store_key (the key that seals from now on)",
                     path, S_SECTION);
            rc = ML_ECONFIG;
            goto out;
        }
        if ((rc = s_get_paths(ini, old, &cfg->store_old_keys, &cfg->n_store_old_keys)) < 0) {
            snprintf(err, errlen, "%s: out of memory", path);
            goto out;
        }
    }
    rc = 0;
out:
    if (rc < 0)
        ml_aconfig_clear(cfg);
    ml_ini_destroy(&ini);
    return rc;
}

int ml_aconfig_check(const ml_aconfig_t *cfg, const char *path, ml_check_t *c)
{
    char prefix[600], what[700], err[1024];
    int n = c->n;
    snprintf(prefix, sizeof prefix, "%s: [%s]", path, S_SECTION);
    ml_tls_config_t tls = {cfg->ca, cfg->cert, cfg->key, NULL, 0};
    ml_tls_check(&tls, prefix, cfg->node_id, c);
    if (cfg->store_key) {
        int bad = 0;
        snprintf(what, sizeof what, "%s store_key", prefix);
        bad |= ml_check_file(c, what, cfg->store_key, ML_CHECK_PRIVATE);
        snprintf(what, sizeof what, "%s store_old_keys", prefix);
        for (size_t i = 0; i < cfg->n_store_old_keys; i++)
            bad |= ml_check_file(c, what, cfg->store_old_keys[i], ML_CHECK_PRIVATE);
        ml_keyring_t *kr = NULL;
        /* The files are there and private: now their contents. */
        if (!bad && ml_keyring_load(cfg->store_key, (const char *const *)cfg->store_old_keys,
                                    cfg->n_store_old_keys, &kr, err, sizeof err) < 0)
            ml_check_add(c, "%s store_key: %s", prefix, err);
        ml_keyring_destroy(&kr);
    }
    snprintf(what, sizeof what, "%s data_dir", prefix);
    ml_check_dir(c, what, cfg->data_dir);
    snprintf(what, sizeof what, "%s spool_dir", prefix);
    ml_check_dir(c, what, cfg->spool_dir);
    return c->n > n ? ML_ECONFIG : 0;
}

void ml_aconfig_live_apply(ml_aconfig_t *cur, const ml_aconfig_t *next)
{
    cur->log_level = next->log_level;
    cur->log_format = next->log_format;
    cur->scan_ms = next->scan_ms;
    cur->send_window = next->send_window;
    cur->send_window_bytes = next->send_window_bytes;
    cur->retention_ms = next->retention_ms;
    cur->sent_retention_ms = next->sent_retention_ms;
    cur->retention_interval_ms = next->retention_interval_ms;
}

/* NULL and "" are the same: an optional key left out. */
static int s_str_differs(const char *a, const char *b)
{
    return strcmp(a ? a : "", b ? b : "") != 0;
}

static void s_name(char *out, size_t outlen, int *n, const char *key)
{
    size_t used = strlen(out);
    if (used < outlen)
        snprintf(out + used, outlen - used, "%s%s", *n ? ", " : "", key);
    (*n)++;
}

int ml_aconfig_restart_keys(const ml_aconfig_t *cur, const ml_aconfig_t *next, char *out,
                            size_t outlen)
{
    int n = 0;
    if (outlen)
        out[0] = '\0';
    /* The identity, the link to the broker and the TLS context are built
     * once (a new key or certificate is a new identity the broker must see
     * in a new handshake); the folders and agent.db are open; chunking and
     * the imaging limits are fixed for transfers already under way. */
    const struct {
        const char *key;
        const char *a, *b;
    } strs[] = {{"node_id", cur->node_id, next->node_id},
                {"broker", cur->broker, next->broker},
                {"broker_id", cur->broker_id, next->broker_id},
                {"ca", cur->ca, next->ca},
                {"cert", cur->cert, next->cert},
                {"key", cur->key, next->key},
                {"data_dir", cur->data_dir, next->data_dir},
                {"spool_dir", cur->spool_dir, next->spool_dir},
                {"store_key", cur->store_key, next->store_key}};
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++)
        if (s_str_differs(strs[i].a, strs[i].b))
            s_name(out, outlen, &n, strs[i].key);
    int old_keys = cur->n_store_old_keys != next->n_store_old_keys;
    for (size_t i = 0; !old_keys && i < cur->n_store_old_keys; i++)
        old_keys = s_str_differs(cur->store_old_keys[i], next->store_old_keys[i]);
    if (old_keys)
        s_name(out, outlen, &n, "store_old_keys");
    if (cur->heartbeat_ms != next->heartbeat_ms)
        s_name(out, outlen, &n, "heartbeat_ms");
    if (cur->max_record != next->max_record)
        s_name(out, outlen, &n, "max_record");
    if (cur->chunk_size != next->chunk_size)
        s_name(out, outlen, &n, "chunk_size");
    if (cur->resend_window_s != next->resend_window_s)
        s_name(out, outlen, &n, "resend_window_s");
    if (cur->incoming_expire_s != next->incoming_expire_s)
        s_name(out, outlen, &n, "incoming_expire_s");
    return n;
}

void ml_aconfig_clear(ml_aconfig_t *cfg)
{
    if (!cfg)
        return;
    free(cfg->node_id);
    free(cfg->broker);
    free(cfg->broker_id);
    free(cfg->ca);
    free(cfg->cert);
    free(cfg->key);
    free(cfg->data_dir);
    free(cfg->spool_dir);
    free(cfg->store_key);
    for (size_t i = 0; i < cfg->n_store_old_keys; i++)
        free(cfg->store_old_keys[i]);
    free(cfg->store_old_keys);
    memset(cfg, 0, sizeof *cfg);
}
