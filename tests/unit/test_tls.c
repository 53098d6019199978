/* Unit tests for the TLS 1.3 memory-BIO sessions (lib/ml_tls.c), with real
 * certificates from deploy/pki.sh. Two sessions talk to each other through
 * a pump that moves ciphertext in pieces, as the ZeroMQ transport would. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "ml_common.h"
#include "ml_tls.h"
#include "support.h"

#define SERVER_ID "medlinkd.test"
#define CLIENT_ID "township.a.clinic"

/* The community CA (dir_a) and an unrelated CA (dir_b) that issued
 * certificates with the very same names. */
static char dir_a[512];
static char dir_b[512];

static void s_make_pki(void)
{
    static const char *const nodes[] = {SERVER_ID, CLIENT_ID, NULL};
    ml_test_tmpdir(dir_a, sizeof dir_a);
    ml_test_tmpdir(dir_b, sizeof dir_b);
    ml_test_pki(dir_a, "medlink test community CA", nodes);
    ml_test_pki(dir_b, "rogue CA", nodes);
}

static void s_remove_pki(void)
{
    ml_test_sh("rm -rf '%s' '%s'", dir_a, dir_b);
}

/* A context trusting ca_dir's CA, with node's certificate from cert_dir. */
static ml_tls_ctx_t *s_ctx(const char *ca_dir, const char *cert_dir, const char *node,
                           int is_server, const char *crl_file)
{
    char ca[600], cert[700], key[700], err[512];
    snprintf(ca, sizeof ca, "%s/ca.crt", ca_dir);
    snprintf(cert, sizeof cert, "%s/%s.crt", cert_dir, node);
    snprintf(key, sizeof key, "%s/%s.key", cert_dir, node);
    ml_tls_config_t cfg = {ca, cert, key, crl_file, is_server};
    ml_tls_ctx_t *ctx = NULL;
    int rc = ml_tls_ctx_new(&cfg, &ctx, err, sizeof err);
    cr_assert_eq(rc, 0, "ml_tls_ctx_new: %s", err);
    cr_assert_not_null(ctx);
    return ctx;
}

typedef struct {
    ml_tls_session_t *c; /* client */
    ml_tls_session_t *s; /* server */
    int rc_c;            /* first failure seen by the client, or 0 */
    int rc_s;            /* first failure seen by the server, or 0 */
} pair_t;

/* Moves all pending ciphertext of from into to, in pieces of at most
 * piece bytes. Returns the first negative feed result, else 0. */
