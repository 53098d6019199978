#!/usr/bin/env bash
# Checks that medlinkd's modules depend on each other one way only, as
# broker/LAYERS says (docs/architecture.md, "Modules"). Run by ctest as
# `layers`:  tests/tools/layers.sh <source dir> <build dir>
#
# 1. Includes: every #include "X.h" of a broker/*.c or *.h file whose X is
#    a module must name a module of a lower layer than the file's own (its
#    own header excepted).
# 2. Calls: `nm -u` of each module's object lists the functions it calls
#    outside itself; each one whose name starts with a module's prefix
#    (LAYERS, longest prefix wins) must belong to a lower layer. This
#    catches a call through a declaration repeated by hand, which the
#    include check cannot see.
# 3. The edges found must sort topologically (tsort): belt and braces
#    against a LAYERS table that is itself wrong.
#
# Limits (grep and nm level, on purpose): an #include inside #if is counted
# as if always taken; a call made through a function pointer (b->hooks,
# which is how a lower module hands something up, by design) or a macro
# that expands to no external call is invisible; static inline functions
# in headers are not seen as calls; a symbol with no prefix in LAYERS
# (lib/, libc) is ignored. Edges listed as `allow` in LAYERS are reported
# but do not fail.
set -u
src=${1:?source dir}
bld=${2:?build dir}
layers=$src/broker/LAYERS
objdir=$bld/broker/CMakeFiles/medlinkd_core.dir
[ -r "$layers" ] || { echo "layers: no $layers"; exit 2; }

declare -A layer prefix_of header_mod allowed
prefixes=()
while read -r kind a b rest; do
    case "$kind" in
    module)
        layer[$a]=$b
        for p in $rest; do prefix_of[$p]=$a; prefixes+=("$p"); done ;;
    header) header_mod[$a]=$b ;;
    allow) allowed["$a $b"]=1 ;;
    esac
done < <(grep -v '^[[:space:]]*#' "$layers" | grep -v '^[[:space:]]*$')

fail=0
edges=()
module_of_file() { # broker/foo.c -> foo, when foo is a module
    local base
    base=$(basename "$1")
    if [ -n "${header_mod[$base]:-}" ]; then echo "${header_mod[$base]}"; return; fi
    base=${base%.*}
    [ -n "${layer[$base]:-}" ] && echo "$base"
}
check_edge() { # from to what
    local from=$1 to=$2 what=$3
    [ "$from" = "$to" ] && return
    edges+=("$from $to")
    if [ "${layer[$to]}" -lt "${layer[$from]}" ]; then return; fi
    if [ -n "${allowed["$from $to"]:-}" ]; then
        echo "layers: allowed (LAYERS): $from (${layer[$from]}) -> $to (${layer[$to]}): $what"
        return
    fi
    echo "layers: FAIL: $from (layer ${layer[$from]}) -> $to (layer ${layer[$to]}): $what"
    fail=1
}

# 1. Includes.
for f in "$src"/broker/*.c "$src"/broker/*.h; do
    from=$(module_of_file "$f")
    if [ -z "$from" ]; then
        echo "layers: FAIL: $(basename "$f") is in no module of broker/LAYERS"
        fail=1
        continue
    fi
    while read -r inc; do
        to=$(module_of_file "$inc")
        [ -n "$to" ] && check_edge "$from" "$to" "$(basename "$f") includes $inc"
    done < <(grep -o '^[[:space:]]*#[[:space:]]*include[[:space:]]*"[^"]*"' "$f" | sed 's/.*"\(.*\)"/\1/')
done

# 2. Calls.
owner_of_symbol() { # longest matching prefix
    local sym=$1 best="" p
    for p in "${prefixes[@]}"; do
        if [[ $sym == "$p"* ]] && [ ${#p} -gt ${#best} ]; then best=$p; fi
    done
    [ -n "$best" ] && echo "${prefix_of[$best]}"
}
n_obj=0
for o in "$objdir"/*.c.o "$bld"/broker/CMakeFiles/medlinkd.dir/main.c.o; do
    [ -e "$o" ] || continue
    from=$(module_of_file "${o%.o}")
    [ -n "$from" ] || continue
    n_obj=$((n_obj + 1))
    while read -r sym; do
        to=$(owner_of_symbol "$sym")
        [ -n "$to" ] && check_edge "$from" "$to" "$(basename "${o%.o}") calls $sym"
    done < <(nm -u "$o" | awk '{print $NF}' | grep '^ml_' | sort -u)
done
if [ "$n_obj" -lt 10 ]; then
    echo "layers: FAIL: no objects under $objdir (build medlinkd first)"
    fail=1
fi

# 3. The graph must have no cycle, allowed edges included or not.
strict=()
for e in "${edges[@]}"; do
    [ -n "${allowed[$e]:-}" ] || strict+=("$e")
done
if ! printf '%s\n' "${strict[@]}" | sort -u | tsort > /dev/null 2>&1; then
    echo "layers: FAIL: the include/call graph has a cycle (tsort)"
    fail=1
fi
if ! printf '%s\n' "${edges[@]}" | sort -u | tsort > /dev/null 2>&1; then
    echo "layers: note: a cycle remains through the allowed edges:"
    printf '%s\n' "${edges[@]}" | sort -u | tsort 2>&1 >/dev/null | sed 's/^/layers:   /'
fi
n_edges=$(printf '%s\n' "${edges[@]}" | sort -u | wc -l)
if [ "$fail" -ne 0 ]; then
    echo "layers: FAILED ($n_edges module edges checked)"
    exit 1
fi
echo "layers: ok ($n_edges module edges, $n_obj objects, one way)"
