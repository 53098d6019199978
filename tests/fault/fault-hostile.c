/* fault-hostile: a compromised but registered clinic, for the soak's
 * hostile-clinic scenario (tests/fault/soak.sh). It holds a valid
 * certificate of a registered TOWNSHIP_CLINIC and, for as long as it runs,
 * sends the broker records its role may send, as fast as the broker lets it
 * (a full window of unanswered records, refilled every few milliseconds;
 * refusals for now are not resent, the next attack goes instead):
 *
 *   open      an EMERGENCY referral to the sink hospital, a real agent whose
 *             hospital system never answers: cases that never close, their
 *             deadlines, escalations and redirects (F8);
 *   utf8      a referral whose reason is not UTF-8 (F6);
 *   reuse     a referral that reuses the id of one of its own earlier
 *             messages the broker accepted, with other content (F7);
 *   resend    an ImagingResend to a good clinic asking for 5,000 chunks of a
 *             case it has no part in (F3);
 *   big       a referral to the sink with a 48 KiB notes field: large, legal
 *             (F8/F9: disk);
 *   forge     a referral whose case id carries a newline and an ANSI escape
 *             (F10);
 *   probe     a referral update for a case id it made up (F11).
 *
 * It never acknowledges a delivery (the broker's notices and escalations
 * for its cases pile up for it: F5). Records are packed with protobuf-c
 * directly, so no check of libmedlink's stops one before the broker sees
 * it.
 *
 *   fault-hostile --broker EP --pki DIR --node ID --broker-id ID --sink ID
 *                 --victim ID [--seconds S] [--window W] [--src ADDR]
 *
 * Runs until SIGTERM or S seconds; prints one line "hostile sent N
 * accepted A nacks K bytes B reconnects R by_attack NAME:N,...
 * accepted_by_attack NAME:N,... by_code CODE:N,..." (the records of each
 * attack the broker answered Accepted: for every attack but open and big
 * the broker must refuse them all) and exits 0 if its session came up and
 * it sent; 1 otherwise. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <uv.h>
#include <zmq.h>

#include "ml_channel.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_nack.h"
#include "ml_tls.h"

#define K_(x) MEDLINK__V1__KIND__KIND_##x
#define P_(x) MEDLINK__V1__ENVELOPE__PAYLOAD_##x
#define S_MAX_WINDOW 256
#define S_MAX_CODE 64
#define S_REMEMBER 1024

enum { A_OPEN, A_UTF8, A_REUSE, A_RESEND, A_BIG, A_FORGE, A_PROBE, A_N };
static const char *const s_attack_names[A_N] = {"open", "utf8",  "reuse", "resend",
                                                "big",  "forge", "probe"};

static struct {
    uv_loop_t loop;
    void *zctx;
    ml_tls_ctx_t *tls;
    ml_channel_t *ch;
    uv_timer_t tick;
    uv_signal_t sigterm;
    const char *node, *broker_id, *sink, *victim;
    char endpoint[160];
    int window, seconds, up, ever_up;
    int inflight; /* entries of win */
    struct {
        char id[ML_ULID_LEN + 1];
        int attack;
    } win[S_MAX_WINDOW];
    uint64_t t0;
    long sent, accepted, nacks, by_code[S_MAX_CODE], by_attack[A_N], reconnects, bytes;
    long acc_by_attack[A_N];
    int cur_attack;
    char ids[S_REMEMBER][ML_ULID_LEN + 1]; /* its own accepted ids, for reuse */
    int n_ids;
    unsigned rnd;
    char *big;
} G;

static uint64_t s_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000ull + (uint64_t)ts.tv_nsec / 1000000ull;
}

static void s_die(const char *what)
{
    fprintf(stderr, "fault-hostile: %s\n", what);
    exit(2);
}

static unsigned s_rand(void)
{
    G.rnd = G.rnd * 1103515245u + 12345u;
    return G.rnd >> 8;
}

