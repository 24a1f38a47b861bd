//! vmm ends soon after SIGTERM whatever it is doing: with its stdout blocked, mid-plug, with
//! the reconciler busy, with a device reset in progress on a slow disk. Each test has a
//! generous hang net; the promise (2 s) is measured by benches/stop.rs. Each also checks the
//! sign of the old failure: a vCPU thread that did not stop within 5 s.
//!
//! And a stdout nobody reads never stops the guest: its output is dropped and counted.

mod common;

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::tap::Tap;
use common::vm::{Machine, Vm, kvm_or_skip, tiny};

/// Longest any test here waits for vmm to end (a hang, not a slow exit).
const HANG: Duration = Duration::from_secs(60);

/// `vmm up` with stdout a pipe nobody reads (its read end is held, never read).
struct Up {
    vm: Vm,
    _unread: std::os::fd::OwnedFd,
}

impl Up {
    fn start(file: &Path) -> Up {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fresh descriptors into the array we own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both are ours, each wrapped once.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let vm = Vm::start_with_stdout(file, HANG, &[], Stdio::from(w));
        Up { vm, _unread: r }
    }

    /// Waits until `f` holds (polling); panics with vmm's stderr after the hang net.
    fn until(&mut self, what: &str, f: impl Fn(&Vm) -> bool) {
        let t = Instant::now();
        while !f(&self.vm) {
            if t.elapsed() > HANG || matches!(self.vm.child.try_wait(), Ok(Some(_))) {
                panic!("never: {what}\nstderr:\n{}", self.vm.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn terminate(self) -> Duration {
        self.vm.terminate().0
    }
}

fn dropped(vm: &Vm, device: &str) -> u64 {
    let (_, out, _) = vm.vmm(&["status", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["name"] == device)
        .and_then(|d| d["output_dropped"].as_u64())
        .unwrap_or(0)
}

fn spew(then: &str) -> Machine {
    let body = format!(
        "name = \"spew\"\nmemory = \"16M\"\nvcpus = 1\ncmdline = \"mode=spew bytes=400000 {then}\"\n\
         [[serial]]\nname = \"com1\"\nio = \"stdio\"\n"
    );
    Machine::new(&tiny("stress"), &body)
}

/// The guest writes 400 KB to its console, vmm's stdout is a pipe nobody reads (64 KiB fill
/// it): the guest still finishes and powers off. Once, the vCPU blocked in write(2) for good.
#[test]
fn a_stdout_nobody_reads_never_stops_the_guest() {
    if !kvm_or_skip("a_stdout_nobody_reads_never_stops_the_guest") {
        return;
    }
    let m = spew("");
    let up = Up::start(&m.file);
    let t = Instant::now();
    let (code, _, err) = up.vm.finish();
    let took = t.elapsed();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("the guest powered off"), "{err}");
    eprintln!("400 KB to a stdout nobody reads: powered off after {took:?}");
}

#[test]
fn sigterm_with_stdout_blocked() {
    if !kvm_or_skip("sigterm_with_stdout_blocked") {
        return;
    }
    let m = spew("then=spin");
    let mut up = Up::start(&m.file);
    // Past the pipe and the buffer: output is being dropped, and `vmm status` says so.
    up.until("output dropped", |vm| dropped(vm, "com1") > 10_000);
    let (_, status, _) = up.vm.vmm(&["status"]);
    assert!(status.contains("bytes of output dropped"), "{status}");
    let took = up.terminate();
    eprintln!("SIGTERM with stdout blocked: ended after {took:?}");
}

const HOTPLUG: &str = "name = \"plug\"\nmemory = \"16M\"\nvcpus = 1\n[pci]\nhotplug_slots = 2\n\
                       [[serial]]\nname = \"console\"\nio = { file = \"console.log\" }\n";

/// SIGTERM at varying points while `vmm apply` plugs and unplugs a NIC.
#[test]
fn sigterm_mid_plug() {
    if !kvm_or_skip("sigterm_mid_plug") {
        return;
    }
    let tap = "vmmstop0";
    let Some(_tap) = Tap::new(tap, "10.213.12.1/24") else {
        common::skip("sigterm_mid_plug", "cannot create a TAP (needs root)");
        return;
    };
    let m = Machine::new(&tiny("hotplug"), HOTPLUG);
    let base = std::fs::read_to_string(&m.file).unwrap();
    let with_nic = m.dir.path().join("with.toml");
    std::fs::write(
        &with_nic,
        format!("{base}\n[[net]]\nname = \"n\"\ntap = \"{tap}\"\n"),
    )
    .unwrap();
    let mut worst = Duration::ZERO;
    for round in 0..6u64 {
        let mut up = Up::start(&m.file);
        let log = m.dir.path().join("console.log");
        up.until("the guest is up", |_| {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("HP-READY"))
        });
        let runtime = up.vm.runtime_dir();
        let file = if round % 2 == 0 {
            with_nic.clone()
        } else {
            m.file.clone()
        };
        let apply = std::thread::spawn(move || apply(&runtime, &file));
        std::thread::sleep(Duration::from_micros(round * 700));
        worst = worst.max(up.terminate());
        let _ = apply.join();
        let _ = std::fs::remove_file(&log);
    }
    eprintln!("SIGTERM mid-plug: worst {worst:?} of 6");
}

fn apply(runtime: &Path, file: &Path) {
    let _ = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("apply")
        .arg(file)
        .env("VMM_RUNTIME_DIR", runtime)
        .output();
}

/// SIGTERM while the reconciler checks an edit whose kernel became a FIFO (once its open
/// blocked forever, and so did vmm's exit) and whose size is at the limit.
#[test]
fn sigterm_while_the_reconciler_is_busy() {
    if !kvm_or_skip("sigterm_while_the_reconciler_is_busy") {
        return;
    }
    let m = Machine::new(&tiny("hotplug"), HOTPLUG);
    let fifo = m.dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let text = std::fs::read_to_string(&m.file).unwrap();
    let mut edit = format!("{text}cmdline = \"x\"\n");
    edit = edit.replacen(
        &format!("kernel = {:?}", tiny("hotplug").display().to_string()),
        "kernel = \"fifo\"",
        1,
    );
    while edit.len() < vmm::spec::MAX_FILE_SIZE - 64 {
        edit.push_str("[[net]]\nnmae = \"x\"\n");
    }
    let busy: PathBuf = m.dir.path().join("busy.toml");
    std::fs::write(&busy, &edit).unwrap();
    let up = Up::start(&m.file);
    std::thread::sleep(Duration::from_millis(300));
    let runtime = up.vm.runtime_dir();
    let b2 = busy.clone();
    let apply = std::thread::spawn(move || apply(&runtime, &b2));
    std::thread::sleep(Duration::from_millis(30));
    let took = up.terminate();
    let _ = apply.join();
    eprintln!("SIGTERM with the reconciler busy: ended after {took:?}");
}

/// SIGTERM while the guest resets its block device over and over with writes in flight on a
/// disk that serves one request a second (writes: FUSE caches reads): the vCPU never waits for the worker, and the
/// worker stops after the request it is in.
#[test]
fn sigterm_with_a_device_reset_in_progress() {
    let test = "sigterm_with_a_device_reset_in_progress";
    if !kvm_or_skip(test) || !common::qsd::available(test) {
        return;
    }
    let disk = common::qsd::Export::new(1 << 20, common::qsd::Fault::Slow { iops: 1 });
    let body = format!(
        "name = \"reset\"\nmemory = \"32M\"\nvcpus = 1\ncmdline = \"mode=resetloop qd=8\"\n\
         [[serial]]\nname = \"com1\"\nio = {{ file = \"com1.log\" }}\n\
         [[block]]\nname = \"slow\"\npath = {:?}\n",
        disk.path.display().to_string()
    );
    let m = Machine::new(&tiny("blk"), &body);
    let log = m.dir.path().join("com1.log");
    let mut up = Up::start(&m.file);
    up.until("a second round of resets", |_| {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("ROUND 1"))
    });
    let took = up.terminate();
    let rounds = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!(
        "SIGTERM with a reset in progress: ended after {took:?} ({} rounds)",
        rounds.matches("ROUND").count()
    );
}
