//! The event log: one JSON object per line in `events.jsonl`, rotated to `events.jsonl.1` when it
//! passes its size limit, and streamed to followers (`gatevisor events -f`).

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    Installed,
    Started,
    Exited,
    Restarted,
    Stopped,
    Failed,
    Adopted,
    Removed,
    DaemonStarted,
    DaemonStopping,
    NetworkRestored,
    /// Open vSwitch stopped answering (or one of its daemons ended): it is being restored.
    NetworkLost,
    /// A service stopped sending its heartbeat.
    Hung,
    /// A `ready = "notify"` service said it is ready: its traffic is steered to it.
    Ready,
    Updated,
    RolledBack,
    /// An install or update was refused (the detail says why).
    Refused,
    /// The operator changed a service's settings (the detail names them).
    Configured,
    /// A service made a host call (the detail: the call, its result and duration);
    /// rate-limited per service, with the number left out said in the next one.
    HostCall,
    /// An OCI image was pulled into the image store, or removed from it.
    ImagePulled,
    ImageRemoved,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: u64,
    pub kind: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub detail: String,
}

pub struct EventLog {
    path: PathBuf,
    max_bytes: u64,
    followers: Vec<Sender<Event>>,
}

impl EventLog {
    pub fn new(dir: &Path, max_bytes: u64) -> EventLog {
        EventLog {
            path: dir.join("events.jsonl"),
            max_bytes,
            followers: Vec::new(),
        }
    }

    pub fn record(&mut self, event: Event) {
        tracing::info!(kind = ?event.kind, service = ?event.service, "{}", event.detail);
        let mut line = serde_json::to_vec(&event).expect("event serialises");
        line.push(b'\n');
        let size = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if size + line.len() as u64 > self.max_bytes {
            let _ = std::fs::rename(&self.path, self.path.with_extension("jsonl.1"));
        }
        let res = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(&line));
        if let Err(e) = res {
            tracing::warn!("cannot append to {}: {e}", self.path.display());
        }
        self.followers.retain(|tx| tx.send(event.clone()).is_ok());
    }

    pub fn follow(&mut self, tx: Sender<Event>) {
        self.followers.push(tx);
    }

    /// The last `n` events, oldest first (reads the rotated file too when needed).
    pub fn last(&self, n: usize) -> Vec<Event> {
        let mut lines: Vec<String> = Vec::new();
        for p in [self.path.with_extension("jsonl.1"), self.path.clone()] {
            if let Ok(text) = std::fs::read_to_string(&p) {
                lines.extend(text.lines().map(str::to_string));
            }
        }
        let start = lines.len().saturating_sub(n);
        lines[start..]
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: i32) -> Event {
        Event {
            at_ms: i as u64,
            kind: EventKind::Exited,
            service: Some("s".into()),
            code: Some(i),
            signal: None,
            detail: "x".repeat(40),
        }
    }

    #[test]
    fn log_rotates_and_last_reads_across_files() {
        let d = tempfile::tempdir().unwrap();
        let mut log = EventLog::new(d.path(), 1000);
        for i in 0..30 {
            log.record(ev(i));
        }
        assert!(
            std::fs::metadata(d.path().join("events.jsonl"))
                .unwrap()
                .len()
                <= 1000
        );
        let last = log.last(3);
        assert_eq!(
            last.iter().map(|e| e.code.unwrap()).collect::<Vec<_>>(),
            [27, 28, 29]
        );
    }

    #[test]
    fn followers_receive_new_events_and_dead_ones_are_dropped() {
        let d = tempfile::tempdir().unwrap();
        let mut log = EventLog::new(d.path(), 1 << 20);
        let (tx, rx) = std::sync::mpsc::channel();
        log.follow(tx);
        let (tx2, rx2) = std::sync::mpsc::channel();
        log.follow(tx2);
        drop(rx2);
        log.record(ev(1));
        assert_eq!(rx.try_recv().unwrap().code, Some(1));
        assert_eq!(log.followers.len(), 1);
    }
}
