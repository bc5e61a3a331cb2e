#!/usr/bin/env bash
# OVMF (Debian's ovmf, pflash) boots a GPT disk whose EFI system partition holds a unified
# kernel image as \EFI\BOOT\BOOTX64.EFI from our virtio-blk with bootindex=0, to the marker
# printed by the guest's /run.sh; timed against the same image on QEMU's built-in
# modern-only virtio-blk (ratio printed; fails only above 3x).
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/firmware/common.sh"
fw_boot_compare efi 1G ovmf-1g
