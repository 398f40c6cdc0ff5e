//! Steering policies compiled to OpenFlow.
//!
//! The pipeline (tables):
//! - 0: services' own packets bypass steering; verdict packets coming back from a service go
//!   to table 5; everything else to table 10.
//! - 5: verdicts. A service returns a packet with the VLAN tag it got (VID = the packet's
//!   original in_port) and says what to do in the PCP: 0 forward this packet, 1 allow its
//!   session, 2 block its session, 3 send it back out of the original port (an answer).
//! - 10: before conntrack: `dns` and `match` policies; IP goes through conntrack (zone 1).
//! - 20: after conntrack: sessions with ct_mark 2 (allowed) take the one static fast-path rule,
//!   the only rule a hardware offload needs to carry; ct_mark 3 (blocked) is dropped;
//!   `new-sessions` policies pull new sessions (ct_mark 1 while inspected) to their service.
//!
//! The base pipeline carries [`BASE_COOKIE`] and is never removed: it *is* the fail-open
//! behaviour. Each service's flows carry its own cookie, so removing a service (or replacing
//! its flows with its fail-closed drops) is one atomic bundle.

use crate::ofp::{ct, frag, hdr, port, Action, Field, Flow, Instruction};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};

pub const BASE_COOKIE: u64 = 0x4756_0000_0000_0001;
const SERVICE_COOKIE: u64 = 0x4756_0001_0000_0000;
pub const CT_ZONE: u16 = 1;

pub const MARK_INSPECT: u32 = 1;
pub const MARK_ALLOW: u32 = 2;
pub const MARK_BLOCK: u32 = 3;

pub const TABLE_CLASSIFY: u8 = 0;
pub const TABLE_VERDICT: u8 = 5;
pub const TABLE_PRE_CT: u8 = 10;
pub const TABLE_POST_CT: u8 = 20;

/// The verdict carried in the PCP of a packet a service sends back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Forward = 0,
    Allow = 1,
    Block = 2,
    Reply = 3,
}

/// The cookie of a service's steering flows (`failed = false`) or of the flows in force while
/// it does not serve (its fail-closed drops and its port guard).
pub fn service_cookie(service_id: u32, failed: bool) -> u64 {
    SERVICE_COOKIE | (service_id as u64) << 8 | if failed { 2 } else { 1 }
}

/// The cookie of the session verdicts a service gave over its verdict API (flows with an idle
/// timeout, which the switch expires by itself).
pub fn verdict_cookie(service_id: u32) -> u64 {
    SERVICE_COOKIE | (service_id as u64) << 8 | 3
}

/// Whether `cookie` is one of gatevisor's (the base pipeline's or a service's).
pub fn is_ours(cookie: u64) -> bool {
    cookie == BASE_COOKIE || cookie & 0xffff_ffff_0000_0000 == SERVICE_COOKIE
}

/// The service id a service cookie carries.
pub fn service_of(cookie: u64) -> Option<u32> {
    (cookie != BASE_COOKIE && is_ours(cookie)).then_some(((cookie >> 8) & 0xff_ffff) as u32)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

/// Which sessions a `new-sessions` policy inspects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// `tcp` or `udp`; both when absent.
    #[serde(default)]
    pub protocol: Option<Proto>,
    /// Destination ports; any when empty.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// LAN devices (source MACs); any when empty.
    #[serde(default)]
    pub macs: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatchAction {
    Inline,
    Mirror,
}

/// One steering policy from a manifest's `[network]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Policy {
    /// DNS queries (UDP and TCP port 53) go to the service.
    Dns,
    /// The first packets of each new session matching `selector` go through the service,
    /// which gives a verdict.
    NewSessions {
        #[serde(default = "default_packets")]
        packets: u32,
        #[serde(default)]
        selector: Selector,
    },
    /// A generic selector, inline (through the service) or mirrored (a copy to it).
    Match {
        #[serde(default)]
        protocol: Option<Proto>,
        #[serde(default)]
        dst_port: Option<u16>,
        #[serde(default)]
        dst_ip: Option<IpAddr>,
        #[serde(default)]
        src_mac: Option<String>,
        action: MatchAction,
    },
}

