/* The file helpers of ml_common for folders someone else can write
 * (F1/F2/F12 in docs/security.md): an atomic write never follows a link
 * planted at its temporary or final name, opens refuse links and never
 * block on a FIFO, and rm -rf never leaves its tree through a link. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include "ml_common.h"
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

TestSuite(files, .init = s_setup, .fini = s_teardown, .timeout = 20);

static void s_write(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    cr_assert(f, "cannot write %s", path);
    fputs(text, f);
    fclose(f);
}

static char *s_read(const char *path)
{
    char *buf = NULL;
    if (ml_read_file(path, 1 << 20, &buf, NULL) != 0)
        return NULL;
    return buf;
}

static void s_join(char *out, size_t len, const char *name)
{
    int n = snprintf(out, len, "%s/%s", s_dir, name);
    cr_assert(n > 0 && (size_t)n < len);
}

/* The temporary name the old code used (PATH.tmp.<pid>) holds a link to a
 * precious file: the write must not go through it. */
Test(files, f1_write_atomic_ignores_link_at_old_temp_name)
{
    char target[700], path[700], link[800];
    s_join(target, sizeof target, "agent.db");
    s_join(path, sizeof path, "out.json");
    s_write(target, "SQLite format 3");
    snprintf(link, sizeof link, "%s.tmp.%ld", path, (long)getpid());
    cr_assert_eq(symlink(target, link), 0);
    cr_assert_eq(ml_write_file_atomic(path, "{}\n", 3), 0);
    char *t = s_read(target);
    cr_assert_str_eq(t, "SQLite format 3");
    free(t);
    char *o = s_read(path);
    cr_assert_str_eq(o, "{}\n");
    free(o);
    struct stat st;
    cr_assert_eq(lstat(link, &st), 0);
    cr_assert(S_ISLNK(st.st_mode), "the planted link was touched");
}

/* A link at the final name is replaced by the new file, its target left
 * alone; no temporary file stays behind. */
Test(files, f1_write_at_replaces_link_at_final_name)
{
    char target[700], link[700];
    s_join(target, sizeof target, "victim");
    s_join(link, sizeof link, "final.json");
    s_write(target, "keep");
    cr_assert_eq(symlink(target, link), 0);
    int dfd = ml_dir_open(AT_FDCWD, s_dir);
    cr_assert(dfd >= 0);
    cr_assert_eq(ml_write_file_at(dfd, "final.json", "new", 3, 0640), 0);
    struct stat st;
    cr_assert_eq(fstatat(dfd, "final.json", &st, AT_SYMLINK_NOFOLLOW), 0);
    cr_assert(S_ISREG(st.st_mode));
    char *t = s_read(target);
    cr_assert_str_eq(t, "keep");
    free(t);
    int left = ml_test_sh("ls -a '%s' | grep -q '\\.tmp$'", s_dir);
    cr_assert_neq(left, 0, "a temporary file was left behind");
    close(dfd);
}

Test(files, f1_create_excl_refuses_any_existing_name)
{
    char target[700], link[700];
    s_join(target, sizeof target, "victim");
    s_join(link, sizeof link, "planted");
    s_write(target, "keep");
    cr_assert_eq(symlink(target, link), 0);
    int dfd = ml_dir_open(AT_FDCWD, s_dir);
    cr_assert(dfd >= 0);
    cr_assert_eq(ml_file_create_excl(dfd, "planted", 0600), ML_EIO);
    cr_assert_eq(errno, EEXIST);
    /* A dangling link too: O_EXCL never creates its target. */
    cr_assert_eq(symlinkat("nowhere", dfd, "dangling"), 0);
    cr_assert_eq(ml_file_create_excl(dfd, "dangling", 0600), ML_EIO);
    cr_assert(faccessat(dfd, "nowhere", F_OK, 0) != 0);
    close(dfd);
}

