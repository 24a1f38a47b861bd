//! The vhost-user front end (QEMU `docs/interop/vhost-user.rst`), built on the vhost crate's
//! `Frontend`: a [`VirtioDevice`] whose queues a back-end process serves.
//!
//! - **Connect** (when the VM is built, before any vCPU runs): SET_OWNER, GET_FEATURES,
//!   GET/SET_PROTOCOL_FEATURES (MQ, REPLY_ACK, CONFIG, RESET_DEVICE, where offered),
//!   GET_QUEUE_NUM, GET_CONFIG. Every later message asks for an acknowledgement when
//!   REPLY_ACK was agreed, so a back end's refusal is seen where it happens.
//! - **DRIVER_OK** starts a worker thread (never the vCPU: no socket I/O under a bus lock)
//!   that sends SET_FEATURES, SET_MEM_TABLE (the guest RAM memfd), and per queue
//!   SET_VRING_NUM/ADDR/BASE/CALL/KICK/ENABLE, then relays the back end's call eventfds to
//!   the queues' interrupts. Kicks go from the guest to the back end directly (the
//!   transport's ioeventfds).
//! - **Driver reset**: the worker disables each ring, GET_VRING_BASE stops it, RESET_DEVICE
//!   clears the back end's state; the transport reports the reset done once the worker ends.
//! - **A back end that dies or misbehaves** (closes the socket, sends an unrequested message,
//!   does not answer within [`REPLY_TIMEOUT`], refuses a message): the device sets
//!   DEVICE_NEEDS_RESET, vmm logs why, and the VM keeps running. Later activations fail at
//!   once with the same reason.
//!
//! The configuration space is read once at connect and served from that copy (reads come on
//! a vCPU, which must not wait for a socket); driver writes update the copy and are sent by
//! the worker (at the next activation if none runs).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::contract::VirtioInfo;
use crate::hw::virtio::{
    ActivateError, Activation, ActiveQueue, GuestMem, NeedsReset, STOP_TOKEN, VIRTIO_F_VERSION_1,
    VirtioDevice, Worker, WorkerHandle, WorkerSlot, drain, read_config_bytes,
};
use crate::sync::{Mutex, Rank};

/// How long a back end may take to answer one message before vmm gives up on it.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Feature bits passed from the back end to the driver: the device-specific ranges (0–23,
/// 50–63), indirect descriptors, EVENT_IDX and VERSION_1. Not offered: the packed ring, ring
/// reset, notification data, access-platform and SR-IOV (the transport implements none), and
/// bit 30, which is vhost-user's own (VHOST_USER_F_PROTOCOL_FEATURES).
const PASSED_FEATURES: u64 = 0x00ff_ffff | (1 << 28) | (1 << 29) | VIRTIO_F_VERSION_1 | !0 << 50;

/// The protocol features vmm uses when the back end offers them.
fn wanted_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// Why a back end could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("cannot connect to the vhost-user back end at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the vhost-user back end at {path}: {what}")]
    Protocol { path: PathBuf, what: String },
}

impl FrontendError {
    /// Whether nothing listens (so the fix is to start the back end).
    pub fn not_listening(&self) -> bool {
        matches!(self, FrontendError::Connect { .. })
    }
}

/// What the device and its worker share.
#[derive(Debug)]
struct Shared {
    /// The device's name.
    name: String,
    /// For messages: the device's name and the back end's socket.
    label: String,
    /// The configuration space as last read or written.
    config: Mutex<Vec<u8>>,
    /// Driver writes of the configuration space the back end has not been sent yet.
    pending: Mutex<Vec<(u32, Vec<u8>)>>,
    /// Wakes the worker for `pending`.
    pending_evt: EventFd,
    /// Why the back end can no longer be used.
    broken: Mutex<Option<String>>,
    /// The back end's virtio features (bit 30 included when it speaks protocol features).
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
}

impl Shared {
    fn broken(&self) -> Option<String> {
        self.broken.lock().clone()
    }
    fn fail(&self, why: String) {
        log::error!("{}: {why}", self.label);
        self.broken.lock().get_or_insert(why);
    }
    fn protocol_features(&self) -> bool {
        self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }
}

/// A virtio device served by a vhost-user back end.
#[derive(Debug)]
pub struct VhostUserDevice {
    info: VirtioInfo,
    /// Features offered to the driver.
    offered: u64,
    fe: FrontendHandle,
    shared: Arc<Shared>,
    worker: WorkerSlot,
}

/// The vhost crate's `Frontend` (which has no Debug).
#[derive(Clone)]
struct FrontendHandle(Frontend);

