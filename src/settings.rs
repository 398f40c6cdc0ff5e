//! The operator's per-service settings.
//!
//! A service declares its settings in its signed manifest (`[settings.NAME]`: a type, a
//! default, bounds); the operator changes them (USP Set, `gatevisor service config`). What is
//! stored is only what the operator set; what the service gets is every declared setting
//! with its value, typed (a JSON object). Values travel as text on USP and the command line:
//! `true`/`false` (or `1`/`0`), a decimal number, a string, or a comma-separated list.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// At most this many settings per service.
pub const MAX_SETTINGS: usize = 64;
/// The service's whole settings object, serialised, is at most this large.
pub const MAX_TOTAL_BYTES: usize = 16 * 1024;
/// A string (or a list item) is at most this long unless the declaration says less.
pub const MAX_STRING: u32 = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SettingType {
    String,
    Bool,
    Uint,
    StringList,
}

impl SettingType {
    pub fn name(self) -> &'static str {
        match self {
            SettingType::String => "string",
            SettingType::Bool => "bool",
            SettingType::Uint => "uint",
            SettingType::StringList => "string-list",
        }
    }
}

/// What a string (or each list item) must look like, beyond its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// `aa:bb:cc:dd:ee:ff`.
    Mac,
    /// A dotted IPv4 address.
    Ipv4,
    /// A DNS name, optionally `*.` or `=` in front (dns-filter: a whole domain, or the name
    /// only).
    Domain,
}

/// One `[settings.NAME]` of a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingDecl {
    #[serde(rename = "type")]
    pub ty: SettingType,
    /// The value until the operator sets one.
    pub default: Value,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Bounds of a `uint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
    /// Longest string or list item (characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<u32>,
    /// Most items of a `string-list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_items: Option<u32>,
    /// What a string or each list item must look like (an empty string is always allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
    /// The only values a `string` may take.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed: Vec<String>,
}

/// Why a value is refused; USP maps each to its error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    #[error("{0}: no such setting (the service declares {1})")]
    Undeclared(String, String),
    #[error("{0}: {1}")]
    WrongType(String, String),
    #[error("{0}: {1}")]
    BadValue(String, String),
}

/// The manifest's field spelling of a setting.
fn field(name: &str) -> String {
    format!("settings.{name}")
}

/// Setting names become USP values and JSON keys: a letter, then letters, digits or `_`.
pub fn valid_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks a manifest's declarations: `Err((field, problem))`.
pub fn validate_decls(decls: &BTreeMap<String, SettingDecl>) -> Result<(), (String, String)> {
    if decls.len() > MAX_SETTINGS {
        return Err((
            "settings".into(),
            format!("at most {MAX_SETTINGS} settings"),
        ));
    }
    for (name, d) in decls {
        let bad = |p: &str| Err((field(name), p.to_string()));
        if !valid_name(name) {
            return bad("a setting's name is 1 to 64 letters, digits or _, starting with a letter");
        }
        if d.description.len() > 256 || d.description.contains(['\n', '\0']) {
            return bad("description: one line of at most 256 characters");
        }
        let uint = d.ty == SettingType::Uint;
        let text = matches!(d.ty, SettingType::String | SettingType::StringList);
        if !uint && (d.min.is_some() || d.max.is_some()) {
            return bad("min and max are for type = \"uint\"");
        }
        if let (Some(lo), Some(hi)) = (d.min, d.max) {
            if lo > hi {
                return bad("min must not be above max");
            }
        }
        if !text && (d.max_len.is_some() || d.format.is_some()) {
            return bad("max_len and format are for strings and string lists");
        }
        if d.max_len.is_some_and(|l| l == 0 || l > MAX_STRING) {
            return bad(&format!("max_len must be 1 to {MAX_STRING}"));
        }
        if d.ty != SettingType::StringList && d.max_items.is_some() {
            return bad("max_items is for type = \"string-list\"");
        }
        if d.ty != SettingType::String && !d.allowed.is_empty() {
            return bad("allowed is for type = \"string\"");
        }
        check(name, d, &d.default)
            .map_err(|e| (format!("{}.default", field(name)), e.to_string()))?;
    }
    let all: BTreeMap<&String, &Value> = decls.iter().map(|(k, d)| (k, &d.default)).collect();
    if serde_json::to_vec(&all).map_or(0, |v| v.len()) > MAX_TOTAL_BYTES {
        return Err((
            "settings".into(),
            format!("the defaults together exceed {MAX_TOTAL_BYTES} bytes"),
        ));
    }
    Ok(())
}

fn format_ok(f: Format, s: &str) -> bool {
    match f {
        Format::Mac => {
            s.len() == 17
                && s.split(':').count() == 6
                && s.split(':')
                    .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok())
        }
        Format::Ipv4 => s.parse::<std::net::Ipv4Addr>().is_ok(),
        Format::Domain => {
            let s = s.strip_prefix('=').unwrap_or(s);
            let s = s.strip_prefix("*.").unwrap_or(s).trim_end_matches('.');
            !s.is_empty()
                && s.len() <= 253
                && s.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                })
        }
    }
}

