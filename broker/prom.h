/* medlinkd's /metrics: the Prometheus text exposition (format 0.0.4) of
 * the counters in metrics.h and of the broker's state (docs/operations.md,
 * "Metrics"). Loop thread only. */
#ifndef ML_BK_PROM_H
#define ML_BK_PROM_H

#include "ml_sbuf.h"

typedef struct ml_broker ml_broker_t;

/* Writes the whole exposition into out. O(nodes + sessions + CAs) plus
 * fixed work; no store read beyond two stat(2) calls. Failures show in
 * out->failed. */
void ml_bk_prom_render(ml_broker_t *b, ml_sbuf_t *out);

#endif
