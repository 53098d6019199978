/* Spool folder integration: turns files dropped by the hospital system into
 * outbox rows, moves them along as the broker answers, and writes delivered
 * messages into inbox/. Every rename stays inside spool_dir (one file
 * system, so renames are atomic) and the folders are fsync'd after each
 * batch of renames so that a crash cannot undo a move the store relies on.
 *
 * The hospital system (or anyone who can write the spool) may plant links,
 * FIFOs and folders under any name. So every folder is held open as a
 * directory fd from the start (a folder that is a symbolic link is
 * refused), every file is opened relative to it with O_NOFOLLOW and
 * O_NONBLOCK and checked with fstat on that fd, every file the agent writes
 * is created new (O_EXCL) under a random name and renamed in (see
 * ml_write_file_at), and every move is a renameat between two held folders.
 * A non-regular *.json in outbox/ is reported and moved to rejected/. */
#include "spool.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ml_common.h"
#include "ml_json.h"
#include "ml_fs.h"
#include "ml_text.h"

#define S_LOG "spool"
#define S_PATH_MAX 4096
#define S_ERR_MAX 1024

enum { S_OUTBOX, S_PENDING, S_SENT, S_REJECTED, S_INBOX, S_NFOLDERS };
static const char *const s_folder[S_NFOLDERS] = {"outbox", "pending", "sent", "rejected", "inbox"};

struct ml_spool {
    char *dir;
    /* spool_dir and its five folders, held open (O_NOFOLLOW for the
     * folders). s_refresh reopens a folder that was replaced by a real one. */
    int root;
    int dfd[S_NFOLDERS];
    /* An error about a folder is logged once, not every scan. */
    int folder_warned[S_NFOLDERS];
    /* outbox/ names that could not be moved to rejected/ (logged once). */
    char **odd;
    size_t n_odd;
    char *node_id;
    size_t max_record;
    ml_astore_t *store;
    /* pending/ may hold files whose rows never committed (a failed commit);
     * the next scan stores them first. */
    int need_reconcile;
    /* Inbox rows may be stored but not yet written to inbox/. */
    int need_respool;
    ml_spool_hooks_t hooks;
    /* pending/ names handed to hooks.consult and not yet settled by
     * ml_spool_staged_*: s_reconcile must not take them a second time. */
    char **staging;
    size_t n_staging, cap_staging;
};

/* One file on its way into the outbox table. */
typedef struct {
    char *name;   /* the name in the source folder */
    char *target; /* the name in pending/ */
    char id[128];
    char case_id[160];
    char *summary; /* "REFERRAL to X, case C" for the log line */
    uint8_t *blob;
    size_t len;
    ml_envelope_t *consult; /* an ImagingConsult, for hooks.consult */
} s_item_t;

/* A copy of an outbox row that outlives the statement. */
typedef struct {
    char *id;
    char *file_name;
    uint8_t *env;
    size_t len;
    int state;
    char *reason;
} s_row_t;

static int s_path(const ml_spool_t *sp, int folder, const char *name, char *out, size_t len)
{
    int n = name ? snprintf(out, len, "%s/%s/%s", sp->dir, s_folder[folder], name)
                 : snprintf(out, len, "%s/%s", sp->dir, s_folder[folder]);
    return (n < 0 || (size_t)n >= len) ? ML_EINVAL : 0;
}

static void s_fsync_dir(const ml_spool_t *sp, int folder)
{
    if (fsync(sp->dfd[folder]) != 0)
        ml_log(ML_LOG_WARN, S_LOG, "fsync %s/: %s", s_folder[folder], strerror(errno));
}

static int s_exists(const ml_spool_t *sp, int folder, const char *name)
{
    struct stat st;
    return fstatat(sp->dfd[folder], name, &st, AT_SYMLINK_NOFOLLOW) == 0;
}

/* renameat between two held folders: moves the entry itself (a link stays
 * a link, never its target). */
static int s_rename(const ml_spool_t *sp, int from, const char *name, int to, const char *to_name)
{
    return renameat(sp->dfd[from], name, sp->dfd[to], to_name) == 0 ? 0 : ML_EIO;
}

/* Opens (and creates when missing) folder i of spool_dir, refusing a
 * symbolic link. Returns the fd or ML_EIO with a sentence in err. */
static int s_open_folder(int root, int i, char *err, size_t errlen)
{
    if (mkdirat(root, s_folder[i], 0750) != 0 && errno != EEXIST) {
        snprintf(err, errlen, "cannot create spool folder %s/: %s", s_folder[i], strerror(errno));
        return ML_EIO;
    }
    int fd = ml_dir_open(root, s_folder[i]);
    if (fd < 0) {
        if (errno == ELOOP || errno == ENOTDIR)
            snprintf(err, errlen,
                     "spool folder %s/ is not a real folder (a symbolic link or a file); refused: "
                     "replace it by a folder",
                     s_folder[i]);
        else
            snprintf(err, errlen, "cannot open spool folder %s/: %s", s_folder[i], strerror(errno));
        return ML_EIO;
    }
    return fd;
}

/* A folder deleted and made again (by an operator cleaning up) must be
 * followed to its new inode, or the agent would scan an empty, unlinked
 * folder for ever; a folder replaced by a link is refused (the old fd is
 * kept and the swap is logged once). O(5) fstatat. */
static void s_refresh(ml_spool_t *sp)
{
    for (int i = 0; i < S_NFOLDERS; i++) {
        struct stat held, now;
        if (fstat(sp->dfd[i], &held) != 0)
            continue;
        int gone = fstatat(sp->root, s_folder[i], &now, AT_SYMLINK_NOFOLLOW) != 0;
        if (!gone && now.st_dev == held.st_dev && now.st_ino == held.st_ino) {
            sp->folder_warned[i] = 0;
            continue;
        }
        char err[S_ERR_MAX];
        int fd = s_open_folder(sp->root, i, err, sizeof err);
        if (fd < 0) {
            if (!sp->folder_warned[i])
                ml_log(ML_LOG_ERROR, S_LOG, "%s; still using the folder opened before", err);
            sp->folder_warned[i] = 1;
            continue;
        }
        ml_log(ML_LOG_WARN, S_LOG, "spool folder %s/ was replaced; using the new one", s_folder[i]);
        close(sp->dfd[i]);
        sp->dfd[i] = fd;
        sp->folder_warned[i] = 0;
    }
}

/* The folder that travels with NAME.json: NAME.d (an imaging consult's
 * DICOM files). Returns 0 or ML_EINVAL when name does not end in .json or
 * the result does not fit. */
static int s_companion(const char *name, char *out, size_t len)
{
    size_t n = strlen(name);
    if (n <= 5 || strcmp(name + n - 5, ".json") != 0)
        return ML_EINVAL;
    int w = snprintf(out, len, "%.*s.d", (int)(n - 5), name);
    return (w < 0 || (size_t)w >= len) ? ML_EINVAL : 0;
}

