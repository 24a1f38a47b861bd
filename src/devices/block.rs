//! virtio-blk: a block device backed by a raw image file (virtio 1.2 section 5.2).
//!
//! Guest driver: Linux `virtio_blk` (/dev/vdX).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::devices::{DeviceKind, DeviceKindInfo, DeviceSpec, KindInfo, Needs};
use crate::spec::units::{DeviceName, FilePath, PciSlot};
use crate::validate::DeviceCheck;

/// virtio device type of block devices.
pub const VIRTIO_ID_BLOCK: u16 = 2;

/// A virtio block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BlockSpec {
    /// Unique device name.
    pub name: DeviceName,
    /// Raw disk image on the host. Its size is the disk's size.
    pub path: FilePath,
    /// The guest may only read the disk; vmm opens the image read-only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub readonly: bool,
    /// Serial number (ID) the guest sees, up to 20 ASCII characters; the name when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 20))]
    pub serial: Option<String>,
    /// PCI slot on bus 0; the first free static slot when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<PciSlot>,
}

impl DeviceKindInfo for BlockSpec {
    const INFO: KindInfo = KindInfo {
        hotpluggable: false,
        max_count: None,
    };
}

impl DeviceSpec for BlockSpec {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Block
    }
    fn name(&self) -> &str {
        self.name.as_str()
    }
    fn slot(&self) -> Option<PciSlot> {
        self.slot
    }
    fn needs(&self) -> Needs {
        Needs::VirtioPci {
            device_type: VIRTIO_ID_BLOCK,
            queues: 1,
        }
    }
    fn check(&self, cx: &mut DeviceCheck<'_, '_>) {
        if let Some(file) = cx.input_file("path", &self.path, !self.readonly) {
            cx.claim(
                "disk image",
                file.path.display().to_string(),
                "path",
                "give each disk its own image",
            );
            if file.len % 512 != 0 {
                cx.warning(
                    "path",
                    format!(
                        "disk image {} is {} bytes, not a multiple of 512: the guest cannot reach the last {} bytes",
                        file.path.display(),
                        file.len,
                        file.len % 512
                    ),
                );
            }
        }
        if let Some(s) = &self.serial {
            if !s.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
                cx.error("serial", "The serial number must be printable ASCII");
            }
        }
    }
    fn describe(&self, _machine: &str) -> Vec<(&'static str, String)> {
        let mut v = vec![("path", self.path.to_string())];
        if self.readonly {
            v.push(("readonly", "true".into()));
        }
        v
    }
}
