//! A small HTTP/1.1 client for what the gateway downloads: packages a Controller names by URL
//! and images from a registry. `http://` and `https://` (rustls on ring, verified against a
//! CA bundle), one request per connection, bodies by length, chunked or until close.
//!
//! A request ends by its deadline, whatever the server does: every blocking call on the
//! connection waits at most until then, a stalled connection ([`IDLE`] without a byte) fails
//! earlier, and a server cannot make the client read endless header lines.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A connection that moves no byte for this long has failed.
pub const IDLE: Duration = Duration::from_secs(60);
/// The longest HTTP header line accepted.
const MAX_HEADER_LINE: usize = 8192;
/// The most HTTP header lines accepted.
const MAX_HEADERS: usize = 100;
/// Where Debian keeps the system's trusted CAs.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn bad(m: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, m.into())
}

fn overdue() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "its deadline passed")
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

/// The TLS client configuration for `https://`: the CAs in `bundle` (PEM); `lenient` as in
/// [`ca_roots`].
pub fn https_config(bundle: &Path, lenient: bool) -> std::io::Result<rustls::ClientConfig> {
    Ok(client_builder()?
        .with_root_certificates(ca_roots(bundle, lenient)?)
        .with_no_client_auth())
}

/// An `http://` or `https://` URL: scheme, host, port and the rest (path and query).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// From the first '/' on ("/" when the URL has none).
    pub path: String,
}

impl Url {
    pub fn parse(s: &str) -> std::io::Result<Url> {
        let (https, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad(format!("{s}: not an http:// or https:// URL")));
        };
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse().map_err(|_| bad(format!("{s}: bad port {p:?}")))?,
            ),
            _ => (hostport, if https { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty()
            || host.contains(['@', ' ', '\r', '\n'])
            || path.contains([' ', '\r', '\n'])
        {
            return Err(bad(format!("{s}: not a URL gatevisor fetches")));
        }
        Ok(Url {
            https,
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }

    /// `HOST:PORT` as the `Host` header says it.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Where a redirect's `Location` points from here: an absolute URL or an absolute path.
    pub fn join(&self, location: &str) -> std::io::Result<Url> {
        if location.starts_with('/') && !location.starts_with("//") {
            let mut u = self.clone();
            u.path = location.to_string();
            return Ok(u);
        }
        Url::parse(location)
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.path)
    }
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

/// What a connection is to a request: bytes both ways.
pub trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// An answer: its status, its headers, and its body as a reader (which fails with
/// `UnexpectedEof` when the connection ends before the body does).
pub struct Response {
    pub status: u16,
    pub reason: String,
    headers: Vec<(String, String)>,
    body: Body,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {} {}", self.status, self.reason)
    }
}

impl Response {
    /// The first header named `name` (any case), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body's length, when the server said it.
    pub fn content_length(&self) -> Option<u64> {
        match self.body {
            Body::Length { left, .. } => Some(left),
            _ => None,
        }
    }

    /// The body, read whole: at most `limit` bytes (more is an error).
    pub fn read_limited(mut self, limit: u64) -> std::io::Result<Vec<u8>> {
        if self.content_length().is_some_and(|l| l > limit) {
            return Err(bad(format!("the answer is larger than {limit} bytes")));
        }
        let mut out = Vec::new();
        (&mut self).take(limit + 1).read_to_end(&mut out)?;
        if out.len() as u64 > limit {
            return Err(bad(format!("the answer is larger than {limit} bytes")));
        }
        Ok(out)
    }
}

impl Read for Response {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.body.read(buf)
    }
}

enum Body {
    Length {
        r: BufReader<Box<dyn Conn>>,
        left: u64,
    },
    Chunked {
        r: BufReader<Box<dyn Conn>>,
        /// Bytes left in the current chunk; `None` before a size line.
        left: Option<u64>,
        done: bool,
    },
    /// The body ends with the connection.
    UntilClose(BufReader<Box<dyn Conn>>),
}

fn cut_short() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the connection ended before the body did",
    )
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Body::Length { r, left } => {
                if *left == 0 || buf.is_empty() {
                    return Ok(0);
                }
                let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = r.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(cut_short());
                }
                *left -= n as u64;
                Ok(n)
            }
            Body::Chunked { r, left, done } => loop {
                if *done || buf.is_empty() {
                    return Ok(0);
                }
                match *left {
                    None => {
                        let line = read_line(r)?;
                        let size = line.split(';').next().unwrap_or("").trim();
                        let size = u64::from_str_radix(size, 16)
                            .map_err(|_| bad(format!("bad chunk size {size:?}")))?;
                        if size == 0 {
                            // Trailers, then the empty line.
                            for _ in 0..MAX_HEADERS {
                                if read_line(r)?.trim().is_empty() {
                                    *done = true;
                                    return Ok(0);
                                }
                            }
                            return Err(bad("too many trailer lines"));
                        }
                        *left = Some(size);
                    }
                    Some(0) => {
                        if !read_line(r)?.trim().is_empty() {
                            return Err(bad("a chunk is longer than its size"));
                        }
                        *left = None;
                    }
                    Some(n) => {
                        let want = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
                        let got = r.read(&mut buf[..want])?;
                        if got == 0 {
                            return Err(cut_short());
                        }
                        *left = Some(n - got as u64);
                        return Ok(got);
                    }
                }
            },
            Body::UntilClose(r) => match r.read(buf) {
                // A TLS peer that closes without close_notify ends the body too.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
                other => other,
            },
        }
    }
}

