/* The main() of a fuzz target when it is not built with libFuzzer: runs
 * LLVMFuzzerTestOneInput once over every file named on the command line or
 * found in a folder named there (in name order, skipping names that start
 * with '.' and README files). ctest runs one replayer per target over
 * tests/fuzz/corpus/<target>/ and tests/fuzz/regressions/<target>/, so the
 * ordinary suite (and its ASan build) replays the seeds and every crash the
 * fuzzers ever found.
 *
 *   fuzz_replay_<target> [--optional] PATH...
 *
 * A folder after --optional may be missing (a target with no regression
 * yet); a missing required path fails the run. Each input is read into a
 * buffer of exactly its size, so AddressSanitizer sees any read past it. */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz_common.h"

/* libFuzzer calls this once before the first input when a target defines
 * it; so does the replayer. */
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

static size_t s_runs;

static int s_run_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "replay: cannot open %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t cap = 4096, len = 0;
    uint8_t *buf = malloc(cap);
    for (;;) {
        if (!buf) {
            fclose(f);
            fprintf(stderr, "replay: out of memory reading %s\n", path);
            return -1;
        }
        size_t n = fread(buf + len, 1, cap - len, f);
        len += n;
        if (n == 0)
            break;
        if (len == cap) {
            cap *= 2;
            uint8_t *nb = realloc(buf, cap);
            if (!nb)
                free(buf);
            buf = nb;
        }
    }
    fclose(f);
    /* An exact-size copy: a read one byte past the input must be caught. */
    uint8_t *exact = malloc(len ? len : 1);
    if (!exact) {
        free(buf);
        return -1;
    }
    memcpy(exact, buf, len);
    free(buf);
    fprintf(stderr, "replay: %s (%zu bytes)\n", path, len);
    LLVMFuzzerTestOneInput(exact, len);
    free(exact);
    s_runs++;
    return 0;
}

static int s_skip(const char *name)
{
    return name[0] == '.' || strncmp(name, "README", 6) == 0;
}

static int s_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int s_run_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    char **names = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d))) {
        if (s_skip(e->d_name))
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            char **nn = realloc(names, cap * sizeof *nn);
            if (!nn) {
                rc = -1;
                break;
            }
            names = nn;
        }
        if (!(names[n] = strdup(e->d_name))) {
            rc = -1;
            break;
        }
        n++;
    }
    closedir(d);
    qsort(names, n, sizeof *names, s_cmp);
    for (size_t i = 0; i < n; i++) {
        char path[4096];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (rc == 0 && stat(path, &st) == 0 && S_ISREG(st.st_mode) && s_run_file(path) != 0)
            rc = -1;
        free(names[i]);
    }
    free(names);
    return rc;
}

int main(int argc, char **argv)
{
    int optional = 0, failed = 0;
    if (LLVMFuzzerInitialize)
        LLVMFuzzerInitialize(&argc, &argv);
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--optional") == 0) {
            optional = 1;
            continue;
        }
        struct stat st;
        if (stat(argv[i], &st) != 0) {
            if (!optional) {
                fprintf(stderr, "replay: %s: %s\n", argv[i], strerror(errno));
                failed = 1;
            }
            continue;
        }
        if ((S_ISDIR(st.st_mode) ? s_run_dir(argv[i]) : s_run_file(argv[i])) != 0)
            failed = 1;
    }
    fprintf(stderr, "replay: %zu input(s) ran without a crash\n", s_runs);
    return failed ? 1 : 0;
}
