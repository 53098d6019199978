/* The three case lifecycles of broker/cases.h (upward referral, imaging
 * consult, rehab down-transfer), stated a second time here as plain lists of
 * legal (from, to, party) triples and checked against ml_case_check for
 * every combination of states and parties, so that a slip in either
 * statement shows up as a disagreement. Also the messages that do not move a
 * case (ml_case_check_message), the sentences a refused step gets, the
 * terminal states, ranks, state and kind names and their parsing, and the
 * FHIR Task.status mapping of docs/workflows.md. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>

#include "cases.h"
#include "ml_common.h"
#include "medlink/v1/envelope.pb-c.h"
#include "medlink/v1/imaging.pb-c.h"
#include "medlink/v1/referral.pb-c.h"
#include "medlink/v1/transfer.pb-c.h"

#define R(x) MEDLINK__V1__REFERRAL_STATUS__REFERRAL_##x
#define I(x) MEDLINK__V1__IMAGING_STATUS__IMAGING_##x
#define D(x) MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_##x
#define K(x) MEDLINK__V1__KIND__KIND_##x
#define UNSPEC 0
#define BROKER ML_PARTY_BROKER
#define OPENER ML_PARTY_OPENER
#define REFERRER ML_PARTY_REFERRER
#define TARGET ML_PARTY_TARGET
#define OTHER ML_PARTY_OTHER

/* The walks go a little beyond each enum on both sides so that values
 * outside it are covered too. */
#define FIRST (-2)
#define BEYOND 2

#define N(a) (sizeof(a) / sizeof((a)[0]))

typedef struct {
    int from, to, party;
} triple_t;

/* ---- the lifecycles, written out from the tables in cases.h ----------- */

