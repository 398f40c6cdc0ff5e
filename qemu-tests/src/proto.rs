//! The control channel between the harness and `gateway-agent` inside the emulated gateway:
//! one JSON object per line over a virtio-serial port. The agent greets with [`Hello`] each
//! time it starts (so a reboot is seen), then answers each [`Request`] with one [`Reply`].

use serde::{Deserialize, Serialize};

/// The agent's first line after it starts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    /// `/proc/sys/kernel/random/boot_id`: changes with every boot of the gateway.
    pub boot_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// `sh -c cmd`, killed (its whole process group) after `timeout_ms`.
    Run { cmd: String, timeout_ms: u64 },
    /// Writes a file (hex `data`) with `mode`, creating its folder.
    Put {
        path: String,
        mode: u32,
        data: String,
    },
    /// Reads a file; the reply's `stdout` carries its bytes as hex.
    Get { path: String },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    /// Exit code of `run`; 0 for a successful `put`/`get`.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    /// The agent could not do what was asked (not the command's own failure).
    pub error: Option<String>,
}

/// One line from the agent: a greeting or a reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FromAgent {
    Hello { hello: Hello },
    Reply(Reply),
}
