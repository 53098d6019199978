/* TLS 1.3 with mutual authentication over memory BIOs (OpenSSL 3). The
 * session never sees a socket: ciphertext from the peer is written into the
 * read BIO, ciphertext for the peer accumulates in the write BIO, and every
 * SSL_ERROR_WANT_* is reported as "nothing yet" so that the event loop
 * simply comes back when more bytes arrive (nginx does the same).
 *
 * The verification store (CA certificates plus an optional CRL) is kept
 * apart from the SSL_CTX's own store with SSL_CTX_set1_verify_cert_store,
 * so that a CRL reload can swap in a whole new store: sessions created
 * afterwards take the new one, sessions already running keep a reference
 * to the old one. The CA certificates are parsed once and kept in memory
 * for those rebuilds.
 *
 * A TLS 1.3 quirk worth knowing: the client's handshake completes when it
 * has sent its certificate and Finished, before the server has looked at
 * that certificate. A client the server refuses therefore sees
 * ml_tls_session_handshake return 1 and learns of the refusal only when the
 * server's alert arrives (the next ml_tls_session_feed or _read returns
 * ML_ETLS, with a hint that the peer refused our certificate). The server,
 * on the other hand, fails its handshake at once with ML_ETLS and an error
 * naming the X509 verification failure; its alert is then in pending_out
 * and is worth sending before the session is dropped. */
#include "ml_tls.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include "ml_check.h"
#include "ml_common.h"

#define ML_TLS_ID_MAX 256

struct ml_tls_ctx {
    SSL_CTX *ssl_ctx;
    STACK_OF(X509) * cas;  /* trust anchors, kept to rebuild the store */
    char *ca_file;         /* for error messages */
    char *cert_file;       /* for the expiry list */
    char *crl_file;        /* the CRL in force, NULL for none */
    int64_t own_not_after; /* Unix ms */
    int64_t crl_next;      /* Unix ms: earliest nextUpdate of the CRL in force, 0 if none */
    int is_server;
    char own_id[ML_TLS_ID_MAX];
};

struct ml_tls_session {
    SSL *ssl;
    BIO *rbio; /* owned by ssl: ciphertext from the peer */
    BIO *wbio; /* owned by ssl: ciphertext for the peer */
    int is_server;
    int established;
    int failed;      /* a fatal error happened; only take_out still works */
    int peer_closed; /* close_notify received */
    ml_tls_fail_t fail;
    char peer_id[ML_TLS_ID_MAX];
    char seen_cn[ML_TLS_ID_MAX]; /* CN the peer presented, verified or not */
    char err[512];
};

/* Writes the reason of the oldest queued OpenSSL error (the root cause; the
 * later ones are usually "PEM lib" and the like) and empties the queue. */
static void s_openssl_reason(char *buf, size_t len)
{
    unsigned long e = ERR_get_error();
    if (e == 0) {
        snprintf(buf, len, "unknown OpenSSL error");
    } else {
        const char *r = ERR_reason_error_string(e);
        if (r)
            snprintf(buf, len, "%s", r);
        else
            ERR_error_string_n(e, buf, len);
    }
    ERR_clear_error();
}

/* Never prompt for a pass phrase on the terminal: a daemon has none, and an
 * encrypted key should fail with a clear error instead of hanging. */
static int s_no_password_cb(char *buf, int size, int rwflag, void *arg)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)arg;
    return 0;
}

/* Checks that path is set and readable, so that a missing file is reported
 * as a configuration error with the operating system's reason. */
static int s_check_file(const char *path, const char *what, char *err, size_t errlen)
{
    if (!path || !*path) {
        ml_seterr(err, errlen, "TLS configuration: no %s given", what);
        return ML_ECONFIG;
    }
    FILE *f = fopen(path, "r");
    if (!f) {
        ml_seterr(err, errlen, "cannot read %s %s: %s", what, path, strerror(errno));
        return ML_ECONFIG;
    }
    fclose(f);
    return 0;
}

/* Copies the single subject CN of cert into out as UTF-8. Refuses a missing
 * or repeated CN, and control characters or NULs, since the CN is the peer's
 * identity and ends up in logs and the store. */
static int s_subject_cn(X509 *cert, char *out, size_t len)
{
    X509_NAME *name = X509_get_subject_name(cert);
    int idx = name ? X509_NAME_get_index_by_NID(name, NID_commonName, -1) : -1;
    if (idx < 0)
        return ML_ENOTFOUND;
    if (X509_NAME_get_index_by_NID(name, NID_commonName, idx) >= 0)
        return ML_EINVAL;
    ASN1_STRING *data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(name, idx));
    unsigned char *utf8 = NULL;
    int n = ASN1_STRING_to_UTF8(&utf8, data);
    if (n <= 0 || (size_t)n >= len) {
        OPENSSL_free(utf8);
        return ML_EINVAL;
    }
    for (int i = 0; i < n; i++) {
        if (utf8[i] < 0x20 || utf8[i] == 0x7f) {
            OPENSSL_free(utf8);
            return ML_EINVAL;
        }
    }
    memcpy(out, utf8, (size_t)n);
    out[n] = '\0';
    OPENSSL_free(utf8);
    return 0;
}

