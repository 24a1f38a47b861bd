//! What the transmit and receive paths share (virtio 1.2 section 5.1.6): the virtio-net header,
//! taking chains off a queue and turning a chain into host views of guest memory for one
//! readv/writev. Nothing here trusts the guest: a malformed chain is refused with a reason,
//! never a panic.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::bitmap::BS;
use vm_memory::{GuestMemory, Permissions, VolatileSlice};

/// Size of `struct virtio_net_hdr_v1` (num_buffers included), in front of every frame both in
/// the virtqueues and on the TAP.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame (without the header) the device accepts from the guest: 64 KiB, a full TSO
/// segment with its Ethernet header.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// Largest transmit chain: header plus frame.
pub const MAX_TX_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Most guest memory segments per packet; two more iovecs are vmm's own (UIO_MAXIOV is 1024).
pub const MAX_SEGMENTS: usize = libc::UIO_MAXIOV as usize - 2;

// virtio_net_hdr fields (section 5.1.6).
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;

/// Guest memory as the kernel will see it: slices of the guest's buffers.
pub(super) type Slice<'a, M> = VolatileSlice<'a, BS<'a, <M as GuestMemory>::Bitmap>>;

/// Why a descriptor chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadChain {
    /// No bytes, or too few for the virtio-net header and a frame.
    TooShort,
    /// A writable descriptor on the transmit queue or a readable one on the receive queue.
    WrongDirection,
    /// A buffer outside guest RAM.
    BadAddress,
    /// A transmit chain longer than header + 64 KiB.
    TooLong,
    /// More than [`MAX_SEGMENTS`] memory segments.
    TooManySegments,
    /// The chain does not end: a loop, a `next` out of the table or a broken indirect table.
    Unterminated,
}

/// Takes the next available chain. `Err` means the ring itself is broken (e.g. the driver's
/// avail index ran more than a queue size ahead).
pub(super) fn pop<'a, M: GuestMemory>(
    queue: &mut Queue,
    mem: &'a M,
) -> Result<Option<DescriptorChain<&'a M>>, virtio_queue::Error> {
    Ok(queue.iter(mem)?.next())
}

/// Collects the guest buffers of `chain`, all of which must be writable (`writable`) or all
/// readable, at most `max_len` bytes. Returns the total length.
pub(super) fn gather<'a, M: GuestMemory>(
    mem: &'a M,
    chain: DescriptorChain<&'a M>,
    writable: bool,
    max_len: usize,
    out: &mut Vec<Slice<'a, M>>,
) -> Result<usize, BadChain> {
    let access = if writable {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut total = 0usize;
    let mut unterminated = false;
    for d in chain {
        // The iterator stops early on loops and bad indices; the last descriptor then still
        // says NEXT.
        unterminated = d.has_next();
        if d.is_write_only() != writable {
            return Err(BadChain::WrongDirection);
        }
        let len = d.len() as usize;
        if len == 0 {
            continue;
        }
        total = total
            .checked_add(len)
            .filter(|&t| t <= max_len)
            .ok_or(BadChain::TooLong)?;
        let slices = mem
            .get_slices(d.addr(), len, access)
            .map_err(|_| BadChain::BadAddress)?;
        for s in slices {
            let s = s.map_err(|_| BadChain::BadAddress)?;
            if out.len() >= MAX_SEGMENTS {
                return Err(BadChain::TooManySegments);
            }
            out.push(s);
        }
    }
    if unterminated {
        return Err(BadChain::Unterminated);
    }
    if total <= VNET_HDR_LEN {
        return Err(BadChain::TooShort);
    }
    Ok(total)
}

/// Whether a TAP error means the interface is gone (as opposed to one packet failing).
pub fn is_host_fault(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD)
            | Some(libc::EBADF)
            | Some(libc::ENODEV)
            | Some(libc::ENXIO)
            | Some(libc::EPIPE)
            | Some(libc::ENOTCONN)
            | Some(libc::ECONNRESET)
    )
}

/// writev(2), retried on EINTR.
pub(super) fn writev(fd: BorrowedFd<'_>, iov: &[libc::iovec]) -> io::Result<usize> {
    loop {
        // SAFETY: every iovec points into guest memory (or a host buffer) that stays mapped
        // and alive while its guard, held by the caller, lives; the kernel only reads them.
        let r = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// readv(2), retried on EINTR.
pub(super) fn readv(fd: BorrowedFd<'_>, iov: &[libc::iovec]) -> io::Result<usize> {
    loop {
        // SAFETY: every iovec points into writable guest memory or a host buffer that stays
        // alive (with its guard) for the call; the kernel writes at most iov_len bytes to each.
        let r = unsafe { libc::readv(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
