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
    // No-op save: reported as such (the reconciler retries what did not converge).
    fs::write(&fx.path, b"a = 2\n").unwrap();
    fx.expect(WatchEvent::Unchanged);
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
    fx.expect(WatchEvent::Unchanged);
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
        // Root still reads it: the same content.
        fx.expect(WatchEvent::Unchanged);
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
    // Readable again with the same content.
    set_mode(&fx.path, 0o644);
    fx.expect(WatchEvent::Unchanged);
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
