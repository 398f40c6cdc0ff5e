#!/usr/bin/env bash
# Installs what gatevisor needs to build, run and test on a fresh Debian 12 machine.
# Idempotent: a second run only checks. Needs root (apt-get).
set -euo pipefail

need_pkgs=(
  lxc lxc-dev libclang-dev pkg-config       # liblxc + bindgen for lxc-sys
  busybox-static e2fsprogs                  # container rootfs, disk-limited images
  openvswitch-switch                        # the switch flowbridge drives
  iproute2 iputils-ping bind9-dnsutils iperf3 tcpdump ethtool python3   # test traffic, the demo's WAN side
  debootstrap lz4                           # the emulated gateway's root, its kernel's ELF (qemu-tests)
  mosquitto openssl                         # the MQTT broker and the test PKI of the USP agent tests
  skopeo umoci                              # OCI images built and converted by real tools (tests)
  docker-registry apache2-utils             # a real registry (TLS, htpasswd auth) the image tests pull from
)

missing=()
for p in "${need_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "setup: system packages present"
fi

# QEMU 10 for the emulated gateway (qemu-tests) comes from bookworm-backports: bookworm's own
# qemu-system conflicts with the qemu-utils this machine kind has installed.
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  echo "setup: installing qemu-system-x86 from bookworm-backports"
  echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/bookworm-backports.list
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; this machine kind ships a Rust toolchain via rustup" >&2
  exit 1
fi
