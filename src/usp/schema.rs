//! The supported data model: the objects, parameters, commands and events this agent serves
//! (GetSupportedDM), and what a requested path names in it, so that every message tells a
//! path outside the model (7026) from one that is in it but has no instance yet (an empty
//! answer, TR-369 R-GET.1a).

use super::codec::{ParamType, SupportedDmFlags, SupportedObject};
use super::model::{E_INVALID_PATH, SM, VENDOR};

pub const SUBS: &str = "Device.LocalAgent.Subscription.";
pub const REQS: &str = "Device.LocalAgent.Request.";
pub const CONTROLLERS: &str = "Device.LocalAgent.Controller.";

/// The arguments of `DUStateChange!`.
pub const DU_STATE_CHANGE_ARGS: [&str; 11] = [
    "UUID",
    "DeploymentUnitRef",
    "Version",
    "CurrentState",
    "Resolved",
    "ExecutionUnitRefList",
    "StartTime",
    "CompleteTime",
    "OperationPerformed",
    "Fault.FaultCode",
    "Fault.FaultString",
];

/// A service's steering counters (`ExecutionUnit.{i}.X_GATEVISOR-ORG_Steering.`).
pub const STEERING_COUNTERS: [&str; 3] = ["SteeredPackets", "SteeredBytes", "ReturnedPackets"];
/// Its returned packets by verdict (`….Steering.Verdicts.`).
pub const VERDICT_COUNTERS: [&str; 4] = ["Forward", "Allow", "Block", "Reply"];

