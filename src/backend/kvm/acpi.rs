//! ACPI tables for a machine: what the guest's ACPI code (stock Linux) reads to find the CPUs,
//! interrupt controllers, PCI host bridge, legacy devices and how to power off.
//!
//! The machine is hardware-reduced ACPI (no PM1 blocks, no GPEs, no FACS, no SMI): sleep control
//! and status are two byte registers at [`layout::ACPI_PM_PIO`]. Interrupts go through the IOAPIC,
//! the LAPICs and MSI only, so the MADT does not claim dual 8259s (see ENVIRONMENT.md on PVM).
//!
//! ```text
//! base ─ RSDP ─▶ XSDT ─┬▶ FACP (FADT) ─▶ DSDT (AML: \_SB_.PCI0, legacy devices, \_S5_)
//!                      ├▶ APIC (MADT: LAPIC per vCPU, IOAPIC, LAPIC NMI)
//!                      └▶ MCFG (ECAM of bus 0)
//! ```
//!
//! The tables depend only on the graph, so the same machine always gets the same bytes.

use acpi_tables::Aml;
use acpi_tables::aml::{self, AddressSpace, AddressSpaceCacheable};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;

use crate::contract::PlatformFact;
use crate::graph::layout;
use crate::graph::{DeviceGraph, DeviceNode, Placement};

/// ACPI tables laid out for guest memory.
#[derive(Debug)]
pub struct AcpiTables {
    /// Guest physical address of the RSDP.
    pub rsdp_addr: u64,
    /// (guest physical address, bytes) of every table, RSDP included.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

/// Why a graph's tables cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error(
        "the ACPI tables need {need:#x} bytes at {base:#x}, but only {size:#x} bytes are reserved"
    )]
    DoesNotFit { base: u64, size: u64, need: u64 },
    #[error("the RSDP must be 16-byte aligned, but the ACPI area starts at {0:#x}")]
    Misaligned(u64),
    #[error("{0} vCPUs cannot be described with xAPIC entries in the MADT (1 to 254 can)")]
    Vcpus(u32),
    #[error("no ACPI description for device `{device}`: {reason}")]
    Device { device: String, reason: String },
}

const OEM_ID: [u8; 6] = *b"VMMVMM";
const OEM_TABLE_ID: [u8; 8] = *b"VMM     ";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: [u8; 4] = *b"VMM ";
const CREATOR_REVISION: u32 = 1;
/// FADT 6.x "hypervisor vendor identity" (8 bytes).
const HYPERVISOR_ID: [u8; 8] = *b"VMMVMM\0\0";

/// Length of the standard table header (signature … creator revision).
const HEADER_LEN: usize = 36;
/// MADT revision of ACPI 6.3+ (the crate writes 1).
const MADT_REVISION: u8 = 5;
/// MADT flags: bit 0 (PCAT_COMPAT, dual 8259s) stays clear on purpose: there is no PIC path.
const MADT_FLAGS: u32 = 0;
/// DSDT revision 2: AML integers are 64-bit.
const DSDT_REVISION: u8 = 2;

/// IAPC_BOOT_ARCH bits (ACPI 6.5 table 5.11).
const BOOT_ARCH_8042: u16 = 1 << 1;
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;

/// Local APIC NMI structure (MADT type 4): all processors (UID 0xff), flags 0 (conforms to the
/// bus), LINT1.
const LAPIC_NMI: [u8; 6] = [4, 6, 0xff, 0, 0, 1];

// Fixed addresses the 32-bit fields below hold: checked at compile time, so the casts are exact.
const _: () = assert!(layout::LAPIC_START <= u32::MAX as u64);
const _: () = assert!(layout::IOAPIC_START <= u32::MAX as u64);
const _: () = assert!(layout::PCI_MMIO_START + layout::PCI_MMIO_SIZE - 1 <= u32::MAX as u64);
const _: () = assert!(layout::PCI_ECAM_START + layout::PCI_ECAM_SIZE - 1 <= u32::MAX as u64);
const _: () = assert!(layout::PCI_CONFIG_PIO.1 > 0 && layout::PCI_CONFIG_PIO.1 <= u8::MAX as u16);
const _: () = assert!(layout::PCI_CONFIG_PIO.0 > 0);
const _: () = assert!(layout::ACPI_PM_PIO.1 >= 2);
const LAPIC_ADDR: u32 = layout::LAPIC_START as u32;
const IOAPIC_ADDR: u32 = layout::IOAPIC_START as u32;
const PCI_MMIO_FIRST: u32 = layout::PCI_MMIO_START as u32;
const PCI_MMIO_LAST: u32 = (layout::PCI_MMIO_START + layout::PCI_MMIO_SIZE - 1) as u32;
const ECAM_ADDR: u32 = layout::PCI_ECAM_START as u32;
const ECAM_LEN: u32 = layout::PCI_ECAM_SIZE as u32;
/// The PCI I/O windows: all ports but the configuration mechanism's.
const PCI_CONFIG_FIRST: u16 = layout::PCI_CONFIG_PIO.0;
const PCI_CONFIG_END: u16 = layout::PCI_CONFIG_PIO.0 + layout::PCI_CONFIG_PIO.1;

