//! The transmit path of virtio-net (virtio 1.2 section 5.1.6.2): each chain of the transmitq is
//! one packet, header and frame as the guest laid them out, written to the TAP with one
//! writev. Generic over the guest memory so a vhost-user backend can serve it too.

use std::io;
use std::os::fd::BorrowedFd;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;
use vm_memory::volatile_memory::PtrGuard;

use super::chain::{BadChain, MAX_TX_LEN, Slice, VNET_HDR_LEN, gather, is_host_fault, pop, writev};

/// How a [`tx`] batch ended.
#[derive(Debug, Default)]
pub enum TxStop {
    /// No more chains available.
    #[default]
    Empty,
    /// `budget` chains were handled; more may be waiting.
    Budget,
    /// The ring is broken; the device needs a reset.
    RingError(String),
    /// The TAP failed in a way that will not heal (the interface is gone).
    Fault(io::Error),
}

/// What a [`tx`] batch did.
#[derive(Debug, Default)]
pub struct TxOutcome {
    /// Chains returned to the used ring (the caller notifies if > 0).
    pub used: usize,
    pub packets: u64,
    /// Frame bytes sent (headers not counted).
    pub bytes: u64,
    /// Well-formed packets the TAP refused (or that went nowhere after a fault).
    pub dropped: u64,
    /// Malformed chains.
    pub bad_chains: u64,
    /// The reason of the last malformed chain.
    pub last_bad: Option<BadChain>,
    pub stop: TxStop,
}

