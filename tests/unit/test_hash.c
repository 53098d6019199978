/* Unit tests for ml_hash: put/get/del and their return codes, growth
 * through 100,000 keys, walks that delete the entry they are on (which
 * backward-shift deletion makes the hard case), binary keys with NULs,
 * keys whose stored 32-bit hashes are equal, borrowed keys, and SipHash-1-3
 * against reference values. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "ml_common.h"
#include "ml_hash.h"

static const uint8_t s_zero_seed[16];

static ml_hash_t *s_new(size_t hint, unsigned flags)
{
    ml_hash_t *h = NULL;
    cr_assert_eq(ml_hash_new(hint, flags, &h), 0);
    cr_assert_not_null(h);
    return h;
}

static size_t s_key(char *out, size_t len, size_t i)
{
    return (size_t)snprintf(out, len, "key-%zu", i);
}

/* Reference values from CPython 3.11, whose bytes hash is SipHash-1-3:
 * PYTHONHASHSEED=0 zeroes its key, PYTHONHASHSEED=1 makes the key
 * 29 23 be 84 e1 6c d6 ae 52 90 49 f1 f1 bb e9 eb (its LCG), and
 * hash(b) & (2**64 - 1) is the SipHash of b. */
Test(hash, siphash13_matches_reference)
{
    static const uint8_t seed1[16] = {0x29, 0x23, 0xbe, 0x84, 0xe1, 0x6c, 0xd6, 0xae,
                                      0x52, 0x90, 0x49, 0xf1, 0xf1, 0xbb, 0xe9, 0xeb};
    uint8_t r15[15], r64[64];
    for (int i = 0; i < 64; i++) {
        r64[i] = (uint8_t)i;
        if (i < 15)
            r15[i] = (uint8_t)i;
    }
    const char *cid = "01JEXAMPLECASEID0000000000";
    cr_expect_eq(ml_hash_siphash13(s_zero_seed, "a", 1), 4644417185603328019ULL);
    cr_expect_eq(ml_hash_siphash13(s_zero_seed, "abcdefgh", 8), 4574395652268504554ULL);
    cr_expect_eq(ml_hash_siphash13(s_zero_seed, "abcdefghi", 9), 17913969820989044453ULL);
    cr_expect_eq(ml_hash_siphash13(s_zero_seed, r15, 15), 17514137373579004394ULL);
    cr_expect_eq(ml_hash_siphash13(s_zero_seed, r64, 64), 8493894268803903686ULL);
    cr_expect_eq(ml_hash_siphash13(s_zero_seed, cid, strlen(cid)), 4251507194085535953ULL);
    cr_expect_eq(ml_hash_siphash13(seed1, "a", 1), 15433848885072367219ULL);
    cr_expect_eq(ml_hash_siphash13(seed1, r15, 15), 18052565166098840147ULL);
    cr_expect_eq(ml_hash_siphash13(seed1, cid, strlen(cid)), 2548503075098124872ULL);
}

Test(hash, put_get_del)
{
    ml_hash_t *h = s_new(0, 0);
    int a = 1, b = 2;
    cr_expect_eq(ml_hash_count(h), 0);
    cr_expect_null(ml_hash_get(h, "alpha", 5));
    cr_expect_eq(ml_hash_put(h, "alpha", 5, &a), 0);
    cr_expect_eq(ml_hash_put(h, "beta", 4, &b), 0);
    cr_expect_eq(ml_hash_count(h), 2);
    cr_expect_eq(ml_hash_get(h, "alpha", 5), &a);
    cr_expect_eq(ml_hash_get(h, "beta", 4), &b);
    /* A prefix, or the same bytes with one more, is another key. */
    cr_expect_null(ml_hash_get(h, "alph", 4));
    cr_expect_null(ml_hash_get(h, "alphaa", 6));
    /* A duplicate put changes nothing. */
    cr_expect_eq(ml_hash_put(h, "alpha", 5, &b), ML_EDUP);
    cr_expect_eq(ml_hash_get(h, "alpha", 5), &a);
    cr_expect_eq(ml_hash_count(h), 2);
    void *v = NULL;
    cr_expect_eq(ml_hash_del(h, "alpha", 5, &v), 0);
    cr_expect_eq(v, &a);
    cr_expect_eq(ml_hash_del(h, "alpha", 5, &v), ML_ENOTFOUND);
    cr_expect_eq(ml_hash_del(h, "gamma", 5, NULL), ML_ENOTFOUND);
    cr_expect_null(ml_hash_get(h, "alpha", 5));
    cr_expect_eq(ml_hash_count(h), 1);
    /* Put again after a delete. */
    cr_expect_eq(ml_hash_put(h, "alpha", 5, &b), 0);
    cr_expect_eq(ml_hash_get(h, "alpha", 5), &b);
    ml_hash_destroy(&h);
    cr_expect_null(h);
}

