/* broker/case_engine.c in-process, with no broker behind it: a case in
 * memory (casetab.h), an envelope built on the stack and a node index are
 * all it is given. The suite walks each case kind's path through the
 * engine the way ingress.c's s_route_update composes it (the sender's
 * party, the state the message asks for, the lifecycle check of cases.c,
 * the content check, then the deadline rules on the new state), checks
 * that an illegal step and a node with no part in the case are refused
 * with their Nack codes and sentences, and covers every branch of
 * ml_ce_check_content, the timeline line of ml_ce_detail and the deadline
 * rules. cases.c's own tables are tested in test_cases.c; this suite tests
 * what the engine adds on top of them. */
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "case_engine.h"
#include "cases.h"
#include "casetab.h"
#include "config.h"
#include "ml_common.h"
#include "ml_env.h"

#define R(x) MEDLINK__V1__REFERRAL_STATUS__REFERRAL_##x
#define I(x) MEDLINK__V1__IMAGING_STATUS__IMAGING_##x
#define D(x) MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_##x
#define K(x) MEDLINK__V1__KIND__KIND_##x
#define NACK(x) MEDLINK__V1__NACK_CODE__NACK_##x
#define P(x) MEDLINK__V1__ENVELOPE__PAYLOAD_##x

/* Node indexes: the opener, the target and a node with no part. */
#define OPENER_IX 1u
#define TARGET_IX 2u
#define OTHER_IX 3u

static ml_case_t *s_case(int kind, int state)
{
    ml_case_t *c = ml_case_new("01HCASE0000000000000000001");
    cr_assert_not_null(c);
    c->kind = (uint8_t)kind;
    c->state = (uint8_t)state;
    c->opener = OPENER_IX;
    c->target = TARGET_IX;
    return c;
}

/* Envelopes with their payload on the stack: one struct holds the
 * envelope and every payload so that a test can fill the one it needs. */
typedef struct {
    ml_envelope_t env;
    Medlink__V1__ReferralUpdate ru;
    Medlink__V1__ImagingUpdate iu;
    Medlink__V1__ImagingReport ir;
    Medlink__V1__ImagingChunk ic;
    Medlink__V1__ImagingResend rs;
    Medlink__V1__DownTransferUpdate du;
    Medlink__V1__Referral ref;
    Medlink__V1__Clinician reader;
    uint32_t idx[8];
} s_msg_t;

static void s_init(s_msg_t *m, int kind)
{
    memset(m, 0, sizeof *m);
    m->env = (ml_envelope_t)MEDLINK__V1__ENVELOPE__INIT;
    m->ru = (Medlink__V1__ReferralUpdate)MEDLINK__V1__REFERRAL_UPDATE__INIT;
    m->iu = (Medlink__V1__ImagingUpdate)MEDLINK__V1__IMAGING_UPDATE__INIT;
    m->ir = (Medlink__V1__ImagingReport)MEDLINK__V1__IMAGING_REPORT__INIT;
    m->ic = (Medlink__V1__ImagingChunk)MEDLINK__V1__IMAGING_CHUNK__INIT;
    m->rs = (Medlink__V1__ImagingResend)MEDLINK__V1__IMAGING_RESEND__INIT;
    m->du = (Medlink__V1__DownTransferUpdate)MEDLINK__V1__DOWN_TRANSFER_UPDATE__INIT;
    m->ref = (Medlink__V1__Referral)MEDLINK__V1__REFERRAL__INIT;
    m->reader = (Medlink__V1__Clinician)MEDLINK__V1__CLINICIAN__INIT;
    m->env.id = "01HMSG00000000000000000001";
    m->env.case_id = "01HCASE0000000000000000001";
    m->env.kind = kind;
    switch (kind) {
    case K(REFERRAL):
        m->env.payload_case = P(REFERRAL);
        m->env.referral = &m->ref;
        break;
    case K(REFERRAL_UPDATE):
        m->env.payload_case = P(REFERRAL_UPDATE);
        m->env.referral_update = &m->ru;
        break;
    case K(IMAGING_UPDATE):
        m->env.payload_case = P(IMAGING_UPDATE);
        m->env.imaging_update = &m->iu;
        break;
    case K(IMAGING_REPORT):
        m->env.payload_case = P(IMAGING_REPORT);
        m->env.imaging_report = &m->ir;
        break;
    case K(IMAGING_CHUNK):
        m->env.payload_case = P(IMAGING_CHUNK);
        m->env.imaging_chunk = &m->ic;
        break;
    case K(IMAGING_RESEND):
        m->env.payload_case = P(IMAGING_RESEND);
        m->env.imaging_resend = &m->rs;
        m->rs.chunk_index = m->idx;
        break;
    case K(DOWN_TRANSFER_UPDATE):
        m->env.payload_case = P(DOWN_TRANSFER_UPDATE);
        m->env.down_transfer_update = &m->du;
        break;
    default:
        cr_assert_fail("no payload for kind %d in this suite", kind);
    }
}

static s_msg_t *s_referral_update(s_msg_t *m, int st)
{
    s_init(m, K(REFERRAL_UPDATE));
    m->ru.status = st;
    return m;
}

