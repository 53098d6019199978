/* Integration-test harness: real processes, real certificates, real
 * SQLite files, all on 127.0.0.1 in a temp folder. */
#include "harness.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <jansson.h>

#include "ml_crypt.h"

void h_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static long s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

const char *h_bin(const char *name, char *out, size_t len)
{
    const char *b = getenv("ML_BUILD_DIR");
    const char *sub = strcmp(name, "medlinkd") == 0        ? "broker"
                      : strcmp(name, "medlink-agent") == 0 ? "clients/agent"
                      : strcmp(name, "medlinkctl") == 0    ? "clients/ctl"
                                                           : "tests/bench";
    snprintf(out, len, "%s/%s/%s", b ? b : ".", sub, name);
    return out;
}

static int s_sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int s_sh(const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int st = system(cmd);
    return st == -1 ? -1 : WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static void s_write(const char *path, const char *content)
{
    FILE *f = fopen(path, "w");
    cr_assert(f, "cannot write %s", path);
    fputs(content, f);
    fclose(f);
}

const char *h_http_ini;

void h_world_init(h_world_t *w, const char *extra)
{
    memset(w, 0, sizeof *w);
    const char *base = getenv("TMPDIR");
    snprintf(w->dir, sizeof w->dir, "%s/mlit.XXXXXX", base && *base ? base : "/tmp");
    cr_assert(mkdtemp(w->dir), "mkdtemp");
    snprintf(w->pki, sizeof w->pki, "%s/pki", w->dir);
    const char *src = getenv("ML_SOURCE_DIR");
    int rc = s_sh("'%s/deploy/pki.sh' --dir '%s' %s %s %s %s %s %s %s %s >'%s/pki.log' 2>&1",
                  src ? src : ".", w->pki, H_BROKER, H_COUNTY, H_XINZHAN, H_FENGLE, H_OPS, H_CITY,
                  H_READ_A, H_READ_B, w->dir);
    cr_assert_eq(rc, 0, "pki.sh failed, see %s/pki.log", w->dir);
    /* Every store of the test community seals patient data at rest. */
    rc = s_sh("umask 077 && openssl rand -hex 32 >'%s/broker-store.key'", w->pki);
    cr_assert_eq(rc, 0, "cannot make the broker's store key");
    /* Port 0: the broker binds a port the system picks and writes it to
     * its port file, which h_broker_start reads (no free port is guessed
     * here: one found free and closed again could be taken by anyone
     * before medlinkd binds it). Until then endpoint is what the config
     * says. */
    w->port = 0;
    snprintf(w->listen, sizeof w->listen, "tcp://127.0.0.1:0");
    snprintf(w->endpoint, sizeof w->endpoint, "%s", w->listen);
    snprintf(w->port_file, sizeof w->port_file, "%s/medlinkd.port", w->dir);
    char path[700], buf[8192];
    snprintf(path, sizeof path, "%s/medlinkd.ini", w->dir);
    /* The [http] listen line is written without spaces: tests rewrite the
     * [broker] one with sed '^listen = ' (test_session_attack.c), which must
     * leave this one alone. */
    /* A test may also write its own [http] section in extra (after its
     * [broker] lines): then the harness writes none, as a section may not
     * appear twice. */
    const char *own = extra ? strstr(extra, "[http]") : NULL;
    const char *hsrc = own ? own : h_http_ini;
    const char *hl = hsrc ? strstr(hsrc, "listen") : NULL;
    snprintf(buf, sizeof buf,
             "[broker]\n"
             "id = %s\n"
             "listen = %s\n"
             "data_dir = data/broker\n"
             "ca = pki/ca.crt\n"
             "cert = pki/%s.crt\n"
             "key = pki/%s.key\n"
             "store_key = pki/broker-store.key\n"
             "port_file = medlinkd.port\n"
             "log_level = info\n"
             "heartbeat_ms = 1000\n"
             "session_timeout_ms = 5000\n"
             "handshake_timeout_ms = 3000\n"
             "%s\n"
             "[node %s]\nrole = COUNTY_HOSPITAL\ncommunity = zhaozhou\nname = Zhaozhou County "
             "People's Hospital\n\n"
             "[node %s]\nrole = TOWNSHIP_CLINIC\ncommunity = zhaozhou\nname = Xinzhan Township "
             "Health Centre\n\n"
             "[node %s]\nrole = TOWNSHIP_CLINIC\ncommunity = zhaozhou\nname = Fengle Township "
             "Health Centre\n\n"
             "[node %s]\nrole = OPS\ncommunity = zhaozhou\nname = Community IT desk\n\n"
             "[node %s]\nrole = CITY_HOSPITAL\ncommunity = shijiazhuang\nname = Shijiazhuang "
             "City Hospital\n\n"
             "[node %s]\nrole = IMAGING_CENTRE\ncommunity = shijiazhuang\nname = Reading centre "
             "A\nservices = %s\n\n"
             "[node %s]\nrole = IMAGING_CENTRE\ncommunity = shijiazhuang\nname = Reading centre "
             "B\nservices = %s\n\n"
             "[community zhaozhou]\nfallback = %s\n\n"
             "[acl TOWNSHIP_CLINIC]\nREFERRAL = COUNTY_HOSPITAL CITY_HOSPITAL\n"
             "REFERRAL_UPDATE = COUNTY_HOSPITAL CITY_HOSPITAL\n"
             "IMAGING_CONSULT = IMAGING_CENTRE\nIMAGING_CHUNK = IMAGING_CENTRE\n"
             "IMAGING_UPDATE = IMAGING_CENTRE\n"
             "DOWN_TRANSFER_UPDATE = COUNTY_HOSPITAL CITY_HOSPITAL\n\n"
             "[acl COUNTY_HOSPITAL]\nREFERRAL = CITY_HOSPITAL\n"
             "REFERRAL_UPDATE = TOWNSHIP_CLINIC VILLAGE_CLINIC\n"
             "DOWN_TRANSFER = TOWNSHIP_CLINIC VILLAGE_CLINIC\n"
             "DOWN_TRANSFER_UPDATE = TOWNSHIP_CLINIC VILLAGE_CLINIC\n\n"
             "[acl CITY_HOSPITAL]\nREFERRAL_UPDATE = TOWNSHIP_CLINIC VILLAGE_CLINIC\n\n"
             "[acl IMAGING_CENTRE]\nIMAGING_UPDATE = TOWNSHIP_CLINIC VILLAGE_CLINIC\n"
             "IMAGING_REPORT = TOWNSHIP_CLINIC VILLAGE_CLINIC\n"
             "IMAGING_RESEND = TOWNSHIP_CLINIC VILLAGE_CLINIC\n"
             "\n%s%s%s\n",
             H_BROKER, w->listen, H_BROKER, H_BROKER, extra ? extra : "", H_COUNTY, H_XINZHAN,
             H_FENGLE, H_OPS, H_CITY, H_READ_A, H_SERVICE_CT, H_READ_B, H_SERVICE_CT, H_CITY,
             own ? "" : "[http]\n", own || hl ? "" : "listen=127.0.0.1:0\n",
             own || !h_http_ini ? "" : h_http_ini);
    /* Off only when the test's [http] says "listen =" with nothing after. */
    if (hl) {
        hl += strlen("listen");
        while (*hl == ' ' || *hl == '\t' || *hl == '=')
            hl++;
    }
    w->http_on = !hl || (*hl && *hl != '\n' && *hl != '\r');
    s_write(path, buf);
}

static pid_t s_spawn(const char *log, char *const argv[])
{
    pid_t pid = fork();
    cr_assert(pid >= 0, "fork");
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        execv(argv[0], argv);
        _exit(127);
    }
    return pid;
}

