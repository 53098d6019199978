/* Per-node delivery queues held in the broker's memory: for each priority a
 * FIFO (ring buffer) of small index entries (seq, message id, size,
 * accepted time). Envelopes themselves stay in the store and are fetched at
 * delivery time, so 100,000 queued messages cost ~5 MB here, not their
 * payloads. Order: EMERGENCY before URGENT before ROUTINE; within a
 * priority, store sequence order, which is the order the broker accepted
 * them (and so each sender's order). Loop thread only. */
#ifndef ML_BROKER_QUEUE_H
#define ML_BROKER_QUEUE_H

#include <stddef.h>
#include <stdint.h>

#include "ml_common.h"

#define ML_PRIORITY_COUNT 3

struct ml_case;

typedef struct {
    int64_t seq;
    int64_t accepted_at;
    int64_t deadline;   /* the message's own deadline (Unix ms), 0 = none */
    uint8_t *blob;      /* owned copy of the envelope, or NULL: read it from the store */
    struct ml_case *cs; /* the case it belongs to (a counted reference), or NULL */
    uint32_t size;
    uint16_t attempts; /* deliveries made without an ack */
    uint8_t priority;
    uint8_t kind;
    uint8_t flags; /* ML_QI_* */
    char id[ML_ULID_LEN + 1];
} ml_qitem_t;

/* The broker's own notice (a delivery notice, an escalation): its delivery
 * is not recorded in the case's timeline. */
#define ML_QI_NOTICE 1

typedef struct {
    ml_qitem_t *items;
    size_t cap;
    size_t head;
    size_t len;
} ml_ring_t;

typedef struct {
    ml_ring_t ring[ML_PRIORITY_COUNT];
    /* What the queued items cost in the store (ml_store_cost of each
     * envelope: its body plus the measured per-row overhead), which is what
     * node_queue_bytes bounds: the disk, not the envelopes alone. */
    uint64_t bytes;
} ml_queue_t;

void ml_queue_init(ml_queue_t *q);
/* Frees the rings and any blobs still held by items. */
void ml_queue_close(ml_queue_t *q);
/* Appends at the tail of the item's priority. O(1) amortised. Returns 0 or
 * ML_ENOMEM. */
int ml_queue_push(ml_queue_t *q, const ml_qitem_t *it);
/* Puts an item back at the head of its priority (after a failed delivery);
 * callers requeue in descending seq so the head stays in seq order. */
int ml_queue_push_front(ml_queue_t *q, const ml_qitem_t *it);
/* Takes the next item to deliver. Returns 1 and fills *out, or 0 if empty. */
int ml_queue_pop(ml_queue_t *q, ml_qitem_t *out);
size_t ml_queue_len(const ml_queue_t *q);
/* Accepted time of the oldest queued item (0 if empty). O(priorities). */
int64_t ml_queue_oldest(const ml_queue_t *q);
/* Takes out every item for which keep returns 0, calling taken for each
 * (which then owns the item's blob and case reference), and keeps the
 * order of the rest. O(len). Returns the number taken. */
size_t ml_queue_filter(ml_queue_t *q, int (*keep)(const ml_qitem_t *it, void *arg),
                       void (*taken)(ml_qitem_t *it, void *arg), void *arg);

#endif
