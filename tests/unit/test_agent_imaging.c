/* The agent's imaging side without a network: a clinic and a reading
 * centre, each with its real SQLite store and spool folder in a temp dir,
 * and the broker's part played by the test (settling the clinic's rows,
 * delivering envelopes to the centre). Covers ingest of a study folder,
 * refusals (non-DICOM file, missing folder, foreign study), the chunk rows
 * and the envelopes built from them, resuming after a reopen, reassembly
 * with good, duplicate, out-of-order, damaged and early chunks, the
 * published study and its manifest, resend requests, the end of a case,
 * and recovery of an interrupted publication.
 *
 * Suite aimg_sealed runs both nodes with store keys: a whole consult
 * (early chunks kept as orphans, reassembly, publication, refusals)
 * leaves no patient name, clinical text, file name or DICOM UID in clear
 * in either agent.db; a transfer begun without a key finishes after one is
 * set, and survives a rotation. The blob copies and .part files are not
 * sealed (docs/operations.md says why) and are not checked here. */
#define _DEFAULT_SOURCE /* memmem */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <jansson.h>
#include <sqlite3.h>

#include "astore.h"
#include "imaging.h"
#include "inbox.h"
#include "istore.h"
#include "ml_common.h"
#include "ml_crypt.h"
#include "ml_env.h"
#include "ml_imaging.h"
#include "spool.h"
#include "support.h"

#define CLINIC "township.xinzhan.clinic"
#define CENTRE "imaging.city.centre"
#define CHUNK 4096u
#define STUDY "1.2.826.0.1.3680043.8.498.3003"

typedef struct {
    const char *id;
    char root[600];
    char spool[700];
    char data[700];
    ml_astore_t *st;
    ml_spool_t *sp;
    ml_aimg_t *img;
    ml_inbox_t *ib;           /* the receive batch, with the imaging plug-in */
    const ml_keyring_t *keys; /* NULL: in clear */
} node_t;

static char s_dir[512];
static node_t s_clinic = {.id = CLINIC}, s_centre = {.id = CENTRE};

static void node_open(node_t *n)
{
    char err[512], db[800];
    snprintf(db, sizeof db, "%s/agent.db", n->data);
    cr_assert_eq(ml_mkdirs(n->data), 0);
    cr_assert_eq(ml_astore_open_sealed(db, n->keys, &n->st, err, sizeof err), 0, "%s", err);
    ml_spool_config_t scfg = {n->spool, n->id, 4194304, n->st};
    cr_assert_eq(ml_spool_new(&scfg, &n->sp, err, sizeof err), 0, "%s", err);
    ml_aimg_config_t icfg = {.data_dir = n->data,
                             .node_id = n->id,
                             .chunk_size = CHUNK,
                             .max_record = 4194304,
                             .store = n->st,
                             .spool = n->sp};
    cr_assert_eq(ml_aimg_new(&icfg, &n->img, err, sizeof err), 0, "%s", err);
    ml_inbox_config_t bcfg = {.store = n->st, .spool = n->sp};
    ml_inbox_plugin_t plugin;
    ml_aimg_inbox_plugin(n->img, &plugin);
    cr_assert_eq(ml_inbox_new(&bcfg, &n->ib), 0);
    cr_assert_eq(ml_inbox_add_plugin(n->ib, &plugin), 0);
    cr_assert_eq(ml_aimg_recover(n->img), 0);
    cr_assert_eq(ml_spool_recover(n->sp), 0);
}

static void node_close(node_t *n)
{
    ml_inbox_destroy(&n->ib);
    ml_aimg_destroy(&n->img);
    ml_spool_destroy(&n->sp);
    ml_astore_destroy(&n->st);
}

static void s_setup(void)
{
    ml_log_set_level(ML_LOG_ERROR);
    ml_test_tmpdir(s_dir, sizeof s_dir);
    node_t *nodes[2] = {&s_clinic, &s_centre};
    for (int i = 0; i < 2; i++) {
        node_t *n = nodes[i];
        snprintf(n->root, sizeof n->root, "%.512s/%.64s", s_dir, n->id);
        snprintf(n->spool, sizeof n->spool, "%.600s/spool", n->root);
        snprintf(n->data, sizeof n->data, "%.600s/data", n->root);
        node_open(n);
    }
}

static void s_teardown(void)
{
    node_close(&s_clinic);
    node_close(&s_centre);
    ml_test_sh("rm -rf '%s'", s_dir);
}

TestSuite(aimg, .init = s_setup, .fini = s_teardown);

/* ---- files ---- */

static int exists(const char *fmt_path)
{
    struct stat st;
    return stat(fmt_path, &st) == 0;
}

static int pathf_exists(const char *a, const char *b, const char *c)
{
    char p[1500];
    snprintf(p, sizeof p, "%s/%s/%s", a, b, c);
    return exists(p);
}

static char *slurp(const char *path, size_t *len)
{
    char *out = NULL;
    size_t n = 0;
    if (ml_read_file(path, 64u << 20, &out, &n) != 0)
        return NULL;
    if (len)
        *len = n;
    return out;
}

static int count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

/* ---- a DICOM writer (explicit VR little endian) ---- */

typedef struct {
    uint8_t *b;
    size_t n, cap;
} buf_t;

static void put(buf_t *b, const void *p, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->b = realloc(b->b, b->cap);
    }
    memcpy(b->b + b->n, p, n);
    b->n += n;
}

static void el(buf_t *b, uint16_t g, uint16_t e, const char *vr, const void *v, uint32_t len)
{
    uint8_t h[12] = {(uint8_t)g,        (uint8_t)(g >> 8), (uint8_t)e,
                     (uint8_t)(e >> 8), (uint8_t)vr[0],    (uint8_t)vr[1]};
    int lng = strstr("OB OW SQ UN UT", vr) != NULL;
    if (lng) {
        h[8] = (uint8_t)len;
        h[9] = (uint8_t)(len >> 8);
        h[10] = (uint8_t)(len >> 16);
        h[11] = (uint8_t)(len >> 24);
        put(b, h, 12);
    } else {
        h[6] = (uint8_t)len;
        h[7] = (uint8_t)(len >> 8);
        put(b, h, 8);
    }
    put(b, v, len);
}

static void el_str(buf_t *b, uint16_t g, uint16_t e, const char *vr, const char *s)
{
    char tmp[128];
    size_t n = strlen(s);
    memcpy(tmp, s, n);
    if (n % 2)
        tmp[n++] = strcmp(vr, "UI") == 0 ? '\0' : ' ';
    el(b, g, e, vr, tmp, (uint32_t)n);
}

/* Writes a CT image of about `pixels` bytes to path. */
static void write_dicom(const char *path, const char *sop, const char *study, size_t pixels,
                        unsigned seed)
{
    buf_t b = {0};
    uint8_t zero[128] = {0};
    put(&b, zero, 128);
    put(&b, "DICM", 4);
    el_str(&b, 0x0002, 0x0002, "UI", "1.2.840.10008.5.1.4.1.1.2");
    el_str(&b, 0x0002, 0x0003, "UI", sop);
    el_str(&b, 0x0002, 0x0010, "UI", "1.2.840.10008.1.2.1");
    el_str(&b, 0x0008, 0x0016, "UI", "1.2.840.10008.5.1.4.1.1.2");
    el_str(&b, 0x0008, 0x0018, "UI", sop);
    el_str(&b, 0x0008, 0x0060, "CS", "CT");
    el_str(&b, 0x0010, 0x0010, "PN", "WANG^JIANGUO");
    el_str(&b, 0x0020, 0x000D, "UI", study);
    el_str(&b, 0x0020, 0x000E, "UI", "1.2.826.0.1.3680043.8.498.2002");
    uint8_t *px = malloc(pixels);
    for (size_t i = 0; i < pixels; i++)
        px[i] = (uint8_t)(rand_r(&seed) >> 3);
    el(&b, 0x7FE0, 0x0010, "OW", px, (uint32_t)pixels);
    free(px);
    FILE *f = fopen(path, "wb");
    cr_assert(f, "cannot write %s", path);
    cr_assert_eq(fwrite(b.b, 1, b.n, f), b.n);
    fclose(f);
    free(b.b);
}

#define CONSULT_JSON                                                                               \
    "{\"to\": \"imaging.ct\", \"priority\": \"PRIORITY_URGENT\", \"imagingConsult\": {"            \
    "\"patient\": {\"healthCardId\": \"130102195903127718\", \"name\": \"Wang Jianguo\"}, "        \
    "\"requestingDoctor\": {\"name\": \"Dr. Liu Fang\"}, \"bodyPart\": \"CHEST\", "                \
    "\"clinicalQuestion\": \"Nodule in the right upper lobe?\"%s}}"

/* Drops a study the way the hospital system is told to: the files into
 * outbox/NAME.d first, then NAME.json renamed in. sizes[] gives each file's
 * pixel bytes (0 ends the list). */
static void drop_study(const char *name, const size_t *sizes, const char *extra_json)
{
    char d[1200], p[1400], tmp[1400];
    snprintf(d, sizeof d, "%s/outbox/%s.d", s_clinic.spool, name);
    cr_assert_eq(ml_mkdirs(d), 0);
    for (int i = 0; sizes && sizes[i]; i++) {
        char sop[80];
        snprintf(sop, sizeof sop, "1.2.826.0.1.3680043.8.498.1%03d", i + 1);
        snprintf(p, sizeof p, "%s/IM%04d.dcm", d, i + 1);
        write_dicom(p, sop, STUDY, sizes[i], (unsigned)(i + 1) * 7919u);
    }
    char json[4096];
    snprintf(json, sizeof json, CONSULT_JSON, extra_json ? extra_json : "");
    snprintf(tmp, sizeof tmp, "%s/outbox/.%s.json.tmp", s_clinic.spool, name);
    snprintf(p, sizeof p, "%s/outbox/%s.json", s_clinic.spool, name);
    cr_assert_eq(ml_write_file_atomic(tmp, json, strlen(json)), 0);
    cr_assert_eq(rename(tmp, p), 0);
}

