/* Ops alerts (docs/operations.md, "Alerts"): a registered node offline
 * longer than offline_alert_after, a certificate or the CRL within
 * crl_warn_days of expiring, the store near max_store_bytes, the dead-letter
 * queue growing. Each is raised once per episode as an Escalation to the
 * ops nodes (and a metric), and a "resolved" notice follows when it ends.
 *
 * An episode lives in memory only: one in progress when medlinkd restarts
 * is raised again after the restart (with the offline time of a node
 * counted from the restart, since the broker does not keep last_seen
 * across restarts). Memory: one small record per node ever registered
 * (b->nodes) plus a fixed number for the rest. Loop thread only. */
#ifndef ML_BK_ALERTS_H
#define ML_BK_ALERTS_H

#include "ml_sbuf.h"

typedef struct ml_broker ml_broker_t;
typedef struct ml_bk_alerts ml_bk_alerts_t;
typedef struct Medlink__V1__BrokerStatus Medlink__V1__BrokerStatus;

/* Allocates b->alerts (after the store is open: it notes the store's file
 * and quota, which apply until a restart). Returns 0 or ML_ENOMEM. */
int ml_bk_alerts_init(ml_broker_t *b);
void ml_bk_alerts_free(ml_broker_t *b);
/* From the housekeeping timer (every 250 ms): checks nodes and expiry once
 * a second, the store's size and the dead-letter count every two seconds
 * (and at once after a new dead letter). O(nodes) a second. */
void ml_bk_alerts_tick(ml_broker_t *b);
/* Checks everything now (after a reload changed what is watched), not at
 * the next due time. */
void ml_bk_alerts_recheck(ml_broker_t *b);
/* Appends the alert metrics to a /metrics page: medlink_alert_active
 * {alert, subject} (one series per alert in progress) and
 * medlink_alerts_raised_total{alert}. O(alerts in progress). */
void ml_bk_alerts_metrics(ml_broker_t *b, ml_sbuf_t *out);
/* Fills st->alert with the alerts in progress. The arrays are allocated
 * (release them with ml_bk_alerts_status_free); the strings are borrowed
 * from b->alerts and stay valid until the next tick. Returns 0 or
 * ML_ENOMEM (st->alert then empty). */
int ml_bk_alerts_status(ml_broker_t *b, Medlink__V1__BrokerStatus *st);
void ml_bk_alerts_status_free(Medlink__V1__BrokerStatus *st);

#endif
