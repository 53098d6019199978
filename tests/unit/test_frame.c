/* Unit tests for the length-prefixed record reader (lib/ml_frame.c): any split
 * of the byte stream, coalesced records, limits checked before buffering,
 * and truncation detected at end of stream. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "ml_common.h"
#include "ml_frame.h"

/* Appends one record (header + body) to out at *off. */
static void s_put_record(uint8_t *out, size_t *off, const uint8_t *body, size_t len)
{
    cr_assert_eq(ml_frame_write_header(out + *off, len), 0);
    *off += ML_FRAME_HEADER;
    if (len)
        memcpy(out + *off, body, len);
    *off += len;
}

Test(frame, single_record)
{
    ml_frame_reader_t *r = ml_frame_reader_new(ML_FRAME_DEFAULT_MAX);
    cr_assert_not_null(r);
    uint8_t wire[64];
    size_t n = 0;
    s_put_record(wire, &n, (const uint8_t *)"hello", 5);

    cr_assert_eq(ml_frame_reader_feed(r, wire, n), 0);
    const uint8_t *rec = NULL;
    size_t len = 0;
    cr_assert_eq(ml_frame_reader_next(r, &rec, &len), 1);
    cr_assert_eq(len, 5);
    cr_assert_arr_eq(rec, "hello", 5);
    cr_assert_eq(ml_frame_reader_next(r, &rec, &len), 0);
    cr_assert_eq(ml_frame_reader_pending(r), 0);
    cr_assert_eq(ml_frame_reader_finish(r), 0);

    ml_frame_reader_destroy(&r);
    cr_assert_null(r);
    ml_frame_reader_destroy(&r); /* safe twice */
    ml_frame_reader_destroy(NULL);
}

Test(frame, split_at_every_offset)
{
    /* Two records so that the split also lands between them. */
    uint8_t body1[300], body2[7];
    for (size_t i = 0; i < sizeof body1; i++)
        body1[i] = (uint8_t)(i * 7 + 1);
    memcpy(body2, "medlink", 7);
    uint8_t wire[400];
    size_t n = 0;
    s_put_record(wire, &n, body1, sizeof body1);
    s_put_record(wire, &n, body2, sizeof body2);

    for (size_t cut = 0; cut <= n; cut++) {
        ml_frame_reader_t *r = ml_frame_reader_new(1024);
        cr_assert_not_null(r);
        const uint8_t *rec;
        size_t len;
        int got = 0;

        cr_assert_eq(ml_frame_reader_feed(r, wire, cut), 0);
        while (ml_frame_reader_next(r, &rec, &len) == 1) {
            cr_assert_eq(len, got == 0 ? sizeof body1 : sizeof body2, "cut %zu", cut);
            cr_assert_arr_eq(rec, got == 0 ? body1 : body2, len, "cut %zu", cut);
            got++;
        }
        /* Only a cut on a record boundary leaves a clean stream. */
        int boundary = cut == 0 || cut == ML_FRAME_HEADER + sizeof body1 || cut == n;
        cr_assert_eq(ml_frame_reader_finish(r), boundary ? 0 : ML_ETRUNC, "cut %zu", cut);
        cr_assert_eq(ml_frame_reader_feed(r, wire + cut, n - cut), 0);
        while (ml_frame_reader_next(r, &rec, &len) == 1) {
            cr_assert_eq(len, got == 0 ? sizeof body1 : sizeof body2, "cut %zu", cut);
            cr_assert_arr_eq(rec, got == 0 ? body1 : body2, len, "cut %zu", cut);
            got++;
        }
        cr_assert_eq(got, 2, "cut %zu", cut);
        cr_assert_eq(ml_frame_reader_finish(r), 0, "cut %zu", cut);
        ml_frame_reader_destroy(&r);
    }
}

Test(frame, byte_by_byte)
{
    uint8_t wire[64];
    size_t n = 0;
    s_put_record(wire, &n, (const uint8_t *)"abc", 3);
    s_put_record(wire, &n, NULL, 0);
    s_put_record(wire, &n, (const uint8_t *)"defgh", 5);

    ml_frame_reader_t *r = ml_frame_reader_new(16);
    const uint8_t *rec;
    size_t len, total = 0;
    int got = 0;
    for (size_t i = 0; i < n; i++) {
        cr_assert_eq(ml_frame_reader_feed(r, wire + i, 1), 0);
        while (ml_frame_reader_next(r, &rec, &len) == 1) {
            total += len;
            got++;
        }
    }
    cr_assert_eq(got, 3);
    cr_assert_eq(total, 8);
    cr_assert_eq(ml_frame_reader_finish(r), 0);
    ml_frame_reader_destroy(&r);
}

