/* Workloads through a real medlinkd, driven from one process on one libuv
 * loop, each node a libmedlink channel with its own certificate and mutual
 * TLS session, behaving like medlink-agent on the wire:
 *
 *   - clinics (township.benchNN.clinic) send referrals to
 *     county.bench.hospital and/or imaging consults to the service
 *     imaging.ct: one ImagingConsult (objects with sizes, SHA-256 and chunk
 *     counts) and then its ImagingChunk messages, same case and priority;
 *   - the hospital acknowledges each referral and, with updates on, answers
 *     it with a ReferralUpdate ACCEPTED;
 *   - reading centres (reading.benchNN.imaging, serving imaging.ct) check
 *     every consult against what was sent, every chunk's SHA-256, offset and
 *     length, acknowledge, and answer a complete study with an ImagingUpdate
 *     STUDY_RECEIVED;
 *   - every node takes deliveries and acknowledges them once per loop
 *     iteration (one cumulative Ack), so the broker's own notices (DELIVERED,
 *     ASSIGNED) are taken like an agent takes them instead of piling up.
 *
 * Every sender keeps what it sent until the broker answers, bounded by a
 * count and a byte window (the agent's send_window and send_window_bytes),
 * resends after a transient Nack (RATE_LIMITED, STORE, STORE_FULL) and after
 * a reconnect, and stops the run at any other refusal.
 *
 * The objects of a study are pseudo-random bytes generated once and reused
 * by every study (the UIDs and case ids differ); their SHA-256 and the
 * SHA-256 of every chunk are computed once, at start-up, rather than at
 * send time as the agent does, to keep the load generator's CPU for the
 * checks a reading centre must make. A reading centre hashes every chunk
 * it receives and compares the digest with the chunk's sha256 field and
 * with the digest of the bytes that were sent; with every chunk index of
 * every object received, that proves each object arrived as its consult
 * says. Loop thread only. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include <uv.h>
#include <zmq.h>

#include "bench.h"
#include "ml_channel.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_imaging.h"
#include "ml_tls.h"

#define S_HOSPITAL "county.bench.hospital"
#define S_BROKER_ID "medlinkd.bench"
#define S_SERVICE "imaging.ct"
#define S_UID_ROOT "1.2.826.0.1.3680043.10.1137"
#define S_RETRY_MS 50
#define S_NOTICE_WAIT_NS (5ull * 1000000000ull)

#define K_(x) MEDLINK__V1__KIND__KIND_##x
#define P_(x) MEDLINK__V1__ENVELOPE__PAYLOAD_##x

/* What a node sends. */
enum { C_REFERRAL, C_UPDATE, C_CONSULT, C_CHUNK, C_STUDY_UPDATE, C_N };
static const char *const s_class_name[C_N] = {"referral", "update", "consult", "chunk",
                                              "study_update"};

enum { R_CLINIC, R_HOSPITAL, R_READER };

typedef struct s_load s_load_t;

/* A message sent and not yet answered (kept whole for a resend). */
typedef struct {
    char id[ML_ULID_LEN + 1];
    uint8_t *buf;
    size_t len;
    uint8_t cls;
    uint8_t done;
    uint8_t resend;
    long a, b; /* referral index; or study, chunk number within the study */
} s_out_t;

/* An answer a hospital or reading centre owes: the case, who gets it. */
typedef struct {
    long idx; /* referral index, or study */
    char case_id[ML_ULID_LEN + 1];
    char to[64];
} s_owed_t;

typedef struct {
    s_load_t *L;
    int role;
    char id[64];
    ml_tls_ctx_t *tls;
    ml_channel_t *ch;
    /* In flight, in send order: ring[(head + i) % cap] for i < len. */
    s_out_t *ring;
    size_t cap, head, len;
    long inflight;
    size_t inflight_bytes;
    s_out_t pend; /* built, waiting for room in the window */
    int has_pend;
    uv_timer_t retry;
    /* Deliveries to acknowledge at the end of this loop iteration. */
    char (*acks)[ML_ULID_LEN + 1];
    char **ack_ptrs;
    size_t n_acks, cap_acks;
    /* Clinic: what it sends, strided over the clinics sending that class. */
    long next_ref, ref_stride;
    long next_study, study_stride;
    int obj, chunk;  /* next chunk of the current study; obj < 0: its consult */
    long consult_ok; /* the last study whose consult the broker accepted */
    /* Hospital (updates) and reading centre (study reports). */
    s_owed_t *owed;
    size_t owed_head, owed_len, owed_cap;
    int was_up; /* its channel has been up at least once */
} s_node_t;

typedef struct {
    uint8_t *data;
    uint64_t size;
    uint32_t chunks;
    uint32_t first; /* number of its first chunk within the study */
    char sha[ML_SHA256_HEX + 1];
    char (*chunk_sha)[ML_SHA256_HEX + 1];
} s_object_t;

typedef struct {
    char case_id[ML_ULID_LEN + 1];
    char uid[80];
    uint64_t consult_at;
    uint64_t *chunk_at; /* first send of each chunk */
    uint8_t *got;       /* each chunk received */
    long n_got;
    int consult_seen;
    int complete;
    int reported;
} s_study_t;

typedef struct {
    uint64_t *v;
    size_t n;
} s_lat_t;

struct s_load {
    bench_load_opts_t o;
    uv_loop_t loop;
    void *zctx;
    s_node_t *nodes;
    int n_nodes;
    s_node_t *hospital;
    uv_check_t ack_check;
    uv_timer_t tick;
    char *pad;

    /* Study template. */
    s_object_t *obj;
    uint32_t study_chunks;
    uint64_t study_bytes;
    s_study_t *studies;

    long expect[C_N];
    long sent[C_N], accepted[C_N], duplicates;
    long retries, refused;
    int failed;
    int closing; /* the run is over: channels going down is expected */

    uint64_t *ref_at, *upd_at;
    uint8_t *ref_seen, *upd_seen;
    long ref_delivered, ref_dups, upd_received, upd_dups;
    long chunks_got, chunk_dups, studies_complete, study_reports;
    uint64_t chunk_bytes;
    long sha_failures, consult_mismatches, chunk_errors;
    long notices_delivered, notices_assigned, others;
    s_lat_t lat_ref, lat_upd, lat_rtt, lat_chunk, lat_study;

    /* First send, last delivery, and last Accepted of each class. */
    uint64_t t_start, t_first[C_N], t_last[C_N], t_acc[C_N];
    uint64_t t_done, t_window;
    long win_ref, win_upd;
    uint64_t win_bytes;

