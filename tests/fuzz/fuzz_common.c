/* Shared helpers of the fuzz targets; see fuzz_common.h. */
#include "fuzz_common.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ml_common.h"

#ifndef ML_FUZZ_SOURCE_DIR
#define ML_FUZZ_SOURCE_DIR "."
#endif

/* Part of the sanitizer runtimes (weak: absent in a plain build). */
void __sanitizer_report_error_summary(const char *summary) __attribute__((weak));

void ml_fuzz_fail(const char *target, const char *fmt, ...)
{
    char msg[4096];
    int n = snprintf(msg, sizeof msg, "%s: ", target);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s\n", msg);
    if (__sanitizer_report_error_summary)
        __sanitizer_report_error_summary(msg);
    abort();
}

void ml_fuzz_quiet(void)
{
    static int done;
    if (done)
        return;
    done = 1;
    int level = ML_LOG_ERROR + 1; /* above every level: silent */
    const char *s = getenv("ML_FUZZ_LOG_LEVEL");
    if (s && *s && ml_log_parse_level(s, &level) != 0)
        level = ML_LOG_ERROR + 1;
    ml_log_set_level(level);
}

static const char *s_base(void)
{
    const char *s = getenv("ML_FUZZ_TMPDIR");
    if (s && *s)
        return s;
    if (access("/dev/shm", W_OK | X_OK) == 0)
        return "/dev/shm";
    s = getenv("TMPDIR");
    return s && *s ? s : "/tmp";
}

void ml_fuzz_tmpdir(const char *tag, char *out, size_t len)
{
    int n = snprintf(out, len, "%s/mlfuzz-%s.XXXXXX", s_base(), tag);
    if (n < 0 || (size_t)n >= len || !mkdtemp(out)) {
        fprintf(stderr, "fuzz: cannot create a temp folder under %s: %s\n", s_base(),
                strerror(errno));
        abort();
    }
}

static int s_rm_cb(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path) == 0 || errno == ENOENT ? 0 : -1;
}

int ml_fuzz_rmtree(const char *path)
{
    return nftw(path, s_rm_cb, 16, FTW_DEPTH | FTW_PHYS) == 0 ? 0 : -1;
}

void ml_fuzz_write_file(const char *path, const void *data, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
    const uint8_t *p = data;
    while (fd >= 0 && len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;
        p += w;
        len -= (size_t)w;
    }
    if (fd < 0 || len > 0) {
        fprintf(stderr, "fuzz: cannot write %s: %s\n", path, strerror(errno));
        abort();
    }
    close(fd);
}

const char *ml_fuzz_source_dir(void)
{
    const char *s = getenv("ML_SOURCE_DIR");
    return s && *s ? s : ML_FUZZ_SOURCE_DIR;
}

int ml_fuzz_known(const char *issue)
{
    const char *list = getenv("ML_FUZZ_KNOWN");
    size_t n = strlen(issue);
    for (const char *p = list; p && *p;) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len == n && strncmp(p, issue, n) == 0)
            return 1;
        p = end ? end + 1 : NULL;
    }
    return 0;
}

uint8_t ml_fuzz_u8(ml_fuzz_in_t *in)
{
    if (in->n == 0)
        return 0;
    uint8_t v = in->p[0];
    in->p++;
    in->n--;
    return v;
}

uint16_t ml_fuzz_u16(ml_fuzz_in_t *in)
{
    uint16_t hi = ml_fuzz_u8(in);
    return (uint16_t)((hi << 8) | ml_fuzz_u8(in));
}

uint32_t ml_fuzz_u32(ml_fuzz_in_t *in)
{
    uint32_t hi = ml_fuzz_u16(in);
    return (hi << 16) | ml_fuzz_u16(in);
}

const uint8_t *ml_fuzz_take(ml_fuzz_in_t *in, size_t want, size_t *got)
{
    size_t n = want < in->n ? want : in->n;
    const uint8_t *p = in->p;
    in->p += n;
    in->n -= n;
    *got = n;
    return p;
}

void ml_fuzz_rng_seed(ml_fuzz_rng_t *r, uint64_t seed)
{
    r->s = seed ? seed : 0x9e3779b97f4a7c15ull;
}

uint64_t ml_fuzz_rng_next(ml_fuzz_rng_t *r)
{
    r->s ^= r->s >> 12;
    r->s ^= r->s << 25;
    r->s ^= r->s >> 27;
    return r->s * 0x2545f4914f6cdd1dull;
}

void ml_fuzz_rng_fill(ml_fuzz_rng_t *r, uint8_t *buf, size_t len)
{
    for (size_t i = 0; i < len; i++)
        buf[i] = (uint8_t)(ml_fuzz_rng_next(r) >> 56);
}

void ml_fuzz_ulid(uint64_t n, char out[27])
{
    static const char b32[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    memcpy(out, "01JDB3W5Q3T0S8R9K7", 18);
    for (int i = 25; i >= 18; i--) {
        out[i] = b32[n & 31];
        n >>= 5;
    }
    out[26] = '\0';
}
