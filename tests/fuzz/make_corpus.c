/* Writes the seed corpus of every fuzz target into tests/fuzz/corpus/:
 * small valid and near-valid inputs, each a start the fuzzer would take
 * long to find by itself (a whole referral loop, a study in chunks, every
 * admin request). Deterministic: message ids come from a counter
 * (ml_fuzz_ulid), times are fixed, so running it again rewrites the same
 * bytes and git shows no change unless the generator changed.
 *
 *   fuzz_make_corpus OUT_DIR SOURCE_DIR
 *
 * OUT_DIR is tests/fuzz/corpus; SOURCE_DIR the repository (its
 * deploy/examples/NAME.json and deploy/config/NAME.ini become seeds as they
 * are).
 * Existing files of the same name are overwritten; nothing is deleted.
 *
 * Input formats (each target's file says more):
 *   frame       1 byte limit selector, 8 bytes split seed, the stream
 *   envelope    one packed Envelope
 *   json        a spool file
 *   config      an INI file
 *   dicom       the first bytes of a file
 *   reassembly  study header, then one byte per step (fuzz_reassembly.c)
 *   session     segments: node byte, 16-bit length, stream bytes; node 7
 *               is an action (fuzz_session.c) */
#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz_common.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_frame.h"
#include "ml_imaging.h"
#include "ml_json.h"

#define K_(x) MEDLINK__V1__KIND__KIND_##x
#define P_(x) MEDLINK__V1__ENVELOPE__PAYLOAD_##x
#define RS_(x) MEDLINK__V1__REFERRAL_STATUS__REFERRAL_##x
#define IS_(x) MEDLINK__V1__IMAGING_STATUS__IMAGING_##x
#define DS_(x) MEDLINK__V1__DOWN_TRANSFER_STATUS__DOWN_TRANSFER_##x
#define OP_(x) MEDLINK__V1__ADMIN_REQUEST__OP__OP_##x
#define PR_(x) MEDLINK__V1__PRIORITY__PRIORITY_##x

#define BROKER "medlinkd.fuzz"
#define T0 1795354608123LL

/* The nodes of fuzz_session.c, in its order. */
enum { CLINIC, COUNTY, CITY, READING, OPS, VILLAGE, READING2, ACTION };
static const char *const s_node[] = {
    "township.xinzhan.clinic",      "county.zhaozhou.hospital", "city.shijiazhuang.hospital",
    "reading.shijiazhuang.imaging", "ops.zhaozhou.admin",       "village.beiwang.clinic",
    "reading.zhaozhou.imaging",
};
/* fuzz_session.c's actions (node byte 7 | action << 3). */
enum { A_TIMER = 0, A_LOOP = 1, A_DRAIN = 2, A_CLOSE = 3, A_UNKNOWN = 4, A_RELOAD = 5 };

static const char *s_out;
static size_t s_files;

/* ---- buffers ----------------------------------------------------------- */

typedef struct {
    uint8_t *b;
    size_t n, cap;
} buf_t;

static void b_put(buf_t *b, const void *p, size_t n)
{
    if (b->n + n > b->cap) {
        size_t cap = (b->n + n) * 2 + 64;
        uint8_t *nb = realloc(b->b, cap);
        if (!nb)
            abort();
        b->b = nb;
        b->cap = cap;
    }
    if (n)
        memcpy(b->b + b->n, p, n);
    b->n += n;
}

static void b_u8(buf_t *b, unsigned v)
{
    uint8_t x = (uint8_t)v;
    b_put(b, &x, 1);
}

static void b_u16(buf_t *b, unsigned v)
{
    b_u8(b, v >> 8);
    b_u8(b, v);
}

static void b_cat(buf_t *b, buf_t src)
{
    b_put(b, src.b, src.n);
    free(src.b);
}

static void b_str(buf_t *b, const char *s)
{
    b_put(b, s, strlen(s));
}

/* ---- output ------------------------------------------------------------ */

static void s_write(const char *target, const char *name, const void *data, size_t len)
{
    char dir[1024], path[1200];
    snprintf(dir, sizeof dir, "%s/%s", s_out, target);
    if (ml_mkdirs(dir) != 0) {
        fprintf(stderr, "make_corpus: cannot create %s\n", dir);
        exit(1);
    }
    snprintf(path, sizeof path, "%s/%s", dir, name);
    ml_fuzz_write_file(path, data, len);
    s_files++;
}

static void s_write_buf(const char *target, const char *name, buf_t b)
{
    s_write(target, name, b.b, b.n);
    free(b.b);
}

/* ---- ids and envelopes ------------------------------------------------- */

static char s_ids[512][27];
static size_t s_nids;

/* A fresh message id (lives until the program ends). */
static char *s_id(void)
{
    if (s_nids == 512)
        abort();
    ml_fuzz_ulid(1000 + s_nids, s_ids[s_nids]);
    return s_ids[s_nids++];
}

static ml_envelope_t s_env(const char *id, const char *case_id, int from, const char *to, int prio)
{
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = (char *)id;
    e.case_id = (char *)(case_id ? case_id : id);
    e.from = (char *)s_node[from];
    e.to = (char *)to;
    e.priority = (Medlink__V1__Priority)prio;
    e.created_at = T0;
    return e;
}

static buf_t s_pack(ml_envelope_t *e)
{
    buf_t b = {0};
    uint8_t *p = NULL;
    size_t n = 0;
    if (e->kind == K_(UNSPECIFIED))
        e->kind = (Medlink__V1__Kind)ml_env_kind_of_payload((int)e->payload_case);
    if (ml_env_pack(e, &p, &n) != 0)
        abort();
    b_put(&b, p, n);
    free(p);
    return b;
}

/* A record: the 4-byte length, then the packed envelope. */
static buf_t s_rec(buf_t body)
{
    buf_t b = {0};
    uint8_t h[ML_FRAME_HEADER];
    ml_frame_write_header(h, body.n);
    b_put(&b, h, sizeof h);
    b_cat(&b, body);
    return b;
}

static Medlink__V1__Patient s_patient = MEDLINK__V1__PATIENT__INIT;
static Medlink__V1__Clinician s_doctor = MEDLINK__V1__CLINICIAN__INIT;
static Medlink__V1__Diagnosis s_dx = MEDLINK__V1__DIAGNOSIS__INIT;
static Medlink__V1__Diagnosis *s_dxs[] = {&s_dx};

static void s_static_init(void)
{
    s_patient.health_card_id = "130102195903127718";
    s_patient.name = "Wang Jianguo";
    s_patient.sex = MEDLINK__V1__SEX__SEX_MALE;
    s_patient.birth_date = "1959-03-12";
    s_doctor.name = "Dr. Liu Fang";
    s_doctor.id = "XZ-017";
    s_dx.icd10 = "I20.0";
    s_dx.text = "Unstable angina";
}

static buf_t m_hello(int node, int deliveries)
{
    Medlink__V1__Hello h = MEDLINK__V1__HELLO__INIT;
    h.node_id = (char *)s_node[node];
    h.software = "medlink-agent 0.1.0";
    h.protocol_version = 1;
    h.deliveries = deliveries;
    ml_envelope_t e = s_env(s_id(), NULL, node, BROKER, 0);
    e.payload_case = P_(HELLO);
    e.hello = &h;
    return s_pack(&e);
}

static buf_t m_referral(const char *id, int from, const char *to, int prio, const char *linked)
{
    Medlink__V1__Referral r = MEDLINK__V1__REFERRAL__INIT;
    r.patient = &s_patient;
    r.referring_doctor = &s_doctor;
    r.reason = "Exertional chest pain for 3 days";
    r.n_diagnosis = 1;
    r.diagnosis = s_dxs;
    r.priority_reception = 1;
    if (linked)
        r.linked_case_id = (char *)linked;
    ml_envelope_t e = s_env(id, NULL, from, to, prio);
    e.payload_case = P_(REFERRAL);
    e.referral = &r;
    return s_pack(&e);
}

