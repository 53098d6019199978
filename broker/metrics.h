/* medlinkd's Prometheus metrics (/metrics, docs/operations.md): counters
 * the broker's modules bump as things happen, and the text exposition
 * rendered from them and from the broker's state. Loop thread only, except
 * where a function says otherwise. */
#ifndef ML_BK_METRICS_H
#define ML_BK_METRICS_H

#include "ml_sbuf.h"

typedef struct ml_broker ml_broker_t;
typedef struct ml_bk_metrics ml_bk_metrics_t;

/* Allocates b->metrics. Returns 0 or ML_ENOMEM. */
int ml_bk_metrics_init(ml_broker_t *b);
void ml_bk_metrics_free(ml_broker_t *b);
/* Writes the whole exposition (text format 0.0.4) into out. */
void ml_bk_metrics_render(ml_broker_t *b, ml_sbuf_t *out);

#endif
