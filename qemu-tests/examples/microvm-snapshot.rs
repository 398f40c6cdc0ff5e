//! Snapshot and restore of a running stock-kernel guest inside the emulated gateway (real KVM
//! there), against a cold boot of the same guest in the same gateway boot: the stock Debian
//! kernel (ELF through PVH) and a busybox initramfs whose `/init` prints its marker, then a
//! tick every 20 ms; 128 MiB, one vCPU.
//! - boots: from `gatevisor vmm` starting to the marker on the console, `RUNS` times;
//! - one snapshot of the ticking guest through the VMM's control socket (timed, with the
//!   memory file's size on disk);
//! - restores: from `gatevisor vmm --restore` starting to the first tick on the new console,
//!   `RUNS` times;
//! - two clones restored at once from that snapshot, both ticking: each one's private share
//!   of the guest memory mapped from the snapshot's memory file (the pages it wrote), and the
//!   share it has in common with the other (`Shared_*` in smaps).
//!
//! Prints one JSON object; `gatevisor-vmm`'s snapshot benchmark runs this.

use qemu_tests::bootcmp::{self, median};
use std::time::Duration;

const RUNS: usize = 5;
const LIMIT_S: u64 = 240;

fn main() {
    if let Some(why) = qemu_tests::measurement_unavailable() {
        println!("{}", serde_json::json!({ "error": why }));
        std::process::exit(1);
    }
    let gw = qemu_tests::Gateway::boot().expect("the emulated gateway boots");
    bootcmp::prepare(
        &gw,
        "i=0; while true; do i=$((i+1)); echo tick $i; usleep 20000; done",
    )
    .expect("the guest");
    let release = &gw.image.kernel_release;
    // One configuration per VM that runs at once (its console and control socket); the
    // machine, and so the snapshot, is the same.
    for n in [1, 2] {
        let cfg = format!(
            "memory_mib = 128\nconsole_log = \"/root/snapb{n}.log\"\n\
             control_socket = \"/root/snapb{n}.control\"\n[boot]\nkind = \"linux\"\n\
             kernel = \"/boot/vmlinux-{release}\"\ninitrd = \"/root/bench.cpio\"\n\
             cmdline = \"{}\"\n",
            bootcmp::CMDLINE
        );
        gw.put_bytes(cfg.as_bytes(), &format!("/root/snapb{n}.toml"), 0o644)
            .expect("the configuration");
    }
    let script = format!(
        r#"
# now_ms: the monotonic clock in ms (the gateway's date has ns).
now_ms() {{ echo $(( $(date +%s%N) / 1000000 )); }}
# run NAME N WHAT ARGS...: starts a VMM with configuration N (ARGS added), waits for WHAT on
# its (new) console, prints "NAME <ms>", and leaves it running (its pid in $pid). The VMM
# is this shell's own child, so that killing $pid ends it.
run() {{
  name=$1; n=$2; what=$3; shift 3
  rm -f /root/snapb$n.log; s=$(now_ms)
  gatevisor vmm --config /root/snapb$n.toml "$@" >/root/snapb$n.out 2>&1 & pid=$!
  while ! grep -q "$what" /root/snapb$n.log 2>/dev/null; do
    kill -0 $pid 2>/dev/null || {{ echo "$name failed: $(tail -c 300 /root/snapb$n.out)"; return; }}
    [ $(( $(now_ms) - s )) -ge {limit_ms} ] && {{ echo "$name timed-out"; kill -9 $pid; return; }}
    sleep 0.01
  done
  echo "$name $(( $(now_ms) - s ))"
}}
# private_kib PID: the guest memory mapped from the snapshot's memory file, in that VMM:
# "private <KiB> shared <KiB>".
private_kib() {{
  awk '/\/root\/snap\/memory/ {{m=1; next}} /^[0-9a-f]+-[0-9a-f]+ / {{m=0}}
       m && /^Private_(Clean|Dirty):/ {{p+=$2}} m && /^Shared_(Clean|Dirty):/ {{s+=$2}}
       END {{print "private", p+0, "shared", s+0}}' /proc/$1/smaps
}}
for i in $(seq {runs}); do
  run boot 1 '{marker}'; kill -9 $pid; wait $pid 2>/dev/null
done
# The snapshot: of a guest ticking for a second.
run snapshot-source 1 'tick 50'
rm -rf /root/snap; mkdir -p /root/snap
s=$(now_ms)
/usr/local/sbin/gateway-agent vmm-snapshot /root/snapb1.control /root/snap && echo "snapshot $(( $(now_ms) - s )) $(du -k /root/snap/memory | cut -f1)"
kill -9 $pid; wait $pid
for i in $(seq {runs}); do
  run restore 1 tick --restore /root/snap; kill -9 $pid; wait $pid 2>/dev/null
done
# Two clones at once; both tick on, then each one's share of the snapshot's memory.
run clone1 1 tick --restore /root/snap; one=$pid
run clone2 2 tick --restore /root/snap; two=$pid
sleep 2
echo "clone1-ticks $(grep -c tick /root/snapb1.log) clone2-ticks $(grep -c tick /root/snapb2.log)"
echo "clone1-memory $(private_kib $one)"
echo "clone2-memory $(private_kib $two)"
kill -9 $one $two; wait $one $two 2>/dev/null
"#,
        marker = qemu_tests::guest::INIT_MARKER,
        limit_ms = LIMIT_S * 1000,
        runs = RUNS,
    );
    let out = bootcmp::run_detached(
        &gw,
        "snapbench",
        &script,
        Duration::from_secs(3 * RUNS as u64 * LIMIT_S),
    )
    .expect("the snapshot runs");
    eprint!("{out}");
    let figures = |name: &str| -> Vec<f64> {
        out.lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next()? == name).then_some(())?;
                w.next()?.parse().ok()
            })
            .collect()
    };
    let boot = median(figures("boot"), RUNS);
    let restore = median(figures("restore"), RUNS);
    // "snapshot <ms> <KiB>" (the client's own "snapshot in DIR" line aside).
    let snapshot = out.lines().find_map(|l| {
        let v: Vec<f64> = l
            .strip_prefix("snapshot ")?
            .split_whitespace()
            .map(|w| w.parse().ok())
            .collect::<Option<_>>()?;
        (v.len() == 2).then_some(v)
    });
    let memory = |who: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{who}-memory private ")))
            .and_then(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                Some((
                    w.first()?.parse::<u64>().ok()?,
                    w.get(2)?.parse::<u64>().ok()?,
                ))
            })
    };
    let ticking = out
        .lines()
        .find(|l| l.starts_with("clone1-ticks"))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.parse::<u64>().ok())
                .all(|n| n > 0)
        })
        .unwrap_or(false);
    let failed = out
        .lines()
        .filter(|l| l.contains(" failed") || l.contains(" timed-out"))
        .count();
    println!(
        "{}",
        serde_json::json!({
            "boot_to_init_ms_median": boot,
            "restore_to_running_ms_median": restore,
            "restore_ratio": bootcmp::ratio(restore, boot),
            "snapshot_ms": snapshot.as_ref().and_then(|s| s.first().copied()),
            "snapshot_memory_file_kib": snapshot.as_ref().and_then(|s| s.get(1).copied()),
            "clones_both_ticking": ticking,
            "clone_private_kib": memory("clone2").map(|m| m.0),
            "clone_shared_kib": memory("clone2").map(|m| m.1),
            "first_clone_private_kib": memory("clone1").map(|m| m.0),
            "guest_memory_kib": 128 * 1024,
            "runs_failed": failed,
            "guest": format!(
                "{} (vmlinux through PVH), busybox initramfs ticking every 20 ms, 128 MiB, \
                 1 vCPU, runs: {RUNS}, command line: {}",
                gw.image.kernel_release,
                bootcmp::CMDLINE
            ),
        })
    );
}
