#!/usr/bin/env bash
# The medlink quickstart: installs what is missing, builds, makes a demo PKI,
# starts medlinkd and six agents on 127.0.0.1 (county hospital, two township
# clinics, the city hospital, a reading centre and the ops desk), and runs
# the three clinical workflows end to end through the agents' spool folders:
#
#   1. upward referral, closed loop: Xinzhan clinic -> county hospital,
#      accepted, scheduled, arrived, admitted, discharged, closed;
#   2. imaging consult: a CT study (real DICOM files made by dcmtk's img2dcm)
#      -> the imaging.ct service -> the reading centre, which receives the
#      verified study and sends back a signed report with a critical finding;
#   3. rehab down-transfer: county hospital -> Xinzhan clinic, accepted,
#      arrived, two follow-ups, completed;
#
# printing each case's timeline (medlinkctl case show), then a refused route,
# `medlinkctl cases` and `medlinkctl status`; then ops' view: a few lines of
# the broker's Prometheus /metrics and a screenshot of its web status page
# taken with headless Chromium (demo-run/status.png). It stops everything
# it started and exits non-zero if any step failed. It builds only the three
# programs it runs (not the tests, benchmarks and fuzz targets).
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
CITY=city.shijiazhuang.hospital
READER=reading.shijiazhuang.imaging
OPS=ops.zhaozhou.admin
AGENTS=("$COUNTY" "$XINZHAN" "$FENGLE" "$CITY" "$READER" "$OPS")
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

