/* The messages of medlinkctl's send and ops commands. A message comes
 * either whole from --file (an Envelope, or just the payload object, in
 * proto3 JSON) or from flags; then ctl_build_finish applies the envelope
 * flags and runs ml_env_validate, the same check the agent and the broker
 * make, so that a malformed message is refused here with exit 2 rather
 * than by the broker. */
#include "build.h"

#include <ctype.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "ml_common.h"
#include "ml_json.h"

#define S_MAX_FILE (16u << 20)
#define S_DAY_MS (86400 * (int64_t)1000)

void ctl_set(char **field, const char *value)
{
    char *v = strdup(value ? value : "");
    if (!v)
        ctl_oom();
    if (*field && *field != protobuf_c_empty_string)
        free(*field);
    *field = v;
}

void *ctl_new(size_t size, void (*init)(void *))
{
    void *p = calloc(1, size);
    if (!p)
        ctl_oom();
    init(p);
    return p;
}

static void *s_array(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size);
    if (!p)
        ctl_oom();
    return p;
}

/* ---- values people type ---- */

/* An enum value by name, case-insensitive, '-' for '_', with or without
 * prefix. Value 0 (the UNSPECIFIED of every enum here) is refused. */
static int s_enum(const ProtobufCEnumDescriptor *d, const char *prefix, const char *s, int *out)
{
    char name[128], full[200];
    snprintf(name, sizeof name, "%s", s);
    for (char *p = name; *p; p++)
        *p = (char)(*p == '-' ? '_' : toupper((unsigned char)*p));
    const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value_by_name(d, name);
    if (!v) {
        snprintf(full, sizeof full, "%s%s", prefix, name);
        v = protobuf_c_enum_descriptor_get_value_by_name(d, full);
    }
    if (!v || v->value == 0)
        return ML_EINVAL;
    *out = v->value;
    return 0;
}

/* "A, B or C" of an enum's values without prefix, for error messages. */
static const char *s_enum_list(const ProtobufCEnumDescriptor *d, const char *prefix, char *buf,
                               size_t len)
{
    size_t used = 0, plen = strlen(prefix);
    buf[0] = '\0';
    for (unsigned i = 0; i < d->n_values; i++) {
        const char *n = d->values[i].name;
        if (d->values[i].value == 0)
            continue;
        if (strncmp(n, prefix, plen) == 0)
            n += plen;
        int w = snprintf(buf + used, len - used, "%s%s", used ? ", " : "", n);
        if (w < 0 || (size_t)w >= len - used)
            break;
        used += (size_t)w;
    }
    return buf;
}

int ctl_parse_time(const char *s, int64_t *out)
{
    char *end;
    if (*s == '+') {
        long long n = strtoll(s + 1, &end, 10);
        int64_t unit = *end == 's'   ? 1000
                       : *end == 'm' ? 60000
                       : *end == 'h' ? 3600000
                       : *end == 'd' ? S_DAY_MS
                                     : 0;
        if (end == s + 1 || n < 0 || !unit || end[1] != '\0')
            return ML_EINVAL;
        *out = ml_now_ms() + (int64_t)n * unit;
        return 0;
    }
    if (*s && strspn(s, "0123456789") == strlen(s)) {
        *out = strtoll(s, &end, 10);
        return 0;
    }
    struct tm tm = {0};
    int n = 0;
    if (sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour,
               &tm.tm_min, &tm.tm_sec, &n) != 6)
        return ML_EINVAL;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    const char *p = s + n;
    int64_t ms = 0;
    if (*p == '.') {
        int digits = 0;
        for (p++; isdigit((unsigned char)*p); p++, digits++)
            if (digits < 3)
                ms = ms * 10 + (*p - '0');
        for (; digits < 3; digits++)
            ms *= 10;
    }
    int64_t off = 0;
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        int hh, mm;
        if (sscanf(p + 1, "%2d:%2d", &hh, &mm) != 2)
            return ML_EINVAL;
        off = (int64_t)(hh * 60 + mm) * 60000 * (*p == '-' ? -1 : 1);
        p += 6;
    } else {
        return ML_EINVAL;
    }
    if (*p)
        return ML_EINVAL;
    *out = (int64_t)timegm(&tm) * 1000 + ms - off;
    return 0;
}

