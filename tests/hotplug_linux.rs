//! NIC hotplug from machine file edits, under the Linux test kernel's own drivers (ACPI PCI
//! hotplug: acpiphp, the GED, virtio-net), in one boot: add a NIC by saving the file, use it,
//! remove it (the guest releases it, vmm frees the slot and closes the TAP), add it again, and
//! edits that must change nothing (too many NICs, restart-only, mixed, invalid); then disks:
//! an in-process one and a vhost-user one plugged from the file, the back end killed (`vmm
//! status` says failed) and restarted, re-plugged by saving the unchanged file, both removed.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::qemu::Backend;
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
hotplug_slots = 3

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
    assert_eq!(s["hotplug_free"], 3, "{s}");

    // 1. Add a NIC by saving the file: the guest's drivers bring up a new interface.
    save(&file, &with_nic);
    vm.expect_stderr("+ net `uplink`: plugged into hotplug slot", 1);
    let out = sh(&mut vm, &wait_iface(true));
    let iface = value(&out, "IFACE");
    println!("VMM-NET-ADD {iface}");
    assert_eq!(tun_fds(pid), 1, "vmm holds the TAP open");
    let s = status(&vm);
    assert_eq!(s["hotplug_free"], 2, "{s}");
    // Traffic flows over it.
    let out = sh(
        &mut vm,
        &format!(
            "ip addr add 10.213.9.2/24 dev {iface}; ip link set {iface} up; ping -c 2 -i 0.2 -W 10 10.213.9.1 | while read l; do case $l in *received*) echo \"PING=$l\";; esac; done"
        ),
    );
    assert!(
        value(&out, "PING").contains("2 packets received"),
        "{out:?}"
    );

    // 2. Remove it: the guest releases the device, then vmm removes it and closes the TAP.
    save(&file, &original);
    vm.expect_stderr("net `uplink`: removed after the guest released it", 1);
    let out = sh(&mut vm, &wait_iface(false));
    assert_eq!(value(&out, "IFACE"), "none");
    println!("VMM-NET-GONE {iface}");
    let s = status(&vm);
    assert_eq!(s["hotplug_free"], 3, "{s}");
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
            "ip addr add 10.213.9.2/24 dev {iface}; ip link set {iface} up; ping -c 2 -i 0.2 -W 10 10.213.9.1 | while read l; do case $l in *received*) echo \"PING=$l\";; esac; done"
        ),
    );
    assert!(
        value(&out, "PING").contains("2 packets received"),
        "{out:?}"
    );

    // 4. Edits that change nothing. More NICs than slots: a diagnostic, nothing plugged.
    let before = status(&vm);
    let too_many = format!(
        "{with_nic}{}{}{}",
        nic("extra1", "vmmx1", "52:54:00:aa:bb:02"),
        nic("extra2", "vmmx2", "52:54:00:aa:bb:03"),
        nic("extra3", "vmmx3", "52:54:00:aa:bb:04")
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

    // 5. Disks: an in-process one and a vhost-user one (`vmm device block`) plugged from the
    // file, the back end killed and restarted, re-plugged by saving the unchanged file, removed.
    disks_follow_the_file(&mut vm, &file, &with_nic, m.dir.path());

    // 6. A virtio-fs share served by virtiofsd, plugged from the file, mounted, used both
    // ways, unmounted and removed.
    share_follows_the_file(&mut vm, &file, &with_nic, m.dir.path());

    // `vmm stop` ends the VM.
    let (rc, out, err) = vm.vmm(&["stop", "hotplug"]);
    assert_eq!(rc, 0, "{out}{err}");
    let (code, _, stderr) = vm.finish();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("stopped by vmm stop"), "{stderr}");
    drop(tap);
}

/// Waits in the guest until a disk with serial `serial` exists (or not); when it does, prints
/// its name and the md5 of its first MiB.
fn wait_disk(serial: &str, present: bool) -> String {
    let want = if present { "" } else { "!" };
    format!(
        "i=0; while [ $i -lt 600 ]; do d=; for b in /sys/block/vd*; do [ -e $b/serial ] || continue; read s < $b/serial; [ \"$s\" = {serial} ] && d=${{b##*/}}; done; [ {want} -n \"$d\" ] && break; sleep 0.1; i=$((i+1)); done; echo DISK=${{d:-none}}; [ -n \"$d\" ] && dd if=/dev/$d bs=1M count=1 2>/dev/null | md5sum | while read h _; do echo MD5=$h; done; true"
    )
}

