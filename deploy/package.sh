#!/usr/bin/env bash
# Builds the Debian packages of medlink into dist/:
#   medlink-common   the medlink system user (sysusers.d) and folders (tmpfiles.d)
#   medlink-broker   medlinkd, medlinkd.service, /etc/medlink/medlinkd.ini
#   medlink-agent    medlink-agent, medlink-agent@.service, agent.ini.example
#   medlink-tools    medlinkctl, medlink-pki, medlink-crl.service/.timer, ctl.ini
# (and their -dbgsym packages), then runs lintian on them.
#
# It uses debhelper (compat 13, cmake build system; docs/operations.md says
# why) on a staging copy of the source: the files the repository tracks (or,
# outside git, the tree minus build folders), with deploy/debian/ as
# debian/, so the repository itself never gets a debian/ folder or build
# products. The version is the CMake project version. The programs are built
# without tests, benchmarks and fuzz targets. Build tools that are missing
# (debhelper, dpkg-dev, fakeroot, lintian and the build dependencies of
# deploy/debian/control) are installed with apt-get.
#
# Usage: deploy/package.sh [--no-lintian] [--out DIR]
#   exit status 0 when the packages are built and lintian reports no error.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/dist"
LINTIAN=1
while [ $# -gt 0 ]; do
    case "$1" in
    --no-lintian) LINTIAN=0; shift ;;
    --out) OUT="$2"; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "package.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

say() { echo "package: $*"; }

# --- build tools ---------------------------------------------------------------
# The build dependencies come from control itself, so that a dependency added
# there is also installed here.
tools=(debhelper dpkg-dev fakeroot lintian build-essential)
mapfile -t deps < <(sed -n '/^Build-Depends:/,/^[A-Z][A-Za-z-]*:/p' "$ROOT/deploy/debian/control" |
    sed -e 's/^Build-Depends://' -e '/^[A-Z][A-Za-z-]*:/d' | tr ',' '\n' |
    sed -e 's/([^)]*)//g' -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' | grep -v '^$' |
    grep -v '^dh-sequence-\|^debhelper-compat')
missing=()
for p in "${tools[@]}" "${deps[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

# --- version -----------------------------------------------------------------
VERSION="$(sed -n 's/^project(medlink VERSION \([0-9][0-9.]*\).*/\1/p' "$ROOT/CMakeLists.txt")"
if [ -z "$VERSION" ]; then
    echo "package.sh: no 'project(medlink VERSION X.Y.Z' line in CMakeLists.txt" >&2
    exit 1
fi

# --- staging copy --------------------------------------------------------------
STAGE="$(mktemp -d "${TMPDIR:-/tmp}/medlink-package.XXXXXX")"
# ML_PACKAGE_KEEP=1 keeps the staging folder (and its build.log) for a look.
if [ -z "${ML_PACKAGE_KEEP:-}" ]; then trap 'rm -rf "$STAGE"' EXIT; else say "staging in $STAGE (kept)"; fi
SRC="$STAGE/medlink-$VERSION"
mkdir -p "$SRC"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Tracked and new (not ignored) files as they are in the work tree, so that
    # a package can be tried before a commit.
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r sh -c \
        'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh |
        tar --null -T - -cf -) | tar -xf - -C "$SRC"
else
    tar -C "$ROOT" --exclude='./build*' --exclude=./dist --exclude=./demo-run --exclude=.git \
        -cf - . | tar -xf - -C "$SRC"
fi
rm -rf "$SRC/debian"
cp -r "$ROOT/deploy/debian" "$SRC/debian"
# The changelog is made here so that the version has one source, CMake's.
date_r="$(date -R -u)"
maint="$(sed -n 's/^Maintainer: //p' "$SRC/debian/control")"
cat >"$SRC/debian/changelog" <<CHANGELOG
medlink ($VERSION) unstable; urgency=medium

  * Packaged from the medlink source tree, version $VERSION (CMakeLists.txt).

 -- $maint  $date_r
CHANGELOG

# --- build ---------------------------------------------------------------------
say "building medlink $VERSION in $SRC"
start=$SECONDS
jobs="$(nproc)"
if ! (cd "$SRC" && DEB_BUILD_OPTIONS="parallel=$jobs nocheck" \
    dpkg-buildpackage -b -us -uc -rfakeroot >"$STAGE/build.log" 2>&1); then
    tail -n 60 "$STAGE/build.log" >&2
    echo "package.sh: dpkg-buildpackage failed (the end of its log is above)" >&2
    exit 1
fi
say "built in $((SECONDS - start)) s"

mkdir -p "$OUT"
rm -f "$OUT"/medlink*_"$VERSION"_*.deb "$OUT"/medlink_"$VERSION"_*.changes \
    "$OUT"/medlink_"$VERSION"_*.buildinfo
cp "$STAGE"/medlink*_"$VERSION"_*.deb "$STAGE"/medlink_"$VERSION"_*.changes \
    "$STAGE"/medlink_"$VERSION"_*.buildinfo "$OUT"/
for deb in "$OUT"/medlink*_"$VERSION"_*.deb; do
    say "$(basename "$deb") ($(du -k "$deb" | cut -f1) KiB)"
done

# --- lintian ---------------------------------------------------------------------
if [ "$LINTIAN" -eq 1 ]; then
    say "lintian"
    # Exit status 0 unless there is an error (warnings are printed; the
    # ones left are overridden in deploy/debian/*.lintian-overrides with a
    # reason).
    lintian --fail-on error --display-info "$OUT"/medlink_"$VERSION"_*.changes
    say "lintian: no errors"
fi
say "packages in ${OUT#"$ROOT"/}/"
