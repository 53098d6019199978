/* ml_crypt: sealing round trips (empty to 1 MiB), the associated data
 * binding, every single-byte change of a sealed value refused, rotation
 * (old keys open, unknown keys are named), a value sealed by an independent
 * AES-GCM implementation (Python's cryptography) opened here, key file
 * parsing and its errors, and generate_file. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include "ml_common.h"
#include "ml_crypt.h"
#include "support.h"

static char s_dir[512];

static void s_setup(void)
{
    ml_log_set_level(ML_LOG_ERROR);
    ml_test_tmpdir(s_dir, sizeof s_dir);
}

static void s_teardown(void)
{
    ml_test_sh("rm -rf '%s'", s_dir);
}

TestSuite(crypt, .init = s_setup, .fini = s_teardown);

#define KEY_A "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
#define KEY_B "c0ffee0000000000000000000000000000000000000000000000000000c0ffee"
#define ID "01ARZ3NDEKTSV4RRFFQ69G5FAV"

/* Writes content to s_dir/name with mode; returns the path (static per
 * call site is not enough: the caller copies it). */
static void write_file(char *path, size_t cap, const char *name, const char *content, mode_t mode)
{
    snprintf(path, cap, "%s/%s", s_dir, name);
    unlink(path);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    cr_assert(fd >= 0);
    size_t n = strlen(content);
    cr_assert_eq(write(fd, content, n), (ssize_t)n);
    close(fd);
    cr_assert_eq(chmod(path, mode), 0);
}

static ml_keyring_t *load(const char *current, const char *const *old, size_t n_old)
{
    ml_keyring_t *kr = NULL;
    char err[512] = "";
    int rc = ml_keyring_load(current, old, n_old, &kr, err, sizeof err);
    cr_assert_eq(rc, 0, "load %s: %s", current, err);
    cr_assert_not_null(kr);
    return kr;
}

static ml_keyring_t *load_hex(const char *name, const char *hex)
{
    char p[600];
    char text[80];
    snprintf(text, sizeof text, "%s\n", hex);
    write_file(p, sizeof p, name, text, 0600);
    return load(p, NULL, 0);
}

/* Loads a key file expected to be refused; returns rc, err filled. */
static int load_bad(const char *content, mode_t mode, char *err, size_t errlen)
{
    char p[600];
    ml_keyring_t *kr = NULL;
    write_file(p, sizeof p, "bad.key", content, mode);
    int rc = ml_keyring_load(p, NULL, 0, &kr, err, errlen);
    cr_assert_null(kr);
    cr_assert(strstr(err, p), "error names the file: %s", err);
    return rc;
}

Test(crypt, round_trip_sizes)
{
    ml_keyring_t *kr = load_hex("a.key", KEY_A);
    static const size_t sizes[] = {0, 1, 15, 16, 17, 255, 4096, 1024 * 1024 + 3};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        size_t n = sizes[i];
        uint8_t *plain = malloc(n + 1);
        for (size_t j = 0; j < n; j++)
            plain[j] = (uint8_t)(j * 31 + 7);
        uint8_t *sealed = NULL, *back = NULL;
        size_t slen = 0, blen = 99;
        cr_assert_eq(ml_seal(kr, plain, n, (const uint8_t *)ID, strlen(ID), &sealed, &slen), 0);
        cr_assert_eq(slen, n + ML_SEAL_OVERHEAD);
        cr_assert(ml_is_sealed(sealed, slen));
        cr_assert(ml_keyring_is_current(kr, sealed, slen));
        cr_assert_eq(memcmp(sealed, ML_SEAL_MAGIC, 4), 0);
        if (n >= 16)
            cr_assert_neq(memcmp(sealed + 24, plain, 16), 0, "ciphertext is not the plaintext");
        cr_assert_eq(ml_open(kr, sealed, slen, (const uint8_t *)ID, strlen(ID), &back, &blen), 0);
        cr_assert_eq(blen, n);
        cr_assert_not_null(back);
        cr_assert_eq(back[n], 0, "NUL after the value");
        cr_assert_eq(memcmp(back, plain, n), 0);
        free(plain);
        free(sealed);
        free(back);
    }
    ml_keyring_destroy(&kr);
    cr_assert_null(kr);
    ml_keyring_destroy(&kr);
    ml_keyring_destroy(NULL);
}

