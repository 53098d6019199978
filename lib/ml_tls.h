/* One TLS 1.3 session over memory BIOs, so that the TLS byte stream can ride
 * on ZeroMQ frames (libzmq has no TLS of its own). The caller moves bytes:
 * what arrives from the peer goes in with ml_tls_session_feed, what must go
 * to the peer comes out with ml_tls_session_take_out. Nothing here blocks or
 * touches a socket; SSL_ERROR_WANT_* simply means "more bytes later".
 *
 * Both sides authenticate: the peer chain must verify against the configured
 * CA (and CRL when one is configured), and the peer's identity is the
 * subject CN of its leaf certificate. Single-threaded per session; a context
 * may be shared by sessions on the same thread. */
#ifndef ML_TLS_H
#define ML_TLS_H

#include <stddef.h>
#include <stdint.h>

#include "ml_check.h"

typedef struct ml_tls_ctx ml_tls_ctx_t;
typedef struct ml_tls_session ml_tls_session_t;

typedef struct {
    const char *ca_file;   /* PEM CA bundle that peers must chain to */
    const char *cert_file; /* PEM certificate (chain) of this node */
    const char *key_file;  /* PEM private key of this node */
    const char *crl_file;  /* optional PEM CRL; NULL or "" for none */
    int is_server;         /* 1 for the broker, 0 for clients */
} ml_tls_config_t;

/* Builds a TLS 1.3-only context with mandatory peer verification. On error
 * returns ML_ETLS or ML_ECONFIG and writes a sentence naming the file and
 * the OpenSSL reason into err. */
int ml_tls_ctx_new(const ml_tls_config_t *cfg, ml_tls_ctx_t **out, char *err, size_t errlen);
void ml_tls_ctx_destroy(ml_tls_ctx_t **self_p);
/* The CN of this context's own certificate (borrowed). */
const char *ml_tls_ctx_own_id(const ml_tls_ctx_t *ctx);
/* Replaces the CRL that peers are checked against (crl_file NULL or "" turns
 * CRL checking off). The CA certificates loaded by ml_tls_ctx_new are kept.
 * Applies to sessions created afterwards; existing sessions keep the store
 * they started with. The CRL must be signed by one of the CAs and not be
 * past its next update. On error the previous CRL stays in force, and
 * ML_ECONFIG (file unreadable) or ML_ETLS (unparsable, wrong issuer,
 * expired) comes back with a sentence naming the file in err. Meant for
 * SIGHUP; loop thread only. */
int ml_tls_ctx_reload_crl(ml_tls_ctx_t *ctx, const char *crl_file, char *err, size_t errlen);

/* One dated thing a context depends on: its own certificate, a CA
 * certificate, or the CRL. */
typedef struct {
    char what[400];    /* e.g. "CRL pki/crl.pem (next update)" */
    int64_t not_after; /* Unix ms: notAfter, or the CRL's nextUpdate; 0 if it has none */
} ml_tls_expiry_t;

/* Lists what expires: this node's certificate, each CA certificate, and the
 * CRL in force (its earliest nextUpdate), in that order. Writes up to cap
 * entries into out and returns how many there are (may be more than cap).
 * O(CAs). */
size_t ml_tls_ctx_expiry(const ml_tls_ctx_t *ctx, ml_tls_expiry_t *out, size_t cap);
/* notAfter of this context's own certificate, in Unix ms. */
int64_t ml_tls_ctx_own_not_after(const ml_tls_ctx_t *ctx);

/* Why a handshake failed, as far as it matters for what to do next. The
 * PEER_ kinds are this side's verdict on the peer's certificate; the
 * REFUSED_ kinds are the peer's verdict on ours, learnt from its alert. */
typedef enum {
    ML_TLS_FAIL_NONE = 0,           /* no failure */
    ML_TLS_FAIL_OTHER,              /* protocol or internal: retrying may help */
    ML_TLS_FAIL_PEER_EXPIRED,       /* the peer's certificate expired (or is not yet valid) */
    ML_TLS_FAIL_PEER_REVOKED,       /* the peer's certificate is on our CRL */
    ML_TLS_FAIL_PEER_UNKNOWN_CA,    /* the peer's chain does not lead to our CA */
    ML_TLS_FAIL_PEER_BAD,           /* another verification failure of the peer's chain */
    ML_TLS_FAIL_CRL_EXPIRED,        /* our CRL is past its nextUpdate: every peer fails */
    ML_TLS_FAIL_NO_PEER_CERT,       /* the peer sent no certificate */
    ML_TLS_FAIL_REFUSED_EXPIRED,    /* the peer says our certificate expired */
    ML_TLS_FAIL_REFUSED_REVOKED,    /* the peer says our certificate is revoked */
    ML_TLS_FAIL_REFUSED_UNKNOWN_CA, /* the peer does not know our CA */
    ML_TLS_FAIL_REFUSED_OTHER,      /* the peer refused our certificate otherwise */
} ml_tls_fail_t;

