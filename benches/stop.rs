//! How fast vmm stops (`cargo bench --features testing --bench stop`), the promise being 2 s from SIGTERM to exit
//! in every state (docs/performance.md):
//!
//! - SIGTERM → exit, `VMM_BENCH_RUNS` times each (default 10), with tiny guests: idle; stdout
//!   a pipe nobody reads with output being dropped; mid-plug (`vmm apply` of a NIC, SIGTERM
//!   0–3 ms later); the reconciler checking a 256 KiB edit; resets in progress on a disk that
//!   serves one request a second (qemu-storage-daemon's throttle behind a FUSE export).
//! - A device reset with a full ring (256 reads of 8 MiB), host side: from the status write
//!   of 0 to the status reading 0, as a vCPU sees it; p50 and p99 of 200.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::hw::bus::BusDevice;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny(name: &str) -> PathBuf {
    let dir = root().join("target/tiny");
    let st = Command::new(root().join("tests/guest/tiny/build.sh"))
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success());
    dir.join(format!("{name}.elf"))
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

struct Up {
    child: Child,
    _stdout: Option<std::process::ChildStdout>,
    runtime: tempfile::TempDir,
}

fn up(file: &Path) -> Up {
    let runtime = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let private = std::fs::Permissions::from_mode(0o700);
        std::fs::set_permissions(runtime.path(), private).unwrap();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("up")
        .arg(file)
        .env("VMM_RUNTIME_DIR", runtime.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take();
    Up {
        child,
        _stdout: stdout,
        runtime,
    }
}

/// SIGTERM → exit in ms.
fn terminate(mut u: Up) -> f64 {
    let t = Instant::now();
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(u.child.id() as i32, libc::SIGTERM) };
    let st = u.child.wait().unwrap();
    assert!(st.success(), "{st}");
    t.elapsed().as_secs_f64() * 1e3
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(60), "never: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn machine(dir: &Path, kernel: &Path, body: &str) -> PathBuf {
    let f = dir.join("m.toml");
    std::fs::write(
        &f,
        format!("kernel = {:?}\n{body}", kernel.display().to_string()),
    )
    .unwrap();
    f
}

