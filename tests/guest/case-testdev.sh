#!/usr/bin/env bash
# The emudev test device (testdev-server) in a real Linux guest, once with shared memfd RAM
# and once with --no-shared-mem (DMA through DMA_READ/DMA_WRITE messages). The guest checks:
# PCI ids, a BAR0 register read/write through sysfs mmap, our kernel module
# (tests/guest/testdev-driver) binding with MSI-X enabled, two MSI-X vectors raised by the
# device reaching their handlers, device DMA (FILL writes, CHECKSUM reads, COPY both) with
# completion interrupts, a DMA outside guest RAM failing cleanly, the trapped doorbell
# register, the mappable doorbell page, rmmod, a second insmod/selftest/rmmod.
# Each check prints "TESTDEV-CHECK PASS|FAIL <mode>: <what>" in the console log.
# Needs: $BIN/testdev-server, target/guest/emudev_testdev.ko (build-testdev-driver.sh) and
# a static guest-mmio ($GUEST_MMIO, default target/x86_64-unknown-linux-gnu/release/).
. "$(dirname "$0")/lib.sh"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
KO=${TESTDEV_KO:-$ROOT/target/guest/emudev_testdev.ko}
MMIO=${GUEST_MMIO:-${CARGO_TARGET_DIR:-$ROOT/target}/x86_64-unknown-linux-gnu/release/guest-mmio}
for f in "$BIN/testdev-server" "$KO" "$MMIO"; do
    [ -e "$f" ] || { echo "FAIL: missing $f"; exit 1; }
done
# Checks the guest must report per mode; fewer means the guest stopped early.
EXPECTED_CHECKS=23

cat >"$WORKDIR/guest.sh" <<'GUEST'
#!/bin/sh
MODE=$(cat /extra/mode)
M=/extra/guest-mmio
chmod +x $M
fails=0 checks=0
pass() { checks=$((checks + 1)); echo "TESTDEV-CHECK PASS $MODE: $*"; }
fail() { checks=$((checks + 1)); fails=$((fails + 1)); echo "TESTDEV-CHECK FAIL $MODE: $*"; }
# check WHAT CMD... : PASS when CMD succeeds
check() { w=$1; shift; if "$@"; then pass "$w"; else fail "$w"; fi; }
finish() { echo "TESTDEV: $MODE: $checks checks, $fails failed"; exit $((fails > 0 ? 1 : 0)); }

dev=""
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor")" = 0xe0de ] && [ "$(cat "$d/device")" = 0xe0de ] && dev=$d
done
echo "+ lspci -nn"; lspci -nn
if [ -z "$dev" ]; then fail "device e0de:e0de present"; finish; fi
bdf=${dev##*/}
check "lspci -nn shows [e0de:e0de] at $bdf" sh -c "lspci -nn -s $bdf | grep -q '\[e0de:e0de\]'"

# BAR0 register access from user space (sysfs mmap; trapped REGION_READ/WRITE)
id=$($M "$dev/resource0" read 0); echo "BAR0 ID = $id"
check "BAR0 ID register reads MAGIC 0xe0de7e57 (got $id)" [ "$id" = 0xe0de7e57 ]
$M "$dev/resource0" write 0x8 0xc0ffee42
s=$($M "$dev/resource0" read 0x8); echo "BAR0 SCRATCH = $s"
check "BAR0 SCRATCH write/read back (got $s)" [ "$s" = 0xc0ffee42 ]

# the driver
echo "+ insmod emudev_testdev.ko"
if insmod /extra/emudev_testdev.ko; then pass "insmod"; else fail "insmod"; fi
dmesg | grep -i emudev
drv=$(readlink "$dev/driver" 2>/dev/null); echo "driver: $drv"
if [ "${drv##*/}" != emudev_testdev ] || [ ! -e "$dev/selftest" ]; then
    fail "emudev_testdev bound to $bdf"; finish
fi
pass "emudev_testdev bound to $bdf"
echo "+ lspci -vv -s $bdf"; lspci -vv -s "$bdf"
caps=$(lspci -vv -s "$bdf" | sed -n 's/^[[:space:]]*Capabilities: \[[0-9a-f]*\] //p' | cut -c1-24 | tr '\n' '|')
echo "capability chain: $caps"
case $caps in
    *"Power Management"*"Vendor Specific"*"MSI-X: Enable+ Count=4"*) pass "lspci -vv capability chain PM, vendor, MSI-X: Enable+ Count=4" ;;
    *) fail "lspci -vv capability chain PM, vendor, MSI-X: Enable+ Count=4 (got $caps)" ;;
esac
echo "+ grep emudev /proc/interrupts"; grep emudev /proc/interrupts

