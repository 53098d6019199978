/* Checks of what a configuration names (see ml_check.h). Everything here
 * speaks to an operator who has the file open in an editor: each message
 * names the key or file and says what to do. */
#include "ml_check.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ml_common.h"

void ml_check_init(ml_check_t *c)
{
    memset(c, 0, sizeof *c);
}

void ml_check_add(ml_check_t *c, const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    c->n++;
    size_t need = strlen(line) + (c->len ? 1 : 0);
    if (c->left_out || c->len + need >= sizeof c->text) {
        c->left_out++;
        return;
    }
    snprintf(c->text + c->len, sizeof c->text - c->len, "%s%s", c->len ? "\n" : "", line);
    c->len += need;
}

void ml_check_add_lines(ml_check_t *c, const char *text)
{
    while (text && *text) {
        size_t n = strcspn(text, "\n");
        ml_check_add(c, "%.*s", (int)n, text);
        text += n;
        if (*text == '\n')
            text++;
    }
}

void ml_check_print(const ml_check_t *c, const char *prog, FILE *out)
{
    const char *p = c->text;
    while (*p) {
        size_t n = strcspn(p, "\n");
        fprintf(out, "%s: %.*s\n", prog, (int)n, p);
        p += n;
        if (*p == '\n')
            p++;
    }
    if (c->left_out)
        fprintf(out, "%s: (and %d more problems)\n", prog, c->left_out);
}

/* 1 if s is a host name or IPv4 address: letters, digits, '-', '.', '_'. */
static int s_host_name(const char *s, size_t n)
{
    if (n == 0 || n > 253)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && s[i] != '-' && s[i] != '.' && s[i] != '_')
            return 0;
    return 1;
}

int ml_check_endpoint(const char *ep, int bind, char *err, size_t errlen)
{
    static const char scheme[] = "tcp://";
    const char *example = bind ? "tcp://0.0.0.0:7400" : "tcp://127.0.0.1:7400";
    if (!ep || !*ep) {
        ml_seterr(err, errlen, "no endpoint given (expected tcp://HOST:PORT, e.g. %s)", example);
        return ML_ECONFIG;
    }
    if (strncmp(ep, scheme, sizeof scheme - 1) != 0) {
        /* The usual mistake is a bare "host:port"; say so. */
        ml_seterr(err, errlen, "%s (expected tcp://HOST:PORT, e.g. %s)",
                  strstr(ep, "://") ? "only tcp:// endpoints are supported" : "tcp:// is missing",
                  example);
        return ML_ECONFIG;
    }
    const char *host = ep + sizeof scheme - 1;
    const char *colon;
    size_t hlen;
    int host_ok;
    if (*host == '[') {
        const char *close = strchr(host, ']');
        colon = close ? close + 1 : NULL;
        hlen = close ? (size_t)(close - host - 1) : 0;
        host_ok = close && hlen > 0 && strspn(host + 1, "0123456789abcdefABCDEF:.") >= hlen;
        if (colon && *colon != ':')
            colon = NULL;
    } else {
        colon = strrchr(host, ':');
        hlen = colon ? (size_t)(colon - host) : strlen(host);
        host_ok = s_host_name(host, hlen) || (bind && hlen == 1 && host[0] == '*');
    }
    if (!colon) {
        ml_seterr(err, errlen, "the endpoint has no :PORT (expected tcp://HOST:PORT, e.g. %s)",
                  example);
        return ML_ECONFIG;
    }
    if (!host_ok) {
        ml_seterr(err, errlen,
                  "the endpoint's host \"%.*s\" is not a host name, an IPv4 address or "
                  "[IPv6]%s (e.g. %s)",
                  (int)(hlen > 64 ? 64 : hlen), *host == '[' ? host + 1 : host, bind ? " or *" : "",
                  example);
        return ML_ECONFIG;
    }
    const char *port = colon + 1;
    if (bind && strcmp(port, "*") == 0)
        return 0;
    char *end = NULL;
    errno = 0;
    long p = isdigit((unsigned char)*port) ? strtol(port, &end, 10) : -1;
    if (p < 0 || !end || *end || errno == ERANGE || p > 65535 || (p == 0 && !bind)) {
        ml_seterr(err, errlen, "the endpoint's port \"%.16s\" is not a number from %d to 65535",
                  port, bind ? 0 : 1);
        return ML_ECONFIG;
    }
    return 0;
}

int ml_check_private_fd(int fd, const char *path, const char *what, char *err, size_t errlen)
{
    struct stat st;
    if (fstat(fd, &st) != 0) {
        ml_seterr(err, errlen, "%s %s: cannot stat: %s", what, path, strerror(errno));
        return ML_EIO;
    }
    if (!S_ISREG(st.st_mode)) {
        ml_seterr(err, errlen, "%s %s: not a regular file", what, path);
        return ML_EINVAL;
    }
    if (st.st_mode & 077) {
        ml_seterr(err, errlen, "%s %s is %s by group or others (mode %04o): chmod 600 %s", what,
                  path, (st.st_mode & 044) ? "readable" : "writable or executable",
                  (unsigned)(st.st_mode & 07777), path);
        return ML_EINVAL;
    }
    return 0;
}

int ml_check_file(ml_check_t *c, const char *what, const char *path, int flags)
{
    char err[1024];
    struct stat st;
    if (!path || !*path) {
        ml_check_add(c, "%s: no file given", what);
        return ML_ECONFIG;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        ml_check_add(c, "%s = %s: %s", what, path,
                     errno == ENOENT ? "no such file" : strerror(errno));
        return ML_ECONFIG;
    }
    int rc = 0;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ml_check_add(c, "%s = %s: not a regular file", what, path);
        rc = ML_ECONFIG;
    } else if (flags == ML_CHECK_PRIVATE &&
               ml_check_private_fd(fd, path, "file", err, sizeof err) != 0) {
        ml_check_add(c, "%s: %s", what, err);
        rc = ML_ECONFIG;
    }
    close(fd);
    return rc;
}

int ml_check_dir(ml_check_t *c, const char *what, const char *path)
{
    struct stat st;
    char buf[PATH_MAX];
    if (!path || !*path) {
        ml_check_add(c, "%s: no folder given", what);
        return ML_ECONFIG;
    }
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) {
        ml_check_add(c, "%s = %s: path too long", what, path);
        return ML_ECONFIG;
    }
    /* Walk up to the nearest folder that exists: that is where the
     * program will create the rest. */
    int missing = 0;
    while (stat(buf, &st) != 0) {
        /* ENOTDIR: a file stands where a parent folder should; walking up
         * finds it and says so below. */
        if (errno != ENOENT && errno != ENOTDIR) {
            ml_check_add(c, "%s = %s: %s: %s", what, path, buf, strerror(errno));
            return ML_ECONFIG;
        }
        missing = 1;
        char *slash = strrchr(buf, '/');
        if (!slash)
            snprintf(buf, sizeof buf, ".");
        else if (slash == buf)
            buf[1] = '\0';
        else
            *slash = '\0';
    }
    if (!S_ISDIR(st.st_mode)) {
        ml_check_add(c, "%s = %s: %s is not a folder", what, path, buf);
        return ML_ECONFIG;
    }
    if (access(buf, W_OK | X_OK) != 0) {
        ml_check_add(c, "%s = %s: %s%s is not writable by this user: %s", what, path,
                     missing ? "cannot be created, since " : "", buf, strerror(errno));
        return ML_ECONFIG;
    }
    return 0;
}
