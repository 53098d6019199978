/* Unit tests for ml_env: validation of routed envelopes (each refusal must
 * name the field, since the sentence goes back to the sender in a Nack),
 * the kind <-> payload table, names, and pack/unpack. */
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "ml_common.h"
#include "ml_env.h"

/* One valid referral envelope per test, on the stack of the fixture. */
static Medlink__V1__Patient s_patient;
static Medlink__V1__Diagnosis s_d1, s_d2;
static Medlink__V1__Diagnosis *s_diags[2];
static Medlink__V1__Referral s_ref;
static Medlink__V1__ReferralUpdate s_upd;
static ml_envelope_t s_env;

static void s_setup(void)
{
    Medlink__V1__Patient p = MEDLINK__V1__PATIENT__INIT;
    Medlink__V1__Diagnosis d = MEDLINK__V1__DIAGNOSIS__INIT;
    Medlink__V1__Referral r = MEDLINK__V1__REFERRAL__INIT;
    Medlink__V1__ReferralUpdate u = MEDLINK__V1__REFERRAL_UPDATE__INIT;
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    s_patient = p;
    s_d1 = d;
    s_d2 = d;
    s_ref = r;
    s_upd = u;
    s_env = e;
    s_patient.name = "Wang Fang";
    s_patient.health_card_id = "130133198001011234";
    s_d1.icd10 = "J18.9";
    s_d2.icd10 = "I10";
    s_diags[0] = &s_d1;
    s_diags[1] = &s_d2;
    s_ref.patient = &s_patient;
    s_ref.reason = "CT needed";
    s_ref.n_diagnosis = 2;
    s_ref.diagnosis = s_diags;
    s_env.id = "01JD0000000000000000000000";
    s_env.case_id = "case-1";
    s_env.from = "township.xinzhai.clinic";
    s_env.to = "county.zhaozhou.hospital";
    s_env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL;
    s_env.referral = &s_ref;
}

TestSuite(env, .init = s_setup);

/* Validation must fail with ML_EINVAL and a sentence containing want. */
static void s_refused(const char *want)
{
    char err[256] = "";
    int rc = ml_env_validate(&s_env, err, sizeof err);
    cr_assert_eq(rc, ML_EINVAL, "expected refusal (%s)", want);
    cr_assert(strstr(err, want), "error \"%s\" does not contain \"%s\"", err, want);
}

static void s_use_update(int status)
{
    s_env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL_UPDATE;
    s_env.referral_update = &s_upd;
    s_upd.status = status;
}

Test(env, good_referral_passes_and_kind_is_filled_in)
{
    char err[256] = "";
    cr_assert_eq(s_env.kind, MEDLINK__V1__KIND__KIND_UNSPECIFIED);
    cr_assert_eq(ml_env_validate(&s_env, err, sizeof err), 0, "%s", err);
    cr_assert_eq(s_env.kind, MEDLINK__V1__KIND__KIND_REFERRAL);
    /* And again, now with the kind set. */
    cr_assert_eq(ml_env_validate(&s_env, err, sizeof err), 0, "%s", err);
}

Test(env, envelope_fields_required)
{
    s_env.id = "";
    s_refused("id is required");
    s_env.id = "not-a-ulid";
    s_refused("id \"not-a-ulid\" is not a ULID");
    s_setup();
    s_env.case_id = "";
    s_refused("case_id is required");
    char long_case[200];
    memset(long_case, 'c', sizeof long_case - 1);
    long_case[sizeof long_case - 1] = '\0';
    s_env.case_id = long_case;
    s_refused("case_id is longer than 128");
    s_setup();
    s_env.from = "";
    s_refused("from is required");
    s_env.from = "bad node";
    s_refused("from \"bad node\" may only contain");
    s_setup();
    s_env.to = "";
    s_refused("to is required");
    s_env.to = "x/../y";
    s_refused("to \"x/../y\" may only contain");
    s_setup();
    s_env.priority = 7;
    s_refused("priority 7 is out of range");
}

