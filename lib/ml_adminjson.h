/* The JSON of the broker's answers to ops staff, built once: medlinkctl
 * --json prints it and medlinkd's /api/v1 serves it, from the same
 * AdminReply, so the two can never drift apart. It is the proto3 JSON of
 * the wire messages (ml_json.h), every field present, strings that are not
 * UTF-8 shown replaced (a store may hold one an older broker let through,
 * and one odd field must not hide a whole list). */
#ifndef ML_ADMINJSON_H
#define ML_ADMINJSON_H

#include <stddef.h>

#include "medlink/v1/envelope.pb-c.h"

enum {
    ML_ADMIN_JSON_STATUS = 1, /* the BrokerStatus itself (status) */
    ML_ADMIN_JSON_NODES,      /* {"node": [NodeStatus...]} of the BrokerStatus (nodes) */
    ML_ADMIN_JSON_CASES,      /* {"cases": [CaseInfo...]} (cases) */
    ML_ADMIN_JSON_DLQ,        /* {"deadLetter": [DeadLetter...]} (dlq list) */
    ML_ADMIN_JSON_CASE,       /* the CaseInfo with its timeline (case show) */
};

/* Renders what of rep `what` names, indented, into *out (malloc'd, the
 * caller's). Returns 0, ML_EINVAL (the reply lacks that part; err says
 * so) or ML_ENOMEM. */
int ml_admin_json(const Medlink__V1__AdminReply *rep, int what, char **out, char *err,
                  size_t errlen);

#endif
