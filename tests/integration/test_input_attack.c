/* What a registered node may put into a message, against the broker, the
 * agents and medlinkctl (threat class 2 in docs/security.md). Real medlinkd,
 * agents and medlinkctl, as everywhere in tests/integration:
 *
 *   - F7: an id is a duplicate only when its own sender sends the same
 *     content again; another node's message, or the same node's different
 *     message, under a known id gets Nack ID_IN_USE, and an agent puts such
 *     a file into rejected/ with the reason (it was "accepted" and lost);
 *   - F6: a string that is not UTF-8 is refused naming the field; an agent
 *     never acknowledges a delivery it cannot spool (it refuses it and the
 *     broker makes it a dead letter); medlinkctl --json renders what a broker
 *     holds even when a string in it is not UTF-8;
 *   - F10: a case id with a newline or an escape is refused; refusals name
 *     the field, never quote the value, so patient data stays out of logs;
 *     medlinkctl escapes every string a peer supplied before printing it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>
#include <jansson.h>
#include <sqlite3.h>

#include "client.h"
#include "harness.h"
#include "store.h"
#include "ml_common.h"
#include "ml_crypt.h"
#include "ml_env.h"

#include "short.h"

static h_world_t W;

static void s_teardown(void)
{
    h_world_fini(&W);
}

TestSuite(security, .fini = s_teardown, .timeout = 300);

/* ---- helpers ------------------------------------------------------------ */

static void s_db_path(char *out, size_t len)
{
    snprintf(out, len, "%s/data/broker/broker.db", W.dir);
}

/* Deliveries of id the client holds. */
static int s_got_id(const cli_t *c, const char *id)
{
    int n = 0;
    for (int i = 0; i < c->n_got; i++)
        n += strcmp(c->got[i]->id, id) == 0;
    return n;
}

typedef struct {
    const char *id;
} s_id_t;

static int s_has_delivery(cli_t *c, void *arg)
{
    return s_got_id(c, ((s_id_t *)arg)->id) > 0;
}

/* Rewrites the stored envelope of message id in the broker's database (the
 * broker stopped) with edit applied: a message an older broker let through
 * and queued. */
static void s_tamper_stored(const char *id, void (*edit)(ml_envelope_t *))
{
    char path[700];
    s_db_path(path, sizeof path);
    /* Store schema 5: the body is in a segment file, not in the row. */
    uint8_t *stored = NULL;
    size_t stored_len = 0;
    cr_assert_eq(ml_store_offline_body(path, id, &stored, &stored_len), 0,
                 "message %s is not stored", id);
    ml_keyring_t *keys = h_store_keys(&W, H_BROKER);
    uint8_t *plain = NULL;
    size_t plain_len = 0;
    cr_assert_eq(
        ml_open(keys, stored, stored_len, (const uint8_t *)id, strlen(id), &plain, &plain_len), 0);
    free(stored);
    ml_envelope_t *env = NULL;
    cr_assert_eq(ml_env_unpack(plain, plain_len, &env), 0);
    free(plain);
    edit(env);
    uint8_t *packed = NULL, *sealed = NULL;
    size_t packed_len = 0, sealed_len = 0;
    cr_assert_eq(ml_env_pack(env, &packed, &packed_len), 0);
    ml_env_free(&env);
    cr_assert_eq(
        ml_seal(keys, packed, packed_len, (const uint8_t *)id, strlen(id), &sealed, &sealed_len),
        0);
    free(packed);
    ml_keyring_destroy(&keys);
    cr_assert_eq(ml_store_offline_replace_body(path, id, sealed, sealed_len), 0);
    free(sealed);
}

/* The patient's name is not UTF-8 (0xff 0xfe cannot occur in UTF-8).
 * protobuf-c's unpack allocates every string on its own with malloc, so the
 * old one is freed and the new one is ml_env_free's. */
static char s_bad_name[] = "Zh\xff\xfe"
                           "ang";
static void s_edit_bad_name(ml_envelope_t *env)
{
    cr_assert_eq(env->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL);
    free(env->referral->patient->name);
    env->referral->patient->name = strdup(s_bad_name);
}

/* ---- F7 ----------------------------------------------------------------- */

