/* The upward-referral lifecycle of broker/cases.h, stated a second time here
 * as a plain list of legal (from, to, party) triples and checked against
 * ml_case_referral_check for every combination of states and parties, so
 * that a slip in either statement shows up as a disagreement. Also the
 * sentences a refused step gets, the terminal states, the state names and
 * the FHIR Task.status mapping of docs/workflows.md. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "cases.h"
#include "ml_common.h"
#include "medlink/v1/referral.pb-c.h"

#define R(x) MEDLINK__V1__REFERRAL_STATUS__REFERRAL_##x
#define UNSPEC MEDLINK__V1__REFERRAL_STATUS__REFERRAL_STATUS_UNSPECIFIED
#define BROKER ML_PARTY_BROKER
#define REFERRER ML_PARTY_REFERRER
#define TARGET ML_PARTY_TARGET
#define OTHER ML_PARTY_OTHER

/* Every value of ReferralStatus is 0..12; the walk goes a little beyond on
 * both sides so that values outside the enum are covered too. */
#define FIRST (-2)
#define LAST 14
#define NSTATES 13

typedef struct {
    int from, to, party;
} triple_t;

/* The lifecycle, written out from the table in cases.h: everything that is
 * allowed, and nothing else is. */
static const triple_t s_legal[] = {
    /* delivery, recorded by the broker */
    {R(SENT), R(DELIVERED), BROKER},
    {R(REDIRECTED), R(DELIVERED), BROKER},
    /* the receiving hospital decides */
    {R(SENT), R(ACCEPTED), TARGET},
    {R(SENT), R(REJECTED), TARGET},
    {R(SENT), R(REDIRECTED), TARGET},
    {R(DELIVERED), R(ACCEPTED), TARGET},
    {R(DELIVERED), R(REJECTED), TARGET},
    {R(DELIVERED), R(REDIRECTED), TARGET},
    {R(REDIRECTED), R(ACCEPTED), TARGET},
    {R(REDIRECTED), R(REJECTED), TARGET},
    {R(REDIRECTED), R(REDIRECTED), TARGET},
    /* appointments */
    {R(ACCEPTED), R(SCHEDULED), TARGET},
    {R(SCHEDULED), R(SCHEDULED), TARGET},
    {R(NO_SHOW), R(SCHEDULED), TARGET},
    {R(SCHEDULED), R(ARRIVED), TARGET},
    {R(SCHEDULED), R(NO_SHOW), TARGET},
    /* the stay */
    {R(ARRIVED), R(ADMITTED), TARGET},
    {R(ADMITTED), R(DISCHARGED), TARGET},
    /* closing the loop: either end */
    {R(DISCHARGED), R(CLOSED), TARGET},
    {R(DISCHARGED), R(CLOSED), REFERRER},
    {R(ARRIVED), R(CLOSED), TARGET},
    {R(ARRIVED), R(CLOSED), REFERRER},
    {R(NO_SHOW), R(CLOSED), TARGET},
    {R(NO_SHOW), R(CLOSED), REFERRER},
    /* withdrawal by the referring clinic */
    {R(SENT), R(CANCELLED), REFERRER},
    {R(DELIVERED), R(CANCELLED), REFERRER},
    {R(REDIRECTED), R(CANCELLED), REFERRER},
    {R(ACCEPTED), R(CANCELLED), REFERRER},
    {R(SCHEDULED), R(CANCELLED), REFERRER},
};
#define NLEGAL (sizeof s_legal / sizeof s_legal[0])

static int s_expect_legal(int from, int to, int party)
{
    for (size_t i = 0; i < NLEGAL; i++)
        if (s_legal[i].from == from && s_legal[i].to == to && s_legal[i].party == party)
            return 1;
    return 0;
}

/* 1 if some party may make from -> to (so a refusal is about the party). */
static int s_pair_exists(int from, int to)
{
    for (int p = BROKER; p <= OTHER; p++)
        if (s_expect_legal(from, to, p))
            return 1;
    return 0;
}

static const char *const s_names[NSTATES] = {
    "REFERRAL_STATUS_UNSPECIFIED", "REFERRAL_SENT",       "REFERRAL_DELIVERED",
    "REFERRAL_ACCEPTED",           "REFERRAL_REJECTED",   "REFERRAL_REDIRECTED",
    "REFERRAL_SCHEDULED",          "REFERRAL_ARRIVED",    "REFERRAL_NO_SHOW",
    "REFERRAL_ADMITTED",           "REFERRAL_DISCHARGED", "REFERRAL_CLOSED",
    "REFERRAL_CANCELLED",
};

