use super::*;

const BASE: u64 = 0xe0000;
const SIZE: u64 = 0x20000;

const LEGACY: &str = r#"
name = "legacy"
memory = "64M"
vcpus = 2
kernel = "vmlinux"

[[serial]]
name = "console"
port = "com1"
io = "none"

[[serial]]
name = "log"
port = "com2"
io = "none"

[[rtc]]

[[i8042]]
"#;

const BARE: &str = r#"
name = "bare"
memory = "64M"
vcpus = 1
kernel = "vmlinux"
"#;

fn graph(text: &str) -> DeviceGraph {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("vmlinux"), b"kernel").unwrap();
    let path = dir.path().join("machine.toml");
    std::fs::write(&path, text).unwrap();
    match crate::check_file(&path) {
        Ok(c) => c.graph,
        Err(r) => panic!("invalid machine:\n{}", r.render(false, 100)),
    }
}

fn tables(g: &DeviceGraph) -> AcpiTables {
    build(g, BASE, SIZE).unwrap()
}

/// The table with this signature: (address, bytes).
fn table<'a>(t: &'a AcpiTables, sig: &[u8; 4]) -> (u64, &'a [u8]) {
    let mut found = t.blobs.iter().filter(|(_, b)| b.starts_with(sig));
    let (addr, bytes) = found.next().unwrap_or_else(|| panic!("no {sig:?}"));
    assert!(found.next().is_none(), "two {sig:?} tables");
    (*addr, bytes)
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The MADT's interrupt controller structures: (type, bytes).
fn madt_entries(m: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    let mut at = 44;
    while at < m.len() {
        let len = m[at + 1] as usize;
        assert!(len >= 2 && at + len <= m.len(), "bad MADT entry at {at}");
        out.push((m[at], &m[at..at + len]));
        at += len;
    }
    out
}

#[test]
fn checksums_lengths_and_placement_are_right() {
    for text in [LEGACY, BARE] {
        let t = tables(&graph(text));
        assert_eq!(t.rsdp_addr, BASE);
        let (addr, rsdp) = &t.blobs[0];
        assert_eq!(*addr, BASE);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp.len(), 36);
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(rsdp, 20), 36, "RSDP length");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        let mut end = BASE;
        for (addr, b) in &t.blobs[1..] {
            let sig = String::from_utf8_lossy(&b[..4]);
            assert_eq!(u32_at(b, 4) as usize, b.len(), "{sig} length");
            assert_eq!(sum(b), 0, "{sig} checksum");
            assert_eq!(&b[10..16], b"VMMVMM", "{sig} OEM ID");
            assert_eq!(&b[16..24], b"VMM     ", "{sig} OEM table ID");
            assert_eq!(addr % 8, 0, "{sig} alignment");
            assert!(*addr >= end, "{sig} overlaps the table before it");
            end = addr + b.len() as u64;
        }
        assert!(end <= BASE + SIZE);
    }
}

#[test]
fn pointers_lead_to_the_right_tables() {
    for text in [LEGACY, BARE] {
        let t = tables(&graph(text));
        let (xsdt_addr, xsdt) = table(&t, b"XSDT");
        assert_eq!(u64_at(&t.blobs[0].1, 24), xsdt_addr);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|i| u64_at(xsdt, i))
            .collect();
        let sigs: Vec<&[u8]> = entries
            .iter()
            .map(|a| {
                let (_, b) = t.blobs.iter().find(|(at, _)| at == a).unwrap();
                &b[..4]
            })
            .collect();
        assert_eq!(sigs, [b"FACP", b"APIC", b"MCFG"]);
        let (_, fadt) = table(&t, b"FACP");
        let (dsdt_addr, _) = table(&t, b"DSDT");
        assert_eq!(u64_at(fadt, 140), dsdt_addr, "X_DSDT");
        assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT");
    }
}

#[test]
fn fadt_is_hardware_reduced_with_sleep_registers() {
    let t = tables(&graph(LEGACY));
    let (_, f) = table(&t, b"FACP");
    assert_eq!(
        (f.len(), f[8], f[131]),
        (276, 6, 5),
        "length, revision, minor"
    );
    let flags = u32_at(f, 112);
    assert_ne!(flags & 1 << 20, 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & 1 << 4, 0, "PWR_BUTTON (not fixed-feature)");
    assert_eq!(flags & 1 << 10, 0, "RESET_REG_SUP");
    assert_eq!(u16_at(f, 46), u16::from(layout::SCI_IRQ));
    assert_eq!(u32_at(f, 36), 0, "FACS");
    assert_eq!(u64_at(f, 132), 0, "X_FACS");
    // Sleep control and status: system I/O, 8 bits, byte access.
    assert_eq!(f[244..248], [1, 8, 0, 1]);
    assert_eq!(u64_at(f, 248), 0x600);
    assert_eq!(f[256..260], [1, 8, 0, 1]);
    assert_eq!(u64_at(f, 260), 0x601);
    assert_eq!(&f[268..276], b"VMMVMM\0\0");
    // i8042, VGA not present; CMOS present; MSI allowed; no LEGACY_DEVICES.
    assert_eq!(u16_at(f, 109), 0b0000_0110);

    let t = tables(&graph(BARE));
    let (_, f) = table(&t, b"FACP");
    // VGA not present, no CMOS RTC, no 8042.
    assert_eq!(u16_at(f, 109), 0b0010_0100);
}

