//! Where a character device (serial port, virtio console) sends and gets its bytes.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::contract::check::DeviceCheck;
use crate::contract::units::FilePath;

/// The host end of a character device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CharIo {
    /// The terminal `vmm up` runs in: output to stdout, keystrokes from stdin. One device at most.
    Stdio,
    /// Not connected: output is discarded, there is no input.
    None,
    /// Output appended to this regular file, created private to its owner when missing.
    /// No input.
    File(FilePath),
    /// A unix socket vmm listens on; one client at a time reads output and writes input.
    Socket(FilePath),
}

impl CharIo {
    /// Validation shared by every character device: one user of the terminal, distinct files and
    /// sockets, and a parent directory that exists.
    pub fn check(&self, cx: &mut dyn DeviceCheck, field: &str) {
        match self {
            CharIo::Stdio => cx.claim(
                "the terminal",
                "(stdio)".into(),
                field,
                "connect the other device to a `file` or a `socket`",
            ),
            CharIo::None => {}
            CharIo::File(p) | CharIo::Socket(p) => {
                let sub = if matches!(self, CharIo::File(_)) {
                    "file"
                } else {
                    "socket"
                };
                let at = format!("{field}/{sub}");
                if let Some(abs) = cx.output_path(&at, p, sub == "socket") {
                    cx.claim("output path", abs.display().to_string(), &at, "");
                }
            }
        }
    }

