#!/usr/bin/env bash
# Guest suite: boots a real Linux guest under QEMU 11.1 with our devices attached over
# vfio-user and runs a script inside it, for every case in tests/guest/*.sh.
# Needs root and about 1 GB of disk for the cached rootfs (outside the repo); skips clearly
# otherwise. Usage: scripts/guest-tests.sh [CASE...]
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ROOT=$(pwd)
export HARNESS_DIR=${HARNESS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/emudev-harness}
SHARED_HARNESS=${SHARED_HARNESS:-$ROOT/../shared/harness}

skip() { echo "SKIPPED guest suite: $*"; echo "guest: 0 passed, 0 failed"; exit 0; }
[ "$(id -u)" = 0 ] || skip "needs root (debootstrap, QEMU)"
[ -x "$SHARED_HARNESS/setup.sh" ] || skip "no harness at $SHARED_HARNESS"
mkdir -p "$HARNESS_DIR"
avail_kb=$(df -Pk "$HARNESS_DIR" | awk 'NR==2 { print $4 }')
[ "${avail_kb:-0}" -gt 1500000 ] || skip "less than 1.5 GB free under $HARNESS_DIR"

step "harness setup (cached in $HARNESS_DIR)"
if ! bash "$SHARED_HARNESS/setup.sh" >"$HARNESS_DIR/setup-ci.log" 2>&1; then
    tail -30 "$HARNESS_DIR/setup-ci.log"; fail "harness setup failed"
fi

step "build release binaries"
cargo build --release --locked -p emudev-examples -p emudevd --bins || fail "release build failed"
export BIN=$ROOT/target/release
# For case-testdev: the static guest-mmio tool and the guest kernel module. A failure here
# only warns; the cases that need these files report them missing.
step "build guest tools (static guest-mmio, emudev_testdev.ko)"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
    --target x86_64-unknown-linux-gnu -p emudev-guest-tools || echo "WARN: guest-mmio build failed"
export GUEST_MMIO=$ROOT/target/x86_64-unknown-linux-gnu/release/guest-mmio
bash tests/guest/build-testdev-driver.sh || echo "WARN: emudev_testdev.ko build failed"
export RUN_GUEST=$SHARED_HARNESS/run-guest.sh
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
