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

#include "client.h"
#include "harness.h"
#include "ml_channel.h"
#include "ml_common.h"
#include "ml_crypt.h"
#include "ml_env.h"
#include "ml_tls.h"

static h_world_t W;

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
    cli_open(&c, &W, H_XINZHAN, 0);
    cli_referral_t r;

    cli_referral(&r, H_FENGLE, H_COUNTY, "Spoofed Sender", 0);
    cli_expect_nack(cli_send_wait(&c, &r.env), MEDLINK__V1__NACK_CODE__NACK_IDENTITY,
                    "differs from the authenticated node");

    cli_referral(&r, H_XINZHAN, "county.nowhere.hospital", "Lost Patient", 0);
    cli_expect_nack(cli_send_wait(&c, &r.env), MEDLINK__V1__NACK_CODE__NACK_UNKNOWN_NODE,
                    "county.nowhere.hospital");

    cli_referral(&r, H_XINZHAN, H_COUNTY, "", 0);
    cli_expect_nack(cli_send_wait(&c, &r.env), MEDLINK__V1__NACK_CODE__NACK_INVALID,
                    "patient.name");

    cli_referral(&r, H_XINZHAN, H_FENGLE, "Sideways", 0);
    cli_expect_nack(cli_send_wait(&c, &r.env), MEDLINK__V1__NACK_CODE__NACK_FORBIDDEN,
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
    cli_expect_nack(cli_send_wait(&c, &ae), MEDLINK__V1__NACK_CODE__NACK_FORBIDDEN, "OPS");

    /* And the same session still gets a good referral through. */
    cli_referral(&r, H_XINZHAN, H_COUNTY, "Good Referral", 2);
    ml_envelope_t *ok = cli_send_wait(&c, &r.env);
    cr_assert_eq(ok->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED);
    cr_assert_eq(ok->accepted->n_message_ids, 1);
    cr_assert_str_eq(ok->accepted->message_ids[0], r.id);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 1, 10000), 1);
    cr_assert_eq(c.downs, 0, "refusals must not drop the session");
    cr_assert_geq(h_log_contains(&W, "broker.log", "refused message"), 5);
    cli_close(&c);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

Test(broker, oversize_record_refused_then_client_reconnects)
{
    h_world_init(&W, "max_record = 65536\nsession_buffer = 65536");
    h_broker_start(&W);
    cli_t c;
    cli_start(&c, &W, H_XINZHAN, 1024 * 1024, H_BROKER, 0);
    cr_assert(cli_run_until(&c, cli_is_up, NULL, 10000), "client did not come up");
    cli_referral_t r;
    cli_referral(&r, H_XINZHAN, H_COUNTY, "Huge Notes", 0);
    char *big = malloc(200000);
    memset(big, 'n', 199999);
    big[199999] = '\0';
    r.ref.notes = big;
    ml_envelope_t *reply = cli_send_wait(&c, &r.env);
    cli_expect_nack(reply, MEDLINK__V1__NACK_CODE__NACK_TOO_LARGE, "65536");
    free(big);
    /* The broker closed that session; the channel comes back by itself. */
    cr_assert(cli_run_until(&c, cli_went_down, NULL, 10000), "the oversize session was not closed");
    cr_assert(cli_run_until(&c, cli_is_up, NULL, 15000), "client did not reconnect");
    cli_referral(&r, H_XINZHAN, H_COUNTY, "Normal Size", 0);
    ml_envelope_t *ok = cli_send_wait(&c, &r.env);
    cr_assert_eq(ok->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED);
    cr_assert_geq(h_log_contains(&W, "broker.log", "record over the 65536-byte limit"), 1);
    cli_close(&c);
    h_broker_stop(&W);
}

