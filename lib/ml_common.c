/* Error names, logging, ULIDs, clocks and small file helpers shared by every
 * medlink program. */
#include "ml_common.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "ml_text.h"

const char *ml_strerror(int rc)
{
    switch (rc) {
    case ML_OK:
        return "ok";
    case ML_EINVAL:
        return "invalid argument or input";
    case ML_ENOMEM:
        return "out of memory";
    case ML_EIO:
        return "I/O error";
    case ML_EPROTO:
        return "protocol error";
    case ML_ETLS:
        return "TLS error";
    case ML_EAGAIN:
        return "try again";
    case ML_ETOOBIG:
        return "too large";
    case ML_ETRUNC:
        return "truncated";
    case ML_ENOTFOUND:
        return "not found";
    case ML_EDUP:
        return "duplicate";
    case ML_EFULL:
        return "full";
    case ML_ECLOSED:
        return "closed";
    case ML_EDENIED:
        return "denied";
    case ML_ESTORE:
        return "store error";
    case ML_ECONFIG:
        return "configuration error";
    case ML_ETIMEDOUT:
        return "timed out";
    default:
        return "unknown error";
    }
}

void ml_seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static int s_log_level = ML_LOG_INFO;

void ml_log_set_level(int level)
{
    s_log_level = level;
}

int ml_log_get_level(void)
{
    return s_log_level;
}

int ml_log_parse_level(const char *s, int *level)
{
    static const char *names[] = {"debug", "info", "warn", "error"};
    for (int i = 0; i < 4; i++) {
        if (strcmp(s, names[i]) == 0) {
            *level = i;
            return 0;
        }
    }
    return ML_EINVAL;
}

void ml_log(int level, const char *component, const char *fmt, ...)
{
    static const char *names[] = {"debug", "info", "warn", "error"};
    if (level < s_log_level)
        return;
    char ts[32];
    char msg[2048];
    char line[2048];
    ml_time_format(ml_now_ms(), ts, sizeof ts);
    int n = snprintf(line, sizeof line, "%s %s %s: ", ts, names[level & 3], component);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    size_t mlen = m < 0 ? 0 : (size_t)m < sizeof msg ? (size_t)m : sizeof msg - 1;
    /* Messages quote ids, reasons and names that peers chose: escaped here,
     * in the one place every line passes, a newline or a terminal escape in
     * them cannot forge a line or reach an operator's terminal. */
    size_t len = (size_t)n + ml_text_escape(msg, mlen, line + n, sizeof line - (size_t)n - 1);
    line[len++] = '\n';
    /* One write(2) per line so lines from threads never interleave. */
    ssize_t w = write(STDERR_FILENO, line, len);
    (void)w;
}

int64_t ml_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t ml_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

char *ml_time_format(int64_t unix_ms, char *buf, size_t len)
{
    time_t secs = (time_t)(unix_ms / 1000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    snprintf(buf, len, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
             tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(unix_ms % 1000));
    return buf;
}

static const char s_crockford[] = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";
static pthread_mutex_t s_ulid_lock = PTHREAD_MUTEX_INITIALIZER;
static int64_t s_ulid_last_ms;
static uint8_t s_ulid_last_rand[10];

void ml_ulid_new(char out[ML_ULID_LEN + 1])
{
    uint8_t b[16];
    int64_t now = ml_now_ms();
    pthread_mutex_lock(&s_ulid_lock);
    if (now <= s_ulid_last_ms) {
        /* Same (or earlier) millisecond: increment the random part so ids
         * stay strictly increasing within this process. */
        now = s_ulid_last_ms;
        for (int i = 9; i >= 0; i--) {
            if (++s_ulid_last_rand[i] != 0)
                break;
        }
    } else {
        if (RAND_bytes(s_ulid_last_rand, sizeof s_ulid_last_rand) != 1) {
            /* RAND_bytes failing means the process cannot make safe ids. */
            abort();
        }
        /* Leave headroom so increments within a millisecond never wrap. */
        s_ulid_last_rand[0] &= 0x7f;
        s_ulid_last_ms = now;
    }
    uint64_t ms = (uint64_t)now;
    for (int i = 5; i >= 0; i--) {
        b[i] = (uint8_t)(ms & 0xff);
        ms >>= 8;
    }
    memcpy(b + 6, s_ulid_last_rand, 10);
    pthread_mutex_unlock(&s_ulid_lock);

    /* 128 bits -> 26 base32 chars; the first char carries the top 3 bits. */
    int bit = -2; /* 26 * 5 = 130 bits; two leading zero bits */
    for (int i = 0; i < ML_ULID_LEN; i++) {
        int v = 0;
        for (int k = 0; k < 5; k++, bit++) {
            v <<= 1;
            if (bit >= 0 && (b[bit / 8] >> (7 - bit % 8)) & 1)
                v |= 1;
        }
        out[i] = s_crockford[v];
    }
    out[ML_ULID_LEN] = '\0';
}

int ml_ulid_valid(const char *s)
{
    if (!s || strlen(s) != ML_ULID_LEN)
        return 0;
    if (s[0] > '7')
        return 0;
    for (int i = 0; i < ML_ULID_LEN; i++) {
        if (!strchr(s_crockford, s[i]) || s[i] == '\0')
            return 0;
    }
    return 1;
}

int ml_write_file_atomic(const char *path, const void *data, size_t len)
{
    char tmp[4096];
    int rc = ML_EIO;
    int fd = -1;
    int n = snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    if (n < 0 || (size_t)n >= sizeof tmp)
        return ML_EINVAL;
    fd = open(tmp, O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0640);
    if (fd < 0)
        return ML_EIO;
    const uint8_t *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            goto out;
        }
        p += w;
        left -= (size_t)w;
    }
    if (fsync(fd) != 0)
        goto out;
    if (close(fd) != 0) {
        fd = -1;
        goto out;
    }
    fd = -1;
    if (rename(tmp, path) != 0)
        goto out;
    /* fsync the folder so the rename itself survives a crash. */
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) {
        if (slash == dir)
            slash[1] = '\0';
        else
            *slash = '\0';
    } else {
        strcpy(dir, ".");
    }
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    return 0;
out : {
    int saved = errno;
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    errno = saved;
}
    return rc;
}

int ml_read_file(const char *path, size_t max, char **out, size_t *len)
{
    int rc = ML_EIO;
    char *buf = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return ML_EIO;
    struct stat st;
    if (fstat(fileno(f), &st) != 0)
        goto out;
    if ((size_t)st.st_size > max) {
        rc = ML_ETOOBIG;
        goto out;
    }
    buf = malloc((size_t)st.st_size + 1);
    if (!buf) {
        rc = ML_ENOMEM;
        goto out;
    }
    size_t n = fread(buf, 1, (size_t)st.st_size, f);
    if (n != (size_t)st.st_size)
        goto out;
    buf[n] = '\0';
    *out = buf;
    buf = NULL;
    if (len)
        *len = n;
    rc = 0;
out:
    free(buf);
    fclose(f);
    return rc;
}

int ml_mkdirs(const char *path)
{
    char tmp[4096];
    int n = snprintf(tmp, sizeof tmp, "%s", path);
    if (n < 0 || (size_t)n >= sizeof tmp)
        return ML_EINVAL;
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(tmp, 0750) != 0 && errno != EEXIST)
                return ML_EIO;
            *p = '/';
        }
    }
    if (mkdir(tmp, 0750) != 0 && errno != EEXIST)
        return ML_EIO;
    return 0;
}
