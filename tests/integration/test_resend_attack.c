/* Imaging resend and incoming-study limits (issue 9, F3 and F9), against
 * the real medlinkd and agents:
 *
 *   - F3: a compromised reading centre (a raw client with the centre's
 *     certificate) asks a real clinic agent for chunks again with 5,000
 *     indexes in one ImagingResend. The broker refuses indexes the consult
 *     does not declare; of valid duplicates the clinic sends each chunk
 *     once, and no more than the study's chunk count per resend window.
 *   - F3: over a slow uplink, a chunk asked for again while it is still in
 *     flight is not queued a second time;
 *   - F3: the broker checks every index against the stored consult and
 *     takes a resend only from the case's reading centre.
 *   - F9: a study whose chunks never complete is expired by the real
 *     reading centre agent after incoming_expire_s: its partial file goes,
 *     the clinic hears IMAGING_REJECTED, and the broker records the consult
 *     as a dead letter and escalates to the clinic. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <criterion/criterion.h>

#include "client.h"
#include "harness.h"
#include "study.h"
#include "ml_common.h"
#include "ml_imaging.h"

#define STUDY_UID "1.2.826.0.1.3680043.8.498.9001"
#define N_INDEXES 5000

static h_world_t W;

static void s_teardown(void)
{
    h_world_fini(&W);
}

TestSuite(security, .fini = s_teardown, .timeout = 300);

/* The study's image number index, with about `pixels` bytes of
 * pseudo-random pixel data (tests/common/study.h). */
static void s_write_dicom(const char *path, int index, size_t pixels)
{
    static const tc_dicom_t study = {.study_uid = STUDY_UID,
                                     .series_uid = "1.2.826.0.1.3680043.8.498.9002",
                                     .sop_prefix = "1.2.826.0.1.3680043.8.498.91",
                                     .patient = "ZHANG^WEI"};
    cr_assert_eq(tc_dicom_write(&study, path, index, pixels, NULL), 0, "cannot write %s: %s", path,
                 strerror(errno));
}

/* Drops a study of n files into the clinic's outbox (folder first, then
 * the JSON renamed in). */
static void s_drop_study(const char *clinic, const char *name, int n, size_t pixels)
{
    char dir[900], path[1200];
    h_spool(&W, clinic, "outbox", dir, sizeof dir);
    size_t len = strlen(dir);
    snprintf(dir + len, sizeof dir - len, "/%s.d", name);
    cr_assert_eq(ml_mkdirs(dir), 0);
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/IM%04d.dcm", dir, i + 1);
        s_write_dicom(path, i + 1, pixels);
    }
    char json[1024], file[200];
    snprintf(json, sizeof json,
             "{\"to\": \"%s\", \"priority\": \"PRIORITY_URGENT\", \"imagingConsult\": {"
             "\"patient\": {\"healthCardId\": \"130102196001017777\", \"name\": \"Zhang Wei\"},"
             "\"requestingDoctor\": {\"name\": \"Dr. Liu Fang\"}, \"bodyPart\": \"CHEST\","
             "\"clinicalQuestion\": \"Mass in the left lower lobe?\"}}",
             H_SERVICE_CT);
    snprintf(file, sizeof file, "%s.json", name);
    h_drop(&W, clinic, file, json);
}

/* ---- raw-client helpers ------------------------------------------------- */

/* Chunk deliveries the client has had for (object, chunk); -1 = any. */
static int s_count_chunks(const cli_t *c, int object, int chunk)
{
    int n = 0;
    for (int i = 0; i < c->n_got; i++) {
        const Medlink__V1__ImagingChunk *ch = c->got[i]->imaging_chunk;
        if (c->got[i]->payload_case != MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CHUNK)
            continue;
        if ((object < 0 || (int)ch->object_index == object) &&
            (chunk < 0 || (int)ch->chunk_index == chunk))
            n++;
    }
    return n;
}

