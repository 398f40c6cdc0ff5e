//! The microVM boot comparison's parts shared by the `microvm-boot` benchmark and the
//! `boot-profile` tool: the same stock kernel, busybox initramfs and command line, booted by
//! our VMM and by QEMU's microvm machine inside the emulated gateway (1 vCPU, 128 MiB), each
//! boot timed from process start to `/init`'s marker on the serial console.

use crate::gateway::Gateway;
use crate::guest::{busybox_initramfs, INIT_MARKER};
use crate::Result;
use std::collections::BTreeMap;
use std::time::Duration;

/// The command line both VMMs give the guest.
pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";

/// The kernel's two forms: the ELF `vmlinux` (entered through PVH by both VMMs) and the
/// `vmlinuz` bzImage (which decompresses itself first).
pub const FORMS: [&str; 2] = ["vmlinux", "vmlinuz"];

/// The two VMMs, as the comparison names them.
pub const VMMS: [&str; 2] = ["gatevisor", "qemu"];

/// Puts `/root/bench.cpio` (a busybox `/init` that runs `script` after its marker) and a VM
/// configuration per kernel form (`/root/bench-<form>.toml`) into the gateway.
pub fn prepare(gw: &Gateway, script: &str) -> Result<()> {
    let initrd = gw.dir.join("bench-guest.cpio");
    busybox_initramfs(&initrd, script)?;
    gw.put(&initrd, "/root/bench.cpio", 0o644)?;
    let release = &gw.image.kernel_release;
    for form in FORMS {
        let cfg = format!(
            "memory_mib = 128\nconsole_log = \"/root/bench-gatevisor.log\"\n[boot]\nkind = \"linux\"\n\
             kernel = \"/boot/{form}-{release}\"\ninitrd = \"/root/bench.cpio\"\ncmdline = \"{CMDLINE}\"\n"
        );
        gw.put_bytes(cfg.as_bytes(), &format!("/root/bench-{form}.toml"), 0o644)?;
    }
    Ok(())
}

/// The shell command that boots `form` under `vmm` (one of [`VMMS`]); its console goes to
/// `/root/bench-<vmm>.log`.
pub fn command(gw: &Gateway, vmm: &str, form: &str) -> String {
    let release = &gw.image.kernel_release;
    match vmm {
        "gatevisor" => format!("gatevisor vmm --config /root/bench-{form}.toml"),
        _ => format!(
            "qemu-system-x86_64 -M microvm -enable-kvm -cpu host -m 128 -smp 1 -nodefaults \
             -no-user-config -display none -no-reboot -serial file:/root/bench-qemu.log \
             -kernel /boot/{form}-{release} -initrd /root/bench.cpio -append '{CMDLINE}'"
        ),
    }
}

