//! DNS decisions: parse the question, pick the profile, build the answer.

pub use gatevisor_service_sdk::{mac_text, parse_mac};
use gatevisor_service_sdk::{Frame, TcpMessages, TcpVerdict};
use serde::Deserialize;
use std::time::Instant;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    /// The devices (LAN MACs) this profile is for.
    #[serde(default)]
    pub macs: Vec<String>,
    /// Names to block: `example.com` blocks it and every name under it (a child cannot step
    /// around it with `www.`); `=example.com` blocks that name only; `*.example.com` is the
    /// same as `example.com`.
    #[serde(default)]
    pub block: Vec<String>,
    /// Answer blocked A queries with this address instead of NXDOMAIN.
    #[serde(default)]
    pub block_address: Option<std::net::Ipv4Addr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// For devices no profile lists.
    pub default: Profile,
    #[serde(default, rename = "profile")]
    pub profiles: Vec<Profile>,
}

impl Config {
    pub fn parse(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        for p in c.profiles.iter().chain([&c.default]) {
            for m in &p.macs {
                parse_mac(m)
                    .ok_or_else(|| format!("profile {}: {m:?} is not a MAC address", p.name))?;
            }
        }
        Ok(c)
    }

    /// The configuration the operator's settings make (`None` when they do not configure
    /// dns-filter: the file does): `DefaultBlock` for every device, and the kids' profile,
    /// `KidsBlock` for the devices in `KidsDevices`, answered with `KidsBlockAddress` (empty:
    /// NXDOMAIN). The supervisor checked each value against the manifest's declaration.
    pub fn from_settings(v: &serde_json::Value) -> Option<Result<Config, String>> {
        let list = |k: &str| gatevisor_service_sdk::setting_list(v, k);
        v.get("DefaultBlock")?;
        let block_address = match v["KidsBlockAddress"].as_str().unwrap_or("") {
            "" => None,
            a => match a.parse() {
                Ok(ip) => Some(ip),
                Err(_) => return Some(Err(format!("KidsBlockAddress {a:?} is not IPv4"))),
            },
        };
        let c = Config {
            default: Profile {
                name: "everyone".into(),
                macs: vec![],
                block: list("DefaultBlock"),
                block_address: None,
            },
            profiles: vec![Profile {
                name: "kids".into(),
                macs: list("KidsDevices"),
                block: list("KidsBlock"),
                block_address,
            }],
        };
        for m in &c.profiles[0].macs {
            if parse_mac(m).is_none() {
                return Some(Err(format!("KidsDevices: {m:?} is not a MAC address")));
            }
        }
        Some(Ok(c))
    }

    pub fn profile_for(&self, mac: [u8; 6]) -> &Profile {
        self.profiles
            .iter()
            .find(|p| p.macs.iter().any(|m| parse_mac(m) == Some(mac)))
            .unwrap_or(&self.default)
    }
}

impl Profile {
    pub fn blocks(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.block.iter().any(|rule| {
            let rule = rule.trim_end_matches('.').to_ascii_lowercase();
            match rule.strip_prefix('=') {
                Some(exact) => name == exact,
                None => {
                    let domain = rule.strip_prefix("*.").unwrap_or(&rule);
                    name == domain || name.ends_with(&format!(".{domain}"))
                }
            }
        })
    }
}

/// The question of a DNS message: name, type, and where the question section ends.
pub struct Question {
    pub name: String,
    pub qtype: u16,
    pub end: usize,
}

/// Parses the first question of `msg` (a query); `None` for anything malformed or unusual
/// (compressed names in a query, no question), which is then simply forwarded.
pub fn question(msg: &[u8]) -> Option<Question> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 || u16::from_be_bytes([msg[4], msg[5]]) == 0 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let n = *msg.get(i)? as usize;
        if n == 0 {
            i += 1;
            break;
        }
        if n & 0xc0 != 0 || labels.len() > 127 {
            return None;
        }
        labels.push(String::from_utf8_lossy(msg.get(i + 1..i + 1 + n)?).into_owned());
        i += 1 + n;
    }
    let qtype = u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]);
    msg.get(i + 2..i + 4)?;
    Some(Question {
        name: labels.join("."),
        qtype,
        end: i + 4,
    })
}

