/* medlinkctl's command line. Options are one table: each row names the
 * ctl_opts_t field it fills and the commands that take it, so parsing,
 * "--X does not apply to COMMAND" and each command's --help all come from
 * the same data. GNU getopt permutes argv, so options may come before or
 * after the command words ("--config F status", "status --config F"). */
#include "cli.h"

#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "ml_check.h"
#include "ml_common.h"
#include "ml_text.h"
#include "ml_ini.h"
#include "ml_tls.h"

#define S_BIT(c) (1u << (c))
#define S_ALL (~0u)
#define S_SENDS                                                                                    \
    (S_BIT(CTL_CMD_SEND) | S_BIT(CTL_CMD_SEND_REFERRAL) | S_BIT(CTL_CMD_SEND_IMAGING) |            \
     S_BIT(CTL_CMD_SEND_DOWN_TRANSFER) | S_BIT(CTL_CMD_SEND_UPDATE) | S_BIT(CTL_CMD_SEND_REPORT))
#define S_REF (S_BIT(CTL_CMD_SEND) | S_BIT(CTL_CMD_SEND_REFERRAL))
#define S_IMG S_BIT(CTL_CMD_SEND_IMAGING)
#define S_DOWN S_BIT(CTL_CMD_SEND_DOWN_TRANSFER)
#define S_UPD S_BIT(CTL_CMD_SEND_UPDATE)
#define S_REP S_BIT(CTL_CMD_SEND_REPORT)
#define S_CLIN (S_REF | S_IMG | S_DOWN)

enum { S_FLAG, S_STR, S_LIST };

typedef struct {
    const char *name;
    int type;        /* S_FLAG (int set to 1), S_STR (const char *), S_LIST (ctl_list_t) */
    size_t offset;   /* of the field in ctl_opts_t */
    unsigned cmds;   /* S_BIT of the commands that take it; S_ALL for connection options */
    int payload;     /* 1: fills in the message's payload, so it does not mix with --file */
    const char *arg; /* metavar in --help */
    const char *help;
} s_opt_t;

#define S_O(field) offsetof(ctl_opts_t, field)

