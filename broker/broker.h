/* medlinkd's core: the ROUTER socket, one TLS session per routing id,
 * identity and ACL checks, the per-node delivery queues, acknowledgements,
 * and the admin view. The durable part lives in store.h; this module decides
 * what to store, when to answer Accepted, and what to deliver to whom.
 * Loop thread only. */
#ifndef ML_BROKER_H
#define ML_BROKER_H

#include <uv.h>

#include "config.h"

typedef struct ml_broker ml_broker_t;

/* Starts a broker on loop: opens the store under cfg->data_dir, loads the
 * pending queues, binds cfg->listen. Takes ownership of *cfg_p (clears it).
 * Returns 0, or ML_ECONFIG / ML_ETLS / ML_ESTORE / ML_EIO with err saying
 * what failed. */
int ml_broker_new(uv_loop_t *loop, ml_broker_config_t **cfg_p, ml_broker_t **out, char *err,
                  size_t errlen);
/* Flushes sessions (close_notify), commits the store, closes the socket and
 * every handle; the caller then runs the loop until it ends. Clears *self_p;
 * safe on NULL. */
void ml_broker_destroy(ml_broker_t **self_p);

/* Reloads the configuration file (SIGHUP): the node registry and services,
 * the ACL, deadlines, escalation, communities, limits and the CRL. Nodes no
 * longer listed are removed (their sessions closed, their queued messages
 * made dead letters); live sessions whose certificate the new CRL revokes
 * are closed and their next handshake refused. Keys used only at start-up
 * (id, listen, data_dir, ca, cert, key, max_store_bytes) keep their running
 * values, with a warning. A file that does not load, or a CRL that does not,
 * changes nothing: returns ML_ECONFIG / ML_ETLS with err saying why. Loop
 * thread. */
int ml_broker_reload(ml_broker_t *b, char *err, size_t errlen);

/* The endpoint actually bound (resolves "tcp://127.0.0.1:0"), borrowed. */
const char *ml_broker_endpoint(const ml_broker_t *b);

/* For fuzzing and tests: feeds decrypted record bytes (4-byte length +
 * Envelope, any split) into a session of node_id as it stands after a
 * completed TLS handshake with node_id's certificate: waiting for Hello,
 * then READY. The session is made on first use (and again after the broker
 * closed it); its output (Welcome, Accepted, Nack...) is discarded. Every
 * record takes the real path: frame reader, decode, Hello, validation,
 * routing, the case engine, the store, admin requests. Returns 0,
 * ML_ENOTFOUND (node_id not registered), ML_EINVAL or ML_ENOMEM. Loop
 * thread; run the loop for the store's answers. */
int ml_broker_feed_plaintext(ml_broker_t *b, const char *node_id, const uint8_t *data, size_t len);

#endif
