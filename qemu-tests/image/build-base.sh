#!/usr/bin/env bash
# The emulated gateway's base, built once and cached: a Debian bookworm root with Open vSwitch,
# liblxc, busybox-static, QEMU (the comparison VMM) and Debian's cloud kernel with its modules.
# Writes OUT/base.img (a sparse ext4 root), OUT/vmlinuz, OUT/initrd.img, OUT/kernel-release.
# The harness (qemu-tests/src/image.rs) runs this when OUT is missing; OUT's name carries a hash
# of this file, so any change here rebuilds the base. gatevisor itself is added per build, on top
# of base.img. Needs root (debootstrap, chroot) and the Debian package mirror.
set -euo pipefail

out=${1:?usage: build-base.sh OUT}
mirror=${GATEVISOR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
work=$out.tmp
rm -rf "$work"
mkdir -p "$work"
root=$work/root

packages=(
  systemd-sysv udev dbus kmod iproute2 procps iputils-ping   # the init system and the basics
  openvswitch-switch                                         # the gateway's switch (kernel datapath)
  lxc busybox-static apparmor                                # LXC services, confined by AppArmor
  linux-image-cloud-amd64 initramfs-tools                    # the gateway's and the microVMs' kernel
)
echo "build-base: debootstrap bookworm (${packages[*]})"
debootstrap --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" bookworm "$root" "$mirror" \
  > "$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log"; exit 1; }

# QEMU 10 from bookworm-backports: the microVM benchmark's peer runs inside the gateway.
mounts=()
cleanup() { for m in "${mounts[@]}"; do umount -l "$m" 2>/dev/null || true; done; }
trap cleanup EXIT
for m in proc sys dev; do mount --bind "/$m" "$root/$m"; mounts+=("$root/$m"); done
echo "deb $mirror bookworm-backports main" > "$root/etc/apt/sources.list.d/backports.list"
echo "build-base: qemu-system-x86 from bookworm-backports"
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  -t bookworm-backports qemu-system-x86 > "$work/qemu.log" 2>&1 || { tail -30 "$work/qemu.log"; exit 1; }
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/*
cleanup
mounts=()

echo "build-base: system configuration"
echo gateway > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 gateway\n' > "$root/etc/hosts"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' > "$root/etc/fstab"
# A fresh machine id on every boot of a fresh copy.
: > "$root/etc/machine-id"
# Timers and units a test gateway does not want: they only cost TCG time.
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
         fstrim.timer lxc-net.service lxc.service lxc-monitord.service dpkg-db-backup.timer; do
  ln -sf /dev/null "$root/etc/systemd/system/$u"
done

kver=$(basename "$(ls -d "$root"/lib/modules/*)")
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/initrd.img"
echo "$kver" > "$work/kernel-release"
rm -f "$root"/boot/initrd.img-*.dpkg-bak "$root"/boot/initrd.img-*.new

echo "build-base: ext4 image"
truncate -s 3G "$work/base.img"
mkfs.ext4 -q -F -L gateway -d "$root" "$work/base.img"
rm -rf "$root"
rm -rf "$out"
mv "$work" "$out"
echo "build-base: done: $out ($kver)"
