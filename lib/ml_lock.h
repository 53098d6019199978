/* One running instance per data directory: an exclusive lock on a lock
 * file in it, held for the life of the process.
 *
 * Two medlinkd on one data_dir, or two agents started with one config,
 * would both open the same SQLite files and (for agents) take turns
 * superseding each other's session at the broker. A POSIX record lock
 * (fcntl F_SETLK) on DIR/NAME says "taken" to a second process at once and
 * goes away by itself when the holder exits or crashes, so there is no
 * stale lock to clean up. The holder's pid is written into the file so
 * that the second instance can say who holds it. */
#ifndef ML_LOCK_H
#define ML_LOCK_H

#include <stddef.h>

/* Takes the exclusive lock on dir/name (created mode 0600 if missing; the
 * path is opened with O_NOFOLLOW, so a symlink planted there is refused)
 * and writes our pid into it. On success *fd_out is the open descriptor
 * that holds the lock: keep it open until exit (closing it releases the
 * lock). Returns 0; ML_EDENIED when another process holds it (err names
 * the lock file and that process's pid); ML_EIO when the file cannot be
 * opened or locked (err says why). Not thread-safe with other code that
 * opens and closes the same file in this process (POSIX record locks are
 * per process). Cost: a few system calls. */
int ml_lock_take(const char *dir, const char *name, int *fd_out, char *err, size_t errlen);

#endif
