//! Fast boot tests with tiny freestanding guests (tests/guest/tiny): each boots in
//! milliseconds under real KVM and checks one path of the backend end to end.

mod common;

use std::time::Duration;

use common::vm::{Machine, Vm, kvm_or_skip, tiny};
use common::{skip, text};

const LIMIT: Duration = Duration::from_secs(30);
const SERIAL: &str =
    "name = \"t\"\nmemory = \"16M\"\nvcpus = 1\n[[serial]]\nname = \"com1\"\nio = \"stdio\"\n";

/// Boots `guest` with the standard serial machine plus `extra`; returns (code, stdout, stderr).
fn boot(guest: &str, extra: &str) -> (Option<i32>, String, String) {
    let m = Machine::new(&tiny(guest), &format!("{SERIAL}{extra}"));
    Vm::start(&m.file, LIMIT, &[]).finish()
}

macro_rules! kvm_test {
    ($name:ident, $body:block) => {
        #[test]
        fn $name() {
            if !kvm_or_skip(stringify!($name)) {
                return;
            }
            $body
        }
    };
}

kvm_test!(pvh_entry_prints_ready_and_powers_off, {
    let (code, out, err) = boot("hello-pvh", "");
    assert_eq!(out, "READY", "stderr: {err}");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("vmm: t: the guest powered off after"), "{err}");
});

kvm_test!(elf64_entry_prints_ready_and_powers_off, {
    let (code, out, err) = boot("hello-elf64", "");
    assert_eq!((code, out.as_str()), (Some(0), "READY"), "{err}");
});

kvm_test!(i8042_reset_ends_the_vm, {
    let (code, out, err) = boot("reset", "[[i8042]]\n");
    assert_eq!((code, out.as_str()), (Some(0), "RESET"), "{err}");
    assert!(err.contains("the guest reset the machine"), "{err}");
});

kvm_test!(without_an_i8042_the_reset_write_goes_nowhere, {
    // No controller: the write to 0x64 is dropped and the guest spins in hlt until stopped.
    let m = Machine::new(&tiny("reset"), SERIAL);
    let mut vm = Vm::start(&m.file, LIMIT, &[]);
    vm.expect("RESET");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        vm.child.try_wait().unwrap().is_none(),
        "vmm exited without an i8042"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(vm.pid(), libc::SIGTERM) };
    let (code, _, err) = vm.finish();
    assert_eq!(code, Some(0));
    assert!(err.contains("stopped by SIGTERM"), "{err}");
});

kvm_test!(pci_scan_of_bus_0_finds_only_the_host_bridge, {
    // Four hotplug slots are reserved but empty: they must read as absent.
    let (code, out, err) = boot("pciscan", "[pci]\nhotplug_slots = 4\n");
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        out, "PCI 00 8086:0d57\nECAM 00 8086:0d57\nBUS1 ffffffff\nSCAN-DONE 1",
        "{err}"
    );
});

kvm_test!(cmos_clock_reads_the_host_utc_time, {
    let before = std::time::SystemTime::now();
    let (code, out, err) = boot("rtc", "[[rtc]]\n");
    assert_eq!(code, Some(0), "{err}");
    // "RTC 20 26-11-25 10:30:40 B=02": BCD registers, printed as hex digits.
    let f: Vec<&str> = out.split([' ', '-', ':']).collect();
    assert_eq!((f[0], f.last().copied()), ("RTC", Some("B=02")), "{out}");
    let n = |i: usize| f[i].parse::<i64>().unwrap();
    let (year, month, day, h, m, s) = (n(1) * 100 + n(2), n(3), n(4), n(5), n(6), n(7));
    let guest = days_from_civil(year, month, day) * 86400 + h * 3600 + m * 60 + s;
    let host = before
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest - host).abs() <= 5,
        "guest clock {out} is {}s off the host",
        guest - host
    );
});

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

