#!/usr/bin/env bash
# One command for every benchmark against peers (issue 8). Builds the release binaries, runs
#   1. protocol   REGION_READ/WRITE round trips, posted writes, WRITE_MULTI: ours vs the
#                 rust-vmm vfio-user example server                      (bench-proto)
#   2. core       ns and callgrind instructions per request: our vring core + blk engine vs
#                 rust-vmm virtio-queue                                   (bench-core)
#   3. scale      1, 4, 16 devices on one poller thread: idle CPU, IOPS and RSS per device
#                 (in-process, no guest)                                  (bench-scale)
#   4. guest blk  fio 4k randread/randwrite QD1/QD32, 1 and 2 jobs: ours (null, tmpfs file) vs
#                 QEMU's virtio-blk vs vhost-user-blk + qemu-storage-daemon (bench/guest-blk.sh)
#   5. guest net  iperf3 TCP both ways and 64-byte UDP: our virtio-net and AVF vs QEMU
#                 virtio-net on a tap                                     (tests/guest/bench-net.sh)
# and writes target/bench-report/: report.md (tables), *.png (plots), the raw data beside them.
#
# Usage: bench/run.sh [--quick] [--update-docs] [--only LIST] [--report-only]
#   --quick         short runs to check the setup, not for the docs (also QUICK=1): ~8 min
#   --only LIST     comma-separated stages: proto,core,scale,blk,net (default all); the other
#                   stages' data of the last run are kept, so one stage can be redone
#   --update-docs   copy report.md to docs/benchmarks.md and the plots to docs/bench/
#   --report-only   only redo report.md and the plots from the last run's data
# Needs root (guests, namespaces). Takes /tmp/emudev-guest.lock for each stage (one boot at a
# time on a shared machine): do not run it under that lock yourself. The default run takes
# about 25 minutes on a 2-core machine. Run lengths (environment): RUNS (3) runs per figure;
# RUNTIME (5) s per fio run, RAMP (1); NET_SECS (5) s per iperf3 run; CORE_REQUESTS (256000)
# per core run; CG_REQUESTS (32000); PROTO_OPS (20000) per protocol run; SCALE_IDLE (5) s;
# JOBS, CONFIGS, QUEUES: see bench/guest-blk.sh; BENCH_OUT_DIR (target/bench-report).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
UPDATE_DOCS=0 REPORT_ONLY=0 QUICK=${QUICK:-0} ONLY=proto,core,scale,blk,net KEEP=0
while [ $# -gt 0 ]; do
    case $1 in
        --update-docs) UPDATE_DOCS=1 ;;
        --report-only) REPORT_ONLY=1 ;;
        --quick) QUICK=1 ;;
        --only) ONLY=${2:?--only needs a list}; KEEP=1; shift ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "bench/run.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then
    RUNS=${RUNS:-1} RUNTIME=${RUNTIME:-2} RAMP=${RAMP:-1} NET_SECS=${NET_SECS:-2}
    CORE_REQUESTS=${CORE_REQUESTS:-32000} CG_REQUESTS=${CG_REQUESTS:-3200}
    PROTO_OPS=${PROTO_OPS:-2000} SCALE_IDLE=${SCALE_IDLE:-2} SCALE_BUSY=${SCALE_BUSY:-1}
    export JOBS=${JOBS:-randread-qd1-j1 randread-qd32-j2}
fi
RUNS=${RUNS:-3}
export RUNTIME=${RUNTIME:-5} RAMP=${RAMP:-1}
NET_SECS=${NET_SECS:-5}
CORE_REQUESTS=${CORE_REQUESTS:-256000}
CORE_BURST=${CORE_BURST:-32}
CG_REQUESTS=${CG_REQUESTS:-32000}
PROTO_OPS=${PROTO_OPS:-20000}
SCALE_IDLE=${SCALE_IDLE:-5}
SCALE_BUSY=${SCALE_BUSY:-2}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/release
OUT=${BENCH_OUT_DIR:-$ROOT/target/bench-report}
LOCK=${BENCH_LOCK:-/tmp/emudev-guest.lock}
T0=$(date +%s)
STAGE=0 NSTAGES=$(( $(tr ',' '\n' <<<"$ONLY" | grep -c .) + 2 ))

