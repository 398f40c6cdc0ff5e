//! Notifications: queued for the subscribers of what changed (a comparison of trees, an
//! event), sent again while a NotifRetry subscriber does not answer.

use super::*;

impl Model {
    /// Queues `kind` for the subscribers of `notif_type` on `path` (see [`queue`]), saving
    /// the state first when some of them want an answer.
    pub(super) fn notify(&self, notif_type: &str, path: &str, kind: NotifyKind) {
        let out = {
            let mut st = self.st.lock().unwrap();
            let waiting = st.unacked.len();
            let out = queue(&mut st, notif_type, path, &kind);
            if st.unacked.len() != waiting {
                self.persist_or_warn(&st);
            }
            out
        };
        self.dispatch(out);
    }

    pub(super) fn dispatch(&self, out: Vec<Notification>) {
        let outbox = self.outbox.lock().unwrap();
        for n in out {
            let _ = outbox.send(n);
        }
    }

    /// Sends again the notifications whose NotifyResp is overdue (NotifRetry), waiting twice
    /// as long each time; gives up after `RETRY_MAX_ATTEMPTS`, or when the subscription is
    /// gone. Those a previous daemon left are due at once. Called every second.
    pub fn retry_due(&self) {
        let now = std::time::Instant::now();
        let mut due = Vec::new();
        {
            let mut guard = self.st.lock().unwrap();
            let st = &mut *guard;
            let waiting = st.unacked.len();
            let subscriptions = &st.subscriptions;
            st.unacked.retain_mut(|x| {
                if x.next.is_some_and(|n| n > now) {
                    return true;
                }
                let live = subscriptions
                    .iter()
                    .any(|s| s.enable && s.id == x.subscription_id && s.recipient == x.recipient);
                if !live || x.attempts >= RETRY_MAX_ATTEMPTS {
                    tracing::warn!(
                        "usp: {} never acknowledged a notification of {}; given up",
                        x.recipient,
                        x.subscription_id
                    );
                    return false;
                }
                x.attempts += 1;
                x.next = Some(now + RETRY_FIRST * 2u32.pow(x.attempts.min(16)));
                due.push((
                    x.recipient.clone(),
                    Outgoing::Notify {
                        subscription_id: x.subscription_id.clone(),
                        send_resp: true,
                        kind: x.kind.clone(),
                    },
                ));
                true
            });
            if st.unacked.len() != waiting {
                self.persist_or_warn(st);
            }
        }
        self.dispatch(due);
    }

    /// Someone subscribed to what a comparison of trees finds.
    pub fn watched(&self) -> bool {
        self.st.lock().unwrap().subscriptions.iter().any(|s| {
            s.enable
                && matches!(
                    s.notif_type.as_str(),
                    "ValueChange" | "ObjectCreation" | "ObjectDeletion"
                )
        })
    }

    /// Compares the tree with the previous one and notifies ValueChange, ObjectCreation and
    /// ObjectDeletion subscribers. Run by the daemon when the supervisor tells of a change,
    /// and periodically for counters.
    pub fn watch(&self, prev: &mut Option<BTreeMap<String, String>>) {
        // The tree costs the supervisor a List: build it only while someone subscribed to
        // what a comparison finds.
        if !self.watched() {
            *prev = None;
            return;
        }
        let now = self.parameters();
        if let Some(before) = prev.as_ref() {
            for (k, v) in &now {
                if before.get(k) != Some(v) && before.contains_key(k) {
                    self.notify(
                        "ValueChange",
                        k,
                        NotifyKind::ValueChange {
                            path: k.clone(),
                            value: v.clone(),
                        },
                    );
                }
            }
            let objs = |m: &BTreeMap<String, String>| -> BTreeSet<String> {
                m.keys()
                    .filter_map(|k| {
                        let segs: Vec<&str> = k.split('.').collect();
                        let i = segs.iter().rposition(|s| s.parse::<u32>().is_ok())?;
                        Some(format!("{}.", segs[..=i].join(".")))
                    })
                    .collect()
            };
            let (was, is) = (objs(before), objs(&now));
            for o in is.difference(&was) {
                self.notify(
                    "ObjectCreation",
                    o,
                    NotifyKind::ObjectCreation {
                        path: o.clone(),
                        keys: Self::keys_of(o, &now),
                    },
                );
            }
            for o in was.difference(&is) {
                self.notify(
                    "ObjectDeletion",
                    o,
                    NotifyKind::ObjectDeletion { path: o.clone() },
                );
            }
        }
        *prev = Some(now);
    }
}

/// The notifications of `kind` for the enabled subscribers of `notif_type` on `path`; those
/// with NotifRetry are kept in `st.unacked` until answered (the caller saves `st`).
pub(super) fn queue(
    st: &mut Persisted,
    notif_type: &str,
    path: &str,
    kind: &NotifyKind,
) -> Vec<Notification> {
    let subs: Vec<Subscription> = st
        .subscriptions
        .iter()
        .filter(|s| s.enable && s.notif_type == notif_type)
        .filter(|s| {
            s.reference_list
                .iter()
                .any(|r| r == "Device." || matches(r, path) || path.starts_with(r.as_str()))
        })
        .cloned()
        .collect();
    let next = std::time::Instant::now() + RETRY_FIRST;
    subs.into_iter()
        .map(|s| {
            if s.notif_retry {
                st.unacked.push(Unacked {
                    recipient: s.recipient.clone(),
                    subscription_id: s.id.clone(),
                    kind: kind.clone(),
                    attempts: 0,
                    next: Some(next),
                });
            }
            (
                s.recipient,
                Outgoing::Notify {
                    subscription_id: s.id,
                    send_resp: s.notif_retry,
                    kind: kind.clone(),
                },
            )
        })
        .collect()
}