/// Lays the tables out in [base, base + size) of guest memory.
pub fn build(graph: &DeviceGraph, base: u64, size: u64) -> Result<AcpiTables, AcpiError> {
    if !base.is_multiple_of(16) {
        return Err(AcpiError::Misaligned(base));
    }
    // Tables whose contents do not depend on where they go.
    let dsdt = dsdt(graph)?;
    let madt = madt(graph)?;
    let mcfg = mcfg();
    // XSDT: header + 3 entries; FADT: fixed size. Built once their addresses are known.
    let xsdt_len = HEADER_LEN + 3 * 8;
    let fadt_len = acpi_tables::fadt::FADT::len();

    let mut next = base;
    let mut place = |len: usize, align: u64| -> Result<u64, AcpiError> {
        // Past the end of the address space: fits in no size.
        let too_big = || AcpiError::DoesNotFit {
            base,
            size,
            need: u64::MAX,
        };
        let at = next.checked_next_multiple_of(align).ok_or_else(too_big)?;
        next = at.checked_add(len as u64).ok_or_else(too_big)?;
        Ok(at)
    };
    let rsdp_addr = place(Rsdp::len(), 16)?;
    let xsdt_addr = place(xsdt_len, 8)?;
    let fadt_addr = place(fadt_len, 8)?;
    let madt_addr = place(madt.len(), 8)?;
    let mcfg_addr = place(mcfg.len(), 8)?;
    let dsdt_addr = place(dsdt.len(), 8)?;
    let need = next - base;
    if need > size {
        return Err(AcpiError::DoesNotFit { base, size, need });
    }

    let fadt = fadt(graph, dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(addr);
    }
    let xsdt = seal(xsdt.to_bytes());
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr).to_bytes();

    Ok(AcpiTables {
        rsdp_addr,
        blobs: vec![
            (rsdp_addr, rsdp),
            (xsdt_addr, xsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (mcfg_addr, mcfg),
            (dsdt_addr, dsdt),
        ],
    })
}

/// Serializes an AML object or a table of the crate.
trait ToBytes {
    fn to_bytes(&self) -> Vec<u8>;
}

impl<T: Aml + ?Sized> ToBytes for T {
    fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.to_aml_bytes(&mut v);
        v
    }
}

/// The byte that makes `bytes` sum to 0.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// Puts vmm's creator id in a table's header and recomputes its length and checksum.
/// Every caller passes a table built by the crate, which always has the 36-byte header, so the
/// indexing below is in bounds.
fn seal(mut t: Vec<u8>) -> Vec<u8> {
    let len = t.len() as u32; // at most a few KiB: the tables are bounded by 254 vCPUs
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[28..32].copy_from_slice(&CREATOR_ID);
    t[32..36].copy_from_slice(&CREATOR_REVISION.to_le_bytes());
    t[9] = 0;
    t[9] = checksum(&t);
    t
}

/// FADT (signature FACP): hardware-reduced ACPI with sleep registers and the DSDT.
fn fadt(graph: &DeviceGraph, dsdt_addr: u64) -> Vec<u8> {
    let has = |fact| {
        graph
            .devices
            .iter()
            .any(|d| d.kind.info().platform.contains(&fact))
    };
    let mut boot_arch = BOOT_ARCH_VGA_NOT_PRESENT;
    if has(PlatformFact::Ps2Controller) {
        boot_arch |= BOOT_ARCH_8042;
    }
    if !has(PlatformFact::CmosRtc) {
        boot_arch |= BOOT_ARCH_NO_CMOS_RTC;
    }
    let sleep_reg = |port: u16| {
        GAS::new(
            GasSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };

    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        // Power and sleep buttons are not fixed-feature hardware (there is none when
        // hardware-reduced): Linux then creates no fixed power button device.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.sci_int = u16::from(graph.sci_irq).into();
    f.iapc_boot_arch = boot_arch.into();
    f.sleep_control_reg = sleep_reg(layout::ACPI_PM_PIO.0);
    f.sleep_status_reg = sleep_reg(layout::ACPI_PM_PIO.0 + 1);
    f.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_ID).into();
    // No FACS (firmware_ctrl 0), no reset register (RESET_REG_SUP clear: Linux resets through
    // the i8042), no PM1/GPE blocks.
    seal(f.finalize().to_bytes())
}

