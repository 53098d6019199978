/* medlink-bench: load generator and ceilings, built on libmedlink.
 *
 *   medlink-bench raw     --size BYTES --count N
 *       The raw ZeroMQ ceiling: one DEALER streams N frames of BYTES to one
 *       ROUTER over tcp://127.0.0.1 in this process (two threads), no TLS,
 *       no store. Prints frames/s and MB/s.
 *
 *   medlink-bench disk    --dir DIR --size BYTES --count N [--sync-bytes B]
 *       The durable write ceiling of DIR's file system: N blocks of BYTES
 *       written to a new file with one fdatasync per B bytes (default
 *       8 MiB, the broker's group commit under load) and at the end. MB/s.
 *
 *   medlink-bench e2e     --broker EP --pki DIR --clinics N --count M
 *                         --size BYTES [--window W] [--offline] [--no-notices]
 *                         [--close] [--rate R] [--start-when-up]
 *                         [--broker-pid PID]
 *       N clinics (township.benchNN.clinic, each its own mutual-TLS channel)
 *       send M referrals in all, padded to BYTES, to county.bench.hospital,
 *       which acknowledges each delivery (an agent with an instant disk).
 *       The clinics take deliveries too and acknowledge the broker's
 *       DELIVERED notices as agents do. Accepted/s, delivered/s, p50/p99
 *       clinic send -> hospital receive. With --offline the hospital never
 *       connects and the run ends once all M are Accepted (backlog memory).
 *       --no-notices: the broker runs with notify_delivered = no, so the
 *       run does not wait for notices. --close: the hospital answers each
 *       referral with REJECTED, which closes its case (tests/bench/
 *       retention.sh), and the run waits for those updates too.
 *       --broker-pid: also print what that process (the broker, on this
 *       machine) wrote to storage during the run, from /proc/PID/io
 *       write_bytes: broker_write_bytes and broker_write_bytes_per_referral.
 *
 *   medlink-bench imaging --broker EP --pki DIR --clinics N --readers R
 *                         --studies S [--objects K] [--object-size B]
 *                         [--chunk-size C] [--window-bytes WB]
 *       N clinics send S imaging studies in all to the service imaging.ct:
 *       per study an ImagingConsult (K objects, their sizes, SHA-256 and
 *       chunk counts) and then one ImagingChunk per C bytes, at most WB
 *       bytes unanswered per clinic. R reading centres
 *       (reading.benchNN.imaging) verify every chunk's SHA-256, acknowledge,
 *       and answer each complete study with STUDY_RECEIVED. Imaging MB/s is
 *       chunk payload bytes delivered per second.
 *
 *       --rate R: the clinics send R referrals per second in all, paced
 *       (a tick per millisecond), instead of as fast as the window allows:
 *       latency at a given load rather than at saturation.
 *       --start-when-up: the clinics send nothing until every node's
 *       channel is up, so that 64 clinics' handshakes are not counted as
 *       time of the run.
 *
 *   medlink-bench certs   --pki DIR --count N [--first F] [--prefix P]
 *       Issues N node certificates Pnnnnn.clinic (nnnnn from F, default 1;
 *       P default "township.idle") from DIR/ca.crt and DIR/ca.key (made by
 *       deploy/pki.sh), in-process: a fresh EC P-256 key each, the
 *       extensions pki.sh gives a node. 10,000 take seconds, not minutes.
 *
 *   medlink-bench idle    --broker EP --pki DIR --count N [--first F]
 *                         [--prefix P] [--rate R] [--hold S]
 *                         [--heartbeat-ms H] [--timeout T]
 *       Opens N sessions (one channel per node Pnnnnn.clinic, its own
 *       certificate, Hello with deliveries) at R per second (default 400)
 *       that send nothing but heartbeats (every H ms, default 2000 as the
 *       agent), and holds them all up for S seconds (default 30) once all
 *       are up. Prints all_up_s when the last came up, then how many were
 *       up at the end and how many went down after being up.
 *
 *   medlink-bench mixed   (the options of e2e and imaging)
 *       Referrals, the hospital's ACCEPTED update for each one, and imaging
 *       studies at the same time: half the clinics send referrals, the
 *       other half imaging. Each class's rate over the time all of them were
 *       flowing, and each class's latency.
 *
 * Output lines are "key value" pairs so bench.sh can read them; the last is
 * "result ok" or "result FAILED". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "ml_common.h"
#include "ml_imaging.h"

static void s_usage(void)
{
    fprintf(stderr, "usage: medlink-bench raw|disk|e2e|imaging|mixed|certs|idle [options]\n"
                    "(see the comment at the top of tests/bench/medlink-bench.c)\n");
}

/* Bytes process pid caused to be written to storage (/proc/PID/io
 * write_bytes), or -1. */
