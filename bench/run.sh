#!/usr/bin/env bash
# One command for the virtio-blk benchmarks: builds (release), runs the vring-core benchmark
# (wall clock and callgrind) and the guest fio benchmark, and writes
# target/bench-report/report.md (plus the raw data beside it).
#
# Usage: bench/run.sh [--update-docs] [--skip-core] [--skip-guest] [--quick] [--report-only]
#   --update-docs   copy the report to docs/benchmarks.md
#   --report-only   only regenerate report.md from the data of the last run (e.g. after
#                   editing bench/notes.md)
#   --quick         short runs to check the setup (not for the docs): 3 s fio, 1 run, 2 jobs
# Run lengths (environment):
#   CORE_RUNS (7), CORE_REQUESTS (256000 per run), CORE_BURST (32), CG_REQUESTS (32000)
#   RUNTIME (10 s per fio run), RAMP (2), RUNS (5), JOBS, CONFIGS, IMG_SIZE: see bench/guest-blk.sh
#   ROUNDS (RUNS: configurations take turns, one boot per configuration per round)
# Defaults take about 22 minutes on a 2-core machine (the guest part about 19).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
UPDATE_DOCS=0 CORE=1 GUEST=1 REPORT_ONLY=0
for a in "$@"; do
    case $a in
        --update-docs) UPDATE_DOCS=1 ;;
        --skip-core) CORE=0 ;;
        --skip-guest) GUEST=0 ;;
        --report-only) REPORT_ONLY=1 ;;
        --quick) export RUNTIME=3 RAMP=1 RUNS=1 JOBS="randread-qd32 randread-qd1"
                 CORE_RUNS=${CORE_RUNS:-3} CG_REQUESTS=${CG_REQUESTS:-3200} ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "bench/run.sh: unknown option $a" >&2; exit 2 ;;
    esac
done
CORE_RUNS=${CORE_RUNS:-7}
CORE_REQUESTS=${CORE_REQUESTS:-256000}
CORE_BURST=${CORE_BURST:-32}
CG_REQUESTS=${CG_REQUESTS:-32000}
export RUNTIME=${RUNTIME:-10} RAMP=${RAMP:-2} RUNS=${RUNS:-5}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$ROOT/target/bench-report
T0=$(date +%s)

progress() { echo "[bench $(date +%H:%M:%S)] $*"; }
die() { progress "ERROR: $*"; exit 1; }

if [ "$REPORT_ONLY" = 1 ]; then
    [ -f "$OUT/machine.env" ] || die "no previous run in $OUT"
    python3 bench/report.py "$OUT" || die "report generation failed"
    progress "report: $OUT/report.md"
    [ "$UPDATE_DOCS" = 1 ] && cp "$OUT/report.md" docs/benchmarks.md && progress "copied to docs/benchmarks.md"
    exit 0
fi
rm -rf "$OUT"
mkdir -p "$OUT"
ENV=$OUT/machine.env
{
    echo "DATE=$(date -u '+%Y-%m-%d %H:%M')"
    echo "COMMIT=$(git rev-parse --short HEAD 2>/dev/null)$( [ -n "$(git status --porcelain 2>/dev/null)" ] && echo ' (+ uncommitted changes)')"
    echo "NPROC=$(nproc)"
    echo "CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
    echo "HOST_KERNEL=$(uname -r)"
    echo "RUSTC=$(rustc --version)"
    echo "LOAD=$(cut -d' ' -f1-3 /proc/loadavg)"
} >"$ENV"

progress "building release binaries (emudevd, bench-core) into $TARGET"
cargo build --release -p emudevd -p emudev-bench-core >"$OUT/build.log" 2>&1 \
    || { tail -20 "$OUT/build.log"; die "build failed"; }

