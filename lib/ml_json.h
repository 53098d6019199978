/* Descriptor-driven mapping between protobuf-c messages and JSON, following
 * the proto3 JSON conventions: lowerCamelCase field names (json_name),
 * enums as their value names, 64-bit integers as strings, bytes as base64,
 * default values omitted on output, unknown fields refused on input. Written
 * once for every message type: it walks ProtobufCMessageDescriptor. */
#ifndef ML_JSON_H
#define ML_JSON_H

#include <stddef.h>

#include <protobuf-c/protobuf-c.h>

enum {
    ML_JSON_PRETTY = 1,        /* indent output */
    ML_JSON_EMIT_DEFAULTS = 2, /* also print fields at their default value */
    /* Print a string that is not well-formed UTF-8 with each bad byte
     * replaced by U+FFFD instead of failing the whole document: for tools
     * that show what a store holds (medlinkctl), where one odd string must
     * not hide the rest. Never for spool files, which must say what was
     * sent. */
    ML_JSON_REPLACE_INVALID = 4,
};

/* Renders msg as JSON into a malloc'd NUL-terminated string (*out, the
 * caller's). Returns 0, ML_ENOMEM, or ML_EINVAL (err says why: a string
 * that is not UTF-8, unless ML_JSON_REPLACE_INVALID). */
int ml_json_encode(const ProtobufCMessage *msg, int flags, char **out, char *err, size_t errlen);

/* Parses JSON text of len bytes into a new message of type desc. On success
 * *out is the caller's, to free with protobuf_c_message_free_unpacked(*out,
 * NULL). On failure returns ML_EINVAL with err naming the offending field
 * path (e.g. "referral.patient.sex: unknown enum value (expected one of
 * ...)"; text that is not UTF-8 is named by the field it is in), and *out
 * is untouched. Error sentences never quote a value of the document: they
 * are logged, and logs hold no patient data. */
int ml_json_decode(const ProtobufCMessageDescriptor *desc, const char *json, size_t len,
                   ProtobufCMessage **out, char *err, size_t errlen);

#endif