int h_port_file_read(const h_world_t *w, int *port, int *http_port)
{
    char *s = h_slurp(w->port_file);
    *port = 0;
    if (http_port)
        *http_port = 0;
    if (!s)
        return -1;
    /* "broker=tcp://HOST:PORT\nhttp=HOST:PORT\n"; the port is what follows
     * the last ':' of each line ([::1]:8080 included). */
    int rc = -1;
    for (char *line = s; line && *line;) {
        char *nl = strchr(line, '\n');
        if (!nl)
            break; /* written atomically: a line without its end is not ours */
        *nl = '\0';
        char *colon = strrchr(line, ':');
        if (strncmp(line, "broker=", 7) == 0 && colon) {
            *port = atoi(colon + 1);
            rc = *port > 0 ? 0 : -1;
        } else if (strncmp(line, "http=", 5) == 0 && colon && http_port) {
            *http_port = atoi(colon + 1);
        }
        line = nl + 1;
    }
    free(s);
    return rc;
}

static int s_port_open(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int ok = connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
    close(fd);
    return ok;
}

/* Replaces the [broker] "listen = from" line of the world's config with
 * "listen = to"; 0, or -1 when the config has no such line (a test
 * rewrote it). */
static int s_listen_rewrite(const h_world_t *w, const char *from, const char *to)
{
    char path[700], line[128];
    snprintf(path, sizeof path, "%s/medlinkd.ini", w->dir);
    char *text = h_slurp(path);
    cr_assert_not_null(text, "cannot read %s", path);
    snprintf(line, sizeof line, "\nlisten = %s\n", from);
    char *at = strstr(text, line);
    if (!at) {
        free(text);
        return -1;
    }
    size_t cap = strlen(text) + strlen(to) + 32;
    char *out = malloc(cap);
    cr_assert_not_null(out);
    snprintf(out, cap, "%.*s\nlisten = %s\n%s", (int)(at - text), text, to, at + strlen(line));
    char tmp[720];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    s_write(tmp, out);
    cr_assert(rename(tmp, path) == 0, "rename %s: %s", tmp, strerror(errno));
    free(out);
    free(text);
    return 0;
}

