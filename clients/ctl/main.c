/* medlinkctl: the command line for clinicians' scripts and ops staff. It
 * opens one mutually authenticated channel to the broker (deliveries off:
 * it never takes messages meant for an agent), sends one request, waits for
 * the one answer that settles it, prints it and exits:
 *
 *   status        ADMIN_REQUEST(OP_STATUS) -> ADMIN_REPLY (OPS nodes only)
 *   send          a Referral (flags or a JSON file) -> Accepted | Nack
 *   send-update   a ReferralUpdate -> Accepted | Nack
 *
 * Exit codes: 0 done, 1 refused or failed (reason on stderr), 2 usage. When
 * the connection drops before the answer, the same request (same message
 * id) is sent again on the next session: the broker drops duplicates. */
#include <ctype.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <uv.h>
#include <zmq.h>

#include "ml_channel.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_ini.h"
#include "ml_json.h"
#include "ml_tls.h"

#ifndef ML_VERSION
#define ML_VERSION "0.1.0"
#endif

#define S_EXIT_OK 0
#define S_EXIT_FAIL 1
#define S_EXIT_USAGE 2
#define S_MAX_ICD 32
#define S_MAX_FILE (16u << 20)

enum { S_CMD_STATUS = 1, S_CMD_SEND, S_CMD_UPDATE };

typedef struct {
    const char *config;
    char *broker, *node, *ca, *cert, *key; /* malloc'd after merging */
    char *broker_id;                       /* expected broker CN, or NULL */
    int json;
    int timeout_s;
    int verbose;
    /* send / send-update */
    const char *to, *case_id, *priority, *file;
    const char *patient_name, *health_card, *sex, *birth_date, *reason, *doctor, *team;
    const char *icd10[S_MAX_ICD];
    int n_icd10;
    const char *status, *redirect_to, *department, *scheduled_at, *outcome, *notes;
} s_opts_t;

typedef struct {
    s_opts_t *o;
    int cmd;
    uv_loop_t loop;
    void *zctx;
    ml_tls_ctx_t *tls;
    ml_channel_t *ch;
    uv_timer_t timer;
    ml_envelope_t *msg; /* send / send-update: the message (heap) */
    char req_id[ML_ULID_LEN + 1];
    int done;
    int rc;
} s_run_t;

static void s_usage(FILE *f)
{
    fprintf(f, "usage: medlinkctl [connection] [--json] [--timeout S] COMMAND [options]\n"
               "\n"
               "connection (flags override the file):\n"
               "  --config FILE      INI file with [ctl] node_id, broker, ca, cert, key\n"
               "  --broker URL       e.g. tcp://127.0.0.1:7400\n"
               "  --broker-id ID     the broker's certificate CN (recommended: refuses an\n"
               "                     impostor holding another community certificate)\n"
               "  --node ID          our node id (default: the certificate's CN)\n"
               "  --ca FILE --cert FILE --key FILE\n"
               "  --timeout SECONDS  wait this long for the answer (default 10)\n"
               "  --json             machine-readable output\n"
               "  -v, --verbose      log the connection's progress on stderr\n"
               "\n"
               "commands:\n"
               "  status                                  broker, sessions and per-node queues\n"
               "  send --to NODE [--case ID] [--priority ROUTINE|URGENT|EMERGENCY]\n"
               "       (--file FILE.json | --patient-name N --health-card ID [--sex male|female]\n"
               "        [--birth-date YYYY-MM-DD] --reason TEXT [--icd10 CODE[:text]]...\n"
               "        [--doctor NAME] [--team NAME] [--notes TEXT])\n"
               "  send-update --to NODE --case ID --status ACCEPTED|REJECTED|REDIRECTED|\n"
               "       SCHEDULED|ARRIVED|NO_SHOW|ADMITTED|DISCHARGED|CLOSED|CANCELLED\n"
               "       [--reason TEXT] [--redirect-to NODE] [--department D]\n"
               "       [--scheduled-at RFC3339|UNIX_MS] [--outcome TEXT] [--notes TEXT]\n"
               "\n"
               "exit status: 0 ok, 1 refused or failed, 2 usage error\n");
}

