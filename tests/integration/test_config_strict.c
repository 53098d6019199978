/* Strict configuration, with the real binaries: medlinkd, medlink-agent and
 * medlinkctl are run on configurations an operator gets wrong (a misspelt
 * key or section, a bare host:port, a missing or mismatched certificate, a
 * private key others can read) and must refuse them at once, with exit
 * status 1 (medlinkctl: 2 for a configuration it cannot use, 1 for
 * --check-config) and a message naming the file, the line or the file
 * named in it. --check-config is run both as "--check-config FILE" and as
 * "--config FILE --check-config". Every daemon is run under timeout(1):
 * one that started anyway, as before these checks, would be ended by it and
 * give status 124, which fails the test instead of hanging it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <criterion/criterion.h>

#include "harness.h"

static h_world_t W;
/* The endpoint the agent and medlinkctl configs of these tests name: no
 * broker runs here and nothing connects (each config is refused, or only
 * checked), so any well-formed endpoint does; the world's own is
 * "tcp://127.0.0.1:0" until a broker ran, which clients refuse. */
static const char s_nowhere[] = "tcp://127.0.0.1:7400";
static char s_medlinkd[600], s_agent[600], s_ctl[600];

static void s_teardown(void)
{
    h_world_fini(&W);
}

static void s_init(void)
{
    h_world_init(&W, NULL);
    h_bin("medlinkd", s_medlinkd, sizeof s_medlinkd);
    h_bin("medlink-agent", s_agent, sizeof s_agent);
    h_bin("medlinkctl", s_ctl, sizeof s_ctl);
}

TestSuite(config, .init = s_init, .fini = s_teardown, .timeout = 120);
TestSuite(security, .init = s_init, .fini = s_teardown, .timeout = 120);

static void s_write(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f, "cannot write %s", path);
    fputs(text, f);
    fclose(f);
}

/* Runs a shell command line with stderr folded into stdout, under a
 * timeout; asserts the exit status and returns the output (the caller's). */
static char *s_expect(int want, const char *cmd)
{
    int st = -1;
    char *out = h_run(&st, "timeout 30 %s 2>&1", cmd);
    cr_assert_eq(st, want, "%s: exit %d, want %d:\n%s", cmd, st, want, out);
    return out;
}

static void s_has(const char *out, const char *needle)
{
    cr_assert(strstr(out, needle), "output does not contain \"%s\":\n%s", needle, out);
}

/* Number of lines in path (for the line of a key appended to it). */
static int s_lines(const char *path)
{
    char *text = h_slurp(path);
    cr_assert_not_null(text, "cannot read %s", path);
    int n = 0;
    for (const char *p = text; *p; p++)
        n += *p == '\n';
    free(text);
    return n;
}

/* The broker's config of the world with from replaced by to (once), at
 * out (in the world's folder, so its relative paths still hold). */
static void s_broker_ini(const char *from, const char *to, const char *append, char *out,
                         size_t len)
{
    char src[700];
    snprintf(src, sizeof src, "%s/medlinkd.ini", W.dir);
    snprintf(out, len, "%s/medlinkd-edited.ini", W.dir);
    char *text = h_slurp(src);
    cr_assert_not_null(text);
    size_t cap = strlen(text) + (to ? strlen(to) : 0) + (append ? strlen(append) : 0) + 1;
    char *buf = malloc(cap);
    cr_assert_not_null(buf);
    char *at = from ? strstr(text, from) : NULL;
    if (from)
        cr_assert_not_null(at, "the broker config has no \"%s\"", from);
    if (at)
        snprintf(buf, cap, "%.*s%s%s%s", (int)(at - text), text, to, at + strlen(from),
                 append ? append : "");
    else
        snprintf(buf, cap, "%s%s", text, append ? append : "");
    s_write(out, buf);
    free(buf);
    free(text);
}

/* An agent config for node in the world's folder; extra is appended. */
static void s_agent_ini(const char *node, const char *broker, const char *cert_node,
                        const char *extra, char *out, size_t len)
{
    char buf[2048];
    snprintf(out, len, "%s/agent-strict-%s.ini", W.dir, node);
    snprintf(buf, sizeof buf,
             "[agent]\nnode_id = %s\nbroker = %s\nbroker_id = " H_BROKER "\n"
             "ca = pki/ca.crt\ncert = pki/%s.crt\nkey = pki/%s.key\n"
             "data_dir = data/strict-%s\nspool_dir = spool/strict-%s\n%s",
             node, broker, cert_node, node, node, node, extra ? extra : "");
    s_write(out, buf);
}

