//! Lowering a valid spec into the device graph: the memory map, the legacy I/O port bus, PCI
//! bus 0 with its slots (hotplug slots as explicit, possibly empty nodes), interrupts and BARs.
//!
//! Lowering is pure and deterministic: the same spec gives the same graph on every machine, and
//! the order of devices in the file does not matter (free resources go out in name order).

pub mod diff;
pub mod layout;
mod place;
mod print;

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::contract::units::FilePath;
pub use crate::contract::{Bar, Placement};
use crate::devices::{AnyDevice, DeviceKind};
use crate::diag::Diags;
use crate::validate::ValidSpec;
use layout::*;

/// A region of the guest physical address space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Region {
    pub name: &'static str,
    pub start: u64,
    pub size: u64,
    pub ram: bool,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Boot {
    pub kernel: FilePath,
    pub initrd: Option<FilePath>,
    pub cmdline: String,
}

/// One device of the machine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceNode {
    pub name: String,
    pub kind: DeviceKind,
    pub placement: Placement,
    /// The device as the machine file declares it.
    pub spec: AnyDevice,
}

impl DeviceNode {
    pub fn pci_slot(&self) -> Option<u8> {
        match self.placement {
            Placement::Pci { slot, .. } => Some(slot),
            Placement::Pio { .. } => None,
        }
    }
}

/// What occupies a slot of PCI bus 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PciSlotNode {
    pub slot: u8,
    pub hotplug: bool,
    /// "host-bridge" for slot 0, a device name, or none.
    pub occupant: Option<String>,
}

/// A platform (not user-declared) range on the I/O port bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlatformPio {
    pub name: &'static str,
    pub base: u16,
    pub len: u16,
}

/// The lowered machine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceGraph {
    pub machine: String,
    pub vcpus: u32,
    /// CPUID features hidden from the guest.
    pub cpu_hide: Vec<crate::spec::cpu::CpuFeature>,
    pub memory: u64,
    pub regions: Vec<Region>,
    pub boot: Boot,
    pub platform_pio: Vec<PlatformPio>,
    pub sci_irq: u8,
    /// The hotplug event interrupt (GED), when the machine has hotplug slots.
    pub hotplug_irq: Option<u8>,
    pub pci_slots: Vec<PciSlotNode>,
    /// Legacy devices by first port, then PCI devices by slot.
    pub devices: Vec<DeviceNode>,
    /// Directory relative paths are resolved against (not part of the printed graph).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

impl DeviceGraph {
    pub fn device(&self, name: &str) -> Option<&DeviceNode> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// Resolves a path of the machine file.
    pub fn path(&self, p: &FilePath) -> PathBuf {
        p.resolve(&self.base_dir)
    }

    /// Where each device sits, to keep devices in place when lowering an edited file.
    pub fn hints(&self) -> Hints {
        let mut h = Hints::default();
        for d in &self.devices {
            match &d.placement {
                Placement::Pci { slot, .. } => {
                    h.pci.insert(d.name.clone(), *slot);
                }
                Placement::Pio { label, .. } => {
                    h.pio.insert(d.name.clone(), label);
                }
            }
        }
        h
    }

    /// The hotplug slots and whether each is free.
    pub fn hotplug_slots(&self) -> impl Iterator<Item = &PciSlotNode> {
        self.pci_slots.iter().filter(|s| s.hotplug)
    }

    /// The graph as text (`vmm graph`).
    pub fn render(&self) -> String {
        print::render(self)
    }
}

/// Placements to keep where possible: devices of a running VM stay where they are when the file
/// changes around them.
#[derive(Debug, Clone, Default)]
pub struct Hints {
    pub pci: HashMap<String, u8>,
    pub pio: HashMap<String, &'static str>,
    /// Slots a running VM is still emptying (the guest has not released their device): new
    /// devices go elsewhere while another hotplug slot is free.
    pub avoid: std::collections::BTreeSet<u8>,
}

/// Lowers a valid spec with no placements to keep.
pub fn lower(valid: &ValidSpec) -> Result<DeviceGraph, Diags> {
    lower_with(valid, &Hints::default())
}

