/* DICOM Part 10 files for tests (study.h). */
#include "study.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ml_imaging.h"

void tc_put(tc_buf_t *b, const void *p, size_t n)
{
    if (b->n + n > b->cap) {
        size_t cap = (b->n + n) * 2;
        uint8_t *nb = realloc(b->b, cap);
        if (!nb)
            abort(); /* a test out of memory has nothing better to do */
        b->b = nb;
        b->cap = cap;
    }
    memcpy(b->b + b->n, p, n);
    b->n += n;
}

static int s_long_vr(const char *vr)
{
    static const char *const longs[] = {"OB", "OW", "OF", "SQ", "UN", "UT"};
    for (size_t i = 0; i < sizeof longs / sizeof longs[0]; i++)
        if (strcmp(vr, longs[i]) == 0)
            return 1;
    return 0;
}

void tc_el(tc_buf_t *b, uint16_t group, uint16_t elem, const char *vr, const void *v, uint32_t len)
{
    uint8_t h[12] = {(uint8_t)group,       (uint8_t)(group >> 8), (uint8_t)elem,
                     (uint8_t)(elem >> 8), (uint8_t)vr[0],        (uint8_t)vr[1]};
    if (s_long_vr(vr)) {
        h[8] = (uint8_t)len;
        h[9] = (uint8_t)(len >> 8);
        h[10] = (uint8_t)(len >> 16);
        h[11] = (uint8_t)(len >> 24);
        tc_put(b, h, 12);
    } else {
        h[6] = (uint8_t)len;
        h[7] = (uint8_t)(len >> 8);
        tc_put(b, h, 8);
    }
    tc_put(b, v, len);
}

void tc_el_str(tc_buf_t *b, uint16_t group, uint16_t elem, const char *vr, const char *s)
{
    char tmp[128];
    size_t n = strlen(s);
    if (n > sizeof tmp - 2)
        n = sizeof tmp - 2;
    memcpy(tmp, s, n);
    if (n % 2)
        tmp[n++] = strcmp(vr, "UI") == 0 ? '\0' : ' ';
    tc_el(b, group, elem, vr, tmp, (uint32_t)n);
}

int tc_dicom_build(const tc_dicom_t *d, int index, size_t pixels, tc_buf_t *out)
{
    /* CT Image Storage, explicit VR little endian. */
    static const char ct[] = "1.2.840.10008.5.1.4.1.1.2", evrle[] = "1.2.840.10008.1.2.1";
    char sop[80];
    int n = snprintf(sop, sizeof sop, "%s%04d", d->sop_prefix, index);
    if (n < 0 || (size_t)n >= sizeof sop || strlen(d->study_uid) > 64 || strlen(d->series_uid) > 64)
        return -1;
    uint8_t zero[128] = {0};
    tc_put(out, zero, sizeof zero);
    tc_put(out, "DICM", 4);
    tc_el_str(out, 0x0002, 0x0002, "UI", ct);
    tc_el_str(out, 0x0002, 0x0003, "UI", sop);
    tc_el_str(out, 0x0002, 0x0010, "UI", evrle);
    tc_el_str(out, 0x0008, 0x0016, "UI", ct);
    tc_el_str(out, 0x0008, 0x0018, "UI", sop);
    tc_el_str(out, 0x0008, 0x0060, "CS", d->modality ? d->modality : "CT");
    if (d->patient)
        tc_el_str(out, 0x0010, 0x0010, "PN", d->patient);
    tc_el_str(out, 0x0020, 0x000D, "UI", d->study_uid);
    tc_el_str(out, 0x0020, 0x000E, "UI", d->series_uid);
    uint8_t *px = malloc(pixels ? pixels : 1);
    if (!px)
        abort();
    unsigned seed = (unsigned)index * 2654435761u;
    for (size_t i = 0; i < pixels; i++)
        px[i] = (uint8_t)(rand_r(&seed) >> 5);
    tc_el(out, 0x7FE0, 0x0010, "OW", px, (uint32_t)pixels);
    free(px);
    return 0;
}

int tc_dicom_write(const tc_dicom_t *d, const char *path, int index, size_t pixels, char sha[65])
{
    tc_buf_t b = {0};
    if (tc_dicom_build(d, index, pixels, &b) != 0) {
        free(b.b);
        errno = EINVAL;
        return -1;
    }
    FILE *f = fopen(path, "wb");
    int rc = f && fwrite(b.b, 1, b.n, f) == b.n ? 0 : -1;
    int saved = errno;
    if (f && fclose(f) != 0)
        rc = -1;
    if (rc == 0 && sha)
        ml_sha256_hex(b.b, b.n, sha);
    free(b.b);
    errno = saved;
    return rc;
}
