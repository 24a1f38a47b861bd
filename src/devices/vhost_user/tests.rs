//! The front end against vmm's own back end (a real daemon on a real socket, guest memory a
//! sealed memfd) and against hostile back ends written here message by message.

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::frontend::{FrontendError, VhostUserDevice};
use super::*;
use crate::hw::virtio::testing::{WRITE, desc};
use crate::hw::virtio::{Activation, ActiveQueue, GuestMem, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::testing::{Count, Resets};

fn spec(text: &str) -> VhostUserSpec {
    toml::from_str(text).unwrap()
}

#[test]
fn device_types_parse_by_name_or_number_and_say_what_they_know() {
    let s = spec("name = \"d\"\nsocket = \"s\"\ndevice = \"fs\"");
    assert_eq!(s.device, DeviceType(26));
    assert_eq!(s.virtio_info().queue_sizes[..], [256, 256]);
    assert_eq!(s.config_len(), 40);
    let s = spec("name = \"d\"\nsocket = \"s\"\ndevice = 2\nqueue_size = 1024\nconfig_size = 8");
    assert_eq!(s.virtio_info().queue_sizes[..], [1024]);
    assert_eq!(s.config_len(), 8);
    assert_eq!(s.device.label(), "block");
    assert!(
        toml::from_str::<VhostUserSpec>("name = \"d\"\nsocket = \"s\"\ndevice = \"floppy\"")
            .unwrap_err()
            .to_string()
            .contains("unknown virtio device type `floppy`")
    );
    for bad in ["0", "64", "-1"] {
        let e = toml::from_str::<VhostUserSpec>(&format!(
            "name = \"d\"\nsocket = \"s\"\ndevice = {bad}"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("out of range"), "{bad}: {e}");
    }
    // A type vmm has no name for needs its queue count.
    let s = spec("name = \"d\"\nsocket = \"s\"\ndevice = 40");
    assert!(s.queue_count().is_err());
    assert_eq!(s.device.label(), "40");
}

/// Guest memory as `vmm up` makes it: a sealed memfd, mapped shared.
fn shared_mem() -> GuestMem {
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd =
        unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: just created, owned here.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(1 << 20).unwrap();
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    // SAFETY: sealing our own memfd.
    let r = unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) };
    assert_eq!(r, 0);
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        1 << 20,
        Some(FileOffset::new(f, 0)),
    )])
    .unwrap()
}

fn info(queues: usize) -> VirtioInfo {
    VirtioInfo {
        device_type: 4,
        queue_sizes: Cow::Owned(vec![16; queues]),
        pci_class: (0xff, 0),
    }
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn vmm_device_rng_serves_a_request_through_the_front_end_and_a_reset_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("rng.sock");
    let s2 = sock.clone();
    let daemon = std::thread::spawn(move || {
        crate::vhost_user::serve(
            "rng",
            Box::new(crate::devices::rng::RngModel::new(None)),
            &s2,
            false,
        )
    });
    wait_for("the daemon listens", Duration::from_secs(10), || {
        sock.exists()
    });
    let mut dev = VhostUserDevice::connect("rng0", &sock, info(1), 0).unwrap();
    assert_eq!(dev.features() & VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1);
    assert_eq!(
        dev.features() & (1 << 30),
        0,
        "vhost-user's own bit is not offered"
    );

    let mem = shared_mem();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    vq.build_desc_chain(&[desc(0x10000, 64, WRITE)]).unwrap();
    let queue: Queue = vq.create_queue().unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(Count::default());
    let resets = Arc::new(Resets::default());
    dev.activate(Activation {
        mem: mem.clone(),
        features: VIRTIO_F_VERSION_1,
        queues: vec![ActiveQueue {
            index: 0,
            queue,
            kick: kick.try_clone().unwrap(),
            irq: irq.clone(),
        }],
        config_irq: Arc::new(Count::default()),
        needs_reset: resets.clone(),
    })
    .unwrap();
    kick.write(1).unwrap();
    wait_for(
        "the back end's completion interrupt",
        Duration::from_secs(10),
        || irq.get() > 0,
    );
    let used = vq.used().idx().load();
    assert_eq!(used, 1, "one buffer used");
    assert!(mem_nonzero(&mem, 0x10000, 64), "random bytes were written");
    dev.reset();
    wait_for("the reset to finish", Duration::from_secs(10), || {
        dev.quiesced()
    });
    assert!(resets.taken().is_empty(), "{:?}", resets.taken());
    assert!(dev.broken().is_none());
    drop(dev);
    // The daemon ends once its front end is gone.
    wait_for("the daemon to exit", Duration::from_secs(10), || {
        daemon.is_finished()
    });
}

fn mem_nonzero(mem: &GuestMem, at: u64, len: usize) -> bool {
    use vm_memory::Bytes;
    let mut b = vec![0u8; len];
    mem.read_slice(&mut b, GuestAddress(at)).unwrap();
    b.iter().any(|&x| x != 0)
}

