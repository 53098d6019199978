/* fault-crowd: many clients of one medlinkd at once, good and bad, for the
 * soak's crowd scenario (tests/fault/soak.sh).
 *
 *   fault-crowd good --broker EP --pki DIR --clients N --count M
 *                    [--seconds S] [--window W] [--connect-timeout S]
 *       N clinics (township.cNNNN.clinic, each its own libmedlink channel,
 *       certificate and mutual TLS session, each from its own source
 *       address 127.1.x.y) connect; once all are up, each sends M referrals
 *       to county.crowd.hospital (S seconds at most) with at most W
 *       unanswered (the agent's send window), resending after a transient
 *       Nack or a reconnect. The throughput is the referrals Accepted per
 *       second from the first send to the last Accepted. The hospital (one channel) acknowledges
 * every delivery; the clinics acknowledge the broker's notices. Prints one line: "good clients N up
 * U connect_s C accepted A accepted_per_s R p50_ms P p99_ms Q delivered D lost L nacks K reconnects
 * X refused Y"; exit 0 when every client came up, nothing was refused for good and every accepted
 * referral reached the hospital.
 *
 *   fault-crowd bad --broker EP --pki DIR --other-pki DIR --garbage G
 *                   --stall S --wrong X [--seconds S] [--addrs K]
 *       G raw ZeroMQ DEALERs that send random bytes (half of them behind a
 *       TLS record header) and reconnect with a fresh routing id every few
 *       seconds; S DEALERs that send the first half of a real TLS
 *       ClientHello and then nothing, again after the broker's handshake
 *       deadline; X libmedlink channels with certificates of another CA that
 *       name registered nodes, which keep reconnecting. Each class comes
 *       from K source addresses (127.2.0.x, 127.3.0.x, 127.4.0.x). Runs until
 *       SIGTERM or S seconds; prints "bad garbage G stall S wrong X
 *       garbage_frames F stall_hellos H wrong_up U"; exits 1 if a
 *       wrong-certificate client ever got a session.
 *
 * One process, one libuv loop; RLIMIT_NOFILE is raised to its hard limit
 * and ZMQ_MAX_SOCKETS to fit (a channel holds three ZeroMQ sockets). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include <uv.h>
#include <zmq.h>

#include "ml_channel.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_nack.h"
#include "ml_tls.h"

#define S_BROKER_ID "medlinkd.soak"
#define S_HOSPITAL "county.crowd.hospital"
#define S_MAX_WINDOW 64
#define K_(x) MEDLINK__V1__KIND__KIND_##x
#define P_(x) MEDLINK__V1__ENVELOPE__PAYLOAD_##x

typedef struct {
    char id[ML_ULID_LEN + 1];
    uint8_t *buf;
    size_t len;
    uint64_t sent_ns;
} s_out_t;

typedef struct s_cli s_cli_t;
struct s_cli {
    char node[64];
    char endpoint[128];
    ml_tls_ctx_t *tls;
    ml_channel_t *ch;
    int up, ever_up, hospital;
    s_out_t win[S_MAX_WINDOW];
    int n_win;
    int retry_due;
    long made, accepted, reconnects;
    char (*acks)[ML_ULID_LEN + 1];
    size_t n_acks, cap_acks;
};

enum { PH_CONNECT, PH_RUN, PH_DRAIN, PH_DONE };

static struct {
    uv_loop_t loop;
    void *zctx;
    const char *broker_ep;
    const char *pki;
    s_cli_t *cli;
    int n_cli;
    s_cli_t hosp;
    int window;
    long count;
    int seconds;
    int connect_timeout;
    int phase;
    uint64_t t0, t_run, t_run_end, t_phase, t_last_acc;
    long accepted_run, nacks, refused, delivered, delivered_dups;
    uint64_t *lat;
    size_t n_lat, cap_lat;
    /* The hospital's deliveries (ids seen), an open-addressing set. */
    char (*seen)[ML_ULID_LEN + 1];
    size_t seen_cap, seen_n;
    long accepted_total;
    uv_timer_t tick;
    uv_check_t ack_check;
    uv_signal_t sigterm;
    int stop;
} G;

