//! Hotplug churn with a freestanding guest (tests/guest/tiny/hotplug.S) that answers the
//! hotplug controller itself: it reports functions appearing in config space and ejects what
//! the host asks back. Many add/remove cycles by saving the machine file leave vmm with the
//! same open files, threads and (nearly) the same memory.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::tap::Tap;
use common::vm::{Machine, Vm, kvm_or_skip, tiny};

fn save(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Usage {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn usage(pid: i32) -> Usage {
    let count = |d: String| std::fs::read_dir(d).unwrap().count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    Usage {
        fds: count(format!("/proc/{pid}/fd")),
        threads: count(format!("/proc/{pid}/task")),
        rss_kib,
    }
}

const BODY: &str = r#"name = "churn"
memory = "16M"
vcpus = 1

[pci]
hotplug_slots = 2

[[serial]]
name = "console"
io = "stdio"
"#;

#[test]
fn add_remove_cycles_leak_nothing() {
    let test = "add_remove_cycles_leak_nothing";
    if !kvm_or_skip(test) {
        return;
    }
    let tap_name = Tap::unique_name("vmmc");
    let Some(_tap) = Tap::new(&tap_name, "10.213.11.1/24") else {
        common::skip(
            test,
            "cannot create a TAP interface (needs root and /dev/net/tun)",
        );
        return;
    };
    let m = Machine::new(&tiny("hotplug"), BODY);
    let file = m.file.clone();
    let base = std::fs::read_to_string(&file).unwrap();
    let with_nic = format!("{base}\n[[net]]\nname = \"n\"\ntap = \"{tap_name}\"\n");
    let mut vm = Vm::start(&file, Duration::from_secs(300), &[]);
    vm.expect("HP-READY");

    let cycle = |vm: &mut Vm, i: usize| {
        save(&file, &with_nic);
        vm.expect("HP+ 1e 1af4:1041");
        save(&file, &base);
        vm.expect("EJ 1e");
        vm.expect("HP- 1e");
        vm.expect_stderr("removed after the guest released it", i);
    };
    const WARMUP: usize = 5;
    const CYCLES: usize = 100;
    for i in 1..=WARMUP {
        cycle(&mut vm, i);
    }
    churn(&mut vm, "net `n`", WARMUP, CYCLES, cycle);
    let (rc, out, _) = vm.vmm(&["status", "churn", "--format", "json"]);
    assert_eq!(rc, 0);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["hotplug_free"], 2, "{s}");
}

/// The control socket commands against a running VM: `vmm plan FILE` changes nothing,
/// `vmm apply FILE` does what a save does, bad files and bad requests get clear answers, and
/// `vmm status` / `vmm stop` find the VM by name, by file, or as the only one running.
#[test]
fn control_socket_commands() {
    let test = "control_socket_commands";
    if !kvm_or_skip(test) {
        return;
    }
    let tap_name = Tap::unique_name("vmmk");
    let Some(_tap) = Tap::new(&tap_name, "10.213.12.1/24") else {
        common::skip(
            test,
            "cannot create a TAP interface (needs root and /dev/net/tun)",
        );
        return;
    };
    let m = Machine::new(&tiny("hotplug"), &BODY.replace("churn", "ctl"));
    let base = std::fs::read_to_string(&m.file).unwrap();
    let other = m.dir.path().join("other.toml");
    std::fs::write(
        &other,
        format!("{base}\n[[net]]\nname = \"n\"\ntap = \"{tap_name}\"\n"),
    )
    .unwrap();
    let bad = m.dir.path().join("bad.toml");
    std::fs::write(&bad, base.replace("vcpus = 1", "vcpus = 0")).unwrap();
    let restart = m.dir.path().join("restart.toml");
    std::fs::write(&restart, base.replace("16M", "32M")).unwrap();
    let mut vm = Vm::start(&m.file, Duration::from_secs(120), &[]);
    vm.expect("HP-READY");
    let path = |p: &Path| p.display().to_string();

    // plan: what would happen, nothing happens.
    let (rc, out, err) = vm.vmm(&["plan", &path(&other)]);
    assert_eq!(rc, 0, "{out}{err}");
    assert!(out.contains("would apply 1 live change"), "{out}");
    assert!(out.contains("+ net `n`: add into hotplug slot 30"), "{out}");
    let (_, st, _) = vm.vmm(&["status", "ctl"]);
    assert!(st.contains("2 free of 2"), "{st}");

    // apply: the device arrives in the guest.
    let (rc, out, err) = vm.vmm(&["apply", &path(&other)]);
    assert_eq!(rc, 0, "{out}{err}");
    assert!(
        out.contains("+ net `n`: plugged into hotplug slot 30"),
        "{out}"
    );
    vm.expect("HP+ 1e 1af4:1041");
    // Status by file, and as the only VM; human and JSON.
    let (rc, st, _) = vm.vmm(&["status", &path(&m.file)]);
    assert_eq!(rc, 0);
    assert!(st.contains("net        \"n\""), "{st}");
    assert!(st.contains("30 used (n)"), "{st}");
    let (_, js, _) = vm.vmm(&["status", "--format", "json"]);
    let s: serde_json::Value = serde_json::from_str(&js).unwrap();
    assert_eq!(s["hotplug_free"], 1, "{s}");

    // Applying the same file again changes nothing; bad and restart-only files are refused.
    let (rc, out, _) = vm.vmm(&["apply", &path(&other)]);
    assert_eq!(rc, 0);
    assert!(out.contains("no changes"), "{out}");
    let (rc, out, _) = vm.vmm(&["apply", &path(&bad)]);
    assert_eq!(rc, 2, "{out}");
    assert!(out.contains("invalid, not applied"), "{out}");
    assert!(out.contains("vcpus"), "{out}");
    let (rc, out, _) = vm.vmm(&["apply", &path(&restart)]);
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains("needs a restart") || out.contains("need a restart"),
        "{out}"
    );
    assert!(out.contains("memory"), "{out}");

    // Removing through apply: the guest ejects, vmm removes it.
    let (rc, _, _) = vm.vmm(&["apply", &path(&m.file)]);
    assert_eq!(rc, 0);
    vm.expect("EJ 1e");
    vm.expect_stderr("removed after the guest released it", 1);

    // A request that is not the protocol gets an error answer, and the VM keeps going.
    let sock = vm_socket(&vm);
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    use std::io::{BufRead, Write};
    s.write_all(b"{\"op\":\"reboot\"}\n").unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(&s).read_line(&mut answer).unwrap();
    assert!(answer.contains("\"status\":\"error\""), "{answer}");
    assert!(answer.contains("bad request"), "{answer}");

    // Unknown machine: a clear error.
    let (rc, _, err) = vm.vmm(&["status", "nosuchvm"]);
    assert_eq!(rc, 1);
    assert!(
        err.contains("cannot reach the VM's control socket"),
        "{err}"
    );

    // A second VM of the same name runs, without a control socket, and says so; the first
    // keeps its socket.
    let runtime = vm.runtime_dir();
    let mut twin = Vm::start(
        &m.file,
        Duration::from_secs(60),
        &[("VMM_RUNTIME_DIR", runtime.to_str().unwrap())],
    );
    twin.expect("HP-READY");
    twin.expect_stderr(
        "another running VM of that name answers on it; running without it",
        1,
    );
    let (rc, _, _) = vm.vmm(&["status", "ctl"]);
    assert_eq!(rc, 0);
    drop(twin);

    let (rc, _, _) = vm.vmm(&["stop"]);
    assert_eq!(rc, 0);
    let (code, _, stderr) = vm.finish();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!sock.exists(), "the socket is removed when the VM ends");

    // No VM left: `vmm status` says where it looked.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("status")
        .env("VMM_RUNTIME_DIR", &runtime)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no running VM has a control socket in"),
        "{err}"
    );
}

