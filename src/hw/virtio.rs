//! What every virtio device model implements, independent of the transport (virtio 1.2
//! sections 2–3). A model gets guest memory, its queues (with their kick eventfds and interrupt
//! handles) and a configuration-change interrupt; it never sees PCI, BARs or MSI-X.
//!
//! The request handling of each model is a plain function over a `virtio_queue::Queue` and guest
//! memory, so the same code runs in vmm's worker threads and in `vmm device` (vhost-user).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::hw::Irq;

pub type GuestMem = GuestMemoryMmap<()>;

// Feature bits (virtio 1.2 section 6).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;

// Device status bits (section 2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 64;
pub const STATUS_FAILED: u8 = 128;

/// A queue handed to a device when the driver is ready.
#[derive(Debug)]
pub struct ActiveQueue {
    /// The queue's index on the device (the driver may leave queues disabled).
    pub index: u16,
    pub queue: Queue,
    /// Written by the guest's notification (ioeventfd).
    pub kick: EventFd,
    /// The queue's interrupt (its MSI-X vector).
    pub irq: Arc<dyn Irq>,
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ActivateError(pub String);

/// Lets a running device tell the transport the driver must reset it (DEVICE_NEEDS_RESET).
pub trait NeedsReset: Send + Sync + std::fmt::Debug {
    fn needs_reset(&self, why: &str);
}

/// Everything a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    pub mem: GuestMem,
    /// Features the driver accepted.
    pub features: u64,
    pub queues: Vec<ActiveQueue>,
    /// Configuration-change interrupt.
    pub config_irq: Arc<dyn Irq>,
    pub needs_reset: Arc<dyn NeedsReset>,
}

/// A virtio device model.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// What the device is: type, queues and their sizes, PCI class (declared once per kind).
    fn virtio(&self) -> &crate::contract::VirtioInfo;
    /// Offered features, VIRTIO_F_VERSION_1 included.
    fn features(&self) -> u64;
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (most devices ignore writes).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts processing; called once per DRIVER_OK, only when [`VirtioDevice::quiesced`].
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError>;
    /// Stops processing and forgets the queues (driver reset). Never waits: it runs on a vCPU
    /// thread holding the bus lock. Workers are asked to stop and finish on their own
    /// ([`WorkerSlot`]); the transport reports the reset done once [`quiesced`] says so.
    ///
    /// [`quiesced`]: VirtioDevice::quiesced
    fn reset(&mut self);
    /// Whether nothing started before the last reset still runs (never waits).
    fn quiesced(&mut self) -> bool {
        true
    }
}

/// Reads `data.len()` bytes at `offset` of a config structure given as bytes; out of range
/// reads are zero.
pub fn read_config_bytes(cfg: &[u8], offset: u64, data: &mut [u8]) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| cfg.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// How a worker is asked to stop: a flag it checks between batches of requests, and an
/// eventfd that wakes it when it waits.
#[derive(Debug)]
pub struct Stop {
    flag: AtomicBool,
    evt: EventFd,
}

impl Stop {
    pub fn new() -> std::io::Result<Stop> {
        Ok(Stop {
            flag: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }
    /// Whether the worker should stop now (checked between requests).
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
    pub fn request(&self) {
        self.flag.store(true, Ordering::Release);
        let _ = self.evt.write(1);
    }
}

/// Requests one worker serves before it looks at its stop flag again: a guest keeping its
/// ring full cannot hold a reset or an unplug for longer than one batch.
pub const BUDGET: usize = 32;

/// The event loop of a device worker: a stop eventfd plus the fds the device waits on.
#[derive(Debug)]
pub struct Worker {
    epoll: Epoll,
    pub stop: Arc<Stop>,
}

/// Token of the stop event in [`Worker::wait`].
pub const STOP_TOKEN: u64 = u64::MAX;

impl Worker {
    pub fn new(stop: Arc<Stop>) -> std::io::Result<Worker> {
        let w = Worker {
            epoll: Epoll::new()?,
            stop,
        };
        w.add(w.stop.evt.as_raw_fd(), STOP_TOKEN)?;
        Ok(w)
    }

    /// Waits on `fd` (readable) with `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> std::io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )
    }

    pub fn remove(&self, fd: RawFd) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// Waits for events; returns their tokens (STOP_TOKEN when asked to stop).
    pub fn wait(&self, timeout_ms: i32) -> Vec<u64> {
        if self.stop.requested() {
            return vec![STOP_TOKEN];
        }
        let mut events = vec![EpollEvent::default(); 16];
        match self.epoll.wait(timeout_ms, &mut events) {
            Ok(n) => events[..n].iter().map(|e| e.data()).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Vec::new(),
            Err(e) => {
                log::error!("device worker: epoll_wait failed: {e}");
                vec![STOP_TOKEN]
            }
        }
    }
}

/// How long dropping a worker waits for it to finish before leaving it (it then ends with the
/// process; everything it uses it holds references to).
const JOIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A started worker thread and its stop signal.
#[derive(Debug)]
pub struct WorkerHandle {
    pub stop: Arc<Stop>,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

impl WorkerHandle {
    /// Spawns `body` with a fresh stop signal, filtered by the kind's `list` (its seccomp
    /// allowlist) before it runs.
    pub fn spawn(
        list: &'static crate::sandbox::Allow,
        name: String,
        body: impl FnOnce(Arc<Stop>) + Send + 'static,
    ) -> Result<WorkerHandle, ActivateError> {
        let stop = Arc::new(Stop::new().map_err(|e| ActivateError(format!("eventfd: {e}")))?);
        let s2 = stop.clone();
        let thread = crate::sandbox::spawn(list, true, name, move || body(s2))
            .map_err(|e| ActivateError(format!("cannot start the device thread: {e}")))?;
        Ok(WorkerHandle {
            stop,
            thread: Some(thread),
        })
    }

