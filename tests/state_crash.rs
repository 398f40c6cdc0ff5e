//! A daemon killed in the middle of a state write leaves the previous state readable.

mod common;
use common::*;

#[test]
fn torn_state_write_keeps_previous_state() {
    if !need_root("torn_state_write_keeps_previous_state") {
        return;
    }
    // Write 1 happens at start-up (adoption), write 2 installs `t-keep`, write 3 is torn.
    let mut d = Daemon::start_with_env(&[("GATEVISOR_FAULT", "torn-state-write:3")]);
    let a = d.manifest("a.toml", &manifest_text("t-keep", "sleep 100", ""));
    d.json(&["service", "install", a.to_str().unwrap(), "--json"]);
    let committed = std::fs::read(d.state_dir().join("state.json")).unwrap();

    let b = d.manifest("b.toml", &manifest_text("t-torn", "sleep 100", ""));
    let out = d.cli(&["service", "install", b.to_str().unwrap()]);
    assert!(!out.status.success(), "the torn write must kill the daemon");
    let status = d.child.as_mut().unwrap().wait().unwrap();
    assert!(!status.success(), "daemon aborted");
    d.child = None;

    // The temp file is torn; the committed file is the previous state, untouched.
    let tmp = std::fs::read(d.state_dir().join("state.json.tmp")).unwrap();
    assert!(
        serde_json::from_slice::<serde_json::Value>(&tmp).is_err(),
        "temp file should be torn"
    );
    assert_eq!(
        std::fs::read(d.state_dir().join("state.json")).unwrap(),
        committed
    );

    d.set_env(&[]);
    d.spawn();
    let list = d.json(&["service", "list", "--json"]);
    let names: Vec<&str> = list["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["t-keep"]);
    // The half-done install can simply be repeated.
    d.json(&["service", "install", b.to_str().unwrap(), "--json"]);
    assert_eq!(d.status("t-torn")["state"], "installed");
}
