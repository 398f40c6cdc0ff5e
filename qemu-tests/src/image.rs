//! The gateway image, in two layers:
//! - the **base** (`image/build-base.sh`): Debian with Open vSwitch, liblxc, QEMU and the cloud
//!   kernel. Slow (a few minutes), so it is cached under [`crate::cache_dir`] in a folder named
//!   after a hash of its recipe, and rebuilt only when the recipe changes;
//! - the **gateway image** (target/qemu-tests/): a copy of the base with this build's gatevisor,
//!   its systemd unit, `gateway-agent` and the board's files of `image/overlay/` added through a
//!   loop mount. Named after a hash of everything added, so an unchanged build reuses it.
//!
//! Each boot runs on a qcow2 overlay of the gateway image, so scenarios never see each other's
//! changes.

use crate::{host, io, Error, Result};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

const RECIPE: &str = include_str!("../image/build-base.sh");

/// What a boot needs: a root disk image, a kernel and its initrd.
#[derive(Debug, Clone)]
pub struct Image {
    pub disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_release: String,
}

fn short_hash(h: Sha256) -> String {
    hex::encode(&h.finalize()[..8])
}

/// The cached base, built when missing. Concurrent callers wait for one build (a file lock).
pub fn base() -> Result<PathBuf> {
    let cache = crate::cache_dir();
    std::fs::create_dir_all(&cache).map_err(io(format!("create {}", cache.display())))?;
    let dir = cache.join(format!(
        "gateway-base-{}",
        short_hash(Sha256::new_with_prefix(RECIPE))
    ));
    if dir.join("base.img").is_file() {
        return Ok(dir);
    }
    let _lock = FileLock::take(&cache.join("gateway-base.lock"))?;
    if dir.join("base.img").is_file() {
        return Ok(dir);
    }
    let script = crate::workspace().join("qemu-tests/image/build-base.sh");
    eprintln!(
        "qemu-tests: building the gateway base into {} (a few minutes, once per recipe)",
        dir.display()
    );
    let started = std::time::Instant::now();
    let status = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .status()
        .map_err(io(format!("run {}", script.display())))?;
    if !status.success() {
        return Err(Error::Command {
            what: script.display().to_string(),
            detail: status.to_string(),
        });
    }
    eprintln!(
        "qemu-tests: gateway base built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    // Older bases are dead weight: their recipe changed.
    if let Ok(entries) = std::fs::read_dir(&cache) {
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("gateway-base-") && p != dir && p.is_dir() {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
    Ok(dir)
}

/// The guest kernel's modules a microVM needs (virtio-mmio, net, blk, vsock), copied out of
/// the base's module tree into `<base>/guest-modules/` once. Returns that folder; the files
/// are `<name>.ko` for each name of [`crate::guest::GUEST_MODULES`].
pub fn guest_modules(base: &Path) -> Result<PathBuf> {
    let dir = base.join("guest-modules");
    let done = dir.join(".complete");
    if done.is_file() {
        return Ok(dir);
    }
    let _lock = FileLock::take(&base.join("guest-modules.lock"))?;
    if done.is_file() {
        return Ok(dir);
    }
    let release = std::fs::read_to_string(base.join("kernel-release"))
        .map_err(io("read the base's kernel-release"))?;
    let mnt = base.join("modules-mnt");
    std::fs::create_dir_all(&mnt).map_err(io("create the mount point"))?;
    std::fs::create_dir_all(&dir).map_err(io("create guest-modules"))?;
    host(
        Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(base.join("base.img"))
            .arg(&mnt),
    )?;
    let copied = (|| -> Result<()> {
        let tree = mnt.join(format!("lib/modules/{}", release.trim()));
        let found = gatevisor_vmm::guest::find_modules(&tree).map_err(io("read modules.dep"))?;
        for name in crate::guest::GUEST_MODULES {
            let (_, path) =
                found
                    .iter()
                    .find(|(n, _)| *n == name)
                    .ok_or_else(|| Error::Command {
                        what: format!("find module {name}"),
                        detail: "not in the base kernel's modules.dep".into(),
                    })?;
            std::fs::copy(path, dir.join(format!("{name}.ko")))
                .map_err(io(format!("copy {}", path.display())))?;
        }
        Ok(())
    })();
    let unmounted = host(Command::new("umount").arg(&mnt));
    copied?;
    unmounted?;
    std::fs::write(&done, b"").map_err(io("mark guest-modules complete"))?;
    Ok(dir)
}

/// Builds (with cargo, release profile: what ships) the gatevisor binary and returns its path.
pub fn gatevisor_binary() -> Result<PathBuf> {
    crate::cargo_build(
        &["--release", "-p", "gatevisor", "--bin", "gatevisor"],
        None,
    )?;
    Ok(crate::target_dir().join("release/gatevisor"))
}

/// Builds gatevisor's guest init statically (it runs in service guests' initramfs, which has
/// no C library) and returns its path.
pub fn guest_init_binary() -> Result<PathBuf> {
    Ok(crate::build_static(&["gatevisor-guest-init"])?.join("gatevisor-guest-init"))
}

/// The uncompressed ELF kernel inside a bzImage (what a PVH boot loads): the setup header's
/// payload (offset and length at 0x248) is LZ4 in Debian's cloud kernel, unpacked with `lz4`.
pub fn vmlinux_of(bzimage: &Path) -> Result<Vec<u8>> {
    let bad = |detail: &str| Error::Command {
        what: format!("extract the ELF kernel of {}", bzimage.display()),
        detail: detail.into(),
    };
    let data = std::fs::read(bzimage).map_err(io(format!("read {}", bzimage.display())))?;
    let u32_at = |at: usize| {
        data.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    let setup_sects = match *data.get(0x1f1).ok_or_else(|| bad("too short"))? {
        0 => 4,
        n => n as usize,
    };
    let (off, len) = u32_at(0x248)
        .zip(u32_at(0x24c))
        .ok_or_else(|| bad("too short"))?;
    let start = (setup_sects + 1) * 512 + off;
    let payload = data
        .get(start..start + len)
        .ok_or_else(|| bad("payload outside the file"))?;
    if !payload.starts_with(&[0x02, 0x21, 0x4c, 0x18]) {
        return Err(bad("the payload is not LZ4 (legacy frame)"));
    }
    let mut child = Command::new("lz4")
        .args(["-dc", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(io("run lz4 (scripts/setup.sh installs it)"))?;
    // The kernel build appends the uncompressed size (le32) to the compressed stream.
    let (stream, size) = payload.split_at(payload.len().saturating_sub(4));
    let size = u32::from_le_bytes(size.try_into().map_err(|_| bad("payload too short"))?);
    let mut stdin = child.stdin.take().unwrap();
    let payload = stream.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &payload));
    let out = child.wait_with_output().map_err(io("run lz4"))?;
    let _ = writer.join();
    if !out.status.success()
        || out.stdout.len() != size as usize
        || !out.stdout.starts_with(b"\x7fELF")
    {
        return Err(bad("lz4 did not give an ELF kernel"));
    }
    Ok(out.stdout)
}

/// Files added to the base: (path in the image, mode, bytes).
fn additions(base: &Path, gatevisor: &Path, agent: &Path) -> Result<Vec<(String, u32, Vec<u8>)>> {
    let read = |p: &Path| std::fs::read(p).map_err(io(format!("read {}", p.display())));
    let release = std::fs::read_to_string(base.join("kernel-release"))
        .map_err(io("read the base's kernel-release"))?;
    let mut files = vec![
        (
            format!("boot/vmlinux-{}", release.trim()),
            0o644,
            vmlinux_of(&base.join("vmlinuz"))?,
        ),
        ("usr/sbin/gatevisor".to_string(), 0o755, read(gatevisor)?),
        (
            "usr/local/sbin/gateway-agent".to_string(),
            0o755,
            read(agent)?,
        ),
        (
            "usr/lib/gatevisor/gatevisor-guest-init".to_string(),
            0o755,
            read(&guest_init_binary()?)?,
        ),
        (
            "etc/systemd/system/gatevisor.service".to_string(),
            0o644,
            read(&crate::workspace().join("dist/systemd/gatevisor.service"))?,
        ),
    ];
    let overlay = crate::workspace().join("qemu-tests/image/overlay");
    let mut stack = vec![overlay.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(io(format!("read {}", d.display())))? {
            let e = e.map_err(io(format!("read {}", d.display())))?;
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                use std::os::unix::fs::PermissionsExt;
                let mode = e.metadata().map_err(io("stat"))?.permissions().mode() & 0o777;
                let rel = p
                    .strip_prefix(&overlay)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                files.push((rel, mode, read(&p)?));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Units of `image/overlay` (and gatevisor's) that the image enables, with their target.
const ENABLED: &[(&str, &str)] = &[
    ("gatevisor.service", "multi-user.target"),
    ("gateway-net.service", "multi-user.target"),
    ("gateway-agent.service", "sysinit.target"),
];

/// The gateway image for this gatevisor and agent, built on the cached base when missing.
pub fn gateway(gatevisor: &Path, agent: &Path) -> Result<Image> {
    gateway_in(
        &base()?,
        gatevisor,
        agent,
        &crate::target_dir().join("qemu-tests"),
    )
}

/// [`gateway`] on base folder `base`, the image kept in `out_dir`.
pub fn gateway_in(base: &Path, gatevisor: &Path, agent: &Path, out_dir: &Path) -> Result<Image> {
    let files = additions(base, gatevisor, agent)?;
    let mut h = Sha256::new();
    h.update(base.file_name().unwrap().as_encoded_bytes());
    for (path, mode, bytes) in &files {
        h.update(path.as_bytes());
        h.update(mode.to_le_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    for (unit, target) in ENABLED {
        h.update(unit.as_bytes());
        h.update(target.as_bytes());
    }
    std::fs::create_dir_all(out_dir).map_err(io(format!("create {}", out_dir.display())))?;
    let disk = out_dir.join(format!("gateway-{}.img", short_hash(h)));
    let kernel_release = std::fs::read_to_string(base.join("kernel-release"))
        .map_err(io("read the base's kernel-release"))?
        .trim()
        .to_string();
    let image = Image {
        disk: disk.clone(),
        kernel: base.join("vmlinuz"),
        initrd: base.join("initrd.img"),
        kernel_release,
    };
    if disk.is_file() {
        return Ok(image);
    }
    let _lock = FileLock::take(&out_dir.join("gateway-image.lock"))?;
    if disk.is_file() {
        return Ok(image);
    }
    let tmp = disk.with_extension("img.tmp");
    host(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(base.join("base.img"))
            .arg(&tmp),
    )?;
    let mnt = out_dir.join("mnt");
    std::fs::create_dir_all(&mnt).map_err(io("create the mount point"))?;
    host(
        Command::new("mount")
            .arg("-o")
            .arg("loop")
            .arg(&tmp)
            .arg(&mnt),
    )?;
    let filled = fill(&mnt, &files);
    let unmounted = host(Command::new("umount").arg(&mnt));
    filled?;
    unmounted?;
    std::fs::rename(&tmp, &disk).map_err(io("rename the gateway image"))?;
    // Earlier builds' images are not used again.
    if let Ok(entries) = std::fs::read_dir(out_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("gateway-") && name.ends_with(".img") && e.path() != disk {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(image)
}

fn fill(root: &Path, files: &[(String, u32, Vec<u8>)]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for (rel, mode, bytes) in files {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).map_err(io(format!("mkdir for {rel}")))?;
        std::fs::write(&p, bytes).map_err(io(format!("write {rel}")))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))
            .map_err(io(format!("chmod {rel}")))?;
    }
    for (unit, target) in ENABLED {
        let wants = root.join(format!("etc/systemd/system/{target}.wants"));
        std::fs::create_dir_all(&wants).map_err(io("mkdir .wants"))?;
        let link = wants.join(unit);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(format!("/etc/systemd/system/{unit}"), &link)
            .map_err(io(format!("enable {unit}")))?;
    }
    Ok(())
}

/// An exclusive `flock` on a file, released on drop.
pub(crate) struct FileLock(#[allow(dead_code)] std::fs::File);

impl FileLock {
    pub(crate) fn take(path: &Path) -> Result<FileLock> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io(format!("open {}", path.display())))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(format!("lock {}", path.display()))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(FileLock(f))
    }
}