void h_broker_start(h_world_t *w)
{
    char bin[600], cfg[700], log[700];
    h_bin("medlinkd", bin, sizeof bin);
    snprintf(cfg, sizeof cfg, "%s/medlinkd.ini", w->dir);
    snprintf(log, sizeof log, "%s/broker.log", w->dir);
    char *argv[] = {bin, "--config", cfg, NULL};
    /* A restart binds the port the first start got. Agents, medlinkctl
     * configs and the slow link were given that endpoint and reconnect to
     * it, as they would to a real broker's fixed port, so the port must
     * not change under them. Asking for it by number is the kind of reuse
     * port 0 avoids at the first start, but here it is safe enough: the
     * port was held by this test's own broker until the moment it stopped
     * (nobody else could have been given it), only the few seconds the
     * broker is down are open to a clash (which would fail loudly as
     * "cannot listen", not silently), and ZeroMQ binds with SO_REUSEADDR,
     * so the connections the last run left in TIME_WAIT do not stand in
     * the way. */
    if (w->port > 0 && strcmp(w->listen, "tcp://127.0.0.1:0") == 0 &&
        s_listen_rewrite(w, w->listen, w->endpoint) == 0)
        snprintf(w->listen, sizeof w->listen, "%s", w->endpoint);
    /* The file is written after the bind and before READY=1 and removed at
     * a clean stop; one left by a killed broker must not be read as new. */
    unlink(w->port_file);
    w->broker = s_spawn(log, argv);
    w->broker_starts++;
    w->http_port = 0;
    long deadline = s_now_ms() + 15000;
    while (s_now_ms() < deadline) {
        int st;
        if (waitpid(w->broker, &st, WNOHANG) == w->broker) {
            w->broker = 0;
            cr_assert_fail("medlinkd exited at start-up, see %s", log);
        }
        int port = 0, http_port = 0;
        if (h_port_file_read(w, &port, &http_port) == 0) {
            cr_assert(s_port_open(port), "medlinkd wrote port %d to %s but does not listen there",
                      port, w->port_file);
            w->port = port;
            snprintf(w->endpoint, sizeof w->endpoint, "tcp://127.0.0.1:%d", port);
            if (w->http_on) {
                cr_assert(http_port > 0, "no http= line in %s, see %s", w->port_file, log);
                w->http_port = http_port;
            }
            return;
        }
        h_sleep_ms(20);
    }
    cr_assert_fail("medlinkd did not write %s within 15 s, see %s", w->port_file, log);
}

void h_broker_pin_port(h_world_t *w)
{
    if (w->port > 0)
        return;
    h_broker_start(w);
    h_broker_stop(w);
}

static int s_stop(pid_t *pid, int sig)
{
    if (*pid <= 0)
        return 0;
    kill(*pid, sig);
    int st = 0;
    long deadline = s_now_ms() + 20000;
    while (waitpid(*pid, &st, WNOHANG) == 0) {
        if (s_now_ms() > deadline) {
            kill(*pid, SIGKILL);
            waitpid(*pid, &st, 0);
            *pid = 0;
            return -1;
        }
        h_sleep_ms(10);
    }
    *pid = 0;
    return st;
}

/* A sanitizer report in a daemon's log fails the test even when the
 * daemon limped on (ASan+UBSan builds, deploy/test.sh --sanitize). */
static void s_check_log(const h_world_t *w, const char *name)
{
    static const char *const bad[] = {"AddressSanitizer", "LeakSanitizer",
                                      "runtime error:", "UndefinedBehaviorSanitizer"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        cr_assert_eq(h_log_contains(w, name, bad[i]), 0, "%s/%s reports %s", w->dir, name, bad[i]);
}

void h_broker_stop(h_world_t *w)
{
    s_check_log(w, "broker.log");
    int st = s_stop(&w->broker, SIGTERM);
    s_check_log(w, "broker.log");
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "medlinkd did not exit cleanly (status %d)",
              st);
    /* A clean stop removes the port file (its ports are no longer ours). */
    cr_assert(access(w->port_file, F_OK) != 0, "medlinkd left %s after a clean stop", w->port_file);
}

void h_broker_kill(h_world_t *w)
{
    s_stop(&w->broker, SIGKILL);
}

static int s_agent_index(h_world_t *w, const char *node)
{
    for (int i = 0; i < w->n_agents; i++)
        if (strcmp(w->agent_ids[i], node) == 0)
            return i;
    return -1;
}

/* Extra agent config lines for the next h_agent_start_at (h_agent_start_ini). */
static const char *s_agent_extra;
const char *h_agent_extra_ini;

int h_agent_start(h_world_t *w, const char *node)
{
    return h_agent_start_at(w, node, w->endpoint);
}

