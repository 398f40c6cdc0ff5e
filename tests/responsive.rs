//! The daemon keeps answering while a huge package installs and while many clients hold idle
//! connections: the install runs on a worker, each connection on its own thread with a
//! deadline for its request. Needs root (the daemon's state and the package's rootfs).

mod common;
use common::*;
use gatevisor::api::Request;
use gatevisor::client::Client;
use gatevisor_images::keys::{SecretKey, TrustStore};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99).div_ceil(100) - 1]
}

#[test]
fn list_answers_within_100_ms_during_a_200000_file_install_and_1000_idle_clients() {
    if !need_root("list_answers_within_100_ms_during_a_200000_file_install_and_1000_idle_clients") {
        return;
    }
    let d = Daemon::start_with_keys();
    let key = SecretKey::generate().unwrap();
    let public = key.save(&d.dir.path().join("acme.key"), "acme").unwrap();
    TrustStore::new(&d.dir.path().join("keys"))
        .trust(&public)
        .unwrap();
    let pkg = big_package("t-big", 200_000, &key, &d.dir.path().join("big.gvpkg"));

    // 1,000 clients that connect and say nothing.
    let idle: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(d.socket()).unwrap())
        .collect();

    let client = Client::new(&d.socket());
    let install = {
        let socket = d.socket();
        let pkg = pkg.clone();
        std::thread::spawn(move || {
            Client::new(&socket).call(&Request::InstallPackage {
                package: pkg,
                start: false,
                runtime: None,
            })
        })
    };
    // Wait until the install is under way (its staging directory exists).
    let tmp = d.state_dir().join("images/tmp");
    let started = d.wait_for(Duration::from_secs(30), || {
        (std::fs::read_dir(&tmp).ok()?.count() > 0).then_some(())
    });
    assert!(started.is_some(), "the install did not start");
    let mut times = Vec::new();
    let mut during = 0;
    for _ in 0..100 {
        let t = Instant::now();
        let reply = client.call(&Request::List).expect("list answers");
        times.push(t.elapsed());
        assert!(reply["services"].is_array());
        if !install.is_finished() {
            during += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let worst = p99(times.clone());
    eprintln!(
        "list p99 {worst:?} over {} requests, {during} while the install ran",
        times.len()
    );
    assert!(
        during >= 50,
        "the install ended too soon to prove anything ({during})"
    );
    assert!(worst < Duration::from_millis(100), "list p99 {worst:?}");
    let res = install.join().unwrap();
    assert!(res.is_ok(), "{res:?}");
    assert_eq!(d.status("t-big")["state"], "installed");
    assert_eq!(
        std::fs::read_dir(d.state_dir().join("services/t-big/rootfs/d199"))
            .unwrap()
            .count(),
        1000
    );
    drop(idle);
}

/// A service folder for `t-upd` at `version` whose health check is `health`.
fn update_folder(d: &Daemon, version: &str, health: &str) -> std::path::PathBuf {
    d.looping_service("t-upd", version, &format!("[health]\n{health}"))
}

#[test]
fn list_answers_and_the_watchdog_is_fed_during_a_stop_grace_an_update_check_and_an_install() {
    let test =
        "list_answers_and_the_watchdog_is_fed_during_a_stop_grace_an_update_check_and_an_install";
    if !need_root(test) {
        return;
    }
    use std::os::unix::net::UnixDatagram;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    // systemd's side of the notify protocol, with a 2 s watchdog: the daemon must ping at
    // least every second, whatever it is doing.
    let notify_dir = tempfile::tempdir().unwrap();
    let notify = notify_dir.path().join("notify.sock");
    let sd = UnixDatagram::bind(&notify).unwrap();
    sd.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // No switch: this test needs none, and two private userspace switches cannot run on one
    // host at once (the second cannot open the datapath's tap `ovs-netdev`).
    let d = Daemon::start_with_keys_args_env(
        &["--no-network"],
        &[
            ("NOTIFY_SOCKET", notify.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    );
    let pings = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let done = Arc::new(AtomicBool::new(false));
    let listener = {
        let (pings, done) = (pings.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !done.load(Ordering::Relaxed) {
                if let Ok(n) = sd.recv(&mut buf) {
                    if &buf[..n] == b"WATCHDOG=1" {
                        pings.lock().unwrap().push(Instant::now());
                    }
                }
            }
        })
    };

    // Keys for the packages.
    let key = SecretKey::generate().unwrap();
    let key_file = d.dir.path().join("acme.key");
    let public = key.save(&key_file, "acme").unwrap();
    TrustStore::new(&d.dir.path().join("keys"))
        .trust(&public)
        .unwrap();

    // 1. A service that ignores the polite stop: its stop takes the whole 30 s grace.
    d.install_started(
        "stub.toml",
        r#"name = "t-stub"
version = "1.0.0"
runtime = "lxc"
image = "builtin:busybox"
command = ["/bin/sh", "-c", "trap '' TERM; while :; do sleep 1; done"]
stop_timeout_s = 30
[resources]
memory_mib = 32
"#,
    );
    // 2. A packaged service whose update's health check fails only after its 60 s deadline.
    let v1 = d.dir.path().join("upd-1.gvpkg");
    gatevisor::package::build(
        &update_folder(&d, "1.0.0", "exec = [\"true\"]\ndeadline_s = 10"),
        &v1,
        &key_file,
    )
    .unwrap();
    let v2 = d.dir.path().join("upd-2.gvpkg");
    gatevisor::package::build(
        &update_folder(&d, "2.0.0", "exec = [\"false\"]\ndeadline_s = 60"),
        &v2,
        &key_file,
    )
    .unwrap();
    d.install_package_started(&v1);
    // 3. A large package.
    let big = big_package("t-big", 100_000, &key, &d.dir.path().join("big.gvpkg"));

    let call = |req: Request| call_async(&d.socket(), req);
    let t0 = Instant::now();
    let stop = call(Request::Stop {
        name: "t-stub".into(),
    });
    let update = call(Request::Update {
        name: "t-upd".into(),
        package: v2.clone(),
    });
    let install = call(Request::InstallPackage {
        package: big.clone(),
        start: false,
        runtime: None,
    });
    let client = Client::new(&d.socket());
    let mut times = Vec::new();
    let (mut during_stop, mut during_update, mut during_install) = (0, 0, 0);
    while t0.elapsed() < Duration::from_secs(25) {
        let t = Instant::now();
        let reply = client.call(&Request::List).expect("list answers");
        times.push(t.elapsed());
        assert!(reply["services"].is_array());
        during_stop += usize::from(!stop.is_finished());
        during_update += usize::from(!update.is_finished());
        during_install += usize::from(!install.is_finished());
        std::thread::sleep(Duration::from_millis(40));
    }
    let worst = p99(times.clone());
    eprintln!(
        "list p99 {worst:?} over {} requests: {during_stop} during the stop, {during_update} during the update, {during_install} during the install",
        times.len()
    );
    assert!(
        during_stop >= 100 && during_update >= 100,
        "the stop or the update ended too soon"
    );
    assert!(worst < Duration::from_millis(100), "list p99 {worst:?}");

    let st = stop.join().unwrap().expect("the stop is answered");
    assert_eq!(st["state"], "stopped", "{st}");
    assert!(
        t0.elapsed() >= Duration::from_secs(25),
        "it took its grace period"
    );
    let e = update
        .join()
        .unwrap()
        .expect_err("the update fails its health check");
    assert!(e.to_string().contains("rolled back to 1.0.0"), "{e}");
    assert!(install.join().unwrap().is_ok());
    assert_eq!(d.status("t-upd")["package_version"], "1.0.0");
    assert_eq!(d.status("t-upd")["state"], "running");

    done.store(true, Ordering::Relaxed);
    listener.join().unwrap();
    let pings = pings.lock().unwrap().clone();
    let gaps: Vec<Duration> = pings
        .windows(2)
        .filter(|w| w[0] >= t0)
        .map(|w| w[1] - w[0])
        .collect();
    let longest = gaps.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{} watchdog pings since t0, longest gap {longest:?}",
        gaps.len()
    );
    assert!(gaps.len() >= 50, "pings all along the 60 s: {}", gaps.len());
    // systemd kills the daemon after 2 s without a ping.
    assert!(longest < Duration::from_secs(2), "longest gap {longest:?}");
}
