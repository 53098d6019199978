/* Envelope helpers: protobuf-c pack/unpack, the Kind <-> payload-case table,
 * the names used in logs and tools, and ml_env_validate, the one place that
 * decides whether a routed message is well-formed. The broker runs it on
 * every message it accepts and the agent on every message it sends, so its
 * error sentences are written for the clinic staff who read them in a
 * refusal: they name the field as it appears in the .proto file
 * ("referral.patient.name is required"). */
#include "ml_env.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "ml_common.h"
#include "ml_text.h"
#include "ml_imaging.h" /* chunk sizes and the SHA-256 hex length only */

#define ML_ENV_CASE_ID_MAX 128
#define ML_ENV_NODE_ID_MAX 255
#define ML_ENV_UID_MAX 64        /* DICOM PS3.5: a UID is at most 64 characters */
#define ML_ENV_FILE_NAME_MAX 128 /* DicomObject.file_name */

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

/* 1 if m or a message inside it kept an unknown field numbered 0. Field 0
 * is not a valid protobuf field, but protobuf-c 1.4 accepts one whose tag
 * is written as an overlong varint (82 00), keeps it as an unknown field
 * and packs it back as 02, which it then refuses: the broker would accept
 * and store such an envelope that no recipient can unpack (found by
 * tests/fuzz, regression envelope/crash-adb61cb7...). O(messages in the
 * tree); depth is bounded because the .proto files have no recursion. */
static int s_has_field0(const ProtobufCMessage *m, int depth)
{
    if (!m || depth > 32)
        return 0;
    for (unsigned i = 0; i < m->n_unknown_fields; i++)
        if (m->unknown_fields[i].tag == 0)
            return 1;
    const ProtobufCMessageDescriptor *d = m->descriptor;
    const char *base = (const char *)m;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (f->type != PROTOBUF_C_TYPE_MESSAGE)
            continue;
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)(base + f->quantifier_offset);
            ProtobufCMessage *const *v = *(ProtobufCMessage *const *const *)(base + f->offset);
            for (size_t k = 0; k < n; k++)
                if (s_has_field0(v[k], depth + 1))
                    return 1;
            continue;
        }
        /* A oneof member's pointer is only valid when it is the case set. */
        if ((f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
            *(const uint32_t *)(base + f->quantifier_offset) != f->id)
            continue;
        if (s_has_field0(*(ProtobufCMessage *const *)(base + f->offset), depth + 1))
            return 1;
    }
    return 0;
}

