#!/usr/bin/env bash
# Runs medlink's libFuzzer targets (tests/fuzz/, docs/security.md "Fuzzing"):
# installs clang and its libFuzzer runtime when missing, builds the targets
# with AddressSanitizer and UndefinedBehaviorSanitizer in build-fuzz/, runs
# each for SECONDS on a working copy of its seed corpus, copies every crash,
# leak, timeout or out-of-memory input into tests/fuzz/regressions/<target>/
# as crash-<sha1> (the replay ctests then fail until the bug is fixed), and
# prints one line per target. Exits non-zero when any target found anything.
#
#   deploy/fuzz.sh [--jobs N] [--targets a,b,...] [SECONDS]
#       SECONDS      per target (default 60); CI runs `deploy/fuzz.sh 20`
#       --jobs N     targets run N at a time (default 1)
#       --targets    a subset of: frame envelope json config dicom
#                    reassembly session
#
# Environment:
#   ML_FUZZ_WORK=DIR     working corpora, logs and artifacts (default
#                        build-fuzz/fuzz-work); a corpus kept there grows from
#                        run to run, the repository's is never written to
#   ML_FUZZ_KNOWN=a,b    step over known, recorded bugs (see docs/security.md)
#                        so a long run can look past them; unset in CI
#   ML_FUZZ_LOG_LEVEL    medlink's log level inside the targets (default warn:
#                        the refusal paths format their sentences; the
#                        targets' stderr is discarded, libFuzzer's is kept)
#   ML_FUZZ_ARGS         more libFuzzer flags, e.g. "-use_value_profile=1"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$ROOT/build-fuzz"
WORK="${ML_FUZZ_WORK:-$BUILD/fuzz-work}"
ALL_TARGETS=(frame envelope json config dicom reassembly session)
TARGETS=("${ALL_TARGETS[@]}")
SECONDS_PER=60
JOBS=1

while [ $# -gt 0 ]; do
    case "$1" in
    --jobs) JOBS="$2"; shift 2 ;;
    --targets) IFS=', ' read -ra TARGETS <<<"$2"; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    [0-9]*) SECONDS_PER="$1"; shift ;;
    *) echo "fuzz.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
for t in "${TARGETS[@]}"; do
    case " ${ALL_TARGETS[*]} " in
    *" $t "*) ;;
    *) echo "fuzz.sh: unknown target '$t' (targets: ${ALL_TARGETS[*]})" >&2; exit 2 ;;
    esac
done
[[ "$SECONDS_PER" =~ ^[0-9]+$ ]] && [ "$SECONDS_PER" -gt 0 ] || {
    echo "fuzz.sh: SECONDS must be a positive whole number" >&2
    exit 2
}
[[ "$JOBS" =~ ^[0-9]+$ ]] && [ "$JOBS" -gt 0 ] || { echo "fuzz.sh: --jobs needs N >= 1" >&2; exit 2; }

# --- what the build needs ---------------------------------------------------

# The project's own dependencies, and clang with its fuzzer runtime (nothing
# built: that happens below).
ML_SETUP_EXTRA="${ML_SETUP_EXTRA:+$ML_SETUP_EXTRA }clang libclang-rt-14-dev" \
    "$ROOT/deploy/setup.sh" --no-build

# -O1 with asserts on (RelWithDebInfo would define NDEBUG): an internal
# invariant that breaks is a finding too.
CC=clang cmake -S "$ROOT" -B "$BUILD" -DML_FUZZ=ON -DML_BUILD_BENCH=OFF \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g" >/dev/null
targets=()
for t in "${TARGETS[@]}"; do targets+=(--target "fuzz_$t"); done
cmake --build "$BUILD" -j "$(nproc)" "${targets[@]}"

# --- one target ---------------------------------------------------------------

