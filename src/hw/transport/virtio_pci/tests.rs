use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::hw::DeviceError;
use crate::hw::MsiVector;
use crate::hw::bus::SharedDevice;
use crate::hw::virtio::{ActivateError, STATUS_ACKNOWLEDGE, STATUS_DRIVER};

/// A VM with counting MSI vectors and no real ioeventfds.
#[derive(Debug, Default)]
struct FakeVm {
    fired: Arc<Vec<AtomicUsize>>,
    next: AtomicUsize,
}

#[derive(Debug)]
struct FakeMsi(Arc<Vec<AtomicUsize>>, usize);

impl MsiVector for FakeMsi {
    fn set_message(&self, _addr: u64, _data: u32) -> Result<(), DeviceError> {
        Ok(())
    }
    fn trigger(&self) {
        self.0[self.1].fetch_add(1, Ordering::SeqCst);
    }
}

impl VmHandle for FakeVm {
    fn register_ioevent(&self, _: &EventFd, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    fn unregister_ioevent(&self, _: &EventFd, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    fn msi_vector(&self) -> Result<Arc<dyn MsiVector>, DeviceError> {
        let i = self.next.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(FakeMsi(self.fired.clone(), i)))
    }
    fn move_mmio(&self, _: u64, _: u64, _: u64, _: SharedDevice) {}
}

/// Counts activations and resets; offers VERSION_1 and one device feature.
#[derive(Debug, Default)]
struct Probe {
    activations: Arc<AtomicUsize>,
    resets: Arc<AtomicUsize>,
    queues_seen: Arc<AtomicUsize>,
}

impl VirtioDevice for Probe {
    fn virtio(&self) -> &'static VirtioInfo {
        &VirtioInfo {
            device_type: 4,
            queue_sizes: std::borrow::Cow::Borrowed(&[16, 16]),
            pci_class: (0xff, 0),
        }
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::hw::virtio::read_config_bytes(&[0xa5; 4], offset, data);
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        self.activations.fetch_add(1, Ordering::SeqCst);
        self.queues_seen.store(a.queues.len(), Ordering::SeqCst);
        Ok(())
    }
    fn reset(&mut self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
    }
}

const BAR: u64 = 0x1_0000_0000;

struct T {
    dev: Arc<Mutex<VirtioPci>>,
    fired: Arc<Vec<AtomicUsize>>,
    activations: Arc<AtomicUsize>,
    resets: Arc<AtomicUsize>,
    queues_seen: Arc<AtomicUsize>,
}

fn setup_with(device: Option<Box<dyn VirtioDevice>>) -> T {
    setup_in(device, 1 << 20)
}

fn setup_in(device: Option<Box<dyn VirtioDevice>>, mem_size: usize) -> T {
    let vm = FakeVm {
        fired: Arc::new((0..8).map(|_| AtomicUsize::new(0)).collect()),
        next: AtomicUsize::new(0),
    };
    let fired = vm.fired.clone();
    let probe = Probe::default();
    let (activations, resets, queues_seen) = (
        probe.activations.clone(),
        probe.resets.clone(),
        probe.queues_seen.clone(),
    );
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), mem_size)]).unwrap();
    let device = device.unwrap_or_else(|| Box::new(probe));
    let dev = VirtioPci::new("t", device, Arc::new(vm), mem, BAR).unwrap();
    T {
        dev,
        fired,
        activations,
        resets,
        queues_seen,
    }
}

fn setup() -> T {
    setup_with(None)
}

impl T {
    fn w(&self, off: u64, v: u64, len: usize) {
        self.dev.lock().write(BAR, off, &v.to_le_bytes()[..len]);
    }
    fn r(&self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.lock().read(BAR, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn status(&self) -> u8 {
        self.r(0x14, 1) as u8
    }
    /// Negotiates `features`, sets up queue `q` (size 16) at valid addresses.
    fn negotiate(&self, features: u64) {
        self.w(0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
        self.w(0x08, 0, 4);
        self.w(0x0c, features & 0xffff_ffff, 4);
        self.w(0x08, 1, 4);
        self.w(0x0c, features >> 32, 4);
        self.w(
            0x14,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK),
            1,
        );
    }
    fn setup_queue(&self, q: u16, base: u64) {
        self.w(0x16, u64::from(q), 2);
        self.w(0x18, 16, 2);
        self.w(0x20, base, 8);
        self.w(0x28, base + 0x100, 8);
        self.w(0x30, base + 0x200, 8);
        self.w(0x1c, 1, 2);
    }
    /// Writes 0 to the status and waits for it to read 0, as a driver must.
    fn reset_and_wait(&self) {
        self.w(0x14, 0, 1);
        let t = std::time::Instant::now();
        while self.status() != 0 {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "reset never finished"
            );
            std::thread::yield_now();
        }
    }
    fn driver_ok(&self) {
        self.w(
            0x14,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK),
            1,
        );
    }
}