/// A shell function `measure NAME COMMAND CONSOLE [AFTER]`: starts COMMAND, waits for the
/// init marker in CONSOLE and prints `NAME <ms from start> <guest uptime at /init, s>`;
/// then, when AFTER is given, evaluates it in this shell (with the VMM still running) and waits for the VMM to
/// end. A boot that fails or takes longer than `limit` prints `NAME failed` or
/// `NAME timed-out` with a diagnosis instead.
pub fn measure_function(limit: Duration) -> String {
    let limit = limit.as_secs();
    format!(
        r#"measure() {{
  rm -f "$3"; s=$(date +%s%N)
  sh -c "$2" >/dev/null 2>&1 & pid=$!
  while ! grep -q '{INIT_MARKER}' "$3" 2>/dev/null; do
    kill -0 $pid 2>/dev/null || {{ echo "$1 failed"; return; }}
    if [ $(( ($(date +%s%N) - s) / 1000000000 )) -ge {limit} ]; then
      echo "$1 timed-out: process state $(cut -d' ' -f3 /proc/$pid/stat), utime+stime $(cut -d' ' -f14,15 /proc/$pid/stat) ticks, threads:"
      for t in /proc/$pid/task/*; do echo "  $(cat $t/comm) $(cut -d' ' -f3 $t/stat) $(cut -d' ' -f14,15 $t/stat)"; done
      echo "  console (last 1500 bytes):"; tail -c 1500 "$3" | sed 's/^/  | /'
      kill -9 $pid; wait $pid; return
    fi
    sleep 0.02
  done
  e=$(date +%s%N)
  up=$(grep -o '{INIT_MARKER}.*uptime [0-9.]*' "$3" | head -1 | sed 's/.*uptime //')
  echo "$1 $(( (e - s) / 1000000 )) $up"
  [ -n "$4" ] && eval "$4"
  wait $pid
}}"#
    )
}

/// Runs `script` in the gateway as `/root/<name>.sh`, detached (the agent answers each
/// request within its own limit), and returns its output once it is over, within `limit`.
pub fn run_detached(gw: &Gateway, name: &str, script: &str, limit: Duration) -> Result<String> {
    gw.ok(&format!(
        "cat > /root/{name}.sh <<'EOF_SCRIPT'\n{script}\nEOF_SCRIPT\n\
         (setsid sh /root/{name}.sh > /root/{name}.out 2>&1; echo done >> /root/{name}.out) \
         < /dev/null > /dev/null 2>&1 &"
    ))?;
    gw.wait_until(&format!("/root/{name}.sh"), limit, |gw| {
        let o = gw.ok(&format!("cat /root/{name}.out"))?;
        Ok(o.lines().any(|l| l == "done").then_some(o))
    })
}

/// One boot's figures as `measure` printed them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Boot {
    /// From the VMM's start to `/init`'s marker on the console.
    pub wall_ms: f64,
    /// The guest's own uptime when `/init` printed its marker.
    pub uptime_s: Option<f64>,
}

/// The boots `measure` reported for `name` in `out`.
pub fn boots(out: &str, name: &str) -> Vec<Boot> {
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == name).then_some(())?;
            Some(Boot {
                wall_ms: w.next()?.parse().ok()?,
                uptime_s: w.next().and_then(|u| u.parse().ok()),
            })
        })
        .collect()
}

/// The median of `v` when more than half of `runs` gave a figure.
pub fn median(mut v: Vec<f64>, runs: usize) -> Option<f64> {
    if v.len() <= runs / 2 {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    })
}

/// `a / b`, to three decimals.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    a.zip(b).map(|(a, b)| (a / b * 1000.0).round() / 1000.0)
}

// The boot profile's readings (see the `boot-profile` example).

/// The kernel's messages in a console log: (seconds since boot, text). Lines may carry
/// their level as `dmesg -r` prints it (`<4>[    0.123456] text`).
pub fn kernel_log(console: &str) -> Vec<(f64, String)> {
    leveled(console).map(|(_, t, m)| (t, m)).collect()
}

/// The warnings and worse (level 4 or lower) among a `dmesg -r` console log's messages.
pub fn warnings(console: &str) -> Vec<String> {
    leveled(console)
        .filter(|(level, _, _)| level.is_some_and(|l| l <= 4))
        .map(|(_, _, m)| m)
        .collect()
}

fn leveled(console: &str) -> impl Iterator<Item = (Option<u32>, f64, String)> + '_ {
    console.lines().filter_map(|l| {
        let l = l.trim_start();
        let (level, rest) = match l.strip_prefix('<').and_then(|r| r.split_once('>')) {
            Some((n, rest)) => (n.parse::<u32>().ok().map(|n| n & 7), rest),
            None => (None, l),
        };
        let (t, msg) = rest.strip_prefix('[')?.split_once(']')?;
        Some((level, t.trim().parse().ok()?, msg.trim().to_string()))
    })
}

/// A message with its figures blanked, so that the same step matches in both logs.
pub fn shape(msg: &str) -> String {
    let mut out = String::new();
    for c in msg.chars() {
        if c.is_ascii_hexdigit() && (c.is_ascii_digit() || out.ends_with('#')) {
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Steps between consecutive messages found (by [`shape`], first occurrence) in both logs, in
/// our order, largest loss first: (loss ms, ours ms, qemu ms, message).
pub fn losses(ours: &[(f64, String)], qemu: &[(f64, String)]) -> Vec<(f64, f64, f64, String)> {
    let mut at_qemu: BTreeMap<String, f64> = BTreeMap::new();
    for (t, m) in qemu {
        at_qemu.entry(shape(m)).or_insert(*t);
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut prev: Option<(f64, f64)> = None;
    let mut out = Vec::new();
    for (t, m) in ours {
        let s = shape(m);
        if !seen.insert(s.clone()) {
            continue;
        }
        let Some(&q) = at_qemu.get(&s) else { continue };
        if let Some((pt, pq)) = prev {
            // Only steps that go forward in both logs.
            if q >= pq {
                let (a, b) = ((t - pt) * 1000.0, (q - pq) * 1000.0);
                out.push((a - b, a, b, m.clone()));
            }
        }
        if prev.is_none_or(|(_, pq)| q >= pq) {
            prev = Some((*t, q));
        }
    }
    out.sort_by(|a, b| b.0.total_cmp(&a.0));
    out
}

/// A tracefs histogram's entries: key text → hits.
pub fn counts(hist: &str) -> BTreeMap<String, u64> {
    hist.lines()
        .filter_map(|l| {
            let l = l.trim();
            let (key, hits) = l.strip_prefix('{')?.split_once('}')?;
            let hits = hits.trim().strip_prefix("hitcount:")?.trim().parse().ok()?;
            let key = key
                .split(',')
                .map(|kv| kv.split(':').nth(1).unwrap_or("").trim())
                .collect::<Vec<_>>()
                .join(",");
            Some((key, hits))
        })
        .collect()
}

/// An AMD SVM exit code's name (the emulated gateway's CPU is an EPYC).
pub fn exit_name(code: &str) -> &'static str {
    match code.trim().parse::<u64>().unwrap_or(u64::MAX) {
        0x40..=0x5f => "exception",
        0x60 => "INTR",
        0x61 => "NMI",
        0x64 => "VINTR",
        0x6e => "RDTSC",
        0x72 => "CPUID",
        0x77 => "PAUSE",
        0x78 => "HLT",
        0x79 => "INVLPG",
        0x7b => "IOIO",
        0x7c => "MSR",
        0x7f => "SHUTDOWN",
        0x81 => "VMMCALL",
        0x8d => "XSETBV",
        0x400 => "NPF",
        0x401 => "AVIC_INCOMPLETE_IPI",
        0x402 => "AVIC_UNACCELERATED_ACCESS",
        0..=0x1f => "CR access",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boots_are_read_from_measure_lines_and_failures_are_not() {
        let out = "gatevisor-vmlinux 3210 2.48\nqemu-vmlinux 6820 5.52\n\
                   gatevisor-vmlinux timed-out: process state R\ngatevisor-vmlinux 3300\n";
        let ours = boots(out, "gatevisor-vmlinux");
        assert_eq!(
            ours,
            vec![
                Boot {
                    wall_ms: 3210.0,
                    uptime_s: Some(2.48)
                },
                Boot {
                    wall_ms: 3300.0,
                    uptime_s: None
                }
            ]
        );
        assert_eq!(median(vec![3.0, 1.0, 2.0], 5), Some(2.0));
        assert_eq!(median(vec![3.0, 1.0], 5), None, "two of five is not enough");
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0], 5), Some(2.5));
        assert_eq!(ratio(Some(1.0), Some(3.0)), Some(0.333));
        assert_eq!(ratio(None, Some(3.0)), None);
    }

    #[test]
    fn shared_steps_are_compared_and_figures_do_not_matter() {
        let ours = kernel_log(
            "[    0.000000] Linux version 6.1\n[    0.100000] Memory: 100K/131072K\n\
             noise\n[    0.400000] Dentry cache hash table entries: 16384\n[    0.410000] only ours\n",
        );
        let qemu = kernel_log(
            "[    0.000000] Linux version 6.1\n[    0.050000] Memory: 104K/131072K\n\
             [    0.150000] Dentry cache hash table entries: 16384\n",
        );
        let l = losses(&ours, &qemu);
        assert_eq!(l.len(), 2);
        assert!((l[0].0 - 200.0).abs() < 1e-6, "{l:?}");
        assert!(l[0].3.starts_with("Dentry"));
        assert_eq!(shape("Memory: 100K/131072K"), shape("Memory: 104K/131072K"));
        let raw = "<6>[    0.000000] Linux version 6.1\n<4>[    0.020000] x86/cpu: odd\n\
                   <30>[    0.030000] systemd-ish info\n<3>[    1.000000] failed: thing\n";
        assert_eq!(kernel_log(raw).len(), 4);
        assert_eq!(warnings(raw), ["x86/cpu: odd", "failed: thing"]);
    }

    #[test]
    fn histogram_entries_are_read() {
        let h = "# event histogram\n{ exit_reason:       1024 } hitcount:        300\n\
                 { port:   1016, rw:          1 } hitcount:          7\n\nTotals:\n";
        let c = counts(h);
        assert_eq!(c["1024"], 300);
        assert_eq!(c["1016,1"], 7);
        assert_eq!(exit_name("1024"), "NPF");
    }
}
