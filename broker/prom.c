/* medlinkd's /metrics exposition (docs/operations.md, "Metrics"): the
 * counters of metrics.h and the broker's state read through query.h,
 * written as Prometheus text format 0.0.4. An ops module: it reads, it
 * changes nothing. */
#include "prom.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "alerts.h"
#include "cases.h"
#include "config.h"
#include "expiry.h"
#include "medlink/v1/control.pb-c.h"
#include "metrics.h"
#include "ml_env.h"
#include "ml_tls.h"
#include "query.h"

#ifndef ML_PROJECT_VERSION
#define ML_PROJECT_VERSION "unknown"
#endif

#define S_EXPIRY_MAX 16

/* ---- rendering ------------------------------------------------------ */

/* A label value: \ " and newline escaped (text format 0.0.4). */
static void s_label(ml_sbuf_t *o, const char *v)
{
    const char *run = v;
    for (const char *p = v; *p; p++) {
        const char *esc = *p == '\\' ? "\\\\" : *p == '"' ? "\\\"" : *p == '\n' ? "\\n" : NULL;
        if (!esc)
            continue;
        ml_sbuf_add(o, run, (size_t)(p - run));
        ml_sbuf_puts(o, esc);
        run = p + 1;
    }
    ml_sbuf_puts(o, run);
}

/* An enum value name in lower case without its prefix ("NACK_ID_IN_USE"
 * less "NACK_" is "id_in_use"), into out. */
static const char *s_lower(const char *name, const char *prefix, char *out, size_t len)
{
    size_t pl = strlen(prefix), i = 0;
    if (strncmp(name, prefix, pl) == 0)
        name += pl;
    for (; name[i] && i + 1 < len; i++)
        out[i] = (char)(name[i] >= 'A' && name[i] <= 'Z' ? name[i] - 'A' + 'a' : name[i]);
    out[i] = '\0';
    return out;
}

static const char *s_enum_label(const ProtobufCEnumDescriptor *d, int v, const char *prefix,
                                char *out, size_t len)
{
    const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(d, v);
    return s_lower(ev ? ev->name : "UNSPECIFIED", prefix, out, len);
}

static const char *s_kind_label(int kind, char *out, size_t len)
{
    return s_lower(ml_kind_name(kind), "", out, len);
}

