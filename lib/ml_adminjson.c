/* JSON of the broker's answers to ops staff (see ml_adminjson.h). */
#include "ml_adminjson.h"

#include <stdio.h>
#include <stdlib.h>

#include <jansson.h>

#include "ml_common.h"
#include "ml_json.h"

#define S_FLAGS (ML_JSON_EMIT_DEFAULTS | ML_JSON_REPLACE_INVALID)

/* {"key": [msgs...]}, indented like ml_json_encode's pretty output. */
static int s_list(const char *key, ProtobufCMessage *const *msgs, size_t n, char **out, char *err,
                  size_t errlen)
{
    json_t *arr = json_array();
    for (size_t i = 0; arr && i < n; i++) {
        char *text = NULL;
        int rc = ml_json_encode(msgs[i], S_FLAGS, &text, err, errlen);
        if (rc != 0) {
            json_decref(arr);
            return rc;
        }
        json_error_t jerr;
        json_t *j = json_loads(text, 0, &jerr);
        free(text);
        if (!j || json_array_append_new(arr, j) < 0) {
            json_decref(arr);
            arr = NULL;
        }
    }
    json_t *doc = arr ? json_pack("{s:o}", key, arr) : NULL;
    *out = doc ? json_dumps(doc, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
    json_decref(doc);
    if (!*out) {
        ml_seterr(err, errlen, "out of memory");
        return ML_ENOMEM;
    }
    return 0;
}

int ml_admin_json(const Medlink__V1__AdminReply *rep, int what, char **out, char *err,
                  size_t errlen)
{
    const Medlink__V1__BrokerStatus *st = rep->broker_status;
    *out = NULL;
    switch (what) {
    case ML_ADMIN_JSON_STATUS:
    case ML_ADMIN_JSON_NODES:
        if (!st) {
            ml_seterr(err, errlen, "the reply has no status");
            return ML_EINVAL;
        }
        if (what == ML_ADMIN_JSON_STATUS)
            return ml_json_encode(&st->base, S_FLAGS | ML_JSON_PRETTY, out, err, errlen);
        return s_list("node", (ProtobufCMessage *const *)st->node, st->n_node, out, err, errlen);
    case ML_ADMIN_JSON_CASES:
        return s_list("cases", (ProtobufCMessage *const *)rep->cases, rep->n_cases, out, err,
                      errlen);
    case ML_ADMIN_JSON_DLQ:
        return s_list("deadLetter", (ProtobufCMessage *const *)rep->dead_letter, rep->n_dead_letter,
                      out, err, errlen);
    case ML_ADMIN_JSON_CASE:
        if (!rep->case_info) {
            ml_seterr(err, errlen, "the reply has no case");
            return ML_EINVAL;
        }
        return ml_json_encode(&rep->case_info->base, S_FLAGS | ML_JSON_PRETTY, out, err, errlen);
    }
    ml_seterr(err, errlen, "unknown part %d of an admin reply", what);
    return ML_EINVAL;
}
