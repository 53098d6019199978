/* File-system helpers: every open, listing, copy, fsync and removal that
 * medlink does in folders, in one place.
 *
 * Two kinds of folder are written. The caller's own (data_dir, a key
 * file's folder, a configuration's) are named by path and may be links an
 * operator made. Folders someone else can write (the spool folders) are
 * reached only through directory fds the caller holds: every open there
 * never follows a symbolic link (O_NOFOLLOW), never blocks on a FIFO
 * (O_NONBLOCK), and every file medlink creates is made new (O_EXCL) under
 * an unpredictable name and renamed into place within the same folder. A
 * name planted there in advance (a link to agent.db, a FIFO) is therefore
 * never written through, read through or waited on. See docs/security.md,
 * "Files the local system can write".
 *
 * Every function returns 0 (or an fd) or a negative ML_E* code
 * (ml_common.h) and keeps errno on failure. None keeps state: any thread. */
#ifndef ML_FS_H
#define ML_FS_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

struct stat;

/* Hex digits of a SHA-256 (the same as ML_SHA256_HEX in ml_imaging.h). */
#define ML_FS_SHA256_HEX 64

/* ---- paths the caller chose ---- */

/* Writes len bytes to path atomically: ml_write_file_at in path's folder
 * (opened by name: the folder is the caller's choice). Returns 0, ML_EINVAL
 * (path too long) or ML_EIO (errno kept). */
int ml_write_file_atomic(const char *path, const void *data, size_t len);
/* Reads a whole file (up to max bytes) into a malloc'd, NUL-terminated
 * buffer. Returns 0, ML_EIO, ML_ETOOBIG or ML_ENOMEM. For files the caller
 * chose (configuration); a file in a folder someone else can write is read
 * with ml_read_file_at. */
int ml_read_file(const char *path, size_t max, char **out, size_t *len);
/* mkdir -p with mode 0750. Returns 0, ML_EINVAL (path too long) or
 * ML_EIO. */
int ml_mkdirs(const char *path);
/* fsyncs the folder that holds path (opened by name, like the file: the
 * caller's choice), so that a file just created or renamed there survives
 * a crash by name too. Returns 0 or ML_EIO. */
int ml_fs_fsync_parent(const char *path);
/* rm -rf of path: its parent folder is opened by name, then path's last
 * component is removed with ml_rmtree_at, so a link as the last component,
 * planted anywhere inside, or swapped in while it runs, is removed itself
 * and never followed. Returns 0 (also when nothing is there), ML_EINVAL
 * (no last component) or ML_EIO. */
int ml_fs_rmtree(const char *path);

/* ---- folders someone else can write: relative to a held dirfd ---- */

/* Opens the folder path, or name inside the folder dirfd (dirfd may be
 * AT_FDCWD), for use as a dirfd: O_DIRECTORY | O_NOFOLLOW, so a symbolic
 * link in the last component is refused (errno ELOOP or ENOTDIR). Returns
 * the fd (>= 0, the caller's) or ML_EIO. */
int ml_dir_open(int dirfd, const char *name);
/* fsyncs the folder name in dirfd (opened with ml_dir_open; "." for dirfd
 * itself), so that the entries made or renamed in it survive a crash.
 * Returns 0 or ML_EIO. */
int ml_fs_fsync_dir(int dirfd, const char *name);
/* Creates name in dirfd for writing: O_CREAT | O_EXCL | O_NOFOLLOW, so it
 * fails (EEXIST) when anything at all has that name. Returns the fd or
 * ML_EIO. */
int ml_file_create_excl(int dirfd, const char *name, unsigned mode);
/* Opens name in dirfd for reading without following a link or blocking on
 * a FIFO, and fstats the open fd into *st (when st is not NULL). Returns the
 * fd (blocking mode restored) or ML_EIO (cannot open: errno ELOOP for a
 * symbolic link) or ML_EINVAL (opened, but not a regular file: *st tells
 * what it is). What is read is then exactly what was checked. */