static const s_opt_t s_opts[] = {
    /* connection and output */
    {"config", S_STR, S_O(config), S_ALL, 0, "FILE", "INI file with [ctl] node_id, broker, ca..."},
    {"broker", S_STR, S_O(f_broker), S_ALL, 0, "URL", "the broker, e.g. tcp://127.0.0.1:7400"},
    {"broker-id", S_STR, S_O(f_broker_id), S_ALL, 0, "ID",
     "the broker's certificate CN (refuses an impostor)"},
    {"node", S_STR, S_O(f_node), S_ALL, 0, "ID", "our node id (default: the certificate's CN)"},
    {"ca", S_STR, S_O(f_ca), S_ALL, 0, "FILE", "community CA (PEM)"},
    {"cert", S_STR, S_O(f_cert), S_ALL, 0, "FILE", "our certificate (PEM)"},
    {"key", S_STR, S_O(f_key), S_ALL, 0, "FILE", "our private key (PEM)"},
    {"timeout", S_STR, S_O(timeout), S_ALL, 0, "SECONDS",
     "wait for an answer (a transfer: for progress); default 10"},
    {"json", S_FLAG, S_O(json), S_ALL, 0, NULL, "machine-readable output"},
    {"dry-run", S_FLAG, S_O(dry_run), S_ALL, 0, NULL,
     "build and validate the request, print it as JSON, do not connect"},
    {"verbose", S_FLAG, S_O(verbose), S_ALL, 0, NULL, "log the connection's progress on stderr"},
    {"local-time", S_FLAG, S_O(local_time), S_ALL, 0, NULL,
     "human times in local time with their offset (also when TZ is set); JSON stays UTC"},
    {"check-config", S_FLAG, S_O(check_config), S_ALL, 0, NULL,
     "check --config FILE (or --check-config FILE) and exit: no command"},
    {"help", S_FLAG, S_O(help), S_ALL, 0, NULL, "this text; after a command, its options"},
    {"version", S_FLAG, S_O(version), S_ALL, 0, NULL, "print the version"},
    /* cases, dlq */
    {"state", S_STR, S_O(state), S_BIT(CTL_CMD_CASES), 0, "S",
     "only cases in this state (REFERRAL_SENT, or SENT)"},
    {"kind", S_STR, S_O(kind), S_BIT(CTL_CMD_CASES) | S_UPD, 1, "K",
     "referral | imaging | down_transfer (update: default referral)"},
    {"overdue", S_FLAG, S_O(overdue), S_BIT(CTL_CMD_CASES), 0, NULL,
     "only cases past their deadline"},
    {"limit", S_STR, S_O(limit), S_BIT(CTL_CMD_CASES) | S_BIT(CTL_CMD_DLQ_LIST), 0, "N",
     "at most N rows (the broker's default is 100)"},
    {"all", S_FLAG, S_O(all), S_BIT(CTL_CMD_DLQ_REPLAY) | S_BIT(CTL_CMD_DLQ_PURGE), 0, NULL,
     "every dead letter instead of one MESSAGE_ID"},
    /* top */
    {"interval", S_STR, S_O(interval), S_BIT(CTL_CMD_TOP), 0, "SECONDS",
     "refresh every SECONDS (0.2..3600, default 1)"},
    {"count", S_STR, S_O(count), S_BIT(CTL_CMD_TOP), 0, "N", "stop after N refreshes"},
    /* every send */
    {"to", S_STR, S_O(to), S_SENDS, 0, "NODE", "recipient node, or service (imaging.ct)"},
    {"case", S_STR, S_O(case_id), S_SENDS, 0, "ID",
     "the case (default for a message that opens one: its id)"},
    {"priority", S_STR, S_O(priority), S_SENDS, 0, "P", "ROUTINE | URGENT | EMERGENCY"},
    {"deadline", S_STR, S_O(deadline), S_SENDS, 0, "T",
     "RFC 3339, Unix ms, or +DURATION (+30m, +4h, +2d)"},
    {"file", S_STR, S_O(file), S_SENDS, 0, "F.json",
     "an Envelope in proto3 JSON (or just its payload object)"},
    /* patient and clinicians */
    {"patient-name", S_STR, S_O(patient_name), S_CLIN, 1, "NAME", "patient's name"},
    {"health-card", S_STR, S_O(health_card), S_CLIN, 1, "ID", "resident health card id"},
    {"sex", S_STR, S_O(sex), S_CLIN, 1, "S", "male | female | other | unknown (m, f)"},
    {"birth-date", S_STR, S_O(birth_date), S_CLIN, 1, "YYYY-MM-DD", "date of birth"},
    {"phone", S_STR, S_O(phone), S_CLIN, 1, "N", "patient's phone"},
    {"doctor", S_STR, S_O(doctor), S_CLIN, 1, "NAME",
     "referring / requesting / discharging doctor"},
    {"team", S_STR, S_O(team), S_REF | S_DOWN, 1, "NAME", "family-doctor team"},
    {"icd10", S_LIST, S_O(diagnosis), S_CLIN, 1, "CODE[:TEXT]", "a diagnosis (repeatable)"},
    {"diagnosis", S_LIST, S_O(diagnosis), S_CLIN, 1, "CODE[:TEXT]", "same as --icd10"},
    {"notes", S_STR, S_O(notes), S_CLIN | S_UPD, 1, "TEXT", "free-text notes"},
    /* referral */
    {"reason", S_STR, S_O(reason), S_REF | S_UPD, 1, "TEXT",
     "referral: why; update: why rejected / cancelled / declined"},
    {"linked-case", S_STR, S_O(linked_case), S_REF, 1, "ID",
     "the down-transfer case this referral sends back up"},
    /* imaging */
    {"dicom", S_LIST, S_O(dicom), S_IMG, 0, "FILE...", "DICOM Part 10 files of the study"},
    {"dicom-dir", S_STR, S_O(dicom_dir), S_IMG, 0, "DIR",
     "every file under DIR (hidden files and DICOMDIR skipped)"},
    {"chunk-size", S_STR, S_O(chunk_size), S_IMG, 0, "BYTES",
     "bytes per chunk, 4096..4194304 (default 262144)"},
    {"modality", S_STR, S_O(modality), S_IMG, 1, "M",
     "CT, DX, CR, US, MR... (default: the files')"},
    {"body-part", S_STR, S_O(body_part), S_IMG, 1, "P", "e.g. CHEST"},
    {"question", S_STR, S_O(question), S_IMG, 1, "TEXT", "the clinical question"},
    {"accession", S_STR, S_O(accession), S_IMG, 1, "N", "accession number"},
    /* down-transfer */
    {"phase", S_STR, S_O(phase), S_DOWN, 1, "P",
     "ACUTE_RECOVERY | POST_OPERATIVE | STABLE_CRITICAL"},
    {"summary", S_STR, S_O(summary), S_DOWN, 1, "TEXT", "discharge summary"},
    {"rehab-plan", S_STR, S_O(rehab_plan), S_DOWN, 1, "TEXT", "rehabilitation plan"},
    {"medication", S_LIST, S_O(medication), S_DOWN, 1, "\"NAME;DOSE;FREQ[;ROUTE[;DURATION]]\"",
     "a medication (repeatable)"},
    {"follow-up-days", S_LIST, S_O(follow_up_days), S_DOWN, 1, "N",
     "a follow-up N days after discharge (repeatable; numbered 1, 2...)"},
    {"discharged-at", S_STR, S_O(discharged_at), S_DOWN, 1, "T", "discharge time (default now)"},
    /* update */
    {"status", S_STR, S_O(status), S_UPD, 1, "S",
     "new status, full (REFERRAL_ACCEPTED) or short (ACCEPTED)"},
    {"redirect-to", S_STR, S_O(redirect_to), S_UPD, 1, "NODE", "referral REDIRECTED: new hospital"},
    {"scheduled-at", S_STR, S_O(scheduled_at), S_UPD, 1, "T", "referral SCHEDULED: when"},
    {"department", S_STR, S_O(department), S_UPD, 1, "D", "referral SCHEDULED: where"},
    {"outcome", S_STR, S_O(outcome), S_UPD, 1, "TEXT", "referral DISCHARGED: outcome summary"},
    {"follow-up", S_STR, S_O(follow_up), S_UPD, 1, "N", "down-transfer FOLLOW_UP: its number"},
    {"occurred-at", S_STR, S_O(occurred_at), S_UPD, 1, "T",
     "down-transfer: when it happened (arrival, visit)"},
    {"objects-received", S_STR, S_O(objects_received), S_UPD, 1, "N",
     "imaging STUDY_RECEIVED: objects verified"},
    {"bytes-received", S_STR, S_O(bytes_received), S_UPD, 1, "N",
     "imaging STUDY_RECEIVED: bytes verified"},
    {"by-name", S_STR, S_O(by_name), S_UPD, 1, "NAME", "the clinician who made the change"},
    {"by-id", S_STR, S_O(by_id), S_UPD, 1, "ID", "their staff id"},
    /* report */
    {"impression", S_STR, S_O(impression), S_REP, 1, "TEXT", "the report's impression (required)"},
    {"findings", S_STR, S_O(findings), S_REP, 1, "TEXT", "findings"},
    {"recommendation", S_STR, S_O(recommendation), S_REP, 1, "TEXT", "recommendation"},
    {"critical", S_FLAG, S_O(critical), S_REP, 1, NULL, "a critical finding: sent as EMERGENCY"},
    {"reader-name", S_STR, S_O(reader_name), S_REP, 1, "NAME",
     "the reading radiologist (required)"},
    {"reader-id", S_STR, S_O(reader_id), S_REP, 1, "ID", "their staff id"},
    {"study-uid", S_STR, S_O(study_uid), S_REP, 1, "UID",
     "the consult's studyInstanceUid (required)"},
};
#define S_N_OPTS (sizeof s_opts / sizeof s_opts[0])

