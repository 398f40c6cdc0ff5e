//! LXC services end to end: real daemon, real CLI, real liblxc containers. Needs root.

mod common;
use common::*;
use std::time::{Duration, Instant};

fn example() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello-lxc.toml")
}

#[test]
fn example_service_runs_and_reports_pid_and_cgroup_memory() {
    if !need_root("example_service_runs_and_reports_pid_and_cgroup_memory") {
        return;
    }
    let d = Daemon::start();
    let installed = d.json(&[
        "service",
        "install",
        example().to_str().unwrap(),
        "--start",
        "--json",
    ]);
    assert_eq!(installed["state"], "running");
    let st = d.status("hello");
    assert_eq!(st["state"], "running");
    let pid = st["init_pid"].as_i64().expect("init pid");
    assert!(is_alive(pid));
    let mem = st["memory"]["usage_bytes"]
        .as_u64()
        .expect("memory from the cgroup");
    assert!(mem > 0 && mem <= 32 << 20, "memory {mem}");
    assert_eq!(st["memory"]["limit_bytes"], 32u64 << 20);
    assert_eq!(st["interface"], "gv-hello");
    assert!(
        std::path::Path::new("/sys/class/net/gv-hello").exists(),
        "host veth end"
    );

    // Its output reaches the service log.
    let logged = d.wait_for(Duration::from_secs(5), || {
        let out = d.cli(&["service", "logs", "hello"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("hello from hello, gatevisor says hi")
            .then_some(())
    });
    assert!(logged.is_some(), "log never showed the greeting");

    // exec runs inside the container (its own PID namespace: init is PID 1).
    let out = d.cli(&[
        "service",
        "exec",
        "hello",
        "--",
        "sh",
        "-c",
        "echo $$; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));

    // resources.disk_mib = 16: the root filesystem is that big, and writes stop there.
    let out = d.cli(&[
        "service",
        "exec",
        "hello",
        "--",
        "sh",
        "-c",
        "df -k / | tail -1",
    ]);
    let df = String::from_utf8_lossy(&out.stdout).into_owned();
    let total_kib: u64 = df
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        (8_000..=16_384).contains(&total_kib),
        "root filesystem size: {df}"
    );
    let out = d.cli(&[
        "service",
        "exec",
        "hello",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/big bs=1M count=40 2>/dev/null; rc=$?; rm -f /big; exit $rc",
    ]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "a 40 MB write fits in a 16 MiB disk?"
    );
    // resources.vcpus = 1: one CPU allowed.
    let out = d.cli(&[
        "service",
        "exec",
        "hello",
        "--",
        "grep",
        "Cpus_allowed_list",
        "/proc/self/status",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().ends_with("\t0"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // No capabilities were granted: the bounding set is empty, and no_new_privs is set.
    let out = d.cli(&[
        "service",
        "exec",
        "hello",
        "--",
        "sh",
        "-c",
        "grep -E '^(CapBnd|NoNewPrivs)' /proc/1/status",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("CapBnd:\t0000000000000000"), "{text}");
    assert!(text.contains("NoNewPrivs:\t1"), "{text}");

    // list shows it; a stop is graceful (the trap answers SIGTERM) and keeps it stopped.
    let list = d.json(&["service", "list", "--json"]);
    assert_eq!(list["services"][0]["name"], "hello");
    let st = d.json(&["service", "stop", "hello", "--json"]);
    assert_eq!(st["state"], "stopped");
    assert_eq!(st["last_exit"]["code"], 0, "{st}");
    assert!(!is_alive(pid));
    let st = d.json(&["service", "start", "hello", "--json"]);
    assert_eq!(st["state"], "running");
    d.json(&["service", "remove", "hello", "--json"]);
    assert!(!std::path::Path::new("/sys/class/net/gv-hello").exists());
}

#[test]
fn restarts_killed_container_within_two_seconds() {
    if !need_root("restarts_killed_container_within_two_seconds") {
        return;
    }
    let d = Daemon::start();
    let m = d.manifest(
        "k.toml",
        &manifest_text("t-kill", "while :; do sleep 1; done", ""),
    );
    d.json(&[
        "service",
        "install",
        m.to_str().unwrap(),
        "--start",
        "--json",
    ]);
    let before = d.status("t-kill");
    let pid = before["init_pid"].as_i64().unwrap();
    assert_eq!(before["restarts"], 0);

    let t = Instant::now();
    kill9(pid);
    let after = d
        .wait_for(Duration::from_secs(2), || {
            let st = d.status("t-kill");
            (st["state"] == "running" && st["init_pid"].as_i64().is_some_and(|p| p != pid))
                .then_some(st)
        })
        .unwrap_or_else(|| panic!("not restarted within 2 s: {}", d.status("t-kill")));
    eprintln!("restarted in {:?}", t.elapsed());
    assert_eq!(after["restarts"], 1);
    assert_eq!(after["last_exit"]["signal"], 9);

    let out = d.cli(&["events", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"kind\":\"exited\"") && text.contains("\"kind\":\"restarted\""),
        "{text}"
    );
}

#[test]
fn crash_looping_service_backs_off_then_fails_with_reason() {
    if !need_root("crash_looping_service_backs_off_then_fails_with_reason") {
        return;
    }
    let d = Daemon::start();
    let restart = "[restart]\npolicy = \"on-failure\"\nmax_retries = 3\nbackoff_initial_ms = 100\nbackoff_max_ms = 400\nstable_after_s = 60\n";
    let m = d.manifest(
        "c.toml",
        &manifest_text("t-crash", "echo crashing; exit 3", restart),
    );
    let t = Instant::now();
    d.cli(&[
        "service",
        "install",
        m.to_str().unwrap(),
        "--start",
        "--json",
    ]);
    let st = d
        .wait_for(Duration::from_secs(15), || {
            let st = d.status("t-crash");
            (st["state"] == "failed").then_some(st)
        })
        .unwrap_or_else(|| panic!("never failed: {}", d.status("t-crash")));
    // Backoff 100 + 200 + 400 ms between the four runs.
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "no backoff: {:?}",
        t.elapsed()
    );
    assert_eq!(st["restarts"], 3);
    assert_eq!(st["last_exit"]["code"], 3);
    let reason = st["failure_reason"].as_str().unwrap();
    assert!(
        reason.contains("exited with code 3") && reason.contains("gave up after 3 restarts"),
        "{reason}"
    );
    let out = d.cli(&["events", "--json"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"kind\":\"failed\""));
    // A failed service can be started again by hand.
    let st = d.cli(&["service", "start", "t-crash", "--json"]);
    assert!(st.status.success() || st.status.code() == Some(1));
}

#[test]
fn daemon_kill9_and_restart_readopts_container_without_restarting_it() {
    if !need_root("daemon_kill9_and_restart_readopts_container_without_restarting_it") {
        return;
    }
    let mut d = Daemon::start();
    let m = d.manifest(
        "a.toml",
        &manifest_text("t-adopt", "while :; do echo tick; sleep 1; done", ""),
    );
    d.json(&[
        "service",
        "install",
        m.to_str().unwrap(),
        "--start",
        "--json",
    ]);
    let pid = d.status("t-adopt")["init_pid"].as_i64().unwrap();

    d.kill9();
    std::thread::sleep(Duration::from_millis(300));
    assert!(is_alive(pid), "the container died with the daemon");
    let down = d.cli(&["service", "list"]);
    assert_eq!(
        down.status.code(),
        Some(3),
        "daemon down has its own exit code"
    );
    assert!(String::from_utf8_lossy(&down.stderr).contains("not running"));

    d.spawn();
    let st = d.status("t-adopt");
    assert_eq!(st["state"], "running");
    assert_eq!(st["init_pid"].as_i64(), Some(pid), "re-adopted, same PID");
    assert_eq!(st["restarts"], 0);
    let out = d.cli(&["events", "--json"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"kind\":\"adopted\""));

    // The adopted container is watched: killing it now is noticed and restarted.
    kill9(pid);
    let st = d.wait_for(Duration::from_secs(3), || {
        let st = d.status("t-adopt");
        (st["state"] == "running" && st["init_pid"].as_i64() != Some(pid)).then_some(st)
    });
    assert!(
        st.is_some(),
        "adopted container's death was not noticed: {}",
        d.status("t-adopt")
    );

    // SIGTERM leaves services running by default.
    let pid = d.status("t-adopt")["init_pid"].as_i64().unwrap();
    assert!(d.term().success());
    assert!(is_alive(pid));
}

#[test]
fn freeze_and_thaw_change_container_state() {
    if !need_root("freeze_and_thaw_change_container_state") {
        return;
    }
    let d = Daemon::start();
    let m = d.manifest(
        "f.toml",
        &manifest_text("t-frz", "while :; do sleep 1; done", ""),
    );
    d.json(&[
        "service",
        "install",
        m.to_str().unwrap(),
        "--start",
        "--json",
    ]);
    d.json(&["service", "freeze", "t-frz", "--json"]);
    let rt = gatevisor_lxc::Runtime::new(
        &d.state_dir().join("lxc"),
        gatevisor_lxc::Cgroups::V1,
        gatevisor_lxc::MonitorCommand {
            program: "/bin/false".into(),
            args: vec![],
        },
    )
    .unwrap();
    assert_eq!(rt.state("t-frz").unwrap(), "FROZEN");
    d.json(&["service", "thaw", "t-frz", "--json"]);
    assert_eq!(rt.state("t-frz").unwrap(), "RUNNING");
}

#[test]
fn granted_capability_is_the_only_one_kept() {
    if !need_root("granted_capability_is_the_only_one_kept") {
        return;
    }
    let d = Daemon::start();
    let text = manifest_text("t-caps", "while :; do sleep 1; done", "").replace(
        "[resources]",
        "capabilities = [\"NET_BIND_SERVICE\"]\n[resources]",
    );
    d.install_started("caps.toml", &text);
    let out = d.cli(&[
        "service",
        "exec",
        "t-caps",
        "--",
        "grep",
        "CapBnd",
        "/proc/1/status",
    ]);
    // CAP_NET_BIND_SERVICE is bit 10.
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0000000000000400"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn events_follow_streams_new_events() {
    if !need_root("events_follow_streams_new_events") {
        return;
    }
    let d = Daemon::start();
    let mut follower = std::process::Command::new(BIN)
        .args(["events", "-f", "--json", "-n", "0"])
        .env("GATEVISOR_SOCKET", d.socket())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    d.install_started("ev.toml", &manifest_text("t-ev", "sleep 100", ""));
    let mut kinds = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(5)) {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        kinds.push(v["kind"].as_str().unwrap().to_string());
        if kinds.iter().any(|k| k == "started") {
            break;
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    assert_eq!(kinds, ["installed", "started"]);
}

#[test]
fn sigterm_with_stop_services_on_exit_stops_them() {
    if !need_root("sigterm_with_stop_services_on_exit_stops_them") {
        return;
    }
    let mut d = Daemon::start();
    std::fs::write(
        d.dir.path().join("none.toml"),
        "stop_services_on_exit = true\n",
    )
    .unwrap();
    d.kill9();
    d.spawn();
    let m = d.manifest(
        "s.toml",
        &manifest_text(
            "t-stop",
            "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done",
            "",
        ),
    );
    d.json(&[
        "service",
        "install",
        m.to_str().unwrap(),
        "--start",
        "--json",
    ]);
    let pid = d.status("t-stop")["init_pid"].as_i64().unwrap();
    assert!(d.term().success());
    assert!(
        !is_alive(pid),
        "service left running although stop_services_on_exit = true"
    );
    // Desired state is kept: the next daemon starts it again (on a worker: the daemon
    // answers meanwhile).
    d.spawn();
    let running = d.wait_for(Duration::from_secs(30), || {
        (d.status("t-stop")["state"] == "running").then_some(())
    });
    assert!(running.is_some(), "{}", d.status("t-stop"));
}

/// A container whose start fails half-way inside liblxc (here its host-side interface name
/// is taken) is reported failed; the start must not hang. liblxc reaps every child of the
/// process that starts a container when a start fails, so a monitor child that never ends
/// (its log pump once was one) would block that start, and the container's command socket,
/// forever.
#[test]
fn a_start_that_fails_inside_liblxc_is_reported_not_hung() {
    if !need_root("a_start_that_fails_inside_liblxc_is_reported_not_hung") {
        return;
    }
    // The interface the service's veth would take, held by someone else.
    let link = "gv-lxcclash";
    let _ = std::process::Command::new("ip")
        .args(["link", "del", link])
        .output();
    let added = std::process::Command::new("ip")
        .args([
            "link",
            "add",
            link,
            "type",
            "veth",
            "peer",
            "name",
            "gv-lxcclash-p",
        ])
        .status()
        .unwrap();
    assert!(added.success());
    struct DelLink(&'static str);
    impl Drop for DelLink {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", self.0])
                .output();
        }
    }
    let _del = DelLink(link);
    let d = Daemon::start_with_args(&["--no-network"]);
    let m = d.manifest(
        "clash.toml",
        &manifest_text("lxcclash", "while :; do sleep 1; done", ""),
    );
    let start = Instant::now();
    let call = call_async(
        &d.socket(),
        gatevisor::api::Request::Install {
            manifest: m,
            start: true,
            runtime: None,
        },
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    while !call.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the start still hangs after 90 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = call.join().unwrap();
    assert!(
        r.is_err(),
        "a start that cannot create its interface: {r:?}"
    );
    eprintln!("refused after {:?}: {r:?}", start.elapsed());
    // Nothing of it is left running: no monitor waits on in liblxc.
    assert!(
        d.wait_for(Duration::from_secs(10), || {
            let out = std::process::Command::new("pgrep")
                .args(["-f", &format!("__lxc-monitor.*{}", d.state_dir().display())])
                .output()
                .unwrap();
            out.stdout.is_empty().then_some(())
        })
        .is_some(),
        "a monitor of this daemon is left running"
    );
}
