//! The device kinds and their registry.
//!
//! Every kind lives in one file (or a folder, once it outgrows one) that holds, in order: what
//! it is, its spec struct (what a machine file says about it) with its [`KindInfo`], its device
//! model, how it is served through vhost-user, and its tests. The registry below is the one
//! list of kinds: adding a device is one file plus one line in [`for_each_device_kind`]. The
//! stages ask a device through [`crate::contract`] ([`DeviceSpec::needs`], `check`, `describe`),
//! the backend through [`Device`]; nothing else names a kind.
//!
//! Device files import [`crate::contract`] (what the stages know) and [`crate::hw`] (what a VM
//! offers), never a stage.

pub mod block;
pub mod console;
pub mod legacy;
pub mod net;
pub mod rng;
pub mod vhost_user;

use serde::Serialize;

use crate::contract::{DeviceError, DeviceKindInfo, DeviceSpec, KindInfo, Placement};
use crate::hw::Machine;
use crate::hw::served::Served;

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
            /// Devices served by another process, a vhost-user back end on a unix socket (virtiofsd, qemu-storage-daemon, `vmm device`, vhost-device-*).
            vhost_user => VhostUser(crate::devices::vhost_user::VhostUserSpec),
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

            /// The kind's description (its doc comment in the registry).
            pub fn doc(self) -> &'static str {
                match self { $( DeviceKind::$variant => concat!($($doc),*).trim_ascii(), )* }
            }

            /// The kind whose key is `key`.
            pub fn from_key(key: &str) -> Option<DeviceKind> {
                match key { $( stringify!($key) => Some(DeviceKind::$variant), )* _ => None }
            }

            /// The JSON Schema of one device of this kind (its spec struct), definitions
            /// included.
            pub fn schema(self) -> serde_json::Value {
                let g = schemars::generate::SchemaSettings::draft07().into_generator();
                match self {
                    $( DeviceKind::$variant => g.into_root_schema_for::<$spec>().to_value(), )*
                }
            }

            /// A device of this kind from its keys (as `vmm device` assembles them).
            pub fn parse(self, v: serde_json::Value) -> Result<AnyDevice, String> {
                match self {
                    $( DeviceKind::$variant => serde_path_to_error::deserialize::<_, $spec>(v)
                        .map(AnyDevice::$variant)
                        .map_err(|e| match e.path().to_string().as_str() {
                            "." => e.inner().to_string(),
                            p => format!("--{}: {}", p.replace('_', "-"), e.inner()),
                        }), )*
                }
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
            /// What the stages see of it.
            pub fn spec(&self) -> &dyn DeviceSpec {
                match self { $( AnyDevice::$variant(d) => d, )* }
            }
            /// What the backend and `vmm device` do with it.
            pub fn device(&self) -> &dyn Device {
                match self { $( AnyDevice::$variant(d) => d, )* }
            }
            pub fn kind(&self) -> DeviceKind {
                match self { $( AnyDevice::$variant(_) => DeviceKind::$variant, )* }
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

impl DeviceKind {
    /// Every kind's worker allowlist (the launcher's filter allows their union).
    pub fn seccomp_lists() -> Vec<&'static crate::sandbox::Allow> {
        DeviceKind::ALL.iter().map(|k| k.info().seccomp).collect()
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.key())
    }
}

/// What the backend does with a device of a kind: build it into a VM, or serve it through
/// vhost-user (`vmm device <kind>`). The transport is the caller's choice; the model is the
/// device's.
pub trait Device: DeviceSpec {
    /// Builds the device model into a VM at the place the graph gave it.
    fn build(&self, _at: &Placement, _m: &mut dyn Machine) -> Result<(), DeviceError> {
        Err(DeviceError(format!(
            "`{}` devices are not supported by the KVM backend yet",
            self.info().key
        )))
    }
    /// The device's model as a vhost-user backend serves it, or `None` when the kind is not
    /// served through `vmm device` (legacy devices). Relative paths resolve against `base`.
    fn served(&self, _base: &std::path::Path) -> Option<Result<Box<dyn Served>, DeviceError>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_declares_its_own_key() {
        for k in DeviceKind::ALL {
            assert_eq!(k.info().key, k.key(), "{k:?}");
            assert_eq!(DeviceKind::from_key(k.key()), Some(*k));
        }
    }
}
