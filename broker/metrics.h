/* medlinkd's Prometheus metrics (/metrics, docs/operations.md): counters
 * the broker's modules bump as things happen (prom.h renders them). Loop thread only, except
 * where a function says otherwise.
 *
 * Every label set is bounded: message kinds, Nack codes, escalation
 * reasons, TLS failure kinds and case states are enums (fixed arrays here,
 * an out-of-range value counts under index 0, "unspecified"), and the
 * per-node series follow the node registry. The bumps are O(1) and safe to
 * call before ml_bk_metrics_init or after ml_bk_metrics_free (they do
 * nothing then). */
#ifndef ML_BK_METRICS_H
#define ML_BK_METRICS_H

#include <stdint.h>

#include "cases.h"
#include "ml_tls.h"

typedef struct ml_broker ml_broker_t;
typedef struct ml_bk_metrics ml_bk_metrics_t;

/* Kind enum of envelope.proto: 0 ... KIND_ESCALATION (29). */
#define ML_BK_M_KINDS 32
/* NackCode: 0 ... NACK_ID_IN_USE (16). */
#define ML_BK_M_CODES 20
/* EscalationReason: 0 ... ESCALATION_DLQ (6). */
#define ML_BK_M_REASONS 8
/* ml_tls_fail_t up to ML_TLS_FAIL_REFUSED_OTHER, then "timeout". */
#define ML_BK_M_TLS_TIMEOUT (ML_TLS_FAIL_REFUSED_OTHER + 1)
#define ML_BK_M_TLS_REASONS (ML_BK_M_TLS_TIMEOUT + 1)
/* States of a case kind: the largest status enum has 12 values. */
#define ML_BK_M_STATES 16

/* Why a message was refused for now, where the Nack code alone does not
 * say (medlink_refusals_total{code,reason}): the store backlog past its
 * hard limit (a sender ignoring its credit window, docs/protocol.md
 * "Credit"), or held behind an earlier refusal to the same recipient. */
enum { ML_BK_REFUSED_BACKLOG = 0, ML_BK_REFUSED_HELD = 1, ML_BK_M_REFUSED_REASONS = 2 };

/* The counters; prom.c reads them (loop thread). */
struct ml_bk_metrics {
    uint64_t accepted[ML_BK_M_KINDS];
    uint64_t delivered[ML_BK_M_KINDS];
    uint64_t refused[ML_BK_M_KINDS][ML_BK_M_CODES];
    uint64_t refused_reason[ML_BK_M_REFUSED_REASONS]; /* ML_BK_REFUSED_*, all RATE_LIMITED */
    uint64_t escalations[ML_BK_M_REASONS];
    uint64_t tls_fail[ML_BK_M_TLS_REASONS];
    int64_t cases_open[ML_CASE_KIND_COUNT][ML_BK_M_STATES];
    uint64_t overdue;
    int64_t dead_now;
    uint64_t dead_made;
};

/* A TLS handshake that did not finish within handshake_timeout_ms: counted
 * with the ml_tls_fail_t kinds under reason "timeout". */
#define ML_BK_TLS_FAIL_TIMEOUT (-1)

/* Allocates b->metrics and seeds what must count from the store's
 * contents (open cases by kind and state, dead letters): called once the
 * store is open, before anything changes it. Returns 0, ML_ENOMEM or
 * ML_ESTORE. */
int ml_bk_metrics_init(ml_broker_t *b);
void ml_bk_metrics_free(ml_broker_t *b);

/* ---- bumps (loop thread) ---------------------------------------------- */

/* A message of kind (Kind enum) was stored (not a duplicate). */
void ml_bk_metrics_accepted(ml_broker_t *b, int kind);
/* A message of kind was acked by its recipient. */
void ml_bk_metrics_delivered(ml_broker_t *b, int kind);
/* A message of kind was refused with a Nack of code (NackCode enum). */
void ml_bk_metrics_refused(ml_broker_t *b, int kind, int code);
/* A message was refused for reason (ML_BK_REFUSED_*); counted besides
 * ml_bk_metrics_refused, which counts every Nack by code. */
void ml_bk_metrics_refused_reason(ml_broker_t *b, int reason);
/* An Escalation was raised for reason (EscalationReason enum): one per
 * case or alert, whoever was told. */
void ml_bk_metrics_escalation(ml_broker_t *b, int reason);
/* A TLS handshake failed (an ml_tls_fail_t, or ML_BK_TLS_FAIL_TIMEOUT). */
void ml_bk_metrics_tls_failure(ml_broker_t *b, int fail);
/* An open case of case_kind enters (delta +1) or leaves (-1) state. */
void ml_bk_metrics_case(ml_broker_t *b, int case_kind, int state, int delta);
/* The cases open with their deadline passed, as the flow timer last
 * counted them. */
void ml_bk_metrics_overdue(ml_broker_t *b, uint64_t n);
/* A message became a dead letter. */
void ml_bk_metrics_dead_letter(ml_broker_t *b);
/* n dead letters left the queue (replayed or purged). */
void ml_bk_metrics_dead_gone(ml_broker_t *b, uint64_t n);

#endif
