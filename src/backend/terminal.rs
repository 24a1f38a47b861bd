//! The terminal `vmm up` runs in: raw mode while a device owns stdin, restored on every way out,
//! and the console escape (Ctrl-A x stops the VM, Ctrl-A Ctrl-A sends one Ctrl-A).

/// Puts a terminal in raw mode; restores the saved settings when dropped.
#[derive(Debug)]
pub struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Raw mode on `fd` if it is a terminal, else `None`.
    pub fn enter(fd: i32) -> Option<RawMode> {
        // SAFETY: isatty/tcgetattr/tcsetattr get a valid fd and a termios we own.
        unsafe {
            if libc::isatty(fd) != 1 {
                return None;
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            // Keep output post-processing so vmm's own messages still start at column 0.
            raw.c_oflag |= libc::OPOST | libc::ONLCR;
            if libc::tcsetattr(fd, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            crate::sandbox::crash_restores_terminal(Some((fd, saved)));
            Some(RawMode { fd, saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        crate::sandbox::crash_restores_terminal(None);
        // SAFETY: restores settings saved from the same fd.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
        }
    }
}

pub const ESCAPE: u8 = 0x01; // Ctrl-A

/// What a chunk of keyboard input means.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Keys {
    /// Bytes for the guest.
    pub to_guest: Vec<u8>,
    /// Ctrl-A x was typed.
    pub stop: bool,
}

/// Decodes the console escape across reads.
#[derive(Debug, Default)]
pub struct EscapeDecoder {
    pending: bool,
}

impl EscapeDecoder {
    pub fn feed(&mut self, input: &[u8]) -> Keys {
        let mut k = Keys::default();
        for &b in input {
            if self.pending {
                self.pending = false;
                match b {
                    b'x' | b'X' => {
                        k.stop = true;
                        return k;
                    }
                    ESCAPE => k.to_guest.push(ESCAPE),
                    other => k.to_guest.extend([ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.pending = true;
            } else {
                k.to_guest.push(b);
            }
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut d = EscapeDecoder::default();
        assert_eq!(d.feed(b"ls\r").to_guest, b"ls\r");
        assert_eq!(d.feed(&[ESCAPE, ESCAPE]).to_guest, vec![ESCAPE]);
        assert_eq!(d.feed(&[ESCAPE, b'c']).to_guest, vec![ESCAPE, b'c']);
        // Split across reads.
        assert!(d.feed(&[ESCAPE]).to_guest.is_empty());
        let k = d.feed(b"x");
        assert!(k.stop);
        let k = d.feed(&[b'a', ESCAPE, b'x', b'b']);
        assert_eq!(k.to_guest, b"a");
        assert!(k.stop);
    }
}
