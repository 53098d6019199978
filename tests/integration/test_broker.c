/* Broker behaviour seen by a real libmedlink client (ml_channel, mutual
 * TLS) against the real medlinkd: refusals with reasons (identity,
 * unknown recipient, invalid content, admin without OPS, oversize record),
 * duplicate ids, and delivery order by priority to a real agent. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>
#include <jansson.h>
#include <sqlite3.h>
#include <uv.h>
#include <zmq.h>

#include "harness.h"
#include "ml_channel.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_tls.h"

static h_world_t W;

typedef struct {
    uv_loop_t loop;
    void *zctx;
    ml_tls_ctx_t *tls;
    ml_channel_t *ch;
    char node[64];
    int up;
    int downs;
    ml_envelope_t *replies[64];
    int n;
    uv_timer_t timer;
    int timed_out;
} cli_t;

static void s_on_env(ml_channel_t *ch, ml_envelope_t *env, void *arg)
{
    cli_t *c = arg;
    if (c->n >= 64)
        return;
    /* env is borrowed: keep a copy. */
    uint8_t *buf;
    size_t len;
    cr_assert_eq(ml_env_pack(env, &buf, &len), 0);
    cr_assert_eq(ml_env_unpack(buf, len, &c->replies[c->n]), 0);
    free(buf);
    c->n++;
    uv_stop(&c->loop);
}

static void s_on_state(ml_channel_t *ch, int up, const char *reason, void *arg)
{
    cli_t *c = arg;
    c->up = up;
    if (!up)
        c->downs++;
    uv_stop(&c->loop);
}

static void s_timeout(uv_timer_t *t)
{
    cli_t *c = t->data;
    c->timed_out = 1;
    uv_stop(&c->loop);
}

/* Runs the loop until pred holds or ms pass. */
static int s_run_until(cli_t *c, int (*pred)(cli_t *, void *), void *arg, int ms)
{
    c->timed_out = 0;
    uv_timer_start(&c->timer, s_timeout, (uint64_t)ms, 0);
    while (!pred(c, arg) && !c->timed_out)
        uv_run(&c->loop, UV_RUN_DEFAULT);
    uv_timer_stop(&c->timer);
    return pred(c, arg);
}

static int s_is_up(cli_t *c, void *arg)
{
    return c->up;
}

static int s_went_down(cli_t *c, void *arg)
{
    return c->downs > 0;
}

static int s_has_n(cli_t *c, void *arg)
{
    return c->n >= *(int *)arg;
}

static void s_cli_start(cli_t *c, const char *node, size_t max_record, const char *broker_id)
{
    memset(c, 0, sizeof *c);
    snprintf(c->node, sizeof c->node, "%s", node);
    uv_loop_init(&c->loop);
    uv_timer_init(&c->loop, &c->timer);
    c->timer.data = c;
    c->zctx = zmq_ctx_new();
    char ca[700], crt[700], key[700], err[512];
    snprintf(ca, sizeof ca, "%s/ca.crt", W.pki);
    snprintf(crt, sizeof crt, "%s/%s.crt", W.pki, node);
    snprintf(key, sizeof key, "%s/%s.key", W.pki, node);
    ml_tls_config_t tc = {.ca_file = ca, .cert_file = crt, .key_file = key};
    cr_assert_eq(ml_tls_ctx_new(&tc, &c->tls, err, sizeof err), 0, "%s", err);
    ml_channel_config_t cc = {.endpoint = W.endpoint,
                              .tls = c->tls,
                              .node_id = node,
                              .broker_id = broker_id,
                              .software = "it_test_broker",
                              .heartbeat_ms = 1000,
                              .max_record = max_record,
                              .on_envelope = s_on_env,
                              .on_state = s_on_state,
                              .arg = c};
    cr_assert_eq(ml_channel_new(&c->loop, c->zctx, &cc, &c->ch), 0);
}

static void s_cli_open(cli_t *c, const char *node, size_t max_record)
{
    s_cli_start(c, node, max_record, H_BROKER);
    cr_assert(s_run_until(c, s_is_up, NULL, 10000), "client %s did not come up", node);
}

