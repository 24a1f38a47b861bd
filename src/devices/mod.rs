//! Device models and the registry of device kinds.
//!
//! Every kind lives in one file that holds, in order: what it is, its spec struct (what a machine
//! file says about it), its device model and its tests. The registry below is the one list of
//! kinds: adding a device is one file plus one line in [`for_each_device_kind`]. The rest of vmm
//! asks a device what it needs ([`DeviceSpec::needs`]) instead of matching on its kind.

pub mod block;
pub mod bus;
pub mod char_io;
pub mod console;
pub mod hotplug;
pub mod legacy;
pub mod net;
pub mod pci;
pub mod platform;
pub mod rng;
pub mod transport;
pub mod virtio;

use serde::Serialize;

use crate::spec::units::PciSlot;
use crate::validate::DeviceCheck;

/// The list of device kinds: `key => Variant(SpecType)`. `key` is the machine file's table
/// name (`[[net]]`) and the doc comment is its description in the schema.
macro_rules! for_each_device_kind {
    ($callback:ident) => {
        $callback! {
            /// 16550 UARTs on the legacy I/O ports (COM1–COM4), as `[[serial]]` entries.
            serial => Serial(crate::devices::legacy::serial::SerialSpec),
            /// The CMOS real-time clock and NVRAM at ports 0x70–0x71 (at most one).
            rtc => Rtc(crate::devices::legacy::cmos::RtcSpec),
            /// The i8042 keyboard controller at ports 0x60/0x64; its reset line reboots (at most one).
            i8042 => I8042(crate::devices::legacy::i8042::I8042Spec),
            /// virtio block devices backed by raw image files.
            block => Block(crate::devices::block::BlockSpec),
            /// virtio network devices backed by host TAP interfaces; hot-pluggable.
            net => Net(crate::devices::net::NetSpec),
            /// virtio consoles (hvc0 …) on the terminal, a file or a unix socket.
            console => Console(crate::devices::console::ConsoleSpec),
            /// virtio entropy devices fed from the host's getrandom.
            rng => Rng(crate::devices::rng::RngSpec),
        }
    };
}
pub(crate) use for_each_device_kind;

macro_rules! define_registry {
    ($( $(#[doc = $doc:literal])* $key:ident => $variant:ident($spec:ty), )*) => {
        /// Every kind of device a machine file can declare.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum DeviceKind { $( $variant, )* }

        impl DeviceKind {
            pub const ALL: &'static [DeviceKind] = &[$( DeviceKind::$variant, )*];

            /// The machine file key of this kind (`net` for `[[net]]`).
            pub fn key(self) -> &'static str {
                match self { $( DeviceKind::$variant => stringify!($key), )* }
            }

            /// What every device of this kind has in common.
            pub fn info(self) -> &'static KindInfo {
                match self { $( DeviceKind::$variant => &<$spec as DeviceKindInfo>::INFO, )* }
            }
        }

        /// A device of any kind, as the machine file declares it (inert data).
        #[derive(Debug, Clone, PartialEq, Serialize)]
        #[serde(untagged)]
        pub enum AnyDevice { $( $variant($spec), )* }

        impl AnyDevice {
            pub fn spec(&self) -> &dyn DeviceSpec {
                match self { $( AnyDevice::$variant(d) => d, )* }
            }
        }

        $(
            impl From<$spec> for AnyDevice {
                fn from(d: $spec) -> AnyDevice { AnyDevice::$variant(d) }
            }
        )*
    };
}
for_each_device_kind!(define_registry);

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.key())
    }
}

/// An edge-triggered interrupt a device raises: an irqfd in a VM, a counter in tests.
pub trait Irq: Send + Sync {
    fn trigger(&self);
}

/// What a device can ask of the VM as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmRequest {
    /// ACPI S5: the guest powered off.
    PowerOff,
    /// The guest pulled the reset line (i8042) or asked for a reset.
    Reset,
}

/// The VM's side of [`VmRequest`]s.
pub trait VmControl: Send + Sync {
    fn request(&self, r: VmRequest);
}

/// A device that could not be built into a VM.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DeviceError(pub String);

/// One MSI(-X) vector of a device: the guest programs its message, the device triggers it.
pub trait MsiVector: Send + Sync {
    /// The message (address, data) the guest wrote to the vector's table entry.
    fn set_message(&self, addr: u64, data: u32) -> Result<(), DeviceError>;
    fn trigger(&self);
}

