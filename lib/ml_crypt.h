/* Encryption of patient data at rest: AES-256-GCM (OpenSSL EVP) under
 * keys kept in key files, for the message payloads the broker and the
 * agents store in SQLite.
 *
 * A key file holds 64 hex digits (32 random bytes) and a newline, mode
 * 0600 (`openssl rand -hex 32`). A keyring has one current key, which
 * seals, and any number of older keys, which still open what they sealed:
 * rotation is "make a new key file the current one, list the old one as
 * old", and nothing stored before is lost.
 *
 * A sealed value is
 *   "MLE1" | key id (8 bytes) | nonce (12 bytes) | ciphertext | tag (16 bytes)
 * where the key id is the first 8 bytes of SHA-256("medlink key id" | key)
 * and the nonce is random (RAND_bytes). The caller's associated data (for
 * example the message id) is authenticated with it, so a sealed value
 * moved to another row does not open. Thread-safe once loaded. */
#ifndef ML_CRYPT_H
#define ML_CRYPT_H

#include <stddef.h>
#include <stdint.h>

#define ML_SEAL_MAGIC "MLE1"
#define ML_SEAL_OVERHEAD (4 + 8 + 12 + 16)

typedef struct ml_keyring ml_keyring_t;

/* Loads the current key file and n_old older ones (a key listed twice is
 * kept once). A key file must be a regular file of 64 hex digits, white
 * space around them allowed, that neither group nor others may read or
 * write (0600 or 0400). Returns 0, or ML_EIO / ML_EINVAL with err naming the
 * file and what is wrong ("not 64 hex digits", "readable by group or others
 * (mode 0644): chmod 600 FILE"). */
int ml_keyring_load(const char *current, const char *const *old, size_t n_old, ml_keyring_t **out,
                    char *err, size_t errlen);
/* Frees the keys (wiped first); safe on NULL and twice; clears *self_p. */
void ml_keyring_destroy(ml_keyring_t **self_p);
/* The current key's id as 16 hex digits (static per keyring, borrowed). */
const char *ml_keyring_current_id(const ml_keyring_t *kr);
/* Number of distinct keys held (the current one included; a key file
 * listed twice counts once). */
size_t ml_keyring_count(const ml_keyring_t *kr);
/* 1 if sealed is a sealed value made with kr's current key, else 0 (not
 * sealed, or sealed under an older or unknown key: a store re-seals such
 * values so that old keys can be retired). O(1); nothing is decrypted. */
int ml_keyring_is_current(const ml_keyring_t *kr, const uint8_t *sealed, size_t len);
/* Writes the key id a sealed value names (16 hex digits) into out, for
 * error messages. Returns 0 or ML_EINVAL (not a sealed value). */
int ml_sealed_key_id(const uint8_t *sealed, size_t len, char out[17]);

/* Writes a new random key file at path (mode 0600, refusing to overwrite;
 * fsync'd with its folder). Returns 0, ML_EIO, ML_EDUP (exists) or ML_ETLS
 * (no random bytes), with err saying which. */
int ml_keyring_generate_file(const char *path, char *err, size_t errlen);

/* 1 if data starts with ML_SEAL_MAGIC and is long enough to be a sealed
 * value, else 0. O(1). */
int ml_is_sealed(const uint8_t *data, size_t len);

/* Seals len bytes with the current key into a malloc'd buffer (*out, the
 * caller's; *out_len = len + ML_SEAL_OVERHEAD). Returns 0, ML_ENOMEM or
 * ML_ETLS. */
int ml_seal(const ml_keyring_t *kr, const uint8_t *plain, size_t len, const uint8_t *aad,
            size_t aad_len, uint8_t **out, size_t *out_len);
/* Opens a sealed value with whichever key sealed it. Returns 0 (*out
 * malloc'd, the caller's, with a NUL byte after its *out_len bytes so that
 * sealed text can be used as a C string), ML_EINVAL (not a sealed value),
 * ML_ENOTFOUND (sealed under a key this keyring does not have), ML_EPROTO
 * (it does not authenticate: damaged, or moved to another row; nothing of
 * it is returned), ML_ENOMEM. */
int ml_open(const ml_keyring_t *kr, const uint8_t *sealed, size_t len, const uint8_t *aad,
            size_t aad_len, uint8_t **out, size_t *out_len);

#endif
