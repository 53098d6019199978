/* Shared foundations of libmedlink: error codes, logging, ULIDs and the
 * clock. Every module returns 0 on success or a negative ML_E* code; no
 * module keeps global error state (a module that has more to say fills an
 * error buffer its caller passes in). */
#ifndef ML_COMMON_H
#define ML_COMMON_H

#include <stddef.h>
#include <stdint.h>

enum {
    ML_OK = 0,
    ML_EINVAL = -1,    /* bad argument or malformed input */
    ML_ENOMEM = -2,    /* allocation failed */
    ML_EIO = -3,       /* operating-system I/O error */
    ML_EPROTO = -4,    /* peer broke the protocol */
    ML_ETLS = -5,      /* TLS failure (handshake, verification, record) */
    ML_EAGAIN = -6,    /* nothing now; try again later */
    ML_ETOOBIG = -7,   /* over a configured size limit */
    ML_ETRUNC = -8,    /* input ended inside a record */
    ML_ENOTFOUND = -9, /* no such thing */
    ML_EDUP = -10,     /* duplicate */
    ML_EFULL = -11,    /* a store or queue is full */
    ML_ECLOSED = -12,  /* the session or channel is closed */
    ML_EDENIED = -13,  /* refused by policy */
    ML_ESTORE = -14,   /* the durable store failed */
    ML_ECONFIG = -15,  /* configuration error */
    ML_ETIMEDOUT = -16 /* a deadline passed */
};

/* Returns a static, human-readable name for an ML_E* code. */
const char *ml_strerror(int rc);

/* Formats a message into a caller's error buffer (err may be NULL or
 * errlen 0: then nothing is written). The common way modules say what went
 * wrong beyond their return code. */
void ml_seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Logging. Lines go to stderr as
 *   2026-11-22T13:36:48.123Z level component: message
 * so that journald and log files read the same. Thread-safe (one write(2)
 * per line). */
enum { ML_LOG_DEBUG = 0, ML_LOG_INFO = 1, ML_LOG_WARN = 2, ML_LOG_ERROR = 3 };
void ml_log_set_level(int level);
int ml_log_get_level(void);
/* Parses "debug|info|warn|error"; returns ML_EINVAL on anything else. */
int ml_log_parse_level(const char *s, int *level);
void ml_log(int level, const char *component, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A ULID is 26 Crockford base32 characters: 48 bits of Unix milliseconds
 * then 80 random bits. Ids made in one process are strictly increasing
 * (monotonic within a millisecond), which keeps per-sender order visible in
 * the ids themselves. Thread-safe. */
#define ML_ULID_LEN 26
void ml_ulid_new(char out[ML_ULID_LEN + 1]);
/* 1 if s is a syntactically valid ULID, else 0. */
int ml_ulid_valid(const char *s);

/* Wall clock in Unix milliseconds, and a monotonic clock in milliseconds. */
int64_t ml_now_ms(void);
int64_t ml_mono_ms(void);
/* Formats Unix milliseconds as RFC 3339 UTC ("2026-11-22T13:36:48.123Z").
 * buf must hold at least 25 bytes. Returns buf. */
char *ml_time_format(int64_t unix_ms, char *buf, size_t len);

/* Writes len bytes to path atomically: a temporary file in the same folder,
 * fsync, rename, then fsync of the folder. Returns 0 or ML_EIO (errno kept). */
int ml_write_file_atomic(const char *path, const void *data, size_t len);
/* Reads a whole file (up to max bytes) into a malloc'd, NUL-terminated
 * buffer. Returns 0, ML_EIO, ML_ETOOBIG or ML_ENOMEM. */
int ml_read_file(const char *path, size_t max, char **out, size_t *len);
/* mkdir -p with mode 0750. Returns 0 or ML_EIO. */
int ml_mkdirs(const char *path);

#endif