/* Upward referral: everything that is allowed, and nothing else is. */
static const triple_t s_referral_legal[] = {
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
    /* nobody decided in time: the broker hands it on (deadline fallback) */
    {R(SENT), R(REDIRECTED), BROKER},
    {R(DELIVERED), R(REDIRECTED), BROKER},
    {R(REDIRECTED), R(REDIRECTED), BROKER},
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

/* Imaging consult. */
static const triple_t s_imaging_legal[] = {
    /* a reading centre's agent acked it */
    {I(REQUESTED), I(ASSIGNED), BROKER},
    /* every object arrived and was verified */
    {I(REQUESTED), I(STUDY_RECEIVED), TARGET},
    {I(ASSIGNED), I(STUDY_RECEIVED), TARGET},
    /* the report, and amended reports */
    {I(STUDY_RECEIVED), I(REPORTED), TARGET},
    {I(REPORTED), I(REPORTED), TARGET},
    /* the clinic has taken the report; either end may close */
    {I(REPORTED), I(CLOSED), OPENER},
    {I(REPORTED), I(CLOSED), TARGET},
    /* the reading centre cannot read it */
    {I(REQUESTED), I(REJECTED), TARGET},
    {I(ASSIGNED), I(REJECTED), TARGET},
    {I(STUDY_RECEIVED), I(REJECTED), TARGET},
    /* the requesting clinic withdraws it */
    {I(REQUESTED), I(CANCELLED), OPENER},
    {I(ASSIGNED), I(CANCELLED), OPENER},
    {I(STUDY_RECEIVED), I(CANCELLED), OPENER},
};

/* Rehab down-transfer. */
static const triple_t s_down_legal[] = {
    /* the receiving clinic decides */
    {D(OFFERED), D(ACCEPTED), TARGET},
    {D(OFFERED), D(DECLINED), TARGET},
    /* the discharging hospital withdraws it before arrival */
    {D(OFFERED), D(CANCELLED), OPENER},
    {D(ACCEPTED), D(CANCELLED), OPENER},
    /* the patient is at the clinic; follow-ups; done */
    {D(ACCEPTED), D(ARRIVED), TARGET},
    {D(ARRIVED), D(FOLLOW_UP), TARGET},
    {D(FOLLOW_UP), D(FOLLOW_UP), TARGET},
    {D(ARRIVED), D(COMPLETED), TARGET},
    {D(FOLLOW_UP), D(COMPLETED), TARGET},
    /* a linked Referral sent the patient back up */
    {D(ARRIVED), D(RE_REFERRED), BROKER},
    {D(FOLLOW_UP), D(RE_REFERRED), BROKER},
};

static const char *const s_referral_names[] = {
    "REFERRAL_STATUS_UNSPECIFIED", "REFERRAL_SENT",       "REFERRAL_DELIVERED",
    "REFERRAL_ACCEPTED",           "REFERRAL_REJECTED",   "REFERRAL_REDIRECTED",
    "REFERRAL_SCHEDULED",          "REFERRAL_ARRIVED",    "REFERRAL_NO_SHOW",
    "REFERRAL_ADMITTED",           "REFERRAL_DISCHARGED", "REFERRAL_CLOSED",
    "REFERRAL_CANCELLED",
};
static const char *const s_imaging_names[] = {
    "IMAGING_STATUS_UNSPECIFIED", "IMAGING_REQUESTED", "IMAGING_ASSIGNED",
    "IMAGING_STUDY_RECEIVED",     "IMAGING_REPORTED",  "IMAGING_REJECTED",
    "IMAGING_CANCELLED",          "IMAGING_CLOSED",
};
static const char *const s_down_names[] = {
    "DOWN_TRANSFER_STATUS_UNSPECIFIED", "DOWN_TRANSFER_OFFERED",     "DOWN_TRANSFER_ACCEPTED",
    "DOWN_TRANSFER_DECLINED",           "DOWN_TRANSFER_ARRIVED",     "DOWN_TRANSFER_FOLLOW_UP",
    "DOWN_TRANSFER_COMPLETED",          "DOWN_TRANSFER_RE_REFERRED", "DOWN_TRANSFER_CANCELLED",
};

/* Who may set each state, in the words of the refusal. */
static const char *s_referral_who(int to)
{
    switch (to) {
    case R(DELIVERED):
        return "may only be set by the broker (on delivery)";
    case R(REDIRECTED):
        return "may only be set by the receiving hospital or the broker (deadline fallback)";
    case R(CLOSED):
        return "may only be set by the receiving hospital or the referring clinic";
    case R(CANCELLED):
        return "may only be set by the referring clinic";
    default:
        return "may only be set by the receiving hospital";
    }
}

static const char *s_imaging_who(int to)
{
    switch (to) {
    case I(ASSIGNED):
        return "may only be set by the broker (on delivery)";
    case I(CLOSED):
        return "may only be set by the reading centre or the requesting clinic";
    case I(CANCELLED):
        return "may only be set by the requesting clinic";
    default:
        return "may only be set by the reading centre";
    }
}

static const char *s_down_who(int to)
{
    switch (to) {
    case D(RE_REFERRED):
        return "may only be set by the broker (from a linked referral)";
    case D(CANCELLED):
        return "may only be set by the discharging hospital";
    default:
        return "may only be set by the receiving clinic";
    }
}

/* Terminal states, ranks and FHIR Task.status, as in cases.h and the tables
 * of docs/workflows.md. */
static const int s_referral_terminal[] = {R(REJECTED), R(CANCELLED), R(CLOSED)};
static const int s_imaging_terminal[] = {I(REJECTED), I(CANCELLED), I(CLOSED)};
static const int s_down_terminal[] = {D(DECLINED), D(COMPLETED), D(RE_REFERRED), D(CANCELLED)};

static const int s_referral_rank[] = {
    [R(SENT)] = 1,       [R(DELIVERED)] = 2, [R(REDIRECTED)] = 2, [R(ACCEPTED)] = 3,
    [R(SCHEDULED)] = 4,  [R(ARRIVED)] = 5,   [R(NO_SHOW)] = 5,    [R(ADMITTED)] = 6,
    [R(DISCHARGED)] = 7, [R(CLOSED)] = 8,    [R(REJECTED)] = 8,   [R(CANCELLED)] = 8,
};
static const int s_imaging_rank[] = {
    [I(REQUESTED)] = 1, [I(ASSIGNED)] = 2, [I(STUDY_RECEIVED)] = 3, [I(REPORTED)] = 4,
    [I(CLOSED)] = 5,    [I(REJECTED)] = 5, [I(CANCELLED)] = 5,
};
static const int s_down_rank[] = {
    [D(OFFERED)] = 1,   [D(ACCEPTED)] = 2, [D(ARRIVED)] = 3,     [D(FOLLOW_UP)] = 4,
    [D(COMPLETED)] = 5, [D(DECLINED)] = 5, [D(RE_REFERRED)] = 5, [D(CANCELLED)] = 5,
};

static const char *const s_referral_fhir[] = {
    [R(SENT)] = "requested",       [R(DELIVERED)] = "received",  [R(ACCEPTED)] = "accepted",
    [R(REJECTED)] = "rejected",    [R(REDIRECTED)] = "received", [R(SCHEDULED)] = "ready",
    [R(ARRIVED)] = "in-progress",  [R(NO_SHOW)] = "on-hold",     [R(ADMITTED)] = "in-progress",
    [R(DISCHARGED)] = "completed", [R(CLOSED)] = "completed",    [R(CANCELLED)] = "cancelled",
};
static const char *const s_imaging_fhir[] = {
    [I(REQUESTED)] = "requested", [I(ASSIGNED)] = "received", [I(STUDY_RECEIVED)] = "in-progress",
    [I(REPORTED)] = "completed",  [I(REJECTED)] = "rejected", [I(CANCELLED)] = "cancelled",
    [I(CLOSED)] = "completed",
};
static const char *const s_down_fhir[] = {
    [D(OFFERED)] = "requested",   [D(ACCEPTED)] = "accepted",     [D(DECLINED)] = "rejected",
    [D(ARRIVED)] = "in-progress", [D(FOLLOW_UP)] = "in-progress", [D(COMPLETED)] = "completed",
    [D(RE_REFERRED)] = "failed",  [D(CANCELLED)] = "cancelled",
};

/* One kind of case, as this suite states it. */
typedef struct {
    int kind;
    const char *name;
    const ProtobufCEnumDescriptor *enumd;
    int initial;
    const triple_t *legal;
    size_t nlegal;
    const char *const *names; /* [nstates], index = enum value */
    int nstates;
    const char *(*who)(int to);
    const int *terminal;
    size_t nterminal;
    const int *rank;         /* [nstates] */
    const char *const *fhir; /* [nstates] */
} life_t;

static const life_t s_lives[] = {
    {ML_CASE_REFERRAL, "referral", &medlink__v1__referral_status__descriptor, R(SENT),
     s_referral_legal, N(s_referral_legal), s_referral_names, (int)N(s_referral_names),
     s_referral_who, s_referral_terminal, N(s_referral_terminal), s_referral_rank, s_referral_fhir},
    {ML_CASE_IMAGING, "imaging", &medlink__v1__imaging_status__descriptor, I(REQUESTED),
     s_imaging_legal, N(s_imaging_legal), s_imaging_names, (int)N(s_imaging_names), s_imaging_who,
     s_imaging_terminal, N(s_imaging_terminal), s_imaging_rank, s_imaging_fhir},
    {ML_CASE_DOWN_TRANSFER, "down_transfer", &medlink__v1__down_transfer_status__descriptor,
     D(OFFERED), s_down_legal, N(s_down_legal), s_down_names, (int)N(s_down_names), s_down_who,
     s_down_terminal, N(s_down_terminal), s_down_rank, s_down_fhir},
};

static int s_expect_legal(const life_t *l, int from, int to, int party)
{
    for (size_t i = 0; i < l->nlegal; i++)
        if (l->legal[i].from == from && l->legal[i].to == to && l->legal[i].party == party)
            return 1;
    return 0;
}

/* 1 if some party may make from -> to (so a refusal is about the party). */
static int s_pair_exists(const life_t *l, int from, int to)
{
    for (int p = BROKER; p <= OTHER; p++)
        if (s_expect_legal(l, from, to, p))
            return 1;
    return 0;
}

static int s_known(const life_t *l, int state)
{
    return state >= 0 && state < l->nstates;
}

static int s_expect_terminal(const life_t *l, int state)
{
    for (size_t i = 0; i < l->nterminal; i++)
        if (l->terminal[i] == state)
            return 1;
    return 0;
}

/* ---- every kind -------------------------------------------------------- */

Test(cases, enums_have_the_states_this_suite_knows)
{
    /* A new status value must be placed in its lifecycle (cases.c) and here
     * before this passes again. */
    for (size_t k = 0; k < N(s_lives); k++) {
        const life_t *l = &s_lives[k];
        cr_assert_eq((int)l->enumd->n_values, l->nstates, "%s", l->name);
        for (int s = 0; s < l->nstates; s++)
            cr_assert_str_eq(ml_case_state_name(l->kind, s), l->names[s]);
        cr_assert_str_eq(ml_case_state_name(l->kind, -1), "UNKNOWN");
        cr_assert_str_eq(ml_case_state_name(l->kind, l->nstates), "UNKNOWN");
        cr_assert_str_eq(ml_case_state_name(l->kind, 1000), "UNKNOWN");
    }
    cr_assert_str_eq(ml_case_state_name(ML_CASE_NONE, 1), "UNKNOWN");
    cr_assert_str_eq(ml_case_state_name(ML_CASE_KIND_COUNT, 1), "UNKNOWN");
    for (int s = FIRST; s < 15; s++)
        cr_assert_str_eq(ml_case_referral_state_name(s), ml_case_state_name(ML_CASE_REFERRAL, s));
}

Test(cases, every_triple_matches_the_written_lifecycle)
{
    for (size_t k = 0; k < N(s_lives); k++) {
        const life_t *l = &s_lives[k];
        int legal = 0;
        for (int from = FIRST; from < l->nstates + BEYOND; from++) {
            for (int to = FIRST; to < l->nstates + BEYOND; to++) {
                for (int party = BROKER; party <= OTHER; party++) {
                    char err[256] = "untouched";
                    int rc = ml_case_check(l->kind, from, to, party, err, sizeof err);
                    int want = s_expect_legal(l, from, to, party);
                    cr_assert_eq(rc, want ? 0 : ML_EDENIED, "%s: %d -> %d by party %d: rc %d (%s)",
                                 l->name, from, to, party, rc, err);
                    if (want) {
                        legal++;
                        continue;
                    }
                    cr_assert(err[0] && strcmp(err, "untouched") != 0,
                              "%s %d -> %d by %d: no reason", l->name, from, to, party);
                    if (party == OTHER) {
                        cr_assert(strstr(err, "node has no part in this case"), "%s", err);
                        continue;
                    }
                    /* Every refusal to a party of the case names both states. */
                    if (s_known(l, from))
                        cr_assert(strstr(err, l->names[from]), "%d -> %d: %s", from, to, err);
                    if (s_known(l, to))
                        cr_assert(strstr(err, l->names[to]), "%d -> %d: %s", from, to, err);
                    if (s_pair_exists(l, from, to))
                        cr_assert(strstr(err, l->who(to)), "%d -> %d by %d: %s", from, to, party,
                                  err);
                    else
                        cr_assert(strncmp(err, "illegal transition: case is ", 28) == 0, "%s", err);
                }
            }
        }
        cr_assert_eq(legal, (int)l->nlegal, "%s", l->name);
    }
}

Test(cases, referral_wrappers_agree)
{
    for (int from = FIRST; from < 15; from++) {
        cr_assert_eq(ml_case_referral_terminal(from), ml_case_terminal(ML_CASE_REFERRAL, from));
        cr_assert_str_eq(ml_case_referral_fhir_status(from),
                         ml_case_fhir_status(ML_CASE_REFERRAL, from));
        for (int to = FIRST; to < 15; to++) {
            for (int party = -1; party <= OTHER + 1; party++) {
                char a[256] = "", b[256] = "";
                cr_assert_eq(ml_case_referral_check(from, to, party, a, sizeof a),
                             ml_case_check(ML_CASE_REFERRAL, from, to, party, b, sizeof b));
                cr_assert_str_eq(a, b);
            }
        }
    }
}

Test(cases, happy_paths)
{
    static const int ref[] = {R(SENT),    R(DELIVERED), R(ACCEPTED),   R(SCHEDULED),
                              R(ARRIVED), R(ADMITTED),  R(DISCHARGED), R(CLOSED)};
    static const int ref_by[] = {BROKER, TARGET, TARGET, TARGET, TARGET, TARGET, REFERRER};
    static const int img[] = {I(REQUESTED), I(ASSIGNED), I(STUDY_RECEIVED),
                              I(REPORTED),  I(REPORTED), I(CLOSED)};
    static const int img_by[] = {BROKER, TARGET, TARGET, TARGET, OPENER};
    static const int down[] = {D(OFFERED),   D(ACCEPTED),  D(ARRIVED),
                               D(FOLLOW_UP), D(FOLLOW_UP), D(COMPLETED)};
    static const int down_by[] = {TARGET, TARGET, TARGET, TARGET, TARGET};
    static const struct {
        int kind;
        const int *path, *by;
        size_t n;
    } paths[] = {
        {ML_CASE_REFERRAL, ref, ref_by, N(ref)},
        {ML_CASE_IMAGING, img, img_by, N(img)},
        {ML_CASE_DOWN_TRANSFER, down, down_by, N(down)},
    };
    for (size_t k = 0; k < N(paths); k++) {
        char err[256] = "";
        cr_assert_eq(paths[k].path[0], ml_case_initial_state(paths[k].kind));
        for (size_t i = 0; i + 1 < paths[k].n; i++) {
            cr_assert_eq(ml_case_check(paths[k].kind, paths[k].path[i], paths[k].path[i + 1],
                                       paths[k].by[i], err, sizeof err),
                         0, "kind %d step %zu: %s", paths[k].kind, i, err);
            cr_assert_eq(ml_case_terminal(paths[k].kind, paths[k].path[i]), 0);
        }
        cr_assert_eq(ml_case_terminal(paths[k].kind, paths[k].path[paths[k].n - 1]), 1);
    }
}

Test(cases, redirect_paths)
{
    /* The first hospital hands the patient on; the second one receives the
     * referral through the broker, then accepts it. */
    cr_assert_eq(ml_case_referral_check(R(DELIVERED), R(REDIRECTED), TARGET, NULL, 0), 0);
    cr_assert_eq(ml_case_referral_check(R(REDIRECTED), R(DELIVERED), BROKER, NULL, 0), 0);
    cr_assert_eq(ml_case_referral_check(R(DELIVERED), R(ACCEPTED), TARGET, NULL, 0), 0);
    /* Nobody decided in time: the broker redirects to the fallback, and
     * again if the fallback does not decide either. */
    cr_assert_eq(ml_case_check(ML_CASE_REFERRAL, R(SENT), R(REDIRECTED), BROKER, NULL, 0), 0);
    cr_assert_eq(ml_case_check(ML_CASE_REFERRAL, R(REDIRECTED), R(REDIRECTED), BROKER, NULL, 0), 0);
    /* Not once the hospital has decided. */
    char err[256];
    cr_assert_eq(
        ml_case_check(ML_CASE_REFERRAL, R(ACCEPTED), R(REDIRECTED), BROKER, err, sizeof err),
        ML_EDENIED);
    cr_assert_str_eq(err, "illegal transition: case is REFERRAL_ACCEPTED, REFERRAL_REDIRECTED is "
                          "not allowed from it");
}

Test(cases, re_referral_path)
{
    /* The patient got worse at the clinic and a linked Referral went up. */
    cr_assert_eq(
        ml_case_check(ML_CASE_DOWN_TRANSFER, D(FOLLOW_UP), D(RE_REFERRED), BROKER, NULL, 0), 0);
    cr_assert_eq(ml_case_terminal(ML_CASE_DOWN_TRANSFER, D(RE_REFERRED)), 1);
    char err[256];
    cr_assert_eq(
        ml_case_check(ML_CASE_DOWN_TRANSFER, D(ARRIVED), D(RE_REFERRED), TARGET, err, sizeof err),
        ML_EDENIED);
    cr_assert_str_eq(err, "DOWN_TRANSFER_RE_REFERRED may only be set by the broker (from a linked "
                          "referral) (case is DOWN_TRANSFER_ARRIVED)");
    /* Before the patient is there, there is nothing to re-refer. */
    cr_assert_eq(
        ml_case_check(ML_CASE_DOWN_TRANSFER, D(ACCEPTED), D(RE_REFERRED), BROKER, err, sizeof err),
        ML_EDENIED);
    cr_assert_str_eq(err, "illegal transition: case is DOWN_TRANSFER_ACCEPTED, "
                          "DOWN_TRANSFER_RE_REFERRED is not allowed from it");
}

Test(cases, illegal_step_sentences)
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
    cr_assert_eq(ml_case_check(ML_CASE_IMAGING, I(REPORTED), I(CANCELLED), OPENER, err, sizeof err),
                 ML_EDENIED);
    cr_assert_str_eq(err, "illegal transition: case is IMAGING_REPORTED, IMAGING_CANCELLED is not "
                          "allowed from it");
    cr_assert_eq(
        ml_case_check(ML_CASE_DOWN_TRANSFER, D(OFFERED), D(ARRIVED), TARGET, err, sizeof err),
        ML_EDENIED);
    cr_assert_str_eq(err, "illegal transition: case is DOWN_TRANSFER_OFFERED, "
                          "DOWN_TRANSFER_ARRIVED is not allowed from it");
}

