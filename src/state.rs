//! Desired and last-known state, persisted crash-safely.
//!
//! The whole state is one JSON document written as: temp file → fsync → rename over the old
//! file → fsync the directory. A crash at any point leaves either the old or the new document;
//! a torn temp file is ignored (and overwritten) on the next write.
//!
//! Test hook: with `GATEVISOR_FAULT=torn-state-write:N` the daemon aborts in the middle of its
//! N-th state write, after half of the temp file is on disk.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::lifecycle::State;
use crate::manifest::Manifest;

pub const STATE_FILE: &str = "state.json";

/// The state document's format. Version 1 records had `runtime` and `idmap_base` where
/// version 2 has the service's plan; a version 1 document is migrated when it is loaded.
pub const VERSION: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Stopped,
}

impl Desired {
    /// As the API writes it.
    pub fn name(self) -> &'static str {
        match self {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
        }
    }
}

/// How the program last ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub at_ms: u64,
    pub description: String,
}

/// The processes of a running service, enough to re-adopt it after a daemon restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    pub monitor_pid: i32,
    pub init_pid: i32,
    pub started_at_ms: u64,
    /// The machine's boot (`/proc/sys/kernel/random/boot_id`) it was started in: a service
    /// found gone under another boot id ended because the gateway restarted, not by itself.
    #[serde(default)]
    pub boot_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// Stable number of the service (its flows' cookies carry it).
    #[serde(default)]
    pub id: u32,
    pub manifest: Manifest,
    /// The manifest file (or package) it was installed from.
    pub source: PathBuf,
    /// The package version in the image store, for services installed from a package.
    #[serde(default)]
    pub package_version: Option<String>,
    /// For a service from an OCI image: who signed it and what its labels say of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_meta: Option<ImageMeta>,
    /// What it runs as, resolved at install (runtime, resources, root, port).
    pub plan: crate::plan::Plan,
    pub desired: Desired,
    pub state: State,
    pub running: Option<Running>,
    /// Restarts since install.
    pub restarts: u64,
    /// Restarts in a row without a stable run.
    pub consecutive_failures: u32,
    pub last_exit: Option<LastExit>,
    /// Why the service is `failed`.
    pub failure_reason: Option<String>,
    pub installed_at_ms: u64,
    /// The values the operator set for the service's declared settings (the rest keep
    /// their defaults).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, serde_json::Value>,
}

/// What an OCI image says of itself, kept with the service that runs it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// The name the key that signed it was trusted under.
    pub publisher: String,
    /// `org.opencontainers.image.vendor` and `org.opencontainers.image.version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateDoc {
    pub version: u32,
    pub services: BTreeMap<String, ServiceRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("cannot write state file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The on-disk store of the state document.
pub struct Store {
    dir: PathBuf,
    writes: AtomicU64,
    torn_at: Option<u64>,
}

impl Store {
    pub fn new(dir: &Path) -> Store {
        let torn_at = std::env::var("GATEVISOR_FAULT").ok().and_then(|f| {
            f.strip_prefix("torn-state-write:")
                .and_then(|n| n.parse().ok())
        });
        Store {
            dir: dir.into(),
            writes: AtomicU64::new(0),
            torn_at,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The last committed document (an empty one when none was ever written).
    pub fn load(&self) -> Result<StateDoc, StateError> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(StateDoc {
                    version: VERSION,
                    ..StateDoc::default()
                })
            }
            Err(source) => return Err(StateError::Read { path, source }),
        };
        let corrupt = |message: String| StateError::Corrupt {
            path: path.clone(),
            message,
        };
        let mut doc: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        migrate(&mut doc).map_err(corrupt)?;
        serde_json::from_value(doc).map_err(|e| corrupt(e.to_string()))
    }

    pub fn save(&self, doc: &StateDoc) -> Result<(), StateError> {
        let path = self.path();
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let err = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(doc).expect("state serialises");
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        // Services' `env` may hold secrets: only the daemon reads this file.
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(err)?
        };
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(err)?;
        if self.torn_at == Some(n) {
            let _ = f.write_all(&bytes[..bytes.len() / 2]);
            let _ = f.sync_all();
            eprintln!("gatevisor: fault injection: aborting in the middle of state write {n}");
            std::process::abort();
        }
        f.write_all(&bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(err)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(())
    }
}

