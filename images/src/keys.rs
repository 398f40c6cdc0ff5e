//! Publisher keys: ed25519 key pairs, the gateway's trust store and revocations.
//!
//! Files are one line of text:
//! - secret key: `gatevisor-ed25519-secret HEX32` (mode 0600, stays with the publisher);
//! - public key: `gatevisor-ed25519 HEX32 NAME`.
//!
//! The trust store is a directory: `trusted/KEYID.pub` for each trusted key and
//! `revoked/KEYID` for each revoked one (a revocation wins over trust). A key id is the first
//! 16 hex digits of the SHA-256 of the public key.

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a gatevisor {what} key file (expected `{expected} HEX...`)")]
    Format {
        path: PathBuf,
        what: &'static str,
        expected: &'static str,
    },
    #[error("no random numbers from the kernel: {0}")]
    Random(getrandom::Error),
    #[error("no trusted key with id {0}")]
    NotTrusted(String),
    #[error("key names are 1 to 32 characters of a-z, 0-9, '-' and '_'")]
    BadName,
    #[error("{0:?} is not a key id (16 lowercase hex digits, as `gatevisor key gen` prints)")]
    BadId(String),
}

/// Length of a key id in hex digits.
pub const KEY_ID_LEN: usize = 16;

/// Is `id` exactly of the form [`key_id`] makes (16 lowercase hex digits)? Only such ids ever
/// become file names in the trust store.
pub fn valid_key_id(id: &str) -> bool {
    id.len() == KEY_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `KEYID` of a public key.
pub fn key_id(public: &VerifyingKey) -> String {
    hex::encode(&ring::digest::digest(&ring::digest::SHA256, public.as_bytes()).as_ref()[..8])
}

pub struct SecretKey(SigningKey);

impl SecretKey {
    pub fn generate() -> Result<SecretKey, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(KeyError::Random)?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    pub fn public(&self) -> VerifyingKey {
        self.0.verifying_key()
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    pub fn load(path: &Path) -> Result<SecretKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.into(),
            source,
        })?;
        let bad = || KeyError::Format {
            path: path.into(),
            what: "secret",
            expected: "gatevisor-ed25519-secret",
        };
        let hex32 = text
            .trim()
            .strip_prefix("gatevisor-ed25519-secret ")
            .ok_or_else(bad)?;
        let bytes: [u8; 32] = hex::decode(hex32.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(bad)?;
        Ok(SecretKey(SigningKey::from_bytes(&bytes)))
    }

    /// Writes the secret key (mode 0600, refusing to overwrite) and its public key beside it.
    pub fn save(&self, path: &Path, name: &str) -> Result<PathBuf, KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        valid_name(name)?;
        let w = |source| KeyError::Write {
            path: path.into(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(w)?;
        writeln!(
            f,
            "gatevisor-ed25519-secret {}",
            hex::encode(self.0.to_bytes())
        )
        .map_err(w)?;
        let public = path.with_extension("pub");
        std::fs::write(&public, public_line(&self.public(), name)).map_err(|source| {
            KeyError::Write {
                path: public.clone(),
                source,
            }
        })?;
        Ok(public)
    }
}

fn valid_name(name: &str) -> Result<(), KeyError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    ok.then_some(()).ok_or(KeyError::BadName)
}

pub fn public_line(key: &VerifyingKey, name: &str) -> String {
    format!("gatevisor-ed25519 {} {name}\n", hex::encode(key.as_bytes()))
}

/// A public key file: the key and its name.
pub fn load_public(path: &Path) -> Result<(VerifyingKey, String), KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.into(),
        source,
    })?;
    let bad = || KeyError::Format {
        path: path.into(),
        what: "public",
        expected: "gatevisor-ed25519",
    };
    let mut parts = text.split_whitespace();
    if parts.next() != Some("gatevisor-ed25519") {
        return Err(bad());
    }
    let bytes: [u8; 32] = parts
        .next()
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(bad)?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|_| bad())?;
    Ok((key, parts.next().unwrap_or("unnamed").to_string()))
}

/// One key as the trust store lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    pub revoked: bool,
}

/// The gateway's trusted publisher keys.
#[derive(Clone)]
pub struct TrustStore {
    dir: PathBuf,
}

impl TrustStore {
    pub fn new(dir: &Path) -> TrustStore {
        TrustStore { dir: dir.into() }
    }

    /// Only called with ids that passed [`valid_key_id`]: never a path from package data.
    fn trusted_path(&self, id: &str) -> PathBuf {
        debug_assert!(valid_key_id(id));
        self.dir.join("trusted").join(format!("{id}.pub"))
    }

    fn revoked_path(&self, id: &str) -> PathBuf {
        debug_assert!(valid_key_id(id));
        self.dir.join("revoked").join(id)
    }