static s_msg_t *s_imaging_update(s_msg_t *m, int st)
{
    s_init(m, K(IMAGING_UPDATE));
    m->iu.status = st;
    return m;
}

static s_msg_t *s_down_update(s_msg_t *m, int st)
{
    s_init(m, K(DOWN_TRANSFER_UPDATE));
    m->du.status = st;
    return m;
}

/* One step of a message through the engine, composed as ingress.c's
 * s_route_update composes it: a node with no part gets NOT_PARTY (the same
 * sentence as a case that does not exist), then the lifecycle check
 * (ILLEGAL_TRANSITION), then the content check; on success the new state
 * is applied with the deadline rules, and follow-ups are counted, as
 * ingress.c does after the engine's checks. Returns 0 or the Nack code,
 * with err filled in. */
static int s_step(const ml_broker_config_t *cfg, ml_case_t *c, const s_msg_t *m, uint32_t sender,
                  int64_t now, char *err, size_t errlen)
{
    const ml_envelope_t *env = &m->env;
    int ck = ml_case_kind_of_message(env->kind);
    cr_assert_eq(ck, c->kind, "the suite sends a case only its own kind of message");
    int party = ml_ce_party(c, sender);
    if (party == ML_PARTY_OTHER) {
        ml_ce_not_party("clinic-x", c->id, err, errlen);
        return NACK(NOT_PARTY);
    }
    int st = ml_ce_msg_state(env);
    int rc = st < 0 ? ml_case_check_message(ck, c->state, env->kind, party, err, errlen)
                    : ml_case_check(ck, c->state, st, party, err, errlen);
    if (rc != 0) {
        cr_assert_eq(rc, ML_EDENIED);
        return NACK(ILLEGAL_TRANSITION);
    }
    int code = ml_ce_check_content(c, env, st, err, errlen);
    if (code != 0)
        return code;
    if (st >= 0) {
        int old = c->state;
        c->state = (uint8_t)st;
        c->closed = (uint8_t)ml_case_terminal(ck, st);
        if (ck == ML_CASE_DOWN_TRANSFER && st == D(FOLLOW_UP))
            c->follow_ups++;
        ml_ce_deadline_step(cfg, c, old, now);
    }
    return 0;
}

static ml_broker_config_t *s_cfg(void)
{
    ml_broker_config_t *cfg = calloc(1, sizeof *cfg);
    cr_assert_not_null(cfg);
    return cfg;
}

/* ---- party --------------------------------------------------------------- */

Test(case_engine, party_is_opener_target_or_other)
{
    ml_case_t *c = s_case(ML_CASE_REFERRAL, R(SENT));
    cr_assert_eq(ml_ce_party(c, OPENER_IX), ML_PARTY_OPENER);
    cr_assert_eq(ml_ce_party(c, TARGET_IX), ML_PARTY_TARGET);
    cr_assert_eq(ml_ce_party(c, OTHER_IX), ML_PARTY_OTHER);
    cr_assert_eq(ml_ce_party(c, 0), ML_PARTY_OTHER, "index 0 is a node like any other");
    /* A redirect hands the case to another hospital: the one it left has
     * no part in it any more. */
    c->target = OTHER_IX;
    cr_assert_eq(ml_ce_party(c, TARGET_IX), ML_PARTY_OTHER);
    cr_assert_eq(ml_ce_party(c, OTHER_IX), ML_PARTY_TARGET);
    cr_assert_eq(ml_ce_party(c, OPENER_IX), ML_PARTY_OPENER);
    ml_case_free(c);
}

Test(case_engine, not_party_sentence_says_nothing_about_the_case)
{
    /* F11: the same words for a case that exists and one that does not;
     * they name the sender and the case id it sent, never a state or a
     * kind. */
    char a[512], b[512];
    ml_ce_not_party("clinic-x", "01HCASE0000000000000000001", a, sizeof a);
    ml_ce_not_party("clinic-x", "01HCASE0000000000000000001", b, sizeof b);
    cr_assert_str_eq(a, b);
    cr_assert(strstr(a, "node clinic-x has no part in case 01HCASE0000000000000000001"), "%s", a);
    cr_assert(strstr(a, "there is no such case"), "%s", a);
    const char *leaks[] = {"REFERRAL", "IMAGING", "DOWN_TRANSFER",
                           "referral", "imaging", "transfer"};
    for (size_t i = 0; i < sizeof leaks / sizeof leaks[0]; i++)
        cr_assert_null(strstr(a, leaks[i]), "'%s' in: %s", leaks[i], a);
    char small[16];
    ml_ce_not_party("clinic-x", "01HCASE0000000000000000001", small, sizeof small);
    cr_assert_eq(strlen(small), sizeof small - 1, "cut to the buffer, NUL-terminated");
}

