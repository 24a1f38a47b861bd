//! `vmm device <kind> --socket PATH`: vmm's device models served as vhost-user backends, so
//! another VMM (QEMU's `vhost-user-<kind>-pci` or `-netdev vhost-user`, Cloud Hypervisor …) can
//! use them. The request handling is the very code the in-VMM devices run
//! (`devices::<kind>::process`, `net::rx`/`net::tx`, `console::receive`/`transmit` …); only the
//! queue plumbing comes from the vhost-user-backend crate.
//!
//! | file         | what                                                             |
//! |--------------|------------------------------------------------------------------|
//! | `mod.rs`     | the daemon, the [`Served`] trait every model implements, block, rng |
//! | `net.rs`     | virtio-net on a TAP (the TAP is an extra event source)            |
//! | `console.rs` | virtio-console on stdio, a file or a socket                      |
//!
//! One thread serves all queues of a device. A front end that breaks a ring gets that queue
//! left alone until it resets the device; nothing it sends panics the backend.

mod console;
mod net;
mod relay;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::devices::virtio::BUDGET;
use crate::sync::{Mutex, Rank};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{
    VhostUserBackend, VhostUserDaemon, VringEpollHandler, VringRwLock, VringState, VringT,
};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::devices::block::{self, Disk};
use crate::devices::rng::{self, RateLimit};

pub use console::ConsoleModel;
pub use net::NetModel;

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type Vring = VringRwLock<Mem>;
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
pub struct Listeners {
    handler: OnceLock<Arc<VringEpollHandler<Arc<Backend>>>>,
}

impl Listeners {
    pub fn add(&self, fd: RawFd, event: u16) -> std::io::Result<()> {
        match self.handler.get() {
            Some(h) => h.register_listener(fd, EventSet::IN, u64::from(event)),
            None => Err(std::io::Error::other("the event loop is not running")),
        }
    }
    pub fn remove(&self, fd: RawFd, event: u16) -> std::io::Result<()> {
        match self.handler.get() {
            Some(h) => h.unregister_listener(fd, EventSet::IN, u64::from(event)),
            None => Err(std::io::Error::other("the event loop is not running")),
        }
    }
}

