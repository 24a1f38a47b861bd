//! The ACPI tables vmm generates pass ACPICA's own disassembler (`iasl -d`, from acpica-tools)
//! without errors or warnings, and the DSDT says what Linux needs.

mod common;

use std::path::Path;
use std::process::Command;

const MACHINE: &str = r#"
name = "acpi"
memory = "64M"
vcpus = 4
kernel = "vmlinux"

[pci]
hotplug_slots = 2

[[serial]]
name = "s1"
port = "com1"
io = "none"

[[serial]]
name = "s2"
port = "com2"
io = "none"

[[serial]]
name = "s3"
port = "com3"
io = "none"

[[serial]]
name = "s4"
port = "com4"
io = "none"

[[rtc]]

[[i8042]]

[[rng]]
name = "rng0"
"#;

/// Words in iasl's output that mean it found something wrong.
const COMPLAINTS: &[&str] = &[
    "error",
    "warning",
    "invalid",
    "incorrect",
    "unknown",
    "mismatch",
    "too short",
    "too long",
    "terminates",
];

fn complaints(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            COMPLAINTS.iter().any(|c| l.contains(c))
        })
        .map(str::to_string)
        .collect()
}

/// Runs `iasl -d` on a table file; returns the disassembly.
fn disassemble(dir: &Path, sig: &str) -> String {
    let out = Command::new("iasl")
        .current_dir(dir)
        .args(["-d", &format!("{sig}.dat")])
        .output()
        .expect("iasl runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dsl = std::fs::read_to_string(dir.join(format!("{sig}.dsl"))).unwrap_or_default();
    assert!(
        out.status.success(),
        "iasl -d {sig}.dat failed ({}):\n{log}",
        out.status
    );
    let found = complaints(&log);
    assert!(
        found.is_empty(),
        "iasl -d {sig}.dat complains: {found:#?}\n{log}"
    );
    // Table-level problems (checksum, lengths) go into the disassembly as comments.
    let found = complaints(&dsl);
    assert!(
        found.is_empty(),
        "{sig}.dsl notes problems: {found:#?}\n{dsl}"
    );
    dsl
}

/// Compiles a disassembled table back with iasl: it checks more than the disassembler (resource
/// descriptors, names); it must report no errors, warnings or remarks.
fn recompile(dir: &Path, sig: &str) {
    let out = Command::new("iasl")
        .current_dir(dir)
        .args(["-p", &format!("{sig}-again"), &format!("{sig}.dsl")])
        .output()
        .expect("iasl runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iasl {sig}.dsl failed:\n{log}");
    assert!(log.contains(" 0 Errors,"), "iasl {sig}.dsl:\n{log}");
    let bad: Vec<&str> = log
        .lines()
        .map(str::trim_start)
        .filter(|l| {
            l.starts_with("Warning ") || l.starts_with("Error ") || l.starts_with("Remark ")
        })
        .collect();
    assert!(bad.is_empty(), "iasl {sig}.dsl: {bad:#?}\n{log}");
}

#[test]
fn iasl_disassembles_every_table_cleanly() {
    if Command::new("iasl").arg("-v").output().is_err() {
        common::skip(
            "iasl_disassembles_every_table_cleanly",
            "iasl is not installed (Debian package acpica-tools)",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vmlinux"), b"kernel").unwrap();
    let machine = dir.path().join("acpi.toml");
    std::fs::write(&machine, MACHINE).unwrap();
    let checked = vmm::check_file(&machine)
        .unwrap_or_else(|r| panic!("invalid machine:\n{}", r.render(false, 100)));
    let tables = vmm::backend::kvm::acpi::build(&checked.graph, 0xe0000, 0x20000).unwrap();

    let mut sigs = Vec::new();
    for (addr, bytes) in &tables.blobs {
        if *addr == tables.rsdp_addr {
            continue;
        }
        let sig = String::from_utf8(bytes[..4].to_vec()).unwrap();
        std::fs::write(dir.path().join(format!("{sig}.dat")), bytes).unwrap();
        sigs.push(sig);
    }
    assert_eq!(sigs, ["XSDT", "FACP", "APIC", "MCFG", "DSDT"]);

    for sig in &sigs {
        let dsl = disassemble(dir.path(), sig);
        recompile(dir.path(), sig);
        if sig == "DSDT" {
            for want in [
                "PNP0A08",
                "PNP0A03",
                "Name (_S5,",
                "Device (COM1)",
                "Device (COM2)",
                "Device (COM3)",
                "Device (COM4)",
                "PNP0501",
                "Device (RTC)",
                "PNP0B00",
                "Device (KBD)",
                "PNP0303",
                "Device (MOU)",
                "PNP0F13",
                // PCI hotplug: the registers, one ejectable slot device per hotplug slot,
                // the event device and the method it runs.
                "OperationRegion (PHPR, SystemIO, 0x0610, 0x10)",
                "Device (S1E)",
                "Device (S1F)",
                "Name (_ADR, 0x001F0000)",
                "Name (_SUN, 0x1F)",
                "Method (_EJ0, 1",
                "PCEJ (0x1F)",
                "B0EJ = (One << Arg0)",
                "Local0 = PCIU",
                "Method (PCNT, 0, Serialized)",
                "Notify (S1F, One)",
                "Notify (S1F, 0x03)",
                "ACPI0013",
                "Method (_EVT, 1, Serialized)",
                "\\_SB.PCI0.PCNT ()",
            ] {
                assert!(dsl.contains(want), "the DSDT has no {want}:\n{dsl}");
            }
        }
        if sig == "APIC" {
            assert_eq!(dsl.matches("Processor Local APIC").count(), 4, "{dsl}");
        }
        if sig == "DSDT" {
            assert!(!dsl.contains("Device (S1D)"), "slot 29 is static:\n{dsl}");
        }
    }
}
