#!/usr/bin/env bash
# The performance targets of the core redesign (issue 11), each measured
# against its baseline in the same run, one table row per target:
#
#   1 real path: 1 clinic -> medlinkd -> 1 hospital (`medlink-bench e2e
#     --clinics 1 --count N --size 1024 --window 1000`: cases on, DELIVERED
#     notices on, fsync before Accepted) vs raw ZeroMQ (`medlink-bench raw`),
#     >= 25%. The ratio to NATS JetStream comes from the peers' side-by-side
#     run (bench-peers), not from here;
#   2 paced latency at 2,000 referrals/s (e2e --rate 2000): p99 <= 1 ms;
#   3 bytes written to storage per 1 KiB referral, <= 2 KiB: medlinkd's
#     /proc/PID/io write_bytes less cancelled_write_bytes over target 1's
#     runs, divided by the referrals;
#   4 64 clinics -> one hospital vs 1 clinic, >= 90%, and the broker's
#     refusals (medlink_messages_refused_total by code, from its /metrics)
#     during both: no resend storm;
#   5 broker memory per idle session, <= 16 KiB (RSS before and with N idle
#     sessions up, / N), and the storm: N sessions connecting at 400/s all
#     come up and stay up (counted from /metrics medlink_sessions);
#   6 imaging MB/s vs the durable write ceiling of the broker's data folder
#     (`medlink-bench disk`, before each imaging run), >= 60%, and bytes
#     written per chunk payload byte, <= 1.2;
#   7 broker RSS with Q referrals queued for an offline hospital (and again
#     after a restart reloads them), <= 128 MiB at Q = 1,000,000.
#
#   tests/bench/targets.sh [--full] [--targets "1 2 3 4 5 6 7"] [--rounds R]
#                          [--count N] [--paced-s S] [--idle N] [--hold S]
#                          [--studies S] [--queued Q]
#
# The default is a quick form (a few minutes on 2 cores): N = 50,000
# referrals per throughput run, 10 s paced, 1,000 idle sessions held 30 s,
# 8 studies, Q = 200,000. --full uses the issue's counts: N = 200,000, 30 s
# paced (3 runs), 10,000 sessions held 30 s, 32 studies, Q = 1,000,000;
# options after --full override its counts.
# Throughput targets run R rounds (default 3) round-robin (raw, 1 clinic,
# 64 clinics; disk, imaging) so that the machine's noise hits each side
# alike; medians are compared. Every broker run has a fresh broker and data
# folder. Everything on 127.0.0.1; every process started here is stopped by
# its PID. Figures go to stdout and tests/bench/results/targets-last.txt.
# Exits non-zero if a run failed (a refusal, a loss, a timeout); a target
# missed is a MISS in the table, not a failure of the script.
set -euo pipefail

# shellcheck source=tests/bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TARGETS="1 2 3 4 5 6 7"
ROUNDS=3
COUNT=50000
RAW_COUNT=1000000
PACE_RATE=2000
PACE_S=10
PACE_ROUNDS=1
MANY=64
IDLE=1000
IDLE_RATE=400
HOLD=30
STUDIES=8
DISK_COUNT=2048
QUEUED=200000
FULL=0
ARGS="$*"
while [ $# -gt 0 ]; do
    case "$1" in
    --full)
        FULL=1
        COUNT=200000 PACE_S=30 PACE_ROUNDS=3 IDLE=10000 HOLD=30 STUDIES=32 DISK_COUNT=4096
        QUEUED=1000000
        shift
        ;;
    --targets) TARGETS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --count) COUNT=$2; shift 2 ;;
    --paced-s) PACE_S=$2; shift 2 ;;
    --idle) IDLE=$2; shift 2 ;;
    --hold) HOLD=$2; shift 2 ;;
    --studies) STUDIES=$2; shift 2 ;;
    --queued) QUEUED=$2; shift 2 ;;
    *) echo "targets.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
