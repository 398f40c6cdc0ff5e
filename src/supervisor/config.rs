//! The operator's per-service settings: read, changed (all or nothing, persisted with the
//! state), and delivered to the running service without a restart: published on its
//! control channel (watchers are told at once, in both runtimes) and, for a container,
//! written to `/run/gatevisor/settings.json` in its root.

use super::*;
use crate::settings::{self, SettingError};
use serde_json::Value;
use std::collections::BTreeMap;

/// The settings file's name in the service's run directory (`/run/gatevisor/` inside).
pub const SETTINGS_FILE: &str = "settings.json";

impl Supervisor {
    /// Every declared setting of service `name` with the value it gets.
    fn effective_settings(&self, name: &str) -> Option<BTreeMap<String, Value>> {
        let rec = self.doc.services.get(name)?;
        Some(settings::effective(&rec.manifest.settings, &rec.settings))
    }

    /// Gives service `name` its settings as they are now: its control channel publishes
    /// them (watchers hear at once) and a container finds them in its root. Failures are
    /// logged: the stored values stay what counts.
    pub(super) fn deliver_settings(&mut self, name: &str) {
        let Some(rec) = self.doc.services.get(name) else {
            return;
        };
        if rec.manifest.settings.is_empty() {
            return;
        }
        let container = rec.plan.runtime == Kind::Lxc;
        let Some(values) = self.effective_settings(name) else {
            return;
        };
        let value = serde_json::to_value(&values).expect("settings serialise");
        if container {
            let dir = self.service_run_dir(name);
            let written = std::fs::create_dir_all(&dir)
                .and_then(|_| Dir::open(&dir))
                .and_then(|d| {
                    let mut bytes = serde_json::to_vec_pretty(&value).expect("serialises");
                    bytes.push(b'\n');
                    d.replace_file(SETTINGS_FILE.as_ref(), &bytes, 0o644)
                        .map_err(std::io::Error::from)
                });
            if let Err(e) = written {
                tracing::warn!("{name}: cannot write its settings file: {e}");
            }
        }
        if let Some(v) = self.verdict_servers.get(name) {
            v.publish_settings(value);
        }
    }

    /// `service config NAME`: each declared setting, its type, value and default.
    pub(super) fn config_get(&self, name: &str) -> Result<crate::api::Settings> {
        let rec = self.record(name)?;
        Ok(crate::api::Settings {
            service: name.to_string(),
            settings: settings_view(rec),
        })
    }

    /// Changes settings of service `name` (`NAME` → text), all or nothing; with `dry_run`
    /// only checks them. The change is persisted before it is delivered.
    pub(super) fn config_set(
        &mut self,
        name: &str,
        values: &BTreeMap<String, String>,
        dry_run: bool,
    ) -> Result<crate::api::ConfigChanged> {
        let rec = self.record(name)?;
        if values.is_empty() {
            return Err(err(ErrorKind::Invalid, "no setting to change (NAME=VALUE)"));
        }
        let next = settings::apply(&rec.manifest.settings, &rec.settings, values).map_err(|e| {
            let kind = match e {
                SettingError::Undeclared(..) => ErrorKind::NotFound,
                _ => ErrorKind::Invalid,
            };
            ApiError::new(kind, format!("service {name}: setting {e}"))
        })?;
        let before = settings::effective(&rec.manifest.settings, &rec.settings);
        let after = settings::effective(&rec.manifest.settings, &next);
        let changed: Vec<String> = after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .collect();
        if dry_run {
            return Ok(crate::api::ConfigChanged {
                service: name.to_string(),
                changed,
                dry_run: true,
            });
        }
        let old = std::mem::replace(&mut self.record_mut(name)?.settings, next);
        if let Err(e) = self.persist() {
            // Not stored, not applied: the service keeps what it had.
            self.record_mut(name)?.settings = old;
            return Err(e);
        }
        if !changed.is_empty() {
            self.deliver_settings(name);
            self.event(
                EventKind::Configured,
                Some(name),
                format!("settings changed: {}", changed.join(", ")),
            );
        }
        Ok(crate::api::ConfigChanged {
            service: name.to_string(),
            changed,
            dry_run: false,
        })
    }
}

/// Each declared setting of a service: name, type, value and default (as text), whether the
/// operator set it, and its description.
pub(super) fn settings_view(rec: &ServiceRecord) -> Vec<crate::api::Setting> {
    let m = &rec.manifest;
    let values = settings::effective(&m.settings, &rec.settings);
    m.settings
        .iter()
        .map(|(k, d)| crate::api::Setting {
            name: k.clone(),
            ty: d.ty.name().to_string(),
            value: settings::to_text(&values[k]),
            default: settings::to_text(&d.default),
            set: rec.settings.contains_key(k),
            description: d.description.clone(),
        })
        .collect()
}
