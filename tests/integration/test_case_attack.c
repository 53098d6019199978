/* The case engine and the dead-letter queue against a hostile but
 * registered node, and the promises docs/workflows.md and docs/protocol.md
 * make about them, with the real medlinkd:
 *
 *   - F8: a node may have at most open_cases_per_node open cases; cases
 *     that miss their deadlines in the same check reach ops as one summary,
 *     and each case is escalated once per deadline;
 *   - F11: a node with no part in a case gets the same answer whether the
 *     case exists or not;
 *   - REFERRAL_SCHEDULED needs a time and REFERRAL_DISCHARGED an outcome;
 *   - after a deadline fallback, the Escalation names the hospital that
 *     missed the deadline;
 *   - a DLQ purge after a replay says it did not purge; replies come once
 *     the change is visible; who read a dead letter's envelope is logged;
 *   - admin replies echo the request's id. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>
#include <sqlite3.h>

#include "cases.h"
#include "client.h"
#include "harness.h"
#include "ml_common.h"

#include "short.h"

static h_world_t W;

static void s_teardown(void)
{
    h_world_fini(&W);
}

TestSuite(security, .fini = s_teardown, .timeout = 300);
TestSuite(workflow, .fini = s_teardown, .timeout = 300);
TestSuite(escalation, .fini = s_teardown, .timeout = 300);
TestSuite(dlq, .fini = s_teardown, .timeout = 300);
TestSuite(admin, .fini = s_teardown, .timeout = 300);

/* ---- helpers ------------------------------------------------------------ */

/* A ReferralUpdate of case_id from c to `to`; the caller fills u. */
static ml_envelope_t *s_send_update(cli_t *c, const char *to, const char *case_id,
                                    Medlink__V1__ReferralUpdate *u)
{
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = id;
    e.case_id = (char *)case_id;
    e.from = c->node;
    e.to = (char *)to;
    e.created_at = ml_now_ms();
    e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL_UPDATE;
    e.referral_update = u;
    return cli_send_wait(c, &e);
}

/* The update with status st and everything a status may need. */
static ml_envelope_t *s_update(cli_t *c, const char *to, const char *case_id, int st)
{
    Medlink__V1__ReferralUpdate u = MEDLINK__V1__REFERRAL_UPDATE__INIT;
    u.status = st;
    u.reason = "test reason";
    u.scheduled_at = ml_now_ms() + 86400000;
    u.department = "Cardiology";
    u.outcome_summary = "recovered";
    return s_send_update(c, to, case_id, &u);
}

static void s_legal(cli_t *c, const char *to, const char *case_id, int st)
{
    ml_envelope_t *r = s_update(c, to, case_id, st);
    cr_assert_eq(r->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED, "%s refused: %s",
                 ml_case_state_name(ML_CASE_REFERRAL, st),
                 r->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_NACK ? r->nack->reason : "");
}

/* Opens a referral from c to `to`; asserts it is accepted. */
static void s_open(cli_t *c, const char *to, const char *name, int priority, char *id_out)
{
    cli_referral_t r;
    cli_referral(&r, c->node, to, name, priority);
    cli_expect_accepted(cli_send_wait(c, &r.env), r.id);
    if (id_out)
        snprintf(id_out, ML_ULID_LEN + 1, "%s", r.id);
}

/* Sends an admin request without waiting for its answer (pipelining). */
static void s_admin_send(cli_t *c, Medlink__V1__AdminRequest *rq)
{
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = id;
    e.kind = MEDLINK__V1__KIND__KIND_ADMIN_REQUEST;
    e.from = c->node;
    e.to = H_BROKER;
    e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REQUEST;
    e.admin_request = rq;
    cr_assert_eq(ml_channel_send(c->ch, &e), 0);
}

typedef struct {
    const char *request_id;
    int nth; /* the reply's place in order, for a broker that names none */
    const Medlink__V1__AdminReply *found;
} s_rid_t;

static int s_has_rid(cli_t *c, void *arg)
{
    s_rid_t *w = arg;
    for (int i = 0; i < c->n && !w->found; i++)
        if (c->replies[i]->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REPLY &&
            strcmp(c->replies[i]->admin_reply->request_id, w->request_id) == 0)
            w->found = c->replies[i]->admin_reply;
    /* A broker without request ids answers in order: the nth reply. */
    if (!w->found && w->nth > 0 && c->n >= w->nth &&
        c->replies[w->nth - 1]->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REPLY &&
        !*c->replies[w->nth - 1]->admin_reply->request_id)
        w->found = c->replies[w->nth - 1]->admin_reply;
    return w->found != NULL;
}

