//! Packages against the real store: what a gateway accepts, what it refuses (each refusal
//! leaves the store exactly as it was), and installs interrupted at every step.

use gatevisor_images::keys::{SecretKey, TrustStore};
use gatevisor_images::package::{self, ArtifactKind, Limits, PackageError};
use gatevisor_images::store::{Step, Store, StoreError};
use std::path::{Path, PathBuf};

const SERVICE: &[u8] = b"name = \"demo\"\nversion = \"1.0.0\"\n";

struct Env {
    dir: tempfile::TempDir,
    key: SecretKey,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate().unwrap();
        let public = key
            .save(&dir.path().join("publisher.key"), "publisher")
            .unwrap();
        TrustStore::new(&dir.path().join("keys"))
            .trust(&public)
            .unwrap();
        Env { dir, key }
    }
    fn store(&self) -> Store {
        self.store_with(Limits::default())
    }
    fn store_with(&self, limits: Limits) -> Store {
        Store::open(
            &self.dir.path().join("images"),
            TrustStore::new(&self.dir.path().join("keys")),
            limits,
        )
        .unwrap()
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
    /// A package with `rootfs` (a tar) as its root filesystem, signed by `key`.
    fn package(&self, version: &str, rootfs: &[u8], key: &SecretKey) -> Vec<u8> {
        let mut out = Vec::new();
        package::build(
            "demo",
            version,
            &[
                ("service.toml", ArtifactKind::Service, SERVICE),
                ("rootfs.tar", ArtifactKind::Rootfs, rootfs),
            ],
            key,
            &mut out,
        )
        .unwrap();
        out
    }
}

fn good_rootfs() -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("bin")).unwrap();
    std::fs::write(d.path().join("bin/service"), b"#!/bin/sh\necho serving\n").unwrap();
    std::os::unix::fs::symlink("/bin/service", d.path().join("bin/alias")).unwrap();
    let mut out = Vec::new();
    gatevisor_images::rootfs::pack(d.path(), &mut out).unwrap();
    out
}

/// A rootfs tar with one hand-made entry.
fn rootfs_with(path: &str, ty: tar::EntryType, mode: u32, link: Option<&str>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(ty);
    h.set_mode(mode);
    h.set_size(0);
    if let Some(l) = link {
        h.set_link_name(l).unwrap();
    }
    // Bypass the tar crate's own path checks: write the name bytes directly.
    let name = h.as_gnu_mut().unwrap();
    name.name[..path.len()].copy_from_slice(path.as_bytes());
    h.set_cksum();
    b.append(&h, std::io::empty()).unwrap();
    b.into_inner().unwrap()
}

/// Every file under the store, with its size: to prove a refused install changed nothing.
fn listing(root: &Path) -> Vec<(String, u64)> {
    let mut v = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            }
            v.push((
                e.path().strip_prefix(root).unwrap().display().to_string(),
                if m.is_file() { m.len() } else { 0 },
            ));
        }
    }
    v.sort();
    v
}

fn refused(env: &Env, store: &Store, bytes: &[u8]) -> PackageError {
    let pkg = env.write("bad.gvpkg", bytes);
    let before = listing(store.root());
    let err = match store.install(&pkg, &mut |_| {}) {
        Err(StoreError::Package { source, .. }) => source,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(
        listing(store.root()),
        before,
        "a refused package changed the store ({err})"
    );
    err
}

#[test]
fn signed_package_installs_and_round_trips_the_rootfs() {
    let env = Env::new();
    let store = env.store();
    let bytes = env.package("1.0.0", &good_rootfs(), &env.key);
    assert_eq!(
        bytes,
        env.package("1.0.0", &good_rootfs(), &env.key),
        "builds are reproducible"
    );
    let inst = store
        .install(&env.write("demo.gvpkg", &bytes), &mut |_| {})
        .unwrap();
    let rootfs = inst.rootfs().unwrap();
    assert_eq!(
        std::fs::read(rootfs.join("bin/service")).unwrap(),
        b"#!/bin/sh\necho serving\n"
    );
    assert_eq!(std::fs::read(inst.service_manifest()).unwrap(), SERVICE);
    assert_eq!(store.current("demo").unwrap().version, "1.0.0");
}

#[test]
fn unsigned_package_is_refused() {
    let env = Env::new();
    let store = env.store();
    let signed = env.package("1.0.0", &good_rootfs(), &env.key);
    // Rebuild the archive without its signature entry.
    let mut ar = tar::Archive::new(&signed[..]);
    let mut b = tar::Builder::new(Vec::new());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_string_lossy() == package::SIGNATURE {
            continue;
        }
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        package::append(&mut b, &name, &data, 0o644).unwrap();
    }
    assert!(matches!(
        refused(&env, &store, &b.into_inner().unwrap()),
        PackageError::Unsigned
    ));
}

