//! i8042 keyboard controller at I/O ports 0x60 and 0x64 (IRQ 1, 12).
//!
//! Enough of the controller for Linux's i8042 probe, and its reset line: a guest writing 0xFE to
//! port 0x64 (`reboot`) ends the VM.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::contract::units::DeviceName;
use crate::contract::{
    AcpiNode, DeviceError, DeviceKindInfo, DeviceSpec, KindInfo, Needs, PioPlacement, PlatformFact,
};
use crate::devices::Device;

/// The i8042 controller. Write `[[i8042]]` to give the machine one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct I8042Spec {
    /// Device name; "i8042" when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<DeviceName>,
}

/// The controller's ports and keyboard IRQ on the keyboard's ACPI node; the aux port (mouse)
/// has only its IRQ, as on PCs.
static PLACEMENT: [PioPlacement; 1] = [PioPlacement {
    label: "i8042",
    ports: &[(0x60, 1), (0x64, 1)],
    irqs: &[1, 12],
    acpi: &[
        AcpiNode {
            name: "KBD_",
            hid: "PNP0303",
            uid: None,
            ports: true,
            irqs: &[0],
        },
        AcpiNode {
            name: "MOU_",
            hid: "PNP0F13",
            uid: None,
            ports: false,
            irqs: &[1],
        },
    ],
}];

impl DeviceKindInfo for I8042Spec {
    const INFO: KindInfo = KindInfo {
        key: "i8042",
        noun: "keyboard controller",
        hotpluggable: false,
        max_count: Some(1),
        aliases: &["keyboard", "ps2", "kbd"],
        platform: &[PlatformFact::Ps2Controller],
        vhost_user: None,
        seccomp: &crate::sandbox::NO_WORKER,
    };
}

impl DeviceSpec for I8042Spec {
    fn info(&self) -> &'static KindInfo {
        &Self::INFO
    }
    fn name(&self) -> &str {
        self.name.as_ref().map_or("i8042", |n| n.as_str())
    }
    fn needs(&self) -> Needs {
        Needs::Pio(&PLACEMENT)
    }
}

