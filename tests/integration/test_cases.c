/* The broker's case engine against real processes: the real medlinkd, real
 * agents with their spool folders and SQLite files, and libmedlink test
 * clients where a test must see every answer (each refused step).
 *
 *   - every illegal transition of the referral lifecycle, from every state,
 *     by each party, is refused with a Nack naming the states, and the case
 *     is unchanged (its timeline holds the legal steps only);
 *   - the whole upward referral and the whole rehab down-transfer (with a
 *     re-referral back up) through agents, each update reaching the other
 *     side;
 *   - a missed EMERGENCY deadline escalates to ops and the clinic and
 *     redirects the referral to the community's fallback hospital;
 *   - 100 consults to a service go to two reading centres, each to one;
 *   - a dead letter is listed, replayed and delivered. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>
#include <jansson.h>

#include "cases.h"
#include "client.h"
#include "harness.h"
#include "ml_common.h"
#include "ml_env.h"

#include "short.h"

static h_world_t W;

static void s_teardown(void)
{
    h_world_fini(&W);
}

TestSuite(cases, .fini = s_teardown, .timeout = 600);

/* ---- helpers ------------------------------------------------------------ */

/* Sends a ReferralUpdate with status st for case_id from c to `to`,
 * carrying what each status needs. Returns the broker's answer. */
static ml_envelope_t *s_update(cli_t *c, const char *to, const char *case_id, int st)
{
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    Medlink__V1__ReferralUpdate u = MEDLINK__V1__REFERRAL_UPDATE__INIT;
    u.status = st;
    u.reason = "test reason";
    u.redirect_to = H_CITY;
    u.scheduled_at = ml_now_ms() + 86400000;
    u.department = "Cardiology";
    u.outcome_summary = "recovered";
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = id;
    e.case_id = (char *)case_id;
    e.from = c->node;
    e.to = (char *)to;
    e.created_at = ml_now_ms();
    e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL_UPDATE;
    e.referral_update = &u;
    return cli_send_wait(c, &e);
}

typedef struct {
    cli_t *c;
    int party;
    const char *to; /* where this sender addresses the case's messages */
} sender_t;

/* From state, every status that is not a legal step for a sender is sent
 * and must be refused; the Nack names the current and attempted states
 * (except to a node with no part in the case, which learns nothing).
 * Returns the number of refusals checked. */
static int s_try_all(const char *case_id, int state, const sender_t *who, size_t n_who)
{
    int checked = 0;
    for (size_t w = 0; w < n_who; w++) {
        for (int t = REF_(SENT); t <= REF_(CANCELLED); t++) {
            if (ml_case_check(ML_CASE_REFERRAL, state, t, who[w].party, NULL, 0) == 0)
                continue;
            ml_envelope_t *r = s_update(who[w].c, who[w].to, case_id, t);
            if (who[w].party == ML_PARTY_OTHER) {
                cli_expect_nack(r, NACK_(NOT_PARTY), "has no part in case");
                cr_assert_null(strstr(r->nack->reason, "REFERRAL_"),
                               "a node with no part must not learn the state: %s", r->nack->reason);
            } else {
                cli_expect_nack(r, NACK_(ILLEGAL_TRANSITION),
                                ml_case_state_name(ML_CASE_REFERRAL, state));
                cr_assert(strstr(r->nack->reason, ml_case_state_name(ML_CASE_REFERRAL, t)),
                          "the refusal of %s should name it: %s",
                          ml_case_state_name(ML_CASE_REFERRAL, t), r->nack->reason);
            }
            checked++;
        }
    }
    return checked;
}

static void s_legal(cli_t *c, const char *to, const char *case_id, int st)
{
    ml_envelope_t *r = s_update(c, to, case_id, st);
    cr_assert_eq(r->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED,
                 "%s should be a legal step: %s", ml_case_state_name(ML_CASE_REFERRAL, st),
                 r->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_NACK ? r->nack->reason : "");
}

static const Medlink__V1__CaseInfo *s_case(cli_t *ops, const char *case_id)
{
    Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
    rq.op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_CASE_SHOW;
    rq.case_id = (char *)case_id;
    const Medlink__V1__AdminReply *rep = cli_admin(ops, &rq);
    cr_assert_eq(rep->status, 0, "case show %s: %s", case_id, rep->error);
    cr_assert_not_null(rep->case_info);
    return rep->case_info;
}

/* The states a timeline went through (its opening and every transition,
 * whose event is the state it led to), joined with spaces. */
static void s_steps(const Medlink__V1__CaseInfo *ci, char *out, size_t len)
{
    out[0] = '\0';
    for (size_t i = 0; i < ci->n_timeline; i++) {
        const Medlink__V1__TimelineEntry *t = ci->timeline[i];
        if (strcmp(t->event, t->to_state) != 0 && strcmp(t->event, "opened") != 0)
            continue;
        size_t n = strlen(out);
        snprintf(out + n, len - n, "%s%s", n ? " " : "", t->to_state);
    }
}