/* The id of the last consult staged and stored. */
static char s_consult_id[32];

static int consult_row_cb(const ml_outbox_row_t *r, void *arg)
{
    if (r->file_name[0] && !r->blob_path[0])
        snprintf(s_consult_id, sizeof s_consult_id, "%s", r->id);
    return 0;
}

static void stage(void)
{
    ml_spool_scan_stats_t st;
    cr_assert_eq(ml_spool_scan(s_clinic.sp, 100, &st), 0);
    cr_assert_eq(st.staged, 1, "the consult was not staged (rejected %zu)", st.rejected);
    cr_assert_eq(ml_aimg_run_jobs(s_clinic.img), 1);
    s_consult_id[0] = '\0';
    cr_assert_eq(ml_astore_outbox_pending(s_clinic.st, 0, 1000000, consult_row_cb, NULL), 0);
}

/* ---- outbox rows ---- */

#define MAXROWS 256
typedef struct {
    int n;
    int64_t seq[MAXROWS];
    char id[MAXROWS][32];
    char file[MAXROWS][128];
    char blob[MAXROWS][256];
    uint64_t off[MAXROWS];
    size_t len[MAXROWS];
    int held[MAXROWS];
} rows_t;

static int row_cb(const ml_outbox_row_t *r, void *arg)
{
    rows_t *rows = arg;
    if (rows->n < MAXROWS) {
        int i = rows->n;
        rows->seq[i] = r->seq;
        snprintf(rows->id[i], 32, "%s", r->id);
        snprintf(rows->file[i], 128, "%s", r->file_name);
        snprintf(rows->blob[i], 256, "%s", r->blob_path);
        rows->off[i] = r->blob_off;
        rows->len[i] = r->blob_len;
        rows->held[i] = r->held;
    }
    rows->n++;
    return 0;
}

static rows_t stream(node_t *n, int which)
{
    rows_t rows = {0};
    cr_assert_eq(ml_astore_outbox_next(n->st, which, 0, MAXROWS, row_cb, &rows), 0);
    return rows;
}

static rows_t all_pending(node_t *n)
{
    rows_t rows = {0};
    cr_assert_eq(ml_astore_outbox_pending(n->st, 0, MAXROWS, row_cb, &rows), 0);
    return rows;
}

typedef struct {
    uint8_t *blob;
    size_t len;
} packed_t;

static int copy_env_cb(const ml_outbox_row_t *r, void *arg)
{
    packed_t *p = arg;
    p->blob = malloc(r->envelope_len);
    memcpy(p->blob, r->envelope, r->envelope_len);
    p->len = r->envelope_len;
    return 1;
}

static ml_envelope_t *outbox_env(node_t *n, const char *id)
{
    packed_t p = {0};
    cr_assert_eq(ml_astore_outbox_get(n->st, id, copy_env_cb, &p), 1, "no row %s", id);
    ml_envelope_t *e = NULL;
    cr_assert_eq(ml_env_unpack(p.blob, p.len, &e), 0);
    free(p.blob);
    return e;
}

/* The clinic's consult, as stored. */
static ml_envelope_t *the_consult(void)
{
    cr_assert(s_consult_id[0], "no consult was stored");
    return outbox_env(&s_clinic, s_consult_id);
}

static uint64_t consult_total(void)
{
    ml_envelope_t *e = the_consult();
    uint64_t t = e->imaging_consult->total_bytes;
    ml_env_free(&e);
    return t;
}

/* Plays the broker: Accepted (or refused) for ids. */
static void settle(node_t *n, const char *id, int accepted, const char *reason)
{
    ml_spool_result_t r = {id, accepted, reason};
    cr_assert_eq(ml_spool_settle(n->sp, &r, 1), 0);
    ml_aimg_settled(n->img, &r, 1);
}

/* Builds the envelope of chunk row id as the agent sends it. */
static int built_cb(const ml_outbox_row_t *r, void *arg)
{
    packed_t *p = arg;
    char err[512];
    cr_assert_eq(ml_aimg_chunk_envelope(s_clinic.img, r, &p->blob, &p->len, err, sizeof err), 0,
                 "%s", err);
    return 1;
}

static packed_t build_chunk(const char *id)
{
    packed_t p = {0};
    cr_assert_eq(ml_astore_outbox_get(s_clinic.st, id, built_cb, &p), 1);
    return p;
}

/* ---- delivery to a node, as the agent does it ---- */

typedef struct {
    char id[32];
    char case_id[160];
    char sender[64];
    int kind;
    packed_t env;
    int ack;
} dlv_t;

static dlv_t dlv_of(packed_t env)
{
    dlv_t d;
    memset(&d, 0, sizeof d);
    ml_envelope_t *e = NULL;
    cr_assert_eq(ml_env_unpack(env.blob, env.len, &e), 0);
    snprintf(d.id, sizeof d.id, "%s", e->id);
    snprintf(d.case_id, sizeof d.case_id, "%s", e->case_id);
    snprintf(d.sender, sizeof d.sender, "%s", e->from);
    d.kind = e->kind;
    d.env = env;
    ml_env_free(&e);
    return d;
}

static packed_t pack(const ml_envelope_t *e)
{
    packed_t p;
    cr_assert_eq(ml_env_pack(e, &p.blob, &p.len), 0);
    return p;
}

/* Delivers d[0..n) in one batch, through the inbox's transaction as the
 * agent does it; returns ml_inbox_receive's result and sets each ack. */
static int deliver(node_t *to, dlv_t *d, size_t n)
{
    ml_spool_msg_t m[MAXROWS], c[MAXROWS];
    size_t nm = 0, nc = 0;
    int idx_m[MAXROWS], idx_c[MAXROWS];
    for (size_t i = 0; i < n; i++) {
        ml_spool_msg_t x = {d[i].id,       d[i].case_id, d[i].sender, d[i].kind,
                            d[i].env.blob, d[i].env.len, 0,           0};
        if (d[i].kind == MEDLINK__V1__KIND__KIND_IMAGING_CHUNK) {
            idx_c[nc] = (int)i;
            c[nc++] = x;
        } else {
            idx_m[nm] = (int)i;
            m[nm++] = x;
        }
    }
    int rc = ml_inbox_receive(to->ib, m, nm, c, nc);
    for (size_t i = 0; i < nm; i++)
        d[idx_m[i]].ack = rc == 0;
    for (size_t i = 0; i < nc; i++)
        d[idx_c[i]].ack = rc == 0 && c[i].ack;
    return rc;
}

static void dlv_free(dlv_t *d, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(d[i].env.blob);
}

/* The consult as the broker delivers it to the reading centre. */
static dlv_t consult_delivery(void)
{
    ml_envelope_t *e = the_consult();
    dlv_t d = dlv_of(pack(e));
    ml_env_free(&e);
    return d;
}

/* Every chunk row of the clinic, as deliveries (after the consult is
 * accepted). */
static size_t chunk_deliveries(dlv_t *out, size_t max)
{
    rows_t c = stream(&s_clinic, ML_OUTBOX_CHUNKS);
    cr_assert_leq((size_t)c.n, max);
    for (int i = 0; i < c.n; i++)
        out[i] = dlv_of(build_chunk(c.id[i]));
    return (size_t)c.n;
}

static const size_t s_sizes[] = {10000, 5000, 100, 0};

/* Stages the standard study and accepts its consult; returns the case id
 * in case_id. */
static void staged_and_accepted(char case_id[160])
{
    drop_study("ct-chest", s_sizes, NULL);
    stage();
    ml_envelope_t *e = the_consult();
    snprintf(case_id, 160, "%s", e->case_id);
    settle(&s_clinic, e->id, 1, NULL);
    ml_env_free(&e);
}

/* ---- tests: sending side ---- */