fn start_block_backend(sock: &Path, image: &Path) -> Backend {
    let _ = std::fs::remove_file(sock);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.args(["device", "block", "--serial", "VMM-HP-VU", "--socket"])
        .arg(sock)
        .arg("--path")
        .arg(image);
    Backend::start(cmd, sock, Duration::from_secs(20))
}

/// A 1 MiB image of a pattern made from `seed`, and its md5.
fn pattern_image(path: &Path, seed: usize) -> String {
    let pattern: Vec<u8> = (0..1usize << 20).map(|i| (i * seed % 239) as u8).collect();
    std::fs::write(path, &pattern).unwrap();
    let md5 = Command::new("md5sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&md5.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_string()
}

fn device_state(vm: &Vm, name: &str) -> serde_json::Value {
    status(vm)["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .cloned()
        .unwrap_or_default()
}

/// One save adds an in-process disk and a vhost-user disk (`vmm device block`); the guest reads
/// both and writes the first; the vhost-user back end is killed (`vmm status`: failed) and
/// restarted, and saving the unchanged file re-plugs that disk alone; removing both from the
/// file takes them from the guest, and the host image has the guest's write.
fn disks_follow_the_file(vm: &mut Vm, file: &Path, with_nic: &str, dir: &Path) {
    let blk_image = dir.join("hp-blk.img");
    let blk_md5 = pattern_image(&blk_image, 37);
    let vu_image = dir.join("hp-vu.img");
    let vu_md5 = pattern_image(&vu_image, 31);
    let sock = dir.join("hp-vu.sock");
    let backend = start_block_backend(&sock, &vu_image);
    let with_disks = format!(
        "{with_nic}\n[[block]]\nname = \"hpdisk\"\npath = {:?}\nserial = \"VMM-HP-BLK\"\n\n[[vhost_user]]\nname = \"vudisk\"\nsocket = {:?}\ndevice = \"block\"\n",
        blk_image.display().to_string(),
        sock.display().to_string()
    );
    // `vmm plan` notes that a disk must be unmounted before it is removed.
    let plan_file = dir.join("plan.toml");
    std::fs::write(&plan_file, with_nic).unwrap();
    save(file, &with_disks);
    vm.expect_stderr("+ block `hpdisk`: plugged into hotplug slot", 1);
    vm.expect_stderr("+ vhost_user `vudisk`: plugged into hotplug slot", 1);
    let (rc, out, err) = vm.vmm(&["plan", plan_file.to_str().unwrap()]);
    assert_eq!(rc, 0, "{out}{err}");
    assert!(out.contains("- block `hpdisk`"), "{out}");
    assert!(out.contains("note: unmount it in the guest first"), "{out}");
    let out = sh(vm, &wait_disk("VMM-HP-BLK", true));
    assert_eq!(value(&out, "MD5"), blk_md5, "{out:?}");
    let blk = value(&out, "DISK");
    sh(
        vm,
        &format!(
            "echo hot-plugged-disk-write > /tmp/h; dd if=/tmp/h of=/dev/{blk} bs=512 seek=8 conv=sync,fsync 2>/dev/null"
        ),
    );
    let out = sh(vm, &wait_disk("VMM-HP-VU", true));
    assert_eq!(value(&out, "MD5"), vu_md5, "{out:?}");
    println!("VMM-DISK-HOTPLUG {blk} {}", value(&out, "DISK"));

    // The back end dies: that device fails, the VM runs on, `vmm status` says so.
    drop(backend);
    let deadline = Instant::now() + Duration::from_secs(60);
    let failed = loop {
        let dev = device_state(vm, "vudisk");
        if dev["state"] == "failed" {
            break dev;
        }
        assert!(Instant::now() < deadline, "never failed: {dev}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or("")
            .contains("closed the connection"),
        "{failed}"
    );
    assert_eq!(device_state(vm, "hpdisk")["state"], "running");

    // Restarted, and the file saved unchanged: that disk alone is unplugged and plugged again.
    let _backend = start_block_backend(&sock, &vu_image);
    save(file, &with_disks);
    vm.expect_stderr("to plug it again (its back end failed)", 1);
    vm.expect_stderr(
        "vhost_user `vudisk`: removed after the guest released it",
        1,
    );
    vm.expect_stderr("+ vhost_user `vudisk`: plugged into hotplug slot", 2);
    let out = sh(vm, &wait_disk("VMM-HP-VU", true));
    assert_eq!(value(&out, "MD5"), vu_md5, "{out:?}");
    assert_eq!(device_state(vm, "vudisk")["state"], "running");
    assert!(
        !vm.stderr().contains("block `hpdisk`: removed"),
        "{}",
        vm.stderr()
    );

    // Both removed from the file: the guest lets them go; the write is in the host image.
    save(file, with_nic);
    vm.expect_stderr("block `hpdisk`: removed after the guest released it", 1);
    vm.expect_stderr(
        "vhost_user `vudisk`: removed after the guest released it",
        2,
    );
    for serial in ["VMM-HP-BLK", "VMM-HP-VU"] {
        let out = sh(vm, &wait_disk(serial, false));
        assert_eq!(value(&out, "DISK"), "none", "{out:?}");
    }
    let host = std::fs::read(&blk_image).unwrap();
    assert_eq!(
        &host[8 * 512..8 * 512 + 22],
        b"hot-plugged-disk-write",
        "host image"
    );
}

/// virtiofsd (tests/deps.sh builds it) serves a host directory as `[[vhost_user]] device =
/// "fs"`: saving the file plugs it, the guest mounts it (`mount -t virtiofs`), reads a host
/// file, writes one the host then reads, and sees a file the host made after the mount; after
/// `umount`, removing it from the file takes it from the guest.
fn share_follows_the_file(vm: &mut Vm, file: &Path, with_nic: &str, dir: &Path) {
    let test = "nics_follow_the_machine_file (virtio-fs step)";
    let Some(virtiofsd) = common::tool("virtiofsd") else {
        common::skip(test, "virtiofsd is not built (tests/deps.sh builds it)");
        return;
    };
    let shared = dir.join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("hello.txt"), "from-the-host\n").unwrap();
    let sock = dir.join("fs.sock");
    let mut cmd = Command::new(virtiofsd);
    cmd.arg("--socket-path")
        .arg(&sock)
        .arg("--shared-dir")
        .arg(&shared)
        .args(["--tag", "share", "--sandbox", "none", "--cache", "auto"]);
    let _daemon = Backend::start(cmd, &sock, Duration::from_secs(20));
    let with_share = format!(
        "{with_nic}\n[[vhost_user]]\nname = \"share\"\nsocket = {:?}\ndevice = \"fs\"\n",
        sock.display().to_string()
    );
    save(file, &with_share);
    vm.expect_stderr("+ vhost_user `share`: plugged into hotplug slot", 1);
    let out = sh(
        vm,
        "mkdir -p /mnt/s; i=0; until mount -t virtiofs share /mnt/s 2>/dev/null; do [ $i -ge 300 ] && break; sleep 0.1; i=$((i+1)); done; read l < /mnt/s/hello.txt; echo READ=$l; echo from-the-guest > /mnt/s/guest.txt; sync; echo WROTE=$?",
    );
    assert_eq!(value(&out, "READ"), "from-the-host", "{out:?}");
    assert_eq!(value(&out, "WROTE"), "0", "{out:?}");
    assert_eq!(
        std::fs::read_to_string(shared.join("guest.txt")).unwrap(),
        "from-the-guest\n"
    );
    std::fs::write(shared.join("later.txt"), "made-after-the-mount\n").unwrap();
    let out = sh(
        vm,
        "read l < /mnt/s/later.txt; echo LATER=$l; umount /mnt/s; echo UMOUNT=$?",
    );
    assert_eq!(value(&out, "LATER"), "made-after-the-mount", "{out:?}");
    assert_eq!(value(&out, "UMOUNT"), "0", "{out:?}");
    println!("VMM-VIRTIOFS ok");
    save(file, with_nic);
    vm.expect_stderr("vhost_user `share`: removed after the guest released it", 1);
}
