//! `vmm device console` driven over a real vhost-user socket by a front end written here (the
//! vhost crate's `Frontend`), with the driver's rings in shared memory (a memfd both processes
//! map). No stock VMM can front a vhost-user console: QEMU 10 has no vhost-user console device
//! and its generic `vhost-user-device-pci` is not user-creatable. Linux's own virtio_console
//! driver is checked against the same device code in tests/virtio_linux.rs.

mod common;

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::qemu::Backend;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 1 << 20;
const QSIZE: u16 = 16;
const RXQ: u64 = 0x0000;
const TXQ: u64 = 0x4000;
const RX_BUF: u64 = 0x10000;
const TX_BUF: u64 = 0x20000;
const VERSION_1: u64 = 1 << 32;
const CONSOLE_F_SIZE: u64 = 1;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Guest memory both sides map: a memfd, sealed against shrinking and growing as QEMU's
/// memory-backend-memfd seals it (unless `sealed` is false).
fn shared_memory_with(sealed: bool) -> (GuestMemoryMmap<()>, std::fs::File) {
    // SAFETY: memfd_create with a static NUL-terminated name; the fd is checked and owned below.
    let fd = unsafe {
        libc::memfd_create(
            c"vmm-test-mem".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd nobody else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE as u64).unwrap();
    if sealed {
        // SAFETY: F_ADD_SEALS on our memfd.
        let r = unsafe {
            libc::fcntl(
                fd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        assert_eq!(r, 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        MEM_SIZE,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    (mem, file)
}

fn shared_memory() -> (GuestMemoryMmap<()>, std::fs::File) {
    shared_memory_with(true)
}

/// A front end whose guest memory is not sealed could truncate it and crash the backend with
/// SIGBUS at its next access; `vmm device` refuses such memory with the reason and exits 1
/// (it used to take it, and died by the signal once the front end shrank the file).
#[test]
fn unsealed_guest_memory_is_refused_with_the_reason() {
    use std::io::Read;
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("console.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.args(["device", "console", "--io", "none", "--socket"])
        .arg(&sock)
        .stderr(std::process::Stdio::piped());
    let mut backend = Backend::start(cmd, &sock, Duration::from_secs(20));
    let (mem, file) = shared_memory_with(false);
    let region = mem.iter().next().unwrap();
    let fe = Frontend::connect(&sock, 2).expect("connect to vmm device console");
    fe.set_owner().unwrap();
    fe.get_features().unwrap();
    fe.set_features(VERSION_1 | PROTOCOL_FEATURES).unwrap();
    let _ = fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()]);
    // What a hostile front end would do next.
    file.set_len(4096).unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = backend.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "vmm device took the unsealed memory");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    backend
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{status}: {err}");
    assert!(err.contains("not sealed against shrinking"), "{err}");
    assert!(err.contains("memory-backend-memfd"), "{err}");
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

#[test]
fn vmm_device_console_moves_bytes_both_ways_over_vhost_user() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("console.sock");
    let host_end = tmp.path().join("hvc.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.args(["device", "console", "--socket"])
        .arg(&sock)
        .arg("--io")
        .arg(format!("socket={}", host_end.display()));
    let backend = Backend::start(cmd, &sock, Duration::from_secs(20));
    let mut client = UnixStream::connect(&host_end).expect("the console's host end listens");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    let (mem, _file) = shared_memory();
    let region = mem.iter().next().unwrap();
    let host_base = region.as_ptr() as u64;
    let rx = MockSplitQueue::create(&mem, GuestAddress(RXQ), QSIZE);
    let tx = MockSplitQueue::create(&mem, GuestAddress(TXQ), QSIZE);

    let mut fe = Frontend::connect(&sock, 2).expect("connect to vmm device console");
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    assert_eq!(
        offered & (VERSION_1 | CONSOLE_F_SIZE | PROTOCOL_FEATURES),
        VERSION_1 | CONSOLE_F_SIZE | PROTOCOL_FEATURES,
        "offered {offered:#x}"
    );
    let proto = fe.get_protocol_features().unwrap();
    assert!(
        proto.contains(VhostUserProtocolFeatures::CONFIG),
        "{proto:?}"
    );
    fe.set_protocol_features(VhostUserProtocolFeatures::CONFIG)
        .unwrap();
    fe.set_features(VERSION_1 | CONSOLE_F_SIZE | PROTOCOL_FEATURES)
        .unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()])
        .unwrap();

    // The configuration space: 80x25, one port.
    let (_, cfg) = fe
        .get_config(0, 12, VhostUserConfigFlags::WRITABLE, &[0u8; 12])
        .unwrap();
    assert_eq!(&cfg[..8], &[80, 0, 25, 0, 1, 0, 0, 0], "cols, rows, ports");

    let mut kicks = Vec::new();
    let mut calls = Vec::new();
    for (i, q) in [&rx, &tx].into_iter().enumerate() {
        let (kick, call) = (
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        );
        fe.set_vring_num(i, QSIZE).unwrap();
        fe.set_vring_addr(
            i,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host_base + q.desc_table_addr().0,
                used_ring_addr: host_base + q.used_addr().0,
                avail_ring_addr: host_base + q.avail_addr().0,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(i, 0).unwrap();
        fe.set_vring_call(i, &call).unwrap();
        fe.set_vring_kick(i, &kick).unwrap();
        fe.set_vring_enable(i, true).unwrap();
        kicks.push(kick);
        calls.push(call);
    }

    // Driver → host: a transmit chain of two buffers comes out of the socket in order.
    mem.write_slice(b"hello from ", GuestAddress(TX_BUF))
        .unwrap();
    mem.write_slice(b"the driver\n", GuestAddress(TX_BUF + 0x100))
        .unwrap();
    let first = RawDescriptor::from(Descriptor::new(TX_BUF, 11, NEXT, 1));
    tx.add_desc_chains(&[first, desc(TX_BUF + 0x100, 11, 0)], 0)
        .unwrap();
    kicks[1].write(1).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while got.len() < 22 {
        let n = client.read(&mut buf).unwrap();
        assert!(n > 0, "the host end closed");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"hello from the driver\n");
    wait_until(
        "the transmit chain is used",
        Duration::from_secs(10),
        || tx.used().idx().load() == 1,
    );
    assert!(calls[1].read().is_ok(), "the driver was notified");

    // Host → driver: typed before any receive buffer exists, delivered once one is posted.
    client.write_all(b"typed on the host").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rx.used().idx().load(), 0);
    rx.add_desc_chains(&[desc(RX_BUF, 64, WRITE)], 0).unwrap();
    kicks[0].write(1).unwrap();
    wait_until("the input arrives", Duration::from_secs(10), || {
        rx.used().idx().load() == 1
    });
    let e = rx.used().ring().ref_at(0).unwrap().load();
    assert_eq!(e.len(), 17);
    let mut input = vec![0u8; 17];
    mem.read_slice(&mut input, GuestAddress(RX_BUF)).unwrap();
    assert_eq!(input, b"typed on the host");

    // After each hostile step: host input still reaches receive buffer `n` (descriptor `n`,
    // the `n + 1`th completion), so the backend's one thread is not stuck on the other queue.
    let input_still_arrives = |client: &mut UnixStream, text: &[u8], n: u16| {
        client.write_all(text).unwrap();
        let at = RX_BUF + 0x100 * u64::from(n);
        rx.add_desc_chains(&[desc(at, 64, WRITE)], n).unwrap();
        kicks[0].write(1).unwrap();
        wait_until(
            "input after a hostile step",
            Duration::from_secs(10),
            || rx.used().idx().load() == n + 1,
        );
        let mut got = vec![0u8; text.len()];
        mem.read_slice(&mut got, GuestAddress(at)).unwrap();
        assert_eq!(got, text);
    };

    // A hostile driver: a transmit head past the descriptor table. The chain cannot be taken;
    // the backend must not spin on it (its one thread serves the receive queue too).
    tx.avail()
        .ring()
        .ref_at(1)
        .unwrap()
        .store(u16::to_le(QSIZE + 3));
    tx.avail().idx().store(2);
    kicks[1].write(1).unwrap();
    input_still_arrives(&mut client, b"after a bad head", 1);

    // A hostile driver: the transmit ring's index runs far ahead. The backend leaves that queue
    // alone and keeps serving the other one.
    tx.avail().idx().store(5000);
    kicks[1].write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    input_still_arrives(&mut client, b"still here", 2);

    // A hostile front end: the transmit ring restarted with its available ring at the very end
    // of guest memory, so its index reads but its entries do not. Nothing can be taken from
    // it; the backend must not spin on it (its one thread serves the receive queue too).
    fe.get_vring_base(1).unwrap();
    let edge = MEM_SIZE as u64 - 4;
    fe.set_vring_addr(
        1,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: host_base + tx.desc_table_addr().0,
            used_ring_addr: host_base + tx.used_addr().0,
            avail_ring_addr: host_base + edge,
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(1, 0).unwrap();
    mem.write_obj(0u16, GuestAddress(edge)).unwrap();
    mem.write_obj(1u16, GuestAddress(edge + 2)).unwrap();
    fe.set_vring_kick(1, &kicks[1]).unwrap();
    fe.set_vring_enable(1, true).unwrap();
    kicks[1].write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    input_still_arrives(&mut client, b"not stuck", 3);

    // The front end goes away: the backend exits cleanly.
    drop(fe);
    let mut backend = backend;
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = backend.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < end, "vmm device console did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
}

/// Bad `vmm device` options are exit 2 with a message that names the problem, before any
/// socket exists.
#[test]
fn bad_device_options_are_exit_2_with_the_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("s.sock");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .arg("device")
            .args(args)
            .arg("--socket")
            .arg(&sock)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["console", "--io", "tty"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(r#"`io` must be "stdio", "none", { file = … } or { socket = … }"#),
        "{err}"
    );
    let (code, err) = run(&["console", "--io", "file="]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--io: `file=` needs a value after `=`"),
        "{err}"
    );
    let missing = tmp.path().join("nope.img");
    let (code, err) = run(&["block", "--path", &missing.display().to_string()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("disk image {} does not exist", missing.display())),
        "{err}"
    );
    let (code, err) = run(&["net", "--tap", "a/b"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`a/b` is not a TAP interface name"), "{err}");
    let (code, err) = run(&[
        "console",
        "--io",
        &format!("socket={}", tmp.path().join("no/such/dir/c.sock").display()),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no/such/dir does not exist"), "{err}");
    // An option the kind does not have, and a key the front end owns, are refused by clap.
    let (code, err) = run(&["net", "--tap", "t0", "--mac", "02:00:00:00:00:01"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, err) = run(&["block", "--path", "x", "--slot", "3"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(!sock.exists(), "no vhost-user socket was created");
}
