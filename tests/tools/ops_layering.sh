#!/usr/bin/env bash
# The ops modules' layering (docs/architecture.md, "What the ops modules may
# call"): admin.c, http.c, prom.c, web.c and alerts.c reach the broker
# only through query.h (reads) and ops_cmd.h (commands), never through
# broker_int.h; the modules that only show things (http.c, prom.c, web.c)
# do not include ops_cmd.h either. Run by ctest as ops_layering:
#   tests/tools/ops_layering.sh <source dir>
# Exits 1 and names each breach on stderr.
set -u
root=${1:-.}
dir="$root/broker"
fail=0
breach() {
    echo "ops_layering: $*" >&2
    fail=1
}

ops="admin.c http.c prom.c web.c alerts.c"
show_only="http.c prom.c web.c"

# What broker_int.h declares (its ml_bk_* functions and its types), which
# an ops module must neither include nor name. admin.c defines the two
# functions broker.c calls it by (declared again in admin.h).
[ -f "$dir/broker_int.h" ] || { echo "ops_layering: no $dir/broker_int.h" >&2; exit 1; }
int_fns=$(grep -oE '\bml_bk_[a-z_]+[[:space:]]*\(' "$dir/broker_int.h" | tr -d ' (' | sort -u |
    grep -vxE 'ml_bk_admin|ml_bk_admin_free')
int_types='ml_nodestate_t|ml_qitem_t|ml_put_t|ml_bk_msg_t|ml_inflight_t'

for f in $ops; do
    p="$dir/$f"
    [ -f "$p" ] || { breach "$f is missing"; continue; }
    if grep -nE '^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"]([^">]*/)?broker_int\.h[">]' "$p" >&2; then
        breach "$f includes broker_int.h (use query.h / ops_cmd.h)"
    fi
    for fn in $int_fns; do
        if grep -nwE "$fn" "$p" | grep -v '^[0-9]*:[[:space:]]*\*' >&2; then
            breach "$f calls $fn, a broker_int.h function"
        fi
    done
    if grep -nE "\b($int_types)\b" "$p" | grep -v '^[0-9]*:[[:space:]]*\*' >&2; then
        breach "$f names a broker_int.h type"
    fi
    if grep -nE '\bb->(sessions|nodes|n_nodes|cases|store|puts_pending|puts_pending_bytes|router|tls|cfg|dlq_waits)\b' "$p" >&2; then
        breach "$f reads the broker's fields directly"
    fi
done
for f in $show_only; do
    if grep -nE '^[[:space:]]*#[[:space:]]*include[[:space:]]*"ops_cmd\.h"' "$dir/$f" >&2; then
        breach "$f includes ops_cmd.h: it only shows things (query.h)"
    fi
done
exit $fail
