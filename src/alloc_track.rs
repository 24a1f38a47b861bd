//! Unit tests only: the global allocator counts what a thread that asked for it allocates, so
//! a test can assert how much memory a guest can make vmm take (a hostile descriptor must not
//! become a 4 GiB buffer).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Tracking;

thread_local! {
    /// (tracking on, bytes live now, most bytes live at once) for this thread.
    static STATE: Cell<(bool, usize, usize)> = const { Cell::new((false, 0, 0)) };
}

/// A tracked thread asking for more than this at once ends the test run at once (the bug a
/// test looks for would otherwise first allocate and zero gigabytes).
const ABORT_ABOVE: usize = 64 << 20;

fn note(grow: usize, shrink: usize) {
    // `try_with`: a thread's allocations during its own teardown are not counted.
    let _ = STATE.try_with(|s| {
        let (on, live, peak) = s.get();
        if on && grow > ABORT_ABOVE {
            let msg = b"alloc_track: a tracked thread asked for more than 64 MiB at once\n";
            // SAFETY: write(2) of a static buffer to stderr; nothing here may allocate.
            unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
            std::process::abort();
        }
        if on {
            let live = (live + grow).saturating_sub(shrink);
            s.set((on, live, peak.max(live)));
        }
    });
}

// SAFETY: every call goes to the system allocator unchanged; the counting touches only a
// thread-local Cell and never allocates.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size(), 0);
        // SAFETY: the caller's layout, as given.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size(), 0);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        note(0, l.size());
        // SAFETY: `p` was allocated by System with `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new, l.size());
        // SAFETY: as above.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// Runs `f` on this thread and returns its result with the most bytes it had allocated at
/// once (what it allocated and freed again counts; what existed before does not).
pub fn peak<R>(f: impl FnOnce() -> R) -> (R, usize) {
    STATE.with(|s| s.set((true, 0, 0)));
    let r = f();
    let (_, _, peak) = STATE.with(|s| s.replace((false, 0, 0)));
    (r, peak)
}
