#!/usr/bin/env bash
# Link down/up set from the daemon (`emudevctl set-link`, a config interrupt) is seen by the
# guest's virtio_net as carrier off/on.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/net-lib.sh"
M=52:54:00:e0:de:21 sock=$WORKDIR/n.sock
ctlsock=$WORKDIR/control.sock
start_server link "$BIN/emudevd" --control "$ctlsock" \
    --device "virtio-net,socket=$sock,id=nic0,backend=switch,switch=sw0,mac=$M"
wait_socket "$sock" || exit 1
cat >"$WORKDIR/guest.sh" <<GUEST
#!/bin/sh
$GUEST_FUNCS
IF=\$(ifname_of $M) || exit 10
ip link set \$IF up
wait_carrier() {
    for i in \$(seq 200); do [ "\$(cat /sys/class/net/\$IF/carrier)" = \$1 ] && return 0; sleep 0.1; done
    return 1
}
wait_carrier 1 || { echo "carrier never up"; exit 11; }
echo WAIT-DOWN
wait_carrier 0 || { echo "link down not seen"; exit 12; }
echo LINK-DOWN-SEEN
wait_carrier 1 || { echo "link up not seen"; exit 13; }
echo LINK-UP-SEEN
GUEST
chmod +x "$WORKDIR/guest.sh"
console=$GUEST_LOGS/$CASE.console.log
: >"$console"
guest "$WORKDIR/guest.sh" --vfio-user "$sock" &
gpid=$!
for _ in $(seq 1200); do grep -q WAIT-DOWN "$console" 2>/dev/null && break; sleep 0.1; done
"$BIN/emudevctl" --control "$ctlsock" set-link nic0 down || echo "set-link down failed"
for _ in $(seq 200); do grep -q LINK-DOWN-SEEN "$console" 2>/dev/null && break; sleep 0.1; done
"$BIN/emudevctl" --control "$ctlsock" set-link nic0 up || echo "set-link up failed"
wait $gpid; rc=$?
grep -E "LINK-|carrier" "$console"
[ "$rc" = 0 ] || { echo "guest failed rc=$rc"; exit 1; }
echo PASS
