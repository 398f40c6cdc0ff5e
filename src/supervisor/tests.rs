//! The supervisor's reconciling, driven through its message handler with fake runtimes
//! ([`crate::runtime::fake`]): real child processes stand in for containers and microVMs, so
//! watchers, pidfds, exits and restarts run for real while each test decides how its service
//! misbehaves. Every case runs for both runtime kinds: the supervisor must not care which.

use super::*;
use crate::runtime::fake::{Behaviour, Fake};
use std::sync::{mpsc, Arc};

struct Harness {
    sup: Supervisor,
    rx: Receiver<Msg>,
    tx: Sender<Msg>,
    fakes: Backends,
    lxc: Arc<Fake>,
    vm: Arc<Fake>,
    dir: tempfile::TempDir,
}

fn settings(dir: &Path) -> Settings {
    Settings {
        state_dir: dir.join("state"),
        stop_services_on_exit: false,
        log_max_bytes: 1 << 16,
        log_keep: 1,
        events_max_bytes: 1 << 20,
        start_timeout: Duration::from_secs(5),
        failed_retry: Some(FAILED_RETRY),
        monitor: lxc::MonitorCommand {
            program: "/bin/false".into(),
            args: vec![],
        },
        busybox: gatevisor_board::ovs::find_sbin("busybox")
            .unwrap_or_else(|| PathBuf::from("/bin/busybox")),
        network: false,
        bridge: None,
        keys_dir: dir.join("keys"),
        policy: crate::policy::Policy::new(&Default::default(), "generic-x86_64").unwrap(),
        image_roots: vec![],
        registries: Default::default(),
    }
}

/// The slow retry of a service that gave up, in these tests.
const FAILED_RETRY: Duration = Duration::from_millis(700);

fn board() -> BoardReport {
    let all = gatevisor_board::profile::load_all(None).unwrap();
    let p = gatevisor_board::profile::select(&all, Some("generic-x86_64"), None).unwrap();
    BoardReport::probe(p)
}

/// A supervisor on a fresh state directory with fake runtimes; `None` (with the reason
/// printed) where the test cannot run.
fn harness(test: &str) -> Option<Harness> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped {test}: needs root (an installed container's rootfs is owned by its user namespace's ids)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = mpsc::channel();
    let mut sup = Supervisor::new(settings(dir.path()), board(), tx.clone()).unwrap();
    let lxc = Arc::new(Fake::new(Kind::Lxc));
    let vm = Arc::new(Fake::new(Kind::Microvm));
    let fakes = Backends {
        lxc: lxc.clone(),
        microvm: vm.clone(),
    };
    sup.set_backends(fakes.clone());
    Some(Harness {
        sup,
        rx,
        tx,
        fakes,
        lxc,
        vm,
        dir,
    })
}

impl Drop for Harness {
    /// A packaged container's root is an overlay: off before the directory goes.
    fn drop(&mut self) {
        let services = self.sup.settings.state_dir.join("services");
        for e in std::fs::read_dir(services).into_iter().flatten().flatten() {
            let _ = gatevisor_images::checkout::Checkout::at(&e.path()).unmount();
        }
    }
}

impl Harness {
    fn fake(&self, kind: Kind) -> &Fake {
        match kind {
            Kind::Lxc => &self.lxc,
            Kind::Microvm => &self.vm,
        }
    }