Test(crypt, empty_plaintext_and_no_aad)
{
    ml_keyring_t *kr = load_hex("a.key", KEY_A);
    uint8_t *sealed = NULL, *back = NULL;
    size_t slen = 0, blen = 1;
    cr_assert_eq(ml_seal(kr, NULL, 0, NULL, 0, &sealed, &slen), 0);
    cr_assert_eq(slen, (size_t)ML_SEAL_OVERHEAD);
    cr_assert_eq(ml_open(kr, sealed, slen, NULL, 0, &back, &blen), 0);
    cr_assert_eq(blen, 0);
    cr_assert_not_null(back);
    free(back);
    /* An empty value is still bound to its associated data. */
    cr_assert_eq(ml_open(kr, sealed, slen, (const uint8_t *)"x", 1, &back, &blen), ML_EPROTO);
    cr_assert_null(back);
    free(sealed);
    ml_keyring_destroy(&kr);
}

Test(crypt, nonces_differ)
{
    ml_keyring_t *kr = load_hex("a.key", KEY_A);
    uint8_t *a = NULL, *b = NULL;
    size_t al = 0, bl = 0;
    const char *v = "the same value";
    cr_assert_eq(ml_seal(kr, (const uint8_t *)v, strlen(v), NULL, 0, &a, &al), 0);
    cr_assert_eq(ml_seal(kr, (const uint8_t *)v, strlen(v), NULL, 0, &b, &bl), 0);
    cr_assert_eq(al, bl);
    cr_assert_neq(memcmp(a + 12, b + 12, 12), 0, "fresh nonce per value");
    cr_assert_neq(memcmp(a, b, al), 0);
    free(a);
    free(b);
    ml_keyring_destroy(&kr);
}

Test(crypt, aad_binds_the_row)
{
    ml_keyring_t *kr = load_hex("a.key", KEY_A);
    const char *v = "Referral for patient Wang Xiaoming";
    uint8_t *sealed = NULL, *back = NULL;
    size_t slen = 0, blen = 0;
    cr_assert_eq(
        ml_seal(kr, (const uint8_t *)v, strlen(v), (const uint8_t *)ID, strlen(ID), &sealed, &slen),
        0);
    const char *other = "01ARZ3NDEKTSV4RRFFQ69G5FAW";
    cr_assert_eq(ml_open(kr, sealed, slen, (const uint8_t *)other, strlen(other), &back, &blen),
                 ML_EPROTO);
    cr_assert_null(back);
    cr_assert_eq(blen, 0);
    cr_assert_eq(ml_open(kr, sealed, slen, NULL, 0, &back, &blen), ML_EPROTO);
    cr_assert_eq(ml_open(kr, sealed, slen, (const uint8_t *)ID, strlen(ID) - 1, &back, &blen),
                 ML_EPROTO);
    cr_assert_eq(ml_open(kr, sealed, slen, (const uint8_t *)ID, strlen(ID), &back, &blen), 0);
    cr_assert_eq(blen, strlen(v));
    free(back);
    free(sealed);
    ml_keyring_destroy(&kr);
}

