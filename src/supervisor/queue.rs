//! A service's queue: requests for one service run in order, each waiting for the start or
//! stop before it, which run on workers; the loop goes on meanwhile.

use super::*;

/// A step of a service's queue: it runs once the service is neither starting nor stopping.
pub(super) enum Step {
    Start,
    Stop {
        by_request: bool,
    },
    /// Answers with the service's status, or how the step before failed.
    Reply(Sender<Reply>),
    /// Removes the (stopped) service and answers.
    Remove(Sender<Reply>),
    /// Rebuilds the stopped service from another version and starts it.
    Switch(Box<super::update::Switch>),
    /// Checks the health of the version just started (the start's time with it).
    Check(Box<super::update::Switch>, u64),
    /// Keeps that version, or goes back.
    Judge(Box<super::update::Switch>),
}

impl Supervisor {
    /// Queues `steps` for `name` (answering on `reply` after them, unless a step answers
    /// itself) and runs what can run now. A start or stop runs on a worker; the steps after
    /// it wait for its end, so requests for one service are served in order while the loop
    /// stays free for everything else.
    pub(super) fn enqueue(&mut self, name: &str, steps: Vec<Step>, reply: Option<Sender<Reply>>) {
        if let Err(error) = self.record(name) {
            if let Some(r) = reply {
                let _ = r.send(Reply::Error { error });
            }
            return;
        }
        let live = self.live.entry(name.to_string()).or_default();
        if live.busy.is_none() && live.queue.is_empty() {
            live.error = None;
        }
        live.queue.extend(steps);
        live.queue.extend(reply.map(Step::Reply));
        self.settle(name);
    }

    /// Runs `name`'s queued steps until one must wait for a worker.
    pub(super) fn settle(&mut self, name: &str) {
        loop {
            let Some(live) = self.live.get_mut(name) else {
                return;
            };
            if live.busy.is_some() {
                return;
            }
            let Some(step) = live.queue.pop_front() else {
                return;
            };
            let failed = live.error.is_some();
            match step {
                Step::Reply(reply) => {
                    let r = match live.error.take() {
                        Some(error) => Err(error),
                        None => self.status_result(name),
                    };
                    let _ = reply.send(match r {
                        Ok(result) => Reply::Ok { result },
                        Err(error) => Reply::Error { error },
                    });
                }
                // After a failed step, what was asked with it is not done.
                Step::Start | Step::Stop { .. } if failed => {}
                Step::Switch(sw) | Step::Judge(sw) if failed => {
                    let error = live.error.take().expect("failed");
                    let _ = sw.reply.send(Reply::Error { error });
                }
                Step::Switch(sw) => self.switch_step(name, *sw),
                Step::Check(sw, since_ms) => self.check_step(name, *sw, since_ms),
                Step::Judge(sw) => {
                    let result = live
                        .checked
                        .take()
                        .unwrap_or_else(|| Err("its health check did not report".into()));
                    self.judge(name, *sw, result);
                }
                Step::Start => {
                    if let Err(e) = self.start_step(name) {
                        self.live.entry(name.to_string()).or_default().error = Some(e);
                    }
                }
                Step::Stop { by_request } => {
                    if let Err(e) = self.stop_service(name, by_request) {
                        self.live.entry(name.to_string()).or_default().error = Some(e);
                    }
                }
                Step::Remove(reply) => {
                    let rest = std::mem::take(&mut live.queue);
                    let r = match live.error.take() {
                        Some(e) => Err(e),
                        None => self.remove(name).and_then(|r| api::to_result(&r)),
                    };
                    let removed = r.is_ok();
                    let _ = reply.send(match r {
                        Ok(result) => Reply::Ok { result },
                        Err(error) => Reply::Error { error },
                    });
                    if !removed {
                        self.live.entry(name.to_string()).or_default().queue = rest;
                    } else {
                        // Whoever still waited on it learns that it is gone.
                        for step in rest {
                            let r = match step {
                                Step::Reply(r) | Step::Remove(r) => r,
                                Step::Switch(sw) | Step::Check(sw, _) | Step::Judge(sw) => sw.reply,
                                Step::Start | Step::Stop { .. } => continue,
                            };
                            let _ = r.send(Reply::Error {
                                error: err(ErrorKind::NotFound, format!("{name} was removed")),
                            });
                        }
                        return;
                    }
                }
            }
        }
    }

    /// A start asked for (`service start`, an install's `--start`): whatever state the
    /// service is in, it is to run.
    pub(super) fn start_step(&mut self, name: &str) -> Result<()> {
        let rec = self.record_mut(name)?;
        rec.desired = Desired::Running;
        match rec.state {
            State::Running | State::Updating | State::Starting => {}
            State::Backoff => {
                rec.restarts += 1;
                self.start_service(name, Op::Retry)?
            }
            _ => {
                rec.consecutive_failures = 0;
                rec.failure_reason = None;
                self.start_service(name, Op::Start)?
            }
        }
        self.persist()
    }
}
