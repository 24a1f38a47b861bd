//! The VM as devices see it while they are built: interrupt lines, the buses, guest memory,
//! and the platform's own devices (PCI config access, ACPI PM, PCI hotplug).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::VmError;
use super::handle::{Handle, IOAPIC_PINS, KvmHandle};
use super::live::{LiveVm, Plugged, attach_pci};
use super::vcpu::ExitState;
use crate::graph::DeviceGraph;
use crate::graph::layout::{
    ACPI_PM_PIO, IOAPIC_START, PCI_CONFIG_PIO, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_HOTPLUG_PIO,
};
use crate::hw::bus::{Bus, SharedDevice};
use crate::hw::char_io::{self, CharInput, CharIo, CharOut, SocketGuard};
use crate::hw::hotplug::{Hotplug, HotplugPorts};
use crate::hw::pci::{PciConfigIo, PciEcam, PciRoot, SharedFunction};
use crate::hw::platform::AcpiPm;
use crate::hw::virtio::GuestMem;
use crate::hw::{DeviceError, Irq, Machine, VmControl, VmHandle};
use crate::sync::{Mutex, Rank, RwLock};

/// An interrupt line backed by an irqfd: writing the eventfd asserts the IOAPIC pin (edge).
#[derive(Debug)]
struct IrqFd(EventFd);

impl Irq for IrqFd {
    fn trigger(&self) {
        if let Err(e) = self.0.write(1) {
            log::warn!("raising an interrupt failed: {e}");
        }
    }
}

/// The VM as devices see it while they are built.
pub(super) struct Builder<'a> {
    vm: &'a VmFd,
    machine: &'a str,
    handle: Arc<KvmHandle>,
    mem: GuestMem,
    pci: Arc<Mutex<PciRoot>>,
    pio: Bus,
    mmio: Arc<RwLock<Bus>>,
    irqs: HashMap<u8, Arc<IrqFd>>,
    exit: Arc<ExitState>,
    base_dir: PathBuf,
    ram: (u64, u64),
    stdin: Option<Arc<dyn CharInput>>,
    /// Every character device's input side (the main loop's periodic `unstick`).
    inputs: Vec<Arc<dyn CharInput>>,
    sockets: Vec<SocketGuard>,
    plugged: HashMap<u8, Plugged>,
    outputs: Vec<(String, Arc<std::sync::atomic::AtomicU64>)>,
    health: Vec<super::live::Watched>,
}

impl Machine for Builder<'_> {
    fn machine_name(&self) -> &str {
        self.machine
    }

    fn irq_line(&mut self, pin: u8) -> Result<Arc<dyn Irq>, DeviceError> {
        if u32::from(pin) >= IOAPIC_PINS {
            return Err(DeviceError(format!("IOAPIC pin {pin} does not exist")));
        }
        if let Some(l) = self.irqs.get(&pin) {
            return Ok(l.clone());
        }
        let evt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| DeviceError(format!("eventfd: {e}")))?;
        self.vm
            .register_irqfd(&evt, u32::from(pin))
            .map_err(|e| DeviceError(format!("KVM_IRQFD for pin {pin}: {e}")))?;
        let l = Arc::new(IrqFd(evt));
        self.irqs.insert(pin, l.clone());
        Ok(l)
    }

    fn vm_control(&self) -> Arc<dyn VmControl> {
        self.exit.clone()
    }

    fn add_pio(&mut self, base: u16, len: u16, dev: SharedDevice) -> Result<(), DeviceError> {
        self.pio
            .insert(u64::from(base), u64::from(len), dev)
            .map_err(|e| DeviceError(e.to_string()))
    }

    fn ram(&self) -> (u64, u64) {
        self.ram
    }

    fn base_dir(&self) -> &std::path::Path {
        &self.base_dir
    }

    fn vm_handle(&self) -> Arc<dyn VmHandle> {
        Arc::new(Handle(self.handle.clone()))
    }

    fn guest_memory(&self) -> GuestMem {
        self.mem.clone()
    }

    fn add_pci(
        &mut self,
        slot: u8,
        function: SharedFunction,
        bar: (u64, u64),
        bar_device: SharedDevice,
    ) -> Result<(), DeviceError> {
        attach_pci(
            &self.pci,
            &self.mmio,
            slot,
            function.clone(),
            bar,
            bar_device.clone(),
        )?;
        self.plugged.insert(
            slot,
            Plugged {
                function,
                bar_device,
            },
        );
        Ok(())
    }

    fn open_char(
        &mut self,
        name: &str,
        io: &CharIo,
        input: Arc<dyn CharInput>,
    ) -> Result<CharOut, DeviceError> {
        if *io == CharIo::Stdio {
            self.stdin = Some(input.clone());
        }
        self.inputs.push(input.clone());
        let (out, guard) =
            char_io::open(io, &self.base_dir, input).map_err(|e| DeviceError(e.to_string()))?;
        self.sockets.extend(guard);
        if let Some(c) = out.dropped() {
            self.outputs.push((name.to_string(), c));
        }
        Ok(out)
    }

    fn watch_health(&mut self, name: &str, health: crate::hw::Health) {
        self.health.push(super::live::Watched {
            name: name.to_string(),
            slot: None,
            health,
        });
    }
}