static int s_time_flag(const char *flag, const char *value, int64_t *out)
{
    if (ctl_parse_time(value, out) == 0)
        return CTL_EXIT_OK;
    return ctl_fail(CTL_EXIT_USAGE,
                    "--%s %s: expected RFC 3339 (2026-11-23T09:30:00+08:00), Unix milliseconds "
                    "or +DURATION (+30m, +4h, +2d)",
                    flag, value);
}

static int s_uint_flag(const char *flag, const char *value, uint64_t max, uint64_t *out)
{
    char *end;
    unsigned long long v = strtoull(value, &end, 10);
    if (!*value || *end || value[0] == '-' || v > max)
        return ctl_fail(CTL_EXIT_USAGE, "--%s %s: expected a whole number up to %llu", flag, value,
                        (unsigned long long)max);
    *out = v;
    return CTL_EXIT_OK;
}

static const char *const s_case_kinds[] = {"-", "referral", "imaging", "down_transfer"};

const char *ctl_case_kind_name(int kind)
{
    if (kind <= 0 || kind > 3)
        return "-";
    return s_case_kinds[kind];
}

int ctl_parse_case_kind(const char *s, int *kind)
{
    if (strncasecmp(s, "CASE_", 5) == 0)
        s += 5;
    for (int k = 1; k <= 3; k++) {
        const char *n = s_case_kinds[k];
        size_t i = 0;
        for (; n[i] && s[i]; i++)
            if (tolower((unsigned char)s[i]) != n[i] && !(n[i] == '_' && s[i] == '-'))
                break;
        if (!n[i] && !s[i]) {
            *kind = k;
            return 0;
        }
    }
    return ML_EINVAL;
}

/* ---- pieces shared by several messages ---- */

static int s_patient(const ctl_opts_t *o, Medlink__V1__Patient **out)
{
    Medlink__V1__Patient *p = CTL_NEW(Medlink__V1__Patient, medlink__v1__patient__init);
    *out = p;
    if (o->patient_name)
        ctl_set(&p->name, o->patient_name);
    if (o->health_card)
        ctl_set(&p->health_card_id, o->health_card);
    if (o->birth_date)
        ctl_set(&p->birth_date, o->birth_date);
    if (o->phone)
        ctl_set(&p->phone, o->phone);
    if (o->sex) {
        const char *s = strcasecmp(o->sex, "m") == 0   ? "MALE"
                        : strcasecmp(o->sex, "f") == 0 ? "FEMALE"
                                                       : o->sex;
        int sex;
        /* SEX_UNKNOWN is value 0, which s_enum refuses as "unspecified". */
        if (strcasecmp(s, "unknown") == 0 || strcasecmp(s, "SEX_UNKNOWN") == 0)
            sex = MEDLINK__V1__SEX__SEX_UNKNOWN;
        else if (s_enum(&medlink__v1__sex__descriptor, "SEX_", s, &sex) < 0)
            return ctl_fail(CTL_EXIT_USAGE, "--sex %s: expected male, female, other or unknown",
                            o->sex);
        p->sex = sex;
    }
    return CTL_EXIT_OK;
}

static Medlink__V1__Clinician *s_clinician(const char *name, const char *id)
{
    if (!name && !id)
        return NULL;
    Medlink__V1__Clinician *c = CTL_NEW(Medlink__V1__Clinician, medlink__v1__clinician__init);
    if (name)
        ctl_set(&c->name, name);
    if (id)
        ctl_set(&c->id, id);
    return c;
}

/* --icd10 / --diagnosis CODE[:TEXT]... */
static Medlink__V1__Diagnosis **s_diagnoses(const ctl_opts_t *o, size_t *n)
{
    *n = 0;
    if (o->diagnosis.n == 0)
        return NULL;
    Medlink__V1__Diagnosis **v = s_array(o->diagnosis.n, sizeof *v);
    for (size_t i = 0; i < o->diagnosis.n; i++) {
        Medlink__V1__Diagnosis *d = CTL_NEW(Medlink__V1__Diagnosis, medlink__v1__diagnosis__init);
        v[(*n)++] = d;
        const char *s = o->diagnosis.v[i], *colon = strchr(s, ':');
        if (colon) {
            char code[64];
            snprintf(code, sizeof code, "%.*s", (int)(colon - s), s);
            ctl_set(&d->icd10, code);
            ctl_set(&d->text, colon + 1);
        } else {
            ctl_set(&d->icd10, s);
        }
    }
    return v;
}

