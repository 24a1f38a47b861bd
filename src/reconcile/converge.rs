//! How the reconciler makes the VM follow the file: plugging what arrived, asking the guest to
//! release what left (and what failed), removing what the guest released, retrying what did
//! not converge.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{InVm, RESIGNAL, Reconciler, Target, slot_of, what};
use crate::graph::diff::{Action, Plan, Side};
use crate::graph::{DeviceNode, Placement};

impl<T: Target> Reconciler<T> {
    /// The devices `plan` added that could not be plugged, as diagnostics on the file (the
    /// device's name), rendered into `lines` and returned as JSON.
    pub(super) fn refused_plugs(&self, plan: &Plan, lines: &mut Vec<String>) -> Vec<Value> {
        let diags: crate::diag::Diags = plan
            .changes
            .iter()
            .filter(|c| c.action == Action::Add && c.side == Side::New)
            .filter_map(|c| {
                let why = self.failed.get(c.device.as_deref()?)?;
                Some(
                    crate::diag::Diag::error(
                        "vmm::plug-failed",
                        format!("{}: cannot plug it into the running VM", c.subject),
                    )
                    .label(c.span.clone(), "added here")
                    .help(format!(
                        "{why}; it is tried again on the next save of this file or `vmm apply`"
                    )),
                )
            })
            .collect();
        if diags.is_empty() {
            return Vec::new();
        }
        let report = self.desired.valid.loaded().report(diags);
        lines.extend(report.render(false, 100).lines().map(str::to_string));
        report
            .json()
            .iter()
            .map(|d| serde_json::to_value(d).unwrap_or_default())
            .collect()
    }

    /// After a save or `vmm apply` that changed nothing: plugs again what could not be
    /// plugged, and replaces hot-plugged devices whose back end failed. `None` when there is
    /// nothing to retry.
    pub(super) fn retry(&mut self, name: &str) -> Option<Vec<String>> {
        let broken = self.target.device_errors();
        let hot_broken = broken.iter().any(|(dev, _)| {
            self.in_vm.get(dev).is_some_and(|(node, state)| {
                *state == InVm::Running
                    && matches!(node.placement, Placement::Pci { hotplug: true, .. })
            })
        });
        if self.failed.is_empty() && !hot_broken {
            return None;
        }
        let done = self.converge();
        if done.is_empty() {
            return None;
        }
        let mut lines = vec![format!(
            "{name}: no changes; retrying the devices that did not converge"
        )];
        lines.extend(done);
        Some(lines)
    }

    /// Makes the VM converge on the desired machine as far as it can now; returns what it did.
    pub(super) fn converge(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        let now = Instant::now();
        let desired = &self.desired.graph;
        self.failed.retain(|name, _| desired.device(name).is_some());
        // Devices in hotplug slots whose back end failed leave, to be plugged again (to a
        // back end that was restarted) once the guest released them.
        let broken: BTreeMap<String, String> = self.target.device_errors().into_iter().collect();
        // Leaving: in the VM, not in the file (or no longer the same device), or broken.
        let leaving: Vec<(String, bool)> = self
            .in_vm
            .iter()
            .filter_map(|(name, (node, state))| {
                if *state != InVm::Running {
                    return None;
                }
                let hot = matches!(node.placement, Placement::Pci { hotplug: true, .. });
                if self.desired.graph.device(name) != Some(node) {
                    Some((name.clone(), false))
                } else if hot && broken.contains_key(name) {
                    Some((name.clone(), true))
                } else {
                    None
                }
            })
            .collect();
        for (name, replug) in leaving {
            let Some((node, state)) = self.in_vm.get_mut(&name) else {
                continue;
            };
            let Some(slot) = slot_of(node) else { continue };
            match self.target.request_unplug(slot) {
                Ok(()) => {
                    *state = InVm::Unplugging {
                        since: now,
                        signalled: now,
                    };
                    let why = if replug {
                        " to plug it again (its back end failed)"
                    } else {
                        ""
                    };
                    lines.push(format!(
                        "  - {}: the guest is asked to release hotplug slot {slot}{why}",
                        what(node)
                    ));
                }
                Err(e) => lines.push(format!("  ! {}: cannot unplug: {e}", what(node))),
            }
        }
        // Arriving: in the file, not in the VM.
        let arriving: Vec<DeviceNode> = self
            .desired
            .graph
            .devices
            .iter()
            .filter(|d| !self.in_vm.contains_key(&d.name))
            .cloned()
            .collect();
        for node in arriving {
            let Some(slot) = slot_of(&node) else { continue };
            if let Some((other, _)) = self.in_vm.values().find(|(n, _)| slot_of(n) == Some(slot)) {
                lines.push(format!(
                    "  … {}: waits for hotplug slot {slot}, which the guest is still releasing from `{}`",
                    what(&node),
                    other.name
                ));
                continue;
            }
            match self.target.plug(&node) {
                Ok(()) => {
                    self.failed.remove(&node.name);
                    lines.push(format!(
                        "  + {}: plugged into hotplug slot {slot}",
                        what(&node)
                    ));
                    self.in_vm.insert(node.name.clone(), (node, InVm::Running));
                }
                Err(e) => {
                    lines.push(format!("  ! {}: cannot plug: {e}", what(&node)));
                    self.failed.insert(node.name.clone(), e);
                }
            }
        }
        lines
    }

    /// The guest released `bits`: remove those devices, then converge (a device may wait for
    /// one of those slots).
    pub fn ejected(&mut self, bits: u32) -> Vec<String> {
        let mut lines = Vec::new();
        let gone: Vec<String> = self
            .in_vm
            .iter()
            .filter(|(_, (n, s))| {
                matches!(s, InVm::Unplugging { .. })
                    && slot_of(n).is_some_and(|slot| bits & (1u32 << slot) != 0)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            let Some((node, state)) = self.in_vm.remove(&name) else {
                continue;
            };
            let slot = slot_of(&node).unwrap_or(0);
            let took = match state {
                InVm::Unplugging { since, .. } => since.elapsed(),
                InVm::Running => Duration::ZERO,
            };
            match self.target.remove(slot) {
                Ok(()) => lines.push(format!(
                    "{}: removed after the guest released it ({:.0} ms); hotplug slot {slot} is free",
                    what(&node),
                    took.as_secs_f64() * 1000.0
                )),
                Err(e) => lines.push(format!("{}: removing it failed: {e}", what(&node))),
            }
        }
        let more = self.converge();
        lines.extend(more);
        lines
    }

    /// Signals again the removal requests the guest has not answered for [`RESIGNAL`].
    pub fn tick(&mut self, now: Instant) {
        let mut again = Vec::new();
        for (node, state) in self.in_vm.values_mut() {
            if let InVm::Unplugging { signalled, .. } = state
                && now.duration_since(*signalled) >= RESIGNAL
            {
                *signalled = now;
                if let Some(slot) = slot_of(node) {
                    again.push((slot, node.name.clone()));
                }
            }
        }
        for (slot, name) in again {
            log::info!("`{name}`: the guest has not released slot {slot} yet; asking again");
            let _ = self.target.request_unplug(slot);
        }
    }
}
