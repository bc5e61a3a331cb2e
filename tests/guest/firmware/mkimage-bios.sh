#!/usr/bin/env bash
# mkimage-bios.sh OUT: a raw BIOS-bootable disk: syslinux's MBR code, one active FAT partition
# at 1 MiB holding SYSLINUX, the harness kernel and an initramfs whose /run.sh prints the
# marker. No loop devices or mounts: sfdisk, mtools and syslinux's mtools installer work on
# image files (syslinux with --offset on the whole disk).
. "$(dirname "$0")/common.sh"
out=${1:?usage: mkimage-bios.sh OUT}
fw_need_host_pkgs
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

fw_initrd "$tmp/initrd.img" || fw_die "initrd"
# Partition size: kernel + initrd + 8 MiB slack, rounded up to whole MiB.
need=$(( $(stat -c %s "$HARNESS_DIR/vmlinuz") + $(stat -c %s "$tmp/initrd.img") + 8 * 1048576 ))
part_mib=$(( (need + 1048575) / 1048576 ))
start=2048                               # sectors: partition at 1 MiB
sectors=$(( part_mib * 2048 ))

cat >"$tmp/syslinux.cfg" <<EOF
SERIAL 0 115200
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND $FW_CMDLINE
EOF
fw_fat_partition "$tmp/part.img" "$sectors" "$start" EMUBOOT
mcopy -i "$tmp/part.img" "$HARNESS_DIR/vmlinuz" ::/vmlinuz || fw_die "mcopy vmlinuz"
mcopy -i "$tmp/part.img" "$tmp/initrd.img" ::/initrd.img || fw_die "mcopy initrd"
mcopy -i "$tmp/part.img" "$tmp/syslinux.cfg" ::/syslinux.cfg || fw_die "mcopy cfg"

rm -f "$out"
truncate -s $(( (start + sectors) * 512 )) "$out"
# MBR label, one bootable FAT32-LBA (0x0c) partition; then splice the file system in.
printf 'label: dos\nunit: sectors\n%d %d c *\n' "$start" "$sectors" \
    | sfdisk --no-reread --no-tell-kernel -q "$out" || fw_die "sfdisk"
dd if="$tmp/part.img" of="$out" bs=1M seek=1 conv=notrunc status=none || fw_die "dd partition"
# SYSLINUX's boot sector and ldlinux.sys/.c32 into the FAT at its byte offset on the disk.
syslinux --install --offset $(( start * 512 )) "$out" || fw_die "syslinux --install"
# MBR boot code: first 440 bytes only (the partition table and signature stay).
dd if="$FW_SYSLINUX_MBR" of="$out" bs=440 count=1 conv=notrunc status=none || fw_die "dd mbr"
mdir -a -i "$out@@$(( start * 512 ))" :: >&2
