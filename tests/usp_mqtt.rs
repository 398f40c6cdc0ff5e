//! The embedded USP agent driven through a real `mosquitto` by a Controller test peer written
//! with rusp-lib and rumqttc: subscriptions, Get/GetInstances over the live state, InstallDU of
//! a signed package served over HTTP, SetRequestedState, an unhealthy Update rolled back,
//! Uninstall, a badly signed package (fault 7219), and Records that must be refused. Needs root
//! (liblxc) and mosquitto (scripts/setup.sh installs it).

mod common;
#[path = "common/home.rs"]
mod home;
#[path = "../flowbridge/tests/common/lab.rs"]
mod lab;
#[path = "common/traffic.rs"]
mod traffic;
#[path = "common/usp_peer.rs"]
mod usp_peer;
use common::*;
use rusp_lib::usp_builder as b;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use usp_peer::*;

fn package(d: &Daemon, key: &Path, name: &str, version: &str, health: &str, out: &Path) -> PathBuf {
    let dir = d.dir.path().join(format!("src-{name}-{version}"));
    std::fs::create_dir_all(dir.join("files/srv")).unwrap();
    std::fs::write(dir.join("files/srv/version"), version).unwrap();
    std::fs::write(
        dir.join("service.toml"),
        format!(
            "name = \"{name}\"\nversion = \"{version}\"\nruntime = \"lxc\"\nimage = \"package\"\n\
             command = [\"/bin/sh\", \"-c\", \"while :; do sleep 1; done\"]\nstop_timeout_s = 1\n\
             [resources]\nmemory_mib = 32\n{health}\n"
        ),
    )
    .unwrap();
    let built = d.build_package(&dir, key, &format!("{name}-{version}.gvpkg"));
    let dest = out.join(built.file_name().unwrap());
    std::fs::copy(&built, &dest).unwrap();
    dest
}

fn key(d: &Daemon, name: &str, trust: bool) -> PathBuf {
    let key = d.dir.path().join(format!("{name}.key"));
    assert!(d
        .cli(&["key", "gen", "--out", key.to_str().unwrap(), "--name", name])
        .status
        .success());
    if trust {
        let keys = d.dir.path().join("keys");
        assert!(d
            .cli(&[
                "key",
                "trust",
                key.with_extension("pub").to_str().unwrap(),
                "--keys-dir",
                keys.to_str().unwrap()
            ])
            .status
            .success());
    }
    key
}

/// A `DUStateChange!` for a failed `performed` operation that left the DU in `state`, its
/// fault saying `says`.
fn assert_failed(ev: &Value, performed: &str, state: &str, says: &str) {
    assert_eq!(ev["OperationPerformed"], performed, "{ev}");
    assert_eq!(ev["CurrentState"], state, "{ev}");
    assert_ne!(ev["Fault.FaultCode"], "0", "{ev}");
    let fault = ev["Fault.FaultString"].as_str().unwrap_or_default();
    assert!(fault.contains(says), "{ev}");
}

/// No operation is in flight and no DU exists.
fn assert_nothing_pending_or_installed(c: &mut Controller) {
    let p = get(
        c,
        &[
            "Device.LocalAgent.RequestNumberOfEntries",
            &format!("{SM}DeploymentUnitNumberOfEntries"),
        ],
    );
    assert_eq!(p["Device.LocalAgent.RequestNumberOfEntries"], "0");
    assert_eq!(p[&format!("{SM}DeploymentUnitNumberOfEntries")], "0");
}

/// Is mosquitto there (else the test is skipped, saying so)?
fn has_mosquitto() -> bool {
    let there = on_path("mosquitto");
    if !there {
        eprintln!("skipped: mosquitto is not installed (scripts/setup.sh installs it)");
    }
    there
}

