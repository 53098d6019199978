/* ml_imaging: SHA-256 against published vectors, the chunk arithmetic at
 * its edges, reading chunks of real files, and the DICOM Part 10 header
 * reader on files this test writes byte by byte: explicit and implicit VR
 * little endian, sequences of undefined length, a missing DICM marker,
 * every truncation of a valid file, lengths that lie, and random damage. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include "ml_common.h"
#include "ml_imaging.h"
#include "support.h"

static char s_dir[512];

static void s_setup(void)
{
    ml_log_set_level(ML_LOG_ERROR);
    ml_test_tmpdir(s_dir, sizeof s_dir);
}

static void s_teardown(void)
{
    ml_test_sh("rm -rf '%s'", s_dir);
}

TestSuite(imaging, .init = s_setup, .fini = s_teardown);

/* ---- a tiny DICOM writer ---- */

typedef struct {
    uint8_t *b;
    size_t n, cap;
} buf_t;

static void put(buf_t *b, const void *p, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->b = realloc(b->b, b->cap);
        cr_assert(b->b);
    }
    memcpy(b->b + b->n, p, n);
    b->n += n;
}

static void u16(buf_t *b, uint16_t v)
{
    uint8_t x[2] = {(uint8_t)v, (uint8_t)(v >> 8)};
    put(b, x, 2);
}