/* A referral from the clinic with one thing wrong (variant 0-6). */
static buf_t m_bad_referral(int variant, const char *case_in_use)
{
    Medlink__V1__Patient nameless = MEDLINK__V1__PATIENT__INIT;
    nameless.health_card_id = "130102195903127718";
    Medlink__V1__Referral r = MEDLINK__V1__REFERRAL__INIT;
    r.patient = variant == 1 ? &nameless : &s_patient;
    r.reason = "Exertional chest pain for 3 days";
    ml_envelope_t e = s_env(s_id(), NULL, CLINIC, s_node[COUNTY], PR_(URGENT));
    e.payload_case = P_(REFERRAL);
    e.referral = &r;
    e.kind = K_(REFERRAL);
    switch (variant) {
    case 0: /* from names another node */
        e.from = (char *)s_node[COUNTY];
        break;
    case 2: /* an unknown recipient */
        e.to = "county.nowhere.hospital";
        break;
    case 3: /* a route the ACL refuses */
        e.to = (char *)s_node[READING];
        break;
    case 4: /* a service, for a referral */
        e.to = "imaging.ct";
        break;
    case 5: /* kind does not match the payload */
        e.kind = K_(DOWN_TRANSFER);
        break;
    case 6: /* a case id already in use */
        e.case_id = (char *)case_in_use;
        break;
    default:
        break;
    }
    return s_pack(&e);
}

static buf_t m_rupdate(const char *case_id, int from, const char *to, int status, const char *extra)
{
    Medlink__V1__ReferralUpdate u = MEDLINK__V1__REFERRAL_UPDATE__INIT;
    u.status = (Medlink__V1__ReferralStatus)status;
    if (status == RS_(REDIRECTED))
        u.redirect_to = (char *)extra;
    else if (extra)
        u.reason = (char *)extra;
    if (status == RS_(SCHEDULED)) {
        u.scheduled_at = T0 + 86400000;
        u.department = "Cardiology";
    }
    if (status == RS_(DISCHARGED))
        u.outcome_summary = "PCI, discharged on dual antiplatelet therapy";
    u.by = &s_doctor;
    ml_envelope_t e = s_env(s_id(), case_id, from, to, PR_(URGENT));
    e.payload_case = P_(REFERRAL_UPDATE);
    e.referral_update = &u;
    return s_pack(&e);
}

/* A study: object i of size[i] bytes, byte j = (j * 31 + i * 7). */
#define MAXOBJ 3
typedef struct {
    size_t n;
    uint32_t chunk;
    uint64_t size[MAXOBJ];
    char sha[MAXOBJ][ML_SHA256_HEX + 1];
    uint8_t *data[MAXOBJ];
} study_t;

static void s_study(study_t *s, uint32_t chunk, const uint64_t *sizes, size_t n)
{
    memset(s, 0, sizeof *s);
    s->n = n;
    s->chunk = chunk;
    for (size_t i = 0; i < n; i++) {
        s->size[i] = sizes[i];
        s->data[i] = malloc(sizes[i] ? sizes[i] : 1);
        if (!s->data[i])
            abort();
        for (uint64_t j = 0; j < sizes[i]; j++)
            s->data[i][j] = (uint8_t)(j * 31 + i * 7);
        ml_sha256_hex(s->data[i], sizes[i], s->sha[i]);
    }
}

static void s_study_free(study_t *s)
{
    for (size_t i = 0; i < s->n; i++)
        free(s->data[i]);
}

static buf_t m_consult(const char *id, int from, const char *to, int prio, const study_t *s)
{
    Medlink__V1__DicomObject objs[MAXOBJ], *op[MAXOBJ];
    char names[MAXOBJ][32], sops[MAXOBJ][64];
    uint64_t total = 0;
    for (size_t i = 0; i < s->n; i++) {
        medlink__v1__dicom_object__init(&objs[i]);
        snprintf(names[i], sizeof names[i], "IM%04zu.dcm", i + 1);
        snprintf(sops[i], sizeof sops[i], "1.2.826.0.1.3680043.8.498.1%03zu", i + 1);
        objs[i].sop_instance_uid = sops[i];
        objs[i].series_instance_uid = "1.2.826.0.1.3680043.8.498.2002";
        objs[i].file_name = names[i];
        objs[i].size = s->size[i];
        objs[i].sha256 = (char *)s->sha[i];
        objs[i].chunks = ml_imaging_chunk_count(s->size[i], s->chunk);
        op[i] = &objs[i];
        total += s->size[i];
    }
    Medlink__V1__ImagingConsult c = MEDLINK__V1__IMAGING_CONSULT__INIT;
    c.patient = &s_patient;
    c.requesting_doctor = &s_doctor;
    c.study_instance_uid = "1.2.826.0.1.3680043.8.498.3003";
    c.modality = "CT";
    c.body_part = "CHEST";
    c.clinical_question = "Cough for 6 weeks, weight loss: mass in the right upper lobe?";
    c.n_object = s->n;
    c.object = op;
    c.chunk_size = s->chunk;
    c.total_bytes = total;
    c.n_diagnosis = 1;
    c.diagnosis = s_dxs;
    ml_envelope_t e = s_env(id, NULL, from, to, prio);
    e.payload_case = P_(IMAGING_CONSULT);
    e.imaging_consult = &c;
    return s_pack(&e);
}

static buf_t m_chunk(const char *case_id, int from, const char *to, int prio, const study_t *s,
                     uint32_t obj, uint32_t idx)
{
    uint64_t off = (uint64_t)idx * s->chunk;
    size_t len = s->size[obj] - off < s->chunk ? (size_t)(s->size[obj] - off) : s->chunk;
    char sha[ML_SHA256_HEX + 1];
    ml_sha256_hex(s->data[obj] + off, len, sha);
    Medlink__V1__ImagingChunk ch = MEDLINK__V1__IMAGING_CHUNK__INIT;
    ch.study_instance_uid = "1.2.826.0.1.3680043.8.498.3003";
    ch.object_index = obj;
    ch.chunk_index = idx;
    ch.offset = off;
    ch.data.data = s->data[obj] + off;
    ch.data.len = len;
    ch.sha256 = sha;
    ml_envelope_t e = s_env(s_id(), case_id, from, to, prio);
    e.payload_case = P_(IMAGING_CHUNK);
    e.imaging_chunk = &ch;
    return s_pack(&e);
}

static buf_t m_iupdate(const char *case_id, int from, const char *to, int status,
                       const char *reason)
{
    Medlink__V1__ImagingUpdate u = MEDLINK__V1__IMAGING_UPDATE__INIT;
    u.status = (Medlink__V1__ImagingStatus)status;
    if (reason)
        u.reason = (char *)reason;
    if (status == IS_(STUDY_RECEIVED)) {
        u.objects_received = 2;
        u.bytes_received = 5100;
    }
    if (status == IS_(ASSIGNED))
        u.assigned_to = (char *)s_node[READING];
    ml_envelope_t e = s_env(s_id(), case_id, from, to, PR_(URGENT));
    e.payload_case = P_(IMAGING_UPDATE);
    e.imaging_update = &u;
    return s_pack(&e);
}

static buf_t m_report(const char *case_id, int from, const char *to, int critical)
{
    Medlink__V1__Clinician reader = MEDLINK__V1__CLINICIAN__INIT;
    reader.name = "Dr. Zhao Min";
    Medlink__V1__ImagingReport r = MEDLINK__V1__IMAGING_REPORT__INIT;
    r.study_instance_uid = "1.2.826.0.1.3680043.8.498.3003";
    r.findings = "3.2 cm spiculated mass in the right upper lobe.";
    r.impression = "Suspicious for primary lung malignancy.";
    r.reader = &reader;
    r.signed_at = T0 + 3600000;
    r.critical_finding = critical;
    r.recommendation = "CT-guided biopsy.";
    ml_envelope_t e = s_env(s_id(), case_id, from, to, PR_(URGENT));
    e.payload_case = P_(IMAGING_REPORT);
    e.imaging_report = &r;
    return s_pack(&e);
}

static buf_t m_resend(const char *case_id, int from, const char *to, uint32_t obj)
{
    uint32_t idx[] = {0, 1};
    Medlink__V1__ImagingResend r = MEDLINK__V1__IMAGING_RESEND__INIT;
    r.object_index = obj;
    r.n_chunk_index = 2;
    r.chunk_index = idx;
    r.reason = "chunk SHA-256 check failed on arrival";
    ml_envelope_t e = s_env(s_id(), case_id, from, to, PR_(URGENT));
    e.payload_case = P_(IMAGING_RESEND);
    e.imaging_resend = &r;
    return s_pack(&e);
}

