//! virtio-console: a console port (hvc0 …) on the terminal, a file or a unix socket
//! (virtio 1.2 section 5.3).
//!
//! Guest driver: Linux `virtio_console` (/dev/hvcN).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::contract::check::DeviceCheck;
use crate::contract::units::{DeviceName, PciSlot};
use crate::contract::{
    DeviceError, DeviceKindInfo, DeviceSpec, KindInfo, Needs, ServedInfo, VirtioInfo,
};
use crate::devices::Device;
use crate::hw::char_io::CharIo;
use crate::hw::served::Served;

mod served;
pub use served::ConsoleModel;

/// What a virtio console is: type 3, receiveq and transmitq of port 0 (no multiport), PCI
/// class "communication, other".
pub const VIRTIO: VirtioInfo = VirtioInfo {
    device_type: 3,
    queue_sizes: std::borrow::Cow::Borrowed(&[QUEUE_SIZE, QUEUE_SIZE]),
    pci_class: (0x07, 0x80),
};

/// A virtio console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSpec {
    /// Unique device name.
    pub name: DeviceName,
    /// Where the console's bytes go: "stdio", "none", { file = "…" } or { socket = "…" }.
    pub io: CharIo,
    /// PCI slot on bus 0; the first free static slot when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<PciSlot>,
}

/// The worker's system calls beyond the worker base: output to a socket client or stdout.
pub const SECCOMP: crate::sandbox::Allow = crate::sandbox::Allow {
    kind: "console worker",
    calls: &[
        crate::sandbox::call!(SYS_sendto),
        crate::sandbox::call!(SYS_recvfrom),
    ],
    on_vcpu: &[],
};

impl DeviceKindInfo for ConsoleSpec {
    const INFO: KindInfo = KindInfo {
        key: "console",
        noun: "console",
        hotpluggable: false,
        max_count: None,
        aliases: &["hvc", "virtio-console", "consoles"],
        platform: &[],
        vhost_user: Some(ServedInfo {
            front_end: "no stock QEMU front end; a vhost-user virtio-console front end",
            front_end_keys: &[],
            defaults: &[("io", "stdio")],
        }),
        seccomp: &SECCOMP,
    };
}

impl DeviceSpec for ConsoleSpec {
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
        self.io.check(cx, "io");
    }
    fn describe(&self, _machine: &str) -> Vec<(&'static str, String)> {
        vec![("io", self.io.describe())]
    }
}

impl Device for ConsoleSpec {
    fn build(
        &self,
        at: &crate::contract::Placement,
        m: &mut dyn crate::hw::Machine,
    ) -> Result<(), DeviceError> {
        let input = Arc::new(
            ConsoleInput::new(INPUT_LIMIT)
                .map_err(|e| DeviceError(format!("console `{}`: eventfd: {e}", self.name)))?,
        );
        let out = m.open_char(self.name.as_str(), &self.io, input.clone())?;
        let dev = Console::new(out, input, matches!(self.io, CharIo::Stdio));
        crate::hw::transport::virtio_pci::plug(self.name.as_str(), Box::new(dev), at, m)
    }
    fn served(&self, base: &std::path::Path) -> Option<Result<Box<dyn Served>, DeviceError>> {
        Some(
            ConsoleModel::open(&self.io.resolved(base))
                .map(|m| Box::new(m) as Box<dyn Served>)
                .map_err(|e| DeviceError(e.to_string())),
        )
    }
}

// ---- The device model -----------------------------------------------------------------------

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use crate::sync::{Mutex, MutexGuard, Rank};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use crate::hw::char_io::{CharInput, CharOut};
use crate::hw::virtio::{
    ActivateError, Activation, ActiveQueue, BUDGET, GuestMem, NeedsReset, STOP_TOKEN, Stop,
    VIRTIO_F_VERSION_1, VirtioDevice, Worker, WorkerHandle, WorkerSlot, drain, notify,
    read_config_bytes,
};