int h_agent_start_ini(h_world_t *w, const char *node, const char *extra_ini)
{
    s_agent_extra = extra_ini;
    int i = h_agent_start_at(w, node, w->endpoint);
    s_agent_extra = NULL;
    return i;
}

/* An endpoint ending in ":0" is the config's, before the broker ever ran:
 * nobody can connect there. */
static void s_assert_known(const char *endpoint, const char *who)
{
    size_t n = strlen(endpoint);
    cr_assert(n < 2 || strcmp(endpoint + n - 2, ":0") != 0,
              "%s: the broker's port is not known yet (%s): h_broker_start first, or "
              "h_broker_pin_port",
              who, endpoint);
}

int h_agent_start_at(h_world_t *w, const char *node, const char *endpoint)
{
    s_assert_known(endpoint, node);
    char bin[600], cfg[700], log[700], buf[4096];
    h_bin("medlink-agent", bin, sizeof bin);
    snprintf(cfg, sizeof cfg, "%s/agent-%s.ini", w->dir, node);
    snprintf(log, sizeof log, "%s/agent-%s.log", w->dir, node);
    int krc = s_sh("test -f '%s/store-%s.key' || (umask 077 && openssl rand -hex 32 "
                   ">'%s/store-%s.key')",
                   w->pki, node, w->pki, node);
    cr_assert_eq(krc, 0, "cannot make the store key of %s", node);
    snprintf(buf, sizeof buf,
             "[agent]\nnode_id = %s\nbroker = %s\nbroker_id = " H_BROKER "\n"
             "ca = pki/ca.crt\ncert = pki/%s.crt\n"
             "key = pki/%s.key\ndata_dir = data/%s\nspool_dir = spool/%s\nlog_level = info\n"
             "heartbeat_ms = 1000\nscan_ms = 100\nstore_key = pki/store-%s.key\n",
             node, endpoint, node, node, node, node, node);
    if (s_agent_extra) {
        size_t n = strlen(buf);
        snprintf(buf + n, sizeof buf - n, "%s", s_agent_extra);
    }
    if (h_agent_extra_ini) {
        size_t used = strlen(buf);
        snprintf(buf + used, sizeof buf - used, "%s\n", h_agent_extra_ini);
    }
    s_write(cfg, buf);
    int i = s_agent_index(w, node);
    if (i < 0) {
        i = w->n_agents++;
        snprintf(w->agent_ids[i], sizeof w->agent_ids[i], "%s", node);
    }
    char *argv[] = {bin, "--config", cfg, NULL};
    w->agents[i] = s_spawn(log, argv);
    /* The agent makes its spool folders at start-up; wait for them. */
    char out[700];
    h_spool(w, node, "outbox", out, sizeof out);
    long deadline = s_now_ms() + 10000;
    struct stat st;
    while (stat(out, &st) != 0 && s_now_ms() < deadline)
        h_sleep_ms(20);
    cr_assert(stat(out, &st) == 0, "agent %s did not create %s, see %s", node, out, log);
    return i;
}

void h_agent_stop(h_world_t *w, const char *node)
{
    int i = s_agent_index(w, node);
    if (i < 0)
        return;
    int st = s_stop(&w->agents[i], SIGTERM);
    char log[128];
    snprintf(log, sizeof log, "agent-%s.log", node);
    s_check_log(w, log);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "agent %s did not exit cleanly (%d)", node,
              st);
}

void h_agent_kill(h_world_t *w, const char *node)
{
    int i = s_agent_index(w, node);
    if (i >= 0)
        s_stop(&w->agents[i], SIGKILL);
}

static void s_link_stop(h_world_t *w);

void h_world_fini(h_world_t *w)
{
    for (int i = 0; i < w->n_agents; i++)
        s_stop(&w->agents[i], SIGKILL);
    s_stop(&w->broker, SIGKILL);
    s_link_stop(w);
}

/* ---- the slow link ------------------------------------------------------ */

#define S_LINK_PAIRS 8
#define S_LINK_BUF 65536

/* One agent connection: a is the agent's side, b the broker's. */
typedef struct {
    int a, b; /* -1 when the slot is free */
    uint8_t up[S_LINK_BUF], down[S_LINK_BUF];
    size_t up_len, down_len;
} s_pair_t;

struct h_link {
    int lfd;
    int broker_port;
    long up_bps;
    atomic_int stop;
    pthread_t thread;
    s_pair_t pairs[S_LINK_PAIRS];
};

static void s_pair_close(s_pair_t *p)
{
    if (p->a >= 0)
        close(p->a);
    if (p->b >= 0)
        close(p->b);
    p->a = p->b = -1;
    p->up_len = p->down_len = 0;
}

