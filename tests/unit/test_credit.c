/* broker/submit.c's credit sizing without a running broker
 * (docs/protocol.md, "Credit"): the share of the store backlog each
 * active sender is granted, the count of active senders over the last
 * 1-2 s, and the hard limit at twice the backlog. */
#include <string.h>

#include <criterion/criterion.h>

#include "broker_int.h"
#include "config.h"
#include "submit.h"

#define MIB (1024u * 1024)

static ml_broker_config_t s_cfg;
static ml_broker_t s_b;

static void s_setup(void)
{
    memset(&s_cfg, 0, sizeof s_cfg);
    memset(&s_b, 0, sizeof s_b);
    s_cfg.store_backlog = 16384;
    s_cfg.store_backlog_bytes = 32 * MIB;
    s_cfg.max_credit = 4096;
    s_cfg.max_record = 4 * MIB;
    s_b.cfg = &s_cfg;
}

Test(credit, share_one_sender_is_clamped_to_max_credit)
{
    uint32_t m;
    uint64_t by;
    ml_submit_credit_share(16384, 32 * MIB, 1, 4096, 4 * MIB, &m, &by);
    cr_assert_eq(m, 4096);
    cr_assert_eq(by, 32 * MIB);
    /* No active sender counts as one. */
    ml_submit_credit_share(16384, 32 * MIB, 0, 4096, 4 * MIB, &m, &by);
    cr_assert_eq(m, 4096);
}

Test(credit, share_64_senders_sum_within_budget)
{
    uint32_t m;
    uint64_t by;
    ml_submit_credit_share(16384, 32 * MIB, 64, 4096, 64 * 1024, &m, &by);
    cr_assert_eq(m, 256);
    cr_assert_leq(64 * (uint64_t)m, 16384);
    cr_assert_eq(by, 512 * 1024);
    cr_assert_leq(64 * by, 32 * MIB);
}

Test(credit, share_never_below_one_message_nor_one_max_record)
{
    uint32_t m;
    uint64_t by;
    ml_submit_credit_share(16384, 32 * MIB, 100000, 4096, 4 * MIB, &m, &by);
    cr_assert_eq(m, 1);
    cr_assert_eq(by, 4 * MIB);
    ml_submit_credit_share(0, 0, 3, 4096, 4096, &m, &by);
    cr_assert_eq(m, 1);
    cr_assert_eq(by, 4096);
}

Test(credit, active_senders_decay_after_two_seconds, .init = s_setup)
{
    ml_session_t a, c;
    memset(&a, 0, sizeof a);
    memset(&c, 0, sizeof c);
    cr_assert_eq(ml_submit_credit_active(&s_b, 10000), 0);
    ml_submit_credit_note(&s_b, &a, 10000);
    ml_submit_credit_note(&s_b, &a, 10400); /* same second: counted once */
    cr_assert_eq(ml_submit_credit_active(&s_b, 10500), 1);
    /* The next second: a is still active (sent in the second before). */
    ml_submit_credit_note(&s_b, &c, 11200);
    cr_assert_eq(ml_submit_credit_active(&s_b, 11200), 2);
    /* a sends again: it moves to the current second, not counted twice. */
    ml_submit_credit_note(&s_b, &a, 11300);
    cr_assert_eq(ml_submit_credit_active(&s_b, 11300), 2);
    cr_assert_eq(ml_submit_credit_active(&s_b, 12900), 2);
    /* Two seconds without a record: no one is active any more. */
    cr_assert_eq(ml_submit_credit_active(&s_b, 13000), 0);
    ml_submit_credit_note(&s_b, &a, 13100);
    cr_assert_eq(ml_submit_credit_active(&s_b, 13100), 1);
}

