//! The operator's detached signature of an image: a small TOML document naming the image's
//! digest (its manifest's; a docker archive's config's) and an ed25519 signature of it by a
//! publisher key the gateway trusts (`gatevisor key trust`).
//!
//! ```toml
//! format = 1
//! digest = "sha256:…"      # what is signed
//! key = "0123456789abcdef" # the signing key's id
//! signature = "…"          # 128 hex digits
//! ```
//!
//! The signed message is `gatevisor-image-signature-v1 sha256:HEX`: a signature made for an
//! image can never pass as one of a package manifest, and the other way round.

use serde::{Deserialize, Serialize};

use super::{Digest, OciError};
use crate::keys::{self, SecretKey, TrustStore};

pub const FORMAT: u32 = 1;
const MAX: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureDoc {
    pub format: u32,
    pub digest: Digest,
    pub key: String,
    pub signature: String,
}

fn message(d: &Digest) -> Vec<u8> {
    format!("gatevisor-image-signature-v1 {d}").into_bytes()
}

/// The document signing `digest` with `key`.
pub fn sign(key: &SecretKey, digest: &Digest) -> String {
    let doc = SignatureDoc {
        format: FORMAT,
        digest: digest.clone(),
        key: keys::key_id(&key.public()),
        signature: hex::encode(key.sign(&message(digest))),
    };
    toml::to_string(&doc).expect("a signature document serialises")
}

/// Checks that `text` signs `digest` with a trusted, unrevoked key; answers the key's id and
/// the name it was trusted under (the publisher).
pub fn verify(
    text: &[u8],
    digest: &Digest,
    trust: &TrustStore,
) -> Result<(String, String), OciError> {
    let bad = |why: String| OciError::Signature {
        digest: digest.to_string(),
        why,
    };
    if text.len() > MAX {
        return Err(bad(format!("the signature document is over {MAX} bytes")));
    }
    let text =
        std::str::from_utf8(text).map_err(|_| bad("the signature document is not UTF-8".into()))?;
    let doc: SignatureDoc =
        toml::from_str(text).map_err(|e| bad(format!("the signature document is invalid: {e}")))?;
    if doc.format != FORMAT {
        return Err(bad(format!(
            "signature format {} (this gateway reads {FORMAT})",
            doc.format
        )));
    }
    if doc.digest != *digest {
        return Err(bad(format!(
            "the signature is for {}, another image",
            doc.digest
        )));
    }
    let (key, name) = trust.get(&doc.key).map_err(|e| bad(e.to_string()))?;
    let sig: [u8; 64] = hex::decode(&doc.signature)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad("the signature is not 128 hex digits".into()))?;
    if !keys::verify(&key, &message(digest), &sig) {
        return Err(bad(format!(
            "the signature does not verify with key {}",
            doc.key
        )));
    }
    Ok((doc.key, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_trusted_key_signing_this_digest_passes() {
        let d = tempfile::tempdir().unwrap();
        let secret = SecretKey::generate().unwrap();
        let public = secret.save(&d.path().join("op.key"), "operator").unwrap();
        let trust = TrustStore::new(&d.path().join("keys"));
        let digest = Digest::of(b"manifest");
        let doc = sign(&secret, &digest);
        // Not trusted yet.
        assert!(verify(doc.as_bytes(), &digest, &trust).is_err());
        let id = trust.trust(&public).unwrap();
        assert_eq!(
            verify(doc.as_bytes(), &digest, &trust).unwrap(),
            (id.clone(), "operator".into())
        );
        // Another image's digest.
        let e = verify(doc.as_bytes(), &Digest::of(b"other"), &trust).unwrap_err();
        assert!(e.to_string().contains("another image"), "{e}");
        // The document's digest changed to the other image: the signature fails.
        let forged = doc.replace(&digest.to_string(), &Digest::of(b"other").to_string());
        let e = verify(forged.as_bytes(), &Digest::of(b"other"), &trust).unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
        trust.revoke(&id).unwrap();
        let e = verify(doc.as_bytes(), &digest, &trust).unwrap_err();
        assert!(e.to_string().contains("revoked"), "{e}");
    }
}
