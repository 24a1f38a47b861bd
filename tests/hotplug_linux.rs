//! NIC hotplug from machine file edits, under the Linux test kernel's own drivers (ACPI PCI
//! hotplug: acpiphp, the GED, virtio-net), in one boot: add a NIC by saving the file, use it,
//! remove it (the guest releases it, vmm frees the slot and closes the TAP), add it again, and
//! edits that must change nothing (too many NICs, restart-only, mixed, invalid).

mod common;

use std::path::Path;

use common::tap::Tap;
use common::vm::{LINUX_LIMIT, Machine, Vm, kvm_or_skip, one_linux_guest_at_a_time, sh, value};
use common::{guest_artifacts, root};

/// Saves `text` at `path` the way vim and VS Code do: a temporary file renamed over it.
fn save(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Open file descriptors of `pid` that are TAP devices (/dev/net/tun).
fn tun_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l == Path::new("/dev/net/tun"))
        .count()
}

fn status(vm: &Vm) -> serde_json::Value {
    let (rc, out, err) = vm.vmm(&["status", "hotplug", "--format", "json"]);
    assert_eq!(rc, 0, "vmm status failed: {err}");
    serde_json::from_str(&out).unwrap()
}

const MAC: &str = "52:54:00:aa:bb:01";

/// Waits in the guest until an interface with `MAC` exists (or not); prints its name.
fn wait_iface(present: bool) -> String {
    let want = if present { "" } else { "!" };
    format!(
        "i=0; n=; while [ $i -lt 600 ]; do n=; for d in /sys/class/net/*; do read a < $d/address; [ \"$a\" = {MAC} ] && n=${{d##*/}}; done; [ {want} -n \"$n\" ] && break; sleep 0.1; i=$((i+1)); done; [ {want} -n \"$n\" ] && echo IFACE=${{n:-none}}"
    )
}

