/* Ops alerts (docs/operations.md): a registered node offline longer than
 * offline_alert_after, a certificate or the CRL within crl_warn_days of
 * expiring, the store near max_store_bytes, the dead-letter queue growing.
 * Each is raised once per episode as an Escalation to the ops nodes (and a
 * metric), and a "resolved" notice follows when it ends. Loop thread
 * only. */
#ifndef ML_BK_ALERTS_H
#define ML_BK_ALERTS_H

#include "ml_sbuf.h"

typedef struct ml_broker ml_broker_t;
typedef struct ml_bk_alerts ml_bk_alerts_t;

/* Allocates b->alerts. Returns 0 or ML_ENOMEM. */
int ml_bk_alerts_init(ml_broker_t *b);
void ml_bk_alerts_free(ml_broker_t *b);
/* From the housekeeping timer (every 250 ms): checks what it watches. */
void ml_bk_alerts_tick(ml_broker_t *b);
/* Appends the alert metrics (medlink_alert_*) to a /metrics page. */
void ml_bk_alerts_metrics(ml_broker_t *b, ml_sbuf_t *out);

#endif