/* Packs env with protobuf-c (no validation of ours) and sends it. */
static int s_send(ml_envelope_t *e)
{
    size_t len = medlink__v1__envelope__get_packed_size(e);
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf)
        s_die("out of memory");
    medlink__v1__envelope__pack(e, buf);
    int rc = ml_channel_send_raw(G.ch, buf, len);
    free(buf);
    if (rc == 0) {
        G.sent++;
        G.bytes += (long)len;
        snprintf(G.win[G.inflight].id, sizeof G.win[G.inflight].id, "%s", e->id);
        G.win[G.inflight].attack = G.cur_attack;
        G.inflight++;
    }
    return rc;
}

static void s_referral_env(ml_envelope_t *e, Medlink__V1__Referral *r, char *id, const char *to)
{
    ml_ulid_new(id);
    e->id = id;
    e->case_id = id;
    e->from = (char *)G.node;
    e->to = (char *)to;
    e->kind = K_(REFERRAL);
    e->priority = MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY;
    e->created_at = ml_now_ms();
    e->payload_case = P_(REFERRAL);
    e->referral = r;
}

static int s_attack(int a)
{
    char id[ML_ULID_LEN + 1], case_id[64];
    Medlink__V1__Patient p = MEDLINK__V1__PATIENT__INIT;
    p.health_card_id = "130102198001019999";
    p.name = "Hostile Patient";
    Medlink__V1__Diagnosis d = MEDLINK__V1__DIAGNOSIS__INIT;
    d.icd10 = "I21.9";
    Medlink__V1__Diagnosis *dp = &d;
    Medlink__V1__Referral r = MEDLINK__V1__REFERRAL__INIT;
    r.patient = &p;
    r.reason = "chest pain";
    r.n_diagnosis = 1;
    r.diagnosis = &dp;
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    s_referral_env(&e, &r, id, G.sink);
    switch (a) {
    case A_OPEN:
        break;
    case A_UTF8:
        r.reason = "pain \xc3\x28 \xff\xfe";
        break;
    case A_REUSE:
        e.id = G.ids[s_rand() % (unsigned)G.n_ids];
        r.reason = "a different referral under an old id";
        break;
    case A_RESEND: {
        static uint32_t idx[5000];
        for (uint32_t i = 0; i < 5000; i++)
            idx[i] = i % 7;
        Medlink__V1__ImagingResend rs = MEDLINK__V1__IMAGING_RESEND__INIT;
        rs.object_index = 0;
        rs.n_chunk_index = 5000;
        rs.chunk_index = idx;
        rs.reason = "send it all again";
        snprintf(case_id, sizeof case_id, "%s", id);
        e.case_id = case_id;
        e.to = (char *)G.victim;
        e.kind = K_(IMAGING_RESEND);
        e.priority = MEDLINK__V1__PRIORITY__PRIORITY_ROUTINE;
        e.payload_case = P_(IMAGING_RESEND);
        e.imaging_resend = &rs;
        return s_send(&e);
    }
    case A_BIG:
        r.notes = G.big;
        e.priority = MEDLINK__V1__PRIORITY__PRIORITY_ROUTINE;
        break;
    case A_FORGE:
        snprintf(case_id, sizeof case_id, "X\n2026-01-01 broker: \x1b[31mforged\x1b[0m");
        e.case_id = case_id;
        break;
    case A_PROBE: {
        Medlink__V1__ReferralUpdate u = MEDLINK__V1__REFERRAL_UPDATE__INIT;
        u.status = MEDLINK__V1__REFERRAL_STATUS__REFERRAL_CLOSED;
        u.reason = "probe";
        ml_ulid_new(case_id);
        e.case_id = case_id;
        e.kind = K_(REFERRAL_UPDATE);
        e.payload_case = P_(REFERRAL_UPDATE);
        e.referral_update = &u;
        e.to = (char *)G.sink;
        return s_send(&e);
    }
    default:
        break;
    }
    return s_send(&e);
}

