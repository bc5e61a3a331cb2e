#!/usr/bin/env bash
# virtio-blk in a real guest: the stock virtio_blk driver sees /dev/vda with the right size,
# fio randwrite with crc32c verify passes (2 jobs, 2 queues), and after power-off the host
# finds in the image what the guest wrote. Runs once with shared memfd RAM (DMA through our
# mmap) and once with --no-shared-mem (every DMA through DMA_READ/DMA_WRITE messages).
. "$(dirname "$0")/lib.sh"
SIZE_MB=64
run_mode() {
    local mode=$1; shift
    local img=$WORKDIR/disk-$mode.img sock=$WORKDIR/blk-$mode.sock
    truncate -s ${SIZE_MB}M "$img"
    start_server "$mode" "$BIN/emudevd" --device "virtio-blk,socket=$sock,path=$img,num-queues=2"
    wait_socket "$sock" || return 1
    cat >"$WORKDIR/guest-$mode.sh" <<GUEST
#!/bin/sh
set -e
[ -b /dev/vda ] || { echo "no /dev/vda"; ls /sys/block; exit 10; }
sectors=\$(cat /sys/block/vda/size)
echo "vda sectors=\$sectors"
[ "\$sectors" = $((SIZE_MB * 2048)) ] || { echo "wrong size"; exit 11; }
echo "queues: \$(ls /sys/block/vda/mq | wc -l)"
fio --name=verify --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite \
    --bs=4k --iodepth=8 --numjobs=2 --size=8M --offset_increment=16M --verify=crc32c \
    --verify_fatal=1 --do_verify=1 --group_reporting >/tmp/fio.out 2>&1 || { cat /tmp/fio.out; exit 12; }
grep -E "err=|WRITE:|READ:" /tmp/fio.out
# A marker the host checks in the image after power-off.
printf 'EMUDEV-MARKER-$mode' | dd of=/dev/vda bs=512 seek=$((SIZE_MB * 2048 - 8)) conv=fsync 2>/dev/null
sync
echo "GUEST-BLK-OK"
GUEST
    local extra=()
    [ "$mode" = noshared ] && extra=(--no-shared-mem)
    guest "$WORKDIR/guest-$mode.sh" --vfio-user "$sock" ${extra[@]+"${extra[@]}"}
    local rc=$?
    kill "${SERVER_PIDS[-1]}"; wait "${SERVER_PIDS[-1]}" 2>/dev/null
    [ $rc = 0 ] || { echo "guest failed in mode $mode (rc $rc)"; return 1; }
    if ! dd if="$img" bs=512 skip=$((SIZE_MB * 2048 - 8)) count=1 2>/dev/null | grep -q "EMUDEV-MARKER-$mode"; then
        echo "marker not in the image ($mode)"; return 1
    fi
    echo "mode $mode: OK"
}
for m in ${MODES:-shared noshared}; do run_mode "$m" || exit 1; done
