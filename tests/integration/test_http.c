/* medlinkd's HTTP endpoint ([http], broker/http.c) against the real broker:
 * the routes the server answers itself (/healthz, /readyz), its refusals
 * (404, 405, 413, 431, 400), HEAD, its limits (max_connections, the request
 * timeout, keep-alive), a loop that keeps delivering referrals while slow
 * HTTP clients hang on, and HTTPS with client certificates of OPS nodes
 * only. The query parser is checked on its own. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "harness.h"
#include "http.h"
#include "ml_common.h"

static h_world_t W;

static void s_teardown(void)
{
    h_world_fini(&W);
    h_http_ini = NULL;
}

TestSuite(http, .fini = s_teardown, .timeout = 300);

static long s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static void s_start(const char *http_ini, const char *broker_extra)
{
    h_http_ini = http_ini;
    h_world_init(&W, broker_extra);
    h_broker_start(&W);
}

/* A raw request; returns the reply (caller frees), asserting one came. */
static char *s_raw(const char *req, size_t len)
{
    char *reply = NULL;
    size_t rlen = 0;
    h_http_raw(W.http_port, req, len, &reply, &rlen, 15000);
    cr_assert(reply, "no reply to %.40s", req);
    return reply;
}

static int s_connect(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert(fd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert_eq(connect(fd, (struct sockaddr *)&a, sizeof a), 0, "connect: %s", strerror(errno));
    return fd;
}

/* Waits up to timeout_ms for the server to close fd (EOF or reset).
 * Returns the ms it took, or -1 if it stayed open. */
static long s_wait_closed_got(int fd, int timeout_ms, char *got, size_t gotlen)
{
    long t0 = s_now_ms();
    char buf[4096];
    size_t off = 0;
    if (got && gotlen)
        got[0] = '\0';
    while (s_now_ms() - t0 < timeout_ms) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 100) <= 0)
            continue;
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n <= 0)
            return s_now_ms() - t0;
        if (got && off + (size_t)n < gotlen) {
            memcpy(got + off, buf, (size_t)n);
            off += (size_t)n;
            got[off] = '\0';
        }
    }
    return -1;
}

static long s_wait_closed(int fd, int timeout_ms)
{
    return s_wait_closed_got(fd, timeout_ms, NULL, 0);
}

/* ---- routes ---------------------------------------------------------- */

Test(http, healthz_and_readyz_answer_with_the_security_headers)
{
    s_start(NULL, NULL);
    cr_assert_gt(W.http_port, 0);
    int status;
    char *head, *body;
    cr_assert_eq(h_http_get_hdr(&W, "/healthz", NULL, &status, &head, &body, NULL), 0);
    cr_assert_eq(status, 200, "healthz: %d %s", status, body);
    cr_assert_str_eq(body, "ok\n");
    const char *want[] = {"Content-Type: text/plain; charset=utf-8\r\n",
                          "Content-Length: 3\r\n",
                          "Cache-Control: no-store\r\n",
                          "X-Content-Type-Options: nosniff\r\n",
                          "X-Frame-Options: DENY\r\n",
                          "Referrer-Policy: no-referrer\r\n",
                          "Content-Security-Policy: default-src 'self'; img-src 'self' data:; "
                          "style-src 'self'; script-src 'self'\r\n"};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        cr_assert(strstr(head, want[i]), "healthz lacks %s in\n%s", want[i], head);
    free(head);
    free(body);
    cr_assert_eq(h_http_get(&W, "/readyz", &status, &body, NULL), 0);
    cr_assert_eq(status, 200, "readyz: %d %s", status, body);
    cr_assert_str_eq(body, "ready\n");
    free(body);
    cr_assert_eq(h_log_contains(&W, "broker.log", "is not a loopback address"), 0);
    h_broker_stop(&W);
}

