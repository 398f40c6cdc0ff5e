//! OpenFlow 1.3 wire format: the messages, match fields (OXM, with Nicira's NXM fields for
//! conntrack and registers) and actions (with Nicira's `ct`, `move` and `output:reg`) that
//! steering needs, plus ONF bundles (EXT-230) for atomic commits.
//!
//! Encoding is exact; decoding is defensive: everything read from the switch is bounds-checked
//! and unknown fields or actions are kept as raw bytes rather than rejected.

use std::fmt;

pub const OFP_VERSION: u8 = 0x04;
pub const NX_VENDOR_ID: u32 = 0x0000_2320;
pub const ONF_VENDOR_ID: u32 = 0x4F4E_4600;

pub mod msg_type {
    pub const HELLO: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const ECHO_REQUEST: u8 = 2;
    pub const ECHO_REPLY: u8 = 3;
    pub const EXPERIMENTER: u8 = 4;
    pub const FEATURES_REQUEST: u8 = 5;
    pub const FEATURES_REPLY: u8 = 6;
    pub const PACKET_IN: u8 = 10;
    pub const FLOW_MOD: u8 = 14;
    pub const MULTIPART_REQUEST: u8 = 18;
    pub const MULTIPART_REPLY: u8 = 19;
    pub const BARRIER_REQUEST: u8 = 20;
    pub const BARRIER_REPLY: u8 = 21;
}

pub mod port {
    pub const IN_PORT: u32 = 0xffff_fff8;
    pub const NORMAL: u32 = 0xffff_fffa;
    pub const CONTROLLER: u32 = 0xffff_fffd;
    pub const LOCAL: u32 = 0xffff_fffe;
    pub const ANY: u32 = 0xffff_ffff;
}

/// `nw_frag` bits, as Open vSwitch defines them.
pub mod frag {
    /// Any fragment (the first or a later one).
    pub const ANY: u8 = 0x01;
    /// A fragment other than the first (it carries no transport header).
    pub const LATER: u8 = 0x02;

    /// As `ovs-ofctl` spells a `nw_frag` match.
    pub fn text(v: u8, m: Option<u8>) -> &'static str {
        match (v & m.unwrap_or(3), m.unwrap_or(3)) {
            (0, 1) => "no",
            (1, 1) => "yes",
            (1, 3) => "first",
            (3, 3) => "later",
            (0, 2) | (0, 3) => "not_later",
            _ => "other",
        }
    }
}

/// Conntrack state bits (`ct_state`).
pub mod ct {
    pub const NEW: u32 = 0x01;
    pub const EST: u32 = 0x02;
    pub const REL: u32 = 0x04;
    pub const RPL: u32 = 0x08;
    pub const INV: u32 = 0x10;
    pub const TRK: u32 = 0x20;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message truncated: needed {need} bytes at offset {at}, have {have}")]
    Short { need: usize, at: usize, have: usize },
    #[error("bad length field {len} at offset {at}")]
    BadLength { len: usize, at: usize },
}

/// A bounds-checked reader over a byte slice.
pub struct Rd<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Rd<'a> {
    pub fn new(b: &'a [u8]) -> Rd<'a> {
        Rd { b, pos: 0 }
    }
    pub fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Short {
                need: n,
                at: self.pos,
                have: self.remaining(),
            });
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8")))
    }
}

fn pad8(v: &mut Vec<u8>, from: usize) {
    while !(v.len() - from).is_multiple_of(8) {
        v.push(0);
    }
}

// ------------------------------------------------------------------ match fields

/// OXM class + field + length as one 32-bit header (without the has-mask bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OxmHeader {
    pub class: u16,
    pub field: u8,
    pub len: u8,
}

impl OxmHeader {
    pub const fn new(class: u16, field: u8, len: u8) -> OxmHeader {
        OxmHeader { class, field, len }
    }
    pub fn raw(self, masked: bool) -> u32 {
        let len = if masked { self.len * 2 } else { self.len };
        (self.class as u32) << 16 | (self.field as u32) << 9 | (masked as u32) << 8 | len as u32
    }
}

const BASIC: u16 = 0x8000;
const NXM0: u16 = 0x0000;
const NXM1: u16 = 0x0001;

pub mod hdr {
    use super::*;
    pub const IN_PORT: OxmHeader = OxmHeader::new(BASIC, 0, 4);
    pub const ETH_DST: OxmHeader = OxmHeader::new(BASIC, 3, 6);
    pub const ETH_SRC: OxmHeader = OxmHeader::new(BASIC, 4, 6);
    pub const ETH_TYPE: OxmHeader = OxmHeader::new(BASIC, 5, 2);
    pub const VLAN_VID: OxmHeader = OxmHeader::new(BASIC, 6, 2);
    pub const VLAN_PCP: OxmHeader = OxmHeader::new(BASIC, 7, 1);
    pub const IP_PROTO: OxmHeader = OxmHeader::new(BASIC, 10, 1);
    pub const IPV4_SRC: OxmHeader = OxmHeader::new(BASIC, 11, 4);
    pub const IPV4_DST: OxmHeader = OxmHeader::new(BASIC, 12, 4);
    pub const TCP_SRC: OxmHeader = OxmHeader::new(BASIC, 13, 2);
    pub const TCP_DST: OxmHeader = OxmHeader::new(BASIC, 14, 2);
    pub const UDP_SRC: OxmHeader = OxmHeader::new(BASIC, 15, 2);
    pub const UDP_DST: OxmHeader = OxmHeader::new(BASIC, 16, 2);
    pub const IPV6_SRC: OxmHeader = OxmHeader::new(BASIC, 26, 16);
    pub const IPV6_DST: OxmHeader = OxmHeader::new(BASIC, 27, 16);
    /// Nicira `nw_frag`: bit 0 any fragment, bit 1 a later (not the first) fragment.
    pub const IP_FRAG: OxmHeader = OxmHeader::new(NXM1, 26, 1);
    /// Nicira (NXM) headers used by `move` and `output:reg`.
    pub const NXM_OF_IN_PORT: OxmHeader = OxmHeader::new(NXM0, 0, 2);
    pub const NXM_OF_VLAN_TCI: OxmHeader = OxmHeader::new(NXM0, 4, 2);
    pub const fn nxm_reg(n: u8) -> OxmHeader {
        OxmHeader::new(NXM1, n, 4)
    }
    pub const CT_STATE: OxmHeader = OxmHeader::new(NXM1, 105, 4);
    pub const CT_ZONE: OxmHeader = OxmHeader::new(NXM1, 106, 2);
    pub const CT_MARK: OxmHeader = OxmHeader::new(NXM1, 107, 4);
    pub const CT_LABEL: OxmHeader = OxmHeader::new(NXM1, 108, 16);
}