# find_json DIR NEEDLE: the first *.json in DIR containing NEEDLE.
find_json() {
    grep -l -F -- "$2" "$1"/*.json 2>/dev/null | head -n 1 || true
}
# wait_json DIR NEEDLE SECONDS: waits for such a file and prints its path.
wait_json() {
    local f=""
    for _ in $(seq $(($3 * 10))); do
        f=$(find_json "$1" "$2")
        [ -n "$f" ] && { echo "$f"; return 0; }
        sleep 0.1
    done
    return 1
}
# case_of FILE: the caseId in a JSON envelope.
case_of() { grep -o '"caseId": *"[^"]*"' "$1" | head -n 1 | sed 's/.*: *"\(.*\)"/\1/'; }
# drop NODE NAME: stdin becomes NAME.json in NODE's outbox, written then renamed in.
drop() {
    local out="$RUN/spool/$1/outbox"
    cat >"$out/.$2.json.tmp"
    mv "$out/.$2.json.tmp" "$out/$2.json"
}
# update NODE TO CASE STATUS NAME [EXTRA_JSON]: a referral update from NODE's system.
update() {
    drop "$1" "$5" <<EOF
{"to": "$2", "caseId": "$3", "priority": "PRIORITY_URGENT",
 "referralUpdate": {"status": "$4"${6:+, $6}}}
EOF
}
ctl() { "$CTL" --config "$RUN/ctl-ops.ini" "$@"; }
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# le32 N / le16 N: little-endian bytes as printf escapes.
le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $((($1 >> 8) & 255)) $((($1 >> 16) & 255)) $((($1 >> 24) & 255)); }
le16() { printf '\\x%02x\\x%02x' $(($1 & 255)) $((($1 >> 8) & 255)); }
# bmp FILE SEED: a 512x512 24-bit image (a noisy test pattern) for img2dcm.
bmp() {
    local w=512 h=512 size=$((512 * 512 * 3))
    {
        printf "BM$(le32 $((54 + size)))\\x00\\x00\\x00\\x00$(le32 54)"
        printf "$(le32 40)$(le32 $w)$(le32 $h)$(le16 1)$(le16 24)$(le32 0)$(le32 $size)"
        printf "$(le32 2835)$(le32 2835)$(le32 0)$(le32 0)"
        head -c "$size" /dev/urandom
    } >"$1"
}

step "1. Dependencies and build"
# dcmtk makes the demo's DICOM study, curl fetches /metrics and Chromium
# takes the screenshot of the status page: only the demo needs them.
ML_SETUP_EXTRA="dcmtk curl chromium ${ML_SETUP_EXTRA:-}" "$ROOT/deploy/setup.sh" \
    --build-dir "$BUILD" --target medlinkd --target medlink-agent --target medlinkctl
MEDLINKD="$BUILD/broker/medlinkd"
AGENT="$BUILD/clients/agent/medlink-agent"
CTL="$BUILD/clients/ctl/medlinkctl"

step "2. Demo PKI: a community CA and one certificate per node"
rm -rf "$RUN"
mkdir -p "$RUN/logs"
"$ROOT/deploy/pki.sh" --dir "$RUN/pki" --ca-name "Zhaozhou county medical community CA" \
    "$BROKER_ID" "${AGENTS[@]}"

# Store keys: every store seals patient data at rest (AES-256-GCM).
mkdir -p "$RUN/keys"
(umask 077 && openssl rand -hex 32 >"$RUN/keys/medlinkd.store.key")
for n in "${AGENTS[@]}"; do
    "$AGENT" --generate-key "$RUN/keys/$n.store.key" >/dev/null
done

PORT=${MEDLINK_DEMO_PORT:-7400}
while port_busy "$PORT"; do PORT=$((PORT + 1)); done
HTTP_PORT=${MEDLINK_DEMO_HTTP_PORT:-9474}
while port_busy "$HTTP_PORT" || [ "$HTTP_PORT" -eq "$PORT" ]; do HTTP_PORT=$((HTTP_PORT + 1)); done
for f in "$ROOT"/deploy/config/*.ini; do
    sed -e "s#tcp://127.0.0.1:7400#tcp://127.0.0.1:$PORT#" \
        -e "s#^listen = 127.0.0.1:9474#listen = 127.0.0.1:$HTTP_PORT#" "$f" >"$RUN/$(basename "$f")"
done
grep -q "^listen = 127.0.0.1:$HTTP_PORT" "$RUN/medlinkd.ini" || fail "medlinkd.ini has no [http] listen"
echo "configs in $RUN (broker on tcp://127.0.0.1:$PORT, ops' HTTP on 127.0.0.1:$HTTP_PORT)"
# Every file each config names exists, keys are private and match their
# certificates: the same check an operator runs before a start.
"$MEDLINKD" --check-config "$RUN/medlinkd.ini"
for n in "${AGENTS[@]}"; do "$AGENT" --check-config "$RUN/agent-$n.ini"; done
"$CTL" --check-config "$RUN/ctl-ops.ini"

step "3. Start medlinkd and six agents"
"$MEDLINKD" --config "$RUN/medlinkd.ini" >"$RUN/logs/medlinkd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do port_busy "$PORT" && break; sleep 0.1; done
port_busy "$PORT" || fail "medlinkd did not start"
for n in "${AGENTS[@]}"; do
    "$AGENT" --config "$RUN/agent-$n.ini" >"$RUN/logs/agent-$n.log" 2>&1 &
    PIDS+=($!)
done
for n in "${AGENTS[@]}"; do
    for _ in $(seq 100); do grep -q "session up" "$RUN/logs/agent-$n.log" 2>/dev/null && break; sleep 0.1; done
    grep -q "session up" "$RUN/logs/agent-$n.log" || fail "agent $n did not connect"
done
echo "medlinkd pid ${PIDS[0]}, agent pids ${PIDS[*]:1}"

# ---------------------------------------------------------------------------
step "4. Upward referral: Xinzhan clinic -> county hospital"
cat "$ROOT/deploy/examples/referral.json" | drop "$XINZHAN" referral-wang
F=$(wait_json "$RUN/spool/$COUNTY/inbox" '"referral"' 30) || fail "referral did not reach the hospital"
REF=$(case_of "$F")
[ -n "$REF" ] || fail "no caseId in the delivered referral"
echo "county inbox: $(basename "$F") (case $REF)"
wait_json "$RUN/spool/$XINZHAN/inbox" REFERRAL_DELIVERED 30 >/dev/null ||
    fail "the clinic was not told of the delivery"
echo "clinic inbox: REFERRAL_DELIVERED (the broker's notice)"

echo "-- the hospital's system answers each step; the clinic receives every update"
update "$COUNTY" "$XINZHAN" "$REF" REFERRAL_ACCEPTED u1 '"by": {"name": "Dr. Zhao Min"}, "notes": "Cardiology accepts; priority reception arranged"'
update "$COUNTY" "$XINZHAN" "$REF" REFERRAL_SCHEDULED u2 "\"scheduledAt\": \"$(($(date +%s) * 1000 + 86400000))\", \"department\": \"Cardiology clinic 3\""
update "$COUNTY" "$XINZHAN" "$REF" REFERRAL_ARRIVED u3 '"notes": "Seen at the priority desk"'
update "$COUNTY" "$XINZHAN" "$REF" REFERRAL_ADMITTED u4 '"notes": "Cardiology ward, bed 12"'
update "$COUNTY" "$XINZHAN" "$REF" REFERRAL_DISCHARGED u5 '"outcomeSummary": "PCI with one stent to the LAD; discharged on dual antiplatelet therapy, follow-up by the family doctor team"'
for s in ACCEPTED SCHEDULED ARRIVED ADMITTED DISCHARGED; do
    wait_json "$RUN/spool/$XINZHAN/inbox" "REFERRAL_$s" 30 >/dev/null || fail "REFERRAL_$s did not reach the clinic"
    echo "clinic inbox: REFERRAL_$s"
done
update "$XINZHAN" "$COUNTY" "$REF" REFERRAL_CLOSED u6 '"notes": "Outcome filed in the family doctor record"'
wait_json "$RUN/spool/$COUNTY/inbox" REFERRAL_CLOSED 30 >/dev/null || fail "REFERRAL_CLOSED did not reach the hospital"
echo "county inbox: REFERRAL_CLOSED (the clinic closed the loop)"
sleep 0.3
echo
ctl case show "$REF" || fail "medlinkctl case show $REF"

# ---------------------------------------------------------------------------
step "5. Imaging consult: a CT study from Xinzhan clinic to the imaging.ct service"
STUDY_UID="1.2.826.0.1.3680043.8.498.$(date +%s)"
OUT="$RUN/spool/$XINZHAN/outbox"
mkdir -p "$RUN/images" "$OUT/ct-chest.d"
for i in 1 2 3; do
    bmp "$RUN/images/slice$i.bmp"
    img2dcm -i BMP "$RUN/images/slice$i.bmp" "$OUT/ct-chest.d/IM000$i.dcm" \
        -k "StudyInstanceUID=$STUDY_UID" -k "Modality=CT" -k "PatientName=LI^GUOQIANG" \
        -k "PatientID=130102196203058812" -k "InstanceNumber=$i" ||
        fail "img2dcm could not make the demo study"
done
ls -l "$OUT/ct-chest.d"
cat "$ROOT/deploy/examples/imaging-consult.json" | drop "$XINZHAN" ct-chest
S=$(wait_json "$RUN/spool/$XINZHAN/sent" '"imagingConsult"' 60) || fail "the consult was not accepted"
IMG=$(case_of "$S")
echo "consult accepted: case $IMG; the agent sends the DICOM objects in 256 KiB chunks"
STUDY_DIR="$RUN/spool/$READER/inbox/study-$IMG"
for _ in $(seq 600); do [ -f "$STUDY_DIR/manifest.json" ] && break; sleep 0.1; done
[ -f "$STUDY_DIR/manifest.json" ] || fail "the study did not arrive at the reading centre"
echo "reading centre inbox: study-$IMG/"
ls -l "$STUDY_DIR"
for i in 1 2 3; do
    a=$(sha256sum <"$OUT/../sent/ct-chest.d/IM000$i.dcm" | cut -d' ' -f1)
    b=$(sha256sum <"$STUDY_DIR/IM000$i.dcm" | cut -d' ' -f1)
    [ "$a" = "$b" ] || fail "IM000$i.dcm differs at the reading centre"
    echo "IM000$i.dcm  sha256 $b  identical at both ends"
done
dcmdump +P StudyInstanceUID +P Modality +P SOPInstanceUID "$STUDY_DIR/IM0001.dcm"
wait_json "$RUN/spool/$XINZHAN/inbox" IMAGING_STUDY_RECEIVED 30 >/dev/null ||
    fail "the clinic was not told the study arrived"
echo "clinic inbox: IMAGING_ASSIGNED, IMAGING_STUDY_RECEIVED"

echo "-- the radiologist signs a report with a critical finding (sent as ROUTINE)"
drop "$READER" report <<EOF
{"to": "$XINZHAN", "caseId": "$IMG",
 "imagingReport": {"studyInstanceUid": "$STUDY_UID",
  "findings": "3.5 cm spiculated mass in the right upper lobe; no effusion.",
  "impression": "Highly suspicious for primary lung cancer. Urgent referral to thoracic oncology.",
  "reader": {"name": "Dr. Gao Yan", "id": "RAD-112"},
  "signedAt": "$(($(date +%s) * 1000))", "criticalFinding": true}}
EOF
R=$(wait_json "$RUN/spool/$XINZHAN/inbox" '"imagingReport"' 30) || fail "the report did not come back"
grep -q PRIORITY_EMERGENCY "$R" || fail "a critical report must travel as EMERGENCY"
echo "clinic inbox: $(basename "$R") (priority EMERGENCY):"
cat "$R"
sleep 0.3
ctl case show "$IMG" || fail "medlinkctl case show $IMG"

# ---------------------------------------------------------------------------
step "6. Rehab down-transfer: county hospital -> Xinzhan clinic"
cat "$ROOT/deploy/examples/down-transfer.json" | drop "$COUNTY" down-chen
F=$(wait_json "$RUN/spool/$XINZHAN/inbox" '"downTransfer"' 30) || fail "the down-transfer did not reach the clinic"
DT=$(case_of "$F")
echo "clinic inbox: $(basename "$F") (case $DT)"
dt_update() {
    drop "$XINZHAN" "$1" <<EOF
{"to": "$COUNTY", "caseId": "$DT", "priority": "PRIORITY_URGENT",
 "downTransferUpdate": {"status": "$2"${3:+, $3}}}
EOF
    wait_json "$RUN/spool/$COUNTY/inbox" "$4" 30 >/dev/null || fail "$2 did not reach the hospital"
    echo "county inbox: $2${3:+ ($3)}"
}
dt_update d1 DOWN_TRANSFER_ACCEPTED '"by": {"name": "Dr. Wu Jing"}, "notes": "Team 2 takes her"' "Team 2 takes her"
dt_update d2 DOWN_TRANSFER_ARRIVED '"notes": "Home since this morning"' "Home since this morning"
dt_update d3 DOWN_TRANSFER_FOLLOW_UP '"followUpNumber": 1, "notes": "Wound clean, pain controlled"' "Wound clean"
dt_update d4 DOWN_TRANSFER_FOLLOW_UP '"followUpNumber": 2, "notes": "Walking 200 m with a stick"' "Walking 200 m"
dt_update d5 DOWN_TRANSFER_COMPLETED '"notes": "Rehabilitation goals met"' DOWN_TRANSFER_COMPLETED
sleep 0.3
ctl case show "$DT" || fail "medlinkctl case show $DT"

# ---------------------------------------------------------------------------
step "7. A forbidden route (township -> township) is refused"
sed "s/$COUNTY/$FENGLE/" "$ROOT/deploy/examples/referral.json" | drop "$XINZHAN" sideways
for _ in $(seq 300); do [ -f "$RUN/spool/$XINZHAN/rejected/sideways.json.error" ] && break; sleep 0.1; done
[ -f "$RUN/spool/$XINZHAN/rejected/sideways.json.error" ] || fail "forbidden referral was not rejected"
echo "rejected/sideways.json.error says:"
cat "$RUN/spool/$XINZHAN/rejected/sideways.json.error"
echo

step "8. medlinkctl cases and status (OPS certificate)"
ctl cases || fail "medlinkctl cases failed"
echo
ctl status || fail "medlinkctl status failed"

step "9. Ops' view: Prometheus metrics and the web status page"
URL="http://127.0.0.1:$HTTP_PORT"
curl -fsS "$URL/healthz" >/dev/null || fail "$URL/healthz does not answer"
curl -fsS "$URL/readyz" >/dev/null || fail "$URL/readyz says the broker is not ready"
curl -fsS "$URL/metrics" >"$RUN/metrics.txt" || fail "cannot fetch $URL/metrics"
echo "$URL/metrics ($(wc -l <"$RUN/metrics.txt") lines, all in $RUN/metrics.txt), a few of them:"
grep -E '^medlink_nodes\{|^medlink_node_queue_messages\{|^medlink_cases_overdue |^medlink_dead_letters |^medlink_messages_accepted_total\{kind="referral' \
    "$RUN/metrics.txt" | sed 's/^/  /' || fail "/metrics lacks the families the demo shows"
grep -q '^medlink_nodes{state="online"} 6$' "$RUN/metrics.txt" || fail "/metrics does not count six nodes online"
rm -rf "$RUN/chromium"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$RUN/chromium" \
    --window-size=1280,1100 --virtual-time-budget=5000 --screenshot="$RUN/status.png" "$URL/" \
    >"$RUN/logs/chromium.log" 2>&1 || fail "headless Chromium could not load $URL/"
[ "$(stat -c %s "$RUN/status.png" 2>/dev/null || echo 0)" -gt 10000 ] || fail "no screenshot of the status page"
rm -rf "$RUN/chromium"
echo "the web status page ($URL/, ?lang=zh for Chinese): screenshot in $RUN/status.png"

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