Test(aimg, ingest_study_folder)
{
    drop_study("ct-chest", s_sizes, NULL);
    stage();

    cr_assert_eq(count_entries(s_clinic.spool), 5);
    char outbox[800];
    snprintf(outbox, sizeof outbox, "%s/outbox", s_clinic.spool);
    cr_assert_eq(count_entries(outbox), 0, "outbox/ is empty");
    cr_assert(pathf_exists(s_clinic.spool, "pending", "ct-chest.json"));
    cr_assert(pathf_exists(s_clinic.spool, "pending", "ct-chest.d"), "the folder moves along");

    ml_envelope_t *e = the_consult();
    const Medlink__V1__ImagingConsult *c = e->imaging_consult;
    cr_assert_eq(e->kind, MEDLINK__V1__KIND__KIND_IMAGING_CONSULT);
    cr_assert_str_eq(e->from, CLINIC);
    cr_assert_str_eq(e->to, "imaging.ct");
    cr_assert_str_eq(c->study_instance_uid, STUDY, "filled in from the files");
    cr_assert_str_eq(c->modality, "CT", "filled in from the files");
    cr_assert_eq(c->chunk_size, CHUNK);
    cr_assert_eq(c->n_object, 3);
    uint64_t total = 0;
    uint32_t chunks = 0;
    for (size_t i = 0; i < 3; i++) {
        const Medlink__V1__DicomObject *o = c->object[i];
        char name[32], src[1500], sha[ML_SHA256_HEX + 1];
        uint64_t size = 0;
        snprintf(name, sizeof name, "IM%04zu.dcm", i + 1);
        cr_assert_str_eq(o->file_name, name, "objects in name order");
        snprintf(src, sizeof src, "%s/pending/ct-chest.d/%s", s_clinic.spool, name);
        cr_assert_eq(ml_sha256_file(src, sha, &size), 0);
        cr_assert_eq(o->size, size);
        cr_assert_str_eq(o->sha256, sha);
        cr_assert_eq(o->chunks, ml_imaging_chunk_count(size, CHUNK));
        char sop[80];
        snprintf(sop, sizeof sop, "1.2.826.0.1.3680043.8.498.1%03zu", i + 1);
        cr_assert_str_eq(o->sop_instance_uid, sop);
        cr_assert_str_eq(o->series_instance_uid, "1.2.826.0.1.3680043.8.498.2002");
        /* The blob copy is byte for byte the file. */
        char blob[1500], bsha[ML_SHA256_HEX + 1];
        snprintf(blob, sizeof blob, "%s/blobs/%s/%zu.dcm", s_clinic.data, e->case_id, i);
        cr_assert_eq(ml_sha256_file(blob, bsha, NULL), 0, "no blob copy %s", blob);
        cr_assert_str_eq(bsha, sha);
        total += size;
        chunks += o->chunks;
    }
    cr_assert_eq(c->total_bytes, total);
    cr_assert_geq(chunks, 5, "the study spans several chunks");

    /* One outbox row per chunk, held until the consult is accepted. */
    rows_t all = all_pending(&s_clinic);
    cr_assert_eq(all.n, 1 + (int)chunks);
    cr_assert_eq(stream(&s_clinic, ML_OUTBOX_CHUNKS).n, 0, "chunks wait for the consult");
    rows_t ch = {0};
    for (int i = 0; i < all.n; i++) {
        if (!all.blob[i][0])
            continue;
        cr_assert(all.held[i]);
        cr_assert_gt(all.seq[i], all.seq[0], "chunks come after the consult");
        ch.n++;
    }
    cr_assert_eq(ch.n, (int)chunks);
    ml_aimg_progress_t p;
    cr_assert_eq(ml_aimg_progress(s_clinic.img, e->case_id, &p), 0);
    cr_assert_eq(p.chunks, chunks);
    cr_assert_eq(p.bytes, total);
    cr_assert_eq(p.accepted, 0);
    cr_assert(!p.consult_accepted);
    cr_assert(p.has_next && p.next_object == 0 && p.next_chunk == 0);
    ml_env_free(&e);
}

Test(aimg, chunk_rows_become_envelopes_from_the_blob_copy)
{
    char case_id[160];
    drop_study("ct-chest", s_sizes, NULL);
    stage();
    ml_envelope_t *consult = the_consult();
    snprintf(case_id, sizeof case_id, "%s", consult->case_id);
    settle(&s_clinic, consult->id, 1, NULL);

    /* Accepted: sent/ has the consult as sent (objects filled in) and its
     * folder; the hospital system may now delete its files. */
    char *sent = NULL;
    char p[1500];
    snprintf(p, sizeof p, "%s/sent/ct-chest.json", s_clinic.spool);
    cr_assert(sent = slurp(p, NULL), "no sent/ct-chest.json");
    json_t *j = json_loads(sent, 0, NULL);
    cr_assert(j);
    json_t *objs = json_object_get(json_object_get(j, "imagingConsult"), "object");
    cr_assert_eq(json_array_size(objs), 3);
    cr_assert_str_eq(json_string_value(json_object_get(json_array_get(objs, 0), "fileName")),
                     "IM0001.dcm");
    json_decref(j);
    free(sent);
    cr_assert(pathf_exists(s_clinic.spool, "sent", "ct-chest.d"));
    cr_assert(!pathf_exists(s_clinic.spool, "pending", "ct-chest.d"));
    ml_test_sh("rm -rf '%s/sent/ct-chest.d'", s_clinic.spool);

    rows_t c = stream(&s_clinic, ML_OUTBOX_CHUNKS);
    uint32_t want_obj = 0, want_chunk = 0;
    for (int i = 0; i < c.n; i++) {
        const Medlink__V1__DicomObject *o = consult->imaging_consult->object[want_obj];
        packed_t b = build_chunk(c.id[i]);
        ml_envelope_t *e = NULL;
        cr_assert_eq(ml_env_unpack(b.blob, b.len, &e), 0);
        char err[256];
        cr_assert_eq(ml_env_validate(e, err, sizeof err), 0, "%s", err);
        cr_assert_eq(e->kind, MEDLINK__V1__KIND__KIND_IMAGING_CHUNK);
        cr_assert_str_eq(e->id, c.id[i]);
        cr_assert_str_eq(e->case_id, case_id);
        cr_assert_str_eq(e->to, "imaging.ct");
        cr_assert_eq(e->priority, MEDLINK__V1__PRIORITY__PRIORITY_URGENT, "the consult's");
        const Medlink__V1__ImagingChunk *ch = e->imaging_chunk;
        cr_assert_eq(ch->object_index, want_obj);
        cr_assert_eq(ch->chunk_index, want_chunk);
        cr_assert_eq(ch->offset, (uint64_t)want_chunk * CHUNK);
        cr_assert_str_eq(ch->study_instance_uid, STUDY);
        /* The data are the bytes of the file at that offset. */
        char blob[1500];
        snprintf(blob, sizeof blob, "%s/blobs/%s/%u.dcm", s_clinic.data, case_id, want_obj);
        uint8_t *data = NULL;
        size_t len = 0;
        char sha[ML_SHA256_HEX + 1];
        cr_assert_eq(ml_imaging_read_chunk(blob, CHUNK, want_chunk, &data, &len, sha), 0);
        cr_assert_eq(ch->data.len, len);
        cr_assert_eq(memcmp(ch->data.data, data, len), 0);
        cr_assert_str_eq(ch->sha256, sha);
        free(data);
        ml_env_free(&e);
        free(b.blob);
        if (++want_chunk == o->chunks) {
            want_chunk = 0;
            want_obj++;
        }
    }
    cr_assert_eq(want_obj, 3, "every chunk of every object, in order");
    ml_env_free(&consult);
}

static char *rejected_reason(const char *name)
{
    char p[1500];
    snprintf(p, sizeof p, "%s/rejected/%s.error", s_clinic.spool, name);
    return slurp(p, NULL);
}

Test(aimg, non_dicom_file_rejects_the_consult)
{
    drop_study("mixed", s_sizes, NULL);
    char p[1500];
    snprintf(p, sizeof p, "%s/outbox/mixed.d/notes.dcm", s_clinic.spool);
    const char *text = "Patient is anxious; please call the family.\n";
    cr_assert_eq(ml_write_file_atomic(p, text, strlen(text)), 0);
    /* Renaming the json again makes the scan see it after the new file. */
    stage();

    char *why = rejected_reason("mixed.json");
    cr_assert(why, "no rejected/mixed.json.error");
    cr_assert(strstr(why, "notes.dcm") && strstr(why, "not a DICOM Part 10 file"), "%s", why);
    free(why);
    cr_assert(pathf_exists(s_clinic.spool, "rejected", "mixed.json"));
    cr_assert(pathf_exists(s_clinic.spool, "rejected", "mixed.d"), "the folder goes along");
    cr_assert(!pathf_exists(s_clinic.spool, "pending", "mixed.json"));
    int64_t n = -1;
    cr_assert_eq(ml_astore_outbox_count(s_clinic.st, -1, &n), 0);
    cr_assert_eq(n, 0, "nothing is stored");
    char blobs[900];
    snprintf(blobs, sizeof blobs, "%s/blobs", s_clinic.data);
    cr_assert_leq(count_entries(blobs), 0, "no blob copies are left");
}

Test(aimg, missing_folder_or_foreign_study_rejects)
{
    char p[1500];
    char json[4096];
    snprintf(json, sizeof json, CONSULT_JSON, "");
    snprintf(p, sizeof p, "%s/outbox/nofolder.json", s_clinic.spool);
    cr_assert_eq(ml_write_file_atomic(p, json, strlen(json)), 0);
    stage();
    char *why = rejected_reason("nofolder.json");
    cr_assert(why && strstr(why, "no folder nofolder.d"), "%s", why);
    free(why);

    /* The consult names another study than its files. */
    drop_study("other", s_sizes, ", \"studyInstanceUid\": \"1.2.3.4.5\", \"modality\": \"CT\"");
    stage();
    why = rejected_reason("other.json");
    cr_assert(why && strstr(why, "differs") && strstr(why, "1.2.3.4.5"), "%s", why);
    free(why);

    /* Two studies in one folder. */
    drop_study("two", s_sizes, NULL);
    snprintf(p, sizeof p, "%s/outbox/two.d/ZZ.dcm", s_clinic.spool);
    write_dicom(p, "1.2.3.9", "1.2.3.999", 100, 1);
    stage();
    why = rejected_reason("two.json");
    cr_assert(why && strstr(why, "ZZ.dcm") && strstr(why, "1.2.3.999"), "%s", why);
    free(why);
    int64_t n = -1;
    cr_assert_eq(ml_astore_outbox_count(s_clinic.st, -1, &n), 0);
    cr_assert_eq(n, 0);
}

Test(aimg, listed_objects_must_match_the_files)
{
    drop_study("listed", s_sizes,
               ", \"object\": [{\"fileName\": \"IM0003.dcm\"}, {\"fileName\": \"IM0001.dcm\"}, "
               "{\"fileName\": \"IM0002.dcm\"}]");
    stage();
    ml_envelope_t *e = the_consult();
    cr_assert_str_eq(e->imaging_consult->object[0]->file_name, "IM0003.dcm",
                     "the consult's own order is kept");
    cr_assert_str_eq(e->imaging_consult->object[1]->file_name, "IM0001.dcm");
    ml_env_free(&e);

    drop_study("wrong", s_sizes,
               ", \"object\": [{\"fileName\": \"IM0001.dcm\"}, {\"fileName\": \"IM0002.dcm\"}, "
               "{\"fileName\": \"IM0009.dcm\"}]");
    stage();
    char *why = rejected_reason("wrong.json");
    cr_assert(why && strstr(why, "IM0009.dcm"), "%s", why);
    free(why);
}

