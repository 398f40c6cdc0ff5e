//! Get, GetInstances, Add, Delete and Set (TR-369 section 7), over the parameter tree and the
//! agent's own tables. A path is checked against the supported data model first: a syntax
//! error is 7008, a path outside the model 7026, a path in the model that resolves to nothing
//! an empty answer (R-GET.1a) or, for a Delete or Set of one numbered instance, 7016.

use super::*;
use crate::usp::codec::{Instance, InstancesResult, ParamError, SetFailure, SetObject, SetResult};

/// One requested object that failed, for an Error message's `param_errs`.
fn failed<T>(results: &[(String, Result<T, Fault>)]) -> Vec<ParamError> {
    results
        .iter()
        .filter_map(|(p, r)| r.as_ref().err().map(|(c, m)| (p.clone(), *c, m.clone())))
        .collect()
}

/// The code of an Error message for an Add or Set that failed as a whole: 7006 when the
/// Controller may not do it, else 7004 (invalid arguments; the paths say why).
fn outer_code(errs: &[ParamError]) -> u32 {
    if errs.iter().any(|e| e.1 == E_PERMISSION) {
        E_PERMISSION
    } else {
        E_INVALID_ARGUMENTS
    }
}

impl Model {
    /// `path` parsed and found in the supported data model.
    pub(super) fn resolve_path(path: &str) -> Result<(Pattern, Known), Fault> {
        if !path.starts_with("Device.") {
            return Err((E_INVALID_PATH, format!("{path}: not a Device. path")));
        }
        let pattern = Pattern::parse(path).map_err(|e| (E_PATH_SYNTAX, e))?;
        let known = schema::lookup(&pattern.schema_path()).ok_or_else(|| {
            (
                E_INVALID_PATH,
                format!("{path}: not in the supported data model"),
            )
        })?;
        Ok((pattern, known))
    }

    pub(super) fn get(&self, paths: &[String]) -> Vec<(String, GetResult)> {
        let params = self.parameters();
        paths
            .iter()
            .map(|path| {
                let r = Self::resolve_path(path).and_then(|(pattern, known)| {
                    if matches!(known, Known::Command(_) | Known::Event(_)) {
                        return Err((
                            E_INVALID_PATH,
                            format!("{path}: a command or an event, not a parameter"),
                        ));
                    }
                    let mut by_obj: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
                    let hits = params.iter().filter(|(k, _)| pattern.matches(k, &params));
                    for (k, v) in hits {
                        let obj = object_of(k);
                        by_obj
                            .entry(obj.to_string())
                            .or_default()
                            .insert(k[obj.len()..].to_string(), v.clone());
                    }
                    // In the model but not instantiated: an empty answer (R-GET.1a).
                    Ok(by_obj.into_iter().collect())
                });
                (path.clone(), r)
            })
            .collect()
    }

    /// The unique keys of instance `object` (`…Table.3.`) with their values.
    pub(super) fn keys_of(
        object: &str,
        params: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let sp = Pattern::parse(object)
            .map(|p| p.schema_path())
            .unwrap_or_default();
        schema::unique_keys(&sp)
            .into_iter()
            .map(|k| {
                let v = params
                    .get(&format!("{object}{k}"))
                    .cloned()
                    .unwrap_or_default();
                (k, v)
            })
            .collect()
    }

    pub(super) fn get_instances(
        &self,
        paths: &[String],
        first_level_only: bool,
    ) -> InstancesResult {
        let params = self.parameters();
        let objects = instance_objects(&params);
        paths
            .iter()
            .map(|path| {
                let r = Self::resolve_path(path).and_then(|(pattern, known)| {
                    if !matches!(
                        known,
                        Known::Object(_) | Known::Table(_) | Known::Intermediate
                    ) {
                        return Err((E_INVALID_PATH, format!("{path}: not an object path")));
                    }
                    let depth = pattern.depth();
                    Ok(objects
                        .iter()
                        .filter(|o| pattern.matches(o, &params) && o.as_str() != path.as_str())
                        .filter(|o| {
                            !first_level_only
                                || o.trim_end_matches('.').split('.').count() == depth + 1
                        })
                        .map(|o| (o.clone(), Self::keys_of(o, &params)))
                        .collect())
                });
                (path.clone(), r)
            })
            .collect()
    }

