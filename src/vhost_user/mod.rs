//! `vmm device <kind> --socket PATH`: vmm's device models served as vhost-user backends, so
//! another VMM (QEMU's `vhost-user-<kind>-pci` or `-netdev vhost-user`, Cloud Hypervisor …) can
//! use them. The request handling is the very code the in-VMM devices run
//! (`devices::<kind>::process`, `net::rx`/`net::tx`, `console::receive`/`transmit` …); only the
//! queue plumbing comes from the vhost-user-backend crate.
//!
//! Each kind's served model lives in its own file (`devices/<kind>`, implementing
//! [`Served`]); this module is the daemon: the vhost-user-backend crate's backend around a
//! model, the guest memory check, and [`relay`] for QEMU's early ring enables.
//!
//! One thread serves all queues of a device. A front end that breaks a ring gets that queue
//! left alone until it resets the device; nothing it sends panics the backend.

pub mod cli;
mod relay;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use crate::hw::served::{Ctx, GuestMem, Listeners, Mem, ServeError, Served, Vring};
use crate::sync::{Mutex, Rank};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringEpollHandler};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

/// The daemon's event loop as [`Listeners`]. Weak: the handler holds the backend, so a
/// strong reference here would keep both alive after the daemon is gone (a cycle the
/// vhost_user fuzz target's leak check found).
struct EpollListeners {
    handler: OnceLock<Weak<VringEpollHandler<Arc<Backend>>>>,
}

impl std::fmt::Debug for EpollListeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpollListeners")
            .field(
                "running",
                &self.handler.get().is_some_and(|h| h.strong_count() > 0),
            )
            .finish()
    }
}

