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

/* Writes len bytes to path atomically: ml_write_file_at in path's folder
 * (opened by name: the folder is the caller's choice). Returns 0, ML_EINVAL
 * (path too long) or ML_EIO (errno kept). */
int ml_write_file_atomic(const char *path, const void *data, size_t len);
/* Reads a whole file (up to max bytes) into a malloc'd, NUL-terminated
 * buffer. Returns 0, ML_EIO, ML_ETOOBIG or ML_ENOMEM. For files the caller
 * chose (configuration); a file in a folder someone else can write is read
 * with ml_read_file_at. */
int ml_read_file(const char *path, size_t max, char **out, size_t *len);
/* mkdir -p with mode 0750. Returns 0 or ML_EIO. */
int ml_mkdirs(const char *path);

/* Files in folders someone else can write (the spool folders). Every open
 * there is relative to a directory fd held open by the caller, never
 * follows a symbolic link (O_NOFOLLOW), never blocks on a FIFO
 * (O_NONBLOCK), and every file the agent creates is made new (O_EXCL) under
 * an unpredictable name and renamed into place within the same folder. A
 * name planted there in advance (a link to agent.db, a FIFO) is therefore
 * never written through, read through or waited on. See docs/security.md,
 * "Files the local system can write". All of these keep errno on failure. */

/* Opens the folder path, or name inside the folder dirfd (dirfd may be
 * AT_FDCWD), for use as a dirfd: O_DIRECTORY | O_NOFOLLOW, so a symbolic
 * link in the last component is refused (errno ELOOP or ENOTDIR). Returns
 * the fd (>= 0, the caller's) or ML_EIO. */
int ml_dir_open(int dirfd, const char *name);
/* Creates name in dirfd for writing: O_CREAT | O_EXCL | O_NOFOLLOW, so it
 * fails (EEXIST) when anything at all has that name. Returns the fd or
 * ML_EIO. */
int ml_file_create_excl(int dirfd, const char *name, unsigned mode);
/* Opens name in dirfd for reading without following a link or blocking on
 * a FIFO, and fstats the open fd into *st (when st is not NULL). Returns the
 * fd (blocking mode restored) or ML_EIO (cannot open: errno ELOOP for a
 * symbolic link) or ML_EINVAL (opened, but not a regular file: *st tells
 * what it is). What is read is then exactly what was checked. */
struct stat;
int ml_file_open_regular(int dirfd, const char *name, struct stat *st);
/* What st_mode is, for messages: "regular file", "directory", "symbolic
 * link", "FIFO", "socket", "device". */
const char *ml_file_type_name(unsigned st_mode);
/* Writes len bytes as name in dirfd atomically: a new file
 * .NAME.<16 random hex>.tmp made with ml_file_create_excl, written,
 * fsync'd, renamed over name in the same folder (renameat replaces a link
 * there, never follows it), then the folder fsync'd. mode as for open(2)
 * (0640 for spool files the hospital system reads). Returns 0 or ML_EIO. */
int ml_write_file_at(int dirfd, const char *name, const void *data, size_t len, unsigned mode);
/* ml_read_file for name in dirfd through ml_file_open_regular. Returns 0,
 * ML_EIO (errno kept; ELOOP: a symbolic link), ML_EINVAL (not a regular
 * file; *st_mode, when not NULL, says what it is), ML_ETOOBIG or
 * ML_ENOMEM. */
int ml_read_file_at(int dirfd, const char *name, size_t max, char **out, size_t *len,
                    unsigned *st_mode);
/* Removes name in dirfd and, when it is a folder, everything under it
 * (depth at most 8), through directory fds and unlinkat only: a link inside
 * is removed, never followed. Returns 0 (also when name does not exist) or
 * ML_EIO. */
int ml_rmtree_at(int dirfd, const char *name);

#endif
