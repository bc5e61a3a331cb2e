#!/usr/bin/env bash
# Guest fio benchmark: 4k random I/O from a real Linux guest (TCG) against
#   ours-null   emudevd virtio-blk over vfio-user, null backend
#   ours-file   emudevd virtio-blk over vfio-user, raw file in tmpfs (/dev/shm), buffered
#   qemu-file   QEMU's built-in virtio-blk-pci on the same file (cache=writeback, aio=threads)
#   vhost-file  QEMU vhost-user-blk-pci served by qemu-storage-daemon's vhost-user-blk export
#               of the same file (the standard out-of-process path)
# Every configuration has QUEUES queues (default 2, one per vCPU: QEMU's own default).
# The configurations take turns: ROUNDS rounds, each booting every configuration once, and each
# boot runs every job RUNS/ROUNDS times, so load from other users of the machine falls on all
# configurations alike (ROUNDS=1: one boot per configuration runs all runs). fio's JSON comes back on the
# console and is parsed on the host. While each job runs, the host samples CPU time of the
# server process (ours or qemu-storage-daemon) and of QEMU from /proc/PID/stat.
#
# Usage: bench/guest-blk.sh OUTDIR   (root; the guest cache of tests/guest/emudev-guest, and
#                                     release emudevd in $BIN)
# Environment (all optional):
#   BIN          directory with emudevd             (default target/release)
#   RUNTIME      seconds per fio run                (default 10)
#   RAMP         fio ramp_time seconds              (default 2)
#   RUNS         runs per job                       (default 3)
#   ROUNDS       boots per configuration, taking turns (default 1; must divide RUNS)
#   JOBS         jobs, RW-qdN-jM (M fio jobs, group reporting)
#                (default: randread and randwrite, QD1 and QD32, 1 and 2 jobs)
#   CONFIGS      configurations                     (default "ours-null ours-file qemu-file vhost-file")
#   QUEUES       virtqueues per device              (default 2)
#   IMG_SIZE     size of the tmpfs image / null disk (default 1G)
#   GUEST_CPUS   guest vCPUs                        (default 2)
#   SERVER_ARGS  extra emudevd --device options, e.g. ",queue-size=256" (default none)
#   SERVER_WRAP  command prefix for emudevd, e.g. "chrt -f 1" or "taskset -c 1" (default none)
#   GUEST_LOCK   a lock file to hold (flock) during each boot, e.g. /tmp/emudev-guest.lock
# Writes OUTDIR/results.tsv (config job run iops lat_mean_us lat_p50_us lat_p99_us guest_usr
# guest_sys secs server_cpu_s qemu_cpu_s, then our server's counters over the job when it has a
# control socket: srv_requests kicks interrupts iterations sleeps poller_cpu_s; other_guests: QEMU
# processes not ours seen at the job's start or end), OUTDIR/<config>.*.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:?usage: bench/guest-blk.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BIN=${BIN:-$ROOT/target/release}
RUNTIME=${RUNTIME:-10}
RAMP=${RAMP:-2}
RUNS=${RUNS:-3}
ROUNDS=${ROUNDS:-1}
PER_BOOT=$((RUNS / ROUNDS))
JOBS=${JOBS:-randread-qd1-j1 randread-qd32-j1 randwrite-qd1-j1 randwrite-qd32-j1 randread-qd1-j2 randread-qd32-j2 randwrite-qd1-j2 randwrite-qd32-j2}
CONFIGS=${CONFIGS:-ours-null ours-file qemu-file vhost-file}
QUEUES=${QUEUES:-2}
IMG_SIZE=${IMG_SIZE:-1G}
GUEST_CPUS=${GUEST_CPUS:-2}
SERVER_ARGS=${SERVER_ARGS:-}
QSD=${QSD:-qemu-storage-daemon}
read -r -a WRAP <<<"${SERVER_WRAP:-}"
GUEST_TOOL=$ROOT/tests/guest/emudev-guest
TICK=$(getconf CLK_TCK)

