//! The receive path of virtio-net (virtio 1.2 section 5.1.6.3–5.1.6.4): packets read from the
//! TAP straight into the guest's receive chains, one packet per chain (no
//! VIRTIO_NET_F_MRG_RXBUF). Generic over the guest memory so a vhost-user backend can serve it
//! too.

use std::io;
use std::os::fd::BorrowedFd;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::volatile_memory::PtrGuardMut;
use vm_memory::{Bytes, GuestMemory, VolatileSlice};

use super::chain::{
    BadChain, Slice, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VNET_HDR_LEN,
    gather, is_host_fault, pop, readv,
};
use super::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6};

/// The receive offloads the driver accepted: what the TAP may hand over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxOffloads {
    /// Partially checksummed frames (NEEDS_CSUM) and DATA_VALID (VIRTIO_NET_F_GUEST_CSUM).
    pub csum: bool,
    /// TCP/IPv4 segmentation offload (VIRTIO_NET_F_GUEST_TSO4).
    pub tso4: bool,
    /// TCP/IPv6 segmentation offload (VIRTIO_NET_F_GUEST_TSO6).
    pub tso6: bool,
}

impl RxOffloads {
    pub fn from_features(features: u64) -> RxOffloads {
        RxOffloads {
            csum: features & VIRTIO_NET_F_GUEST_CSUM != 0,
            tso4: features & VIRTIO_NET_F_GUEST_TSO4 != 0,
            tso6: features & VIRTIO_NET_F_GUEST_TSO6 != 0,
        }
    }

    /// The TUNSETOFFLOAD bits for these offloads (TSO only with checksum offload, as the
    /// kernel and the virtio feature dependencies require).
    pub fn tun_flags(self) -> libc::c_uint {
        let mut f = 0;
        if self.csum {
            f |= libc::TUN_F_CSUM;
            if self.tso4 {
                f |= libc::TUN_F_TSO4;
            }
            if self.tso6 {
                f |= libc::TUN_F_TSO6;
            }
        }
        f
    }
}

/// Checks a header from the TAP against what the driver accepted and sets num_buffers = 1.
/// False: the frame uses an offload the driver did not accept (it is dropped).
pub fn fix_rx_header(hdr: &mut [u8; VNET_HDR_LEN], o: RxOffloads) -> bool {
    let gso_ok = match hdr[1] {
        VIRTIO_NET_HDR_GSO_NONE => true,
        VIRTIO_NET_HDR_GSO_TCPV4 => o.csum && o.tso4,
        VIRTIO_NET_HDR_GSO_TCPV6 => o.csum && o.tso6,
        _ => false,
    };
    if !gso_ok || (hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !o.csum) {
        return false;
    }
    // Without GUEST_CSUM the flags must be 0 (section 5.1.6.4.1); other flags are not ours.
    hdr[0] &= if o.csum {
        VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID
    } else {
        0
    };
    hdr[10..12].copy_from_slice(&1u16.to_le_bytes());
    true
}

/// How an [`rx`] batch ended.
#[derive(Debug, Default)]
pub enum RxStop {
    /// The TAP has nothing more to read.
    #[default]
    Drained,
    /// A packet may be waiting but the guest offers no receive buffer.
    NoBuffers,
    /// `budget` reads were done; more may be waiting.
    Budget,
    /// The ring is broken; the device needs a reset.
    RingError(String),
    /// The TAP failed in a way that will not heal (deleted interface, EOF).
    Fault(io::Error),
    /// A read failed in a way that may heal (not a host fault): try again later.
    Error(io::Error),
}

/// What an [`rx`] batch did.
#[derive(Debug, Default)]
pub struct RxOutcome {
    /// Chains returned to the used ring (the caller notifies if > 0).
    pub used: usize,
    pub packets: u64,
    /// Frame bytes delivered (headers not counted).
    pub bytes: u64,
    /// Packets larger than the receive buffer they were read into, dropped.
    pub too_big: u64,
    /// Packets with offloads the driver did not accept, or shorter than a header, dropped.
    pub dropped: u64,
    /// Malformed receive chains (returned with length 0).
    pub bad_chains: u64,
    /// The reason of the last malformed chain.
    pub last_bad: Option<BadChain>,
    pub stop: RxStop,
}