static void s_link_accept(struct h_link *l)
{
    int a = accept(l->lfd, NULL, NULL);
    if (a < 0)
        return;
    s_pair_t *p = NULL;
    for (int i = 0; i < S_LINK_PAIRS && !p; i++)
        if (l->pairs[i].a < 0)
            p = &l->pairs[i];
    int b = p ? socket(AF_INET, SOCK_STREAM, 0) : -1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)l->broker_port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    /* A blocking connect to the local broker: the kernel completes it
     * from the listen backlog even while medlinkd is stopped. */
    if (b < 0 || connect(b, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(a);
        if (b >= 0)
            close(b);
        return;
    }
    fcntl(a, F_SETFL, fcntl(a, F_GETFL) | O_NONBLOCK);
    fcntl(b, F_SETFL, fcntl(b, F_GETFL) | O_NONBLOCK);
    p->a = a;
    p->b = b;
}

/* Moves bytes from fd into buf (at most max); 0 when the side is still
 * there, -1 when it closed or failed. */
static int s_link_read(int fd, uint8_t *buf, size_t *len, size_t max)
{
    ssize_t n = recv(fd, buf + *len, max, 0);
    if (n > 0)
        *len += (size_t)n;
    return n > 0 || (n < 0 && (errno == EAGAIN || errno == EINTR)) ? 0 : -1;
}

static int s_link_write(int fd, uint8_t *buf, size_t *len)
{
    ssize_t n = send(fd, buf, *len, MSG_NOSIGNAL);
    if (n < 0)
        return errno == EAGAIN || errno == EINTR ? 0 : -1;
    memmove(buf, buf + n, *len - (size_t)n);
    *len -= (size_t)n;
    return 0;
}

/* The relay's thread: one poll loop over the listening socket and every
 * pair, waking at least every 5 ms to refill the upstream token bucket. */
static void *s_link_run(void *arg)
{
    struct h_link *l = arg;
    const double burst = (double)l->up_bps / 20.0;
    double tokens = burst;
    long last = s_now_ms();
    while (!atomic_load(&l->stop)) {
        long now = s_now_ms();
        tokens += (double)(now - last) * (double)l->up_bps / 1000.0;
        if (tokens > burst)
            tokens = burst;
        last = now;
        struct pollfd pf[1 + 2 * S_LINK_PAIRS];
        int slot[1 + 2 * S_LINK_PAIRS];
        int n = 0;
        pf[n++] = (struct pollfd){.fd = l->lfd, .events = POLLIN};
        for (int i = 0; i < S_LINK_PAIRS; i++) {
            s_pair_t *p = &l->pairs[i];
            if (p->a < 0)
                continue;
            short ea = p->down_len > 0 ? POLLOUT : 0, eb = p->up_len > 0 ? POLLOUT : 0;
            if (p->up_len < S_LINK_BUF && tokens >= 1)
                ea |= POLLIN;
            if (p->down_len < S_LINK_BUF)
                eb |= POLLIN;
            slot[n] = i;
            pf[n++] = (struct pollfd){.fd = p->a, .events = ea};
            slot[n] = i;
            pf[n++] = (struct pollfd){.fd = p->b, .events = eb};
        }
        if (poll(pf, (nfds_t)n, 5) <= 0)
            continue;
        if (pf[0].revents & POLLIN)
            s_link_accept(l);
        for (int k = 1; k < n; k += 2) {
            s_pair_t *p = &l->pairs[slot[k]];
            const struct pollfd *pa = &pf[k], *pb = &pf[k + 1];
            int dead = 0;
            size_t room = S_LINK_BUF - p->up_len;
            size_t max = tokens < (double)room ? (size_t)tokens : room;
            /* An earlier pair may have spent the bucket since the poll:
             * then this one waits (a read of 0 bytes would look like EOF). */
            if ((pa->revents & POLLIN) && max > 0) {
                size_t before = p->up_len;
                dead |= s_link_read(p->a, p->up, &p->up_len, max);
                tokens -= (double)(p->up_len - before);
            }
            if (pb->revents & POLLIN)
                dead |= s_link_read(p->b, p->down, &p->down_len, S_LINK_BUF - p->down_len);
            if (!dead && (pb->revents & POLLOUT))
                dead |= s_link_write(p->b, p->up, &p->up_len);
            if (!dead && (pa->revents & POLLOUT))
                dead |= s_link_write(p->a, p->down, &p->down_len);
            /* A hang-up or error reported without POLLIN (the agent's side
             * while the bucket is empty) ends the pair too. */
            if ((pa->revents | pb->revents) & (POLLERR | POLLNVAL))
                dead = 1;
            if (((pa->revents & POLLHUP) && !(pa->revents & POLLIN)) ||
                ((pb->revents & POLLHUP) && !(pb->revents & POLLIN)))
                dead = 1;
            if (dead)
                s_pair_close(p);
        }
    }
    for (int i = 0; i < S_LINK_PAIRS; i++)
        s_pair_close(&l->pairs[i]);
    return NULL;
}

