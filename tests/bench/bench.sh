#!/usr/bin/env bash
# medlink throughput/latency/memory benchmark. Everything on 127.0.0.1.
#
#   tests/bench/bench.sh [--clinics N] [--count M] [--size BYTES] [--queued Q]
#                        [--readers R] [--studies S] [--mixed-count M2]
#                        [--mixed-studies S2] [--scrape-rounds P]
#                        [--sections "raw e2e e2e-quiet backlog imaging mixed scrape"]
#
# In one run it measures (each measurement 3 times, a fresh broker and store
# for each run through medlinkd; medians are reported and every run printed,
# because the machine is shared and single runs swing by +-25%):
#   raw      the raw ZeroMQ DEALER->ROUTER ceiling for frames of --size bytes;
#   e2e      durable end to end: N clinics -> medlinkd (TLS 1.3, SQLite WAL with
#            synchronous=FULL, group commit, case tracking) -> one hospital that
#            acks, M referrals; the clinics take and ack the broker's DELIVERED
#            notices like agents. Messages/s, p50/p99 latency, peak broker RSS,
#            broker per-thread CPU, ratio to the raw ceiling;
#   e2e-quiet the same with notify_delivered = no in the broker's config, which
#            separates the cost of the DELIVERED notices from that of case
#            tracking;
#   backlog  broker memory with Q referrals queued for an offline hospital,
#            and after a restart that reloads them;
#   imaging  the raw ceiling for 256 KiB frames; the durable write ceiling of
#            the broker's data folder (256 KiB writes, one fdatasync per
#            8 MiB); N clinics sending S imaging studies (consult + 256 KiB
#            chunks, 8 MiB unanswered per clinic) through medlinkd to R reading
#            centres that verify every chunk's SHA-256. Imaging MB/s, ratios to
#            both ceilings, broker per-thread CPU and bytes written;
#   mixed    referrals, the hospital's ACCEPTED update for each, and imaging at
#            the same time (half the clinics each); each class's rate and
#            latency;
#   scrape   (only when asked for: --sections scrape) the cost of Prometheus
#            scraping: P pairs of e2e runs, one with GET /metrics every second
#            during the load and one without, alternating which goes first,
#            a fresh broker each; the median and the mean of the pairs'
#            throughput differences.
# Figures go to stdout and to tests/bench/results/last.txt. Exits non-zero
# if any run failed (a refusal, a lost message, a chunk failing its SHA-256).
set -euo pipefail

# shellcheck source=tests/bench/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
CLINICS=4
COUNT=200000
SIZE=1024
QUEUED=100000
READERS=2
STUDIES=32
MIXED_COUNT=100000
MIXED_STUDIES=16
SCRAPE_ROUNDS=5
SECTIONS="raw e2e e2e-quiet backlog imaging mixed"
while [ $# -gt 0 ]; do
    case "$1" in
    --clinics) CLINICS=$2; shift 2 ;;
    --count) COUNT=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --queued) QUEUED=$2; shift 2 ;;
    --readers) READERS=$2; shift 2 ;;
    --studies) STUDIES=$2; shift 2 ;;
    --mixed-count) MIXED_COUNT=$2; shift 2 ;;
    --mixed-studies) MIXED_STUDIES=$2; shift 2 ;;
    --scrape-rounds) SCRAPE_ROUNDS=$2; shift 2 ;;
    --sections) SECTIONS=$2; shift 2 ;;
    *) echo "bench.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
