//! PCI bus 0: configuration space access through mechanism #1 (ports 0xcf8/0xcfc) and ECAM
//! (MMIO), the host bridge at slot 0, and the slots devices are plugged into.
//!
//! Only bus 0, function 0 of each slot exists. Empty slots, other functions and other buses
//! read as all ones (no device); writes to them are dropped.

use std::sync::Arc;

use crate::hw::bus::BusDevice;
use crate::sync::{Mutex, Rank};

/// Standard configuration space size, and the PCIe extended size (reachable through ECAM).
pub const CONFIG_SIZE: usize = 256;
pub const EXT_CONFIG_SIZE: usize = 4096;

/// A PCI function's configuration space.
pub trait PciFunction: Send + std::fmt::Debug {
    /// Reads `data.len()` bytes (1, 2 or 4, naturally aligned) at `offset` (< 4096).
    fn config_read(&mut self, offset: u16, data: &mut [u8]);
    /// Writes at `offset`.
    fn config_write(&mut self, offset: u16, data: &[u8]);
}

/// Configuration space bytes with per-bit write masks: the building block of functions.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
}

impl Default for ConfigSpace {
    fn default() -> Self {
        ConfigSpace {
            bytes: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
        }
    }
}

impl ConfigSpace {
    /// A type 0 header with the given identity.
    pub fn new(vendor: u16, device: u16, class: u8, subclass: u8, prog_if: u8) -> ConfigSpace {
        let mut c = ConfigSpace::default();
        c.set_u16(0x00, vendor);
        c.set_u16(0x02, device);
        c.set_u8(0x09, prog_if);
        c.set_u8(0x0a, subclass);
        c.set_u8(0x0b, class);
        // Command: I/O space, memory space, bus master, INTx disable are the guest's.
        c.set_writable_u16(0x04, 0x0407);
        c
    }
    pub fn set_u8(&mut self, off: usize, v: u8) {
        self.bytes[off] = v;
    }
    pub fn set_u16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }
    pub fn u32_at(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.bytes[off],
            self.bytes[off + 1],
            self.bytes[off + 2],
            self.bytes[off + 3],
        ])
    }
    pub fn set_writable_u16(&mut self, off: usize, mask: u16) {
        self.writable[off..off + 2].copy_from_slice(&mask.to_le_bytes());
    }
    pub fn set_writable_u32(&mut self, off: usize, mask: u32) {
        self.writable[off..off + 4].copy_from_slice(&mask.to_le_bytes());
    }
    /// Reads standard space; the extended space reads as zero.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    /// Writes the writable bits of standard space.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        for (i, &d) in data.iter().enumerate() {
            let o = offset as usize + i;
            if o < CONFIG_SIZE {
                let m = self.writable[o];
                self.bytes[o] = (self.bytes[o] & !m) | (d & m);
            }
        }
    }
}

/// The host bridge at 00:00.0.
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigSpace,
}

/// Host bridge identity: Intel's, as other VMMs present it; Linux needs no driver for it.
pub const HOST_BRIDGE_VENDOR: u16 = 0x8086;
pub const HOST_BRIDGE_DEVICE: u16 = 0x0d57;

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge {
            config: ConfigSpace::new(HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, 0x06, 0x00, 0x00),
        }
    }
}

impl PciFunction for HostBridge {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
    }
}

pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// The functions plugged into bus 0, by slot.
#[derive(Debug)]
pub struct PciRoot {
    slots: Vec<Option<SharedFunction>>,
}

impl Default for PciRoot {
    fn default() -> Self {
        let mut slots: Vec<Option<SharedFunction>> = (0..32).map(|_| None).collect();
        slots[0] = Some(Arc::new(Mutex::new(
            Rank::PciFunction,
            HostBridge::default(),
        )));
        PciRoot { slots }
    }
}

impl PciRoot {
    pub fn new() -> PciRoot {
        PciRoot::default()
    }

    /// Plugs `f` into `slot` (1–31); returns what was there.
    pub fn plug(&mut self, slot: u8, f: SharedFunction) -> Option<SharedFunction> {
        let s = self.slots.get_mut(slot as usize)?;
        s.replace(f)
    }

    /// Empties `slot`.
    pub fn unplug(&mut self, slot: u8) -> Option<SharedFunction> {
        if slot == 0 {
            return None;
        }
        self.slots.get_mut(slot as usize)?.take()
    }

    pub fn occupied(&self, slot: u8) -> bool {
        self.slots.get(slot as usize).is_some_and(Option::is_some)
    }

    fn function(&self, bus: u8, dev: u8, func: u8) -> Option<&SharedFunction> {
        if bus != 0 || func != 0 {
            return None;
        }
        self.slots.get(dev as usize)?.as_ref()
    }

    pub fn read(&self, bus: u8, dev: u8, func: u8, offset: u16, data: &mut [u8]) {
        match self.function(bus, dev, func) {
            Some(f) if (offset as usize) + data.len() <= EXT_CONFIG_SIZE => {
                f.lock().config_read(offset, data)
            }
            _ => data.fill(0xff),
        }
    }

    pub fn write(&self, bus: u8, dev: u8, func: u8, offset: u16, data: &[u8]) {
        if let Some(f) = self.function(bus, dev, func)
            && (offset as usize) + data.len() <= EXT_CONFIG_SIZE
        {
            f.lock().config_write(offset, data);
        }
    }
}

/// Only naturally aligned accesses of 1, 2 or 4 bytes reach a function.
fn aligned(offset: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len as u64)
}