/* An ASN1 time as Unix ms. ASN1_TIME_diff against "now" avoids timegm,
 * which C11 does not have; a second of skew does not matter here. */
static int64_t s_asn1_ms(const ASN1_TIME *t)
{
    int days = 0, secs = 0;
    if (!t || !ASN1_TIME_diff(&days, &secs, NULL, t))
        return 0;
    /* ASN1_TIME_diff counts from time(NULL): whole seconds. */
    return (ml_now_ms() / 1000 + (int64_t)days * 86400 + secs) * 1000;
}

/* Reads every PEM certificate (want_crls == 0) or CRL (want_crls == 1) of
 * path into a new stack. */
static int s_read_pem(const char *path, int want_crls, STACK_OF(X509) * *certs,
                      STACK_OF(X509_CRL) * *crls, char *err, size_t errlen)
{
    int rc = ML_ETLS;
    BIO *bio = NULL;
    STACK_OF(X509_INFO) *infos = NULL;
    char why[256];

    bio = BIO_new_file(path, "r");
    if (!bio) {
        s_openssl_reason(why, sizeof why);
        ml_seterr(err, errlen, "cannot open %s: %s", path, why);
        rc = ML_ECONFIG;
        goto out;
    }
    infos = PEM_X509_INFO_read_bio(bio, NULL, s_no_password_cb, NULL);
    if (!infos) {
        s_openssl_reason(why, sizeof why);
        ml_seterr(err, errlen, "cannot parse %s: %s", path, why);
        goto out;
    }
    if (want_crls)
        *crls = sk_X509_CRL_new_null();
    else
        *certs = sk_X509_new_null();
    if (want_crls ? !*crls : !*certs) {
        rc = ML_ENOMEM;
        ml_seterr(err, errlen, "out of memory reading %s", path);
        goto out;
    }
    for (int i = 0; i < sk_X509_INFO_num(infos); i++) {
        X509_INFO *info = sk_X509_INFO_value(infos, i);
        /* Move each object out of the info so that freeing the infos
         * leaves it alone. */
        if (!want_crls && info->x509) {
            if (!sk_X509_push(*certs, info->x509)) {
                rc = ML_ENOMEM;
                goto out;
            }
            info->x509 = NULL;
        } else if (want_crls && info->crl) {
            if (!sk_X509_CRL_push(*crls, info->crl)) {
                rc = ML_ENOMEM;
                goto out;
            }
            info->crl = NULL;
        }
    }
    if (want_crls ? sk_X509_CRL_num(*crls) == 0 : sk_X509_num(*certs) == 0) {
        ml_seterr(err, errlen, "%s contains no %s", path, want_crls ? "CRL" : "PEM certificate");
        goto out;
    }
    rc = 0;
out:
    if (rc < 0) {
        if (rc == ML_ENOMEM)
            ml_seterr(err, errlen, "out of memory reading %s", path);
        if (certs && *certs) {
            sk_X509_pop_free(*certs, X509_free);
            *certs = NULL;
        }
        if (crls && *crls) {
            sk_X509_CRL_pop_free(*crls, X509_CRL_free);
            *crls = NULL;
        }
    }
    sk_X509_INFO_pop_free(infos, X509_INFO_free);
    BIO_free(bio);
    ERR_clear_error();
    return rc;
}

/* Checks that crl was signed by one of the CAs and is current. A CRL that
 * fails here would make every handshake fail later ("unable to get
 * certificate CRL", "CRL has expired"), which is much harder to diagnose
 * than refusing the file now. */
static int s_check_crl(STACK_OF(X509) * cas, const char *ca_file, X509_CRL *crl, const char *path,
                       int allow_expired, char *err, size_t errlen)
{
    int signed_ok = 0;
    for (int i = 0; i < sk_X509_num(cas) && !signed_ok; i++) {
        X509 *ca = sk_X509_value(cas, i);
        if (X509_NAME_cmp(X509_get_subject_name(ca), X509_CRL_get_issuer(crl)) != 0)
            continue;
        EVP_PKEY *pub = X509_get0_pubkey(ca);
        signed_ok = pub && X509_CRL_verify(crl, pub) == 1;
    }
    ERR_clear_error();
    if (!signed_ok) {
        ml_seterr(err, errlen, "CRL file %s is not signed by a CA of %s", path, ca_file);
        return ML_ETLS;
    }
    const ASN1_TIME *next = X509_CRL_get0_nextUpdate(crl);
    if (!allow_expired && next && X509_cmp_current_time(next) <= 0) {
        ml_seterr(err, errlen, "CRL file %s has expired (past its next update); issue a new one",
                  path);
        return ML_ETLS;
    }
    if (X509_cmp_current_time(X509_CRL_get0_lastUpdate(crl)) > 0) {
        ml_seterr(err, errlen, "CRL file %s is not valid yet (check the clock)", path);
        return ML_ETLS;
    }
    return 0;
}