static void s_walk_close(uv_handle_t *h, void *arg)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void s_cli_close(cli_t *c)
{
    ml_channel_destroy(&c->ch);
    uv_walk(&c->loop, s_walk_close, NULL);
    /* s_on_state calls uv_stop as the channel goes down, so run until the
     * close callbacks have all been called. */
    while (uv_run(&c->loop, UV_RUN_DEFAULT) != 0)
        ;
    int rc = uv_loop_close(&c->loop);
    cr_assert_eq(rc, 0, "client loop still has handles: %s", uv_strerror(rc));
    ml_tls_ctx_destroy(&c->tls);
    zmq_ctx_term(c->zctx);
    for (int i = 0; i < c->n; i++)
        ml_env_free(&c->replies[i]);
}

/* Sends env and waits for one more reply (Accepted or Nack). */
static ml_envelope_t *s_send_wait(cli_t *c, ml_envelope_t *env)
{
    int want = c->n + 1;
    cr_assert_eq(ml_channel_send(c->ch, env), 0);
    cr_assert(s_run_until(c, s_has_n, &want, 10000), "no answer from the broker");
    return c->replies[want - 1];
}

typedef struct {
    char id[ML_ULID_LEN + 1];
    Medlink__V1__Patient patient;
    Medlink__V1__Diagnosis diag;
    Medlink__V1__Diagnosis *diagp;
    Medlink__V1__Referral ref;
    ml_envelope_t env;
} referral_t;

static void s_referral(referral_t *r, const char *from, const char *to, const char *name,
                       int priority)
{
    memset(r, 0, sizeof *r);
    ml_ulid_new(r->id);
    medlink__v1__patient__init(&r->patient);
    r->patient.health_card_id = "130102198001011234";
    r->patient.name = (char *)name;
    medlink__v1__diagnosis__init(&r->diag);
    r->diag.icd10 = "I20.0";
    r->diagp = &r->diag;
    medlink__v1__referral__init(&r->ref);
    r->ref.patient = &r->patient;
    r->ref.reason = "chest pain";
    r->ref.n_diagnosis = 1;
    r->ref.diagnosis = &r->diagp;
    medlink__v1__envelope__init(&r->env);
    r->env.id = r->id;
    r->env.case_id = r->id;
    r->env.kind = MEDLINK__V1__KIND__KIND_REFERRAL;
    r->env.from = (char *)from;
    r->env.to = (char *)to;
    r->env.priority = priority;
    r->env.created_at = ml_now_ms();
    r->env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL;
    r->env.referral = &r->ref;
}

static void s_expect_nack(ml_envelope_t *reply, int code, const char *needle)
{
    cr_assert_eq(reply->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_NACK,
                 "expected a Nack, got payload %d", reply->payload_case);
    cr_assert_eq(reply->nack->code, code, "Nack code %d, want %d (%s)", reply->nack->code, code,
                 reply->nack->reason);
    cr_assert(strstr(reply->nack->reason, needle), "reason '%s' should mention '%s'",
              reply->nack->reason, needle);
}

static void s_teardown(void)
{
    h_world_fini(&W);
}

TestSuite(broker, .fini = s_teardown, .timeout = 300);

