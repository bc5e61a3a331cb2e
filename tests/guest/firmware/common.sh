# Shared helpers for the firmware-boot image builders and cases (sourced, bash).
# Images are built without loop devices or mounts: sfdisk writes the partition table, mtools
# writes the FAT file systems, syslinux (mtools flavour) installs the BIOS loader at an offset,
# objcopy glues the UKI around systemd-boot's stub. Built images are cached outside the repo
# under $FW_CACHE, keyed by a hash of every input.
set -uo pipefail
FW_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export HARNESS_DIR=${HARNESS_DIR:-${EMUDEV_GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/emudev-guest}}
FW_ROOTFS=$HARNESS_DIR/rootfs
FW_QEMU=$HARNESS_DIR/bin/qemu-system-x86_64
FW_CACHE=${FW_CACHE:-$HARNESS_DIR/firmware-images}
FW_BUSYBOX=$FW_ROOTFS/usr/bin/busybox   # static: runs on the host
FW_SYSLINUX_MBR=/usr/lib/syslinux/mbr/mbr.bin
FW_EFI_STUB=/usr/lib/systemd/boot/efi/linuxx64.efi.stub
FW_OVMF_CODE=$FW_ROOTFS/usr/share/OVMF/OVMF_CODE_4M.fd
FW_OVMF_VARS=$FW_ROOTFS/usr/share/OVMF/OVMF_VARS_4M.fd
# What the guest prints once /init ran our /run.sh; the cases time QEMU start to this line.
FW_MARKER=EMUDEV-FWBOOT-MARKER
FW_CMDLINE="console=ttyS0 panic=-1 loglevel=4"

fw_die() { echo "firmware: $*" >&2; exit 1; }