Test(crypt, every_byte_flipped_fails)
{
    ml_keyring_t *kr = load_hex("a.key", KEY_A);
    const char *v = "Li Na, 54, chest pain since 3 h";
    uint8_t *sealed = NULL, *back = NULL;
    size_t slen = 0, blen = 0;
    cr_assert_eq(
        ml_seal(kr, (const uint8_t *)v, strlen(v), (const uint8_t *)ID, strlen(ID), &sealed, &slen),
        0);
    for (size_t i = 0; i < slen; i++) {
        for (int bit = 0; bit < 8; bit += 7) {
            sealed[i] ^= (uint8_t)(1u << bit);
            int rc = ml_open(kr, sealed, slen, (const uint8_t *)ID, strlen(ID), &back, &blen);
            int want = i < 4 ? ML_EINVAL : i < 12 ? ML_ENOTFOUND : ML_EPROTO;
            cr_assert_eq(rc, want, "byte %zu bit %d: rc %d, want %d", i, bit, rc, want);
            cr_assert_null(back);
            sealed[i] ^= (uint8_t)(1u << bit);
        }
    }
    /* Truncated or extended values do not open either. */
    for (size_t n = 0; n < slen; n++) {
        int rc = ml_open(kr, sealed, n, (const uint8_t *)ID, strlen(ID), &back, &blen);
        cr_assert(rc == ML_EINVAL || rc == ML_EPROTO, "length %zu: rc %d", n, rc);
        cr_assert_null(back);
    }
    uint8_t *longer = malloc(slen + 1);
    memcpy(longer, sealed, slen);
    longer[slen] = 0;
    cr_assert_eq(ml_open(kr, longer, slen + 1, (const uint8_t *)ID, strlen(ID), &back, &blen),
                 ML_EPROTO);
    free(longer);
    cr_assert_eq(ml_open(kr, sealed, slen, (const uint8_t *)ID, strlen(ID), &back, &blen), 0);
    free(back);
    free(sealed);
    ml_keyring_destroy(&kr);
}

Test(crypt, is_sealed)
{
    uint8_t buf[ML_SEAL_OVERHEAD] = "MLE1";
    cr_assert(ml_is_sealed(buf, sizeof buf));
    cr_assert_not(ml_is_sealed(buf, sizeof buf - 1), "too short to hold a tag");
    cr_assert_not(ml_is_sealed(NULL, 0));
    /* A serialised Envelope starts with field 1's tag (0x0a), never "M". */
    const uint8_t env[64] = {0x0a, 0x1a};
    cr_assert_not(ml_is_sealed(env, sizeof env));
    char hex[17];
    cr_assert_eq(ml_sealed_key_id(env, sizeof env, hex), ML_EINVAL);
    uint8_t *out = NULL;
    size_t n = 0;
    ml_keyring_t *kr = load_hex("a.key", KEY_A);
    cr_assert_eq(ml_open(kr, env, sizeof env, NULL, 0, &out, &n), ML_EINVAL);
    ml_keyring_destroy(&kr);
}

/* The key id and the value format, against Python's hashlib and
 * cryptography (AESGCM): key 00..1f, nonce a0..ab, associated data ID,
 * plaintext "patient Zhang San". The broker and the agent must read each
 * other's format, and a later version must read today's files. */
Test(crypt, known_answer)
{
    ml_keyring_t *kr = load_hex("a.key", KEY_A);
    cr_assert_str_eq(ml_keyring_current_id(kr), "ea39b891307c8ed2");
    static const char hex[] = "4d4c4531ea39b891307c8ed2a0a1a2a3a4a5a6a7a8a9aaab9679084420a5769f"
                              "380de6bd605a93bf1e0106ef69fac66db3d53aa19f5a899e21";
    uint8_t sealed[sizeof hex / 2];
    for (size_t i = 0; i < sizeof sealed; i++) {
        unsigned v;
        cr_assert_eq(sscanf(hex + 2 * i, "%2x", &v), 1);
        sealed[i] = (uint8_t)v;
    }
    char id[17];
    cr_assert_eq(ml_sealed_key_id(sealed, sizeof sealed, id), 0);
    cr_assert_str_eq(id, "ea39b891307c8ed2");
    uint8_t *out = NULL;
    size_t n = 0;
    cr_assert_eq(ml_open(kr, sealed, sizeof sealed, (const uint8_t *)ID, strlen(ID), &out, &n), 0);
    cr_assert_eq(n, strlen("patient Zhang San"));
    cr_assert_str_eq((char *)out, "patient Zhang San");
    free(out);
    ml_keyring_destroy(&kr);
}

