/* medlinkctl as people and scripts use it, against the real medlinkd and
 * agents: a down-transfer sent from flags and walked with `send update`,
 * `case show` (human and --json), `cases` with its filters and
 * `--overdue`, and the dead-letter queue (`dlq list/show/replay/purge`).
 * Each command's exit status is checked as a script would. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>
#include <jansson.h>

#include "harness.h"
#include "ml_common.h"

static h_world_t W;
static char s_ops[800], s_county[800], s_clinic[800];

static void s_teardown(void)
{
    h_world_fini(&W);
}

TestSuite(ctl, .fini = s_teardown, .timeout = 300);

static void s_setup(const char *extra)
{
    h_world_init(&W, extra);
    h_broker_start(&W);
    h_ctl_config(&W, H_OPS, s_ops, sizeof s_ops);
    h_ctl_config(&W, H_COUNTY, s_county, sizeof s_county);
    h_ctl_config(&W, H_XINZHAN, s_clinic, sizeof s_clinic);
}

static const char *s_str(json_t *j, const char *key)
{
    const char *v = json_string_value(json_object_get(j, key));
    return v ? v : "";
}

Test(ctl, down_transfer_from_flags_case_show_and_cases)
{
    s_setup("timer_ms = 100\n[deadlines]\ndown_transfer = ARRIVED 1s after ACCEPTED\n");
    h_agent_start(&W, H_XINZHAN);
    h_agent_start(&W, H_COUNTY);

    json_t *j = h_ctl_json(
        s_county, "send down-transfer --to " H_XINZHAN
                  " --priority URGENT --patient-name 'Sun Li' --health-card 130102195501012222"
                  " --sex female --phase ACUTE_RECOVERY --summary 'Pneumonia, treated'"
                  " --rehab-plan 'Breathing exercises' --team 'Xinzhan team 1'"
                  " --icd10 'J18.9:Pneumonia' --medication 'Amoxicillin;500 mg;tid'"
                  " --follow-up-days 7 --follow-up-days 30");
    char case_id[128];
    snprintf(case_id, sizeof case_id, "%s", s_str(j, "caseId"));
    json_decref(j);
    cr_assert(case_id[0], "send down-transfer printed no caseId");
    char *p = h_wait_json(&W, H_XINZHAN, "inbox", "Sun Li", 20000);
    cr_assert(p, "the down-transfer did not reach the clinic");
    free(p);

    /* The clinic accepts; the patient does not arrive within 1 s. */
    char args[600];
    snprintf(args, sizeof args,
             "send update --kind down_transfer --to %s --case %s --status ACCEPTED", H_COUNTY,
             case_id);
    free(h_ctl(0, s_clinic, args));
    json_t *overdue = h_wait_overdue(s_ops, "--kind down_transfer", 1, 15000);
    cr_assert(overdue, "cases --overdue never listed the down-transfer");
    json_t *c = json_array_get(json_object_get(overdue, "cases"), 0);
    cr_assert_str_eq(s_str(c, "caseId"), case_id);
    cr_assert_str_eq(s_str(c, "state"), "DOWN_TRANSFER_ACCEPTED");
    cr_assert(json_is_true(json_object_get(c, "overdue")));
    json_decref(overdue);
    p = h_wait_json(&W, H_COUNTY, "inbox", "ESCALATION_DEADLINE_MISSED", 20000);
    cr_assert(p, "the hospital (the case's opener) got no escalation");
    free(p);

    /* Arrival meets the deadline; the case leaves the overdue list. */
    snprintf(args, sizeof args,
             "send update --kind down_transfer --to %s --case %s --status ARRIVED --notes 'home'",
             H_COUNTY, case_id);
    free(h_ctl(0, s_clinic, args));
    json_t *state = NULL;
    for (int waited = 0; waited < 10000; waited += 200) {
        snprintf(args, sizeof args, "case show %s", case_id);
        state = h_ctl_json(s_ops, args);
        if (strcmp(s_str(state, "state"), "DOWN_TRANSFER_ARRIVED") == 0)
            break;
        json_decref(state);
        state = NULL;
        h_sleep_ms(200);
    }
    cr_assert(state, "case show never reported DOWN_TRANSFER_ARRIVED");
    json_t *ci = state; /* case show --json prints the CaseInfo itself */
    cr_assert_str_eq(s_str(ci, "fhirStatus"), "in-progress");
    cr_assert_str_eq(s_str(ci, "openedBy"), H_COUNTY);
    cr_assert_geq(json_array_size(json_object_get(ci, "timeline")), 4);
    json_decref(state);
    json_t *none = h_ctl_json(s_ops, "cases --overdue");
    cr_assert_eq(json_array_size(json_object_get(none, "cases")), 0);
    json_decref(none);

    /* Human output: the timeline, one line per entry. */
    snprintf(args, sizeof args, "case show %s", case_id);
    char *human = h_ctl(0, s_ops, args);
    cr_assert(strstr(human, "DOWN_TRANSFER_ACCEPTED") && strstr(human, "deadline missed") &&
                  strstr(human, "DOWN_TRANSFER_ARRIVED"),
              "case show:\n%s", human);
    free(human);
    /* Filters: by state (short names with a kind), and refusals. */
    j = h_ctl_json(s_ops, "cases --kind down_transfer --state ARRIVED");
    cr_assert_eq(json_array_size(json_object_get(j, "cases")), 1);
    json_decref(j);
    j = h_ctl_json(s_ops, "cases --kind referral");
    cr_assert_eq(json_array_size(json_object_get(j, "cases")), 0);
    json_decref(j);
    free(h_ctl(1, s_ops, "case show 01NOSUCHCASE0000000000000000"));
    /* Only an OPS certificate may look. */
    free(h_ctl(1, s_clinic, "cases"));
    h_agent_stop(&W, H_COUNTY);
    h_agent_stop(&W, H_XINZHAN);
    h_broker_stop(&W);
}