impl std::fmt::Debug for FrontendHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Frontend")
    }
}

impl VhostUserDevice {
    /// Connects to the back end at `socket` and negotiates what can be before the guest
    /// runs: features, protocol features, the queue count and `config_len` bytes of
    /// configuration space.
    pub fn connect(
        name: &str,
        socket: &Path,
        info: VirtioInfo,
        config_len: u16,
    ) -> Result<VhostUserDevice, FrontendError> {
        let path = socket.to_path_buf();
        let proto_err = |what: String| FrontendError::Protocol {
            path: path.clone(),
            what,
        };
        let stream = UnixStream::connect(socket).map_err(|source| FrontendError::Connect {
            path: path.clone(),
            source,
        })?;
        for r in [
            stream.set_read_timeout(Some(REPLY_TIMEOUT)),
            stream.set_write_timeout(Some(REPLY_TIMEOUT)),
        ] {
            r.map_err(|e| proto_err(format!("socket timeouts: {e}")))?;
        }
        let queues = info.queues();
        let mut fe = Frontend::from_stream(stream, u64::from(queues));
        let op = |what: &'static str| move |e: vhost::Error| proto_err(format!("{what}: {e}"));
        fe.set_owner().map_err(op("SET_OWNER"))?;
        let features = fe.get_features().map_err(op("GET_FEATURES"))?;
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(proto_err(format!(
                "it offers features {features:#x}, without VIRTIO_F_VERSION_1 (a legacy device): vmm drives modern devices only"
            )));
        }
        let protocol = negotiate_protocol(&mut fe, features, queues).map_err(&proto_err)?;
        let config = read_config(&mut fe, protocol, config_len).map_err(&proto_err)?;
        if config.is_none() {
            log::warn!(
                "vhost-user `{name}`: the back end at {} has no configuration space (no CONFIG protocol feature); the guest reads zeros",
                socket.display()
            );
        }
        let config = config.unwrap_or_else(|| vec![0; usize::from(config_len)]);
        let offered = features & PASSED_FEATURES;
        log::info!(
            "vhost-user `{name}`: {} (type {}, {queues} queues): features {features:#x} (offered {offered:#x}), protocol {:#x}",
            socket.display(),
            info.device_type,
            protocol.bits()
        );
        let pending_evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| proto_err(format!("eventfd: {e}")))?;
        Ok(VhostUserDevice {
            info,
            offered,
            fe: FrontendHandle(fe),
            shared: Arc::new(Shared {
                name: name.to_string(),
                label: format!("vhost-user `{name}` ({})", socket.display()),
                config: Mutex::new(Rank::DeviceState, config),
                pending: Mutex::new(Rank::DeviceState, Vec::new()),
                pending_evt,
                broken: Mutex::new(Rank::DeviceState, None),
                backend_features: features,
                protocol,
            }),
            worker: WorkerSlot::default(),
        })
    }

    /// Why the back end can no longer be used, if it cannot.
    pub fn broken(&self) -> Option<String> {
        self.shared.broken()
    }

    /// The same, for `vmm status` after the device went to the VM.
    pub fn health(&self) -> crate::hw::Health {
        let shared = self.shared.clone();
        Arc::new(move || shared.broken())
    }
}

/// Agrees on the protocol features vmm uses (those the back end offers of
/// `wanted_protocol()`), and checks the back end serves `queues` queues when it says how many.
fn negotiate_protocol(
    fe: &mut Frontend,
    features: u64,
    queues: u16,
) -> Result<VhostUserProtocolFeatures, String> {
    let op = |what: &'static str| move |e: vhost::Error| format!("{what}: {e}");
    let mut protocol = VhostUserProtocolFeatures::empty();
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        let theirs = fe
            .get_protocol_features()
            .map_err(op("GET_PROTOCOL_FEATURES"))?;
        protocol = theirs & wanted_protocol();
        fe.set_protocol_features(protocol)
            .map_err(op("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
    }
    if protocol.contains(VhostUserProtocolFeatures::MQ) {
        let most = fe.get_queue_num().map_err(op("GET_QUEUE_NUM"))?;
        if most < u64::from(queues) {
            return Err(format!(
                "it serves at most {most} queues; the machine file asks for {queues}"
            ));
        }
    }
    Ok(protocol)
}

/// Reads `config_len` bytes of configuration space; `None` when the back end has none
/// to give (no CONFIG protocol feature).
fn read_config(
    fe: &mut Frontend,
    protocol: VhostUserProtocolFeatures,
    config_len: u16,
) -> Result<Option<Vec<u8>>, String> {
    if config_len == 0 {
        return Ok(Some(Vec::new()));
    }
    if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
        return Ok(None);
    }
    let (_, bytes) = fe
        .get_config(
            0,
            u32::from(config_len),
            VhostUserConfigFlags::WRITABLE,
            &vec![0; usize::from(config_len)],
        )
        .map_err(|e| {
            format!("GET_CONFIG of {config_len} bytes: {e} (set `config_size` to what it serves)")
        })?;
    Ok(Some(bytes))
}