Test(files, f2_open_regular_refuses_link_fifo_and_folder)
{
    char p[700];
    s_join(p, sizeof p, "real");
    s_write(p, "data");
    int dfd = ml_dir_open(AT_FDCWD, s_dir);
    cr_assert(dfd >= 0);
    cr_assert_eq(symlinkat("real", dfd, "link"), 0);
    cr_assert_eq(mkfifoat(dfd, "fifo", 0600), 0);
    cr_assert_eq(mkdirat(dfd, "folder", 0700), 0);
    struct stat st;
    int fd = ml_file_open_regular(dfd, "real", &st);
    cr_assert(fd >= 0);
    cr_assert_eq(st.st_size, 4);
    /* Blocking mode is restored for the reads that follow. */
    cr_assert_eq(fcntl(fd, F_GETFL) & O_NONBLOCK, 0);
    close(fd);
    cr_assert_eq(ml_file_open_regular(dfd, "link", &st), ML_EIO);
    cr_assert_eq(errno, ELOOP);
    /* A FIFO with no writer: refused at once (the suite's timeout would
     * catch a blocking open). */
    cr_assert_eq(ml_file_open_regular(dfd, "fifo", &st), ML_EINVAL);
    cr_assert(S_ISFIFO(st.st_mode));
    cr_assert_str_eq(ml_file_type_name((unsigned)st.st_mode), "FIFO");
    cr_assert_eq(ml_file_open_regular(dfd, "folder", &st), ML_EINVAL);
    cr_assert_str_eq(ml_file_type_name((unsigned)st.st_mode), "directory");
    char *text = NULL;
    size_t len = 0;
    unsigned mode = 0;
    cr_assert_eq(ml_read_file_at(dfd, "real", 100, &text, &len, &mode), 0);
    cr_assert_str_eq(text, "data");
    free(text);
    cr_assert_eq(ml_read_file_at(dfd, "real", 3, &text, &len, &mode), ML_ETOOBIG);
    cr_assert_eq(ml_read_file_at(dfd, "fifo", 100, &text, &len, &mode), ML_EINVAL);
    cr_assert(S_ISFIFO((mode_t)mode));
    close(dfd);
}

Test(files, f1_dir_open_refuses_link)
{
    char p[700], l[700];
    s_join(p, sizeof p, "real");
    s_join(l, sizeof l, "link");
    cr_assert_eq(mkdir(p, 0700), 0);
    cr_assert_eq(symlink(p, l), 0);
    int fd = ml_dir_open(AT_FDCWD, p);
    cr_assert(fd >= 0);
    close(fd);
    cr_assert_eq(ml_dir_open(AT_FDCWD, l), ML_EIO);
    cr_assert(errno == ELOOP || errno == ENOTDIR);
}

/* rm -rf of a tree holding a link to a folder outside it: the link goes,
 * what it points at stays. */
Test(files, f1_rmtree_at_never_follows_links)
{
    char p[700];
    s_join(p, sizeof p, "outside");
    cr_assert_eq(mkdir(p, 0700), 0);
    s_join(p, sizeof p, "outside/precious");
    s_write(p, "keep");
    s_join(p, sizeof p, "tree");
    cr_assert_eq(mkdir(p, 0700), 0);
    s_join(p, sizeof p, "tree/sub");
    cr_assert_eq(mkdir(p, 0700), 0);
    s_join(p, sizeof p, "tree/sub/file");
    s_write(p, "x");
    char out[700], l[700];
    s_join(out, sizeof out, "outside");
    s_join(l, sizeof l, "tree/sub/escape");
    cr_assert_eq(symlink(out, l), 0);
    int dfd = ml_dir_open(AT_FDCWD, s_dir);
    cr_assert(dfd >= 0);
    cr_assert_eq(ml_rmtree_at(dfd, "tree"), 0);
    cr_assert(faccessat(dfd, "tree", F_OK, AT_SYMLINK_NOFOLLOW) != 0);
    cr_assert_eq(faccessat(dfd, "outside/precious", F_OK, 0), 0);
    cr_assert_eq(ml_rmtree_at(dfd, "tree"), 0, "a missing tree is not an error");
    close(dfd);
}
