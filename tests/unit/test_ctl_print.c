/* medlinkctl's output without a broker: the WARNING lines of `status` for
 * ops alerts (BrokerStatus.alert, which the broker fills) and for dated
 * items, display widths (wide characters, bytes that are not UTF-8), and a
 * `top` screen cut to a height with its rates from the totals' deltas.
 * The reply messages are built here as the broker would send them. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include "cli.h"
#include "print.h"

/* Runs ctl_print_admin for cmd with stdout in a temporary file; returns
 * what it printed (the caller's). */
static char *s_capture(ctl_cmd_t cmd, const Medlink__V1__AdminReply *rep)
{
    ctl_opts_t o = {0};
    o.cmd = cmd;
    o.cmd_name = "status";
    ctl_print_init(&o);
    fflush(stdout);
    FILE *tmp = tmpfile();
    cr_assert(tmp);
    int saved = dup(STDOUT_FILENO);
    cr_assert(dup2(fileno(tmp), STDOUT_FILENO) >= 0);
    int rc = ctl_print_admin(&o, rep);
    fflush(stdout);
    dup2(saved, STDOUT_FILENO);
    close(saved);
    cr_assert_eq(rc, CTL_EXIT_OK);
    long n = ftell(tmp);
    char *out = calloc(1, (size_t)n + 1);
    rewind(tmp);
    cr_assert_eq(fread(out, 1, (size_t)n, tmp), (size_t)n);
    fclose(tmp);
    return out;
}