impl VirtioDevice for VhostUserDevice {
    fn virtio(&self) -> &VirtioInfo {
        &self.info
    }
    fn features(&self) -> u64 {
        self.offered
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.shared.config.lock(), offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(off) = u32::try_from(offset) else {
            return;
        };
        {
            let mut cfg = self.shared.config.lock();
            let end = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(data.len()));
            match end {
                // Only bytes the configuration space has; a write past it is dropped.
                Some(end) if end <= cfg.len() => cfg[offset as usize..end].copy_from_slice(data),
                _ => return,
            }
        }
        let mut pending = self.shared.pending.lock();
        // A driver that writes without end cannot grow vmm: the oldest writes go first (the
        // copy above already holds the latest bytes, which the last write sends).
        if pending.len() >= 64 {
            pending.remove(0);
        }
        pending.push((off, data.to_vec()));
        drop(pending);
        let _ = self.shared.pending_evt.write(1);
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        if let Some(why) = self.shared.broken() {
            return Err(ActivateError(why));
        }
        let mut regions = Vec::new();
        for r in a.mem.iter() {
            match VhostUserMemoryRegionInfo::from_guest_region(r) {
                Ok(info) => regions.push(info),
                Err(_) => {
                    return Err(ActivateError(
                        "guest RAM is private (vmm up --private-ram): a vhost-user back end cannot map it".into(),
                    ));
                }
            }
        }
        let mut calls = Vec::new();
        for _ in &a.queues {
            calls.push(
                EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|e| ActivateError(format!("eventfd: {e}")))?,
            );
        }
        let session = Session {
            fe: self.fe.0.clone(),
            shared: self.shared.clone(),
            features: a.features
                | (self.shared.backend_features
                    & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()),
            mem: a.mem,
            regions,
            queues: a.queues,
            calls,
            needs_reset: a.needs_reset,
        };
        let name = format!("vu-{}", self.shared.name);
        let w = WorkerHandle::spawn(&super::SECCOMP, name, move |stop| session.run(stop))?;
        self.worker.start(w);
        Ok(())
    }
    fn reset(&mut self) {
        self.worker.reset();
    }
    fn quiesced(&mut self) -> bool {
        self.worker.quiesced()
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        self.worker.stop_all();
    }
}

/// Token of the back end's socket in the worker's wait.
const SOCKET_TOKEN: u64 = u64::MAX - 1;
/// Token of the pending configuration writes.
const CONFIG_TOKEN: u64 = u64::MAX - 2;

/// One activation: what the worker sends and serves until the driver resets the device.
struct Session {
    fe: Frontend,
    shared: Arc<Shared>,
    /// SET_FEATURES: what the driver accepted, plus bit 30 when the back end speaks protocol
    /// features.
    features: u64,
    /// Kept so the memfd behind `regions` stays open while the back end is told about it.
    mem: GuestMem,
    regions: Vec<VhostUserMemoryRegionInfo>,
    queues: Vec<ActiveQueue>,
    calls: Vec<EventFd>,
    needs_reset: Arc<dyn NeedsReset>,
}

impl Session {
    fn run(mut self, stop: Arc<crate::hw::virtio::Stop>) {
        let worker = match Worker::new(stop) {
            Ok(w) => w,
            Err(e) => return self.fail(format!("cannot wait for events: {e}")),
        };
        if let Err(e) = self.start() {
            return self.fail(e);
        }
        let mut watch = vec![
            (self.fe.as_raw_fd(), SOCKET_TOKEN),
            (self.shared.pending_evt.as_raw_fd(), CONFIG_TOKEN),
        ];
        watch.extend(
            self.calls
                .iter()
                .enumerate()
                .map(|(i, c)| (c.as_raw_fd(), i as u64)),
        );
        for (fd, token) in watch {
            if let Err(e) = worker.add(fd, token) {
                return self.fail(format!("cannot wait for events: {e}"));
            }
        }
        loop {
            for token in worker.wait(-1) {
                match token {
                    STOP_TOKEN => return self.stop(),
                    SOCKET_TOKEN => {
                        return self.fail(if self.peer_closed() {
                            "the back end closed the connection".into()
                        } else {
                            "the back end sent a message nobody asked for".into()
                        });
                    }
                    CONFIG_TOKEN => {
                        drain(&self.shared.pending_evt);
                        if let Err(e) = self.send_config() {
                            return self.fail(e);
                        }
                    }
                    i => {
                        if let (Some(c), Some(q)) =
                            (self.calls.get(i as usize), self.queues.get(i as usize))
                        {
                            drain(c);
                            q.irq.trigger();
                        }
                    }
                }
            }
        }
    }

