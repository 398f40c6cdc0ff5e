//! Runs inside the emulated gateway (a systemd unit) and carries out the harness's requests
//! from the virtio-serial port given as its argument. See `qemu_tests::proto`.

use qemu_tests::proto::{FromAgent, Hello, Op, Reply, Request};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Output kept per stream: the rest is cut, with a marker.
const MAX_OUTPUT: usize = 1 << 20;

fn main() {
    // `gateway-agent vmm-snapshot SOCKET DIR`: a scenario's client of a VMM's control
    // socket (the supervisor is the product's).
    let args: Vec<String> = std::env::args().collect();
    if let [_, cmd, socket, dir] = args.as_slice() {
        if cmd == "vmm-snapshot" {
            let r = gatevisor_vmm::control::take_snapshot(
                std::path::Path::new(socket),
                std::path::Path::new(dir),
                Duration::from_secs(300),
            );
            if let Err(e) = r {
                eprintln!("vmm-snapshot: {e}");
                std::process::exit(1);
            }
            println!("snapshot in {dir}");
            return;
        }
    }
    let Some(port) = std::env::args().nth(1) else {
        eprintln!("usage: gateway-agent PORT");
        std::process::exit(2);
    };
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_string();
    loop {
        let dev = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&port)
        {
            Ok(d) => d,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        if let Err(e) = serve(&dev, &boot_id) {
            eprintln!("gateway-agent: {e}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn serve(dev: &std::fs::File, boot_id: &str) -> std::io::Result<()> {
    let mut out = dev.try_clone()?;
    send(
        &mut out,
        &FromAgent::Hello {
            hello: Hello {
                boot_id: boot_id.to_string(),
            },
        },
    )?;
    let mut lines = BufReader::new(dev.try_clone()?);
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            return Ok(()); // the host side went away
        }
        let reply = match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => handle(req),
            Err(e) => Reply {
                error: Some(format!("bad request: {e}")),
                ..Reply::default()
            },
        };
        send(&mut out, &FromAgent::Reply(reply))?;
    }
}

fn send(out: &mut std::fs::File, msg: &FromAgent) -> std::io::Result<()> {
    let mut text = serde_json::to_string(msg).map_err(std::io::Error::other)?;
    text.push('\n');
    out.write_all(text.as_bytes())
}

fn handle(req: Request) -> Reply {
    let mut reply = Reply {
        id: req.id,
        ..Reply::default()
    };
    match req.op {
        Op::Run { cmd, timeout_ms } => run(&cmd, Duration::from_millis(timeout_ms), &mut reply),
        Op::Put { path, mode, data } => {
            let r = hex::decode(&data)
                .map_err(|e| e.to_string())
                .and_then(|bytes| put(&path, mode, &bytes).map_err(|e| e.to_string()));
            match r {
                Ok(()) => reply.code = Some(0),
                Err(e) => reply.error = Some(format!("put {path}: {e}")),
            }
        }
        Op::Get { path } => match std::fs::read(&path) {
            Ok(bytes) => {
                reply.code = Some(0);
                reply.stdout = hex::encode(bytes);
            }
            Err(e) => reply.error = Some(format!("get {path}: {e}")),
        },
    }
    reply
}

fn put(path: &str, mode: u32, bytes: &[u8]) -> std::io::Result<()> {
    let path = std::path::Path::new(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("gateway-agent.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)
}

fn run(cmd: &str, timeout: Duration, reply: &mut Reply) {
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            reply.error = Some(format!("cannot run sh: {e}"));
            return;
        }
    };
    let stdout = child.stdout.take().map(collect);
    let stderr = child.stderr.take().map(collect);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                reply.timed_out = true;
                // SAFETY: kill(2) on the process group this agent created for the command.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                reply.error = Some(format!("wait: {e}"));
                break None;
            }
        }
    };
    if let Some(s) = status {
        reply.code = s.code();
        reply.signal = s.signal();
    }
    // A command that left a background process holding its output: take what came within a
    // moment of its exit rather than waiting for that process.
    let grace = Instant::now() + Duration::from_secs(2);
    reply.stdout = stdout.map(|r| r.take(grace)).unwrap_or_default();
    reply.stderr = stderr.map(|r| r.take(grace)).unwrap_or_default();
}

/// A stream read to its end by a thread.
struct Collector(std::sync::mpsc::Receiver<Vec<u8>>);

impl Collector {
    fn take(self, deadline: Instant) -> String {
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.0.recv_timeout(wait) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => "[output still open after the command ended; not collected]".into(),
        }
    }
}

fn collect(mut r: impl Read + Send + 'static) -> Collector {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if buf.len() < MAX_OUTPUT {
                        buf.extend_from_slice(&chunk[..n.min(MAX_OUTPUT - buf.len())]);
                    }
                }
            }
        }
        let _ = tx.send(buf);
    });
    Collector(rx)
}
