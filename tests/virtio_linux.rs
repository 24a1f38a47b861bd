//! The virtio devices under Linux's own drivers, in vmm, with the Linux test kernel: one boot
//! checks block (read, write, flush, checksums against the host file), net (ping and TCP over a
//! real TAP), console (hvc0 both ways over a unix socket), rng (/dev/hwrng), and a disk served
//! by another process through the vhost-user front end (`vmm device block`).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::qemu::Backend;
use common::tap::{Tap, echo_server};
use common::vm::{LINUX_LIMIT, Machine, Vm, kvm_or_skip, one_linux_guest_at_a_time, sh, value};
use common::{guest_artifacts, root};

#[test]
fn linux_drivers_use_block_net_console_and_rng() {
    if !kvm_or_skip("linux_drivers_use_block_net_console_and_rng") {
        return;
    }
    let tap_name = Tap::unique_name("vmmt");
    let Some(tap) = Tap::new(&tap_name, "10.213.7.1/24") else {
        common::skip(
            "linux_drivers_use_block_net_console_and_rng",
            "cannot create a TAP interface (needs root and /dev/net/tun)",
        );
        return;
    };
    // A TCP echo server on the TAP's address.
    echo_server("10.213.7.1:7007").unwrap();

    let g = guest_artifacts();
    let cmdline = std::fs::read_to_string(root().join("tests/guest/cmdline.txt")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let mut pattern = vec![0u8; 8 << 20];
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    std::fs::write(&image, &pattern).unwrap();
    // The vhost-user disk: another pattern, served by `vmm device block`.
    let vu_image = dir.path().join("vu.img");
    let vu_pattern: Vec<u8> = (0..4usize << 20).map(|i| (i * 13 % 241) as u8).collect();
    std::fs::write(&vu_image, &vu_pattern).unwrap();
    // Its checksum before the guest writes to it.
    let vu_md5 = Command::new("md5sum").arg(&vu_image).output().unwrap();
    let vu_md5 = String::from_utf8_lossy(&vu_md5.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    let vu_sock = dir.path().join("vu-blk.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.args(["device", "block", "--serial", "VMM-VU-DISK", "--socket"])
        .arg(&vu_sock)
        .arg("--path")
        .arg(&vu_image);
    let _vu = Backend::start(cmd, &vu_sock, Duration::from_secs(20));
    let body = format!(
        r#"initrd = {initrd:?}
cmdline = "{cmd} vmm_mode=test"
name = "virtio"
memory = "96M"
vcpus = 2
[[serial]]
name = "console"
io = "stdio"
[[block]]
name = "disk0"
path = {image:?}
serial = "VMM-TEST-DISK"
[[net]]
name = "eth0"
tap = "{tap_name}"
mac = "52:54:00:12:34:56"
[[console]]
name = "hvc"
io = {{ socket = "hvc.sock" }}
[[rng]]
name = "rng0"
[[vhost_user]]
name = "vudisk"
socket = {vu_sock:?}
device = "block"
"#,
        initrd = g.join("initramfs.cpio").display().to_string(),
        cmd = cmdline.trim(),
        image = image.display().to_string(),
        vu_sock = vu_sock.display().to_string(),
    );
    let m = Machine::new(&g.join("vmlinux"), &body);
    let sock = m.file.parent().unwrap().join("hvc.sock");
    let _guest = one_linux_guest_at_a_time();
    let mut vm = Vm::start(&m.file, LINUX_LIMIT, &[]);
    vm.expect("VMM-READY");

    // Drivers bound: four virtio functions on bus 0.
    let drivers = sh(
        &mut vm,
        "for d in /sys/bus/virtio/devices/*; do read i < $d/device; echo DEV=${d##*/}:$i; done",
    );
    let ids: Vec<String> = drivers
        .iter()
        .filter(|l| l.starts_with("DEV="))
        .map(|l| l.rsplit(':').next().unwrap().to_string())
        .collect();
    for id in ["0x0001", "0x0002", "0x0003", "0x0004"] {
        assert!(
            ids.contains(&id.to_string()),
            "virtio device {id} missing: {drivers:?}"
        );
    }
    assert_eq!(
        ids.iter().filter(|i| *i == "0x0002").count(),
        2,
        "the in-process disk and the vhost-user one: {drivers:?}"
    );

    // The device wave's drivers are in the test kernel (tests/guest/kernel.config), so a new
    // device needs no kernel rebuild: a dropped option would show here.
    let wave = sh(
        &mut vm,
        "echo VDRV=$(ls /sys/bus/virtio/drivers); echo PDRV=$(ls /sys/bus/pci/drivers); echo FS=$(while read a b; do echo ${b:-$a}; done < /proc/filesystems)",
    );
    for (key, want) in [
        (
            "VDRV",
            &[
                "virtio_balloon",
                "virtio_input",
                "virtio_scsi",
                "virtio_gpu",
                "9pnet_virtio",
                "virtio_iommu",
                "vmw_vsock_virtio_transport",
                "virtiofs",
                "virtio_pmem",
                "virtio_snd",
            ][..],
        ),
        ("PDRV", &["xhci_hcd"][..]),
        ("FS", &["virtiofs", "9p", "fuse"][..]),
    ] {
        let line = value(&wave, key);
        let have: Vec<&str> = line.split(' ').collect();
        for w in want {
            assert!(have.contains(w), "{key} lacks {w}: {have:?}");
        }
    }

    // Block: size, serial, the host's pattern, a write the host then sees.
    let b = sh(
        &mut vm,
        "read s < /sys/block/vda/size; echo SIZE=$s; read i < /sys/block/vda/serial; echo SERIAL=$i; dd if=/dev/vda bs=1M count=8 2>/dev/null | md5sum",
    );
    assert_eq!(value(&b, "SIZE"), (8 * 2048).to_string());
    assert_eq!(value(&b, "SERIAL"), "VMM-TEST-DISK");
    let md5 = Command::new("md5sum").arg(&image).output().unwrap();
    let host_md5 = String::from_utf8_lossy(&md5.stdout)
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    assert!(
        b.iter().any(|l| l.starts_with(&host_md5)),
        "guest read {b:?}, host md5 {host_md5}"
    );
    sh(
        &mut vm,
        "echo written-by-the-guest > /tmp/w; dd if=/tmp/w of=/dev/vda bs=512 seek=4096 conv=sync,fsync 2>/dev/null",
    );

    // The vhost-user disk: found by its serial, the host's pattern, a write the host sees.
    let v = sh(
        &mut vm,
        "for b in /sys/block/vd*; do read i < $b/serial; [ \"$i\" = VMM-VU-DISK ] && d=${b##*/}; done; echo VUDEV=$d; read s < /sys/block/$d/size; echo VUSIZE=$s; dd if=/dev/$d bs=1M count=4 2>/dev/null | md5sum; echo vhost-user-write > /tmp/v; dd if=/tmp/v of=/dev/$d bs=512 seek=2048 conv=sync,fsync 2>/dev/null; echo VUDD=$?",
    );
    assert_eq!(value(&v, "VUSIZE"), (4 * 2048).to_string(), "{v:?}");
    assert_eq!(value(&v, "VUDD"), "0", "{v:?}");
    assert!(
        v.iter().any(|l| l.starts_with(&vu_md5)),
        "guest read {v:?}, host md5 {vu_md5}"
    );
    let vu_disk = std::fs::read(&vu_image).unwrap();
    assert_eq!(
        &vu_disk[2048 * 512..2048 * 512 + 16],
        b"vhost-user-write",
        "the guest's fsync'd write is on the host file while the VM runs"
    );

    // rng.
    let r = sh(
        &mut vm,
        "read c < /sys/devices/virtual/misc/hw_random/rng_current; echo RNG=$c; dd if=/dev/hwrng bs=16 count=2 2>/dev/null | od -An -tx1",
    );
    assert!(value(&r, "RNG").starts_with("virtio_rng"), "{r:?}");
    assert!(
        r.iter()
            .any(|l| l.split_whitespace().count() == 16 && l.split_whitespace().any(|x| x != "00")),
        "{r:?}"
    );

    // Console: hvc0 both ways through the socket. The guest keeps hvc0 open on fd 3 from
    // before the host writes: input that reaches a tty nobody has open is flushed when it
    // closes, so opening it per command would race with the host.
    sh(&mut vm, "exec 3<>/dev/hvc0");
    let mut c = UnixStream::connect(&sock).expect("console socket");
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(b"from-the-host\n").unwrap();
    let hv = sh(
        &mut vm,
        "echo to-the-host >&3; read -t 10 l <&3; echo GOT=$l; exec 3<&-",
    );
    assert_eq!(value(&hv, "GOT"), "from-the-host");
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while !String::from_utf8_lossy(&got).contains("to-the-host") {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }

    // Net: the MAC, pings and TCP to the host over the TAP. `ping -c 3` paces its packets
    // with SIGALRM: the test kernel has POSIX timers (alarm, setitimer) for it.
    let n = sh(
        &mut vm,
        "read a < /sys/class/net/eth0/address; echo MAC=$a; ip addr add 10.213.7.2/24 dev eth0; ip link set eth0 up; ping -c 3 -i 0.2 -W 5 10.213.7.1 | while read l; do case $l in *received*) echo \"PING=$l\";; esac; done; echo hello-over-tcp | nc 10.213.7.1 7007",
    );
    assert_eq!(value(&n, "MAC"), "52:54:00:12:34:56");
    assert!(
        value(&n, "PING").contains("3 packets transmitted, 3 packets received"),
        "{n:?}"
    );
    assert!(
        n.iter().any(|l| l.contains("hello-over-tcp")),
        "TCP echo: {n:?}"
    );

    // The TAP is deleted under the running VM: the guest's link goes down (configuration
    // interrupt), and the VM keeps answering.
    drop(tap);
    let c = sh(
        &mut vm,
        "for i in 1 2 3 4 5 6 7 8 9 10; do read c < /sys/class/net/eth0/carrier; [ $c = 0 ] && break; sleep 1; done; echo CARRIER=$c",
    );
    assert_eq!(value(&c, "CARRIER"), "0", "{c:?}");
    assert!(
        vm.stderr().contains(&format!("TAP {tap_name}")),
        "vmm says what happened to the TAP: {}",
        vm.stderr()
    );

    vm.send("poweroff -f\n");
    let (code, _, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
    let disk = std::fs::read(&image).unwrap();
    assert_eq!(&disk[4096 * 512..4096 * 512 + 20], b"written-by-the-guest");
}
