/* End-to-end flows through the real daemons: a referral from a clinic's
 * outbox to the hospital's inbox and the acceptance back; offline storage;
 * a broker crash mid-stream; refused peers; a forbidden route. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>
#include <jansson.h>
#include <sqlite3.h>
#include <zmq.h>

#include "harness.h"

static h_world_t W;

static void s_teardown(void)
{
    h_world_fini(&W);
}

/* Reads every inbox JSON file of node; returns the number of files and
 * checks that each patient name appears once (exactly-once delivery). */
static int s_inbox_unique_patients(const char *node, int expect)
{
    char dir[700];
    h_spool(&W, node, "inbox", dir, sizeof dir);
    DIR *d = opendir(dir);
    cr_assert(d);
    char **names = calloc((size_t)expect + 16, sizeof *names);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || !strstr(e->d_name, ".json"))
            continue;
        char path[1200];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        json_error_t jerr;
        json_t *j = json_load_file(path, 0, &jerr);
        cr_assert(j, "inbox file %s is not JSON: %s", path, jerr.text);
        const char *name = json_string_value(
            json_object_get(json_object_get(json_object_get(j, "referral"), "patient"), "name"));
        cr_assert(name, "inbox file %s has no referral.patient.name", path);
        for (int i = 0; i < n; i++)
            cr_assert_str_neq(names[i], name, "patient %s delivered twice", name);
        if (n < expect + 16)
            names[n] = strdup(name);
        n++;
        json_decref(j);
    }
    closedir(d);
    for (int i = 0; i < n && i < expect + 16; i++)
        free(names[i]);
    free(names);
    return n;
}

static char *s_first_file(const char *node, const char *sub)
{
    char dir[700];
    h_spool(&W, node, sub, dir, sizeof dir);
    DIR *d = opendir(dir);
    if (!d)
        return NULL;
    struct dirent *e;
    char *out = NULL;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || !strstr(e->d_name, ".json") || strstr(e->d_name, ".error"))
            continue;
        char path[1200];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        out = strdup(path);
        break;
    }
    closedir(d);
    return out;
}

TestSuite(flow, .fini = s_teardown, .timeout = 600);

Test(flow, referral_reaches_hospital_and_acceptance_comes_back)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_COUNTY);
    h_agent_start(&W, H_XINZHAN);

    char *ref = h_referral_json(H_COUNTY, "Zhang San", NULL);
    h_drop(&W, H_XINZHAN, "referral-001.json", ref);
    free(ref);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 1, 20000), 1, "referral not in inbox");
    cr_assert_eq(h_wait_count(&W, H_XINZHAN, "sent", 1, 10000), 1, "file not moved to sent/");

    /* The hospital's system reads the referral and answers ACCEPTED. */
    char *path = s_first_file(H_COUNTY, "inbox");
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    cr_assert(j);
    const char *case_id = json_string_value(json_object_get(j, "caseId"));
    const char *from = json_string_value(json_object_get(j, "from"));
    cr_assert(case_id && *case_id, "inbox JSON lacks caseId");
    cr_assert_str_eq(from, H_XINZHAN);
    cr_assert_str_eq(json_string_value(json_object_get(
                         json_object_get(json_object_get(j, "referral"), "patient"), "name")),
                     "Zhang San");
    char upd[2048];
    snprintf(upd, sizeof upd,
             "{\"to\": \"%s\", \"caseId\": \"%s\", \"referralUpdate\": {\"status\": "
             "\"REFERRAL_ACCEPTED\", \"notes\": \"Cardiology will see the patient today\"}}",
             H_XINZHAN, case_id);
    h_drop(&W, H_COUNTY, "accept-001.json", upd);
    /* The clinic hears first that the hospital's agent has the referral
     * (the broker's DELIVERED notice), then the acceptance. */
    char *delivered = h_wait_json(&W, H_XINZHAN, "inbox", "REFERRAL_DELIVERED", 20000);
    cr_assert(delivered, "no DELIVERED notice at the clinic");
    free(delivered);
    char *back = h_wait_json(&W, H_XINZHAN, "inbox", "REFERRAL_ACCEPTED", 20000);
    cr_assert(back, "acceptance did not return");
    json_t *k = json_load_file(back, 0, &jerr);
    cr_assert(k);
    cr_assert_str_eq(json_string_value(json_object_get(k, "caseId")), case_id);
    cr_assert_str_eq(
        json_string_value(json_object_get(json_object_get(k, "referralUpdate"), "status")),
        "REFERRAL_ACCEPTED");
    json_decref(j);
    json_decref(k);
    free(path);
    free(back);

    /* Ops view: both agents online, nothing queued. */
    char cfg[800], bin[600];
    h_ctl_config(&W, H_OPS, cfg, sizeof cfg);
    int st;
    char *out =
        h_run(&st, "'%s' --config '%s' status --json", h_bin("medlinkctl", bin, sizeof bin), cfg);
    cr_assert_eq(st, 0, "medlinkctl status failed: %s", out);
    json_t *s = json_loads(out, 0, &jerr);
    cr_assert(s, "status --json is not JSON: %s", out);
    json_t *nodes = json_object_get(s, "node");
    size_t i;
    json_t *n;
    int online = 0;
    json_array_foreach(nodes, i, n)
    {
        if (json_is_true(json_object_get(n, "online")))
            online++;
    }
    cr_assert_geq(online, 2, "expected both agents online: %s", out);
    json_decref(s);
    free(out);

    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

