//! The microVM boot comparison inside the emulated gateway (real KVM there): our VMM
//! (`gatevisor vmm`) against `qemu-system-x86_64 -M microvm -enable-kvm`, same stock Debian
//! kernel, same busybox initramfs, same command line, 128 MiB, one vCPU. The kernel is given
//! to both in its two forms: the ELF `vmlinux` (entered through PVH by both VMMs, the headline
//! figures) and the `vmlinuz` bzImage (which first decompresses itself). Each boot is timed
//! from process start to the guest's `/init` printing its marker on the serial console, `RUNS`
//! times per VMM and form, alternating. Prints one JSON object; `gatevisor-vmm`'s boot
//! benchmark runs this.

use qemu_tests::guest::{busybox_initramfs, INIT_MARKER};
use std::time::Duration;

const RUNS: usize = 3;
/// A boot that has not reached `/init` by then counts as failed (QEMU has taken from 15 s to
/// 150 s under the gateway's nested TCG, ours 7-8 s).
const RUN_LIMIT_S: u64 = 400;

fn main() {
    if let Some(why) = skip() {
        println!("{}", serde_json::json!({ "error": why }));
        std::process::exit(1);
    }
    let gw = qemu_tests::Gateway::boot().expect("the emulated gateway boots");
    let initrd = gw.dir.join("bench-guest.cpio");
    busybox_initramfs(&initrd, "").unwrap();
    gw.put(&initrd, "/root/bench.cpio", 0o644).unwrap();
    let release = &gw.image.kernel_release;
    let cmdline = "console=ttyS0 reboot=k panic=-1 pci=off quiet";
    for form in ["vmlinux", "vmlinuz"] {
        let cfg = format!(
            "memory_mib = 128\nconsole_log = \"/root/bench-vmm.log\"\n[boot]\nkind = \"linux\"\n\
             kernel = \"/boot/{form}-{release}\"\ninitrd = \"/root/bench.cpio\"\ncmdline = \"{cmdline}\"\n"
        );
        gw.put_bytes(cfg.as_bytes(), &format!("/root/bench-{form}.toml"), 0o644)
            .unwrap();
    }
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
  for form in vmlinux vmlinuz; do
    measure gatevisor-$form "gatevisor vmm --config /root/bench-$form.toml" /root/bench-vmm.log
    measure qemu-$form "qemu-system-x86_64 -M microvm -enable-kvm -cpu host -m 128 -smp 1 -nodefaults \
      -no-user-config -display none -no-reboot -serial file:/root/bench-qemu.log \
      -kernel /boot/$form-{release} -initrd /root/bench.cpio -append '{cmdline}'" /root/bench-qemu.log
  done
done"#
    );
    // The agent answers each request within its own limit: run the script detached and poll.
    gw.ok(&format!(
        "cat > /root/bench.sh <<'EOF_BENCH'\n{script}\nEOF_BENCH\n\
         (setsid sh /root/bench.sh > /root/bench.out 2>&1; echo done >> /root/bench.out) \
         < /dev/null > /dev/null 2>&1 &"
    ))
    .expect("the comparison starts");
    let out = gw
        .wait_until(
            "the boot comparison",
            Duration::from_secs(4 * RUNS as u64 * (RUN_LIMIT_S + 30)),
            |gw| {
                let o = gw.ok("cat /root/bench.out")?;
                Ok(o.lines().any(|l| l == "done").then_some(o))
            },
        )
        .expect("the comparison runs");
    eprint!("{out}");
    let median = |who: &str| -> Option<f64> {
        let mut v: Vec<f64> = out
            .lines()
            .filter_map(|l| {
                let (w, ms) = l.split_once(' ')?;
                (w == who).then(|| ms.parse::<f64>().ok())?
            })
            .collect();
        if v.len() < RUNS {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    };
    let ratio =
        |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| (a / b * 1000.0).round() / 1000.0);
    let (ours, qemu) = (median("gatevisor-vmlinux"), median("qemu-vmlinux"));
    let (ours_bz, qemu_bz) = (median("gatevisor-vmlinuz"), median("qemu-vmlinuz"));
    println!(
        "{}",
        serde_json::json!({
            "boot_to_init_ms_median": ours,
            "qemu_microvm_boot_to_init_ms_median": qemu,
            "boot_ratio": ratio(ours, qemu),
            "bzimage_boot_to_init_ms_median": ours_bz,
            "bzimage_qemu_microvm_boot_to_init_ms_median": qemu_bz,
            "bzimage_boot_ratio": ratio(ours_bz, qemu_bz),
            "guest": format!("{release} (vmlinux through PVH; bzImage alongside), busybox initramfs, 128 MiB, 1 vCPU, runs: {RUNS}"),
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