    /// Installs (not started) a busybox service `name` that runs with `kind`'s backend.
    fn install(&mut self, name: &str, kind: Kind, extra: &str) {
        let file = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &file,
            format!(
                "name = \"{name}\"\nversion = \"1.0.0\"\nruntime = \"lxc\"\nimage = \"builtin:busybox\"\n\
                 command = [\"/bin/sh\"]\nstop_timeout_s = 1\n{extra}\n[resources]\nmemory_mib = 32\n"
            ),
        )
        .unwrap();
        self.request(Request::Install {
            manifest: file,
            start: false,
            runtime: None,
        })
        .unwrap();
        // A microVM's definition needs KVM and a kernel; what is tested here is what the
        // supervisor does with a record of that kind, from its first start on.
        assert!(self.lxc.calls().contains(&format!("prepare {name}")));
        self.lxc.forget_calls(name);
        let rec = self.sup.record_mut(name).unwrap();
        rec.plan = Plan::resolve(
            &rec.manifest,
            kind,
            rec.plan.root.clone(),
            rec.plan.idmap_base,
        );
    }

    /// Sends `req` as the API server does and serves the loop until it is answered.
    fn request(&mut self, req: Request) -> Result<serde_json::Value> {
        let reply = self.send(req);
        self.answer(reply)
    }

    /// Sends `req` without waiting for its answer.
    fn send(&mut self, req: Request) -> Receiver<Reply> {
        let (tx, rx) = mpsc::channel();
        assert!(self.sup.dispatch(Msg::Request(req, tx)));
        rx
    }

    /// Serves the loop until `reply` is answered.
    fn answer(&mut self, reply: Receiver<Reply>) -> Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match reply.try_recv() {
                Ok(Reply::Ok { result }) => return Ok(result),
                Ok(Reply::Error { error }) => return Err(error),
                Err(mpsc::TryRecvError::Disconnected) => panic!("the request was dropped"),
                Err(mpsc::TryRecvError::Empty) => {}
            }
            assert!(Instant::now() < deadline, "no answer in 30 s");
            self.serve_once();
        }
    }

    /// One turn of the loop: a message (if one comes within 20 ms), then the timers.
    fn serve_once(&mut self) {
        if let Ok(msg) = self.rx.recv_timeout(Duration::from_millis(20)) {
            assert!(self.sup.dispatch(msg));
        }
        self.sup.fire_timers();
        self.sup.check_heartbeats();
    }

    fn rec(&self, name: &str) -> &ServiceRecord {
        self.sup.record(name).unwrap()
    }

    /// Serves messages and timers as the loop does until `done` holds (or panics after
    /// `timeout`).
    fn pump_until(&mut self, timeout: Duration, what: &str, done: impl Fn(&Supervisor) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(&self.sup) {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            self.serve_once();
        }
    }

    fn state(&self, name: &str) -> State {
        self.rec(name).state
    }

    /// A new supervisor on the same state directory and runtimes (a daemon restart).
    fn restart_daemon(&mut self) {
        let (tx, rx) = mpsc::channel();
        let mut sup = Supervisor::new(settings(self.dir.path()), board(), tx.clone()).unwrap();
        sup.set_backends(self.fakes.clone());
        let old = std::mem::replace(&mut self.sup, sup);
        drop(old);
        self.rx = rx;
        self.tx = tx;
        self.sup.adopt_all();
    }
}

const KINDS: [Kind; 2] = [Kind::Lxc, Kind::Microvm];

/// `prefix-lxc` or `prefix-vm` (service names are at most 12 characters).
fn named(prefix: &str, kind: Kind) -> String {
    match kind {
        Kind::Lxc => format!("{prefix}-lxc"),
        Kind::Microvm => format!("{prefix}-vm"),
    }
}

fn on_failure(max_retries: u32) -> String {
    format!(
        "[restart]\npolicy = \"on-failure\"\nmax_retries = {max_retries}\nbackoff_initial_ms = 50\nbackoff_max_ms = 100\nstable_after_s = 60\n"
    )
}

#[test]
fn a_crashed_service_is_restarted_by_its_own_backend() {
    let Some(mut h) = harness("a_crashed_service_is_restarted_by_its_own_backend") else {
        return;
    };
    for kind in KINDS {
        let name = named("crash", kind);
        h.install(&name, kind, &on_failure(5));
        h.fake(kind).set(
            &name,
            Behaviour {
                exits_after: Some((Duration::from_millis(200), 3)),
                ..Default::default()
            },
        );
        h.request(Request::Start { name: name.clone() }).unwrap();
        assert_eq!(h.state(&name), State::Running);
        h.pump_until(Duration::from_secs(10), "a restart", |s| {
            let r = s.record(&name).unwrap();
            r.restarts >= 1 && r.state == State::Running
        });
        let rec = h.rec(&name);
        assert_eq!(rec.last_exit.as_ref().unwrap().code, Some(3), "{kind}");
        let starts = h
            .fake(kind)
            .calls()
            .iter()
            .filter(|c| **c == format!("start {name}"))
            .count();
        assert!(starts >= 2, "{kind}: {:?}", h.fake(kind).calls());
        h.request(Request::Stop { name: name.clone() }).unwrap();
        assert_eq!(h.state(&name), State::Stopped);
    }
    // Neither backend was asked to run the other's service.
    assert!(h.lxc.calls().iter().all(|c| c.ends_with("-lxc")));
    assert!(h.vm.calls().iter().all(|c| c.ends_with("-vm")));
}

