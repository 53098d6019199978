/* Fuzz target: medlinkd's whole session input path after a completed TLS
 * handshake (broker/broker.c, flow.c, cases.c, casetab.c, admin.c, queue.c,
 * store.c), through ml_broker_feed_plaintext: frame reader, Envelope
 * decode, Hello, identity, validation, routing, the ACL, the case engine,
 * the store thread and its answers, deliveries, acks, refusals, dead
 * letters and admin requests.
 *
 * One broker per process, made on first use and kept across inputs, so an
 * input costs a few store commits and not a start-up: a config in a temp
 * folder (seven nodes of every role, services, the demo's ACL, deadlines
 * short enough to run out, escalation and a fallback hospital), a CA and
 * the broker's certificate made by deploy/pki.sh, data_dir on /dev/shm
 * when there is one. Every S_RESET_EVERY inputs the broker is destroyed
 * (which exercises its shutdown) and made again, alternately on the store
 * it left (start-up: the open cases and queued messages the fuzzer made are
 * loaded back) and on an empty one, so the state it carries from one input
 * to the next stays bounded.
 *
 * Input: segments. A segment starts with a byte whose low 3 bits pick one
 * of the seven nodes (the session is that node's, as if its certificate
 * had been verified), then a 16-bit big-endian length and that many bytes
 * of the decrypted stream (fewer at the end of the input). The value 7
 * picks an action instead, by the byte's upper bits ((byte >> 3) % 6): run the deadline timer now,
 * run the loop once, wait for the store, close every session, feed a segment for a node that is not
 * registered, or reload the configuration (SIGHUP) with a second one that drops a node, a service
 * and a deadline, or back (twice at most per input; an input that leaves the second one in force is
 * reloaded back after it). After each segment the loop runs once (UV_RUN_NOWAIT) so store answers
 * interleave with input as they would.
 *
 * After the input: the store is waited for (every put answered), then
 * every session still open is closed by feeding it an oversize record
 * header, so the next input starts each node with a fresh session that
 * must say Hello first. Checked, aborting when broken: every put is
 * answered, no node has more deliveries in flight than its window, every
 * session closes on an oversize record, and once all are closed no node is
 * online or has anything in flight. What the broker carries over is its
 * store and its cases; a crash that needs them may not replay from its
 * input alone (replay the working corpus before it in the same process). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#include "broker.h"
#include "broker_int.h"
#include "config.h"
#include "fuzz_common.h"
#include "ml_common.h"
#include "ml_frame.h"

#define S_BROKER_ID "medlinkd.fuzz"
#define S_MAX_RECORD 65536
#define S_RESET_EVERY 4096
#define S_MAX_SEGMENTS 256

#define S_FAIL(...) ml_fuzz_fail("fuzz_session", __VA_ARGS__)

static const char *const s_nodes[7] = {
    "township.xinzhan.clinic",      "county.zhaozhou.hospital", "city.shijiazhuang.hospital",
    "reading.shijiazhuang.imaging", "ops.zhaozhou.admin",       "village.beiwang.clinic",
    "reading.zhaozhou.imaging",
};

static const char s_config[] =
    "[broker]\n"
    "id = " S_BROKER_ID "\n"
    "listen = tcp://127.0.0.1:0\n"
    "data_dir = data\n"
    "ca = pki/ca.crt\n"
    "cert = pki/" S_BROKER_ID ".crt\n"
    "key = pki/" S_BROKER_ID ".key\n"
    "log_level = error\n"
    "max_record = 65536\n"
    "session_buffer = 65536\n"
    "heartbeat_ms = 2000\n"
    "session_timeout_ms = 3600000\n"
    "handshake_timeout_ms = 600000\n"
    "delivery_window = 8\n"
    "ack_timeout_ms = 86400000\n"
    "max_delivery_attempts = 2\n"
    "node_rate = 10000000\n"
    "timer_ms = 60000\n"
    "notify_delivered = yes\n"
    "\n"
    /* No HTTP endpoint: the fuzzer drives sessions only, and the default
     * port would collide between parallel runs. */
    "[http]\nlisten =\n"
    "\n"
    "[node township.xinzhan.clinic]\nrole = TOWNSHIP_CLINIC\ncommunity = zhaozhou\n"
    "name = Xinzhan Township Health Centre\n"
    "[node village.beiwang.clinic]\nrole = VILLAGE_CLINIC\ncommunity = zhaozhou\n"
    "[node county.zhaozhou.hospital]\nrole = COUNTY_HOSPITAL\ncommunity = zhaozhou\n"
    "[node city.shijiazhuang.hospital]\nrole = CITY_HOSPITAL\ncommunity = shijiazhuang\n"
    "[node reading.shijiazhuang.imaging]\nrole = IMAGING_CENTRE\ncommunity = shijiazhuang\n"
    "services = imaging.ct imaging.dr\n"
    "[node reading.zhaozhou.imaging]\nrole = IMAGING_CENTRE\ncommunity = zhaozhou\n"
    "services = imaging.ct\n"
    "[node ops.zhaozhou.admin]\nrole = OPS\ncommunity = zhaozhou\n"
    "\n"
    "[deadlines]\n"
    "referral.emergency = ACCEPTED 1ms\n"
    "referral = ACCEPTED 3d\n"
    "imaging.emergency = REPORTED 1ms\n"
    "imaging = REPORTED 2d\n"
    "down_transfer = ARRIVED 1ms after ACCEPTED\n"
    "[escalation]\nnotify = ops.zhaozhou.admin\nredirect_emergency = yes\n"
    "[community zhaozhou]\nfallback = city.shijiazhuang.hospital\n"
    "\n"
    "[acl TOWNSHIP_CLINIC]\n"
    "REFERRAL = COUNTY_HOSPITAL CITY_HOSPITAL\n"
    "REFERRAL_UPDATE = COUNTY_HOSPITAL CITY_HOSPITAL\n"
    "IMAGING_CONSULT = IMAGING_CENTRE\n"
    "IMAGING_CHUNK = IMAGING_CENTRE\n"
    "IMAGING_UPDATE = IMAGING_CENTRE\n"
    "DOWN_TRANSFER_UPDATE = COUNTY_HOSPITAL CITY_HOSPITAL\n"
    "[acl VILLAGE_CLINIC]\n"
    "REFERRAL = COUNTY_HOSPITAL CITY_HOSPITAL\n"
    "REFERRAL_UPDATE = COUNTY_HOSPITAL CITY_HOSPITAL\n"
    "IMAGING_CONSULT = IMAGING_CENTRE\n"
    "IMAGING_CHUNK = IMAGING_CENTRE\n"
    "IMAGING_UPDATE = IMAGING_CENTRE\n"
    "DOWN_TRANSFER_UPDATE = COUNTY_HOSPITAL CITY_HOSPITAL\n"
    "[acl COUNTY_HOSPITAL]\n"
    "REFERRAL = CITY_HOSPITAL\n"
    "REFERRAL_UPDATE = TOWNSHIP_CLINIC VILLAGE_CLINIC CITY_HOSPITAL\n"
    "IMAGING_CONSULT = IMAGING_CENTRE\n"
    "IMAGING_CHUNK = IMAGING_CENTRE\n"
    "IMAGING_UPDATE = IMAGING_CENTRE\n"
    "DOWN_TRANSFER = TOWNSHIP_CLINIC VILLAGE_CLINIC\n"
    "DOWN_TRANSFER_UPDATE = TOWNSHIP_CLINIC VILLAGE_CLINIC\n"
    "[acl CITY_HOSPITAL]\n"
    "REFERRAL_UPDATE = TOWNSHIP_CLINIC VILLAGE_CLINIC COUNTY_HOSPITAL\n"
    "DOWN_TRANSFER = TOWNSHIP_CLINIC VILLAGE_CLINIC\n"
    "DOWN_TRANSFER_UPDATE = TOWNSHIP_CLINIC VILLAGE_CLINIC\n"
    "[acl IMAGING_CENTRE]\n"
    "IMAGING_UPDATE = TOWNSHIP_CLINIC VILLAGE_CLINIC COUNTY_HOSPITAL CITY_HOSPITAL\n"
    "IMAGING_REPORT = TOWNSHIP_CLINIC VILLAGE_CLINIC COUNTY_HOSPITAL CITY_HOSPITAL\n"
    "IMAGING_RESEND = TOWNSHIP_CLINIC VILLAGE_CLINIC COUNTY_HOSPITAL CITY_HOSPITAL\n";

