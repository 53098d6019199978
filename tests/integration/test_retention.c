/* Retention against the real medlinkd (and agents): what broker.db keeps,
 * read from the real SQLite file while the broker runs.
 *
 *   - a delivered message's row and body go once its case is final and
 *     retention has passed (retention_seconds, the test override of
 *     retention_days); its timeline stays, an open case's messages stay;
 *   - imaging chunk bodies go as soon as the study is received; their rows
 *     (the chunk metadata) and the timeline stay;
 *   - incremental vacuum gives the freed pages back: the file shrinks;
 *   - the agent empties its sent/ folder after sent_retention_days
 *     (sent_retention_seconds here);
 *   - medlinkctl store stats / store prune, ops only;
 *   - F9: node_queue_bytes counts what the store holds per message, not the
 *     envelope alone. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <criterion/criterion.h>
#include <jansson.h>
#include <sqlite3.h>

#include "client.h"
#include "harness.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_imaging.h"
#include "store.h"

#include "short.h"

static h_world_t W;
/* A client of the test: waiting turns its loop (and every other open
 * client's), so that their sessions keep their heartbeats while the test
 * watches broker.db. NULL: plain sleeps. */
static cli_t *s_any;

static void s_teardown(void)
{
    h_agent_extra_ini = NULL;
    s_any = NULL;
    h_world_fini(&W);
}

TestSuite(retention, .fini = s_teardown, .timeout = 600);

/* ---- helpers ------------------------------------------------------------ */

static int s_never(cli_t *c, void *arg)
{
    (void)c;
    (void)arg;
    return 0;
}

static void s_pause(int ms)
{
    if (s_any)
        cli_run_until(s_any, s_never, NULL, ms);
    else
        h_sleep_ms(ms);
}

static void s_db_path(char *out, size_t len)
{
    snprintf(out, len, "%s/data/broker/broker.db", W.dir);
}

/* One integer from broker.db (read-only, beside the running broker: WAL
 * lets both read). text may be NULL; it is bound as ?1. */
static long long s_q(const char *sql, const char *text)
{
    char path[700];
    s_db_path(path, sizeof path);
    sqlite3 *db = NULL;
    cr_assert_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    sqlite3_stmt *s = NULL;
    cr_assert_eq(sqlite3_prepare_v2(db, sql, -1, &s, NULL), SQLITE_OK, "%s: %s", sql,
                 sqlite3_errmsg(db));
    if (text)
        sqlite3_bind_text(s, 1, text, -1, SQLITE_STATIC);
    cr_assert_eq(sqlite3_step(s), SQLITE_ROW, "%s: %s", sql, sqlite3_errmsg(db));
    long long v = sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
    sqlite3_close(db);
    return v;
}

/* Waits until s_q(sql, text) == want; returns the last value. */
static long long s_wait_q(const char *sql, const char *text, long long want, int ms)
{
    long long v = -1;
    for (int waited = 0; waited <= ms; waited += 200) {
        if ((v = s_q(sql, text)) == want)
            return v;
        s_pause(200);
    }
    return v;
}

static long long s_file_size(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 ? (long long)sb.st_size : -1;
}

static const char s_msgs_of_case[] = "SELECT count(*) FROM messages WHERE case_id = ?1";
static const char s_bodies_of_case[] =
    "SELECT count(*) FROM bodies b JOIN messages m ON m.seq = b.seq WHERE m.case_id = ?1";
static const char s_events_of_case[] = "SELECT count(*) FROM case_events WHERE case_id = ?1";

/* A ReferralUpdate with status st for case_id from c to `to`. */
static ml_envelope_t *s_update(cli_t *c, const char *to, const char *case_id, int st)
{
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    Medlink__V1__ReferralUpdate u = MEDLINK__V1__REFERRAL_UPDATE__INIT;
    u.status = st;
    u.reason = "test reason";
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = id;
    e.case_id = (char *)case_id;
    e.from = c->node;
    e.to = (char *)to;
    e.created_at = ml_now_ms();
    e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL_UPDATE;
    e.referral_update = &u;
    return cli_send_wait(c, &e);
}

