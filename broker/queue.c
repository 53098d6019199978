/* Per-node delivery queues: three ring buffers of index entries. */
#include "queue.h"

#include <stdlib.h>
#include <string.h>

#include "store.h"

static int s_grow(ml_ring_t *r)
{
    size_t cap = r->cap ? r->cap * 2 : 64;
    ml_qitem_t *p = malloc(cap * sizeof *p);
    if (!p)
        return ML_ENOMEM;
    for (size_t i = 0; i < r->len; i++)
        p[i] = r->items[(r->head + i) % r->cap];
    free(r->items);
    r->items = p;
    r->cap = cap;
    r->head = 0;
    return 0;
}

void ml_queue_init(ml_queue_t *q)
{
    memset(q, 0, sizeof *q);
}

void ml_queue_close(ml_queue_t *q)
{
    for (int i = 0; i < ML_PRIORITY_COUNT; i++) {
        ml_ring_t *r = &q->ring[i];
        for (size_t k = 0; k < r->len; k++)
            free(r->items[(r->head + k) % r->cap].blob);
        free(r->items);
    }
    memset(q, 0, sizeof *q);
}

static ml_ring_t *s_ring(ml_queue_t *q, int priority)
{
    if (priority < 0)
        priority = 0;
    if (priority >= ML_PRIORITY_COUNT)
        priority = ML_PRIORITY_COUNT - 1;
    return &q->ring[priority];
}

int ml_queue_push(ml_queue_t *q, const ml_qitem_t *it)
{
    ml_ring_t *r = s_ring(q, it->priority);
    if (r->len == r->cap && s_grow(r) != 0)
        return ML_ENOMEM;
    r->items[(r->head + r->len) % r->cap] = *it;
    r->len++;
    q->bytes += ml_store_cost(it->size);
    return 0;
}

int ml_queue_push_front(ml_queue_t *q, const ml_qitem_t *it)
{
    ml_ring_t *r = s_ring(q, it->priority);
    if (r->len == r->cap && s_grow(r) != 0)
        return ML_ENOMEM;
    r->head = (r->head + r->cap - 1) % r->cap;
    r->items[r->head] = *it;
    r->len++;
    q->bytes += ml_store_cost(it->size);
    return 0;
}

int ml_queue_pop(ml_queue_t *q, ml_qitem_t *out)
{
    for (int p = ML_PRIORITY_COUNT - 1; p >= 0; p--) {
        ml_ring_t *r = &q->ring[p];
        if (r->len == 0)
            continue;
        *out = r->items[r->head];
        r->head = (r->head + 1) % r->cap;
        r->len--;
        q->bytes -= ml_store_cost(out->size);
        return 1;
    }
    return 0;
}

size_t ml_queue_len(const ml_queue_t *q)
{
    size_t n = 0;
    for (int p = 0; p < ML_PRIORITY_COUNT; p++)
        n += q->ring[p].len;
    return n;
}

int64_t ml_queue_oldest(const ml_queue_t *q)
{
    int64_t oldest = 0;
    for (int p = 0; p < ML_PRIORITY_COUNT; p++) {
        const ml_ring_t *r = &q->ring[p];
        if (r->len == 0)
            continue;
        int64_t t = r->items[r->head].accepted_at;
        if (oldest == 0 || t < oldest)
            oldest = t;
    }
    return oldest;
}

size_t ml_queue_filter(ml_queue_t *q, int (*keep)(const ml_qitem_t *it, void *arg),
                       void (*taken)(ml_qitem_t *it, void *arg), void *arg)
{
    size_t n_taken = 0;
    for (int p = 0; p < ML_PRIORITY_COUNT; p++) {
        ml_ring_t *r = &q->ring[p];
        size_t out = 0;
        for (size_t i = 0; i < r->len; i++) {
            ml_qitem_t *it = &r->items[(r->head + i) % r->cap];
            if (keep(it, arg)) {
                if (out != i)
                    r->items[(r->head + out) % r->cap] = *it;
                out++;
                continue;
            }
            ml_qitem_t copy = *it;
            q->bytes -= ml_store_cost(copy.size);
            n_taken++;
            taken(&copy, arg);
        }
        r->len = out;
    }
    return n_taken;
}