void h_link_start(h_world_t *w, long up_bytes_per_s)
{
    cr_assert_null(w->link, "one slow link per world");
    cr_assert_gt(up_bytes_per_s, 0);
    cr_assert_gt(w->port, 0, "h_link_start: start the broker first (its port is not known)");
    struct h_link *l = calloc(1, sizeof *l);
    cr_assert_not_null(l);
    for (int i = 0; i < S_LINK_PAIRS; i++)
        l->pairs[i].a = l->pairs[i].b = -1;
    l->broker_port = w->port;
    l->up_bps = up_bytes_per_s;
    atomic_init(&l->stop, 0);
    l->lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert(l->lfd >= 0 && bind(l->lfd, (struct sockaddr *)&a, sizeof a) == 0 &&
                  listen(l->lfd, 16) == 0,
              "slow link: %s", strerror(errno));
    socklen_t al = sizeof a;
    getsockname(l->lfd, (struct sockaddr *)&a, &al);
    fcntl(l->lfd, F_SETFL, fcntl(l->lfd, F_GETFL) | O_NONBLOCK);
    snprintf(w->link_endpoint, sizeof w->link_endpoint, "tcp://127.0.0.1:%d", ntohs(a.sin_port));
    cr_assert_eq(pthread_create(&l->thread, NULL, s_link_run, l), 0);
    w->link = l;
}

static void s_link_stop(h_world_t *w)
{
    struct h_link *l = w->link;
    if (!l)
        return;
    atomic_store(&l->stop, 1);
    pthread_join(l->thread, NULL);
    close(l->lfd);
    free(l);
    w->link = NULL;
}

void h_spool(const h_world_t *w, const char *node, const char *sub, char *out, size_t len)
{
    snprintf(out, len, "%s/spool/%s/%s", w->dir, node, sub);
}

void h_drop(const h_world_t *w, const char *node, const char *name, const char *content)
{
    char dir[700], tmp[900], dst[900];
    h_spool(w, node, "outbox", dir, sizeof dir);
    snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, name);
    snprintf(dst, sizeof dst, "%s/%s", dir, name);
    s_write(tmp, content);
    cr_assert(rename(tmp, dst) == 0, "rename into outbox: %s", strerror(errno));
}

int h_count(const h_world_t *w, const char *node, const char *sub)
{
    char dir[700];
    h_spool(w, node, sub, dir, sizeof dir);
    DIR *d = opendir(dir);
    if (!d)
        return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (e->d_name[0] != '.' && l > 5 && strcmp(e->d_name + l - 5, ".json") == 0)
            n++;
    }
    closedir(d);
    return n;
}

int h_wait_count(const h_world_t *w, const char *node, const char *sub, int n, int timeout_ms)
{
    long deadline = s_now_ms() + timeout_ms;
    int c = h_count(w, node, sub);
    while (c < n && s_now_ms() < deadline) {
        h_sleep_ms(50);
        c = h_count(w, node, sub);
    }
    return c;
}

char *h_slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    size_t r = fread(b, 1, (size_t)n, f);
    b[r] = '\0';
    fclose(f);
    return b;
}

char *h_run(int *status, const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    FILE *p = popen(cmd, "r");
    cr_assert(p, "popen");
    size_t cap = 4096, len = 0;
    char *out = malloc(cap);
    cr_assert_not_null(out);
    size_t n;
    while ((n = fread(out + len, 1, cap - len - 1, p)) > 0) {
        len += n;
        if (cap - len < 1024) {
            cap *= 2;
            char *bigger = realloc(out, cap);
            cr_assert_not_null(bigger, "out of memory reading the output of %s", cmd);
            out = bigger;
        }
    }
    out[len] = '\0';
    int st = pclose(p);
    *status = WIFEXITED(st) ? WEXITSTATUS(st) : 128;
    return out;
}

void h_ctl_config(const h_world_t *w, const char *node, char *out, size_t len)
{
    s_assert_known(w->endpoint, "h_ctl_config");
    snprintf(out, len, "%s/ctl-%s.ini", w->dir, node);
    char buf[2048];
    snprintf(buf, sizeof buf,
             "[ctl]\nnode_id = %s\nbroker = %s\nbroker_id = " H_BROKER "\n"
             "ca = pki/ca.crt\ncert = pki/%s.crt\n"
             "key = pki/%s.key\n",
             node, w->endpoint, node, node);
    s_write(out, buf);
}

char *h_ctl_run(int *status, const char *env, const char *cfg, const char *args)
{
    char bin[600];
    h_bin("medlinkctl", bin, sizeof bin);
    return h_run(status, "%s%s%s'%s' --config '%s' %s 2>&1", env ? "env " : "", env ? env : "",
                 env ? " " : "", bin, cfg, args);
}

