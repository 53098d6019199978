/* medlinkd and medlink-agent under systemd's eyes, with the real binaries:
 * the test plays systemd's part. It binds the datagram socket systemd would
 * give a Type=notify service and names it in NOTIFY_SOCKET (with
 * WATCHDOG_USEC=400000, as WatchdogSec=400ms would), and checks what the
 * daemons say there: READY=1 only once the broker listens, WATCHDOG=1 at
 * the rate asked for and none while the loop is stuck (SIGSTOP),
 * RELOADING=1 (with MONOTONIC_USEC) then READY=1 around SIGHUP, STOPPING=1
 * on SIGTERM. It sets JOURNAL_STREAM to the device and inode of the log file
 * the daemon writes to, as systemd does for the journal's stream, and checks
 * each line's <N> priority against its level; log_format = json lines are
 * parsed with jansson. The agent's SIGHUP: a new log level applies, a key
 * that needs a restart is a warning and keeps its value, a broken file
 * changes nothing, and the agent keeps delivering throughout. */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <jansson.h>

#include "harness.h"

static h_world_t W;

#define S_MAX_MSGS 1024

/* What arrived on the notify socket, in order, stamped on arrival. */
typedef struct {
    int fd;
    int broker; /* medlinkd: at READY=1 its port file must name a port that listens */
    pthread_t th;
    pthread_mutex_t mu;
    int stop;
    int n;
    struct {
        char text[512];
        long at_ms;
        int port_open; /* READY=1 only: could we connect at that moment */
    } msg[S_MAX_MSGS];
} s_notify_t;

static s_notify_t *s_nfy[2];

static long s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
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

static void *s_notify_main(void *arg)
{
    s_notify_t *n = arg;
    for (;;) {
        pthread_mutex_lock(&n->mu);
        int stop = n->stop;
        pthread_mutex_unlock(&n->mu);
        if (stop)
            break;
        struct pollfd p = {.fd = n->fd, .events = POLLIN};
        if (poll(&p, 1, 50) != 1)
            continue;
        char buf[512];
        ssize_t r = recv(n->fd, buf, sizeof buf - 1, 0);
        if (r < 0)
            continue;
        buf[r] = '\0';
        long at = s_now_ms();
        /* The broker writes its port file before READY=1: at READY the
         * port it names must take connections. */
        int port = 0, open = 0;
        if (strncmp(buf, "READY=1", 7) == 0 && n->broker && h_port_file_read(&W, &port, NULL) == 0)
            open = s_port_open(port);
        pthread_mutex_lock(&n->mu);
        if (n->n < S_MAX_MSGS) {
            snprintf(n->msg[n->n].text, sizeof n->msg[n->n].text, "%s", buf);
            n->msg[n->n].at_ms = at;
            n->msg[n->n].port_open = open;
            n->n++;
        }
        pthread_mutex_unlock(&n->mu);
    }
    return NULL;
}

/* Binds W.dir/<name>, starts the listener and sets NOTIFY_SOCKET and
 * WATCHDOG_USEC for the next process the harness starts. */
static s_notify_t *s_notify_start(const char *name, int broker)
{
    s_notify_t *n = calloc(1, sizeof *n);
    cr_assert_not_null(n);
    pthread_mutex_init(&n->mu, NULL);
    n->broker = broker;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    int len = snprintf(sa.sun_path, sizeof sa.sun_path, "%s/%s", W.dir, name);
    cr_assert(len > 0 && (size_t)len < sizeof sa.sun_path, "socket path too long");
    n->fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    cr_assert(n->fd >= 0);
    cr_assert_eq(bind(n->fd, (struct sockaddr *)&sa, sizeof sa), 0, "bind %s: %s", sa.sun_path,
                 strerror(errno));
    cr_assert_eq(pthread_create(&n->th, NULL, s_notify_main, n), 0);
    setenv("NOTIFY_SOCKET", sa.sun_path, 1);
    setenv("WATCHDOG_USEC", "400000", 1);
    unsetenv("WATCHDOG_PID");
    for (int i = 0; i < 2; i++)
        if (!s_nfy[i]) {
            s_nfy[i] = n;
            break;
        }
    return n;
}

static void s_notify_free(s_notify_t *n)
{
    pthread_mutex_lock(&n->mu);
    n->stop = 1;
    pthread_mutex_unlock(&n->mu);
    pthread_join(n->th, NULL);
    close(n->fd);
    free(n);
}

