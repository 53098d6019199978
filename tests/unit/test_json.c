/* Unit tests for ml_json: the descriptor-driven protobuf-c <-> JSON mapping.
 * The round trip is checked at the wire level (packed bytes equal), which
 * is the equality that matters for messages a spool file carries; the
 * error tests check that each refusal names the field path, since that is
 * what a person fixing a hand-written spool file reads. */
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "ml_common.h"
#include "ml_env.h"
#include "ml_json.h"

/* A referral envelope with every kind of field the schema uses: strings,
 * enums, int64, bools, a nested message and a repeated message. */
static ml_envelope_t *s_referral(void)
{
    static Medlink__V1__Patient patient = MEDLINK__V1__PATIENT__INIT;
    static Medlink__V1__Clinician doctor = MEDLINK__V1__CLINICIAN__INIT;
    static Medlink__V1__Diagnosis d1 = MEDLINK__V1__DIAGNOSIS__INIT;
    static Medlink__V1__Diagnosis d2 = MEDLINK__V1__DIAGNOSIS__INIT;
    static Medlink__V1__Diagnosis *diags[2] = {&d1, &d2};
    static Medlink__V1__Referral ref = MEDLINK__V1__REFERRAL__INIT;
    static ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;

    patient.health_card_id = "130133198001011234";
    patient.name = "Wang Fang";
    patient.sex = MEDLINK__V1__SEX__SEX_FEMALE;
    patient.birth_date = "1980-01-01";
    patient.phone = "13800000000";
    doctor.name = "Dr. Li";
    doctor.id = "D-17";
    d1.icd10 = "J18.9";
    d1.text = "Pneumonia, unspecified";
    d2.icd10 = "I10";
    d2.text = "Hypertension";
    ref.patient = &patient;
    ref.referring_doctor = &doctor;
    ref.family_doctor_team = "team-3";
    ref.reason = "Needs CT and specialist assessment";
    ref.n_diagnosis = 2;
    ref.diagnosis = diags;
    ref.urgency = "within 24h";
    ref.priority_examination = 1;
    ref.priority_admission = 1;
    ref.notes = "Allergic to penicillin";
    env.id = "01JD0000000000000000000000";
    env.case_id = "case-42";
    env.kind = MEDLINK__V1__KIND__KIND_REFERRAL;
    env.from = "township.xinzhai.clinic";
    env.to = "county.zhaozhou.hospital";
    env.priority = MEDLINK__V1__PRIORITY__PRIORITY_URGENT;
    env.created_at = 1795700000123LL;
    env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL;
    env.referral = &ref;
    return &env;
}

static void s_pack(const ProtobufCMessage *m, uint8_t **buf, size_t *len)
{
    *len = protobuf_c_message_get_packed_size(m);
    *buf = malloc(*len + 1);
    cr_assert_not_null(*buf);
    protobuf_c_message_pack(m, *buf);
}

static int s_decode(const char *json, ProtobufCMessage **out, char *err, size_t errlen)
{
    return ml_json_decode(&medlink__v1__envelope__descriptor, json, strlen(json), out, err, errlen);
}

/* Decodes json, which must fail with ML_EINVAL and an error containing
 * want. */
static void s_refused(const char *json, const char *want)
{
    char err[512] = "";
    ProtobufCMessage *m = NULL;
    int rc = s_decode(json, &m, err, sizeof err);
    cr_assert_eq(rc, ML_EINVAL, "expected ML_EINVAL for %s, got %d", json, rc);
    cr_assert_null(m);
    cr_assert(strstr(err, want), "error \"%s\" does not contain \"%s\"", err, want);
}

Test(json, referral_round_trip)
{
    ml_envelope_t *env = s_referral();
    char *text = NULL, err[256] = "";
    cr_assert_eq(ml_json_encode(&env->base, 0, &text, err, sizeof err), 0, "%s", err);

    ProtobufCMessage *back = NULL;
    cr_assert_eq(s_decode(text, &back, err, sizeof err), 0, "%s: %s", err, text);
    uint8_t *a, *b;
    size_t alen, blen;
    s_pack(&env->base, &a, &alen);
    s_pack(back, &b, &blen);
    cr_assert_eq(alen, blen);
    cr_assert_eq(memcmp(a, b, alen), 0);

    ml_envelope_t *e = (ml_envelope_t *)back;
    cr_assert_str_eq(e->referral->patient->name, "Wang Fang");
    cr_assert_eq(e->referral->n_diagnosis, 2);
    cr_assert_str_eq(e->referral->diagnosis[1]->icd10, "I10");
    cr_assert_eq(e->created_at, 1795700000123LL);
    free(a);
    free(b);
    free(text);
    ml_env_free(&e);
}

