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
//! compared with the content last reported (or the initial content): only a
//! difference is reported.
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

/// What the watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The file has new content (bytes differ from the last content reported
    /// or the initial content).
    Changed(Vec<u8>),
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

/// Size of the inotify read buffer; must hold at least one event with the
/// longest possible name (`16 + NAME_MAX + 1` bytes).
const EVENT_BUF_LEN: usize = 16 * 1024;

/// Events on the file (by name) that schedule a read.
const READ_EVENTS: u32 = libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_DELETE
    | libc::IN_ATTRIB;

/// Events on the file (by name) after which another inode (or none) has the
/// name: "busy" state restarts.
const REPLACED_EVENTS: u32 = libc::IN_MOVED_TO | libc::IN_MOVED_FROM | libc::IN_DELETE;

/// Events on the directory itself (no name) that schedule a read.
const DIR_EVENTS: u32 =
    libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_ATTRIB | libc::IN_UNMOUNT;

/// The inotify mask of the directory watch.
const WATCH_MASK: u32 = libc::IN_CLOSE_WRITE
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

        // SAFETY: plain syscall without pointer arguments.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let inotify = unsafe { OwnedFd::from_raw_fd(fd) };
        let wd = add_watch(&inotify, &dir_c).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot watch {}: {e}", dir.display()))
        })?;

        // SAFETY: plain syscall without pointer arguments.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });

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
        let thread = std::thread::Builder::new()
            .name("machine-watch".to_owned())
            .spawn(move || state.run(&thread_wake, &mut buf))?;
        Ok(Watcher {
            path,
            wake,
            thread: Some(thread),
        })
    }
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

/// What was last reported (or assumed at start).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    Present,
    Deleted,
    Unreadable(String),
}

/// A burst of relevant events awaiting a read.
#[derive(Debug, Clone, Copy)]
struct Burst {
    first: Instant,
    last: Instant,
}

/// The result of reading the file.
#[derive(Debug)]
enum Outcome {
    Missing,
    Unreadable(String),
    Content(Vec<u8>),
}

/// The watcher's own descriptor of the file, with its identity.
#[derive(Debug)]
struct Held {
    file: File,
    dev: u64,
    ino: u64,
}

/// One inotify record, as parsed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RawEvent<'a> {
    wd: i32,
    mask: u32,
    name: &'a [u8],
}

/// Read buffer with the alignment of `struct inotify_event`.
#[repr(C, align(8))]
struct EventBuf([u8; EVENT_BUF_LEN]);

/// The state owned by the watcher thread.
struct State<F> {
    path: PathBuf,
    dir_c: CString,
    name: Vec<u8>,
    inotify: OwnedFd,
    /// The current directory watch; `None` while the directory is gone.
    wd: Option<i32>,
    /// When to try to watch the directory again.
    rewatch_at: Option<Instant>,
    quiet: Duration,
    /// Content last reported (or the initial content).
    applied: Vec<u8>,
    status: Status,
    pending: Option<Burst>,
    /// The file, kept open between reads.
    held: Option<Held>,
    /// Reopen the file at the next read even if it is the same inode.
    reopen: bool,
    /// `IN_OPEN` events of the watcher's own opens still to come.
    own_opens: u32,
    /// `IN_CLOSE_NOWRITE` events of the watcher's own closes still to come.
    own_closes: u32,
    /// Another process opened the file (at this time) and has not closed it
    /// since, as far as events tell.
    opened_at: Option<Instant>,
    /// Last `IN_CREATE`/`IN_MODIFY` not yet followed by `IN_CLOSE_WRITE`.
    written_at: Option<Instant>,
    /// Counts events concerning the file (except the watcher's own opens and
    /// closes), to notice changes during a read.
    seq: u64,
    /// The next read is the start-up read and nothing happened since.
    startup: bool,
    on_event: F,
}

impl<F: FnMut(WatchEvent)> State<F> {
    /// Opens the file before `spawn` returns, so that the watcher's own
    /// `IN_OPEN` is out of the way before anyone edits the file (see
    /// `read_file`). The start-up read itself happens on the thread.
    fn prime(&mut self, buf: &mut EventBuf) {
        let regular = std::fs::metadata(&self.path).is_ok_and(|m| m.is_file());
        if regular
            && let Ok(file) = open_file(&self.path)
            && let Ok(meta) = file.metadata()
            && meta.is_file()
        {
            self.own_opens += 1;
            self.held = Some(Held {
                file,
                dev: meta.dev(),
                ino: meta.ino(),
            });
        }
        // Errors show up again on the thread.
        if let Ok(true) = self.drain(buf, MAX_READS_PER_CHECK) {
            self.forget_own_events();
        }
    }

    /// Our own events are all queued before any drain that follows the
    /// open/close; once such a drain emptied the queue, any missing one was
    /// merged into an identical event and will not come.
    fn forget_own_events(&mut self) {
        self.own_opens = 0;
        self.own_closes = 0;
    }

    fn run(mut self, wake: &OwnedFd, buf: &mut EventBuf) {
        if let Err(e) = self.event_loop(wake, buf) {
            log::error!(
                "watch {}: watcher stopped: {e}; further changes are not noticed",
                self.path.display()
            );
        }
        log::debug!("watch {}: watcher thread exits", self.path.display());
    }