/* ---- one builder per payload ---- */

static int s_referral(const ctl_opts_t *o, ml_envelope_t *e)
{
    Medlink__V1__Referral *r = CTL_NEW(Medlink__V1__Referral, medlink__v1__referral__init);
    e->payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL;
    e->referral = r;
    int rc = s_patient(o, &r->patient);
    if (rc != CTL_EXIT_OK)
        return rc;
    if (o->reason)
        ctl_set(&r->reason, o->reason);
    if (o->team)
        ctl_set(&r->family_doctor_team, o->team);
    if (o->notes)
        ctl_set(&r->notes, o->notes);
    if (o->linked_case)
        ctl_set(&r->linked_case_id, o->linked_case);
    r->referring_doctor = s_clinician(o->doctor, NULL);
    r->diagnosis = s_diagnoses(o, &r->n_diagnosis);
    return CTL_EXIT_OK;
}

static int s_consult(const ctl_opts_t *o, ml_envelope_t *e)
{
    Medlink__V1__ImagingConsult *c =
        CTL_NEW(Medlink__V1__ImagingConsult, medlink__v1__imaging_consult__init);
    e->payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CONSULT;
    e->imaging_consult = c;
    int rc = s_patient(o, &c->patient);
    if (rc != CTL_EXIT_OK)
        return rc;
    c->requesting_doctor = s_clinician(o->doctor, NULL);
    if (o->modality)
        ctl_set(&c->modality, o->modality);
    if (o->body_part)
        ctl_set(&c->body_part, o->body_part);
    if (o->question)
        ctl_set(&c->clinical_question, o->question);
    if (o->accession)
        ctl_set(&c->accession_number, o->accession);
    if (o->notes)
        ctl_set(&c->notes, o->notes);
    c->diagnosis = s_diagnoses(o, &c->n_diagnosis);
    return CTL_EXIT_OK;
}

/* "name;dose;frequency[;route[;duration]]" */
static int s_medication(const char *spec, Medlink__V1__Medication **out)
{
    Medlink__V1__Medication *m = CTL_NEW(Medlink__V1__Medication, medlink__v1__medication__init);
    *out = m;
    char *fields[5] = {0}, *copy = strdup(spec), *save = NULL;
    if (!copy)
        ctl_oom();
    int n = 0;
    /* strsep keeps empty fields ("Aspirin;;daily"), strtok would not. */
    for (char *p = copy, *f; n < 5 && (f = strsep(&p, ";")) != NULL;) {
        fields[n++] = f;
        save = p;
    }
    int rc = CTL_EXIT_OK;
    if (n < 3 || save != NULL || !*fields[0])
        rc = ctl_fail(CTL_EXIT_USAGE,
                      "--medication \"%s\": expected \"name;dose;frequency[;route[;duration]]\"",
                      spec);
    char **dst[5] = {&m->name, &m->dose, &m->frequency, &m->route, &m->duration};
    for (int i = 0; rc == CTL_EXIT_OK && i < n; i++)
        if (*fields[i])
            ctl_set(dst[i], fields[i]);
    free(copy);
    return rc;
}