/// What the main loop keeps of the builder: the port bus (for the vCPUs), the terminal and
/// character inputs, and the sockets to remove at the end.
pub(super) struct Rest {
    pub pio: Bus,
    pub stdin: Option<Arc<dyn CharInput>>,
    pub inputs: Vec<Arc<dyn CharInput>>,
    pub sockets: Vec<SocketGuard>,
}

impl<'a> Builder<'a> {
    pub(super) fn new(
        vm: &'a VmFd,
        graph: &'a DeviceGraph,
        handle: Arc<KvmHandle>,
        mem: GuestMem,
        mmio: Arc<RwLock<Bus>>,
        exit: Arc<ExitState>,
    ) -> Self {
        let below = graph
            .regions
            .iter()
            .filter(|r| r.ram && r.start < IOAPIC_START)
            .map(|r| r.size)
            .sum();
        Builder {
            vm,
            machine: &graph.machine,
            handle,
            mem,
            pci: Arc::new(Mutex::new(Rank::PciRoot, PciRoot::new())),
            pio: Bus::new(),
            mmio,
            irqs: HashMap::new(),
            exit,
            base_dir: graph.base_dir.clone(),
            ram: (below, graph.memory - below),
            stdin: None,
            inputs: Vec::new(),
            sockets: Vec::new(),
            plugged: HashMap::new(),
            outputs: Vec::new(),
            health: Vec::new(),
        }
    }

    /// The VM as it runs, and what the main loop keeps.
    pub(super) fn finish(
        self,
        graph: &DeviceGraph,
        hotplug: Option<Arc<Hotplug>>,
    ) -> (Arc<LiveVm>, Rest) {
        if let Some(hp) = &hotplug {
            for &slot in self.plugged.keys() {
                hp.set_present(slot);
            }
        }
        let live = Arc::new(LiveVm {
            machine: graph.machine.clone(),
            base_dir: graph.base_dir.clone(),
            ram: self.ram,
            handle: self.handle,
            mem: self.mem,
            pci: self.pci,
            mmio: self.mmio,
            exit: self.exit,
            hotplug,
            plugged: Mutex::new(Rank::Plugged, self.plugged),
            outputs: self.outputs,
            health: Mutex::new(Rank::Leaf, self.health),
        });
        let rest = Rest {
            pio: self.pio,
            stdin: self.stdin,
            inputs: self.inputs,
            sockets: self.sockets,
        };
        (live, rest)
    }

    /// The platform's devices: PCI config ports and ECAM, ACPI PM, and the PCI hotplug
    /// controller when the machine has hotplug slots.
    pub(super) fn platform(
        &mut self,
        graph: &DeviceGraph,
    ) -> Result<Option<Arc<Hotplug>>, VmError> {
        let device = |name: &str| {
            let name = name.to_string();
            move |source| VmError::Device { name, source }
        };
        let config = PciConfigIo::new(self.pci.clone());
        let (base, len) = PCI_CONFIG_PIO;
        self.add_pio(base, len, Arc::new(Mutex::new(Rank::BusDevice, config)))
            .map_err(device("pci-config"))?;
        let pm = AcpiPm::new(self.exit.clone());
        let (base, len) = ACPI_PM_PIO;
        self.add_pio(base, len, Arc::new(Mutex::new(Rank::BusDevice, pm)))
            .map_err(device("acpi-pm"))?;
        let ecam = PciEcam::new(self.pci.clone());
        self.mmio
            .write()
            .insert(
                PCI_ECAM_START,
                PCI_ECAM_SIZE,
                Arc::new(Mutex::new(Rank::BusDevice, ecam)),
            )
            .map_err(|e| device("pci-ecam")(DeviceError(e.to_string())))?;
        let Some(pin) = graph.hotplug_irq else {
            return Ok(None);
        };
        let irq = self.irq_line(pin).map_err(device("pci-hotplug"))?;
        let slots = graph.hotplug_slots().fold(0u32, |m, s| {
            m | 1u32.checked_shl(u32::from(s.slot)).unwrap_or(0)
        });
        let hp = Hotplug::new(slots, irq);
        let (base, len) = PCI_HOTPLUG_PIO;
        let ports = HotplugPorts(hp.clone());
        self.add_pio(base, len, Arc::new(Mutex::new(Rank::BusDevice, ports)))
            .map_err(device("pci-hotplug"))?;
        Ok(Some(hp))
    }
}
