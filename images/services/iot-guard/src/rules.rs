//! Per-device rules and the rate anomaly check.

pub use gatevisor_service_sdk::{mac_text, parse_mac};
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Default {
    Allow,
    Block,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub name: String,
    pub mac: String,
    /// Destinations this device may reach: `IP`, `IP:PORT` or `IP:PORT/tcp|udp` (an IPv6
    /// address with a port in brackets: `[2001:db8::1]:443/tcp`).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Destination ports always blocked (telnet, say).
    #[serde(default)]
    pub deny_ports: Vec<u16>,
    /// For destinations not on the allow list.
    pub default: Default,
    /// More new sessions than this within a minute is an anomaly: they are blocked.
    #[serde(default)]
    pub max_new_sessions_per_minute: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unknown {
    pub default: Default,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, rename = "device")]
    pub devices: Vec<Device>,
    pub unknown_devices: Unknown,
}

/// A parsed allow-list entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Dest {
    ip: IpAddr,
    port: Option<u16>,
    proto: Option<u8>,
}

fn parse_dest(s: &str) -> Option<Dest> {
    let (rest, proto) = match s.rsplit_once('/') {
        Some((r, "tcp")) => (r, Some(6)),
        Some((r, "udp")) => (r, Some(17)),
        Some(_) => return None,
        None => (s, None),
    };
    if let Some(v6) = rest.strip_prefix('[') {
        // Brackets are for IPv6 with a port.
        let (ip, after) = v6.split_once(']')?;
        return Some(Dest {
            ip: IpAddr::V6(ip.parse().ok()?),
            port: Some(after.strip_prefix(':')?.parse().ok()?),
            proto,
        });
    }
    if let Ok(ip) = rest.parse::<IpAddr>() {
        return Some(Dest {
            ip,
            port: None,
            proto,
        });
    }
    let (ip, port) = rest.split_once(':')?;
    Some(Dest {
        ip: IpAddr::V4(ip.parse().ok()?),
        port: Some(port.parse().ok()?),
        proto,
    })
}

impl Config {
    pub fn parse(text: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        for d in &c.devices {
            parse_mac(&d.mac).ok_or_else(|| {
                format!("device {}: mac {:?} is not a MAC address", d.name, d.mac)
            })?;
            for a in &d.allow {
                parse_dest(a).ok_or_else(|| {
                    format!("device {}: allow {a:?} is not IP[:PORT][/tcp|udp]", d.name)
                })?;
            }
        }
        Ok(c)
    }
}

impl Config {
    /// The configuration the operator's settings make (`None` when they do not configure
    /// iot-guard: the file does): the devices in `IotDevices` get the IoT rules (`IotAllow`,
    /// `IotDenyPorts`, `IotDefault`, `IotMaxNewSessionsPerMinute`, 0 for no limit), every
    /// other device `UnknownDevices`.
    pub fn from_settings(v: &serde_json::Value) -> Option<Result<Config, String>> {
        v.get("IotDevices")?;
        let list = |k: &str| gatevisor_service_sdk::setting_list(v, k);
        let default = |k: &str| match v[k].as_str() {
            Some("allow") => Ok(Default::Allow),
            Some("block") => Ok(Default::Block),
            other => Err(format!("{k}: {other:?} is neither allow nor block")),
        };
        let build = || -> Result<Config, String> {
            let deny_ports = list("IotDenyPorts")
                .iter()
                .map(|p| {
                    p.parse::<u16>()
                        .map_err(|_| format!("IotDenyPorts: {p:?} is not a port"))
                })
                .collect::<Result<Vec<u16>, String>>()?;
            let max = v["IotMaxNewSessionsPerMinute"].as_u64().unwrap_or(0);
            let rules_default = default("IotDefault")?;
            let allow = list("IotAllow");
            for a in &allow {
                parse_dest(a)
                    .ok_or_else(|| format!("IotAllow: {a:?} is not IP[:PORT][/tcp|udp]"))?;
            }
            let devices = list("IotDevices")
                .into_iter()
                .map(|mac| {
                    parse_mac(&mac).ok_or_else(|| format!("IotDevices: {mac:?} is not a MAC"))?;
                    Ok(Device {
                        name: mac.clone(),
                        mac,
                        allow: allow.clone(),
                        deny_ports: deny_ports.clone(),
                        default: rules_default,
                        max_new_sessions_per_minute: (max > 0).then_some(max as u32),
                    })
                })
                .collect::<Result<Vec<Device>, String>>()?;
            Ok(Config {
                devices,
                unknown_devices: Unknown {
                    default: default("UnknownDevices")?,
                },
            })
        };
        Some(build())
    }
}