/// What a handler gets for one event: the queues, guest memory and the listeners.
pub struct Ctx<'a> {
    pub vrings: &'a [Vring],
    pub mem: &'a GuestMem,
    /// Whether the front end negotiated VIRTIO_F_RING_EVENT_IDX.
    pub event_idx: bool,
    pub listeners: &'a Listeners,
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
pub trait Served: Send + Sync {
    /// The `vmm device` kind ("block", "net" …), for logs.
    fn name(&self) -> &'static str;
    fn num_queues(&self) -> usize;
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
    /// Whether the front end's requests pass through [`relay`] (drops SET_VRING_ENABLE sent
    /// before SET_FEATURES, as QEMU's virtio-net does).
    fn relay_early_enables(&self) -> bool {
        false
    }
    /// Called once the event loop runs: register extra event sources here.
    fn start(&self, _listeners: &Listeners) -> Result<(), ServeError> {
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
fn serve_simple(
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
    let ok =
        crate::devices::virtio::serve_queue(state.get_queue_mut(), mem, &NoIrq, &|| false, |q| {
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
struct NoIrq;

impl crate::devices::Irq for NoIrq {
    fn trigger(&self) {}
}

/// virtio-blk on a raw image.
pub struct BlockModel {
    disk: Disk,
    config: [u8; 60],
}

impl BlockModel {
    pub fn new(disk: Disk) -> BlockModel {
        BlockModel {
            config: block::config_bytes(&disk),
            disk,
        }
    }
}

impl Served for BlockModel {
    fn name(&self) -> &'static str {
        "block"
    }
    fn num_queues(&self) -> usize {
        1
    }
    fn features(&self) -> u64 {
        block::features(&self.disk)
    }
    fn config(&self) -> Vec<u8> {
        self.config.to_vec()
    }
    fn handle(&self, event: u16, cx: &Ctx<'_>) -> std::io::Result<()> {
        match cx.vrings.get(usize::from(event)) {
            Some(v) => serve_simple(v, cx.mem, cx.event_idx, event, |q| {
                block::process(q, cx.mem, &self.disk, BUDGET)
            }),
            None => Ok(()),
        }
    }
    fn reset(&self) {
        // A flush that failed fails every later one only until the driver starts over.
        self.disk.reset();
    }
}

/// virtio-rng from getrandom, optionally rate-limited.
pub struct RngModel {
    limit: Mutex<Option<RateLimit>>,
}

impl RngModel {
    pub fn new(rate: Option<u64>) -> RngModel {
        RngModel {
            limit: Mutex::new(Rank::Leaf, rate.map(RateLimit::new)),
        }
    }
}

impl Served for RngModel {
    fn name(&self) -> &'static str {
        "rng"
    }
    fn num_queues(&self) -> usize {
        1
    }
    fn features(&self) -> u64 {
        crate::devices::virtio::VIRTIO_F_VERSION_1
    }
    fn handle(&self, event: u16, cx: &Ctx<'_>) -> std::io::Result<()> {
        let Some(v) = cx.vrings.get(usize::from(event)) else {
            return Ok(());
        };
        let mut l = self.limit.lock();
        serve_simple(v, cx.mem, cx.event_idx, event, |q| {
            rng::fill(q, cx.mem, l.as_mut(), BUDGET)
        })
    }
}

/// Refuses guest memory the front end could shrink under the backend: every region must be
/// a file sealed against shrinking (F_SEAL_SHRINK: QEMU's memory-backend-memfd seals by
/// default) and cover the region. A front end that truncates an unsealed file would make the
/// backend's next access to the region fault with SIGBUS, which kills it.
fn check_sealed(mem: &GuestMem) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for r in mem.iter() {
        let at = r.start_addr().0;
        let Some(fo) = r.file_offset() else {
            return Err(format!("guest memory at {at:#x} has no file"));
        };
        // SAFETY: fcntl(F_GET_SEALS) on a descriptor the region owns; EINVAL if not a memfd.
        let seals = unsafe { libc::fcntl(fo.file().as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(format!(
                "the front end's guest memory at {at:#x} is not sealed against shrinking: a \
                 front end that truncated it would crash this backend. Give the VM a sealed \
                 memfd (QEMU: -object memory-backend-memfd,share=on, which seals by default), \
                 or start vmm device with --allow-unsealed-memory if you trust the front end"
            ));
        }
        let size = fo.file().metadata().map(|m| m.len()).unwrap_or(0);
        if size < fo.start().saturating_add(r.len()) {
            return Err(format!(
                "the front end's guest memory at {at:#x} ends past the end of its file \
                 ({size} bytes)"
            ));
        }
    }
    Ok(())
}

/// The vhost-user-backend side of a [`Served`] model.
pub struct Backend {
    model: Box<dyn Served>,
    /// `--allow-unsealed-memory`: trust the front end not to shrink guest memory.
    unsealed_ok: bool,
    mem: Mutex<Option<Mem>>,
    event_idx: AtomicBool,
    exit: (EventConsumer, EventNotifier),
    listeners: Listeners,
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.model.num_queues()
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        self.model.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn acked_features(&self, features: u64) {
        log::debug!("vhost-user {}: features {features:#x}", self.model.name());
        self.model.acked_features(features);
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.model.protocol_features()
    }
    fn reset_device(&self) {
        self.model.reset();
    }
    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::SeqCst);
    }
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut out = vec![0u8; size as usize];
        crate::devices::virtio::read_config_bytes(
            &self.model.config(),
            u64::from(offset),
            &mut out,
        );
        out
    }
    fn update_memory(&self, mem: Mem) -> std::io::Result<()> {
        if !self.unsealed_ok
            && let Err(why) = check_sealed(&mem.memory())
        {
            log::error!("vhost-user {}: {why}", self.model.name());
            return Err(std::io::Error::other(why));
        }
        *self.mem.lock() = Some(mem);
        Ok(())
    }
    fn exit_event(&self, _thread: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread: usize,
    ) -> std::io::Result<()> {
        log::trace!(
            "vhost-user {}: event {device_event} ({evset:?})",
            self.model.name()
        );
        if !evset.contains(EventSet::IN) {
            return Ok(());
        }
        let Some(mem) = self.mem.lock().clone() else {
            return Ok(());
        };
        let mem = mem.memory();
        let cx = Ctx {
            vrings,
            mem: &mem,
            event_idx: self.event_idx.load(Ordering::SeqCst),
            listeners: &self.listeners,
        };
        self.model.handle(device_event, &cx)
    }
}