static int s_down_transfer(const ctl_opts_t *o, ml_envelope_t *e)
{
    Medlink__V1__DownTransfer *d =
        CTL_NEW(Medlink__V1__DownTransfer, medlink__v1__down_transfer__init);
    e->payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_DOWN_TRANSFER;
    e->down_transfer = d;
    int rc = s_patient(o, &d->patient);
    if (rc != CTL_EXIT_OK)
        return rc;
    d->discharging_doctor = s_clinician(o->doctor, NULL);
    if (o->phase) {
        int ph;
        char list[200];
        if (s_enum(&medlink__v1__rehab_phase__descriptor, "", o->phase, &ph) < 0)
            return ctl_fail(
                CTL_EXIT_USAGE, "--phase %s: expected %s", o->phase,
                s_enum_list(&medlink__v1__rehab_phase__descriptor, "", list, sizeof list));
        d->phase = ph;
    }
    if (o->summary)
        ctl_set(&d->discharge_summary, o->summary);
    if (o->rehab_plan)
        ctl_set(&d->rehab_plan, o->rehab_plan);
    if (o->team)
        ctl_set(&d->family_doctor_team, o->team);
    if (o->notes)
        ctl_set(&d->notes, o->notes);
    d->diagnosis = s_diagnoses(o, &d->n_diagnosis);
    d->discharged_at = ml_now_ms();
    if (o->discharged_at &&
        (rc = s_time_flag("discharged-at", o->discharged_at, &d->discharged_at)) != CTL_EXIT_OK)
        return rc;
    if (o->medication.n) {
        d->medication = s_array(o->medication.n, sizeof *d->medication);
        for (size_t i = 0; i < o->medication.n; i++) {
            rc = s_medication(o->medication.v[i], &d->medication[d->n_medication++]);
            if (rc != CTL_EXIT_OK)
                return rc;
        }
    }
    if (o->follow_up_days.n) {
        d->follow_up = s_array(o->follow_up_days.n, sizeof *d->follow_up);
        for (size_t i = 0; i < o->follow_up_days.n; i++) {
            uint64_t days;
            Medlink__V1__FollowUpPlan *f =
                CTL_NEW(Medlink__V1__FollowUpPlan, medlink__v1__follow_up_plan__init);
            d->follow_up[d->n_follow_up++] = f;
            if ((rc = s_uint_flag("follow-up-days", o->follow_up_days.v[i], 3650, &days)) !=
                CTL_EXIT_OK)
                return rc;
            f->number = (uint32_t)(i + 1);
            f->due_at = d->discharged_at + (int64_t)days * S_DAY_MS;
        }
    }
    return CTL_EXIT_OK;
}

/* The status enums of the three case kinds, indexed by CaseKind. */
static const struct {
    const ProtobufCEnumDescriptor *d;
    const char *prefix;
} s_statuses[4] = {
    {NULL, NULL},
    {&medlink__v1__referral_status__descriptor, "REFERRAL_"},
    {&medlink__v1__imaging_status__descriptor, "IMAGING_"},
    {&medlink__v1__down_transfer_status__descriptor, "DOWN_TRANSFER_"},
};

/* --status S [--kind K] -> the case kind and the status value. A full name
 * (DOWN_TRANSFER_ARRIVED) says its kind; a short one (ARRIVED) is looked up
 * in --kind's enum, by default referral's; a short name no referral status
 * has but exactly one other kind has (FOLLOW_UP) is that kind's. */
static int s_update_status(const ctl_opts_t *o, int *kind, int *status)
{
    char list[400];
    int k = 0;
    if (o->kind) {
        if (ctl_parse_case_kind(o->kind, &k) < 0)
            return ctl_fail(CTL_EXIT_USAGE,
                            "--kind %s: expected referral, imaging or down_transfer", o->kind);
        if (s_enum(s_statuses[k].d, s_statuses[k].prefix, o->status, status) < 0)
            return ctl_fail(CTL_EXIT_USAGE, "--status %s is not a status of %s %s case (%s)",
                            o->status, k == 2 ? "an" : "a", ctl_case_kind_name(k),
                            s_enum_list(s_statuses[k].d, s_statuses[k].prefix, list, sizeof list));
        *kind = k;
        return CTL_EXIT_OK;
    }
    int found = 0, fk = 0, fv = 0;
    for (k = 1; k <= 3; k++) {
        int v;
        /* A full name: found without adding the prefix. */
        if (s_enum(s_statuses[k].d, "", o->status, &v) == 0) {
            *kind = k;
            *status = v;
            return CTL_EXIT_OK;
        }
    }
    for (k = 1; k <= 3; k++) {
        int v;
        if (s_enum(s_statuses[k].d, s_statuses[k].prefix, o->status, &v) == 0) {
            if (k == 1) {
                *kind = k;
                *status = v;
                return CTL_EXIT_OK;
            }
            found++;
            fk = k;
            fv = v;
        }
    }
    if (found == 1) {
        *kind = fk;
        *status = fv;
        return CTL_EXIT_OK;
    }
    if (found > 1)
        return ctl_fail(CTL_EXIT_USAGE,
                        "--status %s is ambiguous: add --kind imaging or --kind "
                        "down_transfer",
                        o->status);
    return ctl_fail(CTL_EXIT_USAGE, "--status %s is not a status of any case kind (referral: %s)",
                    o->status,
                    s_enum_list(s_statuses[1].d, s_statuses[1].prefix, list, sizeof list));
}

