//! Scenarios on the emulated gateway: each boots a fresh gateway (a qcow2 overlay of the same
//! image) and drives it the way a field engineer would, through gatevisor's CLI inside it.
//! Off unless GATEVISOR_QEMU_TESTS=1 (scripts/test.sh sets it); see the README's qemu-tests
//! section.

use qemu_tests::gateway::addr;
use qemu_tests::Gateway;
use std::time::Duration;

/// Runs `body` on a freshly booted gateway, or prints why the scenario is skipped.
///
/// When the body fails and the gateway's own kernel panicked meanwhile, the scenario runs
/// once more on a fresh gateway, after the panic is printed: under TCG the emulated board's
/// kernel has panicked inside KVM's SVM code (a kernel stack overflow in its page-fault
/// handler, CI of stop 40), which nothing a process does can cause. Any other failure, and a
/// second panic, fail the scenario.
fn scenario(body: impl Fn(&mut Gateway)) {
    if let Some(why) = qemu_tests::skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    for attempt in 1..=2 {
        let mut gw = Gateway::boot().expect("the emulated gateway boots");
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&mut gw)));
        let Err(failure) = run else { return };
        match gw.kernel_panic() {
            Some(report) if attempt == 1 => {
                gw.dump();
                gw.keep_logs();
                eprintln!(
                    "qemu-tests: the gateway's kernel panicked during the scenario (logs kept \
                     in {}):\n{report}\nqemu-tests: running the scenario once more on a fresh \
                     gateway",
                    gw.dir.display()
                );
            }
            _ => std::panic::resume_unwind(failure),
        }
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn gatevisor_starts_from_systemd_and_sees_hardware_kvm() {
    scenario(|gw| {
        assert_eq!(
            gw.ok("systemctl is-active gatevisor").unwrap().trim(),
            "active"
        );
        let board = json(&gw.ok("gatevisor board --json").unwrap());
        assert_eq!(board["kvm"]["kind"], "hardware-amd", "{board:#}");
        assert_eq!(board["auto_runtime"], "microvm", "{board:#}");
        assert_eq!(board["profile"]["name"], "emulated-gateway");
        assert_eq!(board["cgroup"]["version"], "v2", "{board:#}");
        // The gateway's own network is up: the LAN client reaches the WAN host through it.
        gw.lan
            .sh(&format!("ping -c1 -W5 {}", addr::WAN_HOST))
            .expect("LAN → WAN through the gateway");
    });
}

/// `gatevisor service status NAME --json` inside the gateway.
fn status(gw: &Gateway, name: &str) -> serde_json::Value {
    json(
        &gw.ok(&format!("gatevisor service status {name} --json"))
            .unwrap(),
    )
}

/// The tail of a service's log (a microVM's guest console and its VMM's messages): what a
/// failure message needs to say why a service ended.
fn service_log(gw: &Gateway, name: &str) -> String {
    let path = format!("/var/lib/gatevisor/logs/{name}.log");
    match gw.run(&format!("tail -c 6000 {path}")) {
        Ok(o) => format!("{path} (end):\n{}", o.stdout),
        Err(e) => format!("{path}: {e}"),
    }
}

/// Waits until service `name` runs under a container init other than `not_pid`; returns its
/// status.
fn wait_running(gw: &Gateway, name: &str, not_pid: Option<i64>) -> serde_json::Value {
    gw.wait_until(
        &format!("service {name} running"),
        Duration::from_secs(180),
        |gw| {
            let out = gw.run(&format!("gatevisor service status {name} --json"))?;
            if !out.success() {
                return Ok(None);
            }
            let v = json(&out.stdout);
            let pid = v["init_pid"].as_i64();
            Ok((v["state"] == "running" && pid.is_some() && pid != not_pid).then_some(v))
        },
    )
    .unwrap()
}

/// Waits for microVM service `name`'s guest to be `up` (180 s). Under the gateway's nested
/// TCG about one boot in 30 never reaches the guest's kernel (see the README's VMM figures;
/// CI saw it in this scenario twice: a VMM at 33 MiB, not a line on its console): such a VMM
/// is killed once and the restart policy boots it again, which then has 300 s. Returns the
/// VMM's PID.
fn wait_guest(
    gw: &Gateway,
    name: &str,
    what: &str,
    up: impl Fn(&Gateway) -> qemu_tests::Result<Option<()>>,
) -> i64 {
    let pid = || status(gw, name)["init_pid"].as_i64().unwrap();
    if gw.wait_until(what, Duration::from_secs(180), &up).is_ok() {
        return pid();
    }
    let vmm = pid();
    eprintln!("{name}: {what}: the guest never came up; killing its VMM {vmm} once more");
    gw.ok(&format!("kill -9 {vmm}")).unwrap();
    wait_running(gw, name, Some(vmm));
    gw.wait_until(what, Duration::from_secs(300), &up).unwrap();
    pid()
}

/// Installs and starts the busybox example service `hello` (examples/hello-lxc.toml).
fn install_hello(gw: &Gateway) -> serde_json::Value {
    gw.put(
        &qemu_tests::workspace().join("examples/hello-lxc.toml"),
        "/root/hello.toml",
        0o644,
    )
    .unwrap();
    gw.ok("gatevisor service install /root/hello.toml --start")
        .unwrap();
    wait_running(gw, "hello", None)
}

