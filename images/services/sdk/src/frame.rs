//! A steered frame: `dst, src, 0x8100, TCI, ethertype, IPv4 or IPv6, payload`.
//!
//! Everything here reads untrusted bytes: accessors return `None` instead of panicking.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;

/// IPv6 extension headers walked to find the transport header (hop-by-hop, routing,
/// destination options); the fragment header is read on the way.
const EXT_HOP: u8 = 0;
const EXT_ROUTING: u8 = 43;
const EXT_FRAGMENT: u8 = 44;
const EXT_DSTOPTS: u8 = 60;
/// More extension headers than this and the packet is not parsed.
const MAX_EXT: usize = 8;

/// A steered frame, tag included.
pub struct Frame<'a> {
    pub bytes: &'a mut [u8],
}

/// Where a fragment sits in its datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// The IPv4 identification, or the IPv6 fragment header's.
    pub id: u32,
    /// Byte offset of this piece's data in the datagram's payload.
    pub offset: usize,
    /// More pieces follow.
    pub more: bool,
    /// The protocol of the datagram (its transport).
    pub proto: u8,
    /// End of the part every piece repeats: the IPv4 header, or IPv6's fixed header and the
    /// extension headers before the fragment header.
    pub unfragmentable: usize,
    /// Where this piece's data starts in the frame.
    pub data: usize,
    /// IPv6: where the next-header byte that names the fragment header is.
    pub next_header_at: usize,
}

/// The network layer of a frame, parsed once.
struct L3 {
    v6: bool,
    /// The transport protocol.
    proto: u8,
    /// Start of the transport header (or of the fragment's data).
    l4: usize,
    frag: Option<Fragment>,
}

