/* Unit tests for ml_ini: file order, section walks, integer parsing, the
 * libinih limits we guard against (long section names, long lines) and
 * error messages that name file and line. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "ml_common.h"
#include "ml_ini.h"
#include "support.h"

static char s_dir[256];
static char s_path[512];

static const char *s_write(const char *text)
{
    ml_test_tmpdir(s_dir, sizeof s_dir);
    snprintf(s_path, sizeof s_path, "%s/test.ini", s_dir);
    FILE *f = fopen(s_path, "w");
    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
    return s_path;
}

static ml_ini_t *s_load_ok(const char *text)
{
    ml_ini_t *ini = NULL;
    char err[256] = "";
    cr_assert_eq(ml_ini_load(s_write(text), &ini, err, sizeof err), 0, "%s", err);
    return ini;
}

static void s_refused(const char *text, const char *want)
{
    ml_ini_t *ini = NULL;
    char err[256] = "";
    cr_assert_eq(ml_ini_load(s_write(text), &ini, err, sizeof err), ML_ECONFIG);
    cr_assert_null(ini);
    cr_assert(strstr(err, want), "error \"%s\" does not contain \"%s\"", err, want);
}

struct s_walk {
    char out[1024];
};

static int s_section_cb(const ml_ini_t *ini, const char *section, const char *name, void *arg)
{
    struct s_walk *w = arg;
    size_t n = strlen(w->out);
    snprintf(w->out + n, sizeof w->out - n, "%s|%s;", section, name);
    return 0;
}

static int s_key_cb(const char *key, const char *value, void *arg)
{
    struct s_walk *w = arg;
    size_t n = strlen(w->out);
    snprintf(w->out + n, sizeof w->out - n, "%s=%s;", key, value);
    return 0;
}

static int s_stop_cb(const char *key, const char *value, void *arg)
{
    return 42;
}

Test(ini, get_values_keys_and_sections_in_file_order)
{
    ml_ini_t *ini = s_load_ok("top = 1\n"
                              "[broker]\n"
                              "  id = medlinkd   ; inline comment\n"
                              "# comment\n"
                              "listen=tcp://x:1\n"
                              "[node county.zhaozhou.hospital]\n"
                              "role = COUNTY_HOSPITAL\n"
                              "name = Zhaozhou County People's Hospital\n"
                              "[ node   b.c ]\n"
                              "role = OPS\n"
                              "role = TOWNSHIP_CLINIC\n"
                              "[nodes x]\n"
                              "[node]\n"
                              "[acl OPS]\n");
    cr_assert_str_eq(ml_ini_get(ini, "", "top", NULL), "1");
    cr_assert_str_eq(ml_ini_get(ini, "broker", "id", NULL), "medlinkd");
    cr_assert_str_eq(ml_ini_get(ini, "broker", "listen", NULL), "tcp://x:1");
    cr_assert_str_eq(ml_ini_get(ini, "broker", "absent", "dflt"), "dflt");
    cr_assert_null(ml_ini_get(ini, "nothere", "id", NULL));
    cr_assert_str_eq(ml_ini_get(ini, "node county.zhaozhou.hospital", "name", NULL),
                     "Zhaozhou County People's Hospital");
    /* The later of two lines wins for get; keys walks both. */
    cr_assert_str_eq(ml_ini_get(ini, "node   b.c", "role", NULL), "TOWNSHIP_CLINIC");

    struct s_walk w = {""};
    cr_assert_eq(ml_ini_sections(ini, "node", s_section_cb, &w), 0);
    cr_assert_str_eq(w.out, "node county.zhaozhou.hospital|county.zhaozhou.hospital;"
                            "node   b.c|b.c;");
    w.out[0] = '\0';
    cr_assert_eq(ml_ini_keys(ini, "node   b.c", s_key_cb, &w), 0);
    cr_assert_str_eq(w.out, "role=OPS;role=TOWNSHIP_CLINIC;");
    cr_assert_eq(ml_ini_keys(ini, "broker", s_stop_cb, NULL), 42);
    ml_ini_destroy(&ini);
    cr_assert_null(ini);
    ml_ini_destroy(&ini);
}