impl Device for I8042Spec {
    fn build(
        &self,
        at: &crate::contract::Placement,
        m: &mut dyn crate::hw::Machine,
    ) -> Result<(), DeviceError> {
        let (ports, irqs) = match at {
            crate::contract::Placement::Pio { ports, irqs, .. } => (ports.clone(), irqs.clone()),
            _ => (PLACEMENT[0].ports.to_vec(), PLACEMENT[0].irqs.to_vec()),
        };
        let kbd = m.irq_line(irqs[0])?;
        let aux = m.irq_line(irqs[1])?;
        let dev: crate::hw::bus::SharedDevice = std::sync::Arc::new(crate::sync::Mutex::new(
            crate::sync::Rank::BusDevice,
            I8042::new(kbd, aux, m.vm_control()),
        ));
        for (base, len) in ports {
            m.add_pio(base, len, dev.clone())?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Device model
// ---------------------------------------------------------------------------------------------

use std::collections::VecDeque;
use std::sync::Arc;

use crate::hw::bus::BusDevice;
use crate::hw::{Irq, VmControl, VmRequest};

/// Data port: output buffer (read), input buffer to the keyboard or a command's argument (write).
pub const DATA_PORT: u64 = 0x60;
/// Status register (read) and command register (write).
pub const COMMAND_PORT: u64 = 0x64;

/// Most bytes waiting to be read; more are dropped.
const QUEUE_LEN: usize = 16;

// Status register.
const ST_OBF: u8 = 0x01;
const ST_SYS: u8 = 0x04;
const ST_CMD: u8 = 0x08;
const ST_NOT_INHIBITED: u8 = 0x10;
const ST_AUX: u8 = 0x20;

// Controller configuration byte (CTR).
const CTR_KBD_INT: u8 = 0x01;
const CTR_AUX_INT: u8 = 0x02;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;
/// Interrupts on, system flag, scancode translation: about what a PC BIOS leaves behind.
const CTR_DEFAULT: u8 = CTR_KBD_INT | CTR_AUX_INT | CTR_SYS | CTR_XLATE;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT: u8 = 0xd0;
const CMD_WRITE_OUTPUT: u8 = 0xd1;
const CMD_WRITE_KBD_OBUF: u8 = 0xd2;
const CMD_WRITE_AUX_OBUF: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_FIRST: u8 = 0xf0;

/// Self-test passed.
const SELF_TEST_OK: u8 = 0x55;
/// Interface test passed.
const PORT_TEST_OK: u8 = 0x00;

// Output port.
/// Bit 0: the CPU reset line (low = reset).
const OUT_NO_RESET: u8 = 0x01;
/// Bit 1: the A20 gate.
const OUT_A20: u8 = 0x02;

// PS/2 device protocol.
const DEV_ACK: u8 = 0xfa;
const DEV_SELF_TEST_OK: u8 = 0xaa;
const DEV_RESET: u8 = 0xff;
const DEV_GET_ID: u8 = 0xf2;
const KBD_ECHO: u8 = 0xee;
const KBD_SET_LEDS: u8 = 0xed;
const KBD_SET_TYPEMATIC: u8 = 0xf3;
const KBD_SCANCODE_SET: u8 = 0xf0;
/// MF2 keyboard.
const KBD_ID: [u8; 2] = [0xab, 0x83];
const AUX_SET_RESOLUTION: u8 = 0xe8;
const AUX_STATUS_REQUEST: u8 = 0xe9;
const AUX_SET_SAMPLE_RATE: u8 = 0xf3;
/// Standard PS/2 mouse.
const AUX_ID: u8 = 0x00;
/// Stream mode, reporting disabled, scaling 1:1, no buttons; 4 counts/mm; 100 samples/s.
const AUX_STATUS: [u8; 3] = [0x00, 0x02, 0x64];

/// What the next byte written to port 0x60 is for, after a controller command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// 0x60: the new CTR.
    Ctr,
    /// 0xD1: the new output port.
    OutputPort,
    /// 0xD2: a byte to hand back as if the keyboard sent it.
    KbdObuf,
    /// 0xD3: a byte to hand back as if the mouse sent it.
    AuxObuf,
    /// 0xD4: a byte for the mouse.
    Aux,
}

/// The i8042 PS/2 controller with a keyboard and a mouse that answer but never type or move.
///
/// Register it at port 0x60 (data) and port 0x64 (status/command), one port each; `base` tells
/// them apart. Bytes for the guest wait in a queue of at most 16 (more are dropped); the head is
/// the output buffer, and each byte that reaches it raises IRQ 1 (`kbd_irq`) or IRQ 12
/// (`aux_irq`) as an edge if the CTR enables that interrupt (also when the CTR enables it while
/// such a byte waits). Reading port 0x60 with nothing queued returns the last byte read.
///
/// Controller commands: read/write CTR (0x20/0x60), disable/enable the ports (0xA7/0xA8,
/// 0xAD/0xAE: CTR bits only), the self-test (0xAA → 0x55, sets the system flag, which is CTR
/// bit 2) and port tests (0xA9/0xAB → 0x00), read/write the output port (0xD0/0xD1), write the
/// keyboard/mouse output buffer (0xD2/0xD3, which Linux uses as an AUX loopback test), write to
/// the mouse (0xD4) and pulse the output lines (0xF0–0xFF). The CPU reset line, pulsed (0xFE)
/// or cleared in the output port, asks the VM to reset ([`VmRequest::Reset`]) and puts the
/// controller back to its power-on state. Other commands are ignored; a command cancels one
/// still waiting for its data byte.
///
/// The keyboard acknowledges every byte (0xFA) and answers reset (0xAA), identify (0xAB 0x83)
/// and echo; the mouse acknowledges every byte and answers reset (0xAA 0x00), identify (0x00)
/// and status request (0x00 0x02 0x64). Argument bytes of commands that take one are only
/// acknowledged.
///
/// Not emulated: key presses and mouse movement, scancode translation, the A20 gate (always
/// on; output port bit 1 always reads 1), controller RAM beyond the CTR, keyboard/mouse settings
/// (LEDs, rates, scancode sets, resolution, wrap mode), the resend protocol, and inhibiting a
/// port in the CTR (bytes still arrive). Accesses wider than a byte use the first byte; the rest
/// reads 0xff.
#[derive(Debug)]
pub struct I8042 {
    kbd_irq: Arc<dyn Irq>,
    aux_irq: Arc<dyn Irq>,
    vm: Arc<dyn VmControl>,
    ctr: u8,
    output_port: u8,
    /// Bytes for the guest and whether they came from the aux port; the head is the output
    /// buffer.
    queue: VecDeque<(u8, bool)>,
    /// The byte port 0x60 returns when the queue is empty.
    last_read: u8,
    /// Whether the last write was to the command port (status bit 3).
    last_write_command: bool,
    pending: Option<Pending>,
    /// The keyboard waits for a command's argument byte.
    kbd_wants_arg: bool,
    /// The mouse waits for a command's argument byte.
    aux_wants_arg: bool,
}

impl I8042 {
    /// A controller raising `kbd_irq` (IRQ 1) and `aux_irq` (IRQ 12), and sending reset
    /// requests to `vm`.
    pub fn new(kbd_irq: Arc<dyn Irq>, aux_irq: Arc<dyn Irq>, vm: Arc<dyn VmControl>) -> I8042 {
        I8042 {
            kbd_irq,
            aux_irq,
            vm,
            ctr: CTR_DEFAULT,
            output_port: OUT_NO_RESET | OUT_A20,
            queue: VecDeque::with_capacity(QUEUE_LEN),
            last_read: 0,
            last_write_command: false,
            pending: None,
            kbd_wants_arg: false,
            aux_wants_arg: false,
        }
    }

    /// Back to the power-on state (the interrupts and the VM stay).
    fn power_on(&mut self) {
        self.ctr = CTR_DEFAULT;
        self.output_port = OUT_NO_RESET | OUT_A20;
        self.queue.clear();
        self.last_read = 0;
        self.last_write_command = false;
        self.pending = None;
        self.kbd_wants_arg = false;
        self.aux_wants_arg = false;
    }

    fn reset_vm(&mut self) {
        self.vm.request(VmRequest::Reset);
        self.power_on();
    }

    fn status(&self) -> u8 {
        let mut status = ST_NOT_INHIBITED;
        if self.ctr & CTR_SYS != 0 {
            status |= ST_SYS;
        }
        if let Some(&(_, aux)) = self.queue.front() {
            status |= ST_OBF;
            if aux {
                status |= ST_AUX;
            }
        }
        if self.last_write_command {
            status |= ST_CMD;
        }
        status
    }

    /// Whether `ctr` enables the interrupt for a byte from the aux (or keyboard) port.
    fn int_enabled(ctr: u8, aux: bool) -> bool {
        let bit = if aux { CTR_AUX_INT } else { CTR_KBD_INT };
        ctr & bit != 0
    }

    /// Raises the interrupt for the byte in the output buffer, if there is one and it is enabled.
    fn notify(&self) {
        if let Some(&(_, aux)) = self.queue.front()
            && Self::int_enabled(self.ctr, aux)
        {
            if aux {
                self.aux_irq.trigger();
            } else {
                self.kbd_irq.trigger();
            }
        }
    }

    fn push(&mut self, byte: u8, aux: bool) {
        if self.queue.len() >= QUEUE_LEN {
            return;
        }
        self.queue.push_back((byte, aux));
        if self.queue.len() == 1 {
            self.notify();
        }
    }

    fn push_kbd(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.push(b, false);
        }
    }

    fn push_aux(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.push(b, true);
        }
    }

