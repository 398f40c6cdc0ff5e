//! Turns a [`ContainerSpec`] into liblxc configuration items. Pure: unit-tested without liblxc.

use std::path::{Path, PathBuf};

/// Which cgroup hierarchy limits are written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cgroups {
    V1,
    V2,
}

/// Resource limits; `None` leaves the kernel default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    /// CPU time per 100 ms period, in microseconds (100_000 = one full CPU).
    pub cpu_quota_us: Option<u64>,
    pub pids: Option<u64>,
    /// CPUs the container may run on (the first N).
    pub cpus: Option<u32>,
}

pub const CPU_PERIOD_US: u64 = 100_000;

/// A user namespace: ids 0..`count` inside are `host_base`.. on the host. The container's
/// root is then an unprivileged user of the host, and its capabilities reach only what its
/// own namespaces own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub host_base: u32,
    pub count: u32,
}

/// Everything liblxc needs to define one service container.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub hostname: String,
    pub rootfs: PathBuf,
    /// When set, the rootfs is this ext4 image (mounted through a loop device), whose size is
    /// the container's disk limit; `rootfs` is then unused.
    pub disk_image: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub limits: Limits,
    /// Capabilities the container keeps; all others are dropped.
    pub capabilities: Vec<caps::Capability>,
    /// Host-side name of the container's veth pair; `None` gives it only a loopback.
    pub veth_host: Option<String>,
    /// The container's IPv4 address on eth0 (`A.B.C.D/PREFIX`), when gatevisor sets it.
    pub ipv4_address: Option<String>,
    /// The MAC address of the container's eth0 (`aa:bb:cc:dd:ee:ff`), when gatevisor sets it.
    pub mac: Option<String>,
    /// liblxc's seccomp policy file; `None` when this liblxc has none.
    pub seccomp_profile: Option<PathBuf>,
    /// The AppArmor profile, when liblxc's default must be overridden (see
    /// [`crate::apparmor_profile`]).
    pub apparmor_profile: Option<String>,
    /// Host directories bind-mounted into the container: (host path, path inside, relative to
    /// the container's root, e.g. `run/gatevisor`).
    pub bind_dirs: Vec<(PathBuf, String)>,
    /// The container's user namespace; `None` runs it privileged (root is the host's root).
    pub idmap: Option<IdMap>,
    /// Its program's user and group inside (`None`: its root).
    pub user: Option<(u32, u32)>,
    /// The directory its program starts in (inside its root).
    pub cwd: Option<String>,
    /// The signal that asks its program to stop (`SIGTERM` when `None`).
    pub stop_signal: Option<String>,
}

/// The config items, in the order they are set.
pub fn items(spec: &ContainerSpec, cgroups: Cgroups, lxc_log: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, val: String| v.push((k.to_string(), val));
    set("lxc.uts.name", spec.hostname.clone());
    if let Some(m) = spec.idmap {
        set("lxc.idmap", format!("u 0 {} {}", m.host_base, m.count));
        set("lxc.idmap", format!("g 0 {} {}", m.host_base, m.count));
    }
    match &spec.disk_image {
        Some(img) => set("lxc.rootfs.path", format!("loop:{}", img.display())),
        None => set("lxc.rootfs.path", format!("dir:{}", spec.rootfs.display())),
    }
    // The program's stdout/stderr are the monitor's, which writes the service log.
    set("lxc.console.path", "none".into());
    set("lxc.tty.max", "0".into());
    set("lxc.pty.max", "8".into());
    set("lxc.mount.auto", "proc:mixed sys:ro".into());
    set("lxc.autodev", "1".into());
    set("lxc.no_new_privs", "1".into());
    set(
        "lxc.signal.halt",
        spec.stop_signal.clone().unwrap_or_else(|| "SIGTERM".into()),
    );
    if let Some((uid, gid)) = spec.user {
        set("lxc.init.uid", uid.to_string());
        set("lxc.init.gid", gid.to_string());
    }
    if let Some(cwd) = &spec.cwd {
        set("lxc.init.cwd", cwd.clone());
    }
    set("lxc.log.file", lxc_log.display().to_string());
    set("lxc.log.level", "WARN".into());
    if let Some(p) = &spec.seccomp_profile {
        set("lxc.seccomp.profile", p.display().to_string());
    }
    if let Some(p) = &spec.apparmor_profile {
        set("lxc.apparmor.profile", p.clone());
    }
    let keep = if spec.capabilities.is_empty() {
        "none".to_string()
    } else {
        spec.capabilities
            .iter()
            .map(|c| cap_name(*c))
            .collect::<Vec<_>>()
            .join(" ")
    };
    set("lxc.cap.keep", keep);
    for (k, val) in &spec.env {
        set("lxc.environment", format!("{k}={val}"));
    }
    match &spec.veth_host {
        Some(host) => {
            set("lxc.net.0.type", "veth".into());
            set("lxc.net.0.veth.pair", host.clone());
            set("lxc.net.0.name", "eth0".into());
            set("lxc.net.0.flags", "up".into());
            if let Some(m) = &spec.mac {
                set("lxc.net.0.hwaddr", m.clone());
            }
            if let Some(a) = &spec.ipv4_address {
                set("lxc.net.0.ipv4.address", a.clone());
            }
        }
        None => set("lxc.net.0.type", "empty".into()),
    }
    for (host, target) in &spec.bind_dirs {
        set(
            "lxc.mount.entry",
            format!(
                "{} {} none bind,create=dir 0 0",
                host.display(),
                target.trim_start_matches('/')
            ),
        );
    }
    let prefix = match cgroups {
        Cgroups::V1 => "lxc.cgroup",
        Cgroups::V2 => "lxc.cgroup2",
    };
    for (file, value) in cgroup_limits(&spec.limits, cgroups) {
        set(&format!("{prefix}.{file}"), value);
    }
    v
}

