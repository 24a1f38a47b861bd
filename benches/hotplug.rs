//! Hotplug latency (`cargo bench --bench hotplug`): from saving the machine file to
//! (a) vmm signalling the hotplug event to the guest and (b) the guest seeing the new PCI
//! function, and for removals from the save to the guest's eject and to vmm's "removed".
//!
//! The guest is tests/guest/tiny/hotplug.S: it polls bus 0's configuration space and prints
//! `HP+ <slot> …` on COM1 the moment a function answers, and ejects what the host asks back
//! (`EJ <slot>`). Times are CLOCK_MONOTONIC: the save is stamped here just before the rename
//! that completes it, (a) comes from vmm's debug log ("signalled at monotonic …"), (b) is when
//! the guest's line arrives here. `VMM_BENCH_RUNS` add/remove cycles (default 50) of a NIC,
//! the NIC through `vmm apply` (the explicit path: a process start and a control socket call),
//! then of a disk and of a vhost-user disk (qemu-storage-daemon's vhost-user-blk export).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn now() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn save(path: &Path, text: &str) -> f64 {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    let t = now();
    std::fs::rename(&tmp, path).unwrap();
    t
}

/// Waits for a console line containing `pat`; returns when it arrived.
fn wait_line(rx: &Receiver<(f64, String)>, pat: &str, log: &Mutex<Vec<(f64, String)>>) -> f64 {
    loop {
        let (t, l) = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                let log: Vec<String> = log.lock().unwrap().iter().map(|(_, l)| l.clone()).collect();
                panic!("no {pat:?} from the guest; vmm's log:\n{}", log.concat())
            });
        if l.contains(pat) {
            return t;
        }
    }
}