fn vmm(runtime: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .env("VMM_RUNTIME_DIR", runtime)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn report(label: &str, mut ms: Vec<f64>) {
    let n = ms.len();
    println!(
        "{label:<40} {n:>4} {:>10.1} {:>10.1}",
        pct(&mut ms, 0.5),
        pct(&mut ms, 1.0)
    );
}

const HOTPLUG: &str = "name = \"plug\"\nmemory = \"16M\"\nvcpus = 1\n[pci]\nhotplug_slots = 2\n\
                       [[serial]]\nname = \"console\"\nio = { file = \"console.log\" }\n";

fn main() {
    let runs: usize = std::env::var("VMM_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    println!("SIGTERM → vmm exit (release build), ms");
    println!(
        "{:<40} {:>4} {:>10} {:>10}",
        "state", "runs", "median", "max"
    );

    let dir = tempfile::tempdir().unwrap();
    let hotplug = tiny("hotplug");
    let stress = tiny("stress");

    // Idle.
    let f = machine(dir.path(), &hotplug, HOTPLUG);
    let log = dir.path().join("console.log");
    let ready = || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("HP-READY"));
    let mut ms = Vec::new();
    for _ in 0..runs {
        let _ = std::fs::remove_file(&log);
        let u = up(&f);
        wait_for("the guest is up", ready);
        ms.push(terminate(u));
    }
    report("idle", ms);

    // Stdout blocked.
    let spew = dir.path().join("spew");
    std::fs::create_dir_all(&spew).unwrap();
    let f2 = machine(
        &spew,
        &stress,
        "name = \"spew\"\nmemory = \"16M\"\nvcpus = 1\ncmdline = \"mode=spew bytes=400000 then=spin\"\n\
         [[serial]]\nname = \"com1\"\nio = \"stdio\"\n",
    );
    let mut ms = Vec::new();
    for _ in 0..runs.min(3) {
        let u = up(&f2);
        let rt = u.runtime.path().to_path_buf();
        wait_for("output dropped", || {
            vmm(&rt, &["status", "--format", "json"]).contains("\"output_dropped\":")
                && !vmm(&rt, &["status", "--format", "json"]).contains("\"output_dropped\":0")
        });
        ms.push(terminate(u));
    }
    report("stdout blocked (output dropped)", ms);

    // Mid-plug.
    let tap = "vmmbstop0";
    let _ = Command::new("ip").args(["link", "del", tap]).output();
    let have_tap = Command::new("ip")
        .args(["tuntap", "add", "dev", tap, "mode", "tap"])
        .status()
        .is_ok_and(|s| s.success());
    if have_tap {
        let with = dir.path().join("with.toml");
        let base = std::fs::read_to_string(&f).unwrap();
        std::fs::write(
            &with,
            format!("{base}\n[[net]]\nname = \"n\"\ntap = \"{tap}\"\n"),
        )
        .unwrap();
        let mut ms = Vec::new();
        for i in 0..runs {
            let _ = std::fs::remove_file(&log);
            let u = up(&f);
            wait_for("the guest is up", ready);
            let (rt, w) = (u.runtime.path().to_path_buf(), with.clone());
            let apply = std::thread::spawn(move || vmm(&rt, &["apply", w.to_str().unwrap()]));
            std::thread::sleep(Duration::from_micros((i as u64 % 4) * 1000));
            ms.push(terminate(u));
            let _ = apply.join();
        }
        report("mid-plug", ms);
        let _ = Command::new("ip").args(["link", "del", tap]).output();
    } else {
        println!("mid-plug: SKIPPED (cannot create a TAP)");
    }

    // Reconciler busy with a 256 KiB edit.
    let busy = dir.path().join("busy.toml");
    let mut text = std::fs::read_to_string(&f).unwrap();
    while text.len() < vmm::spec::MAX_FILE_SIZE - 64 {
        text.push_str("[[net]]\nnmae = \"x\"\n");
    }
    std::fs::write(&busy, text).unwrap();
    let mut ms = Vec::new();
    for _ in 0..runs {
        let _ = std::fs::remove_file(&log);
        let u = up(&f);
        wait_for("the guest is up", ready);
        let (rt, b) = (u.runtime.path().to_path_buf(), busy.clone());
        let apply = std::thread::spawn(move || vmm(&rt, &["apply", b.to_str().unwrap()]));
        std::thread::sleep(Duration::from_millis(20));
        ms.push(terminate(u));
        let _ = apply.join();
    }
    report("reconciler checking a 256 KiB edit", ms);

    // Resets in progress on a slow disk.
    match SlowDisk::new() {
        Some(disk) => {
            let d = dir.path().join("reset");
            std::fs::create_dir_all(&d).unwrap();
            let f = machine(
                &d,
                &tiny("blk"),
                &format!(
                    "name = \"reset\"\nmemory = \"32M\"\nvcpus = 1\ncmdline = \"mode=resetloop qd=8\"\n\
                     [[serial]]\nname = \"com1\"\nio = {{ file = \"com1.log\" }}\n\
                     [[block]]\nname = \"slow\"\npath = {:?}\n",
                    disk.path.display().to_string()
                ),
            );
            let log = d.join("com1.log");
            let mut ms = Vec::new();
            for _ in 0..runs.min(5) {
                let _ = std::fs::remove_file(&log);
                let u = up(&f);
                wait_for("a reset round", || {
                    std::fs::read_to_string(&log).is_ok_and(|l| l.contains("ROUND 1"))
                });
                ms.push(terminate(u));
            }
            report("resets in progress, 1 request/s disk", ms);
        }
        None => println!("resets in progress: SKIPPED (no qemu-storage-daemon or FUSE)"),
    }

    reset_latency();
}

/// qemu-storage-daemon exporting a 1 MiB image through FUSE at one request a second.
struct SlowDisk {
    path: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl SlowDisk {
    fn new() -> Option<SlowDisk> {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.raw");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let path = dir.path().join("export.raw");
        std::fs::File::create(&path).unwrap();
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                image.display()
            ))
            .args(["--object", "throttle-group,id=tg,x-iops-total=1"])
            .args([
                "--blockdev",
                "driver=throttle,node-name=slow,throttle-group=tg,file=file0",
            ])
            .args(["--blockdev", "driver=raw,node-name=raw0,file=slow"])
            .arg("--export")
            .arg(format!(
                "type=fuse,id=e0,node-name=raw0,mountpoint={},writable=on",
                path.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let d = SlowDisk {
            path,
            child,
            _dir: dir,
        };
        let t = Instant::now();
        loop {
            let mounted = std::fs::read_to_string("/proc/self/mountinfo")
                .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(4) == d.path.to_str()));
            if mounted {
                return Some(d);
            }
            if t.elapsed() > Duration::from_secs(10) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child; it unmounts and exits.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Reset latency of a virtio-blk function with a full ring of 256 reads of 8 MiB.
fn reset_latency() {
    use vmm::devices::block::{Block, Disk};
    use vmm::hw::transport::virtio_pci::{NOTIFY_OFFSET, VirtioPci};
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), vec![1u8; 8 << 20]).unwrap();
    let disk = Disk::open(f.path(), false, "bench").unwrap();
    let mem = vmm::hw::virtio::GuestMem::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let dev = VirtioPci::new(
        "bench",
        Box::new(Block::new(disk)),
        Arc::new(vmm::testing::NullVm),
        mem.clone(),
        0,
    )
    .unwrap();
    let w = |off: u64, v: u64, len: usize| dev.lock().write(0, off, &v.to_le_bytes()[..len]);
    let r = |off: u64| {
        let mut b = [0u8; 1];
        dev.lock().read(0, off, &mut b);
        b[0]
    };
    let (base, size, data) = (0x1000u64, 256u64, 0x10_0000u64);
    let avail = base + size * 16;
    let used = avail + 0x1000;
    let mut times = Vec::new();
    let mut served = 0u64;
    for _ in 0..200 {
        // Reset, negotiate VERSION_1, queue 0 of 256 at base, 256 reads, DRIVER_OK, kick.
        w(0x14, 0, 1);
        while r(0x14) != 0 {}
        w(0x14, 3, 1);
        w(0x08, 1, 4);
        w(0x0c, 1, 4);
        w(0x14, 11, 1);
        w(0x16, 0, 2);
        w(0x18, size, 2);
        w(0x20, base, 8);
        w(0x28, avail, 8);
        w(0x30, used, 8);
        w(0x1c, 1, 2);
        for i in 0..size {
            let d = base + i * 3 * 16;
            let hdr = 0x40000 + i * 16;
            mem.write_obj(0u64, GuestAddress(hdr)).unwrap();
            mem.write_obj(0u64, GuestAddress(hdr + 8)).unwrap();
            for (k, (addr, len, flags)) in
                [(hdr, 16u32, 1u16), (data, 8 << 20, 3), (0x50000 + i, 1, 2)]
                    .into_iter()
                    .enumerate()
            {
                let at = d + k as u64 * 16;
                mem.write_obj(addr, GuestAddress(at)).unwrap();
                mem.write_obj(len, GuestAddress(at + 8)).unwrap();
                mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
                mem.write_obj(
                    ((i * 3 + k as u64 + 1) % (3 * size)) as u16,
                    GuestAddress(at + 14),
                )
                .unwrap();
            }
            mem.write_obj((i * 3) as u16, GuestAddress(avail + 4 + i * 2))
                .unwrap();
        }
        mem.write_obj(0u16, GuestAddress(used + 2)).unwrap();
        mem.write_obj(size as u16, GuestAddress(avail + 2)).unwrap();
        w(0x14, 15, 1);
        w(NOTIFY_OFFSET, 0, 2);
        while mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap() == 0 {
            std::hint::spin_loop();
        }
        let t = Instant::now();
        w(0x14, 0, 1);
        while r(0x14) != 0 {
            std::hint::spin_loop();
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
        served += u64::from(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap());
    }
    println!();
    println!(
        "reset with a full ring (256 x 8 MiB reads), 200 runs: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; {:.1} requests served per run of 256",
        pct(&mut times, 0.5),
        pct(&mut times, 0.99),
        pct(&mut times, 1.0),
        served as f64 / 200.0
    );
}
