/* medlinkctl's command line: the commands, one table of options that says
 * which command takes which option (and gives --help its text), the parsed
 * request (ctl_opts_t), the connection settings merged from the flags and
 * the [ctl] section of --config, and how a failure is reported: one line on
 * stderr and an exit code (0 ok, 1 refused or failed, 2 usage, 3 TLS
 * refusal that retrying cannot fix). */
#ifndef CTL_CLI_H
#define CTL_CLI_H

#include <stddef.h>
#include <stdio.h>

/* CTL_EXIT_TLS: the TLS session cannot be made and retrying will not help
 * (own certificate expired or revoked, unknown CA, broker CN mismatch). */
enum { CTL_EXIT_OK = 0, CTL_EXIT_FAIL = 1, CTL_EXIT_USAGE = 2, CTL_EXIT_TLS = 3 };

typedef enum {
    CTL_CMD_NONE = 0,
    CTL_CMD_STATUS,
    CTL_CMD_CASE_SHOW,
    CTL_CMD_CASES,
    CTL_CMD_DLQ_LIST,
    CTL_CMD_DLQ_SHOW,
    CTL_CMD_DLQ_REPLAY,
    CTL_CMD_DLQ_PURGE,
    CTL_CMD_SEND, /* bare "send": a referral from flags, any routed envelope from --file */
    CTL_CMD_SEND_REFERRAL,
    CTL_CMD_SEND_IMAGING,
    CTL_CMD_SEND_DOWN_TRANSFER,
    CTL_CMD_SEND_UPDATE, /* also "send-update" */
    CTL_CMD_SEND_REPORT,
    CTL_CMD_STORE_STATS, /* broker.db: sizes, rows by table and state */
    CTL_CMD_STORE_PRUNE, /* run retention now */
    CTL_CMD_NODES,       /* the registry: online, backlog, in flight, open cases */
    CTL_CMD_TOP,         /* a live view, refreshed until q or Ctrl-C */
    CTL_CMD_COUNT
} ctl_cmd_t;

/* A repeatable option's values, in command-line order (v is malloc'd, the
 * strings are argv's). */
typedef struct {
    const char **v;
    size_t n;
} ctl_list_t;

typedef struct {
    /* connection: the flags, then (ctl_cli_connection) the merged values */
    const char *config;
    const char *f_broker, *f_broker_id, *f_node, *f_ca, *f_cert, *f_key;
    char *broker, *broker_id, *node, *ca, *cert, *key; /* malloc'd */
    const char *timeout;
    int timeout_s;
    int json, verbose, dry_run, help, version;
    int local_time;   /* --local-time: human times in local time with their offset */
    int check_config; /* --check-config [FILE]: check the connection settings, no command */

    ctl_cmd_t cmd;
    const char *cmd_name; /* as typed, e.g. "send imaging" */
    const char *arg;      /* case show CASE_ID, dlq show/replay/purge MESSAGE_ID */

    /* cases, dlq */
    const char *state, *kind, *limit;
    int overdue, all;

    /* top */
    const char *interval, *count;
    int interval_ms; /* default 1000 */
    long count_n;    /* 0: until q or Ctrl-C */

    /* every send */
    const char *to, *case_id, *priority, *deadline, *file;
    /* patient and clinicians (referral, imaging, down-transfer) */
    const char *patient_name, *health_card, *sex, *birth_date, *phone, *doctor, *team, *notes;
    ctl_list_t diagnosis; /* --icd10 / --diagnosis CODE[:TEXT] */
    /* referral */
    const char *reason, *linked_case;
    /* imaging */
    ctl_list_t dicom; /* --dicom FILE and the words after "send imaging" */
    const char *dicom_dir, *chunk_size, *modality, *body_part, *question, *accession;
    /* down-transfer */
    const char *phase, *summary, *rehab_plan, *discharged_at;
    ctl_list_t medication, follow_up_days;
    /* update */
    const char *status, *redirect_to, *scheduled_at, *department, *outcome, *follow_up;
    const char *by_name, *by_id, *occurred_at, *objects_received, *bytes_received;
    /* report */
    const char *impression, *findings, *reader_name, *reader_id, *recommendation, *study_uid;
    int critical;

    /* the first option given that fills in the payload (e.g. "--patient-name"):
     * such options do not mix with --file; NULL if none */
    const char *payload_flag;
} ctl_opts_t;

/* Parses argv into o (zeroed by the caller). Returns CTL_EXIT_OK, or
 * CTL_EXIT_USAGE after saying why on stderr. --help and --version set
 * o->help / o->version and return CTL_EXIT_OK; the caller prints. */
int ctl_cli_parse(int argc, char **argv, ctl_opts_t *o);
/* --help text: every command with one line (cmd NONE), or one command's
 * synopsis and options. */
void ctl_cli_usage(FILE *f, ctl_cmd_t cmd);
/* Merges the connection flags with the [ctl] section of --config (paths
 * relative to the file's folder). Returns CTL_EXIT_OK, or CTL_EXIT_USAGE /
 * CTL_EXIT_FAIL after saying why. */
int ctl_cli_connection(ctl_opts_t *o);
/* --check-config: ctl_cli_connection, then every file it names exists and
 * is readable, the key is private (mode 0600 or 0400) and matches the
 * certificate, and the CA loads. Prints each problem on stderr, or
 * "FILE is valid" on stdout. Returns CTL_EXIT_OK or CTL_EXIT_FAIL. */
int ctl_cli_check_config(ctl_opts_t *o);
/* Frees what ctl_cli_parse and ctl_cli_connection allocated. */
void ctl_cli_close(ctl_opts_t *o);

/* 1 for the send commands. */
int ctl_cli_is_send(ctl_cmd_t cmd);

/* "medlinkctl: " + the message on stderr; returns code. */
int ctl_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Out of memory in a command-line tool: say so and exit 1. */
void ctl_oom(void) __attribute__((noreturn));

#endif