static int s_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int s_fail(int code, const char *fmt, ...)
{
    va_list ap;
    fputs("medlinkctl: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return code;
}

/* ---- configuration ---- */

/* flag value, else the [ctl] key (a path joined to the file's folder). */
static int s_merge(char **out, const char *flag, const ml_ini_t *ini, const char *key, int is_path)
{
    const char *v = flag;
    if (!v && ini)
        v = ml_ini_get(ini, "ctl", key, NULL);
    if (!v || !*v) {
        *out = NULL;
        return 0;
    }
    if (is_path && !flag && v[0] != '/') {
        size_t n = strlen(ml_ini_dir(ini)) + strlen(v) + 2;
        if ((*out = malloc(n)))
            snprintf(*out, n, "%s/%s", ml_ini_dir(ini), v);
    } else {
        *out = strdup(v);
    }
    return *out ? 0 : ML_ENOMEM;
}

static int s_connection(s_opts_t *o, const char *f_broker, const char *f_node, const char *f_ca,
                        const char *f_cert, const char *f_key, const char *f_broker_id)
{
    ml_ini_t *ini = NULL;
    char err[1024];
    int rc = S_EXIT_OK;
    if (o->config && ml_ini_load(o->config, &ini, err, sizeof err) < 0)
        return s_fail(S_EXIT_USAGE, "%s", err);
    if (s_merge(&o->broker, f_broker, ini, "broker", 0) < 0 ||
        s_merge(&o->broker_id, f_broker_id, ini, "broker_id", 0) < 0 ||
        s_merge(&o->node, f_node, ini, "node_id", 0) < 0 ||
        s_merge(&o->ca, f_ca, ini, "ca", 1) < 0 || s_merge(&o->cert, f_cert, ini, "cert", 1) < 0 ||
        s_merge(&o->key, f_key, ini, "key", 1) < 0) {
        rc = s_fail(S_EXIT_FAIL, "out of memory");
        goto out;
    }
    const char *missing = !o->broker ? "--broker (or broker in [ctl])"
                          : !o->ca   ? "--ca (or ca in [ctl])"
                          : !o->cert ? "--cert (or cert in [ctl])"
                          : !o->key  ? "--key (or key in [ctl])"
                                     : NULL;
    if (missing)
        rc = s_fail(S_EXIT_USAGE, "missing %s", missing);
out:
    ml_ini_destroy(&ini);
    return rc;
}

/* ---- building messages ---- */

static int s_set(char **field, const char *value)
{
    char *v = strdup(value ? value : "");
    if (!v)
        return ML_ENOMEM;
    if (*field && *field != protobuf_c_empty_string)
        free(*field);
    *field = v;
    return 0;
}

static void *s_new(size_t size, void (*init)(void *))
{
    void *p = calloc(1, size);
    if (!p) {
        fputs("medlinkctl: out of memory\n", stderr);
        exit(S_EXIT_FAIL);
    }
    init(p);
    return p;
}
#define S_NEW(T, fn) ((T *)s_new(sizeof(T), (void (*)(void *))(fn)))

static void s_must(int rc)
{
    if (rc < 0) {
        fputs("medlinkctl: out of memory\n", stderr);
        exit(S_EXIT_FAIL);
    }
}

static int s_enum(const ProtobufCEnumDescriptor *d, const char *prefix, const char *s, int *out)
{
    char name[128];
    snprintf(name, sizeof name, "%s", s);
    for (char *p = name; *p; p++)
        *p = (char)(*p == '-' ? '_' : toupper((unsigned char)*p));
    const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value_by_name(d, name);
    if (!v) {
        char full[200];
        snprintf(full, sizeof full, "%s%s", prefix, name);
        v = protobuf_c_enum_descriptor_get_value_by_name(d, full);
    }
    if (!v)
        return ML_EINVAL;
    *out = v->value;
    return 0;
}

static int s_parse_sex(const char *s, int *out)
{
    if (strcasecmp(s, "m") == 0)
        s = "MALE";
    else if (strcasecmp(s, "f") == 0)
        s = "FEMALE";
    return s_enum(&medlink__v1__sex__descriptor, "SEX_", s, out);
}

/* Unix milliseconds or RFC 3339 ("2026-11-23T09:30:00+08:00", "...Z"). */
static int s_parse_time(const char *s, int64_t *out)
{
    char *end;
    if (*s && strspn(s, "0123456789") == strlen(s)) {
        *out = strtoll(s, &end, 10);
        return 0;
    }
    struct tm tm = {0};
    int n = 0;
    if (sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour,
               &tm.tm_min, &tm.tm_sec, &n) != 6)
        return ML_EINVAL;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    const char *p = s + n;
    int64_t ms = 0;
    if (*p == '.') {
        int digits = 0;
        for (p++; isdigit((unsigned char)*p); p++, digits++)
            if (digits < 3)
                ms = ms * 10 + (*p - '0');
        for (; digits < 3; digits++)
            ms *= 10;
    }
    int64_t off = 0;
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        int hh, mm;
        if (sscanf(p + 1, "%2d:%2d", &hh, &mm) != 2)
            return ML_EINVAL;
        off = (int64_t)(hh * 60 + mm) * 60000 * (*p == '-' ? -1 : 1);
        p += 6;
    } else {
        return ML_EINVAL;
    }
    if (*p)
        return ML_EINVAL;
    *out = (int64_t)timegm(&tm) * 1000 + ms - off;
    return 0;
}

