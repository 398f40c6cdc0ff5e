//! The trust boundary through the real daemon: hostile packages and manifests are refused at
//! install with the field named, the store and the host unchanged; what a service owned goes
//! with it; secrets and diagnostics stay private. Needs root (liblxc); CI runs as root.

mod common;
use common::*;
#[path = "../images/tests/common/forge.rs"]
mod forge;
use gatevisor_images::keys::{SecretKey, TrustStore};
use gatevisor_images::package::{self, ArtifactKind};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A publisher key named `name`, trusted by the daemon's key store.
fn trusted_key(d: &Daemon, name: &str) -> SecretKey {
    let key = SecretKey::generate().unwrap();
    let public = key
        .save(&d.dir.path().join(format!("{name}.key")), name)
        .unwrap();
    TrustStore::new(&d.dir.path().join("keys"))
        .trust(&public)
        .unwrap();
    key
}

/// A package made by hand (as an attacker would, without the builder's checks): the package
/// manifest says `name`/`version`, its service.toml is `service`, its rootfs holds
/// `srv/content`.
fn crafted(
    d: &Daemon,
    key: &SecretKey,
    name: &str,
    version: &str,
    service: &str,
    content: &str,
) -> PathBuf {
    let src = tempfile::tempdir().unwrap();
    gatevisor_lxc::rootfs::build_busybox(Path::new("/bin/busybox"), src.path()).unwrap();
    std::fs::create_dir_all(src.path().join("srv")).unwrap();
    std::fs::write(src.path().join("srv/content"), content).unwrap();
    let mut rootfs = Vec::new();
    gatevisor_images::rootfs::pack(src.path(), &mut rootfs).unwrap();
    let mut out = Vec::new();
    package::build(
        name,
        version,
        &[
            ("service.toml", ArtifactKind::Service, service.as_bytes()),
            ("rootfs.tar", ArtifactKind::Rootfs, &rootfs),
        ],
        key,
        &mut out,
    )
    .unwrap();
    let p = d
        .dir
        .path()
        .join(format!("{name}-{version}-{}.gvpkg", unique()));
    std::fs::write(&p, out).unwrap();
    p
}

/// A daemon with its own key store and `config`, without a switch (these tests steer
/// nothing; several private switches starting at once only slow each other down).
fn daemon(config: &str) -> Daemon {
    Daemon::start_with_config_args(config, &["--no-network"])
}

/// [`crafted`] for the usual case: one name for the package and its service, version 1.0.0,
/// `extra` top-level lines in its service.toml.
fn packaged(d: &Daemon, key: &SecretKey, name: &str, extra: &str, content: &str) -> PathBuf {
    crafted(
        d,
        key,
        name,
        "1.0.0",
        &service_toml(name, "1.0.0", extra),
        content,
    )
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Every path under `root` with its size, mode and content digest: what must not change.
fn fingerprint(root: &Path) -> Vec<(String, u64, u32, String)> {
    let mut v = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            }
            let digest = if m.is_file() {
                package::sha256_hex(&std::fs::read(e.path()).unwrap_or_default())
            } else {
                String::new()
            };
            v.push((
                e.path().strip_prefix(root).unwrap().display().to_string(),
                m.len(),
                m.mode(),
                digest,
            ));
        }
    }
    v.sort();
    v
}

/// The parts of the state directory an install writes: the image store and the services.
fn store_print(d: &Daemon) -> Vec<(String, u64, u32, String)> {
    let mut v = fingerprint(&d.state_dir().join("images"));
    v.extend(fingerprint(&d.state_dir().join("services")));
    v
}

