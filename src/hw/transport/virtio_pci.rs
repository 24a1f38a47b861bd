//! Modern virtio-pci transport (virtio 1.2 section 4.1): the only code that knows BARs, PCI
//! capabilities and MSI-X. It turns a [`VirtioDevice`] into a PCI function.
//!
//! Layout of the single 64-bit memory BAR (BAR 0) every virtio-pci function gets:
//!
//! | offset   | structure                                      |
//! |----------|------------------------------------------------|
//! | 0x0000   | common configuration (virtio_pci_common_cfg)   |
//! | 0x1000   | ISR status                                     |
//! | 0x2000   | device-specific configuration                  |
//! | 0x3000   | notifications, 4 bytes per queue (ioeventfds)  |
//! | 0x4000   | MSI-X table, 16 bytes per vector               |
//! | 0x6000   | MSI-X pending bit array                        |
//!
//! Queue size and addresses are frozen once a queue is enabled, and everything is frozen once
//! the driver sets DRIVER_OK, until a reset. Accesses of odd widths or outside the structures
//! read as zero and are dropped. No INTx: interrupts are MSI-X only.

use std::sync::{Arc, Weak};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::contract::VirtioInfo;
use crate::hw::bus::BusDevice;
use crate::hw::msix::{self, Msix};
use crate::hw::pci::{ConfigSpace, PciFunction};
use crate::hw::virtio::{
    Activation, ActiveQueue, GuestMem, NeedsReset, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK,
    STATUS_FAILED, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1, VirtioDevice,
};
use crate::hw::{Irq, VmHandle};
use crate::sync::{Mutex, Rank};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + virtio device type.
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;

pub const COMMON_CFG_OFFSET: u64 = 0x0000;
pub const COMMON_CFG_LEN: u64 = 0x38;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const DEVICE_CFG_LEN: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Size of BAR 0 (a power of two, as PCI requires).
pub const BAR0_SIZE: u64 = 0x8000;

/// Most queues a function supports: the MSI-X table holds 512 vectors, one is for configuration.
pub const MAX_QUEUES: u16 = 511;

/// "No vector" in MSI-X vector registers.
pub const NO_VECTOR: u16 = 0xffff;

/// The resources a virtio-pci function with `queues` virtqueues takes: BAR 0's size and the
/// number of MSI-X vectors (one per queue plus one for configuration changes).
pub fn resources(queues: u16) -> (u64, u16) {
    (BAR0_SIZE, queues.min(MAX_QUEUES) + 1)
}

// PCI capability layout.
const CAP_COMMON: u8 = 0x40;
const CAP_NOTIFY: u8 = 0x50;
const CAP_ISR: u8 = 0x64;
const CAP_DEVICE: u8 = 0x74;
const CAP_PCI_CFG: u8 = 0x84;
const CAP_MSIX: u8 = 0x98;
const MSIX_CONTROL: usize = CAP_MSIX as usize + 2;
const PCI_CFG_DATA: usize = CAP_PCI_CFG as usize + 16;

/// Per-queue transport state.
#[derive(Debug)]
struct QueueState {
    queue: Queue,
    vector: u16,
    kick: Arc<EventFd>,
}

/// Interrupt state shared with the interrupt handles given to the device.
#[derive(Debug)]
struct IrqState {
    msix: Mutex<Msix>,
    /// Queue vectors as programmed (index = queue).
    queue_vectors: Mutex<Vec<u16>>,
    config_vector: Mutex<u16>,
    isr: Mutex<u8>,
    status: Mutex<u8>,
}

/// A queue's interrupt: fires the queue's current vector.
#[derive(Debug)]
struct QueueIrq {
    state: Arc<IrqState>,
    queue: usize,
}

impl Irq for QueueIrq {
    fn trigger(&self) {
        let v = self.state.queue_vectors.lock().get(self.queue).copied();
        *self.state.isr.lock() |= 1;
        if let Some(v) = v.filter(|&v| v != NO_VECTOR) {
            self.state.msix.lock().fire(v);
        }
    }
}

/// The configuration-change interrupt.
#[derive(Debug)]
struct ConfigIrq(Arc<IrqState>);

