/* File-system helpers (ml_fs.h): the spool-safe opens, atomic writes,
 * listings, copies, fsyncs and removals, moved here from ml_common.c so
 * that the spool, the imaging code and the key files share one copy. */
#include "ml_fs.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/rand.h>

#include "ml_common.h"

int ml_write_file_atomic(const char *path, const void *data, size_t len)
{
    char dir[4096];
    int n = snprintf(dir, sizeof dir, "%s", path);
    if (n < 0 || (size_t)n >= sizeof dir)
        return ML_EINVAL;
    const char *name = path;
    char *slash = strrchr(dir, '/');
    if (slash) {
        name = path + (slash - dir) + 1;
        if (slash == dir)
            slash[1] = '\0';
        else
            *slash = '\0';
    } else {
        strcpy(dir, ".");
    }
    if (!*name) {
        errno = EISDIR;
        return ML_EIO;
    }
    /* The folder is the caller's (it may be a link an operator made); the
     * file inside is created safely by ml_write_file_at. */
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return ML_EIO;
    int rc = ml_write_file_at(dfd, name, data, len, 0640);
    int saved = errno;
    close(dfd);
    errno = saved;
    return rc;
}

int ml_dir_open(int dfd, const char *name)
{
    int fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return ML_EIO;
    return fd;
}

int ml_file_create_excl(int dfd, const char *name, unsigned mode)
{
    int fd = openat(dfd, name, O_CREAT | O_EXCL | O_NOFOLLOW | O_WRONLY | O_CLOEXEC, (mode_t)mode);
    if (fd < 0)
        return ML_EIO;
    return fd;
}

int ml_file_open_regular(int dfd, const char *name, struct stat *st)
{
    struct stat local;
    if (!st)
        st = &local;
    /* O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
     * writer for ever, stalling the whole agent loop. */
    int fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
        return ML_EIO;
    if (fstat(fd, st) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return ML_EIO;
    }
    if (!S_ISREG(st->st_mode)) {
        close(fd);
        errno = EINVAL;
        return ML_EINVAL;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        (void)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    return fd;
}

const char *ml_file_type_name(unsigned st_mode)
{
    mode_t m = (mode_t)st_mode;
    if (S_ISREG(m))
        return "regular file";
    if (S_ISDIR(m))
        return "directory";
    if (S_ISLNK(m))
        return "symbolic link";
    if (S_ISFIFO(m))
        return "FIFO";
    if (S_ISSOCK(m))
        return "socket";
    return "device";
}

/* The temporary name for name: hidden, ending in .tmp (so no spool scan
 * takes it), with 64 random bits so that nobody can plant something at it
 * in advance. The stem is cut so the result fits NAME_MAX. */
static int s_tmp_name(const char *name, char *out, size_t len)
{
    uint8_t r[8];
    char hex[17];
    static const char digits[] = "0123456789abcdef";
    if (RAND_bytes(r, sizeof r) != 1) {
        errno = EIO;
        return ML_EIO;
    }
    for (int i = 0; i < 8; i++) {
        hex[2 * i] = digits[r[i] >> 4];
        hex[2 * i + 1] = digits[r[i] & 15];
    }
    hex[16] = '\0';
    int n = snprintf(out, len, ".%.200s.%s.tmp", name, hex);
    return (n < 0 || (size_t)n >= len) ? ML_EINVAL : 0;
}

int ml_write_file_at(int dfd, const char *name, const void *data, size_t len, unsigned mode)
{
    char tmp[256];
    int fd = -1;
    int made = 0;
    /* A clash with a random name means someone is guessing; a few tries
     * still succeed unless that someone is very lucky. */
    for (int attempt = 0; attempt < 4 && fd < 0; attempt++) {
        if (s_tmp_name(name, tmp, sizeof tmp) < 0)
            return ML_EIO;
        fd = ml_file_create_excl(dfd, tmp, mode);
        if (fd < 0 && errno != EEXIST)
            return ML_EIO;
    }
    if (fd < 0)
        return ML_EIO;
    made = 1;
    const uint8_t *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            goto out;
        }
        p += w;
        left -= (size_t)w;
    }
    if (fsync(fd) != 0)
        goto out;
    if (close(fd) != 0) {
        fd = -1;
        goto out;
    }
    fd = -1;
    if (renameat(dfd, tmp, dfd, name) != 0)
        goto out;
    /* fsync the folder so the rename itself survives a crash. */
    (void)fsync(dfd);
    return 0;