Test(aimg, consult_refused_takes_its_chunks_and_blobs)
{
    drop_study("refused", s_sizes, NULL);
    stage();
    ml_envelope_t *e = the_consult();
    settle(&s_clinic, e->id, 0,
           "NACK_FORBIDDEN: role TOWNSHIP_CLINIC may not send IMAGING_CONSULT");
    int64_t pending = -1;
    cr_assert_eq(ml_astore_outbox_count(s_clinic.st, ML_OUTBOX_PENDING, &pending), 0);
    cr_assert_eq(pending, 0, "the held chunks are refused with their consult");
    cr_assert(pathf_exists(s_clinic.spool, "rejected", "refused.json"));
    cr_assert(pathf_exists(s_clinic.spool, "rejected", "refused.d"));
    char blobs[1200];
    snprintf(blobs, sizeof blobs, "%s/blobs/%s", s_clinic.data, e->case_id);
    cr_assert(!exists(blobs), "blob copies deleted");
    ml_aimg_progress_t p;
    cr_assert_eq(ml_aimg_progress(s_clinic.img, e->case_id, &p), 0);
    cr_assert_eq(p.refused, p.chunks);
    ml_env_free(&e);
}

Test(aimg, resume_after_reopen_starts_at_the_first_chunk_not_accepted)
{
    char case_id[160];
    staged_and_accepted(case_id);
    rows_t c = stream(&s_clinic, ML_OUTBOX_CHUNKS);
    cr_assert_gt(c.n, 4);
    /* The broker accepted the first three chunks, then the link (or the
     * agent) went down. */
    for (int i = 0; i < 3; i++)
        settle(&s_clinic, c.id[i], 1, NULL);
    node_close(&s_clinic);
    node_open(&s_clinic);

    rows_t r = stream(&s_clinic, ML_OUTBOX_CHUNKS);
    cr_assert_eq(r.n, c.n - 3);
    cr_assert_str_eq(r.id[0], c.id[3], "resumes at the fourth chunk, not at zero");
    ml_aimg_progress_t p;
    cr_assert_eq(ml_aimg_progress(s_clinic.img, case_id, &p), 0);
    cr_assert(p.consult_accepted);
    cr_assert_eq(p.accepted, 3);
    /* The first object is three chunks: all of it is accepted, sending
     * resumes at the second object's first chunk. */
    ml_envelope_t *e = the_consult();
    cr_assert_eq(e->imaging_consult->object[0]->chunks, 3);
    cr_assert_eq(p.accepted_bytes, e->imaging_consult->object[0]->size);
    ml_env_free(&e);
    cr_assert(p.has_next);
    cr_assert_eq(p.next_object, 1);
    cr_assert_eq(p.next_chunk, 0);
    ml_aimg_log_resume(s_clinic.img);
}

/* ---- tests: receiving side ---- */

static void assert_published(const char *case_id)
{
    char dir[1500], p[1700];
    snprintf(dir, sizeof dir, "%s/inbox/study-%s", s_centre.spool, case_id);
    cr_assert(exists(dir), "no %s", dir);
    cr_assert_eq(count_entries(dir), 4, "three objects and the manifest");
    for (int i = 1; i <= 3; i++) {
        char a[1500], b[1700], sa[ML_SHA256_HEX + 1], sb[ML_SHA256_HEX + 1];
        snprintf(a, sizeof a, "%s/blobs/%s/%d.dcm", s_clinic.data, case_id, i - 1);
        snprintf(b, sizeof b, "%s/IM%04d.dcm", dir, i);
        cr_assert_eq(ml_sha256_file(b, sb, NULL), 0, "no %s", b);
        if (ml_sha256_file(a, sa, NULL) == 0)
            cr_assert_str_eq(sa, sb);
    }
    snprintf(p, sizeof p, "%s/manifest.json", dir);
    char *text = slurp(p, NULL);
    cr_assert(text, "no manifest");
    json_t *m = json_loads(text, 0, NULL);
    cr_assert(m, "manifest is not JSON: %s", text);
    cr_assert_str_eq(json_string_value(json_object_get(m, "caseId")), case_id);
    cr_assert_str_eq(json_string_value(json_object_get(m, "studyInstanceUid")), STUDY);
    cr_assert_str_eq(json_string_value(json_object_get(m, "requestingNode")), CLINIC);
    cr_assert_str_eq(json_string_value(json_object_get(m, "modality")), "CT");
    cr_assert_str_eq(json_string_value(json_object_get(m, "bodyPart")), "CHEST");
    cr_assert_str_eq(json_string_value(json_object_get(m, "clinicalQuestion")),
                     "Nodule in the right upper lobe?");
    cr_assert_str_eq(json_string_value(json_object_get(json_object_get(m, "patient"), "name")),
                     "Wang Jianguo");
    json_t *objs = json_object_get(m, "objects");
    cr_assert_eq(json_array_size(objs), 3);
    for (size_t i = 0; i < 3; i++) {
        json_t *o = json_array_get(objs, i);
        char name[32], f[1700], sha[ML_SHA256_HEX + 1];
        uint64_t size = 0;
        snprintf(name, sizeof name, "IM%04zu.dcm", i + 1);
        cr_assert_str_eq(json_string_value(json_object_get(o, "fileName")), name);
        snprintf(f, sizeof f, "%s/%s", dir, name);
        cr_assert_eq(ml_sha256_file(f, sha, &size), 0);
        cr_assert_str_eq(json_string_value(json_object_get(o, "sha256")), sha);
        cr_assert_eq((uint64_t)json_integer_value(json_object_get(o, "size")), size);
        cr_assert(json_string_value(json_object_get(o, "sopInstanceUid")));
        cr_assert(json_string_value(json_object_get(o, "receivedAt")));
    }
    json_decref(m);
    free(text);
    /* The incoming files are gone; a hidden build folder is not left. */
    char inc[1500];
    snprintf(inc, sizeof inc, "%s/incoming/%s", s_centre.data, case_id);
    cr_assert(!exists(inc), "incoming files left behind");
}

/* The centre's pending messages of one kind, unpacked (caller frees). */
static int centre_outbox(int kind, ml_envelope_t **out, int max)
{
    rows_t m = stream(&s_centre, ML_OUTBOX_MESSAGES);
    int n = 0;
    for (int i = 0; i < m.n && n < max; i++) {
        ml_envelope_t *e = outbox_env(&s_centre, m.id[i]);
        if ((int)e->kind == kind)
            out[n++] = e;
        else
            ml_env_free(&e);
    }
    return n;
}

static int count_json(const char *dir)
{
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (strstr(e->d_name, ".json"))
            n++;
    if (d)
        closedir(d);
    return n;
}

Test(aimg, reassembly_out_of_order_with_duplicates_publishes_once)
{
    char case_id[160];
    staged_and_accepted(case_id);
    dlv_t consult = consult_delivery();
    cr_assert_eq(deliver(&s_centre, &consult, 1), 0);
    cr_assert(consult.ack);
    char inbox[900];
    snprintf(inbox, sizeof inbox, "%s/inbox", s_centre.spool);
    cr_assert_eq(count_json(inbox), 1, "the consult is in inbox/ as JSON");

    dlv_t ch[64];
    size_t n = chunk_deliveries(ch, 64);
    /* Last to first, in two batches, with the same delivery twice in the
     * first batch and again in the second (a broker resend). */
    dlv_t b1[64], b2[64];
    size_t n1 = 0, n2 = 0;
    for (size_t i = n; i-- > 0;) {
        if (i >= n / 2)
            b1[n1++] = ch[i];
        else
            b2[n2++] = ch[i];
    }
    b1[n1++] = ch[n - 1];
    b2[n2++] = ch[n - 1];
    cr_assert_eq(deliver(&s_centre, b1, n1), 0);
    for (size_t i = 0; i < n1; i++)
        cr_assert(b1[i].ack, "chunk %zu of batch 1 not acked", i);
    char dir[1500];
    snprintf(dir, sizeof dir, "%s/study-%s", inbox, case_id);
    cr_assert(!exists(dir), "published before every chunk came");
    cr_assert_eq(deliver(&s_centre, b2, n2), 0);
    for (size_t i = 0; i < n2; i++)
        cr_assert(b2[i].ack);
    assert_published(case_id);
    cr_assert_eq(count_json(inbox), 1, "no chunk ever becomes an inbox JSON file");

    /* IMAGING_STUDY_RECEIVED goes back to the clinic, same case, same
     * priority. */
    ml_envelope_t *u[4];
    cr_assert_eq(centre_outbox(MEDLINK__V1__KIND__KIND_IMAGING_UPDATE, u, 4), 1);
    cr_assert_str_eq(u[0]->to, CLINIC);
    cr_assert_str_eq(u[0]->case_id, case_id);
    cr_assert_eq(u[0]->priority, MEDLINK__V1__PRIORITY__PRIORITY_URGENT);
    cr_assert_eq(u[0]->imaging_update->status, MEDLINK__V1__IMAGING_STATUS__IMAGING_STUDY_RECEIVED);
    cr_assert_eq(u[0]->imaging_update->objects_received, 3);
    cr_assert_eq(u[0]->imaging_update->bytes_received, consult_total());
    ml_env_free(&u[0]);

    /* A late duplicate after publication is acked and changes nothing. */
    dlv_t late = ch[0];
    cr_assert_eq(deliver(&s_centre, &late, 1), 0);
    cr_assert(late.ack);
    cr_assert_eq(centre_outbox(MEDLINK__V1__KIND__KIND_IMAGING_UPDATE, u, 4), 1);
    ml_env_free(&u[0]);
    dlv_free(ch, n);
    dlv_free(&consult, 1);
}

/* Flips a byte of a chunk's data but keeps its declared digest. */
static void damage(dlv_t *d)
{
    ml_envelope_t *e = NULL;
    cr_assert_eq(ml_env_unpack(d->env.blob, d->env.len, &e), 0);
    e->imaging_chunk->data.data[e->imaging_chunk->data.len / 2] ^= 0x40;
    free(d->env.blob);
    d->env = pack(e);
    ml_env_free(&e);
}