Test(cases, terminal_states)
{
    for (size_t k = 0; k < N(s_lives); k++) {
        const life_t *l = &s_lives[k];
        for (int s = FIRST; s < l->nstates + BEYOND; s++)
            cr_assert_eq(ml_case_terminal(l->kind, s), s_expect_terminal(l, s), "%s state %d",
                         l->name, s);
        for (size_t i = 0; i < l->nterminal; i++) {
            int from = l->terminal[i];
            for (int to = FIRST; to < l->nstates + BEYOND; to++) {
                for (int party = BROKER; party <= TARGET; party++) {
                    char err[256] = "";
                    cr_assert_eq(ml_case_check(l->kind, from, to, party, err, sizeof err),
                                 ML_EDENIED);
                    char want[80];
                    snprintf(want, sizeof want, "case is %s, which is final", l->names[from]);
                    cr_assert(strstr(err, want), "%s", err);
                }
            }
        }
    }
    cr_assert_eq(ml_case_terminal(ML_CASE_NONE, 1), 0);
    cr_assert_eq(ml_case_terminal(ML_CASE_KIND_COUNT, 1), 0);
    char err[256];
    ml_case_referral_check(R(CLOSED), R(SCHEDULED), TARGET, err, sizeof err);
    cr_assert_str_eq(err, "illegal transition: case is REFERRAL_CLOSED, which is final; "
                          "REFERRAL_SCHEDULED is not allowed from it");
    ml_case_check(ML_CASE_DOWN_TRANSFER, D(COMPLETED), D(FOLLOW_UP), TARGET, err, sizeof err);
    cr_assert_str_eq(err, "illegal transition: case is DOWN_TRANSFER_COMPLETED, which is final; "
                          "DOWN_TRANSFER_FOLLOW_UP is not allowed from it");
}

