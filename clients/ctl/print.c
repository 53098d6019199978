/* medlinkctl's output (see print.h). Tables size their columns to what
 * they hold, measured in terminal columns (a Chinese character takes two);
 * times are RFC 3339 UTC with the age next to them, as in `status`, or
 * local time with its offset under --local-time or TZ. JSON output goes
 * through ml_json_encode so that it is the proto3 JSON of the wire
 * messages, the same mapping as the spool files. */
#include "print.h"

#include <langinfo.h>
#include <locale.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <wchar.h>

#include <jansson.h>

#include "build.h"
#include "ml_adminjson.h"
#include "ml_common.h"
#include "ml_json.h"
#include "ml_nack.h"
#include "ml_text.h"

/* ---- small helpers ---- */

/* Human times in local time (--local-time, or TZ set): ctl_print_init. */
static int s_local;

void ctl_print_init(const ctl_opts_t *o)
{
    /* Display widths come from the C library's tables for the user's
     * LC_CTYPE. medlink's text is UTF-8 by protocol, so a locale with
     * another code set (the "C" of a bare service environment) would only
     * make every Chinese name one column per byte: C.UTF-8 (built into
     * glibc since 2.35) is used instead. LC_CTYPE only: messages, numbers
     * and times stay as they are. */
    const char *cs = setlocale(LC_CTYPE, "") ? nl_langinfo(CODESET) : NULL;
    if (!cs || strcasecmp(cs, "UTF-8") != 0)
        setlocale(LC_CTYPE, "C.UTF-8");
    const char *tz = getenv("TZ");
    s_local = o->local_time || (tz && *tz);
    if (s_local)
        tzset();
}

int ctl_text_width(const char *s)
{
    mbstate_t st;
    memset(&st, 0, sizeof st);
    size_t len = strlen(s), i = 0;
    int w = 0;
    while (i < len) {
        wchar_t wc;
        size_t n = mbrtowc(&wc, s + i, len - i, &st);
        if (n == (size_t)-1 || n == (size_t)-2 || n == 0) {
            /* Not UTF-8 here (s_e has escaped such bytes already, so only
             * a caller's own text can get here): one column per byte. */
            memset(&st, 0, sizeof st);
            w++;
            i++;
            continue;
        }
        int cw = wcwidth(wc);
        w += cw < 0 ? 1 : cw;
        i += n;
    }
    return w;
}

size_t ctl_text_fit(const char *s, int cols)
{
    mbstate_t st;
    memset(&st, 0, sizeof st);
    size_t len = strlen(s), i = 0;
    int w = 0;
    while (i < len) {
        wchar_t wc;
        size_t n = mbrtowc(&wc, s + i, len - i, &st);
        int cw = 1;
        if (n == (size_t)-1 || n == (size_t)-2 || n == 0) {
            memset(&st, 0, sizeof st);
            n = 1;
        } else {
            cw = wcwidth(wc);
            cw = cw < 0 ? 1 : cw;
        }
        if (w + cw > cols)
            break;
        w += cw;
        i += n;
    }
    return i;
}

/* s, then spaces up to width columns. */
static void s_pad(FILE *f, const char *s, int width)
{
    fputs(s, f);
    for (int k = ctl_text_width(s); k < width; k++)
        fputc(' ', f);
}

/* at (Unix ms) for people: RFC 3339 UTC ("2026-11-25T08:00:00.000Z"), or
 * local time with its offset ("2026-12-07 23:50:01 +08:00"). */
static char *s_time(int64_t at, char *buf, size_t len)
{
    if (!s_local)
        return ml_time_format(at, buf, len);
    time_t t = (time_t)(at / 1000);
    struct tm tm;
    if (!localtime_r(&t, &tm))
        return ml_time_format(at, buf, len);
    char day[32];
    strftime(day, sizeof day, "%Y-%m-%d %H:%M:%S", &tm);
    long off = tm.tm_gmtoff / 60;
    snprintf(buf, len, "%s %c%02ld:%02ld", day, off < 0 ? '-' : '+', labs(off) / 60,
             labs(off) % 60);
    return buf;
}

static char *s_dur(int64_t ms, char *buf, size_t len)
{
    int64_t s = ms / 1000;
    if (ms < 0)
        snprintf(buf, len, "-");
    else if (s < 60)
        snprintf(buf, len, "%llds", (long long)s);
    else if (s < 3600)
        snprintf(buf, len, "%lldm%02llds", (long long)(s / 60), (long long)(s % 60));
    else if (s < 86400)
        snprintf(buf, len, "%lldh%02lldm", (long long)(s / 3600), (long long)(s % 3600 / 60));
    else
        snprintf(buf, len, "%lldd%02lldh", (long long)(s / 86400), (long long)(s % 86400 / 3600));
    return buf;
}

/* "2026-11-25T08:00:00.000Z (3h12m ago)", or "-" for 0. */
static char *s_when(int64_t at, int64_t now, char *buf, size_t len)
{
    char t[40], d[32];
    if (at == 0)
        snprintf(buf, len, "-");
    else if (at <= now)
        snprintf(buf, len, "%s (%s ago)", s_time(at, t, sizeof t), s_dur(now - at, d, sizeof d));
    else
        snprintf(buf, len, "%s (in %s)", s_time(at, t, sizeof t), s_dur(at - now, d, sizeof d));
    return buf;
}

