//! Debian's stock Linux 6.12 under QEMU with TCG (software emulation), to test vhost-user device
//! backends against Linux's real virtio drivers. The guest (tests/guest/qemu/build.sh) boots in
//! a few seconds and speaks the test protocol of tests/guest/init (`VMM-READY`, then one shell
//! command per line answered by `VMM-RC <status>`) on its serial console, which is QEMU's stdio:
//! the result is the same [`Vm`] as for `vmm up`, driven with `expect()`/`send()`/`finish()`.
//!
//! Guest memory is a shared memfd, as vhost-user requires; callers add the devices, e.g.
//! `["-chardev", "socket,id=blk0,path=SOCK", "-device", "vhost-user-blk-pci,chardev=blk0"]`.
//! QEMU does not pass end-of-input to the guest, so a test ends the guest with [`poweroff`]
//! (or `send("poweroff -f\n")`) before `finish()`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::vm::{Vm, die_with_parent};
use super::{root, skip, text};

pub const QEMU: &str = "qemu-system-x86_64";

/// The guest kernel command line (test mode; a panic exits QEMU through -no-reboot).
pub const CMDLINE: &str = "console=ttyS0 panic=-1 vmm_mode=test";

/// True when qemu-system-x86_64 runs; otherwise records a loud skip for `test`.
pub fn qemu_or_skip(test: &str) -> bool {
    match Command::new(QEMU).arg("--version").output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            skip(
                test,
                &format!("`{QEMU} --version` failed: {}", text(&o.stderr).trim()),
            );
            false
        }
        Err(e) => {
            skip(
                test,
                &format!("needs {QEMU} ({e}); tests/deps.sh installs it"),
            );
            false
        }
    }
}

/// The QEMU guest (vmlinuz, initramfs.cpio) in target/guest-qemu: tests/guest/qemu/build.sh runs
/// once per test process (instant when nothing changed; the first build downloads the kernel).
pub fn artifacts() -> PathBuf {
    let dir = root().join("target/guest-qemu");
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        let st = Command::new(root().join("tests/guest/qemu/build.sh"))
            .arg(&dir)
            .status()
            .expect("tests/guest/qemu/build.sh runs");
        assert!(st.success(), "building the QEMU test guest failed");
    });
    dir
}

/// The QEMU command line for the guest in `dir` plus `extra` arguments (devices).
///
/// q35, one vCPU, TCG; 256 MiB of shared memfd memory (vhost-user backends map it); no default
/// devices; the first serial port (the guest's ttyS0) on stdio; -no-reboot so a guest reboot or
/// panic exits QEMU.
pub fn command(dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(QEMU);
    cmd.args(["-accel", "tcg", "-M", "q35", "-smp", "1", "-m", "256M"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args(["-numa", "node,memdev=mem"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(dir.join("vmlinuz"))
        .arg("-initrd")
        .arg(dir.join("initramfs.cpio"))
        .args(["-append", CMDLINE])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Boots the guest with `extra` QEMU arguments (e.g. `-chardev ...`, `-device ...`), killed after
/// `limit` (the Vm watchdog). None (a loud skip) when QEMU is missing.
pub fn start(test: &str, extra: &[&str], limit: Duration) -> Option<Vm> {
    if !qemu_or_skip(test) {
        return None;
    }
    let dir = artifacts();
    Some(Vm::spawn(command(&dir, extra), limit))
}

/// Powers the guest off and waits for QEMU to exit; returns (exit code, stdout, stderr).
pub fn poweroff(mut vm: Vm) -> (Option<i32>, String, String) {
    vm.send("poweroff -f\n");
    vm.finish()
}

/// A helper process (a vhost-user backend such as qemu-storage-daemon or `vmm device`), killed
/// when dropped, and with the test thread.
pub struct Backend {
    pub child: Child,
    pub name: String,
}

impl Backend {
    /// Starts `cmd` and waits (up to `limit`) until it listens on the unix socket `socket` (an
    /// absolute path, as the backend binds it).
    pub fn start(mut cmd: Command, socket: &Path, limit: Duration) -> Backend {
        let name = cmd.get_program().to_string_lossy().into_owned();
        cmd.stdin(Stdio::null());
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name} does not start: {e}"));
        let mut b = Backend { child, name };
        let deadline = Instant::now() + limit;
        loop {
            if listening(socket) {
                return b;
            }
            if let Some(st) = b.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({st}) before listening on {}",
                    b.name,
                    socket.display()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not listen on {} in {limit:?}",
                    b.name,
                    socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Whether a unix socket is listening at `path` (from /proc/net/unix: no probe connection, which
/// a backend serving one client could take for its client).
pub fn listening(path: &Path) -> bool {
    const ACCEPTCON: &str = "00010000";
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let path = path.to_string_lossy();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8 && f[3] == ACCEPTCON && f[7..].join(" ") == path
    })
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