    /// Asks the thread to stop; does not wait.
    pub fn signal(&self) {
        self.stop.request();
    }

    /// Whether the thread has ended (then joining it does not wait).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Asks the thread to stop and waits for it, at most [`JOIN_LIMIT`]; a thread still
    /// running then is left to end on its own (and said so). Never called holding a bus lock.
    pub fn stop(&mut self) {
        self.signal();
        let Some(t) = self.thread.take() else { return };
        debug_assert!(
            t.is_finished() || !crate::sync::holds(crate::sync::Rank::Bus),
            "waiting for a device worker while holding a bus lock"
        );
        let until = std::time::Instant::now() + JOIN_LIMIT;
        while !t.is_finished() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            log::warn!(
                "device worker {} did not stop within {JOIN_LIMIT:?}; left to end on its own",
                t.thread().name().unwrap_or("?")
            );
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A device's worker across resets: the running one, and those asked to stop that are still
/// finishing their batch. [`VirtioDevice::reset`] moves the running worker to the stopping ones
/// without waiting; [`VirtioDevice::quiesced`] says when they are all gone.
#[derive(Debug, Default)]
pub struct WorkerSlot {
    running: Option<WorkerHandle>,
    stopping: Vec<WorkerHandle>,
}

impl WorkerSlot {
    /// Runs `w` in the slot. A worker still there (a transport that did not wait for
    /// [`WorkerSlot::quiesced`]) is stopped first, so two workers never serve one ring.
    pub fn start(&mut self, w: WorkerHandle) {
        self.stop_all();
        self.running = Some(w);
    }

    /// Asks the running worker to stop; does not wait.
    pub fn reset(&mut self) {
        if let Some(w) = self.running.take() {
            w.signal();
            self.stopping.push(w);
        }
    }

    /// Whether every worker asked to stop has ended (those are then joined, without waiting).
    pub fn quiesced(&mut self) -> bool {
        self.stopping.retain(|w| !w.finished());
        self.stopping.is_empty()
    }

    /// Stops every worker and waits for them (device teardown, never under a bus lock).
    pub fn stop_all(&mut self) {
        self.reset();
        for mut w in self.stopping.drain(..) {
            w.stop();
        }
    }
}

/// Drains a kick eventfd (the count is irrelevant).
pub fn drain(evt: &EventFd) {
    let _ = evt.read();
}

/// Whether the driver broke the ring: its available index runs more than a queue's worth ahead
/// of the device, or cannot be read. Such a queue is not served again until a reset.
pub fn ring_broken<M: vm_memory::GuestMemory>(queue: &Queue, mem: &M) -> bool {
    match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(avail) => (avail - std::num::Wrapping(queue.next_avail())).0 > queue.size(),
        Err(_) => true,
    }
}

/// Serves a queue until it is drained or `stop` says so: `serve` handles at most a batch
/// ([`BUDGET`]) of what is available and says whether it used anything; notifications are
/// re-enabled and re-checked (EVENT_IDX) so no request is missed. Returns false when the ring
/// is broken (see [`ring_broken`]) or requests are announced that cannot be taken; the caller
/// then stops serving the queue and asks for a reset. After a stop, requests may be left: the
/// next activation serves them.
pub fn serve_queue<M: vm_memory::GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    irq: &dyn Irq,
    stop: &dyn Fn() -> bool,
    mut serve: impl FnMut(&mut Queue) -> bool,
) -> bool {
    loop {
        if stop() {
            return true;
        }
        let _ = queue.disable_notification(mem);
        let used = serve(queue);
        if used {
            match queue.needs_notification(mem) {
                Ok(false) => {}
                _ => irq.trigger(),
            }
        }
        if ring_broken(queue, mem) {
            return false;
        }
        if !queue.enable_notification(mem).unwrap_or(false) {
            return true;
        }
        if !used {
            // More is announced, yet nothing could be taken: a bad head index.
            return false;
        }
    }
}

/// Signals the queue's interrupt if the driver wants one (EVENT_IDX aware).
pub fn notify(queue: &mut Queue, mem: &GuestMem, irq: &dyn Irq) {
    match queue.needs_notification(mem) {
        Ok(true) => irq.trigger(),
        Ok(false) => {}
        // A broken ring: interrupt anyway, the driver will find out.
        Err(_) => irq.trigger(),
    }
}

/// Helpers for device unit tests: guest memory, descriptors and mock queues.
#[cfg(test)]
pub mod testing {
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::GuestAddress;

    use super::GuestMem;

    pub const NEXT: u16 = 1;
    pub const WRITE: u16 = 2;

    /// 1 MiB of guest memory: rings at the bottom, buffers from 0x10000.
    pub fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// A descriptor (the mock sets NEXT and next for chains it builds).
    pub fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    /// A descriptor with explicit flags and next (for loops and broken chains).
    pub fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }
}