Test(env, payload_required_and_must_match_kind)
{
    s_env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD__NOT_SET;
    s_refused("payload is required");
    s_setup();
    s_env.kind = MEDLINK__V1__KIND__KIND_REFERRAL_UPDATE;
    s_refused("kind REFERRAL_UPDATE does not match the payload, which is a REFERRAL");
    cr_assert_eq(s_env.kind, MEDLINK__V1__KIND__KIND_REFERRAL_UPDATE, "left as sent");

    Medlink__V1__Hello h = MEDLINK__V1__HELLO__INIT;
    s_setup();
    s_env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_HELLO;
    s_env.hello = &h;
    s_refused("kind HELLO is a session message");
}

Test(env, referral_fields_required)
{
    s_ref.patient = NULL;
    s_refused("referral.patient is required");
    s_setup();
    s_patient.name = "";
    s_refused("referral.patient.name is required");
    s_setup();
    s_patient.health_card_id = "";
    s_refused("referral.patient.health_card_id is required");
    s_setup();
    s_patient.sex = 9;
    s_refused("referral.patient.sex 9");
    s_setup();
    s_ref.reason = "";
    s_refused("referral.reason is required");
    s_setup();
    s_d2.icd10 = "";
    s_refused("referral.diagnosis[1].icd10 is required");
}

Test(env, icd10_codes_checked)
{
    const char *good[] = {"A00",    "J18",   "J18.9",       "S72.001A",
                          "I21.4Z", "C4A.0", "I21.000x002", "J18.900x001"};
    const char *bad[] = {"j18",   "J1",     "J18.", "J18.123456789", "18.9",
                         "J18-9", "J18.9 ", "JJ8",  "J18.9y",        "1AB"};
    char err[256];
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        s_d1.icd10 = (char *)good[i];
        cr_assert_eq(ml_env_validate(&s_env, err, sizeof err), 0, "%s: %s", good[i], err);
    }
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        s_d1.icd10 = (char *)bad[i];
        s_refused("referral.diagnosis[0].icd10");
        s_refused("is not an ICD-10 code");
    }
}

Test(env, referral_update_rules)
{
    char err[256] = "";
    s_use_update(MEDLINK__V1__REFERRAL_STATUS__REFERRAL_STATUS_UNSPECIFIED);
    s_refused("referral_update.status is required");
    s_upd.status = 77;
    s_refused("referral_update.status 77 is not a known status");
    s_upd.status = MEDLINK__V1__REFERRAL_STATUS__REFERRAL_REDIRECTED;
    s_refused("referral_update.redirect_to is required when status is REFERRAL_REDIRECTED");
    s_upd.redirect_to = "city.hospital";
    cr_assert_eq(ml_env_validate(&s_env, err, sizeof err), 0, "%s", err);
    cr_assert_eq(s_env.kind, MEDLINK__V1__KIND__KIND_REFERRAL_UPDATE);
    s_upd.status = MEDLINK__V1__REFERRAL_STATUS__REFERRAL_REJECTED;
    s_refused("referral_update.reason is required when status is REFERRAL_REJECTED");
    s_upd.status = MEDLINK__V1__REFERRAL_STATUS__REFERRAL_CANCELLED;
    s_refused("referral_update.reason is required when status is REFERRAL_CANCELLED");
    s_upd.reason = "patient went elsewhere";
    cr_assert_eq(ml_env_validate(&s_env, err, sizeof err), 0, "%s", err);
    s_upd.status = MEDLINK__V1__REFERRAL_STATUS__REFERRAL_ACCEPTED;
    s_upd.reason = "";
    cr_assert_eq(ml_env_validate(&s_env, err, sizeof err), 0, "%s", err);
}