/* Who may set each state, in the words of the refusal. */
static const char *s_who(int to)
{
    switch (to) {
    case R(DELIVERED):
        return "may only be set by the broker (on delivery)";
    case R(CLOSED):
        return "may only be set by the receiving hospital or the referring clinic";
    case R(CANCELLED):
        return "may only be set by the referring clinic";
    default:
        return "may only be set by the receiving hospital";
    }
}

static int s_known(int state)
{
    return state >= 0 && state < NSTATES;
}

Test(cases, enum_has_the_states_this_suite_knows)
{
    /* A new ReferralStatus value must be placed in the lifecycle (cases.c)
     * and here before this passes again. */
    cr_assert_eq(medlink__v1__referral_status__descriptor.n_values, NSTATES);
    for (int s = 0; s < NSTATES; s++)
        cr_assert_str_eq(ml_case_referral_state_name(s), s_names[s]);
    cr_assert_str_eq(ml_case_referral_state_name(-1), "UNKNOWN");
    cr_assert_str_eq(ml_case_referral_state_name(NSTATES), "UNKNOWN");
    cr_assert_str_eq(ml_case_referral_state_name(1000), "UNKNOWN");
}

Test(cases, every_triple_matches_the_written_lifecycle)
{
    int legal = 0;
    for (int from = FIRST; from <= LAST; from++) {
        for (int to = FIRST; to <= LAST; to++) {
            for (int party = BROKER; party <= OTHER; party++) {
                char err[256] = "untouched";
                int rc = ml_case_referral_check(from, to, party, err, sizeof err);
                int want = s_expect_legal(from, to, party);
                cr_assert_eq(rc, want ? 0 : ML_EDENIED, "%d -> %d by party %d: rc %d (%s)", from,
                             to, party, rc, err);
                if (want) {
                    legal++;
                    continue;
                }
                cr_assert(err[0] && strcmp(err, "untouched") != 0, "%d -> %d by %d: no reason",
                          from, to, party);
                if (party == OTHER) {
                    cr_assert(strstr(err, "node has no part in this case"), "%s", err);
                    continue;
                }
                /* Every refusal to a party of the case names both states. */
                if (s_known(from))
                    cr_assert(strstr(err, s_names[from]), "%d -> %d: %s", from, to, err);
                if (s_known(to))
                    cr_assert(strstr(err, s_names[to]), "%d -> %d: %s", from, to, err);
                if (s_pair_exists(from, to))
                    cr_assert(strstr(err, s_who(to)), "%d -> %d by %d: %s", from, to, party, err);
                else
                    cr_assert(strncmp(err, "illegal transition: case is ", 28) == 0, "%s", err);
            }
        }
    }
    cr_assert_eq(legal, (int)NLEGAL);
}

Test(cases, happy_path)
{
    static const int path[] = {R(SENT),    R(DELIVERED), R(ACCEPTED),   R(SCHEDULED),
                               R(ARRIVED), R(ADMITTED),  R(DISCHARGED), R(CLOSED)};
    static const int by[] = {BROKER, TARGET, TARGET, TARGET, TARGET, TARGET, REFERRER};
    char err[256] = "";
    for (size_t i = 0; i + 1 < sizeof path / sizeof path[0]; i++) {
        cr_assert_eq(ml_case_referral_check(path[i], path[i + 1], by[i], err, sizeof err), 0,
                     "step %zu: %s", i, err);
        cr_assert_eq(ml_case_referral_terminal(path[i]), 0);
    }
    cr_assert_eq(ml_case_referral_terminal(R(CLOSED)), 1);
}

Test(cases, redirect_path)
{
    /* The first hospital hands the patient on; the second one receives the
     * referral through the broker, then accepts it. */
    cr_assert_eq(ml_case_referral_check(R(DELIVERED), R(REDIRECTED), TARGET, NULL, 0), 0);
    cr_assert_eq(ml_case_referral_check(R(REDIRECTED), R(DELIVERED), BROKER, NULL, 0), 0);
    cr_assert_eq(ml_case_referral_check(R(DELIVERED), R(ACCEPTED), TARGET, NULL, 0), 0);
}

