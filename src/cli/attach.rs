//! Into a running service: `service console` (a microVM's serial console) and `service exec`
//! (a command in a container's namespaces).

use super::*;

/// Restores the terminal's settings when the console detaches.
struct RawTerminal(Option<nix::sys::termios::Termios>);

impl RawTerminal {
    fn enter() -> RawTerminal {
        use nix::sys::termios;
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(&stdin) else {
            return RawTerminal(None); // not a terminal
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw);
        RawTerminal(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

fn status_of(socket: &Path, name: &str) -> Result<api::ServiceStatus, ClientError> {
    Client::new(socket).call_as(&Request::Status {
        name: name.to_string(),
    })
}

pub(super) fn console(socket: &Path, name: String, for_s: Option<u64>) -> i32 {
    use std::io::{Read, Write};
    use std::time::Duration;
    let status = match status_of(socket, &name) {
        Ok(v) => v,
        Err(e) => return fail(&e),
    };
    let Some(path) = status
        .microvm
        .as_ref()
        .map(|vm| vm.console.display().to_string())
    else {
        eprintln!("gatevisor: service {name} is not a microVM: it has no serial console (try `gatevisor service logs {name}`)");
        return ErrorKind::Invalid.exit_code();
    };
    let stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gatevisor: {name}'s console ({path}): {e} (is it running?)");
            return ErrorKind::Runtime.exit_code();
        }
    };
    let raw = RawTerminal::enter();
    let tty = raw.0.is_some();
    if tty {
        eprint!("attached to {name}'s console; Ctrl-] detaches\r\n");
    }
    // Keystrokes to the guest; on a terminal Ctrl-] (0x1d) detaches, otherwise end of input
    // does (after a moment for the guest's answer).
    let mut to_guest = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gatevisor: {e}");
            return ErrorKind::Runtime.exit_code();
        }
    };
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 256];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    if !tty {
                        std::thread::sleep(Duration::from_secs(2));
                    }
                    break;
                }
                Ok(n) => {
                    if tty && buf[..n].contains(&0x1d) {
                        break;
                    }
                    if to_guest.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = done_tx.send(());
    });
    let deadline = for_s.map(|s| std::time::Instant::now() + Duration::from_secs(s));
    let mut from_guest = stream;
    let _ = from_guest.set_read_timeout(Some(Duration::from_millis(200)));
    let mut out = std::io::stdout();
    let mut buf = [0u8; 4096];
    loop {
        match from_guest.read(&mut buf) {
            Ok(0) => break, // the VM ended, or another console took over
            Ok(n) => {
                let _ = out.write_all(&buf[..n]);
                let _ = out.flush();
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            break;
        }
        if for_s.is_none() && done_rx.try_recv().is_ok() {
            break;
        }
    }
    drop(raw);
    if tty {
        eprintln!("\ndetached from {name}'s console");
    }
    0
}

pub(super) fn exec(socket: &Path, name: String, command: Vec<String>) -> i32 {
    let status = match status_of(socket, &name) {
        Ok(v) => v,
        Err(e) => return fail(&e),
    };
    let Some(lxcpath) = status.container.as_ref().map(|c| c.lxcpath.clone()) else {
        // A microVM: its guest init runs the command (with the service's environment, up to
        // 30 s, no terminal: its output is not relayed); the exit code is ours.
        let ran: Result<api::Executed, _> = Client::new(socket).call_as(&Request::Exec {
            name: name.clone(),
            argv: command,
        });
        return match ran {
            Ok(e) => e.exit_code,
            Err(e) => fail(&e),
        };
    };
    // Attaching needs no monitor and no limits: only the container's path and name.
    let rt = gatevisor_lxc::Runtime::new(
        &lxcpath,
        gatevisor_lxc::Cgroups::V1,
        gatevisor_lxc::MonitorCommand {
            program: PathBuf::new(),
            args: vec![],
        },
    );
    match rt.and_then(|rt| rt.exec(&name, &command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gatevisor: {e}");
            1
        }
    }
}
