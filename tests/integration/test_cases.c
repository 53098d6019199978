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

#define REF_(x) MEDLINK__V1__REFERRAL_STATUS__REFERRAL_##x
#define NACK_(x) MEDLINK__V1__NACK_CODE__NACK_##x

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

/* The state-changing events of a timeline, joined with spaces. */
static void s_steps(const Medlink__V1__CaseInfo *ci, char *out, size_t len)
{
    out[0] = '\0';
    for (size_t i = 0; i < ci->n_timeline; i++) {
        const Medlink__V1__TimelineEntry *t = ci->timeline[i];
        if (strcmp(t->from_state, t->to_state) == 0 && strcmp(t->event, "opened") != 0)
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

    /* An update for a case nobody opened. */
    char nocase[ML_ULID_LEN + 1];
    ml_ulid_new(nocase);
    cli_expect_nack(s_update(&hosp, H_XINZHAN, nocase, REF_(ACCEPTED)), NACK_(UNKNOWN_CASE),
                    nocase);
    cr_assert_eq(clinic.downs + hosp.downs + city.downs, 0, "refusals must not drop sessions");
    cli_close(&clinic);
    cli_close(&hosp);
    cli_close(&hospd);
    cli_close(&city);
    cli_close(&ops);
    h_broker_stop(&W);
}
