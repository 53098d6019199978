#!/usr/bin/env bash
# medlink throughput/latency/memory benchmark. Everything on 127.0.0.1.
#
#   tests/bench/bench.sh [--clinics N] [--count M] [--size BYTES] [--queued Q]
#
# In one run it measures:
#   1. the raw ZeroMQ DEALER->ROUTER ceiling for frames of --size bytes;
#   2. durable end to end: N clinics -> medlinkd (TLS 1.3, SQLite WAL with
#      synchronous=FULL, group commit) -> one hospital that acks, M messages;
#      messages/s, p50/p99 latency, peak broker RSS, ratio to (1).
#   Both (1) and (2) run 3 times (a fresh broker and store each time for 2);
#   the ratio is of the medians, and every run is printed: the machine is
#   shared and single runs swing by +-25%.
#   3. broker memory with Q messages queued for an offline hospital.
# Figures go to stdout and to tests/bench/results/last.txt.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLINICS=4
COUNT=200000
SIZE=1024
QUEUED=100000
while [ $# -gt 0 ]; do
    case "$1" in
    --clinics) CLINICS=$2; shift 2 ;;
    --count) COUNT=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --queued) QUEUED=$2; shift 2 ;;
    *) echo "bench.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

BUILD="$ROOT/build-bench"
"$ROOT/deploy/setup.sh" --build-dir "$BUILD" -- -DCMAKE_BUILD_TYPE=Release -DML_BUILD_TESTS=ON >/dev/null
BENCH="$BUILD/tests/bench/medlink-bench"
MEDLINKD="$BUILD/broker/medlinkd"

W=$(mktemp -d "${TMPDIR:-/tmp}/mlbench.XXXXXX")
BROKER_PID=""
cleanup() { [ -n "$BROKER_PID" ] && kill -TERM "$BROKER_PID" 2>/dev/null && wait "$BROKER_PID" 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT

nodes=(medlinkd.bench county.bench.hospital)
for i in $(seq 1 "$CLINICS"); do nodes+=("$(printf 'township.bench%02d.clinic' "$i")"); done
"$ROOT/deploy/pki.sh" --dir "$W/pki" "${nodes[@]}" >/dev/null

PORT=$((20000 + RANDOM % 20000))
while (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do PORT=$((PORT + 1)); done
write_config() {
    {
        printf '[broker]\nid = medlinkd.bench\nlisten = tcp://127.0.0.1:%s\ndata_dir = %s\n' "$PORT" "$1"
        printf 'ca = %s/pki/ca.crt\ncert = %s/pki/medlinkd.bench.crt\nkey = %s/pki/medlinkd.bench.key\n' "$W" "$W" "$W"
        printf 'log_level = warn\ndelivery_window = 1024\n\n'
        printf '[node county.bench.hospital]\nrole = COUNTY_HOSPITAL\n\n'
        for i in $(seq 1 "$CLINICS"); do printf '[node township.bench%02d.clinic]\nrole = TOWNSHIP_CLINIC\n\n' "$i"; done
        printf '[acl TOWNSHIP_CLINIC]\nREFERRAL = COUNTY_HOSPITAL\n'
    } >"$W/medlinkd.ini"
}
start_broker() {
    "$MEDLINKD" --config "$W/medlinkd.ini" 2>>"$W/broker.log" &
    BROKER_PID=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0; sleep 0.1; done
    echo "medlinkd did not start" >&2; cat "$W/broker.log" >&2; exit 1
}
stop_broker() { kill -TERM "$BROKER_PID"; wait "$BROKER_PID" || true; BROKER_PID=""; }
kv() { grep "^$1 " "$2" | awk '{print $2}'; }
rss_kib() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status"; }

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "== raw ZeroMQ ceiling ($SIZE-byte frames), 3 runs"
: >"$W/raw.all"
for _ in 1 2 3; do "$BENCH" raw --size "$SIZE" --count 1000000 | tee -a "$W/raw.all"; done

echo "== durable end to end: $CLINICS clinics -> medlinkd -> 1 hospital, $COUNT x $SIZE B, 3 runs"
: >"$W/e2e.all"
PEAK=0
for r in 1 2 3; do
    write_config "$W/data-e2e-$r"
    start_broker
    "$BENCH" e2e --broker "tcp://127.0.0.1:$PORT" --pki "$W/pki" --clinics "$CLINICS" \
        --count "$COUNT" --size "$SIZE" 2>"$W/e2e.err" | tee "$W/e2e-$r.txt"
    cat "$W/e2e-$r.txt" >>"$W/e2e.all"
    P=$(rss_kib "$BROKER_PID" VmHWM)
    [ "$P" -gt "$PEAK" ] && PEAK=$P
    stop_broker
    rm -rf "$W/data-e2e-$r"
done

echo "== broker memory with $QUEUED messages queued for an offline hospital"
write_config "$W/data2"
start_broker
"$BENCH" e2e --broker "tcp://127.0.0.1:$PORT" --pki "$W/pki" --clinics "$CLINICS" \
    --count "$QUEUED" --size "$SIZE" --offline 2>"$W/off.err" | tee "$W/off.txt"
Q_RSS=$(rss_kib "$BROKER_PID" VmRSS)
Q_HWM=$(rss_kib "$BROKER_PID" VmHWM)
stop_broker
echo "== restart with the backlog (queues reloaded from the store)"
start_broker
sleep 1
R_RSS=$(rss_kib "$BROKER_PID" VmRSS)
stop_broker

RAW=$(grep '^raw_frames_per_s ' "$W/raw.all" | awk '{print $2}' | median)
RAWS=$(grep '^raw_frames_per_s ' "$W/raw.all" | awk '{printf "%s ", $2}')
DEL=$(grep '^delivered_per_s ' "$W/e2e.all" | awk '{print $2}' | median)
DELS=$(grep '^delivered_per_s ' "$W/e2e.all" | awk '{printf "%s ", $2}')
ACC=$(grep '^accepted_per_s ' "$W/e2e.all" | awk '{print $2}' | median)
P50=$(grep '^latency_p50_ms ' "$W/e2e.all" | awk '{print $2}' | median)
P99=$(grep '^latency_p99_ms ' "$W/e2e.all" | awk '{print $2}' | median)
DUPS=$(grep '^duplicates_seen ' "$W/e2e.all" | awk '{s+=$2} END {print s}')
RATIO=$(awk -v a="$DEL" -v b="$RAW" 'BEGIN{printf "%.1f", 100*a/b}')
mkdir -p "$ROOT/tests/bench/results"
{
    echo "medlink benchmark $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nproc) cores"
    echo "command: tests/bench/bench.sh --clinics $CLINICS --count $COUNT --size $SIZE --queued $QUEUED"
    echo "raw ZeroMQ DEALER->ROUTER ceiling, $SIZE B frames: median $RAW frames/s (runs: $RAWS)"
    echo "durable e2e delivered: median $DEL msg/s (runs: $DELS)"
    echo "ratio of medians: $RATIO% of the raw ceiling"
    echo "durable e2e accepted: median $ACC msg/s"
    echo "latency (median of runs): p50 $P50 ms, p99 $P99 ms"
    echo "duplicates seen by the hospital: $DUPS"
    echo "peak broker RSS during e2e: $((PEAK / 1024)) MiB"
    echo "broker RSS with $QUEUED queued for an offline node: $((Q_RSS / 1024)) MiB (peak $((Q_HWM / 1024)) MiB); after restart reloading them: $((R_RSS / 1024)) MiB"
} | tee "$ROOT/tests/bench/results/last.txt"
