#!/usr/bin/env bash
# The main job: a demo gateway. Sets up this machine, builds gatevisor and its two example
# services, starts the daemon (with its own private Open vSwitch), builds a small simulated
# home in network namespaces (a laptop and a camera on the LAN, a resolver and a web server on
# the "internet"), installs dns-filter and iot-guard from signed packages with
# runtime = "auto", and shows what happens: blocked and allowed lookups, allowed and blocked
# camera sessions, how little traffic the services see, and a fail-open when a service is
# killed. Leaves the demo running until Ctrl-C; `--once` runs through once, checks every
# outcome and cleans up (CI uses that). `--iot-fail-closed` installs iot-guard with
# failure_mode = "closed": while it is down no new TCP session opens (the default, "open",
# lets them through). The home has IPv4 and IPv6 addresses; both families are filtered.
# Needs root.
#
# The demo gateway lives in a network namespace of its own (gvdemo-gw): its daemon, its
# private Open vSwitch (a userspace datapath owns the namespace's `ovs-netdev` device, so two
# cannot share one), its services and the hosts' ports. It runs beside the tests and beside
# any other switch on this machine. Like the gateway's init, this script starts the daemon
# again if it dies; the services and their traffic carry on meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."

once=0 in_gateway=0 iot_closed=0
for a in "$@"; do
  case "$a" in
    --once) once=1 ;;
    --in-gateway) in_gateway=1 ;;
    --iot-fail-closed) iot_closed=1 ;;
    *) echo "usage: $0 [--once] [--in-gateway | --iot-fail-closed]" >&2; exit 2 ;;
  esac
done
if [ "$in_gateway" = 1 ] && [ "$iot_closed" = 1 ]; then
  echo "run.sh: --iot-fail-closed is for the demo on this machine, not --in-gateway" >&2
  exit 2
fi
if [ "$(id -u)" != 0 ]; then
  echo "run.sh: needs root (containers, namespaces, Open vSwitch); try: sudo $0 $*" >&2
  exit 1
fi

bash scripts/setup.sh
if [ "$in_gateway" = 1 ]; then
  # The same demo inside the emulated gateway (qemu-tests): hardware KVM there, so
  # runtime = "auto" runs dns-filter and iot-guard as microVMs.
  echo "== the demo inside the emulated gateway (building it and the gateway image first)"
  cargo build --quiet --release -p qemu-tests --bin gateway-agent --example in-gateway-demo
  exec env GATEVISOR_QEMU_TESTS=1 cargo run --quiet --release -p qemu-tests --example in-gateway-demo -- \
    $([ "$once" = 1 ] && echo --once)
fi
echo "== building gatevisor and the services (dns-filter, iot-guard: static binaries)"
cargo build --release --quiet
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --quiet -p dns-filter -p iot-guard \
  --target x86_64-unknown-linux-gnu --target-dir target/static
bin=$PWD/target/release/gatevisor
static=$PWD/target/static/x86_64-unknown-linux-gnu/release

HOSTS="laptop camera wan"
gw_netns=gvdemo-gw
STATE_FILE=/run/gatevisor-demo.state   # this run's work dir and PIDs, for cleaning up after a killed run

