/* medlinkctl for ops staff, against the real medlinkd and agents: the
 * counts and WARNING lines of `status`, the `nodes` command (human and
 * --json, the latter the same as status's "node"), tables that line up
 * with Chinese display names, local human times (--local-time, TZ), and
 * `top`, both as plain snapshots on a pipe and live in a real pseudo
 * terminal, where q and SIGTERM must leave the terminal's mode as it was. */
#include <errno.h>
#include <fcntl.h>
#include <locale.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>
#include <wchar.h>

#include <criterion/criterion.h>
#include <jansson.h>

#include "harness.h"
#include "ml_common.h"

static h_world_t W;
static char s_bin[600], s_ops[800];

static void s_teardown(void)
{
    h_world_fini(&W);
}

TestSuite(ctl_ops, .fini = s_teardown, .timeout = 300);

/* A second county hospital whose display name is Chinese: no certificate
 * is needed for it to be in the registry. */
#define S_ZH_NODE "county2.zhaozhou.hospital"
#define S_ZH_NAME "赵州县人民医院"

static void s_setup(const char *extra)
{
    h_world_init(&W, extra);
    h_broker_start(&W);
    h_bin("medlinkctl", s_bin, sizeof s_bin);
    h_ctl_config(&W, H_OPS, s_ops, sizeof s_ops);
}

/* The line of out that contains needle, copied into line. */
static int s_line_with(const char *out, const char *needle, char *line, size_t len)
{
    const char *p = strstr(out, needle);
    if (!p)
        return 0;
    if (*needle == '\n') /* a line that starts with the rest */
        p++;
    const char *b = p;
    while (b > out && b[-1] != '\n')
        b--;
    const char *e = strchr(p, '\n');
    size_t n = e ? (size_t)(e - b) : strlen(b);
    snprintf(line, len, "%.*s", (int)n, b);
    return 1;
}

