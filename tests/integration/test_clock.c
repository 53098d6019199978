/* The clock (issue 9): certificates and CRLs expire. Against the real
 * medlinkd, medlink-agent and medlinkctl with a PKI from deploy/pki.sh:
 *   - a CRL inside the crl_warn_days window is warned about in the
 *     broker's log, in `medlinkctl status` and in `status --json`;
 *   - a CRL past its next update keeps the broker fail-closed (every
 *     handshake refused), with log lines naming the reason and the peer's
 *     CN, and a reload with a fresh CRL restores service;
 *   - a node certificate that has expired, or a broker whose CN is not
 *     broker_id, makes medlinkctl fail at once with the reason and exit 3
 *     instead of waiting out --timeout, and makes the agent log the reason
 *     as an ERROR (and keep retrying slowly).
 * Expired and short-lived files are made with fixed dates (pki.sh
 * --not-before/--not-after, --crl-days; openssl ca -crl_nextupdate), so no
 * test waits for the clock. */
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <criterion/criterion.h>
#include <jansson.h>

#include "harness.h"
#include "ml_common.h"

static h_world_t W;

static void s_teardown(void)
{
    h_world_fini(&W);
}

TestSuite(clock, .fini = s_teardown, .timeout = 300);

static void s_sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void s_sh(const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int st = system(cmd);
    cr_assert_eq(st, 0, "command failed (%d): %s", st, cmd);
}

static const char *s_src(void)
{
    const char *src = getenv("ML_SOURCE_DIR");
    return src ? src : ".";
}

/* h_ctl_run, timed: the time it took in *ms (may be NULL). */
static char *s_ctl_timed(int *st, int64_t *ms, const char *cfg, const char *args)
{
    int64_t t0 = ml_mono_ms();
    char *out = h_ctl_run(st, NULL, cfg, args);
    if (ms)
        *ms = ml_mono_ms() - t0;
    return out;
}

/* 1 when a line of the log has every one of the (NULL-terminated)
 * needles. */
static int s_log_line_has(const char *log, const char *const *needles)
{
    char path[700];
    snprintf(path, sizeof path, "%s/%s", W.dir, log);
    char *text = h_slurp(path);
    if (!text)
        return 0;
    int found = 0;
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line && !found;
         line = strtok_r(NULL, "\n", &save)) {
        int all = 1;
        for (size_t k = 0; needles[k] && all; k++)
            all = strstr(line, needles[k]) != NULL;
        found = all;
    }
    free(text);
    return found;
}

/* Waits up to timeout_ms for a log line holding every needle. */
static int s_wait_line(const char *log, int timeout_ms, const char *const *needles)
{
    int64_t deadline = ml_mono_ms() + timeout_ms;
    int ok;
    while (!(ok = s_log_line_has(log, needles)) && ml_mono_ms() < deadline)
        h_sleep_ms(50);
    return ok;
}

#define S_WAIT_LINE(log, timeout_ms, ...)                                                          \
    s_wait_line(log, timeout_ms, (const char *const[]){__VA_ARGS__, NULL})

/* Re-issues node's certificate valid only in January 2020: expired. */
static void s_expire_node_cert(const char *node)
{
    s_sh("'%s/deploy/pki.sh' --dir '%s' --force --not-before 20200101000000Z --not-after "
         "20200201000000Z %s >>'%s/pki.log' 2>&1",
         s_src(), W.pki, node, W.dir);
}