int ml_env_unpack(const uint8_t *data, size_t len, ml_envelope_t **out)
{
    ml_envelope_t *e = medlink__v1__envelope__unpack(NULL, len, data);
    if (!e)
        return ML_EPROTO;
    if (s_has_field0(&e->base, 0)) {
        medlink__v1__envelope__free_unpacked(e, NULL);
        return ML_EPROTO;
    }
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

/* Every Kind: its payload case, its short name, and whether it is routed
 * between nodes and stored (the clinical messages) or belongs to the
 * session (control messages). ml_env_kind_of_payload, ml_env_kind_is_routed,
 * ml_kind_name and ml_kind_parse all read this one table; test_env.c walks
 * the Envelope's payload oneof and the Kind enum against it. O(N) lookups
 * over 18 rows. */
#define P_(x) MEDLINK__V1__ENVELOPE__PAYLOAD_##x
#define K_(x) MEDLINK__V1__KIND__KIND_##x
static const struct {
    int kind;
    int payload_case;
    const char *name;
    int routed;
} s_kinds[] = {
    {K_(HELLO), P_(HELLO), "HELLO", 0},
    {K_(WELCOME), P_(WELCOME), "WELCOME", 0},
    {K_(ACCEPTED), P_(ACCEPTED), "ACCEPTED", 0},
    {K_(ACK), P_(ACK), "ACK", 0},
    {K_(NACK), P_(NACK), "NACK", 0},
    {K_(HEARTBEAT), P_(HEARTBEAT), "HEARTBEAT", 0},
    {K_(ADMIN_REQUEST), P_(ADMIN_REQUEST), "ADMIN_REQUEST", 0},
    {K_(ADMIN_REPLY), P_(ADMIN_REPLY), "ADMIN_REPLY", 0},
    {K_(REFERRAL), P_(REFERRAL), "REFERRAL", 1},
    {K_(REFERRAL_UPDATE), P_(REFERRAL_UPDATE), "REFERRAL_UPDATE", 1},
    {K_(IMAGING_CONSULT), P_(IMAGING_CONSULT), "IMAGING_CONSULT", 1},
    {K_(IMAGING_CHUNK), P_(IMAGING_CHUNK), "IMAGING_CHUNK", 1},
    {K_(IMAGING_RESEND), P_(IMAGING_RESEND), "IMAGING_RESEND", 1},
    {K_(IMAGING_UPDATE), P_(IMAGING_UPDATE), "IMAGING_UPDATE", 1},
    {K_(IMAGING_REPORT), P_(IMAGING_REPORT), "IMAGING_REPORT", 1},
    {K_(DOWN_TRANSFER), P_(DOWN_TRANSFER), "DOWN_TRANSFER", 1},
    {K_(DOWN_TRANSFER_UPDATE), P_(DOWN_TRANSFER_UPDATE), "DOWN_TRANSFER_UPDATE", 1},
    /* The broker's report on a case to ops nodes and the case's sender:
     * stored and delivered like any clinical message, so it survives an
     * ops node that is offline. */
    {K_(ESCALATION), P_(ESCALATION), "ESCALATION", 1},
};
#define S_N_KINDS (sizeof s_kinds / sizeof s_kinds[0])

int ml_env_kind_of_payload(int payload_case)
{
    for (size_t i = 0; i < S_N_KINDS; i++)
        if (s_kinds[i].payload_case == payload_case)
            return s_kinds[i].kind;
    return MEDLINK__V1__KIND__KIND_UNSPECIFIED;
}

int ml_env_kind_is_routed(int kind)
{
    for (size_t i = 0; i < S_N_KINDS; i++)
        if (s_kinds[i].kind == kind)
            return s_kinds[i].routed;
    return 0;
}

const char *ml_kind_name(int kind)
{
    for (size_t i = 0; i < S_N_KINDS; i++)
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
    for (size_t i = 0; i < S_N_KINDS; i++) {
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

/* ---- text ------------------------------------------------------------- */

/* Appends ".name" (nothing before it at the root) or "[i]" to path[0..*plen)
 * and returns the old length, to put back afterwards. A path too long for
 * the buffer is cut, which only shortens the error sentence. */
static size_t s_path_add(char *path, size_t cap, size_t *plen, const char *name, size_t index,
                         int is_index)
{
    size_t old = *plen;
    int n = is_index ? snprintf(path + old, cap - old, "[%zu]", index)
                     : snprintf(path + old, cap - old, "%s%s", old ? "." : "", name);
    if (n > 0)
        *plen = old + (size_t)n < cap ? old + (size_t)n : cap - 1;
    return old;
}

/* Walks every string field of m and of the messages inside it (oneof
 * members only when set). O(size of the message tree); the depth is
 * bounded because the .proto files have no recursion. */
static int s_check_text(const ProtobufCMessage *m, char *path, size_t cap, size_t *plen, int depth,
                        char *err, size_t errlen)
{
    if (!m || depth > 32)
        return 0;
    const ProtobufCMessageDescriptor *d = m->descriptor;
    const char *base = (const char *)m;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE)
            continue;
        if ((f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
            *(const uint32_t *)(base + f->quantifier_offset) != f->id)
            continue;
        size_t n = 1;
        const void *const *v = (const void *const *)(base + f->offset);
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            n = *(const size_t *)(base + f->quantifier_offset);
            v = *(const void *const *const *)(base + f->offset);
        }
        size_t old = s_path_add(path, cap, plen, f->name, 0, 0);
        for (size_t k = 0; k < n; k++) {
            size_t old_k = *plen;
            if (f->label == PROTOBUF_C_LABEL_REPEATED)
                s_path_add(path, cap, plen, NULL, k, 1);
            int rc = 0;
            if (f->type == PROTOBUF_C_TYPE_STRING) {
                const char *str = v[k];
                if (str && !ml_utf8_valid(str, strlen(str)))
                    rc = s_fail(err, errlen, "%s is not valid UTF-8 text", path);
            } else {
                rc = s_check_text(v[k], path, cap, plen, depth + 1, err, errlen);
            }
            *plen = old_k;
            path[old_k] = '\0';
            if (rc < 0)
                return rc;
        }
        *plen = old;
        path[old] = '\0';
    }
    return 0;
}

int ml_env_check_text(const ProtobufCMessage *m, char *err, size_t errlen)
{
    char path[256] = "";
    size_t plen = 0;
    return s_check_text(m, path, sizeof path, &plen, 0, err, errlen);
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
            return s_fail(err, errlen, "%s may only contain letters, digits, '.', '_' and '-'",
                          field);
    }
    return 0;
}