Test(crypt, rotation)
{
    char a[600], b[600];
    write_file(a, sizeof a, "a.key", KEY_A "\n", 0600);
    write_file(b, sizeof b, "b.key", KEY_B "\n", 0400);
    ml_keyring_t *old = load(a, NULL, 0);
    const char *v = "discharge summary: Zhao Lei";
    uint8_t *s1 = NULL, *s2 = NULL, *out = NULL;
    size_t l1 = 0, l2 = 0, n = 0;
    cr_assert_eq(ml_seal(old, (const uint8_t *)v, strlen(v), (const uint8_t *)ID, 26, &s1, &l1), 0);

    /* Rotation: B is current, A is listed as old. */
    const char *olds[] = {a};
    ml_keyring_t *kr = load(b, olds, 1);
    cr_assert_eq(ml_keyring_count(kr), 2);
    cr_assert_str_neq(ml_keyring_current_id(kr), ml_keyring_current_id(old));
    cr_assert_not(ml_keyring_is_current(kr, s1, l1), "sealed under the old key");
    cr_assert_eq(ml_open(kr, s1, l1, (const uint8_t *)ID, 26, &out, &n), 0);
    cr_assert_eq(n, strlen(v));
    cr_assert_eq(memcmp(out, v, n), 0);
    free(out);
    cr_assert_eq(ml_seal(kr, (const uint8_t *)v, strlen(v), (const uint8_t *)ID, 26, &s2, &l2), 0);
    cr_assert(ml_keyring_is_current(kr, s2, l2));
    char id[17];
    cr_assert_eq(ml_sealed_key_id(s2, l2, id), 0);
    cr_assert_str_eq(id, ml_keyring_current_id(kr));

    /* The old keyring does not know B: named, not "damaged". */
    cr_assert_eq(ml_open(old, s2, l2, (const uint8_t *)ID, 26, &out, &n), ML_ENOTFOUND);
    cr_assert_null(out);
    /* Nor does a keyring that dropped A too early. */
    ml_keyring_t *b_only = load(b, NULL, 0);
    cr_assert_eq(ml_open(b_only, s1, l1, (const uint8_t *)ID, 26, &out, &n), ML_ENOTFOUND);
    cr_assert_eq(ml_open(b_only, s2, l2, (const uint8_t *)ID, 26, &out, &n), 0);
    free(out);

    /* The same file listed as old and current counts once. */
    const char *dup[] = {b, a, a};
    ml_keyring_t *d = load(b, dup, 3);
    cr_assert_eq(ml_keyring_count(d), 2);
    cr_assert_str_eq(ml_keyring_current_id(d), ml_keyring_current_id(kr));

    free(s1);
    free(s2);
    ml_keyring_destroy(&d);
    ml_keyring_destroy(&b_only);
    ml_keyring_destroy(&kr);
    ml_keyring_destroy(&old);
}

Test(crypt, key_file_formats_accepted)
{
    static const char *const ok[] = {
        KEY_A "\n",          KEY_A,
        KEY_A "\r\n",        "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F\n",
        "  " KEY_A "  \n\n",
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        char p[600];
        write_file(p, sizeof p, "k.key", ok[i], 0600);
        ml_keyring_t *kr = load(p, NULL, 0);
        cr_assert_str_eq(ml_keyring_current_id(kr), "ea39b891307c8ed2", "format %zu", i);
        ml_keyring_destroy(&kr);
    }
}

