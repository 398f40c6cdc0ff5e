//! Idmapped mounts: a tree stored once with an image's own owners (ids 0..65,535) is seen by
//! one container's user namespace as its own ids, without copying or chowning it. The mount
//! translates ids through a user namespace mapped `0 HOST_BASE COUNT`, held by fd.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A user namespace mapping ids `0..count` to `host_base..`, held by an fd. Made by a child
/// that enters a new user namespace and waits while this process writes its maps and opens
/// it; the namespace outlives the child through the fd.
pub fn user_namespace(host_base: u32, count: u32) -> io::Result<OwnedFd> {
    let mut ready = [0; 2];
    let mut done = [0; 2];
    // SAFETY: pipe2 writes two fds into the arrays, which live across the calls.
    check(unsafe { libc::pipe2(ready.as_mut_ptr(), libc::O_CLOEXEC) } as libc::c_long)?;
    // SAFETY: pipe2 writes two fds into `done`, which lives across the call.
    let made = unsafe { libc::pipe2(done.as_mut_ptr(), libc::O_CLOEXEC) };
    if let Err(e) = check(made as libc::c_long) {
        // SAFETY: closing the two fds just made, which nothing else holds.
        unsafe {
            libc::close(ready[0]);
            libc::close(ready[1]);
        }
        return Err(e);
    }
    // SAFETY: fork; the child only makes raw system calls (close, unshare, write, read,
    // _exit), which are async-signal-safe, so a multi-threaded parent is no hazard.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: the child's own copies of the pipe fds; no allocation, no locks.
        unsafe {
            libc::close(ready[0]);
            libc::close(done[1]);
            let ok: u8 = (libc::unshare(libc::CLONE_NEWUSER) == 0) as u8;
            libc::write(ready[1], (&ok as *const u8).cast(), 1);
            let mut b = 0u8;
            libc::read(done[0], (&mut b as *mut u8).cast(), 1);
            libc::_exit(0);
        }
    }
    // SAFETY: the parent's copies of the child's ends, which it never uses.
    unsafe {
        libc::close(ready[1]);
        libc::close(done[0]);
    }
    // SAFETY: the fds are ours from here and closed once, by the OwnedFds.
    let (ready_r, done_w) = unsafe {
        (
            OwnedFd::from_raw_fd(ready[0]),
            OwnedFd::from_raw_fd(done[1]),
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    let result = (|| {
        let mut b = 0u8;
        // SAFETY: reads one byte into a local that outlives the call.
        let n = unsafe { libc::read(ready_r.as_raw_fd(), (&mut b as *mut u8).cast(), 1) };
        if n != 1 || b != 1 {
            return Err(io::Error::other(
                "the helper could not enter a new user namespace",
            ));
        }
        let map = format!("0 {host_base} {count}\n");
        std::fs::write(format!("/proc/{pid}/uid_map"), &map)?;
        std::fs::write(format!("/proc/{pid}/gid_map"), &map)?;
        let f = std::fs::File::open(format!("/proc/{pid}/ns/user"))?;
        Ok(OwnedFd::from(f))
    })();
    drop(done_w);
    let mut status = 0;
    // SAFETY: reaps our own child, which exits once `done_w` is closed.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    drop(ready_r);
    result
}

/// Attaches a read-only view of `src` at `target` (an empty directory) whose ids are
/// translated by `userns` (from [`user_namespace`]).
pub fn bind_idmapped(src: &Path, target: &Path, userns: &OwnedFd) -> io::Result<()> {
    let (s, t) = (cpath(src)?, cpath(target)?);
    // SAFETY: open_tree with a NUL-terminated path that outlives the call; it returns a new
    // fd, owned below.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            s.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    })?;
    // SAFETY: the fd open_tree just returned, owned only here.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: mount_setattr on the detached tree's fd with an empty path and a mount_attr
    // that outlives the call; the kernel only reads it.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    // SAFETY: move_mount of the detached tree (empty path) onto a NUL-terminated target
    // path that outlives the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })?;
    Ok(())
}
