//! Signed packages through the daemon: build with the CLI, install, refuse what is not trusted,
//! update with an automatic rollback when the new version is unhealthy. Needs root (liblxc).

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// Publisher key, trusted by the daemon's key store (`DIR/keys`).
fn publisher(d: &Daemon, name: &str, trust: bool) -> PathBuf {
    let key = d.dir.path().join(format!("{name}.key"));
    let out = d.cli(&["key", "gen", "--out", key.to_str().unwrap(), "--name", name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if trust {
        let keys = d.dir.path().join("keys");
        let out = d.cli(&[
            "key",
            "trust",
            key.with_extension("pub").to_str().unwrap(),
            "--keys-dir",
            keys.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    key
}

/// A service folder for version `version`, with an optional health check, built into a package.
fn package(d: &Daemon, key: &Path, version: &str, health: &str) -> PathBuf {
    let dir = d.looping_service("t-pkg", version, health);
    std::fs::create_dir_all(dir.join("files/srv")).unwrap();
    std::fs::write(dir.join("files/srv/version"), version).unwrap();
    d.build_package(&dir, key, &format!("t-pkg-{version}.gvpkg"))
}

fn in_container(d: &Daemon, cmd: &str) -> String {
    let out = d.cli(&["service", "exec", "t-pkg", "--", "sh", "-c", cmd]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn signed_package_installs_and_untrusted_one_is_refused() {
    if !need_root("signed_package_installs_and_untrusted_one_is_refused") {
        return;
    }
    let d = Daemon::start_with_keys();
    // Signed by a key the gateway does not trust: refused, nothing installed.
    let stranger = publisher(&d, "stranger", false);
    let bad = package(&d, &stranger, "1.0.0", "");
    let out = d.cli(&["service", "install", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("does not trust") && err.contains("t-pkg-1.0.0.gvpkg"),
        "{err}"
    );
    assert!(d.json(&["service", "list", "--json"])["services"]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(
        !d.state_dir().join("images/services/t-pkg").exists(),
        "nothing in the image store"
    );

    let key = publisher(&d, "operator", true);
    let good = package(&d, &key, "1.0.0", "");
    let st = d.install_package_started(&good);
    assert_eq!(st["package_version"], "1.0.0");
    assert_eq!(in_container(&d, "cat /srv/version"), "1.0.0");
}

#[test]
fn unhealthy_update_rolls_back_by_itself_and_rollback_works_by_hand() {
    if !need_root("unhealthy_update_rolls_back_by_itself_and_rollback_works_by_hand") {
        return;
    }
    let d = Daemon::start_with_keys();
    let key = publisher(&d, "operator", true);
    let v1 = package(
        &d,
        &key,
        "1.0.0",
        "[health]\nexec = [\"test\", \"-f\", \"/srv/version\"]\ndeadline_s = 5",
    );
    let v2 = package(
        &d,
        &key,
        "2.0.0",
        "[health]\nexec = [\"/bin/sh\", \"-c\", \"exit 3\"]\ndeadline_s = 2",
    );
    let v3 = package(
        &d,
        &key,
        "3.0.0",
        "[health]\nexec = [\"test\", \"-f\", \"/srv/version\"]\ndeadline_s = 5",
    );
    d.json(&[
        "service",
        "install",
        v1.to_str().unwrap(),
        "--start",
        "--json",
    ]);

    let out = d.cli(&["service", "update", "t-pkg", v2.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("rolled back to 1.0.0") && err.contains("exited with 3"),
        "{err}"
    );
    let st = d.status("t-pkg");
    assert_eq!(
        (st["state"].as_str(), st["package_version"].as_str()),
        (Some("running"), Some("1.0.0")),
        "{st}"
    );
    assert_eq!(in_container(&d, "cat /srv/version"), "1.0.0");
    let events = String::from_utf8_lossy(&d.cli(&["events", "--json"]).stdout).into_owned();
    assert!(events.contains("\"kind\":\"rolled-back\""), "{events}");

    let st = d.json(&["service", "update", "t-pkg", v3.to_str().unwrap(), "--json"]);
    assert_eq!(st["package_version"], "3.0.0");
    assert_eq!(in_container(&d, "cat /srv/version"), "3.0.0");
    let st = d.json(&["service", "rollback", "t-pkg", "--json"]);
    assert_eq!(
        (st["package_version"].as_str(), st["state"].as_str()),
        (Some("1.0.0"), Some("running"))
    );
    assert_eq!(in_container(&d, "cat /srv/version"), "1.0.0");
    // What the update workers prepared was used or cleaned up.
    let left: Vec<_> = std::fs::read_dir(d.state_dir().join("services"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Bytes on disk under `root`, its own filesystem only (a mounted overlay is not counted
/// again), each hard-linked file once.
fn disk_usage(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(root).unwrap().dev();
    let mut seen = std::collections::HashSet::new();
    let (mut total, mut stack) = (0, vec![root.to_path_buf()]);
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.dev() != dev || !seen.insert(m.ino()) {
                continue;
            }
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

fn mounted_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&*dir.to_string_lossy()))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_packaged_container_is_on_disk_once_and_writes_only_its_own_layer() {
    if !need_root("a_packaged_container_is_on_disk_once_and_writes_only_its_own_layer") {
        return;
    }
    let d = Daemon::start_with_keys();
    let key = publisher(&d, "operator", true);
    let dir = d.looping_service("t-pkg", "1.0.0", "");
    std::fs::create_dir_all(dir.join("files/srv")).unwrap();
    std::fs::write(dir.join("files/srv/version"), "1.0.0").unwrap();
    // 16 MiB that no filesystem compresses.
    let mut payload = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::open("/dev/urandom").unwrap(), 16 << 20),
        &mut payload,
    )
    .unwrap();
    std::fs::write(dir.join("files/srv/payload"), &payload).unwrap();
    let pkg = d.build_package(&dir, &key, "t-pkg-1.0.0.gvpkg");
    d.install_package_started(&pkg);

    let state = d.state_dir();
    let tree = state.join("images/services/t-pkg/1.0.0/rootfs");
    let unpacked = disk_usage(&tree);
    assert!(unpacked >= 16 << 20, "{unpacked}");
    let used = disk_usage(&state);
    assert!(
        used < unpacked + unpacked / 8,
        "the state directory takes {used} bytes for a tree of {unpacked}"
    );
    assert_eq!(in_container(&d, "wc -c < /srv/payload").trim(), "16777216");

    // What the service writes is its own: the store's tree stays as it was signed.
    in_container(&d, "echo changed > /srv/version; echo new > /etc/written");
    assert_eq!(in_container(&d, "cat /srv/version"), "changed\n");
    assert_eq!(
        std::fs::read_to_string(tree.join("srv/version")).unwrap(),
        "1.0.0"
    );
    assert!(!tree.join("etc/written").exists());

    // A reboot takes the mount away; the next start puts it back, with what it wrote.
    d.json(&["service", "stop", "t-pkg", "--json"]);
    let svc = state.join("services/t-pkg");
    gatevisor_images::checkout::Checkout::at(&svc)
        .unmount()
        .unwrap();
    assert!(mounted_under(&svc).is_empty());
    let st = d.json(&["service", "start", "t-pkg", "--json"]);
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(in_container(&d, "cat /etc/written"), "new\n");
    assert_eq!(in_container(&d, "cat /srv/version"), "changed\n");

    // Removed: no mount and no layer left behind.
    d.json(&["service", "stop", "t-pkg", "--json"]);
    d.json(&["service", "remove", "t-pkg", "--json"]);
    assert!(mounted_under(&svc).is_empty(), "{:?}", mounted_under(&svc));
    assert!(!svc.exists());
    assert!(!state.join("images/services/t-pkg").exists());
}
