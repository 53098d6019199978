/* Fuzz target: the reading centre's reassembly of an imaging study
 * (clients/agent/imaging.c and istore.c on the agent's real SQLite store
 * and spool folder), driven the way clients/agent/agent.c drives it:
 * deliveries are collected by the agent's own receive batch (inbox.c,
 * with the imaging receiver as its plug-in) and stored at the end of each
 * batch, chunks apart from the other messages. Nothing of the network is needed:
 * the harness plays the broker, as tests/unit/test_agent_imaging.c does.
 *
 * Every input runs on a fresh reading centre (its own temp folder, store,
 * spool and imaging module), so an input means the same thing every time.
 *
 * Input: a header picks the study (1-3 objects of 0 to 3 chunks' worth of
 * bytes, content from a seed) and what is wrong with its consult, if
 * anything (a declared SHA-256 that no data can match, chunk counts that
 * do not add up, hostile file names, an over-long case id). Then one byte
 * per step: deliver the consult, a good chunk, a damaged one (bad data,
 * wrong offset, short data, out-of-range indexes, another sender), an
 * update or report, a raw envelope made of input bytes, the same message
 * again, end of batch (ml_inbox_flush), a restart of the agent
 * (ml_aimg_recover + ml_spool_recover on the same folders), a tick.
 *
 * Checked at the end, aborting on a difference: every published study
 * folder holds exactly its manifest and the objects it lists, with plain
 * names, each file of the size and SHA-256 the manifest gives; a study
 * whose consult declared a digest no data can match, or which is invalid,
 * is never published; the harness's own study, once published, holds the
 * bytes the clinic sent. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "astore.h"
#include "fuzz_common.h"
#include "imaging.h"
#include "inbox.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_imaging.h"
#include "spool.h"

#define S_CLINIC "township.xinzhan.clinic"
#define S_OTHER "township.fengle.clinic"
#define S_CENTRE "reading.shijiazhuang.imaging"
#define S_STUDY "1.2.826.0.1.3680043.8.498.3003"
#define S_MAX_OBJ 3
#define S_BATCH 64
#define S_MAX_STEPS 512

#define S_FAIL(...) ml_fuzz_fail("fuzz_reassembly", __VA_ARGS__)

#define K_(x) MEDLINK__V1__KIND__KIND_##x
#define P_(x) MEDLINK__V1__ENVELOPE__PAYLOAD_##x

/* The latest delivery, packed, for "the same message again". */
typedef struct {
    uint8_t *blob;
    size_t len;
} s_rx_t;

typedef struct {
    char root[512];
    char data[600];
    char spool[600];
    ml_astore_t *st;
    ml_spool_t *sp;
    ml_aimg_t *img;
    ml_inbox_t *ib;

    /* The study the clinic sends. */
    char case_id[300];
    char consult_id[27];
    uint32_t chunk_size;
    size_t n_obj;
    uint8_t *content[S_MAX_OBJ];
    uint64_t size[S_MAX_OBJ];
    uint32_t chunks[S_MAX_OBJ];
    char sha[S_MAX_OBJ][ML_SHA256_HEX + 1];
    int never_publish; /* a declared digest no data matches, or an invalid consult */
    int priority;
    uint8_t *consult; /* packed */
    size_t consult_len;

    s_rx_t last; /* the latest delivery, for "the same message again" */
    uint64_t next_id;
} s_run_t;