static char *s_size(uint64_t n, char *buf, size_t len)
{
    if (n < 1024)
        snprintf(buf, len, "%llu B", (unsigned long long)n);
    else if (n < 1024 * 1024)
        snprintf(buf, len, "%.1f KiB", (double)n / 1024);
    else if (n < 1024ull * 1024 * 1024)
        snprintf(buf, len, "%.1f MiB", (double)n / (1024 * 1024));
    else
        snprintf(buf, len, "%.2f GiB", (double)n / (1024.0 * 1024 * 1024));
    return buf;
}

/* s made safe for a terminal: every string a peer supplied goes through
 * this before it is printed, so that a control character, an ANSI escape
 * or a newline in a case id, a detail or a reason cannot forge a line or
 * drive the operator's terminal (F10). The result lives until 16 more
 * calls. */
static const char *s_e(const char *s)
{
    static char *slot[16];
    static unsigned next;
    if (!s)
        return "";
    if (!ml_text_needs_escape(s, strlen(s)))
        return s;
    size_t cap = strlen(s) * 4 + 1;
    char *out = malloc(cap);
    if (!out)
        ctl_oom();
    ml_text_escape(s, strlen(s), out, cap);
    unsigned k = next++ % 16;
    free(slot[k]);
    slot[k] = out;
    return out;
}

static const char *s_or(const char *s, const char *dflt)
{
    return s && *s ? s_e(s) : dflt;
}

/* msg as a jansson value (for JSON output made of several messages), or
 * NULL after saying why. */
static json_t *s_json_of(const ProtobufCMessage *msg)
{
    char *text = NULL, err[256];
    if (ml_json_encode(msg, ML_JSON_EMIT_DEFAULTS | ML_JSON_REPLACE_INVALID, &text, err,
                       sizeof err) < 0) {
        ctl_fail(CTL_EXIT_FAIL, "cannot render JSON: %s", err);
        return NULL;
    }
    json_error_t jerr;
    json_t *j = json_loads(text, 0, &jerr);
    free(text);
    return j;
}

/* What medlinkd's /api/v1 serves for the same reply (ml_adminjson.h). */
static int s_print_admin_json(const Medlink__V1__AdminReply *rep, int what)
{
    char *json = NULL, err[256];
    if (ml_admin_json(rep, what, &json, err, sizeof err) < 0)
        return ctl_fail(CTL_EXIT_FAIL, "cannot render JSON: %s", err);
    printf("%s\n", json);
    free(json);
    return CTL_EXIT_OK;
}

/* Prints j (stolen) indented. */
static int s_print_json(json_t *j)
{
    char *s = j ? json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
    json_decref(j);
    if (!s)
        return ctl_fail(CTL_EXIT_FAIL, "cannot render JSON");
    printf("%s\n", s);
    free(s);
    return CTL_EXIT_OK;
}

/* ---- tables: columns as wide as their widest cell ---- */

#define S_MAX_COLS 12

/* Widths are display columns (ctl_text_width), so that a row with a
 * Chinese name lines up with the rows around it; right: bit i set for a
 * column of numbers, aligned right. */
typedef struct {
    int cols;
    unsigned right;
    size_t rows, cap;
    char **cells; /* rows x cols, malloc'd */
    int width[S_MAX_COLS];
} s_table_t;

static void s_table_row(s_table_t *t, ...)
{
    va_list ap;
    if (t->rows == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 16;
        char **c = realloc(t->cells, cap * (size_t)t->cols * sizeof *c);
        if (!c)
            ctl_oom();
        t->cells = c;
        t->cap = cap;
    }
    va_start(ap, t);
    for (int i = 0; i < t->cols; i++) {
        const char *v = va_arg(ap, const char *);
        char *s = strdup(s_e(v));
        if (!s)
            ctl_oom();
        t->cells[t->rows * (size_t)t->cols + (size_t)i] = s;
        int w = ctl_text_width(s);
        if (w > t->width[i])
            t->width[i] = w;
    }
    va_end(ap);
    t->rows++;
}

/* Prints the table to f and frees it; the last column is not padded.
 * max_rows > 0: at most that many lines, the last of them "... N more"
 * when rows were left out (the first row, the header, is always there). */
static void s_table_write(s_table_t *t, FILE *f, const char *indent, size_t max_rows)
{
    size_t shown = t->rows;
    if (max_rows > 0 && t->rows > max_rows)
        shown = max_rows > 1 ? max_rows - 1 : 1;
    for (size_t r = 0; r < t->rows; r++) {
        for (int i = 0; r < shown && i < t->cols; i++) {
            const char *s = t->cells[r * (size_t)t->cols + (size_t)i];
            if (i == 0)
                fputs(indent, f);
            if (t->right & (1u << i)) {
                for (int k = ctl_text_width(s); k < t->width[i]; k++)
                    fputc(' ', f);
                fputs(s, f);
                fputs(i == t->cols - 1 ? "\n" : "  ", f);
            } else if (i == t->cols - 1) {
                fprintf(f, "%s\n", s);
            } else {
                s_pad(f, s, t->width[i] + 2);
            }
        }
        for (int i = 0; i < t->cols; i++)
            free(t->cells[r * (size_t)t->cols + (size_t)i]);
    }
    if (shown < t->rows)
        fprintf(f, "%s... %zu more\n", indent, t->rows - shown);
    free(t->cells);
    memset(t, 0, sizeof *t);
}

