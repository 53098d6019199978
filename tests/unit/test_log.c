/* Unit tests for ml_log's formats: the journald priority prefixes (only
 * when stderr is the stream JOURNAL_STREAM names), the text lines as they
 * were, and log_format = json lines parsed back with jansson, with peers'
 * text (quotes, control characters, invalid UTF-8, Chinese) in them.
 * stderr is pointed at a temp file per test (criterion forks per test, so
 * the once-only journal detection starts afresh in each). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <jansson.h>

#include "ml_common.h"
#include "support.h"

static char s_path[600];

/* stderr into a fresh file; returns its fd (kept open as fd 2 too). */
static void s_stderr_to_file(void)
{
    char dir[512];
    ml_test_tmpdir(dir, sizeof dir);
    snprintf(s_path, sizeof s_path, "%s/log", dir);
    int fd = open(s_path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0600);
    cr_assert(fd >= 0);
    cr_assert(dup2(fd, STDERR_FILENO) == STDERR_FILENO);
    close(fd);
}

/* JOURNAL_STREAM naming stderr's device and inode, as systemd sets it. */
static void s_journal_is_stderr(void)
{
    struct stat st;
    cr_assert_eq(fstat(STDERR_FILENO, &st), 0);
    char v[64];
    snprintf(v, sizeof v, "%llu:%llu", (unsigned long long)st.st_dev,
             (unsigned long long)st.st_ino);
    setenv("JOURNAL_STREAM", v, 1);
}

/* The nth line (0-based) of the log file, malloc'd, without its newline. */
static char *s_line(int nth)
{
    FILE *f = fopen(s_path, "r");
    cr_assert(f);
    char *buf = NULL;
    size_t cap = 0;
    ssize_t n = -1;
    for (int i = 0; i <= nth; i++)
        if ((n = getline(&buf, &cap, f)) < 0)
            break;
    fclose(f);
    if (n < 0) {
        free(buf);
        return NULL;
    }
    if (n > 0 && buf[n - 1] == '\n')
        buf[n - 1] = '\0';
    return buf;
}

Test(log, journal_priorities_when_stderr_is_the_journal)
{
    s_stderr_to_file();
    s_journal_is_stderr();
    ml_log_set_level(ML_LOG_DEBUG);
    ml_log(ML_LOG_ERROR, "broker", "an error");
    ml_log(ML_LOG_WARN, "broker", "a warning");
    ml_log(ML_LOG_INFO, "broker", "some news");
    ml_log(ML_LOG_DEBUG, "broker", "a detail");
    cr_assert_eq(ml_log_journal(), 1);
    static const char *const want[][2] = {
        {"<3>", " error broker: an error"},
        {"<4>", " warn broker: a warning"},
        {"<6>", " info broker: some news"},
        {"<7>", " debug broker: a detail"},
    };
    for (int i = 0; i < 4; i++) {
        char *l = s_line(i);
        cr_assert(l, "line %d missing", i);
        cr_assert(strncmp(l, want[i][0], 3) == 0, "line %d: %s", i, l);
        /* Then the line as it always was: time, level, component. */
        cr_assert(l[3] >= '2' && l[3] <= '9' && l[26] == 'Z' && l[27] == ' ', "line %d: %s", i, l);
        cr_assert(strstr(l, want[i][1]), "line %d: %s", i, l);
        free(l);
    }
}

/* Inherited JOURNAL_STREAM, but stderr redirected elsewhere (a shell
 * redirect inside a unit): no prefix. */
Test(log, no_prefix_when_stderr_is_not_that_stream)
{
    s_stderr_to_file();
    setenv("JOURNAL_STREAM", "1:2", 1);
    ml_log(ML_LOG_ERROR, "agent", "plain");
    cr_assert_eq(ml_log_journal(), 0);
    char *l = s_line(0);
    cr_assert(l);
    cr_assert(l[0] == '2' && strstr(l, " error agent: plain"), "%s", l);
    free(l);
}

Test(log, no_prefix_without_journal_stream)
{
    s_stderr_to_file();
    unsetenv("JOURNAL_STREAM");
    ml_log(ML_LOG_WARN, "agent", "plain");
    char *l = s_line(0);
    cr_assert(l && l[0] == '2', "%s", l);
    free(l);
}

