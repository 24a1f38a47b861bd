//! The PCI hotplug controller: four 32-bit I/O port registers the guest's ACPI code (the DSDT's
//! `PCNT` and `_EJ0` methods, see backend/kvm/acpi.rs) reads and writes, and the interrupt
//! (a GED, ACPI0013) that tells the guest to look at them. Bit n of every register is slot n of
//! PCI bus 0.
//!
//! ```text
//! +0x0 UP       read   slots with a new function to announce; reading clears them
//! +0x4 DOWN     read   slots whose function the host wants back; reading clears them
//! +0x8 EJECT    write  slots the guest has released (it ran _EJ0); the host then removes them
//! +0xc PRESENT  read   hotplug slots holding a function
//! ```
//!
//! Only aligned 4-byte accesses reach a register; other accesses read all ones and are dropped.
//! The controller only records: it never touches the PCI bus itself, because guest writes arrive
//! on a vCPU thread that holds the I/O port bus lock. An eject is handed to the `on_eject`
//! callback, and the owner of the VM (the reconciler thread) removes the function.

use std::sync::Arc;

use crate::hw::Irq;
use crate::hw::bus::BusDevice;
use crate::sync::{Mutex, MutexGuard, Rank};

pub const REG_UP: u64 = 0x0;
pub const REG_DOWN: u64 = 0x4;
pub const REG_EJECT: u64 = 0x8;
pub const REG_PRESENT: u64 = 0xc;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Regs {
    up: u32,
    down: u32,
    present: u32,
    /// Slots the host asked the guest to release and that it has not ejected yet.
    removing: u32,
}

/// Hears of the guest's ejects (bitmap of slots), on a vCPU thread.
pub type EjectFn = Box<dyn Fn(u32) + Send>;

/// The state shared by the port device (guest side) and the VM's owner (host side).
pub struct Hotplug {
    regs: Mutex<Regs>,
    /// Slots that can be hot-plugged at all.
    slots: u32,
    irq: Arc<dyn Irq>,
    on_eject: Mutex<Option<EjectFn>>,
}

impl std::fmt::Debug for Hotplug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hotplug")
            .field("slots", &format_args!("{:#x}", self.slots))
            .field("irq", &self.irq)
            .finish_non_exhaustive()
    }
}

impl Hotplug {
    /// A controller for the hotplug slots in the bitmap `slots`, signalling on `irq`.
    pub fn new(slots: u32, irq: Arc<dyn Irq>) -> Arc<Hotplug> {
        Arc::new(Hotplug {
            regs: Mutex::new(Rank::DeviceState, Regs::default()),
            slots,
            irq,
            // The callback runs under it and may take a leaf lock.
            on_eject: Mutex::new(Rank::DeviceState, None),
        })
    }

    fn regs(&self) -> MutexGuard<'_, Regs> {
        self.regs.lock()
    }

    /// Who hears of ejects: called with the slots the guest released, on the vCPU's thread
    /// (it must only hand them on).
    pub fn set_on_eject(&self, f: EjectFn) {
        *self.on_eject.lock() = Some(f);
    }

    fn bit(&self, slot: u8) -> Option<u32> {
        let b = 1u32.checked_shl(u32::from(slot))?;
        (self.slots & b != 0).then_some(b)
    }

    /// A function was in `slot` when the VM started (the guest finds it by scanning the bus).
    pub fn set_present(&self, slot: u8) {
        if let Some(b) = self.bit(slot) {
            self.regs().present |= b;
        }
    }

    /// A function is now in `slot`: tell the guest. False if `slot` is not a hotplug slot.
    pub fn announce(&self, slot: u8) -> bool {
        let Some(b) = self.bit(slot) else {
            return false;
        };
        {
            let mut r = self.regs();
            r.present |= b;
            r.up |= b;
            r.down &= !b;
            r.removing &= !b;
        }
        self.irq.trigger();
        true
    }

    /// Asks the guest to release the function in `slot` (it answers by ejecting it). Asking
    /// again signals again: a guest that missed the first request gets another chance.
    pub fn request_removal(&self, slot: u8) -> bool {
        let Some(b) = self.bit(slot) else {
            return false;
        };
        {
            let mut r = self.regs();
            if r.present & b == 0 {
                return false;
            }
            r.down |= b;
            r.up &= !b;
            r.removing |= b;
        }
        self.irq.trigger();
        true
    }

    /// The function in `slot` is gone (the host removed it).
    pub fn removed(&self, slot: u8) {
        if let Some(b) = self.bit(slot) {
            let mut r = self.regs();
            r.present &= !b;
            r.up &= !b;
            r.down &= !b;
            r.removing &= !b;
        }
    }

    /// Slots with a removal request the guest has not answered.
    #[cfg(test)]
    fn removing(&self) -> u32 {
        self.regs().removing
    }

    fn guest_read(&self, offset: u64) -> u32 {
        let mut r = self.regs();
        match offset {
            REG_UP => std::mem::take(&mut r.up),
            REG_DOWN => std::mem::take(&mut r.down),
            REG_PRESENT => r.present,
            _ => 0,
        }
    }

    fn guest_write(&self, offset: u64, value: u32) {
        if offset != REG_EJECT {
            return;
        }
        let ejected = {
            let mut r = self.regs();
            let ejected = value & r.removing;
            r.removing &= !ejected;
            ejected
        };
        let ignored = value & self.slots & !ejected;
        if ignored != 0 {
            // A guest-initiated eject of a device the machine file still has: the file is
            // the truth, so the function stays (the guest can rescan to get it back).
            log::info!(
                "the guest ejected slot(s) {ignored:#x}, which the machine file still has: ignored"
            );
        }
        if ejected != 0
            && let Some(f) = &*self.on_eject.lock()
        {
            f(ejected);
        }
    }
}