Test(http, unknown_path_is_404_and_bad_paths_400)
{
    s_start(NULL, NULL);
    int status;
    char *body;
    cr_assert_eq(h_http_get(&W, "/no/such/thing", &status, &body, NULL), 0);
    cr_assert_eq(status, 404, "%d %s", status, body);
    free(body);
    /* Percent-decoded first: /healthz spelt with escapes is /healthz. */
    cr_assert_eq(h_http_get(&W, "/%68ealthz", &status, &body, NULL), 0);
    cr_assert_eq(status, 200, "%d %s", status, body);
    free(body);
    const char *bad[] = {"/a/../healthz", "/a/%2e%2e/healthz", "/x%00y", "/bad%zz", "/x/.."};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cr_assert_eq(h_http_get(&W, bad[i], &status, &body, NULL), 0, "%s", bad[i]);
        cr_assert_eq(status, 400, "%s: %d %s", bad[i], status, body);
        free(body);
    }
    h_broker_stop(&W);
}

Test(http, post_is_405_with_allow_and_a_body_413)
{
    s_start(NULL, NULL);
    const char post[] = "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi";
    char *r = s_raw(post, sizeof post - 1);
    cr_assert(strncmp(r, "HTTP/1.1 405 ", 13) == 0, "%s", r);
    cr_assert(strstr(r, "\r\nAllow: GET, HEAD\r\n"), "%s", r);
    free(r);
    const char del[] = "DELETE /api/v1/dlq HTTP/1.1\r\nHost: x\r\n\r\n";
    r = s_raw(del, sizeof del - 1);
    cr_assert(strncmp(r, "HTTP/1.1 405 ", 13) == 0, "%s", r);
    free(r);
    const char body[] = "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
    r = s_raw(body, sizeof body - 1);
    cr_assert(strncmp(r, "HTTP/1.1 413 ", 13) == 0, "%s", r);
    free(r);
    const char chunked[] =
        "GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n";
    r = s_raw(chunked, sizeof chunked - 1);
    cr_assert(strncmp(r, "HTTP/1.1 413 ", 13) == 0, "%s", r);
    free(r);
    /* An upgrade is not done: a plain reply, and the connection ends. */
    const char up[] = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                      "Upgrade: websocket\r\n\r\nGET /readyz HTTP/1.1\r\n\r\n";
    r = s_raw(up, sizeof up - 1);
    cr_assert(strncmp(r, "HTTP/1.1 200 ", 13) == 0, "%s", r);
    cr_assert(strstr(r, "Connection: close\r\n") && !strstr(r, "ready"), "%s", r);
    free(r);
    const char junk[] = "\x16\x03\x01 this is no HTTP\r\n\r\n";
    r = s_raw(junk, sizeof junk - 1);
    cr_assert(strncmp(r, "HTTP/1.1 400 ", 13) == 0, "%s", r);
    free(r);
    h_broker_stop(&W);
}

