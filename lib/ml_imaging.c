/* Imaging helpers: SHA-256 through OpenSSL's EVP interface, the chunking
 * arithmetic of imaging.proto, and a small reader for the header of DICOM
 * Part 10 files. The reader trusts nothing in the file: every length is
 * checked against the bytes actually held before it is used, sequences of
 * undefined length are walked item by item with a depth limit, and the walk
 * ends at the first tag past (0020,000E) or at the end of the first 1 MiB,
 * so a hostile file costs at most one bounded read and a linear scan. */
#include "ml_imaging.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "ml_common.h"

#define S_PROBE_MAX (1024u * 1024)
#define S_READ_BLOCK (256u * 1024)
/* Nesting of undefined-length sequences we follow before giving up. */
#define S_MAX_DEPTH 16

#define S_TAG(g, e) (((uint32_t)(g) << 16) | (uint32_t)(e))
#define S_TAG_TS S_TAG(0x0002, 0x0010)
#define S_TAG_MEDIA_CLASS S_TAG(0x0002, 0x0002)
#define S_TAG_MEDIA_SOP S_TAG(0x0002, 0x0003)
#define S_TAG_SOP_CLASS S_TAG(0x0008, 0x0016)
#define S_TAG_SOP S_TAG(0x0008, 0x0018)
#define S_TAG_MODALITY S_TAG(0x0008, 0x0060)
#define S_TAG_STUDY S_TAG(0x0020, 0x000D)
#define S_TAG_SERIES S_TAG(0x0020, 0x000E)
#define S_TAG_ITEM S_TAG(0xFFFE, 0xE000)
#define S_TAG_ITEM_END S_TAG(0xFFFE, 0xE00D)
#define S_TAG_SEQ_END S_TAG(0xFFFE, 0xE0DD)
#define S_UNDEFINED 0xFFFFFFFFu

#define S_TS_IMPLICIT "1.2.840.10008.1.2"
#define S_TS_EXPLICIT "1.2.840.10008.1.2.1"
#define S_TS_DEFLATED "1.2.840.10008.1.2.1.99"
#define S_TS_BIG "1.2.840.10008.1.2.2"

static void s_hex(const unsigned char *md, char out[ML_SHA256_HEX + 1])
{
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        out[2 * i] = digits[md[i] >> 4];
        out[2 * i + 1] = digits[md[i] & 15];
    }
    out[ML_SHA256_HEX] = '\0';
}

int ml_sha256(const void *data, size_t len, uint8_t out[32])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (EVP_Digest(data ? data : "", len, md, &n, EVP_sha256(), NULL) != 1 || n != 32)
        return ML_ENOMEM;
    memcpy(out, md, 32);
    return 0;
}

void ml_sha256_hex(const void *data, size_t len, char out[ML_SHA256_HEX + 1])
{
    uint8_t md[32];
    /* It fails only without memory or a broken provider; an empty string
     * then never matches a real digest. */
    if (ml_sha256(data, len, md) != 0) {
        out[0] = '\0';
        return;
    }
    s_hex(md, out);
}

int ml_sha256_file(const char *path, char out[ML_SHA256_HEX + 1], uint64_t *size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return ML_EIO;
    int rc = ml_sha256_fd(fd, out, size);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

int ml_sha256_fd(int fd, char out[ML_SHA256_HEX + 1], uint64_t *size)
{
    int rc = ML_EIO;
    uint8_t *buf = NULL;
    uint64_t total = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx)
        return ML_ENOMEM;
    if (!(buf = malloc(S_READ_BLOCK))) {
        rc = ML_ENOMEM;
        goto out;
    }
    if (EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1)
        goto out;
    for (;;) {
        /* pread from the start: the fd's position is not ours. */
        ssize_t r = pread(fd, buf, S_READ_BLOCK, (off_t)total);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            goto out;
        }
        if (r == 0)
            break;
        if (EVP_DigestUpdate(ctx, buf, (size_t)r) != 1)
            goto out;
        total += (uint64_t)r;
    }
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (EVP_DigestFinal_ex(ctx, md, &n) != 1 || n != 32)
        goto out;
    s_hex(md, out);
    if (size)
        *size = total;
    rc = 0;
