//! Mounting a filesystem image through a loop device, by the kernel's loop ioctls (no
//! `mount -o loop`): a free device from `/dev/loop-control`, the file attached with
//! `LOOP_CONFIGURE` and auto-clear (the device lets go of the file when its last user, the
//! mount, goes), then an ordinary mount of the device.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config` (linux/loop.h, Linux 5.8).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn free_device(ctl: &File) -> std::io::Result<u32> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and answers a device number; `ctl` is an
    // open /dev/loop-control for the whole call.
    let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as u32)
}

/// Mounts the ext4 image `img` at `at` (nosuid, nodev) through a free loop device.
pub fn mount_ext4(img: &Path, at: &Path) -> std::io::Result<()> {
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    let file = OpenOptions::new().read(true).write(true).open(img)?;
    let mut last = None;
    // Another process may take the free device first: then the next one.
    for _ in 0..8 {
        let n = free_device(&ctl)?;
        let path = format!("/dev/loop{n}");
        if !Path::new(&path).exists() {
            // No udev (a container, an initramfs): the node is made as the kernel numbers it.
            let dev = libc::makedev(7, n);
            nix::sys::stat::mknod(
                path.as_str(),
                nix::sys::stat::SFlag::S_IFBLK,
                nix::sys::stat::Mode::from_bits_truncate(0o660),
                dev,
            )
            .map_err(std::io::Error::from)?;
        }
        let dev = OpenOptions::new().read(true).write(true).open(&path)?;
        let cfg = LoopConfig {
            fd: file.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64 {
                device: 0,
                inode: 0,
                rdevice: 0,
                offset: 0,
                sizelimit: 0,
                number: 0,
                encrypt_type: 0,
                encrypt_key_size: 0,
                flags: LO_FLAGS_AUTOCLEAR,
                file_name: [0; 64],
                crypt_name: [0; 64],
                encrypt_key: [0; 32],
                init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `cfg` is (repr(C),
        // the kernel's layout) and outlives the call; `dev` and `file` are open fds.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBUSY) {
                last = Some(e);
                continue;
            }
            return Err(e);
        }
        let mounted = nix::mount::mount(
            Some(path.as_str()),
            at,
            Some("ext4"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(std::io::Error::from);
        // Closing `dev` now: with auto-clear the device is freed once the mount goes (or
        // at once, when it did not happen).
        return mounted;
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free loop device")))
}
