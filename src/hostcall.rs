//! Host calls: the few typed operations on the gateway that a service may be granted, served
//! on its control channel (the verdict socket: a Unix socket in a container, vsock in a
//! microVM). The service names an operation and its arguments; never a path, an ioctl
//! number or a symbol. Each call is checked against the service's grants (from its signed
//! manifest, themselves checked against the operator's policy at install), rate-limited per
//! service, and audited in the event log.
//!
//! Operations (request `{"op":"call","call":OP,"args":{...}}`, answer
//! `{"ok":true,"result":...}` or `{"ok":false,"kind":KIND,"error":...}`):
//! - `link.list` → the links the grant's pattern matches: name, index, MAC, MTU, up;
//! - `link.stats {"link":NAME}` → that link's counters (bytes, packets, errors, drops);
//! - `neigh.list {"link":NAME}` → its ARP/NDP entries (IP, MAC, state);
//! - `dhcp.leases` → the gateway's DHCP leases, read from the board profile's lease file;
//! - `board.fact {"fact":NAME}` → a named fact the board profile maps to a file.
//!
//! Grants (`[host_calls] allow` in the manifest) are `OP` or `OP:PATTERN`, where the pattern
//! (`*` matches any run of characters) names the links (or facts) the operation may reach:
//! `link.stats:wlan*` reaches `wlan0`, not `br-lan`. An operation with no pattern reaches
//! everything it can name.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::json;

/// The operations, as grants and requests name them.
pub const OPERATIONS: &[&str] = &[
    "link.list",
    "link.stats",
    "neigh.list",
    "dhcp.leases",
    "board.fact",
];

/// One grant: an operation and the pattern of what it may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub op: &'static str,
    pub pattern: String,
}

impl Grant {
    /// Parses `OP` or `OP:PATTERN`.
    pub fn parse(s: &str) -> Result<Grant, String> {
        let (op, pattern) = s.split_once(':').unwrap_or((s, "*"));
        let op = OPERATIONS.iter().find(|o| **o == op).ok_or_else(|| {
            format!(
                "{s:?}: unknown host call {op:?} (known: {})",
                OPERATIONS.join(", ")
            )
        })?;
        if pattern.is_empty()
            || pattern.len() > 64
            || !pattern
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.*@".contains(&b))
        {
            return Err(format!(
                "{s:?}: the pattern after `:` must be 1-64 letters, digits, `-_.@` and `*`"
            ));
        }
        Ok(Grant {
            op,
            pattern: pattern.to_string(),
        })
    }
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.op, self.pattern)
    }
}

/// `*` matches any run of characters; everything else itself.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|b| *b == b'*')
}

/// A service's grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants(pub Vec<Grant>);

impl Grants {
    pub fn parse(list: &[String]) -> Result<Grants, String> {
        list.iter()
            .map(|s| Grant::parse(s))
            .collect::<Result<_, _>>()
            .map(Grants)
    }

    /// May the service call `op` on `target`?
    pub fn allows(&self, op: &str, target: &str) -> bool {
        self.0
            .iter()
            .any(|g| g.op == op && glob(&g.pattern, target))
    }

    pub fn has(&self, op: &str) -> bool {
        self.0.iter().any(|g| g.op == op)
    }

    /// The grants the operator's `allowed` patterns (the same `OP:PATTERN` form) do not
    /// cover. A grant is covered when an allowed entry has its operation and its pattern,
    /// read as plain text, matches the allowed pattern: then everything the grant reaches, the
    /// allowed pattern reaches too (`*` is the only wildcard).
    pub fn not_covered_by(&self, allowed: &[Grant]) -> Vec<Grant> {
        self.0
            .iter()
            .filter(|g| {
                !allowed
                    .iter()
                    .any(|a| a.op == g.op && glob(&a.pattern, &g.pattern))
            })
            .cloned()
            .collect()
    }
}

/// A call as the service sends it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "call", content = "args", deny_unknown_fields)]
pub enum Call {
    #[serde(rename = "link.list")]
    LinkList {},
    #[serde(rename = "link.stats")]
    LinkStats { link: String },
    #[serde(rename = "neigh.list")]
    NeighList { link: String },
    #[serde(rename = "dhcp.leases")]
    DhcpLeases {},
    #[serde(rename = "board.fact")]
    BoardFact { fact: String },
}

