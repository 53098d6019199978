/* Growable, capped text buffer (see ml_sbuf.h). */
#include "ml_sbuf.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ml_common.h"

void ml_sbuf_init(ml_sbuf_t *b, size_t max)
{
    memset(b, 0, sizeof *b);
    b->max = max;
}

/* Room for need more bytes and the NUL after them. */
static int s_reserve(ml_sbuf_t *b, size_t need)
{
    if (b->failed)
        return b->failed;
    if (b->max && (need > b->max || b->len > b->max - need)) {
        b->failed = ML_ETOOBIG;
        return b->failed;
    }
    if (b->len + need + 1 <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + need + 1)
        cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p) {
        b->failed = ML_ENOMEM;
        return b->failed;
    }
    b->data = p;
    b->cap = cap;
    return 0;
}

int ml_sbuf_add(ml_sbuf_t *b, const void *p, size_t len)
{
    int rc = s_reserve(b, len);
    if (rc != 0)
        return rc;
    if (len)
        memcpy(b->data + b->len, p, len);
    b->len += len;
    b->data[b->len] = '\0';
    return 0;
}

int ml_sbuf_puts(ml_sbuf_t *b, const char *s)
{
    return ml_sbuf_add(b, s, strlen(s));
}

int ml_sbuf_printf(ml_sbuf_t *b, const char *fmt, ...)
{
    if (b->failed)
        return b->failed;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->failed = ML_ENOMEM;
        return b->failed;
    }
    int rc = s_reserve(b, (size_t)n);
    if (rc != 0)
        return rc;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

int ml_sbuf_json_str(ml_sbuf_t *b, const char *s)
{
    for (const char *p = s; *p; p++) {
        unsigned char c = (unsigned char)*p;
        int rc;
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            rc = ml_sbuf_add(b, e, 2);
        } else if (c < 0x20 || c == 0x7f) {
            rc = ml_sbuf_printf(b, "\\u%04x", c);
        } else {
            rc = ml_sbuf_add(b, p, 1);
        }
        if (rc != 0)
            return rc;
    }
    return b->failed;
}

char *ml_sbuf_take(ml_sbuf_t *b, size_t *len)
{
    if (b->failed) {
        ml_sbuf_free(b);
        if (len)
            *len = 0;
        return NULL;
    }
    char *d = b->data ? b->data : strdup("");
    if (len)
        *len = d ? b->len : 0;
    size_t max = b->max;
    ml_sbuf_init(b, max);
    return d;
}

void ml_sbuf_free(ml_sbuf_t *b)
{
    size_t max = b->max;
    free(b->data);
    ml_sbuf_init(b, max);
}