static void s_accepted(ml_envelope_t *r)
{
    cr_assert_eq(r->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED, "refused: %s",
                 r->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_NACK ? r->nack->reason : "?");
}

/* Sends a referral (notes of notes_len bytes) from clinic to the county. */
static void s_referral(cli_t *clinic, char *id_out, size_t notes_len)
{
    cli_referral_t r;
    cli_referral(&r, clinic->node, H_COUNTY, "Retention Patient", 0);
    char *notes = NULL;
    if (notes_len) {
        notes = malloc(notes_len + 1);
        cr_assert_not_null(notes);
        for (size_t i = 0; i < notes_len; i++)
            notes[i] = (char)('a' + (i * 7 + i / 13) % 26); /* not too compressible */
        notes[notes_len] = '\0';
        r.ref.notes = notes;
    }
    cli_expect_accepted(cli_send_wait(clinic, &r.env), r.id);
    snprintf(id_out, ML_ULID_LEN + 1, "%s", r.id);
    free(notes);
}

/* A number of the JSON form of a message: 64-bit values are strings there,
 * zero values are left out. */
static long long s_num(json_t *j, const char *key)
{
    json_t *v = json_object_get(j, key);
    if (json_is_integer(v))
        return (long long)json_integer_value(v);
    if (json_is_string(v))
        return strtoll(json_string_value(v), NULL, 10);
    return 0;
}

/* Rows of table/state in a StoreStats JSON. */
static long long s_rows(json_t *stats, const char *table, const char *state)
{
    json_t *arr = json_object_get(stats, "table");
    size_t i;
    json_t *t;
    json_array_foreach(arr, i, t)
    {
        const char *tn = json_string_value(json_object_get(t, "table"));
        const char *sn = json_string_value(json_object_get(t, "state"));
        if (tn && strcmp(tn, table) == 0 && strcmp(sn ? sn : "", state) == 0)
            return s_num(t, "rows");
    }
    cr_assert_fail("no row %s/%s in the store stats", table, state);
    return -1;
}

/* ---- delivered bodies ----------------------------------------------------- */

Test(retention, retention_delivered_bodies_pruned_after_final)
{
    h_world_init(&W, "retention_seconds = 2\nretention_interval_s = 1\n");
    h_broker_start(&W);
    cli_t clinic, hosp, ops;
    cli_open(&clinic, &W, H_XINZHAN, 1);
    s_any = &clinic;
    cli_open(&hosp, &W, H_COUNTY, 1);
    cli_open(&ops, &W, H_OPS, 0);

    char closed[ML_ULID_LEN + 1], open[ML_ULID_LEN + 1];
    s_referral(&clinic, closed, 0);
    s_referral(&clinic, open, 0);
    cr_assert(cli_run_until(&hosp, cli_got_n, (int[]){2}, 15000), "referrals not delivered");
    /* The hospital refuses one: REJECTED is final. Its update reaches the
     * clinic, so every message of that case is delivered. */
    s_accepted(s_update(&hosp, H_XINZHAN, closed, REF_(REJECTED)));
    /* Two delivery notices and the update. */
    cr_assert(cli_run_until(&clinic, cli_got_n, (int[]){3}, 15000), "update not delivered");
    cr_assert_geq(s_q(s_events_of_case, closed), 2);
    /* (Later deliveries may still add entries: at least these stay.) */
    long long events = s_q(s_events_of_case, closed);

    /* Gone from broker.db once retention (2 s) has passed: rows and bodies. */
    long long left = s_wait_q(s_msgs_of_case, closed, 0, 30000);
    cr_assert_eq(left, 0, "%lld message(s) of final case %s still in broker.db", left, closed);
    cr_assert_eq(s_q(s_bodies_of_case, closed), 0);
    /* The timeline stays (timeline_retention_days, 10 years by default),
     * and ops still see the case with it. */
    cr_assert_geq(s_q(s_events_of_case, closed), events, "the timeline must stay");
    Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
    rq.op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_CASE_SHOW;
    rq.case_id = closed;
    const Medlink__V1__AdminReply *rep = cli_admin(&ops, &rq);
    cr_assert_eq(rep->status, 0, "case show: %s", rep->error);
    cr_assert_str_eq(rep->case_info->state, "REFERRAL_REJECTED");
    cr_assert_geq(rep->case_info->n_timeline, 2);
    /* The open case keeps its delivered referral, body and all. */
    /* (the referral and its delivery notice) */
    cr_assert_eq(s_q(s_msgs_of_case, open), 2);
    cr_assert_eq(s_q(s_bodies_of_case, open), 2);
    cr_assert(h_log_contains(&W, "broker.log", "retention:") > 0);

    s_any = NULL;
    cli_close(&clinic);
    cli_close(&hosp);
    cli_close(&ops);
    h_broker_stop(&W);
}