/* Waits until the case reaches state (per the broker's admin view). */
static int s_wait_state(cli_t *ops, const char *case_id, const char *state, int ms)
{
    for (int waited = 0; waited <= ms; waited += 100) {
        if (strcmp(s_case(ops, case_id)->state, state) == 0)
            return 1;
        h_sleep_ms(100);
    }
    return 0;
}

/* ---- every illegal transition ------------------------------------------- */

Test(cases, referral_every_illegal_transition_refused)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t clinic, hosp, hospd, city, ops;
    cli_open(&clinic, &W, H_XINZHAN, 1);
    cli_open(&hosp, &W, H_COUNTY, 0); /* sends; takes no deliveries */
    cli_open(&city, &W, H_CITY, 0);
    cli_open(&ops, &W, H_OPS, 0);
    int checked = 0;

    /* Case A walks the main path, with a missed appointment on the way. */
    cli_referral_t a;
    cli_referral(&a, H_XINZHAN, H_COUNTY, "Case A", 1);
    cli_expect_accepted(cli_send_wait(&clinic, &a.env), a.id);
    sender_t who[] = {{&clinic, ML_PARTY_REFERRER, H_COUNTY},
                      {&hosp, ML_PARTY_TARGET, H_XINZHAN},
                      {&city, ML_PARTY_OTHER, H_XINZHAN}};
    checked += s_try_all(a.id, REF_(SENT), who, 3);
    /* The hospital's delivering session takes the referral: DELIVERED. */
    cli_open(&hospd, &W, H_COUNTY, 1);
    int one = 1;
    cr_assert(cli_run_until(&hospd, cli_got_n, &one, 10000), "referral not delivered");
    cr_assert(s_wait_state(&ops, a.id, "REFERRAL_DELIVERED", 10000));
    checked += s_try_all(a.id, REF_(DELIVERED), who, 3);
    int path[] = {REF_(ACCEPTED), REF_(SCHEDULED), REF_(NO_SHOW),   REF_(SCHEDULED),
                  REF_(ARRIVED),  REF_(ADMITTED),  REF_(DISCHARGED)};
    for (size_t i = 0; i < sizeof path / sizeof path[0]; i++) {
        s_legal(&hosp, H_XINZHAN, a.id, path[i]);
        checked += s_try_all(a.id, path[i], who, 3);
    }
    s_legal(&clinic, H_COUNTY, a.id, REF_(CLOSED));
    checked += s_try_all(a.id, REF_(CLOSED), who, 3);

    /* The case moved only by the legal steps, in order. */
    const Medlink__V1__CaseInfo *ci = s_case(&ops, a.id);
    cr_assert_str_eq(ci->state, "REFERRAL_CLOSED");
    cr_assert(ci->closed);
    char steps[1024];
    s_steps(ci, steps, sizeof steps);
    cr_assert_str_eq(steps,
                     "REFERRAL_SENT REFERRAL_DELIVERED REFERRAL_ACCEPTED REFERRAL_SCHEDULED "
                     "REFERRAL_NO_SHOW REFERRAL_SCHEDULED REFERRAL_ARRIVED REFERRAL_ADMITTED "
                     "REFERRAL_DISCHARGED REFERRAL_CLOSED");

    /* Case B is redirected to the city hospital, which rejects it. */
    cli_referral_t b;
    cli_referral(&b, H_XINZHAN, H_COUNTY, "Case B", 1);
    cli_expect_accepted(cli_send_wait(&clinic, &b.env), b.id);
    cr_assert(s_wait_state(&ops, b.id, "REFERRAL_DELIVERED", 10000));
    s_legal(&hosp, H_XINZHAN, b.id, REF_(REDIRECTED));
    sender_t who_b[] = {{&clinic, ML_PARTY_REFERRER, H_CITY},
                        {&city, ML_PARTY_TARGET, H_XINZHAN},
                        {&hosp, ML_PARTY_OTHER, H_XINZHAN}};
    checked += s_try_all(b.id, REF_(REDIRECTED), who_b, 3);
    s_legal(&city, H_XINZHAN, b.id, REF_(REJECTED));
    checked += s_try_all(b.id, REF_(REJECTED), who_b, 3);

    /* Case C is withdrawn by the clinic. */
    cli_referral_t c;
    cli_referral(&c, H_XINZHAN, H_COUNTY, "Case C", 0);
    cli_expect_accepted(cli_send_wait(&clinic, &c.env), c.id);
    s_legal(&clinic, H_COUNTY, c.id, REF_(CANCELLED));
    checked += s_try_all(c.id, REF_(CANCELLED), who, 3);
    cr_assert_str_eq(s_case(&ops, c.id)->state, "REFERRAL_CANCELLED");
    cr_assert_str_eq(s_case(&ops, b.id)->state, "REFERRAL_REJECTED");
    cr_assert_geq(checked, 300, "only %d refusals checked", checked);

    /* An update for a case nobody opened: the same answer as for a case
     * that is not the sender's (F11). */
    char nocase[ML_ULID_LEN + 1];
    ml_ulid_new(nocase);
    cli_expect_nack(s_update(&hosp, H_XINZHAN, nocase, REF_(ACCEPTED)), NACK_(NOT_PARTY), nocase);
    cr_assert_eq(clinic.downs + hosp.downs + city.downs, 0, "refusals must not drop sessions");
    cli_close(&clinic);
    cli_close(&hosp);
    cli_close(&hospd);
    cli_close(&city);
    cli_close(&ops);
    h_broker_stop(&W);
}

