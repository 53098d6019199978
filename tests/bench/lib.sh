# Shared parts of the benchmark scripts (bench.sh, targets.sh): the Release
# build, the work folder, the PKI, the broker's config, starting and
# stopping medlinkd, and reading figures out of /proc and "key value" files.
# Sourced, not run. Everything on 127.0.0.1.
#
# The scripts set, before calling these:
#   CLINICS      township.benchNN.clinic nodes in the config (and passed to loads)
#   READERS      reading.benchNN.imaging nodes
#   IDLE_NODES   township.idleNNNNN.clinic nodes (medlink-bench idle), default 0
#   BROKER_EXTRA extra lines for the config's [broker] section, default none

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
IDLE_NODES=${IDLE_NODES:-0}
BROKER_EXTRA=${BROKER_EXTRA:-}
BROKER_PID=""
FAILS=0

# Only what the bench runs is built: a test file someone is in the middle of
# writing must not stop a benchmark of the broker. Sets BUILD, BENCH, MEDLINKD.
bench_build() {
    BUILD="$ROOT/build-bench"
    "$ROOT/deploy/setup.sh" --no-build >/dev/null
    cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DML_BUILD_TESTS=ON >/dev/null
    cmake --build "$BUILD" -j "$(nproc)" --target medlinkd medlink-bench >/dev/null
    BENCH="$BUILD/tests/bench/medlink-bench"
    MEDLINKD="$BUILD/broker/medlinkd"
}

# PIDs of other processes a script started (load generators), stopped by
# cleanup if the script ends early.
BENCH_PIDS=()
# stop_pid PID: SIGTERM, then SIGKILL if it is still there after 30 s.
stop_pid() {
    local p=$1
    kill -TERM "$p" 2>/dev/null || return 0
    for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}
cleanup() {
    local p
    for p in "${BENCH_PIDS[@]}"; do stop_pid "$p"; done
    [ -n "$BROKER_PID" ] && stop_pid "$BROKER_PID"
    rm -rf "$W"
}

# Makes the work folder W (removed at exit) and the PKI in $W/pki for the
# broker, the hospital, CLINICS clinics and READERS reading centres.
bench_setup() {
    W=$(mktemp -d "${TMPDIR:-/tmp}/mlbench.XXXXXX")
    trap cleanup EXIT
    local nodes=(medlinkd.bench county.bench.hospital) i
    for i in $(seq 1 "$CLINICS"); do nodes+=("$(printf 'township.bench%02d.clinic' "$i")"); done
    for i in $(seq 1 "$READERS"); do nodes+=("$(printf 'reading.bench%02d.imaging' "$i")"); done
    "$ROOT/deploy/pki.sh" --dir "$W/pki" "${nodes[@]}" >/dev/null
}