if [ "$CORE" = 1 ]; then
    progress "core: $CORE_RUNS runs x $CORE_REQUESTS requests, ours vs virtio-queue"
    "$TARGET/release/bench-core" --runs "$CORE_RUNS" --requests "$CORE_REQUESTS" \
        --burst "$CORE_BURST" >"$OUT/core.txt" 2>&1 || { cat "$OUT/core.txt"; die "bench-core failed"; }
    sed 's/^/  /' "$OUT/core.txt"
    echo "CORE_RUNS=$CORE_RUNS x $CORE_REQUESTS requests (+1 warm-up)" >>"$ENV"
    if command -v valgrind >/dev/null; then
        printf 'mix\tside\trequests\tIr\n' >"$OUT/callgrind.tsv"
        for mix in read write ring; do
            for side in ours ref; do
                fn=emudev_bench_loop_$side; [ "$mix" = ring ] && fn=${fn}_ring
                progress "callgrind: $mix, $side ($CG_REQUESTS requests)"
                f=$OUT/callgrind.$mix.$side.out
                valgrind --tool=callgrind --callgrind-out-file="$f" --collect-atstart=no \
                    --toggle-collect="$fn" "$TARGET/release/bench-core" \
                    --mix "$mix" --requests "$CG_REQUESTS" --burst "$CORE_BURST" --runs 1 \
                    --warmup 0 --only "$side" >"$OUT/callgrind.$mix.$side.log" 2>&1 \
                    || die "callgrind run failed (see $OUT/callgrind.$mix.$side.log)"
                ir=$(sed -n 's/^totals: *//p' "$f" | cut -d' ' -f1)
                printf '%s\t%s\t%s\t%s\n' "$mix" "$side" "$CG_REQUESTS" "$ir" >>"$OUT/callgrind.tsv"
            done
        done
        column -t "$OUT/callgrind.tsv" | sed 's/^/  /'
    else
        progress "valgrind missing (apt-get install valgrind): no instruction counts"
    fi
fi

if [ "$GUEST" = 1 ]; then
    progress "guest: fio in a TCG guest, configs ${CONFIGS:-ours-null ours-file qemu-file}"
    BIN=$TARGET/release bash bench/guest-blk.sh "$OUT/guest" \
        || { progress "WARNING: guest benchmark incomplete; reporting the runs that finished"
             echo "GUEST_INCOMPLETE=1" >>"$ENV"; }
    H=${HARNESS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/emudev-harness}
    first=$(ls "$OUT"/guest/*.console.log 2>/dev/null | head -1)
    ROUNDS=${ROUNDS:-$RUNS}
    {
        echo "ACCEL=$(sed -n 's/^run-guest: accel=//p' "$first" | head -1 | tr a-z A-Z)"
        echo "QEMU=$("$H/bin/qemu-system-x86_64" --version | head -1)"
        info=$(tr -d '\r' <"$first" | grep -a -m1 '^BENCH-INFO')
        echo "GUEST_KERNEL=$(sed -n 's/.*kernel=\([^ ]*\).*/\1/p' <<<"$info")"
        echo "FIO=$(sed -n 's/.*fio=\([^ ]*\).*/\1/p' <<<"$info")"
        echo "GUEST_CPUS=${GUEST_CPUS:-2} vCPUs (MTTCG), 1 GiB"
        echo "GUEST_RUNS=$RUNS x ${RUNTIME} s (+${RAMP} s ramp), in $ROUNDS rounds: each round boots every configuration once, in turn"
        echo "FIO_DESC=4k, direct=1, libaio, numjobs=1, time_based ${RUNTIME} s, norandommap, on /dev/vda (${IMG_SIZE:-1G})"
        echo "LOAD=$(cut -d' ' -f1-3 /proc/loadavg) (after; before: $(sed -n 's/^LOAD=//p' "$ENV" | head -1))"
    } >>"$ENV"
    sed 's/^/  /' "$OUT/guest/results.tsv" | column -t
fi

echo "ELAPSED=$(( ($(date +%s) - T0) / 60 )) min $(( ($(date +%s) - T0) % 60 )) s" >>"$ENV"
python3 bench/report.py "$OUT" || die "report generation failed"
progress "report: $OUT/report.md"
if [ "$UPDATE_DOCS" = 1 ]; then
    cp "$OUT/report.md" docs/benchmarks.md
    progress "copied to docs/benchmarks.md"
fi
