#!/usr/bin/env bash
# QEMU killed with SIGKILL mid-fio (issue #9). emudevd serves a disk; the guest writes a
# marker with fsync, then runs fio with verify until QEMU is killed. Asserts: emudevd stays
# up, frees the dead client's fds and guest-RAM mappings (/proc/PID/fd and /proc/PID/maps
# back to what they were before QEMU connected), the acknowledged marker is in the image,
# and a fresh QEMU is served on the same socket (fio with verify passes).
. "$(dirname "$0")/lib.sh"
ctl=$WORKDIR/control.sock sock=$WORKDIR/vda.sock img=$WORKDIR/vda.img
truncate -s 64M "$img"
start_server daemon "$BIN/emudevd" --control "$ctl" \
    --device "virtio-blk,id=vda,socket=$sock,path=$img,num-queues=2"
dpid=${SERVER_PIDS[-1]}
wait_socket "$sock" || exit 1
wait_socket "$ctl" || exit 1
fds() { ls "/proc/$dpid/fd" | wc -l; }
ram_maps() { grep -c memfd: "/proc/$dpid/maps"; }
fds_idle=$(fds)
echo "emudevd fds before QEMU: $fds_idle, guest RAM mappings: $(ram_maps)"

cat >"$WORKDIR/guest1.sh" <<'GUEST'
#!/bin/sh
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 10; }
printf 'EMUDEV-KILL-MARKER' | dd of=/dev/vda bs=512 seek=120000 conv=fsync 2>/dev/null || exit 11
echo "MARKER-WRITTEN"
n=0
while :; do
    fio --name=v --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite --bs=4k \
        --iodepth=16 --numjobs=2 --size=8M --offset_increment=16M --verify=crc32c \
        --verify_fatal=1 --do_verify=1 --group_reporting >/tmp/fio.out 2>&1 ||
        { cat /tmp/fio.out; exit 12; }
    n=$((n + 1)); echo "FIO-PASS $n"
done
GUEST
console=$GUEST_LOGS/$CASE.console.log
: >"$console"
# The boot tool itself in the background (not the guest() function in a subshell), so that
# killing $gpid stops QEMU too; cleanup kills it with the servers.
"$RUN_GUEST" --script "$WORKDIR/guest1.sh" --timeout 600 --log "$console" --vfio-user "$sock" &
gpid=$!
SERVER_PIDS+=($gpid)
for _ in $(seq 4000); do grep -q "FIO-PASS 1" "$console" && break; kill -0 $gpid 2>/dev/null || break; sleep 0.1; done
grep -q "FIO-PASS 1" "$console" || { echo "FAIL: fio never ran"; kill $gpid; wait $gpid; exit 1; }
# Kill QEMU (found by our socket on its command line) mid-I/O: a further fio run is under way.
qpid=$(pgrep -n -f "qemu-system-x86_64.*$sock")
[ -n "$qpid" ] || { echo "FAIL: QEMU not found"; kill $gpid; wait $gpid; exit 1; }
echo "emudevd fds with QEMU attached: $(fds), guest RAM mappings: $(ram_maps)"
echo "SIGKILL QEMU (pid $qpid)"
kill -9 "$qpid"
wait $gpid
echo "boot tool exit status $? (QEMU killed)"

# emudevd stays up and frees what the dead client held.
ok=0
for _ in $(seq 300); do
    [ "$(fds)" = "$fds_idle" ] && [ "$(ram_maps)" = 0 ] && { ok=1; break; }
    sleep 0.1
done
echo "emudevd fds after the kill: $(fds), guest RAM mappings: $(ram_maps)"
kill -0 "$dpid" || { echo "FAIL: emudevd died"; exit 1; }
[ $ok = 1 ] || { ls -l "/proc/$dpid/fd"; echo "FAIL: the killed QEMU's fds or maps were not freed"; exit 1; }
"$BIN/emudevctl" --control "$ctl" query-devices
dd if="$img" bs=512 skip=120000 count=1 2>/dev/null | grep -q EMUDEV-KILL-MARKER ||
    { echo "FAIL: the acknowledged marker is not in the image"; exit 1; }

# The next QEMU is served on the same socket.
cat >"$WORKDIR/guest2.sh" <<'GUEST'
#!/bin/sh
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 10; }
dd if=/dev/vda bs=512 skip=120000 count=1 2>/dev/null | grep -q EMUDEV-KILL-MARKER ||
    { echo "marker not readable"; exit 11; }
fio --name=v --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite --bs=4k \
    --iodepth=8 --size=8M --verify=crc32c --verify_fatal=1 --do_verify=1 >/tmp/fio.out 2>&1 ||
    { cat /tmp/fio.out; exit 12; }
grep -E "err=" /tmp/fio.out
echo "GUEST2-OK"
GUEST
guest "$WORKDIR/guest2.sh" --vfio-user "$sock"
rc=$?
[ "$rc" = 0 ] || { echo "FAIL: the next QEMU was not served (rc $rc)"; exit 1; }
grep -q panicked "$GUEST_LOGS/$CASE-daemon.server.log" && { echo "FAIL: emudevd panicked"; exit 1; }
echo PASS
