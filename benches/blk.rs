//! Block benchmark (`cargo bench --features testing --bench blk`): the virtio-blk device model driven directly
//! (guest memory + a virtqueue, no VM), next to fio on the same file (the host's limit), and
//! `vmm device block` next to qemu-storage-daemon's vhost-user-blk export, both driven through
//! vhost-user by the same driver code here.
//!
//! Workloads: 4 KiB random reads and writes at queue depth 1 and 32, 1 MiB sequential reads and
//! writes at queue depth 1. The image is a 1 GiB file under target/ (page-cached after the
//! first pass: every contender reads the same warm cache). `VMM_BENCH_SECS` sets the time per
//! workload (default 3). fio and qemu-storage-daemon rows say so when the tool is missing.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm::devices::block::{self, Disk, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vmm::testing::{NEXT, Ring, WRITE};
use vmm_sys_util::eventfd::EventFd;

const IMAGE_SIZE: u64 = 1 << 30;
const MEM_SIZE: usize = 64 << 20;
const QSIZE: u16 = 256;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HDRS: u64 = 0x10000;
const STATUS: u64 = 0x20000;
const DATA: u64 = 0x100000;
const DATA_SLOT: u64 = 1 << 20;
const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    write: bool,
    random: bool,
    size: u32,
    qd: usize,
}

const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "4K random read QD1",
        write: false,
        random: true,
        size: 4096,
        qd: 1,
    },
    Workload {
        name: "4K random read QD32",
        write: false,
        random: true,
        size: 4096,
        qd: 32,
    },
    Workload {
        name: "4K random write QD1",
        write: true,
        random: true,
        size: 4096,
        qd: 1,
    },
    Workload {
        name: "4K random write QD32",
        write: true,
        random: true,
        size: 4096,
        qd: 32,
    },
    Workload {
        name: "1M sequential read QD1",
        write: false,
        random: false,
        size: 1 << 20,
        qd: 1,
    },
    Workload {
        name: "1M sequential write QD1",
        write: true,
        random: false,
        size: 1 << 20,
        qd: 1,
    },
];

/// Offsets (bytes) of successive requests.
struct Offsets {
    state: u64,
    next_seq: u64,
    w: Workload,
}

impl Offsets {
    fn new(w: Workload) -> Offsets {
        Offsets {
            state: 0x9e37_79b9_7f4a_7c15,
            next_seq: 0,
            w,
        }
    }
    fn next(&mut self) -> u64 {
        let blocks = IMAGE_SIZE / u64::from(self.w.size);
        if self.w.random {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            (self.state % blocks) * u64::from(self.w.size)
        } else {
            let o = self.next_seq;
            self.next_seq = (self.next_seq + 1) % blocks;
            o * u64::from(self.w.size)
        }
    }
}

/// The driver side of one virtqueue in `mem`: request slots of (header, data, status)
/// descriptors on a [`Ring`].
struct Driver<'a> {
    mem: &'a GuestMemoryMmap<()>,
    ring: Ring,
    free: Vec<u16>,
}

