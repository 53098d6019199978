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
    ML_EINVAL = -1,     /* bad argument or malformed input */
    ML_ENOMEM = -2,     /* allocation failed */
    ML_EIO = -3,        /* operating-system I/O error */
    ML_EPROTO = -4,     /* peer broke the protocol */
    ML_ETLS = -5,       /* TLS failure (handshake, verification, record) */
    ML_EAGAIN = -6,     /* nothing now; try again later */
    ML_ETOOBIG = -7,    /* over a configured size limit */
    ML_ETRUNC = -8,     /* input ended inside a record */
    ML_ENOTFOUND = -9,  /* no such thing */
    ML_EDUP = -10,      /* duplicate */
    ML_EFULL = -11,     /* a store or queue is full */
    ML_ECLOSED = -12,   /* the session or channel is closed */
    ML_EDENIED = -13,   /* refused by policy */
    ML_ESTORE = -14,    /* the durable store failed */
    ML_ECONFIG = -15,   /* configuration error */
    ML_ETIMEDOUT = -16, /* a deadline passed */
    ML_EIDUSED = -17    /* an id already names something else */
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
 * (ML_LOG_FORMAT_TEXT, the default) or, for log shippers, as one JSON
 * object per line (ML_LOG_FORMAT_JSON):
 *   {"time":"2026-11-22T13:36:48.123Z","level":"info","component":"broker",
 *    "message":"..."}
 * When stderr is the journal's stream (systemd sets JOURNAL_STREAM to the
 * device and inode of the stream it gives a service; they are compared with
 * fstat(2) of stderr once, at the first line), each line starts with its
 * syslog priority as sd-daemon(3) documents: <3> error, <4> warn, <6> info,
 * <7> debug, so that journalctl -p filters by level. Text from peers is
 * escaped in both formats (ml_text_escape; JSON escapes, with invalid UTF-8
 * replaced by U+FFFD). Thread-safe: level and format are atomics any thread
 * may read while the loop thread sets them (a reload), and each line is one
 * write(2), so lines from threads never interleave. */
enum { ML_LOG_DEBUG = 0, ML_LOG_INFO = 1, ML_LOG_WARN = 2, ML_LOG_ERROR = 3 };
enum { ML_LOG_FORMAT_TEXT = 0, ML_LOG_FORMAT_JSON = 1 };
void ml_log_set_level(int level);
int ml_log_get_level(void);
/* Parses "debug|info|warn|error"; returns ML_EINVAL on anything else. */
int ml_log_parse_level(const char *s, int *level);
/* ML_LOG_FORMAT_TEXT or ML_LOG_FORMAT_JSON; anything else is taken as
 * text. */
void ml_log_set_format(int format);
int ml_log_get_format(void);
/* Parses "text|json"; returns ML_EINVAL on anything else. */
int ml_log_parse_format(const char *s, int *format);
/* 1 if stderr is the journal's stream (lines carry <N> priorities), else
 * 0. Decided once, at the first call or the first line logged. */
int ml_log_journal(void);
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

/* The file helpers that were declared here (ml_write_file_atomic,
 * ml_read_file, ml_mkdirs, ml_dir_open, ml_file_*, ml_write_file_at,
 * ml_read_file_at, ml_rmtree_at) live in ml_fs.h, included here so that
 * every caller keeps compiling unchanged. */
#include "ml_fs.h"

#endif
