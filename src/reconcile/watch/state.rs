//! The watcher thread's state machine: events in, debounced reads, reports out.

use super::inotify::*;
use super::*;

/// What was last reported (or assumed at start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Status {
    Present,
    Deleted,
    Unreadable(String),
}

/// A burst of relevant events awaiting a read.
#[derive(Debug, Clone, Copy)]
pub(super) struct Burst {
    pub(super) first: Instant,
    pub(super) last: Instant,
}

/// The result of reading the file.
#[derive(Debug)]
pub(super) enum Outcome {
    Missing,
    Unreadable(String),
    Content(Vec<u8>),
}

/// The watcher's own descriptor of the file, with its identity.
#[derive(Debug)]
pub(super) struct Held {
    file: File,
    dev: u64,
    ino: u64,
}

/// The state owned by the watcher thread.
pub(super) struct State<F> {
    pub(super) path: PathBuf,
    pub(super) dir_c: CString,
    pub(super) name: Vec<u8>,
    pub(super) inotify: OwnedFd,
    /// The current directory watch; `None` while the directory is gone.
    pub(super) wd: Option<i32>,
    /// When to try to watch the directory again.
    pub(super) rewatch_at: Option<Instant>,
    pub(super) quiet: Duration,
    /// Content last reported (or the initial content).
    pub(super) applied: Vec<u8>,
    pub(super) status: Status,
    pub(super) pending: Option<Burst>,
    /// The file, kept open between reads.
    pub(super) held: Option<Held>,
    /// Reopen the file at the next read even if it is the same inode.
    pub(super) reopen: bool,
    /// `IN_OPEN` events of the watcher's own opens still to come.
    pub(super) own_opens: u32,
    /// `IN_CLOSE_NOWRITE` events of the watcher's own closes still to come.
    pub(super) own_closes: u32,
    /// Another process opened the file (at this time) and has not closed it
    /// since, as far as events tell.
    pub(super) opened_at: Option<Instant>,
    /// Last `IN_CREATE`/`IN_MODIFY` not yet followed by `IN_CLOSE_WRITE`.
    pub(super) written_at: Option<Instant>,
    /// Counts events concerning the file (except the watcher's own opens and
    /// closes), to notice changes during a read.
    pub(super) seq: u64,
    /// The next read is the start-up read and nothing happened since.
    pub(super) startup: bool,
    pub(super) on_event: F,
}

impl<F: FnMut(WatchEvent)> State<F> {
    /// Opens the file before `spawn` returns, so that the watcher's own
    /// `IN_OPEN` is out of the way before anyone edits the file (see
    /// `read_file`). The start-up read itself happens on the thread.
    pub(super) fn prime(&mut self, buf: &mut EventBuf) {
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

    pub(super) fn run(mut self, wake: &OwnedFd, buf: &mut EventBuf) {
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
            self.dir_event(mask, ev.wd, now);
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
        self.file_event(mask, now);
    }

    /// An event on the directory itself (a chmod, its move).
    fn dir_event(&mut self, mask: u32, wd: i32, now: Instant) {
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
            unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), wd) };
            self.watch_lost(now);
        }
    }

    /// An event on the watched name: track writers, and read when a save may be complete.
    fn file_event(&mut self, mask: u32, now: Instant) {
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
                    if !startup {
                        (self.on_event)(WatchEvent::Unchanged);
                    }
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