    /* --rate: referrals built so far, and when pacing began. */
    uv_timer_t pace;
    long paced;
    uint64_t t_pace;
    /* --start-when-up: nodes whose channel has been up at least once. */
    int n_up_once;
};

/* ---------------------------------------------------------------- util */

/* Stops the run as failed, saying who and what. */
static void s_fail(s_load_t *L, const char *who, const char *what)
{
    fprintf(stderr, "%s: %s\n", who, what);
    L->failed = 1;
    uv_stop(&L->loop);
}

static ml_tls_ctx_t *s_tls(const char *pki, const char *node)
{
    char ca[1024], crt[1024], key[1024], err[512];
    snprintf(ca, sizeof ca, "%s/ca.crt", pki);
    snprintf(crt, sizeof crt, "%s/%s.crt", pki, node);
    snprintf(key, sizeof key, "%s/%s.key", pki, node);
    ml_tls_config_t tc = {.ca_file = ca, .cert_file = crt, .key_file = key, .is_server = 0};
    ml_tls_ctx_t *ctx = NULL;
    if (ml_tls_ctx_new(&tc, &ctx, err, sizeof err) != 0) {
        fprintf(stderr, "tls for %s: %s\n", node, err);
        exit(1);
    }
    return ctx;
}

static int s_cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void s_lat_print(const char *name, s_lat_t *l)
{
    if (l->n == 0)
        return;
    qsort(l->v, l->n, sizeof *l->v, s_cmp_u64);
    printf("%s_p50_ms %.2f\n", name, (double)l->v[l->n / 2] / 1e6);
    printf("%s_p99_ms %.2f\n", name, (double)l->v[(l->n * 99) / 100] / 1e6);
}

static double s_secs(uint64_t from, uint64_t to)
{
    return to > from ? (double)(to - from) / 1e9 : 1e-9;
}

/* ------------------------------------------------------------ the study */

/* Objects of a study: object j has object_size + j * 7919 bytes, so that
 * all but the first end in a short chunk, as real ones do. O(bytes). */
static int s_template(s_load_t *L)
{
    const bench_load_opts_t *o = &L->o;
    L->obj = calloc((size_t)o->objects, sizeof *L->obj);
    if (!L->obj)
        return -1;
    uint64_t x = 0x2545f4914f6cdd1dull;
    for (int j = 0; j < o->objects; j++) {
        s_object_t *ob = &L->obj[j];
        ob->size = o->object_size + (uint64_t)j * 7919u;
        ob->chunks = ml_imaging_chunk_count(ob->size, o->chunk_size);
        ob->first = L->study_chunks;
        ob->data = malloc(ob->size);
        ob->chunk_sha = calloc(ob->chunks, sizeof *ob->chunk_sha);
        if (!ob->data || !ob->chunk_sha || ob->chunks == 0)
            return -1;
        for (uint64_t i = 0; i < ob->size; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            ob->data[i] = (uint8_t)(x >> 24);
        }
        ml_sha256_hex(ob->data, ob->size, ob->sha);
        for (uint32_t k = 0; k < ob->chunks; k++) {
            uint64_t off = (uint64_t)k * o->chunk_size;
            uint64_t n = ob->size - off < o->chunk_size ? ob->size - off : o->chunk_size;
            ml_sha256_hex(ob->data + off, n, ob->chunk_sha[k]);
        }
        L->study_chunks += ob->chunks;
        L->study_bytes += ob->size;
    }
    L->studies = calloc((size_t)o->studies, sizeof *L->studies);
    if (!L->studies)
        return -1;
    for (long s = 0; s < o->studies; s++) {
        s_study_t *st = &L->studies[s];
        snprintf(st->uid, sizeof st->uid, "%s.1.%ld", S_UID_ROOT, s + 1);
        st->chunk_at = calloc(L->study_chunks, sizeof *st->chunk_at);
        st->got = calloc(L->study_chunks, 1);
        if (!st->chunk_at || !st->got)
            return -1;
    }
    return 0;
}

static long s_study_of(s_load_t *L, const char *uid)
{
    const char *dot = uid ? strrchr(uid, '.') : NULL;
    size_t root = strlen(S_UID_ROOT ".1");
    if (!dot || strncmp(uid, S_UID_ROOT ".1.", root + 1) != 0 || dot != uid + root)
        return -1;
    long s = strtol(dot + 1, NULL, 10) - 1;
    return s >= 0 && s < L->o.studies ? s : -1;
}

/* ------------------------------------------------------- building sends */

/* Every message names the same (fictitious) patient; set up in bench_load. */
static Medlink__V1__Patient s_patient;

static void s_env_init(ml_envelope_t *e, s_node_t *n, char *id, const char *case_id, const char *to)
{
    ml_ulid_new(id);
    e->id = id;
    e->case_id = (char *)(case_id ? case_id : id);
    e->from = n->id;
    e->to = (char *)to;
    e->created_at = ml_now_ms();
    e->priority = MEDLINK__V1__PRIORITY__PRIORITY_ROUTINE;
}

static int s_pack(ml_envelope_t *e, s_out_t *out, int cls, long a, long b)
{
    memset(out, 0, sizeof *out);
    snprintf(out->id, sizeof out->id, "%s", e->id);
    out->cls = (uint8_t)cls;
    out->a = a;
    out->b = b;
    return ml_env_pack(e, &out->buf, &out->len);
}

static int s_build_referral(s_load_t *L, s_node_t *n, long idx, s_out_t *out)
{
    char id[ML_ULID_LEN + 1], note[32];
    int len = snprintf(note, sizeof note, "bench %ld ", idx);
    Medlink__V1__Diagnosis d = MEDLINK__V1__DIAGNOSIS__INIT;
    d.icd10 = "I20.0";
    d.text = "Unstable angina";
    Medlink__V1__Diagnosis *dp = &d;
    Medlink__V1__Referral r = MEDLINK__V1__REFERRAL__INIT;
    r.patient = &s_patient;
    r.reason = "benchmark referral";
    r.n_diagnosis = 1;
    r.diagnosis = &dp;
    /* Pad so the whole envelope is about --size bytes. */
    memcpy(L->pad, note, (size_t)len);
    r.notes = L->pad;
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    s_env_init(&e, n, id, NULL, S_HOSPITAL);
    e.kind = K_(REFERRAL);
    e.payload_case = P_(REFERRAL);
    e.referral = &r;
    return s_pack(&e, out, C_REFERRAL, idx, 0);
}