static void s_table_print(s_table_t *t, const char *indent)
{
    s_table_write(t, stdout, indent, 0);
}

/* ---- status ---- */

static const char *s_plural(uint64_t n, const char *one, const char *many)
{
    return n == 1 ? one : many;
}

/* "now", "never" or "3m12s ago". */
static char *s_seen(const Medlink__V1__NodeStatus *n, int64_t now, char *buf, size_t len)
{
    char d[32];
    if (n->online)
        snprintf(buf, len, "now");
    else if (n->last_seen == 0)
        snprintf(buf, len, "never");
    else
        snprintf(buf, len, "%s ago", s_dur(now - n->last_seen, d, sizeof d));
    return buf;
}

/* Every WARNING of a status, one line each, on f: what is about to expire
 * (the clock: a CRL past its next update refuses every node), then the ops
 * alerts in progress. An "expiry" alert is raised from the same list with
 * the same crl_warn_days, so it is left out when its subject already has a
 * line of its own. Returns the number of lines. */
static int s_warnings(FILE *f, const Medlink__V1__BrokerStatus *st)
{
    char b[40];
    int lines = 0;
    for (size_t i = 0; i < st->n_expiry; i++) {
        const Medlink__V1__Expiry *e = st->expiry[i];
        if (!e->warning && !e->expired)
            continue;
        s_time(e->not_after, b, sizeof b);
        if (e->expired)
            fprintf(f, "WARNING: %s EXPIRED on %s: handshakes it affects are refused\n",
                    s_or(e->what, "?"), b);
        else if (e->days_left < 1)
            fprintf(f, "WARNING: %s expires in less than a day, on %s\n", s_or(e->what, "?"), b);
        else
            fprintf(f, "WARNING: %s expires in %lld day(s), on %s\n", s_or(e->what, "?"),
                    (long long)e->days_left, b);
        lines++;
    }
    for (size_t i = 0; i < st->n_alert; i++) {
        const Medlink__V1__Alert *al = st->alert[i];
        int dup = 0;
        for (size_t k = 0; al->kind && strcmp(al->kind, "expiry") == 0 && al->subject &&
                           *al->subject && k < st->n_expiry;
             k++) {
            const Medlink__V1__Expiry *e = st->expiry[k];
            if ((e->warning || e->expired) && e->what && strstr(e->what, al->subject))
                dup = 1;
        }
        if (dup)
            continue;
        fprintf(f, "WARNING: %s %s: %s", s_or(al->kind, "alert"), s_or(al->subject, "-"),
                s_or(al->detail, "(no detail)"));
        if (al->since)
            fprintf(f, " (since %s)", s_time(al->since, b, sizeof b));
        fputc('\n', f);
        lines++;
    }
    return lines;
}

static int s_status(const ctl_opts_t *o, const Medlink__V1__AdminReply *rep)
{
    const Medlink__V1__BrokerStatus *st = rep->broker_status;
    if (!st)
        return ctl_fail(CTL_EXIT_FAIL, "the broker's reply has no status");
    if (o->json)
        return s_print_admin_json(rep, ML_ADMIN_JSON_STATUS);
    char a[32], b[40], c[32];
    int64_t now = st->now ? st->now : ml_now_ms();
    printf("broker    %s\n", s_e(st->broker));
    printf("uptime    %s (since %s)\n", s_dur(now - st->started_at, a, sizeof a),
           s_time(st->started_at, b, sizeof b));
    printf("sessions  %llu\n", (unsigned long long)st->sessions);
    printf("messages  accepted %llu, delivered %llu, refused %llu\n",
           (unsigned long long)st->accepted_total, (unsigned long long)st->delivered_total,
           (unsigned long long)st->refused_total);
    printf("cases     open %llu, overdue %llu (in memory %llu)\n",
           (unsigned long long)st->open_cases, (unsigned long long)st->overdue_cases,
           (unsigned long long)st->cases_in_memory);
    printf("dlq       %llu dead %s\n", (unsigned long long)st->dead_letters,
           s_plural(st->dead_letters, "letter", "letters"));
    s_warnings(stdout, st);
    printf("\n");
    s_table_t t = {.cols = 7, .right = 1u << 4 | 1u << 5 | 1u << 6};
    s_table_row(&t, "NODE", "ROLE", "STATE", "LAST SEEN", "QUEUE", "OLDEST", "IN FLIGHT");
    for (size_t i = 0; i < st->n_node; i++) {
        const Medlink__V1__NodeStatus *n = st->node[i];
        char seen[40], q[24], fl[24];
        snprintf(q, sizeof q, "%llu", (unsigned long long)n->queue_depth);
        snprintf(fl, sizeof fl, "%llu", (unsigned long long)n->in_flight);
        s_table_row(&t, n->node_id, s_or(n->role, "-"), n->online ? "online" : "offline",
                    s_seen(n, now, seen, sizeof seen), q,
                    n->oldest_queued_at ? s_dur(now - n->oldest_queued_at, c, sizeof c) : "-", fl);
    }
    s_table_print(&t, "");
    return CTL_EXIT_OK;
}

/* ---- nodes ---- */