static void s_ctl_ini(const char *broker, const char *extra, char *out, size_t len)
{
    char buf[2048];
    snprintf(out, len, "%s/ctl-strict.ini", W.dir);
    snprintf(buf, sizeof buf,
             "[ctl]\nnode_id = " H_OPS "\nbroker = %s\nbroker_id = " H_BROKER "\n"
             "ca = pki/ca.crt\ncert = pki/" H_OPS ".crt\nkey = pki/" H_OPS ".key\n%s",
             broker, extra ? extra : "");
    s_write(out, buf);
}

Test(config, unknown_key_agent_file_line)
{
    char ini[800], cmd[4096], want[1024];
    s_agent_ini(H_XINZHAN, s_nowhere, H_XINZHAN, "heartbeat_ms = 1000\n", ini, sizeof ini);
    int line = s_lines(ini) + 1;
    FILE *f = fopen(ini, "a");
    cr_assert_not_null(f);
    fputs("scan_msec = 100\n", f);
    fclose(f);

    /* At start: refused, not started with scan_ms left at its default. */
    snprintf(cmd, sizeof cmd, "'%s' --config '%s'", s_agent, ini);
    char *out = s_expect(1, cmd);
    snprintf(want, sizeof want, "%s:%d: [agent] scan_msec: unknown key", ini, line);
    s_has(out, want);
    free(out);
    /* And by --check-config, which names the same line. */
    snprintf(cmd, sizeof cmd, "'%s' --check-config '%s'", s_agent, ini);
    out = s_expect(1, cmd);
    s_has(out, want);
    free(out);
}

Test(config, unknown_key_ctl)
{
    char ini[800], cmd[4096], want[1024];
    s_ctl_ini(s_nowhere, "brokr_id = medlinkd.other\n", ini, sizeof ini);
    int line = s_lines(ini);
    /* No broker is running: a medlinkctl that took the file would try to
     * connect and fail on the timeout instead (exit 1). */
    snprintf(cmd, sizeof cmd, "'%s' --config '%s' --timeout 2 status", s_ctl, ini);
    char *out = s_expect(2, cmd);
    snprintf(want, sizeof want, "%s:%d: [ctl] brokr_id: unknown key", ini, line);
    s_has(out, want);
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' --check-config '%s'", s_ctl, ini);
    out = s_expect(1, cmd);
    s_has(out, want);
    free(out);
}

Test(config, unknown_section_broker)
{
    char ini[800], cmd[4096], want[1024];
    s_broker_ini(NULL, NULL, NULL, ini, sizeof ini);
    int line = s_lines(ini) + 2;
    s_broker_ini(NULL, NULL, "\n[brokr]\nmax_sessions = 10\n", ini, sizeof ini);
    snprintf(want, sizeof want, "%s:%d: [brokr]: unknown section", ini, line);

    snprintf(cmd, sizeof cmd, "'%s' --config '%s'", s_medlinkd, ini);
    char *out = s_expect(1, cmd);
    s_has(out, want);
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' --config '%s' --check-config", s_medlinkd, ini);
    out = s_expect(1, cmd);
    s_has(out, want);
    /* Its keys are not reported again as unknown keys. */
    cr_assert_null(strstr(out, "max_sessions: unknown key"), "%s", out);
    free(out);
}

Test(config, check_missing_cert_file)
{
    char ini[800], cmd[4096], missing[800];
    snprintf(missing, sizeof missing, "%s/pki/gone.crt", W.dir);

    s_broker_ini("cert = pki/" H_BROKER ".crt", "cert = pki/gone.crt", NULL, ini, sizeof ini);
    snprintf(cmd, sizeof cmd, "'%s' --config '%s' --check-config", s_medlinkd, ini);
    char *out = s_expect(1, cmd);
    s_has(out, "[broker] cert = ");
    s_has(out, missing);
    s_has(out, "no such file");
    cr_assert_null(strstr(out, "is valid"), "%s", out);
    free(out);

    s_agent_ini(H_XINZHAN, s_nowhere, "gone", NULL, ini, sizeof ini);
    snprintf(cmd, sizeof cmd, "'%s' --check-config '%s'", s_agent, ini);
    out = s_expect(1, cmd);
    s_has(out, "[agent] cert = ");
    s_has(out, missing);
    free(out);

    s_ctl_ini(s_nowhere, NULL, ini, sizeof ini);
    snprintf(cmd, sizeof cmd, "'%s' --check-config '%s' --cert '%s'", s_ctl, ini, missing);
    out = s_expect(1, cmd);
    s_has(out, missing);
    s_has(out, "no such file");
    free(out);
}

