/* Imaging consults end to end with the real medlinkd and agents: a clinic
 * drops a study (DICOM Part 10 files written by the test) into its spool,
 * a reading centre's agent publishes it verified into its inbox, and the
 * report comes back, a critical one as EMERGENCY. Then the hard cases:
 *
 *   - a 20 MiB study whose transfer is interrupted twice (the clinic's
 *     agent killed, then the link frozen long enough for every session to
 *     die) resumes without storing any chunk twice, with identical SHA-256
 *     at the end;
 *   - a chunk damaged before the broker sealed it into its store is caught
 *     by the reading centre's SHA-256 check, asked for again, and the study
 *     still arrives intact. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <criterion/criterion.h>
#include <jansson.h>
#include <sqlite3.h>

#include "client.h"
#include "harness.h"
#include "store.h"
#include "study.h"
#include "ml_common.h"
#include "ml_crypt.h"
#include "ml_imaging.h"

#define STUDY_UID "1.2.826.0.1.3680043.8.498.7001"

static h_world_t W;

static void s_teardown(void)
{
    h_world_fini(&W);
}

TestSuite(study, .fini = s_teardown, .timeout = 600);

/* The study's image number index, with about `pixels` bytes of
 * pseudo-random pixel data (tests/common/study.h); its SHA-256 into sha (may be NULL). */
static void s_write_dicom(const char *path, int index, size_t pixels, char sha[65])
{
    static const tc_dicom_t study = {.study_uid = STUDY_UID,
                                     .series_uid = "1.2.826.0.1.3680043.8.498.7002",
                                     .sop_prefix = "1.2.826.0.1.3680043.8.498.71",
                                     .patient = "ZHANG^WEI"};
    cr_assert_eq(tc_dicom_write(&study, path, index, pixels, sha), 0, "cannot write %s: %s", path,
                 strerror(errno));
}

/* Drops a study of n files of `pixels` bytes each into the clinic's
 * outbox the documented way (folder first, then the JSON renamed in). */
static void s_drop_study(const char *name, int n, size_t pixels, char shas[][65],
                         const char *priority)
{
    char dir[900], path[1200];
    h_spool(&W, H_XINZHAN, "outbox", dir, sizeof dir);
    size_t len = strlen(dir);
    snprintf(dir + len, sizeof dir - len, "/%s.d", name);
    cr_assert_eq(ml_mkdirs(dir), 0);
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/IM%04d.dcm", dir, i + 1);
        s_write_dicom(path, i + 1, pixels, shas[i]);
    }
    char json[1024], file[200];
    snprintf(json, sizeof json,
             "{\"to\": \"%s\", \"priority\": \"%s\", \"imagingConsult\": {"
             "\"patient\": {\"healthCardId\": \"130102196001017777\", \"name\": \"Zhang Wei\"},"
             "\"requestingDoctor\": {\"name\": \"Dr. Liu Fang\"}, \"bodyPart\": \"CHEST\","
             "\"clinicalQuestion\": \"Mass in the left lower lobe?\"}}",
             H_SERVICE_CT, priority);
    snprintf(file, sizeof file, "%s.json", name);
    h_drop(&W, H_XINZHAN, file, json);
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

/* The case id the clinic's agent gave its consult (sent/NAME.json). */
static void s_sent_case(const char *name, char *out, size_t len)
{
    char path[900], rel[200];
    snprintf(rel, sizeof rel, "sent/%s.json", name);
    h_spool(&W, H_XINZHAN, rel, path, sizeof path);
    for (int waited = 0; waited < 60000; waited += 100) {
        struct stat st;
        if (stat(path, &st) == 0)
            break;
        h_sleep_ms(100);
    }
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    cr_assert(j, "no %s: the consult was not accepted", path);
    snprintf(out, len, "%s", json_string_value(json_object_get(j, "caseId")));
    json_decref(j);
}

/* Waits until the reading centre has published the study, then checks
 * every file against the original digests. */