static int s_has_chunks(cli_t *c, void *arg)
{
    return s_count_chunks(c, -1, -1) >= *(int *)arg;
}

/* The first delivery with this payload, or NULL. */
static const ml_envelope_t *s_got(const cli_t *c, int payload_case)
{
    for (int i = 0; i < c->n_got; i++)
        if ((int)c->got[i]->payload_case == payload_case)
            return c->got[i];
    return NULL;
}

static int s_has_consult(cli_t *c, void *arg)
{
    return s_got(c, MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CONSULT) != NULL;
}

/* Sends an ImagingResend for object of case_id from c to `to` and returns
 * the broker's answer. */
static ml_envelope_t *s_resend(cli_t *c, const char *case_id, const char *to, uint32_t object,
                               uint32_t *idx, size_t n)
{
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    Medlink__V1__ImagingResend r = MEDLINK__V1__IMAGING_RESEND__INIT;
    r.object_index = object;
    r.chunk_index = idx;
    r.n_chunk_index = n;
    r.reason = "sha-256 mismatch";
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = id;
    e.case_id = (char *)case_id;
    e.kind = MEDLINK__V1__KIND__KIND_IMAGING_RESEND;
    e.from = c->node;
    e.to = (char *)to;
    e.priority = MEDLINK__V1__PRIORITY__PRIORITY_URGENT;
    e.created_at = ml_now_ms();
    e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_RESEND;
    e.imaging_resend = &r;
    ml_envelope_t *reply = cli_send_wait(c, &e);
    if (reply->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED)
        cli_expect_accepted(reply, id);
    return reply;
}

static const Medlink__V1__CaseInfo *s_case(cli_t *ops, const char *case_id)
{
    Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
    rq.op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_CASE_SHOW;
    rq.case_id = (char *)case_id;
    const Medlink__V1__AdminReply *rep = cli_admin(ops, &rq);
    cr_assert_eq(rep->status, 0, "case show %s: %s", case_id, rep->error);
    return rep->case_info;
}

/* Waits until c has had at least want chunk deliveries, then a quiet 3 s,
 * and returns the count: what was asked for and nothing more. */
static int s_settle_chunks(cli_t *c, int want)
{
    cr_assert(cli_run_until(c, s_has_chunks, &want, 30000), "only %d of %d chunk deliveries",
              s_count_chunks(c, -1, -1), want);
    int more = want + 1;
    cli_run_until(c, s_has_chunks, &more, 3000);
    return s_count_chunks(c, -1, -1);
}

/* ---- F3 ----------------------------------------------------------------- */