/* The commands: words as typed, synopsis, one line for --help. */
static const struct {
    ctl_cmd_t cmd;
    const char *words;
    const char *synopsis;
    const char *help;
} s_cmds[] = {
    {CTL_CMD_STATUS, "status", "", "broker, sessions, nodes online/offline and their queues"},
    {CTL_CMD_NODES, "nodes", "",
     "every registered node: online, last seen, backlog, oldest queued, in flight, open cases"},
    {CTL_CMD_TOP, "top", "[--interval SECONDS] [--count N]",
     "a live view of the broker and its nodes, refreshed until q or Ctrl-C"},
    {CTL_CMD_CASE_SHOW, "case show", "CASE_ID", "one case: state, parties, deadline, timeline"},
    {CTL_CMD_CASES, "cases", "[--state S] [--kind K] [--overdue] [--limit N]",
     "cases as a table, filtered"},
    {CTL_CMD_DLQ_LIST, "dlq list", "[--limit N]", "dead letters, newest first"},
    {CTL_CMD_DLQ_SHOW, "dlq show", "MESSAGE_ID", "one dead letter and its stored envelope"},
    {CTL_CMD_DLQ_REPLAY, "dlq replay", "MESSAGE_ID | --all", "deliver dead letters again"},
    {CTL_CMD_DLQ_PURGE, "dlq purge", "MESSAGE_ID | --all",
     "delete dead letters (asks nothing: for scripts)"},
    {CTL_CMD_STORE_STATS, "store stats", "",
     "broker.db: file size, pages, free pages, rows by table and state, oldest rows"},
    {CTL_CMD_STORE_PRUNE, "store prune", "",
     "run retention now; prints what was removed and the bytes freed"},
    {CTL_CMD_SEND_REFERRAL, "send referral",
     "--to HOSPITAL (--file F.json | --patient-name N --health-card ID --reason R ...)",
     "an upward referral (opens a case)"},
    {CTL_CMD_SEND, "send", "(as send referral; --file may hold any envelope)",
     "same as send referral"},
    {CTL_CMD_SEND_IMAGING, "send imaging",
     "--to SERVICE (--file consult.json | --patient-name ...) (--dicom FILE... | --dicom-dir D)",
     "an imaging consult and every chunk of its DICOM files"},
    {CTL_CMD_SEND_DOWN_TRANSFER, "send down-transfer",
     "--to CLINIC (--file F.json | --patient-name N --health-card ID --phase P ...)",
     "a rehabilitation down-transfer (opens a case)"},
    {CTL_CMD_SEND_UPDATE, "send update", "--to NODE --case ID --status S [--kind K] ...",
     "a status update of a referral, imaging or down-transfer case"},
    {CTL_CMD_SEND_UPDATE, "send-update", "(as send update)", "same as send update"},
    {CTL_CMD_SEND_REPORT, "send report",
     "--to CLINIC --case ID --study-uid UID --impression T --reader-name N [--findings T] "
     "[--critical]",
     "an imaging report from a reading centre"},
};
#define S_N_CMDS (sizeof s_cmds / sizeof s_cmds[0])

