//! The privilege policy: which capabilities a service may keep, decided by the operator in
//! the daemon's configuration, per publisher key and per board, and checked at install (a
//! package or manifest that asks for more is refused there, with the reason), never at start.
//!
//! ```toml
//! [policy]
//! capabilities = ["NET_RAW", "NET_BIND_SERVICE"]   # any service (default: DEFAULT_CAPABILITIES)
//! [policy.publishers.acme]                          # a publisher key, by name or key id
//! capabilities = ["NET_ADMIN"]                      # granted on top of the default
//! [policy.boards.emulated-gateway]                  # replaces the default on that board
//! capabilities = ["NET_RAW"]
//! [policy.local]                                    # manifests installed from a file
//! capabilities = ["NET_ADMIN"]
//! ```
//! Containers run in a user namespace of their own unless a grant says `privileged = true`
//! for the publisher (or `[policy.local]`) and the manifest asks for `privileged = true`.
//! Capabilities that reach beyond a container on any board (`SYS_ADMIN`, `SYS_MODULE`,
//! `SYS_RAWIO`, `DAC_READ_SEARCH`, ...) are never in the default; only a grant names them.

use std::collections::BTreeMap;

use caps::Capability;
use serde::Deserialize;

/// What any service may keep when the configuration says nothing: the set container runtimes
/// give by default, less `MKNOD` (no device nodes in a service).
pub const DEFAULT_CAPABILITIES: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETPCAP,
    Capability::CAP_SETFCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_NET_RAW,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_AUDIT_WRITE,
];

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// May run privileged containers (no user namespace: the container's root is the host's).
    #[serde(default)]
    pub privileged: bool,
    /// Host calls services may be granted (`OP:PATTERN`, see [`crate::hostcall`]), on top
    /// of `[policy] host_calls`.
    #[serde(default)]
    pub host_calls: Vec<String>,
    /// OCI images this publisher signed may hold setuid/setgid files (most Debian-based
    /// images do; a container's `no_new_privs` keeps them from raising privileges).
    #[serde(default)]
    pub setuid: bool,
}

/// `[policy]` of the configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Replaces [`DEFAULT_CAPABILITIES`].
    #[serde(default)]
    pub capabilities: Option<Vec<String>>,
    /// Host calls any service may be granted (default: none).
    #[serde(default)]
    pub host_calls: Vec<String>,
    #[serde(default)]
    pub publishers: BTreeMap<String, Grant>,
    #[serde(default)]
    pub boards: BTreeMap<String, Grant>,
    #[serde(default)]
    pub local: Option<Grant>,
}

/// Who asks: the publisher key that signed a package, or a manifest installed from a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requester {
    Publisher { id: String, name: String },
    Local,
}

impl std::fmt::Display for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Requester::Publisher { id, name } => write!(f, "publisher {name} (key {id})"),
            Requester::Local => f.write_str("a local manifest"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("policy: {field}: {name:?} is not a Linux capability")]
    Unknown { field: String, name: String },
    #[error("field `privileged`: privileged containers are not granted to {requester} on board {board} (grant privileged = true under [policy.publishers.NAME] or [policy.local] in the daemon's configuration)")]
    NotPrivileged { requester: String, board: String },
    #[error("field `capabilities`: {cap} is not granted to {requester} on board {board} (grant it under [policy.publishers.NAME] or [policy.local] in the daemon's configuration)")]
    NotGranted {
        cap: String,
        requester: String,
        board: String,
    },
    #[error("policy: {field}: {problem}")]
    BadHostCall { field: String, problem: String },
    #[error("field `host_calls.allow`: {grant} is not granted to {requester} on board {board} (allow it with host_calls under [policy], [policy.publishers.NAME] or [policy.local] in the daemon's configuration)")]
    HostCallNotGranted {
        grant: String,
        requester: String,
        board: String,
    },
}

fn host_grants(field: &str, list: &[String]) -> Result<Vec<crate::hostcall::Grant>, PolicyError> {
    list.iter()
        .map(|s| {
            crate::hostcall::Grant::parse(s).map_err(|problem| PolicyError::BadHostCall {
                field: field.into(),
                problem,
            })
        })
        .collect()
}

/// The policy, resolved for this board.
#[derive(Debug, Clone)]
pub struct Policy {
    base: Vec<Capability>,
    /// Capabilities granted on top of `base`.
    extra: Extra<Capability>,
    board: String,
    /// Who may run privileged containers: publisher names or key ids, and "local".
    privileged: Vec<String>,
    /// Whose OCI images may hold setuid files: publisher names or key ids.
    setuid: Vec<String>,
    /// Host calls: for anyone, per publisher, for local manifests.
    host_calls: Vec<crate::hostcall::Grant>,
    host_calls_extra: Extra<crate::hostcall::Grant>,
}

/// What publishers (by name or key id) and local manifests are granted of one kind, on top
/// of what anyone is.
#[derive(Debug, Clone)]
struct Extra<T> {
    publishers: BTreeMap<String, Vec<T>>,
    local: Vec<T>,
}

