/* medlinkd's /metrics page (broker/metrics.c, docs/operations.md "Metrics")
 * with the real broker and real clients: a referral delivered, one refused
 * (a forbidden route), one that becomes a dead letter (its recipient refuses
 * it), deadlines missed; then the page must count each, pass `promtool
 * check metrics` without a word, and after a restart still show the open
 * cases and the dead letter it counts from the store. */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "client.h"
#include "harness.h"
#include "ml_common.h"

#include "short.h"

static h_world_t W;

static void s_teardown(void)
{
    h_world_fini(&W);
}

TestSuite(metrics, .fini = s_teardown, .timeout = 300);

/* GET /metrics from the broker's HTTP endpoint (the harness gives every
 * world one, on a port of the system's choosing). */
static char *s_metrics(void)
{
    int status = 0;
    char *body = NULL;
    cr_assert_eq(h_http_get(&W, "/metrics", &status, &body, NULL), 0, "GET /metrics: no reply");
    cr_assert_eq(status, 200, "GET /metrics: %d %s", status, body ? body : "");
    return body;
}

/* The value of one sample ("name" or "name{labels}", exactly as written),
 * NAN when the page has none. */
static double s_value(const char *page, const char *series)
{
    size_t n = strlen(series);
    for (const char *p = page; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
        if (strncmp(p, series, n) == 0 && p[n] == ' ')
            return strtod(p + n + 1, NULL);
    return NAN;
}

/* Fetches the page until series has value want (up to timeout_ms). */
static char *s_wait_value(const char *series, double want, int timeout_ms)
{
    char *page = NULL;
    for (int waited = 0;; waited += 100) {
        free(page);
        page = s_metrics();
        if (s_value(page, series) == want)
            return page;
        if (waited >= timeout_ms)
            break;
        h_sleep_ms(100);
    }
    cr_assert_fail("%s is %g, not %g, after %d ms; page:\n%s", series, s_value(page, series), want,
                   timeout_ms, page);
    return page;
}

static void s_expect(const char *page, const char *series, double want)
{
    double v = s_value(page, series);
    cr_assert(v == want, "%s is %g, expected %g", series, v, want);
}

/* promtool must accept the page and say nothing about it (lint included). */
static void s_promtool(const char *page, const char *name)
{
    char path[700];
    snprintf(path, sizeof path, "%s/%s", W.dir, name);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs(page, f);
    fclose(f);
    int st = 0;
    char *out =
        h_run(&st,
              "command -v promtool >/dev/null || { echo 'promtool is not installed "
              "(Debian package prometheus)'; exit 127; }; promtool check metrics <'%s' 2>&1",
              path);
    cr_assert(st == 0 && out[0] == '\0', "promtool check metrics on %s: exit %d:\n%s", path, st,
              out);
    free(out);
}

/* Waits until the client's node shows as online on the page. */
static void s_wait_online(const char *node)
{
    char series[200];
    snprintf(series, sizeof series, "medlink_node_online{node=\"%s\"}", node);
    free(s_wait_value(series, 1, 10000));
}

Test(metrics, exposition_counts_and_passes_promtool)
{
    h_world_init(&W, "timer_ms = 100\n[deadlines]\nreferral = ACCEPTED 1s\n");
    h_broker_start(&W);

    cli_t clinic, county, city, ops;
    cli_open(&clinic, &W, H_XINZHAN, 1);
    cli_open(&county, &W, H_COUNTY, 1);
    cli_open(&city, &W, H_CITY, 1);
    cli_open(&ops, &W, H_OPS, 1);
    s_wait_online(H_COUNTY);

    /* One referral delivered and acked by the county hospital. */
    cli_referral_t r;
    cli_referral(&r, H_XINZHAN, H_COUNTY, "Metrics Delivered", 0);
    cli_expect_accepted(cli_send_wait(&clinic, &r.env), r.id);
    cr_assert(cli_run_until(&county, cli_got_n, (int[]){1}, 10000), "county got nothing");

    /* One refused: clinic to clinic is not a route. */
    cli_referral(&r, H_XINZHAN, H_FENGLE, "Metrics Sideways", 0);
    cli_expect_nack(cli_send_wait(&clinic, &r.env), NACK_(FORBIDDEN), "TOWNSHIP_CLINIC");

    /* One dead letter: the city hospital refuses its delivery. */
    city.answer = CLI_REFUSE;
    cli_referral(&r, H_XINZHAN, H_CITY, "Metrics Refused", 0);
    cli_expect_accepted(cli_send_wait(&clinic, &r.env), r.id);
    for (int i = 0; i < 100 && h_log_contains(&W, "broker.log", "is a dead letter") == 0; i++)
        cli_run_until(&city, cli_got_n, (int[]){1000000}, 100);

    char *page = s_wait_value("medlink_dead_letters", 1, 10000);
    free(page);
    /* Neither referral is ACCEPTED within its 1 s deadline: both are
     * overdue and escalated. Keep the clients' loops turning meanwhile. */
    for (int i = 0; i < 30; i++)
        cli_run_until(&ops, cli_got_n, (int[]){1000000}, 50);
    page = s_wait_value("medlink_cases_overdue", 2, 15000);

    s_expect(page, "medlink_build_info{version=\"0.1.0\"}", 1);
    cr_assert(s_value(page, "medlink_start_time_seconds") > 1.7e9);
    cr_assert(s_value(page, "medlink_sessions{state=\"ready\"}") >= 4);
    s_expect(page, "medlink_messages_accepted_total{kind=\"referral\"}", 2);
    s_expect(page, "medlink_messages_delivered_total{kind=\"referral\"}", 1);
    s_expect(page, "medlink_messages_refused_total{kind=\"referral\",code=\"forbidden\"}", 1);
    s_expect(page, "medlink_dead_letters", 1);
    s_expect(page, "medlink_dead_letters_total", 1);
    s_expect(page, "medlink_cases_open{kind=\"referral\",state=\"sent\"}", 1);
    s_expect(page, "medlink_cases_open{kind=\"referral\",state=\"delivered\"}", 1);
    s_expect(page, "medlink_cases_open{kind=\"imaging\",state=\"requested\"}", 0);
    cr_assert(s_value(page, "medlink_escalations_total{reason=\"dead_letter\"}") == 1);
    cr_assert(s_value(page, "medlink_escalations_total{reason=\"deadline_missed\"}") == 2);
    s_expect(page, "medlink_node_open_cases{node=\"" H_XINZHAN "\"}", 2);
    s_expect(page, "medlink_open_cases_per_node_limit", 5000);
    s_expect(page, "medlink_node_open_cases_quota_ratio{node=\"" H_XINZHAN "\"}", 2.0 / 5000);
    s_expect(page, "medlink_node_online{node=\"" H_COUNTY "\"}", 1);
    s_expect(page, "medlink_node_online{node=\"" H_FENGLE "\"}", 0);
    s_expect(page, "medlink_node_last_seen_timestamp_seconds{node=\"" H_FENGLE "\"}", 0);
    cr_assert(s_value(page, "medlink_node_last_seen_timestamp_seconds{node=\"" H_XINZHAN "\"}") >
              1.7e9);
    s_expect(page, "medlink_node_queue_messages{node=\"" H_FENGLE "\"}", 0);
    s_expect(page, "medlink_node_queue_oldest_age_seconds{node=\"" H_FENGLE "\"}", 0);
    s_expect(page, "medlink_node_in_flight_messages{node=\"" H_COUNTY "\"}", 0);
    s_expect(page, "medlink_nodes{state=\"offline\"}", 3);
    s_expect(page, "medlink_nodes{state=\"online\"}", 4);
    cr_assert(s_value(page, "medlink_store_group_messages_count") > 0);
    cr_assert(s_value(page, "medlink_store_commit_duration_seconds_count") > 0);
    cr_assert(s_value(page, "medlink_store_commit_duration_seconds_bucket{le=\"+Inf\"}") ==
              s_value(page, "medlink_store_commit_duration_seconds_count"));
    cr_assert(s_value(page, "medlink_store_size_bytes") > 0);
    s_expect(page, "medlink_store_max_bytes", 0);
    s_expect(page, "medlink_tls_handshake_failures_total{reason=\"revoked\"}", 0);
    /* pki.sh certificates are good for a year or more. */
    cr_assert(s_value(page, "medlink_tls_expiry_seconds{kind=\"certificate\",name=\"" H_BROKER
                            "\"}") > 86400.0 * 300);
    cr_assert(strstr(page, "medlink_tls_expiry_seconds{kind=\"ca\",name=\""), "no CA expiry:\n%s",
              page);
    /* Every family says what it is. */
    for (const char *p = page; (p = strstr(p, "\n# TYPE ")) != NULL; p++) {
        char name[128];
        cr_assert_eq(sscanf(p, "\n# TYPE %127s", name), 1);
        char help[160];
        snprintf(help, sizeof help, "# HELP %s ", name);
        cr_assert(strstr(page, help), "%s has no HELP", name);
    }
    s_promtool(page, "metrics-1.txt");
    free(page);

    /* After a restart the open cases and the dead letter are still
     * counted: they come from the store, not from memory. */
    cli_close(&clinic);
    cli_close(&county);
    cli_close(&city);
    cli_close(&ops);
    h_broker_stop(&W);
    h_broker_start(&W);
    page = s_metrics();
    s_expect(page, "medlink_cases_open{kind=\"referral\",state=\"sent\"}", 1);
    s_expect(page, "medlink_cases_open{kind=\"referral\",state=\"delivered\"}", 1);
    s_expect(page, "medlink_dead_letters", 1);
    s_expect(page, "medlink_dead_letters_total", 0);
    s_expect(page, "medlink_messages_accepted_total{kind=\"referral\"}", 0);
    s_expect(page, "medlink_node_open_cases{node=\"" H_XINZHAN "\"}", 2);
    s_expect(page, "medlink_nodes{state=\"online\"}", 0);
    s_promtool(page, "metrics-2.txt");
    free(page);
}

/* Fetches the page until series is at least min (up to timeout_ms). */
static char *s_wait_at_least(const char *series, double min, int timeout_ms, cli_t *c)
{
    char *page = NULL;
    for (int waited = 0;; waited += 100) {
        free(page);
        page = s_metrics();
        if (s_value(page, series) >= min)
            return page;
        if (waited >= timeout_ms)
            break;
        if (c)
            cli_run_until(c, cli_is_up, NULL, 100);
        else
            h_sleep_ms(100);
    }
    cr_assert_fail("%s is %g, not at least %g, after %d ms; page:\n%s", series,
                   s_value(page, series), min, timeout_ms, page);
    return page;
}

/* A revoked certificate's handshakes count under "revoked", and the CRL's
 * next update shows with the certificates' expiry. */
Test(metrics, tls_failures_by_reason_and_crl_expiry)
{
    h_world_init(&W, "crl = pki/crl.pem\n");
    int st = 0;
    char *out = h_run(&st, "'%s/deploy/pki.sh' --dir '%s' --revoke %s 2>&1",
                      getenv("ML_SOURCE_DIR"), W.pki, H_XINZHAN);
    cr_assert_eq(st, 0, "pki.sh --revoke: %s", out);
    free(out);
    h_broker_start(&W);
    cli_t stolen;
    cli_start(&stolen, &W, H_XINZHAN, 0, H_BROKER, 1);
    char *page = s_wait_at_least("medlink_tls_handshake_failures_total{reason=\"revoked\"}", 1,
                                 15000, &stolen);
    s_expect(page, "medlink_sessions{state=\"ready\"}", 0);
    s_expect(page, "medlink_node_online{node=\"" H_XINZHAN "\"}", 0);
    s_expect(page, "medlink_tls_handshake_failures_total{reason=\"unknown_ca\"}", 0);
    const char *crl = strstr(page, "medlink_tls_expiry_seconds{kind=\"crl\",name=\"");
    cr_assert(crl, "no CRL expiry:\n%s", page);
    cr_assert(strtod(strstr(crl, "} ") + 2, NULL) > 86400.0, "%.200s", crl);
    s_promtool(page, "metrics-tls.txt");
    free(page);
    cli_close(&stolen);
}

/* A ReferralUpdate of case_id from c to `to` with status st; asserts it is
 * accepted. */
static void s_update(cli_t *c, const char *to, const char *case_id, int st)
{
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    Medlink__V1__ReferralUpdate u = MEDLINK__V1__REFERRAL_UPDATE__INIT;
    u.status = st;
    u.reason = "test reason";
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = id;
    e.case_id = (char *)case_id;
    e.from = c->node;
    e.to = (char *)to;
    e.created_at = ml_now_ms();
    e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL_UPDATE;
    e.referral_update = &u;
    cli_expect_accepted(cli_send_wait(c, &e), id);
}

/* The open cases by state follow a case through its states and leave it
 * when it is final; the opener's quota use goes back down. */
Test(metrics, open_cases_follow_the_case_states)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t clinic, county;
    cli_open(&clinic, &W, H_XINZHAN, 1);
    cli_open(&county, &W, H_COUNTY, 1);
    cli_referral_t r;
    cli_referral(&r, H_XINZHAN, H_COUNTY, "Metrics States", 0);
    cli_expect_accepted(cli_send_wait(&clinic, &r.env), r.id);
    cr_assert(cli_run_until(&county, cli_got_n, (int[]){1}, 10000), "county got nothing");
    const char *case_id = county.got[0]->case_id;

    char *page =
        s_wait_value("medlink_cases_open{kind=\"referral\",state=\"delivered\"}", 1, 10000);
    s_expect(page, "medlink_cases_open{kind=\"referral\",state=\"sent\"}", 0);
    free(page);
    s_update(&county, H_XINZHAN, case_id, MEDLINK__V1__REFERRAL_STATUS__REFERRAL_ACCEPTED);
    page = s_wait_value("medlink_cases_open{kind=\"referral\",state=\"accepted\"}", 1, 10000);
    s_expect(page, "medlink_cases_open{kind=\"referral\",state=\"delivered\"}", 0);
    s_expect(page, "medlink_node_open_cases{node=\"" H_XINZHAN "\"}", 1);
    free(page);
    s_update(&clinic, H_COUNTY, case_id, MEDLINK__V1__REFERRAL_STATUS__REFERRAL_CANCELLED);
    page = s_wait_value("medlink_node_open_cases{node=\"" H_XINZHAN "\"}", 0, 10000);
    for (const char *p = page; (p = strstr(p, "\nmedlink_cases_open{")) != NULL; p++)
        cr_assert(strtod(strstr(p, "} ") + 2, NULL) == 0, "a final case still counts: %.80s",
                  p + 1);
    s_promtool(page, "metrics-states.txt");
    free(page);
    cli_close(&clinic);
    cli_close(&county);
}

