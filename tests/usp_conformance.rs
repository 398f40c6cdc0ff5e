//! USP conformance of the agent serving `Device.SoftwareModules.`, in the style of the
//! Broadband Forum's TP-469 test plan, run over both MTPs: MQTT (a real mosquitto, the test
//! as a Controller) and UDS (the test as the gateway's USP Broker, gatevisor as a USP
//! Service). Every case speaks USP Records only, as a Controller or a Broker would; each
//! names the TR-369 requirement it checks where there is one (the TP-469 document itself is
//! not at hand here, so no TP-469 numbers are claimed). Needs root (services run in LXC).

mod common;
#[path = "common/usp_peer.rs"]
mod usp_peer;
use common::*;
use gatevisor::usp::uds::{frame, read_frame, TLV_HANDSHAKE, TLV_RECORD};
use rusp_lib::usp_builder as b;
use serde_json::Value;
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};
use usp_peer::*;

const SERVICE: &str = "os::gatevisor-svc";
const BROKER: &str = "os::broker";
const SUBS: &str = "Device.LocalAgent.Subscription.";

/// A Controller (MQTT) or a Broker (UDS) talking to the agent.
trait Peer {
    /// Sends `body`; returns its message id.
    fn send(&mut self, body: rusp_lib::usp::Body) -> String;
    /// The next message (Header and Body) that satisfies `pred` within `secs`.
    fn next(&mut self, secs: u64, what: &str, pred: &mut dyn FnMut(&Value) -> bool) -> Value;
    /// This peer's endpoint id.
    fn endpoint(&self) -> String;
    /// Sends a response `body` to the agent's message `id`.
    fn send_as_response(&mut self, id: &str, body: rusp_lib::usp::Body);
    /// The next message within `secs`, if one comes.
    fn poll(&mut self, secs: u64) -> Option<Value>;

    /// Sends `body` and returns the answer's Body.
    fn ask(&mut self, body: rusp_lib::usp::Body) -> Value {
        let id = self.send(body);
        self.next(60, &format!("the answer to {id}"), &mut |v| {
            v["Header"]["msg_id"] == id
        })["Body"]
            .clone()
    }
}

struct Mqtt(Controller);

impl Peer for Mqtt {
    fn send(&mut self, body: rusp_lib::usp::Body) -> String {
        self.0.send(body)
    }
    fn next(&mut self, secs: u64, what: &str, pred: &mut dyn FnMut(&Value) -> bool) -> Value {
        self.0.wait(secs, what, |v| pred(&v["msg"]))["msg"].clone()
    }
    fn endpoint(&self) -> String {
        self.0.endpoint.clone()
    }
    fn send_as_response(&mut self, _id: &str, body: rusp_lib::usp::Body) {
        self.0.send(body);
    }
    fn poll(&mut self, secs: u64) -> Option<Value> {
        self.0
            .rx
            .recv_timeout(Duration::from_secs(secs))
            .ok()
            .map(|v| v["msg"].clone())
    }
}

struct Uds {
    conn: UnixStream,
    n: u32,
    /// Messages that came while another was awaited, for a later `next`.
    kept: Vec<Value>,
}

impl Uds {
    fn recv(&mut self, deadline: Instant) -> Option<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.conn
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut tlvs = read_frame(&mut self.conn).ok()?;
        let (t, v) = tlvs.remove(0);
        assert_eq!(t, TLV_RECORD, "only records after the handshake");
        let rec = rusp_lib::usp_decoder::try_decode_record(&v).unwrap();
        assert_eq!(rec.from_id, SERVICE);
        use rusp_lib::usp_record::mod_Record::OneOfrecord_type as R;
        Some(match rec.record_type {
            R::no_session_context(n) => {
                serde_json::to_value(rusp_lib::usp_decoder::try_decode_msg(&n.payload).unwrap())
                    .unwrap()
            }
            R::uds_connect(_) => serde_json::json!({"record_type": "uds_connect"}),
            _ => panic!("unexpected record type"),
        })
    }
}

impl Peer for Uds {
    fn send(&mut self, body: rusp_lib::usp::Body) -> String {
        self.n += 1;
        let id = format!("b{}", self.n);
        let rec = record(BROKER, SERVICE, &id, body);
        self.conn.write_all(&frame(&[(TLV_RECORD, &rec)])).unwrap();
        id
    }
    fn next(&mut self, secs: u64, what: &str, pred: &mut dyn FnMut(&Value) -> bool) -> Value {
        if let Some(i) = self.kept.iter().position(&mut *pred) {
            return self.kept.remove(i);
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            match self.recv(deadline) {
                Some(v) if pred(&v) => return v,
                Some(v) => {
                    if self.kept.len() == 256 {
                        self.kept.remove(0);
                    }
                    self.kept.push(v)
                }
                None => panic!("no {what} within {secs} s; got {:#?}", self.kept),
            }
        }
    }
    fn endpoint(&self) -> String {
        BROKER.into()
    }
    fn send_as_response(&mut self, id: &str, body: rusp_lib::usp::Body) {
        let rec = record(BROKER, SERVICE, id, body);
        self.conn.write_all(&frame(&[(TLV_RECORD, &rec)])).unwrap();
    }
    fn poll(&mut self, secs: u64) -> Option<Value> {
        self.recv(Instant::now() + Duration::from_secs(secs))
    }
}

#[derive(Clone, Copy, Debug)]
enum Mtp {
    Mqtt,
    Uds,
}

/// What a case is handed: the agent's daemon and a peer to talk to it.
struct Agent {
    d: Daemon,
    /// Appended to service names: cases run side by side, and a service's host interface
    /// is named after it.
    tag: String,
    peer: Box<dyn Peer>,
    mtp: Mtp,
    _broker: Option<Killed>,
    _work: tempfile::TempDir,
}

/// Three letters no other case running now has.
fn tag() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed) + std::process::id() * 7;
    (0..3)
        .map(|i| (b'a' + ((n / 26u32.pow(i)) % 26) as u8) as char)
        .collect()
}

