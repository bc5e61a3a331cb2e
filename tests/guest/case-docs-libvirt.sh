#!/usr/bin/env bash
# docs/libvirt.md's domain, through Debian trixie's libvirt 11.3: inside the guest cache's
# rootfs (chroot; libvirt-daemon-driver-qemu and libvirt-clients are installed there on
# first use), libvirtd turns docs/libvirt/emudev-vm1.xml into QEMU's argv
# (`virsh domxml-to-native qemu-argv`). The only change to the XML: type='kvm' becomes
# type='qemu' without hardware KVM. The case checks the argv (shared memfd RAM, our
# -device), starts emudevd on the host with the devices of docs/libvirt/vm1.env (paths
# moved under the rootfs), and runs exactly that argv in the chroot, doing libvirt's part
# on the QMP monitor (cont; quit after the guest is done). The guest must see the disk
# (1 GiB, 2 queues) and its write must reach the image. The systemd unit and the hook
# are not run (no systemd here).
. "$(dirname "$0")/lib.sh"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
GUEST_TOOL=$ROOT/tests/guest/emudev-guest
eval "$("$GUEST_TOOL" env)"
R=$GUEST_ROOTFS
DOCS=$ROOT/docs/libvirt
DOMDIR=/var/lib/libvirt/qemu/domain--1-emudev-vm1   # what libvirt names it in the argv
MOUNTS=() LIBVIRTD_PID=/run/libvirt/emudev-case.pid QEMU_PID=""
case_cleanup() {
    [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null
    if [ -s "$R$LIBVIRTD_PID" ]; then kill "$(cat "$R$LIBVIRTD_PID")" 2>/dev/null; sleep 1; fi
    cleanup
    for m in ${MOUNTS[@]+"${MOUNTS[@]}"}; do umount "$m" 2>/dev/null; done
    rm -rf "$R/var/lib/emudev" "$R/var/log/emudev" "$R/run/emudev" "$R$DOMDIR" "$R/tmp/emudev-vm1.xml"
}
trap case_cleanup EXIT
in_root() { chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin HOME=/root LC_ALL=C \
            DEBIAN_FRONTEND=noninteractive "$@"; }
mount_in() {  # mount_in TYPE DIR: a pseudo file system in the rootfs, undone at exit
    mountpoint -q "$R/$2" && return 0
    mount -t "$1" "$1" "$R/$2" && MOUNTS=("$R/$2" ${MOUNTS[@]+"${MOUNTS[@]}"})
}
mount_in proc proc || exit 1
mount_in sysfs sys || exit 1

pkgs="libvirt-daemon-driver-qemu libvirt-daemon libvirt-clients"
n=$(in_root dpkg-query -W -f='${db:Status-Status}\n' $pkgs 2>/dev/null | grep -cx installed)
if [ "$n" != 3 ]; then
    echo "installing $pkgs into $R (once; log $GUEST_LOGS/$CASE-apt.log)"
    in_root apt-get install -y -q $pkgs >"$GUEST_LOGS/$CASE-apt.log" 2>&1 ||
        { tail -20 "$GUEST_LOGS/$CASE-apt.log"; echo "FAIL: apt-get install libvirt"; exit 1; }
fi
echo "libvirt: $(in_root libvirtd --version)"

# --- the argv libvirt generates
xml=$R/tmp/emudev-vm1.xml
cp "$DOCS/emudev-vm1.xml" "$xml"
[ "$GUEST_ACCEL" = kvm ] || sed -i "s/<domain type='kvm'/<domain type='qemu'/" "$xml"
diff -u "$DOCS/emudev-vm1.xml" "$xml"
mkdir -p "$R/run/libvirt"
in_root libvirtd --daemon --pid-file "$LIBVIRTD_PID" || { echo "FAIL: libvirtd"; exit 1; }
argv=""
for _ in $(seq 30); do
    argv=$(in_root virsh -c qemu:///system domxml-to-native qemu-argv --xml /tmp/emudev-vm1.xml 2>"$WORKDIR/virsh.err") && break
    sleep 1
done
kill "$(cat "$R$LIBVIRTD_PID")"; sleep 1
[ -n "$argv" ] || { cat "$WORKDIR/virsh.err"; echo "FAIL: virsh domxml-to-native"; exit 1; }
echo "== libvirt's argv"; echo "$argv"
for want in '"qom-type":"memory-backend-memfd","id":"pc.ram","share":true' 'memory-backend=pc.ram' \
            '{"driver":"vfio-user-pci","id":"emudev-vda","socket":{"type":"unix","path":"/run/emudev/vm1/vda.sock"}}'; do
    grep -qF -- "$want" <<<"$argv" || { echo "FAIL: argv lacks $want"; exit 1; }
done

# --- emudevd with vm1.env's devices, host paths under the rootfs
mkdir -p "$R/var/lib/emudev/vm1" "$R/var/log/emudev" "$R/run/emudev/vm1" "$R$DOMDIR"
truncate -s 1G "$R/var/lib/emudev/vm1/disk.img"
cp "$GUEST_KERNEL" "$R/var/lib/emudev/vm1/vmlinuz"
cat >"$WORKDIR/guest.sh" <<'GUEST'
#!/bin/sh
[ -b /dev/vda ] || { echo "no /dev/vda"; lspci -nn; exit 10; }
echo "vda: $(cat /sys/block/vda/size) sectors, $(ls /sys/block/vda/mq | wc -l) queues"
[ "$(cat /sys/block/vda/size)" = 2097152 ] || exit 11
[ "$(ls /sys/block/vda/mq | wc -l)" = 2 ] || exit 12
printf 'EMUDEV-DOCS-LIBVIRT-MARKER' | dd of=/dev/vda bs=4096 seek=77 conv=fsync 2>/dev/null || exit 13
echo DOCS-LIBVIRT-GUEST-OK
GUEST
"$GUEST_TOOL" initrd --script "$WORKDIR/guest.sh" -o "$R/var/lib/emudev/vm1/initrd.img" || exit 1
head -c 32 /dev/urandom >"$R$DOMDIR/master-key.aes"
args=$(sed -n 's/^EMUDEV_ARGS=//p' "$DOCS/vm1.env" | sed "s#=/#=$R/#g")
echo "emudevd $args"
# shellcheck disable=SC2086 # EMUDEV_ARGS is a word list, as systemd splits it
start_server vm1 "$BIN/emudevd" $args
wait_socket "$R/run/emudev/vm1/vda.sock" || exit 1

# --- exactly that argv, in the rootfs; QMP does what libvirt would (cont, then quit)
console=$R/var/log/emudev/vm1-console.log
chroot "$R" /bin/sh -c "exec $argv" </dev/null >"$GUEST_LOGS/$CASE.qemu.log" 2>&1 &
QEMU_PID=$!
python3 - "$R$DOMDIR/monitor.sock" "$console" "${GUEST_TIMEOUT:-240}" <<'PY'
import json, os, re, socket, sys, time
mon, console, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
t0 = time.time()
while not os.path.exists(mon):
    if time.time() - t0 > 30: sys.exit("no QMP socket " + mon)
    time.sleep(0.1)
s = socket.socket(socket.AF_UNIX); s.connect(mon); f = s.makefile("rw")
def qmp(cmd):
    f.write(json.dumps({"execute": cmd}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r: return r
print("QMP greeting:", f.readline().strip()[:100])
print("qmp_capabilities:", qmp("qmp_capabilities"))
print("cont:", qmp("cont"))
rc = None
while time.time() - t0 < timeout:
    text = open(console, errors="replace").read() if os.path.exists(console) else ""
    m = re.search(r"EMUDEV-GUEST-EXIT=(\d+)", text)
    if m: rc = int(m.group(1)); break
    time.sleep(0.5)
time.sleep(2)   # let the guest reach power-off; -no-shutdown keeps QEMU up
print("quit:", qmp("quit"))
sys.exit(0 if rc == 0 else 1)
PY
rc=$?
wait "$QEMU_PID"; QEMU_PID=""
echo "== guest console"; cat "$console"
echo "== qemu"; cat "$GUEST_LOGS/$CASE.qemu.log"
cp "$console" "$GUEST_LOGS/$CASE.console.log"
[ $rc = 0 ] || { echo "FAIL: the guest did not finish with status 0"; exit 1; }
dd if="$R/var/lib/emudev/vm1/disk.img" bs=4096 skip=77 count=1 2>/dev/null |
    grep -aq EMUDEV-DOCS-LIBVIRT-MARKER || { echo "FAIL: the guest's write is not in the image"; exit 1; }
echo "docs/libvirt domain (libvirt's argv): OK"
