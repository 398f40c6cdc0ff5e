//! A cgroup of its own for each microVM's VMM process, with the service's limits: what liblxc
//! does for a container, done by hand for the one process (and its vCPU and I/O threads) that
//! is a microVM. Created next to liblxc's containers (`lxc.payload.NAME`) at the top of the
//! hierarchy, as `gatevisor.vm.NAME`.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use gatevisor_lxc::config::cgroup_limits;
use gatevisor_lxc::{Cgroups, Limits};

use super::Usage;

const ROOT: &str = "/sys/fs/cgroup";
/// The v1 controllers a VMM's limits are written to.
const V1_CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "cpuset"];

/// One VMM's cgroup (one directory on v2, one per controller on v1).
#[derive(Debug, Clone)]
pub struct VmCgroup {
    version: Cgroups,
    dirs: Vec<PathBuf>,
}

fn write(dir: &Path, file: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(file), value).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot write {value:?} to {}: {e}",
                dir.join(file).display()
            ),
        )
    })
}

impl VmCgroup {
    /// The cgroup of VM `name` (it may not exist).
    pub fn of(name: &str, version: Cgroups) -> VmCgroup {
        VmCgroup::under(Path::new(ROOT), name, version)
    }

    fn under(root: &Path, name: &str, version: Cgroups) -> VmCgroup {
        let leaf = format!("gatevisor.vm.{name}");
        let dirs = match version {
            Cgroups::V2 => vec![root.join(leaf)],
            Cgroups::V1 => V1_CONTROLLERS
                .iter()
                .map(|c| root.join(c).join(&leaf))
                .filter(|d| d.parent().is_some_and(|p| p.is_dir()))
                .collect(),
        };
        VmCgroup { version, dirs }
    }

    /// (Re)creates the cgroup empty, with `limits`.
    pub fn create(&self, limits: &Limits) -> std::io::Result<()> {
        self.remove();
        if self.version == Cgroups::V2 {
            let parent = self.dirs[0].parent().expect("under the root");
            // The controllers must be on for the root's children (systemd turns them on; a
            // bare hierarchy may not have them).
            let enabled =
                std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
            for c in ["memory", "cpu", "pids", "cpuset"] {
                if !enabled.split_whitespace().any(|e| e == c) {
                    let _ = std::fs::write(parent.join("cgroup.subtree_control"), format!("+{c}"));
                }
            }
        }
        for d in &self.dirs {
            std::fs::create_dir_all(d).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot create {}: {e}", d.display()))
            })?;
        }
        if self.version == Cgroups::V2 {
            // No swap: a guest's memory counts once, as resident.
            let _ = write(&self.dirs[0], "memory.swap.max", "0");
        }
        // A v1 cpuset takes no task before it has CPUs and memory nodes.
        if let Some(d) = self
            .controller_dir("cpuset")
            .filter(|_| self.version == Cgroups::V1)
        {
            let parent = d.parent().expect("under a controller");
            write(
                d,
                "cpuset.mems",
                std::fs::read_to_string(parent.join("cpuset.mems"))?.trim(),
            )?;
            if limits.cpus.is_none() {
                let cpus = std::fs::read_to_string(parent.join("cpuset.cpus"))?;
                write(d, "cpuset.cpus", cpus.trim())?;
            }
        }
        for (file, value) in cgroup_limits(limits, self.version) {
            let controller = file.split('.').next().unwrap_or_default();
            let Some(d) = self.controller_dir(controller) else {
                continue;
            };
            // Pinning is best effort (the cpuset controller may be off); the limits are not.
            if controller == "cpuset" && !d.join(file).exists() {
                continue;
            }
            write(d, file, &value)?;
        }
        Ok(())
    }

    /// Where `controller`'s files are: the one directory on v2, the controller's on v1.
    fn controller_dir(&self, controller: &str) -> Option<&Path> {
        match self.version {
            Cgroups::V2 => self.dirs.first(),
            Cgroups::V1 => self.dirs.iter().find(|d| {
                d.parent()
                    .and_then(|p| p.file_name())
                    .is_some_and(|c| c == controller)
            }),
        }
        .map(PathBuf::as_path)
    }

    /// The `cgroup.procs` files a process writes `0` to in order to enter the cgroup (what
    /// a VMM does before it executes, so everything it ever uses is accounted).
    pub fn procs_files(&self) -> Vec<CString> {
        self.dirs
            .iter()
            .filter_map(|d| {
                CString::new(d.join("cgroup.procs").as_os_str().as_encoded_bytes()).ok()
            })
            .collect()
    }

    /// Its directory (v2), or its memory controller's (v1).
    pub fn dir(&self) -> Option<&Path> {
        self.dirs.first().map(PathBuf::as_path)
    }

    /// The processes in it.
    pub fn pids(&self) -> Vec<i32> {
        self.dirs
            .first()
            .and_then(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// What the VMM (its guest's memory included) uses, when the cgroup exists.
    pub fn usage(&self) -> Option<Usage> {
        if !self.dirs.first().is_some_and(|d| d.is_dir()) {
            return None;
        }
        Some(gatevisor_lxc::usage_from(self.version, |file| {
            let d = self.controller_dir(file.split('.').next().unwrap_or_default())?;
            std::fs::read_to_string(d.join(file)).ok()
        }))
    }

    /// Removes the (empty) cgroup.
    pub fn remove(&self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Moves the calling process into the cgroups whose `cgroup.procs` files are `procs`. Only
/// async-signal-safe calls: it runs in a forked child before exec.
pub fn enter(procs: &[CString]) -> std::io::Result<()> {
    for p in procs {
        // SAFETY: open(2), write(2) and close(2) on a NUL-terminated path made before the
        // fork; no allocation and no locks.
        unsafe {
            let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
            libc::close(fd);
            if !ok {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_hierarchy() {
        let d = tempfile::tempdir().unwrap();
        for c in ["memory", "cpu", "pids"] {
            std::fs::create_dir_all(d.path().join(c)).unwrap();
        }
        let v1 = VmCgroup::under(d.path(), "dns", Cgroups::V1);
        // Only the controllers that are mounted.
        assert_eq!(
            v1.dirs,
            ["memory", "cpu", "pids"].map(|c| d.path().join(c).join("gatevisor.vm.dns"))
        );
        let v2 = VmCgroup::under(d.path(), "dns", Cgroups::V2);
        assert_eq!(v2.dirs, [d.path().join("gatevisor.vm.dns")]);
    }
}