out : {
    int saved = errno;
    if (fd >= 0)
        close(fd);
    if (made)
        unlinkat(dfd, tmp, 0);
    errno = saved;
}
    return ML_EIO;
}

int ml_read_file_at(int dfd, const char *name, size_t max, char **out, size_t *len,
                    unsigned *st_mode)
{
    struct stat st;
    int rc = ML_EIO;
    char *buf = NULL;
    int fd = ml_file_open_regular(dfd, name, &st);
    if (fd == ML_EINVAL && st_mode)
        *st_mode = (unsigned)st.st_mode;
    if (fd < 0)
        return fd;
    if (st_mode)
        *st_mode = (unsigned)st.st_mode;
    if ((uint64_t)st.st_size > max) {
        rc = ML_ETOOBIG;
        goto out;
    }
    size_t size = (size_t)st.st_size;
    if (!(buf = malloc(size + 1))) {
        rc = ML_ENOMEM;
        goto out;
    }
    size_t got = 0;
    while (got < size) {
        ssize_t r = pread(fd, buf + got, size - got, (off_t)got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            goto out;
        if (r == 0)
            break; /* shrank since the fstat: read what is there */
        got += (size_t)r;
    }
    buf[got] = '\0';
    *out = buf;
    buf = NULL;
    if (len)
        *len = got;
    rc = 0;
out : {
    int saved = errno;
    free(buf);
    close(fd);
    errno = saved;
}
    return rc;
}

static int s_rmtree_at(int dfd, const char *name, int depth)
{
    if (unlinkat(dfd, name, 0) == 0 || errno == ENOENT)
        return 0;
    if (errno != EISDIR && errno != EPERM)
        return ML_EIO;
    if (depth > 8) {
        errno = ELOOP;
        return ML_EIO;
    }
    int fd = ml_dir_open(dfd, name);
    if (fd < 0)
        return errno == ENOENT ? 0 : ML_EIO;
    DIR *d = fdopendir(fd);
    if (!d) {
        close(fd);
        return ML_EIO;
    }
    int rc = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (s_rmtree_at(dirfd(d), de->d_name, depth + 1) < 0)
            rc = ML_EIO;
    }
    closedir(d);
    if (unlinkat(dfd, name, AT_REMOVEDIR) != 0 && errno != ENOENT)
        rc = ML_EIO;
    return rc;
}

int ml_rmtree_at(int dfd, const char *name)
{
    return s_rmtree_at(dfd, name, 0);
}

int ml_read_file(const char *path, size_t max, char **out, size_t *len)
{
    int rc = ML_EIO;
    char *buf = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return ML_EIO;
    struct stat st;
    if (fstat(fileno(f), &st) != 0)
        goto out;
    if ((size_t)st.st_size > max) {
        rc = ML_ETOOBIG;
        goto out;
    }
    buf = malloc((size_t)st.st_size + 1);
    if (!buf) {
        rc = ML_ENOMEM;
        goto out;
    }
    size_t n = fread(buf, 1, (size_t)st.st_size, f);
    if (n != (size_t)st.st_size)
        goto out;
    buf[n] = '\0';
    *out = buf;
    buf = NULL;
    if (len)
        *len = n;
    rc = 0;
out:
    free(buf);
    fclose(f);
    return rc;
}