static Medlink__V1__Referral *s_referral_from_flags(const s_opts_t *o, int *rc)
{
    Medlink__V1__Referral *r = S_NEW(Medlink__V1__Referral, medlink__v1__referral__init);
    Medlink__V1__Patient *p = S_NEW(Medlink__V1__Patient, medlink__v1__patient__init);
    r->patient = p;
    *rc = 0;
    if (o->patient_name)
        s_must(s_set(&p->name, o->patient_name));
    if (o->health_card)
        s_must(s_set(&p->health_card_id, o->health_card));
    if (o->birth_date)
        s_must(s_set(&p->birth_date, o->birth_date));
    if (o->sex) {
        int sex;
        if (s_parse_sex(o->sex, &sex) < 0) {
            *rc = s_fail(S_EXIT_USAGE, "--sex %s: expected male, female, other or unknown", o->sex);
            return r;
        }
        p->sex = sex;
    }
    if (o->reason)
        s_must(s_set(&r->reason, o->reason));
    if (o->team)
        s_must(s_set(&r->family_doctor_team, o->team));
    if (o->notes)
        s_must(s_set(&r->notes, o->notes));
    if (o->doctor) {
        r->referring_doctor = S_NEW(Medlink__V1__Clinician, medlink__v1__clinician__init);
        s_must(s_set(&r->referring_doctor->name, o->doctor));
    }
    if (o->n_icd10 > 0) {
        r->diagnosis = calloc((size_t)o->n_icd10, sizeof *r->diagnosis);
        s_must(r->diagnosis ? 0 : ML_ENOMEM);
        for (int i = 0; i < o->n_icd10; i++) {
            Medlink__V1__Diagnosis *d = S_NEW(Medlink__V1__Diagnosis, medlink__v1__diagnosis__init);
            r->diagnosis[r->n_diagnosis++] = d;
            const char *colon = strchr(o->icd10[i], ':');
            if (colon) {
                char code[64];
                snprintf(code, sizeof code, "%.*s", (int)(colon - o->icd10[i]), o->icd10[i]);
                s_must(s_set(&d->icd10, code));
                s_must(s_set(&d->text, colon + 1));
            } else {
                s_must(s_set(&d->icd10, o->icd10[i]));
            }
        }
    }
    return r;
}

static Medlink__V1__ReferralUpdate *s_update_from_flags(const s_opts_t *o, int *rc)
{
    Medlink__V1__ReferralUpdate *u =
        S_NEW(Medlink__V1__ReferralUpdate, medlink__v1__referral_update__init);
    *rc = 0;
    int st;
    if (s_enum(&medlink__v1__referral_status__descriptor, "REFERRAL_", o->status, &st) < 0) {
        *rc =
            s_fail(S_EXIT_USAGE, "--status %s is not a referral status (e.g. ACCEPTED)", o->status);
        return u;
    }
    u->status = st;
    if (o->reason)
        s_must(s_set(&u->reason, o->reason));
    if (o->redirect_to)
        s_must(s_set(&u->redirect_to, o->redirect_to));
    if (o->department)
        s_must(s_set(&u->department, o->department));
    if (o->outcome)
        s_must(s_set(&u->outcome_summary, o->outcome));
    if (o->notes)
        s_must(s_set(&u->notes, o->notes));
    if (o->scheduled_at && s_parse_time(o->scheduled_at, &u->scheduled_at) < 0)
        *rc = s_fail(S_EXIT_USAGE,
                     "--scheduled-at %s: expected RFC 3339 (2026-11-23T09:30:00+08:00) or Unix "
                     "milliseconds",
                     o->scheduled_at);
    return u;
}