#[test]
fn launcher_installs_starts_updates_and_uninstalls_a_service_over_usp_mqtt() {
    if !need_root("launcher_installs_starts_updates_and_uninstalls_a_service_over_usp_mqtt")
        || !has_mosquitto()
    {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (_broker, port) = mosquitto(work.path());
    let www = work.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let (_http, http_port) = http_server(&www);
    let d = Daemon::start_with_config(&format!(
        "[usp]\nendpoint_id = \"{AGENT}\"\nbroker = \"127.0.0.1:{port}\"\n\
         [[usp.controllers]]\nendpoint_id = \"{LAUNCHER}\"\ntopic = \"{LAUNCHER_TOPIC}\"\nrole = \"launcher\"\n\
         [[usp.controllers]]\nendpoint_id = \"self::observer\"\ntopic = \"usp/controller/observer\"\n"
    ));
    let operator = key(&d, "operator", true);
    let stranger = key(&d, "stranger", false);
    let v1 = package(
        &d,
        &operator,
        "remote-svc",
        "1.0.0",
        "[health]\nexec = [\"test\", \"-f\", \"/srv/version\"]\ndeadline_s = 5",
        &www,
    );
    let v2 = package(
        &d,
        &operator,
        "remote-svc",
        "2.0.0",
        "[health]\nexec = [\"/bin/sh\", \"-c\", \"exit 3\"]\ndeadline_s = 2",
        &www,
    );
    let forged = {
        let dir = work.path().join("forged");
        std::fs::create_dir_all(&dir).unwrap();
        let p = package(&d, &stranger, "forged-svc", "9.9.9", "", &dir);
        let dest = www.join("forged.gvpkg");
        std::fs::rename(p, &dest).unwrap();
        dest
    };
    let url = |p: &Path| {
        format!(
            "http://127.0.0.1:{http_port}/{}",
            p.file_name().unwrap().to_str().unwrap()
        )
    };

    let mut c = Controller::connect(port, LAUNCHER, LAUNCHER_TOPIC);
    // The agent connects on its own; its first answer proves it is there.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ee = loop {
        let id = c.send(
            b::GetBuilder::new()
                .with_params(vec![format!("{SM}ExecEnv.")])
                .build()
                .unwrap(),
        );
        match c.rx.recv_timeout(Duration::from_secs(2)) {
            Ok(v) if v["msg"]["Header"]["msg_id"] == id => break params(&v["msg"]["Body"]),
            _ => assert!(
                Instant::now() < deadline,
                "the agent never answered; log:\n{}",
                d.log()
            ),
        }
    };
    assert_eq!(
        ee.get(&format!("{SM}ExecEnv.1.Name")).map(String::as_str),
        Some("lxc"),
        "{ee:#?}"
    );
    assert_eq!(
        ee.get(&format!("{SM}ExecEnv.1.Status")).map(String::as_str),
        Some("Up")
    );
    for k in ["AvailableMemory", "AvailableDiskSpace"] {
        let v = &ee[&format!("{SM}ExecEnv.1.{k}")];
        assert!(v.parse::<u64>().is_ok_and(|kib| kib > 0), "{k} = {v:?}");
    }

    subscribe(&mut c, "du", "Event", &format!("{SM}DUStateChange!"));
    subscribe(&mut c, "oc", "OperationComplete", SM);

    // The supported data model: the commands and their kind.
    let id = c.send(
        b::GetSupportedDMBuilder::new()
            .with_obj_paths(vec![SM.into()])
            .with_return_commands(true)
            .with_return_events(true)
            .with_return_params(true)
            .build()
            .unwrap(),
    );
    let dm = c.reply(&id).to_string();
    for needle in [
        "Device.SoftwareModules.DeploymentUnit.{i}.",
        "InstallDU()",
        "SetRequestedState()",
        "DUStateChange!",
        "CMD_ASYNC",
    ] {
        assert!(dm.contains(needle), "{needle} missing: {dm}");
    }

    // InstallDU over HTTP.
    let r = operate(
        &mut c,
        &format!("{SM}InstallDU()"),
        "k-install",
        &[
            ("URL", &url(&v1)),
            ("UUID", "6f1c2a9e-0000-4000-8000-000000000001"),
            // The unit goes to the environment asked for (its runtime).
            ("ExecutionEnvRef", &format!("{SM}ExecEnv.1")),
        ],
    );
    assert!(
        r["req_obj_path"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Device.LocalAgent.Request."),
        "{r}"
    );
    let ev = du_state_change(&c);
    assert_eq!(ev["OperationPerformed"], "Install", "{ev}");
    assert_eq!(ev["CurrentState"], "Installed", "{ev}");
    assert_eq!(ev["Resolved"], "true");
    assert_eq!(ev["UUID"], "6f1c2a9e-0000-4000-8000-000000000001");
    assert_eq!(ev["Version"], "1.0.0");
    assert_eq!(ev["Fault.FaultCode"], "0");
    assert_eq!(ev["Fault.FaultString"], "");
    let du = ev["DeploymentUnitRef"].as_str().unwrap().to_string();
    let eu = ev["ExecutionUnitRefList"].as_str().unwrap().to_string();
    assert!(du.starts_with(&format!("{SM}DeploymentUnit.")), "{ev}");
    assert!(eu.starts_with(&format!("{SM}ExecutionUnit.")), "{ev}");
    assert!(ev["StartTime"].as_str().unwrap() <= ev["CompleteTime"].as_str().unwrap());
    let oc = operation_complete(&c, "InstallDU()", "k-install");
    assert_eq!(oc["obj_path"], SM);
    assert!(oc.to_string().contains("req_output_args"), "{oc}");

    let p = get(&mut c, &[&format!("{du}."), &format!("{eu}.")]);
    assert_eq!(p[&format!("{du}.Name")], "remote-svc");
    assert_eq!(
        p[&format!("{du}.Vendor")],
        "operator",
        "the key that signed it"
    );
    assert_eq!(p[&format!("{du}.URL")], url(&v1));
    assert_eq!(p[&format!("{du}.Status")], "Installed");
    assert_eq!(p[&format!("{eu}.Status")], "Idle");
    assert_eq!(
        p[&format!("{du}.ExecutionEnvRef")],
        format!("{SM}ExecEnv.1")
    );

    // Search expressions find the service by name; one that finds nothing is empty.
    let p = get(
        &mut c,
        &[
            &format!("{SM}DeploymentUnit.[Name==\"remote-svc\"&&Status==\"Installed\"].Version"),
            &format!("{SM}DeploymentUnit.[Name==\"no-such-svc\"]."),
        ],
    );
    assert_eq!(p.len(), 1, "{p:#?}");
    assert_eq!(p[&format!("{du}.Version")], "1.0.0");

    // Start it, named by a search expression.
    let r = operate(
        &mut c,
        &format!("{SM}ExecutionUnit.[Name==\"remote-svc\"].SetRequestedState()"),
        "k-start",
        &[("RequestedState", "Active")],
    );
    assert!(r.to_string().contains("req_output_args"), "{r}");
    assert_eq!(
        r["executed_command"],
        format!("{eu}.SetRequestedState()"),
        "{r}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = get(
            &mut c,
            &[&format!("{eu}.Status"), &format!("{eu}.MemoryInUse")],
        );
        if p[&format!("{eu}.Status")] == "Active" {
            assert!(
                p[&format!("{eu}.MemoryInUse")].parse::<u64>().unwrap() > 0,
                "{p:#?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never Active: {p:#?}");
        std::thread::sleep(Duration::from_millis(300));
    }

    // An unhealthy update is rolled back; the DU keeps version 1.0.0.
    let r = operate(
        &mut c,
        &format!("{du}.Update()"),
        "k-update",
        &[("URL", &url(&v2))],
    );
    assert!(r["req_obj_path"].is_string(), "{r}");
    let ev = du_state_change(&c);
    assert_failed(&ev, "Update", "Installed", "rolled back");
    assert_eq!(ev["Version"], "1.0.0", "{ev}");
    let oc = operation_complete(&c, "Update()", "k-update");
    assert!(oc.to_string().contains("cmd_failure"), "{oc}");

    // A package signed by an untrusted key: fault 7219, nothing installed.
    operate(
        &mut c,
        &format!("{SM}InstallDU()"),
        "k-forged",
        &[("URL", &url(&forged))],
    );
    let ev = du_state_change(&c);
    assert_eq!(ev["Fault.FaultCode"], "7219", "{ev}");
    assert_eq!(ev["CurrentState"], "Failed");
    assert_eq!(ev["DeploymentUnitRef"], "");
    operation_complete(&c, "InstallDU()", "k-forged");
    let p = get(&mut c, &[&format!("{SM}DeploymentUnitNumberOfEntries")]);
    assert_eq!(p[&format!("{SM}DeploymentUnitNumberOfEntries")], "1");

    // Records that are not for this agent, or from a controller it does not know, get nothing.
    let body = b::GetBuilder::new()
        .with_params(vec![SM.into()])
        .build()
        .unwrap();
    c.send_as(LAUNCHER, "os::someone-else", body.clone());
    c.send_as("self::intruder", AGENT, body);
    let id = c.send(
        b::OperateBuilder::new(format!("{SM}InstallDU()"))
            .with_send_resp(true)
            .with_input_args(vec![("URL".into(), url(&v1))])
            .build()
            .unwrap(),
    );
    // Only the answer to the launcher's own (duplicate) install arrives: the two refused
    // records produced nothing.
    let first =
        c.rx.recv_timeout(Duration::from_secs(10))
            .expect("an answer");
    assert_eq!(first["msg"]["Header"]["msg_id"], id, "{first}");
    let ev = du_state_change(&c);
    assert_eq!(ev["Fault.FaultCode"], "7226", "{ev}");

    // An observer may read but not operate.
    let mut o = Controller::connect(port, "self::observer", "usp/controller/observer");
    let id = o.send(
        b::OperateBuilder::new(format!("{eu}.Restart()"))
            .with_send_resp(true)
            .build()
            .unwrap(),
    );
    let r = o.reply(&id);
    assert_eq!(r["Error"]["err_code"], 7006, "{r}");

    // Uninstall.
    let r = operate(&mut c, &format!("{du}.Uninstall()"), "k-remove", &[]);
    assert!(r["req_obj_path"].is_string(), "{r}");
    let ev = du_state_change(&c);
    assert_eq!(ev["OperationPerformed"], "Uninstall");
    assert_eq!(ev["CurrentState"], "Uninstalled");
    assert_eq!(ev["Fault.FaultCode"], "0");
    operation_complete(&c, "Uninstall()", "k-remove");
    assert!(d.cli(&["service", "status", "remote-svc"]).status.code() != Some(0));
    let _ = c.nothing_for(0);
}

#[test]
fn install_interrupted_by_a_daemon_crash_is_reported_failed_after_the_restart() {
    if !need_root("install_interrupted_by_a_daemon_crash_is_reported_failed_after_the_restart")
        || !has_mosquitto()
    {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (_broker, port) = mosquitto(work.path());
    // A package server that accepts and never answers: the install stays in flight.
    let stall = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stall_port = stall.local_addr().unwrap().port();
    let _held = std::thread::spawn(move || {
        let conns: Vec<_> = stall.incoming().take(4).collect();
        std::thread::sleep(Duration::from_secs(300));
        drop(conns);
    });
    let mut d = Daemon::start_with_config(&agent_config(port));
    let mut c = Controller::connect(port, LAUNCHER, LAUNCHER_TOPIC);
    wait_for_agent(&mut c);
    subscribe(&mut c, "du", "Event", &format!("{SM}DUStateChange!"));
    subscribe(&mut c, "oc", "OperationComplete", SM);
    let r = operate(
        &mut c,
        &format!("{SM}InstallDU()"),
        "k-crash",
        &[("URL", &format!("http://127.0.0.1:{stall_port}/svc.gvpkg"))],
    );
    assert!(r["req_obj_path"].is_string(), "{r}");
    // The OperateResp left after the journal was on disk: the daemon dies now.
    d.kill9();
    d.spawn();
    let ev = du_state_change(&c);
    assert_failed(&ev, "Install", "Failed", "restarted");
    let oc = operation_complete(&c, "InstallDU()", "k-crash");
    assert!(oc.to_string().contains("cmd_failure"), "{oc}");
    assert_nothing_pending_or_installed(&mut c);
}

#[test]
fn agent_speaks_mutual_tls_and_refuses_a_certificate_that_does_not_name_it() {
    if !on_path("mosquitto") || !on_path("openssl") {
        eprintln!("skipped: mosquitto and openssl are needed (scripts/setup.sh installs them)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let pki = work.path();
    test_ca(pki);
    test_cert(pki, "broker", "IP:127.0.0.1,DNS:localhost");
    test_cert(pki, "device", &format!("URI:urn:bbf:usp:id:{AGENT}"));
    test_cert(pki, "stranger", "URI:urn:bbf:usp:id:os::someone-else");
    test_cert(pki, "launcher", &format!("URI:urn:bbf:usp:id:{LAUNCHER}"));
    let (_broker, port) = mosquitto_tls(pki);
    let tls = |name: &str| {
        format!(
            "[usp.tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/{name}.pem\"\nkey = \"{0}/{name}.key\"\n",
            pki.display()
        )
    };

    // A device certificate for another endpoint: the agent refuses to start with it.
    let d = Daemon::start_with_config(&format!("{}{}", agent_config(port), tls("stranger")));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log().contains("does not name endpoint") {
        assert!(Instant::now() < deadline, "no refusal; log:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(d);

    // The right certificate: the launcher, over TLS too, gets its answers.
    let d = Daemon::start_with_config(&format!(
        "package_ca = \"{}/ca.pem\"\n{}{}",
        pki.display(),
        agent_config(port),
        tls("device")
    ));
    let mut c = Controller::connect_with(
        port,
        LAUNCHER,
        LAUNCHER_TOPIC,
        Some((
            &pki.join("ca.pem"),
            &pki.join("launcher.pem"),
            &pki.join("launcher.key"),
        )),
    );
    wait_for_agent(&mut c);
    let p = get(&mut c, &[&format!("{SM}ExecEnv.1.Name")]);
    assert_eq!(p[&format!("{SM}ExecEnv.1.Name")], "lxc");

    // Packages over https, checked against package_ca: this one downloads, then fails its
    // signature check (its publisher is not trusted); a missing one fails the download.
    subscribe(&mut c, "du", "Event", &format!("{SM}DUStateChange!"));
    let stranger = key(&d, "stranger-pub", false);
    let www = pki.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let pkg = package(&d, &stranger, "https-svc", "1.0.0", "", &www);
    let https_port = free_port();
    let _https = Killed(
        Command::new("openssl")
            .args([
                "s_server",
                "-quiet",
                "-accept",
                &https_port.to_string(),
                "-WWW",
            ])
            .arg("-cert")
            .arg(pki.join("broker.pem"))
            .arg("-key")
            .arg(pki.join("broker.key"))
            .current_dir(&www)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(https_port, "openssl s_server");
    let url = |f: &str| format!("https://127.0.0.1:{https_port}/{f}");
    let name = pkg.file_name().unwrap().to_str().unwrap().to_string();
    operate(
        &mut c,
        &format!("{SM}InstallDU()"),
        "h1",
        &[("URL", &url(&name))],
    );
    let ev = du_state_change(&c);
    assert_eq!(
        ev["Fault.FaultCode"], "7219",
        "downloaded, then refused: {ev}"
    );
    operate(
        &mut c,
        &format!("{SM}InstallDU()"),
        "h2",
        &[("URL", &url("missing.gvpkg"))],
    );
    let ev = du_state_change(&c);
    assert_ne!(ev["Fault.FaultCode"], "0", "{ev}");
    assert_ne!(ev["Fault.FaultCode"], "7219", "{ev}");
}

#[test]
fn unanswered_notifications_are_sent_again_until_the_controller_answers() {
    if !has_mosquitto() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (_broker, port) = mosquitto(work.path());
    let _d = Daemon::start_with_config(&agent_config(port));
    let mut c = Controller::connect(port, LAUNCHER, LAUNCHER_TOPIC);
    wait_for_agent(&mut c);
    subscribe_with(
        &mut c,
        "retry",
        "Event",
        &format!("{SM}DUStateChange!"),
        true,
    );
    // An install that fails at once still changes a DU's state (to Failed).
    operate(
        &mut c,
        &format!("{SM}InstallDU()"),
        "k",
        &[("URL", "file:///nonexistent/pkg.gvpkg")],
    );
    let is_retry = |v: &Value| v["msg"]["Body"]["Request"]["Notify"]["subscription_id"] == "retry";
    let first = c.wait(30, "the notification", is_retry);
    assert_eq!(
        first["msg"]["Body"]["Request"]["Notify"]["send_resp"], true,
        "{first}"
    );
    let again = c.wait(10, "the notification sent again", is_retry);
    assert_eq!(
        again["msg"]["Body"]["Request"]["Notify"]["event"],
        first["msg"]["Body"]["Request"]["Notify"]["event"]
    );
    c.send(b::NotifyRespBuilder::new("retry".into()).build().unwrap());
    // The next retry was due 10 s after the first: nothing comes once answered.
    let deadline = Instant::now() + Duration::from_secs(13);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if let Ok(v) = c.rx.recv_timeout(left) {
            assert!(!is_retry(&v), "sent again after the NotifyResp: {v}");
        }
    }
}

/// A loopback package server for one request: it reads the request, then `serve` answers on
/// the connection. Returns its port.
fn one_request_server(serve: impl FnOnce(std::net::TcpStream) + Send + 'static) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut req = [0u8; 1024];
        let _ = std::io::Read::read(&mut conn, &mut req);
        serve(conn);
    });
    port
}

/// The daemon's USP state file (`usp.json`) as JSON.
fn usp_state(d: &Daemon) -> Value {
    serde_json::from_slice(&std::fs::read(d.state_dir().join("usp.json")).unwrap()).unwrap()
}

#[test]
fn notifications_outlive_a_broker_outage_and_a_daemon_restart() {
    if !has_mosquitto() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (broker, port) = mosquitto(work.path());
    // A package server that holds the request until told, then answers 404: the install
    // ends while the broker is away.
    let (accepted_tx, accepted) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let held_port = one_request_server(move |mut conn| {
        accepted_tx.send(()).unwrap();
        let _ = released.recv();
        let _ = std::io::Write::write_all(
            &mut conn,
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        );
    });
    let mut d = Daemon::start_with_config(&agent_config(port));
    let mut c = Controller::connect(port, LAUNCHER, LAUNCHER_TOPIC);
    wait_for_agent(&mut c);
    subscribe_with(&mut c, "du", "Event", &format!("{SM}DUStateChange!"), true);
    let r = operate(
        &mut c,
        &format!("{SM}InstallDU()"),
        "k-outage",
        &[("URL", &format!("http://127.0.0.1:{held_port}/svc.gvpkg"))],
    );
    assert!(r["req_obj_path"].is_string(), "{r}");
    accepted
        .recv_timeout(Duration::from_secs(30))
        .expect("the agent fetches");

    // The broker goes away; the install fails meanwhile; then the daemon dies too.
    drop(broker);
    release.send(()).unwrap();
    let waiting = d
        .wait_for(Duration::from_secs(30), || {
            let st = usp_state(&d);
            let done = st["requests"].as_array().is_some_and(|r| r.is_empty());
            let unacked = st["unacked"].as_array().cloned().unwrap_or_default();
            (done && !unacked.is_empty()).then_some(unacked)
        })
        .expect("the finished install's notification is kept on disk, unanswered");
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert_eq!(waiting[0]["subscription_id"], "du");
    d.kill9();

    // Broker and daemon come back: the controller hears how the install ended.
    let _broker = mosquitto_on(work.path(), port);
    d.spawn();
    let is_du = |v: &Value| v["msg"]["Body"]["Request"]["Notify"]["subscription_id"] == "du";
    let n = c.wait(60, "the DUStateChange! kept across the restart", is_du);
    let ev = n["msg"]["Body"]["Request"]["Notify"]["event"]["params"].clone();
    assert_eq!(ev["OperationPerformed"], "Install", "{n}");
    assert_eq!(ev["CurrentState"], "Failed", "{n}");
    assert!(
        ev["Fault.FaultString"]
            .as_str()
            .unwrap_or("")
            .contains("404"),
        "{n}"
    );
    c.send(b::NotifyRespBuilder::new("du".into()).build().unwrap());
    d.wait_for(Duration::from_secs(30), || {
        usp_state(&d)["unacked"]
            .as_array()
            .is_some_and(|u| u.is_empty())
            .then_some(())
    })
    .expect("the answered notification leaves the disk");
}

#[test]
fn remote_install_that_outruns_its_deadline_fails_and_installs_nothing() {
    if !has_mosquitto() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (_broker, port) = mosquitto(work.path());
    // A server that promises a megabyte and sends a byte every half second: never idle long
    // enough to look stalled, far too slow to finish.
    let slow_port = one_request_server(|mut conn| {
        let _ = std::io::Write::write_all(
            &mut conn,
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n",
        );
        while std::io::Write::write_all(&mut conn, b"x").is_ok() {
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let config = format!("usp_operation_deadline_s = 3\n{}", agent_config(port));
    let d = Daemon::start_with_config(&config);
    let mut c = Controller::connect(port, LAUNCHER, LAUNCHER_TOPIC);
    wait_for_agent(&mut c);
    subscribe(&mut c, "du", "Event", &format!("{SM}DUStateChange!"));
    subscribe(&mut c, "oc", "OperationComplete", SM);
    operate(
        &mut c,
        &format!("{SM}InstallDU()"),
        "k-slow",
        &[("URL", &format!("http://127.0.0.1:{slow_port}/svc.gvpkg"))],
    );
    let ev = du_state_change(&c);
    assert_failed(&ev, "Install", "Failed", "deadline of 3 s");
    operation_complete(&c, "InstallDU()", "k-slow");
    assert_nothing_pending_or_installed(&mut c);
    let leftovers: Vec<_> = std::fs::read_dir(d.state_dir().join("usp-downloads"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_daemon_configured_with_a_deadline_beyond_24_hours_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gatevisor.toml");
    std::fs::write(&config, "usp_operation_deadline_s = 90000\n").unwrap();
    let out = Command::new(BIN)
        .arg("daemon")
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--socket")
        .arg(dir.path().join("sock"))
        .arg("--config")
        .arg(&config)
        .arg("--no-network")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("usp_operation_deadline_s must be 1 to 86400"),
        "{err}"
    );
}

#[test]
fn remotely_installed_service_fetched_from_the_wan_steers_lan_traffic() {
    if !need_ovs("remotely_installed_service_fetched_from_the_wan_steers_lan_traffic")
        || !on_path("mosquitto")
    {
        eprintln!("skipped: needs Open vSwitch and mosquitto");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (_broker, port) = mosquitto(work.path());
    let d = Daemon::start_with_config(&agent_config(port));
    let pkg = home::dns_filter_package(&d, "wan-dnsf");
    let home = home::Home::new(&d, "u", "10.98.0");
    // The operator's package server lives on the WAN, reached over the gateway's uplink (a
    // veth between this host and the WAN namespace).
    let up = format!("gvup{}", std::process::id() % 10000);
    let sh = |args: &[&str]| lab::sh(args);
    sh(&[
        "ip",
        "link",
        "add",
        &up,
        "type",
        "veth",
        "peer",
        "name",
        "eth1",
        "netns",
        &home.wan.ns,
    ]);
    sh(&["ip", "addr", "add", "10.98.1.1/30", "dev", &up]);
    sh(&["ip", "link", "set", &up, "up"]);
    sh(&[
        "ip",
        "netns",
        "exec",
        &home.wan.ns,
        "ip",
        "addr",
        "add",
        "10.98.1.2/30",
        "dev",
        "eth1",
    ]);
    sh(&[
        "ip",
        "netns",
        "exec",
        &home.wan.ns,
        "ip",
        "link",
        "set",
        "eth1",
        "up",
    ]);
    let www = work.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::copy(&pkg, www.join("wan-dnsf.gvpkg")).unwrap();
    let _http = Killed(
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &home.wan.ns,
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                "10.98.1.2",
            ])
            .current_dir(&www)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("10.98.1.2", 8080)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the WAN package server did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut c = Controller::connect(port, LAUNCHER, LAUNCHER_TOPIC);
    wait_for_agent(&mut c);
    subscribe(&mut c, "du", "Event", &format!("{SM}DUStateChange!"));
    assert!(!home.filtered(), "nothing filters before the install");
    operate(
        &mut c,
        &format!("{SM}InstallDU()"),
        "wan",
        &[("URL", "http://10.98.1.2:8080/wan-dnsf.gvpkg")],
    );
    let ev = du_state_change(&c);
    assert_eq!(ev["CurrentState"], "Installed", "{ev}");
    let eu = ev["ExecutionUnitRefList"].as_str().unwrap().to_string();
    let r = operate(
        &mut c,
        &format!("{eu}.SetRequestedState()"),
        "go",
        &[("RequestedState", "Active")],
    );
    assert!(r.to_string().contains("req_output_args"), "{r}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !home.filtered() {
        assert!(
            Instant::now() < deadline,
            "the new service never filtered; log:\n{}",
            d.log()
        );
    }
    // Its steering counters are in the data model.
    let p = get(&mut c, &[&format!("{eu}.")]);
    let steered: u64 = p[&format!("{eu}.X_GATEVISOR-ORG_Steering.SteeredPackets")]
        .parse()
        .unwrap();
    assert!(steered > 0, "{p:#?}");
    let _ = Command::new("ip").args(["link", "del", &up]).output();
}

/// The operator's per-service settings over USP: a Set puts the LAN host on dns-filter's
/// kids' profile, and its next lookup of a kids'-only name is answered with the block
/// address by the same process (the shipped package; its profiles are settings).
#[test]
fn a_usp_set_of_a_dns_filter_setting_changes_one_devices_profile_live() {
    if !need_ovs("a_usp_set_of_a_dns_filter_setting_changes_one_devices_profile_live")
        || !on_path("mosquitto")
    {
        eprintln!("skipped: needs Open vSwitch and mosquitto");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (_broker, port) = mosquitto(work.path());
    let d = Daemon::start_with_config(&agent_config(port));
    let home = home::Home::new(&d, "us", "10.89.0");
    d.install_package_started(&d.example_package("dns-filter"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !home.filtered() {
        assert!(Instant::now() < deadline, "dns-filter never filtered");
    }
    let pid = d.status("dns-filter")["init_pid"].clone();
    let kids_answer = |home: &home::Home| {
        home.ask("games.test", Duration::from_millis(300)) == Some((0, 1, [0, 0, 0, 0]))
    };
    assert!(
        !kids_answer(&home),
        "the LAN host is not on the kids' profile yet"
    );
    let mut c = Controller::connect(port, LAUNCHER, LAUNCHER_TOPIC);
    wait_for_agent(&mut c);
    let eu = unit_path(&mut c, "ExecutionUnit", "dns-filter");
    let lan_mac = traffic::mac_in(&home.lan.ns);
    let t = Instant::now();
    let r = set(
        &mut c,
        &format!("{eu}X_GATEVISOR-ORG_Setting.[Name==\"KidsDevices\"]."),
        &[("Value", &format!("02:00:00:00:00:0a,{lan_mac}"))],
    );
    assert!(r["Response"]["SetResp"].is_object(), "{r}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !kids_answer(&home) {
        assert!(Instant::now() < deadline, "the Set never took effect");
    }
    eprintln!(
        "USP Set to the device's next blocked lookup: {:?}",
        t.elapsed()
    );
    assert_eq!(d.status("dns-filter")["init_pid"], pid, "not restarted");
}