/// A back end run by a script: the test reads the front end's messages and answers (or not).
struct Fake {
    path: PathBuf,
    _dir: tempfile::TempDir,
    thread: std::thread::JoinHandle<()>,
}

fn fake(script: impl FnOnce(UnixStream) + Send + 'static) -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let l = UnixListener::bind(&path).unwrap();
    let thread = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        script(s)
    });
    Fake {
        path,
        _dir: dir,
        thread,
    }
}

/// One front-end message: (request, flags, payload).
fn recv(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 12];
    s.read_exact(&mut h).unwrap();
    let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
    let mut body = vec![0u8; word(8) as usize];
    s.read_exact(&mut body).unwrap();
    (word(0), word(4), body)
}

fn reply(s: &mut UnixStream, req: u32, body: &[u8]) {
    let mut m = Vec::new();
    m.extend(req.to_le_bytes());
    m.extend((0x1u32 | 0x4).to_le_bytes());
    m.extend((body.len() as u32).to_le_bytes());
    m.extend(body);
    s.write_all(&m).unwrap();
}

const SET_OWNER: u32 = 3;
const GET_FEATURES: u32 = 1;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const GET_CONFIG: u32 = 24;
const PROTOCOL: u64 = 1 << 30;
const MQ: u64 = 1;
const CONFIG: u64 = 1 << 9;

/// Answers SET_OWNER and GET_FEATURES with `features`.
fn greet(s: &mut UnixStream, features: u64) {
    assert_eq!(recv(s).0, SET_OWNER);
    assert_eq!(recv(s).0, GET_FEATURES);
    reply(s, GET_FEATURES, &features.to_le_bytes());
}

/// Answers the protocol-feature exchange with `proto`.
fn protocol(s: &mut UnixStream, proto: u64) {
    assert_eq!(recv(s).0, GET_PROTOCOL_FEATURES);
    reply(s, GET_PROTOCOL_FEATURES, &proto.to_le_bytes());
    assert_eq!(recv(s).0, SET_PROTOCOL_FEATURES);
}