Test(crypt, key_file_errors)
{
    char err[512];
    cr_assert_eq(load_bad(KEY_A "\n", 0644, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "readable by group or others (mode 0644): chmod 600"), "%s", err);
    cr_assert_eq(load_bad(KEY_A "\n", 0640, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "mode 0640"), "%s", err);
    cr_assert_eq(load_bad(KEY_A "\n", 0620, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "writable"), "%s", err);
    cr_assert_eq(load_bad("", 0600, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "empty key file"), "%s", err);
    cr_assert_eq(load_bad("0011\n", 0600, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "not 64 hex digits (found 4"), "%s", err);
    cr_assert_eq(load_bad(KEY_A "0\n", 0600, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "not 64 hex digits (found 65"), "%s", err);
    cr_assert_eq(load_bad(KEY_A " extra\n", 0600, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "followed by other characters"), "%s", err);
    cr_assert_eq(load_bad("zz" KEY_A "\n", 0600, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "not 64 hex digits"), "%s", err);
    cr_assert_eq(load_bad("-----BEGIN PRIVATE KEY-----\nMIIE\n", 0600, err, sizeof err), ML_EINVAL);
    char big[1000];
    memset(big, 'a', sizeof big - 1);
    big[sizeof big - 1] = 0;
    cr_assert_eq(load_bad(big, 0600, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "longer than"), "%s", err);

    /* A missing file, a folder, and a good current key with a bad old one. */
    ml_keyring_t *kr = NULL;
    char p[600], good[600];
    snprintf(p, sizeof p, "%s/missing.key", s_dir);
    cr_assert_eq(ml_keyring_load(p, NULL, 0, &kr, err, sizeof err), ML_EIO);
    cr_assert(strstr(err, p) && strstr(err, "No such file"), "%s", err);
    cr_assert_eq(ml_keyring_load(s_dir, NULL, 0, &kr, err, sizeof err), ML_EINVAL);
    cr_assert(strstr(err, "not a regular file"), "%s", err);
    write_file(good, sizeof good, "good.key", KEY_B "\n", 0600);
    const char *olds[] = {p};
    cr_assert_eq(ml_keyring_load(good, olds, 1, &kr, err, sizeof err), ML_EIO);
    cr_assert(strstr(err, "missing.key"), "the old key is named: %s", err);
    cr_assert_null(kr);
    cr_assert_eq(ml_keyring_load(NULL, NULL, 0, &kr, err, sizeof err), ML_EINVAL);
    cr_assert_eq(ml_keyring_load("", NULL, 0, &kr, err, sizeof err), ML_EINVAL);
}

Test(crypt, generate_file)
{
    char p[600], q[600];
    char err[512] = "";
    snprintf(p, sizeof p, "%s/new.key", s_dir);
    snprintf(q, sizeof q, "%s/other.key", s_dir);
    mode_t old_mask = umask(0);
    int rc = ml_keyring_generate_file(p, err, sizeof err);
    umask(old_mask);
    cr_assert_eq(rc, 0, "%s", err);
    struct stat st;
    cr_assert_eq(stat(p, &st), 0);
    cr_assert_eq(st.st_mode & 07777, 0600, "mode %o", (unsigned)(st.st_mode & 07777));
    cr_assert_eq(st.st_size, 65, "64 hex digits and a newline");
    ml_keyring_t *kr = load(p, NULL, 0);
    char id[17];
    snprintf(id, sizeof id, "%s", ml_keyring_current_id(kr));

    /* Never overwritten: the existing key may be all that opens a store. */
    cr_assert_eq(ml_keyring_generate_file(p, err, sizeof err), ML_EDUP);
    cr_assert(strstr(err, "exists already"), "%s", err);
    ml_keyring_t *again = load(p, NULL, 0);
    cr_assert_str_eq(ml_keyring_current_id(again), id);

    /* A second key is a different key. */
    cr_assert_eq(ml_keyring_generate_file(q, err, sizeof err), 0, "%s", err);
    ml_keyring_t *other = load(q, NULL, 0);
    cr_assert_str_neq(ml_keyring_current_id(other), id);

    /* A folder that does not exist. */
    snprintf(q, sizeof q, "%s/no/such/dir.key", s_dir);
    cr_assert_eq(ml_keyring_generate_file(q, err, sizeof err), ML_EIO);
    cr_assert(strstr(err, "dir.key"), "%s", err);

    ml_keyring_destroy(&kr);
    ml_keyring_destroy(&again);
    ml_keyring_destroy(&other);
}
