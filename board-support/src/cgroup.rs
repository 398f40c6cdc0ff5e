//! Which cgroup hierarchy is in use and which controllers it offers.
//!
//! Three layouts exist in the field: pure v2 (`/sys/fs/cgroup` is cgroup2, as on the emulated
//! gateway), pure v1, and hybrid (v1 controllers plus a v2 mount that has no controllers, as on
//! the development machines). On a hybrid host the v1 hierarchies hold the controllers that
//! matter (memory, cpu, pids), so limits are written there.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    V1,
    V2,
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CgroupReport {
    /// The hierarchy that limits are written to.
    pub version: CgroupVersion,
    /// Controllers usable in that hierarchy.
    pub controllers: Vec<String>,
    /// A cgroup2 mount exists (possibly without controllers).
    pub v2_mounted: bool,
}

pub fn probe() -> CgroupReport {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let v2_controllers = v2_mount(&mountinfo).and_then(|mp| {
        std::fs::read_to_string(format!("{mp}/cgroup.controllers"))
            .ok()
            .map(|s| s.split_whitespace().map(str::to_string).collect::<Vec<_>>())
    });
    from_mountinfo(&mountinfo, v2_controllers)
}

fn v2_mount(mountinfo: &str) -> Option<String> {
    mounts(mountinfo)
        .find(|(fstype, _, _)| *fstype == "cgroup2")
        .map(|(_, mp, _)| mp.to_string())
}

/// (fstype, mount point, super options) of each mount.
fn mounts(mountinfo: &str) -> impl Iterator<Item = (&str, &str, &str)> {
    mountinfo.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split_whitespace().nth(4)?;
        let mut r = right.split_whitespace();
        let fstype = r.next()?;
        let _source = r.next()?;
        let opts = r.next().unwrap_or("");
        Some((fstype, mount_point, opts))
    })
}

/// Decides the layout from `/proc/self/mountinfo` and the v2 root's `cgroup.controllers`.
pub fn from_mountinfo(mountinfo: &str, v2_controllers: Option<Vec<String>>) -> CgroupReport {
    const KNOWN: &[&str] = &[
        "cpu",
        "cpuacct",
        "cpuset",
        "memory",
        "devices",
        "freezer",
        "blkio",
        "pids",
        "net_cls",
        "perf_event",
        "hugetlb",
        "rdma",
        "misc",
    ];
    let v2_mounted = v2_mount(mountinfo).is_some();
    let mut v1: Vec<String> = mounts(mountinfo)
        .filter(|(fstype, _, _)| *fstype == "cgroup")
        .flat_map(|(_, _, opts)| opts.split(','))
        .filter(|o| KNOWN.contains(o))
        .map(str::to_string)
        .collect();
    v1.sort();
    v1.dedup();
    // A controller mounted as v1 cannot be in v2 at the same time: when the v1 hierarchies
    // hold the controllers (hybrid hosts), limits go there, whatever the v2 mount offers.
    if !v1.is_empty() {
        return CgroupReport {
            version: CgroupVersion::V1,
            controllers: v1,
            v2_mounted,
        };
    }
    CgroupReport {
        version: if v2_mounted {
            CgroupVersion::V2
        } else {
            CgroupVersion::None
        },
        controllers: v2_controllers.unwrap_or_default(),
        v2_mounted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
32 30 0:28 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 30 0:29 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
34 30 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PURE_V2: &str = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn hybrid_with_empty_v2_uses_v1_controllers() {
        let r = from_mountinfo(HYBRID, Some(vec!["hugetlb".into()]));
        assert_eq!(r.version, CgroupVersion::V1);
        assert_eq!(r.controllers, vec!["cpu", "memory", "pids"]);
        assert!(r.v2_mounted);
    }

    #[test]
    fn pure_v2_lists_its_controllers() {
        let ctl = vec!["cpu".to_string(), "memory".into(), "pids".into()];
        let r = from_mountinfo(PURE_V2, Some(ctl.clone()));
        assert_eq!(r.version, CgroupVersion::V2);
        assert_eq!(r.controllers, ctl);
    }

    #[test]
    fn no_cgroups_at_all() {
        let r = from_mountinfo("22 1 0:5 / /proc rw - proc proc rw\n", None);
        assert_eq!(r.version, CgroupVersion::None);
    }
}
