/* Unit tests for the broker's case table (casetab.h) over ml_hash: add,
 * find, remove of the very case given, refused duplicates, the walk, and a
 * close that frees every case (run under ASan to see a leak). */
#include <stdio.h>
#include <string.h>

#include <criterion/criterion.h>

#include "casetab.h"
#include "ml_common.h"

Test(casetab, add_find_remove)
{
    ml_casetab_t t;
    ml_casetab_init(&t);
    cr_expect_null(ml_casetab_find(&t, "01JCASE"));
    cr_expect_null(ml_casetab_find(&t, NULL));
    ml_case_t *a = ml_case_new("01JCASEA"), *b = ml_case_new("01JCASEB");
    cr_assert(a && b);
    cr_assert_eq(ml_casetab_add(&t, a), 0);
    cr_assert_eq(ml_casetab_add(&t, b), 0);
    cr_expect_eq(t.count, 2);
    cr_expect_eq(ml_casetab_find(&t, "01JCASEA"), a);
    cr_expect_eq(ml_casetab_find(&t, "01JCASEB"), b);
    cr_expect_null(ml_casetab_find(&t, "01JCASE"));

    /* A second case with a taken id is refused, and removing it leaves the
     * one in the table alone. */
    ml_case_t *a2 = ml_case_new("01JCASEA");
    cr_assert_not_null(a2);
    cr_expect_eq(ml_casetab_add(&t, a2), ML_EDUP);
    ml_casetab_remove(&t, a2);
    cr_expect_eq(ml_casetab_find(&t, "01JCASEA"), a);
    cr_expect_eq(t.count, 2);
    ml_case_free(a2);

    ml_casetab_remove(&t, a);
    cr_expect_null(ml_casetab_find(&t, "01JCASEA"));
    cr_expect_eq(t.count, 1);
    ml_casetab_remove(&t, a); /* not there: nothing happens */
    cr_expect_eq(t.count, 1);
    ml_case_free(a);
    ml_casetab_close(&t);
    cr_expect_eq(t.count, 0);
    cr_expect_null(ml_casetab_find(&t, "01JCASEB"));
}

static void s_count_cb(ml_case_t *c, void *arg)
{
    size_t *seen = arg;
    seen[c->opener]++;
}

Test(casetab, each_visits_every_case_once_and_close_frees_them)
{
    enum { N = 20000 };
    static size_t seen[N];
    ml_casetab_t t;
    ml_casetab_init(&t);
    char id[32];
    for (uint32_t i = 0; i < N; i++) {
        snprintf(id, sizeof id, "01JCASE%06u", (unsigned)i);
        ml_case_t *c = ml_case_new(id);
        cr_assert_not_null(c);
        c->opener = i;
        cr_assert_eq(ml_casetab_add(&t, c), 0);
    }
    cr_assert_eq(t.count, N);
    /* Remove every third one; the rest are still found. */
    for (uint32_t i = 0; i < N; i += 3) {
        snprintf(id, sizeof id, "01JCASE%06u", (unsigned)i);
        ml_case_t *c = ml_casetab_find(&t, id);
        cr_assert_not_null(c);
        ml_casetab_remove(&t, c);
        ml_case_free(c);
    }
    ml_casetab_each(&t, s_count_cb, seen);
    size_t left = 0;
    for (uint32_t i = 0; i < N; i++) {
        cr_assert_eq(seen[i], i % 3 == 0 ? 0 : 1, "case %u", (unsigned)i);
        left += seen[i];
    }
    cr_expect_eq(t.count, left);
    ml_casetab_close(&t);
    /* A closed table can be used again. */
    ml_case_t *c = ml_case_new("01JAGAIN");
    cr_assert_eq(ml_casetab_add(&t, c), 0);
    cr_expect_eq(ml_casetab_find(&t, "01JAGAIN"), c);
    ml_casetab_close(&t);
}