/// Is `v` a value of setting `name` as declared?
pub fn check(name: &str, d: &SettingDecl, v: &Value) -> Result<(), SettingError> {
    let wrong = |what: &str| {
        Err(SettingError::WrongType(
            name.into(),
            format!("expected {what}"),
        ))
    };
    let bad = |p: String| Err(SettingError::BadValue(name.into(), p));
    let max_len = d.max_len.unwrap_or(MAX_STRING) as usize;
    let string_ok = |s: &str| -> Result<(), SettingError> {
        if s.chars().count() > max_len {
            return bad(format!("at most {max_len} characters"));
        }
        if s.chars().any(|c| c.is_control()) {
            return bad("no control characters".into());
        }
        if let Some(f) = d.format.filter(|_| !s.is_empty()) {
            if !format_ok(f, s) {
                let what = match f {
                    Format::Mac => "a MAC address like 02:00:00:00:00:0a",
                    Format::Ipv4 => "an IPv4 address",
                    Format::Domain => "a DNS name (or *.domain)",
                };
                return bad(format!("{s:?} is not {what}"));
            }
        }
        Ok(())
    };
    match d.ty {
        SettingType::Bool => match v {
            Value::Bool(_) => Ok(()),
            _ => wrong("true or false"),
        },
        SettingType::Uint => {
            let Some(n) = v.as_u64() else {
                return wrong("an unsigned whole number");
            };
            if d.min.is_some_and(|lo| n < lo) || d.max.is_some_and(|hi| n > hi) {
                let lo = d.min.unwrap_or(0);
                return match d.max {
                    Some(hi) => bad(format!("{n} is outside {lo} to {hi}")),
                    None => bad(format!("{n} is below {lo}")),
                };
            }
            Ok(())
        }
        SettingType::String => {
            let Some(s) = v.as_str() else {
                return wrong("a string");
            };
            if !d.allowed.is_empty() && !d.allowed.iter().any(|a| a == s) {
                return bad(format!("{s:?} is not one of {}", d.allowed.join(", ")));
            }
            string_ok(s)
        }
        SettingType::StringList => {
            let Some(items) = v.as_array() else {
                return wrong("a list of strings");
            };
            let max_items = d.max_items.unwrap_or(MAX_SETTINGS as u32 * 4) as usize;
            if items.len() > max_items {
                return bad(format!("at most {max_items} items"));
            }
            for i in items {
                let Some(s) = i.as_str() else {
                    return wrong("a list of strings");
                };
                if s.is_empty() || s.contains(',') {
                    return bad("list items are not empty and hold no comma".into());
                }
                string_ok(s)?;
            }
            Ok(())
        }
    }
}

/// The typed value of `text` (USP and CLI spelling) for setting `name`.
pub fn parse_text(name: &str, d: &SettingDecl, text: &str) -> Result<Value, SettingError> {
    let v = match d.ty {
        SettingType::Bool => match text {
            "true" | "1" => Value::Bool(true),
            "false" | "0" => Value::Bool(false),
            _ => {
                return Err(SettingError::WrongType(
                    name.into(),
                    format!("{text:?} is not a boolean (true, false, 1 or 0)"),
                ))
            }
        },
        SettingType::Uint => match text.parse::<u64>() {
            Ok(n) => Value::from(n),
            Err(_) => {
                return Err(SettingError::WrongType(
                    name.into(),
                    format!("{text:?} is not an unsigned whole number"),
                ))
            }
        },
        SettingType::String => Value::String(text.into()),
        SettingType::StringList => Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.into()))
                .collect(),
        ),
    };
    check(name, d, &v)?;
    Ok(v)
}

/// A typed value in USP and CLI spelling.
pub fn to_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

/// What the service gets: every declared setting, the operator's value where it set one
/// (and it is still valid for the declaration), else the default.
pub fn effective(
    decls: &BTreeMap<String, SettingDecl>,
    set: &BTreeMap<String, Value>,
) -> BTreeMap<String, Value> {
    decls
        .iter()
        .map(|(k, d)| {
            let v = set
                .get(k)
                .filter(|v| check(k, d, v).is_ok())
                .unwrap_or(&d.default);
            (k.clone(), v.clone())
        })
        .collect()
}