#[test]
fn package_signed_by_an_untrusted_key_is_refused() {
    let env = Env::new();
    let stranger = SecretKey::generate().unwrap();
    let e = refused(
        &env,
        &env.store(),
        &env.package("1.0.0", &good_rootfs(), &stranger),
    );
    assert!(matches!(e, PackageError::UntrustedKey { .. }), "{e}");
}

#[test]
fn package_signed_by_a_revoked_key_is_refused() {
    let env = Env::new();
    let trust = TrustStore::new(&env.dir.path().join("keys"));
    let id = trust.list()[0].id.clone();
    trust.revoke(&id).unwrap();
    let e = refused(
        &env,
        &env.store(),
        &env.package("1.0.0", &good_rootfs(), &env.key),
    );
    assert!(matches!(e, PackageError::RevokedKey { .. }), "{e}");
}

#[test]
fn tampered_artifact_is_refused_by_its_digest() {
    let env = Env::new();
    let mut bytes = env.package("1.0.0", &good_rootfs(), &env.key);
    // Flip one byte of the service script inside the rootfs artifact (same size).
    let at = bytes.windows(7).position(|w| w == b"serving").unwrap();
    bytes[at] = b'S';
    let e = refused(&env, &env.store(), &bytes);
    assert!(matches!(e, PackageError::DigestMismatch { .. }), "{e}");
}

#[test]
fn truncated_package_is_refused() {
    let env = Env::new();
    let bytes = env.package("1.0.0", &good_rootfs(), &env.key);
    let e = refused(&env, &env.store(), &bytes[..bytes.len() / 2]);
    assert!(
        matches!(
            e,
            PackageError::Archive(_) | PackageError::MissingArtifact { .. }
        ),
        "{e}"
    );
}

#[test]
fn oversized_package_is_refused() {
    let env = Env::new();
    let store = env.store_with(Limits {
        max_total_bytes: 1024,
        ..Limits::default()
    });
    let big = vec![b'x'; 4096];
    let mut bytes = Vec::new();
    package::build(
        "demo",
        "1.0.0",
        &[
            ("service.toml", ArtifactKind::Service, SERVICE),
            ("disk.img", ArtifactKind::Disk, &big),
        ],
        &env.key,
        &mut bytes,
    )
    .unwrap();
    let e = refused(&env, &store, &bytes);
    assert!(matches!(e, PackageError::TooLarge { .. }), "{e}");
}

#[test]
fn path_traversal_in_the_rootfs_is_refused() {
    let env = Env::new();
    let e = refused(
        &env,
        &env.store(),
        &env.package(
            "1.0.0",
            &rootfs_with("../../etc/evil", tar::EntryType::Regular, 0o644, None),
            &env.key,
        ),
    );
    assert!(
        matches!(&e, PackageError::Unsafe { why, .. } if why.contains("..")),
        "{e}"
    );
    let e = refused(
        &env,
        &env.store(),
        &env.package(
            "1.0.0",
            &rootfs_with("/etc/evil", tar::EntryType::Regular, 0o644, None),
            &env.key,
        ),
    );
    assert!(
        matches!(&e, PackageError::Unsafe { why, .. } if why.contains("absolute")),
        "{e}"
    );
}

#[test]
fn symlink_escaping_the_root_is_refused() {
    let env = Env::new();
    let e = refused(
        &env,
        &env.store(),
        &env.package(
            "1.0.0",
            &rootfs_with(
                "etc/escape",
                tar::EntryType::Symlink,
                0o777,
                Some("../../../../etc/shadow"),
            ),
            &env.key,
        ),
    );
    assert!(
        matches!(&e, PackageError::Unsafe { why, .. } if why.contains("climbs out")),
        "{e}"
    );
}

#[test]
fn device_node_and_setuid_file_are_refused() {
    let env = Env::new();
    let e = refused(
        &env,
        &env.store(),
        &env.package(
            "1.0.0",
            &rootfs_with("dev/sda", tar::EntryType::Block, 0o600, None),
            &env.key,
        ),
    );
    assert!(
        matches!(&e, PackageError::Unsafe { why, .. } if why.contains("device")),
        "{e}"
    );
    let e = refused(
        &env,
        &env.store(),
        &env.package(
            "1.0.0",
            &rootfs_with("bin/su", tar::EntryType::Regular, 0o4755, None),
            &env.key,
        ),
    );
    assert!(
        matches!(&e, PackageError::Unsafe { why, .. } if why.contains("setuid")),
        "{e}"
    );
}