/* FILE is a whole Envelope or just a Referral object: try both. */
static int s_from_file(const s_opts_t *o, ml_envelope_t **out)
{
    char *text = NULL;
    size_t len = 0;
    char e1[512], e2[512];
    ProtobufCMessage *m = NULL;
    int rc = ml_read_file(o->file, S_MAX_FILE, &text, &len);
    if (rc < 0)
        return s_fail(S_EXIT_FAIL, "cannot read %s: %s", o->file, ml_strerror(rc));
    if (ml_json_decode(&medlink__v1__envelope__descriptor, text, len, &m, e1, sizeof e1) == 0) {
        *out = (ml_envelope_t *)m;
        rc = 0;
    } else if (ml_json_decode(&medlink__v1__referral__descriptor, text, len, &m, e2, sizeof e2) ==
               0) {
        ml_envelope_t *e = S_NEW(ml_envelope_t, medlink__v1__envelope__init);
        e->payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL;
        e->referral = (Medlink__V1__Referral *)m;
        *out = e;
        rc = 0;
    } else {
        rc = s_fail(S_EXIT_FAIL, "%s is neither an Envelope (%s) nor a Referral (%s)", o->file, e1,
                    e2);
    }
    free(text);
    return rc;
}

/* Builds, fills in and validates the message of send / send-update. */
static int s_build(s_run_t *r)
{
    s_opts_t *o = r->o;
    ml_envelope_t *e = NULL;
    int rc = 0;
    char err[512];
    if (o->file) {
        if ((rc = s_from_file(o, &e)) != 0)
            return rc;
    } else {
        e = S_NEW(ml_envelope_t, medlink__v1__envelope__init);
        if (r->cmd == S_CMD_SEND) {
            e->payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL;
            e->referral = s_referral_from_flags(o, &rc);
        } else {
            e->payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_REFERRAL_UPDATE;
            e->referral_update = s_update_from_flags(o, &rc);
        }
        if (rc != 0)
            goto out;
    }
    if (o->to)
        s_must(s_set(&e->to, o->to));
    if (o->case_id)
        s_must(s_set(&e->case_id, o->case_id));
    if (o->priority) {
        int p;
        if (ml_priority_parse(o->priority, &p) < 0) {
            rc = s_fail(S_EXIT_USAGE, "--priority %s: expected ROUTINE, URGENT or EMERGENCY",
                        o->priority);
            goto out;
        }
        e->priority = p;
    }
    if (!*e->id) {
        char id[ML_ULID_LEN + 1];
        ml_ulid_new(id);
        s_must(s_set(&e->id, id));
    }
    if (!*e->from)
        s_must(s_set(&e->from, o->node));
    else if (strcmp(e->from, o->node) != 0) {
        rc = s_fail(S_EXIT_FAIL, "from %s is not this node %s", e->from, o->node);
        goto out;
    }
    if (e->created_at == 0)
        e->created_at = ml_now_ms();
    if (!*e->case_id)
        s_must(s_set(&e->case_id, e->id));
    if (ml_env_validate(e, err, sizeof err) < 0) {
        rc = s_fail(S_EXIT_USAGE, "invalid message: %s", err);
        goto out;
    }
    if (!ml_env_kind_is_routed(e->kind)) {
        rc = s_fail(S_EXIT_USAGE, "invalid message: kind %s cannot be sent", ml_kind_name(e->kind));
        goto out;
    }
    snprintf(r->req_id, sizeof r->req_id, "%s", e->id);
    r->msg = e;
    e = NULL;
out:
    ml_env_free(&e);
    return rc;
}

/* ---- output ---- */

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