Test(frame, many_coalesced_records)
{
    /* 100000 small records in one feed: the reader must hand them out in
     * order without quadratic copying (this would take seconds if every
     * next() shifted the remaining bytes). */
    enum { COUNT = 100000 };
    size_t cap = (size_t)COUNT * (ML_FRAME_HEADER + 8);
    uint8_t *wire = malloc(cap);
    cr_assert_not_null(wire);
    size_t n = 0;
    for (uint32_t i = 0; i < COUNT; i++) {
        uint8_t body[8];
        size_t blen = i % 9; /* 0..8 bytes, including empty records */
        for (size_t k = 0; k < blen; k++)
            body[k] = (uint8_t)(i + k);
        s_put_record(wire, &n, body, blen);
    }

    ml_frame_reader_t *r = ml_frame_reader_new(64);
    cr_assert_eq(ml_frame_reader_feed(r, wire, n), 0);
    const uint8_t *rec;
    size_t len;
    for (uint32_t i = 0; i < COUNT; i++) {
        cr_assert_eq(ml_frame_reader_next(r, &rec, &len), 1, "record %u", i);
        cr_assert_eq(len, i % 9, "record %u", i);
        for (size_t k = 0; k < len; k++)
            cr_assert_eq(rec[k], (uint8_t)(i + k), "record %u byte %zu", i, k);
    }
    cr_assert_eq(ml_frame_reader_next(r, &rec, &len), 0);
    cr_assert_eq(ml_frame_reader_finish(r), 0);

    /* Interleaved feeding and taking with a partial record always left
     * over exercises the lazy compaction. */
    for (int round = 0; round < 3; round++) {
        size_t chunk = 4093; /* prime, so records straddle chunks */
        for (size_t off = 0; off < n; off += chunk) {
            size_t l = n - off < chunk ? n - off : chunk;
            cr_assert_eq(ml_frame_reader_feed(r, wire + off, l), 0);
            while (ml_frame_reader_next(r, &rec, &len) == 1)
                ;
        }
    }
    cr_assert_eq(ml_frame_reader_pending(r), 0);
    cr_assert_eq(ml_frame_reader_finish(r), 0);
    ml_frame_reader_destroy(&r);
    free(wire);
}

Test(frame, oversize_refused_before_body)
{
    ml_frame_reader_t *r = ml_frame_reader_new(1000);
    uint8_t hdr[ML_FRAME_HEADER];
    cr_assert_eq(ml_frame_write_header(hdr, 1001), 0);

    /* The first three header bytes are fine; the fourth decides. */
    cr_assert_eq(ml_frame_reader_feed(r, hdr, 3), 0);
    cr_assert_eq(ml_frame_reader_feed(r, hdr + 3, 1), ML_ETOOBIG);
    /* The stream stays refused. */
    uint8_t body[16] = {0};
    cr_assert_eq(ml_frame_reader_feed(r, body, sizeof body), ML_ETOOBIG);
    const uint8_t *rec;
    size_t len;
    cr_assert_eq(ml_frame_reader_next(r, &rec, &len), ML_ETOOBIG);
    ml_frame_reader_destroy(&r);

    /* A record of exactly the maximum passes; a good record followed by an
     * oversized header in the same feed is refused at that header. */
    r = ml_frame_reader_new(1000);
    static const uint8_t body1000[1000];
    uint8_t *wire = calloc(1, 1000 + 2 * ML_FRAME_HEADER + 16);
    size_t n = 0;
    s_put_record(wire, &n, body1000, sizeof body1000);
    cr_assert_eq(ml_frame_write_header(wire + n, 0xFFFFFFFFu), 0);
    n += ML_FRAME_HEADER;
    cr_assert_eq(ml_frame_reader_feed(r, wire, n + 8), ML_ETOOBIG);
    ml_frame_reader_destroy(&r);
    free(wire);
}

Test(frame, zero_length_record)
{
    ml_frame_reader_t *r = ml_frame_reader_new(0);
    uint8_t hdr[ML_FRAME_HEADER];
    cr_assert_eq(ml_frame_write_header(hdr, 0), 0);
    cr_assert_eq(ml_frame_reader_feed(r, hdr, sizeof hdr), 0);
    const uint8_t *rec = NULL;
    size_t len = 99;
    cr_assert_eq(ml_frame_reader_next(r, &rec, &len), 1);
    cr_assert_eq(len, 0);
    cr_assert_eq(ml_frame_reader_finish(r), 0);
    /* With max 0, a one-byte record is already too big. */
    cr_assert_eq(ml_frame_write_header(hdr, 1), 0);
    cr_assert_eq(ml_frame_reader_feed(r, hdr, sizeof hdr), ML_ETOOBIG);
    ml_frame_reader_destroy(&r);
}