static int s_build_consult(s_load_t *L, s_node_t *n, long s, s_out_t *out)
{
    const bench_load_opts_t *o = &L->o;
    s_study_t *st = &L->studies[s];
    Medlink__V1__DicomObject *objs = calloc((size_t)o->objects, sizeof *objs);
    Medlink__V1__DicomObject **ptrs = calloc((size_t)o->objects, sizeof *ptrs);
    char(*names)[2][112] = calloc((size_t)o->objects, sizeof *names);
    char series[96];
    int rc = ML_ENOMEM;
    if (!objs || !ptrs || !names)
        goto out;
    snprintf(series, sizeof series, "%s.1", st->uid);
    for (int j = 0; j < o->objects; j++) {
        medlink__v1__dicom_object__init(&objs[j]);
        snprintf(names[j][0], sizeof names[j][0], "%s.%d", series, j + 1);
        snprintf(names[j][1], sizeof names[j][1], "IM%04d.dcm", j + 1);
        objs[j].sop_instance_uid = names[j][0];
        objs[j].series_instance_uid = series;
        objs[j].file_name = names[j][1];
        objs[j].size = L->obj[j].size;
        objs[j].sha256 = L->obj[j].sha;
        objs[j].chunks = L->obj[j].chunks;
        ptrs[j] = &objs[j];
    }
    Medlink__V1__Diagnosis d = MEDLINK__V1__DIAGNOSIS__INIT;
    d.icd10 = "J18.9";
    d.text = "Pneumonia, unspecified";
    Medlink__V1__Diagnosis *dp = &d;
    Medlink__V1__ImagingConsult c = MEDLINK__V1__IMAGING_CONSULT__INIT;
    c.patient = &s_patient;
    c.study_instance_uid = st->uid;
    c.modality = "CT";
    c.body_part = "CHEST";
    c.clinical_question = "Consolidation? Effusion?";
    c.study_description = "CT chest without contrast (benchmark)";
    c.n_object = (size_t)o->objects;
    c.object = ptrs;
    c.chunk_size = o->chunk_size;
    c.total_bytes = L->study_bytes;
    c.n_diagnosis = 1;
    c.diagnosis = &dp;
    char id[ML_ULID_LEN + 1];
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    s_env_init(&e, n, id, NULL, S_SERVICE);
    e.kind = K_(IMAGING_CONSULT);
    e.payload_case = P_(IMAGING_CONSULT);
    e.imaging_consult = &c;
    snprintf(st->case_id, sizeof st->case_id, "%s", id);
    rc = s_pack(&e, out, C_CONSULT, s, 0);
out:
    free(objs);
    free(ptrs);
    free(names);
    return rc;
}

static int s_build_chunk(s_load_t *L, s_node_t *n, long s, int j, int k, s_out_t *out)
{
    const s_object_t *ob = &L->obj[j];
    uint64_t off = (uint64_t)k * L->o.chunk_size;
    uint64_t len = ob->size - off < L->o.chunk_size ? ob->size - off : L->o.chunk_size;
    Medlink__V1__ImagingChunk c = MEDLINK__V1__IMAGING_CHUNK__INIT;
    c.study_instance_uid = L->studies[s].uid;
    c.object_index = (uint32_t)j;
    c.chunk_index = (uint32_t)k;
    c.offset = off;
    c.data.data = ob->data + off;
    c.data.len = (size_t)len;
    c.sha256 = (char *)ob->chunk_sha[k];
    char id[ML_ULID_LEN + 1];
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    s_env_init(&e, n, id, L->studies[s].case_id, S_SERVICE);
    e.kind = K_(IMAGING_CHUNK);
    e.payload_case = P_(IMAGING_CHUNK);
    e.imaging_chunk = &c;
    return s_pack(&e, out, C_CHUNK, s, (long)ob->first + k);
}

static int s_build_update(s_load_t *L, s_node_t *n, const s_owed_t *w, s_out_t *out)
{
    char id[ML_ULID_LEN + 1], note[32];
    snprintf(note, sizeof note, "bench %ld", w->idx);
    Medlink__V1__ReferralUpdate u = MEDLINK__V1__REFERRAL_UPDATE__INIT;
    /* REJECTED is final from DELIVERED: the case closes (retention). */
    u.status = L->o.close_cases ? MEDLINK__V1__REFERRAL_STATUS__REFERRAL_REJECTED
                                : MEDLINK__V1__REFERRAL_STATUS__REFERRAL_ACCEPTED;
    u.reason = L->o.close_cases ? "bench: case closed" : "";
    u.notes = note;
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    s_env_init(&e, n, id, w->case_id, w->to);
    e.kind = K_(REFERRAL_UPDATE);
    e.payload_case = P_(REFERRAL_UPDATE);
    e.referral_update = &u;
    return s_pack(&e, out, C_UPDATE, w->idx, 0);
}

static int s_build_study_update(s_load_t *L, s_node_t *n, const s_owed_t *w, s_out_t *out)
{
    char id[ML_ULID_LEN + 1];
    Medlink__V1__ImagingUpdate u = MEDLINK__V1__IMAGING_UPDATE__INIT;
    u.status = MEDLINK__V1__IMAGING_STATUS__IMAGING_STUDY_RECEIVED;
    u.objects_received = (uint32_t)L->o.objects;
    u.bytes_received = L->study_bytes;
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    s_env_init(&e, n, id, w->case_id, w->to);
    e.kind = K_(IMAGING_UPDATE);
    e.payload_case = P_(IMAGING_UPDATE);
    e.imaging_update = &u;
    return s_pack(&e, out, C_STUDY_UPDATE, w->idx, 0);
}

/* With --rate: whether the referrals built so far are all the schedule
 * allows by now (the first one goes at once). */
static int s_paced_out(s_load_t *L)
{
    if (L->o.rate <= 0)
        return 0;
    uint64_t now = bench_ns();
    if (L->t_pace == 0)
        L->t_pace = now;
    return (double)L->paced >= (double)(now - L->t_pace) / 1e9 * L->o.rate + 1.0;
}

/* Builds n's next message into out. Returns 1, 0 when n has nothing more
 * to send now, or -1 (out of memory). Referrals go before imaging, as the
 * agent sends its message stream ahead of its chunk stream. */
