# Helpers for guest cases (sourced by tests/guest/case-*.sh).
# Provided by scripts/guest-tests.sh: BIN (release binaries), RUN_GUEST, GUEST_LOGS.
set -uo pipefail
CASE=$(basename "$0" .sh)
WORKDIR=$(mktemp -d "/tmp/emudev-$CASE.XXXXXX")
SERVER_PIDS=()
cleanup() {
    for p in ${SERVER_PIDS[@]+"${SERVER_PIDS[@]}"}; do kill "$p" 2>/dev/null; done
    for p in ${SERVER_PIDS[@]+"${SERVER_PIDS[@]}"}; do wait "$p" 2>/dev/null; done
    rm -rf "$WORKDIR"
}
trap cleanup EXIT

# start_server LOGNAME CMD... : run a server in the background, log to $GUEST_LOGS.
start_server() {
    local log=$GUEST_LOGS/$CASE-$1.server.log; shift
    RUST_LOG=${RUST_LOG:-info} "$@" >"$log" 2>&1 &
    SERVER_PIDS+=($!)
}

# wait_socket PATH : wait up to 10 s for a UNIX socket to appear.
wait_socket() {
    for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done
    echo "no socket at $1" >&2; return 1
}

# guest SCRIPT [run-guest args...] : boot the guest with the script; returns its status.
guest() {
    local script=$1; shift
    "$RUN_GUEST" --script "$script" --timeout "${GUEST_TIMEOUT:-240}" \
        --log "$GUEST_LOGS/$CASE.console.log" "$@"
}