Test(case_engine, outsider_refused_before_the_lifecycle)
{
    /* A node with no part asking for a step that would be illegal anyway
     * still gets NOT_PARTY: the lifecycle's sentence would tell it the
     * case's state. */
    ml_broker_config_t *cfg = s_cfg();
    ml_case_t *c = s_case(ML_CASE_REFERRAL, R(ARRIVED));
    s_msg_t m;
    char err[512];
    cr_assert_eq(
        s_step(cfg, c, s_referral_update(&m, R(ACCEPTED)), OTHER_IX, 1000, err, sizeof err),
        NACK(NOT_PARTY));
    cr_assert_null(strstr(err, "ARRIVED"), "%s", err);
    cr_assert_eq(c->state, R(ARRIVED), "nothing changed");
    ml_case_free(c);
    free(cfg);
}

/* ---- the state a message asks for ----------------------------------------- */

Test(case_engine, msg_state_of_each_payload)
{
    s_msg_t m;
    cr_assert_eq(ml_ce_msg_state(&s_referral_update(&m, R(SCHEDULED))->env), R(SCHEDULED));
    cr_assert_eq(ml_ce_msg_state(&s_imaging_update(&m, I(REJECTED))->env), I(REJECTED));
    cr_assert_eq(ml_ce_msg_state(&s_down_update(&m, D(FOLLOW_UP))->env), D(FOLLOW_UP));
    s_init(&m, K(IMAGING_REPORT));
    cr_assert_eq(ml_ce_msg_state(&m.env), I(REPORTED), "a report moves its case to REPORTED");
    s_init(&m, K(IMAGING_CHUNK));
    cr_assert_eq(ml_ce_msg_state(&m.env), -1, "chunks do not move a case");
    s_init(&m, K(IMAGING_RESEND));
    cr_assert_eq(ml_ce_msg_state(&m.env), -1, "resend requests do not move a case");
    s_init(&m, K(REFERRAL));
    cr_assert_eq(ml_ce_msg_state(&m.env), -1, "an opening is not a step");
    m.env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD__NOT_SET;
    cr_assert_eq(ml_ce_msg_state(&m.env), -1);
}

/* ---- each kind's path ------------------------------------------------------ */

Test(case_engine, referral_path_sent_to_closed)
{
    ml_broker_config_t *cfg = s_cfg();
    ml_case_t *c = s_case(ML_CASE_REFERRAL, R(SENT));
    s_msg_t m;
    char err[512] = "";
    int64_t now = 1700000000000;
    cr_assert_eq(
        s_step(cfg, c, s_referral_update(&m, R(ACCEPTED)), TARGET_IX, now, err, sizeof err), 0,
        "%s", err);
    cr_assert_eq(c->state, R(ACCEPTED));
    s_referral_update(&m, R(SCHEDULED));
    m.ru.scheduled_at = now + 86400000;
    m.ru.department = "cardiology";
    cr_assert_eq(s_step(cfg, c, &m, TARGET_IX, now, err, sizeof err), 0, "%s", err);
    /* Rescheduled: SCHEDULED -> SCHEDULED is a step too. */
    m.ru.scheduled_at += 3600000;
    cr_assert_eq(s_step(cfg, c, &m, TARGET_IX, now, err, sizeof err), 0, "%s", err);
    cr_assert_eq(s_step(cfg, c, s_referral_update(&m, R(ARRIVED)), TARGET_IX, now, err, sizeof err),
                 0, "%s", err);
    cr_assert_eq(
        s_step(cfg, c, s_referral_update(&m, R(ADMITTED)), TARGET_IX, now, err, sizeof err), 0,
        "%s", err);
    s_referral_update(&m, R(DISCHARGED));
    m.ru.outcome_summary = "recovered; follow-up at the clinic";
    cr_assert_eq(s_step(cfg, c, &m, TARGET_IX, now, err, sizeof err), 0, "%s", err);
    cr_assert_not(c->closed);
    cr_assert_eq(s_step(cfg, c, s_referral_update(&m, R(CLOSED)), OPENER_IX, now, err, sizeof err),
                 0, "the referring clinic closes the loop: %s", err);
    cr_assert_eq(c->state, R(CLOSED));
    cr_assert(c->closed);
    /* Final: nothing leaves CLOSED. */
    cr_assert_eq(
        s_step(cfg, c, s_referral_update(&m, R(CANCELLED)), OPENER_IX, now, err, sizeof err),
        NACK(ILLEGAL_TRANSITION));
    cr_assert(strstr(err, "REFERRAL_CLOSED, which is final"), "%s", err);
    ml_case_free(c);
    free(cfg);
}

Test(case_engine, referral_redirect_cancel_and_reject)
{
    ml_broker_config_t *cfg = s_cfg();
    s_msg_t m;
    char err[512] = "";
    ml_case_t *c = s_case(ML_CASE_REFERRAL, R(DELIVERED));
    s_referral_update(&m, R(REDIRECTED));
    m.ru.redirect_to = "hosp-b";
    cr_assert_eq(s_step(cfg, c, &m, TARGET_IX, 1, err, sizeof err), 0, "%s", err);
    cr_assert_eq(c->state, R(REDIRECTED));
    cr_assert_eq(s_step(cfg, c, s_referral_update(&m, R(CANCELLED)), OPENER_IX, 2, err, sizeof err),
                 0, "the referring clinic withdraws it: %s", err);
    cr_assert(c->closed);
    ml_case_free(c);

    c = s_case(ML_CASE_REFERRAL, R(SENT));
    s_referral_update(&m, R(REJECTED));
    m.ru.reason = "no beds";
    cr_assert_eq(s_step(cfg, c, &m, TARGET_IX, 1, err, sizeof err), 0, "%s", err);
    cr_assert(c->closed);
    ml_case_free(c);
    free(cfg);
}