Test(http, a_9k_header_is_431)
{
    s_start(NULL, NULL);
    size_t n = 9 * 1024;
    char *req = malloc(n + 128);
    int off = snprintf(req, n + 128, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ");
    memset(req + off, 'a', n);
    memcpy(req + off + n, "\r\n\r\n", 5);
    char *r = s_raw(req, (size_t)off + n + 4);
    cr_assert(strncmp(r, "HTTP/1.1 431 ", 13) == 0, "%.200s", r);
    free(r);
    /* Just under the limit is fine. */
    memset(req + off, 'a', 7000);
    memcpy(req + off + 7000, "\r\n\r\n", 5);
    r = s_raw(req, (size_t)off + 7004);
    cr_assert(strncmp(r, "HTTP/1.1 200 ", 13) == 0, "%.200s", r);
    free(r);
    free(req);
    h_broker_stop(&W);
}

Test(http, head_has_the_length_but_no_body)
{
    s_start(NULL, NULL);
    const char req[] = "HEAD /healthz HTTP/1.0\r\n\r\n";
    char *r = s_raw(req, sizeof req - 1);
    cr_assert(strncmp(r, "HTTP/1.1 200 ", 13) == 0, "%s", r);
    cr_assert(strstr(r, "Content-Length: 3\r\n"), "%s", r);
    const char *end = strstr(r, "\r\n\r\n");
    cr_assert(end);
    cr_assert_eq(end[4], '\0', "HEAD reply has a body: %s", end + 4);
    free(r);
    h_broker_stop(&W);
}

Test(http, keep_alive_answers_pipelined_requests_in_order)
{
    s_start(NULL, NULL);
    /* Three requests in one write; the last one closes. Each is answered
     * in turn, none before the previous reply was written. */
    const char req[] = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                       "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
                       "GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    char *r = s_raw(req, sizeof req - 1);
    const char *a = strstr(r, "HTTP/1.1 200 OK");
    const char *b = a ? strstr(a + 1, "HTTP/1.1 200 OK") : NULL;
    const char *c = b ? strstr(b + 1, "HTTP/1.1 404 ") : NULL;
    cr_assert(a && b && c, "%s", r);
    cr_assert(strstr(a, "ok\n") < b && strstr(b, "ready\n") < c, "%s", r);
    free(r);
    h_broker_stop(&W);
}

Test(http, empty_listen_means_nothing_listens)
{
    s_start("listen =", NULL);
    cr_assert_eq(W.http_port, 0);
    cr_assert_eq(h_log_contains(&W, "broker.log", "http: listening on"), 0);
    h_broker_stop(&W);
}

/* ---- ml_http_query_get ------------------------------------------------ */

Test(http, query_get_decodes_and_bounds)
{
    char out[16];
    cr_assert_eq(ml_http_query_get("state=SENT&overdue=1", "state", out, sizeof out), 1);
    cr_assert_str_eq(out, "SENT");
    cr_assert_eq(ml_http_query_get("state=SENT&overdue=1", "overdue", out, sizeof out), 1);
    cr_assert_str_eq(out, "1");
    cr_assert_eq(ml_http_query_get("state=SENT&overdue=1", "node", out, sizeof out), 0);
    cr_assert_eq(ml_http_query_get("", "node", out, sizeof out), 0);
    /* Percent escapes and '+' as a space, in values and keys. */
    cr_assert_eq(ml_http_query_get("q=a+b%2Bc%20d", "q", out, sizeof out), 1);
    cr_assert_str_eq(out, "a b+c d");
    cr_assert_eq(ml_http_query_get("n%6Fde=x", "node", out, sizeof out), 1);
    cr_assert_str_eq(out, "x");
    /* UTF-8 passes through. */
    cr_assert_eq(ml_http_query_get("n=%E8%B5%B5", "n", out, sizeof out), 1);
    cr_assert_str_eq(out, "\xe8\xb5\xb5");
    /* The first occurrence wins; a key without '=' is present and empty. */
    cr_assert_eq(ml_http_query_get("a=1&a=2", "a", out, sizeof out), 1);
    cr_assert_str_eq(out, "1");
    cr_assert_eq(ml_http_query_get("x&flag&y=2", "flag", out, sizeof out), 1);
    cr_assert_str_eq(out, "");
    cr_assert_eq(ml_http_query_get("a=&b=2", "a", out, sizeof out), 1);
    cr_assert_str_eq(out, "");
    /* Empty pairs are skipped; a prefix of a key is not the key. */
    cr_assert_eq(ml_http_query_get("&&b=2&", "b", out, sizeof out), 1);
    cr_assert_str_eq(out, "2");
    cr_assert_eq(ml_http_query_get("states=1", "state", out, sizeof out), 0);
    /* Malformed: broken escapes, a NUL, too long for out. */
    cr_assert_eq(ml_http_query_get("q=%zz", "q", out, sizeof out), ML_EINVAL);
    cr_assert_eq(ml_http_query_get("q=%4", "q", out, sizeof out), ML_EINVAL);
    cr_assert_eq(ml_http_query_get("q=a%00b", "q", out, sizeof out), ML_EINVAL);
    cr_assert_eq(ml_http_query_get("k%=1&q=2", "q", out, sizeof out), ML_EINVAL);
    cr_assert_eq(ml_http_query_get("q=0123456789abcdef", "q", out, sizeof out), ML_EINVAL);
    cr_assert_eq(ml_http_query_get("q=0123456789abcde", "q", out, sizeof out), 1);
    cr_assert_str_eq(out, "0123456789abcde");
    cr_assert_eq(ml_http_query_get("q=1", "q", out, 1), ML_EINVAL);
}

/* ---- limits ------------------------------------------------------------ */

Test(http, idle_connection_closed_after_the_timeout_while_referrals_flow)
{
    s_start(NULL, NULL);
    h_agent_start(&W, H_COUNTY);
    h_agent_start(&W, H_XINZHAN);
    long t0 = s_now_ms();
    int idle = s_connect(W.http_port); /* says nothing */
    int slow = s_connect(W.http_port); /* half a request, never finished */
    const char half[] = "GET /healthz HTTP/1.1\r\nHost: x\r\n";
    cr_assert_eq(send(slow, half, sizeof half - 1, 0), (ssize_t)(sizeof half - 1));
    int kept = s_connect(W.http_port); /* one request, then idle keep-alive */
    const char req[] = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    cr_assert_eq(send(kept, req, sizeof req - 1, 0), (ssize_t)(sizeof req - 1));
    char buf[2048];
    struct pollfd p = {.fd = kept, .events = POLLIN};
    cr_assert_eq(poll(&p, 1, 10000), 1);
    ssize_t n = recv(kept, buf, sizeof buf - 1, 0);
    cr_assert_gt(n, 0);
    buf[n] = '\0';
    cr_assert(strncmp(buf, "HTTP/1.1 200 ", 13) == 0, "%s", buf);

    /* Meanwhile the broker does its work. */
    char *ref = h_referral_json(H_COUNTY, "Li Si", NULL);
    h_drop(&W, H_XINZHAN, "referral-http-1.json", ref);
    free(ref);

    long a = s_wait_closed(idle, 20000);
    cr_assert(a >= 0, "the idle connection stayed open");
    long since = s_now_ms() - t0;
    cr_assert(since >= 9000 && since <= 16000, "idle connection closed after %ld ms", since);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 1, 20000), 1, "referral not delivered");
    /* The unfinished request gets a 408, in about the same time. */
    char got[2048];
    long b = s_wait_closed_got(slow, 10000, got, sizeof got);
    cr_assert(b >= 0, "the slow connection stayed open");
    cr_assert(strncmp(got, "HTTP/1.1 408 ", 13) == 0, "the unfinished request got: %s", got);
    cr_assert(s_wait_closed(kept, 10000) >= 0, "the keep-alive connection stayed open");
    close(idle);
    close(slow);
    close(kept);
    /* A second referral after that: nothing is stuck. */
    ref = h_referral_json(H_COUNTY, "Wang Wu", NULL);
    h_drop(&W, H_XINZHAN, "referral-http-2.json", ref);
    free(ref);
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 2, 20000), 2, "second referral");
    h_broker_stop(&W);
}

