//! vhost-user front end benchmark (`cargo bench --bench frontend`): the freestanding virtio-blk
//! guest (tests/guest/tiny/blk.c `mode=bench`, the used ring polled, no interrupts) reading
//! through vmm's in-process block device, and through `[[vhost_user]]` to `vmm device block`
//! and to qemu-storage-daemon's vhost-user-blk export, on the same page-cached image.
//!
//! Workloads: 4 KiB random reads at queue depth 1 and 8 (blk.c's deepest), 1 MiB sequential
//! reads at depth 1. Time is from the guest's `BENCH start` to `BENCH done` line as vmm's
//! stdout delivers them. `VMM_BENCH_RUNS` rounds (default 3), contenders rotated each round;
//! medians.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Workload {
    name: &'static str,
    size: u32,
    qd: u32,
    ops: u64,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "4K random read QD1",
        size: 4096,
        qd: 1,
        ops: 20_000,
    },
    Workload {
        name: "4K random read QD8",
        size: 4096,
        qd: 8,
        ops: 40_000,
    },
    Workload {
        name: "1M sequential read QD1",
        size: 1 << 20,
        qd: 1,
        ops: 1_000,
    },
];

/// A back-end process, killed on drop.
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
    t.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8 && f[3] == "00010000" && f[7..].join(" ") == p
    })
}

fn start(mut cmd: Command, socket: &Path) -> Option<Daemon> {
    let _ = std::fs::remove_file(socket);
    let d = Daemon(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?,
    );
    let end = Instant::now() + Duration::from_secs(20);
    while !listening(socket) {
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Some(d)
}

#[derive(Clone, Copy, PartialEq)]
enum Contender {
    InProcess,
    VmmDevice,
    Qsd,
}

impl Contender {
    fn label(self) -> &'static str {
        match self {
            Contender::InProcess => "in-process [[block]]",
            Contender::VmmDevice => "[[vhost_user]] → vmm device block",
            Contender::Qsd => "[[vhost_user]] → qemu-storage-daemon",
        }
    }
}

/// One guest run: seconds from BENCH start to BENCH done, or None.
fn run_once(c: Contender, w: &Workload, dir: &Path, image: &Path, guest: &Path) -> Option<f64> {
    let vmm = env!("CARGO_BIN_EXE_vmm");
    let sock = dir.join("bench.sock");
    let _daemon = match c {
        Contender::InProcess => None,
        Contender::VmmDevice => {
            let mut cmd = Command::new(vmm);
            cmd.args(["device", "block", "--socket"])
                .arg(&sock)
                .arg("--path")
                .arg(image);
            Some(start(cmd, &sock)?)
        }
        Contender::Qsd => {
            let mut cmd = Command::new("qemu-storage-daemon");
            cmd.arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=f0,filename={},cache.direct=off",
                    image.display()
                ))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e0,node-name=f0,writable=on,addr.type=unix,addr.path={}",
                    sock.display()
                ));
            Some(start(cmd, &sock)?)
        }
    };
    let disk = match c {
        Contender::InProcess => format!(
            "[[block]]\nname = \"d\"\npath = {:?}\n",
            image.display().to_string()
        ),
        _ => format!(
            "[[vhost_user]]\nname = \"d\"\nsocket = {:?}\ndevice = \"block\"\nqueue_size = 256\n",
            sock.display().to_string()
        ),
    };
    let m = dir.join("bench.toml");
    std::fs::write(
        &m,
        format!(
            "name = \"fe\"\nmemory = \"32M\"\nvcpus = 1\nkernel = {:?}\ncmdline = \"mode=bench op=read size={} qd={} ops={}\"\n[[serial]]\nname = \"com1\"\nio = \"stdio\"\n{disk}",
            guest.display().to_string(),
            w.size,
            w.qd,
            w.ops
        ),
    )
    .ok()?;
    let mut child = Command::new(vmm)
        .arg("up")
        .arg(&m)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let out = BufReader::new(child.stdout.take()?);
    let (mut t0, mut took) = (None, None);
    for l in out.lines().map_while(Result::ok) {
        if l.contains("BENCH start") {
            t0 = Some(Instant::now());
        } else if l.contains("BENCH done") {
            took = t0.map(|t| t.elapsed().as_secs_f64());
            break;
        } else if l.starts_with("ERR") || l.starts_with("TIMEOUT") || l.contains("usage") {
            eprintln!("{}: {}: {l}", c.label(), w.name);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    took
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let runs: usize = std::env::var("VMM_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let st = Command::new(root.join("tests/guest/tiny/build.sh"))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    let guest = dir.path().join("blk.elf");
    let image = dir.path().join("bench.img");
    // 64 MiB of non-zero data, read once so the page cache holds it for every contender.
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let mut data = Vec::with_capacity(64 << 20);
    for _ in 0..64 {
        data.extend_from_slice(&chunk);
    }
    std::fs::write(&image, &data).unwrap();
    let qsd = Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let mut contenders = vec![Contender::InProcess, Contender::VmmDevice];
    if qsd {
        contenders.push(Contender::Qsd);
    }
    println!("| workload | contender | runs | median | per second | vs in-process |");
    println!("|---|---|---|---|---|---|");
    for w in WORKLOADS {
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); contenders.len()];
        for round in 0..runs {
            for k in 0..contenders.len() {
                let i = (k + round) % contenders.len();
                if let Some(t) = run_once(contenders[i], w, dir.path(), &image, &guest) {
                    times[i].push(t);
                }
            }
        }
        let base = median(times[0].clone());
        for (i, c) in contenders.iter().enumerate() {
            let Some(t) = median(times[i].clone()) else {
                println!(
                    "| {} | {} | 0 | (no successful run) | | |",
                    w.name,
                    c.label()
                );
                continue;
            };
            let rate = w.ops as f64 / t;
            let per = if w.size >= 1 << 20 {
                format!("{:.2} GB/s", rate * f64::from(w.size) / 1e9)
            } else {
                format!("{:.0} IOPS", rate)
            };
            let ratio = base.map_or(String::new(), |b| format!("{:.0}%", b / t * 100.0));
            println!(
                "| {} | {} | {} | {:.3} s | {per} | {ratio} |",
                w.name,
                c.label(),
                times[i].len(),
                t
            );
        }
    }
    if !qsd {
        println!("qemu-storage-daemon is not installed (qemu-utils): its rows are missing");
    }
}
