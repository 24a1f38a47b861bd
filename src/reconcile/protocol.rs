//! The control socket's messages, defined once for the VM (server) and `vmm` (client): one
//! JSON object on one line each way. docs/hotplug.md describes them from these types (a test
//! checks that every field is named there).
//!
//! ```text
//! {"op":"status"}
//! {"op":"plan","path":"/abs/machine.toml","text":"…file text…"}
//! {"op":"apply","path":"/abs/machine.toml","text":"…file text…"}
//! {"op":"stop"}
//! ```

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Verdict;
use crate::graph::diff::Change;

/// What a client asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// The running VM's devices and hotplug slots.
    Status,
    /// Check and plan `text` (the file read from `path`) against the running VM; change nothing.
    Plan { path: PathBuf, text: String },
    /// Check, plan and apply what is live.
    Apply { path: PathBuf, text: String },
    /// Stop the VM.
    Stop,
}

/// What the VM answers. On the wire each kind is told apart by its `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Answer {
    Status(StatusAnswer),
    Edit(EditAnswer),
    Message(MessageAnswer),
}

/// `"status": "ok"` of a status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum StatusOk {
    Ok,
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StatusAnswer {
    /// Always "ok".
    pub status: StatusOk,
    /// The machine's name.
    pub machine: String,
    /// The machine file the VM follows.
    pub file: String,
    pub devices: Vec<DeviceStatus>,
    pub hotplug_slots: Vec<SlotStatus>,
    /// How many hotplug slots are free.
    pub hotplug_free: usize,
    /// The devices asked to leave that the guest has not released yet.
    pub pending_unplugs: Vec<DeviceStatus>,
}

/// One device of the running VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeviceStatus {
    pub name: String,
    /// Its kind's key ("net").
    pub kind: String,
    /// PCI slot, for PCI devices.
    pub slot: Option<u8>,
    /// Whether it sits in a hotplug slot.
    pub hotplug: bool,
    pub state: DeviceState,
    /// Seconds since it was asked to leave (unplugging).
    pub pending_seconds: Option<f64>,
    /// Bytes of console output discarded because nobody read them.
    pub output_dropped: Option<u64>,
    /// Why plugging it failed (plug-failed), or why it failed (failed).
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceState {
    Running,
    /// Asked to leave; the guest has not released it.
    Unplugging,
    /// In the file, but plugging it into the VM failed (see `error`).
    PlugFailed,
    /// In the VM, but it cannot work any more: its vhost-user back end failed (see `error`);
    /// the guest was asked to reset it.
    Failed,
}

/// One hotplug slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SlotStatus {
    pub slot: u8,
    pub state: SlotState,
    /// The device in it.
    pub device: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SlotState {
    Free,
    Used,
    /// Its device was asked to leave and is not gone yet.
    Releasing,
}

/// The answer to `plan` and `apply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EditAnswer {
    /// How the edit ended: "invalid", "no-changes", "needs-restart" or "live".
    pub status: Verdict,
    /// Whether the changes were applied (apply of a live plan).
    pub applied: bool,
    /// The plan, as `vmm plan --format json` prints it.
    pub changes: Vec<Change>,
    /// The problems of an invalid file, as `vmm check --message-format json` prints them.
    pub diagnostics: Vec<serde_json::Value>,
    /// The human report.
    pub text: String,
}

/// `"status"` of a message answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MessageKind {
    /// After `stop`.
    Stopping,
    /// The VM could not take the request (busy, shutting down, a bad request, no answer in time).
    Error,
}

/// A short answer: `stop`'s, or an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MessageAnswer {
    pub status: MessageKind,
    pub text: String,
}

impl Answer {
    pub fn error(text: impl Into<String>) -> Answer {
        Answer::Message(MessageAnswer {
            status: MessageKind::Error,
            text: text.into(),
        })
    }

    /// The answer's one JSON line.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"status":"error","text":"the answer does not serialize: {e}"}}"#)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_round_trip_and_keep_their_kind() {
        let answers = [
            Answer::error("busy"),
            Answer::Message(MessageAnswer {
                status: MessageKind::Stopping,
                text: "the VM is stopping".into(),
            }),
            Answer::Status(StatusAnswer {
                status: StatusOk::Ok,
                machine: "m".into(),
                file: "/m.toml".into(),
                devices: vec![DeviceStatus {
                    name: "n".into(),
                    kind: "net".into(),
                    slot: Some(31),
                    hotplug: true,
                    state: DeviceState::Unplugging,
                    pending_seconds: Some(1.5),
                    output_dropped: None,
                    error: None,
                }],
                hotplug_slots: vec![SlotStatus {
                    slot: 31,
                    state: SlotState::Releasing,
                    device: Some("n".into()),
                }],
                hotplug_free: 0,
                pending_unplugs: Vec::new(),
            }),
            Answer::Edit(EditAnswer {
                status: Verdict::NoChanges,
                applied: false,
                changes: Vec::new(),
                diagnostics: Vec::new(),
                text: "no changes".into(),
            }),
        ];
        for a in answers {
            let line = a.to_line();
            let back: Answer = serde_json::from_str(&line).unwrap();
            assert_eq!(back, a, "{line}");
        }
        let r: Request = serde_json::from_str(r#"{"op":"plan","path":"/x","text":"t"}"#).unwrap();
        assert!(matches!(r, Request::Plan { .. }));
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
    }

    /// Every field name of the protocol's types, from their schema.
    fn fields(v: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(props) = m.get("properties").and_then(|p| p.as_object()) {
                    out.extend(props.keys().cloned());
                }
                m.values().for_each(|x| fields(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| fields(x, out)),
            _ => {}
        }
    }

    #[test]
    fn docs_name_every_field() {
        let docs = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/hotplug.md"),
        )
        .unwrap();
        let mut names = std::collections::BTreeSet::new();
        fields(&schemars::schema_for!(Request).to_value(), &mut names);
        fields(&schemars::schema_for!(Answer).to_value(), &mut names);
        // `changes` and `diagnostics` are documented where they come from (vmm plan / check).
        let ignore = [
            "class", "action", "subject", "detail", "reason", "span", "side", "start", "end",
        ];
        let missing: Vec<_> = names
            .iter()
            .filter(|n| !ignore.contains(&n.as_str()) && !docs.contains(&format!("`{n}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/hotplug.md does not name {missing:?}"
        );
        assert!(
            names.contains("pending_seconds") && names.contains("op"),
            "{names:?}"
        );
    }
}