/* ---- whole workflows through agents ------------------------------------ */

/* Drops a JSON file (printf format) into node's outbox. */
static void s_drop(const char *node, const char *name, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void s_drop(const char *node, const char *name, const char *fmt, ...)
{
    char buf[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    h_drop(&W, node, name, buf);
}

/* The caseId of the first inbox JSON of node containing needle (waits). */
static void s_case_id(const char *node, const char *needle, char *out, size_t len)
{
    char *path = h_wait_json(&W, node, "inbox", needle, 20000);
    cr_assert(path, "nothing with %s reached %s", needle, node);
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    cr_assert(j, "%s is not JSON", path);
    const char *id = json_string_value(json_object_get(j, "caseId"));
    cr_assert(id && *id, "%s has no caseId", path);
    snprintf(out, len, "%s", id);
    json_decref(j);
    free(path);
}

static void s_expect_in(const char *node, const char *sub, const char *needle)
{
    char *p = h_wait_json(&W, node, sub, needle, 20000);
    cr_assert(p, "%s/%s never held a file with %s", node, sub, needle);
    free(p);
}

Test(cases, referral_whole_path_through_agents)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_COUNTY);
    h_agent_start(&W, H_XINZHAN);
    cli_t ops;
    cli_open(&ops, &W, H_OPS, 0);

    char *ref = h_referral_json(H_COUNTY, "Wang Fang", "PRIORITY_URGENT");
    h_drop(&W, H_XINZHAN, "referral.json", ref);
    free(ref);
    char case_id[160];
    s_case_id(H_COUNTY, "\"referral\"", case_id, sizeof case_id);
    s_expect_in(H_XINZHAN, "inbox", "REFERRAL_DELIVERED");

    /* The hospital's system answers every step; the clinic sees each. */
    static const struct {
        const char *status, *extra;
    } steps[] = {
        {"REFERRAL_ACCEPTED", "\"notes\": \"cardiology\""},
        {"REFERRAL_SCHEDULED",
         "\"scheduledAt\": \"1795900000000\", \"department\": \"Cardiology\""},
        {"REFERRAL_ARRIVED", "\"notes\": \"seen at the desk\""},
        {"REFERRAL_ADMITTED", "\"notes\": \"ward 3\""},
        {"REFERRAL_DISCHARGED", "\"outcomeSummary\": \"stent placed, stable\""},
    };
    for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "update-%zu.json", i);
        s_drop(H_COUNTY, name,
               "{\"to\": \"%s\", \"caseId\": \"%s\", \"priority\": \"PRIORITY_URGENT\","
               " \"referralUpdate\": {\"status\": \"%s\", %s}}",
               H_XINZHAN, case_id, steps[i].status, steps[i].extra);
        s_expect_in(H_XINZHAN, "inbox", steps[i].status);
    }
    /* The clinic closes the loop. */
    s_drop(H_XINZHAN, "close.json",
           "{\"to\": \"%s\", \"caseId\": \"%s\", \"priority\": \"PRIORITY_URGENT\","
           " \"referralUpdate\": {\"status\": \"REFERRAL_CLOSED\"}}",
           H_COUNTY, case_id);
    s_expect_in(H_COUNTY, "inbox", "REFERRAL_CLOSED");
    cr_assert_eq(h_count(&W, H_COUNTY, "rejected"), 0);
    cr_assert_eq(h_count(&W, H_XINZHAN, "rejected"), 0);

    const Medlink__V1__CaseInfo *ci = s_case(&ops, case_id);
    cr_assert_str_eq(ci->state, "REFERRAL_CLOSED");
    cr_assert_str_eq(ci->fhir_status, "completed");
    cr_assert_str_eq(ci->opened_by, H_XINZHAN);
    cr_assert_str_eq(ci->target, H_COUNTY);
    char got[1024];
    s_steps(ci, got, sizeof got);
    cr_assert_str_eq(got, "REFERRAL_SENT REFERRAL_DELIVERED REFERRAL_ACCEPTED REFERRAL_SCHEDULED "
                          "REFERRAL_ARRIVED REFERRAL_ADMITTED REFERRAL_DISCHARGED REFERRAL_CLOSED");
    cli_close(&ops);
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