/* Builds a verification store from the CA certificates and, when crl_file
 * is set, the CRLs in it with revocation checks for the whole chain.
 * *crl_next gets the earliest nextUpdate (0 without one). allow_expired
 * takes a CRL past its nextUpdate (at start-up: see ml_tls_ctx_new). */
static int s_build_store(STACK_OF(X509) * cas, const char *ca_file, const char *crl_file,
                         int allow_expired, X509_STORE **out, int64_t *crl_next, char *err,
                         size_t errlen)
{
    int rc = ML_ENOMEM;
    X509_STORE *store = NULL;
    STACK_OF(X509_CRL) *crls = NULL;

    *crl_next = 0;
    store = X509_STORE_new();
    if (!store) {
        ml_seterr(err, errlen, "out of memory building the TLS verification store");
        goto out;
    }
    for (int i = 0; i < sk_X509_num(cas); i++) {
        if (!X509_STORE_add_cert(store, sk_X509_value(cas, i))) {
            ml_seterr(err, errlen, "out of memory building the TLS verification store");
            goto out;
        }
    }
    if (crl_file && *crl_file) {
        rc = s_check_file(crl_file, "CRL file", err, errlen);
        if (rc < 0)
            goto out;
        rc = s_read_pem(crl_file, 1, NULL, &crls, err, errlen);
        if (rc < 0)
            goto out;
        for (int i = 0; i < sk_X509_CRL_num(crls); i++) {
            X509_CRL *crl = sk_X509_CRL_value(crls, i);
            rc = s_check_crl(cas, ca_file, crl, crl_file, allow_expired, err, errlen);
            if (rc < 0)
                goto out;
            int64_t next = s_asn1_ms(X509_CRL_get0_nextUpdate(crl));
            if (next && (!*crl_next || next < *crl_next))
                *crl_next = next;
            if (!X509_STORE_add_crl(store, crl)) {
                rc = ML_ENOMEM;
                ml_seterr(err, errlen, "out of memory loading CRL file %s", crl_file);
                goto out;
            }
        }
        /* CRL_CHECK_ALL: every certificate in the chain, not only the
         * leaf, needs a current CRL from its issuer. */
        X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL);
    }
    *out = store;
    store = NULL;
    rc = 0;
out:
    sk_X509_CRL_pop_free(crls, X509_CRL_free);
    X509_STORE_free(store);
    ERR_clear_error();
    return rc;
}

/* Loads the private key itself (rather than SSL_CTX_use_PrivateKey_file) so
 * that a key that does not belong to the certificate gets its own clear
 * error instead of OpenSSL silently dropping the certificate. */