Test(security, f3_resend_indexes_deduped_and_bounded)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_XINZHAN);
    /* The reading centre is a raw client: it acknowledges what it gets and
     * sends whatever it likes, as a compromised centre would. */
    cli_t rc, ops;
    cli_open(&rc, &W, H_READ_A, 1);
    cli_open(&ops, &W, H_OPS, 0);

    /* Two objects of 600 KiB: 3 chunks of 256 KiB each. */
    s_drop_study(H_XINZHAN, "f3", 2, 600 * 1024);
    cr_assert(cli_run_until(&rc, s_has_consult, NULL, 30000), "no consult reached the centre");
    const ml_envelope_t *consult = s_got(&rc, MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CONSULT);
    char case_id[130];
    snprintf(case_id, sizeof case_id, "%s", consult->case_id);
    const Medlink__V1__ImagingConsult *ic = consult->imaging_consult;
    cr_assert_eq(ic->n_object, 2);
    uint32_t c0 = ic->object[0]->chunks, c1 = ic->object[1]->chunks;
    cr_assert_eq(c0, 3);
    cr_assert_eq(c1, 3);
    int total = (int)(c0 + c1);
    cr_assert_eq(s_settle_chunks(&rc, total), total);

    uint32_t *idx = malloc(N_INDEXES * sizeof *idx);
    cr_assert_not_null(idx);

    /* 5,000 indexes, one of them past the object's last chunk: the broker
     * refuses the record and names the index. */
    for (int i = 0; i < N_INDEXES; i++)
        idx[i] = (uint32_t)(i % 2);
    idx[4321] = c0;
    ml_envelope_t *r = s_resend(&rc, case_id, H_XINZHAN, 0, idx, N_INDEXES);
    cli_expect_nack(r, MEDLINK__V1__NACK_CODE__NACK_INVALID, "imaging_resend.chunk_index[4321] 3");
    cli_expect_nack(r, MEDLINK__V1__NACK_CODE__NACK_INVALID, "has 3 chunk(s)");
    idx[4321] = 1000000;
    r = s_resend(&rc, case_id, H_XINZHAN, 0, idx, N_INDEXES);
    cli_expect_nack(r, MEDLINK__V1__NACK_CODE__NACK_INVALID, "imaging_resend.chunk_index[4321]");

    /* 5,000 valid duplicates of chunks 0 and 1: the clinic sends each once. */
    idx[4321] = 1;
    r = s_resend(&rc, case_id, H_XINZHAN, 0, idx, N_INDEXES);
    cr_assert_eq(r->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED);
    int got = s_settle_chunks(&rc, total + 2);
    cr_assert_eq(got, total + 2, "5,000 duplicate indexes made the clinic send %d chunks",
                 got - total);
    cr_assert_eq(s_count_chunks(&rc, 0, 0), 2);
    cr_assert_eq(s_count_chunks(&rc, 0, 1), 2);
    cr_assert_eq(s_count_chunks(&rc, 0, 2), 1);

    /* The budget: per consult at most the study's 6 chunks per window.
     * 2 are used; every chunk of object 1 takes 3 more, then of object 0's
     * three only one fits and two are refused. */
    for (int i = 0; i < N_INDEXES; i++)
        idx[i] = (uint32_t)(i % 3);
    r = s_resend(&rc, case_id, H_XINZHAN, 1, idx, N_INDEXES);
    cr_assert_eq(r->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED);
    cr_assert_eq(s_settle_chunks(&rc, total + 5), total + 5);
    r = s_resend(&rc, case_id, H_XINZHAN, 0, idx, N_INDEXES);
    cr_assert_eq(r->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED);
    cr_assert_eq(s_settle_chunks(&rc, total + 6), total + 6);
    /* Wait for the refusal line rather than for its absence of chunks. */
    for (int waited = 0; waited < 10000; waited += 100) {
        if (h_log_contains(&W, "agent-" H_XINZHAN ".log", "resend limit") > 0)
            break;
        h_sleep_ms(100);
    }
    cr_assert_eq(h_log_contains(&W, "agent-" H_XINZHAN ".log", "resend limit"), 1,
                 "the clinic did not log the refused resend once");
    r = s_resend(&rc, case_id, H_XINZHAN, 1, idx, 3);
    cr_assert_eq(r->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED);
    cr_assert_eq(s_settle_chunks(&rc, total + 6), total + 6, "a resend beyond the budget was sent");

    /* What the broker stored agrees: 6 chunks and 6 resends, no more. */
    const Medlink__V1__CaseInfo *ci = s_case(&ops, case_id);
    cr_assert_eq(ci->chunks + ci->duplicate_chunks, (uint32_t)(total + 6), "stored %u + %u dup",
                 ci->chunks, ci->duplicate_chunks);
    free(idx);
    cli_close(&ops);
    cli_close(&rc);
    h_agent_stop(&W, H_XINZHAN);
    h_broker_stop(&W);
}

/* A resend that names a chunk still on its way is not queued again: the
 * clinic's uplink is slow (128 KiB/s), so a chunk sent again stays in
 * flight for about two seconds, and the same request comes twice at once. */