fn default_packets() -> u32 {
    12
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("{0:?} is not a MAC address (expected aa:bb:cc:dd:ee:ff)")]
    BadMac(String),
    #[error("new-sessions packets must be 1 to 128, not {0}")]
    BadPackets(u32),
}

pub fn parse_mac(s: &str) -> Result<[u8; 6], PolicyError> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(PolicyError::BadMac(s.into()));
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        m[i] = u8::from_str_radix(p, 16).map_err(|_| PolicyError::BadMac(s.into()))?;
    }
    Ok(m)
}

impl Policy {
    pub fn validate(&self) -> Result<(), PolicyError> {
        match self {
            Policy::Dns => Ok(()),
            Policy::NewSessions { packets, selector } => {
                // The per-session count is kept in the 128 bits of ct_label.
                if *packets == 0 || *packets > 128 {
                    return Err(PolicyError::BadPackets(*packets));
                }
                selector
                    .macs
                    .iter()
                    .try_for_each(|m| parse_mac(m).map(|_| ()))
            }
            Policy::Match { src_mac, .. } => {
                src_mac.iter().try_for_each(|m| parse_mac(m).map(|_| ()))
            }
        }
    }
}

fn apply(actions: Vec<Action>) -> Vec<Instruction> {
    vec![Instruction::Apply(actions)]
}

/// The IP families steering covers, by EtherType: IPv4 and IPv6.
pub const FAMILIES: [u16; 2] = [ETH_IPV4, ETH_IPV6];
pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;
/// The IPv6 fragment header's number (`nw_proto` of a later IPv6 fragment).
const IPV6_FRAGMENT: u8 = 44;

fn ip() -> Field {
    Field::EthType(ETH_IPV4)
}

fn family(ethertype: u16) -> Field {
    Field::EthType(ethertype)
}

fn ct_state(set: u32, mask: u32) -> Field {
    Field::CtState(set, mask)
}

fn commit_mark(mark: u32) -> Action {
    Action::Ct {
        commit: true,
        zone: CT_ZONE,
        table: None,
        actions: vec![Action::SetField(Field::CtMark(mark, None))],
    }
}

/// Tag with the original in_port as VID and send to the service.
fn to_service(svc_port: u32) -> Vec<Action> {
    vec![
        Action::PushVlan(0x8100),
        Action::SetField(Field::VlanVid(0x1000, None)),
        Action::RegMove {
            n_bits: 12,
            src_ofs: 0,
            dst_ofs: 0,
            src: hdr::NXM_OF_IN_PORT,
            dst: hdr::NXM_OF_VLAN_TCI,
        },
        Action::Output(svc_port),
    ]
}

/// Restore the original in_port from the VID and remove the tag.
fn restore_in_port() -> Vec<Action> {
    vec![
        Action::RegMove {
            n_bits: 12,
            src_ofs: 0,
            dst_ofs: 0,
            src: hdr::NXM_OF_VLAN_TCI,
            dst: hdr::NXM_OF_IN_PORT,
        },
        Action::PopVlan,
    ]
}

fn flow(
    table: u8,
    priority: u16,
    cookie: u64,
    matches: Vec<Field>,
    instructions: Vec<Instruction>,
) -> Flow {
    Flow {
        table,
        priority,
        cookie,
        matches,
        instructions,
        ..Flow::default()
    }
}