progress() { echo "[bench $(date +%H:%M:%S) +$(( ($(date +%s) - T0) / 60 ))m] $*"; }
stage() { STAGE=$((STAGE + 1)); progress "($STAGE/$NSTAGES) $*"; }
die() { progress "ERROR: $*"; exit 1; }
want() { case ",$ONLY," in *",$1,"*) return 0 ;; esac; return 1; }
# locked CMD...: run CMD holding the shared guest/benchmark lock (waits for other users; the
# wait is added to $OUT/lock-wait.txt so the report can tell it from the run time).
locked() {
    local t0=$EPOCHSECONDS fd rc
    exec {fd}>"$LOCK"; flock "$fd"
    echo $((EPOCHSECONDS - t0)) >>"$OUT/lock-wait.txt"
    "$@"; rc=$?
    flock -u "$fd"; exec {fd}>&-
    return $rc
}
# need_pkg COMMAND PACKAGE: install a Debian package when its command is missing.
need_pkg() {
    command -v "$1" >/dev/null && return 0
    progress "installing $2 (for $1)"
    apt-get install -y "$2" >/dev/null 2>&1 ||
        { apt-get update >/dev/null 2>&1 && apt-get install -y "$2" >/dev/null 2>&1; }
    command -v "$1" >/dev/null
}

