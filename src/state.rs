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
    /// The runtime actually used (`auto` resolved at install).
    pub runtime: crate::runtime::Kind,
    /// A container's user namespace starts at this host id (`None`: privileged, or a service
    /// installed before containers had one).
    #[serde(default)]
    pub idmap_base: Option<u32>,
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
                    version: 1,
                    ..StateDoc::default()
                })
            }
            Err(source) => return Err(StateError::Read { path, source }),
        };
        serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            path,
            message: e.to_string(),
        })
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
            version: 1,
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
            version: 1,
            ..Default::default()
        };
        s.save(&doc).unwrap();
        std::fs::write(d.path().join("state.json.tmp"), b"{\"version\": 1, \"serv").unwrap();
        assert_eq!(s.load().unwrap(), doc);
    }
}
