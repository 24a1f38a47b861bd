//! Backends that turn a device graph into a running VM. Only `kvm` exists.

pub mod kvm;
pub mod terminal;