/// What a device can ask of the running VM (the KVM backend implements it).
pub trait VmHandle: Send + Sync {
    /// Makes guest writes to MMIO address `addr` signal `evt` without an exit to vmm.
    fn register_ioevent(
        &self,
        evt: &vmm_sys_util::eventfd::EventFd,
        addr: u64,
    ) -> Result<(), DeviceError>;
    fn unregister_ioevent(
        &self,
        evt: &vmm_sys_util::eventfd::EventFd,
        addr: u64,
    ) -> Result<(), DeviceError>;
    /// A new MSI vector (a GSI with an irqfd).
    fn msi_vector(&self) -> Result<std::sync::Arc<dyn MsiVector>, DeviceError>;
    /// Moves `dev`'s MMIO range from `from` to `to`; takes effect before the vCPU that asked
    /// re-enters the guest (the bus may be locked by the access that asked).
    fn move_mmio(&self, from: u64, to: u64, len: u64, dev: bus::SharedDevice);
}

/// What a device gets from the VM it is built into. The KVM backend implements it; device code
/// never sees KVM.
pub trait Machine {
    /// The machine's name (as in the machine file); devices derive defaults from it.
    fn machine_name(&self) -> &str;
    /// The interrupt line of an IOAPIC pin (ISA IRQs are identity-mapped; devices may share).
    fn irq_line(&mut self, pin: u8) -> Result<std::sync::Arc<dyn Irq>, DeviceError>;
    fn vm_control(&self) -> std::sync::Arc<dyn VmControl>;
    /// Maps `[base, base + len)` of the I/O port bus to `dev`.
    fn add_pio(&mut self, base: u16, len: u16, dev: bus::SharedDevice) -> Result<(), DeviceError>;
    /// RAM below and above 4 GiB.
    fn ram(&self) -> (u64, u64);
    /// The machine file's directory: relative paths are resolved against it.
    fn base_dir(&self) -> &std::path::Path;
    /// Runtime services of the VM (ioeventfds, MSI vectors, MMIO moves).
    fn vm_handle(&self) -> std::sync::Arc<dyn VmHandle>;
    /// Guest RAM.
    fn guest_memory(&self) -> virtio::GuestMem;
    /// Plugs a PCI function into a slot of bus 0 and maps its BAR (`bar` = (address, size)).
    fn add_pci(
        &mut self,
        slot: u8,
        function: pci::SharedFunction,
        bar: (u64, u64),
        bar_device: bus::SharedDevice,
    ) -> Result<(), DeviceError>;
    /// Opens the host end of the character device `name`; its input (terminal, socket) goes to
    /// `input`.
    fn open_char(
        &mut self,
        name: &str,
        io: &char_io::CharIo,
        input: std::sync::Arc<dyn char_io::CharInput>,
    ) -> Result<char_io::CharOut, DeviceError>;
}

/// Facts shared by all devices of one kind.
#[derive(Debug)]
pub struct KindInfo {
    /// Whether a running VM can gain or lose a device of this kind.
    pub hotpluggable: bool,
    /// The most devices of this kind one machine can have.
    pub max_count: Option<usize>,
}

/// Static facts of a device kind; the registry reads them through [`DeviceKind::info`].
pub trait DeviceKindInfo {
    const INFO: KindInfo;
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
}

/// What a device needs from the machine. The graph allocates it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Needs {
    /// One of these placements on the legacy I/O port bus, the first free one in order.
    Pio(Vec<PioPlacement>),
    /// A virtio device on PCI bus 0; the virtio-pci transport decides BARs and vectors.
    VirtioPci {
        /// virtio device type (virtio 1.2 section 5).
        device_type: u16,
        /// Number of virtqueues.
        queues: u16,
    },
}

/// A device as declared in a machine file, seen by the stages that do not care about its kind.
pub trait DeviceSpec: std::fmt::Debug {
    fn kind(&self) -> DeviceKind;
    /// Unique name in the machine.
    fn name(&self) -> &str;
    /// An explicitly requested PCI slot.
    fn slot(&self) -> Option<PciSlot> {
        None
    }
    fn needs(&self) -> Needs;
    /// Checks of this kind that the schema cannot express (files, host resources).
    fn check(&self, _cx: &mut DeviceCheck<'_, '_>) {}
    /// Builds the device model into a VM at the place the graph gave it.
    fn build(
        &self,
        _at: &crate::graph::Placement,
        _m: &mut dyn Machine,
    ) -> Result<(), DeviceError> {
        Err(DeviceError(format!(
            "`{}` devices are not supported by the KVM backend yet",
            self.kind()
        )))
    }
    /// Settings shown by `vmm graph`, as key/value pairs. `machine` is the machine's name.
    fn describe(&self, _machine: &str) -> Vec<(&'static str, String)> {
        Vec::new()
    }
}
