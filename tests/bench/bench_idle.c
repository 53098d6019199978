/* Idle sessions: what a broker pays for each connected agent that has
 * nothing to send, and whether a crowd of them connecting at once comes up
 * and stays up.
 *
 * bench_certs issues node certificates from the CA that deploy/pki.sh made,
 * in-process with one fresh EC P-256 key each: the openssl command line
 * takes tens of milliseconds per node, which for 10,000 nodes is minutes,
 * while a key and a signature here take well under a millisecond. The
 * certificates carry what pki.sh puts in (CN and DNS subjectAltName = the
 * node id, serverAuth + clientAuth), so the broker checks them exactly as
 * it checks an agent's.
 *
 * bench_idle opens one libmedlink channel per node (its own certificate,
 * mutual TLS 1.3, Hello with deliveries on, heartbeats as an agent sends
 * them), at a fixed rate, and holds them all open for a while. Loop thread
 * only. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <uv.h>
#include <zmq.h>

#include "bench.h"
#include "ml_channel.h"
#include "ml_common.h"
#include "ml_tls.h"

#define S_BROKER_ID "medlinkd.bench"

/* ---------------------------------------------------------------- certs */

static int s_add_ext(X509 *crt, X509 *ca, int nid, const char *value)
{
    X509V3_CTX v3;
    X509V3_set_ctx(&v3, ca, crt, NULL, NULL, 0);
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, &v3, nid, value);
    if (!ext)
        return -1;
    int ok = X509_add_ext(crt, ext, -1);
    X509_EXTENSION_free(ext);
    return ok ? 0 : -1;
}

static int s_write_pem(const char *path, EVP_PKEY *key, X509 *crt)
{
    /* A key readable by others is refused by ml_tls, as pki.sh's umask 077
     * keeps it. */
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, key ? 0600 : 0644);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!f) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    int ok = key ? PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL) : PEM_write_X509(f, crt);
    return fclose(f) == 0 && ok ? 0 : -1;
}

/* One node's key and certificate, signed by ca/ca_key, into pki. */
static int s_issue(const char *pki, const char *id, X509 *ca, EVP_PKEY *ca_key, long serial)
{
    char path[1024], san[128];
    int rc = -1;
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509 *crt = X509_new();
    if (!key || !crt)
        goto out;
    X509_set_version(crt, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(crt), serial);
    X509_NAME *name = X509_get_subject_name(crt);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, (const unsigned char *)id, -1, -1, 0);
    X509_set_issuer_name(crt, X509_get_subject_name(ca));
    X509_gmtime_adj(X509_getm_notBefore(crt), -3600);
    X509_gmtime_adj(X509_getm_notAfter(crt), 30L * 24 * 3600);
    X509_set_pubkey(crt, key);
    snprintf(san, sizeof san, "DNS:%s", id);
    if (s_add_ext(crt, ca, NID_basic_constraints, "critical,CA:FALSE") != 0 ||
        s_add_ext(crt, ca, NID_key_usage, "critical,digitalSignature") != 0 ||
        s_add_ext(crt, ca, NID_ext_key_usage, "serverAuth,clientAuth") != 0 ||
        s_add_ext(crt, ca, NID_subject_alt_name, san) != 0 ||
        X509_sign(crt, ca_key, EVP_sha256()) == 0)
        goto out;
    snprintf(path, sizeof path, "%s/%s.key", pki, id);
    if (s_write_pem(path, key, NULL) != 0)
        goto out;
    snprintf(path, sizeof path, "%s/%s.crt", pki, id);
    rc = s_write_pem(path, NULL, crt);
out:
    EVP_PKEY_free(key);
    X509_free(crt);
    return rc;
}

