//! IP fragments put back together, so that a datagram sent in pieces (a DNS query made large
//! with EDNS padding, say) is judged whole. Steering sends every fragment of the class to the
//! service; the pieces are held until the datagram is complete, then the service judges the
//! whole: it answers, blocks, or returns the original pieces unchanged.
//!
//! Bounded: at most [`MAX_SETS`] datagrams and [`MAX_BYTES`] held at once (the oldest gives way),
//! [`MAX_PIECES`] pieces each, [`HOLD`] to complete. Overlapping pieces, the classic way to
//! make a filter and the receiver reassemble different bytes, drop the whole datagram.

use crate::frame::{self, Fragment, Frame, ETH_IPV4};
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

pub const MAX_SETS: usize = 64;
pub const MAX_BYTES: usize = 512 * 1024;
pub const MAX_PIECES: usize = 64;
pub const HOLD: Duration = Duration::from_secs(2);
/// The largest datagram payload either family can carry.
const MAX_PAYLOAD: usize = 65535;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    src: IpAddr,
    dst: IpAddr,
    id: u32,
    proto: u8,
}

struct Set {
    /// The pieces as received, tag included.
    pieces: Vec<Vec<u8>>,
    /// (offset in the datagram, length, where the data starts in its frame) of each piece.
    spans: Vec<(usize, usize, usize)>,
    /// The first piece (its index and place): its headers start the whole datagram.
    first: Option<(usize, Fragment)>,
    /// The payload length, once the last piece came.
    total: Option<usize>,
    born: Instant,
    bytes: usize,
}

impl Set {
    /// The destination port the first piece carries, when it came.
    fn dst_port(&self) -> Option<u16> {
        let (i, f) = self.first?;
        let b = self.pieces[i].get(f.data + 2..f.data + 4)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
}

/// What one piece did.
#[derive(Debug)]
pub enum Defragged {
    /// Held until the rest arrives.
    Held,
    /// The datagram is complete: `whole` is one frame carrying it (tag, the first piece's
    /// headers, all the data), `pieces` the frames as they came, to return unchanged when the
    /// verdict is to forward.
    Whole {
        whole: Vec<u8>,
        pieces: Vec<Vec<u8>>,
    },
    /// Dropped, with the pieces held for the same datagram: it overlapped them, was too
    /// large, or was not a fragment the reader understands.
    Refused(&'static str),
}

/// A datagram that was not completed in time (or gave way to newer ones).
#[derive(Debug)]
pub struct Expired {
    pub pieces: Vec<Vec<u8>>,
    /// The destination port, when the first piece (which carries it) is among them.
    pub dst_port: Option<u16>,
}

#[derive(Default)]
pub struct Defrag {
    sets: HashMap<Key, Set>,
    bytes: usize,
    gave_way: Vec<Expired>,
}

impl Defrag {
    pub fn new() -> Defrag {
        Defrag::default()
    }

    /// Takes one piece (a frame for which [`Frame::fragment`] is `Some`).
    pub fn push(&mut self, frame: &[u8], now: Instant) -> Defragged {
        let mut copy = frame.to_vec();
        let f = Frame { bytes: &mut copy };
        let (Some(frag), Some(src), Some(dst), Some(end)) =
            (f.fragment(), f.src_addr(), f.dst_addr(), f.end())
        else {
            return Defragged::Refused("not a fragment");
        };
        if end <= frag.data || (frag.more && !(end - frag.data).is_multiple_of(8)) {
            return Defragged::Refused("a piece whose length is not a multiple of 8");
        }
        let len = end - frag.data;
        if frag.offset + len > MAX_PAYLOAD {
            return Defragged::Refused("a datagram larger than 64 KiB");
        }
        let key = Key {
            src,
            dst,
            id: frag.id,
            proto: frag.proto,
        };
        let size = copy.len();
        let set = self.sets.entry(key.clone()).or_insert_with(|| Set {
            pieces: Vec::new(),
            spans: Vec::new(),
            first: None,
            total: None,
            born: now,
            bytes: 0,
        });
        let overlaps = set
            .spans
            .iter()
            .any(|&(o, l, _)| frag.offset < o + l && o < frag.offset + len);
        let bad_end = !frag.more
            && (set.total.is_some()
                || set.spans.iter().any(|&(o, l, _)| o + l > frag.offset + len));
        let beyond = set.total.is_some_and(|t| frag.offset + len > t);
        if overlaps || bad_end || beyond || set.pieces.len() >= MAX_PIECES {
            let set = self.sets.remove(&key).expect("just found");
            self.bytes -= set.bytes;
            return Defragged::Refused(if set.pieces.len() >= MAX_PIECES {
                "too many pieces"
            } else {
                "pieces that overlap"
            });
        }
        if !frag.more {
            set.total = Some(frag.offset + len);
        }
        if frag.offset == 0 {
            set.first = Some((set.pieces.len(), frag));
        }
        set.pieces.push(copy);
        set.spans.push((frag.offset, len, frag.data));
        set.bytes += size;
        self.bytes += size;
        let complete = set.total.is_some_and(|t| {
            let mut spans = set.spans.clone();
            spans.sort();
            let mut at = 0;
            for (o, l, _) in spans {
                if o != at {
                    return false;
                }
                at += l;
            }
            at == t
        });
        if complete {
            let set = self.sets.remove(&key).expect("just found");
            self.bytes -= set.bytes;
            return match assemble(&set) {
                Some(whole) => Defragged::Whole {
                    whole,
                    pieces: set.pieces,
                },
                None => Defragged::Refused("pieces that do not fit together"),
            };
        }
        self.make_room();
        Defragged::Held
    }