static int s_nodes(const ctl_opts_t *o, const Medlink__V1__AdminReply *rep)
{
    const Medlink__V1__BrokerStatus *st = rep->broker_status;
    if (!st)
        return ctl_fail(CTL_EXIT_FAIL, "the broker's reply has no status");
    if (o->json)
        return s_print_admin_json(rep, ML_ADMIN_JSON_NODES);
    if (st->n_node == 0) {
        printf("no nodes\n");
        return CTL_EXIT_OK;
    }
    int64_t now = st->now ? st->now : ml_now_ms();
    size_t online = 0;
    s_table_t t = {.cols = 10, .right = 1u << 5 | 1u << 6 | 1u << 7 | 1u << 8 | 1u << 9};
    s_table_row(&t, "NODE", "NAME", "ROLE", "STATE", "LAST SEEN", "BACKLOG", "OLDEST QUEUED",
                "IN FLIGHT", "DELIVERED", "OPEN CASES");
    for (size_t i = 0; i < st->n_node; i++) {
        const Medlink__V1__NodeStatus *n = st->node[i];
        char seen[80], q[24], fl[24], dv[24], cs[48], c[32];
        online += n->online != 0;
        if (n->online || n->last_seen == 0)
            s_seen(n, now, seen, sizeof seen);
        else
            s_when(n->last_seen, now, seen, sizeof seen);
        snprintf(q, sizeof q, "%llu", (unsigned long long)n->queue_depth);
        snprintf(fl, sizeof fl, "%llu", (unsigned long long)n->in_flight);
        snprintf(dv, sizeof dv, "%llu", (unsigned long long)n->delivered);
        if (n->open_cases_limit)
            snprintf(cs, sizeof cs, "%llu/%llu", (unsigned long long)n->open_cases_opened,
                     (unsigned long long)n->open_cases_limit);
        else
            snprintf(cs, sizeof cs, "%llu/-", (unsigned long long)n->open_cases_opened);
        s_table_row(&t, n->node_id, s_or(n->display_name, "-"), s_or(n->role, "-"),
                    n->online ? "online" : "offline", seen, q,
                    n->oldest_queued_at ? s_dur(now - n->oldest_queued_at, c, sizeof c) : "-", fl,
                    dv, cs);
    }
    s_table_print(&t, "");
    printf("(%zu %s, %zu online)\n", st->n_node, s_plural(st->n_node, "node", "nodes"), online);
    return CTL_EXIT_OK;
}

/* ---- top ---- */

/* The previous snapshot's node named id, or NULL. O(nodes). */
static const Medlink__V1__NodeStatus *s_node_of(const Medlink__V1__BrokerStatus *st, const char *id)
{
    for (size_t i = 0; st && id && i < st->n_node; i++)
        if (st->node[i]->node_id && strcmp(st->node[i]->node_id, id) == 0)
            return st->node[i];
    return NULL;
}

/* (cur - prev) per second as "12.5", or "-" without a previous value (or
 * after a counter went back: the broker restarted). */
static char *s_rate(uint64_t cur, uint64_t prev, int have_prev, double secs, char *buf, size_t len)
{
    if (!have_prev || secs <= 0 || cur < prev)
        snprintf(buf, len, "-");
    else
        snprintf(buf, len, "%.1f", (double)(cur - prev) / secs);
    return buf;
}

int ctl_print_top(FILE *f, const Medlink__V1__BrokerStatus *st,
                  const Medlink__V1__BrokerStatus *prev, int64_t elapsed_ms, int max_lines)
{
    char a[32], b[40], r1[24], r2[24], r3[24];
    int64_t now = st->now ? st->now : ml_now_ms();
    double secs = (double)elapsed_ms / 1000.0;
    int hp = prev != NULL && prev->started_at == st->started_at;
    int lines = 0;
    size_t online = 0;
    for (size_t i = 0; i < st->n_node; i++)
        online += st->node[i]->online != 0;
    fprintf(f, "broker %s  up %s  sessions %llu  nodes %zu/%zu online  %s\n", s_e(st->broker),
            s_dur(now - st->started_at, a, sizeof a), (unsigned long long)st->sessions, online,
            st->n_node, s_time(now, b, sizeof b));
    fprintf(f, "per second: accepted %s  delivered %s  refused %s\n",
            s_rate(st->accepted_total, hp ? prev->accepted_total : 0, hp, secs, r1, sizeof r1),
            s_rate(st->delivered_total, hp ? prev->delivered_total : 0, hp, secs, r2, sizeof r2),
            s_rate(st->refused_total, hp ? prev->refused_total : 0, hp, secs, r3, sizeof r3));
    fprintf(f, "cases: open %llu  overdue %llu   dead letters %llu\n",
            (unsigned long long)st->open_cases, (unsigned long long)st->overdue_cases,
            (unsigned long long)st->dead_letters);
    lines = 3;
    size_t n_warn = 0;
    for (size_t i = 0; i < st->n_expiry; i++)
        n_warn += st->expiry[i]->warning || st->expiry[i]->expired;
    n_warn += st->n_alert;
    if (n_warn) {
        fprintf(f, "WARNING: %zu warning%s (medlinkctl status lists them)\n", n_warn,
                n_warn == 1 ? "" : "s");
        lines++;
    }
    fputc('\n', f);
    lines++;
    s_table_t t = {.cols = 6, .right = 1u << 2 | 1u << 3 | 1u << 4 | 1u << 5};
    s_table_row(&t, "NODE", "STATE", "BACKLOG", "OLDEST QUEUED", "IN FLIGHT", "DELIVERED/S");
    for (size_t i = 0; i < st->n_node; i++) {
        const Medlink__V1__NodeStatus *n = st->node[i];
        const Medlink__V1__NodeStatus *p = hp ? s_node_of(prev, n->node_id) : NULL;
        char q[24], fl[24], dv[24], c[32];
        snprintf(q, sizeof q, "%llu", (unsigned long long)n->queue_depth);
        snprintf(fl, sizeof fl, "%llu", (unsigned long long)n->in_flight);
        s_table_row(&t, n->node_id, n->online ? "online" : "offline", q,
                    n->oldest_queued_at ? s_dur(now - n->oldest_queued_at, c, sizeof c) : "-", fl,
                    s_rate(n->delivered, p ? p->delivered : 0, p != NULL, secs, dv, sizeof dv));
    }
    size_t room = 0;
    if (max_lines > 0)
        room = max_lines - lines > 2 ? (size_t)(max_lines - lines) : 2;
    size_t rows = t.rows;
    s_table_write(&t, f, "", room);
    return lines + (int)(room && rows > room ? room : rows);
}