/// The controller's ports on the I/O bus.
#[derive(Debug)]
pub struct HotplugPorts(pub Arc<Hotplug>);

impl BusDevice for HotplugPorts {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.0.guest_read(offset).to_le_bytes());
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Ok(v) = <[u8; 4]>::try_from(data)
            && offset.is_multiple_of(4)
        {
            self.0.guest_write(offset, u32::from_le_bytes(v));
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    use crate::testing::Count;

    type Setup = (Arc<Hotplug>, HotplugPorts, Arc<Count>, Arc<Mutex<Vec<u32>>>);

    fn setup() -> Setup {
        let irq = Arc::new(Count::default());
        let hp = Hotplug::new(0b11 << 30, irq.clone());
        let seen = Arc::new(Mutex::new(Rank::Leaf, Vec::new()));
        let s = seen.clone();
        hp.set_on_eject(Box::new(move |b| s.lock().push(b)));
        (hp.clone(), HotplugPorts(hp), irq, seen)
    }

    fn rd(p: &mut HotplugPorts, off: u64) -> u32 {
        let mut v = [0u8; 4];
        p.read(0, off, &mut v);
        u32::from_le_bytes(v)
    }

    #[test]
    fn plug_is_announced_once_and_unplug_waits_for_the_eject() {
        let (hp, mut p, irq, seen) = setup();
        assert!(hp.announce(31));
        assert_eq!(irq.get(), 1);
        assert_eq!(rd(&mut p, REG_UP), 1 << 31);
        assert_eq!(rd(&mut p, REG_UP), 0, "reading UP clears it");
        assert_eq!(rd(&mut p, REG_PRESENT), 1 << 31);

        assert!(hp.request_removal(31));
        assert_eq!(irq.get(), 2);
        assert_eq!(rd(&mut p, REG_DOWN), 1 << 31);
        assert_eq!(rd(&mut p, REG_DOWN), 0);
        assert_eq!(hp.removing(), 1 << 31);
        assert!(seen.lock().is_empty(), "no eject before the guest's");
        p.write(0, REG_EJECT, &(1u32 << 31).to_le_bytes());
        assert_eq!(*seen.lock(), vec![1 << 31]);
        assert_eq!(hp.removing(), 0);
        // A second eject of the same slot is not a second removal.
        p.write(0, REG_EJECT, &(1u32 << 31).to_le_bytes());
        assert_eq!(seen.lock().len(), 1);
        hp.removed(31);
        assert_eq!(rd(&mut p, REG_PRESENT), 0);
    }

    #[test]
    fn only_hotplug_slots_and_requested_ejects_count() {
        let (hp, mut p, irq, seen) = setup();
        assert!(!hp.announce(3), "slot 3 is not a hotplug slot");
        assert!(!hp.announce(200));
        assert!(!hp.request_removal(30), "nothing in slot 30");
        assert_eq!(irq.get(), 0);
        hp.announce(30);
        // The guest ejects on its own (and slots that do not exist): ignored.
        p.write(0, REG_EJECT, &u32::MAX.to_le_bytes());
        assert!(seen.lock().is_empty());
        assert_eq!(rd(&mut p, REG_PRESENT), 1 << 30);
    }

    #[test]
    fn odd_accesses_read_all_ones_and_change_nothing() {
        let (hp, mut p, _, seen) = setup();
        hp.announce(31);
        hp.request_removal(31);
        for len in [1usize, 2, 3, 8] {
            let mut b = vec![0u8; len];
            p.read(0, 0, &mut b);
            assert!(b.iter().all(|&x| x == 0xff));
            p.write(0, REG_EJECT, &vec![0xff; len]);
        }
        let mut b = [0u8; 4];
        p.read(0, 2, &mut b);
        assert_eq!(b, [0xff; 4]);
        p.write(0, REG_EJECT + 2, &[0xff; 4]);
        p.write(0, 0x40, &[0xff; 4]);
        assert!(seen.lock().is_empty());
        assert_eq!(hp.removing(), 1 << 31);
        assert_eq!(rd(&mut p, 0x40), 0, "unknown register reads 0");
    }
}
