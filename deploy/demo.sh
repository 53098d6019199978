#!/usr/bin/env bash
# The medlink quickstart: installs what is missing, builds, makes a demo PKI,
# starts medlinkd and three agents on 127.0.0.1, and walks one upward
# referral through its closed loop:
#   township clinic drops a referral JSON into its outbox
#   -> it arrives in the county hospital's inbox
#   -> the hospital's system answers REFERRAL_ACCEPTED through its outbox
#   -> the acceptance arrives in the clinic's inbox
# then shows a forbidden route being refused, prints `medlinkctl status`,
# and stops everything it started. Exits non-zero if any step failed.
#
#   deploy/demo.sh          (leaves demo-run/ with configs, logs and data)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$ROOT/build"
RUN="$ROOT/demo-run"
BROKER_ID=medlinkd.zhaozhou
COUNTY=county.zhaozhou.hospital
XINZHAN=township.xinzhan.clinic
FENGLE=township.fengle.clinic
OPS=ops.zhaozhou.admin
PIDS=()

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() {
    echo "demo: FAILED: $*" >&2
    for f in "$RUN"/logs/*.log; do
        [ -f "$f" ] && { echo "--- tail of $f" >&2; tail -n 15 "$f" >&2; }
    done
    exit 1
}

cleanup() {
    # End only the processes this script started, by PID.
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

# wait_for COUNT DIR SECONDS: until DIR holds COUNT *.json files.
wait_for() {
    local want=$1 dir=$2 secs=$3 n=0
    for _ in $(seq $((secs * 10))); do
        n=$(find "$dir" -maxdepth 1 -name '*.json' 2>/dev/null | wc -l)
        [ "$n" -ge "$want" ] && return 0
        sleep 0.1
    done
    return 1
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

step "1. Dependencies and build"
"$ROOT/deploy/setup.sh" --build-dir "$BUILD"
MEDLINKD="$BUILD/broker/medlinkd"
AGENT="$BUILD/clients/agent/medlink-agent"
CTL="$BUILD/clients/ctl/medlinkctl"

step "2. Demo PKI: a community CA and one certificate per node"
rm -rf "$RUN"
mkdir -p "$RUN/logs"
"$ROOT/deploy/pki.sh" --dir "$RUN/pki" --ca-name "Zhaozhou county medical community CA" \
    "$BROKER_ID" "$COUNTY" "$XINZHAN" "$FENGLE" "$OPS"

PORT=${MEDLINK_DEMO_PORT:-7400}
while port_busy "$PORT"; do PORT=$((PORT + 1)); done
for f in "$ROOT"/deploy/config/*.ini; do
    sed "s#tcp://127.0.0.1:7400#tcp://127.0.0.1:$PORT#" "$f" >"$RUN/$(basename "$f")"
done
echo "configs in $RUN (broker on tcp://127.0.0.1:$PORT)"

step "3. Start medlinkd and three agents"
"$MEDLINKD" --config "$RUN/medlinkd.ini" >"$RUN/logs/medlinkd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do port_busy "$PORT" && break; sleep 0.1; done
port_busy "$PORT" || fail "medlinkd did not start"
for n in "$COUNTY" "$XINZHAN" "$FENGLE"; do
    "$AGENT" --config "$RUN/agent-$n.ini" >"$RUN/logs/agent-$n.log" 2>&1 &
    PIDS+=($!)
done
for n in "$COUNTY" "$XINZHAN" "$FENGLE"; do
    for _ in $(seq 100); do [ -d "$RUN/spool/$n/outbox" ] && break; sleep 0.1; done
    [ -d "$RUN/spool/$n/outbox" ] || fail "agent $n did not start"
done
for _ in $(seq 100); do
    grep -q "session up" "$RUN/logs/agent-$XINZHAN.log" 2>/dev/null &&
        grep -q "session up" "$RUN/logs/agent-$COUNTY.log" 2>/dev/null && break
    sleep 0.1
done
echo "medlinkd pid ${PIDS[0]}, agents pids ${PIDS[*]:1}"

step "4. Xinzhan clinic drops a referral into its outbox"
OUT="$RUN/spool/$XINZHAN/outbox"
cp "$ROOT/deploy/examples/referral.json" "$OUT/.referral-wang.json.tmp"
mv "$OUT/.referral-wang.json.tmp" "$OUT/referral-wang.json"
echo "wrote $OUT/referral-wang.json"

step "5. It arrives in the county hospital's inbox"
wait_for 1 "$RUN/spool/$COUNTY/inbox" 30 || fail "referral did not reach the hospital inbox"
INBOX_FILE=$(find "$RUN/spool/$COUNTY/inbox" -maxdepth 1 -name '*.json' | head -n 1)
echo "$INBOX_FILE:"
cat "$INBOX_FILE"
wait_for 1 "$RUN/spool/$XINZHAN/sent" 10 || fail "clinic's file not moved to sent/"
echo "clinic side: sent/$(ls "$RUN/spool/$XINZHAN/sent") written (accepted by the broker):"
grep -E '^  "(id|caseId)"' "$RUN/spool/$XINZHAN/sent/"*.json
CASE_ID=$(grep -o '"caseId": *"[^"]*"' "$INBOX_FILE" | head -n 1 | sed 's/.*: *"\(.*\)"/\1/')
[ -n "$CASE_ID" ] || fail "no caseId in the delivered referral"

step "6. The hospital's system accepts the referral (case $CASE_ID)"
HOUT="$RUN/spool/$COUNTY/outbox"
cat >"$HOUT/.accept.json.tmp" <<EOF
{
  "to": "$XINZHAN",
  "caseId": "$CASE_ID",
  "priority": "PRIORITY_URGENT",
  "referralUpdate": {
    "status": "REFERRAL_ACCEPTED",
    "by": { "name": "Dr. Zhao Min", "id": "CARD-204" },
    "notes": "Accepted by cardiology; priority reception arranged"
  }
}
EOF
mv "$HOUT/.accept.json.tmp" "$HOUT/accept-$CASE_ID.json"

step "7. The acceptance arrives back at the clinic"
wait_for 1 "$RUN/spool/$XINZHAN/inbox" 30 || fail "acceptance did not come back to the clinic"
cat "$(find "$RUN/spool/$XINZHAN/inbox" -maxdepth 1 -name '*.json' | head -n 1)"

step "8. A forbidden route (township -> township) is refused"
sed "s/$COUNTY/$FENGLE/" "$ROOT/deploy/examples/referral.json" >"$OUT/.sideways.json.tmp"
mv "$OUT/.sideways.json.tmp" "$OUT/sideways.json"
wait_for 1 "$RUN/spool/$XINZHAN/rejected" 30 || fail "forbidden referral was not rejected"
echo "rejected/sideways.json.error says:"
cat "$RUN/spool/$XINZHAN/rejected/sideways.json.error"
echo

step "9. medlinkctl status (OPS certificate)"
"$CTL" --config "$RUN/ctl-ops.ini" status || fail "medlinkctl status failed"

step "10. Stop everything"
rc=0
for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
for pid in "${PIDS[@]}"; do
    if ! wait "$pid"; then
        echo "process $pid did not exit cleanly" >&2
        rc=1
    fi
done
PIDS=()
[ "$rc" -eq 0 ] || fail "a daemon did not shut down cleanly"
echo "all daemons stopped cleanly; logs and data in $RUN"
echo
echo "demo: OK"
