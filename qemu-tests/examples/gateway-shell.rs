//! Boots an emulated gateway and runs each line read from stdin inside it, printing its output:
//! a field engineer's console on the test board.
//!   sudo cargo run -p qemu-tests --example gateway-shell
//! The LAN host's commands start with `lan: `, the WAN host's with `wan: `;
//! `put: LOCAL REMOTE` copies a file in; `initramfs: PATH SCRIPT` puts a busybox microVM initramfs running SCRIPT at PATH
//! (`initramfs+modules: PATH SCRIPT` loads the guest's virtio modules first); `reboot` reboots
//! the gateway and waits until it and gatevisor are back.

use std::io::BufRead;

fn main() {
    let mut gw = qemu_tests::Gateway::boot().unwrap_or_else(|e| {
        eprintln!("gateway-shell: {e}");
        std::process::exit(1)
    });
    println!(
        "gateway up in {:.0} s; logs in {}",
        gw.boot_secs,
        gw.dir.display()
    );
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "reboot" {
            match gw.reboot() {
                Ok(()) => println!("[rebooted: boot {}]", gw.boot_id()),
                Err(e) => println!("error: {e}"),
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("put: ") {
            // put: LOCAL REMOTE — copies a host file into the gateway (mode 0755).
            let (local, remote) = rest.split_once(' ').unwrap_or((rest, rest));
            let r = gw.put(std::path::Path::new(local), remote, 0o755);
            println!(
                "{}",
                r.map(|()| "[exit Some(0)]".to_string())
                    .unwrap_or_else(|e| format!("error: {e}"))
            );
            continue;
        }
        let with_modules = line.starts_with("initramfs+modules: ");
        if let Some(rest) = line
            .strip_prefix("initramfs: ")
            .or_else(|| line.strip_prefix("initramfs+modules: "))
        {
            // initramfs: REMOTE-PATH SCRIPT — a busybox guest initramfs running SCRIPT
            // (`initramfs+modules:` also loads the virtio modules first).
            let (remote, script) = rest.split_once(' ').unwrap_or((rest, ""));
            let local = gw.dir.join("shell-guest.cpio");
            let r = if with_modules {
                qemu_tests::image::base()
                    .and_then(|b| qemu_tests::image::guest_modules(&b))
                    .and_then(|m| {
                        qemu_tests::guest::busybox_initramfs_with_modules(&local, script, &m)
                    })
            } else {
                qemu_tests::guest::busybox_initramfs(&local, script)
            }
            .and_then(|()| gw.put(&local, remote, 0o644));
            println!(
                "{}",
                r.map(|()| "[exit Some(0)]".to_string())
                    .unwrap_or_else(|e| format!("error: {e}"))
            );
            continue;
        }
        let out = if let Some(cmd) = line.strip_prefix("lan: ") {
            gw.lan.try_sh(cmd).into()
        } else if let Some(cmd) = line.strip_prefix("wan: ") {
            gw.wan.try_sh(cmd).into()
        } else {
            match gw.run(line) {
                Ok(o) => o,
                Err(e) => {
                    println!("error: {e}");
                    continue;
                }
            }
        };
        print!("{}{}", out.stdout, out.stderr);
        println!("[exit {:?}]", out.code);
    }
}