/* ---- imaging chunks ------------------------------------------------------- */

Test(retention, retention_chunk_bodies_dropped_after_study_received)
{
    h_world_init(&W, "retention_interval_s = 1\n");
    h_broker_start(&W);
    cli_t clinic, centre;
    cli_open(&clinic, &W, H_XINZHAN, 1);
    s_any = &clinic;
    cli_open(&centre, &W, H_READ_A, 1);

    enum { CHUNK = 4096, N_CHUNKS = 3 };
    static uint8_t data[CHUNK * N_CHUNKS];
    for (size_t i = 0; i < sizeof data; i++)
        data[i] = (uint8_t)(i * 31 + 7);
    char whole[ML_SHA256_HEX + 1];
    ml_sha256_hex(data, sizeof data, whole);
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    Medlink__V1__Patient p = MEDLINK__V1__PATIENT__INIT;
    p.name = "Imaging Patient";
    p.health_card_id = "130102199001011111";
    Medlink__V1__DicomObject o = MEDLINK__V1__DICOM_OBJECT__INIT;
    o.sop_instance_uid = "1.2.826.0.1.3680043.8.498.1";
    o.file_name = "IM0001.dcm";
    o.size = sizeof data;
    o.sha256 = whole;
    o.chunks = N_CHUNKS;
    Medlink__V1__DicomObject *op = &o;
    Medlink__V1__ImagingConsult ic = MEDLINK__V1__IMAGING_CONSULT__INIT;
    ic.patient = &p;
    ic.study_instance_uid = "1.2.826.0.1.3680043.8.498.2";
    ic.modality = "CT";
    ic.body_part = "CHEST";
    ic.clinical_question = "nodule?";
    ic.n_object = 1;
    ic.object = &op;
    ic.chunk_size = CHUNK;
    ic.total_bytes = sizeof data;
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = id;
    e.case_id = id;
    e.from = clinic.node;
    e.to = H_SERVICE_CT;
    e.created_at = ml_now_ms();
    e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CONSULT;
    e.imaging_consult = &ic;
    cli_expect_accepted(cli_send_wait(&clinic, &e), id);
    for (uint32_t i = 0; i < N_CHUNKS; i++) {
        char cid[ML_ULID_LEN + 1], sha[ML_SHA256_HEX + 1];
        ml_ulid_new(cid);
        ml_sha256_hex(data + i * CHUNK, CHUNK, sha);
        Medlink__V1__ImagingChunk ch = MEDLINK__V1__IMAGING_CHUNK__INIT;
        ch.study_instance_uid = ic.study_instance_uid;
        ch.object_index = 0;
        ch.chunk_index = i;
        ch.offset = (uint64_t)i * CHUNK;
        ch.data.data = data + i * CHUNK;
        ch.data.len = CHUNK;
        ch.sha256 = sha;
        ml_envelope_t c = MEDLINK__V1__ENVELOPE__INIT;
        c.id = cid;
        c.case_id = id;
        c.from = clinic.node;
        c.to = H_READ_A;
        c.created_at = ml_now_ms();
        c.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CHUNK;
        c.imaging_chunk = &ch;
        cli_expect_accepted(cli_send_wait(&clinic, &c), cid);
    }
    cr_assert(cli_run_until(&centre, cli_got_n, (int[]){1 + N_CHUNKS}, 15000),
              "the study did not reach the reading centre (%d)", centre.n_got);
    const char chunk_bodies[] = "SELECT count(*) FROM bodies b JOIN messages m ON m.seq = b.seq"
                                " WHERE m.case_id = ?1 AND m.kind = 23";
    const char chunk_rows[] = "SELECT count(*) FROM messages WHERE case_id = ?1 AND kind = 23";
    /* Delivered, but the study is not received yet: the bodies stay (the
     * centre may still ask for a chunk again). */
    s_pause(2500);
    cr_assert_eq(s_q(chunk_bodies, id), N_CHUNKS, "chunk bodies went before STUDY_RECEIVED");

    char uid[ML_ULID_LEN + 1];
    ml_ulid_new(uid);
    Medlink__V1__ImagingUpdate u = MEDLINK__V1__IMAGING_UPDATE__INIT;
    u.status = IMG_(STUDY_RECEIVED);
    u.objects_received = 1;
    u.bytes_received = sizeof data;
    ml_envelope_t ue = MEDLINK__V1__ENVELOPE__INIT;
    ue.id = uid;
    ue.case_id = id;
    ue.from = centre.node;
    ue.to = H_XINZHAN;
    ue.created_at = ml_now_ms();
    ue.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_UPDATE;
    ue.imaging_update = &u;
    s_accepted(cli_send_wait(&centre, &ue));

    long long left = s_wait_q(chunk_bodies, id, 0, 30000);
    cr_assert_eq(left, 0, "%lld chunk body(ies) left after STUDY_RECEIVED", left);
    /* The chunk rows (metadata), the consult's own body (retention_days
     * has not passed, the case is open) and the timeline stay. */
    cr_assert_eq(s_q(chunk_rows, id), N_CHUNKS);
    cr_assert_eq(s_q("SELECT count(*) FROM bodies b JOIN messages m ON m.seq = b.seq"
                     " WHERE m.id = ?1",
                     id),
                 1, "the consult's body must stay");
    cr_assert_geq(s_q(s_events_of_case, id), 2);
    cr_assert_eq(s_q("SELECT chunks FROM cases WHERE case_id = ?1", id), N_CHUNKS);

    s_any = NULL;
    cli_close(&clinic);
    cli_close(&centre);
    h_broker_stop(&W);
}