Test(flow, thousand_referrals_to_offline_hospital_arrive_once)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_COUNTY);
    h_agent_stop(&W, H_COUNTY);
    h_agent_start(&W, H_XINZHAN);
    for (int i = 0; i < 1000; i++) {
        char name[64], file[64];
        snprintf(name, sizeof name, "Patient %04d", i);
        snprintf(file, sizeof file, "ref-%04d.json", i);
        char *ref = h_referral_json(H_COUNTY, name, NULL);
        h_drop(&W, H_XINZHAN, file, ref);
        free(ref);
    }
    cr_assert_eq(h_wait_count(&W, H_XINZHAN, "sent", 1000, 120000), 1000,
                 "broker did not accept all 1000");
    cr_assert_eq(h_count(&W, H_COUNTY, "inbox"), 0);
    h_agent_start(&W, H_COUNTY);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 1000, 120000), 1000);
    /* No duplicate can still come: the broker delivered 1000 and holds none. */
    h_node_counts_t q = h_wait_quiet(&W, H_COUNTY, 1000, 60000);
    cr_assert(q.queued == 0 && q.in_flight == 0 && q.delivered == 1000,
              "broker: %lld queued, %lld in flight, %lld delivered to %s", q.queued, q.in_flight,
              q.delivered, H_COUNTY);
    cr_assert_eq(s_inbox_unique_patients(H_COUNTY, 1000), 1000);
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

/* Reads the ids the clinic's agent recorded as Accepted by the broker. */
static int s_accepted_ids(const char *node, char ***ids)
{
    char path[800];
    snprintf(path, sizeof path, "%s/data/%s/agent.db", W.dir, node);
    sqlite3 *db;
    cr_assert_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    sqlite3_stmt *st;
    cr_assert_eq(sqlite3_prepare_v2(db, "SELECT id FROM outbox WHERE state = 1", -1, &st, NULL),
                 SQLITE_OK, "%s", sqlite3_errmsg(db));
    int n = 0, cap = 1024;
    *ids = malloc((size_t)cap * sizeof **ids);
    while (sqlite3_step(st) == SQLITE_ROW) {
        if (n == cap)
            *ids = realloc(*ids, (size_t)(cap *= 2) * sizeof **ids);
        (*ids)[n++] = strdup((const char *)sqlite3_column_text(st, 0));
    }
    sqlite3_finalize(st);
    sqlite3_close(db);
    return n;
}

