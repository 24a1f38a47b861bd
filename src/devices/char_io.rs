//! Where a character device (serial port, virtio console) sends and gets its bytes.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::units::FilePath;
use crate::validate::DeviceCheck;

/// The host end of a character device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CharIo {
    /// The terminal `vmm up` runs in: output to stdout, keystrokes from stdin. One device at most.
    Stdio,
    /// Not connected: output is discarded, there is no input.
    None,
    /// Output appended to this file (created when missing); no input.
    File(FilePath),
    /// A unix socket vmm listens on; one client at a time reads output and writes input.
    Socket(FilePath),
}

impl CharIo {
    /// Validation shared by every character device: one user of the terminal, distinct files and
    /// sockets, and a parent directory that exists.
    pub fn check(&self, cx: &mut DeviceCheck<'_, '_>, field: &str) {
        match self {
            CharIo::Stdio => cx.claim(
                "the terminal",
                "(stdio)".into(),
                field,
                "connect the other device to a `file` or a `socket`",
            ),
            CharIo::None => {}
            CharIo::File(p) | CharIo::Socket(p) => {
                let sub = if matches!(self, CharIo::File(_)) {
                    "file"
                } else {
                    "socket"
                };
                let at = format!("{field}/{sub}");
                if let Some(abs) = cx.output_path(&at, p) {
                    cx.claim("output path", abs.display().to_string(), &at, "");
                }
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            CharIo::Stdio => "stdio".into(),
            CharIo::None => "none".into(),
            CharIo::File(p) => format!("file:{p}"),
            CharIo::Socket(p) => format!("socket:{p}"),
        }
    }
}