Test(case_engine, imaging_path_requested_to_closed)
{
    ml_broker_config_t *cfg = s_cfg();
    ml_case_t *c = s_case(ML_CASE_IMAGING, I(REQUESTED));
    c->n_objects = 2;
    s_msg_t m;
    char err[512] = "";
    /* The study, chunk by chunk, from the clinic; a resend asked by the
     * reading centre: neither moves the case. */
    s_init(&m, K(IMAGING_CHUNK));
    m.ic.object_index = 1;
    cr_assert_eq(s_step(cfg, c, &m, OPENER_IX, 1, err, sizeof err), 0, "%s", err);
    cr_assert_eq(c->state, I(REQUESTED));
    cr_assert_eq(s_step(cfg, c, &m, TARGET_IX, 1, err, sizeof err), NACK(ILLEGAL_TRANSITION),
                 "chunks come from the requesting clinic only");
    c->state = I(ASSIGNED); /* the broker's step, on the reading centre's ack */
    s_init(&m, K(IMAGING_RESEND));
    m.rs.object_index = 0;
    m.idx[0] = 3;
    m.rs.n_chunk_index = 1;
    cr_assert_eq(s_step(cfg, c, &m, TARGET_IX, 2, err, sizeof err), 0, "%s", err);
    cr_assert_eq(c->state, I(ASSIGNED));
    s_imaging_update(&m, I(STUDY_RECEIVED));
    m.iu.objects_received = 2;
    cr_assert_eq(s_step(cfg, c, &m, TARGET_IX, 3, err, sizeof err), 0, "%s", err);
    /* Chunks are no longer taken once the study is received. */
    s_init(&m, K(IMAGING_CHUNK));
    cr_assert_eq(s_step(cfg, c, &m, OPENER_IX, 4, err, sizeof err), NACK(ILLEGAL_TRANSITION));
    cr_assert(strstr(err, "illegal message: case is IMAGING_STUDY_RECEIVED"), "%s", err);
    s_init(&m, K(IMAGING_REPORT));
    cr_assert_eq(s_step(cfg, c, &m, TARGET_IX, 5, err, sizeof err), 0, "%s", err);
    cr_assert_eq(c->state, I(REPORTED));
    cr_assert_eq(s_step(cfg, c, &m, TARGET_IX, 6, err, sizeof err), 0, "an amended report: %s",
                 err);
    cr_assert_eq(s_step(cfg, c, s_imaging_update(&m, I(CLOSED)), OPENER_IX, 7, err, sizeof err), 0,
                 "%s", err);
    cr_assert(c->closed);
    ml_case_free(c);
    free(cfg);
}

Test(case_engine, down_transfer_path_with_numbered_follow_ups)
{
    ml_broker_config_t *cfg = s_cfg();
    ml_case_t *c = s_case(ML_CASE_DOWN_TRANSFER, D(OFFERED));
    s_msg_t m;
    char err[512] = "";
    cr_assert_eq(s_step(cfg, c, s_down_update(&m, D(ACCEPTED)), TARGET_IX, 1, err, sizeof err), 0,
                 "%s", err);
    cr_assert_eq(s_step(cfg, c, s_down_update(&m, D(ARRIVED)), TARGET_IX, 2, err, sizeof err), 0,
                 "%s", err);
    for (uint32_t n = 1; n <= 3; n++) {
        s_down_update(&m, D(FOLLOW_UP));
        m.du.follow_up_number = n;
        cr_assert_eq(s_step(cfg, c, &m, TARGET_IX, 2 + n, err, sizeof err), 0, "follow-up %u: %s",
                     n, err);
        cr_assert_eq(c->follow_ups, n);
    }
    /* The same number again is refused: the next one is 4. */
    s_down_update(&m, D(FOLLOW_UP));
    m.du.follow_up_number = 3;
    cr_assert_eq(s_step(cfg, c, &m, TARGET_IX, 9, err, sizeof err), NACK(INVALID));
    cr_assert_eq(c->follow_ups, 3);
    cr_assert_eq(s_step(cfg, c, s_down_update(&m, D(COMPLETED)), TARGET_IX, 10, err, sizeof err), 0,
                 "%s", err);
    cr_assert(c->closed);
    ml_case_free(c);
    free(cfg);
}

/* ---- illegal steps ----------------------------------------------------------- */

