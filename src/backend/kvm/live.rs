//! The running VM as its owner (the reconciler) sees it: plug a device into a hotplug slot,
//! ask the guest to release one, remove it once released, stop the VM.
//!
//! Every call here runs on the owner's thread with no bus lock held: it takes the PCI root,
//! then the MMIO bus, each briefly (lock order: bus, then device — never the other way).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::graph::{DeviceNode, Placement};
use crate::hw::bus::{Bus, SharedDevice};
use crate::hw::char_io::{CharInput, CharIo, CharOut};
use crate::hw::hotplug::Hotplug;
use crate::hw::pci::{PciRoot, SharedFunction};
use crate::hw::virtio::GuestMem;
use crate::hw::{DeviceError, Irq, Machine, VmControl, VmHandle};
use crate::sync::{Mutex, RwLock};

use super::handle::{Handle, KvmHandle};
use super::vcpu::{ExitState, Outcome};

/// A function plugged into a slot: what removing it must unmap.
#[derive(Debug)]
pub(super) struct Plugged {
    pub function: SharedFunction,
    pub bar_device: SharedDevice,
}

/// Plugs a function into bus 0 and maps its BAR; the slot must be empty.
///
/// The PCI root and the MMIO bus are taken one after the other, never together: a vCPU in an
/// ECAM access holds the bus and then takes the root (the lock order, docs/architecture.md).
/// Only the VM's owner plugs and removes functions (one thread), so the slot cannot be taken
/// between the look and the plug. The BAR is mapped first: the guest can reach the BAR only
/// after it found the function in the slot.
pub(super) fn attach_pci(
    pci: &Mutex<PciRoot>,
    mmio: &RwLock<Bus>,
    slot: u8,
    function: SharedFunction,
    bar: (u64, u64),
    bar_device: SharedDevice,
) -> Result<(), DeviceError> {
    if slot == 0 || pci.lock().occupied(slot) {
        return Err(DeviceError(format!("PCI slot {slot} is taken")));
    }
    mmio.write().insert(bar.0, bar.1, bar_device).map_err(|e| {
        DeviceError(format!(
            "the BAR window of slot {slot} is in use ({e}); the guest may have moved another device there"
        ))
    })?;
    pci.lock().plug(slot, function);
    Ok(())
}

/// The running VM's hotplug side.
#[derive(Debug)]
pub struct LiveVm {
    pub(super) machine: String,
    pub(super) base_dir: PathBuf,
    pub(super) ram: (u64, u64),
    pub(super) handle: Arc<KvmHandle>,
    pub(super) mem: GuestMem,
    pub(super) pci: Arc<Mutex<PciRoot>>,
    pub(super) mmio: Arc<RwLock<Bus>>,
    pub(super) exit: Arc<ExitState>,
    pub(super) hotplug: Option<Arc<Hotplug>>,
    pub(super) plugged: Mutex<HashMap<u8, Plugged>>,
    /// Character devices whose output can be dropped, and the count.
    pub(super) outputs: Vec<(String, Arc<std::sync::atomic::AtomicU64>)>,
    /// Devices that can fail while the VM runs.
    pub(super) health: Mutex<Vec<Watched>>,
}

/// A device whose failure `vmm status` shows.
#[derive(Clone)]
pub(super) struct Watched {
    pub name: String,
    /// Its hotplug slot when it was plugged at run time (its entry goes with it).
    pub slot: Option<u8>,
    pub health: crate::hw::Health,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Watched({})", self.name)
    }
}

impl LiveVm {
    fn hotplug(&self) -> Result<&Arc<Hotplug>, DeviceError> {
        self.hotplug
            .as_ref()
            .ok_or_else(|| DeviceError("the machine has no hotplug slots".into()))
    }

    /// Who hears of the guest's ejects (bitmap of slots), on a vCPU thread: hand them on only.
    pub fn on_eject(&self, f: Box<dyn Fn(u32) + Send>) {
        if let Some(h) = &self.hotplug {
            h.set_on_eject(f);
        }
    }

    /// Builds `node` into its hotplug slot and tells the guest.
    pub fn plug(&self, node: &DeviceNode) -> Result<(), DeviceError> {
        let hp = self.hotplug()?.clone();
        let Placement::Pci {
            slot,
            hotplug: true,
            ..
        } = node.placement
        else {
            return Err(DeviceError(format!(
                "`{}` is not placed in a hotplug slot",
                node.name
            )));
        };
        let mut m = LiveMachine {
            vm: self,
            slot,
            added: None,
        };
        node.spec.device().build(&node.placement, &mut m)?;
        if m.added.is_none() {
            return Err(DeviceError(format!(
                "`{}` added no PCI function",
                node.name
            )));
        }
        log::debug!(
            "hotplug: slot {slot} signalled at monotonic {:.6}",
            monotonic_secs()
        );
        hp.announce(slot);
        Ok(())
    }

