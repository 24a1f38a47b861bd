//! 16550A UART on the legacy I/O ports (COM1–COM4).
//!
//! Linux's 8250 driver finds COM1–COM4 at their conventional ports and IRQs without firmware
//! help (`console=ttyS0`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::contract::check::DeviceCheck;
use crate::contract::units::DeviceName;
use crate::contract::{
    AcpiNode, DeviceError, DeviceKindInfo, DeviceSpec, KindInfo, Needs, PioPlacement,
};
use crate::devices::Device;
use crate::hw::char_io::CharIo;

/// A 16550A serial port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SerialSpec {
    /// Unique device name.
    pub name: DeviceName,
    /// Legacy port; the first free one (in name order) when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<ComPort>,
    /// Where the port's bytes go: "stdio", "none", { file = "…" } or { socket = "…" }.
    pub io: CharIo,
}

/// A conventional PC serial port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ComPort {
    /// I/O ports 0x3f8–0x3ff, IRQ 4 (Linux ttyS0).
    Com1,
    /// I/O ports 0x2f8–0x2ff, IRQ 3 (ttyS1).
    Com2,
    /// I/O ports 0x3e8–0x3ef, IRQ 4, shared with COM1 (ttyS2).
    Com3,
    /// I/O ports 0x2e8–0x2ef, IRQ 3, shared with COM2 (ttyS3).
    Com4,
}

/// The four placements, each with its ACPI node (PNP0501, `_UID` = the port's number).
pub static COM_PORTS: [PioPlacement; 4] = [
    PioPlacement {
        label: "com1",
        ports: &[(0x3f8, 8)],
        irqs: &[4],
        acpi: &[uart("COM1", 1)],
    },
    PioPlacement {
        label: "com2",
        ports: &[(0x2f8, 8)],
        irqs: &[3],
        acpi: &[uart("COM2", 2)],
    },
    PioPlacement {
        label: "com3",
        ports: &[(0x3e8, 8)],
        irqs: &[4],
        acpi: &[uart("COM3", 3)],
    },
    PioPlacement {
        label: "com4",
        ports: &[(0x2e8, 8)],
        irqs: &[3],
        acpi: &[uart("COM4", 4)],
    },
];

const fn uart(name: &'static str, uid: u8) -> AcpiNode {
    AcpiNode {
        name,
        hid: "PNP0501",
        uid: Some(uid),
        ports: true,
        irqs: &[0],
    }
}

impl DeviceKindInfo for SerialSpec {
    const INFO: KindInfo = KindInfo {
        key: "serial",
        noun: "serial port",
        hotpluggable: false,
        max_count: Some(4),
        aliases: &["uart", "com", "serials"],
        platform: &[],
        vhost_user: None,
        seccomp: &crate::sandbox::NO_WORKER,
    };
}

impl DeviceSpec for SerialSpec {
    fn info(&self) -> &'static KindInfo {
        &Self::INFO
    }
    fn name(&self) -> &str {
        self.name.as_str()
    }
    fn needs(&self) -> Needs {
        match self.port {
            Some(p) => Needs::Pio(std::slice::from_ref(&COM_PORTS[p as usize])),
            None => Needs::Pio(&COM_PORTS),
        }
    }
    fn check(&self, cx: &mut dyn DeviceCheck) {
        self.io.check(cx, "io");
    }
    fn describe(&self, _machine: &str) -> Vec<(&'static str, String)> {
        vec![("io", self.io.describe())]
    }
}

impl Device for SerialSpec {
    fn build(
        &self,
        at: &crate::contract::Placement,
        m: &mut dyn crate::hw::Machine,
    ) -> Result<(), DeviceError> {
        let crate::contract::Placement::Pio { ports, irqs, .. } = at else {
            return Err(DeviceError(format!(
                "serial `{}` needs a legacy I/O port placement",
                self.name
            )));
        };
        let irq = m.irq_line(irqs[0])?;
        let (port, input) = SerialPort::new(irq.clone(), CharOut::Sink);
        let out = m.open_char(self.name.as_str(), &self.io, Arc::new(input))?;
        port.set_output(out);
        m.add_pio(
            ports[0].0,
            ports[0].1,
            Arc::new(Mutex::new(Rank::BusDevice, port)),
        )
    }
}

