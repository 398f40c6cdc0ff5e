//! The emulated gateway's costs: `cargo bench -p qemu-tests --bench gateway` (root). Last line:
//! one JSON object with
//! - `image_build_s`: a cold build, base (debootstrap, QEMU, kernel) into an empty cache plus
//!   the gateway layer;
//! - `image_build_cached_s`: the gateway layer on a cached base (what a code change costs);
//! - `gateway_boot_to_gatevisor_ready_s`: median over 3 boots, QEMU start → gatevisor's
//!   `READY=1` to systemd;
//! - `scenario_suite_s`: `cargo test -p qemu-tests --test scenarios`, with whether it passed.
//!
//! `--no-cold` skips the cold build (it downloads ~300 MB from the Debian mirror).

use qemu_tests::{image, Gateway};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cold = !args.iter().any(|a| a == "--no-cold");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!(
            "{}",
            serde_json::json!({"error": "needs root (debootstrap, loop mounts, taps)"})
        );
        std::process::exit(1);
    }
    let gatevisor = image::gatevisor_binary().expect("gatevisor builds");
    let agent = qemu_tests::gateway::agent_binary().expect("gateway-agent next to the bench");

    let image_build_s = if cold {
        let cache = qemu_tests::cache_dir().join("bench-cold");
        let _ = std::fs::remove_dir_all(&cache);
        let out = cache.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let t = Instant::now();
        // base() reads the cache folder from the environment on each call.
        std::env::set_var("GATEVISOR_CACHE", &cache);
        let base = image::base().expect("cold base build");
        image::gateway_in(&base, &gatevisor, &agent, &out).expect("gateway layer");
        let s = t.elapsed().as_secs_f64();
        std::env::remove_var("GATEVISOR_CACHE");
        let _ = std::fs::remove_dir_all(&cache);
        eprintln!("cold image build: {s:.1} s");
        Some(s)
    } else {
        None
    };

    let base = image::base().expect("cached base");
    let out = tempdir_in(&qemu_tests::target_dir().join("qemu-tests"));
    let t = Instant::now();
    image::gateway_in(&base, &gatevisor, &agent, &out).expect("gateway layer");
    let image_build_cached_s = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&out);
    eprintln!("cached image build: {image_build_cached_s:.1} s");

    let mut ready = Vec::new();
    for i in 0..3 {
        let gw = Gateway::boot().expect("gateway boots");
        let r = gw.gatevisor_ready_secs().expect("gatevisor ready time");
        eprintln!("boot {i}: gatevisor ready {r:.1} s after QEMU started");
        ready.push(r);
    }
    ready.sort_by(f64::total_cmp);

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let t = Instant::now();
    let status = std::process::Command::new(cargo)
        .current_dir(qemu_tests::workspace())
        .env(qemu_tests::ENABLE_VAR, "1")
        .args(["test", "-q", "-p", "qemu-tests", "--test", "scenarios"])
        .status()
        .expect("cargo test runs");
    let scenario_suite_s = t.elapsed().as_secs_f64();

    println!(
        "{}",
        serde_json::json!({
            "image_build_s": image_build_s.map(round1),
            "image_build_cached_s": round1(image_build_cached_s),
            "gateway_boot_to_gatevisor_ready_s": round1(ready[ready.len() / 2]),
            "gateway_boot_to_gatevisor_ready_all_s": ready.iter().map(|r| round1(*r)).collect::<Vec<_>>(),
            "scenario_suite_s": round1(scenario_suite_s),
            "scenario_suite_passed": status.success(),
        })
    );
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn tempdir_in(parent: &std::path::Path) -> std::path::PathBuf {
    let d = parent.join(format!("bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