static int s_move(ml_tls_session_t *from, ml_tls_session_t *to, size_t piece, size_t *moved)
{
    static uint8_t buf[65536];
    if (piece > sizeof buf)
        piece = sizeof buf;
    while (ml_tls_session_pending_out(from) > 0) {
        size_t n = ml_tls_session_take_out(from, buf, piece);
        cr_assert_gt(n, 0);
        *moved += n;
        int rc = ml_tls_session_feed(to, buf, n);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Moves bytes both ways until neither side has anything to say. A side that
 * failed still gets its last words (an alert) delivered to the other. */
static void s_pump(pair_t *p, size_t piece)
{
    for (int round = 0; round < 100; round++) {
        size_t moved = 0;
        if (p->rc_s == 0)
            p->rc_s = s_move(p->c, p->s, piece, &moved);
        if (p->rc_c == 0)
            p->rc_c = s_move(p->s, p->c, piece, &moved);
        if (moved == 0)
            return;
    }
    cr_assert_fail("the sessions kept talking for 100 rounds");
}

static void s_pair_start(pair_t *p, ml_tls_ctx_t *client, ml_tls_ctx_t *server)
{
    memset(p, 0, sizeof *p);
    p->c = ml_tls_session_new(client);
    p->s = ml_tls_session_new(server);
    cr_assert_not_null(p->c);
    cr_assert_not_null(p->s);
    cr_assert_eq(ml_tls_session_handshake(p->c), 0, "%s", ml_tls_session_error(p->c));
    cr_assert_gt(ml_tls_session_pending_out(p->c), 0, "no ClientHello");
    s_pump(p, 997); /* an odd piece size splits records anywhere */
}

static void s_pair_end(pair_t *p)
{
    ml_tls_session_destroy(&p->c);
    ml_tls_session_destroy(&p->s);
    cr_assert_null(p->c);
    ml_tls_session_destroy(&p->c); /* safe twice */
}

/* Reads everything available from s into out (up to cap). */
static size_t s_drain(ml_tls_session_t *s, uint8_t *out, size_t cap)
{
    size_t got = 0;
    for (;;) {
        uint8_t buf[7000];
        int n = ml_tls_session_read(s, buf, sizeof buf);
        cr_assert_geq(n, 0, "read: %s", ml_tls_session_error(s));
        if (n == 0)
            return got;
        cr_assert_leq(got + (size_t)n, cap);
        memcpy(out + got, buf, (size_t)n);
        got += (size_t)n;
    }
}

Test(tls, handshake_and_peer_ids)
{
    s_make_pki();
    ml_tls_ctx_t *server = s_ctx(dir_a, dir_a, SERVER_ID, 1, NULL);
    ml_tls_ctx_t *client = s_ctx(dir_a, dir_a, CLIENT_ID, 0, NULL);
    cr_assert_str_eq(ml_tls_ctx_own_id(server), SERVER_ID);
    cr_assert_str_eq(ml_tls_ctx_own_id(client), CLIENT_ID);

    pair_t p;
    memset(&p, 0, sizeof p);
    p.c = ml_tls_session_new(client);
    p.s = ml_tls_session_new(server);
    cr_assert_null(ml_tls_session_peer_id(p.c));
    cr_assert_eq(ml_tls_session_write(p.c, (const uint8_t *)"x", 1), ML_EAGAIN);
    cr_assert_eq(ml_tls_session_handshake(p.s), 0); /* server waits for a hello */
    cr_assert_eq(ml_tls_session_handshake(p.c), 0);
    s_pump(&p, 1); /* byte by byte */

    cr_assert_eq(p.rc_c, 0, "client: %s", ml_tls_session_error(p.c));
    cr_assert_eq(p.rc_s, 0, "server: %s", ml_tls_session_error(p.s));
    cr_assert_eq(ml_tls_session_established(p.c), 1);
    cr_assert_eq(ml_tls_session_established(p.s), 1);
    cr_assert_eq(ml_tls_session_handshake(p.c), 1);
    cr_assert_eq(ml_tls_session_handshake(p.s), 1);
    cr_assert_str_eq(ml_tls_session_peer_id(p.s), CLIENT_ID);
    cr_assert_str_eq(ml_tls_session_peer_id(p.c), SERVER_ID);
    /* Nothing left behind on either side (no session tickets). */
    cr_assert_eq(ml_tls_session_pending_out(p.s), 0);
    cr_assert_eq(ml_tls_session_pending_out(p.c), 0);

    s_pair_end(&p);
    ml_tls_ctx_destroy(&server);
    ml_tls_ctx_destroy(&client);
    cr_assert_null(server);
    ml_tls_ctx_destroy(&client);
    s_remove_pki();
}

Test(tls, application_data_both_ways)
{
    s_make_pki();
    ml_tls_ctx_t *server = s_ctx(dir_a, dir_a, SERVER_ID, 1, NULL);
    ml_tls_ctx_t *client = s_ctx(dir_a, dir_a, CLIENT_ID, 0, NULL);
    pair_t p;
    s_pair_start(&p, client, server);
    cr_assert_eq(ml_tls_session_established(p.s), 1, "%s", ml_tls_session_error(p.s));

    uint8_t small[64];
    cr_assert_eq(ml_tls_session_write(p.c, (const uint8_t *)"ping", 4), 0);
    s_pump(&p, 16384);
    cr_assert_eq(s_drain(p.s, small, sizeof small), 4);
    cr_assert_arr_eq(small, "ping", 4);
    cr_assert_eq(ml_tls_session_write(p.s, (const uint8_t *)"pong!", 5), 0);
    s_pump(&p, 16384);
    cr_assert_eq(s_drain(p.c, small, sizeof small), 5);
    cr_assert_arr_eq(small, "pong!", 5);

    /* 1 MiB each way, written in uneven pieces, moved in uneven pieces, read
     * in pieces smaller than a TLS record. */
    size_t big = 1u << 20;
    uint8_t *src = malloc(big), *dst = malloc(big);
    cr_assert(src && dst);
    for (size_t i = 0; i < big; i++)
        src[i] = (uint8_t)((i * 2654435761u) >> 13);
    for (int dir = 0; dir < 2; dir++) {
        ml_tls_session_t *from = dir == 0 ? p.c : p.s;
        ml_tls_session_t *to = dir == 0 ? p.s : p.c;
        for (size_t off = 0; off < big;) {
            size_t l = big - off < 100003 ? big - off : 100003;
            cr_assert_eq(ml_tls_session_write(from, src + off, l), 0);
            off += l;
        }
        memset(dst, 0, big);
        s_pump(&p, 4099);
        cr_assert_eq(p.rc_c, 0, "%s", ml_tls_session_error(p.c));
        cr_assert_eq(p.rc_s, 0, "%s", ml_tls_session_error(p.s));
        cr_assert_eq(s_drain(to, dst, big), big);
        cr_assert_eq(memcmp(src, dst, big), 0, "payload %d differs", dir);
    }

    /* close_notify reaches the server as ML_ECLOSED, after the data. */
    cr_assert_eq(ml_tls_session_write(p.c, (const uint8_t *)"bye", 3), 0);
    ml_tls_session_close(p.c);
    cr_assert_gt(ml_tls_session_pending_out(p.c), 0);
    s_pump(&p, 16384);
    uint8_t buf[16];
    cr_assert_eq(ml_tls_session_read(p.s, buf, sizeof buf), 3);
    cr_assert_eq(ml_tls_session_read(p.s, buf, sizeof buf), ML_ECLOSED);
    cr_assert_eq(ml_tls_session_read(p.s, buf, sizeof buf), ML_ECLOSED);

    free(src);
    free(dst);
    s_pair_end(&p);
    ml_tls_ctx_destroy(&server);
    ml_tls_ctx_destroy(&client);
    s_remove_pki();
}

Test(tls, close_notify_alone_seen_by_feed)
{
    s_make_pki();
    ml_tls_ctx_t *server = s_ctx(dir_a, dir_a, SERVER_ID, 1, NULL);
    ml_tls_ctx_t *client = s_ctx(dir_a, dir_a, CLIENT_ID, 0, NULL);
    pair_t p;
    s_pair_start(&p, client, server);
    ml_tls_session_close(p.s);
    s_pump(&p, 16384);
    cr_assert_eq(p.rc_c, ML_ECLOSED);
    s_pair_end(&p);
    ml_tls_ctx_destroy(&server);
    ml_tls_ctx_destroy(&client);
    s_remove_pki();
}

Test(tls, client_cert_from_other_ca_refused)
{
    s_make_pki();
    ml_tls_ctx_t *server = s_ctx(dir_a, dir_a, SERVER_ID, 1, NULL);
    /* Trusts the right CA, but presents a certificate of the rogue CA with
     * the right name. */
    ml_tls_ctx_t *client = s_ctx(dir_a, dir_b, CLIENT_ID, 0, NULL);
    pair_t p;
    s_pair_start(&p, client, server);

    cr_assert_eq(p.rc_s, ML_ETLS);
    cr_assert_eq(ml_tls_session_established(p.s), 0);
    cr_assert_null(ml_tls_session_peer_id(p.s));
    const char *serr = ml_tls_session_error(p.s);
    cr_log_info("server error: %s", serr);
    cr_assert(strstr(serr, "certificate verify failed"), "%s", serr);
    cr_assert(strstr(serr, "unable to get local issuer certificate"), "%s", serr);
    /* The client finished its side of the TLS 1.3 handshake, then learned
     * of the refusal from the server's alert. */
    cr_assert_eq(p.rc_c, ML_ETLS);
    cr_assert_eq(ml_tls_session_established(p.c), 0);
    const char *cerr = ml_tls_session_error(p.c);
    cr_log_info("client error: %s", cerr);
    cr_assert(strstr(cerr, "refused our certificate"), "%s", cerr);
    /* The dead sessions stay dead. */
    uint8_t b[8];
    cr_assert_eq(ml_tls_session_feed(p.s, b, 1), ML_ETLS);
    cr_assert_eq(ml_tls_session_read(p.c, b, sizeof b), ML_ETLS);
    cr_assert_eq(ml_tls_session_write(p.c, b, 1), ML_ETLS);

    s_pair_end(&p);
    ml_tls_ctx_destroy(&server);
    ml_tls_ctx_destroy(&client);
    s_remove_pki();
}

Test(tls, server_cert_from_other_ca_refused)
{
    s_make_pki();
    ml_tls_ctx_t *server = s_ctx(dir_a, dir_b, SERVER_ID, 1, NULL);
    ml_tls_ctx_t *client = s_ctx(dir_a, dir_a, CLIENT_ID, 0, NULL);
    pair_t p;
    s_pair_start(&p, client, server);

    cr_assert_eq(p.rc_c, ML_ETLS);
    cr_assert_eq(ml_tls_session_established(p.c), 0);
    cr_assert_null(ml_tls_session_peer_id(p.c));
    const char *cerr = ml_tls_session_error(p.c);
    cr_log_info("client error: %s", cerr);
    cr_assert(strstr(cerr, "certificate verify failed: unable to get local issuer certificate"),
              "%s", cerr);
    cr_assert_eq(ml_tls_session_established(p.s), 0);
    cr_assert_eq(p.rc_s, ML_ETLS, "the server should get the client's alert");
    cr_log_info("server error: %s", ml_tls_session_error(p.s));

    s_pair_end(&p);
    ml_tls_ctx_destroy(&server);
    ml_tls_ctx_destroy(&client);
    s_remove_pki();
}

Test(tls, revoked_client_refused_after_crl_reload)
{
    s_make_pki();
    char crl[600], err[512];
    snprintf(crl, sizeof crl, "%s/crl.pem", dir_a);
    /* The CA starts with an empty CRL: everyone gets in. */
    ml_tls_ctx_t *server = s_ctx(dir_a, dir_a, SERVER_ID, 1, crl);
    ml_tls_ctx_t *client = s_ctx(dir_a, dir_a, CLIENT_ID, 0, NULL);
    pair_t p;
    s_pair_start(&p, client, server);
    cr_assert_eq(p.rc_s, 0, "%s", ml_tls_session_error(p.s));
    cr_assert_eq(ml_tls_session_established(p.s), 1);
    s_pair_end(&p);

    int rc = ml_test_sh("'%s/deploy/pki.sh' --dir '%s' --revoke %s >'%s/revoke.log' 2>&1",
                        ml_test_source_dir(), dir_a, CLIENT_ID, dir_a);
    cr_assert_eq(rc, 0, "pki.sh --revoke failed (see %s/revoke.log)", dir_a);
    cr_assert_eq(ml_tls_ctx_reload_crl(server, crl, err, sizeof err), 0, "%s", err);

    s_pair_start(&p, client, server);
    cr_assert_eq(p.rc_s, ML_ETLS);
    const char *serr = ml_tls_session_error(p.s);
    cr_log_info("server error: %s", serr);
    cr_assert(strstr(serr, "certificate verify failed: certificate revoked"), "%s", serr);
    cr_assert_eq(p.rc_c, ML_ETLS);
    cr_assert(strstr(ml_tls_session_error(p.c), "revoked"), "%s", ml_tls_session_error(p.c));
    s_pair_end(&p);

    /* A CRL of another CA is refused and the current one stays in force. */
    char rogue[600];
    snprintf(rogue, sizeof rogue, "%s/crl.pem", dir_b);
    rc = ml_tls_ctx_reload_crl(server, rogue, err, sizeof err);
    cr_assert_eq(rc, ML_ETLS);
    cr_assert(strstr(err, rogue), "%s", err);
    s_pair_start(&p, client, server);
    cr_assert_eq(p.rc_s, ML_ETLS);
    s_pair_end(&p);

    /* A missing CRL file is a configuration error naming the file. */
    rc = ml_tls_ctx_reload_crl(server, "/nonexistent/crl.pem", err, sizeof err);
    cr_assert_eq(rc, ML_ECONFIG);
    cr_assert(strstr(err, "/nonexistent/crl.pem"), "%s", err);

    /* No CRL at all: revocation is no longer checked. */
    cr_assert_eq(ml_tls_ctx_reload_crl(server, NULL, err, sizeof err), 0, "%s", err);
    s_pair_start(&p, client, server);
    cr_assert_eq(p.rc_s, 0, "%s", ml_tls_session_error(p.s));
    cr_assert_eq(ml_tls_session_established(p.s), 1);
    s_pair_end(&p);

    ml_tls_ctx_destroy(&server);
    ml_tls_ctx_destroy(&client);
    s_remove_pki();
}

/* Expects ml_tls_ctx_new to fail with ML_ECONFIG or ML_ETLS and to name
 * needle (a file) in its error. */
static void s_expect_ctx_error(const char *ca, const char *cert, const char *key, const char *crl,
                               const char *needle)
{
    char err[512] = "";
    ml_tls_config_t cfg = {ca, cert, key, crl, 1};
    ml_tls_ctx_t *ctx = (ml_tls_ctx_t *)1;
    int rc = ml_tls_ctx_new(&cfg, &ctx, err, sizeof err);
    cr_log_info("ctx error: %s (%s)", err, ml_strerror(rc));
    cr_assert(rc == ML_ECONFIG || rc == ML_ETLS, "rc %d: %s", rc, err);
    cr_assert_null(ctx);
    cr_assert(strstr(err, needle), "error '%s' does not name %s", err, needle);
}

Test(tls, ctx_errors_name_the_file)
{
    s_make_pki();
    char ca[600], cert[700], key[700], other_key[700], missing[600], junk[600];
    snprintf(ca, sizeof ca, "%s/ca.crt", dir_a);
    snprintf(cert, sizeof cert, "%s/%s.crt", dir_a, SERVER_ID);
    snprintf(key, sizeof key, "%s/%s.key", dir_a, SERVER_ID);
    snprintf(other_key, sizeof other_key, "%s/%s.key", dir_a, CLIENT_ID);
    snprintf(missing, sizeof missing, "%s/missing.pem", dir_a);
    snprintf(junk, sizeof junk, "%s/junk.pem", dir_a);
    cr_assert_eq(ml_test_sh("echo 'not a PEM file' >'%s'", junk), 0);

    s_expect_ctx_error(missing, cert, key, NULL, missing);
    s_expect_ctx_error(ca, missing, key, NULL, missing);
    s_expect_ctx_error(ca, cert, missing, NULL, missing);
    s_expect_ctx_error(ca, cert, key, missing, missing);
    s_expect_ctx_error(ca, cert, other_key, NULL, other_key);
    s_expect_ctx_error(junk, cert, key, NULL, junk);
    s_expect_ctx_error(ca, junk, key, NULL, junk);
    s_expect_ctx_error(ca, cert, junk, NULL, junk);
    s_expect_ctx_error(ca, cert, key, junk, junk);

    char err[512];
    ml_tls_config_t cfg = {ca, cert, NULL, NULL, 1};
    ml_tls_ctx_t *ctx = NULL;
    cr_assert_eq(ml_tls_ctx_new(&cfg, &ctx, err, sizeof err), ML_ECONFIG);
    cr_assert(strstr(err, "private key"), "%s", err);
    s_remove_pki();
}

Test(tls, garbage_to_server_fails_cleanly)
{
    s_make_pki();
    ml_tls_ctx_t *server = s_ctx(dir_a, dir_a, SERVER_ID, 1, NULL);
    ml_tls_ctx_t *client = s_ctx(dir_a, dir_a, CLIENT_ID, 0, NULL);
    /* Longer than the largest TLS record, so that a header that happens to
     * look valid always comes with its whole (garbage) body. */
    enum { LEN = 70000 };
    static uint8_t junk[LEN];
    srand(12345);
    for (int round = 0; round < 50; round++) {
        for (size_t i = 0; i < LEN; i++)
            junk[i] = (uint8_t)(rand() >> 7);
        if (round == 0)
            memcpy(junk, "GET / HTTP/1.1\r\n\r\n", 18);

        /* Before the handshake. */
        ml_tls_session_t *s = ml_tls_session_new(server);
        cr_assert_eq(ml_tls_session_feed(s, junk, LEN), ML_ETLS, "round %d", round);
        cr_assert_str_neq(ml_tls_session_error(s), "no error");
        cr_assert_eq(ml_tls_session_feed(s, junk, 10), ML_ETLS);
        uint8_t buf[64];
        cr_assert_eq(ml_tls_session_read(s, buf, sizeof buf), ML_ETLS);
        ml_tls_session_destroy(&s);

        /* After the handshake, in the middle of a good stream. */
        if (round % 10 == 0) {
            pair_t p;
            s_pair_start(&p, client, server);
            cr_assert_eq(ml_tls_session_established(p.s), 1);
            int rc = ml_tls_session_feed(p.s, junk, LEN);
            cr_assert_eq(rc, ML_ETLS, "round %d: %d", round, rc);
            cr_log_info("established server error: %s", ml_tls_session_error(p.s));
            s_pair_end(&p);
        }
    }
    ml_tls_ctx_destroy(&server);
    ml_tls_ctx_destroy(&client);
    s_remove_pki();
}