/* ---- cases ---- */

/* "OVERDUE 45m", "in 3h05m", "-" */
static char *s_deadline_short(const Medlink__V1__CaseInfo *c, int64_t now, char *buf, size_t len)
{
    char d[32];
    if (c->deadline_at == 0)
        snprintf(buf, len, "-");
    else if (c->overdue || c->deadline_at <= now)
        snprintf(buf, len, "OVERDUE %s", s_dur(now - c->deadline_at, d, sizeof d));
    else
        snprintf(buf, len, "in %s", s_dur(c->deadline_at - now, d, sizeof d));
    return buf;
}

static void s_transition(const char *from, const char *to, char *buf, size_t len)
{
    if (!*s_or(from, "") && !*s_or(to, ""))
        snprintf(buf, len, "-");
    else if (!*s_or(from, ""))
        snprintf(buf, len, "-> %s", to);
    else if (strcmp(from, s_or(to, "")) == 0)
        snprintf(buf, len, "%s", from); /* no change (a delivery, a replay...) */
    else
        snprintf(buf, len, "%s -> %s", from, s_or(to, "?"));
}

static int s_case(const ctl_opts_t *o, const Medlink__V1__AdminReply *rep)
{
    const Medlink__V1__CaseInfo *c = rep->case_info;
    if (!c)
        return ctl_fail(CTL_EXIT_FAIL, "the broker's reply has no case");
    if (o->json)
        return s_print_admin_json(rep, ML_ADMIN_JSON_CASE);
    int64_t now = ml_now_ms();
    char a[80], b[80], d[32];
    printf("case         %s\n", s_e(c->case_id));
    printf("kind         %s\n", ctl_case_kind_name((int)c->kind));
    printf("state        %s (FHIR %s)%s\n", s_or(c->state, "?"), s_or(c->fhir_status, "-"),
           c->closed ? ", closed" : "");
    printf("opened by    %s\n", s_or(c->opened_by, "-"));
    printf("target       %s\n", s_or(c->target, "-"));
    if (*s_or(c->service, ""))
        printf("service      %s\n", s_e(c->service));
    printf("priority     %s\n", s_or(c->priority, "ROUTINE"));
    printf("opened       %s\n", s_when(c->opened_at, now, a, sizeof a));
    printf("updated      %s\n", s_when(c->updated_at, now, a, sizeof a));
    if (c->deadline_at == 0) {
        printf("deadline     none running\n");
    } else {
        int over = c->overdue || c->deadline_at <= now;
        printf("deadline     %s to reach %s: %s %s\n", s_time(c->deadline_at, a, sizeof a),
               s_or(c->deadline_state, "?"), over ? "OVERDUE by" : "due in",
               s_dur(over ? now - c->deadline_at : c->deadline_at - now, d, sizeof d));
    }
    printf("escalations  %u\n", c->escalations);
    if (*s_or(c->linked_case_id, ""))
        printf("linked case  %s\n", s_e(c->linked_case_id));
    if (c->kind == MEDLINK__V1__CASE_KIND__CASE_DOWN_TRANSFER)
        printf("follow-ups   %u\n", c->follow_ups);
    if (c->kind == MEDLINK__V1__CASE_KIND__CASE_IMAGING)
        printf("imaging      %u objects; %u of %u chunks stored (%s), %u duplicate chunks\n",
               c->objects, c->chunks, c->chunks_expected, s_size(c->chunk_bytes, b, sizeof b),
               c->duplicate_chunks);
    printf("\ntimeline (%zu)\n", c->n_timeline);
    if (c->n_timeline == 0)
        return CTL_EXIT_OK;
    s_table_t t = {.cols = 5};
    s_table_row(&t, "TIME", "NODE", "EVENT", "FROM -> TO", "DETAIL");
    for (size_t i = 0; i < c->n_timeline; i++) {
        const Medlink__V1__TimelineEntry *e = c->timeline[i];
        char tr[200];
        s_transition(e->from_state, e->to_state, tr, sizeof tr);
        s_table_row(&t, s_time(e->at, a, sizeof a), s_or(e->node, "-"), s_or(e->event, "-"), tr,
                    s_or(e->detail, ""));
    }
    s_table_print(&t, "  ");
    return CTL_EXIT_OK;
}

