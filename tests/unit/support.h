/* Helpers shared by the unit tests: temp folders and a per-test PKI made by
 * deploy/pki.sh (the same script operators use). */
#ifndef ML_TEST_SUPPORT_H
#define ML_TEST_SUPPORT_H

#include <stddef.h>

/* Creates a fresh temp folder (mkdtemp under $TMPDIR or /tmp) and writes its
 * path into out. Aborts the test on failure. */
void ml_test_tmpdir(char *out, size_t len);
/* Runs deploy/pki.sh to make a CA named ca_name and one certificate per
 * name in nodes (NULL-terminated) under dir. Aborts the test on failure.
 * Files: dir/ca.crt, dir/ca.key, dir/<name>.crt, dir/<name>.key */
void ml_test_pki(const char *dir, const char *ca_name, const char *const *nodes);
/* Runs a shell command; returns its exit status. */
int ml_test_sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Path of the source tree (from ML_SOURCE_DIR). */
const char *ml_test_source_dir(void);

#endif