Test(credit, closed_session_leaves_the_count, .init = s_setup)
{
    ml_session_t a, c;
    memset(&a, 0, sizeof a);
    memset(&c, 0, sizeof c);
    ml_submit_credit_note(&s_b, &a, 5000);
    ml_submit_credit_note(&s_b, &c, 5100);
    cr_assert_eq(ml_submit_credit_active(&s_b, 5200), 2);
    ml_submit_credit_forget(&s_b, &a, 6100); /* a counted in the second before */
    cr_assert_eq(ml_submit_credit_active(&s_b, 6100), 1);
    ml_submit_credit_forget(&s_b, &a, 6100); /* twice: nothing more */
    cr_assert_eq(ml_submit_credit_active(&s_b, 6100), 1);
    ml_submit_credit_forget(&s_b, &c, 6200);
    cr_assert_eq(ml_submit_credit_active(&s_b, 6200), 0);
}

Test(credit, sixty_four_senders_windows_sum_within_budget, .init = s_setup)
{
    static ml_session_t s[64];
    memset(s, 0, sizeof s);
    for (int i = 0; i < 64; i++)
        ml_submit_credit_note(&s_b, &s[i], 20000 + i);
    uint64_t sum = 0, sum_bytes = 0;
    for (int i = 0; i < 64; i++) {
        uint32_t m;
        uint64_t by;
        ml_submit_credit_at(&s_b, &s[i], 20500, &m, &by);
        cr_assert_eq(m, 256);
        sum += m;
        sum_bytes += by;
    }
    cr_assert_leq(sum, (uint64_t)s_cfg.store_backlog);
    /* max_record (4 MiB) is above the byte share (512 KiB): each gets one. */
    cr_assert_eq(sum_bytes, 64 * (uint64_t)s_cfg.max_record);
    /* A 65th session, not yet active, counts itself in. */
    ml_session_t late;
    memset(&late, 0, sizeof late);
    uint32_t m;
    uint64_t by;
    ml_submit_credit_at(&s_b, &late, 20500, &m, &by);
    cr_assert_eq(m, 16384 / 65);
}

Test(credit, one_sender_gets_max_credit, .init = s_setup)
{
    ml_session_t a;
    memset(&a, 0, sizeof a);
    uint32_t m;
    uint64_t by;
    /* Before it sends (its Welcome), then once it is the one active. */
    ml_submit_credit_at(&s_b, &a, 1000, &m, &by);
    cr_assert_eq(m, 4096);
    ml_submit_credit_note(&s_b, &a, 1000);
    ml_submit_credit_at(&s_b, &a, 1500, &m, &by);
    cr_assert_eq(m, 4096);
    cr_assert_eq(by, 32 * MIB);
}

Test(credit, hard_limit_is_twice_the_backlog, .init = s_setup)
{
    s_b.credit.session_puts = 2 * 16384 - 1;
    s_b.puts_pending = 100000; /* the broker's own notices do not count */
    cr_assert_not(ml_submit_backlog_full(&s_b));
    s_b.credit.session_puts = 2 * 16384;
    cr_assert(ml_submit_backlog_full(&s_b));
    s_b.credit.session_puts = 0;
    s_b.puts_pending = 0;
    s_b.puts_pending_bytes = 64 * (uint64_t)MIB;
    cr_assert(ml_submit_backlog_full(&s_b));
}

Test(credit, window_grows_at_most_doubling_and_shrinks_at_once)
{
    /* The first Accepted after the Welcome's 64: at most 128. */
    cr_assert_eq(ml_submit_credit_grow(0, 4096), 2 * ML_SUBMIT_CREDIT_WELCOME);
    cr_assert_eq(ml_submit_credit_grow(128, 4096), 256);
    cr_assert_eq(ml_submit_credit_grow(256, 300), 300);
    cr_assert_eq(ml_submit_credit_grow(1000, 256), 256);
    cr_assert_eq(ml_submit_credit_grow(3000000000u, 4000000000u), 4000000000u);
}

Test(credit, senders_waiting_for_the_store_stay_active, .init = s_setup)
{
    ml_session_t a;
    memset(&a, 0, sizeof a);
    ml_submit_credit_note(&s_b, &a, 1000);
    /* Long after its last record, its puts still wait (a stalled store). */
    s_b.credit.n_waiting = 3;
    cr_assert_eq(ml_submit_credit_active(&s_b, 60000), 3);
    s_b.credit.n_waiting = 0;
    cr_assert_eq(ml_submit_credit_active(&s_b, 60000), 0);
}
