//! What the VMM's benchmarks share.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

/// Runs qemu-tests' example `name` (a measurement inside the emulated gateway) and returns
/// the JSON object its last line prints, or `{"error": why}`.
pub fn gateway_example(cargo: &str, name: &str) -> serde_json::Value {
    let out = Command::new(cargo)
        .current_dir(workspace())
        .args([
            "run",
            "--release",
            "-q",
            "-p",
            "qemu-tests",
            "--example",
            name,
        ])
        .stderr(Stdio::inherit())
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => return serde_json::json!({ "error": format!("cannot run {name}: {e}") }),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    match text
        .lines()
        .last()
        .map(serde_json::from_str::<serde_json::Value>)
    {
        Some(Ok(v)) => v,
        _ => serde_json::json!({ "error": format!("no figures from {name}: {text}") }),
    }
}
