//! Trees reached through a directory fd. Every path that comes from outside (a package's
//! entry, a hard link's target, a manifest's image directory) is resolved beneath a directory
//! fd with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, never by string checks on the
//! path, and everything is created relative to a parent fd found that way, with `O_NOFOLLOW`
//! and `O_EXCL` on the last component. A symlink in a tree is never followed on the host: it is
//! the service's, and its kernel resolves it inside the service's own root.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

/// A directory held open; the root that paths below it are resolved under.
pub struct Dir(OwnedFd);

/// Why a path beneath a root could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BeneathError {
    /// The path passes through a symlink or would leave the root.
    #[error("it passes through a symlink or leads out of the root")]
    Escapes,
    #[error("a parent is not a directory")]
    NotDirectory,
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<Errno> for BeneathError {
    fn from(e: Errno) -> BeneathError {
        match e {
            Errno::ELOOP | Errno::EXDEV => BeneathError::Escapes,
            Errno::ENOTDIR => BeneathError::NotDirectory,
            e => BeneathError::Io(e.into()),
        }
    }
}

fn how(flags: OFlag, resolve: ResolveFlag) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(resolve)
}

/// Beneath the root, no symlinks at all, no magic links.
fn strict() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

/// The name of `rel`'s last component and its parent (empty for the root itself).
pub fn split(rel: &Path) -> (&Path, &OsStr) {
    (
        rel.parent().unwrap_or(Path::new("")),
        rel.file_name().unwrap_or(OsStr::new(".")),
    )
}

fn dot(rel: &Path) -> &Path {
    if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    }
}