impl<T> Extra<T> {
    /// Reads each publisher's and the local grant with `of(field, grant)` (`field`: where
    /// the grant is in the configuration, for errors).
    fn new(
        config: &PolicyConfig,
        of: impl Fn(&str, &Grant) -> Result<Vec<T>, PolicyError>,
    ) -> Result<Extra<T>, PolicyError> {
        let publishers = config
            .publishers
            .iter()
            .map(|(k, g)| Ok((k.clone(), of(&format!("policy.publishers.{k}"), g)?)))
            .collect::<Result<_, PolicyError>>()?;
        let local = match &config.local {
            Some(g) => of("policy.local", g)?,
            None => Vec::new(),
        };
        Ok(Extra { publishers, local })
    }

    /// What `who` is granted.
    fn of(&self, who: &Requester) -> &[T] {
        match who {
            Requester::Local => &self.local,
            Requester::Publisher { id, name } => self
                .publishers
                .get(name)
                .or_else(|| self.publishers.get(id))
                .map(Vec::as_slice)
                .unwrap_or(&[]),
        }
    }
}

fn parse(field: &str, names: &[String]) -> Result<Vec<Capability>, PolicyError> {
    names
        .iter()
        .map(|n| {
            crate::manifest::parse_capability(&n.to_ascii_uppercase()).ok_or_else(|| {
                PolicyError::Unknown {
                    field: field.into(),
                    name: n.clone(),
                }
            })
        })
        .collect()
}

impl Policy {
    /// Resolves `config` for the board profile `board`; unknown capability names are refused
    /// (the daemon does not start with a policy it cannot read).
    pub fn new(config: &PolicyConfig, board: &str) -> Result<Policy, PolicyError> {
        let base = match (config.boards.get(board), &config.capabilities) {
            (Some(g), _) => parse(&format!("policy.boards.{board}"), &g.capabilities)?,
            (None, Some(c)) => parse("policy.capabilities", c)?,
            (None, None) => DEFAULT_CAPABILITIES.to_vec(),
        };
        for (name, g) in &config.boards {
            parse(&format!("policy.boards.{name}"), &g.capabilities)?;
        }
        let extra = Extra::new(config, |field, g| parse(field, &g.capabilities))?;
        let privileged = config
            .publishers
            .iter()
            .filter(|(_, g)| g.privileged)
            .map(|(k, _)| k.clone())
            .chain(
                config
                    .local
                    .as_ref()
                    .filter(|g| g.privileged)
                    .map(|_| "local".to_string()),
            )
            .collect();
        let setuid = config
            .publishers
            .iter()
            .filter(|(_, g)| g.setuid)
            .map(|(k, _)| k.clone())
            .collect();
        let mut host_calls = host_grants("policy.host_calls", &config.host_calls)?;
        if let Some(g) = config.boards.get(board) {
            host_calls.extend(host_grants(
                &format!("policy.boards.{board}.host_calls"),
                &g.host_calls,
            )?);
        }
        let host_calls_extra = Extra::new(config, |field, g| {
            host_grants(&format!("{field}.host_calls"), &g.host_calls)
        })?;
        Ok(Policy {
            base,
            extra,
            board: board.into(),
            privileged,
            setuid,
            host_calls,
            host_calls_extra,
        })
    }

    /// Is every host call in `asked` allowed to `who`? The first that is not is refused.
    pub fn check_host_calls(
        &self,
        who: &Requester,
        asked: &crate::hostcall::Grants,
    ) -> Result<(), PolicyError> {
        let allowed: Vec<crate::hostcall::Grant> = self
            .host_calls
            .iter()
            .chain(self.host_calls_extra.of(who))
            .cloned()
            .collect();
        match asked.not_covered_by(&allowed).first() {
            None => Ok(()),
            Some(g) => Err(PolicyError::HostCallNotGranted {
                grant: g.to_string(),
                requester: who.to_string(),
                board: self.board.clone(),
            }),
        }
    }

    /// Is every capability in `asked` granted to `who`?
    pub fn check(&self, who: &Requester, asked: &[Capability]) -> Result<(), PolicyError> {
        let extra = self.extra.of(who);
        for c in asked {
            if !self.base.contains(c) && !extra.contains(c) {
                return Err(PolicyError::NotGranted {
                    cap: c.to_string().trim_start_matches("CAP_").to_string(),
                    requester: who.to_string(),
                    board: self.board.clone(),
                });
            }
        }
        Ok(())
    }
}

impl Policy {
    /// May OCI images signed by key `id` (trusted as `name`) hold setuid/setgid files?
    pub fn allows_setuid(&self, id: &str, name: &str) -> bool {
        self.setuid.iter().any(|k| k == id || k == name)
    }

    /// May `who` run a privileged container?
    pub fn check_privileged(&self, who: &Requester) -> Result<(), PolicyError> {
        let granted = match who {
            Requester::Local => self.privileged.iter().any(|k| k == "local"),
            Requester::Publisher { id, name } => {
                self.privileged.iter().any(|k| k == id || k == name)
            }
        };
        if granted {
            Ok(())
        } else {
            Err(PolicyError::NotPrivileged {
                requester: who.to_string(),
                board: self.board.clone(),
            })
        }
    }
}