/* Waits for the AdminReply that names request_id. Replies to pipelined
 * requests may come in another order (a DLQ change is answered once the
 * store has it); the request id says which is which. nth is the reply's
 * place (1-based) if the broker answered in order without ids. */
static const Medlink__V1__AdminReply *s_admin_reply(cli_t *c, const char *request_id, int nth)
{
    s_rid_t w = {request_id, nth, NULL};
    cr_assert(cli_run_until(c, s_has_rid, &w, 10000), "no answer to request %s", request_id);
    return w.found;
}

static const Medlink__V1__AdminReply *s_dlq(cli_t *ops, int op, const char *id)
{
    Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
    rq.op = op;
    rq.message_id = (char *)id;
    return cli_admin(ops, &rq);
}

/* A scalar from the broker's database (read-only, committed data). */
static long long s_db_count(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static long long s_db_count(const char *fmt, ...)
{
    char path[700], sql[512];
    snprintf(path, sizeof path, "%s/data/broker/broker.db", W.dir);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, fmt, ap);
    va_end(ap);
    sqlite3 *db = NULL;
    cr_assert_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    sqlite3_stmt *st = NULL;
    cr_assert_eq(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK, "%s: %s", sql,
                 sqlite3_errmsg(db));
    long long v = -1;
    if (sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return v;
}

/* Makes one dead letter: a referral from clinic to city, which refuses the
 * delivery; returns once the DLQ lists it. */
static void s_make_dead(cli_t *clinic, cli_t *city, cli_t *ops, const char *name, char *id_out)
{
    city->answer = CLI_REFUSE;
    s_open(clinic, H_CITY, name, 0, id_out);
    cr_assert(cli_wait_dead_letters(ops, id_out, 0, 20000), "%s never became a dead letter",
              id_out);
}

static int s_listed(const Medlink__V1__AdminReply *rep, const char *id)
{
    for (size_t i = 0; i < rep->n_dead_letter; i++)
        if (strcmp(rep->dead_letter[i]->message_id, id) == 0)
            return 1;
    return 0;
}

/* The Escalations c received (deliveries), optionally only for case_id. */
static int s_escalations(const cli_t *c, const char *case_id)
{
    int n = 0;
    for (int i = 0; i < c->n_got; i++)
        if (c->got[i]->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_ESCALATION &&
            (!case_id || strcmp(c->got[i]->escalation->case_id, case_id) == 0))
            n++;
    return n;
}

/* *(int *)arg message ids accepted (Accepted is cumulative). */
static int s_accepted_n(cli_t *c, void *arg)
{
    size_t n = 0;
    for (int i = 0; i < c->n; i++)
        if (c->replies[i]->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED)
            n += c->replies[i]->accepted->n_message_ids;
    return n >= (size_t) * (int *)arg;
}

/* ---- F8 --------------------------------------------------------------- */

/* The (quota+1)th open case of one clinic is refused with a permanent Nack
 * naming the quota, while another clinic still opens cases; a case that
 * closes frees its place; status shows the count per node. */
Test(security, f8_open_case_quota)
{
    h_world_init(&W, "open_cases_per_node = 3\n");
    h_broker_start(&W);
    cli_t xinzhan, fengle, county, ops;
    cli_open(&xinzhan, &W, H_XINZHAN, 0);
    cli_open(&fengle, &W, H_FENGLE, 0);
    cli_open(&county, &W, H_COUNTY, 0);
    cli_open(&ops, &W, H_OPS, 0);

    char ids[3][ML_ULID_LEN + 1];
    for (int i = 0; i < 3; i++)
        s_open(&xinzhan, H_COUNTY, "Quota Patient", 0, ids[i]);
    cli_referral_t over;
    cli_referral(&over, H_XINZHAN, H_COUNTY, "One Too Many", 0);
    ml_envelope_t *r = cli_send_wait(&xinzhan, &over.env);
    cli_expect_nack(r, NACK_(FORBIDDEN), "open_cases_per_node");
    cr_assert(strstr(r->nack->reason, "quota") && strstr(r->nack->reason, "3"), "%s",
              r->nack->reason);
    cr_assert_str_eq(r->nack->message_id, over.id);

    /* Another clinic is not affected. */
    s_open(&fengle, H_COUNTY, "Fengle Patient", 0, NULL);

    /* The count is visible per node. */
    Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
    rq.op = OP_(STATUS);
    const Medlink__V1__AdminReply *rep = cli_admin(&ops, &rq);
    int seen = 0;
    for (size_t i = 0; i < rep->broker_status->n_node; i++) {
        const Medlink__V1__NodeStatus *n = rep->broker_status->node[i];
        if (strcmp(n->node_id, H_XINZHAN) == 0) {
            cr_assert_eq(n->open_cases_opened, 3);
            cr_assert_eq(n->open_cases_limit, 3);
            seen++;
        } else if (strcmp(n->node_id, H_FENGLE) == 0) {
            cr_assert_eq(n->open_cases_opened, 1);
            seen++;
        }
    }
    cr_assert_eq(seen, 2);

    /* A case that ends frees its place. */
    s_legal(&county, H_XINZHAN, ids[0], REF_(REJECTED));
    cli_referral(&over, H_XINZHAN, H_COUNTY, "Now There Is Room", 0);
    cli_expect_accepted(cli_send_wait(&xinzhan, &over.env), over.id);
    cli_referral(&over, H_XINZHAN, H_COUNTY, "Full Again", 0);
    cli_expect_nack(cli_send_wait(&xinzhan, &over.env), NACK_(FORBIDDEN), "open_cases_per_node");
    cli_close(&xinzhan);
    cli_close(&fengle);
    cli_close(&county);
    cli_close(&ops);
    h_broker_stop(&W);
}

#define S_OVERDUE 12

/* Many cases miss their deadline at once: each opener hears once per case,
 * ops get a summary (not one message per case), the log has one summary
 * line instead of a line per case, and nothing is escalated twice. */
Test(security, f8_escalations_coalesced)
{
    h_world_init(&W, "timer_ms = 1000\n[deadlines]\nreferral = ACCEPTED 2s\n");
    h_broker_start(&W);
    cli_t clinic, ops;
    cli_open(&clinic, &W, H_XINZHAN, 1);
    cli_open(&ops, &W, H_OPS, 1);

    /* Sent in one burst, so their deadlines fall in one or two checks. */
    cli_referral_t refs[S_OVERDUE];
    for (int i = 0; i < S_OVERDUE; i++) {
        cli_referral(&refs[i], H_XINZHAN, H_COUNTY, "Overdue Patient", 0);
        cr_assert_eq(ml_channel_send(clinic.ch, &refs[i].env), 0);
    }
    int want = S_OVERDUE;
    cr_assert(cli_run_until(&clinic, s_accepted_n, &want, 10000), "not all accepted");

    /* Every case's opener gets its own escalation. */
    for (int waited = 0; waited < 20000 && s_escalations(&clinic, NULL) < S_OVERDUE; waited += 100)
        cli_run_until(&clinic, cli_got_n, (int[]){1000000}, 100);
    cr_assert_eq(s_escalations(&clinic, NULL), S_OVERDUE);
    /* Two more checks pass: nothing more comes. */
    cli_run_until(&ops, cli_got_n, (int[]){1000000}, 3000);
    cli_run_until(&clinic, cli_got_n, (int[]){1000000}, 500);
    for (int i = 0; i < S_OVERDUE; i++)
        cr_assert_eq(s_escalations(&clinic, refs[i].id), 1, "case %d escalated %d times", i,
                     s_escalations(&clinic, refs[i].id));

    /* Ops: every case is covered exactly once, by a summary's case_ids or
     * (a case alone in its check) by its own escalation, in at most two
     * messages since the cases fell in at most two checks. */
    int ops_msgs = s_escalations(&ops, NULL), covered[S_OVERDUE] = {0};
    for (int i = 0; i < ops.n_got; i++) {
        if (ops.got[i]->payload_case != MEDLINK__V1__ENVELOPE__PAYLOAD_ESCALATION)
            continue;
        const Medlink__V1__Escalation *e = ops.got[i]->escalation;
        cr_assert_eq(e->reason, ESC_(DEADLINE_MISSED));
        for (int k = 0; k < S_OVERDUE; k++) {
            covered[k] += strcmp(e->case_id, refs[k].id) == 0;
            for (size_t j = 0; j < e->n_case_ids; j++)
                covered[k] += strcmp(e->case_ids[j], refs[k].id) == 0;
        }
        if (e->n_case_ids > 0)
            cr_assert(strstr(e->detail, "cases overdue"), "summary detail: %s", e->detail);
    }
    for (int k = 0; k < S_OVERDUE; k++)
        cr_assert_eq(covered[k], 1, "case %d reached ops %d times", k, covered[k]);
    cr_assert(ops_msgs >= 1 && ops_msgs <= 2, "ops got %d escalations for %d cases", ops_msgs,
              S_OVERDUE);

    /* Stored: one escalation per case for the opener, plus ops' messages. */
    long long stored = s_db_count("SELECT count(*) FROM messages WHERE kind = %d",
                                  MEDLINK__V1__KIND__KIND_ESCALATION);
    cr_assert_eq(stored, S_OVERDUE + ops_msgs, "%lld escalations stored", stored);

    /* The log: a summary line per check with several cases ("N cases
     * overdue: ..."), a line of its own only for a case alone in its check
     * ("case X: ... (told N node(s))"): as many lines as ops messages. */
    int summaries = h_log_contains(&W, "broker.log", "cases overdue:");
    int singles = h_log_contains(&W, "broker.log", "(told");
    cr_assert_geq(summaries, 1, "no summary line");
    cr_assert_eq(summaries + singles, ops_msgs, "%d summary and %d single lines for %d messages",
                 summaries, singles, ops_msgs);
    cli_close(&clinic);
    cli_close(&ops);
    h_broker_stop(&W);
}

/* ---- F11 -------------------------------------------------------------- */

/* The reason with the case id taken out, to compare the answers for two
 * different ids. */
static void s_without(const char *reason, const char *id, char *out, size_t len)
{
    const char *p = strstr(reason, id);
    if (!p) {
        snprintf(out, len, "%s", reason);
        return;
    }
    snprintf(out, len, "%.*s<ID>%s", (int)(p - reason), reason, p + strlen(id));
}

/* a and b are the answers for an existing case (id_a) and for none (id_b):
 * the same code, and the same sentence but for the id. Replies stay valid
 * until CLI_MAX more have come. */
static void s_same_answer(const ml_envelope_t *a, const char *id_a, const ml_envelope_t *b,
                          const char *id_b, const char *what)
{
    cr_assert_eq(a->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_NACK, "%s: not refused", what);
    cr_assert_eq(b->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_NACK, "%s: not refused", what);
    char ra[600], rb[600];
    s_without(a->nack->reason, id_a, ra, sizeof ra);
    s_without(b->nack->reason, id_b, rb, sizeof rb);
    cr_assert_eq(a->nack->code, b->nack->code, "%s: code %d for an existing case, %d for none",
                 what, a->nack->code, b->nack->code);
    cr_assert_str_eq(ra, rb, "%s: the answers differ", what);
    cr_assert_null(strstr(ra, "REFERRAL"), "%s: the reason names a kind or state: %s", what, ra);
    cr_assert_null(strstr(ra, "referral case"), "%s: the reason names a kind: %s", what, ra);
}

/* A node with no part in a case learns nothing from the refusals: the same
 * code and sentence for an existing case (of any kind) as for none. */
Test(security, f11_case_existence_not_leaked)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t xinzhan, fengle;
    cli_open(&xinzhan, &W, H_XINZHAN, 0);
    cli_open(&fengle, &W, H_FENGLE, 0);
    char real[ML_ULID_LEN + 1], none[ML_ULID_LEN + 1];
    s_open(&xinzhan, H_COUNTY, "Private Patient", 0, real);
    ml_ulid_new(none);

    /* An update of the referral. */
    ml_envelope_t *a = s_update(&fengle, H_XINZHAN, real, REF_(ACCEPTED));
    ml_envelope_t *b = s_update(&fengle, H_XINZHAN, none, REF_(ACCEPTED));
    s_same_answer(a, real, b, none, "referral update");
    cr_assert_eq(b->nack->code, NACK_(NOT_PARTY));

    /* An update of another kind (the old answer named the case's kind). */
    char id[ML_ULID_LEN + 1];
    Medlink__V1__ImagingUpdate iu = MEDLINK__V1__IMAGING_UPDATE__INIT;
    iu.status = MEDLINK__V1__IMAGING_STATUS__IMAGING_CANCELLED;
    iu.reason = "no longer needed";
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = id;
    e.from = H_FENGLE;
    e.to = H_READ_A;
    e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_UPDATE;
    e.imaging_update = &iu;
    ml_ulid_new(id);
    e.case_id = real;
    e.created_at = ml_now_ms();
    a = cli_send_wait(&fengle, &e);
    ml_ulid_new(id);
    e.case_id = none;
    b = cli_send_wait(&fengle, &e);
    s_same_answer(a, real, b, none, "imaging update");

    /* A referral whose linked_case_id names the case (the old answer said
     * "is not a rehab down-transfer" for an existing one). */
    cli_referral_t la, lb;
    cli_referral(&la, H_FENGLE, H_COUNTY, "Linked Patient", 0);
    la.ref.linked_case_id = real;
    a = cli_send_wait(&fengle, &la.env);
    cli_referral(&lb, H_FENGLE, H_COUNTY, "Linked Patient", 0);
    lb.ref.linked_case_id = none;
    b = cli_send_wait(&fengle, &lb.env);
    s_same_answer(a, real, b, none, "linked_case_id");
    cli_close(&xinzhan);
    cli_close(&fengle);
    h_broker_stop(&W);
}

