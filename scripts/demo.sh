#!/usr/bin/env bash
# The main demo: build everything, start emudevd serving devices on UNIX sockets, and talk
# to them over vfio-user with our client: inspect each device lspci-style, then drive it.
# Needs no root and no QEMU. Usage: scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

step "build (release)"
cargo build --release --locked -p emudevd -p emudev-examples
BIN=target/release
DIR=$(mktemp -d /tmp/emudev-demo.XXXXXX)
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"' EXIT

step "start emudevd"
truncate -s 64M "$DIR/disk.img"
args=(--device "testdev,socket=$DIR/testdev.sock")
if "$BIN/emudevd" --print-capabilities | grep -q '"virtio-blk"' && [ "${DEMO_BLK:-1}" = 1 ]; then
    args+=(--device "virtio-blk,socket=$DIR/vda.sock,path=$DIR/disk.img,num-queues=2")
fi
RUST_LOG=${RUST_LOG:-warn} "$BIN/emudevd" "${args[@]}" --pidfile "$DIR/emudevd.pid" &
pid=$!
for _ in $(seq 50); do [ -s "$DIR/emudevd.pid" ] && break; sleep 0.1; done
[ -s "$DIR/emudevd.pid" ] || fail "emudevd did not become ready"
echo "emudevd (pid $pid) serving: $(ls "$DIR"/*.sock | xargs -n1 basename | tr '\n' ' ')"

for s in "$DIR"/*.sock; do
    step "inspect $(basename "$s") with our vfio-user client"
    "$BIN/lsvfio" "$s"
done

if [ -x "$BIN/demo-client" ]; then
    step "drive the devices"
    "$BIN/demo-client" --testdev "$DIR/testdev.sock" ${args[2]:+--blk "$DIR/vda.sock"}
fi

step "stop emudevd (SIGTERM)"
kill -TERM "$pid"; wait "$pid"; pid=""
ls "$DIR"/*.sock >/dev/null 2>&1 && fail "sockets left behind"
echo "demo finished: all checks passed"