static void s_node_open(s_run_t *r)
{
    char err[512], db[700];
    snprintf(db, sizeof db, "%s/agent.db", r->data);
    if (ml_mkdirs(r->data) != 0)
        S_FAIL("cannot create %s", r->data);
    if (ml_astore_open(db, &r->st, err, sizeof err) != 0)
        S_FAIL("astore: %s", err);
    ml_spool_config_t scfg = {r->spool, S_CENTRE, 4194304, r->st};
    if (ml_spool_new(&scfg, &r->sp, err, sizeof err) != 0)
        S_FAIL("spool: %s", err);
    ml_aimg_config_t icfg = {.data_dir = r->data,
                             .node_id = S_CENTRE,
                             .chunk_size = 4096,
                             .max_record = 4194304,
                             .store = r->st,
                             .spool = r->sp};
    if (ml_aimg_new(&icfg, &r->img, err, sizeof err) != 0)
        S_FAIL("aimg: %s", err);
    ml_inbox_config_t bcfg = {.store = r->st, .spool = r->sp};
    ml_inbox_plugin_t plugin;
    ml_aimg_inbox_plugin(r->img, &plugin);
    if (ml_inbox_new(&bcfg, &r->ib) != 0 || ml_inbox_add_plugin(r->ib, &plugin) != 0)
        S_FAIL("inbox");
    /* Start-up order of agent.c. Failures are the module's to report. */
    (void)ml_aimg_recover(r->img);
    (void)ml_spool_recover(r->sp);
}

static void s_node_close(s_run_t *r)
{
    /* A batch not flushed is lost, as in a restart of the agent (the
     * broker would deliver it again). */
    ml_inbox_destroy(&r->ib);
    ml_aimg_destroy(&r->img);
    ml_spool_destroy(&r->sp);
    ml_astore_destroy(&r->st);
}

static void s_rx_free(s_rx_t *x)
{
    free(x->blob);
    memset(x, 0, sizeof *x);
}

/* The end of a batch, as agent.c ends each loop iteration. */
static void s_flush(s_run_t *r)
{
    (void)ml_inbox_flush(r->ib);
}

/* Queues an envelope as agent.c does (ml_inbox_push, which drops one
 * without an id and refuses one that cannot be spooled) and keeps a copy
 * as "the latest". */
static void s_deliver(s_run_t *r, const ml_envelope_t *e)
{
    if (ml_inbox_pending(r->ib) == S_BATCH)
        s_flush(r);
    if (ml_inbox_push(r->ib, e) != 0)
        return;
    s_rx_free(&r->last);
    if (ml_env_pack(e, &r->last.blob, &r->last.len) != 0)
        S_FAIL("out of memory");
}

static void s_deliver_again(s_run_t *r)
{
    ml_envelope_t *e = NULL;
    if (!r->last.blob || ml_env_unpack(r->last.blob, r->last.len, &e) != 0)
        return;
    if (ml_inbox_pending(r->ib) == S_BATCH)
        s_flush(r);
    (void)ml_inbox_push(r->ib, e);
    ml_env_free(&e);
}

static void s_env_base(s_run_t *r, ml_envelope_t *e, char id[27], const char *from)
{
    ml_fuzz_ulid(r->next_id++, id);
    e->id = id;
    e->case_id = r->case_id;
    e->from = (char *)from;
    e->to = S_CENTRE;
    e->priority = r->priority;
    e->created_at = 1795354608123;
}

