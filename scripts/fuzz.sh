#!/usr/bin/env bash
# Run every cargo-fuzz target of fuzz/ for SECS seconds each (default 60).
#
#   scripts/fuzz.sh [SECS]        (or FUZZ_SECONDS=SECS scripts/fuzz.sh)
#
# Needs cargo-fuzz (installed here if missing) and a nightly toolchain for the sanitizer
# flags. Without nightly, RUSTC_BOOTSTRAP=1 lets the stable compiler accept the -Z flags
# cargo-fuzz passes; we fall back to that (with --sanitizer none) automatically.
# Crashes land in fuzz/artifacts/<target>/. The fuzz crate builds into fuzz/target/ (kept
# between runs, so CI should cache it; only the first run pays for the build). The checked-in seeds in fuzz/corpus/<target>/ are
# read only; new inputs go to fuzz/target/corpus/<target>/ (git-ignored), which later runs
# reuse. Regenerate the seeds with: cargo test -p emudev-tests --test fuzz_seeds -- --ignored
# (vfio-user targets) and, from fuzz/, python3 seeds/gen_seeds.py (virtqueue,
# virtio_pci_regs, emudevd_config).
set -euo pipefail
shopt -s nullglob

secs="${1:-${FUZZ_SECONDS:-60}}"
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
    # The vfio-user targets share one stream layout and read each other's seeds; every other
    # target has its own input layout and reads only its own seeds.
    case "$target" in
        vfio_user_*) seeds=(corpus/vfio_user_*/) ;;
        *) seeds=(corpus/"${target}"/) ;;
    esac
    # virtio_pci_regs starts real queues on a poller thread that allocates asynchronously:
    # LeakSanitizer would scan the heap after every input (30x slower) and report the
    # thread's in-flight buffers.
    extra=()
    case "$target" in
        virtio_pci_regs) extra=(-detect_leaks=0) ;;
    esac
    cargo "${toolchain[@]}" fuzz run "${sanitizer[@]}" "$target" \
        "target/corpus/${target}" "${seeds[@]}" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -max_len=65536 -print_final_stats=1 "${extra[@]}"
done