/// MADT (signature APIC): one LAPIC per vCPU, the IOAPIC and LINT1 as NMI.
fn madt(graph: &DeviceGraph) -> Result<Vec<u8>, AcpiError> {
    // APIC ID 0xff is the broadcast ID and the IOAPIC takes ID `vcpus`: 1 to 254 vCPUs fit.
    let vcpus = match u8::try_from(graph.vcpus) {
        Ok(n @ 1..=254) => n,
        _ => return Err(AcpiError::Vcpus(graph.vcpus)),
    };
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for i in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    // ISA IRQs are identity-mapped to pins 0–15 (edge, active high): no source overrides.
    m.add_structure(IoApic::new(vcpus, IOAPIC_ADDR, 0));
    let mut t = m.to_bytes();
    t.extend_from_slice(&LAPIC_NMI);
    // In bounds: the crate's MADT always starts with its 44-byte header (table header, LAPIC
    // address, flags).
    t[8] = MADT_REVISION;
    t[40..44].copy_from_slice(&MADT_FLAGS.to_le_bytes());
    Ok(seal(t))
}

/// MCFG: ECAM for segment 0, bus 0.
fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(layout::PCI_ECAM_START, 0, 0, 0);
    seal(m.to_bytes())
}

/// `IRQNoFlags () {n}`: the small IRQ descriptor (edge, active high, exclusive), which the
/// crate does not have.
struct IrqNoFlags(u16);

impl IrqNoFlags {
    fn new(device: &str, irq: u8) -> Result<Self, AcpiError> {
        if irq < 16 {
            Ok(IrqNoFlags(1 << irq))
        } else {
            Err(AcpiError::Device {
                device: device.to_string(),
                reason: format!("IRQ {irq} is not an ISA IRQ (0–15)"),
            })
        }
    }
}

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.byte(0x22); // small item: IRQ format (4), 2 bytes
        sink.word(self.0);
    }
}

/// DSDT: the PCI host bridge and motherboard resources, the legacy devices and \_S5_.
fn dsdt(graph: &DeviceGraph) -> Result<Vec<u8>, AcpiError> {
    let mut sb = pci_host_bridge(graph);
    sb.extend(motherboard_resources());
    if let Some(irq) = graph.hotplug_irq {
        sb.extend(hotplug_event_device(irq));
    }
    let mut names = std::collections::BTreeSet::new();
    for d in &graph.devices {
        for (name, dev) in legacy_device(d)? {
            if names.contains(&name) {
                return Err(AcpiError::Device {
                    device: d.name.clone(),
                    reason: format!("a second {name} device"),
                });
            }
            names.insert(name);
            sb.extend(dev);
        }
    }
    let sb = aml::Scope::raw("\\_SB_".into(), sb);
    // Sleep type 5 for S5: Linux writes SLP_TYP 5 | SLP_EN to the sleep control register.
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&5u8, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    );
    let mut t = Sdt::new(
        *b"DSDT",
        HEADER_LEN as u32,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    t.append_slice(&sb);
    t.append_slice(&s5.to_bytes());
    Ok(seal(t.as_slice().to_vec()))
}