static int s_load_key(const char *path, EVP_PKEY **out, char *err, size_t errlen)
{
    /* The key is read from the fd whose mode was checked (F12): a private
     * key that group or others can read is refused at start, as store keys
     * are, rather than used. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        ml_seterr(err, errlen, "cannot open private key file %s: %s", path, strerror(errno));
        return ML_ECONFIG;
    }
    if (ml_check_private_fd(fd, path, "private key file", err, errlen) != 0) {
        close(fd);
        return ML_ECONFIG;
    }
    FILE *fp = fdopen(fd, "r");
    BIO *bio = fp ? BIO_new_fp(fp, BIO_CLOSE) : NULL;
    if (!bio) {
        ml_seterr(err, errlen, "cannot read private key file %s: out of memory", path);
        if (fp)
            fclose(fp);
        else
            close(fd);
        return ML_ENOMEM;
    }
    *out = PEM_read_bio_PrivateKey(bio, NULL, s_no_password_cb, NULL);
    BIO_free(bio);
    if (!*out) {
        char why[256];
        s_openssl_reason(why, sizeof why);
        ml_seterr(err, errlen,
                  "cannot load private key file %s: %s (expected an unencrypted PEM key)", path,
                  why);
        return ML_ETLS;
    }
    return 0;
}

/* Notes the CN of the certificate the peer presents, before the verdict,
 * so that a refusal can say whose certificate it refused. The verdict
 * itself is OpenSSL's (ok is passed through). Called for every
 * certificate of the chain; the leaf is X509_STORE_CTX_get0_cert. */
static int s_verify_cb(int ok, X509_STORE_CTX *vc)
{
    SSL *ssl = X509_STORE_CTX_get_ex_data(vc, SSL_get_ex_data_X509_STORE_CTX_idx());
    ml_tls_session_t *s = ssl ? SSL_get_app_data(ssl) : NULL;
    X509 *leaf = X509_STORE_CTX_get0_cert(vc);
    if (s && !s->seen_cn[0] && leaf && s_subject_cn(leaf, s->seen_cn, sizeof s->seen_cn) < 0)
        s->seen_cn[0] = '\0';
    return ok;
}

int ml_tls_ctx_new(const ml_tls_config_t *cfg, ml_tls_ctx_t **out, char *err, size_t errlen)
{
    int rc = ML_ETLS;
    ml_tls_ctx_t *ctx = NULL;
    X509 *cert = NULL; /* borrowed from the SSL_CTX */
    EVP_PKEY *key = NULL;
    X509_STORE *store = NULL;
    char why[256];

    if (out)
        *out = NULL;
    ml_seterr(err, errlen, "no error");
    if (!cfg || !out) {
        ml_seterr(err, errlen, "TLS configuration missing");
        return ML_EINVAL;
    }
    if ((rc = s_check_file(cfg->ca_file, "CA file", err, errlen)) < 0 ||
        (rc = s_check_file(cfg->cert_file, "certificate file", err, errlen)) < 0 ||
        (rc = s_check_file(cfg->key_file, "private key file", err, errlen)) < 0)
        goto out;
    ERR_clear_error();

    rc = ML_ENOMEM;
    ctx = calloc(1, sizeof *ctx);
    if (!ctx || !(ctx->ca_file = strdup(cfg->ca_file)) ||
        !(ctx->cert_file = strdup(cfg->cert_file)) ||
        (cfg->crl_file && *cfg->crl_file && !(ctx->crl_file = strdup(cfg->crl_file)))) {
        ml_seterr(err, errlen, "out of memory creating the TLS context");
        goto out;
    }
    ctx->is_server = cfg->is_server ? 1 : 0;
    ctx->ssl_ctx = SSL_CTX_new(ctx->is_server ? TLS_server_method() : TLS_client_method());
    if (!ctx->ssl_ctx) {
        s_openssl_reason(why, sizeof why);
        ml_seterr(err, errlen, "cannot create the TLS context: %s", why);
        rc = ML_ETLS;
        goto out;
    }
    rc = ML_ETLS;
    if (!SSL_CTX_set_min_proto_version(ctx->ssl_ctx, TLS1_3_VERSION) ||
        !SSL_CTX_set_max_proto_version(ctx->ssl_ctx, TLS1_3_VERSION)) {
        s_openssl_reason(why, sizeof why);
        ml_seterr(err, errlen, "cannot restrict the TLS context to TLS 1.3: %s", why);
        goto out;
    }

    rc = s_read_pem(cfg->ca_file, 0, &ctx->cas, NULL, err, errlen);
    if (rc < 0)
        goto out;

    rc = ML_ETLS;
    if (SSL_CTX_use_certificate_chain_file(ctx->ssl_ctx, cfg->cert_file) != 1) {
        s_openssl_reason(why, sizeof why);
        ml_seterr(err, errlen, "cannot load certificate file %s: %s", cfg->cert_file, why);
        goto out;
    }
    cert = SSL_CTX_get0_certificate(ctx->ssl_ctx);
    ctx->own_not_after = s_asn1_ms(X509_get0_notAfter(cert));
    rc = s_load_key(cfg->key_file, &key, err, errlen);
    if (rc < 0)
        goto out;
    rc = ML_ETLS;
    if (X509_check_private_key(cert, key) != 1) {
        ERR_clear_error();
        ml_seterr(err, errlen, "private key file %s does not match certificate file %s",
                  cfg->key_file, cfg->cert_file);
        goto out;
    }
    if (SSL_CTX_use_PrivateKey(ctx->ssl_ctx, key) != 1 ||
        SSL_CTX_check_private_key(ctx->ssl_ctx) != 1) {
        s_openssl_reason(why, sizeof why);
        ml_seterr(err, errlen, "cannot use private key file %s: %s", cfg->key_file, why);
        goto out;
    }
    if (s_subject_cn(cert, ctx->own_id, sizeof ctx->own_id) < 0) {
        ml_seterr(err, errlen, "certificate file %s has no usable subject CN (the node id)",
                  cfg->cert_file);
        rc = ML_ECONFIG;
        goto out;
    }

    /* A CRL past its nextUpdate is taken at start-up: every peer is then
     * refused ("CRL expired", fail-closed), but the daemon runs, says so
     * loudly, and a reload with a fresh CRL restores service without a
     * restart (docs/security.md). A reload never installs one. */
    rc = s_build_store(ctx->cas, ctx->ca_file, cfg->crl_file, 1, &store, &ctx->crl_next, err,
                       errlen);
    if (rc < 0)
        goto out;
    rc = ML_ETLS;
    if (!SSL_CTX_set1_verify_cert_store(ctx->ssl_ctx, store)) {
        s_openssl_reason(why, sizeof why);
        ml_seterr(err, errlen, "cannot install the TLS verification store: %s", why);
        goto out;
    }
    /* Mutual authentication is the point: a peer without a certificate is
     * refused outright, on both sides. */
    SSL_CTX_set_verify(ctx->ssl_ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
                       s_verify_cb);

    if (ctx->is_server) {
        /* No resumption: every connection proves its certificate afresh
         * (and is checked against the current CRL), and no ticket keys need
         * rotating. With zero tickets TLS 1.3 sends no NewSessionTicket. */
        SSL_CTX_set_num_tickets(ctx->ssl_ctx, 0);
        SSL_CTX_set_options(ctx->ssl_ctx, SSL_OP_NO_TICKET);
        SSL_CTX_set_session_cache_mode(ctx->ssl_ctx, SSL_SESS_CACHE_OFF);
        /* Tell clients which CAs we accept (certificate_authorities). */
        for (int i = 0; i < sk_X509_num(ctx->cas); i++)
            SSL_CTX_add_client_CA(ctx->ssl_ctx, sk_X509_value(ctx->cas, i));
    }

    *out = ctx;
    ctx = NULL;
    ml_seterr(err, errlen, "no error");
    rc = 0;
out:
    X509_STORE_free(store);
    EVP_PKEY_free(key);
    ml_tls_ctx_destroy(&ctx);
    ERR_clear_error();
    return rc;
}

void ml_tls_ctx_destroy(ml_tls_ctx_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    ml_tls_ctx_t *ctx = *self_p;
    SSL_CTX_free(ctx->ssl_ctx);
    sk_X509_pop_free(ctx->cas, X509_free);
    free(ctx->ca_file);
    free(ctx->cert_file);
    free(ctx->crl_file);
    free(ctx);
    *self_p = NULL;
}

const char *ml_tls_ctx_own_id(const ml_tls_ctx_t *ctx)
{
    return ctx->own_id;
}

int64_t ml_tls_ctx_own_not_after(const ml_tls_ctx_t *ctx)
{
    return ctx->own_not_after;
}

size_t ml_tls_ctx_expiry(const ml_tls_ctx_t *ctx, ml_tls_expiry_t *out, size_t cap)
{
    size_t n = 0;
    if (n < cap) {
        snprintf(out[n].what, sizeof out[n].what, "certificate %s (CN %s)", ctx->cert_file,
                 ctx->own_id);
        out[n].not_after = ctx->own_not_after;
    }
    n++;
    for (int i = 0; i < sk_X509_num(ctx->cas); i++, n++) {
        if (n >= cap)
            continue;
        X509 *ca = sk_X509_value(ctx->cas, i);
        char cn[ML_TLS_ID_MAX];
        if (s_subject_cn(ca, cn, sizeof cn) < 0)
            snprintf(cn, sizeof cn, "?");
        snprintf(out[n].what, sizeof out[n].what, "CA certificate %s (CN %s)", ctx->ca_file, cn);
        out[n].not_after = s_asn1_ms(X509_get0_notAfter(ca));
    }
    if (ctx->crl_file) {
        if (n < cap) {
            snprintf(out[n].what, sizeof out[n].what, "CRL %s (next update)", ctx->crl_file);
            out[n].not_after = ctx->crl_next;
        }
        n++;
    }
    ERR_clear_error();
    return n;
}

int ml_tls_ctx_reload_crl(ml_tls_ctx_t *ctx, const char *crl_file, char *err, size_t errlen)
{
    int rc;
    X509_STORE *store = NULL;
    char why[256];
    int64_t next = 0;
    char *path = NULL;

    ml_seterr(err, errlen, "no error");
    rc = s_build_store(ctx->cas, ctx->ca_file, crl_file, 0, &store, &next, err, errlen);
    if (rc < 0)
        goto out;
    if (crl_file && *crl_file && !(path = strdup(crl_file))) {
        ml_seterr(err, errlen, "out of memory loading CRL file %s", crl_file);
        rc = ML_ENOMEM;
        goto out;
    }
    if (!SSL_CTX_set1_verify_cert_store(ctx->ssl_ctx, store)) {
        s_openssl_reason(why, sizeof why);
        ml_seterr(err, errlen, "cannot install the CRL from %s: %s", crl_file, why);
        rc = ML_ETLS;
        goto out;
    }
    free(ctx->crl_file);
    ctx->crl_file = path;
    path = NULL;
    ctx->crl_next = next;
    rc = 0;
out:
    free(path);
    X509_STORE_free(store); /* the context holds its own reference */
    ERR_clear_error();
    return rc;
}

int ml_tls_session_recheck(const ml_tls_session_t *s, ml_tls_ctx_t *ctx, char *err, size_t errlen)
{
    int rc = ML_ETLS;
    X509_STORE_CTX *vc = NULL;
    X509 *peer = s && s->established ? SSL_get0_peer_certificate(s->ssl) : NULL;
    if (!peer) {
        ml_seterr(err, errlen, "no verified peer certificate");
        return ML_EINVAL;
    }
    /* The store the context uses for new sessions now (after a CRL
     * reload it is the verify store; before one, the context's own). */
    X509_STORE *verify_store = NULL;
    if (SSL_CTX_get0_verify_cert_store(ctx->ssl_ctx, &verify_store) != 1 || !verify_store)
        verify_store = SSL_CTX_get_cert_store(ctx->ssl_ctx);
    vc = X509_STORE_CTX_new();
    if (!vc || !X509_STORE_CTX_init(vc, verify_store, peer, SSL_get_peer_cert_chain(s->ssl))) {
        ml_seterr(err, errlen, "out of memory checking the peer certificate");
        rc = ML_ENOMEM;
        goto out;
    }
    X509_STORE_CTX_set_purpose(vc,
                               s->is_server ? X509_PURPOSE_SSL_CLIENT : X509_PURPOSE_SSL_SERVER);
    if (X509_verify_cert(vc) == 1) {
        rc = 0;
        goto out;
    }
    ml_seterr(err, errlen, "certificate of %s no longer verifies: %s", s->peer_id,
              X509_verify_cert_error_string(X509_STORE_CTX_get_error(vc)));
out:
    X509_STORE_CTX_free(vc);
    ERR_clear_error();
    return rc;
}

ml_tls_session_t *ml_tls_session_new(ml_tls_ctx_t *ctx)
{
    ml_tls_session_t *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    snprintf(s->err, sizeof s->err, "no error");
    s->is_server = ctx->is_server;
    s->ssl = SSL_new(ctx->ssl_ctx);
    s->rbio = BIO_new(BIO_s_mem());
    s->wbio = BIO_new(BIO_s_mem());
    if (!s->ssl || !s->rbio || !s->wbio) {
        BIO_free(s->rbio);
        BIO_free(s->wbio);
        SSL_free(s->ssl);
        free(s);
        ERR_clear_error();
        return NULL;
    }
    /* The verify callback finds the session through the SSL. */
    SSL_set_app_data(s->ssl, s);
    /* An empty read BIO means "more later", not end of stream. */
    BIO_set_mem_eof_return(s->rbio, -1);
    SSL_set_bio(s->ssl, s->rbio, s->wbio);
    if (s->is_server)
        SSL_set_accept_state(s->ssl);
    else
        SSL_set_connect_state(s->ssl);
    return s;
}

void ml_tls_session_destroy(ml_tls_session_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    SSL_free((*self_p)->ssl); /* frees both BIOs */
    free(*self_p);
    *self_p = NULL;
}

/* 1 if reason is an alert the peer sends when it refuses our certificate. */
static int s_is_cert_alert(int reason)
{
    switch (reason) {
    case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
    case SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN:
    case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
    case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
        return 1;
    default:
        return 0;
    }
}

/* The failure kind of an X509 verification error of the peer's chain. */
static ml_tls_fail_t s_fail_of_verify(long vr)
{
    switch (vr) {
    case X509_V_ERR_CERT_HAS_EXPIRED:
    case X509_V_ERR_CERT_NOT_YET_VALID:
        return ML_TLS_FAIL_PEER_EXPIRED;
    case X509_V_ERR_CERT_REVOKED:
        return ML_TLS_FAIL_PEER_REVOKED;
    case X509_V_ERR_CRL_HAS_EXPIRED:
        return ML_TLS_FAIL_CRL_EXPIRED;
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT:
    case X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
    case X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
    case X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
    case X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
    case X509_V_ERR_CERT_UNTRUSTED:
    case X509_V_ERR_CERT_SIGNATURE_FAILURE:
        return ML_TLS_FAIL_PEER_UNKNOWN_CA;
    default:
        return ML_TLS_FAIL_PEER_BAD;
    }
}

/* The failure kind of an alert the peer sent about our certificate. */
static ml_tls_fail_t s_fail_of_alert(int reason)
{
    switch (reason) {
    case SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED:
        return ML_TLS_FAIL_REFUSED_EXPIRED;
    case SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED:
        return ML_TLS_FAIL_REFUSED_REVOKED;
    case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
        return ML_TLS_FAIL_REFUSED_UNKNOWN_CA;
    default:
        return ML_TLS_FAIL_REFUSED_OTHER;
    }
}

const char *ml_tls_fail_name(ml_tls_fail_t f)
{
    switch (f) {
    case ML_TLS_FAIL_NONE:
        return "no failure";
    case ML_TLS_FAIL_OTHER:
        return "TLS error";
    case ML_TLS_FAIL_PEER_EXPIRED:
        return "expired";
    case ML_TLS_FAIL_PEER_REVOKED:
        return "revoked";
    case ML_TLS_FAIL_PEER_UNKNOWN_CA:
        return "unknown CA";
    case ML_TLS_FAIL_PEER_BAD:
        return "certificate not accepted";
    case ML_TLS_FAIL_CRL_EXPIRED:
        return "CRL expired";
    case ML_TLS_FAIL_NO_PEER_CERT:
        return "no certificate";
    case ML_TLS_FAIL_REFUSED_EXPIRED:
        return "our certificate refused as expired";
    case ML_TLS_FAIL_REFUSED_REVOKED:
        return "our certificate refused as revoked";
    case ML_TLS_FAIL_REFUSED_UNKNOWN_CA:
        return "our certificate refused: unknown CA";
    case ML_TLS_FAIL_REFUSED_OTHER:
        return "our certificate refused";
    }
    return "TLS error";
}

int ml_tls_fail_permanent(ml_tls_fail_t f)
{
    return f != ML_TLS_FAIL_NONE && f != ML_TLS_FAIL_OTHER;
}

/* Records the failure behind ssl_err as a sentence, marks the session dead
 * and returns ML_ETLS. Must run before anything else touches the OpenSSL
 * error queue. */
static int s_fail(ml_tls_session_t *s, int ssl_err)
{
    const char *what = s->established ? "TLS session failed" : "TLS handshake failed";
    s->failed = 1;
    if (ssl_err == SSL_ERROR_SSL) {
        unsigned long e = ERR_peek_error();
        char why[256];
        s_openssl_reason(why, sizeof why);
        long vr = SSL_get_verify_result(s->ssl);
        s->fail = ML_TLS_FAIL_OTHER;
        if (ERR_GET_LIB(e) == ERR_LIB_SSL && ERR_GET_REASON(e) == SSL_R_CERTIFICATE_VERIFY_FAILED &&
            vr != X509_V_OK) {
            /* The X509 reason says what was wrong with the peer's chain. */
            s->fail = s_fail_of_verify(vr);
            snprintf(s->err, sizeof s->err, "%s: %s: %s", what, why,
                     X509_verify_cert_error_string(vr));
        } else if (ERR_GET_LIB(e) == ERR_LIB_SSL && s_is_cert_alert(ERR_GET_REASON(e))) {
            s->fail = s_fail_of_alert(ERR_GET_REASON(e));
            snprintf(s->err, sizeof s->err, "%s: %s (the peer refused our certificate)", what, why);
        } else if (ERR_GET_LIB(e) == ERR_LIB_SSL &&
                   ERR_GET_REASON(e) == SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE) {
            s->fail = ML_TLS_FAIL_NO_PEER_CERT;
            snprintf(s->err, sizeof s->err, "%s: %s", what, why);
        } else {
            snprintf(s->err, sizeof s->err, "%s: %s", what, why);
        }
    } else if (ssl_err == SSL_ERROR_SYSCALL) {
        s->fail = ML_TLS_FAIL_OTHER;
        /* Memory BIOs make no system calls; this means OpenSSL gave up
         * without queueing a reason, e.g. out of memory. */
        snprintf(s->err, sizeof s->err, "%s: internal error (out of memory?)", what);
    } else {
        s->fail = ML_TLS_FAIL_OTHER;
        snprintf(s->err, sizeof s->err, "%s: unexpected OpenSSL state %d", what, ssl_err);
    }
    ERR_clear_error();
    return ML_ETLS;
}

/* The handshake has just finished: record who the peer is. With
 * SSL_VERIFY_PEER the chain has been verified by now; checking the result
 * again costs nothing and guards against a misconfigured context. */
static int s_on_established(ml_tls_session_t *s)
{
    long vr = SSL_get_verify_result(s->ssl);
    X509 *peer = SSL_get0_peer_certificate(s->ssl);
    s->failed = 1;
    if (vr != X509_V_OK) {
        s->fail = s_fail_of_verify(vr);
        snprintf(s->err, sizeof s->err, "TLS handshake failed: certificate verify failed: %s",
                 X509_verify_cert_error_string(vr));
        return ML_ETLS;
    }
    if (!peer) {
        s->fail = ML_TLS_FAIL_NO_PEER_CERT;
        snprintf(s->err, sizeof s->err, "TLS handshake failed: the peer sent no certificate");
        return ML_ETLS;
    }
    if (s_subject_cn(peer, s->peer_id, sizeof s->peer_id) < 0) {
        s->fail = ML_TLS_FAIL_PEER_BAD;
        s->peer_id[0] = '\0';
        snprintf(s->err, sizeof s->err,
                 "TLS handshake failed: the peer certificate has no usable subject CN");
        return ML_ETLS;
    }
    s->failed = 0;
    s->established = 1;
    return 1;
}

int ml_tls_session_handshake(ml_tls_session_t *s)
{
    if (s->failed)
        return ML_ETLS;
    if (s->established)
        return 1;
    ERR_clear_error();
    int r = SSL_do_handshake(s->ssl);
    if (r == 1)
        return s_on_established(s);
    int e = SSL_get_error(s->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return 0;
    return s_fail(s, e);
}

int ml_tls_session_established(const ml_tls_session_t *s)
{
    return s->established && !s->failed;
}

/* After the handshake: lets OpenSSL process the records fed so far, so that
 * alerts, close_notify and post-handshake messages take effect now rather
 * than at the next read. SSL_peek decrypts application data but leaves it
 * for ml_tls_session_read. */
static int s_process_records(ml_tls_session_t *s)
{
    uint8_t byte;
    size_t n;
    ERR_clear_error();
    if (SSL_peek_ex(s->ssl, &byte, 1, &n))
        return 0;
    int e = SSL_get_error(s->ssl, 0);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return 0;
    if (e == SSL_ERROR_ZERO_RETURN) {
        s->peer_closed = 1;
        snprintf(s->err, sizeof s->err, "TLS session closed by the peer");
        return ML_ECLOSED;
    }
    return s_fail(s, e);
}

int ml_tls_session_feed(ml_tls_session_t *s, const uint8_t *data, size_t len)
{
    if (s->failed)
        return ML_ETLS;
    if (s->peer_closed)
        return ML_ECLOSED;
    while (len > 0) {
        int chunk = len > INT_MAX ? INT_MAX : (int)len;
        int n = BIO_write(s->rbio, data, chunk);
        if (n <= 0) {
            s->failed = 1;
            s->fail = ML_TLS_FAIL_OTHER;
            snprintf(s->err, sizeof s->err, "TLS input could not be buffered (out of memory)");
            ERR_clear_error();
            return ML_ETLS;
        }
        data += n;
        len -= (size_t)n;
    }
    if (!s->established) {
        int rc = ml_tls_session_handshake(s);
        if (rc <= 0)
            return rc;
    }
    return s_process_records(s);
}

int ml_tls_session_write(ml_tls_session_t *s, const uint8_t *data, size_t len)
{
    if (s->failed)
        return ML_ETLS;
    if (!s->established)
        return ML_EAGAIN;
    while (len > 0) {
        size_t chunk = len > INT_MAX ? INT_MAX : len;
        size_t n = 0;
        ERR_clear_error();
        /* The write BIO grows as needed, so SSL_write_ex never has to wait:
         * any failure, WANT_* included, is final. */
        if (!SSL_write_ex(s->ssl, data, chunk, &n))
            return s_fail(s, SSL_get_error(s->ssl, 0));
        data += n;
        len -= n;
    }
    return 0;
}

int ml_tls_session_read(ml_tls_session_t *s, uint8_t *buf, size_t cap)
{
    if (s->failed)
        return ML_ETLS;
    if (s->peer_closed)
        return ML_ECLOSED;
    if (!s->established || cap == 0)
        return 0;
    if (cap > INT_MAX)
        cap = INT_MAX;
    size_t n = 0;
    ERR_clear_error();
    if (SSL_read_ex(s->ssl, buf, cap, &n))
        return (int)n;
    int e = SSL_get_error(s->ssl, 0);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return 0;
    if (e == SSL_ERROR_ZERO_RETURN) {
        s->peer_closed = 1;
        snprintf(s->err, sizeof s->err, "TLS session closed by the peer");
        return ML_ECLOSED;
    }
    return s_fail(s, e);
}

size_t ml_tls_session_pending_out(const ml_tls_session_t *s)
{
    return BIO_ctrl_pending(s->wbio);
}

size_t ml_tls_session_take_out(ml_tls_session_t *s, uint8_t *buf, size_t cap)
{
    if (cap > INT_MAX)
        cap = INT_MAX;
    if (cap == 0)
        return 0;
    int n = BIO_read(s->wbio, buf, (int)cap);
    return n > 0 ? (size_t)n : 0;
}

void ml_tls_session_close(ml_tls_session_t *s)
{
    /* Before the handshake there is no protected channel to close; the
     * caller just drops the session. */
    if (s->failed || !s->established)
        return;
    ERR_clear_error();
    /* Returns 0 ("sent ours, theirs not seen yet"), which is all we want:
     * close_notify is now in the write BIO. */
    (void)SSL_shutdown(s->ssl);
    ERR_clear_error();
}

const char *ml_tls_session_peer_id(const ml_tls_session_t *s)
{
    return s->established && s->peer_id[0] ? s->peer_id : NULL;
}

ml_tls_fail_t ml_tls_session_fail_kind(const ml_tls_session_t *s)
{
    return s->failed ? s->fail : ML_TLS_FAIL_NONE;
}

const char *ml_tls_session_peer_cn(const ml_tls_session_t *s)
{
    return s->established && s->peer_id[0] ? s->peer_id : s->seen_cn;
}

const char *ml_tls_session_error(const ml_tls_session_t *s)
{
    return s->err;
}

int ml_tls_check(const ml_tls_config_t *cfg, const char *prefix, const char *node_id, ml_check_t *c)
{
    char what[256], err[1024];
    int bad = 0;
    snprintf(what, sizeof what, "%s ca", prefix);
    bad |= ml_check_file(c, what, cfg->ca_file, ML_CHECK_READABLE);
    snprintf(what, sizeof what, "%s cert", prefix);
    bad |= ml_check_file(c, what, cfg->cert_file, ML_CHECK_READABLE);
    snprintf(what, sizeof what, "%s key", prefix);
    bad |= ml_check_file(c, what, cfg->key_file, ML_CHECK_PRIVATE);
    if (cfg->crl_file && *cfg->crl_file) {
        snprintf(what, sizeof what, "%s crl", prefix);
        bad |= ml_check_file(c, what, cfg->crl_file, ML_CHECK_READABLE);
    }
    if (bad)
        return ML_ECONFIG;
    /* Every file is there: now what only OpenSSL can tell (the CA parses,
     * the key matches the certificate, the CRL is the CA's and current),
     * by building the very context the program would run with. */
    ml_tls_ctx_t *ctx = NULL;
    int rc = ml_tls_ctx_new(cfg, &ctx, err, sizeof err);
    if (rc < 0) {
        ml_check_add(c, "%s: %s", prefix, err);
        return ML_ECONFIG;
    }
    const char *cn = ml_tls_ctx_own_id(ctx);
    if (node_id && cn && strcmp(cn, node_id) != 0) {
        ml_check_add(c, "%s node_id = %s, but certificate %s is for %s", prefix, node_id,
                     cfg->cert_file, cn);
        rc = ML_ECONFIG;
    }
    ml_tls_ctx_destroy(&ctx);
    return rc < 0 ? ML_ECONFIG : 0;
}
