#!/usr/bin/env bash
# docs/libvirt.md's domain, started by Debian trixie's libvirt 11.3 with `virsh create`.
# No libvirt on the host: libvirt-daemon, -driver-qemu and -clients are installed (on first
# use) into the guest cache's rootfs, whose /usr/bin/qemu-system-x86_64 is QEMU 11.1, and
# virtlogd + libvirtd run there (chroot, with the rootfs bind-mounted on itself and /proc,
# /sys, /dev mounted: what libvirt's per-domain mount namespace needs).
# The XML is docs/libvirt/emudev-vm1.xml with one change: type='kvm' becomes type='qemu'
# without hardware KVM. emudevd runs on the host with the devices of docs/libvirt/vm1.env
# (paths moved under the rootfs; --socket-group 64055 is what lets QEMU, run by libvirt as
# libvirt-qemu, connect). Checks: `virsh domxml-to-native` shows shared memfd RAM and our
# -device; after `virsh create` the guest sees the disk (1 GiB, 2 queues), writes to it,
# powers off, libvirt destroys the domain (on_poweroff), and the write is in the image.
# Not run: the systemd unit and the hook (no systemd in the rootfs).
. "$(dirname "$0")/lib.sh"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
GUEST_TOOL=$ROOT/tests/guest/emudev-guest
eval "$("$GUEST_TOOL" env)"
R=$GUEST_ROOTFS
DOCS=$ROOT/docs/libvirt
MOUNTS=() PIDFILES=(/run/libvirt/emudev-case-libvirtd.pid /run/libvirt/emudev-case-virtlogd.pid)
case_cleanup() {
    if [ -s "$R${PIDFILES[0]}" ]; then
        in_root virsh -c qemu:///system destroy emudev-vm1 >/dev/null 2>&1
    fi
    for p in "${PIDFILES[@]}"; do
        [ -s "$R$p" ] && kill "$(cat "$R$p")" 2>/dev/null
    done
    sleep 1
    cleanup
    rm -rf "$R/var/lib/emudev" "$R/var/log/emudev" "$R/run/emudev" "$R/tmp/emudev-vm1.xml"
    for m in ${MOUNTS[@]+"${MOUNTS[@]}"}; do umount "$m" || echo "WARN: cannot unmount $m"; done
}
trap case_cleanup EXIT
in_root() { chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin HOME=/root LC_ALL=C \
            DEBIAN_FRONTEND=noninteractive "$@"; }
mount_at() {  # mount_at DIR MOUNT-ARGS...: mount, and unmount at exit (in reverse order)
    local dir=$1; shift
    mount "$@" "$dir" && MOUNTS=("$dir" ${MOUNTS[@]+"${MOUNTS[@]}"})
}
if mountpoint -q "$R"; then echo "FAIL: $R is already a mount point (a run still going?)"; exit 1; fi
mount_at "$R" --bind "$R" && mount --make-private "$R" || exit 1
mount_at "$R/proc" -t proc proc || exit 1
mount_at "$R/sys" -t sysfs sysfs || exit 1
mount_at "$R/dev" -t devtmpfs devtmpfs || exit 1

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
in_root virtlogd --daemon --pid-file "${PIDFILES[1]}" || { echo "FAIL: virtlogd"; exit 1; }
in_root libvirtd --daemon --pid-file "${PIDFILES[0]}" || { echo "FAIL: libvirtd"; exit 1; }
argv=""
for _ in $(seq 30); do
    argv=$(in_root virsh -c qemu:///system domxml-to-native qemu-argv --xml /tmp/emudev-vm1.xml 2>"$WORKDIR/virsh.err") && break
    sleep 1
done
[ -n "$argv" ] || { cat "$WORKDIR/virsh.err"; echo "FAIL: virsh domxml-to-native"; exit 1; }
echo "== libvirt's argv"; echo "$argv"
for want in '"qom-type":"memory-backend-memfd","id":"pc.ram","share":true' 'memory-backend=pc.ram' \
            '{"driver":"vfio-user-pci","id":"emudev-vda","socket":{"type":"unix","path":"/run/emudev/vm1/vda.sock"}}'; do
    grep -qF -- "$want" <<<"$argv" || { echo "FAIL: argv lacks $want"; exit 1; }
done

# --- emudevd with vm1.env's devices, host paths under the rootfs
mkdir -p "$R/var/lib/emudev/vm1" "$R/var/log/emudev" "$R/run/emudev/vm1"
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
args=$(sed -n 's/^EMUDEV_ARGS=//p' "$DOCS/vm1.env" | sed "s#=/#=$R/#g")
echo "emudevd $args"
# shellcheck disable=SC2086 # EMUDEV_ARGS is a word list, as systemd splits it
start_server vm1 "$BIN/emudevd" $args
wait_socket "$R/run/emudev/vm1/vda.sock" || exit 1

# --- virsh create, as a user would
console=$R/var/log/emudev/vm1-console.log
in_root virsh -c qemu:///system create /tmp/emudev-vm1.xml || { echo "FAIL: virsh create"; exit 1; }
t0=$(date +%s) rc="" users=""
while [ $(( $(date +%s) - t0 )) -lt "${GUEST_TIMEOUT:-240}" ]; do
    if [ -z "$users" ]; then users=$(ps -o user= -C qemu-system-x86_64 | sort -u | tr '\n' ' '); fi
    rc=$(grep -ao 'EMUDEV-GUEST-EXIT=[0-9]*' "$console" 2>/dev/null | cut -d= -f2)
    [ -n "$rc" ] && break
    sleep 0.5
done
echo "QEMU ran as: ${users:-?}"
gone=0
for _ in $(seq 30); do   # on_poweroff destroy: libvirt ends the domain
    in_root virsh -c qemu:///system domstate emudev-vm1 >/dev/null 2>&1 || { gone=1; break; }
    sleep 1
done
in_root virsh -c qemu:///system list --all
echo "== guest console"; cat "$console"
cp "$console" "$GUEST_LOGS/$CASE.console.log"
cp "$R/var/log/libvirt/qemu/emudev-vm1.log" "$GUEST_LOGS/$CASE.libvirt-qemu.log" 2>/dev/null
[ "$rc" = 0 ] || { echo "FAIL: the guest did not finish with status 0 (got '${rc}')"; exit 1; }
[ $gone = 1 ] || { echo "FAIL: the domain is still defined after power-off"; exit 1; }
dd if="$R/var/lib/emudev/vm1/disk.img" bs=4096 skip=77 count=1 2>/dev/null |
    grep -aq EMUDEV-DOCS-LIBVIRT-MARKER || { echo "FAIL: the guest's write is not in the image"; exit 1; }
echo "docs/libvirt domain under virsh create: OK"
