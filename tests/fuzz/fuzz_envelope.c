/* Fuzz target: one record's bytes as the broker and the agent take them
 * (lib/ml_env.c, the protobuf-c generated code, lib/ml_json.c).
 *
 * The input is an Envelope's protobuf bytes. Whatever unpacks goes through
 * everything a peer's message meets: ml_env_validate (every payload's
 * rules), the kind/priority names, a pack, and the JSON the agent writes
 * into inbox/ (ml_json_encode, pretty and with defaults). Checked on the
 * way, aborting on a difference:
 *   - pack is stable: unpack(pack(e)) packs to the same bytes;
 *   - validation is a function of the content: the re-unpacked copy gets
 *     the same verdict and the same sentence;
 *   - JSON round trip: what ml_json_encode writes, ml_json_decode reads
 *     back (except enum numbers this build has no name for, which the
 *     mapping prints as numbers and documents refusing on input), and
 *     re-encoding that gives the same text. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_json.h"

#define S_FAIL(...) ml_fuzz_fail("fuzz_envelope", __VA_ARGS__)

/* Encodes, decodes and re-encodes msg; aborts when the mapping disagrees
 * with itself. */
static void s_json_roundtrip(const ProtobufCMessage *msg, int flags)
{
    char err[512], err2[512];
    char *text = NULL, *again = NULL;
    ProtobufCMessage *back = NULL;
    if (ml_json_encode(msg, flags, &text, err, sizeof err) != 0)
        return; /* e.g. a string that is not UTF-8: refused, fine */
    if (!text)
        S_FAIL("encode succeeded without output");
    int rc = ml_json_decode(msg->descriptor, text, strlen(text), &back, err2, sizeof err2);
    if (rc != 0) {
        if (!strstr(err2, "unknown enum value"))
            S_FAIL("encoder output does not decode: %s\n%s", err2, text);
        free(text);
        return;
    }
    if (ml_json_encode(back, flags, &again, err, sizeof err) != 0)
        S_FAIL("decoded JSON does not encode again: %s", err);
    if (strcmp(text, again) != 0)
        S_FAIL("JSON round trip differs:\n%s\n---\n%s", text, again);
    free(again);
    protobuf_c_message_free_unpacked(back, NULL);
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ml_fuzz_quiet();
    ml_envelope_t *e = NULL, *e2 = NULL;
    uint8_t *p1 = NULL, *p2 = NULL;
    size_t n1 = 0, n2 = 0;
    char err[512], err2[512];
    if (ml_env_unpack(data, size, &e) != 0)
        return 0;

    /* Names never fail, whatever the numbers. */
    if (!ml_kind_name((int)e->kind) || !ml_priority_name((int)e->priority))
        S_FAIL("a name is NULL");
    (void)ml_env_kind_is_routed((int)e->kind);
    (void)ml_env_kind_of_payload((int)e->payload_case);

    if (ml_env_pack(e, &p1, &n1) != 0)
        S_FAIL("pack failed");
    if (ml_env_unpack(p1, n1, &e2) != 0)
        S_FAIL("our own pack does not unpack (%zu bytes)", n1);
    if (ml_env_pack(e2, &p2, &n2) != 0)
        S_FAIL("second pack failed");
    if (n1 != n2 || memcmp(p1, p2, n1) != 0)
        S_FAIL("pack is not stable (%zu vs %zu bytes)", n1, n2);

    err[0] = err2[0] = '\0';
    int v1 = ml_env_validate(e, err, sizeof err);
    int v2 = ml_env_validate(e2, err2, sizeof err2);
    if (v1 != v2 || strcmp(err, err2) != 0)
        S_FAIL("validation differs on equal envelopes: %d \"%s\" / %d \"%s\"", v1, err, v2, err2);
    if (v1 == 0 && (!ml_env_kind_is_routed((int)e->kind) ||
                    (int)e->kind != ml_env_kind_of_payload((int)e->payload_case)))
        S_FAIL("a valid envelope has kind %d for payload %d", (int)e->kind, (int)e->payload_case);
    if (v1 != 0 && v1 != ML_EINVAL)
        S_FAIL("validate returned %d", v1);
    if (v1 != 0 && !err[0])
        S_FAIL("validate refused without a sentence");

    /* As written to inbox/<id>.json, and as medlinkctl --json shows it. */
    s_json_roundtrip(&e->base, ML_JSON_PRETTY);
    s_json_roundtrip(&e->base, ML_JSON_EMIT_DEFAULTS);

    free(p1);
    free(p2);
    ml_env_free(&e);
    ml_env_free(&e2);
    ml_env_free(&e2); /* safe twice */
    return 0;
}