Test(aimg, damaged_chunk_is_asked_for_again_and_resent_from_the_blob)
{
    char case_id[160];
    staged_and_accepted(case_id);
    dlv_t consult = consult_delivery();
    cr_assert_eq(deliver(&s_centre, &consult, 1), 0);
    dlv_t ch[64];
    size_t n = chunk_deliveries(ch, 64);
    damage(&ch[2]);
    cr_assert_eq(deliver(&s_centre, ch, n), 0);
    for (size_t i = 0; i < n; i++)
        cr_assert(ch[i].ack, "a damaged chunk is handled, so acked");
    char dir[1500];
    snprintf(dir, sizeof dir, "%s/inbox/study-%s", s_centre.spool, case_id);
    cr_assert(!exists(dir));

    /* The centre asks the clinic for that chunk, same case and priority. */
    ml_envelope_t *r[4];
    cr_assert_eq(centre_outbox(MEDLINK__V1__KIND__KIND_IMAGING_RESEND, r, 4), 1);
    cr_assert_str_eq(r[0]->to, CLINIC);
    cr_assert_str_eq(r[0]->case_id, case_id);
    cr_assert_eq(r[0]->priority, MEDLINK__V1__PRIORITY__PRIORITY_URGENT);
    ml_envelope_t *bad = NULL;
    cr_assert_eq(ml_env_unpack(ch[2].env.blob, ch[2].env.len, &bad), 0);
    cr_assert_eq(r[0]->imaging_resend->object_index, bad->imaging_chunk->object_index);
    cr_assert_eq(r[0]->imaging_resend->n_chunk_index, 1);
    cr_assert_eq(r[0]->imaging_resend->chunk_index[0], bad->imaging_chunk->chunk_index);

    /* Delivered to the clinic (as the broker would, from the centre), it
     * queues the chunk again under a fresh id; no inbox file is written. */
    rows_t before = stream(&s_clinic, ML_OUTBOX_CHUNKS);
    for (int i = 0; i < before.n; i++)
        settle(&s_clinic, before.id[i], 1, NULL);
    free(r[0]->from);
    r[0]->from = strdup(CENTRE);
    dlv_t rs = dlv_of(pack(r[0]));
    cr_assert_eq(deliver(&s_clinic, &rs, 1), 0);
    cr_assert(rs.ack);
    char cin[900];
    snprintf(cin, sizeof cin, "%s/inbox", s_clinic.spool);
    cr_assert_eq(count_json(cin), 0, "a resend request is not for the hospital system");
    rows_t again = stream(&s_clinic, ML_OUTBOX_CHUNKS);
    cr_assert_eq(again.n, 1);
    cr_assert_str_neq(again.id[0], ch[2].id, "a new message, not the old one");
    dlv_t fix = dlv_of(build_chunk(again.id[0]));
    ml_envelope_t *fe = NULL;
    cr_assert_eq(ml_env_unpack(fix.env.blob, fix.env.len, &fe), 0);
    cr_assert_eq(fe->imaging_chunk->chunk_index, bad->imaging_chunk->chunk_index);
    ml_env_free(&fe);
    cr_assert_eq(deliver(&s_centre, &fix, 1), 0);
    assert_published(case_id);

    ml_env_free(&bad);
    ml_env_free(&r[0]);
    dlv_free(&fix, 1);
    dlv_free(&rs, 1);
    dlv_free(ch, n);
    dlv_free(&consult, 1);
}

Test(aimg, object_digest_mismatch_asks_for_the_whole_object)
{
    char case_id[160];
    staged_and_accepted(case_id);
    /* A consult whose declared digest of object 1 is wrong, while every
     * chunk is right on its own. */
    ml_envelope_t *e = the_consult();
    char *sha = e->imaging_consult->object[1]->sha256;
    sha[0] = sha[0] == '0' ? '1' : '0';
    dlv_t consult = dlv_of(pack(e));
    uint32_t chunks1 = e->imaging_consult->object[1]->chunks;
    ml_env_free(&e);
    cr_assert_eq(deliver(&s_centre, &consult, 1), 0);
    dlv_t ch[64];
    size_t n = chunk_deliveries(ch, 64);
    cr_assert_eq(deliver(&s_centre, ch, n), 0);

    ml_envelope_t *r[4];
    cr_assert_eq(centre_outbox(MEDLINK__V1__KIND__KIND_IMAGING_RESEND, r, 4), 1);
    cr_assert_eq(r[0]->imaging_resend->object_index, 1);
    cr_assert_eq(r[0]->imaging_resend->n_chunk_index, chunks1, "every chunk of the object");
    ml_env_free(&r[0]);
    char dir[1500];
    snprintf(dir, sizeof dir, "%s/inbox/study-%s", s_centre.spool, case_id);
    cr_assert(!exists(dir), "not published with a bad object");
    /* The object's chunks are forgotten: sent again, they are taken again
     * (and fail again, so the centre asks again). */
    cr_assert_eq(deliver(&s_centre, ch, n), 0);
    cr_assert_eq(centre_outbox(MEDLINK__V1__KIND__KIND_IMAGING_RESEND, r, 4), 2);
    ml_env_free(&r[0]);
    ml_env_free(&r[1]);
    /* The third failure ends the consult: REJECTED goes to the clinic. */
    cr_assert_eq(deliver(&s_centre, ch, n), 0);
    ml_envelope_t *u[4];
    cr_assert_eq(centre_outbox(MEDLINK__V1__KIND__KIND_IMAGING_UPDATE, u, 4), 1);
    cr_assert_eq(u[0]->imaging_update->status, MEDLINK__V1__IMAGING_STATUS__IMAGING_REJECTED);
    cr_assert(strstr(u[0]->imaging_update->reason, "SHA-256"), "%s", u[0]->imaging_update->reason);
    ml_env_free(&u[0]);
    dlv_free(ch, n);
    dlv_free(&consult, 1);
}

Test(aimg, chunks_before_their_consult_wait_for_it)
{
    char case_id[160];
    staged_and_accepted(case_id);
    dlv_t ch[64];
    size_t n = chunk_deliveries(ch, 64);
    cr_assert_eq(deliver(&s_centre, ch, n), 0);
    for (size_t i = 0; i < n; i++)
        cr_assert(ch[i].ack, "kept, so acked");
    ml_istore_t *is = NULL;
    char err[256];
    cr_assert_eq(ml_istore_open(s_centre.st, &is, err, sizeof err), 0, "%s", err);
    int64_t orphans = 0;
    cr_assert_eq(ml_istore_orphan_count(is, &orphans), 0);
    cr_assert_eq(orphans, (int64_t)n);
    dlv_t consult = consult_delivery();
    cr_assert_eq(deliver(&s_centre, &consult, 1), 0);
    assert_published(case_id);
    cr_assert_eq(ml_istore_orphan_count(is, &orphans), 0);
    cr_assert_eq(orphans, 0);
    ml_istore_destroy(&is);
    dlv_free(ch, n);
    dlv_free(&consult, 1);
}

Test(aimg, consult_and_chunks_in_one_batch)
{
    char case_id[160];
    staged_and_accepted(case_id);
    dlv_t d[64];
    d[0] = consult_delivery();
    size_t n = 1 + chunk_deliveries(d + 1, 63);
    cr_assert_eq(deliver(&s_centre, d, n), 0);
    for (size_t i = 0; i < n; i++)
        cr_assert(d[i].ack);
    assert_published(case_id);
    dlv_free(d, n);
}

Test(aimg, crash_between_chunk_write_and_record_loses_nothing)
{
    char case_id[160];
    staged_and_accepted(case_id);
    dlv_t consult = consult_delivery();
    cr_assert_eq(deliver(&s_centre, &consult, 1), 0);
    dlv_t ch[64];
    size_t n = chunk_deliveries(ch, 64);
    cr_assert_eq(deliver(&s_centre, ch, 2), 0);
    /* A crash left garbage where the third chunk goes (written, never
     * recorded, never acked); the agent restarts. */
    char part[1500];
    snprintf(part, sizeof part, "%s/incoming/%s/0.part", s_centre.data, case_id);
    FILE *f = fopen(part, "r+b");
    cr_assert(f, "no %s", part);
    fseek(f, 2 * CHUNK, SEEK_SET);
    for (unsigned i = 0; i < CHUNK; i++)
        fputc(0xEE, f);
    fclose(f);
    node_close(&s_centre);
    node_open(&s_centre);
    /* The broker delivers everything not acked, and the first two again. */
    cr_assert_eq(deliver(&s_centre, ch, n), 0);
    assert_published(case_id);
    dlv_free(ch, n);
    dlv_free(&consult, 1);
}

