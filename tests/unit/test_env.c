/* Unit tests for ml_env: validation of routed envelopes (each refusal must
 * name the field, since the sentence goes back to the sender in a Nack) for
 * every clinical payload, the kind <-> payload table, names, and
 * pack/unpack. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "ml_common.h"
#include "ml_env.h"
#include "ml_imaging.h"

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
    s_refused("id is not a ULID");
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
    s_refused("from may only contain");
    s_setup();
    s_env.to = "";
    s_refused("to is required");
    s_env.to = "x/../y";
    s_refused("to may only contain");
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
    cr_assert_eq(ml_env_kind_of_payload(MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CHUNK),
                 MEDLINK__V1__KIND__KIND_IMAGING_CHUNK);
    cr_assert_eq(ml_env_kind_of_payload(MEDLINK__V1__ENVELOPE__PAYLOAD_ESCALATION),
                 MEDLINK__V1__KIND__KIND_ESCALATION);
    cr_assert_eq(ml_env_kind_of_payload(0), MEDLINK__V1__KIND__KIND_UNSPECIFIED);
    cr_assert_eq(ml_env_kind_of_payload(99), MEDLINK__V1__KIND__KIND_UNSPECIFIED);
    cr_assert(ml_env_kind_is_routed(MEDLINK__V1__KIND__KIND_REFERRAL));
    cr_assert(!ml_env_kind_is_routed(MEDLINK__V1__KIND__KIND_ACK));
    cr_assert(!ml_env_kind_is_routed(MEDLINK__V1__KIND__KIND_UNSPECIFIED));
    cr_assert(!ml_env_kind_is_routed(1000));

    cr_assert_str_eq(ml_kind_name(MEDLINK__V1__KIND__KIND_ADMIN_REQUEST), "ADMIN_REQUEST");
    cr_assert_str_eq(ml_kind_name(MEDLINK__V1__KIND__KIND_REFERRAL_UPDATE), "REFERRAL_UPDATE");
    cr_assert_str_eq(ml_kind_name(MEDLINK__V1__KIND__KIND_DOWN_TRANSFER_UPDATE),
                     "DOWN_TRANSFER_UPDATE");
    cr_assert_str_eq(ml_kind_name(0), "UNSPECIFIED");
    cr_assert_str_eq(ml_kind_name(1234), "UNSPECIFIED");

    int k = -1;
    cr_assert_eq(ml_kind_parse("referral_update", &k), 0);
    cr_assert_eq(k, MEDLINK__V1__KIND__KIND_REFERRAL_UPDATE);
    cr_assert_eq(ml_kind_parse("KIND_HEARTBEAT", &k), 0);
    cr_assert_eq(k, MEDLINK__V1__KIND__KIND_HEARTBEAT);
    cr_assert_eq(ml_kind_parse("Nack", &k), 0);
    cr_assert_eq(k, MEDLINK__V1__KIND__KIND_NACK);
    cr_assert_eq(ml_kind_parse("imaging_consult", &k), 0);
    cr_assert_eq(k, MEDLINK__V1__KIND__KIND_IMAGING_CONSULT);
    cr_assert_eq(ml_kind_parse("KIND_ESCALATION", &k), 0);
    cr_assert_eq(k, MEDLINK__V1__KIND__KIND_ESCALATION);
    cr_assert_eq(ml_kind_parse("UNSPECIFIED", &k), ML_EINVAL);
    cr_assert_eq(ml_kind_parse("REFERAL", &k), ML_EINVAL);
    cr_assert_eq(ml_kind_parse(NULL, &k), ML_EINVAL);

    int p = -1;
    cr_assert_str_eq(ml_priority_name(MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY), "EMERGENCY");
    cr_assert_eq(ml_priority_parse("urgent", &p), 0);
    cr_assert_eq(p, MEDLINK__V1__PRIORITY__PRIORITY_URGENT);
    cr_assert_eq(ml_priority_parse("soon", &p), ML_EINVAL);
}

Test(env, kind_table_round_trip_for_every_payload_case)
{
    /* Every member of the Envelope's payload oneof has a Kind; its short
     * name is the member's name in upper case and the Kind's name without
     * "KIND_"; the name parses back to the Kind; and it is routed exactly
     * when it is a clinical message (fields 40 and up). */
    const ProtobufCMessageDescriptor *md = &medlink__v1__envelope__descriptor;
    const ProtobufCEnumDescriptor *kd = &medlink__v1__kind__descriptor;
    unsigned members = 0;
    for (unsigned i = 0; i < md->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &md->fields[i];
        if (!(f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF))
            continue;
        members++;
        int kind = ml_env_kind_of_payload((int)f->id);
        cr_assert_neq(kind, MEDLINK__V1__KIND__KIND_UNSPECIFIED, "%s has no kind", f->name);
        char upper[64];
        size_t n = strlen(f->name);
        cr_assert_lt(n, sizeof upper);
        for (size_t j = 0; j <= n; j++)
            upper[j] = (char)toupper((unsigned char)f->name[j]);
        cr_assert_str_eq(ml_kind_name(kind), upper);
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(kd, kind);
        cr_assert_not_null(ev, "%s", f->name);
        char full[80];
        snprintf(full, sizeof full, "KIND_%s", upper);
        cr_assert_str_eq(ev->name, full);
        int back = -1;
        cr_assert_eq(ml_kind_parse(ml_kind_name(kind), &back), 0, "%s", f->name);
        cr_assert_eq(back, kind);
        back = -1;
        cr_assert_eq(ml_kind_parse(ev->name, &back), 0, "%s", ev->name);
        cr_assert_eq(back, kind);
        cr_assert_eq(ml_env_kind_is_routed(kind), f->id >= 40, "%s", f->name);
    }
    /* And every Kind but UNSPECIFIED is one of them. */
    cr_assert_eq(members, kd->n_values - 1);
    unsigned routed = 0;
    for (unsigned i = 0; i < kd->n_values; i++)
        routed += (unsigned)ml_env_kind_is_routed(kd->values[i].value);
    cr_assert_eq(routed, 10, "REFERRAL, REFERRAL_UPDATE, 5 imaging, 2 down-transfer, ESCALATION");
}