Test(http, max_connections_are_refused_at_accept)
{
    s_start("max_connections = 3", NULL);
    int fds[3];
    for (int i = 0; i < 3; i++)
        fds[i] = s_connect(W.http_port);
    /* Give the broker the time to accept the three. */
    int status;
    h_sleep_ms(300);
    int extra = s_connect(W.http_port);
    long t = s_wait_closed(extra, 5000);
    cr_assert(t >= 0, "a fourth connection was kept open");
    close(extra);
    cr_assert(h_log_contains(&W, "broker.log", "max_connections") >= 1);
    /* Once one closes, a request goes through again. */
    close(fds[0]);
    int ok = 0;
    for (int tries = 0; tries < 50 && !ok; tries++) {
        char *body = NULL;
        ok = h_http_get(&W, "/healthz", &status, &body, NULL) == 0 && status == 200;
        free(body);
        if (!ok)
            h_sleep_ms(100);
    }
    cr_assert(ok, "no request went through after a connection closed");
    /* Stopped with two connections open (one in the middle of a request):
     * a clean exit, whatever sanitizer watches. */
    const char half[] = "GET /healthz HTTP/1.1\r\n";
    cr_assert_eq(send(fds[1], half, sizeof half - 1, 0), (ssize_t)(sizeof half - 1));
    h_sleep_ms(100);
    h_broker_stop(&W);
    cr_assert_geq(s_wait_closed(fds[1], 5000), 0);
    close(fds[1]);
    close(fds[2]);
}

