/* The agent's receive batch (clients/agent/inbox.c) on a real store and
 * spool folder, with a plug-in played by the test: deliveries are kept
 * until the flush, stored in one transaction and acknowledged only then
 * (duplicates too); a delivery that cannot be spooled is refused, never
 * acknowledged; a plug-in gets exactly the deliveries of its kinds and
 * sets their acks; a plug-in failure rolls the whole batch back, so
 * nothing is acknowledged and the messages are new again next time. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "astore.h"
#include "inbox.h"
#include "ml_common.h"
#include "ml_env.h"
#include "spool.h"
#include "support.h"

#define NODE "township.xinzhan.clinic"
#define COUNTY "county.zhaozhou.hospital"
#define K_(x) MEDLINK__V1__KIND__KIND_##x

static char s_dir[512];
static ml_astore_t *s_store;
static ml_spool_t *s_sp;
static ml_inbox_t *s_ib;

/* What the inbox sent, and what the plug-in saw. */
static char s_acked[64][32];
static size_t s_n_acked, s_n_ack_records;
static char s_refused[8][32];
static size_t s_n_refused;
static size_t s_seen_msgs, s_seen_new, s_seen_taken;
static int s_fail, s_commits, s_aborts;

static void s_ack_cb(void *arg, char **ids, size_t n)
{
    (void)arg;
    s_n_ack_records++;
    for (size_t i = 0; i < n && s_n_acked < 64; i++)
        snprintf(s_acked[s_n_acked++], 32, "%s", ids[i]);
}

static void s_refusal_cb(void *arg, const char *id, const char *why)
{
    (void)arg;
    cr_assert(why && *why);
    if (s_n_refused < 8)
        snprintf(s_refused[s_n_refused++], 32, "%s", id);
}

/* Acknowledges every other chunk, or fails the batch. */
static int s_on_batch(void *arg, const ml_spool_msg_t *msgs, size_t n, ml_spool_msg_t *taken,
                      size_t nt)
{
    cr_assert_eq(arg, &s_ib);
    s_seen_msgs += n;
    for (size_t i = 0; i < n; i++)
        s_seen_new += msgs[i].inserted;
    for (size_t i = 0; i < nt; i++) {
        cr_assert_eq(taken[i].kind, K_(IMAGING_CHUNK));
        cr_assert_eq(taken[i].ack, 0);
        taken[i].ack = i % 2 == 0;
    }
    s_seen_taken += nt;
    return s_fail ? ML_ESTORE : 0;
}

static void s_on_commit(void *arg)
{
    (void)arg;
    s_commits++;
}

static void s_on_abort(void *arg)
{
    (void)arg;
    s_aborts++;
}

static void s_setup(void)
{
    char err[512], db[700], spool[600];
    ml_log_set_level(ML_LOG_ERROR);
    ml_test_tmpdir(s_dir, sizeof s_dir);
    snprintf(db, sizeof db, "%s/agent.db", s_dir);
    snprintf(spool, sizeof spool, "%s/spool", s_dir);
    cr_assert_eq(ml_mkdirs(spool), 0);
    cr_assert_eq(ml_astore_open(db, &s_store, err, sizeof err), 0, "%s", err);
    ml_spool_config_t cfg = {spool, NODE, 4194304, s_store};
    cr_assert_eq(ml_spool_new(&cfg, &s_sp, err, sizeof err), 0, "%s", err);
    ml_inbox_config_t bcfg = {.store = s_store,
                              .spool = s_sp,
                              .send_ack = s_ack_cb,
                              .send_refusal = s_refusal_cb,
                              .arg = NULL};
    cr_assert_eq(ml_inbox_new(&bcfg, &s_ib), 0);
}

static void s_teardown(void)
{
    ml_inbox_destroy(&s_ib);
    ml_inbox_destroy(&s_ib);
    ml_spool_destroy(&s_sp);
    ml_astore_destroy(&s_store);
    ml_test_sh("rm -rf '%s'", s_dir);
}

TestSuite(inbox, .init = s_setup, .fini = s_teardown, .timeout = 30);

static void s_push(const char *id, int kind)
{
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = (char *)id;
    e.case_id = "case-1";
    e.from = COUNTY;
    e.to = NODE;
    e.kind = (Medlink__V1__Kind)kind;
    e.created_at = ml_now_ms();
    (void)ml_inbox_push(s_ib, &e);
}

static void s_add_plugin(void)
{
    ml_inbox_plugin_t p = {.kind_mask = ML_INBOX_KIND(K_(IMAGING_CHUNK)),
                           .on_batch = s_on_batch,
                           .on_commit = s_on_commit,
                           .on_abort = s_on_abort,
                           .arg = &s_ib};
    cr_assert_eq(ml_inbox_add_plugin(s_ib, &p), 0);
    cr_assert_eq(ml_inbox_add_plugin(s_ib, &p), ML_EINVAL, "overlapping kinds are refused");
}

