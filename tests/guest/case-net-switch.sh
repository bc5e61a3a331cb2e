#!/usr/bin/env bash
# Two of our virtio-net NICs on the server's in-process L2 switch, in one guest: one stays
# in the guest's root namespace, the other moves into a guest netns; they ping each other
# and run iperf3 TCP through the switch (no host networking involved), all served by emudevd.
# The second NIC has offloads off: the switch segments and checksums for it in software.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/net-lib.sh"
M1=52:54:00:e0:de:11 M2=52:54:00:e0:de:12
s1=$WORKDIR/n1.sock s2=$WORKDIR/n2.sock
ctlsock=$WORKDIR/control.sock
start_server switch "$BIN/emudevd" --pollers 2 --control "$ctlsock" \
    --device "virtio-net,socket=$s1,id=nic0,backend=switch,switch=sw0,mac=$M1" \
    --device "virtio-net,socket=$s2,id=nic1,backend=switch,switch=sw0,mac=$M2,offloads=off"
wait_socket "$s1" && wait_socket "$s2" || exit 1
cat >"$WORKDIR/guest.sh" <<GUEST
#!/bin/sh
$GUEST_FUNCS
A=\$(ifname_of $M1) && B=\$(ifname_of $M2) || { echo "interfaces missing"; ls /sys/class/net; exit 10; }
ip netns add peer || exit 11
ip link set \$B netns peer || exit 12
ip -n peer link set lo up
ip -n peer link set \$B up
ip -n peer addr add 169.254.88.2/16 dev \$B
ip link set \$A up
ip addr add 169.254.88.1/16 dev \$A
ping -c 3 -W 3 169.254.88.2 || exit 13
ip netns exec peer iperf3 -s -D -B 169.254.88.2 || exit 14
sleep 1
iperf3 -c 169.254.88.2 -t 4 -f m || exit 15
iperf3 -c 169.254.88.2 -t 4 -f m -R || exit 16
echo GUEST-SWITCH-OK
GUEST
chmod +x "$WORKDIR/guest.sh"
guest "$WORKDIR/guest.sh" --vfio-user "$s1" --vfio-user "$s2"
rc=$?
"$BIN/emudevctl" --control "$ctlsock" query-stats
[ "$rc" = 0 ] || { echo "guest failed rc=$rc"; exit 1; }
echo PASS