impl Call {
    pub fn op(&self) -> &'static str {
        match self {
            Call::LinkList {} => "link.list",
            Call::LinkStats { .. } => "link.stats",
            Call::NeighList { .. } => "neigh.list",
            Call::DhcpLeases {} => "dhcp.leases",
            Call::BoardFact { .. } => "board.fact",
        }
    }

    /// What the call reaches (checked against the grant's pattern): the lease file as a
    /// whole is `*`; `link.list` names nothing (it answers only what the pattern matches).
    pub fn target(&self) -> Option<&str> {
        match self {
            Call::LinkStats { link } | Call::NeighList { link } => Some(link),
            Call::BoardFact { fact } => Some(fact),
            Call::DhcpLeases {} => Some("*"),
            Call::LinkList {} => None,
        }
    }
}

/// Why a call was refused or failed; scripts and SDKs branch on the kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallError {
    pub kind: &'static str,
    pub error: String,
}

impl CallError {
    fn new(kind: &'static str, error: impl Into<String>) -> CallError {
        CallError {
            kind,
            error: error.into(),
        }
    }
}

/// Where the board keeps what host calls read (from its profile).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sources {
    /// The DHCP server's lease file (dnsmasq's format).
    pub dhcp_leases: Option<PathBuf>,
    /// Named facts and the file each is read from.
    pub facts: BTreeMap<String, PathBuf>,
}

/// A Linux interface name: 1-15 bytes, no `/`, no whitespace, not `.` or `..`.
fn valid_link(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// Runs `call` for a service with `grants`: refused unless granted; the result as JSON.
pub fn execute(
    call: &Call,
    grants: &Grants,
    sources: &Sources,
) -> Result<serde_json::Value, CallError> {
    let op = call.op();
    if !grants.has(op) {
        return Err(CallError::new(
            "not-granted",
            format!("host call {op} is not granted to this service"),
        ));
    }
    match call {
        Call::LinkStats { link } | Call::NeighList { link } if !valid_link(link) => {
            return Err(CallError::new(
                "invalid",
                format!("{link:?} is not a link name"),
            ))
        }
        _ => {}
    }
    if let Some(target) = call.target().filter(|t| !grants.allows(op, t)) {
        return Err(CallError::new(
            "not-granted",
            format!("host call {op} is not granted for {target:?}"),
        ));
    }
    let failed = |e: std::io::Error| CallError::new("failed", e.to_string());
    match call {
        Call::LinkList {} => {
            let links = gatevisor_board::links::links().map_err(failed)?;
            let visible: Vec<_> = links
                .into_iter()
                .filter(|l| grants.allows(op, &l.name))
                .map(|l| json!({"name": l.name, "index": l.index, "mac": l.mac, "mtu": l.mtu, "up": l.up, "lower_up": l.lower_up}))
                .collect();
            Ok(json!(visible))
        }
        Call::LinkStats { link } => {
            let links = gatevisor_board::links::links().map_err(failed)?;
            let l = links
                .into_iter()
                .find(|l| l.name == *link)
                .ok_or_else(|| CallError::new("not-found", format!("no link {link:?}")))?;
            Ok(json!({"link": l.name, "stats": l.stats}))
        }
        Call::NeighList { link } => {
            let all = gatevisor_board::links::neighbours().map_err(failed)?;
            let mine: Vec<_> = all.into_iter().filter(|n| n.link == *link).collect();
            Ok(json!(mine))
        }
        Call::DhcpLeases {} => {
            let path = sources.dhcp_leases.as_ref().ok_or_else(|| {
                CallError::new(
                    "unsupported",
                    "this board's profile names no DHCP lease file",
                )
            })?;
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(failed(e)),
            };
            Ok(json!(parse_leases(&text)))
        }
        Call::BoardFact { fact } => {
            let path = sources.facts.get(fact).ok_or_else(|| {
                CallError::new("not-found", format!("this board has no fact {fact:?}"))
            })?;
            let mut text = String::new();
            use std::io::Read;
            std::fs::File::open(path)
                .and_then(|f| f.take(4096).read_to_string(&mut text))
                .map_err(failed)?;
            Ok(json!({"fact": fact, "value": text.trim_end()}))
        }
    }
}

/// A DHCP lease (dnsmasq's lease file: `EXPIRY MAC IP HOSTNAME CLIENT-ID` per line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lease {
    pub expires: u64,
    pub mac: String,
    pub ip: String,
    pub hostname: Option<String>,
}

