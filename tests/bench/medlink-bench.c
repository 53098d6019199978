/* medlink-bench: load generator built on libmedlink.
 *
 *   medlink-bench raw   --size BYTES --count N
 *       The raw ZeroMQ ceiling: one DEALER streams N frames of BYTES to one
 *       ROUTER over tcp://127.0.0.1 in this process (two threads), no TLS,
 *       no store. Prints frames/s and MB/s.
 *
 *   medlink-bench e2e   --broker EP --pki DIR --clinics N --count M
 *                       --size BYTES [--window W] [--offline]
 *       N simulated clinics (each its own mutual-TLS channel with its own
 *       certificate, named township.benchNN.clinic) send M referrals in total,
 *       each padded to BYTES, to county.bench.hospital through medlinkd.
 *       The hospital side is a channel with deliveries on that acks each
 *       message as it arrives (it stands for an agent with an instant disk).
 *       Prints accepted/s, delivered/s, and p50/p99 end-to-end latency
 *       (clinic send -> hospital receive, same monotonic clock).
 *       With --offline the hospital never connects: the run ends once all M
 *       are Accepted (used to measure the broker holding a large backlog).
 *
 * Output lines are "key value" pairs so bench.sh can read them. */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <uv.h>
#include <zmq.h>

#include "ml_channel.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_tls.h"

static uint64_t s_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---------------------------------------------------------------- raw */

typedef struct {
    const char *ep;
    size_t size;
    long count;
    void *ctx;
} raw_args_t;