Test(security, f3_resend_of_a_queued_chunk_not_queued_twice)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_link_start(&W, 128L * 1024);
    h_agent_start_at(&W, H_XINZHAN, W.link_endpoint);
    cli_t rc;
    cli_open(&rc, &W, H_READ_A, 1);
    /* One object of 300 KiB: 2 chunks. */
    s_drop_study(H_XINZHAN, "f3q", 1, 300 * 1024);
    cr_assert(cli_run_until(&rc, s_has_consult, NULL, 30000), "no consult reached the centre");
    const ml_envelope_t *consult = s_got(&rc, MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CONSULT);
    char case_id[130];
    snprintf(case_id, sizeof case_id, "%s", consult->case_id);
    int total = (int)consult->imaging_consult->object[0]->chunks;
    cr_assert_eq(total, 2);
    cr_assert_eq(s_settle_chunks(&rc, total), total);

    uint32_t idx[1] = {0};
    for (int i = 0; i < 3; i++) {
        ml_envelope_t *r = s_resend(&rc, case_id, H_XINZHAN, 0, idx, 1);
        cr_assert_eq(r->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED);
    }
    cr_assert_eq(s_settle_chunks(&rc, total + 1), total + 1,
                 "a chunk asked for three times while in flight was sent more than once");
    cr_assert_geq(h_log_contains(&W, "agent-" H_XINZHAN ".log", "1 already queued"), 1,
                  "the clinic did not log the chunk as already queued");
    cli_close(&rc);
    h_agent_stop(&W, H_XINZHAN);
    h_broker_stop(&W);
}

/* A consult for a raw clinic: object i has chunks[i] chunks of 4 KiB. */
typedef struct {
    char id[ML_ULID_LEN + 1];
    Medlink__V1__Patient patient;
    Medlink__V1__DicomObject obj[4];
    Medlink__V1__DicomObject *objp[4];
    char sop[4][80];
    Medlink__V1__ImagingConsult ic;
    ml_envelope_t env;
} s_consult_t;

#define S_CS 4096u

static void s_consult(s_consult_t *c, const char *from, const uint32_t *chunks, size_t n,
                      const char *sha0)
{
    memset(c, 0, sizeof *c);
    ml_ulid_new(c->id);
    medlink__v1__patient__init(&c->patient);
    c->patient.health_card_id = "130102198001011234";
    c->patient.name = "Li Na";
    medlink__v1__imaging_consult__init(&c->ic);
    c->ic.patient = &c->patient;
    c->ic.study_instance_uid = STUDY_UID;
    c->ic.modality = "CT";
    c->ic.chunk_size = S_CS;
    for (size_t i = 0; i < n; i++) {
        medlink__v1__dicom_object__init(&c->obj[i]);
        snprintf(c->sop[i], sizeof c->sop[i], "1.2.826.0.1.3680043.8.498.93%zu", i);
        c->obj[i].sop_instance_uid = c->sop[i];
        c->obj[i].file_name = "IM.dcm";
        c->obj[i].size = (uint64_t)chunks[i] * S_CS;
        c->obj[i].chunks = chunks[i];
        c->obj[i].sha256 = i == 0 && sha0
                               ? (char *)sha0
                               : "0000000000000000000000000000000000000000000000000000000000000000";
        c->objp[i] = &c->obj[i];
        c->ic.total_bytes += c->obj[i].size;
    }
    c->ic.n_object = n;
    c->ic.object = c->objp;
    medlink__v1__envelope__init(&c->env);
    c->env.id = c->id;
    c->env.case_id = c->id;
    c->env.kind = MEDLINK__V1__KIND__KIND_IMAGING_CONSULT;
    c->env.from = (char *)from;
    c->env.to = H_SERVICE_CT;
    c->env.priority = MEDLINK__V1__PRIORITY__PRIORITY_URGENT;
    c->env.created_at = ml_now_ms();
    c->env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CONSULT;
    c->env.imaging_consult = &c->ic;
}

