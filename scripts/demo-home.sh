# The demo's home and what it shows, shared by scripts/run.sh (this machine, the daemon's
# private switch) and its --in-gateway variant (inside the emulated gateway, on its br-lan).
# Sourced with: $bin (gatevisor), add_port (a command that adds a port to the demo's bridge),
# $pkgs (the folder with dns-filter.gvpkg and iot-guard.gvpkg), $scripts (this folder),
# $work (logs); calls on_wan_started once the WAN side runs, if defined; $gw_netns (optional):
# the network namespace the gateway (its daemon and switch) lives in, where the hosts' ports
# go. Counts unexpected outcomes in $fails.

fails=0
check() { # check "what" "expected" "actual"
  if [ "$2" = "$3" ]; then echo "   ok: $1 -> $3"; else echo "   UNEXPECTED: $1 -> $3 (expected $2)"; fails=$((fails + 1)); fi
}

echo "== the home: gvdemo-laptop (kids' laptop), gvdemo-camera, gvdemo-wan (resolver + web), on IPv4 and IPv6"
mkhost() { # name address mac ipv6-address
  local ns=gvdemo-$1 port=gvd-$1
  local gw=()
  ip netns add "$ns"
  ip link add "$port" type veth peer name eth0 netns "$ns"
  if [ -n "${gw_netns:-}" ]; then
    ip link set "$port" netns "$gw_netns"
    gw=(ip netns exec "$gw_netns")
  fi
  [ -n "$3" ] && ip netns exec "$ns" ip link set eth0 address "$3"
  "${gw[@]}" ip link set "$port" up
  ip netns exec "$ns" ip link set lo up
  ip netns exec "$ns" ip link set eth0 up
  ip netns exec "$ns" ip addr add "$2/24" dev eth0
  ip netns exec "$ns" ip -6 addr add "$4/64" dev eth0 nodad
  # The userspace datapath wants real checksums on what it forwards.
  "${gw[@]}" ethtool -K "$port" tx off >/dev/null 2>&1 || true
  ip netns exec "$ns" ethtool -K eth0 tx off >/dev/null 2>&1 || true
  add_port "$port"
}
mkhost laptop 10.90.0.2 02:00:00:00:00:0a fd00:90::2
mkhost camera 10.90.0.3 02:00:00:00:00:0c fd00:90::3
mkhost wan 10.90.0.1 "" fd00:90::1
setsid ip netns exec gvdemo-wan python3 "$scripts/demo-wan.py" 10.90.0.1 fd00:90::1 >"$work/wan.log" 2>&1 &
wan_pid=$!
if declare -F on_wan_started >/dev/null; then on_wan_started; fi
for a in 10.90.0.1 fd00:90::1; do
  for _ in $(seq 50); do ip netns exec gvdemo-laptop ping -c1 -W1 "$a" >/dev/null 2>&1 && break; done
done

lookup() { # host name [resolver] -> the address, NXDOMAIN, or "no answer"
  ip netns exec "gvdemo-$1" python3 "$scripts/demo-dns.py" "${3:-10.90.0.1}" "$2" 2>/dev/null || echo "no answer"
}
lookup6() { lookup "$1" "$2" fd00:90::1; } # the same over IPv6
fetch() { # host port [address] -> "reached" or "blocked" (within $FETCH_TIMEOUT s, default 2)
  if ip netns exec "gvdemo-$1" python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read()' \
      "http://${3:-10.90.0.1}:$2/" "${FETCH_TIMEOUT:-2}" >/dev/null 2>&1; then echo reached; else echo blocked; fi
}
fetch6() { fetch "$1" "$2" "[fd00:90::1]"; } # the same over IPv6
# The WAN side is up when it answers.
for _ in $(seq 50); do [ "$(lookup laptop example.test)" = 10.90.0.1 ] && break; sleep 0.1; done

echo "== before any service: everything passes"
check "laptop looks up games.test" 10.90.0.1 "$(lookup laptop games.test)"

echo "== installing the services from their signed packages (runtime = auto)"
"$bin" service install "$pkgs/dns-filter.gvpkg" --start >/dev/null
"$bin" service install "$pkgs/iot-guard.gvpkg" --start >/dev/null
"$bin" service list
runtime=$("$bin" service status dns-filter --json | sed -n 's/.*"runtime": "\([a-z]*\)".*/\1/p')
if [ "$runtime" = lxc ]; then
  echo "   (runtime auto chose LXC containers: this machine's KVM cannot boot Linux guests; see 'auto runtime' above)"
else
  echo "   (runtime auto chose microVMs: hardware KVM; each service boots its own Linux kernel)"
fi
# A microVM boots a kernel first: allow it a minute (a container needs a fraction of that).
for _ in $(seq 300); do [ "$(lookup laptop games.test)" = 0.0.0.0 ] && break; sleep 0.2; done

echo "== the laptop (kids' profile) asks for names"
check "games.test (blocked: kids' profile)" 0.0.0.0 "$(lookup laptop games.test)"
check "x.ads.test (blocked: ads)" 0.0.0.0 "$(lookup laptop x.ads.test)"
check "example.test (allowed)" 10.90.0.1 "$(lookup laptop example.test)"
check "games.test over IPv6 (blocked: kids' profile)" 0.0.0.0 "$(lookup6 laptop games.test)"
check "example.test over IPv6 (allowed)" 10.90.0.1 "$(lookup6 laptop example.test)"
check "the camera asks for malware.test (everyone's profile)" NXDOMAIN "$(lookup camera malware.test)"
check "the camera asks for games.test (not blocked for it)" 10.90.0.1 "$(lookup camera games.test)"

