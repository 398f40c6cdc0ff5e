//! The README's demo inside the emulated gateway (`scripts/run.sh --in-gateway`): the same
//! home (gvdemo-laptop, gvdemo-camera, gvdemo-wan, now namespaces of the gateway on its
//! br-lan) and the same checks (`scripts/demo-home.sh`), with gatevisor from systemd and
//! hardware KVM, so `runtime = "auto"` runs dns-filter and iot-guard as microVMs.
//!
//!   sudo cargo run --release -p qemu-tests --example in-gateway-demo [-- --once]
//!
//! `--once` exits with the outcome (0: every check as expected). Otherwise the gateway stays
//! up: each line typed runs in the gateway (try `ip netns exec gvdemo-laptop python3
//! /root/demo/demo-dns.py 10.90.0.1 games.test`); end of input or Ctrl-C ends it.

use std::io::BufRead;
use std::time::{Duration, Instant};

const DEMO: &str = "/root/demo";

fn main() {
    let once = std::env::args().any(|a| a == "--once");
    if let Some(why) = qemu_tests::skip_reason() {
        eprintln!("in-gateway-demo: cannot run: {why}");
        std::process::exit(2);
    }
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        eprintln!("in-gateway-demo: {what}: {e}");
        std::process::exit(1)
    };
    let work = qemu_tests::target_dir().join("qemu-tests/demo");
    std::fs::create_dir_all(&work).unwrap_or_else(|e| fail("create the work folder", &e));
    println!("== building the signed packages (dns-filter, iot-guard)");
    let (pkgs, key) = qemu_tests::packages::signed(&work, &["dns-filter", "iot-guard"], |_| {})
        .unwrap_or_else(|e| fail("build the packages", &e));
    println!("== booting the emulated gateway");
    let gw = qemu_tests::Gateway::boot().unwrap_or_else(|e| fail("boot the gateway", &e));
    println!(
        "   up in {:.0} s (QEMU TCG with nested AMD-V; logs in {})",
        gw.boot_secs,
        gw.dir.display()
    );
    // The harness's own LAN host has the laptop's MAC: keep it quiet on the bridge.
    let _ = gw
        .lan
        .try_sh("ip link set dev $(ls /sys/class/net | grep -v lo | head -1) down");
    let scripts = qemu_tests::workspace().join("scripts");
    let put = |local: &std::path::Path, name: &str| {
        gw.put(local, &format!("{DEMO}/{name}"), 0o755)
            .unwrap_or_else(|e| fail(&format!("put {name}"), &e));
    };
    for (p, name) in pkgs.iter().zip(["dns-filter.gvpkg", "iot-guard.gvpkg"]) {
        put(p, name);
    }
    put(&key, "operator.pub");
    for s in ["demo-home.sh", "demo-wan.py", "demo-dns.py"] {
        put(&scripts.join(s), s);
    }
    let driver = format!(
        "set -u\n\
         bin=gatevisor work={DEMO} pkgs={DEMO} scripts={DEMO}\n\
         add_port() {{ ovs-vsctl add-port br-lan \"$1\"; }}\n\
         gatevisor key trust {DEMO}/operator.pub\n\
         echo '== the board'\n\
         gatevisor board | grep -E '^(kvm|auto runtime|open vswitch)'\n\
         . {DEMO}/demo-home.sh\n\
         exit $fails\n"
    );
    gw.put_bytes(driver.as_bytes(), &format!("{DEMO}/driver.sh"), 0o755)
        .unwrap_or_else(|e| fail("put the driver", &e));
    gw.ok(&format!(
        "(bash {DEMO}/driver.sh > {DEMO}/out.log 2>&1; echo $? > {DEMO}/code) >/dev/null 2>&1 &"
    ))
    .unwrap_or_else(|e| fail("start the demo", &e));

    // Follow the demo's output as it comes.
    let started = Instant::now();
    let mut shown = 0usize;
    let code = loop {
        std::thread::sleep(Duration::from_secs(1));
        if let Ok(out) = gw.run(&format!("tail -c +{} {DEMO}/out.log", shown + 1)) {
            print!("{}", out.stdout);
            shown += out.stdout.len();
        }
        if let Ok(out) = gw.run(&format!("cat {DEMO}/code")) {
            if out.success() {
                if let Ok(rest) = gw.run(&format!("tail -c +{} {DEMO}/out.log", shown + 1)) {
                    print!("{}", rest.stdout);
                }
                break out.stdout.trim().parse::<i32>().unwrap_or(1);
            }
        }
        if started.elapsed() > Duration::from_secs(1200) {
            eprintln!("in-gateway-demo: the demo did not finish in 20 minutes");
            break 1;
        }
    };
    if code == 0 {
        println!("== demo OK inside the gateway: every outcome as expected");
    } else {
        println!("== demo inside the gateway: {code} unexpected outcomes");
        gw.dump();
    }
    if once {
        std::process::exit(if code == 0 { 0 } else { 1 });
    }
    println!("== the demo keeps running in the gateway; each line you type runs there (end of input or Ctrl-C stops it)");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match gw.run(line.trim()) {
            Ok(o) => print!("{}{}", o.stdout, o.stderr),
            Err(e) => println!("error: {e}"),
        }
    }
}