Test(env, kind_table_and_names)
{
    cr_assert_eq(ml_env_kind_of_payload(MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL_UPDATE),
                 MEDLINK__V1__KIND__KIND_REFERRAL_UPDATE);
    cr_assert_eq(ml_env_kind_of_payload(MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REPLY),
                 MEDLINK__V1__KIND__KIND_ADMIN_REPLY);
    cr_assert_eq(ml_env_kind_of_payload(0), MEDLINK__V1__KIND__KIND_UNSPECIFIED);
    cr_assert(ml_env_kind_is_routed(MEDLINK__V1__KIND__KIND_REFERRAL));
    cr_assert(!ml_env_kind_is_routed(MEDLINK__V1__KIND__KIND_ACK));

    cr_assert_str_eq(ml_kind_name(MEDLINK__V1__KIND__KIND_ADMIN_REQUEST), "ADMIN_REQUEST");
    cr_assert_str_eq(ml_kind_name(MEDLINK__V1__KIND__KIND_REFERRAL_UPDATE), "REFERRAL_UPDATE");
    cr_assert_str_eq(ml_kind_name(0), "UNSPECIFIED");
    cr_assert_str_eq(ml_kind_name(1234), "UNSPECIFIED");

    int k = -1;
    cr_assert_eq(ml_kind_parse("referral_update", &k), 0);
    cr_assert_eq(k, MEDLINK__V1__KIND__KIND_REFERRAL_UPDATE);
    cr_assert_eq(ml_kind_parse("KIND_HEARTBEAT", &k), 0);
    cr_assert_eq(k, MEDLINK__V1__KIND__KIND_HEARTBEAT);
    cr_assert_eq(ml_kind_parse("Nack", &k), 0);
    cr_assert_eq(k, MEDLINK__V1__KIND__KIND_NACK);
    cr_assert_eq(ml_kind_parse("UNSPECIFIED", &k), ML_EINVAL);
    cr_assert_eq(ml_kind_parse("REFERAL", &k), ML_EINVAL);

    int p = -1;
    cr_assert_str_eq(ml_priority_name(MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY), "EMERGENCY");
    cr_assert_eq(ml_priority_parse("urgent", &p), 0);
    cr_assert_eq(p, MEDLINK__V1__PRIORITY__PRIORITY_URGENT);
    cr_assert_eq(ml_priority_parse("soon", &p), ML_EINVAL);
}

Test(env, pack_unpack_round_trip)
{
    char err[256] = "";
    s_env.priority = MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY;
    s_env.created_at = 1795700000123LL;
    cr_assert_eq(ml_env_validate(&s_env, err, sizeof err), 0, "%s", err);
    uint8_t *buf = NULL;
    size_t len = 0;
    cr_assert_eq(ml_env_pack(&s_env, &buf, &len), 0);
    cr_assert_gt(len, 0);
    ml_envelope_t *e = NULL;
    cr_assert_eq(ml_env_unpack(buf, len, &e), 0);
    cr_assert_str_eq(e->id, s_env.id);
    cr_assert_eq(e->kind, MEDLINK__V1__KIND__KIND_REFERRAL);
    cr_assert_eq(e->priority, MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY);
    cr_assert_eq(e->created_at, 1795700000123LL);
    cr_assert_eq(e->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL);
    cr_assert_str_eq(e->referral->patient->name, "Wang Fang");
    cr_assert_eq(e->referral->n_diagnosis, 2);
    cr_assert_eq(ml_env_validate(e, err, sizeof err), 0, "%s", err);
    ml_env_free(&e);
    cr_assert_null(e);
    ml_env_free(&e); /* safe twice */
    free(buf);

    /* An all-default envelope packs to nothing and still round-trips. */
    ml_envelope_t empty = MEDLINK__V1__ENVELOPE__INIT;
    cr_assert_eq(ml_env_pack(&empty, &buf, &len), 0);
    cr_assert_eq(len, 0);
    cr_assert_eq(ml_env_unpack(buf, len, &e), 0);
    ml_env_free(&e);
    free(buf);
}

Test(env, garbage_unpack_refused)
{
    ml_envelope_t *e = NULL;
    /* A varint that never ends, a length running past the end, and a
     * wire type 7 that does not exist. */
    const uint8_t g1[] = {0x08, 0xff, 0xff, 0xff};
    const uint8_t g2[] = {0x0a, 0x40, 'a', 'b'};
    const uint8_t g3[] = {0x0f, 0x01, 0x02};
    cr_assert_eq(ml_env_unpack(g1, sizeof g1, &e), ML_EPROTO);
    cr_assert_eq(ml_env_unpack(g2, sizeof g2, &e), ML_EPROTO);
    cr_assert_eq(ml_env_unpack(g3, sizeof g3, &e), ML_EPROTO);
    cr_assert_null(e);
}
