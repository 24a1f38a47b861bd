use super::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

use crate::testing::{Count, Resets};

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
    assert_eq!(c.virtio().queue_sizes[..], [QUEUE_SIZE, QUEUE_SIZE]);
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
    let q = |index: u16, vq: &Vq<'_>| ActiveQueue {
        index,
        queue: vq.create_queue().unwrap(),
        kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        irq: irq.clone(),
    };
    let (rq, tq) = (q(0, rx), q(1, tx));
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
    assert!(irq.get() >= 2);
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
    assert!(resets.taken().is_empty());
}