/// The base pipeline: forward everything, conntrack IP, keep allowed sessions on the fast path.
/// IPv6 goes through conntrack for TCP and UDP only: ICMPv6 (neighbour discovery, router
/// advertisements) is switched untouched.
pub fn base_flows() -> Vec<Flow> {
    let c = BASE_COOKIE;
    let to_ct = || {
        apply(vec![Action::Ct {
            commit: false,
            zone: CT_ZONE,
            table: Some(TABLE_POST_CT),
            actions: vec![],
        }])
    };
    let mut v = vec![
        flow(
            TABLE_CLASSIFY,
            0,
            c,
            vec![],
            vec![Instruction::GotoTable(TABLE_PRE_CT)],
        ),
        flow(
            TABLE_PRE_CT,
            50,
            c,
            vec![ip(), ct_state(0, ct::TRK)],
            to_ct(),
        ),
        flow(
            TABLE_PRE_CT,
            0,
            c,
            vec![],
            apply(vec![Action::Output(port::NORMAL)]),
        ),
        flow(
            TABLE_POST_CT,
            0,
            c,
            vec![],
            apply(vec![Action::Output(port::NORMAL)]),
        ),
    ];
    for pr in [6u8, 17] {
        v.push(flow(
            TABLE_PRE_CT,
            50,
            c,
            vec![family(ETH_IPV6), Field::IpProto(pr), ct_state(0, ct::TRK)],
            to_ct(),
        ));
    }
    for fam in FAMILIES {
        v.extend([
            flow(
                TABLE_POST_CT,
                200,
                c,
                vec![
                    family(fam),
                    ct_state(ct::TRK | ct::EST, ct::TRK | ct::EST),
                    Field::CtMark(MARK_ALLOW, None),
                ],
                apply(vec![Action::Output(port::NORMAL)]),
            ),
            flow(
                TABLE_POST_CT,
                200,
                c,
                vec![
                    family(fam),
                    ct_state(ct::TRK, ct::TRK),
                    Field::CtMark(MARK_BLOCK, None),
                ],
                vec![],
            ),
            // Sessions no service inspects are accepted onto the fast path at once.
            flow(
                TABLE_POST_CT,
                1,
                c,
                vec![family(fam), ct_state(ct::TRK | ct::NEW, ct::TRK | ct::NEW)],
                apply(vec![commit_mark(MARK_ALLOW), Action::Output(port::NORMAL)]),
            ),
        ]);
    }
    v
}

/// The traffic class a policy selects, as (table, match) pairs, for both IP families.
fn class(policy: &Policy) -> Vec<(u8, Vec<Field>)> {
    let protos = |p: &Option<Proto>| match p {
        Some(Proto::Tcp) => vec![6u8],
        Some(Proto::Udp) => vec![17u8],
        None => vec![6u8, 17u8],
    };
    let dport = |proto: u8, p: u16| {
        if proto == 6 {
            Field::TcpDst(p)
        } else {
            Field::UdpDst(p)
        }
    };
    match policy {
        Policy::Dns => {
            let mut v = Vec::new();
            for fam in FAMILIES {
                for pr in [6u8, 17] {
                    v.push((
                        TABLE_PRE_CT,
                        vec![family(fam), Field::IpProto(pr), dport(pr, 53)],
                    ));
                    // Every fragment too: a later fragment carries no port, and a query
                    // must not pass in pieces. The service reassembles, judges the whole
                    // and returns the pieces of anything that is not DNS.
                    v.push((
                        TABLE_PRE_CT,
                        vec![
                            family(fam),
                            Field::IpProto(pr),
                            Field::IpFrag(frag::ANY, Some(frag::ANY)),
                        ],
                    ));
                }
            }
            // Open vSwitch gives a later IPv6 fragment the fragment header's number as its
            // protocol: the transport is named only in the first piece.
            v.push((
                TABLE_PRE_CT,
                vec![
                    family(ETH_IPV6),
                    Field::IpProto(IPV6_FRAGMENT),
                    Field::IpFrag(frag::ANY, Some(frag::ANY)),
                ],
            ));
            v
        }
        Policy::NewSessions { selector, .. } => {
            let macs: Vec<Option<[u8; 6]>> = if selector.macs.is_empty() {
                vec![None]
            } else {
                selector
                    .macs
                    .iter()
                    .filter_map(|m| parse_mac(m).ok())
                    .map(Some)
                    .collect()
            };
            let ports: Vec<Option<u16>> = if selector.ports.is_empty() {
                vec![None]
            } else {
                selector.ports.iter().copied().map(Some).collect()
            };
            let mut v = Vec::new();
            for fam in FAMILIES {
                for pr in protos(&selector.protocol) {
                    for p in &ports {
                        for m in &macs {
                            let mut f = vec![family(fam), Field::IpProto(pr)];
                            if let Some(p) = p {
                                f.push(dport(pr, *p));
                            }
                            if let Some(m) = m {
                                f.push(Field::EthSrc(*m));
                            }
                            v.push((TABLE_POST_CT, f));
                        }
                    }
                }
            }
            v
        }
        Policy::Match {
            protocol,
            dst_port,
            dst_ip,
            src_mac,
            ..
        } => {
            let prs: Vec<Option<u8>> = match (protocol, dst_port) {
                (None, None) => vec![None],
                _ => protos(protocol).into_iter().map(Some).collect(),
            };
            // An address names its family; without one the selector covers both.
            let fams: Vec<u16> = match dst_ip {
                Some(IpAddr::V4(_)) => vec![ETH_IPV4],
                Some(IpAddr::V6(_)) => vec![ETH_IPV6],
                None => FAMILIES.to_vec(),
            };
            let mut v = Vec::new();
            for fam in fams {
                for pr in &prs {
                    let mut f = vec![family(fam)];
                    if let Some(pr) = pr {
                        f.push(Field::IpProto(*pr));
                        if let Some(p) = dst_port {
                            f.push(dport(*pr, *p));
                        }
                    }
                    match dst_ip {
                        Some(IpAddr::V4(a)) => f.push(Field::Ipv4Dst(u32::from(*a), None)),
                        Some(IpAddr::V6(a)) => f.push(Field::Ipv6Dst(u128::from(*a), None)),
                        None => {}
                    }
                    if let Some(m) = src_mac.as_deref().and_then(|m| parse_mac(m).ok()) {
                        f.push(Field::EthSrc(m));
                    }
                    v.push((TABLE_PRE_CT, f));
                }
            }
            v
        }
    }
}