echo "== the operator puts the camera on the kids' profile too (a setting; no restart)"
pid=$("$bin" service status dns-filter --json | sed -n 's/.*"init_pid": \([0-9]*\).*/\1/p')
"$bin" service config dns-filter set KidsDevices=02:00:00:00:00:0a,02:00:00:00:00:0c
for _ in $(seq 50); do [ "$(lookup camera games.test)" = 0.0.0.0 ] && break; sleep 0.1; done
check "the camera asks for games.test (now blocked)" 0.0.0.0 "$(lookup camera games.test)"
check "dns-filter kept its process" "$pid" "$("$bin" service status dns-filter --json | sed -n 's/.*"init_pid": \([0-9]*\).*/\1/p')"
"$bin" service config dns-filter set KidsDevices=02:00:00:00:00:0a
for _ in $(seq 50); do [ "$(lookup camera games.test)" = 10.90.0.1 ] && break; sleep 0.1; done
check "the camera asks for games.test (back to everyone's profile)" 10.90.0.1 "$(lookup camera games.test)"
"$bin" service config dns-filter

echo "== the camera opens sessions (iot-guard)"
check "camera to its cloud (port 443)" reached "$(fetch camera 443)"
check "camera to port 8080 (not on its list)" blocked "$(fetch camera 8080)"
check "laptop to port 8080 (not an IoT device)" reached "$(fetch laptop 8080)"
check "camera to its cloud over IPv6 (port 443)" reached "$(fetch6 camera 443)"
check "camera to port 8080 over IPv6 (not on its list)" blocked "$(fetch6 camera 8080)"
check "laptop to port 8080 over IPv6" reached "$(fetch6 laptop 8080)"
echo "   the operator lets the camera reach port 8080 too (a setting of iot-guard; no restart)"
"$bin" service config iot-guard set IotAllow=10.90.0.1:443/tcp,[fd00:90::1]:443/tcp,10.90.0.1:8080/tcp
for _ in 1 2 3; do [ "$(fetch camera 8080)" = reached ] && break; done
check "camera to port 8080 (now on its list)" reached "$(fetch camera 8080)"
"$bin" service config iot-guard set IotAllow=10.90.0.1:443/tcp,[fd00:90::1]:443/tcp
for _ in 1 2 3; do [ "$(fetch camera 8080)" = blocked ] && break; done
check "camera to port 8080 (off its list again)" blocked "$(fetch camera 8080)"

echo "== twenty downloads on the laptop: only their first packets visit a service"
for _ in $(seq 20); do fetch laptop 8080 >/dev/null; done
sleep 1.5 # the switch's statistics reach its rules lazily
"$bin" service status dns-filter | grep -E "steered|verdicts"
"$bin" service status iot-guard | grep -E "steered|verdicts"
echo "   flows on the bridge: $("$bin" flows --json | grep -c '"flow"')"

echo "== kill -9 of dns-filter: its traffic fails open, then it is restarted"
pid=$("$bin" service status dns-filter --json | sed -n 's/.*"init_pid": \([0-9]*\).*/\1/p')
# A lookup every millisecond from the laptop around the kill: the fail-over as the home sees it.
out=$(ip netns exec gvdemo-laptop python3 "$scripts/demo-dns.py" --failover 10.90.0.1 games.test "$pid")
echo "   fail-over: $out"
case "$out" in *"ms from kill"*) opened="failed open" ;; *) opened="$out" ;; esac
check "games.test while dns-filter is down (fail-open)" "failed open" "$opened"
for _ in $(seq 300); do [ "$(lookup laptop games.test)" = 0.0.0.0 ] && break; sleep 0.2; done
check "games.test after the restart" 0.0.0.0 "$(lookup laptop games.test)"

mode=$("$bin" service status iot-guard --json | sed -n 's/.*"failure_mode": "\([a-z]*\)".*/\1/p')
echo "== kill -9 of iot-guard (failure_mode = $mode): new sessions fail $mode, then it is restarted"
pid=$("$bin" service status iot-guard --json | sed -n 's/.*"init_pid": \([0-9]*\).*/\1/p')
kill -9 "$pid"
sleep 0.3
if [ "$mode" = closed ]; then
  # Its class is every new TCP session: none opens while it is down (it is restarted after
  # 2 s: both are tried at once, for 1 s).
  FETCH_TIMEOUT=1 fetch camera 443 >"$work/down-camera" &
  FETCH_TIMEOUT=1 fetch laptop 8080 >"$work/down-laptop"
  wait $!
  check "camera to its cloud while iot-guard is down (fail-closed)" blocked "$(cat "$work/down-camera")"
  check "laptop to port 8080 while iot-guard is down (fail-closed)" blocked "$(cat "$work/down-laptop")"
else
  check "camera to port 8080 while iot-guard is down (fail-open)" reached "$(fetch camera 8080)"
fi
for _ in $(seq 100); do [ "$(fetch laptop 8080)" = reached ] && [ "$(fetch camera 8080)" = blocked ] && break; sleep 0.2; done
check "camera to port 8080 after the restart" blocked "$(fetch camera 8080)"
check "camera to its cloud after the restart" reached "$(fetch camera 443)"
"$bin" events -n 14
