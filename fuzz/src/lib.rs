//! What the fuzz targets share: guest memory whose every byte comes from the input, and a
//! queue laid out in it.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory size: descriptor table, rings and buffers all live in it.
pub const MEM: usize = 64 << 10;
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;

/// 64 KiB of guest memory filled with `data` (repeated), and a ready queue of `size` entries
/// whose descriptor table and rings are in it: every descriptor, index and buffer is the
/// fuzzer's.
pub fn guest(data: &[u8], size: u16) -> (GuestMemoryMmap<()>, Queue) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    if !data.is_empty() {
        let mut buf = vec![0u8; MEM];
        for (i, b) in buf.iter_mut().enumerate() {
            *b = data[i % data.len()];
        }
        mem.write_slice(&buf, GuestAddress(0)).unwrap();
    }
    let size = size.clamp(1, 256).next_power_of_two();
    let mut q = Queue::new(256).unwrap();
    q.set_size(size);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    (mem, q)
}

/// Reads little-endian values off the front of the input.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    pub fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from(self.u16()?) | (u32::from(self.u16()?) << 16))
    }
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from(self.u32()?) | (u64::from(self.u32()?) << 32))
    }
    pub fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}
