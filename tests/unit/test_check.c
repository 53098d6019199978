/* Unit tests for ml_check: endpoint syntax, the private-file rule of
 * private and store keys (F12), file and folder checks, and the problem
 * list that --check-config prints. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include "ml_check.h"
#include "ml_common.h"
#include "support.h"

static void s_ep_ok(const char *ep, int bind)
{
    char err[256] = "";
    cr_assert_eq(ml_check_endpoint(ep, bind, err, sizeof err), 0, "%s: %s", ep, err);
}

static void s_ep_bad(const char *ep, int bind, const char *want)
{
    char err[256] = "";
    cr_assert_eq(ml_check_endpoint(ep, bind, err, sizeof err), ML_ECONFIG, "%s accepted", ep);
    cr_assert(strstr(err, want), "%s: \"%s\" does not contain \"%s\"", ep, err, want);
}

Test(check, endpoints)
{
    s_ep_ok("tcp://127.0.0.1:7400", 0);
    s_ep_ok("tcp://broker.zhaozhou.example:1", 0);
    s_ep_ok("tcp://[::1]:65535", 0);
    s_ep_ok("tcp://0.0.0.0:7400", 1);
    s_ep_ok("tcp://*:7400", 1);
    s_ep_ok("tcp://127.0.0.1:0", 1);
    s_ep_ok("tcp://127.0.0.1:*", 1);

    s_ep_bad("127.0.0.1:7461", 0, "tcp:// is missing (expected tcp://HOST:PORT");
    s_ep_bad("ipc:///tmp/x", 0, "only tcp:// endpoints are supported");
    s_ep_bad("", 0, "no endpoint given");
    s_ep_bad("tcp://127.0.0.1", 0, "has no :PORT");
    s_ep_bad("tcp://:7400", 0, "host \"\"");
    s_ep_bad("tcp://a b:7400", 0, "is not a host name");
    s_ep_bad("tcp://*:7400", 0, "is not a host name");
    s_ep_bad("tcp://127.0.0.1:0", 0, "from 1 to 65535");
    s_ep_bad("tcp://127.0.0.1:*", 0, "from 1 to 65535");
    s_ep_bad("tcp://127.0.0.1:65536", 0, "from 1 to 65535");
    s_ep_bad("tcp://127.0.0.1:74x", 1, "from 0 to 65535");
    s_ep_bad("tcp://127.0.0.1:-1", 1, "is not a number");
    s_ep_bad("tcp://[::1:7400", 0, "has no :PORT");
}

static char s_dir[256];

static const char *s_file(const char *name, mode_t mode)
{
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", s_dir, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    cr_assert(fd >= 0);
    cr_assert_eq(write(fd, "x\n", 2), 2);
    close(fd);
    cr_assert_eq(chmod(path, mode), 0);
    return path;
}

Test(check, private_files_refuse_group_and_others)
{
    ml_test_tmpdir(s_dir, sizeof s_dir);
    static const struct {
        mode_t mode;
        int ok;
        const char *why;
    } cases[] = {
        {0600, 1, NULL},
        {0400, 1, NULL},
        {0644, 0, "is readable by group or others (mode 0644): chmod 600 "},
        {0640, 0, "is readable by group or others (mode 0640)"},
        {0604, 0, "is readable by group or others (mode 0604)"},
        {0620, 0, "is writable or executable by group or others (mode 0620)"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *path = s_file("k.key", cases[i].mode);
        int fd = open(path, O_RDONLY);
        cr_assert(fd >= 0);
        char err[512] = "";
        int rc = ml_check_private_fd(fd, path, "private key file", err, sizeof err);
        close(fd);
        if (cases[i].ok) {
            cr_assert_eq(rc, 0, "mode %o: %s", (unsigned)cases[i].mode, err);
            continue;
        }
        cr_assert_eq(rc, ML_EINVAL, "mode %o accepted", (unsigned)cases[i].mode);
        cr_assert(strstr(err, cases[i].why), "%s", err);
        cr_assert(strstr(err, "private key file "), "%s", err);
        cr_assert(strstr(err, path), "%s", err);
    }
}

Test(check, files_and_folders_collect_every_problem)
{
    ml_test_tmpdir(s_dir, sizeof s_dir);
    char missing[512], sub[512], notdir[512];
    snprintf(missing, sizeof missing, "%s/none.crt", s_dir);
    snprintf(sub, sizeof sub, "%s/a/b/c", s_dir);
    ml_check_t c;
    ml_check_init(&c);
    cr_assert_eq(ml_check_file(&c, "[x] ca", s_file("ca.crt", 0644), ML_CHECK_READABLE), 0);
    cr_assert_eq(ml_check_file(&c, "[x] key", s_file("k.key", 0600), ML_CHECK_PRIVATE), 0);
    cr_assert_eq(ml_check_dir(&c, "[x] data_dir", sub), 0, "%s", c.text);
    cr_assert_eq(c.n, 0, "%s", c.text);

    cr_assert_eq(ml_check_file(&c, "[x] cert", missing, ML_CHECK_READABLE), ML_ECONFIG);
    cr_assert_eq(ml_check_file(&c, "[x] key", s_file("k.key", 0644), ML_CHECK_PRIVATE), ML_ECONFIG);
    cr_assert_eq(ml_check_file(&c, "[x] crl", s_dir, ML_CHECK_READABLE), ML_ECONFIG);
    snprintf(notdir, sizeof notdir, "%s/ca.crt/data", s_dir);
    cr_assert_eq(ml_check_dir(&c, "[x] data_dir", notdir), ML_ECONFIG);
    cr_assert_eq(c.n, 4, "%s", c.text);
    cr_assert(strstr(c.text, "[x] cert = "), "%s", c.text);
    cr_assert(strstr(c.text, "none.crt: no such file\n"), "%s", c.text);
    cr_assert(strstr(c.text, "[x] key: file "), "%s", c.text);
    cr_assert(strstr(c.text, "(mode 0644)"), "%s", c.text);
    cr_assert(strstr(c.text, "[x] crl = "), "%s", c.text);
    cr_assert(strstr(c.text, "not a regular file"), "%s", c.text);
    cr_assert(strstr(c.text, "ca.crt is not a folder"), "%s", c.text);

    /* Printed one line per problem, each with the program's name. */
    char buf[8192] = "";
    FILE *f = fmemopen(buf, sizeof buf, "w");
    cr_assert_not_null(f);
    ml_check_print(&c, "medlinkd", f);
    fclose(f);
    int lines = 0;
    for (const char *p = buf; (p = strstr(p, "medlinkd: ")); p++)
        lines++;
    cr_assert_eq(lines, 4, "%s", buf);
}

Test(check, full_report_counts_what_it_left_out)
{
    ml_check_t c;
    ml_check_init(&c);
    char line[600];
    memset(line, 'x', sizeof line - 1);
    line[sizeof line - 1] = '\0';
    for (int i = 0; i < 40; i++)
        ml_check_add(&c, "%d %s", i, line);
    cr_assert_eq(c.n, 40);
    cr_assert_gt(c.left_out, 0);
    cr_assert_lt(c.len, sizeof c.text);
    ml_check_add_lines(&c, "a\nb\n");
    cr_assert_eq(c.n, 42);
}