static buf_t m_down(const char *id, int from, const char *to)
{
    Medlink__V1__Medication med = MEDLINK__V1__MEDICATION__INIT;
    med.name = "Aspirin";
    med.dose = "100 mg";
    med.frequency = "once daily";
    Medlink__V1__Medication *meds[] = {&med};
    Medlink__V1__FollowUpPlan fu = MEDLINK__V1__FOLLOW_UP_PLAN__INIT;
    fu.number = 1;
    fu.due_at = T0 + 7 * 86400000LL;
    fu.kind = "home visit";
    Medlink__V1__FollowUpPlan *fus[] = {&fu};
    Medlink__V1__DownTransfer t = MEDLINK__V1__DOWN_TRANSFER__INIT;
    t.patient = &s_patient;
    t.discharging_doctor = &s_doctor;
    t.phase = MEDLINK__V1__REHAB_PHASE__POST_OPERATIVE;
    t.discharge_summary = "PCI to the LAD; uneventful recovery.";
    t.n_diagnosis = 1;
    t.diagnosis = s_dxs;
    t.rehab_plan = "Cardiac rehabilitation, phase II";
    t.n_medication = 1;
    t.medication = meds;
    t.n_follow_up = 1;
    t.follow_up = fus;
    t.family_doctor_team = "Xinzhan team 2";
    t.discharged_at = T0;
    ml_envelope_t e = s_env(id, NULL, from, to, PR_(ROUTINE));
    e.payload_case = P_(DOWN_TRANSFER);
    e.down_transfer = &t;
    return s_pack(&e);
}

static buf_t m_dupdate(const char *case_id, int from, const char *to, int status, uint32_t fu)
{
    Medlink__V1__DownTransferUpdate u = MEDLINK__V1__DOWN_TRANSFER_UPDATE__INIT;
    u.status = (Medlink__V1__DownTransferStatus)status;
    u.follow_up_number = fu;
    if (status == DS_(DECLINED) || status == DS_(CANCELLED))
        u.reason = "no bed in the rehabilitation ward";
    u.occurred_at = T0 + 86400000;
    ml_envelope_t e = s_env(s_id(), case_id, from, to, PR_(ROUTINE));
    e.payload_case = P_(DOWN_TRANSFER_UPDATE);
    e.down_transfer_update = &u;
    return s_pack(&e);
}

static buf_t m_escalation(int from, const char *to, const char *case_id)
{
    Medlink__V1__Escalation x = MEDLINK__V1__ESCALATION__INIT;
    x.reason = MEDLINK__V1__ESCALATION_REASON__ESCALATION_DEADLINE_MISSED;
    x.case_id = (char *)case_id;
    x.case_kind = MEDLINK__V1__CASE_KIND__CASE_REFERRAL;
    x.state = "REFERRAL_SENT";
    x.expected_state = "REFERRAL_ACCEPTED";
    x.deadline_at = T0 + 900000;
    x.target = (char *)s_node[COUNTY];
    x.detail = "not accepted within 15 minutes";
    ml_envelope_t e = s_env(s_id(), case_id, from, to, PR_(EMERGENCY));
    e.payload_case = P_(ESCALATION);
    e.escalation = &x;
    return s_pack(&e);
}

static buf_t m_ack(int from, const char *const *ids, size_t n)
{
    Medlink__V1__Ack a = MEDLINK__V1__ACK__INIT;
    a.n_message_ids = n;
    a.message_ids = (char **)ids;
    ml_envelope_t e = s_env(s_id(), NULL, from, BROKER, 0);
    e.payload_case = P_(ACK);
    e.ack = &a;
    return s_pack(&e);
}

static buf_t m_nack(int from, const char *msg_id, int code)
{
    Medlink__V1__Nack x = MEDLINK__V1__NACK__INIT;
    x.message_id = (char *)msg_id;
    x.code = (Medlink__V1__NackCode)code;
    x.reason = "the hospital system cannot file this referral";
    ml_envelope_t e = s_env(s_id(), NULL, from, BROKER, 0);
    e.payload_case = P_(NACK);
    e.nack = &x;
    return s_pack(&e);
}

static buf_t m_heartbeat(int from)
{
    Medlink__V1__Heartbeat h = MEDLINK__V1__HEARTBEAT__INIT;
    h.sent_at = T0;
    ml_envelope_t e = s_env(s_id(), NULL, from, BROKER, 0);
    e.payload_case = P_(HEARTBEAT);
    e.heartbeat = &h;
    return s_pack(&e);
}

static buf_t m_admin(int op, const char *case_id, const char *msg_id, int all, const char *state,
                     const char *case_kind, int overdue)
{
    Medlink__V1__AdminRequest r = MEDLINK__V1__ADMIN_REQUEST__INIT;
    r.op = (Medlink__V1__AdminRequest__Op)op;
    if (case_id)
        r.case_id = (char *)case_id;
    if (msg_id)
        r.message_id = (char *)msg_id;
    if (state)
        r.state = (char *)state;
    if (case_kind)
        r.case_kind = (char *)case_kind;
    r.all = all;
    r.overdue = overdue;
    r.limit = 50;
    ml_envelope_t e = s_env(s_id(), NULL, OPS, BROKER, 0);
    e.payload_case = P_(ADMIN_REQUEST);
    e.admin_request = &r;
    return s_pack(&e);
}

/* The broker's side, for the envelope and JSON targets. */
static buf_t m_welcome(void)
{
    Medlink__V1__Welcome w = MEDLINK__V1__WELCOME__INIT;
    w.node_id = (char *)s_node[CLINIC];
    w.role = "TOWNSHIP_CLINIC";
    w.community = "zhaozhou";
    w.heartbeat_ms = 2000;
    w.max_record = 4194304;
    w.broker = BROKER;
    ml_envelope_t e = s_env(s_id(), NULL, CLINIC, s_node[CLINIC], 0);
    e.from = BROKER;
    e.payload_case = P_(WELCOME);
    e.welcome = &w;
    return s_pack(&e);
}

static buf_t m_accepted(void)
{
    const char *ids[] = {s_id(), s_id()};
    Medlink__V1__Accepted a = MEDLINK__V1__ACCEPTED__INIT;
    a.n_message_ids = 2;
    a.message_ids = (char **)ids;
    a.n_duplicate_ids = 1;
    a.duplicate_ids = (char **)ids + 1;
    ml_envelope_t e = s_env(s_id(), NULL, CLINIC, s_node[CLINIC], 0);
    e.from = BROKER;
    e.payload_case = P_(ACCEPTED);
    e.accepted = &a;
    return s_pack(&e);
}

static buf_t m_admin_reply(void)
{
    Medlink__V1__TimelineEntry te = MEDLINK__V1__TIMELINE_ENTRY__INIT;
    te.at = T0;
    te.node = (char *)s_node[CLINIC];
    te.event = "REFERRAL_SENT";
    te.to_state = "REFERRAL_SENT";
    te.message_id = s_id();
    te.kind = "REFERRAL";
    Medlink__V1__TimelineEntry *tes[] = {&te};
    Medlink__V1__CaseInfo ci = MEDLINK__V1__CASE_INFO__INIT;
    ci.case_id = te.message_id;
    ci.kind = MEDLINK__V1__CASE_KIND__CASE_REFERRAL;
    ci.state = "REFERRAL_SENT";
    ci.fhir_status = "requested";
    ci.opened_by = (char *)s_node[CLINIC];
    ci.target = (char *)s_node[COUNTY];
    ci.priority = "URGENT";
    ci.opened_at = T0;
    ci.deadline_at = T0 + 7200000;
    ci.n_timeline = 1;
    ci.timeline = tes;
    Medlink__V1__CaseInfo *cis[] = {&ci};
    Medlink__V1__NodeStatus ns = MEDLINK__V1__NODE_STATUS__INIT;
    ns.node_id = (char *)s_node[COUNTY];
    ns.role = "COUNTY_HOSPITAL";
    ns.online = 1;
    ns.queue_depth = 3;
    Medlink__V1__NodeStatus *nss[] = {&ns};
    Medlink__V1__BrokerStatus bs = MEDLINK__V1__BROKER_STATUS__INIT;
    bs.broker = BROKER;
    bs.started_at = T0;
    bs.now = T0 + 1000;
    bs.n_node = 1;
    bs.node = nss;
    bs.open_cases = 1;
    Medlink__V1__AdminReply r = MEDLINK__V1__ADMIN_REPLY__INIT;
    r.broker_status = &bs;
    r.case_info = &ci;
    r.n_cases = 1;
    r.cases = cis;
    ml_envelope_t e = s_env(s_id(), NULL, OPS, s_node[OPS], 0);
    e.from = BROKER;
    e.payload_case = P_(ADMIN_REPLY);
    e.admin_reply = &r;
    return s_pack(&e);
}