int bench_certs(const char *pki, const char *prefix, long first, long count)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/ca.crt", pki);
    FILE *f = fopen(path, "r");
    X509 *ca = f ? PEM_read_X509(f, NULL, NULL, NULL) : NULL;
    if (f)
        fclose(f);
    snprintf(path, sizeof path, "%s/ca.key", pki);
    f = fopen(path, "r");
    EVP_PKEY *ca_key = f ? PEM_read_PrivateKey(f, NULL, NULL, NULL) : NULL;
    if (f)
        fclose(f);
    if (!ca || !ca_key) {
        fprintf(stderr, "certs: cannot read %s/ca.crt and ca.key\n", pki);
        X509_free(ca);
        EVP_PKEY_free(ca_key);
        return 1;
    }
    uint64_t t0 = bench_ns();
    int rc = 0;
    char id[64];
    for (long i = first; i < first + count; i++) {
        snprintf(id, sizeof id, "%s%05ld.clinic", prefix, i);
        /* Serials above those of pki.sh's small sequential ones. */
        if (s_issue(pki, id, ca, ca_key, 1000000 + i) != 0) {
            fprintf(stderr, "certs: cannot issue %s: %s\n", id, strerror(errno));
            rc = 1;
            break;
        }
    }
    printf("certs_issued %ld\ncerts_s %.2f\n", rc ? 0 : count, (double)(bench_ns() - t0) / 1e9);
    X509_free(ca);
    EVP_PKEY_free(ca_key);
    return rc;
}

/* ----------------------------------------------------------------- idle */

typedef struct s_idle s_idle_t;

typedef struct {
    s_idle_t *I;
    char id[64];
    ml_tls_ctx_t *tls;
    ml_channel_t *ch;
    int up;     /* up now */
    int was_up; /* has been up at least once */
} s_inode_t;

struct s_idle {
    const bench_idle_opts_t *o;
    uv_loop_t loop;
    void *zctx;
    s_inode_t *nodes;
    long opened, up, max_up, downs_after_up, reasons_logged;
    uint64_t t_start, t_all_up, t_hold_end;
    uv_timer_t tick;
    int failed;
    int closing;
};

static void s_idle_env(ml_channel_t *ch, ml_envelope_t *env, void *arg)
{
    (void)ch;
    (void)env;
    (void)arg;
    /* Idle nodes are sent nothing (no one routes to them). */
}

static void s_idle_state(ml_channel_t *ch, int up, const char *reason, void *arg)
{
    (void)ch;
    s_inode_t *n = arg;
    s_idle_t *I = n->I;
    if (up && !n->up) {
        n->up = 1;
        n->was_up = 1;
        if (++I->up > I->max_up)
            I->max_up = I->up;
        if (I->up == I->o->count && I->t_all_up == 0) {
            I->t_all_up = bench_ns();
            printf("all_up_s %.2f\n", (double)(I->t_all_up - I->t_start) / 1e9);
            fflush(stdout);
        }
    } else if (!up) {
        if (n->up) {
            n->up = 0;
            I->up--;
        }
        if (n->was_up && !I->closing)
            I->downs_after_up++;
        /* The first few reasons, so a storm says what it was. */
        if (!I->closing && I->reasons_logged < 5) {
            I->reasons_logged++;
            fprintf(stderr, "%s: down: %s\n", n->id, reason ? reason : "?");
        }
    }
}

static void s_idle_open(s_idle_t *I, s_inode_t *n, long idx)
{
    char ca[1024], crt[1024], key[1024], err[512];
    const bench_idle_opts_t *o = I->o;
    n->I = I;
    snprintf(n->id, sizeof n->id, "%s%05ld.clinic", o->prefix, idx);
    snprintf(ca, sizeof ca, "%s/ca.crt", o->pki);
    snprintf(crt, sizeof crt, "%s/%s.crt", o->pki, n->id);
    snprintf(key, sizeof key, "%s/%s.key", o->pki, n->id);
    ml_tls_config_t tc = {.ca_file = ca, .cert_file = crt, .key_file = key, .is_server = 0};
    if (ml_tls_ctx_new(&tc, &n->tls, err, sizeof err) != 0) {
        fprintf(stderr, "tls for %s: %s\n", n->id, err);
        I->failed = 1;
        uv_stop(&I->loop);
        return;
    }
    ml_channel_config_t cc = {.endpoint = o->broker,
                              .tls = n->tls,
                              .node_id = n->id,
                              .broker_id = S_BROKER_ID,
                              .software = "medlink-bench-idle",
                              .heartbeat_ms = o->heartbeat_ms,
                              .deliveries = 1,
                              .on_envelope = s_idle_env,
                              .on_state = s_idle_state,
                              .arg = n};
    if (ml_channel_new(&I->loop, I->zctx, &cc, &n->ch) != 0) {
        fprintf(stderr, "%s: cannot create its channel\n", n->id);
        I->failed = 1;
        uv_stop(&I->loop);
    }
}