/* Refuses the update flags that the chosen kind's message has no field
 * for, so that nothing typed is silently dropped. */
static int s_update_flags_fit(const ctl_opts_t *o, int kind)
{
    static const struct {
        size_t offset;
        const char *flag;
        int kinds; /* bit per CaseKind */
    } f[] = {
        {offsetof(ctl_opts_t, redirect_to), "redirect-to", 1 << 1},
        {offsetof(ctl_opts_t, scheduled_at), "scheduled-at", 1 << 1},
        {offsetof(ctl_opts_t, department), "department", 1 << 1},
        {offsetof(ctl_opts_t, outcome), "outcome", 1 << 1},
        {offsetof(ctl_opts_t, follow_up), "follow-up", 1 << 3},
        {offsetof(ctl_opts_t, occurred_at), "occurred-at", 1 << 3},
        {offsetof(ctl_opts_t, objects_received), "objects-received", 1 << 2},
        {offsetof(ctl_opts_t, bytes_received), "bytes-received", 1 << 2},
    };
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) {
        const char *v = *(const char *const *)((const char *)o + f[i].offset);
        if (v && !(f[i].kinds & (1 << kind)))
            return ctl_fail(CTL_EXIT_USAGE, "--%s does not apply to a %s update", f[i].flag,
                            ctl_case_kind_name(kind));
    }
    return CTL_EXIT_OK;
}

static int s_update(const ctl_opts_t *o, ml_envelope_t *e)
{
    int kind = 0, st = 0, rc;
    if (!o->status)
        return ctl_fail(CTL_EXIT_USAGE, "%s needs --to NODE, --case ID and --status S",
                        o->cmd_name);
    if ((rc = s_update_status(o, &kind, &st)) != CTL_EXIT_OK ||
        (rc = s_update_flags_fit(o, kind)) != CTL_EXIT_OK)
        return rc;
    uint64_t n;
    if (kind == 1) {
        Medlink__V1__ReferralUpdate *u =
            CTL_NEW(Medlink__V1__ReferralUpdate, medlink__v1__referral_update__init);
        e->payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL_UPDATE;
        e->referral_update = u;
        u->status = st;
        if (o->reason)
            ctl_set(&u->reason, o->reason);
        if (o->redirect_to)
            ctl_set(&u->redirect_to, o->redirect_to);
        if (o->department)
            ctl_set(&u->department, o->department);
        if (o->outcome)
            ctl_set(&u->outcome_summary, o->outcome);
        if (o->notes)
            ctl_set(&u->notes, o->notes);
        u->by = s_clinician(o->by_name, o->by_id);
        if (o->scheduled_at)
            return s_time_flag("scheduled-at", o->scheduled_at, &u->scheduled_at);
    } else if (kind == 2) {
        Medlink__V1__ImagingUpdate *u =
            CTL_NEW(Medlink__V1__ImagingUpdate, medlink__v1__imaging_update__init);
        e->payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_UPDATE;
        e->imaging_update = u;
        u->status = st;
        if (o->reason)
            ctl_set(&u->reason, o->reason);
        if (o->notes)
            ctl_set(&u->notes, o->notes);
        u->by = s_clinician(o->by_name, o->by_id);
        if (o->objects_received) {
            if ((rc = s_uint_flag("objects-received", o->objects_received, UINT32_MAX, &n)) !=
                CTL_EXIT_OK)
                return rc;
            u->objects_received = (uint32_t)n;
        }
        if (o->bytes_received) {
            if ((rc = s_uint_flag("bytes-received", o->bytes_received, UINT64_MAX, &n)) !=
                CTL_EXIT_OK)
                return rc;
            u->bytes_received = n;
        }
    } else {
        Medlink__V1__DownTransferUpdate *u =
            CTL_NEW(Medlink__V1__DownTransferUpdate, medlink__v1__down_transfer_update__init);
        e->payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_DOWN_TRANSFER_UPDATE;
        e->down_transfer_update = u;
        u->status = st;
        if (o->reason)
            ctl_set(&u->reason, o->reason);
        if (o->notes)
            ctl_set(&u->notes, o->notes);
        u->by = s_clinician(o->by_name, o->by_id);
        if (o->follow_up) {
            if ((rc = s_uint_flag("follow-up", o->follow_up, UINT32_MAX, &n)) != CTL_EXIT_OK)
                return rc;
            u->follow_up_number = (uint32_t)n;
        }
        if (o->occurred_at)
            return s_time_flag("occurred-at", o->occurred_at, &u->occurred_at);
    }
    return CTL_EXIT_OK;
}

