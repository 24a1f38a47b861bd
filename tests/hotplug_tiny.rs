//! Hotplug churn with a freestanding guest (tests/guest/tiny/hotplug.S) that answers the
//! hotplug controller itself: it reports functions appearing in config space and ejects what
//! the host asks back. Many add/remove cycles by saving the machine file leave vmm with the
//! same open files, threads and (nearly) the same memory.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::tap::Tap;
use common::vm::{Machine, Vm, kvm_or_skip, tiny};

fn save(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Usage {
    fds: usize,
    threads: usize,
    rss_kib: u64,
}

fn usage(pid: i32) -> Usage {
    let count = |d: String| std::fs::read_dir(d).unwrap().count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    Usage {
        fds: count(format!("/proc/{pid}/fd")),
        threads: count(format!("/proc/{pid}/task")),
        rss_kib,
    }
}

const BODY: &str = r#"name = "churn"
memory = "16M"
vcpus = 1

[pci]
hotplug_slots = 2

[[serial]]
name = "console"
io = "stdio"
"#;

#[test]
fn add_remove_cycles_leak_nothing() {
    let test = "add_remove_cycles_leak_nothing";
    if !kvm_or_skip(test) {
        return;
    }
    let tap_name = Tap::unique_name("vmmc");
    let Some(_tap) = Tap::new(&tap_name, "10.213.11.1/24") else {
        common::skip(
            test,
            "cannot create a TAP interface (needs root and /dev/net/tun)",
        );
        return;
    };
    let m = Machine::new(&tiny("hotplug"), BODY);
    let file = m.file.clone();
    let base = std::fs::read_to_string(&file).unwrap();
    let with_nic = format!("{base}\n[[net]]\nname = \"n\"\ntap = \"{tap_name}\"\n");
    let mut vm = Vm::start(&file, Duration::from_secs(300), &[]);
    vm.expect("HP-READY");
    let pid = vm.pid();

    let cycle = |vm: &mut Vm, i: usize| {
        save(&file, &with_nic);
        vm.expect("HP+ 1e 1af4:1041");
        save(&file, &base);
        vm.expect("EJ 1e");
        vm.expect("HP- 1e");
        vm.expect_stderr("removed after the guest released it", i);
    };
    const WARMUP: usize = 5;
    const CYCLES: usize = 100;
    for i in 1..=WARMUP {
        cycle(&mut vm, i);
    }
    let before = usage(pid);
    let t = Instant::now();
    for i in WARMUP + 1..=WARMUP + CYCLES {
        cycle(&mut vm, i);
    }
    let took = t.elapsed();
    let after = usage(pid);
    println!(
        "{CYCLES} add/remove cycles in {:.2} s: fds {} -> {}, threads {} -> {}, RSS {} -> {} KiB",
        took.as_secs_f64(),
        before.fds,
        after.fds,
        before.threads,
        after.threads,
        before.rss_kib,
        after.rss_kib
    );
    assert_eq!(before.fds, after.fds, "open files grew");
    assert_eq!(before.threads, after.threads, "threads grew");
    assert!(
        after.rss_kib <= before.rss_kib + 1024,
        "RSS grew by {} KiB over {CYCLES} cycles",
        after.rss_kib - before.rss_kib
    );
    // Every plug was reported, and the VM is as it started.
    let e = vm.stderr();
    assert_eq!(
        e.matches("+ net `n`: plugged").count(),
        WARMUP + CYCLES,
        "{e}"
    );
    let (rc, out, _) = vm.vmm(&["status", "churn", "--format", "json"]);
    assert_eq!(rc, 0);
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["hotplug_free"], 2, "{s}");
}