static int s_is_dir(const ml_spool_t *sp, int folder, const char *name)
{
    struct stat st;
    return fstatat(sp->dfd[folder], name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISDIR(st.st_mode);
}

/* Moves folder/NAME.d along with folder/NAME.json when there is one. A
 * failure is logged: the message itself is not affected. */
static void s_move_companion(const ml_spool_t *sp, int from, const char *name, int to,
                             const char *to_name)
{
    char a[S_PATH_MAX], b[S_PATH_MAX];
    if (s_companion(name, a, sizeof a) < 0 || s_companion(to_name, b, sizeof b) < 0)
        return;
    if (!s_is_dir(sp, from, a))
        return;
    if (s_rename(sp, from, a, to, b) < 0)
        ml_log(ML_LOG_ERROR, S_LOG, "cannot move %s/%s to %s/%s: %s", s_folder[from], a,
               s_folder[to], b, strerror(errno));
}

/* Files the hospital system means for us: *.json, not hidden, not a
 * temporary name (the usual "write NAME.tmp, then rename" pattern). */
static int s_wanted(const char *name)
{
    size_t n = strlen(name);
    if (name[0] == '.' || n <= 5)
        return 0;
    if (n > 4 && strcmp(name + n - 4, ".tmp") == 0)
        return 0;
    return strcmp(name + n - 5, ".json") == 0;
}

static int s_want_cb(const char *name, void *arg)
{
    (void)arg;
    return s_wanted(name);
}

static void s_free_names(char **names, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
}

/* A wanted name in outbox/ that is not a regular file. */
typedef ml_fs_entry_t s_odd_t;

/* Lists the wanted regular files of a folder in name order, at most max.
 * When odd is not NULL, wanted names that are something else (a link, a
 * FIFO, a folder: never opened here, ml_fs_list only names them) are
 * listed there with their type. O(N log N) in the folder size. */
static int s_list(const ml_spool_t *sp, int folder, size_t max, char ***out, size_t *count,
                  s_odd_t **odd, size_t *nodd)
{
    ml_fs_entry_t *e = NULL;
    size_t ne = 0, n = 0, no = 0;
    char **names = NULL;
    s_odd_t *os = NULL;

    *out = NULL;
    *count = 0;
    if (odd) {
        *odd = NULL;
        *nodd = 0;
    }
    int rc = ml_fs_list(sp->dfd[folder], s_want_cb, NULL, &e, &ne);
    if (rc < 0)
        return rc;
    if (ne > 0 &&
        (!(names = malloc(ne * sizeof *names)) || (odd && !(os = malloc(ne * sizeof *os))))) {
        free(names);
        ml_fs_list_free(e, ne);
        return ML_ENOMEM;
    }
    /* The names move from the listing into the two arrays. */
    for (size_t i = 0; i < ne; i++) {
        if (S_ISREG((mode_t)e[i].mode) && n < max)
            names[n++] = e[i].name;
        else if (!S_ISREG((mode_t)e[i].mode) && odd)
            os[no++] = e[i];
        else
            free(e[i].name);
    }
    free(e);
    *out = names;
    *count = n;
    if (odd) {
        *odd = os;
        *nodd = no;
    } else {
        free(os);
    }
    return 0;
}

int ml_spool_set_str(char **field, const char *value)
{
    char *v = strdup(value ? value : "");
    if (!v)
        return ML_ENOMEM;
    if (*field && *field != protobuf_c_empty_string)
        free(*field);
    *field = v;
    return 0;
}

/* ml_spool_fill without the validation. */
static int s_fill_defaults(ml_envelope_t *e, const char *node_id, char *err, size_t errlen)
{
    char id[ML_ULID_LEN + 1];
    if (!e->id || !*e->id) {
        ml_ulid_new(id);
        if (ml_spool_set_str(&e->id, id) < 0)
            goto nomem;
    }
    if (!e->from || !*e->from) {
        if (ml_spool_set_str(&e->from, node_id) < 0)
            goto nomem;
    } else if (strcmp(e->from, node_id) != 0) {
        snprintf(err, errlen, "from %s is not this node %s", e->from, node_id);
        return ML_EINVAL;
    }
    if (e->created_at == 0)
        e->created_at = ml_now_ms();
    if (!e->case_id || !*e->case_id) {
        if (ml_spool_set_str(&e->case_id, e->id) < 0)
            goto nomem;
    }
    /* A critical finding goes back as fast as the network allows: the
     * broker orders by priority, so the report must carry EMERGENCY. */
    if (e->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_REPORT && e->imaging_report &&
        e->imaging_report->critical_finding)
        e->priority = MEDLINK__V1__PRIORITY__PRIORITY_EMERGENCY;
    return 0;
nomem:
    snprintf(err, errlen, "out of memory");
    return ML_ENOMEM;
}

int ml_spool_fill(ml_envelope_t *e, const char *node_id, char *err, size_t errlen)
{
    int rc = s_fill_defaults(e, node_id, err, errlen);
    if (rc < 0)
        return rc;
    rc = ml_env_validate(e, err, errlen);
    if (rc < 0)
        return rc;
    if (!ml_env_kind_is_routed(e->kind)) {
        snprintf(err, errlen, "kind %s is not a message a node can send", ml_kind_name(e->kind));
        return ML_EINVAL;
    }
    return 0;
}

/* inbox/'s file name for a message id, into safe[256]. */
static int s_inbox_name(const char *id, char safe[256])
{
    size_t n = strlen(id);
    if (n == 0 || n >= 256 - 6)
        return ML_EINVAL;
    /* Ids from a correct broker are ULIDs; anything else is made harmless
     * so a hostile id can never name a path outside inbox/. */
    for (size_t i = 0; i < n; i++) {
        char c = id[i];
        int ok = (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                 c == '-' || c == '_';
        safe[i] = ok ? c : '_';
    }
    memcpy(safe + n, ".json", 6);
    return 0;
}

int ml_spool_inbox_path(const ml_spool_t *sp, const char *id, char *out, size_t len)
{
    char safe[256];
    int rc = s_inbox_name(id, safe);
    return rc < 0 ? rc : s_path(sp, S_INBOX, safe, out, len);
}

/* Renders a stored envelope as pretty JSON with a final newline. */
static int s_render(const uint8_t *blob, size_t len, char **out, size_t *out_len)
{
    ml_envelope_t *e = NULL;
    char *json = NULL;
    char err[S_ERR_MAX];
    int rc = ml_env_unpack(blob, len, &e);
    if (rc < 0)
        goto out;
    rc = ml_json_encode(&e->base, ML_JSON_PRETTY, &json, err, sizeof err);
    if (rc < 0) {
        ml_log(ML_LOG_ERROR, S_LOG, "cannot render message as JSON: %s", err);
        goto out;
    }
    size_t n = strlen(json);
    char *j2 = realloc(json, n + 2);
    if (!j2) {
        rc = ML_ENOMEM;
        goto out;
    }
    json = j2;
    if (n == 0 || json[n - 1] != '\n')
        json[n++] = '\n';
    json[n] = '\0';
    *out = json;
    *out_len = n;
    json = NULL;
    rc = 0;
out:
    free(json);
    ml_env_free(&e);
    return rc;
}

static int s_write_rendered(const ml_spool_t *sp, int folder, const char *name, const uint8_t *blob,
                            size_t len)
{
    char *json = NULL;
    size_t jlen = 0;
    int rc = s_render(blob, len, &json, &jlen);
    if (rc < 0)
        return rc;
    rc = ml_write_file_at(sp->dfd[folder], name, json, jlen, 0640);
    free(json);
    return rc;
}

/* A name for a file arriving in pending/ (for_pending) or rejected/ that no
 * other file or outbox row uses: the name itself, or NAME with id (or a
 * fresh ULID) put before ".json". */
static int s_found_cb(const ml_outbox_row_t *r, void *arg)
{
    return 1;
}

/* Whether name is in use: for a file going to pending/ (for_pending) in
 * pending/, sent/, rejected/ or any outbox row; for one going to rejected/
 * in rejected/ only. */
static int s_taken(ml_spool_t *sp, const char *name, int for_pending)
{
    char dir[S_PATH_MAX];
    int has_dir = s_companion(name, dir, sizeof dir) == 0;
    if (s_exists(sp, S_REJECTED, name) || (has_dir && s_exists(sp, S_REJECTED, dir)))
        return 1;
    if (!for_pending)
        return 0;
    if (s_exists(sp, S_PENDING, name) || s_exists(sp, S_SENT, name))
        return 1;
    if (has_dir && (s_exists(sp, S_PENDING, dir) || s_exists(sp, S_SENT, dir)))
        return 1;
    /* A store error counts as taken: the suffixed name is always safe. */
    return ml_astore_outbox_by_file(sp->store, name, s_found_cb, NULL) != ML_ENOTFOUND;
}

static char *s_unique(ml_spool_t *sp, const char *name, const char *id, int for_pending)
{
    if (!s_taken(sp, name, for_pending))
        return strdup(name);
    size_t n = strlen(name);
    size_t stem = n > 5 && strcmp(name + n - 5, ".json") == 0 ? n - 5 : n;
    for (int attempt = 0; attempt < 100; attempt++) {
        char fresh[ML_ULID_LEN + 1];
        const char *tag = id;
        if (attempt > 0 || !tag || !*tag) {
            ml_ulid_new(fresh);
            tag = fresh;
        }
        size_t cap = n + strlen(tag) + 8;
        char *c = malloc(cap);
        if (!c)
            return NULL;
        snprintf(c, cap, "%.*s.%s.json", (int)stem, name, tag);
        if (!s_taken(sp, c, for_pending))
            return c;
        free(c);
    }
    return NULL;
}

/* Moves folder/name to rejected/ with a NAME.error holding reason. The
 * .error is written first so that whoever watches rejected/ for *.json
 * always finds the reason next to the file. */
static int s_reject(ml_spool_t *sp, int folder, const char *name, const char *id,
                    const char *reason)
{
    int rc = ML_ENOMEM;
    char *target = s_unique(sp, name, id, 0);
    char *ename = NULL;
    if (!target)
        goto out;
    size_t cap = strlen(target) + 8;
    if (!(ename = malloc(cap)))
        goto out;
    snprintf(ename, cap, "%s.error", target);
    char text[S_ERR_MAX + 16];
    int tn = snprintf(text, sizeof text, "%s\n", reason);
    if ((rc = ml_write_file_at(sp->dfd[S_REJECTED], ename, text, (size_t)tn, 0640)) < 0) {
        ml_log(ML_LOG_ERROR, S_LOG, "cannot write rejected/%s: %s", ename, strerror(errno));
        goto out;
    }
    if ((rc = s_rename(sp, folder, name, S_REJECTED, target)) < 0) {
        ml_log(ML_LOG_ERROR, S_LOG, "cannot move %s/%s to rejected/: %s", s_folder[folder], name,
               strerror(errno));
        goto out;
    }
    s_move_companion(sp, folder, name, S_REJECTED, target);
    ml_log(ML_LOG_WARN, S_LOG, "%s/%s rejected: %s", s_folder[folder], name, reason);
    rc = 0;
out:
    free(target);
    free(ename);
    return rc;
}

static void s_item_clear(s_item_t *it)
{
    free(it->name);
    free(it->target);
    free(it->summary);
    free(it->blob);
    ml_env_free(&it->consult);
    memset(it, 0, sizeof *it);
}

/* The reason given for a spool entry that is not a regular file. */
static void s_not_regular(unsigned mode, char *err, size_t errlen)
{
    if (S_ISLNK((mode_t)mode))
        snprintf(err, errlen,
                 "is a symbolic link; links in the spool are never followed (write the file "
                 "itself, then rename it into outbox/)");
    else
        snprintf(err, errlen,
                 "is a %s, not a regular file; it was not read (write the message as a regular "
                 "file, then rename it into outbox/)",
                 ml_file_type_name(mode));
}

/* The offset of the first byte of text that is not well-formed UTF-8
 * (lib/ml_text.h's rule: RFC 3629, no overlong forms, no surrogates,
 * nothing above U+10FFFF), or len when it all is. O(len). */
static size_t s_utf8_bad(const unsigned char *t, size_t len)
{
    size_t i = 0;
    while (i < len) {
        size_t k = ml_utf8_seq_len((const char *)t + i, len - i);
        if (k == 0)
            return i;
        i += k;
    }
    return len;
}

/* Reads, decodes, fills in and validates folder/name. Returns 0 with the
 * item filled, or ML_EINVAL with a reason in err (reject the file), or
 * ML_ENOMEM. The file is opened once, without following a link or waiting
 * on a FIFO, and what is parsed is what that fd holds. */
static int s_prepare(ml_spool_t *sp, int folder, const char *name, s_item_t *it, char *err,
                     size_t errlen)
{
    char *text = NULL;
    size_t len = 0;
    unsigned mode = 0;
    ml_envelope_t *e = NULL;
    int rc = ml_read_file_at(sp->dfd[folder], name, 2 * sp->max_record, &text, &len, &mode);
    if (rc == ML_ETOOBIG) {
        snprintf(err, errlen, "file is larger than %zu bytes (2 x max_record)", 2 * sp->max_record);
        rc = ML_EINVAL;
        goto out;
    } else if (rc == ML_EINVAL || (rc == ML_EIO && errno == ELOOP)) {
        /* Swapped since the listing: a link (ELOOP) or a FIFO or folder. */
        s_not_regular(rc == ML_EINVAL ? mode : (unsigned)S_IFLNK, err, errlen);
        rc = ML_EINVAL;
        goto out;
    } else if (rc < 0) {
        snprintf(err, errlen, "cannot read file: %s", rc == ML_EIO ? strerror(errno) : "no memory");
        rc = rc == ML_ENOMEM ? rc : ML_EINVAL;
        goto out;
    }
    /* Windows tools like to start UTF-8 with a byte order mark; it carries
     * nothing, so it is dropped. Anything that is not UTF-8 (GBK from a
     * Chinese-locale export, Latin-1) would otherwise fail later with a
     * JSON error that names no cause. */
    const char *body = text;
    size_t blen = len;
    if (blen >= 3 && memcmp(body, "\xEF\xBB\xBF", 3) == 0) {
        body += 3;
        blen -= 3;
    }
    size_t bad = s_utf8_bad((const unsigned char *)body, blen);
    if (bad < blen) {
        snprintf(err, errlen,
                 "file is not UTF-8 (GBK?): byte 0x%02X at offset %zu is not valid UTF-8; spool "
                 "files must be saved as UTF-8",
                 (unsigned char)body[bad], bad + (size_t)(body - text));
        rc = ML_EINVAL;
        goto out;
    }
    char derr[S_ERR_MAX - 32];
    ProtobufCMessage *m = NULL;
    rc = ml_json_decode(&medlink__v1__envelope__descriptor, body, blen, &m, derr, sizeof derr);
    if (rc < 0) {
        snprintf(err, errlen, "not a valid message: %s", derr);
        rc = ML_EINVAL;
        goto out;
    }
    e = (ml_envelope_t *)m;
    if (e->payload_case == MEDLINK__V1__ENVELOPE__PAYLOAD_IMAGING_CONSULT) {
        /* Its object list is filled in from NAME.d by whoever stages it
         * (hooks.consult); only then can it be validated. */
        if ((rc = s_fill_defaults(e, sp->node_id, err, errlen)) < 0)
            goto out;
        if (!(it->name = strdup(name))) {
            snprintf(err, errlen, "out of memory");
            rc = ML_ENOMEM;
            goto out;
        }
        snprintf(it->id, sizeof it->id, "%s", e->id);
        snprintf(it->case_id, sizeof it->case_id, "%s", e->case_id);
        it->consult = e;
        e = NULL;
        rc = 0;
        goto out;
    }
    if ((rc = ml_spool_fill(e, sp->node_id, err, errlen)) < 0)
        goto out;
    if ((rc = ml_env_pack(e, &it->blob, &it->len)) < 0) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    if (it->len > sp->max_record) {
        snprintf(err, errlen, "message is %zu bytes, over max_record (%zu)", it->len,
                 sp->max_record);
        rc = ML_EINVAL;
        goto out;
    }
    snprintf(it->id, sizeof it->id, "%s", e->id);
    snprintf(it->case_id, sizeof it->case_id, "%s", e->case_id);
    size_t scap = strlen(e->to) + strlen(e->case_id) + 64;
    it->summary = malloc(scap);
    it->name = strdup(name);
    if (!it->summary || !it->name) {
        snprintf(err, errlen, "out of memory");
        rc = ML_ENOMEM;
        goto out;
    }
    snprintf(it->summary, scap, "%s %s to %s, case %s", ml_priority_name(e->priority),
             ml_kind_name(e->kind), e->to, e->case_id);
    rc = 0;
out:
    if (rc < 0)
        s_item_clear(it);
    free(text);
    ml_env_free(&e);
    return rc;
}

static int s_staging_find(const ml_spool_t *sp, const char *name)
{
    for (size_t i = 0; i < sp->n_staging; i++)
        if (strcmp(sp->staging[i], name) == 0)
            return (int)i;
    return -1;
}

static int s_staging_add(ml_spool_t *sp, const char *name)
{
    if (s_staging_find(sp, name) >= 0)
        return 0;
    if (sp->n_staging == sp->cap_staging) {
        size_t cap = sp->cap_staging ? sp->cap_staging * 2 : 8;
        char **n = realloc(sp->staging, cap * sizeof *n);
        if (!n)
            return ML_ENOMEM;
        sp->staging = n;
        sp->cap_staging = cap;
    }
    if (!(sp->staging[sp->n_staging] = strdup(name)))
        return ML_ENOMEM;
    sp->n_staging++;
    return 0;
}

static void s_staging_del(ml_spool_t *sp, const char *name)
{
    int i = s_staging_find(sp, name);
    if (i < 0)
        return;
    free(sp->staging[i]);
    sp->staging[i] = sp->staging[--sp->n_staging];
}

/* Hands a consult now in pending/ to hooks.consult, which takes the
 * envelope. Without a hook there is nobody to stage it: refused. */
static void s_stage(ml_spool_t *sp, s_item_t *it, ml_spool_scan_stats_t *stats)
{
    if (!sp->hooks.consult) {
        if (s_reject(sp, S_PENDING, it->target, it->id,
                     "this agent does not handle imaging consults") == 0 &&
            stats)
            stats->rejected++;
        return;
    }
    if (s_staging_add(sp, it->target) < 0) {
        /* Left in pending/ without a row: the next reconcile takes it. */
        ml_log(ML_LOG_ERROR, S_LOG, "out of memory staging pending/%s", it->target);
        sp->need_reconcile = 1;
        return;
    }
    ml_log(ML_LOG_INFO, S_LOG, "%s taken as imaging consult %s (case %s); copying its study",
           it->target, it->id, it->case_id);
    if (stats)
        stats->staged++;
    ml_envelope_t *e = it->consult;
    it->consult = NULL;
    sp->hooks.consult(sp->hooks.arg, it->target, e);
}

/* Stores the files names[] of folder (S_OUTBOX: move them into pending/;
 * S_PENDING: they are already there) in one transaction. Imaging consults
 * are moved the same way (with their NAME.d) and handed to hooks.consult
 * instead. */
static int s_ingest(ml_spool_t *sp, int folder, char **names, size_t n,
                    ml_spool_scan_stats_t *stats)
{
    int rc = 0;
    s_item_t *items = calloc(n ? n : 1, sizeof *items);
    size_t k = 0;
    int moved = 0;
    char err[S_ERR_MAX];

    if (!items)
        return ML_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        s_item_t *it = &items[k];
        rc = s_prepare(sp, folder, names[i], it, err, sizeof err);
        if (rc == ML_EINVAL) {
            if (s_reject(sp, folder, names[i], NULL, err) == 0 && stats)
                stats->rejected++;
            moved = 1;
            continue;
        } else if (rc < 0) {
            goto out;
        }
        if (folder == S_PENDING) {
            it->target = strdup(it->name);
        } else {
            it->target = s_unique(sp, it->name, it->id, 1);
            if (it->target && s_rename(sp, folder, it->name, S_PENDING, it->target) < 0) {
                /* Leave it in outbox/; the next scan tries again. */
                ml_log(ML_LOG_ERROR, S_LOG, "cannot move outbox/%s to pending/: %s", it->name,
                       strerror(errno));
                s_item_clear(it);
                continue;
            }
            if (it->target)
                s_move_companion(sp, folder, it->name, S_PENDING, it->target);
            moved = 1;
        }
        if (!it->target) {
            s_item_clear(it);
            rc = ML_ENOMEM;
            goto out;
        }
        k++;
    }
    if (moved) {
        s_fsync_dir(sp, S_PENDING);
        s_fsync_dir(sp, S_REJECTED);
        if (folder != S_PENDING)
            s_fsync_dir(sp, folder);
    }
    /* Consults go to staging; the others are stored below, in order. */
    size_t m = 0;
    for (size_t i = 0; i < k; i++) {
        if (items[i].consult) {
            s_stage(sp, &items[i], stats);
            s_item_clear(&items[i]);
            continue;
        }
        if (m != i) {
            items[m] = items[i];
            memset(&items[i], 0, sizeof items[i]);
        }
        m++;
    }
    k = m;
    if (k == 0) {
        rc = 0;
        goto out;
    }

    /* From here on the files are in pending/: if the commit fails they are
     * stored by the next scan (need_reconcile), never lost. */
    int64_t now = ml_now_ms();
    if ((rc = ml_astore_begin(sp->store)) < 0)
        goto store_failed;
    for (size_t i = 0; i < k; i++) {
        ml_outbox_new_t row = {.id = items[i].id,
                               .file_name = items[i].target,
                               .case_id = items[i].case_id,
                               .envelope = items[i].blob,
                               .envelope_len = items[i].len};
        rc = ml_astore_outbox_insert(sp->store, &row, now);
        if (rc == ML_EDUP) {
            items[i].len = 0; /* rejected below, after the commit */
            continue;
        }
        if (rc < 0) {
            ml_astore_rollback(sp->store);
            goto store_failed;
        }
    }
    if ((rc = ml_astore_commit(sp->store)) < 0)
        goto store_failed;

    int dups = 0;
    for (size_t i = 0; i < k; i++) {
        if (items[i].len == 0) {
            char why[S_ERR_MAX];
            snprintf(why, sizeof why, "message id %s was already used by an earlier message",
                     items[i].id);
            if (s_reject(sp, S_PENDING, items[i].target, items[i].id, why) == 0 && stats)
                stats->rejected++;
            dups = 1;
            continue;
        }
        if (stats)
            stats->queued++;
        ml_log(ML_LOG_INFO, S_LOG, "%s/%s queued as message %s (%s)", s_folder[folder],
               items[i].name, items[i].id, items[i].summary);
        if (sp->hooks.queued)
            sp->hooks.queued(sp->hooks.arg, items[i].id, items[i].blob, items[i].len);
    }
    if (dups) {
        s_fsync_dir(sp, S_PENDING);
        s_fsync_dir(sp, S_REJECTED);
    }
    rc = 0;
    goto out;

store_failed:
    ml_log(ML_LOG_ERROR, S_LOG, "cannot store %zu outbox file(s): %s; will retry", k,
           ml_astore_errmsg(sp->store));
    sp->need_reconcile = 1;
    rc = ML_ESTORE;
out:
    for (size_t i = 0; i < n; i++)
        s_item_clear(&items[i]);
    free(items);
    return rc;
}

static void s_row_clear(s_row_t *r)
{
    free(r->id);
    free(r->file_name);
    free(r->env);
    free(r->reason);
    memset(r, 0, sizeof *r);
}

static int s_copy_row_cb(const ml_outbox_row_t *r, void *arg)
{
    s_row_t *c = arg;
    c->id = strdup(r->id);
    c->file_name = strdup(r->file_name);
    c->reason = strdup(r->reason);
    c->env = malloc(r->envelope_len ? r->envelope_len : 1);
    c->len = r->envelope_len;
    c->state = r->state;
    if (!c->id || !c->file_name || !c->reason || !c->env) {
        s_row_clear(c);
        return ML_ENOMEM;
    }
    if (r->envelope_len)
        memcpy(c->env, r->envelope, r->envelope_len);
    return 1;
}

/* Moves pending/NAME of a settled row to where it belongs. When the file is
 * gone (a crash after the move, or someone removed it) the stored envelope
 * is written out instead, so sent/ and rejected/ stay complete. */
static void s_finish(ml_spool_t *sp, const s_row_t *r)
{
    if (!*r->file_name)
        return;
    if (r->state == ML_OUTBOX_ACCEPTED) {
        /* sent/NAME is the envelope as it was sent, with the id, caseId,
         * from and createdAt the agent filled in: that is how the local
         * system learns which case a referral it wrote became. */
        if (s_write_rendered(sp, S_SENT, r->file_name, r->env, r->len) == 0) {
            if (unlinkat(sp->dfd[S_PENDING], r->file_name, 0) != 0 && errno != ENOENT)
                ml_log(ML_LOG_ERROR, S_LOG, "cannot remove pending/%s: %s", r->file_name,
                       strerror(errno));
        } else if (s_rename(sp, S_PENDING, r->file_name, S_SENT, r->file_name) < 0 &&
                   errno != ENOENT) {
            ml_log(ML_LOG_ERROR, S_LOG, "cannot move pending/%s to sent/: %s", r->file_name,
                   strerror(errno));
        }
        s_move_companion(sp, S_PENDING, r->file_name, S_SENT, r->file_name);
        ml_log(ML_LOG_INFO, S_LOG, "%s (message %s) accepted by the broker", r->file_name, r->id);
    } else if (r->state == ML_OUTBOX_REJECTED) {
        const char *why = *r->reason ? r->reason : "refused by the broker";
        if (s_exists(sp, S_PENDING, r->file_name)) {
            s_reject(sp, S_PENDING, r->file_name, r->id, why);
        } else {
            /* Recreate the file from the store, then reject it as usual. */
            if (s_write_rendered(sp, S_PENDING, r->file_name, r->env, r->len) == 0)
                s_reject(sp, S_PENDING, r->file_name, r->id, why);
            else
                ml_log(ML_LOG_ERROR, S_LOG, "cannot write rejected/%s", r->file_name);
        }
    }
}

int ml_spool_settle(ml_spool_t *sp, const ml_spool_result_t *res, size_t n)
{
    int rc;
    char *changed = calloc(n ? n : 1, 1);
    if (!changed)
        return ML_ENOMEM;
    int64_t now = ml_now_ms();
    if ((rc = ml_astore_begin(sp->store)) < 0)
        goto failed;
    for (size_t i = 0; i < n; i++) {
        rc = ml_astore_outbox_settle(sp->store, res[i].message_id,
                                     res[i].accepted ? ML_OUTBOX_ACCEPTED : ML_OUTBOX_REJECTED,
                                     res[i].accepted ? NULL : res[i].reason, now);
        if (rc == ML_ENOTFOUND) {
            ml_log(ML_LOG_WARN, S_LOG, "broker answered for unknown message %s", res[i].message_id);
        } else if (rc < 0) {
            ml_astore_rollback(sp->store);
            goto failed;
        } else {
            changed[i] = (char)rc;
        }
    }
    if ((rc = ml_astore_commit(sp->store)) < 0)
        goto failed;
    int any = 0;
    for (size_t i = 0; i < n; i++) {
        if (!changed[i])
            continue;
        s_row_t r = {0};
        if (ml_astore_outbox_get(sp->store, res[i].message_id, s_copy_row_cb, &r) == 1) {
            s_finish(sp, &r);
            any = 1;
        }
        s_row_clear(&r);
    }
    if (any) {
        s_fsync_dir(sp, S_PENDING);
        s_fsync_dir(sp, S_SENT);
        s_fsync_dir(sp, S_REJECTED);
    }
    free(changed);
    return 0;
failed:
    ml_log(ML_LOG_ERROR, S_LOG, "cannot record %zu broker answer(s): %s", n,
           ml_astore_errmsg(sp->store));
    free(changed);
    return ML_ESTORE;
}

/* Makes pending/ agree with the store: settled rows leave pending/, files
 * without a row are stored. */
static int s_reconcile(ml_spool_t *sp)
{
    char **names = NULL;
    size_t n = 0, k = 0;
    int rc = s_list(sp, S_PENDING, (size_t)-1, &names, &n, NULL, NULL);
    if (rc < 0) {
        ml_log(ML_LOG_ERROR, S_LOG, "cannot list pending/: %s", strerror(errno));
        return rc;
    }
    int moved = 0;
    for (size_t i = 0; i < n; i++) {
        s_row_t r = {0};
        if (s_staging_find(sp, names[i]) >= 0) {
            /* Being staged right now; its row comes when that is done. */
            free(names[i]);
            continue;
        }
        rc = ml_astore_outbox_by_file(sp->store, names[i], s_copy_row_cb, &r);
        if (rc == ML_ENOTFOUND) {
            /* Keep it for s_ingest, compacting the array in place. */
            names[k++] = names[i];
            continue;
        }
        if (rc == 1 && r.state != ML_OUTBOX_PENDING) {
            s_finish(sp, &r);
            moved = 1;
        }
        s_row_clear(&r);
        free(names[i]);
        if (rc < 0) {
            for (size_t j = i + 1; j < n; j++)
                free(names[j]);
            n = k;
            goto out;
        }
    }
    n = k;
    if (moved) {
        s_fsync_dir(sp, S_PENDING);
        s_fsync_dir(sp, S_SENT);
        s_fsync_dir(sp, S_REJECTED);
    }
    sp->need_reconcile = 0;
    rc = k ? s_ingest(sp, S_PENDING, names, k, NULL) : 0;
out:
    s_free_names(names, n);
    return rc < 0 ? rc : 0;
}

static int s_spool_one(ml_spool_t *sp, const char *id, const uint8_t *blob, size_t len)
{
    char name[256];
    char *json = NULL;
    size_t jlen = 0;
    int rc = s_inbox_name(id, name);
    if (rc < 0)
        return rc;
    if ((rc = s_render(blob, len, &json, &jlen)) < 0)
        return rc;
    rc = ml_write_file_at(sp->dfd[S_INBOX], name, json, jlen, 0640);
    if (rc < 0)
        ml_log(ML_LOG_ERROR, S_LOG, "cannot write inbox/%s: %s", name, strerror(errno));
    free(json);
    return rc;
}

/* Marks ids spooled in one transaction. */
static int s_mark_spooled(ml_spool_t *sp, char **ids, size_t n)
{
    if (n == 0)
        return 0;
    int rc = ml_astore_begin(sp->store);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        if (ids[i])
            rc = ml_astore_inbox_set_spooled(sp->store, ids[i]);
    }
    if (rc == 0)
        rc = ml_astore_commit(sp->store);
    else
        ml_astore_rollback(sp->store);
    if (rc < 0) {
        /* The files are written; rewriting them later is harmless. */
        sp->need_respool = 1;
        ml_log(ML_LOG_WARN, S_LOG, "cannot mark %zu inbox row(s) spooled: %s", n,
               ml_astore_errmsg(sp->store));
    }
    return rc;
}