static int s_next(s_load_t *L, s_node_t *n, s_out_t *out)
{
    int rc;
    if (n->role == R_CLINIC) {
        if (n->ref_stride && n->next_ref < L->o.referrals && !s_paced_out(L)) {
            rc = s_build_referral(L, n, n->next_ref, out);
            L->paced++;
            n->next_ref += n->ref_stride;
        } else if (n->study_stride && n->next_study < L->o.studies) {
            if (n->obj < 0) {
                rc = s_build_consult(L, n, n->next_study, out);
                n->obj = 0;
                n->chunk = 0;
            } else if (n->consult_ok != n->next_study) {
                /* As the agent does: a study's chunks go once its consult
                 * is accepted (a consult refused for a while, a busy
                 * broker, must not leave its chunks without a case). */
                return 0;
            } else {
                rc = s_build_chunk(L, n, n->next_study, n->obj, n->chunk, out);
                if ((uint32_t)++n->chunk == L->obj[n->obj].chunks) {
                    n->chunk = 0;
                    if (++n->obj == L->o.objects) {
                        n->obj = -1;
                        n->next_study += n->study_stride;
                    }
                }
            }
        } else {
            return 0;
        }
    } else {
        if (n->owed_len == 0)
            return 0;
        s_owed_t *w = &n->owed[n->owed_head];
        rc = n->role == R_HOSPITAL ? s_build_update(L, n, w, out)
                                   : s_build_study_update(L, n, w, out);
        n->owed_head = (n->owed_head + 1) % n->owed_cap;
        n->owed_len--;
    }
    return rc == 0 ? 1 : -1;
}

static int s_owe(s_node_t *n, long idx, const char *case_id, const char *to)
{
    if (n->owed_len == n->owed_cap) {
        size_t cap = n->owed_cap ? n->owed_cap * 2 : 1024;
        s_owed_t *p = malloc(cap * sizeof *p);
        if (!p)
            return -1;
        for (size_t i = 0; i < n->owed_len; i++)
            p[i] = n->owed[(n->owed_head + i) % n->owed_cap];
        free(n->owed);
        n->owed = p;
        n->owed_head = 0;
        n->owed_cap = cap;
    }
    s_owed_t *w = &n->owed[(n->owed_head + n->owed_len++) % n->owed_cap];
    w->idx = idx;
    snprintf(w->case_id, sizeof w->case_id, "%s", case_id);
    snprintf(w->to, sizeof w->to, "%s", to);
    return 0;
}

/* ------------------------------------------------------------- sending */

static s_out_t *s_ring_at(s_node_t *n, size_t i)
{
    return &n->ring[(n->head + i) % n->cap];
}

static s_out_t *s_ring_push(s_node_t *n)
{
    if (n->len == n->cap) {
        size_t cap = n->cap ? n->cap * 2 : 256;
        s_out_t *p = malloc(cap * sizeof *p);
        if (!p)
            return NULL;
        for (size_t i = 0; i < n->len; i++)
            p[i] = *s_ring_at(n, i);
        free(n->ring);
        n->ring = p;
        n->head = 0;
        n->cap = cap;
    }
    return s_ring_at(n, n->len++);
}

static void s_retry_cb(uv_timer_t *t);

static void s_arm_retry(s_node_t *n)
{
    if (!uv_is_active((uv_handle_t *)&n->retry))
        uv_timer_start(&n->retry, s_retry_cb, S_RETRY_MS, 0);
}

/* Hands a message in the ring to the channel; one the channel cannot take
 * now is sent again by the retry timer. */
static void s_transmit(s_node_t *n, s_out_t *e)
{
    int rc = ml_channel_send_raw(n->ch, e->buf, e->len);
    e->resend = 0;
    if (rc == ML_EFULL || rc == ML_ECLOSED) {
        e->resend = 1;
        s_arm_retry(n);
    } else if (rc != 0) {
        s_fail(n->L, n->id, ml_strerror(rc));
    }
}

static void s_mark_sent(s_load_t *L, const s_out_t *e)
{
    uint64_t now = bench_ns();
    if (L->t_start == 0)
        L->t_start = now;
    if (L->t_first[e->cls] == 0)
        L->t_first[e->cls] = now;
    L->sent[e->cls]++;
    switch (e->cls) {
    case C_REFERRAL:
        L->ref_at[e->a] = now;
        break;
    case C_UPDATE:
        L->upd_at[e->a] = now;
        break;
    case C_CONSULT:
        L->studies[e->a].consult_at = now;
        break;
    case C_CHUNK:
        L->studies[e->a].chunk_at[e->b] = now;
        break;
    default:
        break;
    }
}

/* Sends what n has while its window (messages and bytes) has room. */
static void s_pump(s_node_t *n)
{
    s_load_t *L = n->L;
    /* With --start-when-up the run starts once every channel is up, so
     * that many clinics' handshakes are not counted as time of the run. */
    if (n->role == R_CLINIC && L->o.start_when_up && L->n_up_once < L->n_nodes)
        return;
    for (;;) {
        /* Within min(--window, the broker's credit), as the agent sends
         * (docs/protocol.md, "Credit"); at least one record always. */
        uint32_t cm;
        uint64_t cb;
        if (ml_channel_credit(n->ch, &cm, &cb) != 0)
            return;
        size_t win = (uint64_t)L->o.window < cm ? (size_t)L->o.window : cm;
        size_t win_bytes = (uint64_t)L->o.window_bytes < cb ? L->o.window_bytes : (size_t)cb;
        if (n->inflight > 0 && (size_t)n->inflight >= win)
            return;
        if (!n->has_pend) {
            int rc = s_next(L, n, &n->pend);
            if (rc < 0) {
                s_fail(L, n->id, "out of memory");
                return;
            }
            if (rc == 0)
                return;
            n->has_pend = 1;
        }
        if (n->inflight > 0 && n->inflight_bytes + n->pend.len > win_bytes)
            return;
        s_out_t *e = s_ring_push(n);
        if (!e) {
            s_fail(L, n->id, "out of memory");
            return;
        }
        *e = n->pend;
        n->has_pend = 0;
        n->inflight++;
        n->inflight_bytes += e->len;
        s_mark_sent(L, e);
        s_transmit(n, e);
        if (L->failed)
            return;
    }
}

static void s_retry_cb(uv_timer_t *t)
{
    s_node_t *n = t->data;
    if (!ml_channel_is_up(n->ch))
        return; /* on_state resends everything once it is up */
    for (size_t i = 0; i < n->len; i++) {
        s_out_t *e = s_ring_at(n, i);
        if (!e->done && e->resend)
            s_transmit(n, e);
    }
}

static s_out_t *s_find(s_node_t *n, const char *id)
{
    for (size_t i = 0; i < n->len; i++) {
        s_out_t *e = s_ring_at(n, i);
        if (!e->done && strcmp(e->id, id) == 0)
            return e;
    }
    return NULL;
}

