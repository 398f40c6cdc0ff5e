//! USP path patterns (TR-369 "Path Names"): a path segment is a name, an instance number,
//! `*` (every instance) or a search expression `[Param==value&&Other>3]` (the instances whose
//! parameters satisfy it). Reference following (`+`, `#`) is not supported.

use std::collections::BTreeMap;

/// One comparison of a search expression: `rel` (a parameter path relative to the instance)
/// `op` `value`.
#[derive(Debug, Clone, PartialEq)]
struct Clause {
    rel: String,
    op: Op,
    value: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

/// Splits `path` at the dots that are not inside a search expression or a quoted value.
fn segments(path: &str) -> Result<Vec<&str>, String> {
    let (mut out, mut start, mut depth, mut quoted) = (Vec::new(), 0, 0u32, false);
    for (i, c) in path.char_indices() {
        match c {
            '"' if depth > 0 => quoted = !quoted,
            '[' if !quoted => {
                if depth > 0 {
                    return Err(format!("{path}: nested search expression"));
                }
                depth += 1;
            }
            ']' if !quoted => {
                if depth == 0 {
                    return Err(format!("{path}: unbalanced ']'"));
                }
                depth -= 1;
            }
            '.' if depth == 0 => {
                out.push(&path[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth > 0 || quoted {
        return Err(format!("{path}: unterminated search expression"));
    }
    out.push(&path[start..]);
    Ok(out)
}

/// The clauses of a search segment `[…]` (`None` for any other segment).
fn search(segment: &str) -> Result<Option<Vec<Clause>>, String> {
    let Some(inner) = segment.strip_prefix('[').and_then(|s| s.strip_suffix(']')) else {
        if segment.contains(['[', ']']) {
            return Err(format!(
                "{segment}: a search expression must be a whole segment"
            ));
        }
        return Ok(None);
    };
    split_outside_quotes(inner, "&&")
        .into_iter()
        .map(clause)
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn split_outside_quotes<'a>(s: &'a str, sep: &str) -> Vec<&'a str> {
    let (mut out, mut start, mut quoted) = (Vec::new(), 0, false);
    let mut i = 0;
    while i < s.len() {
        if s.as_bytes()[i] == b'"' {
            quoted = !quoted;
        } else if !quoted && s[i..].starts_with(sep) {
            out.push(&s[start..i]);
            i += sep.len();
            start = i;
            continue;
        }
        i += 1;
    }
    out.push(&s[start..]);
    out
}

fn clause(text: &str) -> Result<Clause, String> {
    const OPS: [(&str, Op); 6] = [
        ("==", Op::Eq),
        ("!=", Op::Ne),
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("<", Op::Lt),
        (">", Op::Gt),
    ];
    let bad = || format!("[{text}]: expected PARAM==VALUE (or !=, <, >, <=, >=)");
    let at = text.find(['=', '!', '<', '>']).ok_or_else(bad)?;
    let (op_text, op) = OPS
        .iter()
        .find(|(t, _)| text[at..].starts_with(t))
        .ok_or_else(bad)?;
    let rel = &text[..at];
    let value = &text[at + op_text.len()..];
    let name_ok = !rel.is_empty()
        && rel
            .split('.')
            .all(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    if !name_ok || value.is_empty() {
        return Err(bad());
    }
    let value = match value.strip_prefix('"') {
        Some(v) => v
            .strip_suffix('"')
            .filter(|v| !v.contains('"'))
            .ok_or_else(bad)?,
        None if value.contains(['"', '&', '|']) => return Err(bad()),
        None => value,
    };
    Ok(Clause {
        rel: rel.to_string(),
        op: *op,
        value: value.to_string(),
    })
}

/// One segment of a parsed pattern.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Any,
    Name(String),
    Search(Vec<Clause>),
}

/// A path pattern, parsed once and matched against many paths.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    /// Ends in `.`: names an object, and matches anything below it.
    partial: bool,
    segs: Vec<Seg>,
}

impl Pattern {
    /// Parses `path`; the error says what is wrong with it.
    pub fn parse(path: &str) -> Result<Pattern, String> {
        if path.contains(['+', '#']) {
            return Err(format!("{path}: reference following is not supported"));
        }
        let segs = segments(path.trim_end_matches('.'))?
            .into_iter()
            .map(|s| {
                Ok(match search(s)? {
                    Some(clauses) => Seg::Search(clauses),
                    None if s == "*" => Seg::Any,
                    None => Seg::Name(s.to_string()),
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Pattern {
            partial: path.ends_with('.'),
            segs,
        })
    }

    /// How many segments it has.
    pub fn depth(&self) -> usize {
        self.segs.len()
    }

    pub fn has_search(&self) -> bool {
        self.segs.iter().any(|s| matches!(s, Seg::Search(_)))
    }

    /// Does it name instances by `*` or a search expression (rather than by number)?
    pub fn is_wildcard(&self) -> bool {
        self.segs
            .iter()
            .any(|s| matches!(s, Seg::Search(_) | Seg::Any))
    }

    /// The path in the supported data model's spelling: every instance segment (a number,
    /// `*`, a search expression) as `{i}`; with the trailing dot of an object path.
    pub fn schema_path(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.segs.iter().enumerate() {
            if i > 0 {
                out.push('.');
            }
            match s {
                Seg::Any | Seg::Search(_) => out.push_str("{i}"),
                Seg::Name(n) if n.parse::<u32>().is_ok() => out.push_str("{i}"),
                Seg::Name(n) => out.push_str(n),
            }
        }
        if self.partial {
            out.push('.');
        }
        out
    }

    /// Does the concrete `path` match, segment by segment: `*` matches any instance, a search
    /// expression the instances of `params` that satisfy it? A partial pattern matches
    /// anything below its object too.
    pub fn matches(&self, path: &str, params: &BTreeMap<String, String>) -> bool {
        let s: Vec<&str> = path.trim_end_matches('.').split('.').collect();
        let p = &self.segs;
        if (self.partial && s.len() < p.len()) || (!self.partial && s.len() != p.len()) {
            return false;
        }
        p.iter().zip(&s).enumerate().all(|(i, (a, b))| match a {
            Seg::Any => true,
            Seg::Name(n) => n == b,
            Seg::Search(clauses) => {
                b.parse::<u32>().is_ok() && {
                    let object = format!("{}.", s[..=i].join("."));
                    clauses.iter().all(|c| holds(c, &object, params))
                }
            }
        })
    }
}

/// Does `path` match `pattern` (see [`Pattern::matches`])? A malformed pattern matches
/// nothing.
pub fn matches(pattern: &str, path: &str, params: &BTreeMap<String, String>) -> bool {
    Pattern::parse(pattern).is_ok_and(|p| p.matches(path, params))
}

fn holds(c: &Clause, object: &str, params: &BTreeMap<String, String>) -> bool {
    let Some(actual) = params.get(&format!("{object}{}", c.rel)) else {
        return false;
    };
    let num = |s: &str| s.parse::<f64>().ok();
    match c.op {
        Op::Eq => *actual == c.value,
        Op::Ne => *actual != c.value,
        op => match (num(actual), num(&c.value)) {
            (Some(a), Some(b)) => match op {
                Op::Lt => a < b,
                Op::Gt => a > b,
                Op::Le => a <= b,
                _ => a >= b,
            },
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> BTreeMap<String, String> {
        [
            ("Device.SoftwareModules.ExecutionUnit.1.Name", "dns-filter"),
            ("Device.SoftwareModules.ExecutionUnit.1.Status", "Active"),
            ("Device.SoftwareModules.ExecutionUnit.1.MemoryInUse", "900"),
            (
                "Device.SoftwareModules.ExecutionUnit.1.AutoRestart.Enable",
                "true",
            ),
            ("Device.SoftwareModules.ExecutionUnit.2.Name", "iot.guard"),
            ("Device.SoftwareModules.ExecutionUnit.2.Status", "Idle"),
            (
                "Device.SoftwareModules.ExecutionUnit.2.MemoryInUse",
                "12000",
            ),
            (
                "Device.SoftwareModules.ExecutionUnit.2.AutoRestart.Enable",
                "false",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn search_expressions_select_instances_by_their_parameters() {
        let t = tree();
        let eu = "Device.SoftwareModules.ExecutionUnit.";
        let hits = |pattern: &str| -> Vec<String> {
            t.keys()
                .filter(|k| matches(pattern, k, &t))
                .filter(|k| k.ends_with(".Name"))
                .cloned()
                .collect()
        };
        assert_eq!(
            hits(&format!("{eu}[Name==\"dns-filter\"].")),
            [format!("{eu}1.Name")]
        );
        // A dot inside a quoted value is not a path separator.
        assert_eq!(
            hits(&format!("{eu}[Name==\"iot.guard\"].Name")),
            [format!("{eu}2.Name")]
        );
        assert_eq!(
            hits(&format!("{eu}[MemoryInUse>1000].")),
            [format!("{eu}2.Name")]
        );
        assert_eq!(
            hits(&format!(
                "{eu}[Status==\"Active\"&&AutoRestart.Enable==true]."
            )),
            [format!("{eu}1.Name")]
        );
        assert_eq!(hits(&format!("{eu}[Status!=\"Gone\"].")).len(), 2);
        assert!(hits(&format!("{eu}[NoSuchParam==1].")).is_empty());
        // Ordering needs numbers on both sides.
        assert!(hits(&format!("{eu}[Name>3].")).is_empty());
    }

    #[test]
    fn malformed_search_expressions_are_refused_with_a_reason() {
        for bad in [
            "Device.SoftwareModules.ExecutionUnit.[Name==\"x\".",
            "Device.SoftwareModules.ExecutionUnit.[Name].",
            "Device.SoftwareModules.ExecutionUnit.[==\"x\"].",
            "Device.SoftwareModules.ExecutionUnit.[Name==].",
            "Device.SoftwareModules.ExecutionUnit.[Name==\"x].",
            "Device.SoftwareModules.ExecutionUnit.[[Name==1]].",
            "Device.SoftwareModules.ExecutionUnit.x[Name==1].",
            "Device.SoftwareModules.ExecutionUnit.1.ExecutionEnvRef+.Name",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad} was accepted");
        }
        assert!(Pattern::parse(
            "Device.SoftwareModules.ExecutionUnit.[Name==\"a&&b\"&&Status==\"Idle\"]."
        )
        .is_ok());
        assert!(Pattern::parse("Device.SoftwareModules.ExecutionUnit.*.Name").is_ok());
    }
}