impl<'a> Driver<'a> {
    /// Writes every slot's descriptors (header, data, status) once: a request then costs the
    /// driver its header's sector, one ring entry and the index.
    fn new(mem: &'a GuestMemoryMmap<()>, w: Workload) -> Driver<'a> {
        let ring = Ring::new(mem, QSIZE, DESC, AVAIL, USED);
        let kind = if w.write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        for slot in 0..w.qd as u16 {
            let (h, dd, st) = (slot * 3, slot * 3 + 1, slot * 3 + 2);
            let hdr = GuestAddress(HDRS + u64::from(slot) * 16);
            mem.write_obj(kind, hdr).unwrap();
            mem.write_obj(0u32, hdr.unchecked_add(4)).unwrap();
            ring.write_desc(mem, h, hdr.0, 16, NEXT, dd);
            let data = DATA + u64::from(slot) * DATA_SLOT;
            let flags = NEXT | if w.write { 0 } else { WRITE };
            ring.write_desc(mem, dd, data, w.size, flags, st);
            ring.write_desc(mem, st, STATUS + u64::from(slot), 1, WRITE, 0);
        }
        Driver {
            mem,
            ring,
            free: (0..w.qd as u16).rev().collect(),
        }
    }

    /// Queues one request in a free slot; false when all slots are in flight.
    fn submit(&mut self, offset: u64) -> bool {
        let Some(slot) = self.free.pop() else {
            return false;
        };
        let hdr = GuestAddress(HDRS + u64::from(slot) * 16);
        self.mem
            .write_obj(offset / 512, hdr.unchecked_add(8))
            .unwrap();
        self.ring.offer(self.mem, &[slot * 3]);
        true
    }

    /// Reaps completed requests; returns how many (panics on an error status).
    fn reap(&mut self) -> usize {
        let used = self.ring.take_used(self.mem);
        for &(id, _) in &used {
            let slot = (id / 3) as u16;
            let st: u8 = self
                .mem
                .read_obj(GuestAddress(STATUS + u64::from(slot)))
                .unwrap();
            assert_eq!(st, 0, "request failed with status {st}");
            self.free.push(slot);
        }
        used.len()
    }
}

struct Result {
    ops: u64,
    bytes: u64,
    elapsed: Duration,
}

impl Result {
    fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn mbps(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }
}

fn anon_memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn shared_memory() -> (GuestMemoryMmap<()>, File) {
    // SAFETY: memfd_create with a static NUL-terminated name; the fd is checked and owned below.
    let fd = unsafe {
        libc::memfd_create(
            c"vmm-bench".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0);
    // SAFETY: a fresh fd nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE as u64).unwrap();
    // Sealed as QEMU's memory-backend-memfd is (vmm device refuses unsealed memory).
    // SAFETY: F_ADD_SEALS on our memfd.
    let sealed = unsafe {
        libc::fcntl(
            fd,
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    assert_eq!(sealed, 0);
    let mem = GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    (mem, file)
}

/// The device model in this process: requests are handed to `block::process` in batches of
/// the queue depth, as a worker thread would see them after a kick.
fn run_model(image: &Path, w: Workload, secs: f64) -> Result {
    let disk = Disk::open(image, false, "bench").unwrap();
    let mem = anon_memory();
    let mut d = Driver::new(&mem, w);
    let mut q = d.ring.queue();
    let mut offs = Offsets::new(w);
    let (mut ops, t0) = (0u64, Instant::now());
    while t0.elapsed().as_secs_f64() < secs {
        while d.submit(offs.next()) {}
        block::process(&mut q, &mem, &disk, usize::MAX);
        ops += d.reap() as u64;
    }
    Result {
        ops,
        bytes: ops * u64::from(w.size),
        elapsed: t0.elapsed(),
    }
}

/// A vhost-user block backend (`vmm device block` or qemu-storage-daemon) on `socket`, driven
/// with requests in shared memory: kept `qd` deep, a kick per batch, reaped on each call.
fn run_vhost_user(socket: &Path, w: Workload, secs: f64) -> Result {
    let (mem, _file) = shared_memory();
    let region = mem.iter().next().unwrap();
    let host = region.as_ptr() as u64;
    let mut fe = Frontend::connect(socket, 1).expect("connect to the backend");
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    let mut features = VERSION_1 & offered;
    if offered & PROTOCOL_FEATURES != 0 {
        features |= PROTOCOL_FEATURES;
        let _ = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(VhostUserProtocolFeatures::empty())
            .unwrap();
    }
    fe.set_features(features).unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()])
        .unwrap();
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: host + DESC,
            used_ring_addr: host + USED,
            avail_ring_addr: host + AVAIL,
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    if features & PROTOCOL_FEATURES != 0 {
        fe.set_vring_enable(0, true).unwrap();
    }
    let mut d = Driver::new(&mem, w);
    let mut offs = Offsets::new(w);
    let (mut ops, t0) = (0u64, Instant::now());
    while t0.elapsed().as_secs_f64() < secs {
        let mut queued = false;
        while d.submit(offs.next()) {
            queued = true;
        }
        if queued {
            kick.write(1).unwrap();
        }
        let n = d.reap();
        if n == 0 {
            let _ = call.read(); // blocks until the backend signals
        }
        ops += n as u64;
    }
    // Drain what is in flight before the backend goes away.
    let end = Instant::now() + Duration::from_secs(10);
    while d.free.len() < w.qd && Instant::now() < end {
        d.reap();
        std::thread::sleep(Duration::from_micros(100));
    }
    Result {
        ops,
        bytes: ops * u64::from(w.size),
        elapsed: t0.elapsed(),
    }
}

/// fio on the same file: psync at QD1 (one request at a time, as the device model serves
/// them), io_uring at QD32; buffered, like the device model.
fn run_fio(image: &Path, w: Workload, secs: f64) -> Option<Result> {
    let rw = match (w.write, w.random) {
        (false, true) => "randread",
        (true, true) => "randwrite",
        (false, false) => "read",
        (true, false) => "write",
    };
    let engine = if w.qd > 1 { "io_uring" } else { "psync" };
    let out = Command::new("fio")
        .args([
            "--name=b",
            "--output-format=json",
            "--direct=0",
            // fio would otherwise drop the file from the page cache before each job.
            "--invalidate=0",
            "--time_based",
        ])
        .arg(format!("--filename={}", image.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", w.size))
        .arg(format!("--iodepth={}", w.qd))
        .arg(format!("--ioengine={engine}"))
        .arg(format!("--runtime={secs}"))
        .arg(format!("--size={IMAGE_SIZE}"))
        .arg("--randrepeat=0")
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let job = &v["jobs"][0][if w.write { "write" } else { "read" }];
    // fio's own rates (its runtime excludes setup).
    let iops = job["iops"].as_f64()?;
    let bytes_per_s = job["bw_bytes"].as_f64()?;
    Some(Result {
        ops: (iops * 1000.0) as u64,
        bytes: (bytes_per_s * 1000.0) as u64,
        elapsed: Duration::from_secs(1000),
    })
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn listening(path: &Path) -> bool {
    let Ok(t) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let p = path.to_string_lossy();
    t.lines()
        .any(|l| l.contains("00010000") && l.ends_with(&*p))
}

fn start(mut cmd: Command, socket: &Path) -> Option<Daemon> {
    let _ = std::fs::remove_file(socket);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let d = Daemon(child);
    let end = Instant::now() + Duration::from_secs(10);
    while !listening(socket) {
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Some(d)
}

fn vmm_device(image: &Path, socket: &Path) -> Option<Daemon> {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmm"));
    c.args(["device", "block", "--socket"])
        .arg(socket)
        .arg("--path")
        .arg(image);
    start(c, socket)
}

fn qsd(image: &Path, socket: &Path) -> Option<Daemon> {
    let mut c = Command::new("qemu-storage-daemon");
    c.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},cache.direct=off",
            image.display()
        ))
        .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ));
    start(c, socket)
}

fn image() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("blk.img");
    if std::fs::metadata(&p).map(|m| m.len()).ok() != Some(IMAGE_SIZE) {
        eprintln!("writing the 1 GiB image {}", p.display());
        let f = File::create(&p).unwrap();
        let chunk: Vec<u8> = (0..(1 << 20)).map(|i| (i * 7 % 251) as u8).collect();
        use std::os::unix::fs::FileExt;
        for i in 0..(IMAGE_SIZE >> 20) {
            f.write_all_at(&chunk, i << 20).unwrap();
        }
        f.sync_all().unwrap();
    }
    // Warm the page cache: every contender then reads the same cached file.
    let f = File::open(&p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    use std::os::unix::fs::FileExt;
    for i in 0..(IMAGE_SIZE >> 20) {
        let _ = f.read_at(&mut buf, i << 20);
    }
    let _ = f.as_raw_fd();
    p
}

/// The median of `runs` by IOPS.
fn median(mut runs: Vec<Result>) -> Option<Result> {
    if runs.is_empty() {
        return None;
    }
    runs.sort_by(|a, b| a.iops().total_cmp(&b.iops()));
    let mid = runs.len() / 2;
    Some(runs.swap_remove(mid))
}

fn main() {
    let secs: f64 = std::env::var("VMM_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let rounds: usize = std::env::var("VMM_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let img = image();
    let sock = img.with_file_name("blk.sock");
    println!(
        "{rounds} rounds of {secs} s per workload and contender, contenders in a rotating order; medians"
    );
    println!(
        "| workload | fio (host) | vmm model | model / fio | vmm device (vhost-user) | qemu-storage-daemon (vhost-user) | vmm device / qsd |"
    );
    println!("|---|---|---|---|---|---|---|");
    let fmt = |r: &Option<Result>| match r {
        Some(r) => format!("{:.0} IOPS, {:.0} MB/s", r.iops(), r.mbps()),
        None => "not measured".into(),
    };
    let ratio = |a: &Option<Result>, b: &Option<Result>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.0}%", a.iops() / b.iops() * 100.0),
        _ => "-".into(),
    };
    for w in WORKLOADS {
        let mut results: [Vec<Result>; 4] = Default::default();
        for round in 0..rounds {
            for k in 0..4 {
                let c = (k + round) % 4;
                let r = match c {
                    0 => run_fio(&img, w, secs),
                    1 => Some(run_model(&img, w, secs)),
                    2 => vmm_device(&img, &sock).map(|_d| run_vhost_user(&sock, w, secs)),
                    _ => qsd(&img, &sock).map(|_d| run_vhost_user(&sock, w, secs)),
                };
                results[c].extend(r);
            }
        }
        let [fio, model, vd, qs] = results.map(median);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            w.name,
            fmt(&fio),
            fmt(&model),
            ratio(&model, &fio),
            fmt(&vd),
            fmt(&qs),
            ratio(&vd, &qs)
        );
    }
}
