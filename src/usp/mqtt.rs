//! The embedded USP Agent's MQTT 5 transport (TR-369 MQTT MTP): the agent subscribes to its
//! own topic, answers each request on the request's Response Topic (else the Controller's
//! configured topic) with content type `usp.msg`, and publishes notifications to their
//! recipient's topic. Records for another endpoint, from unknown Controllers, or that do not
//! decode are dropped and logged. The connection comes back by itself with a growing backoff;
//! notifications raised meanwhile wait in the client's queue.

use super::codec::{Codec, Envelope, Incoming, Outgoing};
use super::model::{Model, Notification, Role};
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Client, Event, MqttOptions};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Duration;

/// QoS 1 publishes in flight at once (the broker may ask for fewer).
const MAX_INFLIGHT: u16 = 32;

/// A Controller this agent obeys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    pub endpoint_id: String,
    /// Where its answers and notifications go when a request names no Response Topic.
    pub topic: String,
    #[serde(default = "observer")]
    pub role: Role,
}

fn observer() -> Role {
    Role::Observer
}

/// The `[usp]` section of the daemon's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// This agent's USP endpoint id (e.g. `os::012345-SERIAL`).
    pub endpoint_id: String,
    /// `HOST:PORT` of the MQTT broker.
    pub broker: String,
    /// The topic this agent receives on (default `usp/agent/ENDPOINT_ID`).
    #[serde(default)]
    pub agent_topic: Option<String>,
    #[serde(default)]
    pub controllers: Vec<ControllerConfig>,
    /// Mutual TLS to the broker (plain TCP without it).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// The agent's TLS material (PEM files).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The CA(s) that signed the broker's certificate.
    pub ca: PathBuf,
    /// This gateway's certificate: it must name the agent's endpoint id (TR-369 puts it in a
    /// subjectAltName URI `urn:bbf:usp:id:ENDPOINT_ID`).
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn tls_err(what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string())
}

