/* The clock, as medlinkd sees it: what it depends on that expires (its own
 * certificate, the CA certificates, the CRL's nextUpdate), how far off each
 * is, and the warnings it gives from crl_warn_days before. A CRL past its
 * nextUpdate makes every handshake fail ("CRL expired", fail-closed, see
 * docs/security.md), a county-wide outage on a timer, so it must never come
 * as a surprise: the broker says so in its log at start, on reload, daily
 * while inside the window (hourly once something has expired), and in
 * `medlinkctl status`. Loop thread only. */
#ifndef ML_BK_EXPIRY_H
#define ML_BK_EXPIRY_H

#include <stddef.h>
#include <stdint.h>

#include "ml_tls.h"

typedef struct ml_broker ml_broker_t;

enum { ML_BK_EXPIRY_OK = 0, ML_BK_EXPIRY_SOON = 1, ML_BK_EXPIRY_PAST = 2 };

typedef struct {
    char what[400];    /* "CRL pki/crl.pem (next update)", "certificate ...", ... */
    int64_t not_after; /* Unix ms, 0 when it never expires (a CRL without nextUpdate) */
    int64_t days_left; /* whole days left, rounded down; negative once past */
    int state;         /* ML_BK_EXPIRY_* */
} ml_bk_expiry_t;

/* Lists what ctx depends on that expires, as of now (Unix ms), judged
 * against warn_days. Writes up to cap entries and returns how many there
 * are. O(CAs). */
size_t ml_bk_expiry_list(const ml_tls_ctx_t *ctx, long warn_days, int64_t now, ml_bk_expiry_t *out,
                         size_t cap);
/* Logs a WARN line for each entry inside the window and an ERROR line for
 * each one past (when: "at start", "after reload", "daily check"). Returns
 * how many lines it logged. */
int ml_bk_expiry_log(ml_broker_t *b, const char *when);
/* From the housekeeping timer: checks once an hour, logs daily while
 * something is inside the window and hourly once something is past. */
void ml_bk_expiry_tick(ml_broker_t *b);

#endif
