/* /api/v1: the JSON medlinkd serves over HTTP is the JSON medlinkctl
 * --json prints (one code path, lib/ml_adminjson), for status, nodes,
 * cases and the dead-letter queue; query parameters filter like
 * medlinkctl's options; bad parameters are a 400 naming them; nothing
 * served carries patient data. Real medlinkd, agents and medlinkctl. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>
#include <jansson.h>

#include "harness.h"

static h_world_t W;
static char s_ops[4096], s_clinic[4096];

static void s_teardown(void)
{
    h_world_fini(&W);
}

TestSuite(api, .fini = s_teardown, .timeout = 300);

static json_t *s_parse(const char *what, const char *text)
{
    json_error_t jerr;
    json_t *j = json_loads(text, 0, &jerr);
    cr_assert(j, "%s is not JSON (%s): %s", what, jerr.text, text);
    return j;
}

/* GET path; asserts the status; returns the body (the caller's). */
static char *s_get(const char *path, int want)
{
    int st = 0;
    char *body = NULL;
    size_t len = 0;
    cr_assert_eq(h_http_get(&W, path, &st, &body, &len), 0, "GET %s failed", path);
    cr_assert_eq(st, want, "GET %s: %d, want %d: %s", path, st, want, body ? body : "");
    return body;
}

static json_t *s_api(const char *path)
{
    char *body = s_get(path, 200);
    json_t *j = s_parse(path, body);
    free(body);
    return j;
}

/* The fields of a node entry that do not move between two reads. */
static void s_same_node(json_t *a, json_t *b)
{
    static const char *keys[] = {
        "nodeId",         "role",      "community",       "displayName",    "online",  "queueDepth",
        "oldestQueuedAt", "delivered", "openCasesOpened", "openCasesLimit", "inFlight"};
    const char *id = json_string_value(json_object_get(a, "nodeId"));
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        /* The ops node is online only while medlinkctl asks. */
        if (strcmp(id, H_OPS) == 0 && strcmp(keys[i], "online") == 0)
            continue;
        cr_assert(json_equal(json_object_get(a, keys[i]), json_object_get(b, keys[i])),
                  "node %s: %s differs between medlinkctl and /api/v1", id, keys[i]);
    }
    /* Every field medlinkctl prints is served, and no other. */
    cr_assert_eq(json_object_size(a), json_object_size(b));
}