    fn read_data(&mut self) -> u8 {
        if let Some((byte, _)) = self.queue.pop_front() {
            self.last_read = byte;
            self.notify();
        }
        self.last_read
    }

    fn write_ctr(&mut self, ctr: u8) {
        let old = self.ctr;
        self.ctr = ctr;
        if let Some(&(_, aux)) = self.queue.front()
            && !Self::int_enabled(old, aux)
            && Self::int_enabled(ctr, aux)
        {
            self.notify();
        }
    }

    fn write_command(&mut self, cmd: u8) {
        self.pending = None;
        match cmd {
            CMD_READ_CTR => self.push_kbd(&[self.ctr]),
            CMD_WRITE_CTR => self.pending = Some(Pending::Ctr),
            CMD_AUX_DISABLE => self.write_ctr(self.ctr | CTR_AUX_DISABLE),
            CMD_AUX_ENABLE => self.write_ctr(self.ctr & !CTR_AUX_DISABLE),
            CMD_AUX_TEST | CMD_KBD_TEST => self.push_kbd(&[PORT_TEST_OK]),
            CMD_SELF_TEST => {
                self.write_ctr(self.ctr | CTR_SYS);
                self.push_kbd(&[SELF_TEST_OK]);
            }
            CMD_KBD_DISABLE => self.write_ctr(self.ctr | CTR_KBD_DISABLE),
            CMD_KBD_ENABLE => self.write_ctr(self.ctr & !CTR_KBD_DISABLE),
            CMD_READ_OUTPUT => self.push_kbd(&[self.output_port | OUT_NO_RESET | OUT_A20]),
            CMD_WRITE_OUTPUT => self.pending = Some(Pending::OutputPort),
            CMD_WRITE_KBD_OBUF => self.pending = Some(Pending::KbdObuf),
            CMD_WRITE_AUX_OBUF => self.pending = Some(Pending::AuxObuf),
            CMD_WRITE_AUX => self.pending = Some(Pending::Aux),
            // Pulse the output lines whose bits are 0; bit 0 is the reset line.
            CMD_PULSE_FIRST..=0xff if cmd & OUT_NO_RESET == 0 => self.reset_vm(),
            _ => {}
        }
    }

