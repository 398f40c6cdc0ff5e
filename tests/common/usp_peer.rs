//! A USP Controller test peer (rusp-lib + rumqttc) and a private mosquitto, shared by the USP
//! agent's tests and its benchmark.
#![allow(dead_code)]

use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Event, MqttOptions};
use rusp_lib::usp_builder as b;
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const AGENT: &str = "os::gatevisor-test";
pub const LAUNCHER: &str = "self::launcher";
pub const LAUNCHER_TOPIC: &str = "usp/controller/launcher";
pub const SM: &str = "Device.SoftwareModules.";

pub struct Killed(pub Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private mosquitto on a free loopback port.
pub fn mosquitto(dir: &Path) -> (Killed, u16) {
    start_mosquitto(dir, "mosquitto", "")
}

/// A private mosquitto on loopback `port` (a broker coming back after an outage).
pub fn mosquitto_on(dir: &Path, port: u16) -> Killed {
    start_mosquitto_on(dir, "mosquitto-again", "", port)
}

/// Starts mosquitto with configuration `NAME.conf` in `dir` (a loopback listener on a free
/// port, then `extra`), logging to `NAME.log`; waits until it listens.
fn start_mosquitto(dir: &Path, name: &str, extra: &str) -> (Killed, u16) {
    let port = free_port();
    (start_mosquitto_on(dir, name, extra, port), port)
}

fn start_mosquitto_on(dir: &Path, name: &str, extra: &str, port: u16) -> Killed {
    let conf = dir.join(format!("{name}.conf"));
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}"),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
        .spawn()
        .unwrap();
    wait_listening(port, name);
    Killed(child)
}

/// Waits until something accepts TCP connections on loopback `port`.
pub fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A plain HTTP server for the packages (python3's), on a free loopback port.
pub fn http_server(dir: &Path) -> (Killed, u16) {
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
    wait_listening(port, "the HTTP server");
    (Killed(child), port)
}

/// The Controller test peer.
pub struct Controller {
    pub client: Client,
    pub rx: mpsc::Receiver<Value>,
    pub endpoint: String,
    pub topic: String,
    n: u32,
    /// Messages that came while another was awaited (a notification between a request and
    /// its answer), for a later wait: a Controller handles them in any order.
    kept: std::cell::RefCell<std::collections::VecDeque<Value>>,
}

impl Controller {
    pub fn connect(port: u16, endpoint: &str, topic: &str) -> Controller {
        Controller::connect_with(port, endpoint, topic, None)
    }

    /// With `tls`, over mutual TLS: (CA, certificate, key) PEM files.
    pub fn connect_with(
        port: u16,
        endpoint: &str,
        topic: &str,
        tls: Option<(&Path, &Path, &Path)>,
    ) -> Controller {
        let mut opts = MqttOptions::new(
            format!("peer-{}", endpoint.replace(':', "-")),
            "127.0.0.1",
            port,
        );
        opts.set_keep_alive(Duration::from_secs(30));
        if let Some((ca, cert, key)) = tls {
            let cfg = gatevisor::usp::mqtt::client_tls(
                &gatevisor::usp::mqtt::TlsConfig {
                    ca: ca.into(),
                    cert: cert.into(),
                    key: key.into(),
                },
                endpoint,
            )
            .unwrap();
            opts.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(cfg)),
            ));
        }
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
            kept: Default::default(),
        }
    }

    /// Sends `body` to `to` from this peer's endpoint id; returns the msg id.
    pub fn send_as(&mut self, from: &str, to: &str, body: rusp_lib::usp::Body) -> String {
        self.n += 1;
        let id = format!("m{}", self.n);
        let rec = record(from, to, &id, body);
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
                rec,
                props,
            )
            .unwrap();
        id
    }

    pub fn send(&mut self, body: rusp_lib::usp::Body) -> String {
        let from = self.endpoint.clone();
        self.send_as(&from, AGENT, body)
    }

    /// The next message matching `pred` within `secs`, among those kept from earlier waits
    /// first; the others are kept for later waits (the oldest go beyond 256).
    pub fn wait(&self, secs: u64, what: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
        let mut kept = self.kept.borrow_mut();
        if let Some(i) = kept.iter().position(&mut pred) {
            return kept.remove(i).expect("found");
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) if pred(&v) => return v,
                Ok(v) => {
                    if kept.len() == 256 {
                        kept.pop_front();
                    }
                    kept.push_back(v)
                }
                Err(_) => panic!("no {what} within {secs} s; got: {kept:#?}"),
            }
        }
    }

    pub fn reply(&self, id: &str) -> Value {
        let v = self.wait(60, &format!("answer to {id}"), |v| {
            v["msg"]["Header"]["msg_id"] == id
        });
        assert_eq!(v["from_id"], AGENT);
        assert_eq!(v["to_id"], self.endpoint);
        v["msg"]["Body"].clone()
    }

    pub fn nothing_for(&self, secs: u64) -> Option<Value> {
        self.rx.recv_timeout(Duration::from_secs(secs)).ok()
    }
}

