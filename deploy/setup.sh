#!/usr/bin/env bash
# Installs what medlink needs from Debian (only what is missing) and builds
# it. Used by demo.sh and test.sh; safe to run again.
#
#   deploy/setup.sh [--build-dir DIR] [--fresh] [--no-build] [--target T]... [-- CMAKE_ARGS...]
#   --target T builds only T (and what it needs), e.g. the three programs.
#   ML_SETUP_EXTRA="pkg ..." installs those Debian packages too.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$ROOT/build"
FRESH=0
BUILD_IT=1
CMAKE_ARGS=()
TARGETS=()
while [ $# -gt 0 ]; do
    case "$1" in
    --build-dir) BUILD="$2"; shift 2 ;;
    --fresh) FRESH=1; shift ;;
    --no-build) BUILD_IT=0; shift ;;
    --target) TARGETS+=(--target "$2"); shift 2 ;;
    --) shift; CMAKE_ARGS+=("$@"); break ;;
    *) echo "setup.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

PKGS=(build-essential cmake pkg-config openssl sqlite3
      libuv1-dev libzmq3-dev libprotobuf-c-dev protobuf-c-compiler libssl-dev
      libcriterion-dev libsqlite3-dev libinih-dev libjansson-dev libhttp-parser-dev)
# Tools some callers need on top (deploy/test.sh asks for clang-format,
# cppcheck and valgrind for its check stages, and clang with its libFuzzer
# runtime, libclang-rt-14-dev, for the fuzz stage): ML_SETUP_EXTRA="a b".
read -ra extra_pkgs <<<"${ML_SETUP_EXTRA:-}"
PKGS+=("${extra_pkgs[@]}")

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

if [ "$BUILD_IT" -eq 1 ]; then
    if [ "$FRESH" -eq 1 ]; then rm -rf "$BUILD"; fi
    cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo "${CMAKE_ARGS[@]}" >/dev/null
    cmake --build "$BUILD" -j "$(nproc)" "${TARGETS[@]}"
fi
