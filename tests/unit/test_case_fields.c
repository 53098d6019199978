/* The fields some states must carry (ml_case_required_field), stated again
 * here from docs/workflows.md's tables and checked for every state of every
 * kind: an appointment has a time, a discharge an outcome summary, and no
 * other state asks the case engine for a field (the reasons, redirect
 * targets and follow-up numbers are ml_env_validate's). */
#include <criterion/criterion.h>
#include <string.h>

#include "cases.h"
#include "medlink/v1/referral.pb-c.h"

#define R(x) MEDLINK__V1__REFERRAL_STATUS__REFERRAL_##x

static const struct {
    int kind, state;
    const char *field;
} s_want[] = {
    {ML_CASE_REFERRAL, R(SCHEDULED), "referral_update.scheduled_at"},
    {ML_CASE_REFERRAL, R(DISCHARGED), "referral_update.outcome_summary"},
};

static const char *s_expected(int kind, int state)
{
    for (size_t i = 0; i < sizeof s_want / sizeof s_want[0]; i++)
        if (s_want[i].kind == kind && s_want[i].state == state)
            return s_want[i].field;
    return NULL;
}

Test(workflow, scheduled_requires_time_table)
{
    const char *f = ml_case_required_field(ML_CASE_REFERRAL, R(SCHEDULED));
    cr_assert_not_null(f, "REFERRAL_SCHEDULED asks for no field");
    cr_assert_str_eq(f, "referral_update.scheduled_at");
}

Test(workflow, discharged_requires_outcome_table)
{
    const char *f = ml_case_required_field(ML_CASE_REFERRAL, R(DISCHARGED));
    cr_assert_not_null(f, "REFERRAL_DISCHARGED asks for no field");
    cr_assert_str_eq(f, "referral_update.outcome_summary");
}

Test(workflow, required_fields_every_state)
{
    for (int k = ML_CASE_NONE; k < ML_CASE_KIND_COUNT + 1; k++) {
        for (int st = -1; st < 40; st++) {
            const char *got = ml_case_required_field(k, st);
            const char *want = s_expected(k, st);
            if (!want)
                cr_assert_null(got, "%s state %d asks for %s", ml_case_kind_name(k), st, got);
            else
                cr_assert(got && strcmp(got, want) == 0, "%s %s asks for %s, not %s",
                          ml_case_kind_name(k), ml_case_state_name(k, st), got ? got : "nothing",
                          want);
        }
    }
}