static void s_unset_env(void)
{
    unsetenv("NOTIFY_SOCKET");
    unsetenv("WATCHDOG_USEC");
    unsetenv("JOURNAL_STREAM");
}

/* Index of the first message at or after index from that starts with
 * prefix, waiting up to timeout_ms; -1 if none came. */
static int s_wait_msg(s_notify_t *n, int from, const char *prefix, int timeout_ms)
{
    long deadline = s_now_ms() + timeout_ms;
    do {
        pthread_mutex_lock(&n->mu);
        for (int i = from; i < n->n; i++)
            if (strncmp(n->msg[i].text, prefix, strlen(prefix)) == 0) {
                pthread_mutex_unlock(&n->mu);
                return i;
            }
        pthread_mutex_unlock(&n->mu);
        h_sleep_ms(20);
    } while (s_now_ms() < deadline);
    return -1;
}

/* Pings that arrived within [from_ms, to_ms), and the longest gap between
 * consecutive ones there. */
static int s_pings(s_notify_t *n, long from_ms, long to_ms, long *max_gap)
{
    int count = 0;
    long last = 0;
    *max_gap = 0;
    pthread_mutex_lock(&n->mu);
    for (int i = 0; i < n->n; i++) {
        if (strcmp(n->msg[i].text, "WATCHDOG=1") != 0 || n->msg[i].at_ms < from_ms ||
            n->msg[i].at_ms >= to_ms)
            continue;
        if (count && n->msg[i].at_ms - last > *max_gap)
            *max_gap = n->msg[i].at_ms - last;
        last = n->msg[i].at_ms;
        count++;
    }
    pthread_mutex_unlock(&n->mu);
    return count;
}

static int s_count(s_notify_t *n)
{
    pthread_mutex_lock(&n->mu);
    int c = n->n;
    pthread_mutex_unlock(&n->mu);
    return c;
}

static void s_teardown(void)
{
    h_agent_extra_ini = NULL;
    h_world_fini(&W);
    for (int i = 0; i < 2; i++)
        if (s_nfy[i]) {
            s_notify_free(s_nfy[i]);
            s_nfy[i] = NULL;
        }
    s_unset_env();
}

TestSuite(systemd, .fini = s_teardown, .timeout = 300);

/* Replaces the first occurrence of from with to in the file. */
static void s_edit(const char *path, const char *from, const char *to)
{
    char *s = h_slurp(path);
    cr_assert_not_null(s, "cannot read %s", path);
    char *at = strstr(s, from);
    cr_assert_not_null(at, "%s has no \"%s\"", path, from);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fprintf(f, "%.*s%s%s", (int)(at - s), s, to, at + strlen(from));
    fclose(f);
    free(s);
}

static void s_append(const char *path, const char *text)
{
    FILE *f = fopen(path, "a");
    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
}

/* Waits until the log has at least n matches of needle. */
static int s_wait_log(const char *log, const char *needle, int n, int timeout_ms)
{
    long deadline = s_now_ms() + timeout_ms;
    int c;
    while ((c = h_log_contains(&W, log, needle)) < n && s_now_ms() < deadline)
        h_sleep_ms(50);
    return c;
}

/* JOURNAL_STREAM=DEV:INO of W.dir/<log> (made empty first), as systemd
 * names the journal's stream on the service's stderr. */
static void s_journal_stream(const char *log)
{
    char path[700];
    snprintf(path, sizeof path, "%s/%s", W.dir, log);
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fclose(f);
    struct stat st;
    cr_assert_eq(stat(path, &st), 0);
    char v[64];
    snprintf(v, sizeof v, "%llu:%llu", (unsigned long long)st.st_dev,
             (unsigned long long)st.st_ino);
    setenv("JOURNAL_STREAM", v, 1);
}

static int s_prio(const char *level)
{
    return strcmp(level, "error") == 0   ? 3
           : strcmp(level, "warn") == 0  ? 4
           : strcmp(level, "info") == 0  ? 6
           : strcmp(level, "debug") == 0 ? 7
                                         : -1;
}

/* Every line of W.dir/<log>: with journal, "<N>" first and N the priority
 * of the line's level; json, the rest one JSON object with exactly time,
 * level, component and message. Counts lines per priority into seen[8]. */
