//! virtio-blk driven by a freestanding guest driver (tests/guest/tiny/blk.c): durability under
//! SIGKILL, hostile requests, read-back, and a full host disk. Each boot takes milliseconds.

mod common;

use std::time::{Duration, Instant};

use common::vm::{Machine, Vm, kvm_or_skip, tiny};

fn machine(image: &std::path::Path, cmdline: &str) -> Machine {
    let body = format!(
        "name = \"blk\"\nmemory = \"32M\"\nvcpus = 1\ncmdline = \"{cmdline}\"\n[[serial]]\nname = \"com1\"\nio = \"stdio\"\n[[block]]\nname = \"disk0\"\npath = {:?}\n",
        image.display().to_string()
    );
    Machine::new(&tiny("blk"), &body)
}

/// A tmpfs of `size` mounted for one test (needs root); unmounted on drop.
struct Tmpfs {
    _dir: tempfile::TempDir,
    mnt: std::path::PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("fs");
        std::fs::create_dir(&mnt).unwrap();
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mnt)
            .status()
            .is_ok_and(|s| s.success())
            .then_some(Tmpfs { _dir: dir, mnt })
    }

    fn path(&self) -> &std::path::Path {
        &self.mnt
    }

    fn remount_read_only(&self) -> bool {
        std::process::Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).status();
    }
}

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

/// xorshift, so kill points differ between runs but a failure can be replayed (seed printed).
fn rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn acknowledged_records_survive_sigkill() {
    if !kvm_or_skip("acknowledged_records_survive_sigkill") {
        return;
    }
    let rounds: usize = std::env::var("VMM_DURABILITY_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    let mut seed = std::env::var("VMM_DURABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("durability: {rounds} rounds, VMM_DURABILITY_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let records = 400u64;
    let mut next = 0u64;
    let mut killed_mid_run = 0;
    for round in 0..rounds {
        let kill_after = rand(&mut seed) % records;
        let m = machine(
            &image,
            &format!("mode=durable records={records} start={next}"),
        );
        let mut vm = Vm::start(&m.file, Duration::from_secs(60), &[]);
        vm.expect("BLK capacity=");
        let mut last_ack = None;
        let mut acks = 0;
        while acks <= kill_after {
            let l = vm.expect("");
            if let Some(i) = l.strip_prefix("ACK ") {
                last_ack = Some(i.trim().parse::<u64>().unwrap());
                acks += 1;
            } else if l.starts_with("DONE") || l.starts_with("ERR") {
                break;
            }
        }
        // SAFETY: killing our own child.
        unsafe { libc::kill(vm.pid(), libc::SIGKILL) };
        let _ = vm.finish();
        if last_ack.is_some_and(|a| a + 1 < next + records) {
            killed_mid_run += 1;
        }
        let disk = std::fs::read(&image).unwrap();
        if let Some(last) = last_ack {
            for i in 0..=last {
                let at = (i * 512) as usize;
                assert_eq!(
                    disk[at..at + 512],
                    record(i)[..],
                    "round {round}: acknowledged record {i} lost (seed {seed})"
                );
            }
            next = last + 1;
        }
        if next + records > 8192 {
            next = 0;
        }
    }
    assert!(
        killed_mid_run > 0,
        "every run finished before its kill: the test proved nothing"
    );
}

#[test]
fn hostile_requests_do_not_break_the_device() {
    if !kvm_or_skip("hostile_requests_do_not_break_the_device") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let m = machine(&image, "mode=hostile");
    let t = Instant::now();
    let (code, out, err) = Vm::start(&m.file, Duration::from_secs(60), &[]).finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("CASE avail-jump"), "{out}");
    assert!(out.contains("SURVIVED"), "{out}\n{err}");
    // Every malformed request got an error status or was returned without one.
    for l in out.lines().filter(|l| l.starts_with("CASE ")) {
        assert!(!l.contains("TIMEOUT"), "{l}");
    }
    assert!(
        err.contains("needs a reset"),
        "the broken ring asks for a reset: {err}"
    );
    eprintln!("hostile run: {:?}", t.elapsed());
}

#[test]
fn records_read_back_through_the_device() {
    if !kvm_or_skip("records_read_back_through_the_device") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let mut data = Vec::new();
    for i in 0..64 {
        data.extend(record(i));
    }
    data[10 * 512 + 100] ^= 0xff; // one damaged record
    data.resize(1 << 20, 0);
    std::fs::write(&image, &data).unwrap();
    let (code, out, err) = Vm::start(
        &machine(&image, "mode=verify records=64 start=0").file,
        Duration::from_secs(60),
        &[],
    )
    .finish();
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("BAD 10") && out.contains("OK 63"), "{out}");
}

