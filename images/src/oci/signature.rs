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
//!
//! A **deployment document** is the same document carrying the operator's service manifest
//! for the image too (`service = """…"""`, the TOML of `service install --manifest`), for a
//! gateway that is told only the image's reference (a USP InstallDU). Then the signed
//! message is `gatevisor-image-signature-v1 sha256:HEX service sha256:M`, `M` the SHA-256 of
//! the manifest's text: the manifest cannot be swapped or dropped without the signature
//! failing, and a plain signature's message never equals a deployment's.

use serde::{Deserialize, Serialize};

use super::{Digest, OciError};
use crate::keys::{self, SecretKey, TrustStore};

pub const FORMAT: u32 = 1;
/// A document's largest size: a signature and a service manifest.
pub const MAX: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureDoc {
    pub format: u32,
    pub digest: Digest,
    pub key: String,
    pub signature: String,
    /// The operator's service manifest for the image (a deployment document).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

fn message(d: &Digest, service: Option<&str>) -> Vec<u8> {
    match service {
        None => format!("gatevisor-image-signature-v1 {d}"),
        Some(s) => format!(
            "gatevisor-image-signature-v1 {d} service {}",
            Digest::of(s.as_bytes())
        ),
    }
    .into_bytes()
}

/// The document signing `digest` with `key`.
pub fn sign(key: &SecretKey, digest: &Digest) -> String {
    sign_deployment(key, digest, None)
}

/// The document signing `digest` with `key`, with the service manifest `service` (TOML)
/// signed along with it when given.
pub fn sign_deployment(key: &SecretKey, digest: &Digest, service: Option<&str>) -> String {
    let doc = SignatureDoc {
        format: FORMAT,
        digest: digest.clone(),
        key: keys::key_id(&key.public()),
        signature: hex::encode(key.sign(&message(digest, service))),
        service: service.map(str::to_string),
    };
    toml::to_string(&doc).expect("a signature document serialises")
}

/// Reads a document without checking its signature (what it claims, e.g. to find the
/// manifest a deployment carries before the gateway verifies it).
pub fn parse(text: &[u8]) -> Result<SignatureDoc, String> {
    if text.len() > MAX {
        return Err(format!("the signature document is over {MAX} bytes"));
    }
    let text =
        std::str::from_utf8(text).map_err(|_| "the signature document is not UTF-8".to_string())?;
    toml::from_str(text).map_err(|e| format!("the signature document is invalid: {e}"))
}

/// What a verified document says: the key's id, the name it was trusted under (the
/// publisher) and the service manifest it signs, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub key: String,
    pub publisher: String,
    pub service: Option<String>,
}

/// Checks that `text` signs `digest` with a trusted, unrevoked key; answers the key's id and
/// the name it was trusted under (the publisher).
pub fn verify(
    text: &[u8],
    digest: &Digest,
    trust: &TrustStore,
) -> Result<(String, String), OciError> {
    verify_document(text, digest, trust).map(|v| (v.key, v.publisher))
}

/// [`verify`], answering the service manifest the document signs too.
pub fn verify_document(
    text: &[u8],
    digest: &Digest,
    trust: &TrustStore,
) -> Result<Verified, OciError> {
    let bad = |why: String| OciError::Signature {
        digest: digest.to_string(),
        why,
    };
    let doc = parse(text).map_err(bad)?;
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
    if !keys::verify(&key, &message(digest, doc.service.as_deref()), &sig) {
        return Err(bad(format!(
            "the signature does not verify with key {}",
            doc.key
        )));
    }
    Ok(Verified {
        key: doc.key,
        publisher: name,
        service: doc.service,
    })
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

    #[test]
    fn a_deployment_documents_manifest_is_signed_with_the_digest() {
        let d = tempfile::tempdir().unwrap();
        let secret = SecretKey::generate().unwrap();
        let public = secret.save(&d.path().join("op.key"), "operator").unwrap();
        let trust = TrustStore::new(&d.path().join("keys"));
        trust.trust(&public).unwrap();
        let digest = Digest::of(b"manifest");
        let service = "name = \"broker\"\nversion = \"2.0\"\nruntime = \"auto\"\n";
        let doc = sign_deployment(&secret, &digest, Some(service));
        let v = verify_document(doc.as_bytes(), &digest, &trust).unwrap();
        assert_eq!(v.service.as_deref(), Some(service));
        assert_eq!(v.publisher, "operator");
        // The manifest changed (a capability added), or dropped: the signature fails.
        let mut t: SignatureDoc = toml::from_str(&doc).unwrap();
        t.service = Some(format!("{service}capabilities = [\"SYS_ADMIN\"]\n"));
        let e = verify_document(toml::to_string(&t).unwrap().as_bytes(), &digest, &trust);
        assert!(e.unwrap_err().to_string().contains("does not verify"));
        t.service = None;
        let e = verify_document(toml::to_string(&t).unwrap().as_bytes(), &digest, &trust);
        assert!(e.unwrap_err().to_string().contains("does not verify"));
        // A plain signature gains no manifest either.
        let mut plain: SignatureDoc = toml::from_str(&sign(&secret, &digest)).unwrap();
        plain.service = Some(service.into());
        let e = verify_document(toml::to_string(&plain).unwrap().as_bytes(), &digest, &trust);
        assert!(e.unwrap_err().to_string().contains("does not verify"));
    }
}