    /// Datagrams held longer than [`HOLD`], and those that gave way to newer ones.
    pub fn expire(&mut self, now: Instant) -> Vec<Expired> {
        let old: Vec<Key> = self
            .sets
            .iter()
            .filter(|(_, s)| now.duration_since(s.born) >= HOLD)
            .map(|(k, _)| k.clone())
            .collect();
        for k in old {
            self.give_way(&k);
        }
        std::mem::take(&mut self.gave_way)
    }

    /// How many datagrams are held.
    pub fn held(&self) -> usize {
        self.sets.len()
    }

    fn make_room(&mut self) {
        while self.sets.len() > MAX_SETS || self.bytes > MAX_BYTES {
            let Some(oldest) = self
                .sets
                .iter()
                .min_by_key(|(_, s)| s.born)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.give_way(&oldest);
        }
    }

    fn give_way(&mut self, key: &Key) {
        let Some(set) = self.sets.remove(key) else {
            return;
        };
        self.bytes -= set.bytes;
        let dst_port = set.dst_port();
        self.gave_way.push(Expired {
            pieces: set.pieces,
            dst_port,
        });
    }
}

/// One frame with the first piece's headers (fragmentation undone) and all the data.
fn assemble(set: &Set) -> Option<Vec<u8>> {
    let (first, frag) = set.first?;
    let head = &set.pieces[first];
    let total = set.total?;
    let mut out = head.get(..frag.unfragmentable)?.to_vec();
    let mut data = vec![0u8; total];
    for (piece, &(o, l, d)) in set.pieces.iter().zip(&set.spans) {
        data[o..o + l].copy_from_slice(piece.get(d..d + l)?);
    }
    let at = Frame::L3;
    if head.get(16..18)? == ETH_IPV4.to_be_bytes() {
        let ihl = frag.unfragmentable - at;
        let len = u16::try_from(ihl + total).ok()?;
        out[at + 2..at + 4].copy_from_slice(&len.to_be_bytes());
        out[at + 6] = 0; // no flags, offset 0
        out[at + 7] = 0;
        frame::set_ipv4_checksum(&mut out, at, ihl);
    } else {
        // The fragment header goes; the header before it names the datagram's protocol.
        out[frag.next_header_at] = frag.proto;
        let plen = u16::try_from(frag.unfragmentable - at - 40 + total).ok()?;
        out[at + 4..at + 6].copy_from_slice(&plen.to_be_bytes());
    }
    out.extend_from_slice(&data);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::tests::udp_frame;

    /// Splits a whole (unfragmented) frame into pieces of at most `size` data bytes, as the
    /// sending host's IP layer would.
    pub fn split(whole: &[u8], size: usize, id: u32) -> Vec<Vec<u8>> {
        let mut b = whole.to_vec();
        let f = Frame { bytes: &mut b };
        let v6 = f.is_ipv6();
        let l4 = f.l4().unwrap();
        let data = &whole[l4..];
        let mut out = Vec::new();
        let mut off = 0;
        while off < data.len() {
            let n = size.min(data.len() - off);
            let more = off + n < data.len();
            let mut p = whole[..l4].to_vec();
            if v6 {
                p[18 + 6] = 44;
                p.extend_from_slice(&[17, 0]);
                p.extend_from_slice(&((off as u16) | more as u16).to_be_bytes());
                p.extend_from_slice(&id.to_be_bytes());
                let plen = (8 + n) as u16;
                p[18 + 4..18 + 6].copy_from_slice(&plen.to_be_bytes());
            } else {
                let len = (20 + n) as u16;
                p[20..22].copy_from_slice(&len.to_be_bytes());
                p[22..24].copy_from_slice(&(id as u16).to_be_bytes());
                let fo = (off / 8) as u16 | if more { 0x2000 } else { 0 };
                p[24..26].copy_from_slice(&fo.to_be_bytes());
                frame::set_ipv4_checksum(&mut p, 18, 20);
            }
            p.extend_from_slice(&data[off..off + n]);
            out.push(p);
            off += n;
        }
        out
    }

    fn frames() -> Vec<Vec<u8>> {
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        vec![
            udp_frame(
                "10.0.0.2".parse().unwrap(),
                "10.0.0.1".parse().unwrap(),
                999,
                &payload,
            ),
            udp_frame(
                "fd00::2".parse().unwrap(),
                "fd00::1".parse().unwrap(),
                999,
                &payload,
            ),
        ]
    }

    #[test]
    fn pieces_in_any_order_make_the_whole_datagram() {
        for whole in frames() {
            let mut pieces = split(&whole, 1232, 77);
            assert_eq!(pieces.len(), 3);
            pieces.swap(0, 2);
            let mut d = Defrag::new();
            let now = Instant::now();
            assert!(matches!(d.push(&pieces[0], now), Defragged::Held));
            assert!(matches!(d.push(&pieces[1], now), Defragged::Held));
            match d.push(&pieces[2], now) {
                Defragged::Whole {
                    whole: w,
                    pieces: p,
                } => {
                    // The datagram as it was sent, but for the identification the pieces got.
                    let same = |a: &[u8], b: &[u8]| {
                        let (mut a, mut b) = (a.to_vec(), b.to_vec());
                        if !(Frame { bytes: &mut a }).is_ipv6() {
                            for x in [&mut a, &mut b] {
                                x[22..24].fill(0);
                                x[28..30].fill(0);
                            }
                        }
                        a == b
                    };
                    assert!(same(&w, &whole), "not the datagram as sent");
                    assert_eq!(p.len(), 3);
                    let mut w = w;
                    let f = Frame { bytes: &mut w };
                    assert_eq!(f.dst_port(), Some(53));
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(d.held(), 0);
        }
    }

    #[test]
    fn overlaps_drop_the_datagram_and_late_ones_expire_with_their_port() {
        for whole in frames() {
            let pieces = split(&whole, 1232, 5);
            let mut d = Defrag::new();
            let now = Instant::now();
            d.push(&pieces[0], now);
            assert!(matches!(d.push(&pieces[0], now), Defragged::Refused(_)));
            assert_eq!(d.held(), 0, "nothing of it is kept");
            d.push(&pieces[0], now);
            d.push(&pieces[2], now);
            assert!(d.expire(now).is_empty());
            let gone = d.expire(now + HOLD);
            assert_eq!(gone.len(), 1);
            assert_eq!(
                gone[0].dst_port,
                Some(53),
                "the first piece says where it went"
            );
            assert_eq!(gone[0].pieces.len(), 2);
            // Only later pieces: the port is unknown.
            d.push(&pieces[1], now);
            assert_eq!(d.expire(now + HOLD)[0].dst_port, None);
        }
    }

    #[test]
    fn bounds_hold_against_a_flood_of_partial_datagrams() {
        let whole = &frames()[0];
        let mut d = Defrag::new();
        let now = Instant::now();
        for id in 0..1000 {
            d.push(&split(whole, 1232, id)[0], now);
        }
        assert!(d.held() <= MAX_SETS);
        assert!(d.bytes <= MAX_BYTES);
        assert_eq!(d.expire(now).len(), 1000 - d.held(), "the oldest gave way");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
            ..Default::default()
        })]

        /// Fuzz target: mutated pieces never panic the reader or what reads the frames it
        /// puts together, and nothing stays held past its time.
        #[test]
        fn any_pieces_are_taken_without_a_panic(
            v6 in proptest::prelude::any::<bool>(),
            size in 8usize..1500,
            flips in proptest::collection::vec((0usize..8, proptest::prelude::any::<u16>(), proptest::prelude::any::<u8>()), 0..6),
            order in proptest::collection::vec(0usize..8, 0..10),
        ) {
            let whole = &frames()[v6 as usize];
            let mut pieces = split(whole, size / 8 * 8, 9);
            for (i, at, v) in flips {
                if let Some(p) = pieces.get_mut(i % 8) {
                    let n = p.len();
                    p[at as usize % n] = v;
                }
            }
            let mut d = Defrag::new();
            let now = Instant::now();
            for i in order.into_iter().chain(0..pieces.len()) {
                if let Some(p) = pieces.get(i) {
                    if let Defragged::Whole { mut whole, .. } = d.push(p, now) {
                        let mut f = Frame { bytes: &mut whole };
                        let _ = (f.src_addr(), f.dst_port(), f.fragment(), f.tcp_payload());
                        let _ = f.udp_payload();
                    }
                }
            }
            let _ = d.expire(now + HOLD);
            proptest::prop_assert_eq!(d.held(), 0);
        }
    }
}