Test(case_engine, illegal_step_refused_with_code_and_reason)
{
    ml_broker_config_t *cfg = s_cfg();
    ml_case_t *c = s_case(ML_CASE_REFERRAL, R(ARRIVED));
    s_msg_t m;
    char err[512] = "";
    cr_assert_eq(s_step(cfg, c, s_referral_update(&m, R(ACCEPTED)), TARGET_IX, 1, err, sizeof err),
                 NACK(ILLEGAL_TRANSITION));
    cr_assert_str_eq(err, "illegal transition: case is REFERRAL_ARRIVED, REFERRAL_ACCEPTED is not "
                          "allowed from it");
    cr_assert_eq(c->state, R(ARRIVED), "a refused step changes nothing");

    /* The right step from the wrong party: the sentence says who may. */
    c->state = R(ACCEPTED);
    s_referral_update(&m, R(SCHEDULED));
    m.ru.scheduled_at = 1;
    cr_assert_eq(s_step(cfg, c, &m, OPENER_IX, 1, err, sizeof err), NACK(ILLEGAL_TRANSITION));
    cr_assert_str_eq(err, "REFERRAL_SCHEDULED may only be set by the receiving hospital (case is "
                          "REFERRAL_ACCEPTED)");
    /* A step only the broker makes (delivery) is nobody else's. */
    cr_assert_eq(s_step(cfg, c, s_referral_update(&m, R(DELIVERED)), TARGET_IX, 1, err, sizeof err),
                 NACK(ILLEGAL_TRANSITION));
    cr_assert_eq(c->state, R(ACCEPTED));
    ml_case_free(c);

    /* The lifecycle comes before the content: an illegal step with a
     * missing field is refused for the step. */
    c = s_case(ML_CASE_REFERRAL, R(SENT));
    cr_assert_eq(
        s_step(cfg, c, s_referral_update(&m, R(DISCHARGED)), TARGET_IX, 1, err, sizeof err),
        NACK(ILLEGAL_TRANSITION));
    cr_assert(strstr(err, "illegal transition"), "%s", err);
    ml_case_free(c);
    free(cfg);
}

/* ---- content checks ----------------------------------------------------------- */

Test(case_engine, content_referral_required_fields)
{
    ml_case_t *c = s_case(ML_CASE_REFERRAL, R(ACCEPTED));
    s_msg_t m;
    char err[512];
    s_referral_update(&m, R(SCHEDULED));
    strcpy(err, "untouched");
    cr_assert_eq(ml_ce_check_content(c, &m.env, R(SCHEDULED), err, sizeof err), NACK(INVALID));
    cr_assert_str_eq(err,
                     "referral_update.scheduled_at is required when status is REFERRAL_SCHEDULED");
    m.ru.scheduled_at = -5;
    cr_assert_eq(ml_ce_check_content(c, &m.env, R(SCHEDULED), err, sizeof err), NACK(INVALID),
                 "a time before 1970 is no appointment");
    m.ru.scheduled_at = 1;
    strcpy(err, "untouched");
    cr_assert_eq(ml_ce_check_content(c, &m.env, R(SCHEDULED), err, sizeof err), 0);
    cr_assert_str_eq(err, "untouched", "err is written only with a refusal");

    c->state = R(ADMITTED);
    s_referral_update(&m, R(DISCHARGED));
    cr_assert_eq(ml_ce_check_content(c, &m.env, R(DISCHARGED), err, sizeof err), NACK(INVALID));
    cr_assert_str_eq(err, "referral_update.outcome_summary is required when status is "
                          "REFERRAL_DISCHARGED");
    m.ru.outcome_summary = "";
    cr_assert_eq(ml_ce_check_content(c, &m.env, R(DISCHARGED), err, sizeof err), NACK(INVALID),
                 "an empty summary is none");
    m.ru.outcome_summary = "home";
    cr_assert_eq(ml_ce_check_content(c, &m.env, R(DISCHARGED), err, sizeof err), 0);

    /* States without a required field pass with nothing in them. */
    int plain[] = {R(ACCEPTED), R(ARRIVED), R(ADMITTED), R(NO_SHOW), R(CLOSED)};
    for (size_t i = 0; i < sizeof plain / sizeof plain[0]; i++) {
        s_referral_update(&m, plain[i]);
        cr_assert_eq(ml_ce_check_content(c, &m.env, plain[i], err, sizeof err), 0, "state %d",
                     plain[i]);
    }
    ml_case_free(c);
}