/// Reads packets from `tap` straight into the guest's receive chains (one packet per chain:
/// no VIRTIO_NET_F_MRG_RXBUF), at most `budget` reads. The header passes through a 12-byte
/// host buffer so it can be checked and num_buffers set; the frame goes to guest memory
/// directly. A packet larger than its chain is dropped and counted, and the chain reused.
pub fn rx<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    tap: BorrowedFd<'_>,
    offloads: RxOffloads,
    budget: usize,
) -> RxOutcome {
    let mut rx = Rx {
        queue,
        mem,
        tap,
        offloads,
        budget,
        work: 0,
        out: RxOutcome::default(),
        slices: Vec::new(),
        frame: Vec::new(),
        guards: Vec::new(),
        iov: Vec::new(),
    };
    rx.out.stop = rx.run();
    rx.out
}

/// One [`rx`] batch; the vectors are reused from chain to chain.
struct Rx<'a, 'm, M: GuestMemory> {
    queue: &'a mut Queue,
    mem: &'m M,
    tap: BorrowedFd<'a>,
    offloads: RxOffloads,
    budget: usize,
    /// Chains popped plus reads done: the batch ends at `budget`.
    work: usize,
    out: RxOutcome,
    /// The chain's writable buffers.
    slices: Vec<Slice<'m, M>>,
    /// The frame's part of the chain: everything after the header.
    frame: Vec<Slice<'m, M>>,
    guards: Vec<PtrGuardMut>,
    iov: Vec<libc::iovec>,
}

impl<'m, M: GuestMemory> Rx<'_, 'm, M> {
    /// Counts one unit of work; false when the budget is spent.
    fn work(&mut self) -> bool {
        if self.work >= self.budget {
            return false;
        }
        self.work += 1;
        true
    }

    fn run(&mut self) -> RxStop {
        loop {
            if !self.work() {
                return RxStop::Budget;
            }
            let chain = match pop(self.queue, self.mem) {
                Ok(Some(c)) => c,
                Ok(None) => return RxStop::NoBuffers,
                Err(e) => return RxStop::RingError(format!("receive queue: {e}")),
            };
            let head = chain.head_index();
            self.slices.clear();
            match gather(self.mem, chain, true, usize::MAX, &mut self.slices) {
                Ok(cap) => {
                    if let Some(stop) = self.fill(head, cap) {
                        return stop;
                    }
                }
                Err(why) => {
                    self.out.bad_chains += 1;
                    self.out.last_bad = Some(why);
                    if self.queue.add_used(self.mem, head, 0).is_ok() {
                        self.out.used += 1;
                    }
                }
            }
        }
    }

    /// Everything after the first 12 bytes of the chain.
    fn split_frame(&mut self) {
        self.frame.clear();
        let mut skip = VNET_HDR_LEN;
        for s in &self.slices {
            if skip >= s.len() {
                skip -= s.len();
                continue;
            }
            // Cannot fail: skip < len.
            if let Ok(rest) = s.offset(skip) {
                self.frame.push(rest);
            }
            skip = 0;
        }
    }

    /// Reads until a packet fits the chain `head` of `cap` bytes (dropping those that do not);
    /// `Some` when the batch ends instead.
    fn fill(&mut self, head: u16, cap: usize) -> Option<RxStop> {
        self.split_frame();
        let mut hdr = [0u8; VNET_HDR_LEN];
        // One byte past the chain: a packet that reaches it did not fit.
        let mut overflow = [0u8; 1];
        self.guards.clear();
        self.guards
            .extend(self.frame.iter().map(|s| s.ptr_guard_mut()));
        self.iov.clear();
        self.iov.push(libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: hdr.len(),
        });
        self.iov.extend(self.guards.iter().map(|g| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: g.len(),
        }));
        self.iov.push(libc::iovec {
            iov_base: overflow.as_mut_ptr().cast(),
            iov_len: overflow.len(),
        });
        loop {
            self.iov[0].iov_base = hdr.as_mut_ptr().cast();
            if let Some(last) = self.iov.last_mut() {
                last.iov_base = overflow.as_mut_ptr().cast();
            }
            let n = match readv(self.tap, &self.iov) {
                Ok(0) => {
                    self.queue.go_to_previous_position();
                    let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "end of file");
                    return Some(RxStop::Fault(eof));
                }
                Ok(n) => n,
                Err(e) => {
                    // The chain stays available for the next packet.
                    self.queue.go_to_previous_position();
                    return Some(if is_host_fault(&e) {
                        RxStop::Fault(e)
                    } else if e.kind() != io::ErrorKind::WouldBlock {
                        RxStop::Error(e)
                    } else {
                        RxStop::Drained
                    });
                }
            };
            if n > cap {
                self.out.too_big += 1;
            } else if n <= VNET_HDR_LEN || !fix_rx_header(&mut hdr, self.offloads) {
                self.out.dropped += 1;
            } else {
                write_header(&self.slices, &hdr);
                mark_dirty(&self.frame, n - VNET_HDR_LEN);
                if self.queue.add_used(self.mem, head, n as u32).is_ok() {
                    self.out.used += 1;
                }
                self.out.packets += 1;
                self.out.bytes += (n - VNET_HDR_LEN) as u64;
                return None;
            }
            if !self.work() {
                self.queue.go_to_previous_position();
                return Some(RxStop::Budget);
            }
        }
    }
}

