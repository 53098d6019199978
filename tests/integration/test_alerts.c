/* Ops alerts (broker/alerts.h) with the real medlinkd and agents: the ops
 * node's agent finds each alert in its inbox once per episode, and a
 * resolved notice when the episode ends; `medlinkctl --json status` lists
 * the alerts in progress. Node offline (per role and per node
 * offline_alert_after), certificate expiry (crl_warn_days), the store past
 * store_alert_percent of max_store_bytes, and the dead-letter queue. The
 * metrics (medlink_alert_*) and a reload that removes a node are checked
 * on a broker run in the test's own process. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <criterion/criterion.h>
#include <jansson.h>

#include "alerts.h"
#include "broker.h"
#include "config.h"
#include "harness.h"
#include "ml_common.h"
#include "ml_sbuf.h"

static h_world_t W;
static char s_ops_ctl[800];

static void s_teardown(void)
{
    h_world_fini(&W);
}

TestSuite(alerts, .fini = s_teardown, .timeout = 300);

/* Inserts line right after the section header [section] of medlinkd.ini
 * (h_world_init writes the nodes after the caller's extra lines). */
static void s_ini_insert(const char *section, const char *line)
{
    char path[700];
    snprintf(path, sizeof path, "%s/medlinkd.ini", W.dir);
    char *ini = h_slurp(path);
    cr_assert(ini, "no %s", path);
    char head[300];
    snprintf(head, sizeof head, "[%s]\n", section);
    char *at = strstr(ini, head);
    cr_assert(at, "no %s in medlinkd.ini", head);
    at += strlen(head);
    FILE *f = fopen(path, "w");
    cr_assert(f);
    fwrite(ini, 1, (size_t)(at - ini), f);
    fputs(line, f);
    fputs(at, f);
    fclose(f);
    free(ini);
}

static void s_start(void)
{
    h_broker_start(&W);
    h_ctl_config(&W, H_OPS, s_ops_ctl, sizeof s_ops_ctl);
    h_agent_start(&W, H_OPS);
}

/* Escalations of reason in the ops agent's inbox, about target (NULL:
 * any), resolved or not (-1: either). */
static int s_count_esc(const char *reason, const char *target, int resolved)
{
    char dir[700];
    h_spool(&W, H_OPS, "inbox", dir, sizeof dir);
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        size_t len = strlen(de->d_name);
        if (len < 5 || strcmp(de->d_name + len - 5, ".json") != 0)
            continue;
        char path[1200];
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        json_t *j = json_load_file(path, 0, NULL);
        json_t *e = j ? json_object_get(j, "escalation") : NULL;
        const char *r = json_string_value(json_object_get(e, "reason"));
        const char *t = json_string_value(json_object_get(e, "target"));
        int res = json_is_true(json_object_get(e, "resolved"));
        if (r && strcmp(r, reason) == 0 && (!target || (t && strcmp(t, target) == 0)) &&
            (resolved < 0 || res == resolved))
            n++;
        json_decref(j);
    }
    closedir(d);
    return n;
}

static int s_wait_esc(const char *reason, const char *target, int resolved, int n, int ms)
{
    int got = 0;
    for (int waited = 0; waited <= ms; waited += 200) {
        if ((got = s_count_esc(reason, target, resolved)) >= n)
            return got;
        h_sleep_ms(200);
    }
    return got;
}

/* Lets the broker's alert checks run for ms, then counts nothing yet: it
 * asks the broker that whatever those checks raised has reached the ops
 * agent (nothing queued or in flight for it), so that the inbox counted
 * next is complete. The sleep stays on purpose: it waits for a timer (a
 * check every second, the store and DLQ ones every 2 s, broker/alerts.c)
 * whose runs the broker does not count anywhere a test could ask; only
 * the delivery of what they raised is asked instead of waited for. */
static void s_checks_run(int ms)
{
    h_sleep_ms(ms);
    h_node_counts_t q = h_wait_quiet(&W, H_OPS, 0, 20000);
    cr_assert(q.queued == 0 && q.in_flight == 0, "broker: %lld queued, %lld in flight for %s",
              q.queued, q.in_flight, H_OPS);
}

/* 1 when status lists an alert of kind about subject (NULL: any). */
static int s_status_has(const char *kind, const char *subject)
{
    json_t *j = h_ctl_json(s_ops_ctl, "status");
    json_t *arr = json_object_get(j, "alert");
    int found = 0;
    for (size_t i = 0; i < json_array_size(arr); i++) {
        json_t *a = json_array_get(arr, i);
        const char *k = json_string_value(json_object_get(a, "kind"));
        const char *s = json_string_value(json_object_get(a, "subject"));
        if (k && strcmp(k, kind) == 0 && (!subject || (s && strcmp(s, subject) == 0))) {
            cr_assert(json_integer_value(json_object_get(a, "since")) > 0 ||
                          json_is_string(json_object_get(a, "since")),
                      "alert without since");
            found = 1;
        }
    }
    json_decref(j);
    return found;
}