#[test]
fn lxc_service_installs_through_the_cli_runs_and_shows_in_status() {
    scenario(|gw| {
        let st = install_hello(gw);
        assert_eq!(st["runtime"], "lxc", "{st:#}");
        let pid = st["init_pid"].as_i64().unwrap();
        // Really running: its init is a live process of the gateway, in a cgroup v2 of its own.
        let cgroup = gw.ok(&format!("cat /proc/{pid}/cgroup")).unwrap();
        assert!(cgroup.starts_with("0::/"), "{cgroup}");
        let list = gw.ok("gatevisor service list").unwrap();
        assert!(
            list.lines()
                .any(|l| l.starts_with("hello") && l.contains("running")),
            "{list}"
        );
        let logs = gw
            .wait_until("hello's first log line", Duration::from_secs(60), |gw| {
                let out = gw.run("gatevisor service logs hello")?;
                Ok(out.stdout.contains("hello from").then_some(out.stdout))
            })
            .unwrap();
        assert!(logs.contains("gatevisor says hi"), "{logs}");
        gw.ok("gatevisor service remove hello").unwrap();
        let list = gw.ok("gatevisor service list").unwrap();
        assert!(!list.contains("hello"), "{list}");
    });
}

#[test]
fn gatevisor_restart_through_systemd_leaves_services_running() {
    scenario(|gw| {
        let before = install_hello(gw);
        let pid = before["init_pid"].as_i64().unwrap();
        gw.ok("systemctl restart gatevisor").unwrap();
        assert_eq!(
            gw.ok("systemctl is-active gatevisor").unwrap().trim(),
            "active"
        );
        let after = status(gw, "hello");
        assert_eq!(after["state"], "running", "{after:#}");
        assert_eq!(
            after["init_pid"].as_i64(),
            Some(pid),
            "re-adopted, not restarted"
        );
        assert_eq!(after["restarts"], before["restarts"], "{after:#}");
        gw.ok(&format!("kill -0 {pid}")).unwrap();
    });
}

#[test]
fn gateway_reboot_brings_gatevisor_and_its_services_back() {
    scenario(|gw| {
        let before = install_hello(gw);
        let old_boot = gw.boot_id().to_string();
        gw.reboot().expect("the gateway reboots");
        assert_ne!(gw.boot_id(), old_boot);
        assert_eq!(
            gw.ok("systemctl is-active gatevisor").unwrap().trim(),
            "active"
        );
        // The old init PID means nothing in a new boot; the service is simply running again.
        let after = wait_running(gw, "hello", None);
        assert_eq!(after["desired"], before["desired"], "{after:#}");
        let events = gw.ok("gatevisor events -n 20").unwrap();
        assert!(events.contains("previous boot"), "{events}");
    });
}

/// Builds dns-filter statically on the host and signs it into a package with a fresh key, as
/// a publisher would. Its restart backoff is raised so that the window in which it is down is
/// long enough to observe at TCG speed. Returns (package, public key).
fn dns_filter_package(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (pkgs, key) = qemu_tests::packages::signed(dir, &["dns-filter"], |src| {
        let f = src.join("service.toml");
        let text = std::fs::read_to_string(&f).unwrap();
        let text: String = text
            .lines()
            .map(|l| {
                if l.starts_with("backoff_initial_ms = ") {
                    "backoff_initial_ms = 30000".to_string()
                } else if l.starts_with("backoff_max_ms = ") {
                    "backoff_max_ms = 60000".to_string()
                } else {
                    l.to_string()
                }
            })
            .map(|l| l + "\n")
            .collect();
        std::fs::write(&f, text).unwrap();
    })
    .expect("the dns-filter package builds");
    (pkgs[0].clone(), key)
}

/// The LAN client asks the WAN resolver for `name` through the gateway: the address, or
/// "NXDOMAIN", or "no answer".
fn lookup(gw: &Gateway, name: &str) -> String {
    let out = gw.lan.try_sh(&format!(
        "dig +time=5 +tries=1 @{} {name} A",
        addr::WAN_HOST
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("status: NXDOMAIN") {
        return "NXDOMAIN".into();
    }
    text.lines()
        .filter(|l| !l.starts_with(';'))
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && f[3] == "A").then(|| f[4].to_string())
        })
        .unwrap_or_else(|| "no answer".into())
}