// ---- The device model -----------------------------------------------------------------------

use std::sync::Arc;

use crate::sync::{Mutex, MutexGuard, Rank};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use crate::hw::Irq;
use crate::hw::bus::BusDevice;
use crate::hw::char_io::{CharInput, CharOut};

/// Raises the UART's interrupt line.
#[derive(Debug)]
pub struct IrqTrigger(pub Arc<dyn Irq>);

impl Trigger for IrqTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.trigger();
        Ok(())
    }
}

type Uart = Serial<IrqTrigger, NoEvents, CharOut>;

/// The UART and what the watchdog ([`CharInput::unstick`]) needs to see progress.
#[derive(Debug)]
struct Shared {
    uart: Uart,
    /// Guest writes of the transmit register and reads of the receive register so far.
    thr_writes: u64,
    rbr_reads: u64,
    /// Both counters at the watchdog's last look.
    seen: (u64, u64),
}

impl Shared {
    /// Whether the divisor latch is selected (offsets 0 and 1 are then the divisor). Reading
    /// LCR has no side effect; `state()` would copy the FIFO on every data register access.
    fn dlab(&mut self) -> bool {
        self.uart.read(LCR) & LCR_DLAB != 0
    }
}

fn lock(s: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    s.lock()
}

/// A 16550A UART (vm-superio's model) on the I/O port bus.
#[derive(Debug)]
pub struct SerialPort(Arc<Mutex<Shared>>);

/// The input side of a [`SerialPort`], for stdin or a socket client.
#[derive(Debug)]
pub struct SerialInput(Arc<Mutex<Shared>>);

impl SerialPort {
    pub fn new(irq: Arc<dyn Irq>, out: CharOut) -> (SerialPort, SerialInput) {
        let shared = Arc::new(Mutex::new(
            Rank::DeviceState,
            Shared {
                uart: Serial::new(IrqTrigger(irq), out),
                thr_writes: 0,
                rbr_reads: 0,
                seen: (0, 0),
            },
        ));
        (SerialPort(shared.clone()), SerialInput(shared))
    }

    /// Where the guest's output goes.
    pub fn set_output(&self, out: CharOut) {
        *lock(&self.0).uart.writer_mut() = out;
    }
}

/// Register offsets and bits the watchdog looks at (16550).
const DATA: u8 = 0;
const IER: u8 = 1;
const IIR: u8 = 2;
const LCR: u8 = 3;
const LCR_DLAB: u8 = 0x80;
const IER_RDA: u8 = 0x01;
const IER_THRI: u8 = 0x02;
const IIR_THRE: u8 = 0x02;

impl BusDevice for SerialPort {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset < 8 {
            let mut s = lock(&self.0);
            if offset == u64::from(DATA) && !s.dlab() {
                s.rbr_reads += 1;
            }
            data[0] = s.uart.read(offset as u8);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset < 8 {
            let mut s = lock(&self.0);
            if offset == u64::from(DATA) && !s.dlab() {
                s.thr_writes += 1;
            }
            // Output errors (a closed stdout) lose output, never the VM.
            let _ = s.uart.write(offset as u8, data[0]);
        }
    }
}

impl CharInput for SerialInput {
    fn push(&self, bytes: &[u8]) -> usize {
        let mut s = lock(&self.0);
        let room = s.uart.fifo_capacity();
        let n = bytes.len().min(room);
        if n == 0 {
            return 0;
        }
        s.uart.enqueue_raw_bytes(&bytes[..n]).unwrap_or(0)
    }