static void s_settle(s_node_t *n, s_out_t *e)
{
    e->done = 1;
    free(e->buf);
    e->buf = NULL;
    n->inflight--;
    n->inflight_bytes -= e->len;
    while (n->len > 0 && n->ring[n->head].done) {
        n->head = (n->head + 1) % n->cap;
        n->len--;
    }
}

static void s_maybe_done(s_load_t *L);

static void s_on_answer(s_node_t *n, const ml_envelope_t *env)
{
    s_load_t *L = n->L;
    if (env->payload_case == P_(ACCEPTED)) {
        for (size_t i = 0; i < env->accepted->n_message_ids; i++) {
            s_out_t *e = s_find(n, env->accepted->message_ids[i]);
            if (!e)
                continue; /* answered twice (a resend): already settled */
            if (++L->accepted[e->cls] == L->expect[e->cls])
                L->t_acc[e->cls] = bench_ns();
            if (e->cls == C_CONSULT)
                n->consult_ok = e->a;
            s_settle(n, e);
        }
        L->duplicates += (long)env->accepted->n_duplicate_ids;
    } else {
        const Medlink__V1__Nack *k = env->nack;
        s_out_t *e = k->message_id ? s_find(n, k->message_id) : NULL;
        if (k->code == MEDLINK__V1__NACK_CODE__NACK_RATE_LIMITED ||
            k->code == MEDLINK__V1__NACK_CODE__NACK_STORE ||
            k->code == MEDLINK__V1__NACK_CODE__NACK_STORE_FULL) {
            L->retries++;
            if (e) {
                e->resend = 1;
                s_arm_retry(n);
            }
        } else {
            L->refused++;
            if (e)
                s_settle(n, e);
            s_fail(L, n->id, k->reason ? k->reason : "refused");
            return;
        }
    }
    s_pump(n);
    s_maybe_done(L);
}

/* ----------------------------------------------------------- receiving */

static void s_push_ack(s_node_t *n, const char *id)
{
    if (n->n_acks == n->cap_acks) {
        size_t cap = n->cap_acks ? n->cap_acks * 2 : 256;
        void *a = realloc(n->acks, cap * sizeof *n->acks);
        if (!a)
            return; /* not acked: the broker delivers it again */
        n->acks = a;
        void *p = realloc(n->ack_ptrs, cap * sizeof *n->ack_ptrs);
        if (!p)
            return;
        n->ack_ptrs = p;
        n->cap_acks = cap;
    }
    snprintf(n->acks[n->n_acks++], ML_ULID_LEN + 1, "%s", id);
}

static long s_bench_index(const char *notes, long max)
{
    long idx = -1;
    if (notes)
        sscanf(notes, "bench %ld", &idx);
    return idx >= 0 && idx < max ? idx : -1;
}

/* The end of a class's deliveries: the first class to finish closes the
 * window over which the mixed workload's rates are taken. */
static void s_class_finished(s_load_t *L, int cls, uint64_t now)
{
    L->t_last[cls] = now;
    if (L->t_window == 0) {
        L->t_window = now;
        L->win_ref = L->ref_delivered;
        L->win_upd = L->upd_received;
        L->win_bytes = L->chunk_bytes;
    }
}

static void s_hospital_env(s_node_t *n, ml_envelope_t *env)
{
    s_load_t *L = n->L;
    if (env->payload_case != P_(REFERRAL)) {
        L->others++;
        return;
    }
    uint64_t now = bench_ns();
    long idx = s_bench_index(env->referral->notes, L->o.referrals);
    if (idx < 0) {
        L->others++;
        return;
    }
    if (L->ref_seen[idx]) {
        L->ref_dups++;
        return;
    }
    L->ref_seen[idx] = 1;
    L->lat_ref.v[L->lat_ref.n++] = now - L->ref_at[idx];
    if (++L->ref_delivered == L->o.referrals)
        s_class_finished(L, C_REFERRAL, now);
    if (L->o.updates && s_owe(n, idx, env->case_id, env->from) != 0)
        s_fail(L, n->id, "out of memory");
}

/* A consult must say what was sent: sizes, digests, chunk counts. */
static int s_consult_ok(s_load_t *L, const Medlink__V1__ImagingConsult *c)
{
    if (c->n_object != (size_t)L->o.objects || c->chunk_size != L->o.chunk_size ||
        c->total_bytes != L->study_bytes)
        return 0;
    for (size_t j = 0; j < c->n_object; j++) {
        const Medlink__V1__DicomObject *o = c->object[j];
        if (o->size != L->obj[j].size || o->chunks != L->obj[j].chunks ||
            strcmp(o->sha256, L->obj[j].sha) != 0)
            return 0;
    }
    return 1;
}

static void s_reader_env(s_node_t *n, ml_envelope_t *env)
{
    s_load_t *L = n->L;
    uint64_t now = bench_ns();
    if (env->payload_case == P_(IMAGING_CONSULT)) {
        long s = s_study_of(L, env->imaging_consult->study_instance_uid);
        if (s < 0 || !s_consult_ok(L, env->imaging_consult) ||
            strcmp(env->case_id, L->studies[s].case_id) != 0) {
            L->consult_mismatches++;
            return;
        }
        L->studies[s].consult_seen = 1;
        return;
    }
    if (env->payload_case != P_(IMAGING_CHUNK)) {
        L->others++;
        return;
    }
    const Medlink__V1__ImagingChunk *c = env->imaging_chunk;
    long s = s_study_of(L, c->study_instance_uid);
    s_study_t *st = s >= 0 ? &L->studies[s] : NULL;
    if (!st || !st->consult_seen || c->object_index >= (uint32_t)L->o.objects ||
        strcmp(env->case_id, st->case_id) != 0) {
        L->chunk_errors++;
        return;
    }
    const s_object_t *ob = &L->obj[c->object_index];
    uint64_t off = (uint64_t)c->chunk_index * L->o.chunk_size;
    if (c->chunk_index >= ob->chunks || c->offset != off ||
        c->data.len != (ob->size - off < L->o.chunk_size ? ob->size - off : L->o.chunk_size)) {
        L->chunk_errors++;
        return;
    }
    /* The reading centre's check: the bytes match the chunk's digest, and
     * (end to end) the digest of what the clinic sent. */
    char sha[ML_SHA256_HEX + 1];
    ml_sha256_hex(c->data.data, c->data.len, sha);
    if (!c->sha256 || strcmp(sha, c->sha256) != 0 ||
        strcmp(sha, ob->chunk_sha[c->chunk_index]) != 0) {
        L->sha_failures++;
        return;
    }
    uint32_t k = ob->first + c->chunk_index;
    if (st->got[k]) {
        L->chunk_dups++;
        return;
    }
    st->got[k] = 1;
    L->lat_chunk.v[L->lat_chunk.n++] = now - st->chunk_at[k];
    L->chunk_bytes += c->data.len;
    if (++L->chunks_got == L->expect[C_CHUNK])
        s_class_finished(L, C_CHUNK, now);
    if (++st->n_got == (long)L->study_chunks) {
        st->complete = 1;
        L->studies_complete++;
        L->lat_study.v[L->lat_study.n++] = now - st->consult_at;
        if (s_owe(n, s, st->case_id, env->from) != 0)
            s_fail(L, n->id, "out of memory");
    }
}