static int s_check_lines(const char *log, int journal, int json, int seen[8])
{
    char path[700];
    snprintf(path, sizeof path, "%s/%s", W.dir, log);
    char *s = h_slurp(path);
    cr_assert_not_null(s);
    int lines = 0;
    memset(seen, 0, 8 * sizeof *seen);
    char *save = NULL;
    for (char *line = strtok_r(s, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        int prio = -1;
        char *rest = line;
        if (journal) {
            cr_assert(line[0] == '<' && line[1] >= '0' && line[1] <= '7' && line[2] == '>',
                      "%s: a line without a priority: %s", log, line);
            prio = line[1] - '0';
            rest = line + 3;
        }
        char level[16] = "";
        if (json) {
            json_error_t je;
            json_t *j = json_loads(rest, 0, &je);
            cr_assert_not_null(j, "%s: not JSON (%s): %s", log, je.text, line);
            cr_assert_eq(json_object_size(j), 4, "%s: %s", log, line);
            const char *t = json_string_value(json_object_get(j, "time"));
            const char *l = json_string_value(json_object_get(j, "level"));
            const char *c = json_string_value(json_object_get(j, "component"));
            const char *m = json_string_value(json_object_get(j, "message"));
            cr_assert(t && strlen(t) == 24 && t[10] == 'T' && t[23] == 'Z', "%s: %s", log, line);
            cr_assert(l && c && *c && m, "%s: %s", log, line);
            snprintf(level, sizeof level, "%s", l);
            json_decref(j);
        } else {
            cr_assert(sscanf(rest, "%*s %15s", level) == 1 && rest[23] == 'Z', "%s: %s", log, line);
        }
        int want = s_prio(level);
        cr_assert(want >= 0, "%s: unknown level %s: %s", log, level, line);
        if (journal) {
            cr_assert_eq(prio, want, "%s: <%d> on a %s line: %s", log, prio, level, line);
            seen[prio]++;
        } else {
            seen[want]++;
        }
        lines++;
    }
    free(s);
    return lines;
}

/* ---- medlinkd ----------------------------------------------------------- */

Test(systemd, broker_ready_watchdog_reload_stopping)
{
    h_world_init(&W, NULL);
    s_notify_t *n = s_notify_start("notify-broker", 1);
    h_broker_start(&W);
    s_unset_env();

    int ready = s_wait_msg(n, 0, "READY=1", 10000);
    cr_assert(ready >= 0, "no READY=1 from medlinkd");
    cr_assert_eq(ready, 0, "READY=1 was not the first notification: %s", n->msg[0].text);
    cr_assert(n->msg[ready].port_open,
              "READY=1 came before the broker listened or wrote its port file");
    cr_assert(strstr(n->msg[ready].text, "\nSTATUS=listening on tcp://127.0.0.1:"), "%s",
              n->msg[ready].text);

    /* WATCHDOG_USEC=400000: a ping every 200 ms, from the first. */
    long t0 = n->msg[ready].at_ms;
    h_sleep_ms(2500);
    long gap;
    int pings = s_pings(n, t0 + 200, t0 + 2200, &gap);
    cr_log_info("medlinkd: %d pings in 2 s, longest gap %ld ms", pings, gap);
    cr_assert(pings >= 7 && pings <= 13, "%d WATCHDOG=1 in 2 s (expected about 10)", pings);

    /* A stuck loop (here: the whole process stopped) sends none; they
     * resume when it runs again. */
    kill(W.broker, SIGSTOP);
    h_sleep_ms(300);
    long stuck = s_now_ms();
    h_sleep_ms(1000);
    int during = s_pings(n, stuck, s_now_ms(), &gap);
    kill(W.broker, SIGCONT);
    cr_assert_eq(during, 0, "%d pings from a stopped broker", during);
    long resumed = s_now_ms();
    h_sleep_ms(1000);
    cr_assert(s_pings(n, resumed, s_now_ms(), &gap) >= 2, "pings did not resume");

    /* SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1. */
    int from = s_count(n);
    kill(W.broker, SIGHUP);
    int rl = s_wait_msg(n, from, "RELOADING=1", 10000);
    cr_assert(rl >= 0, "no RELOADING=1 on SIGHUP");
    unsigned long long us = 0;
    cr_assert_eq(sscanf(n->msg[rl].text, "RELOADING=1\nMONOTONIC_USEC=%llu", &us), 1, "%s",
                 n->msg[rl].text);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    unsigned long long now_us = (unsigned long long)ts.tv_sec * 1000000ull + ts.tv_nsec / 1000;
    cr_assert(us > 0 && us <= now_us && now_us - us < 60000000ull, "MONOTONIC_USEC=%llu", us);
    int rd = s_wait_msg(n, rl + 1, "READY=1", 10000);
    cr_assert(rd > rl, "no READY=1 after RELOADING=1");
    cr_assert(strstr(n->msg[rd].text, "configuration reloaded"), "%s", n->msg[rd].text);

    /* A file that does not load: RELOADING=1, then READY=1 saying the old
     * configuration runs on. */
    char ini[700];
    snprintf(ini, sizeof ini, "%s/medlinkd.ini", W.dir);
    s_append(ini, "\n[broker]\nno_such_key = 1\n");
    from = s_count(n);
    kill(W.broker, SIGHUP);
    rl = s_wait_msg(n, from, "RELOADING=1", 10000);
    cr_assert(rl >= 0);
    rd = s_wait_msg(n, rl + 1, "READY=1", 10000);
    cr_assert(rd > rl);
    cr_assert(strstr(n->msg[rd].text, "reload refused"), "%s", n->msg[rd].text);

    /* SIGTERM: STOPPING=1. */
    from = s_count(n);
    h_broker_stop(&W);
    int st = s_wait_msg(n, from, "STOPPING=1", 5000);
    cr_assert(st >= 0, "no STOPPING=1 on SIGTERM");
}

/* Without NOTIFY_SOCKET nothing changes: the broker runs as before. */
Test(systemd, broker_without_notify_socket)
{
    s_unset_env();
    h_world_init(&W, NULL);
    h_broker_start(&W);
    cr_assert_eq(h_log_contains(&W, "broker.log", "watchdog on"), 0);
    h_broker_stop(&W);
}

/* JOURNAL_STREAM names the log file: every line carries the priority of
 * its level; an error (a refused reload), warnings (a start-up key changed
 * in a reload) and info lines are all there. */
Test(systemd, broker_journal_priorities)
{
    h_world_init(&W, NULL);
    s_journal_stream("broker.log");
    h_broker_start(&W);
    s_unset_env();
    char ini[700], from[128], to[128];
    snprintf(ini, sizeof ini, "%s/medlinkd.ini", W.dir);
    /* A new listen address applies only after a restart: a warning. */
    snprintf(from, sizeof from, "listen = %s\n", W.listen);
    snprintf(to, sizeof to, "listen = tcp://127.0.0.1:%d\n", W.port + 1);
    s_edit(ini, from, to);
    kill(W.broker, SIGHUP);
    cr_assert(s_wait_log("broker.log", "listen changed", 1, 10000) >= 1);
    s_append(ini, "\n[broker]\nno_such_key = 1\n");
    kill(W.broker, SIGHUP);
    cr_assert(s_wait_log("broker.log", "reload refused", 1, 10000) >= 1);
    h_broker_stop(&W);
    int seen[8];
    int lines = s_check_lines("broker.log", 1, 0, seen);
    cr_log_info("broker.log: %d lines: <3> %d, <4> %d, <6> %d", lines, seen[3], seen[4], seen[6]);
    cr_assert(lines >= 5 && seen[3] >= 1 && seen[4] >= 1 && seen[6] >= 3,
              "%d lines: <3> %d, <4> %d, <6> %d", lines, seen[3], seen[4], seen[6]);
    cr_assert(h_log_contains(&W, "broker.log", "<3>") >= 1);
}

/* log_format = json, under the journal too: every line of the broker, and
 * of an agent configured with [agent] log_format = json, is "<N>" and one
 * JSON object; a session's lines are among them. */
Test(systemd, json_logs_broker_and_agent)
{
    h_world_init(&W, "log_format = json\n");
    s_journal_stream("broker.log");
    h_broker_start(&W);
    s_unset_env();
    h_agent_start_ini(&W, H_XINZHAN, "log_format = json\n");
    h_agent_start(&W, H_COUNTY);
    char *ref = h_referral_json(H_COUNTY, "Json Wang", NULL);
    h_drop(&W, H_XINZHAN, "json.json", ref);
    free(ref);
    char *got = h_wait_json(&W, H_COUNTY, "inbox", "Json Wang", 20000);
    cr_assert_not_null(got, "the referral was not delivered");
    free(got);
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
    int seen[8];
    int lines = s_check_lines("broker.log", 1, 1, seen);
    cr_assert(lines >= 5 && seen[6] >= 3, "%d lines", lines);
    char alog[128];
    snprintf(alog, sizeof alog, "agent-%s.log", H_XINZHAN);
    lines = s_check_lines(alog, 0, 1, seen);
    cr_assert(lines >= 3, "%d agent lines", lines);
    cr_assert(h_log_contains(&W, alog, "\"component\":\"spool\"") >= 1 ||
                  h_log_contains(&W, alog, "queued as message") >= 1,
              "no spool line in %s", alog);
    /* The agent in text: its lines are not JSON. */
    snprintf(alog, sizeof alog, "agent-%s.log", H_COUNTY);
    cr_assert_eq(h_log_contains(&W, alog, "{\"time\":"), 0);
}

/* SIGHUP applies the broker's log_format and log_level too: text lines
 * before, JSON lines after; log_level = warn then silences info lines. */
Test(systemd, broker_sighup_log_format_and_level)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    char ini[700];
    snprintf(ini, sizeof ini, "%s/medlinkd.ini", W.dir);
    s_edit(ini, "log_level = info\n", "log_level = info\nlog_format = json\n");
    kill(W.broker, SIGHUP);
    cr_assert(s_wait_log("broker.log", "\"message\":\"reload: log_format now json\"", 1, 10000) >=
              1);
    s_edit(ini, "log_level = info\n", "log_level = warn\n");
    kill(W.broker, SIGHUP);
    cr_assert(
        s_wait_log("broker.log", "\"message\":\"reload: log_level info -> warn\"", 1, 10000) >= 1);
    /* At warn, the next reload's info lines ("received Hangup", "reloaded")
     * are not logged; its warning is (a start-up key changed). */
    int reloaded = h_log_contains(&W, "broker.log", "reloaded ");
    char from[128], to[128];
    snprintf(from, sizeof from, "listen = %s\n", W.listen);
    snprintf(to, sizeof to, "listen = tcp://127.0.0.1:%d\n", W.port + 1);
    s_edit(ini, from, to);
    kill(W.broker, SIGHUP);
    cr_assert(s_wait_log("broker.log", "listen changed", 1, 10000) >= 1);
    h_sleep_ms(300);
    cr_assert_eq(h_log_contains(&W, "broker.log", "reloaded "), reloaded);
    h_broker_stop(&W);
    /* Every line after the switch is JSON. */
    char path[700];
    snprintf(path, sizeof path, "%s/broker.log", W.dir);
    char *all = h_slurp(path);
    char *at = strstr(all, "{\"time\":");
    cr_assert_not_null(at);
    int lines = 0;
    char *save = NULL;
    for (char *line = strtok_r(at, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        json_error_t je;
        json_t *j = json_loads(line, 0, &je);
        cr_assert_not_null(j, "not JSON after the switch: %s", line);
        json_decref(j);
        lines++;
    }
    cr_assert(lines >= 3, "%d JSON lines", lines);
    free(all);
}

/* ---- medlink-agent ------------------------------------------------------ */

/* Drops a referral from Xinzhan and waits for the county to get it. */
static void s_deliver(const char *file, const char *patient)
{
    char *ref = h_referral_json(H_COUNTY, patient, NULL);
    h_drop(&W, H_XINZHAN, file, ref);
    free(ref);
    char *got = h_wait_json(&W, H_COUNTY, "inbox", patient, 30000);
    cr_assert_not_null(got, "%s (%s) was not delivered", file, patient);
    free(got);
}

Test(systemd, agent_ready_watchdog_reload_stopping)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    s_notify_t *n = s_notify_start("notify-agent", 0);
    h_agent_start(&W, H_XINZHAN);
    s_unset_env();
    int ready = s_wait_msg(n, 0, "READY=1", 10000);
    cr_assert(ready >= 0, "no READY=1 from medlink-agent");
    cr_assert(strstr(n->msg[ready].text, "STATUS=node " H_XINZHAN), "%s", n->msg[ready].text);
    /* systemctl status shows the link's state. */
    cr_assert(s_wait_msg(n, 0, "STATUS=connected to broker " H_BROKER " as " H_XINZHAN, 15000) >= 0,
              "no STATUS for the connection");
    long t0 = n->msg[ready].at_ms;
    h_sleep_ms(2500);
    long gap;
    int pings = s_pings(n, t0 + 200, t0 + 2200, &gap);
    cr_log_info("medlink-agent: %d pings in 2 s, longest gap %ld ms", pings, gap);
    cr_assert(pings >= 7 && pings <= 13, "%d WATCHDOG=1 in 2 s (expected about 10)", pings);
    int from = s_count(n);
    kill(W.agents[0], SIGHUP);
    int rl = s_wait_msg(n, from, "RELOADING=1\nMONOTONIC_USEC=", 10000);
    cr_assert(rl >= 0, "no RELOADING=1 on SIGHUP");
    cr_assert(s_wait_msg(n, rl + 1, "READY=1", 10000) > rl, "no READY=1 after the reload");
    from = s_count(n);
    h_agent_stop(&W, H_XINZHAN);
    cr_assert(s_wait_msg(n, from, "STOPPING=1", 5000) >= 0, "no STOPPING=1 on SIGTERM");
    h_broker_stop(&W);
}

