//! Hostile guests, tiny tier (tests/guest/tiny/stress.c): a guest hammering ECAM while the
//! host plugs and removes PCI functions, and a guest flooding vmm with accesses it logs.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::tap::Tap;
use common::vm::{Machine, Vm, kvm_or_skip, tiny};

/// Plug/remove cycles while the guest reads configuration space through ECAM.
const CYCLES: u64 = 10_000;
/// No cycle for this long is a hang (a cycle takes well under a millisecond).
const HANG: Duration = Duration::from_secs(120);

/// The lock-order bug this guards against: plugging held the PCI root and waited for the MMIO
/// bus, while a vCPU in an ECAM access held the bus and waited for the root. The guest's vCPU
/// runs the real exit path (MMIO bus → ECAM → root → function) the whole time.
#[test]
fn ecam_hammering_during_10000_plug_cycles_never_hangs() {
    if !kvm_or_skip("ecam_hammering_during_10000_plug_cycles_never_hangs") {
        return;
    }
    // A fixed name: a run that died leaves its TAP, which the next one replaces.
    let tap_name = "vmmecam0".to_string();
    let Some(_tap) = Tap::new(&tap_name, "10.251.7.1/24") else {
        common::skip(
            "ecam_hammering_during_10000_plug_cycles_never_hangs",
            "cannot create a TAP (needs root and /dev/net/tun)",
        );
        return;
    };
    let body = format!(
        "name = \"ecam\"\nmemory = \"32M\"\nvcpus = 1\ncmdline = \"mode=ecam\"\n\
         [pci]\nhotplug_slots = 2\n[[serial]]\nname = \"com1\"\nio = {{ file = \"com1.log\" }}\n\
         [[rng]]\nname = \"rng0\"\n[[net]]\nname = \"nic\"\ntap = \"{tap_name}\"\n"
    );
    let m = Machine::new(&tiny("stress"), &body);
    let checked = vmm::check_file(&m.file).expect("the machine file is valid");
    let mut graph = checked.graph.clone();
    let nic = graph
        .device("nic")
        .expect("the NIC is in the graph")
        .clone();
    let slot = nic.pci_slot().expect("a PCI NIC");
    graph.devices.retain(|d| d.name != "nic");

    let done = Arc::new(AtomicU64::new(0));
    let d2 = done.clone();
    // The hang net: a deadlock shows as cycles that stop coming.
    std::thread::spawn(move || {
        let mut last = (0, Instant::now());
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let now = d2.load(Ordering::SeqCst);
            if now == u64::MAX {
                return;
            }
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() > HANG {
                eprintln!("HANG: no plug/remove cycle for {HANG:?} after {now} cycles");
                std::process::exit(101);
            }
        }
    });
    let d3 = done.clone();
    let started = Instant::now();
    let report = vmm::backend::kvm::run_with(&graph, move |live| {
        std::thread::spawn(move || {
            for i in 0..CYCLES {
                if let Err(e) = live.plug(&nic) {
                    live.stop(&format!("cycle {i}: plug failed: {e}"));
                    return;
                }
                match live.remove(slot) {
                    Ok(true) => {}
                    Ok(false) => {
                        live.stop(&format!(
                            "cycle {i}: the removed function is still referenced"
                        ));
                        return;
                    }
                    Err(e) => {
                        live.stop(&format!("cycle {i}: remove failed: {e}"));
                        return;
                    }
                }
                d3.store(i + 1, Ordering::SeqCst);
            }
            live.stop("all cycles done");
        });
        None
    })
    .expect("the VM runs");
    let cycles = done.swap(u64::MAX, Ordering::SeqCst);
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(
        report.outcome,
        vmm::backend::kvm::Outcome::Stopped("all cycles done".into())
    );
    assert_eq!(cycles, CYCLES);
    // The guest really was in ECAM all along: its progress lines, each 65536 reads apart.
    let log = std::fs::read_to_string(m.dir.path().join("com1.log")).unwrap_or_default();
    let beats = log.lines().filter(|l| l.starts_with("ECAM ")).count();
    eprintln!(
        "{CYCLES} plug/remove cycles in {secs:.1} s ({:.0} µs each), guest ECAM reads ≥ {}",
        secs * 1e6 / CYCLES as f64,
        beats * 65536
    );
    assert!(
        beats >= 4,
        "the guest made too few ECAM reads during the cycles:\n{log}"
    );
}

/// 10^6 accesses the device refuses, each of which vmm logs (virtio-queue's invalid queue
/// size, refused features, DRIVER_OK without FEATURES_OK): vmm's stderr stays small because
/// each call site logs at most 10 lines a minute, then says how many it suppressed.
#[test]
fn a_guest_flooding_refused_accesses_cannot_flood_the_log() {
    if !kvm_or_skip("a_guest_flooding_refused_accesses_cannot_flood_the_log") {
        return;
    }
    let body = "name = \"flood\"\nmemory = \"32M\"\nvcpus = 1\ncmdline = \"mode=flood count=125000\"\n\
                [[serial]]\nname = \"com1\"\nio = \"stdio\"\n[[rng]]\nname = \"rng0\"\n";
    let m = Machine::new(&tiny("stress"), body);
    let mut vm = Vm::start(&m.file, Duration::from_secs(600), &[("RUST_LOG", "debug")]);
    vm.expect("FLOOD done");
    let (code, _, stderr) = vm.finish();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.len() < 64 * 1024,
        "{} bytes of stderr for 10^6 refused accesses; the first 4 KiB:\n{}",
        stderr.len(),
        &stderr[..4096.min(stderr.len())]
    );
    for what in [
        "invalid size",
        "not acceptable",
        "DRIVER_OK without FEATURES_OK",
        "suppressed",
    ] {
        assert!(
            stderr.contains(what),
            "no {what:?} in vmm's stderr:\n{stderr}"
        );
    }
    eprintln!("stderr after 10^6 refused accesses: {} bytes", stderr.len());
}
