/* Fuzz target: the record framer (lib/ml_frame.c), the first code that
 * sees a peer's decrypted bytes.
 *
 * Input: byte 0 picks the record limit (small, so that oversize headers
 * are common), bytes 1-8 seed the split; the rest is the stream. The
 * stream is fed in pieces of random size (1 byte to all of it), and after
 * each piece the records are taken either at once or only after several
 * more pieces (coalesced in the reader's buffer), as a session's reads
 * happen to fall. A reference parser that sees the whole stream at once
 * says what must come out: the same records, in order, with the same
 * bytes; nothing at all once a header announces more than the limit (the
 * stream is then dead, and records not yet taken are lost with it, as the
 * header file says); pending() and finish() agreeing with what is left.
 * Any difference aborts. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "ml_common.h"
#include "ml_frame.h"

#define S_FAIL(...) ml_fuzz_fail("fuzz_frame", __VA_ARGS__)

static uint32_t s_be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* What the reference parser found: records as (offset, length) into the
 * stream, where the stream goes bad (an oversize header ends at bad_at),
 * and how many bytes of a partial record are left at the end. */
typedef struct {
    size_t *off;
    size_t *len;
    size_t n;
    size_t bad_at; /* offset just past the oversize header, 0 when none */
    size_t tail;   /* bytes of the unfinished record at the end */
} s_ref_t;

static void s_reference(const uint8_t *s, size_t n, size_t max, s_ref_t *r)
{
    size_t cap = n / 4 + 1, at = 0;
    r->off = malloc(cap * sizeof *r->off);
    r->len = malloc(cap * sizeof *r->len);
    r->n = 0;
    r->bad_at = 0;
    r->tail = 0;
    if (!r->off || !r->len)
        abort();
    while (at < n) {
        if (n - at < 4) {
            r->tail = n - at;
            return;
        }
        uint32_t body = s_be32(s + at);
        if (body > max) {
            r->bad_at = at + 4;
            return;
        }
        if (n - at - 4 < body) {
            r->tail = n - at;
            return;
        }
        r->off[r->n] = at + 4;
        r->len[r->n] = body;
        r->n++;
        at += 4 + (size_t)body;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ml_fuzz_in_t in = {data, size};
    static const size_t limits[] = {0, 1, 4, 16, 255, 4096, 65536, ML_FRAME_DEFAULT_MAX};
    uint8_t sel = ml_fuzz_u8(&in);
    size_t max = limits[sel & 7];
    /* A limit above 32 bits is clamped by the reader; exercise that too. */
    if (sel & 0x80)
        max = (size_t)1 << 33;
    ml_fuzz_rng_t rng;
    uint64_t seed = ((uint64_t)ml_fuzz_u32(&in) << 32) | ml_fuzz_u32(&in);
    ml_fuzz_rng_seed(&rng, seed);
    const uint8_t *s = in.p;
    size_t n = in.n;

    s_ref_t ref;
    s_reference(s, n, max, &ref);

    ml_frame_reader_t *r = ml_frame_reader_new(max);
    if (!r)
        abort();
    size_t fed = 0, taken = 0, pieces = 0;
    int dead = 0;
    while (fed < n) {
        size_t left = n - fed;
        uint64_t x = ml_fuzz_rng_next(&rng);
        size_t piece;
        switch (x & 3) {
        case 0:
            piece = 1;
            break;
        case 1:
            piece = 1 + (size_t)((x >> 8) % 8);
            break;
        case 2:
            piece = 1 + (size_t)((x >> 8) % 4096);
            break;
        default:
            piece = left;
            break;
        }
        if (piece > left)
            piece = left;
        int rc = ml_frame_reader_feed(r, s + fed, piece);
        fed += piece;
        pieces++;
        if (rc == ML_ETOOBIG) {
            if (!ref.bad_at || fed < ref.bad_at)
                S_FAIL("feed refused the stream at byte %zu, the reference does not", fed);
            dead = 1;
            break;
        }
        if (rc != 0)
            S_FAIL("feed returned %d", rc);
        if (ref.bad_at && fed >= ref.bad_at)
            S_FAIL("feed took an oversize header (ends at %zu) without refusing it", ref.bad_at);
        /* Take records now, or let them pile up for a few pieces. */
        if (((x >> 32) & 3) == 0 && fed < n)
            continue;
        const uint8_t *rec;
        size_t rlen;
        while ((rc = ml_frame_reader_next(r, &rec, &rlen)) == 1) {
            if (taken >= ref.n)
                S_FAIL("record %zu handed out; the reference has %zu", taken, ref.n);
            if (rlen != ref.len[taken] || (rlen && memcmp(rec, s + ref.off[taken], rlen) != 0))
                S_FAIL("record %zu differs (len %zu, want %zu)", taken, rlen, ref.len[taken]);
            if (ref.off[taken] + rlen > fed)
                S_FAIL("record %zu handed out before all its bytes were fed", taken);
            taken++;
        }
        if (rc != 0)
            S_FAIL("next returned %d on a live stream", rc);
    }
    if (dead) {
        const uint8_t *rec;
        size_t rlen;
        if (ml_frame_reader_next(r, &rec, &rlen) != ML_ETOOBIG ||
            ml_frame_reader_feed(r, (const uint8_t *)"x", 1) != ML_ETOOBIG)
            S_FAIL("a dead stream came back to life");
    } else {
        if (ref.bad_at)
            S_FAIL("the oversize header at %zu was never refused", ref.bad_at);
        const uint8_t *rec;
        size_t rlen;
        if (taken != ref.n)
            S_FAIL("%zu records taken, the reference has %zu (%zu pieces)", taken, ref.n, pieces);
        if (ml_frame_reader_next(r, &rec, &rlen) != 0)
            S_FAIL("a record appeared from nowhere");
        if (ml_frame_reader_pending(r) != ref.tail)
            S_FAIL("pending %zu, want %zu", ml_frame_reader_pending(r), ref.tail);
        if ((ml_frame_reader_finish(r) == ML_ETRUNC) != (ref.tail > 0))
            S_FAIL("finish disagrees with a tail of %zu bytes", ref.tail);
    }
    ml_frame_reader_destroy(&r);
    ml_frame_reader_destroy(&r); /* safe twice, as promised */

    /* The writer: a header it writes reads back as the same length. */
    uint8_t hdr[ML_FRAME_HEADER];
    size_t want = (size_t)(seed & 0xffffffffu);
    if (ml_frame_write_header(hdr, want) != 0 || s_be32(hdr) != want)
        S_FAIL("header for %zu does not read back", want);
    if (ml_frame_write_header(hdr, (size_t)1 << 32) != ML_ETOOBIG)
        S_FAIL("a 2^32 length was accepted");
    free(ref.off);
    free(ref.len);
    return 0;
}