/* Case ids (and the ids that name another case) reach logs, file names,
 * SQL rows and medlinkctl's output, so they keep to the same plain
 * charset as message ids (ml_text_id_valid). required 0: empty is fine. */
static int s_check_case_id(const char *field, const char *s, int required, char *err, size_t errlen)
{
    if (s_empty(s))
        return required ? s_fail(err, errlen, "%s is required", field) : 0;
    if (strlen(s) > ML_ENV_CASE_ID_MAX)
        return s_fail(err, errlen, "%s is longer than %d characters", field, ML_ENV_CASE_ID_MAX);
    if (!ml_text_id_valid(s, ML_ENV_CASE_ID_MAX))
        return s_fail(err, errlen,
                      "%s may only contain letters, digits, '.', '_', ':', '@' and '-'", field);
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

/* A patient as every clinical message names one: prefix is the field path
 * ("referral.patient"). */
static int s_validate_patient(const char *prefix, const Medlink__V1__Patient *p, char *err,
                              size_t errlen)
{
    if (!p)
        return s_fail(err, errlen, "%s is required", prefix);
    if (s_empty(p->name))
        return s_fail(err, errlen, "%s.name is required", prefix);
    if (s_empty(p->health_card_id))
        return s_fail(err, errlen, "%s.health_card_id is required", prefix);
    if (!protobuf_c_enum_descriptor_get_value(&medlink__v1__sex__descriptor, (int)p->sex))
        return s_fail(err, errlen, "%s.sex %d is not a known value", prefix, (int)p->sex);
    return 0;
}

/* Diagnoses are optional, but each one given carries an ICD-10 code. */
static int s_validate_diagnoses(const char *prefix, size_t n, Medlink__V1__Diagnosis *const *ds,
                                char *err, size_t errlen)
{
    for (size_t i = 0; i < n; i++) {
        const Medlink__V1__Diagnosis *d = ds[i];
        if (!d || s_empty(d->icd10))
            return s_fail(err, errlen, "%s[%zu].icd10 is required", prefix, i);
        if (!s_icd10_valid(d->icd10))
            return s_fail(err, errlen,
                          "%s[%zu].icd10 is not an ICD-10 code "
                          "(like J18, I21.4 or I21.000x002)",
                          prefix, i);
    }
    return 0;
}

/* A DICOM UID (PS3.5 9.1): digits in components separated by single dots,
 * at most 64 characters. The standard also forbids a leading zero in a
 * component; that rule is not checked, because modalities in the field
 * write such UIDs and refusing a study over it would leave the patient's
 * images unread, while nothing here depends on it. */
static int s_check_uid(const char *field, const char *s, char *err, size_t errlen)
{
    if (s_empty(s))
        return s_fail(err, errlen, "%s is required", field);
    size_t n = strlen(s);
    if (n > ML_ENV_UID_MAX)
        return s_fail(err, errlen, "%s is longer than %d characters", field, ML_ENV_UID_MAX);
    for (size_t i = 0; i < n; i++) {
        int dot = s[i] == '.';
        if (!dot && !s_is_digit(s[i]))
            return s_fail(err, errlen,
                          "%s is not a DICOM UID (digits separated by dots, like "
                          "1.2.840.113619.2.55)",
                          field);
        if (dot && (i == 0 || i + 1 == n || s[i + 1] == '.'))
            return s_fail(err, errlen,
                          "%s is not a DICOM UID (a dot at the start or end, or two "
                          "dots in a row)",
                          field);
    }
    return 0;
}

/* The receiving agent writes the object under this name in a folder of its
 * own, so the name must not reach outside it nor hide in it: no folders, no
 * "." or "..", no leading dot, no control characters. */
static int s_check_file_name(const char *field, const char *s, char *err, size_t errlen)
{
    if (s_empty(s))
        return s_fail(err, errlen, "%s is required", field);
    size_t n = strlen(s);
    int plain = n <= ML_ENV_FILE_NAME_MAX && s[0] != '.';
    for (size_t i = 0; plain && i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '/' || c == '\\' || c < 0x20 || c == 0x7f)
            plain = 0;
    }
    if (!plain)
        return s_fail(err, errlen,
                      "%s must be a plain file name (no folders, no leading '.', no "
                      "control characters, at most %d characters)",
                      field, ML_ENV_FILE_NAME_MAX);
    return 0;
}

