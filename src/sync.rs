//! vmm's locks: every mutex and read-write lock has a [`Rank`], its place in the one lock order
//! (docs/architecture.md). A thread may only take a lock ranked strictly below every lock it
//! holds; two locks of one rank are never held together.
//!
//! In debug builds (every test run) each thread keeps the ranks it holds and taking a lock out
//! of order stops vmm at once, naming both locks: a lock-order mistake fails the suite the first
//! time the path runs, not the day two threads happen to meet in it. Release builds keep no
//! record and cost what `std::sync` costs.
//!
//! A poisoned lock (a thread panicked holding it) is taken anyway: a panic elsewhere must not
//! wedge the VM.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

/// Places in the lock order, outermost first: a lock may be taken while holding only locks
/// ranked before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rank {
    /// The running VM's table of plugged PCI functions (`LiveVm`, reconciler thread only).
    Plugged,
    /// The I/O port and MMIO buses. vCPUs hold the read side while a device handles an exit;
    /// the write side is taken only with no other lock held (hotplug, BAR moves).
    Bus,
    /// A bus device that is not a PCI function: the legacy devices, the PCI configuration
    /// mechanisms (ports 0xcf8/0xcfc and ECAM), the hotplug controller's ports, ACPI PM.
    BusDevice,
    /// PCI bus 0's slot table.
    PciRoot,
    /// A PCI function: the host bridge, a virtio-pci function (reached both through the
    /// slot table and directly as the MMIO device of its BAR).
    PciFunction,
    /// State a device model shares with its host side: the UART, a console's output end,
    /// the hotplug registers.
    DeviceState,
    /// A virtio-pci function's interrupt state: device status, vectors, ISR, MSI-X table.
    VirtioIrq,
    /// The VM's GSI routing table (written to KVM while held).
    MsiRouting,
    /// Takes no other lock but the logger's: output buffers, the VM's outcome, queued BAR
    /// moves, input FIFOs, control socket bookkeeping, vhost-user backend state.
    Leaf,
    /// The logger's per-site counters: anything may log.
    Log,
}

#[cfg(debug_assertions)]
mod order {
    use super::Rank;
    use std::cell::RefCell;

    thread_local! {
        static HELD: RefCell<Vec<(Rank, &'static str)>> = const { RefCell::new(Vec::new()) };
    }

    /// Whether `rank` may be taken while `held` are held; the complaint if not.
    pub fn check(held: &[(Rank, &'static str)], rank: Rank, what: &str) -> Result<(), String> {
        match held.iter().find(|(h, _)| *h >= rank) {
            None => Ok(()),
            Some((h, hw)) => Err(format!(
                "lock order violated: taking {rank:?} ({what}) while holding {h:?} ({hw}); \
                 see the lock order in docs/architecture.md"
            )),
        }
    }

    pub fn acquire(rank: Rank, what: &'static str) {
        let bad = HELD.with(|h| {
            let mut h = h.borrow_mut();
            let r = check(&h, rank, what);
            h.push((rank, what));
            r.err()
        });
        if let Some(msg) = bad {
            violated(&msg);
        }
    }

    pub fn release(rank: Rank) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(i) = h.iter().rposition(|(r, _)| *r == rank) {
                h.remove(i);
            }
        });
    }

    /// Whether this thread holds a lock of `rank`.
    pub fn holds(rank: Rank) -> bool {
        HELD.with(|h| h.borrow().iter().any(|(r, _)| *r == rank))
    }

    /// Unit tests see a panic (`should_panic`); a debug vmm stops at once, so no test can
    /// miss it in a thread's output.
    #[cfg(test)]
    fn violated(msg: &str) {
        panic!("{msg}");
    }
    #[cfg(not(test))]
    fn violated(msg: &str) {
        eprintln!(
            "vmm: BUG: {msg}\n{}",
            std::backtrace::Backtrace::force_capture()
        );
        std::process::abort();
    }
}

/// The record of one held lock (debug builds); dropping it forgets the lock.
#[derive(Debug)]
struct Held {
    #[cfg(debug_assertions)]
    rank: Rank,
}

impl Held {
    #[cfg_attr(not(debug_assertions), allow(unused_variables))]
    fn take(rank: Rank, what: &'static str) -> Held {
        #[cfg(debug_assertions)]
        order::acquire(rank, what);
        Held {
            #[cfg(debug_assertions)]
            rank,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        order::release(self.rank);
    }
}

/// Whether the calling thread holds a lock of `rank` (always false in release builds). For
/// debug assertions such as "no blocking wait under a bus lock".
pub fn holds(rank: Rank) -> bool {
    #[cfg(debug_assertions)]
    {
        order::holds(rank)
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = rank;
        false
    }
}

/// A mutex with a place in the lock order.
#[derive(Debug)]
pub struct Mutex<T: ?Sized> {
    rank: Rank,
    inner: std::sync::Mutex<T>,
}

#[derive(Debug)]
pub struct MutexGuard<'a, T: ?Sized> {
    // Unlocked before the record is dropped.
    inner: std::sync::MutexGuard<'a, T>,
    _held: Held,
}

impl<T> Mutex<T> {
    pub const fn new(rank: Rank, value: T) -> Mutex<T> {
        Mutex {
            rank,
            inner: std::sync::Mutex::new(value),
        }
    }