int ctl_fail(int code, const char *fmt, ...)
{
    /* Reasons often quote what a peer sent (a Nack's reason, an id): the
     * line is escaped whole, so that it stays one line of plain text on
     * the operator's terminal (F10). */
    char msg[2048], safe[sizeof msg * 4];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    ml_text_escape(msg, strlen(msg), safe, sizeof safe);
    fprintf(stderr, "medlinkctl: %s\n", safe);
    return code;
}

void ctl_oom(void)
{
    fputs("medlinkctl: out of memory\n", stderr);
    exit(CTL_EXIT_FAIL);
}

int ctl_cli_is_send(ctl_cmd_t cmd)
{
    return (S_SENDS & S_BIT(cmd)) != 0;
}

static const char *s_cmd_words(ctl_cmd_t cmd)
{
    for (size_t i = 0; i < S_N_CMDS; i++)
        if (s_cmds[i].cmd == cmd)
            return s_cmds[i].words;
    return "?";
}

static void s_print_opt(FILE *f, const s_opt_t *op)
{
    char left[80];
    snprintf(left, sizeof left, "--%s%s%s", op->name, op->arg ? " " : "", op->arg ? op->arg : "");
    if (strlen(left) > 26)
        fprintf(f, "  %s\n  %-26s %s\n", left, "", op->help);
    else
        fprintf(f, "  %-26s %s\n", left, op->help);
}

