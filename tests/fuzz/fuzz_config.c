/* Fuzz target: the configuration files (lib/ml_ini.c over libinih,
 * broker/config.c, clients/agent/aconfig.c). An operator's file is trusted
 * more than a peer's bytes, but a typo must give a sentence, never a crash,
 * and medlinkd re-reads its file on SIGHUP while it runs.
 *
 * The input is written to a file in a temp folder made once per process
 * (relative paths in it resolve against that folder) and loaded as
 * medlinkd.ini and as an agent's ini. What loads is walked through every
 * lookup the broker makes (nodes, services, fallbacks, deadlines, the ACL
 * for every role and kind). Checked: a refusal comes with a sentence; a
 * loaded broker config names only valid roles and lists every node once. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "aconfig.h"
#include "config.h"
#include "fuzz_common.h"
#include "ml_common.h"

#define S_FAIL(...) ml_fuzz_fail("fuzz_config", __VA_ARGS__)

static char s_dir[512];
static char s_path[600];

static void s_cleanup(void)
{
    if (s_dir[0])
        ml_fuzz_rmtree(s_dir);
}

static void s_walk(const ml_broker_config_t *c)
{
    for (size_t i = 0; i < c->n_nodes; i++) {
        const ml_node_t *n = &c->nodes[i];
        if (!n->id || n->role <= ML_ROLE_UNKNOWN || n->role >= ML_ROLE_COUNT)
            S_FAIL("node %zu has no id or role %d", i, n->role);
        if (ml_broker_config_node(c, n->id) != n)
            S_FAIL("node %s is not found as itself (listed twice?)", n->id);
        (void)ml_broker_config_fallback(c, n->community);
        for (size_t k = 0; k < n->n_services; k++) {
            if (!ml_broker_config_is_service(c, n->services[k]) ||
                !ml_node_serves(n, n->services[k]))
                S_FAIL("service %s of %s is not found", n->services[k], n->id);
            if (ml_broker_config_node(c, n->services[k]))
                S_FAIL("service %s is also a node id", n->services[k]);
        }
    }
    for (size_t i = 0; i < c->n_escalate_to; i++)
        if (!ml_broker_config_node(c, c->escalate_to[i]))
            S_FAIL("escalation goes to unregistered %s", c->escalate_to[i]);
    for (int k = -1; k <= ML_CFG_CASE_KINDS; k++)
        for (int p = -1; p <= ML_CFG_PRIORITIES; p++)
            if (!ml_broker_config_deadline(c, k, p))
                S_FAIL("no deadline rule for %d/%d", k, p);
    for (int from = -1; from <= ML_ROLE_COUNT; from++)
        for (int kind = -1; kind <= ML_ACL_MAX_KIND; kind++)
            for (int to = -1; to <= ML_ROLE_COUNT; to++)
                (void)ml_acl_allows(c, from, kind, to);
    (void)ml_role_name(-1);
    (void)ml_role_name(ML_ROLE_COUNT);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ml_fuzz_quiet();
    if (!s_dir[0]) {
        ml_fuzz_tmpdir("config", s_dir, sizeof s_dir);
        snprintf(s_path, sizeof s_path, "%s/fuzz.ini", s_dir);
        atexit(s_cleanup);
    }
    ml_fuzz_write_file(s_path, data, size);
    char err[1024];

    ml_broker_config_t *cfg = NULL;
    err[0] = '\0';
    int rc = ml_broker_config_load(s_path, &cfg, err, sizeof err);
    if (rc == 0) {
        if (!cfg)
            S_FAIL("loaded without a config");
        s_walk(cfg);
        ml_broker_config_destroy(&cfg);
        ml_broker_config_destroy(&cfg); /* safe twice */
    } else {
        if (rc != ML_ECONFIG && rc != ML_ENOMEM)
            S_FAIL("broker config load returned %d", rc);
        if (!err[0])
            S_FAIL("broker config refused without a sentence");
        if (cfg)
            S_FAIL("a refused config was handed out");
    }

    ml_aconfig_t ac;
    err[0] = '\0';
    rc = ml_aconfig_load(s_path, &ac, err, sizeof err);
    if (rc == 0) {
        if (!ac.node_id || !ac.broker || !ac.ca || !ac.cert || !ac.key || !ac.data_dir ||
            !ac.spool_dir)
            S_FAIL("agent config loaded without a required key");
        if ((size_t)ac.chunk_size + 4096u > ac.max_record)
            S_FAIL("chunk_size %u does not fit max_record %zu", ac.chunk_size, ac.max_record);
        ml_aconfig_clear(&ac);
        ml_aconfig_clear(&ac);
    } else {
        if (!err[0])
            S_FAIL("agent config refused without a sentence");
        if (ac.node_id || ac.broker)
            S_FAIL("a refused agent config kept strings");
    }
    return 0;
}
