//! What the image tests share: the tools they need, a key and trust store, and the images
//! umoci and GNU tar build.
#![allow(dead_code)]

pub mod registry;

use std::path::{Path, PathBuf};
use std::process::Command;

use gatevisor_images::keys::{SecretKey, TrustStore};
use gatevisor_images::oci::layer::Rules;
use gatevisor_images::oci::registry::Registries;
use gatevisor_images::oci::source::Reference;
use gatevisor_images::oci::store::ImageStore;
use gatevisor_images::oci::{signature, source, OciError};

pub fn have_tools(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP {test}: needs root (owners, overlay whiteouts)");
        return false;
    }
    for t in ["umoci", "skopeo", "tar"] {
        if Command::new(t).arg("--version").output().is_err() {
            eprintln!("SKIP {test}: {t} is not installed (scripts/setup.sh installs it)");
            return false;
        }
    }
    true
}

pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn sh(dir: &Path, script: &str) {
    run(Command::new("sh").arg("-ec").arg(script).current_dir(dir));
}

/// A test's images, key and store.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub key: SecretKey,
    pub trust: TrustStore,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate().unwrap();
        let public = key.save(&dir.path().join("op.key"), "operator").unwrap();
        let trust = TrustStore::new(&dir.path().join("keys"));
        trust.trust(&public).unwrap();
        Env { dir, key, trust }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn store(&self, name: &str) -> ImageStore {
        ImageStore::open(&self.path(name), self.trust.clone(), Rules::default()).unwrap()
    }

    /// The operator's signature of the image at `r`.
    pub fn sign(&self, r: &str) -> Vec<u8> {
        self.sign_with(r, &Registries::default())
    }

    /// The operator's signature of the image at `r`, reached as `registries` say.
    pub fn sign_with(&self, r: &str, registries: &Registries) -> Vec<u8> {
        let resolved = source::resolve(&Reference::parse(r).unwrap(), registries).unwrap();
        signature::sign(&self.key, &resolved.digest).into_bytes()
    }

    pub fn import(
        &self,
        store: &ImageStore,
        r: &str,
    ) -> Result<gatevisor_images::oci::store::Imported, OciError> {
        self.import_with(store, r, &Registries::default())
    }

    /// Imports `r` into `store`, signed by the operator (who reaches it as `registries` say).
    pub fn import_with(
        &self,
        store: &ImageStore,
        r: &str,
        registries: &Registries,
    ) -> Result<gatevisor_images::oci::store::Imported, OciError> {
        let sig = self.sign_with(r, registries);
        store.import(
            &Reference::parse(r).unwrap(),
            &sig,
            &|_, _| Rules::default(),
            &mut |_| {},
        )
    }

    /// Builds, with umoci and GNU tar, layout `L` with:
    /// - `base`: FROM scratch, a static busybox, files of uid 1000, its config (entrypoint,
    ///   cmd, user, working dir, env, label);
    /// - `upper`: base plus a layer that deletes `etc/old` and `data/sub` (whiteouts) and
    ///   adds `data/new`;
    /// - `opq`: upper plus a layer made by tar with an opaque `data/` holding `only`.
    pub fn build_images(&self) {
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("busybox-static");
        sh(
            self.dir.path(),
            &format!(
                "umoci init --layout L
                 umoci new --image L:base
                 umoci unpack --image L:base B >/dev/null
                 mkdir -p B/rootfs/bin B/rootfs/etc B/rootfs/data/sub B/rootfs/srv
                 cp {busybox} B/rootfs/bin/busybox
                 for a in sh id cat ls sleep; do ln -s busybox B/rootfs/bin/$a; done
                 echo old > B/rootfs/etc/old; echo keep > B/rootfs/etc/keep
                 echo d > B/rootfs/data/sub/f
                 echo mine > B/rootfs/srv/owned; chown -R 1000:1000 B/rootfs/srv
                 umoci repack --image L:base B
                 umoci config --image L:base --config.entrypoint /bin/sh --config.cmd -c \
                   --config.cmd 'id; sleep 1000' --config.user 1000:1000 \
                   --config.workingdir /srv --config.env FOO=bar \
                   --config.label org.example.vendor=acme
                 umoci unpack --image L:base C >/dev/null
                 rm C/rootfs/etc/old; rm -r C/rootfs/data/sub; echo new > C/rootfs/data/new
                 umoci repack --image L:upper C
                 mkdir -p op/data; touch op/data/.wh..wh..opq; echo fresh > op/data/only
                 tar --numeric-owner --owner=0 --group=0 -C op -cf op.tar data
                 umoci raw add-layer --image L:upper op.tar --tag opq"
            ),
        );
    }
}

/// Nothing of a refused import is stored: no record, no layer, nothing in staging.
pub fn assert_empty(env: &Env, store: &str) {
    for d in ["layers", "images", "tmp"] {
        let p = env.path(&format!("{store}/oci/{d}"));
        let n = std::fs::read_dir(&p).map(|r| r.count()).unwrap_or(0);
        assert_eq!(n, 0, "{} holds {n} entries", p.display());
    }
}