# fw_need_host_pkgs: install the host's image tools if missing (idempotent, Debian apt).
fw_need_host_pkgs() {
    local missing=()
    command -v mcopy >/dev/null || missing+=(mtools)
    command -v sfdisk >/dev/null || missing+=(fdisk)
    command -v syslinux >/dev/null || missing+=(syslinux)
    [ -f /usr/lib/syslinux/modules/bios/ldlinux.c32 ] || missing+=(syslinux-common)
    [ -f "$FW_SYSLINUX_MBR" ] || missing+=(syslinux-common)
    [ -f "$FW_EFI_STUB" ] || missing+=(systemd-boot-efi)
    command -v objcopy >/dev/null || missing+=(binutils)
    [ ${#missing[@]} = 0 ] && return 0
    echo "firmware: installing host packages: ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 \
        || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y \
                 --no-install-recommends "${missing[@]}" >&2; } \
        || fw_die "apt-get install ${missing[*]} failed"
}

# fw_need_ovmf: install Debian's ovmf into the harness rootfs if missing (idempotent).
fw_need_ovmf() {
    [ -f "$FW_OVMF_CODE" ] && [ -f "$FW_OVMF_VARS" ] && return 0
    [ -d "$FW_ROOTFS" ] || fw_die "no harness rootfs at $FW_ROOTFS (run setup.sh)"
    echo "firmware: installing ovmf into $FW_ROOTFS" >&2
    chroot "$FW_ROOTFS" sh -c 'DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ovmf' \
        >&2 || fw_die "installing ovmf in the rootfs failed"
    [ -f "$FW_OVMF_CODE" ] || fw_die "ovmf installed but $FW_OVMF_CODE is missing"
}

# fw_initrd OUT: the harness initramfs plus a small cpio whose /run.sh prints the marker and
# the block devices the guest sees (the boot disk is /dev/vda).
fw_initrd() {
    local out=$1 tmp
    tmp=$(mktemp -d)
    cat >"$tmp/run.sh" <<EOF
#!/bin/sh
echo "$FW_MARKER disks: \$(ls /sys/block | tr '\n' ' ')"
EOF
    chmod 755 "$tmp/run.sh"
    (cd "$tmp" && echo ./run.sh | "$FW_BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null) \
        | "$FW_BUSYBOX" gzip -1 >"$tmp/run.cpio.gz" || { rm -rf "$tmp"; return 1; }
    cat "$HARNESS_DIR/initramfs.cpio.gz" "$tmp/run.cpio.gz" >"$out"
    rm -rf "$tmp"
}

# fw_inputs_hash KIND: hash of everything an image depends on (kernel, initramfs, builders,
# boot stub and loader files).
fw_inputs_hash() {
    local kind=$1
    {
        echo "$kind $FW_MARKER $FW_CMDLINE"
        sha256sum "$HARNESS_DIR/vmlinuz" "$HARNESS_DIR/initramfs.cpio.gz" \
            "$FW_DIR"/common.sh "$FW_DIR"/mkimage-"$kind".sh | cut -d' ' -f1
        case $kind in
            bios) sha256sum "$FW_SYSLINUX_MBR" /usr/lib/syslinux/modules/bios/ldlinux.c32 | cut -d' ' -f1
                  syslinux --version 2>&1 | head -1 ;;
            efi) sha256sum "$FW_EFI_STUB" | cut -d' ' -f1 ;;
        esac
    } | sha256sum | cut -c1-16
}

# fw_image KIND: print the path of the cached image for KIND (bios|efi), building it first
# if needed. Builds into a temp file and renames, so a crash never leaves a half image.
fw_image() {
    local kind=$1 key out
    fw_need_host_pkgs
    [ -f "$HARNESS_DIR/vmlinuz" ] && [ -f "$HARNESS_DIR/initramfs.cpio.gz" ] \
        || fw_die "no harness kernel/initramfs in $HARNESS_DIR (run setup.sh)"
    key=$(fw_inputs_hash "$kind")
    out=$FW_CACHE/$kind-$key.img
    if [ ! -f "$out" ]; then
        mkdir -p "$FW_CACHE"
        echo "firmware: building $out" >&2
        bash "$FW_DIR/mkimage-$kind.sh" "$out.tmp" >&2 || { rm -f "$out.tmp"; fw_die "mkimage-$kind failed"; }
        mv "$out.tmp" "$out"
        # Older builds of this kind (other inputs) are dead weight: keep only this one.
        find "$FW_CACHE" -maxdepth 1 -name "$kind-*.img" ! -path "$out" -delete
    fi
    echo "$out"
}

# fw_fat_partition FILE SECTORS HIDDEN LABEL: a fresh FAT file system image (mtools picks
# FAT12/16/32 by size) whose boot sector records HIDDEN sectors before it on the disk.
fw_fat_partition() {
    local file=$1 sectors=$2 hidden=$3 label=$4
    rm -f "$file"
    truncate -s $((sectors * 512)) "$file"
    mformat -i "$file" -T "$sectors" -h 64 -s 32 -H "$hidden" -v "$label" :: \
        || fw_die "mformat $file failed"
}

# fw_time_boot LOG TIMEOUT QEMU-ARGS...: run QEMU with the serial console into LOG and print
# the seconds from QEMU start to the marker line ("" and status 1 if it never came).
fw_time_boot() {
    local log=$1 timeout=$2; shift 2
    local t0 qpid t=""
    : >"$log"
    t0=$EPOCHREALTIME
    timeout -k 5 "$timeout" "$FW_QEMU" "$@" </dev/null >>"$log" 2>&1 &
    qpid=$!
    while kill -0 "$qpid" 2>/dev/null; do
        if grep -aq "$FW_MARKER" "$log"; then
            t=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
            break
        fi
        sleep 0.05
    done
    wait "$qpid"
    if [ -z "$t" ] && grep -aq "$FW_MARKER" "$log"; then   # marker came just before exit
        t=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
    fi
    [ -n "$t" ] || return 1
    echo "$t"
}

# fw_accel: tcg unless /dev/kvm opens and is hardware KVM (as run-guest.sh decides).
fw_accel() {
    if [ -n "${FW_ACCEL:-}" ]; then echo "$FW_ACCEL"
    elif ( : <>/dev/kvm ) 2>/dev/null && { [ -d /sys/module/kvm_intel ] || [ -d /sys/module/kvm_amd ]; }; then echo kvm
    else echo tcg; fi
}

# fw_qemu_args KIND MEM DIR: set FW_ARGS to the machine (no disk) for KIND (bios|efi) with
# MEM of shared memfd RAM (so a vfio-user server gets fds); DIR holds the OVMF vars copy.
fw_qemu_args() {
    local kind=$1 mem=$2 dir=$3 accel cpu
    accel=$(fw_accel)
    if [ "$accel" = kvm ]; then cpu=host; else cpu=max; fi
    FW_ARGS=(-nodefaults -no-user-config -display none -no-reboot
             -object "memory-backend-memfd,id=mem,size=$mem,share=on"
             -machine "q35,accel=$accel,memory-backend=mem" -m "$mem"
             -cpu "$cpu" -smp "${FW_SMP:-1}"
             -chardev stdio,id=con,signal=off -serial chardev:con)
    if [ "$kind" = efi ]; then
        cp "$FW_OVMF_VARS" "$dir/OVMF_VARS.fd"
        FW_ARGS+=(-drive "if=pflash,format=raw,readonly=on,file=$FW_OVMF_CODE"
                  -drive "if=pflash,format=raw,file=$dir/OVMF_VARS.fd")
    fi
    if [ -n "${FW_DEBUGCON:-}" ]; then   # firmware debug log (SeaBIOS and OVMF use port 0x402)
        FW_ARGS+=(-chardev "file,id=dbg,path=$FW_DEBUGCON" -device isa-debugcon,iobase=0x402,chardev=dbg)
    fi
}

# fw_boot_ours KIND MEM NAME IMG DIR TAG: one boot of IMG from our virtio-blk (emudevd over
# vfio-user, bootindex 0); prints the seconds to the marker. Logs: $GUEST_LOGS/$CASE-NAME.*
# Runs in a command substitution, so it stops its own server (lib.sh's cleanup cannot).
fw_boot_ours() {
    local kind=$1 mem=$2 name=$3 img=$4 dir=$5 tag=$6 sock srv t js
    sock=$dir/blk.sock; rm -f "$sock"
    cp "$img" "$dir/disk.img"
    # tcg-boot=on: our writes below 1 MiB go through QEMU (DMA_WRITE), else TCG keeps running
    # the MBR's stale translation at 0x7c00 after we load the partition's boot sector there.
    start_server "$name" "$BIN/emudevd" --device "virtio-blk,socket=$sock,path=$dir/disk.img,tcg-boot=on"
    srv=${SERVER_PIDS[-1]}
    wait_socket "$sock" || { kill "$srv"; wait "$srv"; return 1; }
    FW_DEBUGCON=$GUEST_LOGS/$CASE-$name.emudev.firmware.log fw_qemu_args "$kind" "$mem" "$dir"
    js=${sock//\\/\\\\}; js=${js//\"/\\\"}
    t=$(fw_time_boot "$GUEST_LOGS/$CASE-$name.emudev.console.log" "${FW_BOOT_TIMEOUT:-300}" "${FW_ARGS[@]}" \
        -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"$js\"},\"bootindex\":0}")
    kill "$srv" 2>/dev/null; wait "$srv" 2>/dev/null
    if [ -z "$t" ]; then
        echo "FAIL $name: no marker booting from our virtio-blk ($tag); console tail:" >&2
        tail -c 3000 "$GUEST_LOGS/$CASE-$name.emudev.console.log" | tr -d '\033' >&2
        echo "server log tail:" >&2; tail -20 "$GUEST_LOGS/$CASE-$name.server.log" >&2
        return 1
    fi
    grep -aq "$FW_MARKER disks:.*vda" "$GUEST_LOGS/$CASE-$name.emudev.console.log" \
        || { echo "FAIL $name: the guest does not see vda ($tag)" >&2; return 1; }
    echo "$t"
}

# fw_boot_builtin KIND MEM NAME IMG DIR TAG: the same boot on QEMU's built-in modern-only
# virtio-blk; prints the seconds to the marker.
fw_boot_builtin() {
    local kind=$1 mem=$2 name=$3 img=$4 dir=$5 tag=$6 t
    cp "$img" "$dir/disk.img"
    FW_DEBUGCON=$GUEST_LOGS/$CASE-$name.builtin.firmware.log fw_qemu_args "$kind" "$mem" "$dir"
    t=$(fw_time_boot "$GUEST_LOGS/$CASE-$name.builtin.console.log" "${FW_BOOT_TIMEOUT:-300}" "${FW_ARGS[@]}" \
        -drive "file=$dir/disk.img,if=none,id=d0,format=raw" \
        -device virtio-blk-pci,drive=d0,disable-legacy=on,bootindex=0)
    [ -n "$t" ] || { echo "FAIL $name: no marker with QEMU's built-in virtio-blk ($tag)" >&2; return 1; }
    echo "$t"
}

# fw_boot_compare KIND MEM NAME: boot the KIND image from our virtio-blk and from QEMU's
# built-in modern-only virtio-blk, alternately FW_REPEAT times (default 2; the machine is
# shared, so the best of each is compared), each boot on a fresh copy of the image. Prints
# every time, the best of each and their ratio. Needs lib.sh (BIN, WORKDIR, GUEST_LOGS,
# start_server, wait_socket). Fails if a boot misses the marker or the ratio exceeds
# FW_MAX_RATIO (default 3); above 1.5 it only prints a NOTE.
fw_boot_compare() {
    local kind=$1 mem=$2 name=$3 img dir i t ours=() qemu=() best_o best_q ratio
    img=$(fw_image "$kind") || return 1
    if [ "$kind" = efi ]; then fw_need_ovmf || return 1; fi
    dir=$WORKDIR/$name; mkdir -p "$dir"
    for i in $(seq "${FW_REPEAT:-2}"); do
        t=$(fw_boot_ours "$kind" "$mem" "$name" "$img" "$dir" "run $i") || return 1
        ours+=("$t")
        t=$(fw_boot_builtin "$kind" "$mem" "$name" "$img" "$dir" "run $i") || return 1
        qemu+=("$t")
    done
    rm -f "$dir/disk.img"
    best_o=$(printf '%s\n' "${ours[@]}" | sort -n | head -1)
    best_q=$(printf '%s\n' "${qemu[@]}" | sort -n | head -1)
    ratio=$(awk -v a="$best_o" -v b="$best_q" 'BEGIN { printf "%.2f", a / b }')
    echo "$name ($(fw_accel), mem $mem): time to marker, best of ${#ours[@]}: emudev ${best_o} s (${ours[*]}), built-in virtio-blk ${best_q} s (${qemu[*]}), ratio ${ratio}"
    awk -v r="$ratio" -v m="${FW_MAX_RATIO:-3}" 'BEGIN { exit !(r <= m) }' \
        || { echo "FAIL $name: ratio $ratio > ${FW_MAX_RATIO:-3}"; return 1; }
    awk -v r="$ratio" 'BEGIN { exit !(r <= 1.5) }' \
        || echo "NOTE $name: ratio $ratio is above the 1.5 target"
    return 0
}
