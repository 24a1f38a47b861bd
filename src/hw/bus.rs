//! The I/O port and MMIO buses: address ranges mapped to devices.
//!
//! A device sees accesses relative to the range it was registered at; a device registered at
//! several ranges (the i8042 at 0x60 and 0x64) is told which one by `base`. Accesses nobody
//! claims are answered by the bus: reads return all ones, writes are dropped. Nothing a guest
//! writes here can panic vmm.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::sync::{Mutex, MutexGuard};

/// A device on a bus.
pub trait BusDevice: Send + std::fmt::Debug {
    /// A guest read of `data.len()` bytes (1, 2, 4 or 8) at `base + offset`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// A guest write at `base + offset`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("Range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
    #[error("Empty range at {0:#x}")]
    Empty(u64),
}

/// Address ranges and their devices.
#[derive(Debug, Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Maps `[base, base + len)` to `dev`.
    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base.checked_add(len).ok_or(BusError::Empty(base))?;
        // The range starting at or below `end - 1` that is closest must end at or below `base`.
        if let Some((&b, &(l, _))) = self.ranges.range(..end).next_back()
            && b + l > base
        {
            return Err(BusError::Overlap {
                base,
                len,
                other_base: b,
                other_len: l,
            });
        }
        self.ranges.insert(base, (len, dev));
        Ok(())
    }

    /// Unmaps the range starting at `base`; returns its device.
    pub fn remove(&mut self, base: u64) -> Option<SharedDevice> {
        self.ranges.remove(&base).map(|(_, d)| d)
    }

    /// Unmaps every range of `dev`, wherever the guest moved it; returns how many.
    pub fn remove_device(&mut self, dev: &SharedDevice) -> usize {
        let before = self.ranges.len();
        self.ranges.retain(|_, (_, d)| !Arc::ptr_eq(d, dev));
        before - self.ranges.len()
    }

    /// The device covering `addr..addr + size`, with its range base.
    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&b, (l, d)) = self.ranges.range(..=addr).next_back()?;
        let end = addr.checked_add(size as u64)?;
        (end <= b + l).then_some((b, d))
    }

    /// Dispatches a read; returns false (and all-ones data) when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, dev)) => {
                lock(dev).read(base, addr - base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, dev)) => {
                lock(dev).write(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(&b, &(l, _))| (b, l))
    }
}

/// Locks a device (rank [`crate::sync::Rank::BusDevice`], or `PciFunction` for a BAR).
pub fn lock(dev: &SharedDevice) -> MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::Rank;

    #[derive(Debug)]
    struct Rec(Vec<(u64, u64, Vec<u8>)>);
    impl BusDevice for Rec {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            data.fill((base + offset) as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.0.push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_overlap_and_unmapped() {
        let dev: Arc<Mutex<Rec>> = Arc::new(Mutex::new(Rank::BusDevice, Rec(Vec::new())));
        let mut bus = Bus::new();
        bus.insert(0x60, 1, dev.clone()).unwrap();
        bus.insert(0x64, 1, dev.clone()).unwrap();
        assert!(matches!(
            bus.insert(0x5f, 2, dev.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0x64, 1, dev.clone()),
            Err(BusError::Overlap { .. })
        ));
        assert_eq!(bus.insert(0x70, 0, dev.clone()), Err(BusError::Empty(0x70)));
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(dev.lock().0, vec![(0x64, 0, vec![0xfe])]);
        let mut b = [0u8; 1];
        assert!(bus.read(0x60, &mut b));
        assert_eq!(b, [0x60]);
        // Unmapped and straddling accesses are answered with ones and dropped.
        let mut w = [0u8; 2];
        assert!(!bus.read(0x64, &mut w));
        assert_eq!(w, [0xff, 0xff]);
        assert!(!bus.read(0x61, &mut b));
        assert!(!bus.write(u64::MAX, &[1]));
        assert!(bus.remove(0x60).is_some());
        assert!(!bus.read(0x60, &mut b));
    }
}
