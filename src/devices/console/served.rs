//! `vmm device console --socket S [--io stdio|none|file=PATH|socket=PATH]`: virtio-console
//! (port 0, hvc0 in a Linux guest) as a vhost-user backend.
//!
//! Output and input go through the same host ends as the in-VMM console (`char_io`), and the
//! queues are served by `devices::console::{transmit, receive}`. Input waits in a bounded FIFO
//! ([`ConsoleInput`]) whose eventfd is an extra event source of the daemon's loop.

use std::io::Read;
use std::os::fd::AsRawFd;

use std::sync::Arc;

use crate::sync::{Mutex, Rank};
use virtio_queue::QueueT;

use super::{
    ConsoleInput, DEFAULT_SIZE, INPUT_LIMIT, RX_QUEUE, TX_QUEUE, VIRTIO_CONSOLE_F_SIZE,
    config_bytes, receive, terminal_size, transmit,
};
use crate::hw::char_io::{self, CharIo, CharOut, SocketGuard};
use crate::hw::served::{Ctx, Listeners, ServeError, Served, signal};
use crate::hw::virtio::{BUDGET, VIRTIO_F_VERSION_1, ring_broken};

/// Event number of the input FIFO's eventfd (above the two queues and the exit event).
const INPUT_EVENT: u16 = 3;

/// The served console.
#[derive(Debug)]
pub struct ConsoleModel {
    out: Mutex<CharOut>,
    input: Arc<ConsoleInput>,
    size: (u16, u16),
    _socket: Option<SocketGuard>,
}

impl ConsoleModel {
    /// Opens the host end `io` (relative paths against the working directory).
    pub fn open(io: &CharIo) -> Result<ConsoleModel, ServeError> {
        let input = Arc::new(
            ConsoleInput::new(INPUT_LIMIT)
                .map_err(|e| ServeError::Device(format!("eventfd: {e}")))?,
        );
        let cwd = std::env::current_dir()
            .map_err(|e| ServeError::Device(format!("working directory: {e}")))?;
        // No vCPU waits on this writer, and no loop here would drain a buffer.
        char_io::use_blocking_stdout();
        let (out, guard) = char_io::open(io, &cwd, input.clone())
            .map_err(|e| ServeError::Device(e.to_string()))?;
        let size = if *io == CharIo::Stdio {
            let i = input.clone();
            std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || {
                    let mut buf = [0u8; 1024];
                    let mut stdin = std::io::stdin().lock();
                    while let Ok(n) = stdin.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        char_io::feed(&*i, &buf[..n]);
                    }
                })
                .map_err(|e| ServeError::Device(format!("cannot start the input thread: {e}")))?;
            terminal_size().unwrap_or(DEFAULT_SIZE)
        } else {
            DEFAULT_SIZE
        };
        Ok(ConsoleModel {
            out: Mutex::new(Rank::DeviceState, out),
            input,
            size,
            _socket: guard,
        })
    }
}

impl Served for ConsoleModel {
    fn virtio(&self) -> &'static crate::contract::VirtioInfo {
        &super::VIRTIO
    }
    fn features(&self) -> u64 {
        // No EMERG_WRITE: the front end owns the configuration space writes.
        VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_SIZE
    }
    fn config(&self) -> Vec<u8> {
        config_bytes(self.size.0, self.size.1).to_vec()
    }
    fn start(&self, l: &dyn Listeners) -> Result<(), ServeError> {
        l.add(self.input.wake().as_raw_fd(), INPUT_EVENT)
            .map_err(|e| ServeError::Daemon(format!("cannot wait for input: {e}")))
    }
    fn handle(&self, event: u16, cx: &Ctx<'_>) -> std::io::Result<()> {
        match event {
            e if usize::from(e) == TX_QUEUE => {
                let Some(mut v) = cx.vring(TX_QUEUE) else {
                    return Ok(());
                };
                let mut out = self.out.lock();
                loop {
                    let _ = v.disable_notification();
                    let before = v.get_queue().next_avail();
                    let used = transmit(v.get_queue_mut(), cx.mem, &mut *out, BUDGET) > 0;
                    if used {
                        signal(&mut v)?;
                    }
                    if ring_broken(v.get_queue(), cx.mem) {
                        log::warn!("vhost-user console: the front end broke the transmit queue");
                        return Ok(());
                    }
                    if !matches!(v.enable_notification(), Ok(true)) {
                        return Ok(());
                    }
                    if v.get_queue().next_avail() == before {
                        // More is announced, yet nothing could be taken (a bad head): wait
                        // for the next kick instead of spinning (found by fuzz/vhost_user).
                        return Ok(());
                    }
                }
            }
            e if usize::from(e) == RX_QUEUE || e == INPUT_EVENT => {
                let _ = self.input.wake().read();
                let Some(mut v) = cx.vring(RX_QUEUE) else {
                    return Ok(());
                };
                if !v.get_queue().ready() || !v.is_enabled() {
                    return Ok(()); // input waits in the FIFO until the driver is ready
                }
                loop {
                    let _ = v.disable_notification();
                    let before = v.get_queue().next_avail();
                    let used = receive(v.get_queue_mut(), cx.mem, &mut self.input.pending());
                    if used {
                        signal(&mut v)?;
                    }
                    if ring_broken(v.get_queue(), cx.mem) {
                        log::warn!("vhost-user console: the front end broke the receive queue");
                        return Ok(());
                    }
                    if self.input.pending().is_empty()
                        || !matches!(v.enable_notification(), Ok(true))
                        || v.get_queue().next_avail() == before
                    {
                        return Ok(());
                    }
                }
            }
            _ => Ok(()),
        }
    }
}