/// One header line (CRLF or LF ended), at most [`MAX_HEADER_LINE`] bytes; the connection
/// ending first is an error.
fn read_line(r: &mut impl BufRead) -> std::io::Result<String> {
    let mut buf = Vec::new();
    r.take(MAX_HEADER_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if buf.len() > MAX_HEADER_LINE {
        return Err(bad(format!(
            "an HTTP header line is longer than {MAX_HEADER_LINE} bytes"
        )));
    }
    if buf.is_empty() {
        return Err(bad("the connection ended in the HTTP headers"));
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// One GET of `url` with `headers` (name, value); `tls` is needed for `https://`.
pub fn get(
    url: &Url,
    headers: &[(&str, &str)],
    tls: Option<&Arc<rustls::ClientConfig>>,
    deadline: Instant,
) -> std::io::Result<Response> {
    let tcp = connect(&url.host, url.port, deadline)?;
    let conn: Box<dyn Conn> = if url.https {
        let tls = tls.ok_or_else(|| bad(format!("{url}: https:// needs a CA bundle")))?;
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| bad(format!("{}: {e}", url.host)))?;
        let session =
            rustls::ClientConnection::new(tls.clone(), name).map_err(|e| bad(e.to_string()))?;
        Box::new(rustls::StreamOwned::new(session, tcp))
    } else {
        Box::new(tcp)
    };
    exchange(conn, url, headers)
}

/// Sends a GET for `url` on `conn` and reads the answer's head.
pub fn exchange(
    mut conn: Box<dyn Conn>,
    url: &Url,
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: gatevisor\r\n",
        url.path,
        url.authority()
    );
    for (n, v) in headers {
        if n.contains([':', '\r', '\n']) || v.contains(['\r', '\n']) {
            return Err(bad(format!("header {n:?} cannot be sent")));
        }
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    conn.write_all(req.as_bytes())?;
    conn.flush()?;
    let mut r = BufReader::new(conn);
    let status_line = read_line(&mut r)?;
    let mut parts = status_line.trim_end().splitn(3, ' ');
    let (version, code, reason) = (parts.next(), parts.next(), parts.next());
    let status = match (version, code.and_then(|c| c.parse::<u16>().ok())) {
        (Some(v), Some(c)) if v.starts_with("HTTP/1.") => c,
        _ => return Err(bad(format!("not an HTTP answer: {:?}", status_line.trim()))),
    };
    let mut hs = Vec::new();
    loop {
        if hs.len() == MAX_HEADERS {
            return Err(bad(format!("more than {MAX_HEADERS} HTTP header lines")));
        }
        let line = read_line(&mut r)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            hs.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    let find = |name: &str| {
        hs.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let chunked =
        find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        Body::Chunked {
            r,
            left: None,
            done: false,
        }
    } else if let Some(l) = find("content-length") {
        let left = l
            .parse()
            .map_err(|_| bad(format!("bad Content-Length {l:?}")))?;
        Body::Length { r, left }
    } else if status == 204 || status == 304 {
        Body::Length { r, left: 0 }
    } else {
        Body::UntilClose(r)
    };
    Ok(Response {
        status,
        reason: reason.unwrap_or("").to_string(),
        headers: hs,
        body,
    })
}

/// Copies at most `limit` bytes from `r` to `out`, stopping at `deadline` (`TimedOut`).
/// Returns the number of bytes copied.
pub fn copy_until(
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
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// `user:password` for an `Authorization: Basic` header.
pub fn basic_auth(user: &str, password: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{password}").as_bytes()))
}

/// `bytes` in base64 (RFC 4648, with padding).
pub fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the client makes of a server that answers `reply` (then closes): the body.
    fn answer(reply: Vec<u8>) -> std::io::Result<Vec<u8>> {
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            // The whole request first (the client may write it in pieces), then the reply.
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match theirs.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = theirs.write_all(&reply);
        });
        ours.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let url = Url::parse("http://h/p").unwrap();
        let res = exchange(Box::new(ours), &url, &[("Accept", "x/y")])
            .and_then(|r| r.read_limited(1 << 20));
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
    }

    #[test]
    fn bodies_by_length_chunks_or_close_and_short_ones_fail() {
        let ok = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef".to_vec());
        assert_eq!(ok.unwrap(), b"abc");
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n";
        assert_eq!(answer(chunked.to_vec()).unwrap(), b"abcde");
        let close = b"HTTP/1.0 200 OK\r\n\r\nto the end".to_vec();
        assert_eq!(answer(close).unwrap(), b"to the end");
        let short = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc".to_vec());
        assert_eq!(short.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
        let short_chunk =
            answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nabc".to_vec());
        assert!(short_chunk.is_err());
        let big = answer(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n".to_vec());
        assert!(big.unwrap_err().to_string().contains("larger than"));
        assert!(answer(b"SSH-2.0-x\r\n\r\n".to_vec()).is_err());
    }

    #[test]
    fn urls_and_redirects() {
        let u = Url::parse("https://reg.example:5443/v2/a/b?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("reg.example", 5443, "/v2/a/b?x=1")
        );
        assert_eq!(u.to_string(), "https://reg.example:5443/v2/a/b?x=1");
        assert_eq!(Url::parse("http://h").unwrap().port, 80);
        assert_eq!(
            u.join("/other").unwrap().to_string(),
            "https://reg.example:5443/other"
        );
        assert_eq!(u.join("http://cdn/x").unwrap().host, "cdn");
        assert!(Url::parse("ftp://h/").is_err());
        assert!(Url::parse("http://u@h/").is_err());
        assert!(Url::parse("http://h:x/").is_err());
        assert_eq!(Url::parse("http://[::1]:8/").unwrap().host, "::1");
    }

    #[test]
    fn basic_auth_is_base64_of_user_colon_password() {
        assert_eq!(
            basic_auth("Aladdin", "open sesame"),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(basic_auth("a", "b"), "Basic YTpi");
        assert_eq!(basic_auth("ab", "c"), "Basic YWI6Yw==");
    }
}