Test(config, check_config_file_arg)
{
    char bini[800], aini[800], cini[800], cmd[4096];
    snprintf(bini, sizeof bini, "%s/medlinkd.ini", W.dir);
    s_agent_ini(H_XINZHAN, s_nowhere, H_XINZHAN, NULL, aini, sizeof aini);
    s_ctl_ini(s_nowhere, NULL, cini, sizeof cini);
    const char *bins[] = {s_medlinkd, s_agent, s_ctl};
    const char *inis[] = {bini, aini, cini};
    for (int i = 0; i < 3; i++) {
        /* As the docs show it, and the other way round. */
        snprintf(cmd, sizeof cmd, "'%s' --check-config '%s'", bins[i], inis[i]);
        char *out = s_expect(0, cmd);
        s_has(out, "is valid");
        free(out);
        snprintf(cmd, sizeof cmd, "'%s' --config '%s' --check-config", bins[i], inis[i]);
        out = s_expect(0, cmd);
        s_has(out, "is valid");
        free(out);
    }
    /* Checking creates nothing: the agent's folders are still to be made. */
    char data[800];
    struct stat st;
    snprintf(data, sizeof data, "%s/data/strict-%s", W.dir, H_XINZHAN);
    cr_assert_neq(stat(data, &st), 0, "--check-config created %s", data);
}

Test(config, check_key_cert_mismatch)
{
    char ini[800], cmd[4096];
    /* The broker's key with the county hospital's certificate. */
    s_broker_ini("cert = pki/" H_BROKER ".crt", "cert = pki/" H_COUNTY ".crt", NULL, ini,
                 sizeof ini);
    snprintf(cmd, sizeof cmd, "'%s' --check-config '%s'", s_medlinkd, ini);
    char *out = s_expect(1, cmd);
    s_has(out, "does not match certificate file");
    s_has(out, H_COUNTY ".crt");
    free(out);

    s_agent_ini(H_XINZHAN, s_nowhere, H_FENGLE, NULL, ini, sizeof ini);
    snprintf(cmd, sizeof cmd, "'%s' --check-config '%s'", s_agent, ini);
    out = s_expect(1, cmd);
    s_has(out, "does not match certificate file");
    free(out);

    /* A matching pair, but of another node than node_id: the start would
     * refuse it, so the check does too. */
    char key[800];
    snprintf(key, sizeof key, "%s/pki/%s.key", W.dir, H_FENGLE);
    snprintf(cmd, sizeof cmd, "sed -i 's#^key = .*#key = %s#' '%s'", key, ini);
    int st = -1;
    free(h_run(&st, "%s", cmd));
    cr_assert_eq(st, 0);
    snprintf(cmd, sizeof cmd, "'%s' --check-config '%s'", s_agent, ini);
    out = s_expect(1, cmd);
    s_has(out, "node_id = " H_XINZHAN ", but certificate");
    s_has(out, "is for " H_FENGLE);
    free(out);

    s_ctl_ini(s_nowhere, NULL, ini, sizeof ini);
    snprintf(cmd, sizeof cmd, "'%s' --config '%s' --check-config --cert '%s/pki/%s.crt'", s_ctl,
             ini, W.dir, H_COUNTY);
    out = s_expect(1, cmd);
    s_has(out, "does not match certificate file");
    free(out);
}