Test(aimg, interrupted_publication_is_finished_at_start_up)
{
    char case_id[160];
    staged_and_accepted(case_id);
    dlv_t consult = consult_delivery();
    cr_assert_eq(deliver(&s_centre, &consult, 1), 0);
    /* Something in the way of the study folder: publication fails. */
    char block[1500];
    snprintf(block, sizeof block, "%s/inbox/study-%s", s_centre.spool, case_id);
    cr_assert_eq(ml_write_file_atomic(block, "x", 1), 0);
    dlv_t ch[64];
    size_t n = chunk_deliveries(ch, 64);
    cr_assert_eq(deliver(&s_centre, ch, n), 0);
    for (size_t i = 0; i < n; i++)
        cr_assert(ch[i].ack, "the chunks are safe even if publishing is not done");
    ml_envelope_t *u[4];
    cr_assert_eq(centre_outbox(MEDLINK__V1__KIND__KIND_IMAGING_UPDATE, u, 4), 0);
    char hidden[1500];
    snprintf(hidden, sizeof hidden, "%s/inbox/.study-%s.tmp", s_centre.spool, case_id);
    cr_assert(!exists(hidden), "the half-built folder is cleaned up");
    unlink(block);
    node_close(&s_centre);
    node_open(&s_centre);
    assert_published(case_id);
    cr_assert_eq(centre_outbox(MEDLINK__V1__KIND__KIND_IMAGING_UPDATE, u, 4), 1);
    ml_env_free(&u[0]);

    /* A crash after the rename but before the record: the folder stands,
     * the transfer still says receiving. Start-up records it, once. */
    ml_istore_t *is = NULL;
    char err[256];
    cr_assert_eq(ml_istore_open(s_centre.st, &is, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ml_istore_in_set_state(is, case_id, ML_IMG_IN_RECEIVING, NULL, NULL, 1), 0);
    ml_istore_destroy(&is);
    node_close(&s_centre);
    node_open(&s_centre);
    assert_published(case_id);
    cr_assert_eq(centre_outbox(MEDLINK__V1__KIND__KIND_IMAGING_UPDATE, u, 4), 2);
    ml_env_free(&u[0]);
    ml_env_free(&u[1]);
    dlv_free(ch, n);
    dlv_free(&consult, 1);
}

/* Sends an ImagingUpdate or report from the centre to the clinic. */
static void to_clinic(const char *case_id, Medlink__V1__ImagingUpdate *u,
                      Medlink__V1__ImagingReport *rep)
{
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = id;
    e.case_id = (char *)case_id;
    e.from = CENTRE;
    e.to = CLINIC;
    e.created_at = ml_now_ms();
    if (u) {
        e.kind = MEDLINK__V1__KIND__KIND_IMAGING_UPDATE;
        e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_UPDATE;
        e.imaging_update = u;
    } else {
        e.kind = MEDLINK__V1__KIND__KIND_IMAGING_REPORT;
        e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_REPORT;
        e.imaging_report = rep;
    }
    dlv_t d = dlv_of(pack(&e));
    cr_assert_eq(deliver(&s_clinic, &d, 1), 0);
    cr_assert(d.ack);
    dlv_free(&d, 1);
}

Test(aimg, report_ends_the_case_and_deletes_the_blob_copies)
{
    char case_id[160];
    staged_and_accepted(case_id);
    Medlink__V1__ImagingUpdate as = MEDLINK__V1__IMAGING_UPDATE__INIT;
    as.status = MEDLINK__V1__IMAGING_STATUS__IMAGING_ASSIGNED;
    as.assigned_to = CENTRE;
    to_clinic(case_id, &as, NULL);
    char blobs[1200];
    snprintf(blobs, sizeof blobs, "%s/blobs/%s", s_clinic.data, case_id);
    cr_assert(exists(blobs), "an assignment does not end the case");

    Medlink__V1__Clinician reader = MEDLINK__V1__CLINICIAN__INIT;
    reader.name = "Dr. Chen Jing";
    Medlink__V1__ImagingReport rep = MEDLINK__V1__IMAGING_REPORT__INIT;
    rep.study_instance_uid = STUDY;
    rep.impression = "8 mm solid nodule, right upper lobe; follow-up CT in 3 months.";
    rep.reader = &reader;
    rep.signed_at = ml_now_ms();
    to_clinic(case_id, NULL, &rep);
    cr_assert(!exists(blobs), "blob copies deleted once the report is stored");
    char inbox[900];
    snprintf(inbox, sizeof inbox, "%s/inbox", s_clinic.spool);
    cr_assert_eq(count_json(inbox), 2, "the assignment and the report are for the hospital");
    int64_t pending = -1;
    cr_assert_eq(ml_astore_outbox_count(s_clinic.st, ML_OUTBOX_PENDING, &pending), 0);
    cr_assert_eq(pending, 0, "unsent chunks are dropped");
    /* A restart does not bring them back. */
    node_close(&s_clinic);
    node_open(&s_clinic);
    cr_assert(!exists(blobs));
}

Test(aimg, cancel_sent_by_the_clinic_ends_the_case)
{
    char case_id[160];
    staged_and_accepted(case_id);
    char json[1024], p[1200];
    snprintf(json, sizeof json,
             "{\"caseId\": \"%s\", \"to\": \"imaging.ct\", \"imagingUpdate\": {\"status\": "
             "\"IMAGING_CANCELLED\", \"reason\": \"patient transferred to the county hospital\"}}",
             case_id);
    snprintf(p, sizeof p, "%s/outbox/cancel.json", s_clinic.spool);
    cr_assert_eq(ml_write_file_atomic(p, json, strlen(json)), 0);
    ml_spool_scan_stats_t st;
    cr_assert_eq(ml_spool_scan(s_clinic.sp, 100, &st), 0);
    cr_assert_eq(st.queued, 1);
    char blobs[1200];
    snprintf(blobs, sizeof blobs, "%s/blobs/%s", s_clinic.data, case_id);
    cr_assert(!exists(blobs));
    cr_assert_eq(stream(&s_clinic, ML_OUTBOX_CHUNKS).n, 0, "no chunk goes after a cancel");
    cr_assert_eq(stream(&s_clinic, ML_OUTBOX_MESSAGES).n, 1, "the cancellation itself goes");
}

Test(aimg, critical_report_goes_as_emergency)
{
    char p[1200];
    const char *json =
        "{\"to\": \"township.xinzhan.clinic\", \"caseId\": \"01JDB3W5Q3T0S8R9K7N6M5P4Z2\", "
        "\"imagingReport\": {\"studyInstanceUid\": \"1.2.3.4\", \"impression\": \"Tension "
        "pneumothorax, left.\", \"reader\": {\"name\": \"Dr. Chen Jing\"}, \"signedAt\": "
        "\"1795354608123\", \"criticalFinding\": true}}";
    snprintf(p, sizeof p, "%s/outbox/report.json", s_centre.spool);
    cr_assert_eq(ml_write_file_atomic(p, json, strlen(json)), 0);
    ml_spool_scan_stats_t st;
    cr_assert_eq(ml_spool_scan(s_centre.sp, 100, &st), 0);
    cr_assert_eq(st.queued, 1);
    ml_envelope_t *r[2];
    cr_assert_eq(centre_outbox(MEDLINK__V1__KIND__KIND_IMAGING_REPORT, r, 2), 1);
    cr_assert_eq(r[0]->priority, MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY);
    ml_env_free(&r[0]);
}

Test(aimg, message_stream_goes_before_chunks)
{
    char case_id[160];
    staged_and_accepted(case_id);
    /* A referral dropped in the middle of the study is its own stream. */
    char p[1200];
    const char *ref =
        "{\"to\": \"county.zhaozhou.hospital\", \"priority\": \"PRIORITY_EMERGENCY\", "
        "\"referral\": {\"patient\": {\"healthCardId\": \"130102195903127718\", \"name\": "
        "\"Li Si\"}, \"reason\": \"chest pain\"}}";
    snprintf(p, sizeof p, "%s/outbox/ref.json", s_clinic.spool);
    cr_assert_eq(ml_write_file_atomic(p, ref, strlen(ref)), 0);
    cr_assert_eq(ml_spool_scan(s_clinic.sp, 100, NULL), 0);
    rows_t m = stream(&s_clinic, ML_OUTBOX_MESSAGES);
    cr_assert_eq(m.n, 1);
    cr_assert_str_eq(m.file[0], "ref.json");
    rows_t c = stream(&s_clinic, ML_OUTBOX_CHUNKS);
    cr_assert_gt(c.n, 0);
    cr_assert_gt(m.seq[0], c.seq[c.n - 1],
                 "queued after every chunk, yet sent from its own "
                 "stream");
}

Test(aimg, old_database_is_migrated)
{
    node_close(&s_clinic);
    char db[800];
    snprintf(db, sizeof db, "%s/old.db", s_dir);
    sqlite3 *h = NULL;
    cr_assert_eq(sqlite3_open(db, &h), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(h,
                              "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, id "
                              "TEXT UNIQUE NOT NULL, file_name TEXT, envelope BLOB NOT NULL, "
                              "state INTEGER NOT NULL DEFAULT 0, reason TEXT, created_at "
                              "INTEGER NOT NULL, updated_at INTEGER NOT NULL);"
                              "INSERT INTO outbox (id, file_name, envelope, created_at, "
                              "updated_at) VALUES ('01HZX3NDEKTSV4RRFFQ69G5FAV', 'a.json', "
                              "x'00', 1, 1);",
                              NULL, NULL, NULL),
                 SQLITE_OK);
    sqlite3_close(h);
    ml_astore_t *st = NULL;
    char err[256];
    cr_assert_eq(ml_astore_open(db, &st, err, sizeof err), 0, "%s", err);
    rows_t r = {0};
    cr_assert_eq(ml_astore_outbox_next(st, ML_OUTBOX_MESSAGES, 0, 10, row_cb, &r), 0);
    cr_assert_eq(r.n, 1, "the old pending row is still sent");
    cr_assert_str_eq(r.file[0], "a.json");
    ml_astore_destroy(&st);
    cr_assert_eq(ml_astore_open(db, &st, err, sizeof err), 0, "reopening is a no-op: %s", err);
    ml_astore_destroy(&st);
    node_open(&s_clinic);
}

Test(aimg, transfer_ends_when_cancelled_or_rejected)
{
    char case_id[160];
    staged_and_accepted(case_id);
    dlv_t consult = consult_delivery();
    cr_assert_eq(deliver(&s_centre, &consult, 1), 0);
    dlv_t ch[64];
    size_t n = chunk_deliveries(ch, 64);
    cr_assert_eq(deliver(&s_centre, ch, 2), 0);
    char inc[1500];
    snprintf(inc, sizeof inc, "%s/incoming/%s", s_centre.data, case_id);
    cr_assert(exists(inc));

    /* The clinic withdraws the consult; the broker passes it on. */
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    Medlink__V1__ImagingUpdate u = MEDLINK__V1__IMAGING_UPDATE__INIT;
    u.status = MEDLINK__V1__IMAGING_STATUS__IMAGING_CANCELLED;
    u.reason = "patient transferred";
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = id;
    e.case_id = case_id;
    e.from = CLINIC;
    e.to = CENTRE;
    e.kind = MEDLINK__V1__KIND__KIND_IMAGING_UPDATE;
    e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_UPDATE;
    e.imaging_update = &u;
    dlv_t c = dlv_of(pack(&e));
    cr_assert_eq(deliver(&s_centre, &c, 1), 0);
    cr_assert(!exists(inc), "incoming files deleted");
    /* Chunks still on their way are acked and dropped; nothing is
     * published. */
    cr_assert_eq(deliver(&s_centre, ch + 2, n - 2), 0);
    for (size_t i = 2; i < n; i++)
        cr_assert(ch[i].ack);
    char dir[1500];
    snprintf(dir, sizeof dir, "%s/inbox/study-%s", s_centre.spool, case_id);
    cr_assert(!exists(dir));
    cr_assert(!exists(inc));
    dlv_free(&c, 1);
    dlv_free(ch, n);
    dlv_free(&consult, 1);

    /* A second consult, which the reading centre's own system refuses.
     * (The broker took every chunk of the first.) */
    rows_t first = stream(&s_clinic, ML_OUTBOX_CHUNKS);
    for (int i = 0; i < first.n; i++)
        settle(&s_clinic, first.id[i], 1, NULL);
    drop_study("second", s_sizes, NULL);
    stage();
    ml_envelope_t *e2 = the_consult();
    char case2[160];
    snprintf(case2, sizeof case2, "%s", e2->case_id);
    settle(&s_clinic, e2->id, 1, NULL);
    ml_env_free(&e2);
    consult = consult_delivery();
    cr_assert_eq(deliver(&s_centre, &consult, 1), 0);
    n = chunk_deliveries(ch, 64);
    cr_assert_eq(deliver(&s_centre, ch, 1), 0);
    snprintf(inc, sizeof inc, "%s/incoming/%s", s_centre.data, case2);
    cr_assert(exists(inc));
    char json[1024], p[1500];
    snprintf(json, sizeof json,
             "{\"caseId\": \"%s\", \"to\": \"" CLINIC "\", \"imagingUpdate\": {\"status\": "
             "\"IMAGING_REJECTED\", \"reason\": \"slice thickness too large to read\"}}",
             case2);
    snprintf(p, sizeof p, "%s/outbox/reject.json", s_centre.spool);
    cr_assert_eq(ml_write_file_atomic(p, json, strlen(json)), 0);
    ml_spool_scan_stats_t st;
    cr_assert_eq(ml_spool_scan(s_centre.sp, 100, &st), 0);
    cr_assert_eq(st.queued, 1);
    cr_assert(!exists(inc), "incoming files deleted");
    dlv_free(ch, n);
    dlv_free(&consult, 1);
}

Test(aimg, chunk_damaged_five_times_ends_the_consult)
{
    char case_id[160];
    staged_and_accepted(case_id);
    dlv_t consult = consult_delivery();
    cr_assert_eq(deliver(&s_centre, &consult, 1), 0);
    dlv_t ch[64];
    size_t n = chunk_deliveries(ch, 64);
    damage(&ch[1]);
    ml_envelope_t *u[4], *r[8];
    for (int i = 1; i <= 5; i++) {
        cr_assert_eq(deliver(&s_centre, &ch[1], 1), 0);
        cr_assert(ch[1].ack);
        int resends = centre_outbox(MEDLINK__V1__KIND__KIND_IMAGING_RESEND, r, 8);
        for (int k = 0; k < resends; k++)
            ml_env_free(&r[k]);
        cr_assert_eq(resends, i < 5 ? i : 4, "after %d damaged arrival(s)", i);
        int ups = centre_outbox(MEDLINK__V1__KIND__KIND_IMAGING_UPDATE, u, 4);
        cr_assert_eq(ups, i < 5 ? 0 : 1);
        if (ups) {
            cr_assert_eq(u[0]->imaging_update->status,
                         MEDLINK__V1__IMAGING_STATUS__IMAGING_REJECTED);
            cr_assert(strstr(u[0]->imaging_update->reason, "damaged 5 times"), "%s",
                      u[0]->imaging_update->reason);
            ml_env_free(&u[0]);
        }
    }
    char inc[1500];
    snprintf(inc, sizeof inc, "%s/incoming/%s", s_centre.data, case_id);
    cr_assert(!exists(inc));
    dlv_free(ch, n);
    dlv_free(&consult, 1);
}

/* ---- encryption at rest ---- */

static char s_key[3][700]; /* clinic, centre A, centre B */
static ml_keyring_t *s_ring_clinic, *s_ring_a, *s_ring_ba, *s_ring_b;

static ml_keyring_t *ring(const char *current, const char *old)
{
    ml_keyring_t *kr = NULL;
    char err[512];
    const char *olds[1] = {old};
    cr_assert_eq(ml_keyring_load(current, olds, old ? 1 : 0, &kr, err, sizeof err), 0, "%s", err);
    return kr;
}

static void s_sealed_setup(void)
{
    char err[512];
    ml_log_set_level(ML_LOG_ERROR);
    ml_test_tmpdir(s_dir, sizeof s_dir);
    static const char *const names[3] = {"clinic.key", "centre-a.key", "centre-b.key"};
    for (int i = 0; i < 3; i++) {
        snprintf(s_key[i], sizeof s_key[i], "%s/%s", s_dir, names[i]);
        cr_assert_eq(ml_keyring_generate_file(s_key[i], err, sizeof err), 0, "%s", err);
    }
    s_ring_clinic = ring(s_key[0], NULL);
    s_ring_a = ring(s_key[1], NULL);
    s_ring_ba = ring(s_key[2], s_key[1]);
    s_ring_b = ring(s_key[2], NULL);
    s_clinic.keys = s_ring_clinic;
    s_centre.keys = s_ring_a;
    node_t *nodes[2] = {&s_clinic, &s_centre};
    for (int i = 0; i < 2; i++) {
        node_t *n = nodes[i];
        snprintf(n->root, sizeof n->root, "%.512s/%.64s", s_dir, n->id);
        snprintf(n->spool, sizeof n->spool, "%.600s/spool", n->root);
        snprintf(n->data, sizeof n->data, "%.600s/data", n->root);
        node_open(n);
    }
}

static void s_sealed_teardown(void)
{
    node_close(&s_clinic);
    node_close(&s_centre);
    s_clinic.keys = s_centre.keys = NULL;
    ml_keyring_destroy(&s_ring_clinic);
    ml_keyring_destroy(&s_ring_a);
    ml_keyring_destroy(&s_ring_ba);
    ml_keyring_destroy(&s_ring_b);
    ml_test_sh("rm -rf '%s'", s_dir);
}

TestSuite(aimg_sealed, .init = s_sealed_setup, .fini = s_sealed_teardown);

/* What a consult carries that must not be found in clear in agent.db. */
static const char *const s_secrets[] = {
    "Wang Jianguo",                   /* the consult's patient */
    "WANG^JIANGUO",                   /* the DICOM header, in the first chunk */
    "130102195903127718",             /* health card number */
    "Nodule in the right upper lobe", /* clinical question */
    "Dr. Liu Fang",                   /* requesting doctor */
    STUDY,                            /* study, series and instance UIDs */
    "1.2.826.0.1.3680043.8.498.2002",
    "1.2.826.0.1.3680043.8.498.1001",
    "IM0001.dcm", /* object file names */
};
#define N_SECRETS (sizeof s_secrets / sizeof s_secrets[0])

/* The first secret found in n's agent.db or its WAL, or NULL. */
static const char *db_secret(const node_t *n)
{
    static const char *const sfx[] = {"", "-wal", "-journal"};
    for (size_t i = 0; i < sizeof sfx / sizeof sfx[0]; i++) {
        char p[900];
        size_t len = 0;
        snprintf(p, sizeof p, "%s/agent.db%s", n->data, sfx[i]);
        if (!exists(p))
            continue;
        char *data = slurp(p, &len);
        cr_assert(data, "cannot read %s", p);
        for (size_t k = 0; k < N_SECRETS; k++) {
            if (memmem(data, len, s_secrets[k], strlen(s_secrets[k]))) {
                free(data);
                return s_secrets[k];
            }
        }
        free(data);
    }
    return NULL;
}

static void assert_sealed(const node_t *n)
{
    const char *found = db_secret(n);
    cr_assert_null(found, "\"%s\" is in clear in %s/agent.db", found, n->data);
}

/* The reading centre's records, read back through the sealing. */
static void assert_centre_records(const char *case_id, int state)
{
    ml_istore_t *is = NULL;
    char err[256];
    cr_assert_eq(ml_istore_open(s_centre.st, &is, err, sizeof err), 0, "%s", err);
    ml_img_in_t t;
    cr_assert_eq(ml_istore_in_get(is, case_id, &t), 0);
    cr_assert_str_eq(t.study_uid, STUDY);
    cr_assert_eq(t.state, state);
    ml_img_obj_t o;
    cr_assert_eq(ml_istore_obj_get(is, case_id, 0, &o), 0);
    cr_assert_str_eq(o.file_name, "IM0001.dcm");
    cr_assert_str_eq(o.sop_uid, "1.2.826.0.1.3680043.8.498.1001");
    cr_assert_str_eq(o.series_uid, "1.2.826.0.1.3680043.8.498.2002");
    ml_istore_destroy(&is);
}

Test(aimg_sealed, whole_consult_leaves_nothing_in_clear)
{
    char case_id[160];
    staged_and_accepted(case_id);
    assert_sealed(&s_clinic);

    /* Chunks first: kept as orphans, and the first holds the DICOM
     * header with the patient's name. */
    dlv_t ch[64];
    size_t n = chunk_deliveries(ch, 64);
    cr_assert_eq(deliver(&s_centre, ch, n), 0);
    ml_istore_t *is = NULL;
    char err[256];
    int64_t orphans = 0;
    cr_assert_eq(ml_istore_open(s_centre.st, &is, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ml_istore_orphan_count(is, &orphans), 0);
    ml_istore_destroy(&is);
    cr_assert_eq(orphans, (int64_t)n);
    assert_sealed(&s_centre);

    /* The consult: the orphans are read back (opened) and reassembled;
     * the manifest is built from the sealed inbox row. */
    dlv_t consult = consult_delivery();
    cr_assert_eq(deliver(&s_centre, &consult, 1), 0);
    assert_published(case_id);
    assert_centre_records(case_id, ML_IMG_IN_PUBLISHED);
    assert_sealed(&s_centre);

    /* STUDY_RECEIVED goes back; the clinic ends the case (dropping what
     * was left to send, with a sealed reason). */
    ml_envelope_t *u[4];
    cr_assert_eq(centre_outbox(MEDLINK__V1__KIND__KIND_IMAGING_UPDATE, u, 4), 1);
    dlv_t back = dlv_of(pack(u[0]));
    ml_env_free(&u[0]);
    cr_assert_eq(deliver(&s_clinic, &back, 1), 0);
    assert_sealed(&s_clinic);

    /* Closed and reopened (WAL checkpointed into the file): still nothing
     * in clear, and everything still reads. */
    node_close(&s_clinic);
    node_close(&s_centre);
    assert_sealed(&s_clinic);
    assert_sealed(&s_centre);
    node_open(&s_clinic);
    node_open(&s_centre);
    assert_centre_records(case_id, ML_IMG_IN_PUBLISHED);
    ml_aimg_progress_t p;
    cr_assert_eq(ml_aimg_progress(s_clinic.img, case_id, &p), 0);
    cr_assert(p.consult_accepted);
    dlv_free(&back, 1);
    dlv_free(ch, n);
    dlv_free(&consult, 1);
}

Test(aimg_sealed, refused_consult_and_cancel_reason_are_sealed)
{
    /* A refused consult takes its held chunks with it (one sealed reason
     * per row). */
    drop_study("refused", s_sizes, NULL);
    stage();
    ml_envelope_t *e = the_consult();
    settle(&s_clinic, e->id, 0, "NACK_FORBIDDEN: Wang Jianguo's clinic may not send this");
    int64_t pending = -1;
    cr_assert_eq(ml_astore_outbox_count(s_clinic.st, ML_OUTBOX_PENDING, &pending), 0);
    cr_assert_eq(pending, 0, "the held chunks are refused with their consult");
    ml_aimg_progress_t p;
    cr_assert_eq(ml_aimg_progress(s_clinic.img, e->case_id, &p), 0);
    cr_assert_eq(p.refused, p.chunks);
    ml_env_free(&e);
    assert_sealed(&s_clinic);

    /* A transfer the clinic withdraws, with a reason quoting the patient. */
    char case_id[160];
    staged_and_accepted(case_id);
    dlv_t consult = consult_delivery();
    cr_assert_eq(deliver(&s_centre, &consult, 1), 0);
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    Medlink__V1__ImagingUpdate u = MEDLINK__V1__IMAGING_UPDATE__INIT;
    u.status = MEDLINK__V1__IMAGING_STATUS__IMAGING_CANCELLED;
    u.reason = "Wang Jianguo was transferred to the county hospital";
    ml_envelope_t c = MEDLINK__V1__ENVELOPE__INIT;
    c.id = id;
    c.case_id = case_id;
    c.from = CLINIC;
    c.to = CENTRE;
    c.kind = MEDLINK__V1__KIND__KIND_IMAGING_UPDATE;
    c.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_UPDATE;
    c.imaging_update = &u;
    dlv_t d = dlv_of(pack(&c));
    cr_assert_eq(deliver(&s_centre, &d, 1), 0);
    ml_istore_t *is = NULL;
    char err[256];
    ml_img_in_t t;
    cr_assert_eq(ml_istore_open(s_centre.st, &is, err, sizeof err), 0, "%s", err);
    cr_assert_eq(ml_istore_in_get(is, case_id, &t), 0);
    ml_istore_destroy(&is);
    cr_assert_eq(t.state, ML_IMG_IN_CANCELLED);
    cr_assert(strstr(t.reason, "transferred to the county hospital"), "%s", t.reason);
    assert_sealed(&s_centre);
    dlv_free(&d, 1);
    dlv_free(&consult, 1);
}

Test(aimg_sealed, transfer_begun_in_clear_finishes_sealed_and_survives_rotation)
{
    /* The reading centre runs without a key at first. */
    node_close(&s_centre);
    ml_test_sh("rm -rf '%s'", s_centre.root);
    s_centre.keys = NULL;
    node_open(&s_centre);
    char case_id[160];
    staged_and_accepted(case_id);
    dlv_t consult = consult_delivery();
    cr_assert_eq(deliver(&s_centre, &consult, 1), 0);
    dlv_t ch[64];
    size_t n = chunk_deliveries(ch, 64);
    cr_assert_gt(n, 4);
    cr_assert_eq(deliver(&s_centre, ch, 2), 0);
    node_close(&s_centre);
    cr_assert_not_null(db_secret(&s_centre), "in clear without a key");

    /* store_key is set: the rows written in clear are sealed at start-up,
     * and the transfer carries on. */
    s_centre.keys = s_ring_a;
    node_open(&s_centre);
    assert_sealed(&s_centre);
    assert_centre_records(case_id, ML_IMG_IN_RECEIVING);
    cr_assert_eq(deliver(&s_centre, ch + 2, 2), 0);
    assert_sealed(&s_centre);

    /* Rotation: B current, A old; then B alone. */
    node_close(&s_centre);
    s_centre.keys = s_ring_ba;
    node_open(&s_centre);
    assert_centre_records(case_id, ML_IMG_IN_RECEIVING);
    cr_assert_eq(deliver(&s_centre, ch + 4, n - 4), 0);
    assert_published(case_id);
    node_close(&s_centre);
    s_centre.keys = s_ring_b;
    node_open(&s_centre);
    assert_centre_records(case_id, ML_IMG_IN_PUBLISHED);
    assert_sealed(&s_centre);

    /* A alone no longer opens it, and says which key is missing. */
    node_close(&s_centre);
    char db[900], err[512];
    snprintf(db, sizeof db, "%s/agent.db", s_centre.data);
    ml_astore_t *st = NULL;
    cr_assert_eq(ml_astore_open_sealed(db, s_ring_a, &st, err, sizeof err), ML_ECONFIG);
    cr_assert(strstr(err, ml_keyring_current_id(s_ring_b)), "%s", err);
    node_open(&s_centre);
    dlv_free(ch, n);
    dlv_free(&consult, 1);
}

Test(aimg_sealed, old_database_is_migrated_and_sealed)
{
    node_close(&s_clinic);
    char db[800];
    snprintf(db, sizeof db, "%s/old.db", s_dir);
    sqlite3 *h = NULL;
    cr_assert_eq(sqlite3_open(db, &h), SQLITE_OK);
    cr_assert_eq(sqlite3_exec(h,
                              "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, id "
                              "TEXT UNIQUE NOT NULL, file_name TEXT, envelope BLOB NOT NULL, "
                              "state INTEGER NOT NULL DEFAULT 0, reason TEXT, created_at "
                              "INTEGER NOT NULL, updated_at INTEGER NOT NULL);"
                              "INSERT INTO outbox (id, file_name, envelope, created_at, "
                              "updated_at) VALUES ('01HZX3NDEKTSV4RRFFQ69G5FAV', 'a.json', "
                              "x'0a1a4f6c64', 1, 1);",
                              NULL, NULL, NULL),
                 SQLITE_OK);
    sqlite3_close(h);
    ml_astore_t *st = NULL;
    char err[256];
    cr_assert_eq(ml_astore_open_sealed(db, s_ring_clinic, &st, err, sizeof err), 0, "%s", err);
    rows_t r = {0};
    cr_assert_eq(ml_astore_outbox_next(st, ML_OUTBOX_MESSAGES, 0, 10, row_cb, &r), 0);
    cr_assert_eq(r.n, 1, "the old pending row is still sent");
    packed_t pk = {0};
    cr_assert_eq(ml_astore_outbox_get(st, r.id[0], copy_env_cb, &pk), 1);
    cr_assert_eq(pk.len, 5);
    cr_assert_eq(memcmp(pk.blob, "\x0a\x1aOld", 5), 0, "read back as it was stored");
    free(pk.blob);
    ml_astore_destroy(&st);

    /* Stored sealed now, and marked so: an agent without the key, or an
     * older one, will not take it for a clear store. */
    cr_assert_eq(sqlite3_open(db, &h), SQLITE_OK);
    sqlite3_stmt *q = NULL;
    cr_assert_eq(sqlite3_prepare_v2(h, "SELECT envelope FROM outbox", -1, &q, NULL), SQLITE_OK);
    cr_assert_eq(sqlite3_step(q), SQLITE_ROW);
    cr_assert(ml_is_sealed(sqlite3_column_blob(q, 0), (size_t)sqlite3_column_bytes(q, 0)));
    sqlite3_finalize(q);
    cr_assert_eq(sqlite3_prepare_v2(h, "PRAGMA user_version", -1, &q, NULL), SQLITE_OK);
    cr_assert_eq(sqlite3_step(q), SQLITE_ROW);
    cr_assert_eq(sqlite3_column_int(q, 0), 2);
    sqlite3_finalize(q);
    sqlite3_close(h);
    cr_assert_eq(ml_astore_open(db, &st, err, sizeof err), ML_ESTORE);
    cr_assert(strstr(err, "store_key"), "%s", err);
    node_open(&s_clinic);
}