/// Configuration mechanism #1 at I/O ports 0xcf8 (address) – 0xcff (data).
#[derive(Debug)]
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> PciConfigIo {
        PciConfigIo { root, address: 0 }
    }

    /// (bus, device, function, register offset) of the current address, if enabled.
    fn target(&self, data_offset: u64) -> Option<(u8, u8, u8, u16)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 {
            return None;
        }
        let reg = (a & 0xfc) as u16 + data_offset as u16;
        Some((
            ((a >> 16) & 0xff) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            reg,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 if aligned(offset - 4, data.len()) && offset - 4 + data.len() as u64 <= 4 => {
                match self.target(offset - 4) {
                    Some((b, d, f, r)) => self.root.lock().read(b, d, f, r, data),
                    None => data.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]])
            }
            4..=7 if aligned(offset - 4, data.len()) && offset - 4 + data.len() as u64 <= 4 => {
                if let Some((b, d, f, r)) = self.target(offset - 4) {
                    self.root.lock().write(b, d, f, r, data);
                }
            }
            _ => {}
        }
    }
}

/// PCI Express enhanced configuration access (ECAM): bus << 20 | device << 15 | function << 12.
#[derive(Debug)]
pub struct PciEcam {
    root: Arc<Mutex<PciRoot>>,
}

impl PciEcam {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> PciEcam {
        PciEcam { root }
    }
}

fn ecam_target(offset: u64) -> (u8, u8, u8, u16) {
    (
        ((offset >> 20) & 0xff) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        (offset & 0xfff) as u16,
    )
}

impl BusDevice for PciEcam {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if !aligned(offset, data.len()) {
            data.fill(0xff);
            return;
        }
        let (b, d, f, r) = ecam_target(offset);
        self.root.lock().read(b, d, f, r, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if aligned(offset, data.len()) {
            let (b, d, f, r) = ecam_target(offset);
            self.root.lock().write(b, d, f, r, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cf8(dev: u8, reg: u8) -> [u8; 4] {
        (0x8000_0000u32 | (u32::from(dev) << 11) | u32::from(reg)).to_le_bytes()
    }

    #[test]
    fn scan_bus_0_through_both_mechanisms() {
        let root = Arc::new(Mutex::new(Rank::PciRoot, PciRoot::new()));
        let mut io = PciConfigIo::new(root.clone());
        let mut ecam = PciEcam::new(root);
        let mut v = [0u8; 4];
        io.write(0xcf8, 0, &cf8(0, 0));
        io.read(0xcf8, 4, &mut v);
        assert_eq!(
            u32::from_le_bytes(v),
            u32::from(HOST_BRIDGE_VENDOR) | (u32::from(HOST_BRIDGE_DEVICE) << 16)
        );
        ecam.read(0, 0, &mut v);
        assert_eq!(
            u32::from_le_bytes(v) & 0xffff,
            u32::from(HOST_BRIDGE_VENDOR)
        );
        // Class code: host bridge.
        ecam.read(0, 0x08, &mut v);
        assert_eq!(v[3], 0x06);
        for dev in 1..32 {
            io.write(0xcf8, 0, &cf8(dev, 0));
            io.read(0xcf8, 4, &mut v);
            assert_eq!(v, [0xff; 4], "slot {dev} is empty");
            ecam.read(0, u64::from(dev) << 15, &mut v);
            assert_eq!(v, [0xff; 4]);
        }
        // Function 1, bus 1, disabled address: no device.
        ecam.read(0, 1 << 12, &mut v);
        assert_eq!(v, [0xff; 4]);
        ecam.read(0, 1 << 20, &mut v);
        assert_eq!(v, [0xff; 4]);
        io.write(0xcf8, 0, &[0, 0, 0, 0]);
        io.read(0xcf8, 4, &mut v);
        assert_eq!(v, [0xff; 4]);
    }

    #[test]
    fn command_register_is_writable_and_ids_are_not() {
        let root = Arc::new(Mutex::new(Rank::PciRoot, PciRoot::new()));
        let mut ecam = PciEcam::new(root);
        ecam.write(0, 0, &[0, 0, 0, 0]);
        ecam.write(0, 4, &[0xff, 0xff]);
        let mut v = [0u8; 4];
        ecam.read(0, 0, &mut v);
        assert_eq!(u16::from_le_bytes([v[0], v[1]]), HOST_BRIDGE_VENDOR);
        let mut c = [0u8; 2];
        ecam.read(0, 4, &mut c);
        assert_eq!(u16::from_le_bytes(c), 0x0407);
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let root = Arc::new(Mutex::new(Rank::PciRoot, PciRoot::new()));
        let mut io = PciConfigIo::new(root.clone());
        let mut ecam = PciEcam::new(root);
        for len in [1usize, 2, 3, 4, 8] {
            let mut buf = vec![0u8; len];
            for off in [0u64, 1, 2, 3, 4, 5, 6, 7, 0xfff, 0xffe, 0x1000, 0xf_ffff] {
                io.write(0xcf8, off, &buf);
                io.read(0xcf8, off, &mut buf);
                ecam.write(0, off, &buf);
                ecam.read(0, off, &mut buf);
            }
        }
        io.write(0xcf8, 0, &[0xfc, 0xff, 0xff, 0xff]);
        let mut v = [0u8; 4];
        io.read(0xcf8, 4, &mut v);
        io.read(0xcf8, 7, &mut v[..1]);
    }
}