static int s_count_lines_starting(const char *out, const char *prefix)
{
    int n = 0;
    for (const char *p = out; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
        if (strncmp(p, prefix, strlen(prefix)) == 0)
            n++;
    return n;
}

Test(ctl_ops, status_shows_counts_and_warnings)
{
    /* Every certificate of the demo PKI (a year; the CA ten) and the CRL
     * are inside a ten-year warning window. */
    s_setup("crl_warn_days = 3650\n");
    h_agent_start(&W, H_XINZHAN);
    h_agent_start(&W, H_COUNTY);
    char *ref = h_referral_json(H_COUNTY, "Wang Fang", NULL);
    h_drop(&W, H_XINZHAN, "ref-1.json", ref);
    free(ref);
    char *p = h_wait_json(&W, H_COUNTY, "inbox", "Wang Fang", 20000);
    cr_assert(p, "the referral did not reach the hospital");
    free(p);

    json_t *j = NULL;
    for (int waited = 0; waited < 10000; waited += 200) {
        j = h_ctl_json(s_ops, "status");
        if (h_json_u64(j, "openCases") >= 1)
            break;
        json_decref(j);
        j = NULL;
        h_sleep_ms(200);
    }
    cr_assert(j, "status --json never counted the open referral");
    char want[200];
    snprintf(want, sizeof want, "cases     open %lld, overdue %lld (in memory ",
             h_json_u64(j, "openCases"), h_json_u64(j, "overdueCases"));
    long long dead = h_json_u64(j, "deadLetters");
    json_decref(j);

    char *out = h_ctl(0, s_ops, "status");
    cr_assert(strstr(out, want), "status lacks \"%s\":\n%s", want, out);
    snprintf(want, sizeof want, "dlq       %lld dead letter", dead);
    cr_assert(strstr(out, want), "status lacks \"%s\":\n%s", want, out);
    char line[1024];
    cr_assert(s_line_with(out, "\nWARNING: ", line, sizeof line),
              "no line starting with WARNING: in status:\n%s", out);
    cr_assert(strstr(line, "expires in"), "the WARNING line says no expiry: %s", line);
    cr_assert(s_line_with(out, "CA certificate", line, sizeof line) &&
                  strncmp(line, "WARNING: ", 9) == 0 && strstr(line, "ca.crt"),
              "the CA certificate has no WARNING line:\n%s", out);
    /* The sections of before stay. */
    cr_assert(strstr(out, "\nsessions  ") && strstr(out, "\nNODE "), "a section is missing:\n%s",
              out);
    free(out);
}

Test(ctl_ops, nodes_human_and_json_match_status)
{
    s_setup(NULL);
    h_agent_start(&W, H_XINZHAN);
    char *out = NULL;
    for (int waited = 0; waited < 15000; waited += 200) {
        out = h_ctl(0, s_ops, "nodes");
        char line[1024];
        if (s_line_with(out, H_XINZHAN, line, sizeof line) && strstr(line, " online "))
            break;
        free(out);
        out = NULL;
        h_sleep_ms(200);
    }
    cr_assert(out, "nodes never showed the clinic online");
    char line[1024];
    cr_assert(s_line_with(out, "NODE", line, sizeof line));
    cr_assert(strstr(line, "NAME") && strstr(line, "STATE") && strstr(line, "LAST SEEN") &&
                  strstr(line, "BACKLOG") && strstr(line, "OLDEST QUEUED") &&
                  strstr(line, "IN FLIGHT") && strstr(line, "OPEN CASES"),
              "the header lacks a column: %s", line);
    cr_assert(s_line_with(out, H_FENGLE, line, sizeof line) && strstr(line, " offline ") &&
                  strstr(line, " never "),
              "the clinic that never came is not offline/never: %s", line);
    cr_assert(s_line_with(out, H_XINZHAN, line, sizeof line) &&
                  strstr(line, "Xinzhan Township Health Centre"),
              "the display name is missing: %s", line);
    cr_assert(strstr(out, "(7 nodes, "), "no node count:\n%s", out);
    free(out);

    /* --json: {"node": [...]}, the very list status --json has. */
    h_agent_stop(&W, H_XINZHAN); /* nothing changes between the two calls */
    json_t *n = h_ctl_json(s_ops, "nodes");
    json_t *s = h_ctl_json(s_ops, "status");
    json_t *a = json_object_get(n, "node"), *b = json_object_get(s, "node");
    cr_assert(json_is_array(a) && json_array_size(a) == 7, "nodes --json has no 7-node list");
    cr_assert_eq(json_object_size(n), 1, "nodes --json has more than the list");
    /* The ops node's own session is a new one each call: its lastSeen is
     * the only thing that may move. */
    for (size_t i = 0; i < json_array_size(a); i++) {
        json_object_del(json_array_get(a, i), "lastSeen");
        json_object_del(json_array_get(b, i), "lastSeen");
    }
    char *ta = json_dumps(a, JSON_SORT_KEYS), *tb = json_dumps(b, JSON_SORT_KEYS);
    cr_assert(json_equal(a, b), "nodes --json differs from status --json's node:\n%s\n%s", ta, tb);
    free(ta);
    free(tb);
    json_decref(n);
    json_decref(s);
}

/* Display columns of s[0..n) (the test's own count, from the C library). */
static int s_cols(const char *s, size_t n)
{
    wchar_t w[512];
    char tmp[1024];
    snprintf(tmp, sizeof tmp, "%.*s", (int)n, s);
    size_t k = mbstowcs(w, tmp, 511);
    cr_assert(k != (size_t)-1, "not UTF-8: %s", tmp);
    return wcswidth(w, k);
}

Test(ctl_ops, chinese_display_names_align)
{
    cr_assert(setlocale(LC_CTYPE, "C.UTF-8"), "no C.UTF-8 locale");
    s_setup("\n[node " S_ZH_NODE
            "]\nrole = COUNTY_HOSPITAL\ncommunity = zhaozhou\nname = " S_ZH_NAME "\n");
    /* LANG=C: medlinkctl must measure UTF-8 widths even so. */
    char *out = h_ctl_env(0, "LANG=C LC_ALL=", s_ops, "nodes");
    char zh[1024], en[1024];
    cr_assert(s_line_with(out, S_ZH_NAME, zh, sizeof zh), "no Chinese name:\n%s", out);
    cr_assert(s_line_with(out, "Zhaozhou County People's Hospital", en, sizeof en),
              "no ASCII name:\n%s", out);
    /* Both are COUNTY_HOSPITAL: the ROLE column after NAME. */
    const char *rz = strstr(zh, "COUNTY_HOSPITAL"), *re = strstr(en, "COUNTY_HOSPITAL");
    cr_assert(rz && re, "no role column:\n%s", out);
    int cz = s_cols(zh, (size_t)(rz - zh)), ce = s_cols(en, (size_t)(re - en));
    cr_assert_eq(cz, ce,
                 "ROLE starts at column %d after the Chinese name, %d after the ASCII one:\n%s", cz,
                 ce, out);
    /* And every column after it, too. */
    const char *sz = strstr(rz, "offline"), *se = strstr(re, "offline");
    cr_assert(sz && se);
    cr_assert_eq(s_cols(zh, (size_t)(sz - zh)), s_cols(en, (size_t)(se - en)));
    free(out);
}

Test(ctl_ops, local_time_with_tz_shows_offset)
{
    s_setup(NULL);
    char *out = h_ctl_env(0, "-u TZ", s_ops, "status");
    char line[1024];
    cr_assert(s_line_with(out, "uptime", line, sizeof line));
    cr_assert(strstr(line, "Z)"), "UTC is not the default: %s", line);
    free(out);

    out = h_ctl_env(0, "TZ=Asia/Shanghai", s_ops, "status");
    cr_assert(s_line_with(out, "uptime", line, sizeof line));
    cr_assert(strstr(line, " +08:00)"), "TZ=Asia/Shanghai gives no +08:00: %s", line);
    /* "(since 2026-12-07 23:50:01 +08:00)" */
    const char *since = strstr(line, "since ");
    cr_assert(since && strlen(since) >= 6 + 26 && since[6 + 10] == ' ' && since[6 + 13] == ':',
              "not YYYY-MM-DD HH:MM:SS +08:00: %s", line);
    free(out);

    /* --local-time with the system's zone named by TZ's file. */
    out = h_ctl_env(0, "TZ=:Asia/Shanghai", s_ops, "--local-time status");
    cr_assert(s_line_with(out, "uptime", line, sizeof line));
    cr_assert(strstr(line, " +08:00)"), "--local-time gives no +08:00: %s", line);
    free(out);

    /* JSON stays epoch milliseconds whatever TZ says. */
    out = h_ctl_env(0, "TZ=Asia/Shanghai", s_ops, "--local-time --json status");
    cr_assert(strstr(out, "\"startedAt\": \"") && !strstr(out, "+08:00"),
              "JSON changed with TZ:\n%s", out);
    free(out);
}

/* Waits until nodes shows node online. */
static void s_wait_online(const char *node)
{
    for (int waited = 0; waited < 20000; waited += 200) {
        char *out = h_ctl(0, s_ops, "nodes"), line[1024];
        int on = s_line_with(out, node, line, sizeof line) && strstr(line, " online ");
        free(out);
        if (on)
            return;
        h_sleep_ms(200);
    }
    cr_assert_fail("%s never came online", node);
}

Test(ctl_ops, top_count_prints_snapshots_without_escapes)
{
    s_setup(NULL);
    h_agent_start(&W, H_XINZHAN);
    s_wait_online(H_XINZHAN);
    int sessions = h_log_contains(&W, "broker.log", "up (medlinkctl/");
    int asked = h_log_contains(&W, "broker.log", "asked for OP_STATUS");
    char *out = h_ctl(0, s_ops, "top --count 2 --interval 0.5");
    /* One session for both refreshes. */
    for (int waited = 0; waited < 5000; waited += 100) {
        if (h_log_contains(&W, "broker.log", "asked for OP_STATUS") >= asked + 2)
            break;
        h_sleep_ms(100);
    }
    cr_assert_eq(h_log_contains(&W, "broker.log", "asked for OP_STATUS"), asked + 2);
    cr_assert_eq(h_log_contains(&W, "broker.log", "up (medlinkctl/"), sessions + 1,
                 "top opened more than one session for two refreshes");
    cr_assert_eq(s_count_lines_starting(out, "broker " H_BROKER), 2, "not two snapshots:\n%s", out);
    cr_assert_eq(s_count_lines_starting(out, "per second: "), 2, "no rates:\n%s", out);
    cr_assert_eq(strchr(out, '\x1b'), NULL, "escape codes on a pipe:\n%s", out);
    /* The second one has rates (deltas of the first), the first "-". */
    const char *second = strstr(strstr(out, "per second: ") + 1, "per second: ");
    cr_assert(second && strncmp(second, "per second: accepted -", 22) != 0,
              "the second snapshot has no rate:\n%s", out);
    char line[1024];
    cr_assert(s_line_with(out, H_XINZHAN, line, sizeof line) && strstr(line, "online"),
              "no node line:\n%s", out);
    free(out);
}

/* medlinkctl args in a new pseudo terminal: *pid, *master; the slave is
 * kept open in *slave so that its mode can be read after the child ends. */
static void s_pty_spawn(const char *args, int rows, pid_t *pid, int *master, int *slave)
{
    struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = 120};
    cr_assert_eq(openpty(master, slave, NULL, NULL, &ws), 0, "openpty: %s", strerror(errno));
    *pid = fork();
    cr_assert(*pid >= 0);
    if (*pid == 0) {
        setsid();
        ioctl(*slave, TIOCSCTTY, 0);
        dup2(*slave, 0);
        dup2(*slave, 1);
        dup2(*slave, 2);
        close(*master);
        char cmd[2048];
        snprintf(cmd, sizeof cmd, "exec '%s' --config '%s' %s", s_bin, s_ops, args);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
}

/* Reads the master until needle shows or timeout_ms passes; returns 1 if
 * it showed. Everything read is appended to buf. */
static int s_pty_wait(int master, const char *needle, char *buf, size_t cap, size_t *len,
                      int timeout_ms)
{
    int64_t end = ml_mono_ms() + timeout_ms;
    while (ml_mono_ms() < end) {
        buf[*len] = '\0';
        if (strstr(buf, needle))
            return 1;
        struct pollfd pfd = {master, POLLIN, 0};
        if (poll(&pfd, 1, 100) <= 0)
            continue;
        ssize_t n = read(master, buf + *len, cap - *len - 1);
        if (n <= 0)
            return 0;
        *len += (size_t)n;
        if (*len > cap - 4096) { /* keep the tail */
            memmove(buf, buf + *len - 2048, 2048);
            *len = 2048;
        }
    }
    buf[*len] = '\0';
    return strstr(buf, needle) != NULL;
}

/* Waits for pid while draining the master; returns its wait status. */
static int s_pty_reap(pid_t pid, int master, int timeout_ms)
{
    int64_t end = ml_mono_ms() + timeout_ms;
    char sink[4096];
    while (ml_mono_ms() < end) {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid)
            return st;
        struct pollfd pfd = {master, POLLIN, 0};
        if (poll(&pfd, 1, 50) > 0 && read(master, sink, sizeof sink) < 0)
            h_sleep_ms(50);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    cr_assert_fail("medlinkctl top did not exit within %d ms", timeout_ms);
    return -1;
}

/* top in a pty of rows x 120; ended by q, or SIGTERM when by_signal is 1,
 * or stopped and continued first (2). */
static void s_top_in_pty(int by_signal, int rows)
{
    s_setup(NULL);
    h_agent_start(&W, H_XINZHAN);
    s_wait_online(H_XINZHAN);
    pid_t pid;
    int master, slave;
    s_pty_spawn("top --interval 0.5", rows, &pid, &master, &slave);
    struct termios before;
    cr_assert_eq(tcgetattr(slave, &before), 0);
    cr_assert(before.c_lflag & ICANON);
    static char buf[65536];
    size_t len = 0;
    cr_assert(s_pty_wait(master, "DELIVERED/S", buf, sizeof buf, &len, 20000),
              "top drew no node table:\n%s", buf);
    if (rows >= 20) {
        cr_assert(s_pty_wait(master, H_XINZHAN, buf, sizeof buf, &len, 10000));
    } else {
        /* 7 registered nodes do not fit: the rest is counted. */
        cr_assert(s_pty_wait(master, " more", buf, sizeof buf, &len, 10000),
                  "no \"... N more\" in %d rows:\n%s", rows, buf);
        cr_assert(strstr(buf, "... 6 more"), "not 6 more in %d rows:\n%s", rows, buf);
    }
    struct termios during;
    cr_assert_eq(tcgetattr(slave, &during), 0);
    cr_assert_eq(during.c_lflag & (ICANON | ECHO), 0, "top left the terminal in canonical mode");
    cr_assert(strstr(buf, "\x1b[?1049h"), "no alternate screen");
    if (by_signal == 2) {
        /* Ctrl-Z: stopped with the terminal as it was; fg: top's mode
         * again; then q. */
        kill(pid, SIGTSTP);
        int st = 0;
        cr_assert_eq(waitpid(pid, &st, WUNTRACED), pid);
        cr_assert(WIFSTOPPED(st), "top did not stop on SIGTSTP (status %d)", st);
        struct termios stopped;
        cr_assert_eq(tcgetattr(slave, &stopped), 0);
        cr_assert_eq(stopped.c_lflag, before.c_lflag, "stopped with the terminal in top's mode");
        kill(pid, SIGCONT);
        int raw = 0;
        char sink[4096];
        for (int waited = 0; !raw && waited < 10000; waited += 50) {
            struct pollfd pfd = {master, POLLIN, 0};
            if (poll(&pfd, 1, 50) > 0 && read(master, sink, sizeof sink) < 0)
                break;
            struct termios t;
            raw = tcgetattr(slave, &t) == 0 && (t.c_lflag & ICANON) == 0;
        }
        cr_assert(raw, "top did not set its mode again after SIGCONT");
    }
    if (by_signal == 1)
        kill(pid, SIGTERM);
    else
        cr_assert_eq(write(master, "q", 1), 1);
    int st = s_pty_reap(pid, master, 15000);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "top ended with status %d", st);
    struct termios after;
    cr_assert_eq(tcgetattr(slave, &after), 0);
    cr_assert_eq(after.c_lflag, before.c_lflag, "lflag %#x, was %#x", (unsigned)after.c_lflag,
                 (unsigned)before.c_lflag);
    cr_assert_eq(after.c_iflag, before.c_iflag);
    cr_assert_eq(after.c_cc[VMIN], before.c_cc[VMIN]);
    cr_assert_eq(fcntl(slave, F_GETFL) & O_NONBLOCK, 0, "stdin left non-blocking");
    close(master);
    close(slave);
}