/* ---- the file shrinks ----------------------------------------------------- */

Test(retention, retention_file_shrinks)
{
    /* Retention on demand only (the interval is long), to see the file
     * before and after. */
    h_world_init(&W, "retention_seconds = 0\nretention_interval_s = 3600\nnotify_delivered = no\n");
    h_broker_start(&W);
    cli_t clinic, hosp;
    cli_open(&clinic, &W, H_XINZHAN, 1);
    s_any = &clinic;
    cli_open(&hosp, &W, H_COUNTY, 1);
    char ops_cfg[800];
    h_ctl_config(&W, H_OPS, ops_cfg, sizeof ops_cfg);

    enum { N = 150 };
    static char ids[N][ML_ULID_LEN + 1];
    for (int i = 0; i < N; i++)
        s_referral(&clinic, ids[i], 30000);
    cr_assert(cli_run_until(&hosp, cli_got_n, (int[]){N}, 60000), "referrals not delivered (%d)",
              hosp.n_got);
    for (int i = 0; i < N; i++)
        s_accepted(s_update(&hosp, H_XINZHAN, ids[i], REF_(REJECTED)));
    cr_assert(cli_run_until(&clinic, cli_got_n, (int[]){N}, 60000), "updates not delivered (%d)",
              clinic.n_got);
    json_t *st = h_ctl_json(ops_cfg, "--timeout 60 store stats");
    cr_assert_str_eq(json_string_value(json_object_get(st, "autoVacuum")), "incremental");
    long long pages_before = s_num(st, "pageCount");
    long long page_size = s_num(st, "pageSize");
    json_decref(st);
    /* Store schema 5: the payloads are in the segment file, not in pages. */
    char seg[800];
    s_db_path(seg, sizeof seg);
    strcat(seg, "-seg/00000001.seg");
    cr_assert_gt(s_file_size(seg), (long long)N * 30000, "the segment holds the payloads");

    json_t *pr = h_ctl_json(ops_cfg, "--timeout 60 store prune");
    cr_assert_geq(s_num(pr, "messages"), 2 * N, "prune removed %lld messages",
                  s_num(pr, "messages"));
    json_decref(pr);
    cr_assert_lt(s_file_size(seg), (long long)N * 20000, "the segment still holds %lld bytes",
                 s_file_size(seg));

    /* The free pages went back to the file system: few are left inside the
     * file, and broker.db itself (once the checkpointer has copied the
     * vacuum into it) is smaller by about the payloads. */
    st = h_ctl_json(ops_cfg, "--timeout 60 store stats");
    long long pages_after = s_num(st, "pageCount");
    cr_assert_lt(s_num(st, "freePages"), 64, "%lld free pages left", s_num(st, "freePages"));
    json_decref(st);
    cr_assert_leq(pages_after, pages_before, "page count %lld -> %lld", pages_before, pages_after);
    char path[700];
    s_db_path(path, sizeof path);
    long long size = -1;
    for (int waited = 0; waited < 20000; waited += 200) {
        size = s_file_size(path);
        if (size <= pages_after * page_size)
            break;
        s_pause(200);
    }
    cr_assert_leq(size, pages_after * page_size, "broker.db is %lld bytes, %lld pages expected",
                  size, pages_after);

    s_any = NULL;
    cli_close(&clinic);
    cli_close(&hosp);
    h_broker_stop(&W);
}

