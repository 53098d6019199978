/* Envelope helpers: protobuf-c pack/unpack, the Kind <-> payload-case table,
 * the names used in logs and tools, and ml_env_validate, the one place that
 * decides whether a routed message is well-formed. The broker runs it on
 * every message it accepts and the agent on every message it sends, so its
 * error sentences are written for the clinic staff who read them in a
 * refusal: they name the field as it appears in the .proto file
 * ("referral.patient.name is required"). */
#include "ml_env.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "ml_common.h"

#define ML_ENV_CASE_ID_MAX 128
#define ML_ENV_NODE_ID_MAX 255

int ml_env_pack(const ml_envelope_t *e, uint8_t **out, size_t *len)
{
    size_t n = medlink__v1__envelope__get_packed_size(e);
    /* An all-default envelope packs to zero bytes; malloc(0) may return
     * NULL, which would read as out of memory. */
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf)
        return ML_ENOMEM;
    *len = medlink__v1__envelope__pack(e, buf);
    *out = buf;
    return 0;
}

int ml_env_unpack(const uint8_t *data, size_t len, ml_envelope_t **out)
{
    ml_envelope_t *e = medlink__v1__envelope__unpack(NULL, len, data);
    if (!e)
        return ML_EPROTO;
    *out = e;
    return 0;
}

void ml_env_free(ml_envelope_t **e)
{
    if (!e || !*e)
        return;
    medlink__v1__envelope__free_unpacked(*e, NULL);
    *e = NULL;
}

int ml_env_kind_of_payload(int payload_case)
{
    switch (payload_case) {
    case MEDLINK__V1__ENVELOPE__PAYLOAD_HELLO:
        return MEDLINK__V1__KIND__KIND_HELLO;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_WELCOME:
        return MEDLINK__V1__KIND__KIND_WELCOME;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED:
        return MEDLINK__V1__KIND__KIND_ACCEPTED;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_ACK:
        return MEDLINK__V1__KIND__KIND_ACK;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_NACK:
        return MEDLINK__V1__KIND__KIND_NACK;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_HEARTBEAT:
        return MEDLINK__V1__KIND__KIND_HEARTBEAT;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REQUEST:
        return MEDLINK__V1__KIND__KIND_ADMIN_REQUEST;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REPLY:
        return MEDLINK__V1__KIND__KIND_ADMIN_REPLY;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL:
        return MEDLINK__V1__KIND__KIND_REFERRAL;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL_UPDATE:
        return MEDLINK__V1__KIND__KIND_REFERRAL_UPDATE;
    default:
        return MEDLINK__V1__KIND__KIND_UNSPECIFIED;
    }
}

int ml_env_kind_is_routed(int kind)
{
    return kind == MEDLINK__V1__KIND__KIND_REFERRAL ||
           kind == MEDLINK__V1__KIND__KIND_REFERRAL_UPDATE;
}

/* Kind numbers and short names; ml_kind_name and ml_kind_parse share it. */
static const struct {
    int kind;
    const char *name;
} s_kinds[] = {
    {MEDLINK__V1__KIND__KIND_HELLO, "HELLO"},
    {MEDLINK__V1__KIND__KIND_WELCOME, "WELCOME"},
    {MEDLINK__V1__KIND__KIND_ACCEPTED, "ACCEPTED"},
    {MEDLINK__V1__KIND__KIND_ACK, "ACK"},
    {MEDLINK__V1__KIND__KIND_NACK, "NACK"},
    {MEDLINK__V1__KIND__KIND_HEARTBEAT, "HEARTBEAT"},
    {MEDLINK__V1__KIND__KIND_ADMIN_REQUEST, "ADMIN_REQUEST"},
    {MEDLINK__V1__KIND__KIND_ADMIN_REPLY, "ADMIN_REPLY"},
    {MEDLINK__V1__KIND__KIND_REFERRAL, "REFERRAL"},
    {MEDLINK__V1__KIND__KIND_REFERRAL_UPDATE, "REFERRAL_UPDATE"},
};

const char *ml_kind_name(int kind)
{
    for (size_t i = 0; i < sizeof s_kinds / sizeof s_kinds[0]; i++)
        if (s_kinds[i].kind == kind)
            return s_kinds[i].name;
    return "UNSPECIFIED";
}

