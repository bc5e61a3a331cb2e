#!/usr/bin/env bash
# Not in the default guest suite (it is a benchmark): scripts/guest-tests.sh tests/guest/bench-net.sh
# or bench/run.sh. Network benchmark, one guest, three NICs side by side, each on its own tap
# in a private namespace (link-local addresses only):
#   ours-net   emudevd virtio-net over vfio-user, tap backend      169.254.77.0/24
#   ours-avf   emudevd AVF (iavf driver) over vfio-user, tap backend 169.254.79.0/24
#   qemu-net   QEMU's own virtio-net-pci on a tap, vhost=off        169.254.78.0/24
# Per round and NIC: iperf3 TCP guest -> namespace (tx), namespace -> guest (rx, -R), and a
# 64-byte UDP packet rate guest -> namespace (udp64: packets the namespace received per s).
# The NICs take turns inside each round, so machine load falls on all alike.
# Environment: BENCH_SECS (iperf3 seconds, default 5), ROUNDS (default 3), NICS (default
# "ours-net ours-avf qemu-net"), BENCH_OUT (directory for net.tsv: nic test round value unit,
# and each server's CPU seconds; default $WORKDIR, deleted).
# Prints the ratios ours/QEMU; fails only if no transfer of QEMU's NIC or of ours worked.
. "$(dirname "$0")/lib.sh"
NETSRV=$BIN/emudevd   # net-lib.sh builds net-server otherwise; emudevd serves both our NICs
. "$(dirname "$0")/net-lib.sh"
need_iperf3 || { echo "iperf3 missing on the host and cannot be installed"; exit 1; }
T=${BENCH_SECS:-5}
ROUNDS=${ROUNDS:-3}
NICS=${NICS:-ours-net ours-avf qemu-net}
OUTD=${BENCH_OUT:-$WORKDIR}
mkdir -p "$OUTD"
M_NET=52:54:00:e0:de:31 M_QEMU=52:54:00:e0:de:32 M_AVF=52:54:00:e0:de:33
args=()
has() { case " $NICS " in *" $1 "*) return 0 ;; esac; return 1; }
SRV_NET="" SRV_AVF=""
if has ours-net; then
    start_server net ip netns exec "$NS" "$BIN/emudevd" --control "$WORKDIR/net.ctl" \
        --device "virtio-net,socket=$WORKDIR/net.sock,backend=tap,ifname=edtap0,mac=$M_NET"
    SRV_NET=${SERVER_PIDS[-1]}
    wait_socket "$WORKDIR/net.sock" || exit 1
    wait_link edtap0 || exit 1
    ip -n "$NS" addr add 169.254.77.1/24 dev edtap0
    ip -n "$NS" link set edtap0 up
    args+=(--vfio-user "$WORKDIR/net.sock")
fi
if has ours-avf; then
    start_server avf ip netns exec "$NS" "$BIN/emudevd" --control "$WORKDIR/avf.ctl" \
        --device "avf,socket=$WORKDIR/avf.sock,backend=tap,ifname=edavf0,mac=$M_AVF"
    SRV_AVF=${SERVER_PIDS[-1]}
    wait_socket "$WORKDIR/avf.sock" || exit 1
    wait_link edavf0 || exit 1
    ip -n "$NS" addr add 169.254.79.1/24 dev edavf0
    ip -n "$NS" link set edavf0 up
    args+=(--vfio-user "$WORKDIR/avf.sock")
fi
if has qemu-net; then
    ip netns exec "$NS" ip tuntap add qtap0 mode tap vnet_hdr || exit 1
    ip -n "$NS" addr add 169.254.78.1/24 dev qtap0
    ip -n "$NS" link set qtap0 up
    args+=(--qemu-arg -netdev --qemu-arg "tap,id=qn0,ifname=qtap0,script=no,downscript=no,vhost=off"
           --qemu-arg -device --qemu-arg "virtio-net-pci,netdev=qn0,mac=$M_QEMU")
fi
ip netns exec "$NS" iperf3 -s -D --logfile "$WORKDIR/iperf3-s.log" || exit 1

