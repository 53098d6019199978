/* medlinkd's HTTP endpoint (see http.h): an HTTP/1.1 server on the broker's
 * own libuv loop, for /healthz, /readyz, /metrics, the web page and
 * /api/v1. Requests are parsed by http-parser (Debian's libhttp-parser, a
 * callback parser that keeps no buffer of its own), optionally inside TLS
 * through the same ml_tls sessions on memory BIOs the agents' sessions use.
 *
 * Nothing here waits for a client: reads and writes are libuv's
 * non-blocking ones, and every connection is bounded in what it can make
 * the broker hold and for how long:
 *  - the request head is at most S_HEAD_MAX bytes (431), no body (413),
 *    GET and HEAD only (405);
 *  - one request at a time: once a request is complete the parser is paused
 *    and the connection stops reading until its reply has been written, so
 *    a pipelining client cannot queue replies; what it sent ahead (at most
 *    one read) waits in c->pending;
 *  - one timer per connection: the next request must be complete within
 *    S_REQUEST_MS of the connect (TLS handshake included) or of the previous
 *    reply, and a reply must be written within S_REQUEST_MS of being made;
 *    an idle keep-alive connection is closed when it fires;
 *  - at most max_connections at once; more are accepted and closed at once;
 *  - a reply body is capped at ML_HTTP_BODY_MAX (ml_sbuf), else 500.
 *
 * Lifetime: the server structure and each connection are freed in the close
 * callbacks of their handles, counted in h->open_handles, never through b:
 * ml_bk_http_stop detaches the server from the broker (h->b = NULL) and
 * closes everything, so nothing of b is touched after it returns. */
#include "http.h"

#include <arpa/inet.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <http_parser.h>

#include "config.h"
#include "prom.h"
#include "ml_common.h"
#include "ml_loglimit.h"
#include "ml_tls.h"
#include "query.h"
#include "web.h"

#define S_COMPONENT "http"
/* Most bytes of a request head (request line and headers). */
#define S_HEAD_MAX 8192
/* The next request must be complete this long after the connect or the
 * previous reply; a reply must be written within it too. */
#define S_REQUEST_MS 10000
/* After a reply that ends the connection: how long to wait for the client
 * to close its side while what it still sends is discarded (closing with
 * unread input makes the kernel send a reset, which can destroy the reply
 * before the client has read it). */
#define S_LINGER_MS 2000
#define S_READ_BUF 16384
#define S_AL_MAX 256

typedef struct s_server s_server_t;

typedef struct s_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    s_server_t *h;
    struct s_conn *prev, *next;
    int handles; /* of tcp and timer still open */
    int closing;
    http_parser parser;
    ml_tls_session_t *tls; /* NULL over plain HTTP */
    int tls_closed;        /* close_notify sent */
    char peer[256];        /* the verified client certificate's CN, "" before / over plain */
    char addr[64];         /* the client's address, for logs */
    /* The request being read. */
    size_t msg_bytes; /* bytes of this request consumed so far (S_HEAD_MAX) */
    char url[S_HEAD_MAX + 1];
    size_t url_len;
    char field[32]; /* the header name being read, lower case; long names do not matter */
    size_t field_len;
    int field_long;
    int in_value;
    int field_is_al;
    char al[S_AL_MAX]; /* Accept-Language */
    size_t al_len;
    int reject; /* a status decided in a callback (405, 413) */
    /* The reply in flight. */
    int responding; /* a request is being answered: not reading */
    int writes;     /* uv_write requests not yet called back */
    int close_after;
    int lingering; /* the reply is written, the write side shut: discarding input */
    char *pending; /* bytes read after the request being answered */
    size_t pending_len;
} s_conn_t;

struct s_server {
    ml_broker_t *b; /* NULL once stopped */
    uv_tcp_t listener;
    int open_handles; /* listener and every connection's handles */
    int stopped;
    int use_tls;
    long max_conn;
    size_t n_conn;
    s_conn_t *conns;
    char addr[80];
    ml_bk_http_stats_t stats;
    ml_loglimit_t refusals; /* log lines for connections refused or failed */
    char rbuf[S_READ_BUF];  /* one read at a time on this thread: shared */
    char pbuf[S_READ_BUF];  /* plaintext out of TLS */
};

static void s_read_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);
static void s_alloc_cb(uv_handle_t *hd, size_t suggested, uv_buf_t *buf);
static void s_timer_cb(uv_timer_t *t);
static void s_feed(s_conn_t *c, const char *data, size_t len);

/* ------------------------------------------------------------------ */
/* Helpers anyone may call                                             */

int ml_http_error(ml_http_resp_t *r, int status, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    r->status = status;
    r->content_type = "text/plain; charset=utf-8";
    ml_sbuf_free(&r->body);
    ml_sbuf_printf(&r->body, "%s\n", msg);
    return 0;
}

