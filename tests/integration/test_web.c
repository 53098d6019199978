/* The web status page in a real browser: medlinkd with agents, a case made
 * overdue and a message made a dead letter, then Debian's headless
 * Chromium loads the page from medlinkd's HTTP endpoint, runs its
 * JavaScript against the JSON API, and the test reads the DOM it rendered
 * (--dump-dom) and a screenshot it took. Chromium missing fails the test:
 * deploy/test.sh installs it. Also over plain HTTP: the language choice
 * (?lang=, Accept-Language), the assets' content types and cache headers,
 * and /api/v1/throughput. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <jansson.h>

#include "harness.h"

static h_world_t W;
static int s_http_port;
static char s_ops[800], s_county[800], s_clinic[800];

static void s_teardown(void)
{
    h_world_fini(&W);
}

TestSuite(web, .fini = s_teardown, .timeout = 400);

/* GET path from the broker's HTTP endpoint, with an Accept-Language header
 * when accept is not NULL: the status line and headers, a blank line, and
 * the body, in one malloc'd string. */
static char *s_http_get(const char *path, const char *accept)
{
    char hdr[256] = "";
    if (accept)
        snprintf(hdr, sizeof hdr, "Accept-Language: %s\r\n", accept);
    int status = 0;
    char *head = NULL, *body = NULL;
    cr_assert_eq(h_http_get_hdr(&W, path, accept ? hdr : NULL, &status, &head, &body, NULL), 0,
                 "no answer from the HTTP endpoint for %s", path);
    size_t n = strlen(head) + strlen(body) + 8;
    char *out = malloc(n);
    cr_assert_not_null(out);
    /* The head may or may not end in its blank line. */
    size_t hl = strlen(head);
    while (hl && (head[hl - 1] == '\n' || head[hl - 1] == '\r'))
        hl--;
    snprintf(out, n, "%.*s\r\n\r\n%s", (int)hl, head, body);
    free(head);
    free(body);
    return out;
}

/* The status code of a response s_http_get returned. */
static int s_status(const char *resp)
{
    const char *sp = strchr(resp, ' ');
    return sp ? atoi(sp + 1) : 0;
}

/* The value of a response header (case-insensitive name), copied into out;
 * "" when absent. */
static const char *s_header(const char *resp, const char *name, char *out, size_t outlen)
{
    out[0] = '\0';
    const char *end = strstr(resp, "\r\n\r\n");
    size_t nl = strlen(name);
    for (const char *p = strstr(resp, "\r\n"); p && p < end; p = strstr(p + 2, "\r\n")) {
        const char *line = p + 2;
        if (strncasecmp(line, name, nl) == 0 && line[nl] == ':') {
            const char *v = line + nl + 1;
            while (*v == ' ')
                v++;
            size_t vl = strcspn(v, "\r");
            snprintf(out, outlen, "%.*s", (int)vl, v);
            break;
        }
    }
    return out;
}

/* GET path, a 200 with a JSON body; the parsed body (the caller's). */
static json_t *s_json_get(const char *path)
{
    char *r = s_http_get(path, NULL);
    cr_assert_eq(s_status(r), 200, "%s: %.300s", path, r);
    char hv[128];
    cr_assert(strncmp(s_header(r, "Content-Type", hv, sizeof hv), "application/json", 16) == 0,
              "%s: Content-Type %s", path, hv);
    json_error_t jerr;
    json_t *j = json_loads(strstr(r, "\r\n\r\n") + 4, 0, &jerr);
    cr_assert(j, "%s is not JSON: %s\n%s", path, jerr.text, r);
    free(r);
    return j;
}

/* A number of a JSON object: proto3 JSON gives 64-bit ones as strings. */
static json_int_t s_int(json_t *j, const char *key)
{
    json_t *v = json_object_get(j, key);
    return json_is_string(v) ? strtoll(json_string_value(v), NULL, 10) : json_integer_value(v);
}

/* The sum of one series of /api/v1/throughput. */
static json_int_t s_sum(json_t *tp, const char *series)
{
    json_int_t sum = 0;
    json_t *v;
    size_t k;
    json_array_foreach(json_object_get(tp, series), k, v) sum += json_integer_value(v);
    return sum;
}

static const char *s_str(json_t *j, const char *key)
{
    const char *v = json_string_value(json_object_get(j, key));
    return v ? v : "";
}

/* Runs headless Chromium with its own profile in the world's folder.
 * extra: the mode (--dump-dom, --screenshot=...). Returns its stdout. */
