/* Test helpers: temp folders, a PKI per test, shell commands. */
#include "support.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include <criterion/criterion.h>

const char *ml_test_source_dir(void)
{
    const char *s = getenv("ML_SOURCE_DIR");
    return s ? s : ".";
}

void ml_test_tmpdir(char *out, size_t len)
{
    const char *base = getenv("TMPDIR");
    snprintf(out, len, "%s/mltest.XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(out))
        cr_assert_fail("mkdtemp %s failed", out);
}

int ml_test_sh(const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    int st = system(cmd);
    if (st == -1)
        return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

void ml_test_pki(const char *dir, const char *ca_name, const char *const *nodes)
{
    char names[4096] = "";
    for (int i = 0; nodes && nodes[i]; i++) {
        strncat(names, " ", sizeof names - strlen(names) - 1);
        strncat(names, nodes[i], sizeof names - strlen(names) - 1);
    }
    int rc = ml_test_sh("%s/deploy/pki.sh --dir '%s' --ca-name '%s' %s >'%s/pki.log' 2>&1",
                        ml_test_source_dir(), dir, ca_name, names, dir);
    cr_assert_eq(rc, 0, "deploy/pki.sh failed (see %s/pki.log)", dir);
}
