/* INI files for medlinkd and the agent, parsed by libinih and kept as an
 * ordered list of (section, key, value, line) entries plus the list of
 * section headers. inih is fed through our own line reader for three
 * reasons: it counts lines, so every later error can say "file:line";
 * it refuses lines longer than inih's fixed buffer, which inih would
 * otherwise split silently into two lines; and it records section names
 * itself, because inih truncates them to 49 bytes, which would quietly
 * turn [node some.long.node.id] into a different node. A section header
 * that repeats an earlier one is refused: a node defined twice is a
 * mistake the operator must hear about, not a merge. */
#include "ml_ini.h"

#include <ctype.h>
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ini.h>

#include "ml_common.h"

struct s_entry {
    const char *section; /* points at a sections[] name, or at "" */
    char *key;
    char *value;
    int line;
};

struct s_section {
    char *name;
    int line;
};

struct ml_ini {
    char *path;
    char *dir;
    struct s_entry *entries;
    size_t n_entries, cap_entries;
    struct s_section *sections;
    size_t n_sections, cap_sections;
};

/* Parser state shared by the reader and the handler. */
struct s_load {
    ml_ini_t *ini;
    FILE *fp;
    char *buf; /* getline buffer */
    size_t bufcap;
    int line;           /* number of the line last handed to inih */
    int key_in_section; /* a key line was seen since the last header */
    int continuation;   /* the current line continues the previous value */
    const char *section;
    int rc;
    char msg[256];
};

