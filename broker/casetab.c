/* The in-memory case table of casetab.h, over an ml_hash keyed by the case
 * id. The table borrows the key from the case (its id[] member), which
 * lives as long as the case is in the table, so an entry costs one slot of
 * the hash (24 bytes, 32 to 64 per case with the load between three
 * eighths and three quarters) and no allocation of its own. */
#include "casetab.h"

#include <stdlib.h>
#include <string.h>

#include "ml_hash.h"

void ml_casetab_init(ml_casetab_t *t)
{
    memset(t, 0, sizeof *t);
}

void ml_casetab_close(ml_casetab_t *t)
{
    /* The walk never reads a key it has returned before, so each case can
     * be freed as soon as it comes. */
    ml_hash_iter_t it = {0};
    void *val;
    while (ml_hash_next(t->h, &it, NULL, NULL, &val))
        ml_case_free(val);
    ml_hash_destroy(&t->h);
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
    if (!id)
        return NULL;
    return ml_hash_get(t->h, id, strlen(id));
}

int ml_casetab_add(ml_casetab_t *t, ml_case_t *c)
{
    /* Made on the first add so that init cannot fail (the broker's start
     * calls it before anything that could report an error). */
    if (!t->h && ml_hash_new(0, ML_HASH_BORROW_KEYS, &t->h) != 0)
        return ML_ENOMEM;
    int rc = ml_hash_put(t->h, c->id, strlen(c->id), c);
    if (rc != 0)
        return rc == ML_EDUP ? ML_EDUP : ML_ENOMEM;
    t->count = ml_hash_count(t->h);
    return 0;
}

void ml_casetab_remove(ml_casetab_t *t, ml_case_t *c)
{
    size_t n = strlen(c->id);
    /* Only c itself: a case whose add was refused (its id taken) is not in
     * the table, and removing it must not take out the one that is. */
    if (ml_hash_get(t->h, c->id, n) != c)
        return;
    ml_hash_del(t->h, c->id, n, NULL);
    t->count = ml_hash_count(t->h);
}

void ml_casetab_each(const ml_casetab_t *t, void (*cb)(ml_case_t *c, void *arg), void *arg)
{
    ml_hash_iter_t it = {0};
    void *val;
    while (ml_hash_next(t->h, &it, NULL, NULL, &val))
        cb(val, arg);
}
