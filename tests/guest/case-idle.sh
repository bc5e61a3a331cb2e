#!/usr/bin/env bash
# With our virtio-blk, virtio-net and AVF attached to one emudevd, their queues started by
# the guest's drivers and the guest then idle, the server stays under 2% of one core over
# 10 s: every poller sleeps on its eventfds instead of spinning.
. "$(dirname "$0")/lib.sh"
img=$WORKDIR/disk.img sock=$WORKDIR/blk.sock
truncate -s 64M "$img"
nsock=$WORKDIR/net.sock asock=$WORKDIR/avf.sock
start_server idle "$BIN/emudevd" --device "virtio-blk,socket=$sock,path=$img,num-queues=2" \
    --device "virtio-net,socket=$nsock,backend=switch,switch=sw0,mac=02:e0:de:00:1d:01" \
    --device "avf,socket=$asock,backend=switch,switch=sw0,mac=02:e0:de:00:1d:02,queue-pairs=2"
srv=${SERVER_PIDS[-1]}
wait_socket "$sock" && wait_socket "$nsock" && wait_socket "$asock" || exit 1
cat >"$WORKDIR/guest.sh" <<'GUEST'
#!/bin/sh
[ -b /dev/vda ] || exit 10
dd if=/dev/vda of=/dev/null bs=64k count=64 2>/dev/null   # some I/O first, then idle
# Bring every NIC up (iavf starts its queues only then) and wait for the AVF to get there.
n=0
for i in $(seq 100); do
    n=0
    for d in /sys/class/net/*; do
        [ "${d##*/}" = lo ] && continue
        ip link set "${d##*/}" up 2>/dev/null && n=$((n + 1))
    done
    [ $n -ge 2 ] && break
    sleep 0.2
done
[ $n -ge 2 ] || { echo "only $n NICs came up"; ls /sys/class/net; exit 11; }
sleep 2   # iavf finishes enabling queues after ifup returns; some link-local traffic
ip -br link
echo IDLE-START; sleep 12; echo IDLE-END
GUEST
console=$GUEST_LOGS/$CASE.console.log
: >"$console"
guest "$WORKDIR/guest.sh" --vfio-user "$sock" --vfio-user "$nsock" --vfio-user "$asock" >/dev/null 2>&1 &
gpid=$!
ticks() { awk '{ print $14 + $15 }' "/proc/$srv/stat"; }
for _ in $(seq 600); do grep -q IDLE-START "$console" 2>/dev/null && break; sleep 0.1; done
grep -q IDLE-START "$console" || { echo "guest never went idle"; wait $gpid; exit 1; }
sleep 1   # let the poller reach its sleep
threads() { for t in /proc/$srv/task/*; do echo "$(cat "$t/comm") $(awk '{ print $14 + $15 }' "$t/stat")"; done; }
t0=$(ticks); s0=$(date +%s.%N); th0=$(threads)
sleep 10
t1=$(ticks); s1=$(date +%s.%N); th1=$(threads)
echo "per-thread CPU ticks over the idle period (name before after):"
join <(echo "$th0" | sort) <(echo "$th1" | sort) | awk '$3 != $2'
wait $gpid; rc=$?
hz=$(getconf CLK_TCK)
pct=$(awk -v a="$t0" -v b="$t1" -v s0="$s0" -v s1="$s1" -v hz="$hz" 'BEGIN { printf "%.2f", (b - a) / hz / (s1 - s0) * 100 }')
echo "server CPU while the guest idles: $pct% of one core (over 10 s)"
[ "$rc" = 0 ] || { echo "guest failed rc=$rc"; exit 1; }
awk -v p="$pct" 'BEGIN { exit !(p < 2.0) }' || { echo "idle CPU too high"; exit 1; }
