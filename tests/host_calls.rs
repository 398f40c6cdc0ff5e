//! Host calls through a real daemon: granted by the operator's policy or refused at install,
//! served on a running container's control channel against the host's real links, refused
//! when ungranted, malformed or too many, and audited in the event log. Needs root, liblxc
//! and Open vSwitch (the service's port is plugged into the daemon's private switch).

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

fn service(grants: &str) -> String {
    format!(
        "{}\n[host_calls]\nallow = [{grants}]\n",
        manifest_text("t-hc", "while :; do sleep 1; done", "")
    )
}

/// One connection to a service's control channel, as the service itself holds it.
struct Channel {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Channel {
    fn open(d: &Daemon, name: &str) -> Channel {
        let path = d.state_dir().join("run").join(name).join("verdict.sock");
        let w = UnixStream::connect(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        w.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let r = BufReader::new(w.try_clone().unwrap());
        Channel { w, r }
    }

    fn ask(&mut self, line: &str) -> serde_json::Value {
        self.w.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        self.r.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{answer:?}: {e}"))
    }

    fn call(&mut self, call: &str, args: serde_json::Value) -> serde_json::Value {
        self.ask(&serde_json::json!({"op": "call", "call": call, "args": args}).to_string())
    }
}

#[test]
fn a_host_call_the_policy_does_not_allow_is_refused_at_install() {
    if !need_ovs("a_host_call_the_policy_does_not_allow_is_refused_at_install") {
        return;
    }
    let d = Daemon::start_with_config("[policy]\nhost_calls = [\"link.stats:wlan*\"]\n");
    for (grants, refused) in [
        ("\"link.stats:gv-*\"", "link.stats:gv-*"),
        // Wider than what the operator allows.
        ("\"link.stats:*\"", "link.stats:*"),
        ("\"dhcp.leases\"", "dhcp.leases:*"),
    ] {
        let m = d.manifest("hc.toml", &service(grants));
        let out = d.cli(&["service", "install", m.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{grants}: installed");
        assert!(
            err.contains("host_calls.allow")
                && err.contains(refused)
                && err.contains("not granted"),
            "{grants}: {err}"
        );
    }
    // A grant the manifest cannot even name is invalid, whatever the policy.
    let m = d.manifest("hc.toml", &service("\"exec:/bin/sh\""));
    let out = d.cli(&["service", "install", m.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown host call"),
        "{err}"
    );
    assert!(d.json(&["service", "list", "--json"])["services"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn a_container_reads_its_granted_links_and_nothing_else_and_every_call_is_audited() {
    if !need_ovs("a_container_reads_its_granted_links_and_nothing_else_and_every_call_is_audited") {
        return;
    }
    let d = Daemon::start_with_config(
        "[policy]\nhost_calls = [\"link.stats:gv-*\", \"link.list:gv-*\", \"board.fact:*\"]\n",
    );
    let st = d.install_started(
        "hc.toml",
        &service("\"link.stats:gv-t-*\", \"link.list:gv-*\", \"board.fact:uptime\""),
    );
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(
        st["host_calls"],
        serde_json::json!(["link.stats:gv-t-*", "link.list:gv-*", "board.fact:uptime"])
    );
    let port = st["interface"].as_str().unwrap().to_string();
    let mut ch = Channel::open(&d, "t-hc");

    // Its own port's real counters.
    let r = ch.call("link.stats", serde_json::json!({"link": port}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["result"]["link"], port.as_str());
    assert!(r["result"]["stats"]["tx_packets"].is_u64(), "{r}");
    // Links it may list: only the gateway's service ports.
    let r = ch.call("link.list", serde_json::json!({}));
    let names: Vec<&str> = r["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&port.as_str()), "{r}");
    assert!(names.iter().all(|n| n.starts_with("gv-")), "{names:?}");
    // A named fact, mapped by the board profile.
    let r = ch.call("board.fact", serde_json::json!({"fact": "uptime"}));
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["result"]["value"].as_str().unwrap().contains('.'), "{r}");

    // Refusals: another link, an operation not granted, a fact not granted, a path.
    for (call, args, kind) in [
        (
            "link.stats",
            serde_json::json!({"link": "lo"}),
            "not-granted",
        ),
        (
            "neigh.list",
            serde_json::json!({"link": port}),
            "not-granted",
        ),
        (
            "board.fact",
            serde_json::json!({"fact": "load_average"}),
            "not-granted",
        ),
        (
            "link.stats",
            serde_json::json!({"link": "../../etc/passwd"}),
            "invalid",
        ),
    ] {
        let r = ch.call(call, args.clone());
        assert_eq!(
            (r["ok"].clone(), r["kind"].clone()),
            (false.into(), kind.into()),
            "{call} {args}: {r}"
        );
    }
    // Malformed requests: an error reply, the connection still usable.
    for bad in [
        r#"{"op":"call","call":"exec","args":{"argv":["/bin/sh"]}}"#,
        r#"{"op":"call","call":"link.stats","args":{"link":"lo","path":"/etc"}}"#,
        r#"{"op":"call","call":"link.stats"}"#,
        r#"{"op":"call""#,
    ] {
        let r = ch.ask(bad);
        assert_eq!(r["ok"], false, "{bad}: {r}");
        assert!(
            r["error"].as_str().unwrap().contains("bad request"),
            "{bad}: {r}"
        );
    }
    // A burst past the rate limit is refused, and calls work again a second later.
    let limited = (0..400)
        .map(|_| ch.call("link.stats", serde_json::json!({"link": port})))
        .filter(|r| r["kind"] == "rate-limited")
        .count();
    assert!(limited > 0, "no call of 400 was rate-limited");
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        ch.call("link.stats", serde_json::json!({"link": port}))["ok"],
        true
    );

    // The daemon and the service are unaffected.
    assert_eq!(d.status("t-hc")["state"], "running");
    // Every call is audited (rate-limited in the log): the first ones are there by name.
    let out = d.cli(&["events", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let audits: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .flat_map(|v: serde_json::Value| match v {
            serde_json::Value::Array(a) => a,
            v => vec![v],
        })
        .filter(|e| e["kind"] == "host-call" && e["service"] == "t-hc")
        .collect();
    let details: Vec<&str> = audits
        .iter()
        .map(|e| e["detail"].as_str().unwrap())
        .collect();
    assert!(
        details
            .iter()
            .any(|d| d.starts_with(&format!("link.stats {port}: ok in "))),
        "{details:?}"
    );
    assert!(
        details
            .iter()
            .any(|d| d.starts_with("link.stats lo: refused (not-granted)")),
        "{details:?}"
    );
    assert!(
        details.len() <= 21,
        "the audit is rate-limited: {}",
        details.len()
    );
}

#[test]
fn a_packaged_service_makes_host_calls_from_inside_its_container() {
    if !need_ovs("a_packaged_service_makes_host_calls_from_inside_its_container") {
        return;
    }
    let d = Daemon::start_with_config("[policy]\nhost_calls = [\"link.stats:gv-*\"]\n");
    let pkg = d.host_call_package("t-hcp", "\"link.stats:gv-*\"");
    let st = d.install_package_started(&pkg);
    let port = st["interface"].as_str().unwrap().to_string();
    let exec = |args: &[&str]| {
        let mut all = vec!["service", "exec", "t-hcp", "--", "/bin/host-call"];
        all.extend_from_slice(args);
        d.cli(&all)
    };
    // The container reaches its control channel at /run/gatevisor and reads its own port's
    // counters on the host.
    let args = format!("{{\"link\":\"{port}\"}}");
    let out = exec(&["link.stats", &args]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["link"], port.as_str());
    assert!(v["stats"]["rx_bytes"].is_u64(), "{v}");
    // What it was not granted is refused inside too.
    let out = exec(&["link.stats", "{\"link\":\"lo\"}"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not-granted"),
        "{out:?}"
    );
}