/// Lowers a valid spec, keeping devices named in `hints` where they were when that is possible.
pub fn lower_with(valid: &ValidSpec, hints: &Hints) -> Result<DeviceGraph, Diags> {
    let loaded = valid.loaded();
    let spec = &loaded.spec;
    let mut diags = Vec::new();

    // Devices in name order, so that file order never changes where anything goes.
    let mut devices: Vec<place::Declared> = spec
        .devices()
        .into_iter()
        .map(|(p, _)| p)
        .zip(spec.owned_devices())
        .collect();
    devices.sort_by(|a, b| a.1.spec().name().cmp(b.1.spec().name()));

    let mut cx = place::Ctx {
        spans: &loaded.spans,
        hints,
        diags: &mut diags,
    };
    let mut nodes = place::pio(&devices, &mut cx);
    let (pci_nodes, slots) = place::pci(&devices, spec.pci.hotplug_slots, &mut cx);
    nodes.extend(pci_nodes);
    if !diags.is_empty() {
        diags.sort_by_key(|d| d.primary_span().map(|s| s.start));
        return Err(diags);
    }
    nodes.sort_by_key(|n| match &n.placement {
        Placement::Pio { ports, .. } => (0, u32::from(ports[0].0)),
        Placement::Pci { slot, .. } => (1, u32::from(*slot)),
    });
    let pci_slots = (0..PCI_SLOTS)
        .zip(slots.occupant)
        .map(|(s, occupant)| PciSlotNode {
            slot: s,
            hotplug: s >= slots.hotplug_first,
            occupant,
        })
        .collect();

    let hotplug = spec.pci.hotplug_slots > 0;
    Ok(DeviceGraph {
        machine: spec.name.to_string(),
        vcpus: spec.vcpus,
        cpu_hide: spec.cpu.hide.clone(),
        memory: spec.memory.bytes(),
        regions: regions(spec.memory.bytes()),
        boot: Boot {
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            cmdline: spec.cmdline.clone(),
        },
        platform_pio: platform_pio(hotplug),
        sci_irq: SCI_IRQ,
        hotplug_irq: hotplug.then_some(HOTPLUG_IRQ),
        pci_slots,
        devices: nodes,
        base_dir: loaded.base_dir.clone(),
    })
}

/// The memory map: RAM below the 32-bit MMIO hole (and above 4 GiB for the rest), then the
/// fixed MMIO windows, by address.
fn regions(mem: u64) -> Vec<Region> {
    let region = |name, start, size, ram| Region {
        name,
        start,
        size,
        ram,
    };
    let low = mem.min(MMIO32_START);
    let mut regions = vec![region("ram", 0, low, true)];
    if mem > low {
        regions.push(region("ram-high", HIGH_RAM_START, mem - low, true));
    }
    regions.extend([
        region("pci-mmio", PCI_MMIO_START, PCI_MMIO_SIZE, false),
        region("pci-ecam", PCI_ECAM_START, PCI_ECAM_SIZE, false),
        region("ioapic", IOAPIC_START, IOAPIC_SIZE, false),
        region("lapic", LAPIC_START, LAPIC_SIZE, false),
    ]);
    regions.sort_by_key(|r| r.start);
    regions
}

/// The platform's own port ranges (ACPI PM, PCI config, and PCI hotplug when there are slots).
fn platform_pio(hotplug: bool) -> Vec<PlatformPio> {
    let range = |name, (base, len): (u16, u16)| PlatformPio { name, base, len };
    let mut pio = vec![
        range("acpi-pm", ACPI_PM_PIO),
        range("pci-config", PCI_CONFIG_PIO),
    ];
    if hotplug {
        pio.push(range("pci-hotplug", PCI_HOTPLUG_PIO));
    }
    pio
}

/// The keys of the kinds that can be hot-plugged, for messages ("net").
pub fn hotpluggable_kinds() -> String {
    let keys: Vec<&str> = DeviceKind::ALL
        .iter()
        .filter(|k| k.info().hotpluggable)
        .map(|k| k.key())
        .collect();
    keys.join(", ")
}