static int s_report(const ctl_opts_t *o, ml_envelope_t *e)
{
    if (!o->impression || !o->reader_name || !o->study_uid)
        return ctl_fail(CTL_EXIT_USAGE, "send report needs --impression TEXT, --reader-name N and "
                                        "--study-uid UID (the consult's studyInstanceUid)");
    Medlink__V1__ImagingReport *r =
        CTL_NEW(Medlink__V1__ImagingReport, medlink__v1__imaging_report__init);
    e->payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_REPORT;
    e->imaging_report = r;
    ctl_set(&r->impression, o->impression);
    if (o->findings)
        ctl_set(&r->findings, o->findings);
    if (o->recommendation)
        ctl_set(&r->recommendation, o->recommendation);
    if (o->study_uid)
        ctl_set(&r->study_instance_uid, o->study_uid);
    r->reader = s_clinician(o->reader_name, o->reader_id);
    r->signed_at = ml_now_ms();
    if (o->critical) {
        /* The broker sends a critical report as EMERGENCY anyway; say so on
         * the envelope too, and refuse a contradicting --priority. */
        int p;
        if (o->priority && ml_priority_parse(o->priority, &p) == 0 &&
            p != MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY)
            return ctl_fail(CTL_EXIT_USAGE, "--critical is sent as EMERGENCY, not %s", o->priority);
        r->critical_finding = 1;
        e->priority = MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY;
    }
    return CTL_EXIT_OK;
}

/* ---- from a file ---- */

/* The payloads a send command takes from --file, as bare objects, and
 * which payload cases it accepts inside an Envelope. */
typedef struct {
    int cases[3];
    int n;
} s_accept_t;

static s_accept_t s_accepts(ctl_cmd_t cmd)
{
    switch (cmd) {
    case CTL_CMD_SEND:
    case CTL_CMD_SEND_REFERRAL:
        return (s_accept_t){{MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL}, 1};
    case CTL_CMD_SEND_IMAGING:
        return (s_accept_t){{MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CONSULT}, 1};
    case CTL_CMD_SEND_DOWN_TRANSFER:
        return (s_accept_t){{MEDLINK__V1__ENVELOPE__PAYLOAD_DOWN_TRANSFER}, 1};
    case CTL_CMD_SEND_UPDATE:
        return (s_accept_t){{MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL_UPDATE,
                             MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_UPDATE,
                             MEDLINK__V1__ENVELOPE__PAYLOAD_DOWN_TRANSFER_UPDATE},
                            3};
    case CTL_CMD_SEND_REPORT:
        return (s_accept_t){{MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_REPORT}, 1};
    default:
        return (s_accept_t){{0}, 0};
    }
}

/* The Envelope field of a payload case (its number is the field's). */
static const ProtobufCFieldDescriptor *s_payload_field(int payload_case)
{
    return protobuf_c_message_descriptor_get_field(&medlink__v1__envelope__descriptor,
                                                   (unsigned)payload_case);
}

static const char *s_payload_name(int payload_case)
{
    const ProtobufCFieldDescriptor *f = s_payload_field(payload_case);
    return f ? f->name : "no payload";
}