/* The second configuration: s_config without the village clinic, without
 * reading.zhaozhou.imaging's service, with a longer emergency deadline. */
static const struct {
    const char *from, *to;
} s_alt_edits[] = {
    {"[node village.beiwang.clinic]\nrole = VILLAGE_CLINIC\ncommunity = zhaozhou\n", ""},
    {"community = zhaozhou\nservices = imaging.ct\n", "community = zhaozhou\n"},
    {"referral.emergency = ACCEPTED 1ms\n", "referral.emergency = ACCEPTED 2h\n"},
};

static char s_dir[512];
static char s_ini[600];
static char *s_alt;  /* the second configuration's text */
static int s_alt_on; /* it is the one loaded */
static unsigned long s_resets;
static uv_loop_t s_loop;
static ml_broker_t *s_broker;
static unsigned long s_inputs;
static uint8_t s_filler[ML_FRAME_HEADER + S_MAX_RECORD + ML_FRAME_HEADER];

/* Starts the broker; wipe: on an empty store (else on the one left). */
static void s_broker_start(int wipe)
{
    char err[1024], data[700];
    ml_broker_config_t *cfg = NULL;
    snprintf(data, sizeof data, "%s/data", s_dir);
    if (wipe)
        ml_fuzz_rmtree(data);
    if (ml_broker_config_load(s_ini, &cfg, err, sizeof err) != 0)
        S_FAIL("config: %s", err);
    if (ml_broker_new(&s_loop, &cfg, &s_broker, err, sizeof err) != 0)
        S_FAIL("broker: %s", err);
}

