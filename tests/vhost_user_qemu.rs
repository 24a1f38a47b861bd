//! The QEMU/TCG harness for vhost-user backends (tests/common/qemu.rs), proved end to end with a
//! backend that exists today: qemu-storage-daemon exports a raw image as vhost-user-blk, Debian's
//! stock kernel drives it with its virtio_blk driver, and the host checks what reached the file.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::qemu::{self, Backend};
use common::skip;
use common::tap::{Tap, echo_server};
use common::vm::sh;

const LIMIT: Duration = Duration::from_secs(180);
const IMAGE_SIZE: u64 = 64 << 20;
/// Where the guest writes: 37 MiB + 4 KiB (not a multiple of the 1 MiB pattern).
const OFFSET: u64 = (37 << 20) + 4096;
const PATTERN_LINES: usize = 16384;

/// The 1 MiB pattern: line i is i in 63 zero-padded digits and a newline, as the guest's awk
/// prints it.
fn pattern() -> Vec<u8> {
    let mut p = Vec::with_capacity(PATTERN_LINES * 64);
    for i in 0..PATTERN_LINES {
        p.extend_from_slice(format!("{i:063}\n").as_bytes());
    }
    assert_eq!(p.len(), 1 << 20);
    p
}

fn read_at(file: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(file).unwrap();
    let mut buf = vec![0; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// Has the guest write the 1 MiB pattern at OFFSET of /dev/vda with fsync (the device gets a
/// FLUSH), then calls `flushed` (the host looks at the image while the guest runs), then reads
/// the range back from the device, not the page cache, and compares checksums in the guest.
fn write_flush_read_back(vm: &mut common::vm::Vm, flushed: impl FnOnce()) {
    let blocks = (1 << 20) / 4096;
    let seek = OFFSET / 4096;
    sh(
        vm,
        &format!(
            "awk 'BEGIN {{ for (i = 0; i < {PATTERN_LINES}; i++) printf \"%063d\\n\", i }}' > /tmp/pattern"
        ),
    );
    sh(
        vm,
        &format!(
            "dd if=/tmp/pattern of=/dev/vda bs=4096 seek={seek} count={blocks} conv=fsync 2>/dev/null"
        ),
    );
    flushed();
    sh(vm, "echo 3 > /proc/sys/vm/drop_caches");
    sh(
        vm,
        &format!(
            "w=$(sha256sum < /tmp/pattern); r=$(dd if=/dev/vda bs=4096 skip={seek} count={blocks} 2>/dev/null | sha256sum); [ \"$w\" = \"$r\" ]"
        ),
    );
}

#[test]
fn stock_linux_reads_and_writes_a_vhost_user_blk_disk() {
    let test = "vhost_user_qemu::stock_linux_reads_and_writes_a_vhost_user_blk_disk";
    if !qemu::qemu_or_skip(test) {
        return;
    }
    if Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_err()
    {
        skip(test, "needs qemu-storage-daemon (Debian qemu-utils)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.raw");
    let sock = tmp.path().join("blk.sock");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(IMAGE_SIZE)
        .unwrap();

    let mut qsd = Command::new("qemu-storage-daemon");
    qsd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            img.display()
        ))
        .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ));
    let daemon = Backend::start(qsd, &sock, Duration::from_secs(20));

    let chardev = format!("socket,id=blk0,path={}", sock.display());
    let extra = [
        "-chardev",
        &chardev,
        "-device",
        "vhost-user-blk-pci,chardev=blk0",
    ];
    let t0 = Instant::now();
    let Some(mut vm) = qemu::start(test, &extra, LIMIT) else {
        return;
    };
    let ready = vm.expect("VMM-READY");
    eprintln!(
        "QEMU/TCG boot of stock Linux to VMM-READY: {:.2} s wall ({ready})",
        t0.elapsed().as_secs_f64()
    );

    // The disk and its size in 512-byte sectors.
    let size = sh(&mut vm, "cat /sys/block/vda/size");
    assert_eq!(size, [(IMAGE_SIZE / 512).to_string()], "size of /dev/vda");
    sh(&mut vm, "[ -b /dev/vda ]");

    // The pattern written and flushed, read back from the device.
    write_flush_read_back(&mut vm, || {});

    let (code, out, err) = qemu::poweroff(vm);
    assert_eq!(
        code,
        Some(0),
        "QEMU exit status\nstdout:\n{out}\nstderr:\n{err}"
    );
    drop(daemon);

    // What reached the image file.
    let expected = pattern();
    let got = read_at(&img, OFFSET, expected.len());
    assert!(
        got == expected,
        "the image does not hold the pattern at {OFFSET}"
    );
    assert!(
        read_at(&img, OFFSET - 4096, 4096).iter().all(|&b| b == 0),
        "bytes before the pattern changed"
    );
    assert!(
        read_at(&img, OFFSET + (1 << 20), 4096)
            .iter()
            .all(|&b| b == 0),
        "bytes after the pattern changed"
    );
}