/// The operator's values after `changes` (`NAME` → text), all or nothing: the first value
/// that is not valid refuses the whole change. Values no longer declared are dropped.
pub fn apply(
    decls: &BTreeMap<String, SettingDecl>,
    set: &BTreeMap<String, Value>,
    changes: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, Value>, SettingError> {
    let mut out: BTreeMap<String, Value> = set
        .iter()
        .filter(|(k, _)| decls.contains_key(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, text) in changes {
        let Some(d) = decls.get(k) else {
            let known = if decls.is_empty() {
                "none".to_string()
            } else {
                decls.keys().cloned().collect::<Vec<_>>().join(", ")
            };
            return Err(SettingError::Undeclared(k.clone(), known));
        };
        out.insert(k.clone(), parse_text(k, d, text)?);
    }
    let total = serde_json::to_vec(&effective(decls, &out)).map_or(0, |v| v.len());
    if total > MAX_TOTAL_BYTES {
        return Err(SettingError::BadValue(
            changes.keys().next().cloned().unwrap_or_default(),
            format!("the service's settings together would exceed {MAX_TOTAL_BYTES} bytes"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decls() -> BTreeMap<String, SettingDecl> {
        toml::from_str(
            r#"
[Enabled]
type = "bool"
default = true
[Port]
type = "uint"
default = 53
min = 1
max = 65535
[Mode]
type = "string"
default = "strict"
allowed = ["strict", "lenient"]
[Devices]
type = "string-list"
default = []
format = "mac"
max_items = 2
"#,
        )
        .unwrap()
    }

    fn changes(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn text_values_parse_to_their_types() {
        let d = decls();
        let out = apply(
            &d,
            &BTreeMap::new(),
            &changes(&[
                ("Enabled", "0"),
                ("Port", "5353"),
                ("Mode", "lenient"),
                ("Devices", "02:00:00:00:00:0a, 02:00:00:00:00:0b"),
            ]),
        )
        .unwrap();
        assert_eq!(out["Enabled"], json!(false));
        assert_eq!(out["Port"], json!(5353));
        assert_eq!(
            out["Devices"],
            json!(["02:00:00:00:00:0a", "02:00:00:00:00:0b"])
        );
        assert_eq!(
            to_text(&out["Devices"]),
            "02:00:00:00:00:0a,02:00:00:00:00:0b"
        );
        assert_eq!(
            apply(&d, &out, &changes(&[("Devices", "")])).unwrap()["Devices"],
            json!([])
        );
    }

    #[test]
    fn a_bad_value_refuses_the_whole_change() {
        let d = decls();
        let before: BTreeMap<String, Value> = [("Port".to_string(), json!(80))].into();
        for (kv, wrong_type) in [
            (vec![("Port", "53"), ("Enabled", "yes")], true),
            (vec![("Port", "x")], true),
            (vec![("Port", "0")], false),
            (vec![("Port", "70000")], false),
            (vec![("Mode", "other")], false),
            (vec![("Devices", "02:00:00:00:00:0a,not-a-mac")], false),
            (
                vec![(
                    "Devices",
                    "02:00:00:00:00:01,02:00:00:00:00:02,02:00:00:00:00:03",
                )],
                false,
            ),
        ] {
            let e = apply(&d, &before, &changes(&kv)).unwrap_err();
            assert_eq!(
                matches!(e, SettingError::WrongType(..)),
                wrong_type,
                "{kv:?}: {e}"
            );
        }
        let e = apply(&d, &before, &changes(&[("Nope", "1")])).unwrap_err();
        assert!(matches!(e, SettingError::Undeclared(..)), "{e}");
        assert!(
            e.to_string().contains("Devices, Enabled, Mode, Port"),
            "{e}"
        );
    }

    #[test]
    fn effective_values_fall_back_to_defaults() {
        let d = decls();
        // A value stored under an older declaration that no longer fits is not delivered.
        let set: BTreeMap<String, Value> = [
            ("Port".to_string(), json!(0)),
            ("Gone".to_string(), json!(1)),
        ]
        .into();
        let e = effective(&d, &set);
        assert_eq!(e.len(), 4);
        assert_eq!(e["Port"], json!(53));
        assert!(!e.contains_key("Gone"));
    }

    #[test]
    fn declarations_are_checked() {
        for bad in [
            "[1x]\ntype = \"bool\"\ndefault = true",
            "[A]\ntype = \"bool\"\ndefault = 1",
            "[A]\ntype = \"uint\"\ndefault = 5\nmin = 6",
            "[A]\ntype = \"uint\"\ndefault = 5\nmin = 6\nmax = 2",
            "[A]\ntype = \"bool\"\ndefault = true\nmax_len = 3",
            "[A]\ntype = \"string\"\ndefault = \"x\"\nmax_items = 3",
            "[A]\ntype = \"string-list\"\ndefault = [\"a,b\"]",
            "[A]\ntype = \"string\"\ndefault = \"c\"\nallowed = [\"a\", \"b\"]",
            "[A]\ntype = \"string\"\ndefault = \"x\"\nformat = \"ipv4\"",
        ] {
            let d: BTreeMap<String, SettingDecl> = toml::from_str(bad).unwrap();
            assert!(validate_decls(&d).is_err(), "accepted: {bad}");
        }
        assert!(validate_decls(&decls()).is_ok());
    }

    #[test]
    fn domain_format_takes_wildcards() {
        assert!(format_ok(Format::Domain, "*.ads.test"));
        assert!(format_ok(Format::Domain, "games.test"));
        assert!(format_ok(Format::Domain, "=games.test"));
        assert!(!format_ok(Format::Domain, "=*games.test"));
        assert!(!format_ok(Format::Domain, "bad name"));
        assert!(!format_ok(Format::Domain, "a..b"));
    }
}