#define S_DOWN_TRANSFER                                                                            \
    "{\"to\": \"%s\", \"priority\": \"PRIORITY_URGENT\", \"downTransfer\": {"                      \
    "\"patient\": {\"healthCardId\": \"130102195001013456\", \"name\": \"%s\", \"sex\": "          \
    "\"SEX_FEMALE\", \"birthDate\": \"1950-01-01\"},"                                              \
    "\"dischargingDoctor\": {\"name\": \"Dr. Zhao Min\"}, \"phase\": \"POST_OPERATIVE\","          \
    "\"dischargeSummary\": \"Hip replacement, uneventful recovery\","                              \
    "\"diagnosis\": [{\"icd10\": \"S72.0\", \"text\": \"Fracture of neck of femur\"}],"            \
    "\"rehabPlan\": \"Walking frame, physiotherapy twice weekly\","                                \
    "\"medication\": [{\"name\": \"Aspirin\", \"dose\": \"100 mg\", \"frequency\": \"daily\"}],"   \
    "\"followUp\": [{\"number\": 1, \"dueAt\": \"1796000000000\", \"kind\": \"home visit\"}],"     \
    "\"familyDoctorTeam\": \"Xinzhan team 2\"}}"

static void s_dt_update(const char *case_id, const char *name, const char *status,
                        const char *extra)
{
    s_drop(H_XINZHAN, name,
           "{\"to\": \"%s\", \"caseId\": \"%s\", \"priority\": \"PRIORITY_URGENT\","
           " \"downTransferUpdate\": {\"status\": \"%s\"%s%s}}",
           H_COUNTY, case_id, status, extra ? ", " : "", extra ? extra : "");
}

Test(cases, down_transfer_whole_path_and_re_referral)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_COUNTY);
    h_agent_start(&W, H_XINZHAN);
    cli_t ops;
    cli_open(&ops, &W, H_OPS, 0);

    /* The county hospital hands a recovering patient down. */
    s_drop(H_COUNTY, "down-1.json", S_DOWN_TRANSFER, H_XINZHAN, "Chen Lan");
    char c1[160];
    s_case_id(H_XINZHAN, "Chen Lan", c1, sizeof c1);
    cr_assert_str_eq(s_case(&ops, c1)->state, "DOWN_TRANSFER_OFFERED");

    /* The family-doctor team accepts, records the arrival and two visits. */
    s_dt_update(c1, "dt-accept.json", "DOWN_TRANSFER_ACCEPTED", NULL);
    s_expect_in(H_COUNTY, "inbox", "DOWN_TRANSFER_ACCEPTED");
    s_dt_update(c1, "dt-arrived.json", "DOWN_TRANSFER_ARRIVED", "\"notes\": \"home, stable\"");
    s_expect_in(H_COUNTY, "inbox", "DOWN_TRANSFER_ARRIVED");
    s_dt_update(c1, "dt-fu1.json", "DOWN_TRANSFER_FOLLOW_UP",
                "\"followUpNumber\": 1, \"notes\": \"walking with frame\"");
    s_expect_in(H_COUNTY, "inbox", "walking with frame");
    /* A follow-up number out of sequence is refused and lands in rejected/. */
    s_dt_update(c1, "dt-fu3.json", "DOWN_TRANSFER_FOLLOW_UP", "\"followUpNumber\": 3");
    cr_assert_eq(h_wait_count(&W, H_XINZHAN, "rejected", 1, 20000), 1);
    char err[900];
    h_spool(&W, H_XINZHAN, "rejected/dt-fu3.json.error", err, sizeof err);
    char *why = h_slurp(err);
    cr_assert(why && strstr(why, "follow_up_number") && strstr(why, "next one is 2"),
              "the .error should say which follow-up comes next: %s", why ? why : "(none)");
    free(why);
    s_dt_update(c1, "dt-fu2.json", "DOWN_TRANSFER_FOLLOW_UP",
                "\"followUpNumber\": 2, \"notes\": \"walking unaided\"");
    s_expect_in(H_COUNTY, "inbox", "walking unaided");
    s_dt_update(c1, "dt-done.json", "DOWN_TRANSFER_COMPLETED", "\"notes\": \"rehab complete\"");
    s_expect_in(H_COUNTY, "inbox", "DOWN_TRANSFER_COMPLETED");
    const Medlink__V1__CaseInfo *ci = s_case(&ops, c1);
    cr_assert_str_eq(ci->state, "DOWN_TRANSFER_COMPLETED");
    cr_assert_eq(ci->follow_ups, 2);
    char got[1024];
    s_steps(ci, got, sizeof got);
    cr_assert_str_eq(got,
                     "DOWN_TRANSFER_OFFERED DOWN_TRANSFER_ACCEPTED DOWN_TRANSFER_ARRIVED "
                     "DOWN_TRANSFER_FOLLOW_UP DOWN_TRANSFER_FOLLOW_UP DOWN_TRANSFER_COMPLETED");

    /* A second patient gets worse at home and goes back up as a referral
     * linked to the down-transfer. */
    s_drop(H_COUNTY, "down-2.json", S_DOWN_TRANSFER, H_XINZHAN, "Liu Qiang");
    char c2[160];
    s_case_id(H_XINZHAN, "Liu Qiang", c2, sizeof c2);
    s_dt_update(c2, "dt2-accept.json", "DOWN_TRANSFER_ACCEPTED", NULL);
    s_dt_update(c2, "dt2-arrived.json", "DOWN_TRANSFER_ARRIVED", "\"notes\": \"Liu at home\"");
    s_expect_in(H_COUNTY, "inbox", "Liu at home");
    s_drop(H_XINZHAN, "re-referral.json",
           "{\"to\": \"%s\", \"priority\": \"PRIORITY_URGENT\", \"referral\": {"
           "\"patient\": {\"healthCardId\": \"130102195001013456\", \"name\": \"Liu Qiang\"},"
           "\"reason\": \"Wound infection after discharge\", \"linkedCaseId\": \"%s\"}}",
           H_COUNTY, c2);
    s_expect_in(H_COUNTY, "inbox", "Wound infection after discharge");
    s_expect_in(H_COUNTY, "inbox", "DOWN_TRANSFER_RE_REFERRED");
    ci = s_case(&ops, c2);
    cr_assert_str_eq(ci->state, "DOWN_TRANSFER_RE_REFERRED");
    cr_assert(ci->closed);
    char ref_case[160];
    cr_assert(ci->linked_case_id && *ci->linked_case_id, "the down-transfer names no referral");
    snprintf(ref_case, sizeof ref_case, "%s", ci->linked_case_id);
    ci = s_case(&ops, ref_case);
    cr_assert_str_eq(ci->state, "REFERRAL_DELIVERED");
    cr_assert_str_eq(ci->linked_case_id, c2);
    cr_assert_eq(h_count(&W, H_COUNTY, "rejected"), 0);
    cli_close(&ops);
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