Test(cases, no_dead_ends_and_every_state_reachable)
{
    /* Every state that is not terminal has a way out, and every state can
     * be reached from the initial one: no traps and no orphans. */
    for (size_t k = 0; k < N(s_lives); k++) {
        const life_t *l = &s_lives[k];
        for (int s = 1; s < l->nstates; s++) {
            int out = 0;
            for (int to = 1; to < l->nstates; to++)
                for (int p = BROKER; p <= TARGET; p++)
                    out += ml_case_check(l->kind, s, to, p, NULL, 0) == 0;
            cr_assert_eq(out > 0, !ml_case_terminal(l->kind, s), "state %s", l->names[s]);
        }
        int seen[16] = {0};
        cr_assert_leq(l->nstates, 16);
        seen[l->initial] = 1;
        for (int changed = 1; changed;) {
            changed = 0;
            for (int from = 1; from < l->nstates; from++)
                for (int to = 1; to < l->nstates; to++)
                    for (int p = BROKER; p <= TARGET; p++)
                        if (seen[from] && !seen[to] &&
                            ml_case_check(l->kind, from, to, p, NULL, 0) == 0)
                            seen[to] = changed = 1;
        }
        for (int s = 1; s < l->nstates; s++)
            cr_assert(seen[s], "%s unreachable", l->names[s]);
    }
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
    ml_case_referral_check(R(DELIVERED), R(REDIRECTED), REFERRER, err, sizeof err);
    cr_assert_str_eq(err, "REFERRAL_REDIRECTED may only be set by the receiving hospital or the "
                          "broker (deadline fallback) (case is REFERRAL_DELIVERED)");

    ml_case_check(ML_CASE_IMAGING, I(REQUESTED), I(ASSIGNED), TARGET, err, sizeof err);
    cr_assert_str_eq(err, "IMAGING_ASSIGNED may only be set by the broker (on delivery) (case is "
                          "IMAGING_REQUESTED)");
    ml_case_check(ML_CASE_IMAGING, I(STUDY_RECEIVED), I(REPORTED), OPENER, err, sizeof err);
    cr_assert_str_eq(err, "IMAGING_REPORTED may only be set by the reading centre (case is "
                          "IMAGING_STUDY_RECEIVED)");
    ml_case_check(ML_CASE_IMAGING, I(ASSIGNED), I(CANCELLED), TARGET, err, sizeof err);
    cr_assert_str_eq(err, "IMAGING_CANCELLED may only be set by the requesting clinic (case is "
                          "IMAGING_ASSIGNED)");

    ml_case_check(ML_CASE_DOWN_TRANSFER, D(OFFERED), D(ACCEPTED), OPENER, err, sizeof err);
    cr_assert_str_eq(err, "DOWN_TRANSFER_ACCEPTED may only be set by the receiving clinic (case is "
                          "DOWN_TRANSFER_OFFERED)");
    ml_case_check(ML_CASE_DOWN_TRANSFER, D(ACCEPTED), D(CANCELLED), TARGET, err, sizeof err);
    cr_assert_str_eq(err, "DOWN_TRANSFER_CANCELLED may only be set by the discharging hospital "
                          "(case is DOWN_TRANSFER_ACCEPTED)");
}