Test(broker, duplicate_id_accepted_twice_delivered_once)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_COUNTY);
    cli_t c;
    cli_open(&c, &W, H_XINZHAN, 0);
    cli_referral_t r;
    cli_referral(&r, H_XINZHAN, H_COUNTY, "Sent Twice", 1);
    ml_envelope_t *a = cli_send_wait(&c, &r.env);
    cr_assert_eq(a->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED);
    cr_assert_eq(a->accepted->n_duplicate_ids, 0);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 1, 10000), 1);
    ml_envelope_t *b = cli_send_wait(&c, &r.env);
    cr_assert_eq(b->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED);
    cr_assert_eq(b->accepted->n_duplicate_ids, 1,
                 "the second copy must be reported as a duplicate");
    cr_assert_str_eq(b->accepted->duplicate_ids[0], r.id);
    /* Also after a broker restart: dedupe is by the stored id, not memory. */
    cli_close(&c);
    h_broker_stop(&W);
    h_broker_start(&W);
    cli_open(&c, &W, H_XINZHAN, 0);
    ml_envelope_t *d = cli_send_wait(&c, &r.env);
    cr_assert_eq(d->accepted->n_duplicate_ids, 1);
    /* The restarted broker queued nothing for the hospital. */
    h_node_counts_t q = h_wait_quiet(&W, H_COUNTY, 0, 10000);
    cr_assert(q.queued == 0 && q.in_flight == 0 && q.delivered == 0,
              "broker: %lld queued, %lld in flight, %lld delivered to %s", q.queued, q.in_flight,
              q.delivered, H_COUNTY);
    cr_assert_eq(h_count(&W, H_COUNTY, "inbox"), 1, "a duplicate reached the inbox");
    cli_close(&c);
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
    /* The agent's store seals each envelope, bound to its message id. */
    ml_keyring_t *keys = h_store_keys(&W, H_COUNTY);
    sqlite3_stmt *st;
    cr_assert_eq(
        sqlite3_prepare_v2(db, "SELECT id, envelope FROM inbox ORDER BY rowid", -1, &st, NULL),
        SQLITE_OK);
    int n = 0;
    while (sqlite3_step(st) == SQLITE_ROW && n < max) {
        const char *id = (const char *)sqlite3_column_text(st, 0);
        const uint8_t *data = sqlite3_column_blob(st, 1);
        size_t len = (size_t)sqlite3_column_bytes(st, 1);
        uint8_t *plain = NULL;
        if (ml_is_sealed(data, len)) {
            cr_assert_eq(ml_open(keys, data, len, (const uint8_t *)id, strlen(id), &plain, &len), 0,
                         "inbox row %s does not open", id);
            data = plain;
        }
        ml_envelope_t *e;
        cr_assert_eq(ml_env_unpack(data, len, &e), 0);
        snprintf(names[n++], 32, "%s", e->referral->patient->name);
        ml_env_free(&e);
        free(plain);
    }
    sqlite3_finalize(st);
    sqlite3_close(db);
    ml_keyring_destroy(&keys);
    return n;
}

Test(broker, emergency_overtakes_and_order_is_kept_within_priority)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t c;
    cli_open(&c, &W, H_XINZHAN, 0);
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
        cli_referral_t ref;
        cli_referral(&ref, H_XINZHAN, H_COUNTY, name, prio);
        ml_envelope_t *a = cli_send_wait(&c, &ref.env);
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
    /* Nothing more to come: the broker delivered the 28 and holds none. */
    h_node_counts_t q = h_wait_quiet(&W, H_COUNTY, 28, 20000);
    cr_assert(q.queued == 0 && q.in_flight == 0 && q.delivered == 28,
              "broker: %lld queued, %lld in flight, %lld delivered to %s", q.queued, q.in_flight,
              q.delivered, H_COUNTY);
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
    cli_close(&c);
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
    cli_start(&c, &W, H_XINZHAN, 0, "medlinkd.elsewhere", 0);
    cr_assert_not(cli_run_until(&c, cli_is_up, NULL, 3000),
                  "session came up with the wrong broker");
    cli_close(&c);
    cli_open(&c, &W, H_XINZHAN, 0);
    cr_assert(c.up);
    cli_close(&c);
    h_broker_stop(&W);
}
