/* Service notifications to systemd (sd_notify(3)) without libsystemd: one
 * datagram of newline-separated VAR=VALUE assignments to the AF_UNIX socket
 * named by $NOTIFY_SOCKET (a file path, or an abstract name written with a
 * leading '@'). The protocol is documented as stable (sd_notify(3),
 * "Notes"), so medlinkd and medlink-agent speak it directly instead of
 * linking one more library. When NOTIFY_SOCKET is not set (not started by
 * systemd, or Type= is not notify) every call does nothing and returns 0.
 *
 * The watchdog: when systemd sets WATCHDOG_USEC (WatchdogSec=) and, if it
 * sets WATCHDOG_PID, that is our pid, a timer on the program's loop sends
 * WATCHDOG=1 every WATCHDOG_USEC/2. The pings come from the loop itself, so
 * a loop that is stuck (a blocking call, a busy loop) stops them and
 * systemd kills and restarts the service. */
#ifndef ML_SDNOTIFY_H
#define ML_SDNOTIFY_H

#include <stdint.h>

#include <uv.h>

/* 1 if $NOTIFY_SOCKET is set, else 0. */
int ml_sdnotify_enabled(void);
/* Sends state (e.g. "READY=1\nSTATUS=listening") as one datagram. Returns 0
 * (sent, or NOTIFY_SOCKET not set), ML_EINVAL (NOTIFY_SOCKET is not a path
 * or '@' name, or too long) or ML_EIO (socket or send failed; errno kept).
 * Never blocks (MSG_DONTWAIT); thread-safe (a socket per call). */
int ml_sdnotify(const char *state);
/* ml_sdnotify of a formatted state (at most 1 KiB). */
int ml_sdnotifyf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* "STATUS=" and the formatted text (at most 1 KiB) made one harmless line
 * with ml_text_escape: a newline in it (a peer's reason, a multi-line
 * configuration error) cannot add an assignment of its own (READY=1,
 * MAINPID=) to the datagram. */
int ml_sdnotify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* "READY=1", "STOPPING=1" with "STATUS=status", status escaped as by
 * ml_sdnotify_status (status may be NULL: no STATUS line). */
int ml_sdnotify_ready(const char *status);
int ml_sdnotify_stopping(const char *status);
/* "RELOADING=1" with "MONOTONIC_USEC=" the CLOCK_MONOTONIC time in
 * microseconds (systemd.service(5), Type=notify-reload, needs it to tell
 * this reload from an older one) and STATUS (escaped). Follow with ml_sdnotify_ready
 * when the reload is over, whether it succeeded or not. */
int ml_sdnotify_reloading(const char *status);

/* The watchdog interval systemd asks for: 1 and *usec set when
 * WATCHDOG_USEC is a positive number and WATCHDOG_PID is unset or our pid;
 * 0 otherwise (no watchdog). */
int ml_sdnotify_watchdog_usec(uint64_t *usec);

/* A watchdog timer embedded by its owner (lives until its close callback;
 * here: until the loop has run after ml_sdnotify_watchdog_close). */
typedef struct {
    uv_timer_t timer;
    uint64_t usec; /* WATCHDOG_USEC, 0: no watchdog */
    int on;        /* the timer was initialised */
} ml_sdnotify_watchdog_t;

/* Starts the pings on loop when ml_sdnotify_watchdog_usec says so (else
 * does nothing). The timer is unreferenced: it never keeps the loop alive
 * by itself. Returns 0. Loop thread only. */
int ml_sdnotify_watchdog_init(uv_loop_t *loop, ml_sdnotify_watchdog_t *wd);
/* Stops the pings and closes the timer (safe twice, safe after a uv_walk
 * closed it, safe when it was never started). Loop thread only. */
void ml_sdnotify_watchdog_close(ml_sdnotify_watchdog_t *wd);

#endif