/// Brings an older state document to [`VERSION`]: each version 1 record gets the plan its
/// install would have made. A newer document than this daemon knows is refused (a
/// downgrade must not drop what it cannot read).
fn migrate(doc: &mut serde_json::Value) -> Result<(), String> {
    let version = doc.get("version").and_then(|v| v.as_u64()).unwrap_or(1);
    if version > VERSION as u64 {
        return Err(format!(
            "state format {version} is newer than this gatevisor's ({VERSION})"
        ));
    }
    if version == VERSION as u64 {
        return Ok(());
    }
    let services = doc
        .get_mut("services")
        .and_then(|s| s.as_object_mut())
        .into_iter()
        .flat_map(|s| s.iter_mut());
    for (name, rec) in services {
        let Some(rec) = rec.as_object_mut() else {
            continue;
        };
        let field = |k: &str| rec.get(k).cloned().unwrap_or(serde_json::Value::Null);
        let bad = |what: &str, e: serde_json::Error| format!("service {name}: {what}: {e}");
        let m: Manifest =
            serde_json::from_value(field("manifest")).map_err(|e| bad("manifest", e))?;
        let runtime: crate::runtime::Kind =
            serde_json::from_value(field("runtime")).map_err(|e| bad("runtime", e))?;
        let package_version: Option<String> = serde_json::from_value(field("package_version"))
            .map_err(|e| bad("package_version", e))?;
        let idmap_base: Option<u32> =
            serde_json::from_value(field("idmap_base")).map_err(|e| bad("idmap_base", e))?;
        let plan =
            crate::plan::Plan::of_version_1(&m, runtime, package_version.as_deref(), idmap_base);
        rec.remove("runtime");
        rec.remove("idmap_base");
        rec.insert(
            "plan".into(),
            serde_json::to_value(plan).expect("a plan serialises"),
        );
    }
    doc["version"] = VERSION.into();
    Ok(())
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_round_trips_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(d.path());
        assert!(s.load().unwrap().services.is_empty());
        let doc = StateDoc {
            version: VERSION,
            ..Default::default()
        };
        s.save(&doc).unwrap();
        assert_eq!(s.load().unwrap(), doc);
        assert!(!d.path().join("state.json.tmp").exists());
    }

    #[test]
    fn torn_temp_file_does_not_affect_committed_state() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(d.path());
        let doc = StateDoc {
            version: VERSION,
            ..Default::default()
        };
        s.save(&doc).unwrap();
        std::fs::write(d.path().join("state.json.tmp"), b"{\"version\": 1, \"serv").unwrap();
        assert_eq!(s.load().unwrap(), doc);
    }

    /// A document written by a daemon before records had a plan loads with the plan its
    /// install would have made, and is written back as the current version; one from a
    /// newer daemon is refused rather than read with what it holds dropped.
    #[test]
    fn a_version_1_document_is_migrated_and_a_newer_one_refused() {
        let d = tempfile::tempdir().unwrap();
        let manifest = |name: &str| {
            let f = d.path().join(format!("{name}.toml"));
            std::fs::write(
                &f,
                format!("name = \"{name}\"\nversion = \"1.0.0\"\nruntime = \"lxc\"\nimage = \"builtin:busybox\"\ncommand = [\"/bin/sh\"]\n[resources]\nmemory_mib = 32\n[network]\ninterface = true\n"),
            )
            .unwrap();
            serde_json::to_value(Manifest::load(&f).unwrap()).unwrap()
        };
        let record = |name: &str, runtime: &str, pkg: Option<&str>, idmap: Option<u32>| {
            serde_json::json!({
                "id": 1, "manifest": manifest(name), "source": "/x", "package_version": pkg,
                "runtime": runtime, "idmap_base": idmap, "desired": "running",
                "state": "running", "running": null, "restarts": 0,
                "consecutive_failures": 0, "last_exit": null, "failure_reason": null,
                "installed_at_ms": 1
            })
        };
        let v1 = serde_json::json!({
            "version": 1,
            "services": {
                "pkg": record("pkg", "lxc", Some("1.0.0"), Some(0x1000_0000)),
                "own": record("own", "lxc", None, None),
                "vm": record("vm", "microvm", Some("1.0.0"), None),
            }
        });
        std::fs::write(d.path().join(STATE_FILE), v1.to_string()).unwrap();
        let s = Store::new(d.path());
        let doc = s.load().unwrap();
        assert_eq!(doc.version, VERSION);
        let plan = |n: &str| doc.services[n].plan.clone();
        use crate::plan::Root;
        assert_eq!(
            plan("pkg").root,
            Root::Checkout {
                version: "1.0.0".into()
            }
        );
        assert_eq!(plan("pkg").idmap_base, Some(0x1000_0000));
        assert_eq!(plan("own").root, Root::Own);
        assert_eq!(plan("vm").root, Root::Initramfs);
        assert_eq!(plan("vm").runtime, crate::runtime::Kind::Microvm);
        assert!(plan("vm").port.is_some());
        s.save(&doc).unwrap();
        assert_eq!(s.load().unwrap(), doc, "written back as version {VERSION}");

        let newer = serde_json::json!({"version": VERSION + 1, "services": {}});
        std::fs::write(d.path().join(STATE_FILE), newer.to_string()).unwrap();
        let e = s.load().unwrap_err().to_string();
        assert!(e.contains("corrupt"), "{e}");
        let e = format!("{:?}", s.load().unwrap_err());
        assert!(e.contains("newer than this gatevisor"), "{e}");
    }
}