/* The study and its consult, from the input's header. */
static void s_make_study(s_run_t *r, ml_fuzz_in_t *in)
{
    uint8_t h = ml_fuzz_u8(in);
    r->n_obj = 1 + (size_t)(h % S_MAX_OBJ);
    int bad_sha = (h >> 2) & 1;
    r->chunk_size = (h >> 3) & 1 ? 8192 : 4096;
    int odd_names = (h >> 4) & 1;
    int bad_counts = (h >> 5) & 1;
    r->priority = (h >> 6) & 1 ? MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY
                               : MEDLINK__V1__PRIORITY__PRIORITY_URGENT;
    int long_case = (h >> 7) & 1;
    ml_fuzz_ulid(0xC0FFEE, r->consult_id);
    if (long_case) {
        /* Longer than the 128 characters a case id may have. */
        memset(r->case_id, 'C', 200);
        r->case_id[200] = '\0';
    } else {
        snprintf(r->case_id, sizeof r->case_id, "%s", r->consult_id);
    }
    r->never_publish = bad_sha || bad_counts || long_case;

    ml_fuzz_rng_t rng;
    ml_fuzz_rng_seed(&rng, ml_fuzz_u8(in) + 1);
    Medlink__V1__DicomObject objs[S_MAX_OBJ], *op[S_MAX_OBJ];
    char names[S_MAX_OBJ][64], sops[S_MAX_OBJ][64];
    static const char *const odd[] = {"manifest.json", "../escape.dcm", "IM0001.dcm",
                                      ".hidden.dcm",   "a/b.dcm",       "IM0001.dcm"};
    uint64_t total = 0;
    for (size_t i = 0; i < r->n_obj; i++) {
        uint16_t v = ml_fuzz_u16(in);
        r->size[i] = v % (3u * r->chunk_size + 1);
        r->content[i] = malloc(r->size[i] ? r->size[i] : 1);
        if (!r->content[i])
            S_FAIL("out of memory");
        ml_fuzz_rng_fill(&rng, r->content[i], r->size[i]);
        ml_sha256_hex(r->content[i], r->size[i], r->sha[i]);
        r->chunks[i] = ml_imaging_chunk_count(r->size[i], r->chunk_size);
        total += r->size[i];
        medlink__v1__dicom_object__init(&objs[i]);
        snprintf(sops[i], sizeof sops[i], "1.2.826.0.1.3680043.8.498.1%03zu", i + 1);
        if (odd_names)
            snprintf(names[i], sizeof names[i], "%s", odd[(i + (h >> 1)) % 6]);
        else
            snprintf(names[i], sizeof names[i], "IM%04zu.dcm", i + 1);
        objs[i].sop_instance_uid = sops[i];
        objs[i].series_instance_uid = "1.2.826.0.1.3680043.8.498.2002";
        objs[i].file_name = names[i];
        objs[i].size = r->size[i];
        objs[i].chunks = r->chunks[i] + (bad_counts && i == 0);
        objs[i].sha256 = r->sha[i];
        op[i] = &objs[i];
    }
    char bad[ML_SHA256_HEX + 1];
    if (bad_sha) {
        /* A well-formed digest of bytes that are not the object. */
        ml_sha256_hex("not the object", 14, bad);
        objs[0].sha256 = bad;
    }
    Medlink__V1__Patient pat = MEDLINK__V1__PATIENT__INIT;
    pat.health_card_id = "130102196203058812";
    pat.name = "Li Guoqiang";
    Medlink__V1__ImagingConsult c = MEDLINK__V1__IMAGING_CONSULT__INIT;
    c.patient = &pat;
    c.study_instance_uid = S_STUDY;
    c.modality = "CT";
    c.body_part = "CHEST";
    c.clinical_question = "Mass in the right upper lobe?";
    c.n_object = r->n_obj;
    c.object = op;
    c.chunk_size = r->chunk_size;
    c.total_bytes = total;
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = r->consult_id;
    e.case_id = r->case_id;
    e.kind = K_(IMAGING_CONSULT);
    e.from = S_CLINIC;
    e.to = S_CENTRE;
    e.priority = r->priority;
    e.created_at = 1795354608123;
    e.payload_case = P_(IMAGING_CONSULT);
    e.imaging_consult = &c;
    if (ml_env_pack(&e, &r->consult, &r->consult_len) != 0)
        S_FAIL("out of memory");
}

static void s_deliver_consult(s_run_t *r, int fresh_id)
{
    ml_envelope_t *e = NULL;
    char id[27];
    if (ml_env_unpack(r->consult, r->consult_len, &e) != 0)
        S_FAIL("the harness's consult does not unpack");
    char *own = e->id;
    if (fresh_id) {
        /* A second consult for the same case. */
        ml_fuzz_ulid(r->next_id++, id);
        e->id = id;
    }
    s_deliver(r, e);
    e->id = own; /* the envelope's to free */
    ml_env_free(&e);
}

enum { S_GOOD, S_DAMAGED, S_BAD_OFFSET, S_SHORT, S_WILD, S_FOREIGN };

