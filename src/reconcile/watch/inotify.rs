//! The inotify side of the watcher: the watch mask, parsing the event buffer, waiting, and
//! opening and reading the file without blocking. Hand-written rather than on the `notify`
//! crate (docs/architecture.md says why).

use super::*;

/// Size of the inotify read buffer; must hold at least one event with the
/// longest possible name (`16 + NAME_MAX + 1` bytes).
pub(super) const EVENT_BUF_LEN: usize = 16 * 1024;

/// Events on the file (by name) that schedule a read.
pub(super) const READ_EVENTS: u32 = libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_DELETE
    | libc::IN_ATTRIB;

/// Events on the file (by name) after which another inode (or none) has the
/// name: "busy" state restarts.
pub(super) const REPLACED_EVENTS: u32 = libc::IN_MOVED_TO | libc::IN_MOVED_FROM | libc::IN_DELETE;

/// Events on the directory itself (no name) that schedule a read.
pub(super) const DIR_EVENTS: u32 =
    libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_ATTRIB | libc::IN_UNMOUNT;

/// The inotify mask of the directory watch.
pub(super) const WATCH_MASK: u32 = libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_MODIFY
    | libc::IN_OPEN
    | libc::IN_CLOSE_NOWRITE
    // No events for files that were unlinked but are still open (by us or
    // others): they are not the file at the path.
    | libc::IN_EXCL_UNLINK
    | libc::IN_ONLYDIR;

/// One inotify record, as parsed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RawEvent<'a> {
    pub(super) wd: i32,
    pub(super) mask: u32,
    pub(super) name: &'a [u8],
}

/// Read buffer with the alignment of `struct inotify_event`.
#[repr(C, align(8))]
pub(super) struct EventBuf(pub(super) [u8; EVENT_BUF_LEN]);

/// Opens `path` for reading without blocking (should it be a FIFO) and
/// without acquiring a controlling terminal.
pub(super) fn open_file(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

/// Reads `file` from offset 0 to its end with `pread`, at most one byte more
/// than [`MAX_FILE_SIZE`].
pub(super) fn read_all(file: &File) -> io::Result<Vec<u8>> {
    let cap = MAX_FILE_SIZE as usize + 1;
    let hint = file.metadata().map_or(0, |m| m.len()).min(MAX_FILE_SIZE);
    let mut bytes = vec![0; usize::try_from(hint).unwrap_or(0) + 1];
    let mut len = 0;
    while len < cap {
        if len == bytes.len() {
            bytes.resize((len * 2).clamp(4096, cap), 0);
        }
        match file.read_at(&mut bytes[len..], len as u64) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    bytes.truncate(len);
    Ok(bytes)
}

pub(super) fn add_watch(inotify: &OwnedFd, dir: &CString) -> io::Result<i32> {
    // SAFETY: `dir` is a valid NUL-terminated string for the whole call.
    let wd = unsafe { libc::inotify_add_watch(inotify.as_raw_fd(), dir.as_ptr(), WATCH_MASK) };
    if wd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(wd)
    }
}

/// Waits until the inotify fd is readable, the stop fd is signalled or
/// `deadline` passes. Returns `(stop, inotify_readable)`; EINTR returns
/// `(false, false)` so the caller re-evaluates its timers.
pub(super) fn wait(
    inotify: &OwnedFd,
    wake: &OwnedFd,
    deadline: Option<Instant>,
) -> io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: inotify.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let timeout = deadline.map(|d| {
        let left = d.saturating_duration_since(Instant::now());
        libc::timespec {
            tv_sec: libc::time_t::try_from(left.as_secs()).unwrap_or(libc::time_t::MAX),
            // Below 10^9: fits any `c_long`.
            tv_nsec: left.subsec_nanos() as libc::c_long,
        }
    });
    let timeout_ptr = timeout
        .as_ref()
        .map_or(std::ptr::null(), std::ptr::from_ref);
    // SAFETY: `fds` and `timeout` outlive the call; the sigmask is null.
    let n = unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            timeout_ptr,
            std::ptr::null(),
        )
    };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok((false, false));
        }
        return Err(io::Error::new(err.kind(), format!("ppoll: {err}")));
    }
    let bad = libc::POLLERR | libc::POLLNVAL;
    if fds[0].revents & bad != 0 {
        return Err(io::Error::other("inotify fd reported an error"));
    }
    Ok((fds[1].revents != 0, fds[0].revents & libc::POLLIN != 0))
}

/// Parses a buffer of variable-length inotify records (header of four
/// native-endian 32-bit fields `wd, mask, cookie, len`, then `len` bytes of
/// NUL-padded name). Stops at a truncated record instead of panicking.
pub(super) fn parse_events<'a>(mut buf: &'a [u8], mut f: impl FnMut(RawEvent<'a>)) {
    const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
    let field = |b: &[u8], i: usize| -> [u8; 4] { [b[i], b[i + 1], b[i + 2], b[i + 3]] };
    while buf.len() >= HEADER {
        let wd = i32::from_ne_bytes(field(buf, 0));
        let mask = u32::from_ne_bytes(field(buf, 4));
        let len = u32::from_ne_bytes(field(buf, 12));
        let Some(end) = usize::try_from(len)
            .ok()
            .and_then(|l| l.checked_add(HEADER))
        else {
            break;
        };
        let Some(record) = buf.get(..end) else {
            log::warn!("truncated inotify record (name length {len})");
            break;
        };
        let name = &record[HEADER..];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        f(RawEvent { wd, mask, name });
        buf = &buf[end..];
    }
}

/// Human-readable names of the bits in an inotify mask, for logging.
pub(super) fn mask_names(mask: u32) -> String {
    const NAMES: [(u32, &str); 15] = [
        (libc::IN_MODIFY, "MODIFY"),
        (libc::IN_ATTRIB, "ATTRIB"),
        (libc::IN_CLOSE_WRITE, "CLOSE_WRITE"),
        (libc::IN_MOVED_FROM, "MOVED_FROM"),
        (libc::IN_MOVED_TO, "MOVED_TO"),
        (libc::IN_CREATE, "CREATE"),
        (libc::IN_DELETE, "DELETE"),
        (libc::IN_DELETE_SELF, "DELETE_SELF"),
        (libc::IN_MOVE_SELF, "MOVE_SELF"),
        (libc::IN_UNMOUNT, "UNMOUNT"),
        (libc::IN_Q_OVERFLOW, "Q_OVERFLOW"),
        (libc::IN_IGNORED, "IGNORED"),
        (libc::IN_ISDIR, "ISDIR"),
        (libc::IN_OPEN, "OPEN"),
        (libc::IN_CLOSE_NOWRITE, "CLOSE_NOWRITE"),
    ];
    let mut out = String::new();
    let mut rest = mask;
    for (bit, name) in NAMES {
        if mask & bit != 0 {
            if !out.is_empty() {
                out.push('|');
            }
            out.push_str(name);
            rest &= !bit;
        }
    }
    if rest != 0 || out.is_empty() {
        if !out.is_empty() {
            out.push('|');
        }
        let _ = write!(out, "{rest:#x}");
    }
    out
}