    /// The model latches an interrupt cause in IIR and raises the line only when the cause is
    /// new, so one lost edge (the guest masked the IOAPIC pin at that moment) would stop input
    /// or output for good. When input waits with the receive interrupt enabled, or the
    /// transmit interrupt is enabled and latched, and the guest has not touched the data
    /// register since the last look, the latch is cleared and the causes raised again.
    fn unstick(&self) {
        let mut s = lock(&self.0);
        let progress = (s.thr_writes, s.rbr_reads);
        let moved = progress != s.seen;
        s.seen = progress;
        if moved {
            return;
        }
        let st = s.uart.state();
        if st.line_control & LCR_DLAB != 0 {
            return;
        }
        let rx_stuck = st.interrupt_enable & IER_RDA != 0 && !st.in_buffer.is_empty();
        let tx_stuck =
            st.interrupt_enable & IER_THRI != 0 && st.interrupt_identification & IIR_THRE != 0;
        if rx_stuck || tx_stuck {
            log::debug!(
                "serial: no progress with {} pending; raising its interrupt again",
                if rx_stuck { "input" } else { "output" }
            );
            // Reading IIR clears the latch; rewriting IER raises every enabled pending cause.
            let _ = s.uart.read(IIR);
            let _ = s.uart.write(IER, st.interrupt_enable);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::Count;

    #[test]
    fn a_stuck_interrupt_is_raised_again_only_without_progress() {
        let irq = Arc::new(Count::default());
        let (mut port, input) = SerialPort::new(irq.clone(), CharOut::Sink);
        let n = || irq.get() as usize;
        port.write(0x3f8, 1, &[0x01]); // IER: data available
        // Nothing waiting: nothing raised.
        input.unstick();
        let base = n();
        input.unstick();
        assert_eq!(n(), base);
        // Input waits, its cause latched (the edge "lost"): the first look sees no progress
        // since the last one and raises it again; the data stays.
        assert_eq!(input.push(b"ab"), 2);
        let before = n();
        input.unstick();
        assert_eq!(n(), before + 1);
        assert_eq!(
            64 - lock(&input.0).uart.fifo_capacity(),
            2,
            "the data stays"
        );
        // The guest reads a byte: progress, nothing raised at the next look.
        let mut b = [0u8; 1];
        port.read(0x3f8, 0, &mut b);
        assert_eq!(b[0], b'a');
        let before = n();
        input.unstick();
        assert_eq!(n(), before);
        // No progress again: raised.
        input.unstick();
        assert_eq!(n(), before + 1);
        // Receive interrupt disabled (the guest throttles input): not raised.
        port.write(0x3f8, 1, &[0x00]);
        input.unstick();
        let before = n();
        input.unstick();
        assert_eq!(n(), before);
        // Transmit interrupt enabled and latched with no transmit since: raised.
        port.write(0x3f8, 1, &[0x02]);
        input.unstick();
        let before = n();
        input.unstick();
        assert_eq!(n(), before + 1);
        // DLAB set: offset 1 is the divisor latch, left alone.
        port.write(0x3f8, 3, &[0x80]);
        input.unstick();
        let before = n();
        input.unstick();
        assert_eq!(n(), before);
    }

    #[test]
    fn input_is_bounded_by_the_fifo_and_raises_the_irq() {
        let irq = Arc::new(Count::default());
        let (mut port, input) = SerialPort::new(irq.clone(), CharOut::Sink);
        port.write(0x3f8, 1, &[0x01]); // IER: received data available interrupt
        let took = input.push(&[b'x'; 1000]);
        assert!(took > 0 && took < 1000, "took {took}");
        assert!(irq.get() > 0);
        let mut b = [0u8; 1];
        port.read(0x3f8, 0, &mut b);
        assert_eq!(b[0], b'x');
        // Hostile widths and offsets.
        let mut w = [0u8; 8];
        for off in 0..16 {
            port.read(0x3f8, off, &mut w);
            port.write(0x3f8, off, &w);
        }
    }
}