/// One match field (or the target of a `set_field`), with an optional mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    InPort(u32),
    EthSrc([u8; 6]),
    EthDst([u8; 6]),
    EthType(u16),
    /// `vlan_vid` including the OFPVID_PRESENT bit (0x1000).
    VlanVid(u16, Option<u16>),
    VlanPcp(u8),
    IpProto(u8),
    Ipv4Src(u32, Option<u32>),
    Ipv4Dst(u32, Option<u32>),
    TcpSrc(u16),
    TcpDst(u16),
    UdpSrc(u16),
    UdpDst(u16),
    Ipv6Src(u128, Option<u128>),
    Ipv6Dst(u128, Option<u128>),
    /// `nw_frag` value and mask ([`frag`] bits).
    IpFrag(u8, Option<u8>),
    CtState(u32, u32),
    CtZone(u16),
    CtMark(u32, Option<u32>),
    CtLabel(u128, Option<u128>),
    Reg(u8, u32, Option<u32>),
    Unknown(u32, Vec<u8>),
}

impl Field {
    fn header(&self) -> (OxmHeader, Vec<u8>, Option<Vec<u8>>) {
        use Field::*;
        let m32 = |m: &Option<u32>| m.map(|m| m.to_be_bytes().to_vec());
        let m128 = |m: &Option<u128>| m.map(|m| m.to_be_bytes().to_vec());
        match self {
            InPort(p) => (hdr::IN_PORT, p.to_be_bytes().to_vec(), None),
            EthSrc(a) => (hdr::ETH_SRC, a.to_vec(), None),
            EthDst(a) => (hdr::ETH_DST, a.to_vec(), None),
            EthType(t) => (hdr::ETH_TYPE, t.to_be_bytes().to_vec(), None),
            VlanVid(v, m) => (
                hdr::VLAN_VID,
                v.to_be_bytes().to_vec(),
                m.map(|m| m.to_be_bytes().to_vec()),
            ),
            VlanPcp(p) => (hdr::VLAN_PCP, vec![*p], None),
            IpProto(p) => (hdr::IP_PROTO, vec![*p], None),
            Ipv4Src(a, m) => (hdr::IPV4_SRC, a.to_be_bytes().to_vec(), m32(m)),
            Ipv4Dst(a, m) => (hdr::IPV4_DST, a.to_be_bytes().to_vec(), m32(m)),
            TcpSrc(p) => (hdr::TCP_SRC, p.to_be_bytes().to_vec(), None),
            TcpDst(p) => (hdr::TCP_DST, p.to_be_bytes().to_vec(), None),
            UdpSrc(p) => (hdr::UDP_SRC, p.to_be_bytes().to_vec(), None),
            UdpDst(p) => (hdr::UDP_DST, p.to_be_bytes().to_vec(), None),
            Ipv6Src(a, m) => (hdr::IPV6_SRC, a.to_be_bytes().to_vec(), m128(m)),
            Ipv6Dst(a, m) => (hdr::IPV6_DST, a.to_be_bytes().to_vec(), m128(m)),
            IpFrag(v, m) => (hdr::IP_FRAG, vec![*v], m.map(|m| vec![m])),
            CtState(v, m) => (
                hdr::CT_STATE,
                v.to_be_bytes().to_vec(),
                Some(m.to_be_bytes().to_vec()),
            ),
            CtZone(z) => (hdr::CT_ZONE, z.to_be_bytes().to_vec(), None),
            CtMark(v, m) => (hdr::CT_MARK, v.to_be_bytes().to_vec(), m32(m)),
            CtLabel(v, m) => (
                hdr::CT_LABEL,
                v.to_be_bytes().to_vec(),
                m.map(|m| m.to_be_bytes().to_vec()),
            ),
            Reg(n, v, m) => (hdr::nxm_reg(*n), v.to_be_bytes().to_vec(), m32(m)),
            Unknown(h, _) => (
                OxmHeader::new((h >> 16) as u16, ((h >> 9) & 0x7f) as u8, (h & 0xff) as u8),
                vec![],
                None,
            ),
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        if let Field::Unknown(h, body) = self {
            out.extend_from_slice(&h.to_be_bytes());
            out.extend_from_slice(body);
            return;
        }
        let (h, value, mask) = self.header();
        out.extend_from_slice(&h.raw(mask.is_some()).to_be_bytes());
        out.extend_from_slice(&value);
        if let Some(m) = mask {
            out.extend_from_slice(&m);
        }
    }

    pub fn decode(r: &mut Rd) -> Result<Field, DecodeError> {
        let raw = r.u32()?;
        let len = (raw & 0xff) as usize;
        let masked = raw & 0x100 != 0;
        let body = r.take(len)?;
        let class = (raw >> 16) as u16;
        let field = ((raw >> 9) & 0x7f) as u8;
        let vlen = if masked { len / 2 } else { len };
        let v = &body[..vlen];
        let m = masked.then(|| &body[vlen..]);
        let be16 = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
        let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let be128 = |b: &[u8]| u128::from_be_bytes(b.try_into().expect("16"));
        let unknown = || Field::Unknown(raw, body.to_vec());
        let f = match (class, field, vlen) {
            (BASIC, 0, 4) => Field::InPort(be32(v)),
            (BASIC, 3, 6) => Field::EthDst(v.try_into().expect("6")),
            (BASIC, 4, 6) => Field::EthSrc(v.try_into().expect("6")),
            (BASIC, 5, 2) => Field::EthType(be16(v)),
            (BASIC, 6, 2) => Field::VlanVid(be16(v), m.map(be16)),
            (BASIC, 7, 1) => Field::VlanPcp(v[0]),
            (BASIC, 10, 1) => Field::IpProto(v[0]),
            (BASIC, 11, 4) => Field::Ipv4Src(be32(v), m.map(be32)),
            (BASIC, 12, 4) => Field::Ipv4Dst(be32(v), m.map(be32)),
            (BASIC, 13, 2) => Field::TcpSrc(be16(v)),
            (BASIC, 14, 2) => Field::TcpDst(be16(v)),
            (BASIC, 15, 2) => Field::UdpSrc(be16(v)),
            (BASIC, 16, 2) => Field::UdpDst(be16(v)),
            (BASIC, 26, 16) => Field::Ipv6Src(be128(v), m.map(be128)),
            (BASIC, 27, 16) => Field::Ipv6Dst(be128(v), m.map(be128)),
            (NXM1, 26, 1) => Field::IpFrag(v[0], m.map(|m| m[0])),
            (NXM1, 105, 4) => Field::CtState(be32(v), m.map(be32).unwrap_or(u32::MAX)),
            (NXM1, 106, 2) => Field::CtZone(be16(v)),
            (NXM1, 107, 4) => Field::CtMark(be32(v), m.map(be32)),
            (NXM1, 108, 16) => Field::CtLabel(
                u128::from_be_bytes(v.try_into().expect("16")),
                m.map(|m| u128::from_be_bytes(m.try_into().expect("16"))),
            ),
            (NXM1, n, 4) if n < 16 => Field::Reg(n, be32(v), m.map(be32)),
            _ => unknown(),
        };
        Ok(f)
    }
}

/// Encodes an `ofp_match` (OXM type) padded to 8 bytes.
pub fn encode_match(fields: &[Field], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&1u16.to_be_bytes()); // OFPMT_OXM
    out.extend_from_slice(&0u16.to_be_bytes()); // length, patched below
    for f in fields {
        f.encode(out);
    }
    let len = (out.len() - start) as u16;
    out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
    pad8(out, start);
}