Test(cases, emergency_deadline_escalates_and_redirects)
{
    h_world_init(&W, "timer_ms = 100\n[deadlines]\nreferral.emergency = ACCEPTED 2s\n"
                     "referral = ACCEPTED 1h\n");
    h_broker_start(&W);
    h_agent_start(&W, H_COUNTY);
    h_agent_start(&W, H_XINZHAN);
    h_agent_start(&W, H_CITY);
    h_agent_start(&W, H_OPS);
    cli_t ops;
    cli_open(&ops, &W, H_OPS, 0);

    char *ref = h_referral_json(H_COUNTY, "Zhou Emergency", "PRIORITY_EMERGENCY");
    h_drop(&W, H_XINZHAN, "stemi.json", ref);
    free(ref);
    char case_id[160];
    s_case_id(H_COUNTY, "Zhou Emergency", case_id, sizeof case_id);
    const Medlink__V1__CaseInfo *ci = s_case(&ops, case_id);
    cr_assert_gt(ci->deadline_at, 0, "an EMERGENCY referral has a deadline");
    cr_assert_str_eq(ci->deadline_state, "REFERRAL_ACCEPTED");

    /* Nobody at the county hospital accepts it within 2 s. */
    s_expect_in(H_CITY, "inbox", "Zhou Emergency");
    s_expect_in(H_OPS, "inbox", "ESCALATION_DEADLINE_MISSED");
    s_expect_in(H_OPS, "inbox", H_CITY);
    s_expect_in(H_XINZHAN, "inbox", "ESCALATION_DEADLINE_MISSED");
    s_expect_in(H_XINZHAN, "inbox", "REFERRAL_REDIRECTED");
    s_expect_in(H_COUNTY, "inbox", "REFERRAL_REDIRECTED");
    ci = s_case(&ops, case_id);
    /* REDIRECTED, or already DELIVERED to the city hospital's agent. */
    cr_assert(strcmp(ci->state, "REFERRAL_REDIRECTED") == 0 ||
                  strcmp(ci->state, "REFERRAL_DELIVERED") == 0,
              "state %s", ci->state);
    cr_assert_str_eq(ci->target, H_CITY);
    cr_assert_eq(ci->escalations, 1);

    /* The county hospital is too late: the case is no longer its own. */
    s_drop(H_COUNTY, "late.json",
           "{\"to\": \"%s\", \"caseId\": \"%s\", \"referralUpdate\": {\"status\": "
           "\"REFERRAL_ACCEPTED\"}}",
           H_XINZHAN, case_id);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "rejected", 1, 20000), 1);
    char err[900];
    h_spool(&W, H_COUNTY, "rejected/late.json.error", err, sizeof err);
    char *why = h_slurp(err);
    cr_assert(why && strstr(why, "NACK_NOT_PARTY"), "late accept: %s", why ? why : "(none)");
    free(why);
    /* The fallback hospital accepts; the clinic hears it. */
    s_drop(
        H_CITY, "accept.json",
        "{\"to\": \"%s\", \"caseId\": \"%s\", \"priority\": \"PRIORITY_EMERGENCY\","
        " \"referralUpdate\": {\"status\": \"REFERRAL_ACCEPTED\", \"notes\": \"cath lab ready\"}}",
        H_XINZHAN, case_id);
    s_expect_in(H_XINZHAN, "inbox", "cath lab ready");
    cr_assert(s_wait_state(&ops, case_id, "REFERRAL_ACCEPTED", 10000));
    ci = s_case(&ops, case_id);
    cr_assert_eq(ci->deadline_at, 0, "the deadline is met");
    char got[1024];
    s_steps(ci, got, sizeof got);
    cr_assert(strstr(got, "REFERRAL_DELIVERED REFERRAL_REDIRECTED REFERRAL_DELIVERED "
                          "REFERRAL_ACCEPTED"),
              "timeline: %s", got);
    cr_assert_geq(h_log_contains(&W, "broker.log", "redirected by the broker"), 1);
    cli_close(&ops);
    h_agent_stop(&W, H_OPS);
    h_agent_stop(&W, H_CITY);
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