/* Exactly 64 lower-case hex digits (ml_sha256_hex's form). */
static int s_sha256_hex_valid(const char *s)
{
    size_t n = 0;
    for (; s[n]; n++)
        if (!s_is_digit(s[n]) && !(s[n] >= 'a' && s[n] <= 'f'))
            return 0;
    return n == ML_SHA256_HEX;
}

static int s_check_sha256(const char *field, const char *s, char *err, size_t errlen)
{
    if (s_empty(s))
        return s_fail(err, errlen, "%s is required", field);
    if (!s_sha256_hex_valid(s))
        return s_fail(err, errlen, "%s is not a SHA-256 (64 lower-case hex digits)", field);
    return 0;
}

/* The status of an update: set, and a value of its enum. Returns the enum
 * value (for its name) or NULL with err written. */
static const ProtobufCEnumValue *s_check_status(const char *field, const ProtobufCEnumDescriptor *d,
                                                int st, char *err, size_t errlen)
{
    if (st == 0) {
        s_fail(err, errlen, "%s is required", field);
        return NULL;
    }
    const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(d, st);
    if (!ev)
        s_fail(err, errlen, "%s %d is not a known status", field, st);
    return ev;
}

static int s_validate_referral(const Medlink__V1__Referral *r, char *err, size_t errlen)
{
    int rc;
    if ((rc = s_validate_patient("referral.patient", r->patient, err, errlen)) < 0)
        return rc;
    if (s_empty(r->reason))
        return s_fail(err, errlen, "referral.reason is required");
    if ((rc = s_validate_diagnoses("referral.diagnosis", r->n_diagnosis, r->diagnosis, err,
                                   errlen)) < 0)
        return rc;
    /* A case id like the envelope's own; empty when the referral does not
     * come from a down-transfer. */
    return s_check_case_id("referral.linked_case_id", r->linked_case_id, 0, err, errlen);
}