pub fn decode_match(r: &mut Rd) -> Result<Vec<Field>, DecodeError> {
    let at = r.pos;
    let _ty = r.u16()?;
    let len = r.u16()? as usize;
    if len < 4 {
        return Err(DecodeError::BadLength { len, at });
    }
    let body = r.take(len - 4)?;
    let padded = len.div_ceil(8) * 8;
    r.take(padded - len)?;
    let mut fr = Rd::new(body);
    let mut fields = Vec::new();
    while fr.remaining() >= 4 {
        fields.push(Field::decode(&mut fr)?);
    }
    Ok(fields)
}

// ------------------------------------------------------------------ actions

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Output(u32),
    PushVlan(u16),
    PopVlan,
    SetField(Field),
    /// Nicira `ct(...)`: `table` recirculates after conntrack; `actions` run on commit.
    Ct {
        commit: bool,
        zone: u16,
        table: Option<u8>,
        actions: Vec<Action>,
    },
    /// Nicira `move:SRC[src_ofs..]->DST[dst_ofs..]` over `n_bits`.
    RegMove {
        n_bits: u16,
        src_ofs: u16,
        dst_ofs: u16,
        src: OxmHeader,
        dst: OxmHeader,
    },
    /// Nicira `output:REG[ofs..ofs+n_bits]`.
    OutputReg {
        src: OxmHeader,
        ofs: u16,
        n_bits: u16,
    },
    /// Nicira `load:VALUE->DST[ofs..ofs+n_bits]`.
    Load {
        dst: OxmHeader,
        ofs: u16,
        n_bits: u16,
        value: u64,
    },
    Unknown(u16, Vec<u8>),
}