static void s_check_study(const char *centre, const char *case_id, int n, char shas[][65],
                          int timeout_ms)
{
    char dir[900], rel[200];
    snprintf(rel, sizeof rel, "inbox/study-%s", case_id);
    h_spool(&W, centre, rel, dir, sizeof dir);
    char manifest[1000];
    snprintf(manifest, sizeof manifest, "%s/manifest.json", dir);
    struct stat st;
    for (int waited = 0; stat(manifest, &st) != 0 && waited < timeout_ms; waited += 100)
        h_sleep_ms(100);
    cr_assert(stat(manifest, &st) == 0, "the study never appeared at %s", dir);
    for (int i = 0; i < n; i++) {
        char path[1100], got[65];
        uint64_t size = 0;
        snprintf(path, sizeof path, "%s/IM%04d.dcm", dir, i + 1);
        cr_assert_eq(ml_sha256_file(path, got, &size), 0, "missing %s", path);
        cr_assert_str_eq(got, shas[i], "%s differs from the file the clinic sent", path);
    }
    char *m = h_slurp(manifest);
    cr_assert(m && strstr(m, STUDY_UID) && strstr(m, H_XINZHAN), "manifest: %s", m);
    free(m);
}

/* ---- tests --------------------------------------------------------------- */

Test(study, consult_study_report_whole_path)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_XINZHAN);
    h_agent_start(&W, H_READ_A);
    cli_t ops;
    cli_open(&ops, &W, H_OPS, 0);
    char shas[3][65];
    s_drop_study("chest-ct", 3, 600 * 1024, shas, "PRIORITY_URGENT");
    char case_id[64];
    s_sent_case("chest-ct", case_id, sizeof case_id);
    s_check_study(H_READ_A, case_id, 3, shas, 30000);

    /* The clinic hears which centre has it, then that it arrived whole. */
    char *p = h_wait_json(&W, H_XINZHAN, "inbox", "IMAGING_ASSIGNED", 20000);
    cr_assert(p);
    free(p);
    p = h_wait_json(&W, H_XINZHAN, "inbox", "IMAGING_STUDY_RECEIVED", 20000);
    cr_assert(p, "no IMAGING_STUDY_RECEIVED at the clinic");
    free(p);

    /* The radiologist's report: a critical finding, sent as ROUTINE by
     * the centre's system, travels as EMERGENCY. */
    char report[1500];
    snprintf(report, sizeof report,
             "{\"to\": \"%s\", \"caseId\": \"%s\", \"imagingReport\": {"
             "\"studyInstanceUid\": \"%s\", \"findings\": \"4 cm mass, left lower lobe\","
             "\"impression\": \"Suspected malignancy\", \"reader\": {\"name\": \"Dr. Gao Yan\"},"
             "\"signedAt\": \"%lld\", \"criticalFinding\": true}}",
             H_XINZHAN, case_id, STUDY_UID, (long long)ml_now_ms());
    h_drop(&W, H_READ_A, "report.json", report);
    p = h_wait_json(&W, H_XINZHAN, "inbox", "Suspected malignancy", 20000);
    cr_assert(p, "the report did not reach the clinic");
    char *text = h_slurp(p);
    cr_assert(strstr(text, "PRIORITY_EMERGENCY"), "a critical report must be EMERGENCY:\n%s", text);
    free(text);
    free(p);

    const Medlink__V1__CaseInfo *ci = s_case(&ops, case_id);
    cr_assert_str_eq(ci->state, "IMAGING_REPORTED");
    cr_assert_str_eq(ci->target, H_READ_A);
    cr_assert_str_eq(ci->service, H_SERVICE_CT);
    cr_assert_eq(ci->objects, 3);
    cr_assert_eq(ci->chunks, ci->chunks_expected, "chunks %u of %u", ci->chunks,
                 ci->chunks_expected);
    cr_assert_eq(ci->duplicate_chunks, 0);
    cr_assert_eq(h_count(&W, H_XINZHAN, "rejected"), 0);
    cr_assert_eq(h_count(&W, H_READ_A, "rejected"), 0);
    cli_close(&ops);
    h_agent_stop(&W, H_READ_A);
    h_agent_stop(&W, H_XINZHAN);
    h_broker_stop(&W);
}

/* Waits until the broker has stored at least n chunks of the case. */
static uint32_t s_wait_chunks(cli_t *ops, const char *case_id, uint32_t n, int ms)
{
    uint32_t got = 0;
    for (int waited = 0; waited <= ms; waited += 5) {
        got = s_case(ops, case_id)->chunks;
        if (got >= n)
            break;
        h_sleep_ms(5);
    }
    return got;
}