/// Already serialized AML.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// The hotplug part of \_SB_.PCI0 (see devices/hotplug.rs for the registers):
///
/// ```text
/// OperationRegion (PHPR, SystemIO, 0x610, 16)
/// Field (PHPR, DWordAcc, NoLock, WriteAsZeros) { PCIU, 32, PCID, 32, B0EJ, 32, PCIP, 32 }
/// Mutex (BLCK, 0)
/// Method (PCEJ, 1) { Acquire (BLCK, 0xffff); B0EJ = 1 << Arg0; Release (BLCK) }
/// Device (S1C_) { Name (_ADR, 0x1c0000); Name (_SUN, 28); Method (_EJ0, 1) { PCEJ (28) } }
/// …one device per hotplug slot…
/// Method (PCNT) { Acquire (BLCK, 0xffff); Local0 = PCIU; Local1 = PCID; Release (BLCK)
///                 If (Local0 & (1 << 28)) { Notify (S1C_, 1) }    // device check: rescan
///                 If (Local1 & (1 << 28)) { Notify (S1C_, 3) } …  // eject request
/// }
/// ```
fn pci_hotplug(graph: &DeviceGraph) -> Vec<Raw> {
    let slots: Vec<u8> = graph.hotplug_slots().map(|s| s.slot).collect();
    if slots.is_empty() || graph.hotplug_irq.is_none() {
        return Vec::new();
    }
    let name = |slot: u8| format!("S{slot:02X}_");
    let (base, len) = layout::PCI_HOTPLUG_PIO;
    let mut out = vec![
        Raw(
            aml::OpRegion::new("PHPR".into(), aml::OpRegionSpace::SystemIO, &base, &len).to_bytes(),
        ),
        Raw(aml::Field::new(
            "PHPR".into(),
            aml::FieldAccessType::DWord,
            aml::FieldLockRule::NoLock,
            aml::FieldUpdateRule::WriteAsZeroes,
            vec![
                aml::FieldEntry::Named(*b"PCIU", 32),
                aml::FieldEntry::Named(*b"PCID", 32),
                aml::FieldEntry::Named(*b"B0EJ", 32),
                aml::FieldEntry::Named(*b"PCIP", 32),
            ],
        )
        .to_bytes()),
        Raw(aml::Mutex::new("BLCK".into(), 0).to_bytes()),
        Raw(aml::Method::new(
            "PCEJ".into(),
            1,
            false,
            vec![
                &aml::Acquire::new("BLCK".into(), 0xffff),
                &aml::ShiftLeft::new(&aml::Path::new("B0EJ"), &aml::ONE, &aml::Arg(0)),
                &aml::Release::new("BLCK".into()),
            ],
        )
        .to_bytes()),
    ];
    for &slot in &slots {
        let adr = u32::from(slot) << 16;
        let sun = u32::from(slot);
        let call = aml::MethodCall::new("PCEJ".into(), vec![&sun]);
        out.push(Raw(aml::Device::new(
            name(slot).as_str().into(),
            vec![
                &aml::Name::new("_ADR".into(), &adr),
                &aml::Name::new("_SUN".into(), &sun),
                &aml::Method::new("_EJ0".into(), 1, false, vec![&call]),
            ],
        )
        .to_bytes()));
    }
    let mut body: Vec<Raw> = vec![
        Raw(aml::Acquire::new("BLCK".into(), 0xffff).to_bytes()),
        Raw(aml::Store::new(&aml::Local(0), &aml::Path::new("PCIU")).to_bytes()),
        Raw(aml::Store::new(&aml::Local(1), &aml::Path::new("PCID")).to_bytes()),
        Raw(aml::Release::new("BLCK".into()).to_bytes()),
    ];
    for &slot in &slots {
        let bit = 1u32 << slot;
        let dev = aml::Path::new(&name(slot));
        for (local, code) in [(0u8, 1u8), (1, 3)] {
            let pending = aml::Local(local);
            let test = aml::And::new(&aml::ZERO, &pending, &bit);
            let notify = aml::Notify::new(&dev, &code);
            body.push(Raw(aml::If::new(&test, vec![&notify]).to_bytes()));
        }
    }
    let body: Vec<&dyn Aml> = body.iter().map(|r| r as &dyn Aml).collect();
    out.push(Raw(
        aml::Method::new("PCNT".into(), 0, true, body).to_bytes()
    ));
    out
}