static int s_validate_update(const Medlink__V1__ReferralUpdate *u, char *err, size_t errlen)
{
    int st = (int)u->status;
    const ProtobufCEnumValue *ev = s_check_status(
        "referral_update.status", &medlink__v1__referral_status__descriptor, st, err, errlen);
    if (!ev)
        return ML_EINVAL;
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

/* The consult's metadata and its list of objects. The chunks themselves
 * arrive as messages of their own; what is checked here is that the list
 * adds up (every object has as many chunks as its size needs, and the sizes
 * add up to total_bytes), so a receiver can tell when it has everything.
 * O(objects). */
static int s_validate_imaging_consult(const Medlink__V1__ImagingConsult *c, char *err,
                                      size_t errlen)
{
    int rc;
    char field[96];
    if ((rc = s_validate_patient("imaging_consult.patient", c->patient, err, errlen)) < 0)
        return rc;
    if ((rc = s_check_uid("imaging_consult.study_instance_uid", c->study_instance_uid, err,
                          errlen)) < 0)
        return rc;
    if (s_empty(c->modality))
        return s_fail(err, errlen, "imaging_consult.modality is required");
    if (c->n_object == 0)
        return s_fail(err, errlen, "imaging_consult.object needs at least one DICOM object");
    if (c->chunk_size < ML_IMAGING_CHUNK_MIN || c->chunk_size > ML_IMAGING_CHUNK_MAX)
        return s_fail(err, errlen,
                      "imaging_consult.chunk_size %" PRIu32 " is not between %u and %u bytes",
                      c->chunk_size, ML_IMAGING_CHUNK_MIN, ML_IMAGING_CHUNK_MAX);
    uint64_t total = 0;
    for (size_t i = 0; i < c->n_object; i++) {
        const Medlink__V1__DicomObject *o = c->object[i];
        if (!o)
            return s_fail(err, errlen, "imaging_consult.object[%zu] is empty", i);
        snprintf(field, sizeof field, "imaging_consult.object[%zu].sop_instance_uid", i);
        if ((rc = s_check_uid(field, o->sop_instance_uid, err, errlen)) < 0)
            return rc;
        if (!s_empty(o->series_instance_uid)) {
            snprintf(field, sizeof field, "imaging_consult.object[%zu].series_instance_uid", i);
            if ((rc = s_check_uid(field, o->series_instance_uid, err, errlen)) < 0)
                return rc;
        }
        snprintf(field, sizeof field, "imaging_consult.object[%zu].file_name", i);
        if ((rc = s_check_file_name(field, o->file_name, err, errlen)) < 0)
            return rc;
        snprintf(field, sizeof field, "imaging_consult.object[%zu].sha256", i);
        if ((rc = s_check_sha256(field, o->sha256, err, errlen)) < 0)
            return rc;
        /* ceil(size / chunk_size), and one chunk for an empty object, as
         * ml_imaging_chunk_count counts them. */
        uint64_t want = o->size / c->chunk_size + (o->size % c->chunk_size != 0);
        if (want == 0)
            want = 1;
        if (o->chunks != want)
            return s_fail(err, errlen,
                          "imaging_consult.object[%zu].chunks is %" PRIu32 ", but an object of "
                          "%" PRIu64 " bytes in chunks of %" PRIu32 " bytes has %" PRIu64,
                          i, o->chunks, o->size, c->chunk_size, want);
        if (o->size > UINT64_MAX - total)
            return s_fail(err, errlen,
                          "imaging_consult.object sizes add up to more than total_bytes can hold");
        total += o->size;
    }
    if (c->total_bytes != total)
        return s_fail(err, errlen,
                      "imaging_consult.total_bytes is %" PRIu64 ", but the objects' sizes add up "
                      "to %" PRIu64,
                      c->total_bytes, total);
    return s_validate_diagnoses("imaging_consult.diagnosis", c->n_diagnosis, c->diagnosis, err,
                                errlen);
}

/* One chunk on its own. Whether it fits the consult (object_index,
 * chunk_index, offset) and whether data matches sha256 are for whoever
 * holds the consult and the bytes; this check needs neither. */
static int s_validate_imaging_chunk(const Medlink__V1__ImagingChunk *c, char *err, size_t errlen)
{
    int rc;
    if (s_empty(c->study_instance_uid))
        return s_fail(err, errlen, "imaging_chunk.study_instance_uid is required");
    if (c->data.len == 0)
        return s_fail(err, errlen, "imaging_chunk.data is required");
    if (c->data.len > ML_IMAGING_CHUNK_MAX)
        return s_fail(err, errlen,
                      "imaging_chunk.data is %zu bytes, more than the %u a chunk may have",
                      c->data.len, ML_IMAGING_CHUNK_MAX);
    if ((rc = s_check_sha256("imaging_chunk.sha256", c->sha256, err, errlen)) < 0)
        return rc;
    return 0;
}

static int s_validate_imaging_resend(const Medlink__V1__ImagingResend *r, char *err, size_t errlen)
{
    if (r->n_chunk_index == 0)
        return s_fail(err, errlen, "imaging_resend.chunk_index needs at least one chunk");
    return 0;
}

static int s_validate_imaging_update(const Medlink__V1__ImagingUpdate *u, char *err, size_t errlen)
{
    int st = (int)u->status;
    const ProtobufCEnumValue *ev = s_check_status(
        "imaging_update.status", &medlink__v1__imaging_status__descriptor, st, err, errlen);
    if (!ev)
        return ML_EINVAL;
    if ((st == MEDLINK__V1__IMAGING_STATUS__IMAGING_REJECTED ||
         st == MEDLINK__V1__IMAGING_STATUS__IMAGING_CANCELLED) &&
        s_empty(u->reason))
        return s_fail(err, errlen, "imaging_update.reason is required when status is %s", ev->name);
    if (!s_empty(u->assigned_to))
        return s_check_node_id("imaging_update.assigned_to", u->assigned_to, err, errlen);
    return 0;
}

static int s_validate_imaging_report(const Medlink__V1__ImagingReport *r, char *err, size_t errlen)
{
    if (s_empty(r->study_instance_uid))
        return s_fail(err, errlen, "imaging_report.study_instance_uid is required");
    if (s_empty(r->impression) && s_empty(r->findings))
        return s_fail(err, errlen,
                      "imaging_report.impression or imaging_report.findings is "
                      "required");
    if (!r->reader || s_empty(r->reader->name))
        return s_fail(err, errlen, "imaging_report.reader.name is required (a report is signed)");
    if (r->signed_at <= 0)
        return s_fail(err, errlen, "imaging_report.signed_at is required");
    return 0;
}

static int s_validate_down_transfer(const Medlink__V1__DownTransfer *t, char *err, size_t errlen)
{
    int rc;
    if ((rc = s_validate_patient("down_transfer.patient", t->patient, err, errlen)) < 0)
        return rc;
    if (t->phase == MEDLINK__V1__REHAB_PHASE__REHAB_PHASE_UNSPECIFIED)
        return s_fail(err, errlen, "down_transfer.phase is required");
    if (!protobuf_c_enum_descriptor_get_value(&medlink__v1__rehab_phase__descriptor, (int)t->phase))
        return s_fail(err, errlen, "down_transfer.phase %d is not a known value", (int)t->phase);
    if (s_empty(t->discharge_summary))
        return s_fail(err, errlen, "down_transfer.discharge_summary is required");
    if (s_empty(t->family_doctor_team))
        return s_fail(err, errlen, "down_transfer.family_doctor_team is required");
    if (s_empty(t->rehab_plan))
        return s_fail(err, errlen, "down_transfer.rehab_plan is required");
    return s_validate_diagnoses("down_transfer.diagnosis", t->n_diagnosis, t->diagnosis, err,
                                errlen);
}

static int s_validate_down_update(const Medlink__V1__DownTransferUpdate *u, char *err,
                                  size_t errlen)
{
    int st = (int)u->status;
    const ProtobufCEnumValue *ev =
        s_check_status("down_transfer_update.status",
                       &medlink__v1__down_transfer_status__descriptor, st, err, errlen);
    if (!ev)
        return ML_EINVAL;
    if ((st == MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_DECLINED ||
         st == MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_CANCELLED) &&
        s_empty(u->reason))
        return s_fail(err, errlen, "down_transfer_update.reason is required when status is %s",
                      ev->name);
    if (st == MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_FOLLOW_UP && u->follow_up_number < 1)
        return s_fail(err, errlen,
                      "down_transfer_update.follow_up_number is required when status is %s "
                      "(1 for the first follow-up)",
                      ev->name);
    return s_check_case_id("down_transfer_update.referral_case_id", u->referral_case_id, 0, err,
                           errlen);
}

static int s_validate_escalation(const Medlink__V1__Escalation *x, char *err, size_t errlen)
{
    int r = (int)x->reason;
    if (r == MEDLINK__V1__ESCALATION_REASON__ESCALATION_UNSPECIFIED)
        return s_fail(err, errlen, "escalation.reason is required");
    if (!protobuf_c_enum_descriptor_get_value(&medlink__v1__escalation_reason__descriptor, r))
        return s_fail(err, errlen, "escalation.reason %d is not a known value", r);
    int rc;
    if ((rc = s_check_case_id("escalation.case_id", x->case_id, 1, err, errlen)) < 0)
        return rc;
    if ((rc = s_check_case_id("escalation.message_id", x->message_id, 0, err, errlen)) < 0)
        return rc;
    if (!s_empty(x->target) &&
        (rc = s_check_node_id("escalation.target", x->target, err, errlen)) < 0)
        return rc;
    if (!s_empty(x->redirected_to) &&
        (rc = s_check_node_id("escalation.redirected_to", x->redirected_to, err, errlen)) < 0)
        return rc;
    return 0;
}

/* The payload's own rules, by kind. A payload case whose pointer is NULL
 * (possible only for a hand-built envelope) is refused like a missing
 * one. */
static int s_validate_payload(const ml_envelope_t *e, int kind, char *err, size_t errlen)
{
#define S_NEED(member)                                                                             \
    do {                                                                                           \
        if (!e->member)                                                                            \
            return s_fail(err, errlen, #member " is required");                                    \
    } while (0)
    switch (kind) {
    case K_(REFERRAL):
        S_NEED(referral);
        return s_validate_referral(e->referral, err, errlen);
    case K_(REFERRAL_UPDATE):
        S_NEED(referral_update);
        return s_validate_update(e->referral_update, err, errlen);
    case K_(IMAGING_CONSULT):
        S_NEED(imaging_consult);
        return s_validate_imaging_consult(e->imaging_consult, err, errlen);
    case K_(IMAGING_CHUNK):
        S_NEED(imaging_chunk);
        return s_validate_imaging_chunk(e->imaging_chunk, err, errlen);
    case K_(IMAGING_RESEND):
        S_NEED(imaging_resend);
        return s_validate_imaging_resend(e->imaging_resend, err, errlen);
    case K_(IMAGING_UPDATE):
        S_NEED(imaging_update);
        return s_validate_imaging_update(e->imaging_update, err, errlen);
    case K_(IMAGING_REPORT):
        S_NEED(imaging_report);
        return s_validate_imaging_report(e->imaging_report, err, errlen);
    case K_(DOWN_TRANSFER):
        S_NEED(down_transfer);
        return s_validate_down_transfer(e->down_transfer, err, errlen);
    case K_(DOWN_TRANSFER_UPDATE):
        S_NEED(down_transfer_update);
        return s_validate_down_update(e->down_transfer_update, err, errlen);
    case K_(ESCALATION):
        S_NEED(escalation);
        return s_validate_escalation(e->escalation, err, errlen);
    default:
        /* A routed kind in s_kinds without a case here is a bug in this
         * file, and refusing is the safe way to find it. */
        return s_fail(err, errlen, "kind %s has no validation", ml_kind_name(kind));
    }
#undef S_NEED
}

int ml_env_validate(ml_envelope_t *e, char *err, size_t errlen)
{
    int rc;
    if (!e)
        return s_fail(err, errlen, "no envelope");
    /* First, so that nothing below reads, quotes or stores a string that
     * is not text. */
    if ((rc = ml_env_check_text(&e->base, err, errlen)) < 0)
        return rc;
    if (s_empty(e->id))
        return s_fail(err, errlen, "id is required");
    if (!ml_ulid_valid(e->id))
        return s_fail(err, errlen, "id is not a ULID (26 characters of Crockford base32)");
    if ((rc = s_check_case_id("case_id", e->case_id, 1, err, errlen)) < 0)
        return rc;
    if ((rc = s_check_node_id("from", e->from, err, errlen)) < 0)
        return rc;
    /* A node id, or a service name such as "imaging.ct", which uses the
     * same characters. */
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

    if ((rc = s_validate_payload(e, pkind, err, errlen)) < 0)
        return rc;
    /* Filled in only once everything holds, so a refused envelope is left
     * as the sender wrote it. */
    e->kind = (Medlink__V1__Kind)pkind;
    return 0;
}
