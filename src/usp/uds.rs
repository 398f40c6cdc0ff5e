//! The USP Service transport: gatevisor registers `Device.SoftwareModules.` with the gateway's
//! USP Broker over the TR-369 Unix-domain-socket MTP and serves the requests the Broker routes
//! to it. It connects to the Broker's controller socket, exchanges handshakes (endpoint ids),
//! sends a UDSConnect Record and a Register, then answers each Record on the connection and
//! sends notifications there. A lost connection is retried after 1-5 s (R-UDS.5); the Broker
//! has failed the in-flight operations by then, so the `DUStateChange!` that follows the
//! re-registration is the result that counts.
//!
//! Frames: `_USP`, a 4-byte big-endian length, then TLVs (type: 1 handshake, 2 error,
//! 3 USP Record; 4-byte big-endian length; value).

use super::codec::{Codec, Envelope, Incoming, Outgoing};
use super::model::{Model, Notification, Role, SM};
use serde::Deserialize;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const SYNC: [u8; 4] = *b"_USP";
pub const TLV_HANDSHAKE: u8 = 1;
pub const TLV_ERROR: u8 = 2;
pub const TLV_RECORD: u8 = 3;
/// The largest frame accepted (a USP Record with a large GetResp fits easily).
pub const MAX_FRAME: usize = 4 << 20;

/// The `[usp_service]` section of the daemon's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdsConfig {
    /// This Service's endpoint id.
    pub endpoint_id: String,
    /// The Broker's controller socket (where Services connect as Agents).
    pub broker_path: PathBuf,
}

/// One frame holding `tlvs` (type, value).
pub fn frame(tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let body: usize = tlvs.iter().map(|(_, v)| 5 + v.len()).sum();
    let mut f = Vec::with_capacity(8 + body);
    f.extend_from_slice(&SYNC);
    f.extend_from_slice(&(body as u32).to_be_bytes());
    for (t, v) in tlvs {
        f.push(*t);
        f.extend_from_slice(&(v.len() as u32).to_be_bytes());
        f.extend_from_slice(v);
    }
    f
}

