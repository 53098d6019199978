/* An imaging consult as medlinkctl sends it: the ImagingConsult (from
 * --file or flags) with the object list built from the DICOM files by
 * ml_imaging_object_from_file, then one ImagingChunk message per chunk of
 * each object, in order, read from the files one at a time
 * (ml_imaging_read_chunk) so that memory stays at one chunk whatever the
 * size of the study. */
#ifndef CTL_STUDY_H
#define CTL_STUDY_H

#include <stdint.h>

#include "cli.h"
#include "ml_env.h"

typedef struct ctl_study ctl_study_t;

/* Builds the consult: reads --file or the flags, lists --dicom files and
 * every file under --dicom-dir (sorted by path), hashes each object,
 * checks they belong to one study, fills in the object list, chunk_size,
 * total_bytes, the study UID and modality when the consult leaves them
 * out, and finishes and validates the envelope (ctl_build_finish). O(total
 * bytes), since every file is read once for its SHA-256. Returns
 * CTL_EXIT_OK with *out the caller's, or CTL_EXIT_USAGE / CTL_EXIT_FAIL
 * after saying why on stderr. */
int ctl_study_new(const ctl_opts_t *o, ctl_study_t **out);
/* Safe on NULL and twice; clears *self_p. */
void ctl_study_destroy(ctl_study_t **self_p);

/* The consult envelope (borrowed). */
const ml_envelope_t *ctl_study_consult(const ctl_study_t *s);
/* Objects, chunks and bytes the consult declares. */
uint32_t ctl_study_objects(const ctl_study_t *s);
uint64_t ctl_study_chunks(const ctl_study_t *s);
uint64_t ctl_study_bytes(const ctl_study_t *s);

/* Serialised size of the largest message the study sends (the consult,
 * or a chunk of chunk_size bytes), for a check against the broker's
 * max_record before anything is sent. */
size_t ctl_study_max_message(const ctl_study_t *s);

/* The next message to send: the consult first, then each chunk in order
 * (object 0 chunk 0, 0/1, ..., 1/0, ...). *env is borrowed until the next
 * call or ctl_study_destroy. Returns 1, 0 when every message was given,
 * or CTL_EXIT_FAIL (negated: -1) after saying why (a file that cannot be
 * read or changed since it was hashed). */
int ctl_study_next(ctl_study_t *s, ml_envelope_t **env);

#endif
