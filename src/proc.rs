//! Process facts from /proc and pidfds: watching processes that are not our children (monitors
//! re-adopted after a daemon restart) without polling.

use std::os::fd::{FromRawFd, OwnedFd};

/// This boot of the machine's id (`/proc/sys/kernel/random/boot_id`), if the kernel has one.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// `pidfd_open(2)`: a descriptor that becomes readable when `pid` exits.
pub fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is shared.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until the process behind `pidfd` exits, or `timeout` passes (`None`: forever).
/// Returns true when it exited.
pub fn wait_pidfd(pidfd: &OwnedFd, timeout: Option<std::time::Duration>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let t = match timeout {
        None => PollTimeout::NONE,
        Some(d) => PollTimeout::try_from(d.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX),
    };
    loop {
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, t) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Waits until either process exits; true when `first` exited (possibly together with the
/// other), false when only `second` did.
pub fn wait_either(first: &OwnedFd, second: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    loop {
        let mut fds = [
            PollFd::new(first.as_fd(), PollFlags::POLLIN),
            PollFd::new(second.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {
                return fds[0]
                    .revents()
                    .is_some_and(|r| r.contains(PollFlags::POLLIN));
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// The parent PID of `pid`.
pub fn ppid(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()
}

/// CPU time `pid` used (user and system), microseconds.
pub fn cpu_usec(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let rest: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf(3) reads a system constant; it has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks * 1_000_000 / hz as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfd_reports_exit_of_a_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let fd = pidfd_open(child.id() as i32).unwrap();
        assert!(!wait_pidfd(&fd, Some(std::time::Duration::from_millis(10))));
        assert!(wait_pidfd(&fd, Some(std::time::Duration::from_secs(5))));
        child.wait().unwrap();
    }

    #[test]
    fn cpu_time_of_a_busy_child_grows() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let first = cpu_usec(pid).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let later = cpu_usec(pid);
        child.wait().unwrap();
        // The child may have ended by the second reading; if not, it used CPU meanwhile.
        if let Some(later) = later {
            assert!(later > first, "{first} -> {later}");
        }
        assert_eq!(cpu_usec(-1), None);
    }

    #[test]
    fn ppid_of_this_process_is_known() {
        let me = std::process::id() as i32;
        assert!(ppid(me).unwrap() > 0);
    }
}
