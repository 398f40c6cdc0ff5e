//! Small purpose-built guests on this machine's /dev/kvm (KVM-PVM here, hardware KVM on a
//! gateway): they prove the machine set-up a Linux kernel relies on (long mode entry, GDT,
//! page tables, port I/O to the serial device, the reset line) and that a hostile guest's
//! accesses stay inside its VM.

mod common;
use common::kvm_or_skip;
use gatevisor_vmm::{Boot, VmConfig, VmEnd};
use std::path::Path;

/// Runs `code` as a raw guest with 128 MiB; returns how it ended and its console output.
fn run(dir: &Path, code: &[u8]) -> (gatevisor_vmm::Result<VmEnd>, String) {
    let image = dir.join("guest.bin");
    std::fs::write(&image, code).unwrap();
    boot(dir, Boot::Raw { image })
}

/// Boots `boot` with 128 MiB and one vCPU; returns how it ended and its console output.
fn boot(dir: &Path, boot: Boot) -> (gatevisor_vmm::Result<VmEnd>, String) {
    let console = dir.join("console.log");
    let cfg = VmConfig::minimal(boot, 128, console.clone());
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
    if !kvm_or_skip("long_mode_guest_prints_on_the_serial_console_and_resets_its_vm") {
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
    if !kvm_or_skip("guest_reports_its_status_through_the_debug_exit_port") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // mov al, 42; out 0xf4, al; hlt
    let (end, _) = run(dir.path(), &[0xb0, 42, 0xe6, 0xf4, 0xf4]);
    assert_eq!(end.unwrap(), VmEnd::DebugExit(42));
}

#[test]
fn guest_access_beyond_its_memory_reaches_nothing() {
    if !kvm_or_skip("guest_access_beyond_its_memory_reaches_nothing") {
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
    if !kvm_or_skip("crashing_guest_ends_its_vm_with_a_triple_fault") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // ud2 with no IDT: #UD → #DF → triple fault.
    let (end, _) = run(dir.path(), &[0x0f, 0x0b]);
    assert_eq!(end.unwrap(), VmEnd::TripleFault);
}

/// A minimal ELF64 `vmlinux` stand-in: `code` loaded at 1 MiB and a PVH note
/// (`XEN_ELFNOTE_PHYS32_ENTRY`) naming it as the entry, or no note at all.
fn pvh_elf(code: &[u8], with_note: bool) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    let phnum: u16 = if with_note { 2 } else { 1 };
    let mut elf = Vec::new();
    elf.extend(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // x86-64
    elf.extend(1u32.to_le_bytes());
    elf.extend(LOAD.to_le_bytes()); // e_entry (the 64-bit one; PVH ignores it)
    elf.extend(64u64.to_le_bytes()); // e_phoff
    elf.extend(0u64.to_le_bytes()); // e_shoff
    elf.extend(0u32.to_le_bytes());
    for v in [64u16, 56, phnum, 64, 0, 0] {
        elf.extend(v.to_le_bytes());
    }
    let note_at = 64 + 56 * phnum as u64;
    let mut note = Vec::new();
    for v in [4u32, 4, 18] {
        note.extend(v.to_le_bytes()); // namesz, descsz, type
    }
    note.extend(b"Xen\0");
    note.extend((LOAD as u32).to_le_bytes());
    let code_at = 0x1000u64;
    let phdr = |kind: u32, off: u64, addr: u64, size: u64| {
        let mut p = Vec::new();
        p.extend(kind.to_le_bytes());
        p.extend(5u32.to_le_bytes()); // R+X
        for v in [off, addr, addr, size, size, 4] {
            p.extend(v.to_le_bytes());
        }
        p
    };
    elf.extend(phdr(1, code_at, LOAD, code.len() as u64));
    if with_note {
        elf.extend(phdr(4, note_at, 0, note.len() as u64));
        elf.extend(&note);
    }
    elf.resize(code_at as usize, 0);
    elf.extend(code);
    elf
}

fn run_linux(
    dir: &Path,
    kernel: &[u8],
    initrd: &[u8],
    cmdline: &str,
) -> (gatevisor_vmm::Result<VmEnd>, String) {
    let image = dir.join("vmlinux");
    std::fs::write(&image, kernel).unwrap();
    let initrd_path = dir.join("initrd");
    std::fs::write(&initrd_path, initrd).unwrap();
    boot(
        dir,
        Boot::Linux {
            kernel: image,
            initrd: Some(initrd_path),
            cmdline: cmdline.into(),
        },
    )
}

#[test]
fn elf_kernel_enters_through_pvh_with_its_start_info_command_line_and_initramfs() {
    if !kvm_or_skip("elf_kernel_enters_through_pvh_with_its_start_info_command_line_and_initramfs")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 32-bit code, ebx = hvm_start_info: check its magic, print the command line's first byte
    // and the initramfs's first byte (module 0), then exit with nr_modules.
    let code = [
        &[0x8b, 0x03][..],               // mov eax, [ebx]
        &[0x3d, 0x78, 0xc5, 0x6e, 0x33], // cmp eax, XEN_HVM_START_MAGIC
        &[0x75, 0x17],                   // jne bad
        &[0x66, 0xba, 0xf8, 0x03],       // mov dx, 0x3f8
        &[0x8b, 0x73, 0x18],             // mov esi, [ebx + cmdline_paddr]
        &[0x8a, 0x06, 0xee],             // mov al, [esi]; out dx, al
        &[0x8b, 0x73, 0x10],             // mov esi, [ebx + modlist_paddr]
        &[0x8b, 0x36],                   // mov esi, [esi] (module 0's paddr)
        &[0x8a, 0x06, 0xee],             // mov al, [esi]; out dx, al
        &[0x8b, 0x43, 0x0c],             // mov eax, [ebx + nr_modules]
        &[0xe6, 0xf4],                   // out 0xf4, al
        &[0xb0, 0xff, 0xe6, 0xf4],       // bad: mov al, 0xff; out 0xf4, al
    ]
    .concat();
    let (end, console) = run_linux(dir.path(), &pvh_elf(&code, true), b"Initramfs", "quiet");
    assert_eq!(end.unwrap(), VmEnd::DebugExit(1));
    assert_eq!(console, "qI");
}

#[test]
fn elf_kernel_without_a_pvh_note_is_refused() {
    if !kvm_or_skip("elf_kernel_without_a_pvh_note_is_refused") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (end, _) = run_linux(dir.path(), &pvh_elf(&[0xf4], false), b"", "");
    let e = end.unwrap_err().to_string();
    assert!(e.contains("PVH"), "{e}");
}

#[test]
fn invalid_configuration_is_refused_before_kvm_is_touched() {
    let image = "/nonexistent".into();
    let cfg = VmConfig::minimal(Boot::Raw { image }, 8, "/nonexistent.log".into());
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
    // The console on stdout (the test reads it from the child's output).
    let cfg = VmConfig {
        console_log: None,
        ..VmConfig::minimal(Boot::Raw { image }, 64, Default::default())
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
    if !kvm_or_skip("sandboxed_vcpu_still_runs_its_guest") {
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
    if !kvm_or_skip("sandboxed_vmm_is_killed_when_it_opens_a_file") {
        return;
    }
    use std::os::unix::process::ExitStatusExt;
    let out = sandboxed("open");
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{:?}", out.status);
}