kvm_test!(serial_input_reaches_the_guest, {
    let m = Machine::new(&tiny("echo"), SERIAL);
    let mut vm = Vm::start(&m.file, LIMIT, &[]);
    vm.expect("ECHO-READY");
    vm.send("hello vmm\nq");
    vm.expect("hello vmm");
    vm.expect("ECHO-DONE");
    let (code, _, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
});

kvm_test!(serial_to_a_file, {
    let m = Machine::new(
        &tiny("hello-pvh"),
        &SERIAL.replace("io = \"stdio\"", "io = { file = \"com1.log\" }"),
    );
    let (code, out, err) = Vm::start(&m.file, LIMIT, &[]).finish();
    assert_eq!((code, out.as_str()), (Some(0), ""), "{err}");
    assert_eq!(
        std::fs::read_to_string(m.dir.path().join("com1.log")).unwrap(),
        "READY\n"
    );
});

kvm_test!(serial_on_a_unix_socket, {
    use std::io::{Read, Write};
    let m = Machine::new(
        &tiny("echo"),
        &SERIAL.replace("io = \"stdio\"", "io = { socket = \"com1.sock\" }"),
    );
    let sock = m.dir.path().join("com1.sock");
    let vm = Vm::start(&m.file, LIMIT, &[]);
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"over the socket q").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains("ECHO-DONE") {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "socket closed early: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).contains("over the socket q"));
    let (code, _, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
    assert!(!sock.exists(), "the socket file is removed when vmm exits");
});

kvm_test!(cpuid_shows_hypervisor_topology_and_hidden_features, {
    let (code, out, err) = boot("cpuid", "");
    assert_eq!(code, Some(0), "{err}");
    let reg = |leaf: &str, i: usize| -> u32 {
        let l = out
            .lines()
            .find(|l| l.starts_with(leaf))
            .unwrap_or_else(|| panic!("{leaf} missing: {out}"));
        u32::from_str_radix(l.split(' ').nth(i + 1).unwrap(), 16).unwrap()
    };
    assert_ne!(reg("CPUID1 ", 2) & (1 << 31), 0, "hypervisor bit");
    assert_ne!(reg("CPUID80000008", 1) & (1 << 2), 0, "XSAVEERPTR");
    assert_eq!(
        reg("CPUID40000000", 1),
        u32::from_le_bytes(*b"KVMK"),
        "KVM signature"
    );
    let x2apic_host = reg("CPUID1 ", 2) & (1 << 21) != 0;

    // Two vCPUs and a hidden feature: the boot vCPU has APIC id 0 and counts 2 logical CPUs.
    let m = Machine::new(
        &tiny("cpuid"),
        &format!(
            "{}\n[cpu]\nhide = [\"x2apic\", \"avx2\"]\n",
            SERIAL.replace("vcpus = 1", "vcpus = 2")
        ),
    );
    let mut vm = Vm::start(&m.file, LIMIT, &[]);
    let l1 = vm.expect("CPUID1 ");
    let ebx = u32::from_str_radix(l1.split(' ').nth(2).unwrap(), 16).unwrap();
    let ecx = u32::from_str_radix(l1.split(' ').nth(3).unwrap(), 16).unwrap();
    assert_eq!(
        (ebx >> 24, (ebx >> 16) & 0xff),
        (0, 2),
        "APIC id and logical count: {l1}"
    );
    assert_eq!(ecx & (1 << 21), 0, "x2apic hidden: {l1}");
    let (code, _, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
    if !x2apic_host {
        skip(
            "cpuid hiding",
            "this host has no x2apic, so hiding it proves nothing (the rest ran)",
        );
    }
});

kvm_test!(triple_fault_is_a_reset, {
    let (code, out, err) = boot("triple-fault", "");
    assert_eq!(out, "FAULTING");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("triple-faulted"), "{err}");
});

kvm_test!(emulation_failure_is_a_clear_error_with_rip, {
    let (code, out, err) = boot("bad-fetch", "");
    assert_eq!(out, "JUMPING");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("failed: vCPU 0:") && err.contains("RIP 0xd0000000"),
        "{err}"
    );
});

kvm_test!(sigterm_and_sigint_stop_a_spinning_guest, {
    for (sig, name) in [
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGHUP, "SIGHUP"),
    ] {
        let m = Machine::new(&tiny("spin"), &SERIAL.replace("vcpus = 1", "vcpus = 2"));
        let mut vm = Vm::start(&m.file, LIMIT, &[]);
        vm.expect("SPINNING");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(vm.pid(), sig) };
        let (code, _, err) = vm.finish();
        assert_eq!(code, Some(0), "{name}: {err}");
        assert!(err.contains(&format!("stopped by {name}")), "{err}");
    }
});

kvm_test!(a_corrupt_kernel_is_a_clear_error, {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("garbage");
    std::fs::write(&k, vec![0x5a; 8192]).unwrap();
    let (code, _, err) = Vm::start(&Machine::new(&k, SERIAL).file, LIMIT, &[]).finish();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is neither an ELF vmlinux nor a bzImage"),
        "{err}"
    );
    // A truncated ELF.
    let elf = std::fs::read(tiny("hello-pvh")).unwrap();
    std::fs::write(&k, &elf[..100]).unwrap();
    let (code, _, err) = Vm::start(&Machine::new(&k, SERIAL).file, LIMIT, &[]).finish();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("Cannot load kernel"), "{err}");
});

kvm_test!(
    an_initrd_that_does_not_fit_below_the_kernel_is_a_clear_error,
    {
        // 16 MiB of RAM and a 15.5 MiB initrd: it passes the size check of `vmm check` (kernel +
        // initrd < memory) but cannot be placed above the kernel at 1 MiB.
        let m = Machine::new(
            &tiny("hello-pvh"),
            &format!("initrd = \"big.img\"\n{SERIAL}"),
        );
        std::fs::write(
            m.dir.path().join("big.img"),
            vec![0u8; 15 * 1024 * 1024 + 512 * 1024],
        )
        .unwrap();
        let (code, _, err) = Vm::start(&m.file, LIMIT, &[]).finish();
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("does not fit in guest memory"), "{err}");
    }
);

#[test]
fn memory_the_host_cannot_map_is_a_clear_error() {
    if !kvm_or_skip("memory_the_host_cannot_map_is_a_clear_error") {
        return;
    }
    // Limit vmm's address space to 1 GiB and ask for 2 GiB of guest RAM.
    let m = Machine::new(&tiny("hello-pvh"), &SERIAL.replace("16M", "2G"));
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.arg("up")
        .arg(&m.file)
        .env("VMM_RUNTIME_DIR", m.dir.path())
        .stdin(std::process::Stdio::null());
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe and only affects the child.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("Cannot map 2 GiB of guest memory"),
        "{}",
        text(&out.stderr)
    );
}