impl Action {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let put16 = |o: &mut Vec<u8>, v: u16| o.extend_from_slice(&v.to_be_bytes());
        let put32 = |o: &mut Vec<u8>, v: u32| o.extend_from_slice(&v.to_be_bytes());
        match self {
            Action::Output(p) => {
                put16(out, 0);
                put16(out, 16);
                put32(out, *p);
                put16(out, 0xffff); // max_len: whole packet to the controller
                out.extend_from_slice(&[0; 6]);
            }
            Action::PushVlan(ethertype) => {
                put16(out, 17);
                put16(out, 8);
                put16(out, *ethertype);
                out.extend_from_slice(&[0; 2]);
            }
            Action::PopVlan => {
                put16(out, 18);
                put16(out, 8);
                out.extend_from_slice(&[0; 4]);
            }
            Action::SetField(f) => {
                put16(out, 25);
                put16(out, 0);
                f.encode(out);
                pad8(out, start);
            }
            Action::Ct {
                commit,
                zone,
                table,
                actions,
            } => {
                put16(out, 0xffff);
                put16(out, 0);
                put32(out, NX_VENDOR_ID);
                put16(out, 35); // NXAST_CT
                put16(out, *commit as u16);
                put32(out, 0); // zone_src: immediate
                put16(out, *zone);
                out.push(table.unwrap_or(0xff));
                out.extend_from_slice(&[0; 3]);
                put16(out, 0); // alg
                for a in actions {
                    a.encode(out);
                }
            }
            Action::RegMove {
                n_bits,
                src_ofs,
                dst_ofs,
                src,
                dst,
            } => {
                put16(out, 0xffff);
                put16(out, 0);
                put32(out, NX_VENDOR_ID);
                put16(out, 6); // NXAST_REG_MOVE
                put16(out, *n_bits);
                put16(out, *src_ofs);
                put16(out, *dst_ofs);
                put32(out, src.raw(false));
                put32(out, dst.raw(false));
                pad8(out, start);
            }
            Action::OutputReg { src, ofs, n_bits } => {
                put16(out, 0xffff);
                put16(out, 0);
                put32(out, NX_VENDOR_ID);
                put16(out, 15); // NXAST_OUTPUT_REG
                put16(out, ofs << 6 | (n_bits - 1));
                put32(out, src.raw(false));
                put16(out, 0); // max_len
                out.extend_from_slice(&[0; 6]);
            }
            Action::Load {
                dst,
                ofs,
                n_bits,
                value,
            } => {
                put16(out, 0xffff);
                put16(out, 0);
                put32(out, NX_VENDOR_ID);
                put16(out, 7); // NXAST_REG_LOAD
                put16(out, ofs << 6 | (n_bits - 1));
                put32(out, dst.raw(false));
                out.extend_from_slice(&value.to_be_bytes());
            }
            Action::Unknown(ty, body) => {
                put16(out, *ty);
                put16(out, (body.len() + 4) as u16);
                out.extend_from_slice(body);
            }
        }
        let len = (out.len() - start) as u16;
        out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    pub fn decode_list(b: &[u8]) -> Result<Vec<Action>, DecodeError> {
        let mut r = Rd::new(b);
        let mut v = Vec::new();
        while r.remaining() >= 4 {
            v.push(Action::decode(&mut r)?);
        }
        Ok(v)
    }