static int s_hex(int ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* Percent-decodes in[0, len) into out (NUL-terminated), with '+' as a
 * space when plus is set (queries, not paths). Returns 0, ML_EINVAL for a
 * broken escape or a decoded NUL, ML_ETOOBIG when it needs more than
 * outlen - 1 bytes. */
static int s_pct_decode(const char *in, size_t len, int plus, char *out, size_t outlen)
{
    size_t o = 0;
    if (outlen == 0)
        return ML_ETOOBIG;
    for (size_t i = 0; i < len; i++) {
        int ch = (unsigned char)in[i];
        if (ch == '%') {
            if (len - i < 3)
                return ML_EINVAL;
            int a = s_hex((unsigned char)in[i + 1]), b = s_hex((unsigned char)in[i + 2]);
            if (a < 0 || b < 0)
                return ML_EINVAL;
            ch = a * 16 + b;
            i += 2;
        } else if (ch == '+' && plus) {
            ch = ' ';
        }
        if (ch == 0)
            return ML_EINVAL;
        if (o + 1 >= outlen)
            return ML_ETOOBIG;
        out[o++] = (char)ch;
    }
    out[o] = '\0';
    return 0;
}

int ml_http_query_get(const char *query, const char *name, char *out, size_t outlen)
{
    if (!query || !name || !out || outlen == 0)
        return ML_EINVAL;
    out[0] = '\0';
    const char *p = query;
    while (*p) {
        const char *end = strchr(p, '&');
        size_t plen = end ? (size_t)(end - p) : strlen(p);
        const char *eq = memchr(p, '=', plen);
        size_t klen = eq ? (size_t)(eq - p) : plen;
        if (plen > 0) {
            /* A key longer than any name a handler asks for cannot match
             * it; a malformed one makes the whole query malformed. */
            char key[128];
            int rc = s_pct_decode(p, klen, 1, key, sizeof key);
            if (rc == ML_EINVAL)
                return ML_EINVAL;
            if (rc == 0 && strcmp(key, name) == 0) {
                const char *v = eq ? eq + 1 : p + plen;
                size_t vlen = (size_t)(p + plen - v);
                rc = s_pct_decode(v, vlen, 1, out, outlen);
                if (rc != 0) {
                    out[0] = '\0';
                    return ML_EINVAL;
                }
                return 1;
            }
        }
        if (!end)
            break;
        p = end + 1;
    }
    return 0;
}

static const char *s_reason(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 204:
        return "No Content";
    case 304:
        return "Not Modified";
    case 400:
        return "Bad Request";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 408:
        return "Request Timeout";
    case 413:
        return "Content Too Large";
    case 431:
        return "Request Header Fields Too Large";
    case 500:
        return "Internal Server Error";
    case 503:
        return "Service Unavailable";
    default:
        return status < 300 ? "OK" : status < 500 ? "Client Error" : "Server Error";
    }
}

/* ------------------------------------------------------------------ */
/* Closing                                                             */

static void s_server_release(s_server_t *h)
{
    if (--h->open_handles == 0 && h->stopped)
        free(h);
}

static void s_conn_close_cb(uv_handle_t *hd)
{
    s_conn_t *c = hd->data;
    s_server_t *h = c->h;
    if (--c->handles == 0) {
        free(c->pending);
        free(c);
    }
    s_server_release(h);
}

/* Closes at once; pending writes are cancelled. */
static void s_conn_close(s_conn_t *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    s_server_t *h = c->h;
    if (c->prev)
        c->prev->next = c->next;
    else
        h->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    h->n_conn--;
    /* Now, not in the close callback: the session belongs to the broker's
     * TLS context, which ml_broker_destroy frees before the loop runs the
     * callbacks. Every path that uses it checks c->closing first. */
    ml_tls_session_destroy(&c->tls);
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->tcp, s_conn_close_cb);
    uv_close((uv_handle_t *)&c->timer, s_conn_close_cb);
}

static void s_shutdown_cb(uv_shutdown_t *req, int status)
{
    s_conn_t *c = req->data;
    free(req);
    if (status != 0 && !c->closing)
        s_conn_close(c);
}

/* The last reply is written: shut the write side and discard what comes
 * until the client closes or S_LINGER_MS pass. */
static void s_linger(s_conn_t *c)
{
    if (c->closing || c->lingering)
        return;
    c->lingering = 1;
    uv_shutdown_t *req = malloc(sizeof *req);
    if (!req || uv_shutdown(req, (uv_stream_t *)&c->tcp, s_shutdown_cb) != 0) {
        free(req);
        s_conn_close(c);
        return;
    }
    req->data = c;
    if (uv_read_start((uv_stream_t *)&c->tcp, s_alloc_cb, s_read_cb) != 0) {
        s_conn_close(c);
        return;
    }
    uv_timer_start(&c->timer, s_timer_cb, S_LINGER_MS, 0);
}

