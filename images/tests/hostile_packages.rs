//! Packages made by an attacker who holds a trusted (or revoked, or no) key: each is refused
//! with the entry or field named, and neither the store nor the host changes.

#[path = "common/forge.rs"]
mod forge;
use forge::with_signature_id;
use gatevisor_images::keys::{self, SecretKey, TrustStore};
use gatevisor_images::package::{self, ArtifactKind, Limits, PackageError};
use gatevisor_images::store::{Store, StoreError};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const SERVICE: &[u8] = b"name = \"demo\"\nversion = \"1.0.0\"\n";

struct Env {
    dir: tempfile::TempDir,
    key: SecretKey,
    id: String,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate().unwrap();
        let public = key
            .save(&dir.path().join("publisher.key"), "publisher")
            .unwrap();
        let id = TrustStore::new(&dir.path().join("keys"))
            .trust(&public)
            .unwrap();
        Env { dir, key, id }
    }
    fn store(&self) -> Store {
        Store::open(
            &self.dir.path().join("images"),
            TrustStore::new(&self.dir.path().join("keys")),
            Limits::default(),
        )
        .unwrap()
    }
    fn package(&self, version: &str, rootfs: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        package::build(
            "demo",
            version,
            &[
                ("service.toml", ArtifactKind::Service, SERVICE),
                ("rootfs.tar", ArtifactKind::Rootfs, rootfs),
            ],
            &self.key,
            &mut out,
        )
        .unwrap();
        out
    }
    fn write(&self, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join("bad.gvpkg");
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

/// One hand-made tar entry: (path, type, mode, link target, data).
type Entry<'a> = (&'a str, tar::EntryType, u32, Option<&'a str>, &'a [u8]);

fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, ty, mode, link, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*ty);
        h.set_mode(*mode);
        h.set_size(data.len() as u64);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        let name = h.as_gnu_mut().unwrap();
        name.name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Every path under `root` with its size and mode.
fn listing(root: &Path) -> Vec<(String, u64, u32)> {
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
                m.mode(),
            ));
        }
    }
    v.sort();
    v
}

/// Installs `bytes`, expects a refusal, and proves the store did not change.
fn refused(env: &Env, bytes: &[u8]) -> StoreError {
    let store = env.store();
    let before = listing(store.root());
    let pkg = env.write(bytes);
    let err = store
        .install(&pkg, &mut |_| {})
        .expect_err("an install that must be refused");
    assert_eq!(listing(store.root()), before, "{err}: the store changed");
    err
}

fn package_error(e: StoreError) -> PackageError {
    match e {
        StoreError::Package { source, .. } => source,
        other => panic!("expected a package error, got {other:?}"),
    }
}

fn good_rootfs() -> Vec<u8> {
    tar_of(&[(
        "bin/service",
        tar::EntryType::Regular,
        0o755,
        None,
        b"#!/bin/sh\n",
    )])
}

#[test]
fn a_key_id_that_is_a_path_never_reaches_the_trust_store() {
    let env = Env::new();
    let trust = TrustStore::new(&env.dir.path().join("keys"));
    trust.revoke(&env.id).unwrap();
    let signed = env.package("1.0.0", &good_rootfs());
    // The revoked key, reached through a path around its revocation.
    let around = with_signature_id(&signed, &format!("../trusted/{}", env.id));
    assert!(matches!(
        package_error(refused(&env, &around)),
        PackageError::BadKeyId
    ));
    // Any .pub file on disk (a service could write one into its own rootfs).
    let elsewhere = env.dir.path().join("rootfs-of-a-service");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let public = env.dir.path().join("publisher.pub");
    std::fs::copy(&public, elsewhere.join("evil.pub")).unwrap();
    let e = package_error(refused(
        &env,
        &with_signature_id(&signed, "../../rootfs-of-a-service/evil"),
    ));
    assert!(matches!(e, PackageError::BadKeyId), "{e}");
    assert!(e.to_string().contains("key id"), "{e}");
    // The real id still finds the revocation.
    assert!(matches!(
        package_error(refused(&env, &signed)),
        PackageError::RevokedKey { .. }
    ));
    // A key file dropped under a trusted id's name is not that key.
    let stranger = SecretKey::generate().unwrap();
    let fake_id = keys::key_id(&stranger.public());
    std::fs::write(
        env.dir
            .path()
            .join("keys/trusted")
            .join(format!("{fake_id}.pub")),
        keys::public_line(&SecretKey::generate().unwrap().public(), "x"),
    )
    .unwrap();
    let mut by_stranger = Vec::new();
    package::build(
        "demo",
        "1.0.0",
        &[("service.toml", ArtifactKind::Service, SERVICE)],
        &stranger,
        &mut by_stranger,
    )
    .unwrap();
    assert!(matches!(
        package_error(refused(&env, &by_stranger)),
        PackageError::UntrustedKey { .. }
    ));
}