/* ---- workflow checks -------------------------------------------------- */

/* Opens a referral and takes it along path through the hospital. */
static void s_to_state(cli_t *clinic, cli_t *county, char *id, const int *path, size_t n)
{
    s_open(clinic, H_COUNTY, "Workflow Patient", 0, id);
    for (size_t i = 0; i < n; i++)
        s_legal(county, H_XINZHAN, id, path[i]);
}

Test(workflow, scheduled_requires_time)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t clinic, county;
    cli_open(&clinic, &W, H_XINZHAN, 0);
    cli_open(&county, &W, H_COUNTY, 0);
    char id[ML_ULID_LEN + 1];
    s_to_state(&clinic, &county, id, (int[]){REF_(ACCEPTED)}, 1);
    Medlink__V1__ReferralUpdate u = MEDLINK__V1__REFERRAL_UPDATE__INIT;
    u.status = REF_(SCHEDULED);
    u.department = "Cardiology";
    cli_expect_nack(s_send_update(&county, H_XINZHAN, id, &u), NACK_(INVALID),
                    "referral_update.scheduled_at is required");
    u.scheduled_at = ml_now_ms() + 3600000;
    ml_envelope_t *r = s_send_update(&county, H_XINZHAN, id, &u);
    cr_assert_eq(r->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED, "%s",
                 r->nack ? r->nack->reason : "");
    cli_close(&clinic);
    cli_close(&county);
    h_broker_stop(&W);
}