/// Reads one frame and returns its TLVs; an error for bad sync bytes, sizes or TLVs.
pub fn read_frame(r: &mut impl Read) -> std::io::Result<Vec<(u8, Vec<u8>)>> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut hdr = [0u8; 8];
    r.read_exact(&mut hdr)?;
    if hdr[..4] != SYNC {
        return Err(bad("UDS frame without the _USP sync bytes"));
    }
    let len = u32::from_be_bytes(hdr[4..].try_into().unwrap()) as usize;
    if !(5..=MAX_FRAME).contains(&len) {
        return Err(bad("UDS frame length out of range"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let mut tlvs = Vec::new();
    let mut at = 0;
    while at < len {
        if at + 5 > len {
            return Err(bad("truncated TLV header"));
        }
        let t = body[at];
        let l = u32::from_be_bytes(body[at + 1..at + 5].try_into().unwrap()) as usize;
        let v = body
            .get(at + 5..at + 5 + l)
            .ok_or_else(|| bad("TLV longer than its frame"))?;
        tlvs.push((t, v.to_vec()));
        at += 5 + l;
    }
    Ok(tlvs)
}

static MSG_ID: AtomicU64 = AtomicU64::new(1);

/// The current connection's writer and the Broker's endpoint id (None while disconnected).
type Link = Arc<Mutex<Option<(UnixStream, String)>>>;

/// Runs the Service transport on its own threads.
pub fn spawn(
    cfg: UdsConfig,
    model: Arc<Model>,
    codec: Arc<dyn Codec>,
    outbox: Receiver<Notification>,
) -> std::io::Result<()> {
    let link: Link = Arc::new(Mutex::new(None));
    // Notifications go to the Broker on the current connection; while there is none they
    // wait (the Broker re-subscribes after a reconnect, and the final DUStateChange! counts).
    {
        let (link, codec, me) = (link.clone(), codec.clone(), cfg.endpoint_id.clone());
        std::thread::Builder::new()
            .name("usp-uds-notify".into())
            .spawn(move || {
                for (recipient, out) in outbox {
                    loop {
                        let mut l = link.lock().unwrap();
                        if let Some((w, broker)) = l.as_mut() {
                            if *broker != recipient {
                                tracing::warn!("usp: no UDS peer {recipient}; dropped");
                                break;
                            }
                            let env = Envelope {
                                from_id: me.clone(),
                                to_id: recipient.clone(),
                            };
                            let id =
                                format!("gv-notify-{}", MSG_ID.fetch_add(1, Ordering::Relaxed));
                            if let Ok(rec) = codec.encode(&env, &id, &out) {
                                if w.write_all(&frame(&[(TLV_RECORD, &rec)])).is_ok() {
                                    break;
                                }
                            }
                        }
                        drop(l);
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            })?;
    }
    std::thread::Builder::new()
        .name("usp-uds".into())
        .spawn(move || loop {
            match session(&cfg, &model, codec.as_ref(), &link) {
                Ok(()) => tracing::info!("usp: the Broker closed the connection"),
                Err(e) => {
                    tracing::warn!("usp: Broker connection {}: {e}", cfg.broker_path.display())
                }
            }
            *link.lock().unwrap() = None;
            // R-UDS.5: between 1 and 5 seconds.
            let jitter = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_millis() as u64 * 4)
                .unwrap_or(0);
            std::thread::sleep(Duration::from_millis(1000 + jitter));
        })?;
    Ok(())
}

/// One connection to the Broker, until it ends.
fn session(
    cfg: &UdsConfig,
    model: &Arc<Model>,
    codec: &dyn Codec,
    link: &Link,
) -> std::io::Result<()> {
    let mut conn = UnixStream::connect(&cfg.broker_path)?;
    conn.write_all(&frame(&[(TLV_HANDSHAKE, cfg.endpoint_id.as_bytes())]))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let broker = loop {
        let tlvs = read_frame(&mut conn)?;
        if let Some((_, v)) = tlvs.iter().find(|(t, _)| *t == TLV_HANDSHAKE) {
            break String::from_utf8_lossy(v).into_owned();
        }
        if let Some((_, v)) = tlvs.iter().find(|(t, _)| *t == TLV_ERROR) {
            return Err(std::io::Error::other(format!(
                "the Broker refused the handshake: {}",
                String::from_utf8_lossy(v)
            )));
        }
    };
    conn.set_read_timeout(None)?;
    tracing::info!("usp: connected to Broker {broker}; registering {SM}");
    // The Broker is the Controller of this USP Service: its subscriptions name it.
    model.add_controller(&broker);
    let env = Envelope {
        from_id: cfg.endpoint_id.clone(),
        to_id: broker.clone(),
    };
    let enc = |e: super::codec::CodecError| std::io::Error::other(e.to_string());
    let connect = codec.encode_uds_connect(&env).map_err(enc)?;
    let register = codec
        .encode(
            &env,
            &format!("gv-register-{}", MSG_ID.fetch_add(1, Ordering::Relaxed)),
            &Outgoing::Register(vec![SM.to_string()]),
        )
        .map_err(enc)?;
    conn.write_all(&frame(&[(TLV_RECORD, &connect)]))?;
    conn.write_all(&frame(&[(TLV_RECORD, &register)]))?;
    *link.lock().unwrap() = Some((conn.try_clone()?, broker.clone()));

    loop {
        let tlvs = read_frame(&mut conn)?;
        for (t, v) in tlvs {
            match t {
                TLV_RECORD => {}
                TLV_ERROR => {
                    tracing::warn!("usp: the Broker reports: {}", String::from_utf8_lossy(&v));
                    continue;
                }
                _ => continue, // a repeated handshake is ignored (R-UDS.19)
            }
            let (from, msg_id, req) = match codec.decode(&v) {
                Ok(d) => d,
                Err(e) => {
                    let m = format!("cannot parse the USP Record: {e}");
                    let _ = conn.write_all(&frame(&[(TLV_ERROR, m.as_bytes())]));
                    continue;
                }
            };
            if from.to_id != cfg.endpoint_id || from.from_id != broker {
                tracing::warn!("usp: dropped a record {} → {}", from.from_id, from.to_id);
                continue;
            }
            if let Incoming::RegisterResp(results) = &req {
                for (path, r) in results {
                    match r {
                        Ok(()) => tracing::info!("usp: the Broker registered {path}"),
                        Err((c, m)) => tracing::error!("usp: the Broker refused {path}: {c} {m}"),
                    }
                }
                continue;
            }
            // The Broker routes only what its own access control allows.
            let Some(out) = model.handle(&broker, Role::Launcher, req) else {
                continue;
            };
            let back = Envelope {
                from_id: cfg.endpoint_id.clone(),
                to_id: broker.clone(),
            };
            let rec = codec.encode(&back, &msg_id, &out).map_err(enc)?;
            let mut l = link.lock().unwrap();
            if let Some((w, _)) = l.as_mut() {
                w.write_all(&frame(&[(TLV_RECORD, &rec)]))?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let f = frame(&[(TLV_HANDSHAKE, b"os::abc"), (TLV_RECORD, b"\x0a\x01")]);
        assert_eq!(&f[..4], b"_USP");
        let tlvs = read_frame(&mut &f[..]).unwrap();
        assert_eq!(tlvs, vec![(1, b"os::abc".to_vec()), (3, vec![0x0a, 0x01])]);
        let mut bad_sync = f.clone();
        bad_sync[0] = b'X';
        assert!(read_frame(&mut &bad_sync[..]).is_err());
        let mut overlong = f.clone();
        overlong[12] = 0xff; // first TLV's length runs past the frame
        assert!(read_frame(&mut &overlong[..]).is_err());
        let truncated = &f[..f.len() - 1];
        assert!(read_frame(&mut &truncated[..]).is_err());
    }
}
