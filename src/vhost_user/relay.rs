//! A message relay between a vhost-user front end and vmm's backend daemon that holds back
//! VHOST_USER_SET_VRING_ENABLE requests sent before VHOST_USER_SET_FEATURES until then.
//!
//! Why: QEMU's virtio-net enables its vhost-user rings as soon as the guest driver negotiates
//! features (`peer_attach` → SET_VRING_ENABLE), which is before QEMU acks any feature to the
//! backend (SET_FEATURES comes at DRIVER_OK). The vhost-user specification allows the request
//! only once VHOST_USER_F_PROTOCOL_FEATURES is negotiated, and the vhost crate enforces that by
//! dropping the connection; without protocol features QEMU refuses to start vhost-user net.
//! QEMU does not repeat the request after SET_FEATURES, so the relay keeps the last state asked
//! for each ring and passes it on right after SET_FEATURES. QEMU waits for a reply to each
//! early request; the relay answers it (success) itself. Used for net only.
//!
//! Messages are a 12-byte header (request, flags, payload size: little-endian u32s), the
//! payload, and file descriptors passed with the header (SCM_RIGHTS). The front-to-back
//! direction is parsed message by message; the back-to-front direction is copied as it comes,
//! file descriptors included.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::sync::{Mutex, Rank};

/// VHOST_USER_SET_FEATURES.
pub const SET_FEATURES: u32 = 2;
/// VHOST_USER_SET_VRING_ENABLE.
pub const SET_VRING_ENABLE: u32 = 18;
/// Header flag: the sender waits for a reply (REPLY_ACK).
const NEED_REPLY: u32 = 0x8;
/// Header flag: this is a reply; and the protocol version (1).
const REPLY_V1: u32 = 0x4 | 0x1;
/// Largest payload a message may have (the vhost-user maximum is 4 KiB; room for more).
const MAX_PAYLOAD: usize = 64 * 1024;
/// Most file descriptors one message carries.
const MAX_FDS: usize = 32;

/// Receives up to `buf.len()` bytes and the file descriptors sent with them.
fn recv(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<File>)> {
    let mut fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec points into `buf`, which outlives the call and may hold any bytes.
    let (n, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: recvmsg gave us these descriptors; each is wrapped once and closed on drop.
    let files = fds[..nfds]
        .iter()
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    Ok((n, files))
}

/// Sends all of `data`, the descriptors with the first byte.
fn send(sock: &UnixStream, data: &[u8], files: &[File]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = if fds.is_empty() || data.is_empty() {
        0
    } else {
        sock.send_with_fds(&[data], &fds)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?
    };
    let mut w = sock;
    while sent < data.len() {
        sent += w.write(&data[sent..])?;
    }
    Ok(())
}

/// One message from the front end.
struct Message {
    request: u32,
    flags: u32,
    bytes: Vec<u8>,
    files: Vec<File>,
}

/// Reads the next message; None at end of stream.
fn read_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut hdr = [0u8; 12];
    let (n, files) = recv(sock, &mut hdr)?;
    if n == 0 {
        return Ok(None);
    }
    let mut r = sock;
    r.read_exact(&mut hdr[n..])?;
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let size = word(8) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message with a {size}-byte payload"),
        ));
    }
    let mut bytes = vec![0u8; 12 + size];
    bytes[..12].copy_from_slice(&hdr);
    r.read_exact(&mut bytes[12..])?;
    Ok(Some(Message {
        request: word(0),
        flags: word(4),
        bytes,
        files,
    }))
}

/// A SET_VRING_ENABLE request for ring `index`, as the relay sends it (no reply wanted).
fn enable_message(index: u32, num: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(20);
    m.extend(SET_VRING_ENABLE.to_le_bytes());
    m.extend(1u32.to_le_bytes());
    m.extend(8u32.to_le_bytes());
    m.extend(index.to_le_bytes());
    m.extend(num.to_le_bytes());
    m
}