Test(api, same_json_as_medlinkctl_and_filters)
{
    h_world_init(&W, "timer_ms = 100\n");
    h_broker_start(&W);
    cr_assert_gt(W.http_port, 0, "the broker has no HTTP endpoint");
    h_ctl_config(&W, H_OPS, s_ops, sizeof s_ops);
    h_ctl_config(&W, H_XINZHAN, s_clinic, sizeof s_clinic);
    cr_assert_eq(h_agent_start(&W, H_COUNTY), 0);

    /* One referral delivered to the county hospital, and one for the
     * offline city hospital that expires into the dead-letter queue. */
    free(h_ctl(0, s_clinic,
               "send referral --to " H_COUNTY " --patient-name 'Wang Fang' --health-card "
               "130102196505051234 --reason 'chest pain'"));
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 1, 20000), 1);
    free(h_ctl(0, s_clinic,
               "send referral --to " H_CITY " --deadline +1s --patient-name 'Li Lei' "
               "--health-card 130102197001011111 --reason 'review'"));
    json_t *dlq = h_wait_dead_letters(s_ops, 1, 20000);
    cr_assert(dlq, "the expired referral never became a dead letter");
    cr_assert_eq(json_array_size(json_object_get(dlq, "deadLetter")), 1);

    /* Dead letters and cases: the same documents. */
    json_t *adlq = s_api("/api/v1/dlq");
    cr_assert(json_equal(dlq, adlq), "/api/v1/dlq differs from medlinkctl --json dlq list");
    json_t *cases = h_ctl_json(s_ops, "cases");
    json_t *acases = s_api("/api/v1/cases");
    cr_assert(json_equal(cases, acases), "/api/v1/cases differs from medlinkctl --json cases");
    cr_assert_eq(json_array_size(json_object_get(acases, "cases")), 2);
    json_decref(cases);
    json_decref(acases);

    /* Filters: a state, a kind, a limit, like medlinkctl's options. */
    cases = h_ctl_json(s_ops, "cases --state DELIVERED");
    acases = s_api("/api/v1/cases?state=DELIVERED");
    cr_assert(json_equal(cases, acases));
    cr_assert_eq(json_array_size(json_object_get(acases, "cases")), 1);
    json_decref(cases);
    json_decref(acases);
    acases = s_api("/api/v1/cases?kind=referral&limit=1");
    cr_assert_eq(json_array_size(json_object_get(acases, "cases")), 1);
    json_decref(acases);
    acases = s_api("/api/v1/cases?kind=imaging");
    cr_assert_eq(json_array_size(json_object_get(acases, "cases")), 0);
    json_decref(acases);

    /* One case with its timeline, as medlinkctl case show --json. */
    const char *cid = json_string_value(
        json_object_get(json_array_get(json_object_get(dlq, "deadLetter"), 0), "caseId"));
    cr_assert(cid && *cid);
    char args[256], path[256];
    snprintf(args, sizeof args, "case show %s", cid);
    snprintf(path, sizeof path, "/api/v1/cases/%s", cid);
    json_t *one = h_ctl_json(s_ops, args);
    json_t *aone = s_api(path);
    cr_assert(json_equal(one, aone), "%s differs from medlinkctl --json %s", path, args);
    cr_assert_gt(json_array_size(json_object_get(aone, "timeline")), 0);
    json_decref(one);
    json_decref(aone);

    /* Status and nodes: the same fields; the node entries agree. */
    json_t *st = h_ctl_json(s_ops, "status");
    json_t *ast = s_api("/api/v1/status");
    json_t *anodes = s_api("/api/v1/nodes");
    cr_assert_eq(json_object_size(st), json_object_size(ast));
    for (void *it = json_object_iter(st); it; it = json_object_iter_next(st, it)) {
        const char *k = json_object_iter_key(it);
        cr_assert(json_object_get(ast, k), "/api/v1/status lacks %s", k);
    }
    cr_assert(json_equal(json_object_get(st, "deadLetters"), json_object_get(ast, "deadLetters")));
    cr_assert(json_equal(json_object_get(st, "openCases"), json_object_get(ast, "openCases")));
    json_t *n1 = json_object_get(st, "node"), *n2 = json_object_get(anodes, "node");
    cr_assert_eq(json_array_size(n1), json_array_size(n2));
    cr_assert_gt(json_array_size(n2), 3);
    for (size_t i = 0; i < json_array_size(n1); i++)
        s_same_node(json_array_get(n1, i), json_array_get(n2, i));
    json_decref(st);
    json_decref(ast);
    json_decref(anodes);

    /* Nothing served names the patients or their health cards. */
    const char *paths[] = {"/api/v1/status", "/api/v1/nodes", "/api/v1/cases", "/api/v1/dlq", path};
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        char *body = s_get(paths[i], 200);
        cr_assert_null(strstr(body, "Wang Fang"), "%s names a patient", paths[i]);
        cr_assert_null(strstr(body, "Li Lei"), "%s names a patient", paths[i]);
        cr_assert_null(strstr(body, "130102"), "%s shows a health card number", paths[i]);
        free(body);
    }
    json_decref(dlq);
    json_decref(adlq);
}

Test(api, bad_requests_are_named)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    char *b = s_get("/api/v1/cases?state=NOSUCHSTATE", 400);
    cr_assert(strstr(b, "NOSUCHSTATE"), "%s", b);
    json_t *j = s_parse("the error", b);
    cr_assert(json_string_value(json_object_get(j, "error")));
    json_decref(j);
    free(b);
    b = s_get("/api/v1/cases?kind=xray", 400);
    cr_assert(strstr(b, "xray"), "%s", b);
    free(b);
    b = s_get("/api/v1/cases?limit=0", 400);
    cr_assert(strstr(b, "limit"), "%s", b);
    free(b);
    b = s_get("/api/v1/cases?state=%ZZ", 400);
    cr_assert(strstr(b, "state"), "%s", b);
    free(b);
    b = s_get("/api/v1/cases/01NOSUCHCASE0000000000000000", 404);
    cr_assert(strstr(b, "no case"), "%s", b);
    free(b);
    b = s_get("/api/v1/cases/bad%0Aid", 400);
    free(b);
    free(s_get("/api/v1/nosuch", 404));
    /* An empty queue and no cases are still documents. */
    json_t *e = s_api("/api/v1/dlq");
    cr_assert_eq(json_array_size(json_object_get(e, "deadLetter")), 0);
    json_decref(e);
    e = s_api("/api/v1/cases?overdue=1");
    cr_assert_eq(json_array_size(json_object_get(e, "cases")), 0);
    json_decref(e);
}
