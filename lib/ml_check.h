/* Checks of what a configuration file names, shared by medlinkd,
 * medlink-agent and medlinkctl so that the three programs refuse the same
 * mistakes with the same words: endpoints (tcp://HOST:PORT), files that
 * must exist and be readable, private keys that nobody but their owner may
 * read, and folders that the program will create. Used at start-up and by
 * --check-config, which reports every problem it finds (ml_check_t collects
 * them) instead of stopping at the first. */
#ifndef ML_CHECK_H
#define ML_CHECK_H

#include <stddef.h>
#include <stdio.h>

/* Problems found so far: one line each, in text, separated by '\n'. Embed
 * it (no allocation); when text is full, later problems are only counted. */
typedef struct {
    char text[8192];
    size_t len;
    int n;        /* problems found */
    int left_out; /* of which not in text */
} ml_check_t;

void ml_check_init(ml_check_t *c);
/* Adds one problem line. */
void ml_check_add(ml_check_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Adds every line of a multi-line message (as ml_ini_check writes). */
void ml_check_add_lines(ml_check_t *c, const char *text);
/* Writes every problem to f, each line prefixed by prog and ": ". */
void ml_check_print(const ml_check_t *c, const char *prog, FILE *f);

/* Checks the syntax of a ZeroMQ endpoint: tcp://HOST:PORT, where HOST is a
 * name, an IPv4 address or [IPv6], and PORT is 1..65535. With bind, HOST
 * may also be "*" and PORT "*" or 0 (an ephemeral port), as zmq_bind
 * takes them. Returns 0, or ML_ECONFIG with err saying what is wrong and
 * giving an example (err does not repeat the endpoint). */
int ml_check_endpoint(const char *endpoint, int bind, char *err, size_t errlen);

/* Checks that the open file fd is a regular file that neither group nor
 * others may read, write or execute: anyone who can read a private key can
 * be the node, anyone who can read a store key can read every stored
 * payload. Checked with fstat on the fd the caller goes on to read, so
 * what is checked is what is read. what names the file for the message
 * ("private key file", "store key file"). Returns 0, ML_EIO (fstat failed)
 * or ML_EINVAL, with err naming the file, its mode and the chmod to run. */
int ml_check_private_fd(int fd, const char *path, const char *what, char *err, size_t errlen);

enum {
    ML_CHECK_READABLE = 0, /* exists, is a regular file, can be opened for reading */
    ML_CHECK_PRIVATE = 1   /* the same, and ml_check_private_fd */
};
/* Checks the file path (described as what, e.g. "[agent] cert") as flags
 * say and adds a problem to c when it fails. Returns 0 or ML_ECONFIG. */
int ml_check_file(ml_check_t *c, const char *what, const char *path, int flags);
/* Checks a folder the program creates when missing (data_dir, spool_dir):
 * if it exists it must be a folder we may write; if not, the nearest
 * existing parent must be one. Returns 0 or ML_ECONFIG (added to c). */
int ml_check_dir(ml_check_t *c, const char *what, const char *path);

#endif
