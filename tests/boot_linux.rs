//! The Linux test kernel (tests/guest) booted by `vmm up`, driven over the serial console with
//! the init's test protocol (one shell command per line, answered by `VMM-RC <status>`).
//! Each boot takes about half a minute on PVM hosts, so one boot serves many checks.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::vm::{LINUX_LIMIT, Machine, Vm, kvm_or_skip, one_linux_guest_at_a_time, sh, value};
use common::{guest_artifacts, root};

/// A machine running the test kernel in test mode with `vcpus` and `memory`.
fn machine(vcpus: u32, memory: &str) -> Machine {
    let g = guest_artifacts();
    let cmdline = std::fs::read_to_string(root().join("tests/guest/cmdline.txt")).unwrap();
    let body = format!(
        r#"initrd = {:?}
cmdline = "{} vmm_mode=test"
name = "linux"
memory = "{memory}"
vcpus = {vcpus}
[[serial]]
name = "console"
io = "stdio"
[[rtc]]
[[i8042]]
"#,
        g.join("initramfs.cpio").display().to_string(),
        cmdline.trim()
    );
    Machine::new(&g.join("vmlinux"), &body)
}

#[test]
fn linux_boots_and_sees_the_machine_then_powers_off() {
    if !kvm_or_skip("linux_boots_and_sees_the_machine_then_powers_off") {
        return;
    }
    let m = machine(2, "64M");
    let _guest = one_linux_guest_at_a_time();
    let mut vm = Vm::start(&m.file, LINUX_LIMIT, &[]);
    let ready = vm.expect("VMM-READY");
    eprintln!("guest reached /init: {ready}");

    // vCPUs: both online.
    let cpus = sh(
        &mut vm,
        "n=0; while read l; do case $l in processor*) n=$((n+1));; esac; done < /proc/cpuinfo; echo CPUS=$n; read o < /sys/devices/system/cpu/online; echo ONLINE=$o",
    );
    assert_eq!(value(&cpus, "CPUS"), "2");
    assert_eq!(value(&cpus, "ONLINE"), "0-1");

    // Memory: the kernel saw 64 MiB less the legacy hole (Memory: used/total available).
    let mem = sh(
        &mut vm,
        "while read k v u; do [ $k = MemTotal: ] && echo MEMTOTAL=$v; done < /proc/meminfo; dmesg | while read l; do case $l in *Memory:*available*) echo \"MEMLINE=$l\";; esac; done",
    );
    let total_kib: u64 = value(&mem, "MEMLINE")
        .split('/')
        .nth(1)
        .unwrap()
        .split('K')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (63 * 1024..=64 * 1024).contains(&total_kib),
        "kernel saw {total_kib} KiB of RAM"
    );
    let memtotal: u64 = value(&mem, "MEMTOTAL").parse().unwrap();
    assert!(
        memtotal > 32 * 1024 && memtotal <= total_kib,
        "MemTotal {memtotal} KiB"
    );

    // The CMOS clock is the host's UTC time; hwclock reads it through rtc-cmos.
    let host = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let rtc = sh(
        &mut vm,
        "read t < /sys/class/rtc/rtc0/since_epoch; echo RTC=$t; hwclock -u -r",
    );
    let guest: i64 = value(&rtc, "RTC").parse().unwrap();
    assert!(
        (guest - host).abs() <= 10,
        "guest RTC {guest} vs host {host}"
    );
    let year = 1970 + host / 31_556_952;
    assert!(
        rtc.iter()
            .any(|l| l.contains(&year.to_string()) && l.contains("seconds")),
        "hwclock output: {rtc:?}"
    );

    // PCI: the host bridge on bus 0, nothing else.
    let pci = sh(
        &mut vm,
        "for d in /sys/bus/pci/devices/*; do read v < $d/vendor; read i < $d/device; echo PCI=${d##*/}:$v:$i; done",
    );
    assert_eq!(
        pci.iter()
            .filter(|l| l.starts_with("PCI="))
            .collect::<Vec<_>>(),
        ["PCI=0000:00:00.0:0x8086:0x0d57"]
    );

    // The i8042 was probed (both ports) and the serial port has its IRQ.
    let dev = sh(
        &mut vm,
        "ls /sys/bus/serio/devices; while read l; do case $l in *ttyS0*|*i8042*|*rtc0*) echo \"IRQ=$l\";; esac; done < /proc/interrupts",
    );
    assert!(
        dev.iter().any(|l| l.contains("serio0")) && dev.iter().any(|l| l.contains("serio1")),
        "{dev:?}"
    );
    assert!(
        dev.iter()
            .any(|l| l.contains("4-edge") && l.contains("ttyS0")),
        "{dev:?}"
    );

    // ACPI S5.
    vm.send("poweroff -f\n");
    let (code, _, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("the guest powered off"), "{err}");
}

#[test]
fn linux_reboot_through_the_i8042_ends_vmm() {
    if !kvm_or_skip("linux_reboot_through_the_i8042_ends_vmm") {
        return;
    }
    let m = machine(1, "64M");
    let _guest = one_linux_guest_at_a_time();
    let mut vm = Vm::start(&m.file, LINUX_LIMIT, &[]);
    vm.expect("VMM-READY");
    vm.send("reboot -f\n");
    let (code, out, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}\n{out}");
    assert!(err.contains("the guest reset the machine"), "{err}");
}
