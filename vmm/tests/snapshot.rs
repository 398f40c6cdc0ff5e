//! Snapshots on this machine's /dev/kvm: a raw guest paused in the middle of a long
//! computation is saved, the VM dropped, and a fresh VM restored from the snapshot finishes
//! it with the right result; clones restored from one snapshot each finish on their own and
//! leave the snapshot as it was; a snapshot with a flipped byte, another format version or
//! of another guest is refused with the reason.

mod common;
use common::kvm_or_skip;
use gatevisor_vmm::snapshot::{MEMORY_FILE, STATE_FILE, VERSION_OFFSET};
use gatevisor_vmm::vm::Vm;
use gatevisor_vmm::{Boot, Error, VmConfig, VmEnd};
use std::path::{Path, PathBuf};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

/// Where the guest counts its iterations, and where it leaves its result.
const COUNTER: u64 = 0x30_0000;
const RESULT: u64 = COUNTER + 8;
const DONE: u8 = 7;

/// A guest that prints `A`, then for i = n down to 1 adds i² to rax and counts the
/// iteration in memory, stores rax, prints `B` and ends with debug-exit code 7.
fn guest(n: u64) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03, 0xb0, b'A', 0xee]; // mov dx, 0x3f8; mov al,'A'; out dx, al
    c.extend([0x48, 0xb9]); // mov rcx, n
    c.extend(n.to_le_bytes());
    c.extend([0x31, 0xc0]); // xor eax, eax
    c.extend([0x48, 0xbf]); // mov rdi, COUNTER
    c.extend(COUNTER.to_le_bytes());
    c.extend([
        0x48, 0x89, 0xca, // loop: mov rdx, rcx
        0x48, 0x0f, 0xaf, 0xd1, // imul rdx, rcx
        0x48, 0x01, 0xd0, // add rax, rdx
        0x48, 0xff, 0x07, // inc qword [rdi]
        0x48, 0xff, 0xc9, // dec rcx
        0x75, 0xee, // jnz loop
        0x48, 0x89, 0x47, 0x08, // mov [rdi+8], rax
        0x66, 0xba, 0xf8, 0x03, 0xb0, b'B', 0xee, // print 'B'
        0xb0, DONE, 0xe6, 0xf4, // mov al, 7; out 0xf4, al
        0xf4, // hlt
    ]);
    c
}

/// 1² + … + n², modulo 2⁶⁴ as the guest's registers keep it.
fn expected(n: u64) -> u64 {
    let n = n as u128;
    (n * (n + 1) * (2 * n + 1) / 6) as u64
}

fn config(dir: &Path, image: &Path) -> VmConfig {
    let image = image.to_path_buf();
    VmConfig::minimal(Boot::Raw { image }, 32, dir.join("console.log"))
}

fn read_u64(vm: &Vm, at: u64) -> u64 {
    vm.mem.read_obj(GuestAddress(at)).unwrap()
}

/// Runs `vm` on a thread, pauses it after `after`, returns it paused.
fn run_then_pause(mut vm: Vm, after: Duration) -> Vm {
    let pauser = vm.pauser();
    let t = std::thread::spawn(move || {
        let end = vm.run();
        (vm, end)
    });
    std::thread::sleep(after);
    pauser.pause(Duration::from_secs(5)).unwrap();
    let (vm, end) = t.join().unwrap();
    assert_eq!(end.unwrap(), VmEnd::Paused);
    vm
}

/// Iterations: about a second of guest time here (KVM-PVM runs this loop at ~170,000
/// iterations a second), so a pause after 100 ms lands in the middle.
const N: u64 = 200_000;

/// A snapshot of the guest paused mid-computation, in `dir/snap`; the image it ran.
fn snapshot_mid_computation(dir: &Path) -> (PathBuf, PathBuf) {
    let image = dir.join("guest.bin");
    std::fs::write(&image, guest(N)).unwrap();
    let cfg = config(dir, &image);
    let mut vm = run_then_pause(Vm::new(&cfg).unwrap(), Duration::from_millis(100));
    let counted = read_u64(&vm, COUNTER);
    assert!(
        counted > 0 && counted < N,
        "paused mid-computation: {counted} of {N} iterations done"
    );
    let snap = dir.join("snap");
    vm.snapshot(&snap).unwrap();
    (image, snap)
}

fn refusal(r: gatevisor_vmm::Result<Vm>) -> String {
    match r {
        Err(Error::Snapshot(why)) => why,
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("restored"),
    }
}