/// The objects this agent serves.
pub fn schema() -> Vec<SupportedObject> {
    use ParamType::*;
    let strs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let ro = |v: &[(&str, ParamType)]| {
        v.iter()
            .map(|(n, t)| (n.to_string(), *t, false))
            .collect::<Vec<_>>()
    };
    let obj = |path: &str, multi: bool| SupportedObject {
        path: path.into(),
        multi_instance: multi,
        add_delete: false,
        params: vec![],
        unique_keys: vec![],
        commands: vec![],
        events: vec![],
    };
    let counters = |names: &[&str]| {
        names
            .iter()
            .map(|n| (n.to_string(), UnsignedInt, false))
            .collect::<Vec<_>>()
    };
    vec![
        SupportedObject {
            params: ro(&[
                ("ExecEnvNumberOfEntries", UnsignedInt),
                ("DeploymentUnitNumberOfEntries", UnsignedInt),
                ("ExecutionUnitNumberOfEntries", UnsignedInt),
            ]),
            commands: vec![(
                "InstallDU()".into(),
                strs(&["URL", "UUID", "Username", "Password", "ExecutionEnvRef"]),
                vec![],
                true,
            )],
            events: vec![("DUStateChange!".into(), strs(&DU_STATE_CHANGE_ARGS))],
            ..obj(SM, false)
        },
        SupportedObject {
            params: ro(&[
                ("Enable", Boolean),
                ("Status", String),
                ("Name", String),
                ("Type", String),
                ("Vendor", String),
                ("Version", String),
                ("AvailableMemory", UnsignedInt),
                ("AvailableDiskSpace", UnsignedInt),
                ("ActiveExecutionUnits", String),
            ]),
            unique_keys: vec![strs(&["Name"])],
            ..obj(&format!("{SM}ExecEnv.{{i}}."), true)
        },
        SupportedObject {
            params: ro(&[
                ("UUID", String),
                ("DUID", String),
                ("Name", String),
                ("Status", String),
                ("Resolved", Boolean),
                ("URL", String),
                ("Vendor", String),
                ("Version", String),
                ("ExecutionUnitList", String),
                ("ExecutionEnvRef", String),
            ]),
            unique_keys: vec![strs(&["UUID", "Version", "ExecutionEnvRef"])],
            commands: vec![
                (
                    "Update()".into(),
                    strs(&["URL", "Username", "Password"]),
                    vec![],
                    true,
                ),
                ("Uninstall()".into(), vec![], vec![], true),
            ],
            ..obj(&format!("{SM}DeploymentUnit.{{i}}."), true)
        },
        SupportedObject {
            params: ro(&[
                ("EUID", String),
                ("Name", String),
                ("ExecEnvLabel", String),
                ("Status", String),
                ("RequestedState", String),
                ("ExecutionFaultCode", String),
                ("ExecutionFaultMessage", String),
                ("AutoStart", Boolean),
                ("Vendor", String),
                ("Version", String),
                ("References", String),
                ("ExecutionEnvRef", String),
                // TR-181: -1 for a unit that is not running.
                ("MemoryInUse", Int),
                ("CPUPercentInUse", UnsignedInt),
                (&format!("{VENDOR}Restarts"), UnsignedInt),
                (&format!("{VENDOR}Runtime"), String),
                // The host calls granted to the unit (`OP:PATTERN`, comma-separated).
                (&format!("{VENDOR}HostCalls"), String),
                (&format!("{VENDOR}SettingNumberOfEntries"), UnsignedInt),
            ]),
            unique_keys: vec![strs(&["EUID"])],
            commands: vec![
                (
                    "SetRequestedState()".into(),
                    strs(&["RequestedState"]),
                    vec![],
                    false,
                ),
                ("Restart()".into(), vec![], vec![], false),
            ],
            ..obj(&format!("{SM}ExecutionUnit.{{i}}."), true)
        },
        SupportedObject {
            params: ro(&[("Enable", Boolean), ("RetryCount", UnsignedInt)]),
            ..obj(&format!("{SM}ExecutionUnit.{{i}}.AutoRestart."), false)
        },
        SupportedObject {
            params: counters(&STEERING_COUNTERS),
            ..obj(&format!("{SM}ExecutionUnit.{{i}}.{VENDOR}Steering."), false)
        },
        SupportedObject {
            params: counters(&VERDICT_COUNTERS),
            ..obj(
                &format!("{SM}ExecutionUnit.{{i}}.{VENDOR}Steering.Verdicts."),
                false,
            )
        },
        // The operator's settings the service declares: one instance each, its Value the
        // only writable parameter (typed by Type: string, bool, uint, string-list).
        SupportedObject {
            params: ro(&[
                ("Name", String),
                ("Type", String),
                ("Default", String),
                ("Description", String),
            ])
            .into_iter()
            .chain([("Value".to_string(), String, true)])
            .collect(),
            unique_keys: vec![strs(&["Name"])],
            ..obj(
                &format!("{SM}ExecutionUnit.{{i}}.{VENDOR}Setting.{{i}}."),
                true,
            )
        },
        SupportedObject {
            params: ro(&[
                ("ControllerNumberOfEntries", UnsignedInt),
                ("SubscriptionNumberOfEntries", UnsignedInt),
                ("RequestNumberOfEntries", UnsignedInt),
            ]),
            ..obj("Device.LocalAgent.", false)
        },
        SupportedObject {
            params: ro(&[("EndpointID", String)]),
            unique_keys: vec![strs(&["EndpointID"])],
            ..obj(&format!("{CONTROLLERS}{{i}}."), true)
        },
        SupportedObject {
            add_delete: true,
            params: [
                "Enable",
                "ID",
                "Recipient",
                "NotifType",
                "ReferenceList",
                "NotifRetry",
                "Persistent",
            ]
            .iter()
            .map(|n| {
                let t = if matches!(*n, "Enable" | "NotifRetry" | "Persistent") {
                    Boolean
                } else {
                    String
                };
                (n.to_string(), t, true)
            })
            .collect(),
            unique_keys: vec![strs(&["Recipient", "ID"])],
            ..obj(&format!("{SUBS}{{i}}."), true)
        },
        SupportedObject {
            params: ro(&[
                ("Originator", String),
                ("Command", String),
                ("CommandKey", String),
                ("Status", String),
            ]),
            ..obj(&format!("{REQS}{{i}}."), true)
        },
    ]
}

/// What a path names in the supported data model (its [`schema_path`] spelling).
///
/// [`schema_path`]: super::path::Pattern::schema_path
#[derive(Debug, Clone, PartialEq)]
pub enum Known {
    /// An object of the model (single- or multi-instance `….{i}.`).
    Object(SupportedObject),
    /// A multi-instance object's table (`…ExecutionUnit.`).
    Table(SupportedObject),
    /// An object that only holds others (`Device.`, `Device.LocalAgent.`).
    Intermediate,
    /// A parameter: its object, type and whether it is writable.
    Param(SupportedObject, ParamType, bool),
    Command(SupportedObject),
    Event(SupportedObject),
}

