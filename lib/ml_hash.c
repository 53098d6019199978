/* The hash table of ml_hash.h: linear probing over a power-of-two slot
 * array, at most three quarters full, with backward-shift deletion (Knuth,
 * TAOCP vol. 3, 6.4 Algorithm R) instead of tombstones. A slot is empty
 * when its key pointer is NULL, so a zeroed array is an empty table; a
 * zero-length key points at a static byte (or its one-byte copy) to be
 * told apart from an empty slot. */
#include "ml_hash.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/rand.h>

#include "ml_common.h"

typedef struct {
    const uint8_t *key; /* NULL: empty slot */
    void *val;
    uint32_t hash; /* the low 32 bits of the SipHash: the home slot and a quick compare */
    uint32_t len;
} s_slot_t;

struct ml_hash {
    s_slot_t *slots;
    size_t cap; /* power of two, at least S_MIN_CAP, at most S_MAX_CAP */
    size_t count;
    unsigned flags;
    uint8_t seed[16];
};

#define S_MIN_CAP ((size_t)8)
/* The stored hash has 32 bits, so a home slot index has at most 32. */
#define S_MAX_CAP ((size_t)1 << 31)

static const uint8_t s_empty_key[1];

/* SipHash (Aumasson and Bernstein, 2012) with one compression round and
 * three finalization rounds, the variant Python and Rust use for their
 * hash tables: fast on short keys and still a keyed pseudo-random function
 * for an attacker who sees only the table's behaviour. */
#define S_ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define S_SIPROUND                                                                                 \
    do {                                                                                           \
        v0 += v1;                                                                                  \
        v1 = S_ROTL(v1, 13);                                                                       \
        v1 ^= v0;                                                                                  \
        v0 = S_ROTL(v0, 32);                                                                       \
        v2 += v3;                                                                                  \
        v3 = S_ROTL(v3, 16);                                                                       \
        v3 ^= v2;                                                                                  \
        v0 += v3;                                                                                  \
        v3 = S_ROTL(v3, 21);                                                                       \
        v3 ^= v0;                                                                                  \
        v2 += v1;                                                                                  \
        v1 = S_ROTL(v1, 17);                                                                       \
        v1 ^= v2;                                                                                  \
        v2 = S_ROTL(v2, 32);                                                                       \
    } while (0)

static uint64_t s_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