# Tears a demo down: its services, daemon, private switch, WAN side and namespaces.
teardown() { # work daemon_pid wan_pid
  local w=$1
  if [ -S "$w/gatevisor.sock" ]; then
    GATEVISOR_SOCKET=$w/gatevisor.sock "$bin" service remove dns-filter >/dev/null 2>&1
    GATEVISOR_SOCKET=$w/gatevisor.sock "$bin" service remove iot-guard >/dev/null 2>&1
    GATEVISOR_SOCKET=$w/gatevisor.sock "$bin" service remove broker >/dev/null 2>&1
  fi
  if [ -n "$2" ] && grep -q "gatevisor" "/proc/$2/cmdline" 2>/dev/null; then
    kill "$2" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$2" 2>/dev/null || break; sleep 0.1; done
  fi
  # Containers a daemon left running (it stops on a signal and leaves services up by design);
  # their monitors listen on abstract sockets of the gateway's namespace.
  for c in "$w"/state/lxc/*/; do
    [ -d "$c" ] && nsenter --net="/run/netns/$gw_netns" lxc-stop -P "$w/state/lxc" -n "$(basename "$c")" -k >/dev/null 2>&1
  done
  [ -S "$w/state/ovs/ovs-vswitchd.ctl" ] && ovs-appctl -t "$w/state/ovs/ovs-vswitchd.ctl" exit --cleanup >/dev/null 2>&1
  [ -S "$w/state/ovs/ovsdb-server.ctl" ] && ovs-appctl -t "$w/state/ovs/ovsdb-server.ctl" exit >/dev/null 2>&1
  if [ -n "$3" ] && grep -q "demo-wan" "/proc/$3/cmdline" 2>/dev/null; then kill "$3" 2>/dev/null; fi
  for h in $HOSTS; do ip netns del "gvdemo-$h" 2>/dev/null; done
  ip netns del "$gw_netns" 2>/dev/null
  # Packaged containers' roots are overlays of the image store: off before the tree goes.
  awk -v w="$w/" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null; done
  rm -rf "$w"
}
if [ -f "$STATE_FILE" ]; then
  echo "== cleaning up after an earlier demo that did not finish"
  read -r old_work old_daemon old_wan < "$STATE_FILE" || true
  teardown "$old_work" "$old_daemon" "$old_wan"
  rm -f "$STATE_FILE"
fi

work=$(mktemp -d /tmp/gatevisor-demo.XXXXXX)
# Containers run as unprivileged users of their own: they must be able to pass through
# (not list) the directories above their roots.
chmod 0711 "$work"
export GATEVISOR_SOCKET=$work/gatevisor.sock
daemon_pid="" wan_pid="" follow_pid=""
save_state() { echo "$work $daemon_pid $wan_pid" > "$STATE_FILE"; }
cleanup() {
  set +e
  [ -n "$follow_pid" ] && kill "$follow_pid" 2>/dev/null
  teardown "$work" "$daemon_pid" "$wan_pid"
  rm -f "$STATE_FILE"
  echo "== cleaned up"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
save_state

echo "== publisher key and signed packages"
"$bin" key gen --out "$work/operator.key" --name operator
"$bin" key trust "$work/operator.pub" --keys-dir "$work/keys"
for svc in dns-filter iot-guard; do
  cp -r "images/services/$svc/package" "$work/$svc"
  mkdir -p "$work/$svc/files/bin"
  cp "$static/$svc" "$work/$svc/files/bin/"
  if [ "$svc" = iot-guard ] && [ "$iot_closed" = 1 ]; then
    sed -i 's/^failure_mode = "open"/failure_mode = "closed"/' "$work/$svc/service.toml"
  fi
  "$bin" image build "$work/$svc" -o "$work/$svc.gvpkg" --key "$work/operator.key"
done

echo "== the board"
"$bin" board | grep -E "^(kvm|auto runtime|open vswitch)"

echo "== starting the daemon in the gateway's network namespace ($gw_netns)"
ip netns del "$gw_netns" 2>/dev/null || true
ip netns add "$gw_netns"
ip netns exec "$gw_netns" ip link set lo up
# In its own session: a Ctrl-C at the terminal is for this script, which tears down in order.
# `nsenter --net` changes only the network namespace (`ip netns exec` would also remount /sys,
# hiding the cgroup hierarchy liblxc needs). `setsid` and `nsenter` exec in place: $! is the
# daemon's PID.
start_daemon() {
  setsid nsenter --net="/run/netns/$gw_netns" "$bin" daemon --state-dir "$work/state" --keys-dir "$work/keys" \
    --bridge gvdemo-br --config "$work/gatevisor.toml" >>"$work/daemon.log" 2>&1 &
  daemon_pid=$!
  save_state
  for _ in $(seq 100); do "$bin" service list >/dev/null 2>&1 && break; sleep 0.1; done
}
start_daemon

add_port() { ovs-vsctl --db="unix:$work/state/ovs/db.sock" add-port gvdemo-br "$1"; }
on_wan_started() { save_state; }
pkgs=$work scripts=$PWD/scripts
# shellcheck source=scripts/demo-home.sh
. scripts/demo-home.sh

echo "== an unchanged OCI image: Debian's mosquitto daemon as the home's smart-home broker"
bash scripts/demo-broker-image.sh "$work/broker-image" 2.0 >/dev/null
"$bin" image sign "oci:$work/broker-image:2.0" --key "$work/operator.key" --out "$work/broker.sig"
# The operator's manifest: what the image does not say (its command, user and working
# directory come from the image).
cat > "$work/broker.toml" <<'TOML'
name = "broker"
version = "1.0.0"
runtime = "auto"
stop_timeout_s = 3
[resources]
memory_mib = 32
pids = 64
[network]
address = "10.90.0.20/24"
TOML
"$bin" service install "$work/broker.toml" --image "oci:$work/broker-image:2.0" \
  --signature "$work/broker.sig" --start >/dev/null
"$bin" image list
"$bin" service status broker | grep -E "^ *(state|runtime|source)"
mqtt() { # host -> "connected" when the broker at 10.90.0.20 accepts an MQTT 3.1.1 CONNECT
  ip netns exec "gvdemo-$1" python3 -c '
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], 1883), timeout=2)
    s.sendall(bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 0]))
    r = s.recv(4)
    print("connected" if r[:2] == b"\x20\x02" and r[3] == 0 else "refused")
except OSError:
    print("no answer")' 10.90.0.20
}
for _ in $(seq 50); do [ "$(mqtt laptop)" = connected ] && break; sleep 0.2; done
check "the laptop connects to the broker (MQTT CONNACK)" connected "$(mqtt laptop)"

echo "== kill -9 of the daemon: the services and their traffic carry on; it is started again"
before=$("$bin" service status dns-filter --json | sed -n 's/.*"init_pid": \([0-9]*\).*/\1/p')
kill -9 "$daemon_pid"
wait "$daemon_pid" 2>/dev/null || true
check "games.test with no daemon (dns-filter keeps filtering)" 0.0.0.0 "$(lookup laptop games.test)"
check "a download with no daemon" reached "$(fetch laptop 8080)"
start_daemon
after=$("$bin" service status dns-filter --json | sed -n 's/.*"init_pid": \([0-9]*\).*/\1/p')
check "dns-filter re-adopted with the same PID" "$before" "$after"
check "games.test after the restart" 0.0.0.0 "$(lookup laptop games.test)"

if [ "$once" = 1 ]; then
  if [ "$fails" = 0 ]; then
    echo "== demo OK: every outcome as expected"
    exit 0
  fi
  echo "== demo FAILED: $fails unexpected outcomes" >&2
  tail -20 "$work/daemon.log" >&2
  exit 1
fi
echo "== the demo keeps running: try 'ip netns exec gvdemo-laptop dig @10.90.0.1 games.test'"
echo "   or GATEVISOR_SOCKET=$GATEVISOR_SOCKET $bin service list   (Ctrl-C here stops and cleans up)"
# In the background, so that Ctrl-C interrupts the wait and the cleanup runs at once. The
# follower ends when the daemon does; then the daemon is started again (as the gateway's init
# would) and followed anew.
while :; do
  "$bin" events -f -n 0 &
  follow_pid=$!
  wait "$follow_pid" || true
  follow_pid=""
  if ! kill -0 "$daemon_pid" 2>/dev/null; then
    echo "== the daemon ended; starting it again (its services were left running)"
    start_daemon
  fi
  sleep 1
done
