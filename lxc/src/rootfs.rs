//! A minimal root filesystem from a static busybox, for containers that bring only a static
//! binary (and for the example service).

use std::path::Path;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("busybox at {path} is not usable (install busybox-static)")]
    NoBusybox { path: String },
    #[error("cannot write the rootfs at {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Builds a busybox rootfs at `dest` (created; must not exist or be empty), with every applet
/// linked in `/bin`, and the directories and files a container init expects.
pub fn build_busybox(busybox: &Path, dest: &Path) -> Result<(), RootfsError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| RootfsError::Io { path, source }
    };
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .ok_or_else(|| RootfsError::NoBusybox {
            path: busybox.display().to_string(),
        })?;
    for d in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "run", "var/log", "root",
    ] {
        std::fs::create_dir_all(dest.join(d)).map_err(io(&dest.join(d)))?;
    }
    let target = dest.join("bin/busybox");
    std::fs::copy(busybox, &target).map_err(io(&target))?;
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet == "busybox" || applet.contains('/') {
            continue;
        }
        let link = dest.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", &link).map_err(io(&link))?;
        }
    }
    let files = [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hosts", "127.0.0.1 localhost\n"),
    ];
    for (f, text) in files {
        std::fs::write(dest.join(f), text).map_err(io(&dest.join(f)))?;
    }
    Ok(())
}

/// Gives the tree at `dest` to the container's root in a user namespace whose ids start at
/// `host_base` on the host: every entry's owner and group `n` become `host_base + n`. Symlinks
/// are changed themselves, never followed.
pub fn shift_owner(dest: &Path, host_base: u32) -> Result<(), RootfsError> {
    use std::os::unix::fs::MetadataExt;
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| RootfsError::Io { path, source }
    };
    let m = std::fs::symlink_metadata(dest).map_err(io(dest))?;
    std::os::unix::fs::lchown(dest, Some(host_base + m.uid()), Some(host_base + m.gid()))
        .map_err(io(dest))?;
    if m.is_dir() {
        for e in std::fs::read_dir(dest).map_err(io(dest))? {
            shift_owner(&e.map_err(io(dest))?.path(), host_base)?;
        }
    }
    Ok(())
}