# irqs VECTOR: total count of handler "emudev-testdev-VECTOR" over all CPUs
irqs() {
    awk -v n="emudev-testdev-$1" '$NF == n { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; print s; f = 1 }
        END { if (!f) print -1 }' /proc/interrupts
}
# selftest CMD: run a driver selftest, print its result, succeed on "ok"
selftest() {
    echo "$1" >"$dev/selftest" || { echo "selftest $1: write failed"; return 1; }
    r=$(cat "$dev/selftest"); echo "selftest $1: $r"
    case $r in ok*) return 0 ;; *) return 1 ;; esac
}
for v in 0 1; do
    b=$(irqs $v)
    if selftest "irq $v"; then ok=1; else ok=0; fi
    a=$(irqs $v)
    echo "/proc/interrupts emudev-testdev-$v: $b -> $a"
    check "MSI-X vector $v: handler ran, /proc/interrupts $b -> $a" [ "$ok" = 1 -a "$b" -ge 0 -a "$a" -gt "$b" ]
done

# device DMA: writes (fill), reads (checksum), both (copy); default size is 3 pages + 123;
# bad: a job outside guest RAM must fail cleanly (status ERROR) and the device keep working
for t in fill checksum copy "fill 1" bad "checksum 262149" "copy 262149"; do
    check "DMA selftest $t" selftest "$t"
done

# trapped doorbell register
$M "$dev/resource0" write 0xc 0x77
dc=$($M "$dev/resource0" read 0x10) dl=$($M "$dev/resource0" read 0x14)
echo "DOORBELL_COUNT=$dc DOORBELL_LAST=$dl"
check "trapped DOORBELL counted (count $dc, last $dl)" [ "$((dc))" -ge 1 -a "$dl" = 0x77 ]

# mappable doorbell page (BAR2): the device polls it, counts and acknowledges with 0
echo "sysfs resource BAR2: $(sed -n 3p "$dev/resource")"
c0=$($M "$dev/resource0" read 0x54)
$M "$dev/resource2" write 0 0x1234
seen=0
for _ in $(seq 50); do
    c=$($M "$dev/resource0" read 0x54) l=$($M "$dev/resource0" read 0x58)
    if [ "$((c))" -gt "$((c0))" ] && [ "$l" = 0x1234 ]; then seen=1; break; fi
    sleep 0.1
done
echo "PAGE_COUNT $c0 -> $c, PAGE_LAST $l"
check "doorbell page write seen by the device (PAGE_COUNT $c0 -> $c, PAGE_LAST $l)" [ $seen = 1 ]
p=$($M "$dev/resource2" read 0)
check "doorbell page slot acknowledged back to 0 (got $p)" [ "$p" = 0x0 ]

# unload
echo "+ rmmod emudev_testdev"
check "rmmod" rmmod emudev_testdev
check "driver unbound" [ ! -e "$dev/driver" ]
# a second bind: MSI-X set up again from scratch, DMA still works, clean unload again
echo "+ insmod again"
insmod /extra/emudev_testdev.ko
check "rebind: MSI-X vector 0 and DMA copy after reload" sh -c \
    "[ -e $dev/selftest ] && echo 'irq 0' >$dev/selftest && grep -q '^ok' $dev/selftest && echo copy >$dev/selftest && grep -q '^ok' $dev/selftest"
cat "$dev/selftest" 2>/dev/null
check "rmmod after reload" rmmod emudev_testdev
dmesg | grep -i emudev | tail -5
if dmesg | grep -E -q 'BUG:|WARNING:|Oops|general protection'; then
    dmesg | grep -E -A20 'BUG:|WARNING:|Oops|general protection'
    fail "kernel log free of BUG/WARNING/Oops"
else
    pass "kernel log free of BUG/WARNING/Oops"
fi
finish
GUEST

overall=0
for mode in shared noshared; do
    echo "==== mode $mode"
    sock=$WORKDIR/t-$mode.sock
    start_server "$mode" "$BIN/testdev-server" --socket "$sock"
    srv=${SERVER_PIDS[-1]}
    wait_socket "$sock" || { echo "FAIL $mode: server did not start"; overall=1; continue; }
    echo "$mode" >"$WORKDIR/mode"
    args=(--vfio-user "$sock" --file "$KO" --file "$MMIO" --file "$WORKDIR/mode")
    [ "$mode" = noshared ] && args+=(--no-shared-mem)
    console=$GUEST_LOGS/$CASE-$mode.console.log
    guest "$WORKDIR/guest.sh" "${args[@]}" --log "$console" >/dev/null 2>&1
    rc=$?
    kill "$srv" 2>/dev/null; wait "$srv" 2>/dev/null
    grep -a 'TESTDEV-CHECK' "$console"
    n=$(grep -a -c 'TESTDEV-CHECK' "$console") nf=$(grep -a -c 'TESTDEV-CHECK FAIL' "$console")
    if [ "$rc" != 0 ] || [ "$n" != "$EXPECTED_CHECKS" ] || [ "$nf" != 0 ]; then
        echo "FAIL $mode: guest rc $rc, $n of $EXPECTED_CHECKS checks reported, $nf failed"
        echo "  console: $console"
        echo "  server log: $GUEST_LOGS/$CASE-$mode.server.log"
        tail -20 "$GUEST_LOGS/$CASE-$mode.server.log"
        overall=1
    else
        echo "PASS $mode: all $n checks"
    fi
done
exit $overall
