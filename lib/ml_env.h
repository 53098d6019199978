/* Envelope helpers: pack/unpack with size limits, the kind <-> payload
 * correspondence, validation of what a sender may put on the wire, and the
 * names used in logs, JSON and medlinkctl output. */
#ifndef ML_ENV_H
#define ML_ENV_H

#include <stddef.h>
#include <stdint.h>

#include "medlink/v1/envelope.pb-c.h"

typedef Medlink__V1__Envelope ml_envelope_t;

/* Serialises e into a malloc'd buffer (*out, the caller's). Returns 0 or
 * ML_ENOMEM. */
int ml_env_pack(const ml_envelope_t *e, uint8_t **out, size_t *len);
/* Parses len bytes. Returns 0 (free *out with ml_env_free) or ML_EPROTO:
 * not an Envelope, or one holding a field numbered 0 anywhere, which
 * protobuf-c accepts but could not pack again. O(len). */
int ml_env_unpack(const uint8_t *data, size_t len, ml_envelope_t **out);
/* Frees an envelope from ml_env_unpack or ml_json_decode; clears *e. */
void ml_env_free(ml_envelope_t **e);

/* The Kind that goes with a payload case, KIND_UNSPECIFIED for none. */
int ml_env_kind_of_payload(int payload_case);
/* 1 for kinds that are routed between nodes and stored (clinical
 * messages); 0 for session/control kinds. */
int ml_env_kind_is_routed(int kind);

/* Checks what every routed message must satisfy: every string well-formed
 * UTF-8 (ml_env_check_text), a ULID id, a case id of ml_text_id_valid's
 * charset, from and to node ids, a payload matching kind (kind may be left
 * UNSPECIFIED by the sender and is then filled in here, which is why e is
 * not const), and the payload's own required fields (e.g. a referral names
 * its patient). Returns 0 or ML_EINVAL with a sentence in err that names
 * the field and never quotes its value: refusals are logged, and logs hold
 * no patient data. */
int ml_env_validate(ml_envelope_t *e, char *err, size_t errlen);

/* Checks that every string field of m, and of every message inside it, is
 * well-formed UTF-8 (ml_utf8_valid). Returns 0, or ML_EINVAL with err
 * naming the first bad field by its path ("referral.patient.name is not
 * valid UTF-8 text"); the value itself is never quoted. ml_env_validate
 * runs it first; the agent runs it on every delivery before storing it,
 * since a message it could not render as JSON must be refused, not acked.
 * O(size of the message tree). */
int ml_env_check_text(const ProtobufCMessage *m, char *err, size_t errlen);

/* Short names: "REFERRAL", "ROUTINE", ... (static strings). */
const char *ml_kind_name(int kind);
/* Parses a kind name, short ("REFERRAL") or full ("KIND_REFERRAL"),
 * case-insensitive. Returns 0 or ML_EINVAL (also for "UNSPECIFIED"). */
int ml_kind_parse(const char *s, int *kind);
const char *ml_priority_name(int priority);
/* Parses "ROUTINE"/"URGENT"/"EMERGENCY" (case-insensitive). */
int ml_priority_parse(const char *s, int *priority);

#endif
