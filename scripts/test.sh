#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests, a bounded fuzz run,
# and the guest suite (real QEMU 11.1 + Linux guest) when this machine can run it.
# Usage: scripts/test.sh            (CI calls exactly this through .ci/run)
#        SKIP_GUEST=1 scripts/test.sh   to leave out the guest suite
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

step "toolchain"
cargo --version
rustup component add rustfmt clippy >/dev/null 2>&1 || true

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test --workspace"
cargo test --workspace --locked 2>&1 | tee target/cargo-test.log
summarize_cargo_test target/cargo-test.log

step "fuzz smoke (bounded)"
if [ -x scripts/fuzz.sh ]; then
    FUZZ_SECONDS=${FUZZ_SECONDS:-60} scripts/fuzz.sh || fail "fuzz run failed"
else
    echo "no fuzz script"
fi

step "guest suite (QEMU 11.1 + Linux guest)"
if [ "${SKIP_GUEST:-0}" = 1 ]; then
    echo "SKIPPED: SKIP_GUEST=1"
else
    scripts/guest-tests.sh
fi
step "all done"