#define R_OFFLINE "ESCALATION_NODE_OFFLINE"

Test(alerts, node_offline_once_per_episode_and_resolved)
{
    /* Only township clinics are watched (2 s), except Fengle (0: never
     * alerted, its own setting wins over its role's); the county hospital
     * is watched by its own setting (3 s) although its role is not. */
    h_world_init(&W, "[alerts]\noffline_alert_after = 0\n"
                     "offline_alert_after.TOWNSHIP_CLINIC = 2s\n");
    s_ini_insert("node " H_FENGLE, "offline_alert_after = 0\n");
    s_ini_insert("node " H_COUNTY, "offline_alert_after = 3s\n");
    s_start();
    h_agent_start(&W, H_XINZHAN);

    /* The county hospital never connected: counted from the broker's start. */
    cr_assert_eq(s_wait_esc(R_OFFLINE, H_COUNTY, 0, 1, 20000), 1,
                 "no offline alert for the county hospital, which never connected");
    cr_assert_eq(s_count_esc(R_OFFLINE, H_XINZHAN, -1), 0, "an online clinic was alerted");
    cr_assert(s_status_has("node_offline", H_COUNTY));

    int64_t stopped = ml_now_ms();
    h_agent_stop(&W, H_XINZHAN);
    cr_assert_eq(s_wait_esc(R_OFFLINE, H_XINZHAN, 0, 1, 20000), 1,
                 "no offline alert for the stopped clinic");
    /* Raised offline_alert_after (2 s) after it was last seen, not before. */
    char *path = h_find_json(&W, H_OPS, "inbox", "offline for");
    cr_assert(path);
    json_t *j = json_load_file(path, 0, NULL);
    free(path);
    cr_assert(j);
    long long since =
        atoll(json_string_value(json_object_get(json_object_get(j, "escalation"), "since")));
    long long created = atoll(json_string_value(json_object_get(j, "createdAt")));
    cr_assert(since > 0 && since <= stopped + 1000, "since %lld, stopped at %lld", since,
              (long long)stopped);
    cr_assert(created - since >= 2000, "alerted %lld ms after last seen", created - since);
    json_decref(j);
    cr_assert(s_status_has("node_offline", H_XINZHAN));
    /* Once per episode: several more checks send nothing more. */
    s_checks_run(5000);
    cr_assert_eq(s_count_esc(R_OFFLINE, H_XINZHAN, -1), 1, "the alert was sent more than once");
    cr_assert_eq(s_count_esc(R_OFFLINE, H_COUNTY, -1), 1, "the alert was sent more than once");
    cr_assert_eq(s_count_esc(R_OFFLINE, H_FENGLE, -1), 0,
                 "Fengle has offline_alert_after = 0 and must never be alerted");
    cr_assert_eq(s_count_esc(R_OFFLINE, H_OPS, -1), 0, "OPS nodes are not watched here");
    cr_assert_eq(h_log_contains(&W, "broker.log", "node_offline: node " H_XINZHAN " ("), 1);

    /* Back online: one resolved notice, and the episode is over. */
    h_agent_start(&W, H_XINZHAN);
    cr_assert_eq(s_wait_esc(R_OFFLINE, H_XINZHAN, 1, 1, 20000), 1, "no resolved notice");
    s_checks_run(3000);
    cr_assert_eq(s_count_esc(R_OFFLINE, H_XINZHAN, 1), 1, "more than one resolved notice");
    cr_assert_eq(s_count_esc(R_OFFLINE, H_XINZHAN, 0), 1, "raised again while online");
    cr_assert(!s_status_has("node_offline", H_XINZHAN), "status still lists a resolved alert");
    cr_assert(s_status_has("node_offline", H_COUNTY));
    cr_assert_eq(
        h_log_contains(&W, "broker.log", "node_offline resolved: node " H_XINZHAN " is back"), 1);

    /* A new episode is a new alert. */
    h_agent_stop(&W, H_XINZHAN);
    cr_assert_eq(s_wait_esc(R_OFFLINE, H_XINZHAN, 0, 2, 20000), 2,
                 "a second episode raised no alert");
}