static char *s_chromium(const char *extra, const char *url)
{
    int st = -1;
    char *which = h_run(&st, "command -v chromium 2>/dev/null");
    cr_assert(st == 0 && which[0],
              "chromium is not installed (Debian package chromium; deploy/test.sh installs it)");
    free(which);
    char *out = h_run(&st,
                      "cd '%s' && timeout 120 chromium --headless --no-sandbox --disable-gpu "
                      "--no-first-run --no-default-browser-check --disable-extensions "
                      "--user-data-dir='%s/chromium-profile' --virtual-time-budget=8000 "
                      "%s '%s' 2>>'%s/chromium.log'",
                      W.dir, W.dir, extra, url, W.dir);
    cr_assert_eq(st, 0, "chromium %s %s: exit %d (see %s/chromium.log)", extra, url, st, W.dir);
    return out;
}

/* Takes a screenshot of the page in lang into the world's folder and
 * checks that it is a PNG of some substance. */
static void s_screenshot(const char *name, const char *lang)
{
    char png[700], shot[800], url[256];
    snprintf(png, sizeof png, "%s/%s", W.dir, name);
    snprintf(shot, sizeof shot, "--screenshot='%s' --window-size=1280,900 --hide-scrollbars", png);
    snprintf(url, sizeof url, "http://127.0.0.1:%d/?lang=%s", s_http_port, lang);
    free(s_chromium(shot, url));
    struct stat sb;
    cr_assert(stat(png, &sb) == 0, "no screenshot at %s", png);
    cr_assert_gt(sb.st_size, 20000, "the screenshot is only %lld bytes", (long long)sb.st_size);
    FILE *f = fopen(png, "rb");
    cr_assert(f);
    unsigned char sig[8] = {0};
    cr_assert_eq(fread(sig, 1, 8, f), 8);
    fclose(f);
    cr_assert(memcmp(sig, "\x89PNG\r\n\x1a\n", 8) == 0, "%s is not a PNG", png);
    fprintf(stderr, "web: screenshot %s (%lld bytes)\n", png, (long long)sb.st_size);
}