/* 1 if s contains the name of any state of any kind. */
static int s_names_a_state(const char *s)
{
    for (size_t k = 0; k < N(s_lives); k++)
        for (int i = 0; i < s_lives[k].nstates; i++)
            if (strstr(s, s_lives[k].names[i]))
                return 1;
    return 0;
}

Test(cases, other_nodes_never_and_learn_nothing)
{
    /* An outsider is refused even for legal steps, and the refusal tells it
     * neither the state of the patient's case nor what kind of case it is:
     * the sentence is the same for every kind and state. */
    char first[256] = "";
    ml_case_check(ML_CASE_REFERRAL, R(SENT), R(DELIVERED), OTHER, first, sizeof first);
    cr_assert(strstr(first, "node has no part in this case"), "%s", first);
    for (size_t k = 0; k < N(s_lives); k++) {
        const life_t *l = &s_lives[k];
        for (size_t i = 0; i < l->nlegal; i++) {
            char err[256] = "";
            cr_assert_eq(
                ml_case_check(l->kind, l->legal[i].from, l->legal[i].to, OTHER, err, sizeof err),
                ML_EDENIED);
            cr_assert_str_eq(err, first);
        }
        for (int s = FIRST; s < l->nstates + BEYOND; s++) {
            char err[256] = "";
            cr_assert_eq(ml_case_check(l->kind, s, s + 1, OTHER, err, sizeof err), ML_EDENIED);
            cr_assert_str_eq(err, first);
        }
    }
    cr_assert(!s_names_a_state(first), "%s", first);
    cr_assert_null(strstr(first, "hospital"), "%s", first);
    cr_assert_null(strstr(first, "clinic"), "%s", first);
    cr_assert_null(strstr(first, "reading"), "%s", first);
    /* Also for the messages that do not move a case. */
    for (int s = FIRST; s < 10; s++) {
        char err[256] = "";
        cr_assert_eq(
            ml_case_check_message(ML_CASE_IMAGING, s, K(IMAGING_CHUNK), OTHER, err, sizeof err),
            ML_EDENIED);
        cr_assert_str_eq(err, first);
        cr_assert_eq(
            ml_case_check_message(ML_CASE_IMAGING, s, K(IMAGING_RESEND), OTHER, err, sizeof err),
            ML_EDENIED);
        cr_assert_str_eq(err, first);
    }
    /* A party value outside the enum is an outsider too. */
    char err[256];
    cr_assert_eq(ml_case_referral_check(R(SENT), R(DELIVERED), 4, err, sizeof err), ML_EDENIED);
    cr_assert_str_eq(err, first);
    cr_assert_eq(ml_case_referral_check(R(SENT), R(DELIVERED), -1, NULL, 0), ML_EDENIED);
    cr_assert_eq(ml_case_check(ML_CASE_IMAGING, I(REQUESTED), I(ASSIGNED), 9, NULL, 0), ML_EDENIED);
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
    ml_case_check(ML_CASE_IMAGING, I(ASSIGNED), I(REQUESTED), BROKER, err, sizeof err);
    cr_assert_str_eq(err, "illegal transition: case is IMAGING_ASSIGNED, IMAGING_REQUESTED is "
                          "only the state a case is opened in");
    ml_case_check(ML_CASE_DOWN_TRANSFER, D(ARRIVED), 9, TARGET, err, sizeof err);
    cr_assert_str_eq(err, "illegal transition: case is DOWN_TRANSFER_ARRIVED, unknown state 9 is "
                          "not a state a case can be set to");
    /* A state of another kind is not a state of this one. */
    ml_case_check(ML_CASE_IMAGING, I(CLOSED), R(ADMITTED), TARGET, err, sizeof err);
    cr_assert_str_eq(err, "illegal transition: case is IMAGING_CLOSED, which is final; unknown "
                          "state 9 is not allowed from it");
}