#[test]
fn features_the_device_does_not_offer_are_refused() {
    let t = setup();
    t.negotiate(VIRTIO_F_VERSION_1 | 1 | (1 << 5));
    assert_eq!(
        t.status() & STATUS_FEATURES_OK,
        0,
        "FEATURES_OK must not stick"
    );
    let t = setup();
    t.negotiate(1); // no VERSION_1: a legacy driver
    assert_eq!(t.status() & STATUS_FEATURES_OK, 0);
    let t = setup();
    t.negotiate(VIRTIO_F_VERSION_1 | 1);
    assert_ne!(t.status() & STATUS_FEATURES_OK, 0);
    // Features cannot change once FEATURES_OK is set.
    t.w(0x08, 0, 4);
    t.w(0x0c, 0, 4);
    assert_eq!(t.r(0x0c, 4), 1);
}

#[test]
fn queue_size_and_addresses_are_frozen_once_enabled() {
    let t = setup();
    t.negotiate(VIRTIO_F_VERSION_1);
    t.setup_queue(0, 0x1000);
    t.w(0x18, 8, 2);
    t.w(0x20, 0xdead_0000, 8);
    t.w(0x24, 0xbeef, 4);
    assert_eq!(t.r(0x18, 2), 16, "size");
    assert_eq!(t.r(0x20, 8), 0x1000, "descriptor table");
    t.driver_ok();
    assert_eq!(t.activations.load(Ordering::SeqCst), 1);
    assert_eq!(
        t.queues_seen.load(Ordering::SeqCst),
        1,
        "only the enabled queue"
    );
    // After DRIVER_OK nothing of queue 1 can change either.
    t.w(0x16, 1, 2);
    t.w(0x18, 4, 2);
    t.w(0x1c, 1, 2);
    assert_eq!(t.r(0x18, 2), 16);
    assert_eq!(t.r(0x1c, 2), 0, "queue 1 cannot be enabled after DRIVER_OK");
}

#[test]
fn reset_stops_the_device_and_forgets_everything() {
    let t = setup();
    t.negotiate(VIRTIO_F_VERSION_1 | 1);
    t.setup_queue(0, 0x1000);
    t.setup_queue(1, 0x2000);
    t.driver_ok();
    assert_eq!(t.activations.load(Ordering::SeqCst), 1);
    t.w(0x14, 0, 1);
    assert_eq!(t.status(), 0);
    assert!(t.resets.load(Ordering::SeqCst) >= 1);
    t.w(0x16, 0, 2);
    assert_eq!(t.r(0x1c, 2), 0, "queue 0 not ready after reset");
    assert_eq!(t.r(0x0c, 4), 0, "driver features forgotten");
    // A new driver can start over.
    t.negotiate(VIRTIO_F_VERSION_1);
    t.setup_queue(0, 0x3000);
    t.driver_ok();
    assert_eq!(t.activations.load(Ordering::SeqCst), 2);
}

#[test]
fn a_queue_outside_memory_asks_for_a_reset_instead_of_starting() {
    let t = setup();
    t.negotiate(VIRTIO_F_VERSION_1);
    t.setup_queue(0, 0xfff_0000); // past the 1 MiB of guest memory
    t.driver_ok();
    assert_eq!(t.activations.load(Ordering::SeqCst), 0);
    assert_ne!(t.status() & STATUS_DEVICE_NEEDS_RESET, 0);
}

#[test]
fn masked_vectors_are_pending_until_unmasked() {
    let t = setup();
    // MSI-X enable through the capability.
    {
        let mut d = t.dev.lock();
        d.config_write(MSIX_CONTROL as u16, &0x8000u16.to_le_bytes());
    }
    // Config vector 0, table entry 0 masked (the reset state).
    t.w(0x10, 0, 2);
    assert_eq!(t.r(0x10, 2), 0);
    ConfigIrq(t.dev.lock().irq.clone()).trigger();
    assert_eq!(t.fired[0].load(Ordering::SeqCst), 0);
    assert_eq!(t.r(MSIX_PBA_OFFSET, 1) & 1, 1, "pending bit");
    // Unmask: the pending interrupt is delivered.
    t.w(MSIX_TABLE_OFFSET + 12, 0, 4);
    assert_eq!(t.fired[0].load(Ordering::SeqCst), 1);
    assert_eq!(t.r(MSIX_PBA_OFFSET, 1) & 1, 0);
    // A vector the table does not have reads back as NO_VECTOR.
    t.w(0x10, 400, 2);
    assert_eq!(t.r(0x10, 2), u64::from(NO_VECTOR));
}