    /// Trusts the public key in `public_file`; returns its id.
    pub fn trust(&self, public_file: &Path) -> Result<String, KeyError> {
        let (key, name) = load_public(public_file)?;
        let id = key_id(&key);
        let path = self.trusted_path(&id);
        let w = |source| KeyError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(path.parent().expect("has parent")).map_err(w)?;
        std::fs::write(&path, public_line(&key, &name)).map_err(w)?;
        Ok(id)
    }

    /// Revokes key `id` (kept as revoked even if trusted again).
    pub fn revoke(&self, id: &str) -> Result<(), KeyError> {
        if !valid_key_id(id) {
            return Err(KeyError::BadId(id.into()));
        }
        if !self.trusted_path(id).exists() {
            return Err(KeyError::NotTrusted(id.into()));
        }
        let path = self.revoked_path(id);
        let w = |source| KeyError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(path.parent().expect("has parent")).map_err(w)?;
        std::fs::write(&path, b"revoked\n").map_err(w)
    }

    pub fn list(&self) -> Vec<KeyInfo> {
        let mut v: Vec<KeyInfo> = std::fs::read_dir(self.dir.join("trusted"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let (key, name) = load_public(&e.path()).ok()?;
                let id = key_id(&key);
                Some(KeyInfo {
                    revoked: self.revoked_path(&id).exists(),
                    id,
                    name,
                })
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// The usable (trusted, not revoked) key with `id`, and the name it was given
    /// (`gatevisor key gen --name`): the publisher.
    ///
    /// `id` comes from a package: it is checked against the exact form of a key id before it
    /// names a file, and the key found must itself have that id (a file under another name,
    /// copied or renamed into `trusted/`, is not trusted).
    pub fn get(&self, id: &str) -> Result<(VerifyingKey, String), crate::package::PackageError> {
        use crate::package::PackageError;
        if !valid_key_id(id) {
            return Err(PackageError::BadKeyId);
        }
        if self.revoked_path(id).exists() {
            return Err(PackageError::RevokedKey { id: id.into() });
        }
        let (key, name) = load_public(&self.trusted_path(id))
            .map_err(|_| PackageError::UntrustedKey { id: id.into() })?;
        if key_id(&key) != id {
            return Err(PackageError::UntrustedKey { id: id.into() });
        }
        Ok((key, name))
    }
}

/// Checks `signature` of `message` with `key` (strict: no malleable signatures).
pub fn verify(key: &VerifyingKey, message: &[u8], signature: &[u8; 64]) -> bool {
    let sig = ed25519_dalek::Signature::from_bytes(signature);
    key.verify_strict(message, &sig).is_ok() && key.verify(message, &sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_sign_verify_and_revocation_wins() {
        let d = tempfile::tempdir().unwrap();
        let k = SecretKey::generate().unwrap();
        let public = k.save(&d.path().join("op.key"), "operator").unwrap();
        assert!(
            k.save(&d.path().join("op.key"), "operator").is_err(),
            "never overwrites"
        );
        let k2 = SecretKey::load(&d.path().join("op.key")).unwrap();
        let sig = k2.sign(b"hello");
        assert!(verify(&k.public(), b"hello", &sig));
        assert!(!verify(&k.public(), b"hellp", &sig));

        let store = TrustStore::new(&d.path().join("trust"));
        let id = store.trust(&public).unwrap();
        assert!(store.get(&id).is_ok());
        assert_eq!(store.list()[0].name, "operator");
        store.revoke(&id).unwrap();
        assert!(store.get(&id).is_err());
        store.trust(&public).unwrap();
        assert!(
            store.get(&id).is_err(),
            "re-trusting does not undo a revocation"
        );
        assert!(store.list()[0].revoked);
    }

    #[test]
    fn key_ids_from_packages_never_become_paths() {
        let d = tempfile::tempdir().unwrap();
        let k = SecretKey::generate().unwrap();
        let public = k.save(&d.path().join("op.key"), "operator").unwrap();
        let store = TrustStore::new(&d.path().join("trust"));
        let id = store.trust(&public).unwrap();
        assert!(valid_key_id(&id), "{id}");
        for bad in [
            format!("../trusted/{id}"),
            "../../op".to_string(),
            id.to_uppercase(),
            format!("{id}0"),
            id[1..].to_string(),
            String::new(),
        ] {
            assert!(
                matches!(store.get(&bad), Err(crate::package::PackageError::BadKeyId)),
                "{bad:?} accepted"
            );
        }
        // A key file under another key's id is not that key.
        let other = SecretKey::generate().unwrap();
        let fake = "0123456789abcdef";
        std::fs::write(
            d.path().join("trust/trusted").join(format!("{fake}.pub")),
            public_line(&other.public(), "fake"),
        )
        .unwrap();
        assert!(store.get(fake).is_err());
        assert!(store.revoke("../x").is_err());
    }

    #[test]
    fn malformed_key_files_name_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bad.pub");
        std::fs::write(&p, "ssh-ed25519 AAAA").unwrap();
        let e = load_public(&p).unwrap_err().to_string();
        assert!(
            e.contains("bad.pub") && e.contains("gatevisor-ed25519"),
            "{e}"
        );
    }
}
