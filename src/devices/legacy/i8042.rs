//! i8042 keyboard controller at I/O ports 0x60 and 0x64 (IRQ 1, 12).
//!
//! Enough of the controller for Linux's i8042 probe, and its reset line: a guest writing 0xFE to
//! port 0x64 (`reboot`) ends the VM.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::devices::{DeviceKind, DeviceKindInfo, DeviceSpec, KindInfo, Needs, PioPlacement};
use crate::spec::units::DeviceName;

/// The i8042 controller. Write `[[i8042]]` to give the machine one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct I8042Spec {
    /// Device name; "i8042" when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<DeviceName>,
}

const PLACEMENT: PioPlacement = PioPlacement {
    label: "i8042",
    ports: &[(0x60, 1), (0x64, 1)],
    irqs: &[1, 12],
};

impl DeviceKindInfo for I8042Spec {
    const INFO: KindInfo = KindInfo {
        hotpluggable: false,
        max_count: Some(1),
    };
}

impl DeviceSpec for I8042Spec {
    fn kind(&self) -> DeviceKind {
        DeviceKind::I8042
    }
    fn name(&self) -> &str {
        self.name.as_ref().map_or("i8042", |n| n.as_str())
    }
    fn needs(&self) -> Needs {
        Needs::Pio(vec![PLACEMENT])
    }
}
