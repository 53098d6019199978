/* What medlinkctl prints: for people, aligned tables and timelines; with
 * --json, the broker's reply messages rendered by ml_json_encode (every
 * field, defaults included), and for sends the Accepted / Nack outcome.
 * Each function returns the exit code the command ends with. */
#ifndef CTL_PRINT_H
#define CTL_PRINT_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "cli.h"
#include "ml_env.h"
#include "session.h"

/* Once, before anything is printed: LC_CTYPE from the environment (a
 * UTF-8 one; C.UTF-8 when it is not) for display widths, and local human
 * times when o->local_time is set or TZ is set and not empty. */
void ctl_print_init(const ctl_opts_t *o);

/* Terminal columns s takes (wcwidth(3) per character: 2 for a Chinese
 * one), one per byte that is not valid UTF-8. O(length). */
int ctl_text_width(const char *s);
/* Bytes of s that fit in cols terminal columns, cut at a character
 * boundary. O(length). */
size_t ctl_text_fit(const char *s, int cols);

/* One `top` screen of st on f: a header (broker, uptime, sessions, rates
 * per second from the totals' deltas since prev, elapsed_ms ago; prev NULL
 * or of another broker run: "-"), then one line per node. max_lines > 0
 * bounds the lines written, the node rows cut with "... N more". Peer
 * strings are escaped. Returns the lines written. */
int ctl_print_top(FILE *f, const Medlink__V1__BrokerStatus *st,
                  const Medlink__V1__BrokerStatus *prev, int64_t elapsed_ms, int max_lines);

/* The reply of an ops command (o->cmd says which): status, case show,
 * nodes, cases, dlq list/show/replay/purge. A reply with status != 0 is a
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