# Picks PORT (agents) and HTTP_PORT (the ops endpoint, [http]): free ports
# found here rather than the default 9474, which another broker on the
# machine may hold, and not port 0 either, since the scripts must know it
# (the bench's broker logs at warn, so the line naming the port is not
# logged).
bench_ports() {
    PORT=$((20000 + RANDOM % 20000))
    while (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do PORT=$((PORT + 1)); done
    HTTP_PORT=$((PORT + 1))
    while (exec 3<>"/dev/tcp/127.0.0.1/$HTTP_PORT") 2>/dev/null; do HTTP_PORT=$((HTTP_PORT + 1)); done
}

# write_config DATA_DIR [NOTIFY_DELIVERED]
write_config() {
    {
        printf '[broker]\nid = medlinkd.bench\nlisten = tcp://127.0.0.1:%s\ndata_dir = %s\n' "$PORT" "$1"
        printf 'ca = %s/pki/ca.crt\ncert = %s/pki/medlinkd.bench.crt\nkey = %s/pki/medlinkd.bench.key\n' "$W" "$W" "$W"
        # node_rate: the per-node limit (5,000 messages/s by default) would
        # cap 4 clinics at ~22,000/s; the bench measures the broker's capacity.
        printf 'log_level = warn\ndelivery_window = 1024\nnode_rate = 10000000\n'
        # open_cases_per_node: the bench's cases are never closed, and the
        # default (5,000 per clinic) would refuse most of them.
        printf 'open_cases_per_node = 100000000\n'
        printf 'notify_delivered = %s\n' "${2:-yes}"
        [ -n "$BROKER_EXTRA" ] && printf '%s\n' "$BROKER_EXTRA"
        printf '\n[node county.bench.hospital]\nrole = COUNTY_HOSPITAL\n\n'
        for i in $(seq 1 "$CLINICS"); do printf '[node township.bench%02d.clinic]\nrole = TOWNSHIP_CLINIC\n\n' "$i"; done
        for i in $(seq 1 "$READERS"); do
            printf '[node reading.bench%02d.imaging]\nrole = IMAGING_CENTRE\nservices = imaging.ct\n\n' "$i"
        done
        if [ "$IDLE_NODES" -gt 0 ]; then
            awk -v n="$IDLE_NODES" 'BEGIN { for (i = 1; i <= n; i++)
                printf "[node township.idle%05d.clinic]\nrole = TOWNSHIP_CLINIC\n\n", i }'
        fi
        printf '[acl TOWNSHIP_CLINIC]\nREFERRAL = COUNTY_HOSPITAL\nIMAGING_CONSULT = IMAGING_CENTRE\n'
        printf 'IMAGING_CHUNK = IMAGING_CENTRE\n\n'
        printf '[acl COUNTY_HOSPITAL]\nREFERRAL_UPDATE = TOWNSHIP_CLINIC\n\n'
        printf '[acl IMAGING_CENTRE]\nIMAGING_UPDATE = TOWNSHIP_CLINIC\n\n'
        printf '[http]\nlisten = 127.0.0.1:%s\n' "$HTTP_PORT"
    } >"$W/medlinkd.ini"
}
start_broker() {
    "$MEDLINKD" --config "$W/medlinkd.ini" 2>>"$W/broker.log" &
    BROKER_PID=$!
    for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0; sleep 0.1; done
    echo "medlinkd did not start" >&2
    cat "$W/broker.log" >&2
    exit 1
}
stop_broker() {
    stop_pid "$BROKER_PID"
    BROKER_PID=""
}
rss_kib() { awk -v k="$2:" '$1==k {print $2}' "/proc/$1/status"; }
# CPU seconds of each thread of a process ("medlinkd=0.81 ml-store=1.62 ...");
# a fresh broker per run, so this is that run's work.
thread_cpu() {
    local hz t
    hz=$(getconf CLK_TCK)
    for t in /proc/"$1"/task/*; do
        printf '%s=%s ' "$(cat "$t/comm")" "$(sed 's/^.*) //' "$t/stat" | awk -v hz="$hz" '{printf "%.2f", ($12 + $13) / hz}')"
    done
}
# Bytes each thread caused to be written to storage ("ml-store=1234 ...").
thread_wbytes() {
    local t
    for t in /proc/"$1"/task/*; do
        printf '%s=%s ' "$(cat "$t/comm")" "$(awk '$1=="write_bytes:" {print $2}' "$t/io")"
    done
}
proc_wbytes() { awk '$1=="write_bytes:" {print $2}' "/proc/$1/io"; }
# Bytes a process caused to be written to storage, less those it truncated
# or deleted before they reached the disk (a WAL reset, a removed file).
proc_net_wbytes() { awk '$1=="write_bytes:" {w=$2} $1=="cancelled_write_bytes:" {c=$2} END {print w-c}' "/proc/$1/io"; }

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# awk, not grep: a file without the key (a target not run) yields nothing
# rather than a failed pipe that set -e -o pipefail would stop on.
vals() { awk -v k="$1" '$1 == k {print $2}' "$2"; }
med() { vals "$1" "$2" | median; }
runs() { vals "$1" "$2" | awk '{printf "%s ", $1}'; }
sum() { vals "$1" "$2" | awk '{s+=$1} END {print s+0}'; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.1f", 100*a/b; else print "n/a" }'; }
# Runs one medlink-bench workload against the running broker; its output goes
# to $1 (and stdout), a failure is counted rather than stopping the script.
load() {
    local out=$1
    shift
    if ! "$BENCH" "$@" --broker "tcp://127.0.0.1:$PORT" --pki "$W/pki" --clinics "$CLINICS" \
        2>"$out.err" | tee "$out"; then
        FAILS=$((FAILS + 1))
        echo "FAILED: medlink-bench $* (stderr:)" >&2
        grep -v '^progress' "$out.err" | tail -5 >&2
    fi
}
