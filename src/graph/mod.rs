//! Lowering a valid spec into the device graph: the memory map, the legacy I/O port bus, PCI
//! bus 0 with its slots (hotplug slots as explicit, possibly empty nodes), interrupts and BARs.
//!
//! Lowering is pure and deterministic: the same spec gives the same graph on every machine, and
//! the order of devices in the file does not matter (free resources go out in name order).

pub mod diff;
pub mod layout;
mod print;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::Serialize;

use crate::contract::units::FilePath;
pub use crate::contract::{Bar, Placement};
use crate::contract::{Needs, PioPlacement};
use crate::devices::{AnyDevice, DeviceKind};
use crate::diag::{Diag, Diags};
use crate::hw::transport::virtio_pci;
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
    let spans = &loaded.spans;
    let mut diags = Vec::new();

    let mem = spec.memory.bytes();
    let low = mem.min(MMIO32_START);
    let mut regions = vec![Region {
        name: "ram",
        start: 0,
        size: low,
        ram: true,
    }];
    if mem > low {
        regions.push(Region {
            name: "ram-high",
            start: HIGH_RAM_START,
            size: mem - low,
            ram: true,
        });
    }
    regions.extend([
        Region {
            name: "pci-mmio",
            start: PCI_MMIO_START,
            size: PCI_MMIO_SIZE,
            ram: false,
        },
        Region {
            name: "pci-ecam",
            start: PCI_ECAM_START,
            size: PCI_ECAM_SIZE,
            ram: false,
        },
        Region {
            name: "ioapic",
            start: IOAPIC_START,
            size: IOAPIC_SIZE,
            ram: false,
        },
        Region {
            name: "lapic",
            start: LAPIC_START,
            size: LAPIC_SIZE,
            ram: false,
        },
    ]);
    regions.sort_by_key(|r| r.start);

    // Devices in name order, so that file order never changes where anything goes.
    let mut devices: Vec<(String, AnyDevice)> = spec
        .devices()
        .into_iter()
        .map(|(p, _)| p)
        .zip(spec.owned_devices())
        .collect();
    devices.sort_by(|a, b| a.1.spec().name().cmp(b.1.spec().name()));

    let mut nodes: Vec<DeviceNode> = Vec::new();

    // Legacy I/O ports: hinted, then single-choice, then the rest, each taking its first free
    // placement.
    let mut pio_taken: BTreeMap<&'static str, (String, String)> = BTreeMap::new();
    let pio: Vec<(&String, &AnyDevice, &'static [PioPlacement])> = devices
        .iter()
        .filter_map(|(p, d)| match d.spec().needs() {
            Needs::Pio(choices) => Some((p, d, choices)),
            Needs::VirtioPci(_) => None,
        })
        .collect();
    let rank = |d: &AnyDevice, choices: &[PioPlacement]| {
        let name = d.spec().name();
        if hints
            .pio
            .get(name)
            .is_some_and(|l| choices.iter().any(|c| c.label == *l))
        {
            0
        } else if choices.len() == 1 {
            1
        } else {
            2
        }
    };
    let mut order: Vec<usize> = (0..pio.len()).collect();
    order.sort_by_key(|&i| rank(pio[i].1, pio[i].2));
    for i in order {
        let (ptr, d, choices) = &pio[i];
        let name = d.spec().name();
        let hinted = hints
            .pio
            .get(name)
            .and_then(|l| choices.iter().find(|c| c.label == *l));
        let pick = hinted
            .filter(|c| !pio_taken.contains_key(c.label))
            .or_else(|| choices.iter().find(|c| !pio_taken.contains_key(c.label)));
        match pick {
            Some(c) => {
                pio_taken.insert(c.label, (name.to_string(), ptr.to_string()));
                nodes.push(DeviceNode {
                    name: name.to_string(),
                    kind: d.kind(),
                    placement: Placement::Pio {
                        label: c.label,
                        ports: c.ports.to_vec(),
                        irqs: c.irqs.to_vec(),
                        acpi: c.acpi,
                    },
                    spec: (*d).clone(),
                });
            }
            None if choices.len() == 1 => {
                let (other, other_ptr) = &pio_taken[choices[0].label];
                let label = choices[0].label;
                diags.push(
                    Diag::error(
                        "vmm::duplicate",
                        format!("{label} is already used by `{other}`"),
                    )
                    .label(
                        spans.value(&format!("{ptr}/port")),
                        format!("`{name}` wants {label} too"),
                    )
                    .label(spans.value(&format!("{other_ptr}/port")), "first used here")
                    .help("remove `port` from one of them to get a free one"),
                );
            }
            None => {
                let users: Vec<String> = choices
                    .iter()
                    .filter_map(|c| {
                        pio_taken
                            .get(c.label)
                            .map(|(u, _)| format!("{} ({u})", c.label))
                    })
                    .collect();
                diags.push(
                    Diag::error(
                        "vmm::no-port",
                        format!("No free I/O port placement for `{name}`"),
                    )
                    .label(spans.value(ptr), "cannot be placed")
                    .help(format!("all taken: {}", users.join(", "))),
                );
            }
        }
    }

    // PCI bus 0: slot 0 is the host bridge; the highest `hotplug_slots` slots are hotplug slots.
    let hotplug_first = PCI_SLOTS - spec.pci.hotplug_slots;
    let mut occupant: Vec<Option<String>> = vec![None; PCI_SLOTS as usize];
    occupant[0] = Some("host-bridge".into());
    let pci: Vec<(&String, &AnyDevice, u16, u16)> = devices
        .iter()
        .filter_map(|(p, d)| match d.spec().needs() {
            Needs::VirtioPci(v) => Some((p, d, v.device_type, v.queues())),
            Needs::Pio(_) => None,
        })
        .collect();
    let mut slot_of: HashMap<&str, u8> = HashMap::new();
    // 1. Explicit slots (validation made them distinct and legal).
    for (_, d, _, _) in &pci {
        if let Some(s) = d.spec().slot() {
            occupant[s.0 as usize] = Some(d.spec().name().to_string());
            slot_of.insert(d.spec().name(), s.0);
        }
    }
    let fits = |slot: u8, hotpluggable: bool| slot > 0 && (slot < hotplug_first || hotpluggable);
    // 2. Hinted slots, where still free and legal.
    for (_, d, _, _) in &pci {
        let name = d.spec().name();
        if slot_of.contains_key(name) {
            continue;
        }
        if let Some(&s) = hints.pci.get(name)
            && s < PCI_SLOTS
            && occupant[s as usize].is_none()
            && fits(s, d.spec().info().hotpluggable)
        {
            occupant[s as usize] = Some(name.to_string());
            slot_of.insert(name, s);
        }
    }
    // 3. The rest, in name order: hot-pluggable kinds into hotplug slots first.
    let static_free =
        |occ: &[Option<String>]| (1..hotplug_first).find(|&s| occ[s as usize].is_none());
    let hotplug_free = |occ: &[Option<String>]| {
        let free = |s: &u8| occ[*s as usize].is_none();
        (hotplug_first..PCI_SLOTS)
            .filter(free)
            .find(|s| !hints.avoid.contains(s))
            .or_else(|| (hotplug_first..PCI_SLOTS).find(free))
    };
    // Devices that found no slot, reported together: (pointer, device).
    let mut homeless: Vec<(&String, &AnyDevice)> = Vec::new();
    for (ptr, d, _, _) in &pci {
        let name = d.spec().name();
        if slot_of.contains_key(name) {
            continue;
        }
        let hotpluggable = d.spec().info().hotpluggable;
        let pick = if hotpluggable {
            hotplug_free(&occupant).or_else(|| static_free(&occupant))
        } else {
            static_free(&occupant)
        };
        match pick {
            Some(s) => {
                occupant[s as usize] = Some(name.to_string());
                slot_of.insert(name, s);
            }
            None => homeless.push((ptr, d)),
        }
    }
    if let Some(((ptr, first), rest)) = homeless.split_first() {
        let name = first.spec().name();
        let others: Vec<String> = rest
            .iter()
            .take(3)
            .map(|(_, d)| format!("`{}`", d.spec().name()))
            .collect();
        let title = match rest.len() {
            0 => format!("No free PCI slot for `{name}`"),
            n @ 1..=3 => format!(
                "No free PCI slot for `{name}` and {n} more: {}",
                others.join(", ")
            ),
            n => format!(
                "No free PCI slot for `{name}` and {n} more: {}, …",
                others.join(", ")
            ),
        };
        let mut dd = Diag::error("vmm::no-slot", title).label(spans.value(ptr), "does not fit");
        let statics = u32::from(hotplug_first) - 1;
        let all_hotpluggable = homeless.iter().all(|(_, d)| d.spec().info().hotpluggable);
        dd = if all_hotpluggable || spec.pci.hotplug_slots == 0 {
            dd.help(format!(
                "bus 0 has 31 slots and the machine has {} PCI devices: remove some",
                pci.len()
            ))
        } else {
            dd.label(
                spans.entry("/pci/hotplug_slots"),
                format!("leaves {statics} static slot{}", if statics == 1 { "" } else { "s" }),
            )
            .help(format!(
                "only hot-pluggable devices ({}) can use hotplug slots: lower `pci.hotplug_slots` or remove a device",
                hotpluggable_kinds()
            ))
        };
        diags.push(dd);
    }
    for (_, d, device_type, queues) in &pci {
        let name = d.spec().name();
        let Some(&slot) = slot_of.get(name) else {
            continue;
        };
        let (bar_size, msix_vectors) = virtio_pci::resources(*queues);
        nodes.push(DeviceNode {
            name: name.to_string(),
            kind: d.kind(),
            placement: Placement::Pci {
                slot,
                function: 0,
                hotplug: slot >= hotplug_first,
                device_type: *device_type,
                queues: *queues,
                msix_vectors,
                bars: vec![Bar {
                    index: 0,
                    addr: slot_window(slot),
                    size: bar_size,
                }],
            },
            spec: (*d).clone(),
        });
    }

    if !diags.is_empty() {
        diags.sort_by_key(|d| d.primary_span().map(|s| s.start));
        return Err(diags);
    }

    nodes.sort_by_key(|n| match &n.placement {
        Placement::Pio { ports, .. } => (0, u32::from(ports[0].0)),
        Placement::Pci { slot, .. } => (1, u32::from(*slot)),
    });
    let pci_slots = (0..PCI_SLOTS)
        .map(|s| PciSlotNode {
            slot: s,
            hotplug: s >= hotplug_first,
            occupant: occupant[s as usize].clone(),
        })
        .collect();

    let mut platform_pio = vec![
        PlatformPio {
            name: "acpi-pm",
            base: ACPI_PM_PIO.0,
            len: ACPI_PM_PIO.1,
        },
        PlatformPio {
            name: "pci-config",
            base: PCI_CONFIG_PIO.0,
            len: PCI_CONFIG_PIO.1,
        },
    ];
    if spec.pci.hotplug_slots > 0 {
        platform_pio.push(PlatformPio {
            name: "pci-hotplug",
            base: PCI_HOTPLUG_PIO.0,
            len: PCI_HOTPLUG_PIO.1,
        });
    }
    Ok(DeviceGraph {
        machine: spec.name.to_string(),
        vcpus: spec.vcpus,
        cpu_hide: spec.cpu.hide.clone(),
        memory: mem,
        regions,
        boot: Boot {
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            cmdline: spec.cmdline.clone(),
        },
        platform_pio,
        sci_irq: SCI_IRQ,
        hotplug_irq: (spec.pci.hotplug_slots > 0).then_some(HOTPLUG_IRQ),
        pci_slots,
        devices: nodes,
        base_dir: loaded.base_dir.clone(),
    })
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