static int s_print_status(s_run_t *r, const Medlink__V1__AdminReply *rep)
{
    if (rep->status != 0)
        return s_fail(S_EXIT_FAIL, "refused: %s", rep->error && *rep->error ? rep->error : "error");
    const Medlink__V1__BrokerStatus *st = rep->broker_status;
    if (!st)
        return s_fail(S_EXIT_FAIL, "the broker's reply has no status");
    if (r->o->json) {
        char *json = NULL, err[256];
        if (ml_json_encode(&st->base, ML_JSON_PRETTY | ML_JSON_EMIT_DEFAULTS, &json, err,
                           sizeof err) < 0)
            return s_fail(S_EXIT_FAIL, "cannot render the status as JSON: %s", err);
        printf("%s\n", json);
        free(json);
        return S_EXIT_OK;
    }
    char a[32], b[32], c[32];
    int64_t now = st->now ? st->now : ml_now_ms();
    printf("broker    %s\n", st->broker);
    printf("uptime    %s (since %s)\n", s_dur(now - st->started_at, a, sizeof a),
           ml_time_format(st->started_at, b, sizeof b));
    printf("sessions  %llu\n", (unsigned long long)st->sessions);
    printf("messages  accepted %llu, delivered %llu, refused %llu\n",
           (unsigned long long)st->accepted_total, (unsigned long long)st->delivered_total,
           (unsigned long long)st->refused_total);
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
        printf("%-32s %-16s %-8s %-10s %7llu %8s %9llu\n", n->node_id, n->role,
               n->online ? "online" : "offline", seen, (unsigned long long)n->queue_depth,
               n->oldest_queued_at ? s_dur(now - n->oldest_queued_at, c, sizeof c) : "-",
               (unsigned long long)n->in_flight);
    }
    return S_EXIT_OK;
}

/* 1 if id is one of the n ids (cumulative acknowledgements). */
static int s_lists(char **ids, size_t n, const char *id)
{
    for (size_t i = 0; i < n; i++)
        if (strcmp(ids[i], id) == 0)
            return 1;
    return 0;
}

static int s_print_accepted(s_run_t *r, const Medlink__V1__Accepted *acc)
{
    if (r->o->json) {
        json_t *j = json_pack("{s:s, s:s, s:s, s:s, s:b}", "result", "accepted", "messageId",
                              r->msg->id, "caseId", r->msg->case_id, "to", r->msg->to, "duplicate",
                              s_lists(acc->duplicate_ids, acc->n_duplicate_ids, r->req_id));
        char *s = j ? json_dumps(j, JSON_INDENT(2)) : NULL;
        if (s)
            printf("%s\n", s);
        free(s);
        json_decref(j);
    } else {
        printf("accepted: message %s, case %s%s\n", r->msg->id, r->msg->case_id,
               s_lists(acc->duplicate_ids, acc->n_duplicate_ids, r->req_id)
                   ? " (already accepted before)"
                   : "");
    }
    return S_EXIT_OK;
}

static int s_print_nack(s_run_t *r, const Medlink__V1__Nack *n)
{
    const ProtobufCEnumValue *v =
        protobuf_c_enum_descriptor_get_value(&medlink__v1__nack_code__descriptor, n->code);
    const char *code = v ? v->name : "NACK_UNKNOWN";
    if (r->o->json) {
        json_t *j = json_pack("{s:s, s:s, s:s, s:s}", "result", "refused", "messageId", r->req_id,
                              "code", code, "reason", n->reason ? n->reason : "");
        char *s = j ? json_dumps(j, JSON_INDENT(2)) : NULL;
        if (s)
            printf("%s\n", s);
        free(s);
        json_decref(j);
    }
    return s_fail(S_EXIT_FAIL, "refused: %s: %s", code, n->reason ? n->reason : "");
}

/* ---- the exchange ---- */

static void s_finish(s_run_t *r, int rc)
{
    if (r->done)
        return;
    r->done = 1;
    r->rc = rc;
    uv_timer_stop(&r->timer);
    uv_close((uv_handle_t *)&r->timer, NULL);
    ml_channel_destroy(&r->ch);
}

