//! A service's lifecycle: one enum of states, one of operations, one transition function.
//! Policy (whether a crash is retried) is decided by the supervisor; the table only says which
//! moves exist.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Defined, never started.
    Installed,
    Starting,
    Running,
    Stopping,
    /// Stopped on request, or exited and not to be restarted.
    Stopped,
    /// Ended unexpectedly; waiting for its backoff before the next start.
    Backoff,
    /// Gave up: start failed or it kept crashing past its retry limit.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    Start,
    Started,
    Stop,
    /// The program ended after a stop request, or ended and the policy says stay stopped.
    Exited,
    /// The program ended unexpectedly and the policy says retry.
    Crashed,
    /// The backoff delay passed.
    Retry,
    /// The program ended (or failed to start) and the policy says give up.
    GiveUp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {from:?} service cannot {op:?}")]
pub struct InvalidTransition {
    pub from: State,
    pub op: Op,
}

impl State {
    pub fn apply(self, op: Op) -> Result<State, InvalidTransition> {
        use {Op::*, State::*};
        Ok(match (self, op) {
            (Installed | Stopped | Failed, Start) => Starting,
            (Starting, Started) => Running,
            (Starting | Running, Stop) => Stopping,
            (Backoff, Stop) => Stopped,
            (Stopping | Starting | Running, Exited) => Stopped,
            (Starting | Running, Crashed) => Backoff,
            (Backoff, Retry) => Starting,
            (Starting | Running | Stopping, GiveUp) => Failed,
            (from, op) => return Err(InvalidTransition { from, op }),
        })
    }

    /// States in which the service's processes may exist.
    pub fn is_active(self) -> bool {
        matches!(self, State::Starting | State::Running | State::Stopping)
    }
}

#[cfg(test)]
mod tests {
    use super::{Op::*, State::*, *};

    const ALL_STATES: [State; 7] = [
        Installed, Starting, Running, Stopping, Stopped, Backoff, Failed,
    ];
    const ALL_OPS: [Op; 7] = [Start, Started, Stop, Exited, Crashed, Retry, GiveUp];

    #[test]
    fn transition_table_is_exactly_this() {
        let allowed = [
            (Installed, Start, Starting),
            (Stopped, Start, Starting),
            (Failed, Start, Starting),
            (Starting, Started, Running),
            (Starting, Stop, Stopping),
            (Running, Stop, Stopping),
            (Backoff, Stop, Stopped),
            (Stopping, Exited, Stopped),
            (Starting, Exited, Stopped),
            (Running, Exited, Stopped),
            (Starting, Crashed, Backoff),
            (Running, Crashed, Backoff),
            (Backoff, Retry, Starting),
            (Starting, GiveUp, Failed),
            (Running, GiveUp, Failed),
            (Stopping, GiveUp, Failed),
        ];
        for s in ALL_STATES {
            for op in ALL_OPS {
                let want = allowed
                    .iter()
                    .find(|(f, o, _)| *f == s && *o == op)
                    .map(|(_, _, to)| *to);
                assert_eq!(s.apply(op).ok(), want, "{s:?} --{op:?}-->");
            }
        }
    }
}
