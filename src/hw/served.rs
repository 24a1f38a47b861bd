//! What a device model implements to be served as a vhost-user backend (`vmm device <kind>`):
//! the [`Served`] trait, the context a handler gets, and the queue loop models share. The
//! daemon around it (the vhost-user-backend crate, socket, memory checks) is
//! the `vhost_user` module (above the devices); a kind's `Served` model lives in its own file, next to the in-VM model
//! whose request code it runs.

use std::os::fd::RawFd;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VringRwLock, VringState, VringT};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::hw::virtio::BUDGET;

pub type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
pub type Vring = VringRwLock<Mem>;
/// A locked queue.
pub type VringGuard<'a> = std::sync::RwLockWriteGuard<'a, VringState<Mem>>;
/// The guest memory as the models see it.
pub type GuestMem = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Device(String),
    #[error("vhost-user: {0}")]
    Daemon(String),
}

/// Registers and unregisters the extra fds a model waits on (a TAP, an input eventfd) in the
/// daemon's event loop. Event numbers must be above the model's number of queues.
pub trait Listeners: Send + Sync + std::fmt::Debug {
    fn add(&self, fd: RawFd, event: u16) -> std::io::Result<()>;
    fn remove(&self, fd: RawFd, event: u16) -> std::io::Result<()>;
}

/// What a handler gets for one event: the queues, guest memory and the listeners.
pub struct Ctx<'a> {
    pub vrings: &'a [Vring],
    pub mem: &'a GuestMem,
    /// Whether the front end negotiated VIRTIO_F_RING_EVENT_IDX.
    pub event_idx: bool,
    pub listeners: &'a dyn Listeners,
}

impl std::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("vrings", &self.vrings.len())
            .field("event_idx", &self.event_idx)
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

impl Ctx<'_> {
    /// The state of queue `i` (locked for the duration of the guard).
    pub fn vring(&self, i: usize) -> Option<VringGuard<'_>> {
        self.vrings.get(i).map(|v| v.get_mut())
    }
}

/// Signals the front end that queue `state` used buffers, if the driver wants to know
/// (EVENT_IDX aware; a broken ring is signalled anyway).
pub fn signal(state: &mut VringGuard<'_>) -> std::io::Result<()> {
    if state.needs_notification().unwrap_or(true) {
        state.signal_used_queue()?;
    }
    Ok(())
}

/// A device model as a vhost-user backend serves it.
pub trait Served: Send + Sync + std::fmt::Debug {
    /// What the device is (its queues are served; declared once per kind).
    fn virtio(&self) -> &'static crate::contract::VirtioInfo;
    /// Offered virtio features (VERSION_1 included).
    fn features(&self) -> u64;
    /// The device configuration space.
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    /// The front end's feature choice (called before the queues start).
    fn acked_features(&self, _features: u64) {}
    /// The vhost-user protocol features offered (with VHOST_USER_F_PROTOCOL_FEATURES).
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK
    }
    /// Whether the front end's requests pass through `vhost_user::relay` (drops SET_VRING_ENABLE sent
    /// before SET_FEATURES, as QEMU's virtio-net does).
    fn relay_early_enables(&self) -> bool {
        false
    }
    /// Called once the event loop runs: register extra event sources here.
    fn start(&self, _listeners: &dyn Listeners) -> Result<(), ServeError> {
        Ok(())
    }
    /// Handles event `event`: a queue's kick (0 .. num_queues) or an extra event source.
    fn handle(&self, event: u16, cx: &Ctx<'_>) -> std::io::Result<()>;
    /// The front end reset the device or stopped its queues.
    fn reset(&self) {}
}

/// Serves one queue with a request function the in-VMM device shares: `process` handles a
/// batch (at most [`BUDGET`]) of what is available and says how many it used. With EVENT_IDX
/// the loop of the in-VMM workers runs (no request missed); a broken ring is left alone until
/// a reset.
pub fn serve_simple(
    vring: &Vring,
    mem: &GuestMem,
    event_idx: bool,
    queue: u16,
    mut process: impl FnMut(&mut virtio_queue::Queue) -> usize,
) -> std::io::Result<()> {
    let mut state = vring.get_mut();
    if !event_idx {
        let mut used_any = false;
        loop {
            let n = process(state.get_queue_mut());
            used_any |= n > 0;
            if n < BUDGET {
                break;
            }
        }
        if used_any {
            state.signal_used_queue()?;
        }
        return Ok(());
    }
    let mut used_any = false;
    let ok = crate::hw::virtio::serve_queue(state.get_queue_mut(), mem, &NoIrq, &|| false, |q| {
        let u = process(q) > 0;
        used_any |= u;
        u
    });
    if used_any {
        state.signal_used_queue()?;
    }
    if !ok {
        log::warn!("vhost-user: the front end broke queue {queue}; not serving it until a reset");
    }
    Ok(())
}

/// Interrupts are raised by the vring (`signal_used_queue`), not by the shared loop.
#[derive(Debug)]
struct NoIrq;

impl crate::hw::Irq for NoIrq {
    fn trigger(&self) {}
}
