//! CMOS real-time clock and NVRAM (MC146818) at I/O ports 0x70–0x71, IRQ 8.
//!
//! Linux's rtc-cmos driver reads the date from it (`hwclock`); the time base is the host's UTC
//! clock.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::devices::{DeviceKind, DeviceKindInfo, DeviceSpec, KindInfo, Needs, PioPlacement};
use crate::spec::units::DeviceName;

/// The CMOS RTC. Write `[[rtc]]` to give the machine one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RtcSpec {
    /// Device name; "rtc" when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<DeviceName>,
}

const PLACEMENT: PioPlacement = PioPlacement {
    label: "cmos",
    ports: &[(0x70, 2)],
    irqs: &[8],
};

impl DeviceKindInfo for RtcSpec {
    const INFO: KindInfo = KindInfo {
        hotpluggable: false,
        max_count: Some(1),
    };
}

impl DeviceSpec for RtcSpec {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Rtc
    }
    fn name(&self) -> &str {
        self.name.as_ref().map_or("rtc", |n| n.as_str())
    }
    fn needs(&self) -> Needs {
        Needs::Pio(vec![PLACEMENT])
    }
}