Test(alerts, expiry_within_crl_warn_days)
{
    /* Node certificates are valid 365 days: inside a 3,650-day window. */
    h_world_init(&W, "crl_warn_days = 3650\n");
    s_start();
    cr_assert(s_wait_esc("ESCALATION_EXPIRY", NULL, 0, 1, 20000) >= 1, "no expiry alert");
    s_checks_run(1500);
    int n = s_count_esc("ESCALATION_EXPIRY", NULL, 0);
    s_checks_run(3000);
    cr_assert_eq(s_count_esc("ESCALATION_EXPIRY", NULL, -1), n, "expiry alerts sent again");
    /* The broker's own certificate is one of them, named as the target. */
    char dir[700];
    h_spool(&W, H_OPS, "inbox", dir, sizeof dir);
    char *p = h_find_json(&W, H_OPS, "inbox", H_BROKER ".crt");
    cr_assert(p, "no expiry alert names the broker's certificate");
    free(p);
    cr_assert(s_status_has("expiry", NULL));
}

/* Size of the broker's database and WAL, as the alert measures it. */
static long s_store_bytes(void)
{
    char p[800];
    struct stat sb;
    long n = 0;
    snprintf(p, sizeof p, "%s/data/broker/broker.db", W.dir);
    if (stat(p, &sb) == 0)
        n += (long)sb.st_size;
    snprintf(p, sizeof p, "%s/data/broker/broker.db-wal", W.dir);
    if (stat(p, &sb) == 0)
        n += (long)sb.st_size;
    /* Bodies live in segment files beside it. */
    snprintf(p, sizeof p, "%s/data/broker/broker.db-seg", W.dir);
    DIR *d = opendir(p);
    for (struct dirent *e; d && (e = readdir(d));) {
        char f[1100];
        snprintf(f, sizeof f, "%s/%s", p, e->d_name);
        if (e->d_name[0] != '.' && stat(f, &sb) == 0)
            n += (long)sb.st_size;
    }
    if (d)
        closedir(d);
    return n;
}

Test(alerts, store_full_past_store_alert_percent)
{
    /* 50 % of 3 MB: the fresh store is far under it; twelve 200 KB
     * referrals for an offline hospital fill it past. */
    h_world_init(&W, "max_store_bytes = 3000000\n[alerts]\nstore_alert_percent = 50\n");
    s_start();
    h_agent_start(&W, H_XINZHAN);
    s_checks_run(3000);
    cr_assert(s_store_bytes() < 1500000, "the fresh store is already %ld bytes", s_store_bytes());
    cr_assert_eq(s_count_esc("ESCALATION_STORE_FULL", NULL, -1), 0, "alerted below the mark");
    cr_assert(!s_status_has("store_full", NULL));

    size_t big = 200 * 1024;
    char *reason = malloc(big + 1);
    for (size_t i = 0; i < big; i++)
        reason[i] = (char)('a' + (i * 7 + i / 13) % 26);
    reason[big] = 0;
    char *doc = malloc(big + 1024);
    for (int i = 0; i < 12; i++) {
        snprintf(doc, big + 1024,
                 "{\"to\": \"%s\", \"referral\": {\"patient\": {\"healthCardId\": "
                 "\"13010219800101%04d\", \"name\": \"Fill %d\"}, \"reason\": \"%s\"}}",
                 H_COUNTY, i, i, reason);
        char name[64];
        snprintf(name, sizeof name, "fill-%02d.json", i);
        h_drop(&W, H_XINZHAN, name, doc);
    }
    free(doc);
    free(reason);
    cr_assert_eq(h_wait_count(&W, H_XINZHAN, "sent", 12, 60000), 12, "the clinic sent %d",
                 h_count(&W, H_XINZHAN, "sent"));
    cr_assert_eq(s_wait_esc("ESCALATION_STORE_FULL", "store", 0, 1, 20000), 1,
                 "no store alert at %ld bytes", s_store_bytes());
    cr_assert(s_status_has("store_full", "store"));
    s_checks_run(4500);
    cr_assert_eq(s_count_esc("ESCALATION_STORE_FULL", NULL, -1), 1, "store alert sent again");
}