Test(security, f7_other_node_reusing_an_id_is_refused)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t a, b, county, ops;
    cli_open(&county, &W, H_COUNTY, 1);
    cli_open(&a, &W, H_XINZHAN, 0);
    cli_open(&b, &W, H_FENGLE, 0);
    cli_open(&ops, &W, H_OPS, 0);

    cli_referral_t ra, rb;
    cli_referral(&ra, H_XINZHAN, H_COUNTY, "Zhang San", MEDLINK__V1__PRIORITY__PRIORITY_ROUTINE);
    cli_expect_accepted(cli_send_wait(&a, &ra.env), ra.id);
    /* Another clinic's own referral under the same id: it used to be
     * answered Accepted (duplicate) and dropped. */
    cli_referral(&rb, H_FENGLE, H_COUNTY, "Li Si", MEDLINK__V1__PRIORITY__PRIORITY_ROUTINE);
    memcpy(rb.id, ra.id, sizeof rb.id);
    cli_expect_nack(cli_send_wait(&b, &rb.env), NACK_(ID_IN_USE), "different message");
    /* xinzhan's very referral, sent by fengle as its own: still not
     * fengle's message. */
    ra.env.from = H_FENGLE;
    cli_expect_nack(cli_send_wait(&b, &ra.env), NACK_(ID_IN_USE), "different message");
    ra.env.from = H_XINZHAN;

    s_id_t want = {ra.id};
    cr_assert(cli_run_until(&county, s_has_delivery, &want, 10000),
              "the referral was not delivered");
    /* The broker holds nothing more for the hospital and delivered it one
     * message: no second copy can still come. */
    h_node_counts_t q = cli_wait_quiet(&ops, H_COUNTY, 1, 10000);
    cr_assert(q.queued == 0 && q.in_flight == 0 && q.delivered == 1,
              "broker: %lld queued, %lld in flight, %lld delivered to %s", q.queued, q.in_flight,
              q.delivered, H_COUNTY);
    cr_assert_eq(s_got_id(&county, ra.id), 1, "id %s delivered %d times", ra.id,
                 s_got_id(&county, ra.id));
    for (int i = 0; i < county.n_got; i++)
        if (strcmp(county.got[i]->id, ra.id) == 0) {
            cr_assert_str_eq(county.got[i]->from, H_XINZHAN);
            cr_assert_str_eq(county.got[i]->referral->patient->name, "Zhang San");
        }
    cli_close(&a);
    cli_close(&b);
    cli_close(&ops);
    cli_close(&county);
    h_broker_stop(&W);
}

Test(security, f7_resend_is_a_duplicate_other_content_is_refused)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t a, county, ops;
    cli_open(&county, &W, H_COUNTY, 1);
    cli_open(&a, &W, H_XINZHAN, 0);
    cli_open(&ops, &W, H_OPS, 0);

    cli_referral_t r;
    cli_referral(&r, H_XINZHAN, H_COUNTY, "Zhang San", MEDLINK__V1__PRIORITY__PRIORITY_ROUTINE);
    cli_expect_accepted(cli_send_wait(&a, &r.env), r.id);
    /* Its Accepted was lost: the same message again is a duplicate. */
    const ml_envelope_t *again = cli_send_wait(&a, &r.env);
    cli_expect_accepted(again, r.id);
    cr_assert_eq(again->accepted->n_duplicate_ids, 1, "a resend is answered as a duplicate");

    /* The same sender's different message under that id (a system that
     * reuses ids), as a new case and in the same case. */
    cli_referral_t other;
    cli_referral(&other, H_XINZHAN, H_COUNTY, "Wang Wu", MEDLINK__V1__PRIORITY__PRIORITY_URGENT);
    memcpy(other.id, r.id, sizeof other.id);
    cli_expect_nack(cli_send_wait(&a, &other.env), NACK_(ID_IN_USE), "new id");
    r.patient.name = "Wang Wu";
    cli_expect_nack(cli_send_wait(&a, &r.env), NACK_(ID_IN_USE), "new id");

    s_id_t want = {r.id};
    cr_assert(cli_run_until(&county, s_has_delivery, &want, 10000));
    h_node_counts_t q = cli_wait_quiet(&ops, H_COUNTY, 1, 10000);
    cr_assert(q.queued == 0 && q.in_flight == 0 && q.delivered == 1,
              "broker: %lld queued, %lld in flight, %lld delivered to %s", q.queued, q.in_flight,
              q.delivered, H_COUNTY);
    cr_assert_eq(s_got_id(&county, r.id), 1);
    for (int i = 0; i < county.n_got; i++)
        if (strcmp(county.got[i]->id, r.id) == 0)
            cr_assert_str_eq(county.got[i]->referral->patient->name, "Zhang San");
    cli_close(&a);
    cli_close(&ops);
    cli_close(&county);
    h_broker_stop(&W);
}

/* The finding's own story: a hospital system copied the referral's id
 * into its update file and saw "accepted by the broker" while the update
 * was lost. Now the file lands in rejected/ saying why, and the same update
 * with a fresh id goes through. */
