#!/usr/bin/env bash
# Runs the whole medlink test suite the way CI does (.ci/run calls exactly
# this): installs what is missing, then runs these stages in order and stops
# at the first one that fails, with a banner and the duration of each:
#
#   format    clang-format check of the project's own C (target format-check)
#   lint      cppcheck on the project's own C (target cppcheck; its
#             configuration and suppressions are in cmake/cppcheck/)
#   plain     fresh build in build-test/, warnings are errors; the whole
#             suite (unit + integration + fuzz replays) through ctest
#   package   tests/deploy/test_package.sh: deploy/package.sh builds the
#             Debian packages into dist/ (lintian, no errors), then they are
#             installed with dpkg -i, checked and purged (needs root)
#   asan      fresh ASan+UBSan build in build-asan/; the whole suite, where
#             any sanitizer report fails: in a test it aborts the test, in a
#             daemon the integration harness finds it in the daemon's log
#   valgrind  the unit tests of build-test/ under valgrind memcheck; any
#             invalid access, use of uninitialised memory or definite or
#             indirect leak, in any process, fails
#   fuzz      deploy/fuzz.sh 20 (its libFuzzer targets 20 s each, in
#             build-fuzz/), when that script exists
#   soak      tests/fault/soak.sh --quick: fault injection against the real
#             daemons (SIGKILLed broker and agents, cut links, a full disk, a
#             crowd of 1,000 clients), checked from what they left on disk
#             (docs/reliability.md); about 5 minutes
#
# Usage:
#   deploy/test.sh                      every stage (what CI runs)
#   deploy/test.sh CTEST_ARGS...        only the plain stage, with these ctest
#                                       arguments, e.g. deploy/test.sh -R unit_
#   deploy/test.sh --sanitize [CTEST_ARGS...]
#                                       only the asan stage (with those args)
#   deploy/test.sh --all CTEST_ARGS...  every stage, the ctest arguments given
#                                       to the plain and asan stages
#
# Environment, for local use (CI sets none of them):
#   ML_CI_SKIP="valgrind fuzz"   skip these stages (names as above)
#   ML_CI_ONLY="format lint"     run only these stages
#   ML_TEST_BUILD_DIR=DIR        build folder of the plain stage (of the asan
#                                stage with --sanitize)
#   ML_TEST_ASAN_BUILD_DIR=DIR   build folder of the asan stage
#   ML_CI_JOBS=N                 parallel valgrind runs (default: nproc)
#   ASAN_OPTIONS, UBSAN_OPTIONS  appended to the stage's own (later wins)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALL_STAGES=(format lint plain package asan valgrind fuzz soak)
STAGES=("${ALL_STAGES[@]}")
CTEST_ARGS=()
BUILD="${ML_TEST_BUILD_DIR:-$ROOT/build-test}"
ASAN_BUILD="${ML_TEST_ASAN_BUILD_DIR:-$ROOT/build-asan}"

case "${1:-}" in
--sanitize)
    shift
    STAGES=(asan)
    ASAN_BUILD="${ML_TEST_BUILD_DIR:-$ASAN_BUILD}"
    CTEST_ARGS=("$@")
    ;;
--all)
    shift
    CTEST_ARGS=("$@")
    ;;
-h | --help)
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit 0
    ;;
"") ;;
*)
    STAGES=(plain)
    CTEST_ARGS=("$@")
    ;;
esac

# ML_CI_ONLY / ML_CI_SKIP narrow the list; a misspelt name is an error
# rather than a stage silently run or skipped.
for name in ${ML_CI_ONLY:-} ${ML_CI_SKIP:-}; do
    case " ${ALL_STAGES[*]} " in
    *" $name "*) ;;
    *) echo "test.sh: unknown stage '$name' (stages: ${ALL_STAGES[*]})" >&2; exit 2 ;;
    esac
done
selected=()
for s in "${STAGES[@]}"; do
    if [ -n "${ML_CI_ONLY:-}" ] && [[ " $ML_CI_ONLY " != *" $s "* ]]; then continue; fi
    if [[ " ${ML_CI_SKIP:-} " == *" $s "* ]]; then continue; fi
    selected+=("$s")
done
STAGES=("${selected[@]}")
wants() { [[ " ${STAGES[*]} " == *" $1 "* ]]; }

NPROC="$(nproc)"
CTEST=(ctest --output-on-failure --timeout 900)

# --- the stages ------------------------------------------------------------

