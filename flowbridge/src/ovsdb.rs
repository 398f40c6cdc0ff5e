//! OVSDB client (RFC 7047) over a Unix socket, blocking, one outstanding request at a time.
//!
//! Messages are JSON objects written back to back (no framing), so replies are read with a
//! streaming JSON deserializer. The server may send `echo` requests; they are answered.

use serde_json::{json, Value};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const DB: &str = "Open_vSwitch";
/// `external_ids` key that marks rows gatevisor owns.
pub const OWNER_KEY: &str = "gatevisor-owner";
/// `external_ids` key naming the service a port belongs to.
pub const SERVICE_KEY: &str = "gatevisor-service";

#[derive(Debug, thiserror::Error)]
pub enum OvsdbError {
    #[error("cannot connect to the OVSDB socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("OVSDB connection failed")]
    Io(#[from] std::io::Error),
    #[error("OVSDB sent something that is not JSON-RPC: {0}")]
    Protocol(String),
    #[error("OVSDB {method} failed: {error}")]
    Rpc { method: String, error: String },
    #[error("OVSDB transaction failed: {0}")]
    Transaction(String),
    #[error(
        "ovs-vswitchd did not apply configuration {want} within {waited_ms} ms (it has {have})"
    )]
    NotApplied {
        want: i64,
        have: i64,
        waited_ms: u128,
    },
    #[error("no bridge named {0}")]
    NoBridge(String),
}

type Result<T> = std::result::Result<T, OvsdbError>;

pub struct Ovsdb {
    stream: UnixStream,
    reader: serde_json::StreamDeserializer<'static, serde_json::de::IoRead<UnixStream>, Value>,
    next_id: u64,
}

/// A port as the database describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    pub name: String,
    pub external_ids: Vec<(String, String)>,
    /// OpenFlow port number, once `ovs-vswitchd` assigned one; -1 when it could not open the
    /// interface (e.g. the device is gone).
    pub ofport: Option<i64>,
}

