/* ZeroMQ sockets driven by a libuv loop. ZMQ_FD is edge-triggered and only
 * says "look at ZMQ_EVENTS"; this watcher polls it with uv_poll_t, and
 * re-checks ZMQ_EVENTS from a uv_check_t after every loop iteration (so
 * events made pending by our own sends and receives are never missed). When
 * the socket has input it calls the callback, which must receive at most a
 * bounded number of messages; if input remains, an idle handle keeps the
 * loop spinning instead of sleeping. Loop thread only. */
#ifndef ML_ZLOOP_H
#define ML_ZLOOP_H

#include <uv.h>

typedef struct ml_zwatch ml_zwatch_t;
/* Called on the loop thread when the socket has input. */
typedef void (*ml_zwatch_cb)(ml_zwatch_t *w, void *zsock, void *arg);

/* Starts watching zsock. Returns 0, ML_ENOMEM or ML_EIO. */
int ml_zwatch_new(uv_loop_t *loop, void *zsock, ml_zwatch_cb cb, void *arg, ml_zwatch_t **out);
/* Stops watching and closes the uv handles (freed in their close callback).
 * Call before zmq_close() of the socket. Clears *self_p; safe on NULL. */
void ml_zwatch_destroy(ml_zwatch_t **self_p);

#endif
