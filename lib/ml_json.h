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
};

/* Renders msg as JSON into a malloc'd NUL-terminated string (*out, the
 * caller's). Returns 0, ML_ENOMEM, or ML_EINVAL (err says why). */
int ml_json_encode(const ProtobufCMessage *msg, int flags, char **out, char *err, size_t errlen);

/* Parses JSON text of len bytes into a new message of type desc. On success
 * *out is the caller's, to free with protobuf_c_message_free_unpacked(*out,
 * NULL). On failure returns ML_EINVAL with err naming the offending field
 * path (e.g. "referral.patient.sex: unknown enum value \"X\""), and *out is
 * untouched. */
int ml_json_decode(const ProtobufCMessageDescriptor *desc, const char *json, size_t len,
                   ProtobufCMessage **out, char *err, size_t errlen);

#endif
