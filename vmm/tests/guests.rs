//! Small purpose-built guests on this machine's /dev/kvm (KVM-PVM here, hardware KVM on a
//! gateway): they prove the machine set-up a Linux kernel relies on (long mode entry, GDT,
//! page tables, port I/O to the serial device, the reset line) and that a hostile guest's
//! accesses stay inside its VM.

use gatevisor_vmm::{Boot, VmConfig, VmEnd};
use std::path::Path;

fn kvm_or_skip() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!("skipped: /dev/kvm: {e}");
            false
        }
    }
}

/// Runs `code` as a raw guest with 128 MiB; returns how it ended and its console output.
fn run(dir: &Path, code: &[u8]) -> (gatevisor_vmm::Result<VmEnd>, String) {
    let image = dir.join("guest.bin");
    std::fs::write(&image, code).unwrap();
    let console = dir.join("console.log");
    let cfg = VmConfig {
        boot: Boot::Raw { image },
        memory_mib: 128,
        vcpus: 1,
        console_log: Some(console.clone()),
        console_rate: 65536,
        console_socket: None,
        exit_file: None,
        net: vec![],
        disk: vec![],
        vsock: None,
    };
    let end = gatevisor_vmm::vm::Vm::new(&cfg).and_then(|mut vm| vm.run());
    (end, std::fs::read_to_string(&console).unwrap_or_default())
}

/// `mov dx, 0x3f8; mov al, c; out dx, al` for each byte of `text`.
fn print(text: &[u8]) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03];
    for c in text {
        code.extend([0xb0, *c, 0xee]);
    }
    code
}

const RESET: [u8; 5] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4]; // mov al, 0xfe; out 0x64, al; hlt

#[test]
fn long_mode_guest_prints_on_the_serial_console_and_resets_its_vm() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let code = [print(b"guest says hello\n"), RESET.to_vec()].concat();
    let (end, console) = run(dir.path(), &code);
    assert_eq!(end.unwrap(), VmEnd::Reset);
    assert_eq!(console, "guest says hello\n");
}

#[test]
fn guest_reports_its_status_through_the_debug_exit_port() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // mov al, 42; out 0xf4, al; hlt
    let (end, _) = run(dir.path(), &[0xb0, 42, 0xe6, 0xf4, 0xf4]);
    assert_eq!(end.unwrap(), VmEnd::DebugExit(42));
}

#[test]
fn guest_access_beyond_its_memory_reaches_nothing() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 768 MiB is mapped by the boot page tables but is not guest RAM (128 MiB): the write goes
    // nowhere, the read sees all ones, and the guest reports what it read.
    let code = [
        0xb8, 0x00, 0x00, 0x00, 0x30, // mov eax, 0x30000000
        0xc6, 0x00, 0x55, // mov byte [rax], 0x55
        0x8a, 0x00, // mov al, [rax]
        0xe6, 0xf4, // out 0xf4, al
        0xf4,
    ];
    let (end, _) = run(dir.path(), &code);
    assert_eq!(end.unwrap(), VmEnd::DebugExit(0xff));
}

#[test]
fn crashing_guest_ends_its_vm_with_a_triple_fault() {
    if !kvm_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // ud2 with no IDT: #UD → #DF → triple fault.
    let (end, _) = run(dir.path(), &[0x0f, 0x0b]);
    assert_eq!(end.unwrap(), VmEnd::TripleFault);
}

#[test]
fn invalid_configuration_is_refused_before_kvm_is_touched() {
    let cfg = VmConfig {
        boot: Boot::Raw {
            image: "/nonexistent".into(),
        },
        memory_mib: 8,
        vcpus: 1,
        console_log: None,
        console_rate: 1,
        console_socket: None,
        exit_file: None,
        net: vec![],
        disk: vec![],
        vsock: None,
    };
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("memory_mib"), "{e}");
}

/// In a re-executed copy of this test binary (the sandbox is for a whole process): builds a
/// VM, enters the sandbox, then runs the guest (`run`) or tries to open a file (`open`).
#[test]
fn sandbox_child() {
    let Ok(mode) = std::env::var("GV_SANDBOX_CHILD") else {
        return; // only meaningful when re-executed by the tests below
    };
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("guest.bin");
    std::fs::write(&image, [print(b"sandboxed\n"), RESET.to_vec()].concat()).unwrap();
    let cfg = VmConfig {
        boot: Boot::Raw { image },
        memory_mib: 64,
        vcpus: 1,
        console_log: None,
        console_rate: 65536,
        console_socket: None,
        exit_file: None,
        net: vec![],
        disk: vec![],
        vsock: None,
    };
    let mut vm = gatevisor_vmm::vm::Vm::new(&cfg).unwrap();
    gatevisor_vmm::sandbox::enter().unwrap();
    if mode == "open" {
        let _ = std::fs::File::open("/etc/hostname");
        std::process::exit(0); // not reached: openat is not allowed
    }
    let end = vm.run().unwrap();
    std::process::exit(if end == VmEnd::Reset { 0 } else { 1 });
}

fn sandboxed(mode: &str) -> std::process::Output {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sandbox_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("GV_SANDBOX_CHILD", mode)
        .output()
        .unwrap()
}

#[test]
fn sandboxed_vcpu_still_runs_its_guest() {
    if !kvm_or_skip() {
        return;
    }
    let out = sandboxed("run");
    assert!(
        out.status.success(),
        "{:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("sandboxed"));
}

#[test]
fn sandboxed_vmm_is_killed_when_it_opens_a_file() {
    if !kvm_or_skip() {
        return;
    }
    use std::os::unix::process::ExitStatusExt;
    let out = sandboxed("open");
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{:?}", out.status);
}