/* ------------------------------------------------------------------ */
/* Writing                                                             */

typedef struct {
    uv_write_t req;
    s_conn_t *c;
    char *a, *b;
} s_wreq_t;

static void s_response_done(s_conn_t *c);

static void s_write_cb(uv_write_t *req, int status)
{
    s_wreq_t *w = (s_wreq_t *)req;
    s_conn_t *c = w->c;
    free(w->a);
    free(w->b);
    free(w);
    c->writes--;
    if (c->closing)
        return;
    if (status != 0) {
        s_conn_close(c);
        return;
    }
    if (c->writes == 0 && c->responding)
        s_response_done(c);
}

/* Queues a and b (either may be NULL; both are freed once written). */
static int s_write(s_conn_t *c, char *a, size_t alen, char *b, size_t blen)
{
    s_wreq_t *w = malloc(sizeof *w);
    if (!w) {
        free(a);
        free(b);
        return ML_ENOMEM;
    }
    w->c = c;
    w->a = a;
    w->b = b;
    uv_buf_t bufs[2];
    unsigned n = 0;
    if (a && alen)
        bufs[n++] = uv_buf_init(a, (unsigned)alen);
    if (b && blen)
        bufs[n++] = uv_buf_init(b, (unsigned)blen);
    if (n == 0) {
        free(a);
        free(b);
        free(w);
        return 0;
    }
    if (uv_write(&w->req, (uv_stream_t *)&c->tcp, bufs, n, s_write_cb) != 0) {
        free(a);
        free(b);
        free(w);
        return ML_EIO;
    }
    c->writes++;
    return 0;
}

/* Sends the ciphertext the TLS session has for the peer. */
static int s_tls_flush(s_conn_t *c)
{
    size_t n = ml_tls_session_pending_out(c->tls);
    if (n == 0)
        return 0;
    char *buf = malloc(n);
    if (!buf)
        return ML_ENOMEM;
    n = ml_tls_session_take_out(c->tls, (uint8_t *)buf, n);
    return s_write(c, buf, n, NULL, 0);
}

/* Writes a reply: head, then body unless head_only. Takes the body. */
static void s_send(s_conn_t *c, int status, const char *ctype, const char *cache, const char *extra,
                   ml_sbuf_t *body, int head_only)
{
    s_server_t *h = c->h;
    size_t blen = 0;
    char *bdata = ml_sbuf_take(body, &blen);
    if (!bdata) {
        /* A failed buffer (over ML_HTTP_BODY_MAX, or out of memory). */
        status = 500;
        ctype = "text/plain; charset=utf-8";
        cache = NULL;
        extra = NULL;
        static const char msg[] = "the reply would be too large\n";
        bdata = strdup(msg);
        blen = bdata ? sizeof msg - 1 : 0;
    }
    char head[1024];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\n"
                     "Content-Type: %s\r\n"
                     "Content-Length: %zu\r\n"
                     "Cache-Control: %s\r\n"
                     "X-Content-Type-Options: nosniff\r\n"
                     "X-Frame-Options: DENY\r\n"
                     "Referrer-Policy: no-referrer\r\n"
                     "Content-Security-Policy: default-src 'self'; img-src 'self' data:; "
                     "style-src 'self'; script-src 'self'\r\n"
                     "%s%s"
                     "\r\n",
                     status, s_reason(status), ctype ? ctype : "text/plain; charset=utf-8", blen,
                     cache ? cache : "no-store", extra ? extra : "",
                     c->close_after ? "Connection: close\r\n" : "");
    if (n < 0 || (size_t)n >= sizeof head) {
        free(bdata);
        s_conn_close(c);
        return;
    }
    h->stats.requests++;
    c->responding = 1;
    uv_read_stop((uv_stream_t *)&c->tcp);
    /* The reply must be written in time too: a client that does not read
     * is not kept for ever. */
    uv_timer_again(&c->timer);
    int rc;
    if (head_only) {
        free(bdata);
        bdata = NULL;
        blen = 0;
    }
    if (c->tls) {
        rc = ml_tls_session_write(c->tls, (const uint8_t *)head, (size_t)n);
        if (rc == 0 && blen)
            rc = ml_tls_session_write(c->tls, (const uint8_t *)bdata, blen);
        free(bdata);
        if (rc == 0)
            rc = s_tls_flush(c);
    } else {
        char *hd = malloc((size_t)n);
        if (hd)
            memcpy(hd, head, (size_t)n);
        rc = hd ? s_write(c, hd, (size_t)n, bdata, blen) : ML_ENOMEM;
        if (!hd)
            free(bdata);
    }
    if (rc != 0)
        s_conn_close(c);
    else if (c->writes == 0)
        s_response_done(c);
}

