#!/usr/bin/env bash
# With our virtio-blk attached and the guest idle, the server stays under 2% of one core
# over 10 s (the poller sleeps on its kick eventfd instead of spinning).
. "$(dirname "$0")/lib.sh"
img=$WORKDIR/disk.img sock=$WORKDIR/blk.sock
truncate -s 64M "$img"
start_server idle "$BIN/emudevd" --device "virtio-blk,socket=$sock,path=$img,num-queues=2"
srv=${SERVER_PIDS[-1]}
wait_socket "$sock" || exit 1
cat >"$WORKDIR/guest.sh" <<'GUEST'
#!/bin/sh
[ -b /dev/vda ] || exit 10
dd if=/dev/vda of=/dev/null bs=64k count=64 2>/dev/null   # some I/O first, then idle
echo IDLE-START; sleep 12; echo IDLE-END
GUEST
console=$GUEST_LOGS/$CASE.console.log
: >"$console"
guest "$WORKDIR/guest.sh" --vfio-user "$sock" >/dev/null 2>&1 &
gpid=$!
ticks() { awk '{ print $14 + $15 }' "/proc/$srv/stat"; }
for _ in $(seq 600); do grep -q IDLE-START "$console" 2>/dev/null && break; sleep 0.1; done
grep -q IDLE-START "$console" || { echo "guest never went idle"; wait $gpid; exit 1; }
sleep 1   # let the poller reach its sleep
t0=$(ticks); s0=$(date +%s.%N)
sleep 10
t1=$(ticks); s1=$(date +%s.%N)
wait $gpid; rc=$?
hz=$(getconf CLK_TCK)
pct=$(awk -v a="$t0" -v b="$t1" -v s0="$s0" -v s1="$s1" -v hz="$hz" 'BEGIN { printf "%.2f", (b - a) / hz / (s1 - s0) * 100 }')
echo "server CPU while the guest idles: $pct% of one core (over 10 s)"
[ "$rc" = 0 ] || { echo "guest failed rc=$rc"; exit 1; }
awk -v p="$pct" 'BEGIN { exit !(p < 2.0) }' || { echo "idle CPU too high"; exit 1; }