static uint64_t s_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void s_die(const char *what)
{
    fprintf(stderr, "fault-crowd: %s\n", what);
    exit(2);
}

static void s_raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void *s_zctx(int sockets)
{
    void *z = zmq_ctx_new();
    if (!z || zmq_ctx_set(z, ZMQ_MAX_SOCKETS, sockets) != 0)
        s_die("cannot make a ZeroMQ context");
    return z;
}

static ml_tls_ctx_t *s_tls(const char *ca_dir, const char *cert_dir, const char *node)
{
    char ca[1024], crt[1024], key[1024], err[512];
    snprintf(ca, sizeof ca, "%s/ca.crt", ca_dir);
    snprintf(crt, sizeof crt, "%s/%s.crt", cert_dir, node);
    snprintf(key, sizeof key, "%s/%s.key", cert_dir, node);
    ml_tls_config_t tc = {.ca_file = ca, .cert_file = crt, .key_file = key, .is_server = 0};
    ml_tls_ctx_t *ctx = NULL;
    if (ml_tls_ctx_new(&tc, &ctx, err, sizeof err) != 0) {
        fprintf(stderr, "fault-crowd: tls for %s: %s\n", node, err);
        exit(2);
    }
    return ctx;
}

/* "tcp://SRC:0;127.0.0.1:PORT": ZeroMQ binds the connection to a source
 * address, so the broker sees one address per clinic. */
static void s_endpoint(char *out, size_t len, const char *src, const char *broker)
{
    const char *hostport = strncmp(broker, "tcp://", 6) == 0 ? broker + 6 : broker;
    snprintf(out, len, "tcp://%s:0;%s", src, hostport);
}

/* ---- the good clients ---------------------------------------------------- */

static void s_seen_add(const char *id)
{
    if ((G.seen_n + 1) * 2 > G.seen_cap) {
        size_t cap = G.seen_cap ? G.seen_cap * 2 : 1 << 16;
        char(*n)[ML_ULID_LEN + 1] = calloc(cap, sizeof *n);
        if (!n)
            s_die("out of memory");
        for (size_t i = 0; i < G.seen_cap; i++) {
            if (!G.seen[i][0])
                continue;
            size_t h = 0;
            for (const char *p = G.seen[i]; *p; p++)
                h = h * 131 + (uint8_t)*p;
            for (h &= cap - 1; n[h][0]; h = (h + 1) & (cap - 1))
                ;
            memcpy(n[h], G.seen[i], ML_ULID_LEN + 1);
        }
        free(G.seen);
        G.seen = n;
        G.seen_cap = cap;
    }
    size_t h = 0;
    for (const char *p = id; *p; p++)
        h = h * 131 + (uint8_t)*p;
    for (h &= G.seen_cap - 1; G.seen[h][0]; h = (h + 1) & (G.seen_cap - 1)) {
        if (strcmp(G.seen[h], id) == 0) {
            G.delivered_dups++;
            return;
        }
    }
    snprintf(G.seen[h], ML_ULID_LEN + 1, "%s", id);
    G.seen_n++;
    G.delivered++;
}

static Medlink__V1__Patient s_patient;

static int s_fill_one(s_cli_t *c)
{
    s_out_t *o = &c->win[c->n_win];
    ml_ulid_new(o->id);
    Medlink__V1__Diagnosis d = MEDLINK__V1__DIAGNOSIS__INIT;
    d.icd10 = "I20.0";
    Medlink__V1__Diagnosis *dp = &d;
    Medlink__V1__Referral r = MEDLINK__V1__REFERRAL__INIT;
    r.patient = &s_patient;
    r.reason = "crowd referral";
    r.n_diagnosis = 1;
    r.diagnosis = &dp;
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = o->id;
    e.case_id = o->id;
    e.from = c->node;
    e.to = S_HOSPITAL;
    e.kind = K_(REFERRAL);
    e.created_at = ml_now_ms();
    e.payload_case = P_(REFERRAL);
    e.referral = &r;
    if (ml_env_pack(&e, &o->buf, &o->len) != 0)
        return -1;
    o->sent_ns = s_ns();
    if (ml_channel_send_raw(c->ch, o->buf, o->len) != 0) {
        free(o->buf);
        return -1;
    }
    c->n_win++;
    return 0;
}