/// What `schema_path` names, if it is in the supported data model.
pub fn lookup(schema_path: &str) -> Option<Known> {
    let all = schema();
    if schema_path.ends_with('.') {
        if let Some(o) = all.iter().find(|o| o.path == schema_path) {
            return Some(Known::Object(o.clone()));
        }
        let table = format!("{schema_path}{{i}}.");
        if let Some(o) = all.iter().find(|o| o.multi_instance && o.path == table) {
            return Some(Known::Table(o.clone()));
        }
        return all
            .iter()
            .any(|o| o.path.starts_with(schema_path))
            .then_some(Known::Intermediate);
    }
    let (object, name) = schema_path.rsplit_once('.')?;
    let o = all.iter().find(|o| o.path == format!("{object}."))?;
    if let Some((_, t, w)) = o.params.iter().find(|(n, _, _)| n == name) {
        return Some(Known::Param(o.clone(), *t, *w));
    }
    if o.commands.iter().any(|(n, ..)| n == name) {
        return Some(Known::Command(o.clone()));
    }
    if o.events.iter().any(|(n, _)| n == name) {
        return Some(Known::Event(o.clone()));
    }
    None
}

/// The supported objects at or below `path` (`{i}` or instance numbers accepted), with
/// only what `flags` asks for.
pub fn supported(
    path: &str,
    flags: SupportedDmFlags,
) -> Result<Vec<SupportedObject>, (u32, String)> {
    // Instance numbers in the request name the same supported object as `{i}`.
    let norm: String = path
        .split('.')
        .map(|s| if s.parse::<u32>().is_ok() { "{i}" } else { s })
        .collect::<Vec<_>>()
        .join(".");
    let norm = if norm.ends_with('.') {
        norm
    } else {
        format!("{norm}.")
    };
    let depth = norm.trim_end_matches('.').split('.').count();
    let found: Vec<SupportedObject> = schema()
        .into_iter()
        .filter(|o| {
            let below = o.path.starts_with(&norm);
            let d = o
                .path
                .trim_end_matches('.')
                .trim_end_matches(".{i}")
                .split('.')
                .count();
            below && (!flags.first_level_only || d <= depth + 1)
        })
        .map(|mut o| {
            if !flags.params {
                o.params.clear();
            }
            if !flags.commands {
                o.commands.clear();
            }
            if !flags.events {
                o.events.clear();
            }
            if !flags.unique_key_sets {
                o.unique_keys.clear();
            }
            o
        })
        .collect();
    if found.is_empty() && norm != "Device." {
        return Err((
            E_INVALID_PATH,
            format!("{path}: not in the supported data model"),
        ));
    }
    Ok(found)
}

/// The unique keys of the multi-instance object `schema_path` (`….{i}.`): its first key set.
pub fn unique_keys(schema_path: &str) -> Vec<String> {
    schema()
        .into_iter()
        .find(|o| o.path == schema_path)
        .and_then(|o| o.unique_keys.into_iter().next())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_data_model_lists_objects_below_a_path() {
        let all = supported(SM, SupportedDmFlags::default()).unwrap();
        assert!(all
            .iter()
            .any(|o| o.path == "Device.SoftwareModules.DeploymentUnit.{i}."
                && o.commands.iter().any(|c| c.0 == "Uninstall()" && c.3)));
        let first = SupportedDmFlags {
            first_level_only: true,
            ..Default::default()
        };
        let eu = supported("Device.SoftwareModules.ExecutionUnit.3.", first).unwrap();
        assert_eq!(eu[0].path, "Device.SoftwareModules.ExecutionUnit.{i}.");
        assert!(supported("Device.Nothing.", first).is_err());
    }

    #[test]
    fn paths_are_told_apart_by_what_they_name_in_the_model() {
        let k = |p: &str| lookup(p).map(|k| std::mem::discriminant(&k));
        let d = |k: Known| Some(std::mem::discriminant(&k));
        let o = schema()[0].clone();
        assert_eq!(k("Device."), d(Known::Intermediate));
        assert_eq!(k(SM), d(Known::Object(o.clone())));
        assert_eq!(
            k("Device.SoftwareModules.ExecutionUnit."),
            d(Known::Table(o.clone()))
        );
        assert_eq!(
            k("Device.SoftwareModules.ExecutionUnit.{i}.MemoryInUse"),
            d(Known::Param(o.clone(), ParamType::Int, false))
        );
        assert_eq!(
            k("Device.SoftwareModules.DeploymentUnit.{i}.Uninstall()"),
            d(Known::Command(o.clone()))
        );
        assert_eq!(
            k("Device.SoftwareModules.DUStateChange!"),
            d(Known::Event(o))
        );
        assert_eq!(k("Device.SoftwareModules.ExecutionUnit.{i}.Bogus"), None);
        assert_eq!(k("Device.Bogus."), None);
    }
}
