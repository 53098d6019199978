#!/usr/bin/env bash
# A small community PKI for medlink, made with the openssl command line only.
# One CA (EC P-256) signs one certificate per node; the node id is both the
# subject CN (medlink's identity for the peer) and a DNS subjectAltName. The
# CA keeps an `openssl ca` database under DIR/ca/ so that certificates can be
# revoked and a CRL (DIR/crl.pem) published; medlinkd reloads that CRL on
# SIGHUP. Running the script again is safe: existing files are kept.
#
#   pki.sh --dir DIR [--ca-name NAME] [--days N] [--force] NODE_ID...
#   pki.sh --dir DIR --revoke NODE_ID      (then writes a fresh CRL)
#   pki.sh --dir DIR --crl [--crl-days N]  (writes a fresh CRL, valid 30 days)
# A CRL past its next update makes medlinkd refuse every handshake, so
# --crl is meant to run from a timer (deploy/systemd/medlink-crl.timer).
set -euo pipefail

PROG=${0##*/}
CA_DAYS_MIN=3650 # the CA outlives the node certificates it signs
CRL_DAYS=30

usage() {
    cat <<EOF
usage: $PROG --dir DIR [--ca-name NAME] [--days N] [--force] NODE_ID...
       $PROG --dir DIR --revoke NODE_ID [--revoke NODE_ID...]
       $PROG --dir DIR --crl [--crl-days N]

Creates DIR/ca.key + DIR/ca.crt (unless DIR/ca.crt exists) and, for each
NODE_ID, DIR/NODE_ID.key + DIR/NODE_ID.crt signed by that CA (CN=NODE_ID,
DNS:NODE_ID, serverAuth+clientAuth). Existing node certificates are kept
unless --force. --revoke revokes a node's certificate and rewrites
DIR/crl.pem; --crl only rewrites DIR/crl.pem.

  --dir DIR       folder holding the CA and node files (created if needed)
  --ca-name NAME  CA subject CN (default "medlink demo community CA")
  --days N        validity of node certificates in days (default 365)
  --force         re-issue node certificates (new key) even if they exist;
                  the superseded certificate is revoked
  --revoke ID     revoke DIR/ID.crt and write a fresh DIR/crl.pem
  --crl           write a fresh DIR/crl.pem (valid $CRL_DAYS days)
  --crl-days N    validity of the CRL written by this run (default $CRL_DAYS);
                  medlinkd warns crl_warn_days (7) before it runs out
  --not-before T, --not-after T
                  validity of the node certificates made by this run, as
                  YYYYMMDDHHMMSSZ (UTC) instead of now + --days: for drills
                  and tests of expired certificates
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    exit 1
}

dir=""
ca_name="medlink demo community CA"
days=365
force=0
gen_crl=0
revoke=()
nodes=()
crl_days=$CRL_DAYS
not_before=""
not_after=""

while [ $# -gt 0 ]; do
    case "$1" in
    --dir)
        [ $# -ge 2 ] || die "--dir needs a value"
        dir=$2
        shift 2
        ;;
    --ca-name)
        [ $# -ge 2 ] || die "--ca-name needs a value"
        ca_name=$2
        shift 2
        ;;
    --days)
        [ $# -ge 2 ] || die "--days needs a value"
        days=$2
        shift 2
        ;;
    --force)
        force=1
        shift
        ;;
    --revoke)
        [ $# -ge 2 ] || die "--revoke needs a node id"
        revoke+=("$2")
        shift 2
        ;;
    --crl)
        gen_crl=1
        shift
        ;;
    --crl-days)
        [ $# -ge 2 ] || die "--crl-days needs a value"
        crl_days=$2
        shift 2
        ;;
    --not-before)
        [ $# -ge 2 ] || die "--not-before needs a value"
        not_before=$2
        shift 2
        ;;
    --not-after)
        [ $# -ge 2 ] || die "--not-after needs a value"
        not_after=$2
        shift 2
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    --)
        shift
        nodes+=("$@")
        break
        ;;
    -*)
        usage >&2
        die "unknown option $1"
        ;;
    *)
        nodes+=("$1")
        shift
        ;;
    esac
done