cat >"$WORKDIR/guest.sh" <<GUEST
#!/bin/sh
$GUEST_FUNCS
modprobe iavf 2>/dev/null
# setup NAME MAC ADDR PEER: bring the NIC up; prints nothing and fails if it never works.
setup() {
    n=\$1 mac=\$2 addr=\$3 peer=\$4 i=0 IF=
    while [ \$i -lt 100 ]; do IF=\$(ifname_of \$mac) && break; sleep 0.1; i=\$((i + 1)); done
    [ -n "\$IF" ] || { echo "BENCH-NOTE \$n: no interface with MAC \$mac"; return 1; }
    ip link set \$IF up; ip addr add \$addr/24 dev \$IF
    i=0; while [ \$i -lt 100 ] && [ "\$(cat /sys/class/net/\$IF/carrier 2>/dev/null)" != 1 ]; do sleep 0.1; i=\$((i + 1)); done
    ping -c 2 -W 3 \$peer >/dev/null || ping -c 2 -W 3 \$peer >/dev/null || { echo "BENCH-NOTE \$n: no ping"; return 1; }
    echo "BENCH-NOTE \$n: \$IF up (\$(ethtool -i \$IF | sed -n 's/^driver: //p'))"
}
# run NIC TEST ROUND PEER iperf3-args...
run() {
    n=\$1 t=\$2 r=\$3 p=\$4; shift 4
    # One iperf3 server serves every run; on a loaded host it can still be closing the last
    # test and answer "the server is busy running a test": try again (up to 10 s) then.
    i=0
    while :; do
        j=\$(iperf3 -c \$p -t $T -J "\$@" 2>/dev/null) && break
        i=\$((i + 1))
        if [ \$i -lt 10 ] && echo "\$j" | grep -q 'server is busy'; then sleep 1; continue; fi
        echo "BENCH-NOTE \$n \$t \$r: \$(echo "\$j" | grep -o '"error":.*' | head -1)"
        echo "RESULT \$n \$t \$r FAILED"; return 1
    done
    case \$t in
    udp64) pk=\$(echo "\$j" | grep -o '"packets":[[:space:]]*[0-9]*' | tail -1 | grep -o '[0-9]*\$')
           lost=\$(echo "\$j" | grep -o '"lost_packets":[[:space:]]*[0-9]*' | tail -1 | grep -o '[0-9]*\$')
           echo "RESULT \$n \$t \$r \$(( (pk - lost) / $T )) pps" ;;
    *)     bps=\$(echo "\$j" | grep -A8 '"sum_received"' | grep -o '"bits_per_second":[[:space:]]*[0-9.e+]*' | grep -o '[0-9.e+]*\$')
           echo "RESULT \$n \$t \$r \$bps bps" ;;
    esac
}
UP=
for nic in $NICS; do
    case \$nic in
    ours-net) setup \$nic $M_NET 169.254.77.2 169.254.77.1 && UP="\$UP \$nic" ;;
    qemu-net) setup \$nic $M_QEMU 169.254.78.2 169.254.78.1 && UP="\$UP \$nic" ;;
    ours-avf) setup \$nic $M_AVF 169.254.79.2 169.254.79.1 && UP="\$UP \$nic" ;;
    esac
done
peer_of() { case \$1 in ours-net) echo 169.254.77.1 ;; qemu-net) echo 169.254.78.1 ;; ours-avf) echo 169.254.79.1 ;; esac; }
r=1
while [ \$r -le $ROUNDS ]; do
    for nic in \$UP; do
        p=\$(peer_of \$nic)
        echo "BENCH-BEGIN \$nic \$r"
        run \$nic tx \$r \$p
        run \$nic rx \$r \$p -R
        run \$nic udp64 \$r \$p -u -l 64 -b 0
        echo "BENCH-END \$nic \$r"
    done
    r=\$((r + 1))
done
echo GUEST-BENCH-OK
GUEST
chmod +x "$WORKDIR/guest.sh"
console=$GUEST_LOGS/$CASE.console.log
ip netns exec "$NS" "$RUN_GUEST" --script "$WORKDIR/guest.sh" \
    --timeout "${GUEST_TIMEOUT:-$(( ROUNDS * 3 * 3 * (T + 6) + 240 ))}" \
    --log "$console" ${args[@]+"${args[@]}"}
rc=$?
# Our servers' CPU over the whole boot (utime+stime, seconds) and their counters.
tick=$(getconf CLK_TCK)
for s in net:$SRV_NET avf:$SRV_AVF; do
    pid=${s#*:}; [ -n "$pid" ] || continue
    st=$(cat /proc/"$pid"/stat 2>/dev/null) || continue
    st=${st##*) }; set -- $st
    echo "server-cpu ours-${s%%:*} $(awk -v t=$(( ${12} + ${13} )) -v k="$tick" 'BEGIN{printf "%.2f", t/k}') s"
done | tee "$OUTD/server-cpu.txt"
grep -a '^BENCH-NOTE' "$console" | tr -d '\r'
grep -a '^RESULT' "$console" | tr -d '\r' | sed 's/^RESULT //' | tr ' ' '\t' >"$OUTD/net.tsv"
cat "$OUTD/net.tsv"
awk -F'\t' '$4 != "FAILED" { v[$1 " " $2] += $4; n[$1 " " $2]++ } END {
    for (k in v) { split(k, a, " "); if (a[1] ~ /^ours-/ && n["qemu-net " a[2]] > 0)
        printf "ratio %s %s ours/qemu = %.2f\n", a[1], a[2], (v[k] / n[k]) / (v["qemu-net " a[2]] / n["qemu-net " a[2]]) } }' "$OUTD/net.tsv" | sort
[ "$rc" = 0 ] || { echo "guest failed rc=$rc"; exit 1; }
ok=$(awk -F'\t' '$4 != "FAILED"' "$OUTD/net.tsv" | wc -l)
[ "$ok" -gt 0 ] || { echo "no transfer worked"; exit 1; }
echo PASS
