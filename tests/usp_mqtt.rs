//! The embedded USP agent driven through a real `mosquitto` by a Controller test peer written
//! with rusp-lib and rumqttc: subscriptions, Get/GetInstances over the live state, InstallDU of
//! a signed package served over HTTP, SetRequestedState, an unhealthy Update rolled back,
//! Uninstall, a badly signed package (fault 7036), and Records that must be refused. Needs root
//! (liblxc) and mosquitto (scripts/setup.sh installs it).

mod common;
use common::*;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Event, MqttOptions};
use rusp_lib::usp_builder as b;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const AGENT: &str = "os::gatevisor-test";
const LAUNCHER: &str = "self::launcher";
const LAUNCHER_TOPIC: &str = "usp/controller/launcher";
const SM: &str = "Device.SoftwareModules.";

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private mosquitto on a free loopback port.
fn mosquitto(dir: &Path) -> (Killed, u16) {
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("mosquitto.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Killed(child), port)
}

/// A plain HTTP server for the packages (python3's), on a free loopback port.
fn http_server(dir: &Path) -> (Killed, u16) {
    let port = free_port();
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the HTTP server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Killed(child), port)
}

/// The Controller test peer.
struct Controller {
    client: Client,
    rx: mpsc::Receiver<Value>,
    endpoint: String,
    topic: String,
    n: u32,
}

impl Controller {
    fn connect(port: u16, endpoint: &str, topic: &str) -> Controller {
        let mut opts = MqttOptions::new(
            format!("peer-{}", endpoint.replace(':', "-")),
            "127.0.0.1",
            port,
        );
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut conn) = Client::new(opts, 64);
        let (tx, rx) = mpsc::channel();
        let (sub_client, sub_topic) = (client.clone(), topic.to_string());
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        sub_client
                            .subscribe(sub_topic.clone(), QoS::AtLeastOnce)
                            .unwrap();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let content_type =
                            p.properties.as_ref().and_then(|pp| pp.content_type.clone());
                        assert_eq!(content_type.as_deref(), Some("usp.msg"));
                        let rec = rusp_lib::usp_decoder::try_decode_record(&p.payload).unwrap();
                        let payload = match rec.record_type {
                            rusp_lib::usp_record::mod_Record::OneOfrecord_type::no_session_context(n) => n.payload,
                            _ => panic!("unexpected record type"),
                        };
                        let msg = rusp_lib::usp_decoder::try_decode_msg(&payload).unwrap();
                        let v = serde_json::json!({
                            "from_id": rec.from_id,
                            "to_id": rec.to_id,
                            "msg": serde_json::to_value(&msg).unwrap(),
                        });
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("subscribed");
        Controller {
            client,
            rx,
            endpoint: endpoint.into(),
            topic: topic.to_string(),
            n: 0,
        }
    }

    /// Sends `body` to `to` from this peer's endpoint id; returns the msg id.
    fn send_as(&mut self, from: &str, to: &str, body: rusp_lib::usp::Body) -> String {
        self.n += 1;
        let id = format!("m{}", self.n);
        let msg = b::MsgBuilder::new()
            .with_msg_id(id.clone())
            .with_body(body)
            .build()
            .unwrap();
        let rec = b::RecordBuilder::new()
            .with_version("1.3".into())
            .with_to_id(to.into())
            .with_from_id(from.into())
            .with_no_session_context_payload(&msg)
            .build()
            .unwrap();
        let props = PublishProperties {
            content_type: Some("usp.msg".into()),
            response_topic: Some(self.topic.clone()),
            ..Default::default()
        };
        self.client
            .publish_with_properties(
                format!("usp/agent/{AGENT}"),
                QoS::AtLeastOnce,
                false,
                rec.to_vec().unwrap(),
                props,
            )
            .unwrap();
        id
    }

    fn send(&mut self, body: rusp_lib::usp::Body) -> String {
        let from = self.endpoint.clone();
        self.send_as(&from, AGENT, body)
    }

    /// The next message matching `pred` within `secs` (others are kept aside and dropped).
    fn wait(&self, secs: u64, what: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) if pred(&v) => return v,
                Ok(v) => seen.push(v),
                Err(_) => panic!("no {what} within {secs} s; got: {seen:#?}"),
            }
        }
    }

    fn reply(&self, id: &str) -> Value {
        let v = self.wait(60, &format!("answer to {id}"), |v| {
            v["msg"]["Header"]["msg_id"] == id
        });
        assert_eq!(v["from_id"], AGENT);
        assert_eq!(v["to_id"], self.endpoint);
        v["msg"]["Body"].clone()
    }

    fn nothing_for(&self, secs: u64) -> Option<Value> {
        self.rx.recv_timeout(Duration::from_secs(secs)).ok()
    }
}

