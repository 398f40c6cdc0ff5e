//! Where the guest kernel spends its boot under our VMM and under QEMU's microvm machine, in
//! one boot of the emulated gateway (real KVM there):
//!   sudo cargo run --release -p qemu-tests --example boot-profile [-- vmlinuz] [--runs N]
//!
//! The same stock kernel, busybox initramfs and command line as the boot benchmark
//! (`qemu_tests::bootcmp`). For each VMM the gateway's KVM counts the guest's exits by reason,
//! its port I/O by port and its MSR accesses by register (tracefs histograms on the
//! `kvm_exit`, `kvm_pio` and `kvm_msr` tracepoints) from the VMM's start until `/init`; then
//! `/init` prints the kernel's log (`dmesg`, timestamps included, after the histograms are
//! read) so the boot's phases are timed by the guest's own clock without a slow console
//! slowing them. Reports, on stderr:
//! - the guest uptime at `/init` and the wall time to it, per VMM;
//! - the phases where ours loses the most against QEMU: consecutive kernel messages both
//!   logs share, with the time between them under each;
//! - the largest gaps in our log;
//! - exits by reason, port I/O and MSR accesses, side by side.
//!
//! Both consoles are kept in `target/boot-profile/`. The last line is one JSON object with
//! the headline figures.

use qemu_tests::bootcmp::{self, boots, counts, exit_name, kernel_log, losses, warnings, VMMS};
use std::time::Duration;

/// Long enough for QEMU's slowest boots seen under the gateway's nested TCG.
const RUN_LIMIT_S: u64 = 240;