#[test]
fn nics_follow_the_machine_file() {
    let test = "nics_follow_the_machine_file";
    if !kvm_or_skip(test) {
        return;
    }
    let tap_name = Tap::unique_name("vmmh");
    let Some(tap) = Tap::new(&tap_name, "10.213.9.1/24") else {
        common::skip(
            test,
            "cannot create a TAP interface (needs root and /dev/net/tun)",
        );
        return;
    };
    let g = guest_artifacts();
    let cmdline = std::fs::read_to_string(root().join("tests/guest/cmdline.txt")).unwrap();
    let base = format!(
        r#"initrd = {initrd:?}
cmdline = "{cmd} vmm_mode=test"
name = "hotplug"
memory = "96M"
vcpus = 2

[pci]
hotplug_slots = 2

[[serial]]
name = "console"
io = "stdio"
"#,
        initrd = g.join("initramfs.cpio").display().to_string(),
        cmd = cmdline.trim(),
    );
    let nic = |name: &str, tap: &str, mac: &str| {
        format!("\n[[net]]\nname = \"{name}\"\ntap = \"{tap}\"\nmac = \"{mac}\"\n")
    };
    let m = Machine::new(&g.join("vmlinux"), &base);
    let file = m.file.clone();
    let original = std::fs::read_to_string(&file).unwrap();
    let with_nic = format!("{original}{}", nic("uplink", &tap_name, MAC));

    let _guest = one_linux_guest_at_a_time();
    let mut vm = Vm::start(&file, LINUX_LIMIT, &[]);
    vm.expect("VMM-READY");
    let pid = vm.pid();
    assert_eq!(tun_fds(pid), 0);
    let s = status(&vm);
    assert_eq!(s["hotplug_free"], 2, "{s}");

    // 1. Add a NIC by saving the file: the guest's drivers bring up a new interface.
    save(&file, &with_nic);
    vm.expect_stderr("+ net `uplink`: plugged into hotplug slot", 1);
    let out = sh(&mut vm, &wait_iface(true));
    let iface = value(&out, "IFACE");
    println!("VMM-NET-ADD {iface}");
    assert_eq!(tun_fds(pid), 1, "vmm holds the TAP open");
    let s = status(&vm);
    assert_eq!(s["hotplug_free"], 1, "{s}");
    // Traffic flows over it (single pings: see virtio_linux.rs on busybox ping under PVM).
    let out = sh(
        &mut vm,
        &format!(
            "ip addr add 10.213.9.2/24 dev {iface}; ip link set {iface} up; ping -c 1 -W 10 10.213.9.1 | while read l; do case $l in *received*) echo \"PING=$l\";; esac; done"
        ),
    );
    assert!(
        value(&out, "PING").contains("1 packets received"),
        "{out:?}"
    );

    // 2. Remove it: the guest releases the device, then vmm removes it and closes the TAP.
    save(&file, &original);
    vm.expect_stderr("net `uplink`: removed after the guest released it", 1);
    let out = sh(&mut vm, &wait_iface(false));
    assert_eq!(value(&out, "IFACE"), "none");
    println!("VMM-NET-GONE {iface}");
    let s = status(&vm);
    assert_eq!(s["hotplug_free"], 2, "{s}");
    assert_eq!(s["pending_unplugs"].as_array().unwrap().len(), 0, "{s}");
    assert_eq!(tun_fds(pid), 0, "the TAP is closed");

    // 3. Add it again: the slot is reusable.
    save(&file, &with_nic);
    vm.expect_stderr("+ net `uplink`: plugged into hotplug slot", 2);
    let out = sh(&mut vm, &wait_iface(true));
    let iface = value(&out, "IFACE");
    let out = sh(
        &mut vm,
        &format!(
            "ip addr add 10.213.9.2/24 dev {iface}; ip link set {iface} up; ping -c 1 -W 10 10.213.9.1 | while read l; do case $l in *received*) echo \"PING=$l\";; esac; done"
        ),
    );
    assert!(
        value(&out, "PING").contains("1 packets received"),
        "{out:?}"
    );

    // 4. Edits that change nothing. More NICs than slots: a diagnostic, nothing plugged.
    let before = status(&vm);
    let too_many = format!(
        "{with_nic}{}{}",
        nic("extra1", "vmmx1", "52:54:00:aa:bb:02"),
        nic("extra2", "vmmx2", "52:54:00:aa:bb:03")
    );
    save(&file, &too_many);
    let err = vm.expect_stderr("no free hotplug slot", 1);
    assert!(err.contains("not applied, the VM is unchanged"), "{err}");
    // A restart-only change, alone and mixed with a live one.
    save(
        &file,
        &with_nic.replace("memory = \"96M\"", "memory = \"128M\""),
    );
    vm.expect_stderr("not applied, the VM is unchanged", 2);
    save(
        &file,
        &format!(
            "{}{}",
            with_nic.replace("memory = \"96M\"", "memory = \"128M\""),
            nic("extra1", "vmmx1", "52:54:00:aa:bb:02")
        ),
    );
    let err = vm.expect_stderr("mixes live and restart-only changes", 1);
    assert!(err.contains("memory"), "{err}");
    // Garbage.
    save(&file, "this is [not toml");
    vm.expect_stderr("invalid, not applied", 1);
    let after = status(&vm);
    assert_eq!(before["devices"], after["devices"], "nothing changed");
    assert_eq!(tun_fds(pid), 1);
    // The guest still has exactly one virtio NIC and the VM runs.
    let out = sh(
        &mut vm,
        "n=0; for d in /sys/class/net/*; do [ -e $d/device ] && n=$((n+1)); done; echo NICS=$n",
    );
    assert_eq!(value(&out, "NICS"), "1");

    // `vmm stop` ends the VM.
    let (rc, out, err) = vm.vmm(&["stop", "hotplug"]);
    assert_eq!(rc, 0, "{out}{err}");
    let (code, _, stderr) = vm.finish();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("stopped by vmm stop"), "{stderr}");
    drop(tap);
}