    pub fn decode(r: &mut Rd) -> Result<Action, DecodeError> {
        let at = r.pos;
        let ty = r.u16()?;
        let len = r.u16()? as usize;
        if len < 8 || !len.is_multiple_of(8) {
            return Err(DecodeError::BadLength { len, at });
        }
        let body = r.take(len - 4)?;
        let mut b = Rd::new(body);
        let unknown = || Action::Unknown(ty, body.to_vec());
        Ok(match ty {
            0 => Action::Output(b.u32()?),
            17 => Action::PushVlan(b.u16()?),
            18 => Action::PopVlan,
            25 => Action::SetField(Field::decode(&mut b)?),
            0xffff => {
                if b.u32()? != NX_VENDOR_ID {
                    return Ok(unknown());
                }
                match b.u16()? {
                    35 => {
                        let flags = b.u16()?;
                        let _zone_src = b.u32()?;
                        let zone = b.u16()?;
                        let table = b.u8()?;
                        b.take(3)?;
                        let _alg = b.u16()?;
                        let rest = b.take(b.remaining())?;
                        Action::Ct {
                            commit: flags & 1 != 0,
                            zone,
                            table: (table != 0xff).then_some(table),
                            actions: Action::decode_list(rest)?,
                        }
                    }
                    6 => {
                        let n_bits = b.u16()?;
                        let src_ofs = b.u16()?;
                        let dst_ofs = b.u16()?;
                        let h = |raw: u32| {
                            OxmHeader::new(
                                (raw >> 16) as u16,
                                ((raw >> 9) & 0x7f) as u8,
                                (raw & 0xff) as u8,
                            )
                        };
                        let src = h(b.u32()?);
                        let dst = h(b.u32()?);
                        Action::RegMove {
                            n_bits,
                            src_ofs,
                            dst_ofs,
                            src,
                            dst,
                        }
                    }
                    7 => {
                        let ofs_nbits = b.u16()?;
                        let raw = b.u32()?;
                        Action::Load {
                            dst: OxmHeader::new(
                                (raw >> 16) as u16,
                                ((raw >> 9) & 0x7f) as u8,
                                (raw & 0xff) as u8,
                            ),
                            ofs: ofs_nbits >> 6,
                            n_bits: (ofs_nbits & 0x3f) + 1,
                            value: b.u64()?,
                        }
                    }
                    15 => {
                        let ofs_nbits = b.u16()?;
                        let raw = b.u32()?;
                        Action::OutputReg {
                            src: OxmHeader::new(
                                (raw >> 16) as u16,
                                ((raw >> 9) & 0x7f) as u8,
                                (raw & 0xff) as u8,
                            ),
                            ofs: ofs_nbits >> 6,
                            n_bits: (ofs_nbits & 0x3f) + 1,
                        }
                    }
                    _ => unknown(),
                }
            }
            _ => unknown(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    GotoTable(u8),
    Apply(Vec<Action>),
    Unknown(u16, Vec<u8>),
}

impl Instruction {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        match self {
            Instruction::GotoTable(t) => {
                out.extend_from_slice(&1u16.to_be_bytes());
                out.extend_from_slice(&8u16.to_be_bytes());
                out.push(*t);
                out.extend_from_slice(&[0; 3]);
            }
            Instruction::Apply(actions) => {
                out.extend_from_slice(&4u16.to_be_bytes());
                out.extend_from_slice(&0u16.to_be_bytes());
                out.extend_from_slice(&[0; 4]);
                for a in actions {
                    a.encode(out);
                }
            }
            Instruction::Unknown(ty, body) => {
                out.extend_from_slice(&ty.to_be_bytes());
                out.extend_from_slice(&((body.len() + 4) as u16).to_be_bytes());
                out.extend_from_slice(body);
            }
        }
        let len = (out.len() - start) as u16;
        out[start + 2..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    pub fn decode_list(b: &[u8]) -> Result<Vec<Instruction>, DecodeError> {
        let mut r = Rd::new(b);
        let mut v = Vec::new();
        while r.remaining() >= 4 {
            let at = r.pos;
            let ty = r.u16()?;
            let len = r.u16()? as usize;
            if len < 8 {
                return Err(DecodeError::BadLength { len, at });
            }
            let body = r.take(len - 4)?;
            v.push(match ty {
                1 => Instruction::GotoTable(body[0]),
                4 => Instruction::Apply(Action::decode_list(&body[4..])?),
                _ => Instruction::Unknown(ty, body.to_vec()),
            });
        }
        Ok(v)
    }
}

// ------------------------------------------------------------------ flows

/// One flow entry, as installed and as reported back.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Flow {
    pub table: u8,
    pub priority: u16,
    pub cookie: u64,
    pub idle_timeout: u16,
    pub hard_timeout: u16,
    pub matches: Vec<Field>,
    pub instructions: Vec<Instruction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowModCommand {
    Add = 0,
    Modify = 1,
    ModifyStrict = 2,
    Delete = 3,
    DeleteStrict = 4,
}

/// A FLOW_MOD body (without the OpenFlow header).
pub fn flow_mod_body(flow: &Flow, cmd: FlowModCommand, cookie_mask: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(128);
    b.extend_from_slice(&flow.cookie.to_be_bytes());
    b.extend_from_slice(&cookie_mask.to_be_bytes());
    let deleting = matches!(cmd, FlowModCommand::Delete | FlowModCommand::DeleteStrict);
    b.push(flow.table);
    b.push(cmd as u8);
    b.extend_from_slice(&flow.idle_timeout.to_be_bytes());
    b.extend_from_slice(&flow.hard_timeout.to_be_bytes());
    b.extend_from_slice(&flow.priority.to_be_bytes());
    b.extend_from_slice(&0xffff_ffffu32.to_be_bytes()); // buffer_id: none
    b.extend_from_slice(&port::ANY.to_be_bytes()); // out_port
    b.extend_from_slice(&0xffff_ffffu32.to_be_bytes()); // out_group: any
    b.extend_from_slice(&0u16.to_be_bytes()); // flags: no flow-removed messages
    b.extend_from_slice(&[0; 2]);
    encode_match(&flow.matches, &mut b);
    if !deleting {
        for i in &flow.instructions {
            i.encode(&mut b);
        }
    }
    b
}

/// Deletes every flow with `cookie` (all tables).
pub fn delete_by_cookie_body(cookie: u64) -> Vec<u8> {
    let f = Flow {
        table: 0xff,
        cookie,
        ..Flow::default()
    };
    flow_mod_body(&f, FlowModCommand::Delete, u64::MAX)
}

/// One entry of a flow-stats reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowStats {
    pub flow: Flow,
    pub duration_sec: u32,
    pub packet_count: u64,
    pub byte_count: u64,
}

pub fn decode_flow_stats(body: &[u8]) -> Result<Vec<FlowStats>, DecodeError> {
    let mut r = Rd::new(body);
    let mut out = Vec::new();
    while r.remaining() >= 56 {
        let at = r.pos;
        let len = r.u16()? as usize;
        if len < 56 {
            return Err(DecodeError::BadLength { len, at });
        }
        let entry = r.take(len - 2)?;
        let mut e = Rd::new(entry);
        let table = e.u8()?;
        e.u8()?;
        let duration_sec = e.u32()?;
        let _nsec = e.u32()?;
        let priority = e.u16()?;
        let idle_timeout = e.u16()?;
        let hard_timeout = e.u16()?;
        let _flags = e.u16()?;
        e.take(4)?;
        let cookie = e.u64()?;
        let packet_count = e.u64()?;
        let byte_count = e.u64()?;
        let matches = decode_match(&mut e)?;
        let instructions = Instruction::decode_list(e.take(e.remaining())?)?;
        out.push(FlowStats {
            flow: Flow {
                table,
                priority,
                cookie,
                idle_timeout,
                hard_timeout,
                matches,
                instructions,
            },
            duration_sec,
            packet_count,
            byte_count,
        });
    }
    Ok(out)
}

/// Per-port counters from a port-stats reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PortStats {
    pub port_no: u32,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
}

pub fn decode_port_stats(body: &[u8]) -> Result<Vec<PortStats>, DecodeError> {
    let mut r = Rd::new(body);
    let mut out = Vec::new();
    while r.remaining() >= 112 {
        let mut e = Rd::new(r.take(112)?);
        let port_no = e.u32()?;
        e.take(4)?;
        out.push(PortStats {
            port_no,
            rx_packets: e.u64()?,
            tx_packets: e.u64()?,
            rx_bytes: e.u64()?,
            tx_bytes: e.u64()?,
            rx_dropped: e.u64()?,
            tx_dropped: e.u64()?,
        });
    }
    Ok(out)
}

// ------------------------------------------------------------------ text form

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(a: &[u8; 6]) -> String {
    gatevisor_board::links::mac_text(a)
}

fn ip(a: u32) -> String {
    std::net::Ipv4Addr::from(a).to_string()
}

fn port_name(p: u32) -> String {
    match p {
        port::NORMAL => "NORMAL".into(),
        port::IN_PORT => "IN_PORT".into(),
        port::CONTROLLER => "CONTROLLER".into(),
        port::LOCAL => "LOCAL".into(),
        p => p.to_string(),
    }
}

fn hdr_name(h: OxmHeader) -> String {
    match (h.class, h.field) {
        (NXM0, 0) => "NXM_OF_IN_PORT".into(),
        (NXM0, 4) => "NXM_OF_VLAN_TCI".into(),
        (NXM1, n) if n < 16 => format!("NXM_NX_REG{n}"),
        (NXM1, 107) => "NXM_NX_CT_MARK".into(),
        (NXM1, 108) => "NXM_NX_CT_LABEL".into(),
        (c, f) => format!("OXM({c:#x},{f})"),
    }
}

fn ct_state_text(v: u32, m: u32) -> String {
    const NAMES: [(u32, &str); 6] = [
        (ct::NEW, "new"),
        (ct::EST, "est"),
        (ct::REL, "rel"),
        (ct::RPL, "rpl"),
        (ct::INV, "inv"),
        (ct::TRK, "trk"),
    ];
    NAMES
        .iter()
        .filter(|(bit, _)| m & bit != 0)
        .map(|(bit, n)| format!("{}{n}", if v & bit != 0 { '+' } else { '-' }))
        .collect()
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        use Field::*;
        let masked32 = |v: u32, m: &Option<u32>| match m {
            Some(m) => format!("{v:#x}/{m:#x}"),
            None => format!("{v:#x}"),
        };
        match self {
            InPort(p) => write!(f, "in_port={}", port_name(*p)),
            EthSrc(a) => write!(f, "dl_src={}", mac_text(a)),
            EthDst(a) => write!(f, "dl_dst={}", mac_text(a)),
            EthType(t) => write!(f, "dl_type={t:#06x}"),
            VlanVid(v, None) => write!(f, "vlan_vid={v:#x}"),
            VlanVid(v, Some(m)) => write!(f, "vlan_vid={v:#x}/{m:#x}"),
            VlanPcp(p) => write!(f, "dl_vlan_pcp={p}"),
            IpProto(p) => write!(f, "nw_proto={p}"),
            Ipv4Src(a, None) => write!(f, "nw_src={}", ip(*a)),
            Ipv4Src(a, Some(m)) => write!(f, "nw_src={}/{}", ip(*a), ip(*m)),
            Ipv4Dst(a, None) => write!(f, "nw_dst={}", ip(*a)),
            Ipv4Dst(a, Some(m)) => write!(f, "nw_dst={}/{}", ip(*a), ip(*m)),
            TcpSrc(p) | UdpSrc(p) => write!(f, "tp_src={p}"),
            TcpDst(p) | UdpDst(p) => write!(f, "tp_dst={p}"),
            Ipv6Src(a, None) => write!(f, "ipv6_src={}", std::net::Ipv6Addr::from(*a)),
            Ipv6Src(a, Some(m)) => write!(
                f,
                "ipv6_src={}/{}",
                std::net::Ipv6Addr::from(*a),
                std::net::Ipv6Addr::from(*m)
            ),
            Ipv6Dst(a, None) => write!(f, "ipv6_dst={}", std::net::Ipv6Addr::from(*a)),
            Ipv6Dst(a, Some(m)) => write!(
                f,
                "ipv6_dst={}/{}",
                std::net::Ipv6Addr::from(*a),
                std::net::Ipv6Addr::from(*m)
            ),
            IpFrag(v, m) => write!(f, "nw_frag={}", frag::text(*v, *m)),
            CtState(v, m) => write!(f, "ct_state={}", ct_state_text(*v, *m)),
            CtZone(z) => write!(f, "ct_zone={z}"),
            CtMark(v, m) => write!(f, "ct_mark={}", masked32(*v, m)),
            CtLabel(v, None) => write!(f, "ct_label={v:#x}"),
            CtLabel(v, Some(m)) => write!(f, "ct_label={v:#x}/{m:#x}"),
            Reg(n, v, m) => write!(f, "reg{n}={}", masked32(*v, m)),
            Unknown(h, _) => write!(f, "unknown({h:#x})"),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Action::Output(p) if *p >= 0xffff_ff00 => write!(f, "{}", port_name(*p)),
            Action::Output(p) => write!(f, "output:{p}"),
            Action::PushVlan(t) => write!(f, "push_vlan:{t:#06x}"),
            Action::PopVlan => write!(f, "pop_vlan"),
            // As ovs-ofctl prints them: `set_field:VALUE->FIELD`.
            Action::SetField(Field::VlanVid(v, _)) => write!(f, "set_field:{v}->vlan_vid"),
            Action::SetField(Field::CtMark(v, _)) => write!(f, "set_field:{v:#x}->ct_mark"),
            Action::SetField(fl) => {
                let text = fl.to_string();
                match text.split_once('=') {
                    Some((name, value)) => write!(f, "set_field:{value}->{name}"),
                    None => write!(f, "set_field:{text}"),
                }
            }
            Action::Ct {
                commit,
                zone,
                table,
                actions,
            } => {
                let mut parts = Vec::new();
                if *commit {
                    parts.push("commit".to_string());
                }
                if let Some(t) = table {
                    parts.push(format!("table={t}"));
                }
                parts.push(format!("zone={zone}"));
                if !actions.is_empty() {
                    let a: Vec<String> = actions.iter().map(|a| a.to_string()).collect();
                    parts.push(format!("exec({})", a.join(",")));
                }
                write!(f, "ct({})", parts.join(","))
            }
            Action::RegMove {
                n_bits,
                src_ofs,
                dst_ofs,
                src,
                dst,
            } => write!(
                f,
                "move:{}[{}..{}]->{}[{}..{}]",
                hdr_name(*src),
                src_ofs,
                src_ofs + n_bits - 1,
                hdr_name(*dst),
                dst_ofs,
                dst_ofs + n_bits - 1
            ),
            Action::Load {
                dst,
                ofs,
                n_bits: 1,
                value,
            } => {
                write!(f, "load:{value:#x}->{}[{ofs}]", hdr_name(*dst))
            }
            Action::Load {
                dst,
                ofs,
                n_bits,
                value,
            } => write!(
                f,
                "load:{value:#x}->{}[{}..{}]",
                hdr_name(*dst),
                ofs,
                ofs + n_bits - 1
            ),
            Action::OutputReg { src, ofs, n_bits } => {
                write!(
                    f,
                    "output:{}[{}..{}]",
                    hdr_name(*src),
                    ofs,
                    ofs + n_bits - 1
                )
            }
            Action::Unknown(t, _) => write!(f, "unknown_action({t})"),
        }
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "cookie={:#x},table={},priority={}",
            self.cookie, self.table, self.priority
        )?;
        for m in &self.matches {
            write!(f, ",{m}")?;
        }
        let mut acts: Vec<String> = Vec::new();
        for i in &self.instructions {
            match i {
                Instruction::Apply(a) => acts.extend(a.iter().map(|a| a.to_string())),
                Instruction::GotoTable(t) => acts.push(format!("goto_table:{t}")),
                Instruction::Unknown(t, _) => acts.push(format!("instruction({t})")),
            }
        }
        if acts.is_empty() {
            acts.push("drop".into());
        }
        write!(f, " actions={}", acts.join(","))
    }
}

// ------------------------------------------------------------------ messages

/// Frames a message: OpenFlow header + body.
pub fn frame(ty: u8, xid: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + body.len());
    m.push(OFP_VERSION);
    m.push(ty);
    m.extend_from_slice(&((8 + body.len()) as u16).to_be_bytes());
    m.extend_from_slice(&xid.to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// HELLO with a version bitmap that offers OpenFlow 1.3 only.
pub fn hello(xid: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&1u16.to_be_bytes()); // OFPHET_VERSIONBITMAP
    body.extend_from_slice(&8u16.to_be_bytes());
    body.extend_from_slice(&(1u32 << OFP_VERSION).to_be_bytes());
    frame(msg_type::HELLO, xid, &body)
}

/// ONF bundle control (EXT-230): open, commit, discard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleCtrl {
    OpenRequest = 0,
    OpenReply = 1,
    CloseRequest = 2,
    CloseReply = 3,
    CommitRequest = 4,
    CommitReply = 5,
    DiscardRequest = 6,
    DiscardReply = 7,
}

