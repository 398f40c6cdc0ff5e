//! The client side of the control socket, used by the CLI.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::api::{ApiError, Envelope, Reply, Request, API_VERSION};
use crate::events::Event;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the gatevisor daemon is not running (no answer on {socket}); start it with `gatevisor daemon` or `systemctl start gatevisor`")]
    NotRunning {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("permission denied on the daemon's socket {socket} (the control socket is root's: run as root or with sudo)")]
    PermissionDenied {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lost the connection to the daemon")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent a reply this CLI does not understand: {0}")]
    BadReply(String),
    #[error("{0}")]
    Api(ApiError),
}

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    fn send(&self, req: &Request) -> Result<BufReader<UnixStream>, ClientError> {
        let mut s = UnixStream::connect(&self.socket).map_err(|source| {
            if source.kind() == std::io::ErrorKind::PermissionDenied {
                ClientError::PermissionDenied {
                    socket: self.socket.clone(),
                    source,
                }
            } else {
                ClientError::NotRunning {
                    socket: self.socket.clone(),
                    source,
                }
            }
        })?;
        let mut line = serde_json::to_vec(&Envelope {
            v: API_VERSION,
            body: req,
        })
        .expect("serialises");
        line.push(b'\n');
        s.write_all(&line)?;
        Ok(BufReader::new(s))
    }

    fn read_reply(r: &mut BufReader<UnixStream>) -> Result<serde_json::Value, ClientError> {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let env: Envelope<Reply> = serde_json::from_str(&line)
            .map_err(|e| ClientError::BadReply(format!("{e}: {line}")))?;
        match env.body {
            Reply::Ok { result } => Ok(result),
            Reply::Error { error } => Err(ClientError::Api(error)),
        }
    }

    pub fn call(&self, req: &Request) -> Result<serde_json::Value, ClientError> {
        let mut r = self.send(req)?;
        Client::read_reply(&mut r)
    }

    /// [`Self::call`], its result read as `T` (another shape is an `internal` error).
    pub fn call_as<T: serde::de::DeserializeOwned>(&self, req: &Request) -> Result<T, ClientError> {
        crate::api::result_as(self.call(req)?).map_err(ClientError::Api)
    }

    /// `events` with follow: the past events, then `on_event` for each new one until it
    /// returns false or the daemon goes away.
    pub fn follow_events(
        &self,
        last: usize,
        mut on_event: impl FnMut(&Event) -> bool,
    ) -> Result<(), ClientError> {
        let mut r = self.send(&Request::Events { follow: true, last })?;
        let past: crate::api::Events =
            crate::api::result_as(Client::read_reply(&mut r)?).map_err(ClientError::Api)?;
        for ev in &past.events {
            if !on_event(ev) {
                return Ok(());
            }
        }
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let env: Envelope<Event> =
                serde_json::from_str(&line).map_err(|e| ClientError::BadReply(e.to_string()))?;
            if !on_event(&env.body) {
                return Ok(());
            }
        }
    }
}
