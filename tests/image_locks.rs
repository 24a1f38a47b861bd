//! Disk image locks against QEMU's, with qemu-io (qemu-utils) in both orders: vmm holding an
//! image keeps qemu-io from writing it, and vmm refuses an image qemu-io holds. `vmm device
//! block` opens and locks the image before it waits for a front end: a VM's disk is locked
//! the same way (Disk::open).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn qemu_io_or_skip(test: &str) -> bool {
    if Command::new("qemu-io").arg("--version").output().is_ok() {
        return true;
    }
    common::skip(test, "qemu-io is not installed (qemu-utils)");
    false
}

/// `vmm device block` on `img`, up once it says it listens; killed on drop.
/// The socket directory lives as long as the holder.
struct Holder(Child, #[allow(dead_code)] tempfile::TempDir);

impl Holder {
    fn start(img: &Path, readonly: bool) -> Holder {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("blk.sock");
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmm"));
        c.args(["device", "block", "--socket"])
            .arg(&sock)
            .arg("--path")
            .arg(img)
            .stderr(Stdio::piped());
        if readonly {
            c.arg("--readonly");
        }
        let mut child = c.spawn().unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let t = Instant::now();
        while !line.contains("listening on") {
            line.clear();
            assert!(err.read_line(&mut line).unwrap() > 0, "vmm device ended");
            assert!(t.elapsed() < Duration::from_secs(20));
        }
        Holder(child, d)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_io(args: &[&str], img: &Path) -> (bool, String) {
    let out = Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(args)
        .arg(img)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (
        out.status.success() && !text.contains("Failed to get"),
        text,
    )
}

fn image() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("disk.raw");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    (d, p)
}

#[test]
fn qemu_cannot_write_an_image_vmm_uses() {
    if !qemu_io_or_skip("qemu_cannot_write_an_image_vmm_uses") {
        return;
    }
    let (_d, img) = image();
    {
        let _vmm = Holder::start(&img, false);
        let (ok, out) = qemu_io(&["-c", "write -P 0xab 0 4096"], &img);
        assert!(!ok, "qemu-io wrote an image vmm holds: {out}");
        assert!(out.contains("Failed to get \"write\" lock"), "{out}");
        // A second writer of vmm's own kind is refused the same way.
        let d = tempfile::tempdir().unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["device", "block", "--socket"])
            .arg(d.path().join("s"))
            .arg("--path")
            .arg(&img)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(err.contains("is in use by another process"), "{err}");
    }
    // vmm gone: the locks went with it.
    let (ok, out) = qemu_io(&["-c", "write -P 0xab 0 4096"], &img);
    assert!(ok, "{out}");
    // A read-only vmm disk shares with readers, and still keeps writers out.
    let _ro = Holder::start(&img, true);
    let (ok, out) = qemu_io(&["-r", "-c", "read -P 0xab 0 4096"], &img);
    assert!(
        ok,
        "a reader was refused next to a read-only vmm disk: {out}"
    );
    let (ok, out) = qemu_io(&["-c", "write 0 512"], &img);
    assert!(!ok, "{out}");
    // And a second read-only vmm shares too.
    let _ro2 = Holder::start(&img, true);
}

#[test]
fn vmm_refuses_an_image_qemu_uses() {
    if !qemu_io_or_skip("vmm_refuses_an_image_qemu_uses") {
        return;
    }
    let (_d, img) = image();
    // qemu-io holds the image open for writing while it waits for commands.
    let mut q = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(&img)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = q.stdin.take().unwrap();
    let mut out = BufReader::new(q.stdout.take().unwrap());
    stdin.write_all(b"write -P 0x5a 0 512\n").unwrap();
    let mut line = String::new();
    while !line.contains("wrote 512") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "qemu-io ended");
    }
    for readonly in [false, true] {
        let sock = img.with_extension("sock");
        let mut c = Command::new(env!("CARGO_BIN_EXE_vmm"));
        c.args(["device", "block", "--socket"])
            .arg(&sock)
            .arg("--path")
            .arg(&img);
        if readonly {
            c.arg("--readonly");
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "readonly={readonly}: {err}");
        assert!(err.contains("is in use by another process"), "{err}");
    }
    stdin.write_all(b"quit\n").unwrap();
    drop(stdin);
    q.wait().unwrap();
    // qemu-io gone: vmm takes the image.
    let _vmm = Holder::start(&img, false);
}