static void s_deliver_chunk(s_run_t *r, ml_fuzz_in_t *in, int how)
{
    uint32_t obj = ml_fuzz_u8(in) % r->n_obj;
    uint32_t idx = ml_fuzz_u8(in) % r->chunks[obj];
    if (how == S_WILD) {
        obj = ml_fuzz_u8(in);
        idx = ml_fuzz_u16(in);
    }
    uint64_t off = (uint64_t)idx * r->chunk_size;
    size_t len = 0;
    const uint8_t *src = NULL;
    if (obj < r->n_obj && off <= r->size[obj]) {
        len = r->size[obj] - off < r->chunk_size ? (size_t)(r->size[obj] - off) : r->chunk_size;
        src = r->content[obj] + off;
    }
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf)
        S_FAIL("out of memory");
    if (len)
        memcpy(buf, src, len);
    char sha[ML_SHA256_HEX + 1];
    ml_sha256_hex(buf, len, sha);
    if (how == S_DAMAGED && len)
        buf[ml_fuzz_u8(in) % len] ^= 0x20;
    if (how == S_BAD_OFFSET)
        off += 1 + ml_fuzz_u8(in);
    if (how == S_SHORT && len)
        len--;
    Medlink__V1__ImagingChunk ch = MEDLINK__V1__IMAGING_CHUNK__INIT;
    ch.study_instance_uid = S_STUDY;
    ch.object_index = obj;
    ch.chunk_index = idx;
    ch.offset = off;
    ch.data.data = buf;
    ch.data.len = len;
    ch.sha256 = sha;
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    char id[27];
    s_env_base(r, &e, id, how == S_FOREIGN ? S_OTHER : S_CLINIC);
    e.kind = K_(IMAGING_CHUNK);
    e.payload_case = P_(IMAGING_CHUNK);
    e.imaging_chunk = &ch;
    s_deliver(r, &e);
    free(buf);
}

/* Every chunk of every object, in order: lets a short input finish a
 * study. */
static void s_deliver_all(s_run_t *r)
{
    for (uint32_t o = 0; o < r->n_obj; o++) {
        for (uint32_t k = 0; k < r->chunks[o]; k++) {
            uint8_t pick[2] = {(uint8_t)o, (uint8_t)k};
            ml_fuzz_in_t in = {pick, 2};
            if (r->chunks[o] <= 255)
                s_deliver_chunk(r, &in, S_GOOD);
        }
    }
}

static void s_deliver_update(s_run_t *r, ml_fuzz_in_t *in)
{
    uint8_t b = ml_fuzz_u8(in);
    Medlink__V1__ImagingUpdate u = MEDLINK__V1__IMAGING_UPDATE__INIT;
    u.status = (Medlink__V1__ImagingStatus)(b % 9);
    u.reason = b & 0x10 ? "" : "withdrawn by the clinic";
    u.assigned_to = b & 0x20 ? S_CENTRE : "";
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    char id[27];
    s_env_base(r, &e, id, b & 0x40 ? S_OTHER : S_CLINIC);
    e.kind = K_(IMAGING_UPDATE);
    e.payload_case = P_(IMAGING_UPDATE);
    e.imaging_update = &u;
    s_deliver(r, &e);
}

static void s_deliver_other(s_run_t *r, ml_fuzz_in_t *in)
{
    uint8_t b = ml_fuzz_u8(in);
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    char id[27];
    s_env_base(r, &e, id, S_CLINIC);
    Medlink__V1__ImagingResend rs = MEDLINK__V1__IMAGING_RESEND__INIT;
    uint32_t idx[3] = {0, b, 0xffffffffu};
    Medlink__V1__ImagingReport rp = MEDLINK__V1__IMAGING_REPORT__INIT;
    Medlink__V1__Clinician reader = MEDLINK__V1__CLINICIAN__INIT;
    if (b & 1) {
        rs.object_index = b >> 4;
        rs.n_chunk_index = 1 + (b >> 1) % 3;
        rs.chunk_index = idx;
        e.kind = K_(IMAGING_RESEND);
        e.payload_case = P_(IMAGING_RESEND);
        e.imaging_resend = &rs;
    } else {
        reader.name = "Dr. Zhao";
        rp.study_instance_uid = S_STUDY;
        rp.impression = "No mass.";
        rp.reader = &reader;
        rp.signed_at = 1795354608123;
        e.kind = K_(IMAGING_REPORT);
        e.payload_case = P_(IMAGING_REPORT);
        e.imaging_report = &rp;
    }
    s_deliver(r, &e);
}