impl Frame<'_> {
    /// Start of the IP header.
    pub const L3: usize = 18;

    fn be16(&self, at: usize) -> Option<u16> {
        Some(u16::from_be_bytes([
            *self.bytes.get(at)?,
            *self.bytes.get(at + 1)?,
        ]))
    }

    /// The EtherType inside the tag.
    pub fn ethertype(&self) -> Option<u16> {
        (self.be16(12)? == 0x8100).then_some(())?;
        self.be16(16)
    }

    /// Tagged IPv4 or IPv6 (what steering sends).
    pub fn is_tagged_ip(&self) -> bool {
        self.l3().is_some()
    }

    /// Tagged IPv6.
    pub fn is_ipv6(&self) -> bool {
        self.l3().is_some_and(|l| l.v6)
    }

    pub fn src_mac(&self) -> Option<[u8; 6]> {
        self.bytes.get(6..12)?.try_into().ok()
    }

    fn l3(&self) -> Option<L3> {
        let b = &*self.bytes;
        match self.ethertype()? {
            ETH_IPV4 => {
                let at = Self::L3;
                if *b.get(at)? >> 4 != 4 {
                    return None;
                }
                let ihl = (*b.get(at)? & 0x0f) as usize * 4;
                let total = self.be16(at + 2)? as usize;
                if ihl < 20 || at + ihl > b.len() || total < ihl || at + total > b.len() {
                    return None;
                }
                let proto = b[at + 9];
                let flags_off = self.be16(at + 6)?;
                let more = flags_off & 0x2000 != 0;
                let offset = (flags_off & 0x1fff) as usize * 8;
                let frag = (more || offset != 0).then_some(Fragment {
                    id: self.be16(at + 4)? as u32,
                    offset,
                    more,
                    proto,
                    unfragmentable: at + ihl,
                    data: at + ihl,
                    next_header_at: at + 9,
                });
                Some(L3 {
                    v6: false,
                    proto,
                    l4: at + ihl,
                    frag,
                })
            }
            ETH_IPV6 => {
                let at = Self::L3;
                if *b.get(at)? >> 4 != 6 {
                    return None;
                }
                let plen = self.be16(at + 4)? as usize;
                if at + 40 + plen > b.len() {
                    return None;
                }
                let mut next = b[at + 6];
                let mut next_at = at + 6;
                let mut i = at + 40;
                let mut frag = None;
                for _ in 0..MAX_EXT {
                    match next {
                        EXT_HOP | EXT_ROUTING | EXT_DSTOPTS => {
                            let len = (*b.get(i + 1)? as usize + 1) * 8;
                            b.get(i..i + len)?;
                            next_at = i;
                            next = b[i];
                            i += len;
                        }
                        EXT_FRAGMENT => {
                            b.get(i..i + 8)?;
                            let off_m = self.be16(i + 2)?;
                            let f = Fragment {
                                id: u32::from_be_bytes(b[i + 4..i + 8].try_into().ok()?),
                                offset: (off_m & 0xfff8) as usize,
                                more: off_m & 1 != 0,
                                proto: b[i],
                                unfragmentable: i,
                                data: i + 8,
                                next_header_at: next_at,
                            };
                            next_at = i;
                            next = b[i];
                            i += 8;
                            // An atomic fragment (offset 0, no more) is a whole datagram.
                            if f.offset != 0 || f.more {
                                frag = Some(f);
                                break;
                            }
                        }
                        _ => break,
                    }
                }
                if matches!(next, EXT_HOP | EXT_ROUTING | EXT_DSTOPTS) && frag.is_none() {
                    return None; // too many extension headers
                }
                Some(L3 {
                    v6: true,
                    proto: next,
                    l4: i,
                    frag,
                })
            }
            _ => None,
        }
    }

    /// The transport protocol (of the datagram, for a fragment).
    pub fn proto(&self) -> Option<u8> {
        self.l3().map(|l| l.proto)
    }

    /// Where this frame sits in a fragmented datagram; `None` for a whole one.
    pub fn fragment(&self) -> Option<Fragment> {
        self.l3()?.frag
    }

    pub fn src_addr(&self) -> Option<IpAddr> {
        self.addr(12, 8)
    }

    pub fn dst_addr(&self) -> Option<IpAddr> {
        self.addr(16, 24)
    }

    /// The address at `v4` bytes into an IPv4 header, or `v6` into an IPv6 one.
    fn addr(&self, v4: usize, v6: usize) -> Option<IpAddr> {
        let at = Self::L3;
        Some(if self.l3()?.v6 {
            let b: [u8; 16] = self.bytes.get(at + v6..at + v6 + 16)?.try_into().ok()?;
            IpAddr::V6(Ipv6Addr::from(b))
        } else {
            let b: [u8; 4] = self.bytes.get(at + v4..at + v4 + 4)?.try_into().ok()?;
            IpAddr::V4(Ipv4Addr::from(b))
        })
    }

    /// Start of the UDP/TCP header of a whole datagram (`None` for a fragment).
    pub fn l4(&self) -> Option<usize> {
        let l = self.l3()?;
        (l.frag.is_none() && l.l4 + 8 <= self.end()?).then_some(l.l4)
    }

    /// End of the IP datagram in the frame (the frame may carry Ethernet padding).
    pub(crate) fn end(&self) -> Option<usize> {
        let at = Self::L3;
        Some(match self.ethertype()? {
            ETH_IPV4 => at + self.be16(at + 2)? as usize,
            _ => at + 40 + self.be16(at + 4)? as usize,
        })
    }

    pub fn src_port(&self) -> Option<u16> {
        self.be16(self.l4()?)
    }

    pub fn dst_port(&self) -> Option<u16> {
        self.be16(self.l4()? + 2)
    }

    /// UDP payload.
    pub fn udp_payload(&mut self) -> Option<&mut [u8]> {
        let start = self.l4()? + 8;
        let end = self.end()?;
        self.bytes.get_mut(start..end)
    }

    fn tcp_header_len(&self) -> Option<usize> {
        let l4 = self.l4()?;
        let off = (*self.bytes.get(l4 + 12)? >> 4) as usize * 4;
        (off >= 20).then_some(off)
    }

    /// TCP payload.
    pub fn tcp_payload(&self) -> Option<&[u8]> {
        let l4 = self.l4()?;
        let end = self.end()?;
        self.bytes.get(l4 + self.tcp_header_len()?..end)
    }

    /// TCP sequence number.
    pub fn tcp_seq(&self) -> Option<u32> {
        let l4 = self.l4()?;
        Some(u32::from_be_bytes(
            self.bytes.get(l4 + 4..l4 + 8)?.try_into().ok()?,
        ))
    }

    /// TCP flags (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10).
    pub fn tcp_flags(&self) -> Option<u8> {
        self.bytes.get(self.l4()? + 13).copied()
    }

    /// Turns a UDP frame around (MACs, IPs, ports) so it goes back to its sender. The UDP
    /// checksum is cleared; [`Frame::set_udp_payload_len`] sets it again where it is
    /// mandatory (IPv6).
    pub fn turn_udp_around(&mut self) -> Option<()> {
        // The lengths may be stale already: the caller is changing the payload.
        let l4 = self.udp_header_at()?;
        let v6 = self.ethertype()? == ETH_IPV6;
        let (a, b) = self.bytes.split_at_mut(6);
        a.swap_with_slice(b.get_mut(..6)?);
        let (src, len) = if v6 { (8, 16) } else { (12, 4) };
        for i in 0..len {
            self.bytes
                .swap(Self::L3 + src + i, Self::L3 + src + len + i);
        }
        self.bytes.swap(l4, l4 + 2);
        self.bytes.swap(l4 + 1, l4 + 3);
        self.bytes[l4 + 6] = 0;
        self.bytes[l4 + 7] = 0;
        Some(())
    }

    /// Fixes the IP and UDP lengths after the UDP payload became `len` bytes (the frame must
    /// hold exactly that payload), with the IPv4 header checksum, and for IPv6 the UDP
    /// checksum.
    pub fn set_udp_payload_len(&mut self, len: usize) -> Option<()> {
        let l4 = self.udp_header_at()?;
        let udp_len = u16::try_from(8 + len).ok()?;
        self.bytes
            .get_mut(l4 + 4..l4 + 6)?
            .copy_from_slice(&udp_len.to_be_bytes());
        if self.ethertype()? == ETH_IPV6 {
            let plen = u16::try_from(l4 - Self::L3 - 40 + 8 + len).ok()?;
            self.bytes[Self::L3 + 4..Self::L3 + 6].copy_from_slice(&plen.to_be_bytes());
            self.bytes.get(l4..l4 + 8 + len)?;
            self.bytes[l4 + 6] = 0;
            self.bytes[l4 + 7] = 0;
            let mut sum = ones_sum(&self.bytes[Self::L3 + 8..Self::L3 + 40], 0);
            sum += udp_len as u32 + 17;
            sum = ones_sum(&self.bytes[l4..l4 + 8 + len], sum);
            let ck = match !fold(sum) {
                0 => 0xffff,
                c => c,
            };
            self.bytes[l4 + 6..l4 + 8].copy_from_slice(&ck.to_be_bytes());
        } else {
            let ihl = l4 - Self::L3;
            let ip_len = u16::try_from(ihl + 8 + len).ok()?;
            self.bytes[Self::L3 + 2..Self::L3 + 4].copy_from_slice(&ip_len.to_be_bytes());
            set_ipv4_checksum(self.bytes, Self::L3, ihl);
        }
        Some(())
    }

    /// Where the UDP header is, found by walking the headers only: unlike [`Frame::l4`] it
    /// does not trust the length fields, which are being rewritten.
    fn udp_header_at(&self) -> Option<usize> {
        let b = &*self.bytes;
        match self.ethertype()? {
            ETH_IPV4 => {
                let ihl = (*b.get(Self::L3)? & 0x0f) as usize * 4;
                (ihl >= 20 && b[Self::L3 + 9] == 17 && Self::L3 + ihl + 8 <= b.len())
                    .then_some(Self::L3 + ihl)
            }
            ETH_IPV6 => {
                let mut next = *b.get(Self::L3 + 6)?;
                let mut i = Self::L3 + 40;
                for _ in 0..MAX_EXT {
                    match next {
                        EXT_HOP | EXT_ROUTING | EXT_DSTOPTS => {
                            next = *b.get(i)?;
                            i += (*b.get(i + 1)? as usize + 1) * 8;
                        }
                        _ => break,
                    }
                }
                (next == 17 && i + 8 <= b.len()).then_some(i)
            }
            _ => None,
        }
    }
}

