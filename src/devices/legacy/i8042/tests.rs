use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

#[derive(Debug, Default)]
struct CountingIrq(AtomicUsize);

impl Irq for CountingIrq {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Default)]
struct RecordingVm(Mutex<Vec<VmRequest>>);

impl VmControl for RecordingVm {
    fn request(&self, r: VmRequest) {
        self.0.lock().unwrap().push(r);
    }
}

struct Fixture {
    dev: I8042,
    kbd: Arc<CountingIrq>,
    aux: Arc<CountingIrq>,
    vm: Arc<RecordingVm>,
}

impl Fixture {
    fn new() -> Fixture {
        let kbd = Arc::new(CountingIrq::default());
        let aux = Arc::new(CountingIrq::default());
        let vm = Arc::new(RecordingVm::default());
        let dev = I8042::new(kbd.clone(), aux.clone(), vm.clone());
        Fixture { dev, kbd, aux, vm }
    }
    fn cmd(&mut self, c: u8) {
        self.dev.write(COMMAND_PORT, 0, &[c]);
    }
    fn data(&mut self, d: u8) {
        self.dev.write(DATA_PORT, 0, &[d]);
    }
    fn status(&mut self) -> u8 {
        let mut b = [0u8];
        self.dev.read(COMMAND_PORT, 0, &mut b);
        b[0]
    }
    fn read(&mut self) -> u8 {
        let mut b = [0u8];
        self.dev.read(DATA_PORT, 0, &mut b);
        b[0]
    }
    /// Reads while OBF is set, as Linux's i8042_flush does: (byte, from aux).
    fn drain(&mut self) -> Vec<(u8, bool)> {
        let mut out = Vec::new();
        for _ in 0..100 {
            let st = self.status();
            if st & ST_OBF == 0 {
                break;
            }
            out.push((self.read(), st & ST_AUX != 0));
        }
        out
    }
    /// A command that answers with one byte.
    fn query(&mut self, c: u8) -> u8 {
        self.cmd(c);
        assert_ne!(self.status() & ST_OBF, 0, "command {c:#x} answered nothing");
        self.read()
    }
    fn kbd_irqs(&self) -> usize {
        self.kbd.0.load(Ordering::SeqCst)
    }
    fn aux_irqs(&self) -> usize {
        self.aux.0.load(Ordering::SeqCst)
    }
    fn resets(&self) -> usize {
        self.vm.0.lock().unwrap().len()
    }
}

fn kbd(bytes: &[u8]) -> Vec<(u8, bool)> {
    bytes.iter().map(|&b| (b, false)).collect()
}

fn aux(bytes: &[u8]) -> Vec<(u8, bool)> {
    bytes.iter().map(|&b| (b, true)).collect()
}

#[test]
fn linux_probe_sequence() {
    let mut f = Fixture::new();
    // Leftovers from firmware, then the flush.
    f.cmd(CMD_WRITE_KBD_OBUF);
    f.data(0x1c);
    f.cmd(CMD_WRITE_AUX_OBUF);
    f.data(0x08);
    assert_eq!(f.drain(), vec![(0x1c, false), (0x08, true)]);
    assert_eq!(f.status() & ST_OBF, 0);
    // Self-test.
    assert_eq!(f.query(CMD_SELF_TEST), 0x55);
    assert_ne!(f.status() & ST_SYS, 0);
    // Read the CTR, turn interrupts off, write it back.
    let ctr = f.query(CMD_READ_CTR);
    assert_eq!(ctr, CTR_DEFAULT);
    let new = (ctr & !(CTR_KBD_INT | CTR_AUX_INT)) | CTR_KBD_DISABLE;
    f.cmd(CMD_WRITE_CTR);
    f.data(new);
    assert_eq!(f.query(CMD_READ_CTR), new);
    // AUX: loopback, disable/enable reflected in the CTR, port tests.
    f.cmd(CMD_WRITE_AUX_OBUF);
    f.data(0x5a);
    assert_eq!(f.drain(), aux(&[0x5a]));
    f.cmd(CMD_AUX_DISABLE);
    assert_ne!(f.query(CMD_READ_CTR) & CTR_AUX_DISABLE, 0);
    f.cmd(CMD_AUX_ENABLE);
    assert_eq!(f.query(CMD_READ_CTR) & CTR_AUX_DISABLE, 0);
    assert_eq!(f.query(CMD_AUX_TEST), 0x00);
    assert_eq!(f.query(CMD_KBD_TEST), 0x00);
    f.cmd(CMD_KBD_ENABLE);
    assert_eq!(f.query(CMD_READ_CTR) & CTR_KBD_DISABLE, 0);
    f.cmd(CMD_KBD_DISABLE);
    assert_ne!(f.query(CMD_READ_CTR) & CTR_KBD_DISABLE, 0);
    assert_eq!(f.drain(), vec![]);
    assert_eq!(f.resets(), 0);
}