/* Input bytes as an envelope: whatever the broker could be made to carry. */
static void s_deliver_raw(s_run_t *r, ml_fuzz_in_t *in)
{
    size_t want = ml_fuzz_u16(in) % 2048, got;
    const uint8_t *p = ml_fuzz_take(in, want, &got);
    ml_envelope_t *e = NULL;
    if (ml_env_unpack(p, got, &e) != 0)
        return;
    /* A stranger's message under the harness's consult id would make the
     * check of the published bytes meaningless (the inbox keeps the first
     * message of an id); under any other id it is fair game. */
    if (e->id && strcmp(e->id, r->consult_id) == 0) {
        ml_env_free(&e);
        return;
    }
    s_deliver(r, e);
    ml_env_free(&e);
}

/* ---- the checks -------------------------------------------------------- */

static uint8_t *s_slurp(const char *path, size_t *len)
{
    char *buf = NULL;
    if (ml_read_file(path, 64u << 20, &buf, len) != 0)
        return NULL;
    return (uint8_t *)buf;
}

static void s_check_study(s_run_t *r, const char *dir, const char *folder)
{
    char path[1400];
    size_t len = 0;
    snprintf(path, sizeof path, "%s/%s/manifest.json", dir, folder);
    uint8_t *text = s_slurp(path, &len);
    if (!text)
        S_FAIL("published %s has no manifest", folder);
    json_error_t jerr;
    json_t *m = json_loadb((const char *)text, len, 0, &jerr);
    free(text);
    if (!m)
        S_FAIL("manifest of %s is not JSON: %s", folder, jerr.text);
    const char *case_id = json_string_value(json_object_get(m, "caseId"));
    const char *consult = json_string_value(json_object_get(m, "consultMessageId"));
    json_t *objs = json_object_get(m, "objects");
    if (!case_id || !consult || !json_is_array(objs))
        S_FAIL("manifest of %s lacks caseId, consultMessageId or objects", folder);
    int ours = strcmp(consult, r->consult_id) == 0 && strcmp(case_id, r->case_id) == 0;
    if (ours && r->never_publish)
        S_FAIL("study %s was published although its consult can never be satisfied", folder);
    if (ours && json_array_size(objs) != r->n_obj)
        S_FAIL("study %s lists %zu objects, the clinic sent %zu", folder, json_array_size(objs),
               r->n_obj);
    size_t i;
    json_t *o;
    json_array_foreach(objs, i, o)
    {
        const char *name = json_string_value(json_object_get(o, "fileName"));
        const char *sha = json_string_value(json_object_get(o, "sha256"));
        json_int_t size = json_integer_value(json_object_get(o, "size"));
        json_int_t idx = json_integer_value(json_object_get(o, "index"));
        if (!name || !sha || !*name || name[0] == '.' || strchr(name, '/') ||
            strcmp(name, "manifest.json") == 0)
            S_FAIL("study %s: object %zu has the file name \"%s\"", folder, i, name ? name : "");
        snprintf(path, sizeof path, "%s/%s/%s", dir, folder, name);
        uint8_t *data = s_slurp(path, &len);
        if (!data)
            S_FAIL("study %s: %s is listed but cannot be read", folder, name);
        char got[ML_SHA256_HEX + 1];
        ml_sha256_hex(data, len, got);
        if ((json_int_t)len != size || strcmp(got, sha) != 0)
            S_FAIL("study %s: %s has %zu bytes and SHA-256 %s; the manifest says %lld and %s",
                   folder, name, len, got, (long long)size, sha);
        if (ours && (idx < 0 || (size_t)idx >= r->n_obj || len != r->size[idx] ||
                     (len && memcmp(data, r->content[idx], len) != 0)))
            S_FAIL("study %s: object %lld is not what the clinic sent", folder, (long long)idx);
        free(data);
    }
    /* Nothing but the manifest and the listed objects. */
    snprintf(path, sizeof path, "%s/%s", dir, folder);
    DIR *d = opendir(path);
    size_t files = 0;
    struct dirent *de;
    while (d && (de = readdir(d)))
        if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
            files++;
    if (d)
        closedir(d);
    if (files != json_array_size(objs) + 1)
        S_FAIL("study %s holds %zu entries for %zu objects", folder, files, json_array_size(objs));
    json_decref(m);
}

