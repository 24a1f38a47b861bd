//! `vmm check` wall time and peak RSS (a plain harness: `cargo bench --bench check`).
//!
//! Machines: machines/dev.toml; a valid 31-device machine (bus 0 full); and a generated file
//! with 1,000 devices (nets and disks with their TAPs, MACs and images), which cannot fit on
//! bus 0, so `vmm check` validates all of it and reports the devices that find no slot.
//! Each is run `VMM_BENCH_RUNS` times (default 50); medians and p90 are printed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

fn measure(args: &[&str], cwd: &Path, runs: usize) -> (Vec<f64>, Vec<i64>, i32) {
    let mut times = Vec::new();
    let mut rss = Vec::new();
    let mut code = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(args)
            .current_dir(cwd)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut status = 0;
        // SAFETY: plain wait4 on our own child with valid out-pointers.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let pid = child.id() as libc::pid_t;
        unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        times.push(t.elapsed().as_secs_f64() * 1e3);
        rss.push(usage.ru_maxrss);
        code = libc::WEXITSTATUS(status);
    }
    (times, rss, code)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let runs: usize = std::env::var("VMM_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vmlinux"), b"kernel").unwrap();
    let head = "#:schema ../schema/machine.schema.json\nname = \"bench\"\nmemory = \"1G\"\nvcpus = 2\nkernel = \"vmlinux\"\ncmdline = \"console=ttyS0\"\n\n[pci]\nhotplug_slots = 8\n\n[[serial]]\nname = \"com1\"\nio = \"stdio\"\n\n[[rtc]]\n\n[[i8042]]\n";
    let make = |n: usize| {
        let mut s = head.to_string();
        for i in 0..n {
            if i % 2 == 0 {
                s.push_str(&format!("\n[[net]]\nname = \"net{i}\"\ntap = \"tap{i}\"\nmac = \"52:54:00:{:02x}:{:02x}:01\"\n", i / 256, i % 256));
            } else {
                let img = format!("disk{i}.img");
                std::fs::write(dir.path().join(&img), [0u8; 512]).unwrap();
                s.push_str(&format!(
                    "\n[[block]]\nname = \"disk{i}\"\npath = \"{img}\"\nserial = \"D{i}\"\n"
                ));
            }
        }
        s
    };
    std::fs::write(dir.path().join("d1000.toml"), make(997)).unwrap();
    std::fs::write(dir.path().join("d31.toml"), make(28)).unwrap();

    println!("vmm check: {runs} runs each (release build)");
    println!(
        "{:<28} {:>6} {:>11} {:>11} {:>14}",
        "machine", "exit", "median ms", "p90 ms", "peak RSS MiB"
    );
    for (label, file, cwd) in [
        ("machines/dev.toml", "machines/dev.toml", root),
        ("31 devices (valid)", "d31.toml", dir.path()),
        ("1000 devices (bus 0 full)", "d1000.toml", dir.path()),
    ] {
        let (mut t, r, code) = measure(&["check", file], cwd, runs);
        let mut r: Vec<f64> = r.iter().map(|&k| k as f64 / 1024.0).collect();
        println!(
            "{label:<28} {code:>6} {:>11.2} {:>11.2} {:>14.1}",
            pct(&mut t, 0.5),
            pct(&mut t, 0.9),
            pct(&mut r, 0.5)
        );
    }
}