    fn event_loop(&mut self, wake: &OwnedFd, buf: &mut EventBuf) -> io::Result<()> {
        loop {
            let now = Instant::now();
            if self.rewatch_at.is_some_and(|at| now >= at) {
                self.rewatch(now);
            }
            let due = self.due();
            if due.is_some_and(|due| now >= due) {
                self.read_now(buf)?;
                continue;
            }
            let deadline = match (due, self.rewatch_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let (stop, readable) = wait(&self.inotify, wake, deadline)?;
            if stop {
                return Ok(());
            }
            if readable {
                self.drain(buf, MAX_READS_PER_DRAIN)?;
            }
        }
    }

    /// When the pending read is due, if there is one.
    fn due(&self) -> Option<Instant> {
        let burst = self.pending?;
        let debounced = (burst.last + self.quiet).min(burst.first + MAX_DELAY);
        Some(match self.busy_at() {
            Some(at) => debounced.max(at + WRITE_HOLD),
            None => debounced,
        })
    }

    /// The last activity that makes the file busy, if it is busy.
    fn busy_at(&self) -> Option<Instant> {
        match (self.opened_at, self.written_at) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Forgets the busy state (another inode has the name, or events were
    /// lost).
    fn reset_busy(&mut self) {
        self.opened_at = None;
        self.written_at = None;
    }

    fn schedule(&mut self, now: Instant) {
        // Something happened to the file: a missing file is news now.
        self.startup = false;
        match &mut self.pending {
            Some(burst) => burst.last = now,
            None => {
                self.pending = Some(Burst {
                    first: now,
                    last: now,
                });
            }
        }
    }

    /// Reads queued inotify events (at most `max_reads` buffers) and
    /// processes them. Returns whether the queue is empty now.
    fn drain(&mut self, buf: &mut EventBuf, max_reads: usize) -> io::Result<bool> {
        for _ in 0..max_reads {
            // SAFETY: reads at most `buf.0.len()` bytes into the buffer.
            let n = unsafe {
                libc::read(
                    self.inotify.as_raw_fd(),
                    buf.0.as_mut_ptr().cast::<libc::c_void>(),
                    buf.0.len(),
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Ok(true),
                    _ => {
                        return Err(io::Error::new(
                            err.kind(),
                            format!("reading inotify: {err}"),
                        ));
                    }
                }
            }
            let n = usize::try_from(n).unwrap_or(0).min(buf.0.len());
            if n == 0 {
                return Ok(true);
            }
            let now = Instant::now();
            parse_events(&buf.0[..n], |ev| self.handle(ev, now));
        }
        Ok(false)
    }

    fn handle(&mut self, ev: RawEvent<'_>, now: Instant) {
        let mask = ev.mask;
        if mask & libc::IN_Q_OVERFLOW != 0 {
            log::debug!(
                "watch {}: inotify queue overflowed; rereading",
                self.path.display()
            );
            self.events_lost(now);
            return;
        }
        if Some(ev.wd) != self.wd {
            log::trace!(
                "watch {}: stale event {} for wd {}",
                self.path.display(),
                mask_names(mask),
                ev.wd
            );
            return;
        }
        if mask & libc::IN_IGNORED != 0 {
            log::warn!(
                "watch {}: lost the watch on the directory; retrying",
                self.path.display()
            );
            self.watch_lost(now);
            return;
        }
        if ev.name.is_empty() {
            if mask & DIR_EVENTS == 0 {
                log::trace!(
                    "watch {}: directory event {}",
                    self.path.display(),
                    mask_names(mask)
                );
                return;
            }
            log::debug!(
                "watch {}: directory event {}",
                self.path.display(),
                mask_names(mask)
            );
            self.seq += 1;
            // E.g. a chmod of the directory: reopen to see its effect.
            self.reopen = true;
            self.schedule(now);
            if mask & libc::IN_MOVE_SELF != 0 {
                // The watch follows the moved directory; the path now means
                // something else (or nothing). Watch the path afresh.
                // SAFETY: plain syscall without pointer arguments.
                unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), ev.wd) };
                self.watch_lost(now);
            }
            return;
        }
        if ev.name != self.name.as_slice() {
            log::trace!(
                "watch {}: ignoring {} on {:?}",
                self.path.display(),
                mask_names(mask),
                String::from_utf8_lossy(ev.name)
            );
            return;
        }
        log::debug!("watch {}: {}", self.path.display(), mask_names(mask));
        let mut own = false;
        if mask & libc::IN_OPEN != 0 {
            if self.own_opens > 0 {
                self.own_opens -= 1;
                own = true;
            } else {
                self.opened_at = Some(now);
            }
        }
        if mask & libc::IN_CLOSE_NOWRITE != 0 {
            if self.own_closes > 0 {
                self.own_closes -= 1;
            } else {
                self.opened_at = None;
            }
        }
        if mask & libc::IN_CLOSE_WRITE != 0 {
            self.opened_at = None;
            self.written_at = None;
        }
        if mask & libc::IN_MODIFY != 0
            || (mask & libc::IN_CREATE != 0 && mask & libc::IN_ISDIR == 0)
        {
            self.written_at = Some(now);
        }
        if mask & REPLACED_EVENTS != 0 {
            self.reset_busy();
        }
        if mask & libc::IN_ATTRIB != 0 {
            // Permissions may have changed: let the next read open anew.
            self.reopen = true;
        }
        if !own && mask & !(libc::IN_CLOSE_NOWRITE | libc::IN_ISDIR) != 0 {
            self.seq += 1;
        }
        // A created directory will never be written and closed: read it (and
        // report it as unreadable) like a renamed-in file.
        let dir_created = mask & libc::IN_CREATE != 0 && mask & libc::IN_ISDIR != 0;
        if mask & READ_EVENTS != 0 || dir_created {
            self.schedule(now);
        }
    }