Test(cases, bad_case_kinds_refused)
{
    char err[256] = "";
    static const int bad[] = {ML_CASE_NONE, ML_CASE_KIND_COUNT, -1, 99};
    for (size_t i = 0; i < N(bad); i++) {
        for (int party = BROKER; party <= TARGET; party++) {
            cr_assert_eq(ml_case_check(bad[i], 1, 2, party, err, sizeof err), ML_EDENIED);
            cr_assert(strstr(err, "is not a kind of case"), "%s", err);
            cr_assert_eq(ml_case_check_message(bad[i], 1, K(IMAGING_CHUNK), party, err, sizeof err),
                         ML_EDENIED);
            cr_assert(strstr(err, "is not a kind of case"), "%s", err);
        }
        cr_assert_eq(ml_case_rank(bad[i], 1), 0);
        cr_assert_str_eq(ml_case_fhir_status(bad[i], 1), "");
        cr_assert_eq(ml_case_initial_state(bad[i]), 0);
        cr_assert_str_eq(ml_case_kind_name(bad[i]), "");
        int s = -7;
        cr_assert_eq(ml_case_state_parse(bad[i], "SENT", &s), ML_EINVAL);
        cr_assert_eq(s, -7);
    }
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
    memset(tiny, 'x', sizeof tiny);
    cr_assert_eq(ml_case_check_message(ML_CASE_IMAGING, I(REPORTED), K(IMAGING_CHUNK), OPENER, tiny,
                                       sizeof tiny),
                 ML_EDENIED);
    cr_assert_eq(strlen(tiny), sizeof tiny - 1);
    cr_assert_eq(
        ml_case_check_message(ML_CASE_IMAGING, I(REPORTED), K(IMAGING_CHUNK), OPENER, NULL, 0),
        ML_EDENIED);
}

/* ---- messages that do not move a case --------------------------------- */

Test(cases, imaging_chunk_and_resend_by_state_and_party)
{
    /* ImagingChunk from the requesting clinic and ImagingResend from the
     * reading centre, while the study is still being sent. */
    static const struct {
        int msg, party;
    } allowed[] = {{K(IMAGING_CHUNK), OPENER}, {K(IMAGING_RESEND), TARGET}};
    const char *names[] = {"IMAGING_CHUNK", "IMAGING_RESEND"};
    const char *who[] = {"may only be sent by the requesting clinic",
                         "may only be sent by the reading centre"};
    for (size_t m = 0; m < N(allowed); m++) {
        for (int s = FIRST; s < 10; s++) {
            for (int party = BROKER; party <= OTHER; party++) {
                char err[256] = "untouched";
                int in_state = s == I(REQUESTED) || s == I(ASSIGNED);
                int want = in_state && party == allowed[m].party;
                int rc = ml_case_check_message(ML_CASE_IMAGING, s, allowed[m].msg, party, err,
                                               sizeof err);
                cr_assert_eq(rc, want ? 0 : ML_EDENIED, "%s in %d by %d: %s", names[m], s, party,
                             err);
                if (want || party == OTHER)
                    continue;
                cr_assert(strstr(err, names[m]), "%s", err);
                if (s >= 0 && s < (int)N(s_imaging_names))
                    cr_assert(strstr(err, s_imaging_names[s]), "%s", err);
                if (in_state)
                    cr_assert(strstr(err, who[m]), "%s", err);
                else
                    cr_assert(strncmp(err, "illegal message: case is ", 25) == 0, "%s", err);
            }
        }
    }
    char err[256];
    ml_case_check_message(ML_CASE_IMAGING, I(REPORTED), K(IMAGING_CHUNK), OPENER, err, sizeof err);
    cr_assert_str_eq(err, "illegal message: case is IMAGING_REPORTED, IMAGING_CHUNK is only "
                          "accepted while it is IMAGING_REQUESTED or IMAGING_ASSIGNED");
    ml_case_check_message(ML_CASE_IMAGING, I(ASSIGNED), K(IMAGING_CHUNK), TARGET, err, sizeof err);
    cr_assert_str_eq(err, "IMAGING_CHUNK may only be sent by the requesting clinic (case is "
                          "IMAGING_ASSIGNED)");
    ml_case_check_message(ML_CASE_IMAGING, I(REQUESTED), K(IMAGING_RESEND), OPENER, err,
                          sizeof err);
    cr_assert_str_eq(err, "IMAGING_RESEND may only be sent by the reading centre (case is "
                          "IMAGING_REQUESTED)");
    ml_case_check_message(ML_CASE_IMAGING, UNSPEC, K(IMAGING_RESEND), TARGET, err, sizeof err);
    cr_assert_str_eq(err, "illegal message: case is IMAGING_STATUS_UNSPECIFIED, which is not a "
                          "state a case can be in; IMAGING_RESEND is not accepted in it");
}

Test(cases, other_messages_are_not_checked_here)
{
    /* Every other message kind, for every kind of case: refused with a
     * sentence (not ML_EINVAL), whatever the state and party. */
    const ProtobufCEnumDescriptor *kd = &medlink__v1__kind__descriptor;
    for (size_t k = 0; k < N(s_lives); k++) {
        for (unsigned i = 0; i < kd->n_values; i++) {
            int msg = kd->values[i].value;
            int stateless = s_lives[k].kind == ML_CASE_IMAGING &&
                            (msg == K(IMAGING_CHUNK) || msg == K(IMAGING_RESEND));
            if (stateless)
                continue;
            for (int party = BROKER; party <= TARGET; party++) {
                char err[256] = "";
                cr_assert_eq(ml_case_check_message(s_lives[k].kind, 1, msg, party, err, sizeof err),
                             ML_EDENIED, "%s in a %s case", kd->values[i].name, s_lives[k].name);
                cr_assert(strncmp(err, "illegal message: ", 17) == 0, "%s", err);
            }
        }
    }
    char err[256];
    ml_case_check_message(ML_CASE_IMAGING, I(ASSIGNED), K(IMAGING_UPDATE), TARGET, err, sizeof err);
    cr_assert_str_eq(err, "illegal message: IMAGING_UPDATE changes a case's state and is checked "
                          "as a transition");
    ml_case_check_message(ML_CASE_REFERRAL, R(SENT), K(IMAGING_CHUNK), OPENER, err, sizeof err);
    cr_assert_str_eq(err, "illegal message: IMAGING_CHUNK does not belong to a referral");
    ml_case_check_message(ML_CASE_IMAGING, I(ASSIGNED), K(ESCALATION), BROKER, err, sizeof err);
    cr_assert_str_eq(err, "illegal message: ESCALATION does not belong to an imaging consult");
    ml_case_check_message(ML_CASE_IMAGING, I(ASSIGNED), 77, OPENER, err, sizeof err);
    cr_assert_str_eq(err, "illegal message: message kind 77 does not belong to an imaging consult");
    ml_case_check_message(ML_CASE_IMAGING, I(ASSIGNED), K(UNSPECIFIED), OPENER, err, sizeof err);
    cr_assert_str_eq(err, "illegal message: message kind 0 does not belong to an imaging consult");
}

