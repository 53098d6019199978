/* Length-prefixed record reader and header writer. The reader keeps one
 * buffer with three offsets: `start` (first byte of the oldest complete
 * record not yet taken), `hdr` (first byte of the record still arriving) and
 * `end` (one past the last byte fed). Everything in [start, hdr) is whole,
 * already validated records; [hdr, end) is the partial record. Each header
 * is checked against the maximum the moment its fourth byte arrives, so an
 * oversized record is refused before a single byte of its body is stored.
 * Taken records are not moved out of the way one by one (that is O(n^2) when
 * a feed holds many small records); the buffer is rewound for free when it
 * empties and compacted only when that is cheaper than growing. */
#include "ml_frame.h"

#include <stdlib.h>
#include <string.h>

#include "ml_common.h"

struct ml_frame_reader {
    uint8_t *buf;
    size_t cap;
    size_t start; /* next complete record to hand out */
    size_t hdr;   /* header of the record being received */
    size_t end;   /* end of buffered bytes */
    size_t max;   /* largest accepted record body */
    int failed;   /* a header announced more than max: the stream is dead */
    /* The first bytes of a refused record's body that came in the same feed
     * as its header, so the caller can name the message it refused. */
    uint8_t head[ML_FRAME_HEAD_KEEP];
    size_t head_len;
};

static uint32_t s_get_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

ml_frame_reader_t *ml_frame_reader_new(size_t max_record)
{
    ml_frame_reader_t *self = calloc(1, sizeof *self);
    if (!self)
        return NULL;
    /* The header cannot announce more than 32 bits anyway. */
    self->max = max_record > UINT32_MAX ? UINT32_MAX : max_record;
    return self;
}

void ml_frame_reader_destroy(ml_frame_reader_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    free((*self_p)->buf);
    free(*self_p);
    *self_p = NULL;
}

/* Makes room for len more bytes at the end. Compacts (moves the live bytes
 * to the front) only when the bytes moved are no more than the bytes freed,
 * so each byte is moved O(1) times amortised; otherwise doubles into a new
 * buffer, copying only the live bytes. */
static int s_reserve(ml_frame_reader_t *self, size_t len)
{
    size_t live = self->end - self->start;
    if (self->cap - self->end >= len)
        return 0;
    if (len > SIZE_MAX - live)
        return ML_ENOMEM;
    if (self->start >= live && self->cap - live >= len) {
        memmove(self->buf, self->buf + self->start, live);
        self->hdr -= self->start;
        self->end -= self->start;
        self->start = 0;
        return 0;
    }
    size_t want = live + len;
    size_t cap = self->cap ? self->cap : 4096;
    while (cap < want)
        cap = cap > SIZE_MAX / 2 ? want : cap * 2;
    uint8_t *nbuf = malloc(cap);
    if (!nbuf)
        return ML_ENOMEM;
    if (live)
        memcpy(nbuf, self->buf + self->start, live);
    free(self->buf);
    self->buf = nbuf;
    self->cap = cap;
    self->hdr -= self->start;
    self->end -= self->start;
    self->start = 0;
    return 0;
}

int ml_frame_reader_feed(ml_frame_reader_t *self, const uint8_t *data, size_t len)
{
    if (self->failed)
        return ML_ETOOBIG;
    if (len == 0)
        return 0;
    int rc = s_reserve(self, len);
    if (rc < 0)
        return rc;
    /* Walk the new bytes record by record: complete the pending header,
     * check it, then take at most the body it announced. */
    while (len > 0) {
        size_t have = self->end - self->hdr;
        size_t take;
        if (have < ML_FRAME_HEADER) {
            take = ML_FRAME_HEADER - have;
            if (take > len)
                take = len;
            memcpy(self->buf + self->end, data, take);
            self->end += take;
            data += take;
            len -= take;
            if (self->end - self->hdr < ML_FRAME_HEADER)
                break;
            if (s_get_be32(self->buf + self->hdr) > self->max) {
                self->failed = 1;
                self->head_len = len < ML_FRAME_HEAD_KEEP ? len : ML_FRAME_HEAD_KEEP;
                memcpy(self->head, data, self->head_len);
                return ML_ETOOBIG;
            }
            have = ML_FRAME_HEADER;
        }
        size_t body = s_get_be32(self->buf + self->hdr);
        size_t missing = ML_FRAME_HEADER + body - have;
        int whole = missing <= len;
        take = whole ? missing : len;
        memcpy(self->buf + self->end, data, take);
        self->end += take;
        data += take;
        len -= take;
        if (whole)
            self->hdr = self->end;
    }
    return 0;
}

int ml_frame_reader_next(ml_frame_reader_t *self, const uint8_t **rec, size_t *len)
{
    if (self->failed)
        return ML_ETOOBIG;
    if (self->start == self->hdr) {
        /* Nothing whole is left; if nothing partial either, rewind. Only
         * the offsets change, so a record handed out earlier stays valid
         * until the next feed, as promised. */
        if (self->hdr == self->end)
            self->start = self->hdr = self->end = 0;
        return 0;
    }
    size_t body = s_get_be32(self->buf + self->start);
    *rec = self->buf + self->start + ML_FRAME_HEADER;
    *len = body;
    self->start += ML_FRAME_HEADER + body;
    if (self->start == self->end)
        self->start = self->hdr = self->end = 0;
    return 1;
}

size_t ml_frame_reader_pending(const ml_frame_reader_t *self)
{
    return self->end - self->hdr;
}

int ml_frame_reader_finish(const ml_frame_reader_t *self)
{
    return self->end > self->hdr ? ML_ETRUNC : 0;
}

int ml_frame_write_header(uint8_t hdr[ML_FRAME_HEADER], size_t len)
{
    if ((uint64_t)len > UINT32_MAX)
        return ML_ETOOBIG;
    hdr[0] = (uint8_t)(len >> 24);
    hdr[1] = (uint8_t)(len >> 16);
    hdr[2] = (uint8_t)(len >> 8);
    hdr[3] = (uint8_t)len;
    return 0;
}

size_t ml_frame_reader_refused_head(const ml_frame_reader_t *self, const uint8_t **head)
{
    *head = self->head;
    return self->failed ? self->head_len : 0;
}