/* Field number 0 (wire type 2, empty) with its tag as an overlong varint:
 * protobuf-c 1.4 accepts it and packs it back as bytes it refuses, so it is
 * refused on the way in, at the top level and inside a payload (the fuzz
 * regression tests/fuzz/regressions/envelope/crash-adb61cb7...). */
Test(env, unpack_refuses_field_number_zero)
{
    const uint8_t top[] = {0x82, 0x00, 0x00};
    /* heartbeat (field 25, length 3) holding the same field. */
    const uint8_t inside[] = {0xca, 0x01, 0x03, 0x82, 0x00, 0x00};
    /* The same heartbeat with a real field instead: still fine. */
    const uint8_t fine[] = {0xca, 0x01, 0x02, 0x08, 0x07};
    ml_envelope_t *e = NULL;
    cr_assert_eq(ml_env_unpack(top, sizeof top, &e), ML_EPROTO);
    cr_assert_null(e);
    cr_assert_eq(ml_env_unpack(inside, sizeof inside, &e), ML_EPROTO);
    cr_assert_null(e);
    cr_assert_eq(ml_env_unpack(fine, sizeof fine, &e), 0);
    cr_assert_not_null(e->heartbeat);
    cr_assert_eq(e->heartbeat->sent_at, 7);
    ml_env_free(&e);
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

/* ---- the other clinical payloads ---------------------------------------- */

#define SHA_EMPTY "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
#define SHA_OTHER "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
#define STUDY_UID "1.2.840.113619.2.55.3.604688119.969.1268071029.320"

static Medlink__V1__DicomObject s_obj[2];
static Medlink__V1__DicomObject *s_objs[2];
static Medlink__V1__ImagingConsult s_ic;
static Medlink__V1__ImagingChunk s_chunk;
static uint8_t s_chunk_data[64];
static Medlink__V1__ImagingResend s_resend;
static uint32_t s_resend_idx[2] = {3, 7};
static Medlink__V1__ImagingUpdate s_iu;
static Medlink__V1__Clinician s_reader;
static Medlink__V1__ImagingReport s_rep;
static Medlink__V1__DownTransfer s_dt;
static Medlink__V1__DownTransferUpdate s_dtu;
static Medlink__V1__Escalation s_esc;

/* A valid two-object consult addressed to a reading service: 512 KiB in two
 * chunks of 256 KiB, and 1000 bytes in one. */
static void s_use_consult(void)
{
    s_setup();
    Medlink__V1__DicomObject o = MEDLINK__V1__DICOM_OBJECT__INIT;
    Medlink__V1__ImagingConsult c = MEDLINK__V1__IMAGING_CONSULT__INIT;
    s_obj[0] = o;
    s_obj[1] = o;
    s_obj[0].sop_instance_uid = STUDY_UID ".1";
    s_obj[0].series_instance_uid = STUDY_UID ".9";
    s_obj[0].file_name = "IM0001.dcm";
    s_obj[0].size = 512 * 1024;
    s_obj[0].sha256 = SHA_EMPTY;
    s_obj[0].chunks = 2;
    s_obj[1].sop_instance_uid = STUDY_UID ".2";
    s_obj[1].file_name = "IM0002.dcm";
    s_obj[1].size = 1000;
    s_obj[1].sha256 = SHA_OTHER;
    s_obj[1].chunks = 1;
    s_objs[0] = &s_obj[0];
    s_objs[1] = &s_obj[1];
    s_ic = c;
    s_ic.patient = &s_patient;
    s_ic.study_instance_uid = STUDY_UID;
    s_ic.modality = "CT";
    s_ic.n_object = 2;
    s_ic.object = s_objs;
    s_ic.chunk_size = ML_IMAGING_CHUNK_DEFAULT;
    s_ic.total_bytes = 512 * 1024 + 1000;
    s_ic.n_diagnosis = 2;
    s_ic.diagnosis = s_diags;
    s_env.to = "imaging.ct";
    s_env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CONSULT;
    s_env.imaging_consult = &s_ic;
}

static void s_use_chunk(void)
{
    s_setup();
    Medlink__V1__ImagingChunk c = MEDLINK__V1__IMAGING_CHUNK__INIT;
    s_chunk = c;
    s_chunk.study_instance_uid = STUDY_UID;
    s_chunk.object_index = 1;
    s_chunk.chunk_index = 0;
    s_chunk.data.data = s_chunk_data;
    s_chunk.data.len = sizeof s_chunk_data;
    s_chunk.sha256 = SHA_OTHER;
    s_env.to = "imaging.ct";
    s_env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CHUNK;
    s_env.imaging_chunk = &s_chunk;
}

static void s_use_resend(void)
{
    s_setup();
    Medlink__V1__ImagingResend r = MEDLINK__V1__IMAGING_RESEND__INIT;
    s_resend = r;
    s_resend.object_index = 0;
    s_resend.n_chunk_index = 2;
    s_resend.chunk_index = s_resend_idx;
    s_resend.reason = "SHA-256 mismatch";
    s_env.from = "county.imaging.centre";
    s_env.to = "township.xinzhai.clinic";
    s_env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_RESEND;
    s_env.imaging_resend = &s_resend;
}

static void s_use_imaging_update(int status)
{
    s_setup();
    Medlink__V1__ImagingUpdate u = MEDLINK__V1__IMAGING_UPDATE__INIT;
    s_iu = u;
    s_iu.status = status;
    s_env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_UPDATE;
    s_env.imaging_update = &s_iu;
}

static void s_use_report(void)
{
    s_setup();
    Medlink__V1__Clinician c = MEDLINK__V1__CLINICIAN__INIT;
    Medlink__V1__ImagingReport r = MEDLINK__V1__IMAGING_REPORT__INIT;
    s_reader = c;
    s_reader.name = "Dr. Li Wei";
    s_rep = r;
    s_rep.study_instance_uid = STUDY_UID;
    s_rep.impression = "Right lower lobe pneumonia.";
    s_rep.reader = &s_reader;
    s_rep.signed_at = 1795700000123LL;
    s_env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_REPORT;
    s_env.imaging_report = &s_rep;
}

static void s_use_down_transfer(void)
{
    s_setup();
    Medlink__V1__DownTransfer t = MEDLINK__V1__DOWN_TRANSFER__INIT;
    s_dt = t;
    s_dt.patient = &s_patient;
    s_dt.phase = MEDLINK__V1__REHAB_PHASE__POST_OPERATIVE;
    s_dt.discharge_summary = "Hip replacement, day 7, walking with a frame.";
    s_dt.family_doctor_team = "Xinzhai team 2";
    s_dt.rehab_plan = "Physiotherapy three times a week; wound check on day 14.";
    s_dt.n_diagnosis = 2;
    s_dt.diagnosis = s_diags;
    s_env.from = "county.zhaozhou.hospital";
    s_env.to = "township.xinzhai.clinic";
    s_env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_DOWN_TRANSFER;
    s_env.down_transfer = &s_dt;
}

static void s_use_down_update(int status)
{
    s_setup();
    Medlink__V1__DownTransferUpdate u = MEDLINK__V1__DOWN_TRANSFER_UPDATE__INIT;
    s_dtu = u;
    s_dtu.status = status;
    s_env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_DOWN_TRANSFER_UPDATE;
    s_env.down_transfer_update = &s_dtu;
}

static void s_use_escalation(void)
{
    s_setup();
    Medlink__V1__Escalation x = MEDLINK__V1__ESCALATION__INIT;
    s_esc = x;
    s_esc.reason = MEDLINK__V1__ESCALATION_REASON__ESCALATION_DEADLINE_MISSED;
    s_esc.case_id = "case-1";
    s_env.from = "broker.zhaozhou";
    s_env.to = "ops.zhaozhou";
    s_env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ESCALATION;
    s_env.escalation = &s_esc;
}

/* Validation must pass and fill in kind. */
static void s_passes(int kind)
{
    char err[256] = "";
    cr_assert_eq(ml_env_validate(&s_env, err, sizeof err), 0, "%s", err);
    cr_assert_eq(s_env.kind, kind);
}

Test(env, referral_linked_case_id)
{
    char id[130];
    memset(id, 'c', sizeof id - 1);
    id[128] = '\0';
    s_ref.linked_case_id = id;
    s_passes(MEDLINK__V1__KIND__KIND_REFERRAL);
    id[128] = 'c';
    id[129] = '\0';
    s_refused("referral.linked_case_id is longer than 128 characters");
}

Test(env, payload_pointer_required_for_every_kind)
{
    /* A payload case set by hand with no message behind it. */
    static const struct {
        int payload_case;
        const char *want;
    } cases[] = {
        {MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL, "referral is required"},
        {MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL_UPDATE, "referral_update is required"},
        {MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CONSULT, "imaging_consult is required"},
        {MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CHUNK, "imaging_chunk is required"},
        {MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_RESEND, "imaging_resend is required"},
        {MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_UPDATE, "imaging_update is required"},
        {MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_REPORT, "imaging_report is required"},
        {MEDLINK__V1__ENVELOPE__PAYLOAD_DOWN_TRANSFER, "down_transfer is required"},
        {MEDLINK__V1__ENVELOPE__PAYLOAD_DOWN_TRANSFER_UPDATE, "down_transfer_update is required"},
        {MEDLINK__V1__ENVELOPE__PAYLOAD_ESCALATION, "escalation is required"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        s_setup();
        s_env.payload_case = cases[i].payload_case;
        s_env.referral = NULL; /* the oneof's one pointer */
        s_refused(cases[i].want);
        cr_assert_eq(s_env.kind, MEDLINK__V1__KIND__KIND_UNSPECIFIED, "left as sent");
    }
}

Test(env, imaging_consult_good_passes)
{
    s_use_consult();
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_CONSULT);
    /* No diagnoses, no series UID: both optional. */
    s_use_consult();
    s_ic.n_diagnosis = 0;
    s_obj[0].series_instance_uid = "";
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_CONSULT);
    /* An empty object is one (empty) chunk. */
    s_use_consult();
    s_obj[1].size = 0;
    s_obj[1].chunks = 1;
    s_ic.total_bytes = 512 * 1024;
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_CONSULT);
    /* Exactly one chunk's worth is one chunk, one byte more is two. */
    s_use_consult();
    s_obj[1].size = ML_IMAGING_CHUNK_DEFAULT;
    s_ic.total_bytes = 512 * 1024 + ML_IMAGING_CHUNK_DEFAULT;
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_CONSULT);
    s_obj[1].size = ML_IMAGING_CHUNK_DEFAULT + 1;
    s_ic.total_bytes = 512 * 1024 + ML_IMAGING_CHUNK_DEFAULT + 1;
    s_refused("imaging_consult.object[1].chunks is 1, but an object of 262145 bytes in chunks of "
              "262144 bytes has 2");
    s_obj[1].chunks = 2;
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_CONSULT);
}