Test(web, status_page_in_headless_chromium_shows_nodes_overdue_case_and_dead_letter)
{
    h_world_init(&W, "timer_ms = 100\n[deadlines]\ndown_transfer = ARRIVED 1s after ACCEPTED\n");
    h_broker_start(&W);
    s_http_port = W.http_port;
    cr_assert_gt(s_http_port, 0, "the broker's HTTP endpoint is off");
    h_ctl_config(&W, H_OPS, s_ops, sizeof s_ops);
    h_ctl_config(&W, H_COUNTY, s_county, sizeof s_county);
    h_ctl_config(&W, H_XINZHAN, s_clinic, sizeof s_clinic);
    h_agent_start(&W, H_XINZHAN);
    h_agent_start(&W, H_COUNTY);

    /* A dead letter: a referral for the city hospital, which is offline,
     * that expires in 1 s. */
    free(h_ctl(0, s_clinic,
               "send referral --to " H_CITY " --deadline +1s --patient-name 'Late Patient'"
               " --health-card 130102198001010001 --reason 'review'"));

    /* An overdue case: a down-transfer the clinic accepts, whose patient
     * does not arrive within the 1 s of [deadlines]. */
    json_t *j = h_ctl_json(s_county, "send down-transfer --to " H_XINZHAN
                                     " --priority URGENT --patient-name 'Sun Li'"
                                     " --health-card 130102195501012222 --sex female"
                                     " --phase ACUTE_RECOVERY --summary 'Pneumonia, treated'"
                                     " --rehab-plan 'Breathing exercises' --team 'Xinzhan team 1'"
                                     " --follow-up-days 7");
    char case_id[128];
    snprintf(case_id, sizeof case_id, "%s", s_str(j, "caseId"));
    json_decref(j);
    cr_assert(case_id[0], "send down-transfer printed no caseId");
    char *p = h_wait_json(&W, H_XINZHAN, "inbox", "Sun Li", 20000);
    cr_assert(p, "the down-transfer did not reach the clinic");
    free(p);
    char args[600];
    snprintf(args, sizeof args,
             "send update --kind down_transfer --to %s --case %s --status ACCEPTED", H_COUNTY,
             case_id);
    free(h_ctl(0, s_clinic, args));

    /* The broker's state first, so the page is loaded once it has it. */
    json_t *overdue = h_wait_overdue(s_ops, NULL, 1, 20000);
    cr_assert(overdue, "cases --overdue never listed the down-transfer");
    cr_assert_str_eq(s_str(json_array_get(json_object_get(overdue, "cases"), 0), "caseId"),
                     case_id);
    json_decref(overdue);
    json_t *dlq = h_wait_dead_letters(s_ops, 1, 20000);
    cr_assert(dlq, "dlq list never showed the expired referral");
    char dead_id[64];
    snprintf(dead_id, sizeof dead_id, "%s",
             s_str(json_array_get(json_object_get(dlq, "deadLetter"), 0), "messageId"));
    json_decref(dlq);
    cr_assert(dead_id[0]);

    /* The page, rendered: every registered node, the overdue case and the
     * dead letter, in the rows the JavaScript made from the API. */
    char url[256], needle[256];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/?lang=en", s_http_port);
    char *dom = s_chromium("--dump-dom", url);
    cr_assert(strstr(dom, "<html lang=\"en\""), "the page is not in English:\n%.2000s", dom);
    const char *nodes[] = {H_COUNTY, H_XINZHAN, H_FENGLE, H_OPS, H_CITY};
    for (size_t i = 0; i < sizeof nodes / sizeof nodes[0]; i++) {
        snprintf(needle, sizeof needle, "id=\"node-%s\"", nodes[i]);
        cr_assert(strstr(dom, needle), "node %s is not on the page:\n%s", nodes[i], dom);
    }
    snprintf(needle, sizeof needle, "id=\"case-%s\"", case_id);
    cr_assert(strstr(dom, needle), "the overdue case %s is not on the page:\n%s", case_id, dom);
    snprintf(needle, sizeof needle, "id=\"dead-%s\"", dead_id);
    cr_assert(strstr(dom, needle), "the dead letter %s is not on the page:\n%s", dead_id, dom);
    cr_assert(strstr(dom, "Overdue cases") && strstr(dom, "Dead letters"),
              "English labels missing:\n%s", dom);
    cr_assert(strstr(dom, "DOWN_TRANSFER_ACCEPTED"), "the case's state is not shown:\n%s", dom);
    cr_assert(strstr(dom, "class=\"plot\""), "no throughput chart:\n%s", dom);
    /* No patient data: the API carries none, and the page adds none. */
    cr_assert_null(strstr(dom, "Sun Li"));
    cr_assert_null(strstr(dom, "Late Patient"));
    cr_assert_null(strstr(dom, "130102"));
    free(dom);

    /* In Chinese, with ?lang=zh. */
    snprintf(url, sizeof url, "http://127.0.0.1:%d/?lang=zh", s_http_port);
    dom = s_chromium("--dump-dom", url);
    cr_assert(strstr(dom, "<html lang=\"zh\""), "?lang=zh did not give Chinese:\n%.2000s", dom);
    cr_assert(strstr(dom, "逾期病例") && strstr(dom, "死信") && strstr(dom, "节点"),
              "Chinese labels missing:\n%s", dom);
    snprintf(needle, sizeof needle, "id=\"case-%s\"", case_id);
    cr_assert(strstr(dom, needle), "the overdue case is not on the Chinese page");
    free(dom);

    /* Screenshots, as ops would see the page, in both languages. */
    s_screenshot("status.png", "en");
    s_screenshot("status-zh.png", "zh");

    h_agent_stop(&W, H_COUNTY);
    h_agent_stop(&W, H_XINZHAN);
    h_broker_stop(&W);
}