/* ---- the agent ------------------------------------------------------------ */

/* One integer from an agent's agent.db. */
static long long s_agent_q(const char *node, const char *sql)
{
    char path[800];
    snprintf(path, sizeof path, "%s/data/%s/agent.db", W.dir, node);
    sqlite3 *db = NULL;
    cr_assert_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    sqlite3_stmt *s = NULL;
    cr_assert_eq(sqlite3_prepare_v2(db, sql, -1, &s, NULL), SQLITE_OK, "%s", sqlite3_errmsg(db));
    cr_assert_eq(sqlite3_step(s), SQLITE_ROW, "%s", sqlite3_errmsg(db));
    long long v = sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
    sqlite3_close(db);
    return v;
}

Test(retention, retention_agent_sent_folder)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    /* The clinic keeps sent/ files and settled rows 3 s; the county keeps
     * sent/ for ever (sent_retention_days = 0, the default) and its rows 3 s. */
    h_agent_extra_ini = "sent_retention_seconds = 3\nretention_seconds = 3\n"
                        "retention_interval_s = 1";
    h_agent_start(&W, H_XINZHAN);
    h_agent_extra_ini = "retention_seconds = 3\nretention_interval_s = 1";
    h_agent_start(&W, H_COUNTY);
    h_agent_extra_ini = NULL;

    char *ref = h_referral_json(H_COUNTY, "Retention Agent", NULL);
    h_drop(&W, H_XINZHAN, "referral-ret.json", ref);
    free(ref);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 1, 20000), 1, "referral not in inbox");
    cr_assert_eq(h_wait_count(&W, H_XINZHAN, "sent", 1, 10000), 1, "file not moved to sent/");
    cr_assert_eq(s_agent_q(H_XINZHAN, "SELECT count(*) FROM outbox WHERE state = 1"), 1);
    /* The county answers; its sent/ keeps the file (no sent retention). */
    char *path = h_find_json(&W, H_COUNTY, "inbox", "Retention Agent");
    cr_assert_not_null(path);
    json_error_t jerr;
    json_t *j = json_load_file(path, 0, &jerr);
    cr_assert(j);
    char upd[1024];
    snprintf(upd, sizeof upd,
             "{\"to\": \"%s\", \"caseId\": \"%s\", \"referralUpdate\": {\"status\": "
             "\"REFERRAL_ACCEPTED\"}}",
             H_XINZHAN, json_string_value(json_object_get(j, "caseId")));
    json_decref(j);
    free(path);
    h_drop(&W, H_COUNTY, "update-ret.json", upd);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "sent", 1, 10000), 1);

    /* Within a few seconds the clinic's sent/ is empty again and its
     * settled outbox row is gone; the county's spooled inbox row is gone
     * while the inbox/ file (the hospital system's to take) stays. */
    int left = 1;
    for (int waited = 0; waited < 30000 && left; waited += 200) {
        h_sleep_ms(200);
        left = h_count(&W, H_XINZHAN, "sent");
    }
    cr_assert_eq(left, 0, "sent/ still holds %d file(s)", left);
    long long rows = -1;
    for (int waited = 0; waited < 30000 && rows != 0; waited += 200) {
        rows = s_agent_q(H_XINZHAN, "SELECT count(*) FROM outbox");
        if (rows)
            h_sleep_ms(200);
    }
    cr_assert_eq(rows, 0, "%lld settled outbox row(s) left", rows);
    for (int waited = 0; waited < 30000 && rows != 0; waited += 200) {
        rows = s_agent_q(H_COUNTY, "SELECT count(*) FROM inbox");
        if (rows)
            h_sleep_ms(200);
    }
    cr_assert_eq(h_count(&W, H_COUNTY, "inbox"), 1, "the inbox/ file must stay");
    /* A sleep on purpose: what must not happen is the county agent's own
     * retention pass (every second here) emptying its sent/, which it
     * neither logs when it removes nothing nor tells the broker; 4 s is
     * past sent_retention_seconds' 3 s of the clinic plus a pass. */
    h_sleep_ms(4000);
    cr_assert_eq(h_count(&W, H_COUNTY, "sent"), 1, "sent_retention_days = 0 keeps sent/");
    cr_assert(h_log_contains(&W, "agent-" H_XINZHAN ".log", "retention:") > 0);

    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}

