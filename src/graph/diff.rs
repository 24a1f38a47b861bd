//! Plans: what it takes to turn one machine into another.
//!
//! Devices are matched by name, never by position, and the new file is lowered with the old
//! graph's placements as hints, so reordering or reformatting a file plans nothing. Each change is
//! `hot-apply` (a running VM can take it: today, adding or removing a virtio-net device in a
//! hotplug slot) or `needs-restart`, with the span of what changed.

use std::ops::Range;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{DeviceGraph, DeviceNode, Placement, lower_with};
use crate::diag::{Diag, Diags};
use crate::spec::schema::display_path;
use crate::spec::source::escape_token;
use crate::validate::ValidSpec;

/// Whether a running VM can take a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    HotApply,
    NeedsRestart,
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Class::HotApply => "hot-apply",
            Class::NeedsRestart => "needs-restart",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Add,
    Remove,
    Change,
}

/// Which file a change's span points into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    Old,
    New,
}

/// One difference between two machines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Change {
    pub class: Class,
    pub action: Action,
    /// The device's name, for device changes.
    pub device: Option<String>,
    /// What changed, e.g. "net `eth1`" or "memory".
    pub subject: String,
    /// How, e.g. "into hotplug slot 30" or "64M → 128M".
    pub detail: String,
    /// Why a restart is needed.
    pub reason: Option<String>,
    /// What the guest should do first, for a live change (a disk removal: unmount it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub span: Range<usize>,
    pub side: Side,
}

/// The changes from one machine to another, in file order.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Plan {
    pub changes: Vec<Change>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
    /// True when a running VM can take every change.
    pub fn is_live(&self) -> bool {
        self.changes.iter().all(|c| c.class == Class::HotApply)
    }
    pub fn count(&self, class: Class) -> usize {
        self.changes.iter().filter(|c| c.class == class).count()
    }
    /// Restart-only changes as diagnostics against the file their span points into.
    pub fn restart_diags(&self, side: Side) -> Diags {
        self.changes
            .iter()
            .filter(|c| c.class == Class::NeedsRestart && c.side == side)
            .map(|c| {
                let mut d =
                    Diag::warning("vmm::needs-restart", format!("{}: {}", c.subject, c.detail))
                        .label(c.span.clone(), "changed here");
                if let Some(r) = &c.reason {
                    d = d.help(r.clone());
                }
                d
            })
            .collect()
    }
}

/// Plans the change from `old` (lowered as `old_graph`) to `new`. Errors are the new file's
/// lowering problems (e.g. no free slot).
pub fn plan(
    old: &ValidSpec,
    old_graph: &DeviceGraph,
    new: &ValidSpec,
) -> Result<(Plan, DeviceGraph), Diags> {
    plan_avoiding(old, old_graph, new, &Default::default())
}

/// [`plan`] for a running VM that is still emptying the slots in `avoid`: new devices go
/// elsewhere while other hotplug slots are free.
pub fn plan_avoiding(
    old: &ValidSpec,
    old_graph: &DeviceGraph,
    new: &ValidSpec,
    avoid: &std::collections::BTreeSet<u8>,
) -> Result<(Plan, DeviceGraph), Diags> {
    let mut hints = old_graph.hints();
    hints.avoid = avoid.clone();
    let new_graph = lower_with(new, &hints)?;
    let mut changes = Vec::new();
    machine_changes(old, new, &mut changes);
    device_changes(old, old_graph, new, &new_graph, &mut changes);
    changes.sort_by_key(|c| (c.side == Side::Old, c.span.start));
    Ok((Plan { changes }, new_graph))
}

fn show(v: Option<&Value>) -> String {
    match v {
        None => "(unset)".into(),
        Some(Value::String(s)) => format!("{s:?}"),
        Some(v) => v.to_string(),
    }
}

/// Leaf paths under `ptr` where `a` and `b` differ.
fn differing(ptr: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<String>) {
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                differing(
                    &format!("{ptr}/{}", escape_token(k)),
                    x.get(k),
                    y.get(k),
                    out,
                );
            }
        }
        (a, b) if a != b => out.push(ptr.to_string()),
        _ => {}
    }
}

fn machine_changes(old: &ValidSpec, new: &ValidSpec, out: &mut Vec<Change>) {
    let mut a = serde_json::to_value(old.spec()).unwrap_or_default();
    let mut b = serde_json::to_value(new.spec()).unwrap_or_default();
    // Devices are compared by name below.
    for kind in crate::devices::DeviceKind::ALL {
        if let (Some(x), Some(y)) = (a.as_object_mut(), b.as_object_mut()) {
            x.remove(kind.key());
            y.remove(kind.key());
        }
    }
    let mut paths = Vec::new();
    differing("", Some(&a), Some(&b), &mut paths);
    for p in paths {
        let (side, span) = match new.loaded().spans.get(&p) {
            Some(_) => (Side::New, new.loaded().spans.entry(&p)),
            None => (Side::Old, old.loaded().spans.entry(&p)),
        };
        out.push(Change {
            class: Class::NeedsRestart,
            action: Action::Change,
            device: None,
            subject: display_path(&p),
            detail: format!("{} → {}", show(a.pointer(&p)), show(b.pointer(&p))),
            reason: Some("machine settings are fixed while the VM runs".into()),
            note: None,
            span,
            side,
        });
    }
}