Test(security, f7_update_reusing_the_referral_id_is_rejected_not_lost)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_COUNTY);
    h_agent_start(&W, H_XINZHAN);
    char *ref = h_referral_json(H_COUNTY, "Zhang San", NULL);
    h_drop(&W, H_XINZHAN, "referral-001.json", ref);
    free(ref);
    char *in = h_wait_json(&W, H_COUNTY, "inbox", "Zhang San", 20000);
    cr_assert(in, "referral not in the county's inbox");
    json_error_t jerr;
    json_t *j = json_load_file(in, 0, &jerr);
    cr_assert(j);
    char id[64], case_id[160];
    snprintf(id, sizeof id, "%s", json_string_value(json_object_get(j, "id")));
    snprintf(case_id, sizeof case_id, "%s", json_string_value(json_object_get(j, "caseId")));
    json_decref(j);
    free(in);

    char upd[1024];
    snprintf(upd, sizeof upd,
             "{\"id\": \"%s\", \"to\": \"%s\", \"caseId\": \"%s\", \"referralUpdate\": "
             "{\"status\": \"REFERRAL_ACCEPTED\", \"notes\": \"Cardiology today\"}}",
             id, H_XINZHAN, case_id);
    h_drop(&W, H_COUNTY, "accept-001.json", upd);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "rejected", 1, 20000), 1,
                 "the update with a reused id was not rejected");
    char err_path[900], dir[700];
    h_spool(&W, H_COUNTY, "rejected", dir, sizeof dir);
    snprintf(err_path, sizeof err_path, "%s/accept-001.json.error", dir);
    char *why = h_slurp(err_path);
    cr_assert(why, "no %s", err_path);
    cr_assert(strstr(why, "ID_IN_USE"), "the reason does not say the id is in use: %s", why);
    free(why);
    cr_assert_null(h_find_json(&W, H_XINZHAN, "inbox", "REFERRAL_ACCEPTED"),
                   "the refused update reached the clinic");

    /* The same update without an id (the agent makes one) is taken. */
    snprintf(upd, sizeof upd,
             "{\"to\": \"%s\", \"caseId\": \"%s\", \"referralUpdate\": "
             "{\"status\": \"REFERRAL_ACCEPTED\", \"notes\": \"Cardiology today\"}}",
             H_XINZHAN, case_id);
    h_drop(&W, H_COUNTY, "accept-002.json", upd);
    char *back = h_wait_json(&W, H_XINZHAN, "inbox", "REFERRAL_ACCEPTED", 20000);
    cr_assert(back, "the update with a fresh id did not arrive");
    free(back);
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

/* ---- F6 ----------------------------------------------------------------- */

Test(security, f6_invalid_utf8_refused_naming_the_field)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t a;
    cli_open(&a, &W, H_XINZHAN, 0);
    cli_referral_t r;
    cli_referral(&r, H_XINZHAN, H_COUNTY, s_bad_name, MEDLINK__V1__PRIORITY__PRIORITY_ROUTINE);
    const ml_envelope_t *rep = cli_send_wait(&a, &r.env);
    cli_expect_nack(rep, NACK_(INVALID), "patient.name");
    cr_assert(strstr(rep->nack->reason, "UTF-8"), "reason: %s", rep->nack->reason);
    cr_assert_null(strstr(rep->nack->reason, "\xff"), "the reason quotes the bytes");
    /* A valid one after it goes through: nothing was held. */
    cli_referral(&r, H_XINZHAN, H_COUNTY, "Zhang San", MEDLINK__V1__PRIORITY__PRIORITY_ROUTINE);
    cli_expect_accepted(cli_send_wait(&a, &r.env), r.id);
    cli_close(&a);
    h_broker_stop(&W);
    cr_assert_eq(h_log_contains(&W, "broker.log", "\xff"), 0, "the raw bytes reached the log");
}

/* A queued message that an older broker let through (its patient name is
 * not UTF-8) reaches an agent that cannot write it as JSON: it used to be
 * acknowledged, then retried every scan for ever. Now the agent refuses it,
 * the broker makes it a dead letter naming the field, and the agent goes on
 * with the next message. */