log() { echo "[guest-blk $(date +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (the guest tooling does)"
[ -x "$BIN/emudevd" ] || die "no $BIN/emudevd (build with cargo build --release -p emudevd)"
eval "$("$GUEST_TOOL" env)" || die "tests/guest/emudev-guest env failed"
[ -x "$GUEST_QEMU" ] && [ -f "$GUEST_INITRAMFS" ] || die "guest cache not set up (tests/guest/emudev-guest setup)"
case " $CONFIGS " in *" vhost-file "*)
    command -v "$QSD" >/dev/null || die "no $QSD (apt-get install qemu-utils) for the vhost-file configuration" ;;
esac

WORK=$(mktemp -d /tmp/emudev-bench.XXXXXX)
IMG=/dev/shm/emudev-bench-$$.img
SRV=""
cleanup() {
    [ -n "$SRV" ] && kill "$SRV" 2>/dev/null && wait "$SRV" 2>/dev/null
    rm -rf "$WORK" "$IMG"
}
# stop_server: end the server of the last configuration (ours or qemu-storage-daemon).
stop_server() {
    [ -n "$SRV" ] || return 0
    kill "$SRV" 2>/dev/null; wait "$SRV" 2>/dev/null; SRV=""
}
trap cleanup EXIT

# cpu_ticks PID: utime+stime of all threads (fields 14 and 15 of /proc/PID/stat), 0 if gone.
cpu_ticks() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    s=${s##*) }                       # drop "pid (comm) ", comm may contain spaces
    set -- $s
    echo $(( ${12} + ${13} ))
}

# qemu_pid ROOTPID: the QEMU process below ROOTPID (emudev-guest -> ld.so qemu).
qemu_pid() {
    local p kids
    for p in $(pgrep -P "$1"); do
        if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q 'qemu-system'; then
            # The wrapper execs the loader, so this is QEMU unless it is `timeout`.
            if [ "$(cat "/proc/$p/comm" 2>/dev/null)" != timeout ]; then echo "$p"; return; fi
        fi
        kids=$(qemu_pid "$p")
        [ -n "$kids" ] && { echo "$kids"; return; }
    done
}

# other_guests OURPID: QEMU processes running besides ours (another engineer's guest skews us).
other_guests() {
    local n=0 p
    for p in $(pgrep -f 'qemu-system'); do
        [ "$p" = "$1" ] && continue
        [ "$(cat "/proc/$p/comm" 2>/dev/null)" = timeout ] && continue
        tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -q -- '-kernel' && n=$((n + 1))
    done
    echo $n
}

# Wait (up to 2 min) for other engineers' guests to finish; after that go on: the runs record
# the overlap (other_guests) and the report names them.
wait_for_quiet() {
    local n=0
    while [ "$(other_guests 0)" != 0 ]; do
        [ $((n % 30)) = 0 ] && log "another guest is running; waiting for it to finish"
        n=$((n + 1)); [ $n -gt 120 ] && { log "another guest still runs after 2 min; going on (recorded)"; return 0; }
        sleep 1
    done
}