pub const BUNDLE_ATOMIC: u16 = 1;
pub const BUNDLE_ORDERED: u16 = 2;

pub fn bundle_ctrl(xid: u32, bundle_id: u32, ctrl: BundleCtrl, flags: u16) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&ONF_VENDOR_ID.to_be_bytes());
    b.extend_from_slice(&2300u32.to_be_bytes());
    b.extend_from_slice(&bundle_id.to_be_bytes());
    b.extend_from_slice(&(ctrl as u16).to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    frame(msg_type::EXPERIMENTER, xid, &b)
}

/// Wraps an OpenFlow message (whose xid must equal `xid`) into a bundle.
pub fn bundle_add(xid: u32, bundle_id: u32, flags: u16, inner: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + inner.len());
    b.extend_from_slice(&ONF_VENDOR_ID.to_be_bytes());
    b.extend_from_slice(&2301u32.to_be_bytes());
    b.extend_from_slice(&bundle_id.to_be_bytes());
    b.extend_from_slice(&[0; 2]);
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(inner);
    frame(msg_type::EXPERIMENTER, xid, &b)
}

/// A multipart request of `mp_type` with `body`.
pub fn multipart_request(xid: u32, mp_type: u16, body: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + body.len());
    b.extend_from_slice(&mp_type.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(body);
    frame(msg_type::MULTIPART_REQUEST, xid, &b)
}