/* ---- medlinkctl store --------------------------------------------------- */

Test(retention, store_stats_and_prune_ctl)
{
    h_world_init(&W, "retention_seconds = 0\nretention_interval_s = 3600\nnotify_delivered = no\n");
    h_broker_start(&W);
    cli_t clinic, hosp;
    cli_open(&clinic, &W, H_XINZHAN, 1);
    s_any = &clinic;
    cli_open(&hosp, &W, H_COUNTY, 1);
    char ops_cfg[800], clinic_cfg[800];
    h_ctl_config(&W, H_OPS, ops_cfg, sizeof ops_cfg);
    h_ctl_config(&W, H_XINZHAN, clinic_cfg, sizeof clinic_cfg);

    char closed[ML_ULID_LEN + 1], open[ML_ULID_LEN + 1];
    s_referral(&clinic, closed, 0);
    s_referral(&clinic, open, 0);
    cr_assert(cli_run_until(&hosp, cli_got_n, (int[]){2}, 15000));
    s_accepted(s_update(&hosp, H_XINZHAN, closed, REF_(REJECTED)));
    cr_assert(cli_run_until(&clinic, cli_got_n, (int[]){1}, 15000));
    /* Delivered marks reach the store in the next group. */
    s_wait_q("SELECT count(*) FROM messages WHERE state = 1", NULL, 3, 10000);

    json_t *st = h_ctl_json(ops_cfg, "--timeout 60 store stats");
    cr_assert_gt(s_num(st, "fileBytes"), 0);
    cr_assert_gt(s_num(st, "pageCount"), 0);
    cr_assert_eq(s_num(st, "retentionMs"), 0);
    cr_assert_eq(s_num(st, "timelineRetentionMs"), 3650LL * 86400000);
    cr_assert_eq(s_rows(st, "messages", "delivered"), 3);
    cr_assert_eq(s_rows(st, "bodies", ""), 3);
    cr_assert_eq(s_rows(st, "cases", "open"), 1);
    cr_assert_eq(s_rows(st, "cases", "final"), 1);
    cr_assert_geq(s_rows(st, "case_events", ""), 4);
    json_t *t0 = json_array_get(json_object_get(st, "table"), 1); /* messages/delivered */
    cr_assert_gt(s_num(t0, "oldestAt"), ml_now_ms() - 600000, "oldest row time");
    json_decref(st);

    /* The table form names every table. */
    char *out = h_ctl(0, ops_cfg, "--timeout 60 store stats");
    cr_assert(strstr(out, "broker.db") && strstr(out, "case_events") && strstr(out, "delivered") &&
                  strstr(out, "incremental"),
              "%s", out);
    free(out);

    /* Not for a clinic: admin requests need an OPS node. */
    out = h_ctl(1, clinic_cfg, "--timeout 60 store prune");
    cr_assert(strstr(out, "OPS"), "%s", out);
    free(out);
    out = h_ctl(1, clinic_cfg, "--timeout 60 store stats");
    free(out);
    cr_assert_eq(s_q(s_msgs_of_case, closed), 2, "a refused prune must not remove anything");

    /* Ops runs retention now: the final case's two messages go, the open
     * case's referral stays, and the reply says so. */
    json_t *pr = h_ctl_json(ops_cfg, "--timeout 60 store prune");
    cr_assert_eq(s_num(pr, "messages"), 2);
    cr_assert_eq(s_num(pr, "bodies"), 2);
    cr_assert_gt(s_num(pr, "payloadBytes"), 0);
    cr_assert_gt(s_num(pr, "startedAt"), 0);
    json_decref(pr);
    cr_assert_eq(s_q(s_msgs_of_case, closed), 0);
    cr_assert_eq(s_q(s_msgs_of_case, open), 1);

    st = h_ctl_json(ops_cfg, "--timeout 60 store stats");
    cr_assert_eq(s_rows(st, "messages", "delivered"), 1);
    cr_assert_eq(s_rows(st, "cases", "final"), 1, "the final case's timeline stays");
    json_t *last = json_object_get(st, "lastPrune");
    cr_assert_eq(s_num(last, "messages"), 2, "stats show the last prune");
    json_decref(st);
    out = h_ctl(0, ops_cfg, "--timeout 60 store prune");
    cr_assert(strstr(out, "removed") && strstr(out, "freed"), "%s", out);
    free(out);

    s_any = NULL;
    cli_close(&clinic);
    cli_close(&hosp);
    h_broker_stop(&W);
}

