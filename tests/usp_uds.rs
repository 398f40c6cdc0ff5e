//! gatevisor as a USP Service behind the gateway's USP Broker, over the TR-369 UDS MTP: a
//! Broker-side test peer listens on the controller socket, takes the handshake, the
//! UDSConnect Record and the Register, adds its own subscriptions (as a real Broker does),
//! routes a Get and an InstallDU, and checks that the notifications echo its subscription ids
//! with `send_resp` equal to NotifRetry. Needs root for the install (liblxc).

mod common;
#[path = "common/usp_peer.rs"]
mod usp_peer;
use common::*;
use gatevisor::usp::uds::{frame, read_frame, TLV_HANDSHAKE, TLV_RECORD};
use rusp_lib::usp_builder as b;
use serde_json::Value;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

const SERVICE: &str = "os::gatevisor-svc";
const BROKER: &str = "os::broker";
const SM: &str = "Device.SoftwareModules.";

struct Broker {
    conn: UnixStream,
    n: u32,
}

impl Broker {
    fn send(&mut self, body: rusp_lib::usp::Body) -> String {
        self.n += 1;
        let id = format!("b{}", self.n);
        self.send_id(&id, body);
        id
    }

    /// Sends `body` as message `id` (a response carries its request's id).
    fn send_id(&mut self, id: &str, body: rusp_lib::usp::Body) {
        use std::io::Write;
        let rec = usp_peer::record(BROKER, SERVICE, id, body);
        self.conn.write_all(&frame(&[(TLV_RECORD, &rec)])).unwrap();
    }

    fn recv(&mut self) -> Value {
        let mut tlvs = read_frame(&mut self.conn).expect("a frame from the service");
        assert_eq!(tlvs.len(), 1, "one record per frame");
        let (t, v) = tlvs.remove(0);
        assert_eq!(t, TLV_RECORD, "only records after the handshake");
        let rec = rusp_lib::usp_decoder::try_decode_record(&v).unwrap();
        assert_eq!(rec.from_id, SERVICE);
        assert_eq!(rec.to_id, BROKER);
        use rusp_lib::usp_record::mod_Record::OneOfrecord_type as R;
        match rec.record_type {
            R::no_session_context(n) => {
                serde_json::to_value(rusp_lib::usp_decoder::try_decode_msg(&n.payload).unwrap())
                    .unwrap()
            }
            R::uds_connect(_) => serde_json::json!({"record_type": "uds_connect"}),
            _ => panic!("unexpected record type"),
        }
    }

