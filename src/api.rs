//! The control API: one request enum, one reply shape, shared by the CLI (Unix socket) and the
//! remote channel. Requests and replies are versioned JSON, one per line.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const API_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Ping,
    /// Installs the service described by a manifest file, or a signed package, on this
    /// gateway.
    Install {
        manifest: PathBuf,
        #[serde(default)]
        start: bool,
        /// Run it with this runtime (a USP `ExecutionEnvRef`, `--runtime`) instead of the one
        /// its manifest resolves to; its manifest must say that runtime or `auto`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        runtime: Option<crate::runtime::Kind>,
    },
    Start {
        name: String,
    },
    Stop {
        name: String,
    },
    Restart {
        name: String,
    },
    Remove {
        name: String,
    },
    /// Installs a new version from a signed package; rolls back by itself when the new version
    /// does not pass its health check.
    Update {
        name: String,
        package: PathBuf,
    },
    /// Goes back to the previous packaged version.
    Rollback {
        name: String,
    },
    Freeze {
        name: String,
    },
    Thaw {
        name: String,
    },
    List,
    Status {
        name: String,
    },
    /// Bytes of the service log from `offset` (None: the last `tail_bytes`).
    Logs {
        name: String,
        offset: Option<u64>,
        #[serde(default = "default_tail")]
        tail_bytes: u64,
    },
    /// The flows on the bridge, by owner (base pipeline or service), with counters.
    Flows,
    /// The service's declared settings with their values.
    ConfigGet {
        name: String,
    },
    /// Changes settings of a service (`NAME` → value as text), all or nothing; with
    /// `dry_run` only checks them.
    ConfigSet {
        name: String,
        values: BTreeMap<String, String>,
        #[serde(default)]
        dry_run: bool,
    },
    /// Recent events; with `follow` the connection stays open and new events stream.
    Events {
        #[serde(default)]
        follow: bool,
        #[serde(default = "default_events")]
        last: usize,
    },
}

fn default_tail() -> u64 {
    16 * 1024
}
fn default_events() -> usize {
    50
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub v: u32,
    #[serde(flatten)]
    pub body: T,
}

/// What went wrong, in a form scripts can branch on (it maps to the CLI's exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request or the manifest it names is invalid.
    Invalid,
    NotFound,
    /// The request conflicts with the current state (duplicate name, wrong state, no room).
    Conflict,
    /// The runtime failed (liblxc, the kernel).
    Runtime,
    Internal,
    /// The API version is not spoken here.
    Version,
    /// The gateway's policy does not grant what the package or manifest asks for (a
    /// capability, an image from a host path).
    Denied,
    /// A service of that name is installed already.
    Duplicate,
    /// The board has no room for it (its service count, its memory budget, the image store's
    /// limits).
    NoResources,
    /// A package whose signature cannot be trusted (unsigned, signed by a key the gateway
    /// does not trust or revoked, a manifest tampered with).
    Untrusted,
    /// A package that is not what it claims: not an archive, truncated, an artifact that is
    /// not what its signed manifest says.
    Corrupt,
}

impl ErrorKind {
    /// The CLI's exit code for this kind (documented in the README).
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Invalid | ErrorKind::Untrusted | ErrorKind::Corrupt => 5,
            ErrorKind::NotFound => 4,
            ErrorKind::Conflict | ErrorKind::Duplicate | ErrorKind::NoResources => 6,
            ErrorKind::Runtime | ErrorKind::Internal => 1,
            ErrorKind::Version => 7,
            ErrorKind::Denied => 8,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
        }
    }
}

/// An error with its causes, `outer: cause: cause`, for the one line a reply carries (a
/// cause already quoted by the message above it is not repeated).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !s.is_empty() && !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cur = c.source();
    }
    text
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Reply {
    Ok { result: serde_json::Value },
    Error { error: ApiError },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format_is_tagged_and_versioned() {
        let e = Envelope {
            v: API_VERSION,
            body: Request::Start {
                name: "hello".into(),
            },
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"v":1,"op":"start","name":"hello"}"#);
        let back: Envelope<Request> = serde_json::from_str(&s).unwrap();
        assert_eq!(back.body, e.body);
    }

    #[test]
    fn unknown_op_is_rejected() {
        assert!(
            serde_json::from_str::<Envelope<Request>>(r#"{"v":1,"op":"format-disk"}"#).is_err()
        );
    }
}