Test(case_engine, content_down_transfer_numbering_and_re_referral)
{
    ml_case_t *c = s_case(ML_CASE_DOWN_TRANSFER, D(ARRIVED));
    s_msg_t m;
    char err[512];
    s_down_update(&m, D(FOLLOW_UP));
    m.du.follow_up_number = 0;
    cr_assert_eq(ml_ce_check_content(c, &m.env, D(FOLLOW_UP), err, sizeof err), NACK(INVALID));
    cr_assert_str_eq(err, "down_transfer_update.follow_up_number 0: case "
                          "01HCASE0000000000000000001 has 0 follow-up(s), so the next one is 1");
    m.du.follow_up_number = 2;
    cr_assert_eq(ml_ce_check_content(c, &m.env, D(FOLLOW_UP), err, sizeof err), NACK(INVALID),
                 "no gaps");
    m.du.follow_up_number = 1;
    cr_assert_eq(ml_ce_check_content(c, &m.env, D(FOLLOW_UP), err, sizeof err), 0);
    c->follow_ups = 7;
    m.du.follow_up_number = 8;
    cr_assert_eq(ml_ce_check_content(c, &m.env, D(FOLLOW_UP), err, sizeof err), 0);
    m.du.follow_up_number = 7;
    cr_assert_eq(ml_ce_check_content(c, &m.env, D(FOLLOW_UP), err, sizeof err), NACK(INVALID));
    cr_assert(strstr(err, "has 7 follow-up(s), so the next one is 8"), "%s", err);

    /* The numbering is for FOLLOW_UP only. */
    s_down_update(&m, D(COMPLETED));
    m.du.follow_up_number = 99;
    cr_assert_eq(ml_ce_check_content(c, &m.env, D(COMPLETED), err, sizeof err), 0);

    /* RE_REFERRED is the broker's, from a linked Referral. */
    s_down_update(&m, D(RE_REFERRED));
    cr_assert_eq(ml_ce_check_content(c, &m.env, D(RE_REFERRED), err, sizeof err), NACK(INVALID));
    cr_assert_str_eq(err, "DOWN_TRANSFER_RE_REFERRED is set by the broker: send a Referral whose "
                          "linked_case_id is 01HCASE0000000000000000001");
    ml_case_free(c);
}

Test(case_engine, content_incoming_expired_only_with_rejection)
{
    ml_case_t *c = s_case(ML_CASE_IMAGING, I(ASSIGNED));
    s_msg_t m;
    char err[512];
    s_imaging_update(&m, I(STUDY_RECEIVED));
    m.iu.incoming_expired = 1;
    cr_assert_eq(ml_ce_check_content(c, &m.env, I(STUDY_RECEIVED), err, sizeof err), NACK(INVALID));
    cr_assert_str_eq(err, "imaging_update.incoming_expired is set only with IMAGING_REJECTED");
    s_imaging_update(&m, I(REJECTED));
    m.iu.incoming_expired = 1;
    m.iu.reason = "the study did not arrive in time";
    cr_assert_eq(ml_ce_check_content(c, &m.env, I(REJECTED), err, sizeof err), 0);
    m.iu.incoming_expired = 0;
    cr_assert_eq(ml_ce_check_content(c, &m.env, I(REJECTED), err, sizeof err), 0);
    ml_case_free(c);
}

Test(case_engine, content_object_index_within_the_consult)
{
    ml_case_t *c = s_case(ML_CASE_IMAGING, I(REQUESTED));
    c->n_objects = 3;
    s_msg_t m;
    char err[512];
    s_init(&m, K(IMAGING_CHUNK));
    m.ic.object_index = 2;
    cr_assert_eq(ml_ce_check_content(c, &m.env, -1, err, sizeof err), 0);
    m.ic.object_index = 3;
    cr_assert_eq(ml_ce_check_content(c, &m.env, -1, err, sizeof err), NACK(INVALID));
    cr_assert_str_eq(err, "imaging_chunk.object_index 3: the consult of case "
                          "01HCASE0000000000000000001 has 3 object(s)");
    m.ic.object_index = UINT32_MAX;
    cr_assert_eq(ml_ce_check_content(c, &m.env, -1, err, sizeof err), NACK(INVALID));

    s_init(&m, K(IMAGING_RESEND));
    m.rs.object_index = 0;
    cr_assert_eq(ml_ce_check_content(c, &m.env, -1, err, sizeof err), 0);
    m.rs.object_index = 5;
    cr_assert_eq(ml_ce_check_content(c, &m.env, -1, err, sizeof err), NACK(INVALID));
    cr_assert_str_eq(err, "imaging_resend.object_index 5: the consult of case "
                          "01HCASE0000000000000000001 has 3 object(s)");

    /* A consult that declared no objects takes no chunk at all. */
    c->n_objects = 0;
    s_init(&m, K(IMAGING_CHUNK));
    cr_assert_eq(ml_ce_check_content(c, &m.env, -1, err, sizeof err), NACK(INVALID));
    ml_case_free(c);
}

Test(case_engine, content_other_payloads_pass)
{
    ml_case_t *c = s_case(ML_CASE_IMAGING, I(STUDY_RECEIVED));
    s_msg_t m;
    char err[512] = "untouched";
    s_init(&m, K(IMAGING_REPORT));
    cr_assert_eq(ml_ce_check_content(c, &m.env, I(REPORTED), err, sizeof err), 0);
    s_init(&m, K(REFERRAL));
    cr_assert_eq(ml_ce_check_content(c, &m.env, -1, err, sizeof err), 0);
    cr_assert_str_eq(err, "untouched");
    ml_case_free(c);
}

/* ---- the timeline line -------------------------------------------------------- */