#[test]
fn a_crash_at_any_install_step_leaves_the_old_or_the_new_version() {
    let steps = [
        Step::Verified(package::MANIFEST.into()),
        Step::Verified("rootfs.tar".into()),
        Step::Unpacked,
        Step::Synced,
        Step::BlobsStored,
        Step::Committed,
        Step::CurrentSet,
    ];
    for crash_at in steps {
        let env = Env::new();
        let store = env.store();
        store
            .install(
                &env.write("v1.gvpkg", &env.package("1.0.0", &good_rootfs(), &env.key)),
                &mut |_| {},
            )
            .unwrap();
        let v2 = env.write("v2.gvpkg", &env.package("2.0.0", &good_rootfs(), &env.key));
        let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = store.install(&v2, &mut |s| {
                if s == crash_at {
                    panic!("simulated crash at {s:?}");
                }
            });
        }));
        assert!(crashed.is_err(), "{crash_at:?} was never reached");
        drop(store);
        // "Reboot": reopen; the current version is complete, old or new.
        let store = env.store();
        let cur = store.current("demo").expect("a current version");
        assert!(
            cur.version == "1.0.0" || cur.version == "2.0.0",
            "{crash_at:?}"
        );
        assert!(
            cur.rootfs().unwrap().join("bin/service").is_file(),
            "{crash_at:?}: incomplete tree"
        );
        assert!(
            std::fs::read_dir(store.root().join("tmp"))
                .unwrap()
                .next()
                .is_none(),
            "{crash_at:?}: staging left"
        );
        store.gc().unwrap();
        // Installing again finishes the job.
        let inst = store.install(&v2, &mut |_| {}).unwrap();
        assert_eq!(
            (
                inst.version.as_str(),
                store.current("demo").unwrap().version.as_str()
            ),
            ("2.0.0", "2.0.0"),
            "{crash_at:?}"
        );
        assert_eq!(
            store.previous("demo").unwrap().version,
            "1.0.0",
            "{crash_at:?}"
        );
    }
}

#[test]
fn rollback_and_gc_keep_only_current_and_previous() {
    let env = Env::new();
    let store = env.store();
    for v in ["1.0.0", "2.0.0", "3.0.0"] {
        let mut rootfs = good_rootfs();
        if v == "3.0.0" {
            rootfs = rootfs_with("bin/other", tar::EntryType::Directory, 0o755, None);
        }
        store
            .install(
                &env.write("p.gvpkg", &env.package(v, &rootfs, &env.key)),
                &mut |_| {},
            )
            .unwrap();
    }
    assert!(store.gc().unwrap() >= 1, "version 1.0.0 is garbage");
    assert!(store.version("demo", "1.0.0").is_err());
    assert_eq!(store.rollback("demo").unwrap().version, "2.0.0");
    assert_eq!(store.current("demo").unwrap().version, "2.0.0");
    assert_eq!(store.previous("demo").unwrap().version, "3.0.0");
    store.remove("demo").unwrap();
    store.gc().unwrap();
    assert!(
        std::fs::read_dir(store.root().join("blobs/sha256"))
            .unwrap()
            .next()
            .is_none(),
        "all blobs collected"
    );
}

#[test]
fn a_version_kept_as_a_tree_stores_no_boot_artifacts() {
    use gatevisor_images::store::Keep;
    let env = Env::new();
    let store = env.store();
    let mut bytes = Vec::new();
    let initramfs = vec![7u8; 64 * 1024];
    package::build(
        "demo",
        "1.0.0",
        &[
            ("service.toml", ArtifactKind::Service, SERVICE),
            ("rootfs.tar", ArtifactKind::Rootfs, &good_rootfs()),
            ("initramfs.cpio", ArtifactKind::Initramfs, &initramfs),
        ],
        &env.key,
        &mut bytes,
    )
    .unwrap();
    let pkg = env.write("demo.gvpkg", &bytes);
    let inst = store
        .install_checked(
            &pkg,
            &mut |dir, _| {
                // The check sees every artifact, whatever it keeps.
                assert!(dir.join("initramfs.cpio").is_file());
                Ok(Keep::Tree)
            },
            &mut |_| {},
        )
        .unwrap();
    assert!(inst.rootfs().unwrap().join("bin/service").is_file());
    assert!(!inst.dir.join("initramfs.cpio").exists());
    let blobs: Vec<_> = std::fs::read_dir(store.root().join("blobs/sha256"))
        .unwrap()
        .collect();
    assert!(blobs.is_empty(), "{blobs:?}");
    // Kept whole, the same package has its initramfs as a blob.
    store.remove("demo").unwrap();
    store.gc().unwrap();
    let inst = store.install(&pkg, &mut |_| {}).unwrap();
    assert_eq!(
        std::fs::read(inst.dir.join("initramfs.cpio")).unwrap(),
        initramfs
    );
}
