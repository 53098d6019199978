/* medlinkctl: the command line for ops staff and clinicians' scripts. It
 * opens one mutually authenticated channel to the broker, makes one
 * exchange and exits:
 *
 *   status, nodes, case show, cases, dlq list|show|replay|purge, store stats|prune
 *       one ADMIN_REQUEST -> one ADMIN_REPLY (OPS nodes only)
 *   top
 *       a status request every --interval on one kept session (top.c)
 *   send referral|down-transfer|update|report (send, send-update: aliases)
 *       one message -> Accepted | Nack
 *   send imaging
 *       an ImagingConsult, then every chunk of its DICOM files -> all Accepted
 *
 * cli.c parses the command line, build.c and study.c make the messages,
 * session.c talks to the broker, print.c prints. Exit codes: 0 done, 1
 * refused or failed (reason on stderr), 2 usage. --dry-run builds and
 * validates the messages and prints them as JSON without connecting. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "build.h"
#include "cli.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_tls.h"
#include "print.h"
#include "session.h"
#include "study.h"
#include "top.h"

#ifndef ML_VERSION
#define ML_VERSION "0.1.0"
#endif

/* Our node id: --node / node_id, else the certificate's CN; they must
 * agree. A dry run with --node needs no certificate. */
static int s_identity(ctl_opts_t *o, ml_tls_ctx_t **tls)
{
    char err[1024];
    if (o->dry_run && o->node && (!o->ca || !o->cert || !o->key))
        return CTL_EXIT_OK;
    if (!o->ca || !o->cert || !o->key)
        return ctl_fail(CTL_EXIT_USAGE, "missing --%s (or %s in [ctl])",
                        !o->ca     ? "ca"
                        : !o->cert ? "cert"
                                   : "key",
                        !o->ca     ? "ca"
                        : !o->cert ? "cert"
                                   : "key");
    ml_tls_config_t tcfg = {o->ca, o->cert, o->key, NULL, 0};
    if (ml_tls_ctx_new(&tcfg, tls, err, sizeof err) < 0)
        return ctl_fail(CTL_EXIT_FAIL, "%s", err);
    const char *cn = ml_tls_ctx_own_id(*tls);
    if (!o->node) {
        if (!cn)
            return ctl_fail(CTL_EXIT_USAGE, "missing --node (the certificate has no CN)");
        if (!(o->node = strdup(cn)))
            ctl_oom();
    } else if (cn && strcmp(cn, o->node) != 0) {
        return ctl_fail(CTL_EXIT_FAIL, "certificate %s is for %s, not %s", o->cert, cn, o->node);
    }
    return CTL_EXIT_OK;
}

/* The exit status of a session that failed (reason already on stderr). */
static int s_exit_of(int rc)
{
    return rc == ML_ETLS ? CTL_EXIT_TLS : CTL_EXIT_FAIL;
}

static int s_admin(const ctl_opts_t *o, ml_tls_ctx_t *tls)
{
    Medlink__V1__AdminRequest req;
    int rc = ctl_build_admin(o, &req);
    if (rc != CTL_EXIT_OK)
        return rc;
    if (o->dry_run) {
        char id[ML_ULID_LEN + 1];
        ml_ulid_new(id);
        ml_envelope_t env = MEDLINK__V1__ENVELOPE__INIT;
        env.id = id;
        env.from = o->node;
        env.to = o->broker_id ? o->broker_id : "";
        env.kind = MEDLINK__V1__KIND__KIND_ADMIN_REQUEST;
        env.created_at = ml_now_ms();
        env.payload_case = MEDLINK__V1__ENVELOPE__PAYLOAD_ADMIN_REQUEST;
        env.admin_request = &req;
        return ctl_print_envelope(&env);
    }
    ml_envelope_t *reply = NULL;
    ctl_result_t res;
    rc = ctl_session_admin(o, tls, &req, &reply, &res);
    if (rc == ML_EDENIED)
        return ctl_print_refused(o, &res);
    if (rc < 0)
        return s_exit_of(rc);
    rc = ctl_print_admin(o, reply->admin_reply);
    ml_env_free(&reply);
    return rc;
}

/* A source of one message. */
typedef struct {
    ml_envelope_t *env;
    int given;
} s_one_t;

static int s_one_next(void *arg, ml_envelope_t **env)
{
    s_one_t *one = arg;
    if (one->given)
        return 0;
    one->given = 1;
    *env = one->env;
    return 1;
}

