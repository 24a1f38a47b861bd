//! What every virtio device model implements, independent of the transport (virtio 1.2
//! sections 2–3). A model gets guest memory, its queues (with their kick eventfds and interrupt
//! handles) and a configuration-change interrupt; it never sees PCI, BARs or MSI-X.
//!
//! The request handling of each model is a plain function over a `virtio_queue::Queue` and guest
//! memory, so the same code runs in vmm's worker threads and in `vmm device` (vhost-user).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::Irq;

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
pub struct ActiveQueue {
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
pub trait NeedsReset: Send + Sync {
    fn needs_reset(&self, why: &str);
}

/// Everything a device gets when the driver sets DRIVER_OK.
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
pub trait VirtioDevice: Send {
    /// virtio device type (section 5).
    fn device_type(&self) -> u16;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Offered features, VIRTIO_F_VERSION_1 included.
    fn features(&self) -> u64;
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (most devices ignore writes).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts processing; called once per DRIVER_OK.
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError>;
    /// Stops processing and forgets the queues (driver reset). Must not block for long.
    fn reset(&mut self);
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

/// The event loop of a device worker: a stop eventfd plus the fds the device waits on.
pub struct Worker {
    epoll: Epoll,
    pub stop: Arc<EventFd>,
}

/// Token of the stop event in [`Worker::wait`].
pub const STOP_TOKEN: u64 = u64::MAX;

impl Worker {
    pub fn new(stop: Arc<EventFd>) -> std::io::Result<Worker> {
        let w = Worker {
            epoll: Epoll::new()?,
            stop,
        };
        w.add(w.stop.as_raw_fd(), STOP_TOKEN)?;
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

/// A started worker thread and its stop signal.
pub struct WorkerHandle {
    pub stop: Arc<EventFd>,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

impl WorkerHandle {
    /// Spawns `body` with a fresh stop eventfd.
    pub fn spawn(
        name: String,
        body: impl FnOnce(Arc<EventFd>) + Send + 'static,
    ) -> Result<WorkerHandle, ActivateError> {
        let stop = Arc::new(
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| ActivateError(format!("eventfd: {e}")))?,
        );
        let s2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || body(s2))
            .map_err(|e| ActivateError(format!("cannot start the device thread: {e}")))?;
        Ok(WorkerHandle {
            stop,
            thread: Some(thread),
        })
    }

    /// Asks the thread to stop and waits for it.
    pub fn stop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.stop();
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

/// Serves a queue until it is drained: `serve` handles what is available and says whether it
/// used anything; notifications are re-enabled and re-checked (EVENT_IDX) so no request is
/// missed. Returns false when the ring is broken (see [`ring_broken`]) or requests are announced
/// that cannot be taken; the caller then stops serving the queue and asks for a reset.
pub fn serve_queue<M: vm_memory::GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    irq: &dyn Irq,
    mut serve: impl FnMut(&mut Queue) -> bool,
) -> bool {
    loop {
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
