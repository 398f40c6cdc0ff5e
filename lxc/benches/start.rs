//! Start latency: gatevisor's LXC runtime versus `lxc-start -d` + `lxc-wait -s RUNNING`, on the
//! same busybox container definition, 10 starts each. Time is from the request to the
//! container's init running. Needs root and liblxc; otherwise prints why and a JSON object with
//! null figures.
//!
//! This binary is also its own monitor process (`start __monitor JSON`), as `gatevisor` is in
//! production.

use gatevisor_lxc::{Cgroups, ContainerSpec, Limits, MonitorCommand, RunFiles, Runtime};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const RUNS: usize = 10;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__monitor") {
        std::process::exit(gatevisor_lxc::monitor::monitor_main(&args[2]));
    }
    match run() {
        Ok(line) => println!("{line}"),
        Err(why) => {
            eprintln!("start bench not run: {why}");
            println!(
                "{{\"gatevisor_start_ms_median\": null, \"lxc_cli_start_ms_median\": null, \"ratio\": null, \"error\": {:?}}}",
                why
            );
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn cgroups() -> Cgroups {
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    if v2.trim().is_empty() {
        Cgroups::V1
    } else {
        Cgroups::V2
    }
}

fn run() -> Result<String, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (liblxc containers)".into());
    }
    for tool in ["lxc-start", "lxc-wait", "lxc-stop"] {
        if !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
        {
            return Err(format!("{tool} not installed (apt-get install lxc)"));
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("gv-bench-lxc")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let rootfs = dir.path().join("rootfs");
    gatevisor_lxc::rootfs::build_busybox(Path::new("/bin/busybox"), &rootfs)
        .map_err(|e| format!("{e}"))?;
    let lxcpath = dir.path().join("lxc");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let rt = Runtime::new(
        &lxcpath,
        cgroups(),
        MonitorCommand {
            program: exe,
            args: vec!["__monitor".into()],
        },
    )
    .map_err(|e| e.to_string())?;
    let name = format!("gvb{}", std::process::id() % 100000);
    let spec = ContainerSpec {
        name: name.clone(),
        hostname: name.clone(),
        rootfs,
        disk_image: None,
        env: vec![],
        limits: Limits {
            memory_bytes: Some(64 << 20),
            cpu_quota_us: Some(50_000),
            pids: Some(64),
            cpus: None,
        },
        capabilities: vec![],
        veth_host: Some(format!("gv-{name}")),
        ipv4_address: None,
        mac: None,
        seccomp_profile: gatevisor_lxc::default_seccomp_profile(),
        apparmor_profile: gatevisor_lxc::apparmor_profile(),
        bind_dirs: vec![],
        idmap: None,
        user: None,
        cwd: None,
        stop_signal: None,
    };
    rt.define(&spec).map_err(|e| format!("define: {e}"))?;
    let argv: Vec<String> = [
        "/bin/sh",
        "-c",
        "trap 'exit 0' TERM; while :; do sleep 1; done",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let files = RunFiles {
        exit_file: dir.path().join("exit"),
        log_file: dir.path().join("svc.log"),
        log_max_bytes: 1 << 20,
        log_keep: 2,
    };

    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for i in 0..RUNS * 2 {
        if i % 2 == 0 {
            let t = Instant::now();
            let mut started = rt
                .start(&name, &argv, &files, Duration::from_secs(10))
                .map_err(|e| format!("gatevisor start: {e}"))?;
            ours.push(t.elapsed().as_secs_f64() * 1e3);
            rt.stop(&name, Duration::ZERO).map_err(|e| e.to_string())?;
            let _ = started.monitor.wait();
        } else {
            let p = lxcpath.to_string_lossy().to_string();
            let t = Instant::now();
            let ok = Command::new("lxc-start")
                .args(["-P", &p, "-n", &name, "-d", "--"])
                .args(&argv)
                .status()
                .map_err(|e| e.to_string())?
                .success()
                && Command::new("lxc-wait")
                    .args(["-P", &p, "-n", &name, "-s", "RUNNING", "-t", "10"])
                    .status()
                    .map_err(|e| e.to_string())?
                    .success();
            theirs.push(t.elapsed().as_secs_f64() * 1e3);
            if !ok {
                return Err("lxc-start/lxc-wait failed".into());
            }
            let _ = Command::new("lxc-stop")
                .args(["-P", &p, "-n", &name, "-k"])
                .status();
            let _ = Command::new("lxc-wait")
                .args(["-P", &p, "-n", &name, "-s", "STOPPED", "-t", "10"])
                .status();
        }
    }
    let _ = rt.undefine(&name);
    let g = median(ours.clone());
    let l = median(theirs.clone());
    eprintln!("gatevisor runs (ms): {ours:.1?}");
    eprintln!("lxc-start runs (ms): {theirs:.1?}");
    Ok(format!(
        "{{\"gatevisor_start_ms_median\": {g:.2}, \"lxc_cli_start_ms_median\": {l:.2}, \"ratio\": {:.3}, \"runs\": {RUNS}}}",
        g / l
    ))
}
