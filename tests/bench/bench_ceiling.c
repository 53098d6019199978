/* The ceilings the broker's figures are compared with, measured on the same
 * machine in the same script run: what ZeroMQ alone moves over loopback
 * (no TLS, no protocol, no store), and how fast the file system of the
 * broker's data folder takes bytes durably when they are synced the way
 * the store's group commit syncs them. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <zmq.h>

#include "bench.h"

uint64_t bench_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---------------------------------------------------------------- raw */

typedef struct {
    const char *ep;
    size_t size;
    long count;
    void *ctx;
} s_raw_args_t;

static void *s_raw_sender(void *arg)
{
    s_raw_args_t *a = arg;
    void *s = zmq_socket(a->ctx, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(s, ZMQ_SNDHWM, &zero, sizeof zero);
    zmq_connect(s, a->ep);
    char *buf = calloc(1, a->size);
    for (long i = 0; i < a->count; i++)
        zmq_send(s, buf, a->size, 0);
    free(buf);
    int linger = -1;
    zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger);
    zmq_close(s);
    return NULL;
}

int bench_raw(size_t size, long count)
{
    void *ctx = zmq_ctx_new();
    void *r = zmq_socket(ctx, ZMQ_ROUTER);
    int zero = 0;
    zmq_setsockopt(r, ZMQ_RCVHWM, &zero, sizeof zero);
    if (zmq_bind(r, "tcp://127.0.0.1:0") != 0) {
        fprintf(stderr, "raw: bind failed: %s\n", zmq_strerror(zmq_errno()));
        return 1;
    }
    char ep[128];
    size_t len = sizeof ep;
    zmq_getsockopt(r, ZMQ_LAST_ENDPOINT, ep, &len);
    s_raw_args_t a = {ep, size, count, ctx};
    pthread_t t;
    pthread_create(&t, NULL, s_raw_sender, &a);
    zmq_msg_t m;
    zmq_msg_init(&m);
    uint64_t t0 = 0;
    for (long i = 0; i < count; i++) {
        zmq_msg_recv(&m, r, 0); /* routing id */
        zmq_msg_recv(&m, r, 0); /* payload */
        /* The clock starts at the first frame, so connecting is not
         * counted; hence count - 1 frames below. */
        if (i == 0)
            t0 = bench_ns();
    }
    uint64_t t1 = bench_ns();
    zmq_msg_close(&m);
    pthread_join(t, NULL);
    zmq_close(r);
    zmq_ctx_term(ctx);
    double secs = (double)(t1 - t0) / 1e9;
    double rate = (double)(count - 1) / secs;
    printf("raw_frames_per_s %.0f\n", rate);
    printf("raw_mb_per_s %.1f\n", rate * (double)size / 1e6);
    return 0;
}

/* --------------------------------------------------------------- disk */

int bench_disk(const char *dir, size_t size, long count, size_t sync_bytes)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/disk-ceiling.%ld.tmp", dir, (long)getpid());
    uint8_t *buf = malloc(size);
    if (!buf)
        return 1;
    /* Incompressible bytes, in case the storage under us compresses. */
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < size; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        buf[i] = (uint8_t)x;
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
    if (fd < 0) {
        fprintf(stderr, "disk: cannot create %s: %s\n", path, strerror(errno));
        free(buf);
        return 1;
    }
    int rc = 0;
    long syncs = 0;
    size_t since_sync = 0;
    uint64_t t0 = bench_ns();
    for (long i = 0; i < count && rc == 0; i++) {
        /* Vary the block so that no layer can deduplicate it. */
        memcpy(buf, &i, sizeof i);
        for (size_t off = 0; off < size;) {
            ssize_t n = write(fd, buf + off, size - off);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                fprintf(stderr, "disk: write: %s\n", strerror(errno));
                rc = 1;
                break;
            }
            off += (size_t)n;
        }
        since_sync += size;
        if (since_sync >= sync_bytes || i + 1 == count) {
            if (fdatasync(fd) != 0) {
                fprintf(stderr, "disk: fdatasync: %s\n", strerror(errno));
                rc = 1;
            }
            syncs++;
            since_sync = 0;
        }
    }
    uint64_t t1 = bench_ns();
    close(fd);
    unlink(path);
    free(buf);
    if (rc != 0)
        return rc;
    double secs = (double)(t1 - t0) / 1e9;
    double bytes = (double)size * (double)count;
    printf("disk_bytes %.0f\n", bytes);
    printf("disk_syncs %ld\n", syncs);
    printf("disk_mb_per_s %.1f\n", bytes / secs / 1e6);
    printf("disk_ms_per_sync %.2f\n", secs * 1e3 / (double)syncs);
    return 0;
}