static long long s_write_bytes(long pid)
{
    char path[64], key[32];
    snprintf(path, sizeof path, "/proc/%ld/io", pid);
    FILE *f = fopen(path, "r");
    long long v = -1, x;
    if (!f)
        return -1;
    while (fscanf(f, "%31s %lld", key, &x) == 2)
        if (!strcmp(key, "write_bytes:"))
            v = x;
    fclose(f);
    return v;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        s_usage();
        return 2;
    }
    const char *mode = argv[1];
    const char *dir = NULL;
    size_t size = 1024, sync_bytes = 8u * 1024 * 1024;
    long broker_pid = 0;
    long count = 100000;
    bench_load_opts_t o = {
        .n_clinics = 4,
        .n_readers = 2,
        .size = 1024,
        .objects = 8,
        .object_size = 4u * 1024 * 1024,
        .chunk_size = ML_IMAGING_CHUNK_DEFAULT,
        .window = 1000,
        .window_bytes = 8u * 1024 * 1024,
        .timeout_s = 300,
    };
    bench_idle_opts_t io = {
        .prefix = "township.idle",
        .first = 1,
        .rate = 400,
        .hold_s = 30,
        .heartbeat_ms = 2000,
    };
    int timeout_set = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--offline")) {
            o.offline = 1;
            continue;
        }
        if (!strcmp(a, "--start-when-up")) {
            o.start_when_up = 1;
            continue;
        }
        if (!strcmp(a, "--no-notices")) {
            o.no_notices = 1;
            continue;
        }
        if (!strcmp(a, "--close")) {
            o.updates = 1;
            o.close_cases = 1;
            continue;
        }
        if (!v) {
            fprintf(stderr, "option %s needs a value\n", a);
            return 2;
        }
        i++;
        if (!strcmp(a, "--size"))
            size = strtoul(v, NULL, 10);
        else if (!strcmp(a, "--count"))
            count = strtol(v, NULL, 10);
        else if (!strcmp(a, "--dir"))
            dir = v;
        else if (!strcmp(a, "--sync-bytes"))
            sync_bytes = strtoul(v, NULL, 10);
        else if (!strcmp(a, "--broker"))
            o.broker = v;
        else if (!strcmp(a, "--pki"))
            o.pki = v;
        else if (!strcmp(a, "--clinics"))
            o.n_clinics = atoi(v);
        else if (!strcmp(a, "--readers"))
            o.n_readers = atoi(v);
        else if (!strcmp(a, "--window"))
            o.window = strtol(v, NULL, 10);
        else if (!strcmp(a, "--window-bytes"))
            o.window_bytes = strtoul(v, NULL, 10);
        else if (!strcmp(a, "--studies"))
            o.studies = strtol(v, NULL, 10);
        else if (!strcmp(a, "--objects"))
            o.objects = atoi(v);
        else if (!strcmp(a, "--object-size"))
            o.object_size = strtoul(v, NULL, 10);
        else if (!strcmp(a, "--chunk-size"))
            o.chunk_size = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(a, "--timeout")) {
            o.timeout_s = atoi(v);
            timeout_set = 1;
        } else if (!strcmp(a, "--broker-pid"))
            broker_pid = atol(v);
        else if (!strcmp(a, "--rate"))
            o.rate = io.rate = strtod(v, NULL);
        else if (!strcmp(a, "--first"))
            io.first = strtol(v, NULL, 10);
        else if (!strcmp(a, "--prefix"))
            io.prefix = v;
        else if (!strcmp(a, "--hold"))
            io.hold_s = atoi(v);
        else if (!strcmp(a, "--heartbeat-ms"))
            io.heartbeat_ms = (uint32_t)strtoul(v, NULL, 10);
        else {
            fprintf(stderr, "unknown option %s\n", a);
            return 2;
        }
    }
    ml_log_set_level(ML_LOG_WARN);
    if (!strcmp(mode, "raw"))
        return bench_raw(size, count);
    if (!strcmp(mode, "disk")) {
        if (!dir) {
            fprintf(stderr, "disk needs --dir\n");
            return 2;
        }
        return bench_disk(dir, size, count, sync_bytes);
    }
    if (!strcmp(mode, "certs")) {
        if (!o.pki || count < 1) {
            fprintf(stderr, "certs needs --pki and --count\n");
            return 2;
        }
        return bench_certs(o.pki, io.prefix, io.first, count);
    }
    if (!strcmp(mode, "idle")) {
        io.broker = o.broker;
        io.pki = o.pki;
        io.count = count;
        /* Time to come up at the rate, plus the hold, plus a margin. */
        io.timeout_s = timeout_set ? o.timeout_s : (int)(count / io.rate) + io.hold_s + 60;
        if (!io.broker || !io.pki || io.count < 1 || io.rate <= 0 || io.hold_s < 0) {
            fprintf(stderr, "idle needs --broker, --pki, --count and a positive --rate\n");
            return 2;
        }
        return bench_idle(&io);
    }
    int e2e = !strcmp(mode, "e2e"), imaging = !strcmp(mode, "imaging"),
        mixed = !strcmp(mode, "mixed");
    if (!e2e && !imaging && !mixed) {
        fprintf(stderr, "unknown mode %s\n", mode);
        s_usage();
        return 2;
    }
    if (!o.broker || !o.pki) {
        fprintf(stderr, "%s needs --broker and --pki\n", mode);
        return 2;
    }
    if (o.n_clinics < 1 || o.n_readers < 1 || o.objects < 1 || o.window < 1 ||
        o.chunk_size < ML_IMAGING_CHUNK_MIN || o.chunk_size > ML_IMAGING_CHUNK_MAX) {
        fprintf(stderr, "bad option value\n");
        return 2;
    }
    o.size = size;
    if (e2e || mixed)
        o.referrals = count;
    if (imaging || mixed) {
        if (o.studies < 1) {
            fprintf(stderr, "%s needs --studies\n", mode);
            return 2;
        }
    } else {
        o.studies = 0;
    }
    if (mixed) {
        o.updates = 1;
        o.split = 1;
        if (o.n_clinics < 2) {
            fprintf(stderr, "mixed needs at least 2 clinics\n");
            return 2;
        }
    }
    if (!broker_pid)
        return bench_load(&o);
    long long w0 = s_write_bytes(broker_pid);
    int rc = bench_load(&o);
    long long w1 = s_write_bytes(broker_pid);
    if (w0 >= 0 && w1 >= w0) {
        printf("broker_write_bytes %lld\n", w1 - w0);
        if (o.referrals > 0)
            printf("broker_write_bytes_per_referral %.0f\n",
                   (double)(w1 - w0) / (double)o.referrals);
    }
    return rc;
}
