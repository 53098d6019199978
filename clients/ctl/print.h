/* What medlinkctl prints: for people, aligned tables and timelines; with
 * --json, the broker's reply messages rendered by ml_json_encode (every
 * field, defaults included), and for sends the Accepted / Nack outcome.
 * Each function returns the exit code the command ends with. */
#ifndef CTL_PRINT_H
#define CTL_PRINT_H

#include <stdint.h>

#include "cli.h"
#include "ml_env.h"
#include "session.h"

/* The reply of an ops command (o->cmd says which): status, case show,
 * cases, dlq list/show/replay/purge. A reply with status != 0 is a
 * refusal: its error on stderr, exit 1. */
int ctl_print_admin(const ctl_opts_t *o, const Medlink__V1__AdminReply *rep);

/* A message the broker Accepted (res->first_duplicate: it had it
 * already). */
int ctl_print_accepted(const ctl_opts_t *o, const ml_envelope_t *msg, const ctl_result_t *res);

/* An imaging consult and its chunks, all Accepted: the case id and the
 * totals. */
int ctl_print_imaging(const ctl_opts_t *o, const ml_envelope_t *consult, uint32_t objects,
                      uint64_t chunks, uint64_t bytes, const ctl_result_t *res);

/* A Nack that refused a send or a request: the code and reason on stderr
 * (and as JSON on stdout with --json); exit 1. */
int ctl_print_refused(const ctl_opts_t *o, const ctl_result_t *res);

/* --dry-run: env as proto3 JSON on stdout. Returns CTL_EXIT_OK or
 * CTL_EXIT_FAIL. */
int ctl_print_envelope(const ml_envelope_t *env);

#endif
