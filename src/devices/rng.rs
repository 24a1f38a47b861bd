//! virtio-rng: an entropy source fed from the host's getrandom (virtio 1.2 section 5.4).
//!
//! Guest driver: Linux `virtio_rng` (/dev/hwrng).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::contract::check::DeviceCheck;
use crate::contract::units::{ByteSize, DeviceName, PciSlot};
use crate::contract::{
    DeviceError, DeviceKindInfo, DeviceSpec, KindInfo, Needs, ServedInfo, VirtioInfo,
};
use crate::devices::Device;
use crate::hw::served::Served;

/// What a virtio entropy device is: type 4, one request queue, PCI class "other".
pub const VIRTIO: VirtioInfo = VirtioInfo {
    device_type: 4,
    queue_sizes: std::borrow::Cow::Borrowed(&[QUEUE_SIZE]),
    pci_class: (0xff, 0x00),
};

/// A virtio entropy device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RngSpec {
    /// Unique device name.
    pub name: DeviceName,
    /// Most bytes per second handed to the guest, e.g. "64K"; unlimited when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<ByteSize>,
    /// PCI slot on bus 0; the first free static slot when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<PciSlot>,
}

/// The worker's system calls beyond the worker base: entropy from getrandom(2), and sleeping
/// out the rate limit.
pub const SECCOMP: crate::sandbox::Allow = crate::sandbox::Allow {
    kind: "rng worker",
    calls: &[
        crate::sandbox::call!(SYS_getrandom),
        crate::sandbox::call!(SYS_clock_nanosleep),
    ],
    on_vcpu: &[],
};

impl DeviceKindInfo for RngSpec {
    const INFO: KindInfo = KindInfo {
        key: "rng",
        noun: "entropy device",
        hotpluggable: false,
        max_count: None,
        aliases: &["entropy", "random"],
        platform: &[],
        vhost_user: Some(ServedInfo {
            front_end: "QEMU: -device vhost-user-rng-pci",
            front_end_keys: &[],
            defaults: &[],
        }),
        seccomp: &SECCOMP,
    };
}

impl DeviceSpec for RngSpec {
    fn info(&self) -> &'static KindInfo {
        &Self::INFO
    }
    fn name(&self) -> &str {
        self.name.as_str()
    }
    fn slot(&self) -> Option<PciSlot> {
        self.slot
    }
    fn needs(&self) -> Needs {
        Needs::VirtioPci(VIRTIO)
    }
    fn check(&self, cx: &mut dyn DeviceCheck) {
        if self.rate == Some(ByteSize(0)) {
            cx.error(
                "rate",
                "A rate of 0 bytes per second starves the guest".into(),
            )
            .help("remove `rate` for no limit");
        }
    }
    fn describe(&self, _machine: &str) -> Vec<(&'static str, String)> {
        match self.rate {
            Some(r) => vec![("rate", format!("{r}/s"))],
            None => Vec::new(),
        }
    }
}

impl Device for RngSpec {
    fn build(
        &self,
        at: &crate::contract::Placement,
        m: &mut dyn crate::hw::Machine,
    ) -> Result<(), DeviceError> {
        let dev = Rng::new(self.rate.map(|r| r.bytes()));
        crate::hw::transport::virtio_pci::plug(self.name.as_str(), Box::new(dev), at, m)
    }
    fn served(&self, _base: &std::path::Path) -> Option<Result<Box<dyn Served>, DeviceError>> {
        Some(Ok(Box::new(RngModel::new(self.rate.map(|r| r.bytes())))))
    }
}

// ---- The device model -----------------------------------------------------------------------

use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemory;

use crate::hw::virtio::{
    ActivateError, Activation, BUDGET, STOP_TOKEN, VIRTIO_F_VERSION_1, VirtioDevice, Worker,
    WorkerHandle, WorkerSlot, drain, notify,
};

/// Queue size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

/// A token bucket: `rate` bytes per second, bursts up to one second's worth.
#[derive(Debug, Clone)]
pub struct RateLimit {
    rate: u64,
    tokens: u64,
    last: Instant,
}

impl RateLimit {
    pub fn new(rate: u64) -> RateLimit {
        RateLimit {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }
    fn refill(&mut self) {
        let now = Instant::now();
        let add = (now - self.last).as_secs_f64() * self.rate as f64;
        if add >= 1.0 {
            self.tokens = (self.tokens + add as u64).min(self.rate);
            self.last = now;
        }
    }
    /// How long until at least one byte may go.
    pub fn wait(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.rate.max(1) as f64).max(Duration::from_millis(1))
    }
}