Test(json, camel_case_names_enum_names_and_int64_strings)
{
    char *text = NULL, err[256] = "";
    cr_assert_eq(ml_json_encode(&s_referral()->base, 0, &text, err, sizeof err), 0, "%s", err);
    cr_assert(strstr(text, "\"caseId\":\"case-42\""), "%s", text);
    cr_assert(strstr(text, "\"createdAt\":\"1795700000123\""), "%s", text);
    cr_assert(strstr(text, "\"healthCardId\":"), "%s", text);
    cr_assert(strstr(text, "\"referringDoctor\":{"), "%s", text);
    cr_assert(strstr(text, "\"priorityExamination\":true"), "%s", text);
    cr_assert(strstr(text, "\"kind\":\"KIND_REFERRAL\""), "%s", text);
    cr_assert(strstr(text, "\"priority\":\"PRIORITY_URGENT\""), "%s", text);
    cr_assert(strstr(text, "\"sex\":\"SEX_FEMALE\""), "%s", text);
    cr_assert(strstr(text, "\"diagnosis\":[{\"icd10\":\"J18.9\""), "%s", text);
    /* Defaults are left out: deadline is 0, priorityReception false, and
     * only the set oneof member appears. */
    cr_assert_null(strstr(text, "deadline"), "%s", text);
    cr_assert_null(strstr(text, "priorityReception"), "%s", text);
    cr_assert_null(strstr(text, "referralUpdate"), "%s", text);
    cr_assert_null(strstr(text, "case_id"), "%s", text);
    free(text);
}

Test(json, pretty_output_parses_back)
{
    char *text = NULL, err[256] = "";
    cr_assert_eq(ml_json_encode(&s_referral()->base, ML_JSON_PRETTY, &text, err, sizeof err), 0);
    cr_assert(strchr(text, '\n'));
    ProtobufCMessage *m = NULL;
    cr_assert_eq(s_decode(text, &m, err, sizeof err), 0, "%s", err);
    protobuf_c_message_free_unpacked(m, NULL);
    free(text);
}

Test(json, snake_case_numbers_and_numeric_enums_accepted)
{
    const char *json = "{\"id\":\"01JD0000000000000000000000\",\"case_id\":\"c1\","
                       "\"kind\":20,\"from\":\"a\",\"to\":\"b\",\"created_at\":1795700000123,"
                       "\"deadline\":\"-5\",\"priority\":\"PRIORITY_EMERGENCY\","
                       "\"referral\":{\"patient\":{\"health_card_id\":\"H1\",\"name\":\"N\","
                       "\"sex\":1},\"reason\":\"r\",\"priority_reception\":true,"
                       "\"diagnosis\":[{\"icd10\":\"A01\"}]}}";
    char err[256] = "";
    ProtobufCMessage *m = NULL;
    cr_assert_eq(s_decode(json, &m, err, sizeof err), 0, "%s", err);
    ml_envelope_t *e = (ml_envelope_t *)m;
    cr_assert_str_eq(e->case_id, "c1");
    cr_assert_eq(e->kind, MEDLINK__V1__KIND__KIND_REFERRAL);
    cr_assert_eq(e->created_at, 1795700000123LL);
    cr_assert_eq(e->deadline, -5);
    cr_assert_eq(e->priority, MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY);
    cr_assert_eq(e->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL);
    cr_assert_str_eq(e->referral->patient->health_card_id, "H1");
    cr_assert_eq(e->referral->patient->sex, MEDLINK__V1__SEX__SEX_MALE);
    cr_assert(e->referral->priority_reception);
    cr_assert_eq(e->referral->n_diagnosis, 1);
    cr_assert_str_eq(e->referral->diagnosis[0]->icd10, "A01");
    /* Untouched strings keep the shared empty default, which free handles. */
    cr_assert_str_eq(e->referral->notes, "");
    ml_env_free(&e);
}

