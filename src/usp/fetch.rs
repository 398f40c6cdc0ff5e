//! Fetching a package a Controller names by URL: `file://PATH`, `http://HOST[:PORT]/PATH` or
//! `https://HOST[:PORT]/PATH` (HTTP/1.1 by `gatevisor_images::http`, no redirects; https verified against a CA bundle),
//! written to a temporary file then renamed, at most [`MAX_BYTES`]. The package is verified
//! afterwards exactly as a local install verifies it.
//!
//! A fetch ends by its deadline, whatever the server does: every blocking call on the
//! connection waits at most until then, and a stalled connection ([`IDLE`] without a byte)
//! fails earlier.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use gatevisor_images::http::{self, copy_until, Url};
pub use gatevisor_images::http::{ca_roots, client_builder, IDLE, SYSTEM_CA_BUNDLE};

pub const MAX_BYTES: u64 = 512 << 20;

fn bad(m: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, m.into())
}

/// The TLS client configuration for `https://` downloads: the CAs in `bundle` (PEM).
pub fn https_config(bundle: &Path) -> std::io::Result<rustls::ClientConfig> {
    http::https_config(bundle, true)
}

/// Fetches `url` into `dest`; `tls` is needed for `https://`. Fails with `TimedOut` once
/// `deadline` has passed.
pub fn fetch(
    url: &str,
    dest: &Path,
    tls: Option<&Arc<rustls::ClientConfig>>,
    deadline: Instant,
) -> std::io::Result<()> {
    let tmp = dest.with_extension("part");
    let mut out = std::fs::File::create(&tmp)?;
    let copied = if let Some(path) = url.strip_prefix("file://") {
        std::fs::File::open(path)
            .and_then(|mut f| copy_until(&mut f, &mut out, MAX_BYTES + 1, deadline))
    } else if url.starts_with("http://") || url.starts_with("https://") {
        Url::parse(url)
            .and_then(|u| http::get(&u, &[], tls, deadline))
            .and_then(|mut r| {
                if r.status != 200 {
                    return Err(bad(format!("HTTP answer {} {}", r.status, r.reason)));
                }
                match r.content_length() {
                    Some(l) if l > MAX_BYTES => Err(bad(format!("larger than {MAX_BYTES} bytes"))),
                    _ => copy_until(&mut r, &mut out, MAX_BYTES + 1, deadline),
                }
            })
    } else {
        Err(bad(format!(
            "{url}: only file://, http:// and https:// URLs are fetched"
        )))
    };
    // A body that ended exactly as the deadline passed is late all the same.
    copied
        .and_then(|n| match n {
            n if n > MAX_BYTES => Err(bad(format!("larger than {MAX_BYTES} bytes"))),
            _ if Instant::now() >= deadline => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "its deadline passed",
            )),
            n => Ok(n),
        })
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
    out.sync_all()?;
    std::fs::rename(&tmp, dest)
}