/* A short name for logs: "expired", "revoked", "unknown CA", "CRL
 * expired", ... (static, never NULL). */
const char *ml_tls_fail_name(ml_tls_fail_t f);
/* 1 when retrying the same handshake cannot help before an operator acts
 * (a certificate or CRL matter), 0 for NONE and OTHER. */
int ml_tls_fail_permanent(ml_tls_fail_t f);

/* For --check-config: checks that the CA, certificate and CRL files of cfg
 * exist and are readable and that the private key file is private
 * (ml_check_file), then, if they all are, builds the context (the CA loads,
 * the key matches the certificate: X509_check_private_key, the CRL is
 * current) and destroys it again; with node_id, the certificate's CN must
 * be node_id. Each problem is added to c, each line starting with prefix
 * (e.g. "medlinkd.ini: [broker]"). Returns 0 or ML_ECONFIG. */
int ml_tls_check(const ml_tls_config_t *cfg, const char *prefix, const char *node_id,
                 ml_check_t *c);

/* Creates a session (server or client, as the context says). The server's
 * identity is checked by its certificate chain and CN (see
 * ml_tls_session_peer_id), not by a host name. Returns NULL on allocation
 * failure. */
ml_tls_session_t *ml_tls_session_new(ml_tls_ctx_t *ctx);
void ml_tls_session_destroy(ml_tls_session_t **self_p);

/* Feeds ciphertext received from the peer and advances the handshake.
 * Returns 0, or ML_ETLS when the handshake or a record fails (the reason is
 * in ml_tls_session_error; the session is dead), or ML_ECLOSED when the peer
 * sent close_notify. */
int ml_tls_session_feed(ml_tls_session_t *s, const uint8_t *data, size_t len);
/* Starts (client) or continues the handshake without new input. Returns 1
 * when established, 0 while in progress, ML_ETLS on failure. */
int ml_tls_session_handshake(ml_tls_session_t *s);
int ml_tls_session_established(const ml_tls_session_t *s);

/* Encrypts plaintext for the peer. Only after the handshake. Returns 0,
 * ML_EAGAIN before establishment, or ML_ETLS. */
int ml_tls_session_write(ml_tls_session_t *s, const uint8_t *data, size_t len);
/* Decrypts buffered plaintext into buf. Returns bytes (>0), 0 when nothing
 * is available now, ML_ECLOSED on close_notify, ML_ETLS on failure. Keep
 * calling until it returns 0: OpenSSL may hold plaintext that no new input
 * will announce. */
int ml_tls_session_read(ml_tls_session_t *s, uint8_t *buf, size_t cap);

/* Ciphertext waiting to go to the peer. */
size_t ml_tls_session_pending_out(const ml_tls_session_t *s);
/* Moves up to cap bytes of ciphertext into buf; returns the count (>= 0). */
size_t ml_tls_session_take_out(ml_tls_session_t *s, uint8_t *buf, size_t cap);
/* Sends close_notify (its bytes then appear in pending_out). */
void ml_tls_session_close(ml_tls_session_t *s);

/* After the handshake: the peer certificate's subject CN (borrowed), or
 * NULL. */
const char *ml_tls_session_peer_id(const ml_tls_session_t *s);
/* Checks the established peer's certificate chain again against ctx as it
 * is now (after ml_tls_ctx_reload_crl), as a new handshake would. Returns
 * 0 when it still verifies, ML_ETLS with err saying why ("certificate of
 * X no longer verifies: certificate revoked"), ML_EINVAL without a
 * verified peer, ML_ENOMEM. Meant for SIGHUP: closing the live sessions of
 * revoked nodes. */
int ml_tls_session_recheck(const ml_tls_session_t *s, ml_tls_ctx_t *ctx, char *err, size_t errlen);
/* The kind of the last failure (ML_TLS_FAIL_NONE while all is well). */
ml_tls_fail_t ml_tls_session_fail_kind(const ml_tls_session_t *s);
/* The subject CN of the certificate the peer presented, whether or not it
 * verified (borrowed; "" when the peer sent none or its CN is unusable).
 * For logs only: an unverified CN proves nothing. */
const char *ml_tls_session_peer_cn(const ml_tls_session_t *s);
/* The last failure as a sentence (borrowed, never NULL). */
const char *ml_tls_session_error(const ml_tls_session_t *s);

#endif