Test(alerts, dlq_raised_and_resolved_by_purge)
{
    h_world_init(&W, "timer_ms = 100\n");
    s_start();
    h_agent_start(&W, H_XINZHAN);
    s_checks_run(2500);
    cr_assert_eq(s_count_esc("ESCALATION_DLQ", NULL, -1), 0, "alerted on an empty DLQ");
    /* A referral that must reach the hospital within 1.5 s; the hospital's
     * agent is down: it becomes a dead letter. */
    char doc[1024];
    snprintf(doc, sizeof doc,
             "{\"to\": \"%s\", \"deadline\": \"%lld\", \"referral\": {\"patient\": "
             "{\"healthCardId\": \"130102198001019999\", \"name\": \"Expired Patient\"},"
             " \"reason\": \"review\"}}",
             H_COUNTY, (long long)(ml_now_ms() + 1500));
    h_drop(&W, H_XINZHAN, "late.json", doc);
    cr_assert_eq(s_wait_esc("ESCALATION_DLQ", "dlq", 0, 1, 30000), 1, "no DLQ alert");
    cr_assert(s_status_has("dlq", "dlq"));
    s_checks_run(4500);
    cr_assert_eq(s_count_esc("ESCALATION_DLQ", NULL, -1), 1, "DLQ alert sent again");

    free(h_ctl(0, s_ops_ctl, "dlq purge --all"));
    cr_assert_eq(s_wait_esc("ESCALATION_DLQ", "dlq", 1, 1, 20000), 1, "no resolved DLQ notice");
    cr_assert(!s_status_has("dlq", NULL), "status lists a resolved DLQ alert");
    cr_assert_eq(h_log_contains(&W, "broker.log", "dlq resolved: the dead-letter queue holds 0"),
                 1);
}

/* Runs loop for ms (the broker's timers fire meanwhile). */
static void s_timer_stop_cb(uv_timer_t *t)
{
    uv_stop(t->loop);
}

static void s_run_for(uv_loop_t *loop, int ms)
{
    uv_timer_t t;
    uv_timer_init(loop, &t);
    uv_timer_start(&t, s_timer_stop_cb, (uint64_t)ms, 0);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
}

static char *s_metrics(ml_broker_t *b)
{
    ml_sbuf_t out;
    ml_sbuf_init(&out, 1 << 20);
    ml_bk_alerts_metrics(b, &out);
    char *text = ml_sbuf_take(&out, NULL);
    cr_assert(text, "the metrics did not fit");
    return text;
}

/* promtool check metrics on text, when promtool is installed (the plain
 * stage of deploy/test.sh installs it). */
static void s_promtool_check(const char *text)
{
    if (system("command -v promtool >/dev/null 2>&1") != 0)
        return;
    char path[700];
    snprintf(path, sizeof path, "%s/alert-metrics.txt", W.dir);
    FILE *f = fopen(path, "w");
    cr_assert(f);
    fputs(text, f);
    fclose(f);
    int st = -1;
    char *out = h_run(&st, "promtool check metrics <'%s' 2>&1", path);
    cr_assert_eq(st, 0, "promtool check metrics:\n%s\n%s", out, text);
    free(out);
}