void ctl_cli_usage(FILE *f, ctl_cmd_t cmd)
{
    if (cmd == CTL_CMD_NONE) {
        fprintf(f, "usage: medlinkctl [connection] [--json] [--dry-run] COMMAND [options]\n"
                   "\ncommands:\n");
        for (size_t i = 0; i < S_N_CMDS; i++)
            fprintf(f, "  %-20s %s\n", s_cmds[i].words, s_cmds[i].help);
        fprintf(f, "\nconnection and output (flags override the [ctl] section of --config):\n");
        for (size_t i = 0; i < S_N_OPTS; i++)
            if (s_opts[i].cmds == S_ALL)
                s_print_opt(f, &s_opts[i]);
        fprintf(f, "\n'medlinkctl COMMAND --help' lists a command's options.\n"
                   "exit status: 0 ok, 1 refused or failed (reason on stderr), 2 usage error,\n"
                   "3 TLS refusal that retrying cannot fix (expired or revoked certificate,\n"
                   "unknown CA, broker CN mismatch)\n");
        return;
    }
    for (size_t i = 0; i < S_N_CMDS; i++) {
        if (s_cmds[i].cmd != cmd)
            continue;
        fprintf(f, "usage: medlinkctl [connection] %s %s\n  %s\n", s_cmds[i].words,
                s_cmds[i].synopsis, s_cmds[i].help);
        break;
    }
    int any = 0;
    for (size_t i = 0; i < S_N_OPTS; i++) {
        if (s_opts[i].cmds == S_ALL || !(s_opts[i].cmds & S_BIT(cmd)))
            continue;
        if (!any++)
            fprintf(f, "\noptions:\n");
        s_print_opt(f, &s_opts[i]);
    }
    if (cmd == CTL_CMD_SEND_IMAGING)
        fprintf(f, "  FILE...                    more DICOM files (e.g. --dicom study/*.dcm)\n");
    fprintf(f, "\n'medlinkctl --help' lists the connection options and every command.\n");
}

static void s_list_add(ctl_list_t *l, const char *v)
{
    const char **nv = realloc(l->v, (l->n + 1) * sizeof *nv);
    if (!nv)
        ctl_oom();
    nv[l->n++] = v;
    l->v = nv;
}