/// The one's-complement sum of `data` (as big-endian 16-bit words) added to `sum`.
pub(crate) fn ones_sum(data: &[u8], mut sum: u32) -> u32 {
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    sum
}

pub(crate) fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Writes the IPv4 header checksum of the `ihl`-byte header at `at`.
pub(crate) fn set_ipv4_checksum(b: &mut [u8], at: usize, ihl: usize) {
    b[at + 10] = 0;
    b[at + 11] = 0;
    let ck = !fold(ones_sum(&b[at..at + ihl], 0));
    b[at + 10..at + 12].copy_from_slice(&ck.to_be_bytes());
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tagged UDP frame from `src`:`sport` to `dst`:53 with `payload`.
    pub fn udp_frame(src: IpAddr, dst: IpAddr, sport: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x81, 0, 0x00, 0x05];
        let mut udp = sport.to_be_bytes().to_vec();
        udp.extend_from_slice(&53u16.to_be_bytes());
        udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&ETH_IPV4.to_be_bytes());
                let mut ip = vec![0x45, 0];
                ip.extend_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
                ip.extend_from_slice(&[0, 7, 0, 0, 64, 17, 0, 0]);
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                f.extend_from_slice(&ip);
                set_ipv4_checksum(&mut f, 18, 20);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&ETH_IPV6.to_be_bytes());
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&(udp.len() as u16).to_be_bytes());
                f.extend_from_slice(&[17, 64]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            _ => unreachable!(),
        }
        f.extend_from_slice(&udp);
        f
    }

    /// Verifies a UDP-over-IPv6 checksum: the sum over pseudo-header and datagram is 0xffff.
    fn udp6_checksum_ok(f: &[u8]) -> bool {
        let l4 = 18 + 40;
        let len = u16::from_be_bytes([f[l4 + 4], f[l4 + 5]]) as u32;
        let mut sum = ones_sum(&f[18 + 8..18 + 40], 0) + len + 17;
        sum = ones_sum(&f[l4..l4 + len as usize], sum);
        fold(sum) == 0xffff
    }

    #[test]
    fn both_families_parse_and_turn_around() {
        let v6s: IpAddr = "fd00::2".parse().unwrap();
        let v6d: IpAddr = "fd00::1".parse().unwrap();
        for (s, d) in [
            (
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "10.0.0.1".parse().unwrap(),
            ),
            (v6s, v6d),
        ] {
            let mut bytes = udp_frame(s, d, 4444, b"hello");
            bytes.extend_from_slice(&[0; 6]); // Ethernet padding is not payload
            let mut f = Frame { bytes: &mut bytes };
            assert!(f.is_tagged_ip());
            assert_eq!(f.is_ipv6(), s.is_ipv6());
            assert_eq!((f.src_addr(), f.dst_addr()), (Some(s), Some(d)));
            assert_eq!(
                (f.proto(), f.src_port(), f.dst_port()),
                (Some(17), Some(4444), Some(53))
            );
            assert_eq!(f.udp_payload().unwrap(), b"hello");
            assert!(f.fragment().is_none());
            let l4 = f.l4().unwrap();
            for answer in [&b"a longer answer"[..], b"hi"] {
                let mut out = f.bytes[..l4 + 8].to_vec();
                out.extend_from_slice(answer);
                let mut g = Frame { bytes: &mut out };
                g.turn_udp_around().unwrap();
                g.set_udp_payload_len(answer.len()).unwrap();
                assert_eq!((g.src_addr(), g.dst_addr()), (Some(d), Some(s)));
                assert_eq!((g.src_port(), g.dst_port()), (Some(53), Some(4444)));
                assert_eq!(g.udp_payload().unwrap(), answer);
                if s.is_ipv6() {
                    assert!(udp6_checksum_ok(g.bytes), "IPv6 needs a UDP checksum");
                } else {
                    assert_eq!(
                        fold(ones_sum(&g.bytes[18..38], 0)),
                        0xffff,
                        "IPv4 header sum"
                    );
                }
            }
        }
    }

    #[test]
    fn lying_lengths_and_short_frames_are_not_parsed() {
        let mut b = udp_frame(
            "10.0.0.2".parse().unwrap(),
            "10.0.0.1".parse().unwrap(),
            1,
            b"x",
        );
        b[20] = 0xff; // total length beyond the frame
        assert!(!Frame { bytes: &mut b }.is_tagged_ip());
        let mut b = udp_frame(
            "fd00::2".parse().unwrap(),
            "fd00::1".parse().unwrap(),
            1,
            b"x",
        );
        b[18 + 6] = EXT_HOP; // an extension header that is not there
        let f = Frame { bytes: &mut b };
        assert!(f.l4().is_none());
        let full = udp_frame(
            "fd00::2".parse().unwrap(),
            "fd00::1".parse().unwrap(),
            1,
            b"x",
        );
        for cut in 0..full.len() {
            let mut b = full[..cut].to_vec();
            let mut f = Frame { bytes: &mut b };
            let _ = (f.src_addr(), f.dst_port(), f.fragment(), f.tcp_payload());
            let _ = f.udp_payload();
        }
    }
}
