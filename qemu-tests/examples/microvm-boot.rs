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

const RUNS: usize = 5;
/// A boot that has not reached `/init` by then counts as timed out (QEMU has taken from 15 s to
/// 150 s under the gateway's nested TCG, ours 6-12 s).
const RUN_LIMIT_S: u64 = 240;

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
      echo "$1 timed-out: process state $(cut -d' ' -f3 /proc/$pid/stat), utime+stime $(cut -d' ' -f14,15 /proc/$pid/stat) ticks, threads:"
      for t in /proc/$pid/task/*; do echo "  $(cat $t/comm) $(cut -d' ' -f3 $t/stat) $(cut -d' ' -f14,15 $t/stat)"; done
      echo "  console (last 1500 bytes):"; tail -c 1500 "$3" | sed 's/^/  | /'
      kill -9 $pid; wait $pid; return
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
    // The median of the runs that reached `/init` (more than half of them); a run that never
    // did is counted apart, with its diagnosis above.
    let median = |who: &str| -> Option<f64> {
        let mut v: Vec<f64> = out
            .lines()
            .filter_map(|l| {
                let (w, ms) = l.split_once(' ')?;
                (w == who).then(|| ms.parse::<f64>().ok())?
            })
            .collect();
        if v.len() <= RUNS / 2 {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        })
    };
    let timed_out = |who: &str| {
        out.lines()
            .filter(|l| l.starts_with(&format!("{who} timed-out")))
            .count()
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
            "runs_timed_out": {
                "gatevisor_vmlinux": timed_out("gatevisor-vmlinux"),
                "qemu_vmlinux": timed_out("qemu-vmlinux"),
                "gatevisor_vmlinuz": timed_out("gatevisor-vmlinuz"),
                "qemu_vmlinuz": timed_out("qemu-vmlinuz"),
            },
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
