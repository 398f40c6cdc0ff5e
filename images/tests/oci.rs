//! OCI images built by real tools from Debian (umoci, skopeo, GNU tar), imported into the
//! image store: layers applied with their whiteouts and opaque directories, owners kept,
//! shared by content between images and formats (OCI layout, docker archive, zstd), and every
//! hostile or broken input refused with its reason and nothing stored. Needs root (the
//! store keeps owners and makes overlay whiteouts) and umoci + skopeo (`scripts/setup.sh`);
//! skips with a printed reason otherwise.

mod common;

use common::{assert_empty, have_tools, run, sh, Env};
use gatevisor_images::oci::store::disk_usage;
use std::path::{Path, PathBuf};
use std::process::Command;

use gatevisor_images::keys::SecretKey;
use gatevisor_images::oci::layer::Rules;
use gatevisor_images::oci::source::Reference;
use gatevisor_images::oci::store::ImportStep;
use gatevisor_images::oci::{signature, source, OciError};

/// Mounts the overlay of `lower` (top first) read-only at `at`; unmounted when dropped.
struct Overlay(PathBuf);

impl Overlay {
    fn mount(lower: &[PathBuf], at: &Path) -> Overlay {
        std::fs::create_dir_all(at).unwrap();
        let lowerdir = lower
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        nix::mount::mount(
            Some("overlay"),
            at,
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(format!("lowerdir={lowerdir}").as_str()),
        )
        .unwrap();
        Overlay(at.into())
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn owner(p: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid())
}

#[test]
fn layers_apply_with_their_whiteouts_opaque_dirs_and_owners() {
    if !have_tools("layers_apply_with_their_whiteouts_opaque_dirs_and_owners") {
        return;
    }
    let env = Env::new();
    env.build_images();
    let store = env.store("store");
    let l = env.path("L").display().to_string();
    let got = env.import(&store, &format!("oci:{l}:opq")).unwrap();
    assert_eq!((got.layers_added, got.layers_shared), (3, 0));
    assert_eq!(got.config.argv(), ["/bin/sh", "-c", "id; sleep 1000"]);
    assert_eq!(got.config.run().user.as_deref(), Some("1000:1000"));
    assert_eq!(got.config.run().working_dir.as_deref(), Some("/srv"));
    assert!(got.config.env().contains(&("FOO".into(), "bar".into())));
    assert_eq!(got.config.labels()["org.example.vendor"], "acme");
    assert_eq!(got.record.publisher, "operator");
    let merged = env.path("merged");
    let _m = Overlay::mount(&store.lower_dirs(&got.record), &merged);
    // The upper layer's whiteouts hide the base's files.
    assert!(!merged.join("etc/old").exists());
    assert_eq!(std::fs::read(merged.join("etc/keep")).unwrap(), b"keep\n");
    // The opaque directory hides everything below it, data/new of the layer under it too.
    let mut data: Vec<String> = std::fs::read_dir(merged.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    data.sort();
    assert_eq!(data, ["only"]);
    // The store reads a file as the merged root has it (user names are resolved so).
    let read = |f: &str| store.read_file(&got.record, f, 1 << 20);
    assert_eq!(read("etc/keep").as_deref(), Some(&b"keep\n"[..]));
    assert_eq!(read("data/only").as_deref(), Some(&b"fresh\n"[..]));
    assert_eq!(read("etc/old"), None, "removed by a whiteout");
    assert_eq!(
        read("data/new"),
        None,
        "hidden by the opaque directory above it"
    );
    assert_eq!(
        read("data/sub/f"),
        None,
        "its directory removed, then hidden"
    );
    // Owners are the image's.
    assert_eq!(owner(&merged.join("srv/owned")), (1000, 1000));
    assert_eq!(owner(&merged.join("etc/keep")), (0, 0));
    assert!(merged.join("bin/sh").is_symlink());
    // The record is found by digest, prefix and reference.
    for what in [
        got.record.digest.to_string(),
        got.record.digest.hex()[..12].to_string(),
        format!("oci:{l}:opq"),
    ] {
        assert_eq!(store.get(&what).unwrap(), got.record, "{what}");
    }
}

#[test]
fn the_same_layers_in_other_formats_and_images_are_stored_once() {
    if !have_tools("the_same_layers_in_other_formats_and_images_are_stored_once") {
        return;
    }
    let env = Env::new();
    env.build_images();
    let l = env.path("L").display().to_string();
    let d = env.path("d.tar").display().to_string();
    let z = env.path("Z").display().to_string();
    let a = env.path("a.tar").display().to_string();
    run(Command::new("skopeo").args([
        "copy",
        "-q",
        &format!("oci:{l}:opq"),
        &format!("docker-archive:{d}:gv/opq:1"),
    ]));
    run(Command::new("skopeo").args([
        "copy",
        "-q",
        "--dest-compress-format",
        "zstd",
        &format!("oci:{l}:opq"),
        &format!("oci:{z}:opq"),
    ]));
    run(Command::new("skopeo").args([
        "copy",
        "-q",
        &format!("oci:{l}:upper"),
        &format!("oci-archive:{a}:upper"),
    ]));
    let store = env.store("store");
    let base = env.import(&store, &format!("oci:{l}:base")).unwrap();
    assert_eq!((base.layers_added, base.layers_shared), (1, 0));
    let after_base = store.disk_bytes();
    // Another image on the same base adds only its own layer.
    let upper = env
        .import(&store, &format!("oci-archive:{a}:upper"))
        .unwrap();
    assert_eq!((upper.layers_added, upper.layers_shared), (1, 1));
    let own = disk_usage(&store.lower_dirs(&upper.record)[0]);
    let extra = store.disk_bytes() - after_base;
    assert!(
        extra as f64 <= own as f64 * 1.05 + 16384.0,
        "the second image took {extra} bytes, its own layer {own}"
    );
    // The same image from a docker archive (uncompressed layers), and compressed with zstd:
    // only its third layer is new, once.
    let docker = env
        .import(&store, &format!("docker-archive:{d}:gv/opq:1"))
        .unwrap();
    assert_eq!((docker.layers_added, docker.layers_shared), (1, 2));
    let zstd = env.import(&store, &format!("oci:{z}:opq")).unwrap();
    assert_eq!((zstd.layers_added, zstd.layers_shared), (0, 3));
    assert_eq!(zstd.record.layers, docker.record.layers);
    // zstd layers decode: a store of its own applies all three.
    let fresh = env.store("fresh");
    let z2 = env.import(&fresh, &format!("oci:{z}:opq")).unwrap();
    assert_eq!((z2.layers_added, z2.layers_shared), (3, 0));
    // Removing images removes the layers no other image has.
    assert_eq!(store.remove(&zstd.record.digest).unwrap(), 0);
    assert_eq!(store.remove(&docker.record.digest).unwrap(), 1);
    assert_eq!(store.remove(&upper.record.digest).unwrap(), 1);
    assert_eq!(store.remove(&base.record.digest).unwrap(), 1);
    assert!(store.list().is_empty());
    assert_eq!(
        std::fs::read_dir(env.path("store/oci/layers"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn hostile_and_broken_images_are_refused_with_their_reason_and_nothing_stored() {
    if !have_tools("hostile_and_broken_images_are_refused_with_their_reason_and_nothing_stored") {
        return;
    }
    let env = Env::new();
    env.build_images();
    let l = env.path("L").display().to_string();
    let store = env.store("store");
    let upper = format!("oci:{l}:upper");

    // Unsigned: a signature of another image.
    let other = env.sign(&format!("oci:{l}:base"));
    let e = store
        .import(
            &Reference::parse(&upper).unwrap(),
            &other,
            &|_, _| Rules::default(),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(matches!(e, OciError::Signature { .. }), "{e}");
    assert!(e.to_string().contains("another image"), "{e}");
    // Signed by a key the gateway does not trust.
    let stranger = SecretKey::generate().unwrap();
    let resolved =
        source::resolve(&Reference::parse(&upper).unwrap(), &Default::default()).unwrap();
    let sig = signature::sign(&stranger, &resolved.digest);
    let e = store
        .import(
            &Reference::parse(&upper).unwrap(),
            sig.as_bytes(),
            &|_, _| Rules::default(),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(e.to_string().contains("does not trust"), "{e}");
    assert_empty(&env, "store");

    // A tampered layer: one byte of the upper layer's blob changed (gzip still decodes or
    // not: either way the blob's digest is the reason).
    sh(env.dir.path(), "cp -a L T");
    let t = env.path("T").display().to_string();
    let top = resolved.layers.last().unwrap().digest.clone().unwrap();
    let blob = env.path(&format!("T/blobs/sha256/{}", top.hex()));
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&blob, &bytes).unwrap();
    let sig = signature::sign(&env.key, &resolved.digest);
    let e = store
        .import(
            &Reference::parse(&format!("oci:{t}:upper")).unwrap(),
            sig.as_bytes(),
            &|_, _| Rules::default(),
            &mut |_| {},
        )
        .unwrap_err();
    assert!(
        matches!(&e, OciError::DigestMismatch { what, .. } if what.contains(&top.to_string())),
        "{e}"
    );
    // The base layer, complete, may stay (a later import reuses it); the tampered one and
    // the record are not there.
    assert!(store.list().is_empty());
    assert!(!store
        .layer_dir(&resolved.layers.last().unwrap().diff_id)
        .exists());
    store.gc().unwrap();
    assert_empty(&env, "store");

    // A missing platform: the image says arm64.
    sh(
        env.dir.path(),
        "umoci config --image L:base --architecture arm64 --tag arm",
    );
    let arm = format!("oci:{l}:arm");
    let e = store
        .import(
            &Reference::parse(&arm).unwrap(),
            &other,
            &|_, _| Rules::default(),
            &mut |_| {},
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no image for linux/amd64") && e.contains("linux/arm64"),
        "{e}"
    );
    // A tag that is not there.
    let e = source::resolve(
        &Reference::parse(&format!("oci:{l}:nope")).unwrap(),
        &Default::default(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("no image tagged \"nope\""), "{e}");
    assert_empty(&env, "store");

    // A layer that escapes its root (`../`, made by GNU tar with -P) and one with a device
    // node: each refused by its entry.
    sh(
        env.dir.path(),
        "mkdir -p esc/x && echo pwned > esc/x/evil
         tar -C esc/x -P -cf esc.tar ../x/evil ../../escaped 2>/dev/null || tar -C esc/x -P -cf esc.tar ../x/evil
         umoci raw add-layer --image L:base esc.tar --tag esc
         mkdir -p dev && mknod dev/null c 1 3 && tar -C dev -cf dev.tar null
         umoci raw add-layer --image L:base dev.tar --tag dev
         mkdir -p suid && cp /bin/true suid/su && chmod 4755 suid/su && tar -C suid -cf suid.tar su
         umoci raw add-layer --image L:base suid.tar --tag suid",
    );
    for (tag, why) in [
        ("esc", "`..` in the path"),
        ("dev", "device nodes"),
        ("suid", "setuid"),
    ] {
        let e = env.import(&store, &format!("oci:{l}:{tag}")).unwrap_err();
        assert!(
            matches!(&e, OciError::Unsafe { why: w, .. } if w.contains(why)),
            "{tag}: {e}"
        );
        assert!(store.list().is_empty(), "{tag}");
        store.gc().unwrap();
        assert_empty(&env, "store");
    }
    assert!(!env.path("escaped").exists() && !env.path("evil").exists());
    // The operator's grant lets setuid files in.
    let grant = |_: &str, name: &str| Rules {
        allow_setuid: name == "operator",
        ..Rules::default()
    };
    let r = Reference::parse(&format!("oci:{l}:suid")).unwrap();
    let sig = env.sign(&format!("oci:{l}:suid"));
    store.import(&r, &sig, &grant, &mut |_| {}).unwrap();
}

#[test]
fn an_import_killed_half_way_leaves_a_consistent_store_and_the_next_one_resumes() {
    const TEST: &str =
        "an_import_killed_half_way_leaves_a_consistent_store_and_the_next_one_resumes";
    // The process this test kills: it imports and, once the first layer is stored, stops
    // (the record is written only after every layer) until it is killed.
    if let Ok(store) = std::env::var("GV_KILLED_IMPORT_STORE") {
        let var = |k: &str| std::env::var(k).unwrap();
        let trust =
            gatevisor_images::keys::TrustStore::new(Path::new(&var("GV_KILLED_IMPORT_KEYS")));
        let store = gatevisor_images::oci::store::ImageStore::open(
            Path::new(&store),
            trust,
            Rules::default(),
        )
        .unwrap();
        let sig = std::fs::read(var("GV_KILLED_IMPORT_SIG")).unwrap();
        let _ = store.import(
            &Reference::parse(&var("GV_KILLED_IMPORT_REF")).unwrap(),
            &sig,
            &|_, _| Rules::default(),
            &mut |s| {
                if matches!(s, ImportStep::Layer(_)) {
                    std::thread::sleep(std::time::Duration::from_secs(120));
                }
            },
        );
        return;
    }
    if !have_tools(TEST) {
        return;
    }
    let env = Env::new();
    env.build_images();
    let r = format!("oci:{}:opq", env.path("L").display());
    std::fs::write(env.path("sig"), env.sign(&r)).unwrap();
    let reference = Reference::parse(&r).unwrap();
    drop(env.store("store"));
    // A real kill (SIGKILL) of a process importing, once a layer of it is stored; other
    // layers may be complete or half-way in staging by then.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env("GV_KILLED_IMPORT_STORE", env.path("store"))
        .env("GV_KILLED_IMPORT_KEYS", env.path("keys"))
        .env("GV_KILLED_IMPORT_SIG", env.path("sig"))
        .env("GV_KILLED_IMPORT_REF", &r)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let layers = env.path("store/oci/layers");
    while std::fs::read_dir(&layers).unwrap().count() == 0 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the importing process ended before it was killed"
        );
        assert!(std::time::Instant::now() < until, "no layer stored in 60 s");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let stored = std::fs::read_dir(&layers).unwrap().count();
    // What a crash in the middle of a layer leaves in staging, whatever this kill left.
    std::fs::create_dir_all(env.path("store/oci/tmp/half.1.1/usr")).unwrap();
    let store = env.store("store");
    assert!(store.list().is_empty(), "no record of a half import");
    assert_eq!(
        std::fs::read_dir(env.path("store/oci/tmp"))
            .unwrap()
            .count(),
        0,
        "staging is emptied at the next start"
    );
    let done = store
        .import(
            &reference,
            &sig_of(&env),
            &|_, _| Rules::default(),
            &mut |_| {},
        )
        .unwrap();
    // The layers the killed import completed are taken as they are; the rest is applied.
    assert_eq!(
        (done.layers_added, done.layers_shared),
        (3 - stored, stored),
        "{stored} layers were complete when it was killed"
    );
    assert!(store.complete(&done.record));
}

fn sig_of(env: &Env) -> Vec<u8> {
    std::fs::read(env.path("sig")).unwrap()
}
