#!/usr/bin/env bash
# virtio-net on a tap in a private namespace: the guest interface comes up with our MAC,
# pings the namespace side, runs iperf3 TCP both ways with offloads on (no TCP checksum
# errors on the namespace side), and `ethtool -L` changes queue pairs while traffic flows.
# The NIC is served by emudevd (run inside the namespace, so its tap is created there).
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/net-lib.sh"
need_iperf3 || { echo "iperf3 missing on the host and cannot be installed"; exit 1; }
MAC=52:54:00:e0:de:01 TAP=edtap0 sock=$WORKDIR/net.sock ctlsock=$WORKDIR/control.sock
start_server tap ip netns exec "$NS" "$BIN/emudevd" --pollers 2 --control "$ctlsock" \
    --device "virtio-net,id=nic0,socket=$sock,backend=tap,ifname=$TAP,mac=$MAC,queue-pairs=2"
wait_socket "$sock" || exit 1
wait_socket "$ctlsock" || exit 1
wait_link "$TAP" || exit 1
ip -n "$NS" addr add 169.254.77.1/16 dev "$TAP"
ip -n "$NS" link set "$TAP" up
ip netns exec "$NS" iperf3 -s -D -B 169.254.77.1 --logfile "$WORKDIR/iperf3-s.log" || exit 1
ip netns exec "$NS" nstat -n   # reset the counters history

cat >"$WORKDIR/guest.sh" <<GUEST
#!/bin/sh
$GUEST_FUNCS
IF=\$(ifname_of $MAC) || { echo "no interface with MAC $MAC"; ls /sys/class/net; exit 10; }
echo "interface \$IF has our MAC"
ethtool -k \$IF | grep -E 'tx-checksumming|tcp-segmentation-offload|rx-checksumming' 
ip link set \$IF up
ip addr add 169.254.77.2/16 dev \$IF
ethtool -l \$IF
ping -c 3 -W 3 169.254.77.1 || exit 11
echo "== iperf3 guest -> ns"
iperf3 -c 169.254.77.1 -t 5 -f m || exit 12
echo "== iperf3 ns -> guest"
iperf3 -c 169.254.77.1 -t 5 -f m -R || exit 13
echo "== ethtool -L while traffic flows"
iperf3 -c 169.254.77.1 -t 8 -f m -P 2 > /tmp/ip.log 2>&1 &
p=\$!
sleep 2; ethtool -L \$IF combined 1 || exit 14
sleep 2; ethtool -L \$IF combined 2 || exit 15
wait \$p; rc=\$?
cat /tmp/ip.log
[ \$rc = 0 ] || exit 16
ping -c 2 -W 3 169.254.77.1 || exit 17
echo GUEST-NET-OK
GUEST
chmod +x "$WORKDIR/guest.sh"
guest "$WORKDIR/guest.sh" --vfio-user "$sock"
rc=$?
echo "== namespace side TCP checksum errors"
errs=$(ip netns exec "$NS" nstat -az TcpInCsumErrors | awk '/TcpInCsumErrors/ { print $2 }')
echo "TcpInCsumErrors=${errs:-?}"
"$BIN/emudevctl" --control "$ctlsock" query-stats --device nic0 || { echo "query-stats failed"; exit 1; }
[ "$rc" = 0 ] || { echo "guest failed rc=$rc"; exit 1; }
[ "${errs:-1}" = 0 ] || { echo "checksum errors on the namespace side"; exit 1; }
echo PASS