    /// Asks the guest to release the device in `slot` (again, if it was asked before).
    pub fn request_unplug(&self, slot: u8) -> Result<(), DeviceError> {
        let hp = self.hotplug()?;
        if hp.request_removal(slot) {
            log::debug!(
                "hotplug: slot {slot} removal signalled at monotonic {:.6}",
                monotonic_secs()
            );
            Ok(())
        } else {
            Err(DeviceError(format!("hotplug slot {slot} is empty")))
        }
    }

    /// Removes the function in `slot` (the guest released it): unmaps its BAR, drops it (its
    /// worker stops, its TAP closes, its MSI vectors and ioeventfds go). Returns whether the
    /// function is gone for good (no reference left anywhere).
    pub fn remove(&self, slot: u8) -> Result<bool, DeviceError> {
        let p = self
            .plugged
            .lock()
            .remove(&slot)
            .ok_or_else(|| DeviceError(format!("slot {slot} holds no device")))?;
        // A BAR move the guest asked for must not map the device again afterwards.
        self.handle.apply_moves();
        self.pci.lock().unplug(slot);
        self.mmio.write().remove_device(&p.bar_device);
        self.health.lock().retain(|w| w.slot != Some(slot));
        if let Some(h) = &self.hotplug {
            h.removed(slot);
        }
        let Plugged {
            function,
            bar_device,
        } = p;
        drop(function);
        let last = Arc::strong_count(&bar_device) == 1;
        drop(bar_device);
        Ok(last)
    }

    /// Bytes of output each character device has dropped (a terminal, pipe or socket client
    /// that did not keep up).
    pub fn dropped_output(&self) -> Vec<(String, u64)> {
        self.outputs
            .iter()
            .map(|(n, c)| (n.clone(), c.load(std::sync::atomic::Ordering::Relaxed)))
            .collect()
    }

    /// The devices that failed, and why.
    pub fn device_errors(&self) -> Vec<(String, String)> {
        // Copied out first: a device's health takes its own (DeviceState) lock.
        let watched = self.health.lock().clone();
        watched
            .into_iter()
            .filter_map(|w| (w.health)().map(|why| (w.name, why)))
            .collect()
    }

    /// Ends the VM (`vmm stop`).
    pub fn stop(&self, why: &str) {
        self.exit.finish(Outcome::Stopped(why.to_string()));
    }
}

/// CLOCK_MONOTONIC in seconds: the clock benchmarks compare log lines against.
pub fn monotonic_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The VM as a device built at run time sees it: PCI and memory, no new ports, interrupt lines
/// or character devices.
struct LiveMachine<'a> {
    vm: &'a LiveVm,
    slot: u8,
    added: Option<u8>,
}

impl Machine for LiveMachine<'_> {
    fn machine_name(&self) -> &str {
        &self.vm.machine
    }
    fn irq_line(&mut self, _pin: u8) -> Result<Arc<dyn Irq>, DeviceError> {
        Err(DeviceError(
            "devices with interrupt lines cannot be added while the VM runs".into(),
        ))
    }
    fn vm_control(&self) -> Arc<dyn VmControl> {
        self.vm.exit.clone()
    }
    fn add_pio(&mut self, _: u16, _: u16, _: SharedDevice) -> Result<(), DeviceError> {
        Err(DeviceError(
            "I/O port devices cannot be added while the VM runs".into(),
        ))
    }
    fn ram(&self) -> (u64, u64) {
        self.vm.ram
    }
    fn base_dir(&self) -> &Path {
        &self.vm.base_dir
    }
    fn vm_handle(&self) -> Arc<dyn VmHandle> {
        Arc::new(Handle(self.vm.handle.clone()))
    }
    fn guest_memory(&self) -> GuestMem {
        self.vm.mem.clone()
    }
    fn add_pci(
        &mut self,
        slot: u8,
        function: SharedFunction,
        bar: (u64, u64),
        bar_device: SharedDevice,
    ) -> Result<(), DeviceError> {
        if slot != self.slot || self.added.is_some() {
            return Err(DeviceError(format!(
                "a device plugged at run time may only take its own slot {}",
                self.slot
            )));
        }
        attach_pci(
            &self.vm.pci,
            &self.vm.mmio,
            slot,
            function.clone(),
            bar,
            bar_device.clone(),
        )?;
        self.vm.plugged.lock().insert(
            slot,
            Plugged {
                function,
                bar_device,
            },
        );
        self.added = Some(slot);
        Ok(())
    }
    fn open_char(
        &mut self,
        _: &str,
        _: &CharIo,
        _: Arc<dyn CharInput>,
    ) -> Result<CharOut, DeviceError> {
        Err(DeviceError(
            "character devices cannot be added while the VM runs".into(),
        ))
    }
    fn watch_health(&mut self, name: &str, health: crate::hw::Health) {
        let mut h = self.vm.health.lock();
        h.retain(|w| w.name != name);
        h.push(Watched {
            name: name.to_string(),
            slot: Some(self.slot),
            health,
        });
    }
}