Test(clock, clock_crl_expiring_warns)
{
    h_world_init(&W, "crl = pki/crl.pem\n");
    /* A CRL that runs out in three days: inside the default seven-day
     * window. */
    s_sh("'%s/deploy/pki.sh' --dir '%s' --crl --crl-days 3 >>'%s/pki.log' 2>&1", s_src(), W.pki,
         W.dir);
    h_broker_start(&W);

    cr_assert(S_WAIT_LINE("broker.log", 10000, " warn ", "at start", "CRL", "crl.pem",
                          "expires in 2 day(s)"),
              "no start-up warning about the CRL in %s/broker.log", W.dir);
    /* The certificate (365 days) and the CA (3650 days) are far off. */
    cr_assert_eq(h_log_contains(&W, "broker.log",
                                "certificate pki/" H_BROKER ".crt (CN " H_BROKER ") expires"),
                 0, "the broker warned about a certificate valid for a year");

    char cfg[800];
    h_ctl_config(&W, H_OPS, cfg, sizeof cfg);
    int st = -1;
    char *out = s_ctl_timed(&st, NULL, cfg, "status");
    cr_assert_eq(st, 0, "medlinkctl status: exit %d:\n%s", st, out);
    char *w = strstr(out, "WARNING");
    cr_assert(w, "no WARNING line in medlinkctl status:\n%s", out);
    char *eol = strchr(w, '\n');
    if (eol)
        *eol = '\0';
    cr_assert(strstr(w, "CRL") && strstr(w, "crl.pem") && strstr(w, "expires in 2 day(s)"),
              "the WARNING line does not name the CRL and its days: %s", w);
    if (eol)
        *eol = '\n';
    cr_assert_eq(strstr(w + 1, "WARNING"), NULL, "more than one WARNING line:\n%s", out);
    free(out);

    out = s_ctl_timed(&st, NULL, cfg, "--json status");
    cr_assert_eq(st, 0, "medlinkctl --json status: exit %d:\n%s", st, out);
    json_error_t jerr;
    json_t *j = json_loads(out, 0, &jerr);
    cr_assert(j, "medlinkctl --json status printed no JSON: %s", out);
    json_t *arr = json_object_get(j, "expiry");
    cr_assert(json_is_array(arr) && json_array_size(arr) >= 3,
              "status --json has no expiry array of certificate, CA and CRL:\n%s", out);
    int crl_seen = 0, warned = 0;
    for (size_t i = 0; i < json_array_size(arr); i++) {
        json_t *e = json_array_get(arr, i);
        const char *what = json_string_value(json_object_get(e, "what"));
        const char *days = json_string_value(json_object_get(e, "daysLeft"));
        const char *na = json_string_value(json_object_get(e, "notAfter"));
        cr_assert(what && days && na, "an expiry entry lacks what/daysLeft/notAfter:\n%s", out);
        int warning = json_is_true(json_object_get(e, "warning"));
        warned += warning;
        if (strstr(what, "CRL")) {
            crl_seen = 1;
            cr_assert_str_eq(days, "2", "CRL daysLeft: %s", out);
            cr_assert(warning, "the CRL entry is not a warning:\n%s", out);
            long long left = atoll(na) - ml_now_ms();
            cr_assert(left > 2LL * 86400000 && left <= 3LL * 86400000,
                      "CRL notAfter is not three days ahead: %s", na);
        }
    }
    cr_assert(crl_seen, "no CRL entry in expiry:\n%s", out);
    cr_assert_eq(warned, 1, "only the CRL should be a warning:\n%s", out);
    json_decref(j);
    free(out);
    h_broker_stop(&W);
}