Test(flow, broker_sigkill_mid_stream_loses_nothing_accepted)
{
    /* 10,000 cases from one clinic that nobody closes: over the default
     * open_cases_per_node (5,000), which this test is not about. */
    h_world_init(&W, "open_cases_per_node = 100000\n");
    h_broker_start(&W);
    h_agent_start(&W, H_COUNTY);
    h_agent_start(&W, H_XINZHAN);
    const int total = 10000;
    for (int i = 0; i < total; i++) {
        char name[64], file[64];
        snprintf(name, sizeof name, "Stream %05d", i);
        snprintf(file, sizeof file, "s-%05d.json", i);
        char *ref = h_referral_json(H_COUNTY, name, NULL);
        h_drop(&W, H_XINZHAN, file, ref);
        free(ref);
        if (i == total / 4) {
            /* Let the stream get going, then crash the broker. */
            h_wait_count(&W, H_XINZHAN, "sent", 500, 60000);
            h_broker_kill(&W);
            cr_log_info("broker killed with %d accepted", h_count(&W, H_XINZHAN, "sent"));
            h_sleep_ms(300);
            h_broker_start(&W);
        }
    }
    cr_assert_eq(h_wait_count(&W, H_XINZHAN, "sent", total, 300000), total,
                 "not every message was accepted after the restart");
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", total, 300000), total);
    /* No duplicate can still come: the broker holds nothing for the
     * hospital (its delivered count began again at the restart, so only
     * the queue and the window are asked). */
    h_node_counts_t q = h_wait_quiet(&W, H_COUNTY, 0, 60000);
    cr_assert(q.queued == 0 && q.in_flight == 0,
              "broker: %lld queued, %lld in flight, %lld delivered to %s", q.queued, q.in_flight,
              q.delivered, H_COUNTY);
    cr_assert_eq(s_inbox_unique_patients(H_COUNTY, total), total);
    char **ids;
    int n = s_accepted_ids(H_XINZHAN, &ids);
    cr_assert_eq(n, total);
    for (int i = 0; i < n; i++) {
        char p[1200];
        snprintf(p, sizeof p, "%s/spool/%s/inbox/%s.json", W.dir, H_COUNTY, ids[i]);
        FILE *f = fopen(p, "r");
        cr_assert(f, "accepted message %s missing from the hospital inbox", ids[i]);
        fclose(f);
        free(ids[i]);
    }
    free(ids);
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

Test(flow, bad_peers_refused_while_clinic_keeps_working)
{
    h_world_init(&W, NULL);
    /* A second CA with a certificate naming a registered clinic, and a
     * certificate from the right CA naming a node nobody registered. */
    int rc = system(NULL) ? 0 : 1;
    cr_assert_eq(rc, 0);
    char cmd[4096];
    snprintf(cmd, sizeof cmd,
             "'%s/deploy/pki.sh' --dir '%s/evil' --ca-name 'Evil CA' %s >/dev/null 2>&1 && "
             "'%s/deploy/pki.sh' --dir '%s' rogue.unknown.clinic >/dev/null 2>&1",
             getenv("ML_SOURCE_DIR"), W.dir, H_XINZHAN, getenv("ML_SOURCE_DIR"), W.pki);
    cr_assert_eq(system(cmd), 0, "pki for bad peers");
    h_broker_start(&W);
    h_agent_start(&W, H_COUNTY);
    h_agent_start(&W, H_XINZHAN);

    char *ref = h_referral_json(H_COUNTY, "Before Attack", NULL);
    h_drop(&W, H_XINZHAN, "a.json", ref);
    free(ref);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 1, 20000), 1);

    /* 1: other CA. 2: unregistered node. Both via medlinkctl. */
    char bin[600];
    h_bin("medlinkctl", bin, sizeof bin);
    int st;
    char *out = h_run(&st,
                      "'%s' --broker %s --node %s --ca '%s/ca.crt' --cert '%s/evil/%s.crt' "
                      "--key '%s/evil/%s.key' --timeout 4 status 2>&1",
                      bin, W.endpoint, H_XINZHAN, W.pki, W.dir, H_XINZHAN, W.dir, H_XINZHAN);
    cr_assert_neq(st, 0, "a certificate from another CA was accepted: %s", out);
    free(out);
    out = h_run(&st,
                "'%s' --broker %s --node rogue.unknown.clinic --ca '%s/ca.crt' "
                "--cert '%s/rogue.unknown.clinic.crt' --key '%s/rogue.unknown.clinic.key' "
                "--timeout 4 status 2>&1",
                bin, W.endpoint, W.pki, W.pki, W.pki);
    cr_assert_neq(st, 0, "an unregistered node was accepted: %s", out);
    cr_assert(strstr(out, "unregistered"), "ctl should say why: %s", out);
    free(out);

    /* 3: a peer that sends random bytes. */
    void *ctx = zmq_ctx_new();
    void *s = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    zmq_connect(s, W.endpoint);
    unsigned char junk[4096];
    srand(42);
    for (int i = 0; i < 50; i++) {
        for (size_t k = 0; k < sizeof junk; k++)
            junk[k] = (unsigned char)rand();
        zmq_send(s, junk, sizeof junk, 0);
    }
    h_sleep_ms(500);
    zmq_close(s);
    zmq_ctx_term(ctx);

    ref = h_referral_json(H_COUNTY, "After Attack", NULL);
    h_drop(&W, H_XINZHAN, "b.json", ref);
    free(ref);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 2, 20000), 2,
                 "the legitimate clinic stopped working");
    cr_assert_geq(h_log_contains(&W, "broker.log", "TLS handshake failed"), 2,
                  "broker.log should say why the other-CA and garbage peers were refused");
    cr_assert_geq(h_log_contains(&W, "broker.log", "unregistered node 'rogue.unknown.clinic'"), 1);
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