static int s_send_one(const ctl_opts_t *o, ml_tls_ctx_t *tls)
{
    ml_envelope_t *e = NULL;
    ctl_result_t res;
    int rc = ctl_build_message(o, &e);
    if (rc == CTL_EXIT_OK)
        rc = ctl_build_finish(o, e);
    if (rc != CTL_EXIT_OK)
        goto out;
    if (o->dry_run) {
        rc = ctl_print_envelope(e);
        goto out;
    }
    s_one_t one = {e, 0};
    ctl_source_t src = {s_one_next, 0, medlink__v1__envelope__get_packed_size(e), &one};
    rc = ctl_session_send(o, tls, &src, &res);
    if (rc == ML_EDENIED)
        rc = ctl_print_refused(o, &res);
    else if (rc < 0)
        rc = s_exit_of(rc);
    else
        rc = ctl_print_accepted(o, e, &res);
out:
    ml_env_free(&e);
    return rc;
}

static int s_study_next(void *arg, ml_envelope_t **env)
{
    return ctl_study_next(arg, env);
}

static int s_send_imaging(const ctl_opts_t *o, ml_tls_ctx_t *tls)
{
    ctl_study_t *st = NULL;
    ctl_result_t res;
    int rc = ctl_study_new(o, &st);
    if (rc != CTL_EXIT_OK)
        return rc;
    const ml_envelope_t *c = ctl_study_consult(st);
    if (o->dry_run) {
        /* Every envelope as it would go, but a chunk's data (base64 of up
         * to 4 MiB each) is left out: its size and SHA-256 say enough. */
        ml_envelope_t *e;
        int n;
        while (rc == CTL_EXIT_OK && (n = ctl_study_next(st, &e)) != 0) {
            if (n < 0) {
                rc = CTL_EXIT_FAIL;
                break;
            }
            if (e->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CHUNK) {
                free(e->imaging_chunk->data.data);
                e->imaging_chunk->data.data = NULL;
                e->imaging_chunk->data.len = 0;
            }
            rc = ctl_print_envelope(e);
        }
        if (rc == CTL_EXIT_OK)
            fprintf(stderr, "medlinkctl: dry run: 1 consult and %llu chunks (data left out)\n",
                    (unsigned long long)ctl_study_chunks(st));
        ctl_study_destroy(&st);
        return rc;
    }
    ctl_source_t src = {s_study_next, 1, ctl_study_max_message(st), st};
    rc = ctl_session_send(o, tls, &src, &res);
    if (rc == 0) {
        rc = ctl_print_imaging(o, c, ctl_study_objects(st), ctl_study_chunks(st),
                               ctl_study_bytes(st), &res);
    } else {
        /* Say how far it got: the case exists once the consult is in. */
        if (res.accepted > 0)
            ctl_fail(CTL_EXIT_FAIL,
                     "case %s: %llu of %llu messages (consult and chunks) were accepted before "
                     "it stopped",
                     c->case_id, (unsigned long long)res.accepted,
                     (unsigned long long)(1 + ctl_study_chunks(st)));
        rc = rc == ML_EDENIED ? ctl_print_refused(o, &res) : s_exit_of(rc);
    }
    ctl_study_destroy(&st);
    return rc;
}

int main(int argc, char **argv)
{
    ctl_opts_t o = {0};
    ml_tls_ctx_t *tls = NULL;
    int rc = ctl_cli_parse(argc, argv, &o);
    if (rc != CTL_EXIT_OK)
        goto out;
    if (o.version) {
        printf("medlinkctl %s\n", ML_VERSION);
        goto out;
    }
    if (o.help) {
        ctl_cli_usage(stdout, o.cmd);
        goto out;
    }
    if (o.check_config) {
        rc = ctl_cli_check_config(&o);
        goto out;
    }
    if ((rc = ctl_cli_connection(&o)) != CTL_EXIT_OK)
        goto out;
    /* Errors only, unless asked: the channel's progress lines would drown
     * the answer. A refused session is logged as an error. */
    ml_log_set_level(o.verbose ? ML_LOG_DEBUG : ML_LOG_ERROR);
    signal(SIGPIPE, SIG_IGN);
    if ((rc = s_identity(&o, &tls)) != CTL_EXIT_OK)
        goto out;
    ctl_print_init(&o);
    if (o.cmd == CTL_CMD_TOP && !o.dry_run)
        rc = ctl_top(&o, tls);
    else if (o.cmd == CTL_CMD_SEND_IMAGING)
        rc = s_send_imaging(&o, tls);
    else if (ctl_cli_is_send(o.cmd))
        rc = s_send_one(&o, tls);
    else
        rc = s_admin(&o, tls);
out:
    ml_tls_ctx_destroy(&tls);
    ctl_cli_close(&o);
    fflush(stdout);
    return rc;
}
