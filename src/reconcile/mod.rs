//! Live machine files: the running VM follows its file.
//!
//! ```text
//! watch (inotify, debounce) ─┐
//! control socket (apply) ────┼─▶ Reconciler::edit ─ check (as `vmm check`) ─ plan against the
//!                            │       desired machine ─ all live? desired = new ─▶ converge
//! guest eject (hotplug) ─────┘                                    converge: desired vs in-VM
//! ```
//!
//! The reconciler is level-triggered: it keeps the *desired* machine (the last good file it
//! accepted) and what is *in the VM*, and after every event makes the VM converge on the file
//! as far as it can: unplug what the file no longer has (the guest must release it first), plug
//! what is new (once its slot is free). An edit that needs a restart, or mixes live and
//! restart-only changes, is reported with its spans and changes nothing; an invalid edit is
//! reported and the last good file stays in force.
//!
//! One thread owns the state: every event (file, eject, control request, tick) arrives on its
//! channel, so there is no lock around it. The VM side is the [`Target`] trait: the KVM
//! backend's [`LiveVm`](crate::backend::kvm::LiveVm) in a VM, a recording fake in tests.

pub mod control;
mod converge;
pub mod protocol;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::Checked;
use crate::diag::Report;
use crate::graph::diff::{self, Action, Class, Plan, Side};
use crate::graph::{DeviceNode, Placement};