/// Writes up to `budget` transmit chains to `tap`, one writev per packet (header and frame as
/// the guest laid them out). With `tap` = None every chain is completed and dropped.
pub fn tx<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    tap: Option<BorrowedFd<'_>>,
    budget: usize,
) -> TxOutcome {
    let mut out = TxOutcome::default();
    let mut slices: Vec<Slice<'_, M>> = Vec::new();
    let mut guards: Vec<PtrGuard> = Vec::new();
    let mut iov: Vec<libc::iovec> = Vec::new();
    for _ in 0..budget {
        let chain = match pop(queue, mem) {
            Ok(Some(c)) => c,
            Ok(None) => return out,
            Err(e) => {
                out.stop = TxStop::RingError(format!("transmit queue: {e}"));
                return out;
            }
        };
        let head = chain.head_index();
        slices.clear();
        let mut fault = None;
        match gather(mem, chain, false, MAX_TX_LEN, &mut slices) {
            Err(why) => {
                out.bad_chains += 1;
                out.last_bad = Some(why);
            }
            Ok(len) => match tap {
                None => out.dropped += 1,
                Some(fd) => {
                    guards.clear();
                    guards.extend(slices.iter().map(|s| s.ptr_guard()));
                    iov.clear();
                    iov.extend(guards.iter().map(|g| libc::iovec {
                        iov_base: g.as_ptr() as *mut libc::c_void,
                        iov_len: g.len(),
                    }));
                    match writev(fd, &iov) {
                        Ok(_) => {
                            out.packets += 1;
                            out.bytes += (len - VNET_HDR_LEN) as u64;
                        }
                        Err(e) => {
                            out.dropped += 1;
                            if is_host_fault(&e) {
                                fault = Some(e);
                            } else {
                                log::debug!("virtio-net: a transmitted packet was refused: {e}");
                            }
                        }
                    }
                }
            },
        }
        // Transmit buffers are read-only: the used length is 0. A head outside the table cannot
        // be returned; it is skipped (and was counted as a bad chain above).
        if queue.add_used(mem, head, 0).is_ok() {
            out.used += 1;
        }
        if let Some(e) = fault {
            out.stop = TxStop::Fault(e);
            return out;
        }
    }
    out.stop = TxStop::Budget;
    out
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    use super::*;
    use crate::devices::net::chain::*;
    use crate::devices::net::testing::*;

    #[test]
    fn tx_sends_header_and_frame_in_one_packet() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 256);
        let (dev, host) = packet_pair();
        let hdr = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4);
        let frame = pattern(1500, 7);
        m.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        m.write_slice(&frame, GuestAddress(BUF)).unwrap();
        vq.add_desc_chains(
            &[
                d(HDR, VNET_HDR_LEN as u32, NEXT, 1),
                d(BUF, frame.len() as u32, 0, 0),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let o = tx(&mut q, &m, Some(dev.as_fd()), 256);
        assert!(matches!(o.stop, TxStop::Empty), "{:?}", o.stop);
        assert_eq!((o.used, o.packets, o.bytes), (1, 1, 1500));
        // The header passes through unchanged, offload requests included.
        assert_eq!(recv(&host).unwrap(), [hdr, frame].concat());
        assert_eq!(recv(&host), None);
        assert_eq!(used(&vq), vec![(0, 0)]);
    }

    #[test]
    fn tx_follows_indirect_tables() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 256);
        let (dev, host) = packet_pair();
        let (hdr, frame) = (header(0, 0), pattern(4000, 3));
        m.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        m.write_slice(&frame, GuestAddress(BUF)).unwrap();
        let table = GuestAddress(0x100000);
        m.write_obj(d(HDR, 12, NEXT, 1), table).unwrap();
        m.write_obj(d(BUF, 4000, 0, 0), table.unchecked_add(16))
            .unwrap();
        vq.add_desc_chains(&[d(table.0, 32, INDIRECT, 0)], 0)
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let o = tx(&mut q, &m, Some(dev.as_fd()), 256);
        assert_eq!((o.used, o.packets, o.bad_chains), (1, 1, 0));
        assert_eq!(recv(&host).unwrap(), [hdr, frame].concat());
    }

    #[test]
    fn tx_drops_hostile_chains_and_keeps_going() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 256);
        let (dev, host) = packet_pair();
        let chains: Vec<(u16, Vec<RawDescriptor>)> = vec![
            // A writable descriptor on the transmit queue.
            (0, vec![d(BUF, 100, WRITE, 0)]),
            // Zero length.
            (1, vec![d(BUF, 0, 0, 0)]),
            // Out of guest memory.
            (2, vec![d(MEM_SIZE - 10, 100, 0, 0)]),
            (3, vec![d(u64::MAX - 50, 100, 0, 0)]),
            // Larger than header + 64 KiB, and absurdly large.
            (4, vec![d(BUF, (MAX_TX_LEN + 1) as u32, 0, 0)]),
            (5, vec![d(BUF, u32::MAX, 0, 0)]),
            // A loop: 6 -> 7 -> 6 ...
            (6, vec![d(BUF, 100, NEXT, 7), d(BUF, 100, NEXT, 6)]),
            // `next` outside the table.
            (8, vec![d(BUF, 100, NEXT, 300)]),
            // A header and nothing else.
            (9, vec![d(BUF, VNET_HDR_LEN as u32, 0, 0)]),
            // Readable then writable.
            (10, vec![d(BUF, 100, NEXT, 11), d(BUF, 100, WRITE, 0)]),
            // A good one at the end.
            (12, vec![d(BUF, 60, 0, 0)]),
        ];
        for (at, c) in &chains {
            vq.add_desc_chains(c, *at).unwrap();
        }
        let mut q: Queue = vq.create_queue().unwrap();
        let o = tx(&mut q, &m, Some(dev.as_fd()), 256);
        assert!(matches!(o.stop, TxStop::Empty), "{:?}", o.stop);
        assert_eq!((o.used, o.packets, o.bad_chains), (11, 1, 10));
        let heads: Vec<(u32, u32)> = chains.iter().map(|(at, _)| (*at as u32, 0)).collect();
        assert_eq!(used(&vq), heads);
        assert_eq!(recv(&host).unwrap().len(), 60);
        assert_eq!(recv(&host), None);
    }

    #[test]
    fn tx_drops_chains_with_too_many_segments() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 256);
        let (dev, host) = packet_pair();
        // An indirect table of 1100 one-byte descriptors: small, but more than UIO_MAXIOV.
        let table = GuestAddress(0x100000);
        for i in 0..1100u16 {
            let flags = if i < 1099 { NEXT } else { 0 };
            m.write_obj(
                d(BUF, 1, flags, i + 1),
                table.unchecked_add(u64::from(i) * 16),
            )
            .unwrap();
        }
        vq.add_desc_chains(&[d(table.0, 1100 * 16, INDIRECT, 0)], 0)
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let o = tx(&mut q, &m, Some(dev.as_fd()), 256);
        assert_eq!((o.used, o.bad_chains), (1, 1));
        assert_eq!(o.last_bad, Some(BadChain::TooManySegments));
        assert_eq!(recv(&host), None);
    }

    #[test]
    fn tx_stops_on_a_runaway_avail_index() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 256);
        let (dev, host) = packet_pair();
        vq.add_desc_chains(&[d(BUF, 60, 0, 0)], 0).unwrap();
        vq.avail().idx().store(1000);
        let mut q: Queue = vq.create_queue().unwrap();
        let o = tx(&mut q, &m, Some(dev.as_fd()), 256);
        assert!(matches!(o.stop, TxStop::RingError(_)), "{:?}", o.stop);
        assert_eq!(o.used, 0);
        assert_eq!(recv(&host), None);
        assert!(used(&vq).is_empty());
    }

    #[test]
    fn tx_skips_a_head_outside_the_table() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 256);
        let (dev, _host) = packet_pair();
        vq.avail().ring().ref_at(0).unwrap().store(300);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        let o = tx(&mut q, &m, Some(dev.as_fd()), 256);
        assert!(matches!(o.stop, TxStop::Empty), "{:?}", o.stop);
        assert_eq!((o.used, o.bad_chains), (0, 1));
    }

    #[test]
    fn tx_without_a_tap_or_with_a_dead_one_drops() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 256);
        let (dev, host) = packet_pair();
        for i in 0..3 {
            vq.add_desc_chains(&[d(BUF, 60, 0, 0)], i).unwrap();
        }
        let mut q: Queue = vq.create_queue().unwrap();
        let o = tx(&mut q, &m, None, 1);
        assert!(matches!(o.stop, TxStop::Budget), "{:?}", o.stop);
        assert_eq!((o.used, o.dropped), (1, 1));
        drop(host);
        let o = tx(&mut q, &m, Some(dev.as_fd()), 256);
        assert!(
            matches!(&o.stop, TxStop::Fault(e) if is_host_fault(e)),
            "{:?}",
            o.stop
        );
        assert_eq!((o.used, o.dropped), (1, 1));
        let o = tx(&mut q, &m, None, 256);
        assert_eq!((o.used, o.dropped), (1, 1));
        assert_eq!(used(&vq).len(), 3);
    }
}
