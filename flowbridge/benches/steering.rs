//! Steering benchmark: OpenFlow programming speed against `ovs-ofctl`, fail-open time and loss
//! after `kill -9` of a service, steering activation time, post-verdict leak, bulk TCP with and
//! without an inspecting service, and the share of bytes kept on the fast path.
//! Needs root, Open vSwitch and iperf3; prints why and null figures otherwise. The last line is
//! one JSON object.
//!
//! The killed service is a separate process: this binary re-executed as `steering __service NS`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::lab::*;
use common::Switch;
use flowbridge::controller::{Controller, FailureMode};
use flowbridge::ofconn::OfConn;
use flowbridge::ofp::{port, Action, Field, Flow, FlowModCommand, Instruction};
use flowbridge::ovsdb::Ovsdb;
use flowbridge::steering::{Policy, Proto, Selector};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const N: u32 = 4;
const ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The inspecting service: allows each UDP session on its first packet and each TCP session on
/// its N-th; counts what it saw per session in `log` (keyed by client port).
fn service_handler(log: Arc<Mutex<HashMap<u16, u32>>>) -> impl FnMut(&mut [u8], usize, u8) -> u8 {
    move |f, l4, proto| {
        let sport = u16::from_be_bytes([f[l4], f[l4 + 1]]);
        let mut log = log.lock().unwrap();
        let n = log.entry(sport).or_insert(0);
        *n += 1;
        match proto {
            17 => 1,
            6 if *n >= N => 1,
            _ => 0,
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__service") {
        // The packet socket arrives as fd 3, opened by the supervisor side (see spawn_service).
        use std::os::fd::FromRawFd;
        // SAFETY: the parent placed an AF_PACKET socket at fd 3 for this process to own.
        let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(3) };
        println!("ready");
        let _ = std::io::stdout().flush();
        serve_packets(
            sock,
            Arc::new(AtomicBool::new(false)),
            service_handler(Arc::default()),
        );
        return;
    }
    let out = match run() {
        Ok(v) => v,
        Err(why) => {
            eprintln!("steering bench not run: {why}");
            json!({"error": why, "fail_open_ms_median": null, "flows_per_s": null})
        }
    };
    println!("{out}");
}

struct Lab {
    lan: Host,
    wan: Host,
    svc: Host,
    sw: Switch,
    bridge: String,
}

