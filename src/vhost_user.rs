//! `vmm device <kind> --socket PATH`: vmm's device models served as vhost-user backends, so
//! another VMM (QEMU's `vhost-user-<kind>-pci`, Cloud Hypervisor …) can use them. The request
//! handling is the very code the in-VMM devices run (`devices::<kind>::process` etc.); only the
//! queue plumbing comes from the vhost-user-backend crate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

use crate::devices::block::{self, Disk};
use crate::devices::rng::{self, RateLimit};

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Device(String),
    #[error("vhost-user: {0}")]
    Daemon(String),
}

/// A device model as the backend runs it.
pub enum Model {
    Block { disk: Disk, config: [u8; 60] },
    Rng { limit: Mutex<Option<RateLimit>> },
}

impl Model {
    pub fn block(disk: Disk) -> Model {
        Model::Block {
            config: block::config_bytes(&disk),
            disk,
        }
    }
    pub fn rng(rate: Option<u64>) -> Model {
        Model::Rng {
            limit: Mutex::new(rate.map(RateLimit::new)),
        }
    }
    fn name(&self) -> &'static str {
        match self {
            Model::Block { .. } => "block",
            Model::Rng { .. } => "rng",
        }
    }
    fn queues(&self) -> usize {
        1
    }
    fn features(&self) -> u64 {
        match self {
            Model::Block { disk, .. } => block::features(disk),
            Model::Rng { .. } => crate::devices::virtio::VIRTIO_F_VERSION_1,
        }
    }
    fn config(&self) -> &[u8] {
        match self {
            Model::Block { config, .. } => config,
            Model::Rng { .. } => &[],
        }
    }
    /// Serves queue `q`; returns whether anything was used.
    fn process(&self, q: &mut virtio_queue::Queue, mem: &GuestMemoryMmap<()>) -> bool {
        match self {
            Model::Block { disk, .. } => block::process(q, mem, disk),
            Model::Rng { limit } => {
                let mut l = limit.lock().unwrap_or_else(|e| e.into_inner());
                rng::fill(q, mem, l.as_mut())
            }
        }
    }
}

/// Interrupts are raised by the vring (`signal_used_queue`), not by the shared loop.
struct NoIrq;

impl crate::devices::Irq for NoIrq {
    fn trigger(&self) {}
}

struct Backend {
    model: Model,
    mem: Mutex<Option<Mem>>,
    event_idx: AtomicBool,
    exit: (EventConsumer, EventNotifier),
}

impl VhostUserBackend for Backend {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        self.model.queues()
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        self.model.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK
    }
    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::SeqCst);
    }
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut out = vec![0u8; size as usize];
        crate::devices::virtio::read_config_bytes(self.model.config(), u64::from(offset), &mut out);
        out
    }
    fn update_memory(&self, mem: Mem) -> std::io::Result<()> {
        *self.mem.lock().unwrap_or_else(|e| e.into_inner()) = Some(mem);
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
        if evset != EventSet::IN {
            return Ok(());
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            return Ok(());
        };
        let Some(mem) = self.mem.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        let mem = mem.memory();
        let event_idx = self.event_idx.load(Ordering::SeqCst);
        let mut state = vring.get_mut();
        if !event_idx {
            if self.model.process(state.get_queue_mut(), &mem) {
                state.signal_used_queue()?;
            }
            return Ok(());
        }
        // Same loop as the in-VMM workers; a broken ring is left alone (the front end resets).
        let mut used_any = false;
        let ok = crate::devices::virtio::serve_queue(state.get_queue_mut(), &*mem, &NoIrq, |q| {
            let u = self.model.process(q, &mem);
            used_any |= u;
            u
        });
        if used_any {
            state.signal_used_queue()?;
        }
        if !ok {
            log::warn!(
                "vhost-user: the front end broke queue {device_event}; not serving it until a reset"
            );
        }
        Ok(())
    }
}

/// Serves `model` on the vhost-user socket at `socket` until the front end disconnects.
pub fn serve(model: Model, socket: &std::path::Path) -> Result<(), ServeError> {
    let name = model.name();
    let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK)
        .map_err(|e| ServeError::Daemon(format!("eventfd: {e}")))?;
    let backend = Arc::new(Backend {
        model,
        mem: Mutex::new(None),
        event_idx: AtomicBool::new(false),
        exit,
    });
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new(format!("vmm-{name}"), backend, mem)
        .map_err(|e| ServeError::Daemon(format!("cannot start: {e}")))?;
    log::info!("serving {name} on {}", socket.display());
    eprintln!("vmm device {name}: listening on {}", socket.display());
    daemon
        .serve(socket)
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
    log::info!("{name}: the front end disconnected");
    Ok(())
}
