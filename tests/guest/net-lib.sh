# Helpers for the virtio-net guest cases (sourced after lib.sh).
# NETWORK RULES: everything stays inside a namespace this case creates and deletes; only
# 169.254.0.0/16 and IPv6 link-local addresses are used.
NS=emudev-$CASE-$$
NETSRV=${NETSRV:-$BIN/net-server}
# scripts/guest-tests.sh builds emudevd and the examples; net-server lives in emudev-net.
if [ ! -x "$NETSRV" ]; then
    (cd "$(dirname "${BASH_SOURCE[0]}")/../.." &&
        cargo build --release --locked -p emudev-net --bin net-server) >&2 ||
        { echo "cannot build net-server"; exit 1; }
fi
CTL=$WORKDIR/ctl.fifo
net_cleanup() {
    cleanup
    ip netns pids "$NS" 2>/dev/null | xargs -r kill 2>/dev/null
    ip netns del "$NS" 2>/dev/null
}
trap net_cleanup EXIT
ip netns add "$NS" || { echo "cannot create netns $NS"; exit 1; }
ip -n "$NS" link set lo up
mkfifo "$CTL"

# need_iperf3 : install iperf3 on the host when missing.
need_iperf3() {
    command -v iperf3 >/dev/null && return 0
    apt-get install -y iperf3 >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 && apt-get install -y iperf3 >/dev/null 2>&1; }
    command -v iperf3 >/dev/null
}

# wait_link IFNAME : wait for an interface to appear in the namespace.
wait_link() {
    for _ in $(seq 100); do ip -n "$NS" link show "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "no $1 in $NS" >&2; return 1
}

# Guest-side helper, prepended to guest scripts: ifname_of MAC.
GUEST_FUNCS='
ifname_of() {
    for d in /sys/class/net/*; do
        [ "$(cat "$d/address")" = "$1" ] && { basename "$d"; return 0; }
    done
    return 1
}
'

# ctl COMMAND... : send a control line to net-server (never blocks if it is gone).
ctl() { timeout 2 bash -c 'echo "$1" >"$2"' _ "$*" "$CTL"; }
