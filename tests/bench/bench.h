/* medlink-bench's parts: the physical ceilings (bench_ceiling.c: raw
 * ZeroMQ over loopback, durable writes to a disk) and the workloads that go
 * through a real medlinkd (bench_load.c: referrals, referral updates,
 * imaging consults with their chunks). Each entry point prints "key value"
 * lines on stdout for bench.sh and returns a process exit code. */
#ifndef ML_BENCH_H
#define ML_BENCH_H

#include <stddef.h>
#include <stdint.h>

/* Monotonic nanoseconds (the one clock every latency is measured on). */
uint64_t bench_ns(void);

/* One ZeroMQ DEALER streams count frames of size bytes to a ROUTER over
 * tcp://127.0.0.1 in this process (two threads); no TLS, no store. */
int bench_raw(size_t size, long count);

/* Writes count blocks of size bytes to a new file in dir, with one
 * fdatasync per sync_bytes and one at the end (the broker's group-commit
 * pattern), then removes the file. The durable write ceiling of that
 * file system. */
int bench_disk(const char *dir, size_t size, long count, size_t sync_bytes);

typedef struct {
    const char *broker; /* medlinkd's endpoint */
    const char *pki;    /* ca.crt and NODE.{crt,key} for every node */
    int n_clinics;      /* township.benchNN.clinic */
    int n_readers;      /* reading.benchNN.imaging, serving imaging.ct */
    int offline;        /* the hospital never connects (backlog) */
    long referrals;     /* referrals in all, to county.bench.hospital */
    size_t size;        /* bytes per referral envelope (padded) */
    int updates;        /* the hospital answers each referral with ACCEPTED */
    long studies;       /* imaging consults in all */
    int objects;        /* DICOM objects per study */
    size_t object_size; /* bytes of the first object (the others a little more) */
    uint32_t chunk_size;
    long window;         /* messages in flight per sender (the agent's send_window) */
    size_t window_bytes; /* bytes in flight per sender (send_window_bytes) */
    int split;           /* clinics send one class each (mixed workload) */
    int no_notices;      /* the broker is configured with notify_delivered = no */
    int close_cases;     /* with updates: the hospital answers REJECTED (final), not ACCEPTED */
    int timeout_s;       /* give up after this long */
    double rate;         /* > 0: referrals paced to this many per second in all (latency) */
    int start_when_up;   /* clinics send nothing until every node's channel is up */
} bench_load_opts_t;

/* Runs the workload of o through the broker and prints what it measured.
 * Returns 0 when everything was accepted, delivered and verified. */
int bench_load(const bench_load_opts_t *o);

/* Issues count node certificates (PREFIXnnnnn.clinic for nnnnn from first)
 * from pki's ca.crt and ca.key, one fresh EC P-256 key each, with the
 * extensions deploy/pki.sh gives a node. */
int bench_certs(const char *pki, const char *prefix, long first, long count);

typedef struct {
    const char *broker;
    const char *pki;
    const char *prefix;    /* nodes PREFIXnnnnn.clinic */
    long first, count;     /* nnnnn from first, count of them */
    double rate;           /* sessions opened per second */
    int hold_s;            /* seconds all must stay up once all are up */
    uint32_t heartbeat_ms; /* the channel's idle heartbeat (the agent's default: 2000) */
    int timeout_s;         /* give up when not all are up by then */
} bench_idle_opts_t;

/* Opens count channels at rate per second that send nothing, and holds them
 * all up for hold_s. Prints "all_up_s" (flushed) the moment all are up.
 * Returns 0 when all came up and none went down. */
int bench_idle(const bench_idle_opts_t *o);

#endif