    /// Events may have been lost: forget what they told and reread.
    fn events_lost(&mut self, now: Instant) {
        self.seq += 1;
        self.reset_busy();
        self.reopen = true;
        // Our own events may have been lost too.
        self.own_opens = 0;
        self.own_closes = 0;
        self.schedule(now);
    }

    fn watch_lost(&mut self, now: Instant) {
        self.wd = None;
        self.rewatch_at = Some(now);
        self.events_lost(now);
    }

    fn rewatch(&mut self, now: Instant) {
        match add_watch(&self.inotify, &self.dir_c) {
            Ok(wd) => {
                log::info!(
                    "watch {}: watching the directory again (wd {wd})",
                    self.path.display()
                );
                self.wd = Some(wd);
                self.rewatch_at = None;
                self.events_lost(now);
            }
            Err(e) => {
                log::debug!(
                    "watch {}: cannot watch the directory yet: {e}",
                    self.path.display()
                );
                self.rewatch_at = Some(now + REWATCH_INTERVAL);
            }
        }
    }

    /// Performs the due read and reports the outcome.
    fn read_now(&mut self, buf: &mut EventBuf) -> io::Result<()> {
        // Catch up with events queued since the last drain: they may postpone
        // the read, and afterwards any `IN_OPEN` is either ours or news.
        let emptied = self.drain(buf, MAX_READS_PER_CHECK)?;
        if !emptied || self.due().is_none_or(|due| Instant::now() < due) {
            return Ok(());
        }
        self.forget_own_events();
        if let Some(at) = self.busy_at() {
            log::debug!(
                "watch {}: file busy, but no activity for {:?}; reading anyway",
                self.path.display(),
                at.elapsed()
            );
        }
        self.pending = None;
        let seq = self.seq;
        let outcome = self.read_file();
        // Whatever happened to the file while it was read (e.g. the next
        // in-place save opening and truncating it) is queued by now.
        let emptied = self.drain(buf, MAX_READS_PER_CHECK)?;
        if emptied {
            self.forget_own_events();
        }
        if self.seq != seq || !emptied {
            log::debug!(
                "watch {}: file touched while being read; retrying",
                self.path.display()
            );
            if self.pending.is_none() {
                self.schedule(Instant::now());
            }
            return Ok(());
        }
        self.apply(outcome);
        Ok(())
    }

    /// Closes the held descriptor; `same` tells whether it is (still) the
    /// file at the path, so that its `IN_CLOSE_NOWRITE` is ours.
    fn release(&mut self, same: bool) {
        if self.held.take().is_some() && same {
            self.own_closes += 1;
        }
    }

    /// Reads the whole file, through the held descriptor if it still is the
    /// file at the path. Never opens anything but a regular file (no blocking
    /// on FIFOs or devices).
    fn read_file(&mut self) -> Outcome {
        let path = self.path.clone();
        let fail = |what: &str, e: &dyn fmt::Display| {
            Outcome::Unreadable(format!("cannot {what} {}: {e}", path.display()))
        };
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    // A path component is no longer a directory.
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                self.release(false);
                return Outcome::Missing;
            }
            Err(e) => {
                let outcome = fail("stat", &e);
                self.release(false);
                return outcome;
            }
        };
        let same = self
            .held
            .as_ref()
            .is_some_and(|h| h.dev == meta.dev() && h.ino == meta.ino());
        if !meta.is_file() {
            let outcome = if meta.is_dir() {
                fail("read", &io::Error::from_raw_os_error(libc::EISDIR))
            } else {
                fail("read", &"not a regular file")
            };
            self.release(false);
            return outcome;
        }
        let reopen = std::mem::take(&mut self.reopen);
        if !same || reopen {
            self.release(same);
            let file = match open_file(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Outcome::Missing,
                Err(e) => return fail("open", &e),
            };
            self.own_opens += 1;
            let meta = match file.metadata() {
                Ok(meta) => meta,
                Err(e) => return fail("stat", &e),
            };
            if !meta.is_file() {
                // Replaced since the stat above; its events follow.
                self.own_closes += 1;
                return fail("read", &"not a regular file");
            }
            self.held = Some(Held {
                file,
                dev: meta.dev(),
                ino: meta.ino(),
            });
        }
        let Some(held) = &self.held else {
            return Outcome::Missing;
        };
        match read_all(&held.file) {
            // A file over the limit is reported by the check of its first bytes.
            Ok(bytes) => Outcome::Content(bytes),
            Err(e) => fail("read", &e),
        }
    }

    fn apply(&mut self, outcome: Outcome) {
        let startup = std::mem::take(&mut self.startup);
        match outcome {
            Outcome::Missing => {
                if self.status == Status::Deleted {
                    log::debug!("watch {}: still missing", self.path.display());
                } else if startup {
                    log::debug!("watch {}: does not exist (yet)", self.path.display());
                    self.status = Status::Deleted;
                } else {
                    log::debug!("watch {}: deleted", self.path.display());
                    self.status = Status::Deleted;
                    (self.on_event)(WatchEvent::Deleted);
                }
            }
            Outcome::Unreadable(msg) => {
                if matches!(&self.status, Status::Unreadable(m) if *m == msg) {
                    log::debug!("watch {}: still unreadable", self.path.display());
                } else {
                    log::debug!("watch {}: unreadable: {msg}", self.path.display());
                    self.status = Status::Unreadable(msg.clone());
                    (self.on_event)(WatchEvent::Unreadable(msg));
                }
            }
            Outcome::Content(bytes) => {
                self.status = Status::Present;
                if bytes == self.applied {
                    log::debug!(
                        "watch {}: content unchanged ({} bytes)",
                        self.path.display(),
                        bytes.len()
                    );
                } else {
                    log::debug!(
                        "watch {}: content changed ({} bytes)",
                        self.path.display(),
                        bytes.len()
                    );
                    self.applied.clone_from(&bytes);
                    (self.on_event)(WatchEvent::Changed(bytes));
                }
            }
        }
    }
}