/* ---- session seeds ----------------------------------------------------- */

/* One segment: node, 16-bit length, the bytes. */
static void seg(buf_t *out, int node, buf_t bytes)
{
    size_t at = 0;
    do {
        size_t n = bytes.n - at > 65535 ? 65535 : bytes.n - at;
        b_u8(out, (unsigned)node);
        b_u16(out, (unsigned)n);
        b_put(out, bytes.b + at, n);
        at += n;
    } while (at < bytes.n);
    free(bytes.b);
}

static void act(buf_t *out, int action)
{
    b_u8(out, ACTION | (unsigned)action << 3);
}

/* Records in one stream. */
static buf_t recs(int n, ...)
{
    buf_t b = {0};
    va_list ap;
    va_start(ap, n);
    for (int i = 0; i < n; i++)
        b_cat(&b, s_rec(va_arg(ap, buf_t)));
    va_end(ap);
    return b;
}

static void s_session_seeds(void)
{
    buf_t s = {0};

    /* A referral's whole loop; the clinic's first stream is cut in two
     * segments in the middle of a record. */
    {
        char *r = s_id();
        buf_t first =
            recs(2, m_hello(CLINIC, 1), m_referral(r, CLINIC, s_node[COUNTY], PR_(URGENT), NULL));
        buf_t a = {0}, b = {0};
        b_put(&a, first.b, 7);
        b_put(&b, first.b + 7, first.n - 7);
        free(first.b);
        seg(&s, CLINIC, a);
        seg(&s, CLINIC, b);
        act(&s, A_DRAIN);
        seg(&s, COUNTY, recs(1, m_hello(COUNTY, 1)));
        act(&s, A_DRAIN);
        const char *ack[] = {r};
        seg(&s, COUNTY, recs(1, m_ack(COUNTY, ack, 1)));
        act(&s, A_DRAIN);
        seg(&s, COUNTY,
            recs(5, m_rupdate(r, COUNTY, s_node[CLINIC], RS_(ACCEPTED), NULL),
                 m_rupdate(r, COUNTY, s_node[CLINIC], RS_(SCHEDULED), NULL),
                 m_rupdate(r, COUNTY, s_node[CLINIC], RS_(ARRIVED), NULL),
                 m_rupdate(r, COUNTY, s_node[CLINIC], RS_(ADMITTED), NULL),
                 m_rupdate(r, COUNTY, s_node[CLINIC], RS_(DISCHARGED), NULL)));
        act(&s, A_DRAIN);
        seg(&s, CLINIC,
            recs(2, m_rupdate(r, CLINIC, s_node[COUNTY], RS_(CLOSED), NULL), m_heartbeat(CLINIC)));
        act(&s, A_TIMER);
        s_write_buf("session", "referral-closed-loop", s);
        memset(&s, 0, sizeof s);
    }
    /* Redirected by the hospital, then cancelled by the clinic; an illegal
     * step and a stranger's update on the way. */
    {
        char *r = s_id();
        seg(&s, VILLAGE,
            recs(2, m_hello(VILLAGE, 1),
                 m_referral(r, VILLAGE, s_node[COUNTY], PR_(ROUTINE), NULL)));
        seg(&s, COUNTY,
            recs(2, m_hello(COUNTY, 1),
                 m_rupdate(r, COUNTY, s_node[VILLAGE], RS_(REDIRECTED), s_node[CITY])));
        act(&s, A_DRAIN);
        seg(&s, CITY,
            recs(3, m_hello(CITY, 1), m_rupdate(r, CITY, s_node[VILLAGE], RS_(ADMITTED), NULL),
                 m_rupdate(r, CITY, s_node[VILLAGE], RS_(ACCEPTED), NULL)));
        seg(&s, CLINIC,
            recs(2, m_hello(CLINIC, 0),
                 m_rupdate(r, CLINIC, s_node[COUNTY], RS_(CANCELLED), "moved away")));
        seg(&s, VILLAGE,
            recs(1, m_rupdate(r, VILLAGE, s_node[CITY], RS_(CANCELLED), "moved away")));
        act(&s, A_DRAIN);
        s_write_buf("session", "referral-redirect-cancel", s);
        memset(&s, 0, sizeof s);
    }
    /* An emergency nobody accepts: the deadline runs out, the broker
     * escalates and redirects to the fallback; ops look at it. */
    {
        char *r = s_id();
        seg(&s, CLINIC,
            recs(2, m_hello(CLINIC, 1),
                 m_referral(r, CLINIC, s_node[COUNTY], PR_(EMERGENCY), NULL)));
        act(&s, A_DRAIN);
        act(&s, A_TIMER);
        act(&s, A_DRAIN);
        seg(&s, OPS,
            recs(6, m_hello(OPS, 1), m_admin(OP_(STATUS), NULL, NULL, 0, NULL, NULL, 0),
                 m_admin(OP_(CASES), NULL, NULL, 0, NULL, NULL, 1),
                 m_admin(OP_(CASE_SHOW), r, NULL, 0, NULL, NULL, 0),
                 m_admin(OP_(CASES), NULL, NULL, 0, "REDIRECTED", "referral", 0),
                 m_admin(OP_(DLQ_LIST), NULL, NULL, 0, NULL, NULL, 0)));
        s_write_buf("session", "emergency-deadline-fallback", s);
        memset(&s, 0, sizeof s);
    }
    /* An imaging study in chunks to a service with two reading centres. */
    {
        char *c = s_id();
        study_t st;
        const uint64_t sizes[] = {5000, 100};
        s_study(&st, 4096, sizes, 2);
        seg(&s, CLINIC,
            recs(5, m_hello(CLINIC, 1), m_consult(c, CLINIC, "imaging.ct", PR_(URGENT), &st),
                 m_chunk(c, CLINIC, "imaging.ct", PR_(URGENT), &st, 0, 0),
                 m_chunk(c, CLINIC, "imaging.ct", PR_(URGENT), &st, 0, 1),
                 m_chunk(c, CLINIC, "imaging.ct", PR_(URGENT), &st, 1, 0)));
        act(&s, A_DRAIN);
        seg(&s, READING, recs(1, m_hello(READING, 1)));
        seg(&s, READING2, recs(1, m_hello(READING2, 1)));
        act(&s, A_DRAIN);
        const char *ack[] = {c};
        seg(&s, READING,
            recs(2, m_ack(READING, ack, 1),
                 m_iupdate(c, READING, s_node[CLINIC], IS_(STUDY_RECEIVED), NULL)));
        seg(&s, READING2,
            recs(2, m_ack(READING2, ack, 1),
                 m_iupdate(c, READING2, s_node[CLINIC], IS_(STUDY_RECEIVED), NULL)));
        seg(&s, READING,
            recs(2, m_resend(c, READING, s_node[CLINIC], 0),
                 m_report(c, READING, s_node[CLINIC], 1)));
        seg(&s, READING2, recs(1, m_report(c, READING2, s_node[CLINIC], 1)));
        act(&s, A_DRAIN);
        seg(&s, CLINIC,
            recs(2, m_iupdate(c, CLINIC, s_node[READING], IS_(CLOSED), NULL),
                 m_iupdate(c, CLINIC, s_node[READING2], IS_(CLOSED), NULL)));
        s_study_free(&st);
        s_write_buf("session", "imaging-study", s);
        memset(&s, 0, sizeof s);
    }
    /* A rehab down-transfer with follow-ups, and one sent back up as a
     * linked referral. */
    {
        char *d = s_id(), *d2 = s_id(), *r = s_id();
        seg(&s, COUNTY,
            recs(3, m_hello(COUNTY, 1), m_down(d, COUNTY, s_node[CLINIC]),
                 m_down(d2, COUNTY, s_node[CLINIC])));
        act(&s, A_DRAIN);
        const char *ack[] = {d, d2};
        seg(&s, CLINIC, recs(2, m_hello(CLINIC, 1), m_ack(CLINIC, ack, 2)));
        act(&s, A_DRAIN);
        seg(&s, CLINIC,
            recs(8, m_dupdate(d, CLINIC, s_node[COUNTY], DS_(ACCEPTED), 0),
                 m_dupdate(d, CLINIC, s_node[COUNTY], DS_(ARRIVED), 0),
                 m_dupdate(d, CLINIC, s_node[COUNTY], DS_(FOLLOW_UP), 1),
                 m_dupdate(d, CLINIC, s_node[COUNTY], DS_(FOLLOW_UP), 3),
                 m_dupdate(d, CLINIC, s_node[COUNTY], DS_(FOLLOW_UP), 2),
                 m_dupdate(d, CLINIC, s_node[COUNTY], DS_(COMPLETED), 0),
                 m_dupdate(d2, CLINIC, s_node[COUNTY], DS_(ACCEPTED), 0),
                 m_dupdate(d2, CLINIC, s_node[COUNTY], DS_(ARRIVED), 0)));
        act(&s, A_TIMER);
        seg(&s, CLINIC, recs(1, m_referral(r, CLINIC, s_node[COUNTY], PR_(URGENT), d2)));
        act(&s, A_DRAIN);
        seg(&s, COUNTY, recs(1, m_dupdate(d2, COUNTY, s_node[CLINIC], DS_(CANCELLED), 0)));
        s_write_buf("session", "down-transfer", s);
        memset(&s, 0, sizeof s);
    }
    /* A recipient that refuses a delivery: a dead letter, which ops list,
     * show, replay and purge; a message past its own deadline. */
    {
        char *r = s_id(), *late = s_id();
        buf_t lr = m_referral(late, CLINIC, s_node[CITY], PR_(ROUTINE), NULL);
        ml_envelope_t *e = NULL;
        if (ml_env_unpack(lr.b, lr.n, &e) != 0)
            abort();
        e->deadline = 1;
        free(lr.b);
        lr = s_pack(e);
        ml_env_free(&e);
        seg(&s, CLINIC,
            recs(3, m_hello(CLINIC, 1), m_referral(r, CLINIC, s_node[COUNTY], PR_(URGENT), NULL),
                 lr));
        act(&s, A_DRAIN);
        seg(&s, COUNTY,
            recs(2, m_hello(COUNTY, 1), m_nack(COUNTY, r, MEDLINK__V1__NACK_CODE__NACK_REFUSED)));
        act(&s, A_DRAIN);
        act(&s, A_TIMER);
        act(&s, A_DRAIN);
        seg(&s, OPS,
            recs(6, m_hello(OPS, 0), m_admin(OP_(DLQ_LIST), NULL, NULL, 0, NULL, NULL, 0),
                 m_admin(OP_(DLQ_SHOW), NULL, r, 0, NULL, NULL, 0),
                 m_admin(OP_(DLQ_REPLAY), NULL, r, 0, NULL, NULL, 0),
                 m_admin(OP_(DLQ_REPLAY), NULL, NULL, 1, NULL, NULL, 0),
                 m_admin(OP_(DLQ_PURGE), NULL, NULL, 1, NULL, NULL, 0)));
        act(&s, A_DRAIN);
        s_write_buf("session", "dead-letters", s);
        memset(&s, 0, sizeof s);
    }
    /* Everything a session refuses. */
    {
        char *r = s_id();
        /* Not Hello first; Hello for another node; then a good session. */
        seg(&s, CLINIC, recs(1, m_referral(r, CLINIC, s_node[COUNTY], 0, NULL)));
        seg(&s, CLINIC, recs(1, m_hello(COUNTY, 1)));
        buf_t bad = {0};
        b_cat(&bad, s_rec(m_hello(CLINIC, 1)));
        /* A record that is not an Envelope, and an empty one. */
        b_put(&bad, "\x00\x00\x00\x03\x0a\xff\xff", 7);
        b_put(&bad, "\x00\x00\x00\x00", 4);
        for (int v = 0; v < 7; v++)
            b_cat(&bad, s_rec(m_bad_referral(v, r)));
        b_cat(&bad, s_rec(m_rupdate(s_id(), CLINIC, s_node[COUNTY], RS_(CANCELLED), "x")));
        b_cat(&bad, s_rec(m_welcome()));
        b_cat(&bad, s_rec(m_hello(CLINIC, 1)));
        b_cat(&bad, s_rec(m_escalation(CLINIC, s_node[OPS], r)));
        b_cat(&bad, s_rec(m_admin(OP_(STATUS), NULL, NULL, 0, NULL, NULL, 0)));
        const char *ack[] = {"not-a-delivery", r};
        b_cat(&bad, s_rec(m_ack(CLINIC, ack, 2)));
        b_cat(&bad, s_rec(m_nack(CLINIC, r, MEDLINK__V1__NACK_CODE__NACK_REFUSED)));
        b_cat(&bad, s_rec(m_heartbeat(CLINIC)));
        /* Finally a header over max_record. */
        b_put(&bad, "\x00\x10\x00\x01", 4);
        seg(&s, CLINIC, bad);
        seg(&s, COUNTY, recs(1, m_rupdate(r, COUNTY, s_node[CLINIC], RS_(ACCEPTED), NULL)));
        seg(&s, CLINIC,
            recs(2, m_hello(CLINIC, 1),
                 m_rupdate(r, CLINIC, s_node[COUNTY], RS_(SCHEDULED), NULL)));
        b_u8(&s, ACTION | A_UNKNOWN << 3);
        buf_t u = recs(1, m_hello(CLINIC, 1));
        b_u16(&s, (unsigned)u.n);
        b_cat(&s, u);
        act(&s, A_CLOSE);
        act(&s, A_LOOP);
        s_write_buf("session", "refusals", s);
        memset(&s, 0, sizeof s);
    }
    /* A reload that removes the village clinic with messages queued for it
     * and a service with a case open on it, then one that brings them back. */
    {
        char *r = s_id(), *c = s_id();
        study_t st;
        const uint64_t sizes[] = {100};
        s_study(&st, 4096, sizes, 1);
        seg(&s, COUNTY, recs(2, m_hello(COUNTY, 1), m_down(r, COUNTY, s_node[VILLAGE])));
        seg(&s, CLINIC,
            recs(3, m_hello(CLINIC, 1), m_consult(c, CLINIC, "imaging.ct", PR_(URGENT), &st),
                 m_chunk(c, CLINIC, "imaging.ct", PR_(URGENT), &st, 0, 0)));
        seg(&s, VILLAGE, recs(1, m_hello(VILLAGE, 1)));
        act(&s, A_DRAIN);
        act(&s, A_RELOAD);
        seg(&s, VILLAGE, recs(1, m_hello(VILLAGE, 1)));
        seg(&s, READING2,
            recs(2, m_hello(READING2, 1),
                 m_iupdate(c, READING2, s_node[CLINIC], IS_(STUDY_RECEIVED), NULL)));
        seg(&s, OPS,
            recs(3, m_hello(OPS, 1), m_admin(OP_(STATUS), NULL, NULL, 0, NULL, NULL, 0),
                 m_admin(OP_(DLQ_LIST), NULL, NULL, 0, NULL, NULL, 0)));
        act(&s, A_RELOAD);
        seg(&s, VILLAGE, recs(1, m_hello(VILLAGE, 1)));
        act(&s, A_DRAIN);
        s_study_free(&st);
        s_write_buf("session", "reload", s);
        memset(&s, 0, sizeof s);
    }
}

