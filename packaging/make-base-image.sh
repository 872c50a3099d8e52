#!/usr/bin/env bash
# Makes a local Debian 12 (bookworm) base image with systemd, for machines that cannot pull
# images from a registry: debootstrap a minimal root file system, then `docker import` it.
# Needs root, debootstrap and the Debian mirror. On a machine that can pull images, any
# debian:bookworm image with systemd installed will do instead (see README.md).
#
#   packaging/make-base-image.sh TAG [MIRROR]
#
# The image holds what a small server install has and the package test needs: systemd (to
# run as PID 1, as on a real host), dbus, procps, man-db, curl and apt. The root file system
# is built in a temporary directory, removed afterwards.
set -euo pipefail

tag=${1:?usage: make-base-image.sh TAG [MIRROR]}
mirror=${2:-http://deb.debian.org/debian}

work=$(mktemp -d /tmp/chatraftd-rootfs.XXXXXX)
cleanup() {
    # debootstrap mounts /proc and /sys inside the target while it works: never delete
    # through a mount left behind by an interrupted run.
    local m
    for m in $(awk -v w="$work" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "debootstrap bookworm (minbase + systemd) from $mirror"
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps,man-db,curl,ca-certificates \
    bookworm "$work/root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    exit 1
}
# Not needed in a container, and they fail or wait there.
chroot "$work/root" systemctl mask --quiet \
    systemd-udevd.service systemd-udev-trigger.service systemd-modules-load.service \
    getty.target console-getty.service sys-kernel-config.mount sys-kernel-debug.mount \
    systemd-networkd-wait-online.service 2>/dev/null || true
# No package lists: apt installs local .deb files whose dependencies are all present.
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*

tar -C "$work/root" -c . | docker import \
    --change 'ENV container=docker' \
    --change 'CMD ["/lib/systemd/systemd"]' \
    - "$tag" >/dev/null
echo "made image $tag"