Test(security, f3_broker_refuses_unknown_resend_indexes)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t clinic, centre;
    cli_open(&clinic, &W, H_FENGLE, 1);
    cli_open(&centre, &W, H_READ_A, 1);
    s_consult_t c;
    const uint32_t chunks[2] = {2, 5};
    s_consult(&c, H_FENGLE, chunks, 2, NULL);
    cli_expect_accepted(cli_send_wait(&clinic, &c.env), c.id);
    cr_assert(cli_run_until(&centre, s_has_consult, NULL, 10000), "the consult was not delivered");

    uint32_t idx[3] = {0, 1, 2};
    /* Object 0 has chunks 0 and 1 only. */
    ml_envelope_t *r = s_resend(&centre, c.id, H_FENGLE, 0, idx, 3);
    cli_expect_nack(r, MEDLINK__V1__NACK_CODE__NACK_INVALID,
                    "imaging_resend.chunk_index[2] 2: object 0 of case");
    cli_expect_nack(r, MEDLINK__V1__NACK_CODE__NACK_INVALID, "has 2 chunk(s)");
    /* No object 2. */
    r = s_resend(&centre, c.id, H_FENGLE, 2, idx, 1);
    cli_expect_nack(r, MEDLINK__V1__NACK_CODE__NACK_INVALID, "imaging_resend.object_index 2");
    /* Object 1 has five chunks: index 4 is fine, 5 is not. */
    uint32_t last[2] = {4, 5};
    r = s_resend(&centre, c.id, H_FENGLE, 1, last, 2);
    cli_expect_nack(r, MEDLINK__V1__NACK_CODE__NACK_INVALID,
                    "imaging_resend.chunk_index[1] 5: object 1 of case");
    r = s_resend(&centre, c.id, H_FENGLE, 1, last, 1);
    cr_assert_eq(r->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED, "%s",
                 r->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_NACK ? r->nack->reason : "");
    /* The clinic that sent the study cannot ask itself for chunks. */
    r = s_resend(&clinic, c.id, H_READ_A, 0, idx, 1);
    cr_assert_eq(r->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_NACK,
                 "a resend from the requesting clinic was accepted");

    /* The chunk counts come from the stored consult: the same checks hold
     * after a restart, when the case is read back from the store. */
    h_broker_stop(&W);
    h_broker_start(&W);
    cli_close(&centre);
    cli_open(&centre, &W, H_READ_A, 1);
    r = s_resend(&centre, c.id, H_FENGLE, 0, idx, 3);
    cli_expect_nack(r, MEDLINK__V1__NACK_CODE__NACK_INVALID, "imaging_resend.chunk_index[2] 2");
    r = s_resend(&centre, c.id, H_FENGLE, 0, idx, 2);
    cr_assert_eq(r->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED);
    cli_close(&centre);
    cli_close(&clinic);
    h_broker_stop(&W);
}

/* ---- F9 ----------------------------------------------------------------- */

static int s_path_exists(cli_t *c, void *arg)
{
    struct stat st;
    return stat((const char *)arg, &st) == 0;
}

static int s_path_gone(cli_t *c, void *arg)
{
    return !s_path_exists(c, arg);
}

static int s_never(cli_t *c, void *arg)
{
    return 0;
}

static int s_has_expiry(cli_t *c, void *arg)
{
    int rejected = 0, escalated = 0;
    for (int i = 0; i < c->n_got; i++) {
        const ml_envelope_t *e = c->got[i];
        if (e->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_UPDATE &&
            e->imaging_update->status == MEDLINK__V1__IMAGING_STATUS__IMAGING_REJECTED &&
            e->imaging_update->incoming_expired)
            rejected = 1;
        if (e->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_ESCALATION &&
            e->escalation->reason == MEDLINK__V1__ESCALATION_REASON__ESCALATION_DEAD_LETTER &&
            strcmp(e->escalation->message_id, (const char *)arg) == 0)
            escalated = 1;
    }
    return rejected && escalated;
}

