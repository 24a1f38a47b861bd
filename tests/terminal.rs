//! `vmm up` on a real terminal (a pty): raw mode while the guest owns the console, the console
//! escape (Ctrl-A x), and the terminal restored on every way out.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::vm::{Machine, kvm_or_skip, tiny};

const SERIAL: &str =
    "name = \"t\"\nmemory = \"16M\"\nvcpus = 1\n[[serial]]\nname = \"com1\"\nio = \"stdio\"\n";

struct Pty {
    master: std::fs::File,
    slave: OwnedFd,
}

fn pty() -> Pty {
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty fills two fds we then own.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty");
    // SAFETY: fresh fds from openpty, owned once.
    unsafe {
        Pty {
            master: std::fs::File::from_raw_fd(m),
            slave: OwnedFd::from_raw_fd(s),
        }
    }
}

fn termios(fd: i32) -> Vec<u8> {
    // SAFETY: tcgetattr into a termios we own; compared as bytes.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(fd, &mut t), 0);
        std::slice::from_raw_parts(
            (&t as *const libc::termios).cast::<u8>(),
            size_of::<libc::termios>(),
        )
        .to_vec()
    }
}

fn lflag(fd: i32) -> libc::tcflag_t {
    // SAFETY: as above.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        libc::tcgetattr(fd, &mut t);
        t.c_lflag
    }
}

/// Runs `guest` with the console on a pty; `act` gets the master once `wait_for` appeared.
/// Returns (exit code, everything the terminal showed).
/// With `raw`, also checks that the terminal is in raw mode while the guest runs (only for
/// guests that keep running until `act`).
fn on_pty(
    guest: &str,
    wait_for: &str,
    raw: bool,
    act: impl FnOnce(&mut std::fs::File, u32),
) -> (Option<i32>, String, Vec<u8>, Vec<u8>) {
    let p = pty();
    let m = Machine::new(&tiny(guest), SERIAL);
    let before = termios(p.slave.as_raw_fd());
    let dup = |f: &OwnedFd| Stdio::from(f.try_clone().unwrap());
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("up")
        .arg(&m.file)
        .env("VMM_RUNTIME_DIR", m.dir.path())
        .stdin(dup(&p.slave))
        .stdout(dup(&p.slave))
        .stderr(dup(&p.slave))
        .spawn()
        .unwrap();
    let mut master = p.master;
    // SAFETY: fcntl on our own fd.
    unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut acted = Some(act);
    let code = loop {
        let mut buf = [0u8; 1024];
        if let Ok(n) = master.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
        if acted.is_some() && String::from_utf8_lossy(&seen).contains(wait_for) {
            // Raw mode is on while the guest runs: no echo, no canonical input, no signals.
            if raw {
                let l = lflag(p.slave.as_raw_fd());
                assert_eq!(
                    l & (libc::ECHO | libc::ICANON | libc::ISIG),
                    0,
                    "terminal not in raw mode"
                );
            }
            (acted.take().unwrap())(&mut master, child.id());
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vmm did not exit: {}", String::from_utf8_lossy(&seen));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut buf = [0u8; 4096];
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let after = termios(p.slave.as_raw_fd());
    (
        code,
        String::from_utf8_lossy(&seen).into_owned(),
        before,
        after,
    )
}

#[test]
fn ctrl_a_x_stops_the_vm_and_restores_the_terminal() {
    if !kvm_or_skip("ctrl_a_x_stops_the_vm_and_restores_the_terminal") {
        return;
    }
    let (code, out, before, after) = on_pty("spin", "SPINNING", true, |m, _| {
        m.write_all(b"\x01x").unwrap()
    });
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("stopped by console escape (Ctrl-A x)"),
        "{out}"
    );
    assert_eq!(before, after, "terminal settings not restored");
}

#[test]
fn ctrl_c_goes_to_the_guest_not_to_vmm() {
    if !kvm_or_skip("ctrl_c_goes_to_the_guest_not_to_vmm") {
        return;
    }
    // The echo guest gets ^C (0x03) as a byte and echoes it; then q ends it.
    let (code, out, before, after) = on_pty("echo", "ECHO-READY", true, |m, _| {
        m.write_all(b"a\x03bq").unwrap()
    });
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("a\x03bq"), "{out:?}");
    assert_eq!(before, after);
}

#[test]
fn failures_and_signals_restore_the_terminal_too() {
    if !kvm_or_skip("failures_and_signals_restore_the_terminal_too") {
        return;
    }
    let (code, out, before, after) = on_pty("bad-fetch", "JUMPING", false, |_, _| {});
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(before, after, "after a failure");
    let (code, out, before, after) = on_pty("spin", "SPINNING", true, |_, pid| {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    });
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(before, after, "after SIGTERM");
}