# write_guest_script FIRST_RUN: runs FIRST_RUN .. FIRST_RUN+PER_BOOT-1 of every job.
write_guest_script() {
    cat >"$WORK/guest.sh" <<GUEST
#!/bin/sh
dev=/dev/vda
[ -b \$dev ] || { echo "BENCH-ERROR no \$dev"; ls /sys/block; exit 10; }
echo "BENCH-INFO kernel=\$(uname -r) fio=\$(fio --version) sectors=\$(cat /sys/block/vda/size) sched=\$(cat /sys/block/vda/queue/scheduler | tr ' ' _) queues=\$(ls /sys/block/vda/mq | wc -l) nproc=\$(nproc)"
for job in $JOBS; do
    rw=\${job%%-qd*}; qd=\${job#*-qd}; qd=\${qd%%-j*}; nj=1
    case \$job in *-j*) nj=\${job##*-j} ;; esac
    r=$1
    while [ \$r -lt $(($1 + PER_BOOT)) ]; do
        echo "BENCH-BEGIN \$job \$r"
        fio --name=\$job --filename=\$dev --direct=1 --ioengine=libaio --rw=\$rw --bs=4k \
            --iodepth=\$qd --numjobs=\$nj --group_reporting --time_based --runtime=$RUNTIME --ramp_time=$RAMP \
            --norandommap --randrepeat=0 --lat_percentiles=1 --output-format=json --output=/tmp/fio.json \
            >/tmp/fio.err 2>&1
        rc=\$?
        echo "BENCH-END \$job \$r"
        if [ \$rc != 0 ]; then echo "BENCH-ERROR fio rc \$rc"; cat /tmp/fio.err; exit 11; fi
        echo "FIO-JSON-BEGIN \$job \$r"
        cat /tmp/fio.json
        echo "FIO-JSON-END \$job \$r"
        r=\$((r + 1))
    done
done
grep -E 'virtio|vfio|CPU' /proc/interrupts | sed 's/^/BENCH-IRQ /'
echo "BENCH-DONE"
GUEST
}

# run_config NAME ROUND: one boot, all jobs. Appends to results.tsv.
run_config() {
    local cfg=$1 console=$OUT/$1.$2.console.log marks=$WORK/$1.$2.marks sock=$WORK/$1.sock
    local args=() srvpid="" ctl=$WORK/$1.ctl ctlarg=()
    # grep reads all of --help: with -q it could exit first and, under pipefail, emudevd's
    # SIGPIPE would fail the test at random.
    "$BIN/emudevd" --help 2>&1 | grep -- '--control' >/dev/null && ctlarg=(--control "$ctl")
    rm -f "$console" "$marks"
    case $cfg in
        ours-null)
            RUST_LOG=${RUST_LOG:-warn} ${WRAP[@]+"${WRAP[@]}"} "$BIN/emudevd" ${ctlarg[@]+"${ctlarg[@]}"} --device \
                "virtio-blk,socket=$sock,backend=null,size=$IMG_SIZE,num-queues=$QUEUES$SERVER_ARGS" \
                >"$OUT/$cfg.$2.server.log" 2>&1 &
            SRV=$!; srvpid=$SRV; args=(--vfio-user "$sock") ;;
        ours-file)
            RUST_LOG=${RUST_LOG:-warn} ${WRAP[@]+"${WRAP[@]}"} "$BIN/emudevd" ${ctlarg[@]+"${ctlarg[@]}"} --device \
                "virtio-blk,socket=$sock,path=$IMG,num-queues=$QUEUES$SERVER_ARGS" \
                >"$OUT/$cfg.$2.server.log" 2>&1 &
            SRV=$!; srvpid=$SRV; args=(--vfio-user "$sock") ;;
        qemu-file)
            args=(--qemu-arg -drive --qemu-arg "file=$IMG,if=none,id=d0,format=raw,cache=writeback,aio=threads"
                  --qemu-arg -device --qemu-arg "virtio-blk-pci,drive=d0,disable-legacy=on,num-queues=$QUEUES") ;;
        vhost-file)
            # Same file, same cache mode as QEMU's own (page cache, thread pool AIO).
            "$QSD" --blockdev "driver=file,node-name=file0,filename=$IMG,cache.direct=off,aio=threads" \
                --export "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path=$sock,writable=on,num-queues=$QUEUES" \
                >"$OUT/$cfg.$2.server.log" 2>&1 &
            SRV=$!; srvpid=$SRV
            for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
            [ -S "$sock" ] || { log "$cfg: qemu-storage-daemon did not listen"; cat "$OUT/$cfg.$2.server.log" >&2; stop_server; return 1; }
            args=(--qemu-arg -chardev --qemu-arg "socket,id=vu0,path=$sock"
                  --qemu-arg -device --qemu-arg "vhost-user-blk-pci,chardev=vu0,num-queues=$QUEUES,disable-legacy=on") ;;
        *) die "unknown config $cfg" ;;
    esac
    log "$cfg: round $2/$ROUNDS: booting guest ($JOBS; $PER_BOOT x ${RUNTIME}s each)"
    write_guest_script $(( (${2} - 1) * PER_BOOT + 1 ))
    local budget=$(( $(wc -w <<<"$JOBS") * PER_BOOT * (RUNTIME + RAMP + 15) + 180 ))
    "$GUEST_TOOL" boot --script "$WORK/guest.sh" --log "$console" --cpus "$GUEST_CPUS" \
        --timeout "$budget" "${args[@]}" >/dev/null 2>"$OUT/$cfg.$2.run-guest.err" &
    local rg=$!
    # Watch the console: sample CPU times at each BEGIN/END marker.
    local qpid="" line
    while [ ! -e "$console" ] && kill -0 "$rg" 2>/dev/null; do sleep 0.1; done
    tail -n +1 --pid="$rg" -F "$console" 2>/dev/null | while IFS= read -r line; do
        line=${line%$'\r'}
        case $line in
            BENCH-BEGIN*|BENCH-END*)
                [ -n "$qpid" ] || qpid=$(qemu_pid "$rg")
                t=$EPOCHREALTIME st=0 qt=0 cs="- - - - - -"
                [ -n "$srvpid" ] && st=$(cpu_ticks "$srvpid")
                [ -n "$qpid" ] && qt=$(cpu_ticks "$qpid")
                [ -S "$ctl" ] && cs=$(python3 "$ROOT/bench/emudev_stats.py" "$ctl")
                echo "$line $t $st $qt $cs $(other_guests "$qpid")" >>"$marks"
                case $line in BENCH-END*) log "$cfg: done ${line#BENCH-END }" ;; esac ;;
            BENCH-ERROR*) log "$cfg: $line" ;;
        esac
    done
    wait "$rg"; local rc=$?
    if [ -n "$srvpid" ]; then
        log "$cfg: server total CPU $(awk -v t="$(cpu_ticks "$srvpid")" -v k="$TICK" 'BEGIN{printf "%.1f s", t/k}')"
        stop_server
    fi
    [ "$rc" = 0 ] || { log "$cfg: guest failed (rc $rc); see $console"; tail -20 "$console" >&2; return 1; }
    python3 "$ROOT/bench/parse_fio.py" "$cfg" "$console" "$marks" "$TICK" >>"$OUT/results.tsv" \
        || { log "$cfg: could not parse results"; return 1; }
}