#[test]
fn ctr_round_trip() {
    let mut f = Fixture::new();
    for v in 0..=255u8 {
        f.cmd(CMD_WRITE_CTR);
        f.data(v);
        assert_eq!(f.query(CMD_READ_CTR), v);
        assert_eq!(f.status() & ST_SYS, v & CTR_SYS);
    }
    // A command cancels one waiting for its data: this byte goes to the keyboard.
    f.cmd(CMD_WRITE_CTR);
    f.cmd(CMD_KBD_ENABLE);
    f.data(0x00);
    assert_eq!(f.drain(), kbd(&[DEV_ACK]));
    assert_eq!(f.query(CMD_READ_CTR), !CTR_KBD_DISABLE);
}

#[test]
fn interrupts_follow_ctr() {
    let mut f = Fixture::new();
    f.cmd(CMD_WRITE_CTR);
    f.data(0);
    f.cmd(CMD_WRITE_KBD_OBUF);
    f.data(1);
    f.cmd(CMD_WRITE_AUX_OBUF);
    f.data(2);
    assert_eq!(f.drain().len(), 2);
    assert_eq!((f.kbd_irqs(), f.aux_irqs()), (0, 0));

    // Keyboard interrupt only.
    f.cmd(CMD_WRITE_CTR);
    f.data(CTR_KBD_INT);
    f.cmd(CMD_WRITE_KBD_OBUF);
    f.data(1);
    assert_eq!((f.kbd_irqs(), f.aux_irqs()), (1, 0));
    f.read();
    f.cmd(CMD_WRITE_AUX_OBUF);
    f.data(2);
    assert_eq!((f.kbd_irqs(), f.aux_irqs()), (1, 0));
    f.read();

    // Aux interrupt only.
    f.cmd(CMD_WRITE_CTR);
    f.data(CTR_AUX_INT);
    f.cmd(CMD_WRITE_AUX_OBUF);
    f.data(2);
    f.data(0xf4); // keyboard ACK queued behind it: no interrupt
    assert_eq!((f.kbd_irqs(), f.aux_irqs()), (1, 1));
    assert_eq!(f.drain(), vec![(2, true), (DEV_ACK, false)]);
    assert_eq!((f.kbd_irqs(), f.aux_irqs()), (1, 1));

    // Both: every byte reaching the output buffer raises its interrupt.
    f.cmd(CMD_WRITE_CTR);
    f.data(CTR_KBD_INT | CTR_AUX_INT);
    f.data(DEV_RESET); // FA AA
    f.cmd(CMD_WRITE_AUX);
    f.data(DEV_GET_ID); // FA 00
    assert_eq!((f.kbd_irqs(), f.aux_irqs()), (2, 1));
    assert_eq!(
        f.drain(),
        [kbd(&[DEV_ACK, 0xaa]), aux(&[DEV_ACK, 0x00])].concat()
    );
    assert_eq!((f.kbd_irqs(), f.aux_irqs()), (3, 3));

    // Enabling the interrupt while a byte waits raises it.
    f.cmd(CMD_WRITE_CTR);
    f.data(0);
    f.data(0xf4);
    assert_eq!(f.kbd_irqs(), 3);
    f.cmd(CMD_WRITE_CTR);
    f.data(CTR_KBD_INT);
    assert_eq!(f.kbd_irqs(), 4);
    assert_eq!(f.drain(), kbd(&[DEV_ACK]));
}

#[test]
fn pulse_reset_line() {
    let mut f = Fixture::new();
    f.cmd(0xff); // pulses nothing
    assert_eq!(f.resets(), 0);
    f.cmd(0xfe);
    assert_eq!(*f.vm.0.lock().unwrap(), vec![VmRequest::Reset]);
    // The controller is back at power-on.
    assert_eq!(f.query(CMD_READ_CTR), CTR_DEFAULT);
    assert_eq!(f.resets(), 1);
}

#[test]
fn output_port_reset_line() {
    let mut f = Fixture::new();
    assert_eq!(f.query(CMD_READ_OUTPUT) & 0x03, 0x03);
    f.cmd(CMD_WRITE_OUTPUT);
    f.data(0x03);
    assert_eq!(f.resets(), 0);
    f.cmd(CMD_WRITE_OUTPUT);
    f.data(0x01); // A20 off: ignored
    assert_eq!(f.query(CMD_READ_OUTPUT) & 0x03, 0x03);
    assert_eq!(f.resets(), 0);
    f.cmd(CMD_WRITE_OUTPUT);
    f.data(0xfe);
    assert_eq!(*f.vm.0.lock().unwrap(), vec![VmRequest::Reset]);
}

