/* Expiry of the broker's certificate, CA certificates and CRL (see
 * expiry.h). The dates come from the TLS context, which reads them when it
 * loads the files, so a check costs no file access. */
#include "expiry.h"

#include <stdio.h>

#include "broker_int.h"
#include "config.h"

#define S_DAY_MS (86400LL * 1000)
#define S_HOUR_MS (3600LL * 1000)
#define S_EXPIRY_MAX 16

/* Rounds down, also below zero: 1.5 days ago is -2. */
static int64_t s_days_floor(int64_t ms)
{
    return ms >= 0 ? ms / S_DAY_MS : -((-ms + S_DAY_MS - 1) / S_DAY_MS);
}

size_t ml_bk_expiry_list(const ml_tls_ctx_t *ctx, long warn_days, int64_t now, ml_bk_expiry_t *out,
                         size_t cap)
{
    ml_tls_expiry_t raw[S_EXPIRY_MAX];
    size_t n = ml_tls_ctx_expiry(ctx, raw, S_EXPIRY_MAX);
    if (n > S_EXPIRY_MAX)
        n = S_EXPIRY_MAX;
    for (size_t i = 0; i < n && i < cap; i++) {
        ml_seterr(out[i].what, sizeof out[i].what, "%s", raw[i].what);
        out[i].not_after = raw[i].not_after;
        if (raw[i].not_after == 0) {
            out[i].days_left = 0;
            out[i].state = ML_BK_EXPIRY_OK;
            continue;
        }
        int64_t left = raw[i].not_after - now;
        out[i].days_left = s_days_floor(left);
        out[i].state = left <= 0                               ? ML_BK_EXPIRY_PAST
                       : left <= (int64_t)warn_days * S_DAY_MS ? ML_BK_EXPIRY_SOON
                                                               : ML_BK_EXPIRY_OK;
    }
    return n;
}

int ml_bk_expiry_log(ml_broker_t *b, const char *when)
{
    ml_bk_expiry_t e[S_EXPIRY_MAX];
    int64_t now = ml_now_ms();
    size_t n = ml_bk_expiry_list(b->tls, b->cfg->crl_warn_days, now, e, S_EXPIRY_MAX);
    int logged = 0;
    for (size_t i = 0; i < n && i < S_EXPIRY_MAX; i++) {
        char date[40];
        ml_time_format(e[i].not_after, date, sizeof date);
        if (e[i].state == ML_BK_EXPIRY_PAST) {
            ml_log(ML_LOG_ERROR, "expiry",
                   "%s: %s EXPIRED on %s: every TLS handshake it affects is refused until it "
                   "is renewed (the CRL: deploy/pki.sh --crl, then systemctl reload medlinkd)",
                   when, e[i].what, date);
            logged++;
        } else if (e[i].state == ML_BK_EXPIRY_SOON) {
            ml_log(ML_LOG_WARN, "expiry",
                   "%s: %s expires in %lld day(s), on %s (warning from crl_warn_days = %ld); "
                   "renew it before then",
                   when, e[i].what, (long long)e[i].days_left, date, b->cfg->crl_warn_days);
            logged++;
        }
    }
    b->expiry_logged_at = now;
    b->expiry_checked_at = now;
    return logged;
}

void ml_bk_expiry_tick(ml_broker_t *b)
{
    int64_t now = ml_now_ms();
    if (now - b->expiry_checked_at < S_HOUR_MS)
        return;
    b->expiry_checked_at = now;
    ml_bk_expiry_t e[S_EXPIRY_MAX];
    size_t n = ml_bk_expiry_list(b->tls, b->cfg->crl_warn_days, now, e, S_EXPIRY_MAX);
    int worst = ML_BK_EXPIRY_OK;
    for (size_t i = 0; i < n && i < S_EXPIRY_MAX; i++)
        if (e[i].state > worst)
            worst = e[i].state;
    if (worst == ML_BK_EXPIRY_PAST ||
        (worst == ML_BK_EXPIRY_SOON && now - b->expiry_logged_at >= S_DAY_MS))
        ml_bk_expiry_log(b, worst == ML_BK_EXPIRY_PAST ? "hourly check" : "daily check");
}