/// Serves `model` on the vhost-user socket at `socket` until the front end disconnects.
pub fn serve(
    model: Box<dyn Served>,
    socket: &std::path::Path,
    unsealed_ok: bool,
) -> Result<(), ServeError> {
    let name = model.name();
    let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK)
        .map_err(|e| ServeError::Daemon(format!("eventfd: {e}")))?;
    let backend = Arc::new(Backend {
        model,
        unsealed_ok,
        mem: Mutex::new(Rank::Leaf, None),
        event_idx: AtomicBool::new(false),
        exit,
        listeners: Listeners {
            handler: OnceLock::new(),
        },
    });
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new(format!("vmm-{name}"), backend.clone(), mem)
        .map_err(|e| ServeError::Daemon(format!("cannot start: {e}")))?;
    if let Some(h) = daemon.get_epoll_handlers().into_iter().next() {
        let _ = backend.listeners.handler.set(h);
    }
    backend.model.start(&backend.listeners)?;
    log::info!("serving {name} on {}", socket.display());
    eprintln!("vmm device {name}: listening on {}", socket.display());
    if backend.model.relay_early_enables() {
        serve_relayed(&mut daemon, socket, backend.model.num_queues() as u32)?;
    } else {
        daemon
            .serve(socket)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
    }
    log::info!("{name}: the front end disconnected");
    Ok(())
}

/// Like `VhostUserDaemon::serve`, with [`relay`] between the front end and the daemon: the
/// front end connects to `socket`, the daemon to a socket in a private directory.
fn serve_relayed(
    daemon: &mut VhostUserDaemon<Arc<Backend>>,
    socket: &std::path::Path,
    queues: u32,
) -> Result<(), ServeError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
    use std::os::unix::net::{UnixListener, UnixStream};
    let err = |what: &str, e: std::io::Error| ServeError::Daemon(format!("{what}: {e}"));
    if std::fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(socket);
    }
    let listener = UnixListener::bind(socket)
        .map_err(|e| err(&format!("cannot listen on {}", socket.display()), e))?;
    let (front, _) = listener
        .accept()
        .map_err(|e| err("accepting the front end", e))?;
    drop(listener);
    let _ = std::fs::remove_file(socket);
    // The daemon's end: a socket only this user can reach, gone once connected.
    let dir = std::env::temp_dir().join(format!(
        "vmm-device-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| err(&format!("cannot create {}", dir.display()), e))?;
    let inner = dir.join("backend.sock");
    let cleanup = |r: Result<(), ServeError>| {
        let _ = std::fs::remove_file(&inner);
        let _ = std::fs::remove_dir(&dir);
        r
    };
    let internal = match UnixListener::bind(&inner) {
        Ok(l) => l,
        Err(e) => return cleanup(Err(err("internal socket", e))),
    };
    let back = match UnixStream::connect(&inner) {
        Ok(s) => s,
        Err(e) => return cleanup(Err(err("internal socket", e))),
    };
    let relay = std::thread::Builder::new()
        .name("vhost-user-relay".into())
        .spawn(move || relay::run(front, back, queues))
        .map_err(|e| err("cannot start the relay", e));
    let relay = match relay {
        Ok(r) => r,
        Err(e) => return cleanup(Err(e)),
    };
    let mut l = vhost::vhost_user::Listener::from(internal);
    let started = daemon
        .start(&mut l)
        .map_err(|e| ServeError::Daemon(e.to_string()));
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&dir);
    started?;
    let result = daemon.wait();
    if let Ok(Err(e)) = relay.join() {
        log::debug!("vhost-user relay: {e}");
    }
    match result {
        Ok(()) => Ok(()),
        // The front end hung up (as `serve` treats it).
        Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(ServeError::Daemon(e.to_string())),
    }
}