/// The control socket of the only VM in `vm`'s runtime directory.
fn vm_socket(vm: &Vm) -> std::path::PathBuf {
    let (_, js, _) = vm.vmm(&["status", "--format", "json"]);
    let s: serde_json::Value = serde_json::from_str(&js).unwrap();
    vm.runtime_dir()
        .join(format!("{}.sock", s["machine"].as_str().unwrap()))
}

/// `[[vhost_user]]` devices hot-plug from the file like NICs: with no back end listening the
/// plug is refused (and nothing reaches the guest); once qemu-storage-daemon listens, the next
/// save (unchanged) plugs it, negotiated before the guest hears of it; 1,000 add/remove cycles
/// (each a new connection to the daemon) leave vmm with the same open files and threads.
#[test]
fn vhost_user_devices_plug_and_unplug_from_the_file() {
    let test = "vhost_user_devices_plug_and_unplug_from_the_file";
    if !kvm_or_skip(test) {
        return;
    }
    let qsd_here = std::process::Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !qsd_here {
        common::skip(test, "qemu-storage-daemon is not installed (qemu-utils)");
        return;
    }
    let m = Machine::new(&tiny("hotplug"), &BODY.replace("churn", "vuplug"));
    let file = m.file.clone();
    let base = std::fs::read_to_string(&file).unwrap();
    let image = m.dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sock = m.dir.path().join("blk.sock");
    let with_disk = format!(
        "{base}\n[[vhost_user]]\nname = \"vd\"\nsocket = {:?}\ndevice = \"block\"\n",
        sock.display().to_string()
    );
    let mut vm = Vm::start(&file, Duration::from_secs(300), &[]);
    vm.expect("HP-READY");

    // No back end yet: refused, the slot stays empty.
    save(&file, &with_disk);
    let e = vm.expect_stderr("cannot plug", 1);
    assert!(e.contains("vmm device block --socket"), "{e}");
    let (_, st, _) = vm.vmm(&["status", "vuplug"]);
    assert!(
        st.contains("plug-failed") && st.contains("2 free of 2"),
        "{st}"
    );

    let mut cmd = std::process::Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,writable=on,addr.type=unix,addr.path={}",
            sock.display()
        ));
    let _qsd = common::qemu::Backend::start(cmd, &sock, Duration::from_secs(20));
    let cycle = |vm: &mut Vm, i: usize| {
        save(&file, &with_disk);
        vm.expect("HP+ 1e 1af4:1042");
        save(&file, &base);
        vm.expect("EJ 1e");
        vm.expect("HP- 1e");
        vm.expect_stderr("removed after the guest released it", i);
    };
    cycle(&mut vm, 1);
    assert!(
        vm.stderr()
            .contains("no changes; retrying the devices that did not converge"),
        "{}",
        vm.stderr()
    );
    churn(&mut vm, "vhost_user `vd`", 1, 1000, cycle);
}