/// A full host file system: the guest gets an I/O error status, vmm keeps running, and what was
/// acknowledged before is on disk.
#[test]
fn a_full_host_disk_is_an_io_error_not_a_crash() {
    if !kvm_or_skip("a_full_host_disk_is_an_io_error_not_a_crash") {
        return;
    }
    let Some(fs) = Tmpfs::mount("64k") else {
        common::skip(
            "a_full_host_disk_is_an_io_error_not_a_crash",
            "cannot mount a small tmpfs (needs root)",
        );
        return;
    };
    let mnt = fs.path();
    // A sparse 4 MiB image on a 64 KiB file system: writing 400 records (200 KiB) runs out.
    let image = mnt.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let (code, out, err) = Vm::start(
        &machine(&image, "mode=durable records=400 start=0").file,
        Duration::from_secs(60),
        &[],
    )
    .finish();
    assert_eq!(
        code,
        Some(0),
        "vmm survived and the guest powered off: {err}"
    );
    let errl = out
        .lines()
        .find(|l| l.starts_with("ERR "))
        .unwrap_or_else(|| panic!("no I/O error reported: {out}"));
    assert!(errl.ends_with("status=1"), "{errl}");
    let last_ack: u64 = out
        .lines()
        .filter_map(|l| l.strip_prefix("ACK "))
        .next_back()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let disk = std::fs::read(&image).unwrap();
    for i in 0..=last_ack {
        assert_eq!(
            disk[(i * 512) as usize..(i * 512 + 512) as usize],
            record(i)[..],
            "record {i}"
        );
    }
}

/// A disk image that is not there stops `vmm up` before any VM exists: exit 2, the resolved
/// path in the message.
#[test]
fn a_missing_image_is_exit_2_before_the_vm_starts() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("gone.img");
    let (code, out, err) = Vm::start(
        &machine(&image, "mode=verify records=1 start=0").file,
        Duration::from_secs(30),
        &[],
    )
    .finish();
    assert_eq!(code, Some(2), "{out}\n{err}");
    assert!(
        err.contains(&format!("{} does not exist", image.display())),
        "{err}"
    );
    assert!(out.is_empty(), "the guest ran: {out}");
}

/// An image on a read-only file system: refused (exit 2, with the fix in the message) unless the
/// machine file says `readonly = true`, in which case the guest reads it.
#[test]
fn an_image_on_a_read_only_file_system_needs_readonly() {
    let test = "an_image_on_a_read_only_file_system_needs_readonly";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(fs) = Tmpfs::mount("2m") else {
        common::skip(test, "cannot mount a tmpfs (needs root)");
        return;
    };
    let mnt = fs.path();
    let image = mnt.join("disk.img");
    let mut data: Vec<u8> = (0..8).flat_map(record).collect();
    data.resize(1 << 20, 0);
    std::fs::write(&image, &data).unwrap();
    assert!(fs.remount_read_only(), "remounting read-only");

    let rw = machine(&image, "mode=verify records=8 start=0");
    let (code, out, err) = Vm::start(&rw.file, Duration::from_secs(30), &[]).finish();
    assert_eq!(code, Some(2), "{out}\n{err}");
    assert!(err.contains("is not writable"), "{err}");
    assert!(err.contains("readonly = true"), "the fix is named: {err}");

    let text = std::fs::read_to_string(&rw.file).unwrap() + "readonly = true\n";
    std::fs::write(&rw.file, text).unwrap();
    let (code, out, err) = Vm::start(&rw.file, Duration::from_secs(30), &[]).finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("OK 8"), "the guest read every record: {out}");
}

/// A loop device backed by a file, detached on drop.
struct Loop {
    dev: String,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn new(data: &[u8]) -> Option<Loop> {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("backing.img");
        std::fs::write(&img, data).unwrap();
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&img)
            .output()
            .ok()?;
        out.status.success().then(|| Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            _dir: dir,
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}

/// A block device is a disk with its real size (BLKGETSIZE64; its inode says 0), the guest
/// reads what is on it; a mounted one is refused by `vmm check` and `vmm up` alike.
#[test]
fn a_block_device_is_a_disk_and_a_mounted_one_is_refused() {
    if !kvm_or_skip("a_block_device_is_a_disk_and_a_mounted_one_is_refused") {
        return;
    }
    let mut data = Vec::new();
    for i in 0..16 {
        data.extend(record(i));
    }
    data.resize(3 << 20, 0);
    let Some(lo) = Loop::new(&data) else {
        common::skip(
            "a_block_device_is_a_disk_and_a_mounted_one_is_refused",
            "no loop device (losetup needs root and the loop driver)",
        );
        return;
    };
    let dev = std::path::Path::new(&lo.dev);
    let m = machine(dev, "mode=verify records=16 start=0");
    let (code, out, err) = Vm::start(&m.file, Duration::from_secs(60), &[]).finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("BLK capacity=6144"), "{out}");
    assert!(out.contains("OK 16"), "{out}");

    // Mounted: refused, with the reason.
    let mkfs = std::process::Command::new("mkfs.ext2")
        .args(["-q", &lo.dev])
        .status();
    if !mkfs.is_ok_and(|s| s.success()) {
        common::skip(
            "a_block_device_is_a_disk_and_a_mounted_one_is_refused",
            "mkfs.ext2 is missing (e2fsprogs)",
        );
        return;
    }
    let mnt = tempfile::tempdir().unwrap();
    assert!(
        std::process::Command::new("mount")
            .arg(&lo.dev)
            .arg(mnt.path())
            .status()
            .unwrap()
            .success()
    );
    let check = common::run(&["check", m.file.to_str().unwrap()]);
    let up = Vm::start(&m.file, Duration::from_secs(60), &[]).finish();
    let _ = std::process::Command::new("umount")
        .arg(mnt.path())
        .status();
    let msg = common::text(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "{msg}");
    assert!(msg.contains("is a block device in use"), "{msg}");
    assert_eq!(up.0, Some(2), "{}", up.2);
    assert!(up.2.contains("is a block device in use"), "{}", up.2);
}