Test(cases, illegal_step_sentence)
{
    char err[256];
    cr_assert_eq(ml_case_referral_check(R(ARRIVED), R(ACCEPTED), TARGET, err, sizeof err),
                 ML_EDENIED);
    cr_assert_str_eq(err, "illegal transition: case is REFERRAL_ARRIVED, REFERRAL_ACCEPTED is not "
                          "allowed from it");
    cr_assert_eq(ml_case_referral_check(R(ADMITTED), R(CANCELLED), REFERRER, err, sizeof err),
                 ML_EDENIED);
    cr_assert_str_eq(err, "illegal transition: case is REFERRAL_ADMITTED, REFERRAL_CANCELLED is "
                          "not allowed from it");
}

Test(cases, terminal_states)
{
    static const int terminal[] = {R(REJECTED), R(CANCELLED), R(CLOSED)};
    for (int s = FIRST; s <= LAST; s++) {
        int want = s == R(REJECTED) || s == R(CANCELLED) || s == R(CLOSED);
        cr_assert_eq(ml_case_referral_terminal(s), want, "state %d", s);
    }
    for (size_t i = 0; i < 3; i++) {
        int from = terminal[i];
        for (int to = FIRST; to <= LAST; to++) {
            for (int party = BROKER; party <= TARGET; party++) {
                char err[256] = "";
                cr_assert_eq(ml_case_referral_check(from, to, party, err, sizeof err), ML_EDENIED);
                char want[64];
                snprintf(want, sizeof want, "case is %s, which is final", s_names[from]);
                cr_assert(strstr(err, want), "%s", err);
            }
        }
    }
    char err[256];
    ml_case_referral_check(R(CLOSED), R(SCHEDULED), TARGET, err, sizeof err);
    cr_assert_str_eq(err, "illegal transition: case is REFERRAL_CLOSED, which is final; "
                          "REFERRAL_SCHEDULED is not allowed from it");
}

Test(cases, no_dead_ends_and_every_state_reachable)
{
    /* Every state that is not terminal has a way out, and every state can
     * be reached from SENT: the lifecycle has no traps and no orphans. */
    for (int s = R(SENT); s < NSTATES; s++) {
        int out = 0;
        for (int to = R(SENT); to < NSTATES; to++)
            for (int p = BROKER; p <= TARGET; p++)
                out += ml_case_referral_check(s, to, p, NULL, 0) == 0;
        cr_assert_eq(out > 0, !ml_case_referral_terminal(s), "state %s", s_names[s]);
    }
    int seen[NSTATES] = {0};
    seen[R(SENT)] = 1;
    for (int changed = 1; changed;) {
        changed = 0;
        for (int from = R(SENT); from < NSTATES; from++)
            for (int to = R(SENT); to < NSTATES; to++)
                for (int p = BROKER; p <= TARGET; p++)
                    if (seen[from] && !seen[to] &&
                        ml_case_referral_check(from, to, p, NULL, 0) == 0)
                        seen[to] = changed = 1;
    }
    for (int s = R(SENT); s < NSTATES; s++)
        cr_assert(seen[s], "%s unreachable", s_names[s]);
}

Test(cases, party_errors_say_who_may)
{
    char err[256];
    cr_assert_eq(ml_case_referral_check(R(ACCEPTED), R(SCHEDULED), REFERRER, err, sizeof err),
                 ML_EDENIED);
    cr_assert_str_eq(err, "REFERRAL_SCHEDULED may only be set by the receiving hospital (case is "
                          "REFERRAL_ACCEPTED)");
    ml_case_referral_check(R(SENT), R(DELIVERED), TARGET, err, sizeof err);
    cr_assert_str_eq(err, "REFERRAL_DELIVERED may only be set by the broker (on delivery) (case is "
                          "REFERRAL_SENT)");
    ml_case_referral_check(R(SCHEDULED), R(CANCELLED), TARGET, err, sizeof err);
    cr_assert_str_eq(err, "REFERRAL_CANCELLED may only be set by the referring clinic (case is "
                          "REFERRAL_SCHEDULED)");
    ml_case_referral_check(R(NO_SHOW), R(CLOSED), BROKER, err, sizeof err);
    cr_assert_str_eq(err, "REFERRAL_CLOSED may only be set by the receiving hospital or the "
                          "referring clinic (case is REFERRAL_NO_SHOW)");
}

