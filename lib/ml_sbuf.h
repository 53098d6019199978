/* A growable byte buffer for text the programs build in memory (an HTTP
 * reply, a metrics page, a JSON document), with a hard cap so that no
 * request or peer can make it grow past what its caller allows. Once an
 * append fails (the cap, or out of memory) the buffer is marked failed and
 * every later append is refused too, so a caller may append many pieces and
 * check once at the end. Not thread-safe; one owner. */
#ifndef ML_SBUF_H
#define ML_SBUF_H

#include <stddef.h>

typedef struct {
    char *data; /* NUL-terminated while not failed; NULL until the first append */
    size_t len;
    size_t cap;
    size_t max; /* most bytes it may hold (0: no cap) */
    int failed; /* an append was refused: ML_ENOMEM or ML_ETOOBIG */
} ml_sbuf_t;

/* An empty buffer that may hold at most max bytes (0: no cap). */
void ml_sbuf_init(ml_sbuf_t *b, size_t max);
/* Appends len bytes. Returns 0, or ML_ETOOBIG past the cap, ML_ENOMEM. */
int ml_sbuf_add(ml_sbuf_t *b, const void *p, size_t len);
/* Appends a NUL-terminated string. */
int ml_sbuf_puts(ml_sbuf_t *b, const char *s);
/* Appends formatted text. */
int ml_sbuf_printf(ml_sbuf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends s as the inside of a JSON string (quotes not included): ", \ and
 * control characters escaped; s must be valid UTF-8 (see ml_text.h). */
int ml_sbuf_json_str(ml_sbuf_t *b, const char *s);
/* Hands the data over (the caller frees it) and empties the buffer. NULL
 * when failed; an empty buffer gives "". *len (when not NULL) is set. */
char *ml_sbuf_take(ml_sbuf_t *b, size_t *len);
/* Frees what it holds and empties it (max is kept). */
void ml_sbuf_free(ml_sbuf_t *b);

#endif
