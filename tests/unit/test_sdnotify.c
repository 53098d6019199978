/* Unit tests for ml_sdnotify: the datagrams sd_notify(3) describes, sent to
 * a socket the test binds and names in NOTIFY_SOCKET (a file path and an
 * abstract '@' name, as systemd may give either), the watchdog's reading of
 * WATCHDOG_USEC/WATCHDOG_PID, and the pings of the watchdog timer on a real
 * libuv loop. Criterion forks per test, so setenv stays inside a test. */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <uv.h>

#include "ml_common.h"
#include "ml_sdnotify.h"
#include "support.h"

/* Binds a datagram socket at a file path in a fresh temp folder and sets
 * NOTIFY_SOCKET to it. Returns the fd. */
static int s_bind_path(void)
{
    char dir[512];
    ml_test_tmpdir(dir, sizeof dir);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    int n = snprintf(sa.sun_path, sizeof sa.sun_path, "%s/notify", dir);
    cr_assert(n > 0 && (size_t)n < sizeof sa.sun_path, "temp path too long for a socket");
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    cr_assert(fd >= 0);
    cr_assert_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0, "bind: %s", strerror(errno));
    setenv("NOTIFY_SOCKET", sa.sun_path, 1);
    return fd;
}

/* The same in the abstract namespace: NOTIFY_SOCKET=@name. */
static int s_bind_abstract(void)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    char name[100];
    snprintf(name, sizeof name, "medlink-test-sdnotify-%ld-%ld", (long)getpid(), (long)time(NULL));
    size_t n = strlen(name);
    memcpy(sa.sun_path + 1, name, n);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    cr_assert(fd >= 0);
    socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
    cr_assert_eq(bind(fd, (struct sockaddr *)&sa, len), 0, "bind: %s", strerror(errno));
    char env[128];
    snprintf(env, sizeof env, "@%s", name);
    setenv("NOTIFY_SOCKET", env, 1);
    return fd;
}

/* Receives one datagram (waiting up to timeout_ms) into buf; returns its
 * length or -1 when none came. */
static int s_recv(int fd, char *buf, size_t len, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, timeout_ms) != 1)
        return -1;
    ssize_t n = recv(fd, buf, len - 1, 0);
    if (n < 0)
        return -1;
    buf[n] = '\0';
    return (int)n;
}

Test(sdnotify, unset_socket_is_a_noop)
{
    unsetenv("NOTIFY_SOCKET");
    cr_assert_eq(ml_sdnotify_enabled(), 0);
    cr_assert_eq(ml_sdnotify_ready("x"), 0);
    cr_assert_eq(ml_sdnotify("WATCHDOG=1"), 0);
}

Test(sdnotify, bad_socket_name_refused)
{
    setenv("NOTIFY_SOCKET", "relative/path", 1);
    cr_assert_eq(ml_sdnotify_ready(NULL), ML_EINVAL);
    char longname[300];
    memset(longname, 'a', sizeof longname - 1);
    longname[0] = '/';
    longname[sizeof longname - 1] = '\0';
    setenv("NOTIFY_SOCKET", longname, 1);
    cr_assert_eq(ml_sdnotify_ready(NULL), ML_EINVAL);
}

Test(sdnotify, path_socket_gets_ready_status_stopping)
{
    int fd = s_bind_path();
    char buf[2048];
    cr_assert_eq(ml_sdnotify_enabled(), 1);
    cr_assert_eq(ml_sdnotify_ready("listening on tcp://127.0.0.1:7400"), 0);
    cr_assert(s_recv(fd, buf, sizeof buf, 2000) > 0);
    cr_assert_str_eq(buf, "READY=1\nSTATUS=listening on tcp://127.0.0.1:7400");
    cr_assert_eq(ml_sdnotify_stopping(NULL), 0);
    cr_assert(s_recv(fd, buf, sizeof buf, 2000) > 0);
    cr_assert_str_eq(buf, "STOPPING=1");
    cr_assert_eq(ml_sdnotifyf("STATUS=%d node(s)", 7), 0);
    cr_assert(s_recv(fd, buf, sizeof buf, 2000) > 0);
    cr_assert_str_eq(buf, "STATUS=7 node(s)");
    close(fd);
}

Test(sdnotify, abstract_socket_gets_datagrams)
{
    int fd = s_bind_abstract();
    char buf[2048];
    cr_assert_eq(ml_sdnotify_ready(NULL), 0);
    cr_assert(s_recv(fd, buf, sizeof buf, 2000) > 0);
    cr_assert_str_eq(buf, "READY=1");
    cr_assert_eq(ml_sdnotify("WATCHDOG=1"), 0);
    cr_assert(s_recv(fd, buf, sizeof buf, 2000) > 0);
    cr_assert_str_eq(buf, "WATCHDOG=1");
    close(fd);
}

/* A newline in a status (a peer's reason, a multi-line configuration
 * error) must not add an assignment of its own to the datagram. */
Test(sdnotify, status_newline_cannot_add_an_assignment)
{
    int fd = s_bind_path();
    char buf[2048];
    cr_assert_eq(ml_sdnotify_status("disconnected: %s", "bye\nSTOPPING=1"), 0);
    cr_assert(s_recv(fd, buf, sizeof buf, 2000) > 0);
    cr_assert_str_eq(buf, "STATUS=disconnected: bye\\x0aSTOPPING=1");
    cr_assert_eq(ml_sdnotify_ready("x\nMAINPID=1"), 0);
    cr_assert(s_recv(fd, buf, sizeof buf, 2000) > 0);
    cr_assert_str_eq(buf, "READY=1\nSTATUS=x\\x0aMAINPID=1");
    cr_assert_eq(ml_sdnotify_reloading("a\rb\nc"), 0);
    cr_assert(s_recv(fd, buf, sizeof buf, 2000) > 0);
    cr_assert(strstr(buf, "\nSTATUS=a\\x0db\\x0ac") && !strchr(strstr(buf, "STATUS="), '\n'), "%s",
              buf);
    close(fd);
}

