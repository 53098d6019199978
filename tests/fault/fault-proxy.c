/* fault-proxy: one agent's link to the broker, made breakable. A plain TCP
 * relay on 127.0.0.1 (the agent connects to it, it connects on to medlinkd)
 * that the soak script controls with signals, so that links fail the way
 * they do between a township clinic and the data centre while both ends
 * keep running:
 *
 *   SIGSTOP / SIGCONT  the link black-holes: connections stay open, bytes
 *                      stop moving both ways (heartbeats time out on both
 *                      sides) and move again;
 *   SIGUSR1            every connection is reset at once (RST both ways),
 *                      mid-record, mid-transfer;
 *   SIGUSR2            toggles "down": connections are reset and new ones
 *                      are reset as soon as they arrive, until the next
 *                      SIGUSR2 (the link is down for a while);
 *   SIGTERM / SIGINT   exits.
 *
 *   fault-proxy --listen PORT --to PORT     (both on 127.0.0.1)
 *
 * One thread, poll(2), at most S_MAX_CONN connections, a fixed buffer per
 * direction: when the receiver does not read, the sender is not read
 * either (TCP's own flow control carries through). */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define S_MAX_CONN 64
#define S_BUF (256 * 1024)

typedef struct {
    int fd[2]; /* 0: the agent's side, 1: the broker's side */
    /* buf[d] holds bytes read from fd[d] and not yet written to fd[1 - d]. */
    char *buf[2];
    size_t len[2], off[2];
    int used;
} s_conn_t;

static s_conn_t s_conns[S_MAX_CONN];
static volatile sig_atomic_t s_reset_all, s_toggle_down, s_quit;
static int s_down;

static void s_on_usr1(int sig)
{
    s_reset_all = 1;
}

static void s_on_usr2(int sig)
{
    s_toggle_down = 1;
}

static void s_on_term(int sig)
{
    s_quit = 1;
}

static void s_log(const char *what)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    fprintf(stderr, "%lld.%03ld fault-proxy: %s\n", (long long)ts.tv_sec, ts.tv_nsec / 1000000,
            what);
}

/* Closes fd so that the peer sees a reset, not an orderly close. */
static void s_rst(int fd)
{
    if (fd < 0)
        return;
    struct linger lg = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(fd);
}

static void s_drop(s_conn_t *c)
{
    s_rst(c->fd[0]);
    s_rst(c->fd[1]);
    free(c->buf[0]);
    free(c->buf[1]);
    memset(c, 0, sizeof *c);
    c->fd[0] = c->fd[1] = -1;
}

static int s_listen(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 64) != 0) {
        perror("fault-proxy: listen");
        exit(1);
    }
    return fd;
}

/* Connects to the broker (blocking; it is on this machine). */
static int s_connect(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static void s_accept(int lfd, int to_port)
{
    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
    if (fd < 0)
        return;
    if (s_down) {
        s_rst(fd);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int up = s_connect(to_port);
    if (up < 0) {
        s_rst(fd);
        return;
    }
    for (int i = 0; i < S_MAX_CONN; i++) {
        s_conn_t *c = &s_conns[i];
        if (c->used)
            continue;
        c->used = 1;
        c->fd[0] = fd;
        c->fd[1] = up;
        c->buf[0] = malloc(S_BUF);
        c->buf[1] = malloc(S_BUF);
        c->len[0] = c->len[1] = c->off[0] = c->off[1] = 0;
        if (!c->buf[0] || !c->buf[1])
            s_drop(c);
        return;
    }
    s_rst(fd);
    s_rst(up);
}

/* Moves bytes for one connection; returns -1 when it is over. */
static int s_pump(s_conn_t *c, const short rev[2])
{
    for (int d = 0; d < 2; d++) {
        int o = 1 - d;
        if ((rev[d] & (POLLIN | POLLHUP | POLLERR)) && c->len[d] == 0) {
            ssize_t n = read(c->fd[d], c->buf[d], S_BUF);
            if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
                return -1;
            if (n > 0) {
                c->len[d] = (size_t)n;
                c->off[d] = 0;
            }
        }
        if (c->len[d] > 0) {
            ssize_t n = write(c->fd[o], c->buf[d] + c->off[d], c->len[d]);
            if (n < 0 && errno != EAGAIN && errno != EINTR)
                return -1;
            if (n > 0) {
                c->off[d] += (size_t)n;
                c->len[d] -= (size_t)n;
            }
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    int listen_port = 0, to_port = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--listen"))
            listen_port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--to"))
            to_port = atoi(argv[i + 1]);
    }
    if (!listen_port || !to_port) {
        fprintf(stderr, "usage: fault-proxy --listen PORT --to PORT\n");
        return 2;
    }
    for (int i = 0; i < S_MAX_CONN; i++)
        s_conns[i].fd[0] = s_conns[i].fd[1] = -1;
    struct sigaction sa = {0};
    sa.sa_handler = s_on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = s_on_usr2;
    sigaction(SIGUSR2, &sa, NULL);
    sa.sa_handler = s_on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    int lfd = s_listen(listen_port);
    s_log("listening");
    while (!s_quit) {
        if (s_toggle_down) {
            s_toggle_down = 0;
            s_down = !s_down;
            s_reset_all = s_down;
            s_log(s_down ? "link down" : "link up");
        }
        if (s_reset_all) {
            s_reset_all = 0;
            int n = 0;
            for (int i = 0; i < S_MAX_CONN; i++)
                if (s_conns[i].used) {
                    s_drop(&s_conns[i]);
                    n++;
                }
            char msg[64];
            snprintf(msg, sizeof msg, "reset %d connection(s)", n);
            s_log(msg);
        }
        struct pollfd p[1 + 2 * S_MAX_CONN];
        int idx[2 * S_MAX_CONN];
        int np = 0;
        p[np++] = (struct pollfd){.fd = lfd, .events = POLLIN};
        for (int i = 0; i < S_MAX_CONN; i++) {
            s_conn_t *c = &s_conns[i];
            if (!c->used)
                continue;
            for (int d = 0; d < 2; d++) {
                short ev = 0;
                if (c->len[d] == 0)
                    ev |= POLLIN;
                if (c->len[1 - d] > 0)
                    ev |= POLLOUT;
                idx[np - 1] = i;
                p[np++] = (struct pollfd){.fd = c->fd[d], .events = ev};
            }
        }
        if (poll(p, (nfds_t)np, 200) < 0) {
            if (errno == EINTR)
                continue;
            perror("fault-proxy: poll");
            return 1;
        }
        if (p[0].revents & POLLIN)
            s_accept(lfd, to_port);
        for (int k = 1; k + 1 < np; k += 2) {
            s_conn_t *c = &s_conns[idx[k - 1]];
            short rev[2] = {p[k].revents, p[k + 1].revents};
            if (!rev[0] && !rev[1])
                continue;
            if (s_pump(c, rev) < 0)
                s_drop(c);
        }
    }
    for (int i = 0; i < S_MAX_CONN; i++)
        if (s_conns[i].used)
            s_drop(&s_conns[i]);
    close(lfd);
    return 0;
}
