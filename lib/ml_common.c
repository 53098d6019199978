/* Error names, logging, ULIDs and clocks shared by every medlink program
 * (the file helpers are in ml_fs.c). */
#include "ml_common.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
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
    case ML_EIDUSED:
        return "id in use";
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

/* Level and format are read by every thread that logs (the loop, the
 * store's and the imaging threads) and set by the loop thread, also while
 * the others run (a reload): atomics, so that a reader sees one value or the
 * other, never a torn one. */
static atomic_int s_log_level = ML_LOG_INFO;
static atomic_int s_log_format = ML_LOG_FORMAT_TEXT;
static pthread_once_t s_journal_once = PTHREAD_ONCE_INIT;
static int s_journal; /* written once, under s_journal_once */

void ml_log_set_level(int level)
{
    atomic_store(&s_log_level, level);
}

int ml_log_get_level(void)
{
    return atomic_load(&s_log_level);
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

void ml_log_set_format(int format)
{
    atomic_store(&s_log_format,
                 format == ML_LOG_FORMAT_JSON ? ML_LOG_FORMAT_JSON : ML_LOG_FORMAT_TEXT);
}

int ml_log_get_format(void)
{
    return atomic_load(&s_log_format);
}

int ml_log_parse_format(const char *s, int *format)
{
    if (strcmp(s, "text") == 0)
        *format = ML_LOG_FORMAT_TEXT;
    else if (strcmp(s, "json") == 0)
        *format = ML_LOG_FORMAT_JSON;
    else
        return ML_EINVAL;
    return 0;
}

/* systemd gives a service's stderr to the journal as a stream socket and
 * names it in JOURNAL_STREAM=DEV:INODE (systemd.exec(5)). The variable is
 * inherited by children whose stderr goes elsewhere (a shell redirect), so
 * the prefix is used only when stderr is that very socket. */
static void s_journal_detect(void)
{
    const char *e = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    char tail;
    struct stat st;
    if (!e || sscanf(e, "%llu:%llu%c", &dev, &ino, &tail) != 2)
        return;
    if (fstat(STDERR_FILENO, &st) != 0)
        return;
    s_journal = (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

int ml_log_journal(void)
{
    pthread_once(&s_journal_once, s_journal_detect);
    return s_journal;
}

/* Appends c to out if it fits (keeping room for the NUL); 0 if not. */
static int s_put(char *out, size_t outlen, size_t *o, const char *c, size_t n)
{
    if (*o + n >= outlen)
        return 0;
    memcpy(out + *o, c, n);
    *o += n;
    return 1;
}

/* JSON string body of s[0..len) (RFC 8259): quote, backslash and every
 * control character escaped; the characters ml_text_escape makes harmless
 * for a terminal (C1 controls, line/paragraph separators, bidirectional
 * overrides) as \uXXXX, so that a viewer that prints decoded strings is as
 * safe as the text format; a byte that is not part of well-formed UTF-8
 * becomes U+FFFD; the rest of UTF-8 is copied. Cut at a character
 * boundary. Returns the length written. */
static size_t s_json_escape(const char *s, size_t len, char *out, size_t outlen)
{
    size_t o = 0;
    char esc[8];
    for (size_t i = 0; i < len;) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x80) {
            const char *rep = NULL;
            switch (c) {
            case '"':
                rep = "\\\"";
                break;
            case '\\':
                rep = "\\\\";
                break;
            case '\n':
                rep = "\\n";
                break;
            case '\r':
                rep = "\\r";
                break;
            case '\t':
                rep = "\\t";
                break;
            default:
                break;
            }
            if (!rep && (c < 0x20 || c == 0x7f)) {
                snprintf(esc, sizeof esc, "\\u%04x", c);
                rep = esc;
            }
            if (rep ? !s_put(out, outlen, &o, rep, strlen(rep))
                    : !s_put(out, outlen, &o, (const char *)&s[i], 1))
                break;
            i++;
            continue;
        }
        size_t n = ml_utf8_seq_len(s + i, len - i);
        if (n == 0) {
            if (!s_put(out, outlen, &o, "\xef\xbf\xbd", 3))
                break;
            i++;
            continue;
        }
        unsigned cp = n == 2 ? ((c & 0x1fu) << 6) | (s[i + 1] & 0x3fu)
                      : n == 3
                          ? ((c & 0x0fu) << 12) | ((s[i + 1] & 0x3fu) << 6) | (s[i + 2] & 0x3fu)
                          : 0x10000;
        if ((cp >= 0x80 && cp <= 0x9f) || cp == 0x2028 || cp == 0x2029 ||
            (cp >= 0x202a && cp <= 0x202e) || (cp >= 0x2066 && cp <= 0x2069)) {
            snprintf(esc, sizeof esc, "\\u%04x", cp);
            if (!s_put(out, outlen, &o, esc, 6))
                break;
        } else if (!s_put(out, outlen, &o, s + i, n)) {
            break;
        }
        i += n;
    }
    if (outlen)
        out[o] = '\0';
    return o;
}

void ml_log(int level, const char *component, const char *fmt, ...)
{
    static const char *names[] = {"debug", "info", "warn", "error"};
    /* sd-daemon(3): SD_DEBUG <7>, SD_INFO <6>, SD_WARNING <4>, SD_ERR <3>. */
    static const char *prio[] = {"<7>", "<6>", "<4>", "<3>"};
    if (level < atomic_load(&s_log_level))
        return;
    level &= 3;
    char ts[32];
    char msg[2048];
    /* Room for a JSON message escaped at worst six bytes per byte. */
    char line[6 * sizeof msg + 256];
    ml_time_format(ml_now_ms(), ts, sizeof ts);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    size_t mlen = m < 0 ? 0 : (size_t)m < sizeof msg ? (size_t)m : sizeof msg - 1;
    const char *pre = ml_log_journal() ? prio[level] : "";
    size_t len;
    if (atomic_load(&s_log_format) == ML_LOG_FORMAT_JSON) {
        int n = snprintf(line, sizeof line, "%s{\"time\":\"%s\",\"level\":\"%s\",\"component\":\"",
                         pre, ts, names[level]);
        len = (size_t)n;
        len += s_json_escape(component, strlen(component), line + len, 128);
        len += (size_t)snprintf(line + len, sizeof line - len, "\",\"message\":\"");
        /* Room kept for the closing "} and the newline. */
        len += s_json_escape(msg, mlen, line + len, sizeof line - len - 4);
        line[len++] = '"';
        line[len++] = '}';
    } else {
        int n = snprintf(line, sizeof line, "%s%s %s %s: ", pre, ts, names[level], component);
        /* Messages quote ids, reasons and names that peers chose: escaped
         * here, in the one place every line passes, a newline or a terminal
         * escape in them cannot forge a line or reach an operator's
         * terminal. */
        len = (size_t)n + ml_text_escape(msg, mlen, line + n, sizeof line - (size_t)n - 1);
    }
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