uint64_t ml_hash_siphash13(const uint8_t k[16], const void *p, size_t n)
{
    const uint8_t *in = p;
    uint64_t k0 = s_le64(k), k1 = s_le64(k + 8);
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL;
    uint64_t v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL;
    uint64_t v3 = k1 ^ 0x7465646279746573ULL;
    size_t whole = n - n % 8;
    for (size_t i = 0; i < whole; i += 8) {
        uint64_t m = s_le64(in + i);
        v3 ^= m;
        S_SIPROUND;
        v0 ^= m;
    }
    uint64_t b = (uint64_t)n << 56;
    for (size_t i = 0; i < n % 8; i++)
        b |= (uint64_t)in[whole + i] << (8 * i);
    v3 ^= b;
    S_SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    S_SIPROUND;
    S_SIPROUND;
    S_SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static uint32_t s_hash(const ml_hash_t *h, const void *key, size_t len)
{
    return (uint32_t)ml_hash_siphash13(h->seed, key, len);
}

/* The slot holding key, or -1. */
static long s_find(const ml_hash_t *h, const void *key, size_t len, uint32_t hash)
{
    size_t mask = h->cap - 1;
    for (size_t i = hash & mask;; i = (i + 1) & mask) {
        const s_slot_t *s = &h->slots[i];
        if (!s->key)
            return -1;
        if (s->hash == hash && s->len == len && (len == 0 || memcmp(s->key, key, len) == 0))
            return (long)i;
    }
}

/* Puts a slot into an array known not to hold its key; the array has an
 * empty slot. */
static void s_place(s_slot_t *slots, size_t cap, const s_slot_t *e)
{
    size_t i = e->hash & (cap - 1);
    while (slots[i].key)
        i = (i + 1) & (cap - 1);
    slots[i] = *e;
}

/* Doubles the slot array. O(count); the hashes are stored, so no key is
 * hashed again. */
static int s_grow(ml_hash_t *h)
{
    if (h->cap >= S_MAX_CAP)
        return ML_ENOMEM;
    size_t cap = h->cap * 2;
    s_slot_t *slots = calloc(cap, sizeof *slots);
    if (!slots)
        return ML_ENOMEM;
    for (size_t i = 0; i < h->cap; i++)
        if (h->slots[i].key)
            s_place(slots, cap, &h->slots[i]);
    free(h->slots);
    h->slots = slots;
    h->cap = cap;
    return 0;
}

int ml_hash_new_seeded(size_t hint, unsigned flags, const uint8_t seed[16], ml_hash_t **out)
{
    *out = NULL;
    if ((flags & ~(unsigned)ML_HASH_BORROW_KEYS) != 0 || hint > S_MAX_CAP / 4 * 3)
        return ML_EINVAL;
    size_t cap = S_MIN_CAP;
    while (cap - cap / 4 < hint)
        cap *= 2;
    ml_hash_t *h = calloc(1, sizeof *h);
    if (!h)
        return ML_ENOMEM;
    h->slots = calloc(cap, sizeof *h->slots);
    if (!h->slots) {
        free(h);
        return ML_ENOMEM;
    }
    h->cap = cap;
    h->flags = flags;
    memcpy(h->seed, seed, sizeof h->seed);
    *out = h;
    return 0;
}

int ml_hash_new(size_t hint, unsigned flags, ml_hash_t **out)
{
    uint8_t seed[16];
    *out = NULL;
    /* OpenSSL's generator is seeded from the kernel and already used for
     * ids and nonces; a table must not start without a secret key. */
    if (RAND_bytes(seed, sizeof seed) != 1)
        return ML_EIO;
    int rc = ml_hash_new_seeded(hint, flags, seed, out);
    memset(seed, 0, sizeof seed);
    return rc;
}

static void s_free_key(const ml_hash_t *h, const uint8_t *key)
{
    if (!(h->flags & ML_HASH_BORROW_KEYS))
        free((void *)(uintptr_t)key);
}

void ml_hash_destroy(ml_hash_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    ml_hash_t *h = *self_p;
    for (size_t i = 0; i < h->cap; i++)
        if (h->slots[i].key)
            s_free_key(h, h->slots[i].key);
    free(h->slots);
    free(h);
    *self_p = NULL;
}

int ml_hash_put(ml_hash_t *h, const void *key, size_t len, void *val)
{
    if (len > UINT32_MAX - 1)
        return ML_EINVAL;
    uint32_t hash = s_hash(h, key, len);
    if (s_find(h, key, len, hash) >= 0)
        return ML_EDUP;
    /* Past three quarters the probe runs grow quickly; if the bigger array
     * cannot be had, the entry still goes in as long as one slot stays
     * empty (lookups and walks stop at an empty slot), only slower. */
    if (h->count + 1 > h->cap - h->cap / 4 && s_grow(h) != 0 && h->count + 2 > h->cap)
        return ML_ENOMEM;
    s_slot_t e = {.hash = hash, .len = (uint32_t)len, .val = val};
    if (h->flags & ML_HASH_BORROW_KEYS) {
        e.key = len && key ? key : s_empty_key;
    } else {
        uint8_t *copy = malloc(len ? len : 1);
        if (!copy)
            return ML_ENOMEM;
        if (len)
            memcpy(copy, key, len);
        e.key = copy;
    }
    s_place(h->slots, h->cap, &e);
    h->count++;
    return 0;
}

void *ml_hash_get(const ml_hash_t *h, const void *key, size_t len)
{
    if (!h || len > UINT32_MAX - 1)
        return NULL;
    long i = s_find(h, key, len, s_hash(h, key, len));
    return i < 0 ? NULL : h->slots[i].val;
}

int ml_hash_has(const ml_hash_t *h, const void *key, size_t len)
{
    if (!h || len > UINT32_MAX - 1)
        return 0;
    return s_find(h, key, len, s_hash(h, key, len)) >= 0;
}

int ml_hash_del(ml_hash_t *h, const void *key, size_t len, void **val)
{
    if (!h || len > UINT32_MAX - 1)
        return ML_ENOTFOUND;
    long found = s_find(h, key, len, s_hash(h, key, len));
    if (found < 0)
        return ML_ENOTFOUND;
    size_t mask = h->cap - 1;
    size_t i = (size_t)found;
    if (val)
        *val = h->slots[i].val;
    s_free_key(h, h->slots[i].key);
    /* Backward shift: each entry after the hole that would no longer be
     * found (its home slot is not between the hole and it, cyclically)
     * moves into the hole, which moves on to where it was. Entries only
     * move towards lower slots of the same run, never across an empty
     * slot: ml_hash_next relies on that. */
    for (size_t j = (i + 1) & mask; h->slots[j].key; j = (j + 1) & mask) {
        size_t home = h->slots[j].hash & mask;
        int stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
        if (stays)
            continue;
        h->slots[i] = h->slots[j];
        i = j;
    }
    memset(&h->slots[i], 0, sizeof h->slots[i]);
    h->count--;
    return 0;
}

size_t ml_hash_count(const ml_hash_t *h)
{
    return h ? h->count : 0;
}

/* The walk goes down from just below an empty slot E, around the end of
 * the array, to just above E. Deleting the entry at the walk's position p
 * moves only entries of p's run, which lie between p and E going up, all
 * returned already, into slots at or above p, which the walk has passed:
 * so nothing is skipped and nothing comes twice. */
int ml_hash_next(const ml_hash_t *h, ml_hash_iter_t *it, const void **key, size_t *len, void **val)
{
    if (!h)
        return 0;
    if (!it->started) {
        it->started = 1;
        it->cap = h->cap;
        it->left = 0;
        if (h->count == 0)
            return 0;
        size_t e = 0;
        while (h->slots[e].key)
            e++; /* there is an empty slot: count < cap always */
        it->pos = e;
        it->left = h->cap - 1;
    }
    if (it->cap != h->cap)
        return 0; /* grown under the walk */
    while (it->left > 0) {
        it->pos = (it->pos - 1) & (h->cap - 1);
        it->left--;
        const s_slot_t *s = &h->slots[it->pos];
        if (s->key) {
            if (key)
                *key = s->key;
            if (len)
                *len = s->len;
            if (val)
                *val = s->val;
            return 1;
        }
    }
    return 0;
}
