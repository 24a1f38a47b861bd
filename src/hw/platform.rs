//! Platform devices every machine has: the ACPI sleep control/status registers
//! (hardware-reduced ACPI, at `layout::ACPI_PM_PIO`).
//!
//! The guest powers off by writing SLP_TYP = 5 (the `_S5_` value in the DSDT) with SLP_EN to
//! the sleep control register.

use std::sync::Arc;

use crate::hw::bus::BusDevice;
use crate::hw::{VmControl, VmRequest};

/// Offsets in the ACPI PM range.
pub const SLEEP_CONTROL: u64 = 0;
pub const SLEEP_STATUS: u64 = 1;
const SLP_EN: u8 = 1 << 5;
/// The SLP_TYP value of S5 in vmm's DSDT.
pub const S5_SLP_TYP: u8 = 5;

/// ACPI sleep control and status registers.
#[derive(Debug)]
pub struct AcpiPm {
    vm: Arc<dyn VmControl>,
    status: u8,
}

impl AcpiPm {
    pub fn new(vm: Arc<dyn VmControl>) -> AcpiPm {
        AcpiPm { vm, status: 0 }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == SLEEP_STATUS {
            data[0] = self.status;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match offset {
            SLEEP_CONTROL => {
                let v = data[0];
                if v & SLP_EN != 0 && (v >> 2) & 0x7 == S5_SLP_TYP {
                    self.vm.request(VmRequest::PowerOff);
                } else if v & SLP_EN != 0 {
                    log::info!(
                        "guest asked for sleep type {} (only S5 is supported); ignored",
                        (v >> 2) & 0x7
                    );
                }
            }
            // Write-one-to-clear status bits.
            SLEEP_STATUS => self.status &= !data[0],
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    struct Rec(Mutex<Vec<VmRequest>>);
    impl VmControl for Rec {
        fn request(&self, r: VmRequest) {
            self.0.lock().unwrap().push(r);
        }
    }

    #[test]
    fn s5_powers_off_and_nothing_else_does() {
        let rec = Arc::new(Rec::default());
        let mut pm = AcpiPm::new(rec.clone());
        for v in 0..=255u8 {
            if v != 0x34
                && v != 0x35
                && v != 0x36
                && v != 0x37
                && !(v & SLP_EN != 0 && (v >> 2) & 7 == 5)
            {
                pm.write(0x600, 0, &[v]);
            }
        }
        assert!(rec.0.lock().unwrap().is_empty());
        pm.write(0x600, 0, &[0x34]);
        assert_eq!(*rec.0.lock().unwrap(), vec![VmRequest::PowerOff]);
        let mut b = [0u8; 4];
        pm.read(0x600, 1, &mut b);
        pm.read(0x600, 7, &mut b);
        pm.write(0x600, 7, &[1, 2, 3, 4]);
    }
}