/// `vmm device <kind>` under Debian's stock Linux drivers: one QEMU/TCG boot with vmm's block,
/// net and rng backends, checked like the in-VMM devices (tests/virtio_linux.rs).
#[test]
fn stock_linux_drives_vmm_device_block_net_and_rng() {
    let test = "vhost_user_qemu::stock_linux_drives_vmm_device_block_net_and_rng";
    if !qemu::qemu_or_skip(test) {
        return;
    }
    let tap_name = Tap::unique_name("vmmq");
    let Some(_tap) = Tap::new(&tap_name, "10.213.8.1/24") else {
        skip(
            test,
            "cannot create a TAP interface (needs root and /dev/net/tun)",
        );
        return;
    };
    echo_server("10.213.8.1:7008").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(IMAGE_SIZE)
        .unwrap();
    let sock = |k: &str| tmp.path().join(format!("{k}.sock"));
    let vmm = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmm"));
        c.arg("device").args(args).env("RUST_LOG", "info");
        c
    };
    let s = |k: &str| sock(k).display().to_string();
    let _blk = Backend::start(
        vmm(&[
            "block",
            "--socket",
            &s("blk"),
            "--path",
            &img.display().to_string(),
            "--serial",
            "VMM-VHOST-DISK",
        ]),
        &sock("blk"),
        Duration::from_secs(20),
    );
    let _net = Backend::start(
        vmm(&["net", "--socket", &s("net"), "--tap", &tap_name]),
        &sock("net"),
        Duration::from_secs(20),
    );
    let _rng = Backend::start(
        vmm(&["rng", "--socket", &s("rng")]),
        &sock("rng"),
        Duration::from_secs(20),
    );
    let (cb, cn, cr) = (
        format!("socket,id=blk0,path={}", s("blk")),
        format!("socket,id=net0,path={}", s("net")),
        format!("socket,id=rng0,path={}", s("rng")),
    );
    let extra = [
        "-chardev",
        &cb,
        "-device",
        "vhost-user-blk-pci,chardev=blk0",
        "-chardev",
        &cn,
        "-netdev",
        "vhost-user,id=n0,chardev=net0",
        "-device",
        "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:58",
        "-chardev",
        &cr,
        "-device",
        "vhost-user-rng-pci,chardev=rng0",
    ];
    let Some(mut vm) = qemu::start(test, &extra, LIMIT) else {
        return;
    };
    vm.expect("VMM-READY");

    // Block: size and serial, the pattern written and flushed, read back from the device.
    let size = sh(&mut vm, "cat /sys/block/vda/size");
    assert_eq!(size, [(IMAGE_SIZE / 512).to_string()], "size of /dev/vda");
    let serial = sh(&mut vm, "read s < /sys/block/vda/serial; echo $s");
    assert_eq!(serial, ["VMM-VHOST-DISK"]);
    // Flushed: in the host file as soon as the guest's fsync returned, while it still runs.
    write_flush_read_back(&mut vm, || {
        assert!(
            read_at(&img, OFFSET, 1 << 20) == pattern(),
            "the image does not hold the flushed pattern"
        );
    });

    // rng: the driver is the current hwrng and reads are not all zero.
    let cur = sh(
        &mut vm,
        "cat /sys/devices/virtual/misc/hw_random/rng_current",
    );
    assert!(cur[0].starts_with("virtio_rng"), "{cur:?}");
    let bytes = sh(
        &mut vm,
        "dd if=/dev/hwrng bs=32 count=1 2>/dev/null | od -An -tx1",
    );
    let hex: Vec<&str> = bytes.iter().flat_map(|l| l.split_whitespace()).collect();
    assert_eq!(hex.len(), 32, "{bytes:?}");
    assert!(hex.iter().any(|b| *b != "00"), "{bytes:?}");

    // Net: MAC from the front end, pings and TCP to the host across the TAP.
    let mac = sh(&mut vm, "cat /sys/class/net/eth0/address");
    assert_eq!(mac, ["52:54:00:12:34:58"]);
    sh(
        &mut vm,
        "ip addr add 10.213.8.2/24 dev eth0 && ip link set eth0 up",
    );
    let ping = sh(&mut vm, "ping -c 3 -W 5 10.213.8.1");
    assert!(
        ping.iter().any(|l| l.contains("3 packets received")),
        "{ping:?}"
    );
    let echo = sh(
        &mut vm,
        "echo hello-over-vhost-user | nc -w 5 10.213.8.1 7008",
    );
    assert_eq!(echo, ["hello-over-vhost-user"]);

    let (code, out, err) = qemu::poweroff(vm);
    assert_eq!(
        code,
        Some(0),
        "QEMU exit status\nstdout:\n{out}\nstderr:\n{err}"
    );
}
