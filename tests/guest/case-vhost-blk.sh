#!/usr/bin/env bash
# virtio-blk through the vhost-user bridge (issue 10): qemu-storage-daemon exports an image
# as vhost-user-blk (2 queues), emudevd bridges it to QEMU's vfio-user-pci with
# engine=vhost-user, and the guest's stock virtio_blk runs fio randwrite with crc32c verify.
# After power-off the host finds the guest's marker in the image. qsd runs the rings in the
# guest's memfd RAM, shared through the fds of the DMA maps.
# SKIPs (exit 0) only when qemu-storage-daemon is not installed.
. "$(dirname "$0")/lib.sh"
QSD=${QSD:-$(command -v qemu-storage-daemon || true)}
if [ -z "$QSD" ] || [ ! -x "$QSD" ]; then
    echo "SKIP: qemu-storage-daemon is not installed (Debian qemu-utils)"
    exit 0
fi
SIZE_MB=64
img=$WORKDIR/disk.img vsock=$WORKDIR/qsd.sock sock=$WORKDIR/blk.sock
truncate -s ${SIZE_MB}M "$img"
start_server qsd "$QSD" \
    --blockdev "driver=file,node-name=file0,filename=$img" \
    --export "type=vhost-user-blk,id=exp0,node-name=file0,writable=on,num-queues=2,addr.type=unix,addr.path=$vsock"
wait_socket "$vsock" || exit 1
start_server emudevd "$BIN/emudevd" --device "virtio-blk,socket=$sock,engine=vhost-user,path=$vsock"
wait_socket "$sock" || exit 1
cat >"$WORKDIR/guest.sh" <<GUEST
#!/bin/sh
set -e
[ -b /dev/vda ] || { echo "no /dev/vda"; ls /sys/block; exit 10; }
sectors=\$(cat /sys/block/vda/size)
echo "vda sectors=\$sectors queues=\$(ls /sys/block/vda/mq | wc -l)"
[ "\$sectors" = $((SIZE_MB * 2048)) ] || { echo "wrong size"; exit 11; }
fio --name=verify --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite \
    --bs=4k --iodepth=8 --numjobs=2 --size=8M --offset_increment=16M --verify=crc32c \
    --verify_fatal=1 --do_verify=1 --group_reporting >/tmp/fio.out 2>&1 || { cat /tmp/fio.out; exit 12; }
grep -E "err=|WRITE:|READ:" /tmp/fio.out
printf 'EMUDEV-VHOST-MARKER' | dd of=/dev/vda bs=512 seek=$((SIZE_MB * 2048 - 8)) conv=fsync 2>/dev/null
sync
echo "GUEST-VHOST-BLK-OK"
GUEST
guest "$WORKDIR/guest.sh" --vfio-user "$sock"
rc=$?
[ $rc = 0 ] || { echo "guest failed (rc $rc)"; exit 1; }
if ! dd if="$img" bs=512 skip=$((SIZE_MB * 2048 - 8)) count=1 2>/dev/null | grep -q EMUDEV-VHOST-MARKER; then
    echo "marker not in the image"; exit 1
fi
echo "vhost-user-blk bridge: OK"