Test(workflow, discharged_requires_outcome)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t clinic, county;
    cli_open(&clinic, &W, H_XINZHAN, 0);
    cli_open(&county, &W, H_COUNTY, 0);
    char id[ML_ULID_LEN + 1];
    s_to_state(&clinic, &county, id,
               (int[]){REF_(ACCEPTED), REF_(SCHEDULED), REF_(ARRIVED), REF_(ADMITTED)}, 4);
    Medlink__V1__ReferralUpdate u = MEDLINK__V1__REFERRAL_UPDATE__INIT;
    u.status = REF_(DISCHARGED);
    u.notes = "home";
    cli_expect_nack(s_send_update(&county, H_XINZHAN, id, &u), NACK_(INVALID),
                    "referral_update.outcome_summary is required");
    u.outcome_summary = "";
    cli_expect_nack(s_send_update(&county, H_XINZHAN, id, &u), NACK_(INVALID),
                    "referral_update.outcome_summary");
    u.outcome_summary = "stent placed, stable";
    ml_envelope_t *r = s_send_update(&county, H_XINZHAN, id, &u);
    cr_assert_eq(r->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED);
    cli_close(&clinic);
    cli_close(&county);
    h_broker_stop(&W);
}

/* ---- escalation target ------------------------------------------------ */