/// The tracepoints counted and the fields they are counted by.
const HISTS: [(&str, &str); 3] = [
    ("kvm_exit", "exit_reason"),
    ("kvm_pio", "port,rw"),
    ("kvm_msr", "ecx,write"),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let form = if args.iter().any(|a| a == "vmlinuz") {
        "vmlinuz"
    } else {
        "vmlinux"
    };
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(1);
    let gw = qemu_tests::Gateway::boot().expect("the emulated gateway boots");
    // The log is printed once the histograms are read (measure's AFTER runs right after the
    // marker is seen, polled every 20 ms): its console output must not count.
    bootcmp::prepare(&gw, "sleep 3; dmesg -r; echo boot-profile: end").expect("the guest");
    let t = "/sys/kernel/tracing";
    let mut script = format!(
        "[ -d {t}/events/kvm ] || mount -t tracefs nodev {t}\n\
         hists() {{ for h in {}; do ev=${{h%%:*}}; keys=${{h#*:}}; \
         echo \"$1hist:keys=$keys:sort=hitcount.descending:size=4096\" >> {t}/events/kvm/$ev/trigger; done; }}\n\
         dump() {{ for h in {}; do ev=${{h%%:*}}; cat {t}/events/kvm/$ev/hist > /root/prof-$1-$ev.hist; done; }}\n\
         {}\n",
        HISTS.map(|(e, k)| format!("{e}:{k}")).join(" "),
        HISTS.map(|(e, k)| format!("{e}:{k}")).join(" "),
        bootcmp::measure_function(Duration::from_secs(RUN_LIMIT_S)),
    );
    for _ in 0..runs {
        for vmm in VMMS {
            // Only the last run's histograms and log are kept; every run is timed.
            script.push_str(&format!(
                "hists ''\nmeasure {vmm}-{form} \"{}\" /root/bench-{vmm}.log 'dump {vmm}'\n\
                 hists '!'\ncp /root/bench-{vmm}.log /root/prof-{vmm}.console\n",
                bootcmp::command(&gw, vmm, form)
            ));
        }
    }
    let out = bootcmp::run_detached(
        &gw,
        "prof",
        &script,
        Duration::from_secs(2 * runs as u64 * (RUN_LIMIT_S + 60)),
    )
    .expect("the profile runs");
    eprint!("{out}");
    let read = |path: &str| {
        gw.ok(&format!("cat {path} 2>/dev/null"))
            .unwrap_or_default()
    };
    let logs: Vec<Vec<(f64, String)>> = VMMS
        .iter()
        .map(|v| kernel_log(&read(&format!("/root/prof-{v}.console"))))
        .collect();
    // The consoles (kernel logs included) stay for a closer look.
    let keep = qemu_tests::target_dir().join("boot-profile");
    let _ = std::fs::create_dir_all(&keep);
    for vmm in VMMS {
        let _ = std::fs::write(
            keep.join(format!("{vmm}.console")),
            read(&format!("/root/prof-{vmm}.console")),
        );
    }
    let hist = |vmm: &str, ev: &str| counts(&read(&format!("/root/prof-{vmm}-{ev}.hist")));

    let mut report = String::new();
    let mut json = serde_json::Map::new();
    for vmm in VMMS {
        let b = boots(&out, &format!("{vmm}-{form}"));
        let last = b.last().copied();
        report += &format!(
            "{vmm}: to /init {} ms wall, guest uptime {} s (runs: {:?})\n",
            last.map_or("?".into(), |b| b.wall_ms.to_string()),
            last.and_then(|b| b.uptime_s)
                .map_or("?".into(), |u| u.to_string()),
            b.iter().map(|b| b.wall_ms).collect::<Vec<_>>()
        );
        json.insert(
            format!("{vmm}_uptime_at_init_s"),
            serde_json::json!(last.and_then(|b| b.uptime_s)),
        );
        json.insert(
            format!("{vmm}_exits"),
            serde_json::json!(hist(vmm, "kvm_exit").values().sum::<u64>()),
        );
    }
    for vmm in VMMS {
        let console = read(&format!("/root/prof-{vmm}.console"));
        let w = warnings(&console);
        report += &format!("{vmm}: {} kernel warnings or worse\n", w.len());
        for m in &w {
            report += &format!("  {m}\n");
        }
    }
    report += "\nPhases where ours loses most (shared kernel messages; ms from the one before):\n";
    let losses = losses(&logs[0], &logs[1]);
    for (loss, ours, qemu, msg) in losses.iter().take(15) {
        report += &format!("  +{loss:7.1}  ours {ours:8.1}  qemu {qemu:8.1}  {msg}\n");
    }
    json.insert(
        "largest_losses_ms".into(),
        losses
            .iter()
            .take(5)
            .map(|(l, _, _, m)| serde_json::json!({ "ms": (l * 10.0).round() / 10.0, "before": m }))
            .collect(),
    );
    report += "\nLargest gaps in our log (ms before the message):\n";
    let mut gaps: Vec<(f64, &str)> = logs[0]
        .windows(2)
        .map(|w| ((w[1].0 - w[0].0) * 1000.0, w[1].1.as_str()))
        .collect();
    gaps.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (g, m) in gaps.iter().take(12) {
        report += &format!("  {g:8.1}  {m}\n");
    }
    for (ev, what) in [
        ("kvm_exit", "Exits by reason"),
        ("kvm_pio", "Port I/O (port, write)"),
        ("kvm_msr", "MSR accesses (register, write)"),
    ] {
        let (ours, qemu) = (hist("gatevisor", ev), hist("qemu", ev));
        report += &format!(
            "\n{what}: ours {} total, qemu {}\n",
            ours.values().sum::<u64>(),
            qemu.values().sum::<u64>()
        );
        let mut keys: Vec<&String> = ours.keys().chain(qemu.keys()).collect();
        keys.sort_by_key(|k| {
            std::cmp::Reverse(ours.get(*k).unwrap_or(&0) + qemu.get(*k).unwrap_or(&0))
        });
        keys.dedup();
        for k in keys.iter().take(20) {
            let name = if ev == "kvm_exit" { exit_name(k) } else { "" };
            report += &format!(
                "  {:>9} {:>9}  {k} {name}\n",
                ours.get(*k).unwrap_or(&0),
                qemu.get(*k).unwrap_or(&0)
            );
        }
    }
    eprintln!("\n{report}");
    println!("{}", serde_json::Value::Object(json));
}
