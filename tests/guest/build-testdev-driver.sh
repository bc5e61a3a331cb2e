#!/usr/bin/env bash
# Builds the guest kernel module tests/guest/testdev-driver (emudev_testdev.ko) for the
# guest kernel, inside the guest cache's rootfs (chroot), and copies it to
# target/guest/emudev_testdev.ko. `emudev-guest setup` installs the kernel headers, gcc and
# make there (guest.conf build_packages); this script installs them only if they are missing.
# Skips the build when the sources and kernel are unchanged.
# Needs root and a cache made by tests/guest/emudev-guest setup.
#   EMUDEV_GUEST_DIR  the guest cache (default ~/.cache/emudev-guest)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SRC=$ROOT/tests/guest/testdev-driver
OUT=$ROOT/target/guest
GUEST_DIR=${EMUDEV_GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/emudev-guest}
ROOTFS=$GUEST_DIR/rootfs
log() { printf '[build-testdev-driver] %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { log "needs root (chroot)"; exit 1; }
[ -x "$ROOTFS/usr/bin/apt-get" ] || { log "no rootfs at $ROOTFS: run tests/guest/emudev-guest setup"; exit 1; }
if [ -s "$GUEST_DIR/kernel-version" ]; then
    KVER=$(cat "$GUEST_DIR/kernel-version")
else   # the newest kernel installed in the rootfs, which the guest boots
    KVER=$(ls "$ROOTFS/lib/modules" | sort -V | tail -1)
fi
[ -n "$KVER" ] || { log "cannot tell the guest kernel version"; exit 1; }

mkdir -p "$OUT"
KO=$OUT/emudev_testdev.ko STAMP=$OUT/emudev_testdev.stamp
stamp=$( { echo "$KVER"; cat "$SRC/Kbuild" "$SRC"/*.c "${BASH_SOURCE[0]}"; } | sha256sum | cut -d' ' -f1)
if [ -s "$KO" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$stamp" ]; then
    log "up to date: $KO ($KVER)"
    exit 0
fi

in_root() { chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
            DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
mounted=0 tmp=""
cleanup() {
    [ -n "$tmp" ] && rm -rf "$ROOTFS$tmp"
    [ "$mounted" = 1 ] && umount "$ROOTFS/proc"
    return 0
}
trap cleanup EXIT
mountpoint -q "$ROOTFS/proc" || { mount -t proc proc "$ROOTFS/proc"; mounted=1; }

missing=$(for p in "linux-headers-$KVER" gcc make; do
    in_root dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || echo "$p"
done)
if [ -n "$missing" ]; then
    log "installing into the rootfs: $(echo $missing) (log: $GUEST_DIR/apt-testdev.log)"
    { in_root apt-get -q update &&
      in_root apt-get -y -q --no-install-recommends install $missing &&
      in_root apt-get clean; } >"$GUEST_DIR/apt-testdev.log" 2>&1 ||
        { tail -20 "$GUEST_DIR/apt-testdev.log" >&2; exit 1; }
fi
[ -d "$ROOTFS/usr/src/linux-headers-$KVER" ] || { log "no headers for $KVER in the rootfs"; exit 1; }

tmp=$(mktemp -d "$ROOTFS/tmp/emudev-testdev.XXXXXX"); tmp=${tmp#"$ROOTFS"}
cp "$SRC/Kbuild" "$SRC"/*.c "$ROOTFS$tmp/"
log "building for $KVER"
in_root make -s -C "/usr/src/linux-headers-$KVER" M="$tmp" modules >&2
in_root strip --strip-debug "$tmp/emudev_testdev.ko"   # smaller guest initrd
cp "$ROOTFS$tmp/emudev_testdev.ko" "$KO.tmp"
mv "$KO.tmp" "$KO"
echo "$stamp" >"$STAMP"
log "built $KO"