Test(env, imaging_consult_fields_required)
{
    s_use_consult();
    s_ic.patient = NULL;
    s_refused("imaging_consult.patient is required");
    s_use_consult();
    s_patient.name = "";
    s_refused("imaging_consult.patient.name is required");
    s_use_consult();
    s_patient.health_card_id = "";
    s_refused("imaging_consult.patient.health_card_id is required");
    s_use_consult();
    s_ic.study_instance_uid = "";
    s_refused("imaging_consult.study_instance_uid is required");
    s_use_consult();
    s_ic.modality = "";
    s_refused("imaging_consult.modality is required");
    s_use_consult();
    s_ic.n_object = 0;
    s_refused("imaging_consult.object needs at least one DICOM object");
    s_use_consult();
    s_ic.total_bytes = 7;
    s_refused("imaging_consult.total_bytes is 7, but the objects' sizes add up to 525288");
    s_use_consult();
    s_d2.icd10 = "J18-9";
    s_refused("imaging_consult.diagnosis[1].icd10 is not an ICD-10 code");
    s_use_consult();
    s_d1.icd10 = "";
    s_refused("imaging_consult.diagnosis[0].icd10 is required");
}

Test(env, imaging_consult_uids)
{
    const char *bad[] = {"1.2.abc", "1..2", ".1.2", "1.2.", "1.2 3", "1,2", "-1.2"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        s_use_consult();
        s_ic.study_instance_uid = (char *)bad[i];
        s_refused("imaging_consult.study_instance_uid");
        s_refused("is not a DICOM UID");
        s_use_consult();
        s_obj[1].sop_instance_uid = (char *)bad[i];
        s_refused("imaging_consult.object[1].sop_instance_uid");
        s_use_consult();
        s_obj[0].series_instance_uid = (char *)bad[i];
        s_refused("imaging_consult.object[0].series_instance_uid");
    }
    char uid[66];
    memset(uid, '1', sizeof uid - 1);
    uid[65] = '\0'; /* for the 65-character case below */
    uid[64] = '\0';
    s_use_consult();
    s_ic.study_instance_uid = uid;
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_CONSULT);
    uid[64] = '1';
    s_refused("imaging_consult.study_instance_uid is longer than 64 characters");
    s_use_consult();
    s_obj[0].sop_instance_uid = "";
    s_refused("imaging_consult.object[0].sop_instance_uid is required");
    s_use_consult();
    s_ic.study_instance_uid = "1";
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_CONSULT);
}