fn lab() -> Result<Lab, String> {
    let bridge = "gvbench0".to_string();
    let sw = Switch::new(&bridge);
    let lan = Host::new("bl", Some("10.98.0.2/24"));
    let wan = Host::new("bw", Some("10.98.0.1/24"));
    let svc = Host::new("bs", None);
    let mut db = Ovsdb::connect(&sw.ovs.db_socket()).map_err(|e| e.to_string())?;
    for (h, name) in [(&lan, "lan"), (&wan, "wan")] {
        db.add_port(&bridge, &h.host_if, name)
            .map_err(|e| e.to_string())?;
    }
    db.wait_applied(Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    // The bridge is `secure`: it forwards once the base pipeline is there (it stays when
    // this controller goes).
    Controller::connect(&sw.mgmt(), Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let reachable = wait_reachable(&lan.ns, "10.98.0.1");
    if !reachable {
        return Err("LAN cannot reach WAN through the bridge".into());
    }
    Ok(Lab {
        lan,
        wan,
        svc,
        sw,
        bridge,
    })
}

/// Plugs the service port and returns its OpenFlow number.
fn plug(l: &Lab) -> Result<u32, String> {
    let mut db = Ovsdb::connect(&l.sw.ovs.db_socket()).map_err(|e| e.to_string())?;
    if !db
        .ports(&l.bridge)
        .map_err(|e| e.to_string())?
        .iter()
        .any(|p| p.name == l.svc.host_if)
    {
        db.add_port(&l.bridge, &l.svc.host_if, "svc")
            .map_err(|e| e.to_string())?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ports = db.ports(&l.bridge).map_err(|e| e.to_string())?;
        if let Some(n) = ports
            .iter()
            .find(|p| p.name == l.svc.host_if)
            .and_then(|p| p.ofport.filter(|n| *n > 0))
        {
            return Ok(n as u32);
        }
        if Instant::now() > deadline {
            return Err("service port got no OpenFlow number".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn unplug(l: &Lab) {
    if let Ok(mut db) = Ovsdb::connect(&l.sw.ovs.db_socket()) {
        let _ = db.del_port(&l.bridge, &l.svc.host_if);
    }
}

fn openflow_figures(l: &Lab) -> Result<Value, String> {
    let mut c =
        OfConn::connect(&l.sw.mgmt(), Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let flow = |i: u32, cookie: u64| Flow {
        table: 30,
        priority: 100,
        cookie,
        matches: vec![
            Field::EthType(0x0800),
            Field::IpProto(17),
            Field::UdpDst(i as u16),
        ],
        instructions: vec![Instruction::Apply(vec![Action::Output(port::LOCAL)])],
        ..Flow::default()
    };
    let mut lat = Vec::new();
    for i in 0..200 {
        let t = Instant::now();
        c.flow_mods(&[(flow(i, 0x51), FlowModCommand::Add)])
            .map_err(|e| e.to_string())?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    c.delete_cookie(0x51).map_err(|e| e.to_string())?;
    let flows: Vec<Flow> = (0..10_000).map(|i| flow(i + 1, 0x52)).collect();
    let mods: Vec<_> = flows
        .iter()
        .cloned()
        .map(|f| (f, FlowModCommand::Add, 0))
        .collect();
    let t = Instant::now();
    c.bundle(&mods).map_err(|e| e.to_string())?;
    let ours = t.elapsed().as_secs_f64();
    let t = Instant::now();
    c.delete_cookie(0x52).map_err(|e| e.to_string())?;
    let delete_ms = t.elapsed().as_secs_f64() * 1e3;

    // The same 10,000 flows through ovs-ofctl, in its own text syntax.
    let file = l.sw.dir.path().join("flows.txt");
    let text: String = flows
        .iter()
        .map(|f| f.to_string().replace("0x52", "0x53") + "\n")
        .collect();
    std::fs::write(&file, text).map_err(|e| e.to_string())?;
    let mgmt = format!("unix:{}", l.sw.mgmt().display());
    let t = Instant::now();
    let st = Command::new("ovs-ofctl")
        .args([
            "-O",
            "OpenFlow13",
            "--bundle",
            "add-flows",
            &mgmt,
            file.to_str().unwrap(),
        ])
        .status()
        .map_err(|e| e.to_string())?;
    let theirs = t.elapsed().as_secs_f64();
    if !st.success() {
        return Err("ovs-ofctl add-flows failed".into());
    }
    let installed = c
        .flow_stats(0x53, u64::MAX)
        .map_err(|e| e.to_string())?
        .len();
    if installed != 10_000 {
        return Err(format!("ovs-ofctl installed {installed} flows"));
    }
    c.delete_cookie(0x53).map_err(|e| e.to_string())?;
    Ok(json!({
        "flow_mod_p50_ms": median(lat),
        "flows_per_s": 10_000.0 / ours,
        "ovs_ofctl_flows_per_s": 10_000.0 / theirs,
        "flows_ratio": theirs / ours,
        "delete_by_cookie_ms": delete_ms,
    }))
}

/// (sequence number, when) of probe packets.
type Timeline = Vec<(u32, Instant)>;

/// Sends one new UDP session per millisecond (a new socket each time) from the LAN to
/// WAN:9999, carrying a sequence number; the WAN side records what arrived.
struct Probe {
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Timeline>>,
    got: Arc<Mutex<Timeline>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn start_probe(l: &Lab) -> Probe {
    let stop = Arc::new(AtomicBool::new(false));
    let sent: Arc<Mutex<Timeline>> = Arc::default();
    let got: Arc<Mutex<Timeline>> = Arc::default();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let rx = {
        let (stop, got) = (stop.clone(), got.clone());
        l.wan.spawn(move || {
            let s = UdpSocket::bind("10.98.0.1:9999").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    if n >= 4 {
                        got.lock().unwrap().push((
                            u32::from_be_bytes(buf[..4].try_into().unwrap()),
                            Instant::now(),
                        ));
                    }
                }
            }
        })
    };
    ready_rx.recv().unwrap();
    let tx = {
        let (stop, sent) = (stop.clone(), sent.clone());
        l.lan.spawn(move || {
            let mut seq = 0u32;
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let s = UdpSocket::bind("10.98.0.2:0").unwrap();
                let _ = s.send_to(&seq.to_be_bytes(), "10.98.0.1:9999");
                sent.lock().unwrap().push((seq, Instant::now()));
                seq += 1;
                next += Duration::from_millis(1);
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
        })
    };
    Probe {
        stop,
        sent,
        got,
        threads: vec![rx, tx],
    }
}

impl Probe {
    fn finish(self) -> (Timeline, Timeline) {
        std::thread::sleep(Duration::from_millis(100));
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let sent = self.sent.lock().unwrap().clone();
        let got = self.got.lock().unwrap().clone();
        (sent, got)
    }
}

/// Starts the service process with its packet socket, which the supervisor side opens in the
/// service's namespace and keeps a reference to. Measured here: a process that owns the last
/// reference to a bound AF_PACKET socket takes 7-12 ms from SIGKILL to any exit notification
/// (releasing the socket waits for an RCU grace period before the exit is signalled); with a
/// shared socket the exit is signalled in ~1 ms.
fn spawn_service(l: &Lab) -> Result<(Child, std::os::fd::OwnedFd), String> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let sock = l
        .svc
        .spawn(|| open_packet_socket("eth0"))
        .join()
        .map_err(|_| "packet socket")?;
    let raw = sock.as_raw_fd();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.args(["__service"]).stdout(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; it places the socket at fd 3 (without CLOEXEC) in the
    // child between fork and exec and touches no other state.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let mut buf = [0u8; 6];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut buf)
        .map_err(|e| e.to_string())?;
    Ok((child, sock))
}

/// kill -9 of the service; a pidfd watcher fails its class open, as the daemon does.
fn fail_open_round(l: &Lab, ctl: &mut Controller, svc_port: u32) -> Result<(f64, f64), String> {
    let policy = Policy::NewSessions {
        packets: N,
        selector: Selector {
            protocol: Some(Proto::Udp),
            ports: vec![9999],
            macs: vec![],
        },
    };
    let (mut child, sock) = spawn_service(l)?;
    ctl.add_service(7, svc_port, vec![policy], FailureMode::Open)
        .map_err(|e| e.to_string())?;
    ctl.activate(7).map_err(|e| e.to_string())?;
    let probe = start_probe(l);
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: pidfd_open takes a pid and flags; the returned fd is closed below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as i32, 0) } as i32;
    let t_kill = Instant::now();
    child.kill().map_err(|e| e.to_string())?;
    let mut pfd = libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is a valid pollfd for the pidfd we own; the timeout bounds the wait.
    unsafe { libc::poll(&mut pfd, 1, 5000) };
    let t_dead = t_kill.elapsed();
    ctl.deactivate(7).map_err(|e| e.to_string())?;
    let t_done = t_kill.elapsed();
    // SAFETY: pidfd came from pidfd_open above and is closed once.
    unsafe { libc::close(pidfd) };
    drop(sock);
    if std::env::var("GV_BENCH_DEBUG").is_ok() {
        eprintln!("  kill->pidfd {t_dead:?}, ->flows replaced {t_done:?}");
    }
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(200));
    let (sent, got) = probe.finish();
    ctl.remove_service(7).map_err(|e| e.to_string())?;
    let got_seqs: std::collections::HashSet<u32> = got.iter().map(|(s, _)| *s).collect();
    let recovered = got
        .iter()
        .filter(|(s, t)| *t > t_kill && sent.iter().any(|(q, ts)| q == s && *ts > t_kill))
        .map(|(_, t)| *t)
        .min()
        .ok_or("no packet arrived after the kill")?;
    // Packets sent from 50 ms before the kill until recovery that never arrived.
    let lost = sent
        .iter()
        .filter(|(_, ts)| *ts + Duration::from_millis(50) > t_kill && *ts < recovered)
        .filter(|(s, _)| !got_seqs.contains(s))
        .count();
    Ok(((recovered - t_kill).as_secs_f64() * 1e3, lost as f64))
}

/// Service ready → its first steered packet: port add, flows, first packet at the service.
fn steer_active_round(l: &Lab, ctl: &mut Controller) -> Result<f64, String> {
    unplug(l);
    let probe = start_probe(l);
    let first = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let svc = {
        let (first, stop) = (first.clone(), stop.clone());
        l.svc.spawn(move || {
            run_raw_service(stop, move |_, _, _| {
                let _ = first.compare_exchange(
                    0,
                    t0.elapsed().as_nanos() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                1
            })
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let ready = t0.elapsed();
    let svc_port = plug(l)?;
    let policy = Policy::NewSessions {
        packets: N,
        selector: Selector {
            protocol: Some(Proto::Udp),
            ports: vec![9999],
            macs: vec![],
        },
    };
    ctl.add_service(8, svc_port, vec![policy], FailureMode::Open)
        .map_err(|e| e.to_string())?;
    ctl.activate(8).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(3);
    while first.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = svc.join();
    let _ = probe.finish();
    ctl.remove_service(8).map_err(|e| e.to_string())?;
    let f = first.load(Ordering::Relaxed);
    if f == 0 {
        return Err("no steered packet reached the service".into());
    }
    Ok((Duration::from_nanos(f) - ready).as_secs_f64() * 1e3)
}

fn iperf(l: &Lab) -> Result<f64, String> {
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &l.wan.ns,
            "iperf3",
            "-s",
            "-1",
            "-B",
            "10.98.0.1",
        ])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("iperf3: {e}"))?;
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &l.lan.ns,
            "iperf3",
            "-c",
            "10.98.0.1",
            "-t",
            "2",
            "-J",
        ])
        .output()
        .map_err(|e| e.to_string())?;
    let _ = server.wait();
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("iperf3 output: {e}"))?;
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("iperf3 failed: {}", v["error"]))
}

fn run() -> Result<Value, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root".into());
    }
    for tool in ["ovs-vswitchd", "iperf3", "ethtool"] {
        if gatevisor_board::ovs::find_sbin(tool).is_none() {
            return Err(format!("{tool} is not installed"));
        }
    }
    let l = lab()?;
    let of = openflow_figures(&l)?;
    eprintln!("openflow: {of}");

    let mut ctl = Controller::connect(&l.sw.mgmt(), Duration::from_secs(10))
        .map_err(|e| e.to_string())?
        .with_vswitchd_ctl(l.sw.ovs.vswitchd_ctl());

    let mut active = Vec::new();
    for _ in 0..ROUNDS {
        active.push(steer_active_round(&l, &mut ctl)?);
    }
    eprintln!("steer active (ms): {active:.2?}");

    let svc_port = plug(&l)?;
    let (mut fo_ms, mut fo_lost) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (ms, lost) = fail_open_round(&l, &mut ctl, svc_port)?;
        fo_ms.push(ms);
        fo_lost.push(lost);
    }
    eprintln!("fail-open (ms): {fo_ms:.2?}, lost: {fo_lost:?}");

    // Post-verdict leak and bulk TCP: an inspecting service allowing TCP sessions on their
    // N-th packet.
    let log: Arc<Mutex<HashMap<u16, u32>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let svc = {
        let (stop, log) = (stop.clone(), log.clone());
        l.svc
            .spawn(move || run_raw_service(stop, service_handler(log)))
    };
    let policy = Policy::NewSessions {
        packets: N,
        selector: Selector {
            protocol: Some(Proto::Tcp),
            ports: vec![5001, 5201],
            macs: vec![],
        },
    };
    ctl.add_service(9, svc_port, vec![policy], FailureMode::Open)
        .map_err(|e| e.to_string())?;
    // iperf3 on two cores through the userspace datapath is noisy: alternate runs without and
    // with the inspecting service and compare medians.
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        ctl.deactivate(9).map_err(|e| e.to_string())?;
        without.push(iperf(&l)?);
        ctl.activate(9).map_err(|e| e.to_string())?;
        with.push(iperf(&l)?);
    }
    let (base_bps, with_bps) = (median(without), median(with));
    let sink = l.wan.spawn(|| {
        let lst = TcpListener::bind("10.98.0.1:5001").unwrap();
        for _ in 0..ROUNDS {
            if let Ok((mut c, _)) = lst.accept() {
                let mut buf = [0u8; 4096];
                while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
            }
        }
    });
    std::thread::sleep(Duration::from_millis(50));
    let ports = l
        .lan
        .spawn(|| {
            (0..ROUNDS)
                .map(|_| {
                    let mut c = TcpStream::connect("10.98.0.1:5001").unwrap();
                    c.set_nodelay(true).unwrap();
                    for _ in 0..40 {
                        c.write_all(&[1u8; 100]).unwrap();
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    c.local_addr().unwrap().port()
                })
                .collect::<Vec<u16>>()
        })
        .join()
        .map_err(|_| "tcp client failed")?;
    let _ = sink.join();
    stop.store(true, Ordering::Relaxed);
    let _ = svc.join();
    let leak: Vec<f64> = {
        let log = log.lock().unwrap();
        ports
            .iter()
            .map(|p| log.get(p).copied().unwrap_or(0).saturating_sub(N) as f64)
            .collect()
    };
    ctl.remove_service(9).map_err(|e| e.to_string())?;
    eprintln!(
        "iperf3 without {:.0} Mbit/s, with {:.0} Mbit/s; leak {leak:?}",
        base_bps / 1e6,
        with_bps / 1e6
    );

    // Fast-path share: a DNS service, 20 lookups and a 100 MB transfer.
    let stop = Arc::new(AtomicBool::new(false));
    let svc = {
        let stop = stop.clone();
        l.svc.spawn(move || run_raw_service(stop, |_, _, _| 0))
    };
    ctl.add_service(10, svc_port, vec![Policy::Dns], FailureMode::Open)
        .map_err(|e| e.to_string())?;
    ctl.activate(10).map_err(|e| e.to_string())?;
    let resolver = l.wan.spawn(|| {
        let s = UdpSocket::bind("10.98.0.1:53").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 512];
        for _ in 0..20 {
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                buf[2] |= 0x80;
                let _ = s.send_to(&buf[..n], from);
            }
        }
    });
    let answered = l
        .lan
        .spawn(|| {
            (0..20)
                .filter(|i| lookup("10.98.0.1:53", &format!("n{i}.test")).is_some())
                .count()
        })
        .join()
        .map_err(|_| "dns client failed")?;
    let _ = resolver.join();
    let sink = l.wan.spawn(|| {
        let lst = TcpListener::bind("10.98.0.1:5002").unwrap();
        let (mut c, _) = lst.accept().unwrap();
        let mut buf = [0u8; 65536];
        while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
    });
    std::thread::sleep(Duration::from_millis(50));
    l.lan
        .spawn(|| {
            let mut c = TcpStream::connect("10.98.0.1:5002").unwrap();
            let chunk = vec![0u8; 1 << 20];
            for _ in 0..100 {
                c.write_all(&chunk).unwrap();
            }
        })
        .join()
        .map_err(|_| "bulk client failed")?;
    let _ = sink.join();
    std::thread::sleep(Duration::from_millis(1500)); // datapath stats reach the rules lazily
    let counters = ctl.counters(10).map_err(|e| e.to_string())?;
    let fast = ctl.fast_path_bytes().map_err(|e| e.to_string())?;
    stop.store(true, Ordering::Relaxed);
    let _ = svc.join();
    let fraction = fast as f64 / (fast + counters.steered_bytes) as f64;
    eprintln!(
        "dns answered {answered}/20; steered {} B, fast path {fast} B",
        counters.steered_bytes
    );

    let mut v = of;
    let m = v.as_object_mut().expect("object");
    m.insert("fail_open_ms_median".into(), json!(median(fo_ms)));
    m.insert(
        "fail_open_lost_packets_median".into(),
        json!(median(fo_lost)),
    );
    m.insert("steer_active_ms_median".into(), json!(median(active)));
    m.insert("post_verdict_leak_packets".into(), json!(median(leak)));
    m.insert("bulk_tcp_ratio".into(), json!(with_bps / base_bps));
    m.insert("fast_path_byte_fraction".into(), json!(fraction));
    m.insert("datapath".into(), json!("netdev (userspace)"));
    Ok(v)
}
