//! SHA-256 content digests (`sha256:HEX`) and readers that verify one while they stream.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

use super::OciError;

/// A SHA-256 digest; the only algorithm accepted (the OCI specs' registered default).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest {
    hex: String,
}

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, OciError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| OciError::BadDigest(s.into()))?;
        if hex.len() != 64 || !hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(OciError::BadDigest(s.into()));
        }
        Ok(Digest { hex: hex.into() })
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest {
            hex: hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes)),
        }
    }

    /// The 64 hex digits: a file name that can never be a path.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The first 12 hex digits, as listings show them.
    pub fn short(&self) -> &str {
        &self.hex[..12]
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl TryFrom<String> for Digest {
    type Error = OciError;
    fn try_from(s: String) -> Result<Digest, OciError> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.to_string()
    }
}

/// Hashes what is read through it and refuses to read past `limit` bytes.
pub struct Hashing<R> {
    inner: R,
    ctx: ring::digest::Context,
    bytes: u64,
    limit: u64,
}

impl<R: Read> Hashing<R> {
    pub fn new(inner: R, limit: u64) -> Hashing<R> {
        Hashing {
            inner,
            ctx: ring::digest::Context::new(&ring::digest::SHA256),
            bytes: 0,
            limit,
        }
    }

    /// Reads what is left, then checks the whole against `want` (and `size`, when known).
    pub fn finish(mut self, what: &str, want: &Digest, size: Option<u64>) -> Result<(), OciError> {
        io::copy(&mut self, &mut io::sink()).map_err(|e| too_large_or(what, self.limit, e))?;
        if let Some(expected) = size.filter(|s| *s != self.bytes) {
            return Err(OciError::SizeMismatch {
                what: what.into(),
                expected,
                actual: self.bytes,
            });
        }
        let actual = Digest {
            hex: hex::encode(self.ctx.finish()),
        };
        if actual != *want {
            return Err(OciError::DigestMismatch {
                what: what.into(),
                expected: want.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(())
    }
}

/// The error of a read past the limit, as [`OciError::TooLarge`].
pub(crate) fn too_large_or(what: &str, limit: u64, e: io::Error) -> OciError {
    if e.kind() == io::ErrorKind::FileTooLarge {
        OciError::TooLarge {
            what: what.into(),
            limit,
        }
    } else {
        OciError::io(what)(e)
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes += n as u64;
        if self.bytes > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!("more than {} bytes", self.limit),
            ));
        }
        self.ctx.update(&buf[..n]);
        Ok(n)
    }
}

/// Reads all of `r` (at most `limit` bytes) and checks it against `want` and `size`.
pub fn read_verified(
    r: impl Read,
    what: &str,
    want: &Digest,
    size: Option<u64>,
    limit: u64,
) -> Result<Vec<u8>, OciError> {
    if let Some(s) = size.filter(|s| *s > limit) {
        return Err(OciError::TooLarge {
            what: format!("{what} ({s} bytes)"),
            limit,
        });
    }
    let mut h = Hashing::new(r, limit);
    let mut buf = Vec::new();
    h.read_to_end(&mut buf)
        .map_err(|e| too_large_or(what, limit, e))?;
    h.finish(what, want, size)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_only_in_their_exact_form() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
        for bad in [
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha512:ba7816bf",
            "sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
            "sha256:../../etc/passwd",
            "sha256:",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_stream_is_checked_against_its_digest_and_size() {
        let d = Digest::of(b"hello");
        assert_eq!(
            read_verified(&b"hello"[..], "x", &d, Some(5), 100).unwrap(),
            b"hello"
        );
        assert!(matches!(
            read_verified(&b"hellO"[..], "x", &d, Some(5), 100),
            Err(OciError::DigestMismatch { .. })
        ));
        assert!(matches!(
            read_verified(&b"hello"[..], "x", &d, Some(6), 100),
            Err(OciError::SizeMismatch { .. })
        ));
        assert!(matches!(
            read_verified(&b"hello"[..], "x", &d, None, 3),
            Err(OciError::TooLarge { .. })
        ));
    }
}
