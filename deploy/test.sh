#!/usr/bin/env bash
# Runs the whole medlink test suite: installs what is missing, builds from
# scratch in a fresh build folder with warnings as errors, and runs every
# criterion test (unit and integration) through ctest.
#
#   deploy/test.sh [--sanitize] [ctest args...]
#       --sanitize   build with AddressSanitizer + UndefinedBehaviorSanitizer
#                    (in build-asan/) and run the same suite under them
#   e.g. deploy/test.sh -R unit_
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${ML_TEST_BUILD_DIR:-$ROOT/build-test}"
EXTRA=(-DML_WERROR=ON)
if [ "${1:-}" = "--sanitize" ]; then
    shift
    BUILD="${ML_TEST_BUILD_DIR:-$ROOT/build-asan}"
    EXTRA+=(-DML_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug)
fi

"$ROOT/deploy/setup.sh" --build-dir "$BUILD" --fresh -- "${EXTRA[@]}"
cd "$BUILD"
ctest --output-on-failure --timeout 900 "$@"
