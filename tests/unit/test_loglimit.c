/* Unit tests for ml_loglimit: the burst per window, the count of lines left
 * out and its reset, a new window only once a whole window has passed, a
 * zeroed limiter ready to use, and two limiters that do not share a budget
 * (medlinkd gives every node its own). */
#include <string.h>

#include <criterion/criterion.h>

#include "ml_loglimit.h"

#define W ML_LOGLIMIT_WINDOW_MS
#define BURST ML_LOGLIMIT_BURST

Test(loglimit, constants_are_the_documented_budget)
{
    /* docs/security.md promises 10 refusal lines per node per minute. */
    cr_assert_eq(BURST, 10);
    cr_assert_eq(W, 60000);
}

Test(loglimit, burst_then_counted_then_said_on_the_next_line)
{
    ml_loglimit_t l;
    memset(&l, 0, sizeof l);
    uint64_t dropped = 99;
    int64_t t = W; /* a window starts */
    for (int i = 0; i < BURST; i++) {
        dropped = 99;
        cr_assert_eq(ml_loglimit_take(&l, t + i, &dropped), 1, "line %d of the burst", i);
        cr_assert_eq(dropped, 0, "nothing was left out before line %d", i);
    }
    dropped = 77;
    cr_assert_eq(ml_loglimit_take(&l, t + 1, &dropped), 0);
    cr_assert_eq(ml_loglimit_take(&l, t + 2, &dropped), 0);
    cr_assert_eq(ml_loglimit_take(&l, t + W - 1, &dropped), 0, "the window is not over yet");
    cr_assert_eq(dropped, 77, "a refused line does not touch *dropped");
    cr_assert_eq(ml_loglimit_take(&l, t + W, &dropped), 1, "a whole window later");
    cr_assert_eq(dropped, 3, "the lines left out are said on the next one");
    cr_assert_eq(ml_loglimit_take(&l, t + W + 1, &dropped), 1);
    cr_assert_eq(dropped, 0, "and the count starts again");
}

Test(loglimit, new_window_begins_at_the_line_that_opens_it)
{
    ml_loglimit_t l;
    memset(&l, 0, sizeof l);
    uint64_t dropped = 0;
    int64_t t = 5 * W;
    for (int i = 0; i < BURST; i++)
        cr_assert_eq(ml_loglimit_take(&l, t, &dropped), 1);
    cr_assert_eq(ml_loglimit_take(&l, t, &dropped), 0);
    /* The next window begins at t + W + 500, not at t + W: it ends W after
     * the line that opened it. */
    int64_t t2 = t + W + 500;
    for (int i = 0; i < BURST; i++)
        cr_assert_eq(ml_loglimit_take(&l, t2, &dropped), 1);
    cr_assert_eq(ml_loglimit_take(&l, t2 + W - 1, &dropped), 0);
    cr_assert_eq(ml_loglimit_take(&l, t2 + W, &dropped), 1);
    cr_assert_eq(dropped, 1);
}

Test(loglimit, zeroed_limiter_counts_from_time_zero)
{
    /* Zeroed, the first window is taken to have begun at 0: at a monotonic
     * time inside the first window the burst is still whole. */
    ml_loglimit_t l;
    memset(&l, 0, sizeof l);
    uint64_t dropped = 0;
    for (int i = 0; i < BURST; i++)
        cr_assert_eq(ml_loglimit_take(&l, 10, &dropped), 1);
    cr_assert_eq(ml_loglimit_take(&l, 20, &dropped), 0);
    cr_assert_eq(ml_loglimit_take(&l, W, &dropped), 1);
    cr_assert_eq(dropped, 1);
}

Test(loglimit, sources_have_their_own_budgets)
{
    ml_loglimit_t a, b;
    memset(&a, 0, sizeof a);
    memset(&b, 0, sizeof b);
    uint64_t dropped = 0;
    int64_t t = W;
    for (int i = 0; i < BURST + 5; i++)
        ml_loglimit_take(&a, t, &dropped);
    cr_assert_eq(a.dropped, 5);
    cr_assert_eq(ml_loglimit_take(&b, t, &dropped), 1, "one source's flood spends only its own");
    cr_assert_eq(dropped, 0);
}

Test(loglimit, long_flood_counts_every_line_left_out)
{
    /* The reliability soak's figure: tens of thousands of refusals a
     * minute, a few log lines, and the next line says exactly how many. */
    ml_loglimit_t l;
    memset(&l, 0, sizeof l);
    uint64_t dropped = 0;
    int64_t t = W;
    int logged = 0;
    for (int i = 0; i < 40000; i++)
        logged += ml_loglimit_take(&l, t + i, &dropped);
    cr_assert_eq(logged, BURST);
    cr_assert_eq(ml_loglimit_take(&l, t + W, &dropped), 1);
    cr_assert_eq(dropped, 40000 - BURST);
}