static void s_check(s_run_t *r)
{
    char inbox[700];
    snprintf(inbox, sizeof inbox, "%s/inbox", r->spool);
    DIR *d = opendir(inbox);
    if (!d)
        S_FAIL("no inbox folder");
    struct dirent *de;
    while ((de = readdir(d)))
        if (strncmp(de->d_name, "study-", 6) == 0)
            s_check_study(r, inbox, de->d_name);
    closedir(d);
}

static char s_base[512];

static void s_cleanup(void)
{
    if (s_base[0])
        ml_fuzz_rmtree(s_base);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ml_fuzz_quiet();
    if (!s_base[0]) {
        ml_fuzz_tmpdir("reassembly", s_base, sizeof s_base);
        atexit(s_cleanup);
    }
    static s_run_t r;
    memset(&r, 0, sizeof r);
    snprintf(r.root, sizeof r.root, "%.400s/centre", s_base);
    snprintf(r.data, sizeof r.data, "%.500s/data", r.root);
    snprintf(r.spool, sizeof r.spool, "%.500s/spool", r.root);
    ml_fuzz_rmtree(r.root);
    s_node_open(&r);

    ml_fuzz_in_t in = {data, size};
    s_make_study(&r, &in);
    for (int step = 0; in.n > 0 && step < S_MAX_STEPS; step++) {
        uint8_t op = ml_fuzz_u8(&in);
        switch (op % 16) {
        case 0:
            s_deliver_consult(&r, 0);
            break;
        case 1:
            s_deliver_chunk(&r, &in, S_GOOD);
            break;
        case 2:
            s_deliver_chunk(&r, &in, S_DAMAGED);
            break;
        case 3:
            s_deliver_chunk(&r, &in, S_BAD_OFFSET);
            break;
        case 4:
            s_deliver_chunk(&r, &in, S_SHORT);
            break;
        case 5:
            s_deliver_chunk(&r, &in, S_WILD);
            break;
        case 6:
            s_deliver_chunk(&r, &in, S_FOREIGN);
            break;
        case 7:
            s_deliver_update(&r, &in);
            break;
        case 8:
            s_flush(&r);
            break;
        case 9:
            s_deliver_raw(&r, &in);
            break;
        case 10:
            s_deliver_all(&r);
            break;
        case 11:
            s_deliver_again(&r);
            break;
        case 12:
            s_deliver_consult(&r, 1);
            break;
        case 13:
            s_deliver_other(&r, &in);
            break;
        case 14:
            /* A restart: what is committed stays, the batch is lost (the
             * broker would deliver it again). */
            s_node_close(&r);
            s_node_open(&r);
            break;
        default:
            ml_aimg_tick(r.img);
            break;
        }
    }
    s_flush(&r);
    s_check(&r);

    s_node_close(&r);
    s_rx_free(&r.last);
    for (size_t i = 0; i < r.n_obj; i++)
        free(r.content[i]);
    free(r.consult);
    ml_fuzz_rmtree(r.root);
    return 0;
}
