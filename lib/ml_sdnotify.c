/* sd_notify(3)'s datagram protocol and the watchdog timer (ml_sdnotify.h).
 * A new socket per notification: they are rare (start, reload, stop, and a
 * watchdog ping every few seconds), and no descriptor is kept that a fork
 * or a close-everything loop could disturb. */
#include "ml_sdnotify.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "ml_common.h"
#include "ml_text.h"

int ml_sdnotify_enabled(void)
{
    const char *e = getenv("NOTIFY_SOCKET");
    return e && *e;
}

int ml_sdnotify(const char *state)
{
    const char *e = getenv("NOTIFY_SOCKET");
    if (!e || !*e)
        return 0;
    struct sockaddr_un sa;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    size_t n = strlen(e);
    /* '@' names a socket in the abstract namespace: a leading NUL, and the
     * address length (not a terminator) says where the name ends. */
    if ((e[0] != '/' && e[0] != '@') || n > sizeof sa.sun_path - (e[0] == '/'))
        return ML_EINVAL;
    memcpy(sa.sun_path, e, n);
    if (e[0] == '@')
        sa.sun_path[0] = '\0';
    socklen_t alen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return ML_EIO;
    ssize_t w = sendto(fd, state, strlen(state), MSG_NOSIGNAL | MSG_DONTWAIT,
                       (const struct sockaddr *)&sa, alen);
    int saved = errno;
    close(fd);
    errno = saved;
    return w < 0 ? ML_EIO : 0;
}

int ml_sdnotifyf(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return ml_sdnotify(buf);
}

/* One line of text for a STATUS= value: escaped, at most outlen - 1. */
static void s_status_line(const char *status, char *out, size_t outlen)
{
    ml_text_escape(status, strlen(status), out, outlen);
}

int ml_sdnotify_status(const char *fmt, ...)
{
    char raw[1024], line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(raw, sizeof raw, fmt, ap);
    va_end(ap);
    s_status_line(raw, line, sizeof line);
    return ml_sdnotifyf("STATUS=%s", line);
}

/* state, then "\nSTATUS=" and the escaped status when there is one. */
static int s_with_status(const char *state, const char *status)
{
    if (!status)
        return ml_sdnotify(state);
    char line[900];
    s_status_line(status, line, sizeof line);
    return ml_sdnotifyf("%s\nSTATUS=%s", state, line);
}

int ml_sdnotify_ready(const char *status)
{
    return s_with_status("READY=1", status);
}

int ml_sdnotify_stopping(const char *status)
{
    return s_with_status("STOPPING=1", status);
}

int ml_sdnotify_reloading(const char *status)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    unsigned long long us =
        (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000ull;
    char state[64];
    snprintf(state, sizeof state, "RELOADING=1\nMONOTONIC_USEC=%llu", us);
    return s_with_status(state, status);
}

/* A decimal number with nothing after it, or 0 (not one, or overflow). */
static unsigned long long s_number(const char *s)
{
    if (!s || *s < '0' || *s > '9')
        return 0;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    return errno || *end ? 0 : v;
}

int ml_sdnotify_watchdog_usec(uint64_t *usec)
{
    unsigned long long us = s_number(getenv("WATCHDOG_USEC"));
    const char *pid = getenv("WATCHDOG_PID");
    /* WATCHDOG_PID names the process systemd watches; a child that
     * inherited the variable must not ping in its parent's name. */
    if (us == 0 || (pid && s_number(pid) != (unsigned long long)getpid()))
        return 0;
    *usec = us;
    return 1;
}

static void s_watchdog_cb(uv_timer_t *t)
{
    (void)t;
    ml_sdnotify("WATCHDOG=1");
}

int ml_sdnotify_watchdog_init(uv_loop_t *loop, ml_sdnotify_watchdog_t *wd)
{
    memset(wd, 0, sizeof *wd);
    if (!ml_sdnotify_watchdog_usec(&wd->usec)) {
        wd->usec = 0;
        return 0;
    }
    /* Half the interval, as sd_watchdog_enabled(3) recommends: one late
     * ping is not yet a missed deadline. */
    uint64_t ms = wd->usec / 2000;
    if (ms == 0)
        ms = 1;
    uv_timer_init(loop, &wd->timer);
    wd->on = 1;
    uv_unref((uv_handle_t *)&wd->timer);
    /* The first ping at once: systemd's clock started with READY=1. */
    uv_timer_start(&wd->timer, s_watchdog_cb, 0, ms);
    ml_log(ML_LOG_INFO, "systemd", "watchdog on: WATCHDOG=1 every %llu ms (WATCHDOG_USEC=%llu)",
           (unsigned long long)ms, (unsigned long long)wd->usec);
    return 0;
}

void ml_sdnotify_watchdog_close(ml_sdnotify_watchdog_t *wd)
{
    if (!wd || !wd->on)
        return;
    if (!uv_is_closing((uv_handle_t *)&wd->timer)) {
        uv_timer_stop(&wd->timer);
        uv_close((uv_handle_t *)&wd->timer, NULL);
    }
}