Test(case_engine, detail_referral_update)
{
    s_msg_t m;
    char buf[400], t[32];
    s_referral_update(&m, R(REDIRECTED));
    m.ru.redirect_to = "hosp-b";
    m.ru.reason = "no cardiology bed";
    m.ru.notes = "ignored: the redirect says it";
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, "redirected to hosp-b: no cardiology bed");
    m.ru.reason = "";
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, "redirected to hosp-b");

    s_referral_update(&m, R(SCHEDULED));
    m.ru.scheduled_at = 1767225600000; /* 2026-01-01 00:00 UTC */
    m.ru.department = "cardiology";
    char want[128];
    snprintf(want, sizeof want, "appointment %s, cardiology",
             ml_time_format(m.ru.scheduled_at, t, sizeof t));
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, want);
    m.ru.department = NULL;
    snprintf(want, sizeof want, "appointment %s", ml_time_format(m.ru.scheduled_at, t, sizeof t));
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, want);

    /* Then the reason, the outcome, the notes, in that order. */
    s_referral_update(&m, R(REJECTED));
    m.ru.reason = "no beds";
    m.ru.outcome_summary = "x";
    m.ru.notes = "y";
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, "no beds");
    m.ru.reason = NULL;
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, "outcome: x");
    m.ru.outcome_summary = NULL;
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, "y");
    m.ru.notes = NULL;
    strcpy(buf, "stale");
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, "", "nothing to say is an empty line, not the last one");
}

Test(case_engine, detail_imaging_and_down_transfer)
{
    s_msg_t m;
    char buf[400];
    s_imaging_update(&m, I(STUDY_RECEIVED));
    m.iu.objects_received = 3;
    m.iu.bytes_received = 1048576;
    m.iu.notes = "not shown";
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, "3 object(s), 1048576 bytes verified");
    s_imaging_update(&m, I(REJECTED));
    m.iu.reason = "unreadable";
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, "unreadable");

    s_init(&m, K(IMAGING_REPORT));
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, "report signed by the reader");
    m.ir.critical_finding = 1;
    m.ir.reader = &m.reader;
    m.reader.name = "Dr Novak";
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, "CRITICAL report signed by Dr Novak");

    s_init(&m, K(IMAGING_RESEND));
    m.rs.object_index = 1;
    m.rs.n_chunk_index = 3;
    m.rs.reason = "digest mismatch";
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, "object 1: 3 chunk(s) asked for again: digest mismatch");
    m.rs.reason = NULL;
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, "object 1: 3 chunk(s) asked for again");

    s_down_update(&m, D(FOLLOW_UP));
    m.du.follow_up_number = 2;
    m.du.notes = "phone call";
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, "follow-up 2: phone call");
    m.du.notes = NULL;
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, "follow-up 2");
    s_down_update(&m, D(DECLINED));
    m.du.reason = "no physiotherapist";
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, "no physiotherapist");

    /* A chunk is counted, not described; a short buffer is cut. */
    s_init(&m, K(IMAGING_CHUNK));
    strcpy(buf, "stale");
    ml_ce_detail(&m.env, buf, sizeof buf);
    cr_assert_str_eq(buf, "");
    char small[8];
    s_init(&m, K(IMAGING_REPORT));
    ml_ce_detail(&m.env, small, sizeof small);
    cr_assert_str_eq(small, "report ");
}

/* ---- deadlines ------------------------------------------------------------------ */

Test(case_engine, met_by_rank_or_final_state)
{
    ml_case_t *c = s_case(ML_CASE_REFERRAL, R(SENT));
    c->deadline_state = R(ACCEPTED);
    cr_assert_not(ml_ce_met(c, R(SENT)));
    cr_assert_not(ml_ce_met(c, R(DELIVERED)));
    cr_assert_not(ml_ce_met(c, R(REDIRECTED)), "a hand-on is not a decision");
    cr_assert(ml_ce_met(c, R(ACCEPTED)));
    cr_assert(ml_ce_met(c, R(SCHEDULED)), "past the target counts");
    cr_assert(ml_ce_met(c, R(REJECTED)), "a final state ends the wait");
    cr_assert(ml_ce_met(c, R(CANCELLED)));
    ml_case_free(c);
}

Test(case_engine, deadline_from_opening_runs_until_met)
{
    ml_broker_config_t *cfg = s_cfg();
    cfg->deadlines[ML_CASE_REFERRAL][2] =
        (ml_deadline_rule_t){.set = 1, .target_state = R(ACCEPTED), .ms = 3600000};
    ml_case_t *c = s_case(ML_CASE_REFERRAL, R(SENT));
    c->priority = 2;
    ml_ce_deadline_step(cfg, c, 0, 1000);
    cr_assert_eq(c->deadline_at, 1000 + 3600000);
    cr_assert_eq(c->deadline_state, R(ACCEPTED));
    cr_assert_eq(c->fired, 0);

    /* Delivered: not met, the deadline keeps running unchanged. */
    c->fired = 1;
    c->state = R(DELIVERED);
    ml_ce_deadline_step(cfg, c, R(SENT), 5000);
    cr_assert_eq(c->deadline_at, 1000 + 3600000);
    cr_assert_eq(c->fired, 1, "an escalated deadline stays escalated");

    /* Accepted: met, cleared, and not started again by a later step. */
    c->state = R(ACCEPTED);
    ml_ce_deadline_step(cfg, c, R(DELIVERED), 9000);
    cr_assert_eq(c->deadline_at, 0);
    cr_assert_eq(c->fired, 0);
    c->state = R(SCHEDULED);
    ml_ce_deadline_step(cfg, c, R(ACCEPTED), 9500);
    cr_assert_eq(c->deadline_at, 0, "an opening rule starts only at the opening");

    /* Another priority has no rule: nothing starts. */
    ml_case_t *d = s_case(ML_CASE_REFERRAL, R(SENT));
    d->priority = 1;
    ml_ce_deadline_step(cfg, d, 0, 1000);
    cr_assert_eq(d->deadline_at, 0);
    ml_case_free(d);
    ml_case_free(c);
    free(cfg);
}