static void s_fill(void)
{
    while (G.up && G.inflight < G.window) {
        int a = (int)(s_rand() % A_N);
        /* Nothing stored to reuse yet: it opens a case instead, and is
         * counted as what it is. */
        if (a == A_REUSE && G.n_ids == 0)
            a = A_OPEN;
        G.cur_attack = a;
        if (s_attack(a) != 0)
            break;
        G.by_attack[a]++;
    }
}

/* Takes id's record out of the window; returns its attack, or -1 when it
 * is not there (an answer to a record the window already gave up on; a
 * Nack without an id takes the oldest record instead). */
static int s_answered(const char *id)
{
    int at = -1;
    for (int i = 0; i < G.inflight && id && *id; i++)
        if (strcmp(G.win[i].id, id) == 0) {
            at = i;
            break;
        }
    if (at < 0 && (!id || !*id) && G.inflight > 0)
        at = 0;
    if (at < 0)
        return -1;
    int a = G.win[at].attack;
    memmove(&G.win[at], &G.win[at + 1], (size_t)(G.inflight - at - 1) * sizeof G.win[0]);
    G.inflight--;
    return a;
}

static void s_on_env(ml_channel_t *ch, ml_envelope_t *env, void *arg)
{
    (void)ch;
    (void)arg;
    if (env->payload_case == P_(ACCEPTED)) {
        for (size_t k = 0; k < env->accepted->n_message_ids; k++) {
            G.accepted++;
            int a = s_answered(env->accepted->message_ids[k]);
            if (a >= 0)
                G.acc_by_attack[a]++;
            /* Only an id the broker stored is one to reuse: the id of a
             * referral it refused (the open-case quota) is free, and a
             * message under it is rightly accepted. */
            if (a == A_OPEN && G.n_ids < S_REMEMBER)
                snprintf(G.ids[G.n_ids++], ML_ULID_LEN + 1, "%s", env->accepted->message_ids[k]);
        }
    } else if (env->payload_case == P_(NACK)) {
        G.nacks++;
        s_answered(env->nack->message_id);
        int c = env->nack->code;
        G.by_code[c >= 0 && c < S_MAX_CODE ? c : 0]++;
    }
    /* Deliveries (notices, escalations) are never acknowledged. */
}

static void s_on_state(ml_channel_t *ch, int up, const char *reason, void *arg)
{
    (void)ch;
    (void)arg;
    G.up = up;
    G.inflight = 0;
    if (up)
        G.ever_up = 1;
    else {
        G.reconnects++;
        fprintf(stderr, "fault-hostile: session down: %s\n", reason ? reason : "?");
    }
}

static void s_tick(uv_timer_t *t)
{
    (void)t;
    /* Answers lost with a session are not waited for. */
    static long last_answers;
    static int idle_ticks;
    long answers = G.accepted + G.nacks;
    if (answers == last_answers && G.inflight > 0 && ++idle_ticks > 200) {
        G.inflight = 0;
        idle_ticks = 0;
    } else if (answers != last_answers) {
        idle_ticks = 0;
    }
    last_answers = answers;
    s_fill();
    if (s_ms() - G.t0 >= (uint64_t)G.seconds * 1000ull)
        uv_stop(&G.loop);
}

static void s_on_sigterm(uv_signal_t *s, int sig)
{
    (void)s;
    (void)sig;
    uv_stop(&G.loop);
}

