#!/usr/bin/env bash
# virtio-fs through the vhost-user bridge (issue 10): virtiofsd (from the guest cache's
# rootfs, run on the host through the rootfs's own loader like the cache's qemu wrapper)
# serves a host directory; emudevd presents it as a virtio-fs device over vfio-user; the
# guest mounts it, reads a file the host wrote and writes files the host then checks.
# SKIPs (exit 0) only when virtiofsd is not in the guest cache (tests/guest/guest.conf).
. "$(dirname "$0")/lib.sh"
eval "$("$(dirname "$0")/emudev-guest" env)"
VFSD=$GUEST_ROOTFS/usr/libexec/virtiofsd
if [ ! -x "$VFSD" ]; then
    echo "SKIP: no virtiofsd in the guest cache ($VFSD); run tests/guest/emudev-guest setup"
    exit 0
fi
lib=$GUEST_ROOTFS/usr/lib/x86_64-linux-gnu
share=$WORKDIR/share vsock=$WORKDIR/virtiofsd.sock sock=$WORKDIR/fs.sock
mkdir -p "$share"
echo "written by the host $$" >"$share/from-host.txt"
start_server virtiofsd "$lib/ld-linux-x86-64.so.2" --library-path "$lib" "$VFSD" \
    --socket-path="$vsock" --shared-dir="$share" --sandbox=none --cache=never
wait_socket "$vsock" || exit 1
start_server emudevd "$BIN/emudevd" --device "virtio-fs,socket=$sock,path=$vsock,tag=emudevfs"
wait_socket "$sock" || exit 1
cat >"$WORKDIR/guest.sh" <<GUEST
#!/bin/sh
set -e
mkdir -p /mnt/fs
mount -t virtiofs emudevfs /mnt/fs || { dmesg | tail -20; exit 10; }
got=\$(cat /mnt/fs/from-host.txt)
[ "\$got" = "written by the host $$" ] || { echo "read '\$got'"; exit 11; }
echo "written by the guest" >/mnt/fs/from-guest.txt
mkdir /mnt/fs/dir
dd if=/dev/urandom of=/tmp/big bs=64k count=64 2>/dev/null
cp /tmp/big /mnt/fs/dir/big
sync
cmp /tmp/big /mnt/fs/dir/big || exit 12
echo "BIG-MD5 \$(md5sum </tmp/big | cut -d' ' -f1)"
umount /mnt/fs
echo "GUEST-VHOST-FS-OK"
GUEST
guest "$WORKDIR/guest.sh" --vfio-user "$sock"
rc=$?
[ $rc = 0 ] || { echo "guest failed (rc $rc)"; exit 1; }
[ "$(cat "$share/from-guest.txt" 2>/dev/null)" = "written by the guest" ] ||
    { echo "the host does not see the guest's file"; ls -la "$share"; exit 1; }
want=$(grep -a -o 'BIG-MD5 [0-9a-f]*' "$GUEST_LOGS/$CASE.console.log" | tail -1 | cut -d' ' -f2)
have=$(md5sum <"$share/dir/big" | cut -d' ' -f1)
[ -n "$want" ] && [ "$want" = "$have" ] || { echo "big file differs: guest $want host $have"; exit 1; }
echo "vhost-user-fs bridge: OK"
