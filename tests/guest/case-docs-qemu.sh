#!/usr/bin/env bash
# docs/qemu.md's tested command line: runs the block marked "tested-command" verbatim (sh -e)
# in a directory holding the test cache's kernel (vmlinuz) and an initramfs (initrd.img)
# whose script checks /dev/vda (1 GiB, 2 queues) and writes a marker to it. Then the host
# finds the marker in disk.img, and emudevd (stopped by the block's own `kill`) has removed
# its socket and pidfile. ACCEL comes from the machine (tcg unless hardware KVM).
. "$(dirname "$0")/lib.sh"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
GUEST_TOOL=$ROOT/tests/guest/emudev-guest
eval "$("$GUEST_TOOL" env)"
DOC=$ROOT/docs/qemu.md
snippet=$WORKDIR/snippet.sh
awk '/<!-- tested-command/ { on = 1; next }
     on && /^```sh/ { inblock = 1; next }
     inblock && /^```/ { exit }
     inblock { print }' "$DOC" >"$snippet"
[ -s "$snippet" ] || { echo "FAIL: no tested-command block in $DOC"; exit 1; }
echo "== the block from $DOC"; cat "$snippet"

cat >"$WORKDIR/guest.sh" <<'GUEST'
#!/bin/sh
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 10; }
echo "vda: $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queues"
[ "$(cat /sys/block/vda/size)" = 2097152 ] || exit 11
[ "$(ls /sys/block/vda/mq | wc -l)" = 2 ] || exit 12
printf 'EMUDEV-DOCS-QEMU-MARKER' | dd of=/dev/vda bs=4096 seek=1000 conv=fsync 2>/dev/null || exit 13
echo DOCS-QEMU-GUEST-OK
GUEST
run=$WORKDIR/run
mkdir -p "$run"
ln -s "$GUEST_KERNEL" "$run/vmlinuz"
"$GUEST_TOOL" initrd --script "$WORKDIR/guest.sh" -o "$run/initrd.img" || exit 1
console=$GUEST_LOGS/$CASE.console.log
echo "== running it in $run (ACCEL=$GUEST_ACCEL)"
(cd "$run" && PATH=$BIN:$EMUDEV_GUEST_DIR/bin:$PATH ACCEL=$GUEST_ACCEL \
    timeout -k 10 "${GUEST_TIMEOUT:-240}" sh -e "$snippet") </dev/null >"$console" 2>&1
rc=$?
if [ -s "$run/emudevd.pid" ]; then   # the block stopped early: stop its emudevd too
    kill "$(cat "$run/emudevd.pid")" 2>/dev/null; sleep 1
fi
tail -20 "$console"
[ $rc = 0 ] || { echo "FAIL: the documented commands exited $rc"; exit 1; }
grep -aq 'EMUDEV-GUEST-EXIT=0' "$console" || { echo "FAIL: the guest script failed"; exit 1; }
dd if="$run/disk.img" bs=4096 skip=1000 count=1 2>/dev/null | grep -aq EMUDEV-DOCS-QEMU-MARKER \
    || { echo "FAIL: the guest's write is not in disk.img"; exit 1; }
for f in vda.sock emudevd.pid; do
    [ ! -e "$run/$f" ] || { echo "FAIL: $f left behind after SIGTERM"; exit 1; }
done
echo "docs/qemu.md command line: OK"