#[test]
fn a_service_that_cannot_start_backs_off_then_fails_with_the_reason() {
    let Some(mut h) = harness("a_service_that_cannot_start_backs_off_then_fails_with_the_reason")
    else {
        return;
    };
    for kind in KINDS {
        let name = named("nostart", kind);
        h.install(&name, kind, &on_failure(2));
        h.fake(kind).set(
            &name,
            Behaviour {
                start_error: Some("no such kernel".into()),
                ..Default::default()
            },
        );
        let e = h
            .request(Request::Start { name: name.clone() })
            .unwrap_err();
        assert!(e.message.contains("no such kernel"), "{}", e.message);
        assert!(matches!(h.state(&name), State::Backoff | State::Starting));
        h.pump_until(Duration::from_secs(10), "giving up", |s| {
            s.record(&name).unwrap().state == State::Failed
        });
        let rec = h.rec(&name);
        let why = rec.failure_reason.clone().unwrap();
        assert!(
            why.contains("no such kernel") && why.contains("gave up after 2"),
            "{why}"
        );
        assert_eq!(
            h.fake(kind).calls().len(),
            3,
            "{kind}: first start and two retries"
        );
        assert!(why.contains("trying again in"), "{why}");
        // Tried again later (slowly), and again after each give-up; a start that works
        // then brings it back.
        h.pump_until(Duration::from_secs(10), "the slow retry", |s| {
            s.record(&name).unwrap().state != State::Failed
        });
        h.pump_until(Duration::from_secs(10), "failed again", |s| {
            s.record(&name).unwrap().state == State::Failed
        });
        assert_eq!(h.fake(kind).calls().len(), 4, "{kind}: one slow retry");
        h.fake(kind).set(&name, Behaviour::default());
        h.pump_until(Duration::from_secs(10), "running after a slow retry", |s| {
            s.record(&name).unwrap().state == State::Running
        });
        let events = h.sup.events.last(50);
        assert!(
            events
                .iter()
                .any(|e| e.kind == EventKind::Restarted
                    && e.service.as_deref() == Some(name.as_str()))
        );
        h.request(Request::Stop { name: name.clone() }).unwrap();
    }
}

#[test]
fn a_failed_service_that_was_stopped_is_not_retried() {
    let Some(mut h) = harness("a_failed_service_that_was_stopped_is_not_retried") else {
        return;
    };
    for kind in KINDS {
        let name = named("nostop", kind);
        h.install(&name, kind, &on_failure(0));
        h.fake(kind).set(
            &name,
            Behaviour {
                start_error: Some("broken".into()),
                ..Default::default()
            },
        );
        let _ = h.request(Request::Start { name: name.clone() });
        h.pump_until(Duration::from_secs(10), "giving up", |s| {
            s.record(&name).unwrap().state == State::Failed
        });
        let _ = h.request(Request::Stop { name: name.clone() });
        let t = Instant::now();
        while t.elapsed() < FAILED_RETRY * 2 {
            h.serve_once();
        }
        assert_eq!(
            h.fake(kind).calls().len(),
            1,
            "{kind}: {:?}",
            h.fake(kind).calls()
        );
    }
}

#[test]
fn a_hung_service_is_killed_through_its_backend_and_restarted() {
    let Some(mut h) = harness("a_hung_service_is_killed_through_its_backend_and_restarted") else {
        return;
    };
    for kind in KINDS {
        let name = named("hung", kind);
        h.install(&name, kind, &on_failure(5));
        h.request(Request::Start { name: name.clone() }).unwrap();
        // Its heartbeat went silent long ago (a heartbeat needs steering, which needs Open
        // vSwitch: the record is given one here), a microVM's boot grace included.
        h.sup
            .record_mut(&name)
            .unwrap()
            .manifest
            .network
            .heartbeat_timeout_ms = Some(100);
        let long_ago = Instant::now()
            .checked_sub(crate::microvm::BOOT_GRACE + Duration::from_secs(1))
            .unwrap_or_else(Instant::now);
        h.sup.live.get_mut(&name).unwrap().heartbeat_since = Some(long_ago);
        let pid = h.rec(&name).running.as_ref().unwrap().init_pid;
        h.pump_until(Duration::from_secs(10), "a restart after the kill", |s| {
            let r = s.record(&name).unwrap();
            r.restarts >= 1 && r.state == State::Running
        });
        assert!(
            h.fake(kind).calls().contains(&format!("kill {name}")),
            "{kind}: {:?}",
            h.fake(kind).calls()
        );
        assert_ne!(h.rec(&name).running.as_ref().map(|r| r.init_pid), Some(pid));
        let events = h.sup.events.last(50);
        assert!(events
            .iter()
            .any(|e| e.kind == EventKind::Hung && e.service.as_deref() == Some(name.as_str())));
        h.request(Request::Stop { name: name.clone() }).unwrap();
    }
}