static int s_cases(const ctl_opts_t *o, const Medlink__V1__AdminReply *rep)
{
    if (o->json)
        return s_print_admin_json(rep, ML_ADMIN_JSON_CASES);
    if (rep->n_cases == 0) {
        printf("no cases\n");
        return CTL_EXIT_OK;
    }
    int64_t now = ml_now_ms();
    s_table_t t = {.cols = 8};
    s_table_row(&t, "CASE", "KIND", "STATE", "PRIORITY", "OPENED BY", "TARGET", "UPDATED",
                "DEADLINE");
    for (size_t i = 0; i < rep->n_cases; i++) {
        const Medlink__V1__CaseInfo *c = rep->cases[i];
        char up[40], dl[40], d[32];
        snprintf(up, sizeof up, "%s ago", s_dur(now - c->updated_at, d, sizeof d));
        s_table_row(&t, c->case_id, ctl_case_kind_name((int)c->kind), s_or(c->state, "?"),
                    s_or(c->priority, "ROUTINE"), s_or(c->opened_by, "-"),
                    s_or(c->target, s_or(c->service, "-")), c->updated_at ? up : "-",
                    s_deadline_short(c, now, dl, sizeof dl));
    }
    s_table_print(&t, "");
    printf("(%zu case%s)\n", rep->n_cases, rep->n_cases == 1 ? "" : "s");
    return CTL_EXIT_OK;
}

/* ---- dead letters ---- */

static int s_dlq_list(const ctl_opts_t *o, const Medlink__V1__AdminReply *rep)
{
    if (o->json)
        return s_print_admin_json(rep, ML_ADMIN_JSON_DLQ);
    if (rep->n_dead_letter == 0) {
        printf("no dead letters\n");
        return CTL_EXIT_OK;
    }
    int64_t now = ml_now_ms();
    s_table_t t = {.cols = 10};
    s_table_row(&t, "MESSAGE", "CASE", "KIND", "FROM", "TO", "PRIORITY", "TRIES", "SIZE", "DEAD",
                "REASON");
    for (size_t i = 0; i < rep->n_dead_letter; i++) {
        const Medlink__V1__DeadLetter *d = rep->dead_letter[i];
        char tries[16], size[32], dead[40], dur[32];
        snprintf(tries, sizeof tries, "%u", d->attempts);
        snprintf(dead, sizeof dead, "%s ago", s_dur(now - d->dead_at, dur, sizeof dur));
        s_table_row(&t, d->message_id, s_or(d->case_id, "-"), s_or(d->kind, "-"),
                    s_or(d->from, "-"), s_or(d->to, "-"), s_or(d->priority, "ROUTINE"), tries,
                    s_size(d->size, size, sizeof size), d->dead_at ? dead : "-",
                    s_or(d->reason, ""));
    }
    s_table_print(&t, "");
    printf("(%zu dead letter%s)\n", rep->n_dead_letter, rep->n_dead_letter == 1 ? "" : "s");
    return CTL_EXIT_OK;
}

static int s_dlq_show(const ctl_opts_t *o, const Medlink__V1__AdminReply *rep)
{
    if (rep->n_dead_letter == 0)
        return ctl_fail(CTL_EXIT_FAIL, "no dead letter %s", o->arg);
    const Medlink__V1__DeadLetter *d = rep->dead_letter[0];
    ml_envelope_t *env = NULL;
    int rc = CTL_EXIT_OK;
    if (d->envelope.len > 0 && ml_env_unpack(d->envelope.data, d->envelope.len, &env) < 0)
        rc = ctl_fail(CTL_EXIT_FAIL, "the stored envelope of %s (%zu bytes) does not decode",
                      d->message_id, d->envelope.len);
    /* The envelope is shown decoded, not as base64 of its bytes (kept only
     * when it does not decode). */
    Medlink__V1__DeadLetter shallow = *d;
    if (env) {
        shallow.envelope.len = 0;
        shallow.envelope.data = NULL;
    }
    if (o->json) {
        json_t *j = json_object();
        json_t *jd = s_json_of(&shallow.base);
        json_t *je = env ? s_json_of(&env->base) : json_null();
        /* Decoded below as "envelope"; not also an empty base64 string. */
        if (jd && env)
            json_object_del(jd, "envelope");
        if (!j || !jd || !je || json_object_set_new(j, "deadLetter", jd) < 0 ||
            json_object_set_new(j, "envelope", je) < 0) {
            json_decref(j);
            ml_env_free(&env);
            return ctl_fail(CTL_EXIT_FAIL, "cannot render the dead letter as JSON");
        }
        int prc = s_print_json(j);
        ml_env_free(&env);
        return prc != CTL_EXIT_OK ? prc : rc;
    }
    int64_t now = ml_now_ms();
    char a[80], s[32];
    printf("message      %s\n", s_e(d->message_id));
    printf("case         %s\n", s_or(d->case_id, "-"));
    printf("kind         %s\n", s_or(d->kind, "-"));
    printf("from         %s\n", s_or(d->from, "-"));
    printf("to           %s\n", s_or(d->to, "-"));
    printf("priority     %s\n", s_or(d->priority, "ROUTINE"));
    printf("accepted     %s\n", s_when(d->accepted_at, now, a, sizeof a));
    printf("dead         %s, after %u attempt%s\n", s_when(d->dead_at, now, a, sizeof a),
           d->attempts, d->attempts == 1 ? "" : "s");
    printf("size         %s (%llu bytes)\n", s_size(d->size, s, sizeof s),
           (unsigned long long)d->size);
    printf("reason       %s\n", s_or(d->reason, "-"));
    if (!env) {
        printf("envelope     %s\n", d->envelope.len ? "(does not decode)" : "(not stored)");
        return rc;
    }
    printf("\nenvelope\n");
    int prc = ctl_print_envelope(env);
    ml_env_free(&env);
    return prc != CTL_EXIT_OK ? prc : rc;
}

