//! vhost-user messages into `vmm device`'s backend, as a hostile front end sends them: vmm's
//! own daemon (`vmm::vhost_user::serve`) serving the rng, console, block or net model on a
//! real unix socket, the net model behind the early-enable relay. Each message's request,
//! flags, size field and payload are the input's, with a sealed memfd (guest memory whose
//! bytes are the input's too: descriptors, rings, buffers) or an eventfd attached where the
//! input says; the input can also kick every ring it set up.
//!
//! Oracle: no panic (libFuzzer aborts on one in any thread), and the backend hangs up within
//! 5 s of the front end closing its side: nothing a front end sends can wedge it.
//!
//! Input: kind (u8), memory fill (u16 length + bytes), then up to 64 operations, each an op
//! byte — `op % 4`: 0 message, 1 message + memfd, 2 message + eventfd, 3 kick every eventfd
//! sent so far; `op & 4`: the payload length is its own byte instead of the size field —
//! then request (u8), flags (u8), size (u16) and the payload.
#![no_main]

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vmm::devices::DeviceKind;
use vmm_fuzz::Input;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Guest memory the memfd holds.
const MEM: usize = 64 << 10;
/// The TAP the net model serves.
const TAP: &str = "vmmfz0";
/// Most operations one input runs.
const MAX_OPS: usize = 64;

struct Place {
    dir: tempfile::TempDir,
    image: PathBuf,
    /// Whether this process may create TAPs (root): the net model needs one.
    tap_ok: bool,
}

fn place() -> &'static Place {
    static P: OnceLock<Place> = OnceLock::new();
    P.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        File::create(&image).unwrap().set_len(1 << 20).unwrap();
        // A persistent TAP, so each run attaches it (fast) instead of creating an interface;
        // deleted again at exit (and by fuzz/run.sh after a crash).
        let tap_ok = persist_tap(true) && vmm::devices::net::NetModel::open(TAP).is_ok();
        if tap_ok {
            extern "C" fn remove_tap() {
                persist_tap(false);
            }
            // SAFETY: registers a function with no captured state, run once at exit.
            unsafe { libc::atexit(remove_tap) };
        }
        if !tap_ok {
            eprintln!("vhost_user fuzz: no TAP (not root?): the net model is not fuzzed");
        }
        Place { dir, image, tap_ok }
    })
}

/// Creates TAP `TAP` and makes it persistent (`on`), or makes it non-persistent, which
/// deletes it when this last descriptor closes. The flags are the ones `Tap::open` uses.
fn persist_tap(on: bool) -> bool {
    let Ok(tun) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    else {
        return false;
    };
    // SAFETY: an all-zero ifreq is valid; the name is copied in below, NUL-terminated.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(TAP.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF and TUNSETPERSIST on the clone device, with the ifreq on our stack
    // and an integer argument.
    unsafe {
        libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF as _, &mut req) == 0
            && libc::ioctl(
                tun.as_raw_fd(),
                libc::TUNSETPERSIST as _,
                libc::c_ulong::from(on),
            ) == 0
    }
}

