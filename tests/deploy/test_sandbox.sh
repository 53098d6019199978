#!/usr/bin/env bash
# The units' sandbox must not break the programs. systemd is not PID 1 in
# CI, so the units cannot be started there; instead this runs the real
# medlinkd and two medlink-agents of the build tree under the system call
# restrictions their units declare (tests/deploy/sandbox.c: the expanded
# SystemCallFilter= allow list with SystemCallErrorNumber=EPERM,
# RestrictAddressFamilies= and NoNewPrivileges=, read from the unit files),
# and checks that a referral goes from a clinic through the broker (stored,
# fsynced) to an offline hospital once it connects, and that each program
# stops with status 0. A family or a syscall the programs need and the unit
# forbids makes this fail: libzmq, for one, opens an AF_NETLINK socket to
# resolve the address medlinkd listens on and aborts when it cannot.
# The file system side (ProtectSystem= and friends) is not emulated here.
# Usage: test_sandbox.sh [BUILD_DIR]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="$(cd "${1:-${ML_BUILD_DIR:-$ROOT/build}}" && pwd)"
UNITS="$ROOT/deploy/systemd"
# Sanitizer builds are skipped (exit 77, which ctest reports as skipped):
# LeakSanitizer stops the threads with ptrace at exit, which the units'
# filter forbids, as it should; the plain build is the one the units run.
if grep -q '^ML_SANITIZE:BOOL=ON' "$BUILD/CMakeCache.txt" 2>/dev/null; then
    echo "test_sandbox: skipped in a sanitizer build (LeakSanitizer needs ptrace)"
    exit 77