pub struct Guard {
    config: std::sync::Arc<Config>,
    /// Recent new-session times per device.
    recent: HashMap<[u8; 6], VecDeque<Instant>>,
}

impl Guard {
    #[cfg(test)]
    pub fn new(config: Config) -> Guard {
        Guard::new_shared(std::sync::Arc::new(config))
    }

    pub fn new_shared(config: std::sync::Arc<Config>) -> Guard {
        Guard {
            config,
            recent: HashMap::new(),
        }
    }

    /// Takes a new configuration (the operator changed a setting); the devices' recent
    /// session counts are kept.
    pub fn set_config(&mut self, config: std::sync::Arc<Config>) {
        self.config = config;
    }

    /// The configuration in use.
    pub fn config(&self) -> &std::sync::Arc<Config> {
        &self.config
    }

    /// The verdict for a new session (to `ip`, of either family), and why.
    pub fn decide(
        &mut self,
        mac: [u8; 6],
        ip: impl Into<IpAddr>,
        proto: u8,
        port: u16,
        now: Instant,
    ) -> (bool, String) {
        let Some(d) = self
            .config
            .devices
            .iter()
            .find(|d| parse_mac(&d.mac) == Some(mac))
        else {
            return (
                self.config.unknown_devices.default == Default::Allow,
                "unknown device".into(),
            );
        };
        if let Some(max) = d.max_new_sessions_per_minute {
            let q = self.recent.entry(mac).or_default();
            while q
                .front()
                .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
            {
                q.pop_front();
            }
            q.push_back(now);
            if q.len() as u32 > max {
                return (
                    false,
                    format!("{}: more than {max} new sessions a minute", d.name),
                );
            }
        }
        if d.deny_ports.contains(&port) {
            return (false, format!("{}: port {port} is denied", d.name));
        }
        let ip = ip.into();
        let listed = d.allow.iter().filter_map(|a| parse_dest(a)).any(|a| {
            a.ip == ip && a.port.is_none_or(|p| p == port) && a.proto.is_none_or(|p| p == proto)
        });
        match (listed, d.default) {
            (true, _) => (true, format!("{}: on its allow list", d.name)),
            (false, Default::Allow) => (true, format!("{}: allowed by default", d.name)),
            (false, Default::Block) => (false, format!("{}: not on its allow list", d.name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[unknown_devices]
default = "allow"
[[device]]
name = "camera"
mac = "02:00:00:00:00:0c"
allow = ["10.0.0.1:443/tcp", "10.0.0.2"]
deny_ports = [23]
default = "block"
max_new_sessions_per_minute = 3
"#;

    #[test]
    fn allow_list_deny_ports_default_and_unknown_devices() {
        let mut g = Guard::new(Config::parse(CONFIG).unwrap());
        let cam = parse_mac("02:00:00:00:00:0c").unwrap();
        let t = Instant::now();
        assert!(g.decide(cam, [10, 0, 0, 1], 6, 443, t).0);
        assert!(
            !g.decide(cam, [10, 0, 0, 1], 17, 443, t).0,
            "udp not listed"
        );
        assert!(
            !g.decide(cam, [10, 0, 0, 2], 6, 23, t).0,
            "denied port wins"
        );
        assert!(
            g.decide([2, 0, 0, 0, 0, 1], [8, 8, 8, 8], 6, 23, t).0,
            "unknown device: allow"
        );
    }

    #[test]
    fn too_many_new_sessions_a_minute_are_blocked_then_allowed_again() {
        let mut g = Guard::new(Config::parse(CONFIG).unwrap());
        let cam = parse_mac("02:00:00:00:00:0c").unwrap();
        let t = Instant::now();
        for i in 0..3 {
            assert!(
                g.decide(cam, [10, 0, 0, 2], 6, 80, t + Duration::from_secs(i))
                    .0
            );
        }
        let (ok, why) = g.decide(cam, [10, 0, 0, 2], 6, 80, t + Duration::from_secs(4));
        assert!(!ok && why.contains("new sessions a minute"));
        assert!(
            g.decide(cam, [10, 0, 0, 2], 6, 80, t + Duration::from_secs(120))
                .0,
            "the window moves on"
        );
    }

    #[test]
    fn settings_make_the_same_rules() {
        let v: serde_json::Value = serde_json::json!({
            "IotDevices": ["02:00:00:00:00:0c"],
            "IotAllow": ["10.0.0.1:443/tcp", "10.0.0.2"],
            "IotDenyPorts": ["23"],
            "IotDefault": "block",
            "IotMaxNewSessionsPerMinute": 10,
            "UnknownDevices": "allow",
        });
        let mut g = Guard::new(Config::from_settings(&v).unwrap().unwrap());
        let cam = parse_mac("02:00:00:00:00:0c").unwrap();
        let t = Instant::now();
        assert!(g.decide(cam, [10, 0, 0, 1], 6, 443, t).0);
        assert!(!g.decide(cam, [10, 0, 0, 2], 6, 23, t).0);
        assert!(!g.decide(cam, [10, 0, 0, 9], 6, 80, t).0);
        assert!(g.decide([2, 0, 0, 0, 0, 1], [8, 8, 8, 8], 6, 23, t).0);
        // The operator lets the camera go anywhere.
        let mut v2 = v.clone();
        v2["IotDefault"] = "allow".into();
        g.set_config(std::sync::Arc::new(
            Config::from_settings(&v2).unwrap().unwrap(),
        ));
        assert!(g.decide(cam, [10, 0, 0, 9], 6, 80, t).0);
        assert!(Config::from_settings(&serde_json::json!({})).is_none());
        let mut bad = v.clone();
        bad["IotDenyPorts"] = serde_json::json!(["telnet"]);
        assert!(Config::from_settings(&bad).unwrap().is_err());
    }

    #[test]
    fn bad_config_is_named() {
        let e = Config::parse("[unknown_devices]\ndefault=\"allow\"\n[[device]]\nname=\"c\"\nmac=\"x\"\ndefault=\"block\"").unwrap_err();
        assert!(e.contains("device c"), "{e}");
        assert!(parse_dest("10.0.0.1:80/icmp").is_none());
        for bad in ["[10.0.0.1]:80", "fd00::1:80x", "[fd00::1]", "10.0.0.1:"] {
            assert!(parse_dest(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn ipv6_destinations_are_judged_like_ipv4_ones() {
        let mut c = Config::parse(CONFIG).unwrap();
        c.devices[0]
            .allow
            .extend(["[fd00:90::1]:443/tcp".into(), "fd00:90::2".into()]);
        let mut g = Guard::new(c);
        let cam = parse_mac("02:00:00:00:00:0c").unwrap();
        let t = Instant::now();
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(g.decide(cam, v6("fd00:90::1"), 6, 443, t).0);
        assert!(
            !g.decide(cam, v6("fd00:90::1"), 6, 80, t).0,
            "not that port"
        );
        assert!(g.decide(cam, v6("fd00:90::2"), 17, 5000, t).0);
        assert!(!g.decide(cam, v6("fd00:90::2"), 6, 23, t).0, "denied port");
        assert!(!g.decide(cam, v6("fd00:90::9"), 6, 443, t).0, "not listed");
    }
}