static void s_fill(s_cli_t *c)
{
    if (!c->up || c->hospital || G.phase != PH_RUN)
        return;
    while (c->n_win < G.window && c->made < G.count) {
        if (s_fill_one(c) != 0)
            break;
        c->made++;
    }
}

static void s_resend(s_cli_t *c)
{
    for (int i = 0; i < c->n_win; i++)
        ml_channel_send_raw(c->ch, c->win[i].buf, c->win[i].len);
}

static void s_queue_ack(s_cli_t *c, const char *id)
{
    if (c->n_acks == c->cap_acks) {
        c->cap_acks = c->cap_acks ? c->cap_acks * 2 : 64;
        c->acks = realloc(c->acks, c->cap_acks * sizeof *c->acks);
        if (!c->acks)
            s_die("out of memory");
    }
    snprintf(c->acks[c->n_acks++], ML_ULID_LEN + 1, "%s", id);
}

static void s_flush_acks(s_cli_t *c)
{
    if (!c->n_acks || !c->up)
        return;
    char **ids = malloc(c->n_acks * sizeof *ids);
    if (!ids)
        return;
    for (size_t i = 0; i < c->n_acks; i++)
        ids[i] = c->acks[i];
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    Medlink__V1__Ack ack = MEDLINK__V1__ACK__INIT;
    ack.n_message_ids = c->n_acks;
    ack.message_ids = ids;
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = id;
    e.from = c->node;
    e.to = S_BROKER_ID;
    e.kind = K_(ACK);
    e.payload_case = P_(ACK);
    e.ack = &ack;
    if (ml_channel_send(c->ch, &e) == 0)
        c->n_acks = 0;
    free(ids);
}

static void s_lat_add(uint64_t ns)
{
    if (G.n_lat == G.cap_lat) {
        G.cap_lat = G.cap_lat ? G.cap_lat * 2 : 65536;
        G.lat = realloc(G.lat, G.cap_lat * sizeof *G.lat);
        if (!G.lat)
            s_die("out of memory");
    }
    G.lat[G.n_lat++] = ns;
}

static void s_on_env(ml_channel_t *ch, ml_envelope_t *env, void *arg)
{
    s_cli_t *c = arg;
    if (env->payload_case == P_(ACCEPTED)) {
        uint64_t now = s_ns();
        for (size_t k = 0; k < env->accepted->n_message_ids; k++) {
            const char *id = env->accepted->message_ids[k];
            for (int i = 0; i < c->n_win; i++) {
                if (strcmp(c->win[i].id, id) != 0)
                    continue;
                c->accepted++;
                G.accepted_total++;
                if (G.phase == PH_RUN) {
                    G.accepted_run++;
                    G.t_last_acc = now;
                    s_lat_add(now - c->win[i].sent_ns);
                }
                free(c->win[i].buf);
                c->win[i] = c->win[--c->n_win];
                break;
            }
        }
        s_fill(c);
        return;
    }
    if (env->payload_case == P_(NACK)) {
        int code = env->nack->code;
        if (ml_nack_is_transient(code)) {
            G.nacks++;
            c->retry_due = 1;
        } else {
            G.refused++;
            fprintf(stderr, "fault-crowd: %s: refused %s: %s\n", c->node,
                    env->nack->message_id ? env->nack->message_id : "?",
                    env->nack->reason ? env->nack->reason : "");
            for (int i = 0; i < c->n_win; i++)
                if (env->nack->message_id && strcmp(c->win[i].id, env->nack->message_id) == 0) {
                    free(c->win[i].buf);
                    c->win[i] = c->win[--c->n_win];
                    break;
                }
        }
        return;
    }
    if (ml_env_kind_is_routed(env->kind) && env->id) {
        if (c->hospital && env->kind == K_(REFERRAL))
            s_seen_add(env->id);
        s_queue_ack(c, env->id);
    }
}