Test(broker, refusals_name_the_reason_and_the_broker_keeps_serving)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_COUNTY);
    cli_t c;
    s_cli_open(&c, H_XINZHAN, 0);
    referral_t r;

    s_referral(&r, H_FENGLE, H_COUNTY, "Spoofed Sender", 0);
    s_expect_nack(s_send_wait(&c, &r.env), MEDLINK__V1__NACK_CODE__NACK_IDENTITY,
                  "differs from the authenticated node");

    s_referral(&r, H_XINZHAN, "county.nowhere.hospital", "Lost Patient", 0);
    s_expect_nack(s_send_wait(&c, &r.env), MEDLINK__V1__NACK_CODE__NACK_UNKNOWN_NODE,
                  "county.nowhere.hospital");

    s_referral(&r, H_XINZHAN, H_COUNTY, "", 0);
    s_expect_nack(s_send_wait(&c, &r.env), MEDLINK__V1__NACK_CODE__NACK_INVALID, "patient.name");

    s_referral(&r, H_XINZHAN, H_FENGLE, "Sideways", 0);
    s_expect_nack(s_send_wait(&c, &r.env), MEDLINK__V1__NACK_CODE__NACK_FORBIDDEN,
                  "TOWNSHIP_CLINIC");

    /* Admin requests need an OPS node. */
    char aid[ML_ULID_LEN + 1];
    ml_ulid_new(aid);
    Medlink__V1__AdminRequest ar = MEDLINK__V1__ADMIN_REQUEST__INIT;
    ar.op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_STATUS;
    ml_envelope_t ae = MEDLINK__V1__ENVELOPE__INIT;
    ae.id = aid;
    ae.kind = MEDLINK__V1__KIND__KIND_ADMIN_REQUEST;
    ae.from = H_XINZHAN;
    ae.to = H_BROKER;
    ae.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REQUEST;
    ae.admin_request = &ar;
    s_expect_nack(s_send_wait(&c, &ae), MEDLINK__V1__NACK_CODE__NACK_FORBIDDEN, "OPS");

    /* And the same session still gets a good referral through. */
    s_referral(&r, H_XINZHAN, H_COUNTY, "Good Referral", 2);
    ml_envelope_t *ok = s_send_wait(&c, &r.env);
    cr_assert_eq(ok->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED);
    cr_assert_eq(ok->accepted->n_message_ids, 1);
    cr_assert_str_eq(ok->accepted->message_ids[0], r.id);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 1, 10000), 1);
    cr_assert_eq(c.downs, 0, "refusals must not drop the session");
    cr_assert_geq(h_log_contains(&W, "broker.log", "refused message"), 5);
    s_cli_close(&c);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

Test(broker, oversize_record_refused_then_client_reconnects)
{
    h_world_init(&W, "max_record = 65536\nsession_buffer = 65536");
    h_broker_start(&W);
    cli_t c;
    s_cli_open(&c, H_XINZHAN, 1024 * 1024);
    referral_t r;
    s_referral(&r, H_XINZHAN, H_COUNTY, "Huge Notes", 0);
    char *big = malloc(200000);
    memset(big, 'n', 199999);
    big[199999] = '\0';
    r.ref.notes = big;
    ml_envelope_t *reply = s_send_wait(&c, &r.env);
    s_expect_nack(reply, MEDLINK__V1__NACK_CODE__NACK_TOO_LARGE, "65536");
    free(big);
    /* The broker closed that session; the channel comes back by itself. */
    cr_assert(s_run_until(&c, s_went_down, NULL, 10000), "the oversize session was not closed");
    cr_assert(s_run_until(&c, s_is_up, NULL, 15000), "client did not reconnect");
    s_referral(&r, H_XINZHAN, H_COUNTY, "Normal Size", 0);
    ml_envelope_t *ok = s_send_wait(&c, &r.env);
    cr_assert_eq(ok->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED);
    cr_assert_geq(h_log_contains(&W, "broker.log", "record over the 65536-byte limit"), 1);
    s_cli_close(&c);
    h_broker_stop(&W);
}

Test(broker, duplicate_id_accepted_twice_delivered_once)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_COUNTY);
    cli_t c;
    s_cli_open(&c, H_XINZHAN, 0);
    referral_t r;
    s_referral(&r, H_XINZHAN, H_COUNTY, "Sent Twice", 1);
    ml_envelope_t *a = s_send_wait(&c, &r.env);
    cr_assert_eq(a->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED);
    cr_assert_eq(a->accepted->n_duplicate_ids, 0);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 1, 10000), 1);
    ml_envelope_t *b = s_send_wait(&c, &r.env);
    cr_assert_eq(b->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED);
    cr_assert_eq(b->accepted->n_duplicate_ids, 1,
                 "the second copy must be reported as a duplicate");
    cr_assert_str_eq(b->accepted->duplicate_ids[0], r.id);
    /* Also after a broker restart: dedupe is by the stored id, not memory. */
    s_cli_close(&c);
    h_broker_stop(&W);
    h_broker_start(&W);
    s_cli_open(&c, H_XINZHAN, 0);
    ml_envelope_t *d = s_send_wait(&c, &r.env);
    cr_assert_eq(d->accepted->n_duplicate_ids, 1);
    h_sleep_ms(1500);
    cr_assert_eq(h_count(&W, H_COUNTY, "inbox"), 1, "a duplicate reached the inbox");
    s_cli_close(&c);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

