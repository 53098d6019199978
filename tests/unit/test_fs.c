/* lib/ml_fs, the file helpers for folders someone else can write
 * (F1/F2/F12 in docs/security.md): an atomic write never follows a link
 * planted at its temporary or final name, opens refuse links and never
 * block on a FIFO, rm -rf never leaves its tree through a link, a listing
 * names links and FIFOs without touching them, and a copy-while-hashing
 * never writes through a link planted at its temporary name. */
#include <errno.h>
#include <stdatomic.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <criterion/criterion.h>

#include "ml_common.h"
#include "ml_fs.h"
#include "ml_imaging.h"
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

TestSuite(fs, .init = s_setup, .fini = s_teardown, .timeout = 20);

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
Test(fs, f1_write_atomic_ignores_link_at_old_temp_name)
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
Test(fs, f1_write_at_replaces_link_at_final_name)
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

Test(fs, f1_create_excl_refuses_any_existing_name)
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

Test(fs, f2_open_regular_refuses_link_fifo_and_folder)
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

Test(fs, f1_dir_open_refuses_link)
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
Test(fs, f1_rmtree_at_never_follows_links)
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

/* A listing names each entry with its own type: a link is a link (its
 * target is never looked at), a FIFO is a FIFO (never opened, so the
 * listing cannot block on it), and the names come sorted. */
Test(fs, list_names_links_and_fifos_without_following_them)
{
    char p[700], t[700];
    s_join(p, sizeof p, "b.dcm");
    s_write(p, "x");
    s_join(p, sizeof p, "a-dir");
    cr_assert_eq(mkdir(p, 0700), 0);
    s_join(p, sizeof p, "c-fifo");
    cr_assert_eq(mkfifo(p, 0600), 0);
    s_join(t, sizeof t, "b.dcm");
    s_join(p, sizeof p, "d-link");
    cr_assert_eq(symlink(t, p), 0);
    s_join(p, sizeof p, ".hidden");
    s_write(p, "h");
    int dfd = ml_dir_open(AT_FDCWD, s_dir);
    cr_assert(dfd >= 0);
    ml_fs_entry_t *e = NULL;
    size_t n = 0;
    cr_assert_eq(ml_fs_list(dfd, NULL, NULL, &e, &n), 0);
    cr_assert_eq(n, 5);
    cr_assert_str_eq(e[0].name, ".hidden");
    cr_assert_str_eq(e[1].name, "a-dir");
    cr_assert(S_ISDIR((mode_t)e[1].mode));
    cr_assert_str_eq(e[2].name, "b.dcm");
    cr_assert(S_ISREG((mode_t)e[2].mode));
    cr_assert_str_eq(e[3].name, "c-fifo");
    cr_assert(S_ISFIFO((mode_t)e[3].mode));
    cr_assert_str_eq(e[4].name, "d-link");
    cr_assert(S_ISLNK((mode_t)e[4].mode), "a link is listed as a link, not as its target");
    ml_fs_list_free(e, n);
    close(dfd);
}

static int s_no_dot(const char *name, void *arg)
{
    (void)arg;
    return name[0] != '.';
}

/* The filter decides, and the listing keeps the caller's dirfd usable. */
Test(fs, list_filter_and_fresh_position)
{
    char p[700];
    for (int i = 3; i > 0; i--) {
        char name[32];
        snprintf(name, sizeof name, "f%d", i);
        s_join(p, sizeof p, name);
        s_write(p, "x");
    }
    s_join(p, sizeof p, ".skip");
    s_write(p, "x");
    int dfd = ml_dir_open(AT_FDCWD, s_dir);
    cr_assert(dfd >= 0);
    ml_fs_entry_t *e = NULL;
    size_t n = 0;
    for (int round = 0; round < 2; round++) {
        cr_assert_eq(ml_fs_list(dfd, s_no_dot, NULL, &e, &n), 0);
        cr_assert_eq(n, 3, "round %d", round);
        cr_assert_str_eq(e[0].name, "f1");
        cr_assert_str_eq(e[2].name, "f3");
        ml_fs_list_free(e, n);
    }
    close(dfd);
    ml_fs_list_free(NULL, 0);
}

/* The copy has the source's bytes and SHA-256; a link planted at the
 * temporary name is removed, never written through. */