Test(flow, forbidden_route_is_nacked_into_rejected)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_XINZHAN);
    h_agent_start(&W, H_FENGLE);
    char *ref = h_referral_json(H_FENGLE, "Wrong Way", NULL);
    h_drop(&W, H_XINZHAN, "sideways.json", ref);
    free(ref);
    cr_assert_eq(h_wait_count(&W, H_XINZHAN, "rejected", 1, 20000), 1, "not rejected");
    char p[900];
    snprintf(p, sizeof p, "%s/spool/%s/rejected/sideways.json.error", W.dir, H_XINZHAN);
    char *why = h_slurp(p);
    cr_assert(why, "no .error file next to the rejected referral");
    cr_assert(strstr(why, "FORBIDDEN") || strstr(why, "forbidden"), "reason: %s", why);
    cr_assert(strstr(why, "TOWNSHIP_CLINIC"), "reason should name the roles: %s", why);
    free(why);
    /* Refused, so never queued: the broker holds nothing for fengle. */
    h_node_counts_t q = h_wait_quiet(&W, H_FENGLE, 0, 10000);
    cr_assert(q.queued == 0 && q.in_flight == 0 && q.delivered == 0,
              "broker: %lld queued, %lld in flight, %lld delivered to %s", q.queued, q.in_flight,
              q.delivered, H_FENGLE);
    cr_assert_eq(h_count(&W, H_FENGLE, "inbox"), 0, "forbidden message was delivered");
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_FENGLE);
    h_broker_stop(&W);
}

Test(flow, agent_queues_while_broker_is_down_and_sends_when_it_is_back)
{
    h_world_init(&W, NULL);
    /* The agents need the broker's endpoint before it runs: one start and
     * stop learns the port the system gives it, which later starts keep. */
    h_broker_pin_port(&W);
    /* No broker now: the agents start anyway and the clinic keeps taking
     * files from its hospital system. */
    h_agent_start(&W, H_COUNTY);
    h_agent_start(&W, H_XINZHAN);
    for (int i = 0; i < 50; i++) {
        char name[64], file[64];
        snprintf(name, sizeof name, "Offline %02d", i);
        snprintf(file, sizeof file, "off-%02d.json", i);
        char *ref = h_referral_json(H_COUNTY, name, NULL);
        h_drop(&W, H_XINZHAN, file, ref);
        free(ref);
    }
    cr_assert_eq(h_wait_count(&W, H_XINZHAN, "pending", 50, 20000), 50,
                 "files were not taken into the agent's store while offline");
    cr_assert_eq(h_count(&W, H_XINZHAN, "outbox"), 0);
    cr_assert_eq(h_count(&W, H_XINZHAN, "sent"), 0);
    h_broker_start(&W);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 50, 60000), 50);
    cr_assert_eq(h_wait_count(&W, H_XINZHAN, "sent", 50, 20000), 50);
    cr_assert_eq(s_inbox_unique_patients(H_COUNTY, 50), 50);
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