/* Kinds that are stored (deduplicated by id) but never written to inbox/:
 * transport between agents, nothing for the hospital system to read. */
static int s_writes_file(int kind)
{
    return kind != MEDLINK__V1__KIND__KIND_IMAGING_RESEND &&
           kind != MEDLINK__V1__KIND__KIND_IMAGING_CHUNK;
}

int ml_spool_receive_tx(ml_spool_t *sp, ml_spool_msg_t *msgs, size_t n)
{
    int64_t now = ml_now_ms();
    for (size_t i = 0; i < n; i++) {
        ml_spool_msg_t *m = &msgs[i];
        int rc = ml_astore_inbox_add(sp->store, m->id, now, m->case_id, m->sender, m->kind,
                                     m->envelope, m->envelope_len);
        if (rc < 0)
            return rc;
        m->inserted = rc;
    }
    return 0;
}

void ml_spool_receive_done(ml_spool_t *sp, ml_spool_msg_t *msgs, size_t n)
{
    char **done = calloc(n ? n : 1, sizeof *done);
    size_t nd = 0;
    for (size_t i = 0; i < n; i++) {
        ml_spool_msg_t *m = &msgs[i];
        if (!m->inserted) {
            ml_log(ML_LOG_INFO, S_LOG, "received %s again (duplicate; acknowledged again)", m->id);
            continue;
        }
        ml_log(ML_LOG_INFO, S_LOG, "received %s %s from %s, case %s", m->id, ml_kind_name(m->kind),
               m->sender, m->case_id);
        if (s_writes_file(m->kind) && s_spool_one(sp, m->id, m->envelope, m->envelope_len) < 0) {
            sp->need_respool = 1;
            continue;
        }
        if (done)
            done[nd++] = (char *)m->id;
    }
    /* A missing mark only means the file is written again at start-up. */
    if (done)
        s_mark_spooled(sp, done, nd);
    else
        sp->need_respool = 1;
    free(done);
}

