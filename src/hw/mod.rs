//! The machine's infrastructure that device kinds plug into: the I/O port and MMIO buses, PCI
//! bus 0, the virtio-pci transport and MSI-X, the virtio worker helpers, character I/O, the PCI
//! hotplug controller and the ACPI power-management registers. Nothing here names a device
//! kind; the KVM backend implements the traits below, so device code never sees KVM.

pub mod bus;
pub mod char_io;
pub mod hotplug;
pub mod msix;
pub mod pci;
pub mod platform;
pub mod served;
pub mod transport;
pub mod virtio;

pub use crate::contract::DeviceError;

/// An edge-triggered interrupt a device raises: an irqfd in a VM, a counter in tests.
pub trait Irq: Send + Sync + std::fmt::Debug {
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
pub trait VmControl: Send + Sync + std::fmt::Debug {
    fn request(&self, r: VmRequest);
}

/// One MSI(-X) vector of a device: the guest programs its message, the device triggers it.
pub trait MsiVector: Send + Sync + std::fmt::Debug {
    /// The message (address, data) the guest wrote to the vector's table entry.
    fn set_message(&self, addr: u64, data: u32) -> Result<(), DeviceError>;
    fn trigger(&self);
}

/// What a device can ask of the running VM (the KVM backend implements it).
pub trait VmHandle: Send + Sync + std::fmt::Debug {
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
/// Why a device cannot work any more (its back end failed), or `None` while it can: asked
/// when `vmm status` runs.
pub type Health = std::sync::Arc<dyn Fn() -> Option<String> + Send + Sync>;

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
    /// Lets `vmm status` show when device `name` fails (a vhost-user back end that died).
    fn watch_health(&mut self, _name: &str, _health: Health) {}
}