Test(env, imaging_consult_chunk_size)
{
    s_use_consult();
    s_ic.chunk_size = ML_IMAGING_CHUNK_MIN - 1;
    s_refused("imaging_consult.chunk_size 4095 is not between 4096 and 4194304 bytes");
    s_ic.chunk_size = ML_IMAGING_CHUNK_MAX + 1;
    s_refused("imaging_consult.chunk_size 4194305 is not between 4096 and 4194304 bytes");
    s_ic.chunk_size = 0;
    s_refused("imaging_consult.chunk_size 0 is not between");
    /* The ends of the range pass, with the chunk counts they give. */
    s_ic.chunk_size = ML_IMAGING_CHUNK_MIN;
    s_obj[0].chunks = 128;
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_CONSULT);
    s_ic.chunk_size = ML_IMAGING_CHUNK_MAX;
    s_obj[0].chunks = 1;
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_CONSULT);
}

Test(env, imaging_consult_objects)
{
    s_use_consult();
    s_obj[0].chunks = 3;
    s_refused("imaging_consult.object[0].chunks is 3, but an object of 524288 bytes in chunks of "
              "262144 bytes has 2");
    s_use_consult();
    s_obj[1].size = 0;
    s_obj[1].chunks = 0;
    s_ic.total_bytes = 512 * 1024;
    s_refused("imaging_consult.object[1].chunks is 0, but an object of 0 bytes");
    s_use_consult();
    s_objs[1] = NULL;
    s_refused("imaging_consult.object[1] is empty");

    /* Sizes that add up past 2^64 are refused, not wrapped: 1100 objects
     * of the largest size a uint32 count of 4 MiB chunks can describe. */
    static Medlink__V1__DicomObject *many[1100];
    s_use_consult();
    s_ic.chunk_size = ML_IMAGING_CHUNK_MAX;
    s_obj[0].chunks = UINT32_MAX;
    s_obj[0].size = (uint64_t)UINT32_MAX * ML_IMAGING_CHUNK_MAX;
    for (size_t i = 0; i < sizeof many / sizeof many[0]; i++)
        many[i] = &s_obj[0];
    s_ic.object = many;
    s_ic.n_object = sizeof many / sizeof many[0];
    s_ic.total_bytes = UINT64_MAX;
    s_refused("imaging_consult.object sizes add up to more than total_bytes can hold");

    s_use_consult();
    s_obj[0].sha256 = "";
    s_refused("imaging_consult.object[0].sha256 is required");
    const char *bad_sha[] = {
        "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8555",
        "g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85 ",
    };
    s_use_consult();
    for (size_t i = 0; i < sizeof bad_sha / sizeof bad_sha[0]; i++) {
        s_obj[1].sha256 = (char *)bad_sha[i];
        s_refused("imaging_consult.object[1].sha256");
        s_refused("is not a SHA-256 (64 lower-case hex digits)");
    }
}

