/* One running instance per data directory (ml_lock.h). */
#include "ml_lock.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ml_common.h"

int ml_lock_take(const char *dir, const char *name, int *fd_out, char *err, size_t errlen)
{
    char path[4096];
    int n = snprintf(path, sizeof path, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= sizeof path) {
        ml_seterr(err, errlen, "lock file path too long: %s/%s", dir, name);
        return ML_EINVAL;
    }
    int fd = open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        ml_seterr(err, errlen, "cannot open the lock file %s: %s", path, strerror(errno));
        return ML_EIO;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ml_seterr(err, errlen, "the lock file %s is not a regular file", path);
        close(fd);
        return ML_EIO;
    }
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
    if (fcntl(fd, F_SETLK, &fl) != 0) {
        int e = errno;
        if (e == EACCES || e == EAGAIN) {
            /* Who holds it: the kernel knows for sure (F_GETLK); the pid in
             * the file is what we say when the kernel does not tell. */
            struct flock q = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
            long pid = 0;
            if (fcntl(fd, F_GETLK, &q) == 0 && q.l_type != F_UNLCK)
                pid = (long)q.l_pid;
            if (pid <= 0) {
                char buf[32] = "";
                ssize_t r = pread(fd, buf, sizeof buf - 1, 0);
                if (r > 0) {
                    buf[r] = '\0';
                    pid = strtol(buf, NULL, 10);
                }
            }
            ml_seterr(err, errlen,
                      "another instance (pid %ld) is already running on this data directory: it "
                      "holds the lock file %s",
                      pid, path);
            close(fd);
            return ML_EDENIED;
        }
        ml_seterr(err, errlen, "cannot lock %s: %s", path, strerror(e));
        close(fd);
        return ML_EIO;
    }
    char buf[32];
    int len = snprintf(buf, sizeof buf, "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) != 0 || pwrite(fd, buf, (size_t)len, 0) != len) {
        ml_seterr(err, errlen, "cannot write our pid into the lock file %s: %s", path,
                  strerror(errno));
        close(fd);
        return ML_EIO;
    }
    *fd_out = fd;
    return 0;
}
