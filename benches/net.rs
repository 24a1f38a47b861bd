//! Network benchmark (`cargo bench --features testing --bench net`, needs root for the TAP): the virtio-net device
//! model's transmit and receive paths (`devices::net::{tx, rx}`) moving 1514-byte frames
//! between guest memory and a real TAP, with the host end an AF_PACKET socket on the TAP:
//!
//! - guest → host: transmit chains written to the TAP; counted as the host receives them;
//! - host → guest: frames the host sends out of the TAP, read into receive chains.
//!
//! `VMM_BENCH_SECS` per direction (default 3).

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::net::{RxOffloads, Tap, VNET_HDR_LEN, rx, tx};
use vmm::testing::{Ring, WRITE};

const QSIZE: u16 = 256;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const BUFS: u64 = 0x10000;
const BUF_LEN: u64 = 2048;
const FRAME: usize = 1514;
const ETHERTYPE: u16 = 0x88b5;

/// Makes `n` single-buffer chains available (descriptor i → buffer i).
fn offer(mem: &GuestMemoryMmap<()>, ring: &mut Ring, n: u16, len: u32, flags: u16) {
    let heads: Vec<u16> = (0..n)
        .map(|k| ring.avail_idx().wrapping_add(k) % QSIZE)
        .collect();
    for &i in &heads {
        ring.write_desc(mem, i, BUFS + u64::from(i) * BUF_LEN, len, flags, 0);
    }
    ring.offer(mem, &heads);
}

fn packet_socket(ifname: &str) -> OwnedFd {
    let ifindex: i32 = std::fs::read_to_string(format!("/sys/class/net/{ifname}/ifindex"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: plain socket(2), checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETHERTYPE.to_be()),
        )
    };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = ETHERTYPE.to_be();
    sa.sll_ifindex = ifindex;
    // SAFETY: binds to the address on our stack, of the size given.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    let tmo = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: setsockopt with a timeval of the right size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tmo as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    sock
}

fn frame() -> Vec<u8> {
    let mut f = vec![0xffu8; 6];
    f.extend([2, 0, 0, 0, 0, 9]);
    f.extend(ETHERTYPE.to_be_bytes());
    f.resize(FRAME, 0x5a);
    f
}

fn report(what: &str, frames: u64, elapsed: Duration) {
    let s = elapsed.as_secs_f64();
    println!(
        "| {what} | {:.0} frames/s | {:.2} Gbit/s |",
        frames as f64 / s,
        frames as f64 * FRAME as f64 * 8.0 / s / 1e9
    );
}

fn guest_to_host(tap: &Tap, host: &OwnedFd, secs: f64) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let mut hdr_and_frame = vec![0u8; VNET_HDR_LEN];
    hdr_and_frame.extend(frame());
    for i in 0..u64::from(QSIZE) {
        mem.write_slice(&hdr_and_frame, GuestAddress(BUFS + i * BUF_LEN))
            .unwrap();
    }
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (r2, s2) = (received.clone(), stop.clone());
    let host_fd = host.try_clone().unwrap();
    let counter = std::thread::spawn(move || {
        let mut buf = vec![0u8; 2048];
        while !s2.load(Ordering::Relaxed) {
            // SAFETY: recv into a buffer we own, of its length.
            let n =
                unsafe { libc::recv(host_fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n == FRAME as isize {
                r2.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let mut ring = Ring::new(&mem, QSIZE, DESC, AVAIL, USED);
    let mut q = ring.queue();
    let (t0, mut sent) = (Instant::now(), 0u64);
    while t0.elapsed().as_secs_f64() < secs {
        let free = QSIZE - ring.in_flight(&mem);
        offer(&mem, &mut ring, free, hdr_and_frame.len() as u32, 0);
        let o = tx(&mut q, &mem, Some(tap.as_fd()), 256);
        sent += o.packets;
    }
    let elapsed = t0.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    counter.join().unwrap();
    let got = received.load(Ordering::Relaxed);
    report(
        &format!("guest → host (model tx → TAP → host socket; {sent} sent)"),
        got,
        elapsed,
    );
}

fn host_to_guest(tap: &Tap, host: &OwnedFd, secs: f64) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let host_fd = host.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let f = frame();
        let mut n = 0u64;
        while !s2.load(Ordering::Relaxed) {
            // SAFETY: send from a buffer we own, of its length.
            let r = unsafe { libc::send(host_fd.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
            if r > 0 {
                n += 1;
            }
        }
        n
    });
    let mut ring = Ring::new(&mem, QSIZE, DESC, AVAIL, USED);
    let mut q = ring.queue();
    let offloads = RxOffloads::default();
    let (t0, mut got) = (Instant::now(), 0u64);
    while t0.elapsed().as_secs_f64() < secs {
        let free = QSIZE - ring.in_flight(&mem);
        offer(&mem, &mut ring, free, BUF_LEN as u32, WRITE);
        let o = rx(&mut q, &mem, tap.as_fd(), offloads, 256);
        got += o.packets;
        if o.packets == 0 {
            std::thread::yield_now();
        }
    }
    let elapsed = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().unwrap();
    report(
        &format!("host → guest (host socket → TAP → model rx; {sent} sent)"),
        got,
        elapsed,
    );
}

fn main() {
    let secs: f64 = std::env::var("VMM_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let name = format!("vmmb{}", std::process::id() % 100_000);
    let tap = match Tap::open(&name) {
        Ok(t) => t,
        Err(e) => {
            println!("net benchmark not run: cannot create a TAP ({e}); it needs root");
            return;
        }
    };
    let host = packet_socket(&name);
    println!("1514-byte frames, no offloads, one thread per side; TAP {name}");
    println!("| direction | frames/s | throughput |");
    println!("|---|---|---|");
    guest_to_host(&tap, &host, secs);
    host_to_guest(&tap, &host, secs);
}
