/* Fuzz target: a spool file as the agent reads it from outbox/ (the proto3
 * JSON mapping of lib/ml_json.c, then clients/agent/spool.c's defaults and
 * ml_env_validate).
 *
 * The input is the file's bytes. ml_json_decode parses it as an Envelope;
 * what decodes is validated as it stands, then filled in the way the agent
 * fills a file from its hospital system (ml_spool_fill: id, from, case id,
 * created_at), packed (what the agent stores and sends) and unpacked again.
 * Checked on the way, aborting on a difference:
 *   - a decode failure leaves *out untouched and says why;
 *   - JSON round trip: encode(decode(x)) decodes again, and encoding that
 *     gives the same text (pretty and compact);
 *   - what ml_spool_fill accepts is a valid, routed envelope that survives
 *     pack/unpack with the same verdict. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_common.h"
#include "ml_common.h"
#include "ml_env.h"
#include "ml_json.h"
#include "spool.h"

#define S_NODE "township.xinzhan.clinic"

#define S_FAIL(...) ml_fuzz_fail("fuzz_json", __VA_ARGS__)

static void s_roundtrip(const ProtobufCMessage *msg, int flags)
{
    char err[512];
    char *t1 = NULL, *t2 = NULL;
    ProtobufCMessage *back = NULL;
    if (ml_json_encode(msg, flags, &t1, err, sizeof err) != 0)
        S_FAIL("a decoded message does not encode: %s", err);
    if (ml_json_decode(msg->descriptor, t1, strlen(t1), &back, err, sizeof err) != 0)
        S_FAIL("encoder output does not decode: %s\n%s", err, t1);
    if (ml_json_encode(back, flags, &t2, err, sizeof err) != 0)
        S_FAIL("re-decoded message does not encode: %s", err);
    if (strcmp(t1, t2) != 0)
        S_FAIL("JSON round trip differs:\n%s\n---\n%s", t1, t2);
    free(t1);
    free(t2);
    protobuf_c_message_free_unpacked(back, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    ml_fuzz_quiet();
    char err[512];
    ProtobufCMessage *msg = (ProtobufCMessage *)(uintptr_t)0x1; /* must stay untouched */
    err[0] = '\0';
    int rc = ml_json_decode(&medlink__v1__envelope__descriptor, (const char *)data, size, &msg, err,
                            sizeof err);
    if (rc != 0) {
        if (msg != (ProtobufCMessage *)(uintptr_t)0x1)
            S_FAIL("a failed decode wrote *out");
        if (rc != ML_EINVAL && rc != ML_ENOMEM)
            S_FAIL("decode returned %d", rc);
        if (!err[0])
            S_FAIL("decode refused without a sentence");
        return 0;
    }
    ml_envelope_t *e = (ml_envelope_t *)msg;
    s_roundtrip(msg, 0);
    s_roundtrip(msg, ML_JSON_PRETTY | ML_JSON_EMIT_DEFAULTS);

    /* As the broker would judge it, unchanged. */
    char verdict[512] = "";
    (void)ml_env_validate(e, verdict, sizeof verdict);

    /* As the agent takes it from outbox/. */
    err[0] = '\0';
    rc = ml_spool_fill(e, S_NODE, err, sizeof err);
    if (rc == 0) {
        if (!ml_env_kind_is_routed((int)e->kind) || strcmp(e->from, S_NODE) != 0)
            S_FAIL("ml_spool_fill accepted kind %d from %s", (int)e->kind, e->from);
        uint8_t *p = NULL;
        size_t n = 0;
        ml_envelope_t *e2 = NULL;
        if (ml_env_pack(e, &p, &n) != 0 || ml_env_unpack(p, n, &e2) != 0)
            S_FAIL("a filled envelope does not pack and unpack");
        char err2[512] = "";
        if (ml_env_validate(e2, err2, sizeof err2) != 0)
            S_FAIL("valid before packing, invalid after: %s", err2);
        s_roundtrip(&e2->base, 0);
        ml_env_free(&e2);
        free(p);
    } else if (!err[0]) {
        S_FAIL("ml_spool_fill refused without a sentence");
    }
    ml_env_free(&e);
    return 0;
}