Test(ini, get_long_checks_syntax_and_range)
{
    ml_ini_t *ini = s_load_ok("[a]\nn = 42\nneg = -7\nbad = 12x\nbig = 99999999999999999999\n"
                              "empty =\n");
    long v = 0;
    char err[256] = "";
    cr_assert_eq(ml_ini_get_long(ini, "a", "n", 1, 0, 100, &v, err, sizeof err), 0);
    cr_assert_eq(v, 42);
    cr_assert_eq(ml_ini_get_long(ini, "a", "neg", 1, -10, 100, &v, err, sizeof err), 0);
    cr_assert_eq(v, -7);
    cr_assert_eq(ml_ini_get_long(ini, "a", "absent", 17, 0, 100, &v, err, sizeof err), 0);
    cr_assert_eq(v, 17);
    cr_assert_eq(ml_ini_get_long(ini, "a", "empty", 18, 0, 100, &v, err, sizeof err), 0);
    cr_assert_eq(v, 18);
    cr_assert_eq(ml_ini_get_long(ini, "a", "n", 1, 0, 10, &v, err, sizeof err), ML_ECONFIG);
    cr_assert(strstr(err, "test.ini:2: [a] n = 42 is out of range (0 to 10)"), "%s", err);
    cr_assert_eq(ml_ini_get_long(ini, "a", "bad", 1, 0, 10, &v, err, sizeof err), ML_ECONFIG);
    cr_assert(strstr(err, "test.ini:4: [a] bad = \"12x\" is not a whole number"), "%s", err);
    cr_assert_eq(ml_ini_get_long(ini, "a", "big", 1, 0, 10, &v, err, sizeof err), ML_ECONFIG);
    cr_assert(strstr(err, "[a] big"), "%s", err);
    ml_ini_destroy(&ini);
}

Test(ini, continuation_lines_join_the_value)
{
    ml_ini_t *ini = s_load_ok("[acl X]\nREFERRAL = A\n    B\n\tC\nOTHER = D\n");
    cr_assert_str_eq(ml_ini_get(ini, "acl X", "REFERRAL", NULL), "A\nB\nC");
    cr_assert_str_eq(ml_ini_get(ini, "acl X", "OTHER", NULL), "D");
    ml_ini_destroy(&ini);
}

Test(ini, long_section_names_kept_whole)
{
    /* inih itself truncates section names to 49 bytes. */
    const char *id = "township.some-very-long-community-name.some-very-long-village.clinic";
    char text[512];
    snprintf(text, sizeof text, "[node %s]\nrole = OPS\n", id);
    ml_ini_t *ini = s_load_ok(text);
    char section[256];
    snprintf(section, sizeof section, "node %s", id);
    cr_assert_str_eq(ml_ini_get(ini, section, "role", ""), "OPS");
    struct s_walk w = {""};
    ml_ini_sections(ini, "node", s_section_cb, &w);
    cr_assert(strstr(w.out, id), "%s", w.out);
    ml_ini_destroy(&ini);
}

Test(ini, utf8_bom_and_crlf_accepted)
{
    ml_ini_t *ini = s_load_ok("\xef\xbb\xbf[broker]\r\nid = x\r\n");
    cr_assert_str_eq(ml_ini_get(ini, "broker", "id", NULL), "x");
    ml_ini_destroy(&ini);
}

Test(ini, errors_name_file_and_line)
{
    s_refused("[a]\nk = v\nthis line has no equals sign\n", "test.ini:3: cannot parse");
    s_refused("[a]\nk = v\n[b\n", "test.ini:3:");
    s_refused("[a]\n= v\n", "test.ini:2: missing key name");
    s_refused("[a]\nk = v\n[b]\n[a]\n", "test.ini:4: section [a] appears twice (first on line 1)");
    char text[1024] = "[a]\nk = ";
    for (int i = 0; i < 300; i++)
        strcat(text, "x");
    strcat(text, "\n");
    s_refused(text, "test.ini:2: line longer than");

    ml_ini_t *ini = NULL;
    char err[256] = "";
    cr_assert_eq(ml_ini_load("/nonexistent/x.ini", &ini, err, sizeof err), ML_ECONFIG);
    cr_assert(strstr(err, "cannot open /nonexistent/x.ini"), "%s", err);
}

Test(ini, dir_is_the_files_folder)
{
    ml_ini_t *ini = s_load_ok("[a]\n");
    char real[512];
    cr_assert_not_null(realpath(s_dir, real));
    cr_assert_str_eq(ml_ini_dir(ini), real);
    ml_ini_destroy(&ini);
}

/* The schema checker of strict configuration (ml_ini_check). */
static const ml_ini_key_t s_schema[] = {
    {"broker", "id"}, {"broker", "listen"}, {"node *", "role"},
    {"acl *", "*"},   {"deadlines", "*"},   {NULL, NULL},
};

static void s_check(const char *text, int want_rc, const char *want)
{
    ml_ini_t *ini = s_load_ok(text);
    char err[2048] = "x";
    int rc = ml_ini_check(ini, s_schema, err, sizeof err);
    cr_assert_eq(rc, want_rc, "rc %d for:\n%s\nerr: %s", rc, text, err);
    if (want)
        cr_assert(strstr(err, want), "error \"%s\" does not contain \"%s\"", err, want);
    else
        cr_assert_str_eq(err, "");
    ml_ini_destroy(&ini);
}

