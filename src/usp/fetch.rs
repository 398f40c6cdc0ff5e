//! Fetching a package a Controller names by URL: `file://PATH`, `http://HOST[:PORT]/PATH` or
//! `https://HOST[:PORT]/PATH` (HTTP/1.1, no redirects; https verified against a CA bundle),
//! written to a temporary file then renamed, at most [`MAX_BYTES`]. The package is verified
//! afterwards exactly as a local install verifies it.
//!
//! A fetch ends by its deadline, whatever the server does: every blocking call on the
//! connection waits at most until then, and a stalled connection ([`IDLE`] without a byte)
//! fails earlier.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A connection that moves no byte for this long has failed.
pub const IDLE: Duration = Duration::from_secs(60);

/// The longest HTTP header line accepted from a package server.
const MAX_HEADER_LINE: usize = 8192;
/// The most HTTP header lines accepted from a package server.
const MAX_HEADERS: usize = 100;
pub const MAX_BYTES: u64 = 512 << 20;
/// Where Debian keeps the system's trusted CAs.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn bad(m: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, m.into())
}

/// The CAs in the PEM file `path`. `lenient` skips certificates rustls refuses (a system
/// bundle holds a few); otherwise any bad one is an error (an operator's CA file).
pub fn ca_roots(path: &Path, lenient: bool) -> std::io::Result<rustls::RootCertStore> {
    let at = |e: &dyn std::fmt::Display| bad(format!("{}: {e}", path.display()));
    let pem = std::fs::read(path).map_err(|e| at(&e))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        match c
            .map_err(|e| at(&e))
            .and_then(|c| roots.add(c).map_err(|e| at(&e)))
        {
            Err(_) if lenient => {}
            r => r?,
        }
    }
    if roots.is_empty() {
        return Err(at(&"no CA certificate"));
    }
    Ok(roots)
}

/// A rustls client configuration on ring with the safe default protocol versions.
pub fn client_builder(
) -> std::io::Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))
}

/// The TLS client configuration for `https://` downloads: the CAs in `bundle` (PEM).
pub fn https_config(bundle: &Path) -> std::io::Result<rustls::ClientConfig> {
    Ok(client_builder()?
        .with_root_certificates(ca_roots(bundle, true)?)
        .with_no_client_auth())
}

fn overdue() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "its deadline passed")
}

/// A TCP connection whose reads and writes block at most until `deadline` (then they fail
/// with `TimedOut`) and at most [`IDLE`] each.
struct Bounded {
    tcp: TcpStream,
    deadline: Instant,
}

impl Bounded {
    fn arm(&self) -> std::io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(overdue());
        }
        let wait = Some(left.min(IDLE));
        self.tcp.set_read_timeout(wait)?;
        self.tcp.set_write_timeout(wait)
    }
    /// A socket timeout (EAGAIN) is the deadline's if it has passed, else a stalled peer's.
    fn timed_out(&self, e: std::io::Error) -> std::io::Error {
        if !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            e
        } else if Instant::now() >= self.deadline {
            overdue()
        } else {
            bad(format!("no data for {} s", IDLE.as_secs()))
        }
    }
}

impl Read for Bounded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.tcp.read(buf).map_err(|e| self.timed_out(e))
    }
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.tcp.write(buf).map_err(|e| self.timed_out(e))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