/// The answer to a blocked query: NXDOMAIN, or `addr` for A queries (NODATA for others).
/// Header and question come from the query; an EDNS OPT record that follows the question is
/// answered with one of the same size and flags but without the query's options (its
/// padding, say, which can make a query larger than one packet).
pub fn blocked_answer(query: &[u8], q: &Question, addr: Option<std::net::Ipv4Addr>) -> Vec<u8> {
    let mut out = query[..q.end].to_vec();
    out[2] = 0x80 | (query[2] & 0x79); // QR, keep opcode and RD
    let (rcode, answer) = match addr {
        None => (3u8, None),
        Some(a) if q.qtype == 1 => (0, Some(a)),
        Some(_) => (0, None),
    };
    out[3] = 0x80 | rcode; // RA
    out[4..6].copy_from_slice(&1u16.to_be_bytes()); // one question
    out[6..8].copy_from_slice(&(answer.is_some() as u16).to_be_bytes());
    out[8..10].copy_from_slice(&0u16.to_be_bytes());
    if let Some(a) = answer {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        out.extend_from_slice(&a.octets());
    }
    let additional = u16::from_be_bytes([query[10], query[11]]);
    let opt = query
        .get(q.end..q.end + 9)
        .filter(|r| additional > 0 && r[..3] == [0, 0, 41]);
    out[10..12].copy_from_slice(&(opt.is_some() as u16).to_be_bytes());
    if let Some(opt) = opt {
        out.extend_from_slice(opt);
        out.extend_from_slice(&[0, 0]); // no options
    }
    out
}

pub enum Decision {
    Forward,
    /// The answer frame to send back, and the blocked name.
    Answer(Vec<u8>, String),
    /// Block the session: a blocked lookup over TCP (its name), or a later segment of a
    /// session blocked already (`None`).
    BlockSession(Option<String>),
    /// Drop this frame only (a TCP segment after a gap; its sender sends it again).
    Drop,
}

/// What to do with one steered frame (a whole datagram: fragments are put together first).
/// Queries over TCP are read as a stream by `tcp`, so a query split across segments, or two
/// queries in one, are judged like any other.
pub fn decide(
    config: &Config,
    tcp: &mut TcpMessages,
    frame: &mut Frame,
    mac: [u8; 6],
    now: Instant,
) -> Decision {
    let profile = config.profile_for(mac);
    match (frame.proto(), frame.dst_port()) {
        (Some(17), Some(53)) => {
            let Some(l4) = frame.l4() else {
                return Decision::Forward;
            };
            let query = match frame.udp_payload() {
                Some(p) => p.to_vec(),
                None => return Decision::Forward,
            };
            let Some(q) = question(&query) else {
                return Decision::Forward;
            };
            if !profile.blocks(&q.name) {
                return Decision::Forward;
            }
            let answer = blocked_answer(&query, &q, profile.block_address);
            let mut out = frame.bytes[..l4 + 8].to_vec();
            out.extend_from_slice(&answer);
            let mut f = Frame { bytes: &mut out };
            if f.turn_udp_around().is_none() || f.set_udp_payload_len(answer.len()).is_none() {
                return Decision::Forward;
            }
            Decision::Answer(out, q.name)
        }
        (Some(6), Some(53)) => {
            let mut name = None;
            let v = tcp.segment(frame, now, |msg| match question(msg) {
                Some(q) if profile.blocks(&q.name) => {
                    name = Some(q.name);
                    true
                }
                _ => false,
            });
            match v {
                TcpVerdict::Forward => Decision::Forward,
                TcpVerdict::Block => Decision::BlockSession(name),
                TcpVerdict::Drop => Decision::Drop,
            }
        }
        _ => Decision::Forward,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16, edns: bool) -> Vec<u8> {
        let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, edns as u8];
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        if edns {
            q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]); // OPT, 4096 bytes
        }
        q
    }

    const CONFIG: &str = r#"
