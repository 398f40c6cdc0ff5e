//! Publisher keys: ed25519 key pairs, the gateway's trust store and revocations.
//!
//! Files are one line of text:
//! - secret key: `gatevisor-ed25519-secret HEX32` (mode 0600, stays with the publisher);
//! - public key: `gatevisor-ed25519 HEX32 NAME`.
//!
//! The trust store is a directory: `trusted/KEYID.pub` for each trusted key and
//! `revoked/KEYID` for each revoked one (a revocation wins over trust). A key id is the first
//! 16 hex digits of the SHA-256 of the public key.

use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use std::path::{Path, PathBuf};

/// An ed25519 public key (its 32 bytes; ring, which the gateway links for TLS anyway,
/// verifies with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyingKey([u8; 32]);

impl VerifyingKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> VerifyingKey {
        VerifyingKey(*bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

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

/// An ed25519 secret key: its 32-byte seed (RFC 8032), and the key pair made from it.
pub struct SecretKey {
    seed: [u8; 32],
    pair: Ed25519KeyPair,
}

impl SecretKey {
    fn from_seed(seed: [u8; 32]) -> SecretKey {
        let pair =
            Ed25519KeyPair::from_seed_unchecked(&seed).expect("any 32 bytes are an ed25519 seed");
        SecretKey { seed, pair }
    }

    pub fn generate() -> Result<SecretKey, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(KeyError::Random)?;
        Ok(SecretKey::from_seed(seed))
    }

    pub fn public(&self) -> VerifyingKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        VerifyingKey(k)
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut s = [0u8; 64];
        s.copy_from_slice(self.pair.sign(message).as_ref());
        s
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
        Ok(SecretKey::from_seed(bytes))
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
        writeln!(f, "gatevisor-ed25519-secret {}", hex::encode(self.seed)).map_err(w)?;
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
    Ok((
        VerifyingKey::from_bytes(&bytes),
        parts.next().unwrap_or("unnamed").to_string(),
    ))
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

/// Checks `signature` of `message` with `key` (RFC 8032; a signature whose S is not
/// reduced, the malleable form, is refused).
pub fn verify(key: &VerifyingKey, message: &[u8], signature: &[u8; 64]) -> bool {
    UnparsedPublicKey::new(&ED25519, key.as_bytes())
        .verify(message, signature)
        .is_ok()
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
    fn signatures_match_rfc_8032_and_a_malleable_one_is_refused() {
        // RFC 8032, section 7.1, test 2: the seed, its public key, and the signature of 0x72.
        let seed: [u8; 32] =
            hex::decode("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
                .unwrap()
                .try_into()
                .unwrap();
        let k = SecretKey::from_seed(seed);
        assert_eq!(
            hex::encode(k.public().as_bytes()),
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
        );
        let sig = k.sign(&[0x72]);
        assert_eq!(
            hex::encode(sig),
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
             085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
        );
        assert!(verify(&k.public(), &[0x72], &sig));
        // The same signature with L added to S: valid for a lax verifier, not here.
        const L: [u8; 32] = [
            0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9,
            0xde, 0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut malleable = sig;
        let mut carry = 0u16;
        for i in 0..32 {
            let v = malleable[32 + i] as u16 + L[i] as u16 + carry;
            malleable[32 + i] = v as u8;
            carry = v >> 8;
        }
        assert!(!verify(&k.public(), &[0x72], &malleable));
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