/// Front end → backend. SET_VRING_ENABLE requests that come before SET_FEATURES are held back
/// (the last state asked for each ring is kept) and sent right after SET_FEATURES, when the
/// backend may take them. A held-back request that waits for a reply gets a success ack; that
/// is safe to interleave with the backend's replies because a front end waiting for an ack has
/// nothing else outstanding.
fn forward_requests(
    front: &Mutex<UnixStream>,
    back: &UnixStream,
    src: &UnixStream,
    queues: u32,
) -> io::Result<()> {
    let mut features_set = false;
    let mut held: std::collections::BTreeMap<u32, u32> = Default::default();
    while let Some(m) = read_message(src)? {
        if m.request == SET_VRING_ENABLE && !features_set {
            let word = |i: usize| {
                m.bytes
                    .get(i..i + 4)
                    .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            };
            let (index, num) = (word(12), word(16));
            // The front end chooses the index: only the device's rings are kept, so the
            // held-back state is bounded by the queue count.
            if index >= queues {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("SET_VRING_ENABLE for ring {index}; the device has {queues}"),
                ));
            }
            log::debug!(
                "vhost-user: SET_VRING_ENABLE {index}={num} before SET_FEATURES: held back"
            );
            held.insert(index, num);
            if m.flags & NEED_REPLY != 0 {
                let mut ack = Vec::with_capacity(20);
                ack.extend(SET_VRING_ENABLE.to_le_bytes());
                ack.extend(REPLY_V1.to_le_bytes());
                ack.extend(8u32.to_le_bytes());
                ack.extend(0u64.to_le_bytes());
                let f = front.lock();
                send(&f, &ack, &[])?;
            }
            continue;
        }
        log::trace!(
            "vhost-user relay: request {} flags {:#x} ({} bytes, {} fds)",
            m.request,
            m.flags,
            m.bytes.len(),
            m.files.len()
        );
        send(back, &m.bytes, &m.files)?;
        if m.request == SET_FEATURES && !features_set {
            features_set = true;
            for (index, num) in std::mem::take(&mut held) {
                send(back, &enable_message(index, num), &[])?;
            }
        }
    }
    Ok(())
}

/// Backend → front end, as it comes.
fn forward_replies(back: &UnixStream, front: &Mutex<UnixStream>) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let (n, files) = recv(back, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        log::trace!("vhost-user relay: {n} bytes back ({} fds)", files.len());
        let f = front.lock();
        send(&f, &buf[..n], &files)?;
    }
}

/// Relays between `front` (the VMM's connection) and `back` (the daemon's) for a device with
/// `queues` rings, until either side closes; then shuts both down so the other side sees the
/// end too.
pub fn run(front: UnixStream, back: UnixStream, queues: u32) -> io::Result<()> {
    let reader = front.try_clone()?;
    let front = Arc::new(Mutex::new(Rank::Leaf, front));
    let (f2, b2) = (front.clone(), back.try_clone()?);
    let shut = |f: &Mutex<UnixStream>, b: &UnixStream| {
        let _ = f.lock().shutdown(std::net::Shutdown::Both);
        let _ = b.shutdown(std::net::Shutdown::Both);
    };
    let replies = std::thread::Builder::new()
        .name("vhost-user-relay".into())
        .spawn(move || {
            let r = forward_replies(&b2, &f2);
            shut(&f2, &b2);
            r
        })?;
    let r = forward_requests(&front, &back, &reader, queues);
    shut(&front, &back);
    let r2 = replies
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("relay thread panicked")));
    r.and(r2)
}

#[cfg(test)]
mod tests {
    use super::*;
    fn msg(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend(request.to_le_bytes());
        m.extend(flags.to_le_bytes());
        m.extend((payload.len() as u32).to_le_bytes());
        m.extend(payload);
        m
    }

    fn ring(index: u32, num: u32) -> Vec<u8> {
        [index.to_le_bytes(), num.to_le_bytes()].concat()
    }

    #[test]
    fn early_enables_wait_for_set_features_the_rest_passes_with_fds() {
        let (vmm_side, front) = UnixStream::pair().unwrap();
        let (back, daemon_side) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || run(front, back, 2));