# The plain build folder is configured once per run of this script, fresh,
# by whichever of format, lint or plain comes first (format-check and
# cppcheck are its targets). Stages run in subshells, so a marker file in
# the folder, not a variable, says it is done.
RUN_ID="$$.$(date +%s)"
configure_plain() {
    if [ "$(cat "$BUILD/.test-sh-run" 2>/dev/null)" != "$RUN_ID" ]; then
        rm -rf "$BUILD"
        cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DML_WERROR=ON >/dev/null
        echo "$RUN_ID" >"$BUILD/.test-sh-run"
    fi
}

stage_format() {
    configure_plain
    cmake --build "$BUILD" --target format-check
}

stage_lint() {
    configure_plain
    cmake --build "$BUILD" --target cppcheck
}

stage_plain() {
    configure_plain
    cmake --build "$BUILD" -j "$NPROC"
    cd "$BUILD"
    "${CTEST[@]}" "${CTEST_ARGS[@]}"
}

# Sanitizer settings: halt and abort on the first report. abort_on_error
# matters for leaks: LeakSanitizer runs when a criterion worker exits, after
# its test has passed; only a crash (SIGABRT) there makes criterion fail the
# test, a plain non-zero exit status would be ignored. The daemons that
# integration tests start inherit these, and the harness fails a test on
# any sanitizer report in their logs.
stage_asan() {
    export ASAN_OPTIONS="halt_on_error=1:abort_on_error=1:detect_leaks=1:print_stacktrace=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
    export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
    rm -rf "$ASAN_BUILD"
    cmake -S "$ROOT" -B "$ASAN_BUILD" -DCMAKE_BUILD_TYPE=Debug -DML_WERROR=ON -DML_SANITIZE=ON \
        >/dev/null
    cmake --build "$ASAN_BUILD" -j "$NPROC"
    cd "$ASAN_BUILD"
    "${CTEST[@]}" "${CTEST_ARGS[@]}"
}

# Every unit test binary of the plain build under memcheck. Criterion runs
# each test in a child process (it re-executes the binary), so valgrind
# follows children (not the shells and openssl that deploy/pki.sh runs: they
# are not ours) and writes one log per process. A child's valgrind exit
# status does not reach ctest or criterion (a worker's exit status after its
# test passed is ignored), so the logs decide: any log with an error, leaks
# of kind definite or indirect included, fails the stage.
VALGRIND=(valgrind --tool=memcheck --error-exitcode=1 --leak-check=full
          --errors-for-leak-kinds=definite,indirect --show-leak-kinds=definite,indirect
          --track-origins=yes --num-callers=30
          --trace-children=yes --trace-children-skip='/bin/*,/usr/bin/*,/sbin/*,/usr/sbin/*'
          --suppressions="$ROOT/cmake/valgrind.supp")

# Runs one test program under valgrind; prints one line, and on failure
# writes what went wrong to LOG_DIR/report.txt.
valgrind_one() { # TEST_BINARY LOG_DIR
    local bin="$1" dir="$2" start=$SECONDS rc bad
    mkdir -p "$dir"
    set +e
    ML_SOURCE_DIR="$ROOT" ML_BUILD_DIR="$BUILD" \
        "${VALGRIND[@]}" --log-file="$dir/vg.%p.log" "$bin" --jobs 1 >"$dir/output.txt" 2>&1
    rc=$?
    set -e
    bad="$(grep -lE 'ERROR SUMMARY: [1-9]|^==[0-9]+== (Invalid|Conditional|Use of uninit|Syscall param|Mismatched|Source and destination|Argument .* of function)' "$dir"/vg.*.log || true)"
    if [ "$rc" -eq 0 ] && [ -z "$bad" ]; then
        echo "valgrind: $(basename "$bin") clean ($((SECONDS - start)) s)"
        return 0
    fi
    echo "valgrind: $(basename "$bin") FAILED ($((SECONDS - start)) s)"
    {
        echo "---- $(basename "$bin"): exit status $rc; the end of its output:"
        tail -n 30 "$dir/output.txt" | sed 's/^/    /'
        for log in $bad; do
            echo "---- valgrind's report, $log:"
            grep -vE '^==[0-9]+== *$' "$log" | sed 's/^/    /'
        done
    } >"$dir/report.txt"
    return 1
}

