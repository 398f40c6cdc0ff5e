//! Fetching a package a Controller names by URL: `file://PATH` or `http://HOST[:PORT]/PATH`
//! (HTTP/1.1, no redirects), written to a temporary file then renamed, at most [`MAX_BYTES`].
//! The package is verified afterwards exactly as a local install verifies it.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::time::Duration;

pub const MAX_BYTES: u64 = 512 << 20;

pub fn fetch(url: &str, dest: &Path) -> std::io::Result<()> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    let tmp = dest.with_extension("part");
    let mut out = std::fs::File::create(&tmp)?;
    let copied = if let Some(path) = url.strip_prefix("file://") {
        std::io::copy(
            &mut std::fs::File::open(path)?.take(MAX_BYTES + 1),
            &mut out,
        )?
    } else if let Some(rest) = url.strip_prefix("http://") {
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr = if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:80")
        };
        let sock = std::net::ToSocketAddrs::to_socket_addrs(&addr)?
            .next()
            .ok_or_else(|| bad(format!("{hostport}: no address")))?;
        let mut conn = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(10))?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))?;
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\nUser-Agent: gatevisor\r\n\r\n"
        )?;
        let mut r = BufReader::new(conn);
        let mut status = String::new();
        r.read_line(&mut status)?;
        if status.split_whitespace().nth(1) != Some("200") {
            return Err(bad(format!("HTTP answer {:?}", status.trim())));
        }
        let mut length = None;
        let mut chunked = false;
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            let h = h.trim();
            if h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse::<u64>().ok();
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        if chunked {
            return Err(bad("chunked HTTP bodies are not supported".into()));
        }
        let n = std::io::copy(&mut r.take(MAX_BYTES + 1), &mut out)?;
        if let Some(l) = length {
            if n != l {
                return Err(bad(format!("truncated download: {n} of {l} bytes")));
            }
        }
        n
    } else {
        return Err(bad(format!(
            "{url}: only file:// and http:// URLs are fetched"
        )));
    };
    if copied > MAX_BYTES {
        let _ = std::fs::remove_file(&tmp);
        return Err(bad(format!("larger than {MAX_BYTES} bytes")));
    }
    out.sync_all()?;
    std::fs::rename(&tmp, dest)
}
