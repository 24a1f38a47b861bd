//! `[[vhost_user]]`: any vhost-user back end as a virtio device (the vhost-user front end).
//!
//! The back end is another process that listens on a unix socket: `vmm device <kind>`,
//! qemu-storage-daemon, virtiofsd, vhost-device-*. vmm connects when the VM is built,
//! negotiates (features, protocol features, queue count, configuration space), and serves the
//! device to the guest through the same virtio-pci transport as its in-process devices; the
//! guest's notifications go to the back end as ioeventfds, its completions come back as
//! eventfds that vmm relays to the queue's MSI-X vector (masking stays exact). The guest's
//! driver is the one for the device type (Linux `virtio_blk` for `device = "block"`).
//!
//! The connection and its protocol are in [`frontend`]; this file is the machine-file side.

pub mod frontend;

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::contract::check::DeviceCheck;
use crate::contract::units::{DeviceName, FilePath, PciSlot};
use crate::contract::{DeviceError, DeviceKindInfo, DeviceSpec, KindInfo, Needs, VirtioInfo};
use crate::devices::Device;

/// The device types vmm knows by name: (name, virtio device ID, default queue count, bytes of
/// configuration space read from the back end, PCI class and subclass). IDs and configuration
/// layouts from virtio 1.2 section 5.
const TYPES: &[TypeFacts] = &[
    TypeFacts::new("net", 1, Some(2), 12, (0x02, 0x00)),
    TypeFacts::new("block", 2, Some(1), 60, (0x01, 0x00)),
    TypeFacts::new("console", 3, Some(2), 12, (0x07, 0x80)),
    TypeFacts::new("rng", 4, Some(1), 0, (0xff, 0x00)),
    TypeFacts::new("scsi", 8, Some(3), 36, (0x01, 0x00)),
    TypeFacts::new("9p", 9, Some(1), 0, (0xff, 0x00)),
    TypeFacts::new("gpu", 16, Some(2), 24, (0x03, 0x80)),
    TypeFacts::new("input", 18, Some(2), 136, (0x09, 0x80)),
    TypeFacts::new("vsock", 19, Some(3), 8, (0xff, 0x00)),
    TypeFacts::new("sound", 25, Some(4), 16, (0x04, 0x01)),
    TypeFacts::new("fs", 26, Some(2), 40, (0x01, 0x80)),
    TypeFacts::new("scmi", 32, Some(2), 0, (0xff, 0x00)),
    TypeFacts::new("i2c", 34, Some(1), 0, (0xff, 0x00)),
    TypeFacts::new("can", 36, Some(3), 2, (0xff, 0x00)),
    TypeFacts::new("gpio", 41, Some(2), 8, (0xff, 0x00)),
];

/// Highest virtio device ID a modern virtio-pci function can carry (PCI device 0x1040 + ID,
/// at most 0x107f).
pub const MAX_TYPE: u16 = 63;
/// Most queues a `[[vhost_user]]` device may declare.
pub const MAX_QUEUES: u16 = 64;
/// Most bytes of configuration space vhost-user carries (VHOST_USER_MAX_CONFIG_SIZE).
pub const MAX_CONFIG: u16 = 256;

#[derive(Debug, Clone, Copy)]
struct TypeFacts {
    name: &'static str,
    id: u16,
    queues: Option<u16>,
    config: u16,
    class: (u8, u8),
}

impl TypeFacts {
    const fn new(
        name: &'static str,
        id: u16,
        queues: Option<u16>,
        config: u16,
        class: (u8, u8),
    ) -> TypeFacts {
        TypeFacts {
            name,
            id,
            queues,
            config,
            class,
        }
    }
}

/// A virtio device type: a name vmm knows ("block") or a device ID (1–63).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceType(pub u16);

impl DeviceType {
    fn facts(self) -> Option<&'static TypeFacts> {
        TYPES.iter().find(|t| t.id == self.0)
    }
    /// Its name, or its number when vmm knows no name for it.
    pub fn label(self) -> String {
        self.facts()
            .map_or_else(|| self.0.to_string(), |t| t.name.to_string())
    }
}