Test(env, imaging_consult_file_names)
{
    char long_name[130];
    memset(long_name, 'a', sizeof long_name - 1);
    long_name[128] = '\0';
    const char *good[] = {"IM0001.dcm", "a", "IM 0001 (copy).dcm", "1.2.3.dcm", "x..y", long_name};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        s_use_consult();
        s_obj[0].file_name = (char *)good[i];
        s_passes(MEDLINK__V1__KIND__KIND_IMAGING_CONSULT);
    }
    s_use_consult();
    s_obj[0].file_name = "";
    s_refused("imaging_consult.object[0].file_name is required");
    const char *bad[] = {"a/b.dcm",     "/etc/passwd", "../x.dcm", ".",   "..",
                         ".hidden.dcm", "a\\b.dcm",    "a\nb.dcm", "a\tb"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        s_use_consult();
        s_obj[1].file_name = (char *)bad[i];
        s_refused("imaging_consult.object[1].file_name");
        s_refused("must be a plain file name");
    }
    long_name[128] = 'a';
    long_name[129] = '\0';
    s_use_consult();
    s_obj[0].file_name = long_name;
    s_refused("at most 128 characters");
}

Test(env, imaging_chunk_rules)
{
    s_use_chunk();
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_CHUNK);
    s_use_chunk();
    s_chunk.study_instance_uid = "";
    s_refused("imaging_chunk.study_instance_uid is required");
    s_use_chunk();
    s_chunk.data.len = 0;
    s_refused("imaging_chunk.data is required");
    s_use_chunk();
    s_chunk.sha256 = "";
    s_refused("imaging_chunk.sha256 is required");
    s_chunk.sha256 = "ABC";
    s_refused("imaging_chunk.sha256 is not a SHA-256");
    /* Only the length is read; the bytes are not. */
    s_use_chunk();
    s_chunk.data.len = ML_IMAGING_CHUNK_MAX;
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_CHUNK);
    s_chunk.data.len = ML_IMAGING_CHUNK_MAX + 1;
    s_refused("imaging_chunk.data is 4194305 bytes, more than the 4194304 a chunk may have");
}