/// Parameters of a GetResp as `path → value` (resolved path + relative name).
pub fn params(body: &Value) -> std::collections::BTreeMap<String, String> {
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

pub fn get(c: &mut Controller, paths: &[&str]) -> std::collections::BTreeMap<String, String> {
    let id = c.send(
        b::GetBuilder::new()
            .with_params(paths.iter().map(|p| p.to_string()).collect())
            .build()
            .unwrap(),
    );
    params(&c.reply(&id))
}

/// The instance path (`….ExecutionUnit.3.`) of service `name` in `table`, found by name.
pub fn unit_path(c: &mut Controller, table: &str, name: &str) -> String {
    get(c, &[&format!("{SM}{table}.[Name==\"{name}\"].Name")])
        .into_keys()
        .next()
        .unwrap_or_else(|| panic!("no {table} named {name}"))
        .trim_end_matches("Name")
        .to_string()
}

/// A Set body: each object path with its parameters (all required).
pub fn set_body(allow_partial: bool, objects: &[(&str, &[(&str, &str)])]) -> rusp_lib::usp::Body {
    b::SetBuilder::new()
        .with_allow_partial(allow_partial)
        .with_update_objs(
            objects
                .iter()
                .map(|(path, params)| {
                    b::UpdateObjectBuilder::new(path.to_string()).with_param_settings(
                        params
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string(), true))
                            .collect(),
                    )
                })
                .collect(),
        )
        .build()
        .unwrap()
}

/// An Operate body that asks for its response.
pub fn operate_body(command: &str, key: &str, args: &[(&str, &str)]) -> rusp_lib::usp::Body {
    b::OperateBuilder::new(command.into())
        .with_command_key(key.into())
        .with_send_resp(true)
        .with_input_args(
            args.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .build()
        .unwrap()
}

/// A Set of `params` on the object(s) `path` names (allow_partial false); the reply.
pub fn set(c: &mut Controller, path: &str, params: &[(&str, &str)]) -> Value {
    let id = c.send(set_body(false, &[(path, params)]));
    c.reply(&id)
}

pub fn operate(c: &mut Controller, command: &str, key: &str, args: &[(&str, &str)]) -> Value {
    let id = c.send(operate_body(command, key, args));
    c.reply(&id)["Response"]["OperateResp"]["operation_results"][0].clone()
}

pub fn subscribe(c: &mut Controller, id: &str, notif_type: &str, refs: &str) {
    subscribe_with(c, id, notif_type, refs, false)
}

/// A subscription; with `retry`, NotifRetry (the agent repeats until NotifyResp).
pub fn subscribe_with(c: &mut Controller, id: &str, notif_type: &str, refs: &str, retry: bool) {
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
                ("NotifRetry".into(), retry.to_string(), true),
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
pub fn du_state_change(c: &Controller) -> Value {
    let v = c.wait(120, "DUStateChange!", |v| {
        v["msg"]["Body"]["Request"]["Notify"]["event"]["event_name"] == "DUStateChange!"
    });
    let n = &v["msg"]["Body"]["Request"]["Notify"];
    assert_eq!(n["subscription_id"], "du");
    assert_eq!(n["event"]["obj_path"], SM);
    n["event"]["params"].clone()
}

pub fn operation_complete(c: &Controller, command: &str, key: &str) -> Value {
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

/// The daemon configuration for an agent on broker `port`, obeying the launcher.
pub fn agent_config(port: u16) -> String {
    format!(
        "[usp]\nendpoint_id = \"{AGENT}\"\nbroker = \"127.0.0.1:{port}\"\n\
         [[usp.controllers]]\nendpoint_id = \"{LAUNCHER}\"\ntopic = \"{LAUNCHER_TOPIC}\"\nrole = \"launcher\"\n"
    )
}

/// Waits until the agent answers a Get (it connects to the broker on its own).
pub fn wait_for_agent(c: &mut Controller) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let id = c.send(
            b::GetBuilder::new()
                .with_params(vec![SM.into()])
                .build()
                .unwrap(),
        );
        match c.rx.recv_timeout(Duration::from_secs(2)) {
            Ok(v) if v["msg"]["Header"]["msg_id"] == id => return,
            _ => assert!(Instant::now() < deadline, "the agent never answered"),
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA in `dir` (`ca.pem`, `ca.key`) and certificates it signs: `NAME.pem`/`NAME.key`
/// with `san` as their subjectAltName.
pub fn test_ca(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=gatevisor test CA",
        ],
    );
}

pub fn test_cert(dir: &Path, name: &str, san: &str) {
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"),
    )
    .unwrap();
    let (key, csr, pem, ext) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.ext"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
}

/// A private mosquitto that only speaks mutual TLS (client certificates from `ca.pem`).
pub fn mosquitto_tls(dir: &Path) -> (Killed, u16) {
    let extra = format!(
        "cafile {0}/ca.pem\ncertfile {0}/broker.pem\nkeyfile {0}/broker.key\n\
         require_certificate true\n{1}",
        dir.display(),
        // As root, mosquitto would switch to its own user, who cannot read the keys.
        if nix::unistd::geteuid().is_root() {
            "user root\n"
        } else {
            ""
        }
    );
    start_mosquitto(dir, "mosquitto-tls", &extra)
}

/// A USP Record from `from` to `to` carrying message `id` with `body`, encoded.
pub fn record(from: &str, to: &str, id: &str, body: rusp_lib::usp::Body) -> Vec<u8> {
    let msg = b::MsgBuilder::new()
        .with_msg_id(id.to_string())
        .with_body(body)
        .build()
        .unwrap();
    b::RecordBuilder::new()
        .with_version("1.3".into())
        .with_to_id(to.into())
        .with_from_id(from.into())
        .with_no_session_context_payload(&msg)
        .build()
        .unwrap()
        .to_vec()
        .unwrap()
}
