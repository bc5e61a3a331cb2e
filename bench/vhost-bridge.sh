#!/usr/bin/env bash
# Benchmark hook for the vhost-user bridge (issue 10): in ONE guest boot (TCG), 4k fio on
#   builtin   emudevd virtio-blk, our built-in engine, raw file in /dev/shm
#   bridged   emudevd virtio-blk engine=vhost-user -> qemu-storage-daemon (file in /dev/shm)
#   qemu-vu   QEMU's own vhost-user-blk-pci -> a second qemu-storage-daemon (same kind of file)
# so the bridge is measured beside our engine and beside QEMU's vhost-user frontend under the
# same load. Disks are told apart by size. Standalone; the rest of bench/ is guest-blk.sh.
#
# Usage: bench/vhost-bridge.sh [OUTDIR]   (root; tests/guest/emudev-guest cache; emudevd in $BIN)
# Environment: BIN (default target/release), RUNTIME seconds per job (default 10),
#   JOBS (default "randread-1 randread-32 randwrite-1 randwrite-32": RW-IODEPTH),
#   QUEUES (default 2), CONFIGS (default "builtin bridged qemu-vu").
# Prints and writes OUTDIR/vhost-bridge.tsv: config job iops.
# Run it under the shared lock: flock /tmp/emudev-guest.lock bench/vhost-bridge.sh out/
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:-$ROOT/target/bench-vhost}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
BIN=${BIN:-$ROOT/target/release}
RUNTIME=${RUNTIME:-10}
JOBS=${JOBS:-randread-1 randread-32 randwrite-1 randwrite-32}
QUEUES=${QUEUES:-2}
CONFIGS=${CONFIGS:-builtin bridged qemu-vu}
QSD=${QSD:-$(command -v qemu-storage-daemon || true)}
die() { echo "vhost-bridge: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (the guest tooling does)"
[ -x "$BIN/emudevd" ] || die "no $BIN/emudevd (cargo build --release -p emudevd)"
[ -n "$QSD" ] && [ -x "$QSD" ] || die "no qemu-storage-daemon (Debian qemu-utils)"

WORK=$(mktemp -d /tmp/emudev-vhost-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in ${PIDS[@]+"${PIDS[@]}"}; do kill "$p" 2>/dev/null; done
    for p in ${PIDS[@]+"${PIDS[@]}"}; do wait "$p" 2>/dev/null; done
    rm -rf "$WORK" /dev/shm/emudev-vhost-bench-$$-*
}
trap cleanup EXIT
bg() { local log=$1; shift; "$@" >"$OUT/$log.log" 2>&1 & PIDS+=($!); }
wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.1; done; die "no socket $1"; }
qsd() { # qsd NAME IMG SOCK
    bg "$1" "$QSD" --blockdev "driver=file,node-name=f,filename=$2" \
        --export "type=vhost-user-blk,id=e,node-name=f,writable=on,num-queues=$QUEUES,addr.type=unix,addr.path=$3"
    wait_sock "$3"
}

# Distinct sizes identify the disks in the guest: MiB -> config.
declare -A MIB=([builtin]=512 [bridged]=520 [qemu-vu]=528)
args=()
for c in $CONFIGS; do
    img=/dev/shm/emudev-vhost-bench-$$-$c.img
    truncate -s "${MIB[$c]}M" "$img"
    case $c in
    builtin)
        bg emudevd-builtin "$BIN/emudevd" --device "virtio-blk,socket=$WORK/builtin.sock,path=$img,num-queues=$QUEUES"
        wait_sock "$WORK/builtin.sock"; args+=(--vfio-user "$WORK/builtin.sock") ;;
    bridged)
        qsd qsd-bridged "$img" "$WORK/qsd-bridged.sock"
        bg emudevd-bridged "$BIN/emudevd" --device "virtio-blk,socket=$WORK/bridged.sock,engine=vhost-user,path=$WORK/qsd-bridged.sock"
        wait_sock "$WORK/bridged.sock"; args+=(--vfio-user "$WORK/bridged.sock") ;;
    qemu-vu)
        qsd qsd-qemu "$img" "$WORK/qsd-qemu.sock"
        args+=(--qemu-arg -chardev --qemu-arg "socket,id=vu0,path=$WORK/qsd-qemu.sock"
               --qemu-arg -device --qemu-arg "vhost-user-blk-pci,chardev=vu0,num-queues=$QUEUES") ;;
    *) die "unknown config $c" ;;
    esac
done

cat >"$WORK/guest.sh" <<GUEST
#!/bin/sh
for d in /sys/block/vd*; do
    n=\$(basename \$d); mib=\$(( \$(cat \$d/size) / 2048 ))
    case \$mib in 512) c=builtin;; 520) c=bridged;; 528) c=qemu-vu;; *) continue;; esac
    for j in $JOBS; do
        rw=\${j%-*}; qd=\${j#*-}
        iops=\$(fio --name=b --filename=/dev/\$n --direct=1 --ioengine=libaio --rw=\$rw --bs=4k \
            --iodepth=\$qd --runtime=$RUNTIME --time_based --size=256M --group_reporting \
            --output-format=terse --terse-version=3 | awk -F';' '{ print \$8 + \$49 }')
        echo "BENCH \$c \$j \$iops"
    done
done
GUEST
eval "$(tests/guest/emudev-guest env)"
tests/guest/boot.sh --script "$WORK/guest.sh" --timeout 1800 --log "$OUT/console.log" \
    --mem 1G ${args[@]+"${args[@]}"} || die "guest failed (see $OUT/console.log)"
printf 'config\tjob\tiops\n' >"$OUT/vhost-bridge.tsv"
grep -a '^BENCH ' "$OUT/console.log" | tr -d '\r' | awk '{ printf "%s\t%s\t%s\n", $2, $3, $4 }' >>"$OUT/vhost-bridge.tsv"
column -t "$OUT/vhost-bridge.tsv"