Test(env, imaging_resend_rules)
{
    s_use_resend();
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_RESEND);
    s_use_resend();
    s_resend.n_chunk_index = 0;
    s_refused("imaging_resend.chunk_index needs at least one chunk");
}

Test(env, imaging_update_rules)
{
    s_use_imaging_update(MEDLINK__V1__IMAGING_STATUS__IMAGING_STATUS_UNSPECIFIED);
    s_refused("imaging_update.status is required");
    s_iu.status = 77;
    s_refused("imaging_update.status 77 is not a known status");
    s_iu.status = MEDLINK__V1__IMAGING_STATUS__IMAGING_REJECTED;
    s_refused("imaging_update.reason is required when status is IMAGING_REJECTED");
    s_iu.status = MEDLINK__V1__IMAGING_STATUS__IMAGING_CANCELLED;
    s_refused("imaging_update.reason is required when status is IMAGING_CANCELLED");
    s_iu.reason = "patient transferred";
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_UPDATE);
    s_use_imaging_update(MEDLINK__V1__IMAGING_STATUS__IMAGING_STUDY_RECEIVED);
    s_iu.objects_received = 2;
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_UPDATE);
    s_use_imaging_update(MEDLINK__V1__IMAGING_STATUS__IMAGING_CLOSED);
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_UPDATE);
    s_use_imaging_update(MEDLINK__V1__IMAGING_STATUS__IMAGING_ASSIGNED);
    s_iu.assigned_to = "county.imaging.centre";
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_UPDATE);
    s_iu.assigned_to = "a/b";
    s_refused("imaging_update.assigned_to may only contain");
}

