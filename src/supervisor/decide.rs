//! The supervisor's decisions that are not a lifecycle transition, as pure functions of what
//! the loop knows about a service and what happened: whether a running service is hung,
//! what a port that left the bridge calls for, what a health probe says, and what follows a
//! version switch's health check. The loop gathers the facts and carries the decisions out;
//! the tables below are the tests. (Exits are decided by [`crate::lifecycle::decide`],
//! adoption by `adopt::adoption`.)

use std::time::Duration;

use crate::lifecycle::State;

/// What the loop knows of a running service's liveness at one heartbeat check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Liveness {
    /// `network.heartbeat_timeout_ms`: the service must speak at least this often.
    pub heartbeat_timeout_ms: Option<u64>,
    /// Since this daemon expects its heartbeat (started or adopted); `None` once it was
    /// killed as hung (it is not judged again until it runs anew).
    pub expected_for_ms: Option<u64>,
    /// How long it has been silent on its verdict socket (capped by `expected_for_ms`).
    pub silent_ms: u64,
    /// It spoke at least once since its start.
    pub spoke_since_start: bool,
    /// A microVM boots a kernel before its service can speak.
    pub microvm: bool,
    /// How long it has run.
    pub running_for_ms: u64,
    /// `ready = "notify"` and it has not said ready since its start.
    pub awaits_ready: bool,
}

/// Whether the service is hung, and why: silent past its heartbeat timeout (a booting
/// microVM's first word is awaited for up to `boot_grace`), or a `notify` service that
/// never said ready within the start timeout (plus a microVM's boot grace).
pub(super) fn hung(l: &Liveness, start_timeout: Duration, boot_grace: Duration) -> Option<String> {
    let expected_for_ms = l.expected_for_ms?;
    if let Some(timeout) = l.heartbeat_timeout_ms {
        let booting = l.microvm && !l.spoke_since_start && expected_for_ms < ms(boot_grace);
        if l.silent_ms.min(expected_for_ms) > timeout && !booting {
            return Some(format!(
                "no heartbeat on its verdict socket for {timeout} ms"
            ));
        }
    }
    if l.awaits_ready {
        let grace = start_timeout
            + if l.microvm {
                boot_grace
            } else {
                Duration::ZERO
            };
        if l.running_for_ms > ms(grace) {
            return Some(format!("it never said ready within {} ms", ms(grace)));
        }
    }
    None
}

/// In how many ms [`hung`] says yes by the heartbeat if the service stays silent (0: now);
/// `None` when no heartbeat is expected of it. The loop checks again then, not a second
/// later.
pub(super) fn heartbeat_due_ms(l: &Liveness, boot_grace: Duration) -> Option<u64> {
    let expected_for_ms = l.expected_for_ms?;
    let timeout = l.heartbeat_timeout_ms?;
    let silent = l.silent_ms.min(expected_for_ms);
    let mut due = (timeout + 1).saturating_sub(silent);
    if l.microvm && !l.spoke_since_start {
        due = due.max(ms(boot_grace).saturating_sub(expected_for_ms));
    }
    Some(due)
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// What a port that vanished from the bridge (or broke) calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PortLost {
    /// Plug it again (unplug first: its flows go with the old port).
    Replug,
    /// Nothing, because of this.
    Leave(&'static str),
}

/// `state`: the service's recorded state (`None`: no service has this port); `runs`: its
/// backend finds its main process; `replugged_ago`: when it was last plugged again.
pub(super) fn port_lost(
    state: Option<State>,
    runs: bool,
    replugged_ago: Option<Duration>,
) -> PortLost {
    match state {
        None => PortLost::Leave("no service has this port"),
        Some(s) if s.runs() && !runs => PortLost::Leave("it just ended: its exit is being handled"),
        // A dying service's interface vanishes too: plugging it again would only break
        // again, so at most once per REPLUG_EVERY.
        Some(s) if s.runs() && replugged_ago.is_some_and(|t| t < REPLUG_EVERY) => {
            PortLost::Leave("it was plugged again moments ago")
        }
        Some(s) if s.runs() => PortLost::Replug,
        Some(_) => PortLost::Leave("it does not run: the supervisor unplugged it"),
    }
}

/// A lost port is plugged again at most this often.
pub(super) const REPLUG_EVERY: Duration = Duration::from_secs(5);

/// Which probe a health check runs (`[health]` in the manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Probe {
    /// A command inside the service; healthy when it exits with 0.
    Exec(Vec<String>),
    /// The service spoke on its verdict socket since its start.
    VerdictPing,
    /// Something inside the service accepts on this TCP port.
    Tcp(u16),
    /// No check: it still runs a second after its start.
    Settled,
}

