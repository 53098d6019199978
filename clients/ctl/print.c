/* medlinkctl's output (see print.h). Tables size their columns to what
 * they hold; times are RFC 3339 UTC with the age next to them, as in
 * `status`. JSON output goes through ml_json_encode so that it is the
 * proto3 JSON of the wire messages, the same mapping as the spool files. */
#include "print.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "build.h"
#include "ml_adminjson.h"
#include "ml_common.h"
#include "ml_json.h"
#include "ml_text.h"

/* ---- small helpers ---- */

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
        snprintf(buf, len, "%s (%s ago)", ml_time_format(at, t, sizeof t),
                 s_dur(now - at, d, sizeof d));
    else
        snprintf(buf, len, "%s (in %s)", ml_time_format(at, t, sizeof t),
                 s_dur(at - now, d, sizeof d));
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

typedef struct {
    int cols;
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
        int w = (int)strlen(s);
        if (w > t->width[i])
            t->width[i] = w;
    }
    va_end(ap);
    t->rows++;
}

/* Prints and frees the table; the last column is not padded. */
static void s_table_print(s_table_t *t, const char *indent)
{
    for (size_t r = 0; r < t->rows; r++) {
        fputs(indent, stdout);
        for (int i = 0; i < t->cols; i++) {
            const char *s = t->cells[r * (size_t)t->cols + (size_t)i];
            if (i == t->cols - 1)
                printf("%s\n", s);
            else
                printf("%-*s  ", t->width[i], s);
            free(t->cells[r * (size_t)t->cols + (size_t)i]);
        }
    }
    free(t->cells);
    memset(t, 0, sizeof *t);
}

/* ---- status ---- */

static int s_status(const ctl_opts_t *o, const Medlink__V1__AdminReply *rep)
{
    const Medlink__V1__BrokerStatus *st = rep->broker_status;
    if (!st)
        return ctl_fail(CTL_EXIT_FAIL, "the broker's reply has no status");
    if (o->json)
        return s_print_admin_json(rep, ML_ADMIN_JSON_STATUS);
    char a[32], b[32], c[32];
    int64_t now = st->now ? st->now : ml_now_ms();
    printf("broker    %s\n", s_e(st->broker));
    printf("uptime    %s (since %s)\n", s_dur(now - st->started_at, a, sizeof a),
           ml_time_format(st->started_at, b, sizeof b));
    printf("sessions  %llu\n", (unsigned long long)st->sessions);
    printf("messages  accepted %llu, delivered %llu, refused %llu\n",
           (unsigned long long)st->accepted_total, (unsigned long long)st->delivered_total,
           (unsigned long long)st->refused_total);
    /* The clock: a CRL past its next update refuses every node, so what
     * is about to expire is said first, one line each. */
    for (size_t i = 0; i < st->n_expiry; i++) {
        const Medlink__V1__Expiry *e = st->expiry[i];
        if (!e->warning)
            continue;
        ml_time_format(e->not_after, b, sizeof b);
        if (e->expired)
            printf("WARNING   %s EXPIRED on %s: handshakes it affects are refused\n",
                   s_or(e->what, "?"), b);
        else if (e->days_left < 1)
            printf("WARNING   %s expires in less than a day, on %s\n", s_or(e->what, "?"), b);
        else
            printf("WARNING   %s expires in %lld day(s), on %s\n", s_or(e->what, "?"),
                   (long long)e->days_left, b);
    }
    printf("\n%-32s %-16s %-8s %-10s %7s %8s %9s\n", "NODE", "ROLE", "STATE", "LAST SEEN", "QUEUE",
           "OLDEST", "IN FLIGHT");
    for (size_t i = 0; i < st->n_node; i++) {
        const Medlink__V1__NodeStatus *n = st->node[i];
        char seen[40];
        if (n->online)
            snprintf(seen, sizeof seen, "now");
        else if (n->last_seen == 0)
            snprintf(seen, sizeof seen, "never");
        else
            snprintf(seen, sizeof seen, "%s ago", s_dur(now - n->last_seen, a, sizeof a));
        printf("%-32s %-16s %-8s %-10s %7llu %8s %9llu\n", s_e(n->node_id), s_e(n->role),
               n->online ? "online" : "offline", seen, (unsigned long long)n->queue_depth,
               n->oldest_queued_at ? s_dur(now - n->oldest_queued_at, c, sizeof c) : "-",
               (unsigned long long)n->in_flight);
    }
    return CTL_EXIT_OK;
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
        printf("deadline     %s to reach %s: %s %s\n", ml_time_format(c->deadline_at, a, sizeof a),
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
        s_table_row(&t, ml_time_format(e->at, a, sizeof a), s_or(e->node, "-"), s_or(e->event, "-"),
                    tr, s_or(e->detail, ""));
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
    const ProtobufCEnumValue *v =
        protobuf_c_enum_descriptor_get_value(&medlink__v1__nack_code__descriptor, res->nack_code);
    const char *code = v ? v->name : "NACK_UNKNOWN";
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