    pub fn into_inner(self) -> T {
        self.inner.into_inner().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: ?Sized> Mutex<T> {
    pub fn lock(&self) -> MutexGuard<'_, T> {
        let held = Held::take(self.rank, std::any::type_name::<T>());
        MutexGuard {
            inner: self.inner.lock().unwrap_or_else(|e| e.into_inner()),
            _held: held,
        }
    }

    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: Default> Default for Mutex<T> {
    /// A leaf lock.
    fn default() -> Self {
        Mutex::new(Rank::Leaf, T::default())
    }
}

impl<T: ?Sized> Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T: ?Sized> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

/// A condition variable for [`Mutex`]es.
#[derive(Debug, Default)]
pub struct Condvar(std::sync::Condvar);

impl Condvar {
    pub fn new() -> Condvar {
        Condvar::default()
    }

    /// Waits while `cond` holds, at most `timeout`; the lock is released while waiting.
    pub fn wait_timeout_while<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
        cond: impl FnMut(&mut T) -> bool,
    ) -> MutexGuard<'a, T> {
        let MutexGuard { inner, _held } = guard;
        let inner = match self.0.wait_timeout_while(inner, timeout, cond) {
            Ok((g, _)) => g,
            Err(e) => e.into_inner().0,
        };
        MutexGuard { inner, _held }
    }

    pub fn notify_all(&self) {
        self.0.notify_all();
    }
}

/// A read-write lock with a place in the lock order (both sides have the same rank).
#[derive(Debug)]
pub struct RwLock<T: ?Sized> {
    rank: Rank,
    inner: std::sync::RwLock<T>,
}

#[derive(Debug)]
pub struct RwLockReadGuard<'a, T: ?Sized> {
    inner: std::sync::RwLockReadGuard<'a, T>,
    _held: Held,
}

#[derive(Debug)]
pub struct RwLockWriteGuard<'a, T: ?Sized> {
    inner: std::sync::RwLockWriteGuard<'a, T>,
    _held: Held,
}

impl<T> RwLock<T> {
    pub const fn new(rank: Rank, value: T) -> RwLock<T> {
        RwLock {
            rank,
            inner: std::sync::RwLock::new(value),
        }
    }
}

impl<T: ?Sized> RwLock<T> {
    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        let held = Held::take(self.rank, std::any::type_name::<T>());
        RwLockReadGuard {
            inner: self.inner.read().unwrap_or_else(|e| e.into_inner()),
            _held: held,
        }
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        let held = Held::take(self.rank, std::any::type_name::<T>());
        RwLockWriteGuard {
            inner: self.inner.write().unwrap_or_else(|e| e.into_inner()),
            _held: held,
        }
    }
}

impl<T: ?Sized> Deref for RwLockReadGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T: ?Sized> Deref for RwLockWriteGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T: ?Sized> DerefMut for RwLockWriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn locks_in_order_are_fine_and_released_ranks_are_forgotten() {
        let bus = RwLock::new(Rank::Bus, ());
        let dev = Mutex::new(Rank::BusDevice, 1u32);
        let root = Mutex::new(Rank::PciRoot, ());
        {
            let _b = bus.read();
            let mut d = dev.lock();
            *d += 1;
            let _r = root.lock();
            assert!(holds(Rank::Bus) && holds(Rank::PciRoot));
        }
        assert!(!holds(Rank::Bus) && !holds(Rank::BusDevice));
        // Released in any order.
        let b = bus.write();
        let d = dev.lock();
        drop(b);
        assert!(!holds(Rank::Bus) && holds(Rank::BusDevice));
        drop(d);
        let _b = bus.read();
        assert_eq!(*dev.lock(), 2);
    }

    #[test]
    #[should_panic(expected = "taking Bus")]
    fn the_old_hotplug_order_is_refused() {
        // attach_pci once held the PCI root and then took the MMIO bus for writing, while a
        // vCPU in ECAM holds the bus and takes the root: a deadlock waiting to happen.
        let root = Mutex::new(Rank::PciRoot, ());
        let mmio = RwLock::new(Rank::Bus, ());
        let _r = root.lock();
        let _w = mmio.write();
    }

    #[test]
    #[should_panic(expected = "while holding Leaf")]
    fn two_leaves_never_nest() {
        let a = Mutex::new(Rank::Leaf, ());
        let b = Mutex::new(Rank::Leaf, ());
        let _a = a.lock();
        let _b = b.lock();
    }

    #[test]
    fn a_poisoned_lock_is_taken_and_unsized_values_coerce() {
        let m: Arc<Mutex<dyn std::fmt::Debug + Send>> = Arc::new(Mutex::new(Rank::Leaf, 5u8));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock();
            panic!("poison it");
        })
        .join();
        assert_eq!(format!("{:?}", &*m.lock()), "5");
        // The panicking thread's record died with it; this one holds nothing.
        assert!(!holds(Rank::Leaf));
    }

    #[test]
    fn condvar_waits_and_keeps_the_record() {
        let m = Arc::new(Mutex::new(Rank::Leaf, 0u32));
        let c = Arc::new(Condvar::new());
        let (m2, c2) = (m.clone(), c.clone());
        let t = std::thread::spawn(move || {
            *m2.lock() = 1;
            c2.notify_all();
        });
        let g = c.wait_timeout_while(m.lock(), Duration::from_secs(10), |v| *v == 0);
        assert_eq!(*g, 1);
        assert!(holds(Rank::Leaf));
        drop(g);
        assert!(!holds(Rank::Leaf));
        t.join().unwrap();
    }
}
