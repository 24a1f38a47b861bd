//! virtio-net: a network device backed by a host TAP interface (virtio 1.2 section 5.1).
//!
//! Guest driver: Linux `virtio_net` (ethN). Hot-pluggable into the machine's hotplug slots.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::devices::{DeviceKind, DeviceKindInfo, DeviceSpec, KindInfo, Needs};
use crate::spec::units::{DeviceName, MacAddr, PciSlot};
use crate::validate::DeviceCheck;

/// virtio device type of network devices.
pub const VIRTIO_ID_NET: u16 = 1;

/// A virtio network device on a host TAP interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    /// Unique device name; a running VM's NICs are matched by it across edits.
    pub name: DeviceName,
    /// Host TAP interface, e.g. "tap0": opened if it exists, created if not.
    #[schemars(regex(pattern = r"^[A-Za-z0-9_.-]{1,15}$"))]
    pub tap: String,
    /// Guest MAC address; derived from the machine and device names when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// PCI slot on bus 0; a free hotplug slot (else static slot) when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<PciSlot>,
}

impl NetSpec {
    /// The MAC the guest sees: the configured one, or one derived from `machine/name`.
    pub fn effective_mac(&self, machine: &str) -> MacAddr {
        self.mac
            .unwrap_or_else(|| MacAddr::derived(&format!("{machine}/{}", self.name)))
    }
}

impl DeviceKindInfo for NetSpec {
    const INFO: KindInfo = KindInfo {
        hotpluggable: true,
        max_count: None,
    };
}

impl DeviceSpec for NetSpec {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Net
    }
    fn name(&self) -> &str {
        self.name.as_str()
    }
    fn slot(&self) -> Option<PciSlot> {
        self.slot
    }
    fn needs(&self) -> Needs {
        Needs::VirtioPci {
            device_type: VIRTIO_ID_NET,
            queues: 2,
        }
    }
    fn check(&self, cx: &mut DeviceCheck<'_, '_>) {
        cx.claim(
            "TAP interface",
            self.tap.clone(),
            "tap",
            "give each NIC its own TAP",
        );
        let mac = self.effective_mac(cx.machine_name());
        if let Some(m) = self.mac {
            if m.is_multicast() {
                cx.error("mac", format!("MAC {m} is a multicast address"))
                    .help("the first byte must be even; locally administered unicast MACs start with 02");
            } else if m.0 == [0; 6] {
                cx.error("mac", "MAC 00:00:00:00:00:00 is not a usable address");
            }
        }
        let (field, help) = if self.mac.is_some() {
            ("mac", "remove `mac` to get one derived from the name")
        } else {
            ("name", "set `mac` explicitly on one of them")
        };
        cx.claim("MAC", mac.to_string(), field, help);
    }
    fn describe(&self, machine: &str) -> Vec<(&'static str, String)> {
        vec![
            ("tap", self.tap.clone()),
            ("mac", self.effective_mac(machine).to_string()),
        ]
    }
}