want() { case " $TARGETS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

CLINICS=$MANY
READERS=2
T_START=$(date +%s)
bench_build
bench_setup
bench_ports

# The running broker's /metrics page (empty if it does not answer).
metrics_page() { curl -sf --max-time 10 "http://127.0.0.1:$HTTP_PORT/metrics" || true; }
# Sums medlink_messages_refused_total of the running broker by Nack code:
# "STORE_FULL=12 RATE_LIMITED=3" (empty when nothing was refused).
refused_by_code() {
    metrics_page |
        awk -F'[{}]' '/^medlink_messages_refused_total\{/ {
            split($2, l, ","); for (i in l) if (l[i] ~ /^code=/) { c = l[i]; gsub(/code=|"/, "", c) }
            n = split($3, v, " "); t[c] += v[n] }
            END { for (c in t) printf "%s=%d ", c, t[c] }'
}
refused_total() { echo "$1" | tr ' ' '\n' | awk -F= 'NF == 2 {s += $2} END {print s + 0}'; }
# One metric's value from the running broker's /metrics (first matching line).
metric() {
    metrics_page |
        awk -v k="$1" 'index($0, k " ") == 1 {print $2; found = 1; exit} END {if (!found) print 0}'
}
# verdict MEASURED OP GOAL: PASS or MISS (n/a when nothing was measured).
verdict() {
    awk -v m="$1" -v op="$2" -v g="$3" 'BEGIN {
        if (m == "" || m == "n/a") { print "n/a"; exit }
        ok = (op == ">=") ? (m + 0 >= g + 0) : (m + 0 <= g + 0); print ok ? "PASS" : "MISS" }'
}
# settled_wbytes PID: proc_net_wbytes once it has not moved for a second
# (at most 15 s): a checkpoint of the WAL into broker.db that is under way
# when a load ends is the load's cost too.
settled_wbytes() {
    local a b
    b=$(proc_net_wbytes "$1")
    for _ in $(seq 15); do
        a=$b
        sleep 1
        b=$(proc_net_wbytes "$1")
        [ "$a" = "$b" ] && break
    done
    echo "$b"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "n/a" }'; }

ROWS="$W/rows"
: >"$ROWS"
# row NUMBER WHAT MEASURED BASELINE VALUE OP GOAL: one line of the table.
row() { printf '%s\t%s\t%s\t%s\t%s %s %s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$7" "$(verdict "$5" "$6" "$7")" >>"$ROWS"; }

# e2e_run OUT CLINICS COUNT [medlink-bench options...]: one e2e run through a
# fresh broker, with medlinkd's bytes written and refusals appended to OUT.
e2e_run() {
    local out=$1 n=$2 count=$3 w0 w1 ref
    shift 3
    write_config "$W/data-e2e"
    start_broker
    w0=$(proc_net_wbytes "$BROKER_PID")
    CLINICS=$n load "$out" e2e --clinics "$n" --count "$count" --size 1024 --window 1000 "$@"
    w1=$(settled_wbytes "$BROKER_PID")
    ref=$(refused_by_code)
    {
        echo "broker_net_write_bytes $((w1 - w0))"
        echo "broker_write_bytes_per_referral $(awk -v b="$((w1 - w0))" -v n="$count" 'BEGIN {printf "%.0f", b / n}')"
        echo "broker_refused_total $(refused_total "$ref")"
        echo "broker_refused_by_code ${ref:-none}"
        echo "broker_threads_cpu_s $(thread_cpu "$BROKER_PID")"
        echo "broker_threads_write_bytes $(thread_wbytes "$BROKER_PID")"
    } | tee -a "$out"
    stop_broker
    rm -rf "$W/data-e2e"
}

# ------------------------------------------------ 1, 3, 4: throughput rounds
if want 1 || want 3 || want 4; then
    : >"$W/raw.all"
    : >"$W/one.all"
    : >"$W/many.all"
    : >"$W/oneup.all"
    for r in $(seq 1 "$ROUNDS"); do
        echo "== round $r of $ROUNDS: raw ZeroMQ 1 KiB; 1 clinic e2e, $COUNT x 1 KiB"
        want 1 && "$BENCH" raw --size 1024 --count "$RAW_COUNT" | tee -a "$W/raw.all"
        if want 1 || want 3; then
            e2e_run "$W/one-$r.txt" 1 "$COUNT"
            cat "$W/one-$r.txt" >>"$W/one.all"
        fi
        if want 4; then
            # Both sides of target 4 start sending once every channel is
            # up: 64 clinics' handshakes are not time of the run.
            echo "== round $r of $ROUNDS: 1 and $MANY clinics e2e, $COUNT x 1 KiB, --start-when-up"
            e2e_run "$W/oneup-$r.txt" 1 "$COUNT" --start-when-up
            cat "$W/oneup-$r.txt" >>"$W/oneup.all"
            e2e_run "$W/many-$r.txt" "$MANY" "$COUNT" --start-when-up
            cat "$W/many-$r.txt" >>"$W/many.all"
        fi
    done
    ONE=$(med delivered_per_s "$W/one.all")
    if want 1; then
        RAW=$(med raw_frames_per_s "$W/raw.all")
        R1=$(ratio "$ONE" "$RAW")
        row 1 "real path (1 clinic, cases+notices+fsync) / raw ZeroMQ, msg/s" \
            "$ONE (runs: $(runs delivered_per_s "$W/one.all"))" \
            "raw $RAW (runs: $(runs raw_frames_per_s "$W/raw.all"))" "$R1" ">=" 0.25
    fi
    if want 3; then
        B=$(med broker_write_bytes_per_referral "$W/one.all")
        row 3 "bytes written per 1 KiB referral (medlinkd /proc io, 1-clinic runs)" \
            "$B B (runs: $(runs broker_write_bytes_per_referral "$W/one.all"))" \
            "goal 2048 B" "$B" "<=" 2048
    fi
    if want 4; then
        MANYR=$(med delivered_per_s "$W/many.all")
        ONEUP=$(med delivered_per_s "$W/oneup.all")
        row 4 "$MANY clinics / 1 clinic, msg/s (both --start-when-up)" \
            "$MANYR (runs: $(runs delivered_per_s "$W/many.all"))" \
            "1 clinic $ONEUP (runs: $(runs delivered_per_s "$W/oneup.all"))" \
            "$(ratio "$MANYR" "$ONEUP")" ">=" 0.90
        row 4b "refusals (Nacks) per $MANY-clinic run, load generator resends" \
            "refused $(runs broker_refused_total "$W/many.all"); resends $(runs retries "$W/many.all")" \
            "1 clinic: refused $(runs broker_refused_total "$W/oneup.all"); resends $(runs retries "$W/oneup.all")" \
            "$(med broker_refused_total "$W/many.all")" "<=" 0
    fi
fi

# ------------------------------------------------------- 2: paced latency
if want 2; then
    : >"$W/paced.all"
    for r in $(seq 1 "$PACE_ROUNDS"); do
        echo "== paced: 1 clinic at $PACE_RATE referrals/s for $PACE_S s"
        e2e_run "$W/paced-$r.txt" 1 $((PACE_RATE * PACE_S)) --rate "$PACE_RATE"
        cat "$W/paced-$r.txt" >>"$W/paced.all"
    done
    P99=$(med latency_p99_ms "$W/paced.all")
    row 2 "paced $PACE_RATE msg/s, clinic send -> hospital receive p50/p99 ms" \
        "p50 $(med latency_p50_ms "$W/paced.all") / p99 $P99 (p99 runs: $(runs latency_p99_ms "$W/paced.all"); rate $(runs delivered_per_s "$W/paced.all")/s)" \
        "goal p99 1 ms" "$P99" "<=" 1.0
    if want 3; then
        # The same count at a light load: small group commits write whole
        # pages for few referrals.
        BP=$(med broker_write_bytes_per_referral "$W/paced.all")
        row 3p "bytes written per 1 KiB referral at $PACE_RATE/s (paced runs)" \
            "$BP B (runs: $(runs broker_write_bytes_per_referral "$W/paced.all"))" \
            "goal 2048 B" "$BP" "<=" 2048
    fi
fi

# ---------------------------------------------------- 5: idle sessions, storm
if want 5; then
    echo "== idle: $IDLE sessions connecting at $IDLE_RATE/s, held $HOLD s once all are up"
    "$BENCH" certs --pki "$W/pki" --count "$IDLE" | tee "$W/certs.txt"
    # handshakes_per_s limits new connections per source address: every
    # session here comes from 127.0.0.1, unlike real clinics.
    BROKER_EXTRA=$(printf 'max_sessions = %d\nhandshakes_per_s = 100000' $((IDLE + 256)))
    IDLE_NODES=$IDLE write_config "$W/data-idle"
    BROKER_EXTRA=""
    start_broker
    metric 'medlink_sessions{state="ready"}' >/dev/null
    sleep 1
    RSS0=$(rss_kib "$BROKER_PID" VmRSS)
    # Several load generator processes, each at most 2,500 sessions: a
    # channel holds four file descriptors (its TCP socket and the mailboxes
    # of its three ZeroMQ sockets), and a process may have 20,000.
    NP=$(((IDLE + 2499) / 2500))
    PER=$(((IDLE + NP - 1) / NP))
    RATE_P=$(awk -v r="$IDLE_RATE" -v n="$NP" 'BEGIN {printf "%.3f", r / n}')
    BENCH_PIDS=()
    first=1
    for p in $(seq 1 "$NP"); do
        c=$PER
        [ $((first + c - 1)) -gt "$IDLE" ] && c=$((IDLE - first + 1))
        "$BENCH" idle --broker "tcp://127.0.0.1:$PORT" --pki "$W/pki" --first "$first" --count "$c" \
            --rate "$RATE_P" --hold "$HOLD" >"$W/idle-$p.txt" 2>"$W/idle-$p.err" &
        BENCH_PIDS+=($!)
        first=$((first + c))
    done
    T0=$(date +%s.%N)
    UP_MAX=0 T_UP="" RSS1="" MIN_HOLD=""
    # Sample the broker's ready sessions every second until the generators
    # are done: the most that were up, the moment all were, and the fewest
    # up during the hold that follows.
    while :; do
        alive=0
        for p in "${BENCH_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" -eq 1 ] || break
        UP=$(metric 'medlink_sessions{state="ready"}')
        [ "$UP" -gt "$UP_MAX" ] && UP_MAX=$UP
        if [ -z "$T_UP" ] && [ "$UP" -ge "$IDLE" ]; then
            T_UP=$(date +%s.%N)
            RSS1=$(rss_kib "$BROKER_PID" VmRSS)
        fi
        if [ -n "$T_UP" ] && awk -v t="$T_UP" -v h="$HOLD" -v now="$(date +%s.%N)" 'BEGIN {exit !(now < t + h - 1)}'; then
            { [ -z "$MIN_HOLD" ] || [ "$UP" -lt "$MIN_HOLD" ]; } && MIN_HOLD=$UP
        fi
        sleep 1
    done
    for p in "${BENCH_PIDS[@]}"; do wait "$p" || FAILS=$((FAILS + 1)); done
    BENCH_PIDS=()
    cat "$W"/idle-*.txt | tee "$W/idle.all"
    # Without all up, the memory is taken at the most that were.
    [ -z "$RSS1" ] && RSS1=$(rss_kib "$BROKER_PID" VmHWM)
    HWM=$(rss_kib "$BROKER_PID" VmHWM)
    stop_broker
    rm -rf "$W/data-idle"
    PER_KIB=$(awk -v a="$RSS0" -v b="$RSS1" -v n="$UP_MAX" 'BEGIN { if (n > 0) printf "%.1f", (b - a) / n; else print "n/a" }')
    {
        echo "idle_broker_rss_before_kib $RSS0"
        echo "idle_broker_rss_all_up_kib $RSS1"
        echo "idle_broker_hwm_kib $HWM"
        echo "idle_ready_max $UP_MAX"
        echo "idle_ready_min_during_hold ${MIN_HOLD:-n/a}"
        [ -n "$T_UP" ] && echo "idle_all_up_after_s $(awk -v a="$T0" -v b="$T_UP" 'BEGIN {printf "%.1f", b - a}')"
        echo "idle_kib_per_session $PER_KIB"
    } | tee -a "$W/idle.all"
    row 5 "broker RSS per idle session, KiB ($IDLE sessions)" \
        "$PER_KIB ($RSS0 -> $RSS1 KiB, peak $HWM KiB)" "goal 16 KiB" "$PER_KIB" "<=" 16
    STAYED=$(awk -v m="${MIN_HOLD:-0}" -v n="$IDLE" -v d="$(sum idle_downs_after_up "$W/idle.all")" 'BEGIN {print (m >= n && d == 0) ? n : m}')
    row 5b "storm: $IDLE sessions at $IDLE_RATE/s, all up and staying up $HOLD s" \
        "max up $UP_MAX, fewest up in the hold ${MIN_HOLD:-n/a}, downs after up $(sum idle_downs_after_up "$W/idle.all")" \
        "$IDLE sessions" "$STAYED" ">=" "$IDLE"
fi

# ------------------------------------------------------------- 6: imaging
if want 6; then
    : >"$W/disk.all"
    : >"$W/img.all"
    for r in $(seq 1 "$ROUNDS"); do
        echo "== round $r of $ROUNDS: disk durable write ceiling; imaging, $STUDIES studies"
        mkdir -p "$W/data-img"
        "$BENCH" disk --dir "$W/data-img" --size 262144 --count "$DISK_COUNT" --sync-bytes 8388608 |
            tee -a "$W/disk.all"
        write_config "$W/data-img"
        start_broker
        w0=$(proc_net_wbytes "$BROKER_PID")
        CLINICS=4 load "$W/img-$r.txt" imaging --clinics 4 --readers "$READERS" --studies "$STUDIES"
        w1=$(settled_wbytes "$BROKER_PID")
        cat "$W/img-$r.txt" >>"$W/img.all"
        B=$(vals imaging_chunk_bytes "$W/img-$r.txt" | tail -1)
        echo "broker_bytes_per_payload_byte $(awk -v w="$((w1 - w0))" -v b="${B:-0}" 'BEGIN { if (b > 0) printf "%.3f", w / b; else print "n/a" }')" |
            tee -a "$W/img.all"
        stop_broker
        rm -rf "$W/data-img"
    done
    IMG=$(med imaging_mb_per_s "$W/img.all")
    DISK=$(med disk_mb_per_s "$W/disk.all")
    row 6 "imaging MB/s / disk durable-write ceiling MB/s" \
        "$IMG (runs: $(runs imaging_mb_per_s "$W/img.all"))" "disk $DISK (runs: $(runs disk_mb_per_s "$W/disk.all"))" \
        "$(ratio "$IMG" "$DISK")" ">=" 0.60
    BPB=$(med broker_bytes_per_payload_byte "$W/img.all")
    row 6b "imaging bytes written per chunk payload byte (medlinkd /proc io)" \
        "$BPB (runs: $(runs broker_bytes_per_payload_byte "$W/img.all"))" "goal 1.2" "$BPB" "<=" 1.2
fi

# ------------------------------------------------------ 7: offline backlog
if want 7; then
    echo "== backlog: $QUEUED referrals queued for an offline hospital, then a restart"
    write_config "$W/data-off"
    start_broker
    CLINICS=4 load "$W/off.txt" e2e --clinics 4 --count "$QUEUED" --size 1024 --offline --timeout 900
    Q_RSS=$(rss_kib "$BROKER_PID" VmRSS)
    Q_HWM=$(rss_kib "$BROKER_PID" VmHWM)
    stop_broker
    start_broker
    # The restart has reloaded the queue when /metrics shows all of it.
    Q_NAME='medlink_node_queue_messages{node="county.bench.hospital"}'
    for _ in $(seq 600); do
        [ "$(metric "$Q_NAME")" -ge "$QUEUED" ] && break
        sleep 0.5
    done
    Q_RELOADED=$(metric "$Q_NAME")
    R_RSS=$(rss_kib "$BROKER_PID" VmRSS)
    stop_broker
    rm -rf "$W/data-off"
    Q_MIB=$(awk -v a="$Q_RSS" -v b="$R_RSS" 'BEGIN {m = a > b ? a : b; printf "%.0f", m / 1024}')
    row 7 "broker RSS, $QUEUED queued for an offline node (max of live, after restart), MiB" \
        "live $((Q_RSS / 1024)) (peak $((Q_HWM / 1024))), after restart $((R_RSS / 1024)) with $Q_RELOADED queued" \
        "goal 128 MiB at 1,000,000" "$Q_MIB" "<=" 128
fi

mkdir -p "$ROOT/tests/bench/results"
{
    echo "medlink issue-11 targets $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nproc) cores, commit" \
        "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown), $(($(date +%s) - T_START)) s"
    echo "command: tests/bench/targets.sh $ARGS"
    echo "form: $([ "$FULL" -eq 1 ] && echo full || echo quick); rounds $ROUNDS; e2e $COUNT referrals/run;" \
        "paced $PACE_RATE/s x $PACE_S s x $PACE_ROUNDS; idle $IDLE at $IDLE_RATE/s held $HOLD s;" \
        "imaging $STUDIES studies; backlog $QUEUED"
    echo
    printf '| # | target | measured | baseline (same run) | value vs goal | verdict |\n'
    printf '|---|---|---|---|---|---|\n'
    sort -V -s -k1,1 "$ROWS" |
        awk -F'\t' '{printf "| %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6}'
    echo
    if want 1; then
        echo "Target 1's other half (>= 2x NATS JetStream) is measured by the peers' side-by-side run," \
            "not here: ../shared/bench-peers/side-by-side.sh with SYSTEMS=\"nats mlbench raw\"" \
            "(it runs the same e2e command line)."
    fi
    echo "failed runs: $FAILS"
} | tee "$ROOT/tests/bench/results/targets-last.txt"
[ "$FAILS" -eq 0 ]