#[test]
fn a_hard_link_through_a_symlink_links_nothing_of_the_host() {
    let env = Env::new();
    let host = env.dir.path().join("host");
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(host.join("secret"), b"host secret").unwrap();
    std::fs::write(host.join("su"), b"ELF").unwrap();
    std::fs::set_permissions(host.join("su"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    let host_s = host.display().to_string();
    for victim in ["secret", "su"] {
        let target = format!("etc/{victim}");
        let e = package_error(refused(
            &env,
            &env.package(
                "1.0.0",
                &tar_of(&[
                    // An absolute symlink is allowed: inside the container it is its own.
                    ("etc", tar::EntryType::Symlink, 0o777, Some(&host_s), b""),
                    ("stolen", tar::EntryType::Link, 0o644, Some(&target), b""),
                ]),
            ),
        ));
        assert!(
            matches!(&e, PackageError::Unsafe { path, why } if path == "stolen" && why.contains("symlink")),
            "{e}"
        );
        let m = std::fs::metadata(host.join(victim)).unwrap();
        assert_eq!(m.nlink(), 1, "{victim} was linked");
    }
    assert_eq!(
        std::fs::metadata(host.join("su")).unwrap().mode() & 0o7777,
        0o4755
    );
    // A hard link to a directory, or to a path that climbs, is refused too.
    let e = package_error(refused(
        &env,
        &env.package(
            "1.0.0",
            &tar_of(&[
                ("d", tar::EntryType::Directory, 0o755, None, b""),
                ("l", tar::EntryType::Link, 0o644, Some("d"), b""),
            ]),
        ),
    ));
    assert!(
        matches!(&e, PackageError::Unsafe { why, .. } if why.contains("regular file")),
        "{e}"
    );
    let e = package_error(refused(
        &env,
        &env.package(
            "1.0.0",
            &tar_of(&[(
                "l",
                tar::EntryType::Link,
                0o644,
                Some("../host/secret"),
                b"",
            )]),
        ),
    ));
    assert!(
        matches!(&e, PackageError::Unsafe { why, .. } if why.contains("..")),
        "{e}"
    );
}

#[test]
fn a_file_through_a_symlinked_parent_is_refused_and_writes_nothing_outside() {
    let env = Env::new();
    let outside = env.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let out_s = outside.display().to_string();
    let e = package_error(refused(
        &env,
        &env.package(
            "1.0.0",
            &tar_of(&[
                ("d", tar::EntryType::Symlink, 0o777, Some(&out_s), b""),
                ("d/planted", tar::EntryType::Regular, 0o644, None, b"x"),
            ]),
        ),
    ));
    assert!(
        matches!(&e, PackageError::Unsafe { path, why } if path == "d/planted" && why.contains("symlink")),
        "{e}"
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn symlink_chains_that_climb_out_of_the_root_are_refused() {
    let env = Env::new();
    let e = package_error(refused(
        &env,
        &env.package(
            "1.0.0",
            &tar_of(&[
                ("a/b", tar::EntryType::Directory, 0o755, None, b""),
                // Each link alone stays inside; followed one through the other, they leave.
                ("a/b/up", tar::EntryType::Symlink, 0o777, Some("../.."), b""),
                (
                    "x",
                    tar::EntryType::Symlink,
                    0o777,
                    Some("a/b/up/../.."),
                    b"",
                ),
            ]),
        ),
    ));
    assert!(
        matches!(&e, PackageError::Unsafe { path, why } if path == "x" && why.contains("climbs out")),
        "{e}"
    );
    // The order of the links does not matter.
    let e = package_error(refused(
        &env,
        &env.package(
            "1.0.0",
            &tar_of(&[
                ("x", tar::EntryType::Symlink, 0o777, Some("up/../.."), b""),
                ("up", tar::EntryType::Symlink, 0o777, Some("/"), b""),
            ]),
        ),
    ));
    assert!(
        matches!(&e, PackageError::Unsafe { why, .. } if why.contains("climbs out")),
        "{e}"
    );
}

#[test]
fn versions_named_like_the_stores_own_links_are_refused() {
    let env = Env::new();
    let store = env.store();
    let ok = env.package("1.0.0", &good_rootfs());
    store.install(&env.write(&ok), &mut |_| {}).unwrap();
    for v in ["current", "previous"] {
        let e = refused(&env, &env.package(v, &good_rootfs()));
        assert!(matches!(&e, StoreError::BadName(n) if n == v), "{e}");
    }
    // Later installs still work.
    let next = env.package("1.0.1", &good_rootfs());
    store.install(&env.write(&next), &mut |_| {}).unwrap();
    assert_eq!(store.current("demo").unwrap().version, "1.0.1");
    assert_eq!(store.previous("demo").unwrap().version, "1.0.0");
}

#[test]
fn a_fifo_as_the_package_is_refused_at_once() {
    let env = Env::new();
    let fifo = env.dir.path().join("pipe.gvpkg");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let store = env.store();
    let (tx, rx) = std::sync::mpsc::channel();
    let f = fifo.clone();
    std::thread::spawn(move || {
        let _ = tx.send(store.install(&f, &mut |_| {}).map(|_| ()));
    });
    let res = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the install of a FIFO hung");
    let e = res.expect_err("a FIFO is not a package");
    let text = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(
        text.contains("FIFO") && text.contains("pipe.gvpkg"),
        "{text}"
    );
}

#[test]
fn a_check_that_refuses_leaves_the_store_as_it_was() {
    let env = Env::new();
    let store = env.store();
    let before = listing(store.root());
    let pkg = env.write(&env.package("1.0.0", &good_rootfs()));
    let e = store
        .install_checked(
            &pkg,
            &mut |dir, m| {
                assert!(dir.join("service.toml").is_file());
                assert_eq!(m.name, "demo");
                Err("the policy says no".into())
            },
            &mut |_| {},
        )
        .unwrap_err();
    assert!(matches!(e, StoreError::Rejected { .. }), "{e}");
    assert_eq!(listing(store.root()), before);
}