fn connect_err(f: Fake, queues: usize, config: u16) -> String {
    let r = VhostUserDevice::connect("x", &f.path, info(queues), config);
    f.thread.join().unwrap();
    match r {
        Ok(_) => panic!("the hostile back end was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_legacy_back_end_is_refused() {
    let f = fake(|mut s| greet(&mut s, 0));
    assert!(connect_err(f, 1, 0).contains("VIRTIO_F_VERSION_1"));
}

#[test]
fn a_back_end_that_hangs_up_mid_negotiation_is_an_error() {
    let f = fake(|mut s| {
        assert_eq!(recv(&mut s).0, SET_OWNER);
        assert_eq!(recv(&mut s).0, GET_FEATURES);
    });
    let e = connect_err(f, 1, 0);
    assert!(e.contains("GET_FEATURES"), "{e}");
}

#[test]
fn a_reply_to_another_request_or_of_the_wrong_size_is_an_error() {
    let f = fake(|mut s| {
        assert_eq!(recv(&mut s).0, SET_OWNER);
        assert_eq!(recv(&mut s).0, GET_FEATURES);
        reply(&mut s, GET_QUEUE_NUM, &VIRTIO_F_VERSION_1.to_le_bytes());
    });
    assert!(connect_err(f, 1, 0).contains("GET_FEATURES"));
    let f = fake(|mut s| {
        assert_eq!(recv(&mut s).0, SET_OWNER);
        assert_eq!(recv(&mut s).0, GET_FEATURES);
        reply(&mut s, GET_FEATURES, &[1, 2, 3]);
    });
    assert!(connect_err(f, 1, 0).contains("GET_FEATURES"));
}

#[test]
fn a_back_end_with_fewer_queues_than_the_file_is_refused() {
    let f = fake(|mut s| {
        greet(&mut s, VIRTIO_F_VERSION_1 | PROTOCOL);
        protocol(&mut s, MQ);
        assert_eq!(recv(&mut s).0, GET_QUEUE_NUM);
        reply(&mut s, GET_QUEUE_NUM, &1u64.to_le_bytes());
    });
    let e = connect_err(f, 2, 0);
    assert!(
        e.contains("at most 1 queues") && e.contains("asks for 2"),
        "{e}"
    );
}

#[test]
fn a_configuration_space_of_another_size_is_refused_with_the_key_to_set() {
    let f = fake(|mut s| {
        greet(&mut s, VIRTIO_F_VERSION_1 | PROTOCOL);
        protocol(&mut s, CONFIG);
        let (req, _, body) = recv(&mut s);
        assert_eq!(req, GET_CONFIG);
        // offset, size, flags, then the payload: answer 4 bytes fewer.
        let mut r = body[..12].to_vec();
        r[4..8].copy_from_slice(&56u32.to_le_bytes());
        r.extend(vec![0u8; 56]);
        reply(&mut s, GET_CONFIG, &r);
    });
    let e = connect_err(f, 1, 60);
    assert!(
        e.contains("GET_CONFIG of 60 bytes") && e.contains("config_size"),
        "{e}"
    );
}

#[test]
fn a_back_end_that_stops_answering_is_given_up_on() {
    let f = fake(|mut s| {
        assert_eq!(recv(&mut s).0, SET_OWNER);
        assert_eq!(recv(&mut s).0, GET_FEATURES);
        // Silence, longer than the front end waits.
        std::thread::sleep(super::frontend::REPLY_TIMEOUT + Duration::from_secs(1));
    });
    let t = Instant::now();
    let e = connect_err(f, 1, 0);
    assert!(e.contains("GET_FEATURES"), "{e}");
    assert!(t.elapsed() < super::frontend::REPLY_TIMEOUT + Duration::from_secs(3));
}

#[test]
fn nothing_listening_is_a_connect_error_that_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let e = VhostUserDevice::connect("x", &dir.path().join("none.sock"), info(1), 0).unwrap_err();
    assert!(matches!(e, FrontendError::Connect { .. }) && e.not_listening());
}

/// A back end that dies after the device started: DEVICE_NEEDS_RESET with the reason, and the
/// next activation fails at once (no hang, no panic).
#[test]
fn a_back_end_that_hangs_up_while_running_asks_for_a_reset() {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let f = fake(move |mut s| {
        greet(&mut s, VIRTIO_F_VERSION_1);
        // Take the start messages up to the last one, SET_VRING_KICK (no REPLY_ACK: nothing
        // to answer), then hang up when told.
        while recv(&mut s).0 != 12 {}
        let _ = rx.recv();
        drop(s);
    });
    let mut dev = VhostUserDevice::connect("x", &f.path, info(1), 0).unwrap();
    let mem = shared_mem();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let resets = Arc::new(Resets::default());
    let act = |resets: &Arc<Resets>| Activation {
        mem: mem.clone(),
        features: VIRTIO_F_VERSION_1,
        queues: vec![ActiveQueue {
            index: 0,
            queue: vq.create_queue().unwrap(),
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            irq: Arc::new(Count::default()),
        }],
        config_irq: Arc::new(Count::default()),
        needs_reset: resets.clone(),
    };
    dev.activate(act(&resets)).unwrap();
    tx.send(()).unwrap();
    f.thread.join().unwrap();
    wait_for("DEVICE_NEEDS_RESET", Duration::from_secs(10), || {
        !resets.taken().is_empty()
    });
    assert!(
        resets.taken()[0].contains("closed the connection"),
        "{:?}",
        resets.taken()
    );
    dev.reset();
    wait_for("the reset", Duration::from_secs(10), || dev.quiesced());
    let e = dev.activate(act(&resets)).unwrap_err();
    assert!(e.to_string().contains("closed the connection"), "{e}");
}

/// Private guest RAM cannot be shared: the start fails with the reason, before any message.
#[test]
fn private_guest_ram_fails_the_start_with_the_reason() {
    let f = fake(|mut s| greet(&mut s, VIRTIO_F_VERSION_1));
    let mut dev = VhostUserDevice::connect("x", &f.path, info(1), 0).unwrap();
    f.thread.join().unwrap();
    let mem: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let e = dev
        .activate(Activation {
            mem: mem.clone(),
            features: VIRTIO_F_VERSION_1,
            queues: vec![ActiveQueue {
                index: 0,
                queue: vq.create_queue().unwrap(),
                kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                irq: Arc::new(Count::default()),
            }],
            config_irq: Arc::new(Count::default()),
            needs_reset: Arc::new(Resets::default()),
        })
        .unwrap_err();
    assert!(e.to_string().contains("--private-ram"), "{e}");
}

/// Driver writes of the configuration space change what it reads, stay within it, and are
/// bounded however many there are.
#[test]
fn configuration_writes_are_kept_within_the_space() {
    let f = fake(|mut s| {
        greet(&mut s, VIRTIO_F_VERSION_1 | PROTOCOL);
        protocol(&mut s, CONFIG);
        let (_, _, body) = recv(&mut s);
        let mut r = body[..12].to_vec();
        r.extend([7u8; 8]);
        reply(&mut s, GET_CONFIG, &r);
    });
    let mut dev = VhostUserDevice::connect("x", &f.path, info(1), 8).unwrap();
    f.thread.join().unwrap();
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(b, [7; 8]);
    dev.write_config(2, &[1, 2]);
    dev.write_config(7, &[9, 9]); // past the end: dropped
    dev.write_config(u64::MAX, &[1]);
    for _ in 0..10_000 {
        dev.write_config(0, &[3]);
    }
    dev.read_config(0, &mut b);
    assert_eq!(b, [3, 7, 1, 2, 7, 7, 7, 7]);
}