/// \_SB_.GED0: the Generic Event Device whose interrupt says "look at the hotplug registers".
fn hotplug_event_device(irq: u8) -> Vec<u8> {
    let int = aml::Interrupt::new(true, true, false, false, u32::from(irq));
    let crs = aml::ResourceTemplate::new(vec![&int]);
    let scan = aml::MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    aml::Device::new(
        "GED0".into(),
        vec![
            &aml::Name::new("_HID".into(), &"ACPI0013"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
            &aml::Method::new("_EVT".into(), 1, true, vec![&scan]),
        ],
    )
    .to_bytes()
}

/// \_SB_.PCI0: the PCIe host bridge of segment 0, bus 0, with its hotplug slots.
fn pci_host_bridge(graph: &DeviceGraph) -> Vec<u8> {
    let bus = AddressSpace::<u16>::new_bus_number(0, 0);
    let config = aml::IO::new(
        PCI_CONFIG_FIRST,
        PCI_CONFIG_FIRST,
        1,
        layout::PCI_CONFIG_PIO.1 as u8, // fits: checked at compile time above
    );
    let io_low = AddressSpace::<u16>::new_io(0, PCI_CONFIG_FIRST - 1, None);
    let io_high = AddressSpace::<u16>::new_io(PCI_CONFIG_END, u16::MAX, None);
    let mmio = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_FIRST,
        PCI_MMIO_LAST,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &config, &io_low, &io_high, &mmio]);
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A08"));
    let cid = aml::Name::new("_CID".into(), &aml::EISAName::new("PNP0A03"));
    let seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    let hotplug = pci_hotplug(graph);
    let mut children: Vec<&dyn Aml> = vec![&hid, &cid, &seg, &uid, &bbn, &crs];
    children.extend(hotplug.iter().map(|r| r as &dyn Aml));
    aml::Device::new("PCI0".into(), children).to_bytes()
}

/// \_SB_.MRES: reserves the ECAM window as a motherboard resource. Linux uses the MCFG's ECAM
/// only when it is reserved in the e820 map or by a PNP0C02 device like this one.
fn motherboard_resources() -> Vec<u8> {
    let ecam = aml::Memory32Fixed::new(true, ECAM_ADDR, ECAM_LEN);
    let crs = aml::ResourceTemplate::new(vec![&ecam]);
    aml::Device::new(
        "MRES".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C02")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_bytes()
}

/// The ACPI devices (name, AML) describing a device on the legacy I/O port bus; none for a PCI
/// device (bus 0 is enumerated, not described).
fn legacy_device(d: &DeviceNode) -> Result<Vec<(String, Vec<u8>)>, AcpiError> {
    let Placement::Pio {
        label,
        ports,
        irqs,
        acpi,
    } = &d.placement
    else {
        return Ok(Vec::new());
    };
    let err = |reason: String| AcpiError::Device {
        device: d.name.clone(),
        reason,
    };
    let io: Vec<aml::IO> = ports
        .iter()
        .map(|&(first, len)| match u8::try_from(len) {
            Ok(n) if n > 0 && first.checked_add(len - 1).is_some() => {
                Ok(aml::IO::new(first, first, 1, n))
            }
            _ => Err(err(format!("cannot describe {len} ports at {first:#x}"))),
        })
        .collect::<Result<_, _>>()?;
    let irq = |i: usize| -> Result<IrqNoFlags, AcpiError> {
        let n = irqs
            .get(i)
            .ok_or_else(|| err(format!("placement {label} has no IRQ #{i}")))?;
        IrqNoFlags::new(&d.name, *n)
    };
    if acpi.is_empty() {
        return Err(err(format!(
            "{} devices on the I/O port bus ({label}) have no ACPI description",
            d.kind
        )));
    }
    let mut out = Vec::new();
    for node in acpi.iter() {
        if node.name.len() != 4 {
            return Err(err(format!(
                "ACPI name {:?} is not 4 characters",
                node.name
            )));
        }
        let irqs: Vec<IrqNoFlags> = node
            .irqs
            .iter()
            .map(|&i| irq(i))
            .collect::<Result<_, _>>()?;
        let mut res: Vec<&dyn Aml> = Vec::new();
        if node.ports {
            res.extend(io.iter().map(|r| r as &dyn Aml));
        }
        res.extend(irqs.iter().map(|r| r as &dyn Aml));
        out.push((
            node.name.to_string(),
            acpi_device(node.name, node.hid, node.uid, res),
        ));
    }
    Ok(out)
}

/// `Device (name) { _HID, [_UID], _CRS }`. `name` has 4 characters (callers pass constants or
/// "COM" and one digit).
fn acpi_device(name: &str, hid: &str, uid: Option<u8>, resources: Vec<&dyn Aml>) -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new(hid));
    let uid = uid.map(|u| aml::Name::new("_UID".into(), &u));
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(resources));
    let mut children: Vec<&dyn Aml> = vec![&hid];
    if let Some(u) = &uid {
        children.push(u);
    }
    children.push(&crs);
    aml::Device::new(name.into(), children).to_bytes()
}

#[cfg(test)]
mod tests;
