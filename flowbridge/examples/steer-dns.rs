//! A minimal steering service for end-to-end tests, built as a static binary and run inside a
//! container: it reads the frames steered to it on `eth0`, answers DNS queries for
//! `blocked.test` with NXDOMAIN itself (verdict 3: reply) and forwards everything else
//! (verdict 0). It says hello on its verdict socket when it has one.

#[path = "../tests/common/lab.rs"]
mod lab;

use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn main() {
    if let Ok(path) = std::env::var("GATEVISOR_VERDICT_SOCKET") {
        match std::os::unix::net::UnixStream::connect(&path) {
            Ok(mut s) => {
                let _ = s.write_all(b"{\"op\":\"hello\"}\n");
                let mut line = String::new();
                let _ = BufReader::new(s).read_line(&mut line);
                println!("verdict socket says: {}", line.trim());
            }
            Err(e) => println!("no verdict socket at {path}: {e}"),
        }
    }
    println!("steer-dns serving on eth0");
    lab::run_raw_service(
        Arc::new(AtomicBool::new(false)),
        lab::nxdomain_for_blocked_test,
    );
}