want() { case " $SECTIONS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

bench_build
bench_setup
bench_ports

if want raw; then
    echo "== raw ZeroMQ ceiling ($SIZE-byte frames), 3 runs"
    : >"$W/raw.all"
    for _ in 1 2 3; do "$BENCH" raw --size "$SIZE" --count 1000000 | tee -a "$W/raw.all"; done
fi

if want e2e; then
    echo "== durable end to end: $CLINICS clinics -> medlinkd -> 1 hospital, $COUNT x $SIZE B, 3 runs"
    : >"$W/e2e.all"
    PEAK=0
    for r in 1 2 3; do
        write_config "$W/data-e2e-$r"
        start_broker
        load "$W/e2e-$r.txt" e2e --count "$COUNT" --size "$SIZE"
        cat "$W/e2e-$r.txt" >>"$W/e2e.all"
        P=$(rss_kib "$BROKER_PID" VmHWM)
        [ "$P" -gt "$PEAK" ] && PEAK=$P
        echo "broker_threads_cpu_s $(thread_cpu "$BROKER_PID")" | tee -a "$W/e2e.all"
        stop_broker
        rm -rf "$W/data-e2e-$r"
    done
fi

if want e2e-quiet; then
    echo "== durable end to end without DELIVERED notices (notify_delivered = no), 3 runs"
    : >"$W/quiet.all"
    for r in 1 2 3; do
        write_config "$W/data-quiet-$r" no
        start_broker
        load "$W/quiet-$r.txt" e2e --count "$COUNT" --size "$SIZE" --no-notices
        cat "$W/quiet-$r.txt" >>"$W/quiet.all"
        echo "broker_threads_cpu_s $(thread_cpu "$BROKER_PID")" | tee -a "$W/quiet.all"
        stop_broker
        rm -rf "$W/data-quiet-$r"
    done
fi

if want backlog; then
    echo "== broker memory with $QUEUED messages queued for an offline hospital"
    write_config "$W/data2"
    start_broker
    load "$W/off.txt" e2e --count "$QUEUED" --size "$SIZE" --offline
    Q_RSS=$(rss_kib "$BROKER_PID" VmRSS)
    Q_HWM=$(rss_kib "$BROKER_PID" VmHWM)
    stop_broker
    echo "== restart with the backlog (queues reloaded from the store)"
    start_broker
    sleep 1
    R_RSS=$(rss_kib "$BROKER_PID" VmRSS)
    stop_broker
    rm -rf "$W/data2"
fi

if want imaging; then
    echo "== raw ZeroMQ ceiling (262144-byte frames), 3 runs"
    : >"$W/raw256.all"
    for _ in 1 2 3; do "$BENCH" raw --size 262144 --count 10000 | tee -a "$W/raw256.all"; done

    echo "== durable imaging: $CLINICS clinics -> medlinkd -> $READERS reading centres, $STUDIES studies;"
    echo "   each run preceded by the disk's durable write ceiling in the broker's data folder"
    : >"$W/disk.all"
    : >"$W/img.all"
    IMG_PEAK=0
    for r in 1 2 3; do
        mkdir -p "$W/data-img-$r"
        "$BENCH" disk --dir "$W/data-img-$r" --size 262144 --count 4096 --sync-bytes 8388608 |
            tee -a "$W/disk.all"
        write_config "$W/data-img-$r"
        start_broker
        load "$W/img-$r.txt" imaging --readers "$READERS" --studies "$STUDIES"
        cat "$W/img-$r.txt" >>"$W/img.all"
        P=$(rss_kib "$BROKER_PID" VmHWM)
        [ "$P" -gt "$IMG_PEAK" ] && IMG_PEAK=$P
        {
            echo "broker_threads_cpu_s $(thread_cpu "$BROKER_PID")"
            echo "broker_threads_write_bytes $(thread_wbytes "$BROKER_PID")"
            echo "broker_write_bytes $(proc_wbytes "$BROKER_PID")"
        } | tee -a "$W/img.all"
        stop_broker
        rm -rf "$W/data-img-$r"
    done
fi

if want mixed; then
    echo "== mixed: referrals + ACCEPTED updates + imaging at once, $MIXED_COUNT referrals," \
        "$MIXED_STUDIES studies, 3 runs"
    : >"$W/mix.all"
    for r in 1 2 3; do
        write_config "$W/data-mix-$r"
        start_broker
        load "$W/mix-$r.txt" mixed --count "$MIXED_COUNT" --size "$SIZE" --readers "$READERS" \
            --studies "$MIXED_STUDIES"
        cat "$W/mix-$r.txt" >>"$W/mix.all"
        echo "broker_threads_cpu_s $(thread_cpu "$BROKER_PID")" | tee -a "$W/mix.all"
        stop_broker
        rm -rf "$W/data-mix-$r"
    done
fi

if want scrape; then
    echo "== cost of scraping /metrics every second during e2e: $SCRAPE_ROUNDS pairs of runs," \
        "$COUNT x $SIZE B, alternating"
    : >"$W/scrape.all"
    # scraper OUT: GET /metrics once a second until killed; one line per
    # scrape ("ok BYTES" or "fail") in OUT.
    scraper() {
        while :; do
            if b=$(curl -sf --max-time 5 "http://127.0.0.1:$HTTP_PORT/metrics" | wc -c); then
                echo "ok $b" >>"$1"
            else
                echo "fail" >>"$1"
            fi
            sleep 1
        done
    }
    for r in $(seq 1 "$SCRAPE_ROUNDS"); do
        order="off on"
        [ $((r % 2)) -eq 0 ] && order="on off"
        : >"$W/scrapes-$r.txt"
        for mode in $order; do
            write_config "$W/data-scrape"
            start_broker
            SCRAPER=""
            if [ "$mode" = on ]; then
                scraper "$W/scrapes-$r.txt" &
                SCRAPER=$!
            fi
            load "$W/scrape-$r-$mode.txt" e2e --count "$COUNT" --size "$SIZE"
            if [ -n "$SCRAPER" ]; then kill "$SCRAPER"; wait "$SCRAPER" 2>/dev/null || true; fi
            echo "scrape_$mode $(vals delivered_per_s "$W/scrape-$r-$mode.txt")" | tee -a "$W/scrape.all"
            stop_broker
            rm -rf "$W/data-scrape"
        done
        echo "scrapes_ok $(grep -c '^ok' "$W/scrapes-$r.txt")" >>"$W/scrape.all"
        echo "scrapes_failed $(grep -c '^fail' "$W/scrapes-$r.txt")" >>"$W/scrape.all"
        echo "scrape_bytes $(awk '/^ok/ {b=$2} END {print b+0}' "$W/scrapes-$r.txt")" >>"$W/scrape.all"
    done
    # The same cost measured where the machine's other load cannot hide it:
    # the CPU time the broker's loop thread (which renders the page and
    # serves HTTP) spends on SCRAPE_N scrapes in a row, after one e2e run
    # (so its stores and counters are not empty), against the loop thread's
    # CPU per message during that run.
    SCRAPE_N=2000
    loop_ticks() { awk '{print $14 + $15}' "/proc/$1/task/$1/stat"; }
    write_config "$W/data-scrape"
    start_broker
    T0=$(loop_ticks "$BROKER_PID")
    load "$W/scrape-cpu.txt" e2e --count "$COUNT" --size "$SIZE"
    T1=$(loop_ticks "$BROKER_PID")
    curl -sf -o /dev/null "http://127.0.0.1:$HTTP_PORT/metrics?[1-$SCRAPE_N]"
    T2=$(loop_ticks "$BROKER_PID")
    HZ=$(getconf CLK_TCK)
    echo "loop_us_per_message $(awk -v t="$((T1 - T0))" -v hz="$HZ" -v n="$COUNT" 'BEGIN {printf "%.2f", 1e6 * t / hz / n}')" |
        tee -a "$W/scrape.all"
    echo "loop_us_per_scrape $(awk -v t="$((T2 - T1))" -v hz="$HZ" -v n="$SCRAPE_N" 'BEGIN {printf "%.1f", 1e6 * t / hz / n}')" |
        tee -a "$W/scrape.all"
    echo "scrape_cpu_run_per_s $(vals delivered_per_s "$W/scrape-cpu.txt")" | tee -a "$W/scrape.all"
    stop_broker
    rm -rf "$W/data-scrape"
fi

mkdir -p "$ROOT/tests/bench/results"
{
    echo "medlink benchmark $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nproc) cores"
    echo "command: tests/bench/bench.sh --clinics $CLINICS --count $COUNT --size $SIZE --queued $QUEUED" \
        "--readers $READERS --studies $STUDIES --mixed-count $MIXED_COUNT --mixed-studies $MIXED_STUDIES" \
        "--scrape-rounds $SCRAPE_ROUNDS" \
        "--sections \"$SECTIONS\""
    if want raw; then
        RAW=$(med raw_frames_per_s "$W/raw.all")
        echo "raw ZeroMQ DEALER->ROUTER ceiling, $SIZE B frames: median $RAW frames/s (runs: $(runs raw_frames_per_s "$W/raw.all"))"
    fi
    if want e2e; then
        DEL=$(med delivered_per_s "$W/e2e.all")
        echo "durable e2e delivered: median $DEL msg/s (runs: $(runs delivered_per_s "$W/e2e.all"))"
        want raw && echo "ratio of medians: $(pct "$DEL" "$RAW")% of the raw ceiling"
        echo "durable e2e accepted: median $(med accepted_per_s "$W/e2e.all") msg/s"
        echo "latency (median of runs): p50 $(med latency_p50_ms "$W/e2e.all") ms, p99 $(med latency_p99_ms "$W/e2e.all") ms"
        echo "duplicates seen by the hospital: $(sum duplicates_seen "$W/e2e.all"); refused: $(sum refused "$W/e2e.all")"
        echo "DELIVERED notices taken by the clinics: $(sum notices_delivered "$W/e2e.all") of $(sum notices_expected "$W/e2e.all")"
        echo "peak broker RSS during e2e: $((PEAK / 1024)) MiB"
        grep '^broker_threads_cpu_s' "$W/e2e.all" | sed 's/^/e2e /'
    fi
    if want e2e-quiet; then
        QDEL=$(med delivered_per_s "$W/quiet.all")
        echo "durable e2e without notices: median $QDEL msg/s (runs: $(runs delivered_per_s "$W/quiet.all"))"
        want raw && echo "ratio of medians without notices: $(pct "$QDEL" "$RAW")% of the raw ceiling"
        echo "latency without notices (median of runs): p50 $(med latency_p50_ms "$W/quiet.all") ms, p99 $(med latency_p99_ms "$W/quiet.all") ms"
        grep '^broker_threads_cpu_s' "$W/quiet.all" | sed 's/^/e2e-quiet /'
    fi
    if want backlog; then
        echo "broker RSS with $QUEUED queued for an offline node: $((Q_RSS / 1024)) MiB (peak $((Q_HWM / 1024)) MiB); after restart reloading them: $((R_RSS / 1024)) MiB"
    fi
    if want imaging; then
        RAW256=$(med raw_mb_per_s "$W/raw256.all")
        DISK=$(med disk_mb_per_s "$W/disk.all")
        IMG=$(med imaging_mb_per_s "$W/img.all")
        echo "raw ZeroMQ ceiling, 256 KiB frames: median $RAW256 MB/s (runs: $(runs raw_mb_per_s "$W/raw256.all"))"
        echo "disk durable write ceiling (256 KiB writes, fdatasync per 8 MiB): median $DISK MB/s (runs: $(runs disk_mb_per_s "$W/disk.all"))"
        echo "durable imaging, chunk payload delivered: median $IMG MB/s (runs: $(runs imaging_mb_per_s "$W/img.all"))"
        echo "durable imaging, chunk payload accepted: median $(med imaging_accepted_mb_per_s "$W/img.all") MB/s"
        echo "imaging / raw 256 KiB ceiling: $(pct "$IMG" "$RAW256")%; imaging / disk ceiling: $(pct "$IMG" "$DISK")%"
        echo "imaging latency (median of runs): chunk p50 $(med chunk_latency_p50_ms "$W/img.all") ms, p99 $(med chunk_latency_p99_ms "$W/img.all") ms; study p50 $(med study_latency_p50_ms "$W/img.all") ms"
        echo "imaging checks: sha_failures $(sum sha_failures "$W/img.all"), consult_mismatches $(sum consult_mismatches "$W/img.all"), chunk_errors $(sum chunk_errors "$W/img.all"), studies complete $(sum imaging_studies_complete "$W/img.all") of $(sum imaging_studies "$W/img.all"), retries $(sum retries "$W/img.all")"
        paste -d' ' <(vals imaging_chunk_bytes "$W/img.all") <(vals broker_write_bytes "$W/img.all") |
            awk '{printf "broker bytes written per chunk payload byte: %.2f\n", $2 / $1}'
        echo "peak broker RSS during imaging: $((IMG_PEAK / 1024)) MiB; load generator CPU: $(runs loadgen_cpu_s "$W/img.all")s"
        grep '^broker_threads_cpu_s' "$W/img.all" | sed 's/^/imaging /'
        grep '^broker_threads_write_bytes' "$W/img.all" | sed 's/^/imaging /'
    fi
    if want mixed; then
        echo "mixed (rates while all classes flow, median of runs): referrals $(med mixed_referrals_per_s "$W/mix.all")/s (runs: $(runs mixed_referrals_per_s "$W/mix.all")), ACCEPTED updates $(med mixed_updates_per_s "$W/mix.all")/s (runs: $(runs mixed_updates_per_s "$W/mix.all")), imaging $(med mixed_imaging_mb_per_s "$W/mix.all") MB/s (runs: $(runs mixed_imaging_mb_per_s "$W/mix.all"))"
        echo "mixed (each class over its own run): referrals $(med referrals_per_s "$W/mix.all")/s, updates $(med updates_per_s "$W/mix.all")/s, imaging $(med imaging_mb_per_s "$W/mix.all") MB/s"
        echo "mixed latency p50/p99 (median of runs): referral $(med referral_latency_p50_ms "$W/mix.all")/$(med referral_latency_p99_ms "$W/mix.all") ms, update $(med update_latency_p50_ms "$W/mix.all")/$(med update_latency_p99_ms "$W/mix.all") ms, chunk $(med chunk_latency_p50_ms "$W/mix.all")/$(med chunk_latency_p99_ms "$W/mix.all") ms, referral->ACCEPTED round trip $(med accept_roundtrip_p50_ms "$W/mix.all")/$(med accept_roundtrip_p99_ms "$W/mix.all") ms"
        echo "mixed checks: sha_failures $(sum sha_failures "$W/mix.all"), refused $(sum refused "$W/mix.all"), duplicates seen $(($(sum referral_duplicates_seen "$W/mix.all") + $(sum update_duplicates_seen "$W/mix.all")))"
        grep '^broker_threads_cpu_s' "$W/mix.all" | sed 's/^/mixed /'
    fi
    if want scrape; then
        OFF=$(med scrape_off "$W/scrape.all")
        ON=$(med scrape_on "$W/scrape.all")
        echo "e2e without scraping: median $OFF msg/s (runs: $(runs scrape_off "$W/scrape.all"))"
        echo "e2e with GET /metrics every second: median $ON msg/s (runs: $(runs scrape_on "$W/scrape.all"))"
        # Each pair ran back to back: its difference is the least disturbed
        # by the machine's other load.
        paste -d' ' <(vals scrape_off "$W/scrape.all") <(vals scrape_on "$W/scrape.all") |
            awk '{d = 100 * ($1 - $2) / $1; printf "%.1f\n", d}' >"$W/scrape.diff"
        echo "scraping cost per pair (% of throughput, negative: faster with scraping):" \
            "$(tr '\n' ' ' <"$W/scrape.diff")"
        echo "scraping cost: median of pairs $(median <"$W/scrape.diff")%, mean of pairs" \
            "$(awk '{s += $1} END {printf "%.1f", s / NR}' "$W/scrape.diff")%; ratio of medians" \
            "$(awk -v a="$OFF" -v b="$ON" 'BEGIN {printf "%.1f", 100 * (a - b) / a}')%"
        echo "scrapes: $(sum scrapes_ok "$W/scrape.all") answered, $(sum scrapes_failed "$W/scrape.all") failed;" \
            "page size $(vals scrape_bytes "$W/scrape.all" | tail -1) bytes"
        PM=$(vals loop_us_per_message "$W/scrape.all")
        PS=$(vals loop_us_per_scrape "$W/scrape.all")
        echo "broker loop thread CPU: $PS us per scrape ($SCRAPE_N in a row), $PM us per message" \
            "(e2e run at $(vals scrape_cpu_run_per_s "$W/scrape.all") msg/s); one scrape a second costs" \
            "$(awk -v s="$PS" 'BEGIN {printf "%.4f", s / 1e4}')% of the loop thread, the CPU of" \
            "$(awk -v s="$PS" -v m="$PM" 'BEGIN {printf "%.1f", s / m}') messages"
    fi
    echo "failed runs: $FAILS"
} | tee "$ROOT/tests/bench/results/last.txt"
[ "$FAILS" -eq 0 ]