/// Waits until vmm's log has `n` lines containing `pat`; returns the number after "monotonic "
/// on the n-th, or the time the n-th arrived.
fn wait_log(log: &Mutex<Vec<(f64, String)>>, pat: &str, n: usize) -> (f64, Option<f64>) {
    for _ in 0..20_000 {
        {
            let l = log.lock().unwrap();
            if let Some((t, line)) = l.iter().filter(|(_, s)| s.contains(pat)).nth(n - 1) {
                let mono = line
                    .split("monotonic ")
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .and_then(|s| s.parse().ok());
                return (*t, mono);
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    panic!("vmm never logged {pat:?} {n} times");
}

/// A TAP deleted on drop.
struct DelTap(String);

impl Drop for DelTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// A child process killed on drop.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stats(name: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    println!(
        "  {name:<34} median {:>7.3} ms   p99 {:>7.3} ms   min {:>7.3}   max {:>7.3}   (n={})",
        q(0.5) * 1e3,
        q(0.99) * 1e3,
        v[0] * 1e3,
        v[v.len() - 1] * 1e3,
        v.len()
    );
}

fn main() {
    if std::fs::File::open("/dev/kvm").is_err() {
        println!("hotplug bench: SKIPPED (no /dev/kvm)");
        return;
    }
    let runs: usize = std::env::var("VMM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let tiny = root().join("target/tiny");
    let st = Command::new(root().join("tests/guest/tiny/build.sh"))
        .arg(&tiny)
        .status()
        .unwrap();
    assert!(st.success());
    let vmm = root().join("target/x86_64-unknown-linux-gnu/release/vmm");
    assert!(vmm.exists(), "build vmm first: cargo build --release");
    let dir = tempfile::tempdir().unwrap();
    let tap = format!("vmmb{}", std::process::id() % 100_000);
    let ok = Command::new("ip")
        .args(["tuntap", "add", "dev", &tap, "mode", "tap"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("hotplug bench: SKIPPED (cannot create a TAP: needs root)");
        return;
    }
    let _tap = DelTap(tap.clone());
    let file = dir.path().join("bench.toml");
    let base = format!(
        "name = \"hpbench\"\nmemory = \"16M\"\nvcpus = 1\nkernel = {:?}\n\n[pci]\nhotplug_slots = 2\n\n[[serial]]\nname = \"console\"\nio = \"stdio\"\n",
        tiny.join("hotplug.elf").display().to_string()
    );
    let with_nic = format!("{base}\n[[net]]\nname = \"n\"\ntap = \"{tap}\"\n");
    let other = dir.path().join("other.toml");
    std::fs::write(&file, &base).unwrap();
    let runtime = dir.path().join("run");
    let mut cmd = Command::new(&vmm);
    cmd.arg("up")
        .arg(&file)
        .env("RUST_LOG", "vmm::backend::kvm::live=debug,warn")
        .env("VMM_RUNTIME_DIR", &runtime)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The VM dies with this process, even when a wait below panics.
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = Kill(cmd.spawn().unwrap());
    let child_out = child.0.stdout.take();
    let child_err = child.0.stderr.take();
    let (tx, rx) = channel();
    let out = child_out.unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).split(b'\n').map_while(Result::ok) {
            let _ = tx.send((now(), String::from_utf8_lossy(&l).into_owned()));
        }
    });
    let log = Arc::new(Mutex::new(Vec::new()));
    let l2 = log.clone();
    let mut err = child_err.unwrap();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = err.read(&mut chunk) {
            if n == 0 {
                break;
            }
            let t = now();
            buf.extend_from_slice(&chunk[..n]);
            while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                l2.lock()
                    .unwrap()
                    .push((t, String::from_utf8_lossy(&line).into_owned()));
            }
        }
    });
    wait_line(&rx, "HP-READY", &log);

    let mut n = 0;
    let mut apply_visible = vec![];
    let nic = save_cycles(&file, &base, &with_nic, runs, &rx, &log, &mut n);
    // The explicit path: `vmm apply` of another file (a process start + a socket round trip).
    std::fs::write(&other, &with_nic).unwrap();
    let other_base = dir.path().join("other-base.toml");
    std::fs::write(&other_base, &base).unwrap();
    for _ in 0..runs {
        n += 1;
        let t0 = now();
        let st = Command::new(&vmm)
            .arg("apply")
            .arg(&other)
            .env("VMM_RUNTIME_DIR", &runtime)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        apply_visible.push(wait_line(&rx, "HP+ 1e", &log) - t0);
        let st = Command::new(&vmm)
            .arg("apply")
            .arg(&other_base)
            .env("VMM_RUNTIME_DIR", &runtime)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        wait_line(&rx, "EJ 1e", &log);
        wait_log(&log, "removed after the guest released it", n);
        wait_line(&rx, "HP- 1e", &log);
    }
    // Disks: an in-process one, and one served by `vmm device block` through the front end.
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let with_disk = format!(
        "{base}\n[[block]]\nname = \"d\"\npath = {:?}\n",
        image.display().to_string()
    );
    let disk = save_cycles(&file, &base, &with_disk, runs, &rx, &log, &mut n);
    let vu_image = dir.path().join("vu.img");
    std::fs::write(&vu_image, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("vu.sock");
    // qemu-storage-daemon keeps serving after a front end leaves (`vmm device` serves one).
    let mut backend = Command::new("qemu-storage-daemon");
    backend
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={}",
            vu_image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,writable=on,addr.type=unix,addr.path={}",
            sock.display()
        ))
        .stderr(Stdio::null());
    let _backend = Kill(backend.spawn().unwrap());
    for _ in 0..2000 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let with_vu = format!(
        "{base}\n[[vhost_user]]\nname = \"vd\"\nsocket = {:?}\ndevice = \"block\"\n",
        sock.display().to_string()
    );
    let vu = save_cycles(&file, &base, &with_vu, runs, &rx, &log, &mut n);
    drop(child);

    println!("hotplug latency, tiny guest polling config space, {runs} cycles each:");
    for (what, c) in [
        ("NIC (TAP)", nic),
        ("disk (raw image)", disk),
        ("vhost-user disk (qemu-storage-daemon)", vu),
    ] {
        println!(" {what}:");
        stats("save → hotplug signalled (a)", c.signalled);
        stats("save → function visible (b)", c.visible);
        stats("  of which signalled → visible", c.guest_part);
        stats("save → guest ejects", c.ejected);
        stats("save → vmm reports removed", c.removed);
    }
    stats("vmm apply start → visible (NIC)", apply_visible);
}

/// Times of `runs` add/remove cycles by saving `with` then `base`.
#[derive(Default)]
struct Cycles {
    signalled: Vec<f64>,
    visible: Vec<f64>,
    guest_part: Vec<f64>,
    ejected: Vec<f64>,
    removed: Vec<f64>,
}

fn save_cycles(
    file: &Path,
    base: &str,
    with: &str,
    runs: usize,
    rx: &Receiver<(f64, String)>,
    log: &Mutex<Vec<(f64, String)>>,
    n: &mut usize,
) -> Cycles {
    let mut c = Cycles::default();
    for _ in 0..runs {
        *n += 1;
        let t0 = save(file, with);
        let seen = wait_line(rx, "HP+ 1e", log);
        let (_, mono) = wait_log(log, "hotplug: slot 30 signalled at", *n);
        let sig = mono.expect("a monotonic stamp");
        c.signalled.push(sig - t0);
        c.visible.push(seen - t0);
        c.guest_part.push(seen - sig);
        let t1 = save(file, base);
        let ej = wait_line(rx, "EJ 1e", log);
        let (rm, _) = wait_log(log, "removed after the guest released it", *n);
        // The guest has seen the slot empty before the next plug.
        wait_line(rx, "HP- 1e", log);
        c.ejected.push(ej - t1);
        c.removed.push(rm - t1);
    }
    c
}
