//! Where each device goes: legacy devices onto I/O port placements, PCI devices into slots of
//! bus 0. Both are pure functions of the (name-ordered) devices and the placements to keep.

use std::collections::{BTreeMap, HashMap};

use super::layout::{PCI_SLOTS, slot_window};
use super::{Bar, DeviceNode, Hints, Placement, hotpluggable_kinds};
use crate::contract::{Needs, PioPlacement};
use crate::devices::AnyDevice;
use crate::diag::Diag;
use crate::hw::transport::virtio_pci;
use crate::spec::source::Spans;

/// A device with the JSON pointer of its table in the machine file.
pub(super) type Declared = (String, AnyDevice);

/// What placement needs besides the devices.
pub(super) struct Ctx<'a> {
    pub spans: &'a Spans,
    pub hints: &'a Hints,
    pub diags: &'a mut Vec<Diag>,
}

/// Legacy I/O port devices: hinted first, then single-choice, then the rest, each taking its
/// first free placement.
pub(super) fn pio(devices: &[Declared], cx: &mut Ctx<'_>) -> Vec<DeviceNode> {
    let pio: Vec<(&String, &AnyDevice, &'static [PioPlacement])> = devices
        .iter()
        .filter_map(|(p, d)| match d.spec().needs() {
            Needs::Pio(choices) => Some((p, d, choices)),
            Needs::VirtioPci(_) => None,
        })
        .collect();
    let hinted = |d: &AnyDevice, choices: &'static [PioPlacement]| {
        let label = cx.hints.pio.get(d.spec().name())?;
        choices.iter().find(|c| c.label == *label)
    };
    let mut order: Vec<usize> = (0..pio.len()).collect();
    order.sort_by_key(|&i| {
        let (_, d, choices) = pio[i];
        match (hinted(d, choices), choices.len()) {
            (Some(_), _) => 0,
            (None, 1) => 1,
            _ => 2,
        }
    });
    // label → (device, pointer)
    let mut taken: BTreeMap<&'static str, (String, String)> = BTreeMap::new();
    let mut nodes = Vec::new();
    for i in order {
        let (ptr, d, choices) = pio[i];
        let name = d.spec().name();
        let pick = hinted(d, choices)
            .filter(|c| !taken.contains_key(c.label))
            .or_else(|| choices.iter().find(|c| !taken.contains_key(c.label)));
        let Some(c) = pick else {
            cx.diags.push(no_port(ptr, name, choices, &taken, cx.spans));
            continue;
        };
        taken.insert(c.label, (name.to_string(), ptr.to_string()));
        nodes.push(DeviceNode {
            name: name.to_string(),
            kind: d.kind(),
            placement: Placement::Pio {
                label: c.label,
                ports: c.ports.to_vec(),
                irqs: c.irqs.to_vec(),
                acpi: c.acpi,
            },
            spec: d.clone(),
        });
    }
    nodes
}

/// Why a legacy device found no placement: a fixed one another device holds, or all taken.
fn no_port(
    ptr: &str,
    name: &str,
    choices: &[PioPlacement],
    taken: &BTreeMap<&'static str, (String, String)>,
    spans: &Spans,
) -> Diag {
    if let [only] = choices {
        let (other, other_ptr) = &taken[only.label];
        let label = only.label;
        return Diag::error(
            "vmm::duplicate",
            format!("{label} is already used by `{other}`"),
        )
        .label(
            spans.value(&format!("{ptr}/port")),
            format!("`{name}` wants {label} too"),
        )
        .label(spans.value(&format!("{other_ptr}/port")), "first used here")
        .help("remove `port` from one of them to get a free one");
    }
    let users: Vec<String> = choices
        .iter()
        .filter_map(|c| {
            taken
                .get(c.label)
                .map(|(u, _)| format!("{} ({u})", c.label))
        })
        .collect();
    Diag::error(
        "vmm::no-port",
        format!("No free I/O port placement for `{name}`"),
    )
    .label(spans.value(ptr), "cannot be placed")
    .help(format!("all taken: {}", users.join(", ")))
}

/// The slots of bus 0 and who holds them while PCI devices are being placed.
pub(super) struct Slots {
    /// The first hotplug slot: the highest `hotplug_slots` slots are hotplug slots.
    pub hotplug_first: u8,
    /// "host-bridge" for slot 0, a device name, or none.
    pub occupant: Vec<Option<String>>,
}

impl Slots {
    fn new(hotplug_slots: u8) -> Self {
        let mut occupant = vec![None; PCI_SLOTS as usize];
        occupant[0] = Some("host-bridge".into());
        Slots {
            hotplug_first: PCI_SLOTS - hotplug_slots,
            occupant,
        }
    }

    fn free(&self, s: u8) -> bool {
        self.occupant[s as usize].is_none()
    }

    fn take(&mut self, s: u8, name: &str) {
        self.occupant[s as usize] = Some(name.to_string());
    }

