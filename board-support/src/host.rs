//! CPUs and memory, read from the kernel's own accounting.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostReport {
    pub kernel: String,
    /// CPUs this process may run on (`sched_getaffinity`).
    pub cpus: usize,
    pub memory_total_mib: u64,
    pub memory_available_mib: u64,
    /// DMI board name, when the firmware provides one.
    pub dmi_board_name: Option<String>,
}

pub fn probe() -> HostReport {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    HostReport {
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_total_mib: meminfo_kib(&meminfo, "MemTotal").unwrap_or(0) / 1024,
        memory_available_mib: meminfo_kib(&meminfo, "MemAvailable").unwrap_or(0) / 1024,
        dmi_board_name: std::fs::read_to_string("/sys/class/dmi/id/board_name")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty()),
    }
}

/// Reads one `Key:   1234 kB` line of `/proc/meminfo`.
pub fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parses_named_key_only() {
        let m = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(meminfo_kib(m, "MemTotal"), Some(24576000));
        assert_eq!(meminfo_kib(m, "MemAvailable"), Some(2048));
        assert_eq!(meminfo_kib(m, "Mem"), None);
    }

    #[test]
    fn host_probe_sees_memory_and_cpus() {
        let h = probe();
        assert!(h.cpus >= 1);
        assert!(h.memory_total_mib > 0);
    }
}