int ml_file_open_regular(int dirfd, const char *name, struct stat *st);
/* What st_mode is, for messages: "regular file", "directory", "symbolic
 * link", "FIFO", "socket", "device". */
const char *ml_file_type_name(unsigned st_mode);
/* Writes len bytes as name in dirfd atomically: a new file
 * .NAME.<16 random hex>.tmp made with ml_file_create_excl, written,
 * fsync'd, renamed over name in the same folder (renameat replaces a link
 * there, never follows it), then the folder fsync'd. mode as for open(2)
 * (0640 for spool files the hospital system reads). Returns 0 or ML_EIO. */
int ml_write_file_at(int dirfd, const char *name, const void *data, size_t len, unsigned mode);
/* ml_read_file for name in dirfd through ml_file_open_regular. Returns 0,
 * ML_EIO (errno kept; ELOOP: a symbolic link), ML_EINVAL (not a regular
 * file; *st_mode, when not NULL, says what it is), ML_ETOOBIG or
 * ML_ENOMEM. */
int ml_read_file_at(int dirfd, const char *name, size_t max, char **out, size_t *len,
                    unsigned *st_mode);
/* Removes name in dirfd and, when it is a folder, everything under it
 * (depth at most 8), through directory fds and unlinkat only: a link inside
 * is removed, never followed. Returns 0 (also when name does not exist) or
 * ML_EIO. */
int ml_rmtree_at(int dirfd, const char *name);

/* One entry of a listing: its name and what it is (st_mode's type bits,
 * from the entry itself: a link is S_IFLNK, never its target). */
typedef struct {
    char *name;
    unsigned mode;
} ml_fs_entry_t;

/* Lists the folder dirfd in name order (strcmp): the entries for which
 * want(name, arg) is 1 (want NULL: every entry but "." and ".."), each with
 * its type read without following it (d_type, else fstatat with
 * AT_SYMLINK_NOFOLLOW). Nothing is opened but the folder itself, through a
 * fresh open file description, so the caller's dirfd keeps its position
 * and a FIFO or a link in the folder is only named, never touched. An entry
 * gone between readdir and its fstatat is left out. *out (free with
 * ml_fs_list_free) and *n are the caller's; both are NULL/0 on failure.
 * Returns 0, ML_EIO or ML_ENOMEM. O(N log N) in the folder size. */
int ml_fs_list(int dirfd, int (*want)(const char *name, void *arg), void *arg, ml_fs_entry_t **out,
               size_t *n);
/* Frees a listing of n entries; safe on NULL. */
void ml_fs_list_free(ml_fs_entry_t *entries, size_t n);

/* Copies the open file in (from offset 0, with pread, so in's position does
 * not matter) to name in the folder dirfd while hashing it: through a new
 * name.tmp (any leftover at that name is removed first, never written
 * through), fsync'd, then renamed to name. The caller fsyncs dirfd once it
 * has placed every file. *size and sha (lower-case hex) are set on 0.
 * When cancel is not NULL and becomes non-zero, the copy stops at its next
 * block with ML_ECLOSED. Returns 0, ML_ECLOSED, ML_ENOMEM or ML_EIO (errno
 * kept); on failure nothing is left at name.tmp. O(file size). */
int ml_fs_copy_hash(int in, int dirfd, const char *name, atomic_int *cancel, uint64_t *size,
                    char sha[ML_FS_SHA256_HEX + 1]);
/* Copies src in folder sdirfd to a new dst in folder ddirfd and fsyncs it
 * (a publication across file systems, where a hard link cannot be made).
 * src is opened with ml_file_open_regular and dst made with
 * ml_file_create_excl: neither is followed if it is a link, and dst must
 * not exist. Returns 0, ML_ENOMEM or ML_EIO (errno kept). */
int ml_fs_copy_file(int sdirfd, const char *src, int ddirfd, const char *dst);

#endif
