//! Test helpers of the virtio-net model: guest memory, descriptors, a fake TAP (a
//! SOCK_SEQPACKET socket pair keeps packet boundaries as a TAP does) and a fake driver.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{FEATURES, VNET_HDR_LEN};
use crate::hw::virtio::{Activation, ActiveQueue, GuestMem};

pub use crate::testing::{Count, INDIRECT, NEXT, Resets, WRITE};
pub const MEM_SIZE: u64 = 4 << 20;
/// Where tests put headers and buffers (the receive queue's rings are at 0).
pub const HDR: u64 = 0x10000;
pub const BUF: u64 = 0x20000;
/// Where the transmit queue's rings are.
pub const TXQ: u64 = 0x8000;

/// 4 MiB of guest memory.
pub fn mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// A descriptor with explicit flags and next (add_desc_chains keeps both).
pub fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// A one-descriptor chain.
pub fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    d(addr, len, flags, 0)
}

/// A connected SOCK_SEQPACKET pair standing in for a TAP: (device end, host end).
pub fn packet_pair() -> (OwnedFd, OwnedFd) {
    crate::testing::seqpacket_pair().expect("socketpair")
}

pub fn send(fd: &OwnedFd, data: &[u8]) {
    // SAFETY: sends from a live buffer of its length.
    let r = unsafe { libc::send(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), 0) };
    assert_eq!(r, data.len() as isize, "{}", io::Error::last_os_error());
}

/// The next packet on `fd`, None if there is none.
pub fn recv(fd: &OwnedFd) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 128 * 1024];
    // SAFETY: receives into a live buffer of its length.
    let r = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if r < 0 {
        return None;
    }
    buf.truncate(r as usize);
    Some(buf)
}

/// (head, len) of every used element so far.
pub fn used(vq: &MockSplitQueue<'_, GuestMem>) -> Vec<(u32, u32)> {
    let n = vq.used().idx().load();
    (0..n)
        .map(|i| {
            let e = vq.used().ring().ref_at(i as usize).unwrap().load();
            (e.id(), e.len())
        })
        .collect()
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

/// A virtio-net header as a TAP or a driver writes it, with a garbage num_buffers.
pub fn header(flags: u8, gso: u8) -> Vec<u8> {
    let mut h = vec![0u8; VNET_HDR_LEN];
    h[0] = flags;
    h[1] = gso;
    h[2..4].copy_from_slice(&54u16.to_le_bytes());
    h[10..12].copy_from_slice(&0xffffu16.to_le_bytes());
    h
}

/// A zero header and a `frame_len`-byte frame.
pub fn header_and(frame_len: usize) -> Vec<u8> {
    let mut p = vec![0u8; VNET_HDR_LEN];
    p.extend((0..frame_len).map(|i| i as u8));
    p
}

/// The driver's side of a running device.
pub struct Driver {
    pub rx_kick: EventFd,
    pub tx_kick: EventFd,
    pub config: Arc<Count>,
    pub resets: Arc<Resets>,
}

/// An activation with every feature accepted and both queues from the mocks.
pub fn activation(
    m: &GuestMem,
    rxq: &MockSplitQueue<'_, GuestMem>,
    txq: &MockSplitQueue<'_, GuestMem>,
) -> (Activation, Driver) {
    let kick = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let (rx_kick, tx_kick) = (kick(), kick());
    let config = Arc::new(Count::default());
    let resets = Arc::new(Resets::default());
    let queue = |index: u16, vq: &MockSplitQueue<'_, GuestMem>, k: &EventFd| ActiveQueue {
        index,
        queue: vq.create_queue::<Queue>().unwrap(),
        kick: k.try_clone().unwrap(),
        irq: Arc::new(Count::default()),
    };
    let a = Activation {
        mem: m.clone(),
        features: FEATURES,
        queues: vec![queue(0, rxq, &rx_kick), queue(1, txq, &tx_kick)],
        config_irq: config.clone(),
        needs_reset: resets.clone(),
    };
    let drv = Driver {
        rx_kick,
        tx_kick,
        config,
        resets,
    };
    (a, drv)
}

/// Waits up to 5 s for `f`.
pub fn wait_until(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting until {what}");
}