/* An EMERGENCY referral the county hospital does not accept in time goes to
 * the fallback hospital; the Escalation names the county hospital (who had
 * the case and missed the deadline) and the deadline it missed. */
Test(escalation, target_names_missed_hospital)
{
    h_world_init(&W, "timer_ms = 100\n[deadlines]\nreferral.emergency = ACCEPTED 1s\n");
    h_broker_start(&W);
    cli_t clinic, ops;
    cli_open(&clinic, &W, H_XINZHAN, 1);
    cli_open(&ops, &W, H_OPS, 1);
    char id[ML_ULID_LEN + 1];
    s_open(&clinic, H_COUNTY, "Emergency Patient", MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY, id);
    Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
    rq.op = OP_(CASE_SHOW);
    rq.case_id = id;
    int64_t deadline = cli_admin(&ops, &rq)->case_info->deadline_at;
    cr_assert_gt(deadline, 0);

    for (int waited = 0; waited < 20000 && s_escalations(&ops, id) < 1; waited += 100)
        cli_run_until(&ops, cli_got_n, (int[]){1000000}, 100);
    for (int waited = 0; waited < 20000 && s_escalations(&clinic, id) < 1; waited += 100)
        cli_run_until(&clinic, cli_got_n, (int[]){1000000}, 100);
    cli_t *who[] = {&ops, &clinic};
    for (size_t w = 0; w < 2; w++) {
        const Medlink__V1__Escalation *e = NULL;
        for (int i = 0; i < who[w]->n_got && !e; i++)
            if (who[w]->got[i]->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_ESCALATION)
                e = who[w]->got[i]->escalation;
        cr_assert_not_null(e, "%s got no escalation", who[w]->node);
        cr_assert_str_eq(e->case_id, id);
        cr_assert_eq(e->reason, ESC_(DEADLINE_MISSED));
        cr_assert_str_eq(e->redirected_to, H_CITY);
        cr_assert_str_eq(e->target, H_COUNTY, "%s: target %s", who[w]->node, e->target);
        cr_assert_eq(e->deadline_at, deadline, "the escalation names another deadline");
    }
    /* The case itself moved on to the fallback hospital. */
    cr_assert_str_eq(cli_admin(&ops, &rq)->case_info->target, H_CITY);
    cli_close(&clinic);
    cli_close(&ops);
    h_broker_stop(&W);
}