/* ---- F9: node_queue_bytes ------------------------------------------------- */

Test(retention, f9_queue_bytes_counts_store_bytes)
{
    /* 1 MiB for the county, which stays offline. */
    h_world_init(&W, "node_queue_bytes = 1048576\nnode_rate = 100000\n");
    h_broker_start(&W);
    cli_t clinic;
    cli_open(&clinic, &W, H_XINZHAN, 1);
    s_any = &clinic;
    enum { N = 800, NOTES = 700 };
    int accepted = 0, refused = 0;
    size_t env_len = 0;
    for (int i = 0; i < N && !refused; i++) {
        cli_referral_t r;
        cli_referral(&r, H_XINZHAN, H_COUNTY, "Quota Patient", 0);
        char notes[NOTES + 1];
        memset(notes, 'n', NOTES);
        notes[NOTES] = '\0';
        r.ref.notes = notes;
        if (!env_len)
            env_len = protobuf_c_message_get_packed_size(&r.env.base);
        ml_envelope_t *rep = cli_send_wait(&clinic, &r.env);
        if (rep->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED) {
            accepted++;
        } else {
            cli_expect_nack(rep, NACK_(RATE_LIMITED), "node_queue_bytes");
            refused = 1;
        }
    }
    /* N envelopes fit in 1 MiB, so counting envelopes alone never refuses;
     * counted as the store holds them (body + ML_STORE_ROW_OVERHEAD) the
     * quota is reached at 1 MiB / that. */
    cr_assert_lt((size_t)N * env_len, 1048576u, "the test's envelopes are too large (%zu)",
                 env_len);
    cr_assert(refused, "%d messages of %zu bytes (%zu on disk each) were all accepted", accepted,
              env_len, (size_t)ml_store_cost(env_len));
    long expect = (long)(1048576 / ml_store_cost(env_len));
    cr_assert(accepted >= expect - 5 && accepted <= expect + 5,
              "refused after %d messages, expected about %ld", accepted, expect);
    s_any = NULL;
    cli_close(&clinic);
    h_broker_stop(&W);
}
