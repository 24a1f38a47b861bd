//! The caller's thread while the VM runs: it waits for the outcome, turns SIGINT, SIGTERM and
//! SIGHUP into a stop, hands terminal input to the guest console (Ctrl-A x stops the VM) and
//! writes the guest output stdout did not take at once (never on a vCPU's time).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use super::vcpu::{ExitState, Outcome};
use crate::backend::terminal::EscapeDecoder;
use crate::hw::char_io::{self, CharInput, Stdout};

/// Waits for the outcome while serving signals and terminal input.
pub(super) fn wait(
    exit: &ExitState,
    sigfd: &SignalFd,
    stdin: Option<&dyn CharInput>,
    inputs: &[Arc<dyn CharInput>],
    tty: bool,
) {
    let mut l = MainLoop {
        exit,
        sigfd,
        stdin,
        inputs,
        tty,
        decoder: EscapeDecoder::default(),
        pending: Vec::new(),
        stdin_open: stdin.is_some(),
        next_look: Instant::now() + char_io::UNSTICK_PERIOD,
        out: char_io::stdout_in_use(),
        crash: None,
    };
    // Another thread that crashes (a refused system call, a panic) wakes this one to remove
    // the sockets: only this thread's filter allows it.
    let crash = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).ok();
    if let Some(c) = &crash {
        crate::sandbox::main_loop_wakes_on(c.as_raw_fd());
    }
    l.crash = crash.as_ref().map(|c| c.as_raw_fd());
    // From here on this thread handles guest output and input: filtered.
    if let Err(e) = crate::sandbox::enter(&crate::sandbox::MAIN) {
        exit.finish(Outcome::Failed(e.to_string()));
    }
    while exit.outcome().is_none() {
        l.feed_guest();
        l.unstick_when_due();
        if let Some(stop) = l.poll_once() {
            exit.finish(stop);
            break;
        }
    }
    crate::sandbox::main_loop_ended();
}

struct MainLoop<'a> {
    exit: &'a ExitState,
    sigfd: &'a SignalFd,
    stdin: Option<&'a dyn CharInput>,
    inputs: &'a [Arc<dyn CharInput>],
    /// Whether stdin is a terminal in raw mode (then the console escape is decoded).
    tty: bool,
    decoder: EscapeDecoder,
    /// Keys the guest has not taken yet; stdin is not read while there are any.
    pending: Vec<u8>,
    stdin_open: bool,
    /// When the character devices are next asked to `unstick`.
    next_look: Instant,
    out: Option<Arc<Stdout>>,
    /// The crash wake-up eventfd ([`crate::sandbox::main_loop_wakes_on`]).
    crash: Option<i32>,
}

fn pollfd(fd: i32, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

impl MainLoop<'_> {
    fn feed_guest(&mut self) {
        if let Some(input) = self.stdin
            && !self.pending.is_empty()
        {
            let n = input.push(&self.pending);
            self.pending.drain(..n);
        }
    }

    fn unstick_when_due(&mut self) {
        if Instant::now() >= self.next_look {
            for i in self.inputs {
                i.unstick();
            }
            self.next_look = Instant::now() + char_io::UNSTICK_PERIOD;
        }
    }

    /// One poll of the exit event, signals, stdout and stdin; what stops the VM, if anything.
    fn poll_once(&mut self) -> Option<Outcome> {
        let mut fds = vec![
            pollfd(self.exit.evt.as_raw_fd(), libc::POLLIN),
            pollfd(self.sigfd.fd, libc::POLLIN),
        ];
        if let Some(o) = &self.out {
            fds.push(pollfd(o.wake(), libc::POLLIN));
            // Polled only while output waits (a closed pipe would report POLLERR forever).
            let fd = if o.has_pending() { o.fd() } else { -1 };
            fds.push(pollfd(fd, libc::POLLOUT));
        }
        let crash_at = fds.len();
        fds.push(pollfd(self.crash.unwrap_or(-1), libc::POLLIN));
        let stdin_at = fds.len();
        let poll_stdin = self.stdin_open && self.pending.is_empty();
        if poll_stdin {
            fds.push(pollfd(libc::STDIN_FILENO, libc::POLLIN));
        }
        let until_look = self
            .next_look
            .saturating_duration_since(Instant::now())
            .as_millis() as i32;
        let timeout = if self.pending.is_empty() {
            until_look.max(1)
        } else {
            until_look.clamp(1, 10)
        };
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if r < 0 {
            return None; // EINTR
        }
        if fds[crash_at].revents & libc::POLLIN != 0 {
            crate::sandbox::crash_cleanup_and_exit();
        }
        if fds[1].revents & libc::POLLIN != 0
            && let Some(sig) = self.sigfd.read()
        {
            return Some(Outcome::Stopped(signal_name(sig).into()));
        }
        if let Some(o) = &self.out
            && (fds[2].revents != 0 || fds[3].revents != 0)
        {
            o.flush_some();
        }
        if poll_stdin && fds[stdin_at].revents & (libc::POLLIN | libc::POLLHUP) != 0 {
            return self.read_stdin();
        }
        None
    }

    fn read_stdin(&mut self) -> Option<Outcome> {
        let mut buf = [0u8; 4096];
        // SAFETY: reading into a buffer we own, of its length.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            self.stdin_open = false; // EOF or error: the guest just gets no more input
            return None;
        }
        let bytes = &buf[..n as usize];
        if !self.tty {
            self.pending.extend_from_slice(bytes);
            return None;
        }
        let keys = self.decoder.feed(bytes);
        self.pending.extend(keys.to_guest);
        keys.stop
            .then(|| Outcome::Stopped("console escape (Ctrl-A x)".into()))
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// SIGINT, SIGTERM and SIGHUP, blocked and read from a signalfd.
pub(super) struct SignalFd {
    fd: i32,
    old_mask: libc::sigset_t,
}

impl SignalFd {
    pub(super) fn new() -> std::io::Result<SignalFd> {
        // SAFETY: sigset operations on sets we own; pthread_sigmask on the calling thread;
        // signalfd returns a new fd we own (closed in Drop).
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
            }
            let mut old_mask: libc::sigset_t = std::mem::zeroed();
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old_mask) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(SignalFd { fd, old_mask })
        }
    }

    fn read(&self) -> Option<i32> {
        // SAFETY: reading one signalfd_siginfo into a struct we own.
        unsafe {
            let mut info: libc::signalfd_siginfo = std::mem::zeroed();
            let n = libc::read(
                self.fd,
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size_of::<libc::signalfd_siginfo>(),
            );
            (n == size_of::<libc::signalfd_siginfo>() as isize).then_some(info.ssi_signo as i32)
        }
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        // SAFETY: closing our fd and restoring this thread's previous mask.
        unsafe {
            libc::close(self.fd);
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut());
        }
    }
}