#[test]
fn a_stop_kills_what_ignores_it_after_the_grace_period() {
    let Some(mut h) = harness("a_stop_kills_what_ignores_it_after_the_grace_period") else {
        return;
    };
    for kind in KINDS {
        let name = named("stub", kind);
        h.install(&name, kind, "");
        h.fake(kind).set(
            &name,
            Behaviour {
                ignores_term: true,
                ..Default::default()
            },
        );
        h.request(Request::Start { name: name.clone() }).unwrap();
        let pid = h.rec(&name).running.as_ref().unwrap().init_pid;
        let t = Instant::now();
        h.request(Request::Stop { name: name.clone() }).unwrap();
        assert!(
            t.elapsed() >= Duration::from_secs(1),
            "grace period honoured"
        );
        assert_eq!(h.state(&name), State::Stopped);
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        let events = h.sup.events.last(5);
        let stopped = events
            .iter()
            .rev()
            .find(|e| e.kind == EventKind::Stopped)
            .unwrap();
        assert!(stopped.detail.contains("Killed"), "{}", stopped.detail);
    }
}

#[test]
fn a_restarted_daemon_adopts_what_runs_and_restarts_what_ended_meanwhile() {
    let Some(mut h) =
        harness("a_restarted_daemon_adopts_what_runs_and_restarts_what_ended_meanwhile")
    else {
        return;
    };
    for kind in KINDS {
        for (name, behaviour) in [
            (named("keeps", kind), Behaviour::default()),
            (
                named("dies", kind),
                Behaviour {
                    exits_after: Some((Duration::from_millis(300), 1)),
                    ..Default::default()
                },
            ),
        ] {
            h.install(&name, kind, &on_failure(5));
            h.fake(kind).set(&name, behaviour);
            h.request(Request::Start { name }).unwrap();
        }
    }
    let pids: Vec<(String, i32)> = KINDS
        .iter()
        .map(|k| {
            let n = named("keeps", *k);
            let pid = h.rec(&n).running.as_ref().unwrap().init_pid;
            (n, pid)
        })
        .collect();
    // The daemon goes away; meanwhile the dying ones end.
    std::thread::sleep(Duration::from_millis(600));
    h.restart_daemon();
    for (name, pid) in &pids {
        assert_eq!(h.state(name), State::Running);
        assert_eq!(
            h.rec(name).running.as_ref().unwrap().init_pid,
            *pid,
            "{name} adopted, not restarted"
        );
    }
    for kind in KINDS {
        let name = named("dies", kind);
        assert_eq!(
            h.rec(&name).last_exit.as_ref().unwrap().code,
            Some(1),
            "{name}"
        );
        h.pump_until(Duration::from_secs(10), "the dead one restarted", |s| {
            s.record(&name).unwrap().state == State::Running
        });
        let starts = h
            .fake(kind)
            .calls()
            .iter()
            .filter(|c| **c == format!("start {}", named("keeps", kind)))
            .count();
        assert_eq!(starts, 1, "{kind}: the running one was not started again");
    }
    for n in ["keeps-lxc", "keeps-vm", "dies-lxc", "dies-vm"] {
        h.request(Request::Stop { name: n.into() }).unwrap();
    }
}

#[test]
fn pause_and_resume_go_to_the_services_backend() {
    let Some(mut h) = harness("pause_and_resume_go_to_the_services_backend") else {
        return;
    };
    for kind in KINDS {
        let name = named("pause", kind);
        h.install(&name, kind, "");
        h.request(Request::Start { name: name.clone() }).unwrap();
        h.request(Request::Freeze { name: name.clone() }).unwrap();
        h.request(Request::Thaw { name: name.clone() }).unwrap();
        let calls = h.fake(kind).calls();
        assert_eq!(
            calls[1..],
            [format!("pause {name}"), format!("resume {name}")]
        );
        let st = h.request(Request::Status { name: name.clone() }).unwrap();
        assert_eq!(st["runtime"], kind.name());
        h.request(Request::Stop { name }).unwrap();
    }
}

