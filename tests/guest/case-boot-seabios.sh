#!/usr/bin/env bash
# SeaBIOS boots a syslinux MBR disk (FAT partition: kernel + initramfs) from our virtio-blk
# with bootindex=0, to the marker printed by the guest's /run.sh. Twice: 1 GiB of RAM, and
# 4 GiB, where the 64-bit BAR lands above 4 GiB and SeaBIOS reaches the device only through
# the PCI-config access capability (cfg type 5). Each boot is timed against the same image
# on QEMU's built-in modern-only virtio-blk (ratio printed; fails only above 3x).
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/firmware/common.sh"
rc=0
fw_boot_compare bios 1G seabios-1g || rc=1
if fw_boot_compare bios 4G seabios-4g; then
    # The point of 4G: SeaBIOS found the BAR above 4 GiB and used the PCI_CFG window.
    fwlog=$GUEST_LOGS/$CASE-seabios-4g.emudev.firmware.log
    if grep -aq 'virtio cap at .* bar 4 at 0x[0-9a-f]\{9,\} .*\[pcicfg\]' "$fwlog"; then
        echo "seabios-4g: $(grep -a -m1 'virtio cap at' "$fwlog")"
    else
        echo "FAIL seabios-4g: SeaBIOS did not use the PCI-config window (see $fwlog)"; rc=1
    fi
else
    rc=1
fi
exit $rc
