# Shared helpers for the firmware-boot image builders and cases (sourced, bash).
# Images are built without loop devices or mounts: sfdisk writes the partition table, mtools
# writes the FAT file systems, syslinux (mtools flavour) installs the BIOS loader at an offset,
# objcopy glues the UKI around systemd-boot's stub. Built images are cached outside the repo
# under $FW_CACHE, keyed by a hash of every input.
set -uo pipefail
FW_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export HARNESS_DIR=${HARNESS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/emudev-harness}
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
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" \
        >&2 || fw_die "apt-get install ${missing[*]} failed"
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