/* An ImagingConsult declaring one small object (its chunks never sent). */
static void s_send_consult(cli_t *c, const char *to, char *case_out)
{
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    Medlink__V1__Patient p = MEDLINK__V1__PATIENT__INIT;
    p.name = "Consult Patient";
    p.health_card_id = "130102199001011111";
    Medlink__V1__DicomObject o = MEDLINK__V1__DICOM_OBJECT__INIT;
    o.sop_instance_uid = "1.2.826.0.1.3680043.8.498.1";
    o.file_name = "IM0001.dcm";
    o.size = 1000;
    o.sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    o.chunks = 1;
    Medlink__V1__DicomObject *op = &o;
    Medlink__V1__ImagingConsult ic = MEDLINK__V1__IMAGING_CONSULT__INIT;
    ic.patient = &p;
    ic.study_instance_uid = "1.2.826.0.1.3680043.8.498.2";
    ic.modality = "CT";
    ic.body_part = "CHEST";
    ic.clinical_question = "nodule?";
    ic.n_object = 1;
    ic.object = &op;
    ic.chunk_size = 262144;
    ic.total_bytes = 1000;
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = id;
    e.case_id = id;
    e.from = c->node;
    e.to = (char *)to;
    e.created_at = ml_now_ms();
    e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CONSULT;
    e.imaging_consult = &ic;
    cli_expect_accepted(cli_send_wait(c, &e), id);
    snprintf(case_out, ML_ULID_LEN + 1, "%s", id);
}

Test(cases, competing_consumers_hundred_consults_each_to_one_centre)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_READ_A);
    h_agent_start(&W, H_READ_B);
    cli_t clinic, ops;
    cli_open(&clinic, &W, H_XINZHAN, 1);
    cli_open(&ops, &W, H_OPS, 0);
    enum { N = 100 };
    static char ids[N][ML_ULID_LEN + 1];
    for (int i = 0; i < N; i++)
        s_send_consult(&clinic, H_SERVICE_CT, ids[i]);
    /* Every consult reaches exactly one reading centre. */
    int a = 0, b = 0;
    for (int waited = 0; waited < 30000 && a + b < N; waited += 200) {
        h_sleep_ms(200);
        a = h_count(&W, H_READ_A, "inbox");
        b = h_count(&W, H_READ_B, "inbox");
    }
    int in_a = 0, in_b = 0;
    for (int i = 0; i < N; i++) {
        char *pa = h_find_json(&W, H_READ_A, "inbox", ids[i]);
        char *pb = h_find_json(&W, H_READ_B, "inbox", ids[i]);
        cr_assert(pa || pb, "consult %s reached no reading centre", ids[i]);
        cr_assert(!(pa && pb), "consult %s reached both reading centres", ids[i]);
        in_a += pa != NULL;
        in_b += pb != NULL;
        free(pa);
        free(pb);
        const Medlink__V1__CaseInfo *ci = s_case(&ops, ids[i]);
        cr_assert_str_eq(ci->target, pa ? H_READ_A : H_READ_B);
        cr_assert_str_eq(ci->service, H_SERVICE_CT);
    }
    cr_assert_eq(in_a + in_b, N);
    /* Both centres were online: the work is shared. */
    cr_assert_geq(in_a, N / 4, "reading centre A got %d of %d", in_a, N);
    cr_assert_geq(in_b, N / 4, "reading centre B got %d of %d", in_b, N);
    /* The clinic learns which centre has each consult. */
    int assigned = 0;
    for (int waited = 0; waited < 20000 && assigned < N; waited += 100) {
        cli_run_until(&clinic, cli_got_n, (int[]){N}, 100);
        assigned = clinic.n_got;
    }
    cr_assert_eq(assigned, N, "IMAGING_ASSIGNED notices: %d of %d", assigned, N);
    cli_close(&clinic);
    cli_close(&ops);
    h_agent_stop(&W, H_READ_A);
    h_agent_stop(&W, H_READ_B);
    h_broker_stop(&W);
}