Test(case_engine, deadline_after_a_state_starts_on_entering_it)
{
    ml_broker_config_t *cfg = s_cfg();
    cfg->deadlines[ML_CASE_IMAGING][0] = (ml_deadline_rule_t){
        .set = 1, .target_state = I(REPORTED), .after_state = I(STUDY_RECEIVED), .ms = 7200000};
    ml_broker_config_t *none = s_cfg();
    ml_case_t *c = s_case(ML_CASE_IMAGING, I(REQUESTED));
    ml_ce_deadline_step(cfg, c, 0, 10);
    cr_assert_eq(c->deadline_at, 0, "not at the opening");
    c->state = I(STUDY_RECEIVED);
    ml_ce_deadline_step(cfg, c, I(ASSIGNED), 20);
    cr_assert_eq(c->deadline_at, 20 + 7200000);
    cr_assert_eq(c->deadline_state, I(REPORTED));
    /* Entering it again (a state that follows itself) does not restart a
     * deadline that was cleared. */
    c->deadline_at = 0;
    ml_ce_deadline_step(cfg, c, I(STUDY_RECEIVED), 30);
    cr_assert_eq(c->deadline_at, 0);
    /* The report meets it. */
    c->deadline_at = 20 + 7200000;
    c->state = I(REPORTED);
    ml_ce_deadline_step(cfg, c, I(STUDY_RECEIVED), 40);
    cr_assert_eq(c->deadline_at, 0);

    /* Without a rule, a running deadline still ends once it is met (a
     * reload removed the rule). */
    c->deadline_at = 99;
    c->deadline_state = I(REPORTED);
    ml_ce_deadline_step(none, c, I(REPORTED), 50);
    cr_assert_eq(c->deadline_at, 0);
    ml_case_free(c);
    free(none);
    free(cfg);
}

Test(case_engine, deadline_never_starts_on_a_closed_or_met_case)
{
    ml_broker_config_t *cfg = s_cfg();
    cfg->deadlines[ML_CASE_DOWN_TRANSFER][0] =
        (ml_deadline_rule_t){.set = 1, .target_state = D(ARRIVED), .ms = 1000};
    ml_case_t *c = s_case(ML_CASE_DOWN_TRANSFER, D(CANCELLED));
    c->closed = 1;
    ml_ce_deadline_step(cfg, c, 0, 10);
    cr_assert_eq(c->deadline_at, 0, "a closed case gets no deadline");
    cr_assert_eq(c->deadline_state, 0, "nor a deadline state to be measured against");
    ml_case_free(c);

    /* A rule whose target is the opening state is met at once: its state
     * is recorded, but nothing runs. */
    cfg->deadlines[ML_CASE_DOWN_TRANSFER][0].target_state = D(OFFERED);
    c = s_case(ML_CASE_DOWN_TRANSFER, D(OFFERED));
    ml_ce_deadline_step(cfg, c, 0, 10);
    cr_assert_eq(c->deadline_state, D(OFFERED));
    cr_assert_eq(c->deadline_at, 0);
    ml_case_free(c);
    free(cfg);
}

Test(case_engine, deadline_through_the_path)
{
    /* The engine's steps and its deadline rules together: the down-transfer
     * must arrive within an hour of being offered; accepting it does not
     * meet that, arriving does. */
    ml_broker_config_t *cfg = s_cfg();
    cfg->deadlines[ML_CASE_DOWN_TRANSFER][0] =
        (ml_deadline_rule_t){.set = 1, .target_state = D(ARRIVED), .ms = 3600000};
    ml_case_t *c = s_case(ML_CASE_DOWN_TRANSFER, D(OFFERED));
    ml_ce_deadline_step(cfg, c, 0, 100);
    cr_assert_eq(c->deadline_at, 100 + 3600000);
    s_msg_t m;
    char err[512] = "";
    cr_assert_eq(s_step(cfg, c, s_down_update(&m, D(ACCEPTED)), TARGET_IX, 200, err, sizeof err), 0,
                 "%s", err);
    cr_assert_eq(c->deadline_at, 100 + 3600000);
    /* A refused step leaves the deadline alone. */
    cr_assert_eq(s_step(cfg, c, s_down_update(&m, D(ARRIVED)), OPENER_IX, 300, err, sizeof err),
                 NACK(ILLEGAL_TRANSITION));
    cr_assert_eq(c->deadline_at, 100 + 3600000);
    cr_assert_eq(s_step(cfg, c, s_down_update(&m, D(ARRIVED)), TARGET_IX, 400, err, sizeof err), 0,
                 "%s", err);
    cr_assert_eq(c->deadline_at, 0);
    ml_case_free(c);
    free(cfg);
}