int ml_spool_receive(ml_spool_t *sp, ml_spool_msg_t *msgs, size_t n)
{
    int rc;
    if (n == 0)
        return 0;
    if ((rc = ml_astore_begin(sp->store)) < 0)
        goto failed;
    if ((rc = ml_spool_receive_tx(sp, msgs, n)) < 0) {
        ml_astore_rollback(sp->store);
        goto failed;
    }
    if ((rc = ml_astore_commit(sp->store)) < 0)
        goto failed;
    ml_spool_receive_done(sp, msgs, n);
    return 0;
failed:
    ml_log(ML_LOG_ERROR, S_LOG, "cannot store %zu delivered message(s): %s", n,
           ml_astore_errmsg(sp->store));
    return ML_ESTORE;
}

typedef struct {
    char **ids;
    uint8_t **blobs;
    size_t *lens;
    int *kinds;
    size_t n, cap;
} s_unspooled_t;

static int s_collect_cb(const ml_inbox_row_t *r, void *arg)
{
    s_unspooled_t *u = arg;
    if (u->n == u->cap) {
        size_t cap = u->cap ? u->cap * 2 : 16;
        char **ids = realloc(u->ids, cap * sizeof *ids);
        if (ids)
            u->ids = ids;
        uint8_t **blobs = realloc(u->blobs, cap * sizeof *blobs);
        if (blobs)
            u->blobs = blobs;
        size_t *lens = realloc(u->lens, cap * sizeof *lens);
        if (lens)
            u->lens = lens;
        int *kinds = realloc(u->kinds, cap * sizeof *kinds);
        if (kinds)
            u->kinds = kinds;
        if (!ids || !blobs || !lens || !kinds)
            return ML_ENOMEM;
        u->cap = cap;
    }
    u->ids[u->n] = strdup(r->id);
    u->blobs[u->n] = malloc(r->envelope_len ? r->envelope_len : 1);
    u->lens[u->n] = r->envelope_len;
    u->kinds[u->n] = r->kind;
    if (!u->ids[u->n] || !u->blobs[u->n]) {
        free(u->ids[u->n]);
        free(u->blobs[u->n]);
        return ML_ENOMEM;
    }
    memcpy(u->blobs[u->n], r->envelope, r->envelope_len);
    u->n++;
    return 0;
}