/// Time for one request that the loop answers at once.
fn timed(h: &mut Harness, req: Request) -> Duration {
    let t = Instant::now();
    h.request(req).unwrap();
    t.elapsed()
}

#[test]
fn the_loop_answers_while_a_start_and_a_stop_take_their_time() {
    let Some(mut h) = harness("the_loop_answers_while_a_start_and_a_stop_take_their_time") else {
        return;
    };
    for kind in KINDS {
        let slow = named("slow", kind);
        let stub = named("stub", kind);
        h.install(&slow, kind, "");
        h.install(&stub, kind, "");
        h.fake(kind).set(
            &slow,
            Behaviour {
                start_takes: Duration::from_secs(2),
                ..Default::default()
            },
        );
        h.fake(kind).set(
            &stub,
            Behaviour {
                ignores_term: true,
                ..Default::default()
            },
        );
        h.request(Request::Start { name: stub.clone() }).unwrap();
        // A stop that needs its whole grace period (1 s) and a start that takes 2 s, both
        // in flight: the loop still answers at once, and says what is going on.
        let stopping = h.send(Request::Stop { name: stub.clone() });
        let starting = h.send(Request::Start { name: slow.clone() });
        assert_eq!(h.state(&stub), State::Stopping);
        assert_eq!(h.state(&slow), State::Starting);
        let mut worst = Duration::ZERO;
        for _ in 0..20 {
            worst = worst.max(timed(&mut h, Request::List));
            worst = worst.max(timed(&mut h, Request::Status { name: slow.clone() }));
        }
        assert!(worst < Duration::from_millis(100), "{kind}: {worst:?}");
        let st = h.answer(stopping).unwrap();
        assert_eq!(st["state"], "stopped");
        let st = h.answer(starting).unwrap();
        assert_eq!(st["state"], "running", "{kind}: answered once it runs");
        h.request(Request::Stop { name: slow }).unwrap();
    }
}

#[test]
fn a_stop_asked_for_during_a_start_runs_after_it_and_requests_are_answered_in_order() {
    let Some(mut h) =
        harness("a_stop_asked_for_during_a_start_runs_after_it_and_requests_are_answered_in_order")
    else {
        return;
    };
    for kind in KINDS {
        let name = named("order", kind);
        h.install(&name, kind, "");
        h.fake(kind).set(
            &name,
            Behaviour {
                start_takes: Duration::from_millis(500),
                ..Default::default()
            },
        );
        let start = h.send(Request::Start { name: name.clone() });
        let stop = h.send(Request::Stop { name: name.clone() });
        let restart = h.send(Request::Restart { name: name.clone() });
        assert_eq!(h.answer(start).unwrap()["state"], "running");
        assert_eq!(h.answer(stop).unwrap()["state"], "stopped");
        assert_eq!(h.answer(restart).unwrap()["state"], "running");
        assert_eq!(
            h.fake(kind).calls(),
            [
                format!("start {name}"),
                format!("stop {name}"),
                // The restart's stop found it stopped: nothing to ask the runtime.
                format!("start {name}"),
            ]
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
        );
        // Removing a running service stops it first; a request queued behind learns it is
        // gone.
        let removed = h.send(Request::Remove { name: name.clone() });
        let late = h.send(Request::Start { name: name.clone() });
        assert_eq!(h.answer(removed).unwrap()["removed"], name.as_str());
        assert_eq!(h.answer(late).unwrap_err().kind, ErrorKind::NotFound);
    }
}

#[test]
fn a_failed_start_answers_the_request_with_the_reason() {
    let Some(mut h) = harness("a_failed_start_answers_the_request_with_the_reason") else {
        return;
    };
    for kind in KINDS {
        let name = named("bad", kind);
        h.install(&name, kind, "[restart]\npolicy = \"never\"\nmax_retries = 0\nbackoff_initial_ms = 50\nbackoff_max_ms = 50\nstable_after_s = 1\n");
        h.fake(kind).set(
            &name,
            Behaviour {
                start_error: Some("the tap is gone".into()),
                ..Default::default()
            },
        );
        let e = h
            .request(Request::Start { name: name.clone() })
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Runtime);
        assert!(e.message.contains("the tap is gone"), "{}", e.message);
        assert_eq!(h.state(&name), State::Failed);
        // The next request starts afresh: it is not answered with the old failure.
        h.fake(kind).set(&name, Behaviour::default());
        let st = h.request(Request::Start { name: name.clone() }).unwrap();
        assert_eq!(st["state"], "running");
        h.request(Request::Stop { name }).unwrap();
    }
}