/* ---- reassembly seeds -------------------------------------------------- */

/* Header: flags (objects - 1 in the low bits), content seed, sizes. */
static buf_t r_head(unsigned flags, unsigned seed, int n, ...)
{
    buf_t b = {0};
    va_list ap;
    b_u8(&b, flags);
    b_u8(&b, seed);
    va_start(ap, n);
    for (int i = 0; i < n; i++)
        b_u16(&b, (unsigned)va_arg(ap, int));
    va_end(ap);
    return b;
}

static void r_ops(buf_t *b, const char *ops, size_t n)
{
    b_put(b, ops, n);
}

static void s_reassembly_seeds(void)
{
    /* Op codes of fuzz_reassembly.c. */
    enum {
        CONSULT,
        GOOD,
        DAMAGED,
        BADOFF,
        SHORT,
        WILD,
        FOREIGN,
        UPDATE,
        FLUSH,
        RAW,
        ALL,
        AGAIN,
        CONSULT2,
        OTHER,
        RESTART,
        TICK
    };
    buf_t b;
#define OPS(...)                                                                                   \
    do {                                                                                           \
        const char o_[] = {__VA_ARGS__};                                                           \
        r_ops(&b, o_, sizeof o_);                                                                  \
    } while (0)

    b = r_head(2, 1, 3, 5000, 100, 0);
    OPS(CONSULT, ALL, FLUSH);
    s_write_buf("reassembly", "study-in-order", b);

    b = r_head(1, 2, 2, 9000, 4096);
    OPS(ALL, FLUSH, CONSULT, FLUSH);
    s_write_buf("reassembly", "chunks-before-consult", b);

    b = r_head(0, 3, 1, 12288);
    OPS(CONSULT, GOOD, 0, 2, GOOD, 0, 0, GOOD, 0, 1, AGAIN, FLUSH);
    s_write_buf("reassembly", "out-of-order-duplicates", b);

    b = r_head(1, 4, 2, 6000, 300);
    OPS(CONSULT, DAMAGED, 0, 1, 17, BADOFF, 1, 0, 3, SHORT, 0, 0, FLUSH, ALL, FLUSH);
    s_write_buf("reassembly", "damaged-then-good", b);

    b = r_head(0, 5, 1, 4000);
    OPS(CONSULT, FLUSH, DAMAGED, 0, 0, 1, FLUSH, DAMAGED, 0, 0, 2, FLUSH, DAMAGED, 0, 0, 3, FLUSH,
        DAMAGED, 0, 0, 4, FLUSH, DAMAGED, 0, 0, 5, FLUSH, GOOD, 0, 0, FLUSH);
    s_write_buf("reassembly", "damaged-five-times", b);

    b = r_head(0x04 | 1, 6, 2, 5000, 10);
    OPS(CONSULT, ALL, FLUSH, ALL, FLUSH, ALL, FLUSH, ALL, FLUSH);
    s_write_buf("reassembly", "declared-digest-never-matches", b);

    b = r_head(2, 7, 3, 8000, 8000, 8000);
    OPS(CONSULT, GOOD, 0, 0, FLUSH, UPDATE, 6, FLUSH, ALL, FLUSH);
    s_write_buf("reassembly", "cancelled-midway", b);

    b = r_head(1, 8, 2, 7000, 7000);
    OPS(CONSULT, GOOD, 0, 0, GOOD, 1, 1, FLUSH, RESTART, ALL, FLUSH, TICK, RESTART);
    s_write_buf("reassembly", "restart-midway", b);

    b = r_head(0x10 | 2, 9, 3, 100, 200, 300);
    OPS(CONSULT, ALL, FLUSH);
    s_write_buf("reassembly", "odd-file-names", b);

    b = r_head(0x20 | 1, 10, 2, 5000, 5000);
    OPS(CONSULT, ALL, FLUSH);
    s_write_buf("reassembly", "invalid-consult", b);

    b = r_head(0x80, 11, 1, 5000);
    OPS(CONSULT, ALL, FLUSH);
    s_write_buf("reassembly", "long-case-id", b);

    b = r_head(0x08 | 0x40 | 1, 12, 2, 20000, 1);
    OPS(CONSULT, WILD, 0, 0, 0, 1, WILD, 5, 0, 0xff, 0xff, FOREIGN, 0, 0, CONSULT2, OTHER, 1, OTHER,
        2, UPDATE, 0x22, UPDATE, 0x43, ALL, FLUSH);
    s_write_buf("reassembly", "wild-indexes-and-strangers", b);

    /* A raw envelope: another clinic's consult, then its chunk. */
    {
        study_t st;
        const uint64_t sizes[] = {4100};
        s_study(&st, 4096, sizes, 1);
        char *c = s_id();
        b = r_head(0, 13, 1, 100);
        buf_t cons = m_consult(c, VILLAGE, s_node[READING], PR_(ROUTINE), &st);
        b_u8(&b, RAW);
        b_u16(&b, (unsigned)cons.n);
        b_cat(&b, cons);
        for (uint32_t k = 0; k < 2; k++) {
            buf_t ch = m_chunk(c, VILLAGE, s_node[READING], PR_(ROUTINE), &st, 0, k);
            b_u8(&b, RAW);
            b_u16(&b, (unsigned)ch.n);
            b_cat(&b, ch);
        }
        OPS(FLUSH, CONSULT, ALL, FLUSH);
        s_study_free(&st);
        s_write_buf("reassembly", "raw-envelopes", b);
    }
#undef OPS
}