char *h_ctl(int want, const char *cfg, const char *args)
{
    int st = -1;
    char *out = h_ctl_run(&st, NULL, cfg, args);
    cr_assert_eq(st, want, "medlinkctl %s: exit %d, want %d:\n%s", args, st, want, out);
    return out;
}

char *h_ctl_env(int want, const char *env, const char *cfg, const char *args)
{
    int st = -1;
    char *out = h_ctl_run(&st, env, cfg, args);
    cr_assert_eq(st, want, "env %s medlinkctl %s: exit %d, want %d:\n%s", env ? env : "", args, st,
                 want, out);
    return out;
}

json_t *h_ctl_json(const char *cfg, const char *args)
{
    char full[2048];
    snprintf(full, sizeof full, "--json %s", args);
    /* stdout only: a warning on stderr must not spoil the document. */
    char bin[600];
    h_bin("medlinkctl", bin, sizeof bin);
    int st = -1;
    char *out = h_run(&st, "'%s' --config '%s' %s", bin, cfg, full);
    cr_assert_eq(st, 0, "medlinkctl %s: exit %d:\n%s", full, st, out);
    json_error_t jerr;
    json_t *j = json_loads(out, 0, &jerr);
    cr_assert(j, "medlinkctl %s printed no JSON (%s): %s", full, jerr.text, out);
    free(out);
    return j;
}

json_t *h_ctl_wait_list(const char *cfg, const char *args, const char *key, size_t n,
                        int timeout_ms)
{
    long deadline = s_now_ms() + timeout_ms;
    for (;;) {
        json_t *j = h_ctl_json(cfg, args);
        if (json_array_size(json_object_get(j, key)) >= n)
            return j;
        json_decref(j);
        if (s_now_ms() >= deadline)
            return NULL;
        h_sleep_ms(200);
    }
}

json_t *h_wait_dead_letters(const char *cfg, size_t n, int timeout_ms)
{
    return h_ctl_wait_list(cfg, "dlq list", "deadLetter", n, timeout_ms);
}

json_t *h_wait_overdue(const char *cfg, const char *filter, size_t n, int timeout_ms)
{
    char args[512];
    snprintf(args, sizeof args, "cases --overdue %s", filter ? filter : "");
    return h_ctl_wait_list(cfg, args, "cases", n, timeout_ms);
}

long long h_json_u64(json_t *j, const char *key)
{
    json_t *v = json_object_get(j, key);
    if (json_is_string(v))
        return atoll(json_string_value(v));
    return json_is_integer(v) ? (long long)json_integer_value(v) : -1;
}

/* node's counts in a status --json document (proto3 JSON omits zeros: a
 * missing count is 0). Returns 0, or -1 when node is not listed. */
static int s_node_counts(json_t *status, const char *node, h_node_counts_t *out)
{
    json_t *nodes = json_object_get(status, "node");
    for (size_t i = 0; i < json_array_size(nodes); i++) {
        json_t *n = json_array_get(nodes, i);
        const char *id = json_string_value(json_object_get(n, "nodeId"));
        if (!id || strcmp(id, node) != 0)
            continue;
        long long q = h_json_u64(n, "queueDepth"), f = h_json_u64(n, "inFlight"),
                  d = h_json_u64(n, "delivered");
        out->queued = q < 0 ? 0 : q;
        out->in_flight = f < 0 ? 0 : f;
        out->delivered = d < 0 ? 0 : d;
        return 0;
    }
    return -1;
}

h_node_counts_t h_wait_quiet(h_world_t *w, const char *node, long long delivered, int timeout_ms)
{
    char cfg[700];
    h_ctl_config(w, H_OPS, cfg, sizeof cfg);
    h_node_counts_t c = {-1, -1, -1};
    long deadline = s_now_ms() + timeout_ms;
    for (;;) {
        json_t *j = h_ctl_json(cfg, "status");
        cr_assert_eq(s_node_counts(j, node, &c), 0, "status --json does not list %s", node);
        json_decref(j);
        if ((c.queued == 0 && c.in_flight == 0 && c.delivered >= delivered) ||
            s_now_ms() >= deadline)
            return c;
        h_sleep_ms(100);
    }
}

char *h_referral_json(const char *to, const char *patient, const char *priority)
{
    char *buf = malloc(2048);
    snprintf(buf, 2048,
             "{\n"
             "  \"to\": \"%s\",\n"
             "  \"priority\": \"%s\",\n"
             "  \"referral\": {\n"
             "    \"patient\": {\"healthCardId\": \"130102198001011234\", \"name\": \"%s\",\n"
             "                \"sex\": \"SEX_MALE\", \"birthDate\": \"1980-01-01\"},\n"
             "    \"referringDoctor\": {\"name\": \"Dr. Li Wei\"},\n"
             "    \"familyDoctorTeam\": \"Xinzhan team 2\",\n"
             "    \"reason\": \"Chest pain on exertion for 3 days\",\n"
             "    \"diagnosis\": [{\"icd10\": \"I20.0\", \"text\": \"Unstable angina\"}],\n"
             "    \"priorityReception\": true\n"
             "  }\n"
             "}\n",
             to, priority ? priority : "PRIORITY_ROUTINE", patient);
    return buf;
}