/* A reply that ends the connection (an error the request itself caused). */
static void s_send_error(s_conn_t *c, int status, const char *extra, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void s_send_error(s_conn_t *c, int status, const char *extra, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    ml_sbuf_t body;
    ml_sbuf_init(&body, ML_HTTP_BODY_MAX);
    ml_sbuf_printf(&body, "%s\n", msg);
    c->close_after = 1;
    /* Nothing more is parsed on this connection. (http_parser_pause
     * asserts on a parser in an error state: only an intact one is
     * paused.) */
    if (HTTP_PARSER_ERRNO(&c->parser) == HPE_OK)
        http_parser_pause(&c->parser, 1);
    s_send(c, status, "text/plain; charset=utf-8", NULL, extra, &body, 0);
}

/* ------------------------------------------------------------------ */
/* Routing                                                             */

static void s_readyz(ml_broker_t *b, ml_http_resp_t *resp)
{
    char why[400];
    ml_query_ready_t r;
    ml_query_ready(b, &r);
    if (!r.listening) {
        ml_http_error(resp, 503, "not ready: the broker does not listen for agents");
        return;
    }
    if (!r.store_open) {
        ml_http_error(resp, 503, "not ready: the store is not open");
        return;
    }
    int rc = ml_query_store_health(b, why, sizeof why);
    if (rc != 0) {
        ml_http_error(resp, 503, "not ready: %s", why[0] ? why : "the store cannot write");
        return;
    }
    if (r.backlog_full) {
        ml_http_error(resp, 503,
                      "not ready: the store's backlog is full (%llu messages waiting to be "
                      "written)",
                      (unsigned long long)r.puts_pending);
        return;
    }
    resp->status = 200;
    resp->content_type = "text/plain; charset=utf-8";
    ml_sbuf_puts(&resp->body, "ready\n");
}

/* Empties resp for the next handler (one that declined may have begun). */
static void s_resp_reset(ml_http_resp_t *resp)
{
    ml_sbuf_free(&resp->body);
    resp->body.failed = 0;
    resp->status = 0;
    resp->content_type = NULL;
    resp->cache_control = NULL;
}

static void s_route(ml_broker_t *b, s_conn_t *c, const ml_http_req_t *rq, ml_http_resp_t *resp)
{
    if (c->tls) {
        /* The certificate verified against the community CA (and CRL);
         * what it may see is decided by the registry as it is now, so a
         * reload that removes an ops node shuts it out at once. */
        char why[512];
        if (ml_tls_session_recheck(c->tls, ml_query_tls(b), why, sizeof why) != 0) {
            /* Revoked (a CRL reloaded) while this keep-alive connection
             * was open: as a new handshake would be refused. */
            ml_http_error(resp, 403, "forbidden: %s", why);
            c->close_after = 1;
            return;
        }
        const ml_node_t *n = ml_broker_config_node(ml_query_config(b), c->peer);
        if (!n) {
            ml_http_error(resp, 403, "forbidden: %s is not a registered node", c->peer);
            return;
        }
        if (n->role != ML_ROLE_OPS) {
            ml_http_error(resp, 403,
                          "forbidden: %s is a %s node; this endpoint serves OPS nodes only",
                          c->peer, ml_role_name(n->role));
            return;
        }
    }
    if (strcmp(rq->path, "/healthz") == 0) {
        resp->status = 200;
        resp->content_type = "text/plain; charset=utf-8";
        ml_sbuf_puts(&resp->body, "ok\n");
        return;
    }
    if (strcmp(rq->path, "/readyz") == 0) {
        s_readyz(b, resp);
        return;
    }
    if (strcmp(rq->path, "/metrics") == 0) {
        resp->status = 200;
        resp->content_type = "text/plain; version=0.0.4; charset=utf-8";
        ml_bk_prom_render(b, &resp->body);
        return;
    }
    if (ml_bk_web(b, rq, resp) == 0)
        return;
    s_resp_reset(resp);
    if (strncmp(rq->path, "/api/v1/", 8) == 0) {
        if (ml_bk_api(b, rq, resp) == 0)
            return;
        s_resp_reset(resp);
    }
    ml_http_error(resp, 404, "not found: %s", rq->path);
}

/* A request is complete (parser callback): answer it. */
static void s_dispatch(s_conn_t *c)
{
    s_server_t *h = c->h;
    /* No more parsing until the reply is written (see the file comment). */
    http_parser_pause(&c->parser, 1);
    c->url[c->url_len] = '\0';
    struct http_parser_url u;
    http_parser_url_init(&u);
    char path[S_HEAD_MAX + 1];
    const char *query = "";
    char qbuf[S_HEAD_MAX + 1];
    if (http_parser_parse_url(c->url, c->url_len, 0, &u) != 0 || !(u.field_set & (1 << UF_PATH))) {
        s_send_error(c, 400, NULL, "bad request: the request target is not a path");
        return;
    }
    int rc = s_pct_decode(c->url + u.field_data[UF_PATH].off, u.field_data[UF_PATH].len, 0, path,
                          sizeof path);
    size_t pl = rc == 0 ? strlen(path) : 0;
    if (rc != 0 || path[0] != '/' || strstr(path, "/../") ||
        (pl >= 3 && strcmp(path + pl - 3, "/..") == 0)) {
        s_send_error(c, 400, NULL, "bad request: the path is malformed");
        return;
    }
    if (u.field_set & (1 << UF_QUERY)) {
        memcpy(qbuf, c->url + u.field_data[UF_QUERY].off, u.field_data[UF_QUERY].len);
        qbuf[u.field_data[UF_QUERY].len] = '\0';
        query = qbuf;
    }
    c->al[c->al_len] = '\0';
    int head_only = c->parser.method == HTTP_HEAD;
    ml_http_req_t rq = {.method = head_only ? "HEAD" : "GET",
                        .path = path,
                        .query = query,
                        .accept_language = c->al,
                        .peer = c->peer};
    ml_http_resp_t resp = {0};
    ml_sbuf_init(&resp.body, ML_HTTP_BODY_MAX);
    s_route(h->b, c, &rq, &resp);
    if (resp.status == 0)
        resp.status = 200;
    if (resp.body.failed)
        ml_log(ML_LOG_WARN, S_COMPONENT,
               "the reply to %s %s could not be built (over %u bytes, or out of memory): 500",
               rq.method, path, (unsigned)ML_HTTP_BODY_MAX);
    if (!http_should_keep_alive(&c->parser) || c->parser.upgrade)
        c->close_after = 1;
    ml_log(ML_LOG_DEBUG, S_COMPONENT, "%s %s %s%s -> %d", c->addr, rq.method, path,
           query[0] ? "?..." : "", resp.status);
    s_send(c, resp.status, resp.content_type, resp.cache_control, NULL, &resp.body, head_only);
    ml_sbuf_free(&resp.body);
}

/* ------------------------------------------------------------------ */
/* Parsing                                                             */

static int s_on_message_begin(http_parser *p)
{
    s_conn_t *c = p->data;
    c->url_len = 0;
    c->field_len = 0;
    c->field_long = 0;
    c->in_value = 0;
    c->field_is_al = 0;
    c->al_len = 0;
    c->reject = 0;
    return 0;
}

static int s_on_url(http_parser *p, const char *at, size_t len)
{
    s_conn_t *c = p->data;
    /* Bounded by S_HEAD_MAX, which the feeder enforces on the whole head. */
    if (len > S_HEAD_MAX - c->url_len)
        return -1;
    memcpy(c->url + c->url_len, at, len);
    c->url_len += len;
    return 0;
}

static int s_on_header_field(http_parser *p, const char *at, size_t len)
{
    s_conn_t *c = p->data;
    if (c->in_value) {
        /* A new header begins. */
        c->in_value = 0;
        c->field_len = 0;
        c->field_long = 0;
    }
    for (size_t i = 0; i < len; i++) {
        if (c->field_len + 1 >= sizeof c->field) {
            c->field_long = 1;
            break;
        }
        char ch = at[i];
        c->field[c->field_len++] = (char)(ch >= 'A' && ch <= 'Z' ? ch + 32 : ch);
    }
    return 0;
}

static int s_on_header_value(http_parser *p, const char *at, size_t len)
{
    s_conn_t *c = p->data;
    if (!c->in_value) {
        c->in_value = 1;
        c->field[c->field_len] = '\0';
        c->field_is_al = !c->field_long && strcmp(c->field, "accept-language") == 0;
        if (c->field_is_al)
            c->al_len = 0; /* the last one counts */
    }
    if (c->field_is_al) {
        size_t room = sizeof c->al - 1 - c->al_len;
        size_t n = len < room ? len : room;
        memcpy(c->al + c->al_len, at, n);
        c->al_len += n;
    }
    return 0;
}

static int s_on_headers_complete(http_parser *p)
{
    s_conn_t *c = p->data;
    if (p->method != HTTP_GET && p->method != HTTP_HEAD) {
        c->reject = 405;
        return -1;
    }
    if ((p->flags & F_CHUNKED) || p->uses_transfer_encoding ||
        (p->content_length != 0 && p->content_length != ULLONG_MAX)) {
        c->reject = 413;
        return -1;
    }
    return 0;
}

static int s_on_body(http_parser *p, const char *at, size_t len)
{
    (void)at;
    (void)len;
    s_conn_t *c = p->data;
    c->reject = 413;
    return -1;
}

static int s_on_message_complete(http_parser *p)
{
    s_dispatch(p->data);
    return 0;
}

static const http_parser_settings s_settings = {
    .on_message_begin = s_on_message_begin,
    .on_url = s_on_url,
    .on_header_field = s_on_header_field,
    .on_header_value = s_on_header_value,
    .on_headers_complete = s_on_headers_complete,
    .on_body = s_on_body,
    .on_message_complete = s_on_message_complete,
};

/* Keeps data (what follows the request being answered) for later. */
static void s_keep(s_conn_t *c, const char *data, size_t len)
{
    if (len == 0)
        return;
    char *p = malloc(len);
    if (!p) {
        s_conn_close(c);
        return;
    }
    memcpy(p, data, len);
    free(c->pending);
    c->pending = p;
    c->pending_len = len;
}

/* Parses plaintext from the client. Stops at the end of a request (which
 * is then answered) and keeps the rest. */
static void s_feed(s_conn_t *c, const char *data, size_t len)
{
    size_t off = 0;
    while (off < len && !c->closing && !c->responding) {
        /* At most what the head may still have, so that a head over
         * S_HEAD_MAX is caught before the parser has seen more of it. */
        size_t room = S_HEAD_MAX - c->msg_bytes;
        size_t n = len - off < room ? len - off : room;
        size_t used = http_parser_execute(&c->parser, &s_settings, data + off, n);
        enum http_errno e = HTTP_PARSER_ERRNO(&c->parser);
        off += used;
        c->msg_bytes += used;
        if (e == HPE_PAUSED) {
            /* A request is being answered (or was refused). */
            if (!c->close_after)
                s_keep(c, data + off, len - off);
            return;
        }
        if (e != HPE_OK) {
            if (c->reject == 405)
                s_send_error(c, 405, "Allow: GET, HEAD\r\n",
                             "method not allowed: this endpoint is read-only (GET, HEAD)");
            else if (c->reject == 413)
                s_send_error(c, 413, NULL, "content too large: requests have no body here");
            else
                s_send_error(c, 400, NULL, "bad request: %s", http_errno_description(e));
            return;
        }
        if (used < n) {
            /* Stopped without an error or a pause: an upgrade (the bytes
             * after it are not HTTP), which this server does not do. */
            s_send_error(c, 400, NULL, "bad request: protocol upgrades are not supported");
            return;
        }
        if (c->msg_bytes >= S_HEAD_MAX) {
            s_send_error(c, 431, NULL, "request header fields too large: at most %d bytes",
                         S_HEAD_MAX);
            return;
        }
    }
}

/* Plaintext OpenSSL holds: parse it while no request is being answered. */
static void s_tls_drain(s_conn_t *c)
{
    s_server_t *h = c->h;
    while (!c->closing && !c->responding && c->tls) {
        int n = ml_tls_session_read(c->tls, (uint8_t *)h->pbuf, sizeof h->pbuf);
        if (n == 0)
            break;
        if (n < 0) {
            s_conn_close(c);
            return;
        }
        s_feed(c, h->pbuf, (size_t)n);
    }
}

/* The reply's last byte has been written. */
static void s_response_done(s_conn_t *c)
{
    c->responding = 0;
    if (c->close_after) {
        if (c->tls && !c->tls_closed && ml_tls_session_established(c->tls)) {
            c->tls_closed = 1;
            ml_tls_session_close(c->tls);
            s_tls_flush(c);
        }
        if (c->writes == 0)
            s_linger(c);
        else
            c->responding = 1; /* the close_notify is on its way */
        return;
    }
    /* Keep-alive: the next request within S_REQUEST_MS. */
    c->msg_bytes = 0;
    uv_timer_again(&c->timer);
    http_parser_pause(&c->parser, 0);
    char *p = c->pending;
    size_t len = c->pending_len;
    c->pending = NULL;
    c->pending_len = 0;
    if (p) {
        s_feed(c, p, len);
        free(p);
    }
    if (c->tls)
        s_tls_drain(c);
    if (!c->closing && !c->responding &&
        uv_read_start((uv_stream_t *)&c->tcp, s_alloc_cb, s_read_cb) != 0)
        s_conn_close(c);
}

/* ------------------------------------------------------------------ */
/* Connections                                                         */

static void s_alloc_cb(uv_handle_t *hd, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    s_conn_t *c = hd->data;
    *buf = uv_buf_init(c->h->rbuf, sizeof c->h->rbuf);
}

static void s_timer_cb(uv_timer_t *t)
{
    s_conn_t *c = t->data;
    if (c->closing)
        return;
    if (c->responding || c->lingering || c->msg_bytes == 0 ||
        (c->tls && !ml_tls_session_established(c->tls))) {
        /* Idle, a reply not read, a handshake not finished: nothing to
         * say, or no one listening. */
        s_conn_close(c);
        return;
    }
    s_send_error(c, 408, NULL, "request timeout: a request must arrive within %d s",
                 S_REQUEST_MS / 1000);
}

static void s_read_cb(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf)
{
    s_conn_t *c = st->data;
    if (c->closing)
        return;
    if (nread < 0) {
        s_conn_close(c);
        return;
    }
    if (nread == 0 || c->lingering)
        return;
    if (!c->tls) {
        s_feed(c, buf->base, (size_t)nread);
        return;
    }
    int rc = ml_tls_session_feed(c->tls, (const uint8_t *)buf->base, (size_t)nread);
    /* Handshake messages, or the alert of a refused handshake. */
    int frc = s_tls_flush(c);
    if (rc == ML_ETLS && c->peer[0]) {
        /* A broken record after the handshake: nothing to answer. */
        ml_log(ML_LOG_DEBUG, S_COMPONENT, "TLS session with %s (%s) failed: %s", c->addr, c->peer,
               ml_tls_session_error(c->tls));
        s_conn_close(c);
        return;
    }
    if (rc == ML_ETLS) {
        uint64_t dropped = 0;
        s_server_t *h = c->h;
        if (ml_loglimit_take(&h->refusals, ml_mono_ms(), &dropped))
            ml_log(ML_LOG_WARN, S_COMPONENT, "TLS handshake from %s (%s) refused: %s%s", c->addr,
                   ml_tls_session_peer_cn(c->tls)[0] ? ml_tls_session_peer_cn(c->tls)
                                                     : "no certificate",
                   ml_tls_session_error(c->tls), dropped ? " (and earlier ones not logged)" : "");
        h->stats.tls_refused++;
        /* Let the alert go out, then close. */
        c->close_after = 1;
        c->responding = 1;
        uv_read_stop(st);
        if (c->writes == 0)
            s_conn_close(c);
        return;
    }
    if (rc < 0 || frc < 0) {
        s_conn_close(c);
        return;
    }
    if (!ml_tls_session_established(c->tls))
        return;
    if (!c->peer[0]) {
        const char *id = ml_tls_session_peer_id(c->tls);
        snprintf(c->peer, sizeof c->peer, "%s", id ? id : "");
    }
    s_tls_drain(c);
}

static void s_reject_close_cb(uv_handle_t *hd)
{
    s_server_t *h = hd->data;
    free(hd);
    s_server_release(h);
}

static void s_connection_cb(uv_stream_t *server, int status)
{
    s_server_t *h = server->data;
    if (status < 0 || !h->b)
        return;
    if (h->n_conn >= (size_t)h->max_conn) {
        /* Accepted only to be closed: libuv stops listening while a
         * connection waits to be accepted. */
        uv_tcp_t *t = malloc(sizeof *t);
        if (!t)
            return;
        uv_tcp_init(server->loop, t);
        t->data = h;
        h->open_handles++;
        h->stats.refused++;
        uint64_t dropped = 0;
        if (ml_loglimit_take(&h->refusals, ml_mono_ms(), &dropped))
            ml_log(ML_LOG_WARN, S_COMPONENT,
                   "connection refused: %ld open already ([http] max_connections)%s", h->max_conn,
                   dropped ? " (and earlier refusals not logged)" : "");
        uv_accept(server, (uv_stream_t *)t);
        uv_close((uv_handle_t *)t, s_reject_close_cb);
        return;
    }
    s_conn_t *c = calloc(1, sizeof *c);
    if (!c)
        return;
    c->h = h;
    uv_tcp_init(server->loop, &c->tcp);
    uv_timer_init(server->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->handles = 2;
    h->open_handles += 2;
    c->next = h->conns;
    if (h->conns)
        h->conns->prev = c;
    h->conns = c;
    h->n_conn++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        s_conn_close(c);
        return;
    }
    h->stats.connections++;
    struct sockaddr_storage ss;
    int sl = sizeof ss;
    char ip[48] = "?";
    int port = 0;
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET6) {
            uv_ip6_name((struct sockaddr_in6 *)&ss, ip, sizeof ip);
            port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
        } else {
            uv_ip4_name((struct sockaddr_in *)&ss, ip, sizeof ip);
            port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        }
    }
    snprintf(c->addr, sizeof c->addr, "%s:%d", ip, port);
    uv_tcp_nodelay(&c->tcp, 1);
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    if (h->use_tls && !(c->tls = ml_tls_session_new(ml_query_tls(h->b)))) {
        s_conn_close(c);
        return;
    }
    uv_timer_start(&c->timer, s_timer_cb, S_REQUEST_MS, S_REQUEST_MS);
    if (uv_read_start((uv_stream_t *)&c->tcp, s_alloc_cb, s_read_cb) != 0)
        s_conn_close(c);
}

