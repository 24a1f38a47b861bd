//! `vmm check` wall time and peak RSS (a plain harness: `cargo bench --bench check`).
//!
//! Machines: machines/dev.toml; a valid 31-device machine (bus 0 full); and a generated file
//! with 1,000 devices (nets and disks with their TAPs, MACs and images), which cannot fit on
//! bus 0, so `vmm check` validates all of it and reports the devices that find no slot.
//! Then hostile inputs, the worst found for each part of the check, each as large as vmm
//! reads (256 KiB; one 300 MiB file): unknown keys, misspelt device keys, type errors, deep
//! nesting, tens of thousands of devices, a huge file. The worst median time and the worst
//! peak RSS over them are printed last (docs/performance.md: answer within 200 ms, peak RSS
//! at most 64 MiB).
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
        // Reaped by wait4 below, which also gives its peak RSS.
        #[allow(clippy::zombie_processes)]
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
        // SAFETY: as above; the child is reaped here (`Child::wait` would reap it first).
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
    let hostile = hostile_inputs(dir.path());
    let mut cases: Vec<(String, String, &Path)> = vec![
        ("machines/dev.toml".into(), "machines/dev.toml".into(), root),
        ("31 devices (valid)".into(), "d31.toml".into(), dir.path()),
        (
            "1000 devices (bus 0 full)".into(),
            "d1000.toml".into(),
            dir.path(),
        ),
    ];
    cases.extend(
        hostile
            .iter()
            .map(|(l, f)| (format!("hostile: {l}"), f.clone(), dir.path())),
    );
    let (mut worst_ms, mut worst_rss) = (0f64, 0f64);
    for (i, (label, file, cwd)) in cases.iter().enumerate() {
        let (mut t, r, code) = measure(&["check", file], cwd, runs);
        let mut r: Vec<f64> = r.iter().map(|&k| k as f64 / 1024.0).collect();
        let (med, rss) = (pct(&mut t, 0.5), pct(&mut r, 1.0));
        if i >= 3 {
            worst_ms = worst_ms.max(med);
            worst_rss = worst_rss.max(rss);
        }
        println!(
            "{label:<28} {code:>6} {med:>11.2} {:>11.2} {:>14.1}",
            pct(&mut t, 0.9),
            pct(&mut r, 0.5)
        );
    }
    println!("hostile inputs: worst median {worst_ms:.1} ms, worst peak RSS {worst_rss:.1} MiB");
}

/// Files as large as vmm reads, each the worst case for one part of the check.
fn hostile_inputs(dir: &Path) -> Vec<(&'static str, String)> {
    let max = vmm::spec::MAX_FILE_SIZE;
    let head = "name = \"m\"\nmemory = \"64M\"\nvcpus = 1\nkernel = \"vmlinux\"\n";
    // Repeats `unit` after `head` up to the size limit, in whole units.
    let fill = |head: &str, unit: &dyn Fn(usize) -> String| {
        let mut s = head.to_string();
        for i in 0.. {
            let u = unit(i);
            if s.len() + u.len() > max {
                break;
            }
            s.push_str(&u);
        }
        s
    };
    let cases: Vec<(&'static str, String)> = vec![
        ("unknown keys", fill(head, &|i| format!("key{i} = 1\n"))),
        (
            "misspelt device keys",
            fill(head, &|_| "[[net]]\nnmae = \"x\"\n".into()),
        ),
        (
            "type errors",
            fill(head, &|i| {
                format!("[[rng]]\nname = {i}\nrate = [1]\nslot = \"x\"\n")
            }),
        ),
        (
            "duplicate names and TAPs",
            fill(head, &|i| {
                format!("[[net]]\nname = \"n{}\"\ntap = \"t\"\n", i % 3)
            }),
        ),
        (
            "missing disk images",
            fill(head, &|i| {
                format!("[[block]]\nname = \"b{i}\"\npath = \"missing{i}.img\"\n")
            }),
        ),
        (
            "devices past bus 0",
            fill(head, &|i| format!("[[rng]]\nname = \"r{i}\"\n")),
        ),
        ("deep nesting", format!("a = {}", "[".repeat(max - 8))),
    ];
    let mut out = Vec::new();
    for (i, (label, text)) in cases.into_iter().enumerate() {
        let f = format!("hostile{i}.toml");
        std::fs::write(dir.join(&f), text).unwrap();
        out.push((label, f));
    }
    let huge = std::fs::File::create(dir.join("huge.toml")).unwrap();
    huge.set_len(300 << 20).unwrap();
    out.push(("a 300 MiB file", "huge.toml".into()));
    out
}