/// Config space `cols`/`rows` are valid (section 5.3.3).
pub const VIRTIO_CONSOLE_F_SIZE: u64 = 1 << 0;
/// Several ports and a control queue pair; not offered.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;
/// Config space `emerg_wr` outputs one character at once.
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u64 = 1 << 2;

/// Size of receiveq0 and transmitq0.
pub const QUEUE_SIZE: u16 = 256;
/// Index of receiveq0 (device → guest).
pub const RX_QUEUE: usize = 0;
/// Index of transmitq0 (guest → device).
pub const TX_QUEUE: usize = 1;
/// Most input bytes waiting for receive buffers; `push` takes no more.
pub const INPUT_LIMIT: usize = 64 * 1024;
/// Largest transmit chain (readable bytes); longer chains are dropped unread.
pub const TX_CHAIN_LIMIT: u64 = 64 * 1024;
/// Offset of `emerg_wr` in the config space.
pub const EMERG_WR_OFFSET: u64 = 8;
/// Console size reported when the host end is not a terminal.
pub const DEFAULT_SIZE: (u16, u16) = (80, 25);

/// The config space (section 5.3.4): cols u16, rows u16, max_nr_ports u32, emerg_wr u32, all
/// little-endian. `emerg_wr` reads as 0.
pub fn config_bytes(cols: u16, rows: u16) -> [u8; 12] {
    let mut c = [0u8; 12];
    c[0..2].copy_from_slice(&cols.to_le_bytes());
    c[2..4].copy_from_slice(&rows.to_le_bytes());
    c[4..8].copy_from_slice(&1u32.to_le_bytes());
    c
}

/// The size (cols, rows) of the terminal on stdout, when stdout is one.
pub fn terminal_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ only writes one `winsize` into the struct we own; it fails with
    // ENOTTY when stdout is not a terminal.
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Input waiting for the guest's receive buffers: a bounded FIFO filled by the host end
/// (terminal, socket client) and an eventfd that wakes whoever serves the receive queue.
/// Outlives device resets, so input typed while the driver reloads is kept.
#[derive(Debug)]
pub struct ConsoleInput {
    pending: Mutex<VecDeque<u8>>,
    limit: usize,
    wake: EventFd,
}