/* replay / purge. With --all the broker goes on past a dead letter it
 * cannot change and names the last such one in error: the count is
 * printed, and the exit code says not everything was done. */
static int s_affected(const ctl_opts_t *o, const Medlink__V1__AdminReply *rep)
{
    const char *verb = o->cmd == CTL_CMD_DLQ_REPLAY ? "replayed" : "purged";
    const char *err = s_or(rep->error, "");
    int rc = CTL_EXIT_OK;
    if (o->json) {
        json_t *j = json_pack("{s:I}", "affected", (json_int_t)rep->affected);
        if (j && *err)
            json_object_set_new(j, "error", json_string(err));
        rc = s_print_json(j);
    } else {
        printf("%s %u dead letter%s\n", verb, rep->affected, rep->affected == 1 ? "" : "s");
    }
    if (*err)
        return ctl_fail(CTL_EXIT_FAIL, "not every dead letter was %s: %s", verb, err);
    /* A named message that was not there is a failure a script must see;
     * --all over an empty queue is not. */
    if (o->arg && rep->affected == 0)
        return ctl_fail(CTL_EXIT_FAIL, "no dead letter %s", o->arg);
    return rc;
}

/* ---- store ---- */

static void s_prune_lines(const Medlink__V1__StorePrune *p)
{
    char sz[32], fr[32];
    printf("removed      %llu message%s, %llu bod%s (%llu imaging chunk%s, %s),\n"
           "             %llu final case%s with %llu timeline entr%s\n",
           (unsigned long long)p->messages, p->messages == 1 ? "" : "s",
           (unsigned long long)p->bodies, p->bodies == 1 ? "y" : "ies",
           (unsigned long long)p->chunk_bodies, p->chunk_bodies == 1 ? "" : "s",
           s_size(p->payload_bytes, sz, sizeof sz), (unsigned long long)p->cases,
           p->cases == 1 ? "" : "s", (unsigned long long)p->events, p->events == 1 ? "y" : "ies");
    printf("freed        %s (%llu page%s vacuumed), %llu free page%s left, in %lld ms\n",
           s_size(p->bytes_freed, fr, sizeof fr), (unsigned long long)p->pages_vacuumed,
           p->pages_vacuumed == 1 ? "" : "s", (unsigned long long)p->free_pages,
           p->free_pages == 1 ? "" : "s", (long long)p->took_ms);
}

static const char *s_retention(int64_t ms, char *buf, size_t len)
{
    if (ms < 0)
        return "kept for ever";
    if (ms % 86400000 == 0)
        snprintf(buf, len, "%lld day%s", (long long)(ms / 86400000), ms == 86400000 ? "" : "s");
    else
        snprintf(buf, len, "%lld s", (long long)(ms / 1000));
    return buf;
}

static int s_store_stats(const ctl_opts_t *o, const Medlink__V1__AdminReply *rep)
{
    const Medlink__V1__StoreStats *st = rep->store_stats;
    if (!st)
        return ctl_fail(CTL_EXIT_FAIL, "the broker's answer has no store stats");
    if (o->json)
        return s_print_json(s_json_of(&st->base));
    int64_t now = ml_now_ms();
    char a[32], b[32], c[32], d[80];
    printf("broker.db    %s (%llu pages of %llu bytes, %llu free: %s), WAL %s\n",
           s_size(st->file_bytes, a, sizeof a), (unsigned long long)st->page_count,
           (unsigned long long)st->page_size, (unsigned long long)st->free_pages,
           s_size(st->free_pages * st->page_size, b, sizeof b), s_size(st->wal_bytes, c, sizeof c));
    printf("auto_vacuum  %s\n", s_or(st->auto_vacuum, "?"));
    printf("retention    delivered messages %s after their case is final; timelines %s\n",
           s_retention(st->retention_ms, a, sizeof a),
           s_retention(st->timeline_retention_ms, b, sizeof b));
    printf("\n");
    s_table_t t = {.cols = 4};
    s_table_row(&t, "TABLE", "STATE", "ROWS", "OLDEST");
    for (size_t i = 0; i < st->n_table; i++) {
        const Medlink__V1__StoreTable *r = st->table[i];
        char rows[32];
        snprintf(rows, sizeof rows, "%llu", (unsigned long long)r->rows);
        s_table_row(&t, s_or(r->table, "?"), s_or(r->state, "-"), rows,
                    r->oldest_at ? s_when(r->oldest_at, now, d, sizeof d) : "-");
    }
    s_table_print(&t, "");
    const Medlink__V1__StorePrune *p = st->last_prune;
    printf("\n");
    if (!p || p->started_at == 0) {
        printf("last prune   none since the broker started\n");
        return CTL_EXIT_OK;
    }
    printf("last prune   %s\n", s_when(p->started_at, now, d, sizeof d));
    s_prune_lines(p);
    return CTL_EXIT_OK;
}