Test(security, f6_agent_refuses_a_delivery_it_cannot_spool)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t a;
    cli_open(&a, &W, H_XINZHAN, 0);
    cli_referral_t r;
    cli_referral(&r, H_XINZHAN, H_COUNTY, "Zhang San", MEDLINK__V1__PRIORITY__PRIORITY_ROUTINE);
    cli_expect_accepted(cli_send_wait(&a, &r.env), r.id);
    cli_close(&a);
    h_broker_stop(&W);
    s_tamper_stored(r.id, s_edit_bad_name);

    h_broker_start(&W);
    h_agent_start(&W, H_COUNTY);
    cli_t ops;
    cli_open(&ops, &W, H_OPS, 0);
    const Medlink__V1__DeadLetter *dl =
        cli_dead_letter(cli_wait_dead_letters(&ops, r.id, 0, 20000), r.id);
    cr_assert(dl, "the delivery the agent cannot spool is not a dead letter");
    cr_assert(strstr(dl->reason, "refused by the recipient"), "reason: %s", dl->reason);
    cr_assert(strstr(dl->reason, "patient.name"), "reason does not name the field: %s", dl->reason);
    cr_assert_eq(h_count(&W, H_COUNTY, "inbox"), 0, "something was written to the inbox");

    /* The agent goes on: the next referral is written. */
    cli_open(&a, &W, H_XINZHAN, 0);
    cli_referral(&r, H_XINZHAN, H_COUNTY, "Li Si", MEDLINK__V1__PRIORITY__PRIORITY_ROUTINE);
    cli_expect_accepted(cli_send_wait(&a, &r.env), r.id);
    char *in = h_wait_json(&W, H_COUNTY, "inbox", "Li Si", 20000);
    cr_assert(in, "the next referral did not reach the inbox");
    free(in);
    /* Refused once, not retried every scan. A sleep on purpose: what must
     * not happen is the agent's own (its 100 ms spool scan redoing the
     * refusal), which no broker count shows; 1.5 s is fifteen scans. */
    h_sleep_ms(1500);
    int lines = h_log_contains(&W, "agent-" H_COUNTY ".log", "refused delivered");
    cr_assert(lines >= 1 && lines <= 2, "the agent logged the refusal %d times", lines);
    cli_close(&a);
    cli_close(&ops);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

/* ---- F10 (and F6 in medlinkctl) ---------------------------------------- */

Test(security, f10_case_id_with_newline_or_escape_refused)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t a;
    cli_open(&a, &W, H_XINZHAN, 0);
    const char *bad[] = {"case-1\n2026-12-07T00:00:00.000Z error FORGED log line",
                         "case-2\x1b[2J\x1b[31mFORGED", "case 3", "case/../4"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        cli_referral_t r;
        cli_referral(&r, H_XINZHAN, H_COUNTY, "Zhang San", MEDLINK__V1__PRIORITY__PRIORITY_ROUTINE);
        r.env.case_id = (char *)bad[i];
        const ml_envelope_t *rep = cli_send_wait(&a, &r.env);
        cli_expect_nack(rep, NACK_(INVALID), "case_id");
        cr_assert_null(strstr(rep->nack->reason, "FORGED"), "the reason quotes the case id: %s",
                       rep->nack->reason);
    }
    /* A refusal names the field, not the value: the ICD-10 text and the
     * patient's name stay out of the log. */
    cli_referral_t r;
    cli_referral(&r, H_XINZHAN, H_COUNTY, "Zhao Liu Secret",
                 MEDLINK__V1__PRIORITY__PRIORITY_ROUTINE);
    r.diag.icd10 = "NOT-A-CODE-SECRET";
    const ml_envelope_t *rep = cli_send_wait(&a, &r.env);
    cli_expect_nack(rep, NACK_(INVALID), "icd10");
    cr_assert_null(strstr(rep->nack->reason, "SECRET"), "reason: %s", rep->nack->reason);
    cli_close(&a);
    h_broker_stop(&W);
    cr_assert_eq(h_log_contains(&W, "broker.log", "FORGED"), 0, "a peer's text reached the log");
    cr_assert_eq(h_log_contains(&W, "broker.log", "SECRET"), 0, "payload values reached the log");
    cr_assert_eq(h_log_contains(&W, "broker.log", "\x1b"), 0, "an escape reached the log");
}

/* What a broker holds is printed safely whatever it is: an escape, a
 * newline and bytes that are not UTF-8 in a timeline entry (as an older
 * broker could have stored them) neither drive the terminal nor forge a
 * line, and --json still prints the case. */