static void s_load_fail(struct s_load *st, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void s_load_fail(struct s_load *st, int rc, const char *fmt, ...)
{
    if (st->rc)
        return; /* keep the first error */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(st->msg, sizeof st->msg, fmt, ap);
    va_end(ap);
    st->rc = rc;
}

static char *s_trim(char *s)
{
    while (*s && isspace((unsigned char)*s))
        s++;
    size_t n = strlen(s);
    while (n > 0 && isspace((unsigned char)s[n - 1]))
        s[--n] = '\0';
    return s;
}

static int s_add_section(struct s_load *st, const char *name)
{
    ml_ini_t *ini = st->ini;
    for (size_t i = 0; i < ini->n_sections; i++) {
        if (strcmp(ini->sections[i].name, name) == 0) {
            s_load_fail(st, ML_ECONFIG, "section [%s] appears twice (first on line %d)", name,
                        ini->sections[i].line);
            return ML_ECONFIG;
        }
    }
    if (ini->n_sections == ini->cap_sections) {
        size_t cap = ini->cap_sections ? ini->cap_sections * 2 : 16;
        struct s_section *s = realloc(ini->sections, cap * sizeof *s);
        if (!s)
            goto nomem;
        ini->sections = s;
        ini->cap_sections = cap;
    }
    char *copy = strdup(name);
    if (!copy)
        goto nomem;
    ini->sections[ini->n_sections].name = copy;
    ini->sections[ini->n_sections].line = st->line;
    st->section = copy;
    ini->n_sections++;
    return 0;
nomem:
    s_load_fail(st, ML_ENOMEM, "out of memory");
    return ML_ENOMEM;
}

/* fgets-style reader handed to inih. Besides copying the line, it works out
 * what inih will make of it, with inih's own rules (comment, indented
 * continuation of the previous key, section header, key line), so that the
 * handler knows the real section name and whether it is seeing a
 * continuation. Returning NULL ends the parse. */
static char *s_reader(char *str, int num, void *stream)
{
    struct s_load *st = stream;
    if (st->rc)
        return NULL;
    ssize_t n = getline(&st->buf, &st->bufcap, st->fp);
    if (n < 0) {
        if (ferror(st->fp))
            s_load_fail(st, ML_ECONFIG, "read error: %s", strerror(errno));
        return NULL;
    }
    st->line++;
    if (n > num - 1) {
        s_load_fail(st, ML_ECONFIG, "line longer than %d characters", num - 2);
        return NULL;
    }
    memcpy(str, st->buf, (size_t)n + 1);

    char *p = st->buf;
    if (st->line == 1 && (unsigned char)p[0] == 0xef && (unsigned char)p[1] == 0xbb &&
        (unsigned char)p[2] == 0xbf)
        p += 3;
    int indented = isspace((unsigned char)p[0]) && p[0] != '\n' && p[0] != '\r';
    char *q = s_trim(p);
    st->continuation = 0;
    if (*q == '\0' || *q == ';' || *q == '#')
        return str;
    if (indented && st->key_in_section) {
        st->continuation = 1;
        return str;
    }
    if (*q == '[') {
        char *end = strchr(q + 1, ']');
        /* Without ']' inih reports the line as an error itself. */
        if (end) {
            *end = '\0';
            if (s_add_section(st, s_trim(q + 1)) < 0)
                return NULL;
            st->key_in_section = 0;
        }
        return str;
    }
    st->key_in_section = 1;
    return str;
}

/* Called by inih once per key line, and again per continuation line. The
 * section argument is ignored in favour of the reader's untruncated copy.
 * Returns 1 to go on, 0 to make inih report this line. */
static int s_handler(void *user, const char *section, const char *name, const char *value)
{
    struct s_load *st = user;
    ml_ini_t *ini = st->ini;
    (void)section;
    if (!name || !*name) {
        s_load_fail(st, ML_ECONFIG, "missing key name before '='");
        return 0;
    }
    if (!value)
        value = "";
    if (st->continuation && ini->n_entries > 0) {
        /* Python configparser style: an indented line extends the previous
         * value, joined with a newline. */
        struct s_entry *e = &ini->entries[ini->n_entries - 1];
        size_t a = strlen(e->value), b = strlen(value);
        char *v = realloc(e->value, a + b + 2);
        if (!v)
            goto nomem;
        if (a > 0)
            v[a++] = '\n';
        memcpy(v + a, value, b + 1);
        e->value = v;
        return 1;
    }
    if (ini->n_entries == ini->cap_entries) {
        size_t cap = ini->cap_entries ? ini->cap_entries * 2 : 32;
        struct s_entry *e = realloc(ini->entries, cap * sizeof *e);
        if (!e)
            goto nomem;
        ini->entries = e;
        ini->cap_entries = cap;
    }
    struct s_entry *e = &ini->entries[ini->n_entries];
    e->section = st->section;
    e->line = st->line;
    e->key = strdup(name);
    e->value = strdup(value);
    if (!e->key || !e->value) {
        free(e->key);
        free(e->value);
        goto nomem;
    }
    /* inih has already trimmed both; trimming again costs nothing and
     * keeps this file correct whatever inih build it meets. */
    char *k = s_trim(e->key), *v = s_trim(e->value);
    memmove(e->key, k, strlen(k) + 1);
    memmove(e->value, v, strlen(v) + 1);
    ini->n_entries++;
    return 1;
nomem:
    s_load_fail(st, ML_ENOMEM, "out of memory");
    return 0;
}

/* The folder holding path, made absolute so that paths resolved against it
 * stay right after the daemon changes directory. */
static char *s_dir_of(const char *path)
{
    char *copy = strdup(path);
    if (!copy)
        return NULL;
    char *dir = dirname(copy);
    char abs[PATH_MAX];
    char *out = realpath(dir, abs) ? strdup(abs) : strdup(dir);
    free(copy);
    return out;
}

int ml_ini_load(const char *path, ml_ini_t **out, char *err, size_t errlen)
{
    struct s_load st = {0};
    int rc = 0;
    if (!path || !out) {
        ml_seterr(err, errlen, "no configuration file given");
        return ML_ECONFIG;
    }
    st.section = "";
    st.fp = fopen(path, "r");
    if (!st.fp) {
        ml_seterr(err, errlen, "cannot open %s: %s", path, strerror(errno));
        return ML_ECONFIG;
    }
    st.ini = calloc(1, sizeof *st.ini);
    if (!st.ini || !(st.ini->path = strdup(path)) || !(st.ini->dir = s_dir_of(path))) {
        ml_seterr(err, errlen, "%s: out of memory", path);
        rc = ML_ENOMEM;
        goto out;
    }
    int bad_line = ini_parse_stream(s_reader, &st, s_handler, &st);
    if (st.rc) {
        ml_seterr(err, errlen, "%s:%d: %s", path, st.line, st.msg);
        rc = st.rc == ML_ENOMEM ? ML_ENOMEM : ML_ECONFIG;
        goto out;
    }
    if (bad_line == -2) {
        ml_seterr(err, errlen, "%s: out of memory", path);
        rc = ML_ENOMEM;
        goto out;
    }
    if (bad_line != 0) {
        ml_seterr(err, errlen,
                  "%s:%d: cannot parse this line (expected [section], key = value or a comment)",
                  path, bad_line);
        rc = ML_ECONFIG;
        goto out;
    }
    *out = st.ini;
    st.ini = NULL;
out:
    ml_ini_destroy(&st.ini);
    free(st.buf);
    fclose(st.fp);
    return rc;
}

void ml_ini_destroy(ml_ini_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    ml_ini_t *ini = *self_p;
    for (size_t i = 0; i < ini->n_entries; i++) {
        free(ini->entries[i].key);
        free(ini->entries[i].value);
    }
    for (size_t i = 0; i < ini->n_sections; i++)
        free(ini->sections[i].name);
    free(ini->entries);
    free(ini->sections);
    free(ini->path);
    free(ini->dir);
    free(ini);
    *self_p = NULL;
}

/* The last entry for section/key (a later line overrides an earlier one),
 * or NULL. O(entries). */
static const struct s_entry *s_find(const ml_ini_t *ini, const char *section, const char *key)
{
    for (size_t i = ini->n_entries; i-- > 0;) {
        const struct s_entry *e = &ini->entries[i];
        if (strcmp(e->section, section) == 0 && strcmp(e->key, key) == 0)
            return e;
    }
    return NULL;
}

const char *ml_ini_get(const ml_ini_t *ini, const char *section, const char *key, const char *def)
{
    const struct s_entry *e = s_find(ini, section, key);
    return e ? e->value : def;
}

int ml_ini_get_long(const ml_ini_t *ini, const char *section, const char *key, long def, long min,
                    long max, long *out, char *err, size_t errlen)
{
    const struct s_entry *e = s_find(ini, section, key);
    /* An empty value means "not set", as for optional string keys. */
    if (!e || !*e->value) {
        *out = def;
        return 0;
    }
    char *end;
    errno = 0;
    long v = strtol(e->value, &end, 10);
    if (end == e->value || *end || isspace((unsigned char)e->value[0])) {
        ml_seterr(err, errlen, "%s:%d: [%s] %s = \"%s\" is not a whole number", ini->path, e->line,
                  section, key, e->value);
        return ML_ECONFIG;
    }
    if (errno == ERANGE || v < min || v > max) {
        ml_seterr(err, errlen, "%s:%d: [%s] %s = %s is out of range (%ld to %ld)", ini->path,
                  e->line, section, key, e->value, min, max);
        return ML_ECONFIG;
    }
    *out = v;
    return 0;
}

int ml_ini_sections(const ml_ini_t *ini, const char *prefix,
                    int (*cb)(const ml_ini_t *ini, const char *section, const char *name,
                              void *arg),
                    void *arg)
{
    size_t plen = strlen(prefix);
    for (size_t i = 0; i < ini->n_sections; i++) {
        const char *s = ini->sections[i].name;
        if (strncmp(s, prefix, plen) != 0 || !isspace((unsigned char)s[plen]))
            continue;
        const char *name = s + plen;
        while (isspace((unsigned char)*name))
            name++;
        int rc = cb(ini, s, name, arg);
        if (rc)
            return rc;
    }
    return 0;
}

int ml_ini_keys(const ml_ini_t *ini, const char *section,
                int (*cb)(const char *key, const char *value, void *arg), void *arg)
{
    for (size_t i = 0; i < ini->n_entries; i++) {
        const struct s_entry *e = &ini->entries[i];
        if (strcmp(e->section, section) != 0)
            continue;
        int rc = cb(e->key, e->value, arg);
        if (rc)
            return rc;
    }
    return 0;
}

const char *ml_ini_dir(const ml_ini_t *ini)
{
    return ini->dir;
}

const char *ml_ini_path(const ml_ini_t *ini)
{
    return ini->path;
}

int ml_ini_line(const ml_ini_t *ini, const char *section, const char *key)
{
    const struct s_entry *e = s_find(ini, section, key);
    return e ? e->line : 0;
}

/* 1 if the section pattern of a schema row ("broker", or "node *" for
 * every "node NAME") covers section. */
static int s_pattern_matches(const char *pattern, const char *section)
{
    size_t n = strlen(pattern);
    if (n >= 2 && pattern[n - 1] == '*' && pattern[n - 2] == ' ') {
        /* "node *": the prefix, white space, then a non-empty name, as
         * ml_ini_sections() walks them. */
        size_t plen = n - 2;
        if (strncmp(section, pattern, plen) != 0 || !isspace((unsigned char)section[plen]))
            return 0;
        const char *name = section + plen;
        while (isspace((unsigned char)*name))
            name++;
        return *name != '\0';
    }
    return strcmp(pattern, section) == 0;
}

/* 1 if some row covers section (and, when key is not NULL, that key). */
static int s_schema_knows(const ml_ini_key_t *schema, const char *section, const char *key)
{
    for (const ml_ini_key_t *r = schema; r->section; r++) {
        if (!s_pattern_matches(r->section, section))
            continue;
        if (!key || strcmp(r->key, "*") == 0 || strcmp(r->key, key) == 0)
            return 1;
    }
    return 0;
}

/* Writes the distinct sections of schema as "[broker], [node NAME]". */
static void s_schema_sections(const ml_ini_key_t *schema, char *out, size_t len)
{
    size_t used = 0;
    out[0] = '\0';
    for (const ml_ini_key_t *r = schema; r->section; r++) {
        int seen = 0;
        for (const ml_ini_key_t *q = schema; q < r; q++)
            seen |= strcmp(q->section, r->section) == 0;
        if (seen)
            continue;
        size_t n = strlen(r->section);
        int star = n >= 2 && r->section[n - 1] == '*';
        int w = snprintf(out + used, len - used, "%s[%.*s%s]", used ? ", " : "",
                         (int)(star ? n - 1 : n), r->section, star ? "NAME" : "");
        if (w < 0 || (size_t)w >= len - used)
            return;
        used += (size_t)w;
    }
}

/* Appends one problem line to err; counts the lines that did not fit. */
struct s_report {
    char *err;
    size_t errlen, used;
    int n, left_out;
};

static void s_report(struct s_report *r, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void s_report(struct s_report *r, const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    r->n++;
    /* Keep room for the "and N more" line. */
    size_t need = strlen(line) + (r->used ? 1 : 0);
    if (r->left_out || !r->err || r->used + need + 48 >= r->errlen) {
        r->left_out++;
        return;
    }
    snprintf(r->err + r->used, r->errlen - r->used, "%s%s", r->used ? "\n" : "", line);
    r->used += need;
}

int ml_ini_check(const ml_ini_t *ini, const ml_ini_key_t *schema, char *err, size_t errlen)
{
    struct s_report r = {.err = err, .errlen = errlen};
    char expected[256];
    s_schema_sections(schema, expected, sizeof expected);
    if (err && errlen)
        err[0] = '\0';
    /* Headers and keys in file order: sections[] and entries[] are each in
     * file order, so merge them by line. */
    size_t si = 0, ei = 0;
    while (si < ini->n_sections || ei < ini->n_entries) {
        int take_section =
            si < ini->n_sections &&
            (ei >= ini->n_entries || ini->sections[si].line <= ini->entries[ei].line);
        if (take_section) {
            const struct s_section *s = &ini->sections[si++];
            if (!s_schema_knows(schema, s->name, NULL))
                s_report(&r, "%s:%d: [%s]: unknown section (expected %s)", ini->path, s->line,
                         s->name, expected);
            continue;
        }
        const struct s_entry *e = &ini->entries[ei++];
        if (!*e->section) {
            if (!s_schema_knows(schema, "", e->key))
                s_report(&r, "%s:%d: %s: key outside any section (expected %s first)", ini->path,
                         e->line, e->key, expected);
        } else if (s_schema_knows(schema, e->section, NULL) &&
                   !s_schema_knows(schema, e->section, e->key)) {
            /* Keys of an unknown section are not reported again. */
            s_report(&r, "%s:%d: [%s] %s: unknown key", ini->path, e->line, e->section, e->key);
        }
    }
    if (r.left_out && err && errlen)
        snprintf(err + r.used, errlen - r.used, "%s(and %d more)", r.used ? "\n" : "", r.left_out);
    return r.n ? ML_ECONFIG : 0;
}