int ml_kind_parse(const char *s, int *kind)
{
    if (!s)
        return ML_EINVAL;
    /* Accept the enum's own spelling too, since that is what JSON shows. */
    if (strncasecmp(s, "KIND_", 5) == 0)
        s += 5;
    for (size_t i = 0; i < sizeof s_kinds / sizeof s_kinds[0]; i++) {
        if (strcasecmp(s_kinds[i].name, s) == 0) {
            *kind = s_kinds[i].kind;
            return 0;
        }
    }
    return ML_EINVAL;
}

static const char *const s_priorities[] = {
    [MEDLINK__V1__PRIORITY__PRIORITY_ROUTINE] = "ROUTINE",
    [MEDLINK__V1__PRIORITY__PRIORITY_URGENT] = "URGENT",
    [MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY] = "EMERGENCY",
};
#define S_N_PRIORITIES ((int)(sizeof s_priorities / sizeof s_priorities[0]))

const char *ml_priority_name(int priority)
{
    if (priority < 0 || priority >= S_N_PRIORITIES)
        return "UNKNOWN";
    return s_priorities[priority];
}

int ml_priority_parse(const char *s, int *priority)
{
    if (!s)
        return ML_EINVAL;
    if (strncasecmp(s, "PRIORITY_", 9) == 0)
        s += 9;
    for (int i = 0; i < S_N_PRIORITIES; i++) {
        if (strcasecmp(s_priorities[i], s) == 0) {
            *priority = i;
            return 0;
        }
    }
    return ML_EINVAL;
}

/* ---- validation -------------------------------------------------------- */

static int s_fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int s_fail(char *err, size_t errlen, const char *fmt, ...)
{
    if (err && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return ML_EINVAL;
}

static int s_empty(const char *s)
{
    return !s || !*s;
}

/* Node ids are what certificates name and what the registry and the file
 * system (spool folders) use, hence the plain charset. */
static int s_check_node_id(const char *field, const char *s, char *err, size_t errlen)
{
    if (s_empty(s))
        return s_fail(err, errlen, "%s is required", field);
    size_t n = strlen(s);
    if (n > ML_ENV_NODE_ID_MAX)
        return s_fail(err, errlen, "%s is longer than %d characters", field, ML_ENV_NODE_ID_MAX);
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-'))
            return s_fail(err, errlen,
                          "%s \"%.64s\" may only contain letters, digits, '.', '_' and '-'", field,
                          s);
    }
    return 0;
}

static int s_is_upper(char c)
{
    return c >= 'A' && c <= 'Z';
}

static int s_is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* ICD-10 code: ^[A-Z][0-9][0-9A-Z](\.[0-9A-Za-z]{1,8})?$. The third
 * character may be a letter (ICD-10-CM "C4A"), and the part after the dot
 * is long enough for the extension codes of China's national clinical
 * edition, which use a lower-case x ("I21.000x002"). */
static int s_icd10_valid(const char *s)
{
    if (!s_is_upper(s[0]) || !s_is_digit(s[1]) || !(s_is_digit(s[2]) || s_is_upper(s[2])))
        return 0;
    if (s[3] == '\0')
        return 1;
    if (s[3] != '.')
        return 0;
    size_t n = 0;
    for (const char *p = s + 4; *p; p++, n++)
        if (!s_is_upper(*p) && !s_is_digit(*p) && *p != 'x')
            return 0;
    return n >= 1 && n <= 8;
}

static int s_validate_referral(const Medlink__V1__Referral *r, char *err, size_t errlen)
{
    const Medlink__V1__Patient *p = r->patient;
    if (!p)
        return s_fail(err, errlen, "referral.patient is required");
    if (s_empty(p->name))
        return s_fail(err, errlen, "referral.patient.name is required");
    if (s_empty(p->health_card_id))
        return s_fail(err, errlen, "referral.patient.health_card_id is required");
    if (!protobuf_c_enum_descriptor_get_value(&medlink__v1__sex__descriptor, (int)p->sex))
        return s_fail(err, errlen, "referral.patient.sex %d is not a known value", (int)p->sex);
    if (s_empty(r->reason))
        return s_fail(err, errlen, "referral.reason is required");
    for (size_t i = 0; i < r->n_diagnosis; i++) {
        const Medlink__V1__Diagnosis *d = r->diagnosis[i];
        if (!d || s_empty(d->icd10))
            return s_fail(err, errlen, "referral.diagnosis[%zu].icd10 is required", i);
        if (!s_icd10_valid(d->icd10))
            return s_fail(err, errlen,
                          "referral.diagnosis[%zu].icd10 \"%.32s\" is not an ICD-10 code "
                          "(like J18, I21.4 or I21.000x002)",
                          i, d->icd10);
    }
    return 0;
}

