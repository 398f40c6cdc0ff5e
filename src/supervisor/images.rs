//! OCI images: pulled into the image store on a worker (the operator's signature checked
//! before anything is written), listed, removed when no service runs them, and installed as
//! services with the operator's manifest.

use super::*;
use gatevisor_images::oci::{self, store::ImageRecord};

/// The largest signature document read.
const MAX_SIGNATURE: u64 = gatevisor_images::oci::signature::MAX as u64;

impl Supervisor {
    /// The services that run image `digest`.
    fn image_users(&self, digest: &oci::Digest) -> Vec<String> {
        let d = digest.to_string();
        self.doc
            .services
            .iter()
            .filter(|(_, r)| matches!(&r.plan.root, Root::Layers { image } if *image == d))
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn image_info(&self, rec: &ImageRecord) -> api::ImageInfo {
        let config = self.oci.config(rec).ok();
        info_of(rec, config.as_ref(), self.image_users(&rec.digest))
    }

    pub(super) fn image_list(&self) -> Result<serde_json::Value> {
        let images = self.oci.list().iter().map(|r| self.image_info(r)).collect();
        api::to_result(&api::ImageList { images })
    }

    /// Pulls an image on a worker; the worker answers, and tells the loop for its event log.
    pub(super) fn begin_image_pull(
        &mut self,
        reference: String,
        signature: PathBuf,
        reply: Sender<Reply>,
    ) {
        let parsed = oci::source::Reference::parse(&reference)
            .map_err(|e| err(ErrorKind::Invalid, e.to_string()))
            .and_then(|r| {
                if r.local_path().is_some_and(Path::is_relative) {
                    return Err(err(
                        ErrorKind::Invalid,
                        format!("{reference}: the daemon needs an absolute path"),
                    ));
                }
                Ok(r)
            });
        let r = match parsed {
            Ok(r) => r,
            Err(error) => {
                self.refused(&reference, &error);
                let _ = reply.send(Reply::Error { error });
                return;
            }
        };
        let store = self.oci.clone();
        let policy = self.settings.policy.clone();
        let tx = self.tx.clone();
        let answer = reply.clone();
        let spawned = spawn_worker("image-pull", move || {
            let result = read_signature(&signature).and_then(|sig| {
                let base = *store.rules();
                let rules = |id: &str, name: &str| oci::layer::Rules {
                    allow_setuid: policy.allows_setuid(id, name),
                    ..base
                };
                store
                    .import(&r, &sig, &rules, &mut |_| {})
                    .map(Box::new)
                    .map_err(|e| {
                        err(
                            image_error_kind(&e),
                            format!("{reference}: {}", error_chain(&e)),
                        )
                    })
            });
            let _ = tx.send(Msg::ImagePulled {
                reference,
                result,
                reply: answer,
            });
        });
        if let Err(e) = spawned {
            let _ = reply.send(Reply::Error {
                error: err(ErrorKind::Runtime, format!("no worker thread: {e}")),
            });
        }
    }

    /// A pull's worker is done: record it and answer.
    pub(super) fn on_image_pulled(
        &mut self,
        reference: &str,
        result: Result<Box<oci::store::Imported>>,
        reply: Sender<Reply>,
    ) {
        let r = match result {
            Ok(imported) => {
                self.event(
                    EventKind::ImagePulled,
                    None,
                    format!(
                        "{} from {reference}, signed by {}: {} layers stored, {} shared",
                        imported.record.digest,
                        imported.record.publisher,
                        imported.layers_added,
                        imported.layers_shared
                    ),
                );
                let mut info = info_of(
                    &imported.record,
                    Some(&imported.config),
                    self.image_users(&imported.record.digest),
                );
                info.layers_added = Some(imported.layers_added);
                info.layers_shared = Some(imported.layers_shared);
                api::to_result(&info)
            }
            Err(e) => {
                self.refused(reference, &e);
                Err(e)
            }
        };
        let _ = reply.send(match r {
            Ok(result) => Reply::Ok { result },
            Err(error) => Reply::Error { error },
        });
    }

    /// Removes image `what` (none of the services may run it) and the layers that go with it.
    pub(super) fn image_remove(&mut self, what: &str) -> Result<serde_json::Value> {
        let rec = self
            .oci
            .get(what)
            .map_err(|e| err(image_error_kind(&e), error_chain(&e)))?;
        let users = self.image_users(&rec.digest);
        if !users.is_empty() {
            return Err(err(
                ErrorKind::Conflict,
                format!(
                    "image {} is run by {}: remove those services first",
                    rec.digest,
                    users.join(", ")
                ),
            ));
        }
        let freed = self
            .oci
            .remove(&rec.digest)
            .map_err(|e| err(ErrorKind::Runtime, error_chain(&e)))?;
        self.event(
            EventKind::ImageRemoved,
            None,
            format!("{} ({freed} layers freed)", rec.digest),
        );
        api::to_result(&api::ImageRemoved {
            removed: rec.digest.to_string(),
            layers_freed: freed,
        })
    }

    /// The image `what` names, for an install.
    pub(super) fn image_for_install(&self, what: &str) -> Result<ImageRecord> {
        let rec = self
            .oci
            .get(what)
            .map_err(|e| err(image_error_kind(&e), error_chain(&e)))?;
        if !self.oci.complete(&rec) {
            return Err(err(
                ErrorKind::Runtime,
                format!(
                    "image {} lacks layers in the store: pull it again",
                    rec.digest
                ),
            ));
        }
        Ok(rec)
    }

    /// The operator's manifest at `path` for image `rec`: what it leaves out comes from the
    /// image, user names resolved in the image's own files.
    pub(super) fn image_manifest(
        &self,
        path: &Path,
        rec: &ImageRecord,
    ) -> Result<(Manifest, crate::state::ImageMeta)> {
        let config = self
            .oci
            .config(rec)
            .map_err(|e| err(ErrorKind::Runtime, error_chain(&e)))?;
        let read = |f: &str| self.oci.read_file(rec, f, 1 << 20);
        let m = Manifest::load_for_image(path, &rec.digest, &config, &read)
            .map_err(|e| err(ErrorKind::Invalid, error_chain(&e)))?;
        let labels = config.labels();
        // A label is shown as it is, within reason (TR-181 strings are short).
        let label = |k: &str| {
            labels
                .get(k)
                .map(|v| v.chars().filter(|c| !c.is_control()).take(64).collect())
                .filter(|v: &String| !v.is_empty())
        };
        let meta = crate::state::ImageMeta {
            publisher: rec.publisher.clone(),
            vendor: label("org.opencontainers.image.vendor"),
            version: label("org.opencontainers.image.version"),
        };
        Ok((m, meta))
    }

    /// Who answers for a manifest that came in `deployment`, a deployment document of image
    /// `rec`: the publisher whose trusted key signs the image's digest and exactly the text
    /// of `manifest` with it.
    pub(super) fn deployment_requester(
        &self,
        rec: &ImageRecord,
        manifest: &Path,
        deployment: &Path,
    ) -> Result<crate::policy::Requester> {
        let doc = read_signature(deployment)?;
        let v = self
            .oci
            .verify_signature(&doc, &rec.digest)
            .map_err(|e| err(image_error_kind(&e), error_chain(&e)))?;
        let text = std::fs::read(manifest)
            .map_err(|e| err(ErrorKind::Invalid, format!("{}: {e}", manifest.display())))?;
        if v.service.as_deref().map(str::as_bytes) != Some(&text[..]) {
            return Err(err(
                ErrorKind::Invalid,
                format!(
                    "{}: not the service manifest that deployment document {} signs",
                    manifest.display(),
                    deployment.display()
                ),
            ));
        }
        Ok(crate::policy::Requester::Publisher {
            id: v.key,
            name: v.publisher,
        })
    }
}

fn info_of(
    rec: &ImageRecord,
    config: Option<&oci::spec::ImageConfig>,
    used_by: Vec<String>,
) -> api::ImageInfo {
    api::ImageInfo {
        digest: rec.digest.to_string(),
        references: rec.references.clone(),
        key: rec.key.clone(),
        publisher: rec.publisher.clone(),
        layers: rec.layers.iter().map(|d| d.to_string()).collect(),
        command: config.map(|c| c.argv()).unwrap_or_default(),
        user: config.and_then(|c| c.run().user).filter(|u| !u.is_empty()),
        labels: config.map(|c| c.labels()).unwrap_or_default(),
        imported_at_ms: rec.imported_at_ms,
        used_by,
        layers_added: None,
        layers_shared: None,
    }
}

fn read_signature(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let bad = |e: &dyn std::fmt::Display| {
        err(
            ErrorKind::Invalid,
            format!("signature {}: {e}", path.display()),
        )
    };
    let f = gatevisor_images::package::open_regular(path).map_err(|e| bad(&e))?;
    let mut buf = Vec::new();
    f.take(MAX_SIGNATURE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| bad(&e))?;
    if buf.len() as u64 > MAX_SIGNATURE {
        return Err(bad(&format!("larger than {MAX_SIGNATURE} bytes")));
    }
    Ok(buf)
}

/// What scripts and USP branch on for an image's error.
pub(super) fn image_error_kind(e: &oci::OciError) -> ErrorKind {
    use oci::OciError as E;
    match e {
        E::Signature { .. } => ErrorKind::Untrusted,
        E::NotFound(_) => ErrorKind::NotFound,
        E::Ambiguous(_)
        | E::BadReference(_)
        | E::BadDigest(_)
        | E::NoTag { .. }
        | E::NoPlatform { .. } => ErrorKind::Invalid,
        E::DigestMismatch { .. } | E::SizeMismatch { .. } | E::Invalid { .. } => ErrorKind::Corrupt,
        E::Unsafe { .. } => ErrorKind::Denied,
        E::TooLarge { .. } => ErrorKind::NoResources,
        E::Io { .. } => ErrorKind::Invalid,
        E::Store { .. } => ErrorKind::Runtime,
        E::AccessDenied { .. } => ErrorKind::Denied,
        E::Registry {
            status: Some(404), ..
        } => ErrorKind::NotFound,
        E::Registry { .. } => ErrorKind::Runtime,
    }
}
