//! USP Records and Messages on the wire, behind a small trait: the data model and the
//! transports see only [`Incoming`] and [`Outgoing`]; [`Rusp`] encodes them with `rusp-lib`.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug, thiserror::Error)]
#[error("USP encoding: {0}")]
pub struct CodecError(pub String);

fn cerr(e: impl std::fmt::Display) -> CodecError {
    CodecError(e.to_string())
}

/// Who sent a Record to whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub from_id: String,
    pub to_id: String,
}

/// A request (or a notification response) a Controller sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Get {
        paths: Vec<String>,
        max_depth: u32,
    },
    GetInstances {
        paths: Vec<String>,
        first_level_only: bool,
    },
    Add {
        allow_partial: bool,
        /// (object path, parameter settings)
        objects: Vec<(String, BTreeMap<String, String>)>,
    },
    Delete {
        allow_partial: bool,
        paths: Vec<String>,
    },
    Set {
        allow_partial: bool,
        objects: Vec<SetObject>,
    },
    GetSupportedDM {
        paths: Vec<String>,
        flags: SupportedDmFlags,
    },
    Operate {
        command: String,
        command_key: String,
        send_resp: bool,
        args: BTreeMap<String, String>,
    },
    NotifyResp {
        subscription_id: String,
    },
    /// A Broker's answer to our Register: the registered paths, or why not.
    RegisterResp(Vec<(String, Result<(), Fault>)>),
    /// A connect record (UDS, MQTT…): the peer says who it is, nothing to answer.
    Connect,
    /// A message this agent does not serve (its type's name).
    Unsupported(String),
}

/// A USP error: code and message.
pub type Fault = (u32, String);

/// What a GetSupportedDM asks to be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SupportedDmFlags {
    pub first_level_only: bool,
    pub commands: bool,
    pub events: bool,
    pub params: bool,
    pub unique_key_sets: bool,
}

impl Default for SupportedDmFlags {
    fn default() -> Self {
        SupportedDmFlags {
            first_level_only: false,
            commands: true,
            events: true,
            params: true,
            unique_key_sets: true,
        }
    }
}

/// One object of a Set: its path and its parameter settings (name, value, required).
pub type SetObject = (String, Vec<(String, String, bool)>);

/// A path that failed inside an Error message (`param_errs`): path, code, message.
pub type ParamError = (String, u32, String);

/// One instance GetInstances found: its path and its unique keys (name → value).
pub type Instance = (String, BTreeMap<String, String>);

/// Per requested path of a GetInstances: the instances, or an error.
pub type InstancesResult = Vec<(String, Result<Vec<Instance>, Fault>)>;

/// One requested object of a Set: the instances it updated with the parameters set, or why
/// not (with the parameters that failed: instance path, parameter, code, message).
pub type SetResult = Result<Vec<(String, BTreeMap<String, String>)>, SetFailure>;

#[derive(Debug, Clone, PartialEq)]
pub struct SetFailure {
    pub code: u32,
    pub message: String,
    pub params: Vec<(String, String, u32, String)>,
}

/// One requested path's Get result: resolved objects with their parameters, or an error.
pub type GetResult = Result<Vec<(String, BTreeMap<String, String>)>, Fault>;

/// Per requested path: the paths it resolved to (instances, deleted objects), or an error.
pub type PathsResult = Vec<(String, Result<Vec<String>, Fault>)>;

/// A parameter's type, as GetSupportedDM reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    String,
    Boolean,
    UnsignedInt,
    Int,
    DateTime,
}