Test(http, forty_slow_clients_do_not_hold_up_the_loop)
{
    s_start(NULL, NULL);
    h_agent_start(&W, H_COUNTY);
    h_agent_start(&W, H_XINZHAN);
    /* Forty clients: some say nothing, some send a request a byte at a
     * time, some send a request and never read the reply. */
    enum { N = 40 };
    int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = s_connect(W.http_port);
    const char req[] = "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n";
    for (int i = N / 3; i < 2 * N / 3; i++)
        cr_assert_eq(send(fds[i], req, 5, 0), 5);
    for (int i = 2 * N / 3; i < N; i++) {
        int small = 1024;
        setsockopt(fds[i], SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
        for (int k = 0; k < 20; k++)
            cr_assert_eq(send(fds[i], req, sizeof req - 1, 0), (ssize_t)(sizeof req - 1));
    }
    long t0 = s_now_ms();
    for (int m = 0; m < 10; m++) {
        char name[64], patient[64];
        snprintf(name, sizeof name, "referral-slow-%d.json", m);
        snprintf(patient, sizeof patient, "Patient Slow %d", m);
        char *ref = h_referral_json(H_COUNTY, patient, NULL);
        h_drop(&W, H_XINZHAN, name, ref);
        free(ref);
        /* The slow ones dribble on. */
        for (int i = N / 3; i < 2 * N / 3; i++)
            send(fds[i], req + 5 + m, 1, MSG_NOSIGNAL);
    }
    cr_assert_eq(h_wait_count(&W, H_COUNTY, "inbox", 10, 30000), 10,
                 "referrals not delivered while slow HTTP clients hung on");
    long took = s_now_ms() - t0;
    /* And a fresh HTTP client is answered at once. */
    int status;
    char *body = NULL;
    long t1 = s_now_ms();
    cr_assert_eq(h_http_get(&W, "/healthz", &status, &body, NULL), 0);
    cr_assert_eq(status, 200);
    long answered = s_now_ms() - t1;
    free(body);
    cr_assert_lt(answered, 2000, "healthz took %ld ms next to 40 slow clients", answered);
    fprintf(stderr,
            "10 referrals delivered in %ld ms with %d slow HTTP clients; healthz in %ld ms\n", took,
            N, answered);
    for (int i = 0; i < N; i++)
        close(fds[i]);
    h_broker_stop(&W);
}

Test(http, readyz_is_503_when_the_store_is_full)
{
    /* A quota the empty database is already past: the store refuses every
     * message, and says so. */
    s_start(NULL, "max_store_bytes = 4096\n");
    int status;
    char *body;
    cr_assert_eq(h_http_get(&W, "/readyz", &status, &body, NULL), 0);
    cr_assert_eq(status, 503, "%d %s", status, body);
    cr_assert(strstr(body, "max_store_bytes"), "%s", body);
    free(body);
    /* The process itself is fine. */
    cr_assert_eq(h_http_get(&W, "/healthz", &status, &body, NULL), 0);
    cr_assert_eq(status, 200);
    free(body);
    h_broker_stop(&W);
}

/* ---- HTTPS ------------------------------------------------------------- */

/* A TLS client connection with the certificate of node (NULL: none). */
typedef struct {
    SSL_CTX *ctx;
    SSL *ssl;
    int fd;
    int up; /* this side's handshake finished */
} s_tls_t;

static void s_tls_open(s_tls_t *t, const char *node)
{
    char ca[700];
    snprintf(ca, sizeof ca, "%s/ca.crt", W.pki);
    t->ctx = SSL_CTX_new(TLS_client_method());
    cr_assert(t->ctx);
    SSL_CTX_set_min_proto_version(t->ctx, TLS1_3_VERSION);
    cr_assert_eq(SSL_CTX_load_verify_locations(t->ctx, ca, NULL), 1);
    SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER, NULL);
    if (node) {
        char crt[700], key[700];
        snprintf(crt, sizeof crt, "%s/%s.crt", W.pki, node);
        snprintf(key, sizeof key, "%s/%s.key", W.pki, node);
        cr_assert_eq(SSL_CTX_use_certificate_chain_file(t->ctx, crt), 1, "%s", crt);
        cr_assert_eq(SSL_CTX_use_PrivateKey_file(t->ctx, key, SSL_FILETYPE_PEM), 1, "%s", key);
    }
    t->fd = s_connect(W.http_port);
    struct timeval tv = {.tv_sec = 10};
    setsockopt(t->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    t->ssl = SSL_new(t->ctx);
    SSL_set_fd(t->ssl, t->fd);
    t->up = SSL_connect(t->ssl) == 1;
    ERR_clear_error();
}

static void s_tls_close(s_tls_t *t)
{
    SSL_free(t->ssl);
    SSL_CTX_free(t->ctx);
    close(t->fd);
    ERR_clear_error();
}

/* Sends GET path (keep-alive unless last) and reads one reply (its head
 * and Content-Length bytes, or until the server closes) into out ("" when
 * nothing came). Returns the bytes read, or -1 without a handshake. In
 * TLS 1.3 the client's handshake ends before the server has seen its
 * certificate: a refusal shows as a failed read. */
static int s_tls_request(s_tls_t *t, const char *path, int last, char *out, size_t outlen)
{
    out[0] = '\0';
    if (!t->up)
        return -1;
    char req[512];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n", path,
                     last ? "Connection: close\r\n" : "");
    int got = 0;
    if (SSL_write(t->ssl, req, n) == n) {
        for (;;) {
            int r = SSL_read(t->ssl, out + got, (int)(outlen - 1 - (size_t)got));
            if (r <= 0)
                break;
            got += r;
            out[got] = '\0';
            const char *end = strstr(out, "\r\n\r\n");
            const char *cl = strstr(out, "Content-Length: ");
            if (end && cl && cl < end && out + got >= end + 4 + atoi(cl + 16))
                break;
            if ((size_t)got >= outlen - 1)
                break;
        }
    }
    out[got] = '\0';
    ERR_clear_error();
    return got;
}

