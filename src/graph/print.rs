//! `vmm graph`: the device graph as stable, readable text.

use std::fmt::Write;

use super::{DeviceGraph, Placement};
use crate::contract::units::human_size;

fn hex(n: u64) -> String {
    format!("{n:#012x}")
}

pub fn render(g: &DeviceGraph) -> String {
    let mut o = String::new();
    let _ = write(g, &mut o);
    o
}

fn write(g: &DeviceGraph, o: &mut String) -> std::fmt::Result {
    machine(g, o)?;
    boot(g, o)?;
    memory_map(g, o)?;
    pio_bus(g, o)?;
    pci_bus(g, o)?;
    interrupts(g, o)?;
    devices(g, o)
}

/// The machine's name, vCPUs, RAM and CPU profile.
fn machine(g: &DeviceGraph, o: &mut String) -> std::fmt::Result {
    let cpus = if g.vcpus == 1 {
        "1 vCPU".to_string()
    } else {
        format!("{} vCPUs", g.vcpus)
    };
    writeln!(
        o,
        "machine {}: {cpus}, {} RAM",
        g.machine,
        human_size(g.memory)
    )?;
    if !g.cpu_hide.is_empty() {
        let names: Vec<&str> = g.cpu_hide.iter().map(|f| f.name()).collect();
        writeln!(o, "cpu: host profile without {}", names.join(", "))?;
    }
    Ok(())
}

/// Kernel, initrd and command line.
fn boot(g: &DeviceGraph, o: &mut String) -> std::fmt::Result {
    writeln!(o, "\nboot")?;
    writeln!(o, "  kernel   {}", g.boot.kernel)?;
    if let Some(i) = &g.boot.initrd {
        writeln!(o, "  initrd   {i}")?;
    }
    writeln!(o, "  cmdline  {:?}", g.boot.cmdline)?;
    Ok(())
}

/// The regions of the guest physical address space.
fn memory_map(g: &DeviceGraph, o: &mut String) -> std::fmt::Result {
    writeln!(o, "\nmemory map")?;
    for r in &g.regions {
        writeln!(
            o,
            "  {}-{}  {:<9} {}",
            hex(r.start),
            hex(r.end() - 1),
            r.name,
            human_size(r.size)
        )?;
    }
    Ok(())
}

/// Platform and legacy device port ranges, by port.
fn pio_bus(g: &DeviceGraph, o: &mut String) -> std::fmt::Result {
    writeln!(o, "\npio bus")?;
    let mut pio: Vec<(u16, String)> = Vec::new();
    for p in &g.platform_pio {
        pio.push((p.base, format!("{:<13} {}", ports(p.base, p.len), p.name)));
    }
    for d in &g.devices {
        if let Placement::Pio {
            label,
            ports: ps,
            irqs,
            ..
        } = &d.placement
        {
            for &(base, len) in ps {
                let irq = irqs.iter().map(u8::to_string).collect::<Vec<_>>().join(",");
                let who = format!("{} {:?}", d.kind, d.name);
                pio.push((
                    base,
                    format!("{:<13} {:<6} {who:<20} irq {irq}", ports(base, len), label),
                ));
            }
        }
    }
    pio.sort();
    for (_, line) in pio {
        writeln!(o, "  {line}")?;
    }
    Ok(())
}

/// Bus 0 slot by slot (empty static slots left out).
fn pci_bus(g: &DeviceGraph, o: &mut String) -> std::fmt::Result {
    let first_hotplug = g.pci_slots.iter().find(|s| s.hotplug).map(|s| s.slot);
    let layout = match first_hotplug {
        Some(h) => format!("slots 1-{} static, {h}-31 hotplug", h - 1),
        None => "slots 1-31 static, no hotplug slots".into(),
    };
    writeln!(
        o,
        "\npci bus 0 (ecam {}; {layout})",
        hex(super::layout::PCI_ECAM_START)
    )?;
    for s in &g.pci_slots {
        let head = format!(
            "slot {:>2}  00:{:02x}.0  {}",
            s.slot,
            s.slot,
            if s.hotplug { "hotplug" } else { "static " }
        );
        let Some(name) = &s.occupant else {
            if s.hotplug {
                writeln!(o, "  {head}  (empty)")?;
            }
            continue;
        };
        let Some(d) = g.device(name) else {
            writeln!(o, "  {head}  {name}")?;
            continue;
        };
        if let Placement::Pci {
            queues,
            msix_vectors,
            bars,
            device_type,
            ..
        } = &d.placement
        {
            let bar = bars
                .iter()
                .map(|b| format!("bar{} {} {}", b.index, hex(b.addr), human_size(b.size)))
                .collect::<Vec<_>>();
            let q = if *queues == 1 { "queue " } else { "queues" };
            writeln!(
                o,
                "  {head}  {:<10} {:<12} virtio {device_type:>2}  {queues} {q}  msi-x {msix_vectors:>2}  {}",
                d.kind,
                format!("{:?}", d.name),
                bar.join(", ")
            )?;
        }
    }
    Ok(())
}

/// IOAPIC pins by number, then the MSI-X vector count.
fn interrupts(g: &DeviceGraph, o: &mut String) -> std::fmt::Result {
    writeln!(o, "\ninterrupts")?;
    let mut irqs: Vec<(u8, String)> = vec![(g.sci_irq, "acpi-sci".into())];
    if let Some(i) = g.hotplug_irq {
        irqs.push((i, "pci-hotplug (acpi ged)".into()));
    }
    for d in &g.devices {
        if let Placement::Pio {
            irqs: is, label, ..
        } = &d.placement
        {
            for &i in is {
                irqs.push((i, format!("{label} ({:?})", d.name)));
            }
        }
    }
    irqs.sort();
    for (i, who) in irqs {
        writeln!(o, "  ioapic pin {i:>2}  {who}")?;
    }
    let msix: u32 = g
        .devices
        .iter()
        .map(|d| match d.placement {
            Placement::Pci { msix_vectors, .. } => u32::from(msix_vectors),
            Placement::Pio { .. } => 0,
        })
        .sum();
    writeln!(o, "  msi-x      {msix} vectors on bus 0")?;
    Ok(())
}

/// Each device with the properties it describes.
fn devices(g: &DeviceGraph, o: &mut String) -> std::fmt::Result {
    writeln!(o, "\ndevices")?;
    for d in &g.devices {
        let props = d.spec.spec().describe(&g.machine);
        let props: Vec<String> = props.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let line = format!(
            "  {:<10} {:<12} {}",
            d.kind,
            format!("{:?}", d.name),
            props.join(" ")
        );
        writeln!(o, "{}", line.trim_end())?;
    }
    Ok(())
}

fn ports(base: u16, len: u16) -> String {
    if len <= 1 {
        format!("{base:#06x}")
    } else {
        format!("{base:#06x}-{:#06x}", base + len - 1)
    }
}