    fn write_data(&mut self, byte: u8) {
        match self.pending.take() {
            Some(Pending::Ctr) => self.write_ctr(byte),
            Some(Pending::OutputPort) => {
                self.output_port = byte;
                if byte & OUT_NO_RESET == 0 {
                    self.reset_vm();
                }
            }
            Some(Pending::KbdObuf) => self.push_kbd(&[byte]),
            Some(Pending::AuxObuf) => self.push_aux(&[byte]),
            Some(Pending::Aux) => self.write_aux(byte),
            None => self.write_kbd(byte),
        }
    }

    /// A byte for the keyboard.
    fn write_kbd(&mut self, byte: u8) {
        if std::mem::take(&mut self.kbd_wants_arg) {
            self.push_kbd(&[DEV_ACK]);
            return;
        }
        match byte {
            DEV_RESET => self.push_kbd(&[DEV_ACK, DEV_SELF_TEST_OK]),
            DEV_GET_ID => self.push_kbd(&[DEV_ACK, KBD_ID[0], KBD_ID[1]]),
            KBD_ECHO => self.push_kbd(&[KBD_ECHO]),
            KBD_SET_LEDS | KBD_SET_TYPEMATIC | KBD_SCANCODE_SET => {
                self.kbd_wants_arg = true;
                self.push_kbd(&[DEV_ACK]);
            }
            _ => self.push_kbd(&[DEV_ACK]),
        }
    }

    /// A byte for the mouse.
    fn write_aux(&mut self, byte: u8) {
        if std::mem::take(&mut self.aux_wants_arg) {
            self.push_aux(&[DEV_ACK]);
            return;
        }
        match byte {
            DEV_RESET => self.push_aux(&[DEV_ACK, DEV_SELF_TEST_OK, AUX_ID]),
            DEV_GET_ID => self.push_aux(&[DEV_ACK, AUX_ID]),
            AUX_STATUS_REQUEST => {
                self.push_aux(&[DEV_ACK]);
                self.push_aux(&AUX_STATUS);
            }
            AUX_SET_RESOLUTION | AUX_SET_SAMPLE_RATE => {
                self.aux_wants_arg = true;
                self.push_aux(&[DEV_ACK]);
            }
            _ => self.push_aux(&[DEV_ACK]),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let Some((first, rest)) = data.split_first_mut() else {
            return;
        };
        rest.fill(0xff);
        *first = match (base, offset) {
            (DATA_PORT, 0) => self.read_data(),
            (COMMAND_PORT, 0) => self.status(),
            _ => 0xff,
        };
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else {
            return;
        };
        match (base, offset) {
            (DATA_PORT, 0) => {
                self.last_write_command = false;
                self.write_data(byte);
            }
            (COMMAND_PORT, 0) => {
                self.last_write_command = true;
                self.write_command(byte);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