#[test]
fn madt_has_a_lapic_per_vcpu_the_ioapic_and_no_pic() {
    for (text, vcpus) in [(LEGACY, 2u8), (BARE, 1)] {
        let t = tables(&graph(text));
        let (_, m) = table(&t, b"APIC");
        assert_eq!(m[8], 5, "revision");
        assert_eq!(u32_at(m, 36), 0xfee0_0000, "LAPIC address");
        assert_eq!(u32_at(m, 40), 0, "flags: no PC-AT dual 8259s");
        let entries = madt_entries(m);
        let lapics: Vec<&[u8]> = entries.iter().filter(|e| e.0 == 0).map(|e| e.1).collect();
        assert_eq!(lapics.len(), usize::from(vcpus));
        for (i, l) in lapics.iter().enumerate() {
            assert_eq!((l[2] as usize, l[3] as usize, u32_at(l, 4)), (i, i, 1));
        }
        let ioapics: Vec<&[u8]> = entries.iter().filter(|e| e.0 == 1).map(|e| e.1).collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(ioapics[0][2], vcpus, "IOAPIC id");
        assert_eq!(u32_at(ioapics[0], 4), 0xfec0_0000);
        assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");
        let nmis: Vec<&[u8]> = entries.iter().filter(|e| e.0 == 4).map(|e| e.1).collect();
        assert_eq!(nmis, [[4u8, 6, 0xff, 0, 0, 1]]);
        assert_eq!(entries.len(), usize::from(vcpus) + 2, "no other entries");
    }
}

#[test]
fn mcfg_covers_bus_0() {
    let t = tables(&graph(BARE));
    let (_, m) = table(&t, b"MCFG");
    assert_eq!(m.len(), 60);
    assert_eq!(u64_at(m, 44), layout::PCI_ECAM_START);
    assert_eq!((u16_at(m, 52), m[54], m[55]), (0, 0, 0));
}

#[test]
fn dsdt_describes_the_legacy_devices_present() {
    let t = tables(&graph(LEGACY));
    let (_, d) = table(&t, b"DSDT");
    assert_eq!(d[8], 2, "revision");
    for name in [
        "PCI0", "MRES", "_S5_", "COM1", "COM2", "RTC_", "KBD_", "MOU_",
    ] {
        assert!(contains(d, name.as_bytes()), "no {name}");
    }
    assert!(!contains(d, b"COM3"));
    // IO (Decode16, 0x3f8, 0x3f8, 1, 8) and IRQNoFlags () {4} of COM1.
    assert!(contains(
        d,
        &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8, 0x22, 0x10, 0]
    ));
    // IRQNoFlags () {12} of the mouse, {8} of the RTC.
    assert!(contains(d, &[0x22, 0, 0x10]));
    assert!(contains(d, &[0x22, 0, 1]));

    let t = tables(&graph(BARE));
    let (_, d) = table(&t, b"DSDT");
    for name in ["PCI0", "_S5_"] {
        assert!(contains(d, name.as_bytes()), "no {name}");
    }
    for name in ["COM1", "RTC_", "KBD_", "MOU_"] {
        assert!(!contains(d, name.as_bytes()), "{name} without the device");
    }
}

#[test]
fn tables_that_do_not_fit_are_an_error() {
    let g = graph(LEGACY);
    let t = tables(&g);
    let (last, b) = t.blobs.last().unwrap();
    let need = last + b.len() as u64 - BASE;
    assert!(build(&g, BASE, need).is_ok());
    match build(&g, BASE, need - 1) {
        Err(AcpiError::DoesNotFit { need: n, .. }) => assert_eq!(n, need),
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert!(matches!(
        build(&g, BASE, 0),
        Err(AcpiError::DoesNotFit { .. })
    ));
    assert!(matches!(
        build(&g, u64::MAX - 15, SIZE),
        Err(AcpiError::DoesNotFit { .. })
    ));
    assert!(matches!(
        build(&g, BASE + 8, SIZE),
        Err(AcpiError::Misaligned(_))
    ));
}

#[test]
fn same_graph_same_bytes() {
    let a = tables(&graph(LEGACY));
    let b = tables(&graph(LEGACY));
    assert_eq!(a.rsdp_addr, b.rsdp_addr);
    assert_eq!(a.blobs, b.blobs);
    let g = graph(BARE);
    assert_eq!(tables(&g).blobs, tables(&g).blobs);
}

#[test]
fn odd_graphs_are_errors_not_panics() {
    let mut g = graph(LEGACY);
    for vcpus in [0, 255, u32::MAX] {
        g.vcpus = vcpus;
        assert!(matches!(build(&g, BASE, SIZE), Err(AcpiError::Vcpus(v)) if v == vcpus));
    }
    g.vcpus = 254;
    let t = build(&g, BASE, SIZE).unwrap();
    let (_, m) = table(&t, b"APIC");
    assert_eq!(madt_entries(m).len(), 256);

    let mut g = graph(LEGACY);
    let Placement::Pio { irqs, .. } = &mut g.devices[0].placement else {
        panic!("the first device is legacy");
    };
    irqs[0] = 16;
    assert!(matches!(
        build(&g, BASE, SIZE),
        Err(AcpiError::Device { .. })
    ));
    let mut g = graph(LEGACY);
    let Placement::Pio { ports, .. } = &mut g.devices[0].placement else {
        panic!("the first device is legacy");
    };
    ports[0].1 = 0;
    assert!(matches!(
        build(&g, BASE, SIZE),
        Err(AcpiError::Device { .. })
    ));
    let mut g = graph(LEGACY);
    let dup = g.devices[0].clone();
    g.devices.push(dup);
    assert!(matches!(
        build(&g, BASE, SIZE),
        Err(AcpiError::Device { .. })
    ));
}