#[test]
fn a_guest_paused_mid_computation_is_restored_into_a_fresh_vm_and_finishes_right() {
    if !kvm_or_skip("a_guest_paused_mid_computation_is_restored_into_a_fresh_vm_and_finishes_right")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (image, snap) = snapshot_mid_computation(dir.path());
    let cfg = config(dir.path(), &image);
    // Pages of zeros are holes: the memory file holds about what the guest touched.
    let mem = std::fs::metadata(snap.join(MEMORY_FILE)).unwrap();
    assert_eq!(mem.len(), 32 << 20);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&mem) * 512 < 4 << 20,
        "{} bytes on disk",
        std::os::unix::fs::MetadataExt::blocks(&mem) * 512
    );
    // Two clones from one snapshot, one after the other; each finishes the computation.
    for clone in 0..2 {
        let mut vm = Vm::restore(&cfg, &snap).unwrap();
        let at = read_u64(&vm, COUNTER);
        assert!(at > 0 && at < N, "clone {clone} starts where the pause was");
        assert_eq!(vm.run().unwrap(), VmEnd::DebugExit(DONE), "clone {clone}");
        assert_eq!(
            read_u64(&vm, COUNTER),
            N,
            "clone {clone}: every iteration once"
        );
        assert_eq!(
            read_u64(&vm, RESULT),
            expected(N),
            "clone {clone}: the right sum"
        );
    }
    // The first run printed A; each restored VM printed only B: the serial device and the
    // guest went on, neither started again.
    let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
    assert_eq!(console, "ABB");
    // A VM that is not paused has nothing to save.
    let mut vm = Vm::restore(&cfg, &snap).unwrap();
    assert!(matches!(
        vm.snapshot(&dir.path().join("again")),
        Err(Error::Snapshot(_))
    ));
    // Paused again after a restore, snapshotted again, restored again: still right.
    let mut vm = run_then_pause(vm, Duration::from_millis(20));
    vm.snapshot(&dir.path().join("again")).unwrap();
    let mut vm = Vm::restore(&cfg, &dir.path().join("again")).unwrap();
    assert_eq!(vm.run().unwrap(), VmEnd::DebugExit(DONE));
    assert_eq!(read_u64(&vm, RESULT), expected(N));
}

#[test]
fn a_corrupt_foreign_or_other_version_snapshot_is_refused_with_the_reason() {
    if !kvm_or_skip("a_corrupt_foreign_or_other_version_snapshot_is_refused_with_the_reason") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (image, snap) = snapshot_mid_computation(dir.path());
    let cfg = config(dir.path(), &image);
    let state = std::fs::read(snap.join(STATE_FILE)).unwrap();
    let write_state = |bytes: &[u8]| std::fs::write(snap.join(STATE_FILE), bytes).unwrap();

    // A byte flipped in the state.
    let mut bad = state.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x40;
    write_state(&bad);
    let why = refusal(Vm::restore(&cfg, &snap));
    assert!(why.contains("checksum"), "{why}");

    // Another format version.
    let mut bad = state.clone();
    bad[VERSION_OFFSET..VERSION_OFFSET + 4].copy_from_slice(&2u32.to_le_bytes());
    write_state(&bad);
    let why = refusal(Vm::restore(&cfg, &snap));
    assert!(why.contains("version 2"), "{why}");

    // Cut short.
    write_state(&state[..state.len() - 100]);
    let why = refusal(Vm::restore(&cfg, &snap));
    assert!(why.contains("checksum"), "{why}");
    write_state(&state);

    // Of another guest: the same machine booting another image.
    let other = dir.path().join("other.bin");
    std::fs::write(&other, guest(N - 1)).unwrap();
    let why = refusal(Vm::restore(&config(dir.path(), &other), &snap));
    assert!(why.contains("another kernel"), "{why}");
    // With another memory size.
    let mut bigger = cfg.clone();
    bigger.memory_mib = 64;
    let why = refusal(Vm::restore(&bigger, &snap));
    assert!(why.contains("32 MiB"), "{why}");

    // A byte flipped in the memory: in the guest's code, at 1 MiB.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(snap.join(MEMORY_FILE))
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 0x10_0010).unwrap();
        f.write_all_at(&[b[0] ^ 1], 0x10_0010).unwrap();
        let why = refusal(Vm::restore(&cfg, &snap));
        assert!(why.contains("memory fails its checksum"), "{why}");
        f.write_all_at(&b, 0x10_0010).unwrap();
    }
    // The image rewritten in place with a byte changed (the same file and size): the
    // snapshot's record of the boot files no longer matches, so they are summed again and
    // it is refused; rewritten with its old bytes, it restores (summed again, equal).
    {
        use std::os::unix::fs::FileExt;
        let orig = std::fs::read(&image).unwrap();
        let mut changed = orig.clone();
        changed[1] ^= 1;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all_at(&changed, 0).unwrap();
        let why = refusal(Vm::restore(&cfg, &snap));
        assert!(why.contains("another kernel"), "{why}");
        f.write_all_at(&orig, 0).unwrap();
    }
    // The same bytes under another path (another file, so another stamp): summed, equal,
    // restored.
    let copy = dir.path().join("copy.bin");
    std::fs::copy(&image, &copy).unwrap();
    assert!(Vm::restore(&config(dir.path(), &copy), &snap).is_ok());
    // Mended, it restores and finishes.
    let mut vm = Vm::restore(&cfg, &snap).unwrap();
    assert_eq!(vm.run().unwrap(), VmEnd::DebugExit(DONE));
    assert_eq!(read_u64(&vm, RESULT), expected(N));
}