static int s_from_file(const ctl_opts_t *o, ml_envelope_t **out)
{
    char *text = NULL;
    size_t len = 0;
    char err[512], why[1600];
    ProtobufCMessage *m = NULL;
    s_accept_t acc = s_accepts(o->cmd);
    int rc = ml_read_file(o->file, S_MAX_FILE, &text, &len);
    if (rc < 0)
        return ctl_fail(CTL_EXIT_FAIL, "cannot read %s: %s", o->file, ml_strerror(rc));
    if (ml_json_decode(&medlink__v1__envelope__descriptor, text, len, &m, err, sizeof err) == 0) {
        ml_envelope_t *e = (ml_envelope_t *)m;
        free(text);
        int ok = o->cmd == CTL_CMD_SEND &&
                 e->payload_case != MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CONSULT;
        for (int i = 0; i < acc.n; i++)
            ok |= (int)e->payload_case == acc.cases[i];
        if (!ok) {
            const char *hint =
                e->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CONSULT
                    ? " (an imaging consult goes with its DICOM files: use send imaging)"
                    : "";
            rc = ctl_fail(CTL_EXIT_USAGE, "%s holds %s, which %s does not send%s", o->file,
                          s_payload_name((int)e->payload_case), o->cmd_name, hint);
            ml_env_free(&e);
            return rc;
        }
        *out = e;
        return CTL_EXIT_OK;
    }
    int used = snprintf(why, sizeof why, "not an Envelope (%s)", err);
    for (int i = 0; i < acc.n; i++) {
        const ProtobufCFieldDescriptor *f = s_payload_field(acc.cases[i]);
        const ProtobufCMessageDescriptor *d = f->descriptor;
        if (ml_json_decode(d, text, len, &m, err, sizeof err) == 0) {
            ml_envelope_t *e = CTL_NEW(ml_envelope_t, medlink__v1__envelope__init);
            e->payload_case = (Medlink__V1__Envelope__PayloadCase)acc.cases[i];
            /* The oneof's members share one slot: the field's offset. */
            *(ProtobufCMessage **)((char *)e + f->offset) = m;
            free(text);
            *out = e;
            return CTL_EXIT_OK;
        }
        if (used >= 0 && (size_t)used < sizeof why)
            used +=
                snprintf(why + used, sizeof why - (size_t)used, ", nor a %s (%s)", f->name, err);
    }
    free(text);
    return ctl_fail(CTL_EXIT_FAIL, "%s is %s", o->file, why);
}

int ctl_build_message(const ctl_opts_t *o, ml_envelope_t **out)
{
    if (o->file)
        return s_from_file(o, out);
    ml_envelope_t *e = CTL_NEW(ml_envelope_t, medlink__v1__envelope__init);
    int rc;
    if (!o->to) {
        rc = ctl_fail(CTL_EXIT_USAGE, "%s needs --to %s", o->cmd_name,
                      o->cmd == CTL_CMD_SEND_IMAGING ? "SERVICE" : "NODE");
        goto out;
    }
    switch (o->cmd) {
    case CTL_CMD_SEND:
    case CTL_CMD_SEND_REFERRAL:
        rc = s_referral(o, e);
        break;
    case CTL_CMD_SEND_IMAGING:
        rc = s_consult(o, e);
        break;
    case CTL_CMD_SEND_DOWN_TRANSFER:
        rc = s_down_transfer(o, e);
        break;
    case CTL_CMD_SEND_UPDATE:
        rc = s_update(o, e);
        break;
    case CTL_CMD_SEND_REPORT:
        rc = s_report(o, e);
        break;
    default:
        rc = ctl_fail(CTL_EXIT_USAGE, "%s sends nothing", o->cmd_name);
    }
out:
    if (rc != CTL_EXIT_OK)
        ml_env_free(&e);
    *out = e;
    return rc;
}

/* The messages that open a case; every other one belongs to an open case. */
static int s_opens_case(int payload_case)
{
    return payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL ||
           payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CONSULT ||
           payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_DOWN_TRANSFER;
}