static void s_clinic_env(s_node_t *n, ml_envelope_t *env)
{
    s_load_t *L = n->L;
    uint64_t now = bench_ns();
    if (env->payload_case == P_(REFERRAL_UPDATE)) {
        const Medlink__V1__ReferralUpdate *u = env->referral_update;
        if (u->status == MEDLINK__V1__REFERRAL_STATUS__REFERRAL_DELIVERED) {
            L->notices_delivered++;
            return;
        }
        long idx = s_bench_index(u->notes, L->o.referrals);
        int want = L->o.close_cases ? MEDLINK__V1__REFERRAL_STATUS__REFERRAL_REJECTED
                                    : MEDLINK__V1__REFERRAL_STATUS__REFERRAL_ACCEPTED;
        if ((int)u->status != want || idx < 0) {
            L->others++;
            return;
        }
        if (L->upd_seen[idx]) {
            L->upd_dups++;
            return;
        }
        L->upd_seen[idx] = 1;
        L->lat_upd.v[L->lat_upd.n++] = now - L->upd_at[idx];
        L->lat_rtt.v[L->lat_rtt.n++] = now - L->ref_at[idx];
        if (++L->upd_received == L->o.referrals)
            s_class_finished(L, C_UPDATE, now);
    } else if (env->payload_case == P_(IMAGING_UPDATE)) {
        const Medlink__V1__ImagingUpdate *u = env->imaging_update;
        if (u->status == MEDLINK__V1__IMAGING_STATUS__IMAGING_ASSIGNED) {
            L->notices_assigned++;
        } else if (u->status == MEDLINK__V1__IMAGING_STATUS__IMAGING_STUDY_RECEIVED) {
            L->study_reports++;
        } else {
            L->others++;
        }
    } else {
        L->others++;
    }
}

static void s_on_envelope(ml_channel_t *ch, ml_envelope_t *env, void *arg)
{
    s_node_t *n = arg;
    if (env->payload_case == P_(ACCEPTED) || env->payload_case == P_(NACK)) {
        s_on_answer(n, env);
        return;
    }
    if (!ml_env_kind_is_routed(env->kind))
        return;
    /* A delivery: taken whatever it is, and acknowledged like the agent
     * acknowledges, once per loop iteration (s_ack_cb). */
    s_push_ack(n, env->id);
    if (n->role == R_HOSPITAL)
        s_hospital_env(n, env);
    else if (n->role == R_READER)
        s_reader_env(n, env);
    else
        s_clinic_env(n, env);
    s_maybe_done(n->L);
}

static void s_on_state(ml_channel_t *ch, int up, const char *reason, void *arg)
{
    s_node_t *n = arg;
    if (!up) {
        if (!n->L->closing)
            fprintf(stderr, "%s: down: %s\n", n->id, reason);
        return;
    }
    if (!n->was_up) {
        n->was_up = 1;
        if (++n->L->n_up_once == n->L->n_nodes && n->L->o.start_when_up) {
            for (int i = 0; i < n->L->n_nodes; i++)
                if (&n->L->nodes[i] != n)
                    s_pump(&n->L->nodes[i]);
        }
    }
    /* After a reconnect, everything unanswered goes again (the broker
     * answers a message it already has as a duplicate). */
    for (size_t i = 0; i < n->len; i++) {
        s_out_t *e = s_ring_at(n, i);
        if (!e->done)
            s_transmit(n, e);
    }
    s_pump(n);
}

/* Once per loop iteration: one cumulative Ack per node, then the answers
 * the hospital and reading centres owe (after the Ack, as an agent's
 * hospital system answers what is already in its inbox). */
static void s_ack_cb(uv_check_t *h)
{
    s_load_t *L = h->data;
    for (int i = 0; i < L->n_nodes; i++) {
        s_node_t *n = &L->nodes[i];
        if (n->n_acks > 0 && ml_channel_is_up(n->ch)) {
            for (size_t k = 0; k < n->n_acks; k++)
                n->ack_ptrs[k] = n->acks[k];
            Medlink__V1__Ack ack = MEDLINK__V1__ACK__INIT;
            ack.n_message_ids = n->n_acks;
            ack.message_ids = n->ack_ptrs;
            char id[ML_ULID_LEN + 1];
            ml_ulid_new(id);
            ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
            e.id = id;
            e.kind = K_(ACK);
            e.from = n->id;
            e.to = (char *)ml_channel_welcome(n->ch)->broker;
            e.created_at = ml_now_ms();
            e.payload_case = P_(ACK);
            e.ack = &ack;
            if (ml_channel_send(n->ch, &e) == 0)
                n->n_acks = 0;
        }
        if (n->role != R_CLINIC)
            s_pump(n);
    }
}

/* ---------------------------------------------------------------- run */

/* DELIVERED per referral and ASSIGNED per study, when the broker sends
 * them. */
static long s_notices_expected(const bench_load_opts_t *o)
{
    if (o->no_notices)
        return 0;
    return (o->offline ? 0 : o->referrals) + o->studies;
}

static int s_main_done(s_load_t *L)
{
    const bench_load_opts_t *o = &L->o;
    for (int c = 0; c < C_N; c++)
        if (L->accepted[c] < L->expect[c])
            return 0;
    if (o->offline)
        return 1;
    return L->ref_delivered >= o->referrals && L->upd_received >= L->expect[C_UPDATE] &&
           L->chunks_got >= L->expect[C_CHUNK] && L->study_reports >= o->studies;
}

