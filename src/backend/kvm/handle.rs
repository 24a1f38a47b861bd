//! Runtime services devices get from the VM: GSI routing (IOAPIC pins and MSI messages),
//! irqfds, ioeventfds, and MMIO range moves deferred until no bus lock is held.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KvmIrqRouting, kvm_irq_routing_entry,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::hw::bus::{Bus, SharedDevice};
use crate::hw::{DeviceError, MsiVector, VmHandle};
use crate::sync::{Mutex, Rank, RwLock};

/// IOAPIC pins of KVM's in-kernel IOAPIC; MSI vectors get the GSIs above.
pub const IOAPIC_PINS: u32 = 24;
const KVM_IRQCHIP_IOAPIC: u32 = 2;
/// KVM's default routing table size limit is 4096 (KVM_CAP_IRQ_ROUTING answers it).
const MAX_GSI: u32 = 4096;

/// The VM's GSI routing table, written to KVM whole on every change.
#[derive(Debug)]
struct Routing {
    /// MSI routes: gsi → (address, data), once the guest programmed them.
    msi: BTreeMap<u32, (u64, u32)>,
    next_gsi: u32,
    /// GSIs of dropped vectors, reused first (unplug/plug cycles must not run out).
    free: Vec<u32>,
}

#[derive(Debug)]
pub struct KvmHandle {
    vm: Arc<VmFd>,
    routing: Mutex<Routing>,
    mmio: Arc<RwLock<Bus>>,
    moves: Mutex<Vec<(u64, u64, u64, SharedDevice)>>,
    pending: AtomicBool,
}

impl KvmHandle {
    /// Installs the IOAPIC-only routing of the 24 pins (no PIC: see docs/architecture.md).
    pub fn new(vm: Arc<VmFd>, mmio: Arc<RwLock<Bus>>) -> Result<Arc<KvmHandle>, kvm_ioctls::Error> {
        let h = Arc::new(KvmHandle {
            vm,
            routing: Mutex::new(
                Rank::MsiRouting,
                Routing {
                    msi: BTreeMap::new(),
                    next_gsi: IOAPIC_PINS,
                    free: Vec::new(),
                },
            ),
            mmio,
            moves: Mutex::new(Rank::Leaf, Vec::new()),
            pending: AtomicBool::new(false),
        });
        h.write_routing(&h.routing.lock())?;
        Ok(h)
    }

    fn write_routing(&self, r: &Routing) -> Result<(), kvm_ioctls::Error> {
        let n = IOAPIC_PINS as usize + r.msi.len();
        let mut table = KvmIrqRouting::new(n).map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))?;
        let entries = table.as_mut_slice();
        for pin in 0..IOAPIC_PINS {
            let e = &mut entries[pin as usize];
            *e = kvm_irq_routing_entry {
                gsi: pin,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
            e.u.irqchip.pin = pin;
        }
        for (i, (&gsi, &(addr, data))) in r.msi.iter().enumerate() {
            let e = &mut entries[IOAPIC_PINS as usize + i];
            *e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = addr as u32;
            e.u.msi.address_hi = (addr >> 32) as u32;
            e.u.msi.data = data;
        }
        self.vm.set_gsi_routing(&table)
    }

    /// Applies MMIO moves asked for during an exit; called by vCPU threads holding no lock.
    pub fn apply_moves(&self) {
        if !self.pending.swap(false, Ordering::SeqCst) {
            return;
        }
        let moves: Vec<_> = std::mem::take(&mut *self.moves.lock());
        let mut bus = self.mmio.write();
        for (from, to, len, dev) in moves {
            bus.remove(from);
            if let Err(e) = bus.insert(to, len, dev) {
                log::warn!(
                    "cannot map {len:#x} bytes at {to:#x}: {e}; the device is unreachable until moved again"
                );
            }
        }
    }

    pub fn has_moves(&self) -> bool {
        self.pending.load(Ordering::Relaxed)
    }
}

/// An MSI vector: a GSI with an irqfd; its route is installed when the guest programs it.
#[derive(Debug)]
struct KvmMsi {
    handle: Arc<KvmHandle>,
    gsi: u32,
    evt: EventFd,
}