/// Flows that steer `policies` to the service on OpenFlow port `svc_port`.
/// `fail_open` decides what happens to a session that reached its `new-sessions` packet budget
/// without a verdict: forwarded (open) or dropped (closed). `mac`, the service's own address
/// when known, is the only source its own (untagged) frames may carry: a frame with any other
/// source is dropped before the bridge could learn that address on the service port.
pub fn service_flows(
    service_id: u32,
    svc_port: u32,
    policies: &[Policy],
    fail_open: bool,
    mac: Option<[u8; 6]>,
) -> Vec<Flow> {
    let c = service_cookie(service_id, false);
    let vlan = Field::VlanVid(0x1000, Some(0x1000));
    // A packet the service returns with verdict `pcp` (IP only when the verdict commits to
    // conntrack).
    let verdict = |pcp: Verdict, fam: Option<u16>, actions: Vec<Action>| {
        let mut m = vec![
            Field::InPort(svc_port),
            vlan.clone(),
            Field::VlanPcp(pcp as u8),
        ];
        if let Some(fam) = fam {
            m.push(family(fam));
        }
        flow(TABLE_VERDICT, 100, c, m, apply(actions))
    };
    let mut v = vec![
        // Verdicts come back tagged; the service's own traffic is forwarded untouched.
        flow(
            TABLE_CLASSIFY,
            1000,
            c,
            vec![Field::InPort(svc_port), vlan.clone()],
            vec![Instruction::GotoTable(TABLE_VERDICT)],
        ),
        verdict(
            Verdict::Forward,
            None,
            [restore_in_port(), vec![Action::Output(port::NORMAL)]].concat(),
        ),
        // An answer goes back out of the original port, named by the VID.
        verdict(
            Verdict::Reply,
            None,
            vec![
                Action::RegMove {
                    n_bits: 12,
                    src_ofs: 0,
                    dst_ofs: 0,
                    src: hdr::NXM_OF_VLAN_TCI,
                    dst: hdr::nxm_reg(0),
                },
                Action::PopVlan,
                Action::OutputReg {
                    src: hdr::nxm_reg(0),
                    ofs: 0,
                    n_bits: 16,
                },
            ],
        ),
        flow(TABLE_VERDICT, 0, c, vec![Field::InPort(svc_port)], vec![]),
    ];
    v.extend(own_frames(
        c,
        svc_port,
        mac,
        apply(vec![Action::Output(port::NORMAL)]),
    ));
    // Verdicts that commit to conntrack, per family.
    for fam in FAMILIES {
        v.push(verdict(
            Verdict::Allow,
            Some(fam),
            [
                restore_in_port(),
                vec![commit_mark(MARK_ALLOW), Action::Output(port::NORMAL)],
            ]
            .concat(),
        ));
        v.push(verdict(
            Verdict::Block,
            Some(fam),
            [restore_in_port(), vec![commit_mark(MARK_BLOCK)]].concat(),
        ));
    }
    for p in policies {
        for (table, m) in class(p) {
            match (p, table) {
                (Policy::NewSessions { packets, .. }, _) => {
                    // The session's packet count lives in conntrack, in ct_label[0..7]. One rule
                    // per count value matches it exactly and commits the next value, so every
                    // datapath flow cached from these rules is keyed on the count (a `move` that
                    // shifted the label was frozen into a constant by the datapath cache). Once
                    // N packets went to the service without a verdict, the next one follows the
                    // failure mode.
                    let n = (*packets).clamp(1, 128) as u64;
                    let count = |k: u64| Action::Load {
                        dst: hdr::CT_LABEL,
                        ofs: 0,
                        n_bits: 8,
                        value: k,
                    };
                    let mut new = m.clone();
                    new.push(ct_state(ct::TRK | ct::NEW, ct::TRK | ct::NEW));
                    let first = Action::Ct {
                        commit: true,
                        zone: CT_ZONE,
                        table: None,
                        actions: vec![
                            Action::SetField(Field::CtMark(MARK_INSPECT, None)),
                            count(1),
                        ],
                    };
                    v.push(flow(
                        TABLE_POST_CT,
                        100,
                        c,
                        new,
                        apply([vec![first], to_service(svc_port)].concat()),
                    ));
                    let mut inspected = m;
                    inspected.push(ct_state(ct::TRK | ct::EST, ct::TRK | ct::EST | ct::RPL));
                    inspected.push(Field::CtMark(MARK_INSPECT, None));
                    for k in 1..n {
                        let mut at_k = inspected.clone();
                        at_k.push(Field::CtLabel(k as u128, Some(0xff)));
                        let next = Action::Ct {
                            commit: true,
                            zone: CT_ZONE,
                            table: None,
                            actions: vec![count(k + 1)],
                        };
                        v.push(flow(
                            TABLE_POST_CT,
                            100,
                            c,
                            at_k,
                            apply([vec![next], to_service(svc_port)].concat()),
                        ));
                    }
                    let mut spent = inspected;
                    spent.push(Field::CtLabel(n as u128, Some(0xff)));
                    let after_budget = if fail_open {
                        vec![commit_mark(MARK_ALLOW), Action::Output(port::NORMAL)]
                    } else {
                        vec![commit_mark(MARK_BLOCK)]
                    };
                    v.push(flow(TABLE_POST_CT, 110, c, spent, apply(after_budget)));
                }
                (
                    Policy::Match {
                        action: MatchAction::Mirror,
                        ..
                    },
                    t,
                ) => {
                    let mut acts = to_service(svc_port);
                    acts.push(Action::PopVlan);
                    acts.push(Action::Output(port::NORMAL));
                    v.push(flow(t, 100, c, m, apply(acts)));
                }
                (_, t) => v.push(flow(t, 100, c, m, apply(to_service(svc_port)))),
            }
        }
    }
    v
}

