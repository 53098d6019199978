/* medlinkd's wiring: ml_broker_new builds the broker (configuration, TLS,
 * store, node table, cases, the ROUTER socket and its watcher, the timers),
 * registers the few callbacks through which a lower module hands something
 * up (b->hooks), and ml_broker_reload / ml_broker_destroy change and take it
 * apart. What the broker does lives in its modules, each calling only
 * modules below it (broker/LAYERS, docs/architecture.md "Modules"):
 *
 *   session   ROUTER input, session table, handshake, Hello, dispatch
 *   ingress   per-record checks and routing of clinical messages, acks
 *   deadlines the flow timer: expiry, deadlines, escalations
 *   notices   the broker's own envelopes: notices, forwards, dead letters
 *   submit    store requests and their commit callback
 *   caseref   cases in memory: lookup, references, settle after the store
 *   delivery  node table, queues, in-flight windows, the pump
 *   wire      per-peer output: TLS, frames, blocked retry, Accepted/Nack
 *   case_engine  pure case rules (party, state asked, deadline rules)
 *
 * Loop thread only. */
#include "broker.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

#include "alerts.h"
#include "broker_int.h"
#include "caseref.h"
#include "deadlines.h"
#include "delivery.h"
#include "expiry.h"
#include "http.h"
#include "ingress.h"
#include "metrics.h"
#include "ml_crypt.h"
#include "ml_hash.h"
#include "notices.h"
#include "session.h"
#include "submit.h"
#include "web.h"
#include "wire.h"

/* ------------------------------------------------------------------ */
/* Callbacks up (b->hooks)                                             */

/* wire: s's output drained after libzmq refused it; a delivering session
 * gets deliveries again. */
static void s_drained(ml_broker_t *b, ml_session_t *s)
{
    if (s->state == S_READY && s->ns && s->ns->deliver == s)
        ml_delivery_pump(b, s->ns);
}

static void s_hooks(ml_broker_t *b)
{
    b->hooks.close_session = ml_session_close;
    b->hooks.drained = s_drained;
    b->hooks.dead_letter = ml_notices_dead_letter;
    b->hooks.after_commit = ml_notices_after_commit;
}

/* ------------------------------------------------------------------ */
/* Timers                                                              */

static void s_housekeeping_cb(uv_timer_t *t)
{
    ml_broker_t *b = t->data;
    int64_t now = ml_mono_ms();
    ml_session_tick(b, now);
    ml_delivery_tick(b, now);
    ml_bk_expiry_tick(b);
    ml_bk_web_tick(b);
    ml_bk_alerts_tick(b);
}

/* ------------------------------------------------------------------ */
/* Lifecycle                                                           */

/* The store's retention from the configuration: the *_seconds keys,
 * when set, win over the days (tests and benchmarks). */
/* The store's retention from the configuration. */
static void s_retention_opts(const ml_broker_config_t *cfg, ml_store_opts_t *so)
{
    ml_broker_config_retention(cfg, &so->retention_ms, &so->timeline_ms);
    so->prune_interval_ms = cfg->retention_interval_s * 1000L;
    so->prune_batch = (int)cfg->retention_batch;
}

