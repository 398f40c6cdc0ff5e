//! A microVM's console reaches its log through `gatevisor __log-pump`, which rotates it as a
//! container's monitor rotates a container's output.

mod common;
use common::BIN;
use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn the_log_pump_rotates_what_it_is_given_and_ends_with_its_writer() {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("vm.log");
    let mut pump = Command::new(BIN)
        .args(["__log-pump", log.to_str().unwrap(), "1024", "2"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut w = pump.stdin.take().unwrap();
    for i in 0..60 {
        writeln!(w, "{i:03} {}", "x".repeat(95)).unwrap();
        // One line per read: the log rotates between writes, as a console's lines come.
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    drop(w);
    assert!(
        pump.wait().unwrap().success(),
        "it ends when the writer closes"
    );
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let rotated = [
        log.clone(),
        log.with_extension("log.1"),
        log.with_extension("log.2"),
    ];
    for p in &rotated {
        assert!(
            size(p) > 0 && size(p) <= 1024,
            "{}: {}",
            p.display(),
            size(p)
        );
    }
    assert!(!log.with_extension("log.3").exists(), "only two are kept");
    // The newest lines are in the current file.
    assert!(std::fs::read_to_string(&log).unwrap().contains("059 "));
}
