#!/usr/bin/env bash
# Checks the systemd units of deploy/systemd without installing them:
#  - `systemd-analyze security --offline=true` rates every service at most
#    3.0 ("OK"); the score of each is printed;
#  - `systemd-analyze verify` finds nothing wrong in any unit (it works
#    without systemd as PID 1). verify also checks that each Exec*= program
#    exists, so the units are checked from copies whose /usr/bin paths point
#    at the programs of the build tree (BUILD_DIR, the first argument);
#  - the sysusers.d and tmpfiles.d files parse (sysusers --dry-run; the
#    tmpfiles lines are checked for their fields and modes);
#  - the man pages of docs/man render without warnings (groff -ww, man).
# Usage: test_units.sh [BUILD_DIR]   (ctest passes the build folder)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
UNITS="$ROOT/deploy/systemd"
BUILD="${1:-${ML_BUILD_DIR:-$ROOT/build}}"
BUILD="$(cd "$BUILD" && pwd)"
MAX_SCORE=3.0
fail=0

if ! command -v systemd-analyze >/dev/null; then
    echo "test_units: systemd-analyze is missing (apt-get install systemd)" >&2
    exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# 1. Exposure score of each service.
for unit in "$UNITS"/*.service; do
    out="$(systemd-analyze security --offline=true --no-pager "$unit" 2>&1)" || true
    score="$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\) .*/\1/p' <<<"$out")"
    if [ -z "$score" ]; then
        echo "FAIL $(basename "$unit"): no score from systemd-analyze security:" >&2
        echo "$out" | tail -5 >&2
        fail=1
        continue
    fi
    if awk -v s="$score" -v m="$MAX_SCORE" 'BEGIN { exit !(s > m) }'; then
        echo "FAIL $(basename "$unit"): exposure $score > $MAX_SCORE; what is missing:" >&2
        grep '✗' <<<"$out" >&2
        fail=1
    else
        echo "ok   $(basename "$unit"): exposure $score (at most $MAX_SCORE)"
    fi
done

# 2. systemd-analyze verify, on copies that name the build tree's programs.
declare -A prog=(
    [/usr/bin/medlinkd]="$BUILD/broker/medlinkd"
    [/usr/bin/medlink-agent]="$BUILD/clients/agent/medlink-agent"
    [/usr/bin/medlink-pki]="$ROOT/deploy/pki.sh"
)
for p in "${!prog[@]}"; do
    if [ ! -x "${prog[$p]}" ]; then
        echo "FAIL ${prog[$p]} is missing (build the programs first)" >&2
        exit 1
    fi
done
for unit in "$UNITS"/*.service "$UNITS"/*.timer; do
    name="$(basename "$unit")"
    # A template is verified as one of its instances.
    name="${name/@./@township.example.clinic.}"
    sed -e "s#/usr/bin/medlinkd#${prog[/usr/bin/medlinkd]}#g" \
        -e "s#/usr/bin/medlink-agent#${prog[/usr/bin/medlink-agent]}#g" \
        -e "s#/usr/bin/medlink-pki#${prog[/usr/bin/medlink-pki]}#g" "$unit" >"$tmp/$name"
done
# The timer's service must sit next to it for verify to follow Unit=.
if out="$(cd "$tmp" && systemd-analyze verify --man=no ./*.service ./*.timer 2>&1)" &&
    [ -z "$out" ]; then
    echo "ok   systemd-analyze verify: $(cd "$tmp" && echo *.service *.timer)"
else
    echo "FAIL systemd-analyze verify:" >&2
    echo "$out" >&2
    fail=1
fi

# 3. sysusers.d and tmpfiles.d.
if out="$(systemd-sysusers --dry-run "$UNITS/medlink.sysusers" 2>&1)" &&
    grep -q "Creating user 'medlink'\|Would write\|already exists" <<<"$out" &&
    ! grep -qi 'fail\|error\|ignoring' <<<"$out"; then
    echo "ok   medlink.sysusers: $(head -1 <<<"$out")"
else
    echo "FAIL medlink.sysusers:" >&2
    echo "$out" >&2
    fail=1
fi
want=("/etc/medlink 0750 root medlink" "/var/lib/medlink 0750 medlink medlink"
      "/var/spool/medlink 0750 medlink medlink")
for w in "${want[@]}"; do
    if awk -v w="$w" '$1 == "d" && ($2 " " $3 " " $4 " " $5) == w { ok = 1 } END { exit !ok }' \
        "$UNITS/medlink.tmpfiles"; then
        echo "ok   medlink.tmpfiles: d $w"
    else
        echo "FAIL medlink.tmpfiles: no line 'd $w'" >&2
        fail=1
    fi
done

# 4. The man pages (docs/man) render without a warning.
for page in "$ROOT"/docs/man/*.[158]; do
    warn="$( { groff -man -ww -z "$page"; MANWIDTH=80 man --warnings -E UTF-8 -l "$page" >/dev/null; } 2>&1)"
    if [ -z "$warn" ]; then
        echo "ok   man page $(basename "$page"): no warnings"
    else
        echo "FAIL man page $(basename "$page"):" >&2
        echo "$warn" >&2
        fail=1
    fi
done

exit "$fail"