/// Pointer of the device called `name` in a spec ("/net/1").
fn device_ptr(v: &ValidSpec, name: &str) -> Option<String> {
    v.spec()
        .devices()
        .into_iter()
        .find(|(_, d)| d.name() == name)
        .map(|(p, _)| p)
}

fn where_(n: &DeviceNode) -> String {
    match &n.placement {
        Placement::Pci {
            slot,
            hotplug: true,
            ..
        } => format!("hotplug slot {slot}"),
        Placement::Pci { slot, .. } => format!("static slot {slot}"),
        Placement::Pio { label, .. } => label.to_string(),
    }
}

fn live(n: &DeviceNode) -> bool {
    n.kind.info().hotpluggable && matches!(n.placement, Placement::Pci { hotplug: true, .. })
}

fn device_changes(
    old: &ValidSpec,
    og: &DeviceGraph,
    new: &ValidSpec,
    ng: &DeviceGraph,
    out: &mut Vec<Change>,
) {
    for o in og.devices.iter().filter(|o| ng.device(&o.name).is_none()) {
        out.push(removed(old, o));
    }
    for n in &ng.devices {
        match og.device(&n.name) {
            None => out.push(added(new, og, ng, n)),
            Some(o) if o != n => changed(new, o, n, out),
            Some(_) => {}
        }
    }
}

fn class(live: bool) -> Class {
    if live {
        Class::HotApply
    } else {
        Class::NeedsRestart
    }
}

fn removed(old: &ValidSpec, o: &DeviceNode) -> Change {
    let ptr = device_ptr(old, &o.name).unwrap_or_default();
    let reason = (!live(o)).then(|| {
        if o.kind.info().hotpluggable {
            format!("`{}` is in {}, not a hotplug slot", o.name, where_(o))
        } else {
            format!("`{}` devices cannot be removed from a running VM", o.kind)
        }
    });
    let note = live(o)
        .then(|| o.spec.spec().unplug_note().map(str::to_string))
        .flatten();
    Change {
        class: class(live(o)),
        action: Action::Remove,
        device: Some(o.name.clone()),
        subject: format!("{} `{}`", o.kind, o.name),
        detail: format!("remove from {}", where_(o)),
        reason,
        note,
        span: old.loaded().spans.entry(&format!("{ptr}/name")),
        side: Side::Old,
    }
}

fn added(new: &ValidSpec, og: &DeviceGraph, ng: &DeviceGraph, n: &DeviceNode) -> Change {
    let ptr = device_ptr(new, &n.name).unwrap_or_default();
    let free_hotplug = ng.hotplug_slots().filter(|s| s.occupant.is_none()).count();
    let reason = (!live(n)).then(|| {
        if !n.kind.info().hotpluggable {
            format!("`{}` devices cannot be added to a running VM", n.kind)
        } else if free_hotplug == 0 || og.hotplug_slots().all(|s| s.occupant.is_some()) {
            format!(
                "no free hotplug slot: raise `pci.hotplug_slots` (needs a restart) or remove a {}",
                n.kind.info().noun
            )
        } else {
            format!(
                "`{}` is placed in {}, not a hotplug slot",
                n.name,
                where_(n)
            )
        }
    });
    Change {
        class: class(live(n)),
        action: Action::Add,
        device: Some(n.name.clone()),
        subject: format!("{} `{}`", n.kind, n.name),
        detail: format!("add into {}", where_(n)),
        reason,
        note: None,
        span: new.loaded().spans.entry(&format!("{ptr}/name")),
        side: Side::New,
    }
}

/// A device kept by name whose kind, place or settings differ: all need a restart.
fn changed(new: &ValidSpec, o: &DeviceNode, n: &DeviceNode, out: &mut Vec<Change>) {
    let ptr = device_ptr(new, &n.name).unwrap_or_default();
    let spans = &new.loaded().spans;
    let a = serde_json::to_value(&o.spec).unwrap_or_default();
    let b = serde_json::to_value(&n.spec).unwrap_or_default();
    let mut keys = Vec::new();
    differing("", Some(&a), Some(&b), &mut keys);
    if keys.is_empty() || o.kind != n.kind {
        let moved = o.placement != n.placement && o.kind == n.kind;
        out.push(Change {
            class: Class::NeedsRestart,
            action: Action::Change,
            device: Some(n.name.clone()),
            subject: format!("{} `{}`", n.kind, n.name),
            detail: if moved {
                format!("moves from {} to {}", where_(o), where_(n))
            } else {
                format!("becomes a {} device", n.kind)
            },
            reason: Some("a device's kind and place are fixed while the VM runs".into()),
            note: None,
            span: spans.entry(&format!("{ptr}/name")),
            side: Side::New,
        });
        return;
    }
    let reason = if live(n) {
        format!(
            "a device's settings are fixed while it runs; rename `{}` to replace it live",
            n.name
        )
    } else {
        "a device's settings are fixed while the VM runs".into()
    };
    for k in keys {
        let full = format!("{ptr}{k}");
        let span = if spans.get(&full).is_some() {
            spans.entry(&full)
        } else {
            spans.value(&ptr)
        };
        out.push(Change {
            class: Class::NeedsRestart,
            action: Action::Change,
            device: Some(n.name.clone()),
            subject: format!("{} `{}` {}", n.kind, n.name, display_path(&k)),
            detail: format!("{} → {}", show(a.pointer(&k)), show(b.pointer(&k))),
            reason: Some(reason.clone()),
            note: None,
            span,
            side: Side::New,
        });
    }
}
