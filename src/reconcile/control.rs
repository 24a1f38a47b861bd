//! The control socket of a running VM: `vmm status`, `vmm plan FILE`, `vmm apply FILE` and
//! `vmm stop` talk to it.
//!
//! Protocol (docs/hotplug.md, types in [`super::protocol`]): a unix stream socket; the client
//! sends one [`Request`] as JSON on one line, the VM answers with one [`Answer`] on one line
//! and closes.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::Event;
use crate::sync::{Condvar, Mutex, MutexGuard};

pub use super::protocol::{Answer, Request};

/// The largest request accepted: a machine file of the largest size vmm reads, every byte
/// escaped in JSON (`\u0000`), and room for the rest.
const MAX_REQUEST: u64 = 6 * crate::spec::MAX_FILE_SIZE as u64 + (64 << 10);
/// How long a client may take to send its whole request (a deadline, not a per-read
/// timeout: a client trickling a byte at a time is cut off too), and to take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Clients served at once (each on its own short-lived thread, so a client that is slow to
/// send does not hold up the others). When all are taken, a new client takes the place of
/// the one that has been sending its request longest (a real client sends it in one write);
/// only when all are being answered is it turned away with an error answer.
const MAX_CLIENTS: usize = 16;

/// Where the control sockets of running VMs live: `$VMM_RUNTIME_DIR`, else
/// `$XDG_RUNTIME_DIR/vmm`, else `/run/vmm` for root and `/tmp/vmm-<uid>` for others.
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VMM_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("vmm");
    }
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        PathBuf::from("/run/vmm")
    } else {
        PathBuf::from(format!("/tmp/vmm-{uid}"))
    }
}

/// The control socket of the machine called `machine`.
pub fn socket_path(machine: &str) -> PathBuf {
    runtime_dir().join(format!("{machine}.sock"))
}

/// Whether a running VM answers on the socket at `path`. A VM killed without its cleanup
/// leaves the socket file behind; nothing accepts connections on it.
pub fn answers(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// The control socket's accept thread.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    stop: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
    clients: Arc<Clients>,
}

/// The clients being served, shared by the accept thread, the client threads and the
/// [`Server`]'s drop.
#[derive(Debug, Default)]
struct Clients {
    /// Connected clients (at most [`MAX_CLIENTS`]).
    connected: AtomicUsize,
    /// Clients whose request has been read and whose answer is not written yet: the VM ends
    /// only after they have their answer (`vmm stop` hears "stopping").
    answering: Mutex<usize>,
    answered: Condvar,
    /// Clients still sending their request, oldest first: (id, the connection).
    reading: Mutex<std::collections::VecDeque<(u64, UnixStream)>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl Clients {
    /// Cuts off the client that has been sending its request longest; whether there was one.
    fn evict_slowest(&self) -> bool {
        let Some((_, conn)) = lock(&self.reading).pop_front() else {
            return false;
        };
        let _ = conn.shutdown(std::net::Shutdown::Both);
        true
    }

    /// Lists `conn` as sending its request until the guard is dropped.
    fn reading(&self, conn: &UnixStream) -> impl Drop + '_ {
        struct Reading<'a>(&'a Clients, u64);
        impl Drop for Reading<'_> {
            fn drop(&mut self) {
                lock(&self.0.reading).retain(|(id, _)| *id != self.1);
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        if let Ok(c) = conn.try_clone() {
            lock(&self.reading).push_back((id, c));
        }
        Reading(self, id)
    }

    /// Counts one request being answered until the guard is dropped.
    fn answering(&self) -> impl Drop + '_ {
        struct Answering<'a>(&'a Clients);
        impl Drop for Answering<'_> {
            fn drop(&mut self) {
                *lock(&self.0.answering) -= 1;
                self.0.answered.notify_all();
            }
        }
        *lock(&self.answering) += 1;
        Answering(self)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock()
}

impl Server {
    /// Listens at `path` and hands requests to the reconciler. A socket file left by a VM that
    /// is gone is replaced; one a running VM answers on is not.
    pub fn start(path: &Path, tx: mpsc::Sender<Event>) -> std::io::Result<Server> {
        if let Some(dir) = path.parent() {
            crate::sandbox::runtime_dir(dir).map_err(std::io::Error::other)?;
        }
        if path.exists() {
            if answers(path) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another running VM of that name answers on it",
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        crate::sandbox::register_socket(path);
        crate::sandbox::owner_only_socket(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let clients = Arc::new(Clients::default());
        let (s2, c2) = (stop.clone(), clients.clone());
        let thread = crate::sandbox::spawn(
            &crate::sandbox::CONTROL,
            false,
            "control".into(),
            move || serve(listener, &s2, &tx, &c2),
        )?;
        Ok(Server {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
            clients,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        crate::sandbox::unregister_socket(&self.path);
        let _ = std::fs::remove_file(&self.path);
        // Requests in flight get their answers (`vmm stop` hears "stopping"), within the time
        // vmm promises to end in after a stop; clients that have sent nothing are not waited for.
        let n = lock(&self.clients.answering);
        let _ = self
            .clients
            .answered
            .wait_timeout_while(n, super::SHUTDOWN_WAIT, |n| *n > 0);
    }
}

fn serve(listener: UnixListener, stop: &EventFd, tx: &mpsc::Sender<Event>, clients: &Arc<Clients>) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polling two fds we own, described by a valid array.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            continue; // EINTR
        }
        if fds[1].revents != 0 {
            return;
        }
        match listener.accept() {
            Ok((conn, _)) => serve_client(conn, tx, clients),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                log::warn!("control socket: {e}");
                // A pause before accepting again (EMFILE and the like), without sleep(2): a
                // poll on nothing, which the control thread's filter allows anyway.
                // SAFETY: poll with no descriptors only waits.
                unsafe { libc::poll(std::ptr::null_mut(), 0, 10) };
            }
        }
    }
}