#[test]
fn a_microvm_takes_its_guest_memory_from_the_budget() {
    assert_eq!(crate::plan::receives_mib(Kind::Lxc, 32), 32);
    assert_eq!(
        crate::plan::receives_mib(Kind::Microvm, 32),
        crate::microvm::MIN_GUEST_MIB
    );
    assert_eq!(crate::plan::receives_mib(Kind::Microvm, 512), 512);
}

#[test]
fn a_daemon_restarted_in_the_middle_of_a_start_adopts_or_starts_again() {
    let Some(mut h) = harness("a_daemon_restarted_in_the_middle_of_a_start_adopts_or_starts_again")
    else {
        return;
    };
    for kind in KINDS {
        // The runtime had started it, but the daemon went away before it recorded that.
        let started = named("midst", kind);
        h.install(&started, kind, &on_failure(5));
        let _never_answered = h.send(Request::Start {
            name: started.clone(),
        });
        assert_eq!(h.state(&started), State::Starting);
        let deadline = Instant::now() + Duration::from_secs(5);
        while h.fake(kind).main_pid(&started).is_none() {
            assert!(Instant::now() < deadline, "the fake never started");
            std::thread::sleep(Duration::from_millis(10));
        }
        let pid = h.fake(kind).main_pid(&started).unwrap();
        // The daemon went away before the runtime did anything.
        let before = named("before", kind);
        h.install(&before, kind, &on_failure(5));
        {
            let rec = h.sup.record_mut(&before).unwrap();
            rec.desired = Desired::Running;
            rec.state = State::Starting;
        }
        h.sup.persist().unwrap();
        h.restart_daemon();
        // Adopted as it runs, not started twice.
        assert_eq!(h.state(&started), State::Running);
        assert_eq!(h.rec(&started).running.as_ref().unwrap().init_pid, pid);
        let starts = |h: &Harness, n: &str| {
            h.fake(kind)
                .calls()
                .iter()
                .filter(|c| **c == format!("start {n}"))
                .count()
        };
        assert_eq!(starts(&h, &started), 1, "{kind}");
        // Started again, under its restart policy.
        h.pump_until(
            Duration::from_secs(10),
            "the interrupted start redone",
            |s| s.record(&before).unwrap().state == State::Running,
        );
        assert_eq!(starts(&h, &before), 1, "{kind}");
        for n in [started, before] {
            h.request(Request::Stop { name: n }).unwrap();
        }
    }
}

#[test]
fn an_install_takes_the_runtime_asked_for_where_the_manifest_and_the_board_allow_it() {
    let Some(mut h) =
        harness("an_install_takes_the_runtime_asked_for_where_the_manifest_and_the_board_allow_it")
    else {
        return;
    };
    let manifest = |h: &Harness, name: &str, runtime: &str| {
        let file = h.dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &file,
            format!(
                "name = \"{name}\"\nversion = \"1.0.0\"\nruntime = \"{runtime}\"\nimage = \"builtin:busybox\"\n\
                 command = [\"/bin/sh\"]\n[resources]\nmemory_mib = 16\n"
            ),
        )
        .unwrap();
        file
    };
    let install = |h: &mut Harness, file: PathBuf, runtime| {
        h.request(Request::Install {
            manifest: file,
            start: false,
            runtime,
        })
    };
    let auto = manifest(&h, "anywhere", "auto");
    let st = install(&mut h, auto, Some(Kind::Lxc)).unwrap();
    assert_eq!(st["runtime"], "lxc");
    let fixed = manifest(&h, "fixed", "lxc");
    let e = install(&mut h, fixed, Some(Kind::Microvm)).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid);
    assert!(
        e.message.contains("field `runtime`") && e.message.contains("\"lxc\""),
        "{}",
        e.message
    );
    if !Kind::available(&h.sup.board).contains(&Kind::Microvm) {
        let elsewhere = manifest(&h, "elsewhere", "auto");
        let e = install(&mut h, elsewhere, Some(Kind::Microvm)).unwrap_err();
        assert!(
            e.message.contains("not available on this board"),
            "{}",
            e.message
        );
    }
    assert!(h.sup.record("fixed").is_err() && h.sup.record("elsewhere").is_err());
}