pub(super) fn probe_of(h: &crate::manifest::Health) -> Probe {
    if let Some(cmd) = &h.exec {
        Probe::Exec(cmd.clone())
    } else if h.verdict_ping {
        Probe::VerdictPing
    } else if let Some(port) = h.tcp_port {
        Probe::Tcp(port)
    } else {
        Probe::Settled
    }
}

/// What one round of a health check saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seen {
    NotRunning,
    /// The probe's command exited with this code, or could not be run (why).
    Exited(std::result::Result<i32, String>),
    /// Whether it spoke, accepted, or had run a second: as the probe asks.
    Answered(bool),
}

/// One round of a health check: passed, or why not (the last reason is the check's
/// failure when its deadline passes).
pub(super) fn probe_passed(probe: &Probe, seen: Seen) -> std::result::Result<(), String> {
    match (probe, seen) {
        (_, Seen::NotRunning) => Err("it is not running".into()),
        (_, Seen::Exited(Ok(0))) => Ok(()),
        (_, Seen::Exited(Ok(code))) => Err(format!("health command exited with {code}")),
        (_, Seen::Exited(Err(why))) => Err(why),
        (_, Seen::Answered(true)) => Ok(()),
        (Probe::VerdictPing, Seen::Answered(false)) => {
            Err("it did not speak on its verdict socket".into())
        }
        (Probe::Tcp(port), Seen::Answered(false)) => {
            Err(format!("nothing accepts on TCP port {port} inside it"))
        }
        (_, Seen::Answered(false)) => Err("it has not run for a second yet".into()),
    }
}

/// Why a version switch was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SwitchKind {
    Update,
    Rollback,
    /// Back to the version that worked, after a failed update.
    Restore,
}

/// What follows a switch's health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterCheck {
    /// Keep the version switched to; the request succeeded.
    Keep,
    /// Switch back to the previous version; the request fails once that is done.
    GoBack,
    /// Stay where it is; the request fails.
    Fail,
}

