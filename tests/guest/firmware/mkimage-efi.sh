#!/usr/bin/env bash
# mkimage-efi.sh OUT: a raw GPT disk whose only partition is an EFI system partition holding
# a unified kernel image (systemd-boot's stub + kernel + initrd + cmdline) as
# \EFI\BOOT\BOOTX64.EFI, the removable-media path OVMF boots without any NVRAM entry.
# No loop devices or mounts: sfdisk writes the GPT, mtools the FAT, objcopy the UKI.
. "$(dirname "$0")/common.sh"
out=${1:?usage: mkimage-efi.sh OUT}
fw_need_host_pkgs
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

fw_initrd "$tmp/initrd.img" || fw_die "initrd"
printf '%s' "$FW_CMDLINE" >"$tmp/cmdline"
printf 'ID=emudev\nPRETTY_NAME="emudev firmware-boot test"\n' >"$tmp/os-release"

# UKI: each new section goes at the next 4 KiB-aligned address after the stub's last one
# (what ukify computes); a fixed table would overlap a larger stub or kernel.
next=0
while read -r _ _ size vma _; do
    end=$(( 0x$vma + 0x$size )); [ "$end" -gt "$next" ] && next=$end
done < <(objdump -h "$FW_EFI_STUB" | grep -E '^ *[0-9]+ ')
args=()
for s in osrel:"$tmp/os-release" cmdline:"$tmp/cmdline" initrd:"$tmp/initrd.img" linux:"$HARNESS_DIR/vmlinuz"; do
    name=.${s%%:*} file=${s#*:}
    next=$(( (next + 4095) / 4096 * 4096 ))
    args+=(--add-section "$name=$file" --change-section-vma "$name=$(printf '0x%x' "$next")")
    next=$(( next + $(stat -c %s "$file") ))
done
objcopy "${args[@]}" "$FW_EFI_STUB" "$tmp/BOOTX64.EFI" || fw_die "objcopy UKI"
objdump -h "$tmp/BOOTX64.EFI" | grep -E '\.(osrel|cmdline|initrd|linux)' >&2

# ESP: UKI + 8 MiB slack, at 1 MiB; GPT needs 33 sectors of backup table at the end.
need=$(( $(stat -c %s "$tmp/BOOTX64.EFI") + 8 * 1048576 ))
part_mib=$(( (need + 1048575) / 1048576 ))
start=2048 sectors=$(( part_mib * 2048 ))
fw_fat_partition "$tmp/esp.img" "$sectors" "$start" EMUESP
mmd -i "$tmp/esp.img" ::/EFI ::/EFI/BOOT || fw_die "mmd"
mcopy -i "$tmp/esp.img" "$tmp/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI || fw_die "mcopy UKI"

rm -f "$out"
truncate -s $(( (start + sectors + 2048) * 512 )) "$out"
printf 'label: gpt\nunit: sectors\nstart=%d, size=%d, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="ESP"\n' \
    "$start" "$sectors" | sfdisk --no-reread --no-tell-kernel -q "$out" || fw_die "sfdisk"
dd if="$tmp/esp.img" of="$out" bs=1M seek=1 conv=notrunc status=none || fw_die "dd ESP"
mdir -i "$out@@$(( start * 512 ))" ::/EFI/BOOT >&2