/// One object of the supported data model (GetSupportedDM).
#[derive(Debug, Clone, PartialEq)]
pub struct SupportedObject {
    /// With `{i}` for multi-instance objects.
    pub path: String,
    pub multi_instance: bool,
    /// Controllers may Add and Delete its instances.
    pub add_delete: bool,
    pub params: Vec<(String, ParamType, bool)>,
    /// Its unique key sets (parameter names), for multi-instance objects.
    pub unique_keys: Vec<Vec<String>>,
    /// (name with `()`, input args, output args, asynchronous)
    pub commands: Vec<(String, Vec<String>, Vec<String>, bool)>,
    /// (name with `!`, args)
    pub events: Vec<(String, Vec<String>)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OperateOutcome {
    /// An asynchronous command's Request object.
    Started(String),
    Done(BTreeMap<String, String>),
    Failed(u32, String),
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum NotifyKind {
    ValueChange {
        path: String,
        value: String,
    },
    Event {
        obj_path: String,
        name: String,
        args: BTreeMap<String, String>,
    },
    ObjectCreation {
        path: String,
        /// The new instance's unique keys.
        #[serde(default)]
        keys: BTreeMap<String, String>,
    },
    ObjectDeletion {
        path: String,
    },
    OperationComplete {
        obj_path: String,
        command: String,
        command_key: String,
        result: Result<BTreeMap<String, String>, (u32, String)>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    GetResp(Vec<(String, GetResult)>),
    GetInstancesResp(InstancesResult),
    /// (requested path, created instance with its unique keys, or error)
    AddResp(Vec<(String, Result<Instance, Fault>)>),
    DeleteResp(PathsResult),
    SetResp(Vec<(String, SetResult)>),
    GetSupportedDMResp(Vec<(String, Result<Vec<SupportedObject>, Fault>)>),
    OperateResp(Vec<(String, OperateOutcome)>),
    /// An Error message, with the paths that failed (Add, Set, Delete without
    /// `allow_partial`).
    Error(u32, String, Vec<ParamError>),
    /// A USP Service registers the objects it serves with the Broker.
    Register(Vec<String>),
    Notify {
        subscription_id: String,
        send_resp: bool,
        kind: NotifyKind,
    },
}

/// Turns Records into requests and answers into Records.
pub trait Codec: Send + Sync {
    /// Decodes a Record carrying one unfragmented Message.
    fn decode(&self, record: &[u8]) -> Result<(Envelope, String, Incoming), CodecError>;
    fn encode(&self, env: &Envelope, msg_id: &str, out: &Outgoing) -> Result<Vec<u8>, CodecError>;
    /// A UDS connect record (no message).
    fn encode_uds_connect(&self, env: &Envelope) -> Result<Vec<u8>, CodecError>;
}

/// The data model this agent's supported objects come from (GetSupportedDM's
/// `data_model_inst_uri`): TR-181 Issue 2 Amendment 16, the USP flavour.
pub const DATA_MODEL_URI: &str = "urn:broadband-forum-org:tr-181-2-16-0-usp";

/// The `rusp-lib` codec (USP 1.3 Records, no session context).
pub struct Rusp;

fn hm(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

impl Codec for Rusp {
    fn decode(&self, record: &[u8]) -> Result<(Envelope, String, Incoming), CodecError> {
        use rusp_lib::usp::mod_Body::OneOfmsg_body;
        use rusp_lib::usp::mod_Request::OneOfreq_type as R;
        use rusp_lib::usp::mod_Response::OneOfresp_type;
        use rusp_lib::usp_record::mod_Record::OneOfrecord_type;
        let rec = rusp_lib::usp_decoder::try_decode_record(record).map_err(cerr)?;
        let env = Envelope {
            from_id: rec.from_id.clone(),
            to_id: rec.to_id.clone(),
        };
        let nsc = match &rec.record_type {
            OneOfrecord_type::no_session_context(nsc) => nsc,
            OneOfrecord_type::uds_connect(_)
            | OneOfrecord_type::mqtt_connect(_)
            | OneOfrecord_type::websocket_connect(_)
            | OneOfrecord_type::stomp_connect(_) => {
                return Ok((env, String::new(), Incoming::Connect))
            }
            _ => {
                return Err(CodecError(
                    "only Records without a session context carry messages here".into(),
                ))
            }
        };
        let msg = rusp_lib::usp_decoder::try_decode_msg(&nsc.payload).map_err(cerr)?;
        let msg_id = msg
            .header
            .as_ref()
            .map(|h| h.msg_id.clone())
            .unwrap_or_default();
        let body = msg.body.map(|b| b.msg_body).unwrap_or(OneOfmsg_body::None);
        let incoming = match body {
            OneOfmsg_body::request(r) => match r.req_type {
                R::get(g) => Incoming::Get {
                    paths: g.param_paths,
                    max_depth: g.max_depth,
                },
                R::get_instances(g) => Incoming::GetInstances {
                    paths: g.obj_paths,
                    first_level_only: g.first_level_only,
                },
                R::add(a) => Incoming::Add {
                    allow_partial: a.allow_partial,
                    objects: a
                        .create_objs
                        .into_iter()
                        .map(|o| {
                            let params = o
                                .param_settings
                                .into_iter()
                                .map(|p| (p.param, p.value))
                                .collect();
                            (o.obj_path, params)
                        })
                        .collect(),
                },
                R::delete(d) => Incoming::Delete {
                    allow_partial: d.allow_partial,
                    paths: d.obj_paths,
                },
                R::set(st) => Incoming::Set {
                    allow_partial: st.allow_partial,
                    objects: st
                        .update_objs
                        .into_iter()
                        .map(|o| {
                            let params = o
                                .param_settings
                                .into_iter()
                                .map(|p| (p.param, p.value, p.required))
                                .collect();
                            (o.obj_path, params)
                        })
                        .collect(),
                },
                R::operate(o) => Incoming::Operate {
                    command: o.command,
                    command_key: o.command_key,
                    send_resp: o.send_resp,
                    args: o.input_args.into_iter().collect(),
                },
                R::get_supported_dm(g) => Incoming::GetSupportedDM {
                    paths: g.obj_paths,
                    flags: SupportedDmFlags {
                        first_level_only: g.first_level_only,
                        commands: g.return_commands,
                        events: g.return_events,
                        params: g.return_params,
                        unique_key_sets: g.return_unique_key_sets,
                    },
                },
                R::get_supported_protocol(_) => {
                    Incoming::Unsupported("GetSupportedProtocol".into())
                }
                R::notify(_) => Incoming::Unsupported("Notify".into()),
                R::register(_) => Incoming::Unsupported("Register".into()),
                R::deregister(_) => Incoming::Unsupported("Deregister".into()),
                R::None => Incoming::Unsupported("an empty request".into()),
            },
            OneOfmsg_body::response(r) => match r.resp_type {
                OneOfresp_type::notify_resp(n) => Incoming::NotifyResp {
                    subscription_id: n.subscription_id,
                },
                OneOfresp_type::register_resp(r) => {
                    use rusp_lib::usp::mod_RegisterResp::mod_RegisteredPathResult::mod_OperationStatus::OneOfoper_status as S;
                    Incoming::RegisterResp(
                        r.registered_path_results
                            .into_iter()
                            .map(|p| {
                                let st = match p.oper_status.map(|o| o.oper_status) {
                                    Some(S::oper_success(_)) => Ok(()),
                                    Some(S::oper_failure(f)) => Err((f.err_code, f.err_msg)),
                                    _ => Err((0, "no status".to_string())),
                                };
                                (p.requested_path, st)
                            })
                            .collect(),
                    )
                }
                _ => Incoming::Unsupported("a response".into()),
            },
            OneOfmsg_body::error(_) => Incoming::Unsupported("Error".into()),
            OneOfmsg_body::None => Incoming::Unsupported("an empty message".into()),
        };
        Ok((env, msg_id, incoming))
    }

    fn encode(&self, env: &Envelope, msg_id: &str, out: &Outgoing) -> Result<Vec<u8>, CodecError> {
        use rusp_lib::usp_builder as b;
        let body = match out {
            Outgoing::GetResp(results) => {
                let mut rs = Vec::new();
                for (path, r) in results {
                    let mut rp = b::GetReqPathResultBuilder::new(path.clone());
                    match r {
                        Ok(objs) => {
                            let res = objs
                                .iter()
                                .map(|(obj, params)| {
                                    b::ResolvedPathResultBuilder::new(obj.clone())
                                        .with_result_params(
                                            params
                                                .iter()
                                                .map(|(k, v)| (k.clone(), v.clone()))
                                                .collect(),
                                        )
                                })
                                .collect();
                            rp = rp.with_res_path_results(res);
                        }
                        Err((code, m)) => rp = rp.set_err(*code, Some(m.clone())),
                    }
                    rs.push(rp);
                }
                b::GetRespBuilder::new().with_req_path_results(rs).build()
            }
            Outgoing::GetInstancesResp(results) => {
                let rs = results
                    .iter()
                    .map(|(path, r)| {
                        let rp = b::GetInstancesRespReqPathResultBuilder::new(path.clone());
                        match r {
                            Ok(insts) => rp.with_curr_insts(
                                insts
                                    .iter()
                                    .map(|(i, keys)| {
                                        b::CurrInstanceBuilder::new(i.clone()).with_unique_keys(
                                            keys.iter()
                                                .map(|(k, v)| (k.clone(), v.clone()))
                                                .collect(),
                                        )
                                    })
                                    .collect(),
                            ),
                            Err((code, m)) => rp.set_err(*code, Some(m.clone())),
                        }
                    })
                    .collect();
                b::GetInstancesRespBuilder::new()
                    .with_req_path_results(rs)
                    .build()
            }
            Outgoing::AddResp(results) => {
                let rs = results
                    .iter()
                    .map(|(path, r)| {
                        let st = match r {
                            Ok((inst, keys)) => b::AddOperationStatus::new().set_success(
                                inst.clone(),
                                vec![],
                                hm(keys),
                            ),
                            Err((code, m)) => {
                                b::AddOperationStatus::new().set_failure(*code, Some(m.clone()))
                            }
                        };
                        b::CreatedObjectResultsBuilder::new(path.clone(), st)
                    })
                    .collect();
                b::AddRespBuilder::new()
                    .with_created_obj_results(rs)
                    .build()
            }
            Outgoing::DeleteResp(results) => {
                let rs = results
                    .iter()
                    .map(|(path, r)| {
                        let d = b::DeletedObjectResultsBuilder::new(path.clone());
                        match r {
                            Ok(affected) => d.set_success(affected.clone(), vec![]),
                            Err((code, m)) => d.set_failure(*code, Some(m.clone())),
                        }
                    })
                    .collect();
                b::DeleteRespBuilder::new()
                    .with_deleted_obj_results(rs)
                    .build()
            }
            Outgoing::OperateResp(results) => {
                let mut rs = Vec::new();
                for (cmd, outcome) in results {
                    let r = b::OperateRespResultBuilder::new(cmd.clone());
                    rs.push(match outcome {
                        OperateOutcome::Started(p) => r.set_path(p.clone()),
                        OperateOutcome::Done(args) => r.set_output_args(
                            args.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                        ),
                        OperateOutcome::Failed(code, m) => r.set_failure(*code, Some(m.clone())),
                    });
                }
                b::OperateRespBuilder::new()
                    .with_operation_results(rs)
                    .build()
            }
            Outgoing::Error(code, m, errs) => b::ErrorBuilder::new()
                .set_err(*code, Some(m.clone()))
                .with_param_errs(errs.clone())
                .build(),
            Outgoing::SetResp(results) => {
                let rs = results
                    .iter()
                    .map(|(path, r)| {
                        let st = match r {
                            Ok(updated) => b::SetOperationStatus::new().set_success(
                                updated
                                    .iter()
                                    .map(|(inst, params)| {
                                        b::SetOperationSuccessBuilder::new(inst.clone())
                                            .with_updated_params(hm(params))
                                    })
                                    .collect(),
                            ),
                            Err(f) => {
                                let mut by_inst: BTreeMap<&str, Vec<b::SetRespParameterError>> =
                                    BTreeMap::new();
                                for (inst, param, code, m) in &f.params {
                                    by_inst.entry(inst).or_default().push(
                                        b::SetRespParameterError::new(
                                            param.clone(),
                                            *code,
                                            Some(m.clone()),
                                        ),
                                    );
                                }
                                b::SetOperationStatus::new().set_failure(
                                    f.code,
                                    Some(f.message.clone()),
                                    by_inst
                                        .into_iter()
                                        .map(|(inst, errs)| {
                                            b::UpdatedInstanceFailureBuilder::new(inst.into())
                                                .with_param_errs(errs)
                                        })
                                        .collect(),
                                )
                            }
                        };
                        b::UpdatedObjectResultsBuilder::new(path.clone(), st)
                    })
                    .collect();
                b::SetRespBuilder::new()
                    .with_updated_obj_results(rs)
                    .build()
            }
            Outgoing::GetSupportedDMResp(results) => {
                let rs = results
                    .iter()
                    .map(|(path, r)| {
                        let rb = b::GSDMReqObjectResultBuilder::new(path.clone())
                            .with_data_model_inst_uri(DATA_MODEL_URI.into());
                        match r {
                            Err((code, m)) => rb.set_err(*code, Some(m.clone())),
                            Ok(objs) => rb.with_supported_objs(
                                objs.iter()
                                    .map(|o| {
                                        let ob = b::GSDMSupportedObjectResultBuilder::new(
                                            o.path.clone(),
                                        )
                                        .with_is_multi_instance(o.multi_instance)
                                        .with_unique_key_sets(o.unique_keys.clone());
                                        let ob = if o.add_delete {
                                            ob.set_access_add_delete()
                                        } else {
                                            ob.set_access_read_only()
                                        };
                                        ob.with_supported_params(
                                            o.params
                                                .iter()
                                                .map(|(n, t, w)| {
                                                    let p = b::GSDMParamResult::new(n.clone());
                                                    let p = match t {
                                                        ParamType::String => p.set_type_string(),
                                                        ParamType::Boolean => p.set_type_boolean(),
                                                        ParamType::UnsignedInt => {
                                                            p.set_type_unsigned_int()
                                                        }
                                                        ParamType::Int => p.set_type_int(),
                                                        ParamType::DateTime => {
                                                            p.set_type_datetime()
                                                        }
                                                    };
                                                    if *w {
                                                        p.set_access_read_write()
                                                    } else {
                                                        p.set_access_read_only()
                                                    }
                                                })
                                                .collect(),
                                        )
                                        .with_supported_commands(
                                            o.commands
                                                .iter()
                                                .map(|(n, i, out, asy)| {
                                                    let c = b::GSDMCommandResult::new(n.clone())
                                                        .with_input_arg_names(i.clone())
                                                        .with_output_arg_names(out.clone());
                                                    if *asy {
                                                        c.set_async()
                                                    } else {
                                                        c.set_sync()
                                                    }
                                                })
                                                .collect(),
                                        )
                                        .with_supported_events(
                                            o.events
                                                .iter()
                                                .map(|(n, a)| {
                                                    b::GSDMEventResult::new(n.clone())
                                                        .with_arg_names(a.clone())
                                                })
                                                .collect(),
                                        )
                                    })
                                    .collect(),
                            ),
                        }
                    })
                    .collect();
                b::GetSupportedDMRespBuilder::new()
                    .with_req_obj_results(rs)
                    .build()
            }
            Outgoing::Register(paths) => b::RegisterBuilder::new()
                .with_allow_partial(false)
                .with_reg_paths(paths.clone())
                .build(),
            Outgoing::Notify {
                subscription_id,
                send_resp,
                kind,
            } => {
                let n = b::NotifyBuilder::new(subscription_id.clone()).with_send_resp(*send_resp);
                let n = match kind {
                    NotifyKind::ValueChange { path, value } => {
                        n.with_value_change(path.clone(), value.clone())
                    }
                    NotifyKind::Event {
                        obj_path,
                        name,
                        args,
                    } => n.with_event(obj_path.clone(), name.clone(), hm(args)),
                    NotifyKind::ObjectCreation { path, keys } => {
                        n.with_object_creation(path.clone(), hm(keys))
                    }
                    NotifyKind::ObjectDeletion { path } => n.with_object_deletion(path.clone()),
                    NotifyKind::OperationComplete {
                        obj_path,
                        command,
                        command_key,
                        result,
                    } => match result {
                        Ok(args) => n.with_operation_complete_output_args(
                            obj_path.clone(),
                            command.clone(),
                            command_key.clone(),
                            hm(args),
                        ),
                        Err((code, m)) => n.with_operation_complete_cmd_failure(
                            obj_path.clone(),
                            command.clone(),
                            command_key.clone(),
                            *code,
                            m.clone(),
                        ),
                    },
                };
                n.build()
            }
        }
        .map_err(cerr)?;
        let msg = b::MsgBuilder::new()
            .with_msg_id(msg_id.to_string())
            .with_body(body)
            .build()
            .map_err(cerr)?;
        let rec = b::RecordBuilder::new()
            .with_version("1.3".into())
            .with_to_id(env.to_id.clone())
            .with_from_id(env.from_id.clone())
            .with_no_session_context_payload(&msg)
            .build()
            .map_err(cerr)?;
        rec.to_vec().map_err(cerr)
    }

    fn encode_uds_connect(&self, env: &Envelope) -> Result<Vec<u8>, CodecError> {
        rusp_lib::usp_builder::RecordBuilder::new()
            .with_version("1.3".into())
            .with_to_id(env.to_id.clone())
            .with_from_id(env.from_id.clone())
            .as_uds_connect_record()
            .build()
            .map_err(cerr)?
            .to_vec()
            .map_err(cerr)
    }
}
