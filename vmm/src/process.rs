//! `gatevisor vmm --config FILE [--restore DIR]`: one VM in this process, which ends with the
//! VM; booted, or restored from the snapshot in DIR. The exit status says how the VM ended,
//! so the supervisor can tell a guest that ended itself from a broken one.

use crate::{VmConfig, VmEnd};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The guest ended its VM: Linux's `reboot` (the reset line) or `poweroff` (ACPI S5).
pub const EXIT_GUEST_ENDED: i32 = 0;
/// The configuration or the host could not make the VM.
pub const EXIT_SETUP: i32 = 2;
/// The guest crashed (triple fault).
pub const EXIT_GUEST_CRASHED: i32 = 3;
/// The guest drove its machine into a state the VMM cannot continue (emulation failure,
/// failed entry, an exit it has no device for).
pub const EXIT_GUEST_BROKE: i32 = 4;
/// Debug-exit status `n` is reported as `DEBUG_EXIT_BASE + n` (test guests only).
pub const DEBUG_EXIT_BASE: i32 = 16;

/// Reads a TOML [`VmConfig`].
pub fn read_config(path: &Path) -> crate::Result<VmConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| crate::Error::File {
        what: "read VM configuration",
        path: path.to_path_buf(),
        source,
    })?;
    let cfg: VmConfig = toml::from_str(&text)
        .map_err(|e| crate::Error::Config(format!("{}: {e}", path.display())))?;
    cfg.validate()?;
    Ok(cfg)
}

/// Writes the exit record into the file opened before the sandbox closed `open(2)`. The
/// supervisor reads it only once this process has ended, so it never sees half a record.
fn record(file: Option<std::fs::File>, code: i32, start_failed: bool) {
    use std::io::Write;
    let Some(mut f) = file else { return };
    let text = format!("{{\"code\":{code},\"signal\":null,\"start_failed\":{start_failed}}}");
    let _ = f.write_all(text.as_bytes());
}

pub fn vmm_main(config: &Path, restore: Option<&Path>) -> i32 {
    let cfg = match read_config(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gatevisor vmm: {e}");
            return EXIT_SETUP;
        }
    };
    // Empty until the VM ends: an empty record means the process was killed. Written once,
    // by whichever vCPU saw the end.
    let exit_file = Arc::new(Mutex::new(
        cfg.exit_file
            .as_ref()
            .and_then(|p| std::fs::File::create(p).ok()),
    ));
    let record_once = move |code: i32, start_failed: bool| {
        let f = exit_file.lock().unwrap_or_else(|p| p.into_inner()).take();
        record(f, code, start_failed);
    };
    let made = match restore {
        None => crate::vm::Vm::new(&cfg),
        Some(dir) => crate::vm::Vm::restore(&cfg, dir),
    };
    let mut vm = match made {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("gatevisor vmm: {e}");
            record_once(EXIT_SETUP, true);
            return EXIT_SETUP;
        }
    };
    let record_once = Arc::new(record_once);
    // An application processor that ends the VM ends the process from its own thread.
    let ap_end: Arc<dyn Fn(crate::Result<VmEnd>) + Send + Sync> = {
        let record_once = record_once.clone();
        Arc::new(move |end| {
            let code = outcome(&end);
            record_once(code, false);
            std::process::exit(code)
        })
    };
    // Capabilities go first (threads inherit them), then each thread filters itself.
    let sandboxed = crate::sandbox::drop_capabilities()
        .and_then(|()| vm.start_io())
        .and_then(|()| vm.start_control())
        .and_then(|()| vm.start_aps(true, ap_end))
        .and_then(|()| {
            release_setup_code();
            crate::sandbox::apply_filter()
        });
    if let Err(e) = sandboxed {
        eprintln!("gatevisor vmm: {e}");
        record_once(EXIT_SETUP, true);
        return EXIT_SETUP;
    }
    let end = vm.run();
    for broken in vm.broken_devices() {
        eprintln!("gatevisor vmm: {broken}");
    }
    let code = outcome(&end);
    record_once(code, false);
    code
}

/// Unmaps the code pages the set-up ran (configuration parsing, ACPI tables, kernel loading)
/// from this process: one VMM process lives per VM for as long as its guest, and only the
/// code of its run loop is needed from here on. Executable file mappings are never written,
/// so this only drops page-table entries: whatever runs again is faulted back in from the
/// page cache. Writable or relocated mappings are left alone. Best effort.
fn release_setup_code() {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return;
    };
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        // Private, read-only, executable, backed by a file (a path after the inode).
        if perms != "r-xp" || !f.nth(3).is_some_and(|p| p.starts_with('/')) {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        // SAFETY: the range is an existing read-only executable file mapping of this process,
        // never written (no text relocations on x86_64 PIE); MADV_DONTNEED on it drops the
        // page-table entries and later accesses read the same bytes from the file again.
        unsafe {
            libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_DONTNEED);
        }
    }
}

/// The exit status for how the VM ended, and what it says on the log.
fn outcome(end: &crate::Result<VmEnd>) -> i32 {
    match end {
        Ok(VmEnd::Reset) => {
            eprintln!("gatevisor vmm: the guest ended its VM (reset)");
            EXIT_GUEST_ENDED
        }
        Ok(VmEnd::PowerOff) => {
            eprintln!("gatevisor vmm: the guest powered off");
            EXIT_GUEST_ENDED
        }
        Ok(VmEnd::TripleFault) => {
            eprintln!("gatevisor vmm: the guest crashed (triple fault)");
            EXIT_GUEST_CRASHED
        }
        Ok(VmEnd::DebugExit(n)) => DEBUG_EXIT_BASE + *n as i32,
        Ok(VmEnd::Paused) => {
            eprintln!("gatevisor vmm: the VM was paused with no snapshot to take");
            EXIT_GUEST_BROKE
        }
        Err(e) => {
            eprintln!("gatevisor vmm: {e}");
            EXIT_GUEST_BROKE
        }
    }
}
