#!/usr/bin/env bash
# The Debian packages, end to end, on this machine (as root; CI is root):
#   1. deploy/package.sh builds them into dist/ and lintian finds no error;
#   2. dpkg -i installs medlink-common, -broker, -agent and -tools;
#   3. the programs run (--version), the units are in /lib/systemd/system and
#      pass systemd-analyze verify and security (at most 3.0), the sysusers.d
#      and tmpfiles.d files are there and made the medlink user and the
#      folders with their modes, the man pages are found (man -w) and render
#      without warnings, the conffiles are registered, and an edited one
#      survives installing the package again;
#   4. the packaged configuration files are right for the packaged layout: with
#      a PKI made by medlink-pki in /etc/medlink/pki and store keys, each
#      passes --check-config as the medlink user;
#   5. dpkg --purge removes every file the packages installed and the empty
#      folders; a non-empty data folder is kept (purge never deletes
#      broker.db); the medlink user stays (Debian practice, see
#      docs/operations.md "Removal").
# Whatever happens, the packages are purged and what the test created (the
# PKI, the folders, the medlink user when it did not exist before) is
# removed. It refuses to run when medlink packages or /etc/medlink are
# already on the machine: it would purge them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PKGS=(medlink-common medlink-broker medlink-agent medlink-tools)
start=$SECONDS
fail=0
ok() { echo "ok   $*"; }
bad() { echo "FAIL $*" >&2; fail=1; }

if [ "$(id -u)" -ne 0 ]; then
    echo "test_package: must run as root (it installs packages)" >&2
    exit 1
fi
for p in "${PKGS[@]}"; do
    if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'installed\|config-files'; then
        echo "test_package: $p is already on this machine; not touching it" >&2
        exit 1
    fi
done
for d in /etc/medlink /var/lib/medlink /var/spool/medlink; do
    if [ -e "$d" ]; then
        echo "test_package: $d exists already; not touching it" >&2
        exit 1
    fi
done
user_existed=0
if getent passwd medlink >/dev/null; then user_existed=1; fi

cleanup() {
    local rc=$?
    set +e
    dpkg --purge "${PKGS[@]}" >/dev/null 2>&1
    rm -rf /etc/medlink /var/lib/medlink /var/spool/medlink
    if [ "$user_existed" -eq 0 ] && getent passwd medlink >/dev/null; then
        userdel medlink 2>/dev/null
        getent group medlink >/dev/null && groupdel medlink 2>/dev/null
    fi
    echo "test_package: $((SECONDS - start)) s"
    exit "$rc"
}
trap cleanup EXIT

# --- 1. build + lintian ---------------------------------------------------------
VERSION="$(sed -n 's/^project(medlink VERSION \([0-9][0-9.]*\).*/\1/p' "$ROOT/CMakeLists.txt")"
"$ROOT/deploy/package.sh"
debs=()
for p in "${PKGS[@]}"; do
    f=("$ROOT"/dist/"${p}_${VERSION}"_*.deb)
    if [ ! -f "${f[0]}" ]; then
        bad "dist/ has no ${p}_${VERSION}_*.deb"
        exit 1
    fi
    debs+=("${f[0]}")
done
ok "package.sh built ${#debs[@]} packages, lintian without errors"

# --- 2. install ------------------------------------------------------------------
dpkg -i "${debs[@]}"
for p in "${PKGS[@]}"; do
    st="$(dpkg-query -W -f='${Status}' "$p")"
    [ "$st" = "install ok installed" ] && ok "$p: $st" || bad "$p: $st"
done

# --- 3. what is installed --------------------------------------------------------
for prog in medlinkd medlink-agent medlinkctl; do
    v="$("/usr/bin/$prog" --version 2>&1 || true)"
    [ "$v" = "$prog $VERSION" ] && ok "$prog --version: $v" || bad "$prog --version: '$v'"
done
medlink-pki --help | grep -q '^usage: medlink-pki ' && ok "medlink-pki --help names itself" ||
    bad "medlink-pki --help"

for u in medlinkd.service medlink-agent@.service medlink-crl.service medlink-crl.timer; do
    [ -f "/lib/systemd/system/$u" ] && ok "/lib/systemd/system/$u" || bad "no /lib/systemd/system/$u"
done
# verify with the real programs in place now; a template as an instance.
vt="$(mktemp -d)"
cp /lib/systemd/system/medlinkd.service /lib/systemd/system/medlink-crl.* "$vt/"
cp /lib/systemd/system/medlink-agent@.service "$vt/medlink-agent@township.xinzhan.clinic.service"
out="$( (cd "$vt" && systemd-analyze verify --man=no ./*.service ./*.timer) 2>&1)" || true
[ -z "$out" ] && ok "systemd-analyze verify of the installed units" || bad "verify: $out"
for u in medlinkd.service medlink-agent@.service medlink-crl.service; do
    score="$(systemd-analyze security --offline=true "/lib/systemd/system/$u" 2>&1 |
        sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\) .*/\1/p')"
    if [ -n "$score" ] && awk -v s="$score" 'BEGIN { exit !(s <= 3.0) }'; then
        ok "$u: exposure $score"
    else
        bad "$u: exposure '$score' (more than 3.0)"
    fi
done
rm -rf "$vt"

for f in /usr/lib/sysusers.d/medlink.conf /usr/lib/tmpfiles.d/medlink.conf; do
    [ -f "$f" ] && ok "$f" || bad "no $f"