static void s_family(ml_sbuf_t *o, const char *name, const char *type, const char *help)
{
    ml_sbuf_printf(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Unix ms as seconds with millisecond precision. */
static void s_seconds(ml_sbuf_t *o, int64_t ms)
{
    int64_t a = ms < 0 ? -ms : ms;
    ml_sbuf_printf(o, "%s%" PRId64 ".%03" PRId64, ms < 0 ? "-" : "", a / 1000, a % 1000);
}

static void s_node_gauge(ml_sbuf_t *o, const char *name, const char *id, const char *value)
{
    ml_sbuf_printf(o, "%s{node=\"", name);
    s_label(o, id);
    ml_sbuf_printf(o, "\"} %s\n", value);
}

static const char *const s_tls_reason[ML_BK_M_TLS_REASONS] = {
    [ML_TLS_FAIL_NONE] = "none",
    [ML_TLS_FAIL_OTHER] = "other",
    [ML_TLS_FAIL_PEER_EXPIRED] = "expired",
    [ML_TLS_FAIL_PEER_REVOKED] = "revoked",
    [ML_TLS_FAIL_PEER_UNKNOWN_CA] = "unknown_ca",
    [ML_TLS_FAIL_PEER_BAD] = "bad_certificate",
    [ML_TLS_FAIL_CRL_EXPIRED] = "crl_expired",
    [ML_TLS_FAIL_NO_PEER_CERT] = "no_certificate",
    [ML_TLS_FAIL_REFUSED_EXPIRED] = "refused_expired",
    [ML_TLS_FAIL_REFUSED_REVOKED] = "refused_revoked",
    [ML_TLS_FAIL_REFUSED_UNKNOWN_CA] = "refused_unknown_ca",
    [ML_TLS_FAIL_REFUSED_OTHER] = "refused_other",
    [ML_BK_M_TLS_TIMEOUT] = "timeout",
};

typedef struct {
    size_t online, offline;
} s_node_count_t;

static void s_node_count_cb(void *arg, const ml_query_node_t *n)
{
    s_node_count_t *k = arg;
    if (n->removed)
        return;
    if (n->online)
        k->online++;
    else
        k->offline++;
}

typedef struct {
    ml_sbuf_t *o;
    const char *name;
    size_t f; /* which family */
    long limit;
    int64_t now;
} s_node_family_t;

static void s_node_family_cb(void *arg, const ml_query_node_t *n)
{
    const s_node_family_t *k = arg;
    if (n->removed)
        return;
    char v[48];
    switch (k->f) {
    case 0:
        snprintf(v, sizeof v, "%d", n->online ? 1 : 0);
        break;
    case 1:
        snprintf(v, sizeof v, "%" PRId64 ".%03" PRId64, n->last_seen / 1000, n->last_seen % 1000);
        break;
    case 2:
        snprintf(v, sizeof v, "%zu", n->queued);
        break;
    case 3: {
        int64_t oldest = n->queue_oldest_at;
        int64_t age = oldest > 0 && k->now > oldest ? k->now - oldest : 0;
        snprintf(v, sizeof v, "%" PRId64 ".%03" PRId64, age / 1000, age % 1000);
        break;
    }
    case 4:
        snprintf(v, sizeof v, "%zu", n->in_flight);
        break;
    case 5:
        snprintf(v, sizeof v, "%" PRIu32, n->opened);
        break;
    default:
        snprintf(v, sizeof v, "%.6f", k->limit > 0 ? (double)n->opened / (double)k->limit : 0.0);
        break;
    }
    s_node_gauge(k->o, k->name, n->node->id, v);
}

static void s_render_nodes(ml_broker_t *b, ml_sbuf_t *o, int64_t now)
{
    s_node_count_t c = {0, 0};
    ml_query_nodes(b, s_node_count_cb, &c);
    s_family(o, "medlink_nodes", "gauge", "Registered nodes by connection state.");
    ml_sbuf_printf(o, "medlink_nodes{state=\"online\"} %zu\nmedlink_nodes{state=\"offline\"} %zu\n",
                   c.online, c.offline);

    /* One family at a time, as the format asks: each walks the registry. */
    static const struct {
        const char *name, *help;
    } fam[] = {
        {"medlink_node_online", "1 when the registered node has a delivery session, else 0."},
        {"medlink_node_last_seen_timestamp_seconds",
         "Unix time the node last sent anything (0 if never since start)."},
        {"medlink_node_queue_messages", "Messages queued for the node, not yet in flight."},
        {"medlink_node_queue_oldest_age_seconds",
         "Age of the oldest message queued for the node (0 if none)."},
        {"medlink_node_in_flight_messages", "Messages delivered to the node and not yet acked."},
        {"medlink_node_open_cases",
         "Open cases the node opened (what open_cases_per_node bounds)."},
        {"medlink_node_open_cases_quota_ratio",
         "medlink_node_open_cases over open_cases_per_node (0 when there is no limit)."},
    };
    long limit = ml_query_config(b)->open_cases_per_node;
    for (size_t f = 0; f < sizeof fam / sizeof fam[0]; f++) {
        s_family(o, fam[f].name, "gauge", fam[f].help);
        s_node_family_t k = {o, fam[f].name, f, limit, now};
        ml_query_nodes(b, s_node_family_cb, &k);
    }
    s_family(o, "medlink_open_cases_per_node_limit", "gauge",
             "open_cases_per_node: open cases one node may have opened (0: no limit).");
    ml_sbuf_printf(o, "medlink_open_cases_per_node_limit %ld\n", limit);
}

static void s_render_messages(ml_broker_t *b, ml_sbuf_t *o)
{
    const ml_bk_metrics_t *m = ml_query_metrics(b);
    char kl[64], cl[64];
    /* Every kind a client may route, even at zero, so that rate() has a
     * series from the start; others only once counted. */
    s_family(o, "medlink_messages_accepted_total", "counter",
             "Messages stored by the broker (duplicates not counted), by kind.");
    for (int k = 0; k < ML_BK_M_KINDS; k++)
        if (m->accepted[k] || ml_env_kind_is_routed(k))
            ml_sbuf_printf(o, "medlink_messages_accepted_total{kind=\"%s\"} %" PRIu64 "\n",
                           s_kind_label(k, kl, sizeof kl), m->accepted[k]);
    s_family(o, "medlink_messages_delivered_total", "counter",
             "Messages acked by their recipient, by kind.");
    for (int k = 0; k < ML_BK_M_KINDS; k++)
        if (m->delivered[k] || ml_env_kind_is_routed(k))
            ml_sbuf_printf(o, "medlink_messages_delivered_total{kind=\"%s\"} %" PRIu64 "\n",
                           s_kind_label(k, kl, sizeof kl), m->delivered[k]);
    s_family(o, "medlink_messages_refused_total", "counter",
             "Messages refused with a Nack, by kind and Nack code.");
    for (int k = 0; k < ML_BK_M_KINDS; k++)
        for (int c = 0; c < ML_BK_M_CODES; c++)
            if (m->refused[k][c])
                ml_sbuf_printf(
                    o, "medlink_messages_refused_total{kind=\"%s\",code=\"%s\"} %" PRIu64 "\n",
                    s_kind_label(k, kl, sizeof kl),
                    s_enum_label(&medlink__v1__nack_code__descriptor, c, "NACK_", cl, sizeof cl),
                    m->refused[k][c]);
    /* Always both lines: the 64-clinic benchmark asserts the backlog one
     * stays 0 under credit (docs/protocol.md, "Credit"). */
    static const char *const reasons[ML_BK_M_REFUSED_REASONS] = {
        [ML_BK_REFUSED_BACKLOG] = "backlog",
        [ML_BK_REFUSED_HELD] = "held",
    };
    s_family(o, "medlink_refusals_total", "counter",
             "Messages refused for now (RATE_LIMITED), by reason: backlog = the store backlog "
             "past its hard limit (a sender ignoring its credit window), held = behind an "
             "earlier refusal to the same recipient.");
    for (int r = 0; r < ML_BK_M_REFUSED_REASONS; r++)
        ml_sbuf_printf(o,
                       "medlink_refusals_total{code=\"RATE_LIMITED\",reason=\"%s\"} %" PRIu64 "\n",
                       reasons[r], m->refused_reason[r]);
}

/* One histogram from per-bucket counts; bounds in units of scale. */
static void s_histogram(ml_sbuf_t *o, const char *name, const char *help, const uint64_t *hist,
                        const uint32_t *le, size_t n, double scale, double sum, uint64_t count)
{
    s_family(o, name, "histogram", help);
    uint64_t cum = 0;
    for (size_t i = 0; i < n; i++) {
        cum += hist[i];
        if (i + 1 < n)
            ml_sbuf_printf(o, "%s_bucket{le=\"%g\"} %" PRIu64 "\n", name, le[i] * scale, cum);
        else
            ml_sbuf_printf(o, "%s_bucket{le=\"+Inf\"} %" PRIu64 "\n", name, cum);
    }
    ml_sbuf_printf(o, "%s_sum %.6f\n%s_count %" PRIu64 "\n", name, sum, name, count);
}

static void s_render_store(ml_broker_t *b, ml_sbuf_t *o)
{
    ml_store_stats_t k;
    ml_query_store_stats(b, &k);
    s_histogram(o, "medlink_store_group_messages",
                "Requests (messages stored, delivery and dead-letter marks, case changes) per "
                "store group commit.",
                k.group_hist, ml_store_group_le, ML_STORE_GROUP_BUCKETS, 1.0,
                (double)k.group_requests, k.groups);
    s_histogram(o, "medlink_store_commit_duration_seconds",
                "Time the store thread took to commit one group, fsync included.", k.commit_hist,
                ml_store_commit_le_us, ML_STORE_COMMIT_BUCKETS, 1e-6, (double)k.commit_us / 1e6,
                k.groups);
    uint64_t db = 0, wal = 0;
    ml_query_store_files(b, &db, &wal);
    s_family(o, "medlink_store_size_bytes", "gauge",
             "Size of broker.db and its body segments (broker.db-seg/).");
    ml_sbuf_printf(o, "medlink_store_size_bytes %" PRIu64 "\n", db);
    s_family(o, "medlink_store_wal_size_bytes", "gauge", "Size of broker.db-wal.");
    ml_sbuf_printf(o, "medlink_store_wal_size_bytes %" PRIu64 "\n", wal);
    s_family(o, "medlink_store_max_bytes", "gauge",
             "max_store_bytes: the store refuses new messages past it (0: no limit).");
    ml_sbuf_printf(o, "medlink_store_max_bytes %ld\n", ml_query_config(b)->max_store_bytes);
}

static void s_render_cases(ml_broker_t *b, ml_sbuf_t *o)
{
    const ml_bk_metrics_t *m = ml_query_metrics(b);
    char sl[64], rl[64];
    s_family(o, "medlink_cases_open", "gauge",
             "Open cases (in memory or only in the store) by kind and state.");
    for (int k = ML_CASE_REFERRAL; k < ML_CASE_KIND_COUNT; k++) {
        char prefix[40];
        s_lower(ml_case_kind_name(k), "", prefix, sizeof prefix);
        for (size_t i = 0; prefix[i]; i++)
            prefix[i] =
                (char)(prefix[i] >= 'a' && prefix[i] <= 'z' ? prefix[i] - 'a' + 'A' : prefix[i]);
        strncat(prefix, "_", sizeof prefix - strlen(prefix) - 1);
        for (int st = 1; st < ML_BK_M_STATES; st++) {
            if (ml_case_rank(k, st) == 0 || ml_case_terminal(k, st))
                continue;
            ml_sbuf_printf(o, "medlink_cases_open{kind=\"%s\",state=\"%s\"} %" PRId64 "\n",
                           ml_case_kind_name(k),
                           s_lower(ml_case_state_name(k, st), prefix, sl, sizeof sl),
                           m->cases_open[k][st]);
        }
    }
    s_family(o, "medlink_cases_overdue", "gauge",
             "Open cases whose deadline has passed (as of the last deadline check).");
    ml_sbuf_printf(o, "medlink_cases_overdue %" PRIu64 "\n", m->overdue);
    s_family(o, "medlink_escalations_total", "counter",
             "Escalations raised (one per case or alert), by reason.");
    for (int r = 1; r < ML_BK_M_REASONS; r++)
        if (protobuf_c_enum_descriptor_get_value(&medlink__v1__escalation_reason__descriptor, r))
            ml_sbuf_printf(o, "medlink_escalations_total{reason=\"%s\"} %" PRIu64 "\n",
                           s_enum_label(&medlink__v1__escalation_reason__descriptor, r,
                                        "ESCALATION_", rl, sizeof rl),
                           m->escalations[r]);
    s_family(o, "medlink_dead_letters", "gauge", "Messages in the dead-letter queue now.");
    ml_sbuf_printf(o, "medlink_dead_letters %" PRId64 "\n", m->dead_now);
    s_family(o, "medlink_dead_letters_total", "counter",
             "Messages made dead letters since start-up.");
    ml_sbuf_printf(o, "medlink_dead_letters_total %" PRIu64 "\n", m->dead_made);
}

/* The name an expiry entry goes by: the CN of a certificate, the file of
 * the CRL (ml_tls_ctx_expiry's sentences, in its documented order). */
static void s_expiry_name(const char *what, int crl, char *out, size_t len)
{
    const char *p = crl ? what + 4 : strstr(what, "(CN ");
    size_t n;
    if (!p || (crl && strncmp(what, "CRL ", 4) != 0)) {
        p = what;
        n = strlen(p);
    } else if (crl) {
        const char *end = strstr(p, " (next update)");
        n = end ? (size_t)(end - p) : strlen(p);
    } else {
        p += 4;
        n = strlen(p);
        if (n && p[n - 1] == ')')
            n--;
    }
    /* Cut short rather than fail: a name is only a label. */
    if (n >= len)
        n = len - 1;
    memcpy(out, p, n);
    out[n] = '\0';
}

static void s_render_tls(ml_broker_t *b, ml_sbuf_t *o, int64_t now)
{
    const ml_bk_metrics_t *m = ml_query_metrics(b);
    s_family(o, "medlink_tls_handshake_failures_total", "counter",
             "TLS handshakes refused or failed, by reason.");
    for (int r = ML_TLS_FAIL_OTHER; r < ML_BK_M_TLS_REASONS; r++)
        ml_sbuf_printf(o, "medlink_tls_handshake_failures_total{reason=\"%s\"} %" PRIu64 "\n",
                       s_tls_reason[r], m->tls_fail[r]);

    ml_bk_expiry_t e[S_EXPIRY_MAX];
    size_t n = ml_query_expiry(b, now, e, S_EXPIRY_MAX);
    if (n > S_EXPIRY_MAX)
        n = S_EXPIRY_MAX;
    const ml_broker_config_t *cfg = ml_query_config(b);
    int has_crl = cfg->crl && *cfg->crl;
    char names[S_EXPIRY_MAX][200];
    s_family(o, "medlink_tls_expiry_seconds", "gauge",
             "Seconds until a certificate's notAfter or the CRL's nextUpdate (negative once "
             "past).");
    for (size_t i = 0; i < n; i++) {
        int crl = has_crl && i + 1 == n;
        const char *kind = i == 0 ? "certificate" : crl ? "crl" : "ca";
        s_expiry_name(e[i].what, crl, names[i], sizeof names[i]);
        if (e[i].not_after == 0)
            continue; /* a CRL without nextUpdate never expires */
        /* Two CAs of one CN must not make two samples of one series. */
        int dup = 0;
        for (size_t j = 1; j < i; j++)
            dup += strcmp(names[j], names[i]) == 0;
        ml_sbuf_printf(o, "medlink_tls_expiry_seconds{kind=\"%s\",name=\"", kind);
        s_label(o, names[i]);
        if (dup && !crl && i > 0)
            ml_sbuf_printf(o, "#%d", dup + 1);
        ml_sbuf_puts(o, "\"} ");
        s_seconds(o, e[i].not_after - now);
        ml_sbuf_puts(o, "\n");
    }
}

typedef struct {
    size_t handshake, ready;
} s_session_count_t;

static void s_session_cb(void *arg, const ml_query_session_t *v)
{
    s_session_count_t *k = arg;
    if (v->sink)
        return;
    if (v->state == ML_QUERY_SESSION_HANDSHAKE)
        k->handshake++;
    else if (v->state == ML_QUERY_SESSION_READY)
        k->ready++;
}

void ml_bk_prom_render(ml_broker_t *b, ml_sbuf_t *out)
{
    if (!ml_query_metrics(b)) {
        out->failed = ML_EINVAL;
        return;
    }
    int64_t now = ml_now_ms();
    s_family(out, "medlink_build_info", "gauge", "The medlinkd build: always 1.");
    ml_sbuf_printf(out, "medlink_build_info{version=\"%s\"} 1\n", ML_PROJECT_VERSION);
    s_family(out, "medlink_start_time_seconds", "gauge", "Unix time medlinkd started.");
    ml_sbuf_puts(out, "medlink_start_time_seconds ");
    ml_query_counters_t c;
    ml_query_counters(b, &c);
    s_seconds(out, c.started_at);
    ml_sbuf_puts(out, "\n");

    s_session_count_t k = {0, 0};
    ml_query_sessions(b, s_session_cb, &k);
    s_family(out, "medlink_sessions", "gauge",
             "Client sessions: in the TLS handshake or before Hello, and ready.");
    ml_sbuf_printf(out,
                   "medlink_sessions{state=\"handshake\"} %zu\nmedlink_sessions{state=\"ready\"} "
                   "%zu\n",
                   k.handshake, k.ready);
    s_render_nodes(b, out, now);
    s_render_messages(b, out);
    s_render_store(b, out);
    s_render_cases(b, out);
    s_render_tls(b, out, now);
    ml_bk_alerts_metrics(b, out);
}