/* SIGHUP to a real agent after editing its ini:
 *   - log_level = warn applies: the next file's "queued" info line is not
 *     logged, though the file is delivered;
 *   - a broken file (log_level = loud) is an error and changes nothing:
 *     still warn, still delivering;
 *   - broker (needs a restart) and log_level = info: a warning naming
 *     broker, the old broker still used, info lines back. */
Test(systemd, agent_sighup_reload)
{
    h_world_init(&W, NULL);
    h_broker_start(&W);
    h_agent_start(&W, H_COUNTY);
    h_agent_start(&W, H_XINZHAN);
    char log[128], ini[700];
    snprintf(log, sizeof log, "agent-%s.log", H_XINZHAN);
    snprintf(ini, sizeof ini, "%s/agent-%s.ini", W.dir, H_XINZHAN);
    pid_t pid = W.agents[1];

    s_deliver("a.json", "Patient Alpha");
    cr_assert(s_wait_log(log, "outbox/a.json queued", 1, 5000) >= 1, "info lines are logged");

    s_edit(ini, "log_level = info", "log_level = warn");
    s_edit(ini, "scan_ms = 100", "scan_ms = 150");
    kill(pid, SIGHUP);
    cr_assert(s_wait_log(log, "reload: log_level info -> warn", 1, 10000) >= 1);
    cr_assert(s_wait_log(log, "reload: scan_ms 100 -> 150", 1, 10000) >= 1);
    s_deliver("b.json", "Patient Bravo");
    cr_assert_eq(h_log_contains(&W, log, "b.json"), 0, "an info line after log_level = warn");

    s_edit(ini, "log_level = warn", "log_level = loud");
    kill(pid, SIGHUP);
    cr_assert(s_wait_log(log, "reload refused, the running configuration stays", 1, 10000) >= 1);
    cr_assert(h_log_contains(&W, log, "log_level = \"loud\"") >= 1);
    s_deliver("c.json", "Patient Charlie");
    cr_assert_eq(h_log_contains(&W, log, "c.json"), 0, "the broken file changed the level");

    char from[128];
    snprintf(from, sizeof from, "broker = %s", W.endpoint);
    s_edit(ini, from, "broker = tcp://127.0.0.1:1");
    s_edit(ini, "log_level = loud", "log_level = info");
    kill(pid, SIGHUP);
    cr_assert(s_wait_log(log, "reload: broker changed; that needs a restart", 1, 10000) >= 1);
    cr_assert(s_wait_log(log, "reload: log_level warn -> info", 1, 10000) >= 1);
    s_deliver("d.json", "Patient Delta");
    cr_assert(s_wait_log(log, "outbox/d.json queued", 1, 5000) >= 1, "log_level = info again");
    cr_assert_eq(h_log_contains(&W, log, "connecting to tcp://127.0.0.1:1"), 0);
    cr_assert_eq(W.agents[1], pid);
    h_agent_stop(&W, H_XINZHAN);
    h_agent_stop(&W, H_COUNTY);
    h_broker_stop(&W);
}