/// A memfd of `MEM` bytes sealed against shrinking (what the daemon insists on), filled
/// with `fill` repeated.
fn memfd(fill: &[u8]) -> File {
    // SAFETY: memfd_create with a static name; the descriptor is owned by the File.
    let fd = unsafe { libc::memfd_create(c"vmm-fuzz".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nothing else owns.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.set_len(MEM as u64).unwrap();
    if !fill.is_empty() {
        let buf: Vec<u8> = (0..MEM).map(|i| fill[i % fill.len()]).collect();
        f.write_all(&buf).unwrap();
    }
    // SAFETY: fcntl on the descriptor the File owns.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    assert_eq!(r, 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
    f
}

/// Reads whatever the backend has sent so far (replies, descriptors), without waiting
/// longer than `wait`; false once it hung up.
fn drain(s: &UnixStream, wait: Duration) -> bool {
    let until = Instant::now() + wait;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one pollfd, valid for the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n <= 0 {
            return true;
        }
        let mut buf = [0u8; 4096];
        let mut fds = [-1 as RawFd; 8];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points into `buf`.
        match unsafe { s.recv_with_fds(&mut iov, &mut fds) } {
            Ok((0, _)) | Err(_) => return false,
            Ok((_, nfds)) => {
                for &fd in &fds[..nfds] {
                    // SAFETY: a descriptor recvmsg just gave us; closed once here.
                    drop(unsafe { File::from_raw_fd(fd) });
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let place = place();
    let mut input = Input(data);
    let Some(kind) = input.u8() else {
        return;
    };
    let Some(fill_len) = input.u16() else {
        return;
    };
    let fill = input.bytes(usize::from(fill_len)).to_vec();
    let (key, value) = match kind % 4 {
        0 => ("rng", serde_json::json!({ "name": "r" })),
        1 => ("console", serde_json::json!({ "name": "c", "io": "none" })),
        2 => (
            "block",
            serde_json::json!({ "name": "b", "path": place.image.to_str().unwrap() }),
        ),
        _ if place.tap_ok => ("net", serde_json::json!({ "name": "n", "tap": TAP })),
        _ => ("rng", serde_json::json!({ "name": "r" })),
    };
    let kind = DeviceKind::from_key(key).unwrap();
    let model = match kind.parse(value).unwrap().device().served(place.dir.path()) {
        Some(Ok(m)) => m,
        // `cargo fuzz coverage` runs inputs in parallel processes: the TAP may be taken.
        // (A net model this process kept open is found by the leak check instead.)
        Some(Err(e)) if key == "net" && e.to_string().contains("already attached") => return,
        Some(Err(e)) => panic!("the {key} model does not open (the last run's is kept?): {e}"),
        None => panic!("{key} is not served"),
    };

    static RUN: AtomicU64 = AtomicU64::new(0);
    let socket = place
        .dir
        .path()
        .join(format!("s{}.sock", RUN.fetch_add(1, Ordering::Relaxed)));
    let path = socket.clone();
    let server = std::thread::spawn(move || {
        let _ = vmm::vhost_user::serve(kind.key(), model, &path, false);
    });
    let started = Instant::now();
    let front = loop {
        match UnixStream::connect(&socket) {
            Ok(s) => break s,
            Err(_) if started.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(e) => panic!("the backend never listened on {}: {e}", socket.display()),
        }
    };
    front
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();

    let mut kicks: Vec<EventFd> = Vec::new();
    let mut open = true;
    for _ in 0..MAX_OPS {
        let Some(op) = input.u8() else {
            break;
        };
        if op % 4 == 3 {
            for k in &kicks {
                let _ = k.write(1);
            }
            open = drain(&front, Duration::from_micros(200));
            if !open {
                break;
            }
            continue;
        }
        let (Some(request), Some(flags), Some(size)) = (input.u8(), input.u8(), input.u16()) else {
            break;
        };
        let len = if op & 4 != 0 {
            usize::from(input.u8().unwrap_or(0))
        } else {
            usize::from(size)
        };
        let mut msg = Vec::with_capacity(12 + len);
        msg.extend(u32::from(request).to_le_bytes());
        msg.extend(u32::from(flags).to_le_bytes());
        msg.extend(u32::from(size).to_le_bytes());
        msg.extend_from_slice(input.bytes(len.min(4096)));
        let mem;
        let ev;
        let fds: Vec<RawFd> = match op % 4 {
            1 => {
                mem = memfd(&fill);
                vec![mem.as_raw_fd()]
            }
            2 => {
                ev = EventFd::new(libc::EFD_NONBLOCK).unwrap();
                let fd = ev.as_raw_fd();
                kicks.push(ev.try_clone().unwrap());
                vec![fd]
            }
            _ => Vec::new(),
        };
        let sent = if fds.is_empty() {
            (&front).write_all(&msg).is_ok()
        } else {
            match front.send_with_fds(&[&msg[..]], &fds) {
                Ok(n) if n == msg.len() => true,
                Ok(n) => (&front).write_all(&msg[n..]).is_ok(),
                Err(_) => false,
            }
        };
        if !sent {
            break;
        }
        open = drain(&front, Duration::ZERO);
        if !open {
            break;
        }
    }
    // The front end is done: the backend must hang up soon.
    let _ = front.shutdown(std::net::Shutdown::Write);
    if open {
        let until = Instant::now() + Duration::from_secs(5);
        while drain(&front, Duration::from_millis(100)) {
            assert!(
                Instant::now() < until,
                "the {key} backend did not hang up 5 s after the front end closed"
            );
        }
    }
    drop(front);
    server.join().expect("the daemon thread");
});