/* ---- dead letters ----------------------------------------------------- */

/* A purge right after a replay (recipient online) does not answer as if it
 * had purged: the replayed message is delivered and stays in the store as
 * delivered, and the purge says it was not purged. */
Test(dlq, purge_after_replay_is_truthful)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t clinic, city, ops;
    cli_open(&clinic, &W, H_XINZHAN, 0);
    cli_open(&ops, &W, H_OPS, 0);
    cli_start(&city, &W, H_CITY, 0, H_BROKER, 1);
    cr_assert(cli_run_until(&city, cli_is_up, NULL, 10000));

    /* Pipelined: the purge reaches the broker before the replay is
     * committed. */
    char a[ML_ULID_LEN + 1];
    s_make_dead(&clinic, &city, &ops, "Replayed Patient", a);
    city.answer = CLI_ACK;
    int got = city.n_got;
    Medlink__V1__AdminRequest replay = MEDLINK__V1__ADMIN_REQUEST__INIT;
    replay.op = OP_(DLQ_REPLAY);
    replay.message_id = a;
    replay.request_id = "replay-1";
    Medlink__V1__AdminRequest purge = replay;
    purge.op = OP_(DLQ_PURGE);
    purge.request_id = "purge-1";
    int base = ops.n;
    s_admin_send(&ops, &replay);
    s_admin_send(&ops, &purge);
    const Medlink__V1__AdminReply *r1 = s_admin_reply(&ops, "replay-1", base + 1);
    cr_assert_eq(r1->status, 0, "replay: %s", r1->error);
    cr_assert_eq(r1->affected, 1);
    const Medlink__V1__AdminReply *r2 = s_admin_reply(&ops, "purge-1", base + 2);
    cr_assert_eq(r2->affected, 0, "the purge said it purged a message being replayed");
    cr_assert_neq(r2->status, 0);
    cr_assert(strstr(r2->error, "not purged"), "%s", r2->error);

    /* Delivered, and kept as delivered. */
    int want = got + 1;
    cr_assert(cli_run_until(&city, cli_got_n, &want, 10000), "the replayed message never came");
    long long state = -1;
    for (int waited = 0; waited < 10000; waited += 100) {
        state = s_db_count("SELECT state FROM messages WHERE id = '%s'", a);
        if (state == 1)
            break;
        cli_run_until(&city, cli_got_n, (int[]){1000000}, 100);
    }
    cr_assert_eq(state, 1, "state %lld in broker.db", state);

    /* Once the replay is done, a purge says why it does nothing. */
    const Medlink__V1__AdminReply *r3 = s_dlq(&ops, OP_(DLQ_PURGE), a);
    cr_assert_eq(r3->affected, 0);
    cr_assert_neq(r3->status, 0);
    cr_assert(strstr(r3->error, "not purged") && strstr(r3->error, "delivered"), "%s", r3->error);
    cr_assert_eq(h_log_contains(&W, "broker.log", "purged dead letter"), 0,
                 "the broker logged a purge that did not happen");
    cli_close(&clinic);
    cli_close(&city);
    cli_close(&ops);
    h_broker_stop(&W);
}