#[test]
fn a_status_write_that_clears_bits_is_ignored_and_driver_ok_starts_once() {
    let t = setup();
    t.negotiate(VIRTIO_F_VERSION_1);
    t.setup_queue(0, 0x1000);
    t.driver_ok();
    assert_eq!(t.activations.load(Ordering::SeqCst), 1);
    // Clearing DRIVER_OK (and FEATURES_OK) without a reset: refused.
    t.w(0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
    assert_ne!(t.status() & STATUS_DRIVER_OK, 0);
    t.driver_ok();
    assert_eq!(t.activations.load(Ordering::SeqCst), 1, "started twice");
    // Adding a bit is fine (FAILED), and only a reset starts over.
    t.w(0x14, u64::from(t.status() | STATUS_FAILED), 1);
    assert_ne!(t.status() & STATUS_FAILED, 0);
    t.reset_and_wait();
    t.negotiate(VIRTIO_F_VERSION_1);
    t.setup_queue(0, 0x1000);
    t.driver_ok();
    assert_eq!(t.activations.load(Ordering::SeqCst), 2);
}

/// `n` block read requests of `len` bytes (all into the same buffer at `DATA`) in the ring
/// of `size` entries at `base` (as [`block_queue`] sets it up); returns the used index's
/// address.
fn block_reads(mem: &GuestMem, base: u64, size: u64, n: u64, len: u32) -> GuestAddress {
    for i in 0..n {
        let d = base + i * 3 * 16;
        let hdr = 0x40000 + i * 16;
        mem.write_obj(0u32, GuestAddress(hdr)).unwrap();
        mem.write_obj(0u64, GuestAddress(hdr + 8)).unwrap();
        for (k, (addr, len, flags)) in [(hdr, 16u32, 1u16), (DATA, len, 1 | 2), (0x50000 + i, 1, 2)]
            .into_iter()
            .enumerate()
        {
            let at = GuestAddress(d + k as u64 * 16);
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            mem.write_obj(
                ((i * 3 + k as u64 + 1) % (3 * n)) as u16,
                GuestAddress(at.0 + 14),
            )
            .unwrap();
        }
    }
    let avail = base + size * 16;
    for i in 0..n {
        mem.write_obj((i * 3) as u16, GuestAddress(avail + 4 + i * 2))
            .unwrap();
    }
    mem.write_obj(n as u16, GuestAddress(avail + 2)).unwrap();
    GuestAddress(avail + 0x1000 + 2)
}

/// Where [`block_reads`] reads into.
const DATA: u64 = 0x10_0000;

/// Sets up queue 0 with `size` entries for [`block_reads`] at `base`.
fn block_queue(t: &T, base: u64, size: u16) {
    let avail = base + u64::from(size) * 16;
    t.w(0x16, 0, 2);
    t.w(0x18, u64::from(size), 2);
    t.w(0x20, base, 8);
    t.w(0x28, avail, 8);
    t.w(0x30, avail + 0x1000, 8);
    t.w(0x1c, 1, 2);
}

/// A block device on a file of `len` bytes, in `mem` bytes of guest memory.
fn block_device(len: u64, mem: usize) -> (tempfile::NamedTempFile, T) {
    use crate::devices::block::{Block, Disk};
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(len).unwrap();
    let disk = Disk::open(f.path(), false, "t").unwrap();
    (f, setup_in(Some(Box::new(Block::new(disk))), mem))
}

#[test]
fn requests_are_executed_once_whatever_the_status_writes() {
    let (_f, t) = block_device(1 << 20, 2 << 20);
    let mem = t.dev.lock().mem.clone();
    t.negotiate(VIRTIO_F_VERSION_1);
    block_queue(&t, 0x1000, 32);
    let used_at = block_reads(&mem, 0x1000, 32, 8, 512);
    t.driver_ok();
    t.w(NOTIFY_OFFSET, 0, 2);
    let wait = || {
        let t0 = std::time::Instant::now();
        while mem.read_obj::<u16>(used_at).unwrap() < 8 {
            assert!(t0.elapsed() < std::time::Duration::from_secs(10));
            std::thread::yield_now();
        }
    };
    wait();
    // Each request wrote its status byte; mark them to see a second execution.
    for i in 0..8 {
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x50000 + i)).unwrap(), 0);
        mem.write_obj(0xeeu8, GuestAddress(0x50000 + i)).unwrap();
    }
    // A driver (or a hostile guest) writing DRIVER_OK again after clearing it: the device
    // does not start a second worker on the same ring from its first entry.
    t.w(
        0x14,
        u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK),
        1,
    );
    t.driver_ok();
    t.w(NOTIFY_OFFSET, 0, 2);
    std::thread::sleep(std::time::Duration::from_millis(50));
    for i in 0..8 {
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x50000 + i)).unwrap(),
            0xee,
            "request {i} executed again"
        );
    }
}

