//! MSI-X for any PCI function (PCI Local Bus 3.0 section 6.8.2): the vector table, the pending
//! bit array and the capability's control bits. A function puts the table and PBA in one of its
//! BARs and forwards accesses there; the vectors are the VM's ([`MsiVector`]: a GSI with an
//! irqfd). Used by the virtio-pci transport; non-virtio functions (TPM, xHCI) use it the same way.

use std::sync::Arc;

use crate::hw::MsiVector;
use crate::hw::pci::ConfigSpace;

/// MSI-X vectors, their table and pending bits.
#[derive(Debug)]
pub struct Msix {
    vectors: Vec<Arc<dyn MsiVector>>,
    /// (address, data, masked) as the guest wrote them.
    table: Vec<(u64, u32, bool)>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
}

impl Msix {
    /// A table for `vectors`, every entry masked, MSI-X disabled (the reset state).
    pub fn new(vectors: Vec<Arc<dyn MsiVector>>) -> Msix {
        Msix {
            table: vec![(0, 0, true); vectors.len()],
            pending: vec![false; vectors.len()],
            vectors,
            enabled: false,
            function_masked: false,
        }
    }

    /// The number of vectors.
    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && self.table.get(v).is_some_and(|e| !e.2)
    }

    /// Delivers vector `v`, or marks it pending while masked. Out-of-range vectors are ignored.
    pub fn fire(&mut self, v: u16) {
        let v = v as usize;
        if v >= self.vectors.len() {
            return;
        }
        if self.deliverable(v) {
            self.vectors[v].trigger();
        } else {
            self.pending[v] = true;
        }
    }

    /// Delivers what became deliverable (after an unmask or enable).
    fn flush_pending(&mut self) {
        for v in 0..self.vectors.len() {
            if self.pending[v] && self.deliverable(v) {
                self.pending[v] = false;
                self.vectors[v].trigger();
            }
        }
    }

    /// The capability's Message Control word was written: MSI-X enable (bit 15) and function
    /// mask (bit 14).
    pub fn set_control(&mut self, ctl: u16) {
        self.enabled = ctl & 0x8000 != 0;
        self.function_masked = ctl & 0x4000 != 0;
        self.flush_pending();
    }

    /// A read of the table at `offset` (16 bytes per entry; 4- or 8-byte accesses).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let (idx, field) = ((offset / 16) as usize, offset % 16);
        let Some(&(addr, msg, masked)) = self.table.get(idx) else {
            return data.fill(0);
        };
        let v: u64 = match (field, data.len()) {
            (0, 4) => addr & 0xffff_ffff,
            (4, 4) => addr >> 32,
            (0, 8) => addr,
            (8, 4) => u64::from(msg),
            (12, 4) => u64::from(masked),
            (8, 8) => u64::from(msg) | (u64::from(masked) << 32),
            _ => 0,
        };
        let n = data.len().min(8);
        data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
    }

    /// A write of the table at `offset`; a changed message is programmed into the vector.
    /// `who` names the function in logs.
    pub fn table_write(&mut self, offset: u64, data: &[u8], who: &str) {
        if data.len() > 8 {
            return;
        }
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        let (idx, field) = ((offset / 16) as usize, offset % 16);
        let Some(&(addr, msg, masked)) = self.table.get(idx) else {
            return;
        };
        let (addr, msg, masked) = match (field, data.len()) {
            (0, 4) => ((addr & !0xffff_ffff) | v, msg, masked),
            (4, 4) => ((addr & 0xffff_ffff) | (v << 32), msg, masked),
            (0, 8) => (v, msg, masked),
            (8, 4) => (addr, v as u32, masked),
            (12, 4) => (addr, msg, v & 1 == 1),
            (8, 8) => (addr, v as u32, (v >> 32) & 1 == 1),
            _ => return,
        };
        if (addr, msg) != (self.table[idx].0, self.table[idx].1)
            && let Err(e) = self.vectors[idx].set_message(addr, msg)
        {
            log::warn!("{who}: MSI-X vector {idx}: {e}");
        }
        self.table[idx] = (addr, msg, masked);
        self.flush_pending();
    }

    /// A read of the pending bit array at `offset`.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let base = (offset as usize + i) * 8;
            *d = (0..8)
                .filter(|b| self.pending.get(base + b).copied().unwrap_or(false))
                .fold(0, |acc, b| acc | (1 << b));
        }
    }
}

/// Writes an MSI-X capability at `at` (next capability `next`): `vectors` entries, table and PBA
/// at `table`/`pba` in BAR `bar`. Enable and function mask are the driver's to write.
pub fn write_capability(
    c: &mut ConfigSpace,
    at: u8,
    next: u8,
    vectors: u16,
    bar: u8,
    table: u64,
    pba: u64,
) {
    let m = at as usize;
    c.set_u8(m, 0x11);
    c.set_u8(m + 1, next);
    c.set_u16(m + 2, vectors - 1);
    c.set_writable_u16(m + 2, 0xc000);
    c.set_u32(m + 4, table as u32 | u32::from(bar & 7));
    c.set_u32(m + 8, pba as u32 | u32::from(bar & 7));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug, Default)]
    struct Counted(AtomicUsize);

    impl MsiVector for Counted {
        fn set_message(&self, _: u64, _: u32) -> Result<(), crate::hw::DeviceError> {
            Ok(())
        }
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn masked_vectors_pend_and_fire_on_unmask() {
        let v = Arc::new(Counted::default());
        let mut m = Msix::new(vec![v.clone()]);
        m.fire(0);
        assert_eq!(v.0.load(Ordering::SeqCst), 0, "disabled");
        let mut pba = [0u8; 1];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 1);
        m.set_control(0x8000);
        assert_eq!(v.0.load(Ordering::SeqCst), 0, "entry still masked");
        m.table_write(12, &0u32.to_le_bytes(), "t");
        assert_eq!(v.0.load(Ordering::SeqCst), 1, "fired on unmask");
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0);
        // Hostile accesses: out of range, odd sizes.
        m.fire(7);
        m.table_write(4096, &[1; 4], "t");
        m.table_write(0, &[1; 16], "t");
        let mut big = [0xffu8; 16];
        m.table_read(0, &mut big);
        m.table_read(3, &mut big[..4]);
    }
}