static int s_count_prefix(const char *out, const char *prefix)
{
    int n = 0;
    for (const char *p = out; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
        if (strncmp(p, prefix, strlen(prefix)) == 0)
            n++;
    return n;
}

Test(ctl_print, status_alerts_are_warning_lines)
{
    unsetenv("TZ");
    Medlink__V1__Expiry crl = MEDLINK__V1__EXPIRY__INIT;
    crl.what = "CRL pki/crl.pem (next update)";
    crl.not_after = 1796891409000;
    crl.days_left = 2;
    crl.warning = 1;
    Medlink__V1__Expiry ca = MEDLINK__V1__EXPIRY__INIT;
    ca.what = "CA certificate pki/ca.crt";
    ca.not_after = 2096891409000;
    ca.days_left = 3000; /* out of the window: no line */
    Medlink__V1__Expiry *ex[] = {&crl, &ca};
    Medlink__V1__Alert off = MEDLINK__V1__ALERT__INIT;
    off.kind = "node_offline";
    off.subject = "township.fengle.clinic";
    off.detail = "offline for 2h03m (offline_alert_after 30m)";
    off.since = 1796800000000;
    Medlink__V1__Alert dup = MEDLINK__V1__ALERT__INIT;
    dup.kind = "expiry";
    dup.subject = "pki/crl.pem";
    dup.detail = "the CRL expires in 2 days";
    Medlink__V1__Alert dlq = MEDLINK__V1__ALERT__INIT;
    dlq.kind = "dlq";
    dlq.subject = "dlq";
    dlq.detail = "12 dead letters\x1b[2J"; /* a peer's text is escaped */
    Medlink__V1__Alert *al[] = {&off, &dup, &dlq};
    Medlink__V1__BrokerStatus st = MEDLINK__V1__BROKER_STATUS__INIT;
    st.broker = "medlinkd.test";
    st.started_at = 1796800000000;
    st.now = 1796800060000;
    st.open_cases = 5;
    st.overdue_cases = 2;
    st.dead_letters = 12;
    st.cases_in_memory = 3;
    st.n_expiry = 2;
    st.expiry = ex;
    st.n_alert = 3;
    st.alert = al;
    Medlink__V1__AdminReply rep = MEDLINK__V1__ADMIN_REPLY__INIT;
    rep.broker_status = &st;

    char *out = s_capture(CTL_CMD_STATUS, &rep);
    cr_assert(strstr(out, "\ncases     open 5, overdue 2 (in memory 3)\n"), "%s", out);
    cr_assert(strstr(out, "\ndlq       12 dead letters\n"), "%s", out);
    cr_assert_eq(s_count_prefix(out, "WARNING: "), 3, "not 3 WARNING lines:\n%s", out);
    cr_assert(strstr(out, "\nWARNING: CRL pki/crl.pem (next update) expires in 2 day(s), on "),
              "%s", out);
    cr_assert(strstr(out, "\nWARNING: node_offline township.fengle.clinic: offline for 2h03m "
                          "(offline_alert_after 30m) (since 2026-12-09T"),
              "%s", out);
    cr_assert(strstr(out, "\nWARNING: dlq dlq: 12 dead letters\\x1b[2J\n"), "%s", out);
    cr_assert_eq(strstr(out, "the CRL expires in 2 days"), NULL,
                 "the expiry alert repeats the CRL's line:\n%s", out);
    cr_assert_eq(strchr(out, '\x1b'), NULL, "an escape reached the terminal");
    free(out);
}

Test(ctl_print, text_width_of_wide_and_invalid_bytes)
{
    ctl_opts_t o = {0};
    unsetenv("LC_ALL");
    setenv("LANG", "C", 1); /* medlinkctl measures UTF-8 even so */
    ctl_print_init(&o);
    cr_assert_eq(ctl_text_width("abc"), 3);
    cr_assert_eq(ctl_text_width("赵州县人民医院"), 14);
    cr_assert_eq(ctl_text_width("a赵b"), 4);
    cr_assert_eq(ctl_text_width("\xff\xfe"), 2, "one column per invalid byte");
    cr_assert_eq(ctl_text_width("\xe8\xb5"), 2, "a cut sequence: one column per byte");
    cr_assert_eq(ctl_text_fit("赵州县", 5), 6, "two wide characters fit in 5 columns");
    cr_assert_eq(ctl_text_fit("abc", 10), 3);
    cr_assert_eq(ctl_text_fit("ab赵", 3), 2);
}

Test(ctl_print, top_cuts_rows_and_rates_from_deltas)
{
    ctl_opts_t o = {0};
    unsetenv("TZ");
    ctl_print_init(&o);
    Medlink__V1__NodeStatus n[10], pn[10];
    Medlink__V1__NodeStatus *np[10], *pp[10];
    char ids[10][32];
    for (int i = 0; i < 10; i++) {
        medlink__v1__node_status__init(&n[i]);
        medlink__v1__node_status__init(&pn[i]);
        snprintf(ids[i], sizeof ids[i], "node%d.zhaozhou.clinic", i);
        n[i].node_id = pn[i].node_id = ids[i];
        n[i].online = i % 2;
        n[i].delivered = 100 + (uint64_t)i * 10;
        pn[i].delivered = 100;
        np[i] = &n[i];
        pp[i] = &pn[i];
    }
    Medlink__V1__BrokerStatus cur = MEDLINK__V1__BROKER_STATUS__INIT, prev = cur;
    cur.broker = prev.broker = "medlinkd.test";
    cur.started_at = prev.started_at = 1796800000000;
    cur.now = 1796800060000;
    prev.now = 1796800058000;
    cur.accepted_total = 30;
    prev.accepted_total = 10;
    cur.n_node = prev.n_node = 10;
    cur.node = np;
    prev.node = pp;
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    int lines = ctl_print_top(f, &cur, &prev, 2000, 9);
    fclose(f);
    cr_assert_leq(lines, 9, "%d lines in 9:\n%s", lines, buf);
    int newlines = 0;
    for (char *p = buf; *p; p++)
        newlines += *p == '\n';
    cr_assert_eq(newlines, lines, "returned %d, wrote %d:\n%s", lines, newlines, buf);
    cr_assert(strstr(buf, "per second: accepted 10.0  delivered "), "%s", buf);
    /* 4 header lines, the table's header, 3 nodes, "... 7 more". */
    cr_assert(strstr(buf, "\n... 7 more\n"), "%s", buf);
    cr_assert(strstr(buf, "node2.zhaozhou.clinic") && !strstr(buf, "node3.zhaozhou.clinic"), "%s",
              buf);
    /* node1 delivered 10 in 2 s. */
    const char *l1 = strstr(buf, "node1.zhaozhou.clinic");
    cr_assert(l1 && strstr(l1, " 5.0\n") && strstr(l1, " 5.0\n") < strstr(l1, "node2"), "%s", buf);
    free(buf);

    /* Without a previous screen (or after the broker restarted): "-". */
    buf = NULL;
    f = open_memstream(&buf, &len);
    prev.started_at = 1;
    ctl_print_top(f, &cur, &prev, 2000, 0);
    fclose(f);
    cr_assert(strstr(buf, "per second: accepted -  delivered -  refused -"), "%s", buf);
    cr_assert(strstr(buf, "node9.zhaozhou.clinic"), "max_lines 0 cuts nothing:\n%s", buf);
    free(buf);
}
