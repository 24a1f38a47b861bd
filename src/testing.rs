//! Test doubles and builders shared by unit tests, benches and integration tests: a split
//! virtqueue laid out in guest memory as a driver lays it out, interrupt lines and reset sinks
//! that count, a VM handle that accepts everything, and a packet socket pair standing in for a
//! TAP. Compiled for unit tests and with the `testing` feature (which the benches need:
//! `cargo bench --features testing`); never part of a release binary.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use crate::hw::bus::SharedDevice;
use crate::hw::virtio::{GuestMem, NeedsReset};
use crate::hw::{DeviceError, Irq, MsiVector, VmHandle};

/// Descriptor flags (virtio 1.2 section 2.7.5).
pub const NEXT: u16 = 1;
pub const WRITE: u16 = 2;
pub const INDIRECT: u16 = 4;

/// `size` bytes of guest memory at address 0.
pub fn guest_mem(size: usize) -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), size)]).expect("anonymous guest memory")
}

/// The driver's side of a split virtqueue in guest memory: it writes descriptors, makes chains
/// available and reaps the used ring, as a guest driver does (with the same fences).
#[derive(Debug, Clone)]
pub struct Ring {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    avail_idx: u16,
    used_seen: u16,
}

impl Ring {
    /// A ring of `size` entries with its tables at `desc`, `avail` and `used`; zeroes both
    /// indexes in `mem`.
    pub fn new<M: GuestMemory>(mem: &M, size: u16, desc: u64, avail: u64, used: u64) -> Ring {
        for a in [avail, avail + 2, used, used + 2] {
            mem.write_obj(0u16, GuestAddress(a))
                .expect("ring inside guest memory");
        }
        Ring {
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// The device's `Queue` for this ring, ready as after the driver's setup.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("a power-of-two queue size");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Writes descriptor `i`.
    pub fn write_desc<M: GuestMemory>(
        &self,
        mem: &M,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let a = self.desc + u64::from(i) * 16;
        mem.write_obj(addr, GuestAddress(a))
            .expect("descriptor table");
        mem.write_obj(len, GuestAddress(a + 8))
            .expect("descriptor table");
        mem.write_obj(flags, GuestAddress(a + 12))
            .expect("descriptor table");
        mem.write_obj(next, GuestAddress(a + 14))
            .expect("descriptor table");
    }

    /// Makes the chains starting at `heads` available and publishes the index.
    pub fn offer<M: GuestMemory>(&mut self, mem: &M, heads: &[u16]) {
        for &h in heads {
            let slot = self.avail + 4 + u64::from(self.avail_idx % self.size) * 2;
            mem.write_obj(h, GuestAddress(slot)).expect("avail ring");
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        fence(Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .expect("avail ring");
        fence(Ordering::SeqCst);
    }

    /// The index the driver will make available next.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Chains made available and not yet used.
    pub fn in_flight<M: GuestMemory>(&self, mem: &M) -> u16 {
        self.avail_idx.wrapping_sub(self.used_idx(mem))
    }

    /// The device's used index.
    pub fn used_idx<M: GuestMemory>(&self, mem: &M) -> u16 {
        fence(Ordering::SeqCst);
        mem.read_obj(GuestAddress(self.used + 2))
            .expect("used ring")
    }

    /// The (head, length) elements the device used since the last call.
    pub fn take_used<M: GuestMemory>(&mut self, mem: &M) -> Vec<(u32, u32)> {
        let end = self.used_idx(mem);
        let mut out = Vec::new();
        while self.used_seen != end {
            let e = self.used + 4 + u64::from(self.used_seen % self.size) * 8;
            let id: u32 = mem.read_obj(GuestAddress(e)).expect("used ring");
            let len: u32 = mem.read_obj(GuestAddress(e + 4)).expect("used ring");
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// An interrupt line (or MSI vector) that counts its triggers.
#[derive(Debug, Default)]
pub struct Count(AtomicU64);

impl Count {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl Irq for Count {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Reset requests a device made, recorded.
#[derive(Debug, Default)]
pub struct Resets(pub Mutex<Vec<String>>);

impl Resets {
    pub fn taken(&self) -> Vec<String> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl NeedsReset for Resets {
    fn needs_reset(&self, why: &str) {
        if let Ok(mut v) = self.0.lock() {
            v.push(why.to_string());
        }
    }
}

/// A VM that accepts every ioeventfd and hands out MSI vectors that do nothing: for a
/// transport measured or tested alone.
#[derive(Debug, Default)]
pub struct NullVm;

/// An MSI vector that accepts any message and drops its triggers.
#[derive(Debug, Default)]
pub struct NullMsi;

impl MsiVector for NullMsi {
    fn set_message(&self, _: u64, _: u32) -> Result<(), DeviceError> {
        Ok(())
    }
    fn trigger(&self) {}
}

impl VmHandle for NullVm {
    fn register_ioevent(&self, _: &EventFd, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    fn unregister_ioevent(&self, _: &EventFd, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    fn msi_vector(&self) -> Result<Arc<dyn MsiVector>, DeviceError> {
        Ok(Arc::new(NullMsi))
    }
    fn move_mmio(&self, _: u64, _: u64, _: u64, _: SharedDevice) {}
}

/// A connected, non-blocking SOCK_SEQPACKET pair: keeps packet boundaries as a TAP does.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array we own.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_round_trips_through_the_device_queue() {
        use virtio_queue::QueueOwnedT;
        let mem = guest_mem(1 << 20);
        let mut ring = Ring::new(&mem, 8, 0x0, 0x1000, 0x2000);
        ring.write_desc(&mem, 0, 0x10000, 64, NEXT, 1);
        ring.write_desc(&mem, 1, 0x20000, 32, WRITE, 0);
        ring.offer(&mem, &[0]);
        let mut q = ring.queue();
        let chain = q.iter(&mem).unwrap().next().expect("one chain");
        let lens: Vec<u32> = chain.clone().map(|d| d.len()).collect();
        assert_eq!(lens, [64, 32]);
        q.add_used(&mem, chain.head_index(), 32).unwrap();
        assert_eq!(ring.take_used(&mem), [(0, 32)]);
        assert!(
            ring.take_used(&mem).is_empty(),
            "each element is reported once"
        );
    }
}