/// The cgroup files (`controller.key`) and values that carry `l` on `cgroups`: what liblxc
/// writes for a container, and what gatevisor writes for a VMM's cgroup.
pub fn cgroup_limits(l: &Limits, cgroups: Cgroups) -> Vec<(&'static str, String)> {
    let mut v = Vec::new();
    match cgroups {
        Cgroups::V1 => {
            if let Some(m) = l.memory_bytes {
                v.push(("memory.limit_in_bytes", m.to_string()));
            }
            if let Some(q) = l.cpu_quota_us {
                v.push(("cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
                v.push(("cpu.cfs_quota_us", q.to_string()));
            }
        }
        Cgroups::V2 => {
            if let Some(m) = l.memory_bytes {
                v.push(("memory.max", m.to_string()));
            }
            if let Some(q) = l.cpu_quota_us {
                v.push(("cpu.max", format!("{q} {CPU_PERIOD_US}")));
            }
        }
    }
    if let Some(p) = l.pids {
        v.push(("pids.max", p.to_string()));
    }
    if let Some(n) = l.cpus {
        v.push(("cpuset.cpus", cpu_list(n)));
    }
    v
}

/// The first `n` CPUs, as a cpuset list.
pub fn cpu_list(n: u32) -> String {
    match n {
        0 | 1 => "0".into(),
        n => format!("0-{}", n - 1),
    }
}

/// `CAP_NET_BIND_SERVICE` → `net_bind_service`, the spelling `lxc.cap.keep` takes.
pub fn cap_name(c: caps::Capability) -> String {
    c.to_string()
        .trim_start_matches("CAP_")
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "svc".into(),
            hostname: "svc".into(),
            rootfs: "/r".into(),
            disk_image: None,
            env: vec![("A".into(), "b c".into())],
            limits: Limits {
                memory_bytes: Some(64 << 20),
                cpu_quota_us: Some(50_000),
                pids: Some(32),
                cpus: Some(2),
            },
            capabilities: vec![],
            veth_host: Some("gv-svc".into()),
            mac: Some("02:47:56:00:00:01".into()),
            ipv4_address: Some("10.77.0.9/24".into()),
            seccomp_profile: Some("/s.seccomp".into()),
            apparmor_profile: None,
            bind_dirs: vec![("/var/lib/gv/run/svc".into(), "/run/gatevisor".into())],
            idmap: None,
            user: None,
            cwd: None,
            stop_signal: None,
        }
    }

    fn get<'a>(v: &'a [(String, String)], k: &str) -> Vec<&'a str> {
        v.iter()
            .filter(|(key, _)| key == k)
            .map(|(_, val)| val.as_str())
            .collect()
    }

    #[test]
    fn v1_limits_use_v1_keys() {
        let v = items(&spec(), Cgroups::V1, Path::new("/l"));
        assert_eq!(get(&v, "lxc.cgroup.memory.limit_in_bytes"), ["67108864"]);
        assert_eq!(get(&v, "lxc.cgroup.cpu.cfs_quota_us"), ["50000"]);
        assert_eq!(get(&v, "lxc.cgroup.pids.max"), ["32"]);
        assert_eq!(get(&v, "lxc.cgroup.cpuset.cpus"), ["0-1"]);
        assert_eq!(get(&v, "lxc.rootfs.path"), ["dir:/r"]);
        assert!(get(&v, "lxc.cgroup2.memory.max").is_empty());
    }

    #[test]
    fn v2_limits_use_v2_keys() {
        let v = items(&spec(), Cgroups::V2, Path::new("/l"));
        assert_eq!(get(&v, "lxc.cgroup2.memory.max"), ["67108864"]);
        assert_eq!(get(&v, "lxc.cgroup2.cpu.max"), ["50000 100000"]);
        assert_eq!(get(&v, "lxc.cgroup2.pids.max"), ["32"]);
        assert!(get(&v, "lxc.cgroup.memory.limit_in_bytes").is_empty());
    }

    #[test]
    fn no_granted_caps_keeps_none_and_no_new_privs_is_set() {
        let v = items(&spec(), Cgroups::V2, Path::new("/l"));
        assert_eq!(get(&v, "lxc.cap.keep"), ["none"]);
        assert_eq!(get(&v, "lxc.no_new_privs"), ["1"]);
        assert_eq!(get(&v, "lxc.seccomp.profile"), ["/s.seccomp"]);
    }

    #[test]
    fn granted_caps_use_lxc_spelling() {
        let mut s = spec();
        s.capabilities = vec![
            caps::Capability::CAP_NET_BIND_SERVICE,
            caps::Capability::CAP_NET_RAW,
        ];
        let v = items(&s, Cgroups::V1, Path::new("/l"));
        assert_eq!(get(&v, "lxc.cap.keep"), ["net_bind_service net_raw"]);
    }

    #[test]
    fn an_idmap_maps_users_and_groups() {
        let mut s = spec();
        assert!(get(&items(&s, Cgroups::V1, Path::new("/l")), "lxc.idmap").is_empty());
        s.idmap = Some(IdMap {
            host_base: 165536,
            count: 65536,
        });
        assert_eq!(
            get(&items(&s, Cgroups::V1, Path::new("/l")), "lxc.idmap"),
            ["u 0 165536 65536", "g 0 165536 65536"]
        );
    }

    #[test]
    fn the_programs_user_directory_and_stop_signal_are_set_when_given() {
        let mut s = spec();
        let v = items(&s, Cgroups::V1, Path::new("/l"));
        assert!(get(&v, "lxc.init.uid").is_empty() && get(&v, "lxc.init.cwd").is_empty());
        assert_eq!(get(&v, "lxc.signal.halt"), ["SIGTERM"]);
        s.user = Some((1000, 100));
        s.cwd = Some("/srv".into());
        s.stop_signal = Some("SIGQUIT".into());
        let v = items(&s, Cgroups::V1, Path::new("/l"));
        assert_eq!(
            (
                get(&v, "lxc.init.uid"),
                get(&v, "lxc.init.gid"),
                get(&v, "lxc.init.cwd"),
                get(&v, "lxc.signal.halt")
            ),
            (vec!["1000"], vec!["100"], vec!["/srv"], vec!["SIGQUIT"])
        );
    }

    #[test]
    fn bind_dirs_become_relative_mount_entries() {
        let v = items(&spec(), Cgroups::V1, Path::new("/l"));
        assert_eq!(
            get(&v, "lxc.mount.entry"),
            ["/var/lib/gv/run/svc run/gatevisor none bind,create=dir 0 0"]
        );
    }

    #[test]
    fn veth_host_name_and_env_are_passed() {
        let v = items(&spec(), Cgroups::V1, Path::new("/l"));
        assert_eq!(get(&v, "lxc.net.0.hwaddr"), ["02:47:56:00:00:01"]);
        assert_eq!(get(&v, "lxc.net.0.veth.pair"), ["gv-svc"]);
        assert_eq!(get(&v, "lxc.net.0.ipv4.address"), ["10.77.0.9/24"]);
        assert_eq!(get(&v, "lxc.environment"), ["A=b c"]);
        let mut s = spec();
        s.veth_host = None;
        assert_eq!(
            get(&items(&s, Cgroups::V1, Path::new("/l")), "lxc.net.0.type"),
            ["empty"]
        );
    }
}
