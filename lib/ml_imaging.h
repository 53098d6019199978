/* Imaging helpers shared by medlink-agent and medlinkctl: SHA-256 of
 * buffers and files, a probe of DICOM Part 10 files (the UIDs and modality
 * of their header), and the chunking rules of imaging.proto (how many
 * chunks an object has, reading one chunk of a file with its digest).
 * No network, no global state; thread-safe. */
#ifndef ML_IMAGING_H
#define ML_IMAGING_H

#include <stddef.h>
#include <stdint.h>

#include "medlink/v1/imaging.pb-c.h"

#define ML_SHA256_HEX 64
/* Chunk sizes an ImagingConsult may declare. */
#define ML_IMAGING_CHUNK_MIN (4u * 1024)
#define ML_IMAGING_CHUNK_MAX (4u * 1024 * 1024)
#define ML_IMAGING_CHUNK_DEFAULT (256u * 1024)

/* SHA-256 of len bytes into out. Returns 0, or ML_ENOMEM when OpenSSL
 * cannot compute it (no memory, a broken provider). */
int ml_sha256(const void *data, size_t len, uint8_t out[32]);
/* Lower-case hex SHA-256 of len bytes into out (65 bytes with the NUL). */
void ml_sha256_hex(const void *data, size_t len, char out[ML_SHA256_HEX + 1]);
/* SHA-256 and size of a whole file, read in blocks. Returns 0 or ML_EIO
 * (errno kept). */
int ml_sha256_file(const char *path, char out[ML_SHA256_HEX + 1], uint64_t *size);
/* The same on an open fd, read with pread from offset 0. */
int ml_sha256_fd(int fd, char out[ML_SHA256_HEX + 1], uint64_t *size);
/* 1 if s is exactly 64 lower-case hex digits. */
int ml_sha256_hex_valid(const char *s);

/* What the header of a DICOM Part 10 file says. Strings are NUL-terminated
 * and trimmed of DICOM's space/NUL padding; empty when absent. */
typedef struct {
    char sop_instance_uid[65];
    char series_instance_uid[65];
    char study_instance_uid[65];
    char sop_class_uid[65];
    char modality[17];
    char transfer_syntax_uid[65];
} ml_dicom_info_t;

/* Reads the header of the DICOM Part 10 file at path: the 128-byte
 * preamble, "DICM", the file meta group (explicit VR little endian), then
 * the data set up to the tags above (explicit or implicit VR little
 * endian). Returns 0, ML_EIO (cannot read), or ML_EINVAL with err saying
 * what is wrong ("not a DICOM Part 10 file: no DICM marker at byte 128",
 * "no SOP Instance UID (0008,0018)"). Reads at most the first 1 MiB. */
int ml_dicom_probe(const char *path, ml_dicom_info_t *info, char *err, size_t errlen);
/* The same on an open fd (read with pread from offset 0; the fd's position
 * is not used): for a file opened once and then hashed and copied from the
 * same fd, so that what is probed is what is sent. */
int ml_dicom_probe_fd(int fd, ml_dicom_info_t *info, char *err, size_t errlen);
/* The same on bytes already read: buf holds the first len bytes of a file of
 * file_size bytes (len < file_size when only a window was read; a length
 * running past the window then ends the walk quietly, while one running
 * past file_size is an error). Sequences of undefined length are skipped
 * item by item (nested at most 16 deep); the walk ends at the first tag
 * past (0020,000E). The SOP Instance UID falls back to (0002,0003) when the
 * data set has none. Returns 0 or ML_EINVAL (err says why). O(len); never
 * reads outside buf, whatever the bytes say (fuzzing entry point). */
int ml_dicom_probe_buf(const uint8_t *buf, size_t len, uint64_t file_size, ml_dicom_info_t *info,
                       char *err, size_t errlen);

/* Number of chunks of an object of size bytes (at least 1, also for an
 * empty object). 0 when chunk_size is 0 or the count does not fit in 32
 * bits: callers must refuse such an object. */
uint32_t ml_imaging_chunk_count(uint64_t size, uint32_t chunk_size);

/* Reads chunk chunk_index of the file at path (bytes [chunk_index *
 * chunk_size, + chunk_size), shorter at the end) into a malloc'd buffer
 * (*data, the caller's) and its SHA-256 into sha. Returns 0, ML_EIO, or
 * ML_EINVAL when the chunk lies past the end of the file. */
int ml_imaging_read_chunk(const char *path, uint32_t chunk_size, uint32_t chunk_index,
                          uint8_t **data, size_t *len, char sha[ML_SHA256_HEX + 1]);
/* The same on an open fd (pread; its position is not used). */
int ml_imaging_read_chunk_fd(int fd, uint32_t chunk_size, uint32_t chunk_index, uint8_t **data,
                             size_t *len, char sha[ML_SHA256_HEX + 1]);

/* Fills a heap DicomObject (medlink__v1__dicom_object__init'ed, strings
 * malloc'd; free with protobuf_c_message_free_unpacked) for the file at
 * path: file_name (the base name), size, sha256, chunks, and the UIDs from
 * ml_dicom_probe. Returns 0, ML_EIO, ML_ENOMEM or ML_EINVAL (not DICOM;
 * err says why). */
int ml_imaging_object_from_file(const char *path, uint32_t chunk_size,
                                Medlink__V1__DicomObject **out, ml_dicom_info_t *info, char *err,
                                size_t errlen);
/* The same on a file open as fd (path names it: file_name is its base
 * name): probed, hashed and later read from the one fd, so that what is
 * described is what is sent, whatever happens to path meanwhile. */
int ml_imaging_object_from_fd(int fd, const char *path, uint32_t chunk_size,
                              Medlink__V1__DicomObject **out, ml_dicom_info_t *info, char *err,
                              size_t errlen);

#endif
