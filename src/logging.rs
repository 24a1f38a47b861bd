//! vmm's logger: env_logger's output (`RUST_LOG`), at most [`PER_SITE`] error, warning and info
//! lines per call site per [`WINDOW`] (debug and trace lines, which only `RUST_LOG` turns on, are
//! not limited).
//!
//! A guest can make vmm log from its vCPU threads — a bad queue size, a refused feature set,
//! a ring it broke — once per exit, and so can a vhost-user front end. Those lines are written
//! synchronously; unlimited, a guest could fill the host's disk through vmm's stderr and slow
//! every exit down. Limiting per call site (file and line, which covers the crates vmm uses,
//! such as virtio-queue, too) keeps the first lines of every distinct problem and drops the
//! repetition: after `PER_SITE` lines a site is quiet until its window ends, then one line says
//! how many were suppressed. The count of a window still open is printed when vmm exits
//! ([`flush`]).

use std::collections::HashMap;

use log::Log;
use std::time::{Duration, Instant};

use crate::sync::{Mutex, Rank};

/// Lines one call site may log per window.
pub const PER_SITE: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Rate state of one call site.
struct Site {
    since: Instant,
    lines: u32,
    suppressed: u64,
    /// Where the site is, for the suppression line.
    at: String,
    level: log::Level,
}

/// What to do with one line.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    /// Pass, after a line saying how many were suppressed in the window that just ended.
    PassAfter(u64),
    Drop,
}

/// The per-site counters (separate from the logger so tests can drive them with their own
/// clock).
#[derive(Default)]
struct Limiter {
    sites: HashMap<(usize, u32), Site>,
}

impl Limiter {
    fn admit(
        &mut self,
        key: (usize, u32),
        at: impl FnOnce() -> String,
        level: log::Level,
        now: Instant,
    ) -> Verdict {
        let s = self.sites.entry(key).or_insert_with(|| Site {
            since: now,
            lines: 0,
            suppressed: 0,
            at: at(),
            level,
        });
        if now.duration_since(s.since) >= WINDOW {
            let n = std::mem::take(&mut s.suppressed);
            s.since = now;
            s.lines = 1;
            return if n > 0 {
                Verdict::PassAfter(n)
            } else {
                Verdict::Pass
            };
        }
        if s.lines < PER_SITE {
            s.lines += 1;
            Verdict::Pass
        } else {
            s.suppressed += 1;
            Verdict::Drop
        }
    }

    /// (where, level, count) of every site with lines suppressed in its open window; clears
    /// the counts.
    fn take_suppressed(&mut self) -> Vec<(String, log::Level, u64)> {
        self.sites
            .values_mut()
            .filter(|s| s.suppressed > 0)
            .map(|s| (s.at.clone(), s.level, std::mem::take(&mut s.suppressed)))
            .collect()
    }
}

struct Limited {
    inner: env_logger::Logger,
    limiter: Mutex<Limiter>,
}

fn suppressed_line(at: &str, n: u64) -> String {
    format!(
        "{n} more line{} from {at} suppressed (at most {PER_SITE} per {} s from one place)",
        if n == 1 { "" } else { "s" },
        WINDOW.as_secs()
    )
}

impl Limited {
    fn say(&self, level: log::Level, target: &str, text: &str) {
        self.inner.log(
            &log::Record::builder()
                .level(level)
                .target(target)
                .args(format_args!("{text}"))
                .build(),
        );
    }
}

impl log::Log for Limited {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        self.inner.enabled(m)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        // Debug and trace lines are asked for (`RUST_LOG`), to trace every event (the hotplug
        // bench reads one per plug): not limited.
        if record.level() >= log::Level::Debug {
            self.inner.log(record);
            return;
        }
        // A site is its file (by the address of its static name, no allocation) and line.
        let file = record.file_static().unwrap_or("?");
        let key = (file.as_ptr() as usize, record.line().unwrap_or(0));
        let at = || format!("{}:{}", file, record.line().unwrap_or(0));
        let verdict = self
            .limiter
            .lock()
            .admit(key, at, record.level(), Instant::now());
        match verdict {
            Verdict::Drop => {}
            Verdict::Pass => self.inner.log(record),
            Verdict::PassAfter(n) => {
                let at = format!("{}:{}", file, record.line().unwrap_or(0));
                self.say(record.level(), record.target(), &suppressed_line(&at, n));
                self.inner.log(record);
            }
        }
    }

    fn flush(&self) {
        let pending = self.limiter.lock().take_suppressed();
        for (at, level, n) in pending {
            self.say(level, "vmm", &suppressed_line(&at, n));
        }
        self.inner.flush();
    }
}

/// Installs the logger: `RUST_LOG` (default: warnings), timestamps in milliseconds.
pub fn init() {
    let inner = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .build();
    let max = inner.filter();
    let logger = Limited {
        inner,
        limiter: Mutex::new(Rank::Log, Limiter::default()),
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(max);
    }
}

/// Prints what is still suppressed (at exit).
pub fn flush() {
    log::logger().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_lines_per_site_per_minute_then_one_count() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let site = |l: &mut Limiter, line, dt: u64| {
            l.admit(
                (1, line),
                || format!("x.rs:{line}"),
                log::Level::Warn,
                t0 + Duration::from_millis(dt),
            )
        };
        for i in 0..PER_SITE {
            assert_eq!(site(&mut l, 7, u64::from(i)), Verdict::Pass);
        }
        for i in 0..1000 {
            assert_eq!(site(&mut l, 7, 100 + i), Verdict::Drop);
        }
        // Another site is not affected.
        assert_eq!(site(&mut l, 8, 200), Verdict::Pass);
        // A new window: the count, once, and ten more lines.
        assert_eq!(site(&mut l, 7, 60_000), Verdict::PassAfter(1000));
        for i in 1..PER_SITE {
            assert_eq!(site(&mut l, 7, 60_000 + u64::from(i)), Verdict::Pass);
        }
        assert_eq!(site(&mut l, 7, 60_100), Verdict::Drop);
        // What an open window suppressed is reported at exit, once.
        assert_eq!(
            l.take_suppressed(),
            vec![("x.rs:7".into(), log::Level::Warn, 1)]
        );
        assert!(l.take_suppressed().is_empty());
        assert_eq!(site(&mut l, 7, 125_000), Verdict::Pass);
    }
}
