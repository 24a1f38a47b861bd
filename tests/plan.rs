//! Plans between machine files (no KVM): devices are matched by name, reorder and reformat
//! plan nothing, and each change is classified hot-apply or needs-restart with its span.

mod common;

use common::*;
use vmm::graph::diff::{Action, Class, Plan, Side, plan};

const BASE: &str = r#"name = "m"
memory = "64M"
vcpus = 1
kernel = "vmlinux"

[pci]
hotplug_slots = 2

[[serial]]
name = "com1"
io = "stdio"

[[net]]
name = "eth0"
tap = "tap0"

[[block]]
name = "disk"
path = "disk.img"
slot = 1
"#;

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("vmlinux"), b"kernel").unwrap();
        std::fs::write(d.path().join("disk.img"), vec![0u8; 4096]).unwrap();
        Dir(d)
    }
    fn checked(&self, name: &str, text: &str) -> vmm::Checked {
        let p = self.0.path().join(name);
        std::fs::write(&p, text).unwrap();
        vmm::check_file(&p).unwrap_or_else(|r| panic!("{name} invalid:\n{}", r.render(false, 100)))
    }
    fn plan(&self, old: &str, new: &str) -> (Plan, String) {
        let o = self.checked("old.toml", old);
        let n = self.checked("new.toml", new);
        let (p, _) = plan(&o.valid, &o.graph, &n.valid).unwrap_or_else(|d| panic!("{d:?}"));
        (p, new.to_string())
    }
}

fn add_net(text: &str, name: &str, tap: &str) -> String {
    format!("{text}\n[[net]]\nname = \"{name}\"\ntap = \"{tap}\"\n")
}

#[test]
fn identical_files_plan_nothing() {
    let d = Dir::new();
    assert!(d.plan(BASE, BASE).0.is_empty());
}

#[test]
fn reorder_and_reformat_plan_nothing() {
    let d = Dir::new();
    let reordered = r#"# the same machine, written differently
kernel = 'vmlinux'
vcpus = 1
name = "m"
memory = "64MiB"
pci = { hotplug_slots = 2 }
block = [ { name = "disk", path = "disk.img", slot = 1 } ]

[[net]]
tap = "tap0"
name = "eth0"

[[serial]]
io = "stdio"
name = "com1"
"#;
    let (p, _) = d.plan(BASE, reordered);
    assert!(p.is_empty(), "{:#?}", p.changes);
}

#[test]
fn json_and_toml_of_one_machine_plan_nothing() {
    let d = Dir::new();
    let o = d.checked("old.toml", BASE);
    let json = serde_json::to_string_pretty(o.valid.spec()).unwrap();
    let n = d.checked("new.json", &json);
    let (p, _) = plan(&o.valid, &o.graph, &n.valid).unwrap();
    assert!(p.is_empty(), "{:#?}", p.changes);
}

#[test]
fn adding_a_nic_into_a_free_hotplug_slot_is_hot() {
    let d = Dir::new();
    let new = add_net(BASE, "eth1", "tap1");
    let (p, _) = d.plan(BASE, &new);
    assert_eq!(p.changes.len(), 1, "{:#?}", p.changes);
    let c = &p.changes[0];
    assert_eq!(
        (c.class, c.action, c.device.as_deref()),
        (Class::HotApply, Action::Add, Some("eth1"))
    );
    assert_eq!(c.detail, "add into hotplug slot 31");
    assert_eq!(c.side, Side::New);
    assert_eq!(&new[c.span.clone()], "name = \"eth1\"");
    assert!(p.is_live());
}

#[test]
fn removing_a_nic_from_a_hotplug_slot_is_hot() {
    let d = Dir::new();
    let old = add_net(BASE, "eth1", "tap1");
    let (p, _) = d.plan(&old, BASE);
    assert_eq!(p.changes.len(), 1, "{:#?}", p.changes);
    let c = &p.changes[0];
    assert_eq!(
        (c.class, c.action, c.side),
        (Class::HotApply, Action::Remove, Side::Old)
    );
    assert_eq!(&old[c.span.clone()], "name = \"eth1\"");
}

#[test]
fn other_devices_keep_their_slots_when_one_is_removed() {
    let d = Dir::new();
    let old = add_net(BASE, "eth1", "tap1");
    // eth0 sorts first and took slot 30, eth1 slot 31; removing eth0 must not move eth1.
    let new = old.replace("[[net]]\nname = \"eth0\"\ntap = \"tap0\"\n", "");
    let (p, _) = d.plan(&old, &new);
    assert_eq!(p.changes.len(), 1, "{:#?}", p.changes);
    assert_eq!(
        (p.changes[0].action, p.changes[0].device.as_deref()),
        (Action::Remove, Some("eth0"))
    );
    assert!(p.is_live());
}

#[test]
fn a_nic_beyond_the_hotplug_slots_needs_a_restart() {
    let d = Dir::new();
    let old = add_net(BASE, "eth1", "tap1"); // both hotplug slots used
    let new = add_net(&old, "eth2", "tap2");
    let (p, _) = d.plan(&old, &new);
    assert_eq!(p.changes.len(), 1);
    let c = &p.changes[0];
    assert_eq!((c.class, c.action), (Class::NeedsRestart, Action::Add));
    assert!(
        c.reason
            .as_deref()
            .unwrap()
            .contains("no free hotplug slot"),
        "{c:?}"
    );
}