    /// `Device.LocalAgent.Controller.{i}` of Controller `endpoint` ("" if it has none).
    pub(super) fn controller_ref(&self, endpoint: &str) -> String {
        let controllers = self.controllers.lock().unwrap();
        controllers
            .iter()
            .position(|c| c == endpoint)
            .map(|i| format!("{CONTROLLERS}{}", i + 1))
            .unwrap_or_default()
    }

    /// The endpoint id behind a `Device.LocalAgent.Controller.{i}` reference.
    fn controller_endpoint(&self, reference: &str) -> Option<String> {
        let n: usize = reference
            .trim_end_matches('.')
            .strip_prefix(CONTROLLERS)?
            .parse()
            .ok()?;
        let controllers = self.controllers.lock().unwrap();
        n.checked_sub(1).and_then(|i| controllers.get(i).cloned())
    }

    /// Sets one parameter of a subscription, checked as TR-181 declares it.
    fn set_subscription_param(
        &self,
        s: &mut Subscription,
        from: &str,
        role: Role,
        name: &str,
        value: &str,
    ) -> Result<(), Fault> {
        let boolean = |v: &str| match v {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err((
                E_INVALID_TYPE,
                format!("{name}: {v:?} is not a boolean (true, false, 1, 0)"),
            )),
        };
        match name {
            "Enable" => s.enable = boolean(value)?,
            "NotifRetry" => s.notif_retry = boolean(value)?,
            "Persistent" => s.persistent = boolean(value)?,
            "ID" if value.is_empty() => {
                return Err((E_INVALID_VALUE, "ID: must not be empty".into()))
            }
            "ID" => s.id = value.to_string(),
            "Recipient" => {
                let endpoint = self.controller_endpoint(value).ok_or_else(|| {
                    (
                        E_INVALID_VALUE,
                        format!("Recipient: {value:?} is not a {CONTROLLERS}{{i}} reference"),
                    )
                })?;
                if role == Role::Observer && endpoint != from {
                    return Err((
                        E_PERMISSION,
                        "Recipient: an observer subscribes only for itself".into(),
                    ));
                }
                s.recipient = endpoint;
            }
            "NotifType" => {
                const TYPES: [&str; 5] = [
                    "ValueChange",
                    "ObjectCreation",
                    "ObjectDeletion",
                    "Event",
                    "OperationComplete",
                ];
                if !TYPES.contains(&value) {
                    return Err((
                        E_INVALID_VALUE,
                        format!("NotifType: {value:?} is not one of {}", TYPES.join(", ")),
                    ));
                }
                s.notif_type = value.to_string();
            }
            "ReferenceList" => {
                let refs: Vec<String> = value
                    .split(',')
                    .map(|r| r.trim().to_string())
                    .filter(|r| !r.is_empty())
                    .collect();
                if refs.is_empty() {
                    return Err((E_INVALID_VALUE, "ReferenceList: empty".into()));
                }
                for r in &refs {
                    let (pattern, _) =
                        Self::resolve_path(r).map_err(|(_, m)| (E_INVALID_VALUE, m))?;
                    if pattern.has_search() {
                        return Err((
                            E_INVALID_VALUE,
                            format!("{r}: search expressions in a ReferenceList are not supported"),
                        ));
                    }
                }
                s.reference_list = refs;
            }
            _ => {
                return Err((
                    E_UNSUPPORTED_PARAM,
                    format!("{SUBS}{{i}}.{name}: no such parameter"),
                ))
            }
        }
        Ok(())
    }

