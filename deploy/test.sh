#!/usr/bin/env bash
# Runs the whole medlink test suite: installs what is missing, builds from
# scratch in a fresh build folder with warnings as errors, and runs every
# criterion test (unit and integration) through ctest.
#
#   deploy/test.sh [ctest args...]     e.g. deploy/test.sh -R unit_
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${ML_TEST_BUILD_DIR:-$ROOT/build-test}"

"$ROOT/deploy/setup.sh" --build-dir "$BUILD" --fresh -- -DML_WERROR=ON
cd "$BUILD"
ctest --output-on-failure --timeout 900 "$@"