/// The control socket commands against a running VM: `vmm plan FILE` changes nothing,
/// `vmm apply FILE` does what a save does, bad files and bad requests get clear answers, and
/// `vmm status` / `vmm stop` find the VM by name, by file, or as the only one running.
#[test]
fn control_socket_commands() {
    let test = "control_socket_commands";
    if !kvm_or_skip(test) {
        return;
    }
    let tap_name = Tap::unique_name("vmmk");
    let Some(_tap) = Tap::new(&tap_name, "10.213.12.1/24") else {
        common::skip(
            test,
            "cannot create a TAP interface (needs root and /dev/net/tun)",
        );
        return;
    };
    let m = Machine::new(&tiny("hotplug"), &BODY.replace("churn", "ctl"));
    let base = std::fs::read_to_string(&m.file).unwrap();
    let other = m.dir.path().join("other.toml");
    std::fs::write(
        &other,
        format!("{base}\n[[net]]\nname = \"n\"\ntap = \"{tap_name}\"\n"),
    )
    .unwrap();
    let bad = m.dir.path().join("bad.toml");
    std::fs::write(&bad, base.replace("vcpus = 1", "vcpus = 0")).unwrap();
    let restart = m.dir.path().join("restart.toml");
    std::fs::write(&restart, base.replace("16M", "32M")).unwrap();
    let mut vm = Vm::start(&m.file, Duration::from_secs(120), &[]);
    vm.expect("HP-READY");
    let path = |p: &Path| p.display().to_string();

    // plan: what would happen, nothing happens.
    let (rc, out, err) = vm.vmm(&["plan", &path(&other)]);
    assert_eq!(rc, 0, "{out}{err}");
    assert!(out.contains("would apply 1 live change"), "{out}");
    assert!(out.contains("+ net `n`: add into hotplug slot 30"), "{out}");
    let (_, st, _) = vm.vmm(&["status", "ctl"]);
    assert!(st.contains("2 free of 2"), "{st}");

    // apply: the device arrives in the guest.
    let (rc, out, err) = vm.vmm(&["apply", &path(&other)]);
    assert_eq!(rc, 0, "{out}{err}");
    assert!(
        out.contains("+ net `n`: plugged into hotplug slot 30"),
        "{out}"
    );
    vm.expect("HP+ 1e 1af4:1041");
    // Status by file, and as the only VM; human and JSON.
    let (rc, st, _) = vm.vmm(&["status", &path(&m.file)]);
    assert_eq!(rc, 0);
    assert!(st.contains("net        \"n\""), "{st}");
    assert!(st.contains("30 used (n)"), "{st}");
    let (_, js, _) = vm.vmm(&["status", "--format", "json"]);
    let s: serde_json::Value = serde_json::from_str(&js).unwrap();
    assert_eq!(s["hotplug_free"], 1, "{s}");

    // Applying the same file again changes nothing; bad and restart-only files are refused.
    let (rc, out, _) = vm.vmm(&["apply", &path(&other)]);
    assert_eq!(rc, 0);
    assert!(out.contains("no changes"), "{out}");
    let (rc, out, _) = vm.vmm(&["apply", &path(&bad)]);
    assert_eq!(rc, 2, "{out}");
    assert!(out.contains("invalid, not applied"), "{out}");
    assert!(out.contains("vcpus"), "{out}");
    let (rc, out, _) = vm.vmm(&["apply", &path(&restart)]);
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains("needs a restart") || out.contains("need a restart"),
        "{out}"
    );
    assert!(out.contains("memory"), "{out}");

    // Removing through apply: the guest ejects, vmm removes it.
    let (rc, _, _) = vm.vmm(&["apply", &path(&m.file)]);
    assert_eq!(rc, 0);
    vm.expect("EJ 1e");
    vm.expect_stderr("removed after the guest released it", 1);

    // A request that is not the protocol gets an error answer, and the VM keeps going.
    let sock = vm_socket(&vm);
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    use std::io::{BufRead, Write};
    s.write_all(b"{\"op\":\"reboot\"}\n").unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(&s).read_line(&mut answer).unwrap();
    assert!(answer.contains("\"status\":\"error\""), "{answer}");
    assert!(answer.contains("bad request"), "{answer}");

    // Unknown machine: a clear error.
    let (rc, _, err) = vm.vmm(&["status", "nosuchvm"]);
    assert_eq!(rc, 1);
    assert!(
        err.contains("cannot reach the VM's control socket"),
        "{err}"
    );

    // A second VM of the same name runs, without a control socket, and says so; the first
    // keeps its socket.
    let runtime = vm.runtime_dir();
    let mut twin = Vm::start(
        &m.file,
        Duration::from_secs(60),
        &[("VMM_RUNTIME_DIR", runtime.to_str().unwrap())],
    );
    twin.expect("HP-READY");
    twin.expect_stderr(
        "another running VM of that name answers on it; running without it",
        1,
    );
    let (rc, _, _) = vm.vmm(&["status", "ctl"]);
    assert_eq!(rc, 0);
    drop(twin);

    let (rc, _, _) = vm.vmm(&["stop"]);
    assert_eq!(rc, 0);
    let (code, _, stderr) = vm.finish();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!sock.exists(), "the socket is removed when the VM ends");

    // No VM left: `vmm status` says where it looked.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("status")
        .env("VMM_RUNTIME_DIR", &runtime)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no running VM has a control socket in"),
        "{err}"
    );
}

/// The control socket of the only VM in `vm`'s runtime directory.
fn vm_socket(vm: &Vm) -> std::path::PathBuf {
    let (_, js, _) = vm.vmm(&["status", "--format", "json"]);
    let s: serde_json::Value = serde_json::from_str(&js).unwrap();
    vm.runtime_dir()
        .join(format!("{}.sock", s["machine"].as_str().unwrap()))
}