static void u32(buf_t *b, uint32_t v)
{
    uint8_t x[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    put(b, x, 4);
}

static int long_vr(const char *vr)
{
    return strstr("OB OD OF OL OV OW SQ SV UC UN UR UT UV", vr) != NULL;
}

/* One element with a raw length (which may lie) and value bytes. */
static void el_raw(buf_t *b, int explicit_vr, uint16_t g, uint16_t e, const char *vr, uint32_t len,
                   const void *v, size_t vlen)
{
    u16(b, g);
    u16(b, e);
    if (explicit_vr) {
        put(b, vr, 2);
        if (long_vr(vr)) {
            u16(b, 0);
            u32(b, len);
        } else {
            u16(b, (uint16_t)len);
        }
    } else {
        u32(b, len);
    }
    if (vlen)
        put(b, v, vlen);
}

/* A string value padded to even length (NUL for UI, space otherwise). */
static void el_str(buf_t *b, int explicit_vr, uint16_t g, uint16_t e, const char *vr, const char *s)
{
    size_t n = strlen(s);
    char tmp[256];
    memcpy(tmp, s, n);
    if (n % 2)
        tmp[n++] = strcmp(vr, "UI") == 0 ? '\0' : ' ';
    el_raw(b, explicit_vr, g, e, vr, (uint32_t)n, tmp, n);
}

#define SOP "1.2.826.0.1.3680043.8.498.1001"
#define SERIES "1.2.826.0.1.3680043.8.498.2002"
#define STUDY "1.2.826.0.1.3680043.8.498.3003"
#define CT_CLASS "1.2.840.10008.5.1.4.1.1.2"

static void preamble_meta(buf_t *b, const char *ts)
{
    uint8_t zero[128] = {0};
    put(b, zero, 128);
    put(b, "DICM", 4);
    uint8_t ver[2] = {0, 1};
    el_raw(b, 1, 0x0002, 0x0001, "OB", 2, ver, 2);
    el_str(b, 1, 0x0002, 0x0002, "UI", CT_CLASS);
    el_str(b, 1, 0x0002, 0x0003, "UI", SOP);
    el_str(b, 1, 0x0002, 0x0010, "UI", ts);
}

/* A CT image: meta, then SOP class/instance, modality, a Referenced Series
 * Sequence of undefined length whose item holds a foreign (0020,000E), the
 * patient name, study and series UIDs, rows, pixel data. *series_end is
 * the byte after the series UID. */
static buf_t make_dicom(int explicit_vr, size_t pixels, size_t *series_end)
{
    buf_t b = {0};
    preamble_meta(&b, explicit_vr ? "1.2.840.10008.1.2.1" : "1.2.840.10008.1.2");
    el_str(&b, explicit_vr, 0x0008, 0x0016, "UI", CT_CLASS);
    el_str(&b, explicit_vr, 0x0008, 0x0018, "UI", SOP);
    el_str(&b, explicit_vr, 0x0008, 0x0060, "CS", "CT");
    /* (0008,1115) SQ, undefined length, one item of undefined length. */
    el_raw(&b, explicit_vr, 0x0008, 0x1115, "SQ", 0xFFFFFFFF, NULL, 0);
    u16(&b, 0xFFFE);
    u16(&b, 0xE000);
    u32(&b, 0xFFFFFFFF);
    el_str(&b, explicit_vr, 0x0020, 0x000E, "UI", "9.9.9.9");
    /* A nested sequence with a defined-length item. */
    el_raw(&b, explicit_vr, 0x0008, 0x1199, "SQ", 0xFFFFFFFF, NULL, 0);
    u16(&b, 0xFFFE);
    u16(&b, 0xE000);
    u32(&b, 12);
    el_str(&b, 0, 0x0008, 0x1150, "UI", "1.2");
    u16(&b, 0xFFFE);
    u16(&b, 0xE0DD);
    u32(&b, 0);
    u16(&b, 0xFFFE);
    u16(&b, 0xE00D);
    u32(&b, 0);
    u16(&b, 0xFFFE);
    u16(&b, 0xE0DD);
    u32(&b, 0);
    el_str(&b, explicit_vr, 0x0010, 0x0010, "PN", "WANG^JIANGUO");
    el_str(&b, explicit_vr, 0x0020, 0x000D, "UI", STUDY);
    el_str(&b, explicit_vr, 0x0020, 0x000E, "UI", SERIES);
    if (series_end)
        *series_end = b.n;
    uint8_t rows[2] = {0, 2};
    el_raw(&b, explicit_vr, 0x0028, 0x0010, "US", 2, rows, 2);
    uint8_t *px = calloc(pixels ? pixels : 1, 1);
    for (size_t i = 0; i < pixels; i++)
        px[i] = (uint8_t)(i * 7);
    el_raw(&b, explicit_vr, 0x7FE0, 0x0010, "OW", (uint32_t)pixels, px, pixels);
    free(px);
    return b;
}

static void write_file(const char *name, const void *data, size_t len, char *path, size_t plen)
{
    snprintf(path, plen, "%s/%s", s_dir, name);
    FILE *f = fopen(path, "wb");
    cr_assert(f);
    if (len)
        cr_assert_eq(fwrite(data, 1, len, f), len);
    fclose(f);
}

/* ---- SHA-256 ---- */

Test(imaging, sha256_vectors)
{
    char h[ML_SHA256_HEX + 1];
    ml_sha256_hex("", 0, h);
    cr_assert_str_eq(h, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    ml_sha256_hex("abc", 3, h);
    cr_assert_str_eq(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    ml_sha256_hex(two, strlen(two), h);
    cr_assert_str_eq(h, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

Test(imaging, sha256_file_matches_buffer_and_reports_size)
{
    size_t n = 1000000 + 17; /* several read blocks, not a multiple */
    uint8_t *data = malloc(n);
    for (size_t i = 0; i < n; i++)
        data[i] = 'a';
    char path[700], a[ML_SHA256_HEX + 1], b[ML_SHA256_HEX + 1];
    write_file("big", data, n, path, sizeof path);
    uint64_t size = 0;
    cr_assert_eq(ml_sha256_file(path, a, &size), 0);
    ml_sha256_hex(data, n, b);
    cr_assert_str_eq(a, b);
    cr_assert_eq(size, n);
    free(data);
    write_file("abc", "abc", 3, path, sizeof path);
    cr_assert_eq(ml_sha256_file(path, a, &size), 0);
    cr_assert_str_eq(a, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    cr_assert_eq(size, 3);
    snprintf(path, sizeof path, "%s/missing", s_dir);
    cr_assert_eq(ml_sha256_file(path, a, &size), ML_EIO);
}

Test(imaging, sha256_hex_valid)
{
    cr_assert(
        ml_sha256_hex_valid("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
    cr_assert(
        !ml_sha256_hex_valid("E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"));
    cr_assert(
        !ml_sha256_hex_valid("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85"));
    cr_assert(
        !ml_sha256_hex_valid("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8555"));
    cr_assert(
        !ml_sha256_hex_valid("g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
    cr_assert(!ml_sha256_hex_valid(""));
    cr_assert(!ml_sha256_hex_valid(NULL));
}

/* ---- chunks ---- */

Test(imaging, chunk_count_edges)
{
    cr_assert_eq(ml_imaging_chunk_count(0, 4096), 1, "an empty object is one chunk");
    cr_assert_eq(ml_imaging_chunk_count(1, 4096), 1);
    cr_assert_eq(ml_imaging_chunk_count(4095, 4096), 1);
    cr_assert_eq(ml_imaging_chunk_count(4096, 4096), 1);
    cr_assert_eq(ml_imaging_chunk_count(4097, 4096), 2);
    cr_assert_eq(ml_imaging_chunk_count(8192, 4096), 2);
    cr_assert_eq(ml_imaging_chunk_count(10, 0), 0, "chunk size 0 has no answer");
    cr_assert_eq(ml_imaging_chunk_count((uint64_t)UINT32_MAX * 4096, 4096), UINT32_MAX);
    cr_assert_eq(ml_imaging_chunk_count((uint64_t)UINT32_MAX * 4096 + 1, 4096), 0,
                 "more than 2^32-1 chunks does not fit");
    cr_assert_eq(ml_imaging_chunk_count(UINT64_MAX, 1), 0);
    cr_assert_eq(ml_imaging_chunk_count(UINT64_MAX, UINT32_MAX), 0);
}

Test(imaging, read_chunk_edges)
{
    size_t n = 10000;
    uint8_t *data = malloc(n);
    for (size_t i = 0; i < n; i++)
        data[i] = (uint8_t)(i * 31 + 7);
    char path[700], sha[ML_SHA256_HEX + 1], want[ML_SHA256_HEX + 1];
    write_file("obj", data, n, path, sizeof path);
    uint8_t *c = NULL;
    size_t len = 0;

    cr_assert_eq(ml_imaging_read_chunk(path, 4096, 0, &c, &len, sha), 0);
    cr_assert_eq(len, 4096);
    cr_assert_eq(memcmp(c, data, 4096), 0);
    ml_sha256_hex(data, 4096, want);
    cr_assert_str_eq(sha, want);
    free(c);

    cr_assert_eq(ml_imaging_read_chunk(path, 4096, 2, &c, &len, sha), 0);
    cr_assert_eq(len, 10000 - 8192, "the last chunk is shorter");
    cr_assert_eq(memcmp(c, data + 8192, len), 0);
    ml_sha256_hex(data + 8192, len, want);
    cr_assert_str_eq(sha, want);
    free(c);

    cr_assert_eq(ml_imaging_read_chunk(path, 4096, 3, &c, &len, sha), ML_EINVAL);
    cr_assert_eq(ml_imaging_read_chunk(path, 4096, UINT32_MAX, &c, &len, sha), ML_EINVAL);
    cr_assert_eq(ml_imaging_read_chunk(path, 0, 0, &c, &len, sha), ML_EINVAL);

    /* A size that is an exact multiple has no extra empty chunk. */
    write_file("exact", data, 8192, path, sizeof path);
    cr_assert_eq(ml_imaging_read_chunk(path, 4096, 1, &c, &len, sha), 0);
    cr_assert_eq(len, 4096);
    free(c);
    cr_assert_eq(ml_imaging_read_chunk(path, 4096, 2, &c, &len, sha), ML_EINVAL);

    /* An empty object is one empty chunk. */
    write_file("empty", "", 0, path, sizeof path);
    cr_assert_eq(ml_imaging_read_chunk(path, 4096, 0, &c, &len, sha), 0);
    cr_assert_eq(len, 0);
    cr_assert_str_eq(sha, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    free(c);
    cr_assert_eq(ml_imaging_read_chunk(path, 4096, 1, &c, &len, sha), ML_EINVAL);

    snprintf(path, sizeof path, "%s/missing", s_dir);
    cr_assert_eq(ml_imaging_read_chunk(path, 4096, 0, &c, &len, sha), ML_EIO);
    free(data);
}

/* ---- DICOM ---- */

static int probe_file(const buf_t *b, ml_dicom_info_t *info, char *err, size_t errlen)
{
    char path[700];
    write_file("x.dcm", b->b, b->n, path, sizeof path);
    return ml_dicom_probe(path, info, err, errlen);
}

static void assert_ct(const ml_dicom_info_t *in)
{
    cr_assert_str_eq(in->sop_instance_uid, SOP);
    cr_assert_str_eq(in->sop_class_uid, CT_CLASS);
    cr_assert_str_eq(in->series_instance_uid, SERIES,
                     "the series UID inside a sequence is "
                     "not this object's");
    cr_assert_str_eq(in->study_instance_uid, STUDY);
    cr_assert_str_eq(in->modality, "CT");
}

Test(imaging, probe_explicit_vr)
{
    buf_t b = make_dicom(1, 1000, NULL);
    ml_dicom_info_t in;
    char err[256] = "";
    cr_assert_eq(probe_file(&b, &in, err, sizeof err), 0, "%s", err);
    assert_ct(&in);
    cr_assert_str_eq(in.transfer_syntax_uid, "1.2.840.10008.1.2.1");
    free(b.b);
}

Test(imaging, probe_implicit_vr)
{
    buf_t b = make_dicom(0, 1000, NULL);
    ml_dicom_info_t in;
    char err[256] = "";
    cr_assert_eq(probe_file(&b, &in, err, sizeof err), 0, "%s", err);
    assert_ct(&in);
    cr_assert_str_eq(in.transfer_syntax_uid, "1.2.840.10008.1.2");
    free(b.b);
}

Test(imaging, probe_compressed_syntax_reads_explicit_header)
{
    buf_t b = {0};
    preamble_meta(&b, "1.2.840.10008.1.2.4.70"); /* JPEG lossless */
    el_str(&b, 1, 0x0008, 0x0018, "UI", SOP);
    el_str(&b, 1, 0x0008, 0x0060, "CS", "DX");
    el_str(&b, 1, 0x0020, 0x000D, "UI", STUDY);
    el_str(&b, 1, 0x0020, 0x000E, "UI", SERIES);
    /* Encapsulated pixel data: undefined-length OB; the walk ends before. */
    el_raw(&b, 1, 0x7FE0, 0x0010, "OB", 0xFFFFFFFF, NULL, 0);
    ml_dicom_info_t in;
    char err[256] = "";
    cr_assert_eq(probe_file(&b, &in, err, sizeof err), 0, "%s", err);
    cr_assert_str_eq(in.modality, "DX");
    cr_assert_str_eq(in.series_instance_uid, SERIES);
    free(b.b);
}

Test(imaging, probe_without_dicm_is_refused)
{
    char path[700], err[256] = "";
    ml_dicom_info_t in;
    const char *text = "This is a referral letter, not an image.\n";
    write_file("letter.dcm", text, strlen(text), path, sizeof path);
    cr_assert_eq(ml_dicom_probe(path, &in, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "no DICM marker at byte 128"), "%s", err);

    buf_t b = make_dicom(1, 10, NULL);
    memcpy(b.b + 128, "DICN", 4);
    cr_assert_eq(probe_file(&b, &in, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "no DICM marker"), "%s", err);
    free(b.b);

    snprintf(path, sizeof path, "%s/missing.dcm", s_dir);
    cr_assert_eq(ml_dicom_probe(path, &in, err, sizeof err), ML_EIO);
    cr_assert_eq(ml_dicom_probe(s_dir, &in, err, sizeof err), ML_EINVAL, "a folder");
}

Test(imaging, probe_every_truncation)
{
    for (int ex = 0; ex <= 1; ex++) {
        size_t series_end = 0;
        buf_t b = make_dicom(ex, 64, &series_end);
        size_t refused = 0;
        for (size_t cut = 0; cut <= b.n; cut++) {
            ml_dicom_info_t in;
            char err[256] = "";
            int rc = ml_dicom_probe_buf(b.b, cut, cut, &in, err, sizeof err);
            if (cut >= series_end) {
                cr_assert_eq(rc, 0, "explicit=%d cut at %zu: %s", ex, cut, err);
                assert_ct(&in);
            } else if (rc == 0) {
                /* Only a cut between two top-level elements reads as a
                 * (short) file; the SOP UID then comes from the meta. */
                cr_assert_str_eq(in.sop_instance_uid, SOP);
                cr_assert_str_eq(in.series_instance_uid, "", "cut at %zu", cut);
            } else {
                cr_assert_eq(rc, ML_EINVAL, "explicit=%d cut at %zu", ex, cut);
                cr_assert(err[0], "no reason at cut %zu", cut);
                refused++;
            }
        }
        cr_assert_gt(refused, series_end * 9 / 10, "explicit=%d: only %zu of %zu cuts refused", ex,
                     refused, series_end);
        /* And through the file path, for one cut inside the meta group. */
        ml_dicom_info_t in;
        char err[256] = "";
        buf_t t = {b.b, 150, 150};
        cr_assert_eq(probe_file(&t, &in, err, sizeof err), ML_EINVAL);
        cr_assert(strstr(err, "truncated") || strstr(err, "past the end"), "%s", err);
        free(b.b);
    }
}

Test(imaging, probe_lying_lengths)
{
    ml_dicom_info_t in;
    char err[256] = "";

    /* A meta element claiming far more bytes than the file has. */
    buf_t b = {0};
    uint8_t zero[128] = {0};
    put(&b, zero, 128);
    put(&b, "DICM", 4);
    el_raw(&b, 1, 0x0002, 0x0001, "OB", 0x00FFFF00, "\0\1", 2);
    cr_assert_eq(probe_file(&b, &in, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "(0002,0001)") && strstr(err, "runs past the end of the file"), "%s",
              err);
    free(b.b);

    /* A data element before the SOP Instance UID with a lying length, in
     * both encodings. */
    for (int ex = 0; ex <= 1; ex++) {
        buf_t d = {0};
        preamble_meta(&d, ex ? "1.2.840.10008.1.2.1" : "1.2.840.10008.1.2");
        el_raw(&d, ex, 0x0008, 0x0005, "UT", 0x7FFFFFF0, "ISO_IR 192", 10);
        el_str(&d, ex, 0x0008, 0x0018, "UI", SOP);
        cr_assert_eq(probe_file(&d, &in, err, sizeof err), ML_EINVAL);
        cr_assert(strstr(err, "(0008,0005)") && strstr(err, "runs past the end"), "%s", err);
        free(d.b);
    }

    /* A sequence item claiming more than there is. */
    buf_t s = {0};
    preamble_meta(&s, "1.2.840.10008.1.2.1");
    el_raw(&s, 1, 0x0008, 0x1115, "SQ", 0xFFFFFFFF, NULL, 0);
    u16(&s, 0xFFFE);
    u16(&s, 0xE000);
    u32(&s, 0xFFFFFF00);
    cr_assert_eq(probe_file(&s, &in, err, sizeof err), ML_EINVAL);
    free(s.b);

    /* Something that is not an item inside a sequence. */
    buf_t q = {0};
    preamble_meta(&q, "1.2.840.10008.1.2.1");
    el_raw(&q, 1, 0x0008, 0x1115, "SQ", 0xFFFFFFFF, NULL, 0);
    el_str(&q, 1, 0x0008, 0x0018, "UI", SOP);
    cr_assert_eq(probe_file(&q, &in, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "expected a sequence item"), "%s", err);
    free(q.b);

    /* An undefined length on an element that is no sequence (explicit VR)
     * ends the walk before the SOP Instance UID. */
    buf_t u = {0};
    preamble_meta(&u, "1.2.840.10008.1.2.1");
    el_raw(&u, 1, 0x0008, 0x0005, "OB", 0xFFFFFFFF, NULL, 0);
    el_str(&u, 1, 0x0008, 0x0018, "UI", "1.2.3");
    cr_assert_eq(probe_file(&u, &in, err, sizeof err), 0, "falls back to (0002,0003)");
    cr_assert_str_eq(in.sop_instance_uid, SOP);
    free(u.b);
}

Test(imaging, probe_deep_nesting_is_bounded)
{
    buf_t b = {0};
    preamble_meta(&b, "1.2.840.10008.1.2");
    for (int i = 0; i < 40; i++) {
        el_raw(&b, 0, 0x0008, 0x1115, "SQ", 0xFFFFFFFF, NULL, 0);
        u16(&b, 0xFFFE);
        u16(&b, 0xE000);
        u32(&b, 0xFFFFFFFF);
    }
    ml_dicom_info_t in;
    char err[256] = "";
    cr_assert_eq(probe_file(&b, &in, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "nested deeper"), "%s", err);
    free(b.b);
}

Test(imaging, probe_bad_values)
{
    ml_dicom_info_t in;
    char err[256] = "";
    buf_t b = {0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    el_str(&b, 1, 0x0008, 0x0018, "UI",
           "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678901");
    cr_assert_eq(probe_file(&b, &in, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "longer than 64"), "%s", err);
    free(b.b);

    buf_t c = {0};
    preamble_meta(&c, "1.2.840.10008.1.2.1");
    el_str(&c, 1, 0x0008, 0x0018, "UI", "1.2.3/../../etc");
    cr_assert_eq(probe_file(&c, &in, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "not a valid UID"), "%s", err);
    free(c.b);

    buf_t d = {0};
    preamble_meta(&d, "1.2.840.10008.1.2.1.99");
    cr_assert_eq(probe_file(&d, &in, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "not supported"), "%s", err);
    free(d.b);

    buf_t e = {0};
    uint8_t zero[128] = {0};
    put(&e, zero, 128);
    put(&e, "DICM", 4);
    el_str(&e, 1, 0x0002, 0x0003, "UI", SOP);
    el_str(&e, 1, 0x0008, 0x0018, "UI", SOP);
    cr_assert_eq(probe_file(&e, &in, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "no Transfer Syntax UID"), "%s", err);
    free(e.b);

    /* A DICM file with a meta group only: no SOP Instance UID anywhere. */
    buf_t f = {0};
    put(&f, zero, 128);
    put(&f, "DICM", 4);
    el_str(&f, 1, 0x0002, 0x0010, "UI", "1.2.840.10008.1.2.1");
    cr_assert_eq(probe_file(&f, &in, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "no SOP Instance UID (0008,0018)"), "%s", err);
    free(f.b);
}

Test(imaging, probe_window_ends_quietly_in_large_files)
{
    /* A 3 MiB private element before the SOP Instance UID: beyond the
     * 1 MiB the reader looks at, but not beyond the file. The SOP UID of
     * the meta group is what is left. */
    buf_t b = {0};
    preamble_meta(&b, "1.2.840.10008.1.2.1");
    size_t big = 3u * 1024 * 1024;
    uint8_t *blob = calloc(big, 1);
    el_raw(&b, 1, 0x0008, 0x0001, "OB", (uint32_t)big, blob, big);
    el_str(&b, 1, 0x0008, 0x0018, "UI", "1.2.3.4");
    free(blob);
    ml_dicom_info_t in;
    char err[256] = "";
    cr_assert_eq(probe_file(&b, &in, err, sizeof err), 0, "%s", err);
    cr_assert_str_eq(in.sop_instance_uid, SOP);
    free(b.b);
}

Test(imaging, probe_survives_random_damage)
{
    buf_t good = make_dicom(1, 200, NULL);
    buf_t good2 = make_dicom(0, 200, NULL);
    uint8_t *m = malloc(good.n > good2.n ? good.n : good2.n);
    unsigned seed = 12345;
    for (int iter = 0; iter < 20000; iter++) {
        const buf_t *src = iter % 2 ? &good : &good2;
        memcpy(m, src->b, src->n);
        int flips = 1 + (int)(rand_r(&seed) % 8);
        for (int k = 0; k < flips; k++) {
            size_t at = 128 + rand_r(&seed) % (src->n - 128);
            m[at] = (uint8_t)rand_r(&seed);
        }
        size_t len = src->n - (size_t)(rand_r(&seed) % 16);
        ml_dicom_info_t in;
        char err[256];
        int rc = ml_dicom_probe_buf(m, len, len, &in, err, sizeof err);
        cr_assert(rc == 0 || rc == ML_EINVAL);
        cr_assert(strlen(in.sop_instance_uid) <= 64 && strlen(in.modality) <= 16);
    }
    free(m);
    free(good.b);
    free(good2.b);
}

Test(imaging, object_from_file)
{
    buf_t b = make_dicom(1, 9000, NULL);
    char path[700], sha[ML_SHA256_HEX + 1], err[256] = "";
    write_file("IM0001.dcm", b.b, b.n, path, sizeof path);
    ml_sha256_hex(b.b, b.n, sha);
    Medlink__V1__DicomObject *o = NULL;
    ml_dicom_info_t in;
    cr_assert_eq(ml_imaging_object_from_file(path, 4096, &o, &in, err, sizeof err), 0, "%s", err);
    cr_assert_str_eq(o->file_name, "IM0001.dcm");
    cr_assert_eq(o->size, b.n);
    cr_assert_str_eq(o->sha256, sha);
    cr_assert_eq(o->chunks, ml_imaging_chunk_count(b.n, 4096));
    cr_assert_str_eq(o->sop_instance_uid, SOP);
    cr_assert_str_eq(o->series_instance_uid, SERIES);
    cr_assert_str_eq(in.study_instance_uid, STUDY);
    protobuf_c_message_free_unpacked(&o->base, NULL);

    write_file("notes.dcm", "hello", 5, path, sizeof path);
    o = NULL;
    cr_assert_eq(ml_imaging_object_from_file(path, 4096, &o, NULL, err, sizeof err), ML_EINVAL);
    cr_assert_null(o);
    free(b.b);
}