/* Writes inbox files for rows stored but not spooled (a crash or a write
 * error between the commit and the file). The rows are copied out first:
 * updating rows while a SELECT walks them is not something to rely on. */
static int s_respool(ml_spool_t *sp)
{
    s_unspooled_t u = {0};
    int rc = ml_astore_inbox_unspooled(sp->store, s_collect_cb, &u);
    if (rc < 0) {
        ml_log(ML_LOG_ERROR, S_LOG, "cannot read unspooled inbox rows: %s",
               ml_astore_errmsg(sp->store));
        goto out;
    }
    sp->need_respool = 0;
    size_t nd = 0;
    for (size_t i = 0; i < u.n; i++) {
        if (!s_writes_file(u.kinds[i])) {
            /* Nothing to write; only the mark was missing. */
        } else if (s_spool_one(sp, u.ids[i], u.blobs[i], u.lens[i]) < 0) {
            sp->need_respool = 1;
            continue;
        } else {
            ml_log(ML_LOG_INFO, S_LOG, "re-spooled inbox message %s", u.ids[i]);
        }
        char *t = u.ids[nd];
        u.ids[nd++] = u.ids[i];
        u.ids[i] = t;
    }
    s_mark_spooled(sp, u.ids, nd);
    rc = 0;
out:
    for (size_t i = 0; i < u.n; i++) {
        free(u.ids[i]);
        free(u.blobs[i]);
    }
    free(u.ids);
    free(u.blobs);
    free(u.lens);
    free(u.kinds);
    return rc;
}

