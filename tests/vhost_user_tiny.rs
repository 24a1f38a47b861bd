//! The vhost-user front end (`[[vhost_user]]`) driven by the freestanding virtio-blk guest
//! (tests/guest/tiny/blk.c), in milliseconds per boot: against vmm's own back end
//! (`vmm device block`) and a third-party one (qemu-storage-daemon's vhost-user-blk export),
//! through driver resets, with the back end killed mid-run, and with no back end at all.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::qemu::Backend;
use common::vm::{Machine, Vm, kvm_or_skip, tiny};

/// The record the guest writes to sector `i` (see blk.c).
fn record(i: u64) -> Vec<u8> {
    let mut r = vec![0u8; 512];
    r[..8].copy_from_slice(b"VMMREC01");
    r[8..16].copy_from_slice(&i.to_le_bytes());
    for (k, b) in r.iter_mut().enumerate().take(508).skip(16) {
        *b = ((i as usize * 31 + k) & 0xff) as u8;
    }
    let mut h: u32 = 0x811c_9dc5;
    for &b in &r[..508] {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    r[508..].copy_from_slice(&h.to_le_bytes());
    r
}

fn machine(socket: &Path, cmdline: &str) -> Machine {
    let body = format!(
        "name = \"vu\"\nmemory = \"32M\"\nvcpus = 1\ncmdline = \"{cmdline}\"\n[[serial]]\nname = \"com1\"\nio = \"stdio\"\n[[vhost_user]]\nname = \"disk0\"\nsocket = {:?}\ndevice = \"block\"\n",
        socket.display().to_string()
    );
    Machine::new(&tiny("blk"), &body)
}

fn image(dir: &Path, len: u64) -> PathBuf {
    let p = dir.join("disk.img");
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    p
}

/// `vmm device block` serving `image` on `socket` (one connection, then it exits).
fn vmm_device(socket: &Path, image: &Path) -> Backend {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.args(["device", "block", "--socket"])
        .arg(socket)
        .arg("--path")
        .arg(image);
    Backend::start(cmd, socket, Duration::from_secs(20))
}

/// qemu-storage-daemon exporting `image` as vhost-user-blk on `socket`, or None (SKIPPED).
fn qsd(test: &str, socket: &Path, image: &Path) -> Option<Backend> {
    let here = Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !here {
        common::skip(test, "qemu-storage-daemon is not installed (qemu-utils)");
        return None;
    }
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},cache.direct=off",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=file0,writable=on,addr.type=unix,addr.path={}",
            socket.display()
        ));
    Some(Backend::start(cmd, socket, Duration::from_secs(20)))
}

/// Records 0..n are on the host file.
fn assert_records(image: &Path, n: u64) {
    let disk = std::fs::read(image).unwrap();
    for i in 0..n {
        let at = (i * 512) as usize;
        assert_eq!(
            disk[at..at + 512],
            record(i)[..],
            "record {i} is not on the host file"
        );
    }
}

/// Writes and flushes records through `socket`'s back end, then reads them back through a
/// second back end started by `again`.
fn write_then_verify(socket: &Path, image: &Path, again: impl FnOnce() -> Backend) {
    let (code, out, err) = Vm::start(
        &machine(socket, "mode=durable records=64 start=0").file,
        Duration::from_secs(60),
        &[],
    )
    .finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("BLK capacity=8192"), "{out}");
    assert!(
        out.contains("ACK 63") && out.contains("DONE"),
        "{out}\n{err}"
    );
    assert_records(image, 64);
    let _b = again();
    let (code, out, err) = Vm::start(
        &machine(socket, "mode=verify records=64 start=0").file,
        Duration::from_secs(60),
        &[],
    )
    .finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("OK 64") && !out.contains("BAD"),
        "{out}\n{err}"
    );
}

#[test]
fn a_disk_served_by_vmm_device_block_through_the_front_end() {
    if !kvm_or_skip("a_disk_served_by_vmm_device_block_through_the_front_end") {
        return;
    }
    let dir = common::vm::private_dir();
    let img = image(dir.path(), 4 << 20);
    let sock = dir.path().join("blk.sock");
    let _b = vmm_device(&sock, &img);
    write_then_verify(&sock, &img, || vmm_device(&sock, &img));
}

