//! Where a character device (serial port, virtio console) sends and gets its bytes.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::spec::units::FilePath;
use crate::validate::DeviceCheck;

/// The host end of a character device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CharIo {
    /// The terminal `vmm up` runs in: output to stdout, keystrokes from stdin. One device at most.
    Stdio,
    /// Not connected: output is discarded, there is no input.
    None,
    /// Output appended to this file (created when missing); no input.
    File(FilePath),
    /// A unix socket vmm listens on; one client at a time reads output and writes input.
    Socket(FilePath),
}

impl CharIo {
    /// Validation shared by every character device: one user of the terminal, distinct files and
    /// sockets, and a parent directory that exists.
    pub fn check(&self, cx: &mut DeviceCheck<'_, '_>, field: &str) {
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

/// The connected client of a socket backend, if any.
#[derive(Default)]
pub struct SocketPeer(Mutex<Option<UnixStream>>);

/// Where a character device's output goes. Writes never stall the guest for long: a socket
/// client that does not keep up loses output instead.
pub enum CharOut {
    Stdout,
    Sink,
    File(std::fs::File),
    Socket(Arc<SocketPeer>),
}

impl Write for CharOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            CharOut::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(buf)?;
                out.flush()?;
            }
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
                        if e.kind() != io::ErrorKind::WouldBlock {
                            *p = None; // client gone
                        }
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
pub struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
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
        CharIo::Stdio => Ok((CharOut::Stdout, None)),
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
            std::thread::Builder::new()
                .name(format!(
                    "sock:{}",
                    path.file_name().and_then(|f| f.to_str()).unwrap_or("?")
                ))
                .spawn(move || serve_socket(listener, p2, input))
                .map_err(|source| CharIoError::Socket { path: name, source })?;
            Ok((CharOut::Socket(peer), Some(SocketGuard(path))))
        }
    }
}

fn serve_socket(listener: UnixListener, peer: Arc<SocketPeer>, input: Arc<dyn CharInput>) {
    use std::io::Read;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
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