pub fn parse_leases(text: &str) -> Vec<Lease> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (expires, mac, ip) = (f.first()?.parse().ok()?, f.get(1)?, f.get(2)?);
            ip.parse::<std::net::IpAddr>().ok()?;
            Some(Lease {
                expires,
                mac: mac.to_string(),
                ip: ip.to_string(),
                hostname: f.get(3).filter(|h| **h != "*").map(|h| h.to_string()),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_parse_and_reach_only_what_their_pattern_names() {
        let g = Grants::parse(&[
            "link.stats:wlan*".into(),
            "link.list:wlan*".into(),
            "dhcp.leases".into(),
        ])
        .unwrap();
        assert!(g.allows("link.stats", "wlan0"));
        assert!(!g.allows("link.stats", "br-lan"));
        assert!(!g.allows("neigh.list", "wlan0"));
        assert!(g.allows("dhcp.leases", "*"));
        for bad in [
            "exec",
            "link.stats:",
            "link.stats:../x",
            "link.stats:a b",
            "board.fact:/etc/shadow",
        ] {
            assert!(Grant::parse(bad).is_err(), "{bad}");
        }
        assert!(glob("gv-*", "gv-dns"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
        assert!(!glob("wlan*", "br-lan"));
    }

    #[test]
    fn the_operators_policy_covers_a_grant_only_when_it_reaches_at_least_as_far() {
        let allowed: Vec<Grant> = ["link.stats:wlan*", "dhcp.leases"]
            .iter()
            .map(|s| Grant::parse(s).unwrap())
            .collect();
        let asks = |s: &[&str]| {
            Grants::parse(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>()).unwrap()
        };
        assert!(
            asks(&["link.stats:wlan0", "link.stats:wlan*", "dhcp.leases"])
                .not_covered_by(&allowed)
                .is_empty()
        );
        let refused = asks(&["link.stats:*", "link.stats:br-lan", "neigh.list:wlan0"])
            .not_covered_by(&allowed);
        let names: Vec<String> = refused.iter().map(|g| g.to_string()).collect();
        assert_eq!(
            names,
            ["link.stats:*", "link.stats:br-lan", "neigh.list:wlan0"]
        );
    }

    #[test]
    fn calls_decode_strictly_and_are_refused_without_a_grant() {
        let c: Call =
            serde_json::from_str(r#"{"call":"link.stats","args":{"link":"lo"}}"#).unwrap();
        assert_eq!(c, Call::LinkStats { link: "lo".into() });
        for bad in [
            r#"{"call":"exec","args":{"cmd":"sh"}}"#,
            r#"{"call":"link.stats","args":{"link":"lo","path":"/etc"}}"#,
            r#"{"call":"link.stats","args":{}}"#,
            r#"{"call":"link.stats"}"#,
        ] {
            assert!(serde_json::from_str::<Call>(bad).is_err(), "{bad}");
        }
        let none = Grants::default();
        let e = execute(&c, &none, &Sources::default()).unwrap_err();
        assert_eq!(e.kind, "not-granted");
        let wlan = Grants::parse(&["link.stats:wlan*".into()]).unwrap();
        assert_eq!(
            execute(&c, &wlan, &Sources::default()).unwrap_err().kind,
            "not-granted"
        );
        let bad = Call::LinkStats {
            link: "../../etc".into(),
        };
        let all = Grants::parse(&["link.stats".into()]).unwrap();
        assert_eq!(
            execute(&bad, &all, &Sources::default()).unwrap_err().kind,
            "invalid"
        );
        // Granted: the real loopback counters.
        let r = execute(
            &c,
            &Grants::parse(&["link.stats:lo".into()]).unwrap(),
            &Sources::default(),
        )
        .unwrap();
        assert!(r["stats"]["rx_packets"].is_u64(), "{r}");
    }

    #[test]
    fn leases_and_facts_come_from_the_board_profile_paths_only() {
        let d = tempfile::tempdir().unwrap();
        let leases = d.path().join("dnsmasq.leases");
        std::fs::write(&leases, "1767225600 02:00:00:00:00:01 192.168.1.50 laptop 01:02\nbad line\n1767225601 02:00:00:00:00:02 fe80::2 * *\n").unwrap();
        let temp = d.path().join("temp");
        std::fs::write(&temp, "42000\n").unwrap();
        let sources = Sources {
            dhcp_leases: Some(leases),
            facts: [("soc_temp_millicelsius".to_string(), temp)].into(),
        };
        let g = Grants::parse(&["dhcp.leases".into(), "board.fact:soc_*".into()]).unwrap();
        let r = execute(&Call::DhcpLeases {}, &g, &sources).unwrap();
        assert_eq!(r.as_array().unwrap().len(), 2, "{r}");
        assert_eq!(r[0]["hostname"], "laptop");
        assert_eq!(r[1]["hostname"], serde_json::Value::Null);
        let f = execute(
            &Call::BoardFact {
                fact: "soc_temp_millicelsius".into(),
            },
            &g,
            &sources,
        )
        .unwrap();
        assert_eq!(f["value"], "42000");
        let e = execute(
            &Call::BoardFact {
                fact: "soc_missing".into(),
            },
            &g,
            &sources,
        )
        .unwrap_err();
        assert_eq!(e.kind, "not-found");
    }
}