/// Disks come and go live in hotplug slots, and their removal carries a note: unmount first.
/// A disk in a static slot needs a restart.
#[test]
fn disks_in_hotplug_slots_come_and_go_live_with_an_unmount_note() {
    let d = Dir::new();
    let new = format!("{BASE}\n[[block]]\nname = \"disk2\"\npath = \"vmlinux\"\nreadonly = true\n");
    let (p, _) = d.plan(BASE, &new);
    let c = &p.changes[0];
    assert_eq!((c.class, c.action), (Class::HotApply, Action::Add), "{c:?}");
    assert_eq!(c.detail, "add into hotplug slot 31");
    assert_eq!(c.note, None);
    let (p, _) = d.plan(&new, BASE);
    let c = &p.changes[0];
    assert_eq!(
        (c.class, c.action),
        (Class::HotApply, Action::Remove),
        "{c:?}"
    );
    assert!(
        c.note
            .as_deref()
            .unwrap_or("")
            .contains("unmount it in the guest first"),
        "{c:?}"
    );
    // The CLI prints the note under the change, and JSON carries it.
    let old = d.0.path().join("with.toml");
    let without = d.0.path().join("without.toml");
    std::fs::write(&old, &new).unwrap();
    std::fs::write(&without, BASE).unwrap();
    let out = vmm()
        .args(["plan", old.to_str().unwrap(), without.to_str().unwrap()])
        .output()
        .unwrap();
    let s = text(&out.stdout);
    assert!(
        s.contains("hot-apply      block `disk2`: remove from hotplug slot 30"),
        "{s}"
    );
    assert!(s.contains("note: unmount it in the guest first"), "{s}");
    let out = vmm()
        .args([
            "plan",
            "--format",
            "json",
            old.to_str().unwrap(),
            without.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        text(&out.stdout).contains("\"note\":"),
        "{}",
        text(&out.stdout)
    );
    // In a static slot: only a restart.
    let (p, _) = d.plan(
        BASE,
        &BASE.replace(
            "[[block]]\nname = \"disk\"\npath = \"disk.img\"\nslot = 1\n",
            "",
        ),
    );
    let c = &p.changes[0];
    assert_eq!(
        (c.class, c.action),
        (Class::NeedsRestart, Action::Remove),
        "{c:?}"
    );
    assert!(
        c.reason.as_deref().unwrap().contains("static slot 1"),
        "{c:?}"
    );
}

#[test]
fn a_nic_in_a_static_slot_needs_a_restart_to_go() {
    let d = Dir::new();
    let old = BASE.replace("tap = \"tap0\"\n", "tap = \"tap0\"\nslot = 4\n");
    let new = old.replace("[[net]]\nname = \"eth0\"\ntap = \"tap0\"\nslot = 4\n", "");
    let (p, _) = d.plan(&old, &new);
    assert_eq!(
        (p.changes[0].class, p.changes[0].action),
        (Class::NeedsRestart, Action::Remove)
    );
    assert!(
        p.changes[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("static slot 4")
    );
}

#[test]
fn machine_settings_need_a_restart_with_the_span_of_the_key() {
    let d = Dir::new();
    let new = BASE.replace("memory = \"64M\"", "memory = \"128M\"");
    let (p, text) = d.plan(BASE, &new);
    assert_eq!(p.changes.len(), 1);
    let c = &p.changes[0];
    assert_eq!(
        (c.class, c.subject.as_str()),
        (Class::NeedsRestart, "memory")
    );
    assert_eq!(&text[c.span.clone()], "memory = \"128M\"");
    assert_eq!(c.detail, "\"64M\" → \"128M\"");
}

#[test]
fn a_changed_device_setting_points_at_the_key() {
    let d = Dir::new();
    let new = BASE.replace("tap = \"tap0\"", "tap = \"tap9\"");
    let (p, text) = d.plan(BASE, &new);
    assert_eq!(p.changes.len(), 1, "{:#?}", p.changes);
    let c = &p.changes[0];
    assert_eq!(c.class, Class::NeedsRestart);
    assert_eq!(&text[c.span.clone()], "tap = \"tap9\"");
    assert!(c.reason.as_deref().unwrap().contains("rename `eth0`"));
}

#[test]
fn a_mixed_edit_is_not_live() {
    let d = Dir::new();
    let new = add_net(&BASE.replace("vcpus = 1", "vcpus = 2"), "eth1", "tap1");
    let (p, _) = d.plan(BASE, &new);
    assert_eq!(p.count(Class::HotApply), 1);
    assert_eq!(p.count(Class::NeedsRestart), 1);
    assert!(!p.is_live());
}

#[test]
fn plan_cli_prints_classes_and_exit_codes() {
    let d = Dir::new();
    let old = d.0.path().join("old.toml");
    let new = d.0.path().join("new.toml");
    std::fs::write(&old, BASE).unwrap();
    std::fs::write(
        &new,
        add_net(&BASE.replace("vcpus = 1", "vcpus = 2"), "eth1", "tap1"),
    )
    .unwrap();
    let out = vmm()
        .args(["plan", old.to_str().unwrap(), new.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(
        s.contains("hot-apply      net `eth1`: add into hotplug slot 31"),
        "{s}"
    );
    assert!(s.contains("needs-restart  vcpus: 1 → 2"), "{s}");
    assert!(s.contains("would take none of these"), "{s}");
    assert!(
        text(&out.stderr).contains("new.toml:3:1"),
        "{}",
        text(&out.stderr)
    );

    let json = vmm()
        .args([
            "plan",
            "--format",
            "json",
            old.to_str().unwrap(),
            new.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["changes"].as_array().unwrap().len(), 2);

    std::fs::write(&new, BASE.replace("vcpus = 1", "vcpus = 0")).unwrap();
    let bad = vmm()
        .args(["plan", old.to_str().unwrap(), new.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stdout).starts_with("invalid:"),
        "{}",
        text(&bad.stdout)
    );
    assert!(text(&bad.stderr).contains("must be at least 1"));

    let same = vmm()
        .args(["plan", old.to_str().unwrap(), old.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(text(&same.stdout), "no changes\n");
}