[default]
name = "everyone"
block = ["malware.test"]
[[profile]]
name = "kids"
macs = ["02:00:00:00:00:0a"]
block = ["blocked.test", "*.ads.test", "=only.test"]
block_address = "0.0.0.0"
"#;

    #[test]
    fn profiles_follow_the_device_and_wildcards_match_subdomains() {
        let c = Config::parse(CONFIG).unwrap();
        let kid = parse_mac("02:00:00:00:00:0a").unwrap();
        assert_eq!(c.profile_for(kid).name, "kids");
        assert_eq!(c.profile_for([2, 0, 0, 0, 0, 1]).name, "everyone");
        let kids = c.profile_for(kid);
        assert!(kids.blocks("Blocked.Test."));
        assert!(kids.blocks("x.y.ads.test") && kids.blocks("ads.test"));
        assert!(!kids.blocks("badads.test") && !kids.blocks("malware.test"));
        // A domain rule takes its subdomains; an `=` rule only the name itself.
        assert!(kids.blocks("www.blocked.test") && kids.blocks("a.b.Blocked.test"));
        assert!(!kids.blocks("notblocked.test"));
        assert!(kids.blocks("only.test") && !kids.blocks("www.only.test"));
        assert!(Config::parse("[default]\nname=\"d\"\nmacs=[\"zz\"]").is_err());
    }

    #[test]
    fn nxdomain_keeps_id_question_and_edns() {
        let q = query("blocked.test", 1, true);
        let parsed = question(&q).unwrap();
        assert_eq!((parsed.name.as_str(), parsed.qtype), ("blocked.test", 1));
        let a = blocked_answer(&q, &parsed, None);
        assert_eq!(&a[..2], &[0xab, 0xcd]);
        assert_eq!(a[2] & 0x80, 0x80, "QR");
        assert_eq!(a[3] & 0x0f, 3, "NXDOMAIN");
        assert_eq!(
            u16::from_be_bytes([a[10], a[11]]),
            1,
            "the OPT record is kept"
        );
        assert_eq!(&a[a.len() - 11..a.len() - 8], &[0, 0, 41]);
    }

    #[test]
    fn block_address_answers_a_and_nodata_for_aaaa() {
        let q = query("blocked.test", 1, false);
        let a = blocked_answer(&q, &question(&q).unwrap(), Some("0.0.0.0".parse().unwrap()));
        assert_eq!((a[3] & 0x0f, u16::from_be_bytes([a[6], a[7]])), (0, 1));
        assert_eq!(&a[a.len() - 4..], &[0, 0, 0, 0]);
        let q = query("blocked.test", 28, false);
        let a = blocked_answer(&q, &question(&q).unwrap(), Some("0.0.0.0".parse().unwrap()));
        assert_eq!(
            (a[3] & 0x0f, u16::from_be_bytes([a[6], a[7]])),
            (0, 0),
            "NODATA"
        );
    }

    #[test]
    fn malformed_messages_are_not_parsed() {
        assert!(question(&[0; 5]).is_none());
        let mut q = query("a.test", 1, false);
        q[12] = 0xc0; // a compression pointer in a query
        assert!(question(&q).is_none());
        let q = query("a.test", 1, false);
        for cut in 0..q.len() {
            let _ = question(&q[..cut]);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
            ..Default::default()
        })]

        /// Fuzz target: any query a LAN client sends, mutated from real ones (and from
        /// arbitrary bytes), is parsed and answered without a panic, and an answer keeps the
        /// query's id.
        #[test]
        fn any_query_is_parsed_and_answered_without_a_panic(
            seed in 0usize..4,
            flips in proptest::collection::vec((proptest::prelude::any::<u16>(), proptest::prelude::any::<u8>()), 0..6),
            cut in proptest::prelude::any::<u16>(),
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let mut q = match seed {
                0 => query("blocked.test", 1, true),
                1 => query("www.example.test", 28, false),
                2 => query(&"a".repeat(63), 1, false),
                _ => raw,
            };
            for (at, v) in flips {
                if !q.is_empty() {
                    let i = at as usize % q.len();
                    q[i] = v;
                }
            }
            q.truncate(cut as usize % (q.len() + 1));
            if let Some(parsed) = question(&q) {
                let a = blocked_answer(&q, &parsed, Some("0.0.0.0".parse().unwrap()));
                proptest::prop_assert_eq!(&a[..2], &q[..2]);
                let _ = blocked_answer(&q, &parsed, None);
            }
        }
    }
}