static void s_maybe_done(s_load_t *L)
{
    uint64_t now = bench_ns();
    if (L->t_done == 0 && s_main_done(L))
        L->t_done = now;
    if (L->t_done == 0)
        return;
    /* Then the broker's notices, which follow the acknowledgements: wait
     * for them (a few seconds at most) so the run leaves nothing queued. */
    long expected = s_notices_expected(&L->o);
    if (L->notices_delivered + L->notices_assigned >= expected ||
        now - L->t_done > S_NOTICE_WAIT_NS)
        uv_stop(&L->loop);
}

static void s_tick(uv_timer_t *t)
{
    s_load_t *L = t->data;
    static int ticks;
    s_maybe_done(L);
    if (++ticks % 10 == 0)
        fprintf(stderr,
                "progress: sent %ld ref %ld upd %ld chunks; accepted %ld/%ld/%ld; "
                "delivered %ld ref %ld upd %ld chunks; retries %ld\n",
                L->sent[C_REFERRAL], L->sent[C_UPDATE], L->sent[C_CHUNK], L->accepted[C_REFERRAL],
                L->accepted[C_UPDATE], L->accepted[C_CHUNK], L->ref_delivered, L->upd_received,
                L->chunks_got, L->retries);
    if (ticks > L->o.timeout_s * 10) {
        fprintf(stderr, "timed out after %d s\n", L->o.timeout_s);
        L->failed = 1;
        uv_stop(&L->loop);
    }
}

/* With --rate, once a millisecond: the clinics send what the schedule
 * now allows (their windows are rarely the limit at a paced load). */
static void s_pace_cb(uv_timer_t *t)
{
    s_load_t *L = t->data;
    for (int i = 0; i < L->n_nodes; i++)
        if (L->nodes[i].role == R_CLINIC)
            s_pump(&L->nodes[i]);
}

static void s_walk_close(uv_handle_t *h, void *arg)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void s_node_init(s_load_t *L, s_node_t *n, int role, const char *id)
{
    n->L = L;
    n->role = role;
    n->obj = -1;
    n->consult_ok = -1;
    snprintf(n->id, sizeof n->id, "%s", id);
    n->tls = s_tls(L->o.pki, n->id);
    uv_timer_init(&L->loop, &n->retry);
    n->retry.data = n;
    ml_channel_config_t cc = {.endpoint = L->o.broker,
                              .tls = n->tls,
                              .node_id = n->id,
                              .broker_id = S_BROKER_ID,
                              .software = "medlink-bench",
                              .heartbeat_ms = 2000,
                              .deliveries = 1,
                              .on_envelope = s_on_envelope,
                              .on_state = s_on_state,
                              .arg = n};
    if (ml_channel_new(&L->loop, L->zctx, &cc, &n->ch) != 0) {
        fprintf(stderr, "%s: cannot create its channel\n", n->id);
        exit(1);
    }
}