impl Irq for ConfigIrq {
    fn trigger(&self) {
        *self.0.isr.lock() |= 2;
        let v = *self.0.config_vector.lock();
        if v != NO_VECTOR {
            self.0.msix.lock().fire(v);
        }
    }
}

impl NeedsReset for ConfigIrq {
    fn needs_reset(&self, why: &str) {
        log::warn!("virtio device needs a reset: {why}");
        *self.0.status.lock() |= STATUS_DEVICE_NEEDS_RESET;
        self.trigger();
    }
}

/// A virtio device on PCI: configuration space (with its capabilities) and BAR 0.
#[derive(Debug)]
pub struct VirtioPci {
    name: String,
    device: Box<dyn VirtioDevice>,
    config: ConfigSpace,
    vm: Arc<dyn VmHandle>,
    mem: GuestMem,
    /// Where BAR 0 is mapped on the MMIO bus (and its ioeventfds registered).
    mapped_at: u64,
    /// BAR 0 as the guest programmed it.
    bar: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    queues: Vec<QueueState>,
    irq: Arc<IrqState>,
    config_generation: u8,
    /// A reset the device has not finished (its workers are ending): the status register
    /// reads as before until it has, and the driver must wait for 0 before it starts over.
    resetting: Option<u8>,
    /// Weak self, for BAR relocation requests.
    me: Weak<Mutex<VirtioPci>>,
}