int ml_spool_recover(ml_spool_t *sp)
{
    int rc = s_reconcile(sp);
    int rc2 = s_respool(sp);
    return rc < 0 ? rc : rc2;
}

static int s_odd_known(const ml_spool_t *sp, const char *name)
{
    for (size_t i = 0; i < sp->n_odd; i++)
        if (strcmp(sp->odd[i], name) == 0)
            return 1;
    return 0;
}

/* A *.json in outbox/ that is a link, FIFO, folder or device: it is never
 * opened. It is moved (the entry itself: renameat moves a link, not its
 * target) to rejected/ with a NAME.error saying what it is; when even that
 * fails it stays, and the failure is logged once. */
static void s_report_odd(ml_spool_t *sp, const s_odd_t *o, ml_spool_scan_stats_t *stats)
{
    char why[S_ERR_MAX];
    if (s_odd_known(sp, o->name))
        return;
    s_not_regular(o->mode, why, sizeof why);
    ml_log(ML_LOG_WARN, S_LOG, "outbox/%s %s", o->name, why);
    if (s_reject(sp, S_OUTBOX, o->name, NULL, why) == 0) {
        if (stats)
            stats->rejected++;
        return;
    }
    ml_log(ML_LOG_ERROR, S_LOG,
           "outbox/%s (a %s) cannot be moved to rejected/; it is left in outbox/ and ignored "
           "until removed",
           o->name, ml_file_type_name(o->mode));
    if (sp->n_odd < 256) {
        char **nn = realloc(sp->odd, (sp->n_odd + 1) * sizeof *nn);
        if (nn) {
            sp->odd = nn;
            if ((nn[sp->n_odd] = strdup(o->name)) != NULL)
                sp->n_odd++;
        }
    }
}