/// Copies at most `limit` bytes from `r` to `out`, stopping at `deadline` (`TimedOut`).
/// Returns the number of bytes copied; a body that ends with the connection (a TLS peer
/// that closes without close_notify) ends the copy too.
fn copy_until(
    r: &mut impl Read,
    out: &mut impl Write,
    limit: u64,
    deadline: Instant,
) -> std::io::Result<u64> {
    let mut n = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    while n < limit {
        if Instant::now() >= deadline {
            return Err(overdue());
        }
        let want = buf.len().min((limit - n) as usize);
        match r.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(k) => {
                out.write_all(&buf[..k])?;
                n += k as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
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
    } else if let Some(rest) = url.strip_prefix("http://") {
        let (host, port, path) = split(rest, 80)?;
        connect(&host, port, deadline)
            .and_then(|conn| get(conn, &host, port, path, &mut out, deadline))
    } else if let Some(rest) = url.strip_prefix("https://") {
        let tls = tls.ok_or_else(|| bad("https:// needs a CA bundle"))?;
        let (host, port, path) = split(rest, 443)?;
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| bad(format!("{host}: {e}")))?;
        let session =
            rustls::ClientConnection::new(tls.clone(), name).map_err(|e| bad(e.to_string()))?;
        connect(&host, port, deadline).and_then(|conn| {
            let conn = rustls::StreamOwned::new(session, conn);
            get(conn, &host, port, path, &mut out, deadline)
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
            _ if Instant::now() >= deadline => Err(overdue()),
            n => Ok(n),
        })
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
    out.sync_all()?;
    std::fs::rename(&tmp, dest)
}

/// `HOST[:PORT]/PATH` → (host, port, path).
fn split(rest: &str, default_port: u16) -> std::io::Result<(String, u16, &str)> {
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    match hostport.rsplit_once(':') {
        Some((h, p)) => Ok((
            h.to_string(),
            p.parse()
                .map_err(|_| bad(format!("{hostport}: bad port")))?,
            path,
        )),
        None => Ok((hostport.to_string(), default_port, path)),
    }
}

fn connect(host: &str, port: u16, deadline: Instant) -> std::io::Result<Bounded> {
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))?
        .next()
        .ok_or_else(|| bad(format!("{host}: no address")))?;
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(overdue());
    }
    let tcp = TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(10)))?;
    Ok(Bounded { tcp, deadline })
}

/// One HTTP/1.1 GET on `conn`; the body goes to `out`. Returns its length.
fn get(
    mut conn: impl Read + Write,
    host: &str,
    port: u16,
    path: &str,
    out: &mut std::fs::File,
    deadline: Instant,
) -> std::io::Result<u64> {
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\nUser-Agent: gatevisor\r\n\r\n"
    )?;
    conn.flush()?;
    let mut r = BufReader::new(conn);
    // A server that never ends a line, or sends headers forever, is cut off: each line is at
    // most MAX_HEADER_LINE bytes, and there are at most MAX_HEADERS of them.
    let line = |r: &mut BufReader<_>| -> std::io::Result<String> {
        let mut buf = Vec::new();
        (&mut *r)
            .take(MAX_HEADER_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)?;
        if buf.len() > MAX_HEADER_LINE {
            return Err(bad(format!(
                "an HTTP header line is longer than {MAX_HEADER_LINE} bytes"
            )));
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let status = line(&mut r)?;
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(bad(format!("HTTP answer {:?}", status.trim())));
    }
    let mut length = None;
    for n in 0.. {
        if n == MAX_HEADERS {
            return Err(bad(format!("more than {MAX_HEADERS} HTTP header lines")));
        }
        let h = line(&mut r)?;
        if h.is_empty() {
            return Err(bad("the HTTP headers were cut short"));
        }
        let h = h.trim();
        if h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse::<u64>().ok();
        }
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            return Err(bad("chunked HTTP bodies are not supported"));
        }
    }
    match length {
        Some(l) if l > MAX_BYTES => Err(bad(format!("larger than {MAX_BYTES} bytes"))),
        Some(l) => {
            let n = copy_until(&mut r, out, l, deadline)?;
            if n != l {
                return Err(bad(format!("truncated download: {n} of {l} bytes")));
            }
            Ok(n)
        }
        // Without a length the body ends with the connection.
        None => copy_until(&mut r, out, MAX_BYTES + 1, deadline),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `get` makes of a server that answers `reply` (then closes).
    fn answer(reply: Vec<u8>) -> std::io::Result<u64> {
        let (mut ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            // The whole request first (the client may write it in pieces), then the reply;
            // open until the client is done, so that its writes never meet a closed socket.
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match theirs.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = theirs.write_all(&reply);
            let _ = theirs.read_to_end(&mut req);
        });
        ours.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut out = tempfile::tempfile().unwrap();
        let res = get(
            &mut ours,
            "h",
            80,
            "/p",
            &mut out,
            Instant::now() + Duration::from_secs(10),
        );
        drop(ours);
        let _ = server.join();
        res
    }

    #[test]
    fn a_server_that_sends_headers_without_end_is_cut_off() {
        let mut endless = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..1000 {
            endless.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        let e = answer(endless).unwrap_err().to_string();
        assert!(e.contains("more than 100 HTTP header lines"), "{e}");
        let mut long = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 100_000));
        let e = answer(long).unwrap_err().to_string();
        assert!(e.contains("longer than 8192 bytes"), "{e}");
        let ok = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc".to_vec());
        assert_eq!(ok.unwrap(), 3);
    }
}
