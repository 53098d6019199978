#!/usr/bin/env bash
# broker.db over a long run of referrals whose cases close: does retention
# keep the file flat? Everything on 127.0.0.1.
#
#   tests/bench/retention.sh [--count N] [--every K] [--clinics C] [--size BYTES]
#                            [--timeline-seconds T] [--keep]
#
# One real medlinkd runs with retention_seconds = 0 (a delivered message of
# a final case goes at the next pruning run; retention_seconds is the test
# and benchmark override of retention_days), timeline_retention_seconds = T
# (default 10: a final case's row and timeline go T s after it closed) and
# retention_interval_s = 1. medlink-bench e2e --close drives C clinics that
# send N referrals (default 1,000,000) of BYTES to one hospital, which
# acknowledges each and answers it with REJECTED, a final state; the
# clinics take the update and the broker's DELIVERED notice. Every K
# referrals (default 100,000) the script samples broker.db and its WAL,
# the rows per table (sqlite3, read-only, beside the running broker) and
# the broker's RSS, and prints one table row. After the last round it waits
# until nothing is left to prune (at most T + 180 s) and samples once more
# ("settled"). The table goes to stdout and to
# tests/bench/results/retention.txt. Exits non-zero if a round failed.
# --keep runs the same load with retention off (retention_days = -1,
# timeline_retention_days = -1), for the figure to compare with.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
COUNT=1000000
EVERY=100000
CLINICS=4
SIZE=512
TIMELINE=10
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
    --count) COUNT=$2; shift 2 ;;
    --every) EVERY=$2; shift 2 ;;
    --clinics) CLINICS=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --timeline-seconds) TIMELINE=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "retention.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$EVERY" -ge 1 ] && [ "$COUNT" -ge "$EVERY" ] || { echo "retention.sh: need --count >= --every >= 1" >&2; exit 2; }

BUILD="$ROOT/build-bench"
"$ROOT/deploy/setup.sh" --no-build >/dev/null
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DML_BUILD_TESTS=ON >/dev/null
cmake --build "$BUILD" -j "$(nproc)" --target medlinkd medlink-bench >/dev/null
BENCH="$BUILD/tests/bench/medlink-bench"
MEDLINKD="$BUILD/broker/medlinkd"

W=$(mktemp -d "${TMPDIR:-/tmp}/mlret.XXXXXX")
BROKER_PID=""
cleanup() { [ -n "$BROKER_PID" ] && kill -TERM "$BROKER_PID" 2>/dev/null && wait "$BROKER_PID" 2>/dev/null; rm -rf "$W"; }
trap cleanup EXIT

nodes=(medlinkd.bench county.bench.hospital)
for i in $(seq 1 "$CLINICS"); do nodes+=("$(printf 'township.bench%02d.clinic' "$i")"); done
"$ROOT/deploy/pki.sh" --dir "$W/pki" "${nodes[@]}" >/dev/null