Test(json, uint64_and_nested_repeated_round_trip)
{
    Medlink__V1__SessionInfo s1 = MEDLINK__V1__SESSION_INFO__INIT;
    Medlink__V1__SessionInfo *ss[1] = {&s1};
    Medlink__V1__BrokerStatus bs = MEDLINK__V1__BROKER_STATUS__INIT;
    Medlink__V1__AdminReply ar = MEDLINK__V1__ADMIN_REPLY__INIT;
    ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
    s1.node_id = "n1";
    s1.in_flight = UINT64_MAX;
    bs.broker = "medlinkd";
    bs.accepted_total = 18446744073709551000ULL;
    bs.n_session = 1;
    bs.session = ss;
    ar.broker_status = &bs;
    env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REPLY;
    env.admin_reply = &ar;

    char *text = NULL, err[256] = "";
    cr_assert_eq(ml_json_encode(&env.base, 0, &text, err, sizeof err), 0, "%s", err);
    cr_assert(strstr(text, "\"inFlight\":\"18446744073709551615\""), "%s", text);
    cr_assert(strstr(text, "\"adminReply\":{\"brokerStatus\":{"), "%s", text);
    ProtobufCMessage *m = NULL;
    cr_assert_eq(s_decode(text, &m, err, sizeof err), 0, "%s", err);
    ml_envelope_t *e = (ml_envelope_t *)m;
    cr_assert_eq(e->admin_reply->broker_status->session[0]->in_flight, UINT64_MAX);
    cr_assert_eq(e->admin_reply->broker_status->accepted_total, 18446744073709551000ULL);
    ml_env_free(&e);
    free(text);
}

Test(json, oneof_member_at_default_value_is_kept)
{
    /* An empty Ack is still "the payload is an ack". */
    Medlink__V1__Ack ack = MEDLINK__V1__ACK__INIT;
    ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
    env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ACK;
    env.ack = &ack;
    char *text = NULL, err[256] = "";
    cr_assert_eq(ml_json_encode(&env.base, 0, &text, err, sizeof err), 0);
    cr_assert_str_eq(text, "{\"ack\":{}}");
    ProtobufCMessage *m = NULL;
    cr_assert_eq(s_decode(text, &m, err, sizeof err), 0, "%s", err);
    cr_assert_eq(((ml_envelope_t *)m)->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACK);
    protobuf_c_message_free_unpacked(m, NULL);
    free(text);
}

Test(json, emit_defaults_prints_zero_fields)
{
    Medlink__V1__Patient p = MEDLINK__V1__PATIENT__INIT;
    char *text = NULL, err[256] = "";
    cr_assert_eq(ml_json_encode(&p.base, 0, &text, err, sizeof err), 0);
    cr_assert_str_eq(text, "{}");
    free(text);
    cr_assert_eq(ml_json_encode(&p.base, ML_JSON_EMIT_DEFAULTS, &text, err, sizeof err), 0);
    cr_assert_str_eq(text, "{\"healthCardId\":\"\",\"name\":\"\",\"sex\":\"SEX_UNKNOWN\","
                           "\"birthDate\":\"\",\"phone\":\"\"}");
    free(text);

    Medlink__V1__Referral r = MEDLINK__V1__REFERRAL__INIT;
    cr_assert_eq(ml_json_encode(&r.base, ML_JSON_EMIT_DEFAULTS, &text, err, sizeof err), 0);
    cr_assert(strstr(text, "\"diagnosis\":[]"), "%s", text);
    cr_assert(strstr(text, "\"priorityReception\":false"), "%s", text);
    /* Messages have presence: an unset one is still left out. */
    cr_assert_null(strstr(text, "patient"), "%s", text);
    free(text);

    ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
    cr_assert_eq(ml_json_encode(&env.base, ML_JSON_EMIT_DEFAULTS, &text, err, sizeof err), 0);
    cr_assert(strstr(text, "\"createdAt\":\"0\""), "%s", text);
    cr_assert(strstr(text, "\"kind\":\"KIND_UNSPECIFIED\""), "%s", text);
    free(text);
}

Test(json, null_means_default)
{
    char err[256] = "";
    ProtobufCMessage *m = NULL;
    cr_assert_eq(s_decode("{\"caseId\":null,\"referral\":null,\"hello\":{}}", &m, err, sizeof err),
                 0, "%s", err);
    ml_envelope_t *e = (ml_envelope_t *)m;
    cr_assert_eq(e->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_HELLO);
    cr_assert_str_eq(e->case_id, "");
    ml_env_free(&e);
}