static void s_send_request(s_run_t *r)
{
    int rc;
    if (r->cmd == S_CMD_STATUS) {
        const Medlink__V1__Welcome *w = ml_channel_welcome(r->ch);
        Medlink__V1__AdminRequest req = MEDLINK__V1__ADMIN_REQUEST__INIT;
        ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
        req.op = MEDLINK__V1__ADMIN_REQUEST__OP__OP_STATUS;
        env.id = r->req_id;
        env.from = r->o->node;
        env.to = w && w->broker ? w->broker : "";
        env.kind = MEDLINK__V1__KIND__KIND_ADMIN_REQUEST;
        env.created_at = ml_now_ms();
        env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REQUEST;
        env.admin_request = &req;
        rc = ml_channel_send(r->ch, &env);
    } else {
        rc = ml_channel_send(r->ch, r->msg);
    }
    if (rc < 0)
        s_finish(r, s_fail(S_EXIT_FAIL, "cannot send the request: %s", ml_strerror(rc)));
}

static void s_on_state(ml_channel_t *ch, int up, const char *reason, void *arg)
{
    s_run_t *r = arg;
    if (r->done)
        return;
    if (up)
        s_send_request(r);
    else if (r->o->verbose)
        ml_log(ML_LOG_INFO, "ctl", "connection lost (%s); retrying", reason ? reason : "?");
}

static void s_on_envelope(ml_channel_t *ch, ml_envelope_t *env, void *arg)
{
    s_run_t *r = arg;
    if (r->done)
        return;
    switch (env->payload_case) {
    case MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REPLY:
        if (r->cmd == S_CMD_STATUS)
            s_finish(r, s_print_status(r, env->admin_reply));
        return;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_ACCEPTED:
        if (r->cmd != S_CMD_STATUS &&
            s_lists(env->accepted->message_ids, env->accepted->n_message_ids, r->req_id))
            s_finish(r, s_print_accepted(r, env->accepted));
        return;
    case MEDLINK__V1__ENVELOPE__PAYLOAD_NACK:
        /* A Nack without a message id is about the session itself. */
        if (!*env->nack->message_id || strcmp(env->nack->message_id, r->req_id) == 0)
            s_finish(r, s_print_nack(r, env->nack));
        return;
    default:
        return;
    }
}

static void s_timeout_cb(uv_timer_t *t)
{
    s_run_t *r = t->data;
    s_finish(r, s_fail(S_EXIT_FAIL, "no answer from broker %s within %d s", r->o->broker,
                       r->o->timeout_s));
}

static int s_run(s_run_t *r)
{
    s_opts_t *o = r->o;
    char err[1024];
    int rc;
    ml_tls_config_t tcfg = {o->ca, o->cert, o->key, NULL, 0};
    if (ml_tls_ctx_new(&tcfg, &r->tls, err, sizeof err) < 0)
        return s_fail(S_EXIT_FAIL, "%s", err);
    const char *cn = ml_tls_ctx_own_id(r->tls);
    if (!o->node) {
        if (!cn)
            return s_fail(S_EXIT_USAGE, "missing --node (the certificate has no CN)");
        s_must((o->node = strdup(cn)) ? 0 : ML_ENOMEM);
    } else if (cn && strcmp(cn, o->node) != 0) {
        return s_fail(S_EXIT_FAIL, "certificate %s is for %s, not %s", o->cert, cn, o->node);
    }
    if (r->cmd == S_CMD_STATUS)
        ml_ulid_new(r->req_id);
    else if ((rc = s_build(r)) != 0)
        return rc;

    uv_loop_init(&r->loop);
    r->zctx = zmq_ctx_new();
    if (!r->zctx)
        return s_fail(S_EXIT_FAIL, "cannot create a ZeroMQ context");
    zmq_ctx_set(r->zctx, ZMQ_BLOCKY, 0);
    uv_timer_init(&r->loop, &r->timer);
    r->timer.data = r;
    uv_timer_start(&r->timer, s_timeout_cb, (uint64_t)o->timeout_s * 1000, 0);
    ml_channel_config_t cc = {0};
    cc.endpoint = o->broker;
    cc.tls = r->tls;
    cc.node_id = o->node;
    cc.broker_id = o->broker_id;
    cc.software = "medlinkctl/" ML_VERSION;
    cc.deliveries = 0;
    cc.on_envelope = s_on_envelope;
    cc.on_state = s_on_state;
    cc.arg = r;
    if ((rc = ml_channel_new(&r->loop, r->zctx, &cc, &r->ch)) < 0) {
        s_finish(r, s_fail(S_EXIT_FAIL, "cannot connect to %s: %s", o->broker, ml_strerror(rc)));
    }
    uv_run(&r->loop, UV_RUN_DEFAULT);
    uv_loop_close(&r->loop);
    return r->rc;
}

