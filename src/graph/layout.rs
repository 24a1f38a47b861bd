//! The guest physical address map and fixed resources of every vmm machine (x86_64).
//!
//! ```text
//! 0x0000_0000 ─ RAM (up to 3 GiB) ─ 0xc000_0000 ─ PCI MMIO (512 MiB, 16 MiB per slot)
//! 0xe000_0000 ─ PCI ECAM, bus 0 (1 MiB) … 0xfec0_0000 IOAPIC … 0xfee0_0000 LAPIC
//! 0x1_0000_0000 ─ RAM above 3 GiB continues here
//! ```

/// RAM below the 32-bit MMIO hole ends here at the latest.
pub const MMIO32_START: u64 = 0xc000_0000;
/// Where RAM continues above the hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// PCI memory window for BARs: each slot owns a fixed 16 MiB part, so a device's BARs depend
/// only on its slot and hotplug slots need no allocation at run time.
pub const PCI_MMIO_START: u64 = 0xc000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
pub const PCI_SLOT_WINDOW: u64 = 0x100_0000;

/// PCI Express enhanced configuration space (MCFG), bus 0 only.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;

pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const IOAPIC_SIZE: u64 = 0x1000;
pub const LAPIC_START: u64 = 0xfee0_0000;
pub const LAPIC_SIZE: u64 = 0x1000;

/// Legacy PCI configuration mechanism #1 (0xcf8 address, 0xcfc data).
pub const PCI_CONFIG_PIO: (u16, u16) = (0xcf8, 8);
/// ACPI sleep control/status registers (hardware-reduced ACPI) and reset register.
pub const ACPI_PM_PIO: (u16, u16) = (0x600, 8);
/// ACPI system control interrupt.
pub const SCI_IRQ: u8 = 9;
/// The PCI hotplug controller's registers (devices/hotplug.rs), on machines with hotplug slots.
pub const PCI_HOTPLUG_PIO: (u16, u16) = (0x610, 16);
/// The IOAPIC pin of the Generic Event Device that announces hotplug events (edge, active
/// high; above the ISA range, so no legacy device can claim it).
pub const HOTPLUG_IRQ: u8 = 16;

/// Number of slots on PCI bus 0.
pub const PCI_SLOTS: u8 = 32;

/// The BAR window of a slot.
pub fn slot_window(slot: u8) -> u64 {
    PCI_MMIO_START + u64::from(slot) * PCI_SLOT_WINDOW
}

const _: () = assert!(PCI_SLOT_WINDOW * PCI_SLOTS as u64 == PCI_MMIO_SIZE);
const _: () = assert!(PCI_MMIO_START + PCI_MMIO_SIZE <= PCI_ECAM_START);