/// Builds a signed package of service `name` at `version`, healthy when it still runs a
/// second after its start, and that crashes at once unless `healthy`; signed by a key the
/// harness's gateway trusts. It is not restarted by its policy: only the update's check
/// judges it.
fn health_package(h: &Harness, kind: Kind, name: &str, version: &str, healthy: bool) -> PathBuf {
    // A microVM's definition needs a kernel file (never booted here).
    let kernel = h.dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"not booted").unwrap();
    let arg = if healthy {
        "--serve"
    } else {
        crate::runtime::fake::CRASHES
    };
    let vm = match kind {
        Kind::Lxc => String::new(),
        Kind::Microvm => format!("[microvm]\nkernel = {kernel:?}\n"),
    };
    let key = h.dir.path().join("publisher.key");
    if !key.exists() {
        let secret = gatevisor_images::keys::SecretKey::generate().unwrap();
        let public = secret.save(&key, "publisher").unwrap();
        gatevisor_images::keys::TrustStore::new(&h.sup.settings.keys_dir)
            .trust(&public)
            .unwrap();
    }
    let src = h.dir.path().join(format!("src-{name}-{version}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("service.toml"),
        format!(
            "name = \"{name}\"\nversion = \"{version}\"\nruntime = \"{kind}\"\nimage = \"package\"\n\
             command = [\"/bin/sh\", {arg:?}]\nstop_timeout_s = 1\n[resources]\nmemory_mib = 32\n\
             [health]\ndeadline_s = 2\n{vm}{}",
            on_failure(0)
        ),
    )
    .unwrap();
    let out = h.dir.path().join(format!("{name}-{version}.gvpkg"));
    crate::package::build(&src, &out, &key).unwrap();
    out
}

#[test]
fn an_update_that_fails_its_health_check_goes_back_to_the_version_that_worked() {
    let Some(mut h) =
        harness("an_update_that_fails_its_health_check_goes_back_to_the_version_that_worked")
    else {
        return;
    };
    // The fake runs microVMs on any board: the update's worker checks the board's runtimes.
    h.sup.board.kvm.microvm_capable = true;
    for kind in KINDS {
        let name = named("upd", kind);
        let v1 = health_package(&h, kind, &name, "1.0.0", true);
        let v2 = health_package(&h, kind, &name, "2.0.0", false);
        let st = h
            .request(Request::InstallPackage {
                package: v1,
                start: false,
                runtime: Some(kind),
            })
            .unwrap();
        assert_eq!(
            (st["package_version"].as_str(), st["runtime"].as_str()),
            (Some("1.0.0"), Some(kind.name()))
        );
        h.request(Request::Start { name: name.clone() }).unwrap();
        let first = h.rec(&name).running.as_ref().unwrap().init_pid;
        let reply = h.send(Request::Update {
            name: name.clone(),
            package: v2,
        });
        // While it is under way, its status says so, and to which version.
        h.pump_until(Duration::from_secs(20), "the new version started", |s| {
            s.record(&name).unwrap().package_version.as_deref() == Some("2.0.0")
        });
        let st = h.sup.status(&name).unwrap();
        assert_eq!(
            st.updating,
            Some(api::Updating {
                to_version: Some("2.0.0".into())
            }),
            "{kind}"
        );
        let e = h.answer(reply).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Runtime, "{e:?}");
        assert!(
            e.message.contains("rolled back to 1.0.0") && e.message.contains("not running"),
            "{kind}: {}",
            e.message
        );
        let rec = h.rec(&name);
        assert_eq!(
            (rec.state, rec.package_version.as_deref()),
            (State::Running, Some("1.0.0")),
            "{kind}"
        );
        assert_ne!(
            rec.running.as_ref().unwrap().init_pid,
            first,
            "{kind}: the old version was started again"
        );
        assert_eq!(h.sup.status(&name).unwrap().updating, None, "{kind}");
        h.request(Request::Stop { name }).unwrap();
    }
}

