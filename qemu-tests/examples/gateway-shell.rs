//! Boots an emulated gateway and runs each line read from stdin inside it, printing its output:
//! a field engineer's console on the test board.
//!   sudo cargo run -p qemu-tests --example gateway-shell
//! The LAN host's commands start with `lan: `, the WAN host's with `wan: `.

use std::io::BufRead;

fn main() {
    let gw = qemu_tests::Gateway::boot().unwrap_or_else(|e| {
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