static void s_on_state(ml_channel_t *ch, int up, const char *reason, void *arg)
{
    s_cli_t *c = arg;
    c->up = up;
    if (up) {
        c->ever_up = 1;
        /* Unanswered referrals go again: the broker answers a duplicate
         * Accepted. */
        s_resend(c);
        s_fill(c);
    } else {
        c->reconnects++;
    }
}

static void s_cli_open(s_cli_t *c, const char *node, const char *src, int hospital)
{
    snprintf(c->node, sizeof c->node, "%s", node);
    s_endpoint(c->endpoint, sizeof c->endpoint, src, G.broker_ep);
    c->hospital = hospital;
    c->tls = s_tls(G.pki, G.pki, node);
    ml_channel_config_t cc = {.endpoint = c->endpoint,
                              .tls = c->tls,
                              .node_id = c->node,
                              .broker_id = S_BROKER_ID,
                              .software = "fault-crowd",
                              .heartbeat_ms = 2000,
                              .deliveries = 1,
                              .on_envelope = s_on_env,
                              .on_state = s_on_state,
                              .arg = c};
    if (ml_channel_new(&G.loop, G.zctx, &cc, &c->ch) != 0)
        s_die("cannot make a channel");
}

static void s_ack_cb(uv_check_t *h)
{
    for (int i = 0; i < G.n_cli; i++)
        s_flush_acks(&G.cli[i]);
    s_flush_acks(&G.hosp);
}

static int s_cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static void s_good_tick(uv_timer_t *t)
{
    uint64_t now = s_ns();
    for (int i = 0; i < G.n_cli; i++) {
        s_cli_t *c = &G.cli[i];
        if (c->retry_due && c->up) {
            c->retry_due = 0;
            s_resend(c);
        }
    }
    int up = 0;
    for (int i = 0; i < G.n_cli; i++)
        up += G.cli[i].up;
    switch (G.phase) {
    case PH_CONNECT:
        if (up == G.n_cli && G.hosp.up) {
            G.phase = PH_RUN;
            G.t_run = now;
            fprintf(stderr, "fault-crowd: %d clients up in %.1f s; sending for %d s\n", up,
                    (double)(now - G.t0) / 1e9, G.seconds);
            for (int i = 0; i < G.n_cli; i++)
                s_fill(&G.cli[i]);
        } else if (now - G.t0 > (uint64_t)G.connect_timeout * 1000000000ull) {
            fprintf(stderr, "fault-crowd: only %d of %d clients up after %d s\n", up, G.n_cli,
                    G.connect_timeout);
            G.phase = PH_DONE;
            uv_stop(&G.loop);
        }
        break;
    case PH_RUN:
        if (G.accepted_run >= G.count * G.n_cli ||
            now - G.t_run >= (uint64_t)G.seconds * 1000000000ull) {
            G.phase = PH_DRAIN;
            G.t_run_end = now;
            G.t_phase = now;
        }
        break;
    case PH_DRAIN: {
        long inflight = 0;
        for (int i = 0; i < G.n_cli; i++)
            inflight += G.cli[i].n_win;
        if ((inflight == 0 && G.delivered >= G.accepted_total) ||
            now - G.t_phase > 90ull * 1000000000ull) {
            G.phase = PH_DONE;
            uv_stop(&G.loop);
        }
        break;
    }
    default:
        break;
    }
    if (G.stop)
        uv_stop(&G.loop);
}

static void s_walk_close(uv_handle_t *h, void *arg)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void s_on_sigterm(uv_signal_t *s, int sig)
{
    G.stop = 1;
    uv_stop(&G.loop);
}

