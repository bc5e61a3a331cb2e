#!/usr/bin/env bash
# Not in the default guest suite (it is a benchmark): scripts/guest-tests.sh tests/guest/bench-net.sh
# Benchmark: our virtio-net (tap backend) beside QEMU's own virtio-net-pci on a tap
# (vhost=off) in the same guest and run. TCP throughput both ways and a 64-byte UDP packet
# rate, guest -> namespace. QEMU runs inside the test namespace so its tap lives there.
# Prints the ratios ours/QEMU; fails only if a transfer fails.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/net-lib.sh"
need_iperf3 || { echo "iperf3 missing on the host and cannot be installed"; exit 1; }
M1=52:54:00:e0:de:31 M2=52:54:00:e0:de:32 sock=$WORKDIR/net.sock
start_server bench ip netns exec "$NS" "$NETSRV" --pollers 1 --poll-us "${POLL_US:-50}" --control "$CTL" \
    --device "socket=$sock,backend=tap:edtap0,mac=$M1"
wait_socket "$sock" || exit 1
wait_link edtap0 || exit 1
ip -n "$NS" addr add 169.254.77.1/24 dev edtap0
ip -n "$NS" link set edtap0 up
ip netns exec "$NS" ip tuntap add qtap0 mode tap vnet_hdr || exit 1
ip -n "$NS" addr add 169.254.78.1/24 dev qtap0
ip -n "$NS" link set qtap0 up
ip netns exec "$NS" iperf3 -s -D --logfile "$WORKDIR/iperf3-s.log" || exit 1
T=${BENCH_SECS:-8}
cat >"$WORKDIR/guest.sh" <<GUEST
#!/bin/sh
$GUEST_FUNCS
OURS=\$(ifname_of $M1) && QEMU=\$(ifname_of $M2) || { ls /sys/class/net; exit 10; }
ip link set \$OURS up; ip addr add 169.254.77.2/24 dev \$OURS
ip link set \$QEMU up; ip addr add 169.254.78.2/24 dev \$QEMU
ping -c 2 -W 3 169.254.77.1 >/dev/null || exit 11
ping -c 2 -W 3 169.254.78.1 >/dev/null || exit 12
run() { # name peer args...
    n=\$1 p=\$2; shift 2
    r=\$(iperf3 -c \$p -t $T -J "\$@" 2>/dev/null) || { echo "RESULT \$n FAILED"; return 1; }
    echo "\$r" > /tmp/\$n.json
    # TCP: receiver bits/s. UDP: packets/s from the sender's totals less the receiver's losses.
    case "\$*" in
    *-u*) pk=\$(echo "\$r" | grep -o '"packets":[[:space:]]*[0-9]*' | tail -1 | grep -o '[0-9]*\$')
          lost=\$(echo "\$r" | grep -o '"lost_packets":[[:space:]]*[0-9]*' | tail -1 | grep -o '[0-9]*\$')
          echo "RESULT \$n pps \$(( (pk - lost) / $T ))" ;;
    *)    bps=\$(echo "\$r" | grep -A8 '"sum_received"' | grep -o '"bits_per_second":[[:space:]]*[0-9.e+]*' | grep -o '[0-9.e+]*\$')
          echo "RESULT \$n bps \$bps" ;;
    esac
}
for round in 1 2; do
run ours_tx 169.254.77.1 || exit 13
run qemu_tx 169.254.78.1 || exit 14
run ours_rx 169.254.77.1 -R || exit 15
run qemu_rx 169.254.78.1 -R || exit 16
run ours_udp64 169.254.77.1 -u -l 64 -b 0 || exit 17
run qemu_udp64 169.254.78.1 -u -l 64 -b 0 || exit 18
done
echo GUEST-BENCH-OK
GUEST
chmod +x "$WORKDIR/guest.sh"
console=$GUEST_LOGS/$CASE.console.log
ip netns exec "$NS" "$RUN_GUEST" --script "$WORKDIR/guest.sh" --timeout "${GUEST_TIMEOUT:-400}" \
    --log "$console" --vfio-user "$sock" \
    --qemu-arg -netdev --qemu-arg "tap,id=qn0,ifname=qtap0,script=no,downscript=no,vhost=off" \
    --qemu-arg -device --qemu-arg "virtio-net-pci,netdev=qn0,mac=$M2"
rc=$?
ctl stats 0; sleep 0.3
grep RESULT "$console" | tr -d '\r'
awk '/RESULT/ { gsub("\r",""); v[$2] += $4 } END {
    for (k in v) if (k ~ /^ours_/) { q = k; sub("ours_", "qemu_", q);
        if (v[q] > 0) printf "ratio %s ours/qemu = %.2f\n", substr(k, 6), v[k] / v[q] } }' "$console"
[ "$rc" = 0 ] || { echo "guest failed rc=$rc"; exit 1; }
echo PASS
