//! Opening the host files a machine file names, without trusting what is at the path.
//!
//! A machine file is input like any other: its `kernel` may name a FIFO (a blocking open would
//! hang `vmm check` forever), `/dev/zero` (endless), or `/dev/watchdog` (opening it as root arms
//! the watchdog). So every path is opened with `O_NONBLOCK | O_NOCTTY | O_CLOEXEC` (an open
//! with no side effect and no wait), the open file is checked with `fstat`, and only what the
//! key means is accepted: regular files for kernels and initrds; regular files or block devices
//! for disks (a block device opened `O_EXCL`, which the kernel refuses while it is mounted or
//! another program holds it exclusively, and sized with BLKGETSIZE64). Output files are
//! created `0600` with `O_NOFOLLOW` and must be regular files too. The checks act on the file
//! that was opened, so a path swapped between `vmm check` and `vmm up` is caught at `up`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// What a path is for, and so what may be there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Read whole (kernel, initrd): a regular file.
    Read,
    /// A disk image: a regular file or a block device, read-write unless `write` is false.
    Disk { write: bool },
}

/// An opened input.
#[derive(Debug)]
pub struct Opened {
    pub file: File,
    /// Bytes (a block device's size from BLKGETSIZE64).
    pub len: u64,
    pub block_device: bool,
}

/// Why a path cannot be used; the message names the path's kind and what is wanted.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("does not exist")]
    Missing,
    #[error("is a directory, not a file")]
    Directory,
    #[error("is {0}, not a regular file{1}")]
    WrongKind(&'static str, &'static str),
    #[error("is a block device in use (mounted, or held by another program)")]
    BusyDevice,
    #[error("is not writable: {0}")]
    NotWritable(std::io::Error),
    #[error("cannot be opened: {0}")]
    Io(std::io::Error),
}

/// A file type in words ("a FIFO").
fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

const NONBLOCK: i32 = libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;

/// Opens `path` for `how` (see the module documentation).
pub fn open_input(path: &Path, how: Use) -> Result<Opened, OpenError> {
    let write = matches!(how, Use::Disk { write: true });
    // Look before opening: a character device such as /dev/watchdog acts on open(2) itself,
    // so only regular files and block devices (for disks) are ever opened. An O_PATH handle
    // opens nothing; the file it names is checked and then opened through /proc/self/fd, so
    // the path cannot be swapped between the look and the open.
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => OpenError::Missing,
            _ => OpenError::Io(e),
        })?;
    let meta = handle.metadata().map_err(OpenError::Io)?;
    check_kind(meta.file_type(), how)?;
    let block = meta.file_type().is_block_device();
    let mut flags = NONBLOCK;
    if block {
        // Exclusive: refused while mounted or held by another exclusive opener.
        flags |= libc::O_EXCL;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags)
        .open(format!("/proc/self/fd/{}", handle.as_raw_fd()))
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) if block => OpenError::BusyDevice,
            Some(libc::EACCES | libc::EROFS | libc::EPERM) if write => OpenError::NotWritable(e),
            _ => OpenError::Io(e),
        })?;
    let meta = file.metadata().map_err(OpenError::Io)?;
    check_kind(meta.file_type(), how)?;
    let len = if meta.file_type().is_block_device() {
        block_size(&file).map_err(OpenError::Io)?
    } else {
        meta.len()
    };
    // Reads of the opened file block as usual (O_NONBLOCK has no effect on regular files and
    // block devices, but clear it anyway so nothing depends on that).
    // SAFETY: fcntl on a file we own.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) };
    Ok(Opened {
        file,
        len,
        block_device: meta.file_type().is_block_device(),
    })
}

fn check_kind(ft: std::fs::FileType, how: Use) -> Result<(), OpenError> {
    if ft.is_file() || (ft.is_block_device() && matches!(how, Use::Disk { .. })) {
        Ok(())
    } else if ft.is_dir() {
        Err(OpenError::Directory)
    } else {
        let also = match how {
            Use::Read => "",
            Use::Disk { .. } => " or a block device",
        };
        Err(OpenError::WrongKind(kind_of(ft), also))
    }
}

/// A block device's size in bytes.
fn block_size(f: &File) -> std::io::Result<u64> {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into `size`, which we own.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut size) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

/// Why an output path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("is {0}; an output file must be a regular file")]
    WrongKind(&'static str),
    #[error("{0}")]
    Io(std::io::Error),
}

/// What is at an output path now: fine if nothing or a regular file (not following a symbolic
/// link). Opens nothing.
pub fn check_output(path: &Path) -> Result<(), OutputError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(OutputError::Io(e)),
        Ok(m) if m.file_type().is_file() => Ok(()),
        Ok(m) => Err(OutputError::WrongKind(kind_of(m.file_type()))),
    }
}

/// Opens an output file for appending: created `0600` if missing (a guest's console log is
/// nobody else's), never through a symbolic link, only a regular file.
pub fn open_output(path: &Path) -> Result<File, OutputError> {
    check_output(path)?;
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => OutputError::WrongKind("a symbolic link"),
            _ => OutputError::Io(e),
        })?;
    let ft = file.metadata().map_err(OutputError::Io)?.file_type();
    if !ft.is_file() {
        return Err(OutputError::WrongKind(kind_of(ft)));
    }
    // SAFETY: fcntl on a file we own: keep O_APPEND, drop O_NONBLOCK.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, libc::O_APPEND) };
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_what_each_use_means_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k");
        std::fs::write(&file, b"12345").unwrap();
        let o = open_input(&file, Use::Read).unwrap();
        assert_eq!((o.len, o.block_device), (5, false));
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Returns at once (a blocking open would wait for a writer forever).
        let e = open_input(&fifo, Use::Read).unwrap_err();
        assert_eq!(e.to_string(), "is a FIFO, not a regular file");
        let e = open_input(Path::new("/dev/zero"), Use::Disk { write: false }).unwrap_err();
        assert_eq!(
            e.to_string(),
            "is a character device, not a regular file or a block device"
        );
        assert!(matches!(
            open_input(dir.path(), Use::Read),
            Err(OpenError::Directory)
        ));
        assert!(matches!(
            open_input(&dir.path().join("nope"), Use::Read),
            Err(OpenError::Missing)
        ));
    }

    #[test]
    fn output_files_are_private_regular_files_never_links() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("log");
        drop(open_output(&out).unwrap());
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&out, &link).unwrap();
        assert_eq!(
            open_output(&link).unwrap_err().to_string(),
            "is a symbolic link; an output file must be a regular file"
        );
        assert!(open_output(Path::new("/dev/null")).is_err());
        // Appends.
        use std::io::Write;
        open_output(&out).unwrap().write_all(b"a").unwrap();
        open_output(&out).unwrap().write_all(b"b").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"ab");
    }
}