impl Agent {
    fn start(mtp: Mtp) -> Agent {
        let work = tempfile::tempdir().unwrap();
        let tag = tag();
        match mtp {
            Mtp::Mqtt => {
                let (broker, port) = mosquitto(work.path());
                let d = Daemon::start_with_config_args(
                    &format!(
                        "{}[[usp.controllers]]\nendpoint_id = \"self::observer\"\n\
                         topic = \"usp/controller/observer\"\n",
                        agent_config(port)
                    ),
                    &["--no-network"],
                );
                let mut c = Controller::connect(port, LAUNCHER, LAUNCHER_TOPIC);
                wait_for_agent(&mut c);
                Agent {
                    d,
                    tag,
                    peer: Box::new(Mqtt(c)),
                    mtp,
                    _broker: Some(broker),
                    _work: work,
                }
            }
            Mtp::Uds => {
                let path = work.path().join("broker_controller_path");
                let listener = UnixListener::bind(&path).unwrap();
                let d = Daemon::start_with_config_args(
                    &format!(
                        "[usp_service]\nendpoint_id = \"{SERVICE}\"\nbroker_path = \"{}\"\n",
                        path.display()
                    ),
                    &["--no-network"],
                );
                let (mut conn, _) = listener.accept().unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                let hs = read_frame(&mut conn).unwrap();
                assert_eq!(hs, vec![(TLV_HANDSHAKE, SERVICE.as_bytes().to_vec())]);
                conn.write_all(&frame(&[(TLV_HANDSHAKE, BROKER.as_bytes())]))
                    .unwrap();
                let mut peer = Uds {
                    conn,
                    n: 0,
                    kept: vec![],
                };
                let deadline = Instant::now() + Duration::from_secs(60);
                assert_eq!(peer.recv(deadline).unwrap()["record_type"], "uds_connect");
                let reg = peer.recv(deadline).unwrap();
                let reg_id = reg["Header"]["msg_id"].as_str().unwrap().to_string();
                let resp = b::RegisterRespBuilder::new()
                    .with_registered_path_results(vec![b::RegisteredPathResultBuilder::new(
                        SM.into(),
                    )
                    .set_success(SM.into())])
                    .build()
                    .unwrap();
                let rec = record(BROKER, SERVICE, &reg_id, resp);
                peer.conn.write_all(&frame(&[(TLV_RECORD, &rec)])).unwrap();
                Agent {
                    d,
                    tag,
                    peer: Box::new(peer),
                    mtp,
                    _broker: None,
                    _work: work,
                }
            }
        }
    }

    fn get_one(&mut self, path: &str) -> Value {
        let r = self.peer.ask(
            b::GetBuilder::new()
                .with_params(vec![path.into()])
                .build()
                .unwrap(),
        );
        r["Response"]["GetResp"]["req_path_results"][0].clone()
    }

    /// `path → value` of a Get that must succeed.
    fn get(&mut self, path: &str) -> std::collections::BTreeMap<String, String> {
        let rp = self.get_one(path);
        assert_eq!(rp["err_code"], 0, "Get {path}: {rp}");
        let mut out = std::collections::BTreeMap::new();
        for res in rp["resolved_path_results"].as_array().unwrap() {
            let base = res["resolved_path"].as_str().unwrap();
            for (k, v) in res["result_params"].as_object().unwrap() {
                out.insert(format!("{base}{k}"), v.as_str().unwrap().to_string());
            }
        }
        out
    }

    fn subscribe(&mut self, id: &str, notif_type: &str, refs: &str) -> String {
        let r = self.add(
            true,
            SUBS,
            &[
                ("ID", id),
                ("NotifType", notif_type),
                ("ReferenceList", refs),
                ("Enable", "true"),
            ],
        );
        let res = &r["Response"]["AddResp"]["created_obj_results"][0]["oper_status"];
        let path = res["oper_success"]["instantiated_path"]
            .as_str()
            .unwrap_or_else(|| panic!("subscription refused: {r}"));
        path.to_string()
    }

    fn add(&mut self, allow_partial: bool, path: &str, params: &[(&str, &str)]) -> Value {
        self.peer.ask(
            b::AddBuilder::new()
                .with_allow_partial(allow_partial)
                .with_create_objs(vec![b::CreateObjectBuilder::new(path.into())
                    .with_param_settings(
                        params
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string(), true))
                            .collect(),
                    )])
                .build()
                .unwrap(),
        )
    }

    fn delete(&mut self, allow_partial: bool, paths: &[&str]) -> Value {
        self.peer.ask(
            b::DeleteBuilder::new()
                .with_allow_partial(allow_partial)
                .with_obj_paths(paths.iter().map(|p| p.to_string()).collect())
                .build()
                .unwrap(),
        )
    }

    fn set(&mut self, allow_partial: bool, objects: &[(&str, &[(&str, &str)])]) -> Value {
        self.peer.ask(set_body(allow_partial, objects))
    }

    fn operate(&mut self, command: &str, args: &[(&str, &str)]) -> Value {
        let r = self
            .peer
            .ask(operate_body(command, &format!("key-{command}"), args));
        r["Response"]["OperateResp"]["operation_results"][0].clone()
    }

    /// The name service `base` has in this case.
    fn name(&self, base: &str) -> String {
        format!("{base}-{}", self.tag)
    }

    /// Installs (and with `start`, starts) a looping LXC service through the CLI.
    fn service(&self, base: &str, start: bool) {
        self.service_with(base, start, "");
    }

    /// The same, with `extra` appended to its manifest.
    fn service_with(&self, base: &str, start: bool, extra: &str) {
        let name = &self.name(base);
        let m = self.d.manifest(
            &format!("{name}.toml"),
            &manifest_text(name, "while :; do sleep 1; done", extra),
        );
        let mut args = vec!["service", "install", m.to_str().unwrap(), "--json"];
        if start {
            args.push("--start");
        }
        let st = self.d.json(&args);
        assert_eq!(st["name"], name.as_str(), "{st}");
    }

    /// The instance path of the ExecutionUnit (or DU) of service `base`.
    fn unit(&mut self, table: &str, base: &str) -> String {
        let name = &self.name(base);
        let p = self.get(&format!("{SM}{table}.[Name==\"{name}\"].Name"));
        let k = p
            .keys()
            .next()
            .unwrap_or_else(|| panic!("no {table} {name}"));
        k.trim_end_matches("Name").to_string()
    }
}