static int s_tls_get(const char *node, const char *path, char *out, size_t outlen)
{
    s_tls_t t;
    s_tls_open(&t, node);
    int rc = s_tls_request(&t, path, 1, out, outlen);
    s_tls_close(&t);
    return rc;
}

Test(http, tls_ops_certificate_200_clinic_403_none_refused)
{
    s_start("tls = yes", NULL);
    char reply[8192];
    cr_assert_geq(s_tls_get(H_OPS, "/healthz", reply, sizeof reply), 0);
    cr_assert(strncmp(reply, "HTTP/1.1 200 ", 13) == 0, "OPS: %s", reply);
    cr_assert(strstr(reply, "\r\n\r\nok\n"), "%s", reply);
    cr_assert_geq(s_tls_get(H_OPS, "/readyz", reply, sizeof reply), 0);
    cr_assert(strncmp(reply, "HTTP/1.1 200 ", 13) == 0, "OPS: %s", reply);

    /* A clinic's certificate is of the community but not of the OPS role. */
    cr_assert_geq(s_tls_get(H_XINZHAN, "/healthz", reply, sizeof reply), 0);
    cr_assert(strncmp(reply, "HTTP/1.1 403 ", 13) == 0, "clinic: %s", reply);
    cr_assert(strstr(reply, H_XINZHAN) && strstr(reply, "TOWNSHIP_CLINIC"), "%s", reply);

    /* No certificate: no HTTP at all. */
    s_tls_get(NULL, "/healthz", reply, sizeof reply);
    cr_assert(!strstr(reply, "HTTP/1.1"), "without a certificate: %s", reply);
    int refused = 0;
    for (int i = 0; i < 50 && !refused; i++) {
        refused = h_log_contains(&W, "broker.log", "TLS handshake from") > 0;
        if (!refused)
            h_sleep_ms(100);
    }
    cr_assert(refused, "the refused handshake was not logged");

    /* A client that starts no handshake is closed within the request
     * timeout. */
    long t0 = s_now_ms();
    int silent = s_connect(W.http_port);
    long t = s_wait_closed(silent, 20000);
    close(silent);
    cr_assert(t >= 0, "a silent TLS client stayed connected");
    cr_assert(s_now_ms() - t0 >= 9000, "closed after %ld ms only", s_now_ms() - t0);

    /* Plain HTTP on the TLS port gets nothing either. */
    char *r = NULL;
    size_t rlen = 0;
    const char req[] = "GET /healthz HTTP/1.0\r\n\r\n";
    h_http_raw(W.http_port, req, sizeof req - 1, &r, &rlen, 15000);
    cr_assert(!r || !strstr(r, "200 OK"), "plain HTTP answered over the TLS port: %s", r);
    free(r);
    h_broker_stop(&W);
}