    /// The same host end with a relative path made absolute against `base`.
    pub fn resolved(&self, base: &std::path::Path) -> CharIo {
        let abs = |p: &FilePath| FilePath(p.resolve(base).display().to_string());
        match self {
            CharIo::File(p) => CharIo::File(abs(p)),
            CharIo::Socket(p) => CharIo::Socket(abs(p)),
            other => other.clone(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            CharIo::Stdio => "stdio".into(),
            CharIo::None => "none".into(),
            CharIo::File(p) => format!("file:{p}"),
            CharIo::Socket(p) => format!("socket:{p}"),
        }
    }
}

// ---- The host end at run time -------------------------------------------------------------

use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sync::Mutex;

/// Where a device's input goes: vmm pushes bytes from stdin or a socket client. Returns how
/// many bytes the device took (a full FIFO takes fewer; the caller retries later).
pub trait CharInput: Send + Sync {
    fn push(&self, bytes: &[u8]) -> usize;
    /// A periodic look (every [`UNSTICK_PERIOD`] while the VM runs) for a device whose
    /// interrupt was lost: if it made no progress since the last look while the guest waits
    /// for it, the device raises its interrupt again. Interrupts are edges; one lost while the
    /// guest masked the line would otherwise stop the device for good (a real UART's level
    /// line stays asserted).
    fn unstick(&self) {}
}

/// How often the VM's main loop calls [`CharInput::unstick`].
pub const UNSTICK_PERIOD: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum CharIoError {
    #[error("Cannot open output file {path}: {source}")]
    File {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot listen on socket {path}: {source}")]
    Socket {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The connected client of a socket backend, if any, and the output it missed.
#[derive(Debug, Default)]
pub struct SocketPeer(Mutex<Option<UnixStream>>, Arc<AtomicU64>);

/// Where a character device's output goes. Writes never stall the guest: a terminal or pipe
/// on stdout that does not keep up gets its output through a bounded buffer ([`Stdout`]), a
/// socket client that does not keep up loses output; both count what they lost.
#[derive(Debug)]
pub enum CharOut {
    Stdout(Arc<Stdout>),
    Sink,
    File(std::fs::File),
    Socket(Arc<SocketPeer>),
}

impl CharOut {
    /// Bytes of output this end has dropped so far (none for files and the sink).
    pub fn dropped(&self) -> Option<Arc<AtomicU64>> {
        match self {
            CharOut::Stdout(s) => Some(s.dropped.clone()),
            CharOut::Socket(p) => Some(p.1.clone()),
            CharOut::Sink | CharOut::File(_) => None,
        }
    }
}

/// Most bytes of guest output waiting for a slow stdout; more are dropped (and counted).
pub const STDOUT_BUFFER: usize = 256 << 10;

/// How output reaches fd 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutMode {
    /// A regular file (or `vmm device`): plain writes, which do not wait for a reader.
    Direct,
    /// A terminal or pipe, through a non-blocking file description of its own.
    NonBlocking,
    /// A socket: send(2) with MSG_DONTWAIT.
    Socket,
}

/// vmm's standard output as the guest's console writes to it: never blocking the writer (a
/// vCPU or a device worker). What the terminal or pipe does not take at once waits in a
/// buffer of [`STDOUT_BUFFER`] bytes, which the VM's main loop writes out when fd 1 is
/// writable; what does not fit is dropped and counted (`vmm status`).
#[derive(Debug)]
pub struct Stdout {
    fd: std::os::fd::OwnedFd,
    mode: OutMode,
    pending: Mutex<std::collections::VecDeque<u8>>,
    dropped: Arc<AtomicU64>,
    /// Readable when output starts waiting (the main loop then polls fd 1 for writability).
    wake: vmm_sys_util::eventfd::EventFd,
}

static STDOUT: std::sync::OnceLock<Arc<Stdout>> = std::sync::OnceLock::new();
static STDOUT_BLOCKING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes [`stdout`] write directly (before its first use): for `vmm device`, where no vCPU
/// waits on the writer and no main loop would drain a buffer.
pub fn use_blocking_stdout() {
    STDOUT_BLOCKING.store(true, Ordering::SeqCst);
}

/// The process's [`Stdout`], set up on first use.
pub fn stdout() -> io::Result<Arc<Stdout>> {
    if let Some(s) = STDOUT.get() {
        return Ok(s.clone());
    }
    let s = Arc::new(Stdout::open()?);
    Ok(STDOUT.get_or_init(|| s).clone())
}

/// The process's [`Stdout`] if a device writes to it.
pub fn stdout_in_use() -> Option<Arc<Stdout>> {
    STDOUT.get().cloned()
}

impl Stdout {
    fn open() -> io::Result<Stdout> {
        use std::os::fd::{FromRawFd, OwnedFd};
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let dup = || -> io::Result<OwnedFd> {
            // SAFETY: dup of fd 1 gives a descriptor we own.
            let fd = unsafe { libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a new descriptor nobody else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        let meta = std::fs::metadata("/proc/self/fd/1")?;
        let ft = meta.file_type();
        let (fd, mode) = if STDOUT_BLOCKING.load(Ordering::SeqCst) || ft.is_file() {
            (dup()?, OutMode::Direct)
        } else if ft.is_socket() {
            (dup()?, OutMode::Socket)
        } else {
            // A file description of our own, so O_NONBLOCK does not change the terminal or pipe
            // for the shell that shares it.
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
                .open("/proc/self/fd/1")
            {
                Ok(f) => (OwnedFd::from(f), OutMode::NonBlocking),
                Err(e) => {
                    log::warn!(
                        "stdout cannot be reopened non-blocking ({e}); output may stall the guest"
                    );
                    (dup()?, OutMode::Direct)
                }
            }
        };
        Ok(Stdout {
            fd,
            mode,
            pending: Mutex::new(crate::sync::Rank::Leaf, Default::default()),
            dropped: Arc::new(AtomicU64::new(0)),
            wake: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// One write that does not block; returns how much was taken (everything when fd 1 is
    /// gone: output to a closed pipe is lost, not an error for the guest).
    fn write_now(&self, buf: &[u8]) -> usize {
        use std::os::fd::AsRawFd;
        if buf.is_empty() {
            return 0;
        }
        let fd = self.fd.as_raw_fd();
        // SAFETY: write(2)/send(2) from a buffer of its length to a descriptor we own.
        let n = unsafe {
            match self.mode {
                OutMode::Socket => libc::send(
                    fd,
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                ),
                _ => libc::write(fd, buf.as_ptr().cast(), buf.len()),
            }
        };
        if n >= 0 {
            return n as usize;
        }
        match io::Error::last_os_error().kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => 0,
            _ => buf.len(),
        }
    }

    /// Takes `buf` without waiting: writes what fd 1 takes now, buffers the rest as far as
    /// there is room, drops (and counts) what is left.
    pub fn write(&self, mut buf: &[u8]) {
        if self.mode == OutMode::Direct {
            while !buf.is_empty() {
                let n = self.write_now(buf);
                if n == 0 {
                    std::thread::yield_now();
                }
                buf = &buf[n..];
            }
            return;
        }
        let mut p = self.pending.lock();
        let was_empty = p.is_empty();
        if was_empty {
            let n = self.write_now(buf);
            buf = &buf[n..];
        }
        let take = buf.len().min(STDOUT_BUFFER - p.len());
        p.extend(&buf[..take]);
        if take < buf.len() {
            self.dropped
                .fetch_add((buf.len() - take) as u64, Ordering::Relaxed);
        }
        if was_empty && !p.is_empty() {
            let _ = self.wake.write(1);
        }
    }

    /// Writes out what waits, as far as fd 1 takes it now; true if some still waits.
    pub fn flush_some(&self) -> bool {
        let _ = self.wake.read();
        let mut p = self.pending.lock();
        while !p.is_empty() {
            let (a, _) = p.as_slices();
            let n = self.write_now(a);
            if n == 0 {
                return true;
            }
            p.drain(..n);
        }
        false
    }

    /// Whether output waits for fd 1.
    pub fn has_pending(&self) -> bool {
        !self.pending.lock().is_empty()
    }

    /// fd 1 as written to (for polling writability).
    pub fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }

    /// Readable when output starts waiting.
    pub fn wake(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.wake)
    }

    /// At exit: writes out what waits for at most `limit`, then gives up on the rest.
    pub fn finish(&self, limit: std::time::Duration) {
        let until = std::time::Instant::now() + limit;
        while self.flush_some() {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: one pollfd on our stack.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
        }
    }
}

impl Write for CharOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            CharOut::Stdout(s) => s.write(buf),
            CharOut::Sink => {}
            CharOut::File(f) => f.write_all(buf)?,
            CharOut::Socket(peer) => {
                use std::os::fd::AsRawFd;
                let mut p = peer.0.lock();
                if let Some(s) = p.as_ref() {
                    // SAFETY: send(2) on a socket we own, from a buffer of its length. Never
                    // blocks (a slow client loses output) and never raises SIGPIPE.
                    let n = unsafe {
                        libc::send(
                            s.as_raw_fd(),
                            buf.as_ptr().cast(),
                            buf.len(),
                            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                        )
                    };
                    if n < 0 {
                        let e = io::Error::last_os_error();
                        if e.kind() == io::ErrorKind::WouldBlock {
                            peer.1.fetch_add(buf.len() as u64, Ordering::Relaxed);
                        } else {
                            *p = None; // client gone
                        }
                    } else if (n as usize) < buf.len() {
                        peer.1
                            .fetch_add((buf.len() - n as usize) as u64, Ordering::Relaxed);
                    }
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A socket backend's listener; removes the socket file when dropped.
#[derive(Debug)]
pub struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        crate::sandbox::unregister_socket(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Opens the host end of `io` (paths relative to `base`). For sockets, starts a thread that
/// accepts one client at a time and feeds what it writes to `input`.
pub fn open(
    io: &CharIo,
    base: &Path,
    input: Arc<dyn CharInput>,
) -> Result<(CharOut, Option<SocketGuard>), CharIoError> {
    match io {
        CharIo::Stdio => match stdout() {
            Ok(s) => Ok((CharOut::Stdout(s), None)),
            // No stdout at all (closed): the output has nowhere to go.
            Err(e) => {
                log::warn!("stdout is unusable ({e}); the console's output is discarded");
                Ok((CharOut::Sink, None))
            }
        },
        CharIo::None => Ok((CharOut::Sink, None)),
        CharIo::File(p) => {
            let path = p.resolve(base);
            let f = crate::hostfile::open_output(&path).map_err(|e| CharIoError::File {
                path: path.display().to_string(),
                source: match e {
                    crate::hostfile::OutputError::Io(e) => e,
                    other => io::Error::other(other.to_string()),
                },
            })?;
            Ok((CharOut::File(f), None))
        }
        CharIo::Socket(p) => {
            let path = p.resolve(base);
            let name = path.display().to_string();
            // A socket file left by an earlier run is replaced; anything else is not touched.
            if std::fs::symlink_metadata(&path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                let _ = std::fs::remove_file(&path);
            }
            let listener = UnixListener::bind(&path).map_err(|source| CharIoError::Socket {
                path: name.clone(),
                source,
            })?;
            let peer = Arc::new(SocketPeer::default());
            let p2 = peer.clone();
            let thread = format!(
                "sock:{}",
                path.file_name().and_then(|f| f.to_str()).unwrap_or("?")
            );
            crate::sandbox::spawn(&crate::sandbox::CHAR_SOCKET, false, thread, move || {
                serve_socket(listener, p2, input)
            })
            .map_err(|source| CharIoError::Socket { path: name, source })?;
            crate::sandbox::register_socket(&path);
            crate::sandbox::owner_only_socket(&path).map_err(|source| CharIoError::Socket {
                path: path.display().to_string(),
                source,
            })?;
            Ok((CharOut::Socket(peer), Some(SocketGuard(path))))
        }
    }
}

fn serve_socket(listener: UnixListener, peer: Arc<SocketPeer>, input: Arc<dyn CharInput>) {
    use std::io::Read;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        match crate::sandbox::peer_uid(&stream) {
            Some(uid) if crate::sandbox::uid_may_connect(uid) => {}
            uid => {
                log::warn!(
                    "character socket: refused a client of uid {uid:?} (not root or the owner)"
                );
                continue;
            }
        }
        let Ok(writer) = stream.try_clone() else {
            continue;
        };
        *peer.0.lock() = Some(writer);
        let mut reader = stream;
        let mut buf = [0u8; 256];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            feed(&*input, &buf[..n]);
        }
        *peer.0.lock() = None;
    }
}

/// Pushes all of `bytes` into `input`, waiting while the device's buffer is full.
pub fn feed(input: &dyn CharInput, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let n = input.push(bytes);
        bytes = &bytes[n..];
        if n == 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
