/* The in-memory case table of casetab.h: chained hashing (FNV-1a of the
 * id) over a power-of-two bucket array that doubles when the load factor
 * passes one. */
#include "casetab.h"

#include <stdlib.h>
#include <string.h>

static uint64_t s_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    while (*s)
        h = (h ^ (uint8_t)*s++) * 1099511628211ULL;
    return h;
}

void ml_casetab_init(ml_casetab_t *t)
{
    memset(t, 0, sizeof *t);
}

void ml_casetab_close(ml_casetab_t *t)
{
    for (size_t i = 0; i < t->n_buckets; i++) {
        ml_case_t *c = t->buckets[i];
        while (c) {
            ml_case_t *next = c->hnext;
            ml_case_free(c);
            c = next;
        }
    }
    free(t->buckets);
    memset(t, 0, sizeof *t);
}

ml_case_t *ml_case_new(const char *id)
{
    size_t n = strlen(id);
    ml_case_t *c = calloc(1, sizeof *c + n + 1);
    if (c)
        memcpy(c->id, id, n + 1);
    return c;
}

void ml_redo_free(ml_redo_t *r)
{
    while (r) {
        ml_redo_t *next = r->next;
        free(r);
        r = next;
    }
}

void ml_case_free(ml_case_t *c)
{
    if (!c)
        return;
    free(c->linked);
    free(c->obj_chunks);
    ml_redo_free(c->redo);
    free(c);
}

ml_case_t *ml_casetab_find(const ml_casetab_t *t, const char *id)
{
    if (t->n_buckets == 0 || !id)
        return NULL;
    for (ml_case_t *c = t->buckets[s_hash(id) & (t->n_buckets - 1)]; c; c = c->hnext)
        if (strcmp(c->id, id) == 0)
            return c;
    return NULL;
}

/* Doubles the bucket array (or makes the first one). O(count). */
static int s_grow(ml_casetab_t *t)
{
    size_t n = t->n_buckets ? t->n_buckets * 2 : 1024;
    ml_case_t **b = calloc(n, sizeof *b);
    if (!b)
        return ML_ENOMEM;
    for (size_t i = 0; i < t->n_buckets; i++) {
        ml_case_t *c = t->buckets[i];
        while (c) {
            ml_case_t *next = c->hnext;
            size_t k = s_hash(c->id) & (n - 1);
            c->hnext = b[k];
            b[k] = c;
            c = next;
        }
    }
    free(t->buckets);
    t->buckets = b;
    t->n_buckets = n;
    return 0;
}

int ml_casetab_add(ml_casetab_t *t, ml_case_t *c)
{
    if (t->count + 1 > t->n_buckets && s_grow(t) != 0 && t->n_buckets == 0)
        return ML_ENOMEM; /* a failed grow of a non-empty table only lengthens chains */
    size_t k = s_hash(c->id) & (t->n_buckets - 1);
    c->hnext = t->buckets[k];
    t->buckets[k] = c;
    t->count++;
    return 0;
}

void ml_casetab_remove(ml_casetab_t *t, ml_case_t *c)
{
    if (t->n_buckets == 0)
        return;
    ml_case_t **pp = &t->buckets[s_hash(c->id) & (t->n_buckets - 1)];
    while (*pp && *pp != c)
        pp = &(*pp)->hnext;
    if (*pp) {
        *pp = c->hnext;
        c->hnext = NULL;
        t->count--;
    }
}

void ml_casetab_each(const ml_casetab_t *t, void (*cb)(ml_case_t *c, void *arg), void *arg)
{
    for (size_t i = 0; i < t->n_buckets; i++)
        for (ml_case_t *c = t->buckets[i]; c; c = c->hnext)
            cb(c, arg);
}