Test(cases, other_nodes_never_and_learn_nothing)
{
    /* An outsider is refused even for legal steps, and the refusal does not
     * tell it what state the patient's case is in. */
    for (size_t i = 0; i < NLEGAL; i++) {
        char err[256] = "";
        cr_assert_eq(ml_case_referral_check(s_legal[i].from, s_legal[i].to, OTHER, err, sizeof err),
                     ML_EDENIED);
        cr_assert(strstr(err, "node has no part in this case"), "%s", err);
        for (int s = 0; s < NSTATES; s++)
            cr_assert_null(strstr(err, s_names[s]), "%s", err);
    }
    /* A party value outside the enum is an outsider too. */
    cr_assert_eq(ml_case_referral_check(R(SENT), R(DELIVERED), 4, NULL, 0), ML_EDENIED);
    cr_assert_eq(ml_case_referral_check(R(SENT), R(DELIVERED), -1, NULL, 0), ML_EDENIED);
}

Test(cases, bad_target_states_say_so)
{
    char err[256];
    ml_case_referral_check(R(DELIVERED), R(SENT), TARGET, err, sizeof err);
    cr_assert_str_eq(err, "illegal transition: case is REFERRAL_DELIVERED, REFERRAL_SENT is only "
                          "the state a case is opened in");
    ml_case_referral_check(R(DELIVERED), UNSPEC, TARGET, err, sizeof err);
    cr_assert_str_eq(err, "illegal transition: case is REFERRAL_DELIVERED, "
                          "REFERRAL_STATUS_UNSPECIFIED is not a state a case can be set to");
    ml_case_referral_check(R(DELIVERED), 42, TARGET, err, sizeof err);
    cr_assert_str_eq(err, "illegal transition: case is REFERRAL_DELIVERED, unknown state 42 is "
                          "not a state a case can be set to");
    ml_case_referral_check(UNSPEC, R(ACCEPTED), TARGET, err, sizeof err);
    cr_assert_str_eq(err, "illegal transition: case is REFERRAL_STATUS_UNSPECIFIED, which is not "
                          "a state a case can be in; REFERRAL_ACCEPTED is not allowed from it");
}

Test(cases, error_buffer_edges)
{
    /* No buffer, a zero-length one and a short one: nothing written past
     * the end, and a short one is still a terminated string. */
    cr_assert_eq(ml_case_referral_check(R(ARRIVED), R(ACCEPTED), TARGET, NULL, 0), ML_EDENIED);
    char tiny[8];
    memset(tiny, 'x', sizeof tiny);
    cr_assert_eq(ml_case_referral_check(R(ARRIVED), R(ACCEPTED), TARGET, tiny, 0), ML_EDENIED);
    cr_assert_eq(tiny[0], 'x');
    cr_assert_eq(ml_case_referral_check(R(ARRIVED), R(ACCEPTED), TARGET, tiny, sizeof tiny),
                 ML_EDENIED);
    cr_assert_eq(strlen(tiny), sizeof tiny - 1);
}

Test(cases, fhir_task_status)
{
    /* As in the table of docs/workflows.md. */
    static const char *const want[NSTATES] = {
        [R(SENT)] = "requested",       [R(DELIVERED)] = "received",  [R(ACCEPTED)] = "accepted",
        [R(REJECTED)] = "rejected",    [R(REDIRECTED)] = "received", [R(SCHEDULED)] = "ready",
        [R(ARRIVED)] = "in-progress",  [R(NO_SHOW)] = "on-hold",     [R(ADMITTED)] = "in-progress",
        [R(DISCHARGED)] = "completed", [R(CLOSED)] = "completed",    [R(CANCELLED)] = "cancelled",
    };
    /* The FHIR R4 Task.status value set. */
    static const char *const fhir[] = {
        "draft",     "requested",   "received", "accepted",  "rejected", "ready",
        "cancelled", "in-progress", "on-hold",  "completed", "failed",   "entered-in-error",
    };
    for (int s = R(SENT); s < NSTATES; s++) {
        const char *got = ml_case_referral_fhir_status(s);
        cr_assert_not_null(got);
        cr_assert(got[0], "%s has no Task.status", s_names[s]);
        cr_assert_str_eq(got, want[s], "%s", s_names[s]);
        int valid = 0;
        for (size_t i = 0; i < sizeof fhir / sizeof fhir[0]; i++)
            valid |= strcmp(got, fhir[i]) == 0;
        cr_assert(valid, "%s -> %s is not a FHIR R4 Task.status", s_names[s], got);
    }
    cr_assert_str_eq(ml_case_referral_fhir_status(UNSPEC), "");
    cr_assert_str_eq(ml_case_referral_fhir_status(-1), "");
    cr_assert_str_eq(ml_case_referral_fhir_status(NSTATES), "");
}
