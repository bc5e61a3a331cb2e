#!/usr/bin/env bash
# The main demo: build everything, start emudevd serving devices on UNIX sockets (a test
# device, a virtio-blk on a temporary image, two virtio-net NICs and an AVF NIC on the
# in-process switch), and talk to them over vfio-user with our client: inspect each device
# lspci-style, write and verify the disk, pass frames between the two NICs, hot add and
# remove a device, show the statistics. Every step checks its result; the script exits
# non-zero on the first failure. Needs no root and no QEMU. Usage: scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

step "build (release)"
cargo build --release --locked -p emudevd -p emudev-examples
BIN=${CARGO_TARGET_DIR:-target}/release
DIR=$(mktemp -d /tmp/emudev-demo.XXXXXX)
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"' EXIT

step "start emudevd"
truncate -s 64M "$DIR/disk.img"
args=(--device "testdev,socket=$DIR/testdev.sock")
if "$BIN/emudevd" --print-capabilities | grep -q '"virtio-blk"' && [ "${DEMO_BLK:-1}" = 1 ]; then
    args+=(--device "virtio-blk,socket=$DIR/vda.sock,path=$DIR/disk.img,num-queues=2")
fi
# Two NICs and an AVF VF on the in-process switch (the default backend): no host networking.
args+=(--device "virtio-net,id=net0,socket=$DIR/net0.sock,mac=52:54:00:de:00:01")
args+=(--device "virtio-net,id=net1,socket=$DIR/net1.sock,mac=52:54:00:de:00:02")
args+=(--device "avf,id=vf0,socket=$DIR/vf0.sock,mac=52:54:00:de:00:03")
args+=(--control "$DIR/control.sock")
RUST_LOG=${RUST_LOG:-warn} "$BIN/emudevd" "${args[@]}" --pidfile "$DIR/emudevd.pid" &
pid=$!
for _ in $(seq 150); do [ -s "$DIR/emudevd.pid" ] && break; sleep 0.1; done
[ -s "$DIR/emudevd.pid" ] || fail "emudevd did not become ready"
echo "emudevd (pid $pid), control socket $DIR/control.sock"
"$BIN/emudevctl" --control "$DIR/control.sock" query-devices

for s in "$DIR"/testdev.sock "$DIR"/vda.sock "$DIR"/net0.sock "$DIR"/vf0.sock; do
    [ -S "$s" ] || continue
    step "inspect $(basename "$s") with our vfio-user client"
    "$BIN/lsvfio" "$s"
done

if [ -x "$BIN/demo-client" ]; then
    step "drive the devices"
    blk=()
    [ -S "$DIR/vda.sock" ] && blk=(--blk "$DIR/vda.sock")
    "$BIN/demo-client" --testdev "$DIR/testdev.sock" ${blk[@]+"${blk[@]}"}
    step "pass frames between the two virtio-net NICs through the switch"
    "$BIN/demo-client" --net "$DIR/net0.sock" --net "$DIR/net1.sock"
fi

step "hot add and remove a device through the control socket"
"$BIN/emudevctl" --control "$DIR/control.sock" device-add "testdev,id=hot,socket=$DIR/hot.sock"
"$BIN/demo-client" --quiet --testdev "$DIR/hot.sock" && echo "hot: driven"
"$BIN/emudevctl" --control "$DIR/control.sock" device-del hot
[ -e "$DIR/hot.sock" ] && fail "hot.sock left after device-del"

step "statistics (emudevctl query-stats)"
"$BIN/emudevctl" --control "$DIR/control.sock" query-stats
# The daemon's own counters agree with the client: both NICs sent and received frames.
stats=$("$BIN/emudevctl" --control "$DIR/control.sock" query-stats)
for n in net0 net1; do
    grep -Eq "^$n .*rx_frames=[1-9][0-9]* .*tx_frames=[1-9]" <<<"$stats" ||
        fail "$n: the daemon counted no frames"
done

step "stop emudevd (SIGTERM)"
kill -TERM "$pid"; wait "$pid"; pid=""
ls "$DIR"/*.sock >/dev/null 2>&1 && fail "sockets left behind"
echo "demo finished: all checks passed"