/// Parameters of a GetResp as `path → value` (resolved path + relative name).
fn params(body: &Value) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for rp in body["Response"]["GetResp"]["req_path_results"]
        .as_array()
        .unwrap()
    {
        assert_eq!(rp["err_code"], 0, "{rp}");
        for res in rp["resolved_path_results"].as_array().unwrap() {
            let base = res["resolved_path"].as_str().unwrap();
            for (k, v) in res["result_params"].as_object().unwrap() {
                out.insert(format!("{base}{k}"), v.as_str().unwrap().to_string());
            }
        }
    }
    out
}

fn get(c: &mut Controller, paths: &[&str]) -> std::collections::BTreeMap<String, String> {
    let id = c.send(
        b::GetBuilder::new()
            .with_params(paths.iter().map(|p| p.to_string()).collect())
            .build()
            .unwrap(),
    );
    params(&c.reply(&id))
}

fn operate(c: &mut Controller, command: &str, key: &str, args: &[(&str, &str)]) -> Value {
    let id = c.send(
        b::OperateBuilder::new(command.into())
            .with_command_key(key.into())
            .with_send_resp(true)
            .with_input_args(
                args.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
            .build()
            .unwrap(),
    );
    c.reply(&id)["Response"]["OperateResp"]["operation_results"][0].clone()
}

fn subscribe(c: &mut Controller, id: &str, notif_type: &str, refs: &str) {
    let msg = c.send(
        b::AddBuilder::new()
            .with_create_objs(vec![b::CreateObjectBuilder::new(
                "Device.LocalAgent.Subscription.".into(),
            )
            .with_param_settings(vec![
                ("ID".into(), id.into(), true),
                ("NotifType".into(), notif_type.into(), true),
                ("ReferenceList".into(), refs.into(), true),
                ("Enable".into(), "true".into(), true),
            ])])
            .build()
            .unwrap(),
    );
    let r = c.reply(&msg);
    let res = &r["Response"]["AddResp"]["created_obj_results"][0];
    assert!(
        res["oper_status"]
            .to_string()
            .contains("Device.LocalAgent.Subscription."),
        "{r}"
    );
}

/// The next `DUStateChange!` event's arguments.
fn du_state_change(c: &Controller) -> Value {
    let v = c.wait(120, "DUStateChange!", |v| {
        v["msg"]["Body"]["Request"]["Notify"]["event"]["event_name"] == "DUStateChange!"
    });
    let n = &v["msg"]["Body"]["Request"]["Notify"];
    assert_eq!(n["subscription_id"], "du");
    assert_eq!(n["event"]["obj_path"], SM);
    n["event"]["params"].clone()
}

fn operation_complete(c: &Controller, command: &str, key: &str) -> Value {
    let v = c.wait(120, &format!("OperationComplete of {command}"), |v| {
        v["msg"]["Body"]["Request"]["Notify"]["oper_complete"]["command_key"] == key
    });
    let oc = v["msg"]["Body"]["Request"]["Notify"]["oper_complete"].clone();
    assert_eq!(
        v["msg"]["Body"]["Request"]["Notify"]["subscription_id"],
        "oc"
    );
    assert_eq!(oc["command_name"], command, "{oc}");
    oc
}

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

#[test]
fn launcher_installs_starts_updates_and_uninstalls_a_service_over_usp_mqtt() {
    if !need_root("launcher_installs_starts_updates_and_uninstalls_a_service_over_usp_mqtt") {
        return;
    }
    if !on_path("mosquitto") {
        eprintln!("skipped: mosquitto is not installed (scripts/setup.sh installs it)");
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

    subscribe(&mut c, "du", "Event", &format!("{SM}DUStateChange!"));
    subscribe(&mut c, "oc", "OperationComplete", SM);

    // InstallDU over HTTP.
    let r = operate(
        &mut c,
        &format!("{SM}InstallDU()"),
        "k-install",
        &[
            ("URL", &url(&v1)),
            ("UUID", "6f1c2a9e-0000-4000-8000-000000000001"),
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
    assert_eq!(p[&format!("{du}.URL")], url(&v1));
    assert_eq!(p[&format!("{du}.Status")], "Installed");
    assert_eq!(p[&format!("{eu}.Status")], "Idle");
    assert_eq!(
        p[&format!("{du}.ExecutionEnvRef")],
        format!("{SM}ExecEnv.1")
    );

    // Start it.
    let r = operate(
        &mut c,
        &format!("{eu}.SetRequestedState()"),
        "k-start",
        &[("RequestedState", "Active")],
    );
    assert!(r.to_string().contains("req_output_args"), "{r}");
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
    assert_eq!(ev["OperationPerformed"], "Update");
    assert_eq!(ev["CurrentState"], "Installed");
    assert_eq!(ev["Version"], "1.0.0", "{ev}");
    assert_ne!(ev["Fault.FaultCode"], "0", "{ev}");
    assert!(
        ev["Fault.FaultString"]
            .as_str()
            .unwrap()
            .contains("rolled back"),
        "{ev}"
    );
    let oc = operation_complete(&c, "Update()", "k-update");
    assert!(oc.to_string().contains("cmd_failure"), "{oc}");

    // A package signed by an untrusted key: fault 7036, nothing installed.
    operate(
        &mut c,
        &format!("{SM}InstallDU()"),
        "k-forged",
        &[("URL", &url(&forged))],
    );
    let ev = du_state_change(&c);
    assert_eq!(ev["Fault.FaultCode"], "7036", "{ev}");
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
    if !need_root("install_interrupted_by_a_daemon_crash_is_reported_failed_after_the_restart") {
        return;
    }
    if !on_path("mosquitto") {
        eprintln!("skipped: mosquitto is not installed (scripts/setup.sh installs it)");
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
    let mut d = Daemon::start_with_config(&format!(
        "[usp]\nendpoint_id = \"{AGENT}\"\nbroker = \"127.0.0.1:{port}\"\n\
         [[usp.controllers]]\nendpoint_id = \"{LAUNCHER}\"\ntopic = \"{LAUNCHER_TOPIC}\"\nrole = \"launcher\"\n"
    ));
    let mut c = Controller::connect(port, LAUNCHER, LAUNCHER_TOPIC);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let id = c.send(
            b::GetBuilder::new()
                .with_params(vec![SM.into()])
                .build()
                .unwrap(),
        );
        match c.rx.recv_timeout(Duration::from_secs(2)) {
            Ok(v) if v["msg"]["Header"]["msg_id"] == id => break,
            _ => assert!(Instant::now() < deadline, "the agent never answered"),
        }
    }
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
    assert_eq!(ev["OperationPerformed"], "Install", "{ev}");
    assert_eq!(ev["CurrentState"], "Failed", "{ev}");
    assert_ne!(ev["Fault.FaultCode"], "0", "{ev}");
    assert!(
        ev["Fault.FaultString"]
            .as_str()
            .unwrap()
            .contains("restarted"),
        "{ev}"
    );
    let oc = operation_complete(&c, "InstallDU()", "k-crash");
    assert!(oc.to_string().contains("cmd_failure"), "{oc}");
    let p = get(
        &mut c,
        &[
            "Device.LocalAgent.RequestNumberOfEntries",
            &format!("{SM}DeploymentUnitNumberOfEntries"),
        ],
    );
    assert_eq!(p["Device.LocalAgent.RequestNumberOfEntries"], "0");
    assert_eq!(p[&format!("{SM}DeploymentUnitNumberOfEntries")], "0");
}
