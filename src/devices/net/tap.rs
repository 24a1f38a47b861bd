//! The host side of virtio-net: a TAP interface opened through /dev/net/tun with a 12-byte
//! virtio-net header in front of every frame (linux/if_tun.h, Documentation/networking/tuntap.rst).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::devices::DeviceError;

use super::chain::VNET_HDR_LEN;

/// The TUN/TAP clone device.
pub const TUN_PATH: &str = "/dev/net/tun";

/// An open TAP interface. Closing it (drop) deletes the interface if vmm created it (the kernel
/// removes non-persistent TAPs with their last file).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    created: bool,
}

/// A zeroed `ifreq` naming `name` (at most IFNAMSIZ - 1 bytes, checked by the caller).
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name and a union of integers and pointers); all zero
    // bytes is a valid value of it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req
}

/// Why `name` cannot be an interface name, if it cannot (the kernel's dev_valid_name).
pub fn invalid_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() >= libc::IFNAMSIZ {
        Some("it is longer than 15 bytes")
    } else if name == "." || name == ".." {
        Some("`.` and `..` are not interface names")
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        Some("it contains `/`, `:`, a space or a NUL")
    } else {
        None
    }
}

/// What an errno from TUNSETIFF most likely means, for the error message.
fn tunsetiff_hint(name: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "; creating or attaching `{name}` needs CAP_NET_ADMIN, or a TAP made for this user \
             (`ip tuntap add {name} mode tap user $USER`)"
        ),
        Some(libc::EINVAL) => {
            format!("; `{name}` exists but is not a single-queue TAP interface (pick another name)")
        }
        Some(libc::EBUSY) => format!("; `{name}` is already attached to another process"),
        _ => String::new(),
    }
}

impl Tap {
    /// Opens the TAP interface `name`: attaches it if it exists, creates it otherwise (and then
    /// brings it up). The file is non-blocking and carries 12-byte virtio-net headers.
    pub fn open(name: &str) -> Result<Tap, DeviceError> {
        if let Some(why) = invalid_name(name) {
            return Err(DeviceError(format!("Cannot open TAP `{name}`: {why}")));
        }
        let existed = Path::new("/sys/class/net").join(name).exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|e| {
                DeviceError(format!(
                    "Cannot open TAP {name}: {TUN_PATH}: {e}{}",
                    match e.raw_os_error() {
                        Some(libc::ENOENT) | Some(libc::ENODEV) => " (is the tun module loaded?)",
                        Some(libc::EACCES) | Some(libc::EPERM) =>
                            " (no permission to use TUN/TAP devices)",
                        _ => "",
                    }
                ))
            })?;
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives on our stack for the call;
        // the fd is the open clone device.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(DeviceError(format!(
                "Cannot open TAP {name}: {e}{}",
                tunsetiff_hint(name, &e)
            )));
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which outlives the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &hdr_len) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(DeviceError(format!(
                "Cannot set the virtio-net header size of TAP {name}: {e}"
            )));
        }
        let tap = Tap {
            file,
            name: name.to_string(),
            created: !existed,
        };
        // Start without offloads; activation sets those the driver accepted.
        tap.set_offload(0)
            .map_err(|e| DeviceError(format!("Cannot set the offloads of TAP {name}: {e}")))?;
        if existed {
            log::info!("opened existing TAP {name}");
            match tap.is_up() {
                Ok(false) => log::info!(
                    "TAP {name} is down; bring it up with `ip link set {name} up` for traffic"
                ),
                Ok(true) => {}
                Err(e) => log::debug!("TAP {name}: cannot read its flags: {e}"),
            }
        } else {
            log::info!("created TAP {name}");
            if let Err(e) = tap.set_up() {
                log::warn!(
                    "TAP {name}: cannot bring it up: {e}; use `ip link set {name} up` for traffic"
                );
            }
        }
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether vmm created the interface (it disappears when the TAP is dropped).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Sets the offloads the TAP may hand us (TUN_F_* bits): checksum-less and TSO frames.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is our TAP.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD as _,
                flags as libc::c_ulong,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Runs SIOCGIFFLAGS / SIOCSIFFLAGS on the interface through an AF_INET datagram socket.
    fn flags(&self, set: Option<libc::c_short>) -> io::Result<libc::c_short> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket nobody else owns; OwnedFd closes it.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = ifreq(&self.name);
        // SAFETY: SIOCGIFFLAGS writes the flags into the ifreq on our stack.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        let Some(set) = set else { return Ok(flags) };
        req.ifr_ifru.ifru_flags = flags | set;
        // SAFETY: SIOCSIFFLAGS reads the ifreq on our stack.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(flags | set)
    }

    /// Whether the interface is administratively up.
    pub fn is_up(&self) -> io::Result<bool> {
        Ok(self.flags(None)? & libc::IFF_UP as libc::c_short != 0)
    }

    /// Brings the interface up (addresses stay the user's business).
    pub fn set_up(&self) -> io::Result<()> {
        self.flags(Some(libc::IFF_UP as libc::c_short)).map(|_| ())
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(invalid_name("tap0").is_none());
        assert!(invalid_name("").is_some());
        assert!(invalid_name("a-very-long-name0").is_some());
        assert!(invalid_name("..").is_some());
        assert!(invalid_name("a/b").is_some());
        let e = Tap::open("x/y").unwrap_err();
        assert!(e.0.contains("x/y"), "{e}");
    }
}
