/* medlinkd's metric counters (docs/operations.md, "Metrics"): what the
 * broker's modules bump as things happen. prom.c renders them, with the
 * broker's state read through query.h, as the /metrics exposition. */
#include "metrics.h"

#include <stdlib.h>

#include "broker_int.h"
#include "ml_tls.h"

static int s_clamp(int v, int n)
{
    return v >= 0 && v < n ? v : 0;
}

/* ---- bumps ---------------------------------------------------------- */

void ml_bk_metrics_accepted(ml_broker_t *b, int kind)
{
    ml_bk_metrics_t *m = b->metrics;
    if (m)
        m->accepted[s_clamp(kind, ML_BK_M_KINDS)]++;
}

void ml_bk_metrics_delivered(ml_broker_t *b, int kind)
{
    ml_bk_metrics_t *m = b->metrics;
    if (m)
        m->delivered[s_clamp(kind, ML_BK_M_KINDS)]++;
}

void ml_bk_metrics_refused(ml_broker_t *b, int kind, int code)
{
    ml_bk_metrics_t *m = b->metrics;
    if (m)
        m->refused[s_clamp(kind, ML_BK_M_KINDS)][s_clamp(code, ML_BK_M_CODES)]++;
}

void ml_bk_metrics_refused_reason(ml_broker_t *b, int reason)
{
    ml_bk_metrics_t *m = b->metrics;
    if (m)
        m->refused_reason[s_clamp(reason, ML_BK_M_REFUSED_REASONS)]++;
}

void ml_bk_metrics_escalation(ml_broker_t *b, int reason)
{
    ml_bk_metrics_t *m = b->metrics;
    if (m)
        m->escalations[s_clamp(reason, ML_BK_M_REASONS)]++;
}

void ml_bk_metrics_tls_failure(ml_broker_t *b, int fail)
{
    ml_bk_metrics_t *m = b->metrics;
    if (m)
        m->tls_fail[fail == ML_BK_TLS_FAIL_TIMEOUT ? ML_BK_M_TLS_TIMEOUT
                                                   : s_clamp(fail, ML_BK_M_TLS_TIMEOUT)]++;
}

void ml_bk_metrics_case(ml_broker_t *b, int case_kind, int state, int delta)
{
    ml_bk_metrics_t *m = b->metrics;
    if (!m)
        return;
    int64_t *n =
        &m->cases_open[s_clamp(case_kind, ML_CASE_KIND_COUNT)][s_clamp(state, ML_BK_M_STATES)];
    /* Never below zero: a count that went wrong must not show as a
     * negative number of cases. */
    if (delta < 0 && *n > 0)
        (*n)--;
    else if (delta > 0)
        (*n)++;
}

void ml_bk_metrics_overdue(ml_broker_t *b, uint64_t n)
{
    ml_bk_metrics_t *m = b->metrics;
    if (m)
        m->overdue = n;
}

void ml_bk_metrics_dead_letter(ml_broker_t *b)
{
    ml_bk_metrics_t *m = b->metrics;
    if (!m)
        return;
    m->dead_now++;
    m->dead_made++;
}

void ml_bk_metrics_dead_gone(ml_broker_t *b, uint64_t n)
{
    ml_bk_metrics_t *m = b->metrics;
    if (!m)
        return;
    m->dead_now = (uint64_t)m->dead_now > n ? m->dead_now - (int64_t)n : 0;
}

/* ---- lifecycle ------------------------------------------------------ */

static void s_seed_state(void *arg, int kind, int state, int64_t n)
{
    ml_bk_metrics_t *m = arg;
    if (n > 0)
        m->cases_open[s_clamp(kind, ML_CASE_KIND_COUNT)][s_clamp(state, ML_BK_M_STATES)] += n;
}

int ml_bk_metrics_init(ml_broker_t *b)
{
    ml_bk_metrics_t *m = calloc(1, sizeof *m);
    if (!m)
        return ML_ENOMEM;
    int64_t dead = 0;
    int rc = ml_store_cases_open_states(b->store, s_seed_state, m);
    if (rc == 0)
        rc = ml_store_dead_count(b->store, &dead);
    if (rc != 0) {
        free(m);
        return rc;
    }
    m->dead_now = dead;
    b->metrics = m;
    return 0;
}

void ml_bk_metrics_free(ml_broker_t *b)
{
    free(b->metrics);
    b->metrics = NULL;
}
