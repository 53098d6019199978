/* The broker's in-memory table of cases: the cases something needs in
 * memory (a deadline running, a message queued or in flight, a change being
 * committed, a delivery to record again). The store holds every case; a
 * case that is not here is read back from it when a message for it comes
 * (flow.c). This table is what the loop thread checks a message against. An ml_hash on the case
 * id (keyed SipHash, so a node cannot choose case ids that collide), O(1) expected per operation.
 * Loop thread only. */
#ifndef ML_BROKER_CASETAB_H
#define ML_BROKER_CASETAB_H

#include <stddef.h>
#include <stdint.h>

#include "ml_common.h"

/* A delivery acknowledged while its case could not take the change (the
 * case was being read back, or the change was not stored): the broker
 * records it again later (flow.c). */
typedef struct ml_redo {
    struct ml_redo *next;
    uint32_t node;    /* index of the node that acknowledged */
    uint8_t kind;     /* the message's kind */
    uint8_t notified; /* the opener was told already */
    char id[ML_ULID_LEN + 1];
} ml_redo_t;

/* Frees a list of ml_redo_t. */
void ml_redo_free(ml_redo_t *r);

typedef struct ml_case {
    int64_t opened_at;
    int64_t updated_at;
    int64_t deadline_at; /* 0 = no deadline running */
    int64_t version;     /* the store's version of the row (see store.h) */
    uint64_t chunk_bytes;
    uint32_t n_objects;
    uint32_t chunks_expected;
    uint32_t chunks;
    uint32_t dup_chunks;
    uint32_t refs;        /* queued messages and store requests pointing here */
    uint32_t pending;     /* changes of this case handed to the store, not answered yet */
    struct ml_redo *redo; /* the broker's own changes to make again (flow.c) */
    uint32_t opener;      /* index into the broker's nodes */
    uint32_t target;      /* index into the broker's nodes */
    const char *service;  /* borrowed from the config, or NULL */
    char *linked;         /* malloc'd case id, or NULL */
    uint32_t *obj_chunks; /* imaging: chunks of each of the n_objects objects, read from the
                           * stored consult on the first ImagingResend (flow.c), or NULL */
    uint16_t escalations;
    uint16_t follow_ups;
    uint8_t kind;
    uint8_t state;
    uint8_t priority;
    uint8_t deadline_state;
    uint8_t fired;    /* the running deadline has been escalated */
    uint8_t closed;   /* in a final state */
    uint8_t gone;     /* not in the store (its opening failed): drop when unreferenced */
    uint8_t stale;    /* a change was not stored: memory is read back from the store once
                       * pending is 0, and no new change is taken until then */
    uint8_t unsaved;  /* memory has a count the store did not write (a duplicate chunk):
                       * stored before the case leaves memory (flow.c) */
    uint8_t unstored; /* opened by a message whose opening the store has not confirmed:
                       * a stored row with this id is then another case (flow.c) */
    char opening_id[ML_ULID_LEN + 1];
    char id[]; /* NUL-terminated */
} ml_case_t;

typedef struct {
    struct ml_hash *h; /* case id -> ml_case_t, keys borrowed from the cases; NULL until the
                        * first add */
    size_t count;
} ml_casetab_t;

void ml_casetab_init(ml_casetab_t *t);
/* Frees every case and the buckets. */
void ml_casetab_close(ml_casetab_t *t);
/* A new zeroed case with this id (not in the table yet; free with
 * ml_case_free). NULL out of memory. */
ml_case_t *ml_case_new(const char *id);
void ml_case_free(ml_case_t *c);
ml_case_t *ml_casetab_find(const ml_casetab_t *t, const char *id);
/* Adds c (its id must not be in the table). Returns 0 or ML_ENOMEM (c is
 * then not added; ML_EDUP when its id is there already). */
int ml_casetab_add(ml_casetab_t *t, ml_case_t *c);
/* Takes c out of the table (does not free it). */
void ml_casetab_remove(ml_casetab_t *t, ml_case_t *c);
/* Calls cb for every case; cb may not add or remove cases. */
void ml_casetab_each(const ml_casetab_t *t, void (*cb)(ml_case_t *c, void *arg), void *arg);

#endif
