/* What the broker keeps of a case in memory, with the real medlinkd (F8):
 * an open case that nobody is working on (no deadline running, nothing
 * queued, nothing being stored) leaves memory and is read back from the
 * store when a message for it comes, while every count that depends on it
 * (the status' open cases, the open_cases_per_node quota, the "case_id in
 * use" refusal) stays as if it were still there, across a restart too;
 * and what only memory counted (an imaging case's duplicate chunks) is
 * stored before the case leaves it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "cases.h"
#include "client.h"
#include "harness.h"
#include "ml_common.h"

#include "short.h"

static h_world_t W;

static void s_teardown(void)
{
    h_world_fini(&W);
}

TestSuite(security, .fini = s_teardown, .timeout = 600);

/* VmRSS of pid in KiB. */
static long s_rss_kib(pid_t pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    cr_assert(f, "cannot read %s", path);
    long kib = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
            break;
    fclose(f);
    cr_assert(kib > 0);
    return kib;
}

/* Forgets what c has received so far, so that a long test keeps room for
 * what comes next (the client keeps at most CLI_MAX of each). */
static void s_forget(cli_t *c)
{
    for (int i = 0; i < c->n; i++)
        ml_env_free(&c->replies[i]);
    c->n = 0;
    for (int i = 0; i < c->n_got; i++)
        ml_env_free(&c->got[i]);
    c->n_got = 0;
}

/* *(int *)arg message ids accepted (Accepted is cumulative); a Nack fails
 * the test at once. */
static int s_accepted_n(cli_t *c, void *arg)
{
    size_t n = 0;
    for (int i = 0; i < c->n; i++) {
        const ml_envelope_t *r = c->replies[i];
        cr_assert_neq(r->payload_case, MEDLINK__V1__ENVELOPE__PAYLOAD_NACK, "refused: %s",
                      r->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_NACK ? r->nack->reason
                                                                             : "");
        if (r->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED)
            n += r->accepted->n_message_ids;
    }
    return n >= (size_t) * (int *)arg;
}

typedef struct {
    uint64_t open, in_memory, opened, delivered_county;
} s_status_t;

static s_status_t s_status(cli_t *ops)
{
    Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
    rq.op = OP_(STATUS);
    const Medlink__V1__AdminReply *rep = cli_admin(ops, &rq);
    cr_assert(rep->broker_status);
    s_status_t st = {rep->broker_status->open_cases, rep->broker_status->cases_in_memory, 0, 0};
    for (size_t i = 0; i < rep->broker_status->n_node; i++) {
        const Medlink__V1__NodeStatus *n = rep->broker_status->node[i];
        if (strcmp(n->node_id, H_XINZHAN) == 0)
            st.opened = n->open_cases_opened;
        else if (strcmp(n->node_id, H_COUNTY) == 0)
            st.delivered_county = n->delivered;
    }
    return st;
}

static int s_never(cli_t *c, void *arg)
{
    return 0;
}

/* Lets every open client run (acknowledging what it is delivered) for ms. */
static void s_run_all(cli_t *c, int ms)
{
    cli_run_until(c, s_never, NULL, ms);
}

/* Polls the status until the cases in memory are at most max (deliveries
 * recorded, the cases released), or 60 s pass; returns the last status. */
static s_status_t s_wait_in_memory(cli_t *ops, uint64_t max)
{
    s_status_t st = s_status(ops);
    for (int i = 0; i < 300 && st.in_memory > max; i++) {
        s_run_all(ops, 200);
        st = s_status(ops);
    }
    return st;
}

