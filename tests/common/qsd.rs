//! Disk images with real faults: qemu-storage-daemon exports an image through FUSE as a
//! regular file, with QEMU's blkdebug driver failing the operations a test names, or its
//! throttle filter slowing every request down.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An exported image: `path` is the file vmm opens; stopped (and unmounted) on drop.
pub struct Export {
    pub path: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

/// How the export misbehaves.
pub enum Fault {
    /// The first flush to disk fails with EIO, later ones succeed (blkdebug, once).
    FlushFailsOnce,
    /// At most `iops` requests per second (a throttle group).
    Slow { iops: u32 },
}

/// Whether qemu-storage-daemon and FUSE are here; says SKIPPED otherwise.
pub fn available(test: &str) -> bool {
    let qsd = Command::new("qemu-storage-daemon")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !qsd {
        super::skip(test, "qemu-storage-daemon is not installed (qemu-utils)");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        super::skip(test, "/dev/fuse does not exist");
        return false;
    }
    true
}

fn mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(4) == path.to_str()))
}

impl Export {
    /// Exports a fresh image of `size` bytes with `fault`.
    pub fn new(size: u64, fault: Fault) -> Export {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.raw");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size)
            .unwrap();
        let path = dir.path().join("export.raw");
        std::fs::File::create(&path).unwrap();
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev").arg(format!(
            "driver=file,node-name=file0,filename={}",
            image.display()
        ));
        let top = match fault {
            Fault::FlushFailsOnce => {
                let conf = dir.path().join("blkdebug.conf");
                std::fs::write(
                    &conf,
                    "[inject-error]\nevent = \"flush_to_disk\"\nerrno = \"5\"\nonce = \"on\"\n",
                )
                .unwrap();
                cmd.arg("--blockdev").arg(format!(
                    "driver=blkdebug,node-name=dbg,config={},image=file0",
                    conf.display()
                ));
                "dbg"
            }
            Fault::Slow { iops } => {
                cmd.arg("--object")
                    .arg(format!("throttle-group,id=tg,x-iops-total={iops}"));
                cmd.arg("--blockdev")
                    .arg("driver=throttle,node-name=slow,throttle-group=tg,file=file0");
                "slow"
            }
        };
        cmd.arg("--blockdev")
            .arg(format!("driver=raw,node-name=raw0,file={top}"))
            .arg("--export")
            .arg(format!(
                "type=fuse,id=e0,node-name=raw0,mountpoint={},writable=on",
                path.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        super::vm::die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("qemu-storage-daemon starts");
        let e = Export {
            path,
            child,
            _dir: dir,
        };
        let t = Instant::now();
        while !mounted(&e.path) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "qemu-storage-daemon never mounted its FUSE export"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        e
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        // SAFETY: SIGTERM to our own child: it unmounts and exits.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
