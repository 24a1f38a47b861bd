//! Modern virtio-pci transport (virtio 1.2 section 4.1).
//!
//! Layout of the single 64-bit memory BAR (BAR 0) every virtio-pci function gets:
//!
//! | offset   | structure                                      |
//! |----------|------------------------------------------------|
//! | 0x0000   | common configuration (virtio_pci_common_cfg)   |
//! | 0x1000   | ISR status                                     |
//! | 0x2000   | device-specific configuration                  |
//! | 0x3000   | notifications, 4 bytes per queue               |
//! | 0x4000   | MSI-X table, 16 bytes per vector               |
//! | 0x6000   | MSI-X pending bit array                        |

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern device IDs are 0x1040 + virtio device type.
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;

pub const COMMON_CFG_OFFSET: u64 = 0x0000;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Size of BAR 0 (a power of two, as PCI requires).
pub const BAR0_SIZE: u64 = 0x8000;

/// Most queues a function supports: the MSI-X table holds 512 vectors, one is for configuration.
pub const MAX_QUEUES: u16 = 511;

/// The resources a virtio-pci function with `queues` virtqueues takes: BAR 0's size and the
/// number of MSI-X vectors (one per queue plus one for configuration changes).
pub fn resources(queues: u16) -> (u64, u16) {
    (BAR0_SIZE, queues.min(MAX_QUEUES) + 1)
}