/* The list asked right after a replay or purge (even before its answer)
 * no longer shows the message. */
Test(dlq, list_consistent_after_reply)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t clinic, city, ops;
    cli_open(&clinic, &W, H_XINZHAN, 0);
    cli_open(&ops, &W, H_OPS, 0);
    cli_start(&city, &W, H_CITY, 0, H_BROKER, 1);
    cr_assert(cli_run_until(&city, cli_is_up, NULL, 10000));
    char a[ML_ULID_LEN + 1], b[ML_ULID_LEN + 1];
    s_make_dead(&clinic, &city, &ops, "First Dead", a);
    s_make_dead(&clinic, &city, &ops, "Second Dead", b);
    city.answer = CLI_ACK;

    Medlink__V1__AdminRequest change = MEDLINK__V1__ADMIN_REQUEST__INIT;
    Medlink__V1__AdminRequest list = MEDLINK__V1__ADMIN_REQUEST__INIT;
    list.op = OP_(DLQ_LIST);
    struct {
        int op;
        const char *id;
    } steps[] = {{OP_(DLQ_REPLAY), a}, {OP_(DLQ_PURGE), b}};
    for (size_t i = 0; i < 2; i++) {
        change.op = steps[i].op;
        change.message_id = (char *)steps[i].id;
        char rid_change[32], rid_list[32];
        snprintf(rid_change, sizeof rid_change, "change-%zu", i);
        snprintf(rid_list, sizeof rid_list, "list-%zu", i);
        change.request_id = rid_change;
        list.request_id = rid_list;
        int base = ops.n;
        s_admin_send(&ops, &change);
        s_admin_send(&ops, &list);
        const Medlink__V1__AdminReply *done = s_admin_reply(&ops, rid_change, base + 1);
        cr_assert_eq(done->status, 0, "%s", done->error);
        cr_assert_eq(done->affected, 1);
        const Medlink__V1__AdminReply *l = s_admin_reply(&ops, rid_list, base + 2);
        cr_assert_not(s_listed(l, steps[i].id), "%s still listed right after its %s", steps[i].id,
                      i ? "purge" : "replay");
        /* And after the answer, from the store itself. */
        l = s_dlq(&ops, OP_(DLQ_LIST), NULL);
        cr_assert_not(s_listed(l, steps[i].id), "%s listed after the answer", steps[i].id);
    }
    cr_assert_eq(s_db_count("SELECT count(*) FROM messages WHERE id = '%s'", b), 0);
    cli_close(&clinic);
    cli_close(&city);
    cli_close(&ops);
    h_broker_stop(&W);
}

/* dlq show gives ops the stored envelope; the broker logs who read which
 * message (never its content) and keeps it in the case's timeline. */
