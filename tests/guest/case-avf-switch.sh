#!/usr/bin/env bash
# An AVF NIC and a virtio-net NIC on the same in-process L2 switch of one emudevd, in one
# guest: the AVF port (stock iavf) stays in the guest's root namespace, the virtio-net port
# moves into a guest netns. They ping each other over IPv4 and IPv6 link-local (IPv6 needs
# the solicited-node multicast the AVF MAC filter must let through), and run iperf3 TCP
# both ways through the switch (TSO from iavf reaches virtio-net as GSO; virtio-net's TSO is
# segmented by the switch for the AVF port), with no checksum errors in the guest; and a
# VLAN on both ports (tag insertion, stripping and the VLAN filter of the AVF port).
# No host networking is involved.
. "$(dirname "$0")/lib.sh"
# Guest-side helper (as in net-lib.sh, which this case does not need: no host namespace).
GUEST_FUNCS='
ifname_of() {
    for d in /sys/class/net/*; do
        [ "$(cat "$d/address")" = "$1" ] && { basename "$d"; return 0; }
    done
    return 1
}
'
MA=52:54:00:a0:f0:11 MV=52:54:00:e0:de:21
sa=$WORKDIR/avf.sock sv=$WORKDIR/net.sock ctlsock=$WORKDIR/control.sock
start_server avfsw "$BIN/emudevd" --pollers 2 --control "$ctlsock" \
    --device "avf,socket=$sa,id=avf0,backend=switch,switch=sw0,mac=$MA,queue-pairs=2" \
    --device "virtio-net,socket=$sv,id=nic0,backend=switch,switch=sw0,mac=$MV"
wait_socket "$sa" && wait_socket "$sv" || exit 1
cat >"$WORKDIR/guest.sh" <<GUEST
#!/bin/sh
$GUEST_FUNCS
csum_errors() {
    awk '/^(Tcp|Udp):/ { if (!(\$1 in h)) { h[\$1] = 1; for (i = 2; i <= NF; i++) n[\$1, i] = \$i }
        else for (i = 2; i <= NF; i++) if (n[\$1, i] == "InCsumErrors") s += \$i }
        END { print s + 0 }' "\${1:-/proc/net/snmp}"
}
# reach ARGS... : wait (up to 60 s) until one ping gets through.
reach() {
    for i in \$(seq 60); do ping -c 1 -W 1 "\$@" >/dev/null 2>&1 && return 0; done
    return 1
}
modprobe iavf 2>/dev/null
for i in \$(seq 300); do A=\$(ifname_of $MA) && break; sleep 0.1; done
V=\$(ifname_of $MV)
[ -n "\$A" ] && [ -n "\$V" ] || { echo "interfaces missing"; ls /sys/class/net; exit 10; }
ip netns add peer || exit 11
ip link set \$V netns peer || exit 12
ip -n peer link set lo up
ip -n peer link set \$V up
ip -n peer addr add 169.254.89.2/16 dev \$V
ip link set \$A up
ip addr add 169.254.89.1/16 dev \$A
reach 169.254.89.2 || exit 13
ping -c 3 -W 3 169.254.89.2 || exit 13
ip netns exec peer ping -c 3 -W 3 169.254.89.1 || exit 13
echo AVF-SWITCH-PING4-OK
# IPv6 link-local: wait out DAD on both ends, then ping through NDP multicast.
LLA=\$(ip -6 addr show dev \$A scope link | awk '/inet6/ { sub("/.*", "", \$2); print \$2 }')
for i in \$(seq 300); do
    ip -6 addr show dev \$A | grep -q tentative || ip -n peer -6 addr show dev \$V | grep -q tentative || break
    sleep 0.1
done
[ -n "\$LLA" ] || { ip -6 addr show dev \$A; exit 14; }
ip netns exec peer ping -c 3 -W 3 "\$LLA%\$V" || exit 14
echo AVF-SWITCH-PING6-OK
# VLAN 100 on both ports: iavf adds the filter (ADD_VLAN), has the device insert the tag
# (IL2TAG1) and strip it on receive (ENABLE_VLAN_STRIPPING); /24 so these routes win.
ethtool -k \$A | grep -E "vlan-(offload|filter)"
ip link add link \$A name avf.100 type vlan id 100 || exit 20
ip -n peer link add link \$V name vn.100 type vlan id 100 || exit 20
ip link set avf.100 up
ip addr add 169.254.90.1/24 dev avf.100
ip -n peer link set vn.100 up
ip -n peer addr add 169.254.90.2/24 dev vn.100
reach 169.254.90.2 || exit 21
ping -c 3 -W 3 169.254.90.2 || exit 21
echo AVF-SWITCH-VLAN-OK
ip netns exec peer iperf3 -s -D -B 169.254.89.2 -p 5201 || exit 15
ip netns exec peer iperf3 -s -D -B 169.254.89.2 -p 5202 || exit 15
reach 169.254.89.2 || exit 15
iperf3 -c 169.254.89.2 -p 5201 -t 4 -f m || exit 16
iperf3 -c 169.254.89.2 -p 5202 -t 4 -f m -R || exit 17
ip netns exec peer cat /proc/net/snmp >/tmp/snmp.peer
e=\$(csum_errors); ep=\$(csum_errors /tmp/snmp.peer)
echo "InCsumErrors root=\$e peer=\$ep"
[ "\$e" = 0 ] && [ "\$ep" = 0 ] || exit 18
ethtool -S \$A | head -12
dmesg | grep -i iavf
dmesg | grep -i iavf | grep -Eiq "error|fail|timed out|hang|never|not retrying|resources not" && exit 19
echo GUEST-AVF-SWITCH-OK
GUEST
chmod +x "$WORKDIR/guest.sh"
guest "$WORKDIR/guest.sh" --vfio-user "$sa" --vfio-user "$sv"
rc=$?
"$BIN/emudevctl" --control "$ctlsock" query-stats
[ "$rc" = 0 ] || { echo "guest failed rc=$rc"; exit 1; }
echo PASS
