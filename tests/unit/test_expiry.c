/* broker/expiry.c and the dates ml_tls reads: what the broker lists as
 * expiring (its certificate, the CA, the CRL), whole days rounded down,
 * and the window of crl_warn_days, judged at chosen instants so that no
 * test waits for the clock. */
#include <stdio.h>
#include <string.h>

#include <criterion/criterion.h>

#include "expiry.h"
#include "ml_common.h"
#include "ml_tls.h"
#include "support.h"

#define S_DAY (86400LL * 1000)

static char s_dir[512];

static ml_tls_ctx_t *s_ctx(int with_crl, int crl_days)
{
    const char *nodes[] = {"medlinkd.unit", NULL};
    ml_test_tmpdir(s_dir, sizeof s_dir);
    ml_test_pki(s_dir, "unit CA", nodes);
    if (with_crl)
        cr_assert_eq(ml_test_sh("'%s/deploy/pki.sh' --dir '%s' --crl --crl-days %d >/dev/null",
                                ml_test_source_dir(), s_dir, crl_days),
                     0);
    char ca[600], cert[600], key[600], crl[600], err[512];
    snprintf(ca, sizeof ca, "%s/ca.crt", s_dir);
    snprintf(cert, sizeof cert, "%s/medlinkd.unit.crt", s_dir);
    snprintf(key, sizeof key, "%s/medlinkd.unit.key", s_dir);
    snprintf(crl, sizeof crl, "%s/crl.pem", s_dir);
    ml_tls_config_t cfg = {ca, cert, key, with_crl ? crl : NULL, 1};
    ml_tls_ctx_t *ctx = NULL;
    cr_assert_eq(ml_tls_ctx_new(&cfg, &ctx, err, sizeof err), 0, "%s", err);
    return ctx;
}

Test(expiry, lists_certificate_ca_and_crl_with_days_rounded_down)
{
    ml_tls_ctx_t *ctx = s_ctx(1, 3);
    int64_t now = ml_now_ms();
    ml_bk_expiry_t e[8];
    size_t n = ml_bk_expiry_list(ctx, 7, now, e, 8);
    cr_assert_eq(n, 3, "certificate, CA, CRL: got %zu", n);
    cr_assert(strstr(e[0].what, "certificate") && strstr(e[0].what, "medlinkd.unit"), "%s",
              e[0].what);
    cr_assert(strstr(e[1].what, "CA certificate") && strstr(e[1].what, "unit CA"), "%s", e[1].what);
    cr_assert(strstr(e[2].what, "CRL") && strstr(e[2].what, "crl.pem"), "%s", e[2].what);
    /* pki.sh: a node certificate for 365 days, the CA for 3650, the CRL 3. */
    /* (365 only if no millisecond passed since pki.sh signed it.) */
    cr_assert(e[0].days_left == 364 || e[0].days_left == 365, "%lld", (long long)e[0].days_left);
    cr_assert_eq(e[0].state, ML_BK_EXPIRY_OK);
    cr_assert_geq(e[1].days_left, 3649);
    cr_assert_eq(e[1].state, ML_BK_EXPIRY_OK);
    cr_assert(e[2].days_left == 2 || e[2].days_left == 3, "2 days and some hours: %lld",
              (long long)e[2].days_left);
    cr_assert_eq(e[2].state, ML_BK_EXPIRY_SOON);

    /* With a 2-day window the CRL is not yet a warning; 3 days on it is
     * past, and a day and a half past counts as -2. */
    ml_bk_expiry_list(ctx, 2, now, e, 8);
    cr_assert_eq(e[2].state, ML_BK_EXPIRY_OK);
    ml_bk_expiry_list(ctx, 7, e[2].not_after, e, 8);
    cr_assert_eq(e[2].state, ML_BK_EXPIRY_PAST, "at nextUpdate the CRL has expired");
    ml_bk_expiry_list(ctx, 7, e[2].not_after + S_DAY + S_DAY / 2, e, 8);
    cr_assert_eq(e[2].days_left, -2);
    /* A year on, the certificate is inside its window too. */
    ml_bk_expiry_list(ctx, 7, e[0].not_after - 3 * S_DAY, e, 8);
    cr_assert_eq(e[0].state, ML_BK_EXPIRY_SOON);
    cr_assert_eq(e[0].days_left, 3);
    /* cap bounds what is written, not the count. */
    cr_assert_eq(ml_bk_expiry_list(ctx, 7, now, e, 1), 3);
    ml_tls_ctx_destroy(&ctx);
    ml_test_sh("rm -rf '%s'", s_dir);
}

Test(expiry, no_crl_entry_without_a_crl)
{
    ml_tls_ctx_t *ctx = s_ctx(0, 0);
    ml_bk_expiry_t e[8];
    cr_assert_eq(ml_bk_expiry_list(ctx, 7, ml_now_ms(), e, 8), 2);
    cr_assert_eq(ml_tls_ctx_own_not_after(ctx), e[0].not_after);
    ml_tls_ctx_destroy(&ctx);
    ml_test_sh("rm -rf '%s'", s_dir);
}

Test(expiry, fail_kinds_name_the_reason)
{
    cr_assert_str_eq(ml_tls_fail_name(ML_TLS_FAIL_PEER_EXPIRED), "expired");
    cr_assert_str_eq(ml_tls_fail_name(ML_TLS_FAIL_PEER_REVOKED), "revoked");
    cr_assert_str_eq(ml_tls_fail_name(ML_TLS_FAIL_PEER_UNKNOWN_CA), "unknown CA");
    cr_assert_str_eq(ml_tls_fail_name(ML_TLS_FAIL_CRL_EXPIRED), "CRL expired");
    cr_assert_not(ml_tls_fail_permanent(ML_TLS_FAIL_NONE));
    cr_assert_not(ml_tls_fail_permanent(ML_TLS_FAIL_OTHER));
    cr_assert(ml_tls_fail_permanent(ML_TLS_FAIL_REFUSED_EXPIRED));
    cr_assert(ml_tls_fail_permanent(ML_TLS_FAIL_PEER_UNKNOWN_CA));
}
