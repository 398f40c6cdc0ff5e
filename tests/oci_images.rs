//! Services from unchanged OCI images, through a real daemon and the real CLI: an image built
//! by umoci (FROM scratch: a static busybox, its own /etc/passwd, an upper layer that deletes
//! a file of the base), signed by the operator with `gatevisor image sign`, pulled from an OCI
//! layout and from a docker archive made by skopeo, installed with a manifest that gives only
//! what the image does not, and run by liblxc: its entrypoint, environment, working directory
//! and user are the image's, its whiteouts hold, it writes its own layer and never the store,
//! and two services of the same image share its layers. The same image pushed by skopeo to a
//! real registry (TLS, basic auth) is signed, pulled and run through the daemon's
//! `[registries]` configuration, and installed by a USP Controller from its registry reference
//! and from an archive URL with the operator's deployment document. Needs root, liblxc, umoci
//! and skopeo (and docker-registry, mosquitto).

mod common;
#[path = "../images/tests/common/registry.rs"]
#[allow(dead_code)]
mod registry;
#[path = "common/usp_peer.rs"]
mod usp_peer;
use common::*;
use gatevisor_images::oci::store::disk_usage;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn tools(test: &str) -> bool {
    if !need_root(test) {
        return false;
    }
    for t in ["umoci", "skopeo"] {
        if !on_path(t) {
            eprintln!("skipped {test}: {t} is not installed (scripts/setup.sh installs it)");
            return false;
        }
    }
    true
}