static int s_good(int n)
{
    G.n_cli = n;
    G.cli = calloc((size_t)n, sizeof *G.cli);
    if (!G.cli)
        s_die("out of memory");
    G.zctx = s_zctx(4 * n + 64);
    medlink__v1__patient__init(&s_patient);
    s_patient.health_card_id = "130102198001011234";
    s_patient.name = "Crowd Patient";
    G.t0 = s_ns();
    char node[64], src[32];
    s_cli_open(&G.hosp, S_HOSPITAL, "127.1.255.1", 1);
    for (int i = 0; i < n; i++) {
        snprintf(node, sizeof node, "township.c%04d.clinic", i + 1);
        snprintf(src, sizeof src, "127.1.%d.%d", i / 250, i % 250 + 1);
        s_cli_open(&G.cli[i], node, src, 0);
    }
    uv_check_init(&G.loop, &G.ack_check);
    uv_check_start(&G.ack_check, s_ack_cb);
    uv_timer_init(&G.loop, &G.tick);
    uv_timer_start(&G.tick, s_good_tick, 50, 50);
    uv_signal_init(&G.loop, &G.sigterm);
    uv_signal_start(&G.sigterm, s_on_sigterm, SIGTERM);
    uv_run(&G.loop, UV_RUN_DEFAULT);

    int up = 0;
    long reconnects = 0;
    for (int i = 0; i < n; i++) {
        up += G.cli[i].ever_up;
        reconnects += G.cli[i].reconnects;
    }
    double run_s = G.t_last_acc > G.t_run ? (double)(G.t_last_acc - G.t_run) / 1e9 : 0;
    qsort(G.lat, G.n_lat, sizeof *G.lat, s_cmp_u64);
    double p50 = G.n_lat ? (double)G.lat[G.n_lat / 2] / 1e6 : 0;
    double p99 = G.n_lat ? (double)G.lat[(G.n_lat * 99) / 100] / 1e6 : 0;
    long lost = G.accepted_total - G.delivered;
    printf("good clients %d up %d connect_s %.1f run_s %.1f accepted %ld accepted_per_s %.0f "
           "p50_ms %.1f "
           "p99_ms %.1f delivered %ld lost %ld duplicated %ld nacks %ld reconnects %ld refused "
           "%ld\n",
           n, up, G.t_run ? (double)(G.t_run - G.t0) / 1e9 : -1.0, run_s, G.accepted_total,
           run_s > 0 ? (double)G.accepted_run / run_s : 0.0, p50, p99, G.delivered, lost,
           G.delivered_dups, G.nacks, reconnects, G.refused);
    int ok = up == n && G.accepted_run >= G.count * n && G.refused == 0 && lost == 0;

    for (int i = 0; i < n; i++)
        ml_channel_destroy(&G.cli[i].ch);
    ml_channel_destroy(&G.hosp.ch);
    uv_walk(&G.loop, s_walk_close, NULL);
    uv_run(&G.loop, UV_RUN_DEFAULT);
    return ok ? 0 : 1;
}

/* ---- the bad clients ----------------------------------------------------- */

typedef struct {
    void *sock;
    int kind; /* 0 garbage, 1 staller */
    char endpoint[128];
    uint64_t next_ns, renew_ns;
} s_raw_t;

static struct {
    s_raw_t *raw;
    int n_raw;
    s_cli_t *wrong;
    int n_wrong;
    uint8_t hello[4096];
    size_t hello_len;
    long garbage_frames, stall_hellos, wrong_up;
    unsigned seed;
} B;

/* The first bytes a real client sends: a TLS 1.3 ClientHello, taken from a
 * libmedlink session that is never finished. */
static void s_make_hello(const char *pki)
{
    ml_tls_ctx_t *ctx = s_tls(pki, pki, S_HOSPITAL);
    ml_tls_session_t *s = ml_tls_session_new(ctx);
    if (!s)
        s_die("cannot make a TLS session");
    ml_tls_session_handshake(s);
    B.hello_len = ml_tls_session_take_out(s, B.hello, sizeof B.hello);
    ml_tls_session_destroy(&s);
    ml_tls_ctx_destroy(&ctx);
    if (B.hello_len < 16)
        s_die("no ClientHello");
}

