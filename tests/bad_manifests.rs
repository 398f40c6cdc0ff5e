//! Every kind of bad manifest is refused with an error naming the file and the field, and
//! nothing is installed or changed (the state file stays byte-for-byte the same).

mod common;
use common::*;

fn base() -> String {
    manifest_text("good", "sleep 100", "")
}

/// A microVM manifest that is valid except where a case breaks it (guest.cpio sits beside it).
fn vm_base() -> String {
    base()
        .replace("runtime = \"lxc\"", "runtime = \"microvm\"")
        .replace("builtin:busybox", "initramfs:guest.cpio")
        + "[network]\ninterface = false\n"
}

/// (what is wrong, manifest text, words the error must contain)
fn cases() -> Vec<(&'static str, String, Vec<&'static str>)> {
    vec![
        ("wrong type", base().replace("memory_mib = 32", "memory_mib = \"lots\""), vec!["memory_mib", "invalid type"]),
        ("unknown field", base().replace("[resources]", "colour = \"red\"\n[resources]"), vec!["unknown field", "colour"]),
        ("unknown resources field", base().replace("pids = 32", "pids = 32\nswap_mib = 3"), vec!["unknown field", "swap_mib"]),
        ("zero memory", base().replace("memory_mib = 32", "memory_mib = 0"), vec!["resources.memory_mib", "at least"]),
        ("name with slash", base().replace("name = \"good\"", "name = \"a/b\""), vec!["`name`", "'/'"]),
        ("name with dot-dot", base().replace("name = \"good\"", "name = \"..\""), vec!["`name`", "'..'"]),
        ("name too long", base().replace("name = \"good\"", "name = \"abcdefghijklmnop\""), vec!["`name`", "1 to 12"]),
        ("missing image", base().replace("image = \"builtin:busybox\"\n", ""), vec!["`image`", "missing"]),
        ("image dir missing", base().replace("builtin:busybox", "rootfs:./nope"), vec!["`image`", "does not exist"]),
        ("bad image scheme", base().replace("builtin:busybox", "docker://x"), vec!["`image`", "builtin:busybox"]),
        ("empty command", base().replace(r#"command = ["/bin/sh", "-c", "sleep 100"]"#, "command = []"), vec!["`command`"]),
        ("missing command", base().replace("command = [\"/bin/sh\", \"-c\", \"sleep 100\"]\n", ""), vec!["`command`", "must name the program"]),
        ("user by name outside an image", base().replace("[resources]", "user = \"app\"\n[resources]"), vec!["`user`", "resolved only in an OCI image"]),
        ("user beyond the mapped ids", base().replace("[resources]", "user = \"70000:0\"\n[resources]"), vec!["`user`", "below 65536"]),
        ("relative workdir", base().replace("[resources]", "workdir = \"srv\"\n[resources]"), vec!["`workdir`", "absolute"]),
        ("stop signal that kills", base().replace("[resources]", "stop_signal = \"SIGKILL\"\n[resources]"), vec!["`stop_signal`", "cannot ask"]),
        ("unknown runtime", base().replace("runtime = \"lxc\"", "runtime = \"docker\""), vec!["runtime", "unknown variant"]),
        ("more vcpus than the board", base().replace("[resources]", "[resources]\nvcpus = 64"), vec!["resources.vcpus", "exceeds the board"]),
        ("zero vcpus", base().replace("[resources]", "[resources]\nvcpus = 0"), vec!["resources.vcpus"]),
        ("cpu quota above vcpus", base().replace("[resources]", "[resources]\ncpu_quota_percent = 250"), vec!["resources.cpu_quota_percent", "1 to 100"]),
        ("unknown capability", base().replace("[resources]", "capabilities = [\"FLY\"]\n[resources]"), vec!["capabilities", "FLY"]),
        ("bad env name", base().replace("[resources]", "[env]\n\"1X\" = \"y\"\n[resources]"), vec!["env.1X"]),
        ("restart policy", base() + "[restart]\npolicy = \"sometimes\"\nmax_retries = 1\nbackoff_initial_ms = 1\nbackoff_max_ms = 2\nstable_after_s = 1\n", vec!["policy", "unknown variant"]),
        ("backoff order", base() + "[restart]\npolicy = \"always\"\nmax_retries = 1\nbackoff_initial_ms = 500\nbackoff_max_ms = 100\nstable_after_s = 1\n", vec!["restart.backoff_initial_ms"]),
        ("not toml", "name = \"x\nversion".to_string(), vec!["bad.toml"]),
        ("microvm with a container image", base().replace("runtime = \"lxc\"", "runtime = \"microvm\""), vec!["`image`", "initramfs"]),
        ("initramfs for a container", base().replace("builtin:busybox", "initramfs:guest.cpio"), vec!["`image`", "runtime = \"microvm\""]),
        ("microvm section for a container", base() + "[microvm]\ncmdline = \"quiet\"\n", vec!["`microvm`", "only for"]),
        ("heartbeat without steering", base() + "[network]\nheartbeat_timeout_ms = 1000\n", vec!["network.heartbeat_timeout_ms", "needs network.steering"]),
        // The daemon's loop wakes at each heartbeat deadline: a 1 ms timeout would wake it a
        // thousand times a second.
        ("heartbeat too tight", base() + "[network]\nsteering = [{ kind = \"dns\" }]\nheartbeat_timeout_ms = 1\n", vec!["network.heartbeat_timeout_ms", "500 to 600000"]),
        ("ready without steering", base() + "[network]\nready = \"notify\"\n", vec!["network.ready", "needs network.steering"]),
        ("unknown readiness", base() + "[network]\nsteering = [{ kind = \"dns\" }]\nready = \"sometimes\"\n", vec!["ready", "unknown variant"]),
        ("verdict ping without steering", base() + "[health]\nverdict_ping = true\n", vec!["health.verdict_ping", "needs network.steering"]),
        ("over memory budget", base().replace("memory_mib = 32", "memory_mib = 4000000"), vec!["resources.memory_mib", "budget"]),
        ("setting of an unknown type", base() + "[settings.Level]\ntype = \"float\"\ndefault = 1\n", vec!["type", "unknown variant"]),
        ("setting default of the wrong type", base() + "[settings.Level]\ntype = \"uint\"\ndefault = \"high\"\n", vec!["settings.Level.default", "unsigned"]),
        ("setting default out of bounds", base() + "[settings.Level]\ntype = \"uint\"\ndefault = 9\nmax = 5\n", vec!["settings.Level.default", "outside 0 to 5"]),
        ("setting with a bad name", base() + "[settings.\"my-level\"]\ntype = \"bool\"\ndefault = true\n", vec!["settings.my-level", "letters, digits or _"]),
        ("setting bounds of another type", base() + "[settings.Name]\ntype = \"string\"\ndefault = \"x\"\nmin = 1\n", vec!["settings.Name", "min and max are for"]),
        ("setting default not in its format", base() + "[settings.Devices]\ntype = \"string-list\"\nformat = \"mac\"\ndefault = [\"nope\"]\n", vec!["settings.Devices.default", "MAC address"]),
        ("setting without a default", base() + "[settings.Level]\ntype = \"uint\"\n", vec!["missing field", "default"]),
    ]
}

#[test]
fn each_bad_manifest_is_refused_naming_the_field_and_changes_nothing() {
    let d = Daemon::start();
    let before_list = d.json(&["service", "list", "--json"]);
    let state_file = d.state_dir().join("state.json");
    let before_state = std::fs::read(&state_file).ok();
    let mut cases = cases();
    // Where KVM cannot boot a Linux guest (KVM-PVM, as on the development machines, or no KVM),
    // a valid microVM service is refused for that reason.
    if std::path::Path::new("/sys/module/kvm_pvm").exists()
        || !std::path::Path::new("/dev/kvm").exists()
    {
        cases.push((
            "microvm without hardware KVM",
            vm_base(),
            vec!["`runtime`", "cannot run microVMs"],
        ));
    }
    assert!(cases.len() >= 12);
    for (what, text, words) in cases {
        let path = d.manifest("bad.toml", &text);
        std::fs::write(path.with_file_name("guest.cpio"), b"070701").unwrap();
        let out = d.cli(&["service", "install", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted");
        assert!(
            err.contains("bad.toml"),
            "{what}: error does not name the file: {err}"
        );
        for w in words {
            assert!(err.contains(w), "{what}: error lacks {w:?}: {err}");
        }
        let code = out.status.code();
        assert!(
            matches!(code, Some(5) | Some(6)),
            "{what}: exit code {code:?}"
        );
        assert_eq!(
            d.json(&["service", "list", "--json"]),
            before_list,
            "{what}: list changed"
        );
        assert_eq!(
            std::fs::read(&state_file).ok(),
            before_state,
            "{what}: state changed"
        );
        assert!(
            !d.state_dir().join("services/good").exists(),
            "{what}: files left behind"
        );
    }
}

#[test]
fn duplicate_name_is_refused_and_keeps_the_first_service() {
    if !need_root("duplicate_name_is_refused_and_keeps_the_first_service") {
        return;
    }
    let d = Daemon::start();
    let m = d.manifest("dup.toml", &manifest_text("t-dup", "sleep 100", ""));
    d.json(&["service", "install", m.to_str().unwrap(), "--json"]);
    let state_before = std::fs::read(d.state_dir().join("state.json")).unwrap();
    let m2 = d.manifest(
        "dup2.toml",
        &manifest_text("t-dup", "sleep 5", "").replace("1.0.0", "2.0.0"),
    );
    let out = d.cli(&["service", "install", m2.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(
        err.contains("dup2.toml") && err.contains("`name`") && err.contains("already installed"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(d.state_dir().join("state.json")).unwrap(),
        state_before
    );
    assert_eq!(d.status("t-dup")["version"], "1.0.0");
}

#[test]
fn unknown_service_and_daemon_down_have_distinct_exit_codes() {
    let d = Daemon::start();
    let out = d.cli(&["service", "status", "nope"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no service named \"nope\""));
    let out = std::process::Command::new(BIN)
        .args(["service", "list"])
        .env("GATEVISOR_SOCKET", d.dir.path().join("absent.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
}
