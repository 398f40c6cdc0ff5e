//! Board profiles: per-board tuning in TOML (`board-support/boards/*.toml`).
//!
//! The profiles shipped in this folder are compiled in, so a gateway needs no extra files; an
//! operator can add or override profiles in a directory (`/etc/gatevisor/boards`).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardProfile {
    pub name: String,
    pub description: String,
    /// Memory all services together may use, MiB; 0 means half the machine's RAM.
    pub service_memory_budget_mib: u64,
    pub max_services: u32,
    /// Open vSwitch bridge the services are plugged into.
    pub bridge: String,
    /// `netdev` (userspace datapath) or `system` (kernel datapath).
    pub datapath_type: String,
    /// The board has a packet processor that offloads established flows.
    pub hardware_offload: bool,
    #[serde(rename = "match", default)]
    pub matcher: Match,
    /// The DHCP server's lease file (dnsmasq's format), for the `dhcp.leases` host call.
    #[serde(default)]
    pub dhcp_leases: Option<PathBuf>,
    /// Named facts a service may read with the `board.fact` host call, each the file
    /// (sysfs, procfs) it is read from: a service names a fact, never a path.
    #[serde(default)]
    pub facts: std::collections::BTreeMap<String, PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    /// DMI board names (`/sys/class/dmi/id/board_name`) this profile is for.
    #[serde(default)]
    pub dmi_board_names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("board profile {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot read board profile directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no board profile named {name:?}; known: {known}")]
    Unknown { name: String, known: String },
}

const BUILTIN: &[(&str, &str)] = &[
    (
        "boards/generic-x86_64.toml",
        include_str!("../boards/generic-x86_64.toml"),
    ),
    (
        "boards/intel-puma7-gateway.toml",
        include_str!("../boards/intel-puma7-gateway.toml"),
    ),
    (
        "boards/emulated-gateway.toml",
        include_str!("../boards/emulated-gateway.toml"),
    ),
];

pub const GENERIC: &str = "generic-x86_64";

fn parse(path: &Path, text: &str) -> Result<BoardProfile, ProfileError> {
    let p: BoardProfile = toml::from_str(text).map_err(|e| ProfileError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let bad = |m: String| ProfileError::Parse {
        path: path.to_path_buf(),
        message: m,
    };
    if !matches!(p.datapath_type.as_str(), "netdev" | "system") {
        return Err(bad(format!(
            "datapath_type = {:?}: expected \"netdev\" or \"system\"",
            p.datapath_type
        )));
    }
    if p.bridge.is_empty() || p.bridge.len() > 15 {
        return Err(bad(format!(
            "bridge = {:?}: must be 1 to 15 characters",
            p.bridge
        )));
    }
    if p.max_services == 0 {
        return Err(bad("max_services must be at least 1".into()));
    }
    Ok(p)
}

/// The compiled-in profiles, then those in `extra_dir` (which override by name).
pub fn load_all(extra_dir: Option<&Path>) -> Result<Vec<BoardProfile>, ProfileError> {
    let mut all = Vec::new();
    for (path, text) in BUILTIN {
        all.push(parse(Path::new(path), text)?);
    }
    if let Some(dir) = extra_dir.filter(|d| d.is_dir()) {
        let entries = std::fs::read_dir(dir).map_err(|source| ProfileError::ReadDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path).map_err(|e| ProfileError::Parse {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let p = parse(&path, &text)?;
            all.retain(|q| q.name != p.name);
            all.push(p);
        }
    }
    Ok(all)
}

/// Picks `name` when given ("auto" means match the DMI board name), else the profile whose
/// `match.dmi_board_names` contains the board's name, else the generic profile.
pub fn select(
    all: &[BoardProfile],
    name: Option<&str>,
    dmi_board_name: Option<&str>,
) -> Result<BoardProfile, ProfileError> {
    let find = |n: &str| all.iter().find(|p| p.name == n).cloned();
    match name.filter(|n| *n != "auto") {
        Some(n) => find(n).ok_or_else(|| ProfileError::Unknown {
            name: n.to_string(),
            known: all
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
        None => Ok(dmi_board_name
            .and_then(|b| {
                all.iter()
                    .find(|p| p.matcher.dmi_board_names.iter().any(|m| m == b))
                    .cloned()
            })
            .or_else(|| find(GENERIC))
            .expect("the generic profile is compiled in")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_profiles_parse() {
        let all = load_all(None).unwrap();
        assert!(all.iter().any(|p| p.name == GENERIC));
        assert!(all.iter().any(|p| p.hardware_offload));
    }

    #[test]
    fn dmi_name_selects_gateway_profile() {
        let all = load_all(None).unwrap();
        assert_eq!(
            select(&all, None, Some("Puma7")).unwrap().name,
            "intel-puma7-gateway"
        );
        assert_eq!(
            select(&all, None, Some("gatevisor-emulated-gateway"))
                .unwrap()
                .name,
            "emulated-gateway"
        );
        assert_eq!(select(&all, None, Some("Other")).unwrap().name, GENERIC);
        assert_eq!(select(&all, Some("auto"), None).unwrap().name, GENERIC);
    }

    #[test]
    fn unknown_profile_name_lists_known_ones() {
        let all = load_all(None).unwrap();
        let e = select(&all, Some("nope"), None).unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains(GENERIC), "{e}");
    }

    #[test]
    fn directory_profile_overrides_builtin_and_bad_one_names_file() {
        let dir = tempfile::tempdir().unwrap();
        let text = include_str!("../boards/generic-x86_64.toml").replace("16", "3");
        std::fs::write(dir.path().join("g.toml"), text).unwrap();
        let all = load_all(Some(dir.path())).unwrap();
        assert_eq!(select(&all, Some(GENERIC), None).unwrap().max_services, 3);

        std::fs::write(dir.path().join("h.toml"), "name = 1\n").unwrap();
        let e = load_all(Some(dir.path())).unwrap_err().to_string();
        assert!(e.contains("h.toml"), "{e}");
    }
}