/// A full ring of large requests, then a reset: the vCPU's status write returns at once,
/// the status reads non-zero until the worker has finished its batch, and the worker stops
/// after that batch instead of serving the whole ring first (benches/blk.rs measures the
/// reset latency).
#[test]
fn a_reset_with_a_full_ring_does_not_wait_for_the_ring() {
    // 256 reads of 8 MiB each: the worker is busy for a while.
    let (_f, t) = block_device(8 << 20, 16 << 20);
    let mem = t.dev.lock().mem.clone();
    t.negotiate(VIRTIO_F_VERSION_1);
    block_queue(&t, 0x1000, 256);
    let used_at = block_reads(&mem, 0x1000, 256, 256, 8 << 20);
    t.driver_ok();
    t.w(NOTIFY_OFFSET, 0, 2);
    // The reset comes while the worker works through the ring.
    while mem.read_obj::<u16>(used_at).unwrap() == 0 {
        std::thread::yield_now();
    }
    let t0 = std::time::Instant::now();
    t.w(0x14, 0, 1);
    let write = t0.elapsed();
    t.reset_and_wait();
    let done = t0.elapsed();
    let used = mem.read_obj::<u16>(used_at).unwrap();
    eprintln!("reset: status write {write:?}, reset done after {done:?}, {used} of 256 served");
    // Once, the reset waited for the worker to drain the ring (all 256).
    assert!(
        used < 256,
        "the whole ring was served before the reset finished"
    );
}

#[test]
fn reset_in_the_middle_of_requests_does_not_lose_the_device() {
    // A real block device with its worker: requests are in flight when the driver resets.
    let (_f, t) = block_device(1 << 20, 2 << 20);
    let mem = t.dev.lock().mem.clone();
    let mut completed = 0u32;
    for round in 0..20u64 {
        t.negotiate(VIRTIO_F_VERSION_1);
        block_queue(&t, 0x1000, 32);
        // Eight read requests (header, data, status), all made available.
        let used_at = block_reads(&mem, 0x1000, 32, 8, 512);
        t.driver_ok();
        // Kick by hand (no ioeventfd here) and reset at once, at a varying point.
        t.w(NOTIFY_OFFSET, 0, 2);
        std::thread::sleep(std::time::Duration::from_micros(round * 50));
        t.reset_and_wait();
        let used: u16 = mem.read_obj(used_at).unwrap();
        assert!(used <= 8, "round {round}: {used} completions of 8 requests");
        completed += u32::from(used);
        mem.write_obj(0u16, used_at).unwrap();
    }
    // The worker really served requests between the kicks and the resets.
    assert!(completed > 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    /// Whatever a guest writes and reads, anywhere in BAR 0 or configuration space, at any
    /// width, the transport does not panic.
    #[test]
    fn hostile_register_accesses_never_panic(
        ops in proptest::collection::vec(
            (0u64..BAR0_SIZE + 16, prop_oneof![Just(1usize), Just(2), Just(4), Just(8), Just(3)],
             any::<u64>(), any::<bool>(), any::<bool>()),
            1..64,
        )
    ) {
        let t = setup();
        for (off, len, v, write, config) in ops {
            if config {
                let mut d = t.dev.lock();
                let off = (off % 4096) as u16;
                let len = len.min(4);
                if write {
                    d.config_write(off, &v.to_le_bytes()[..len]);
                } else {
                    let mut b = [0u8; 8];
                    d.config_read(off, &mut b[..len]);
                }
            } else if write {
                t.w(off, v, len);
            } else {
                t.r(off, len);
            }
        }
    }
}