/* The command words: argv[*i...]. Returns CTL_EXIT_OK or a usage error. */
static int s_command(ctl_opts_t *o, char **w, int n)
{
    static const struct {
        const char *word;
        ctl_cmd_t cmd;
    } sends[] = {
        {"referral", CTL_CMD_SEND_REFERRAL},
        {"imaging", CTL_CMD_SEND_IMAGING},
        {"down-transfer", CTL_CMD_SEND_DOWN_TRANSFER},
        {"down_transfer", CTL_CMD_SEND_DOWN_TRANSFER},
        {"update", CTL_CMD_SEND_UPDATE},
        {"report", CTL_CMD_SEND_REPORT},
    };
    int used = 1;
    if (n == 0)
        return ctl_fail(CTL_EXIT_USAGE, "no command (try --help)");
    if (strcmp(w[0], "status") == 0) {
        o->cmd = CTL_CMD_STATUS;
    } else if (strcmp(w[0], "nodes") == 0) {
        o->cmd = CTL_CMD_NODES;
    } else if (strcmp(w[0], "top") == 0) {
        o->cmd = CTL_CMD_TOP;
    } else if (strcmp(w[0], "cases") == 0) {
        o->cmd = CTL_CMD_CASES;
    } else if (strcmp(w[0], "send-update") == 0) {
        o->cmd = CTL_CMD_SEND_UPDATE;
    } else if (strcmp(w[0], "case") == 0) {
        if (n < 2 || strcmp(w[1], "show") != 0)
            return ctl_fail(CTL_EXIT_USAGE, "expected: case show CASE_ID");
        o->cmd = CTL_CMD_CASE_SHOW;
        used = 2;
    } else if (strcmp(w[0], "dlq") == 0) {
        const char *sub = n > 1 ? w[1] : "";
        o->cmd = strcmp(sub, "list") == 0     ? CTL_CMD_DLQ_LIST
                 : strcmp(sub, "show") == 0   ? CTL_CMD_DLQ_SHOW
                 : strcmp(sub, "replay") == 0 ? CTL_CMD_DLQ_REPLAY
                 : strcmp(sub, "purge") == 0  ? CTL_CMD_DLQ_PURGE
                                              : CTL_CMD_NONE;
        if (o->cmd == CTL_CMD_NONE)
            return ctl_fail(CTL_EXIT_USAGE, "expected: dlq list|show|replay|purge");
        used = 2;
    } else if (strcmp(w[0], "store") == 0) {
        const char *sub = n > 1 ? w[1] : "";
        o->cmd = strcmp(sub, "stats") == 0   ? CTL_CMD_STORE_STATS
                 : strcmp(sub, "prune") == 0 ? CTL_CMD_STORE_PRUNE
                                             : CTL_CMD_NONE;
        if (o->cmd == CTL_CMD_NONE)
            return ctl_fail(CTL_EXIT_USAGE, "expected: store stats|prune");
        used = 2;
    } else if (strcmp(w[0], "send") == 0) {
        o->cmd = CTL_CMD_SEND;
        for (size_t i = 0; n > 1 && i < sizeof sends / sizeof sends[0]; i++) {
            if (strcmp(w[1], sends[i].word) == 0) {
                o->cmd = sends[i].cmd;
                used = 2;
            }
        }
    } else {
        return ctl_fail(CTL_EXIT_USAGE, "unknown command '%s' (try --help)", w[0]);
    }
    o->cmd_name = s_cmd_words(o->cmd);
    if (o->cmd == CTL_CMD_SEND && strcmp(w[0], "send") == 0)
        o->cmd_name = "send";
    else if (strcmp(w[0], "send-update") == 0)
        o->cmd_name = "send-update";

    if (o->help)
        return CTL_EXIT_OK;

    /* What follows the command words. */
    char **rest = w + used;
    int n_rest = n - used;
    switch (o->cmd) {
    case CTL_CMD_CASE_SHOW:
    case CTL_CMD_DLQ_SHOW:
        if (n_rest != 1)
            return ctl_fail(CTL_EXIT_USAGE, "%s takes one %s", o->cmd_name,
                            o->cmd == CTL_CMD_CASE_SHOW ? "CASE_ID" : "MESSAGE_ID");
        o->arg = rest[0];
        return CTL_EXIT_OK;
    case CTL_CMD_DLQ_REPLAY:
    case CTL_CMD_DLQ_PURGE:
        if (n_rest > 1 || (n_rest == 1) == (o->all != 0))
            return ctl_fail(CTL_EXIT_USAGE, "%s takes one MESSAGE_ID or --all", o->cmd_name);
        o->arg = n_rest ? rest[0] : NULL;
        return CTL_EXIT_OK;
    case CTL_CMD_SEND_IMAGING:
        /* "--dicom study/IM*": the shell gives the files after the first as words. */
        for (int i = 0; i < n_rest; i++)
            s_list_add(&o->dicom, rest[i]);
        return CTL_EXIT_OK;
    default:
        if (n_rest > 0)
            return ctl_fail(CTL_EXIT_USAGE, "%s: unexpected argument '%s'", o->cmd_name, rest[0]);
        return CTL_EXIT_OK;
    }
}

