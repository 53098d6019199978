#!/usr/bin/env bash
# Shows that tests/tools/layers.sh fails on what it is there to catch: a
# copy of the sources where wire.c (layer 10) includes session.h (layer 70),
# and one where LAYERS puts wire above session (the calls nm finds then go
# up). Run by ctest as `layers_selftest`: layers_selftest.sh <src> <build>.
set -u
src=${1:?source dir}
bld=${2:?build dir}
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/broker"
cp "$src"/broker/*.c "$src"/broker/*.h "$src"/broker/LAYERS "$tmp/broker/"

if ! bash "$here/layers.sh" "$tmp" "$bld" > "$tmp/ok.log" 2>&1; then
    echo "selftest: the unchanged copy should pass:"; cat "$tmp/ok.log"; exit 1
fi
echo '#include "session.h"' >> "$tmp/broker/wire.c"
if bash "$here/layers.sh" "$tmp" "$bld" > "$tmp/inc.log" 2>&1 ||
    ! grep -q 'FAIL: wire (layer 10) -> session (layer 70): wire.c includes session.h' "$tmp/inc.log"; then
    echo "selftest: an upward include was not caught:"; cat "$tmp/inc.log"; exit 1
fi
cp "$src/broker/wire.c" "$tmp/broker/wire.c"
sed -i 's/^module wire        10 /module wire        75 /' "$tmp/broker/LAYERS"
if bash "$here/layers.sh" "$tmp" "$bld" > "$tmp/call.log" 2>&1 ||
    ! grep -q 'FAIL: session (layer 70) -> wire (layer 75): session.c calls ml_wire_' "$tmp/call.log"; then
    echo "selftest: an upward call was not caught:"; cat "$tmp/call.log"; exit 1
fi
echo "selftest: layers.sh catches an upward include and an upward call"