    /// A subscription is unique by (Recipient, ID) and needs a type and references.
    fn check_subscription(st: &Persisted, s: &Subscription) -> Result<(), Fault> {
        if s.notif_type.is_empty() {
            return Err((E_INVALID_VALUE, "NotifType is required".into()));
        }
        if s.reference_list.is_empty() {
            return Err((E_INVALID_VALUE, "ReferenceList is required".into()));
        }
        if st
            .subscriptions
            .iter()
            .any(|o| o.instance != s.instance && o.id == s.id && o.recipient == s.recipient)
        {
            return Err((
                E_UNIQUE_KEY,
                format!(
                    "a subscription with ID {:?} exists for that Recipient",
                    s.id
                ),
            ));
        }
        Ok(())
    }

    pub(super) fn add(
        &self,
        from: &str,
        role: Role,
        allow_partial: bool,
        objects: Vec<(String, BTreeMap<String, String>)>,
    ) -> Outgoing {
        let mut st = self.st.lock().unwrap();
        let before = (st.next_subscription, st.subscriptions.clone());
        let mut results = Vec::new();
        for (path, params) in objects {
            let r = self.add_one(&mut st, from, role, &path, &params);
            results.push((path, r));
        }
        let errs = failed(&results);
        if !allow_partial && !errs.is_empty() {
            // All or nothing: what the request created is gone again.
            (st.next_subscription, st.subscriptions) = before;
            return Outgoing::Error(
                outer_code(&errs),
                "Add failed (allow_partial is false): nothing was created".into(),
                errs,
            );
        }
        if results.iter().any(|(_, r)| r.is_ok()) {
            if let Err(e) = self.persist(&st) {
                (st.next_subscription, st.subscriptions) = before;
                return Outgoing::Error(E_GENERAL, format!("cannot save: {e}"), vec![]);
            }
        }
        Outgoing::AddResp(results)
    }