        let get_features = msg(1, 1, &[]);
        let set_features = msg(SET_FEATURES, 1, &1u64.to_le_bytes());
        let kick = msg(12, 1, &0u64.to_le_bytes());
        let late_enable = msg(SET_VRING_ENABLE, 1, &ring(1, 1));
        let f = tempfile::tempfile().unwrap();
        // Early: ring 0 off then on, ring 1 on; the last one waits for an ack.
        send(&vmm_side, &msg(SET_VRING_ENABLE, 1, &ring(0, 0)), &[]).unwrap();
        send(&vmm_side, &msg(SET_VRING_ENABLE, 1, &ring(0, 1)), &[]).unwrap();
        send(
            &vmm_side,
            &msg(SET_VRING_ENABLE, 1 | NEED_REPLY, &ring(1, 1)),
            &[],
        )
        .unwrap();
        let mut ack = vec![0u8; 20];
        (&vmm_side).read_exact(&mut ack).unwrap();
        assert_eq!(ack, msg(SET_VRING_ENABLE, 5, &0u64.to_le_bytes()));
        send(&vmm_side, &get_features, &[]).unwrap();
        send(&vmm_side, &set_features, &[]).unwrap();
        send(&vmm_side, &kick, &[f.try_clone().unwrap()]).unwrap();
        send(&vmm_side, &late_enable, &[]).unwrap();

        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(read_message(&daemon_side).unwrap().unwrap());
        }
        let bytes: Vec<&[u8]> = seen.iter().map(|m| &m.bytes[..]).collect();
        assert_eq!(
            bytes,
            [
                &get_features[..],
                &set_features,
                &enable_message(0, 1),
                &enable_message(1, 1),
                &kick,
                &late_enable
            ]
        );
        // The kick's eventfd arrived: the same open file.
        use std::os::unix::fs::MetadataExt;
        assert_eq!(seen[4].files.len(), 1);
        let (a, b) = (f.metadata().unwrap(), seen[4].files[0].metadata().unwrap());
        assert_eq!((a.ino(), a.dev()), (b.ino(), b.dev()));
        assert!(
            seen.iter()
                .enumerate()
                .all(|(i, m)| i == 4 || m.files.is_empty())
        );

        // Replies come back unchanged.
        let reply = msg(1, 5, &7u64.to_le_bytes());
        send(&daemon_side, &reply, &[]).unwrap();
        let mut got = vec![0u8; reply.len()];
        (&vmm_side).read_exact(&mut got).unwrap();
        assert_eq!(got, reply);

        // The front end hangs up: the daemon sees the end, the relay returns.
        drop(vmm_side);
        assert!(read_message(&daemon_side).unwrap().is_none());
        relay.join().unwrap().unwrap();
    }

    /// A front end sending early enables for rings the device does not have (each index once,
    /// as many as it likes) is cut off at the first: nothing it sends makes the relay grow.
    #[test]
    fn early_enables_of_rings_the_device_lacks_end_the_relay() {
        let (vmm_side, front) = UnixStream::pair().unwrap();
        let (back, daemon_side) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || run(front, back, 2));
        send(&vmm_side, &msg(SET_VRING_ENABLE, 1, &ring(1, 1)), &[]).unwrap();
        for i in 2..10_000u32 {
            if send(&vmm_side, &msg(SET_VRING_ENABLE, 1, &ring(i, 1)), &[]).is_err() {
                break;
            }
        }
        let e = relay.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("ring 2; the device has 2"), "{e}");
        assert!(read_message(&daemon_side).unwrap().is_none());
    }

    #[test]
    fn oversized_messages_end_the_relay() {
        let (vmm_side, front) = UnixStream::pair().unwrap();
        let (back, daemon_side) = UnixStream::pair().unwrap();
        let relay = std::thread::spawn(move || run(front, back, 2));
        let mut m = msg(5, 1, &[]);
        m[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
        send(&vmm_side, &m, &[]).unwrap();
        assert!(relay.join().unwrap().is_err());
        assert!(read_message(&daemon_side).unwrap().is_none());
    }
}
