#!/usr/bin/env bash
# The main job: set up this machine, build gatevisor, start its daemon on a private state
# directory, show what the board can do, install and run the example LXC service, and show
# it running (status, logs, events, an exec inside it, a crash and the automatic restart).
# Leaves it running until Ctrl-C; `--once` runs through once and cleans up (for scripts).
# Needs root (liblxc containers).
set -euo pipefail
cd "$(dirname "$0")/.."

once=0
for a in "$@"; do
  case "$a" in
    --once) once=1 ;;
    *) echo "usage: $0 [--once]" >&2; exit 2 ;;
  esac
done
if [ "$(id -u)" != 0 ]; then
  echo "run.sh: needs root (liblxc containers, veth); try: sudo $0 $*" >&2
  exit 1
fi

bash scripts/setup.sh
echo "== building gatevisor (release)"
cargo build --release --quiet
bin=$PWD/target/release/gatevisor

work=$(mktemp -d /tmp/gatevisor-run.XXXXXX)
export GATEVISOR_SOCKET=$work/gatevisor.sock
daemon_pid=""
cleanup() {
  set +e
  if [ -S "$GATEVISOR_SOCKET" ]; then
    "$bin" service remove hello >/dev/null 2>&1
  fi
  if [ -n "$daemon_pid" ]; then
    kill "$daemon_pid" 2>/dev/null
    wait "$daemon_pid" 2>/dev/null
  fi
  rm -rf "$work"
  echo "== cleaned up"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== board"
"$bin" board

echo "== starting the daemon (state in $work/state, socket $GATEVISOR_SOCKET)"
"$bin" daemon --state-dir "$work/state" --config "$work/gatevisor.toml" >"$work/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 100); do "$bin" service list >/dev/null 2>&1 && break; sleep 0.1; done

echo "== installing examples/hello-lxc.toml"
"$bin" service install examples/hello-lxc.toml --start
"$bin" service status hello
sleep 1
echo "== its log"
"$bin" service logs hello
echo "== a command inside it"
"$bin" service exec hello -- sh -c 'echo "I am $(hostname); my interfaces: $(ls /sys/class/net | tr "\n" " ")"'

echo "== killing its init with SIGKILL: the daemon restarts it"
pid=$("$bin" service status hello --json | sed -n 's/.*"init_pid": \([0-9]*\).*/\1/p')
kill -9 "$pid"
for _ in $(seq 50); do
  new=$("$bin" service status hello --json | sed -n 's/.*"init_pid": \([0-9]*\).*/\1/p')
  [ -n "$new" ] && [ "$new" != "$pid" ] && break
  sleep 0.1
done
"$bin" service list
echo "== events"
"$bin" events

if [ "$once" = 1 ]; then
  state=$("$bin" service status hello --json | sed -n 's/.*"state": "\([a-z]*\)".*/\1/p')
  restarts=$("$bin" service status hello --json | sed -n 's/.*"restarts": \([0-9]*\).*/\1/p')
  if [ "$state" = running ] && [ "$restarts" = 1 ]; then
    echo "== OK: hello is running after one automatic restart"
  else
    echo "== FAILED: hello is $state with $restarts restarts" >&2
    cat "$work/daemon.log" >&2
    exit 1
  fi
  exit 0
fi
echo "== running; follow with: GATEVISOR_SOCKET=$GATEVISOR_SOCKET $bin events -f   (Ctrl-C here to stop and clean up)"
"$bin" events -f -n 0 || true
