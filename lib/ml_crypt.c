/* AES-256-GCM sealing of stored values under a keyring loaded from key
 * files (ml_crypt.h). Keys live in one calloc'd array that is wiped with
 * OPENSSL_cleanse before it is freed; every operation takes its own
 * EVP_CIPHER_CTX, so a loaded keyring can be shared by threads. */
#include "ml_crypt.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "ml_check.h"
#include "ml_common.h"
#include "ml_fs.h"

#define S_KEY_LEN 32
#define S_ID_LEN 8
#define S_NONCE_LEN 12
#define S_TAG_LEN 16
#define S_MAGIC_LEN 4
/* A key file is 64 hex digits and a newline; anything much longer is not
 * one, and is refused before it is read into memory. */
#define S_FILE_MAX 256
#define S_ID_LABEL "medlink key id"

typedef struct {
    uint8_t key[S_KEY_LEN];
    uint8_t id[S_ID_LEN];
} s_key_t;

struct ml_keyring {
    size_t n; /* keys[0] is the current key */
    s_key_t *keys;
    char current_hex[2 * S_ID_LEN + 1];
};

static int s_hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static void s_to_hex(const uint8_t *b, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[b[i] >> 4];
        out[2 * i + 1] = digits[b[i] & 15];
    }
    out[2 * n] = '\0';
}

/* The key id: the first 8 bytes of SHA-256("medlink key id" | key). It
 * names a key without revealing it, so a sealed value says which key
 * opens it. Returns 0 or ML_ETLS. */
static int s_key_id(const uint8_t key[S_KEY_LEN], uint8_t id[S_ID_LEN])
{
    uint8_t md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    int rc = ML_ETLS;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx)
        return ML_ENOMEM;
    if (EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1 &&
        EVP_DigestUpdate(ctx, S_ID_LABEL, strlen(S_ID_LABEL)) == 1 &&
        EVP_DigestUpdate(ctx, key, S_KEY_LEN) == 1 && EVP_DigestFinal_ex(ctx, md, &n) == 1 &&
        n >= S_ID_LEN) {
        memcpy(id, md, S_ID_LEN);
        rc = 0;
    }
    EVP_MD_CTX_free(ctx);
    OPENSSL_cleanse(md, sizeof md);
    return rc;
}

/* Reads one key file into key. The mode is checked on the open file
 * (fstat), so what is checked is what is read. Returns 0, ML_EIO or
 * ML_EINVAL with err naming the file. */
static int s_read_key(const char *path, uint8_t key[S_KEY_LEN], char *err, size_t errlen)
{
    char buf[S_FILE_MAX + 1];
    ssize_t got;
    size_t len = 0;
    int rc = ML_EIO;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        ml_seterr(err, errlen, "%s: cannot open key file: %s", path, strerror(errno));
        return ML_EIO;
    }
    /* Anyone who can read the key can read every stored payload, and anyone
     * who can write it can make the store unreadable: owner only. */
    if ((rc = ml_check_private_fd(fd, path, "store key file", err, errlen)) != 0)
        goto out;
    rc = ML_EIO;
    while (len < sizeof buf && (got = read(fd, buf + len, sizeof buf - len)) != 0) {
        if (got < 0) {
            if (errno == EINTR)
                continue;
            ml_seterr(err, errlen, "%s: cannot read key file: %s", path, strerror(errno));
            goto out;
        }
        len += (size_t)got;
    }
    rc = ML_EINVAL;
    if (len > S_FILE_MAX) {
        ml_seterr(err, errlen, "%s: not a key file (longer than %d bytes; expected 64 hex digits)",
                  path, S_FILE_MAX);
        goto out;
    }
    /* 64 hex digits, then only white space (the newline `openssl rand -hex
     * 32` writes, or a CR from an editor). */
    size_t start = 0;
    while (start < len && (buf[start] == ' ' || buf[start] == '\t'))
        start++;
    size_t digits = 0;
    while (start + digits < len && s_hexval((unsigned char)buf[start + digits]) >= 0)
        digits++;
    size_t rest = start + digits;
    while (rest < len &&
           (buf[rest] == '\n' || buf[rest] == '\r' || buf[rest] == ' ' || buf[rest] == '\t'))
        rest++;
    if (len == 0) {
        ml_seterr(err, errlen, "%s: empty key file (expected 64 hex digits: openssl rand -hex 32)",
                  path);
        goto out;
    }
    if (digits != 2 * S_KEY_LEN || rest != len) {
        ml_seterr(err, errlen,
                  "%s: not 64 hex digits (found %zu hex digit(s)%s; make one with openssl rand "
                  "-hex 32)",
                  path, digits, rest != len ? " followed by other characters" : "");
        goto out;
    }
    for (size_t i = 0; i < S_KEY_LEN; i++)
        key[i] = (uint8_t)(s_hexval((unsigned char)buf[start + 2 * i]) << 4 |
                           s_hexval((unsigned char)buf[start + 2 * i + 1]));
    rc = 0;