Test(study, twenty_mib_study_interrupted_twice_resumes_without_resending)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    /* The clinic's uplink carries 4 MiB/s, as a township's might: over
     * loopback the whole study would pass in a fraction of a second, before
     * the test could interrupt it where it means to. */
    h_link_start(&W, 4L * 1024 * 1024);
    h_agent_start_at(&W, H_XINZHAN, W.link_endpoint);
    h_agent_start(&W, H_READ_A);
    cli_t ops;
    cli_open(&ops, &W, H_OPS, 0);
    enum { FILES = 4 };
    const size_t pixels = 5 * 1024 * 1024; /* 4 x 5 MiB = 20 MiB */
    char shas[FILES][65];
    s_drop_study("big-ct", FILES, pixels, shas, "PRIORITY_ROUTINE");
    char case_id[64];
    s_sent_case("big-ct", case_id, sizeof case_id);
    const Medlink__V1__CaseInfo *ci = s_case(&ops, case_id);
    uint32_t expected = ci->chunks_expected;
    cr_assert_geq(expected, 80, "a 20 MiB study in 256 KiB chunks: %u", expected);

    /* Interruption 1: the clinic's agent dies mid-transfer. */
    uint32_t at = s_wait_chunks(&ops, case_id, expected / 4, 60000);
    cr_assert(at < expected, "the transfer finished before it could be interrupted");
    h_agent_kill(&W, H_XINZHAN);
    const char *alog = "agent-" H_XINZHAN ".log";
    int accepted_before = h_log_contains(&W, alog, "accepted (");
    h_agent_start_at(&W, H_XINZHAN, W.link_endpoint);
    /* Interruption 2: as soon as the restarted agent has recorded a chunk
     * as Accepted, the link freezes (the broker stops answering) past
     * every heartbeat timeout, then comes back. */
    for (int waited = 0; waited < 60000; waited += 2) {
        if (h_log_contains(&W, alog, "accepted (") > accepted_before)
            break;
        h_sleep_ms(2);
    }
    at = s_case(&ops, case_id)->chunks;
    cr_assert(at < expected, "the transfer finished before the second interruption");
    cr_assert_eq(kill(W.broker, SIGSTOP), 0);
    h_sleep_ms(6000);
    cr_assert_eq(kill(W.broker, SIGCONT), 0);

    s_check_study(H_READ_A, case_id, FILES, shas, 120000);
    /* The ops client's own session died in the freeze too: a new one. */
    cli_close(&ops);
    cli_open(&ops, &W, H_OPS, 0);
    ci = s_case(&ops, case_id);
    /* Every chunk stored exactly once: the bytes the broker stored are the
     * study's bytes, no more. */
    cr_assert_eq(ci->chunks, expected, "chunks stored %u, expected %u", ci->chunks, expected);
    uint64_t total = 0;
    for (int i = 0; i < FILES; i++) {
        char path[1100], sha[65], rel[200];
        uint64_t size = 0;
        snprintf(rel, sizeof rel, "inbox/study-%s/IM%04d.dcm", case_id, i + 1);
        h_spool(&W, H_READ_A, rel, path, sizeof path);
        ml_sha256_file(path, sha, &size);
        total += size;
    }
    cr_assert_eq(ci->chunk_bytes, total, "chunk bytes stored %llu, study %llu",
                 (unsigned long long)ci->chunk_bytes, (unsigned long long)total);
    /* The only chunks sent again are those the agent had not seen
     * Accepted: at most one send window (8 MiB = 32 chunks) per
     * interruption, and a chunk in flight at both may arrive three times. */
    cr_assert_leq(ci->duplicate_chunks, 3 * 32, "%u chunks were sent again", ci->duplicate_chunks);
    /* After the link came back the agent resumed past what the broker had
     * acknowledged, not at the first chunk. */
    char log[800];
    snprintf(log, sizeof log, "%s/agent-%s.log", W.dir, H_XINZHAN);
    char *text = h_slurp(log);
    cr_assert_not_null(text);
    const char *last = NULL;
    for (const char *q = text; (q = strstr(q, "imaging: resuming case")); q++)
        last = q;
    cr_assert(last, "the agent did not log where it resumed");
    unsigned k = 0, n = 0;
    unsigned long long done = 0;
    const char *at_chunk = strstr(last, " at chunk ");
    const char *acc = strstr(last, "; ");
    cr_assert(at_chunk && acc && sscanf(at_chunk, " at chunk %u of %u", &k, &n) == 2 &&
                  sscanf(acc, "; %llu bytes already accepted", &done) == 1,
              "cannot read the resume line");
    cr_assert_gt(k, 1, "the agent resumed at chunk %u: from the start", k);
    cr_assert_gt(done, 0);
    free(text);
    cli_close(&ops);
    h_agent_stop(&W, H_READ_A);
    h_agent_stop(&W, H_XINZHAN);
    h_broker_stop(&W);
}