fi
T="$(mktemp -d)"
pids=()
cleanup() {
    local rc=$?
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    if [ "$rc" -ne 0 ]; then
        for l in "$T"/*.log; do
            [ -f "$l" ] && { echo "---- $l"; tail -n 20 "$l"; } >&2
        done
    fi
    rm -rf "$T"
    exit "$rc"
}
trap cleanup EXIT
die() { echo "FAIL $*" >&2; exit 1; }

# --- the wrapper -------------------------------------------------------------
echo '#include <sys/syscall.h>' | cc -E -dM - |
    sed -n 's/^#define __NR_\([a-z0-9_]*\) \([0-9]*\)$/{"\1", \2},/p' >"$T/sandbox-nr.h"
cc -O2 -I"$T" -o "$T/sandbox" "$ROOT/tests/deploy/sandbox.c"

# Expands a syscall group (recursively) into names, one a line.
expand() {
    local x
    systemd-analyze syscall-filter "$1" | sed 1d | grep -vE '^[[:space:]]*(#|$)' | tr -d ' ' |
        while read -r x; do
            case "$x" in @*) expand "$x" ;; *) echo "$x" ;; esac
        done
}
# Writes the allow list of UNIT's SystemCallFilter= lines to FILE and prints
# its RestrictAddressFamilies= as family numbers separated by commas.
unit_policy() { # UNIT FILE
    local unit="$1" out="$2" line w allow="" deny=""
    while IFS= read -r line; do
        line="${line#SystemCallFilter=}"
        if [[ "$line" == "~"* ]]; then deny+=" ${line#\~}"; else allow+=" $line"; fi
    done < <(grep '^SystemCallFilter=' "$unit")
    [ -n "$allow" ] || die "$unit has no SystemCallFilter= allow list"
    for w in $allow; do if [[ "$w" == @* ]]; then expand "$w"; else echo "$w"; fi; done |
        sort -u >"$T/allow"
    for w in $deny; do if [[ "$w" == @* ]]; then expand "$w"; else echo "$w"; fi; done |
        sort -u >"$T/deny"
    comm -23 "$T/allow" "$T/deny" >"$out"
    local fams
    fams="$(sed -n 's/^RestrictAddressFamilies=//p' "$unit")"
    [ -n "$fams" ] || die "$unit has no RestrictAddressFamilies="
    local nums=() f
    for f in $fams; do
        case "$f" in
        AF_UNIX) nums+=(1) ;; AF_INET) nums+=(2) ;; AF_INET6) nums+=(10) ;;
        AF_NETLINK) nums+=(16) ;; AF_PACKET) nums+=(17) ;;
        *) die "$unit: address family $f unknown to this test" ;;
        esac
    done
    (IFS=,; echo "${nums[*]}")
}
broker_fams="$(unit_policy "$UNITS/medlinkd.service" "$T/broker.syscalls")"
agent_fams="$(unit_policy "$UNITS/medlink-agent@.service" "$T/agent.syscalls")"
echo "ok   policies: medlinkd $(wc -l <"$T/broker.syscalls") syscalls, families $broker_fams;" \
    "agent $(wc -l <"$T/agent.syscalls") syscalls, families $agent_fams"

# --- a small community -------------------------------------------------------
BROKER=medlinkd.sandbox
CLINIC=township.sandbox.clinic
HOSP=county.sandbox.hospital
"$ROOT/deploy/pki.sh" --dir "$T/pki" "$BROKER" "$CLINIC" "$HOSP" >"$T/pki.log"
for k in broker clinic hosp; do (umask 077 && openssl rand -hex 32 >"$T/pki/$k.store.key"); done
cat >"$T/medlinkd.ini" <<INI
[broker]
id = $BROKER
listen = tcp://127.0.0.1:0
data_dir = data/broker
ca = pki/ca.crt
cert = pki/$BROKER.crt
key = pki/$BROKER.key
crl = pki/crl.pem
store_key = pki/broker.store.key

[http]
listen = 127.0.0.1:0

[node $CLINIC]
role = TOWNSHIP_CLINIC
community = sandbox
name = Sandbox clinic

[node $HOSP]
role = COUNTY_HOSPITAL
community = sandbox
name = Sandbox hospital

[acl TOWNSHIP_CLINIC]
REFERRAL = COUNTY_HOSPITAL
INI
agent_ini() { # NODE KEYNAME
    cat >"$T/agent-$1.ini" <<INI
[agent]
node_id = $1
broker = tcp://127.0.0.1:$port
broker_id = $BROKER
ca = pki/ca.crt
cert = pki/$1.crt
key = pki/$1.key
data_dir = data/$1
spool_dir = spool/$1
store_key = pki/$2.store.key
heartbeat_ms = 1000
scan_ms = 100
INI
}

start() { # NAME SYSCALLS FAMILIES PROGRAM ARGS...
    local name="$1" sc="$2" fam="$3"
    shift 3
    "$T/sandbox" "$sc" "$fam" "$@" >"$T/$name.log" 2>&1 &
    pids+=($!)
    eval "pid_${name//[^a-z]/_}=$!"
}
wait_for() { # SECONDS WHAT COMMAND...
    local until=$((SECONDS + $1)) what="$2"
    shift 2
    while ! "$@" 2>/dev/null; do
        local p
        for p in "${pids[@]}"; do
            kill -0 "$p" 2>/dev/null || die "$what: a program exited in its sandbox"
        done
        [ $SECONDS -lt $until ] || die "$what (after the wait)"
        sleep 0.1
    done
}
stop() { # NAME PID
    kill -TERM "$2"
    local rc=0
    wait "$2" || rc=$?
    [ "$rc" -eq 0 ] && echo "ok   $1 stopped with status 0 in its sandbox" ||
        die "$1 exited with status $rc in its sandbox"
}
# medlinkd listens on an ephemeral port and logs which.
port=""
listening() {
    port="$(sed -n 's#.* listening on tcp://127\.0\.0\.1:\([0-9][0-9]*\).*#\1#p' "$T/broker.log")"
    [ -n "$port" ] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
}
# At least N *.json files in DIR (evaluated at each try of wait_for).
has_json() { [ "$(find "$1" -maxdepth 1 -name '*.json' 2>/dev/null | wc -l)" -ge "$2" ]; }

cd "$T"
start broker "$T/broker.syscalls" "$broker_fams" "$BUILD/broker/medlinkd" --config "$T/medlinkd.ini"
wait_for 20 "medlinkd did not listen in its sandbox" listening
echo "ok   medlinkd listens in its sandbox (port $port)"
agent_ini "$CLINIC" clinic
agent_ini "$HOSP" hosp
start clinic "$T/agent.syscalls" "$agent_fams" "$BUILD/clients/agent/medlink-agent" \
    --config "$T/agent-$CLINIC.ini"
wait_for 20 "the clinic agent made no outbox" test -d "$T/spool/$CLINIC/outbox"
sed "s/\"to\": \"[^\"]*\"/\"to\": \"$HOSP\"/" "$ROOT/deploy/examples/referral.json" \
    >"$T/spool/$CLINIC/outbox/.ref.tmp"
mv "$T/spool/$CLINIC/outbox/.ref.tmp" "$T/spool/$CLINIC/outbox/referral.json"
wait_for 30 "the broker did not accept the referral" has_json "$T/spool/$CLINIC/sent" 1
echo "ok   the broker accepted (stored) the clinic's referral"
start hosp "$T/agent.syscalls" "$agent_fams" "$BUILD/clients/agent/medlink-agent" \
    --config "$T/agent-$HOSP.ini"
wait_for 30 "the hospital did not receive the referral" has_json "$T/spool/$HOSP/inbox" 1
echo "ok   the hospital's agent received it"
stop "medlink-agent ($HOSP)" "$pid_hosp"
stop "medlink-agent ($CLINIC)" "$pid_clinic"
stop medlinkd "$pid_broker"
pids=()
for l in "$T"/broker.log "$T"/clinic.log "$T"/hosp.log; do
    if grep -q 'Operation not permitted\|Address family not supported' "$l"; then
        die "$(basename "$l"): $(grep -m1 'Operation not permitted\|Address family not supported' "$l")"
    fi
done
echo "ok   no EPERM or EAFNOSUPPORT in the logs"