impl Ovsdb {
    pub fn connect(path: &Path) -> Result<Ovsdb> {
        let stream = UnixStream::connect(path).map_err(|source| OvsdbError::Connect {
            path: path.into(),
            source,
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let reader = serde_json::Deserializer::from_reader(stream.try_clone()?).into_iter();
        Ok(Ovsdb {
            stream,
            reader,
            next_id: 1,
        })
    }

    /// Sends one request and returns its `result`.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"method": method, "params": params, "id": id});
        self.stream
            .write_all(&serde_json::to_vec(&msg).expect("json"))?;
        loop {
            let v = match self.reader.next() {
                Some(Ok(v)) => v,
                Some(Err(e)) if e.is_io() => return Err(OvsdbError::Io(e.into())),
                Some(Err(e)) => return Err(OvsdbError::Protocol(e.to_string())),
                None => return Err(OvsdbError::Protocol("connection closed".into())),
            };
            if v.get("method").and_then(Value::as_str) == Some("echo") {
                let reply = json!({"result": v["params"], "error": null, "id": v["id"]});
                self.stream
                    .write_all(&serde_json::to_vec(&reply).expect("json"))?;
                continue;
            }
            if v.get("id").and_then(Value::as_u64) != Some(id) {
                // An update for a monitor we do not hold here, or a stale reply.
                continue;
            }
            if !v["error"].is_null() {
                return Err(OvsdbError::Rpc {
                    method: method.into(),
                    error: v["error"].to_string(),
                });
            }
            return Ok(v["result"].clone());
        }
    }

    /// Runs a transaction on the Open_vSwitch database; fails if any operation failed.
    pub fn transact(&mut self, ops: Vec<Value>) -> Result<Vec<Value>> {
        let mut params = vec![json!(DB)];
        params.extend(ops);
        let result = self.call("transact", Value::Array(params))?;
        let results = result
            .as_array()
            .cloned()
            .ok_or_else(|| OvsdbError::Protocol(format!("transact result {result}")))?;
        if let Some(e) = results
            .iter()
            .find(|r| r.get("error").is_some_and(|e| !e.is_null()))
        {
            return Err(OvsdbError::Transaction(e.to_string()));
        }
        Ok(results)
    }

    fn select(&mut self, table: &str, cond: Value, columns: &[&str]) -> Result<Vec<Value>> {
        let r = self.transact(vec![json!({
            "op": "select", "table": table, "where": cond, "columns": columns
        })])?;
        Ok(r[0]["rows"].as_array().cloned().unwrap_or_default())
    }

    /// Makes sure the root `Open_vSwitch` row exists (a fresh database has none).
    pub fn init(&mut self) -> Result<()> {
        if self
            .select("Open_vSwitch", json!([]), &["_uuid"])?
            .is_empty()
        {
            self.transact(vec![
                json!({"op": "insert", "table": "Open_vSwitch", "row": {}}),
            ])?;
        }
        Ok(())
    }

    /// Sets `other_config:flow-restore-wait`. While it is true a starting `ovs-vswitchd`
    /// neither forwards packets nor flushes the datapath's cached flows; the controller clears
    /// it once it restored the flows, so no packet meets an empty (or default, `NORMAL`) table.
    pub fn set_flow_restore_wait(&mut self, on: bool) -> Result<()> {
        // The key goes first either way (`insert` would keep an existing value); mutations
        // apply in order, in one transaction.
        let mut mutations = vec![json!([
            "other_config",
            "delete",
            ["set", ["flow-restore-wait"]]
        ])];
        if on {
            mutations.push(json!([
                "other_config",
                "insert",
                ["map", [["flow-restore-wait", "true"]]]
            ]));
        }
        self.transact(vec![
            json!({"op": "mutate", "table": "Open_vSwitch", "where": [], "mutations": mutations}),
        ])?;
        Ok(())
    }

    /// Whether `other_config:flow-restore-wait` is set.
    pub fn flow_restore_wait(&mut self) -> Result<bool> {
        let rows = self.select("Open_vSwitch", json!([]), &["other_config"])?;
        Ok(rows.first().is_some_and(|r| {
            map_pairs(&r["other_config"])
                .iter()
                .any(|(k, v)| k == "flow-restore-wait" && v == "true")
        }))
    }

    /// Creates bridge `name` with `datapath_type` and `fail_mode = secure` unless it exists.
    /// Returns true when created. An existing bridge is left as it is (it may be the
    /// gateway's own), but for the fail mode of one gatevisor made.
    pub fn ensure_bridge(&mut self, name: &str, datapath_type: &str) -> Result<bool> {
        let rows = self.select(
            "Bridge",
            json!([["name", "==", name]]),
            &["_uuid", "external_ids", "fail_mode"],
        )?;
        if let Some(row) = rows.first() {
            // A bridge an earlier gatevisor made without `secure`: made so now. A bridge of
            // the gateway's own is left as it is.
            let ours = map_pairs(&row["external_ids"])
                .iter()
                .any(|(k, _)| k == OWNER_KEY);
            if ours && row["fail_mode"] != "secure" {
                self.transact(vec![json!({"op": "update", "table": "Bridge",
                    "where": [["name", "==", name]], "row": {"fail_mode": "secure"}})])?;
            }
            return Ok(false);
        }
        // `secure`: a restarted ovs-vswitchd (a system switch restarted without `ovs-ctl`'s
        // save and restore) forwards nothing until the daemon put its flows back, instead of
        // switching everything with its default NORMAL flow (which would open fail-closed
        // classes for that moment).
        self.transact(vec![
            json!({"op": "insert", "table": "Interface", "uuid-name": "iface",
                   "row": {"name": name, "type": "internal"}}),
            json!({"op": "insert", "table": "Port", "uuid-name": "port",
                   "row": {"name": name, "interfaces": ["named-uuid", "iface"]}}),
            json!({"op": "insert", "table": "Bridge", "uuid-name": "br",
                   "row": {"name": name, "datapath_type": datapath_type,
                           "fail_mode": "secure",
                           "ports": ["named-uuid", "port"],
                           "external_ids": ["map", [[OWNER_KEY, "true"]]]}}),
            json!({"op": "mutate", "table": "Open_vSwitch", "where": [],
                   "mutations": [["bridges", "insert", ["set", [["named-uuid", "br"]]]]]}),
        ])?;
        Ok(true)
    }

    /// Adds `port` (an existing kernel interface: a veth or tap) to `bridge`, marked as owned
    /// by gatevisor for `service`.
    pub fn add_port(&mut self, bridge: &str, port: &str, service: &str) -> Result<()> {
        if self
            .select("Bridge", json!([["name", "==", bridge]]), &["_uuid"])?
            .is_empty()
        {
            return Err(OvsdbError::NoBridge(bridge.into()));
        }
        let ids = json!(["map", [[OWNER_KEY, "true"], [SERVICE_KEY, service]]]);
        self.transact(vec![
            json!({"op": "insert", "table": "Interface", "uuid-name": "iface",
                   "row": {"name": port, "external_ids": ids}}),
            json!({"op": "insert", "table": "Port", "uuid-name": "port",
                   "row": {"name": port, "interfaces": ["named-uuid", "iface"], "external_ids": ids}}),
            json!({"op": "mutate", "table": "Bridge", "where": [["name", "==", bridge]],
                   "mutations": [["ports", "insert", ["set", [["named-uuid", "port"]]]]]}),
        ])?;
        Ok(())
    }

    /// Removes `port` from `bridge` if gatevisor owns it. Returns false when there was no such
    /// port; refuses ports gatevisor does not own.
    pub fn del_port(&mut self, bridge: &str, port: &str) -> Result<bool> {
        let rows = self.select(
            "Port",
            json!([["name", "==", port]]),
            &["_uuid", "external_ids"],
        )?;
        let Some(row) = rows.first() else {
            return Ok(false);
        };
        if !map_pairs(&row["external_ids"])
            .iter()
            .any(|(k, _)| k == OWNER_KEY)
        {
            return Err(OvsdbError::Transaction(format!(
                "port {port} is not owned by gatevisor; not removing it"
            )));
        }
        let uuid = row["_uuid"].clone();
        self.transact(vec![json!({"op": "mutate", "table": "Bridge",
            "where": [["name", "==", bridge]],
            "mutations": [["ports", "delete", ["set", [uuid]]]]})])?;
        Ok(true)
    }

    /// The ports of `bridge` with their external ids and OpenFlow numbers.
    pub fn ports(&mut self, bridge: &str) -> Result<Vec<PortInfo>> {
        let br = self.select("Bridge", json!([["name", "==", bridge]]), &["ports"])?;
        let Some(br) = br.first() else {
            return Err(OvsdbError::NoBridge(bridge.into()));
        };
        let port_uuids: Vec<Value> = set_items(&br["ports"]);
        let mut out = Vec::new();
        for p in port_uuids {
            let rows = self.select(
                "Port",
                json!([["_uuid", "==", p]]),
                &["name", "external_ids", "interfaces"],
            )?;
            let Some(row) = rows.first() else { continue };
            let name = row["name"].as_str().unwrap_or_default().to_string();
            let ifaces = self.select("Interface", json!([["name", "==", name]]), &["ofport"])?;
            let ofport = ifaces
                .first()
                .and_then(|i| i["ofport"].as_i64())
                .filter(|n| *n > 0 || *n == -1);
            out.push(PortInfo {
                name,
                external_ids: map_pairs(&row["external_ids"]),
                ofport,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Bumps `next_cfg` and waits until `ovs-vswitchd` reports it applied (`cur_cfg`), as
    /// `ovs-vsctl` does without `--no-wait`.
    pub fn wait_applied(&mut self, timeout: Duration) -> Result<()> {
        let r = self.transact(vec![
            json!({"op": "mutate", "table": "Open_vSwitch", "where": [],
                   "mutations": [["next_cfg", "+=", 1]]}),
            json!({"op": "select", "table": "Open_vSwitch", "where": [], "columns": ["next_cfg"]}),
        ])?;
        let want = r[1]["rows"][0]["next_cfg"].as_i64().unwrap_or(0);
        let start = Instant::now();
        loop {
            let rows = self.select("Open_vSwitch", json!([]), &["cur_cfg"])?;
            let have = rows
                .first()
                .and_then(|r| r["cur_cfg"].as_i64())
                .unwrap_or(0);
            if have >= want {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(OvsdbError::NotApplied {
                    want,
                    have,
                    waited_ms: start.elapsed().as_millis(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// What the interface monitor reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortChange {
    /// The interface row was deleted (someone removed the port).
    Gone(String),
    /// `ovs-vswitchd` could not open the interface (its `ofport` became -1).
    Broken(String),
}

impl Ovsdb {
    /// Monitors the Interface table (RFC 7047 `monitor`) and calls `on_change` for every port
    /// that disappears or breaks, until `on_change` returns false or the connection ends.
    pub fn monitor_interfaces(
        mut self,
        mut on_change: impl FnMut(PortChange) -> bool,
    ) -> Result<()> {
        // No timeout: updates come when they come.
        self.stream.set_read_timeout(None)?;
        let params = json!([DB, "gv-ports", {"Interface": {"columns": ["name", "ofport"]}}]);
        self.call("monitor", params)?;
        loop {
            let v = match self.reader.next() {
                Some(Ok(v)) => v,
                Some(Err(e)) if e.is_io() => return Err(OvsdbError::Io(e.into())),
                Some(Err(e)) => return Err(OvsdbError::Protocol(e.to_string())),
                None => return Ok(()),
            };
            match v.get("method").and_then(Value::as_str) {
                Some("echo") => {
                    let reply = json!({"result": v["params"], "error": null, "id": v["id"]});
                    self.stream
                        .write_all(&serde_json::to_vec(&reply).expect("json"))?;
                }
                Some("update") => {
                    let rows = v["params"][1]["Interface"]
                        .as_object()
                        .cloned()
                        .unwrap_or_default();
                    for (_uuid, change) in rows {
                        let old_name = change["old"]["name"].as_str().map(str::to_string);
                        let new = &change["new"];
                        let event = if new.is_null() {
                            old_name.map(PortChange::Gone)
                        } else if new["ofport"].as_i64() == Some(-1) {
                            new["name"]
                                .as_str()
                                .map(|n| PortChange::Broken(n.to_string()))
                        } else {
                            None
                        };
                        if let Some(e) = event {
                            if !on_change(e) {
                                return Ok(());
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// OVSDB encodes a set of one element as the element itself, otherwise `["set", [...]]`.
fn set_items(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) if a.first().and_then(Value::as_str) == Some("set") => a
            .get(1)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        Value::Null => Vec::new(),
        other => vec![other.clone()],
    }
}

/// `["map", [[k, v], ...]]` as pairs.
fn map_pairs(v: &Value) -> Vec<(String, String)> {
    v.get(1)
        .and_then(Value::as_array)
        .map(|pairs| {
            pairs
                .iter()
                .filter_map(|p| {
                    Some((
                        p.get(0)?.as_str()?.to_string(),
                        p.get(1)?.as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ovsdb_set_and_map_encodings_decode() {
        assert_eq!(set_items(&json!(["uuid", "a"])), vec![json!(["uuid", "a"])]);
        assert_eq!(
            set_items(&json!(["set", [["uuid", "a"], ["uuid", "b"]]])).len(),
            2
        );
        assert!(set_items(&json!(["set", []])).is_empty());
        assert_eq!(
            map_pairs(&json!(["map", [["k", "v"]]])),
            vec![("k".to_string(), "v".to_string())]
        );
        assert!(map_pairs(&json!(["map", []])).is_empty());
    }
}