Test(study, damaged_chunk_detected_and_asked_for_again)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_XINZHAN);
    cli_t ops;
    cli_open(&ops, &W, H_OPS, 0);
    /* The reading centre is offline: the chunks wait in the broker. */
    h_agent_start(&W, H_READ_A);
    h_agent_stop(&W, H_READ_A);
    char shas[2][65];
    s_drop_study("damaged", 2, 700 * 1024, shas, "PRIORITY_URGENT");
    char case_id[64];
    s_sent_case("damaged", case_id, sizeof case_id);
    uint32_t expected = s_case(&ops, case_id)->chunks_expected;
    cr_assert_eq(s_wait_chunks(&ops, case_id, expected, 30000), expected);
    cli_close(&ops);
    h_broker_stop(&W);

    /* One byte of one stored chunk's data is damaged. The broker's store
     * is sealed (AES-256-GCM, bound to the message id), so damage to the
     * bytes on its disk would be caught by the broker itself; what only the
     * reading centre's SHA-256 can catch is a chunk damaged before it was
     * sealed. The test makes one: it opens the stored chunk with the
     * broker's key, flips a byte of its data and seals it again. */
    char db[800];
    snprintf(db, sizeof db, "%s/data/broker/broker.db", W.dir);
    sqlite3 *sq = NULL;
    cr_assert_eq(sqlite3_open(db, &sq), SQLITE_OK);
    sqlite3_stmt *st = NULL;
    cr_assert_eq(sqlite3_prepare_v2(sq,
                                    "SELECT b.seq, NULL, m.id FROM bodies b JOIN messages m "
                                    "ON m.seq = b.seq WHERE m.kind = 23 AND m.case_id = ?1 "
                                    "ORDER BY b.seq LIMIT 1 OFFSET 1",
                                    -1, &st, NULL),
                 SQLITE_OK);
    sqlite3_bind_text(st, 1, case_id, -1, SQLITE_STATIC);
    cr_assert_eq(sqlite3_step(st), SQLITE_ROW, "no stored chunk found");
    char msg_id[64];
    snprintf(msg_id, sizeof msg_id, "%s", (const char *)sqlite3_column_text(st, 2));
    /* Store schema 5: the body is in a segment file, not in the row. */
    uint8_t *stored = NULL;
    size_t stored_len = 0;
    cr_assert_eq(ml_store_offline_body(db, msg_id, &stored, &stored_len), 0);
    ml_keyring_t *keys = h_store_keys(&W, H_BROKER);
    uint8_t *plain = NULL;
    size_t plain_len = stored_len;
    cr_assert(ml_is_sealed(stored, stored_len), "the broker's store should be sealed");
    cr_assert_eq(ml_open(keys, stored, stored_len, (const uint8_t *)msg_id, strlen(msg_id), &plain,
                         &plain_len),
                 0, "the stored chunk %s does not open", msg_id);
    sqlite3_finalize(st);
    free(stored);
    plain[plain_len / 2] ^= 0x5a; /* inside the chunk's data, which is most of the envelope */
    uint8_t *blob = NULL;
    size_t n = 0;
    cr_assert_eq(
        ml_seal(keys, plain, plain_len, (const uint8_t *)msg_id, strlen(msg_id), &blob, &n), 0);
    free(plain);
    ml_keyring_destroy(&keys);
    sqlite3_close(sq);
    cr_assert_eq(ml_store_offline_replace_body(db, msg_id, blob, n), 0);
    free(blob);

    /* Back up: the centre catches the damage, asks again, and the clinic's
     * agent sends that chunk again from its copy. */
    h_broker_start(&W);
    h_agent_start(&W, H_READ_A);
    cli_open(&ops, &W, H_OPS, 0);
    s_check_study(H_READ_A, case_id, 2, shas, 60000);
    const Medlink__V1__CaseInfo *ci = s_case(&ops, case_id);
    int resend = 0;
    for (size_t i = 0; i < ci->n_timeline; i++)
        resend += strcmp(ci->timeline[i]->event, "resend requested") == 0;
    cr_assert_eq(resend, 1, "the timeline should show one resend request");
    cr_assert_eq(ci->chunks, expected + 1, "one chunk was sent a second time");
    cr_assert_geq(h_log_contains(&W, "agent-" H_READ_A ".log", "SHA-256"), 1,
                  "the reading centre did not log the damaged chunk");
    cli_close(&ops);
    h_agent_stop(&W, H_READ_A);
    h_agent_stop(&W, H_XINZHAN);
    h_broker_stop(&W);
}