Test(inbox, acks_only_after_the_flush_and_refuses_what_cannot_be_spooled)
{
    char ids[3][ML_ULID_LEN + 1];
    for (int i = 0; i < 3; i++) {
        ml_ulid_new(ids[i]);
        s_push(ids[i], K_(REFERRAL));
    }
    s_push("not-a-ulid", K_(REFERRAL));
    s_push("", K_(REFERRAL));
    cr_assert_eq(ml_inbox_pending(s_ib), 3);
    cr_assert_eq(s_n_refused, 1);
    cr_assert_str_eq(s_refused[0], "not-a-ulid");
    cr_assert_eq(s_n_acked, 0, "nothing is acknowledged before it is stored");
    cr_assert_eq(ml_inbox_flush(s_ib), 0);
    cr_assert_eq(ml_inbox_pending(s_ib), 0);
    cr_assert_eq(s_n_ack_records, 1, "one cumulative Ack");
    cr_assert_eq(s_n_acked, 3);
    for (int i = 0; i < 3; i++)
        cr_assert_str_eq(s_acked[i], ids[i]);
    /* A duplicate is stored already, and acknowledged again. */
    s_push(ids[1], K_(REFERRAL));
    cr_assert_eq(ml_inbox_flush(s_ib), 0);
    cr_assert_eq(s_n_acked, 4);
    cr_assert_str_eq(s_acked[3], ids[1]);
    cr_assert_eq(ml_inbox_flush(s_ib), 0, "an empty batch is nothing to do");
    cr_assert_eq(s_n_ack_records, 2);
}

Test(inbox, a_plugin_takes_its_kinds_and_its_failure_rolls_everything_back)
{
    s_add_plugin();
    char m1[ML_ULID_LEN + 1], c1[ML_ULID_LEN + 1], c2[ML_ULID_LEN + 1], m2[ML_ULID_LEN + 1];
    ml_ulid_new(m1);
    ml_ulid_new(c1);
    ml_ulid_new(c2);
    ml_ulid_new(m2);

    /* The plug-in fails: nothing is acknowledged, and nothing was kept. */
    s_fail = 1;
    s_push(m1, K_(REFERRAL));
    s_push(c1, K_(IMAGING_CHUNK));
    s_push(c2, K_(IMAGING_CHUNK));
    s_push(m2, K_(REFERRAL));
    cr_assert_eq(ml_inbox_flush(s_ib), ML_ESTORE);
    cr_assert_eq(s_n_acked, 0);
    cr_assert_eq(s_aborts, 1);
    cr_assert_eq(s_commits, 0);
    cr_assert_eq(s_seen_msgs, 2, "chunks never go through the spool");
    cr_assert_eq(s_seen_taken, 2);

    /* Delivered again: the messages are new (the first store was rolled
     * back), the plug-in's acks decide for its chunks. */
    s_fail = 0;
    s_seen_msgs = s_seen_new = s_seen_taken = 0;
    s_push(m1, K_(REFERRAL));
    s_push(c1, K_(IMAGING_CHUNK));
    s_push(c2, K_(IMAGING_CHUNK));
    s_push(m2, K_(REFERRAL));
    cr_assert_eq(ml_inbox_flush(s_ib), 0);
    cr_assert_eq(s_seen_new, 2, "the rolled-back messages are new again");
    cr_assert_eq(s_commits, 1);
    cr_assert_eq(s_n_acked, 3, "both messages and the chunk the plug-in acknowledged");
    cr_assert_str_eq(s_acked[0], m1);
    cr_assert_str_eq(s_acked[1], m2);
    cr_assert_str_eq(s_acked[2], c1);

    /* Without the plug-in a chunk goes through the spool like any
     * message. */
    ml_inbox_remove_plugins(s_ib, &s_ib);
    s_seen_taken = 0;
    char c3[ML_ULID_LEN + 1];
    ml_ulid_new(c3);
    s_push(c3, K_(IMAGING_CHUNK));
    cr_assert_eq(ml_inbox_flush(s_ib), 0);
    cr_assert_eq(s_seen_taken, 0);
    cr_assert_eq(s_n_acked, 4);
}

/* A kind no mask can name (a peer may put any number there) is neither
 * taken by a plug-in nor a crash: it goes through the spool. */
Test(inbox, a_kind_out_of_range_goes_to_the_spool)
{
    s_add_plugin();
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    s_push(id, 1000);
    cr_assert_eq(ml_inbox_flush(s_ib), 0);
    cr_assert_eq(s_seen_taken, 0);
    cr_assert_eq(s_seen_msgs, 1);
    cr_assert_eq(s_n_acked, 1);
}
