//! 16550A UART on the legacy I/O ports (COM1–COM4).
//!
//! Linux's 8250 driver finds COM1–COM4 at their conventional ports and IRQs without firmware
//! help (`console=ttyS0`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::devices::char_io::CharIo;
use crate::devices::{DeviceKind, DeviceKindInfo, DeviceSpec, KindInfo, Needs, PioPlacement};
use crate::spec::units::DeviceName;
use crate::validate::DeviceCheck;

/// A 16550A serial port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SerialSpec {
    /// Unique device name.
    pub name: DeviceName,
    /// Legacy port; the first free one (in name order) when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<ComPort>,
    /// Where the port's bytes go: "stdio", "none", { file = "…" } or { socket = "…" }.
    pub io: CharIo,
}

/// A conventional PC serial port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ComPort {
    /// I/O ports 0x3f8–0x3ff, IRQ 4 (Linux ttyS0).
    Com1,
    /// I/O ports 0x2f8–0x2ff, IRQ 3 (ttyS1).
    Com2,
    /// I/O ports 0x3e8–0x3ef, IRQ 4, shared with COM1 (ttyS2).
    Com3,
    /// I/O ports 0x2e8–0x2ef, IRQ 3, shared with COM2 (ttyS3).
    Com4,
}

pub const COM_PORTS: [PioPlacement; 4] = [
    PioPlacement {
        label: "com1",
        ports: &[(0x3f8, 8)],
        irqs: &[4],
    },
    PioPlacement {
        label: "com2",
        ports: &[(0x2f8, 8)],
        irqs: &[3],
    },
    PioPlacement {
        label: "com3",
        ports: &[(0x3e8, 8)],
        irqs: &[4],
    },
    PioPlacement {
        label: "com4",
        ports: &[(0x2e8, 8)],
        irqs: &[3],
    },
];

impl DeviceKindInfo for SerialSpec {
    const INFO: KindInfo = KindInfo {
        hotpluggable: false,
        max_count: Some(4),
    };
}

impl DeviceSpec for SerialSpec {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Serial
    }
    fn name(&self) -> &str {
        self.name.as_str()
    }
    fn needs(&self) -> Needs {
        match self.port {
            Some(p) => Needs::Pio(vec![COM_PORTS[p as usize].clone()]),
            None => Needs::Pio(COM_PORTS.to_vec()),
        }
    }
    fn check(&self, cx: &mut DeviceCheck<'_, '_>) {
        self.io.check(cx, "io");
    }
    fn describe(&self, _machine: &str) -> Vec<(&'static str, String)> {
        vec![("io", self.io.describe())]
    }
}