Test(hash, null_values_and_empty_key)
{
    ml_hash_t *h = s_new(0, 0);
    cr_expect_eq(ml_hash_put(h, "set-member", 10, NULL), 0);
    cr_expect_null(ml_hash_get(h, "set-member", 10));
    cr_expect(ml_hash_has(h, "set-member", 10));
    cr_expect_not(ml_hash_has(h, "other", 5));
    int x;
    cr_expect_eq(ml_hash_put(h, NULL, 0, &x), 0);
    cr_expect_eq(ml_hash_get(h, "", 0), &x);
    cr_expect_eq(ml_hash_put(h, "", 0, &x), ML_EDUP);
    cr_expect_eq(ml_hash_count(h), 2);
    cr_expect_eq(ml_hash_del(h, NULL, 0, NULL), 0);
    cr_expect_not(ml_hash_has(h, "", 0));
    ml_hash_destroy(&h);
}

Test(hash, destroy_is_null_safe_and_clears)
{
    ml_hash_destroy(NULL);
    ml_hash_t *h = NULL;
    ml_hash_destroy(&h);
    cr_expect_null(h);
    h = s_new(4, 0);
    cr_expect_eq(ml_hash_put(h, "k", 1, NULL), 0);
    ml_hash_destroy(&h);
    cr_expect_null(h);
    ml_hash_destroy(&h);
    cr_expect_eq(ml_hash_count(NULL), 0);
    cr_expect_null(ml_hash_get(NULL, "k", 1));
    cr_expect_eq(ml_hash_del(NULL, "k", 1, NULL), ML_ENOTFOUND);
}

Test(hash, bad_arguments)
{
    ml_hash_t *h = (ml_hash_t *)&h;
    cr_expect_eq(ml_hash_new(0, 0x80, &h), ML_EINVAL);
    cr_expect_null(h);
    cr_expect_eq(ml_hash_new(SIZE_MAX, 0, &h), ML_EINVAL);
    cr_expect_null(h);
}

Test(hash, grows_through_100k_keys)
{
    enum { N = 100000 };
    ml_hash_t *h = s_new(0, 0);
    char k[32];
    for (size_t i = 0; i < N; i++) {
        size_t n = s_key(k, sizeof k, i);
        cr_assert_eq(ml_hash_put(h, k, n, (void *)(uintptr_t)(i + 1)), 0, "key %zu", i);
    }
    cr_assert_eq(ml_hash_count(h), N);
    for (size_t i = 0; i < N; i++) {
        size_t n = s_key(k, sizeof k, i);
        cr_assert_eq((uintptr_t)ml_hash_get(h, k, n), i + 1, "key %zu", i);
    }
    /* Every odd key out; the even ones are all still found. */
    for (size_t i = 1; i < N; i += 2) {
        size_t n = s_key(k, sizeof k, i);
        void *v = NULL;
        cr_assert_eq(ml_hash_del(h, k, n, &v), 0, "key %zu", i);
        cr_assert_eq((uintptr_t)v, i + 1);
    }
    cr_assert_eq(ml_hash_count(h), N / 2);
    for (size_t i = 0; i < N; i++) {
        size_t n = s_key(k, sizeof k, i);
        cr_assert_eq(ml_hash_has(h, k, n), i % 2 == 0, "key %zu", i);
    }
    ml_hash_destroy(&h);
}

/* Walks the table deleting every entry whose value is odd (by its own key,
 * as a caller would) and checks that each entry came exactly once. */
