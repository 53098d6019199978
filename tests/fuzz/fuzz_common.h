/* Helpers shared by the fuzz targets (tests/fuzz/fuzz_*.c): quiet logging,
 * temp folders on a RAM file system, a reader that turns fuzz input into
 * structured choices, and a small deterministic PRNG. Nothing here decides
 * what a target tests; it only keeps the targets short and alike. Every
 * target is built twice: with libFuzzer (ML_FUZZ=ON, clang) and with
 * replay.c as main (always), which runs it over the committed corpus and
 * every past crash (tests/fuzz/regressions/). */
#ifndef ML_FUZZ_COMMON_H
#define ML_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>

/* The libFuzzer entry point every target defines. */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Reports a broken expectation of target and aborts (libFuzzer then saves
 * the input). The sentence goes to stderr and, in a sanitizer build, to the
 * sanitizer's report (which libFuzzer keeps visible even when it discards
 * the target's stderr with -close_fd_mask=2). */
void ml_fuzz_fail(const char *target, const char *fmt, ...)
    __attribute__((format(printf, 2, 3), noreturn));

/* Sets the log level from ML_FUZZ_LOG_LEVEL (debug, info, warn, error);
 * without it nothing is logged, which keeps replays and fuzzing quiet.
 * deploy/fuzz.sh sets debug so that every log line's formatting runs on
 * fuzzed values too. Idempotent. */
void ml_fuzz_quiet(void);

/* Creates a fresh folder "<base>/mlfuzz-<tag>.XXXXXX" and writes its path
 * into out. base is ML_FUZZ_TMPDIR, else /dev/shm when writable (fsync is
 * then free, which matters for the SQLite-backed targets), else $TMPDIR,
 * else /tmp. Aborts on failure: a target without its folder cannot run. */
void ml_fuzz_tmpdir(const char *tag, char *out, size_t len);
/* Removes path and everything under it (no symlinks followed). Returns 0
 * or -1. */
int ml_fuzz_rmtree(const char *path);
/* Writes len bytes to path (created or truncated). Aborts on failure. */
void ml_fuzz_write_file(const char *path, const void *data, size_t len);
/* The source tree: $ML_SOURCE_DIR, else the one this was built from. */
const char *ml_fuzz_source_dir(void);

/* Reads fuzz input front to back. Past the end every read yields zeros
 * and an empty tail, so targets never need to check lengths. */
typedef struct {
    const uint8_t *p;
    size_t n;
} ml_fuzz_in_t;

uint8_t ml_fuzz_u8(ml_fuzz_in_t *in);
uint16_t ml_fuzz_u16(ml_fuzz_in_t *in); /* big endian */
uint32_t ml_fuzz_u32(ml_fuzz_in_t *in); /* big endian */
/* Up to want bytes (fewer at the end); *got says how many. Borrowed. */
const uint8_t *ml_fuzz_take(ml_fuzz_in_t *in, size_t want, size_t *got);

/* 1 when ML_FUZZ_KNOWN (a comma-separated list) names issue: a bug found
 * before, recorded in tests/fuzz/regressions/ and docs/security.md, and not
 * fixed yet. Targets use it to step over that one bug, so that a fuzzing
 * campaign can look past it; replays never set it. */
int ml_fuzz_known(const char *issue);

/* xorshift64*: deterministic, seeded from input bytes. */
typedef struct {
    uint64_t s;
} ml_fuzz_rng_t;

void ml_fuzz_rng_seed(ml_fuzz_rng_t *r, uint64_t seed);
uint64_t ml_fuzz_rng_next(ml_fuzz_rng_t *r);
void ml_fuzz_rng_fill(ml_fuzz_rng_t *r, uint8_t *buf, size_t len);

/* A syntactically valid ULID that depends only on n ("01JDB3W5Q3T0S8R9K7"
 * followed by n in Crockford base32), so targets can make message ids
 * without randomness. out holds 27 bytes. */
void ml_fuzz_ulid(uint64_t n, char out[27]);

#endif
