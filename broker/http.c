/* medlinkd's HTTP endpoint (see http.h). */
#include "http.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "broker_int.h"

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

int ml_http_query_get(const char *query, const char *name, char *out, size_t outlen)
{
    (void)query;
    (void)name;
    (void)out;
    (void)outlen;
    return 0;
}

int ml_bk_http_start(ml_broker_t *b, char *err, size_t errlen)
{
    (void)b;
    (void)err;
    (void)errlen;
    return 0;
}

void ml_bk_http_stop(ml_broker_t *b)
{
    (void)b;
}

const char *ml_bk_http_address(const ml_broker_t *b)
{
    (void)b;
    return "";
}