int ml_mkdirs(const char *path)
{
    char tmp[4096];
    int n = snprintf(tmp, sizeof tmp, "%s", path);
    if (n < 0 || (size_t)n >= sizeof tmp)
        return ML_EINVAL;
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            if (mkdir(tmp, 0750) != 0 && errno != EEXIST)
                return ML_EIO;
            *p = '/';
        }
    }
    if (mkdir(tmp, 0750) != 0 && errno != EEXIST)
        return ML_EIO;
    return 0;
}

int ml_fs_fsync_parent(const char *path)
{
    char dir[4096];
    int n = snprintf(dir, sizeof dir, "%s", path);
    if (n < 0 || (size_t)n >= sizeof dir) {
        errno = ENAMETOOLONG;
        return ML_EINVAL;
    }
    char *slash = strrchr(dir, '/');
    if (!slash)
        strcpy(dir, ".");
    else if (slash == dir)
        slash[1] = '\0';
    else
        *slash = '\0';
    /* Opened by name and followed: the folder is the caller's choice. */
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return ML_EIO;
    int rc = fsync(fd) == 0 ? 0 : ML_EIO;
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

int ml_fs_fsync_dir(int dirfd, const char *name)
{
    int fd = ml_dir_open(dirfd, name);
    if (fd < 0)
        return ML_EIO;
    int rc = fsync(fd) == 0 ? 0 : ML_EIO;
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

int ml_fs_rmtree(const char *path)
{
    char parent[4096];
    int n = snprintf(parent, sizeof parent, "%s", path);
    if (n < 0 || (size_t)n >= sizeof parent) {
        errno = ENAMETOOLONG;
        return ML_EIO;
    }
    char *slash = strrchr(parent, '/');
    if (!slash || !slash[1]) {
        errno = EINVAL;
        return ML_EINVAL;
    }
    *slash = '\0';
    int dfd = ml_dir_open(AT_FDCWD, parent[0] ? parent : "/");
    if (dfd < 0)
        return errno == ENOENT ? 0 : ML_EIO;
    int rc = ml_rmtree_at(dfd, slash + 1);
    int saved = errno;
    close(dfd);
    errno = saved;
    return rc;
}

static int s_cmp_entry(const void *a, const void *b)
{
    return strcmp(((const ml_fs_entry_t *)a)->name, ((const ml_fs_entry_t *)b)->name);
}

void ml_fs_list_free(ml_fs_entry_t *entries, size_t n)
{
    for (size_t i = 0; entries && i < n; i++)
        free(entries[i].name);
    free(entries);
}

int ml_fs_list(int dirfd, int (*want)(const char *name, void *arg), void *arg, ml_fs_entry_t **out,
               size_t *count)
{
    int rc = ML_EIO;
    ml_fs_entry_t *v = NULL;
    size_t n = 0, cap = 0;
    DIR *d = NULL;
    *out = NULL;
    *count = 0;
    /* A fresh open file description of the folder, so the listing has its
     * own position and the caller's fd stays for its openat calls
     * (fdopendir takes the fd). */
    int fd = openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        goto out;
    if (!(d = fdopendir(fd))) {
        int saved = errno;
        close(fd);
        errno = saved;
        goto out;
    }
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (want && !want(de->d_name, arg))
            continue;
        unsigned mode;
        if (de->d_type == DT_REG) {
            mode = S_IFREG;
        } else {
            struct stat st;
            if (fstatat(dirfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0)
                continue; /* gone since readdir */
            mode = (unsigned)st.st_mode;
        }
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 64;
            ml_fs_entry_t *nv = realloc(v, ncap * sizeof *nv);
            if (!nv) {
                rc = ML_ENOMEM;
                goto out;
            }
            v = nv;
            cap = ncap;
        }
        if (!(v[n].name = strdup(de->d_name))) {
            rc = ML_ENOMEM;
            goto out;
        }
        v[n++].mode = mode & S_IFMT;
    }
    if (n > 1)
        qsort(v, n, sizeof *v, s_cmp_entry);
    *out = v;
    *count = n;
    v = NULL;
    n = 0;
    rc = 0;
out:
    ml_fs_list_free(v, n);
    if (d)
        closedir(d);
    return rc;
}

#define S_COPY_BLOCK (256u * 1024)

/* Writes len bytes of buf to fd, retrying short writes and EINTR. */
static int s_write_all(int fd, const uint8_t *buf, size_t len)
{
    for (size_t w = 0; w < len;) {
        ssize_t k = write(fd, buf + w, len - w);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return ML_EIO;
        }
        w += (size_t)k;
    }
    return 0;
}