Test(security, f12_broker_refuses_world_readable_key)
{
    char key[800], ini[800], cmd[4096], want[1024];
    snprintf(key, sizeof key, "%s/pki/%s.key", W.dir, H_BROKER);
    snprintf(ini, sizeof ini, "%s/medlinkd.ini", W.dir);
    cr_assert_eq(chmod(key, 0644), 0);
    snprintf(want, sizeof want, "%s is readable by group or others (mode 0644)", key);

    /* At start: medlinkd exits at once instead of serving with it. */
    snprintf(cmd, sizeof cmd, "'%s' --config '%s'", s_medlinkd, ini);
    char *out = s_expect(1, cmd);
    s_has(out, want);
    s_has(out, "chmod 600");
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' --check-config '%s'", s_medlinkd, ini);
    out = s_expect(1, cmd);
    s_has(out, want);
    free(out);

    /* The agent and medlinkctl read their keys through the same check. */
    char akey[800];
    snprintf(akey, sizeof akey, "%s/pki/%s.key", W.dir, H_XINZHAN);
    cr_assert_eq(chmod(akey, 0640), 0);
    s_agent_ini(H_XINZHAN, s_nowhere, H_XINZHAN, NULL, ini, sizeof ini);
    snprintf(cmd, sizeof cmd, "'%s' --config '%s'", s_agent, ini);
    out = s_expect(1, cmd);
    s_has(out, "readable by group or others (mode 0640)");
    s_has(out, akey);
    free(out);

    char ckey[800];
    snprintf(ckey, sizeof ckey, "%s/pki/%s.key", W.dir, H_OPS);
    cr_assert_eq(chmod(ckey, 0604), 0);
    s_ctl_ini(s_nowhere, NULL, ini, sizeof ini);
    snprintf(cmd, sizeof cmd, "'%s' --config '%s' --timeout 2 status", s_ctl, ini);
    out = s_expect(1, cmd);
    s_has(out, "readable by group or others (mode 0604)");
    s_has(out, ckey);
    free(out);
}

/* A port file that cannot be written stops the start-up (status 1, naming
 * it) instead of leaving whoever waits for it waiting: here its folder does
 * not exist. */
Test(config, port_file_unwritable_refuses_start)
{
    char ini[800], cmd[4096];
    s_broker_ini("port_file = medlinkd.port", "port_file = no/such/folder/medlinkd.port", NULL, ini,
                 sizeof ini);
    snprintf(cmd, sizeof cmd, "'%s' --config '%s'", s_medlinkd, ini);
    char *out = s_expect(1, cmd);
    s_has(out, "cannot write port_file");
    s_has(out, "no/such/folder/medlinkd.port");
    free(out);
}

Test(config, endpoint_without_tcp_scheme)
{
    char ini[800], cmd[4096], bare[64], want[1024];
    snprintf(bare, sizeof bare, "%s", s_nowhere + strlen("tcp://"));

    char from[128], to[128];
    snprintf(from, sizeof from, "listen = %s", W.listen);
    snprintf(to, sizeof to, "listen = %s", bare);
    s_broker_ini(from, to, NULL, ini, sizeof ini);
    snprintf(cmd, sizeof cmd, "'%s' --config '%s'", s_medlinkd, ini);
    char *out = s_expect(1, cmd);
    snprintf(want, sizeof want, "[broker] listen = %s: tcp:// is missing", bare);
    s_has(out, want);
    s_has(out, "tcp://HOST:PORT");
    free(out);

    /* The agent: refused at start instead of retrying "Invalid argument". */
    s_agent_ini(H_XINZHAN, bare, H_XINZHAN, NULL, ini, sizeof ini);
    snprintf(cmd, sizeof cmd, "'%s' --config '%s'", s_agent, ini);
    out = s_expect(1, cmd);
    snprintf(want, sizeof want, "%s:3: [agent] broker = %s: tcp:// is missing", ini, bare);
    s_has(out, want);
    free(out);

    s_ctl_ini(bare, NULL, ini, sizeof ini);
    snprintf(cmd, sizeof cmd, "'%s' --config '%s' --timeout 2 status", s_ctl, ini);
    out = s_expect(2, cmd);
    snprintf(want, sizeof want, "%s:3: [ctl] broker = %s: tcp:// is missing", ini, bare);
    s_has(out, want);
    free(out);
    snprintf(cmd, sizeof cmd, "'%s' --broker %s --config '%s' --timeout 2 status", s_ctl, bare,
             ini);
    out = s_expect(2, cmd);
    s_has(out, "--broker 127.0.0.1:");
    free(out);

    /* Out-of-range ports are refused the same way. */
    s_agent_ini(H_XINZHAN, "tcp://127.0.0.1:70000", H_XINZHAN, NULL, ini, sizeof ini);
    snprintf(cmd, sizeof cmd, "'%s' --check-config '%s'", s_agent, ini);
    out = s_expect(1, cmd);
    s_has(out, "is not a number from 1 to 65535");
    free(out);
}