/// Body of a flow-stats request for all tables, filtered by cookie.
pub fn flow_stats_request_body(cookie: u64, cookie_mask: u64) -> Vec<u8> {
    let mut b = Vec::new();
    b.push(0xff); // all tables
    b.extend_from_slice(&[0; 3]);
    b.extend_from_slice(&port::ANY.to_be_bytes());
    b.extend_from_slice(&0xffff_ffffu32.to_be_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&cookie_mask.to_be_bytes());
    encode_match(&[], &mut b);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip_field(f: Field) {
        let mut b = Vec::new();
        f.encode(&mut b);
        let back = Field::decode(&mut Rd::new(&b)).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn match_fields_round_trip() {
        for f in [
            Field::InPort(3),
            Field::EthSrc([2, 0, 0, 0, 0, 1]),
            Field::EthType(0x0800),
            Field::VlanVid(0x1000, Some(0x1000)),
            Field::VlanPcp(2),
            Field::IpProto(17),
            Field::Ipv4Dst(0x0a00_0001, Some(0xffff_ff00)),
            Field::UdpDst(53),
            Field::TcpDst(443),
            Field::CtState(ct::TRK | ct::NEW, ct::TRK | ct::NEW),
            Field::CtMark(2, None),
            Field::CtZone(1),
            Field::CtLabel(1 << 11, Some(1 << 11)),
            Field::Reg(0, 5, Some(0xfff)),
            Field::Ipv6Src(0x2001_0db8 << 96 | 2, None),
            Field::Ipv6Dst(0xfd00 << 112, Some(u128::MAX << 64)),
            Field::IpFrag(frag::ANY, Some(frag::ANY)),
        ] {
            roundtrip_field(f);
        }
    }

    #[test]
    fn oxm_headers_have_the_registered_values() {
        // Values from the OpenFlow 1.3 spec and OVS's nx-match definitions.
        let table = [
            (hdr::IN_PORT.raw(false), 0x8000_0004u32),
            (hdr::ETH_TYPE.raw(false), 0x8000_0a02),
            (hdr::VLAN_VID.raw(true), 0x8000_0d04),
            (hdr::UDP_DST.raw(false), 0x8000_2002),
            (hdr::CT_STATE.raw(true), 0x0001_d308),
            (hdr::CT_MARK.raw(false), 0x0001_d604),
            (hdr::NXM_OF_VLAN_TCI.raw(false), 0x0000_0802),
            (hdr::nxm_reg(0).raw(false), 0x0001_0004),
            (hdr::IPV6_SRC.raw(false), 0x8000_3410),
            (hdr::IPV6_DST.raw(true), 0x8000_3720),
            (hdr::IP_FRAG.raw(true), 0x0001_3502),
        ];
        for (got, want) in table {
            assert_eq!(got, want, "{got:#x} != {want:#x}");
        }
    }

    #[test]
    fn actions_round_trip_and_are_8_byte_aligned() {
        let acts = vec![
            Action::Output(3),
            Action::Output(port::NORMAL),
            Action::PushVlan(0x8100),
            Action::PopVlan,
            Action::SetField(Field::VlanVid(0x1000, None)),
            Action::Ct {
                commit: true,
                zone: 1,
                table: None,
                actions: vec![Action::SetField(Field::CtMark(2, None))],
            },
            Action::Ct {
                commit: false,
                zone: 1,
                table: Some(20),
                actions: vec![],
            },
            Action::RegMove {
                n_bits: 12,
                src_ofs: 0,
                dst_ofs: 0,
                src: hdr::NXM_OF_IN_PORT,
                dst: hdr::NXM_OF_VLAN_TCI,
            },
            Action::OutputReg {
                src: hdr::nxm_reg(0),
                ofs: 0,
                n_bits: 16,
            },
            Action::Load {
                dst: hdr::CT_LABEL,
                ofs: 0,
                n_bits: 1,
                value: 1,
            },
            Action::RegMove {
                n_bits: 127,
                src_ofs: 0,
                dst_ofs: 1,
                src: hdr::CT_LABEL,
                dst: hdr::CT_LABEL,
            },
        ];
        for a in acts {
            let mut b = Vec::new();
            a.encode(&mut b);
            assert_eq!(b.len() % 8, 0, "{a:?} is {} bytes", b.len());
            assert_eq!(Action::decode(&mut Rd::new(&b)).unwrap(), a);
        }
    }

    #[test]
    fn truncated_or_lying_input_is_an_error_not_a_panic() {
        let mut b = Vec::new();
        Action::Output(1).encode(&mut b);
        for cut in 0..b.len() {
            assert!(Action::decode(&mut Rd::new(&b[..cut])).is_err());
        }
        // A length field smaller than the header.
        assert!(Action::decode(&mut Rd::new(&[0, 0, 0, 2, 0, 0, 0, 0])).is_err());
        assert!(decode_flow_stats(&[0, 10, 0, 0]).is_ok());
        assert!(decode_flow_stats(&[0u8; 60]).is_err());
        assert!(Instruction::decode_list(&[0, 4, 0, 4]).is_err());
    }

    #[test]
    fn flow_text_reads_like_ovs_ofctl() {
        let f = Flow {
            table: 20,
            priority: 100,
            cookie: 0x5,
            matches: vec![
                Field::EthType(0x0800),
                Field::CtState(ct::TRK | ct::NEW, ct::TRK | ct::NEW),
            ],
            instructions: vec![Instruction::Apply(vec![
                Action::Ct {
                    commit: true,
                    zone: 1,
                    table: None,
                    actions: vec![Action::SetField(Field::CtMark(1, None))],
                },
                Action::Output(3),
            ])],
            ..Flow::default()
        };
        assert_eq!(
            f.to_string(),
            "cookie=0x5,table=20,priority=100,dl_type=0x0800,ct_state=+new+trk actions=ct(commit,zone=1,exec(set_field:0x1->ct_mark)),output:3"
        );
    }
}
