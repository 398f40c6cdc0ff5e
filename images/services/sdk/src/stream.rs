//! Length-prefixed messages (DNS over TCP: a 2-byte length, then the message) read from the
//! client's segments as steering hands them over, one direction of each session.
//!
//! A message may span segments, and a segment may carry several (pipelined queries); every
//! complete message is judged before the segment that completes it is returned, and once one
//! is refused the session stays refused. The reader keeps the client's byte stream in order:
//! a segment past a gap is dropped (the client sends it again once the gap is filled), and a
//! retransmission is returned only when its bytes are those already judged; different bytes
//! at the same place (the way to make a filter and the server read different streams) block
//! the session. A session whose start was not seen (a restarted service) is blocked once it
//! carries data; the client opens a new one.
//!
//! Bounded: [`MAX_SESSIONS`] sessions (the least recently used gives way), [`MAX_PENDING`]
//! bytes of an incomplete message, [`HISTORY`] bytes kept to check retransmissions.

use crate::frame::Frame;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

pub const MAX_SESSIONS: usize = 1024;
pub const MAX_PENDING: usize = 16 * 1024;
pub const HISTORY: usize = 8 * 1024;
/// A session not heard from for this long is forgotten.
pub const IDLE: Duration = Duration::from_secs(120);

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// What to do with a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpVerdict {
    /// Return it; the session goes on being read.
    Forward,
    /// Block the session (this segment and every later one).
    Block,
    /// Drop this segment only (it comes after a gap).
    Drop,
}

type Key = (IpAddr, u16, IpAddr, u16);

struct Session {
    /// The sequence number of the next byte expected.
    next: u32,
    /// Bytes of the message not yet complete (the length prefix included).
    pending: Vec<u8>,
    /// The last bytes returned, to check retransmissions against.
    history: Vec<u8>,
    blocked: bool,
    seen: Instant,
}

#[derive(Default)]
pub struct TcpMessages {
    sessions: HashMap<Key, Session>,
}

impl TcpMessages {
    pub fn new() -> TcpMessages {
        TcpMessages::default()
    }

    /// Reads one client segment; `refuse` is asked about every message it completes (true:
    /// block the session). Frames that are not whole TCP segments are returned as they are.
    pub fn segment(
        &mut self,
        frame: &Frame,
        now: Instant,
        mut refuse: impl FnMut(&[u8]) -> bool,
    ) -> TcpVerdict {
        let (Some(src), Some(sport), Some(dst), Some(dport), Some(seq), Some(flags), Some(data)) = (
            frame.src_addr(),
            frame.src_port(),
            frame.dst_addr(),
            frame.dst_port(),
            frame.tcp_seq(),
            frame.tcp_flags(),
            frame.tcp_payload(),
        ) else {
            return TcpVerdict::Forward;
        };
        let key = (src, sport, dst, dport);
        if flags & SYN != 0 && flags & ACK == 0 {
            // A new session: its data starts after the SYN.
            self.make_room(now);
            self.sessions.insert(
                key,
                Session {
                    next: seq.wrapping_add(1),
                    pending: Vec::new(),
                    history: Vec::new(),
                    blocked: false,
                    seen: now,
                },
            );
            if data.is_empty() {
                return TcpVerdict::Forward;
            }
        }
        let Some(s) = self.sessions.get_mut(&key) else {
            // Not seen from its start: nothing tells where its messages begin.
            return if data.is_empty() {
                TcpVerdict::Forward
            } else {
                TcpVerdict::Block
            };
        };
        s.seen = now;
        let verdict = s.read(
            if flags & SYN != 0 {
                seq.wrapping_add(1)
            } else {
                seq
            },
            data,
            &mut refuse,
        );
        if flags & RST != 0 || (flags & FIN != 0 && verdict == TcpVerdict::Forward) {
            let blocked = s.blocked;
            self.sessions.remove(&key);
            if blocked {
                return TcpVerdict::Block;
            }
        }
        verdict
    }