#[test]
fn keyboard_answers() {
    let mut f = Fixture::new();
    f.data(DEV_RESET);
    assert_eq!(f.drain(), kbd(&[0xfa, 0xaa]));
    f.data(DEV_GET_ID);
    assert_eq!(f.drain(), kbd(&[0xfa, 0xab, 0x83]));
    f.data(KBD_ECHO);
    assert_eq!(f.drain(), kbd(&[0xee]));
    // Commands with an argument: both bytes ACKed, even an argument that looks like reset.
    for (c, arg) in [
        (KBD_SET_LEDS, 0x07),
        (KBD_SET_TYPEMATIC, 0xff),
        (KBD_SCANCODE_SET, 2),
    ] {
        f.data(c);
        f.data(arg);
        assert_eq!(f.drain(), kbd(&[0xfa, 0xfa]));
    }
    f.data(0xf4);
    assert_eq!(f.drain(), kbd(&[0xfa]));
}

#[test]
fn mouse_answers() {
    let mut f = Fixture::new();
    let mut to_aux = |b: u8| {
        f.cmd(CMD_WRITE_AUX);
        f.data(b);
        f.drain()
    };
    assert_eq!(to_aux(DEV_RESET), aux(&[0xfa, 0xaa, 0x00]));
    assert_eq!(to_aux(DEV_GET_ID), aux(&[0xfa, 0x00]));
    assert_eq!(to_aux(AUX_STATUS_REQUEST), aux(&[0xfa, 0x00, 0x02, 0x64]));
    assert_eq!(to_aux(AUX_SET_SAMPLE_RATE), aux(&[0xfa]));
    assert_eq!(to_aux(DEV_GET_ID), aux(&[0xfa])); // an argument, not identify
    assert_eq!(to_aux(0xf4), aux(&[0xfa]));
}

#[test]
fn status_bits() {
    let mut f = Fixture::new();
    assert_eq!(f.status(), ST_SYS | ST_NOT_INHIBITED);
    f.cmd(CMD_KBD_ENABLE);
    assert_eq!(f.status(), ST_SYS | ST_NOT_INHIBITED | ST_CMD);
    f.cmd(CMD_WRITE_AUX_OBUF);
    f.data(0x42);
    assert_eq!(f.status(), ST_SYS | ST_NOT_INHIBITED | ST_OBF | ST_AUX);
    f.cmd(CMD_WRITE_KBD_OBUF);
    assert_eq!(
        f.status(),
        ST_SYS | ST_NOT_INHIBITED | ST_OBF | ST_AUX | ST_CMD
    );
    f.data(0x43);
    assert_eq!(f.read(), 0x42);
    assert_eq!(f.status(), ST_SYS | ST_NOT_INHIBITED | ST_OBF);
    assert_eq!(f.read(), 0x43);
    assert_eq!(f.status() & (ST_OBF | ST_AUX), 0);
    // An empty output buffer reads as the last byte.
    assert_eq!(f.read(), 0x43);
    assert_eq!(f.read(), 0x43);
}

#[test]
fn queue_is_bounded() {
    let mut f = Fixture::new();
    for _ in 0..1000 {
        f.data(DEV_GET_ID);
    }
    assert_eq!(f.dev.queue.len(), QUEUE_LEN);
    for i in 0..1000 {
        f.cmd(CMD_WRITE_AUX_OBUF);
        f.data(i as u8);
    }
    assert_eq!(f.dev.queue.len(), QUEUE_LEN);
    assert_eq!(f.drain().len(), QUEUE_LEN);
    assert_eq!(f.status() & ST_OBF, 0);
}

#[test]
fn hostile_sweep_does_not_panic() {
    let mut f = Fixture::new();
    for first in 0..=255u8 {
        for second in 0..=255u8 {
            f.cmd(first);
            f.data(second);
            f.data(second);
            if second % 64 == 0 {
                f.drain();
            }
        }
        for port in [DATA_PORT, COMMAND_PORT, 0x61, 0x65, 0] {
            for size in [0usize, 1, 2, 4, 8] {
                for offset in [0, 1, 7, u64::MAX] {
                    let mut buf = [0u8; 8];
                    f.dev.write(port, offset, &[first; 8][..size]);
                    f.dev.read(port, offset, &mut buf[..size]);
                    if size > 1 {
                        assert!(buf[1..size].iter().all(|&b| b == 0xff));
                    }
                }
            }
        }
        assert!(f.dev.queue.len() <= QUEUE_LEN);
    }
    // The sweep pulled the reset line (0xF0–0xFE with bit 0 clear, 0xD1 with bit 0 clear).
    assert!(f.resets() > 0);
}