impl VirtioPci {
    /// Wraps `device` as a PCI function whose BAR 0 is at `bar_addr` (from the graph).
    pub fn new(
        name: &str,
        device: Box<dyn VirtioDevice>,
        vm: Arc<dyn VmHandle>,
        mem: GuestMem,
        bar_addr: u64,
    ) -> Result<Arc<Mutex<VirtioPci>>, String> {
        let info = device.virtio();
        let sizes = info.queue_sizes.clone();
        let nq = sizes.len().min(MAX_QUEUES as usize);
        let (_, nvec) = resources(nq as u16);
        let mut vectors = Vec::new();
        for _ in 0..nvec {
            vectors.push(vm.msi_vector().map_err(|e| e.to_string())?);
        }
        let mut queues = Vec::new();
        for &max in sizes.iter().take(nq) {
            let queue = Queue::new(max).map_err(|e| format!("queue of size {max}: {e:?}"))?;
            let kick = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string())?);
            queues.push(QueueState {
                queue,
                vector: NO_VECTOR,
                kick,
            });
        }
        let irq = Arc::new(IrqState {
            msix: Mutex::new(Rank::VirtioIrq, Msix::new(vectors)),
            queue_vectors: Mutex::new(Rank::VirtioIrq, vec![NO_VECTOR; nq]),
            config_vector: Mutex::new(Rank::VirtioIrq, NO_VECTOR),
            isr: Mutex::new(Rank::VirtioIrq, 0),
            status: Mutex::new(Rank::VirtioIrq, 0),
        });
        let config = build_config_space(info, nvec);
        let dev = Arc::new(Mutex::new(
            Rank::PciFunction,
            VirtioPci {
                name: name.to_string(),
                device,
                config,
                vm,
                mem,
                mapped_at: bar_addr,
                bar: bar_addr,
                device_feature_select: 0,
                driver_feature_select: 0,
                driver_features: 0,
                queue_select: 0,
                queues,
                irq,
                config_generation: 0,
                resetting: None,
                me: Weak::new(),
            },
        ));
        {
            let mut d = dev.lock();
            d.me = Arc::downgrade(&dev);
            d.write_bar_register(bar_addr);
            d.register_ioevents(bar_addr, true);
        }
        Ok(dev)
    }

    fn status(&self) -> u8 {
        *self.irq.status.lock()
    }

    fn set_status(&mut self, s: u8) {
        *self.irq.status.lock() = s;
    }

    fn driver_ok(&self) -> bool {
        self.status() & STATUS_DRIVER_OK != 0
    }

    fn register_ioevents(&self, bar: u64, add: bool) {
        for (i, q) in self.queues.iter().enumerate() {
            let addr = bar + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
            let r = if add {
                self.vm.register_ioevent(&q.kick, addr)
            } else {
                self.vm.unregister_ioevent(&q.kick, addr)
            };
            if let Err(e) = r {
                log::warn!(
                    "{}: ioeventfd for queue {i} at {addr:#x}: {e} (notifications will exit to vmm)",
                    self.name
                );
            }
        }
    }

    fn write_bar_register(&mut self, addr: u64) {
        self.bar = addr & !(BAR0_SIZE - 1);
        // Memory BAR, 64-bit (type 0b10), not prefetchable.
        self.config.set_u32(0x10, (self.bar as u32) | 0x4);
        self.config.set_u32(0x14, (self.bar >> 32) as u32);
    }

    /// Device reset (status 0): stop the device, forget queues and negotiation. The device's
    /// workers are only asked to stop (a vCPU must not wait here, holding the bus); the status
    /// reads 0 once they have ([`VirtioPci::reset_done`]).
    fn reset(&mut self) {
        let before = self.status();
        self.device.reset();
        if !self.device.quiesced() {
            self.resetting = Some(self.resetting.unwrap_or(before).max(1));
        }
        for q in &mut self.queues {
            q.queue.reset();
            q.vector = NO_VECTOR;
        }
        *self.irq.queue_vectors.lock() = vec![NO_VECTOR; self.queues.len()];
        *self.irq.config_vector.lock() = NO_VECTOR;
        *self.irq.isr.lock() = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.set_status(0);
    }

    /// Whether a reset is complete; completes it when the device has quiesced.
    fn reset_done(&mut self) -> bool {
        if self.resetting.is_some() && self.device.quiesced() {
            self.resetting = None;
            // Interrupts the ending workers raised belong to the old driver.
            *self.irq.isr.lock() = 0;
        }
        self.resetting.is_none()
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        if !self.reset_done() {
            log::warn!(
                "{}: status {v:#x} written before the reset finished (the driver must wait for 0); ignored",
                self.name
            );
            return;
        }
        let old = self.status();
        // The driver never clears a bit but by a reset (virtio 1.2 section 3.1.1): taking such a
        // write would let DRIVER_OK start the device a second time on the same rings.
        let cleared = old & !v & !STATUS_DEVICE_NEEDS_RESET;
        if cleared != 0 {
            log::warn!(
                "{}: status write {v:#x} clears bits {cleared:#x} without a reset; ignored",
                self.name
            );
            return;
        }
        let mut new = v;
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                log::warn!(
                    "{}: driver features {:#x} not acceptable (offered {offered:#x})",
                    self.name,
                    self.driver_features
                );
                new &= !STATUS_FEATURES_OK;
            }
        }
        // The device's own NEEDS_RESET bit stays until a reset.
        new |= old & STATUS_DEVICE_NEEDS_RESET;
        self.set_status(new);
        if new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 && new & STATUS_FAILED == 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.status() & STATUS_FEATURES_OK == 0 {
            log::warn!(
                "{}: DRIVER_OK without FEATURES_OK; device not started",
                self.name
            );
            return;
        }
        let mut active = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.queue.ready() {
                continue;
            }
            if !q.queue.is_valid(&self.mem) {
                self.config_irq()
                    .needs_reset(&format!("queue {i} has an invalid size or addresses"));
                return;
            }
            let kick = match q.kick.try_clone() {
                Ok(k) => k,
                Err(e) => {
                    log::error!("{}: cannot share queue {i}'s eventfd: {e}", self.name);
                    return;
                }
            };
            let irq: Arc<dyn Irq> = Arc::new(QueueIrq {
                state: self.irq.clone(),
                queue: i,
            });
            let Ok(mut queue) = Queue::try_from(q.queue.state()) else {
                self.config_irq()
                    .needs_reset(&format!("queue {i} cannot be set up"));
                return;
            };
            queue.set_event_idx(
                self.driver_features & crate::hw::virtio::VIRTIO_F_RING_EVENT_IDX != 0,
            );
            active.push(ActiveQueue {
                index: i as u16,
                queue,
                kick,
                irq,
            });
        }
        let activation = Activation {
            mem: self.mem.clone(),
            features: self.driver_features,
            queues: active,
            config_irq: Arc::new(ConfigIrq(self.irq.clone())),
            needs_reset: self.config_irq(),
        };
        if let Err(e) = self.device.activate(activation) {
            self.config_irq().needs_reset(&format!("cannot start: {e}"));
        }
    }

    fn config_irq(&self) -> Arc<ConfigIrq> {
        Arc::new(ConfigIrq(self.irq.clone()))
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let q = self.queues.get(self.queue_select as usize);
        let features = self.device.features();
        let v: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => features & 0xffff_ffff,
                1 => features >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(*self.irq.config_vector.lock()),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.resetting.unwrap_or(self.status())),
            (0x15, 1) => u64::from(self.config_generation),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.queue.size())),
            (0x1a, 2) => q.map_or(u64::from(NO_VECTOR), |q| u64::from(q.vector)),
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.queue.ready())),
            (0x1e, 2) => u64::from(self.queue_select),
            (0x20, 4) => q.map_or(0, |q| q.queue.desc_table() & 0xffff_ffff),
            (0x24, 4) => q.map_or(0, |q| q.queue.desc_table() >> 32),
            (0x28, 4) => q.map_or(0, |q| q.queue.avail_ring() & 0xffff_ffff),
            (0x2c, 4) => q.map_or(0, |q| q.queue.avail_ring() >> 32),
            (0x30, 4) => q.map_or(0, |q| q.queue.used_ring() & 0xffff_ffff),
            (0x34, 4) => q.map_or(0, |q| q.queue.used_ring() >> 32),
            (0x20 | 0x28 | 0x30, 8) => q.map_or(0, |q| match offset {
                0x20 => q.queue.desc_table(),
                0x28 => q.queue.avail_ring(),
                _ => q.queue.used_ring(),
            }),
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        // Until a reset has finished only another reset is taken.
        if (offset, data.len()) != (0x14, 1) && !self.reset_done() {
            log::debug!("{}: write at {offset:#x} during a reset ignored", self.name);
            return;
        }
        let frozen = self.driver_ok();
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v as u32,
            (0x08, 4) => self.driver_feature_select = v as u32,
            (0x0c, 4) if self.status() & STATUS_FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ => {}
                }
            }
            (0x10, 2) => *self.irq.config_vector.lock() = self.valid_vector(v as u16),
            (0x14, 1) => self.write_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x1a, 2) => {
                let vec = self.valid_vector(v as u16);
                let sel = self.queue_select as usize;
                if let Some(q) = self.queues.get_mut(sel) {
                    q.vector = vec;
                    if let Some(slot) = self.irq.queue_vectors.lock().get_mut(sel) {
                        *slot = vec;
                    }
                }
            }
            _ if frozen => log::debug!(
                "{}: queue config write at {offset:#x} after DRIVER_OK ignored",
                self.name
            ),
            (0x18, 2) => {
                if let Some(q) = self
                    .queues
                    .get_mut(self.queue_select as usize)
                    .filter(|q| !q.queue.ready())
                {
                    q.queue.set_size(v as u16);
                }
            }
            (0x1c, 2) => {
                if let Some(q) = self.queues.get_mut(self.queue_select as usize)
                    && v == 1
                {
                    q.queue.set_ready(true);
                }
            }
            (0x20..=0x37, 4 | 8) => self.ring_address_write(offset, data.len(), v),
            _ => log::debug!(
                "{}: common config write {offset:#x}/{} ignored",
                self.name,
                data.len()
            ),
        }
    }

    /// A write of the selected queue's descriptor table, avail or used ring address (whole, or
    /// a 32-bit half); taken only while the queue is not ready.
    fn ring_address_write(&mut self, offset: u64, len: usize, v: u64) {
        let Some(q) = self
            .queues
            .get_mut(self.queue_select as usize)
            .filter(|q| !q.queue.ready())
        else {
            return;
        };
        let lo = Some(v as u32);
        let hi = (len == 8).then_some((v >> 32) as u32);
        match (offset, len) {
            (0x20, _) => q.queue.set_desc_table_address(lo, hi),
            (0x24, 4) => q.queue.set_desc_table_address(None, lo),
            (0x28, _) => q.queue.set_avail_ring_address(lo, hi),
            (0x2c, 4) => q.queue.set_avail_ring_address(None, lo),
            (0x30, _) => q.queue.set_used_ring_address(lo, hi),
            (0x34, 4) => q.queue.set_used_ring_address(None, lo),
            _ => {}
        }
    }

    /// A vector number the table has, else NO_VECTOR (the driver reads it back to check).
    fn valid_vector(&self, v: u16) -> u16 {
        let n = self.irq.msix.lock().len();
        if (v as usize) < n { v } else { NO_VECTOR }
    }

    /// BAR 0 accesses, by offset.
    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o + data.len() as u64 <= COMMON_CFG_LEN => {
                if o == 0x14 {
                    self.reset_done();
                }
                self.common_read(o, data)
            }
            ISR_OFFSET => {
                // Reading the ISR clears it.
                let mut isr = self.irq.isr.lock();
                data[0] = *isr;
                *isr = 0;
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.irq.msix.lock().table_read(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR0_SIZE).contains(&o) => {
                self.irq.msix.lock().pba_read(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o + data.len() as u64 <= COMMON_CFG_LEN => self.common_write(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                // A notification the ioeventfd did not catch (odd width): kick by hand.
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
                if let Some(q) = self.queues.get(q) {
                    let _ = q.kick.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .irq
                .msix
                .lock()
                .table_write(o - MSIX_TABLE_OFFSET, data, &self.name),
            _ => {}
        }
    }

    /// Moves BAR 0 where the guest programmed it, if memory decoding is on and it moved.
    fn maybe_relocate(&mut self) {
        let memory_on = self.config.u16_at(0x04) & 0x2 != 0;
        let target = self.bar;
        if !memory_on
            || target == self.mapped_at
            || target == 0
            || target.checked_add(BAR0_SIZE).is_none()
        {
            return;
        }
        let Some(me) = self.me.upgrade() else { return };
        log::info!(
            "{}: BAR 0 moves from {:#x} to {target:#x}",
            self.name,
            self.mapped_at
        );
        self.register_ioevents(self.mapped_at, false);
        self.register_ioevents(target, true);
        self.vm.move_mmio(self.mapped_at, target, BAR0_SIZE, me);
        self.mapped_at = target;
    }
}

fn build_config_space(info: &VirtioInfo, vectors: u16) -> ConfigSpace {
    let (class, sub) = info.pci_class;
    let device_type = info.device_type;
    let mut c = ConfigSpace::new(
        VIRTIO_PCI_VENDOR,
        VIRTIO_PCI_DEVICE_BASE + device_type,
        class,
        sub,
        0,
    );
    c.set_u16(0x06, 0x0010); // status: capabilities list
    c.set_u8(0x08, 1); // revision 1: modern
    c.set_u16(0x2c, VIRTIO_PCI_VENDOR);
    c.set_u16(0x2e, 0x40 + device_type);
    c.set_u8(0x34, CAP_COMMON);
    c.set_writable_u32(0x10, !(BAR0_SIZE as u32 - 1));
    c.set_writable_u32(0x14, 0xffff_ffff);
    // virtio_pci_cap: vndr 0x09, next, len, cfg_type, bar, id, pad[2], offset, length.
    let vcap = |c: &mut ConfigSpace, at: u8, next: u8, len: u8, ty: u8, off: u64, length: u64| {
        let a = at as usize;
        c.set_u8(a, 0x09);
        c.set_u8(a + 1, next);
        c.set_u8(a + 2, len);
        c.set_u8(a + 3, ty);
        c.set_u8(a + 4, 0);
        c.set_u32(a + 8, off as u32);
        c.set_u32(a + 12, length as u32);
    };
    vcap(
        &mut c,
        CAP_COMMON,
        CAP_NOTIFY,
        16,
        1,
        COMMON_CFG_OFFSET,
        COMMON_CFG_LEN,
    );
    vcap(
        &mut c,
        CAP_NOTIFY,
        CAP_ISR,
        20,
        2,
        NOTIFY_OFFSET,
        MSIX_TABLE_OFFSET - NOTIFY_OFFSET,
    );
    c.set_u32(CAP_NOTIFY as usize + 16, NOTIFY_OFF_MULTIPLIER);
    vcap(&mut c, CAP_ISR, CAP_DEVICE, 16, 3, ISR_OFFSET, 1);
    vcap(
        &mut c,
        CAP_DEVICE,
        CAP_PCI_CFG,
        16,
        4,
        DEVICE_CFG_OFFSET,
        DEVICE_CFG_LEN,
    );
    vcap(&mut c, CAP_PCI_CFG, CAP_MSIX, 20, 5, 0, 0);
    // The PCI configuration access window: bar, offset, length and data are the driver's.
    c.set_writable_u32(CAP_PCI_CFG as usize + 4, 0xff);
    c.set_writable_u32(CAP_PCI_CFG as usize + 8, 0xffff_ffff);
    c.set_writable_u32(CAP_PCI_CFG as usize + 12, 0xffff_ffff);
    c.set_writable_u32(PCI_CFG_DATA, 0xffff_ffff);
    // MSI-X: table and PBA in BAR 0; enable and function mask are the driver's.
    msix::write_capability(
        &mut c,
        CAP_MSIX,
        0,
        vectors,
        0,
        MSIX_TABLE_OFFSET,
        MSIX_PBA_OFFSET,
    );
    c
}

impl PciFunction for VirtioPci {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
        // The access window reads BAR 0 through configuration space.
        if offset as usize == PCI_CFG_DATA && data.len() == 4 {
            let off = u64::from(self.config.u32_at(CAP_PCI_CFG as usize + 8));
            let len = self.config.u32_at(CAP_PCI_CFG as usize + 12) as usize;
            if matches!(len, 1 | 2 | 4) && self.config.u16_at(CAP_PCI_CFG as usize + 4) & 0xff == 0
            {
                let mut buf = [0u8; 4];
                self.bar_read(off, &mut buf[..len]);
                data.copy_from_slice(&buf);
            }
        }
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        let o = offset as usize;
        self.config.write(offset, data);
        match o {
            0x10..=0x17 => {
                let lo = u64::from(self.config.u32_at(0x10) & !0xf);
                let hi = u64::from(self.config.u32_at(0x14));
                self.bar = (hi << 32) | lo;
                self.maybe_relocate();
            }
            0x04 | 0x05 => self.maybe_relocate(),
            _ if (MSIX_CONTROL..MSIX_CONTROL + 2).contains(&o) => {
                let ctl = self.config.u16_at(MSIX_CONTROL);
                self.irq.msix.lock().set_control(ctl);
            }
            _ if o == PCI_CFG_DATA && data.len() == 4 => {
                let off = u64::from(self.config.u32_at(CAP_PCI_CFG as usize + 8));
                let len = self.config.u32_at(CAP_PCI_CFG as usize + 12) as usize;
                if matches!(len, 1 | 2 | 4) {
                    let d = data.to_vec();
                    self.bar_write(off, &d[..len]);
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for VirtioPci {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if matches!(data.len(), 1 | 2 | 4 | 8) {
            self.bar_read(offset, data);
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if matches!(data.len(), 1 | 2 | 4 | 8) {
            self.bar_write(offset, data);
        }
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        self.device.reset();
        self.register_ioevents(self.mapped_at, false);
    }
}

/// Builds `device` into a VM as a virtio-pci function at the graph's placement.
pub fn plug(
    name: &str,
    device: Box<dyn VirtioDevice>,
    at: &crate::contract::Placement,
    m: &mut dyn crate::hw::Machine,
) -> Result<(), crate::hw::DeviceError> {
    use crate::hw::DeviceError;
    let crate::contract::Placement::Pci { slot, bars, .. } = at else {
        return Err(DeviceError(format!("`{name}` needs a PCI placement")));
    };
    let bar = bars
        .first()
        .ok_or_else(|| DeviceError(format!("`{name}` has no BAR")))?;
    let dev = VirtioPci::new(name, device, m.vm_handle(), m.guest_memory(), bar.addr)
        .map_err(DeviceError)?;
    m.add_pci(*slot, dev.clone(), (bar.addr, bar.size), dev)
}

#[cfg(test)]
mod tests;