Test(security, f9_incoming_study_expires)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start_ini(&W, H_READ_A, "incoming_expire_s = 3\n");
    cli_t clinic, ops;
    cli_open(&clinic, &W, H_FENGLE, 1);
    cli_open(&ops, &W, H_OPS, 0);

    /* A study of two chunks, of which only the first is ever sent. */
    uint8_t data[S_CS];
    for (size_t i = 0; i < sizeof data; i++)
        data[i] = (uint8_t)(i * 7);
    char sha[ML_SHA256_HEX + 1];
    ml_sha256_hex(data, sizeof data, sha);
    s_consult_t c;
    const uint32_t chunks[1] = {2};
    s_consult(&c, H_FENGLE, chunks, 1, NULL);
    cli_expect_accepted(cli_send_wait(&clinic, &c.env), c.id);
    char chunk_id[ML_ULID_LEN + 1];
    ml_ulid_new(chunk_id);
    Medlink__V1__ImagingChunk ch = MEDLINK__V1__IMAGING_CHUNK__INIT;
    ch.study_instance_uid = STUDY_UID;
    ch.object_index = 0;
    ch.chunk_index = 0;
    ch.offset = 0;
    ch.data.data = data;
    ch.data.len = sizeof data;
    ch.sha256 = sha;
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = chunk_id;
    e.case_id = c.id;
    e.kind = MEDLINK__V1__KIND__KIND_IMAGING_CHUNK;
    e.from = H_FENGLE;
    e.to = H_READ_A;
    e.priority = MEDLINK__V1__PRIORITY__PRIORITY_URGENT;
    e.created_at = ml_now_ms();
    e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CHUNK;
    e.imaging_chunk = &ch;
    cli_expect_accepted(cli_send_wait(&clinic, &e), chunk_id);

    /* The partial object appears in the centre's incoming/ ... */
    char part[1000], dir[900];
    snprintf(dir, sizeof dir, "%s/data/%s/incoming/%s", W.dir, H_READ_A, c.id);
    snprintf(part, sizeof part, "%s/0.part", dir);
    /* (Waiting runs the clients' loops, which keeps their sessions up.) */
    cr_assert(cli_run_until(&clinic, s_path_exists, part, 20000), "the chunk never reached %s",
              part);
    /* ... and is gone once the study expires, folder and all. */
    cr_assert(cli_run_until(&clinic, s_path_gone, dir, 30000),
              "the expired partial study is still in %s", dir);
    cr_assert_geq(h_log_contains(&W, "agent-" H_READ_A ".log", "expired"), 1);

    /* The clinic hears IMAGING_REJECTED (expired) and a dead-letter
     * escalation naming its consult. */
    cr_assert(cli_run_until(&clinic, s_has_expiry, c.id, 20000),
              "the clinic did not hear of the expiry (REJECTED + escalation)");
    /* The consult is in the broker's dead letters, the case rejected. */
    Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
    rq.op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_DLQ_LIST;
    int found = 0;
    for (int waited = 0; !found && waited < 10000; waited += 100) {
        const Medlink__V1__AdminReply *rep = cli_admin(&ops, &rq);
        for (size_t i = 0; i < rep->n_dead_letter; i++)
            if (strcmp(rep->dead_letter[i]->message_id, c.id) == 0) {
                found = 1;
                cr_assert(strstr(rep->dead_letter[i]->reason, "incoming_expire_s"), "%s",
                          rep->dead_letter[i]->reason);
            }
        if (!found)
            cli_run_until(&ops, s_never, NULL, 100);
    }
    cr_assert(found, "the expired consult is not a dead letter");
    const Medlink__V1__CaseInfo *ci = s_case(&ops, c.id);
    cr_assert_str_eq(ci->state, "IMAGING_REJECTED");
    cr_assert_geq(ci->escalations, 1);
    cli_close(&ops);
    cli_close(&clinic);
    h_agent_stop(&W, H_READ_A);
    h_broker_stop(&W);
}