#[test]
fn a_vm_with_a_disk_and_vsock_is_restored_with_its_devices_and_refused_with_other_ones() {
    if !kvm_or_skip(
        "a_vm_with_a_disk_and_vsock_is_restored_with_its_devices_and_refused_with_other_ones",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("guest.bin");
    std::fs::write(&image, guest(N)).unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 * 512]).unwrap();
    let mut cfg = config(dir.path(), &image);
    cfg.disk = vec![gatevisor_vmm::vm::DiskConfig {
        path: disk.clone(),
        read_only: true,
    }];
    cfg.vsock = Some(gatevisor_vmm::vm::VsockConfig {
        guest_cid: 3,
        uds_path: dir.path().join("v.sock"),
    });
    let mut vm = run_then_pause(Vm::new(&cfg).unwrap(), Duration::from_millis(100));
    let snap = dir.path().join("snap");
    vm.snapshot(&snap).unwrap();
    drop(vm);

    // The devices come back (the guest never drove them: they come back unstarted) and
    // the guest finishes.
    let mut vm = Vm::restore(&cfg, &snap).unwrap();
    assert_eq!(vm.run().unwrap(), VmEnd::DebugExit(DONE));
    assert_eq!(read_u64(&vm, RESULT), expected(N));
    drop(vm);

    // A disk of another size, or another guest context id: the guest knew the old ones.
    std::fs::write(&disk, vec![0u8; 128 * 512]).unwrap();
    let why = refusal(Vm::restore(&cfg, &snap));
    assert!(
        why.contains("disk 0: the snapshot's disk had 64 sectors, this one 128"),
        "{why}"
    );
    std::fs::write(&disk, vec![0u8; 64 * 512]).unwrap();
    let mut other = cfg.clone();
    other.vsock.as_mut().unwrap().guest_cid = 4;
    let why = refusal(Vm::restore(&other, &snap));
    assert!(why.contains("the vsock device: "), "{why}");
    assert!(why.contains("context id 3, this one 4"), "{why}");
    // Without the disk: another machine.
    let mut fewer = cfg.clone();
    fewer.disk.clear();
    let why = refusal(Vm::restore(&fewer, &snap));
    assert!(why.contains("1 disks"), "{why}");
}

/// In a re-executed copy of this test binary: the whole VMM process (`gatevisor vmm`'s
/// main: sandbox, control thread), booting `GV_VMM_CONFIG` or restoring `GV_VMM_RESTORE`.
#[test]
fn vmm_child() {
    let Ok(config) = std::env::var("GV_VMM_CONFIG") else {
        return; // only meaningful when re-executed by the test below
    };
    let restore = std::env::var("GV_VMM_RESTORE").ok();
    std::process::exit(gatevisor_vmm::process::vmm_main(
        Path::new(&config),
        restore.as_deref().map(Path::new),
    ));
}

fn vmm_process(config: &Path, restore: Option<&Path>) -> std::process::Child {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "vmm_child", "--nocapture", "--test-threads=1"])
        .env("GV_VMM_CONFIG", config)
        .stdout(std::process::Stdio::null());
    if let Some(dir) = restore {
        c.env("GV_VMM_RESTORE", dir);
    }
    c.spawn().unwrap()
}

/// Sends `bytes` (no descriptors) to the control socket; returns the answer.
fn control_says(socket: &Path, bytes: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut c = std::os::unix::net::UnixStream::connect(socket).unwrap();
    c.write_all(bytes).unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    answer
}

