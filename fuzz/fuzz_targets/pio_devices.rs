//! The legacy port-I/O devices as access sequences: serial (16550, with host input arriving
//! between accesses), CMOS/RTC, i8042, the PCI hotplug controller, ACPI PM. Each op picks a
//! device, a direction, an offset in (and a little past) its range and a width. Oracle: no
//! panic, no hang.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use vmm::devices::legacy::cmos::Cmos;
use vmm::devices::legacy::i8042::{COMMAND_PORT, DATA_PORT, I8042};
use vmm::devices::legacy::serial::SerialPort;
use vmm::hw::VmControl;
use vmm::hw::bus::BusDevice;
use vmm::hw::char_io::{CharInput, CharOut};
use vmm::hw::hotplug::{Hotplug, HotplugPorts};
use vmm::hw::platform::AcpiPm;
use vmm::testing::Count;
use vmm_fuzz::Input;

#[derive(Debug)]
struct NoVm;

impl VmControl for NoVm {
    fn request(&self, _: vmm::hw::VmRequest) {}
}

fuzz_target!(|data: &[u8]| {
    let irq = || Arc::new(Count::default());
    let (mut serial, input) = SerialPort::new(irq(), CharOut::Sink);
    let start = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    let mut cmos = Cmos::new(256 << 20, 1 << 30, Box::new(move || start));
    let mut kbd = I8042::new(irq(), irq(), Arc::new(NoVm));
    let hp = Hotplug::new(8, irq());
    hp.set_on_eject(Box::new(|_| {}));
    hp.set_present(1);
    hp.announce(1);
    let mut ports = HotplugPorts(hp);
    let mut pm = AcpiPm::new(Arc::new(NoVm));
    let mut inp = Input(data);
    let mut steps = 0;
    while let Some(op) = inp.u8() {
        steps += 1;
        if steps > 8192 {
            break;
        }
        let Some(off) = inp.u8() else { break };
        let len = [1usize, 2, 4, 1][usize::from(op >> 6)];
        let write = op & 8 != 0;
        let v = inp.u32().unwrap_or(0).to_le_bytes();
        let mut b = [0u8; 4];
        let dev: &mut dyn BusDevice = match op & 7 {
            0 => &mut serial,
            1 => &mut cmos,
            2 => &mut kbd,
            3 => &mut ports,
            4 => &mut pm,
            _ => {
                // Host input for the serial port (as the terminal or a socket delivers it).
                input.push(&v[..len]);
                continue;
            }
        };
        // The i8042 is two one-port ranges told apart by their base (0x60 data, 0x64
        // command); the others are one range each.
        let (base, off) = if op & 7 == 2 {
            let base = [DATA_PORT, COMMAND_PORT][usize::from(off & 1)];
            (base, u64::from((off >> 1) % 8 == 7))
        } else {
            (0, u64::from(off % 24))
        };
        if write {
            dev.write(base, off, &v[..len]);
        } else {
            dev.read(base, off, &mut b[..len]);
        }
    }
});