/* ---- ranks, names, kinds, FHIR ---------------------------------------- */

Test(cases, ranks)
{
    for (size_t k = 0; k < N(s_lives); k++) {
        const life_t *l = &s_lives[k];
        int max = 0;
        for (int s = 1; s < l->nstates; s++)
            max = l->rank[s] > max ? l->rank[s] : max;
        for (int s = FIRST; s < l->nstates + BEYOND; s++) {
            int want = s >= 1 && s < l->nstates ? l->rank[s] : 0;
            cr_assert_eq(ml_case_rank(l->kind, s), want, "%s %d", l->name, s);
        }
        /* The initial state ranks 1, every state of the kind ranks, and the
         * final states rank last. */
        cr_assert_eq(ml_case_rank(l->kind, l->initial), 1);
        for (int s = 1; s < l->nstates; s++)
            cr_assert_gt(ml_case_rank(l->kind, s), 0, "%s", l->names[s]);
        for (size_t i = 0; i < l->nterminal; i++)
            cr_assert_eq(ml_case_rank(l->kind, l->terminal[i]), max, "%s",
                         l->names[l->terminal[i]]);
        /* Each legal step goes forward or stays, except rebooking after a
         * missed appointment, which goes back to SCHEDULED. */
        for (size_t i = 0; i < l->nlegal; i++) {
            const triple_t *t = &l->legal[i];
            if (l->kind == ML_CASE_REFERRAL && t->from == R(NO_SHOW) && t->to == R(SCHEDULED))
                continue;
            cr_assert_geq(ml_case_rank(l->kind, t->to), ml_case_rank(l->kind, t->from), "%s -> %s",
                          l->names[t->from], l->names[t->to]);
        }
    }
}

Test(cases, state_parse)
{
    for (size_t k = 0; k < N(s_lives); k++) {
        const life_t *l = &s_lives[k];
        /* The kind's prefix ("REFERRAL_"...) is what comes before STATUS_. */
        size_t plen = (size_t)(strstr(l->names[0], "STATUS_") - l->names[0]);
        for (int s = 1; s < l->nstates; s++) {
            int got = -1;
            cr_assert_eq(ml_case_state_parse(l->kind, l->names[s], &got), 0, "%s", l->names[s]);
            cr_assert_eq(got, s);
            got = -1;
            cr_assert_eq(ml_case_state_parse(l->kind, l->names[s] + plen, &got), 0, "%s",
                         l->names[s] + plen);
            cr_assert_eq(got, s);
            char lower[64];
            size_t n = strlen(l->names[s]);
            for (size_t i = 0; i <= n; i++)
                lower[i] = (char)(l->names[s][i] >= 'A' && l->names[s][i] <= 'Z'
                                      ? l->names[s][i] - 'A' + 'a'
                                      : l->names[s][i]);
            got = -1;
            cr_assert_eq(ml_case_state_parse(l->kind, lower, &got), 0, "%s", lower);
            cr_assert_eq(got, s);
            got = -1;
            cr_assert_eq(ml_case_state_parse(l->kind, lower + plen, &got), 0, "%s", lower + plen);
            cr_assert_eq(got, s);
        }
        /* UNSPECIFIED is not a state, in either spelling. */
        int got = -7;
        cr_assert_eq(ml_case_state_parse(l->kind, l->names[0], &got), ML_EINVAL);
        cr_assert_eq(ml_case_state_parse(l->kind, l->names[0] + plen, &got), ML_EINVAL);
        cr_assert_eq(ml_case_state_parse(l->kind, "", &got), ML_EINVAL);
        cr_assert_eq(ml_case_state_parse(l->kind, NULL, &got), ML_EINVAL);
        cr_assert_eq(ml_case_state_parse(l->kind, "NOPE", &got), ML_EINVAL);
        cr_assert_eq(got, -7, "left alone on failure");
    }
    int s = -1;
    cr_assert_eq(ml_case_state_parse(ML_CASE_DOWN_TRANSFER, "DOWN_TRANSFER_FOLLOW_UP", &s), 0);
    cr_assert_eq(s, D(FOLLOW_UP));
    s = -1;
    cr_assert_eq(ml_case_state_parse(ML_CASE_DOWN_TRANSFER, "FOLLOW_UP", &s), 0);
    cr_assert_eq(s, D(FOLLOW_UP));
    s = -1;
    cr_assert_eq(ml_case_state_parse(ML_CASE_DOWN_TRANSFER, "follow_up", &s), 0);
    cr_assert_eq(s, D(FOLLOW_UP));
    /* A name is a state of its own kind only. */
    cr_assert_eq(ml_case_state_parse(ML_CASE_IMAGING, "REFERRAL_ACCEPTED", &s), ML_EINVAL);
    cr_assert_eq(ml_case_state_parse(ML_CASE_REFERRAL, "IMAGING_REPORTED", &s), ML_EINVAL);
    cr_assert_eq(ml_case_state_parse(ML_CASE_REFERRAL, "FOLLOW_UP", &s), ML_EINVAL);
    cr_assert_eq(ml_case_state_parse(ML_CASE_DOWN_TRANSFER, "ACCEPTED", &s), 0);
    cr_assert_eq(s, D(ACCEPTED));
    cr_assert_eq(ml_case_state_parse(ML_CASE_REFERRAL, "accepted", &s), 0);
    cr_assert_eq(s, R(ACCEPTED));
}