#[test]
fn a_version_under_its_health_check_is_updating_then_running() {
    let Some(mut h) = harness("a_version_under_its_health_check_is_updating_then_running") else {
        return;
    };
    h.sup.board.kvm.microvm_capable = true;
    for kind in KINDS {
        let name = named("judged", kind);
        let v1 = health_package(&h, kind, &name, "1.0.0", true);
        let v2 = health_package(&h, kind, &name, "2.0.0", true);
        h.request(Request::InstallPackage {
            package: v1,
            start: true,
            runtime: Some(kind),
        })
        .unwrap();
        let reply = h.send(Request::Update {
            name: name.clone(),
            package: v2,
        });
        // Its check (still running a second after its start) takes a second: meanwhile the
        // new version runs, in the one state the transition function has for it.
        h.pump_until(Duration::from_secs(20), "the new version judged", |s| {
            s.record(&name).unwrap().state == State::Updating
        });
        let st = h.sup.status(&name).unwrap();
        assert_eq!(
            (st.state, st.package_version.as_deref()),
            (State::Updating, Some("2.0.0")),
            "{kind}"
        );
        assert!(st.init_pid.is_some(), "{kind}: it runs while judged");
        let done = h.answer(reply).unwrap();
        assert_eq!(
            (done["state"].as_str(), done["package_version"].as_str()),
            (Some("running"), Some("2.0.0")),
            "{kind}"
        );
        assert_eq!(h.rec(&name).state, State::Running, "{kind}");
        h.request(Request::Stop { name }).unwrap();
    }
}

#[test]
fn a_service_whose_port_left_the_bridge_is_plugged_again_whatever_its_runtime() {
    let Some(mut h) =
        harness("a_service_whose_port_left_the_bridge_is_plugged_again_whatever_its_runtime")
    else {
        return;
    };
    let replugged = |h: &Harness, name: &str| {
        h.sup
            .events
            .last(100)
            .iter()
            .filter(|e| {
                e.kind == EventKind::NetworkRestored
                    && e.service.as_deref() == Some(name)
                    && e.detail.contains("was removed from the bridge")
            })
            .count()
    };
    for kind in KINDS {
        // The regression: a microVM's port was looked up through an LXC init PID, found
        // no process, and was never plugged again.
        let name = named("tap", kind);
        h.install(&name, kind, &on_failure(5));
        h.request(Request::Start { name: name.clone() }).unwrap();
        let port = veth_name(&name);
        assert!(h.sup.dispatch(Msg::PortLost { port: port.clone() }));
        assert_eq!(replugged(&h, &name), 1, "{kind}: plugged again");
        assert!(
            h.fake(kind).calls().iter().all(|c| c.ends_with(&name)),
            "{kind}: asked its own backend: {:?}",
            h.fake(kind).calls()
        );
        // A port that flaps is not plugged again and again.
        assert!(h.sup.dispatch(Msg::PortLost { port: port.clone() }));
        assert_eq!(replugged(&h, &name), 1, "{kind}: at most once per 5 s");
        // A stopped service's port is not brought back.
        h.sup.live.get_mut(&name).unwrap().replugged_at = None;
        h.request(Request::Stop { name: name.clone() }).unwrap();
        assert!(h.sup.dispatch(Msg::PortLost { port }));
        assert_eq!(replugged(&h, &name), 1, "{kind}: left alone when stopped");
    }
}

#[test]
fn an_exec_runs_in_the_service_through_its_backend_on_a_worker() {
    let Some(mut h) = harness("an_exec_runs_in_the_service_through_its_backend_on_a_worker") else {
        return;
    };
    for kind in KINDS {
        let name = named("exec", kind);
        h.install(&name, kind, "");
        let argv = |s: &str| vec!["/bin/sh".to_string(), "-c".into(), s.into()];
        // Not running: refused.
        let e = h
            .request(Request::Exec {
                name: name.clone(),
                argv: argv("exit 0"),
            })
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Conflict, "{kind}: {e:?}");
        h.request(Request::Start { name: name.clone() }).unwrap();
        // The loop answers other requests while a command takes its time.
        let slow = h.send(Request::Exec {
            name: name.clone(),
            argv: argv("sleep 1; exit 3"),
        });
        let t = Instant::now();
        h.request(Request::List).unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{kind}: list waited"
        );
        let done = h.answer(slow).unwrap();
        assert_eq!(done["exit_code"], 3, "{kind}: {done}");
        assert!(h.fake(kind).calls().contains(&format!("exec {name}")));
        let e = h
            .request(Request::Exec {
                name: name.clone(),
                argv: vec![],
            })
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid, "{kind}: {e:?}");
        h.request(Request::Stop { name: name.clone() }).unwrap();
    }
}
