#!/usr/bin/env bash
# Run every cargo-fuzz target of fuzz/ for SECS seconds each (default 60).
#
#   scripts/fuzz.sh [SECS]
#
# Needs cargo-fuzz (installed here if missing) and a nightly toolchain for the sanitizer
# flags. Without nightly, RUSTC_BOOTSTRAP=1 lets the stable compiler accept the -Z flags
# cargo-fuzz passes; we fall back to that (with --sanitizer none) automatically.
# Crashes land in fuzz/artifacts/<target>/. The checked-in seeds in fuzz/corpus/<target>/ are
# read only; new inputs go to fuzz/target/corpus/<target>/ (git-ignored), which later runs
# reuse. Regenerate the seeds with: cargo test -p emudev-tests --test fuzz_seeds -- --ignored
set -euo pipefail
shopt -s nullglob

secs="${1:-60}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

toolchain=()
sanitizer=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    echo "fuzz.sh: no nightly toolchain; using stable with RUSTC_BOOTSTRAP=1 and no sanitizer" >&2
    export RUSTC_BOOTSTRAP=1
    sanitizer=(--sanitizer none)
fi

# One job on a 2-core machine: leave a core for everyone else.
for target in $(cargo "${toolchain[@]}" fuzz list); do
    echo "fuzz.sh: ${target} for ${secs}s" >&2
    mkdir -p "target/corpus/${target}"
    # Every checked-in seed set is read by every target (they share the stream layout).
    seeds=(corpus/*/)
    cargo "${toolchain[@]}" fuzz run "${sanitizer[@]}" "$target" \
        "target/corpus/${target}" "${seeds[@]}" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -max_len=65536 -print_final_stats=1
done
