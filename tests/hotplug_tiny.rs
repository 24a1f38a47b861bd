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