/// `cycles` add/remove cycles after the first `first`: vmm ends with the open files and threads
/// it had after the first, and (nearly) the same memory; every plug was reported.
fn churn(vm: &mut Vm, what: &str, first: usize, cycles: usize, cycle: impl Fn(&mut Vm, usize)) {
    let pid = vm.pid();
    let before = usage(pid);
    let t = Instant::now();
    for i in first + 1..=first + cycles {
        cycle(vm, i);
    }
    let took = t.elapsed();
    let after = usage(pid);
    println!(
        "{what}: {cycles} add/remove cycles in {:.2} s: fds {} -> {}, threads {} -> {}, RSS {} -> {} KiB",
        took.as_secs_f64(),
        before.fds,
        after.fds,
        before.threads,
        after.threads,
        before.rss_kib,
        after.rss_kib
    );
    assert_eq!(before.fds, after.fds, "{what}: open files grew");
    assert_eq!(before.threads, after.threads, "{what}: threads grew");
    assert!(
        after.rss_kib <= before.rss_kib + 1024,
        "{what}: RSS grew by {} KiB over {cycles} cycles",
        after.rss_kib - before.rss_kib
    );
    assert_eq!(
        vm.stderr().matches(&format!("+ {what}: plugged")).count(),
        first + cycles,
        "{}",
        vm.stderr()
    );
}

/// Whether qemu-io (qemu-utils) can take `image`'s write lock and write a sector.
fn qemu_can_write(image: &Path) -> bool {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 0 512"])
        .arg(image)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    out.status.success() && !text.contains("Failed to get")
}

/// `[[block]]` disks hot-plug from the file: an image another process holds refuses the plug
/// (a diagnostic on the file, nothing reaches the guest); the next save, unchanged, plugs it
/// once it is free; while plugged, QEMU cannot write the image, and once the guest released
/// it, it can (the lock went with the device); 1,000 add/remove cycles leak nothing.
#[test]
fn disks_plug_and_unplug_from_the_file() {
    let test = "disks_plug_and_unplug_from_the_file";
    if !kvm_or_skip(test) {
        return;
    }
    if std::process::Command::new("qemu-io")
        .arg("--version")
        .output()
        .is_err()
    {
        common::skip(test, "qemu-io is not installed (qemu-utils)");
        return;
    }
    let m = Machine::new(&tiny("hotplug"), &BODY.replace("churn", "diskplug"));
    let file = m.file.clone();
    let base = std::fs::read_to_string(&file).unwrap();
    let image = m.dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let with_disk = format!(
        "{base}\n[[block]]\nname = \"d\"\npath = {:?}\n",
        image.display().to_string()
    );
    let mut vm = Vm::start(&file, Duration::from_secs(300), &[]);
    vm.expect("HP-READY");

    // Another process holds the image: refused, with a diagnostic on the device.
    let sock = m.dir.path().join("holder.sock");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.args(["device", "block", "--socket"])
        .arg(&sock)
        .arg("--path")
        .arg(&image);
    let holder = common::qemu::Backend::start(cmd, &sock, Duration::from_secs(20));
    save(&file, &with_disk);
    let e = vm.expect_stderr("vmm::plug-failed", 1);
    assert!(e.contains("in use by another process"), "{e}");
    assert!(
        e.contains("block `d`: cannot plug it into the running VM"),
        "{e}"
    );
    let (_, st, _) = vm.vmm(&["status", "diskplug"]);
    assert!(
        st.contains("plug-failed") && st.contains("2 free of 2"),
        "{st}"
    );
    drop(holder);

    // Free again: the unchanged save plugs it; QEMU is kept out while it is in the VM.
    save(&file, &with_disk);
    vm.expect("HP+ 1e 1af4:1042");
    assert!(
        !qemu_can_write(&image),
        "qemu-io wrote an image the VM uses"
    );
    save(&file, &base);
    vm.expect("EJ 1e");
    vm.expect("HP- 1e");
    vm.expect_stderr("block `d`: removed after the guest released it", 1);
    assert!(
        qemu_can_write(&image),
        "the image stayed locked after the unplug"
    );

    let cycle = |vm: &mut Vm, i: usize| {
        save(&file, &with_disk);
        vm.expect("HP+ 1e 1af4:1042");
        save(&file, &base);
        vm.expect("EJ 1e");
        vm.expect("HP- 1e");
        vm.expect_stderr("removed after the guest released it", i);
    };
    churn(&mut vm, "block `d`", 1, 1000, cycle);
}