static int s_validate_update(const Medlink__V1__ReferralUpdate *u, char *err, size_t errlen)
{
    int st = (int)u->status;
    if (st == MEDLINK__V1__REFERRAL_STATUS__REFERRAL_STATUS_UNSPECIFIED)
        return s_fail(err, errlen, "referral_update.status is required");
    const ProtobufCEnumValue *ev =
        protobuf_c_enum_descriptor_get_value(&medlink__v1__referral_status__descriptor, st);
    if (!ev)
        return s_fail(err, errlen, "referral_update.status %d is not a known status", st);
    if (st == MEDLINK__V1__REFERRAL_STATUS__REFERRAL_REDIRECTED) {
        if (s_empty(u->redirect_to))
            return s_fail(err, errlen, "referral_update.redirect_to is required when status is %s",
                          ev->name);
        int rc = s_check_node_id("referral_update.redirect_to", u->redirect_to, err, errlen);
        if (rc < 0)
            return rc;
    }
    if ((st == MEDLINK__V1__REFERRAL_STATUS__REFERRAL_REJECTED ||
         st == MEDLINK__V1__REFERRAL_STATUS__REFERRAL_CANCELLED) &&
        s_empty(u->reason))
        return s_fail(err, errlen, "referral_update.reason is required when status is %s",
                      ev->name);
    return 0;
}

int ml_env_validate(ml_envelope_t *e, char *err, size_t errlen)
{
    int rc;
    if (!e)
        return s_fail(err, errlen, "no envelope");
    if (s_empty(e->id))
        return s_fail(err, errlen, "id is required");
    if (!ml_ulid_valid(e->id))
        return s_fail(err, errlen, "id \"%.40s\" is not a ULID", e->id);
    if (s_empty(e->case_id))
        return s_fail(err, errlen, "case_id is required");
    if (strlen(e->case_id) > ML_ENV_CASE_ID_MAX)
        return s_fail(err, errlen, "case_id is longer than %d characters", ML_ENV_CASE_ID_MAX);
    if ((rc = s_check_node_id("from", e->from, err, errlen)) < 0)
        return rc;
    if ((rc = s_check_node_id("to", e->to, err, errlen)) < 0)
        return rc;
    if ((int)e->priority < 0 || (int)e->priority >= S_N_PRIORITIES)
        return s_fail(err, errlen, "priority %d is out of range", (int)e->priority);

    int pkind = ml_env_kind_of_payload((int)e->payload_case);
    if (pkind == MEDLINK__V1__KIND__KIND_UNSPECIFIED) {
        if (e->kind != MEDLINK__V1__KIND__KIND_UNSPECIFIED)
            return s_fail(err, errlen, "payload is required (kind is %s)",
                          ml_kind_name((int)e->kind));
        return s_fail(err, errlen, "payload is required");
    }
    if (e->kind != MEDLINK__V1__KIND__KIND_UNSPECIFIED && (int)e->kind != pkind)
        return s_fail(err, errlen, "kind %s does not match the payload, which is a %s",
                      ml_kind_name((int)e->kind), ml_kind_name(pkind));
    if (!ml_env_kind_is_routed(pkind))
        return s_fail(err, errlen, "kind %s is a session message, not one that can be routed",
                      ml_kind_name(pkind));

    if (pkind == MEDLINK__V1__KIND__KIND_REFERRAL) {
        if (!e->referral)
            return s_fail(err, errlen, "referral is required");
        rc = s_validate_referral(e->referral, err, errlen);
    } else {
        if (!e->referral_update)
            return s_fail(err, errlen, "referral_update is required");
        rc = s_validate_update(e->referral_update, err, errlen);
    }
    if (rc < 0)
        return rc;
    /* Filled in only once everything holds, so a refused envelope is left
     * as the sender wrote it. */
    e->kind = (Medlink__V1__Kind)pkind;
    return 0;
}