static void s_broker_stop(void)
{
    ml_broker_destroy(&s_broker);
    /* Until the handles are closed and their memory freed. */
    uv_run(&s_loop, UV_RUN_DEFAULT);
}

static void s_cleanup(void)
{
    if (s_broker) {
        s_broker_stop();
        uv_loop_close(&s_loop);
    }
    free(s_alt);
    if (s_dir[0])
        ml_fuzz_rmtree(s_dir);
}

/* Builds the second configuration from the first. */
static char *s_make_alt(void)
{
    char *t = strdup(s_config);
    for (size_t i = 0; t && i < sizeof s_alt_edits / sizeof s_alt_edits[0]; i++) {
        char *at = strstr(t, s_alt_edits[i].from);
        if (!at)
            S_FAIL("the second configuration cannot be made (edit %zu)", i);
        size_t a = strlen(s_alt_edits[i].from), b = strlen(s_alt_edits[i].to);
        memmove(at + b, at + a, strlen(at + a) + 1);
        memcpy(at, s_alt_edits[i].to, b);
    }
    return t;
}

static void s_close_session_of(const char *node);

/* Reloads with the other configuration, as SIGHUP does. A reload closes
 * the sessions of the nodes it removes, but not plaintext ones
 * (ml_broker_reload skips them), so this closes them first: a removed
 * node's session must not live on into a later reload that adds it back. */
static void s_reload(void)
{
    if (!s_alt_on) {
        char *ids[64];
        size_t n = 0;
        for (ml_session_t *x = s_broker->sessions; x && n < 64; x = x->next) {
            char sect[300];
            if (!x->sink || x->state == S_CLOSED || !x->peer_id)
                continue;
            snprintf(sect, sizeof sect, "[node %s]", x->peer_id);
            if (!strstr(s_alt, sect) && (ids[n] = strdup(x->peer_id)))
                n++;
        }
        for (size_t i = 0; i < n; i++) {
            s_close_session_of(ids[i]);
            free(ids[i]);
        }
    }
    s_alt_on = !s_alt_on;
    const char *text = s_alt_on ? s_alt : s_config;
    ml_fuzz_write_file(s_ini, text, strlen(text));
    char err[1024];
    if (ml_broker_reload(s_broker, err, sizeof err) != 0)
        S_FAIL("reload of a good configuration failed: %s", err);
    uv_run(&s_loop, UV_RUN_NOWAIT);
}

static void s_init(void)
{
    ml_fuzz_quiet();
    ml_fuzz_tmpdir("session", s_dir, sizeof s_dir);
    atexit(s_cleanup);
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "'%s/deploy/pki.sh' --dir '%s/pki' --ca-name 'medlink fuzz CA' " S_BROKER_ID
             " >'%s/pki.log' 2>&1",
             ml_fuzz_source_dir(), s_dir, s_dir);
    if (system(cmd) != 0)
        S_FAIL("deploy/pki.sh failed (see %s/pki.log; set ML_SOURCE_DIR?)", s_dir);
    snprintf(s_ini, sizeof s_ini, "%s/medlinkd.ini", s_dir);
    ml_fuzz_write_file(s_ini, s_config, sizeof s_config - 1);
    memset(s_filler, 0xff, sizeof s_filler);
    if (!(s_alt = s_make_alt()))
        S_FAIL("out of memory");
    if (uv_loop_init(&s_loop) != 0)
        S_FAIL("uv_loop_init");
    s_broker_start(1);
}

/* Runs the loop until every put queued for the store has been answered
 * (the store thread wakes the loop through a uv_async_t). Bounded: a put
 * that is never answered is a bug, reported as a hang. */
static void s_drain(void)
{
    for (int spins = 0; s_broker->puts_pending > 0; spins++) {
        if (spins == 100000)
            S_FAIL("%llu store put(s) never answered", (unsigned long long)s_broker->puts_pending);
        uv_run(&s_loop, UV_RUN_ONCE);
    }
    uv_run(&s_loop, UV_RUN_NOWAIT);
}

