//! The microVM boot comparison inside the emulated gateway (real KVM there): our VMM
//! (`gatevisor vmm`) against `qemu-system-x86_64 -M microvm -enable-kvm`, same stock Debian
//! kernel, same busybox initramfs, 128 MiB, one vCPU. Each is timed from its process start to
//! the guest's `/init` printing its marker on the serial console, `RUNS` times each. Prints one
//! JSON object; `gatevisor-vmm`'s boot benchmark runs this.

use qemu_tests::guest::{busybox_initramfs, INIT_MARKER};
use std::time::Duration;

const RUNS: usize = 3;
/// A boot that has not reached `/init` by then counts as failed (QEMU takes about 130 s
/// under the gateway's nested TCG, ours about 12 s).
const RUN_LIMIT_S: u64 = 600;

fn main() {
    if let Some(why) = skip() {
        println!("{}", serde_json::json!({ "error": why }));
        std::process::exit(1);
    }
    let gw = qemu_tests::Gateway::boot().expect("the emulated gateway boots");
    let initrd = gw.dir.join("bench-guest.cpio");
    busybox_initramfs(&initrd, "").unwrap();
    gw.put(&initrd, "/root/bench.cpio", 0o644).unwrap();
    let kernel = format!("/boot/vmlinuz-{}", gw.image.kernel_release);
    let cmdline = "console=ttyS0 reboot=k panic=-1 pci=off quiet";
    let cfg = format!(
        "memory_mib = 128\nconsole_log = \"/root/bench-vmm.log\"\n[boot]\nkind = \"linux\"\n\
         kernel = \"{kernel}\"\ninitrd = \"/root/bench.cpio\"\ncmdline = \"{cmdline}\"\n"
    );
    gw.put_bytes(cfg.as_bytes(), "/root/bench-vm.toml", 0o644)
        .unwrap();
    let script = format!(
        r#"measure() {{
  rm -f "$3"; s=$(date +%s%N)
  sh -c "$2" >/dev/null 2>&1 & pid=$!
  while ! grep -q '{INIT_MARKER}' "$3" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || {{ echo "$1 failed"; return; }}
    if [ $(( ($(date +%s%N) - s) / 1000000000 )) -ge {RUN_LIMIT_S} ]; then
      kill -9 $pid; wait $pid; echo "$1 timed-out"; return
    fi
    sleep 0.02
  done
  e=$(date +%s%N); echo "$1 $(( (e - s) / 1000000 ))"; wait $pid
}}
for i in $(seq {RUNS}); do
  measure gatevisor "gatevisor vmm --config /root/bench-vm.toml" /root/bench-vmm.log
  measure qemu "qemu-system-x86_64 -M microvm -enable-kvm -cpu host -m 128 -smp 1 -nodefaults \
    -no-user-config -display none -no-reboot -serial file:/root/bench-qemu.log \
    -kernel {kernel} -initrd /root/bench.cpio -append '{cmdline}'" /root/bench-qemu.log
done"#
    );
    let out = gw
        .ok_for(
            &script,
            Duration::from_secs(2 * RUNS as u64 * (RUN_LIMIT_S + 30)),
        )
        .expect("the comparison runs");
    eprint!("{out}");
    let mut ours = Vec::new();
    let mut qemu = Vec::new();
    for line in out.lines() {
        let mut f = line.split_whitespace();
        let (Some(who), Some(ms)) = (f.next(), f.next().and_then(|v| v.parse::<f64>().ok())) else {
            continue;
        };
        match who {
            "gatevisor" => ours.push(ms),
            "qemu" => qemu.push(ms),
            _ => {}
        }
    }
    let median = |v: &mut Vec<f64>| -> Option<f64> {
        if v.len() < RUNS {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    };
    let (ours, qemu) = (median(&mut ours), median(&mut qemu));
    println!(
        "{}",
        serde_json::json!({
            "boot_to_init_ms_median": ours,
            "qemu_microvm_boot_to_init_ms_median": qemu,
            "boot_ratio": ours.zip(qemu).map(|(a, b)| (a / b * 1000.0).round() / 1000.0),
            "guest": format!("{kernel}, busybox initramfs, 128 MiB, 1 vCPU, runs: {RUNS}"),
        })
    );
}

fn skip() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (the emulated gateway)".into());
    }
    if !qemu_tests::on_path("qemu-system-x86_64") {
        return Some("qemu-system-x86_64 is not installed (scripts/setup.sh)".into());
    }
    None
}