Test(json, unknown_field_refused)
{
    s_refused("{\"referral\":{\"patient\":{\"nmae\":\"x\"}}}",
              "referral.patient.nmae: unknown field");
    s_refused("{\"bogus\":1}", "bogus: unknown field");
}

Test(json, wrong_type_refused)
{
    s_refused("{\"referral\":{\"patient\":{\"name\":42}}}",
              "referral.patient.name: expected a string");
    s_refused("{\"referral\":{\"priorityAdmission\":\"yes\"}}",
              "referral.priorityAdmission: expected true or false");
    s_refused("{\"referral\":{\"diagnosis\":{\"icd10\":\"A01\"}}}",
              "referral.diagnosis: expected an array");
    s_refused("{\"referral\":{\"diagnosis\":[{\"icd10\":\"A01\"},7]}}",
              "referral.diagnosis[1]: expected an object");
    s_refused("{\"createdAt\":\"soon\"}", "createdAt: the string is not an integer");
    s_refused("{\"referral\":[]}", "referral: expected an object");
    s_refused("[1,2]", "expected a JSON object");
}

Test(json, bad_enum_refused)
{
    s_refused("{\"referral\":{\"patient\":{\"sex\":\"X\"}}}",
              "referral.patient.sex: unknown enum value (expected one of");
    s_refused("{\"kind\":99}", "kind: unknown enum value (expected one of");
    /* Enum names are the proto value names, case and all. */
    s_refused("{\"kind\":\"REFERRAL\"}", "kind: unknown enum value (expected one of");
}

Test(json, malformed_json_refused_with_position)
{
    s_refused("{\"caseId\": \"a\",\n \"to\" \"b\"}", "line 2");
    s_refused("{\"caseId\": \"a\"", "malformed JSON");
    s_refused("", "malformed JSON");
    s_refused("{\"to\":\"a\",\"to\":\"b\"}", "duplicate");
}

Test(json, two_oneof_members_refused)
{
    s_refused("{\"referral\":{},\"referralUpdate\":{}}",
              "referralUpdate: only one member of a oneof may be set, and referral already is");
    /* The same field under both of its names counts twice too. */
    s_refused("{\"caseId\":\"a\",\"case_id\":\"b\"}", "case_id: field given twice");
}

Test(json, integer_ranges_checked)
{
    s_refused("{\"welcome\":{\"heartbeatMs\":4294967296}}",
              "welcome.heartbeatMs: the number is out of range for uint32");
    s_refused("{\"welcome\":{\"heartbeatMs\":-1}}",
              "welcome.heartbeatMs: the number is out of range");
    s_refused("{\"welcome\":{\"heartbeatMs\":1.5}}",
              "welcome.heartbeatMs: the number is out of range");
    s_refused("{\"adminReply\":{\"brokerStatus\":{\"sessions\":\"-1\"}}}",
              "adminReply.brokerStatus.sessions: the number is out of range for uint64");
    s_refused("{\"createdAt\":\"9223372036854775808\"}", "createdAt: the number is out");

    char err[256] = "";
    ProtobufCMessage *m = NULL;
    cr_assert_eq(s_decode("{\"welcome\":{\"heartbeatMs\":4294967295,\"maxRecord\":\"7\"},"
                          "\"createdAt\":\"-9223372036854775808\"}",
                          &m, err, sizeof err),
                 0, "%s", err);
    ml_envelope_t *e = (ml_envelope_t *)m;
    cr_assert_eq(e->welcome->heartbeat_ms, UINT32_MAX);
    cr_assert_eq(e->welcome->max_record, 7);
    cr_assert_eq(e->created_at, INT64_MIN);
    ml_env_free(&e);
}

Test(json, deep_nesting_refused)
{
    /* 100 levels inside a known field: refused before anything is built. */
    char json[1024] = "{\"referral\":";
    for (int i = 0; i < 100; i++)
        strcat(json, "[");
    for (int i = 0; i < 100; i++)
        strcat(json, "]");
    strcat(json, "}");
    s_refused(json, "nesting deeper than 64 levels");
}