    fn recv_until(&mut self, what: &str, mut pred: impl FnMut(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen = Vec::new();
        loop {
            assert!(Instant::now() < deadline, "no {what}; got {seen:#?}");
            let v = self.recv();
            if pred(&v) {
                return v;
            }
            seen.push(v);
        }
    }
}

#[test]
fn service_registers_with_the_broker_and_serves_routed_requests_over_uds() {
    if !need_root("service_registers_with_the_broker_and_serves_routed_requests_over_uds") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("broker_controller_path");
    let listener = UnixListener::bind(&path).unwrap();
    let d = Daemon::start_with_config(&format!(
        "[usp_service]\nendpoint_id = \"{SERVICE}\"\nbroker_path = \"{}\"\n",
        path.display()
    ));

    // Handshake: the service speaks first, the Broker answers with its own endpoint id.
    listener.set_nonblocking(false).unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let hs = read_frame(&mut conn).unwrap();
    assert_eq!(hs, vec![(TLV_HANDSHAKE, SERVICE.as_bytes().to_vec())]);
    use std::io::Write;
    conn.write_all(&frame(&[(TLV_HANDSHAKE, BROKER.as_bytes())]))
        .unwrap();
    let mut broker = Broker { conn, n: 0 };

    // The UDSConnect Record, then Register of Device.SoftwareModules.
    assert_eq!(broker.recv()["record_type"], "uds_connect");
    let reg = broker.recv();
    let reg_req = &reg["Body"]["Request"]["Register"];
    assert_eq!(reg_req["reg_paths"][0]["path"], SM, "{reg}");
    let reg_id = reg["Header"]["msg_id"].as_str().unwrap().to_string();
    let resp = b::RegisterRespBuilder::new()
        .with_registered_path_results(vec![
            b::RegisteredPathResultBuilder::new(SM.into()).set_success(SM.into())
        ])
        .build()
        .unwrap();
    broker.send_id(&reg_id, resp);

    // The Broker's own subscriptions, in the service's table.
    for (id, kind, refs) in [
        ("broker-du", "Event", format!("{SM}DUStateChange!")),
        ("broker-oc", "OperationComplete", SM.to_string()),
    ] {
        let m = broker.send(
            b::AddBuilder::new()
                .with_create_objs(vec![b::CreateObjectBuilder::new(
                    "Device.LocalAgent.Subscription.".into(),
                )
                .with_param_settings(vec![
                    ("ID".into(), id.into(), true),
                    ("NotifType".into(), kind.into(), true),
                    ("ReferenceList".into(), refs, true),
                    ("NotifRetry".into(), "true".into(), true),
                    ("Enable".into(), "true".into(), true),
                ])])
                .build()
                .unwrap(),
        );
        let r = broker.recv_until("AddResp", |v| v["Header"]["msg_id"] == m);
        assert!(
            r.to_string().contains("Device.LocalAgent.Subscription."),
            "{r}"
        );
    }

    // A routed Get.
    let m = broker.send(
        b::GetBuilder::new()
            .with_params(vec![format!("{SM}ExecEnv.1.Name")])
            .build()
            .unwrap(),
    );
    let r = broker.recv_until("GetResp", |v| v["Header"]["msg_id"] == m);
    assert!(r.to_string().contains("\"lxc\""), "{r}");

    // A routed InstallDU of a signed package; the notifications echo the Broker's ids.
    let src = d.dir.path().join("svc");
    std::fs::create_dir_all(src.join("files")).unwrap();
    std::fs::write(
        src.join("service.toml"),
        "name = \"uds-svc\"\nversion = \"1.2.3\"\nruntime = \"lxc\"\nimage = \"package\"\n\
         command = [\"/bin/sh\", \"-c\", \"while :; do sleep 1; done\"]\nstop_timeout_s = 1\n\
         [resources]\nmemory_mib = 32\n",
    )
    .unwrap();
    let pkg = d.signed_package(&src, "uds-svc.gvpkg");
    let m = broker.send(
        b::OperateBuilder::new(format!("{SM}InstallDU()"))
            .with_command_key("via-broker".into())
            .with_send_resp(true)
            .with_input_args(vec![("URL".into(), format!("file://{}", pkg.display()))])
            .build()
            .unwrap(),
    );
    let r = broker.recv_until("OperateResp", |v| v["Header"]["msg_id"] == m);
    assert!(r.to_string().contains("Device.LocalAgent.Request."), "{r}");
    let ev = broker.recv_until("DUStateChange!", |v| {
        v["Body"]["Request"]["Notify"]["event"]["event_name"] == "DUStateChange!"
    });
    let n = &ev["Body"]["Request"]["Notify"];
    assert_eq!(n["subscription_id"], "broker-du");
    assert_eq!(n["send_resp"], true, "send_resp follows NotifRetry");
    assert_eq!(n["event"]["params"]["CurrentState"], "Installed", "{ev}");
    assert_eq!(n["event"]["params"]["Version"], "1.2.3");
    let oc = broker.recv_until("OperationComplete", |v| {
        v["Body"]["Request"]["Notify"]["oper_complete"]["command_key"] == "via-broker"
    });
    assert_eq!(
        oc["Body"]["Request"]["Notify"]["subscription_id"],
        "broker-oc"
    );
    assert_eq!(oc["Body"]["Request"]["Notify"]["send_resp"], true);
    assert!(d.cli(&["service", "status", "uds-svc"]).status.success());
}