Test(clock, clock_crl_expired_clear_log)
{
    h_world_init(&W, "crl = pki/crl.pem\n");
    /* A CRL whose next update was on 2 January 2025. */
    s_sh("cd '%s' && openssl ca -batch -config ca/openssl.cnf -gencrl -crl_lastupdate "
         "20250101000000Z -crl_nextupdate 20250102000000Z -out crl.pem >>'%s/pki.log' 2>&1",
         W.pki, W.dir);
    /* Documented behaviour: medlinkd still starts (a reload can then fix
     * it without a restart) and says loudly that the CRL has expired. */
    h_broker_start(&W);
    cr_assert(S_WAIT_LINE("broker.log", 10000, " error ", "at start", "CRL", "EXPIRED"),
              "no ERROR at start about the expired CRL in %s/broker.log", W.dir);

    /* Fail-closed: every handshake is refused, and the refusal names the
     * peer and the reason. medlinkctl learns it at once. */
    char cfg[800];
    h_ctl_config(&W, H_OPS, cfg, sizeof cfg);
    int st = -1;
    int64_t ms = 0;
    char *out = s_ctl_timed(&st, &ms, cfg, "--timeout 30 status");
    cr_assert_eq(st, 3, "medlinkctl status with the broker's CRL expired: exit %d, want 3:\n%s", st,
                 out);
    cr_assert(strstr(out, "CRL"), "medlinkctl does not point at the CRL:\n%s", out);
    cr_assert_lt(ms, 10000, "medlinkctl took %lld ms (--timeout 30)", (long long)ms);
    free(out);
    cr_assert(S_WAIT_LINE("broker.log", 10000, " error ", "refused session", "CN '" H_OPS "'",
                          "CRL expired"),
              "no refusal naming CN " H_OPS " and 'CRL expired' in %s/broker.log", W.dir);

    /* An agent is refused the same way, and says so as an ERROR. */
    h_agent_start(&W, H_XINZHAN);
    cr_assert(
        S_WAIT_LINE("broker.log", 15000, "refused session", "CN '" H_XINZHAN "'", "CRL expired"),
        "no refusal naming CN " H_XINZHAN " in %s/broker.log", W.dir);
    char alog[128];
    snprintf(alog, sizeof alog, "agent-%s.log", H_XINZHAN);
    cr_assert(S_WAIT_LINE(alog, 15000, " error ", "CRL"),
              "the agent logs no ERROR about the broker's CRL in %s/%s", W.dir, alog);

    /* A reload that would install another expired CRL is refused. */
    cr_assert_eq(kill(W.broker, SIGHUP), 0);
    cr_assert(S_WAIT_LINE("broker.log", 10000, "reload refused", "has expired"),
              "a reload with the expired CRL was not refused in %s/broker.log", W.dir);

    /* A fresh CRL and a reload restore service without a restart. */
    s_sh("'%s/deploy/pki.sh' --dir '%s' --crl >>'%s/pki.log' 2>&1", s_src(), W.pki, W.dir);
    cr_assert_eq(kill(W.broker, SIGHUP), 0);
    cr_assert(S_WAIT_LINE("broker.log", 10000, "reloaded"), "no reload in %s/broker.log", W.dir);
    out = s_ctl_timed(&st, NULL, cfg, "--timeout 30 status");
    cr_assert_eq(st, 0, "medlinkctl status after the CRL was renewed: exit %d:\n%s", st, out);
    cr_assert_eq(strstr(out, "WARNING"), NULL, "a warning remains after renewal:\n%s", out);
    free(out);
    cr_assert(S_WAIT_LINE(alog, 30000, "connected to broker"),
              "the agent did not reconnect after the CRL was renewed, see %s/%s", W.dir, alog);
    h_agent_stop(&W, H_XINZHAN);
    h_broker_stop(&W);
}

Test(clock, clock_ctl_expired_cert_fails_fast)
{
    h_world_init(&W, NULL);
    s_expire_node_cert(H_OPS);
    h_broker_start(&W);
    char cfg[800];
    h_ctl_config(&W, H_OPS, cfg, sizeof cfg);
    int st = -1;
    int64_t ms = 0;
    char *out = s_ctl_timed(&st, &ms, cfg, "--timeout 30 status");
    cr_assert_eq(st, 3, "medlinkctl with an expired certificate: exit %d, want 3:\n%s", st, out);
    cr_assert(strstr(out, "own certificate expired"), "the reason is not named:\n%s", out);
    cr_assert_eq(strstr(out, "no answer"), NULL, "medlinkctl waited for an answer:\n%s", out);
    /* Not a timing test: only far below the 30 s it used to wait. */
    cr_assert_lt(ms, 10000, "medlinkctl took %lld ms (--timeout 30)", (long long)ms);
    free(out);
    cr_assert(S_WAIT_LINE("broker.log", 10000, "refused session", "CN '" H_OPS "'", "expired"),
              "the broker's refusal does not name CN " H_OPS " and 'expired' in %s/broker.log",
              W.dir);
    h_broker_stop(&W);
}

Test(clock, clock_ctl_wrong_broker_id_fails_fast)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    char cfg[800];
    h_ctl_config(&W, H_OPS, cfg, sizeof cfg);
    /* The same config naming another broker. */
    s_sh("sed -i 's/^broker_id = .*/broker_id = medlinkd.elsewhere/' '%s'", cfg);
    int st = -1;
    int64_t ms = 0;
    char *out = s_ctl_timed(&st, &ms, cfg, "--timeout 30 status");
    cr_assert_eq(st, 3, "medlinkctl with a wrong broker_id: exit %d, want 3:\n%s", st, out);
    cr_assert(strstr(out, "broker CN mismatch") && strstr(out, "medlinkd.elsewhere") &&
                  strstr(out, H_BROKER),
              "the mismatch is not named:\n%s", out);
    cr_assert_lt(ms, 10000, "medlinkctl took %lld ms (--timeout 30)", (long long)ms);
    free(out);
    h_broker_stop(&W);
}