int ctl_cli_parse(int argc, char **argv, ctl_opts_t *o)
{
    struct option lopts[S_N_OPTS + 1];
    char seen[S_N_OPTS] = {0};
    for (size_t i = 0; i < S_N_OPTS; i++) {
        lopts[i].name = s_opts[i].name;
        lopts[i].has_arg = s_opts[i].type == S_FLAG ? no_argument : required_argument;
        lopts[i].flag = NULL;
        lopts[i].val = 256 + (int)i;
    }
    lopts[S_N_OPTS] = (struct option){0}; /* getopt_long's terminator */
    o->timeout_s = 10;
    int c;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "vh", lopts, NULL)) != -1) {
        if (c == 'v') {
            o->verbose = 1;
            continue;
        }
        if (c == 'h') {
            o->help = 1;
            continue;
        }
        if (c < 256 || c >= 256 + (int)S_N_OPTS) {
            if (optopt >= 256 && optopt < 256 + (int)S_N_OPTS)
                return ctl_fail(CTL_EXIT_USAGE, "--%s needs a value", s_opts[optopt - 256].name);
            return ctl_fail(CTL_EXIT_USAGE, "unknown or ambiguous option '%s' (try --help)",
                            argv[optind - 1]);
        }
        const s_opt_t *op = &s_opts[c - 256];
        char *field = (char *)o + op->offset;
        seen[c - 256] = 1;
        if (op->type == S_FLAG)
            *(int *)field = 1;
        else if (op->type == S_STR)
            *(const char **)field = optarg;
        else
            s_list_add((ctl_list_t *)field, optarg);
    }
    if (o->version)
        return CTL_EXIT_OK;
    if (o->help && optind == argc)
        return CTL_EXIT_OK;
    if (o->check_config) {
        /* "--check-config FILE" as well as "--config FILE --check-config";
         * no command is run. */
        if (!o->config && optind == argc - 1)
            o->config = argv[optind++];
        if (optind != argc)
            return ctl_fail(CTL_EXIT_USAGE, "--check-config takes one FILE and no command");
        if (!o->config)
            return ctl_fail(CTL_EXIT_USAGE, "--check-config needs a FILE (or --config FILE)");
        return CTL_EXIT_OK;
    }
    int rc = s_command(o, argv + optind, argc - optind);
    if (o->help)
        return CTL_EXIT_OK;
    if (rc != CTL_EXIT_OK)
        return rc;

    for (size_t i = 0; i < S_N_OPTS; i++) {
        if (!seen[i])
            continue;
        if (!(s_opts[i].cmds & S_BIT(o->cmd)))
            return ctl_fail(CTL_EXIT_USAGE, "--%s does not apply to %s (try %s --help)",
                            s_opts[i].name, o->cmd_name, o->cmd_name);
        if (s_opts[i].payload && !o->payload_flag)
            o->payload_flag = s_opts[i].name;
    }
    if (o->timeout) {
        char *end;
        long t = strtol(o->timeout, &end, 10);
        if (*end || end == o->timeout || t < 1 || t > 86400)
            return ctl_fail(CTL_EXIT_USAGE, "--timeout %s: expected 1..86400 seconds", o->timeout);
        o->timeout_s = (int)t;
    }
    if (o->cmd == CTL_CMD_TOP && o->json)
        return ctl_fail(CTL_EXIT_USAGE, "top has no --json: use status --json or nodes --json");
    o->interval_ms = 1000;
    if (o->interval) {
        char *end;
        double t = strtod(o->interval, &end);
        if (*end || end == o->interval || !(t >= 0.2 && t <= 3600))
            return ctl_fail(CTL_EXIT_USAGE, "--interval %s: expected 0.2..3600 seconds",
                            o->interval);
        o->interval_ms = (int)(t * 1000 + 0.5);
    }
    if (o->count) {
        char *end;
        long n = strtol(o->count, &end, 10);
        if (*end || end == o->count || n < 1 || n > 100000000)
            return ctl_fail(CTL_EXIT_USAGE, "--count %s: expected 1 or more", o->count);
        o->count_n = n;
    }
    if (o->file && o->payload_flag)
        return ctl_fail(CTL_EXIT_USAGE,
                        "--file and --%s do not mix: the file holds the whole message "
                        "(--to, --case, --priority and --deadline may still override it)",
                        o->payload_flag);
    return CTL_EXIT_OK;
}

/* Every key medlinkctl reads from --config (see ml_ini_check): any other key
 * or section is refused with "FILE:LINE: [ctl] KEY: unknown key", so that a
 * misspelt brokr_id does not silently leave the broker unpinned. A new key
 * is one row here, next to ctl_cli_connection, which reads them. */