static int s_store_prune(const ctl_opts_t *o, const Medlink__V1__AdminReply *rep)
{
    const Medlink__V1__StorePrune *p = rep->store_prune;
    if (!p)
        return ctl_fail(CTL_EXIT_FAIL, "the broker's answer has no prune result");
    if (o->json)
        return s_print_json(s_json_of(&p->base));
    s_prune_lines(p);
    return CTL_EXIT_OK;
}

int ctl_print_admin(const ctl_opts_t *o, const Medlink__V1__AdminReply *rep)
{
    if (!rep)
        return ctl_fail(CTL_EXIT_FAIL, "the broker's answer is not an admin reply");
    if (rep->status != 0)
        return ctl_fail(CTL_EXIT_FAIL, "refused: %s", s_or(rep->error, "error"));
    switch (o->cmd) {
    case CTL_CMD_STATUS:
        return s_status(o, rep);
    case CTL_CMD_NODES:
        return s_nodes(o, rep);
    case CTL_CMD_CASE_SHOW:
        return s_case(o, rep);
    case CTL_CMD_CASES:
        return s_cases(o, rep);
    case CTL_CMD_DLQ_LIST:
        return s_dlq_list(o, rep);
    case CTL_CMD_DLQ_SHOW:
        return s_dlq_show(o, rep);
    case CTL_CMD_DLQ_REPLAY:
    case CTL_CMD_DLQ_PURGE:
        return s_affected(o, rep);
    case CTL_CMD_STORE_STATS:
        return s_store_stats(o, rep);
    case CTL_CMD_STORE_PRUNE:
        return s_store_prune(o, rep);
    default:
        return ctl_fail(CTL_EXIT_FAIL, "%s has no admin reply", o->cmd_name);
    }
}

/* ---- sends ---- */

int ctl_print_accepted(const ctl_opts_t *o, const ml_envelope_t *msg, const ctl_result_t *res)
{
    if (o->json)
        return s_print_json(json_pack("{s:s, s:s, s:s, s:s, s:s, s:b}", "result", "accepted",
                                      "messageId", msg->id, "caseId", msg->case_id, "kind",
                                      ml_kind_name((int)msg->kind), "to", msg->to, "duplicate",
                                      res->first_duplicate));
    printf("accepted: message %s, case %s%s\n", msg->id, msg->case_id,
           res->first_duplicate ? " (already accepted before)" : "");
    return CTL_EXIT_OK;
}

int ctl_print_imaging(const ctl_opts_t *o, const ml_envelope_t *consult, uint32_t objects,
                      uint64_t chunks, uint64_t bytes, const ctl_result_t *res)
{
    const Medlink__V1__ImagingConsult *c = consult->imaging_consult;
    uint64_t dup_chunks = res->duplicates - (uint64_t)(res->first_duplicate != 0);
    if (o->json)
        return s_print_json(json_pack(
            "{s:s, s:s, s:s, s:s, s:s, s:s, s:b, s:I, s:I, s:I, s:I, s:I}", "result", "accepted",
            "messageId", consult->id, "caseId", consult->case_id, "kind",
            ml_kind_name((int)consult->kind), "to", consult->to, "studyInstanceUid",
            c->study_instance_uid, "duplicate", res->first_duplicate, "objects",
            (json_int_t)objects, "chunks", (json_int_t)chunks, "bytes", (json_int_t)bytes,
            "chunkSize", (json_int_t)c->chunk_size, "duplicateChunks", (json_int_t)dup_chunks));
    char sz[32];
    printf("accepted: imaging consult %s, case %s, to %s%s\n", consult->id, consult->case_id,
           consult->to, res->first_duplicate ? " (already accepted before)" : "");
    printf("study     %s (%s)\n", s_or(c->study_instance_uid, "-"), s_or(c->modality, "-"));
    printf("sent      %u object%s, %llu chunk%s, %s", objects, objects == 1 ? "" : "s",
           (unsigned long long)chunks, chunks == 1 ? "" : "s", s_size(bytes, sz, sizeof sz));
    if (dup_chunks)
        printf(" (%llu chunk%s already accepted before)", (unsigned long long)dup_chunks,
               dup_chunks == 1 ? "" : "s");
    printf("\n");
    return CTL_EXIT_OK;
}

int ctl_print_refused(const ctl_opts_t *o, const ctl_result_t *res)
{
    const char *code = ml_nack_name(res->nack_code);
    if (o->json)
        s_print_json(json_pack("{s:s, s:s, s:s, s:s}", "result", "refused", "messageId",
                               res->nack_id, "code", code, "reason", res->nack_reason));
    return ctl_fail(CTL_EXIT_FAIL, "refused: %s: %s", code, res->nack_reason);
}

int ctl_print_envelope(const ml_envelope_t *env)
{
    char *json = NULL, err[256];
    if (ml_json_encode(&env->base, ML_JSON_PRETTY | ML_JSON_REPLACE_INVALID, &json, err,
                       sizeof err) < 0)
        return ctl_fail(CTL_EXIT_FAIL, "cannot render the envelope as JSON: %s", err);
    printf("%s\n", json);
    free(json);
    return CTL_EXIT_OK;
}