fn sh(dir: &Path, script: &str) {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds image `L:app` in the daemon's test directory: a base layer (busybox, passwd with
/// user `app` 1000:1000, /srv owned by it, /etc/old), an upper layer deleting /etc/old; its
/// config runs a report as `app` in /srv.
fn build_image(d: &Daemon) {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static");
    let report = "echo \"uid=$(id -u) gid=$(id -g) cwd=$(pwd) foo=$FOO\"; \
                  if [ -e /etc/old ]; then echo old-present; else echo old-gone; fi; \
                  echo hi > /srv/written && echo wrote; exec sleep 1000";
    sh(
        d.dir.path(),
        &format!(
            "umoci init --layout L
             umoci new --image L:app
             umoci unpack --image L:app B >/dev/null
             mkdir -p B/rootfs/bin B/rootfs/etc B/rootfs/srv B/rootfs/tmp
             cp {busybox} B/rootfs/bin/busybox
             for a in sh id cat ls sleep pwd touch; do ln -s busybox B/rootfs/bin/$a; done
             printf 'root:x:0:0:root:/root:/bin/sh\\napp:x:1000:1000:app:/srv:/bin/sh\\n' > B/rootfs/etc/passwd
             printf 'root:x:0:\\napp:x:1000:\\n' > B/rootfs/etc/group
             echo old > B/rootfs/etc/old
             chown 1000:1000 B/rootfs/srv
             umoci repack --image L:app B
             umoci unpack --image L:app C >/dev/null
             rm C/rootfs/etc/old
             umoci repack --image L:app C
             umoci config --image L:app --config.entrypoint /bin/sh --config.cmd -c \
               --config.cmd '{report}' --config.user app --config.workingdir /srv \
               --config.env FOO=from-image --config.label org.opencontainers.image.vendor=acme"
        ),
    );
}

/// The operator's key, trusted by the daemon; the image signed with it by the CLI.
fn sign(d: &Daemon, reference: &str, out: &str) -> String {
    let key = d.dir.path().join("op.key");
    if !key.exists() {
        let k = key.to_str().unwrap();
        assert!(d
            .cli(&["key", "gen", "--out", k, "--name", "operator"])
            .status
            .success());
        let keys = d.dir.path().join("keys");
        let trust = d.cli(&[
            "key",
            "trust",
            key.with_extension("pub").to_str().unwrap(),
            "--keys-dir",
            keys.to_str().unwrap(),
        ]);
        assert!(trust.status.success());
    }
    let sig = d.dir.path().join(out);
    let o = d.cli(&[
        "image",
        "sign",
        reference,
        "--key",
        key.to_str().unwrap(),
        "--out",
        sig.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    sig.display().to_string()
}

const MANIFEST: &str = r#"name = "NAME"
version = "1.0.0"
runtime = "auto"
stop_timeout_s = 2
[resources]
memory_mib = 32
pids = 32
[network]
interface = false
"#;

fn log_of(d: &Daemon, name: &str) -> String {
    String::from_utf8_lossy(&d.cli(&["service", "logs", name]).stdout).into_owned()
}

/// The image's report in service `name`'s log, once it wrote its file.
fn report(d: &Daemon, name: &str) -> String {
    d.wait_for(Duration::from_secs(10), || {
        let l = log_of(d, name);
        l.contains("wrote").then_some(l)
    })
    .unwrap_or_else(|| panic!("no report: {}", log_of(d, name)))
}

#[test]
fn an_unchanged_image_runs_as_its_user_with_its_layers_shared_and_never_written() {
    let test = "an_unchanged_image_runs_as_its_user_with_its_layers_shared_and_never_written";
    if !tools(test) {
        return;
    }
    let d = Daemon::start_with_keys();
    build_image(&d);
    let layout = format!("oci:{}:app", d.dir.path().join("L").display());
    let sig = sign(&d, &layout, "app.sig");

    // Not signed for this image: refused, nothing stored.
    let other = d.dir.path().join("other.sig");
    std::fs::write(
        &other,
        std::fs::read_to_string(&sig)
            .unwrap()
            .replace("signature = \"", "signature = \"00"),
    )
    .unwrap();
    let o = d.cli(&[
        "image",
        "pull",
        &layout,
        "--signature",
        other.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(d.json(&["image", "list", "--json"])["images"]
        .as_array()
        .unwrap()
        .is_empty());

    let pulled = d.json(&["image", "pull", &layout, "--signature", &sig, "--json"]);
    assert_eq!(
        (
            pulled["layers_added"].as_u64(),
            pulled["layers_shared"].as_u64()
        ),
        (Some(2), Some(0))
    );
    assert_eq!(pulled["publisher"], "operator");
    assert_eq!(pulled["labels"]["org.opencontainers.image.vendor"], "acme");
    let digest = pulled["digest"].as_str().unwrap().to_string();
    let store = d.state_dir().join("images/oci");
    let store_bytes = disk_usage(&store);

    // The manifest gives no image and no command: both are the image's.
    let m = d.manifest("a.toml", &MANIFEST.replace("NAME", "oci-a"));
    let st = d.json(&[
        "service",
        "install",
        m.to_str().unwrap(),
        "--image",
        &digest[..19],
        "--start",
        "--json",
    ]);
    assert_eq!(
        (st["state"].as_str(), st["runtime"].as_str()),
        (Some("running"), Some("lxc")),
        "{st}"
    );
    assert_eq!(
        (st["image"].as_str(), st["user"].as_str()),
        (Some(digest.as_str()), Some("1000:1000")),
        "{st}"
    );
    let out = report(&d, "oci-a");
    assert!(
        out.contains("uid=1000 gid=1000 cwd=/srv foo=from-image"),
        "{out}"
    );
    assert!(
        out.contains("old-gone"),
        "the upper layer's whiteout: {out}"
    );

    // What it wrote is in its own layer; the store is as it was.
    let upper = d.state_dir().join("services/oci-a/layer/upper/srv/written");
    assert_eq!(std::fs::read_to_string(&upper).unwrap(), "hi\n");
    assert_eq!(disk_usage(&store), store_bytes, "the store was written to");

    // The same image from a docker archive made by skopeo: a second service on the same
    // layers stores nothing new.
    let archive = d.dir.path().join("app.tar");
    let a = format!("docker-archive:{}:gv/app:1", archive.display());
    let out = Command::new("skopeo")
        .args(["copy", "-q", &layout, &a])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sig2 = sign(&d, &a, "app-docker.sig");
    let m2 = d.manifest(
        "b.toml",
        &MANIFEST.replace("NAME", "oci-b").replace(
            "stop_timeout_s = 2\n",
            "stop_timeout_s = 2\nuser = \"1000:1000\"\nenv = { FOO = \"from-manifest\" }\n",
        ),
    );
    let o = d.cli(&[
        "service",
        "install",
        m2.to_str().unwrap(),
        "--image",
        &a,
        "--signature",
        &sig2,
        "--start",
    ]);
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stderr),
        d.log()
    );
    let out = report(&d, "oci-b");
    assert!(
        out.contains("foo=from-manifest"),
        "the manifest wins: {out}"
    );
    let images = d.json(&["image", "list", "--json"]);
    let images = images["images"].as_array().unwrap();
    assert_eq!(images.len(), 2, "{images:?}");
    let layers = std::fs::read_dir(store.join("layers")).unwrap().count();
    assert_eq!(layers, 2, "one copy of each layer");

    // An image a service runs cannot be removed; once its services are gone, it can.
    let o = d.cli(&["image", "rm", &digest]);
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("oci-a"));
    for n in ["oci-a", "oci-b"] {
        assert!(d.cli(&["service", "remove", n]).status.success());
    }
    let rm = d.json(&["image", "rm", &digest, "--json"]);
    assert_eq!(
        rm["layers_freed"], 0,
        "the docker archive's image still has them"
    );
    let docker = images
        .iter()
        .find(|i| i["digest"] != digest.as_str())
        .unwrap();
    let rm = d.json(&["image", "rm", docker["digest"].as_str().unwrap(), "--json"]);
    assert_eq!(rm["layers_freed"], 2);
    assert_eq!(std::fs::read_dir(store.join("layers")).unwrap().count(), 0);
}

#[test]
fn setuid_files_in_an_image_need_the_operators_grant_to_its_publisher() {
    let test = "setuid_files_in_an_image_need_the_operators_grant_to_its_publisher";
    if !tools(test) {
        return;
    }
    for granted in [false, true] {
        let config = if granted {
            "[policy.publishers.operator]\nsetuid = true\n"
        } else {
            ""
        };
        let d = Daemon::start_with_config(config);
        sh(
            d.dir.path(),
            "umoci init --layout L
             umoci new --image L:suid
             umoci unpack --image L:suid B >/dev/null
             mkdir -p B/rootfs/bin && cp /bin/true B/rootfs/bin/su && chmod 4755 B/rootfs/bin/su
             umoci repack --image L:suid B",
        );
        let r = format!("oci:{}:suid", d.dir.path().join("L").display());
        let sig = sign(&d, &r, "suid.sig");
        let o = d.cli(&["image", "pull", &r, "--signature", &sig]);
        let e = String::from_utf8_lossy(&o.stderr);
        if granted {
            assert!(o.status.success(), "{e}");
        } else {
            assert_eq!(o.status.code(), Some(8), "{e}");
            assert!(e.contains("bin/su") && e.contains("setuid"), "{e}");
            assert_eq!(
                std::fs::read_dir(d.state_dir().join("images/oci/layers"))
                    .unwrap()
                    .count(),
                0
            );
        }
    }
}

/// A registry with basic auth under `dir`, and the daemon's `[registries."HOST"]` section
/// for it (ca, username, password_file; last in the text, so that keys can follow), and the
/// CA and password files themselves.
fn registry_with_access(dir: &Path) -> (registry::Registry, String, PathBuf, PathBuf) {
    let reg = registry::Registry::start(dir);
    let access = reg.access(Some(registry::PASSWORD));
    let a = &access.hosts[&reg.host];
    let (ca, password_file) = (a.ca.clone().unwrap(), a.password_file.clone().unwrap());
    let section = format!(
        "[registries.\"{}\"]\nca = {ca:?}\nusername = {:?}\npassword_file = {password_file:?}\n",
        reg.host,
        registry::USER,
    );
    (reg, section, ca, password_file)
}

#[test]
fn an_image_in_a_registry_is_signed_pulled_and_run_with_the_daemons_registry_access() {
    let test = "an_image_in_a_registry_is_signed_pulled_and_run_with_the_daemons_registry_access";
    if !tools(test) {
        return;
    }
    if let Some(t) = registry::missing_tool() {
        eprintln!("skipped {test}: {t} is not installed (scripts/setup.sh installs it)");
        return;
    }
    let regdir = tempfile::tempdir().unwrap();
    let (reg, access, ca, password_file) = registry_with_access(regdir.path());
    let d = Daemon::start_with_config(&access);
    build_image(&d);
    reg.push(
        &format!("oci:{}:app", d.dir.path().join("L").display()),
        "vendor/app:1.0",
    );
    let r = reg.reference("vendor/app:1.0");

    // The operator signs what the registry serves, reaching it with its own CA and user.
    let key = d.dir.path().join("op.key");
    sign(
        &d,
        &format!("oci:{}:app", d.dir.path().join("L").display()),
        "layout.sig",
    );
    let sig = d.dir.path().join("app.sig");
    let o = d.cli(&[
        "image",
        "sign",
        &r,
        "--key",
        key.to_str().unwrap(),
        "--out",
        sig.to_str().unwrap(),
        "--registry-ca",
        ca.to_str().unwrap(),
        "--username",
        registry::USER,
        "--password-file",
        password_file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let pulled = d.json(&[
        "image",
        "pull",
        &r,
        "--signature",
        sig.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(pulled["layers_added"].as_u64(), Some(2), "{pulled}");
    assert_eq!(pulled["references"][0], r.as_str());
    let m = d.manifest("reg.toml", &MANIFEST.replace("NAME", "oci-reg"));
    let st = d.json(&[
        "service",
        "install",
        m.to_str().unwrap(),
        "--image",
        &r,
        "--start",
        "--json",
    ]);
    assert_eq!(st["state"].as_str(), Some("running"), "{st}");
    let rep = report(&d, "oci-reg");
    assert!(
        rep.contains("uid=1000 gid=1000 cwd=/srv foo=from-image") && rep.contains("old-gone"),
        "{rep}"
    );
    // A reference whose registry the daemon has no access for: refused with the reason.
    let other = r.replace("vendor/app", "vendor/none");
    let o = d.cli(&[
        "image",
        "pull",
        &other,
        "--signature",
        sig.to_str().unwrap(),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{e}");
    assert!(e.contains("manifest unknown"), "{e}");
    assert!(d.cli(&["service", "stop", "oci-reg"]).status.success());
    assert!(d.cli(&["service", "remove", "oci-reg"]).status.success());
}

/// Signs `reference` for the daemon's trusted key with `manifest` in a deployment document at
/// `out`; answers the digest signed.
fn sign_deployment(
    d: &Daemon,
    reference: &str,
    manifest: &Path,
    out: &Path,
    access: &[&str],
) -> String {
    let key = d.dir.path().join("op.key");
    let mut args = vec![
        "image",
        "sign",
        reference,
        "--key",
        key.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--service",
        manifest.to_str().unwrap(),
    ];
    args.extend_from_slice(access);
    let o = d.cli(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // "signed sha256:HEX -> OUT"
    let said = String::from_utf8_lossy(&o.stdout).into_owned();
    said.split_whitespace().nth(1).unwrap().to_string()
}

#[test]
fn a_controller_installs_images_by_reference_and_by_archive_url_with_the_operators_deployment_document(
) {
    use usp_peer::*;
    let test = "a_controller_installs_images_by_reference_and_by_archive_url_with_the_operators_deployment_document";
    if !tools(test) {
        return;
    }
    if let Some(t) = registry::missing_tool()
        .or_else(|| (!on_path("mosquitto")).then_some("mosquitto"))
        .or_else(|| (!on_path("python3")).then_some("python3"))
    {
        eprintln!("skipped {test}: {t} is not installed (scripts/setup.sh installs it)");
        return;
    }
    let regdir = tempfile::tempdir().unwrap();
    let (reg, access, ca, password_file) = registry_with_access(regdir.path());
    // The operator's web server: deployment documents (lookaside layout) and archives.
    let web = tempfile::tempdir().unwrap();
    let (_web, web_port) = http_server(web.path());
    let (_mq, mq_port) = mosquitto(regdir.path());
    let d = Daemon::start_with_config(&format!(
        "{}{access}signatures = \"http://127.0.0.1:{web_port}/sigs\"\n",
        agent_config(mq_port),
    ));
    build_image(&d);
    let layout = format!("oci:{}:app", d.dir.path().join("L").display());
    sh(
        d.dir.path(),
        "umoci config --image L:app --config.label org.opencontainers.image.version=2.4.1",
    );
    reg.push(&layout, "vendor/broker:2.4");
    let r = reg.reference("vendor/broker:2.4");
    sign(&d, &layout, "layout.sig"); // the operator's key, trusted by the gateway
    let reg_access = [
        "--registry-ca",
        ca.to_str().unwrap(),
        "--username",
        registry::USER,
        "--password-file",
        password_file.to_str().unwrap(),
    ];
    let m = d.manifest("usp-img.toml", &MANIFEST.replace("NAME", "usp-img"));
    let doc = d.dir.path().join("deploy.sig");
    let digest = sign_deployment(&d, &r, &m, &doc, &reg_access);
    let hex = digest.strip_prefix("sha256:").unwrap();
    let at = web.path().join(format!("sigs/vendor/broker@sha256={hex}"));
    std::fs::create_dir_all(&at).unwrap();
    let good = std::fs::read_to_string(&doc).unwrap();

    let mut c = Controller::connect(mq_port, LAUNCHER, LAUNCHER_TOPIC);
    wait_for_agent(&mut c);
    subscribe(&mut c, "du", "Event", &format!("{SM}DUStateChange!"));
    subscribe(&mut c, "oc", "OperationComplete", SM);
    let install = |c: &mut Controller, url: &str, key: &str| {
        operate(c, &format!("{SM}InstallDU()"), key, &[("URL", url)]);
        let ev = du_state_change(c);
        operation_complete(c, "InstallDU()", key);
        ev
    };

    // Refused, nothing installed: the manifest in the document edited (more memory), a
    // plain signature without a manifest, no document at all.
    std::fs::write(
        at.join("signature-1"),
        good.replace("memory_mib = 32", "memory_mib = 64"),
    )
    .unwrap();
    let ev = install(&mut c, &r, "k-edited");
    assert_eq!(ev["CurrentState"], "Failed", "{ev}");
    let why = ev["Fault.FaultString"].as_str().unwrap();
    assert!(why.contains("does not verify"), "{ev}");
    assert!(!why.contains("usp-downloads"), "no internal paths: {ev}");
    std::fs::copy(d.dir.path().join("layout.sig"), at.join("signature-1")).unwrap();
    let ev = install(&mut c, &r, "k-plain");
    assert_eq!(ev["CurrentState"], "Failed", "{ev}");
    assert!(
        ev["Fault.FaultString"]
            .as_str()
            .unwrap()
            .contains("without a service manifest"),
        "{ev}"
    );
    std::fs::remove_file(at.join("signature-1")).unwrap();
    let ev = install(&mut c, &r, "k-none");
    assert_eq!(ev["CurrentState"], "Failed", "{ev}");
    assert!(
        ev["Fault.FaultString"].as_str().unwrap().contains("404"),
        "{ev}"
    );
    assert_eq!(
        d.json(&["service", "list", "--json"])["services"]
            .as_array()
            .map(Vec::len),
        Some(0)
    );

    // The registry's image by its reference: the DU's URL is the reference, its Version
    // and Vendor the image's labels.
    std::fs::write(at.join("signature-1"), &good).unwrap();
    let ev = install(&mut c, &r, "k-reg");
    assert_eq!(ev["CurrentState"], "Installed", "{ev}");
    assert_eq!(ev["Version"], "2.4.1", "{ev}");
    let du = ev["DeploymentUnitRef"].as_str().unwrap().to_string();
    let p = get(&mut c, &[&format!("{du}.")]);
    assert_eq!(p[&format!("{du}.URL")], r);
    assert_eq!(p[&format!("{du}.Vendor")], "acme");
    assert_eq!(p[&format!("{du}.Name")], "usp-img");
    let st = d.json(&["service", "status", "usp-img", "--json"]);
    assert_eq!(st["image"].as_str(), Some(digest.as_str()), "{st}");
    assert!(d.cli(&["service", "start", "usp-img"]).status.success());
    let rep = report(&d, "usp-img");
    assert!(
        rep.contains("uid=1000 gid=1000 cwd=/srv foo=from-image"),
        "{rep}"
    );

    // A `docker save` archive over HTTP, its document beside it (URL.sig).
    let archive = web.path().join("broker.tar");
    let o = Command::new("skopeo")
        .args([
            "copy",
            "-q",
            &layout,
            &format!("docker-archive:{}:vendor/broker:2.4", archive.display()),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m2 = d.manifest("usp-arch.toml", &MANIFEST.replace("NAME", "usp-arch"));
    let archive_ref = format!("docker-archive:{}", archive.display());
    sign_deployment(
        &d,
        &archive_ref,
        &m2,
        &web.path().join("broker.tar.sig"),
        &[],
    );
    let url = format!("http://127.0.0.1:{web_port}/broker.tar");
    let ev = install(&mut c, &url, "k-archive");
    assert_eq!(ev["CurrentState"], "Installed", "{ev}");
    let du2 = ev["DeploymentUnitRef"].as_str().unwrap().to_string();
    let p = get(&mut c, &[&format!("{du2}.")]);
    assert_eq!(p[&format!("{du2}.URL")], url);
    assert!(d.cli(&["service", "start", "usp-arch"]).status.success());
    assert!(report(&d, "usp-arch").contains("old-gone"));
    // Its layers are the registry image's, stored once; the download is gone.
    let images = d.json(&["image", "list", "--json"]);
    assert_eq!(images["images"].as_array().unwrap().len(), 2, "{images}");
    assert_eq!(
        images["images"][0]["layers"], images["images"][1]["layers"],
        "{images}"
    );
    let downloads = std::fs::read_dir(d.state_dir().join("usp-downloads"))
        .unwrap()
        .count();
    assert_eq!(downloads, 0, "the downloads folder is emptied");

    // Uninstall frees the image no other service runs; the shared layers stay for the other.
    operate(&mut c, &format!("{du}.Uninstall()"), "k-rm", &[]);
    let ev = du_state_change(&c);
    assert_eq!(ev["CurrentState"], "Uninstalled", "{ev}");
    operation_complete(&c, "Uninstall()", "k-rm");
    let images = d.json(&["image", "list", "--json"]);
    let left: Vec<_> = images["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["digest"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left.len(), 1, "{images}");
    assert_ne!(left[0], digest);
    assert!(d.cli(&["service", "stop", "usp-arch"]).status.success());
}

#[test]
fn an_image_services_writable_layer_is_bounded_by_disk_mib_and_kept_across_restarts() {
    let test = "an_image_services_writable_layer_is_bounded_by_disk_mib_and_kept_across_restarts";
    if !tools(test) {
        return;
    }
    if !Path::new("/dev/loop-control").exists() {
        eprintln!("skipped {test}: no loop devices here");
        return;
    }
    let d = Daemon::start_with_keys();
    build_image(&d);
    let layout = format!("oci:{}:app", d.dir.path().join("L").display());
    let sig = sign(&d, &layout, "app.sig");
    let m = d.manifest(
        "disk.toml",
        &MANIFEST
            .replace("NAME", "oci-disk")
            .replace("memory_mib = 32", "memory_mib = 32\ndisk_mib = 16"),
    );
    let st = d.json(&[
        "service",
        "install",
        m.to_str().unwrap(),
        "--image",
        &layout,
        "--signature",
        &sig,
        "--start",
        "--json",
    ]);
    assert_eq!(st["state"].as_str(), Some("running"), "{st}");
    report(&d, "oci-disk");
    let store = d.state_dir().join("images/oci/layers");
    let store_bytes = disk_usage(&store);
    let exec = |script: &str| {
        d.cli(&[
            "service",
            "exec",
            "oci-disk",
            "--",
            "/bin/busybox",
            "sh",
            "-c",
            script,
        ])
    };
    // The root's free space is the layer's filesystem's: 16 MiB at most.
    let o = exec("/bin/busybox df -k / | /bin/busybox tail -1");
    let df = String::from_utf8_lossy(&o.stdout).into_owned();
    let total_kib: u64 = df
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!((8_000..=16_384).contains(&total_kib), "df /: {df}");
    // 4 MB fit; 40 MB more do not, and fail inside the service (ENOSPC), not on the host.
    let o = exec("/bin/busybox dd if=/dev/zero of=/tmp/ok bs=1M count=4 2>&1");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let o = exec("/bin/busybox dd if=/dev/zero of=/tmp/big bs=1M count=40 2>&1");
    assert!(!o.status.success(), "a 40 MB write fits in a 16 MiB layer?");
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("No space left"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(exec("/bin/busybox rm -f /tmp/big").status.success());
    // The image's layers in the store are not written.
    assert_eq!(disk_usage(&store), store_bytes);
    let kept = || {
        let o = exec("/bin/busybox ls -l /tmp/ok");
        let ls = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(ls.contains("4194304"), "the 4 MB file: {ls}");
    };
    // What it wrote stays across a restart (its layer's filesystem is kept).
    assert!(d.cli(&["service", "restart", "oci-disk"]).status.success());
    kept();
    // And across a reboot: stopped, its root and its layer's filesystem unmounted (as a
    // reboot leaves them), started again.
    assert!(d.cli(&["service", "stop", "oci-disk"]).status.success());
    let dir = d.state_dir().join("services/oci-disk");
    assert!(dir.join("layer.img").is_file());
    for at in ["rootfs", "layer"] {
        nix::mount::umount2(&dir.join(at), nix::mount::MntFlags::MNT_DETACH).unwrap();
    }
    assert!(d.cli(&["service", "start", "oci-disk"]).status.success());
    kept();
    assert!(d.cli(&["service", "stop", "oci-disk"]).status.success());
    assert!(d.cli(&["service", "remove", "oci-disk"]).status.success());
    assert!(!dir.exists(), "{} is left", dir.display());
}
