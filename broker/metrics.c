/* Prometheus metrics of medlinkd (see metrics.h). */
#include "metrics.h"

#include <stdlib.h>

#include "broker_int.h"

struct ml_bk_metrics {
    int unused;
};

int ml_bk_metrics_init(ml_broker_t *b)
{
    b->metrics = calloc(1, sizeof *b->metrics);
    return b->metrics ? 0 : ML_ENOMEM;
}

void ml_bk_metrics_free(ml_broker_t *b)
{
    free(b->metrics);
    b->metrics = NULL;
}

void ml_bk_metrics_render(ml_broker_t *b, ml_sbuf_t *out)
{
    (void)b;
    (void)out;
}