out : {
    int saved = errno;
    free(buf);
    EVP_MD_CTX_free(ctx);
    errno = saved;
}
    return rc;
}

int ml_sha256_hex_valid(const char *s)
{
    if (!s)
        return 0;
    for (int i = 0; i < ML_SHA256_HEX; i++) {
        char c = s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return 0;
    }
    return s[ML_SHA256_HEX] == '\0';
}

uint32_t ml_imaging_chunk_count(uint64_t size, uint32_t chunk_size)
{
    if (chunk_size == 0)
        return 0;
    if (size == 0)
        return 1;
    uint64_t n = size / chunk_size + (size % chunk_size ? 1 : 0);
    return n > UINT32_MAX ? 0 : (uint32_t)n;
}

/* Reads exactly len bytes at off. Returns 0, or ML_EIO (errno kept; EIO
 * when the file ended early). */
static int s_pread_all(int fd, uint8_t *buf, size_t len, uint64_t off)
{
    while (len > 0) {
        ssize_t r = pread(fd, buf, len, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return ML_EIO;
        }
        if (r == 0) {
            errno = EIO;
            return ML_EIO;
        }
        buf += r;
        len -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

int ml_imaging_read_chunk(const char *path, uint32_t chunk_size, uint32_t chunk_index,
                          uint8_t **data, size_t *len, char sha[ML_SHA256_HEX + 1])
{
    if (chunk_size == 0)
        return ML_EINVAL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return ML_EIO;
    int rc = ml_imaging_read_chunk_fd(fd, chunk_size, chunk_index, data, len, sha);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

int ml_imaging_read_chunk_fd(int fd, uint32_t chunk_size, uint32_t chunk_index, uint8_t **data,
                             size_t *len, char sha[ML_SHA256_HEX + 1])
{
    int rc = ML_EIO;
    uint8_t *buf = NULL;
    struct stat st;
    if (chunk_size == 0)
        return ML_EINVAL;
    if (fstat(fd, &st) != 0)
        goto out;
    uint64_t size = (uint64_t)st.st_size;
    uint64_t off = (uint64_t)chunk_index * chunk_size;
    /* Chunk 0 of an empty object is the one empty chunk; any other chunk
     * must start inside the file. */
    if (off > size || (off == size && !(size == 0 && chunk_index == 0))) {
        rc = ML_EINVAL;
        goto out;
    }
    size_t n = size - off < chunk_size ? (size_t)(size - off) : chunk_size;
    if (!(buf = malloc(n ? n : 1))) {
        rc = ML_ENOMEM;
        goto out;
    }
    if ((rc = s_pread_all(fd, buf, n, off)) < 0)
        goto out;
    ml_sha256_hex(buf, n, sha);
    *data = buf;
    *len = n;
    buf = NULL;
    rc = 0;
out : {
    int saved = errno;
    free(buf);
    errno = saved;
}
    return rc;
}

/* ---- DICOM Part 10 header ------------------------------------------------ */

/* Where a walk over the bytes stands. */
typedef struct {
    const uint8_t *buf;
    size_t len;         /* bytes held (at most S_PROBE_MAX) */
    uint64_t file_size; /* the whole file; len < file_size means "window" */
    ml_dicom_info_t *info;
    char *err;
    size_t errlen;
    int found_series; /* (0020,000E) seen at the top level */
} s_walk_t;

enum { S_GO = 0, S_DONE = 1 };

static uint16_t s_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t s_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* Value representations whose explicit-VR length takes 4 bytes (after two
 * reserved bytes) rather than 2: PS3.5 table 7.1-1. */
static int s_long_vr(const uint8_t *vr)
{
    static const char *const longs[] = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ",
                                        "SV", "UC", "UN", "UR", "UT", "UV"};
    for (size_t i = 0; i < sizeof longs / sizeof longs[0]; i++)
        if (vr[0] == (uint8_t)longs[i][0] && vr[1] == (uint8_t)longs[i][1])
            return 1;
    return 0;
}

static int s_vr_valid(const uint8_t *vr)
{
    return vr[0] >= 'A' && vr[0] <= 'Z' && vr[1] >= 'A' && vr[1] <= 'Z';
}

/* The bytes between pos and the end of what is held ran out. Inside the
 * 1 MiB window of a larger file that only means "stop here"; in a file
 * that is shorter, the file is truncated or a length lies. */
static int s_ran_out(s_walk_t *w, size_t pos, uint32_t tag, uint64_t want)
{
    if (w->len < w->file_size)
        return S_DONE;
    if (tag)
        ml_seterr(w->err, w->errlen,
                  "element (%04X,%04X) at byte %zu: length %llu runs past the end of the file "
                  "(%llu bytes)",
                  tag >> 16, tag & 0xFFFF, pos, (unsigned long long)want,
                  (unsigned long long)w->file_size);
    else
        ml_seterr(w->err, w->errlen, "file is truncated at byte %zu (inside an element header)",
                  pos);
    return ML_EINVAL;
}

/* Copies a UI or CS value into out (cap bytes with the NUL), trimming
 * DICOM's trailing NUL/space padding and leading spaces. UIDs must be digits
 * and dots; codes upper case, digits, space and underscore. */
static int s_take(s_walk_t *w, uint32_t tag, const char *what, const uint8_t *v, uint32_t n,
                  char *out, size_t cap, int is_uid)
{
    while (n > 0 && (v[n - 1] == ' ' || v[n - 1] == '\0'))
        n--;
    while (n > 0 && v[0] == ' ') {
        v++;
        n--;
    }
    if (n >= cap) {
        ml_seterr(w->err, w->errlen, "(%04X,%04X) %s is longer than %zu characters", tag >> 16,
                  tag & 0xFFFF, what, cap - 1);
        return ML_EINVAL;
    }
    for (uint32_t i = 0; i < n; i++) {
        uint8_t c = v[i];
        int ok = is_uid
                     ? ((c >= '0' && c <= '9') || c == '.')
                     : ((c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == ' ' || c == '_');
        if (!ok) {
            ml_seterr(w->err, w->errlen, "(%04X,%04X) %s is not a valid %s (byte 0x%02X)",
                      tag >> 16, tag & 0xFFFF, what, is_uid ? "UID" : "code string", c);
            return ML_EINVAL;
        }
    }
    memcpy(out, v, n);
    out[n] = '\0';
    return 0;
}

/* Takes the value of a tag we want (top level only). */
static int s_collect(s_walk_t *w, uint32_t tag, const uint8_t *v, uint32_t n)
{
    ml_dicom_info_t *in = w->info;
    switch (tag) {
    case S_TAG_TS:
        return s_take(w, tag, "Transfer Syntax UID", v, n, in->transfer_syntax_uid,
                      sizeof in->transfer_syntax_uid, 1);
    case S_TAG_MEDIA_CLASS:
        /* Only a fallback for (0008,0016): never overwrite the data set's. */
        if (in->sop_class_uid[0])
            return 0;
        return s_take(w, tag, "Media Storage SOP Class UID", v, n, in->sop_class_uid,
                      sizeof in->sop_class_uid, 1);
    case S_TAG_MEDIA_SOP:
        if (in->sop_instance_uid[0])
            return 0;
        return s_take(w, tag, "Media Storage SOP Instance UID", v, n, in->sop_instance_uid,
                      sizeof in->sop_instance_uid, 1);
    case S_TAG_SOP_CLASS:
        return s_take(w, tag, "SOP Class UID", v, n, in->sop_class_uid, sizeof in->sop_class_uid,
                      1);
    case S_TAG_SOP:
        return s_take(w, tag, "SOP Instance UID", v, n, in->sop_instance_uid,
                      sizeof in->sop_instance_uid, 1);
    case S_TAG_MODALITY:
        return s_take(w, tag, "Modality", v, n, in->modality, sizeof in->modality, 0);
    case S_TAG_STUDY:
        return s_take(w, tag, "Study Instance UID", v, n, in->study_instance_uid,
                      sizeof in->study_instance_uid, 1);
    case S_TAG_SERIES:
        w->found_series = 1;
        return s_take(w, tag, "Series Instance UID", v, n, in->series_instance_uid,
                      sizeof in->series_instance_uid, 1);
    default:
        return 0;
    }
}

static int s_walk(s_walk_t *w, size_t *pos, size_t end, int explicit_vr, int depth);

/* Walks the items of a sequence of undefined length up to its delimiter.
 * The items' own elements are skipped, not collected: a Referenced Series
 * Sequence, for one, holds a (0020,000E) that is not this object's. */
static int s_skip_sequence(s_walk_t *w, size_t *pos, int explicit_vr, int depth)
{
    if (depth >= S_MAX_DEPTH) {
        ml_seterr(w->err, w->errlen, "sequences nested deeper than %d at byte %zu", S_MAX_DEPTH,
                  *pos);
        return ML_EINVAL;
    }
    for (;;) {
        if (w->len - *pos < 8)
            return s_ran_out(w, *pos, 0, 8);
        uint32_t tag = S_TAG(s_u16(w->buf + *pos), s_u16(w->buf + *pos + 2));
        uint32_t n = s_u32(w->buf + *pos + 4);
        size_t at = *pos;
        *pos += 8;
        if (tag == S_TAG_SEQ_END)
            return S_GO;
        if (tag != S_TAG_ITEM) {
            ml_seterr(w->err, w->errlen, "expected a sequence item at byte %zu, found (%04X,%04X)",
                      at, tag >> 16, tag & 0xFFFF);
            return ML_EINVAL;
        }
        if (n != S_UNDEFINED) {
            if (n > w->len - *pos)
                return s_ran_out(w, at, tag, n);
            *pos += n;
            continue;
        }
        int rc = s_walk(w, pos, w->len, explicit_vr, depth + 1);
        if (rc != S_GO)
            return rc;
    }
}

/* Walks data elements from *pos. At depth 0 it collects the tags we want
 * and stops (S_DONE) at the first tag past (0020,000E); deeper, it runs to
 * the item delimiter. Returns S_GO (item delimiter reached, or the end of
 * the bytes exactly at an element boundary), S_DONE, or ML_EINVAL with
 * err set. */
static int s_walk(s_walk_t *w, size_t *pos, size_t end, int explicit_vr, int depth)
{
    for (;;) {
        if (*pos == end)
            return depth == 0 ? S_DONE : s_ran_out(w, *pos, 0, 8);
        size_t at = *pos;
        if (end - at < 8)
            return s_ran_out(w, at, 0, 8);
        const uint8_t *p = w->buf + at;
        uint32_t tag = S_TAG(s_u16(p), s_u16(p + 2));
        if (depth > 0 && tag == S_TAG_ITEM_END) {
            *pos += 8;
            return S_GO;
        }
        if (depth == 0 && tag > S_TAG_SERIES)
            return S_DONE;
        if ((tag >> 16) == 0xFFFE) {
            ml_seterr(w->err, w->errlen, "unexpected delimiter (%04X,%04X) at byte %zu", tag >> 16,
                      tag & 0xFFFF, at);
            return ML_EINVAL;
        }
        uint32_t n;
        int is_sq = 0, is_un = 0;
        if (explicit_vr) {
            if (!s_vr_valid(p + 4)) {
                ml_seterr(w->err, w->errlen,
                          "element (%04X,%04X) at byte %zu has no valid value representation",
                          tag >> 16, tag & 0xFFFF, at);
                return ML_EINVAL;
            }
            is_sq = p[4] == 'S' && p[5] == 'Q';
            is_un = p[4] == 'U' && p[5] == 'N';
            if (s_long_vr(p + 4)) {
                if (end - at < 12)
                    return s_ran_out(w, at, 0, 12);
                n = s_u32(p + 8);
                *pos += 12;
            } else {
                n = s_u16(p + 6);
                *pos += 8;
            }
        } else {
            n = s_u32(p + 4);
            *pos += 8;
        }
        if (n == S_UNDEFINED) {
            /* Implicit VR: only a sequence may have an undefined length.
             * Explicit VR: SQ, or UN holding an implicit-VR sequence. An
             * undefined-length OB/OW is encapsulated pixel data, which
             * comes after everything we want. */
            if (explicit_vr && !is_sq && !is_un) {
                if (depth == 0)
                    return S_DONE;
                ml_seterr(w->err, w->errlen,
                          "element (%04X,%04X) at byte %zu has an undefined length", tag >> 16,
                          tag & 0xFFFF, at);
                return ML_EINVAL;
            }
            int rc = s_skip_sequence(w, pos, explicit_vr && !is_un, depth);
            if (rc != S_GO)
                return rc;
            continue;
        }
        if (n > end - *pos)
            return s_ran_out(w, at, tag, n);
        if (depth == 0 && !is_sq) {
            int rc = s_collect(w, tag, w->buf + *pos, n);
            if (rc < 0)
                return rc;
        }
        *pos += n;
        if (depth == 0 && w->found_series)
            return S_DONE;
    }
}

/* The file meta group: explicit VR little endian whatever the transfer
 * syntax, as long as the group number is 0002. */
static int s_meta(s_walk_t *w, size_t *pos)
{
    for (;;) {
        size_t at = *pos;
        if (w->len - at < 8)
            return w->len - at == 0 && w->len == w->file_size ? 0 : s_ran_out(w, at, 0, 8);
        const uint8_t *p = w->buf + at;
        if (s_u16(p) != 0x0002)
            return 0;
        uint32_t tag = S_TAG(s_u16(p), s_u16(p + 2));
        if (!s_vr_valid(p + 4)) {
            ml_seterr(w->err, w->errlen,
                      "file meta element (0002,%04X) at byte %zu has no valid value "
                      "representation",
                      tag & 0xFFFF, at);
            return ML_EINVAL;
        }
        uint32_t n;
        if (s_long_vr(p + 4)) {
            if (w->len - at < 12)
                return s_ran_out(w, at, 0, 12);
            n = s_u32(p + 8);
            *pos += 12;
        } else {
            n = s_u16(p + 6);
            *pos += 8;
        }
        if (n == S_UNDEFINED) {
            ml_seterr(w->err, w->errlen,
                      "file meta element (0002,%04X) at byte %zu has an undefined length",
                      tag & 0xFFFF, at);
            return ML_EINVAL;
        }
        if (n > w->len - *pos) {
            int rc = s_ran_out(w, at, tag, n);
            if (rc == S_DONE) {
                ml_seterr(w->err, w->errlen, "file meta group is larger than %u bytes",
                          S_PROBE_MAX);
                rc = ML_EINVAL;
            }
            return rc;
        }
        int rc = s_collect(w, tag, w->buf + *pos, n);
        if (rc < 0)
            return rc;
        *pos += n;
    }
}

int ml_dicom_probe_buf(const uint8_t *buf, size_t len, uint64_t file_size, ml_dicom_info_t *info,
                       char *err, size_t errlen)
{
    memset(info, 0, sizeof *info);
    if (file_size < len)
        file_size = len;
    if (len < 132 || memcmp(buf + 128, "DICM", 4) != 0) {
        ml_seterr(err, errlen, "not a DICOM Part 10 file: no DICM marker at byte 128");
        return ML_EINVAL;
    }
    s_walk_t w = {buf, len, file_size, info, err, errlen, 0};
    size_t pos = 132;
    int rc = s_meta(&w, &pos);
    if (rc < 0)
        return rc;
    const char *ts = info->transfer_syntax_uid;
    if (!*ts) {
        ml_seterr(err, errlen, "no Transfer Syntax UID (0002,0010) in the file meta group");
        return ML_EINVAL;
    }
    if (strcmp(ts, S_TS_DEFLATED) == 0) {
        ml_seterr(err, errlen, "transfer syntax %s (deflated data set) is not supported", ts);
        return ML_EINVAL;
    }
    if (strcmp(ts, S_TS_BIG) == 0) {
        ml_seterr(err, errlen,
                  "transfer syntax %s (explicit VR big endian, retired) is not "
                  "supported",
                  ts);
        return ML_EINVAL;
    }
    /* Every other transfer syntax, compressed pixel data included, encodes
     * the data set in explicit VR little endian; 1.2.840.10008.1.2 alone is
     * implicit. */
    int explicit_vr = strcmp(ts, S_TS_IMPLICIT) != 0;
    rc = s_walk(&w, &pos, len, explicit_vr, 0);
    if (rc < 0)
        return rc;
    if (!info->sop_instance_uid[0]) {
        ml_seterr(err, errlen, "no SOP Instance UID (0008,0018)");
        return ML_EINVAL;
    }
    return 0;
}

int ml_dicom_probe(const char *path, ml_dicom_info_t *info, char *err, size_t errlen)
{
    memset(info, 0, sizeof *info);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        ml_seterr(err, errlen, "cannot open: %s", strerror(errno));
        return ML_EIO;
    }
    int rc = ml_dicom_probe_fd(fd, info, err, errlen);
    close(fd);
    return rc;
}

int ml_dicom_probe_fd(int fd, ml_dicom_info_t *info, char *err, size_t errlen)
{
    int rc = ML_EIO;
    uint8_t *buf = NULL;
    struct stat st;
    memset(info, 0, sizeof *info);
    if (fstat(fd, &st) != 0) {
        ml_seterr(err, errlen, "cannot stat: %s", strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        ml_seterr(err, errlen, "not a regular file");
        rc = ML_EINVAL;
        goto out;
    }
    uint64_t size = (uint64_t)st.st_size;
    size_t n = size < S_PROBE_MAX ? (size_t)size : S_PROBE_MAX;
    if (!(buf = malloc(n ? n : 1))) {
        ml_seterr(err, errlen, "out of memory");
        rc = ML_ENOMEM;
        goto out;
    }
    if (s_pread_all(fd, buf, n, 0) < 0) {
        ml_seterr(err, errlen, "cannot read: %s", strerror(errno));
        goto out;
    }
    rc = ml_dicom_probe_buf(buf, n, size, info, err, errlen);
out:
    free(buf);
    return rc;
}

static int s_dup(char **field, const char *v)
{
    char *c = strdup(v);
    if (!c)
        return ML_ENOMEM;
    *field = c;
    return 0;
}

int ml_imaging_object_from_file(const char *path, uint32_t chunk_size,
                                Medlink__V1__DicomObject **out, ml_dicom_info_t *info, char *err,
                                size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        ml_seterr(err, errlen, "cannot open: %s", strerror(errno));
        return ML_EIO;
    }
    int rc = ml_imaging_object_from_fd(fd, path, chunk_size, out, info, err, errlen);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

int ml_imaging_object_from_fd(int fd, const char *path, uint32_t chunk_size,
                              Medlink__V1__DicomObject **out, ml_dicom_info_t *info, char *err,
                              size_t errlen)
{
    ml_dicom_info_t local;
    Medlink__V1__DicomObject *o = NULL;
    char sha[ML_SHA256_HEX + 1];
    uint64_t size = 0;
    if (!info)
        info = &local;
    int rc = ml_dicom_probe_fd(fd, info, err, errlen);
    if (rc < 0)
        return rc;
    if ((rc = ml_sha256_fd(fd, sha, &size)) < 0) {
        ml_seterr(err, errlen, "cannot read: %s", strerror(errno));
        return rc;
    }
    uint32_t chunks = ml_imaging_chunk_count(size, chunk_size);
    if (chunks == 0) {
        ml_seterr(err, errlen, "chunk size %u does not fit a file of %llu bytes", chunk_size,
                  (unsigned long long)size);
        return ML_EINVAL;
    }
    if (!(o = malloc(sizeof *o))) {
        ml_seterr(err, errlen, "out of memory");
        return ML_ENOMEM;
    }
    medlink__v1__dicom_object__init(o);
    /* Start from NULL strings so that a failure half way frees only what
     * was allocated (free_unpacked skips NULLs). */
    o->sop_instance_uid = o->file_name = o->sha256 = o->series_instance_uid = NULL;
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    if (s_dup(&o->file_name, base) < 0 || s_dup(&o->sha256, sha) < 0 ||
        s_dup(&o->sop_instance_uid, info->sop_instance_uid) < 0 ||
        s_dup(&o->series_instance_uid, info->series_instance_uid) < 0) {
        protobuf_c_message_free_unpacked(&o->base, NULL);
        ml_seterr(err, errlen, "out of memory");
        return ML_ENOMEM;
    }
    o->size = size;
    o->chunks = chunks;
    *out = o;
    return 0;
}
