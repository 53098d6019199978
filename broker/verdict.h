/* A verdict: what a lower module decided about a message, returned to the
 * module that owns the session, which refuses, holds or accepts. {code, a
 * Medlink__V1__NackCode or 0 to go on; transient, whether the sender should
 * send it again later, ml_nack_is_transient (it is then refused for now and holds the sender's
 * later messages to the same recipient, wire.h); reason, a sentence for
 * people that never quotes field values}. Header only; no broker behind
 * it. */
#ifndef ML_BK_VERDICT_H
#define ML_BK_VERDICT_H

#include <stdarg.h>
#include <stdio.h>

#include "ml_nack.h"

typedef struct {
    int code;
    int transient;
    char reason[320];
} ml_verdict_t;

#define ML_VERDICT_OK ((ml_verdict_t){0})

/* Fills v with code, its transience and the formatted reason (cut at 319
 * bytes). Returns code. */
static inline int ml_verdict_set(ml_verdict_t *v, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static inline int ml_verdict_set(ml_verdict_t *v, int code, const char *fmt, ...)
{
    va_list ap;
    v->code = code;
    v->transient = ml_nack_is_transient(code);
    va_start(ap, fmt);
    vsnprintf(v->reason, sizeof v->reason, fmt, ap);
    va_end(ap);
    return code;
}

#endif
