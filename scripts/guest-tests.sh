#!/usr/bin/env bash
# Guest suite: boots a real Linux guest under QEMU 11.1 with our devices attached over
# vfio-user and runs a script inside it, for every case in tests/guest/*.sh.
# Self-contained: tests/guest/emudev-guest builds the guest cache (about 1 GB, outside the
# repo). Needs root and 1.5 GB free; skips clearly otherwise. Usage: scripts/guest-tests.sh [CASE...]
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ROOT=$(pwd)
# The guest cache (rootfs with QEMU 11.1 and firmware, guest kernel, initramfs), outside the
# repo. tests/guest/emudev-guest builds it; tests/guest/guest.conf lists what goes in.
export EMUDEV_GUEST_DIR=${EMUDEV_GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/emudev-guest}
# Older helpers (tests/guest/firmware) name the same directory HARNESS_DIR.
export HARNESS_DIR=$EMUDEV_GUEST_DIR

skip() { echo "SKIPPED guest suite: $*"; echo "guest: 0 passed, 0 failed"; exit 0; }
[ "$(id -u)" = 0 ] || skip "needs root (debootstrap and chroot to build the guest cache)"
command -v python3 >/dev/null || skip "needs python3 (tests/guest/emudev-guest)"
mkdir -p "$EMUDEV_GUEST_DIR"
avail_kb=$(df -Pk "$EMUDEV_GUEST_DIR" | awk 'NR==2 { print $4 }')
[ "${avail_kb:-0}" -gt 1500000 ] || skip "less than 1.5 GB free under $EMUDEV_GUEST_DIR"

step "guest cache setup ($EMUDEV_GUEST_DIR)"
t0=$(date +%s)
if ! tests/guest/emudev-guest setup >"$EMUDEV_GUEST_DIR/setup-ci.log" 2>&1; then
    tail -30 "$EMUDEV_GUEST_DIR/setup-ci.log"; fail "guest cache setup failed"
fi
tail -1 "$EMUDEV_GUEST_DIR/setup-ci.log"
echo "setup took $(( $(date +%s) - t0 )) s"

step "build release binaries"
# every binary a case starts: examples (testdev-server), emudevd, net-server (emudev-net)
cargo build --release --locked -p emudev-examples -p emudevd -p emudev-net -p emudev-avf --bins || fail "release build failed"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export BIN=$TARGET_DIR/release
# For case-testdev: the static guest-mmio tool and the guest kernel module. A failure here
# only warns; the cases that need these files report them missing.
step "build guest tools (static guest-mmio, emudev_testdev.ko)"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
    --target x86_64-unknown-linux-gnu -p emudev-guest-tools || echo "WARN: guest-mmio build failed"
export GUEST_MMIO=$TARGET_DIR/x86_64-unknown-linux-gnu/release/guest-mmio
bash tests/guest/build-testdev-driver.sh || echo "WARN: emudev_testdev.ko build failed"
export RUN_GUEST=$ROOT/tests/guest/boot.sh
export GUEST_LOGS=$ROOT/target/guest-logs
mkdir -p "$GUEST_LOGS"

cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(tests/guest/case-*.sh)
pass=0 failn=0 failed=()
for c in "${cases[@]}"; do
    name=$(basename "$c" .sh)
    step "guest case $name"
    t0=$(date +%s)
    if timeout -k 10 900 bash "$c" >"$GUEST_LOGS/$name.out" 2>&1; then
        pass=$((pass + 1)); echo "PASS $name ($(( $(date +%s) - t0 )) s)"
    else
        rc=$?; failn=$((failn + 1)); failed+=("$name")
        echo "FAIL $name (rc $rc, $(( $(date +%s) - t0 )) s); last lines:"
        tail -40 "$GUEST_LOGS/$name.out"
    fi
done
echo "guest: $pass passed, $failn failed"
[ "$failn" = 0 ] || fail "guest cases failed: ${failed[*]}"