done
pw="$(getent passwd medlink || true)"
case "$pw" in
medlink:*:/var/lib/medlink:/usr/sbin/nologin | medlink:*:/var/lib/medlink:/sbin/nologin)
    uid="$(cut -d: -f3 <<<"$pw")"
    [ "$uid" -lt 1000 ] && ok "system user: $pw" || bad "medlink is not a system user: $pw" ;;
*) bad "medlink user: '$pw'" ;;
esac
for want in "/etc/medlink 750 root medlink" "/var/lib/medlink 750 medlink medlink" \
    "/var/spool/medlink 750 medlink medlink"; do
    read -r d mode owner group <<<"$want"
    got="$(stat -c '%a %U %G' "$d" 2>/dev/null || echo missing)"
    [ "$got" = "$mode $owner $group" ] && ok "$d $got" || bad "$d: '$got', want '$mode $owner $group'"
done

for page in medlinkd medlink-agent medlinkctl medlink-pki medlinkd.ini medlink-agent.ini \
    medlinkctl.ini; do
    path="$(man -w "$page" 2>/dev/null || true)"
    if [ -z "$path" ]; then
        bad "man -w $page: not found"
        continue
    fi
    warn="$(MANWIDTH=80 man --warnings -E UTF-8 "$page" 2>&1 >/dev/null || true)"
    [ -z "$warn" ] && ok "man $page: $path, no warnings" || bad "man $page: $warn"
done

declare -A conf=([medlink-broker]=/etc/medlink/medlinkd.ini
    [medlink-agent]=/etc/medlink/agent.ini.example [medlink-tools]=/etc/medlink/ctl.ini)
for p in "${!conf[@]}"; do
    if dpkg-query -W -f='${Conffiles}\n' "$p" | grep -q "^ ${conf[$p]} [0-9a-f]\{32\}$" &&
        [ -f "${conf[$p]}" ]; then
        ok "$p conffile ${conf[$p]}"
    else
        bad "$p: ${conf[$p]} is not a conffile"
    fi
done

# An edited conffile survives an upgrade (here: installing the package again;
# the packaged file is the same, so dpkg keeps the edit without asking).
echo "; edited by the operator" >>/etc/medlink/medlinkd.ini
dpkg -i "${debs[1]}" >/dev/null
if tail -n 1 /etc/medlink/medlinkd.ini | grep -q '^; edited by the operator$' &&
    [ ! -e /etc/medlink/medlinkd.ini.dpkg-dist ] && [ ! -e /etc/medlink/medlinkd.ini.dpkg-old ]; then
    ok "reinstalling medlink-broker kept the edited /etc/medlink/medlinkd.ini"
else
    bad "reinstalling medlink-broker did not keep the edited medlinkd.ini"
fi

# --- 4. the packaged configuration works with the packaged layout ---------------
# The node ids the packaged files name (the demo community of deploy/config).
medlink-pki --dir /etc/medlink/pki medlinkd.zhaozhou township.xinzhan.clinic \
    ops.zhaozhou.admin >/dev/null
install -d -o root -g medlink -m 0750 /etc/medlink/keys
# The broker's store key (64 hex digits, mode 0600) and the agent's.
(umask 077 && openssl rand -hex 32 >/etc/medlink/keys/medlinkd.store.key)
medlink-agent --generate-key /etc/medlink/keys/township.xinzhan.clinic.store.key >/dev/null
chown -R medlink:medlink /etc/medlink/pki /etc/medlink/keys
cp /etc/medlink/agent.ini.example /etc/medlink/agent-township.xinzhan.clinic.ini
for c in "medlinkd --check-config /etc/medlink/medlinkd.ini" \
    "medlink-agent --check-config /etc/medlink/agent-township.xinzhan.clinic.ini" \
    "medlinkctl --check-config /etc/medlink/ctl.ini"; do
    # shellcheck disable=SC2086 # the words of $c are the command
    if out="$(runuser -u medlink -- $c 2>&1)"; then
        ok "as medlink: $c: $out"
    else
        bad "as medlink: $c: $out"
    fi
done
# What the test made is not the packages' to remove: take it away, except
# for one file in the broker's data folder, which purge must keep.
rm -rf /etc/medlink/pki /etc/medlink/keys /etc/medlink/agent-township.xinzhan.clinic.ini
install -d -o medlink -g medlink -m 0750 /var/lib/medlink/broker
echo kept >/var/lib/medlink/broker/broker.db

# --- 5. purge --------------------------------------------------------------------
files=()
for p in "${PKGS[@]}"; do
    while IFS= read -r f; do
        if [ -f "$f" ] || { [ -L "$f" ] && [ ! -d "$f" ]; }; then files+=("$f"); fi
    done < <(dpkg -L "$p")
done
out="$(dpkg --purge "${PKGS[@]}" 2>&1)" || bad "dpkg --purge: $out"
left=()
for f in "${files[@]}"; do
    if [ -e "$f" ] || [ -L "$f" ]; then left+=("$f"); fi
done
[ ${#left[@]} -eq 0 ] && ok "purge removed all ${#files[@]} installed files" ||
    bad "purge left ${left[*]}"
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q . && bad "$p still known to dpkg" ||
        ok "$p purged"
done
for d in /etc/medlink /var/spool/medlink; do
    [ ! -e "$d" ] && ok "$d removed (it was empty)" || bad "$d still there"
done
[ -f /var/lib/medlink/broker/broker.db ] && grep -q '/var/lib/medlink is not empty' <<<"$out" &&
    ok "purge kept /var/lib/medlink with data in it, and said so" ||
    bad "purge did not keep /var/lib/medlink with broker.db: $out"
getent passwd medlink >/dev/null && ok "the medlink user stays after purge" ||
    bad "the medlink user is gone"

exit "$fail"
