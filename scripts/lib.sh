# Shared helpers for the project's scripts (sourced).
step() { printf '\n==== %s [%s]\n' "$*" "$(date +%T)"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
# Print one closing line "N passed, N failed" summing every cargo test binary's result.
summarize_cargo_test() {
    awk '/^test result:/ { p += $4; f += $6; i += $8 }
         END { printf "cargo tests: %d passed, %d failed, %d ignored\n", p, f, i }' "$1"
}