[ -n "$dir" ] || {
    usage >&2
    die "--dir is required"
}
[ -n "$ca_name" ] || die "--ca-name must not be empty"
[[ "$days" =~ ^[1-9][0-9]{0,5}$ ]] || die "--days must be a positive number of days, not '$days'"
[[ "$crl_days" =~ ^[1-9][0-9]{0,4}$ ]] || die "--crl-days must be a positive number of days, not '$crl_days'"
for t in "$not_before" "$not_after"; do
    [ -z "$t" ] || [[ "$t" =~ ^[0-9]{14}Z$ ]] ||
        die "--not-before/--not-after take YYYYMMDDHHMMSSZ (UTC), not '$t'"
done
command -v openssl >/dev/null 2>&1 || die "the openssl command is not installed"

# Node ids become file names and DNS names, so keep them to DNS characters.
valid_id() {
    [[ "$1" =~ ^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$ ]] && [[ "$1" != *..* ]]
}
for id in ${nodes[@]+"${nodes[@]}"} ${revoke[@]+"${revoke[@]}"}; do
    valid_id "$id" || die "invalid node id '$id' (use letters, digits, '.', '-', '_')"
    case "$id" in ca | crl) die "node id '$id' is reserved" ;; esac
done

if [ ${#revoke[@]} -gt 0 ] || [ "$gen_crl" = 1 ]; then
    [ -f "$dir/ca.crt" ] || die "no CA in $dir (ca.crt missing): create one first"
fi
mkdir -p -- "$dir" || die "cannot create $dir"
# Work inside DIR with relative paths: the openssl ca configuration then
# needs no quoting of whatever characters the folder name has.
cd -- "$dir" || die "cannot enter $dir"
dir_shown=${dir%/}
[ -n "$dir_shown" ] || dir_shown=/

tmp=$(mktemp -d ./.pki.XXXXXX) || die "cannot create a temporary folder in $dir"
trap 'rm -rf -- "$tmp"' EXIT

# Runs a command quietly; on failure shows its output and what was being done.
run() {
    local what=$1
    shift
    if ! "$@" >"$tmp/out.log" 2>&1; then
        cat "$tmp/out.log" >&2
        die "$what failed"
    fi
}

made() {
    echo "made $dir_shown/$1"
}

# Escapes a value for an openssl -subj string ("/CN=value").
subj_escape() {
    local v=$1
    v=${v//\\/\\\\}
    v=${v//\//\\/}
    v=${v//+/\\+}
    v=${v//=/\\=}
    printf '%s' "$v"
}

# The openssl ca configuration is state-free (the state is in ca/index.txt
# and friends), so it is rewritten on every run.
write_ca_config() {
    mkdir -p ca/newcerts
    [ -f ca/index.txt ] || : >ca/index.txt
    [ -f ca/index.txt.attr ] || echo "unique_subject = no" >ca/index.txt.attr
    [ -f ca/crlnumber ] || echo 01 >ca/crlnumber
    cat >ca/openssl.cnf <<'EOF'
# Written by deploy/pki.sh; paths are relative to the PKI folder.
[ ca ]
default_ca = medlink_ca

[ medlink_ca ]
dir = .
database = ./ca/index.txt
new_certs_dir = ./ca/newcerts
certificate = ./ca.crt
private_key = ./ca.key
serial = ./ca/serial
crlnumber = ./ca/crlnumber
default_md = sha256
default_crl_days = 30
policy = policy_node
unique_subject = no
copy_extensions = none
crl_extensions = crl_ext

[ policy_node ]
commonName = supplied

[ crl_ext ]
authorityKeyIdentifier = keyid:always

[ req ]
distinguished_name = req_dn
prompt = no

[ req_dn ]
CN = unused

[ v3_ca ]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF
}

new_key() {
    # umask in a subshell: the key is never readable by others, not even
    # for a moment.
    (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1")
}

write_crl() {
    [ -f ca.key ] || die "$dir_shown/ca.key is missing: cannot sign a CRL"
    run "writing the CRL" openssl ca -batch -config ca/openssl.cnf -gencrl \
        -crldays "$crl_days" -out "$tmp/crl.pem"
    # Rename, so that a daemon reloading the CRL never reads half a file.
    mv -f -- "$tmp/crl.pem" crl.pem
    made crl.pem
}

# Prints the index status letter (V, R or E) of a certificate file, or
# nothing when the CA database does not know it.
index_status() {
    local serial
    serial=$(openssl x509 -noout -serial -in "$1") || die "cannot read $dir_shown/$1"
    serial=${serial#serial=}
    awk -F'\t' -v s="$serial" 'toupper($4) == toupper(s) { st = $1 } END { printf "%s", st }' \
        ca/index.txt
}

revoke_cert() {
    local file=$1 reason=$2
    case "$(index_status "$file")" in
    V) run "revoking $dir_shown/$file" openssl ca -batch -config ca/openssl.cnf \
        -revoke "$file" -crl_reason "$reason" ;;
    R)
        echo "$dir_shown/$file is already revoked" >&2
        return 1
        ;;
    *) die "$dir_shown/$file was not issued by the CA in $dir_shown (not in ca/index.txt)" ;;
    esac
}

# --- the CA -------------------------------------------------------------
ca_created=0
if [ -f ca.crt ]; then
    openssl x509 -noout -in ca.crt 2>/dev/null || die "$dir_shown/ca.crt is not a certificate"
    write_ca_config
else
    [ ! -f ca.key ] || die "$dir_shown/ca.key exists without ca.crt; move it away first"
    write_ca_config
    ca_days=$days
    [ "$ca_days" -ge "$CA_DAYS_MIN" ] || ca_days=$CA_DAYS_MIN
    run "generating the CA key" new_key "$tmp/ca.key"
    run "making the CA certificate" openssl req -new -x509 -config ca/openssl.cnf \
        -extensions v3_ca -key "$tmp/ca.key" -subj "/CN=$(subj_escape "$ca_name")" \
        -days "$ca_days" -sha256 -set_serial "0x$(openssl rand -hex 16)" -out "$tmp/ca.crt"
    mv -f -- "$tmp/ca.key" ca.key
    made ca.key
    mv -f -- "$tmp/ca.crt" ca.crt
    made ca.crt
    ca_created=1
fi

# --- node certificates --------------------------------------------------
changed_index=0
for id in ${nodes[@]+"${nodes[@]}"}; do
    if [ -f "$id.crt" ] && [ "$force" = 0 ]; then
        echo "kept $dir_shown/$id.crt (exists; --force to re-issue)"
        continue
    fi
    [ -f ca.key ] || die "$dir_shown/ca.key is missing: cannot sign $id"
    # Without --force an existing key (e.g. one made on the node itself) is
    # certified as is; --force always rotates the key.
    key_made=0
    if [ -f "$id.key" ] && [ "$force" = 0 ]; then
        openssl pkey -noout -in "$id.key" 2>/dev/null || die "$dir_shown/$id.key is not a private key"
        keyfile="$id.key"
    else
        run "generating the key for $id" new_key "$tmp/$id.key"
        keyfile="$tmp/$id.key"
        key_made=1
    fi
    cat >"$tmp/$id.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:$id
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
EOF
    run "making the request for $id" openssl req -new -config ca/openssl.cnf \
        -key "$keyfile" -subj "/CN=$id" -out "$tmp/$id.csr"
    validity=(-days "$days")
    [ -z "$not_before" ] || validity+=(-startdate "$not_before")
    [ -z "$not_after" ] || validity+=(-enddate "$not_after")
    run "signing the certificate for $id" openssl ca -batch -config ca/openssl.cnf \
        -rand_serial -notext "${validity[@]}" -extfile "$tmp/$id.ext" \
        -in "$tmp/$id.csr" -out "$tmp/$id.crt"
    # A re-issued certificate supersedes the old one, whose key may be
    # about to be thrown away: revoke it so that it cannot be used.
    if [ -f "$id.crt" ] && [ "$(index_status "$id.crt")" = V ]; then
        revoke_cert "$id.crt" superseded || true
        changed_index=1
    fi
    if [ "$key_made" = 1 ]; then
        mv -f -- "$tmp/$id.key" "$id.key"
        made "$id.key"
    fi
    mv -f -- "$tmp/$id.crt" "$id.crt"
    made "$id.crt"
done

# --- revocation and the CRL ---------------------------------------------
for id in ${revoke[@]+"${revoke[@]}"}; do
    [ -f "$id.crt" ] || die "no certificate $dir_shown/$id.crt to revoke"
    if revoke_cert "$id.crt" unspecified; then
        echo "revoked $dir_shown/$id.crt"
    fi
    changed_index=1
done

# A reused CA without crl.pem gets one too, when its key is at hand.
if [ "$ca_created" = 1 ] || [ "$gen_crl" = 1 ] || [ "$changed_index" = 1 ] ||
    { [ ! -f crl.pem ] && [ -f ca.key ]; }; then
    write_crl
fi