/// Opens `path` for reading without blocking (should it be a FIFO) and
/// without acquiring a controlling terminal.
fn open_file(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

/// Reads `file` from offset 0 to its end with `pread`, at most one byte more
/// than [`MAX_FILE_SIZE`].
fn read_all(file: &File) -> io::Result<Vec<u8>> {
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

fn add_watch(inotify: &OwnedFd, dir: &CString) -> io::Result<i32> {
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
fn wait(inotify: &OwnedFd, wake: &OwnedFd, deadline: Option<Instant>) -> io::Result<(bool, bool)> {
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
fn parse_events<'a>(mut buf: &'a [u8], mut f: impl FnMut(RawEvent<'a>)) {
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
fn mask_names(mask: u32) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
    use std::thread::sleep;

    /// Longer than any debounce: if nothing arrived within this, nothing
    /// will.
    const SETTLE: Duration = Duration::from_millis(250);

    const NAME: &str = "vm.toml";

    /// With `WATCH_LOG=1`, log records go to stderr (captured per test, as
    /// the watcher threads inherit the test's output capture).
    struct TestLogger;

    impl log::Log for TestLogger {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            eprintln!(
                "{:?} [{}] {} {}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default(),
                std::thread::current().name().unwrap_or("?"),
                record.level(),
                record.args()
            );
        }
        fn flush(&self) {}
    }

    fn init_log() {
        static LOGGER: TestLogger = TestLogger;
        if std::env::var_os("WATCH_LOG").is_some() && log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Trace);
        }
    }

    struct Fixture {
        // Fields drop in this order: the watcher before its directory.
        watcher: Guarded,
        rx: Receiver<WatchEvent>,
        path: PathBuf,
        dir: tempfile::TempDir,
    }

    impl Fixture {
        /// A watcher on `<tmp>/vm.toml` that starts with `initial` (or with
        /// no file if `None`).
        fn new(initial: Option<&[u8]>) -> Fixture {
            init_log();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(NAME);
            if let Some(initial) = initial {
                fs::write(&path, initial).unwrap();
            }
            let (tx, rx) = mpsc::channel();
            let watcher = Watcher::spawn(
                &path,
                initial.unwrap_or_default().to_vec(),
                QUIET,
                move |ev| {
                    let _ = tx.send(ev);
                },
            )
            .unwrap();
            Fixture {
                watcher: Guarded(Some(watcher)),
                rx,
                path,
                dir,
            }
        }

        fn next(&self, timeout: Duration) -> Option<WatchEvent> {
            self.rx.recv_timeout(timeout).ok()
        }

        /// Collects events until none arrived for `SETTLE`.
        fn collect(&self) -> Vec<WatchEvent> {
            let mut out = Vec::new();
            while let Some(ev) = self.next(SETTLE) {
                out.push(ev);
            }
            out
        }

        fn expect(&self, want: WatchEvent) {
            let got = self.next(Duration::from_secs(2));
            assert_eq!(got.as_ref(), Some(&want), "expected {want:?}");
        }

        fn expect_none(&self) {
            let got = self.collect();
            assert!(got.is_empty(), "expected no events, got {got:?}");
        }

        fn tmp(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
    }

    fn changed(bytes: &[u8]) -> WatchEvent {
        WatchEvent::Changed(bytes.to_vec())
    }

    fn write_atomic(fx: &Fixture, bytes: &[u8]) {
        let tmp = fx.tmp(".vm.toml.tmp");
        fs::write(&tmp, bytes).unwrap();
        fs::rename(&tmp, &fx.path).unwrap();
    }

    fn set_mode(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A `Watcher` owned by a test: dropping it is timed (and fails instead
    /// of hanging); while the test panics anyway it is leaked instead.
    struct Guarded(Option<Watcher>);

    impl Guarded {
        fn drop_timed(&mut self) -> Duration {
            timed_drop(self.0.take().expect("already dropped"))
        }
    }

    impl Drop for Guarded {
        fn drop(&mut self) {
            if let Some(w) = self.0.take() {
                if std::thread::panicking() {
                    std::mem::forget(w);
                } else {
                    timed_drop(w);
                }
            }
        }
    }

    /// Drops `w` on a helper thread and returns how long that took; fails
    /// (instead of hanging) if it takes more than two seconds.
    fn timed_drop(w: Watcher) -> Duration {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let t = Instant::now();
            drop(w);
            let _ = tx.send(t.elapsed());
        });
        rx.recv_timeout(Duration::from_secs(2))
            .expect("dropping the Watcher hangs")
    }

    /// This process's open fds as (link target, fdinfo). Other tests run in
    /// parallel threads of this process, so fds are picked out by what they
    /// refer to rather than counted.
    fn open_fds() -> Vec<(String, String)> {
        let mut out = Vec::new();
        for entry in fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let name = entry.file_name();
            // An fd may be closed while we look.
            let Ok(target) = fs::read_link(entry.path()) else {
                continue;
            };
            let info_path = Path::new("/proc/self/fdinfo").join(&name);
            let info = fs::read_to_string(info_path).unwrap_or_default();
            out.push((target.to_string_lossy().into_owned(), info));
        }
        out
    }

    /// What a watcher of `file` (whose directory is `dir`) holds open: its
    /// inotify fds watching `dir`, its eventfds with id `eventfd_id`, and
    /// descriptors of `file`.
    fn watcher_fds(dir: &Path, file: &Path, eventfd_id: &str) -> (usize, usize, usize) {
        let meta = fs::metadata(dir).unwrap();
        let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
        let watch = format!(
            "ino:{:x} sdev:{:x} ",
            meta.ino(),
            (u64::from(major) << 20) | u64::from(minor)
        );
        let file = file.to_string_lossy().into_owned();
        let fds = open_fds();
        let inotify = fds
            .iter()
            .filter(|(t, info)| t == "anon_inode:inotify" && info.contains(&watch))
            .count();
        let eventfd = fds
            .iter()
            .filter(|(t, info)| t == "anon_inode:[eventfd]" && info.contains(eventfd_id))
            .count();
        // A deleted file shows as "<path> (deleted)".
        let files = fds.iter().filter(|(t, _)| t.starts_with(&file)).count();
        (inotify, eventfd, files)
    }

    #[test]
    fn in_place_write_then_same_content_save() {
        let fx = Fixture::new(Some(b"a = 1\n"));
        fs::write(&fx.path, b"a = 2\n").unwrap();
        fx.expect(changed(b"a = 2\n"));
        fx.expect_none();
        // No-op save.
        fs::write(&fx.path, b"a = 2\n").unwrap();
        fx.expect_none();
    }

    #[test]
    fn rapid_in_place_saves_are_coalesced() {
        let fx = Fixture::new(Some(b"rev = 0\n"));
        let saves: Vec<Vec<u8>> = (1..=50)
            .map(|i| format!("rev = {i}\n# {}\n", "x".repeat(i * 10)).into_bytes())
            .collect();
        let start = Instant::now();
        let mut times = Vec::with_capacity(saves.len());
        for save in &saves {
            fs::write(&fx.path, save).unwrap();
            times.push(Instant::now());
        }
        let total = start.elapsed();
        let events = fx.collect();

        // Descheduling of the writer may legitimately split the burst.
        let gaps = times
            .windows(2)
            .filter(|w| w[1].duration_since(w[0]) > QUIET)
            .count();
        let forced = (total.as_nanos() / MAX_DELAY.as_nanos()) as usize;
        let budget = 1 + gaps + forced;
        let last = saves.last().unwrap();
        assert!(!events.is_empty(), "no event for 50 saves");
        assert_eq!(
            events.last(),
            Some(&changed(last)),
            "last event is not the final content"
        );
        for ev in &events {
            // Never a half-written file: only complete saved contents.
            assert!(
                matches!(ev, WatchEvent::Changed(b) if saves.contains(b)),
                "unexpected event {ev:?}"
            );
        }
        if events.len() > 1 {
            eprintln!(
                "note: {} events for 50 saves in {total:?} ({gaps} gaps > QUIET, \
                 {forced} MAX_DELAY periods); allowed {budget}",
                events.len()
            );
        }
        assert!(
            events.len() <= budget,
            "{} events for 50 saves in {total:?} (allowed {budget})",
            events.len()
        );
    }

    /// Every rename save is seen, in order, even when the next save follows
    /// the moment the previous one was reported (while the watcher still
    /// holds the replaced file and accounts for its own open/close events).
    /// Each save waits for its own report: how fast saves may follow each
    /// other and still all be reported depends on scheduling (CI runs tests
    /// in parallel on two cores), which is what the next test covers.
    #[test]
    fn atomic_rename_saves_are_all_seen_in_order() {
        let fx = Fixture::new(Some(b"rev = 0\n"));
        // Warm-up: the watcher thread is running.
        write_atomic(&fx, b"warm-up\n");
        fx.expect(changed(b"warm-up\n"));
        for i in 1..=100 {
            let save = format!("rev = {i}\n").into_bytes();
            write_atomic(&fx, &save);
            let got = fx.next(Duration::from_secs(5));
            assert_eq!(
                got,
                Some(changed(&save)),
                "save {i} of 100 was not reported as itself"
            );
        }
        fx.expect_none();
    }

    /// Rename saves 20 ms apart: when the watcher thread is starved for
    /// longer than the gap it reads the newer file (level-triggered), but it
    /// never reports an older content after a newer one, never reports a
    /// save twice and always ends at the last save.
    #[test]
    fn paced_rename_saves_never_go_back_and_end_at_the_last() {
        let fx = Fixture::new(Some(b"rev = 0\n"));
        write_atomic(&fx, b"warm-up\n");
        fx.expect(changed(b"warm-up\n"));
        for i in 1..=100 {
            write_atomic(&fx, format!("rev = {i}\n").as_bytes());
            sleep(Duration::from_millis(20));
        }
        let events = fx.collect();
        let revs: Vec<u32> = events
            .iter()
            .map(|ev| match ev {
                WatchEvent::Changed(b) => std::str::from_utf8(b)
                    .ok()
                    .and_then(|s| s.trim().strip_prefix("rev = "))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("unexpected content {ev:?}")),
                other => panic!("unexpected event {other:?}"),
            })
            .collect();
        assert!(
            revs.windows(2).all(|w| w[0] < w[1]),
            "went back or repeated: {revs:?}"
        );
        assert_eq!(
            revs.last(),
            Some(&100),
            "did not end at the last save: {revs:?}"
        );
        if revs.len() < 100 {
            eprintln!(
                "note: {} of 100 paced rename saves reported (starved watcher thread)",
                revs.len()
            );
        }
    }

    #[test]
    fn delete_then_recreate_with_new_content() {
        let fx = Fixture::new(Some(b"old\n"));
        fs::remove_file(&fx.path).unwrap();
        fx.expect(WatchEvent::Deleted);
        fs::write(&fx.path, b"new\n").unwrap();
        fx.expect(changed(b"new\n"));
        fx.expect_none();
    }

    #[test]
    fn delete_then_recreate_with_same_content() {
        let fx = Fixture::new(Some(b"same\n"));
        fs::remove_file(&fx.path).unwrap();
        fx.expect(WatchEvent::Deleted);
        fs::write(&fx.path, b"same\n").unwrap();
        fx.expect_none();
    }

    #[test]
    fn deleted_is_reported_once() {
        let fx = Fixture::new(Some(b"x\n"));
        fs::rename(&fx.path, fx.tmp("elsewhere")).unwrap();
        fx.expect(WatchEvent::Deleted);
        // Another read while still missing (chmod of the directory schedules
        // one): no second Deleted.
        set_mode(fx.dir.path(), 0o755);
        fs::write(fx.tmp("other"), b"y").unwrap();
        fx.expect_none();
    }

    #[test]
    fn vim_style_save() {
        let fx = Fixture::new(Some(b"before\n"));
        fs::rename(&fx.path, fx.tmp("vm.toml~")).unwrap();
        fs::write(&fx.path, b"after\n").unwrap();
        fs::remove_file(fx.tmp("vm.toml~")).unwrap();
        let events = fx.collect();
        match events.as_slice() {
            [ev] => assert_eq!(ev, &changed(b"after\n")),
            [WatchEvent::Deleted, ev] => {
                eprintln!("note: writer was descheduled between rename and write");
                assert_eq!(ev, &changed(b"after\n"));
            }
            _ => panic!("unexpected events {events:?}"),
        }
    }

    #[test]
    fn chmod_000() {
        let fx = Fixture::new(Some(b"secret\n"));
        set_mode(&fx.path, 0o000);
        // SAFETY: trivial syscall.
        if unsafe { libc::geteuid() } == 0 {
            // Root still reads it: same content, no event.
            fx.expect_none();
        } else {
            match fx.next(Duration::from_secs(2)) {
                Some(WatchEvent::Unreadable(msg)) => assert!(
                    msg.to_lowercase().contains("permission denied"),
                    "message {msg:?}"
                ),
                other => panic!("expected Unreadable, got {other:?}"),
            }
            // Same error again: not reported again.
            set_mode(&fx.path, 0o000);
            fx.expect_none();
        }
        // Readable again with the same content: nothing to report.
        set_mode(&fx.path, 0o644);
        fx.expect_none();
        fs::write(&fx.path, b"public\n").unwrap();
        fx.expect(changed(b"public\n"));
    }

    #[test]
    fn directory_at_path_is_unreadable() {
        let fx = Fixture::new(Some(b"file\n"));
        fs::remove_file(&fx.path).unwrap();
        fs::create_dir(&fx.path).unwrap();
        let events = fx.collect();
        let last = match events.as_slice() {
            [last] | [WatchEvent::Deleted, last] => last,
            _ => panic!("unexpected events {events:?}"),
        };
        assert!(
            matches!(last, WatchEvent::Unreadable(m) if m.to_lowercase().contains("directory")),
            "unexpected events {events:?}"
        );
        // Another read with the same error: not reported again.
        set_mode(&fx.path, 0o700);
        fx.expect_none();
        // Back to a file with new content.
        fs::remove_dir(&fx.path).unwrap();
        fs::write(&fx.path, b"file again\n").unwrap();
        let events = fx.collect();
        assert_eq!(events.last(), Some(&changed(b"file again\n")), "{events:?}");
    }

    #[test]
    fn fifo_at_path_is_unreadable_and_does_not_block() {
        let fx = Fixture::new(Some(b"file\n"));
        let fifo = fx.tmp("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        fs::rename(&fifo, &fx.path).unwrap();
        match fx.next(Duration::from_secs(2)) {
            Some(WatchEvent::Unreadable(m)) => {
                assert!(m.contains("not a regular file"), "message {m:?}");
            }
            other => panic!("expected Unreadable, got {other:?}"),
        }
        // Still responsive.
        write_atomic(&fx, b"file again\n");
        fx.expect(changed(b"file again\n"));
    }

    #[test]
    fn garbage_content_is_reported_verbatim() {
        let fx = Fixture::new(Some(b"ok = true\n"));
        let garbage: Vec<u8> = vec![0xff, 0xfe, 0x00, 0xc3, 0x28, b'\n', 0x80, 0x00];
        fs::write(&fx.path, &garbage).unwrap();
        fx.expect(WatchEvent::Changed(garbage));
        fx.expect_none();
    }

    #[test]
    fn half_written_file_is_not_reported() {
        let fx = Fixture::new(Some(b"old\n"));
        let full = b"[machine]\nmemory = 512\ncpus = 2\n";
        let (first, second) = full.split_at(full.len() / 2);
        let mut file = fs::File::create(&fx.path).unwrap();
        file.write_all(first).unwrap();
        file.flush().unwrap();
        sleep(QUIET * 5);
        assert_eq!(fx.next(Duration::ZERO), None, "half-written file reported");
        file.write_all(second).unwrap();
        drop(file);
        fx.expect(changed(full));
        fx.expect_none();
    }

    #[test]
    fn half_written_new_file_is_not_reported() {
        let fx = Fixture::new(Some(b"old\n"));
        fs::remove_file(&fx.path).unwrap();
        fx.expect(WatchEvent::Deleted);
        let full = b"[machine]\nmemory = 256\n";
        let (first, second) = full.split_at(full.len() / 2);
        // IN_CREATE (and the writes) must not lead to a read.
        let mut file = fs::File::create_new(&fx.path).unwrap();
        file.write_all(first).unwrap();
        sleep(QUIET * 5);
        assert_eq!(fx.next(Duration::ZERO), None, "half-written file reported");
        file.write_all(second).unwrap();
        drop(file);
        fx.expect(changed(full));
        fx.expect_none();
    }

    #[test]
    fn directory_moved_away_and_recreated() {
        let top = tempfile::tempdir().unwrap();
        let sub = top.path().join("sub");
        fs::create_dir(&sub).unwrap();
        let path = sub.join(NAME);
        fs::write(&path, b"one\n").unwrap();
        let (tx, rx) = mpsc::channel();
        let _w = Guarded(Some(
            Watcher::spawn(&path, b"one\n".to_vec(), QUIET, move |ev| {
                let _ = tx.send(ev);
            })
            .unwrap(),
        ));
        // Moving the directory away makes the file disappear from the path.
        fs::rename(&sub, top.path().join("moved")).unwrap();
        let next = || rx.recv_timeout(Duration::from_secs(2)).ok();
        assert_eq!(next(), Some(WatchEvent::Deleted));
        // Edits in the moved directory are not about our path.
        fs::write(top.path().join("moved").join(NAME), b"elsewhere\n").unwrap();
        // A new directory at the path is picked up (after REWATCH_INTERVAL).
        fs::create_dir(&sub).unwrap();
        fs::write(&path, b"two\n").unwrap();
        assert_eq!(next(), Some(changed(b"two\n")));
        // And watched again.
        sleep(SETTLE);
        fs::write(&path, b"three\n").unwrap();
        assert_eq!(next(), Some(changed(b"three\n")));
        // Removing the file and the directory.
        fs::remove_file(&path).unwrap();
        fs::remove_dir(&sub).unwrap();
        assert_eq!(next(), Some(WatchEvent::Deleted));
        assert_eq!(rx.recv_timeout(SETTLE).ok(), None);
    }

    #[test]
    fn due_read_waits_for_open_writer() {
        let fx = Fixture::new(Some(b"old\n"));
        let full = b"[machine]\nmemory = 1024\n";
        let (first, second) = full.split_at(full.len() / 2);
        // Schedules a read...
        set_mode(&fx.path, 0o600);
        // ...which must not see the file while this writer has it open, not
        // even after MAX_DELAY.
        let mut file = fs::File::create(&fx.path).unwrap();
        file.write_all(first).unwrap();
        sleep(MAX_DELAY + QUIET * 10);
        assert_eq!(fx.next(Duration::ZERO), None, "half-written file reported");
        file.write_all(second).unwrap();
        drop(file);
        fx.expect(changed(full));
        fx.expect_none();
    }

    #[test]
    fn file_created_after_spawn() {
        let fx = Fixture::new(None);
        fx.expect_none();
        fs::write(&fx.path, b"fresh\n").unwrap();
        fx.expect(changed(b"fresh\n"));
        fx.expect_none();
    }

    #[test]
    fn change_before_start_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NAME);
        fs::write(&path, b"newer\n").unwrap();
        let (tx, rx) = mpsc::channel();
        let _w = Guarded(Some(
            Watcher::spawn(&path, b"older\n".to_vec(), QUIET, move |ev| {
                let _ = tx.send(ev);
            })
            .unwrap(),
        ));
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(2)).ok(),
            Some(changed(b"newer\n"))
        );
        assert_eq!(rx.recv_timeout(SETTLE).ok(), None);
    }

    #[test]
    fn other_files_with_long_names_are_ignored() {
        let fx = Fixture::new(Some(b"v1\n"));
        // Many maximum-length records: several buffers' worth.
        for i in 0..150 {
            let name = format!("{i:03}{}", "n".repeat(252));
            fs::write(fx.tmp(&name), b"noise").unwrap();
        }
        fx.expect_none();
        fs::write(&fx.path, b"v2\n").unwrap();
        fx.expect(changed(b"v2\n"));
        fx.expect_none();
    }

    #[test]
    fn queue_overflow_triggers_reread() {
        let max: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(16384);
        if max > 100_000 {
            eprintln!("note: max_queued_events = {max}; skipping the overflow test");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NAME);
        fs::write(&path, b"A").unwrap();
        let (tx, rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let mut first = true;
        let _w = Guarded(Some(
            Watcher::spawn(&path, b"A".to_vec(), QUIET, move |ev| {
                let _ = tx.send(ev);
                if std::mem::take(&mut first) {
                    // Block the watcher thread so that its queue fills up.
                    let _ = release_rx.recv_timeout(Duration::from_secs(10));
                }
            })
            .unwrap(),
        ));
        fs::write(&path, b"B").unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(2)).ok(),
            Some(changed(b"B"))
        );
        // The watcher thread is now blocked in the callback. Overflow its
        // queue (alternating files so that events are not merged).
        let noise = [dir.path().join("a"), dir.path().join("b")];
        for p in &noise {
            fs::write(p, b"").unwrap();
        }
        for i in 0..max + 1000 {
            set_mode(&noise[i % 2], if (i / 2) % 2 == 0 { 0o600 } else { 0o644 });
        }
        // This change's events are lost in the overflow.
        fs::write(&path, b"C").unwrap();
        release_tx.send(()).unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).ok(),
            Some(changed(b"C"))
        );
        assert_eq!(rx.recv_timeout(SETTLE).ok(), None);
    }

    #[test]
    fn drop_joins_quickly_and_closes_fds() {
        let dir = tempfile::tempdir().unwrap();
        // Canonical, as /proc shows it.
        let dir_path = fs::canonicalize(dir.path()).unwrap();
        let path = dir_path.join(NAME);
        fs::write(&path, b"1").unwrap();
        let (tx, rx) = mpsc::channel();
        let mut w = Guarded(Some(
            Watcher::spawn(&path, b"1".to_vec(), QUIET, move |ev| {
                let _ = tx.send(ev);
            })
            .unwrap(),
        ));
        let wake = w.0.as_ref().unwrap().wake.as_raw_fd();
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{wake}")).unwrap();
        let eventfd_id = info
            .lines()
            .find(|l| l.starts_with("eventfd-id:"))
            .map(|l| format!("{l}\n"))
            .unwrap_or_else(|| info.clone());
        let fds = || watcher_fds(&dir_path, &path, &eventfd_id);
        let next = || rx.recv_timeout(Duration::from_secs(2)).ok();
        fs::write(&path, b"2").unwrap();
        assert_eq!(next(), Some(changed(b"2")));
        assert_eq!(fds(), (1, 1, 1), "inotify fd, eventfd, the file");
        // The file's descriptor is given up when the file goes away...
        fs::remove_file(&path).unwrap();
        assert_eq!(next(), Some(WatchEvent::Deleted));
        assert_eq!(fds(), (1, 1, 0), "inotify fd, eventfd, no file");
        // ...and taken again when it comes back.
        fs::write(&path, b"3").unwrap();
        assert_eq!(next(), Some(changed(b"3")));
        assert_eq!(fds(), (1, 1, 1), "inotify fd, eventfd, the file");
        // The thread is idle in ppoll with no timeout now.
        sleep(Duration::from_millis(20));
        let took = w.drop_timed();
        assert!(took < Duration::from_millis(100), "drop took {took:?}");
        // The callback (and with it the sender) is gone.
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(10)),
            Err(RecvTimeoutError::Disconnected)
        );
        assert_eq!(fds(), (0, 0, 0), "fds left open");
    }

    #[test]
    fn drop_during_pending_read_is_prompt() {
        let fx = Fixture::new(Some(b"x"));
        // A writer holds the file open: the read is held for WRITE_HOLD.
        set_mode(&fx.path, 0o600);
        let _file = fs::File::create(&fx.path).unwrap();
        sleep(QUIET * 3);
        let mut fx = fx;
        let took = fx.watcher.drop_timed();
        assert!(took < Duration::from_millis(100), "drop took {took:?}");
    }

    #[test]
    fn spawn_errors() {
        let dir = tempfile::tempdir().unwrap();
        let nop = |_| {};
        let missing = dir.path().join("no-such-dir").join(NAME);
        assert!(Watcher::spawn(&missing, Vec::new(), QUIET, nop).is_err());
        let not_dir = dir.path().join("plain");
        fs::write(&not_dir, b"").unwrap();
        assert!(Watcher::spawn(&not_dir.join(NAME), Vec::new(), QUIET, nop).is_err());
        let err = Watcher::spawn(Path::new("/"), Vec::new(), QUIET, nop).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn parser_survives_odd_buffers() {
        fn record(wd: i32, mask: u32, name: &[u8], len: u32) -> Vec<u8> {
            let mut v = Vec::new();
            v.extend_from_slice(&wd.to_ne_bytes());
            v.extend_from_slice(&mask.to_ne_bytes());
            v.extend_from_slice(&0u32.to_ne_bytes());
            v.extend_from_slice(&len.to_ne_bytes());
            v.extend_from_slice(name);
            v
        }
        let mut buf = record(1, libc::IN_CLOSE_WRITE, b"vm.toml\0\0\0\0\0\0\0\0\0", 16);
        buf.extend(record(-1, libc::IN_Q_OVERFLOW, b"", 0));
        buf.extend(record(1, libc::IN_DELETE, &[b'n'; 300], 300));
        // Truncated: claims a huge name.
        buf.extend(record(1, libc::IN_CREATE, b"abc", u32::MAX));
        let mut seen = Vec::new();
        parse_events(&buf, |ev| seen.push((ev.wd, ev.mask, ev.name.to_vec())));
        assert_eq!(
            seen,
            vec![
                (1, libc::IN_CLOSE_WRITE, b"vm.toml".to_vec()),
                (-1, libc::IN_Q_OVERFLOW, Vec::new()),
                (1, libc::IN_DELETE, vec![b'n'; 300]),
            ]
        );
        // A partial header and an empty buffer.
        parse_events(&buf[..7], |_| panic!("parsed a partial header"));
        parse_events(&[], |_| panic!("parsed nothing"));
        assert_eq!(mask_names(libc::IN_CREATE | libc::IN_ISDIR), "CREATE|ISDIR");
        assert_eq!(mask_names(0), "0x0");
    }

    #[test]
    fn watcher_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Watcher>();
    }
}
