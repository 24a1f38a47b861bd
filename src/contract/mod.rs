//! The vocabulary that the stages (spec, validate, graph, backend) and the device kinds share.
//!
//! This layer imports no stage and no device: device files and stages both import it, and
//! stages learn everything they need about a device kind through it. A per-kind fact (its
//! placement, PCI class, queues, ACPI nodes, schema hints, hotplug-ability) is declared once,
//! in the kind's file, in the types of this module; no stage names a kind.
//!
//! | module | what |
//! |---|---|
//! | `mod.rs` | [`DeviceSpec`], [`KindInfo`], [`Needs`] and their parts, [`Placement`], [`DeviceError`] |
//! | [`check`] | [`check::DeviceCheck`]: what a kind's own checks can ask of validation |
//! | [`units`] | `ByteSize`, `MacAddr`, `PciSlot`, `DeviceName`, `FilePath` |

pub mod check;
pub mod units;

use serde::Serialize;

use check::DeviceCheck;
use units::PciSlot;

/// Facts shared by all devices of one kind, declared once in the kind's file.
#[derive(Debug)]
pub struct KindInfo {
    /// The machine file's key (`net` for `[[net]]`); also `vmm device <key>`.
    pub key: &'static str,
    /// What a person calls one device of this kind, for messages ("NIC", "disk").
    pub noun: &'static str,
    /// Whether a running VM can gain or lose a device of this kind.
    pub hotpluggable: bool,
    /// The most devices of this kind one machine can have.
    pub max_count: Option<usize>,
    /// Keys people write for this kind's key (`nic` for `net`); `vmm check` suggests the key.
    pub aliases: &'static [&'static str],
    /// Platform facts the firmware tables announce when a device of this kind is present.
    pub platform: &'static [PlatformFact],
    /// How `vmm device <key>` serves it as a vhost-user backend (its `Device::served`); `None`
    /// when it is not served.
    pub vhost_user: Option<ServedInfo>,
    /// The system calls its worker threads make beyond [`crate::sandbox::WORKER_BASE`] (their
    /// seccomp allowlist; docs/security.md). A worker that makes another call kills vmm.
    pub seccomp: &'static crate::sandbox::Allow,
}

/// What `vmm device <key>` needs to know of a kind beyond its machine-file keys.
#[derive(Debug)]
pub struct ServedInfo {
    /// The front end that drives it, for help ("QEMU: -device vhost-user-blk-pci").
    pub front_end: &'static str,
    /// Keys the front end owns (e.g. a NIC's MAC): not options.
    pub front_end_keys: &'static [&'static str],
    /// Option defaults where the machine file has none (key, value as typed on the command line).
    pub defaults: &'static [(&'static str, &'static str)],
}

/// Something a kind's presence tells the guest through the firmware tables (ACPI FADT flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformFact {
    /// An 8042-compatible keyboard controller (IAPC_BOOT_ARCH 8042).
    Ps2Controller,
    /// A CMOS RTC at the usual ports (absent: IAPC_BOOT_ARCH "CMOS RTC not present").
    CmosRtc,
}

/// Static facts of a device kind; the registry reads them.
pub trait DeviceKindInfo {
    const INFO: KindInfo;
}

/// An ACPI device node (`Device (NAME) { _HID, [_UID], _CRS }`) a legacy device needs so the
/// guest finds it without probing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiNode {
    /// Four characters (AML names).
    pub name: &'static str,
    /// EISA id, e.g. "PNP0501".
    pub hid: &'static str,
    pub uid: Option<u8>,
    /// Whether `_CRS` lists the placement's I/O ports.
    pub ports: bool,
    /// Indices into the placement's `irqs` that `_CRS` lists.
    pub irqs: &'static [usize],
}

/// A fixed set of legacy I/O ports and ISA interrupts a device can sit at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PioPlacement {
    /// Conventional name of the placement, e.g. "com1".
    pub label: &'static str,
    /// (first port, number of ports).
    pub ports: &'static [(u16, u16)],
    /// ISA IRQs (= IOAPIC pins) the device raises.
    pub irqs: &'static [u8],
    /// The ACPI nodes that describe the device at this placement.
    #[serde(skip)]
    pub acpi: &'static [AcpiNode],
}

/// What a virtio device is, declared once per kind: the transport, the vhost-user backend and
/// the graph all read it from here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioInfo {
    /// virtio device type (virtio 1.2 section 5).
    pub device_type: u16,
    /// Maximum size of each virtqueue; the length is the number of queues (borrowed for the
    /// kinds that declare it once, owned where the machine file says it: `[[vhost_user]]`).
    pub queue_sizes: std::borrow::Cow<'static, [u16]>,
    /// PCI (class, subclass) the function reports.
    pub pci_class: (u8, u8),
}

impl VirtioInfo {
    pub fn queues(&self) -> u16 {
        self.queue_sizes.len() as u16
    }
}

/// What a device needs from the machine. The graph allocates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Needs {
    /// One of these placements on the legacy I/O port bus, the first free one in order.
    Pio(&'static [PioPlacement]),
    /// A virtio device on PCI bus 0; the virtio-pci transport decides BARs and vectors.
    VirtioPci(VirtioInfo),
}

/// A BAR of a PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Bar {
    pub index: u8,
    pub addr: u64,
    pub size: u64,
}

/// Where the graph put a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// On the legacy I/O port bus.
    Pio {
        label: &'static str,
        ports: Vec<(u16, u16)>,
        irqs: Vec<u8>,
        /// How ACPI describes it (from [`PioPlacement::acpi`]).
        #[serde(skip)]
        acpi: &'static [AcpiNode],
    },
    /// A virtio-pci function on bus 0.
    Pci {
        slot: u8,
        function: u8,
        /// In a hotplug slot: can be removed (and re-added) while the VM runs.
        hotplug: bool,
        device_type: u16,
        queues: u16,
        msix_vectors: u16,
        bars: Vec<Bar>,
    },
}

/// A device that could not be built into a VM (or served).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeviceError(pub String);

/// A device as declared in a machine file, as the stages see it whatever its kind.
pub trait DeviceSpec: std::fmt::Debug {
    /// The kind's facts (the same as its [`DeviceKindInfo::INFO`]).
    fn info(&self) -> &'static KindInfo;
    /// Unique name in the machine.
    fn name(&self) -> &str;
    /// An explicitly requested PCI slot.
    fn slot(&self) -> Option<PciSlot> {
        None
    }
    fn needs(&self) -> Needs;
    /// Checks of this kind that the schema cannot express (files, host resources).
    fn check(&self, _cx: &mut dyn DeviceCheck) {}
    /// Settings shown by `vmm graph`, as key/value pairs. `machine` is the machine's name.
    fn describe(&self, _machine: &str) -> Vec<(&'static str, String)> {
        Vec::new()
    }
    /// What the guest must do before this device is removed from a running VM, for `vmm plan`
    /// ("unmount it first"); `None` when nothing.
    fn unplug_note(&self) -> Option<&'static str> {
        None
    }
}
