//! A running VMM's control socket (`control_socket` in its configuration): how the
//! supervisor, or `gatevisor vmm-snapshot`, asks a sandboxed VMM for a snapshot.
//!
//! The protocol, one request per connection:
//! - the client sends `SNAPSHOT\n` with two descriptors (SCM_RIGHTS): the memory file and
//!   the state file, open for writing. The VMM under its sandbox opens no file, so the client
//!   chooses where the snapshot goes;
//! - the VMM pauses its vCPU, writes both files (flushed), answers `OK\n` or
//!   `ERROR <reason>\n`, and runs the guest on; the client then names the files
//!   ([`crate::snapshot::commit`]).
//!
//! The socket is created mode 0600: only the VMM's owner (the supervisor) may ask.

use crate::snapshot::BootSum;
use crate::vm::Pauser;
use crate::{file_err, Error, Result};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const SNAPSHOT: &[u8] = b"SNAPSHOT\n";
/// How long the vCPU may take to stop for a snapshot.
const PAUSE_WITHIN: Duration = Duration::from_secs(5);
/// How long a client may take to send its request once connected.
const REQUEST_WITHIN: Duration = Duration::from_secs(1);

/// A snapshot asked for: the client's connection and its two files.
pub struct Request {
    pub client: UnixStream,
    pub memory: File,
    pub state: File,
}

impl Request {
    /// Answers the client: `OK`, or `ERROR` with the reason.
    pub fn answer(mut self, result: &Result<()>) {
        // The client reads one line: the first line of a longer reason still says it.
        let _ = match result {
            Ok(()) => self.client.write_all(b"OK\n"),
            Err(e) => writeln!(self.client, "ERROR {e}"),
        };
    }
}

/// Where the control thread leaves a request for the vCPU thread, which serves it when
/// its pause comes.
pub type Pending = Arc<Mutex<Option<Request>>>;

/// Binds the control socket (replacing a stale one), mode 0600.
pub fn listen(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(file_err("listen on", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(file_err("restrict", path))?;
    Ok(l)
}

/// Reads one request from `client`: the `SNAPSHOT` line and exactly two descriptors, both
/// regular files (a pipe or a socket could stall the paused VM). A client that sends nothing
/// within [`REQUEST_WITHIN`] is turned away, so it cannot hold the control thread.
fn read_request(client: UnixStream) -> std::result::Result<Request, (UnixStream, &'static str)> {
    let mut wait = libc::pollfd {
        fd: client.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `wait` is one valid pollfd for the whole call.
    let ready = unsafe { libc::poll(&mut wait, 1, REQUEST_WITHIN.as_millis() as libc::c_int) };
    if ready != 1 {
        return Err((client, "no request within 1 s of connecting"));
    }
    let mut buf = [0u8; 64];
    let mut fds: [RawFd; 3] = [-1; 3];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec points into `buf`, alive and writable for the whole call.
    let got = unsafe { client.recv_with_fds(&mut iov, &mut fds) };
    let (n, nfds) = match got {
        Ok(x) => x,
        Err(_) => return Err((client, "the request could not be read")),
    };
    // SAFETY: recvmsg gave this process the first `nfds` descriptors; nothing else owns them.
    let mut files: Vec<File> = fds[..nfds]
        .iter()
        .map(|fd| unsafe { File::from_raw_fd(*fd) })
        .collect();
    if &buf[..n] != SNAPSHOT {
        return Err((client, "unknown request (the one request is SNAPSHOT)"));
    }
    if files.len() != 2 {
        return Err((client, "SNAPSHOT needs two files (memory, state)"));
    }
    if !files
        .iter()
        .all(|f| f.metadata().is_ok_and(|m| m.is_file()))
    {
        return Err((client, "the memory and state files must be regular files"));
    }
    let state = files.pop().unwrap();
    let memory = files.pop().unwrap();
    Ok(Request {
        client,
        memory,
        state,
    })
}

/// The control thread: takes requests one at a time, leaves each for the vCPU thread and
/// pauses it; a vCPU that does not stop in time gets the request back, refused.
pub fn serve(listener: UnixListener, pending: Pending, pauser: Pauser, boot: Option<Arc<BootSum>>) {
    loop {
        let Ok((client, _)) = listener.accept() else {
            continue;
        };
        let req = match read_request(client) {
            Ok(r) => r,
            Err((mut client, why)) => {
                let _ = writeln!(client, "ERROR {why}");
                continue;
            }
        };
        // The boot files' CRC is summed (once) while the guest still runs; a failure is
        // the snapshot's to report.
        if let Some(b) = &boot {
            let _ = b.get();
        }
        *pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(req);
        if let Err(e) = pauser.pause(PAUSE_WITHIN) {
            let back = pending.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(req) = back {
                req.answer(&Err(e));
            }
        }
    }
}

/// Asks the VMM listening on `socket` for a snapshot into `dir` and names it there once
/// written: the client side of the protocol.
pub fn take_snapshot(socket: &Path, dir: &Path, within: Duration) -> Result<()> {
    let (memory, state) = crate::snapshot::create_tmp(dir)?;
    let c = UnixStream::connect(socket).map_err(file_err("connect to", socket))?;
    c.set_read_timeout(Some(within))
        .map_err(file_err("connect to", socket))?;
    c.send_with_fds(&[SNAPSHOT], &[memory.as_raw_fd(), state.as_raw_fd()])
        .map_err(|e| Error::Snapshot(format!("sending the request: {e}")))?;
    let mut line = String::new();
    BufReader::new(&c)
        .read_line(&mut line)
        .map_err(|e| Error::Snapshot(format!("no answer from the VMM within {within:?}: {e}")))?;
    match line.trim_end().split_once(' ') {
        _ if line == "OK\n" => crate::snapshot::commit(dir),
        Some(("ERROR", why)) => Err(Error::Snapshot(format!("the VMM refused: {why}"))),
        _ if line.is_empty() => Err(Error::Snapshot(
            "the VMM closed the connection without an answer (did it end?)".into(),
        )),
        _ => Err(Error::Snapshot(format!(
            "the VMM answered {:?}",
            line.trim_end()
        ))),
    }
}
