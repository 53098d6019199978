/* Text that came from a peer: the checks and the escaping every program
 * applies before such text is trusted, logged or shown. A compromised node
 * may put any bytes in a string field; these functions are the one place
 * that decides what is well-formed UTF-8, what an identifier may contain,
 * and how the rest is made harmless for a log line or a terminal.
 * Pure functions, thread-safe, no allocation. */
#ifndef ML_TEXT_H
#define ML_TEXT_H

#include <stddef.h>

/* Longest message or case id accepted from a peer. */
#define ML_TEXT_ID_MAX 128

/* 1 if s[0..len) is well-formed UTF-8 (RFC 3629: no overlong forms, no
 * surrogates, nothing past U+10FFFF), else 0. O(len). */
int ml_utf8_valid(const char *s, size_t len);

/* Length of the well-formed UTF-8 sequence that starts s[0..len): 1 to 4,
 * or 0 when s[0] does not start one (a stray continuation byte, a
 * truncated or overlong sequence, a surrogate). len must be > 0. O(1). */
size_t ml_utf8_seq_len(const char *s, size_t len);

/* 1 if s is an identifier a peer may send (a message id, a case id): 1 to
 * max bytes, each one of [A-Za-z0-9._:@-]. Nothing else, so that an id can
 * be logged, printed, put in a file name or an SQL row without escaping.
 * max 0 means ML_TEXT_ID_MAX. O(length). */
int ml_text_id_valid(const char *s, size_t max);

/* Copies s[0..len) into out (outlen bytes, always NUL-terminated when
 * outlen > 0) so that it is one harmless line of text: every C0 control
 * character, DEL, every C1 control (U+0080-U+009F), the Unicode line and
 * paragraph separators and the bidirectional overrides (U+202A-U+202E,
 * U+2066-U+2069), and every byte that is not part of well-formed UTF-8 are
 * written as \xNN, one per byte; everything else is copied. Output that
 * does not fit is cut at a character boundary. Returns the length written
 * (without the NUL). O(len). */
size_t ml_text_escape(const char *s, size_t len, char *out, size_t outlen);

/* 1 if ml_text_escape would change s[0..len), else 0. O(len). */
int ml_text_needs_escape(const char *s, size_t len);

#endif
