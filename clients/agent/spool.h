/* The spool folder: how the local hospital system talks to the agent
 * through plain files, and how the agent records what became of them.
 *
 *   spool_dir/outbox/    the hospital system drops NAME.json here (write
 *                        elsewhere or as .NAME / NAME.tmp, then rename in;
 *                        names starting with '.' or ending in .tmp, and
 *                        names not ending in .json, are ignored)
 *   spool_dir/pending/   taken by the agent, stored in its outbox table,
 *                        waiting for the broker's answer
 *   spool_dir/sent/      accepted (durably stored) by the broker
 *   spool_dir/rejected/  refused; NAME.error next to it says why (also a
 *                        *.json dropped in outbox/ that is not a regular
 *                        file: a FIFO, folder or link, moved as it is, never
 *                        opened; and a file that is not UTF-8; a UTF-8 byte
 *                        order mark is dropped)
 *   spool_dir/inbox/     messages delivered to this node, one
 *                        <message id>.json each, written atomically
 *
 * An imaging consult is NAME.json with its DICOM files in NAME.d/ (written
 * first); the folder travels with the file through pending/, sent/ and
 * rejected/. Its object list is filled in by the imaging module
 * (hooks.consult) before it is stored.
 *
 * A file name already used by an earlier message gets the message id put
 * in before ".json" so that no answer can ever be confused with another.
 *
 * Crash safety: a file is renamed into pending/ before its row commits, and
 * rows are settled before the file leaves pending/, so ml_spool_recover can
 * always finish the work from what it finds in pending/ and the store.
 *
 * Anyone who can write the spool may plant links and FIFOs: the folders are
 * held open (a folder that is a link is refused by ml_spool_new), every file
 * is opened relative to them without following links or blocking, and every
 * file written is created new under a random name (see ml_common.h and
 * docs/security.md, "Files the local system can write"). This
 * module never touches the network; the agent feeds it the broker's answers
 * and deliveries. Loop thread only. */
#ifndef ML_SPOOL_H
#define ML_SPOOL_H

#include <stddef.h>
#include <stdint.h>

#include "astore.h"
#include "ml_env.h"

typedef struct ml_spool ml_spool_t;

typedef struct {
    const char *dir;     /* spool_dir */
    const char *node_id; /* this node; the "from" of everything we send */
    size_t max_record;   /* wire limit; files may be up to twice this */
    ml_astore_t *store;  /* borrowed; outlives the spool */
} ml_spool_config_t;

/* Counts from one scan. */
typedef struct {
    size_t queued;   /* files stored in the outbox table, now in pending/ */
    size_t rejected; /* files moved to rejected/ */
    size_t staged;   /* imaging consults handed to hooks.consult */
} ml_spool_scan_stats_t;

/* What the imaging side of the agent plugs in (all optional).
 *
 * consult: an ImagingConsult file was moved to pending/name (its NAME.d
 * folder with it, when there was one); env has id, from, created_at and
 * case_id filled in but is not validated, and is the callee's. The callee
 * fills in the objects, stores the rows and then calls
 * ml_spool_staged_done, _reject or _retry with name. Without this hook a
 * consult is refused.
 *
 * queued: a message was committed to the outbox (called after the commit
 * with the stored envelope, borrowed). */
typedef struct {
    void (*consult)(void *arg, const char *name, ml_envelope_t *env);
    void (*queued)(void *arg, const char *id, const uint8_t *env, size_t len);
    void *arg;
} ml_spool_hooks_t;

/* The broker's answer to one of our messages. */
typedef struct {
    const char *message_id;
    int accepted;       /* 1: Accepted; 0: permanent Nack */
    const char *reason; /* for a Nack: "NACK_FORBIDDEN: route ..." */
} ml_spool_result_t;

/* One delivered message. id, case_id, sender and envelope are borrowed;
 * inserted is set by ml_spool_receive. */
typedef struct {
    const char *id;
    const char *case_id;
    const char *sender;
    int kind;
    const uint8_t *envelope;
    size_t envelope_len;
    int inserted; /* out: 1 when new, 0 when a duplicate */
    int ack;      /* out (imaging chunks only): 1 when it may be acknowledged */
} ml_spool_msg_t;

/* Creates the spool and its five folders and holds them open. Returns 0,
 * ML_EIO (also: a folder is a symbolic link, refused) or ML_ENOMEM with a
 * sentence in err. */
int ml_spool_new(const ml_spool_config_t *cfg, ml_spool_t **out, char *err, size_t errlen);
/* Frees the spool; safe on NULL and twice; clears *self_p. */
void ml_spool_destroy(ml_spool_t **self_p);
/* Installs hooks (copied; NULL removes them). Set them before
 * ml_spool_recover, which may stage consults left in pending/. */
void ml_spool_set_hooks(ml_spool_t *sp, const ml_spool_hooks_t *hooks);
/* spool_dir (borrowed). */
const char *ml_spool_dir(const ml_spool_t *sp);
/* The held fd of a spool folder ("outbox", "pending", "sent", "rejected",
 * "inbox"), borrowed: open and create files there relative to it (see
 * ml_dir_open and friends in ml_common.h). The fd may be replaced by the
 * next scan (a folder made again): use it on the loop thread, and open a
 * folder of your own from it for longer work. Returns it or ML_EINVAL. */
