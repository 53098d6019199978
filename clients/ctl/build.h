/* The messages medlinkctl sends, built from its flags or read from a JSON
 * file: Referral, ImagingConsult (without its objects: study.c adds them),
 * DownTransfer, the three kinds of status update, ImagingReport, and the
 * AdminRequest of the ops commands. Also the parsers of the values people
 * type (times, enum names, case kinds). */
#ifndef CTL_BUILD_H
#define CTL_BUILD_H

#include <stdint.h>

#include "cli.h"
#include "ml_env.h"

/* Builds the message of a send command from --file or from the flags. The
 * envelope-level flags (--to, --case, --priority, --deadline) are applied
 * by ctl_build_finish, not here. On success *out is the caller's (free
 * with ml_env_free). Returns CTL_EXIT_OK, or CTL_EXIT_USAGE / CTL_EXIT_FAIL
 * after saying why on stderr. */
int ctl_build_message(const ctl_opts_t *o, ml_envelope_t **out);

/* Applies --to, --case, --priority and --deadline, fills in what the
 * sender owns (id, from = o->node, created_at, case_id = id for a message
 * that opens a case) and runs ml_env_validate. Returns CTL_EXIT_OK, or
 * CTL_EXIT_USAGE (invalid message) / CTL_EXIT_FAIL after saying why. */
int ctl_build_finish(const ctl_opts_t *o, ml_envelope_t *e);

/* The AdminRequest of an ops command (status, case show, cases, dlq ...)
 * into *req (caller-owned storage; strings borrowed from o). Returns
 * CTL_EXIT_OK or CTL_EXIT_USAGE after saying why. */
int ctl_build_admin(const ctl_opts_t *o, Medlink__V1__AdminRequest *req);

/* Unix milliseconds from "1732700000000", RFC 3339 ("2026-11-23T09:30:00+08:00",
 * "...Z", fractions allowed) or "+DURATION" from now ("+90s", "+30m", "+4h",
 * "+2d"). Returns 0 or ML_EINVAL. */
int ctl_parse_time(const char *s, int64_t *out);

/* "referral" | "imaging" | "down_transfer" ("down-transfer", the CaseKind
 * names "CASE_REFERRAL"... too, any case) -> CaseKind value. Returns 0 or
 * ML_EINVAL. */
int ctl_parse_case_kind(const char *s, int *kind);
/* "referral", "imaging", "down_transfer" for a CaseKind value; "-" else. */
const char *ctl_case_kind_name(int kind);

/* Sets *field to a malloc'd copy of value, freeing a previous non-default
 * string; exits on out-of-memory. */
void ctl_set(char **field, const char *value);
/* calloc + the message's __init; exits on out-of-memory. */
void *ctl_new(size_t size, void (*init)(void *));
#define CTL_NEW(T, fn) ((T *)ctl_new(sizeof(T), (void (*)(void *))(fn)))

#endif
