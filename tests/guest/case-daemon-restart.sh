#!/usr/bin/env bash
# emudevd killed with SIGKILL while QEMU is attached, then restarted (issue #9). QEMU 11.1
# cannot reconnect a vfio-user device (the socket is opened only at realize), so what must
# hold is: QEMU reports the lost server on its log, its monitor still answers (the host side
# does not hang), QEMU can be told to quit; the restarted emudevd replaces the stale socket,
# still has every acknowledged write, and serves a fresh QEMU (fio with verify passes).
. "$(dirname "$0")/lib.sh"
sock=$WORKDIR/vda.sock img=$WORKDIR/vda.img qmpsock=$WORKDIR/qmp.sock
truncate -s 64M "$img"
daemon_args=(--device "virtio-blk,id=vda,socket=$sock,path=$img,num-queues=2")
start_server daemon1 "$BIN/emudevd" "${daemon_args[@]}"
dpid=${SERVER_PIDS[-1]}
wait_socket "$sock" || exit 1

cat >"$WORKDIR/guest1.sh" <<'GUEST'
#!/bin/sh
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 10; }
printf 'EMUDEV-RESTART-MARKER' | dd of=/dev/vda bs=512 seek=120000 conv=fsync 2>/dev/null || exit 11
echo "MARKER-WRITTEN"
n=0
while :; do
    fio --name=v --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite --bs=4k \
        --iodepth=8 --size=8M --verify=crc32c --verify_fatal=1 --do_verify=1 >/tmp/fio.out 2>&1 ||
        { cat /tmp/fio.out; exit 12; }
    n=$((n + 1)); echo "FIO-PASS $n"
done
GUEST
console=$GUEST_LOGS/$CASE.console.log
: >"$console"
# The boot tool itself in the background (not the guest() function in a subshell), so that
# killing $gpid stops QEMU too; cleanup kills it with the servers.
"$RUN_GUEST" --script "$WORKDIR/guest1.sh" --timeout 600 --log "$console" --vfio-user "$sock" \
    --qemu-arg -qmp --qemu-arg "unix:$qmpsock,server=on,wait=off" &
gpid=$!
SERVER_PIDS+=($gpid)
for _ in $(seq 4000); do grep -q "FIO-PASS 1" "$console" && break; kill -0 $gpid 2>/dev/null || break; sleep 0.1; done
grep -q "FIO-PASS 1" "$console" || { echo "FAIL: fio never ran"; kill $gpid; wait $gpid; exit 1; }

echo "SIGKILL emudevd (pid $dpid) under QEMU"
kill -9 "$dpid"
wait "$dpid" 2>/dev/null
# QEMU notices: its vfio-user proxy logs the closed socket.
seen=0
for _ in $(seq 600); do
    grep -qiE "failed to read header|vfio.?user.*(closed|error|fail)|server closed socket" "$console" &&
        { seen=1; break; }
    sleep 0.1
done
grep -iE "^qemu-system|read header|closed socket" "$console" | head -5
[ $seen = 1 ] || { echo "FAIL: QEMU reported nothing about the lost server"; kill $gpid; wait $gpid; exit 1; }
# The host side does not hang: the monitor answers and QEMU quits when told.
qmp "$qmpsock" '{"execute":"query-status"}' "" 30 ||
    { echo "FAIL: QEMU's monitor does not answer"; kill $gpid; wait $gpid; exit 1; }
qmp "$qmpsock" '{"execute":"quit"}' "" 30 || true
t=600
while kill -0 $gpid 2>/dev/null && [ $t -gt 0 ]; do sleep 0.1; t=$((t - 1)); done
kill -0 $gpid 2>/dev/null && { echo "FAIL: QEMU did not quit"; kill $gpid; wait $gpid; exit 1; }
wait $gpid

# Restart: the stale socket is replaced and a fresh QEMU is served.
[ -S "$sock" ] || echo "note: no stale socket left"
start_server daemon2 "$BIN/emudevd" "${daemon_args[@]}"
for _ in $(seq 100); do
    grep -q "serving on" "$GUEST_LOGS/$CASE-daemon2.server.log" 2>/dev/null && break; sleep 0.1
done
grep -q "serving on" "$GUEST_LOGS/$CASE-daemon2.server.log" ||
    { cat "$GUEST_LOGS/$CASE-daemon2.server.log"; echo "FAIL: the restarted emudevd does not serve"; exit 1; }
cat >"$WORKDIR/guest2.sh" <<'GUEST'
#!/bin/sh
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 10; }
dd if=/dev/vda bs=512 skip=120000 count=1 2>/dev/null | grep -q EMUDEV-RESTART-MARKER ||
    { echo "marker lost"; exit 11; }
fio --name=v --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite --bs=4k \
    --iodepth=8 --size=8M --verify=crc32c --verify_fatal=1 --do_verify=1 >/tmp/fio.out 2>&1 ||
    { cat /tmp/fio.out; exit 12; }
grep -E "err=" /tmp/fio.out
echo "GUEST2-OK"
GUEST
guest "$WORKDIR/guest2.sh" --vfio-user "$sock"
rc=$?
[ "$rc" = 0 ] || { echo "FAIL: the restarted emudevd did not serve a fresh QEMU (rc $rc)"; exit 1; }
echo PASS