static void s_walk_delete(ml_hash_t *h, size_t n_keys, unsigned char *seen)
{
    ml_hash_iter_t it = {0};
    const void *key;
    size_t len;
    void *val;
    memset(seen, 0, n_keys);
    while (ml_hash_next(h, &it, &key, &len, &val)) {
        size_t i = (uintptr_t)val - 1;
        cr_assert_lt(i, n_keys);
        cr_assert_eq(seen[i], 0, "entry %zu returned twice", i);
        seen[i] = 1;
        if (i % 2 == 1) {
            char copy[32];
            cr_assert_lt(len, sizeof copy);
            memcpy(copy, key, len);
            cr_assert_eq(ml_hash_del(h, copy, len, NULL), 0);
        }
    }
    for (size_t i = 0; i < n_keys; i++)
        cr_assert_eq(seen[i], 1, "entry %zu never returned", i);
}

Test(hash, walk_tolerates_deleting_the_current_entry)
{
    /* Many sizes, so that runs wrap around the end of the slot array and
     * some tables sit just under the growth point (long runs). */
    for (size_t n_keys = 1; n_keys <= 3000; n_keys += (n_keys < 64 ? 1 : 97)) {
        ml_hash_t *h = s_new(0, 0);
        char k[32];
        for (size_t i = 0; i < n_keys; i++) {
            size_t n = s_key(k, sizeof k, i);
            cr_assert_eq(ml_hash_put(h, k, n, (void *)(uintptr_t)(i + 1)), 0);
        }
        unsigned char *seen = malloc(n_keys);
        cr_assert_not_null(seen);
        s_walk_delete(h, n_keys, seen);
        cr_assert_eq(ml_hash_count(h), (n_keys + 1) / 2, "n_keys %zu", n_keys);
        for (size_t i = 0; i < n_keys; i++) {
            size_t n = s_key(k, sizeof k, i);
            cr_assert_eq(ml_hash_has(h, k, n), i % 2 == 0);
        }
        /* A second walk sees exactly the survivors. */
        ml_hash_iter_t it = {0};
        size_t walked = 0;
        void *val;
        while (ml_hash_next(h, &it, NULL, NULL, &val)) {
            cr_assert_eq(((uintptr_t)val - 1) % 2, 0);
            walked++;
        }
        cr_assert_eq(walked, (n_keys + 1) / 2);
        /* A finished walk stays finished. */
        cr_assert_eq(ml_hash_next(h, &it, NULL, NULL, NULL), 0);
        free(seen);
        ml_hash_destroy(&h);
    }
}

Test(hash, walk_deleting_everything_empties_the_table)
{
    ml_hash_t *h = s_new(0, 0);
    char k[32];
    for (size_t i = 0; i < 5000; i++) {
        size_t n = s_key(k, sizeof k, i);
        cr_assert_eq(ml_hash_put(h, k, n, (void *)(uintptr_t)(i + 1)), 0);
    }
    ml_hash_iter_t it = {0};
    const void *key;
    size_t len, walked = 0;
    while (ml_hash_next(h, &it, &key, &len, NULL)) {
        char copy[32];
        memcpy(copy, key, len);
        cr_assert_eq(ml_hash_del(h, copy, len, NULL), 0);
        walked++;
    }
    cr_expect_eq(walked, 5000);
    cr_expect_eq(ml_hash_count(h), 0);
    ml_hash_iter_t it2 = {0};
    cr_expect_eq(ml_hash_next(h, &it2, NULL, NULL, NULL), 0);
    ml_hash_destroy(&h);
}