stage_valgrind() {
    # Up to date already after the plain stage; when that stage was
    # skipped, an existing build folder is brought up to date, or a fresh
    # one is made.
    if [ ! -f "$BUILD/CMakeCache.txt" ]; then configure_plain; fi
    cmake --build "$BUILD" -j "$NPROC"
    local logs="$BUILD/valgrind" jobs="${ML_CI_JOBS:-$NPROC}" tests=() t
    rm -rf "$logs"
    for t in "$BUILD"/tests/unit_test_*; do
        if [ -x "$t" ]; then tests+=("$t"); fi
    done
    if [ ${#tests[@]} -eq 0 ]; then
        echo "valgrind: no unit tests in $BUILD/tests" >&2
        return 1
    fi
    echo "valgrind: ${#tests[@]} unit test programs, $jobs at a time; logs in $logs/"
    local running=0 failed=0
    for t in "${tests[@]}"; do
        if [ "$running" -ge "$jobs" ]; then
            wait -n || failed=1
            running=$((running - 1))
        fi
        valgrind_one "$t" "$logs/$(basename "$t")" &
        running=$((running + 1))
    done
    while [ "$running" -gt 0 ]; do
        wait -n || failed=1
        running=$((running - 1))
    done
    if [ "$failed" -ne 0 ]; then
        cat "$logs"/*/report.txt
        return 1
    fi
}

stage_package() {
    "$ROOT/tests/deploy/test_package.sh"
}

stage_fuzz() {
    if [ ! -x "$ROOT/deploy/fuzz.sh" ]; then
        echo "fuzz: deploy/fuzz.sh is not there yet; nothing to run"
        return 0
    fi
    # 20 s per target, as many targets at a time as there are cores.
    "$ROOT/deploy/fuzz.sh" --jobs "$NPROC" 20
}

stage_soak() {
    if [ ! -x "$ROOT/tests/fault/soak.sh" ]; then
        echo "soak: tests/fault/soak.sh is not there yet; nothing to run"
        return 0
    fi
    # The plain stage's tree has the programs the soak runs (soak.sh brings
    # them up to date); without it soak.sh makes its own build-fault/.
    local build=()
    if [ -f "$BUILD/CMakeCache.txt" ]; then build=(--build "$BUILD"); fi
    "$ROOT/tests/fault/soak.sh" --quick "${build[@]}"
}

describe() {
    case "$1" in
    format) echo "clang-format check (format-check)" ;;
    lint) echo "cppcheck on the project's own code" ;;
    plain) echo "fresh build in ${BUILD#"$ROOT"/}/ (warnings are errors) + suite via ctest" ;;
    asan) echo "fresh ASan+UBSan build in ${ASAN_BUILD#"$ROOT"/}/ + suite via ctest" ;;
    package) echo "Debian packages: build, lintian, dpkg -i, checks, purge" ;;
    valgrind) echo "unit tests under valgrind memcheck" ;;
    fuzz) echo "deploy/fuzz.sh 20 (libFuzzer targets, 20 s each)" ;;
    soak) echo "tests/fault/soak.sh --quick" ;;
    esac
}

# --- running them ------------------------------------------------------------

if [ ${#STAGES[@]} -eq 0 ]; then
    echo "test.sh: every stage is skipped (ML_CI_ONLY='${ML_CI_ONLY:-}', ML_CI_SKIP='${ML_CI_SKIP:-}')" >&2
    exit 2
fi

# Tools the chosen stages need, on top of what building needs.
extra=()
if wants format; then extra+=(clang-format); fi
if wants lint; then extra+=(cppcheck); fi
if wants valgrind; then extra+=(valgrind); fi
# it_test_web loads the status page in headless Chromium.
if wants plain || wants asan; then extra+=(chromium); fi
if wants plain; then extra+=(prometheus); fi # promtool: tests/prometheus/rules.sh
if wants fuzz && [ -x "$ROOT/deploy/fuzz.sh" ]; then extra+=(clang libclang-rt-14-dev); fi
ML_SETUP_EXTRA="${extra[*]}" "$ROOT/deploy/setup.sh" --no-build

fmt_time() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
SUMMARY=()
TOTAL_START=$SECONDS
n=0
for s in "${STAGES[@]}"; do
    n=$((n + 1))
    echo
    echo "==== [$n/${#STAGES[@]}] $s: $(describe "$s") ===="
    start=$SECONDS
    # A subshell per stage: set -e holds inside it (it would not inside an
    # if or ||), cd and exports stay there.
    set +e
    (
        set -euo pipefail
        "stage_$s"
    )
    rc=$?
    set -e
    took=$((SECONDS - start))
    if [ "$rc" -ne 0 ]; then
        echo
        echo "==== FAILED: $s after $(fmt_time "$took") (exit $rc) ===="
        for line in "${SUMMARY[@]}"; do echo "     $line"; done
        exit 1
    fi
    SUMMARY+=("$(printf '%-9s passed in %s' "$s" "$(fmt_time "$took")")")
    echo "==== $s passed in $(fmt_time "$took") ===="
done
echo
echo "==== all stages passed in $(fmt_time $((SECONDS - TOTAL_START))) ===="
for line in "${SUMMARY[@]}"; do echo "     $line"; done