impl Dir {
    /// Opens a directory the caller trusts (a state directory, a configured root). The last
    /// component must not be a symlink.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Dir(fd))
    }

    /// The directory `rel` beneath this one, through real directories only.
    pub fn dir(&self, rel: &Path) -> Result<Dir, BeneathError> {
        match nix::fcntl::openat2(
            self.0.as_fd(),
            dot(rel),
            how(
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW,
                strict(),
            ),
        ) {
            Ok(fd) => Ok(Dir(fd)),
            // O_NOFOLLOW | O_DIRECTORY on a final symlink reads as "not a directory".
            Err(Errno::ENOTDIR)
                if nix::sys::stat::fstatat(
                    self.0.as_fd(),
                    dot(rel),
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .is_ok_and(|st| is_kind(&st, SFlag::S_IFLNK)) =>
            {
                Err(BeneathError::Escapes)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The directory `rel` beneath this one, following symlinks that stay beneath it (an
    /// absolute symlink or a `..` out of it is refused).
    pub fn dir_following(&self, rel: &Path) -> Result<Dir, BeneathError> {
        let fd = nix::fcntl::openat2(
            self.0.as_fd(),
            dot(rel),
            how(
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            ),
        )?;
        Ok(Dir(fd))
    }

    /// The directory `rel` beneath this one, made (mode 0755) where missing; every existing
    /// component must be a real directory.
    pub fn make_dirs(&self, rel: &Path) -> Result<Dir, BeneathError> {
        let mut cur = self.dir(Path::new(""))?;
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(BeneathError::Escapes);
            };
            match nix::sys::stat::mkdirat(cur.0.as_fd(), name, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
            cur = cur.dir(Path::new(name))?;
        }
        Ok(cur)
    }

    /// `lstat` of `name` in this directory (never follows it).
    pub fn stat(&self, name: &OsStr) -> Result<FileStat, Errno> {
        nix::sys::stat::fstatat(self.0.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
    }

    /// A new regular file `name` (it must not exist; a symlink there is not followed).
    pub fn create_file(&self, name: &OsStr, mode: u32) -> Result<File, Errno> {
        let fd = nix::fcntl::openat(
            self.0.as_fd(),
            name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(mode),
        )?;
        Ok(File::from(fd))
    }

    /// Replaces `name` in this directory with a regular file holding `bytes`, atomically
    /// and durably (a temporary file, fsync, rename over `name`, fsync of the directory).
    /// Nothing already there is followed: a symlink at `name` or at the temporary name is
    /// replaced, not written through, so a directory its service can write to is safe.
    pub fn replace_file(&self, name: &OsStr, bytes: &[u8], mode: u32) -> Result<(), Errno> {
        use std::io::Write;
        let mut tmp = OsString::from(".");
        tmp.push(name);
        tmp.push(".tmp");
        let f = match self.create_file(&tmp, mode) {
            Err(Errno::EEXIST) => {
                nix::unistd::unlinkat(
                    self.0.as_fd(),
                    tmp.as_os_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                )?;
                self.create_file(&tmp, mode)?
            }
            other => other?,
        };
        let mut f = f;
        let io = |e: io::Error| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
        f.write_all(bytes).map_err(io)?;
        // The mode asked for, whatever the umask.
        nix::sys::stat::fchmod(f.as_fd(), Mode::from_bits_truncate(mode))?;
        f.sync_all().map_err(io)?;
        drop(f);
        nix::fcntl::renameat(self.0.as_fd(), tmp.as_os_str(), self.0.as_fd(), name)?;
        nix::unistd::fsync(self.0.as_fd())
    }

    /// Opens the regular file `name` in this directory for reading (not through a symlink).
    pub fn open_file(&self, name: &OsStr) -> Result<File, Errno> {
        let fd = nix::fcntl::openat(
            self.0.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }

    pub fn mkdir(&self, name: &OsStr, mode: u32) -> Result<(), Errno> {
        nix::sys::stat::mkdirat(self.0.as_fd(), name, Mode::from_bits_truncate(mode))
    }

    /// Sets the mode of the directory `name` here (opened without following a symlink).
    pub fn chmod_dir(&self, name: &OsStr, mode: u32) -> Result<(), BeneathError> {
        let d = self.dir(Path::new(name))?;
        nix::sys::stat::fchmod(d.0.as_fd(), Mode::from_bits_truncate(mode))?;
        Ok(())
    }

    pub fn symlink(&self, target: &Path, name: &OsStr) -> Result<(), Errno> {
        nix::unistd::symlinkat(target, self.0.as_fd(), name)
    }

    pub fn readlink(&self, name: &Path) -> Result<OsString, Errno> {
        nix::fcntl::readlinkat(self.0.as_fd(), name)
    }

    /// A hard link `name` here to the entry `src_name` of `src` (the entry itself, never what
    /// a symlink there points to).
    pub fn link_from(&self, src: &Dir, src_name: &OsStr, name: &OsStr) -> Result<(), Errno> {
        nix::unistd::linkat(
            src.0.as_fd(),
            src_name,
            self.0.as_fd(),
            name,
            AtFlags::empty(),
        )
    }

    /// The names in this directory (without `.` and `..`), read through the fd.
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        let mut v: Vec<OsString> = std::fs::read_dir(self.proc_path())?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        v.sort();
        Ok(v)
    }

    /// This directory as a path through `/proc/self/fd` (valid while `self` lives): for tools
    /// that take a path, with no component left for anybody to swap.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.0.as_raw_fd()))
    }

    pub fn sync(&self) -> io::Result<()> {
        nix::unistd::fsync(self.0.as_fd())?;
        Ok(())
    }

    /// Gives the entry `name` here (a symlink itself, never what it points to) to `uid` and
    /// `gid`.
    pub fn chown(&self, name: &OsStr, uid: u32, gid: u32) -> Result<(), Errno> {
        nix::unistd::fchownat(
            self.0.as_fd(),
            name,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
    }

    /// Gives this directory itself to `uid` and `gid`.
    pub fn chown_self(&self, uid: u32, gid: u32) -> Result<(), Errno> {
        nix::unistd::fchown(
            self.0.as_fd(),
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
    }

    /// An overlayfs whiteout `name` here (a character device 0:0): in an overlay, it hides
    /// `name` of the layers below.
    pub fn whiteout(&self, name: &OsStr) -> Result<(), Errno> {
        nix::sys::stat::mknodat(
            self.0.as_fd(),
            name,
            SFlag::S_IFCHR,
            Mode::empty(),
            nix::sys::stat::makedev(0, 0),
        )
    }

    /// This directory is marked opaque for overlayfs ([`Self::set_opaque`]).
    pub fn is_opaque(&self) -> bool {
        let mut v = [0u8; 1];
        // SAFETY: fgetxattr on a directory fd we own, with a NUL-terminated name and a
        // one-byte buffer, both outliving the call; it writes at most one byte into it.
        let n = unsafe {
            libc::fgetxattr(
                self.0.as_raw_fd(),
                c"trusted.overlay.opaque".as_ptr(),
                v.as_mut_ptr().cast(),
                1,
            )
        };
        n == 1 && v[0] == b'y'
    }

    /// Marks this directory opaque for overlayfs: in an overlay, nothing of the layers below
    /// shows through it.
    pub fn set_opaque(&self) -> Result<(), Errno> {
        const NAME: &[u8] = b"trusted.overlay.opaque\0";
        // SAFETY: fsetxattr on a directory fd we own, with a NUL-terminated attribute name
        // and a one-byte value that both outlive the call; it reads them and writes nothing
        // of ours.
        let r = unsafe {
            libc::fsetxattr(
                self.0.as_raw_fd(),
                NAME.as_ptr().cast(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        Errno::result(r).map(drop)
    }
}

/// Would following the symlink at `link` (relative to `root`) from the host, with no root
/// clamping, leave `root`? Chains are followed link by link through the tree (at most 40, as
/// the kernel does); an absolute target starts again at `root`, as it does inside the service.
pub fn symlink_escapes(root: &Dir, link: &Path) -> Result<bool, Errno> {
    enum Step {
        Root,
        Up,
        Name(OsString),
    }
    fn push(stack: &mut Vec<Step>, target: &Path) {
        let mut steps = Vec::new();
        for c in target.components() {
            match c {
                Component::RootDir | Component::Prefix(_) => steps.push(Step::Root),
                Component::ParentDir => steps.push(Step::Up),
                Component::Normal(n) => steps.push(Step::Name(n.to_os_string())),
                Component::CurDir => {}
            }
        }
        stack.extend(steps.into_iter().rev());
    }
    let mut cur: Vec<OsString> = link
        .parent()
        .into_iter()
        .flat_map(|p| p.components())
        .map(|c| c.as_os_str().to_os_string())
        .collect();
    let mut stack = Vec::new();
    push(&mut stack, Path::new(&root.readlink(link)?));
    let mut hops = 0;
    while let Some(step) = stack.pop() {
        match step {
            Step::Root => cur.clear(),
            Step::Up => {
                if cur.pop().is_none() {
                    return Ok(true);
                }
            }
            Step::Name(n) => {
                let mut candidate: PathBuf = cur.iter().collect();
                candidate.push(&n);
                let is_link = nix::sys::stat::fstatat(
                    root.0.as_fd(),
                    &candidate,
                    AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .is_ok_and(|st| {
                    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK
                });
                if is_link {
                    hops += 1;
                    if hops > 40 {
                        // A loop: the kernel gives up (ELOOP) without going anywhere.
                        return Ok(false);
                    }
                    push(&mut stack, Path::new(&root.readlink(&candidate)?));
                } else {
                    cur.push(n);
                }
            }
        }
    }
    Ok(false)
}

pub fn is_kind(st: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == kind
}

/// Limits on a copied tree.
#[derive(Debug, Clone, Copy)]
pub struct CopyLimits {
    pub max_files: u64,
    pub max_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{path}: {why}")]
    Refused { path: PathBuf, why: String },
    #[error("more than {0} entries")]
    TooManyFiles(u64),
    #[error("more than {0} bytes")]
    TooLarge(u64),
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Copies the tree under `src` into `dst` (an empty directory): directories, regular files
/// with their permission bits (setuid and setgid dropped) and symlinks as they are; device
/// nodes, FIFOs and sockets are refused. Nothing is followed: each directory is opened
/// beneath its parent without symlinks, so the copy never leaves either tree.
pub fn copy_tree(src: &Dir, dst: &Dir, limits: CopyLimits) -> Result<(), CopyError> {
    let mut budget = (0u64, 0u64);
    copy_dir(src, dst, Path::new(""), limits, &mut budget)
}

fn copy_dir(
    src: &Dir,
    dst: &Dir,
    at: &Path,
    limits: CopyLimits,
    budget: &mut (u64, u64),
) -> Result<(), CopyError> {
    let io_at = |p: &Path| {
        let p = p.to_path_buf();
        move |e: Errno| CopyError::Io {
            path: p,
            source: e.into(),
        }
    };
    let names = src.names().map_err(|source| CopyError::Io {
        path: at.into(),
        source,
    })?;
    for name in names {
        let path = at.join(&name);
        budget.0 += 1;
        if budget.0 > limits.max_files {
            return Err(CopyError::TooManyFiles(limits.max_files));
        }
        let st = src.stat(&name).map_err(io_at(&path))?;
        let mode = st.st_mode & 0o777;
        if is_kind(&st, SFlag::S_IFDIR) {
            dst.mkdir(&name, 0o700).map_err(io_at(&path))?;
            let (s, d) = (src.dir(Path::new(&name)), dst.dir(Path::new(&name)));
            let refused = |_| CopyError::Refused {
                path: path.clone(),
                why: "changed while it was copied".into(),
            };
            let (s, d) = (s.map_err(refused)?, d.map_err(refused)?);
            copy_dir(&s, &d, &path, limits, budget)?;
            nix::sys::stat::fchmod(d.0.as_fd(), Mode::from_bits_truncate(mode))
                .map_err(io_at(&path))?;
        } else if is_kind(&st, SFlag::S_IFLNK) {
            let target = src.readlink(Path::new(&name)).map_err(io_at(&path))?;
            dst.symlink(Path::new(&target), &name)
                .map_err(io_at(&path))?;
        } else if is_kind(&st, SFlag::S_IFREG) {
            budget.1 += st.st_size as u64;
            if budget.1 > limits.max_bytes {
                return Err(CopyError::TooLarge(limits.max_bytes));
            }
            let mut from = src.open_file(&name).map_err(io_at(&path))?;
            let mut to = dst.create_file(&name, 0o600).map_err(io_at(&path))?;
            io::copy(&mut from, &mut to).map_err(|source| CopyError::Io {
                path: path.clone(),
                source,
            })?;
            nix::sys::stat::fchmod(to.as_fd(), Mode::from_bits_truncate(mode))
                .map_err(io_at(&path))?;
        } else {
            return Err(CopyError::Refused {
                path,
                why: "device nodes, FIFOs and sockets cannot be part of a service's root".into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_file_never_writes_through_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        std::fs::write(&outside, "keep").unwrap();
        let dir = d.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        // What a service that owns the directory could plant: both names as symlinks out.
        std::os::unix::fs::symlink(&outside, dir.join("settings.json")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join(".settings.json.tmp")).unwrap();
        let run = Dir::open(&dir).unwrap();
        run.replace_file(OsStr::new("settings.json"), b"{\"a\":1}", 0o644)
            .unwrap();
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep");
        let meta = std::fs::symlink_metadata(dir.join("settings.json")).unwrap();
        assert!(meta.file_type().is_file());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        assert_eq!(
            std::fs::read_to_string(dir.join("settings.json")).unwrap(),
            "{\"a\":1}"
        );
        assert!(!dir.join(".settings.json.tmp").exists());
        // And again over the file it made.
        run.replace_file(OsStr::new("settings.json"), b"2", 0o644)
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("settings.json")).unwrap(),
            "2"
        );
    }

    #[test]
    fn symlink_chains_that_climb_out_are_found() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        let ln = |t: &str, l: &str| std::os::unix::fs::symlink(t, r.join(l)).unwrap();
        ln("../..", "a/b/up"); // up resolves to the root: inside
        ln("a/b/up/../..", "x"); // through up, then above the root
        ln("/etc/passwd", "abs"); // the service's own /etc/passwd
        ln("abs/../../..", "y"); // through an absolute link, then out
        ln("../../../etc", "a/b/out");
        ln("loop2", "loop1");
        ln("loop1", "loop2");
        ln("b", "a/sib");
        let root = Dir::open(r).unwrap();
        let esc = |l: &str| symlink_escapes(&root, Path::new(l)).unwrap();
        assert!(!esc("a/b/up"));
        assert!(esc("x"));
        assert!(!esc("abs"));
        assert!(esc("y"));
        assert!(esc("a/b/out"));
        assert!(!esc("loop1"));
        assert!(!esc("a/sib"));
    }

    #[test]
    fn make_dirs_refuses_symlinked_parents_and_copy_follows_nothing() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("root");
        std::fs::create_dir_all(r.join("real")).unwrap();
        std::fs::write(d.path().join("secret"), b"host").unwrap();
        std::os::unix::fs::symlink(d.path(), r.join("out")).unwrap();
        std::os::unix::fs::symlink("../secret", r.join("real/s")).unwrap();
        let root = Dir::open(&r).unwrap();
        assert!(root.make_dirs(Path::new("real/new/deeper")).is_ok());
        assert!(matches!(
            root.make_dirs(Path::new("out/x")),
            Err(BeneathError::Escapes)
        ));
        assert!(!d.path().join("x").exists());
        let dst = d.path().join("copy");
        std::fs::create_dir(&dst).unwrap();
        copy_tree(
            &root,
            &Dir::open(&dst).unwrap(),
            CopyLimits {
                max_files: 100,
                max_bytes: 1 << 20,
            },
        )
        .unwrap();
        assert_eq!(
            std::fs::read_link(dst.join("real/s")).unwrap(),
            Path::new("../secret")
        );
        assert!(std::fs::symlink_metadata(dst.join("out"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(dst.join("real/new/deeper").is_dir());
        let small = CopyLimits {
            max_files: 2,
            max_bytes: 1 << 20,
        };
        let dst2 = d.path().join("copy2");
        std::fs::create_dir(&dst2).unwrap();
        assert!(matches!(
            copy_tree(&root, &Dir::open(&dst2).unwrap(), small),
            Err(CopyError::TooManyFiles(2))
        ));
    }
}