/* The deadline and expiry check, now rather than every timer_ms. */
static void s_run_timer(void)
{
    uv_timer_t *t = &s_broker->flow_timer;
    uv_timer_start(t, t->timer_cb, 0, uv_timer_get_repeat(t));
    uv_run(&s_loop, UV_RUN_NOWAIT);
}

/* Closes node's plaintext session: an oversize header ends a stream at a
 * record boundary; a partial record is first completed by the filler (at
 * most max_record bytes), whose next header is oversize. */
static void s_close_session_of(const char *node)
{
    (void)ml_broker_feed_plaintext(s_broker, node, s_filler, sizeof s_filler);
}

/* Closes every plaintext session still open. */
static void s_close_sessions(void)
{
    char *ids[64];
    size_t n = 0;
    for (ml_session_t *s = s_broker->sessions; s && n < 64; s = s->next)
        if (s->sink && s->state != S_CLOSED && s->peer_id)
            if ((ids[n] = strdup(s->peer_id)))
                n++;
    for (size_t i = 0; i < n; i++) {
        s_close_session_of(ids[i]);
        free(ids[i]);
    }
    uv_run(&s_loop, UV_RUN_NOWAIT);
    for (ml_session_t *s = s_broker->sessions; s; s = s->next)
        if (s->sink && s->state != S_CLOSED)
            S_FAIL("session of %s did not close on an oversize record", s->peer_id);
}

/* What must hold between segments: no node has more deliveries in flight
 * than its window, nor a negative count of sessions; idle (every session
 * closed): no node is online, has a delivering session or anything in
 * flight (closing requeues it), and no session is counted live. */
static void s_check(int idle)
{
    for (size_t i = 0; i < s_broker->n_nodes; i++) {
        const ml_nodestate_t *ns = s_broker->nodes[i];
        if (ns->n_inflight > (size_t)s_broker->cfg->delivery_window || ns->online < 0)
            S_FAIL("node %s: %zu in flight (window %ld), online %d", ns->node->id, ns->n_inflight,
                   s_broker->cfg->delivery_window, ns->online);
        if (idle && (ns->online != 0 || ns->deliver || ns->n_inflight != 0))
            S_FAIL("node %s with every session closed: online %d, deliver %p, %zu in flight",
                   ns->node->id, ns->online, (void *)ns->deliver, ns->n_inflight);
    }
    if (idle && s_broker->n_live != 0)
        S_FAIL("%zu session(s) counted live with every session closed", s_broker->n_live);
}

static void s_feed(const char *node, ml_fuzz_in_t *in)
{
    size_t want = ml_fuzz_u16(in), got;
    const uint8_t *p = ml_fuzz_take(in, want, &got);
    /* An exact-size copy, so a read past the segment is caught. */
    uint8_t *copy = malloc(got ? got : 1);
    if (!copy)
        S_FAIL("out of memory");
    if (got)
        memcpy(copy, p, got);
    int rc = ml_broker_feed_plaintext(s_broker, node, copy, got);
    free(copy);
    if (rc != 0 && rc != ML_ENOTFOUND && rc != ML_ENOMEM)
        S_FAIL("feed for %s returned %d", node, rc);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!s_broker)
        s_init();
    if (++s_inputs % S_RESET_EVERY == 0) {
        s_broker_stop();
        s_broker_start(++s_resets % 2 == 0);
    }
    ml_fuzz_in_t in = {data, size};
    int reloads = 0;
    for (int seg = 0; in.n > 0 && seg < S_MAX_SEGMENTS; seg++) {
        uint8_t sel = ml_fuzz_u8(&in);
        if ((sel & 7) != 7) {
            s_feed(s_nodes[sel & 7], &in);
            uv_run(&s_loop, UV_RUN_NOWAIT);
            s_check(0);
            continue;
        }
        switch ((sel >> 3) % 6) {
        case 0:
            s_run_timer();
            break;
        case 1:
            uv_run(&s_loop, UV_RUN_NOWAIT);
            break;
        case 2:
            s_drain();
            break;
        case 3:
            s_drain();
            s_close_sessions();
            break;
        case 4:
            s_feed("unknown.clinic", &in);
            break;
        default:
            /* At most there and back in one input: a reload costs a
             * whole configuration load, and more of them add nothing. */
            if (reloads++ < 2) {
                s_drain();
                s_reload();
            }
            break;
        }
    }
    s_drain();
    if (s_alt_on)
        s_reload();
    s_close_sessions();
    s_drain();
    s_check(1);
    return 0;
}