static void s_report(s_load_t *L)
{
    const bench_load_opts_t *o = &L->o;
    for (int c = 0; c < C_N; c++) {
        if (L->expect[c])
            printf("accepted_%s %ld\n", s_class_name[c], L->accepted[c]);
    }
    printf("refused %ld\nretries %ld\nduplicates_answered %ld\n", L->refused, L->retries,
           L->duplicates);
    if (o->referrals && !o->studies && !o->updates) {
        /* The referral-only keys bench.sh has always read. */
        printf("accepted %ld\n", L->accepted[C_REFERRAL]);
        printf("accepted_per_s %.0f\n",
               (double)L->accepted[C_REFERRAL] / s_secs(L->t_start, L->t_acc[C_REFERRAL]));
        if (!o->offline) {
            double secs = s_secs(L->t_start, L->t_last[C_REFERRAL]);
            printf("delivered %ld\nduplicates_seen %ld\n", L->ref_delivered, L->ref_dups);
            printf("delivered_per_s %.0f\n", (double)L->ref_delivered / secs);
            printf("delivered_mb_per_s %.1f\n",
                   (double)L->ref_delivered * (double)o->size / secs / 1e6);
            s_lat_print("latency", &L->lat_ref);
        }
    } else if (o->referrals) {
        printf("referrals_delivered %ld\nreferral_duplicates_seen %ld\n", L->ref_delivered,
               L->ref_dups);
        printf("referrals_per_s %.0f\n",
               (double)L->ref_delivered / s_secs(L->t_first[C_REFERRAL], L->t_last[C_REFERRAL]));
        s_lat_print("referral_latency", &L->lat_ref);
    }
    if (o->updates) {
        printf("updates_received %ld\nupdate_duplicates_seen %ld\n", L->upd_received, L->upd_dups);
        printf("updates_per_s %.0f\n",
               (double)L->upd_received / s_secs(L->t_first[C_UPDATE], L->t_last[C_UPDATE]));
        s_lat_print("update_latency", &L->lat_upd);
        s_lat_print("accept_roundtrip", &L->lat_rtt);
    }
    if (o->studies) {
        double secs = s_secs(L->t_first[C_CONSULT], L->t_last[C_CHUNK]);
        printf("imaging_studies %ld\nimaging_studies_complete %ld\n", o->studies,
               L->studies_complete);
        printf("imaging_chunks %ld\nimaging_chunk_bytes %" PRIu64 "\n", L->chunks_got,
               L->chunk_bytes);
        printf("imaging_mb_per_s %.1f\n", (double)L->chunk_bytes / secs / 1e6);
        printf("imaging_accepted_mb_per_s %.1f\n",
               (double)L->accepted[C_CHUNK] * (double)L->study_bytes / (double)L->study_chunks /
                   s_secs(L->t_first[C_CONSULT], L->t_acc[C_CHUNK]) / 1e6);
        printf("sha_failures %ld\nconsult_mismatches %ld\nchunk_errors %ld\nchunk_duplicates %ld\n",
               L->sha_failures, L->consult_mismatches, L->chunk_errors, L->chunk_dups);
        printf("study_reports %ld\n", L->study_reports);
        s_lat_print("chunk_latency", &L->lat_chunk);
        s_lat_print("study_latency", &L->lat_study);
    }
    if (o->studies && (o->referrals || o->updates) && L->t_window) {
        /* Rates while every class was flowing: from the first send to the
         * moment the first class had everything delivered. */
        double w = s_secs(L->t_start, L->t_window);
        printf("mixed_window_s %.2f\n", w);
        printf("mixed_referrals_per_s %.0f\n", (double)L->win_ref / w);
        if (o->updates)
            printf("mixed_updates_per_s %.0f\n", (double)L->win_upd / w);
        printf("mixed_imaging_mb_per_s %.1f\n", (double)L->win_bytes / w / 1e6);
    }
    printf(
        "notices_delivered %ld\nnotices_assigned %ld\nnotices_expected %ld\nother_messages %ld\n",
        L->notices_delivered, L->notices_assigned, s_notices_expected(o), L->others);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("loadgen_cpu_s %.2f\n", (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
                                       (double)ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6);
}

int bench_load(const bench_load_opts_t *opts)
{
    static s_load_t load;
    s_load_t *L = &load;
    L->o = *opts;
    const bench_load_opts_t *o = &L->o;
    medlink__v1__patient__init(&s_patient);
    s_patient.health_card_id = "130102195903127718";
    s_patient.name = "Bench Patient";
    if (o->studies && s_template(L) != 0) {
        fprintf(stderr, "out of memory for the study template\n");
        return 1;
    }
    L->expect[C_REFERRAL] = o->referrals;
    L->expect[C_UPDATE] = o->updates && !o->offline ? o->referrals : 0;
    L->expect[C_CONSULT] = o->studies;
    L->expect[C_CHUNK] = o->studies * (long)L->study_chunks;
    L->expect[C_STUDY_UPDATE] = o->offline ? 0 : o->studies;
    size_t nr = (size_t)(o->referrals > 0 ? o->referrals : 1);
    L->ref_at = calloc(nr, sizeof *L->ref_at);
    L->upd_at = calloc(nr, sizeof *L->upd_at);
    L->ref_seen = calloc(nr, 1);
    L->upd_seen = calloc(nr, 1);
    L->lat_ref.v = calloc(nr, sizeof(uint64_t));
    L->lat_upd.v = calloc(nr, sizeof(uint64_t));
    L->lat_rtt.v = calloc(nr, sizeof(uint64_t));
    L->lat_chunk.v = calloc((size_t)L->expect[C_CHUNK] + 1, sizeof(uint64_t));
    L->lat_study.v = calloc((size_t)o->studies + 1, sizeof(uint64_t));
    /* ~150 bytes of envelope besides the notes. */
    size_t padlen = o->size > 200 ? o->size - 150 : 50;
    L->pad = malloc(padlen + 1);
    if (!L->ref_at || !L->upd_at || !L->ref_seen || !L->upd_seen || !L->lat_ref.v ||
        !L->lat_upd.v || !L->lat_rtt.v || !L->lat_chunk.v || !L->lat_study.v || !L->pad) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    memset(L->pad, 'x', padlen);
    L->pad[padlen] = '\0';

    uv_loop_init(&L->loop);
    L->zctx = zmq_ctx_new();
    int with_hospital = o->referrals > 0 && !o->offline;
    int readers = o->studies > 0 ? o->n_readers : 0;
    L->n_nodes = o->n_clinics + with_hospital + readers;
    L->nodes = calloc((size_t)L->n_nodes, sizeof *L->nodes);
    if (!L->nodes)
        return 1;
    /* Who sends what: every clinic both classes, or (split) the first half
     * referrals and the others imaging, so that both flow at once. */
    int n_ref = o->referrals ? o->n_clinics : 0, n_img = o->studies ? o->n_clinics : 0;
    if (o->split && n_ref && n_img) {
        n_ref = o->n_clinics / 2 > 0 ? o->n_clinics / 2 : 1;
        n_img = o->n_clinics - n_ref;
        if (n_img == 0) {
            fprintf(stderr, "a split workload needs at least 2 clinics\n");
            return 2;
        }
    }
    char id[64];
    int k = 0;
    for (int i = 0; i < o->n_clinics; i++, k++) {
        s_node_t *n = &L->nodes[k];
        snprintf(id, sizeof id, "township.bench%02d.clinic", i + 1);
        int ref_rank = o->split && n_img && n_ref ? (i < n_ref ? i : -1) : (n_ref ? i : -1);
        int img_rank =
            o->split && n_img && n_ref ? (i >= n_ref ? i - n_ref : -1) : (n_img ? i : -1);
        if (ref_rank >= 0) {
            n->next_ref = ref_rank;
            n->ref_stride = n_ref;
        }
        if (img_rank >= 0) {
            n->next_study = img_rank;
            n->study_stride = n_img;
        }
        s_node_init(L, n, R_CLINIC, id);
    }
    if (with_hospital) {
        L->hospital = &L->nodes[k];
        s_node_init(L, &L->nodes[k++], R_HOSPITAL, S_HOSPITAL);
    }
    for (int i = 0; i < readers; i++, k++) {
        snprintf(id, sizeof id, "reading.bench%02d.imaging", i + 1);
        s_node_init(L, &L->nodes[k], R_READER, id);
    }
    uv_check_init(&L->loop, &L->ack_check);
    L->ack_check.data = L;
    uv_check_start(&L->ack_check, s_ack_cb);
    uv_timer_init(&L->loop, &L->tick);
    L->tick.data = L;
    uv_timer_start(&L->tick, s_tick, 100, 100);
    if (o->rate > 0) {
        uv_timer_init(&L->loop, &L->pace);
        L->pace.data = L;
        uv_timer_start(&L->pace, s_pace_cb, 1, 1);
    }
    uv_run(&L->loop, UV_RUN_DEFAULT);

    s_report(L);
    int ok = !L->failed && s_main_done(L) && L->sha_failures == 0 && L->consult_mismatches == 0 &&
             L->chunk_errors == 0 && L->refused == 0;
    printf("result %s\n", ok ? "ok" : "FAILED");
    L->closing = 1;

    for (int i = 0; i < L->n_nodes; i++) {
        s_node_t *n = &L->nodes[i];
        ml_channel_destroy(&n->ch);
        uv_timer_stop(&n->retry);
    }
    uv_timer_stop(&L->tick);
    if (o->rate > 0)
        uv_timer_stop(&L->pace);
    uv_check_stop(&L->ack_check);
    uv_walk(&L->loop, s_walk_close, NULL);
    uv_run(&L->loop, UV_RUN_DEFAULT);
    for (int i = 0; i < L->n_nodes; i++) {
        s_node_t *n = &L->nodes[i];
        ml_tls_ctx_destroy(&n->tls);
        for (size_t j = 0; j < n->len; j++)
            free(s_ring_at(n, j)->buf);
        if (n->has_pend)
            free(n->pend.buf);
        free(n->ring);
        free(n->acks);
        free(n->ack_ptrs);
        free(n->owed);
    }
    zmq_ctx_term(L->zctx);
    uv_loop_close(&L->loop);
    return ok ? 0 : 1;
}