Test(http, a_port_in_use_fails_the_start_naming_http_listen)
{
    /* Someone else holds the port. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    cr_assert_eq(listen(fd, 4), 0);
    socklen_t l = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &l);
    char ini[128];
    snprintf(ini, sizeof ini, "listen = 127.0.0.1:%d", ntohs(a.sin_port));
    h_http_ini = ini;
    h_world_init(&W, NULL);
    char bin[600];
    h_bin("medlinkd", bin, sizeof bin);
    int st = -1;
    char *out = h_run(&st, "'%s' --config '%s/medlinkd.ini' 2>&1", bin, W.dir);
    close(fd);
    cr_assert_neq(st, 0, "medlinkd started on a port in use:\n%s", out);
    char want[160];
    snprintf(want, sizeof want, "[http] listen = 127.0.0.1:%d: cannot listen there",
             ntohs(a.sin_port));
    cr_assert(strstr(out, want), "no \"%s\" in:\n%s", want, out);
    free(out);
}

Test(http, tls_revoked_ops_certificate_refused_after_reload)
{
    s_start("tls = yes", NULL);
    h_broker_stop(&W);
    /* With a CRL (empty at first). */
    char *out;
    int st;
    out = h_run(&st, "'%s/deploy/pki.sh' --dir '%s' --crl 2>&1", getenv("ML_SOURCE_DIR"), W.pki);
    cr_assert_eq(st, 0, "%s", out);
    free(out);
    char path[700];
    snprintf(path, sizeof path, "%s/medlinkd.ini", W.dir);
    char *ini = h_slurp(path);
    cr_assert(ini);
    char *at = strstr(ini, "[broker]\n");
    cr_assert(at);
    FILE *f = fopen(path, "w");
    fprintf(f, "[broker]\ncrl = pki/crl.pem\n%s", at + strlen("[broker]\n"));
    fclose(f);
    free(ini);
    h_broker_start(&W);

    s_tls_t t;
    s_tls_open(&t, H_OPS);
    char reply[8192];
    cr_assert_gt(s_tls_request(&t, "/healthz", 0, reply, sizeof reply), 0);
    cr_assert(strncmp(reply, "HTTP/1.1 200 ", 13) == 0, "%s", reply);

    /* The ops laptop is stolen: its certificate is revoked and the CRL
     * reloaded, while its keep-alive connection is open. */
    out = h_run(&st, "'%s/deploy/pki.sh' --dir '%s' --revoke %s 2>&1", getenv("ML_SOURCE_DIR"),
                W.pki, H_OPS);
    cr_assert_eq(st, 0, "%s", out);
    free(out);
    int before = h_log_contains(&W, "broker.log", "reloaded");
    cr_assert_eq(kill(W.broker, SIGHUP), 0);
    for (int i = 0; i < 100 && h_log_contains(&W, "broker.log", "reloaded") == before; i++)
        h_sleep_ms(100);
    cr_assert_gt(h_log_contains(&W, "broker.log", "reloaded"), before, "no reload");

    cr_assert_gt(s_tls_request(&t, "/healthz", 0, reply, sizeof reply), 0);
    cr_assert(strncmp(reply, "HTTP/1.1 403 ", 13) == 0, "after revocation: %s", reply);
    cr_assert(strstr(reply, "revoked"), "%s", reply);
    s_tls_close(&t);
    /* And a new connection gets no HTTP at all. */
    s_tls_get(H_OPS, "/healthz", reply, sizeof reply);
    cr_assert(!strstr(reply, "HTTP/1.1"), "a revoked certificate was answered: %s", reply);
    h_broker_stop(&W);
}

