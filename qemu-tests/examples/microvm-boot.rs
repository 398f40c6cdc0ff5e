//! The microVM boot comparison inside the emulated gateway (real KVM there): our VMM
//! (`gatevisor vmm`) against `qemu-system-x86_64 -M microvm -enable-kvm`, same stock Debian
//! kernel, same busybox initramfs, same command line, 128 MiB, one vCPU. The kernel is given
//! to both in its two forms: the ELF `vmlinux` (entered through PVH by both VMMs, the headline
//! figures) and the `vmlinuz` bzImage (which first decompresses itself). Each boot is timed
//! from process start to the guest's `/init` printing its marker on the serial console, `RUNS`
//! times per VMM and form, alternating; `/init` also prints the guest's own uptime, reported
//! next to the wall time. Prints one JSON object; `gatevisor-vmm`'s boot benchmark runs this.

use qemu_tests::bootcmp::{self, boots, median, ratio, FORMS, VMMS};
use std::time::Duration;

const RUNS: usize = 5;
/// A boot that has not reached `/init` by then counts as timed out (QEMU has taken from 15 s to
/// 150 s under the gateway's nested TCG, ours 6-12 s).
const RUN_LIMIT_S: u64 = 240;

fn main() {
    if let Some(why) = qemu_tests::measurement_unavailable() {
        println!("{}", serde_json::json!({ "error": why }));
        std::process::exit(1);
    }
    let gw = qemu_tests::Gateway::boot().expect("the emulated gateway boots");
    bootcmp::prepare(&gw, "").expect("the guest and its configurations");
    let mut script = bootcmp::measure_function(Duration::from_secs(RUN_LIMIT_S));
    script.push_str(&format!("\nfor i in $(seq {RUNS}); do\n"));
    for form in FORMS {
        for vmm in VMMS {
            script.push_str(&format!(
                "  measure {vmm}-{form} \"{}\" /root/bench-{vmm}.log\n",
                bootcmp::command(&gw, vmm, form)
            ));
        }
    }
    script.push_str("done\n");
    let out = bootcmp::run_detached(
        &gw,
        "bench",
        &script,
        Duration::from_secs(4 * RUNS as u64 * (RUN_LIMIT_S + 30)),
    )
    .expect("the comparison runs");
    eprint!("{out}");
    // Medians of the runs that reached `/init` (more than half of them); a run that never
    // did is counted apart, with its diagnosis above.
    let wall = |who: &str| median(boots(&out, who).iter().map(|b| b.wall_ms).collect(), RUNS);
    let uptime = |who: &str| {
        median(
            boots(&out, who).iter().filter_map(|b| b.uptime_s).collect(),
            RUNS,
        )
    };
    let timed_out = |who: &str| {
        out.lines()
            .filter(|l| l.starts_with(&format!("{who} timed-out")))
            .count()
    };
    let mut result = serde_json::Map::new();
    for form in FORMS {
        // The ELF's figures are the headline ones; the bzImage's carry its prefix.
        let p = if form == "vmlinux" { "" } else { "bzimage_" };
        let (ours, qemu) = (
            wall(&format!("gatevisor-{form}")),
            wall(&format!("qemu-{form}")),
        );
        let (up, qemu_up) = (
            uptime(&format!("gatevisor-{form}")),
            uptime(&format!("qemu-{form}")),
        );
        for (k, v) in [
            ("boot_to_init_ms_median", ours),
            ("qemu_microvm_boot_to_init_ms_median", qemu),
            ("boot_ratio", ratio(ours, qemu)),
            ("guest_uptime_at_init_s_median", up),
            ("qemu_microvm_guest_uptime_at_init_s_median", qemu_up),
            ("guest_uptime_at_init_ratio", ratio(up, qemu_up)),
        ] {
            result.insert(format!("{p}{k}"), serde_json::json!(v));
        }
    }
    let mut timeouts = serde_json::Map::new();
    for form in FORMS {
        for vmm in VMMS {
            let who = format!("{vmm}-{form}");
            timeouts.insert(who.replace('-', "_"), timed_out(&who).into());
        }
    }
    result.insert("runs_timed_out".into(), timeouts.into());
    result.insert(
        "guest".into(),
        format!(
            "{} (vmlinux through PVH; bzImage alongside), busybox initramfs, 128 MiB, 1 vCPU, \
             runs: {RUNS}, command line: {}",
            gw.image.kernel_release,
            bootcmp::CMDLINE
        )
        .into(),
    );
    println!("{}", serde_json::Value::Object(result));
}
