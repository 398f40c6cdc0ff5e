//! `cargo bench -p gatevisor-vmm --bench boot` (root). Last line: one JSON object with
//! - `vmm_rss_overhead_kib`: the `gatevisor vmm` process's RSS minus the guest pages it has
//!   touched (the guest memory mapping's own RSS), for a running 1-vCPU, 128 MiB test guest;
//! - `vmm_spawn_to_first_exit_ms_median`: process start until the guest's first instruction
//!   (an `out` to the debug-exit port) has ended the process, 20 runs;
//! - `binary_size_bytes`: the stripped release `gatevisor`;
//! - from inside the emulated gateway (qemu-tests' `microvm-boot` example; `null` with a reason
//!   when it cannot run): `boot_to_init_ms_median` for our VMM,
//!   `qemu_microvm_boot_to_init_ms_median` for QEMU's microvm machine, and `boot_ratio`, with
//!   the kernel's ELF entered through PVH by both; the guest's own uptime when `/init` ran,
//!   `guest_uptime_at_init_s_median` and `qemu_microvm_guest_uptime_at_init_s_median`, and
//!   their `guest_uptime_at_init_ratio` (ours ÷ QEMU's); the same six for the bzImage
//!   (`bzimage_…`).
//!
//! `--host-only` skips the emulated gateway (it takes several minutes).

mod common;
use common::workspace;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let host_only = std::env::args().any(|a| a == "--host-only");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(&cargo)
        .current_dir(workspace())
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "gatevisor",
            "--bin",
            "gatevisor",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let bin = workspace().join("target/release/gatevisor");
    let binary_size_bytes = std::fs::metadata(&bin).unwrap().len();
    let dir = tempfile::tempdir().unwrap();

    let (rss, spawn) = if Path::new("/dev/kvm").exists() {
        (
            Some(rss_overhead(&bin, dir.path())),
            Some(spawn_to_exit(&bin, dir.path())),
        )
    } else {
        (None, None)
    };

    let gateway = if host_only {
        serde_json::json!({ "reason": "--host-only" })
    } else {
        common::gateway_example(&cargo, "microvm-boot")
    };
    let pick = |k: &str| gateway.get(k).cloned().unwrap_or(serde_json::Value::Null);
    println!(
        "{}",
        serde_json::json!({
            "vmm_rss_overhead_kib": rss,
            "vmm_spawn_to_first_exit_ms_median": spawn,
            "binary_size_bytes": binary_size_bytes,
            "boot_to_init_ms_median": pick("boot_to_init_ms_median"),
            "qemu_microvm_boot_to_init_ms_median": pick("qemu_microvm_boot_to_init_ms_median"),
            "boot_ratio": pick("boot_ratio"),
            "bzimage_boot_to_init_ms_median": pick("bzimage_boot_to_init_ms_median"),
            "bzimage_qemu_microvm_boot_to_init_ms_median": pick("bzimage_qemu_microvm_boot_to_init_ms_median"),
            "bzimage_boot_ratio": pick("bzimage_boot_ratio"),
            "guest_uptime_at_init_s_median": pick("guest_uptime_at_init_s_median"),
            "qemu_microvm_guest_uptime_at_init_s_median": pick("qemu_microvm_guest_uptime_at_init_s_median"),
            "guest_uptime_at_init_ratio": pick("guest_uptime_at_init_ratio"),
            "bzimage_guest_uptime_at_init_s_median": pick("bzimage_guest_uptime_at_init_s_median"),
            "bzimage_qemu_microvm_guest_uptime_at_init_s_median": pick("bzimage_qemu_microvm_guest_uptime_at_init_s_median"),
            "bzimage_guest_uptime_at_init_ratio": pick("bzimage_guest_uptime_at_init_ratio"),
            "runs_timed_out": pick("runs_timed_out"),
            "gateway_note": gateway.get("error").or(gateway.get("reason")).or(gateway.get("guest")).cloned(),
            "host_kvm": std::fs::read_dir("/sys/module/kvm_pvm").map(|_| "pvm").unwrap_or("hardware or none"),
        })
    );
}

fn write_guest(dir: &Path, name: &str, code: &[u8]) -> PathBuf {
    let image = dir.join(format!("{name}.bin"));
    std::fs::write(&image, code).unwrap();
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "memory_mib = 128\nconsole_log = \"{}\"\n[boot]\nkind = \"raw\"\nimage = \"{}\"\n",
            dir.join(format!("{name}.log")).display(),
            image.display()
        ),
    )
    .unwrap();
    cfg
}

/// RSS of the VMM with a guest that prints one byte and spins.
fn rss_overhead(bin: &Path, dir: &Path) -> u64 {
    // mov dx, 0x3f8; mov al, 'R'; out dx, al; jmp $
    let cfg = write_guest(
        dir,
        "spin",
        &[0x66, 0xba, 0xf8, 0x03, 0xb0, b'R', 0xee, 0xeb, 0xfe],
    );
    let mut child = Command::new(bin)
        .args(["vmm", "--config"])
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let log = dir.join("spin.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(&log).unwrap_or_default() != "R" {
        assert!(
            Instant::now() < deadline,
            "the spinning guest did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    let pid = child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let vm_rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap();
    // The guest memory is the anonymous 128 MiB mapping.
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut guest_rss = 0;
    let mut in_guest = false;
    for l in smaps.lines() {
        if let Some(size) = l.strip_prefix("Size:") {
            in_guest = size.split_whitespace().next() == Some("131072");
        } else if let (true, Some(rss)) = (in_guest, l.strip_prefix("Rss:")) {
            guest_rss += rss
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap();
            in_guest = false;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("VmRSS {vm_rss} KiB, guest pages touched {guest_rss} KiB");
    vm_rss - guest_rss
}

fn spawn_to_exit(bin: &Path, dir: &Path) -> f64 {
    // out 0xf4, al: the first instruction ends the VM (status 16 + al = 16).
    let cfg = write_guest(dir, "exit", &[0xe6, 0xf4]);
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let st = Command::new(bin)
            .args(["vmm", "--config"])
            .arg(&cfg)
            .status()
            .unwrap();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(st.code(), Some(16), "the guest's first exit ends the VMM");
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2] * 100.0).round() / 100.0
}