report() {
    python3 bench/report.py "$OUT" || die "report generation failed"
    "$BIN/bench-plot" "$OUT/figures.tsv" "$OUT" >/dev/null || die "plotting failed"
    progress "report: $OUT/report.md, plots: $(cd "$OUT" && ls *.png 2>/dev/null | tr '\n' ' ')"
    if [ "$UPDATE_DOCS" = 1 ]; then
        mkdir -p docs/bench
        rm -f docs/bench/*.png
        cp "$OUT"/*.png docs/bench/ 2>/dev/null
        sed 's#(\([a-z0-9_-]*\.png\))#(bench/\1)#g' "$OUT/report.md" >docs/benchmarks.md
        progress "copied to docs/benchmarks.md and docs/bench/"
    fi
}

if [ "$REPORT_ONLY" = 1 ]; then
    [ -f "$OUT/machine.env" ] || die "no previous run in $OUT"
    [ -x "$BIN/bench-plot" ] || cargo build --release -p emudev-bench-plot >/dev/null 2>&1 || die "cannot build bench-plot"
    report; exit 0
fi
[ "$(id -u)" = 0 ] || die "needs root (guests and network namespaces)"
[ "$KEEP" = 1 ] || rm -rf "$OUT"
mkdir -p "$OUT"
ENV=$OUT/machine.env
KEEP_ENV=0
if [ "$KEEP" = 1 ] && [ -f "$ENV" ]; then
    # Keep the first run's description; record the rerun (report.py takes the last value of a key).
    KEEP_ENV=1
    echo "RERUN=$ONLY at $(date -u '+%H:%M'), commit $(git rev-parse --short HEAD 2>/dev/null)" >>"$ENV"
    rm -f "$OUT/lock-wait.txt"
else
    : >"$ENV"
fi
{
    echo "DATE=$(date -u '+%Y-%m-%d %H:%M')"
    echo "COMMIT=$(git rev-parse --short HEAD 2>/dev/null)$( [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo ' (+ uncommitted changes)')"
    echo "DIRTY=$(git status --porcelain --untracked-files=no 2>/dev/null | awk '{ print $2 }' | tr '\n' ' ')"
    echo "NPROC=$(nproc)"
    echo "CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    echo "MEM=$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"
    echo "HOST_KERNEL=$(uname -r)"
    echo "RUSTC=$(rustc --version)"
    echo "LOAD=$(cut -d' ' -f1-3 /proc/loadavg)"
    echo "QUICK=$QUICK"
    echo "RUNS=$RUNS"
} | { if [ "$KEEP_ENV" = 1 ]; then grep -E '^(QUICK|RUNS)='; else cat; fi; } >>"$ENV"

stage "setup: host packages, guest cache, release build into $TARGET"
need_pkg valgrind valgrind || progress "WARNING: no valgrind: no instruction counts"
if want blk; then need_pkg qemu-storage-daemon qemu-utils || die "no qemu-storage-daemon (apt-get install qemu-utils)"; fi
if want net; then need_pkg iperf3 iperf3 || die "no iperf3 on the host"; fi
if want blk || want net; then
    # Build the guest cache when it is missing (a fresh clone); refreshing an existing one is
    # `tests/guest/emudev-guest setup`, which the guest test suite runs.
    eval "$(tests/guest/emudev-guest env)"
    if [ ! -f "$GUEST_INITRAMFS" ] || [ ! -x "$GUEST_QEMU" ]; then
        progress "building the guest cache (tests/guest/emudev-guest setup, a few minutes)"
        locked tests/guest/emudev-guest setup >"$OUT/guest-setup.log" 2>&1 ||
            { tail -20 "$OUT/guest-setup.log"; die "guest cache setup failed"; }
    fi
fi
cargo build --release -p emudevd -p emudev-bench-core -p emudev-bench-plot >"$OUT/build.log" 2>&1 \
    || { tail -20 "$OUT/build.log"; die "build failed"; }

if want proto; then
    stage "protocol: ours vs rust-vmm vfio-user server, $RUNS x $PROTO_OPS messages per op"
    locked "$BIN/bench-proto" --ops "$PROTO_OPS" --runs "$RUNS" >"$OUT/proto.txt" 2>&1 \
        || { cat "$OUT/proto.txt"; progress "WARNING: protocol benchmark failed"; }
    sed 's/^/  /' "$OUT/proto.txt"
fi

if want core; then
    stage "core: $((RUNS * 2 + 1)) runs x $CORE_REQUESTS requests, ours vs virtio-queue, then callgrind"
    CORE_RUNS=$((RUNS * 2 + 1))
    echo "CORE_RUNS=$CORE_RUNS x $CORE_REQUESTS requests (+1 warm-up)" >>"$ENV"
    locked "$BIN/bench-core" --runs "$CORE_RUNS" --requests "$CORE_REQUESTS" \
        --burst "$CORE_BURST" >"$OUT/core.txt" 2>&1 || { cat "$OUT/core.txt"; die "bench-core failed"; }
    sed 's/^/  /' "$OUT/core.txt"
    if command -v valgrind >/dev/null; then
        # Instruction counts do not depend on load: no lock.
        printf 'mix\tside\trequests\tIr\n' >"$OUT/callgrind.tsv"
        for mix in read write ring; do
            for side in ours ref; do
                fn=emudev_bench_loop_$side; [ "$mix" = ring ] && fn=${fn}_ring
                f=$OUT/callgrind.$mix.$side.out
                valgrind --tool=callgrind --callgrind-out-file="$f" --collect-atstart=no \
                    --toggle-collect="$fn" "$BIN/bench-core" \
                    --mix "$mix" --requests "$CG_REQUESTS" --burst "$CORE_BURST" --runs 1 \
                    --warmup 0 --only "$side" >"$OUT/callgrind.$mix.$side.log" 2>&1 \
                    || die "callgrind run failed (see $OUT/callgrind.$mix.$side.log)"
                ir=$(sed -n 's/^totals: *//p' "$f" | cut -d' ' -f1)
                printf '%s\t%s\t%s\t%s\n' "$mix" "$side" "$CG_REQUESTS" "$ir" >>"$OUT/callgrind.tsv"
            done
        done
        column -t "$OUT/callgrind.tsv" | sed 's/^/  /'
    fi
fi

if want scale; then
    stage "scale: 1, 4, 16 devices on one poller (in-process), idle ${SCALE_IDLE}s, $RUNS x ${SCALE_BUSY}s busy"
    : >"$OUT/scale.txt"
    scale_all() {
        for n in 1 4 16; do
            "$BIN/bench-scale" --devices "$n" --idle-secs "$SCALE_IDLE" --busy-secs "$SCALE_BUSY" \
                --runs "$RUNS" >>"$OUT/scale.txt" 2>&1 || progress "WARNING: bench-scale --devices $n failed"
        done
    }
    locked scale_all
    sed 's/^/  /' "$OUT/scale.txt"
fi

if want blk; then
    ncfg=$(wc -w <<<"${CONFIGS:-ours-null ours-file qemu-file vhost-file}")
    stage "guest blk: $ncfg configurations, one boot each (lock held per boot), $RUNS x ${RUNTIME}s per job"
    rm -rf "$OUT/guest"; mkdir -p "$OUT/guest"
    RUNS=$RUNS ROUNDS=1 BIN=$BIN GUEST_LOCK=$LOCK bash bench/guest-blk.sh "$OUT/guest" \
        || { progress "WARNING: guest block benchmark incomplete; reporting the runs that finished"
             echo "GUEST_INCOMPLETE=1" >>"$ENV"; }
    first=$(ls "$OUT"/guest/*.console.log 2>/dev/null | head -1)
    if [ -n "$first" ]; then
        eval "$(tests/guest/emudev-guest env)"
        info=$(tr -d '\r' <"$first" | grep -a -m1 '^BENCH-INFO')
        {
            echo "ACCEL=$(sed -n 's/^emudev-guest: accel=//p' "$first" | head -1 | tr a-z A-Z)"
            echo "QEMU=$("$GUEST_QEMU" --version | head -1)"
            echo "QSD=$(qemu-storage-daemon --version 2>/dev/null | head -1)"
            echo "GUEST_KERNEL=$(sed -n 's/.*kernel=\([^ ]*\).*/\1/p' <<<"$info")"
            echo "FIO=$(sed -n 's/.*fio=\([^ ]*\).*/\1/p' <<<"$info")"
            echo "GUEST_CPUS=${GUEST_CPUS:-2} vCPUs, 1 GiB"
            echo "GUEST_RUNS=$RUNS x ${RUNTIME} s (+${RAMP} s ramp) per job, one boot per configuration"
            echo "FIO_DESC=bs=4k, direct=1, libaio, time_based ${RUNTIME} s, norandommap, group_reporting, on /dev/vda (${IMG_SIZE:-1G}), ${QUEUES:-2} queues per device"
        } >>"$ENV"
        [ -f "$OUT/guest/results.tsv" ] && column -t "$OUT/guest/results.tsv" | cut -c1-150 | sed 's/^/  /'
    fi
fi

if want net; then
    stage "guest net: our virtio-net and AVF vs QEMU virtio-net (tap, vhost=off), $RUNS rounds x ${NET_SECS}s"
    rm -rf "$OUT/net"; mkdir -p "$OUT/net"
    BIN=$BIN RUN_GUEST=$ROOT/tests/guest/boot.sh GUEST_LOGS=$OUT/net BENCH_OUT=$OUT/net \
        ROUNDS=$RUNS BENCH_SECS=$NET_SECS locked bash tests/guest/bench-net.sh >"$OUT/net/run.log" 2>&1 \
        || { progress "WARNING: guest net benchmark failed (see $OUT/net/run.log)"; echo "NET_INCOMPLETE=1" >>"$ENV"; }
    grep -E '^(ratio|server-cpu|BENCH-NOTE)' "$OUT/net/run.log" | sed 's/^/  /'
    echo "NET_RUNS=$RUNS rounds x ${NET_SECS} s per test, one boot, the NICs taking turns in each round" >>"$ENV"
fi

echo "LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$ENV"
waits=("$OUT/lock-wait.txt"); want blk && waits+=("$OUT/guest/lock-wait.txt")
waited=$(cat "${waits[@]}" 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
el=$(( $(date +%s) - T0 - waited ))
[ "$KEEP_ENV" = 1 ] && echo "ELAPSED_RERUN=$((el / 60)) min $((el % 60)) s ($ONLY)" >>"$ENV" ||
echo "ELAPSED=$((el / 60)) min $((el % 60)) s (plus $((waited / 60)) min $((waited % 60)) s waiting for other users of the guest lock)" >>"$ENV"
stage "report"
report