/* RELOADING=1 carries MONOTONIC_USEC, the CLOCK_MONOTONIC time of the
 * reload in microseconds (systemd compares it with its own clock). */
Test(sdnotify, reloading_carries_monotonic_usec)
{
    int fd = s_bind_path();
    char buf[2048];
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    unsigned long long before = (unsigned long long)ts.tv_sec * 1000000ull + ts.tv_nsec / 1000;
    cr_assert_eq(ml_sdnotify_reloading("reloading"), 0);
    clock_gettime(CLOCK_MONOTONIC, &ts);
    unsigned long long after = (unsigned long long)ts.tv_sec * 1000000ull + ts.tv_nsec / 1000;
    cr_assert(s_recv(fd, buf, sizeof buf, 2000) > 0);
    unsigned long long us = 0;
    char status[64];
    cr_assert_eq(sscanf(buf, "RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=%63[^\n]", &us, status), 2,
                 "got %s", buf);
    cr_assert(us >= before && us <= after, "MONOTONIC_USEC %llu outside [%llu, %llu]", us, before,
              after);
    cr_assert_str_eq(status, "reloading");
    close(fd);
}

Test(sdnotify, watchdog_usec_and_pid)
{
    uint64_t us = 0;
    unsetenv("WATCHDOG_USEC");
    unsetenv("WATCHDOG_PID");
    cr_assert_eq(ml_sdnotify_watchdog_usec(&us), 0);
    setenv("WATCHDOG_USEC", "400000", 1);
    cr_assert_eq(ml_sdnotify_watchdog_usec(&us), 1);
    cr_assert_eq(us, 400000);
    char pid[32];
    snprintf(pid, sizeof pid, "%ld", (long)getpid());
    setenv("WATCHDOG_PID", pid, 1);
    cr_assert_eq(ml_sdnotify_watchdog_usec(&us), 1);
    /* Another process's watchdog (a parent's variable inherited). */
    snprintf(pid, sizeof pid, "%ld", (long)getpid() + 1);
    setenv("WATCHDOG_PID", pid, 1);
    cr_assert_eq(ml_sdnotify_watchdog_usec(&us), 0);
    unsetenv("WATCHDOG_PID");
    setenv("WATCHDOG_USEC", "0", 1);
    cr_assert_eq(ml_sdnotify_watchdog_usec(&us), 0);
    setenv("WATCHDOG_USEC", "12x", 1);
    cr_assert_eq(ml_sdnotify_watchdog_usec(&us), 0);
    setenv("WATCHDOG_USEC", "-5", 1);
    cr_assert_eq(ml_sdnotify_watchdog_usec(&us), 0);
}

static void s_stop_cb(uv_timer_t *t)
{
    uv_stop(t->loop);
}

/* WATCHDOG_USEC=400000: a ping at once and then every 200 ms, from the
 * loop; over 1.1 s of loop that is 6 pings (at least 4 and at most 8 are
 * accepted, for a loaded machine). When the loop does not run, no ping. */
Test(sdnotify, watchdog_pings_from_the_loop)
{
    int fd = s_bind_path();
    setenv("WATCHDOG_USEC", "400000", 1);
    unsetenv("WATCHDOG_PID");
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_sdnotify_watchdog_t wd;
    cr_assert_eq(ml_sdnotify_watchdog_init(&loop, &wd), 0);
    cr_assert_eq(wd.on, 1);
    cr_assert_eq(wd.usec, 400000);
    uv_timer_t stop;
    uv_timer_init(&loop, &stop);
    uv_timer_start(&stop, s_stop_cb, 1100, 0);
    uv_run(&loop, UV_RUN_DEFAULT);
    char buf[256];
    int pings = 0;
    while (s_recv(fd, buf, sizeof buf, 0) > 0) {
        cr_assert_str_eq(buf, "WATCHDOG=1");
        pings++;
    }
    cr_assert(pings >= 4 && pings <= 8, "%d pings in 1.1 s at a 200 ms period", pings);
    /* A stuck loop: nothing arrives while the loop does not run. */
    struct timespec pause = {0, 600 * 1000 * 1000};
    nanosleep(&pause, NULL);
    cr_assert_eq(s_recv(fd, buf, sizeof buf, 0), -1, "a ping without the loop running");
    ml_sdnotify_watchdog_close(&wd);
    ml_sdnotify_watchdog_close(&wd);
    uv_close((uv_handle_t *)&stop, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(&loop), 0);
    close(fd);
}

/* Unreferenced: a loop with only the watchdog left ends by itself. */
Test(sdnotify, watchdog_does_not_keep_the_loop_alive)
{
    int fd = s_bind_path();
    setenv("WATCHDOG_USEC", "400000", 1);
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_sdnotify_watchdog_t wd;
    ml_sdnotify_watchdog_init(&loop, &wd);
    cr_assert_eq(uv_run(&loop, UV_RUN_DEFAULT), 0);
    ml_sdnotify_watchdog_close(&wd);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert_eq(uv_loop_close(&loop), 0);
    close(fd);
}

Test(sdnotify, no_watchdog_without_usec)
{
    unsetenv("WATCHDOG_USEC");
    uv_loop_t loop;
    uv_loop_init(&loop);
    ml_sdnotify_watchdog_t wd;
    ml_sdnotify_watchdog_init(&loop, &wd);
    cr_assert_eq(wd.on, 0);
    ml_sdnotify_watchdog_close(&wd);
    cr_assert_eq(uv_loop_close(&loop), 0);
}
