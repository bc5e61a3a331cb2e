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

# qmp SOCKET JSON [EVENT[:DEVICE] [SECS]] : one QMP command on a QEMU `-qmp unix:SOCKET,server=on,
# wait=off` monitor; prints the reply and fails on an error reply. With EVENT, then waits up
# to SECS (default 120) for that event (for DEVICE, with data.device == DEVICE).
qmp() {
    python3 - "$@" <<'PY'
import json, socket, sys, time
path, cmd = sys.argv[1], json.loads(sys.argv[2])
want = sys.argv[3] if len(sys.argv) > 3 else None
secs = float(sys.argv[4]) if len(sys.argv) > 4 else 120.0
deadline = time.time() + secs
while True:
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        break
    except OSError as e:
        if time.time() > deadline:
            sys.exit(f"qmp: cannot connect to {path}: {e}")
        time.sleep(0.2)
f = s.makefile("rw")
events = []
def recv():
    s.settimeout(max(0.1, deadline - time.time()))
    try:
        line = f.readline()
    except socket.timeout:
        sys.exit(f"qmp: timed out; events seen: {events}")
    if not line:
        sys.exit("qmp: QEMU closed the monitor")
    m = json.loads(line)
    if "event" in m:
        events.append(m)
    return m
def call(c):
    f.write(json.dumps(c) + "\n"); f.flush()
    while True:
        m = recv()
        if "return" in m or "error" in m:
            return m
recv()  # greeting
call({"execute": "qmp_capabilities"})
r = call(cmd)
print(json.dumps(r))
if "error" in r:
    sys.exit(1)
if want:
    name, _, dev = want.partition(":")
    def match(e):
        return e["event"] == name and (not dev or e.get("data", {}).get("device") == dev)
    while not any(match(e) for e in events):
        recv()
    print(f"qmp: event {want}")
PY
}
