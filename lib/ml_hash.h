/* A hash table from byte strings to pointers, the one every medlink
 * program uses for its in-memory indexes (sessions by routing id, cases by
 * id, received ids). Open addressing with linear probing over a
 * power-of-two slot array that doubles when more than three quarters of it
 * is used; deletion shifts the entries after the deleted one back (no
 * tombstones), so a table that sees many puts and deletes never slows down.
 * O(1) expected per operation.
 *
 * The hash is SipHash-1-3 keyed with 128 random bits drawn for each table
 * when it is made. The keys are often chosen by someone else (a peer's
 * ZeroMQ routing id, a case id in a message a registered node sent): with a
 * fixed, public hash function such a peer could choose keys that all land
 * in one probe run and turn every lookup of the broker's loop thread into a
 * scan of the whole table. With a secret per-table key it cannot know which
 * keys collide, and it cannot learn the key from timing either, since
 * SipHash is a keyed pseudo-random function.
 *
 * Memory: 24 bytes per slot (key pointer, value, 32 bits of the hash, key
 * length), so 32 to 64 bytes per entry between the load bounds; a table
 * that copies its keys (the default) adds one allocation of the key's
 * length per entry. The table never shrinks: deleting every entry leaves
 * the slot array at its largest size until ml_hash_destroy.
 *
 * Not thread-safe; one owner (for the broker: the loop thread). */
#ifndef ML_HASH_H
#define ML_HASH_H

#include <stddef.h>
#include <stdint.h>

typedef struct ml_hash ml_hash_t;

/* Flags for ml_hash_new. */
enum {
    /* The table does not copy the keys: the caller's key bytes must stay
     * unchanged at the same address for as long as the entry is in the
     * table. For keys that live inside the value (a case's id inside the
     * case), this saves an allocation per entry. */
    ML_HASH_BORROW_KEYS = 1u << 0,
};

/* A position in a walk over the table (ml_hash_next). Zero it to start:
 * ml_hash_iter_t it = {0}. */
typedef struct {
    size_t pos;  /* the slot returned last */
    size_t left; /* slots still to visit */
    size_t cap;  /* the slot count when the walk started */
    int started;
} ml_hash_iter_t;

/* A new, empty table with room for hint entries before it first grows
 * (0: a small default). flags: ML_HASH_* or 0. Returns 0 (*out set),
 * ML_ENOMEM, ML_EINVAL (unknown flag, or hint too large) or ML_EIO (the
 * system gave no random bytes for the key). */
int ml_hash_new(size_t hint, unsigned flags, ml_hash_t **out);

/* The same with a fixed hash key instead of a random one, for tests that
 * need to know which keys collide and for tools that want the same layout
 * on every run. Never for a table whose keys a peer chooses. */
int ml_hash_new_seeded(size_t hint, unsigned flags, const uint8_t seed[16], ml_hash_t **out);

/* Frees the table and the copies of its keys (not the values: walk the
 * table first to free them). Safe on NULL and on *self_p == NULL; clears
 * *self_p. */
void ml_hash_destroy(ml_hash_t **self_p);

/* Adds key (len bytes, any bytes, NULs included; key may be NULL when len
 * is 0) mapped to val. Returns 0, ML_EDUP (the key is there already:
 * nothing changed), ML_ENOMEM (nothing changed) or ML_EINVAL (len over
 * 4 GiB - 1). May grow the table: O(count) then, O(1) amortized. */
int ml_hash_put(ml_hash_t *h, const void *key, size_t len, void *val);

/* The value mapped to key, or NULL when the key is not there (or its value
 * is NULL: see ml_hash_has). O(1) expected. */
void *ml_hash_get(const ml_hash_t *h, const void *key, size_t len);

/* 1 when the key is in the table, else 0. */
int ml_hash_has(const ml_hash_t *h, const void *key, size_t len);

/* Takes the key out. Returns 0 (*val, when val is not NULL, set to the
 * value it had) or ML_ENOTFOUND. Frees the table's copy of the key. O(1)
 * expected. */
int ml_hash_del(ml_hash_t *h, const void *key, size_t len, void **val);

/* The number of entries; 0 for NULL. */
size_t ml_hash_count(const ml_hash_t *h);

/* The next entry of a walk that it began (zeroed) over h: returns 1 and
 * sets *key, *len and *val (each may be NULL when not wanted), or 0 when
 * every entry has been returned. The order is unspecified. Deleting the
 * entry just returned (ml_hash_del with its key) is allowed during the
 * walk: every other entry is still returned exactly once. Any other change
 * during a walk (a put, or deleting another entry) may make the walk skip
 * or repeat entries, and a put that grows the table ends it; it is never
 * unsafe. *key points at the table's copy (or the borrowed key): read it
 * before deleting the entry. O(capacity) for the whole walk. */
int ml_hash_next(const ml_hash_t *h, ml_hash_iter_t *it, const void **key, size_t *len, void **val);

/* SipHash-1-3 of p (n bytes) under the 16-byte key k, as the table uses it;
 * exposed for the tests and for fixed-size tables elsewhere that want the
 * same protection. */
uint64_t ml_hash_siphash13(const uint8_t k[16], const void *p, size_t n);

#endif