Test(json, errors_inside_lists_free_the_partial_message)
{
    /* Fails on the third diagnosis, after two were built; run under ASan
     * or valgrind this also proves the partial message is freed. */
    s_refused("{\"referral\":{\"patient\":{\"name\":\"n\"},\"diagnosis\":[{\"icd10\":\"A01\"},"
              "{\"icd10\":\"B02\"},{\"icd10\":3}]}}",
              "referral.diagnosis[2].icd10: expected a string");
}

/* The schema has no bytes field, so bytes are exercised on a small
 * descriptor written by hand, laid out as protoc-c would lay it out. */
typedef struct {
    ProtobufCMessage base;
    ProtobufCBinaryData blob;
    size_t n_chunks;
    ProtobufCBinaryData *chunks;
} s_blob_t;

static void s_blob_init(ProtobufCMessage *m);

static const ProtobufCFieldDescriptor s_blob_fields[2] = {
    {"blob", 1, PROTOBUF_C_LABEL_NONE, PROTOBUF_C_TYPE_BYTES, 0, offsetof(s_blob_t, blob), NULL,
     NULL, 0, 0, NULL, NULL},
    {"chunks", 2, PROTOBUF_C_LABEL_REPEATED, PROTOBUF_C_TYPE_BYTES, offsetof(s_blob_t, n_chunks),
     offsetof(s_blob_t, chunks), NULL, NULL, 0, 0, NULL, NULL},
};
static const unsigned s_blob_by_name[2] = {0, 1};
static const ProtobufCIntRange s_blob_ranges[2] = {{1, 0}, {0, 2}};
static const ProtobufCMessageDescriptor s_blob_desc = {PROTOBUF_C__MESSAGE_DESCRIPTOR_MAGIC,
                                                       "test.Blob",
                                                       "Blob",
                                                       "Blob",
                                                       "test",
                                                       sizeof(s_blob_t),
                                                       2,
                                                       s_blob_fields,
                                                       s_blob_by_name,
                                                       1,
                                                       s_blob_ranges,
                                                       s_blob_init,
                                                       NULL,
                                                       NULL,
                                                       NULL};

static void s_blob_init(ProtobufCMessage *m)
{
    memset(m, 0, sizeof(s_blob_t));
    m->descriptor = &s_blob_desc;
}

Test(json, bytes_base64_round_trip)
{
    uint8_t data[] = {0xfb, 0xff, 0x00, 0x10, 0x3e};
    s_blob_t b;
    s_blob_init(&b.base);
    b.blob.data = data;
    b.blob.len = sizeof data;
    ProtobufCBinaryData chunks[2] = {{1, data}, {2, data}};
    b.n_chunks = 2;
    b.chunks = chunks;

    char *text = NULL, err[256] = "";
    cr_assert_eq(ml_json_encode(&b.base, 0, &text, err, sizeof err), 0, "%s", err);
    cr_assert_str_eq(text, "{\"blob\":\"+/8AED4=\",\"chunks\":[\"+w==\",\"+/8=\"]}");

    ProtobufCMessage *m = NULL;
    cr_assert_eq(ml_json_decode(&s_blob_desc, text, strlen(text), &m, err, sizeof err), 0, "%s",
                 err);
    s_blob_t *back = (s_blob_t *)m;
    cr_assert_eq(back->blob.len, sizeof data);
    cr_assert_eq(memcmp(back->blob.data, data, sizeof data), 0);
    cr_assert_eq(back->n_chunks, 2);
    cr_assert_eq(back->chunks[1].len, 2);
    protobuf_c_message_free_unpacked(m, NULL);
    free(text);

    /* URL-safe and unpadded input is accepted too. */
    const char *url = "{\"blob\":\"-_8AED4\"}";
    cr_assert_eq(ml_json_decode(&s_blob_desc, url, strlen(url), &m, err, sizeof err), 0, "%s", err);
    back = (s_blob_t *)m;
    cr_assert_eq(back->blob.len, sizeof data);
    cr_assert_eq(memcmp(back->blob.data, data, sizeof data), 0);
    protobuf_c_message_free_unpacked(m, NULL);

    const char *bad = "{\"chunks\":[\"+w==\",\"a*b=\"]}";
    m = NULL;
    cr_assert_eq(ml_json_decode(&s_blob_desc, bad, strlen(bad), &m, err, sizeof err), ML_EINVAL);
    cr_assert_null(m);
    cr_assert(strstr(err, "chunks[1]: invalid base64"), "%s", err);
}