Test(alerts, metrics_and_node_removed_by_reload)
{
    /* Every node is watched after 1 s; the CA and certificates are inside
     * crl_warn_days. No HTTP endpoint: nothing else listens. */
    h_world_init(&W,
                 "crl_warn_days = 3650\n[http]\nlisten =\n[alerts]\noffline_alert_after = 1s\n");
    char ini[700], err[512];
    snprintf(ini, sizeof ini, "%s/medlinkd.ini", W.dir);
    /* The broker's certificate under a name with a quote and a backslash:
     * the label value must escape both. */
    int st = -1;
    free(h_run(&st, "cp '%s/%s.crt' '%s/med\"link\\d.crt'", W.pki, H_BROKER, W.pki));
    cr_assert_eq(st, 0);
    char *text = h_slurp(ini);
    cr_assert(text);
    char *at = strstr(text, "cert = pki/" H_BROKER ".crt\n");
    cr_assert(at);
    FILE *f = fopen(ini, "w");
    cr_assert(f);
    fprintf(f, "%.*scert = pki/med\"link\\d.crt\n%s", (int)(at - text), text,
            at + strlen("cert = pki/" H_BROKER ".crt\n"));
    fclose(f);
    free(text);
    ml_broker_config_t *cfg = NULL;
    cr_assert_eq(ml_broker_config_load(ini, &cfg, err, sizeof err), 0, "%s", err);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_broker_t *b = NULL;
    cr_assert_eq(ml_broker_new(&loop, &cfg, &b, err, sizeof err), 0, "%s", err);

    char *m = s_metrics(b);
    cr_assert(strstr(m, "# TYPE medlink_alert_active gauge\n"), "%s", m);
    cr_assert(strstr(m, "# TYPE medlink_alerts_raised_total counter\n"), "%s", m);
    cr_assert(strstr(m, "medlink_alerts_raised_total{alert=\"node_offline\"} 0\n"), "%s", m);
    cr_assert(!strstr(m, "medlink_alert_active{"), "alerts before any check:\n%s", m);
    free(m);

    s_run_for(&loop, 2600);
    m = s_metrics(b);
    cr_assert(
        strstr(m, "medlink_alert_active{alert=\"node_offline\",subject=\"" H_XINZHAN "\"} 1\n"),
        "%s", m);
    cr_assert(strstr(m, "medlink_alert_active{alert=\"node_offline\",subject=\"" H_OPS "\"} 1\n"),
              "%s", m);
    cr_assert(strstr(m, "medlink_alert_active{alert=\"expiry\",subject=\"certificate "), "%s", m);
    cr_assert(strstr(m, "/med\\\"link\\\\d.crt (CN " H_BROKER ")\"} 1\n"), "%s", m);
    /* Seven registered nodes, all offline: seven raised, once each. */
    cr_assert(strstr(m, "medlink_alerts_raised_total{alert=\"node_offline\"} 7\n"), "%s", m);
    cr_assert(!strstr(m, "alert=\"store_full\",subject"), "%s", m);
    cr_assert(!strstr(m, "alert=\"dlq\",subject"), "%s", m);
    s_promtool_check(m);
    free(m);

    /* A reload that takes Xinzhan out of the registry ends its episode. */
    text = h_slurp(ini);
    cr_assert(text);
    at = strstr(text, "[node " H_XINZHAN "]\n");
    cr_assert(at);
    char *end = strstr(at, "\n\n");
    cr_assert(end);
    memmove(at, end + 2, strlen(end + 2) + 1);
    f = fopen(ini, "w");
    cr_assert(f);
    fputs(text, f);
    fclose(f);
    free(text);
    cr_assert_eq(ml_broker_reload(b, err, sizeof err), 0, "%s", err);
    s_run_for(&loop, 1600);
    m = s_metrics(b);
    cr_assert(!strstr(m, "subject=\"" H_XINZHAN "\""), "a removed node is still alerted:\n%s", m);
    cr_assert(strstr(m, "subject=\"" H_FENGLE "\"} 1\n"), "%s", m);
    cr_assert(strstr(m, "medlink_alerts_raised_total{alert=\"node_offline\"} 7\n"), "%s", m);
    free(m);

    ml_broker_destroy(&b);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
}

Test(alerts, expiry_warning_then_expired_told_once_more)
{
    /* The broker's certificate runs out 6 s from now: inside the window at
     * start, past it a few seconds later. */
    h_world_init(&W, "crl_warn_days = 7\n[http]\nlisten =\n");
    char when[32];
    time_t t = time(NULL) + 6;
    struct tm tm;
    strftime(when, sizeof when, "%Y%m%d%H%M%SZ", gmtime_r(&t, &tm));
    int st = -1;
    char *out =
        h_run(&st, "'%s/deploy/pki.sh' --dir '%s' --force --not-after %s %s 2>&1",
              getenv("ML_SOURCE_DIR") ? getenv("ML_SOURCE_DIR") : ".", W.pki, when, H_BROKER);
    cr_assert_eq(st, 0, "pki.sh: %s", out);
    free(out);
    char ini[700], err[512];
    snprintf(ini, sizeof ini, "%s/medlinkd.ini", W.dir);
    ml_broker_config_t *cfg = NULL;
    cr_assert_eq(ml_broker_config_load(ini, &cfg, err, sizeof err), 0, "%s", err);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_broker_t *b = NULL;
    cr_assert_eq(ml_broker_new(&loop, &cfg, &b, err, sizeof err), 0, "%s", err);

    s_run_for(&loop, 1500);
    char *m = s_metrics(b);
    cr_assert(strstr(m, "medlink_alerts_raised_total{alert=\"expiry\"} 1\n"), "%s", m);
    cr_assert(strstr(m, "medlink_alert_active{alert=\"expiry\",subject=\"certificate "), "%s", m);
    free(m);
    /* Past not_after: one more notice, same episode; then nothing more. */
    s_run_for(&loop, 8000);
    m = s_metrics(b);
    cr_assert(strstr(m, "medlink_alerts_raised_total{alert=\"expiry\"} 2\n"), "%s", m);
    cr_assert(strstr(m, "medlink_alert_active{alert=\"expiry\",subject=\"certificate "), "%s", m);
    free(m);
    s_run_for(&loop, 2000);
    m = s_metrics(b);
    cr_assert(strstr(m, "medlink_alerts_raised_total{alert=\"expiry\"} 2\n"), "%s", m);
    free(m);

    ml_broker_destroy(&b);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
}