int ml_spool_folder_fd(const ml_spool_t *sp, const char *folder);

/* The folder of a staged consult: pending/NAME.d for pending/NAME.json,
 * written into out. If a crash left the folder in outbox/ it is moved into
 * pending/ first. Returns 0, ML_ENOTFOUND (no folder: the consult is to be
 * refused) or ML_EINVAL. */
int ml_spool_staged_dir(ml_spool_t *sp, const char *name, char *out, size_t len);
/* ml_spool_staged_dir, and then opens that folder (O_NOFOLLOW, relative to
 * pending/'s held fd) for the caller to read the study through. Returns
 * the fd (the caller's) or ML_ENOTFOUND (no folder, or it is a link) or
 * ML_EINVAL. */
int ml_spool_staged_open(ml_spool_t *sp, const char *name, char *out, size_t len);
/* The staged consult pending/name is stored: forget it. */
void ml_spool_staged_done(ml_spool_t *sp, const char *name);
/* The staged consult cannot be sent: pending/name and its folder go to
 * rejected/ with name.error holding reason. Returns 0 or ML_EIO. */
int ml_spool_staged_reject(ml_spool_t *sp, const char *name, const char *id, const char *reason);
/* The staged consult could not be stored now: it stays in pending/ and is
 * staged again by the next scan (or at start-up). */
void ml_spool_staged_retry(ml_spool_t *sp, const char *name);

/* Start-up recovery: finishes moves of pending/ files whose rows were
 * settled, stores pending/ files that have no row (crash before commit), and
 * writes inbox files for rows not yet spooled. Returns 0 or ML_ESTORE. */
int ml_spool_recover(ml_spool_t *sp);

/* Takes up to max_files files from outbox/ (in name order), validates them,
 * moves the good ones into pending/ and stores them in one transaction,
 * and moves the bad ones to rejected/ with a .error. Each outcome is
 * logged. Returns 0 (stats filled when non-NULL) or ML_ESTORE / ML_EIO when
 * the batch could not be stored (its files then stay in pending/ and are
 * stored by the next scan). O(files) file reads plus one fsync'd commit. */
int ml_spool_scan(ml_spool_t *sp, size_t max_files, ml_spool_scan_stats_t *stats);

/* Applies a batch of broker answers: one transaction that settles the rows
 * still pending, then moves pending/NAME to sent/ or rejected/ (writing
 * NAME.error). Answers for unknown or already settled ids are ignored.
 * Returns 0 or ML_ESTORE (nothing settled; the messages stay pending). */
int ml_spool_settle(ml_spool_t *sp, const ml_spool_result_t *res, size_t n);

/* Stores a batch of deliveries: INSERT OR IGNORE by id in one transaction,
 * then writes inbox/<id>.json for each new one and marks it spooled. On 0
 * every message is durably stored (new or duplicate) and may be acked.
 * Returns 0 or ML_ESTORE (nothing may be acked). A failed file write is
 * logged and retried by the next scan; the message is safe in the store.
 * ImagingResend (and ImagingChunk, should one be passed) is stored but not
 * written to inbox/. Equivalent to begin, ml_spool_receive_tx, commit,
 * ml_spool_receive_done. */
int ml_spool_receive(ml_spool_t *sp, ml_spool_msg_t *msgs, size_t n);
/* The inserts of ml_spool_receive inside the caller's transaction (so that
 * other work of the same batch commits with them); sets inserted. Returns
 * 0 or ML_ESTORE (roll back). */
int ml_spool_receive_tx(ml_spool_t *sp, ml_spool_msg_t *msgs, size_t n);
/* After the commit: writes inbox files of the new messages and marks them
 * spooled. */
void ml_spool_receive_done(ml_spool_t *sp, ml_spool_msg_t *msgs, size_t n);

/* Fills what the hospital system may leave out of an outgoing envelope: id
 * (a fresh ULID), from (node_id), created_at (now) and case_id (the id);
 * sets priority EMERGENCY on an ImagingReport with critical_finding; then
 * validates it with ml_env_validate. A "from" naming another node is
 * refused. Strings set here are malloc'd, so e must be a heap message (from
 * ml_json_decode or built with malloc). Returns 0 or ML_EINVAL with a
 * sentence in err. */
int ml_spool_fill(ml_envelope_t *e, const char *node_id, char *err, size_t errlen);

/* Replaces a string field of a heap protobuf-c message (freeing the old
 * value unless it is the shared empty default). Returns 0 or ML_ENOMEM. */
int ml_spool_set_str(char **field, const char *value);

/* Path of the inbox file for a message id (ids that are not ULIDs have
 * unsafe characters replaced). Returns 0 or ML_EINVAL if it does not fit. */
int ml_spool_inbox_path(const ml_spool_t *sp, const char *id, char *out, size_t len);

/* Retention of sent/: removes at most max entries (a NAME.json, or an
 * imaging consult's NAME.d folder with what is in it) that came into sent/
 * (their inode change time) at or before before_ms, Unix ms. Works
 * relative to an open sent/ descriptor and never follows a symlink (one is
 * removed as the link it is). *removed gets the count (may be NULL).
 * O(entries of sent/). Returns 0 or ML_EIO (the folder cannot be read). */
int ml_spool_prune_sent(ml_spool_t *sp, int64_t before_ms, size_t max, size_t *removed);

#endif
