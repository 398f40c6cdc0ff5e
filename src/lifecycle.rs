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
    /// A version just switched to (an update, a rollback) runs and its health check judges
    /// it: kept (running), or stopped to go back.
    Updating,
    Stopping,
    /// Stopped on request, or exited and not to be restarted.
    Stopped,
    /// Ended unexpectedly; waiting for its backoff before the next start.
    Backoff,
    /// Gave up: start failed or it kept crashing past its retry limit.
    Failed,
}

impl State {
    /// As the API writes it.
    pub fn name(self) -> &'static str {
        match self {
            State::Installed => "installed",
            State::Starting => "starting",
            State::Running => "running",
            State::Updating => "updating",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Backoff => "backoff",
            State::Failed => "failed",
        }
    }
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
    /// A version just switched to runs; its health check begins.
    Check,
    /// Its health check judged it (what follows, keep or go back, is the supervisor's).
    Judged,
    /// Its process was found running (a daemon restart, a stop that did not end it): it is
    /// watched as running, whatever was recorded.
    Adopted,
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
            (Starting | Running | Updating, Stop) => Stopping,
            (Backoff, Stop) => Stopped,
            (Stopping | Starting | Running | Updating, Exited) => Stopped,
            (Starting | Running | Updating, Crashed) => Backoff,
            (Backoff | Failed, Retry) => Starting,
            (Starting | Running | Updating | Stopping, GiveUp) => Failed,
            (Running, Check) => Updating,
            (Updating, Judged) => Running,
            (_, Adopted) => Running,
            (from, op) => return Err(InvalidTransition { from, op }),
        })
    }

    /// States in which the service's processes may exist.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            State::Starting | State::Running | State::Updating | State::Stopping
        )
    }

    /// Its program runs, started and not being stopped (its traffic goes through it, its
    /// usage is read, its hangs are watched).
    pub fn runs(self) -> bool {
        matches!(self, State::Running | State::Updating)
    }
}

/// How a service's run ended, as the restart policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    /// Its desired state is running.
    pub wanted: bool,
    /// It exited with code 0 (a failed start or a signal is not clean).
    pub clean: bool,
    /// How long it ran (0 for a failed start).
    pub ran: std::time::Duration,
    /// Restarts in a row before this end.
    pub failures_before: u32,
}

/// What the restart policy decides once a service ended or could not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It stays stopped: it ended cleanly where the policy lets it, or nobody wants it.
    StayStopped,
    /// The policy does not restart it after this failure (`never`).
    Fail,
    /// It failed more than `max_retries` times in a row.
    GiveUp,
    /// Started again after `delay`; `failures` in a row now.
    Retry {
        failures: u32,
        delay: std::time::Duration,
    },
}

/// The restart policy, as a pure function of the policy and how the run ended.
pub fn decide(policy: &crate::manifest::Restart, e: Ended) -> Decision {
    use crate::manifest::RestartPolicy;
    let retry = e.wanted
        && match policy.policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => !e.clean,
            RestartPolicy::Never => false,
        };
    if !retry {
        return if e.clean || !e.wanted {
            Decision::StayStopped
        } else {
            Decision::Fail
        };
    }
    // A stable run forgives the failures before it.
    let before = if e.ran.as_secs() >= policy.stable_after_s {
        0
    } else {
        e.failures_before
    };
    let failures = before + 1;
    if failures > policy.max_retries {
        return Decision::GiveUp;
    }
    Decision::Retry {
        failures,
        delay: crate::supervisor::backoff(
            policy.backoff_initial_ms,
            policy.backoff_max_ms,
            failures,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{Op::*, State::*, *};
    use crate::manifest::{Restart, RestartPolicy};
    use std::time::Duration;

    #[test]
    fn the_restart_policy_decides_as_this_table_says() {
        let policy = |p: RestartPolicy| Restart {
            policy: p,
            max_retries: 3,
            backoff_initial_ms: 100,
            backoff_max_ms: 1000,
            stable_after_s: 60,
        };
        let ended = |wanted, clean, ran_s, failures_before| Ended {
            wanted,
            clean,
            ran: Duration::from_secs(ran_s),
            failures_before,
        };
        let retry = |failures, ms| Decision::Retry {
            failures,
            delay: Duration::from_millis(ms),
        };
        use Decision::*;
        use RestartPolicy::*;
        let table = [
            // policy, wanted, clean, ran s, failures before -> decision
            (OnFailure, true, false, 1, 0, retry(1, 100)),
            (OnFailure, true, false, 1, 1, retry(2, 200)),
            (OnFailure, true, false, 1, 2, retry(3, 400)),
            (OnFailure, true, false, 1, 3, GiveUp),
            // a stable run forgives: the count starts again
            (OnFailure, true, false, 60, 3, retry(1, 100)),
            (OnFailure, true, true, 1, 2, StayStopped),
            (OnFailure, false, false, 1, 0, StayStopped),
            (Always, true, true, 1, 0, retry(1, 100)),
            (Always, true, false, 1, 3, GiveUp),
            (Always, false, true, 1, 0, StayStopped),
            (Never, true, false, 1, 0, Fail),
            (Never, true, true, 1, 0, StayStopped),
            (Never, false, false, 1, 0, StayStopped),
        ];
        for (p, wanted, clean, ran, before, want) in table {
            assert_eq!(
                decide(&policy(p), ended(wanted, clean, ran, before)),
                want,
                "{p:?} wanted={wanted} clean={clean} ran={ran}s before={before}"
            );
        }
        // The delay is capped.
        let mut p = policy(Always);
        p.max_retries = 100;
        assert_eq!(decide(&p, ended(true, false, 0, 20)), retry(21, 1000));
    }

    const ALL_STATES: [State; 8] = [
        Installed, Starting, Running, Updating, Stopping, Stopped, Backoff, Failed,
    ];
    const ALL_OPS: [Op; 10] = [
        Start, Started, Stop, Exited, Crashed, Retry, GiveUp, Check, Judged, Adopted,
    ];

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
            (Failed, Retry, Starting),
            (Starting, GiveUp, Failed),
            (Running, GiveUp, Failed),
            (Stopping, GiveUp, Failed),
            // A version switched to is judged by its health check, and may end meanwhile.
            (Running, Check, Updating),
            (Updating, Judged, Running),
            (Updating, Stop, Stopping),
            (Updating, Exited, Stopped),
            (Updating, Crashed, Backoff),
            (Updating, GiveUp, Failed),
            (Updating, Adopted, Running),
            // A process found running is running, whatever was recorded.
            (Installed, Adopted, Running),
            (Starting, Adopted, Running),
            (Running, Adopted, Running),
            (Stopping, Adopted, Running),
            (Stopped, Adopted, Running),
            (Backoff, Adopted, Running),
            (Failed, Adopted, Running),
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