pub(super) fn after_check(kind: SwitchKind, healthy: bool) -> AfterCheck {
    match (kind, healthy) {
        (SwitchKind::Update | SwitchKind::Rollback, true) => AfterCheck::Keep,
        (SwitchKind::Update, false) => AfterCheck::GoBack,
        // A rollback by hand that fails stays failed (there is no version to go back to
        // that is known to work), and so does a restore that fails: nothing switches back
        // and forth.
        (SwitchKind::Rollback, false) => AfterCheck::Fail,
        // A restore answers the update that failed: its request fails whatever the
        // restore's own check says.
        (SwitchKind::Restore, _) => AfterCheck::Fail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: Duration = Duration::from_secs(30);
    const BOOT: Duration = Duration::from_secs(20);

    fn live() -> Liveness {
        Liveness {
            heartbeat_timeout_ms: Some(1000),
            expected_for_ms: Some(60_000),
            silent_ms: 0,
            spoke_since_start: true,
            microvm: false,
            running_for_ms: 60_000,
            awaits_ready: false,
        }
    }

    #[test]
    fn a_running_service_is_hung_as_this_table_says() {
        let hb = Some("no heartbeat on its verdict socket for 1000 ms");
        let never_ready = |g: u64| format!("it never said ready within {g} ms");
        #[rustfmt::skip]
        let table: Vec<(&str, Liveness, Option<String>)> = vec![
            ("speaks in time", Liveness { silent_ms: 999, ..live() }, None),
            ("silent at the limit", Liveness { silent_ms: 1000, ..live() }, None),
            ("silent past it", Liveness { silent_ms: 1001, ..live() }, hb.map(Into::into)),
            ("no heartbeat asked for", Liveness { heartbeat_timeout_ms: None, silent_ms: 99_999, ..live() }, None),
            ("already killed as hung", Liveness { expected_for_ms: None, silent_ms: 99_999, ..live() }, None),
            // Silence counts from when this daemon started listening (an adopted service).
            ("adopted 500 ms ago", Liveness { expected_for_ms: Some(500), silent_ms: 99_999, ..live() }, None),
            ("a container never spoke", Liveness { expected_for_ms: Some(5000), silent_ms: 5000, spoke_since_start: false, ..live() }, hb.map(Into::into)),
            // A booting microVM (the hang that was wrongly not restarted is the fake's test).
            ("a microVM boots", Liveness { microvm: true, expected_for_ms: Some(5000), silent_ms: 5000, spoke_since_start: false, ..live() }, None),
            ("a microVM past its boot grace", Liveness { microvm: true, expected_for_ms: Some(20_001), silent_ms: 20_001, spoke_since_start: false, ..live() }, hb.map(Into::into)),
            ("a microVM that spoke, then went silent", Liveness { microvm: true, expected_for_ms: Some(5000), silent_ms: 1001, ..live() }, hb.map(Into::into)),
            ("notify: not ready yet, in time", Liveness { awaits_ready: true, running_for_ms: 30_000, ..live() }, None),
            ("notify: never said ready", Liveness { awaits_ready: true, running_for_ms: 30_001, ..live() }, Some(never_ready(30_000))),
            ("notify: a microVM gets its boot grace", Liveness { microvm: true, awaits_ready: true, running_for_ms: 30_001, ..live() }, None),
            ("notify: a microVM past both", Liveness { microvm: true, awaits_ready: true, running_for_ms: 50_001, ..live() }, Some(never_ready(50_000))),
            ("notify: already killed", Liveness { expected_for_ms: None, awaits_ready: true, running_for_ms: 99_999, ..live() }, None),
        ];
        for (case, l, want) in table {
            assert_eq!(hung(&l, START, BOOT), want, "{case}");
        }
    }

    /// The loop wakes when the heartbeat says hung, not a check interval later: a silent
    /// service is hung exactly `heartbeat_due_ms` on, and not a millisecond before.
    #[test]
    fn the_heartbeat_is_checked_again_when_its_timeout_runs_out() {
        let hb_only = |l: Liveness| Liveness {
            awaits_ready: false,
            ..l
        };
        #[rustfmt::skip]
        let cases = [
            ("spoke just now", Liveness { silent_ms: 0, ..live() }, 1001),
            ("silent 400 ms", Liveness { silent_ms: 400, ..live() }, 601),
            ("adopted 200 ms ago", Liveness { expected_for_ms: Some(200), silent_ms: 99_999, ..live() }, 801),
            ("a booting microVM", Liveness { microvm: true, expected_for_ms: Some(5000), silent_ms: 5000, spoke_since_start: false, ..live() }, 15_000),
            ("a microVM that spoke", Liveness { microvm: true, expected_for_ms: Some(5000), silent_ms: 300, ..live() }, 701),
            ("already past", Liveness { silent_ms: 1500, ..live() }, 0),
        ];
        for (case, l, want) in cases {
            let l = hb_only(l);
            let due = heartbeat_due_ms(&l, BOOT).expect(case);
            assert_eq!(due, want, "{case}");
            // Silent `t` ms more (and expected as long).
            let later = |t: u64| Liveness {
                silent_ms: l.silent_ms + t,
                expected_for_ms: l.expected_for_ms.map(|e| e + t),
                ..l
            };
            assert!(
                hung(&later(due), START, BOOT).is_some(),
                "{case}: hung at {due}"
            );
            if due > 0 {
                assert!(
                    hung(&later(due - 1), START, BOOT).is_none(),
                    "{case}: not before"
                );
            }
        }
        let none = Liveness {
            heartbeat_timeout_ms: None,
            ..live()
        };
        assert_eq!(heartbeat_due_ms(&none, BOOT), None);
        let killed = Liveness {
            expected_for_ms: None,
            ..live()
        };
        assert_eq!(heartbeat_due_ms(&killed, BOOT), None);
    }

    #[test]
    fn a_lost_port_is_plugged_again_as_this_table_says() {
        let s = Duration::from_secs;
        let table = [
            (
                None,
                true,
                None,
                PortLost::Leave("no service has this port"),
            ),
            (Some(State::Running), true, None, PortLost::Replug),
            (Some(State::Running), true, Some(s(6)), PortLost::Replug),
            // A version under its health check is plugged like any running service.
            (Some(State::Updating), true, None, PortLost::Replug),
            (
                Some(State::Running),
                true,
                Some(s(1)),
                PortLost::Leave("it was plugged again moments ago"),
            ),
            (
                Some(State::Running),
                false,
                None,
                PortLost::Leave("it just ended: its exit is being handled"),
            ),
            (
                Some(State::Stopping),
                true,
                None,
                PortLost::Leave("it does not run: the supervisor unplugged it"),
            ),
            (
                Some(State::Stopped),
                false,
                None,
                PortLost::Leave("it does not run: the supervisor unplugged it"),
            ),
            (
                Some(State::Backoff),
                false,
                None,
                PortLost::Leave("it does not run: the supervisor unplugged it"),
            ),
        ];
        for (state, runs, ago, want) in table {
            assert_eq!(
                port_lost(state, runs, ago),
                want,
                "{state:?} {runs} {ago:?}"
            );
        }
    }

    #[test]
    fn a_health_probe_passes_as_this_table_says() {
        let h = |exec: Option<&str>, ping: bool, tcp: Option<u16>| crate::manifest::Health {
            exec: exec.map(|c| vec![c.to_string()]),
            verdict_ping: ping,
            tcp_port: tcp,
            ..Default::default()
        };
        // The manifest's probe, the first that is set.
        assert_eq!(
            probe_of(&h(Some("/bin/check"), true, Some(80))),
            Probe::Exec(vec!["/bin/check".into()])
        );
        assert_eq!(probe_of(&h(None, true, Some(80))), Probe::VerdictPing);
        assert_eq!(probe_of(&h(None, false, Some(80))), Probe::Tcp(80));
        assert_eq!(probe_of(&h(None, false, None)), Probe::Settled);

        let exec = Probe::Exec(vec!["/bin/check".into()]);
        let table: Vec<(&Probe, Seen, std::result::Result<(), &str>)> = vec![
            (&exec, Seen::NotRunning, Err("it is not running")),
            (&exec, Seen::Exited(Ok(0)), Ok(())),
            (
                &exec,
                Seen::Exited(Ok(3)),
                Err("health command exited with 3"),
            ),
            (
                &exec,
                Seen::Exited(Err("no such file".into())),
                Err("no such file"),
            ),
            (&Probe::VerdictPing, Seen::Answered(true), Ok(())),
            (
                &Probe::VerdictPing,
                Seen::Answered(false),
                Err("it did not speak on its verdict socket"),
            ),
            (&Probe::Tcp(80), Seen::Answered(true), Ok(())),
            (
                &Probe::Tcp(80),
                Seen::Answered(false),
                Err("nothing accepts on TCP port 80 inside it"),
            ),
            (&Probe::Settled, Seen::Answered(true), Ok(())),
            (&Probe::Settled, Seen::NotRunning, Err("it is not running")),
        ];
        for (probe, seen, want) in table {
            let case = format!("{probe:?} {seen:?}");
            assert_eq!(
                probe_passed(probe, seen),
                want.map_err(String::from),
                "{case}"
            );
        }
    }

    #[test]
    fn what_follows_a_health_check_is_this_table() {
        use AfterCheck::*;
        use SwitchKind::*;
        let table = [
            (Update, true, Keep),
            (Update, false, GoBack),
            (Rollback, true, Keep),
            (Rollback, false, Fail),
            (Restore, true, Fail),
            (Restore, false, Fail),
        ];
        for (kind, healthy, want) in table {
            assert_eq!(after_check(kind, healthy), want, "{kind:?} {healthy}");
        }
    }
}