Test(ctl, dead_letter_queue_list_show_replay_purge)
{
    s_setup("timer_ms = 100\n");
    /* Two referrals for the city hospital (offline) that expire in 1 s. */
    for (int i = 0; i < 2; i++) {
        char args[600];
        snprintf(args, sizeof args,
                 "send referral --to %s --deadline +1s --patient-name 'Late Patient %d'"
                 " --health-card 13010219800101%04d --reason 'review'",
                 H_CITY, i, i);
        free(h_ctl(0, s_clinic, args));
    }
    json_t *list = h_wait_dead_letters(s_ops, 2, 15000);
    cr_assert(list, "dlq list never showed the two expired referrals");
    cr_assert_eq(json_array_size(json_object_get(list, "deadLetter")), 2);
    json_t *d = json_array_get(json_object_get(list, "deadLetter"), 0);
    char id[64];
    snprintf(id, sizeof id, "%s", s_str(d, "messageId"));
    cr_assert(strstr(s_str(d, "reason"), "expired"), "reason: %s", s_str(d, "reason"));
    json_decref(list);

    char args[300];
    snprintf(args, sizeof args, "dlq show %s", id);
    char *out = h_ctl(0, s_ops, args);
    cr_assert(strstr(out, "Late Patient"), "dlq show should print the stored envelope:\n%s", out);
    free(out);

    /* The city hospital comes online; replay delivers one, purge drops
     * the other. */
    h_agent_start(&W, H_CITY);
    snprintf(args, sizeof args, "dlq replay %s", id);
    free(h_ctl(0, s_ops, args));
    cr_assert_eq(h_wait_count(&W, H_CITY, "inbox", 1, 20000), 1);
    json_t *purged = h_ctl_json(s_ops, "dlq purge --all");
    cr_assert_eq(json_integer_value(json_object_get(purged, "affected")), 1);
    json_decref(purged);
    json_t *empty = h_ctl_json(s_ops, "dlq list");
    cr_assert_eq(json_array_size(json_object_get(empty, "deadLetter")), 0);
    json_decref(empty);
    /* The broker holds nothing more for the city hospital: the one message
     * it delivered (the replayed letter) is all its inbox gets. */
    h_node_counts_t q = h_wait_quiet(&W, H_CITY, 1, 10000);
    cr_assert(q.queued == 0 && q.in_flight == 0 && q.delivered == 1,
              "broker: %lld queued, %lld in flight, %lld delivered to %s", q.queued, q.in_flight,
              q.delivered, H_CITY);
    cr_assert_eq(h_count(&W, H_CITY, "inbox"), 1, "the purged letter must not be delivered");
    free(h_ctl(1, s_ops, "dlq replay 01NOSUCHMESSAGE000000000000"));
    h_agent_stop(&W, H_CITY);
    h_broker_stop(&W);
}
