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
    queue_sizes: &[QUEUE_SIZE, QUEUE_SIZE],
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
        Needs::VirtioPci(&VIRTIO)
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
        self.worker
            .start(WorkerHandle::spawn("virtio-console".into(), move |stop| {
                run(stop, rx, tx, mem, input, out, needs_reset)
            })?);
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
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use proptest::prelude::*;
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use crate::hw::Irq;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    const MEM_SIZE: usize = 0x10_0000;
    /// Where test buffers live, well past the rings.
    const BUF: u64 = 0x4_0000;

    type Vq<'a> = MockSplitQueue<'a, GuestMem>;

    fn memory() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// Makes descriptor `head` available.
    fn offer(vq: &Vq<'_>, head: u16) {
        let idx = vq.avail().idx().load();
        let slot = usize::from(idx % QUEUE_SIZE);
        vq.avail().ring().ref_at(slot).unwrap().store(head);
        vq.avail().idx().store(idx.wrapping_add(1));
    }

    /// Writes a chain of (addr, len, flags) buffers from descriptor `first` and offers it;
    /// returns the next free descriptor.
    fn post(vq: &Vq<'_>, first: u16, bufs: &[(u64, u32, u16)]) -> u16 {
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let at = first + i as u16;
            let d = if i + 1 < bufs.len() {
                desc(addr, len, flags | NEXT, at + 1)
            } else {
                desc(addr, len, flags, 0)
            };
            vq.desc_table().store(at, d).unwrap();
        }
        offer(vq, first);
        first + bufs.len() as u16
    }

    fn used_idx(vq: &Vq<'_>) -> u16 {
        vq.used().idx().load()
    }

    /// (head, len) of used ring entry `i`.
    fn used(vq: &Vq<'_>, i: usize) -> (u32, u32) {
        let e = vq.used().ring().ref_at(i).unwrap().load();
        (e.id(), e.len())
    }

    fn read(mem: &GuestMem, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// A CharOut that writes to a temporary file, and the file to read back.
    fn capture() -> (tempfile::NamedTempFile, CharOut) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let out = CharOut::File(f.reopen().unwrap());
        (f, out)
    }

    fn captured(f: &tempfile::NamedTempFile) -> Vec<u8> {
        std::fs::read(f.path()).unwrap()
    }

    fn input() -> ConsoleInput {
        ConsoleInput::new(INPUT_LIMIT).unwrap()
    }

    #[test]
    fn transmit_outputs_chains_in_order() {
        let mem = memory();
        let vq = Vq::new(&mem, QUEUE_SIZE);
        mem.write_slice(b"hel", GuestAddress(BUF)).unwrap();
        mem.write_slice(b"lo ", GuestAddress(BUF + 0x100)).unwrap();
        mem.write_slice(b"world", GuestAddress(BUF + 0x200))
            .unwrap();
        let n = post(&vq, 0, &[(BUF, 3, 0), (BUF + 0x100, 3, 0)]);
        post(&vq, n, &[(BUF + 0x200, 5, 0)]);
        let (f, mut out) = capture();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(transmit(&mut q, &mem, &mut out, 256) > 0);
        assert_eq!(captured(&f), b"hello world");
        assert_eq!(used_idx(&vq), 2);
        assert_eq!(used(&vq, 0), (0, 0));
        assert_eq!(used(&vq, 1), (2, 0));
        // Nothing new: nothing used.
        assert!(!transmit(&mut q, &mem, &mut out, 256) > 0);
    }

    #[test]
    fn transmit_skips_writable_bad_and_oversized_buffers() {
        let mem = memory();
        let vq = Vq::new(&mem, QUEUE_SIZE);
        mem.write_slice(b"ab", GuestAddress(BUF)).unwrap();
        mem.write_slice(b"XXXX", GuestAddress(BUF + 0x100)).unwrap();
        mem.write_slice(b"cd", GuestAddress(BUF + 0x200)).unwrap();
        let end = MEM_SIZE as u64;
        let chains: &[&[(u64, u32, u16)]] = &[
            // A writable descriptor is not read.
            &[(BUF, 2, 0), (BUF + 0x100, 4, WRITE), (BUF + 0x200, 2, 0)],
            // A bad address: what came before it is output.
            &[(BUF, 2, 0), (end - 1, 16, 0), (BUF + 0x200, 2, 0)],
            // Over 64 KiB in total: dropped unread.
            &[(BUF, 0x8000, 0), (BUF, 0x8001, 0)],
            &[(u64::MAX - 1, u32::MAX, 0)],
            // Zero length.
            &[(BUF, 0, 0)],
            &[(BUF + 0x200, 2, 0)],
        ];
        let mut next = 0;
        for c in chains {
            next = post(&vq, next, c);
        }
        let (f, mut out) = capture();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(transmit(&mut q, &mem, &mut out, 256) > 0);
        assert_eq!(captured(&f), b"abcdabcd");
        assert_eq!(usize::from(used_idx(&vq)), chains.len());
        for i in 0..chains.len() {
            assert_eq!(used(&vq, i).1, 0);
        }
    }

    #[test]
    fn input_fills_receive_buffers_and_splits() {
        let mem = memory();
        let vq = Vq::new(&mem, QUEUE_SIZE);
        let input = input();
        assert_eq!(input.push(b"0123456789ab"), 12);
        let n = post(&vq, 0, &[(BUF, 4, WRITE)]);
        let n = post(&vq, n, &[(BUF + 0x100, 3, WRITE), (BUF + 0x200, 3, WRITE)]);
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(receive(&mut q, &mem, &mut input.pending()));
        assert_eq!(used_idx(&vq), 2);
        assert_eq!(used(&vq, 0), (0, 4));
        assert_eq!(used(&vq, 1), (1, 6));
        assert_eq!(read(&mem, BUF, 4), b"0123");
        assert_eq!(read(&mem, BUF + 0x100, 3), b"456");
        assert_eq!(read(&mem, BUF + 0x200, 3), b"789");
        // The rest waits for the next buffer.
        assert_eq!(input.pending().iter().copied().collect::<Vec<_>>(), b"ab");
        let n = post(&vq, n, &[(BUF + 0x300, 100, WRITE)]);
        assert!(receive(&mut q, &mem, &mut input.pending()));
        assert_eq!(used(&vq, 2), (3, 2));
        assert_eq!(read(&mem, BUF + 0x300, 2), b"ab");
        assert!(input.pending().is_empty());
        // No input: posted buffers stay with the device.
        post(&vq, n, &[(BUF + 0x400, 100, WRITE)]);
        assert!(!receive(&mut q, &mem, &mut input.pending()));
        assert_eq!(used_idx(&vq), 3);
    }

    #[test]
    fn input_waits_for_buffers_and_readable_chains_are_refused() {
        let mem = memory();
        let vq = Vq::new(&mem, QUEUE_SIZE);
        let input = input();
        input.push(b"hi");
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(!receive(&mut q, &mem, &mut input.pending()));
        assert_eq!(input.pending().len(), 2);
        let n = post(&vq, 0, &[(BUF, 4, 0)]);
        let n = post(&vq, n, &[(BUF + 0x100, 4, WRITE), (BUF + 0x200, 4, 0)]);
        let n = post(&vq, n, &[(BUF + 0x300, 0, WRITE), (BUF + 0x400, 4, WRITE)]);
        assert!(receive(&mut q, &mem, &mut input.pending()));
        assert_eq!(used(&vq, 0), (0, 0));
        assert_eq!(used(&vq, 1), (1, 0));
        assert_eq!(read(&mem, BUF + 0x100, 4), [0; 4]);
        assert_eq!(used(&vq, 2), (3, 2));
        assert_eq!(read(&mem, BUF + 0x400, 2), b"hi");
        assert_eq!(n, 5);
    }

    #[test]
    fn push_is_bounded() {
        let input = input();
        assert_eq!(input.push(&vec![b'x'; 100_000]), INPUT_LIMIT);
        assert_eq!(input.push(b"more"), 0);
        assert_eq!(input.pending().len(), INPUT_LIMIT);
        assert!(input.pending().capacity() <= 2 * INPUT_LIMIT);
        assert!(input.wake().read().is_ok());
        // Room made by the guest is taken again.
        let mem = memory();
        let vq = Vq::new(&mem, QUEUE_SIZE);
        post(&vq, 0, &[(BUF, 1000, WRITE)]);
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(receive(&mut q, &mem, &mut input.pending()));
        assert_eq!(input.push(&[b'y'; 5000]), 1000);
        // An empty push takes nothing and wakes nobody.
        assert!(input.wake().read().is_ok());
        assert_eq!(input.push(&[]), 0);
        assert!(input.wake().read().is_err());
    }

    /// Runs transmit, then receive over the rings of `vq` (two queue states, each starting at
    /// used index 0), and checks every byte taken from the input is in the used ring.
    fn serve_both(mem: &GuestMem, vq: &Vq<'_>) {
        let mut tq: Queue = vq.create_queue().unwrap();
        let mut out = Vec::new();
        transmit(&mut tq, mem, &mut out, 256);
        assert!(out.len() <= 64 * 1024 * usize::from(QUEUE_SIZE));
        let input = input();
        input.push(&[b'z'; 1000]);
        let mut rq: Queue = vq.create_queue().unwrap();
        receive(&mut rq, mem, &mut input.pending());
        let given: usize = (0..usize::from(used_idx(vq).min(QUEUE_SIZE)))
            .map(|i| used(vq, i).1 as usize)
            .sum();
        assert_eq!(given + input.pending().len(), 1000);
    }

    #[test]
    fn hostile_chains_never_panic() {
        let mem = memory();
        let loops = |len: u32, flags: u16| {
            let vq = Vq::new(&mem, QUEUE_SIZE);
            vq.desc_table()
                .store(0, desc(BUF, len, flags | NEXT, 1))
                .unwrap();
            vq.desc_table()
                .store(1, desc(BUF, len, flags | NEXT, 0))
                .unwrap();
            offer(&vq, 0);
            serve_both(&mem, &vq);
        };
        loops(16, 0);
        loops(0x1000, 0);
        loops(16, WRITE);
        loops(0, WRITE);
        let chains: &[&[(u64, u32, u16)]] = &[
            &[(0xffff_ffff_0000, 16, 0)],
            &[(u64::MAX, 16, WRITE)],
            &[(u64::MAX - 8, 32, INDIRECT)],
            &[(BUF, 17, INDIRECT)],
            &[(BUF, u32::MAX, WRITE), (BUF, u32::MAX, WRITE)],
            &[(BUF, u32::MAX, 0), (BUF, 1, 0)],
            &[(MEM_SIZE as u64 - 2, 8, WRITE)],
        ];
        for c in chains {
            let vq = Vq::new(&mem, QUEUE_SIZE);
            post(&vq, 0, c);
            serve_both(&mem, &vq);
        }
        // A head past the descriptor table, and a NEXT index past it.
        let vq = Vq::new(&mem, QUEUE_SIZE);
        offer(&vq, 300);
        vq.desc_table()
            .store(0, desc(BUF, 4, NEXT | WRITE, 999))
            .unwrap();
        offer(&vq, 0);
        serve_both(&mem, &vq);
        // The available index jumps far ahead of the queue size: nothing is consumed.
        let vq = Vq::new(&mem, QUEUE_SIZE);
        post(&vq, 0, &[(BUF, 4, 0)]);
        vq.avail().idx().store(1000);
        serve_both(&mem, &vq);
        assert_eq!(used_idx(&vq), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn random_rings_never_panic(
            descs in proptest::collection::vec(
                (
                    prop_oneof![BUF..BUF + 0x1000, Just(MEM_SIZE as u64 - 8), any::<u64>()],
                    prop_oneof![Just(0u32), 1u32..64, Just(0x1_0000), any::<u32>()],
                    0u16..8,
                    0u16..300,
                ),
                1..24,
            ),
            heads in proptest::collection::vec(0u16..300, 0..8),
            jump in prop_oneof![Just(0u16), any::<u16>()],
        ) {
            let mem = memory();
            let vq = Vq::new(&mem, QUEUE_SIZE);
            for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
                vq.desc_table().store(i as u16, desc(addr, len, flags, next)).unwrap();
            }
            for &h in &heads {
                offer(&vq, h);
            }
            let idx = vq.avail().idx().load();
            vq.avail().idx().store(idx.wrapping_add(jump));
            serve_both(&mem, &vq);
        }
    }

    /// A vCPU rewriting a transmit descriptor's length between 16 bytes and 1 GiB while the
    /// chain is served: each descriptor is fetched once, so the buffer never grows past the
    /// 64 KiB limit (it once took the length twice and allocated what the second read said).
    #[test]
    fn a_descriptor_rewritten_while_served_never_grows_the_buffer() {
        let mem = memory();
        let vq = Vq::new(&mem, QUEUE_SIZE);
        post(&vq, 0, &[(BUF, 16, 0), (BUF + 0x100, 16, 0)]);
        let len_at = GuestAddress(vq.desc_table_addr().0 + 16 + 8);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (m2, s2) = (mem.clone(), stop.clone());
        let racer = std::thread::spawn(move || {
            let mut flips = 0u64;
            while !s2.load(Ordering::Relaxed) {
                m2.write_obj(16u32, len_at).unwrap();
                m2.write_obj(1u32 << 30, len_at).unwrap();
                flips += 1;
            }
            flips
        });
        let mut q: Queue = vq.create_queue().unwrap();
        let (served, peak) = crate::alloc_track::peak(|| {
            let mut served = 0u32;
            for _ in 0..20_000 {
                offer(&vq, 0);
                served += transmit(&mut q, &mem, &mut std::io::sink(), 256) as u32;
            }
            served
        });
        stop.store(true, Ordering::Relaxed);
        let flips = racer.join().unwrap();
        // The chain posted at the start and the 20,000 offered again.
        assert_eq!(served, 20_001);
        assert!(flips > 1000, "the racer hardly ran ({flips} flips)");
        assert!(
            peak <= TX_CHAIN_LIMIT as usize + 4096,
            "transmit had {peak} bytes allocated at once"
        );
    }

    fn console(out: CharOut) -> Console {
        Console::new(out, Arc::new(input()), false)
    }

    #[test]
    fn config_space_reads() {
        let c = console(CharOut::Sink);
        assert_eq!(c.virtio().device_type, 3);
        assert_eq!(c.virtio().queue_sizes, [QUEUE_SIZE, QUEUE_SIZE]);
        let f = c.features();
        assert_ne!(f & VIRTIO_F_VERSION_1, 0);
        assert_ne!(f & VIRTIO_CONSOLE_F_SIZE, 0);
        assert_ne!(f & VIRTIO_CONSOLE_F_EMERG_WRITE, 0);
        assert_eq!(f & VIRTIO_CONSOLE_F_MULTIPORT, 0);
        let mut cfg = vec![80, 0, 25, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        cfg.resize(32, 0);
        for width in [1usize, 2, 4, 8] {
            for off in 0..24u64 {
                let mut d = vec![0xaa; width];
                c.read_config(off, &mut d);
                assert_eq!(d, cfg[off as usize..off as usize + width], "{off}/{width}");
            }
        }
        let mut d = [0xaa; 8];
        c.read_config(u64::MAX, &mut d);
        assert_eq!(d, [0; 8]);
        let mut w = [0u8; 2];
        c.read_config(2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 25);
    }

    #[test]
    fn emergency_write_is_output_at_once() {
        let (f, out) = capture();
        let mut c = console(out);
        c.write_config(EMERG_WR_OFFSET, &u32::from(b'!').to_le_bytes());
        c.write_config(EMERG_WR_OFFSET, b"?");
        // Other fields are read-only, and a write past emerg_wr's start is no character.
        c.write_config(0, b"zz");
        c.write_config(EMERG_WR_OFFSET + 1, b"x");
        c.write_config(u64::MAX, b"y");
        c.write_config(EMERG_WR_OFFSET, &[]);
        assert_eq!(captured(&f), b"!?");
        let mut d = [0xaa; 4];
        c.read_config(EMERG_WR_OFFSET, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Irq for Count {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[derive(Default)]
    struct Resets(Mutex<Vec<String>>);
    impl NeedsReset for Resets {
        fn needs_reset(&self, why: &str) {
            self.0.lock().push(why.into());
        }
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(10), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn activation(
        mem: &GuestMem,
        rx: &Vq<'_>,
        tx: &Vq<'_>,
        irq: &Arc<Count>,
        resets: &Arc<Resets>,
    ) -> (Activation, EventFd) {
        let q = |vq: &Vq<'_>| ActiveQueue {
            queue: vq.create_queue().unwrap(),
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            irq: irq.clone(),
        };
        let (rq, tq) = (q(rx), q(tx));
        let tx_kick = tq.kick.try_clone().unwrap();
        let a = Activation {
            mem: mem.clone(),
            features: VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_SIZE,
            queues: vec![rq, tq],
            config_irq: irq.clone(),
            needs_reset: resets.clone(),
        };
        (a, tx_kick)
    }

    #[test]
    fn worker_serves_both_queues_and_input_survives_reset() {
        let mem = memory();
        let (f, out) = capture();
        let input = Arc::new(input());
        let mut c = Console::new(out, input.clone(), false);
        let (irq, resets) = (Arc::new(Count::default()), Arc::new(Resets::default()));
        // Typed before the driver is ready.
        assert_eq!(input.push(b"early"), 5);
        let rx = Vq::create(&mem, GuestAddress(0), QUEUE_SIZE);
        let tx = Vq::create(&mem, GuestAddress(0x1_0000), QUEUE_SIZE);
        post(&rx, 0, &[(BUF, 64, WRITE)]);
        mem.write_slice(b"hello", GuestAddress(BUF + 0x1000))
            .unwrap();
        post(&tx, 0, &[(BUF + 0x1000, 5, 0)]);
        let (a, _) = activation(&mem, &rx, &tx, &irq, &resets);
        c.activate(a).unwrap();
        wait_until("first receive and transmit", || {
            used_idx(&rx) == 1 && used_idx(&tx) == 1
        });
        assert_eq!(used(&rx, 0), (0, 5));
        assert_eq!(read(&mem, BUF, 5), b"early");
        wait_until("output", || captured(&f) == b"hello");
        assert!(irq.0.load(Ordering::SeqCst) >= 2);
        // No receive buffers: input waits, through a reset too.
        assert_eq!(input.push(b"more"), 4);
        c.reset();
        assert_eq!(input.push(b"!"), 1);
        assert_eq!(
            input.pending().iter().copied().collect::<Vec<_>>(),
            b"more!"
        );
        // The driver comes back with fresh rings.
        let rx = Vq::create(&mem, GuestAddress(0x2_0000), QUEUE_SIZE);
        let tx = Vq::create(&mem, GuestAddress(0x3_0000), QUEUE_SIZE);
        post(&rx, 0, &[(BUF + 0x2000, 64, WRITE)]);
        let (a, tx_kick) = activation(&mem, &rx, &tx, &irq, &resets);
        c.activate(a).unwrap();
        wait_until("receive after reset", || used_idx(&rx) == 1);
        assert_eq!(used(&rx, 0), (0, 5));
        assert_eq!(read(&mem, BUF + 0x2000, 5), b"more!");
        // A transmit kicked while running.
        mem.write_slice(b" again", GuestAddress(BUF + 0x3000))
            .unwrap();
        post(&tx, 0, &[(BUF + 0x3000, 6, 0)]);
        tx_kick.write(1).unwrap();
        wait_until("output after reset", || captured(&f) == b"hello again");
        assert_eq!(used_idx(&tx), 1);
        // Missing queues fail activation, never panic.
        c.reset();
        let (mut a, _) = activation(&mem, &rx, &tx, &irq, &resets);
        a.queues.truncate(1);
        assert!(c.activate(a).is_err());
        assert!(resets.0.lock().is_empty());
    }
}