Test(security, f10_ctl_escapes_peer_text_and_json_survives_invalid_utf8)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t a;
    cli_open(&a, &W, H_XINZHAN, 0);
    cli_referral_t r;
    cli_referral(&r, H_XINZHAN, H_COUNTY, "Zhang San", MEDLINK__V1__PRIORITY__PRIORITY_ROUTINE);
    cli_expect_accepted(cli_send_wait(&a, &r.env), r.id);
    char case_id[160];
    snprintf(case_id, sizeof case_id, "%s", r.env.case_id);
    cli_close(&a);
    h_broker_stop(&W);

    char path[700];
    s_db_path(path, sizeof path);
    sqlite3 *db = NULL;
    cr_assert_eq(sqlite3_open(path, &db), SQLITE_OK);
    sqlite3_stmt *q = NULL;
    cr_assert_eq(sqlite3_prepare_v2(db, "UPDATE case_events SET event = ?1 WHERE case_id = ?2", -1,
                                    &q, NULL),
                 SQLITE_OK);
    const char evil[] = "opened\x1b[2J\x1b]0;pwned\x07\nFORGED line \xff\xfe";
    sqlite3_bind_blob(q, 1, evil, (int)sizeof evil - 1, SQLITE_STATIC);
    sqlite3_bind_text(q, 2, case_id, -1, SQLITE_STATIC);
    cr_assert_eq(sqlite3_step(q), SQLITE_DONE);
    cr_assert_gt(sqlite3_changes(db), 0, "no timeline entry to change");
    sqlite3_finalize(q);
    sqlite3_close(db);
    h_broker_start(&W);

    char args[300], ops_cfg[700];
    int st = -1;
    h_ctl_config(&W, H_OPS, ops_cfg, sizeof ops_cfg);
    snprintf(args, sizeof args, "case show %s", case_id);
    char *out = h_ctl_run(&st, NULL, ops_cfg, args);
    cr_assert_eq(st, 0, "medlinkctl case: exit %d:\n%s", st, out);
    cr_assert_null(strchr(out, '\x1b'), "an escape reached the terminal:\n%s", out);
    cr_assert_null(strchr(out, '\x07'), "a BEL reached the terminal");
    cr_assert_null(strstr(out, "\nFORGED"), "a forged line reached the terminal:\n%s", out);
    cr_assert_null(strstr(out, "\xff"), "bytes that are not UTF-8 reached the terminal");
    cr_assert(strstr(out, "opened\\x1b"), "the event is not shown escaped:\n%s", out);
    free(out);

    snprintf(args, sizeof args, "--json case show %s", case_id);
    out = h_ctl_run(&st, NULL, ops_cfg, args);
    cr_assert_eq(st, 0, "medlinkctl --json case: exit %d:\n%s", st, out);
    json_error_t jerr;
    json_t *j = json_loads(out, 0, &jerr);
    cr_assert(j, "not JSON (%s):\n%s", jerr.text, out);
    json_decref(j);
    free(out);
    out = h_ctl_run(&st, NULL, ops_cfg, "--json cases");
    cr_assert_eq(st, 0, "medlinkctl --json cases: exit %d", st);
    j = json_loads(out, 0, &jerr);
    cr_assert(j, "cases: not JSON (%s)", jerr.text);
    json_decref(j);
    free(out);
    h_broker_stop(&W);
}

/* A registered node refused at its rate for ever must not fill the disk
 * with log lines: every record gets its Nack, the log at most
 * ML_LOGLIMIT_BURST lines a minute for that node, and another node's refusal
 * is still logged. */
Test(security, refusals_of_one_node_logged_within_a_budget)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t a, b;
    cli_open(&a, &W, H_XINZHAN, 0);
    cli_open(&b, &W, H_FENGLE, 0);
    for (int i = 0; i < 200; i++) {
        cli_referral_t r;
        cli_referral(&r, H_XINZHAN, H_COUNTY, "Zhang San", MEDLINK__V1__PRIORITY__PRIORITY_ROUTINE);
        r.env.case_id = "bad case id";
        cli_expect_nack(cli_send_wait(&a, &r.env), NACK_(INVALID), "case_id");
    }
    cli_referral_t r;
    cli_referral(&r, H_FENGLE, H_COUNTY, "Li Si", MEDLINK__V1__PRIORITY__PRIORITY_ROUTINE);
    r.env.case_id = "another bad one";
    cli_expect_nack(cli_send_wait(&b, &r.env), NACK_(INVALID), "case_id");
    cli_close(&a);
    cli_close(&b);
    h_broker_stop(&W);
    int lines = h_log_contains(&W, "broker.log", "from " H_XINZHAN ":");
    cr_assert(lines >= 1 && lines <= 10, "%d log lines for 200 refusals", lines);
    cr_assert_eq(h_log_contains(&W, "broker.log", "from " H_FENGLE ":"), 1,
                 "the other node's refusal was not logged");
}
