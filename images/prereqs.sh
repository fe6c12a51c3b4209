#!/bin/sh
# What `make images` and tests/images need on a bare Debian/Ubuntu machine (run as root, or
# with sudo available): mmdebstrap (+ arch-test for the foreign architecture), qemu-user-static
# and a binfmt_misc registration so arm64 binaries run here, runc (tests run the images),
# skopeo (make images-push), docker-registry (the push test), readelf (which CUDA libraries torch links), dpkg-deb, ip.
# Idempotent: installs only what is missing and registers qemu only when it is not.
set -eu
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=""
need() { command -v "$1" >/dev/null 2>&1 || missing="$missing $2"; }
need mmdebstrap mmdebstrap
need arch-test arch-test
need qemu-aarch64-static qemu-user-static
need runc runc
need skopeo skopeo
need readelf binutils
need dpkg-deb dpkg
need ip iproute2
need docker-registry docker-registry
if [ -n "$missing" ]; then
    echo "images/prereqs.sh: apt-get install$missing"
    # `make -j2 cluster-binaries images` runs testbed/cluster/deps.sh beside this: wait for
    # its apt-get to release dpkg's lock instead of failing on it.
    lock="-o DPkg::Lock::Timeout=600"
    $SUDO apt-get $lock update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get $lock install -y -qq --no-install-recommends $missing >/dev/null
fi

# arm64 binaries under qemu: the F flag makes the kernel open the emulator now, so it also
# works inside containers (another mount namespace) that do not contain it.
if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
    $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    [ -f "$conf" ] || { echo "images/prereqs.sh: $conf missing (qemu-user-static)" >&2; exit 1; }
    $SUDO sh -c "cat $conf > /proc/sys/fs/binfmt_misc/register"
fi
grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 || {
    echo "images/prereqs.sh: qemu-aarch64 is registered without the F flag; containers cannot" \
         "use it. Remove it (echo -1 > /proc/sys/fs/binfmt_misc/qemu-aarch64) and rerun." >&2
    exit 1
}
