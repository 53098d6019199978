/* medlinkd's answers to medlinkctl (admin.c): an AdminRequest from an OPS
 * node's session, answered over the same session. The /api/v1 requests are
 * in http.h (ml_bk_api). admin.c reads the broker only through query.h and
 * changes it only through ops_cmd.h. Loop thread only. */
#ifndef ML_BK_ADMIN_H
#define ML_BK_ADMIN_H

#include "ml_env.h"

typedef struct ml_broker ml_broker_t;
typedef struct ml_session ml_session_t;

/* Answers an AdminRequest (env->admin_request) from session s: a node
 * whose role is not OPS is refused with NACK_FORBIDDEN. The answer goes out
 * now, or, for a replay, purge or prune, once the store has done it (to the
 * session if it is still open then). */
void ml_bk_admin(ml_broker_t *b, ml_session_t *s, ml_envelope_t *env);
/* Frees the replies still waiting for the store (after it is closed: their
 * callbacks never come). */
void ml_bk_admin_free(ml_broker_t *b);

#endif
