//! Debounced watching of one machine file.
//!
//! A user edits the machine file (TOML) while the VM runs; [`Watcher`]
//! reports every settled content change as a [`WatchEvent`]. Editors save in
//! different ways and all of them work:
//!
//! * in place (truncate + write + close),
//! * write a temporary file and rename it over the target (vim, VS Code,
//!   `sed -i`),
//! * delete and recreate,
//! * rename the original to a backup name and write a new file.
//!
//! # Mechanism
//!
//! The watcher uses Linux inotify on the file's *parent directory* (so the
//! file may be replaced, deleted or not exist yet) and filters events by the
//! file's name. `IN_CLOSE_WRITE`, `IN_MOVED_TO`, `IN_MOVED_FROM`, `IN_DELETE`
//! and `IN_ATTRIB` schedule a read, as do `IN_Q_OVERFLOW` and events on the
//! directory itself. The read happens once `quiet` has passed without a
//! further relevant event (trailing debounce), but no later than
//! [`MAX_DELAY`] after the first event of the burst. The bytes read are then
//! compared with the content last reported (or the initial content): a
//! difference is reported as [`WatchEvent::Changed`], the same content as
//! [`WatchEvent::Unchanged`] (never for the initial read).
//!
//! # Half-written files
//!
//! `IN_CREATE`, `IN_OPEN` and `IN_MODIFY` never schedule a read. Instead:
//!
//! * The file is *busy* while another process has opened it (`IN_OPEN` not
//!   yet followed by a close) or is writing it (`IN_CREATE`/`IN_MODIFY` not
//!   yet followed by `IN_CLOSE_WRITE`). A due read waits while the file is
//!   busy, so a writer that paused between truncating and writing is not
//!   caught half-way. So that a process keeping the file open cannot stall
//!   the watcher, the wait ends `WRITE_HOLD` (1 s) after the last such activity.
//! * A read is discarded (and retried after the next quiet period) if any
//!   event other than the watcher's own open/close arrived for the file while
//!   it was read. The kernel queues `IN_OPEN` before an `O_TRUNC` open
//!   truncates, so a save that starts during the read is always noticed.
//! * To make that check exact, the watcher keeps the file open between reads
//!   and rereads it with `pread`: its own reads then queue no `IN_OPEN` that
//!   a writer's `IN_OPEN` could be merged with (inotify merges identical
//!   consecutive events). It reopens the file only when another inode took
//!   the name, after `IN_ATTRIB` (so that permission changes take effect) and
//!   after lost events. The descriptor is closed when the file disappears and
//!   when the watcher is dropped.
//!
//! Remaining gap: a read right after a reopen can still race with an
//! in-place save that starts at that very moment when the saving process is
//! preempted inside its truncation; the save's later events then cause a
//! reread that reports the complete content.
//!
//! # Other behaviour
//!
//! If the directory itself is deleted or moved, the watcher keeps trying to
//! watch the directory at the original path again (every
//! `REWATCH_INTERVAL`, 250 ms) and rereads the file once that succeeds.
//!
//! If the path's last component is a symlink, only changes of the link itself
//! (in the watched directory) are seen, not edits of the file it points to.

use std::ffi::CString;
use std::fmt::{self, Write as _};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod inotify;
mod state;
#[cfg(test)]
mod tests;

use inotify::*;
use state::*;

/// What the watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The file has new content (bytes differ from the last content reported
    /// or the initial content).
    Changed(Vec<u8>),
    /// The file was read again (after a save, a rename onto it or an attribute change) and
    /// holds the content last reported: a save that changed nothing. The reconciler retries
    /// what did not converge (a device whose back end was missing) on it.
    Unchanged,
    /// The file is gone (deleted or renamed away); reported once until it
    /// comes back.
    Deleted,
    /// The file exists but cannot be read (message includes the OS error,
    /// e.g. "permission denied"); reported once per distinct message until
    /// it becomes readable.
    Unreadable(String),
}

/// Quiet time after the last relevant event before the file is read
/// (trailing debounce).
pub const QUIET: Duration = Duration::from_millis(3);

/// A burst of events never delays a read by more than this from its first
/// event.
///
/// (Independently of the debounce, a read waits while another process has
/// the file open or is writing it; see the module documentation.)
pub const MAX_DELAY: Duration = Duration::from_millis(100);

/// A due read waits while the file is busy (open by another process or being
/// written), but no longer than this after the last open, create or modify
/// activity. Then the file is read anyway.
const WRITE_HOLD: Duration = Duration::from_secs(1);

/// How often the watcher retries to watch the directory after it was deleted
/// or moved away.
const REWATCH_INTERVAL: Duration = Duration::from_millis(250);

/// At most this much of a file is read (one byte more, so the check can say it
/// is too large: see [`crate::spec::MAX_FILE_SIZE`]).
const MAX_FILE_SIZE: u64 = crate::spec::MAX_FILE_SIZE as u64;