impl Routing {
    /// Sets (or with `addr` 0, removes) the MSI route of `gsi` and writes the table with
    /// `write`. A table KVM refused is not kept: the route stays as it was, so one bad message
    /// cannot break every later update of the VM's routing.
    fn set<E>(
        &mut self,
        gsi: u32,
        addr: u64,
        data: u32,
        write: impl FnOnce(&Routing) -> Result<(), E>,
    ) -> Result<(), E> {
        let old = if addr == 0 {
            self.msi.remove(&gsi)
        } else {
            self.msi.insert(gsi, (addr, data))
        };
        let r = write(self);
        if r.is_err() {
            match old {
                Some(m) => self.msi.insert(gsi, m),
                None => self.msi.remove(&gsi),
            };
        }
        r
    }
}

impl MsiVector for KvmMsi {
    fn set_message(&self, addr: u64, data: u32) -> Result<(), DeviceError> {
        let mut r = self.handle.routing.lock();
        r.set(self.gsi, addr, data, |t| self.handle.write_routing(t))
            .map_err(|e| DeviceError(format!("KVM_SET_GSI_ROUTING: {e}")))
    }

    fn trigger(&self) {
        if let Err(e) = self.evt.write(1) {
            log::warn!("MSI on GSI {}: {e}", self.gsi);
        }
    }
}

impl Drop for KvmMsi {
    fn drop(&mut self) {
        let _ = self.handle.vm.unregister_irqfd(&self.evt, self.gsi);
        let mut r = self.handle.routing.lock();
        if r.msi.remove(&self.gsi).is_some() {
            let _ = self.handle.write_routing(&r);
        }
        r.free.push(self.gsi);
    }
}

/// The `VmHandle` of a KVM VM (an `Arc<KvmHandle>` wrapper so MSI vectors can hold it).
#[derive(Debug)]
pub struct Handle(pub Arc<KvmHandle>);

impl VmHandle for Handle {
    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), DeviceError> {
        self.0
            .vm
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| DeviceError(format!("KVM_IOEVENTFD: {e}")))
    }

    fn unregister_ioevent(&self, evt: &EventFd, addr: u64) -> Result<(), DeviceError> {
        self.0
            .vm
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| DeviceError(format!("KVM_IOEVENTFD: {e}")))
    }

    fn msi_vector(&self) -> Result<Arc<dyn MsiVector>, DeviceError> {
        let gsi = {
            let mut r = self.0.routing.lock();
            match r.free.pop() {
                Some(g) => g,
                None if r.next_gsi < MAX_GSI => {
                    r.next_gsi += 1;
                    r.next_gsi - 1
                }
                None => return Err(DeviceError("out of interrupt routes (GSIs)".into())),
            }
        };
        let evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceError(format!("eventfd: {e}")))?;
        self.0
            .vm
            .register_irqfd(&evt, gsi)
            .map_err(|e| DeviceError(format!("KVM_IRQFD on GSI {gsi}: {e}")))?;
        Ok(Arc::new(KvmMsi {
            handle: self.0.clone(),
            gsi,
            evt,
        }))
    }

    fn move_mmio(&self, from: u64, to: u64, len: u64, dev: SharedDevice) {
        self.0.moves.lock().push((from, to, len, dev));
        self.0.pending.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_routing_table_kvm_refused_is_not_kept() {
        let mut r = Routing {
            msi: BTreeMap::new(),
            next_gsi: IOAPIC_PINS,
            free: Vec::new(),
        };
        let ok = |_: &Routing| Ok::<(), ()>(());
        r.set(24, 0xfee0_0000, 0x41, ok).unwrap();
        // KVM refuses the table with this message: the route stays as it was.
        let refuse = |_: &Routing| Err(());
        assert!(r.set(24, 0xdead_0000, 7, refuse).is_err());
        assert!(r.set(25, 0xdead_0000, 7, refuse).is_err());
        assert_eq!(r.msi, BTreeMap::from([(24, (0xfee0_0000, 0x41))]));
        // The next update writes a table without the refused routes.
        let mut written = None;
        r.set(26, 0xfee0_1000, 0x42, |t: &Routing| {
            written = Some(t.msi.clone());
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(
            written.unwrap(),
            BTreeMap::from([(24, (0xfee0_0000, 0x41)), (26, (0xfee0_1000, 0x42))])
        );
        // Removing, refused, keeps the route; accepted, drops it.
        assert!(r.set(24, 0, 0, refuse).is_err());
        assert!(r.msi.contains_key(&24));
        r.set(24, 0, 0, ok).unwrap();
        assert!(!r.msi.contains_key(&24));
    }
}