impl Serialize for DeviceType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.facts() {
            Some(t) => s.serialize_str(t.name),
            None => s.serialize_u16(self.0),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DeviceType, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = DeviceType;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "a virtio device type name or an ID from 1 to {MAX_TYPE}")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DeviceType, E> {
                TYPES
                    .iter()
                    .find(|t| t.name == v)
                    .map(|t| DeviceType(t.id))
                    .ok_or_else(|| {
                        let names: Vec<&str> = TYPES.iter().map(|t| t.name).collect();
                        E::custom(format!(
                            "unknown virtio device type `{v}`; known names: {}, or give the device ID (1–{MAX_TYPE})",
                            names.join(", ")
                        ))
                    })
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<DeviceType, E> {
                match u16::try_from(v) {
                    Ok(n) if (1..=MAX_TYPE).contains(&n) => Ok(DeviceType(n)),
                    _ => Err(E::custom(format!(
                        "virtio device ID {v} is out of range (1–{MAX_TYPE})"
                    ))),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<DeviceType, E> {
                match u64::try_from(v) {
                    Ok(u) => self.visit_u64(u),
                    Err(_) => Err(E::custom(format!(
                        "virtio device ID {v} is out of range (1–{MAX_TYPE})"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for DeviceType {
    fn schema_name() -> Cow<'static, str> {
        "VirtioDeviceType".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let names: Vec<&str> = TYPES.iter().map(|t| t.name).collect();
        json_schema!({
            "description": "The virtio device type the back end serves: a name, or the virtio device ID (virtio 1.2 section 5).",
            "anyOf": [
                { "type": "string", "enum": names },
                { "type": "integer", "minimum": 1, "maximum": MAX_TYPE }
            ]
        })
    }
}

/// A device served by a vhost-user back end that listens on a unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VhostUserSpec {
    /// Unique device name.
    pub name: DeviceName,
    /// The unix socket the back end listens on (it must be running when the VM starts).
    pub socket: FilePath,
    /// The virtio device type the back end serves, e.g. "block", "fs", "vsock", or its ID.
    pub device: DeviceType,
    /// Number of virtqueues (1–64); the type's usual count when omitted (block 1, net 2,
    /// fs 2: one high-priority and one request queue). Required for types given by ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub queues: Option<u16>,
    /// Most descriptors per virtqueue offered to the driver, a power of two (default 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32768))]
    pub queue_size: Option<u16>,
    /// Bytes of the device configuration space to read from the back end (0–256); the size
    /// of the type's configuration structure when omitted (block 60, fs 40, rng 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 256))]
    pub config_size: Option<u16>,
    /// PCI slot on bus 0; a free hotplug slot (else static slot) when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<PciSlot>,
}

/// Queue size offered when the file gives none (the back ends vmm is tested with take 1024).
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

impl VhostUserSpec {
    /// The queue count, or why there is none.
    fn queue_count(&self) -> Result<u16, String> {
        match (self.queues, self.device.facts()) {
            (Some(n), _) => Ok(n),
            (None, Some(t)) => Ok(t.queues.unwrap_or(1)),
            (None, None) => Err(format!(
                "vmm does not know how many queues virtio device type {} has",
                self.device.0
            )),
        }
    }

    /// What the transport and the graph see: the type, its queues and their sizes.
    pub fn virtio_info(&self) -> VirtioInfo {
        let n = self.queue_count().unwrap_or(1).clamp(1, MAX_QUEUES);
        let size = self.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE);
        VirtioInfo {
            device_type: self.device.0,
            queue_sizes: Cow::Owned(vec![size; usize::from(n)]),
            pci_class: self.device.facts().map_or((0xff, 0x00), |t| t.class),
        }
    }

    /// Bytes of configuration space read from the back end.
    pub fn config_len(&self) -> u16 {
        self.config_size
            .unwrap_or_else(|| self.device.facts().map_or(0, |t| t.config))
            .min(MAX_CONFIG)
    }

    /// What to start, for messages about a missing back end.
    fn start_hint(&self) -> String {
        let s = &self.socket;
        match self.device.facts().map(|t| t.name) {
            Some("block") => format!(
                "start the back end first, e.g. `vmm device block --socket {s} --path disk.img` or `qemu-storage-daemon --blockdev file,filename=disk.img,node-name=d --export vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={s}`"
            ),
            Some(k @ ("net" | "console" | "rng")) => {
                format!("start the back end first, e.g. `vmm device {k} --socket {s} ...`")
            }
            Some("fs") => format!(
                "start the back end first, e.g. `virtiofsd --socket-path {s} --shared-dir DIR`"
            ),
            _ => format!("start the vhost-user back end that listens on {s} first"),
        }
    }
}

/// The front end's worker: vhost-user messages on the back end's socket (sendmsg/recvmsg,
/// descriptors attached), relaying the back end's call eventfds to the queues' interrupts,
/// and the socket's read timeout (a back end that stops answering).
pub const SECCOMP: crate::sandbox::Allow = crate::sandbox::Allow {
    kind: "vhost-user front end",
    calls: &[
        crate::sandbox::call!(SYS_sendmsg),
        crate::sandbox::call!(SYS_recvmsg),
        crate::sandbox::call!(SYS_recvfrom),
    ],
    on_vcpu: &[],
};

impl DeviceKindInfo for VhostUserSpec {
    const INFO: KindInfo = KindInfo {
        key: "vhost_user",
        noun: "vhost-user device",
        // Plugged once connected and negotiated (a missing back end refuses the plug); removed
        // once the guest released it, which closes the connection.
        hotpluggable: true,
        max_count: None,
        aliases: &["vhost-user", "vhostuser", "vhost"],
        platform: &[],
        vhost_user: None,
        seccomp: &SECCOMP,
    };
}

impl DeviceSpec for VhostUserSpec {
    fn info(&self) -> &'static KindInfo {
        &Self::INFO
    }
    fn name(&self) -> &str {
        self.name.as_str()
    }
    fn slot(&self) -> Option<PciSlot> {
        self.slot
    }
    fn needs(&self) -> Needs {
        Needs::VirtioPci(self.virtio_info())
    }
    fn check(&self, cx: &mut dyn DeviceCheck) {
        if self.device.0 == 16 {
            cx.error(
                "device",
                "A vhost-user GPU cannot be driven as a generic device: it needs its own socket for scanouts (VHOST_USER_GPU_SET_SOCKET)".into(),
            );
        }
        if let Err(why) = self.queue_count() {
            cx.error("device", why)
                .help("give `queues`, the number of virtqueues the back end serves");
        }
        if let Some(n) = self.queues
            && !(1..=MAX_QUEUES).contains(&n)
        {
            cx.error(
                "queues",
                format!("{n} queues: a vhost-user device has 1 to {MAX_QUEUES}"),
            );
        }
        if let Some(q) = self.queue_size
            && !q.is_power_of_two()
        {
            cx.error(
                "queue_size",
                format!("A queue size of {q} is not a power of two"),
            )
            .help("use 128, 256, 512 or 1024");
        }
        if let Some(c) = self.config_size
            && c > MAX_CONFIG
        {
            cx.error(
                "config_size",
                format!("vhost-user carries at most {MAX_CONFIG} bytes of configuration space"),
            );
        }
        if let Some(p) = cx.backend_socket("socket", &self.socket, &self.start_hint()) {
            cx.claim(
                "vhost-user socket",
                p.display().to_string(),
                "socket",
                "a back end serves one front end: start one per device",
            );
        }
    }
    fn unplug_note(&self) -> Option<&'static str> {
        match self.device.0 {
            2 | 8 => Some(crate::devices::block::DISK_UNPLUG_NOTE),
            9 | 26 => Some(
                "unmount the share in the guest first: Linux cannot release a device whose file system is mounted",
            ),
            _ => None,
        }
    }
    fn describe(&self, _machine: &str) -> Vec<(&'static str, String)> {
        vec![
            ("socket", self.socket.to_string()),
            ("device", self.device.label()),
        ]
    }
}

impl Device for VhostUserSpec {
    fn build(
        &self,
        at: &crate::contract::Placement,
        m: &mut dyn crate::hw::Machine,
    ) -> Result<(), DeviceError> {
        let path = self.socket.resolve(m.base_dir());
        let dev = frontend::VhostUserDevice::connect(
            self.name.as_str(),
            &path,
            self.virtio_info(),
            self.config_len(),
        )
        .map_err(|e| {
            if e.not_listening() {
                DeviceError(format!("{e}; {}", self.start_hint()))
            } else {
                DeviceError(e.to_string())
            }
        })?;
        m.watch_health(self.name.as_str(), dev.health());
        crate::hw::transport::virtio_pci::plug(self.name.as_str(), Box::new(dev), at, m)
    }
}

#[cfg(test)]
mod tests;