impl Default for Policy {
    fn default() -> Policy {
        Policy::new(&PolicyConfig::default(), "default").expect("the default policy parses")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acme() -> Requester {
        Requester::Publisher {
            id: "0123456789abcdef".into(),
            name: "acme".into(),
        }
    }

    #[test]
    fn the_default_refuses_what_reaches_beyond_a_container() {
        let p = Policy::default();
        assert!(p
            .check(
                &acme(),
                &[Capability::CAP_NET_RAW, Capability::CAP_NET_BIND_SERVICE]
            )
            .is_ok());
        for c in [
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_SYS_MODULE,
            Capability::CAP_SYS_RAWIO,
            Capability::CAP_DAC_READ_SEARCH,
            Capability::CAP_MKNOD,
            Capability::CAP_NET_ADMIN,
        ] {
            let e = p.check(&acme(), &[c]).unwrap_err().to_string();
            assert!(e.contains("acme") && e.contains("capabilities"), "{e}");
            assert!(p.check(&Requester::Local, &[c]).is_err());
        }
    }

    #[test]
    fn grants_are_per_publisher_by_name_or_id_per_board_and_local() {
        let cfg: PolicyConfig = toml::from_str(
            r#"
[publishers.acme]
capabilities = ["NET_ADMIN"]
[publishers.fedcba9876543210]
capabilities = ["SYS_ADMIN"]
[boards.tiny]
capabilities = ["NET_RAW"]
[local]
capabilities = ["CAP_SYS_TIME"]
"#,
        )
        .unwrap();
        let p = Policy::new(&cfg, "other").unwrap();
        assert!(p.check(&acme(), &[Capability::CAP_NET_ADMIN]).is_ok());
        assert!(p.check(&acme(), &[Capability::CAP_SYS_ADMIN]).is_err());
        let by_id = Requester::Publisher {
            id: "fedcba9876543210".into(),
            name: "someone".into(),
        };
        assert!(p.check(&by_id, &[Capability::CAP_SYS_ADMIN]).is_ok());
        assert!(p
            .check(&Requester::Local, &[Capability::CAP_SYS_TIME])
            .is_ok());
        let tiny = Policy::new(&cfg, "tiny").unwrap();
        assert!(tiny.check(&acme(), &[Capability::CAP_NET_RAW]).is_ok());
        assert!(tiny
            .check(&acme(), &[Capability::CAP_NET_BIND_SERVICE])
            .is_err());
        let bad: PolicyConfig = toml::from_str("capabilities = [\"FLY\"]").unwrap();
        assert!(matches!(
            Policy::new(&bad, "x"),
            Err(PolicyError::Unknown { .. })
        ));
    }

    /// Host calls follow the same requesters as capabilities: a publisher's grant is its
    /// own (by name or key id), the board's adds to everyone's, local manifests get only
    /// `[policy.local]`, and a malformed entry stops the policy from loading.
    #[test]
    fn host_calls_are_allowed_per_publisher_per_board_and_local_and_no_further() {
        let cfg: PolicyConfig = toml::from_str(
            r#"
host_calls = ["board.fact:uptime"]
[publishers.acme]
host_calls = ["link.stats:wlan*"]
[boards.tiny]
host_calls = ["dhcp.leases"]
[local]
host_calls = ["neigh.list:br-lan"]
"#,
        )
        .unwrap();
        let asks = |s: &str| crate::hostcall::Grants::parse(&[s.to_string()]).unwrap();
        let p = Policy::new(&cfg, "other").unwrap();
        let someone = Requester::Publisher {
            id: "fedcba9876543210".into(),
            name: "someone".into(),
        };
        assert!(p
            .check_host_calls(&acme(), &asks("link.stats:wlan0"))
            .is_ok());
        assert!(p
            .check_host_calls(&acme(), &asks("board.fact:uptime"))
            .is_ok());
        for (who, grant) in [
            (&acme(), "link.stats:*"),
            (&acme(), "link.stats:br-lan"),
            (&acme(), "dhcp.leases"),
            (&someone, "link.stats:wlan0"),
            (&Requester::Local, "link.stats:wlan0"),
        ] {
            let e = p
                .check_host_calls(who, &asks(grant))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("host_calls.allow") && e.contains("not granted"),
                "{e}"
            );
        }
        assert!(p
            .check_host_calls(&Requester::Local, &asks("neigh.list:br-lan"))
            .is_ok());
        let tiny = Policy::new(&cfg, "tiny").unwrap();
        assert!(tiny
            .check_host_calls(&someone, &asks("dhcp.leases"))
            .is_ok());
        let bad: PolicyConfig =
            toml::from_str("[publishers.acme]\nhost_calls = [\"exec:/bin/sh\"]").unwrap();
        let e = Policy::new(&bad, "x").unwrap_err().to_string();
        assert!(e.contains("policy.publishers.acme.host_calls"), "{e}");
    }
}