out:
    OPENSSL_cleanse(buf, sizeof buf);
    close(fd);
    return rc;
}

int ml_keyring_load(const char *current, const char *const *old, size_t n_old, ml_keyring_t **out,
                    char *err, size_t errlen)
{
    int rc = ML_ENOMEM;
    ml_keyring_t *kr = NULL;
    s_key_t k;

    *out = NULL;
    if (!current || !*current || (n_old > 0 && !old)) {
        ml_seterr(err, errlen, "no key file given");
        return ML_EINVAL;
    }
    if (!(kr = calloc(1, sizeof *kr)) || !(kr->keys = calloc(n_old + 1, sizeof *kr->keys))) {
        ml_seterr(err, errlen, "out of memory");
        goto out;
    }
    for (size_t i = 0; i <= n_old; i++) {
        const char *path = i == 0 ? current : old[i - 1];
        if (!path || !*path) {
            ml_seterr(err, errlen, "old key %zu: no file given", i);
            rc = ML_EINVAL;
            goto out;
        }
        if ((rc = s_read_key(path, k.key, err, errlen)) < 0)
            goto out;
        if ((rc = s_key_id(k.key, k.id)) < 0) {
            ml_seterr(err, errlen, "%s: cannot compute the key id", path);
            goto out;
        }
        /* The same key listed twice (an old list that still names the
         * current file, say) is harmless: keep the first. */
        int dup = 0;
        for (size_t j = 0; j < kr->n; j++)
            dup |= memcmp(kr->keys[j].id, k.id, S_ID_LEN) == 0;
        if (!dup)
            kr->keys[kr->n++] = k;
    }
    s_to_hex(kr->keys[0].id, S_ID_LEN, kr->current_hex);
    *out = kr;
    kr = NULL;
    rc = 0;
out:
    OPENSSL_cleanse(&k, sizeof k);
    ml_keyring_destroy(&kr);
    return rc;
}

void ml_keyring_destroy(ml_keyring_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    ml_keyring_t *kr = *self_p;
    if (kr->keys) {
        OPENSSL_cleanse(kr->keys, kr->n * sizeof *kr->keys);
        free(kr->keys);
    }
    OPENSSL_cleanse(kr, sizeof *kr);
    free(kr);
    *self_p = NULL;
}

const char *ml_keyring_current_id(const ml_keyring_t *kr)
{
    return kr->current_hex;
}

size_t ml_keyring_count(const ml_keyring_t *kr)
{
    return kr->n;
}

int ml_keyring_generate_file(const char *path, char *err, size_t errlen)
{
    uint8_t key[S_KEY_LEN];
    char text[2 * S_KEY_LEN + 2];
    int rc = ML_EIO;
    if (RAND_bytes(key, sizeof key) != 1) {
        ml_seterr(err, errlen, "%s: no random bytes from OpenSSL", path);
        return ML_ETLS;
    }
    s_to_hex(key, sizeof key, text);
    text[2 * S_KEY_LEN] = '\n';
    text[2 * S_KEY_LEN + 1] = '\0';
    /* O_EXCL: an existing key file may be the only way to read a store,
     * so it is never replaced. */
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) {
        rc = errno == EEXIST ? ML_EDUP : ML_EIO;
        ml_seterr(err, errlen, "%s: %s", path,
                  rc == ML_EDUP ? "exists already (a key file is never overwritten)"
                                : strerror(errno));
        goto out;
    }
    size_t len = 2 * S_KEY_LEN + 1, done = 0;
    /* The umask may only take bits away, but be explicit. */
    if (fchmod(fd, 0600) != 0)
        goto write_failed;
    while (done < len) {
        ssize_t w = write(fd, text + done, len - done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            goto write_failed;
        done += (size_t)w;
    }
    if (fsync(fd) != 0)
        goto write_failed;
    if (close(fd) != 0) {
        fd = -1;
        goto write_failed;
    }
    /* The new key file must survive a crash by name too. */
    (void)ml_fs_fsync_parent(path);
    rc = 0;
    goto out;
write_failed:
    ml_seterr(err, errlen, "%s: cannot write key file: %s", path, strerror(errno));
    if (fd >= 0)
        close(fd);
    unlink(path);
    rc = ML_EIO;
out:
    OPENSSL_cleanse(key, sizeof key);
    OPENSSL_cleanse(text, sizeof text);
    return rc;
}

int ml_is_sealed(const uint8_t *data, size_t len)
{
    return data && len >= ML_SEAL_OVERHEAD && memcmp(data, ML_SEAL_MAGIC, S_MAGIC_LEN) == 0;
}

int ml_keyring_is_current(const ml_keyring_t *kr, const uint8_t *sealed, size_t len)
{
    return ml_is_sealed(sealed, len) && memcmp(sealed + S_MAGIC_LEN, kr->keys[0].id, S_ID_LEN) == 0;
}

