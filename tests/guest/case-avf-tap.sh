#!/usr/bin/env bash
# The AVF NIC (avf-server) on a tap in a private namespace with the guest's stock iavf:
# carrier up, ping the namespace side, iperf3 TCP both ways and UDP out with the driver's default
# offloads (TX checksum and TSO, passed to the tap as a vnet header), no TCP/UDP checksum
# errors on either side (RX checksum status is reported in the descriptors); then an MTU
# change to 9000 (a VF reset: RESET_VF, AQ re-init, renegotiation) with 8000-byte pings
# (multi-descriptor RX), `ethtool -L combined 1` (another reset), a ping, `ethtool -S`,
# the RSS key/LUT (ethtool -x, per-queue RX counters), and promiscuous mode. dmesg must
# show no iavf errors.
# Each iperf3 run has its own server port: a server still closing the previous test answers
# a new control connection with a reset (the likely cause of the WIP version's UDP flake).
. "$(dirname "$0")/lib.sh"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
AVFSRV=${AVFSRV:-$BIN/avf-server}
if [ ! -x "$AVFSRV" ]; then
    (cd "$ROOT" && cargo build --release --locked -p emudev-avf --bin avf-server) >&2 ||
        { echo "cannot build avf-server"; exit 1; }
fi
NETSRV=$AVFSRV   # net-lib.sh builds net-server otherwise; this case does not use it
. "$(dirname "$0")/net-lib.sh"
need_iperf3 || { echo "iperf3 missing on the host and cannot be installed"; exit 1; }
MAC=52:54:00:a0:f0:02 TAP=edavf0 sock=$WORKDIR/avf.sock
start_server avf ip netns exec "$NS" "$AVFSRV" --socket "$sock" --backend "tap:$TAP" \
    --mac "$MAC" --queue-pairs 2
wait_socket "$sock" || exit 1
wait_link "$TAP" || exit 1
ip -n "$NS" addr add 169.254.78.1/16 dev "$TAP"
ip -n "$NS" link set "$TAP" mtu 9000 up
for port in 5201 5202 5203; do
    ip netns exec "$NS" iperf3 -s -D -B 169.254.78.1 -p $port \
        --logfile "$WORKDIR/iperf3-s-$port.log" || exit 1
done
ip netns exec "$NS" nstat -n

cat >"$WORKDIR/guest.sh" <<GUEST
#!/bin/sh
$GUEST_FUNCS
# reach HOST : wait (up to 60 s) until one ping gets through, e.g. after a VF reset.
reach() {
    for i in \$(seq 60); do ping -c 1 -W 1 "\$@" >/dev/null 2>&1 && return 0; done
    return 1
}
# csum_errors : TCP + UDP InCsumErrors since boot (/proc/net/snmp; nstat is not in the guest).
csum_errors() {
    awk '/^(Tcp|Udp):/ { if (!(\$1 in h)) { h[\$1] = 1; for (i = 2; i <= NF; i++) n[\$1, i] = \$i }
        else for (i = 2; i <= NF; i++) if (n[\$1, i] == "InCsumErrors") s += \$i }
        END { print s + 0 }' /proc/net/snmp
}
modprobe iavf 2>/dev/null
for i in \$(seq 300); do IF=\$(ifname_of $MAC) && break; sleep 0.1; done
[ -n "\$IF" ] || { echo "no interface with MAC $MAC"; ls /sys/class/net; exit 10; }
ethtool -k \$IF | grep -E 'tx-checksumming|tcp-segmentation-offload|rx-checksumming'
ip link set \$IF up
ip addr add 169.254.78.2/16 dev \$IF
reach 169.254.78.1 || exit 11
ping -c 3 -W 3 169.254.78.1 || exit 11
echo AVF-PING-OK
echo "== iperf3 guest -> ns"
iperf3 -c 169.254.78.1 -p 5201 -t 5 -f m || exit 12
echo "== iperf3 ns -> guest"
iperf3 -c 169.254.78.1 -p 5202 -t 5 -f m -R || exit 13
echo "== iperf3 UDP guest -> ns"
iperf3 -c 169.254.78.1 -p 5203 -u -b 100M -t 3 -f m || exit 15
e=\$(csum_errors); echo "guest InCsumErrors=\$e"
[ "\$e" = 0 ] || exit 16
echo AVF-RXCSUM-OK
# ethtool -X returns EOPNOTSUPP in this guest (not traced yet), so only -x is checked.
echo "== RSS"
ethtool -x \$IF | grep -q "RSS hash key" || exit 17
ethtool -S \$IF | grep -E "rx-[0-9]+\.packets"
echo AVF-RSS-OK
echo "== promiscuous"
ip link set \$IF promisc on || exit 18
reach 169.254.78.1 || exit 18
ip link set \$IF promisc off || exit 18
reach 169.254.78.1 || exit 18
echo "== MTU 9000 (VF reset)"
ip link set \$IF mtu 9000 || exit 20
reach -s 8000 169.254.78.1 || exit 21
ping -c 3 -W 3 -s 8000 169.254.78.1 || exit 21
echo AVF-MTU-OK
ethtool -L \$IF combined 1 || exit 22
reach 169.254.78.1 || exit 23
ping -c 3 -W 3 169.254.78.1 || exit 23
echo AVF-CHANNELS-OK
ethtool -S \$IF | head -20
ip -s link show \$IF
dmesg | grep -i iavf
dmesg | grep -i iavf | grep -Eiq "error|fail|timed out|hang|never|not retrying|resources not" && exit 14
echo GUEST-AVF-OK
GUEST
chmod +x "$WORKDIR/guest.sh"
guest "$WORKDIR/guest.sh" --vfio-user "$sock"
rc=$?
echo "== namespace side TCP checksum errors"
errs=$(ip netns exec "$NS" nstat -az TcpInCsumErrors | awk '/TcpInCsumErrors/ { print $2 }')
uerrs=$(ip netns exec "$NS" nstat -az UdpInCsumErrors | awk '/UdpInCsumErrors/ { print $2 }')
echo "TcpInCsumErrors=${errs:-?} UdpInCsumErrors=${uerrs:-?}"
[ "$rc" = 0 ] || { echo "guest failed rc=$rc"; exit 1; }
[ "${errs:-1}" = 0 ] && [ "${uerrs:-1}" = 0 ] || { echo "checksum errors on the namespace side"; exit 1; }
echo PASS