/// Installs `file`, expects exit code `code`, and returns stderr.
fn refused(d: &Daemon, file: &Path, code: i32) -> String {
    let before = store_print(d);
    let out = d.cli(&["service", "install", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert_eq!(
        store_print(d),
        before,
        "a refused install changed the store: {err}"
    );
    err
}

fn events(d: &Daemon) -> String {
    String::from_utf8_lossy(&d.cli(&["events", "--json", "-n", "100"]).stdout).into_owned()
}

#[test]
fn a_packaged_service_runs_its_packages_image_only() {
    if !need_root("a_packaged_service_runs_its_packages_image_only") {
        return;
    }
    let d = daemon("");
    let key = trusted_key(&d, "acme");
    let svc = service_toml("t-host", "1.0.0", "")
        .replace("image = \"package\"", "image = \"rootfs:/etc\"");
    let pkg = crafted(&d, &key, "t-host", "1.0.0", &svc, "x");
    let err = refused(&d, &pkg, 5);
    assert!(err.contains("`image`") && err.contains("package"), "{err}");
    assert!(
        !err.contains(".gvbuild") && !err.contains("/tmp/install-"),
        "{err}"
    );
    assert!(events(&d).contains("\"refused\""), "no refusal event");
}

#[test]
fn capabilities_beyond_the_policy_are_refused_at_install() {
    if !need_root("capabilities_beyond_the_policy_are_refused_at_install") {
        return;
    }
    let d = daemon("");
    let key = trusted_key(&d, "acme");
    let svc = service_toml(
        "t-caps",
        "1.0.0",
        "capabilities = [\"NET_RAW\", \"SYS_ADMIN\", \"SYS_MODULE\"]",
    );
    let pkg = crafted(&d, &key, "t-caps", "1.0.0", &svc, "x");
    let err = refused(&d, &pkg, 8);
    assert!(
        err.contains("SYS_ADMIN") && err.contains("acme") && err.contains("capabilities"),
        "{err}"
    );
    // A local manifest gets the same policy.
    let local = d.manifest(
        "caps.toml",
        &manifest_text("t-capl", "sleep 100", "").replace(
            "[resources]",
            "capabilities = [\"DAC_READ_SEARCH\"]\n[resources]",
        ),
    );
    let err = refused(&d, &local, 8);
    assert!(
        err.contains("DAC_READ_SEARCH") && err.contains("local"),
        "{err}"
    );
    let ev = events(&d);
    assert!(ev.matches("\"refused\"").count() >= 2, "{ev}");

    // The operator grants it to this publisher: then it installs, and keeps the capability.
    let granted =
        daemon("[policy.publishers.acme]\ncapabilities = [\"SYS_ADMIN\", \"SYS_MODULE\"]\n");
    let key = trusted_key(&granted, "acme");
    let pkg = crafted(&granted, &key, "t-caps", "1.0.0", &svc, "x");
    let out = granted.cli(&["service", "install", pkg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn store_names_cannot_be_confused_and_remove_takes_what_the_service_owned() {
    if !need_root("store_names_cannot_be_confused_and_remove_takes_what_the_service_owned") {
        return;
    }
    let d = daemon("");
    let key = trusted_key(&d, "acme");
    // The package says one name, its service.toml another.
    let pkg = crafted(
        &d,
        &key,
        "t-outer",
        "1.0.0",
        &service_toml("t-inner", "1.0.0", ""),
        "x",
    );
    let err = refused(&d, &pkg, 5);
    assert!(
        err.contains("`name`") && err.contains("t-inner") && err.contains("t-outer"),
        "{err}"
    );

    // A running service, then a refused reinstall of the same package: the service and its
    // store entry stay.
    let good = packaged(&d, &key, "t-keep", "", "first");
    d.json(&[
        "service",
        "install",
        good.to_str().unwrap(),
        "--start",
        "--json",
    ]);
    let current = d.state_dir().join("images/services/t-keep/current");
    assert!(current.exists());
    let out = d.cli(&["service", "install", good.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        current.exists(),
        "a refused reinstall removed the store entry"
    );
    assert_eq!(d.status("t-keep")["state"], "running");
    let read = || {
        let out = d.cli(&["service", "exec", "t-keep", "--", "cat", "/srv/content"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(read(), "first");

    // remove takes the store entry, its blobs and its logs; the same name and version
    // installed again is the new package's content.
    d.json(&["service", "remove", "t-keep", "--json"]);
    assert!(!d.state_dir().join("images/services/t-keep").exists());
    assert_eq!(
        std::fs::read_dir(d.state_dir().join("images/blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
    assert!(!d.state_dir().join("logs/t-keep.log").exists());
    let again = packaged(&d, &key, "t-keep", "", "second");
    d.json(&[
        "service",
        "install",
        again.to_str().unwrap(),
        "--start",
        "--json",
    ]);
    assert_eq!(read(), "second");
}

#[test]
fn a_fifo_and_a_huge_manifest_are_refused_at_once() {
    if !need_root("a_fifo_and_a_huge_manifest_are_refused_at_once") {
        return;
    }
    let d = daemon("");
    let fifo = d.dir.path().join("pipe.gvpkg");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let t = Instant::now();
    let err = refused(&d, &fifo, 5);
    assert!(err.contains("FIFO"), "{err}");
    let fifo_toml = d.dir.path().join("pipe.toml");
    nix::unistd::mkfifo(&fifo_toml, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let err = refused(&d, &fifo_toml, 5);
    assert!(err.contains("FIFO"), "{err}");
    // 1 GiB (sparse): refused after reading 64 KiB.
    let huge = d.dir.path().join("huge.toml");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let err = refused(&d, &huge, 5);
    assert!(err.contains("at most 65536 bytes"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    assert!(d.cli(&["service", "list"]).status.success());
}

#[test]
fn a_file_is_a_package_by_its_content_and_a_gvpkg_is_never_read_as_a_manifest() {
    if !need_root("a_file_is_a_package_by_its_content_and_a_gvpkg_is_never_read_as_a_manifest") {
        return;
    }
    let d = daemon("");
    // An unsigned manifest dressed as a package: verified as one, so refused.
    let sneaky = d.dir.path().join("sneaky.gvpkg");
    std::fs::write(&sneaky, manifest_text("t-sneak", "sleep 100", "")).unwrap();
    let err = refused(&d, &sneaky, 5);
    assert!(err.contains("not a valid archive"), "{err}");
    // A package from an untrusted publisher dressed as a manifest: verified all the same.
    let stranger = SecretKey::generate().unwrap();
    let pkg = packaged(&d, &stranger, "t-dressed", "", "x");
    let dressed = d.dir.path().join("innocent.toml");
    std::fs::rename(&pkg, &dressed).unwrap();
    let err = refused(&d, &dressed, 5);
    assert!(err.contains("does not trust"), "{err}");
    // Sent to the daemon as a manifest (not through the CLI), either is refused unread.
    for file in [&sneaky, &dressed] {
        let e = gatevisor::client::Client::new(&d.socket())
            .call(&gatevisor::api::Request::Install {
                manifest: file.clone(),
                start: true,
                runtime: None,
            })
            .unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(&e, gatevisor::client::ClientError::Api(a) if a.kind == gatevisor::api::ErrorKind::Invalid)
                && text.contains("is a signed package, not a service manifest"),
            "{text}"
        );
    }
    let list = d.json(&["service", "list", "--json"]);
    assert!(list["services"].as_array().unwrap().is_empty(), "{list}");
}

#[test]
fn local_images_come_only_from_configured_roots() {
    if !need_root("local_images_come_only_from_configured_roots") {
        return;
    }
    let roots = tempfile::tempdir().unwrap();
    let root = roots.path().join("images");
    let tree = root.join("ok");
    gatevisor_lxc::rootfs::build_busybox(Path::new("/bin/busybox"), &tree).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("etc-link")).unwrap();
    let d = daemon(&format!(
        "image_roots = [{:?}]\n",
        root.display().to_string()
    ));
    let with_image = |file: &str, image: &str| {
        d.manifest(
            file,
            &manifest_text("t-local", "sleep 100", "").replace("builtin:busybox", image),
        )
    };
    let host_before = fingerprint(Path::new("/etc/ssh")).len();
    for (file, image) in [
        ("etc.toml", "rootfs:/etc".to_string()),
        ("root.toml", "rootfs:/".to_string()),
        (
            "climb.toml",
            format!("rootfs:{}/ok/../../..", root.display()),
        ),
        ("link.toml", format!("rootfs:{}/etc-link", root.display())),
    ] {
        let err = refused(&d, &with_image(file, &image), 8);
        assert!(err.contains("`image`"), "{image}: {err}");
    }
    assert!(fingerprint(&d.state_dir())
        .iter()
        .all(|(p, ..)| !p.ends_with("shadow")));
    assert_eq!(fingerprint(Path::new("/etc/ssh")).len(), host_before);
    let ok = with_image("ok.toml", &format!("rootfs:{}", tree.display()));
    let out = d.cli(&["service", "install", ok.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The configuration itself: never /, never a root holding the state directory.
    for (bad, what) in [("/", "must not be /"), ("ROOT", "hold the state directory")] {
        let dir = tempfile::tempdir().unwrap();
        let bad = bad.replace("ROOT", &dir.path().display().to_string());
        std::fs::write(
            dir.path().join("c.toml"),
            format!("image_roots = [{bad:?}]\n"),
        )
        .unwrap();
        let out = std::process::Command::new(BIN)
            .args(["daemon", "--state-dir"])
            .arg(dir.path().join("state"))
            .arg("--socket")
            .arg(dir.path().join("s.sock"))
            .arg("--config")
            .arg(dir.path().join("c.toml"))
            .arg("--no-network")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("image_roots") && err.contains(what),
            "{err}"
        );
    }
}

#[test]
fn secrets_stay_private_and_diagnostics_quote_nothing() {
    if !need_root("secrets_stay_private_and_diagnostics_quote_nothing") {
        return;
    }
    let d = daemon("");
    let m = d.manifest(
        "env.toml",
        &manifest_text("t-env", "sleep 100", "")
            .replace("[resources]", "[env]\nAPI_TOKEN = \"s3cr3t\"\n[resources]"),
    );
    d.json(&["service", "install", m.to_str().unwrap(), "--json"]);
    let state = std::fs::metadata(d.state_dir().join("state.json")).unwrap();
    assert_eq!(state.mode() & 0o777, 0o600);
    // Others may pass through to a container's root, but list and read nothing.
    for (dir, closed) in [("logs", 0o077), ("lxc", 0o066)] {
        let m = std::fs::metadata(d.state_dir().join(dir)).unwrap();
        assert_eq!(m.mode() & closed, 0, "{dir} is readable by others");
    }
    let config = std::fs::metadata(d.state_dir().join("lxc/t-env/config")).unwrap();
    assert_eq!(
        config.mode() & 0o004,
        0,
        "the container's configuration holds its env"
    );
    // A secret named as a manifest: the error says where it failed, not what the file says.
    let secret = d.dir.path().join("shadow");
    std::fs::write(&secret, "root:$6$VERYSECRETHASH:19000:0:99999:7:::\n").unwrap();
    let err = refused(&d, &secret, 5);
    assert!(
        err.contains("line 1") && !err.contains("VERYSECRETHASH"),
        "{err}"
    );
    let ev = events(&d);
    assert!(
        ev.contains("\"refused\"") && !ev.contains("VERYSECRETHASH"),
        "{ev}"
    );
    assert!(!d.log().contains("VERYSECRETHASH"));
    // The OS's reason is kept.
    let err = refused(&d, &d.dir.path().join("missing.toml"), 5);
    assert!(err.contains("No such file"), "{err}");

    // Another user: "permission denied", not "not running".
    let out = std::process::Command::new(BIN)
        .args(["service", "list"])
        .env("GATEVISOR_SOCKET", d.socket())
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    assert_eq!(out.status.code(), Some(8));

    // A reader that goes away ends the CLI quietly.
    let mut child = std::process::Command::new(BIN)
        .args(["events", "-f"])
        .env("GATEVISOR_SOCKET", d.socket())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    std::thread::sleep(Duration::from_millis(300));
    // More events for it to print into the closed pipe.
    let _ = d.cli(&["service", "start", "t-env"]);
    let _ = d.cli(&["service", "stop", "t-env"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the CLI kept running");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert!(
        status.success() || status.signal() == Some(libc::SIGPIPE),
        "{status:?}: {err}"
    );
}

#[test]
fn a_default_container_cannot_load_a_module_mount_or_read_a_host_file() {
    if !need_ovs("a_default_container_cannot_load_a_module_mount_or_read_a_host_file") {
        return;
    }
    // The operator grants SYS_MODULE to local manifests: inside a user namespace it is still
    // no way to the host's kernel.
    let d = Daemon::start_with_config("[policy.local]\ncapabilities = [\"SYS_MODULE\"]\n");
    let svc = |name: &str, caps: &str| {
        let text = manifest_text(name, "sleep 1000", "").replace(
            "[resources]",
            &format!("capabilities = [{caps}]\n[network]\nsteering = [{{ kind = \"dns\" }}]\n[resources]"),
        );
        d.install_started(&format!("{name}.toml"), &text)
    };
    svc("t-plain", "");
    svc("t-mod", "\"SYS_MODULE\"");
    // A host file in a directory the container sees (its verdict socket's, bind-mounted).
    let secret = d.state_dir().join("run/t-plain/host-secret");
    std::fs::write(&secret, "host only").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let inside = |name: &str, cmd: &str| {
        let out = d.cli(&["service", "exec", name, "--", "sh", "-c", cmd]);
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (_, map) = inside("t-plain", "cat /proc/self/uid_map");
    eprintln!("uid_map inside: {map}");
    let fields: Vec<&str> = map.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"0"), "{map}");
    assert_ne!(
        fields.get(1),
        Some(&"0"),
        "root inside is root outside: {map}"
    );
    let (code, out) = inside("t-plain", "cat /run/gatevisor/host-secret");
    assert_ne!(code, Some(0), "read a host file: {out}");
    assert!(!out.contains("host only"));
    let (code, out) = inside("t-plain", "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m");
    assert_ne!(code, Some(0), "mounted: {out}");
    for name in ["t-plain", "t-mod"] {
        let (code, out) = inside(name, "echo junk > /tmp/x.ko && insmod /tmp/x.ko");
        assert_ne!(code, Some(0), "{name} loaded a module: {out}");
        assert!(out.contains("not permitted"), "{name}: {out}");
        eprintln!("{name}: insmod: {out}");
    }
    let (_, caps) = inside("t-mod", "grep CapEff /proc/self/status");
    assert!(
        !caps.contains("0000000000000000"),
        "SYS_MODULE was kept inside: {caps}"
    );
}

#[test]
fn a_key_a_running_container_writes_into_its_root_is_never_trusted() {
    if !need_root("a_key_a_running_container_writes_into_its_root_is_never_trusted") {
        return;
    }
    let d = daemon("");
    let key = trusted_key(&d, "acme");
    let good = packaged(&d, &key, "t-writer", "", "x");
    d.json(&[
        "service",
        "install",
        good.to_str().unwrap(),
        "--start",
        "--json",
    ]);
    // The service makes a key pair of its own and leaves the public half in its root.
    let evil = SecretKey::generate().unwrap();
    let line = gatevisor_images::keys::public_line(&evil.public(), "evil");
    let out = d.cli(&[
        "service",
        "exec",
        "t-writer",
        "--",
        "sh",
        "-c",
        &format!("printf '%s' '{}' > /evil.pub", line.trim()),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let planted = d.state_dir().join("services/t-writer/rootfs/evil.pub");
    assert!(planted.is_file());
    // A package signed with it, naming the planted file by a path from the trust store.
    let signed = packaged(&d, &evil, "t-evil", "capabilities = [\"SYS_ADMIN\"]", "x");
    let rel = format!(
        "../../{}/services/t-writer/rootfs/evil",
        pathdiff(&d.state_dir(), &d.dir.path().join("keys"))
    );
    let forged = forge_key_id(&signed, &rel);
    let err = refused(&d, &forged, 5);
    assert!(err.contains("key id"), "{err}");
    let err = refused(&d, &signed, 5);
    assert!(err.contains("does not trust"), "{err}");
}

/// `to` relative to `from`'s parent, for the two sibling directories of these tests.
fn pathdiff(to: &Path, from: &Path) -> String {
    let base = from.parent().unwrap();
    to.strip_prefix(base).unwrap().display().to_string()
}

/// The package at `pkg` with `manifest.sig` naming `id`.
fn forge_key_id(pkg: &Path, id: &str) -> PathBuf {
    let out = pkg.with_extension("forged.gvpkg");
    std::fs::write(
        &out,
        forge::with_signature_id(&std::fs::read(pkg).unwrap(), id),
    )
    .unwrap();
    out
}