#[test]
fn a_disk_served_by_qemu_storage_daemon_through_the_front_end() {
    let test = "a_disk_served_by_qemu_storage_daemon_through_the_front_end";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = common::vm::private_dir();
    let img = image(dir.path(), 4 << 20);
    let sock = dir.path().join("qsd.sock");
    let Some(b) = qsd(test, &sock, &img) else {
        return;
    };
    // qemu-storage-daemon serves one front end after another on the same socket.
    write_then_verify(&sock, &img, || b);
}

/// The guest resets the device over and over with requests in flight: every reset stops the
/// back end's rings (GET_VRING_BASE) and the next start hands them over again.
#[test]
fn driver_resets_with_requests_in_flight_restart_the_back_end() {
    let test = "driver_resets_with_requests_in_flight_restart_the_back_end";
    if !kvm_or_skip(test) {
        return;
    }
    let dir = common::vm::private_dir();
    let img = image(dir.path(), 4 << 20);
    let sock = dir.path().join("qsd.sock");
    let Some(_b) = qsd(test, &sock, &img) else {
        return;
    };
    let m = machine(&sock, "mode=resetloop qd=8");
    let mut vm = Vm::start(&m.file, Duration::from_secs(60), &[]);
    for n in 0..20 {
        let l = vm.expect("ROUND ");
        assert!(
            l.contains(&format!("ROUND {n} status=0")),
            "round {n}: the first write of each round completes: {l}"
        );
    }
    let (took, err) = vm.terminate();
    assert!(!err.contains("needs a reset"), "{err}");
    eprintln!("20 reset rounds, stopped in {took:?}");
}

/// A back end that dies mid-run: the device asks for a reset, vmm says why and keeps the VM
/// running (the guest times out its request and powers off by itself).
#[test]
fn a_back_end_killed_mid_run_leaves_the_vm_running() {
    if !kvm_or_skip("a_back_end_killed_mid_run_leaves_the_vm_running") {
        return;
    }
    let dir = common::vm::private_dir();
    let img = image(dir.path(), 4 << 20);
    let sock = dir.path().join("blk.sock");
    let mut b = vmm_device(&sock, &img);
    let m = machine(&sock, "mode=durable records=8000 start=0");
    let mut vm = Vm::start(&m.file, Duration::from_secs(60), &[]);
    vm.expect("ACK 20");
    let (_, st, _) = vm.vmm(&["status"]);
    assert!(st.contains("\"disk0\"") && st.contains("running"), "{st}");
    b.child.kill().unwrap();
    let _ = b.child.wait();
    // `vmm status` says the device failed, and why (the guest waits ~10 s for its request
    // before it gives up and powers off).
    let mut st = String::new();
    for _ in 0..100 {
        st = vm.vmm(&["status"]).1;
        if st.contains("failed") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        st.contains("failed: the back end closed the connection"),
        "{st}"
    );
    let (code, out, err) = vm.finish();
    assert_eq!(
        code,
        Some(0),
        "the guest powered off by itself: {out}\n{err}"
    );
    assert!(out.contains("TIMEOUT") || out.contains("ERR"), "{out}");
    assert!(
        err.contains("needs a reset") && err.contains("the back end closed the connection"),
        "{err}"
    );
    // What was acknowledged before the kill is on the host file.
    let last: u64 = out
        .lines()
        .filter_map(|l| l.strip_prefix("ACK "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap();
    assert_records(&img, last + 1);
}

/// No back end at the socket: `vmm up` refuses the file (exit 2) naming the socket and what
/// to start, before it builds anything.
#[test]
fn a_missing_back_end_is_refused_with_what_to_start() {
    let dir = common::vm::private_dir();
    let sock = dir.path().join("nobody.sock");
    let m = machine(&sock, "");
    let o = common::vmm().arg("up").arg(&m.file).output().unwrap();
    let err = common::text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("nobody.sock"), "{err}");
    assert!(err.contains("vmm device block --socket"), "{err}");
}