    /// Whether the back end has hung up (rather than sent something).
    fn peer_closed(&self) -> bool {
        let mut b = 0u8;
        // SAFETY: a one-byte peek into a local, on the socket the Frontend owns and keeps open.
        let n = unsafe {
            libc::recv(
                self.fe.as_raw_fd(),
                (&mut b as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n <= 0
    }

    fn fail(&self, why: String) {
        self.shared.fail(why.clone());
        self.needs_reset
            .needs_reset(&format!("{}: {why}", self.shared.label));
    }

    /// Hands the rings to the back end.
    fn start(&mut self) -> Result<(), String> {
        let e = |what: &str| {
            let what = what.to_string();
            move |e: vhost::Error| format!("{what}: {e}")
        };
        self.fe
            .set_features(self.features)
            .map_err(e("SET_FEATURES"))?;
        self.fe
            .set_mem_table(&self.regions)
            .map_err(e("SET_MEM_TABLE"))?;
        self.send_config()?;
        for (q, call) in self.queues.iter().zip(&self.calls) {
            let i = usize::from(q.index);
            let qu = &q.queue;
            let hva = |gpa: u64, what: &str| {
                self.mem
                    .get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|_| format!("queue {i}'s {what} at {gpa:#x} is not in guest RAM"))
            };
            let ring = VringConfigData {
                queue_max_size: qu.max_size(),
                queue_size: qu.size(),
                flags: 0,
                desc_table_addr: hva(qu.desc_table(), "descriptor table")?,
                used_ring_addr: hva(qu.used_ring(), "used ring")?,
                avail_ring_addr: hva(qu.avail_ring(), "available ring")?,
                log_addr: None,
            };
            self.fe
                .set_vring_num(i, qu.size())
                .map_err(e("SET_VRING_NUM"))?;
            self.fe
                .set_vring_addr(i, &ring)
                .map_err(e("SET_VRING_ADDR"))?;
            self.fe
                .set_vring_base(i, qu.next_avail())
                .map_err(e("SET_VRING_BASE"))?;
            self.fe
                .set_vring_call(i, call)
                .map_err(e("SET_VRING_CALL"))?;
            self.fe
                .set_vring_kick(i, &q.kick)
                .map_err(e("SET_VRING_KICK"))?;
            if self.shared.protocol_features() {
                self.fe
                    .set_vring_enable(i, true)
                    .map_err(e("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Sends the driver's configuration writes.
    fn send_config(&mut self) -> Result<(), String> {
        let writes = std::mem::take(&mut *self.shared.pending.lock());
        if !self
            .shared
            .protocol
            .contains(VhostUserProtocolFeatures::CONFIG)
        {
            return Ok(());
        }
        for (off, bytes) in writes {
            self.fe
                .set_config(off, VhostUserConfigFlags::WRITABLE, &bytes)
                .map_err(|e| format!("SET_CONFIG: {e}"))?;
        }
        Ok(())
    }

    /// The driver reset the device: stop every ring and reset the back end's state.
    fn stop(&mut self) {
        let r: Result<(), String> = (|| {
            for q in &self.queues {
                let i = usize::from(q.index);
                if self.shared.protocol_features() {
                    self.fe
                        .set_vring_enable(i, false)
                        .map_err(|e| format!("SET_VRING_ENABLE: {e}"))?;
                }
                self.fe
                    .get_vring_base(i)
                    .map_err(|e| format!("GET_VRING_BASE: {e}"))?;
            }
            if self
                .shared
                .protocol
                .contains(VhostUserProtocolFeatures::RESET_DEVICE)
            {
                self.fe
                    .reset_device()
                    .map_err(|e| format!("RESET_DEVICE: {e}"))?;
            }
            Ok(())
        })();
        if let Err(why) = r {
            // The driver is resetting: no DEVICE_NEEDS_RESET now; its next start fails.
            self.shared.fail(format!("stopping the rings: {why}"));
        }
    }
}