Test(hash, binary_keys_with_nuls)
{
    ml_hash_t *h = s_new(0, 0);
    /* ZeroMQ routing ids: five bytes, the first 0, NULs inside. */
    const uint8_t a[5] = {0, 0, 0, 0, 1};
    const uint8_t b[5] = {0, 0, 0, 1, 0};
    const uint8_t c[5] = {0, 0, 0, 0, 0};
    const uint8_t c4[4] = {0, 0, 0, 0};
    int va, vb, vc, vc4;
    cr_assert_eq(ml_hash_put(h, a, 5, &va), 0);
    cr_assert_eq(ml_hash_put(h, b, 5, &vb), 0);
    cr_assert_eq(ml_hash_put(h, c, 5, &vc), 0);
    cr_assert_eq(ml_hash_put(h, c4, 4, &vc4), 0);
    cr_expect_eq(ml_hash_get(h, a, 5), &va);
    cr_expect_eq(ml_hash_get(h, b, 5), &vb);
    cr_expect_eq(ml_hash_get(h, c, 5), &vc);
    cr_expect_eq(ml_hash_get(h, c4, 4), &vc4);
    cr_expect_eq(ml_hash_count(h), 4);
    /* The table keeps its own copy: changing the caller's buffer changes
     * nothing. */
    uint8_t d[3] = {7, 0, 7};
    cr_assert_eq(ml_hash_put(h, d, 3, &va), 0);
    d[2] = 8;
    cr_expect_null(ml_hash_get(h, d, 3));
    d[2] = 7;
    cr_expect_eq(ml_hash_get(h, d, 3), &va);
    ml_hash_destroy(&h);
}

/* Finds keys whose stored 32-bit hashes are equal under the zero seed (a
 * birthday search: about 2^16 keys), so that the table must tell them
 * apart by their bytes. */
Test(hash, equal_hashes_do_not_lose_entries)
{
    enum { M = 1 << 20 };
    uint32_t *hi = calloc(M, sizeof *hi); /* 32-bit hash -> key index + 1, open addressed */
    uint32_t *hv = calloc(M, sizeof *hv);
    cr_assert(hi && hv);
    char k[32];
    size_t first = 0, second = 0;
    for (size_t i = 0; i < 600000 && !second; i++) {
        size_t n = s_key(k, sizeof k, i);
        uint32_t x = (uint32_t)ml_hash_siphash13(s_zero_seed, k, n);
        for (size_t j = x & (M - 1);; j = (j + 1) & (M - 1)) {
            if (!hi[j]) {
                hi[j] = (uint32_t)i + 1;
                hv[j] = x;
                break;
            }
            if (hv[j] == x) {
                first = hi[j] - 1;
                second = i;
                break;
            }
        }
    }
    free(hi);
    free(hv);
    cr_assert_neq(second, 0, "no 32-bit collision found");

    ml_hash_t *h = NULL;
    cr_assert_eq(ml_hash_new_seeded(0, 0, s_zero_seed, &h), 0);
    char k1[32], k2[32];
    size_t n1 = s_key(k1, sizeof k1, first), n2 = s_key(k2, sizeof k2, second);
    /* Some other keys around them, so that the two sit in a run. */
    for (size_t i = 0; i < 40; i++) {
        size_t n = (size_t)snprintf(k, sizeof k, "filler-%zu", i);
        cr_assert_eq(ml_hash_put(h, k, n, NULL), 0);
    }
    int v1, v2;
    cr_assert_eq(ml_hash_put(h, k1, n1, &v1), 0);
    cr_assert_eq(ml_hash_put(h, k2, n2, &v2), 0);
    cr_expect_eq(ml_hash_get(h, k1, n1), &v1);
    cr_expect_eq(ml_hash_get(h, k2, n2), &v2);
    /* Deleting one keeps the other, whichever comes first in the run. */
    cr_assert_eq(ml_hash_del(h, k1, n1, NULL), 0);
    cr_expect_eq(ml_hash_get(h, k2, n2), &v2);
    cr_assert_eq(ml_hash_put(h, k1, n1, &v1), 0);
    cr_assert_eq(ml_hash_del(h, k2, n2, NULL), 0);
    cr_expect_eq(ml_hash_get(h, k1, n1), &v1);
    cr_expect_eq(ml_hash_count(h), 41);
    ml_hash_destroy(&h);
}

/* Keys that share their home slot in a small table (found under a fixed
 * seed): one long run, deleted from the middle, the head and the tail. */
