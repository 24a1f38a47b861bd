//! Disk image locks that QEMU, qemu-io, qemu-storage-daemon and other vmm processes honour.
//!
//! QEMU's file-posix locking (the facts: open file description byte-range locks, F_OFD_SETLK,
//! on bytes 100 + bit for each permission a user holds and 200 + bit for each permission it
//! does not let others hold; a user that wants a permission checks that nobody holds the
//! "not shared" byte for it, and one that refuses to share a permission checks that nobody
//! holds its "held" byte). Permission bits: 0 consistent read, 1 write, 2 write unchanged,
//! 3 resize. A write lock test on a byte another open file description holds read-locked
//! fails: that is how a conflict is seen. Cloud Hypervisor's whole-file OFD write lock
//! conflicts with any of these bytes too.
//!
//! vmm holds consistent read (and write when the disk is writable), shares consistent read
//! and write-unchanged, and refuses to share write and resize: two writers, or a writer and a
//! reader that wants consistent reads, exclude each other; read-only users share.

use std::fs::File;
use std::os::fd::AsRawFd;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const CONSISTENT_READ: u32 = 0;
const WRITE: u32 = 1;
const WRITE_UNCHANGED: u32 = 2;
const RESIZE: u32 = 3;
const BITS: u32 = 4;

/// Why an image could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another process holds it with {0} (QEMU says: Failed to get \"{0}\" lock)")]
    Held(&'static str),
    #[error("cannot lock it: {0}")]
    Os(std::io::Error),
}

fn perm_name(bit: u32) -> &'static str {
    match bit {
        CONSISTENT_READ => "consistent read",
        WRITE => "write",
        WRITE_UNCHANGED => "write unchanged",
        RESIZE => "resize",
        _ => "an unknown permission",
    }
}

fn flock(kind: i32, at: i64) -> libc::flock {
    libc::flock {
        l_type: kind as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: at,
        l_len: 1,
        l_pid: 0,
    }
}

fn set(file: &File, kind: i32, at: i64) -> std::io::Result<()> {
    let mut fl = flock(kind, at);
    // SAFETY: F_OFD_SETLK reads one flock from a struct we own; the fd is the file's.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds a lock on byte `at`.
fn held_by_other(file: &File, at: i64) -> std::io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, at);
    // SAFETY: F_OFD_GETLK reads and writes one flock in a struct we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as i16)
}

/// Locks `file` for a disk the guest may write (`write`) or only read. The locks last as
/// long as the open file description (every duplicate of the fd closed).
pub fn lock(file: &File, write: bool) -> Result<(), LockError> {
    let held: &[u32] = if write {
        &[CONSISTENT_READ, WRITE]
    } else {
        &[CONSISTENT_READ]
    };
    let shared = [CONSISTENT_READ, WRITE_UNCHANGED];
    let unshared: Vec<u32> = (0..BITS).filter(|b| !shared.contains(b)).collect();
    // Take ours (read locks on single bytes: compatible with other readers of them)...
    let busy = |e: std::io::Error, bit| {
        if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
            LockError::Held(perm_name(bit))
        } else {
            LockError::Os(e)
        }
    };
    for &b in held {
        set(file, libc::F_RDLCK, PERM_BASE + i64::from(b)).map_err(|e| busy(e, b))?;
    }
    for &b in &unshared {
        set(file, libc::F_RDLCK, SHARED_BASE + i64::from(b)).map_err(|e| busy(e, b))?;
    }
    // ...then see whether anyone else's conflict with them.
    let conflict = (|| {
        for &b in held {
            if held_by_other(file, SHARED_BASE + i64::from(b)).map_err(LockError::Os)? {
                return Err(LockError::Held(perm_name(b)));
            }
        }
        for &b in &unshared {
            if held_by_other(file, PERM_BASE + i64::from(b)).map_err(LockError::Os)? {
                return Err(LockError::Held(perm_name(b)));
            }
        }
        Ok(())
    })();
    if conflict.is_err() {
        unlock(file);
    }
    conflict
}

/// Drops every lock vmm took on `file`.
pub fn unlock(file: &File) {
    let mut fl = libc::flock {
        l_type: libc::F_UNLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: PERM_BASE,
        l_len: SHARED_BASE + i64::from(BITS) - PERM_BASE,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK with F_UNLCK on a struct we own.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk.img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        (d, p)
    }
    fn open(p: &std::path::Path, write: bool) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(p)
            .unwrap()
    }

    #[test]
    fn two_writers_exclude_each_other_readers_share() {
        let (_d, p) = image();
        let a = open(&p, true);
        lock(&a, true).unwrap();
        let b = open(&p, true);
        let e = lock(&b, true).unwrap_err();
        assert!(
            e.to_string().contains("\"write\" lock") || e.to_string().contains("consistent read"),
            "{e}"
        );
        // A reader that wants consistent reads cannot have them while someone writes.
        let r = open(&p, false);
        assert!(lock(&r, false).is_err());
        drop(a);
        // The writer gone: two readers share, a writer is refused.
        let r1 = open(&p, false);
        lock(&r1, false).unwrap();
        let r2 = open(&p, false);
        lock(&r2, false).unwrap();
        let w = open(&p, true);
        let e = lock(&w, true).unwrap_err();
        assert!(e.to_string().contains("write"), "{e}");
        drop((r1, r2));
        lock(&w, true).unwrap();
    }

    #[test]
    fn a_failed_lock_leaves_nothing_behind() {
        let (_d, p) = image();
        let a = open(&p, true);
        lock(&a, true).unwrap();
        let b = open(&p, true);
        assert!(lock(&b, true).is_err());
        drop(a);
        // b's partial locks were dropped: a new writer gets in.
        let c = open(&p, true);
        lock(&c, true).unwrap();
    }
}