/// Copies the header into the first bytes of the chain.
fn write_header<B: vm_memory::bitmap::BitmapSlice>(slices: &[VolatileSlice<'_, B>], hdr: &[u8]) {
    let mut done = 0;
    for s in slices {
        if done == hdr.len() {
            break;
        }
        let k = s.len().min(hdr.len() - done);
        // In range by construction (k <= s.len()); a failure would only lose the header.
        let _ = s.write_slice(&hdr[done..done + k], 0);
        done += k;
    }
}

/// Records the kernel's writes to the first `n` bytes of `frame` in the dirty bitmap.
fn mark_dirty<B: vm_memory::bitmap::BitmapSlice>(frame: &[VolatileSlice<'_, B>], mut n: usize) {
    for s in frame {
        if n == 0 {
            break;
        }
        let k = s.len().min(n);
        s.bitmap().mark_dirty(0, k);
        n -= k;
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::net::testing::*;

    #[test]
    fn rx_delivers_a_packet_with_num_buffers_1() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 256);
        let (dev, host) = packet_pair();
        // Linux's layout: the header in its own descriptor, then the frame buffer.
        vq.add_desc_chains(&[d(HDR, 12, WRITE | NEXT, 1), d(BUF, 1514, WRITE, 0)], 0)
            .unwrap();
        // All in one descriptor.
        vq.add_desc_chains(&[d(0x30000, 1526, WRITE, 0)], 2)
            .unwrap();
        let frame = pattern(60, 1);
        let frame2 = pattern(1514, 2);
        send(&host, &[header(0, 0), frame.clone()].concat());
        send(&host, &[header(0, 0), frame2.clone()].concat());
        let mut q: Queue = vq.create_queue().unwrap();
        let o = rx(&mut q, &m, dev.as_fd(), RxOffloads::default(), 256);
        assert!(matches!(o.stop, RxStop::NoBuffers), "{:?}", o.stop);
        assert_eq!((o.used, o.packets, o.bytes), (2, 2, 60 + 1514));
        assert_eq!(used(&vq), vec![(0, 72), (2, 1526)]);
        let mut hdr = [0u8; 12];
        m.read_slice(&mut hdr, GuestAddress(HDR)).unwrap();
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1);
        assert_eq!(hdr[..10], header(0, 0)[..10]);
        let mut got = vec![0u8; 60];
        m.read_slice(&mut got, GuestAddress(BUF)).unwrap();
        assert_eq!(got, frame);
        let mut got = vec![0u8; 1526];
        m.read_slice(&mut got, GuestAddress(0x30000)).unwrap();
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        assert_eq!(got[12..], frame2[..]);
    }

    #[test]
    fn rx_drops_and_counts_packets_bigger_than_the_chain() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 256);
        let (dev, host) = packet_pair();
        vq.add_desc_chains(&[d(BUF, 100, WRITE, 0)], 0).unwrap();
        vq.add_desc_chains(&[d(BUF + 0x1000, 100, WRITE, 0)], 1)
            .unwrap();
        send(&host, &[header(0, 0), pattern(200, 3)].concat());
        // Exactly the chain's size fits.
        let fits = pattern(88, 4);
        send(&host, &[header(0, 0), fits.clone()].concat());
        send(&host, &[header(0, 0), pattern(89, 5)].concat());
        let mut q: Queue = vq.create_queue().unwrap();
        let o = rx(&mut q, &m, dev.as_fd(), RxOffloads::default(), 256);
        assert!(matches!(o.stop, RxStop::Drained), "{:?}", o.stop);
        assert_eq!((o.used, o.packets, o.too_big), (1, 1, 2));
        assert_eq!(used(&vq), vec![(0, 100)]);
        let mut got = vec![0u8; 88];
        m.read_slice(&mut got, GuestAddress(BUF + 12)).unwrap();
        assert_eq!(got, fits);
        // The second chain is still the guest's (not consumed by a drop).
        assert_eq!(q.next_avail(), 1);
    }

    #[test]
    fn rx_refuses_hostile_chains_without_losing_packets() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 256);
        let (dev, host) = packet_pair();
        let chains: Vec<(u16, Vec<RawDescriptor>)> = vec![
            // A readable descriptor on the receive queue.
            (0, vec![d(BUF, 1526, 0, 0)]),
            (1, vec![d(HDR, 12, WRITE | NEXT, 2), d(BUF, 1514, 0, 0)]),
            // Zero length, and too short for a header.
            (3, vec![d(BUF, 0, WRITE, 0)]),
            (4, vec![d(BUF, 12, WRITE, 0)]),
            // Out of guest memory.
            (5, vec![d(MEM_SIZE - 100, 1526, WRITE, 0)]),
            (6, vec![d(BUF, u32::MAX, WRITE, 0)]),
            // A loop.
            (
                7,
                vec![d(BUF, 100, WRITE | NEXT, 8), d(BUF, 100, WRITE | NEXT, 7)],
            ),
            // A good one.
            (9, vec![d(BUF, 1526, WRITE, 0)]),
        ];
        for (at, c) in &chains {
            vq.add_desc_chains(c, *at).unwrap();
        }
        let frame = pattern(100, 9);
        send(&host, &[header(0, 0), frame.clone()].concat());
        let mut q: Queue = vq.create_queue().unwrap();
        let o = rx(&mut q, &m, dev.as_fd(), RxOffloads::default(), 256);
        assert_eq!((o.used, o.packets, o.bad_chains), (8, 1, 7));
        let mut want: Vec<(u32, u32)> = chains[..7].iter().map(|(at, _)| (*at as u32, 0)).collect();
        want.push((9, 112));
        assert_eq!(used(&vq), want);
        let mut got = vec![0u8; 100];
        m.read_slice(&mut got, GuestAddress(BUF + 12)).unwrap();
        assert_eq!(got, frame);
    }

    #[test]
    fn rx_stops_on_a_runaway_avail_index() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 256);
        let (dev, host) = packet_pair();
        vq.add_desc_chains(&[d(BUF, 1526, WRITE, 0)], 0).unwrap();
        vq.avail().idx().store(40000);
        send(&host, &[header(0, 0), pattern(60, 0)].concat());
        let mut q: Queue = vq.create_queue().unwrap();
        let o = rx(&mut q, &m, dev.as_fd(), RxOffloads::default(), 256);
        assert!(matches!(o.stop, RxStop::RingError(_)), "{:?}", o.stop);
        assert!(used(&vq).is_empty());
        // The packet was not consumed.
        assert!(recv(&dev).is_some());
    }

    #[test]
    fn rx_keeps_chains_and_packets_when_one_side_is_empty() {
        let m = mem();
        let mut vq = MockSplitQueue::new(&m, 256);
        let (dev, host) = packet_pair();
        let mut q: Queue = vq.create_queue().unwrap();
        // A packet, no buffers.
        send(&host, &[header(0, 0), pattern(60, 0)].concat());
        let o = rx(&mut q, &m, dev.as_fd(), RxOffloads::default(), 256);
        assert!(matches!(o.stop, RxStop::NoBuffers), "{:?}", o.stop);
        // A buffer: the packet lands.
        vq.add_desc_chains(&[d(BUF, 1526, WRITE, 0)], 0).unwrap();
        let o = rx(&mut q, &m, dev.as_fd(), RxOffloads::default(), 256);
        assert_eq!(o.packets, 1);
        // A buffer, no packet: the chain stays available.
        vq = MockSplitQueue::new(&m, 256);
        q = vq.create_queue().unwrap();
        vq.add_desc_chains(&[d(BUF, 1526, WRITE, 0)], 0).unwrap();
        let o = rx(&mut q, &m, dev.as_fd(), RxOffloads::default(), 256);
        assert!(matches!(o.stop, RxStop::Drained), "{:?}", o.stop);
        assert_eq!((o.used, q.next_avail()), (0, 0));
        // The host end closes: a fault, the chain still available.
        drop(host);
        let o = rx(&mut q, &m, dev.as_fd(), RxOffloads::default(), 256);
        assert!(matches!(o.stop, RxStop::Fault(_)), "{:?}", o.stop);
        assert_eq!((o.used, q.next_avail()), (0, 0));
    }

    #[test]
    fn rx_respects_the_budget() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 256);
        let (dev, host) = packet_pair();
        for i in 0..4u16 {
            vq.add_desc_chains(&[d(BUF + u64::from(i) * 0x1000, 1526, WRITE, 0)], i)
                .unwrap();
            send(&host, &[header(0, 0), pattern(60, i as u8)].concat());
        }
        let mut q: Queue = vq.create_queue().unwrap();
        let o = rx(&mut q, &m, dev.as_fd(), RxOffloads::default(), 2);
        assert!(matches!(o.stop, RxStop::Budget), "{:?}", o.stop);
        assert_eq!(o.used, 2);
        let o = rx(&mut q, &m, dev.as_fd(), RxOffloads::default(), 256);
        assert_eq!(o.used, 2);
    }

    #[test]
    fn rx_applies_the_accepted_offloads() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 256);
        let (dev, host) = packet_pair();
        vq.add_desc_chains(&[d(BUF, 1526, WRITE, 0)], 0).unwrap();
        // Partial checksum without GUEST_CSUM: dropped. DATA_VALID: delivered, flag cleared.
        send(
            &host,
            &[header(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0), pattern(60, 0)].concat(),
        );
        send(
            &host,
            &[header(VIRTIO_NET_HDR_F_DATA_VALID, 0), pattern(60, 0)].concat(),
        );
        let mut q: Queue = vq.create_queue().unwrap();
        let o = rx(&mut q, &m, dev.as_fd(), RxOffloads::default(), 256);
        assert_eq!((o.packets, o.dropped), (1, 1));
        let mut hdr = [0u8; 12];
        m.read_slice(&mut hdr, GuestAddress(BUF)).unwrap();
        assert_eq!(hdr[0], 0);
    }

    #[test]
    fn rx_headers_follow_the_negotiated_offloads() {
        let all = RxOffloads {
            csum: true,
            tso4: true,
            tso6: true,
        };
        let none = RxOffloads::default();
        let h = |flags, gso| -> [u8; 12] { header(flags, gso).try_into().unwrap() };
        let mut x = h(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4);
        assert!(fix_rx_header(&mut x, all));
        assert_eq!((x[0], x[1], &x[10..]), (1, 1, &[1u8, 0][..]));
        assert!(!fix_rx_header(
            &mut h(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4),
            RxOffloads { tso4: false, ..all }
        ));
        assert!(!fix_rx_header(
            &mut h(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6),
            RxOffloads { tso6: false, ..all }
        ));
        // UDP and ECN GSO are never negotiated.
        assert!(!fix_rx_header(&mut h(1, 3), all));
        assert!(!fix_rx_header(&mut h(1, 0x81), all));
        assert!(!fix_rx_header(&mut h(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0), none));
        let mut x = h(VIRTIO_NET_HDR_F_DATA_VALID | 4, 0);
        assert!(fix_rx_header(&mut x, none));
        assert_eq!(x[0], 0);
        assert_eq!(
            all.tun_flags(),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
        );
        assert_eq!(RxOffloads { csum: false, ..all }.tun_flags(), 0);
        assert_eq!(none.tun_flags(), 0);
    }
}
