//! iot-guard, the IoT protection service, as a signed package in a real container on the
//! daemon's bridge: a camera's sessions are allowed or blocked by its rules (allow list, denied
//! ports, rate anomaly), over IPv4 and IPv6 alike; other devices pass. Needs root, liblxc,
//! Open vSwitch.

mod common;
#[path = "../flowbridge/tests/common/lab.rs"]
mod lab;

use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WAN: &str = "10.95.0.1";
const WAN6: &str = "fd00:95::1";
const CAMERA_MAC: &str = "02:00:00:00:00:0c";

/// Opens a session from `host` to WAN:`port` and echoes one message through it.
fn session(host: &lab::Host, port: u16) -> bool {
    session_to(host, WAN.parse().unwrap(), port)
}

/// The same to `ip`:`port` (either family).
fn session_to(host: &lab::Host, ip: std::net::IpAddr, port: u16) -> bool {
    host.spawn(move || {
        let Ok(mut c) = TcpStream::connect_timeout(
            &std::net::SocketAddr::new(ip, port),
            Duration::from_millis(1500),
        ) else {
            return false;
        };
        c.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let mut b = [0u8; 5];
        c.write_all(b"hello").is_ok() && c.read_exact(&mut b).is_ok() && &b == b"hello"
    })
    .join()
    .unwrap()
}

/// iot-guard as a signed package `name`: the camera may reach `wan`:443 and [`wan6`]:443 over
/// TCP, never port 23, nothing else, at most 7 new sessions a minute; other devices go
/// anywhere. `extra` is added to its manifest.
fn guard_package(
    d: &Daemon,
    name: &str,
    wan: &str,
    wan6: &str,
    failure_mode: &str,
    extra: &str,
) -> std::path::PathBuf {
    let binary = build_static("iot-guard", false);
    let src = d.dir.path().join(name);
    std::fs::create_dir_all(src.join("files/bin")).unwrap();
    std::fs::create_dir_all(src.join("files/etc")).unwrap();
    std::fs::copy(&binary, src.join("files/bin/iot-guard")).unwrap();
    std::fs::write(
        src.join("files/etc/iot-guard.toml"),
        format!("[unknown_devices]\ndefault = \"allow\"\n[[device]]\nname = \"camera\"\nmac = \"{CAMERA_MAC}\"\nallow = [\"{wan}:443/tcp\", \"[{wan6}]:443/tcp\"]\ndeny_ports = [23]\ndefault = \"block\"\nmax_new_sessions_per_minute = 7\n"),
    )
    .unwrap();
    std::fs::write(
        src.join("service.toml"),
        format!("name = \"{name}\"\nversion = \"1.0.0\"\nruntime = \"auto\"\nimage = \"package\"\ncommand = [\"/bin/iot-guard\"]\ncapabilities = [\"NET_RAW\"]\nfailure_mode = \"{failure_mode}\"\n{extra}[resources]\nmemory_mib = 32\n[network]\nsteering = [{{ kind = \"new-sessions\", packets = 4, selector = {{ protocol = \"tcp\" }} }}]\nready = \"notify\"\n"),
    )
    .unwrap();
    d.signed_package(&src, &format!("{name}.gvpkg"))
}