/* Patient names of the hospital agent's inbox in arrival order. */
static int s_inbox_order(char names[][32], int max)
{
    char path[800];
    snprintf(path, sizeof path, "%s/data/%s/agent.db", W.dir, H_COUNTY);
    sqlite3 *db;
    cr_assert_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    sqlite3_stmt *st;
    cr_assert_eq(sqlite3_prepare_v2(db, "SELECT envelope FROM inbox ORDER BY rowid", -1, &st, NULL),
                 SQLITE_OK);
    int n = 0;
    while (sqlite3_step(st) == SQLITE_ROW && n < max) {
        ml_envelope_t *e;
        cr_assert_eq(
            ml_env_unpack(sqlite3_column_blob(st, 0), (size_t)sqlite3_column_bytes(st, 0), &e), 0);
        snprintf(names[n++], 32, "%s", e->referral->patient->name);
        ml_env_free(&e);
    }
    sqlite3_finalize(st);
    sqlite3_close(db);
    return n;
}

Test(broker, emergency_overtakes_and_order_is_kept_within_priority)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t c;
    s_cli_open(&c, H_XINZHAN, 0);
    /* Hospital offline: queue 20 ROUTINE, 5 URGENT, 3 EMERGENCY,
     * interleaved the way a busy clinic would send them. */
    int r = 0, u = 0, e = 0, total = 0;
    for (int i = 0; i < 28; i++) {
        char name[32];
        int prio;
        if (i % 9 == 4 && e < 3) {
            prio = 2;
            snprintf(name, sizeof name, "E%02d", e++);
        } else if (i % 5 == 2 && u < 5) {
            prio = 1;
            snprintf(name, sizeof name, "U%02d", u++);
        } else if (r < 20) {
            prio = 0;
            snprintf(name, sizeof name, "R%02d", r++);
        } else if (u < 5) {
            prio = 1;
            snprintf(name, sizeof name, "U%02d", u++);
        } else {
            prio = 2;
            snprintf(name, sizeof name, "E%02d", e++);
        }
        referral_t ref;
        s_referral(&ref, H_XINZHAN, H_COUNTY, name, prio);
        ml_envelope_t *a = s_send_wait(&c, &ref.env);
        cr_assert_eq(a->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED);
        total++;
        if (c.n >= 60) {
            for (int k = 0; k < c.n; k++)
                ml_env_free(&c.replies[k]);
            c.n = 0;
        }
    }
    cr_assert_eq(total, 28);
    h_agent_start(&W, H_COUNTY);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 28, 20000), 28);
    h_sleep_ms(500);
    char names[64][32];
    int n = s_inbox_order(names, 64);
    cr_assert_eq(n, 28);
    const char *want_prefix = "EUR";
    int stage = 0, last = -1;
    for (int i = 0; i < n; i++) {
        while (stage < 3 && names[i][0] != want_prefix[stage]) {
            stage++;
            last = -1;
        }
        cr_assert(stage < 3, "message %s arrived out of priority order (position %d)", names[i], i);
        int idx = atoi(names[i] + 1);
        cr_assert_gt(idx, last, "%s arrived after a later message of the same priority", names[i]);
        last = idx;
    }
    s_cli_close(&c);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

Test(broker, client_refuses_a_server_that_is_not_the_expected_broker)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    /* The broker's certificate is genuine (same CA) but names medlinkd.test;
     * a client pinned to another broker id must not start a session, as it
     * would not with a clinic certificate posing as the broker. */
    cli_t c;
    s_cli_start(&c, H_XINZHAN, 0, "medlinkd.elsewhere");
    cr_assert_not(s_run_until(&c, s_is_up, NULL, 3000), "session came up with the wrong broker");
    s_cli_close(&c);
    s_cli_open(&c, H_XINZHAN, 0);
    cr_assert(c.up);
    s_cli_close(&c);
    h_broker_stop(&W);
}