/// One session, as a service names it in a verdict: both ends of one IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, try_from = "SessionText")]
pub struct Session {
    pub proto: Proto,
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionText {
    proto: Proto,
    src: SocketAddr,
    dst: SocketAddr,
}

impl TryFrom<SessionText> for Session {
    type Error = &'static str;
    fn try_from(t: SessionText) -> Result<Session, Self::Error> {
        if t.src.is_ipv4() != t.dst.is_ipv4() {
            return Err("a session's src and dst must be of one IP family");
        }
        Ok(Session {
            proto: t.proto,
            src: t.src,
            dst: t.dst,
        })
    }
}

/// How long a verdict flow lives without traffic; once it committed the verdict to conntrack,
/// the session's packets match the static fast-path (or drop) rule instead.
pub const VERDICT_IDLE_S: u16 = 30;

/// A verdict given over the verdict API: the session's next packet commits `allow` (ct_mark 2,
/// fast path from then on) or `block` (ct_mark 3, dropped) to conntrack. Carries the service's
/// cookie, so it goes with the service. `None` for a session whose ends are of two families
/// (only possible when built in code: deserializing refuses it).
pub fn session_verdict_flow(service_id: u32, s: &Session, allow: bool) -> Option<Flow> {
    let (proto, sport, dport) = match s.proto {
        Proto::Tcp => (6, Field::TcpSrc(s.src.port()), Field::TcpDst(s.dst.port())),
        Proto::Udp => (17, Field::UdpSrc(s.src.port()), Field::UdpDst(s.dst.port())),
    };
    let mut matches = match (s.src.ip(), s.dst.ip()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => vec![
            ip(),
            Field::IpProto(proto),
            Field::Ipv4Src(u32::from(a), None),
            Field::Ipv4Dst(u32::from(b), None),
        ],
        (IpAddr::V6(a), IpAddr::V6(b)) => vec![
            family(ETH_IPV6),
            Field::IpProto(proto),
            Field::Ipv6Src(u128::from(a), None),
            Field::Ipv6Dst(u128::from(b), None),
        ],
        _ => return None,
    };
    matches.extend([sport, dport, ct_state(ct::TRK, ct::TRK)]);
    let actions = if allow {
        vec![commit_mark(MARK_ALLOW), Action::Output(port::NORMAL)]
    } else {
        vec![commit_mark(MARK_BLOCK)]
    };
    Some(Flow {
        table: TABLE_POST_CT,
        priority: 150,
        cookie: verdict_cookie(service_id),
        idle_timeout: VERDICT_IDLE_S,
        matches,
        instructions: apply(actions),
        ..Flow::default()
    })
}

/// The service's own (untagged) frames: with its address known, only that source passes
/// (`then`), any other is dropped; without it, every frame passes.
fn own_frames(
    cookie: u64,
    svc_port: u32,
    mac: Option<[u8; 6]>,
    then: Vec<Instruction>,
) -> Vec<Flow> {
    match mac {
        Some(m) => vec![
            flow(
                TABLE_CLASSIFY,
                900,
                cookie,
                vec![Field::InPort(svc_port), Field::EthSrc(m)],
                then,
            ),
            flow(
                TABLE_CLASSIFY,
                899,
                cookie,
                vec![Field::InPort(svc_port)],
                vec![],
            ),
        ],
        None => vec![flow(
            TABLE_CLASSIFY,
            900,
            cookie,
            vec![Field::InPort(svc_port)],
            then,
        )],
    }
}

/// While a plugged service does not serve, tagged frames from its port are dropped: a frame it
/// returns then (a verdict for flows that are gone) must not reach the bridge's normal
/// switching, which would learn the frame's source (a LAN or WAN host) on the service port.
/// With its address known (`mac`), its own frames must carry it, as while it serves; they go
/// through the pipeline like any host's.
pub fn port_guard_flows(service_id: u32, svc_port: u32, mac: Option<[u8; 6]>) -> Vec<Flow> {
    let c = service_cookie(service_id, true);
    let mut v = vec![flow(
        TABLE_CLASSIFY,
        1000,
        c,
        vec![
            Field::InPort(svc_port),
            Field::VlanVid(0x1000, Some(0x1000)),
        ],
        vec![],
    )];
    if mac.is_some() {
        v.extend(own_frames(
            c,
            svc_port,
            mac,
            vec![Instruction::GotoTable(TABLE_PRE_CT)],
        ));
    }
    v
}

/// Flows that drop a failed service's class (fail-closed). Mirrors never drop.
pub fn failed_closed_flows(service_id: u32, policies: &[Policy]) -> Vec<Flow> {
    let c = service_cookie(service_id, true);
    policies
        .iter()
        .filter(|p| {
            !matches!(
                p,
                Policy::Match {
                    action: MatchAction::Mirror,
                    ..
                }
            )
        })
        .flat_map(|p| {
            class(p).into_iter().map(move |(table, m)| match p {
                // New sessions of the class are refused; established ones were decided already.
                Policy::NewSessions { .. } => {
                    let mut m = m;
                    m.push(ct_state(ct::TRK | ct::NEW, ct::TRK | ct::NEW));
                    flow(TABLE_POST_CT, 100, c, m, vec![])
                }
                _ => flow(table, 100, c, m, vec![]),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_separate_services_and_their_failure_flows() {
        assert_ne!(service_cookie(1, false), service_cookie(2, false));
        assert_ne!(service_cookie(1, false), service_cookie(1, true));
        assert_ne!(service_cookie(1, false), BASE_COOKIE);
        assert_ne!(verdict_cookie(1), service_cookie(1, false));
        for c in [
            service_cookie(77, false),
            service_cookie(77, true),
            verdict_cookie(77),
        ] {
            assert!(is_ours(c));
            assert_eq!(service_of(c), Some(77));
        }
        assert!(is_ours(BASE_COOKIE) && service_of(BASE_COOKIE).is_none());
        assert!(!is_ours(0x77));
    }

    #[test]
    fn dns_policy_steers_udp_and_tcp_port_53_and_fragments_of_both_families_before_conntrack() {
        let f = service_flows(7, 3, &[Policy::Dns], true, None);
        let steer: Vec<String> = f
            .iter()
            .filter(|f| f.table == TABLE_PRE_CT)
            .map(|f| f.to_string())
            .collect();
        assert_eq!(steer.len(), 9, "{steer:#?}");
        assert!(steer
            .iter()
            .any(|s| s.contains("dl_type=0x86dd,nw_proto=44,nw_frag=yes")));
        for fam in ["dl_type=0x0800", "dl_type=0x86dd"] {
            for pr in ["nw_proto=17", "nw_proto=6"] {
                assert!(steer.iter().any(
                    |s| s.contains(&format!("{fam},{pr},tp_dst=53")) && s.ends_with("output:3")
                ));
                assert!(steer
                    .iter()
                    .any(|s| s.contains(&format!("{fam},{pr},nw_frag=yes"))));
            }
        }
        assert!(f.iter().all(|f| f.cookie == service_cookie(7, false)));
        // Fail-closed drops the same class.
        assert_eq!(failed_closed_flows(7, &[Policy::Dns]).len(), 9);
    }

    #[test]
    fn a_known_service_address_is_the_only_source_its_own_frames_may_carry() {
        let mac = [2, 0x47, 0x56, 1, 2, 3];
        for flows in [
            service_flows(5, 8, &[Policy::Dns], true, Some(mac)),
            port_guard_flows(5, 8, Some(mac)),
        ] {
            let untagged: Vec<&Flow> = flows
                .iter()
                .filter(|f| {
                    f.table == TABLE_CLASSIFY
                        && f.matches.contains(&Field::InPort(8))
                        && !f.matches.iter().any(|m| matches!(m, Field::VlanVid(..)))
                })
                .collect();
            assert_eq!(untagged.len(), 2);
            let pass = untagged.iter().find(|f| f.priority == 900).unwrap();
            assert!(pass.matches.contains(&Field::EthSrc(mac)) && !pass.instructions.is_empty());
            let drop = untagged.iter().find(|f| f.priority == 899).unwrap();
            assert!(drop.instructions.is_empty(), "any other source is dropped");
        }
        // Unknown: every frame passes, as before.
        let f = service_flows(5, 8, &[Policy::Dns], true, None);
        assert!(f
            .iter()
            .any(|f| f.priority == 900 && f.matches == [Field::InPort(8)]));
        assert_eq!(port_guard_flows(5, 8, None).len(), 1);
    }

    #[test]
    fn icmpv6_is_never_conntracked_and_both_families_keep_the_fast_path() {
        let base: Vec<String> = base_flows().iter().map(|f| f.to_string()).collect();
        let to_ct: Vec<&String> = base.iter().filter(|s| s.contains("ct(table=")).collect();
        assert_eq!(to_ct.len(), 3, "{base:#?}");
        assert!(to_ct.iter().all(|s| !s.contains("nw_proto=58")));
        assert!(to_ct
            .iter()
            .filter(|s| s.contains("0x86dd"))
            .all(|s| s.contains("nw_proto=6") || s.contains("nw_proto=17")));
        let post: Vec<String> = base_flows()
            .iter()
            .filter(|f| f.table == TABLE_POST_CT)
            .map(|f| f.to_string())
            .collect();
        for fam in ["0x0800", "0x86dd"] {
            assert_eq!(
                post.iter().filter(|s| s.contains(fam)).count(),
                3,
                "allowed, blocked and new sessions of {fam}"
            );
        }
    }

    #[test]
    fn session_verdicts_take_either_family_but_not_both() {
        let v6: Session =
            serde_json::from_str(r#"{"proto":"tcp","src":"[fd00::2]:4000","dst":"[fd00::1]:443"}"#)
                .unwrap();
        let f = session_verdict_flow(3, &v6, false).unwrap().to_string();
        assert!(
            f.contains("ipv6_src=fd00::2") && f.contains("ipv6_dst=fd00::1"),
            "{f}"
        );
        let mixed = serde_json::from_str::<Session>(
            r#"{"proto":"tcp","src":"10.0.0.2:4000","dst":"[fd00::1]:443"}"#,
        );
        assert!(mixed.unwrap_err().to_string().contains("one IP family"));
    }

    #[test]
    fn new_sessions_selector_expands_to_protocol_port_mac_product() {
        let p = Policy::NewSessions {
            packets: 12,
            selector: Selector {
                protocol: Some(Proto::Tcp),
                ports: vec![80, 443],
                macs: vec!["02:00:00:00:00:01".into()],
            },
        };
        let f = service_flows(1, 4, std::slice::from_ref(&p), true, None);
        let post: Vec<_> = f.iter().filter(|f| f.table == TABLE_POST_CT).collect();
        assert_eq!(
            post.len(),
            2 * 2 * (1 + 11 + 1),
            "2 families x 2 ports x (new, 11 counts, budget spent)"
        );
        assert!(post
            .iter()
            .all(|f| f.matches.contains(&Field::EthSrc([2, 0, 0, 0, 0, 1]))));
        let closed = failed_closed_flows(1, &[p]);
        assert_eq!(closed.len(), 4);
        assert!(closed
            .iter()
            .all(|f| f.instructions.is_empty() && f.cookie == service_cookie(1, true)));
    }

    #[test]
    fn mirror_never_drops_when_the_service_fails() {
        let p = Policy::Match {
            protocol: None,
            dst_port: None,
            dst_ip: Some("10.0.0.1".parse().unwrap()),
            src_mac: None,
            action: MatchAction::Mirror,
        };
        assert!(failed_closed_flows(1, &[p]).is_empty());
    }

    #[test]
    fn policies_parse_from_toml_and_bad_values_are_named() {
        #[derive(Deserialize)]
        struct N {
            steering: Vec<Policy>,
        }
        let n: N = toml::from_str(
            "[[steering]]\nkind = \"dns\"\n[[steering]]\nkind = \"new-sessions\"\nselector = { protocol = \"tcp\", ports = [80] }\n",
        )
        .unwrap();
        assert_eq!(n.steering[0], Policy::Dns);
        assert!(matches!(
            n.steering[1],
            Policy::NewSessions { packets: 12, .. }
        ));
        let bad = Policy::NewSessions {
            packets: 0,
            selector: Selector::default(),
        };
        assert_eq!(bad.validate(), Err(PolicyError::BadPackets(0)));
        assert!(parse_mac("zz:00:00:00:00:00").is_err());
    }
}
