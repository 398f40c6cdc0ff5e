//! The daemon with Open vSwitch: a steering service's port and flows follow its lifecycle.
//! Needs root, liblxc and Open vSwitch (the daemon starts its private switch).

mod common;
#[path = "../flowbridge/tests/common/lab.rs"]
mod lab;
use common::*;
use std::time::Duration;

/// The flow texts owned by `owner`.
fn owned(d: &Daemon, owner: &str) -> Vec<String> {
    let v = d.json(&["flows", "--json"]);
    v["flows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["owner"] == owner)
        .map(|f| f["flow"].as_str().unwrap().to_string())
        .collect()
}

fn steering_manifest(name: &str, mode: &str) -> String {
    manifest_text(name, "while :; do sleep 1; done", "").replace(
        "stop_timeout_s = 3",
        &format!("stop_timeout_s = 3\nfailure_mode = \"{mode}\"\n[network]\nsteering = [{{ kind = \"dns\" }}]"),
    )
}

fn ports(d: &Daemon) -> String {
    let out = std::process::Command::new("ovs-vsctl")
        .arg(format!(
            "--db=unix:{}",
            d.state_dir().join("ovs/db.sock").display()
        ))
        .args(["list-ports", &d.bridge()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn steering_flows_fail_closed_on_crash_and_return_on_restart() {
    if !need_ovs("steering_flows_fail_closed_on_crash_and_return_on_restart") {
        return;
    }
    let d = Daemon::start();
    let m = d.manifest("dns.toml", &steering_manifest("t-dnsc", "closed"));
    d.json(&["service", "install", m.to_str().unwrap(), "--json"]);
    // Installed, not running, fail-closed: its class is dropped already.
    let flows = owned(&d, "t-dnsc");
    // TCP and UDP port 53 and their fragments, both families (later IPv6 fragments once).
    assert_eq!(flows.len(), 9, "{flows:?}");
    assert!(
        flows.iter().all(|f| f.ends_with("actions=drop")
            && (f.contains("tp_dst=53") || f.contains("nw_frag=yes"))),
        "{flows:?}"
    );
    assert_eq!(flows.iter().filter(|f| f.contains("tp_dst=53")).count(), 4);

    let st = d.json(&["service", "start", "t-dnsc", "--json"]);
    assert!(st["network_error"].is_null(), "{st}");
    assert!(
        ports(&d).contains("gv-t-dnsc"),
        "port plugged: {}",
        ports(&d)
    );
    let flows = owned(&d, "t-dnsc");
    assert!(
        flows
            .iter()
            .any(|f| f.contains("tp_dst=53") && f.contains("push_vlan")),
        "{flows:?}"
    );
    // The container's eth0 has the service's own address, and only that source leaves its
    // port untagged.
    let mac = gatevisor::network::mac_text(&gatevisor::network::service_mac("t-dnsc"));
    let config = std::fs::read_to_string(d.state_dir().join("lxc/t-dnsc/config")).unwrap();
    assert!(
        config.contains(&format!("lxc.net.0.hwaddr = {mac}")),
        "{config}"
    );
    let out = d.cli(&[
        "service",
        "exec",
        "t-dnsc",
        "--",
        "cat",
        "/sys/class/net/eth0/address",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), mac, "{out:?}");
    assert!(
        flows
            .iter()
            .any(|f| f.contains(&format!("dl_src={mac}")) && f.ends_with("actions=NORMAL")),
        "{flows:?}"
    );
    assert!(
        st["steering"]["counters"]["steered_packets"].is_number(),
        "{st}"
    );

    // kill -9: the class is dropped at once (fail-closed), then steering returns with the restart.
    let pid = st["init_pid"].as_i64().unwrap();
    kill9(pid);
    let back = d.wait_for(Duration::from_secs(5), || {
        let st = d.status("t-dnsc");
        (st["state"] == "running" && st["init_pid"].as_i64() != Some(pid)).then_some(())
    });
    assert!(back.is_some(), "not restarted");
    let flows = owned(&d, "t-dnsc");
    assert!(
        flows.iter().any(|f| f.contains("push_vlan")),
        "steering restored: {flows:?}"
    );
    let text = String::from_utf8_lossy(&d.cli(&["events", "--json"]).stdout).into_owned();
    assert!(text.contains("\"kind\":\"restarted\""));

    // Removal takes its flows and its port.
    d.json(&["service", "remove", "t-dnsc", "--json"]);
    assert!(owned(&d, "t-dnsc").is_empty());
    assert!(!ports(&d).contains("gv-t-dnsc"));
    assert!(!owned(&d, "base").is_empty(), "the base pipeline stays");
}

#[test]
fn fail_open_service_leaves_no_flows_when_stopped() {
    if !need_ovs("fail_open_service_leaves_no_flows_when_stopped") {
        return;
    }
    let d = Daemon::start();
    d.install_started("dns.toml", &steering_manifest("t-dnso", "open"));
    assert!(!owned(&d, "t-dnso").is_empty());
    d.json(&["service", "stop", "t-dnso", "--json"]);
    assert!(
        owned(&d, "t-dnso").is_empty(),
        "fail-open: the base pipeline forwards its class"
    );
    assert!(!ports(&d).contains("gv-t-dnso"));
}

#[test]
fn flows_survive_daemon_kill9_and_vswitchd_death() {
    if !need_ovs("flows_survive_daemon_kill9_and_vswitchd_death") {
        return;
    }
    let mut d = Daemon::start();
    d.install_started("dns.toml", &steering_manifest("t-dnsk", "open"));
    let before = owned(&d, "t-dnsk");
    let vswitchd_pid = std::fs::read_to_string(d.state_dir().join("ovs/ovs-vswitchd.pid")).unwrap();

    // The daemon dies: the private switch and its flows stay; the new daemon re-attaches.
    d.kill9();
    d.spawn();
    assert_eq!(
        std::fs::read_to_string(d.state_dir().join("ovs/ovs-vswitchd.pid")).unwrap(),
        vswitchd_pid,
        "the switch was re-attached, not restarted"
    );
    assert_eq!(owned(&d, "t-dnsk"), before);

    // ovs-vswitchd dies: the daemon restarts it and restores every flow by itself.
    let pid: i32 = vswitchd_pid.trim().parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let restored = d.wait_for(Duration::from_secs(15), || {
        let out = d.cli(&["flows", "--json"]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let n = v["flows"]
            .as_array()?
            .iter()
            .filter(|f| f["owner"] == "t-dnsk")
            .count();
        (n == before.len()).then_some(())
    });
    assert!(restored.is_some(), "flows not restored; log:\n{}", d.log());
    let text = String::from_utf8_lossy(&d.cli(&["events", "--json"]).stdout).into_owned();
    assert!(text.contains("network-restored"), "{text}");
}

#[test]
fn steering_without_open_vswitch_is_refused_naming_the_field() {
    let d = Daemon::start_with_args(&["--no-network"]);
    let m = d.manifest("dns.toml", &steering_manifest("t-nonet", "open"));
    let out = d.cli(&["service", "install", m.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("network.steering") && err.contains("dns.toml"),
        "{err}"
    );
}

#[test]
fn verdict_socket_inside_the_container_turns_verdicts_into_session_flows() {
    use std::io::{BufRead, BufReader, Write};
    if !need_ovs("verdict_socket_inside_the_container_turns_verdicts_into_session_flows") {
        return;
    }
    let d = Daemon::start();
    let text = manifest_text("t-vrd", "while :; do sleep 1; done", "").replace(
        "stop_timeout_s = 3",
        "stop_timeout_s = 3\n[network]\nsteering = [{ kind = \"new-sessions\", selector = { protocol = \"tcp\", ports = [80] } }]",
    );
    d.install_started("vrd.toml", &text);

    // Inside the container: the socket, and the variable that names it.
    let out = d.cli(&["service", "exec", "t-vrd", "--", "sh", "-c",
        "test -S /run/gatevisor/verdict.sock && cat /proc/[0-9]*/environ | tr '\\0' '\\n' | grep GATEVISOR_VERDICT_SOCKET"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("GATEVISOR_VERDICT_SOCKET=/run/gatevisor/verdict.sock"));

    let sock =
        std::os::unix::net::UnixStream::connect(d.state_dir().join("run/t-vrd/verdict.sock"))
            .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut w = sock.try_clone().unwrap();
    let mut r = BufReader::new(sock);
    let mut ask = |line: &str| -> serde_json::Value {
        // One write per request; for the endless line the server may close while we still
        // write (EPIPE), but its reply was sent before it closed.
        let _ = w.write_all(format!("{line}\n").as_bytes());
        let mut resp = String::new();
        r.read_line(&mut resp).unwrap();
        serde_json::from_str(&resp).unwrap_or_else(|e| panic!("{e}: {resp:?}"))
    };
    let hello = ask(r#"{"op":"hello"}"#);
    assert_eq!(
        (hello["ok"].as_bool(), hello["service"].as_str()),
        (Some(true), Some("t-vrd"))
    );
    let v = ask(
        r#"{"op":"verdict","verdict":"allow","session":{"proto":"tcp","src":"10.0.0.2:1234","dst":"10.0.0.1:80"}}"#,
    );
    assert_eq!(v["ok"], true, "{v}");
    let flows = owned(&d, "t-vrd");
    assert!(
        flows.iter().any(|f| f.contains("nw_src=10.0.0.2")
            && f.contains("tp_src=1234")
            && f.contains("set_field:0x2->ct_mark")),
        "{flows:?}"
    );
    assert_eq!(d.status("t-vrd")["steering"]["api_verdicts"], 1);
    // An IPv6 session the same way; ends of two families are refused.
    let v = ask(
        r#"{"op":"verdict","verdict":"block","session":{"proto":"tcp","src":"[fd00::2]:1234","dst":"[fd00::1]:80"}}"#,
    );
    assert_eq!(v["ok"], true, "{v}");
    let flows = owned(&d, "t-vrd");
    assert!(
        flows.iter().any(|f| f.contains("ipv6_src=fd00::2")
            && f.contains("ipv6_dst=fd00::1")
            && f.contains("set_field:0x3->ct_mark")),
        "{flows:?}"
    );
    let v = ask(
        r#"{"op":"verdict","verdict":"allow","session":{"proto":"tcp","src":"10.0.0.2:1","dst":"[fd00::1]:80"}}"#,
    );
    assert_eq!(v["ok"], false, "{v}");
    // Bad input gets an error reply; the connection stays usable.
    assert_eq!(ask(r#"{"op":"verdict","verdict":"maybe"}"#)["ok"], false);
    assert_eq!(ask("garbage")["ok"], false);
    assert_eq!(ask(r#"{"op":"ping"}"#)["ok"], true);

    // A request split across writes, with a pause longer than the server's read timeout.
    let sock2 =
        std::os::unix::net::UnixStream::connect(d.state_dir().join("run/t-vrd/verdict.sock"))
            .unwrap();
    sock2
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut w2 = sock2.try_clone().unwrap();
    w2.write_all(br#"{"op":"pi"#).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    w2.write_all(b"ng\"}\n").unwrap();
    let mut resp = String::new();
    BufReader::new(sock2).read_line(&mut resp).unwrap();
    assert!(resp.contains("\"ok\":true"), "{resp}");

    // Verdicts for a stopped service are refused.
    d.json(&["service", "stop", "t-vrd", "--json"]);
    let v = ask(
        r#"{"op":"verdict","verdict":"block","session":{"proto":"udp","src":"10.0.0.2:5","dst":"10.0.0.1:80"}}"#,
    );
    assert_eq!(v["ok"], false, "{v}");
    // An endless line closes the connection.
    let v = ask(&"x".repeat(5000));
    assert!(v["error"].as_str().unwrap().contains("longer than"), "{v}");
}

#[test]
fn a_port_removed_behind_our_back_is_plugged_again() {
    if !need_ovs("a_port_removed_behind_our_back_is_plugged_again") {
        return;
    }
    let d = Daemon::start();
    d.install_started("dns.toml", &steering_manifest("t-dnsp", "open"));
    assert!(ports(&d).contains("gv-t-dnsp"));
    let out = std::process::Command::new("ovs-vsctl")
        .arg(format!(
            "--db=unix:{}",
            d.state_dir().join("ovs/db.sock").display()
        ))
        .args(["del-port", &d.bridge(), "gv-t-dnsp"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let back = d.wait_for(Duration::from_secs(5), || {
        (ports(&d).contains("gv-t-dnsp")
            && owned(&d, "t-dnsp").iter().any(|f| f.contains("push_vlan")))
        .then_some(())
    });
    assert!(
        back.is_some(),
        "port not plugged again: {}\n{}",
        ports(&d),
        d.log()
    );
    let text = String::from_utf8_lossy(&d.cli(&["events", "--json"]).stdout).into_owned();
    assert!(text.contains("plugged again"), "{text}");
    assert!(d.status("t-dnsp")["network_error"].is_null());
}

#[test]
fn a_service_whose_heartbeat_stops_is_failed_over_and_restarted() {
    use std::io::Write;
    if !need_ovs("a_service_whose_heartbeat_stops_is_failed_over_and_restarted") {
        return;
    }
    let d = Daemon::start();
    let text = steering_manifest("t-hb", "open").replace(
        "steering = [{ kind = \"dns\" }]",
        "steering = [{ kind = \"dns\" }]\nheartbeat_timeout_ms = 1000",
    );
    d.install_started("hb.toml", &text);
    let pid = d.status("t-hb")["init_pid"].as_i64().unwrap();

    // While it pings, it lives.
    let mut sock =
        std::os::unix::net::UnixStream::connect(d.state_dir().join("run/t-hb/verdict.sock"))
            .unwrap();
    let epoch_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let mut last_ping = 0;
    for _ in 0..12 {
        last_ping = epoch_ms();
        sock.write_all(b"{\"op\":\"ping\"}\n").unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = d.status("t-hb");
    assert_eq!(
        (st["init_pid"].as_i64(), st["restarts"].as_u64()),
        (Some(pid), Some(0)),
        "{st}"
    );
    // Its status says when it was last heard: the last ping (its timeout counts from then).
    let heard = st["last_heard_at_ms"].as_u64().unwrap_or(0);
    assert!(
        (last_ping..=epoch_ms()).contains(&heard),
        "last heard {heard}, last ping sent {last_ping}: {st}"
    );

    // Silence: hung, failed over, restarted.
    let restarted = d.wait_for(Duration::from_secs(6), || {
        let st = d.status("t-hb");
        (st["state"] == "running" && st["init_pid"].as_i64() != Some(pid)).then_some(st)
    });
    let st =
        restarted.unwrap_or_else(|| panic!("hung service not restarted: {}", d.status("t-hb")));
    assert_eq!(st["restarts"], 1);
    let text = String::from_utf8_lossy(&d.cli(&["events", "--json"]).stdout).into_owned();
    assert!(text.contains("\"kind\":\"hung\""), "{text}");
}

#[test]
fn a_lan_host_opens_tcp_sessions_to_a_service_with_its_own_address() {
    // On the userspace datapath a frame crosses the switch as its sender wrote it: a
    // container's veth leaves TCP checksums to the hardware, so its SYN-ACKs arrived broken
    // (pings passed, connections never opened) until the daemon turned that offload off.
    if !need_ovs("a_lan_host_opens_tcp_sessions_to_a_service_with_its_own_address") {
        return;
    }
    let d = Daemon::start();
    let m = manifest_text(
        "t-web",
        "mkdir -p /www && echo hello-from-the-service > /www/index.html && exec httpd -f -p 8080 -h /www",
        "",
    )
    .replace("stop_timeout_s = 3", "stop_timeout_s = 3\n[network]\naddress = \"10.97.0.20/24\"");
    d.install_started("web.toml", &m);
    let lan = lab::Host::new("wl", Some("10.97.0.2/24"));
    d.plug_host(&lan.host_if);
    assert!(lab::wait_reachable(&lan.ns, "10.97.0.20"), "no ping");
    let page = lan
        .spawn(|| {
            use std::io::{Read, Write};
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let got = std::net::TcpStream::connect_timeout(
                    &"10.97.0.20:8080".parse().unwrap(),
                    Duration::from_secs(2),
                )
                .and_then(|mut c| {
                    c.set_read_timeout(Some(Duration::from_secs(2)))?;
                    c.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
                    let mut s = String::new();
                    c.read_to_string(&mut s)?;
                    Ok(s)
                });
                match got {
                    Ok(s) => return s,
                    Err(e) if std::time::Instant::now() > deadline => return format!("{e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        })
        .join()
        .unwrap();
    assert!(page.contains("hello-from-the-service"), "{page}");
}
