/* Ops alerts (see alerts.h). */
#include "alerts.h"

#include <stdlib.h>

#include "broker_int.h"

struct ml_bk_alerts {
    int unused;
};

int ml_bk_alerts_init(ml_broker_t *b)
{
    b->alerts = calloc(1, sizeof *b->alerts);
    return b->alerts ? 0 : ML_ENOMEM;
}

void ml_bk_alerts_free(ml_broker_t *b)
{
    free(b->alerts);
    b->alerts = NULL;
}

void ml_bk_alerts_tick(ml_broker_t *b)
{
    (void)b;
}

void ml_bk_alerts_metrics(ml_broker_t *b, ml_sbuf_t *out)
{
    (void)b;
    (void)out;
}