/// At most this many `read`s of the inotify fd in one go, so that a flood of
/// events cannot keep the thread from noticing a stop request.
const MAX_READS_PER_DRAIN: usize = 64;

/// The same bound when checking whether the file changed during a read; if
/// the queue is not empty by then, the read is retried.
const MAX_READS_PER_CHECK: usize = 1024;

/// Watches one file and reports debounced content changes on its own thread.
///
/// Dropping the `Watcher` stops and joins the thread (promptly: the thread
/// is woken through an eventfd) and closes all its file descriptors. The
/// callback is dropped before `drop` returns.
pub struct Watcher {
    path: PathBuf,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Watcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watcher")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Watcher {
    /// Starts watching `path`; `initial` is the content already applied (no
    /// event for it).
    ///
    /// `on_event` runs on the watcher's thread. `quiet` is the debounce time
    /// (normally [`QUIET`]).
    ///
    /// The path is made absolute against the current directory. Its parent
    /// directory must exist; the file itself need not (its later creation is
    /// reported as [`WatchEvent::Changed`] unless the content equals
    /// `initial`). Right after start the watcher reads the file once, so a
    /// change made between the caller's read of `initial` and the start of
    /// the watch is reported too (a missing file is not reported then).
    ///
    /// While the file exists, the watcher keeps one read-only descriptor of
    /// it open.
    ///
    /// # Errors
    ///
    /// Fails if the path has no file name (e.g. `/`, `..`), contains a NUL
    /// byte, its parent is not an existing directory, or inotify, the eventfd
    /// or the thread cannot be created.
    pub fn spawn(
        path: &Path,
        initial: Vec<u8>,
        quiet: Duration,
        on_event: impl FnMut(WatchEvent) + Send + 'static,
    ) -> io::Result<Watcher> {
        let (path, dir, name, dir_c) = split_path(path)?;
        // SAFETY: plain syscall without pointer arguments.
        let inotify = owned(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })?;
        let wd = add_watch(&inotify, &dir_c).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot watch {}: {e}", dir.display()))
        })?;
        // SAFETY: plain syscall without pointer arguments.
        let wake = Arc::new(owned(unsafe {
            libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        })?);

        log::debug!(
            "watch {}: watching directory {} (wd {wd})",
            path.display(),
            dir.display()
        );
        let now = Instant::now();
        let mut state = State {
            path: path.clone(),
            dir_c,
            name: name.into_vec(),
            inotify,
            wd: Some(wd),
            rewatch_at: None,
            quiet,
            applied: initial,
            status: Status::Present,
            // The start-up read, see above.
            pending: Some(Burst {
                first: now,
                last: now,
            }),
            held: None,
            reopen: false,
            own_opens: 0,
            own_closes: 0,
            opened_at: None,
            written_at: None,
            seq: 0,
            startup: true,
            on_event,
        };
        let mut buf = Box::new(EventBuf([0; EVENT_BUF_LEN]));
        state.prime(&mut buf);
        let thread_wake = Arc::clone(&wake);
        let thread = crate::sandbox::spawn(
            &crate::sandbox::WATCHER,
            false,
            "machine-watch".to_owned(),
            move || state.run(&thread_wake, &mut buf),
        )?;
        Ok(Watcher {
            path,
            wake,
            thread: Some(thread),
        })
    }
}

/// The absolute path, its directory, its file name, and the directory as a C string.
fn split_path(path: &Path) -> io::Result<(PathBuf, PathBuf, std::ffi::OsString, CString)> {
    let path = std::path::absolute(path)?;
    let invalid = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: {what}", path.display()),
        )
    };
    let name = path
        .file_name()
        .ok_or_else(|| invalid("path has no file name"))?
        .to_owned();
    let dir = path
        .parent()
        .ok_or_else(|| invalid("path has no parent directory"))?
        .to_path_buf();
    let dir_c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| invalid("path contains a NUL byte"))?;
    Ok((path, dir, name, dir_c))
}

/// Owns the descriptor a creating syscall returned, or its error.
fn owned(fd: i32) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let one: u64 = 1;
        loop {
            // SAFETY: writes 8 bytes from a live u64 to an fd we own.
            let n = unsafe {
                libc::write(
                    self.wake.as_raw_fd(),
                    (&raw const one).cast::<libc::c_void>(),
                    std::mem::size_of::<u64>(),
                )
            };
            // EAGAIN would mean the counter is saturated: already woken.
            if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break;
            }
        }
        let Some(thread) = self.thread.take() else {
            return;
        };
        if thread.thread().id() == std::thread::current().id() {
            // Dropped from inside the callback: the thread stops by itself
            // once the callback returns; it cannot join itself.
            return;
        }
        if thread.join().is_err() {
            log::error!(
                "watch {}: watcher thread panicked (in the event callback?)",
                self.path.display()
            );
        }
    }
}