    /// How many sessions are being read.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    fn make_room(&mut self, now: Instant) {
        self.sessions
            .retain(|_, s| now.duration_since(s.seen) < IDLE);
        while self.sessions.len() >= MAX_SESSIONS {
            let Some(k) = self
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.seen)
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.sessions.remove(&k);
        }
    }
}

impl Session {
    fn read(
        &mut self,
        seq: u32,
        data: &[u8],
        refuse: &mut impl FnMut(&[u8]) -> bool,
    ) -> TcpVerdict {
        if self.blocked {
            return TcpVerdict::Block;
        }
        if data.is_empty() {
            return TcpVerdict::Forward;
        }
        let ahead = seq.wrapping_sub(self.next) as i32;
        if ahead > 0 {
            return TcpVerdict::Drop;
        }
        // Bytes before `next` were returned already: they must be the same bytes.
        let old = (-(ahead as i64)) as usize;
        let seen = old.min(data.len());
        if seen > 0 {
            let h = self.history.len();
            if old > h || self.history[h - old..h - old + seen] != data[..seen] {
                self.blocked = true;
                return TcpVerdict::Block;
            }
        }
        let new = &data[seen..];
        if new.is_empty() {
            return TcpVerdict::Forward;
        }
        self.pending.extend_from_slice(new);
        loop {
            if self.pending.len() < 2 {
                break;
            }
            let len = u16::from_be_bytes([self.pending[0], self.pending[1]]) as usize;
            if self.pending.len() < 2 + len {
                break;
            }
            if refuse(&self.pending[2..2 + len]) {
                self.blocked = true;
                return TcpVerdict::Block;
            }
            self.pending.drain(..2 + len);
        }
        if self.pending.len() > MAX_PENDING {
            self.blocked = true;
            return TcpVerdict::Block;
        }
        self.next = self.next.wrapping_add(new.len() as u32);
        self.history.extend_from_slice(new);
        if self.history.len() > HISTORY {
            self.history.drain(..self.history.len() - HISTORY);
        }
        TcpVerdict::Forward
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::ETH_IPV4;

    /// A tagged TCP segment from 10.0.0.2:4000 to 10.0.0.1:53.
    fn seg(seq: u32, flags: u8, data: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x81, 0, 0, 5];
        f.extend_from_slice(&ETH_IPV4.to_be_bytes());
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&((40 + data.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1]);
        f.extend_from_slice(&4000u16.to_be_bytes());
        f.extend_from_slice(&53u16.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend_from_slice(data);
        f
    }

    fn msg(body: &[u8]) -> Vec<u8> {
        let mut m = (body.len() as u16).to_be_bytes().to_vec();
        m.extend_from_slice(body);
        m
    }

    /// Feeds segments; returns the verdicts and the messages judged.
    fn run(t: &mut TcpMessages, segs: &[Vec<u8>]) -> (Vec<TcpVerdict>, Vec<Vec<u8>>) {
        let mut judged = Vec::new();
        let now = Instant::now();
        let v = segs
            .iter()
            .map(|s| {
                let mut b = s.clone();
                t.segment(&Frame { bytes: &mut b }, now, |m| {
                    judged.push(m.to_vec());
                    m == b"bad"
                })
            })
            .collect();
        (v, judged)
    }

    use TcpVerdict::*;

    #[test]
    fn pipelined_and_split_messages_are_all_judged() {
        let mut t = TcpMessages::new();
        let two = [msg(b"ok1"), msg(b"bad")].concat();
        let (v, j) = run(&mut t, &[seg(100, SYN, b""), seg(101, ACK, &two)]);
        assert_eq!(v, [Forward, Block], "the second of two pipelined messages");
        assert_eq!(j, [b"ok1".to_vec(), b"bad".to_vec()]);
        // The session stays blocked.
        assert_eq!(run(&mut t, &[seg(101 + 5, ACK, &msg(b"ok"))]).0, [Block]);

        // The length prefix alone, then the message.
        let mut t = TcpMessages::new();
        let m = msg(b"bad");
        let (v, _) = run(
            &mut t,
            &[
                seg(7, SYN, b""),
                seg(8, ACK, &m[..2]),
                seg(10, ACK, &m[2..3]),
                seg(11, ACK, &m[3..]),
            ],
        );
        assert_eq!(v, [Forward, Forward, Forward, Block]);
    }

    #[test]
    fn gaps_wait_and_retransmissions_must_match() {
        let mut t = TcpMessages::new();
        let m = [msg(b"ok1"), msg(b"ok2")].concat();
        let (v, _) = run(
            &mut t,
            &[
                seg(0, SYN, b""),
                seg(1 + 5, ACK, &m[5..]), // after a gap
                seg(1, ACK, &m[..5]),
                seg(1, ACK, &m[..5]), // the same bytes again
                seg(1 + 5, ACK, &m[5..]),
            ],
        );
        assert_eq!(v, [Forward, Drop, Forward, Forward, Forward]);
        // Different bytes where judged ones were: the session is blocked.
        let mut t = TcpMessages::new();
        let (v, j) = run(
            &mut t,
            &[
                seg(0, SYN, b""),
                seg(1, ACK, &msg(b"ok1")),
                seg(1, ACK, &msg(b"bad")),
            ],
        );
        assert_eq!(v, [Forward, Forward, Block]);
        assert_eq!(
            j,
            [b"ok1".to_vec()],
            "the rewrite is never read as a message"
        );
    }

    #[test]
    fn unknown_sessions_and_oversized_messages_are_blocked() {
        let mut t = TcpMessages::new();
        assert_eq!(run(&mut t, &[seg(5, ACK, b"")]).0, [Forward]);
        assert_eq!(run(&mut t, &[seg(5, ACK, &msg(b"ok"))]).0, [Block]);
        let mut t = TcpMessages::new();
        let big = vec![0xffu8; 1400];
        let mut segs = vec![seg(0, SYN, b"")];
        for i in 0..13u32 {
            segs.push(seg(1 + i * 1400, ACK, &big));
        }
        let (v, _) = run(&mut t, &segs);
        assert_eq!(
            v.last(),
            Some(&Block),
            "a message never ending past the bound"
        );
        // FIN ends a session.
        let mut t = TcpMessages::new();
        run(&mut t, &[seg(0, SYN, b""), seg(1, ACK | FIN, &msg(b"ok"))]);
        assert_eq!(t.sessions(), 0);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
            ..Default::default()
        })]

        /// Fuzz target: however a stream of messages is cut into segments, every message is
        /// judged exactly once and in order; arbitrary segments never panic the reader.
        #[test]
        fn any_cut_of_a_stream_judges_each_message_once(
            bodies in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40), 1..6),
            cuts in proptest::collection::vec(1usize..30, 1..40),
            raw in proptest::collection::vec((proptest::prelude::any::<u32>(), proptest::prelude::any::<u8>(), proptest::collection::vec(proptest::prelude::any::<u8>(), 0..50)), 0..10),
        ) {
            let stream: Vec<u8> = bodies.iter().flat_map(|b| msg(b)).collect();
            let mut segs = vec![seg(1000, SYN, b"")];
            let (mut at, mut i) = (0, 0);
            while at < stream.len() {
                let n = cuts[i % cuts.len()].min(stream.len() - at);
                segs.push(seg(1001 + at as u32, ACK, &stream[at..at + n]));
                at += n;
                i += 1;
            }
            let mut t = TcpMessages::new();
            let mut judged = Vec::new();
            let now = Instant::now();
            for s in &segs {
                let mut b = s.clone();
                let v = t.segment(&Frame { bytes: &mut b }, now, |m| {
                    judged.push(m.to_vec());
                    false
                });
                proptest::prop_assert_eq!(v, TcpVerdict::Forward);
            }
            proptest::prop_assert_eq!(judged, bodies);
            for (seq, flags, data) in raw {
                let mut b = seg(seq, flags, &data);
                let _ = t.segment(&Frame { bytes: &mut b }, now, |m| m.len() % 2 == 0);
            }
        }
    }
}