int main(int argc, char **argv)
{
    enum {
        O_CONFIG = 256,
        O_BROKER,
        O_NODE,
        O_CA,
        O_CERT,
        O_KEY,
        O_JSON,
        O_TIMEOUT,
        O_TO,
        O_CASE,
        O_PRIORITY,
        O_FILE,
        O_PATIENT,
        O_CARD,
        O_SEX,
        O_BIRTH,
        O_REASON,
        O_ICD,
        O_DOCTOR,
        O_TEAM,
        O_STATUS,
        O_REDIRECT,
        O_DEPT,
        O_SCHED,
        O_OUTCOME,
        O_NOTES,
        O_VERSION,
        O_BROKER_ID
    };
    static const struct option opts[] = {{"config", required_argument, NULL, O_CONFIG},
                                         {"broker", required_argument, NULL, O_BROKER},
                                         {"broker-id", required_argument, NULL, O_BROKER_ID},
                                         {"node", required_argument, NULL, O_NODE},
                                         {"ca", required_argument, NULL, O_CA},
                                         {"cert", required_argument, NULL, O_CERT},
                                         {"key", required_argument, NULL, O_KEY},
                                         {"json", no_argument, NULL, O_JSON},
                                         {"timeout", required_argument, NULL, O_TIMEOUT},
                                         {"verbose", no_argument, NULL, 'v'},
                                         {"help", no_argument, NULL, 'h'},
                                         {"version", no_argument, NULL, O_VERSION},
                                         {"to", required_argument, NULL, O_TO},
                                         {"case", required_argument, NULL, O_CASE},
                                         {"priority", required_argument, NULL, O_PRIORITY},
                                         {"file", required_argument, NULL, O_FILE},
                                         {"patient-name", required_argument, NULL, O_PATIENT},
                                         {"health-card", required_argument, NULL, O_CARD},
                                         {"sex", required_argument, NULL, O_SEX},
                                         {"birth-date", required_argument, NULL, O_BIRTH},
                                         {"reason", required_argument, NULL, O_REASON},
                                         {"icd10", required_argument, NULL, O_ICD},
                                         {"doctor", required_argument, NULL, O_DOCTOR},
                                         {"team", required_argument, NULL, O_TEAM},
                                         {"status", required_argument, NULL, O_STATUS},
                                         {"redirect-to", required_argument, NULL, O_REDIRECT},
                                         {"department", required_argument, NULL, O_DEPT},
                                         {"scheduled-at", required_argument, NULL, O_SCHED},
                                         {"outcome", required_argument, NULL, O_OUTCOME},
                                         {"notes", required_argument, NULL, O_NOTES},
                                         {NULL, 0, NULL, 0}};
    s_opts_t o = {0};
    const char *f_broker = NULL, *f_node = NULL, *f_ca = NULL, *f_cert = NULL, *f_key = NULL;
    const char *f_broker_id = NULL;
    int send_only = 0, update_only = 0, c;
    o.timeout_s = 10;
    while ((c = getopt_long(argc, argv, "vh", opts, NULL)) != -1) {
        switch (c) {
        case O_CONFIG:
            o.config = optarg;
            break;
        case O_BROKER:
            f_broker = optarg;
            break;
        case O_BROKER_ID:
            f_broker_id = optarg;
            break;
        case O_NODE:
            f_node = optarg;
            break;
        case O_CA:
            f_ca = optarg;
            break;
        case O_CERT:
            f_cert = optarg;
            break;
        case O_KEY:
            f_key = optarg;
            break;
        case O_JSON:
            o.json = 1;
            break;
        case O_TIMEOUT: {
            char *end;
            long t = strtol(optarg, &end, 10);
            if (*end || t < 1 || t > 86400)
                return s_fail(S_EXIT_USAGE, "--timeout %s: expected 1..86400 seconds", optarg);
            o.timeout_s = (int)t;
            break;
        }
        case 'v':
            o.verbose = 1;
            break;
        case 'h':
            s_usage(stdout);
            return S_EXIT_OK;
        case O_VERSION:
            printf("medlinkctl %s\n", ML_VERSION);
            return S_EXIT_OK;
        case O_TO:
            o.to = optarg;
            break;
        case O_CASE:
            o.case_id = optarg;
            break;
        case O_PRIORITY:
            o.priority = optarg;
            break;
        case O_FILE:
            o.file = optarg;
            break;
        case O_PATIENT:
            o.patient_name = optarg;
            send_only = 1;
            break;
        case O_CARD:
            o.health_card = optarg;
            send_only = 1;
            break;
        case O_SEX:
            o.sex = optarg;
            send_only = 1;
            break;
        case O_BIRTH:
            o.birth_date = optarg;
            send_only = 1;
            break;
        case O_REASON:
            o.reason = optarg;
            break;
        case O_ICD:
            if (o.n_icd10 == S_MAX_ICD)
                return s_fail(S_EXIT_USAGE, "at most %d --icd10", S_MAX_ICD);
            o.icd10[o.n_icd10++] = optarg;
            send_only = 1;
            break;
        case O_DOCTOR:
            o.doctor = optarg;
            send_only = 1;
            break;
        case O_TEAM:
            o.team = optarg;
            send_only = 1;
            break;
        case O_STATUS:
            o.status = optarg;
            update_only = 1;
            break;
        case O_REDIRECT:
            o.redirect_to = optarg;
            update_only = 1;
            break;
        case O_DEPT:
            o.department = optarg;
            update_only = 1;
            break;
        case O_SCHED:
            o.scheduled_at = optarg;
            update_only = 1;
            break;
        case O_OUTCOME:
            o.outcome = optarg;
            update_only = 1;
            break;
        case O_NOTES:
            o.notes = optarg;
            break;
        default:
            s_usage(stderr);
            return S_EXIT_USAGE;
        }
    }
    if (optind != argc - 1) {
        s_usage(stderr);
        return S_EXIT_USAGE;
    }
    s_run_t r = {0};
    r.o = &o;
    const char *cmd = argv[optind];
    if (strcmp(cmd, "status") == 0)
        r.cmd = S_CMD_STATUS;
    else if (strcmp(cmd, "send") == 0)
        r.cmd = S_CMD_SEND;
    else if (strcmp(cmd, "send-update") == 0)
        r.cmd = S_CMD_UPDATE;
    else
        return s_fail(S_EXIT_USAGE, "unknown command '%s' (try --help)", cmd);
    int msg_opts = send_only || update_only || o.to || o.case_id || o.priority || o.file ||
                   o.reason || o.notes;
    if (r.cmd == S_CMD_STATUS && msg_opts)
        return s_fail(S_EXIT_USAGE, "status takes no message options");
    if (r.cmd == S_CMD_SEND && update_only)
        return s_fail(S_EXIT_USAGE, "--status, --redirect-to, --department, --scheduled-at and "
                                    "--outcome belong to send-update");
    if (r.cmd == S_CMD_UPDATE && send_only)
        return s_fail(S_EXIT_USAGE, "patient and diagnosis options belong to send");
    if (r.cmd == S_CMD_SEND && !o.file && !o.to)
        return s_fail(S_EXIT_USAGE, "send needs --to NODE");
    if (r.cmd == S_CMD_UPDATE && !o.file && (!o.to || !o.case_id || !o.status))
        return s_fail(S_EXIT_USAGE, "send-update needs --to NODE, --case ID and --status S");

    int rc = s_connection(&o, f_broker, f_node, f_ca, f_cert, f_key, f_broker_id);
    if (rc != 0)
        goto out;
    /* Errors only, unless asked: the channel's progress lines
     * would drown the answer. A refused session is logged as an error. */
    ml_log_set_level(o.verbose ? ML_LOG_DEBUG : ML_LOG_ERROR);
    signal(SIGPIPE, SIG_IGN);
    rc = s_run(&r);
out:
    ml_env_free(&r.msg);
    if (r.zctx)
        zmq_ctx_term(r.zctx);
    ml_tls_ctx_destroy(&r.tls);
    free(o.broker);
    free(o.broker_id);
    free(o.node);
    free(o.ca);
    free(o.cert);
    free(o.key);
    fflush(stdout);
    return rc;
}