Test(cases, kind_names_and_parse)
{
    cr_assert_str_eq(ml_case_kind_name(ML_CASE_REFERRAL), "referral");
    cr_assert_str_eq(ml_case_kind_name(ML_CASE_IMAGING), "imaging");
    cr_assert_str_eq(ml_case_kind_name(ML_CASE_DOWN_TRANSFER), "down_transfer");
    cr_assert_str_eq(ml_case_kind_name(ML_CASE_NONE), "");
    cr_assert_str_eq(ml_case_kind_name(ML_CASE_KIND_COUNT), "");
    cr_assert_str_eq(ml_case_kind_name(-1), "");

    static const struct {
        const char *s;
        int kind;
    } good[] = {
        {"referral", ML_CASE_REFERRAL},
        {"REFERRAL", ML_CASE_REFERRAL},
        {"CASE_REFERRAL", ML_CASE_REFERRAL},
        {"imaging", ML_CASE_IMAGING},
        {"Imaging", ML_CASE_IMAGING},
        {"CASE_IMAGING", ML_CASE_IMAGING},
        {"down_transfer", ML_CASE_DOWN_TRANSFER},
        {"down-transfer", ML_CASE_DOWN_TRANSFER},
        {"DOWN_TRANSFER", ML_CASE_DOWN_TRANSFER},
        {"CASE_DOWN_TRANSFER", ML_CASE_DOWN_TRANSFER},
        {"case_down_transfer", ML_CASE_DOWN_TRANSFER},
    };
    for (size_t i = 0; i < N(good); i++) {
        int k = -1;
        cr_assert_eq(ml_case_kind_parse(good[i].s, &k), 0, "%s", good[i].s);
        cr_assert_eq(k, good[i].kind, "%s", good[i].s);
    }
    static const char *const bad[] = {
        "", "none", "CASE_KIND_UNSPECIFIED", "downtransfer", "referrals", "case_", "image"};
    for (size_t i = 0; i < N(bad); i++) {
        int k = -7;
        cr_assert_eq(ml_case_kind_parse(bad[i], &k), ML_EINVAL, "%s", bad[i]);
        cr_assert_eq(k, -7);
    }
    int k = -7;
    cr_assert_eq(ml_case_kind_parse(NULL, &k), ML_EINVAL);
    /* Every kind's name parses back to it. */
    for (int c = ML_CASE_NONE + 1; c < ML_CASE_KIND_COUNT; c++) {
        cr_assert_eq(ml_case_kind_parse(ml_case_kind_name(c), &k), 0);
        cr_assert_eq(k, c);
    }
}

Test(cases, message_kinds)
{
    /* Every Kind value: which case it belongs to, and whether it opens one. */
    const ProtobufCEnumDescriptor *kd = &medlink__v1__kind__descriptor;
    cr_assert_eq(kd->n_values, 19, "a new Kind must be placed here and in cases.c");
    for (unsigned i = 0; i < kd->n_values; i++) {
        int m = kd->values[i].value;
        int want_kind, want_opens = 0;
        switch (m) {
        case K(REFERRAL):
            want_opens = 1;
            /* fall through */
        case K(REFERRAL_UPDATE):
            want_kind = ML_CASE_REFERRAL;
            break;
        case K(IMAGING_CONSULT):
            want_opens = 1;
            /* fall through */
        case K(IMAGING_CHUNK):
        case K(IMAGING_RESEND):
        case K(IMAGING_UPDATE):
        case K(IMAGING_REPORT):
            want_kind = ML_CASE_IMAGING;
            break;
        case K(DOWN_TRANSFER):
            want_opens = 1;
            /* fall through */
        case K(DOWN_TRANSFER_UPDATE):
            want_kind = ML_CASE_DOWN_TRANSFER;
            break;
        default: /* control kinds and ESCALATION */
            want_kind = ML_CASE_NONE;
        }
        cr_assert_eq(ml_case_kind_of_message(m), want_kind, "%s", kd->values[i].name);
        cr_assert_eq(ml_case_opens(m), want_opens, "%s", kd->values[i].name);
    }
    cr_assert_eq(ml_case_kind_of_message(K(ESCALATION)), ML_CASE_NONE);
    cr_assert_eq(ml_case_kind_of_message(-1), ML_CASE_NONE);
    cr_assert_eq(ml_case_kind_of_message(1000), ML_CASE_NONE);
    cr_assert_eq(ml_case_opens(1000), 0);

    cr_assert_eq(ml_case_initial_state(ML_CASE_REFERRAL), R(SENT));
    cr_assert_eq(ml_case_initial_state(ML_CASE_IMAGING), I(REQUESTED));
    cr_assert_eq(ml_case_initial_state(ML_CASE_DOWN_TRANSFER), D(OFFERED));
    cr_assert_eq(ml_case_initial_state(ML_CASE_NONE), 0);
}

Test(cases, fhir_task_status)
{
    /* The FHIR R4 Task.status value set. */
    static const char *const fhir[] = {
        "draft",     "requested",   "received", "accepted",  "rejected", "ready",
        "cancelled", "in-progress", "on-hold",  "completed", "failed",   "entered-in-error",
    };
    for (size_t k = 0; k < N(s_lives); k++) {
        const life_t *l = &s_lives[k];
        for (int s = 1; s < l->nstates; s++) {
            const char *got = ml_case_fhir_status(l->kind, s);
            cr_assert_not_null(got);
            cr_assert(got[0], "%s has no Task.status", l->names[s]);
            cr_assert_str_eq(got, l->fhir[s], "%s", l->names[s]);
            int valid = 0;
            for (size_t i = 0; i < N(fhir); i++)
                valid |= strcmp(got, fhir[i]) == 0;
            cr_assert(valid, "%s -> %s is not a FHIR R4 Task.status", l->names[s], got);
        }
        cr_assert_str_eq(ml_case_fhir_status(l->kind, 0), "");
        cr_assert_str_eq(ml_case_fhir_status(l->kind, -1), "");
        cr_assert_str_eq(ml_case_fhir_status(l->kind, l->nstates), "");
    }
    cr_assert_str_eq(ml_case_referral_fhir_status(R(SCHEDULED)), "ready");
    cr_assert_str_eq(ml_case_referral_fhir_status(0), "");
}