/// The running VM, as the reconciler drives it.
pub trait Target: Send {
    /// Builds `node` into its (empty) hotplug slot and signals the guest.
    fn plug(&mut self, node: &DeviceNode) -> Result<(), String>;
    /// Asks the guest to release the device in `slot`.
    fn request_unplug(&mut self, slot: u8) -> Result<(), String>;
    /// Removes the device in `slot` after the guest released it.
    fn remove(&mut self, slot: u8) -> Result<(), String>;
    /// Ends the VM.
    fn stop(&mut self, why: &str);
    /// Bytes of output each character device dropped so far (device name, bytes).
    fn dropped_output(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
    /// Devices in the VM that failed (device name, why).
    fn device_errors(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

impl Target for std::sync::Arc<crate::backend::kvm::LiveVm> {
    fn plug(&mut self, node: &DeviceNode) -> Result<(), String> {
        crate::backend::kvm::LiveVm::plug(self, node).map_err(|e| e.to_string())
    }
    fn request_unplug(&mut self, slot: u8) -> Result<(), String> {
        crate::backend::kvm::LiveVm::request_unplug(self, slot).map_err(|e| e.to_string())
    }
    fn remove(&mut self, slot: u8) -> Result<(), String> {
        match crate::backend::kvm::LiveVm::remove(self, slot) {
            Ok(true) => Ok(()),
            Ok(false) => {
                log::warn!("slot {slot}: the removed device is still referenced somewhere");
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }
    fn stop(&mut self, why: &str) {
        crate::backend::kvm::LiveVm::stop(self, why)
    }
    fn dropped_output(&self) -> Vec<(String, u64)> {
        crate::backend::kvm::LiveVm::dropped_output(self)
    }
    fn device_errors(&self) -> Vec<(String, String)> {
        crate::backend::kvm::LiveVm::device_errors(self)
    }
}

/// What the reconciler thread is told.
#[derive(Debug)]
pub enum Event {
    /// The machine file changed on disk (from the watcher).
    File(watch::WatchEvent),
    /// The guest released these slots (bitmap).
    Ejected(u32),
    /// A control socket request and where its answer goes.
    Control(control::Request, mpsc::Sender<protocol::Answer>),
    /// Time passes: removal requests the guest has not answered are signalled again.
    Tick,
    /// The VM is ending.
    Shutdown,
}

/// How an edit ended.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The file is not a valid machine (or does not fit): nothing changed.
    Invalid,
    /// Valid, but the same machine (e.g. reordered or reformatted).
    NoChanges,
    /// Some change cannot be applied to a running VM: nothing changed.
    NeedsRestart,
    /// Every change is live: planned (`vmm plan`) or applied.
    Live,
}

/// The result of one edit: what the terminal shows, and what a control client gets.
#[derive(Debug, Clone)]
pub struct EditOutcome {
    pub verdict: Verdict,
    pub applied: bool,
    /// Human text, one line per line (diagnostics rendered without color).
    pub lines: Vec<String>,
    pub changes: Vec<diff::Change>,
    pub diagnostics: Vec<Value>,
}

impl EditOutcome {
    /// The control socket's answer.
    pub fn answer(&self) -> protocol::Answer {
        protocol::Answer::Edit(protocol::EditAnswer {
            status: self.verdict,
            applied: self.applied,
            changes: self.changes.clone(),
            diagnostics: self.diagnostics.clone(),
            text: self.lines.join("\n"),
        })
    }
}

/// How a device in the VM stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum InVm {
    Running,
    /// Asked to leave; the guest has not released it yet.
    Unplugging {
        since: Instant,
        signalled: Instant,
    },
}

/// Unanswered removal requests are signalled again after this long (a guest may have missed
/// the first, e.g. when it came before its ACPI hotplug driver was up).
pub const RESIGNAL: Duration = Duration::from_secs(5);

/// The state of a live machine: what the file wants and what the VM has.
pub struct Reconciler<T: Target> {
    target: T,
    path: PathBuf,
    desired: Checked,
    /// Devices in the VM, by name.
    in_vm: BTreeMap<String, (DeviceNode, InVm)>,
    /// Devices of the file that could not be plugged, and why.
    failed: BTreeMap<String, String>,
    /// Prints a report line (the terminal, or a log in tests).
    out: Box<dyn FnMut(&str) + Send>,
}

impl<T: Target> std::fmt::Debug for Reconciler<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("path", &self.path)
            .field("in_vm", &self.in_vm.keys().collect::<Vec<_>>())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

fn slot_of(n: &DeviceNode) -> Option<u8> {
    match n.placement {
        Placement::Pci { slot, .. } => Some(slot),
        Placement::Pio { .. } => None,
    }
}

fn what(n: &DeviceNode) -> String {
    format!("{} `{}`", n.kind, n.name)
}

impl<T: Target> Reconciler<T> {
    /// The VM was built from `checked` (read from `path`).
    pub fn new(target: T, path: &Path, checked: Checked, out: Box<dyn FnMut(&str) + Send>) -> Self {
        let in_vm = checked
            .graph
            .devices
            .iter()
            .map(|d| (d.name.clone(), (d.clone(), InVm::Running)))
            .collect();
        Reconciler {
            target,
            path: path.to_path_buf(),
            desired: checked,
            in_vm,
            failed: BTreeMap::new(),
            out,
        }
    }

    fn say(&mut self, line: &str) {
        (self.out)(line);
    }

    fn releasing(&self) -> BTreeSet<u8> {
        self.in_vm
            .values()
            .filter(|(_, s)| matches!(s, InVm::Unplugging { .. }))
            .filter_map(|(n, _)| slot_of(n))
            .collect()
    }

    /// Handles one event; false when the reconciler should end.
    pub fn handle(&mut self, ev: Event) -> bool {
        match ev {
            Event::File(watch::WatchEvent::Changed(bytes)) => {
                let path = self.path.clone();
                let o = self.edit(&path, bytes, true);
                for l in &o.lines {
                    self.say(l);
                }
            }
            Event::File(watch::WatchEvent::Unchanged) => {
                let name = self.path.display().to_string();
                for l in self.retry(&name).unwrap_or_default() {
                    self.say(&l);
                }
            }
            Event::File(watch::WatchEvent::Deleted) => {
                let p = self.path.display().to_string();
                self.say(&format!(
                    "{p}: deleted; the VM keeps running as it is and follows the file when it is back"
                ));
            }
            Event::File(watch::WatchEvent::Unreadable(why)) => {
                let p = self.path.display().to_string();
                self.say(&format!("{p}: cannot be read ({why}); the VM is unchanged"));
            }
            Event::Ejected(bits) => {
                let lines = self.ejected(bits);
                for l in &lines {
                    self.say(l);
                }
            }
            Event::Control(req, reply) => {
                let answer = self.control(req);
                let _ = reply.send(answer);
            }
            Event::Tick => self.tick(Instant::now()),
            Event::Shutdown => return false,
        }
        true
    }

    fn control(&mut self, req: control::Request) -> protocol::Answer {
        match req {
            control::Request::Status => protocol::Answer::Status(self.status()),
            control::Request::Plan { path, text } => {
                self.edit(&path, text.into_bytes(), false).answer()
            }
            control::Request::Apply { path, text } => {
                let o = self.edit(&path, text.into_bytes(), true);
                // The terminal hears of explicit applies too.
                let who = format!("vmm apply {}", path.display());
                self.say(&who);
                for l in &o.lines {
                    self.say(l);
                }
                o.answer()
            }
            control::Request::Stop => {
                self.say("stopping the VM (vmm stop)");
                self.target.stop("vmm stop");
                protocol::Answer::Message(protocol::MessageAnswer {
                    status: protocol::MessageKind::Stopping,
                    text: "the VM is stopping".into(),
                })
            }
        }
    }

    /// Checks, plans and (with `apply`) applies the machine file `bytes` read from `path`.
    pub fn edit(&mut self, path: &Path, bytes: Vec<u8>, apply: bool) -> EditOutcome {
        let name = path.display().to_string();
        let new = match crate::check_bytes_since(path, bytes, &self.desired) {
            Ok(c) => c,
            Err(report) => return invalid(&name, &report),
        };
        let (plan, graph) = match diff::plan_avoiding(
            &self.desired.valid,
            &self.desired.graph,
            &new.valid,
            &self.releasing(),
        ) {
            Ok(p) => p,
            Err(diags) => return invalid(&name, &new.valid.loaded().report(diags)),
        };
        if plan.is_empty() {
            if apply {
                // Same machine: keep the new text, so later diagnostics point into it.
                self.desired = Checked { graph, ..new };
                if let Some(lines) = self.retry(&name) {
                    return EditOutcome {
                        verdict: Verdict::Live,
                        applied: true,
                        lines,
                        changes: Vec::new(),
                        diagnostics: Vec::new(),
                    };
                }
            }
            return EditOutcome {
                verdict: Verdict::NoChanges,
                applied: false,
                lines: vec![format!("{name}: no changes")],
                changes: Vec::new(),
                diagnostics: Vec::new(),
            };
        }
        if !plan.is_live() {
            return self.needs_restart(&name, &plan, &new);
        }
        let mut lines = vec![format!(
            "{name}: {} {} live change{}",
            if apply { "applying" } else { "would apply" },
            plan.changes.len(),
            if plan.changes.len() == 1 { "" } else { "s" }
        )];
        if !apply {
            for c in &plan.changes {
                lines.push(format!("  {} {}: {}", sign(c.action), c.subject, c.detail));
                if let Some(n) = &c.note {
                    lines.push(format!("      note: {n}"));
                }
            }
            return EditOutcome {
                verdict: Verdict::Live,
                applied: false,
                lines,
                changes: plan.changes,
                diagnostics: Vec::new(),
            };
        }
        self.desired = Checked { graph, ..new };
        lines.extend(self.converge());
        let diagnostics = self.refused_plugs(&plan, &mut lines);
        EditOutcome {
            verdict: Verdict::Live,
            applied: true,
            lines,
            changes: plan.changes,
            diagnostics,
        }
    }

    fn needs_restart(&self, name: &str, plan: &Plan, new: &Checked) -> EditOutcome {
        let restart = plan.count(Class::NeedsRestart);
        let hot = plan.count(Class::HotApply);
        let mut lines = vec![format!(
            "{name}: not applied, the VM is unchanged: {restart} change{} need{} a restart",
            if restart == 1 { "" } else { "s" },
            if restart == 1 { "s" } else { "" },
        )];
        for c in &plan.changes {
            let why = c
                .reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            lines.push(format!(
                "  {:<13}  {}: {}{why}",
                c.class.to_string(),
                c.subject,
                c.detail
            ));
        }
        if hot > 0 {
            lines.push(format!(
                "  the edit mixes live and restart-only changes, so none is applied: save the {hot} live change{} on {} own to apply {}",
                if hot == 1 { "" } else { "s" },
                if hot == 1 { "its" } else { "their" },
                if hot == 1 { "it" } else { "them" },
            ));
        }
        let mut diagnostics = Vec::new();
        for (side, loaded) in [
            (Side::New, new.valid.loaded()),
            (Side::Old, self.desired.valid.loaded()),
        ] {
            let diags = plan.restart_diags(side);
            if !diags.is_empty() {
                let report = loaded.report(diags);
                diagnostics.extend(
                    report
                        .json()
                        .iter()
                        .map(|d| serde_json::to_value(d).unwrap_or_default()),
                );
                lines.extend(report.render(false, 100).lines().map(str::to_string));
            }
        }
        EditOutcome {
            verdict: Verdict::NeedsRestart,
            applied: false,
            lines,
            changes: plan.changes.clone(),
            diagnostics,
        }
    }

    /// `vmm status`: devices, hotplug slots, pending unplugs.
    pub fn status(&self) -> protocol::StatusAnswer {
        use protocol::{DeviceState, DeviceStatus, SlotState, SlotStatus};
        let g = &self.desired.graph;
        let dropped: BTreeMap<String, u64> = self.target.dropped_output().into_iter().collect();
        let errors: BTreeMap<String, String> = self.target.device_errors().into_iter().collect();
        let mut devices = Vec::new();
        for (name, (node, state)) in &self.in_vm {
            let error = errors.get(name).cloned();
            let (state, pending_seconds) = match state {
                InVm::Running if error.is_some() => (DeviceState::Failed, None),
                InVm::Running => (DeviceState::Running, None),
                InVm::Unplugging { since, .. } => {
                    (DeviceState::Unplugging, Some(since.elapsed().as_secs_f64()))
                }
            };
            devices.push(DeviceStatus {
                name: name.clone(),
                kind: node.kind.key().to_string(),
                slot: slot_of(node),
                hotplug: matches!(node.placement, Placement::Pci { hotplug: true, .. }),
                state,
                pending_seconds,
                output_dropped: dropped.get(name).copied(),
                error,
            });
        }
        for (name, why) in &self.failed {
            if let Some(node) = g.device(name)
                && !self.in_vm.contains_key(name)
            {
                devices.push(DeviceStatus {
                    name: name.clone(),
                    kind: node.kind.key().to_string(),
                    slot: slot_of(node),
                    hotplug: true,
                    state: DeviceState::PlugFailed,
                    pending_seconds: None,
                    output_dropped: None,
                    error: Some(why.clone()),
                });
            }
        }
        let slots: Vec<SlotStatus> = g
            .hotplug_slots()
            .map(|s| {
                let occupant = self
                    .in_vm
                    .values()
                    .find(|(n, _)| slot_of(n) == Some(s.slot));
                let state = match occupant {
                    None => SlotState::Free,
                    Some((_, InVm::Running)) => SlotState::Used,
                    Some((_, InVm::Unplugging { .. })) => SlotState::Releasing,
                };
                SlotStatus {
                    slot: s.slot,
                    state,
                    device: occupant.map(|(n, _)| n.name.clone()),
                }
            })
            .collect();
        let hotplug_free = slots.iter().filter(|s| s.state == SlotState::Free).count();
        let pending_unplugs = devices
            .iter()
            .filter(|d| d.state == DeviceState::Unplugging)
            .cloned()
            .collect();
        protocol::StatusAnswer {
            status: protocol::StatusOk::Ok,
            machine: g.machine.clone(),
            file: self.path.display().to_string(),
            devices,
            hotplug_slots: slots,
            hotplug_free,
            pending_unplugs,
        }
    }
}

fn sign(a: Action) -> &'static str {
    match a {
        Action::Add => "+",
        Action::Remove => "-",
        Action::Change => "~",
    }
}

fn invalid(name: &str, report: &Report) -> EditOutcome {
    let mut lines = vec![format!(
        "{name}: invalid, not applied (the VM keeps the last good machine file)"
    )];
    lines.extend(report.render(false, 100).lines().map(str::to_string));
    EditOutcome {
        verdict: Verdict::Invalid,
        applied: false,
        lines,
        changes: Vec::new(),
        diagnostics: report
            .json()
            .iter()
            .map(|d| serde_json::to_value(d).unwrap_or_default())
            .collect(),
    }
}

/// A live machine's threads: the reconciler, the file watcher and the control socket. Dropping
/// it stops and joins them.
#[derive(Debug)]
pub struct Live {
    tx: mpsc::Sender<Event>,
    thread: Option<std::thread::JoinHandle<()>>,
    watcher: Option<watch::Watcher>,
    control: Option<control::Server>,
}

impl Live {
    /// Starts following `path` (the file `checked` was read from) on `target`: with `watch`,
    /// saves of the file are applied; without, only `vmm apply`. `socket` is the control
    /// socket's path (none: no socket). Problems starting the watcher or the socket are
    /// reported through `out` and leave the VM running without them.
    pub fn start<T: Target + 'static>(
        target: T,
        path: &Path,
        checked: Checked,
        socket: Option<PathBuf>,
        mut out: Box<dyn FnMut(&str) + Send>,
        watch: bool,
    ) -> (Live, mpsc::Sender<Event>) {
        let (tx, rx) = mpsc::channel::<Event>();
        let initial = checked.valid.loaded().text.clone().into_bytes();
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let watcher = if !watch {
            None
        } else {
            let tx = tx.clone();
            match watch::Watcher::spawn(&abs, initial, watch::QUIET, move |e| {
                let _ = tx.send(Event::File(e));
            }) {
                Ok(w) => Some(w),
                Err(e) => {
                    out(&format!(
                        "{}: cannot watch it ({e}); edits are not applied (vmm apply still works)",
                        path.display()
                    ));
                    None
                }
            }
        };
        let control = match socket {
            Some(p) => match control::Server::start(&p, tx.clone()) {
                Ok(s) => Some(s),
                Err(e) => {
                    out(&format!(
                        "control socket {}: {e}; running without it",
                        p.display()
                    ));
                    None
                }
            },
            None => None,
        };
        let mut r = Reconciler::new(target, path, checked, out);
        let thread = crate::sandbox::spawn(
            &crate::sandbox::RECONCILER,
            false,
            "reconcile".into(),
            move || {
                loop {
                    let ev = match rx.recv_timeout(Duration::from_secs(1)) {
                        Ok(ev) => ev,
                        Err(mpsc::RecvTimeoutError::Timeout) => Event::Tick,
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    };
                    if !r.handle(ev) {
                        return;
                    }
                }
            },
        )
        .ok();
        (
            Live {
                tx: tx.clone(),
                thread,
                watcher,
                control,
            },
            tx,
        )
    }
}

/// How long ending a live machine waits for each of its parts (answers in flight, the
/// reconciler's current event): vmm ends within 2 s of a stop whatever they do.
pub const SHUTDOWN_WAIT: Duration = Duration::from_millis(500);

impl Drop for Live {
    fn drop(&mut self) {
        // The watcher and the socket first: nothing new arrives while the reconciler ends.
        self.watcher.take();
        self.control.take();
        let _ = self.tx.send(Event::Shutdown);
        if let Some(t) = self.thread.take() {
            let until = Instant::now() + SHUTDOWN_WAIT;
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                // Busy with an edit: it holds what it uses, and ends with the process.
                log::warn!("the reconciler is still busy; the VM ends without waiting for it");
            }
        }
    }
}