/* Every 10 ms: open the channels due by now at the rate asked for; once
 * all are up, hold them for hold_s; give up at the timeout. */
static void s_idle_tick(uv_timer_t *t)
{
    s_idle_t *I = t->data;
    const bench_idle_opts_t *o = I->o;
    uint64_t now = bench_ns();
    long due = (long)((double)(now - I->t_start) / 1e9 * o->rate) + 1;
    if (due > o->count)
        due = o->count;
    while (I->opened < due && !I->failed) {
        s_idle_open(I, &I->nodes[I->opened], o->first + I->opened);
        I->opened++;
    }
    static uint64_t last_progress;
    if (now - last_progress > 2000000000ull) {
        last_progress = now;
        fprintf(stderr, "progress: opened %ld up %ld (max %ld) downs after up %ld\n", I->opened,
                I->up, I->max_up, I->downs_after_up);
    }
    if (I->t_all_up && now - I->t_all_up >= (uint64_t)o->hold_s * 1000000000ull) {
        I->t_hold_end = now;
        uv_stop(&I->loop);
    } else if (now - I->t_start > (uint64_t)o->timeout_s * 1000000000ull) {
        fprintf(stderr, "idle: timed out after %d s with %ld of %ld up\n", o->timeout_s, I->up,
                o->count);
        I->failed = 1;
        uv_stop(&I->loop);
    }
}

static void s_idle_walk_close(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

int bench_idle(const bench_idle_opts_t *o)
{
    static s_idle_t idle;
    s_idle_t *I = &idle;
    I->o = o;
    I->nodes = calloc((size_t)o->count, sizeof *I->nodes);
    if (!I->nodes) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    uv_loop_init(&I->loop);
    I->zctx = zmq_ctx_new();
    /* Each channel has a DEALER, a monitor PAIR and the monitor's own
     * socket inside ZeroMQ: room for all of them (ZeroMQ's default is 1,023
     * sockets per context). */
    zmq_ctx_set(I->zctx, ZMQ_MAX_SOCKETS, (int)(o->count * 3 + 64));
    uv_timer_init(&I->loop, &I->tick);
    I->tick.data = I;
    I->t_start = bench_ns();
    uv_timer_start(&I->tick, s_idle_tick, 0, 10);
    uv_run(&I->loop, UV_RUN_DEFAULT);

    long up_at_end = I->up;
    printf("idle_sessions %ld\nidle_opened %ld\nidle_up_max %ld\nidle_up_at_end %ld\n", o->count,
           I->opened, I->max_up, up_at_end);
    printf("idle_downs_after_up %ld\n", I->downs_after_up);
    if (I->t_all_up)
        printf("idle_held_s %.1f\n", (double)(I->t_hold_end - I->t_all_up) / 1e9);
    int ok = !I->failed && up_at_end == o->count && I->downs_after_up == 0;
    printf("result %s\n", ok ? "ok" : "FAILED");
    fflush(stdout);

    I->closing = 1;
    for (long i = 0; i < I->opened; i++)
        ml_channel_destroy(&I->nodes[i].ch);
    uv_timer_stop(&I->tick);
    uv_walk(&I->loop, s_idle_walk_close, NULL);
    uv_run(&I->loop, UV_RUN_DEFAULT);
    for (long i = 0; i < I->opened; i++)
        ml_tls_ctx_destroy(&I->nodes[i].tls);
    free(I->nodes);
    zmq_ctx_term(I->zctx);
    uv_loop_close(&I->loop);
    return ok ? 0 : 1;
}