impl ConsoleInput {
    /// An empty FIFO holding at most `limit` bytes.
    pub fn new(limit: usize) -> std::io::Result<ConsoleInput> {
        Ok(ConsoleInput {
            pending: Mutex::new(Rank::Leaf, VecDeque::new()),
            limit,
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// The waiting bytes; hand them to [`receive`].
    pub fn pending(&self) -> MutexGuard<'_, VecDeque<u8>> {
        self.pending.lock()
    }

    /// Readable after each `push` that took bytes (non-blocking; drain it before [`receive`]).
    pub fn wake(&self) -> &EventFd {
        &self.wake
    }
}

impl CharInput for ConsoleInput {
    fn push(&self, bytes: &[u8]) -> usize {
        let mut p = self.pending();
        let n = bytes.len().min(self.limit.saturating_sub(p.len()));
        p.extend(&bytes[..n]);
        drop(p);
        if n > 0 {
            let _ = self.wake.write(1);
        }
        n
    }
}

/// Writes what the guest transmitted to `out`, chain by chain, in order. Only device-readable
/// descriptors are read; a chain longer than [`TX_CHAIN_LIMIT`] is dropped and a chain with a
/// bad address is output up to the bad descriptor. Every chain is returned with length 0.
/// Output errors lose output, never the guest's buffers. Serves at most `budget` chains;
/// returns how many were used (the caller notifies).
pub fn transmit<M: GuestMemory, W: Write + ?Sized>(
    queue: &mut Queue,
    mem: &M,
    out: &mut W,
    budget: usize,
) -> usize {
    let mut used = 0;
    let mut buf = Vec::new();
    for _ in 0..budget {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        gather(chain, mem, &mut buf);
        if !buf.is_empty() {
            let _ = out.write_all(&buf);
        }
        // A head past the table is the guest's error: skip it, serve the next chains.
        used += usize::from(queue.add_used(mem, head, 0).is_ok());
    }
    used
}

/// The readable bytes of a transmit chain into `buf` (see [`transmit`]), in one pass: each
/// descriptor is read from guest memory once and its length checked against what is left of
/// [`TX_CHAIN_LIMIT`] before anything is allocated for it, so a vCPU rewriting the descriptors
/// meanwhile cannot make the buffer grow past the limit.
fn gather<M: GuestMemory>(chain: DescriptorChain<&M>, mem: &M, buf: &mut Vec<u8>) {
    buf.clear();
    // The chain iterator stops at loops (queue size) and at 4 GiB in total.
    for d in chain.filter(|d| !d.is_write_only()) {
        let start = buf.len();
        let len = d.len() as usize;
        if len as u64 > TX_CHAIN_LIMIT - start as u64 {
            log::debug!(
                "virtio-console: dropped a transmit chain of more than {TX_CHAIN_LIMIT} bytes"
            );
            buf.clear();
            return;
        }
        buf.resize(start + len, 0);
        if mem.read_slice(&mut buf[start..], d.addr()).is_err() {
            buf.truncate(start);
            return;
        }
    }
}

/// Moves `pending` input into the guest's receive buffers while both exist: each chain's
/// writable descriptors are filled in order (as much as fits; the rest stays pending) and the
/// chain is returned with the number of bytes written. A chain with a device-readable
/// descriptor is returned with length 0 and unwritten. Returns whether any chain was used.
pub fn receive<M: GuestMemory>(queue: &mut Queue, mem: &M, pending: &mut VecDeque<u8>) -> bool {
    let mut used = false;
    while !pending.is_empty() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let len = fill(chain, mem, pending);
        used |= queue.add_used(mem, head, len).is_ok();
    }
    used
}

/// Writes the head of `pending` into a receive chain; returns the bytes written.
fn fill<M: GuestMemory>(chain: DescriptorChain<&M>, mem: &M, pending: &mut VecDeque<u8>) -> u32 {
    if chain.clone().any(|d| !d.is_write_only()) {
        log::debug!("virtio-console: receive chain with a device-readable buffer");
        return 0;
    }
    let mut written: u32 = 0;
    for d in chain {
        let n = (d.len() as usize).min(pending.len());
        if n == 0 {
            if pending.is_empty() {
                break;
            }
            continue;
        }
        if mem
            .write_slice(&pending.make_contiguous()[..n], d.addr())
            .is_err()
        {
            break;
        }
        pending.drain(..n);
        written = written.saturating_add(n as u32);
    }
    written
}

/// The virtio console: port 0 only, its output on a [`CharOut`], its input from a
/// [`ConsoleInput`].
#[derive(Debug)]
pub struct Console {
    out: Arc<Mutex<CharOut>>,
    input: Arc<ConsoleInput>,
    /// Report the size of the terminal on stdout rather than [`DEFAULT_SIZE`].
    follow_terminal: bool,
    /// (cols, rows) as the config space reports them; re-read at each reset.
    size: (u16, u16),
    worker: WorkerSlot,
}

impl Console {
    /// A console writing to `out` and reading from `input` (the `CharInput` its host end
    /// feeds). `follow_terminal`: the host end is stdio, report the terminal's size.
    pub fn new(out: CharOut, input: Arc<ConsoleInput>, follow_terminal: bool) -> Console {
        let mut c = Console {
            out: Arc::new(Mutex::new(Rank::DeviceState, out)),
            input,
            follow_terminal,
            size: DEFAULT_SIZE,
            worker: WorkerSlot::default(),
        };
        c.refresh_size();
        c
    }