/* ---- envelope and JSON seeds ------------------------------------------- */

static void s_message_seed(const char *name, buf_t m)
{
    s_write("envelope", name, m.b, m.n);
    ml_envelope_t *e = NULL;
    char *json = NULL, err[256];
    if (ml_env_unpack(m.b, m.n, &e) == 0 &&
        ml_json_encode(&e->base, ML_JSON_PRETTY, &json, err, sizeof err) == 0) {
        char jname[128];
        snprintf(jname, sizeof jname, "%s.json", name);
        s_write("json", jname, json, strlen(json));
    }
    free(json);
    ml_env_free(&e);
    free(m.b);
}

static void s_message_seeds(void)
{
    study_t st;
    const uint64_t sizes[] = {5000, 0};
    s_study(&st, 4096, sizes, 2);
    char *c = s_id(), *r = s_id(), *d = s_id();
    s_message_seed("hello", m_hello(CLINIC, 1));
    s_message_seed("welcome", m_welcome());
    s_message_seed("accepted", m_accepted());
    const char *ids[] = {c, r};
    s_message_seed("ack", m_ack(COUNTY, ids, 2));
    s_message_seed("nack", m_nack(COUNTY, r, MEDLINK__V1__NACK_CODE__NACK_REFUSED));
    s_message_seed("heartbeat", m_heartbeat(CLINIC));
    s_message_seed("admin-request", m_admin(OP_(CASES), NULL, NULL, 0, "SENT", "referral", 1));
    s_message_seed("admin-reply", m_admin_reply());
    s_message_seed("referral", m_referral(r, CLINIC, s_node[COUNTY], PR_(URGENT), NULL));
    s_message_seed("referral-linked", m_referral(s_id(), CLINIC, s_node[COUNTY], 0, d));
    static const int rs[] = {RS_(ACCEPTED),   RS_(REJECTED),  RS_(REDIRECTED), RS_(SCHEDULED),
                             RS_(DISCHARGED), RS_(CANCELLED), RS_(CLOSED)};
    for (size_t i = 0; i < sizeof rs / sizeof rs[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "referral-update-%d", rs[i]);
        s_message_seed(name, m_rupdate(r, COUNTY, s_node[CLINIC], rs[i],
                                       rs[i] == RS_(REDIRECTED) ? s_node[CITY] : "no bed"));
    }
    s_message_seed("imaging-consult", m_consult(c, CLINIC, "imaging.ct", PR_(URGENT), &st));
    s_message_seed("imaging-chunk", m_chunk(c, CLINIC, "imaging.ct", PR_(URGENT), &st, 0, 1));
    s_message_seed("imaging-chunk-empty-object",
                   m_chunk(c, CLINIC, "imaging.ct", PR_(URGENT), &st, 1, 0));
    s_message_seed("imaging-resend", m_resend(c, READING, s_node[CLINIC], 0));
    static const int is[] = {IS_(ASSIGNED), IS_(STUDY_RECEIVED), IS_(REJECTED), IS_(CANCELLED),
                             IS_(CLOSED)};
    for (size_t i = 0; i < sizeof is / sizeof is[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "imaging-update-%d", is[i]);
        s_message_seed(name, m_iupdate(c, READING, s_node[CLINIC], is[i], "cannot read"));
    }
    s_message_seed("imaging-report", m_report(c, READING, s_node[CLINIC], 1));
    s_message_seed("down-transfer", m_down(d, COUNTY, s_node[CLINIC]));
    static const int ds[] = {DS_(ACCEPTED),  DS_(DECLINED),  DS_(ARRIVED),
                             DS_(FOLLOW_UP), DS_(COMPLETED), DS_(CANCELLED)};
    for (size_t i = 0; i < sizeof ds / sizeof ds[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "down-transfer-update-%d", ds[i]);
        s_message_seed(name, m_dupdate(d, CLINIC, s_node[COUNTY], ds[i], 1));
    }
    s_message_seed("escalation", m_escalation(CLINIC, s_node[OPS], r));
    /* Near misses: an unknown field, a bad ULID, a bad ICD-10 code. */
    {
        buf_t m = m_referral(s_id(), CLINIC, s_node[COUNTY], 0, NULL);
        b_put(&m, "\xf8\x3f\x01", 3); /* field 1023, varint 1 */
        s_message_seed("referral-unknown-field", m);
        ml_envelope_t *e = NULL;
        m = m_referral(s_id(), CLINIC, s_node[COUNTY], 0, NULL);
        if (ml_env_unpack(m.b, m.n, &e) != 0)
            abort();
        free(m.b);
        free(e->id);
        e->id = strdup("01JDB3W5Q3T0S8R9K7N6M5P4ZU");
        free(e->referral->diagnosis[0]->icd10);
        e->referral->diagnosis[0]->icd10 = strdup("I21.000x002");
        s_message_seed("referral-bad-ulid", s_pack(e));
        ml_env_free(&e);
    }
    s_study_free(&st);
}