Test(hash, same_home_slot_run_survives_deletes)
{
    ml_hash_t *h = NULL;
    cr_assert_eq(ml_hash_new_seeded(0, 0, s_zero_seed, &h), 0); /* 8 slots, grows to 64 */
    char keys[40][32];
    size_t lens[40], n = 0;
    char k[32];
    for (size_t i = 0; n < 40; i++) {
        size_t len = s_key(k, sizeof k, i);
        if ((ml_hash_siphash13(s_zero_seed, k, len) & 1023) == 5) {
            memcpy(keys[n], k, len + 1);
            lens[n++] = len;
        }
    }
    for (size_t i = 0; i < n; i++)
        cr_assert_eq(ml_hash_put(h, keys[i], lens[i], (void *)(uintptr_t)(i + 1)), 0);
    size_t order[] = {20, 0, 39, 1, 38, 19, 21};
    for (size_t d = 0; d < sizeof order / sizeof order[0]; d++) {
        cr_assert_eq(ml_hash_del(h, keys[order[d]], lens[order[d]], NULL), 0);
        lens[order[d]] = SIZE_MAX; /* gone */
        for (size_t i = 0; i < n; i++) {
            if (lens[i] == SIZE_MAX)
                continue;
            cr_assert_eq((uintptr_t)ml_hash_get(h, keys[i], lens[i]), i + 1, "key %zu", i);
        }
    }
    cr_expect_eq(ml_hash_count(h), 40 - sizeof order / sizeof order[0]);
    ml_hash_destroy(&h);
}

/* A churn against a plain array as the model: random puts and deletes of
 * a few hundred keys, so that runs form, wrap and are shifted many times. */
Test(hash, random_churn_matches_model)
{
    enum { K = 700, STEPS = 200000 };
    static unsigned char present[K];
    ml_hash_t *h = s_new(0, 0);
    uint64_t x = 88172645463325252ULL;
    size_t count = 0;
    char k[32];
    for (int s = 0; s < STEPS; s++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        size_t i = (size_t)(x % K);
        size_t n = s_key(k, sizeof k, i);
        if (present[i]) {
            cr_assert_eq(ml_hash_del(h, k, n, NULL), 0);
            present[i] = 0;
            count--;
        } else {
            cr_assert_eq(ml_hash_put(h, k, n, (void *)(uintptr_t)(i + 1)), 0);
            present[i] = 1;
            count++;
        }
        if (s % 1000 == 0) {
            cr_assert_eq(ml_hash_count(h), count);
            for (size_t j = 0; j < K; j++) {
                size_t m = s_key(k, sizeof k, j);
                cr_assert_eq((uintptr_t)ml_hash_get(h, k, m), present[j] ? j + 1 : 0);
            }
        }
    }
    ml_hash_destroy(&h);
}

Test(hash, borrowed_keys_are_not_copied)
{
    ml_hash_t *h = s_new(0, ML_HASH_BORROW_KEYS);
    char owned[2][16] = {"case-one", "case-two"};
    cr_assert_eq(ml_hash_put(h, owned[0], strlen(owned[0]), owned[0]), 0);
    cr_assert_eq(ml_hash_put(h, owned[1], strlen(owned[1]), owned[1]), 0);
    cr_assert_eq(ml_hash_put(h, "", 0, NULL), 0);
    cr_expect_eq(ml_hash_get(h, "case-two", 8), owned[1]);
    ml_hash_iter_t it = {0};
    const void *key;
    size_t len;
    void *val;
    int walked = 0;
    while (ml_hash_next(h, &it, &key, &len, &val)) {
        /* The key handed back is the caller's own buffer. */
        if (val)
            cr_expect_eq(key, val);
        walked++;
    }
    cr_expect_eq(walked, 3);
    ml_hash_destroy(&h);
}

Test(hash, tables_have_their_own_seeds)
{
    ml_hash_t *a = s_new(1000, 0), *b = s_new(1000, 0);
    char k[32];
    for (size_t i = 0; i < 1000; i++) {
        size_t n = s_key(k, sizeof k, i);
        cr_assert_eq(ml_hash_put(a, k, n, (void *)(uintptr_t)(i + 1)), 0);
        cr_assert_eq(ml_hash_put(b, k, n, (void *)(uintptr_t)(i + 1)), 0);
    }
    /* Two tables with random keys walk the same keys in different orders
     * (the chance of the same order for 1000 keys is nil). */
    ml_hash_iter_t ia = {0}, ib = {0};
    void *va, *vb;
    int differ = 0;
    while (ml_hash_next(a, &ia, NULL, NULL, &va) && ml_hash_next(b, &ib, NULL, NULL, &vb))
        differ |= va != vb;
    cr_expect(differ);
    ml_hash_destroy(&a);
    ml_hash_destroy(&b);
}