/* One row per line (clang-format would pack them), so that a key added on
 * another branch merges as one line. */
/* clang-format off */
static const ml_ini_key_t s_schema[] = {
    {"ctl", "node_id"},
    {"ctl", "broker"},
    {"ctl", "broker_id"},
    {"ctl", "ca"},
    {"ctl", "cert"},
    {"ctl", "key"},
    {NULL, NULL},
};
/* clang-format on */

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

int ctl_cli_connection(ctl_opts_t *o)
{
    ml_ini_t *ini = NULL;
    char err[1024];
    int rc = CTL_EXIT_OK;
    if (o->config && (ml_ini_load(o->config, &ini, err, sizeof err) < 0 ||
                      ml_ini_check(ini, s_schema, err, sizeof err) < 0)) {
        ml_check_t problems;
        ml_check_init(&problems);
        ml_check_add_lines(&problems, err);
        ml_check_print(&problems, "medlinkctl", stderr);
        ml_ini_destroy(&ini);
        return CTL_EXIT_USAGE;
    }
    if (s_merge(&o->broker, o->f_broker, ini, "broker", 0) < 0 ||
        s_merge(&o->broker_id, o->f_broker_id, ini, "broker_id", 0) < 0 ||
        s_merge(&o->node, o->f_node, ini, "node_id", 0) < 0 ||
        s_merge(&o->ca, o->f_ca, ini, "ca", 1) < 0 ||
        s_merge(&o->cert, o->f_cert, ini, "cert", 1) < 0 ||
        s_merge(&o->key, o->f_key, ini, "key", 1) < 0)
        ctl_oom();
    /* A dry run never connects: it needs our node id (the envelopes'
     * from), from --node or the certificate, and nothing else. */
    const char *missing = o->dry_run   ? NULL
                          : !o->broker ? "--broker (or broker in [ctl])"
                          : !o->ca     ? "--ca (or ca in [ctl])"
                          : !o->cert   ? "--cert (or cert in [ctl])"
                          : !o->key    ? "--key (or key in [ctl])"
                                       : NULL;
    char why[256];
    if (missing) {
        rc = ctl_fail(CTL_EXIT_USAGE, "missing %s", missing);
    } else if (o->broker && ml_check_endpoint(o->broker, 0, why, sizeof why) < 0) {
        /* Checked before connecting: a bare "127.0.0.1:7400" would only
         * give "Invalid argument" after the timeout. */
        if (o->f_broker)
            rc = ctl_fail(CTL_EXIT_USAGE, "--broker %s: %s", o->broker, why);
        else
            rc = ctl_fail(CTL_EXIT_USAGE, "%s:%d: [ctl] broker = %s: %s", o->config,
                          ml_ini_line(ini, "ctl", "broker"), o->broker, why);
    }
    ml_ini_destroy(&ini);
    return rc;
}

int ctl_cli_check_config(ctl_opts_t *o)
{
    if (ctl_cli_connection(o) != CTL_EXIT_OK)
        return ctl_fail(CTL_EXIT_FAIL, "%s is not valid", o->config);
    ml_check_t problems;
    char prefix[600];
    ml_check_init(&problems);
    snprintf(prefix, sizeof prefix, "%s: [ctl]", o->config);
    ml_tls_config_t tls = {o->ca, o->cert, o->key, NULL, 0};
    ml_tls_check(&tls, prefix, o->node, &problems);
    if (problems.n) {
        ml_check_print(&problems, "medlinkctl", stderr);
        return ctl_fail(CTL_EXIT_FAIL, "%s is not valid (%d problem%s)", o->config, problems.n,
                        problems.n == 1 ? "" : "s");
    }
    printf("medlinkctl: %s is valid\n", o->config);
    return CTL_EXIT_OK;
}

void ctl_cli_close(ctl_opts_t *o)
{
    free(o->broker);
    free(o->broker_id);
    free(o->node);
    free(o->ca);
    free(o->cert);
    free(o->key);
    free(o->diagnosis.v);
    free(o->dicom.v);
    free(o->medication.v);
    free(o->follow_up_days.v);
    memset(o, 0, sizeof *o);
}