Test(env, imaging_report_rules)
{
    s_use_report();
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_REPORT);
    s_use_report();
    s_rep.study_instance_uid = "";
    s_refused("imaging_report.study_instance_uid is required");
    s_use_report();
    s_rep.impression = "";
    s_refused("imaging_report.impression or imaging_report.findings is required");
    s_rep.findings = "Consolidation in the right lower lobe.";
    s_passes(MEDLINK__V1__KIND__KIND_IMAGING_REPORT);
    s_use_report();
    s_rep.reader = NULL;
    s_refused("imaging_report.reader.name is required");
    s_use_report();
    s_reader.name = "";
    s_refused("imaging_report.reader.name is required");
    s_use_report();
    s_rep.signed_at = 0;
    s_refused("imaging_report.signed_at is required");
    s_rep.signed_at = -5;
    s_refused("imaging_report.signed_at is required");
}

Test(env, down_transfer_rules)
{
    s_use_down_transfer();
    s_passes(MEDLINK__V1__KIND__KIND_DOWN_TRANSFER);
    s_use_down_transfer();
    s_dt.patient = NULL;
    s_refused("down_transfer.patient is required");
    s_use_down_transfer();
    s_patient.name = "";
    s_refused("down_transfer.patient.name is required");
    s_use_down_transfer();
    s_patient.health_card_id = "";
    s_refused("down_transfer.patient.health_card_id is required");
    s_use_down_transfer();
    s_patient.sex = 9;
    s_refused("down_transfer.patient.sex 9 is not a known value");
    s_use_down_transfer();
    s_dt.phase = MEDLINK__V1__REHAB_PHASE__REHAB_PHASE_UNSPECIFIED;
    s_refused("down_transfer.phase is required");
    s_dt.phase = 9;
    s_refused("down_transfer.phase 9 is not a known value");
    s_use_down_transfer();
    s_dt.discharge_summary = "";
    s_refused("down_transfer.discharge_summary is required");
    s_use_down_transfer();
    s_dt.family_doctor_team = "";
    s_refused("down_transfer.family_doctor_team is required");
    s_use_down_transfer();
    s_dt.rehab_plan = "";
    s_refused("down_transfer.rehab_plan is required");
    s_use_down_transfer();
    s_d1.icd10 = "j18";
    s_refused("down_transfer.diagnosis[0].icd10 is not an ICD-10 code");
}