static void s_raw_renew(s_raw_t *r, uint64_t now)
{
    if (r->sock)
        zmq_close(r->sock);
    r->sock = zmq_socket(G.zctx, ZMQ_DEALER);
    if (!r->sock)
        s_die("zmq_socket");
    int zero = 0;
    zmq_setsockopt(r->sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_connect(r->sock, r->endpoint);
    r->next_ns = now + 50000000ull;
    /* Garbage senders move on after a few seconds; stallers once the
     * broker's handshake deadline (3 s in the soak) has passed. */
    r->renew_ns = now + (r->kind == 0 ? 2000000000ull : 4000000000ull) +
                  (uint64_t)(rand_r(&B.seed) % 1000) * 1000000ull;
}

static void s_bad_tick(uv_timer_t *t)
{
    uint64_t now = s_ns();
    uint8_t buf[4096];
    for (int i = 0; i < B.n_raw; i++) {
        s_raw_t *r = &B.raw[i];
        while (zmq_recv(r->sock, buf, sizeof buf, ZMQ_DONTWAIT) >= 0)
            ; /* a refusal frame, a TLS alert: nobody reads them */
        if (now >= r->renew_ns) {
            s_raw_renew(r, now);
            continue;
        }
        if (now < r->next_ns)
            continue;
        if (r->kind == 0) {
            size_t n = 1 + (size_t)(rand_r(&B.seed) % 2048);
            for (size_t k = 0; k < n; k++)
                buf[k] = (uint8_t)rand_r(&B.seed);
            if (i % 2 && n > 5) {
                /* Looks like a TLS handshake record, is not one. */
                buf[0] = 0x16;
                buf[1] = 0x03;
                buf[2] = 0x01;
                buf[3] = (uint8_t)((n - 5) >> 8);
                buf[4] = (uint8_t)(n - 5);
            }
            if (zmq_send(r->sock, buf, n, ZMQ_DONTWAIT) >= 0)
                B.garbage_frames++;
            r->next_ns = now + 100000000ull;
        } else {
            if (zmq_send(r->sock, B.hello, B.hello_len / 2, ZMQ_DONTWAIT) >= 0)
                B.stall_hellos++;
            r->next_ns = UINT64_MAX; /* and then nothing */
        }
    }
    if (G.seconds && now - G.t0 > (uint64_t)G.seconds * 1000000000ull)
        G.stop = 1;
    if (G.stop)
        uv_stop(&G.loop);
}

static void s_wrong_state(ml_channel_t *ch, int up, const char *reason, void *arg)
{
    s_cli_t *c = arg;
    if (up) {
        B.wrong_up++;
        fprintf(stderr, "fault-crowd: %s with a foreign certificate got a session!\n", c->node);
    }
}

static void s_wrong_env(ml_channel_t *ch, ml_envelope_t *env, void *arg)
{
}

static int s_bad(const char *other, int garbage, int stall, int wrong, int addrs)
{
    if (addrs < 1)
        addrs = 1;
    G.zctx = s_zctx(4 * (garbage + stall + wrong) + 64);
    G.t0 = s_ns();
    B.seed = (unsigned)G.t0;
    s_make_hello(G.pki);
    B.n_raw = garbage + stall;
    B.raw = calloc((size_t)B.n_raw + 1, sizeof *B.raw);
    B.wrong = calloc((size_t)wrong + 1, sizeof *B.wrong);
    if (!B.raw || !B.wrong)
        s_die("out of memory");
    char src[32];
    for (int i = 0; i < B.n_raw; i++) {
        s_raw_t *r = &B.raw[i];
        r->kind = i < garbage ? 0 : 1;
        snprintf(src, sizeof src, "127.%d.0.%d", r->kind == 0 ? 2 : 3, i % addrs + 1);
        s_endpoint(r->endpoint, sizeof r->endpoint, src, G.broker_ep);
        s_raw_renew(r, G.t0);
    }
    /* Certificates of another CA that name registered nodes. */
    ml_tls_ctx_t *tls[20];
    char node[64];
    for (int k = 0; k < 20; k++) {
        snprintf(node, sizeof node, "township.c%04d.clinic", k + 1);
        char err[512], ca[1024], crt[1024], key[1024];
        snprintf(ca, sizeof ca, "%s/ca.crt", G.pki);
        snprintf(crt, sizeof crt, "%s/%s.crt", other, node);
        snprintf(key, sizeof key, "%s/%s.key", other, node);
        ml_tls_config_t tc = {.ca_file = ca, .cert_file = crt, .key_file = key};
        if (ml_tls_ctx_new(&tc, &tls[k], err, sizeof err) != 0) {
            fprintf(stderr, "fault-crowd: %s\n", err);
            return 2;
        }
    }
    for (int i = 0; i < wrong; i++) {
        s_cli_t *c = &B.wrong[i];
        snprintf(c->node, sizeof c->node, "township.c%04d.clinic", i % 20 + 1);
        snprintf(src, sizeof src, "127.4.0.%d", i % addrs + 1);
        s_endpoint(c->endpoint, sizeof c->endpoint, src, G.broker_ep);
        ml_channel_config_t cc = {.endpoint = c->endpoint,
                                  .tls = tls[i % 20],
                                  .node_id = c->node,
                                  .broker_id = S_BROKER_ID,
                                  .software = "fault-crowd-wrong",
                                  .heartbeat_ms = 2000,
                                  /* Keep the pressure: a real client backs off
                                   * to a minute after an unknown-CA refusal. */
                                  .fatal_backoff_ms = 1600,
                                  .on_envelope = s_wrong_env,
                                  .on_state = s_wrong_state,
                                  .arg = c};
        if (ml_channel_new(&G.loop, G.zctx, &cc, &c->ch) != 0)
            s_die("cannot make a channel");
    }
    B.n_wrong = wrong;
    uv_timer_init(&G.loop, &G.tick);
    uv_timer_start(&G.tick, s_bad_tick, 20, 20);
    uv_signal_init(&G.loop, &G.sigterm);
    uv_signal_start(&G.sigterm, s_on_sigterm, SIGTERM);
    uv_run(&G.loop, UV_RUN_DEFAULT);
    printf("bad garbage %d stall %d wrong %d garbage_frames %ld stall_hellos %ld wrong_up %ld\n",
           garbage, stall, wrong, B.garbage_frames, B.stall_hellos, B.wrong_up);
    fflush(stdout);
    for (int i = 0; i < B.n_raw; i++)
        zmq_close(B.raw[i].sock);
    for (int i = 0; i < wrong; i++)
        ml_channel_destroy(&B.wrong[i].ch);
    uv_walk(&G.loop, s_walk_close, NULL);
    uv_run(&G.loop, UV_RUN_DEFAULT);
    return B.wrong_up ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        s_die("usage: fault-crowd good|bad [options] (see the top of fault-crowd.c)");
    const char *mode = argv[1], *other = NULL;
    int clients = 600, garbage = 0, stall = 0, wrong = 0, addrs = 10;
    G.window = 4;
    G.count = 100;
    G.seconds = 300;
    G.connect_timeout = 120;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            s_die("an option needs a value");
        i++;
        if (!strcmp(a, "--broker"))
            G.broker_ep = v;
        else if (!strcmp(a, "--pki"))
            G.pki = v;
        else if (!strcmp(a, "--other-pki"))
            other = v;
        else if (!strcmp(a, "--clients"))
            clients = atoi(v);
        else if (!strcmp(a, "--count"))
            G.count = atol(v);
        else if (!strcmp(a, "--window"))
            G.window = atoi(v);
        else if (!strcmp(a, "--seconds"))
            G.seconds = atoi(v);
        else if (!strcmp(a, "--connect-timeout"))
            G.connect_timeout = atoi(v);
        else if (!strcmp(a, "--garbage"))
            garbage = atoi(v);
        else if (!strcmp(a, "--stall"))
            stall = atoi(v);
        else if (!strcmp(a, "--wrong"))
            wrong = atoi(v);
        else if (!strcmp(a, "--addrs"))
            addrs = atoi(v);
        else
            s_die("unknown option");
    }
    if (!G.broker_ep || !G.pki || G.window < 1 || G.window > S_MAX_WINDOW)
        s_die("--broker and --pki are required; --window 1..64");
    s_raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    ml_log_set_level(ML_LOG_ERROR);
    uv_loop_init(&G.loop);
    int rc;
    if (!strcmp(mode, "good"))
        rc = s_good(clients);
    else if (!strcmp(mode, "bad") && other)
        rc = s_bad(other, garbage, stall, wrong, addrs);
    else
        s_die("mode good, or bad with --other-pki");
    zmq_ctx_term(G.zctx);
    uv_loop_close(&G.loop);
    return rc;
}