PORT=$((20000 + RANDOM % 20000))
while (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do PORT=$((PORT + 1)); done
{
    printf '[broker]\nid = medlinkd.bench\nlisten = tcp://127.0.0.1:%s\ndata_dir = %s/data\n' "$PORT" "$W"
    printf 'ca = %s/pki/ca.crt\ncert = %s/pki/medlinkd.bench.crt\nkey = %s/pki/medlinkd.bench.key\n' "$W" "$W" "$W"
    printf 'log_level = warn\ndelivery_window = 1024\nnode_rate = 10000000\n'
    if [ "$KEEP" = 1 ]; then
        printf 'retention_days = -1\ntimeline_retention_days = -1\n\n'
    else
        printf 'retention_seconds = 0\ntimeline_retention_seconds = %s\nretention_interval_s = 1\n\n' "$TIMELINE"
    fi
    # A port of the system's choosing: parallel runs never collide.
    printf '[http]\nlisten = 127.0.0.1:0\n\n'
    printf '[node county.bench.hospital]\nrole = COUNTY_HOSPITAL\n\n'
    for i in $(seq 1 "$CLINICS"); do printf '[node township.bench%02d.clinic]\nrole = TOWNSHIP_CLINIC\n\n' "$i"; done
    printf '[acl TOWNSHIP_CLINIC]\nREFERRAL = COUNTY_HOSPITAL\n\n'
    printf '[acl COUNTY_HOSPITAL]\nREFERRAL_UPDATE = TOWNSHIP_CLINIC\n'
} >"$W/medlinkd.ini"

"$MEDLINKD" --config "$W/medlinkd.ini" 2>>"$W/broker.log" &
BROKER_PID=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done

DB="$W/data/broker.db"
size() { stat -c %s "$1" 2>/dev/null || echo 0; }
rows() {
    if command -v sqlite3 >/dev/null; then
        sqlite3 -readonly "$DB" "PRAGMA busy_timeout=5000; SELECT (SELECT count(*) FROM messages) || ' ' || (SELECT count(*) FROM bodies) || ' ' || (SELECT count(*) FROM cases) || ' ' || (SELECT count(*) FROM case_events) || ' ' || (SELECT freelist_count FROM pragma_freelist_count);" 2>/dev/null | tail -1
    else
        echo "- - - - -"
    fi
}
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
mkdir -p "$ROOT/tests/bench/results"
OUT="$ROOT/tests/bench/results/retention.txt"
sample() {
    local label=$1 db wal r rss
    db=$(size "$DB")
    wal=$(size "$DB-wal")
    r=$(rows)
    rss=$(awk '$1=="VmRSS:" {print $2}' "/proc/$BROKER_PID/status")
    # shellcheck disable=SC2086
    printf '%-10s %10s %10s %10s %9s %9s %9s %11s %9s %9s\n' "$label" "$(mib "$db")" "$(mib "$wal")" \
        "$(mib $((db + wal)))" $r "$(mib $((rss * 1024)))" | tee -a "$OUT"
}

FAILS=0
{
    echo "# tests/bench/retention.sh --count $COUNT --every $EVERY --clinics $CLINICS --size $SIZE --timeline-seconds $TIMELINE$([ "$KEEP" = 1 ] && echo ' --keep (retention off)')"
    if [ "$KEEP" = 1 ]; then
        echo "# $(date -u +%FT%TZ) $(nproc) cores; retention_days = -1, timeline_retention_days = -1"
    else
        echo "# $(date -u +%FT%TZ) $(nproc) cores; retention_seconds = 0, timeline_retention_seconds = $TIMELINE, retention_interval_s = 1"
    fi
    printf '%-10s %10s %10s %10s %9s %9s %9s %11s %9s %9s\n' referrals db_MiB wal_MiB total_MiB messages bodies cases case_events free_pg rss_MiB
} | tee "$OUT"
sample 0
T0=$(date +%s)
for r in $(seq 1 $((COUNT / EVERY))); do
    if ! "$BENCH" e2e --close --count "$EVERY" --size "$SIZE" --broker "tcp://127.0.0.1:$PORT" \
        --pki "$W/pki" --clinics "$CLINICS" --timeout 3600 >"$W/round-$r.txt" 2>"$W/round-$r.err"; then
        FAILS=$((FAILS + 1))
        echo "round $r FAILED:" >&2
        grep -vE '^progress|connection dropped' "$W/round-$r.err" | tail -5 >&2
        grep -E '^(refused|retries|referrals_|updates_|notices_|other_messages|result)' "$W/round-$r.txt" >&2 || true
    fi
    sample $((r * EVERY))
done
T1=$(date +%s)
# Then idle: what the last rounds left goes within a few pruning runs (and
# the final cases once their timeline period has passed); sampled every 5 s
# until nothing is left to prune or 3 minutes have passed.
[ "$KEEP" = 1 ] || sleep "$TIMELINE"
for i in $(seq 1 36); do
    [ "$KEEP" = 1 ] && break
    sleep 5
    read -r m _ c _ f <<<"$(rows)"
    [ "$m" = 0 ] && [ "$c" = 0 ] && [ "${f:-0}" -lt 64 ] 2>/dev/null && break
    [ "$i" -lt 36 ] && [ $((i % 6)) = 0 ] && sample "idle+$((TIMELINE + i * 5))s"
done
T2=$(date +%s)
sample settled
echo "# settled $((T2 - T1)) s after the last round" | tee -a "$OUT"
echo "# $COUNT referrals in $((T1 - T0)) s; $FAILS failed round(s)" | tee -a "$OUT"
grep -E ' (warn|error) ' "$W/broker.log" | head -5 || true
kill -TERM "$BROKER_PID"
wait "$BROKER_PID" || true
BROKER_PID=""
[ "$FAILS" -eq 0 ]
