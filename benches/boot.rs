//! Boot benchmark (`cargo bench --bench boot`): vmm side by side with QEMU on the same guests.
//!
//! 1. A tiny guest (tests/guest/tiny/hello-pvh) that prints READY on COM1 and powers off:
//!    launch → READY, launch → exit, peak RSS; `VMM_BENCH_RUNS` runs each (default 30); vmm
//!    with its seccomp filters (the default), with `--seccomp off` and with `--private-ram`
//!    (private anonymous guest RAM instead of the shared memfd), interleaved.
//! 2. The Linux test kernel + initramfs: launch → the guest's /init printing VMM-READY;
//!    `VMM_BENCH_LINUX_RUNS` runs each (default 3; about 30 s per run on PVM hosts), shared
//!    and private RAM interleaved.
//!
//! QEMU (`qemu-system-x86_64 -M microvm`, Debian package from bookworm-backports, see
//! docs/performance.md) is measured when installed; otherwise its rows say so.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

struct Run {
    ready: Duration,
    exit: Duration,
    rss_kib: i64,
}

/// Spawns `cmd`, waits for a stdout line containing `marker`, optionally sends `after` to its
/// stdin, and waits for exit. Returns the timings and peak RSS (wait4).
fn run(mut cmd: Command, marker: &str, after: Option<&str>, limit: Duration) -> Option<Run> {
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let out = child.stdout.take()?;
    let mut stdin = child.stdin.take();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).split(b'\n').map_while(Result::ok) {
            let _ = tx.send((Instant::now(), String::from_utf8_lossy(&l).into_owned()));
        }
    });
    let mut ready = None;
    while let Ok((t, l)) = rx.recv_timeout(limit.saturating_sub(t0.elapsed())) {
        if l.contains(marker) {
            ready = Some(t - t0);
            break;
        }
    }
    if let (Some(_), Some(a), Some(s)) = (ready, after, stdin.as_mut()) {
        let _ = s.write_all(a.as_bytes());
    }
    drop(stdin);
    if ready.is_none() {
        let _ = child.kill();
    }
    let mut status = 0;
    // SAFETY: wait4 on our own child with valid out-pointers.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let exit = t0.elapsed();
    Some(Run {
        ready: ready?,
        exit,
        rss_kib: usage.ru_maxrss,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn report(label: &str, runs: &[Run]) {
    if runs.is_empty() {
        println!("{label:<34} (no successful run)");
        return;
    }
    let ms =
        |f: fn(&Run) -> Duration| median(runs.iter().map(|r| f(r).as_secs_f64() * 1e3).collect());
    let rss = median(runs.iter().map(|r| r.rss_kib as f64 / 1024.0).collect());
    println!(
        "{label:<34} {:>4} {:>12.2} {:>12.2} {:>10.1}",
        runs.len(),
        ms(|r| r.ready),
        ms(|r| r.exit),
        rss
    );
}

fn qemu() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/bin/qemu-system-x86_64");
    p.exists().then_some(p)
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let runs: usize = std::env::var("VMM_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let linux_runs: usize = std::env::var("VMM_BENCH_LINUX_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let st = Command::new(root.join("tests/guest/tiny/build.sh"))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    let tiny = dir.path().join("hello-pvh.elf");
    let m = dir.path().join("tiny.toml");
    std::fs::write(&m, format!("name = \"tiny\"\nmemory = \"16M\"\nvcpus = 1\nkernel = {:?}\n[[serial]]\nname = \"com1\"\nio = \"stdio\"\n", tiny.display().to_string())).unwrap();
    let vmm = env!("CARGO_BIN_EXE_vmm");

    println!(
        "{:<34} {:>4} {:>12} {:>12} {:>10}",
        "tiny guest (READY, power off)", "runs", "→READY ms", "→exit ms", "RSS MiB"
    );
    // Interleaved A/B: the default (a seccomp filter on every thread, RAM a shared memfd),
    // --seccomp off, and --private-ram (private anonymous RAM).
    let (mut v, mut off, mut private) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut c = Command::new(vmm);
        c.arg("up").arg(&m);
        v.extend(run(c, "READY", None, Duration::from_secs(10)));
        let mut c = Command::new(vmm);
        c.args(["up", "--seccomp", "off"]).arg(&m);
        off.extend(run(c, "READY", None, Duration::from_secs(10)));
        let mut c = Command::new(vmm);
        c.args(["up", "--private-ram"]).arg(&m);
        private.extend(run(c, "READY", None, Duration::from_secs(10)));
    }
    report("vmm up", &v);
    report("vmm up --seccomp off", &off);
    report("vmm up --private-ram", &private);
    match qemu() {
        Some(q) => {
            let mut v = Vec::new();
            for _ in 0..runs {
                let mut c = Command::new(&q);
                c.args([
                    "-M",
                    "microvm,pit=off,pic=off,rtc=off",
                    "-accel",
                    "kvm",
                    "-cpu",
                    "host,-arch-capabilities",
                    "-m",
                    "16M",
                    "-smp",
                    "1",
                ])
                .args([
                    "-nodefaults",
                    "-no-user-config",
                    "-nographic",
                    "-serial",
                    "stdio",
                    "-bios",
                    "/usr/share/qemu/qboot.rom",
                ])
                .args([
                    "-device",
                    "isa-debug-exit,iobase=0xf4,iosize=0x04",
                    "-kernel",
                ])
                .arg(&tiny);
                v.extend(run(c, "READY", None, Duration::from_secs(10)));
            }
            report("qemu -M microvm (qboot)", &v);
        }
        None => println!("{:<34} not installed", "qemu -M microvm"),
    }

    // Linux.
    let st = Command::new(root.join("tests/guest/build.sh"))
        .status()
        .unwrap();
    assert!(st.success());
    let g = root.join("target/guest");
    let cmdline = format!(
        "{} vmm_mode=test",
        std::fs::read_to_string(root.join("tests/guest/cmdline.txt"))
            .unwrap()
            .trim()
    );
    let lm = dir.path().join("linux.toml");
    std::fs::write(
        &lm,
        format!(
            "name = \"linux\"\nmemory = \"64M\"\nvcpus = 2\nkernel = {:?}\ninitrd = {:?}\ncmdline = {:?}\n[[serial]]\nname = \"com1\"\nio = \"stdio\"\n[[rtc]]\n[[i8042]]\n",
            g.join("vmlinux").display().to_string(),
            g.join("initramfs.cpio").display().to_string(),
            cmdline
        ),
    )
    .unwrap();
    println!(
        "\n{:<34} {:>4} {:>12} {:>12} {:>10}",
        "Linux test kernel (2 vCPUs, 64M)", "runs", "→/init ms", "→exit ms", "RSS MiB"
    );
    let (mut v, mut private) = (Vec::new(), Vec::new());
    for _ in 0..linux_runs {
        for (args, out) in [
            (&["up"][..], &mut v),
            (&["up", "--private-ram"][..], &mut private),
        ] {
            let mut c = Command::new(vmm);
            c.args(args).arg(&lm);
            out.extend(run(
                c,
                "VMM-READY",
                Some("poweroff -f\n"),
                Duration::from_secs(300),
            ));
        }
    }
    report("vmm up", &v);
    report("vmm up --private-ram", &private);
    match qemu() {
        Some(q) => {
            let mut v = Vec::new();
            for _ in 0..linux_runs {
                let mut c = Command::new(&q);
                c.args([
                    "-M",
                    "microvm,pit=off,pic=off",
                    "-accel",
                    "kvm",
                    "-cpu",
                    "host,-arch-capabilities",
                    "-m",
                    "64M",
                    "-smp",
                    "2",
                ])
                .args([
                    "-nodefaults",
                    "-no-user-config",
                    "-nographic",
                    "-serial",
                    "stdio",
                    "-no-reboot",
                ])
                .arg("-kernel")
                .arg(g.join("vmlinux"))
                .arg("-initrd")
                .arg(g.join("initramfs.cpio"))
                .args(["-append", &cmdline]);
                v.extend(run(
                    c,
                    "VMM-READY",
                    Some("poweroff -f\n"),
                    Duration::from_secs(300),
                ));
            }
            report("qemu -M microvm", &v);
        }
        None => println!("{:<34} not installed", "qemu -M microvm"),
    }
}