int ml_sealed_key_id(const uint8_t *sealed, size_t len, char out[2 * S_ID_LEN + 1])
{
    if (!ml_is_sealed(sealed, len))
        return ML_EINVAL;
    s_to_hex(sealed + S_MAGIC_LEN, S_ID_LEN, out);
    return 0;
}

/* Runs one GCM pass. enc: plain -> ct and the tag into tag; otherwise ct
 * -> plain, checked against tag. Returns 0, ML_EPROTO (does not
 * authenticate) or ML_ETLS. */
static int s_gcm(int enc, const uint8_t *key, const uint8_t *nonce, const uint8_t *aad,
                 size_t aad_len, const uint8_t *in, size_t len, uint8_t *outb, uint8_t *tag)
{
    int rc = ML_ETLS, n = 0;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (!ctx)
        return ML_ENOMEM;
    /* EVP lengths are ints; stored values are far below that, but a
     * caller's mistake must not wrap. */
    if (len > (size_t)0x7fffffff || aad_len > (size_t)0x7fffffff)
        goto out;
    if (EVP_CipherInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL, enc) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, S_NONCE_LEN, NULL) != 1 ||
        EVP_CipherInit_ex(ctx, NULL, NULL, key, nonce, enc) != 1)
        goto out;
    if (aad_len > 0 && EVP_CipherUpdate(ctx, NULL, &n, aad, (int)aad_len) != 1)
        goto out;
    if (len > 0 && EVP_CipherUpdate(ctx, outb, &n, in, (int)len) != 1)
        goto out;
    if (!enc && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, S_TAG_LEN, tag) != 1)
        goto out;
    if (EVP_CipherFinal_ex(ctx, outb + (len > 0 ? n : 0), &n) != 1) {
        rc = enc ? ML_ETLS : ML_EPROTO;
        goto out;
    }
    if (enc && EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, S_TAG_LEN, tag) != 1)
        goto out;
    rc = 0;
out:
    EVP_CIPHER_CTX_free(ctx);
    return rc;
}

int ml_seal(const ml_keyring_t *kr, const uint8_t *plain, size_t len, const uint8_t *aad,
            size_t aad_len, uint8_t **out, size_t *out_len)
{
    *out = NULL;
    *out_len = 0;
    if (len > SIZE_MAX - ML_SEAL_OVERHEAD)
        return ML_ENOMEM;
    uint8_t *buf = malloc(len + ML_SEAL_OVERHEAD);
    if (!buf)
        return ML_ENOMEM;
    uint8_t *p = buf;
    memcpy(p, ML_SEAL_MAGIC, S_MAGIC_LEN);
    p += S_MAGIC_LEN;
    memcpy(p, kr->keys[0].id, S_ID_LEN);
    p += S_ID_LEN;
    /* A random 96-bit nonce per value: with one key sealing well under
     * 2^32 values, a repeat (which would break GCM) is not a concern. */
    if (RAND_bytes(p, S_NONCE_LEN) != 1) {
        free(buf);
        return ML_ETLS;
    }
    const uint8_t *nonce = p;
    p += S_NONCE_LEN;
    int rc = s_gcm(1, kr->keys[0].key, nonce, aad, aad_len, plain, len, p, p + len);
    if (rc < 0) {
        OPENSSL_cleanse(buf, len + ML_SEAL_OVERHEAD);
        free(buf);
        return rc;
    }
    *out = buf;
    *out_len = len + ML_SEAL_OVERHEAD;
    return 0;
}

int ml_open(const ml_keyring_t *kr, const uint8_t *sealed, size_t len, const uint8_t *aad,
            size_t aad_len, uint8_t **out, size_t *out_len)
{
    *out = NULL;
    *out_len = 0;
    if (!ml_is_sealed(sealed, len))
        return ML_EINVAL;
    const uint8_t *id = sealed + S_MAGIC_LEN;
    const s_key_t *k = NULL;
    for (size_t i = 0; i < kr->n && !k; i++)
        if (memcmp(kr->keys[i].id, id, S_ID_LEN) == 0)
            k = &kr->keys[i];
    if (!k)
        return ML_ENOTFOUND;
    const uint8_t *nonce = id + S_ID_LEN;
    const uint8_t *ct = nonce + S_NONCE_LEN;
    size_t n = len - ML_SEAL_OVERHEAD;
    uint8_t tag[S_TAG_LEN];
    memcpy(tag, ct + n, S_TAG_LEN);
    /* One byte more than needed, so that an empty value is a real
     * allocation and text callers may NUL-terminate. */
    uint8_t *buf = malloc(n + 1);
    if (!buf)
        return ML_ENOMEM;
    int rc = s_gcm(0, k->key, nonce, aad, aad_len, ct, n, buf, tag);
    if (rc < 0) {
        /* Nothing of an unauthenticated value may reach the caller. */
        OPENSSL_cleanse(buf, n + 1);
        free(buf);
        return rc;
    }
    buf[n] = 0;
    *out = buf;
    *out_len = n;
    return 0;
}
