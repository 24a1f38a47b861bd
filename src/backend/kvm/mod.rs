//! The KVM backend: the only place that talks to /dev/kvm.

pub mod acpi;