/* Hand-written JSON near misses: what a hospital system gets wrong. */
static void s_json_seeds(void)
{
    static const struct {
        const char *name;
        const char *text;
    } j[] = {
        {"spool-minimal",
         "{\"to\": \"county.zhaozhou.hospital\", \"referral\": {\"patient\": {\"healthCardId\": "
         "\"130102195903127718\", \"name\": \"Wang\"}, \"reason\": \"chest pain\"}}"},
        {"proto-names",
         "{\"case_id\": \"C1\", \"to\": \"county.zhaozhou.hospital\", \"priority\": 2, "
         "\"created_at\": 1795354608123, \"referral_update\": {\"status\": "
         "\"REFERRAL_REDIRECTED\", \"redirect_to\": \"city.shijiazhuang.hospital\"}}"},
        {"two-payloads", "{\"referral\": {}, \"downTransfer\": {}}"},
        {"both-names", "{\"caseId\": \"a\", \"case_id\": \"b\"}"},
        {"unknown-field", "{\"referal\": {}}"},
        {"bad-enum", "{\"priority\": \"PRIORITY_CRITICAL\"}"},
        {"numbers",
         "{\"createdAt\": \"-9223372036854775808\", \"deadline\": 1e3, \"imagingChunk\": "
         "{\"objectIndex\": 4294967295, \"offset\": \"18446744073709551615\", \"data\": "
         "\"AAEC-_8=\"}}"},
        {"bad-base64", "{\"imagingChunk\": {\"data\": \"A===\"}}"},
        {"nulls", "{\"id\": null, \"referral\": {\"diagnosis\": [null]}}"},
        {"deep", "{\"referral\": {\"patient\": [[[[[[[[[[[[[[[[[[[[{}]]]]]]]]]]]]]]]]]]]}}"},
        {"unicode", "{\"referral\": {\"reason\": \"\\u80f8\\u75db \\ud83d\\ude00\"}}"},
        {"not-object", "[1, 2, 3]"},
        {"duplicate-key", "{\"id\": \"a\", \"id\": \"b\"}"},
        {"admin-request",
         "{\"adminRequest\": {\"op\": \"OP_DLQ_REPLAY\", \"all\": true, \"limit\": 10}}"},
    };
    for (size_t i = 0; i < sizeof j / sizeof j[0]; i++)
        s_write("json", j[i].name, j[i].text, strlen(j[i].text));
}

/* Copies every file of src_dir/sub ending in ext into target. */
static void s_copy_dir(const char *src, const char *sub, const char *ext, const char *target)
{
    char dir[1024];
    snprintf(dir, sizeof dir, "%s/%s", src, sub);
    DIR *d = opendir(dir);
    if (!d) {
        fprintf(stderr, "make_corpus: cannot read %s: %s\n", dir, strerror(errno));
        exit(1);
    }
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t n = strlen(e->d_name), m = strlen(ext);
        if (n <= m || strcmp(e->d_name + n - m, ext) != 0)
            continue;
        char path[1400];
        char *text = NULL;
        size_t len = 0;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (ml_read_file(path, 1u << 20, &text, &len) != 0) {
            fprintf(stderr, "make_corpus: cannot read %s\n", path);
            exit(1);
        }
        s_write(target, e->d_name, text, len);
        free(text);
    }
    closedir(d);
}

/* ---- config seeds ------------------------------------------------------ */

static void s_config_seeds(void)
{
    static const struct {
        const char *name;
        const char *text;
    } c[] = {
        {"agent-minimal.ini",
         "[agent]\nnode_id = township.xinzhan.clinic\nbroker = tcp://127.0.0.1:7400\n"
         "ca = pki/ca.crt\ncert = pki/c.crt\nkey = pki/c.key\ndata_dir = data\n"
         "spool_dir = /var/spool/medlink\nchunk_size = 4096\nmax_record = 8192\n"},
        {"broker-minimal.ini",
         "[broker]\nlisten = tcp://127.0.0.1:0\ndata_dir = d\nca = a\ncert = b\nkey = c\n"
         "[node a.b]\nrole = OPS\n"},
        {"broker-rich.ini",
         "\xef\xbb\xbf; a BOM, comments and continuation lines\n"
         "[broker]\nid = medlinkd.fuzz\nlisten = tcp://127.0.0.1:0\ndata_dir = data\n"
         "ca = /pki/ca.crt\ncert = pki/b.crt\nkey = pki/b.key\ncrl = pki/crl.pem\n"
         "store_key = keys/now.key\nstore_old_keys = keys/old1.key, /keys/old2.key\n"
         "max_record = 65536\nsession_buffer = 65536\nheartbeat_ms = 100\n"
         "session_timeout_ms = 101\nnotify_delivered = off\n"
         "[node township.xinzhan.clinic]\nrole = township_clinic\ncommunity = zhaozhou\n"
         "name = Xinzhan\n  Township Health Centre\n"
         "[node reading.a]\nrole = IMAGING_CENTRE\nservices = imaging.ct,imaging.dr  imaging.us\n"
         "[node county.zhaozhou.hospital]\nrole = COUNTY_HOSPITAL\ncommunity = zhaozhou\n"
         "[node city.shijiazhuang.hospital]\nrole = CITY_HOSPITAL\n"
         "[node ops.a]\nrole = OPS\n"
         "[deadlines]\nreferral.emergency = ACCEPTED 15m\nreferral = ACCEPTED 3d\n"
         "imaging.urgent = REPORTED 500ms\ndown_transfer = ARRIVED 3d after ACCEPTED\n"
         "[escalation]\nnotify = ops.a, county.zhaozhou.hospital\nredirect_emergency = true\n"
         "[community zhaozhou]\nfallback = city.shijiazhuang.hospital\n"
         "[community empty]\n"
         "[acl TOWNSHIP_CLINIC]\nREFERRAL = COUNTY_HOSPITAL,CITY_HOSPITAL\n"
         "KIND_IMAGING_CONSULT = imaging_centre\nREFERRAL = CITY_HOSPITAL\n"},
        {"broker-errors.ini",
         "[broker]\nlisten = x\ndata_dir = d\nca = a\ncert = b\nkey = c\nhearbeat_ms = 5\n"
         "[node a]\nrole = NURSE\n[node a]\n[deadlines]\nreferral.sometime = SENT 0s\n"},
        {"broker-service-clash.ini",
         "[broker]\nlisten = x\ndata_dir = d\nca = a\ncert = b\nkey = c\n"
         "[node imaging.ct]\nrole = OPS\n[node r]\nrole = IMAGING_CENTRE\nservices = imaging.ct\n"},
        {"not-ini", "key without section = 1\n[unterminated\n=value\n"},
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++)
        s_write("config", c[i].name, c[i].text, strlen(c[i].text));
}