[ -n "$(find /dev/shm -maxdepth 0 -type d)" ] || die "no /dev/shm"
truncate -s "$IMG_SIZE" "$IMG"
# Allocate every page so reads hit real tmpfs pages rather than holes, for both sides.
fallocate -l "$IMG_SIZE" "$IMG" 2>/dev/null || dd if=/dev/zero of="$IMG" bs=1M count="$(( $(stat -c %s "$IMG") >> 20 ))" conv=notrunc status=none
[ "$ROUNDS" -ge 1 ] && [ $((RUNS % ROUNDS)) = 0 ] || die "ROUNDS ($ROUNDS) must divide RUNS ($RUNS)"
printf 'config\tjob\trun\tiops\tlat_mean_us\tlat_p50_us\tlat_p99_us\tguest_usr\tguest_sys\tsecs\tserver_cpu_s\tqemu_cpu_s\tsrv_requests\tkicks\tinterrupts\titerations\tsleeps\tpoller_cpu_s\tother_guests\n' >"$OUT/results.tsv"
fails=0
for round in $(seq "$ROUNDS"); do
    for cfg in $CONFIGS; do
        wait_for_quiet
        echo "$cfg round $round before: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/load.txt"
        if [ -n "${GUEST_LOCK:-}" ]; then
            # One boot at a time on a shared machine: hold the lock for this boot only.
            t0=$EPOCHSECONDS
            exec {lfd}>"$GUEST_LOCK"; flock "$lfd"
            echo $((EPOCHSECONDS - t0)) >>"$OUT/lock-wait.txt"
            run_config "$cfg" "$round" || fails=$((fails + 1))
            flock -u "$lfd"; exec {lfd}>&-
        else
            run_config "$cfg" "$round" || fails=$((fails + 1))
        fi
        echo "$cfg round $round after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/load.txt"
    done
done
[ "$fails" = 0 ] || die "$fails configuration(s) failed"
log "results in $OUT/results.tsv"