static void s_walk_close(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

int main(int argc, char **argv)
{
    const char *broker = NULL, *pki = NULL, *src = "127.5.0.1";
    G.window = 16;
    G.seconds = 600;
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *a = argv[i], *v = argv[i + 1];
        if (!strcmp(a, "--broker"))
            broker = v;
        else if (!strcmp(a, "--pki"))
            pki = v;
        else if (!strcmp(a, "--node"))
            G.node = v;
        else if (!strcmp(a, "--broker-id"))
            G.broker_id = v;
        else if (!strcmp(a, "--sink"))
            G.sink = v;
        else if (!strcmp(a, "--victim"))
            G.victim = v;
        else if (!strcmp(a, "--seconds"))
            G.seconds = atoi(v);
        else if (!strcmp(a, "--window"))
            G.window = atoi(v);
        else if (!strcmp(a, "--src"))
            src = v;
        else
            s_die("unknown option (see the header of tests/fault/fault-hostile.c)");
    }
    if (!broker || !pki || !G.node || !G.broker_id || !G.sink || !G.victim)
        s_die("usage: fault-hostile --broker EP --pki DIR --node ID --broker-id ID --sink ID "
              "--victim ID [--seconds S] [--window W] [--src ADDR]");
    if (G.window < 1 || G.window > S_MAX_WINDOW)
        s_die("--window: 1 to 256");
    G.rnd = (unsigned)time(NULL);
    G.big = malloc(48 * 1024 + 1);
    if (!G.big)
        s_die("out of memory");
    for (int i = 0; i < 48 * 1024; i++)
        G.big[i] = (char)('a' + i % 26);
    G.big[48 * 1024] = 0;

    char ca[1024], crt[1024], key[1024], err[512];
    snprintf(ca, sizeof ca, "%s/ca.crt", pki);
    snprintf(crt, sizeof crt, "%s/%s.crt", pki, G.node);
    snprintf(key, sizeof key, "%s/%s.key", pki, G.node);
    ml_tls_config_t tc = {.ca_file = ca, .cert_file = crt, .key_file = key, .is_server = 0};
    if (ml_tls_ctx_new(&tc, &G.tls, err, sizeof err) != 0) {
        fprintf(stderr, "fault-hostile: tls: %s\n", err);
        return 2;
    }
    const char *hostport = strncmp(broker, "tcp://", 6) == 0 ? broker + 6 : broker;
    snprintf(G.endpoint, sizeof G.endpoint, "tcp://%s:0;%s", src, hostport);
    uv_loop_init(&G.loop);
    G.zctx = zmq_ctx_new();
    if (!G.zctx)
        s_die("cannot make a ZeroMQ context");
    ml_channel_config_t cc = {.endpoint = G.endpoint,
                              .tls = G.tls,
                              .node_id = G.node,
                              .broker_id = G.broker_id,
                              .software = "fault-hostile",
                              .heartbeat_ms = 1000,
                              .deliveries = 1,
                              .on_envelope = s_on_env,
                              .on_state = s_on_state,
                              .arg = NULL};
    if (ml_channel_new(&G.loop, G.zctx, &cc, &G.ch) != 0)
        s_die("cannot make a channel");
    G.t0 = s_ms();
    uv_timer_init(&G.loop, &G.tick);
    uv_timer_start(&G.tick, s_tick, 5, 5);
    uv_signal_init(&G.loop, &G.sigterm);
    uv_signal_start(&G.sigterm, s_on_sigterm, SIGTERM);
    uv_run(&G.loop, UV_RUN_DEFAULT);

    printf("hostile sent %ld accepted %ld nacks %ld bytes %ld reconnects %ld by_attack", G.sent,
           G.accepted, G.nacks, G.bytes, G.reconnects);
    for (int a = 0; a < A_N; a++)
        printf("%s%s:%ld", a ? "," : " ", s_attack_names[a], G.by_attack[a]);
    printf(" accepted_by_attack");
    for (int a = 0; a < A_N; a++)
        printf("%s%s:%ld", a ? "," : " ", s_attack_names[a], G.acc_by_attack[a]);
    printf(" by_code");
    int first = 1;
    for (int c = 0; c < S_MAX_CODE; c++) {
        if (!G.by_code[c])
            continue;
        printf("%s%s:%ld", first ? " " : ",", ml_nack_name(c), G.by_code[c]);
        first = 0;
    }
    printf("%s\n", first ? " -" : "");

    ml_channel_destroy(&G.ch);
    uv_walk(&G.loop, s_walk_close, NULL);
    uv_run(&G.loop, UV_RUN_DEFAULT);
    uv_loop_close(&G.loop);
    ml_tls_ctx_destroy(&G.tls);
    zmq_ctx_term(G.zctx);
    free(G.big);
    return G.ever_up && G.sent > 0 ? 0 : 1;
}