impl Listeners for EpollListeners {
    fn add(&self, fd: RawFd, event: u16) -> std::io::Result<()> {
        match self.handler.get().and_then(Weak::upgrade) {
            Some(h) => h.register_listener(fd, EventSet::IN, u64::from(event)),
            None => Err(std::io::Error::other("the event loop is not running")),
        }
    }
    fn remove(&self, fd: RawFd, event: u16) -> std::io::Result<()> {
        match self.handler.get().and_then(Weak::upgrade) {
            Some(h) => h.unregister_listener(fd, EventSet::IN, u64::from(event)),
            None => Err(std::io::Error::other("the event loop is not running")),
        }
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
#[derive(Debug)]
pub struct Backend {
    /// The kind's key, for logs.
    name: &'static str,
    model: Box<dyn Served>,
    /// `--allow-unsealed-memory`: trust the front end not to shrink guest memory.
    unsealed_ok: bool,
    mem: Mutex<Option<Mem>>,
    event_idx: AtomicBool,
    exit: (EventConsumer, EventNotifier),
    /// The exit-event consumers lent to the daemon's event loops. vhost-user-backend 0.24
    /// registers each with `into_raw_fd` and never closes it (one descriptor per daemon); they
    /// are closed once the daemon is gone ([`LentFds`]).
    lent: Mutex<Vec<RawFd>>,
    listeners: EpollListeners,
}

/// Closes the descriptors the daemon leaks ([`Backend::lent`]) when dropped: declared before
/// the daemon in [`serve`], so it runs after the daemon (and its event loops) are gone.
struct LentFds(Arc<Backend>);

impl Drop for LentFds {
    fn drop(&mut self) {
        for fd in self.0.lent.lock().drain(..) {
            // SAFETY: a descriptor the daemon took ownership of and dropped without closing;
            // its event loop (the epoll set it was in) no longer exists.
            drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        }
    }
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.model.virtio().queues())
    }
    fn max_queue_size(&self) -> usize {
        let sizes = &self.model.virtio().queue_sizes;
        usize::from(sizes.iter().copied().max().unwrap_or(256))
    }
    fn features(&self) -> u64 {
        self.model.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn acked_features(&self, features: u64) {
        log::debug!("vhost-user {}: features {features:#x}", self.name);
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
        crate::hw::virtio::read_config_bytes(&self.model.config(), u64::from(offset), &mut out);
        out
    }
    fn update_memory(&self, mem: Mem) -> std::io::Result<()> {
        if !self.unsealed_ok
            && let Err(why) = check_sealed(&mem.memory())
        {
            log::error!("vhost-user {}: {why}", self.name);
            return Err(std::io::Error::other(why));
        }
        *self.mem.lock() = Some(mem);
        Ok(())
    }
    fn exit_event(&self, _thread: usize) -> Option<(EventConsumer, EventNotifier)> {
        use std::os::fd::AsRawFd;
        let consumer = self.exit.0.try_clone().ok()?;
        let notifier = self.exit.1.try_clone().ok()?;
        self.lent.lock().push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread: usize,
    ) -> std::io::Result<()> {
        log::trace!("vhost-user {}: event {device_event} ({evset:?})", self.name);
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
    name: &'static str,
    model: Box<dyn Served>,
    socket: &std::path::Path,
    unsealed_ok: bool,
) -> Result<(), ServeError> {
    let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK)
        .map_err(|e| ServeError::Daemon(format!("eventfd: {e}")))?;
    let backend = Arc::new(Backend {
        name,
        model,
        unsealed_ok,
        mem: Mutex::new(Rank::Leaf, None),
        event_idx: AtomicBool::new(false),
        exit,
        lent: Mutex::new(Rank::Leaf, Vec::new()),
        listeners: EpollListeners {
            handler: OnceLock::new(),
        },
    });
    let _lent = LentFds(backend.clone());
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new(format!("vmm-{name}"), backend.clone(), mem)
        .map_err(|e| ServeError::Daemon(format!("cannot start: {e}")))?;
    if let Some(h) = daemon.get_epoll_handlers().into_iter().next() {
        let _ = backend.listeners.handler.set(Arc::downgrade(&h));
    }
    backend.model.start(&backend.listeners)?;
    log::info!("serving {name} on {}", socket.display());
    if backend.model.relay_early_enables() {
        serve_relayed(
            &mut daemon,
            socket,
            u32::from(backend.model.virtio().queues()),
        )?;
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
    crate::sandbox::owner_only_socket(socket).map_err(|e| err("socket mode", e))?;
    let front = loop {
        let (front, _) = listener
            .accept()
            .map_err(|e| err("accepting the front end", e))?;
        match crate::sandbox::peer_uid(&front) {
            Some(uid) if crate::sandbox::uid_may_connect(uid) => break front,
            uid => log::warn!("refused a front end of uid {uid:?} (not root or the owner)"),
        }
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A model that counts its drops.
    #[derive(Debug)]
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    impl Served for Counted {
        fn virtio(&self) -> &'static crate::contract::VirtioInfo {
            &crate::devices::rng::VIRTIO
        }
        fn features(&self) -> u64 {
            crate::hw::virtio::VIRTIO_F_VERSION_1
        }
        fn handle(&self, _event: u16, _cx: &Ctx<'_>) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_model_is_dropped_once_the_front_end_hangs_up() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("b.sock");
        let drops = Arc::new(AtomicUsize::new(0));
        let model = Box::new(Counted(drops.clone()));
        let path = socket.clone();
        let server = std::thread::spawn(move || serve("rng", model, &path, false));
        let front = loop {
            match std::os::unix::net::UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        };
        // GET_FEATURES, answered, then the front end goes away.
        use std::io::{Read, Write};
        let mut msg = Vec::new();
        for v in [1u32, 1, 0] {
            msg.extend(v.to_le_bytes());
        }
        (&front).write_all(&msg).unwrap();
        let mut reply = [0u8; 20];
        (&front).read_exact(&mut reply).unwrap();
        assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 1);
        drop(front);
        server.join().unwrap().unwrap();
        assert_eq!(
            drops.load(Ordering::SeqCst),
            1,
            "serve kept its model alive"
        );
    }
}