/// The Error message of `body`, if it is one.
fn error(body: &Value) -> Option<(u64, Vec<(String, u64)>)> {
    let e = body.get("Error")?;
    Some((
        e["err_code"].as_u64().unwrap(),
        e["param_errs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| {
                        (
                            p["param_path"].as_str().unwrap_or_default().to_string(),
                            p["err_code"].as_u64().unwrap(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
    ))
}

/// A fault string as a Controller should read it.
fn assert_clean_fault(text: &str) {
    assert!(!text.is_empty(), "an empty fault string");
    for bad in ["usp-downloads", "Some(", "`gatevisor", "/state/"] {
        assert!(!text.contains(bad), "fault string holds {bad:?}: {text}");
    }
    assert!(
        !text.chars().any(|c| c.is_control() || c == '\u{fffd}'),
        "fault string holds binary: {text:?}"
    );
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod over_mqtt {
            $(
                #[test]
                fn $name() {
                    if !super::need_root(concat!("over_mqtt::", stringify!($name))) {
                        return;
                    }
                    let mut a = super::Agent::start(super::Mtp::Mqtt);
                    super::$name(&mut a);
                }
            )*
        }
        mod over_uds {
            $(
                #[test]
                fn $name() {
                    if !super::need_root(concat!("over_uds::", stringify!($name))) {
                        return;
                    }
                    let mut a = super::Agent::start(super::Mtp::Uds);
                    super::$name(&mut a);
                }
            )*
        }
    };
}

conformance!(
    get_r_get_1a_a_path_in_the_model_that_resolves_to_nothing_is_an_empty_result,
    get_r_get_1_paths_outside_the_model_and_bad_syntax_are_errors,
    get_every_declared_parameter_exists_on_every_instance,
    get_execution_units_report_running_state_honestly,
    delete_r_del_1_refusals_are_errors_and_change_nothing,
    add_r_add_refusals_use_the_right_codes,
    set_read_only_unknown_and_badly_typed_parameters_are_refused_and_change_nothing,
    set_changes_a_subscription,
    get_supported_dm_unique_keys_and_flags,
    get_instances_carry_unique_keys,
    notify_object_creation_carries_unique_keys,
    subscription_recipient_is_a_controller_reference,
    operate_sync_commands_and_their_errors,
    operate_uninstall_du_state_change_names_what_was_removed,
    operate_install_faults_use_tr181_codes_and_clean_strings,
    roles_an_observer_changes_only_its_own_subscriptions,
    notify_value_change_of_a_unit_status,
    notify_retry_until_notify_resp,
    set_operator_settings_typed_checked_delivered_and_notified,
);

const SETTINGS: &str = r#"
[settings.Level]
type = "uint"
default = 3
min = 1
max = 5
[settings.Names]
type = "string-list"
format = "domain"
default = ["a.test"]
[settings.On]
type = "bool"
default = false
"#;

/// The operator's settings of a unit (`ExecutionUnit.{i}.X_GATEVISOR-ORG_Setting.{i}.`):
/// read, written by Value (typed and bounded by the service's declaration, all or nothing),
/// delivered to the running service, and reported with ValueChange.
fn set_operator_settings_typed_checked_delivered_and_notified(a: &mut Agent) {
    a.service_with("svc", true, SETTINGS);
    let name = a.name("svc");
    a.d.wait_for(Duration::from_secs(30), || {
        (a.d.status(&name)["state"] == "running").then_some(())
    })
    .expect("the service runs");
    let eu = a.unit("ExecutionUnit", "svc");
    let table = format!("{eu}X_GATEVISOR-ORG_Setting.");
    let t = a.get(&table);
    let count = format!("{eu}X_GATEVISOR-ORG_SettingNumberOfEntries");
    assert_eq!(a.get(&count)[&count], "3");
    // Numbered in name order: Level, Names, On.
    assert_eq!(t[&format!("{table}1.Name")], "Level", "{t:#?}");
    assert_eq!(t[&format!("{table}1.Type")], "uint");
    assert_eq!(t[&format!("{table}1.Value")], "3");
    assert_eq!(t[&format!("{table}2.Value")], "a.test");
    assert_eq!(t[&format!("{table}3.Default")], "false");
    a.subscribe("st", "ValueChange", &format!("{table}*.Value"));
    std::thread::sleep(Duration::from_millis(2500));

    // Refused, all or nothing: each bad value beside a good one changes nothing.
    for (inst, value, code) in [
        (1, "x", 7011),
        (1, "9", 7012),
        (3, "maybe", 7011),
        (2, "bad name", 7012),
    ] {
        let bad = format!("{table}{inst}.");
        let r = a.set(
            false,
            &[
                (&format!("{table}2."), &[("Value", "b.test")]),
                (&bad, &[("Value", value)]),
            ],
        );
        let (outer, errs) = error(&r).unwrap_or_else(|| panic!("Set {bad} = {value}: {r}"));
        assert_eq!(outer, 7004, "{r}");
        assert_eq!(errs, vec![(format!("{bad}Value"), code)], "{r}");
        assert_eq!(
            a.get(&format!("{table}2.Value"))[&format!("{table}2.Value")],
            "a.test"
        );
    }
    let r = a.set(false, &[(&format!("{table}1."), &[("Name", "Other")])]);
    assert_eq!(
        error(&r).map(|e| e.1),
        Some(vec![(format!("{table}1.Name"), 7013)]),
        "{r}"
    );
    let r = a.set(true, &[(&format!("{table}99."), &[("Value", "1")])]);
    let res = &r["Response"]["SetResp"]["updated_obj_results"][0]["oper_status"];
    assert_eq!(res["oper_failure"]["err_code"], 7016, "{r}");

    // Named by its unique key: changed, delivered, notified.
    let r = a.set(
        false,
        &[(&format!("{table}[Name==\"Level\"]."), &[("Value", "4")])],
    );
    let ok = &r["Response"]["SetResp"]["updated_obj_results"][0]["oper_status"]["oper_success"]
        ["updated_inst_results"][0];
    assert_eq!(ok["affected_path"], format!("{table}1."), "{r}");
    assert_eq!(ok["updated_params"]["Value"], "4", "{r}");
    assert_eq!(
        a.get(&format!("{table}1.Value"))[&format!("{table}1.Value")],
        "4"
    );
    let path = format!("{table}1.Value");
    a.peer.next(30, "ValueChange of the setting", &mut |v| {
        let n = &v["Body"]["Request"]["Notify"];
        n["value_change"]["param_path"] == path.as_str() && n["value_change"]["param_value"] == "4"
    });
    let file = a.d.cli(&[
        "service",
        "exec",
        &name,
        "--",
        "cat",
        "/run/gatevisor/settings.json",
    ]);
    let v: Value = serde_json::from_slice(&file.stdout)
        .unwrap_or_else(|e| panic!("settings.json in the container: {e}: {file:?}"));
    assert_eq!(v["Level"], 4, "typed for the service: {v}");
    assert_eq!(v["Names"], serde_json::json!(["a.test"]));
    assert_eq!(v["On"], false);
}

fn notify_value_change_of_a_unit_status(a: &mut Agent) {
    a.service("svc", false);
    let eu = a.unit("ExecutionUnit", "svc");
    a.subscribe("vc", "ValueChange", &format!("{SM}ExecutionUnit.*.Status"));
    std::thread::sleep(Duration::from_millis(2500));
    let r = a.operate(
        &format!("{eu}SetRequestedState()"),
        &[("RequestedState", "Active")],
    );
    assert!(r["req_output_args"].is_object(), "{r}");
    let path = format!("{eu}Status");
    let v = a.peer.next(30, "ValueChange to Active", &mut |v| {
        let n = &v["Body"]["Request"]["Notify"];
        n["value_change"]["param_path"] == path.as_str()
            && n["value_change"]["param_value"] == "Active"
    });
    assert_eq!(v["Body"]["Request"]["Notify"]["subscription_id"], "vc");
}

/// NotifRetry: a notification with `send_resp` comes again until the NotifyResp.
fn notify_retry_until_notify_resp(a: &mut Agent) {
    a.service("svc", false);
    let du = a.unit("DeploymentUnit", "svc");
    let sub = a.subscribe("retry", "Event", &format!("{SM}DUStateChange!"));
    let r = a.set(false, &[(&sub, &[("NotifRetry", "true")])]);
    assert!(r["Response"]["SetResp"].is_object(), "{r}");
    a.operate(&format!("{du}Uninstall()"), &[]);
    let is_event = |v: &Value| v["Body"]["Request"]["Notify"]["subscription_id"] == "retry";
    let first = a.peer.next(60, "DUStateChange!", &mut |v| is_event(v));
    let n = &first["Body"]["Request"]["Notify"];
    assert_eq!(n["send_resp"], true, "{first}");
    // Not answered: it comes again (after 5 s), the same event.
    let again = a
        .peer
        .next(20, "the DUStateChange! again", &mut |v| is_event(v));
    assert_eq!(
        again["Body"]["Request"]["Notify"]["event"],
        first["Body"]["Request"]["Notify"]["event"]
    );
    let id = again["Header"]["msg_id"].as_str().unwrap().to_string();
    let resp = b::NotifyRespBuilder::new("retry".into()).build().unwrap();
    a.peer.send_as_response(&id, resp);
    // Answered: nothing more for this subscription for the next retry's interval (10 s).
    let deadline = Instant::now() + Duration::from_secs(12);
    while Instant::now() < deadline {
        if let Some(v) = a.peer.poll(1) {
            assert!(!is_event(&v), "sent again after the NotifyResp: {v}");
        }
    }
}

fn roles_an_observer_changes_only_its_own_subscriptions(a: &mut Agent) {
    let Mtp::Mqtt = a.mtp else {
        eprintln!("not applicable over UDS: the Broker is the service's only Controller");
        return;
    };
    let port = {
        let c = a.d.dir.path().join("none.toml");
        let text = std::fs::read_to_string(c).unwrap();
        let at = text.find("127.0.0.1:").unwrap() + "127.0.0.1:".len();
        text[at..]
            .split('"')
            .next()
            .unwrap()
            .parse::<u16>()
            .unwrap()
    };
    let launchers = a.subscribe("launchers", "Event", SM);
    let mut o = Mqtt(Controller::connect(
        port,
        "self::observer",
        "usp/controller/observer",
    ));
    let ask = |o: &mut Mqtt, body| o.ask(body);
    // Its own subscription: yes; a Set of it: yes.
    let r = ask(
        &mut o,
        b::AddBuilder::new()
            .with_create_objs(vec![b::CreateObjectBuilder::new(SUBS.into())
                .with_param_settings(vec![
                    ("ID".into(), "obs".into(), true),
                    ("NotifType".into(), "Event".into(), true),
                    ("ReferenceList".into(), SM.into(), true),
                ])])
            .build()
            .unwrap(),
    );
    let mine = r["Response"]["AddResp"]["created_obj_results"][0]["oper_status"]["oper_success"]
        ["instantiated_path"]
        .as_str()
        .unwrap_or_else(|| panic!("{r}"))
        .to_string();
    let set = |path: &str, name: &str, value: &str| {
        b::SetBuilder::new()
            .with_allow_partial(false)
            .with_update_objs(vec![b::UpdateObjectBuilder::new(path.into())
                .with_param_settings(vec![(name.into(), value.into(), true)])])
            .build()
            .unwrap()
    };
    let r = ask(&mut o, set(&mine, "Enable", "true"));
    assert!(r["Response"]["SetResp"].is_object(), "{r}");
    // The launcher's subscription, anything else: permission denied (7006).
    for body in [
        set(&launchers, "Enable", "false"),
        set(&format!("{SM}ExecutionUnit.*."), "Name", "x"),
        b::DeleteBuilder::new()
            .with_obj_paths(vec![launchers.clone()])
            .build()
            .unwrap(),
    ] {
        let r = ask(&mut o, body);
        let code = r["Error"]["err_code"]
            .as_u64()
            .or_else(|| {
                r["Response"]["DeleteResp"]["deleted_obj_results"][0]["oper_status"]["oper_failure"]
                    ["err_code"]
                    .as_u64()
            })
            .unwrap_or_default();
        assert_eq!(code, 7006, "{r}");
    }
    assert_eq!(
        a.get(&format!("{launchers}Enable"))[&format!("{launchers}Enable")],
        "true"
    );
}

fn get_r_get_1a_a_path_in_the_model_that_resolves_to_nothing_is_an_empty_result(a: &mut Agent) {
    for path in [
        format!("{SM}DeploymentUnit.*.Name"),
        format!("{SM}DeploymentUnit.[Name==\"nothing\"].Name"),
        format!("{SM}ExecutionUnit.*."),
        format!("{SM}DeploymentUnit.7."),
        format!("{SM}ExecutionUnit.7.MemoryInUse"),
        format!("{SM}ExecutionUnit.*.AutoRestart.Enable"),
    ] {
        let rp = a.get_one(&path);
        assert_eq!(rp["err_code"], 0, "{path}: {rp}");
        assert!(
            rp["resolved_path_results"]
                .as_array()
                .is_none_or(|v| v.is_empty()),
            "{path}: {rp}"
        );
    }
}

fn get_r_get_1_paths_outside_the_model_and_bad_syntax_are_errors(a: &mut Agent) {
    for (path, code) in [
        (format!("{SM}DeploymentUnit.*.Bogus"), 7026),
        ("Device.Bogus.".to_string(), 7026),
        (format!("{SM}ExecutionUnit"), 7026),
        (format!("{SM}InstallDU()"), 7026),
        (format!("{SM}ExecutionUnit.[Name==\"x\"."), 7008),
        (format!("{SM}ExecutionUnit.[Name]."), 7008),
    ] {
        let rp = a.get_one(&path);
        assert_eq!(rp["err_code"], code, "{path}: {rp}");
    }
}

fn get_every_declared_parameter_exists_on_every_instance(a: &mut Agent) {
    a.service("idle-svc", false);
    a.service_with("busy-svc", true, SETTINGS);
    let gsdm = a.peer.ask(
        b::GetSupportedDMBuilder::new()
            .with_obj_paths(vec![SM.into()])
            .build()
            .unwrap(),
    );
    let objs = gsdm["Response"]["GetSupportedDMResp"]["req_obj_results"][0]["supported_objs"]
        .as_array()
        .unwrap_or_else(|| panic!("{gsdm}"))
        .clone();
    let tree = a.get(SM);
    let mut checked = 0;
    for name in ["idle-svc", "busy-svc"] {
        for table in ["ExecutionUnit", "DeploymentUnit"] {
            let inst = a.unit(table, name);
            let n = inst.trim_end_matches('.').rsplit('.').next().unwrap();
            for o in &objs {
                let path = o["supported_obj_path"].as_str().unwrap();
                if !path.starts_with(&format!("{SM}{table}.{{i}}.")) {
                    continue;
                }
                let concrete = path.replacen("{i}", n, 1);
                // A table inside the unit (its settings): every instance it has.
                let instances: Vec<String> = match concrete.split_once("{i}") {
                    None => vec![concrete.clone()],
                    Some((table, _)) => tree
                        .keys()
                        .filter_map(|k| k.strip_prefix(table)?.split_once('.'))
                        .map(|(i, _)| format!("{table}{i}."))
                        .collect::<std::collections::BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                };
                for inst in instances {
                    for p in o["supported_params"].as_array().unwrap() {
                        let full = format!("{inst}{}", p["param_name"].as_str().unwrap());
                        assert!(tree.contains_key(&full), "{full} is declared, not served");
                        checked += 1;
                    }
                }
            }
        }
    }
    // Both services' units, and busy-svc's three settings.
    assert!(checked > 85, "only {checked} parameters checked");
}

fn get_execution_units_report_running_state_honestly(a: &mut Agent) {
    a.service("idle-svc", false);
    a.service("busy-svc", true);
    let idle = a.unit("ExecutionUnit", "idle-svc");
    let busy = a.unit("ExecutionUnit", "busy-svc");
    let t = a.get(SM);
    // TR-181: MemoryInUse is -1 for a unit that does not run.
    assert_eq!(t[&format!("{idle}MemoryInUse")], "-1");
    assert_eq!(t[&format!("{idle}CPUPercentInUse")], "0");
    let mem: i64 = t[&format!("{busy}MemoryInUse")].parse().unwrap();
    assert!(mem > 0, "a running unit uses memory: {mem}");
    // ActiveExecutionUnits lists the units that run, not the idle ones.
    let active = &t[&format!("{SM}ExecEnv.1.ActiveExecutionUnits")];
    assert_eq!(active, busy.trim_end_matches('.'), "{active}");
}

fn delete_r_del_1_refusals_are_errors_and_change_nothing(a: &mut Agent) {
    a.service("svc", false);
    let du = a.unit("DeploymentUnit", "svc");
    let sub = a.subscribe("keep-me", "Event", &format!("{SM}DUStateChange!"));
    for (path, code) in [
        (du.clone(), 7024),
        (format!("{SM}ExecEnv.1."), 7024),
        (format!("{SUBS}99."), 7016),
        (format!("{SM}Bogus.1."), 7026),
    ] {
        // allow_partial = false: an Error naming the path, and nothing deleted, not even
        // the subscription asked for in the same request.
        let r = a.delete(false, &[&sub, &path]);
        let (outer, errs) = error(&r).unwrap_or_else(|| panic!("Delete {path}: {r}"));
        assert_eq!(outer, code as u64, "{path}: {r}");
        assert_eq!(errs, vec![(path.clone(), code as u64)], "{r}");
        assert_eq!(a.get(&format!("{sub}ID"))[&format!("{sub}ID")], "keep-me");
        // allow_partial = true: that path fails in the DeleteResp.
        let r = a.delete(true, &[&path]);
        let res = &r["Response"]["DeleteResp"]["deleted_obj_results"][0];
        assert_eq!(
            res["oper_status"]["oper_failure"]["err_code"], code,
            "{path}: {r}"
        );
    }
    assert!(!a.get(&du).is_empty(), "the DU is still there");
    // A wildcard that matches nothing deletes nothing, successfully.
    let r = a.delete(false, &[&format!("{SUBS}[ID==\"none\"].")]);
    let res = &r["Response"]["DeleteResp"]["deleted_obj_results"][0];
    assert!(res["oper_status"]["oper_success"].is_object(), "{r}");
    // And a real delete works.
    let r = a.delete(false, &[&sub]);
    let res = &r["Response"]["DeleteResp"]["deleted_obj_results"][0];
    assert_eq!(
        res["oper_status"]["oper_success"]["affected_paths"][0], sub,
        "{r}"
    );
}

fn add_r_add_refusals_use_the_right_codes(a: &mut Agent) {
    for (path, code) in [
        (format!("{SM}DeploymentUnit."), 7019),
        (format!("{SM}ExecutionUnit."), 7019),
        (SM.to_string(), 7018),
        (format!("{SM}Bogus."), 7026),
    ] {
        let r = a.add(true, &path, &[]);
        let res = &r["Response"]["AddResp"]["created_obj_results"][0];
        assert_eq!(
            res["oper_status"]["oper_failure"]["err_code"], code,
            "{path}: {r}"
        );
        let r = a.add(false, &path, &[]);
        let (outer, errs) = error(&r).unwrap_or_else(|| panic!("Add {path}: {r}"));
        assert_eq!(outer, 7004, "{r}");
        assert_eq!(errs, vec![(path.clone(), code)], "{r}");
    }
    // A subscription with a bad value, an unknown parameter, a duplicate key.
    for (params, code) in [
        (
            vec![("NotifType", "Sometimes"), ("ReferenceList", SM)],
            7012,
        ),
        (
            vec![
                ("NotifType", "Event"),
                ("ReferenceList", SM),
                ("Bogus", "1"),
            ],
            7010,
        ),
        (
            vec![
                ("NotifType", "Event"),
                ("ReferenceList", SM),
                ("Enable", "yes"),
            ],
            7011,
        ),
    ] {
        let r = a.add(true, SUBS, &params);
        let res = &r["Response"]["AddResp"]["created_obj_results"][0];
        assert_eq!(res["oper_status"]["oper_failure"]["err_code"], code, "{r}");
    }
    a.subscribe("twice", "Event", SM);
    let r = a.add(
        true,
        SUBS,
        &[
            ("ID", "twice"),
            ("NotifType", "Event"),
            ("ReferenceList", SM),
        ],
    );
    let res = &r["Response"]["AddResp"]["created_obj_results"][0];
    assert_eq!(res["oper_status"]["oper_failure"]["err_code"], 7025, "{r}");
    assert_eq!(
        a.get(&format!("{SUBS}*.ID")).len(),
        1,
        "nothing was created by the refused Adds"
    );
}

fn set_read_only_unknown_and_badly_typed_parameters_are_refused_and_change_nothing(a: &mut Agent) {
    a.service("svc", false);
    let eu = a.unit("ExecutionUnit", "svc");
    let sub = a.subscribe("s", "Event", SM);
    for (path, name, value, code) in [
        (eu.as_str(), "Name", "renamed", 7013),
        (eu.as_str(), "Bogus", "1", 7010),
        (sub.as_str(), "Enable", "maybe", 7011),
        (sub.as_str(), "NotifType", "Sometimes", 7012),
    ] {
        // allow_partial = false: an Error, and the good setting in the same request is
        // not applied either.
        let r = a.set(
            false,
            &[
                (sub.as_str(), &[("Enable", "false")]),
                (path, &[(name, value)]),
            ],
        );
        let (outer, errs) = error(&r).unwrap_or_else(|| panic!("Set {path}{name}: {r}"));
        assert_eq!(outer, 7004, "{r}");
        assert_eq!(errs, vec![(format!("{path}{name}"), code)], "{r}");
        assert_eq!(
            a.get(&format!("{sub}Enable"))[&format!("{sub}Enable")],
            "true"
        );
        // allow_partial = true: the object fails with the parameter named.
        let r = a.set(true, &[(path, &[(name, value)])]);
        let res = &r["Response"]["SetResp"]["updated_obj_results"][0]["oper_status"];
        assert_eq!(res["oper_failure"]["err_code"], code, "{r}");
        let pe = &res["oper_failure"]["updated_inst_failures"][0]["param_errs"][0];
        assert_eq!(pe["param"], name, "{r}");
        assert_eq!(pe["err_code"], code, "{r}");
    }
    assert_eq!(
        a.get(&format!("{eu}Name"))[&format!("{eu}Name")],
        a.name("svc")
    );
    // A numbered instance that does not exist.
    let r = a.set(true, &[(&format!("{SUBS}99."), &[("Enable", "false")])]);
    let res = &r["Response"]["SetResp"]["updated_obj_results"][0]["oper_status"];
    assert_eq!(res["oper_failure"]["err_code"], 7016, "{r}");
}

fn set_changes_a_subscription(a: &mut Agent) {
    let sub = a.subscribe("s", "Event", SM);
    let r = a.set(
        false,
        &[(
            &format!("{SUBS}[ID==\"s\"]."),
            &[("Enable", "false"), ("NotifRetry", "true")],
        )],
    );
    let res = &r["Response"]["SetResp"]["updated_obj_results"][0]["oper_status"];
    let ok = &res["oper_success"]["updated_inst_results"][0];
    assert_eq!(ok["affected_path"], sub, "{r}");
    assert_eq!(ok["updated_params"]["Enable"], "false", "{r}");
    let t = a.get(&sub);
    assert_eq!(t[&format!("{sub}Enable")], "false");
    assert_eq!(t[&format!("{sub}NotifRetry")], "true");
}

fn get_supported_dm_unique_keys_and_flags(a: &mut Agent) {
    let ask = |a: &mut Agent, keys: bool, params: bool| {
        let r = a.peer.ask(
            b::GetSupportedDMBuilder::new()
                .with_obj_paths(vec![format!("{SM}DeploymentUnit.{{i}}.")])
                .with_return_unique_key_sets(keys)
                .with_return_params(params)
                .build()
                .unwrap(),
        );
        r["Response"]["GetSupportedDMResp"]["req_obj_results"][0].clone()
    };
    let full = ask(a, true, true);
    assert!(
        full["data_model_inst_uri"]
            .as_str()
            .is_some_and(|u| u.starts_with("urn:broadband-forum-org:tr-181-")),
        "{full}"
    );
    let du = &full["supported_objs"][0];
    assert_eq!(
        du["unique_key_sets"][0]["key_names"],
        serde_json::json!(["UUID", "Version", "ExecutionEnvRef"]),
        "{full}"
    );
    assert!(!du["supported_params"].as_array().unwrap().is_empty());
    let bare = ask(a, false, false);
    let du = &bare["supported_objs"][0];
    assert!(
        du["unique_key_sets"]
            .as_array()
            .is_none_or(|v| v.is_empty()),
        "{bare}"
    );
    assert!(
        du["supported_params"]
            .as_array()
            .is_none_or(|v| v.is_empty()),
        "{bare}"
    );
    assert!(
        !du["supported_commands"].as_array().unwrap().is_empty(),
        "{bare}"
    );
}

fn get_instances_carry_unique_keys(a: &mut Agent) {
    a.service("svc", false);
    let eu = a.unit("ExecutionUnit", "svc");
    let r = a.peer.ask(
        b::GetInstancesBuilder::new()
            .with_first_level_only(true)
            .with_obj_paths(vec![format!("{SM}ExecutionUnit.")])
            .build()
            .unwrap(),
    );
    let rp = &r["Response"]["GetInstancesResp"]["req_path_results"][0];
    assert_eq!(rp["err_code"], 0, "{r}");
    let inst = &rp["curr_insts"][0];
    assert_eq!(inst["instantiated_obj_path"], eu, "{r}");
    assert_eq!(inst["unique_keys"]["EUID"], a.name("svc"), "{r}");
    // An empty table is an empty answer.
    let r = a.peer.ask(
        b::GetInstancesBuilder::new()
            .with_first_level_only(true)
            .with_obj_paths(vec![SUBS.into()])
            .build()
            .unwrap(),
    );
    let rp = &r["Response"]["GetInstancesResp"]["req_path_results"][0];
    assert_eq!(rp["err_code"], 0, "{r}");
}

fn notify_object_creation_carries_unique_keys(a: &mut Agent) {
    a.subscribe("oc", "ObjectCreation", &format!("{SM}ExecutionUnit."));
    // The agent compares the tree once a second: let it see the tree without the unit.
    std::thread::sleep(Duration::from_millis(2500));
    a.service("new-svc", false);
    let v = a.peer.next(30, "ObjectCreation", &mut |v| {
        v["Body"]["Request"]["Notify"]["obj_creation"]["obj_path"]
            .as_str()
            .is_some_and(|p| p.contains("ExecutionUnit."))
    });
    let n = &v["Body"]["Request"]["Notify"];
    assert_eq!(n["subscription_id"], "oc");
    assert_eq!(
        n["obj_creation"]["unique_keys"]["EUID"],
        a.name("new-svc"),
        "{v}"
    );
}

fn subscription_recipient_is_a_controller_reference(a: &mut Agent) {
    let sub = a.subscribe("mine", "Event", SM);
    let recipient = a.get(&format!("{sub}Recipient"))[&format!("{sub}Recipient")].clone();
    assert!(
        recipient.starts_with("Device.LocalAgent.Controller."),
        "{recipient}"
    );
    let ep = a.get(&format!("{recipient}.EndpointID"));
    assert_eq!(ep[&format!("{recipient}.EndpointID")], a.peer.endpoint());
    // An endpoint id is not a reference.
    let me = a.peer.endpoint();
    let r = a.add(
        true,
        SUBS,
        &[
            ("ID", "by-id"),
            ("NotifType", "Event"),
            ("ReferenceList", SM),
            ("Recipient", &me),
        ],
    );
    let res = &r["Response"]["AddResp"]["created_obj_results"][0];
    assert_eq!(res["oper_status"]["oper_failure"]["err_code"], 7012, "{r}");
    // The Add's answer carries the new subscription's unique keys.
    let r = a.add(
        true,
        SUBS,
        &[
            ("ID", "by-ref"),
            ("NotifType", "Event"),
            ("ReferenceList", SM),
            ("Recipient", &recipient),
        ],
    );
    let ok = &r["Response"]["AddResp"]["created_obj_results"][0]["oper_status"]["oper_success"];
    assert_eq!(ok["unique_keys"]["ID"], "by-ref", "{r}");
    assert_eq!(ok["unique_keys"]["Recipient"], recipient, "{r}");
}

fn operate_sync_commands_and_their_errors(a: &mut Agent) {
    a.service("svc", false);
    let eu = a.unit("ExecutionUnit", "svc");
    let r = a.operate(
        &format!("{eu}SetRequestedState()"),
        &[("RequestedState", "Active")],
    );
    assert!(r["req_output_args"].is_object(), "{r}");
    let name = a.name("svc");
    a.d.wait_for(Duration::from_secs(30), || {
        (a.d.status(&name)["state"] == "running").then_some(())
    })
    .expect("the service runs");
    let r = a.operate(&format!("{eu}Restart()"), &[]);
    assert!(r["req_output_args"].is_object(), "{r}");
    // A search expression or a wildcard names the instances it matches; the result says
    // which command ran.
    for path in [
        format!("{SM}ExecutionUnit.[Name==\"{name}\"].Restart()"),
        format!("{SM}ExecutionUnit.*.Restart()"),
    ] {
        let r = a.operate(&path, &[]);
        assert_eq!(
            r["executed_command"],
            format!("{eu}Restart()"),
            "{path}: {r}"
        );
        assert!(r["req_output_args"].is_object(), "{path}: {r}");
    }
    for (command, args, code) in [
        (
            format!("{eu}SetRequestedState()"),
            vec![("RequestedState", "Bogus")],
            7027,
        ),
        (format!("{SM}ExecutionUnit.99.Restart()"), vec![], 7016),
        (format!("{SM}DeploymentUnit.99.Uninstall()"), vec![], 7016),
        (format!("{eu}Explode()"), vec![], 7026),
        (
            format!("{SM}ExecutionUnit.[Name==\"x\".Restart()"),
            vec![],
            7008,
        ),
    ] {
        let r = a.operate(&command, &args);
        let f = &r["cmd_failure"];
        assert_eq!(f["err_code"], code, "{command}: {r}");
        assert_clean_fault(f["err_msg"].as_str().unwrap());
    }
}

fn operate_uninstall_du_state_change_names_what_was_removed(a: &mut Agent) {
    a.service("svc", true);
    let du = a.unit("DeploymentUnit", "svc");
    let before = a.get(&du);
    a.subscribe("du", "Event", &format!("{SM}DUStateChange!"));
    let r = a.operate(&format!("{du}Uninstall()"), &[]);
    assert!(
        r["req_obj_path"]
            .as_str()
            .is_some_and(|p| p.starts_with("Device.LocalAgent.Request.")),
        "{r}"
    );
    let v = a.peer.next(60, "DUStateChange!", &mut |v| {
        v["Body"]["Request"]["Notify"]["event"]["event_name"] == "DUStateChange!"
    });
    let ev = &v["Body"]["Request"]["Notify"]["event"]["params"];
    assert_eq!(ev["OperationPerformed"], "Uninstall", "{v}");
    assert_eq!(ev["CurrentState"], "Uninstalled", "{v}");
    assert_eq!(ev["Fault.FaultCode"], "0", "{v}");
    assert_eq!(ev["UUID"], before[&format!("{du}UUID")], "{v}");
    assert_eq!(ev["Version"], "1.0.0", "{v}");
    assert_eq!(ev["DeploymentUnitRef"], du.trim_end_matches('.'), "{v}");
    assert!(a.get(&du).is_empty(), "the DU is gone");
}

fn operate_install_faults_use_tr181_codes_and_clean_strings(a: &mut Agent) {
    let src = a.d.dir.path().join("src-pkg");
    std::fs::create_dir_all(src.join("files")).unwrap();
    std::fs::write(src.join("files/payload.txt"), "payload-payload-payload\n").unwrap();
    std::fs::write(
        src.join("service.toml"),
        service_toml(&a.name("pkg"), "1.0.0", ""),
    )
    .unwrap();
    let pkg = a.d.signed_package(&src, "pkg.gvpkg");
    let bytes = std::fs::read(&pkg).unwrap();
    // Flips the lowest bit of the last byte but one of `needle`'s first occurrence.
    let flip = |needle: &[u8], name: &str| {
        let mut b = bytes.clone();
        let at = b
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap_or_else(|| panic!("{name}: no {needle:?} in the package"));
        b[at + needle.len() - 2] ^= 0x01;
        let p = a.d.dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    // A manifest changed after signing (1.0.0 → 1.0.1), an artifact changed, bytes that
    // are no package.
    let tampered = flip(b"version = \"1.0.0\"", "tampered.gvpkg");
    let corrupt = flip(b"payload-payload", "corrupt.gvpkg");
    let junk = a.d.dir.path().join("junk.gvpkg");
    std::fs::write(&junk, b"\x00\x01\x02\xffnot a package\x07\x1b[31m").unwrap();
    a.subscribe("du", "Event", &format!("{SM}DUStateChange!"));
    for (file, code) in [(&tampered, 7219), (&corrupt, 7218), (&junk, 7218)] {
        let r = a.operate(
            &format!("{SM}InstallDU()"),
            &[("URL", &format!("file://{}", file.display()))],
        );
        assert!(r["req_obj_path"].is_string(), "{r}");
        let v = a.peer.next(60, "DUStateChange!", &mut |v| {
            v["Body"]["Request"]["Notify"]["event"]["event_name"] == "DUStateChange!"
        });
        let ev = &v["Body"]["Request"]["Notify"]["event"]["params"];
        assert_eq!(ev["Fault.FaultCode"], code.to_string(), "{file:?}: {v}");
        assert_eq!(ev["CurrentState"], "Failed", "{v}");
        assert_clean_fault(ev["Fault.FaultString"].as_str().unwrap());
    }
    assert!(a.get(&format!("{SM}DeploymentUnit.*.")).is_empty());
    // The good package installs; a second install of it is a duplicate (7226) and its
    // fault string gives no CLI advice.
    for code in [0, 7226] {
        a.operate(
            &format!("{SM}InstallDU()"),
            &[("URL", &format!("file://{}", pkg.display()))],
        );
        let v = a.peer.next(60, "DUStateChange!", &mut |v| {
            v["Body"]["Request"]["Notify"]["event"]["event_name"] == "DUStateChange!"
        });
        let ev = &v["Body"]["Request"]["Notify"]["event"]["params"];
        assert_eq!(ev["Fault.FaultCode"], code.to_string(), "{v}");
        if code != 0 {
            assert_clean_fault(ev["Fault.FaultString"].as_str().unwrap());
        }
    }
}