Test(env, down_transfer_update_rules)
{
    s_use_down_update(MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_STATUS_UNSPECIFIED);
    s_refused("down_transfer_update.status is required");
    s_dtu.status = 42;
    s_refused("down_transfer_update.status 42 is not a known status");
    s_dtu.status = MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_DECLINED;
    s_refused("down_transfer_update.reason is required when status is DOWN_TRANSFER_DECLINED");
    s_dtu.status = MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_CANCELLED;
    s_refused("down_transfer_update.reason is required when status is DOWN_TRANSFER_CANCELLED");
    s_dtu.reason = "no bed at the clinic";
    s_passes(MEDLINK__V1__KIND__KIND_DOWN_TRANSFER_UPDATE);
    s_use_down_update(MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_FOLLOW_UP);
    s_refused("down_transfer_update.follow_up_number is required when status is "
              "DOWN_TRANSFER_FOLLOW_UP");
    s_dtu.follow_up_number = 1;
    s_passes(MEDLINK__V1__KIND__KIND_DOWN_TRANSFER_UPDATE);
    s_use_down_update(MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_ACCEPTED);
    s_passes(MEDLINK__V1__KIND__KIND_DOWN_TRANSFER_UPDATE);
    s_use_down_update(MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_ARRIVED);
    s_dtu.occurred_at = 1795700000123LL;
    s_passes(MEDLINK__V1__KIND__KIND_DOWN_TRANSFER_UPDATE);
    char id[131];
    memset(id, 'r', sizeof id - 1);
    id[130] = '\0';
    s_use_down_update(MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_RE_REFERRED);
    s_dtu.referral_case_id = id;
    s_refused("down_transfer_update.referral_case_id is longer than 128 characters");
}

Test(env, escalation_rules)
{
    s_use_escalation();
    s_passes(MEDLINK__V1__KIND__KIND_ESCALATION);
    s_use_escalation();
    s_esc.reason = MEDLINK__V1__ESCALATION_REASON__ESCALATION_UNSPECIFIED;
    s_refused("escalation.reason is required");
    s_esc.reason = 9;
    s_refused("escalation.reason 9 is not a known value");
    s_use_escalation();
    s_esc.case_id = "";
    s_refused("escalation.case_id is required");
}

Test(env, new_payloads_round_trip_on_the_wire)
{
    /* Each new payload packs, unpacks and validates again unchanged. */
    void (*uses[])(void) = {s_use_consult, s_use_chunk,         s_use_resend,
                            s_use_report,  s_use_down_transfer, s_use_escalation};
    for (size_t i = 0; i < sizeof uses / sizeof uses[0]; i++) {
        char err[256] = "";
        uses[i]();
        cr_assert_eq(ml_env_validate(&s_env, err, sizeof err), 0, "%zu: %s", i, err);
        uint8_t *buf = NULL;
        size_t len = 0;
        cr_assert_eq(ml_env_pack(&s_env, &buf, &len), 0);
        ml_envelope_t *e = NULL;
        cr_assert_eq(ml_env_unpack(buf, len, &e), 0);
        cr_assert_eq(e->payload_case, s_env.payload_case);
        cr_assert_eq(e->kind, s_env.kind);
        cr_assert_eq(ml_env_validate(e, err, sizeof err), 0, "%zu: %s", i, err);
        ml_env_free(&e);
        free(buf);
    }
}