static void *s_raw_sender(void *arg)
{
    raw_args_t *a = arg;
    void *s = zmq_socket(a->ctx, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(s, ZMQ_SNDHWM, &zero, sizeof zero);
    zmq_connect(s, a->ep);
    char *buf = calloc(1, a->size);
    for (long i = 0; i < a->count; i++)
        zmq_send(s, buf, a->size, 0);
    free(buf);
    int linger = -1;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    zmq_close(s);
    return NULL;
}

static int s_raw(size_t size, long count)
{
    void *ctx = zmq_ctx_new();
    void *r = zmq_socket(ctx, ZMQ_ROUTER);
    int zero = 0;
    zmq_setsockopt(r, ZMQ_RCVHWM, &zero, sizeof zero);
    if (zmq_bind(r, "tcp://127.0.0.1:0") != 0) {
        fprintf(stderr, "raw: bind failed\n");
        return 1;
    }
    char ep[128];
    size_t len = sizeof ep;
    zmq_getsockopt(r, ZMQ_LAST_ENDPOINT, ep, &len);
    raw_args_t a = {ep, size, count, ctx};
    pthread_t t;
    pthread_create(&t, NULL, s_raw_sender, &a);
    zmq_msg_t m;
    zmq_msg_init(&m);
    uint64_t t0 = 0;
    for (long i = 0; i < count; i++) {
        zmq_msg_recv(&m, r, 0); /* routing id */
        zmq_msg_recv(&m, r, 0); /* payload */
        if (i == 0)
            t0 = s_ns();
    }
    uint64_t t1 = s_ns();
    zmq_msg_close(&m);
    pthread_join(t, NULL);
    zmq_close(r);
    zmq_ctx_term(ctx);
    double secs = (double)(t1 - t0) / 1e9;
    double rate = (double)(count - 1) / secs;
    printf("raw_frames_per_s %.0f\n", rate);
    printf("raw_mb_per_s %.1f\n", rate * (double)size / 1e6);
    return 0;
}

/* ---------------------------------------------------------------- e2e */

typedef struct clinic clinic_t;

typedef struct {
    uv_loop_t loop;
    void *zctx;
    const char *broker;
    const char *pki;
    int n_clinics;
    long count;
    size_t size;
    long window;
    int offline;
    clinic_t *clinics;
    ml_channel_t *hospital;
    ml_tls_ctx_t *hospital_tls;
    long sent;
    long accepted;
    long refused;
    long delivered;
    long dup_delivered;
    uint64_t *lat; /* ns, per delivered message */
    uint8_t *seen; /* per message index */
    uint64_t t_start;
    uint64_t t_accepted;
    uint64_t t_delivered;
    uv_timer_t tick;
    uv_check_t ack_check; /* the hospital acks once per loop iteration */
    char **ack_ids;
    size_t n_ack;
    char *pad;
    uint64_t *sent_at; /* per message index */
} bench_t;

struct clinic {
    bench_t *b;
    char id[64];
    ml_tls_ctx_t *tls;
    ml_channel_t *ch;
    long next; /* next index this clinic sends (strided) */
    long inflight;
    long acked;
};

static bench_t B;

static void s_clinic_pump(clinic_t *c)
{
    bench_t *b = c->b;
    if (!ml_channel_is_up(c->ch))
        return;
    while (c->inflight < b->window && c->next < b->count) {
        long idx = c->next;
        char id[ML_ULID_LEN + 1], note[64];
        ml_ulid_new(id);
        snprintf(note, sizeof note, "bench %ld ", idx);
        Medlink__V1__Patient p = MEDLINK__V1__PATIENT__INIT;
        p.health_card_id = "130102195903127718";
        p.name = "Bench Patient";
        Medlink__V1__Diagnosis d = MEDLINK__V1__DIAGNOSIS__INIT;
        d.icd10 = "I20.0";
        d.text = "Unstable angina";
        Medlink__V1__Diagnosis *dp = &d;
        Medlink__V1__Referral r = MEDLINK__V1__REFERRAL__INIT;
        r.patient = &p;
        r.reason = "benchmark referral";
        r.n_diagnosis = 1;
        r.diagnosis = &dp;
        /* Pad so the whole envelope is about --size bytes. */
        memcpy(b->pad, note, strlen(note));
        r.notes = b->pad;
        ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
        e.id = id;
        e.case_id = id;
        e.kind = MEDLINK__V1__KIND__KIND_REFERRAL;
        e.from = c->id;
        e.to = "county.bench.hospital";
        e.created_at = ml_now_ms();
        e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL;
        e.referral = &r;
        b->sent_at[idx] = s_ns();
        int rc = ml_channel_send(c->ch, &e);
        if (rc == ML_EFULL)
            break;
        if (rc != 0) {
            fprintf(stderr, "send failed: %s\n", ml_strerror(rc));
            break;
        }
        c->next += b->n_clinics;
        c->inflight++;
        b->sent++;
    }
}

static void s_maybe_done(bench_t *b)
{
    int done = b->offline ? (b->accepted + b->refused >= b->count)
                          : (b->delivered >= b->count && b->accepted + b->refused >= b->count);
    if (done)
        uv_stop(&b->loop);
}

static void s_clinic_env(ml_channel_t *ch, ml_envelope_t *env, void *arg)
{
    clinic_t *c = arg;
    bench_t *b = c->b;
    if (env->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED) {
        long n = (long)env->accepted->n_message_ids;
        c->inflight -= n;
        b->accepted += n;
        if (b->accepted + b->refused == b->count)
            b->t_accepted = s_ns();
    } else if (env->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_NACK) {
        c->inflight--;
        b->refused++;
        fprintf(stderr, "nack: %s\n", env->nack->reason);
    }
    s_clinic_pump(c);
    s_maybe_done(b);
}

static void s_clinic_state(ml_channel_t *ch, int up, const char *reason, void *arg)
{
    clinic_t *c = arg;
    if (up) {
        if (c->b->t_start == 0)
            c->b->t_start = s_ns();
        s_clinic_pump(c);
    } else {
        fprintf(stderr, "%s: down: %s\n", c->id, reason);
    }
}

static void s_hospital_env(ml_channel_t *ch, ml_envelope_t *env, void *arg)
{
    bench_t *b = arg;
    if (env->payload_case != MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL)
        return;
    uint64_t now = s_ns();
    long idx = -1;
    if (env->referral->notes)
        sscanf(env->referral->notes, "bench %ld", &idx);
    if (idx >= 0 && idx < b->count) {
        if (!b->seen[idx]) {
            b->seen[idx] = 1;
            b->lat[b->delivered++] = now - b->sent_at[idx];
            if (b->delivered == b->count)
                b->t_delivered = now;
        } else {
            b->dup_delivered++;
        }
    }
    /* Like the agent: collect, and acknowledge the whole batch at the end
     * of this loop iteration (s_ack_cb). */
    b->ack_ids = realloc(b->ack_ids, (b->n_ack + 1) * sizeof *b->ack_ids);
    b->ack_ids[b->n_ack++] = strdup(env->id);
    s_maybe_done(b);
}

static void s_ack_cb(uv_check_t *h)
{
    bench_t *b = h->data;
    if (b->n_ack == 0 || !b->hospital || !ml_channel_is_up(b->hospital))
        return;
    Medlink__V1__Ack ack = MEDLINK__V1__ACK__INIT;
    ack.n_message_ids = b->n_ack;
    ack.message_ids = b->ack_ids;
    char id[ML_ULID_LEN + 1];
    ml_ulid_new(id);
    ml_envelope_t e = MEDLINK__V1__ENVELOPE__INIT;
    e.id = id;
    e.kind = MEDLINK__V1__KIND__KIND_ACK;
    e.from = "county.bench.hospital";
    e.to = (char *)ml_channel_welcome(b->hospital)->broker;
    e.created_at = ml_now_ms();
    e.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ACK;
    e.ack = &ack;
    ml_channel_send(b->hospital, &e);
    for (size_t i = 0; i < b->n_ack; i++)
        free(b->ack_ids[i]);
    b->n_ack = 0;
}

static int s_cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static ml_tls_ctx_t *s_tls(const char *pki, const char *node)
{
    char ca[1024], crt[1024], key[1024], err[512];
    snprintf(ca, sizeof ca, "%s/ca.crt", pki);
    snprintf(crt, sizeof crt, "%s/%s.crt", pki, node);
    snprintf(key, sizeof key, "%s/%s.key", pki, node);
    ml_tls_config_t tc = {.ca_file = ca, .cert_file = crt, .key_file = key, .is_server = 0};
    ml_tls_ctx_t *ctx = NULL;
    if (ml_tls_ctx_new(&tc, &ctx, err, sizeof err) != 0) {
        fprintf(stderr, "tls for %s: %s\n", node, err);
        exit(1);
    }
    return ctx;
}

static void s_tick(uv_timer_t *t)
{
    bench_t *b = t->data;
    static int n;
    if (++n % 10 == 0)
        fprintf(stderr, "progress: sent %ld accepted %ld delivered %ld\n", b->sent, b->accepted,
                b->delivered);
}

static void s_walk_close(uv_handle_t *h, void *arg)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static int s_e2e(void)
{
    bench_t *b = &B;
    uv_loop_init(&b->loop);
    b->zctx = zmq_ctx_new();
    b->lat = calloc((size_t)b->count, sizeof *b->lat);
    b->seen = calloc((size_t)b->count, 1);
    b->sent_at = calloc((size_t)b->count, sizeof *b->sent_at);
    /* ~150 bytes of envelope besides the notes. */
    size_t padlen = b->size > 200 ? b->size - 150 : 50;
    b->pad = malloc(padlen + 1);
    memset(b->pad, 'x', padlen);
    b->pad[padlen] = '\0';

    if (!b->offline) {
        b->hospital_tls = s_tls(b->pki, "county.bench.hospital");
        ml_channel_config_t hc = {.endpoint = b->broker,
                                  .tls = b->hospital_tls,
                                  .node_id = "county.bench.hospital",
                                  .broker_id = "medlinkd.bench",
                                  .software = "medlink-bench",
                                  .deliveries = 1,
                                  .heartbeat_ms = 2000,
                                  .on_envelope = s_hospital_env,
                                  .arg = b};
        ml_channel_new(&b->loop, b->zctx, &hc, &b->hospital);
    }
    b->clinics = calloc((size_t)b->n_clinics, sizeof *b->clinics);
    for (int i = 0; i < b->n_clinics; i++) {
        clinic_t *c = &b->clinics[i];
        c->b = b;
        c->next = i;
        snprintf(c->id, sizeof c->id, "township.bench%02d.clinic", i + 1);
        c->tls = s_tls(b->pki, c->id);
        ml_channel_config_t cc = {.endpoint = b->broker,
                                  .tls = c->tls,
                                  .node_id = c->id,
                                  .broker_id = "medlinkd.bench",
                                  .software = "medlink-bench",
                                  .heartbeat_ms = 2000,
                                  .on_envelope = s_clinic_env,
                                  .on_state = s_clinic_state,
                                  .arg = c};
        ml_channel_new(&b->loop, b->zctx, &cc, &c->ch);
    }
    uv_check_init(&b->loop, &b->ack_check);
    b->ack_check.data = b;
    uv_check_start(&b->ack_check, s_ack_cb);
    uv_timer_init(&b->loop, &b->tick);
    b->tick.data = b;
    uv_timer_start(&b->tick, s_tick, 100, 100);
    uv_run(&b->loop, UV_RUN_DEFAULT);

    double acc_s = (double)(b->t_accepted - b->t_start) / 1e9;
    printf("accepted %ld\nrefused %ld\n", b->accepted, b->refused);
    printf("accepted_per_s %.0f\n", (double)b->accepted / acc_s);
    if (!b->offline) {
        double del_s = (double)(b->t_delivered - b->t_start) / 1e9;
        qsort(b->lat, (size_t)b->delivered, sizeof *b->lat, s_cmp_u64);
        printf("delivered %ld\nduplicates_seen %ld\n", b->delivered, b->dup_delivered);
        printf("delivered_per_s %.0f\n", (double)b->delivered / del_s);
        printf("delivered_mb_per_s %.1f\n", (double)b->delivered * (double)b->size / del_s / 1e6);
        printf("latency_p50_ms %.2f\n", (double)b->lat[b->delivered / 2] / 1e6);
        printf("latency_p99_ms %.2f\n", (double)b->lat[(b->delivered * 99) / 100] / 1e6);
    }
    for (int i = 0; i < b->n_clinics; i++)
        ml_channel_destroy(&b->clinics[i].ch);
    ml_channel_destroy(&b->hospital);
    uv_timer_stop(&b->tick);
    uv_check_stop(&b->ack_check);
    uv_walk(&b->loop, s_walk_close, NULL);
    uv_run(&b->loop, UV_RUN_DEFAULT);
    for (int i = 0; i < b->n_clinics; i++)
        ml_tls_ctx_destroy(&b->clinics[i].tls);
    ml_tls_ctx_destroy(&b->hospital_tls);
    zmq_ctx_term(b->zctx);
    uv_loop_close(&b->loop);
    free(b->lat);
    free(b->seen);
    free(b->sent_at);
    free(b->pad);
    free(b->ack_ids);
    free(b->clinics);
    return b->accepted == b->count ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: medlink-bench raw|e2e [options]\n");
        return 2;
    }
    const char *mode = argv[1];
    size_t size = 1024;
    long count = 100000;
    B.n_clinics = 4;
    B.window = 1000;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--size") && v)
            size = strtoul(v, NULL, 10), i++;
        else if (!strcmp(a, "--count") && v)
            count = strtol(v, NULL, 10), i++;
        else if (!strcmp(a, "--broker") && v)
            B.broker = v, i++;
        else if (!strcmp(a, "--pki") && v)
            B.pki = v, i++;
        else if (!strcmp(a, "--clinics") && v)
            B.n_clinics = atoi(v), i++;
        else if (!strcmp(a, "--window") && v)
            B.window = strtol(v, NULL, 10), i++;
        else if (!strcmp(a, "--offline"))
            B.offline = 1;
        else {
            fprintf(stderr, "unknown option %s\n", a);
            return 2;
        }
    }
    ml_log_set_level(ML_LOG_WARN);
    if (!strcmp(mode, "raw"))
        return s_raw(size, count);
    if (!strcmp(mode, "e2e")) {
        if (!B.broker || !B.pki) {
            fprintf(stderr, "e2e needs --broker and --pki\n");
            return 2;
        }
        B.count = count;
        B.size = size;
        return s_e2e();
    }
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