int ml_broker_new(uv_loop_t *loop, ml_broker_config_t **cfg_p, ml_broker_t **out, char *err,
                  size_t errlen)
{
    int rc = ML_ENOMEM;
    ml_broker_t *b = calloc(1, sizeof *b);
    if (!b) {
        snprintf(err, errlen, "out of memory");
        return ML_ENOMEM;
    }
    b->loop = loop;
    s_hooks(b);
    b->cfg = *cfg_p;
    *cfg_p = NULL;
    b->started_at = ml_now_ms();
    b->rxbuf = malloc(64 * 1024);
    b->nodes = calloc(b->cfg->n_nodes ? b->cfg->n_nodes : 1, sizeof *b->nodes);
    if (!b->rxbuf || !b->nodes) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    for (size_t i = 0; i < b->cfg->n_nodes; i++) {
        ml_nodestate_t *ns = calloc(1, sizeof *ns);
        if (!ns) {
            snprintf(err, errlen, "out of memory");
            goto fail;
        }
        ns->node = &b->cfg->nodes[i];
        ns->index = (uint32_t)i;
        ml_queue_init(&ns->queue);
        b->nodes[b->n_nodes++] = ns;
    }
    ml_casetab_init(&b->cases);
    if (ml_hash_new(0, ML_HASH_BORROW_KEYS, &b->by_rid) != 0) {
        snprintf(err, errlen, "cannot make the session table");
        goto fail;
    }

    ml_tls_config_t tc = {.ca_file = b->cfg->ca,
                          .cert_file = b->cfg->cert,
                          .key_file = b->cfg->key,
                          .crl_file = b->cfg->crl,
                          .is_server = 1};
    rc = ml_tls_ctx_new(&tc, &b->tls, err, errlen);
    if (rc != 0)
        goto fail;

    char path[4096];
    if (ml_mkdirs(b->cfg->data_dir) != 0) {
        snprintf(err, errlen, "cannot create data_dir %s: %s", b->cfg->data_dir, strerror(errno));
        rc = ML_EIO;
        goto fail;
    }
    snprintf(path, sizeof path, "%s/broker.db", b->cfg->data_dir);
    if (b->cfg->store_key) {
        rc = ml_keyring_load(b->cfg->store_key, (const char *const *)b->cfg->store_old_keys,
                             b->cfg->n_store_old_keys, &b->keys, err, errlen);
        if (rc != 0)
            goto fail;
        ml_log(ML_LOG_INFO, "store", "payloads are sealed with AES-256-GCM under key %s (%s)",
               ml_keyring_current_id(b->keys), b->cfg->store_key);
    } else {
        ml_log(ML_LOG_WARN, "store",
               "no store_key: message payloads are stored in clear in %s/broker.db",
               b->cfg->data_dir);
    }
    ml_store_opts_t so = {.max_bytes = b->cfg->max_store_bytes, .keys = b->keys};
    s_retention_opts(b->cfg, &so);
    rc = ml_store_open(loop, path, &so, &b->store, err, errlen);
    if (rc != 0)
        goto fail;
    /* Before the store's contents are read: the metrics count from them. */
    if ((rc = ml_bk_metrics_init(b)) != 0) {
        snprintf(err, errlen, "cannot read the store's counts from %s", path);
        goto fail;
    }
    if ((rc = ml_caseref_load(b)) != 0) {
        snprintf(err, errlen, "cannot read the open cases from %s", path);
        goto fail;
    }
    rc = ml_submit_load_pending(b);
    if (rc != 0) {
        snprintf(err, errlen, "cannot read pending messages from %s", path);
        goto fail;
    }
    size_t queued = 0;
    for (size_t i = 0; i < b->n_nodes; i++)
        queued += ml_queue_len(&b->nodes[i]->queue);

    rc = ML_EIO;
    b->zctx = zmq_ctx_new();
    b->router = b->zctx ? zmq_socket(b->zctx, ZMQ_ROUTER) : NULL;
    if (!b->router) {
        snprintf(err, errlen, "cannot create ZeroMQ socket: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    int one = 1, zero = 0, linger = 0;
    int64_t maxmsg = S_FRAME_MAX * 4;
    zmq_setsockopt(b->router, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    /* Per-peer outbound queue, in frames of at most S_FRAME_MAX bytes:
     * session_output_bytes' worth. A peer that reads less than we send
     * fills it; the rest then waits in its session, where it is counted in
     * bytes (ml_wire_flush, ml_wire_room), so a peer that never reads costs about
     * twice session_output_bytes plus a record, not a delivery window of
     * maximum-size records. */
    long hwm = b->cfg->session_output_bytes / S_FRAME_MAX;
    int sndhwm = (int)(hwm < 16 ? 16 : hwm);
    zmq_setsockopt(b->router, ZMQ_SNDHWM, &sndhwm, sizeof sndhwm);
    zmq_setsockopt(b->router, ZMQ_RCVHWM, &zero, sizeof zero);
    zmq_setsockopt(b->router, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(b->router, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    if (zmq_bind(b->router, b->cfg->listen) != 0) {
        snprintf(err, errlen, "cannot listen on %s: %s", b->cfg->listen, zmq_strerror(zmq_errno()));
        goto fail;
    }
    size_t eplen = sizeof b->endpoint;
    zmq_getsockopt(b->router, ZMQ_LAST_ENDPOINT, b->endpoint, &eplen);
    if (ml_zwatch_new(loop, b->router, ml_session_router_cb, b, &b->watch) != 0) {
        snprintf(err, errlen, "cannot watch the ZeroMQ socket");
        goto fail;
    }
    uv_timer_init(loop, &b->housekeeping);
    uv_check_init(loop, &b->flush_check);
    uv_timer_init(loop, &b->flow_timer);
    uv_timer_init(loop, &b->blocked_timer);
    b->housekeeping.data = b->flush_check.data = b->flow_timer.data = b->blocked_timer.data = b;
    b->open_handles = 4;
    uv_timer_start(&b->housekeeping, s_housekeeping_cb, 250, 250);
    uv_check_start(&b->flush_check, ml_wire_flush_cb);
    ml_deadlines_start(b);
    if (ml_bk_web_init(b) != 0 || ml_bk_alerts_init(b) != 0) {
        rc = ML_ENOMEM;
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    if ((rc = ml_bk_http_start(b, err, errlen)) != 0)
        goto fail;
    ml_log(ML_LOG_INFO, "broker",
           "%s listening on %s; %zu nodes registered; %zu message(s) "
           "queued and %llu case(s) open in the store (%zu in memory)",
           b->cfg->broker_id, b->endpoint, b->n_nodes, queued, (unsigned long long)b->open_total,
           b->cases.count);
    ml_bk_expiry_log(b, "at start");
    *out = b;
    return 0;
fail : {
    ml_broker_t *tmp = b;
    ml_broker_destroy(&tmp);
}
    return rc;
}

/* ------------------------------------------------------------------ */
/* Reload (SIGHUP)                                                     */

/* A removed node keeps its own copy of its registry entry. */
static void s_node_own_free(ml_nodestate_t *ns)
{
    free(ns->own.id);
    free(ns->own.community);
    free(ns->own.display_name);
    for (size_t i = 0; i < ns->own.n_services; i++)
        free(ns->own.services[i]);
    free(ns->own.services);
    memset(&ns->own, 0, sizeof ns->own);
}

static int s_node_own_copy(ml_nodestate_t *ns, const ml_node_t *n)
{
    ml_node_t c = {.role = n->role};
    c.id = strdup(n->id);
    c.community = n->community ? strdup(n->community) : NULL;
    c.display_name = n->display_name ? strdup(n->display_name) : NULL;
    if (!c.id || (n->community && !c.community) || (n->display_name && !c.display_name)) {
        free(c.id);
        free(c.community);
        free(c.display_name);
        return ML_ENOMEM;
    }
    s_node_own_free(ns);
    ns->own = c; /* services are not kept: a removed node serves nothing */
    ns->node = &ns->own;
    return 0;
}

/* The item of a removed node's queue: every one becomes a dead letter. */
static int s_keep_none(const ml_qitem_t *it, void *arg)
{
    return 0;
}

typedef struct {
    ml_broker_t *b;
    ml_nodestate_t *ns;
} s_gone_t;

static void s_gone_cb(ml_qitem_t *it, void *arg)
{
    s_gone_t *g = arg;
    char why[400];
    snprintf(why, sizeof why, "undeliverable: recipient %s was removed from the node registry",
             g->ns->node->id);
    ml_notices_dead_letter(g->b, g->ns, it, why);
}

/* Why a reload may not change a key at runtime: it is used only at start-up. */
static void s_keep_startup_key(const char *key, char **now, char **loaded)
{
    const char *a = *now ? *now : "", *b = *loaded ? *loaded : "";
    if (strcmp(a, b) != 0)
        ml_log(ML_LOG_WARN, "broker", "reload: [broker] %s changed; it applies after a restart",
               key);
    char *tmp = *loaded;
    *loaded = *now;
    *now = tmp;
}

int ml_broker_reload(ml_broker_t *b, char *err, size_t errlen)
{
    ml_broker_config_t *nc = NULL;
    int rc = ml_broker_config_load(b->cfg->path, &nc, err, errlen);
    if (rc != 0) {
        ml_log(ML_LOG_ERROR, "broker", "reload refused, the running configuration stays: %s", err);
        return rc;
    }
    /* Keys used only at start-up keep their running values (so b->cfg
     * always describes what runs). */
    s_keep_startup_key("id", &b->cfg->broker_id, &nc->broker_id);
    s_keep_startup_key("listen", &b->cfg->listen, &nc->listen);
    s_keep_startup_key("data_dir", &b->cfg->data_dir, &nc->data_dir);
    s_keep_startup_key("ca", &b->cfg->ca, &nc->ca);
    s_keep_startup_key("cert", &b->cfg->cert, &nc->cert);
    s_keep_startup_key("key", &b->cfg->key, &nc->key);
    s_keep_startup_key("store_key", &b->cfg->store_key, &nc->store_key);
    if (nc->max_store_bytes != b->cfg->max_store_bytes)
        ml_log(ML_LOG_WARN, "broker",
               "reload: [broker] max_store_bytes changed; it applies after a restart");
    nc->max_store_bytes = b->cfg->max_store_bytes;
    {
        ml_store_opts_t was = {0}, now = {0};
        s_retention_opts(b->cfg, &was);
        s_retention_opts(nc, &now);
        if (was.retention_ms != now.retention_ms || was.timeline_ms != now.timeline_ms ||
            was.prune_interval_ms != now.prune_interval_ms || was.prune_batch != now.prune_batch)
            ml_log(ML_LOG_WARN, "broker",
                   "reload: [broker] retention keys changed; they apply after a restart");
    }
    nc->retention_days = b->cfg->retention_days;
    nc->timeline_retention_days = b->cfg->timeline_retention_days;
    nc->retention_seconds = b->cfg->retention_seconds;
    nc->timeline_retention_seconds = b->cfg->timeline_retention_seconds;
    nc->retention_interval_s = b->cfg->retention_interval_s;
    nc->retention_batch = b->cfg->retention_batch;

    /* The CRL first: if it cannot be loaded nothing changes. */
    if (nc->crl || b->cfg->crl) {
        rc = ml_tls_ctx_reload_crl(b->tls, nc->crl, err, errlen);
        if (rc != 0) {
            ml_log(ML_LOG_ERROR, "broker", "reload refused, the running configuration stays: %s",
                   err);
            ml_broker_config_destroy(&nc);
            return rc;
        }
    }

    /* Nodes: known ones take their new entry, new ones are appended, and
     * the ones no longer listed are marked removed (indexes never move). */
    size_t cap = b->n_nodes + nc->n_nodes;
    ml_nodestate_t **grown = realloc(b->nodes, (cap ? cap : 1) * sizeof *grown);
    if (!grown) {
        ml_seterr(err, errlen, "out of memory");
        ml_broker_config_destroy(&nc);
        return ML_ENOMEM;
    }
    b->nodes = grown;
    char *seen = calloc(b->n_nodes + 1, 1);
    if (!seen) {
        ml_seterr(err, errlen, "out of memory");
        ml_broker_config_destroy(&nc);
        return ML_ENOMEM;
    }
    size_t added = 0, removed = 0, old_n = b->n_nodes;
    for (size_t i = 0; i < nc->n_nodes; i++) {
        ml_nodestate_t *ns = NULL;
        for (size_t j = 0; j < old_n && !ns; j++)
            if (strcmp(b->nodes[j]->node->id, nc->nodes[i].id) == 0)
                ns = b->nodes[j];
        if (ns) {
            seen[ns->index] = 1;
            ns->node = &nc->nodes[i];
            if (ns->removed) {
                ns->removed = 0;
                added++;
            }
            s_node_own_free(ns);
            continue;
        }
        ns = calloc(1, sizeof *ns);
        if (!ns) {
            ml_log(ML_LOG_ERROR, "broker", "reload: out of memory adding node %s", nc->nodes[i].id);
            continue;
        }
        ns->node = &nc->nodes[i];
        ns->index = (uint32_t)b->n_nodes;
        ml_queue_init(&ns->queue);
        b->nodes[b->n_nodes++] = ns;
        added++;
    }
    for (size_t j = 0; j < old_n; j++) {
        ml_nodestate_t *ns = b->nodes[j];
        if (seen[j] || ns->removed)
            continue;
        if (s_node_own_copy(ns, ns->node) != 0) {
            /* Without a copy the entry would dangle; keep the node. */
            ml_log(ML_LOG_ERROR, "broker", "reload: out of memory removing node %s", ns->node->id);
            continue;
        }
        ns->removed = 1;
        removed++;
    }
    free(seen);

    /* Cases keep their service name; the new configuration owns it now. */
    ml_caseref_reload(b, nc);
    ml_broker_config_t *old = b->cfg;
    b->cfg = nc;
    ml_broker_config_destroy(&old);

    /* Sessions of removed nodes, and of nodes whose certificate the new CRL
     * revokes, end now; their next handshake is refused. */
    size_t closed = 0;
    for (ml_session_t *x = b->sessions; x; x = x->next) {
        if (x->state == S_CLOSED || x->sink)
            continue;
        char why[512];
        if (x->ns && x->ns->removed) {
            snprintf(why, sizeof why, "node %s was removed from the registry (reload)",
                     x->ns->node->id);
        } else if (x->tls && ml_tls_session_established(x->tls) &&
                   ml_tls_session_recheck(x->tls, b->tls, why, sizeof why) != 0) {
            /* why says so, e.g. "... no longer verifies: certificate revoked" */
        } else {
            continue;
        }
        ml_log(ML_LOG_WARN, "session", "closing %s session %s: %s", ml_wire_who(x), x->peer_hex,
               why);
        ml_wire_refuse(b, x, NULL, MEDLINK__V1__NACK_CODE__NACK_IDENTITY, why);
        ml_wire_flush(b, x);
        ml_session_close(b, x, NULL);
        closed++;
    }
    /* Messages queued for removed nodes can never go: dead letters. */
    for (size_t j = 0; j < b->n_nodes; j++) {
        ml_nodestate_t *ns = b->nodes[j];
        if (!ns->removed || ml_queue_len(&ns->queue) == 0)
            continue;
        s_gone_t g = {b, ns};
        ml_queue_filter(&ns->queue, s_keep_none, s_gone_cb, &g);
    }
    uv_timer_set_repeat(&b->flow_timer, (uint64_t)b->cfg->timer_ms);
    ml_log(ML_LOG_INFO, "broker",
           "reloaded %s: %zu node(s) registered (%zu added, %zu removed), CRL %s, %zu "
           "session(s) closed",
           b->cfg->path, b->cfg->n_nodes, added, removed, b->cfg->crl ? b->cfg->crl : "none",
           closed);
    ml_bk_expiry_log(b, "after reload");
    /* What the alerts watch may have changed (nodes, the CRL, limits):
     * judged now, so that a status right after the reload is current. */
    ml_bk_alerts_recheck(b);
    return 0;
}

static void s_close_cb(uv_handle_t *h)
{
    ml_broker_t *b = h->data;
    if (--b->open_handles == 0)
        free(b);
}

void ml_broker_destroy(ml_broker_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    ml_broker_t *b = *self_p;
    *self_p = NULL;
    /* Ops' view first: nothing of it may run on a broker being torn down. */
    ml_bk_http_stop(b);
    ml_bk_alerts_free(b);
    ml_bk_web_free(b);
    ml_bk_metrics_free(b);
    /* Say goodbye to live sessions, then drop everything. */
    for (ml_session_t *s = b->sessions; s; s = s->next) {
        if (s->state != S_CLOSED && s->tls && ml_tls_session_established(s->tls)) {
            ml_wire_flush(b, s);
            if (s->tls) {
                ml_tls_session_close(s->tls);
                ml_wire_send_cipher(b, s);
            }
        }
    }
    /* A session whose peer's pipe was full still holds its last output and
     * close_notify: libzmq takes more as the peer reads, so try again for a
     * bounded time (a peer that does not read does not hold us longer). */
    int64_t until = ml_mono_ms() + S_SHUTDOWN_LINGER_MS;
    for (;;) {
        size_t left = 0;
        for (ml_session_t *s = b->sessions; s; s = s->next) {
            if (s->state == S_CLOSED || !s->tls || s->sink ||
                (!s->held && ml_tls_session_pending_out(s->tls) == 0))
                continue;
            if (ml_wire_send_cipher(b, s) == ML_EAGAIN)
                left++;
        }
        if (left == 0 || ml_mono_ms() >= until)
            break;
        uv_sleep(2);
    }
    while (b->sessions) {
        ml_session_t *s = b->sessions;
        ml_session_close(b, s, NULL);
        ml_session_free(b, s);
    }
    ml_zwatch_destroy(&b->watch);
    if (b->router) {
        /* The close_notify frames queued above are still in libzmq's
         * pipes: with a linger of 0 zmq_close would drop them (a few
         * sessions in every shutdown lost theirs). Give libzmq a bounded
         * time to write them; a peer that is not reading does not hold the
         * shutdown longer than that. */
        int linger = S_SHUTDOWN_LINGER_MS;
        zmq_setsockopt(b->router, ZMQ_LINGER, &linger, sizeof linger);
        zmq_close(b->router);
    }
    if (b->zctx)
        zmq_ctx_term(b->zctx);
    /* Commits whatever is still queued for the store (those callbacks are
     * not called: the senders get no Accepted and will resend, which the
     * unique id turns into a duplicate). */
    ml_store_close(&b->store);
    ml_caseref_free_changes(b);
    ml_bk_admin_free(b);
    ml_submit_free(b);
    /* Queues and windows point into the case table: they go first. */
    ml_tls_ctx_destroy(&b->tls);
    ml_keyring_destroy(&b->keys);
    for (size_t i = 0; b->nodes && i < b->n_nodes; i++) {
        ml_queue_close(&b->nodes[i]->queue);
        free(b->nodes[i]->inflight);
        s_node_own_free(b->nodes[i]);
        free(b->nodes[i]);
    }
    ml_casetab_close(&b->cases);
    ml_hash_destroy(&b->by_rid);
    for (size_t i = 0; i < b->n_services_gone; i++)
        free(b->services_gone[i]);
    free(b->services_gone);
    free(b->nodes);
    free(b->rxbuf);
    ml_broker_config_destroy(&b->cfg);
    if (b->open_handles) {
        uv_timer_stop(&b->housekeeping);
        uv_check_stop(&b->flush_check);
        uv_timer_stop(&b->flow_timer);
        uv_timer_stop(&b->blocked_timer);
        uv_close((uv_handle_t *)&b->housekeeping, s_close_cb);
        uv_close((uv_handle_t *)&b->flush_check, s_close_cb);
        uv_close((uv_handle_t *)&b->flow_timer, s_close_cb);
        uv_close((uv_handle_t *)&b->blocked_timer, s_close_cb);
    } else {
        free(b);
    }
}

const char *ml_broker_endpoint(const ml_broker_t *b)
{
    return b->endpoint;
}

int ml_broker_feed_plaintext(ml_broker_t *b, const char *node_id, const uint8_t *data, size_t len)
{
    return ml_session_feed_plaintext(b, node_id, data, len);
}