int ctl_build_finish(const ctl_opts_t *o, ml_envelope_t *e)
{
    char err[512];
    int rc;
    if (o->to)
        ctl_set(&e->to, o->to);
    if (o->case_id)
        ctl_set(&e->case_id, o->case_id);
    if (o->priority) {
        int p;
        if (ml_priority_parse(o->priority, &p) < 0)
            return ctl_fail(CTL_EXIT_USAGE, "--priority %s: expected ROUTINE, URGENT or EMERGENCY",
                            o->priority);
        e->priority = p;
    }
    if (o->deadline && (rc = s_time_flag("deadline", o->deadline, &e->deadline)) != CTL_EXIT_OK)
        return rc;
    if (!*e->id) {
        char id[ML_ULID_LEN + 1];
        ml_ulid_new(id);
        ctl_set(&e->id, id);
    }
    if (!*e->from)
        ctl_set(&e->from, o->node);
    else if (strcmp(e->from, o->node) != 0)
        return ctl_fail(CTL_EXIT_FAIL, "from %s is not this node %s", e->from, o->node);
    if (e->created_at == 0)
        e->created_at = ml_now_ms();
    if (!*e->case_id) {
        if (!s_opens_case((int)e->payload_case))
            return ctl_fail(CTL_EXIT_USAGE,
                            "a %s belongs to an open case: give --case ID (or caseId in the file)",
                            s_payload_name((int)e->payload_case));
        ctl_set(&e->case_id, e->id);
    }
    if (ml_env_validate(e, err, sizeof err) < 0)
        return ctl_fail(CTL_EXIT_USAGE, "invalid message: %s", err);
    if (!ml_env_kind_is_routed((int)e->kind))
        return ctl_fail(CTL_EXIT_USAGE, "invalid message: kind %s cannot be sent",
                        ml_kind_name((int)e->kind));
    return CTL_EXIT_OK;
}

int ctl_build_admin(const ctl_opts_t *o, Medlink__V1__AdminRequest *req)
{
    medlink__v1__admin_request__init(req);
    switch (o->cmd) {
    case CTL_CMD_STATUS:
    case CTL_CMD_NODES: /* the registry is part of the status */
    case CTL_CMD_TOP:
        req->op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_STATUS;
        break;
    case CTL_CMD_CASE_SHOW:
        req->op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_CASE_SHOW;
        req->case_id = (char *)o->arg;
        break;
    case CTL_CMD_CASES:
        req->op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_CASES;
        if (o->state)
            req->state = (char *)o->state;
        req->overdue = o->overdue;
        if (o->kind) {
            int k;
            if (ctl_parse_case_kind(o->kind, &k) < 0)
                return ctl_fail(CTL_EXIT_USAGE,
                                "--kind %s: expected referral, imaging or down_transfer", o->kind);
            req->case_kind = (char *)ctl_case_kind_name(k);
        }
        break;
    case CTL_CMD_DLQ_LIST:
        req->op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_DLQ_LIST;
        break;
    case CTL_CMD_DLQ_SHOW:
        req->op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_DLQ_SHOW;
        req->message_id = (char *)o->arg;
        break;
    case CTL_CMD_DLQ_REPLAY:
    case CTL_CMD_DLQ_PURGE:
        req->op = o->cmd == CTL_CMD_DLQ_REPLAY ? MEDLINK__V1__ADMIN_REQUEST__OP__OP_DLQ_REPLAY
                                               : MEDLINK__V1__ADMIN_REQUEST__OP__OP_DLQ_PURGE;
        if (o->arg)
            req->message_id = (char *)o->arg;
        req->all = o->all;
        break;
    case CTL_CMD_STORE_STATS:
        req->op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_STORE_STATS;
        break;
    case CTL_CMD_STORE_PRUNE:
        req->op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_STORE_PRUNE;
        break;
    default:
        return ctl_fail(CTL_EXIT_USAGE, "%s is not an admin request", o->cmd_name);
    }
    if (o->limit) {
        uint64_t n;
        int rc = s_uint_flag("limit", o->limit, 1000000, &n);
        if (rc != CTL_EXIT_OK)
            return rc;
        if (n == 0)
            return ctl_fail(CTL_EXIT_USAGE, "--limit must be at least 1");
        req->limit = (uint32_t)n;
    }
    return CTL_EXIT_OK;
}