/* Replaces the first occurrence of old in the broker's config file. */
static void s_edit_config(const char *old, const char *new_text)
{
    char path[700];
    snprintf(path, sizeof path, "%s/medlinkd.ini", W.dir);
    char *text = h_slurp(path);
    cr_assert_not_null(text);
    char *at = strstr(text, old);
    cr_assert(at, "\"%s\" is not in %s", old, path);
    FILE *f = fopen(path, "w");
    cr_assert(f);
    fwrite(text, 1, (size_t)(at - text), f);
    fputs(new_text, f);
    fputs(at + strlen(old), f);
    fclose(f);
    free(text);
}

/* A label value from outside the broker (here the CRL's file name, with a
 * quote and a backslash in it) is escaped as the format asks, and a node a
 * reload removes leaves every per-node family. */
Test(metrics, labels_escaped_and_removed_node_omitted)
{
    h_world_init(&W, "crl = pki/q\"uo\\te.pem\n");
    int st = 0;
    char *out =
        h_run(&st, "'%s/deploy/pki.sh' --dir '%s' --crl 2>&1 && cp '%s/crl.pem' '%s/q\"uo\\te.pem'",
              getenv("ML_SOURCE_DIR"), W.pki, W.pki, W.pki);
    cr_assert_eq(st, 0, "pki.sh --crl: %s", out);
    free(out);
    h_broker_start(&W);
    char *page = s_metrics();
    char want[900];
    snprintf(want, sizeof want, "medlink_tls_expiry_seconds{kind=\"crl\",name=\"");
    const char *crl = strstr(page, want);
    cr_assert(crl, "no CRL expiry:\n%s", page);
    cr_assert(strstr(crl, "/q\\\"uo\\\\te.pem\"} "), "the CRL's name is not escaped: %.300s", crl);
    s_promtool(page, "metrics-escaped.txt");
    s_expect(page, "medlink_node_online{node=\"" H_FENGLE "\"}", 0);
    s_expect(page, "medlink_nodes{state=\"offline\"}", 7);
    free(page);

    s_edit_config("[node " H_FENGLE
                  "]\nrole = TOWNSHIP_CLINIC\ncommunity = zhaozhou\nname = Fengle "
                  "Township Health Centre\n",
                  "");
    int before = h_log_contains(&W, "broker.log", "reloaded");
    cr_assert_eq(kill(W.broker, SIGHUP), 0);
    for (int waited = 0; h_log_contains(&W, "broker.log", "reloaded") == before; waited += 50) {
        cr_assert(waited < 10000, "the broker never logged its reload");
        h_sleep_ms(50);
    }
    page = s_wait_value("medlink_nodes{state=\"offline\"}", 6, 10000);
    cr_assert_null(strstr(page, "node=\"" H_FENGLE "\""), "a removed node still has series:\n%s",
                   page);
    s_expect(page, "medlink_node_online{node=\"" H_XINZHAN "\"}", 0);
    s_promtool(page, "metrics-removed.txt");
    free(page);
}