Test(flow, medlinkctl_send_and_send_update)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_COUNTY);
    h_agent_start(&W, H_XINZHAN);
    char clinic[800], county[800], bin[600];
    h_ctl_config(&W, H_XINZHAN, clinic, sizeof clinic);
    h_ctl_config(&W, H_COUNTY, county, sizeof county);
    h_bin("medlinkctl", bin, sizeof bin);
    int st;
    /* A referral from flags, as a clinician's script would send it. */
    char *out =
        h_run(&st,
              "'%s' --config '%s' --json send --to %s --priority URGENT "
              "--patient-name 'Li Xiuying' --health-card 130102194505056622 --sex female "
              "--reason 'Fall with hip pain' --icd10 'S72.0:Fracture of neck of femur' 2>&1",
              bin, clinic, H_COUNTY);
    cr_assert_eq(st, 0, "medlinkctl send failed: %s", out);
    json_error_t jerr;
    json_t *j = json_loads(out, 0, &jerr);
    cr_assert(j, "send --json is not JSON: %s", out);
    const char *case_id = json_string_value(json_object_get(j, "caseId"));
    cr_assert(case_id && *case_id, "no caseId in %s", out);
    char case_copy[64];
    snprintf(case_copy, sizeof case_copy, "%s", case_id);
    json_decref(j);
    free(out);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 1, 20000), 1);

    /* Scheduling before accepting is not a legal step: refused, with the
     * current and the attempted state named. */
    out = h_run(&st,
                "'%s' --config '%s' send-update --to %s --case %s --status SCHEDULED "
                "--department Orthopaedics --scheduled-at 2026-11-23T09:30:00+08:00 2>&1",
                bin, county, H_XINZHAN, case_copy);
    cr_assert_eq(st, 1, "SCHEDULED before ACCEPTED should be refused: %s", out);
    cr_assert(strstr(out, "NACK_ILLEGAL_TRANSITION") && strstr(out, "REFERRAL_SCHEDULED"),
              "the refusal should name the states: %s", out);
    free(out);
    /* The hospital accepts, then schedules; the clinic receives both. */
    out = h_run(&st, "'%s' --config '%s' send-update --to %s --case %s --status ACCEPTED 2>&1", bin,
                county, H_XINZHAN, case_copy);
    cr_assert_eq(st, 0, "send-update ACCEPTED failed: %s", out);
    free(out);
    out = h_run(&st,
                "'%s' --config '%s' send-update --to %s --case %s --status SCHEDULED "
                "--department Orthopaedics --scheduled-at 2026-11-23T09:30:00+08:00 2>&1",
                bin, county, H_XINZHAN, case_copy);
    cr_assert_eq(st, 0, "send-update failed: %s", out);
    free(out);
    char *sched = h_wait_json(&W, H_XINZHAN, "inbox", "REFERRAL_SCHEDULED", 20000);
    cr_assert(sched, "the SCHEDULED update did not reach the clinic");
    free(sched);

    /* A referral from a file that the ACL forbids: exit 1 with the reason. */
    char path[900];
    snprintf(path, sizeof path, "%s/sideways.json", W.dir);
    char *ref = h_referral_json(H_FENGLE, "Sideways Patient", NULL);
    FILE *f = fopen(path, "w");
    fputs(ref, f);
    fclose(f);
    free(ref);
    out =
        h_run(&st, "'%s' --config '%s' send --to %s --file '%s' 2>&1", bin, clinic, H_FENGLE, path);
    cr_assert_eq(st, 1, "a forbidden route should exit 1: %s", out);
    cr_assert(strstr(out, "NACK_FORBIDDEN"), "medlinkctl should say why: %s", out);
    free(out);

    /* Usage errors exit 2. */
    out = h_run(&st, "'%s' --config '%s' send --to %s 2>&1", bin, clinic, H_COUNTY);
    cr_assert_eq(st, 2, "missing referral content should be a usage error: %s", out);
    free(out);
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}