#[test]
fn lan_traffic_crosses_the_bridge_with_a_steering_service_and_fails_open_when_it_dies() {
    scenario(|gw| {
        let (pkg, key) = dns_filter_package(&gw.dir);
        gw.put(&pkg, "/root/dns-filter.gvpkg", 0o644).unwrap();
        gw.put(&key, "/root/operator.pub", 0o644).unwrap();
        gw.ok("gatevisor key trust /root/operator.pub").unwrap();
        gw.ok("gatevisor service install /root/dns-filter.gvpkg --start")
            .unwrap();
        let st = wait_running(gw, "dns-filter", None);
        // runtime = "auto" on hardware KVM: dns-filter runs as a microVM (its package carries an
        // initramfs; gatevisor's guest init runs it and bridges its verdict socket over vsock).
        assert_eq!(st["runtime"], "microvm", "{st:#}");
        gw.wait_until("the filter answers", Duration::from_secs(120), |gw| {
            Ok((lookup(gw, "games.test") == "0.0.0.0").then_some(()))
        })
        .unwrap();
        // The kids' laptop (the LAN client's MAC) is filtered; allowed names resolve on the WAN.
        assert_eq!(lookup(gw, "x.ads.test"), "0.0.0.0");
        assert_eq!(lookup(gw, "example.test"), addr::WAN_HOST);
        // Data traffic is routed through the bridge to the WAN and never visits the service.
        let fetch = format!(
            "python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://{}:8080/\", timeout=10).read().decode())'",
            addr::WAN_HOST
        );
        let page = gw.lan.sh(&fetch).expect("LAN client fetches a WAN page");
        assert!(page.contains("hello from the internet"), "{page}");
        let flows = gw
            .ok("ovs-appctl dpctl/dump-flows system@ovs-system")
            .unwrap();
        assert!(flows.contains("in_port"), "kernel datapath flows: {flows}");
        // The switch's statistics reach its rules lazily (the datapath flows' counters are
        // read back every second or so; slower under TCG): wait for them.
        let counted = gw.wait_until(
            "the steered queries counted",
            Duration::from_secs(20),
            |gw| {
                let st = status(gw, "dns-filter");
                let steered = st
                    .pointer("/steering/counters/steered_packets")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0);
                Ok((steered >= 3).then_some(st))
            },
        );
        let st = counted.unwrap_or_else(|e| {
            panic!(
                "DNS queries were steered: {e}: {:#}",
                status(gw, "dns-filter")
            )
        });

        // Kill the service: DNS keeps working, unfiltered (fail-open), until it is back.
        let pid = st["init_pid"].as_i64().unwrap();
        gw.ok(&format!("kill -9 {pid}")).unwrap();
        gw.wait_until("fail-open after the kill", Duration::from_secs(25), |gw| {
            Ok((lookup(gw, "games.test") == addr::WAN_HOST).then_some(()))
        })
        .unwrap();
        // Traffic fails over when the VMM dies; the exit is recorded when the daemon has reaped
        // it, which under TCG can come seconds later.
        gw.wait_until("the exit in the event log", Duration::from_secs(60), |gw| {
            let events = gw.ok("gatevisor events -n 20")?;
            Ok(events.contains("killed by signal 9").then_some(()))
        })
        .unwrap();
        wait_running(gw, "dns-filter", Some(pid));
        gw.wait_until(
            "filtering again after the restart",
            Duration::from_secs(120),
            |gw| Ok((lookup(gw, "games.test") == "0.0.0.0").then_some(())),
        )
        .unwrap();

        // `systemctl restart gatevisor` under load (blocked lookups and downloads from the LAN
        // client): nothing leaks, nothing fails, the service keeps its PID and its port never
        // learns the LAN client's address.
        let pid = status(gw, "dns-filter")["init_pid"].as_i64().unwrap();
        // The gateway KVM's record of a guest shutting down, for a failure to show: on a triple
        // fault KVM resets the vCPU before the VMM can read it (CI saw the guest end so twice
        // in this loop), so only the exit's trace keeps where the guest was.
        const TRACE: &str = "/sys/kernel/tracing";
        let _ = gw.run(&format!(
            "echo 'exit_reason == 127' > {TRACE}/events/kvm/kvm_exit/filter && \
             echo 1 > {TRACE}/events/kvm/kvm_exit/enable; \
             echo 1 > {TRACE}/events/kvm/kvm_inj_exception/enable; echo 1 > {TRACE}/tracing_on"
        ));
        let load = LanLoad::start(&gw.lan.name);
        std::thread::sleep(Duration::from_secs(2));
        // As many restarts as issue 23 asks of the host test, paced under systemd's start limit
        // (5 starts in 10 s by default, manual restarts included).
        for i in 0..20 {
            gw.ok("systemctl restart gatevisor").unwrap();
            let st = wait_running(gw, "dns-filter", None);
            if st["init_pid"].as_i64() != Some(pid) {
                let trace = gw
                    .run(&format!("grep -v '^#' {TRACE}/trace | tail -40"))
                    .map(|o| o.stdout)
                    .unwrap_or_default();
                panic!(
                    "restart {i}: the service did not keep its PID {pid}: {st:#}\n{}\n\
                     the gateway KVM's shutdown exits and injected exceptions:\n{trace}",
                    service_log(gw, "dns-filter")
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        let _ = gw.run(&format!(
            "echo 0 > {TRACE}/tracing_on; echo 0 > {TRACE}/events/kvm/kvm_exit/enable; \
             echo 0 > {TRACE}/events/kvm/kvm_inj_exception/enable"
        ));
        let (filtered, unfiltered, unanswered, downloads, failed) = load.stop();
        let line = format!(
            "lookups filtered {filtered}, unfiltered {unfiltered}, unanswered {unanswered}; \
             downloads {downloads}, failed {failed}"
        );
        eprintln!("systemctl restarts under load: {line}");
        assert_eq!(unfiltered, 0, "{line}");
        assert_eq!(failed, 0, "{line}");
        assert!(filtered > 10 && downloads > 3, "{line}");
        let port = gw
            .ok("ovs-vsctl get Interface gv-dns-filter ofport")
            .unwrap();
        let fdb = gw.ok("ovs-appctl fdb/show br-lan").unwrap();
        for l in fdb.lines().skip(1) {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(
                !(f.first() == Some(&port.trim()) && f.get(2) == Some(&addr::LAN_CLIENT_MAC)),
                "the LAN client's MAC was learned on the service port {port}: {fdb}"
            );
        }

        // The operator's settings: the kids' profile (the LAN client is on it) now blocks
        // other.test instead. The microVM takes it over its control channel (vsock), without a
        // restart, and keeps it through a reboot of the gateway.
        let pid = status(gw, "dns-filter")["init_pid"].as_i64().unwrap();
        gw.ok("gatevisor service config dns-filter set KidsBlock=other.test")
            .unwrap();
        gw.wait_until("the new kids' profile", Duration::from_secs(10), |gw| {
            Ok((lookup(gw, "other.test") == "0.0.0.0").then_some(()))
        })
        .unwrap();
        assert_eq!(lookup(gw, "games.test"), addr::WAN_HOST);
        assert_eq!(
            status(gw, "dns-filter")["init_pid"].as_i64(),
            Some(pid),
            "not restarted"
        );
        gw.reboot().expect("the gateway reboots");
        wait_running(gw, "dns-filter", None);
        gw.wait_until(
            "the kids' profile after the reboot",
            Duration::from_secs(180),
            |gw| Ok((lookup(gw, "other.test") == "0.0.0.0").then_some(())),
        )
        .unwrap();
        assert_eq!(lookup(gw, "games.test"), addr::WAN_HOST);
        assert_eq!(
            gw.ok("gatevisor service config dns-filter get KidsBlock")
                .unwrap()
                .trim(),
            "other.test"
        );
    });
}

/// Load from the LAN client's namespace (on this machine): a lookup of `games.test` (blocked
/// for the client by dns-filter) every 100 ms and a download from the WAN web server every
/// 300 ms, each on a thread of its own, until stopped.
struct LanLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<[u64; 3]>>,
}

impl LanLoad {
    fn start(netns: &str) -> LanLoad {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let enter = |netns: &str| {
            let f = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
            // SAFETY: setns on a namespace file this thread opened; it affects this thread only.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {netns}");
        };
        let lookups = {
            let (stop, ns) = (stop.clone(), netns.to_string());
            std::thread::spawn(move || {
                enter(&ns);
                let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut n = [0u64; 3]; // filtered, unfiltered, unanswered
                let mut id: u16 = 0;
                let mut b = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    id = id.wrapping_add(1);
                    let mut q = id.to_be_bytes().to_vec();
                    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
                    for l in ["games", "test"] {
                        q.push(l.len() as u8);
                        q.extend_from_slice(l.as_bytes());
                    }
                    q.extend_from_slice(&[0, 0, 1, 0, 1]);
                    let _ = s.send_to(&q, (addr::WAN_HOST, 53));
                    let answer = loop {
                        match s.recv_from(&mut b) {
                            Ok((len, _)) if len > 12 && b[..2] == id.to_be_bytes() => {
                                break Some(b[len - 4..len].to_vec())
                            }
                            Ok(_) => continue,
                            Err(_) => break None,
                        }
                    };
                    match answer {
                        Some(a) if a == [0, 0, 0, 0] => n[0] += 1,
                        Some(_) => n[1] += 1,
                        None => n[2] += 1,
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                n
            })
        };
        let downloads = {
            let (stop, ns) = (stop.clone(), netns.to_string());
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                enter(&ns);
                let mut n = [0u64; 3]; // ok, failed, unused
                while !stop.load(Ordering::Relaxed) {
                    let ok = (|| {
                        let mut c = std::net::TcpStream::connect_timeout(
                            &format!("{}:8080", addr::WAN_HOST).parse().ok()?,
                            Duration::from_secs(10),
                        )
                        .ok()?;
                        c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
                        c.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
                        let mut body = Vec::new();
                        c.read_to_end(&mut body).ok()?;
                        Some(String::from_utf8_lossy(&body).contains("hello from the internet"))
                    })();
                    if ok == Some(true) {
                        n[0] += 1;
                    } else {
                        n[1] += 1;
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
                n
            })
        };
        LanLoad {
            stop,
            threads: vec![lookups, downloads],
        }
    }

    /// (filtered, unfiltered, unanswered lookups; downloads, failed downloads)
    fn stop(self) -> (u64, u64, u64, u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut t = self.threads.into_iter();
        let l = t.next().unwrap().join().unwrap();
        let d = t.next().unwrap().join().unwrap();
        (l[0], l[1], l[2], d[0], d[1])
    }
}

#[test]
fn microvm_boots_the_stock_debian_kernel_through_pvh_to_init_on_two_vcpus_under_our_vmm() {
    scenario(|gw| {
        let initrd = gw.dir.join("guest.cpio");
        // The guest also reports what it was given: its clock source, its CPU flags, its
        // wall-clock time, and its kernel's warnings and worse (`dmesg -r`, levels 0-4).
        qemu_tests::guest::busybox_initramfs(
            &initrd,
            "echo guest-cpus $(grep -c ^processor /proc/cpuinfo)\n\
             echo \"guest-clocksource $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)\"\n\
             echo \"guest-$(grep -m1 ^flags /proc/cpuinfo | tr -d '\\t')\"\n\
             echo \"guest-epoch $(date +%s)\"\n\
             dmesg -r | grep '^<[0-4]>'",
        )
        .unwrap();
        gw.put(&initrd, "/root/guest.cpio", 0o644).unwrap();
        // The ELF kernel inside the bzImage (the image carries it as /boot/vmlinux-RELEASE),
        // entered through its PVH note; the other microVM scenarios boot the bzImage itself.
        // Two vCPUs: the guest brings up its second CPU (MADT, INIT/SIPI) on its own thread.
        let cfg = format!(
            "memory_mib = 256\nvcpus = 2\nconsole_log = \"/root/guest-console.log\"\n[boot]\nkind = \"linux\"\n\
             kernel = \"/boot/vmlinux-{}\"\ninitrd = \"/root/guest.cpio\"\n\
             cmdline = \"console=ttyS0 reboot=k panic=-1 pci=off quiet\"\n",
            gw.image.kernel_release
        );
        gw.put_bytes(cfg.as_bytes(), "/root/vm.toml", 0o644)
            .unwrap();
        // Under the gateway's nested TCG a boot now and then goes wrong in the guest itself
        // (see wait_guest; CI once saw this one end in a triple fault right after the kernel's
        // PCI probe, and the same boot passed when run again): a failed first boot is reported
        // and booted once more; a second failure fails the test.
        let boot = || {
            let out = gw
                .run_for(
                    "rm -f /root/guest-console.log; date +%s > /root/vm-start; \
                     gatevisor vmm --config /root/vm.toml",
                    Duration::from_secs(600),
                )
                .unwrap();
            let console = gw
                .ok("cat /root/guest-console.log 2>/dev/null || true")
                .unwrap();
            (out, console)
        };
        let (mut out, mut console) = boot();
        if out.code != Some(0) || !console.contains(qemu_tests::guest::INIT_MARKER) {
            eprintln!(
                "the first boot failed (exit {:?}: {}; console:\n{console}); booting once more",
                out.code,
                out.stderr.trim()
            );
            (out, console) = boot();
        }
        assert_eq!(
            out.code,
            Some(0),
            "vmm: {}\nconsole:\n{console}",
            out.stderr
        );
        assert!(
            console.contains(qemu_tests::guest::INIT_MARKER),
            "console:\n{console}"
        );
        assert!(console.contains(&gw.image.kernel_release), "{console}");
        assert!(console.contains("guest-cpus 2"), "{console}");
        let said = |what: &str| {
            console
                .lines()
                .find_map(|l| l.strip_prefix(what))
                .unwrap_or_else(|| panic!("the guest did not say {what}:\n{console}"))
                .trim()
                .to_string()
        };
        // The paravirtual clock, and the CPU features the stock kernel relies on or that a
        // microVM VMM is expected to present (the TSC deadline timer, x2APIC, the hypervisor bit).
        assert_eq!(said("guest-clocksource "), "kvm-clock");
        let flags: Vec<String> = said("guest-flags")
            .trim_start_matches(':')
            .split_whitespace()
            .map(String::from)
            .collect();
        for f in [
            "fpu",
            "tsc",
            "msr",
            "pae",
            "apic",
            "cx8",
            "cmov",
            "pat",
            "clflush",
            "fxsr",
            "sse2",
            "syscall",
            "nx",
            "lm",
            "tsc_known_freq",
            "x2apic",
            "tsc_deadline_timer",
            "hypervisor",
        ] {
            assert!(
                flags.iter().any(|x| x == f),
                "no {f} in the guest's flags: {flags:?}"
            );
        }
        // Its wall clock is the gateway's (from the start of the VMM to the end, and a second).
        let start: u64 = gw.ok("cat /root/vm-start").unwrap().trim().parse().unwrap();
        let end: u64 = gw.ok("date +%s").unwrap().trim().parse().unwrap();
        let guest: u64 = said("guest-epoch ").parse().unwrap();
        assert!(
            (start - 1..=end + 1).contains(&guest),
            "guest clock {guest}, gateway {start}..{end}"
        );
        // No kernel warnings but those a stock kernel gives on this machine under any microVM
        // VMM (QEMU's microvm gives the same ones, see the boot-profile example): no PCI (pci=off),
        // the emulated EPYC's missing SRSO microcode, a sched_clock that is not stable under the
        // nested hypervisor, and rtc_cmos (QEMU's: "broken or not accessible").
        const KNOWN: [&str; 9] = [
            "Speculative Return Stack Overflow: IBPB-extending microcode not applied!",
            "Speculative Return Stack Overflow: WARNING: See https://kernel.org/doc/html/latest/admin-guide/hw-vuln/srso.html",
            "PCI: Fatal: No config space access function found",
            "PCI: System does not support PCI",
            "rtc_cmos: probe of rtc_cmos failed with error -22",
            "Unstable clock detected, switching default tracing clock to \"global\"",
            "If you want to keep using the local clock, then add:",
            "\"trace_clock=local\"",
            "on the kernel command line",
        ];
        let warnings = qemu_tests::bootcmp::warnings(&console);
        let new: Vec<_> = warnings
            .iter()
            .filter(|w| !KNOWN.iter().any(|k| w.starts_with(k)))
            .collect();
        assert!(new.is_empty(), "new kernel warnings: {new:#?}");
    });
}

/// For a `gatevisor vmm` run of the stock kernel with `/root/{name}-guest.cpio`: a tap on
/// br-lan and a read-only 16 MiB ext4 disk `/root/{name}-disk.img` holding one file. Returns
/// the VM's configuration (256 MiB, console in `/root/{name}-console.log`, `extra` added).
fn vm_on_the_bridge(
    gw: &Gateway,
    name: &str,
    (tap, mac): (&str, &str),
    (file, content): (&str, &str),
    extra: &str,
) -> String {
    let disk = format!("/root/{name}-disk.img");
    gw.ok(&format!(
        "ip tuntap add {tap} mode tap && ip link set {tap} up && ovs-vsctl add-port br-lan {tap} \
         && truncate -s 16M {disk} && mkfs.ext4 -q -F {disk} \
         && mkdir -p /tmp/m && mount -o loop {disk} /tmp/m \
         && echo {content} > /tmp/m/{file} && umount /tmp/m"
    ))
    .unwrap();
    format!(
        "memory_mib = 256\nconsole_log = \"/root/{name}-console.log\"\n{extra}\n\
         [boot]\nkind = \"linux\"\nkernel = \"/boot/vmlinuz-{}\"\ninitrd = \"/root/{name}-guest.cpio\"\n\
         cmdline = \"console=ttyS0 reboot=k panic=-1 pci=off quiet\"\n\
         [[net]]\ntap = \"{tap}\"\nmac = \"{mac}\"\n\
         [[disk]]\npath = \"{disk}\"\nread_only = true\n",
        gw.image.kernel_release
    )
}

/// Builds a busybox guest initramfs running `script` (the stock kernel's virtio modules
/// loaded first) and puts it in the gateway as `/root/NAME`.
fn put_guest_initramfs(gw: &Gateway, name: &str, script: &str) {
    let modules = qemu_tests::image::guest_modules(&qemu_tests::image::base().unwrap()).unwrap();
    let local = gw.dir.join(name);
    qemu_tests::guest::busybox_initramfs_with_modules(&local, script, &modules).unwrap();
    gw.put(&local, &format!("/root/{name}"), 0o644).unwrap();
}

#[test]
fn microvm_net_on_the_bridge_and_blk_root_work_and_poweroff_ends_the_vmm() {
    scenario(|gw| {
        // The stock kernel finds virtio-mmio through our ACPI tables once the initramfs loads
        // the virtio modules; the guest mounts its disk, joins the LAN on the bridge, answers a
        // ping and a TCP message from the LAN host, then powers off.
        const GUEST: &str = "10.77.0.50";
        put_guest_initramfs(
            gw,
            "net-guest.cpio",
            &format!(
                "mkdir -p /mnt; mount -o ro /dev/vda /mnt && echo \"disk says: $(cat /mnt/hello.txt)\"\n\
                 echo \"disk serial: $(cat /sys/block/vda/serial)\"\n\
                 ip link set eth0 up; ip addr add {GUEST}/24 dev eth0\n\
                 echo guest-net-up\n\
                 nc -l -p 7000 > /tmp/msg; echo \"guest got: $(cat /tmp/msg)\"\n\
                 poweroff -f"
            ),
        );
        let cfg = vm_on_the_bridge(
            gw,
            "net",
            ("gvt0", "02:47:56:00:00:32"),
            ("hello.txt", "hello-from-virtio-blk"),
            "",
        );
        gw.put_bytes(cfg.as_bytes(), "/root/vm-net.toml", 0o644)
            .unwrap();
        gw.ok("(gatevisor vmm --config /root/vm-net.toml > /root/vmm.out 2>&1; echo $? > /root/vmm.code) &")
            .unwrap();
        gw.wait_until("the guest's network up", Duration::from_secs(300), |gw| {
            let c = gw.run("cat /root/net-console.log")?.stdout;
            Ok(c.contains("guest-net-up").then_some(()))
        })
        .unwrap();
        gw.lan
            .sh(&format!("ping -c 3 -W 5 {GUEST}"))
            .expect("the LAN host pings the microVM through the bridge");
        gw.lan
            .sh(&format!(
                "bash -c 'echo hello-over-tcp > /dev/tcp/{GUEST}/7000'"
            ))
            .expect("TCP from the LAN host into the microVM");
        let code = gw
            .wait_until("the VMM to end", Duration::from_secs(120), |gw| {
                let out = gw.run("cat /root/vmm.code")?;
                Ok(out.success().then(|| out.stdout.trim().to_string()))
            })
            .unwrap();
        let console = gw.ok("cat /root/net-console.log").unwrap();
        let vmm = gw.ok("cat /root/vmm.out").unwrap();
        assert_eq!(code, "0", "vmm: {vmm}\nconsole:\n{console}");
        assert!(vmm.contains("powered off"), "{vmm}");
        assert!(
            console.contains("disk says: hello-from-virtio-blk"),
            "{console}"
        );
        assert!(
            console.contains("disk serial: gatevisor-disk0"),
            "{console}"
        );
        assert!(console.contains("guest got: hello-over-tcp"), "{console}");
    });
}

#[test]
fn microvm_service_runs_restarts_and_is_readopted_under_the_supervisor() {
    scenario(|gw| {
        let initrd = gw.dir.join("vm-hello.cpio");
        // Only busybox and the service script: the supervisor adds gatevisor's guest init and
        // the kernel's virtio modules. The guest joins the LAN on its tap (plugged into br-lan,
        // its address set from network.address) and sees its scratch disk (resources.disk_mib).
        // The SDK's host-call binary rides along: the service makes host calls from its guest.
        let host_call = qemu_tests::build_static(&["gatevisor-service-sdk"])
            .unwrap()
            .join("host-call");
        qemu_tests::guest::busybox_initramfs_with_programs(
            &initrd,
            "echo \"vda sectors $(cat /sys/block/vda/size)\"\n\
             trap 'echo vm-hello got SIGTERM; exit 0' TERM\n\
             (while read l; do echo \"console got: $l\"; done) < /dev/console &\n\
             echo vm-hello up; while true; do sleep 2; echo \"tick $(cat /run/gatevisor/settings.json 2>/dev/null)\"; done",
            &[("host-call", &host_call)],
        )
        .unwrap();
        gw.put(&initrd, "/srv/gatevisor-images/vm-hello/guest.cpio", 0o644)
            .unwrap();
        let manifest = r#"
    name = "vm-hello"
    version = "1.0.0"
    runtime = "microvm"
    image = "initramfs:guest.cpio"
    command = ["/init"]
    failure_mode = "open"
    stop_timeout_s = 2

    [resources]
    memory_mib = 128
    disk_mib = 8
    cpu_quota_percent = 50
    pids = 32

    [restart]
    policy = "on-failure"
    max_retries = 5
    backoff_initial_ms = 500
    backoff_max_ms = 5000
    stable_after_s = 60

    [network]
    address = "10.77.0.60/24"

    [microvm]
    cmdline = "quiet"

    [settings.Greeting]
    type = "string"
    default = "hello"

    [host_calls]
    allow = ["link.stats:gv-*"]
    "#;
        // The operator allows that host call on this gateway (a scenario's gateway is its own:
        // the change goes with it).
        gw.ok(r#"printf '[policy]\nhost_calls = ["link.stats:gv-*"]\n' >> /etc/gatevisor/gatevisor.toml && systemctl restart gatevisor"#)
            .unwrap();
        gw.wait_until(
            "gatevisor back with the policy",
            Duration::from_secs(60),
            |gw| Ok((gw.run("gatevisor service list")?.code == Some(0)).then_some(())),
        )
        .unwrap();
        gw.put_bytes(
            manifest.as_bytes(),
            "/srv/gatevisor-images/vm-hello/service.toml",
            0o644,
        )
        .unwrap();
        gw.ok("gatevisor service install /srv/gatevisor-images/vm-hello/service.toml --start")
            .unwrap();
        let st = wait_running(gw, "vm-hello", None);
        assert_eq!(st["runtime"], "microvm", "{st:#}");
        let vmm = st["init_pid"].as_i64().unwrap();
        let cmdline = gw
            .ok(&format!("tr '\\0' ' ' < /proc/{vmm}/cmdline"))
            .unwrap();
        assert!(cmdline.contains("gatevisor vmm --config"), "{cmdline}");
        // The guest's console is the service log.
        let vmm = wait_guest(gw, "vm-hello", "the guest's init on its console", |gw| {
            let out = gw.run("gatevisor service logs vm-hello")?;
            Ok(out.stdout.contains("vm-hello up").then_some(()))
        });
        let st = status(gw, "vm-hello");
        assert_eq!(st["interface"], "gv-vm-hello", "{st:#}");
        gw.lan
            .sh("ping -c 2 -W 5 10.77.0.60")
            .expect("the LAN host reaches the microVM service on the bridge");
        let logs = gw.ok("gatevisor service logs vm-hello").unwrap();
        assert!(logs.contains("vda sectors 16384"), "{logs}");
        // The operator's settings reach the guest's root as a file (the guest init watches them
        // on the control channel), at boot and when they change, without a restart.
        let setting_in_log = |gw: &Gateway, text: &str| -> qemu_tests::Result<Option<()>> {
            let out = gw.run("gatevisor service logs vm-hello --bytes 2000")?;
            Ok(out.stdout.contains(text).then_some(()))
        };
        gw.wait_until(
            "the settings file in the guest",
            Duration::from_secs(60),
            |gw| setting_in_log(gw, r#"{"Greeting":"hello"}"#),
        )
        .unwrap();
        gw.ok("gatevisor service config vm-hello set Greeting=changed-live")
            .unwrap();
        gw.wait_until(
            "the changed settings in the guest",
            Duration::from_secs(60),
            |gw| setting_in_log(gw, r#"{"Greeting":"changed-live"}"#),
        )
        .unwrap();
        assert_eq!(
            status(gw, "vm-hello")["init_pid"].as_i64(),
            Some(vmm),
            "not restarted"
        );
        // Host calls from inside the guest (the guest init runs the command with the service's
        // environment: its control channel over vsock): its own port's counters are answered,
        // another link is refused, both are audited.
        let call = |link: &str| {
            gw.run(&format!(
                r#"gatevisor service exec vm-hello -- /bin/host-call link.stats '{{"link":"{link}"}}'"#
            ))
            .unwrap()
            .code
        };
        assert_eq!(
            call("gv-vm-hello"),
            Some(0),
            "a granted host call from the microVM"
        );
        assert_eq!(
            call("lo"),
            Some(1),
            "an ungranted host call from the microVM"
        );
        let events = gw.ok("gatevisor events --json").unwrap();
        assert!(
            events.contains("link.stats gv-vm-hello: ok")
                && events.contains("link.stats lo: refused (not-granted)"),
            "{events}"
        );
        // The serial console, both ways.
        let out = gw
            .ok("printf 'hello-console\\n' | gatevisor service console vm-hello --for 20")
            .unwrap();
        assert!(out.contains("console got: hello-console"), "{out}");
        let rss = st["microvm"]["vmm_rss_bytes"].as_u64().unwrap_or(0);
        assert!(rss > 1 << 20, "VMM resident memory reported: {st:#}");
        assert_eq!(st["microvm"]["guest_memory_bytes"], 128u64 << 20);
        // The VMM runs in a cgroup of its own with the service's limits (memory: the guest's and
        // the VMM's own), which the kernel enforces: the guest's boot under a 50% CPU quota was
        // throttled.
        let cg = st["microvm"]["cgroup"].as_str().unwrap().to_string();
        assert_eq!(cg, "/sys/fs/cgroup/gatevisor.vm.vm-hello", "{st:#}");
        let read = |f: &str| gw.ok(&format!("cat {cg}/{f}")).unwrap().trim().to_string();
        assert_eq!(read("cpu.max"), "50000 100000");
        assert_eq!(read("pids.max"), "32");
        assert_eq!(read("memory.max"), ((128u64 + 32) << 20).to_string());
        assert_eq!(st["memory"]["limit_bytes"], (128u64 + 32) << 20, "{st:#}");
        assert!(
            read("cgroup.procs").lines().any(|p| p == vmm.to_string()),
            "the VMM is in it"
        );
        let throttled: u64 = read("cpu.stat")
            .lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        assert!(throttled > 0, "the CPU quota held the booting guest back");
        assert!(
            st["pids"].as_u64().unwrap_or(0) >= 2,
            "its threads counted: {st:#}"
        );
        assert!(st["cpu_usec"].as_u64().unwrap_or(0) > 0, "{st:#}");

        // The daemon restarts; the VM does not.
        let before = status(gw, "vm-hello");
        let vmm = before["init_pid"].as_i64().unwrap();
        gw.ok("systemctl restart gatevisor").unwrap();
        let st = status(gw, "vm-hello");
        let events = gw.ok("gatevisor events -n 20").unwrap();
        if st["restarts"] == before["restarts"] {
            assert_eq!(
                st["init_pid"].as_i64(),
                Some(vmm),
                "re-adopted: {st:#}\n{events}"
            );
            assert!(
                events.contains(&format!("re-adopted running container, init pid {vmm}")),
                "{events}"
            );
        } else {
            // The guest ended by itself in between (seen rarely under TCG: a triple fault during
            // its boot); the restart policy handled it. Adoption cannot be judged this time.
            eprintln!("vm-hello ended during the daemon restart: {events}");
            wait_running(gw, "vm-hello", Some(vmm));
        }

        // The VMM dies: the restart policy brings the service back in a new VM.
        let st = status(gw, "vm-hello");
        let vmm = st["init_pid"].as_i64().unwrap();
        let restarts = st["restarts"].as_u64().unwrap();
        gw.ok(&format!("kill -9 {vmm}")).unwrap();
        let st = wait_running(gw, "vm-hello", Some(vmm));
        assert!(st["restarts"].as_u64().unwrap() > restarts, "{st:#}");
        // The new VM has a new tap, plugged again.
        wait_guest(gw, "vm-hello", "the restarted guest on the LAN", |gw| {
            Ok(gw
                .lan
                .try_sh("ping -c 1 -W 3 10.77.0.60")
                .status
                .success()
                .then_some(()))
        });
        let events = gw.ok("gatevisor events -n 20").unwrap();
        // "killed by signal 9" when the daemon started the VMM itself; after a re-adoption the
        // daemon is not its parent and only knows that it was killed.
        assert!(events.contains("killed"), "{events}");

        // Stop asks the guest over vsock: the guest init gives the service SIGTERM and powers
        // off; the service is stopped, not failed.
        let vmm = st["init_pid"].as_i64().unwrap();
        gw.wait_until(
            "the restarted guest's service",
            Duration::from_secs(300),
            |gw| {
                let out = gw.run("gatevisor service logs vm-hello")?;
                Ok((out.stdout.matches("vm-hello up").count() >= 2).then_some(()))
            },
        )
        .unwrap();
        gw.ok("gatevisor service stop vm-hello").unwrap();
        let st = status(gw, "vm-hello");
        assert_eq!(st["state"], "stopped", "{st:#}");
        assert!(!gw.run(&format!("kill -0 {vmm}")).unwrap().success());
        let logs = gw.ok("gatevisor service logs vm-hello").unwrap();
        assert!(logs.contains("vm-hello got SIGTERM"), "{logs}");
        assert!(logs.contains("powering off on request"), "{logs}");
        assert!(logs.contains("the guest powered off"), "{logs}");
        gw.ok("gatevisor service remove vm-hello").unwrap();
    });
}

#[test]
fn microvm_snapshot_of_a_running_linux_guest_is_restored_by_a_new_vmm_and_carries_on() {
    scenario(|gw| {
        // A stock kernel guest with a network interface on the bridge, a disk and vsock,
        // snapshotted while it runs (a tick a second, a TCP listener waiting), its VMM killed,
        // and a new VMM process restored from the snapshot: the guest goes on where it was
        // (no second boot), takes a TCP connection from the LAN host and reads a disk file it
        // never read before the snapshot, then powers off.
        const GUEST: &str = "10.77.0.51";
        put_guest_initramfs(
            gw,
            "snap-guest.cpio",
            &format!(
                "mkdir -p /mnt; mount -o ro /dev/vda /mnt\n\
                 ip link set eth0 up; ip addr add {GUEST}/24 dev eth0\n\
                 echo guest-net-up\n\
                 (i=0; while true; do i=$((i+1)); echo tick $i; sleep 1; done) &\n\
                 nc -l -p 7000 > /tmp/msg\n\
                 echo \"guest got: $(cat /tmp/msg); disk: $(cat /mnt/later.txt)\"\n\
                 poweroff -f"
            ),
        );
        let cfg = vm_on_the_bridge(
            gw,
            "snap",
            ("gvt1", "02:47:56:00:00:33"),
            ("later.txt", "read-after-restore"),
            "control_socket = \"/root/snap.control\"\n\
             [vsock]\nguest_cid = 3\nuds_path = \"/root/snap.vsock\"\n",
        );
        gw.put_bytes(cfg.as_bytes(), "/root/vm-snap.toml", 0o644)
            .unwrap();
        // Each VMM in the background; its pid and, once it ends, its exit status in files.
        let start = |n: u32, extra: &str| {
            gw.ok(&format!(
                "(gatevisor vmm --config /root/vm-snap.toml{extra} > /root/vmm{n}.out 2>&1 & \
                 echo $! > /root/vmm{n}.pid; wait $!; echo $? > /root/vmm{n}.code) > /dev/null 2>&1 &"
            ))
            .unwrap();
        };
        let console = |gw: &Gateway| gw.ok("cat /root/snap-console.log").unwrap();
        start(1, "");
        gw.wait_until("the guest ticking", Duration::from_secs(300), |gw| {
            let c = gw.run("cat /root/snap-console.log")?.stdout;
            Ok(c.contains("tick 3").then_some(()))
        })
        .unwrap();
        let snap = gw.run_for(
            "/usr/local/sbin/gateway-agent vmm-snapshot /root/snap.control /root/snap",
            Duration::from_secs(300),
        );
        let snap = snap.unwrap();
        assert_eq!(
            snap.code,
            Some(0),
            "snapshot: {}\nconsole:\n{}",
            snap.stderr,
            console(gw)
        );
        gw.ok("kill -9 $(cat /root/vmm1.pid)").unwrap();
        gw.wait_until("the first VMM to end", Duration::from_secs(60), |gw| {
            Ok(gw.run("cat /root/vmm1.code")?.success().then_some(()))
        })
        .unwrap();
        let before = console(gw);
        start(2, " --restore /root/snap");
        // The restored guest answers ARP and takes the connection its nc was waiting for.
        gw.wait_until(
            "TCP into the restored guest",
            Duration::from_secs(300),
            |gw| {
                Ok(gw
                    .lan
                    .sh(&format!(
                        "timeout 10 bash -c 'echo hello-after-restore > /dev/tcp/{GUEST}/7000'"
                    ))
                    .is_ok()
                    .then_some(()))
            },
        )
        .unwrap();
        let code = gw
            .wait_until("the restored VMM to end", Duration::from_secs(120), |gw| {
                let out = gw.run("cat /root/vmm2.code")?;
                Ok(out.success().then(|| out.stdout.trim().to_string()))
            })
            .unwrap();
        let after = console(gw);
        let vmm2 = gw.ok("cat /root/vmm2.out").unwrap();
        assert_eq!(code, "0", "restored vmm: {vmm2}\nconsole:\n{after}");
        assert!(vmm2.contains("powered off"), "{vmm2}");
        assert!(
            after.contains("guest got: hello-after-restore; disk: read-after-restore"),
            "console:\n{after}"
        );
        // One boot: the restored guest went on, it did not start again.
        assert_eq!(after.matches("guest-net-up").count(), 1, "{after}");
        assert_eq!(
            after.matches(qemu_tests::guest::INIT_MARKER).count(),
            1,
            "{after}"
        );
        assert!(after.len() > before.len(), "the restored guest printed on");
    });
}