Test(http, readyz_turns_503_once_the_store_fills_up)
{
    /* The size of an empty store, then a quota a few referrals above it. */
    s_start(NULL, NULL);
    h_broker_stop(&W);
    char path[700];
    snprintf(path, sizeof path, "%s/data/broker/broker.db", W.dir);
    struct stat sb;
    cr_assert_eq(stat(path, &sb), 0, "%s", path);
    snprintf(path, sizeof path, "%s/medlinkd.ini", W.dir);
    char *ini = h_slurp(path);
    cr_assert(ini);
    char *at = strstr(ini, "[broker]\n");
    cr_assert(at);
    FILE *f = fopen(path, "w");
    fprintf(f, "[broker]\nmax_store_bytes = %lld\n%s", (long long)sb.st_size + 16384,
            at + strlen("[broker]\n"));
    fclose(f);
    free(ini);
    h_broker_start(&W);
    int status;
    char *body;
    cr_assert_eq(h_http_get(&W, "/readyz", &status, &body, NULL), 0);
    cr_assert_eq(status, 200, "before: %d %s", status, body);
    free(body);

    h_agent_start(&W, H_COUNTY);
    h_agent_start(&W, H_XINZHAN);
    for (int i = 0; i < 60; i++) {
        char name[64], patient[64];
        snprintf(name, sizeof name, "referral-full-%d.json", i);
        snprintf(patient, sizeof patient, "Patient Full %d", i);
        char *ref = h_referral_json(H_COUNTY, patient, NULL);
        h_drop(&W, H_XINZHAN, name, ref);
        free(ref);
    }
    int full = 0;
    for (int i = 0; i < 300 && !full; i++) {
        body = NULL;
        cr_assert_eq(h_http_get(&W, "/readyz", &status, &body, NULL), 0);
        full = status == 503;
        if (full)
            cr_assert(strstr(body, "max_store_bytes"), "%s", body);
        free(body);
        if (!full)
            h_sleep_ms(100);
    }
    cr_assert(full, "readyz stayed 200 while the store refused messages");
    cr_assert_gt(h_log_contains(&W, "broker.log", "over max_bytes"), 0);
    cr_assert_eq(h_http_get(&W, "/healthz", &status, &body, NULL), 0);
    cr_assert_eq(status, 200);
    free(body);
    h_broker_stop(&W);
}

Test(http, listens_on_ipv6_loopback)
{
    int probe = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    int have6 = probe >= 0 && bind(probe, (struct sockaddr *)&a, sizeof a) == 0;
    if (probe >= 0)
        close(probe);
    if (!have6)
        cr_skip_test("this host has no ::1");
    s_start("listen = [::1]:0", NULL);
    cr_assert_gt(W.http_port, 0);
    cr_assert_gt(h_log_contains(&W, "broker.log", "http: listening on [::1]:"), 0);
    int fd = socket(AF_INET6, SOCK_STREAM, 0);
    a.sin6_port = htons((uint16_t)W.http_port);
    cr_assert_eq(connect(fd, (struct sockaddr *)&a, sizeof a), 0, "connect: %s", strerror(errno));
    const char req[] = "GET /healthz HTTP/1.0\r\n\r\n";
    cr_assert_eq(send(fd, req, sizeof req - 1, 0), (ssize_t)(sizeof req - 1));
    char got[2048];
    cr_assert_geq(s_wait_closed_got(fd, 10000, got, sizeof got), 0);
    close(fd);
    cr_assert(strncmp(got, "HTTP/1.1 200 ", 13) == 0, "%s", got);
    cr_assert_eq(h_log_contains(&W, "broker.log", "is not a loopback address"), 0);
    h_broker_stop(&W);
}

Test(http, port_learnt_from_a_json_log_too)
{
    s_start(NULL, "log_format = json\n");
    cr_assert_gt(W.http_port, 0);
    int status;
    char *body;
    cr_assert_eq(h_http_get(&W, "/healthz", &status, &body, NULL), 0);
    cr_assert_eq(status, 200, "%d %s", status, body);
    free(body);
    h_broker_stop(&W);
}