int h_log_contains(const h_world_t *w, const char *log, const char *needle)
{
    char path[700];
    snprintf(path, sizeof path, "%s/%s", w->dir, log);
    char *s = h_slurp(path);
    if (!s)
        return 0;
    int n = 0;
    for (char *p = s; (p = strstr(p, needle)); p++)
        n++;
    free(s);
    return n;
}

char *h_find_json(const h_world_t *w, const char *node, const char *sub, const char *needle)
{
    char dir[700];
    h_spool(w, node, sub, dir, sizeof dir);
    DIR *d = opendir(dir);
    if (!d)
        return NULL;
    struct dirent *e;
    char *found = NULL;
    while (!found && (e = readdir(d))) {
        size_t n = strlen(e->d_name);
        if (e->d_name[0] == '.' || n < 6 || strcmp(e->d_name + n - 5, ".json") != 0)
            continue;
        char path[1200];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        char *text = h_slurp(path);
        if (text && strstr(text, needle))
            found = strdup(path);
        free(text);
    }
    closedir(d);
    return found;
}

char *h_wait_json(const h_world_t *w, const char *node, const char *sub, const char *needle,
                  int timeout_ms)
{
    for (int waited = 0;; waited += 50) {
        char *p = h_find_json(w, node, sub, needle);
        if (p || waited >= timeout_ms)
            return p;
        h_sleep_ms(50);
    }
}

ml_keyring_t *h_store_keys(const h_world_t *w, const char *node)
{
    char path[800], err[300];
    if (strcmp(node, H_BROKER) == 0)
        snprintf(path, sizeof path, "%s/broker-store.key", w->pki);
    else
        snprintf(path, sizeof path, "%s/store-%s.key", w->pki, node);
    ml_keyring_t *keys = NULL;
    cr_assert_eq(ml_keyring_load(path, NULL, 0, &keys, err, sizeof err), 0, "%s", err);
    return keys;
}

int h_http_raw(int port, const char *request, size_t reqlen, char **reply, size_t *len,
               int timeout_ms)
{
    *reply = NULL;
    if (len)
        *len = 0;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    long deadline = s_now_ms() + timeout_ms;
    size_t off = 0;
    while (off < reqlen) {
        ssize_t n = send(fd, request + off, reqlen - off, MSG_NOSIGNAL);
        if (n <= 0)
            break; /* the server may answer (431) before it has read it all */
        off += (size_t)n;
    }
    size_t cap = 4096, got = 0;
    char *buf = malloc(cap);
    cr_assert(buf);
    int rc = 0;
    for (;;) {
        long left = deadline - s_now_ms();
        if (left <= 0) {
            rc = -2;
            break;
        }
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, (int)left) <= 0)
            continue;
        if (got + 4096 > cap) {
            cap *= 2;
            char *nb = realloc(buf, cap);
            cr_assert(nb);
            buf = nb;
        }
        ssize_t n = recv(fd, buf + got, cap - got - 1, 0);
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    buf[got] = '\0';
    if (off < reqlen && got == 0) {
        free(buf);
        return -1;
    }
    *reply = buf;
    if (len)
        *len = got;
    return rc;
}

int h_http_get_hdr(const h_world_t *w, const char *path, const char *headers, int *status,
                   char **head, char **body, size_t *len)
{
    *status = 0;
    if (head)
        *head = NULL;
    if (body)
        *body = NULL;
    if (len)
        *len = 0;
    char req[8192];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n%s\r\n", path,
                     headers ? headers : "");
    cr_assert(n > 0 && (size_t)n < sizeof req);
    char *reply = NULL;
    size_t rlen = 0;
    h_http_raw(w->http_port, req, (size_t)n, &reply, &rlen, 10000);
    if (!reply)
        return -1;
    char *sep = strstr(reply, "\r\n\r\n");
    if (strncmp(reply, "HTTP/1.", 7) != 0 || !sep) {
        free(reply);
        return -1;
    }
    *status = atoi(reply + 9);
    size_t hlen = (size_t)(sep - reply) + 2;
    if (head) {
        *head = strndup(reply, hlen);
        cr_assert(*head);
    }
    size_t blen = rlen - (hlen + 2);
    if (body) {
        *body = malloc(blen + 1);
        cr_assert(*body);
        memcpy(*body, sep + 4, blen);
        (*body)[blen] = '\0';
    }
    if (len)
        *len = blen;
    free(reply);
    return 0;
}

int h_http_get(const h_world_t *w, const char *path, int *status, char **body, size_t *len)
{
    return h_http_get_hdr(w, path, NULL, status, NULL, body, len);
}
