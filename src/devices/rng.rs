//! virtio-rng: an entropy source fed from the host's getrandom (virtio 1.2 section 5.4).
//!
//! Guest driver: Linux `virtio_rng` (/dev/hwrng).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::devices::{DeviceKind, DeviceKindInfo, DeviceSpec, KindInfo, Needs};
use crate::spec::units::{ByteSize, DeviceName, PciSlot};
use crate::validate::DeviceCheck;

/// virtio device type of entropy devices.
pub const VIRTIO_ID_RNG: u16 = 4;

/// A virtio entropy device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RngSpec {
    /// Unique device name.
    pub name: DeviceName,
    /// Most bytes per second handed to the guest, e.g. "64K"; unlimited when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<ByteSize>,
    /// PCI slot on bus 0; the first free static slot when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<PciSlot>,
}

impl DeviceKindInfo for RngSpec {
    const INFO: KindInfo = KindInfo {
        hotpluggable: false,
        max_count: None,
    };
}

impl DeviceSpec for RngSpec {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Rng
    }
    fn name(&self) -> &str {
        self.name.as_str()
    }
    fn slot(&self) -> Option<PciSlot> {
        self.slot
    }
    fn needs(&self) -> Needs {
        Needs::VirtioPci {
            device_type: VIRTIO_ID_RNG,
            queues: 1,
        }
    }
    fn check(&self, cx: &mut DeviceCheck<'_, '_>) {
        if self.rate == Some(ByteSize(0)) {
            cx.error("rate", "A rate of 0 bytes per second starves the guest")
                .help("remove `rate` for no limit");
        }
    }
    fn describe(&self, _machine: &str) -> Vec<(&'static str, String)> {
        match self.rate {
            Some(r) => vec![("rate", format!("{r}/s"))],
            None => Vec::new(),
        }
    }
}