/// Echo servers (one 5-byte message) on every address of `ips` and port of `ports`, in the
/// WAN host's namespace, until `stop`.
fn echo_servers(
    wan: &lab::Host,
    ips: &[&'static str],
    ports: &[u16],
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    ports
        .iter()
        .map(|&port| {
            let (stop, ips) = (stop.clone(), ips.to_vec());
            let (tx, rx) = std::sync::mpsc::channel();
            let h = wan.spawn(move || {
                let ls: Vec<TcpListener> = ips
                    .iter()
                    .map(|ip| {
                        let l = TcpListener::bind((*ip, port)).unwrap();
                        l.set_nonblocking(true).unwrap();
                        l
                    })
                    .collect();
                tx.send(()).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    for l in &ls {
                        if let Ok((mut c, _)) = l.accept() {
                            c.set_nonblocking(false).unwrap();
                            let mut b = [0u8; 5];
                            if c.read_exact(&mut b).is_ok() {
                                let _ = c.write_all(&b);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
            rx.recv().unwrap();
            h
        })
        .collect()
}

/// The camera (`CAMERA_MAC`, `.3`), the laptop (`.2`) and the WAN host (`.1`) on the
/// daemon's bridge, at `10.NET.0.x/24` and `fd00:NET::x/64`, each reaching the WAN host over
/// both families. `tag` keeps the namespaces apart from other tests'.
fn home(d: &Daemon, tag: &str, net: &str) -> (lab::Host, lab::Host, lab::Host) {
    let hosts: Vec<lab::Host> = [("c", 3), ("l", 2), ("w", 1)]
        .iter()
        .map(|(role, n)| {
            let h = lab::Host::new(&format!("{tag}{role}"), Some(&format!("10.{net}.0.{n}/24")));
            if *role == "c" {
                lab::sh(&[
                    "ip", "netns", "exec", &h.ns, "ip", "link", "set", "eth0", "address",
                    CAMERA_MAC,
                ]);
            }
            h.add_ipv6(&format!("fd00:{net}::{n}/64"));
            d.plug_host(&h.host_if);
            h
        })
        .collect();
    let [camera, laptop, wan]: [lab::Host; 3] = hosts.try_into().ok().unwrap();
    for ip in [format!("10.{net}.0.1"), format!("fd00:{net}::1")] {
        assert!(lab::wait_reachable(&camera.ns, &ip) && lab::wait_reachable(&laptop.ns, &ip));
    }
    (camera, laptop, wan)
}

#[test]
fn iot_guard_allows_and_blocks_camera_sessions_by_its_rules() {
    if !need_ovs("iot_guard_allows_and_blocks_camera_sessions_by_its_rules") {
        return;
    }
    let d = Daemon::start_with_keys();
    let pkg = guard_package(&d, "t-iotg", WAN, WAN6, "open", "");

    let (camera, laptop, wan) = home(&d, "g", "95");
    // Echo servers on the WAN.
    let stop = Arc::new(AtomicBool::new(false));
    let servers = echo_servers(&wan, &[WAN, WAN6], &[443, 8080, 23], &stop);

    d.install_package_started(&pkg);
    std::thread::sleep(Duration::from_millis(300));
    // The laptop is not an IoT device: its sessions pass.
    assert!(session(&laptop, 8080), "laptop to 8080");
    // The camera: its allow list, its denied port, its default.
    assert!(session(&camera, 443), "camera to 443 (allowed)");
    assert!(!session(&camera, 8080), "camera to 8080 (not on its list)");
    assert!(!session(&camera, 23), "camera to 23 (denied port)");
    assert!(session(&camera, 443), "camera to 443 again");
    // Over IPv6 the same rules hold.
    let wan6 = WAN6.parse().unwrap();
    assert!(session_to(&laptop, wan6, 8080), "laptop to 8080 over IPv6");
    assert!(
        session_to(&camera, wan6, 443),
        "camera to 443 over IPv6 (allowed)"
    );
    assert!(
        !session_to(&camera, wan6, 8080),
        "camera to 8080 over IPv6 (not on its list)"
    );
    assert!(
        !session_to(&camera, wan6, 23),
        "camera to 23 over IPv6 (denied port)"
    );
    // An eighth new session within the minute is an anomaly, even to an allowed destination.
    assert!(!session(&camera, 443), "rate anomaly");

    let logs = String::from_utf8_lossy(&d.cli(&["service", "logs", "t-iotg"]).stdout).into_owned();
    assert!(
        logs.contains(&format!(
            "block {WAN}:23/tcp from {CAMERA_MAC}: camera: port 23 is denied"
        )),
        "{logs}"
    );
    assert!(
        logs.contains(&format!(
            "block [{WAN6}]:23/tcp from {CAMERA_MAC}: camera: port 23 is denied"
        )),
        "{logs}"
    );
    assert!(logs.contains("more than 7 new sessions a minute"), "{logs}");
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
}

#[test]
fn a_fail_closed_iot_guard_lets_no_new_session_through_while_it_is_down() {
    if !need_ovs("a_fail_closed_iot_guard_lets_no_new_session_through_while_it_is_down") {
        return;
    }
    let (wan_ip, wan6) = ("10.94.0.1", "fd00:94::1");
    let d = Daemon::start_with_keys();
    // A slow first restart, so that the gap can be seen.
    let pkg = guard_package(
        &d,
        "t-iotc",
        wan_ip,
        wan6,
        "closed",
        "[restart]\npolicy = \"always\"\nmax_retries = 5\nbackoff_initial_ms = 4000\nbackoff_max_ms = 4000\nstable_after_s = 60\n",
    );
    let (camera, laptop, wan) = home(&d, "h", "94");
    let stop = Arc::new(AtomicBool::new(false));
    let servers = echo_servers(&wan, &[wan_ip, wan6], &[443], &stop);
    let (v4, v6) = (wan_ip.parse().unwrap(), wan6.parse().unwrap());
    d.install_package_started(&pkg);
    assert!(
        d.wait_for(Duration::from_secs(10), || session_to(&camera, v4, 443)
            .then_some(()))
            .is_some(),
        "the camera never reached its cloud"
    );
    assert!(session_to(&camera, v6, 443), "over IPv6 too");

    let pid = d.status("t-iotc")["init_pid"].as_i64().unwrap();
    kill9(pid);
    assert!(d
        .wait_for(Duration::from_secs(3), || (d.status("t-iotc")["state"]
            != "running")
            .then_some(()))
        .is_some());
    // Its class is every new TCP session: while it is down none opens, of either family,
    // for the camera or the laptop.
    assert!(
        !session_to(&camera, v4, 443),
        "camera while iot-guard is down"
    );
    assert!(
        !session_to(&laptop, v6, 443),
        "laptop over IPv6 while iot-guard is down"
    );
    // It comes back (a new process) and sessions open again.
    assert!(
        d.wait_for(Duration::from_secs(20), || session_to(&camera, v4, 443)
            .then_some(()))
            .is_some(),
        "sessions never opened again; log:\n{}",
        String::from_utf8_lossy(&d.cli(&["service", "logs", "t-iotc"]).stdout)
    );
    assert_ne!(d.status("t-iotc")["init_pid"].as_i64(), Some(pid));
    assert!(
        session_to(&laptop, v6, 443),
        "laptop over IPv6 after the restart"
    );
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
}