/// Sends `bytes` with `files` (SCM_RIGHTS) to the control socket; returns the answer.
fn control_sends(socket: &Path, bytes: &[u8], files: &[&std::fs::File]) -> String {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut c = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let fds: Vec<_> = files.iter().map(|f| f.as_raw_fd()).collect();
    c.send_with_fds(&[bytes], &fds).unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn a_sandboxed_vmm_snapshots_on_request_and_a_new_vmm_process_restores_it() {
    if !kvm_or_skip("a_sandboxed_vmm_snapshots_on_request_and_a_new_vmm_process_restores_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("guest.bin");
    // Long enough (~6 s here, twice the time the requests take) that the requests land mid-computation on a busy machine.
    std::fs::write(&image, guest(10 * N)).unwrap();
    let control = dir.path().join("vm.control");
    let mut cfg = config(dir.path(), &image);
    cfg.control_socket = Some(control.clone());
    let config_file = dir.path().join("vm.toml");
    std::fs::write(&config_file, toml::to_string(&cfg).unwrap()).unwrap();

    let mut vmm = vmm_process(&config_file, None);
    let t0 = std::time::Instant::now();
    while !control.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    // Requests it does not serve are answered with the reason; the VM runs on.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&control).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let why = control_says(&control, b"HELLO\n");
    assert!(why.starts_with("ERROR unknown request"), "{why}");
    let why = control_says(&control, b"SNAPSHOT\n");
    assert!(why.contains("needs two files (memory, state)"), "{why}");
    // A client that connects and says nothing is turned away; those behind it are served.
    let mut silent = std::os::unix::net::UnixStream::connect(&control).unwrap();
    let scratch = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
    let (a, b, c) = (scratch("a"), scratch("b"), scratch("c"));
    let why = control_sends(&control, b"SNAPSHOT\n", &[&a, &b, &c]);
    assert!(why.contains("needs two files (memory, state)"), "{why}");
    let mut silent_heard = String::new();
    std::io::Read::read_to_string(&mut silent, &mut silent_heard).unwrap();
    assert!(
        silent_heard.starts_with("ERROR no request within"),
        "{silent_heard}"
    );
    // Files the VMM cannot write a snapshot into are refused; the guest runs on.
    let (pipe_read, pipe_write) = std::io::pipe().unwrap();
    let pipe_write = std::fs::File::from(std::os::fd::OwnedFd::from(pipe_write));
    let why = control_sends(&control, b"SNAPSHOT\n", &[&pipe_write, &b]);
    assert!(why.contains("must be regular files"), "{why}");
    drop(pipe_read);
    let read_only = |name: &str| std::fs::File::open(dir.path().join(name)).unwrap();
    let why = control_sends(&control, b"SNAPSHOT\n", &[&read_only("a"), &read_only("b")]);
    assert!(why.starts_with("ERROR"), "{why}");
    assert!(
        vmm.try_wait().unwrap().is_none(),
        "the VMM ended on a bad request"
    );
    // A snapshot mid-computation, through the sandboxed process.
    let snap = dir.path().join("snap");
    if let Err(e) = gatevisor_vmm::control::take_snapshot(&control, &snap, Duration::from_secs(10))
    {
        panic!("{e}; the VMM: {:?}", vmm.wait());
    }
    assert!(snap.join(STATE_FILE).exists() && snap.join(MEMORY_FILE).exists());
    // The original runs on to the end (debug exit 7 is exit status 16 + 7).
    let first = vmm.wait().unwrap();
    assert_eq!(
        first.code(),
        Some(gatevisor_vmm::process::DEBUG_EXIT_BASE + DONE as i32)
    );
    // A new VMM process restored from it finishes the computation without starting again.
    let restored = vmm_process(&config_file, Some(&snap)).wait().unwrap();
    assert_eq!(
        restored.code(),
        Some(gatevisor_vmm::process::DEBUG_EXIT_BASE + DONE as i32)
    );
    let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
    assert_eq!(console, "ABB", "the restored guest printed only its end");
    // A restore that cannot be done is a set-up failure, with the reason on stderr.
    std::fs::write(snap.join(STATE_FILE), b"not a snapshot").unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "vmm_child", "--nocapture", "--test-threads=1"])
        .env("GV_VMM_CONFIG", &config_file)
        .env("GV_VMM_RESTORE", &snap)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(gatevisor_vmm::process::EXIT_SETUP));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("GVSNAP"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