Test(log, format_parse)
{
    int f = -1;
    cr_assert_eq(ml_log_parse_format("json", &f), 0);
    cr_assert_eq(f, ML_LOG_FORMAT_JSON);
    cr_assert_eq(ml_log_parse_format("text", &f), 0);
    cr_assert_eq(f, ML_LOG_FORMAT_TEXT);
    cr_assert_eq(ml_log_parse_format("JSON", &f), ML_EINVAL);
    cr_assert_eq(ml_log_parse_format("", &f), ML_EINVAL);
    ml_log_set_format(ML_LOG_FORMAT_JSON);
    cr_assert_eq(ml_log_get_format(), ML_LOG_FORMAT_JSON);
    ml_log_set_format(42);
    cr_assert_eq(ml_log_get_format(), ML_LOG_FORMAT_TEXT);
}

static json_t *s_json_line(int nth, const char *prefix)
{
    char *l = s_line(nth);
    cr_assert(l, "line %d missing", nth);
    size_t skip = strlen(prefix);
    cr_assert(strncmp(l, prefix, skip) == 0, "line %d: %s", nth, l);
    json_error_t je;
    json_t *j = json_loads(l + skip, 0, &je);
    cr_assert(j, "line %d is not JSON (%s): %s", nth, je.text, l);
    free(l);
    return j;
}

Test(log, json_lines_parse_with_the_fields)
{
    s_stderr_to_file();
    unsetenv("JOURNAL_STREAM");
    ml_log_set_format(ML_LOG_FORMAT_JSON);
    /* A peer's reason with a quote, a backslash, a newline that would forge
     * a line, an escape sequence, a byte that is not UTF-8, and Chinese. */
    ml_log(ML_LOG_WARN, "session", "refused \"%s\"", "a\\b\nc\x1b[2J\xff 转诊");
    ml_log(ML_LOG_INFO, "broker", "plain");
    json_t *j = s_json_line(0, "");
    cr_assert_eq(json_object_size(j), 4);
    const char *t = json_string_value(json_object_get(j, "time"));
    cr_assert(t && strlen(t) == 24 && t[10] == 'T' && t[23] == 'Z', "time %s", t);
    cr_assert_str_eq(json_string_value(json_object_get(j, "level")), "warn");
    cr_assert_str_eq(json_string_value(json_object_get(j, "component")), "session");
    cr_assert_str_eq(json_string_value(json_object_get(j, "message")),
                     "refused \"a\\b\nc\x1b[2J\xef\xbf\xbd 转诊\"");
    json_decref(j);
    j = s_json_line(1, "");
    cr_assert_str_eq(json_string_value(json_object_get(j, "level")), "info");
    cr_assert_str_eq(json_string_value(json_object_get(j, "message")), "plain");
    json_decref(j);
    /* Exactly two lines: the newline in the message did not make a third. */
    char *l = s_line(2);
    cr_assert_null(l);
}

Test(log, json_lines_keep_the_journal_prefix)
{
    s_stderr_to_file();
    s_journal_is_stderr();
    ml_log_set_format(ML_LOG_FORMAT_JSON);
    ml_log(ML_LOG_ERROR, "store", "disk full");
    json_t *j = s_json_line(0, "<3>");
    cr_assert_str_eq(json_string_value(json_object_get(j, "level")), "error");
    cr_assert_str_eq(json_string_value(json_object_get(j, "message")), "disk full");
    json_decref(j);
}

/* A terminal-hostile character decoded by a viewer stays harmless: the
 * bidirectional override and C1 controls are \u escapes in the line. */
Test(log, json_escapes_terminal_controls)
{
    s_stderr_to_file();
    unsetenv("JOURNAL_STREAM");
    ml_log_set_format(ML_LOG_FORMAT_JSON);
    ml_log(ML_LOG_INFO, "x",
           "a\xe2\x80\xae"
           "b\xc2\x9b"
           "c");
    char *l = s_line(0);
    cr_assert(strstr(l, "a\\u202eb\\u009bc"), "%s", l);
    free(l);
}

/* A message at the size limit, all of it escaped six-fold, is still one
 * whole JSON line. */
Test(log, json_long_message_stays_one_valid_line)
{
    s_stderr_to_file();
    unsetenv("JOURNAL_STREAM");
    ml_log_set_format(ML_LOG_FORMAT_JSON);
    char big[4000];
    memset(big, '\x01', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    ml_log(ML_LOG_INFO, "x", "%s", big);
    json_t *j = s_json_line(0, "");
    cr_assert(strlen(json_string_value(json_object_get(j, "message"))) > 1000);
    json_decref(j);
}