int ml_fs_copy_hash(int in, int dirfd, const char *name, atomic_int *cancel, uint64_t *size,
                    char sha[ML_FS_SHA256_HEX + 1])
{
    int rc = ML_EIO, out = -1, made = 0;
    char tmp[256];
    uint8_t *buf = NULL;
    uint64_t total = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx || !(buf = malloc(S_COPY_BLOCK))) {
        rc = ML_ENOMEM;
        goto out;
    }
    int len = snprintf(tmp, sizeof tmp, "%s.tmp", name);
    if (len < 0 || (size_t)len >= sizeof tmp) {
        errno = ENAMETOOLONG;
        goto out;
    }
    /* The target folder is the caller's own and was made for this copy:
     * anything at the name is a leftover, never to be written through. */
    unlinkat(dirfd, tmp, 0);
    if ((out = ml_file_create_excl(dirfd, tmp, 0640)) < 0)
        goto out;
    made = 1;
    if (EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1)
        goto out;
    for (;;) {
        if (cancel && atomic_load(cancel)) {
            rc = ML_ECLOSED;
            goto out;
        }
        ssize_t r = pread(in, buf, S_COPY_BLOCK, (off_t)total);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            goto out;
        }
        if (r == 0)
            break;
        if (EVP_DigestUpdate(ctx, buf, (size_t)r) != 1 || s_write_all(out, buf, (size_t)r) < 0)
            goto out;
        total += (uint64_t)r;
    }
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (EVP_DigestFinal_ex(ctx, md, &mdlen) != 1 || mdlen != 32)
        goto out;
    static const char hex[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        sha[2 * i] = hex[md[i] >> 4];
        sha[2 * i + 1] = hex[md[i] & 15];
    }
    sha[ML_FS_SHA256_HEX] = '\0';
    if (fsync(out) != 0)
        goto out;
    if (close(out) != 0) {
        out = -1;
        goto out;
    }
    out = -1;
    if (renameat(dirfd, tmp, dirfd, name) != 0)
        goto out;
    *size = total;
    rc = 0;
out : {
    int saved = errno;
    if (out >= 0)
        close(out);
    if (rc < 0 && made)
        unlinkat(dirfd, tmp, 0);
    free(buf);
    EVP_MD_CTX_free(ctx);
    errno = saved;
}
    return rc;
}

int ml_fs_copy_file(int sdirfd, const char *src, int ddirfd, const char *dst)
{
    int rc = ML_EIO, in = -1, out = -1;
    uint8_t *buf = malloc(S_COPY_BLOCK);
    if (!buf)
        return ML_ENOMEM;
    if ((in = ml_file_open_regular(sdirfd, src, NULL)) < 0 ||
        (out = ml_file_create_excl(ddirfd, dst, 0640)) < 0)
        goto out;
    for (;;) {
        ssize_t r = read(in, buf, S_COPY_BLOCK);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            goto out;
        if (r == 0)
            break;
        if (s_write_all(out, buf, (size_t)r) < 0)
            goto out;
    }
    if (fsync(out) != 0)
        goto out;
    rc = 0;
out : {
    int saved = errno;
    if (in >= 0)
        close(in);
    if (out >= 0)
        close(out);
    free(buf);
    errno = saved;
}
    return rc;
}
