/* Length-prefixed records inside the TLS byte stream: a 4-byte big-endian
 * length followed by that many bytes (one protobuf Envelope). The reader
 * accepts bytes in any split (a record across many reads, many records in
 * one read) and refuses a record whose announced length exceeds the
 * configured maximum before buffering it. */
#ifndef ML_FRAME_H
#define ML_FRAME_H

#include <stddef.h>
#include <stdint.h>

#define ML_FRAME_HEADER 4
#define ML_FRAME_DEFAULT_MAX (4u * 1024u * 1024u)

typedef struct ml_frame_reader ml_frame_reader_t;

/* Creates a reader that accepts records of at most max_record bytes (not
 * counting the header). Returns NULL on allocation failure. */
ml_frame_reader_t *ml_frame_reader_new(size_t max_record);
/* Frees the reader and clears *self_p; safe on NULL and twice. */
void ml_frame_reader_destroy(ml_frame_reader_t **self_p);

/* Appends bytes from the stream. Returns 0, ML_ENOMEM, or ML_ETOOBIG when
 * the pending header announces a record above the maximum (the stream is
 * then unusable: the caller must drop the peer). O(len) amortised. */
int ml_frame_reader_feed(ml_frame_reader_t *self, const uint8_t *data, size_t len);

/* Takes the next complete record. Returns 1 and sets *rec and *len (borrowed,
 * valid until the next feed/next call), 0 if more bytes are needed, or
 * ML_ETOOBIG as above. */
int ml_frame_reader_next(ml_frame_reader_t *self, const uint8_t **rec, size_t *len);

/* How many of a refused record's first body bytes are kept (see
 * ml_frame_reader_refused_head). */
#define ML_FRAME_HEAD_KEEP 64

/* After ML_ETOOBIG: the first bytes of the refused record's body (at most
 * ML_FRAME_HEAD_KEEP) that arrived in the same feed as its header, borrowed
 * in *head; 0 when none did or nothing was refused. Enough to read the
 * Envelope's id, which every protobuf encoder writes first (field 1), so
 * the refusal can name the message. O(1). */
size_t ml_frame_reader_refused_head(const ml_frame_reader_t *self, const uint8_t **head);

/* Bytes buffered that do not yet form a whole record. */
size_t ml_frame_reader_pending(const ml_frame_reader_t *self);

/* Called at end of stream: returns 0 if the stream ended on a record
 * boundary, ML_ETRUNC if a partial record (or header) is left. */
int ml_frame_reader_finish(const ml_frame_reader_t *self);

/* Writes the 4-byte header for a record of len bytes. Returns 0 or
 * ML_ETOOBIG if len does not fit in 32 bits. */
int ml_frame_write_header(uint8_t hdr[ML_FRAME_HEADER], size_t len);

#endif