    fn add_one(
        &self,
        st: &mut Persisted,
        from: &str,
        role: Role,
        path: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<Instance, Fault> {
        let (pattern, known) = Self::resolve_path(path)?;
        match known {
            Known::Table(o) if o.add_delete && !pattern.is_wildcard() && path == SUBS => {}
            Known::Table(_) => {
                return Err((
                    E_NOT_CREATABLE,
                    format!("{path}: its instances are made by the agent, not by Controllers"),
                ))
            }
            _ => {
                return Err((
                    E_NOT_A_TABLE,
                    format!("{path}: not a multi-instance object's table"),
                ))
            }
        }
        let instance = st.next_subscription + 1;
        let mut s = Subscription {
            instance,
            id: format!("gv-sub-{instance}"),
            recipient: from.to_string(),
            notif_type: String::new(),
            reference_list: vec![],
            notif_retry: false,
            enable: false,
            persistent: true,
        };
        for (name, value) in params {
            self.set_subscription_param(&mut s, from, role, name, value)
                .map_err(|(c, m)| (c, format!("{path}{name}: {m}")))?;
        }
        Self::check_subscription(st, &s)?;
        st.next_subscription = instance;
        let created = format!("{SUBS}{instance}.");
        let keys = [
            ("Recipient".to_string(), self.controller_ref(&s.recipient)),
            ("ID".to_string(), s.id.clone()),
        ]
        .into_iter()
        .collect();
        st.subscriptions.push(s);
        Ok((created, keys))
    }

    /// The subscriptions `pattern` names that `from` may change (an observer: its own).
    fn subscriptions_named(
        &self,
        st: &Persisted,
        pattern: &Pattern,
        from: &str,
        role: Role,
        params: &BTreeMap<String, String>,
    ) -> Result<Vec<u32>, Fault> {
        let hits: Vec<&Subscription> = st
            .subscriptions
            .iter()
            .filter(|s| pattern.matches(&format!("{SUBS}{}.", s.instance), params))
            .collect();
        if role == Role::Observer && hits.iter().any(|s| s.recipient != from) {
            return Err((
                E_PERMISSION,
                "an observer changes only its own subscriptions".into(),
            ));
        }
        Ok(hits.iter().map(|s| s.instance).collect())
    }

    pub(super) fn delete(
        &self,
        from: &str,
        role: Role,
        allow_partial: bool,
        paths: Vec<String>,
    ) -> Outgoing {
        let params = self.parameters();
        let mut st = self.st.lock().unwrap();
        let results: Vec<(String, Result<Vec<u32>, Fault>)> = paths
            .into_iter()
            .map(|path| {
                let r = Self::resolve_path(&path).and_then(|(pattern, known)| {
                    let Known::Object(o) = known else {
                        return Err((
                            E_NOT_DELETABLE,
                            format!("{path}: not an instance of a multi-instance object"),
                        ));
                    };
                    if !o.multi_instance || !path.ends_with('.') {
                        return Err((
                            E_NOT_DELETABLE,
                            format!("{path}: not an instance of a multi-instance object"),
                        ));
                    }
                    if !o.add_delete {
                        return Err((
                            E_NOT_DELETABLE,
                            format!(
                                "{path}: its instances are removed by the agent, not by Delete"
                            ),
                        ));
                    }
                    let mut hits = Vec::new();
                    for s in &st.subscriptions {
                        if pattern.matches(&format!("{SUBS}{}.", s.instance), &params) {
                            if role == Role::Observer && s.recipient != from {
                                return Err((
                                    E_PERMISSION,
                                    "an observer deletes only its own subscriptions".into(),
                                ));
                            }
                            hits.push(s.instance);
                        }
                    }
                    if hits.is_empty() && !pattern.is_wildcard() {
                        return Err((E_NO_OBJECT, format!("{path}: no such instance")));
                    }
                    Ok(hits)
                });
                (path, r)
            })
            .collect();
        let errs = failed(&results);
        if !allow_partial && !errs.is_empty() {
            let code = errs[0].1;
            return Outgoing::Error(
                code,
                "Delete failed (allow_partial is false): nothing was deleted".into(),
                errs,
            );
        }
        let gone: BTreeSet<u32> = results
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .flatten()
            .copied()
            .collect();
        if !gone.is_empty() {
            let before = st.subscriptions.clone();
            st.subscriptions.retain(|s| !gone.contains(&s.instance));
            if let Err(e) = self.persist(&st) {
                st.subscriptions = before;
                return Outgoing::Error(E_GENERAL, format!("cannot save: {e}"), vec![]);
            }
        }
        Outgoing::DeleteResp(
            results
                .into_iter()
                .map(|(p, r)| {
                    let r = r.map(|v| v.iter().map(|i| format!("{SUBS}{i}.")).collect());
                    (p, r)
                })
                .collect(),
        )
    }

    pub(super) fn set(
        &self,
        from: &str,
        role: Role,
        allow_partial: bool,
        objects: Vec<SetObject>,
    ) -> Outgoing {
        let params = self.parameters();
        let mut st = self.st.lock().unwrap();
        let before = st.subscriptions.clone();
        let mut results: Vec<(String, SetResult)> = Vec::new();
        // Services' settings, checked by each object and changed together at the end.
        let mut pending: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (path, settings) in objects {
            let r = self.set_one(
                &mut st,
                (from, role),
                &path,
                &settings,
                &params,
                &mut pending,
            );
            results.push((path, r));
        }
        let errs: Vec<ParamError> = results
            .iter()
            .filter_map(|(p, r)| r.as_ref().err().map(|f| (p, f)))
            .flat_map(|(p, f)| {
                if f.params.is_empty() {
                    vec![(p.clone(), f.code, f.message.clone())]
                } else {
                    f.params
                        .iter()
                        .map(|(inst, n, c, m)| (format!("{inst}{n}"), *c, m.clone()))
                        .collect()
                }
            })
            .collect();
        if !allow_partial && !errs.is_empty() {
            st.subscriptions = before;
            return Outgoing::Error(
                outer_code(&errs),
                "Set failed (allow_partial is false): nothing was changed".into(),
                errs,
            );
        }
        if st.subscriptions != before {
            if let Err(e) = self.persist(&st) {
                st.subscriptions = before;
                return Outgoing::Error(E_GENERAL, format!("cannot save: {e}"), vec![]);
            }
        }
        for (name, values) in pending {
            // Checked already: only the daemon failing to store them is left.
            let req = Request::ConfigSet {
                name: name.clone(),
                values,
                dry_run: false,
            };
            if let Err(e) = self.backend.call(req) {
                return Outgoing::Error(E_GENERAL, fault_text(&e.message, None), vec![]);
            }
        }
        Outgoing::SetResp(results)
    }

    /// The service and setting names behind the instances of `…Setting.{i}.` in `objects`,
    /// with each value checked (its type here, its declaration by the daemon); the changes
    /// are added to `pending` only when every one is valid.
    fn set_settings(
        &self,
        st: &Persisted,
        objects: &[String],
        settings: &[(String, String, bool)],
        params: &BTreeMap<String, String>,
        pending: &mut BTreeMap<String, BTreeMap<String, String>>,
    ) -> SetResult {
        let value = settings
            .iter()
            .find(|(n, ..)| n == "Value")
            .map(|(_, v, _)| v.clone())
            .unwrap_or_default();
        let mut mine: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let mut updated = Vec::new();
        let mut errs = Vec::new();
        for object in objects {
            let unit: Option<u32> = object
                .strip_prefix(&format!("{SM}ExecutionUnit."))
                .and_then(|r| r.split('.').next())
                .and_then(|n| n.parse().ok());
            let service = unit.and_then(|n| {
                st.units
                    .iter()
                    .find(|(_, u)| u.instance == n)
                    .map(|(name, _)| name.clone())
            });
            let (Some(service), Some(key), Some(ty)) = (
                service,
                params.get(&format!("{object}Name")),
                params.get(&format!("{object}Type")),
            ) else {
                errs.push((
                    object.clone(),
                    "Value".to_string(),
                    E_NO_OBJECT,
                    format!("{object}: no such instance"),
                ));
                continue;
            };
            // The type first (7011), then the declaration's bounds and format (7012).
            let typed = match ty.as_str() {
                "bool" => matches!(value.as_str(), "true" | "false" | "1" | "0"),
                "uint" => value.parse::<u64>().is_ok(),
                _ => true,
            };
            if !typed {
                errs.push((
                    object.clone(),
                    "Value".into(),
                    E_INVALID_TYPE,
                    format!("{object}Value: {value:?} is not a {ty}"),
                ));
                continue;
            }
            mine.entry(service)
                .or_default()
                .insert(key.clone(), value.clone());
            updated.push((
                object.clone(),
                BTreeMap::from([("Value".to_string(), value.clone())]),
            ));
        }
        if errs.is_empty() {
            for (service, values) in &mine {
                let mut all = pending.get(service).cloned().unwrap_or_default();
                all.extend(values.clone());
                let check = Request::ConfigSet {
                    name: service.clone(),
                    values: all,
                    dry_run: true,
                };
                if let Err(e) = self.backend.call(check) {
                    let code = match e.kind {
                        ErrorKind::Invalid => E_INVALID_VALUE,
                        ErrorKind::NotFound => E_NO_OBJECT,
                        _ => E_GENERAL,
                    };
                    let object = objects.first().cloned().unwrap_or_default();
                    errs.push((object, "Value".into(), code, fault_text(&e.message, None)));
                }
            }
        }
        if !errs.is_empty() {
            return Err(SetFailure {
                code: errs[0].2,
                message: errs[0].3.clone(),
                params: errs,
            });
        }
        for (service, values) in mine {
            pending.entry(service).or_default().extend(values);
        }
        Ok(updated)
    }

    /// One object of a Set: every instance it names gets every setting, or (a required
    /// setting failed) none does.
    fn set_one(
        &self,
        st: &mut Persisted,
        (from, role): (&str, Role),
        path: &str,
        settings: &[(String, String, bool)],
        params: &BTreeMap<String, String>,
        pending: &mut BTreeMap<String, BTreeMap<String, String>>,
    ) -> SetResult {
        let whole = |code, message: String| SetFailure {
            code,
            message,
            params: vec![],
        };
        let (pattern, known) = Self::resolve_path(path).map_err(|(c, m)| whole(c, m))?;
        let Known::Object(o) = known else {
            return Err(whole(
                E_INVALID_PATH,
                format!("{path}: a Set names objects; their parameters go in param_settings"),
            ));
        };
        // The instances it names, as they are now.
        let instances: Vec<String> = if o.multi_instance {
            instance_objects(params)
                .into_iter()
                .filter(|i| {
                    pattern.matches(i, params)
                        && i.trim_end_matches('.').split('.').count() == pattern.depth()
                })
                .collect()
        } else if params.keys().any(|k| pattern.matches(k, params)) {
            vec![path.to_string()]
        } else {
            vec![]
        };
        if instances.is_empty() && !pattern.is_wildcard() {
            return Err(whole(E_NO_OBJECT, format!("{path}: no such instance")));
        }
        let mut param_errs = Vec::new();
        for (name, _, _) in settings {
            match o.params.iter().find(|(n, ..)| n == name) {
                None => param_errs.push((
                    path.to_string(),
                    name.clone(),
                    E_UNSUPPORTED_PARAM,
                    format!("{}{name}: no such parameter", o.path),
                )),
                Some((_, _, false)) => param_errs.push((
                    path.to_string(),
                    name.clone(),
                    E_READ_ONLY,
                    format!("{}{name}: read-only", o.path),
                )),
                Some(_) => {}
            }
        }
        if !param_errs.is_empty() {
            return Err(SetFailure {
                code: param_errs[0].2,
                message: format!("{path}: {}", param_errs[0].3),
                params: param_errs,
            });
        }
        if o.path.ends_with(&format!("{VENDOR}Setting.{{i}}.")) {
            return self.set_settings(st, &instances, settings, params, pending);
        }
        // Every other writable parameter of the model is a subscription's.
        let named = self
            .subscriptions_named(st, &pattern, from, role, params)
            .map_err(|(c, m)| whole(c, m))?;
        let mut changed = Vec::new();
        for inst in named {
            let Some(i) = st.subscriptions.iter().position(|s| s.instance == inst) else {
                continue;
            };
            let mut s = st.subscriptions[i].clone();
            let object = format!("{SUBS}{inst}.");
            for (name, value, _) in settings {
                if let Err((c, m)) = self.set_subscription_param(&mut s, from, role, name, value) {
                    param_errs.push((object.clone(), name.clone(), c, m));
                }
            }
            if param_errs.is_empty() {
                if let Err((c, m)) = Self::check_subscription(st, &s) {
                    param_errs.push((object.clone(), "ID".into(), c, m));
                }
            }
            if !param_errs.is_empty() {
                return Err(SetFailure {
                    code: param_errs[0].2,
                    message: format!("{object}: {}", param_errs[0].3),
                    params: param_errs,
                });
            }
            changed.push((i, s, object));
        }
        let mut updated = Vec::new();
        for (i, s, object) in changed {
            st.subscriptions[i] = s;
            let set: BTreeMap<String, String> = settings
                .iter()
                .map(|(n, v, _)| (n.clone(), v.clone()))
                .collect();
            updated.push((object, set));
        }
        Ok(updated)
    }
}