Test(web, language_assets_and_throughput_over_http)
{
    h_world_init(&W, "timer_ms = 100\n");
    h_broker_start(&W);
    s_http_port = W.http_port;
    cr_assert_gt(s_http_port, 0, "the broker's HTTP endpoint is off");
    h_ctl_config(&W, H_XINZHAN, s_clinic, sizeof s_clinic);
    h_agent_start(&W, H_COUNTY);
    h_agent_start(&W, H_XINZHAN);

    /* The language: ?lang= first, then Accept-Language, else English. */
    struct {
        const char *path, *accept, *want;
    } cases[] = {
        {"/", NULL, "en"},
        {"/", "zh-CN,zh;q=0.9,en;q=0.8", "zh"},
        {"/", "en-US,en;q=0.9,zh;q=0.5", "en"},
        {"/", "fr-FR, zh-TW;q=0.4", "zh"},
        {"/", "zh;q=0, en;q=0.1", "en"},
        {"/?lang=en", "zh-CN", "en"},
        {"/?lang=zh", "en-GB", "zh"},
        {"/index.html", "zh-Hans", "zh"},
    };
    char hv[256], want[64];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *r = s_http_get(cases[i].path, cases[i].accept);
        cr_assert(s_status(r) == 200, "%s: %.200s", cases[i].path, r);
        snprintf(want, sizeof want, "<html lang=\"%s\">", cases[i].want);
        cr_assert(strstr(r, want), "%s with Accept-Language %s: want %s, got:\n%.600s",
                  cases[i].path, cases[i].accept ? cases[i].accept : "(none)", cases[i].want, r);
        cr_assert_str_eq(s_header(r, "Content-Type", hv, sizeof hv), "text/html; charset=utf-8");
        cr_assert_str_eq(s_header(r, "Cache-Control", hv, sizeof hv), "no-cache");
        free(r);
    }

    /* The assets, as compiled in, with their types and a short cache. */
    const char *assets[][2] = {{"/app.js", "text/javascript; charset=utf-8"},
                               {"/app.css", "text/css; charset=utf-8"},
                               {"/favicon.svg", "image/svg+xml"}};
    for (size_t i = 0; i < 3; i++) {
        char *r = s_http_get(assets[i][0], NULL);
        cr_assert(s_status(r) == 200, "%s: %.200s", assets[i][0], r);
        cr_assert_str_eq(s_header(r, "Content-Type", hv, sizeof hv), assets[i][1]);
        cr_assert_str_eq(s_header(r, "Cache-Control", hv, sizeof hv), "public, max-age=300");
        free(r);
    }
    char *r = s_http_get("/app.js", NULL);
    cr_assert(strstr(r, "逾期病例"), "app.js lost its UTF-8 dictionary");
    free(r);
    r = s_http_get("/nothing-here.js", NULL);
    cr_assert(s_status(r) == 404, "%.200s", r);
    free(r);

    /* Throughput: the hour's buckets add up to the broker's counters
     * (it started within the hour), once three referrals and what they
     * set off have been accepted and delivered and the counters stand
     * still; the minutes now running hold them. */
    for (int i = 0; i < 3; i++) {
        char args[400];
        snprintf(args, sizeof args,
                 "send referral --to %s --patient-name 'Patient %d'"
                 " --health-card 13010219800101%04d --reason 'review'",
                 H_COUNTY, i, i);
        free(h_ctl(0, s_clinic, args));
    }
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 3, 20000), 3);
    json_int_t acc = -1, del = -1, st_acc = -2, st_del = -2;
    json_t *tp = NULL;
    for (int waited = 0; waited < 15000 && (acc != st_acc || del != st_del || acc < 3);
         waited += 250) {
        json_t *before = s_json_get("/api/v1/status");
        json_decref(tp);
        tp = s_json_get("/api/v1/throughput");
        json_t *after = s_json_get("/api/v1/status");
        acc = s_sum(tp, "accepted");
        del = s_sum(tp, "delivered");
        st_acc = s_int(before, "acceptedTotal");
        st_del = s_int(before, "deliveredTotal");
        if (st_acc != s_int(after, "acceptedTotal") || st_del != s_int(after, "deliveredTotal"))
            st_acc = -2; /* moved meanwhile: again */
        json_decref(before);
        json_decref(after);
        if (acc != st_acc || del != st_del || acc < 3)
            h_sleep_ms(250);
    }
    cr_assert_eq(acc, st_acc, "accepted over the hour %lld, acceptedTotal %lld", (long long)acc,
                 (long long)st_acc);
    cr_assert_eq(del, st_del, "delivered over the hour %lld, deliveredTotal %lld", (long long)del,
                 (long long)st_del);
    cr_assert_geq(acc, 3);
    cr_assert_geq(del, 3);
    cr_assert_eq(json_integer_value(json_object_get(tp, "bucketSeconds")), 60);
    cr_assert(json_is_string(json_object_get(tp, "now")));
    const char *series[] = {"accepted", "delivered", "refused", "dead"};
    for (size_t i = 0; i < 4; i++)
        cr_assert_eq(json_array_size(json_object_get(tp, series[i])), 60, "%s", series[i]);
    json_t *a = json_object_get(tp, "accepted");
    cr_assert_geq(json_integer_value(json_array_get(a, 59)) +
                      json_integer_value(json_array_get(a, 58)),
                  3, "the three referrals are not in the last minutes");
    json_decref(tp);

    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}
