//! Transports: how devices appear on a bus. Only this module knows BARs, capabilities and MSI-X.

pub mod virtio_pci;