/* A dead letter replayed or purged leaves medlink_dead_letters; the total
 * made since start-up stays. */
Test(metrics, dead_letters_follow_replay_and_purge)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t clinic, city, ops;
    cli_open(&clinic, &W, H_XINZHAN, 1);
    cli_open(&city, &W, H_CITY, 1);
    cli_open(&ops, &W, H_OPS, 0);
    city.answer = CLI_REFUSE;
    char ids[2][ML_ULID_LEN + 1];
    for (int i = 0; i < 2; i++) {
        cli_referral_t r;
        cli_referral(&r, H_XINZHAN, H_CITY, i ? "Metrics Purged" : "Metrics Replayed", 0);
        cli_expect_accepted(cli_send_wait(&clinic, &r.env), r.id);
        snprintf(ids[i], sizeof ids[i], "%s", r.id);
    }
    for (int i = 0; i < 100 && h_log_contains(&W, "broker.log", "is a dead letter") < 2; i++)
        cli_run_until(&city, cli_got_n, (int[]){1000000}, 100);
    free(s_wait_value("medlink_dead_letters", 2, 10000));

    /* The city hospital takes it this time. */
    city.answer = CLI_ACK;
    Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
    rq.op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_DLQ_REPLAY;
    rq.message_id = ids[0];
    cr_assert_eq(cli_admin(&ops, &rq)->affected, 1);
    cr_assert(cli_run_until(&city, cli_got_n, (int[]){3}, 10000), "the replay was not delivered");
    char *page = s_wait_value("medlink_dead_letters", 1, 10000);
    free(page);
    rq.op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_DLQ_PURGE;
    rq.message_id = ids[1];
    cr_assert_eq(cli_admin(&ops, &rq)->affected, 1);
    page = s_wait_value("medlink_dead_letters", 0, 10000);
    s_expect(page, "medlink_dead_letters_total", 2);
    s_expect(page, "medlink_escalations_total{reason=\"dead_letter\"}", 2);
    free(page);
    cli_close(&clinic);
    cli_close(&city);
    cli_close(&ops);
}