    fn refresh_size(&mut self) {
        self.size = if self.follow_terminal {
            terminal_size().unwrap_or(DEFAULT_SIZE)
        } else {
            DEFAULT_SIZE
        };
    }
}

impl VirtioDevice for Console {
    fn virtio(&self) -> &'static VirtioInfo {
        &VIRTIO
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_SIZE | VIRTIO_CONSOLE_F_EMERG_WRITE
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = config_bytes(self.size.0, self.size.1);
        // Checked here: `read_config_bytes` would overflow on offsets near u64::MAX.
        if offset < cfg.len() as u64 {
            read_config_bytes(&cfg, offset, data);
        } else {
            data.fill(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Linux writes the character as a u32; its low byte is the character.
        if offset == EMERG_WR_OFFSET
            && let Some(c) = data.first()
        {
            let mut out = self.out.lock();
            let _ = out.write_all(std::slice::from_ref(c));
        }
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let mut queues = a.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError(
                "receiveq0 and transmitq0 must both be enabled".into(),
            ));
        };
        let (mem, input, out) = (a.mem, self.input.clone(), self.out.clone());
        let needs_reset = a.needs_reset;
        self.worker.start(WorkerHandle::spawn(
            &SECCOMP,
            "virtio-console".into(),
            move |stop| run(stop, rx, tx, mem, input, out, needs_reset),
        )?);
        Ok(())
    }
    fn reset(&mut self) {
        self.worker.reset();
        self.refresh_size();
    }
    fn quiesced(&mut self) -> bool {
        self.worker.quiesced()
    }
}

// ---- The worker -----------------------------------------------------------------------------

const RX_TOKEN: u64 = RX_QUEUE as u64;
const TX_TOKEN: u64 = TX_QUEUE as u64;
const INPUT_TOKEN: u64 = 2;

/// Writes to a shared [`CharOut`], locking it per chain so an emergency write (from a vCPU)
/// never waits for a whole batch.
struct Locked<'a>(&'a Mutex<CharOut>);

impl Write for Locked<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serves both queues until `stop`: transmit on the transmit queue's kick, receive when input
/// arrives or the guest posts receive buffers.
fn run(
    stop: Arc<Stop>,
    mut rx: ActiveQueue,
    mut tx: ActiveQueue,
    mem: GuestMem,
    input: Arc<ConsoleInput>,
    out: Arc<Mutex<CharOut>>,
    needs_reset: Arc<dyn NeedsReset>,
) {
    let w = match Worker::new(stop) {
        Ok(w) => w,
        Err(e) => return needs_reset.needs_reset(&format!("cannot start the worker: {e}")),
    };
    for (fd, token) in [
        (rx.kick.as_raw_fd(), RX_TOKEN),
        (tx.kick.as_raw_fd(), TX_TOKEN),
        (input.wake().as_raw_fd(), INPUT_TOKEN),
    ] {
        if let Err(e) = w.add(fd, token) {
            return needs_reset.needs_reset(&format!("cannot wait for events: {e}"));
        }
    }
    // Kicks and input from before this activation are served by the first pass.
    let mut events = vec![RX_TOKEN, TX_TOKEN, INPUT_TOKEN];
    loop {
        if events.contains(&STOP_TOKEN) {
            return;
        }
        if events.contains(&TX_TOKEN) {
            drain(&tx.kick);
            loop {
                let n = transmit(&mut tx.queue, &mem, &mut Locked(&out), BUDGET);
                if n > 0 {
                    notify(&mut tx.queue, &mem, tx.irq.as_ref());
                }
                if n < BUDGET || w.stop.requested() {
                    break;
                }
            }
        }
        if events.contains(&RX_TOKEN) || events.contains(&INPUT_TOKEN) {
            drain(&rx.kick);
            drain(input.wake());
            if receive(&mut rx.queue, &mem, &mut input.pending()) {
                notify(&mut rx.queue, &mem, rx.irq.as_ref());
            }
        }
        events = w.wait(-1);
    }
}

#[cfg(test)]
mod tests;