/* ------------------------------------------------------------------ */
/* Start and stop                                                      */

static void s_listener_close_cb(uv_handle_t *hd)
{
    s_server_release(hd->data);
}

/* 1 when the address is a loopback one. */
static int s_loopback(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
    const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
    if (IN6_IS_ADDR_LOOPBACK(a))
        return 1;
    return IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127;
}

int ml_bk_http_start(ml_broker_t *b, char *err, size_t errlen)
{
    const ml_broker_config_t *cfg = ml_query_config(b);
    const char *v = cfg->http_listen;
    if (!v || !*v)
        return 0;
    if (cfg->http_tls && !ml_query_tls(b)) {
        snprintf(err, errlen, "[http] tls = yes needs the broker's TLS context");
        return ML_ECONFIG;
    }
    /* config.c has checked the form: ADDRESS:PORT, IPv6 in brackets. */
    const char *colon = strrchr(v, ':');
    char host[64];
    size_t hl = colon ? (size_t)(colon - v) : 0;
    if (!colon || hl < 1 || hl >= sizeof host) {
        snprintf(err, errlen, "[http] listen = %s: expected ADDRESS:PORT", v);
        return ML_ECONFIG;
    }
    memcpy(host, v, hl);
    host[hl] = '\0';
    int port = atoi(colon + 1);
    struct sockaddr_storage ss;
    int uvrc;
    if (host[0] == '[') {
        host[hl - 1] = '\0';
        uvrc = uv_ip6_addr(host + 1, port, (struct sockaddr_in6 *)&ss);
    } else {
        uvrc = uv_ip4_addr(host, port, (struct sockaddr_in *)&ss);
    }
    if (uvrc != 0) {
        snprintf(err, errlen, "[http] listen = %s: not an address: %s", v, uv_strerror(uvrc));
        return ML_ECONFIG;
    }
    s_server_t *h = calloc(1, sizeof *h);
    if (!h) {
        snprintf(err, errlen, "out of memory");
        return ML_ENOMEM;
    }
    h->b = b;
    h->use_tls = cfg->http_tls;
    h->max_conn = cfg->http_max_connections > 0 ? cfg->http_max_connections : 64;
    ml_query_set_http(b, (struct ml_bk_http *)h);
    uv_tcp_init(ml_query_loop(b), &h->listener);
    h->listener.data = h;
    h->open_handles = 1;
    /* libuv reports a port in use by bind or only by listen, as it can. */
    if ((uvrc = uv_tcp_bind(&h->listener, (struct sockaddr *)&ss, 0)) != 0 ||
        (uvrc = uv_listen((uv_stream_t *)&h->listener, 128, s_connection_cb)) != 0) {
        snprintf(err, errlen, "[http] listen = %s: cannot listen there: %s", v, uv_strerror(uvrc));
        return ML_EIO;
    }
    struct sockaddr_storage bound;
    int bl = sizeof bound;
    if (uv_tcp_getsockname(&h->listener, (struct sockaddr *)&bound, &bl) == 0) {
        char ip[48] = "?";
        if (bound.ss_family == AF_INET6) {
            uv_ip6_name((struct sockaddr_in6 *)&bound, ip, sizeof ip);
            snprintf(h->addr, sizeof h->addr, "[%s]:%d", ip,
                     ntohs(((struct sockaddr_in6 *)&bound)->sin6_port));
        } else {
            uv_ip4_name((struct sockaddr_in *)&bound, ip, sizeof ip);
            snprintf(h->addr, sizeof h->addr, "%s:%d", ip,
                     ntohs(((struct sockaddr_in *)&bound)->sin_port));
        }
    } else {
        snprintf(h->addr, sizeof h->addr, "%s", v);
    }
    ml_log(ML_LOG_INFO, S_COMPONENT, "listening on %s (%s, at most %ld connections)", h->addr,
           h->use_tls ? "HTTPS, client certificates of OPS nodes" : "plain HTTP", h->max_conn);
    if (!s_loopback((struct sockaddr *)&ss))
        ml_log(ML_LOG_WARN, S_COMPONENT,
               "[http] listen = %s is not a loopback address: whoever reaches it sees the "
               "community's operational data%s",
               v, h->use_tls ? "" : " (set [http] tls = yes to require OPS certificates)");
    return 0;
}

void ml_bk_http_stop(ml_broker_t *b)
{
    s_server_t *h = (s_server_t *)ml_query_http(b);
    if (!h)
        return;
    ml_query_set_http(b, NULL);
    h->b = NULL;
    h->stopped = 1;
    while (h->conns)
        s_conn_close(h->conns);
    /* Frees h once the last handle has closed (maybe within the next loop
     * run, after b is gone: nothing there uses b). */
    uv_close((uv_handle_t *)&h->listener, s_listener_close_cb);
}

const char *ml_bk_http_address(const ml_broker_t *b)
{
    const s_server_t *h = (const s_server_t *)ml_query_http(b);
    return h ? h->addr : "";
}

void ml_bk_http_stats(const ml_broker_t *b, ml_bk_http_stats_t *out)
{
    const s_server_t *h = (const s_server_t *)ml_query_http(b);
    memset(out, 0, sizeof *out);
    if (!h)
        return;
    *out = h->stats;
    out->open = h->n_conn;
}