Test(clock, clock_agent_expired_cert_logs_error)
{
    h_world_init(&W, NULL);
    s_expire_node_cert(H_XINZHAN);
    h_broker_start(&W);
    h_agent_start(&W, H_XINZHAN);
    char alog[128];
    snprintf(alog, sizeof alog, "agent-%s.log", H_XINZHAN);
    cr_assert(S_WAIT_LINE(alog, 15000, " error ", "own certificate expired", H_XINZHAN),
              "the agent logs no ERROR naming its expired certificate in %s/%s", W.dir, alog);
    cr_assert(S_WAIT_LINE("broker.log", 10000, "refused session", "CN '" H_XINZHAN "'", "expired"),
              "the broker's refusal does not name CN " H_XINZHAN " in %s/broker.log", W.dir);
    /* It keeps trying (an operator may renew the certificate), and says
     * so again each time. */
    int64_t deadline = ml_mono_ms() + 20000;
    while (h_log_contains(&W, alog, "own certificate expired") < 2 && ml_mono_ms() < deadline)
        h_sleep_ms(100);
    cr_assert_geq(h_log_contains(&W, alog, "own certificate expired"), 2,
                  "the agent stopped retrying, see %s/%s", W.dir, alog);
    cr_assert_eq(h_log_contains(&W, alog, "sslv3 alert certificate expired\n"), 0,
                 "the bare OpenSSL alert is still the whole message");
    h_agent_stop(&W, H_XINZHAN);
    h_broker_stop(&W);
}

Test(clock, clock_ctl_revoked_cert_fails_fast)
{
    h_world_init(&W, "crl = pki/crl.pem\n");
    s_sh("'%s/deploy/pki.sh' --dir '%s' --revoke %s >>'%s/pki.log' 2>&1", s_src(), W.pki, H_OPS,
         W.dir);
    h_broker_start(&W);
    char cfg[800];
    h_ctl_config(&W, H_OPS, cfg, sizeof cfg);
    int st = -1;
    int64_t ms = 0;
    char *out = s_ctl_timed(&st, &ms, cfg, "--timeout 30 status");
    cr_assert_eq(st, 3, "medlinkctl with a revoked certificate: exit %d, want 3:\n%s", st, out);
    cr_assert(strstr(out, "own certificate revoked"), "the reason is not named:\n%s", out);
    cr_assert_lt(ms, 10000, "medlinkctl took %lld ms (--timeout 30)", (long long)ms);
    free(out);
    cr_assert(S_WAIT_LINE("broker.log", 10000, "refused session", "CN '" H_OPS "'", "revoked"),
              "the broker's refusal does not name CN " H_OPS " and 'revoked' in %s/broker.log",
              W.dir);
    h_broker_stop(&W);
}

Test(clock, clock_ctl_unknown_ca_fails_fast)
{
    h_world_init(&W, NULL);
    /* Another community's CA signs a certificate with the same node id. */
    s_sh("'%s/deploy/pki.sh' --dir '%s/other-pki' --ca-name 'another CA' %s >>'%s/pki.log' 2>&1",
         s_src(), W.dir, H_OPS, W.dir);
    h_broker_start(&W);
    char cfg[800];
    h_ctl_config(&W, H_OPS, cfg, sizeof cfg);
    s_sh("sed -i 's|^cert = .*|cert = other-pki/%s.crt|; s|^key = .*|key = other-pki/%s.key|' "
         "'%s'",
         H_OPS, H_OPS, cfg);
    int st = -1;
    int64_t ms = 0;
    char *out = s_ctl_timed(&st, &ms, cfg, "--timeout 30 status");
    cr_assert_eq(st, 3, "medlinkctl with a certificate of another CA: exit %d, want 3:\n%s", st,
                 out);
    cr_assert(strstr(out, "unknown CA"), "the reason is not named:\n%s", out);
    cr_assert_lt(ms, 10000, "medlinkctl took %lld ms (--timeout 30)", (long long)ms);
    free(out);
    cr_assert(S_WAIT_LINE("broker.log", 10000, "refused session", "CN '" H_OPS "'", "unknown CA"),
              "the broker's refusal does not name CN " H_OPS " and 'unknown CA' in %s/broker.log",
              W.dir);
    h_broker_stop(&W);
}
