//! `cargo bench -p gatevisor-vmm --bench snapshot` (root). Last line: one JSON object with
//! - on this host's KVM, a raw 1-vCPU guest that has written every page of its 128 MiB:
//!   `snapshot_mib_per_s` (guest memory over the time `Vm::snapshot` takes, files flushed),
//!   `host_snapshot_ms` and `host_restore_ms` (`Vm::restore` until it can run: checks and
//!   mapping, the memory checksum included);
//! - from inside the emulated gateway (qemu-tests' `microvm-snapshot` example; `null` with a
//!   reason when it cannot run), the stock kernel ticking under `/init`:
//!   `boot_to_init_ms_median` (process start to `/init`), `restore_to_running_ms_median`
//!   (process start to the restored guest's first tick) and their `restore_ratio`;
//!   `snapshot_ms`; `clone_private_kib` (the second of two clones restored at once from one
//!   snapshot: guest memory it does not share) beside `guest_memory_kib`;
//! - `kill_to_serving_ms_median`: `null` (dns-filter is not restored from a warm snapshot by
//!   the supervisor yet).
//!
//! `--host-only` skips the emulated gateway (it takes several minutes).

mod common;
use gatevisor_vmm::vm::Vm;
use gatevisor_vmm::{Boot, VmConfig, VmEnd};
use std::path::Path;
use std::time::{Duration, Instant};

const MEMORY_MIB: u64 = 128;

/// A guest that writes the first word of every page from 4 MiB to the end of its memory,
/// prints `R` and spins.
fn toucher() -> Vec<u8> {
    let first = 4u64 << 20;
    let pages = ((MEMORY_MIB << 20) - first) / 4096;
    let mut c = vec![0x48, 0xbf]; // mov rdi, first
    c.extend(first.to_le_bytes());
    c.extend([0x48, 0xb9]); // mov rcx, pages
    c.extend(pages.to_le_bytes());
    c.extend([
        0x48, 0x89, 0x0f, // loop: mov [rdi], rcx
        0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00, // add rdi, 4096
        0x48, 0xff, 0xc9, // dec rcx
        0x75, 0xf1, // jnz loop
        0x66, 0xba, 0xf8, 0x03, 0xb0, b'R', 0xee, // mov dx, 0x3f8; mov al, 'R'; out dx, al
        0xeb, 0xfe, // jmp $
    ]);
    c
}

fn host(dir: &Path) -> serde_json::Value {
    let image = dir.join("toucher.bin");
    std::fs::write(&image, toucher()).unwrap();
    let console = dir.join("console.log");
    let cfg = VmConfig::minimal(Boot::Raw { image }, MEMORY_MIB, console.clone());
    let mut vm = Vm::new(&cfg).unwrap();
    let pauser = vm.pauser();
    let run = std::thread::spawn(move || {
        let end = vm.run();
        (vm, end)
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&console).unwrap_or_default() != "R" {
        assert!(
            Instant::now() < deadline,
            "the guest did not touch its memory"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    pauser.pause(Duration::from_secs(5)).unwrap();
    let (mut vm, end) = run.join().unwrap();
    assert_eq!(end.unwrap(), VmEnd::Paused);
    let snap = dir.join("snap");
    let t = Instant::now();
    vm.snapshot(&snap).unwrap();
    let snapshot_s = t.elapsed().as_secs_f64();
    drop(vm);
    let t = Instant::now();
    let restored = Vm::restore(&cfg, &snap).unwrap();
    let restore_ms = t.elapsed().as_secs_f64() * 1000.0;
    drop(restored);
    let round = |x: f64| (x * 10.0).round() / 10.0;
    serde_json::json!({
        "snapshot_mib_per_s": round(MEMORY_MIB as f64 / snapshot_s),
        "host_snapshot_ms": round(snapshot_s * 1000.0),
        "host_restore_ms": round(restore_ms),
    })
}

fn main() {
    let host_only = std::env::args().any(|a| a == "--host-only");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let dir = tempfile::tempdir().unwrap();
    let host = if Path::new("/dev/kvm").exists() {
        host(dir.path())
    } else {
        serde_json::json!({ "reason": "no /dev/kvm" })
    };
    let gateway = if host_only {
        serde_json::json!({ "reason": "--host-only" })
    } else {
        common::gateway_example(&cargo, "microvm-snapshot")
    };
    let mut result = serde_json::Map::new();
    for (from, keys) in [
        (
            &host,
            &["snapshot_mib_per_s", "host_snapshot_ms", "host_restore_ms"][..],
        ),
        (
            &gateway,
            &[
                "boot_to_init_ms_median",
                "restore_to_running_ms_median",
                "restore_ratio",
                "snapshot_ms",
                "snapshot_memory_file_kib",
                "clones_both_ticking",
                "clone_private_kib",
                "clone_shared_kib",
                "first_clone_private_kib",
                "guest_memory_kib",
                "runs_failed",
            ][..],
        ),
    ] {
        for k in keys {
            result.insert(
                k.to_string(),
                from.get(*k).cloned().unwrap_or(serde_json::Value::Null),
            );
        }
    }
    result.insert("kill_to_serving_ms_median".into(), serde_json::Value::Null);
    result.insert(
        "kill_to_serving_note".into(),
        "dns-filter is not restored from a warm snapshot by the supervisor yet".into(),
    );
    result.insert(
        "gateway_note".into(),
        gateway
            .get("error")
            .or(gateway.get("reason"))
            .or(gateway.get("guest"))
            .cloned()
            .unwrap_or(serde_json::Value::Null),
    );
    result.insert(
        "host_kvm".into(),
        std::fs::read_dir("/sys/module/kvm_pvm")
            .map(|_| "pvm")
            .unwrap_or("hardware or none")
            .into(),
    );
    println!("{}", serde_json::Value::Object(result));
}