/* A ReferralUpdate of case_id with status st from c to `to`. */
static ml_envelope_t *s_update(cli_t *c, const char *to, const char *case_id, int st, char *id)
{
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

static int s_got_id(cli_t *c, void *arg)
{
    for (int i = 0; i < c->n_got; i++)
        if (strcmp(c->got[i]->id, (const char *)arg) == 0)
            return 1;
    return 0;
}

#define S_N 3000
#define S_BATCH 500
#define S_KEEP 4 /* openings kept whole, to be sent again */

/* N routine referrals (no deadline rule for ROUTINE) are delivered and
 * acknowledged: afterwards no case is in memory, yet N are open. An update
 * of one of them is read back, checked and delivered; the quota counts the
 * cases that left memory; a new opening cannot take one's case id, and a
 * resend of one's opening is a duplicate; a restart keeps every count. */
Test(security, f8_idle_open_cases_leave_memory)
{
    char ini[256];
    snprintf(ini, sizeof ini,
             "open_cases_per_node = %d\nnode_rate = 100000\n[deadlines]\n"
             "referral.urgent = ACCEPTED 1h\n",
             S_N + 5);
    h_world_init(&W, ini);
    h_broker_start(&W);
    cli_t clinic, county, ops;
    cli_open(&clinic, &W, H_XINZHAN, 1); /* acks the DELIVERED notices */
    cli_open(&county, &W, H_COUNTY, 1);
    cli_open(&ops, &W, H_OPS, 0);
    long rss_before = s_rss_kib(W.broker);

    static char ids[S_N][ML_ULID_LEN + 1];
    static cli_referral_t keep[S_KEEP];
    for (int b = 0; b < S_N; b += S_BATCH) {
        s_forget(&clinic);
        for (int i = b; i < b + S_BATCH; i++) {
            cli_referral_t r, *rp = i < S_KEEP ? &keep[i] : &r;
            cli_referral(rp, H_XINZHAN, H_COUNTY, "Idle Patient", 0);
            snprintf(ids[i], sizeof ids[i], "%s", rp->id);
            cr_assert_eq(ml_channel_send(clinic.ch, &rp->env), 0);
        }
        int want = S_BATCH;
        cr_assert(cli_run_until(&clinic, s_accepted_n, &want, 60000), "batch %d not accepted",
                  b / S_BATCH);
    }
    s_forget(&clinic);

    /* Every referral delivered and its delivery recorded: nothing needs
     * any of them in memory now. */
    s_status_t st = s_status(&ops);
    for (int i = 0; i < 300 && st.delivered_county < S_N; i++) {
        s_run_all(&ops, 200);
        st = s_status(&ops);
    }
    cr_assert_geq(st.delivered_county, S_N, "only %llu delivered",
                  (unsigned long long)st.delivered_county);
    st = s_wait_in_memory(&ops, 0);
    s_forget(&clinic);
    s_forget(&county);
    long rss_after = s_rss_kib(W.broker);
    cr_log_info("F8 case memory: broker VmRSS %ld KiB before, %ld KiB with %d open cases "
                "(%llu of them in memory)",
                rss_before, rss_after, S_N, (unsigned long long)st.in_memory);
    cr_assert_eq(st.in_memory, 0, "%llu idle open cases still in memory",
                 (unsigned long long)st.in_memory);
    cr_assert_eq(st.open, S_N);
    cr_assert_eq(st.opened, S_N);

    /* A case with a deadline running stays in memory until the deadline
     * is met. */
    cli_referral_t urgent;
    cli_referral(&urgent, H_XINZHAN, H_COUNTY, "Urgent Patient", 1);
    cli_expect_accepted(cli_send_wait(&clinic, &urgent.env), urgent.id);
    cr_assert(cli_run_until(&county, s_got_id, urgent.id, 10000), "urgent referral not delivered");
    s_run_all(&ops, 500);
    st = s_status(&ops);
    cr_assert_eq(st.in_memory, 1, "the case with a deadline is not in memory (%llu)",
                 (unsigned long long)st.in_memory);
    cr_assert_eq(st.open, S_N + 1);
    cr_assert_eq(st.opened, S_N + 1);

    /* Updates of cases that left memory are checked against them as read
     * back, and delivered. */
    char uid[ML_ULID_LEN + 1];
    const char *cases[2] = {ids[0], urgent.id};
    for (int i = 0; i < 2; i++) {
        cli_expect_accepted(s_update(&county, H_XINZHAN, cases[i], REF_(ACCEPTED), uid), uid);
        cr_assert(cli_run_until(&clinic, s_got_id, uid, 10000), "update of %s not delivered",
                  cases[i]);
    }
    /* Read back, the case is in its new state: ACCEPTED cannot come again. */
    ml_envelope_t *r = s_update(&county, H_XINZHAN, ids[0], REF_(ACCEPTED), uid);
    cli_expect_nack(r, NACK_(ILLEGAL_TRANSITION), "REFERRAL_ACCEPTED");
    /* The deadline is met, so the urgent case leaves memory too; both are
     * still open. */
    st = s_wait_in_memory(&ops, 0);
    cr_assert_eq(st.in_memory, 0, "%llu cases still in memory", (unsigned long long)st.in_memory);
    cr_assert_eq(st.open, S_N + 1);
    cr_assert_eq(st.opened, S_N + 1);

    /* A new case cannot take the id of one that left memory, and the
     * refused opening counts nothing. */
    cli_referral_t reuse;
    cli_referral(&reuse, H_XINZHAN, H_COUNTY, "Reused Id", 0);
    reuse.env.case_id = ids[1];
    cli_expect_nack(cli_send_wait(&clinic, &reuse.env), NACK_(INVALID), "already in use");
    /* The opening of one sent again is a duplicate, delivered only once. */
    r = cli_send_wait(&clinic, &keep[2].env);
    cli_expect_accepted(r, keep[2].id);
    cr_assert_eq(r->accepted->n_duplicate_ids, 1, "a resent opening is not a duplicate");
    st = s_wait_in_memory(&ops, 0);
    cr_assert_eq(st.open, S_N + 1, "open cases %llu", (unsigned long long)st.open);
    cr_assert_eq(st.opened, S_N + 1, "opened %llu", (unsigned long long)st.opened);
    cr_assert_eq(st.in_memory, 0);

    /* The quota counts the cases that left memory: 4 more fill it. */
    for (int i = 0; i < 4; i++) {
        cli_referral_t more;
        cli_referral(&more, H_XINZHAN, H_COUNTY, "Quota Patient", 0);
        cli_expect_accepted(cli_send_wait(&clinic, &more.env), more.id);
    }
    cli_referral_t over;
    cli_referral(&over, H_XINZHAN, H_COUNTY, "One Too Many", 0);
    cli_expect_nack(cli_send_wait(&clinic, &over.env), NACK_(FORBIDDEN), "open_cases_per_node");
    /* At the quota, a resent opening is still answered as a duplicate. */
    r = cli_send_wait(&clinic, &keep[3].env);
    cli_expect_accepted(r, keep[3].id);
    cr_assert_eq(r->accepted->n_duplicate_ids, 1);
    st = s_wait_in_memory(&ops, 0);
    cr_assert_eq(st.open, S_N + 5);
    cr_assert_eq(st.opened, S_N + 5);

    /* A restart counts from the store, and loads none of them. */
    cli_close(&clinic);
    cli_close(&county);
    cli_close(&ops);
    h_broker_stop(&W);
    h_broker_start(&W);
    cli_open(&clinic, &W, H_XINZHAN, 1);
    cli_open(&county, &W, H_COUNTY, 1);
    cli_open(&ops, &W, H_OPS, 0);
    st = s_status(&ops);
    cr_assert_eq(st.open, S_N + 5, "open cases after restart %llu", (unsigned long long)st.open);
    cr_assert_eq(st.opened, S_N + 5, "opened after restart %llu", (unsigned long long)st.opened);
    cr_assert_eq(st.in_memory, 0, "%llu cases loaded at start", (unsigned long long)st.in_memory);
    long rss_restart = s_rss_kib(W.broker);
    cr_log_info("F8 case memory: broker VmRSS %ld KiB after a restart with %d open cases",
                rss_restart, S_N + 5);
    cli_referral(&over, H_XINZHAN, H_COUNTY, "Still Too Many", 0);
    cli_expect_nack(cli_send_wait(&clinic, &over.env), NACK_(FORBIDDEN), "open_cases_per_node");

    /* Closing a case read back frees exactly one place. */
    cli_expect_accepted(s_update(&county, H_XINZHAN, ids[4], REF_(REJECTED), uid), uid);
    cr_assert(cli_run_until(&clinic, s_got_id, uid, 10000), "rejection not delivered");
    st = s_wait_in_memory(&ops, 0);
    cr_assert_eq(st.open, S_N + 4);
    cr_assert_eq(st.opened, S_N + 4);
    /* With room for one, a new case still cannot take the id of a case
     * that is only in the store, and the refusal takes no place. */
    reuse.env.case_id = ids[5];
    ml_ulid_new(reuse.id);
    cli_expect_nack(cli_send_wait(&clinic, &reuse.env), NACK_(INVALID), "already in use");
    st = s_wait_in_memory(&ops, 0);
    cr_assert_eq(st.opened, S_N + 4, "opened %llu", (unsigned long long)st.opened);
    cli_referral(&over, H_XINZHAN, H_COUNTY, "Room Again", 0);
    cli_expect_accepted(cli_send_wait(&clinic, &over.env), over.id);
    cli_referral(&over, H_XINZHAN, H_COUNTY, "Full Again", 0);
    cli_expect_nack(cli_send_wait(&clinic, &over.env), NACK_(FORBIDDEN), "open_cases_per_node");

    cli_close(&clinic);
    cli_close(&county);
    cli_close(&ops);
    h_broker_stop(&W);
}

static const Medlink__V1__CaseInfo *s_case_show(cli_t *ops, const char *case_id)
{
    Medlink__V1__AdminRequest rq = MEDLINK__V1__ADMIN_REQUEST__INIT;
    rq.op = OP_(CASE_SHOW);
    rq.case_id = (char *)case_id;
    const Medlink__V1__AdminReply *rep = cli_admin(ops, &rq);
    cr_assert_eq(rep->status, 0, "case show %s: %s", case_id, rep->error);
    return rep->case_info;
}

#define S_CHUNK 4096
#define S_SHA0 "0000000000000000000000000000000000000000000000000000000000000000"

/* An imaging case that leaves memory between chunks keeps what only
 * memory knew: a chunk sent again is not stored again, so the store does
 * not write the case's row for it, and its count of duplicate chunks is
 * stored before the case leaves memory. Chunks after it are checked
 * against the case as read back. */
Test(security, f8_imaging_case_read_back_keeps_its_counts)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cli_t clinic, centre, ops;
    cli_open(&clinic, &W, H_XINZHAN, 1);
    cli_open(&centre, &W, H_READ_A, 1);
    cli_open(&ops, &W, H_OPS, 0);

    char cid[ML_ULID_LEN + 1];
    ml_ulid_new(cid);
    Medlink__V1__Patient pat = MEDLINK__V1__PATIENT__INIT;
    pat.health_card_id = "130102198001011234";
    pat.name = "Imaging Patient";
    Medlink__V1__DicomObject obj = MEDLINK__V1__DICOM_OBJECT__INIT, *objp = &obj;
    obj.sop_instance_uid = "1.2.840.113619.2.55.1";
    obj.file_name = "IM0001.dcm";
    obj.size = 2 * S_CHUNK;
    obj.sha256 = S_SHA0;
    obj.chunks = 2;
    Medlink__V1__ImagingConsult ic = MEDLINK__V1__IMAGING_CONSULT__INIT;
    ic.patient = &pat;
    ic.study_instance_uid = "1.2.840.113619.2.55";
    ic.modality = "CT";
    ic.n_object = 1;
    ic.object = &objp;
    ic.chunk_size = S_CHUNK;
    ic.total_bytes = 2 * S_CHUNK;
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = cid;
    e.case_id = cid;
    e.kind = MEDLINK__V1__KIND__KIND_IMAGING_CONSULT;
    e.from = H_XINZHAN;
    e.to = H_READ_A;
    e.created_at = ml_now_ms();
    e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CONSULT;
    e.imaging_consult = &ic;
    cli_expect_accepted(cli_send_wait(&clinic, &e), cid);

    static uint8_t data[S_CHUNK];
    memset(data, 0x5a, sizeof data);
    Medlink__V1__ImagingChunk ch[2];
    ml_envelope_t ce[2];
    char chid[2][ML_ULID_LEN + 1];
    for (int i = 0; i < 2; i++) {
        medlink__v1__imaging_chunk__init(&ch[i]);
        ch[i].study_instance_uid = ic.study_instance_uid;
        ch[i].chunk_index = (uint32_t)i;
        ch[i].offset = (uint64_t)i * S_CHUNK;
        ch[i].data.data = data;
        ch[i].data.len = sizeof data;
        ch[i].sha256 = S_SHA0;
        ml_ulid_new(chid[i]);
        medlink__v1__envelope__init(&ce[i]);
        ce[i].id = chid[i];
        ce[i].case_id = cid;
        ce[i].kind = MEDLINK__V1__KIND__KIND_IMAGING_CHUNK;
        ce[i].from = H_XINZHAN;
        ce[i].to = H_READ_A;
        ce[i].created_at = ml_now_ms();
        ce[i].payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CHUNK;
        ce[i].imaging_chunk = &ch[i];
    }
    cli_expect_accepted(cli_send_wait(&clinic, &ce[0]), chid[0]);
    s_status_t st = s_wait_in_memory(&ops, 0);
    cr_assert_eq(st.in_memory, 0, "the consult is still in memory");

    /* The same chunk again: a duplicate, read back and counted. */
    ml_envelope_t *r = cli_send_wait(&clinic, &ce[0]);
    cli_expect_accepted(r, chid[0]);
    cr_assert_eq(r->accepted->n_duplicate_ids, 1);
    st = s_wait_in_memory(&ops, 0);
    cr_assert_eq(st.in_memory, 0);
    const Medlink__V1__CaseInfo *ci = s_case_show(&ops, cid);
    cr_assert_eq(ci->chunks, 1, "chunks %u", ci->chunks);
    cr_assert_eq(ci->duplicate_chunks, 1, "the duplicate chunk was not kept (%u)",
                 ci->duplicate_chunks);
    cr_assert_eq(ci->chunks_expected, 2);
    cr_assert_str_eq(ci->state, "IMAGING_ASSIGNED");

    /* The next chunk is checked against the case as read back. */
    cli_expect_accepted(cli_send_wait(&clinic, &ce[1]), chid[1]);
    st = s_wait_in_memory(&ops, 0);
    ci = s_case_show(&ops, cid);
    cr_assert_eq(ci->chunks, 2);
    cr_assert_eq(ci->duplicate_chunks, 1);
    cr_assert_eq(st.open, 1);

    cli_close(&clinic);
    cli_close(&centre);
    cli_close(&ops);
    h_broker_stop(&W);
}