Test(dlq, show_is_logged)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t clinic, city, ops;
    cli_open(&clinic, &W, H_XINZHAN, 0);
    cli_open(&ops, &W, H_OPS, 0);
    cli_start(&city, &W, H_CITY, 0, H_BROKER, 1);
    cr_assert(cli_run_until(&city, cli_is_up, NULL, 10000));
    char a[ML_ULID_LEN + 1];
    s_make_dead(&clinic, &city, &ops, "Zhang Sanfeng", a);
    char needle[200];
    snprintf(needle, sizeof needle, "%s read the stored envelope of dead letter %s", H_OPS, a);
    cr_assert_eq(h_log_contains(&W, "broker.log", needle), 0);

    const Medlink__V1__AdminReply *rep = s_dlq(&ops, OP_(DLQ_SHOW), a);
    cr_assert_eq(rep->n_dead_letter, 1);
    cr_assert_gt(rep->dead_letter[0]->envelope.len, 0, "ops get the envelope to act on");
    for (int waited = 0; waited < 5000 && !h_log_contains(&W, "broker.log", needle); waited += 50)
        h_sleep_ms(50);
    cr_assert_eq(h_log_contains(&W, "broker.log", needle), 1, "the read was not logged");
    cr_assert_eq(h_log_contains(&W, "broker.log", "Zhang Sanfeng"), 0,
                 "the log holds the patient's name");

    /* And in the case's timeline. */
    Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
    rq.op = OP_(CASE_SHOW);
    rq.case_id = a;
    int found = 0;
    for (int waited = 0; waited < 5000 && !found; waited += 100) {
        const Medlink__V1__CaseInfo *ci = cli_admin(&ops, &rq)->case_info;
        for (size_t i = 0; ci && i < ci->n_timeline; i++)
            found += strcmp(ci->timeline[i]->event, "dead letter read") == 0 &&
                     strcmp(ci->timeline[i]->node, H_OPS) == 0;
        if (!found)
            h_sleep_ms(100);
    }
    cr_assert_eq(found, 1, "no \"dead letter read\" entry by %s in the timeline", H_OPS);
    cli_close(&clinic);
    cli_close(&city);
    cli_close(&ops);
    h_broker_stop(&W);
}

/* ---- admin request ids ------------------------------------------------ */

/* Every admin reply names the request it answers: an answer, an error, and
 * a DLQ change answered once the store has it; medlinkctl sets and checks
 * the id. */
Test(admin, request_id_echoed)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t ops;
    cli_open(&ops, &W, H_OPS, 0);
    Medlink__V1__AdminRequest status = MEDLINK__V1__ADMIN_REQUEST__INIT;
    status.op = OP_(STATUS);
    status.request_id = "req-status-1";
    Medlink__V1__AdminRequest show = MEDLINK__V1__ADMIN_REQUEST__INIT;
    show.op = OP_(CASE_SHOW);
    show.case_id = "01NOSUCHCASE00000000000000";
    show.request_id = "req-show-2";
    Medlink__V1__AdminRequest purge = MEDLINK__V1__ADMIN_REQUEST__INIT;
    purge.op = OP_(DLQ_PURGE);
    purge.all = 1;
    purge.request_id = "req-purge-3";
    int base = ops.n;
    s_admin_send(&ops, &status);
    s_admin_send(&ops, &show);
    s_admin_send(&ops, &purge);
    int three = base + 3;
    cr_assert(cli_run_until(&ops, cli_has_n, &three, 10000), "three requests, not three answers");
    const char *want[] = {"req-status-1", "req-show-2", "req-purge-3"};
    int seen[3] = {0};
    for (int i = base; i < ops.n; i++) {
        cr_assert_eq(ops.replies[i]->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REPLY);
        const Medlink__V1__AdminReply *r = ops.replies[i]->admin_reply;
        for (int k = 0; k < 3; k++)
            seen[k] += strcmp(r->request_id, want[k]) == 0;
    }
    for (int k = 0; k < 3; k++)
        cr_assert_eq(seen[k], 1, "%d replies name %s", seen[k], want[k]);
    cr_assert_not_null(s_admin_reply(&ops, "req-status-1", 0)->broker_status);
    cr_assert_neq(s_admin_reply(&ops, "req-show-2", 0)->status, 0, "an unknown case is an error");

    /* medlinkctl: its request carries an id, and the reply it prints is
     * the one that names it. */
    char bin[512], cfg[700];
    h_bin("medlinkctl", bin, sizeof bin);
    h_ctl_config(&W, H_OPS, cfg, sizeof cfg);
    int st = -1;
    char *out = h_run(&st, "'%s' --config '%s' --json status 2>&1", bin, cfg);
    cr_assert_eq(st, 0, "medlinkctl status: %s", out);
    free(out);
    char line[128];
    snprintf(line, sizeof line, "%s asked for OP_STATUS (request ", H_OPS);
    cr_assert_eq(h_log_contains(&W, "broker.log", line), 2, "medlinkctl sent no request id");
    cr_assert_eq(h_log_contains(&W, "broker.log", "asked for OP_STATUS (request -)"), 0,
                 "a request without an id");
    cli_close(&ops);
    h_broker_stop(&W);
}