# Runs target $1 for SECONDS_PER seconds in $WORK/$1 and writes its summary
# line to $WORK/$1/summary.
run_target() {
    local t="$1" dir="$WORK/$1"
    local corpus="$dir/corpus" art="$dir/artifacts" log="$dir/fuzz.log"
    mkdir -p "$corpus"
    rm -rf "$art"
    mkdir -p "$art"
    # The seeds join whatever earlier runs found; the repository's corpus is
    # only read.
    cp -f "$ROOT/tests/fuzz/corpus/$t/"* "$corpus/" 2>/dev/null || true
    local rc=0
    # libFuzzer stops itself after -max_total_time; the outer timeout only
    # guards against a run that cannot stop (a hang outside an input).
    ML_SOURCE_DIR="$ROOT" ML_FUZZ_LOG_LEVEL="${ML_FUZZ_LOG_LEVEL:-warn}" \
        UBSAN_OPTIONS="print_stacktrace=1:${UBSAN_OPTIONS:-}" \
        timeout --kill-after=30 $((SECONDS_PER + 300)) \
        "$BUILD/tests/fuzz/fuzz_$t" -max_total_time="$SECONDS_PER" -rss_limit_mb=2048 \
        -timeout=30 -close_fd_mask=2 -print_final_stats=1 -artifact_prefix="$art/" \
        ${ML_FUZZ_ARGS:-} "$corpus" >"$log" 2>&1 || rc=$?

    local execs rate cov found=0 kinds=""
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -oE '^#[0-9]+.*cov: [0-9]+' "$log" | tail -1 | sed 's/.*cov: //')
    if [ -z "$execs" ]; then
        # Stopped by a finding: libFuzzer prints no final stats then.
        execs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
        rate=$(grep -oE 'exec/s: [0-9]+' "$log" | tail -1 | sed 's/exec\/s: //')
    fi
    local reg="$ROOT/tests/fuzz/regressions/$t"
    for f in "$art"/crash-* "$art"/leak-* "$art"/timeout-* "$art"/oom-*; do
        [ -e "$f" ] || continue
        mkdir -p "$reg"
        local sha
        sha=$(sha1sum "$f" | cut -d' ' -f1)
        cp "$f" "$reg/crash-$sha"
        found=$((found + 1))
        kinds="$kinds $(basename "$f" | cut -d- -f1)"
    done
    # A non-zero exit without an artifact (an outer timeout, a crash at
    # start-up) is a finding too; the log says what.
    if [ "$found" -eq 0 ] && [ "$rc" -ne 0 ]; then
        found=1
        kinds=" exit-$rc"
    fi
    printf '%-11s %12s execs %8s exec/s  cov %6s  findings %d%s  (log: %s)\n' "$t" \
        "${execs:-?}" "${rate:-?}" "${cov:-?}" "$found" "${kinds:+ [${kinds# }]}" \
        "${log#"$ROOT"/}" >"$dir/summary"
    echo "$found" >"$dir/found"
}

# --- all of them --------------------------------------------------------------

mkdir -p "$WORK"
echo "fuzz.sh: ${#TARGETS[@]} target(s), ${SECONDS_PER}s each, $JOBS at a time; work in ${WORK#"$ROOT"/}"
running=0
for t in "${TARGETS[@]}"; do
    rm -f "$WORK/$t/summary" "$WORK/$t/found"
    run_target "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait

total=0
echo
for t in "${TARGETS[@]}"; do
    if [ -f "$WORK/$t/summary" ]; then
        cat "$WORK/$t/summary"
        total=$((total + $(cat "$WORK/$t/found")))
    else
        echo "$t: no summary (the run did not finish)"
        total=$((total + 1))
    fi
done
if [ "$total" -gt 0 ]; then
    echo
    echo "fuzz.sh: $total finding(s); inputs copied to tests/fuzz/regressions/<target>/crash-<sha1>."
    echo "Reproduce one with build-fuzz/tests/fuzz/fuzz_<target> FILE (or the replayer of any"
    echo "build: fuzz_replay_<target> FILE), fix the bug, keep the file: it is the regression test."
    exit 1
fi
echo
echo "fuzz.sh: no findings"