int ml_spool_scan(ml_spool_t *sp, size_t max_files, ml_spool_scan_stats_t *stats)
{
    char **names = NULL;
    size_t n = 0, nodd = 0;
    s_odd_t *odd = NULL;
    int rc;
    if (stats)
        memset(stats, 0, sizeof *stats);
    s_refresh(sp);
    if (sp->need_reconcile && (rc = s_reconcile(sp)) < 0)
        return rc;
    if (sp->need_respool)
        s_respool(sp);
    rc = s_list(sp, S_OUTBOX, max_files, &names, &n, &odd, &nodd);
    if (rc < 0) {
        ml_log(ML_LOG_ERROR, S_LOG, "cannot list outbox/: %s", strerror(errno));
        return rc;
    }
    for (size_t i = 0; i < nodd; i++)
        s_report_odd(sp, &odd[i], stats);
    if (nodd) {
        s_fsync_dir(sp, S_OUTBOX);
        s_fsync_dir(sp, S_REJECTED);
    }
    ml_fs_list_free(odd, nodd);
    rc = n ? s_ingest(sp, S_OUTBOX, names, n, stats) : 0;
    s_free_names(names, n);
    return rc;
}

int ml_spool_new(const ml_spool_config_t *cfg, ml_spool_t **out, char *err, size_t errlen)
{
    int rc = ML_ENOMEM;
    ml_spool_t *sp = calloc(1, sizeof *sp);
    if (!sp)
        goto nomem;
    sp->dir = strdup(cfg->dir);
    sp->node_id = strdup(cfg->node_id);
    if (!sp->dir || !sp->node_id)
        goto nomem;
    sp->max_record = cfg->max_record;
    sp->store = cfg->store;
    sp->root = -1;
    for (int i = 0; i < S_NFOLDERS; i++)
        sp->dfd[i] = -1;
    /* spool_dir itself is the operator's choice (it may be a link they
     * made); the folders inside are where others write. */
    if (ml_mkdirs(sp->dir) < 0 ||
        (sp->root = open(sp->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
        snprintf(err, errlen, "cannot open spool_dir %s: %s", sp->dir, strerror(errno));
        rc = ML_EIO;
        goto out;
    }
    for (int i = 0; i < S_NFOLDERS; i++) {
        if ((sp->dfd[i] = s_open_folder(sp->root, i, err, errlen)) < 0) {
            rc = ML_EIO;
            goto out;
        }
    }
    *out = sp;
    return 0;
nomem:
    snprintf(err, errlen, "out of memory");
out:
    ml_spool_destroy(&sp);
    return rc;
}

void ml_spool_destroy(ml_spool_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    ml_spool_t *sp = *self_p;
    for (int i = 0; i < S_NFOLDERS; i++)
        if (sp->dfd[i] >= 0)
            close(sp->dfd[i]);
    if (sp->root >= 0)
        close(sp->root);
    for (size_t i = 0; i < sp->n_odd; i++)
        free(sp->odd[i]);
    free(sp->odd);
    for (size_t i = 0; i < sp->n_staging; i++)
        free(sp->staging[i]);
    free(sp->staging);
    free(sp->dir);
    free(sp->node_id);
    free(sp);
    *self_p = NULL;
}

void ml_spool_set_hooks(ml_spool_t *sp, const ml_spool_hooks_t *hooks)
{
    if (hooks)
        sp->hooks = *hooks;
    else
        memset(&sp->hooks, 0, sizeof sp->hooks);
}

const char *ml_spool_dir(const ml_spool_t *sp)
{
    return sp->dir;
}

int ml_spool_folder_fd(const ml_spool_t *sp, const char *folder)
{
    for (int i = 0; i < S_NFOLDERS; i++)
        if (strcmp(s_folder[i], folder) == 0)
            return sp->dfd[i];
    return ML_EINVAL;
}

int ml_spool_staged_open(ml_spool_t *sp, const char *name, char *out, size_t len)
{
    char dir[S_PATH_MAX];
    int rc = ml_spool_staged_dir(sp, name, out, len);
    if (rc < 0)
        return rc;
    if ((rc = s_companion(name, dir, sizeof dir)) < 0)
        return rc;
    int fd = ml_dir_open(sp->dfd[S_PENDING], dir);
    return fd < 0 ? ML_ENOTFOUND : fd;
}

/* A ULID is 26 characters of Crockford base32. */
static int s_ulid_suffix(const char *stem, size_t n)
{
    if (n < 27 || stem[n - 27] != '.')
        return 0;
    char id[ML_ULID_LEN + 1];
    memcpy(id, stem + n - 26, 26);
    id[26] = '\0';
    return ml_ulid_valid(id);
}

int ml_spool_staged_dir(ml_spool_t *sp, const char *name, char *out, size_t len)
{
    char dir[S_PATH_MAX];
    int rc = s_companion(name, dir, sizeof dir);
    if (rc < 0)
        return rc;
    if ((rc = s_path(sp, S_PENDING, dir, out, len)) < 0)
        return rc;
    if (s_is_dir(sp, S_PENDING, dir))
        return 0;
    /* A crash between moving NAME.json and NAME.d into pending/ leaves the
     * folder in outbox/, under the file's name there: the pending name, or
     * the pending name less the ".<id>" that s_unique put in. */
    size_t stem = strlen(dir) - 2;
    char cand[S_PATH_MAX];
    for (int attempt = 0; attempt < 2; attempt++) {
        if (attempt == 0)
            snprintf(cand, sizeof cand, "%s", dir);
        else if (s_ulid_suffix(dir, stem))
            snprintf(cand, sizeof cand, "%.*s.d", (int)(stem - 27), dir);
        else
            break;
        if (s_is_dir(sp, S_OUTBOX, cand) && s_rename(sp, S_OUTBOX, cand, S_PENDING, dir) == 0) {
            s_fsync_dir(sp, S_OUTBOX);
            s_fsync_dir(sp, S_PENDING);
            ml_log(ML_LOG_INFO, S_LOG, "moved outbox/%s to pending/%s", cand, dir);
            return 0;
        }
    }
    return ML_ENOTFOUND;
}

void ml_spool_staged_done(ml_spool_t *sp, const char *name)
{
    s_staging_del(sp, name);
}

int ml_spool_staged_reject(ml_spool_t *sp, const char *name, const char *id, const char *reason)
{
    s_staging_del(sp, name);
    int rc = s_reject(sp, S_PENDING, name, id, reason);
    s_fsync_dir(sp, S_PENDING);
    s_fsync_dir(sp, S_REJECTED);
    return rc;
}

void ml_spool_staged_retry(ml_spool_t *sp, const char *name)
{
    s_staging_del(sp, name);
    sp->need_reconcile = 1;
}

/* ---- retention of sent/ --------------------------------------------------- */

int ml_spool_prune_sent(ml_spool_t *sp, int64_t before_ms, size_t max, size_t *removed)
{
    size_t n = 0;
    if (removed)
        *removed = 0;
    char path[4096];
    if (s_path(sp, S_SENT, NULL, path, sizeof path) != 0)
        return ML_EIO;
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        ml_log(ML_LOG_WARN, S_LOG, "retention: cannot open sent/: %s", strerror(errno));
        return ML_EIO;
    }
    /* readdir, not ml_fs_list: sent/ may hold many files, and one call
     * looks at no more than it may remove. */
    DIR *d = fdopendir(fd);
    if (!d) {
        close(fd);
        return ML_EIO;
    }
    struct dirent *de;
    while (n < max && (de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.' && (de->d_name[1] == '\0' || strcmp(de->d_name, "..") == 0))
            continue;
        struct stat sb;
        if (fstatat(fd, de->d_name, &sb, AT_SYMLINK_NOFOLLOW) != 0)
            continue;
        /* The change time: a rename into sent/ sets it, whatever the
         * file's own mtime (a consult folder keeps the clinic's). */
        int64_t at = (int64_t)sb.st_ctim.tv_sec * 1000 + sb.st_ctim.tv_nsec / 1000000;
        if (at > before_ms)
            continue;
        /* A file, a link or a consult folder: removed through directory fds,
         * never followed (ml_rmtree_at). */
        if (ml_rmtree_at(fd, de->d_name) == 0)
            n++;
        else
            ml_log(ML_LOG_WARN, S_LOG, "retention: cannot remove sent/%s: %s", de->d_name,
                   strerror(errno));
    }
    closedir(d);
    if (removed)
        *removed = n;
    return 0;
}
