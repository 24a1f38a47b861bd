//! Request chains into the device models: block (a real image file), net transmit (to no
//! TAP) and receive (from a socket standing in for the TAP), console transmit and receive,
//! rng. Every byte of guest memory (descriptors, rings, headers, buffers) is the input's.
//! Oracle: no panic, no hang, and the used index never runs ahead of what was offered.
#![no_main]

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vmm::devices::block::{Disk, process};
use vmm::devices::net::{RxOffloads, rx, tx};

fn disk() -> &'static Disk {
    static D: OnceLock<(tempfile::NamedTempFile, Disk)> = OnceLock::new();
    &D.get_or_init(|| {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let d = Disk::open(f.path(), false, "FUZZ").unwrap();
        (f, d)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Some((&size, rest)) = rest.split_first() else {
        return;
    };
    let (mem, mut q) = vmm_fuzz::guest(rest, u16::from(size));
    let bound = match which % 6 {
        0 => {
            process(&mut q, &mem, disk(), 64);
            64
        }
        1 => {
            tx(&mut q, &mem, None, 64);
            64
        }
        2 => {
            let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
            a.set_nonblocking(true).unwrap();
            let frame_len = 14 + usize::from(size) * 4;
            let mut frame = vec![0u8; 12 + frame_len];
            for (i, x) in frame.iter_mut().enumerate() {
                *x = rest.get(i).copied().unwrap_or(0);
            }
            let _ = b.send(&frame);
            let _ = rx(
                &mut q,
                &mem,
                a.as_fd(),
                RxOffloads::from_features(u64::from(which) << 7),
                8,
            );
            8
        }
        3 => {
            let mut out = Vec::new();
            vmm::devices::console::transmit(&mut q, &mem, &mut out, 64);
            64
        }
        4 => {
            let mut pending: VecDeque<u8> = rest.iter().copied().take(4096).collect();
            vmm::devices::console::receive(&mut q, &mem, &mut pending);
            // One completion per chain the queue holds, at most a whole ring's worth.
            u16::MAX
        }
        _ => {
            vmm::devices::rng::fill(&mut q, &mem, None, 64);
            64
        }
    };
    // The used ring's index counts completions: never more than the budget allows.
    let used = q.next_used();
    assert!(used <= bound, "used index {used} over a budget of {bound}");
});