Test(fs, copy_hash_never_writes_through_a_link_at_its_temp_name)
{
    char src[700], precious[700], tmp[700], dst[700];
    s_join(src, sizeof src, "src");
    s_write(src, "DICM study bytes");
    s_join(precious, sizeof precious, "precious");
    s_write(precious, "keep");
    s_join(tmp, sizeof tmp, "0.dcm.tmp");
    cr_assert_eq(symlink(precious, tmp), 0);
    int dfd = ml_dir_open(AT_FDCWD, s_dir);
    cr_assert(dfd >= 0);
    int in = ml_file_open_regular(dfd, "src", NULL);
    cr_assert(in >= 0);
    uint64_t size = 0;
    char sha[ML_FS_SHA256_HEX + 1], want[ML_SHA256_HEX + 1];
    atomic_int cancel;
    atomic_init(&cancel, 0);
    cr_assert_eq(ml_fs_copy_hash(in, dfd, "0.dcm", &cancel, &size, sha), 0);
    ml_sha256_hex("DICM study bytes", 16, want);
    cr_assert_eq(size, 16);
    cr_assert_str_eq(sha, want);
    s_join(dst, sizeof dst, "0.dcm");
    char *got = s_read(dst);
    cr_assert_str_eq(got, "DICM study bytes");
    free(got);
    got = s_read(precious);
    cr_assert_str_eq(got, "keep");
    free(got);
    cr_assert(faccessat(dfd, "0.dcm.tmp", F_OK, AT_SYMLINK_NOFOLLOW) != 0);
    /* A cancelled copy stops and leaves nothing behind. */
    atomic_store(&cancel, 1);
    cr_assert_eq(ml_fs_copy_hash(in, dfd, "1.dcm", &cancel, &size, sha), ML_ECLOSED);
    cr_assert(faccessat(dfd, "1.dcm", F_OK, AT_SYMLINK_NOFOLLOW) != 0);
    cr_assert(faccessat(dfd, "1.dcm.tmp", F_OK, AT_SYMLINK_NOFOLLOW) != 0);
    close(in);
    close(dfd);
}

/* A copy neither reads through a link or a FIFO (which would block) nor
 * writes over anything that exists. */
Test(fs, copy_file_refuses_link_fifo_and_existing_target)
{
    char p[700], t[700];
    s_join(p, sizeof p, "real");
    s_write(p, "data");
    s_join(t, sizeof t, "link");
    cr_assert_eq(symlink(p, t), 0);
    s_join(p, sizeof p, "fifo");
    cr_assert_eq(mkfifo(p, 0600), 0);
    s_join(p, sizeof p, "out");
    cr_assert_eq(mkdir(p, 0700), 0);
    int dfd = ml_dir_open(AT_FDCWD, s_dir);
    int ofd = ml_dir_open(dfd, "out");
    cr_assert(dfd >= 0 && ofd >= 0);
    cr_assert_eq(ml_fs_copy_file(dfd, "real", ofd, "copy"), 0);
    s_join(p, sizeof p, "out/copy");
    char *got = s_read(p);
    cr_assert_str_eq(got, "data");
    free(got);
    cr_assert_eq(ml_fs_copy_file(dfd, "real", ofd, "copy"), ML_EIO, "the target exists");
    cr_assert_eq(ml_fs_copy_file(dfd, "link", ofd, "from-link"), ML_EIO);
    cr_assert_eq(errno, ELOOP);
    cr_assert_eq(ml_fs_copy_file(dfd, "fifo", ofd, "from-fifo"), ML_EIO);
    close(ofd);
    close(dfd);
}

/* rm -rf by path: a link as the last component is removed itself. */
Test(fs, rmtree_path_removes_a_link_not_its_target)
{
    char p[700], l[700];
    s_join(p, sizeof p, "outside");
    cr_assert_eq(mkdir(p, 0700), 0);
    s_join(p, sizeof p, "outside/precious");
    s_write(p, "keep");
    s_join(p, sizeof p, "outside");
    s_join(l, sizeof l, "blobs");
    cr_assert_eq(symlink(p, l), 0);
    cr_assert_eq(ml_fs_rmtree(l), 0);
    cr_assert(access(l, F_OK) != 0);
    s_join(p, sizeof p, "outside/precious");
    cr_assert_eq(access(p, F_OK), 0);
    s_join(p, sizeof p, "outside");
    cr_assert_eq(ml_fs_rmtree(p), 0);
    cr_assert(access(p, F_OK) != 0);
    cr_assert_eq(ml_fs_rmtree(p), 0, "nothing there is not an error");
    cr_assert_eq(ml_fs_rmtree("noslash"), ML_EINVAL);
}

/* fsync of a folder by dirfd refuses a link; of a file's parent by path
 * works for a plain name. */
Test(fs, fsync_dir_refuses_link_and_fsync_parent_works)
{
    char p[700], l[700];
    s_join(p, sizeof p, "d");
    cr_assert_eq(mkdir(p, 0700), 0);
    s_join(l, sizeof l, "dl");
    cr_assert_eq(symlink(p, l), 0);
    int dfd = ml_dir_open(AT_FDCWD, s_dir);
    cr_assert_eq(ml_fs_fsync_dir(dfd, "d"), 0);
    cr_assert_eq(ml_fs_fsync_dir(dfd, "."), 0);
    cr_assert_eq(ml_fs_fsync_dir(dfd, "dl"), ML_EIO);
    close(dfd);
    s_join(p, sizeof p, "d/file");
    s_write(p, "x");
    cr_assert_eq(ml_fs_fsync_parent(p), 0);
    s_join(p, sizeof p, "missing/file");
    cr_assert_eq(ml_fs_fsync_parent(p), ML_EIO);
}
