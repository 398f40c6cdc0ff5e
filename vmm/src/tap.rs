//! Tap devices: what a microVM's virtio-net sits on. The supervisor creates the tap (it has
//! CAP_NET_ADMIN), brings it up, and hands the open descriptor to the VMM; the tap is not
//! persistent, so it disappears with the VMM, as a container's veth does with the container.

use crate::{file_err, Error, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// Creates (or attaches to) tap `name` (IFF_TAP | IFF_NO_PI), non-blocking.
pub fn open(name: &str) -> Result<File> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(Error::Config(format!("tap name {name:?}: 1 to 15 bytes")));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(file_err("open", "/dev/net/tun"))?;
    // struct ifreq: the name, then the flags (a short) in the union.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as u16;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a 40-byte struct ifreq, which `ifr` is, on a
    // descriptor this function owns.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
    if r < 0 {
        return Err(file_err("attach to tap", name)(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(f)
}

/// Sets interface `name` up (SIOCSIFFLAGS with IFF_UP).
pub fn set_up(name: &str) -> Result<()> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(Error::Config(format!(
            "interface name {name:?}: 1 to 15 bytes"
        )));
    }
    // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(file_err("socket for", name)(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write a 40-byte struct ifreq, which `ifr` is.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, ifr.as_mut_ptr()) < 0 {
            return Err(file_err("read the flags of", name)(
                std::io::Error::last_os_error(),
            ));
        }
        let flags = i16::from_ne_bytes([ifr[16], ifr[17]]) | libc::IFF_UP as i16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, ifr.as_mut_ptr()) < 0 {
            return Err(file_err("set up", name)(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}