Test(frame, truncated_header_at_finish)
{
    ml_frame_reader_t *r = ml_frame_reader_new(100);
    uint8_t hdr[ML_FRAME_HEADER];
    ml_frame_write_header(hdr, 10);
    cr_assert_eq(ml_frame_reader_finish(r), 0); /* empty stream is clean */
    cr_assert_eq(ml_frame_reader_feed(r, hdr, 2), 0);
    cr_assert_eq(ml_frame_reader_pending(r), 2);
    cr_assert_eq(ml_frame_reader_finish(r), ML_ETRUNC);
    ml_frame_reader_destroy(&r);
}

Test(frame, truncated_body_at_finish)
{
    ml_frame_reader_t *r = ml_frame_reader_new(100);
    uint8_t wire[32];
    size_t n = 0;
    s_put_record(wire, &n, (const uint8_t *)"0123456789", 10);
    cr_assert_eq(ml_frame_reader_feed(r, wire, n - 1), 0);
    const uint8_t *rec;
    size_t len;
    cr_assert_eq(ml_frame_reader_next(r, &rec, &len), 0);
    cr_assert_eq(ml_frame_reader_pending(r), n - 1);
    cr_assert_eq(ml_frame_reader_finish(r), ML_ETRUNC);
    cr_assert_eq(ml_frame_reader_feed(r, wire + n - 1, 1), 0);
    cr_assert_eq(ml_frame_reader_next(r, &rec, &len), 1);
    cr_assert_eq(ml_frame_reader_finish(r), 0);
    ml_frame_reader_destroy(&r);
}

Test(frame, header_round_trip)
{
    static const size_t lens[] = {0, 1, 255, 256, 65535, 65536, 0x01020304u, 0xFFFFFFFFu};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        uint8_t hdr[ML_FRAME_HEADER];
        cr_assert_eq(ml_frame_write_header(hdr, lens[i]), 0);
        uint32_t back =
            ((uint32_t)hdr[0] << 24) | ((uint32_t)hdr[1] << 16) | ((uint32_t)hdr[2] << 8) | hdr[3];
        cr_assert_eq(back, lens[i]);
    }
    uint8_t hdr[ML_FRAME_HEADER];
    ml_frame_write_header(hdr, 0x01020304u);
    cr_assert_eq(hdr[0], 1);
    cr_assert_eq(hdr[3], 4); /* big-endian on the wire */
    if (sizeof(size_t) > 4)
        cr_assert_eq(ml_frame_write_header(hdr, (size_t)UINT32_MAX + 1), ML_ETOOBIG);
}

Test(frame, large_record_near_max)
{
    size_t max = ML_FRAME_DEFAULT_MAX;
    size_t blen = max - 1;
    uint8_t *wire = malloc(blen + ML_FRAME_HEADER);
    cr_assert_not_null(wire);
    for (size_t i = 0; i < blen; i++)
        wire[ML_FRAME_HEADER + i] = (uint8_t)(i ^ (i >> 8));
    ml_frame_write_header(wire, blen);

    ml_frame_reader_t *r = ml_frame_reader_new(max);
    /* Feed in uneven chunks as a TLS layer would hand them out. */
    size_t off = 0, chunk = 16381;
    while (off < blen + ML_FRAME_HEADER) {
        size_t l = blen + ML_FRAME_HEADER - off < chunk ? blen + ML_FRAME_HEADER - off : chunk;
        cr_assert_eq(ml_frame_reader_feed(r, wire + off, l), 0);
        off += l;
    }
    const uint8_t *rec;
    size_t len;
    cr_assert_eq(ml_frame_reader_next(r, &rec, &len), 1);
    cr_assert_eq(len, blen);
    cr_assert_eq(memcmp(rec, wire + ML_FRAME_HEADER, blen), 0);
    cr_assert_eq(ml_frame_reader_finish(r), 0);

    /* One byte over the maximum is refused. */
    ml_frame_write_header(wire, max + 1);
    cr_assert_eq(ml_frame_reader_feed(r, wire, ML_FRAME_HEADER), ML_ETOOBIG);
    ml_frame_reader_destroy(&r);
    free(wire);
}