static const Medlink__V1__AdminReply *s_dlq(cli_t *ops, int op, const char *id)
{
    Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
    rq.op = op;
    rq.message_id = (char *)(id ? id : "");
    return cli_admin(ops, &rq);
}

Test(cases, dead_letter_listed_replayed_and_delivered)
{
    h_world_init(&W, "timer_ms = 100\n");
    h_broker_start(&W);
    h_agent_start(&W, H_XINZHAN);
    cli_t ops;
    cli_open(&ops, &W, H_OPS, 0);

    /* A referral that must reach the hospital within 1.5 s; the hospital's
     * agent is down. */
    char path[900];
    snprintf(path, sizeof path, "%s", "late.json");
    s_drop(H_XINZHAN, path,
           "{\"to\": \"%s\", \"deadline\": \"%lld\", \"referral\": {\"patient\": "
           "{\"healthCardId\": \"130102198001019999\", \"name\": \"Expired Patient\"},"
           " \"reason\": \"review\"}}",
           H_COUNTY, (long long)(ml_now_ms() + 1500));
    cr_assert_eq(h_wait_count(&W, H_XINZHAN, "sent", 1, 20000), 1);
    /* It expires into the dead-letter queue, and the clinic is told. */
    const Medlink__V1__AdminReply *rep = cli_wait_dead_letters(&ops, NULL, 1, 20000);
    cr_assert(rep, "no dead letter listed");
    cr_assert_eq(rep->n_dead_letter, 1, "dead letters: %zu", rep->n_dead_letter);
    const Medlink__V1__DeadLetter *d = rep->dead_letter[0];
    cr_assert(strstr(d->reason, "expired"), "reason: %s", d->reason);
    cr_assert_str_eq(d->to, H_COUNTY);
    cr_assert_str_eq(d->kind, "REFERRAL");
    char msg_id[ML_ULID_LEN + 1], case_id[160];
    snprintf(msg_id, sizeof msg_id, "%s", d->message_id);
    snprintf(case_id, sizeof case_id, "%s", d->case_id);
    s_expect_in(H_XINZHAN, "inbox", "ESCALATION_DEAD_LETTER");

    /* The hospital comes back: nothing arrives by itself (the broker holds
     * nothing for it and delivered it nothing). */
    h_agent_start(&W, H_COUNTY);
    h_node_counts_t q = h_wait_quiet(&W, H_COUNTY, 0, 10000);
    cr_assert(q.queued == 0 && q.in_flight == 0 && q.delivered == 0,
              "broker: %lld queued, %lld in flight, %lld delivered to %s", q.queued, q.in_flight,
              q.delivered, H_COUNTY);
    cr_assert_eq(h_count(&W, H_COUNTY, "inbox"), 0, "a dead letter must not be delivered");
    /* show gives the stored envelope. */
    rep = s_dlq(&ops, MEDLINK__V1__ADMIN_REQUEST__OP__OP_DLQ_SHOW, msg_id);
    cr_assert_eq(rep->n_dead_letter, 1);
    ml_envelope_t *env = NULL;
    cr_assert_eq(
        ml_env_unpack(rep->dead_letter[0]->envelope.data, rep->dead_letter[0]->envelope.len, &env),
        0);
    cr_assert_str_eq(env->referral->patient->name, "Expired Patient");
    ml_env_free(&env);
    /* Ops replays it: delivered. */
    rep = s_dlq(&ops, MEDLINK__V1__ADMIN_REQUEST__OP__OP_DLQ_REPLAY, msg_id);
    cr_assert_eq(rep->status, 0, "replay: %s", rep->error);
    cr_assert_eq(rep->affected, 1);
    s_expect_in(H_COUNTY, "inbox", "Expired Patient");
    rep = s_dlq(&ops, MEDLINK__V1__ADMIN_REQUEST__OP__OP_DLQ_LIST, NULL);
    cr_assert_eq(rep->n_dead_letter, 0, "the replayed letter is still listed");
    cr_assert(s_wait_state(&ops, case_id, "REFERRAL_DELIVERED", 10000));
    const Medlink__V1__CaseInfo *ci = s_case(&ops, case_id);
    int dead = 0, replayed = 0;
    for (size_t i = 0; i < ci->n_timeline; i++) {
        dead += strcmp(ci->timeline[i]->event, "dead letter") == 0;
        replayed += strcmp(ci->timeline[i]->event, "replayed") == 0;
    }
    cr_assert(dead == 1 && replayed == 1, "timeline: %d dead letter, %d replayed", dead, replayed);
    /* An unknown id is refused with a sentence. */
    rep = s_dlq(&ops, MEDLINK__V1__ADMIN_REQUEST__OP__OP_DLQ_REPLAY, "01NOSUCHMESSAGE000000000000");
    cr_assert_neq(rep->status, 0);
    cr_assert(strstr(rep->error, "no dead letter"), "%s", rep->error);
    cli_close(&ops);
    h_agent_stop(&W, H_COUNTY);
    h_agent_stop(&W, H_XINZHAN);
    h_broker_stop(&W);
}