/// The rustls client configuration for mutual TLS, after checking that the device
/// certificate names `endpoint_id`.
pub fn client_tls(tls: &TlsConfig, endpoint_id: &str) -> std::io::Result<rustls::ClientConfig> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| tls_err(format!("{}: {e}", p.display())));
    let roots = super::fetch::ca_roots(&tls.ca, false)?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut &read(&tls.cert)?[..])
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(format!("{}: {e}", tls.cert.display())))?;
    let leaf = chain
        .first()
        .ok_or_else(|| tls_err(format!("{}: no certificate", tls.cert.display())))?;
    // The endpoint id appears verbatim (IA5String/UTF8String) in the DER of a certificate
    // that names it, in its subjectAltName URI or its subject.
    let id = endpoint_id.as_bytes();
    if !leaf.as_ref().windows(id.len()).any(|w| w == id) {
        return Err(tls_err(format!(
            "{}: the certificate does not name endpoint {endpoint_id} \
             (expected subjectAltName URI urn:bbf:usp:id:{endpoint_id})",
            tls.cert.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut &read(&tls.key)?[..])
        .map_err(|e| tls_err(format!("{}: {e}", tls.key.display())))?
        .ok_or_else(|| tls_err(format!("{}: no private key", tls.key.display())))?;
    super::fetch::client_builder()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(tls_err)
}

impl MqttConfig {
    pub fn agent_topic(&self) -> String {
        self.agent_topic
            .clone()
            .unwrap_or_else(|| format!("usp/agent/{}", self.endpoint_id))
    }
}

static MSG_ID: AtomicU64 = AtomicU64::new(1);

fn props(reply_to: Option<String>) -> PublishProperties {
    PublishProperties {
        content_type: Some("usp.msg".into()),
        response_topic: reply_to,
        ..Default::default()
    }
}

/// Runs the agent on its own threads until the process ends.
pub fn spawn(
    cfg: MqttConfig,
    model: Arc<Model>,
    codec: Arc<dyn Codec>,
    outbox: Receiver<Notification>,
) -> std::io::Result<()> {
    let (host, port) = cfg
        .broker
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_string(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("usp.broker {:?}: HOST:PORT", cfg.broker),
            )
        })?;
    let mut opts = MqttOptions::new(cfg.endpoint_id.clone(), host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_start(false);
    // rumqttc keeps one slot per possible in-flight QoS 1 publish, allocated up front: its
    // default (65,535 slots, ~14 MB) was most of the daemon's memory with USP on. A USP
    // agent answers one request at a time and sends few notifications; more than this wait
    // in the request queue, they are not lost.
    opts.set_outgoing_inflight_upper_limit(MAX_INFLIGHT);
    if let Some(tls) = &cfg.tls {
        let client = client_tls(tls, &cfg.endpoint_id)?;
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(client)),
        ));
    }
    let (client, mut connection) = Client::new(opts, 1024);
    let agent_topic = cfg.agent_topic();
    let cfg = Arc::new(cfg);

    // Notifications: to the recipient's configured topic.
    {
        let (client, cfg, codec) = (client.clone(), cfg.clone(), codec.clone());
        let agent_topic = agent_topic.clone();
        std::thread::Builder::new()
            .name("usp-notify".into())
            .spawn(move || {
                for (recipient, out) in outbox {
                    let Some(c) = cfg.controllers.iter().find(|c| c.endpoint_id == recipient)
                    else {
                        tracing::warn!("usp: no topic for recipient {recipient}; dropped");
                        continue;
                    };
                    let env = Envelope {
                        from_id: cfg.endpoint_id.clone(),
                        to_id: recipient.clone(),
                    };
                    let id = format!("gv-notify-{}", MSG_ID.fetch_add(1, Ordering::Relaxed));
                    match codec.encode(&env, &id, &out) {
                        Ok(bytes) => {
                            let _ = client.publish_with_properties(
                                c.topic.clone(),
                                QoS::AtLeastOnce,
                                false,
                                bytes,
                                props(Some(agent_topic.clone())),
                            );
                        }
                        Err(e) => tracing::warn!("usp: {e}"),
                    }
                }
            })?;
    }

    std::thread::Builder::new()
        .name("usp-mqtt".into())
        .spawn(move || {
            let mut backoff = Duration::from_millis(500);
            loop {
                for event in connection.iter() {
                    match event {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            tracing::info!("usp: connected; receiving on {agent_topic}");
                            backoff = Duration::from_millis(500);
                            let _ = client.subscribe(agent_topic.clone(), QoS::AtLeastOnce);
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let reply_to = p
                                .properties
                                .as_ref()
                                .and_then(|pp| pp.response_topic.clone());
                            if let Some((topic, bytes)) =
                                serve(&cfg, &model, codec.as_ref(), &p.payload, reply_to)
                            {
                                let _ = client.publish_with_properties(
                                    topic,
                                    QoS::AtLeastOnce,
                                    false,
                                    bytes,
                                    props(Some(agent_topic.clone())),
                                );
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!("usp: broker connection: {e}; retrying in {backoff:?}");
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(Duration::from_secs(60));
                        }
                    }
                }
            }
        })?;
    Ok(())
}

/// One received Record: the answer's topic and bytes, or nothing (dropped or no answer).
fn serve(
    cfg: &MqttConfig,
    model: &Arc<Model>,
    codec: &dyn Codec,
    payload: &[u8],
    reply_to: Option<String>,
) -> Option<(String, Vec<u8>)> {
    let (env, msg_id, req) = match codec.decode(payload) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("usp: dropped a record: {e}");
            return None;
        }
    };
    if env.to_id != cfg.endpoint_id {
        tracing::warn!(
            "usp: dropped a record for {:?} (this agent is {:?})",
            env.to_id,
            cfg.endpoint_id
        );
        return None;
    }
    let Some(controller) = cfg
        .controllers
        .iter()
        .find(|c| c.endpoint_id == env.from_id)
    else {
        tracing::warn!(
            "usp: dropped a record from unknown controller {:?}",
            env.from_id
        );
        return None;
    };
    if let Incoming::Unsupported(what) = &req {
        tracing::debug!("usp: {what} from {}", env.from_id);
    }
    let out: Outgoing = model.handle(&env.from_id, controller.role, req)?;
    let back = Envelope {
        from_id: cfg.endpoint_id.clone(),
        to_id: env.from_id.clone(),
    };
    match codec.encode(&back, &msg_id, &out) {
        Ok(bytes) => Some((reply_to.unwrap_or_else(|| controller.topic.clone()), bytes)),
        Err(e) => {
            tracing::warn!("usp: cannot encode the answer: {e}");
            None
        }
    }
}