/// Fills at most `budget` of the guest's buffers with random bytes; stops early when the rate
/// limit is reached. Returns how many buffers were used (the caller notifies). Malformed chains
/// are returned with length 0; nothing here trusts the guest.
pub fn fill<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    mut limit: Option<&mut RateLimit>,
    budget: usize,
) -> usize {
    let mut used = 0;
    while used < budget {
        if let Some(l) = limit.as_deref_mut() {
            l.refill();
            if l.tokens == 0 {
                return used;
            }
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return used;
        };
        let head = chain.head_index();
        let written = match chain.writer(mem) {
            Ok(mut w) => {
                let mut want = w.available_bytes().min(64 * 1024);
                if let Some(l) = limit.as_deref_mut() {
                    want = want.min(l.tokens as usize);
                }
                let mut buf = vec![0u8; want];
                // SAFETY: getrandom fills the buffer we own, of its length.
                let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
                let n = usize::try_from(n).unwrap_or(0);
                match std::io::Write::write(&mut w, &buf[..n]) {
                    Ok(k) => {
                        if let Some(l) = limit.as_deref_mut() {
                            l.tokens = l.tokens.saturating_sub(k as u64);
                        }
                        k as u32
                    }
                    Err(_) => 0,
                }
            }
            Err(_) => 0,
        };
        if queue.add_used(mem, head, written).is_err() {
            return used;
        }
        used += 1;
    }
    used
}

/// The virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    rate: Option<u64>,
    worker: WorkerSlot,
}

impl Rng {
    pub fn new(rate: Option<u64>) -> Rng {
        Rng {
            rate,
            worker: WorkerSlot::default(),
        }
    }
}

impl VirtioDevice for Rng {
    fn virtio(&self) -> &'static VirtioInfo {
        &VIRTIO
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0); // no configuration space
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let Some(q) = a.queues.into_iter().next() else {
            return Err(ActivateError("the request queue is not enabled".into()));
        };
        let mem = a.mem;
        let mut limit = self.rate.map(RateLimit::new);
        let worker = WorkerHandle::spawn(&SECCOMP, "virtio-rng".into(), move |stop| {
            let Ok(w) = Worker::new(stop) else { return };
            if w.add(std::os::fd::AsRawFd::as_raw_fd(&q.kick), 0).is_err() {
                return;
            }
            let (mut queue, kick, irq) = (q.queue, q.kick, q.irq);
            let mut waiting = false;
            loop {
                let timeout = if waiting {
                    limit.as_ref().map_or(-1, |l| l.wait().as_millis() as i32)
                } else {
                    -1
                };
                let events = w.wait(timeout);
                if events.contains(&STOP_TOKEN) {
                    return;
                }
                drain(&kick);
                loop {
                    let n = fill(&mut queue, &mem, limit.as_mut(), BUDGET);
                    if n > 0 {
                        notify(&mut queue, &mem, irq.as_ref());
                    }
                    if n < BUDGET || w.stop.requested() {
                        break;
                    }
                }
                // Rate-limited with requests left: come back when tokens are due.
                waiting = limit.as_ref().is_some_and(|l| l.tokens == 0);
            }
        })?;
        self.worker.start(worker);
        Ok(())
    }
    fn reset(&mut self) {
        self.worker.reset();
    }
    fn quiesced(&mut self) -> bool {
        self.worker.quiesced()
    }
}

// ---- Served through vhost-user (`vmm device rng`) ------------------------------------------

use crate::hw::served::{Ctx, serve_simple};
use crate::sync::{Mutex, Rank};

/// virtio-rng from getrandom, optionally rate-limited.
#[derive(Debug)]
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
    fn virtio(&self) -> &'static VirtioInfo {
        &VIRTIO
    }
    fn features(&self) -> u64 {
        crate::hw::virtio::VIRTIO_F_VERSION_1
    }
    fn handle(&self, event: u16, cx: &Ctx<'_>) -> std::io::Result<()> {
        let Some(v) = cx.vrings.get(usize::from(event)) else {
            return Ok(());
        };
        let mut l = self.limit.lock();
        serve_simple(v, cx.mem, cx.event_idx, event, |q| {
            fill(q, cx.mem, l.as_mut(), BUDGET)
        })
    }
}