Test(ctl_ops, top_in_pty_quits_on_q_and_restores_terminal)
{
    s_top_in_pty(0, 30);
}

/* 8 rows: header (3 lines), a blank line, the table's header, one node
 * and "... 6 more", then the key help on the last row. */
Test(ctl_ops, top_in_small_pty_cuts_rows_and_restores_terminal_on_sigterm)
{
    s_top_in_pty(1, 8);
}

Test(ctl_ops, top_says_disconnected_and_recovers)
{
    s_setup(NULL);
    char path[700];
    snprintf(path, sizeof path, "%s/top.out", W.dir);
    pid_t pid = fork();
    cr_assert(pid >= 0);
    if (pid == 0) {
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        dup2(fd, 1);
        dup2(fd, 2);
        execl(s_bin, s_bin, "--config", s_ops, "top", "--interval", "0.3", (char *)NULL);
        _exit(127);
    }
    char *out = NULL;
    int ok = 0;
    for (int waited = 0; !ok && waited < 20000; waited += 100) {
        free(out);
        out = h_slurp(path);
        ok = out && strstr(out, "DELIVERED/S");
        h_sleep_ms(100);
    }
    cr_assert(ok, "no first snapshot:\n%s", out ? out : "");
    h_broker_kill(&W);
    ok = 0;
    for (int waited = 0; !ok && waited < 30000; waited += 100) {
        free(out);
        out = h_slurp(path);
        ok = out && strstr(out, "disconnected, retrying");
        h_sleep_ms(100);
    }
    cr_assert(ok, "top did not say the broker went away:\n%s", out ? out : "");
    int before = s_count_lines_starting(out, "broker " H_BROKER);
    h_broker_start(&W);
    ok = 0;
    for (int waited = 0; !ok && waited < 30000; waited += 200) {
        free(out);
        out = h_slurp(path);
        const char *last = out ? strstr(out, "disconnected, retrying") : NULL;
        while (last && strstr(last + 1, "disconnected, retrying"))
            last = strstr(last + 1, "disconnected, retrying");
        ok = last && strstr(last, "\nbroker " H_BROKER);
        h_sleep_ms(200);
    }
    cr_assert(ok, "top did not come back with the broker:\n%s", out);
    cr_assert(s_count_lines_starting(out, "broker " H_BROKER) > before);
    kill(pid, SIGTERM);
    int st;
    cr_assert_eq(waitpid(pid, &st, 0), pid);
    cr_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0, "top ended with status %d", st);
    free(out);
}

Test(ctl_ops, top_and_nodes_refused_for_a_clinic)
{
    s_setup(NULL);
    char clinic[800];
    h_ctl_config(&W, H_XINZHAN, clinic, sizeof clinic);
    const char *cmds[] = {"nodes", "top --count 1"};
    for (size_t i = 0; i < 2; i++) {
        int st = -1;
        char *out = h_run(&st, "'%s' --config '%s' %s 2>&1", s_bin, clinic, cmds[i]);
        cr_assert_eq(st, 1, "%s as a clinic: exit %d:\n%s", cmds[i], st, out);
        cr_assert(strstr(out, "NACK_FORBIDDEN") || strstr(out, "OPS"), "%s: no reason:\n%s",
                  cmds[i], out);
        free(out);
    }
}

Test(ctl_ops, top_in_pty_suspend_restores_terminal_and_resume_sets_it_again)
{
    s_top_in_pty(2, 30);
}