    /// Slot 0 is the host bridge; hotplug slots take only hot-pluggable kinds.
    fn fits(&self, s: u8, hotpluggable: bool) -> bool {
        s > 0 && s < PCI_SLOTS && (s < self.hotplug_first || hotpluggable)
    }

    fn first_static(&self) -> Option<u8> {
        (1..self.hotplug_first).find(|&s| self.free(s))
    }

    /// A free hotplug slot, preferring those a running VM is not still emptying.
    fn first_hotplug(&self, avoid: &std::collections::BTreeSet<u8>) -> Option<u8> {
        let all = self.hotplug_first..PCI_SLOTS;
        all.clone()
            .find(|s| self.free(*s) && !avoid.contains(s))
            .or_else(|| all.clone().find(|s| self.free(*s)))
    }
}

/// PCI devices: explicit slots, then hinted slots where still free and legal, then the rest in
/// name order (hot-pluggable kinds into hotplug slots first). Devices that fit nowhere are
/// reported together.
pub(super) fn pci(
    devices: &[Declared],
    hotplug_slots: u8,
    cx: &mut Ctx<'_>,
) -> (Vec<DeviceNode>, Slots) {
    let pci: Vec<&Declared> = devices
        .iter()
        .filter(|(_, d)| matches!(d.spec().needs(), Needs::VirtioPci(_)))
        .collect();
    let mut slots = Slots::new(hotplug_slots);
    let mut slot_of: HashMap<&str, u8> = HashMap::new();
    for (_, d) in &pci {
        if let Some(s) = d.spec().slot() {
            slots.take(s.0, d.spec().name());
            slot_of.insert(d.spec().name(), s.0);
        }
    }
    for (_, d) in &pci {
        let name = d.spec().name();
        if let Some(&s) = cx.hints.pci.get(name)
            && !slot_of.contains_key(name)
            && slots.fits(s, d.spec().info().hotpluggable)
            && slots.free(s)
        {
            slots.take(s, name);
            slot_of.insert(name, s);
        }
    }
    let mut homeless: Vec<&Declared> = Vec::new();
    for dev in &pci {
        let name = dev.1.spec().name();
        if slot_of.contains_key(name) {
            continue;
        }
        let pick = if dev.1.spec().info().hotpluggable {
            slots
                .first_hotplug(&cx.hints.avoid)
                .or_else(|| slots.first_static())
        } else {
            slots.first_static()
        };
        match pick {
            Some(s) => {
                slots.take(s, name);
                slot_of.insert(name, s);
            }
            None => homeless.push(dev),
        }
    }
    if !homeless.is_empty() {
        let d = no_slot(&homeless, pci.len(), hotplug_slots, &slots, cx.spans);
        cx.diags.push(d);
    }
    let nodes = pci
        .iter()
        .filter_map(|(_, d)| {
            let slot = *slot_of.get(d.spec().name())?;
            Some(pci_node(d, slot, slot >= slots.hotplug_first))
        })
        .collect();
    (nodes, slots)
}

fn pci_node(d: &AnyDevice, slot: u8, hotplug: bool) -> DeviceNode {
    let Needs::VirtioPci(v) = d.spec().needs() else {
        unreachable!("pci() keeps only PCI devices");
    };
    let queues = v.queues();
    let (bar_size, msix_vectors) = virtio_pci::resources(queues);
    DeviceNode {
        name: d.spec().name().to_string(),
        kind: d.kind(),
        placement: Placement::Pci {
            slot,
            function: 0,
            hotplug,
            device_type: v.device_type,
            queues,
            msix_vectors,
            bars: vec![Bar {
                index: 0,
                addr: slot_window(slot),
                size: bar_size,
            }],
        },
        spec: d.clone(),
    }
}

/// One diagnostic for every PCI device that found no slot.
fn no_slot(
    homeless: &[&Declared],
    pci_count: usize,
    hotplug_slots: u8,
    slots: &Slots,
    spans: &Spans,
) -> Diag {
    let ((ptr, first), rest) = homeless
        .split_first()
        .expect("called with homeless devices");
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
    let dd = Diag::error("vmm::no-slot", title).label(spans.value(ptr), "does not fit");
    let all_hotpluggable = homeless.iter().all(|(_, d)| d.spec().info().hotpluggable);
    if all_hotpluggable || hotplug_slots == 0 {
        return dd.help(format!(
            "bus 0 has 31 slots and the machine has {pci_count} PCI devices: remove some"
        ));
    }
    let statics = u32::from(slots.hotplug_first) - 1;
    dd.label(
        spans.entry("/pci/hotplug_slots"),
        format!("leaves {statics} static slot{}", if statics == 1 { "" } else { "s" }),
    )
    .help(format!(
        "only hot-pluggable devices ({}) can use hotplug slots: lower `pci.hotplug_slots` or remove a device",
        hotpluggable_kinds()
    ))
}
