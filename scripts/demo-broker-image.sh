#!/usr/bin/env bash
# Builds the demo's smart-home broker as an OCI image with umoci, the way a vendor would ship
# it: Debian's own mosquitto daemon, unchanged, with the shared libraries it links (from this
# machine's Debian packages) in a base layer, the daemon and its configuration in a layer
# above, run as the image's own user `mosquitto`. Usage: demo-broker-image.sh DIR TAG
# (writes the OCI image layout DIR with tag TAG).
set -euo pipefail
out=$1 tag=$2
daemon=/usr/sbin/mosquitto
[ -x "$daemon" ] || { echo "mosquitto is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
umoci init --layout "$out"
umoci new --image "$out:$tag"
umoci unpack --image "$out:$tag" "$tmp/b" >/dev/null
root=$tmp/b/rootfs
# The base layer: the C library and everything the daemon links, as Debian installed them.
for lib in $(ldd "$daemon" | awk '/=>/ { print $3 } /ld-linux/ { print $1 }'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
mkdir -p "$root/etc" "$root/tmp" "$root/var/lib/mosquitto"
chmod 1777 "$root/tmp"
printf 'root:x:0:0:root:/root:/bin/false\nmosquitto:x:104:107:mosquitto:/var/lib/mosquitto:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nmosquitto:x:107:\n' > "$root/etc/group"
umoci repack --image "$out:$tag" "$tmp/b"
# The application layer: the daemon, unchanged, and its configuration.
umoci unpack --image "$out:$tag" "$tmp/a" >/dev/null
root=$tmp/a/rootfs
mkdir -p "$root/usr/sbin" "$root/etc/mosquitto"
cp "$daemon" "$root/usr/sbin/mosquitto"
printf 'listener 1883 0.0.0.0\nallow_anonymous true\nlog_dest stdout\npersistence false\n' > "$root/etc/mosquitto/mosquitto.conf"
chown -R 104:107 "$root/var/lib/mosquitto"
umoci repack --image "$out:$tag" "$tmp/a"
umoci config --image "$out:$tag" --config.entrypoint /usr/sbin/mosquitto \
  --config.cmd -c --config.cmd /etc/mosquitto/mosquitto.conf --config.user mosquitto \
  --config.workingdir /var/lib/mosquitto --config.label org.opencontainers.image.vendor=demo-smart-home \
  --config.label org.opencontainers.image.version="$(dpkg-query -W -f='${Version}' mosquitto)"