/// Answers `conn` on a thread of its own (the reconciler still handles requests one by one).
fn serve_client(conn: UnixStream, tx: &mpsc::Sender<Event>, clients: &Arc<Clients>) {
    let busy = || {
        let mut w = &conn;
        let _ = w.set_write_timeout(Some(CLIENT_TIMEOUT));
        let text = format!("the VM is serving {MAX_CLIENTS} other clients; try again");
        let _ = w.write_all(format!("{}\n", Answer::error(text).to_line()).as_bytes());
    };
    if !peer_allowed(&conn) {
        return;
    }
    if clients.connected.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS && !clients.evict_slowest() {
        clients.connected.fetch_sub(1, Ordering::SeqCst);
        log::warn!("control socket: {MAX_CLIENTS} clients being answered; turning one away");
        busy();
        return;
    }
    let (tx, c2) = (tx.clone(), clients.clone());
    let spawned = crate::sandbox::spawn(
        &crate::sandbox::CONTROL,
        false,
        "control-client".into(),
        move || {
            if let Err(e) = answer(conn, &tx, &c2) {
                log::debug!("control client: {e}");
            }
            c2.connected.fetch_sub(1, Ordering::SeqCst);
        },
    );
    if let Err(e) = spawned {
        // The connection went with the closure: the client sees it closed.
        clients.connected.fetch_sub(1, Ordering::SeqCst);
        log::warn!("control socket: cannot start a client thread: {e}");
    }
}

fn answer(conn: UnixStream, tx: &mpsc::Sender<Event>, clients: &Clients) -> std::io::Result<()> {
    // Accepted sockets start blocking (accept4 does not pass the listener's O_NONBLOCK on).
    conn.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let line = {
        let _reading = clients.reading(&conn);
        read_request(&conn, std::time::Instant::now() + CLIENT_TIMEOUT)?
    };
    if line.is_empty() {
        // Closed without a request: a client checking that the VM runs.
        return Ok(());
    }
    let _answering = clients.answering();
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => {
            let (rtx, rrx) = mpsc::channel();
            if tx.send(Event::Control(req, rtx)).is_err() {
                Answer::error("the VM is shutting down")
            } else {
                rrx.recv_timeout(ANSWER_TIMEOUT)
                    .unwrap_or_else(|_| Answer::error("the VM did not answer in time"))
            }
        }
        Err(e) => Answer::error(format!("bad request: {e}")),
    };
    let mut w = &conn;
    w.write_all(format!("{}\n", reply.to_line()).as_bytes())?;
    w.flush()
}

/// Reads one request line, all of it before `deadline`, at most [`MAX_REQUEST`] bytes.
fn read_request(conn: &UnixStream, deadline: std::time::Instant) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(Error::new(
                ErrorKind::TimedOut,
                format!("the request took longer than {CLIENT_TIMEOUT:?}"),
            ));
        }
        conn.set_read_timeout(Some(left))?;
        let n = match (&*conn).read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        let end = chunk[..n].iter().position(|&b| b == b'\n');
        buf.extend_from_slice(&chunk[..end.map_or(n, |i| i + 1)]);
        if buf.len() as u64 > MAX_REQUEST {
            return Err(Error::new(
                ErrorKind::InvalidData,
                "the request is too large",
            ));
        }
        if end.is_some() {
            break;
        }
    }
    String::from_utf8(buf).map_err(|_| Error::new(ErrorKind::InvalidData, "not UTF-8"))
}

/// Whether the peer of `conn` may talk to this VM: root or the user vmm runs as
/// (SO_PEERCRED; the socket's 0600 mode already keeps others out, this is the second check).
pub fn peer_allowed(conn: &UnixStream) -> bool {
    match crate::sandbox::peer_uid(conn) {
        Some(uid) if crate::sandbox::uid_may_connect(uid) => true,
        other => {
            log::warn!("control socket: refused a client of uid {other:?} (not root or the owner)");
            false
        }
    }
}

/// Sends `req` to the control socket at `path`; returns the answer.
pub fn call(path: &Path, req: &Request) -> Result<Answer, String> {
    let mut s = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the VM's control socket {}: {e} (is the VM running?)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT + Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let text = serde_json::to_string(req).map_err(|e| e.to_string())?;
    // A VM that turns the client away answers and closes without reading: the answer is
    // still there to read when sending failed.
    let sent = s.write_all(format!("{text}\n").as_bytes());
    let mut answer = String::new();
    let read = BufReader::new(&s).read_line(&mut answer);
    if answer.is_empty() {
        // A peer that closed unread resets the connection or breaks the pipe.
        let other = [sent.err(), read.err()].into_iter().flatten().find(|e| {
            !matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            )
        });
        return Err(match other {
            Some(e) => format!("talking to {}: {e}", path.display()),
            None => "the VM closed the connection without answering".to_string(),
        });
    }
    serde_json::from_str(&answer).map_err(|e| format!("bad answer from the VM: {e}"))
}
