/* Delivery queue order: EMERGENCY overtakes URGENT overtakes ROUTINE; within
 * a priority, acceptance (seq) order; requeued in-flight messages go back to
 * the head in their original order. */
#include <criterion/criterion.h>
#include <stdio.h>

#include "queue.h"

static ml_qitem_t s_item(int64_t seq, int prio)
{
    ml_qitem_t it = {.seq = seq, .accepted_at = 1000 + seq, .size = 100, .priority = (uint8_t)prio};
    snprintf(it.id, sizeof it.id, "ID%024lld", (long long)seq);
    return it;
}

Test(queue, priority_then_seq_order)
{
    ml_queue_t q;
    ml_queue_init(&q);
    int prios[] = {0, 1, 0, 2, 1, 0, 2};
    for (int i = 0; i < 7; i++) {
        ml_qitem_t it = s_item(i + 1, prios[i]);
        cr_assert_eq(ml_queue_push(&q, &it), 0);
    }
    cr_assert_eq(ml_queue_len(&q), 7);
    cr_assert_eq(ml_queue_oldest(&q), 1001);
    const int64_t want[] = {4, 7, 2, 5, 1, 3, 6};
    for (int i = 0; i < 7; i++) {
        ml_qitem_t out;
        cr_assert_eq(ml_queue_pop(&q, &out), 1);
        cr_assert_eq(out.seq, want[i], "pop %d: got seq %lld, want %lld", i, (long long)out.seq,
                     (long long)want[i]);
    }
    ml_qitem_t out;
    cr_assert_eq(ml_queue_pop(&q, &out), 0);
    cr_assert_eq(q.bytes, 0);
    ml_queue_close(&q);
}

Test(queue, emergency_overtakes_a_long_routine_backlog)
{
    ml_queue_t q;
    ml_queue_init(&q);
    for (int i = 1; i <= 10000; i++) {
        ml_qitem_t it = s_item(i, 0);
        ml_queue_push(&q, &it);
    }
    ml_qitem_t e = s_item(10001, 2);
    ml_queue_push(&q, &e);
    ml_qitem_t out;
    ml_queue_pop(&q, &out);
    cr_assert_eq(out.seq, 10001);
    for (int i = 1; i <= 10000; i++) {
        cr_assert_eq(ml_queue_pop(&q, &out), 1);
        cr_assert_eq(out.seq, i);
    }
    ml_queue_close(&q);
}

Test(queue, requeue_restores_original_order)
{
    ml_queue_t q;
    ml_queue_init(&q);
    for (int i = 1; i <= 100; i++) {
        ml_qitem_t it = s_item(i, i % 2);
        ml_queue_push(&q, &it);
    }
    /* Take 30 "in flight", then put them back the way the broker does:
     * in reverse with push_front. */
    ml_qitem_t taken[30];
    for (int i = 0; i < 30; i++)
        ml_queue_pop(&q, &taken[i]);
    for (int i = 29; i >= 0; i--)
        ml_queue_push_front(&q, &taken[i]);
    int64_t last_prio1 = 0, last_prio0 = 0;
    ml_qitem_t out;
    int n = 0, seen_prio0 = 0;
    while (ml_queue_pop(&q, &out)) {
        n++;
        if (out.priority == 1) {
            cr_assert_eq(seen_prio0, 0, "an URGENT item came after a ROUTINE one");
            cr_assert_gt(out.seq, last_prio1);
            last_prio1 = out.seq;
        } else {
            seen_prio0 = 1;
            cr_assert_gt(out.seq, last_prio0);
            last_prio0 = out.seq;
        }
    }
    cr_assert_eq(n, 100);
    ml_queue_close(&q);
}
