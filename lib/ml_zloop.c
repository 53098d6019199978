/* ZeroMQ sockets on a libuv loop.
 *
 * ZMQ_FD becomes readable only on an *edge*: when libzmq has new commands
 * for the socket, not while messages are waiting. So a readable fd means
 * "look at ZMQ_EVENTS", and ZMQ_EVENTS must be looked at again after every
 * zmq_send/zmq_recv we make ourselves, since those can swallow the edge. We
 * do both: uv_poll_t wakes us on the edge, and a uv_check_t re-reads
 * ZMQ_EVENTS at the end of every loop iteration. The callback takes a
 * bounded batch; if input remains, an idle handle stops the loop from
 * sleeping in epoll until we have drained it. */
#include "ml_zloop.h"

#include <stdlib.h>

#include <zmq.h>

#include "ml_common.h"

struct ml_zwatch {
    uv_poll_t poll;
    uv_check_t check;
    uv_idle_t idle;
    void *zsock;
    ml_zwatch_cb cb;
    void *arg;
    int closing;
    int open_handles;
    int in_dispatch;
};

static void s_idle_cb(uv_idle_t *h)
{
    /* Nothing to do here: an active idle handle makes the loop poll with a
     * zero timeout, so the check handle runs again promptly. */
    (void)h;
}

static int s_has_input(ml_zwatch_t *w)
{
    int events = 0;
    size_t len = sizeof events;
    if (zmq_getsockopt(w->zsock, ZMQ_EVENTS, &events, &len) != 0)
        return 0;
    return (events & ZMQ_POLLIN) != 0;
}

static void s_dispatch(ml_zwatch_t *w)
{
    if (w->closing || w->in_dispatch)
        return;
    w->in_dispatch = 1;
    if (s_has_input(w)) {
        w->cb(w, w->zsock, w->arg);
        /* The callback may have destroyed the watcher (and closed the
         * socket); the struct itself lives until the close callbacks. */
        if (w->closing) {
            w->in_dispatch = 0;
            return;
        }
    }
    if (s_has_input(w))
        uv_idle_start(&w->idle, s_idle_cb);
    else
        uv_idle_stop(&w->idle);
    w->in_dispatch = 0;
}

static void s_poll_cb(uv_poll_t *h, int status, int events)
{
    (void)status;
    (void)events;
    s_dispatch(h->data);
}

static void s_check_cb(uv_check_t *h)
{
    s_dispatch(h->data);
}

int ml_zwatch_new(uv_loop_t *loop, void *zsock, ml_zwatch_cb cb, void *arg, ml_zwatch_t **out)
{
    int fd;
    size_t len = sizeof fd;
    if (zmq_getsockopt(zsock, ZMQ_FD, &fd, &len) != 0)
        return ML_EIO;
    ml_zwatch_t *w = calloc(1, sizeof *w);
    if (!w)
        return ML_ENOMEM;
    w->zsock = zsock;
    w->cb = cb;
    w->arg = arg;
    if (uv_poll_init(loop, &w->poll, fd) != 0) {
        free(w);
        return ML_EIO;
    }
    uv_check_init(loop, &w->check);
    uv_idle_init(loop, &w->idle);
    w->poll.data = w->check.data = w->idle.data = w;
    w->open_handles = 3;
    uv_poll_start(&w->poll, UV_READABLE, s_poll_cb);
    uv_check_start(&w->check, s_check_cb);
    /* Messages may already be waiting (the edge came before we watched). */
    uv_idle_start(&w->idle, s_idle_cb);
    *out = w;
    return 0;
}

static void s_close_cb(uv_handle_t *h)
{
    ml_zwatch_t *w = h->data;
    if (--w->open_handles == 0)
        free(w);
}

void ml_zwatch_destroy(ml_zwatch_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    ml_zwatch_t *w = *self_p;
    *self_p = NULL;
    w->closing = 1;
    uv_poll_stop(&w->poll);
    uv_check_stop(&w->check);
    uv_idle_stop(&w->idle);
    uv_close((uv_handle_t *)&w->poll, s_close_cb);
    uv_close((uv_handle_t *)&w->check, s_close_cb);
    uv_close((uv_handle_t *)&w->idle, s_close_cb);
}
