/* Unit tests for what the agent's SIGHUP reload takes from a new file
 * (clients/agent/aconfig.h): [agent] log_format, the keys applied live
 * (ml_aconfig_live_apply) and the ones named as needing a restart
 * (ml_aconfig_restart_keys). The real agent's reload is tested in
 * tests/integration/test_systemd.c. */
#include <stdio.h>
#include <string.h>

#include <criterion/criterion.h>

#include "aconfig.h"
#include "ml_common.h"
#include "support.h"

static char s_dir[512];
static char s_ini[700];

static void s_load(const char *extra, ml_aconfig_t *cfg)
{
    char text[2048], err[1024];
    snprintf(text, sizeof text,
             "[agent]\nnode_id = township.xinzhan.clinic\nbroker = tcp://127.0.0.1:7400\n"
             "broker_id = medlinkd.test\nca = pki/ca.crt\ncert = pki/x.crt\nkey = pki/x.key\n"
             "data_dir = data\nspool_dir = spool\n%s",
             extra);
    cr_assert_eq(ml_write_file_atomic(s_ini, text, strlen(text)), 0);
    cr_assert_eq(ml_aconfig_load(s_ini, cfg, err, sizeof err), 0, "%s", err);
}

static void s_setup(void)
{
    ml_test_tmpdir(s_dir, sizeof s_dir);
    snprintf(s_ini, sizeof s_ini, "%s/agent.ini", s_dir);
}

TestSuite(agent_reload, .init = s_setup);

Test(agent_reload, log_format_key)
{
    ml_aconfig_t cfg;
    s_load("", &cfg);
    cr_assert_eq(cfg.log_format, ML_LOG_FORMAT_TEXT, "text by default");
    ml_aconfig_clear(&cfg);
    s_load("log_format = json\n", &cfg);
    cr_assert_eq(cfg.log_format, ML_LOG_FORMAT_JSON);
    ml_aconfig_clear(&cfg);

    char text[512], err[1024];
    snprintf(text, sizeof text,
             "[agent]\nnode_id = n\nbroker = tcp://127.0.0.1:1\nca = a\ncert = b\nkey = c\n"
             "data_dir = d\nspool_dir = s\nlog_format = xml\n");
    cr_assert_eq(ml_write_file_atomic(s_ini, text, strlen(text)), 0);
    cr_assert_eq(ml_aconfig_load(s_ini, &cfg, err, sizeof err), ML_ECONFIG);
    cr_assert(strstr(err, "log_format") && strstr(err, "expected text or json") &&
                  strstr(err, ":9:"),
              "names key, choices and line: %s", err);
}

Test(agent_reload, same_file_needs_no_restart)
{
    ml_aconfig_t a, b;
    s_load("store_key = k1\nstore_old_keys = k0 k00\n", &a);
    s_load("store_key = k1\nstore_old_keys = k0 k00\n", &b);
    char out[256];
    cr_assert_eq(ml_aconfig_restart_keys(&a, &b, out, sizeof out), 0, "%s", out);
    cr_assert_str_eq(out, "");
    ml_aconfig_clear(&a);
    ml_aconfig_clear(&b);
}

Test(agent_reload, live_keys_apply_restart_keys_named)
{
    ml_aconfig_t cur, next;
    s_load("log_level = info\nscan_ms = 100\n", &cur);
    s_load("log_level = debug\nlog_format = json\nscan_ms = 250\nsend_window = 7\n"
           "send_window_bytes = 131072\nretention_days = 3\nsent_retention_days = 2\n"
           "retention_interval_s = 5\n",
           &next);
    char out[256];
    cr_assert_eq(ml_aconfig_restart_keys(&cur, &next, out, sizeof out), 0, "live keys only: %s",
                 out);
    ml_aconfig_live_apply(&cur, &next);
    cr_assert_eq(cur.log_level, ML_LOG_DEBUG);
    cr_assert_eq(cur.log_format, ML_LOG_FORMAT_JSON);
    cr_assert_eq(cur.scan_ms, 250);
    cr_assert_eq(cur.send_window, 7);
    cr_assert_eq(cur.send_window_bytes, 131072);
    cr_assert_eq(cur.retention_ms, 3LL * 86400000);
    cr_assert_eq(cur.sent_retention_ms, 2LL * 86400000);
    cr_assert_eq(cur.retention_interval_ms, 5000);
    ml_aconfig_clear(&next);

    /* The identity, the link, the folders, the keys and the channel's and
     * imaging's sizes need a restart: each one is named, and
     * ml_aconfig_live_apply leaves them as they run. */
    char text[2048], err[1024];
    snprintf(text, sizeof text,
             "[agent]\nnode_id = other.clinic\nbroker = tcp://127.0.0.1:7401\n"
             "ca = pki/ca2.crt\ncert = pki/y.crt\nkey = pki/y.key\n"
             "data_dir = data2\nspool_dir = spool2\nstore_key = k2\nheartbeat_ms = 3000\n"
             "max_record = 8388608\nchunk_size = 524288\nresend_window_s = 60\n"
             "incoming_expire_s = 60\n");
    cr_assert_eq(ml_write_file_atomic(s_ini, text, strlen(text)), 0);
    cr_assert_eq(ml_aconfig_load(s_ini, &next, err, sizeof err), 0, "%s", err);
    int n = ml_aconfig_restart_keys(&cur, &next, out, sizeof out);
    cr_assert_str_eq(out,
                     "node_id, broker, broker_id, ca, cert, key, data_dir, spool_dir, store_key, "
                     "heartbeat_ms, max_record, chunk_size, resend_window_s, incoming_expire_s");
    cr_assert_eq(n, 14);
    ml_aconfig_live_apply(&cur, &next);
    cr_assert(strstr(cur.broker, ":7400"), "broker kept: %s", cur.broker);
    cr_assert_str_eq(cur.node_id, "township.xinzhan.clinic");
    cr_assert_eq(cur.heartbeat_ms, 2000);
    ml_aconfig_clear(&next);

    /* Only the old keys changed. */
    s_load("store_key = k1\nstore_old_keys = k0\n", &next);
    ml_aconfig_t k;
    s_load("store_key = k1\nstore_old_keys = k9\n", &k);
    cr_assert_eq(ml_aconfig_restart_keys(&next, &k, out, sizeof out), 1);
    cr_assert_str_eq(out, "store_old_keys");
    ml_aconfig_clear(&k);
    ml_aconfig_clear(&next);
    ml_aconfig_clear(&cur);
}