/* ---- DICOM seeds ------------------------------------------------------- */

static void d_el(buf_t *b, unsigned g, unsigned e, const char *vr, const void *v, uint32_t len,
                 int explicit_vr)
{
    uint8_t h[12] = {(uint8_t)g, (uint8_t)(g >> 8), (uint8_t)e, (uint8_t)(e >> 8)};
    if (!explicit_vr) {
        h[4] = (uint8_t)len;
        h[5] = (uint8_t)(len >> 8);
        h[6] = (uint8_t)(len >> 16);
        h[7] = (uint8_t)(len >> 24);
        b_put(b, h, 8);
    } else if (strstr("OB OW OF SQ UN UT UC UR", vr)) {
        h[4] = (uint8_t)vr[0];
        h[5] = (uint8_t)vr[1];
        h[8] = (uint8_t)len;
        h[9] = (uint8_t)(len >> 8);
        h[10] = (uint8_t)(len >> 16);
        h[11] = (uint8_t)(len >> 24);
        b_put(b, h, 12);
    } else {
        h[4] = (uint8_t)vr[0];
        h[5] = (uint8_t)vr[1];
        h[6] = (uint8_t)len;
        h[7] = (uint8_t)(len >> 8);
        b_put(b, h, 8);
    }
    if (len != 0xffffffffu)
        b_put(b, v, len);
}

static void d_str(buf_t *b, unsigned g, unsigned e, const char *vr, const char *s, int explicit_vr)
{
    char tmp[128];
    size_t n = strlen(s);
    memcpy(tmp, s, n);
    if (n % 2)
        tmp[n++] = strcmp(vr, "UI") == 0 ? '\0' : ' ';
    d_el(b, g, e, vr, tmp, (uint32_t)n, explicit_vr);
}

static buf_t d_head(const char *ts)
{
    buf_t b = {0};
    uint8_t zero[128] = {0};
    b_put(&b, zero, 128);
    b_str(&b, "DICM");
    d_str(&b, 0x0002, 0x0002, "UI", "1.2.840.10008.5.1.4.1.1.2", 1);
    d_str(&b, 0x0002, 0x0003, "UI", "1.2.826.0.1.3680043.8.498.1001", 1);
    d_str(&b, 0x0002, 0x0010, "UI", ts, 1);
    return b;
}

static void d_body(buf_t *b, int ex, int with_seq)
{
    d_str(b, 0x0008, 0x0016, "UI", "1.2.840.10008.5.1.4.1.1.2", ex);
    d_str(b, 0x0008, 0x0018, "UI", "1.2.826.0.1.3680043.8.498.1001", ex);
    d_str(b, 0x0008, 0x0060, "CS", "CT", ex);
    if (with_seq) {
        /* (0008,1115) Referenced Series Sequence, undefined length, one
         * item of undefined length holding a (0020,000E) that is not
         * ours, then a nested empty sequence. */
        d_el(b, 0x0008, 0x1115, "SQ", NULL, 0xffffffffu, ex);
        d_el(b, 0xFFFE, 0xE000, "", NULL, 0xffffffffu, 0);
        d_str(b, 0x0020, 0x000E, "UI", "9.9.9", ex);
        d_el(b, 0x0008, 0x1140, "SQ", NULL, 0xffffffffu, ex);
        d_el(b, 0xFFFE, 0xE0DD, "", NULL, 0, 0);
        d_el(b, 0xFFFE, 0xE00D, "", NULL, 0, 0);
        d_el(b, 0xFFFE, 0xE0DD, "", NULL, 0, 0);
    }
    d_str(b, 0x0010, 0x0010, "PN", "WANG^JIANGUO", ex);
    d_str(b, 0x0020, 0x000D, "UI", "1.2.826.0.1.3680043.8.498.3003", ex);
    d_str(b, 0x0020, 0x000E, "UI", "1.2.826.0.1.3680043.8.498.2002", ex);
    uint8_t px[256];
    for (size_t i = 0; i < sizeof px; i++)
        px[i] = (uint8_t)(i * 13);
    d_el(b, 0x7FE0, 0x0010, "OW", px, sizeof px, ex);
}

static void s_dicom_seeds(void)
{
    buf_t b = d_head("1.2.840.10008.1.2.1");
    d_body(&b, 1, 0);
    s_write("dicom", "explicit-le.dcm", b.b, b.n);
    s_write("dicom", "truncated.dcm", b.b, b.n / 2);
    free(b.b);

    b = d_head("1.2.840.10008.1.2");
    d_body(&b, 0, 1);
    s_write_buf("dicom", "implicit-le-sequence.dcm", b);

    b = d_head("1.2.840.10008.1.2.4.50");
    d_body(&b, 1, 1);
    s_write_buf("dicom", "jpeg-sequence.dcm", b);

    b = d_head("1.2.840.10008.1.2.2");
    d_body(&b, 1, 0);
    s_write_buf("dicom", "big-endian.dcm", b);

    b = d_head("1.2.840.10008.1.2.1.99");
    s_write_buf("dicom", "deflated-meta-only.dcm", b);

    /* No SOP Instance UID in the data set: falls back to (0002,0003). */
    b = d_head("1.2.840.10008.1.2.1");
    d_str(&b, 0x0008, 0x0060, "CS", "DX", 1);
    d_str(&b, 0x0020, 0x000D, "UI", "1.2.3", 1);
    s_write_buf("dicom", "no-sop-in-dataset.dcm", b);

    /* An element claiming more bytes than the file has. */
    b = d_head("1.2.840.10008.1.2.1");
    d_el(&b, 0x0008, 0x0018, "UI", "1.2", 0x7fff, 1);
    b.n -= 0x7fff - 4;
    s_write_buf("dicom", "length-past-end.dcm", b);

    /* Sequences nested deeper than the probe allows. */
    b = d_head("1.2.840.10008.1.2.1");
    for (int i = 0; i < 20; i++) {
        d_el(&b, 0x0008, 0x1115, "SQ", NULL, 0xffffffffu, 1);
        d_el(&b, 0xFFFE, 0xE000, "", NULL, 0xffffffffu, 0);
    }
    s_write_buf("dicom", "deep-sequences.dcm", b);

    uint8_t junk[200];
    memset(junk, 'x', sizeof junk);
    s_write("dicom", "no-dicm.dcm", junk, sizeof junk);
}

/* ---- frame seeds ------------------------------------------------------- */

static void s_frame_seeds(void)
{
    buf_t b = {0};
    b_u8(&b, 6); /* limit 65536 */
    b_put(&b, "\x01\x02\x03\x04\x05\x06\x07\x08", 8);
    b_cat(&b, recs(3, m_hello(CLINIC, 1), m_referral(s_id(), CLINIC, s_node[COUNTY], 0, NULL),
                   m_heartbeat(CLINIC)));
    s_write_buf("frame", "three-records", b);

    b = (buf_t){0};
    b_u8(&b, 4); /* limit 255 */
    b_put(&b, "\xff\x00\xff\x00\xff\x00\xff\x00", 8);
    b_put(&b, "\x00\x00\x00\x00\x00\x00\x00\x01x\x00\x00\x00\x02yz", 15);
    b_put(&b, "\x00\x00\x01\x00", 4); /* 256 > 255 */
    b_put(&b, "tail", 4);
    s_write_buf("frame", "oversize-after-small", b);

    b = (buf_t){0};
    b_u8(&b, 5); /* limit 4096 */
    b_put(&b, "\x10\x20\x30\x40\x50\x60\x70\x80", 8);
    b_cat(&b, recs(1, m_heartbeat(CLINIC)));
    b_put(&b, "\x00\x00\x00\x10partial", 11);
    s_write_buf("frame", "truncated-tail", b);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s OUT_DIR SOURCE_DIR\n", argv[0]);
        return 2;
    }
    s_out = argv[1];
    s_static_init();
    s_session_seeds();
    s_reassembly_seeds();
    s_message_seeds();
    s_json_seeds();
    s_copy_dir(argv[2], "deploy/examples", ".json", "json");
    s_config_seeds();
    s_copy_dir(argv[2], "deploy/config", ".ini", "config");
    s_dicom_seeds();
    s_frame_seeds();
    printf("make_corpus: %zu files written under %s\n", s_files, s_out);
    return 0;
}