/* The other ways to the dead-letter queue: a recipient that never
 * acknowledges (max_delivery_attempts), and one that refuses a delivery
 * with a Nack. Both are escalated to the sender, and nothing is resent
 * for ever. */
Test(cases, unacknowledged_and_refused_deliveries_become_dead_letters)
{
    h_world_init(&W, "ack_timeout_ms = 300\nmax_delivery_attempts = 3\n");
    h_broker_start(&W);
    cli_t clinic, hosp, city, ops;
    cli_open(&clinic, &W, H_XINZHAN, 1);
    cli_open(&ops, &W, H_OPS, 0);
    cli_start(&hosp, &W, H_COUNTY, 0, H_BROKER, 1);
    hosp.answer = CLI_IGNORE;
    cr_assert(cli_run_until(&hosp, cli_is_up, NULL, 10000));
    cli_start(&city, &W, H_CITY, 0, H_BROKER, 1);
    city.answer = CLI_REFUSE;
    cr_assert(cli_run_until(&city, cli_is_up, NULL, 10000));

    cli_referral_t a, b;
    cli_referral(&a, H_XINZHAN, H_COUNTY, "Never Acked", 0);
    cli_expect_accepted(cli_send_wait(&clinic, &a.env), a.id);
    cli_referral(&b, H_XINZHAN, H_CITY, "Refused By Recipient", 0);
    cli_expect_accepted(cli_send_wait(&clinic, &b.env), b.id);

    const Medlink__V1__AdminReply *rep = cli_wait_dead_letters(&ops, NULL, 2, 20000);
    cr_assert(rep, "two dead letters were never listed");
    cr_assert_eq(rep->n_dead_letter, 2, "dead letters: %zu", rep->n_dead_letter);
    int attempts = 0, refused = 0;
    for (size_t i = 0; i < rep->n_dead_letter; i++) {
        const Medlink__V1__DeadLetter *d = rep->dead_letter[i];
        if (strcmp(d->message_id, a.id) == 0) {
            attempts = strstr(d->reason, "3 delivery attempts") != NULL;
            cr_assert_eq(d->attempts, 3, "attempts %u", d->attempts);
        } else if (strcmp(d->message_id, b.id) == 0) {
            refused = strstr(d->reason, "refused by the recipient") &&
                      strstr(d->reason, "cannot file this message");
        }
    }
    cr_assert(attempts, "no dead letter naming the 3 delivery attempts");
    cr_assert(refused, "no dead letter naming the recipient's refusal and its reason");
    cr_assert_eq(hosp.n_got, 3, "the silent hospital got the referral %d times, not 3", hosp.n_got);
    /* The clinic is told about both (escalations to the sender). */
    int esc = 0;
    for (int waited = 0; waited < 10000 && esc < 2; waited += 100) {
        cli_run_until(&clinic, cli_got_n, (int[]){1000}, 100);
        esc = 0;
        for (int i = 0; i < clinic.n_got; i++)
            esc += clinic.got[i]->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_ESCALATION &&
                   clinic.got[i]->escalation->reason ==
                       MEDLINK__V1__ESCALATION_REASON__ESCALATION_DEAD_LETTER;
    }
    cr_assert_eq(esc, 2, "escalations to the clinic: %d", esc);
    cli_close(&clinic);
    cli_close(&hosp);
    cli_close(&city);
    cli_close(&ops);
    h_broker_stop(&W);
}
