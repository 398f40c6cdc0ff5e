//! The flash budget: the stripped release `gatevisor` binary (what a gateway image carries)
//! is at most 4 MiB. Built here as the release profile builds it (stripped, unwind tables
//! dropped); the figure is printed so a growing binary shows before it breaks the budget.

use std::path::Path;
use std::process::Command;

const BUDGET: u64 = 4 * 1024 * 1024;

#[test]
fn the_release_binary_fits_the_flash_budget() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "gatevisor",
            "--bin",
            "gatevisor",
        ])
        .current_dir(root)
        // The release binary as it ships, not as this test's environment would tune it.
        .env_remove("RUSTFLAGS")
        .status()
        .expect("cargo runs");
    assert!(status.success(), "the release build failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("release/gatevisor");
    let size = std::fs::metadata(&bin).unwrap().len();
    println!(
        "stripped gatevisor: {size} bytes ({:.2} MiB of the {} MiB budget)",
        size as f64 / (1024.0 * 1024.0),
        BUDGET >> 20
    );
    assert!(
        size <= BUDGET,
        "{}: {size} bytes exceeds the flash budget of {BUDGET} bytes",
        bin.display()
    );
    // Stripped: no symbol table, no debug sections.
    let out = Command::new("readelf")
        .args(["-S", "-W"])
        .arg(&bin)
        .output()
        .expect("readelf (binutils) runs");
    let sections = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "readelf failed");
    for s in [".symtab", ".debug_info"] {
        assert!(!sections.contains(s), "the release binary carries {s}");
    }
}
