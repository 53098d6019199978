/* medlinkd's HTTP endpoint for ops staff and their tools ([http] listen,
 * 127.0.0.1:9474 by default): /healthz, /readyz, /metrics (Prometheus),
 * /api/v1/... (the JSON medlinkctl --json prints) and the web status page.
 * It runs on the broker's libuv loop, with bounded buffers and timeouts per
 * connection, so no client can block the loop or cost the broker unbounded
 * memory; optional TLS with client certificates of the community CA and the
 * OPS role (docs/operations.md). Read-only: GET and HEAD. Loop thread only.
 *
 * The server parses requests and calls the handlers below, which fill a
 * reply; it writes the reply and frees its body. */
#ifndef ML_BK_HTTP_H
#define ML_BK_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include "ml_sbuf.h"

typedef struct ml_broker ml_broker_t;

/* Most bytes one reply body may have: a handler that would write more
 * fails its buffer (ml_sbuf_t.failed) and the server answers 500. */
#define ML_HTTP_BODY_MAX (8u * 1024 * 1024)

typedef struct {
    const char *method;          /* "GET" or "HEAD" (the server refuses others) */
    const char *path;            /* percent-decoded path, without the query */
    const char *query;           /* the raw query after '?', "" when none */
    const char *accept_language; /* the header's value, "" when absent */
    const char *peer;            /* the client certificate's CN over TLS, "" over plain HTTP */
} ml_http_req_t;

typedef struct {
    int status;                /* 200, 400, 404, 503, ... */
    const char *content_type;  /* a static string */
    const char *cache_control; /* NULL: "no-store" */
    ml_sbuf_t body;            /* initialised by the server with ML_HTTP_BODY_MAX */
} ml_http_resp_t;

/* Sets status, a text/plain body with the formatted sentence and a final
 * newline. Returns 0. */
int ml_http_error(ml_http_resp_t *r, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* The value of name in a query string ("state=SENT&overdue=1"),
 * percent-decoded into out. Returns 1 when present, 0 when absent,
 * ML_EINVAL when it is malformed or longer than outlen - 1. */
int ml_http_query_get(const char *query, const char *name, char *out, size_t outlen);

/* Starts listening on [http] listen (nothing when it is empty). Called by
 * ml_broker_new once the store is open and the broker listens. Returns 0,
 * or ML_ECONFIG / ML_EIO with a sentence in err. */
int ml_bk_http_start(ml_broker_t *b, char *err, size_t errlen);
/* Stops listening and closes every connection (ml_broker_destroy). Its
 * handles close with the loop; nothing of b is used after this returns. */
void ml_bk_http_stop(ml_broker_t *b);
/* The address the endpoint listens on ("127.0.0.1:9474", with the port
 * the system chose when 0 was asked), "" when off. */
const char *ml_bk_http_address(const ml_broker_t *b);

/* What the endpoint has done since start-up (for /metrics). */
typedef struct {
    uint64_t connections; /* accepted and served */
    uint64_t refused;     /* closed at accept: max_connections were open */
    uint64_t tls_refused; /* TLS handshakes that failed (no or a bad certificate) */
    uint64_t requests;    /* replies written, errors included */
    uint64_t open;        /* connections open now */
} ml_bk_http_stats_t;
/* Zeros when the endpoint is off. Loop thread; O(1). */
void ml_bk_http_stats(const ml_broker_t *b, ml_bk_http_stats_t *out);

/* ---- handlers, in the modules that own what they show ----------------- */

/* /api/v1/status, /api/v1/nodes, /api/v1/cases, /api/v1/dlq (admin.c):
 * the JSON medlinkctl --json prints for status, nodes, cases and dlq list,
 * built by the same code. 0 when handled; 1 when the path is not one of
 * them. */
int ml_bk_api(ml_broker_t *b, const ml_http_req_t *rq, ml_http_resp_t *resp);

#endif
