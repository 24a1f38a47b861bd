//! virtio-console: a console port (hvc0 …) on the terminal, a file or a unix socket
//! (virtio 1.2 section 5.3).
//!
//! Guest driver: Linux `virtio_console` (/dev/hvcN).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::devices::char_io::CharIo;
use crate::devices::{DeviceKind, DeviceKindInfo, DeviceSpec, KindInfo, Needs};
use crate::spec::units::{DeviceName, PciSlot};
use crate::validate::DeviceCheck;

/// virtio device type of consoles.
pub const VIRTIO_ID_CONSOLE: u16 = 3;

/// A virtio console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSpec {
    /// Unique device name.
    pub name: DeviceName,
    /// Where the console's bytes go: "stdio", "none", { file = "…" } or { socket = "…" }.
    pub io: CharIo,
    /// PCI slot on bus 0; the first free static slot when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<PciSlot>,
}

impl DeviceKindInfo for ConsoleSpec {
    const INFO: KindInfo = KindInfo {
        hotpluggable: false,
        max_count: None,
    };
}

impl DeviceSpec for ConsoleSpec {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Console
    }
    fn name(&self) -> &str {
        self.name.as_str()
    }
    fn slot(&self) -> Option<PciSlot> {
        self.slot
    }
    fn needs(&self) -> Needs {
        // receiveq and transmitq of port 0 (no multiport).
        Needs::VirtioPci {
            device_type: VIRTIO_ID_CONSOLE,
            queues: 2,
        }
    }
    fn check(&self, cx: &mut DeviceCheck<'_, '_>) {
        self.io.check(cx, "io");
    }
    fn describe(&self, _machine: &str) -> Vec<(&'static str, String)> {
        vec![("io", self.io.describe())]
    }
}