Test(ini, check_accepts_every_key_of_the_schema)
{
    s_check("; comment\n[broker]\nid = b\nlisten = tcp://127.0.0.1:1\n\n[node a.b]\nrole = OPS\n"
            "[node  c]\nrole = OPS\n[acl OPS]\nREFERRAL = OPS\nANYTHING = x\n[deadlines]\n"
            "referral = ACCEPTED 1m\n",
            0, NULL);
    /* An empty file and sections without keys are fine. */
    s_check("", 0, NULL);
    s_check("[broker]\n[deadlines]\n", 0, NULL);
}

Test(ini, check_unknown_key_names_file_line_section_and_key)
{
    s_check("[broker]\nid = b\n\nhearbeat_ms = 5\n", ML_ECONFIG,
            "test.ini:4: [broker] hearbeat_ms: unknown key");
    /* A key of another section is unknown where it stands. */
    s_check("[broker]\nid = b\n[node a]\nrole = OPS\nlisten = x\n", ML_ECONFIG,
            "test.ini:5: [node a] listen: unknown key");
    /* A continuation line belongs to its key and is no key of its own. */
    s_check("[broker]\nid = b\n  more = text\n", 0, NULL);
}

Test(ini, check_unknown_section_lists_the_known_ones)
{
    s_check("[broker]\nid = b\n[brokr]\nid = c\n", ML_ECONFIG,
            "test.ini:3: [brokr]: unknown section (expected [broker], [node NAME], [acl NAME], "
            "[deadlines])");
    /* "node *" needs a name, and a prefix is not a name. */
    s_check("[node]\nrole = OPS\n", ML_ECONFIG, "test.ini:1: [node]: unknown section");
    s_check("[nodes a]\nrole = OPS\n", ML_ECONFIG, "test.ini:1: [nodes a]: unknown section");
    /* The keys of an unknown section are not reported once more. */
    ml_ini_t *ini = s_load_ok("[brokr]\nid = c\nlisten = d\n");
    char err[1024];
    cr_assert_eq(ml_ini_check(ini, s_schema, err, sizeof err), ML_ECONFIG);
    cr_assert_null(strstr(err, "unknown key"), "%s", err);
    cr_assert_null(strchr(err, '\n'), "one line expected: %s", err);
    ml_ini_destroy(&ini);
}

Test(ini, check_key_outside_any_section)
{
    s_check("id = b\n[broker]\n", ML_ECONFIG,
            "test.ini:1: id: key outside any section (expected [broker]");
}

Test(ini, check_reports_every_problem_in_file_order)
{
    ml_ini_t *ini = s_load_ok("[broker]\nidd = 1\n[brokr]\n[broker2]\n[node a]\nrol = x\n");
    char err[1024];
    cr_assert_eq(ml_ini_check(ini, s_schema, err, sizeof err), ML_ECONFIG);
    const char *a = strstr(err, "test.ini:2: [broker] idd: unknown key");
    const char *b = strstr(err, "test.ini:3: [brokr]: unknown section");
    const char *c = strstr(err, "test.ini:4: [broker2]: unknown section");
    const char *d = strstr(err, "test.ini:6: [node a] rol: unknown key");
    cr_assert(a && b && c && d && a < b && b < c && c < d, "%s", err);
    ml_ini_destroy(&ini);

    /* A small buffer keeps whole lines and says how many were left out. */
    char text[4096] = "[broker]\n";
    for (int i = 0; i < 40; i++) {
        char line[32];
        snprintf(line, sizeof line, "bad%d = 1\n", i);
        strcat(text, line);
    }
    ini = s_load_ok(text);
    char small[300];
    cr_assert_eq(ml_ini_check(ini, s_schema, small, sizeof small), ML_ECONFIG);
    cr_assert(strstr(small, "test.ini:2: [broker] bad0: unknown key"), "%s", small);
    cr_assert(strstr(small, "more)"), "%s", small);
    ml_ini_destroy(&ini);
}

Test(ini, line_of_a_key)
{
    ml_ini_t *ini = s_load_ok("[broker]\nid = a\n\nlisten = x\nid = b\n");
    cr_assert_eq(ml_ini_line(ini, "broker", "listen"), 4);
    /* The line of the value ml_ini_get returns: the last one. */
    cr_assert_eq(ml_ini_line(ini, "broker", "id"), 5);
    cr_assert_eq(ml_ini_line(ini, "broker", "nothing"), 0);
    cr_assert(strstr(ml_ini_path(ini), "test.ini"));
    ml_ini_destroy(&ini);
}
