//! `vmm device net --socket S --tap NAME`: virtio-net on a host TAP as a vhost-user backend
//! (QEMU: `-netdev vhost-user,chardev=…` with `-device virtio-net-pci`).
//!
//! The receive and transmit paths are `devices::net::{rx, tx}`, the ones the in-VMM device
//! runs. The TAP is an extra event source of the daemon's loop, watched only while the guest
//! has receive buffers (the TAP is level-triggered: unwatched, a packet waits in the kernel
//! instead of spinning the loop). The MAC address and link status are the front end's (QEMU's
//! virtio-net owns the configuration space); the backend offers the offloads and rings.

use crate::sync::{Mutex, Rank};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use virtio_queue::QueueT;

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use super::{
    FEATURES, NetState, RX_QUEUE, RxOffloads, RxStop, TX_QUEUE, Tap, TxStop, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_STATUS, rx, tx,
};
use crate::hw::served::{Ctx, Listeners, Served, signal};

/// Event number of the TAP in the daemon's loop (above the two queues and the exit event).
const TAP_EVENT: u16 = 3;
/// Chains per batch; the loop comes back while more are waiting.
const BUDGET: usize = 256;

/// The served virtio-net device.
#[derive(Debug)]
pub struct NetModel {
    tap: Tap,
    state: std::sync::Arc<NetState>,
    offloads: Mutex<RxOffloads>,
    /// Whether the TAP is in the event loop.
    tap_watched: AtomicBool,
    /// The front end broke a queue: not served until a reset.
    rx_broken: AtomicBool,
    tx_broken: AtomicBool,
}

impl NetModel {
    /// Opens (or creates) TAP `name`.
    pub fn open(name: &str) -> Result<NetModel, crate::devices::DeviceError> {
        // Tap::open logs whether it opened or created the interface.
        let tap = Tap::open(name)?;
        // No offloaded frames until the front end says what the driver accepted.
        let _ = tap.set_offload(0);
        Ok(NetModel {
            tap,
            state: NetState::new(),
            offloads: Mutex::new(Rank::Leaf, RxOffloads::default()),
            tap_watched: AtomicBool::new(false),
            rx_broken: AtomicBool::new(false),
            tx_broken: AtomicBool::new(false),
        })
    }

    fn watch_tap(&self, l: &dyn Listeners, on: bool) {
        if self.tap_watched.swap(on, Ordering::SeqCst) == on {
            return;
        }
        let fd = self.tap.as_raw_fd();
        let r = if on {
            l.add(fd, TAP_EVENT)
        } else {
            l.remove(fd, TAP_EVENT)
        };
        if let Err(e) = r {
            log::error!("TAP {}: cannot (un)watch it: {e}", self.tap.name());
            self.tap_watched.store(!on, Ordering::SeqCst);
        }
    }

    /// The TAP failed for good (deleted interface): stop reading it; transmit chains are
    /// completed and dropped from now on.
    fn fault(&self, l: &dyn Listeners, e: &std::io::Error) {
        self.watch_tap(l, false);
        if !self.state.faulted.swap(true, Ordering::SeqCst) {
            log::warn!(
                "TAP {}: {e}; the guest's packets are dropped from now on (was the interface deleted?)",
                self.tap.name()
            );
        }
    }

    /// TAP → receive queue while both have something.
    fn receive(&self, cx: &Ctx<'_>) -> std::io::Result<()> {
        if self.rx_broken.load(Ordering::SeqCst) || self.state.faulted() {
            return Ok(());
        }
        let Some(mut v) = cx.vring(RX_QUEUE) else {
            return Ok(());
        };
        if !v.get_queue().ready() || !v.is_enabled() {
            // Watched again at the next kick of an enabled queue.
            self.watch_tap(cx.listeners, false);
            return Ok(());
        }
        let offloads = *self.offloads.lock();
        loop {
            let before = v.get_queue().next_avail();
            let o = rx(
                v.get_queue_mut(),
                cx.mem,
                self.tap.as_fd(),
                offloads,
                BUDGET,
            );
            self.state.stats.add_rx(&o);
            if o.used > 0 {
                signal(&mut v)?;
            }
            match o.stop {
                // Level-triggered: packets left make the TAP readable again.
                RxStop::Drained | RxStop::Budget => return Ok(()),
                RxStop::Fault(e) => {
                    self.fault(cx.listeners, &e);
                    return Ok(());
                }
                RxStop::Error(e) => {
                    // May heal: the link stays up; the TAP is watched again at the next kick
                    // (watching it now would spin on the error).
                    self.state.stats.rx_errors.fetch_add(1, Ordering::Relaxed);
                    log::warn!(
                        "vhost-user net: TAP read failed: {e}; reading again at the next kick"
                    );
                    self.watch_tap(cx.listeners, false);
                    return Ok(());
                }
                RxStop::RingError(why) => {
                    log::warn!("vhost-user net: {why}; receive queue not served until a reset");
                    self.rx_broken.store(true, Ordering::SeqCst);
                    self.watch_tap(cx.listeners, false);
                    return Ok(());
                }
                RxStop::NoBuffers => match v.enable_notification() {
                    // More is announced, yet nothing could be taken (an available ring that
                    // does not read): wait for the next kick instead of spinning.
                    Ok(true) if v.get_queue().next_avail() == before => {
                        self.watch_tap(cx.listeners, false);
                        return Ok(());
                    }
                    Ok(true) => {} // buffers arrived meanwhile
                    Ok(false) | Err(_) => {
                        self.watch_tap(cx.listeners, false);
                        return Ok(());
                    }
                },
            }
        }
    }

    /// Transmit queue → TAP until the queue is empty.
    fn transmit(&self, cx: &Ctx<'_>) -> std::io::Result<()> {
        if self.tx_broken.load(Ordering::SeqCst) {
            return Ok(());
        }
        let Some(mut v) = cx.vring(TX_QUEUE) else {
            return Ok(());
        };
        loop {
            let _ = v.disable_notification();
            let before = v.get_queue().next_avail();
            let tap = (!self.state.faulted()).then(|| self.tap.as_fd());
            let o = tx(v.get_queue_mut(), cx.mem, tap, BUDGET);
            self.state.stats.add_tx(&o);
            if o.used > 0 {
                signal(&mut v)?;
            }
            match o.stop {
                TxStop::Fault(e) => self.fault(cx.listeners, &e),
                TxStop::RingError(why) => {
                    log::warn!("vhost-user net: {why}; transmit queue not served until a reset");
                    self.tx_broken.store(true, Ordering::SeqCst);
                    return Ok(());
                }
                TxStop::Budget => {}
                TxStop::Empty => match v.enable_notification() {
                    // Announced but not takeable (see `receive`): wait for the next kick.
                    Ok(true) if v.get_queue().next_avail() == before => return Ok(()),
                    Ok(true) => {}
                    Ok(false) | Err(_) => return Ok(()),
                },
            }
        }
    }
}

impl Served for NetModel {
    fn virtio(&self) -> &'static crate::contract::VirtioInfo {
        &super::VIRTIO
    }
    fn features(&self) -> u64 {
        // MAC and STATUS live in the front end's configuration space.
        FEATURES & !(VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS)
    }
    /// None: QEMU owns the configuration space of a vhost-user NIC, and without REPLY_ACK a
    /// request the relay drops owes the front end no reply.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::empty()
    }
    /// QEMU's virtio-net enables the rings before it acks features (see `relay`).
    fn relay_early_enables(&self) -> bool {
        true
    }
    fn acked_features(&self, features: u64) {
        let o = RxOffloads::from_features(features);
        *self.offloads.lock() = o;
        // Fewer receive offloads are always safe: the TAP then hands over plain frames.
        if !self.state.faulted()
            && let Err(e) = self.tap.set_offload(o.tun_flags())
        {
            log::warn!("TAP {}: cannot set offloads: {e}", self.tap.name());
        }
    }
    fn handle(&self, event: u16, cx: &Ctx<'_>) -> std::io::Result<()> {
        match event {
            e if usize::from(e) == RX_QUEUE => {
                // New receive buffers: read the TAP again.
                if !self.state.faulted() && !self.rx_broken.load(Ordering::SeqCst) {
                    self.watch_tap(cx.listeners, true);
                }
                self.receive(cx)
            }
            e if usize::from(e) == TX_QUEUE => self.transmit(cx),
            TAP_EVENT => self.receive(cx),
            _ => Ok(()),
        }
    }
    fn reset(&self) {
        self.rx_broken.store(false, Ordering::SeqCst);
        self.tx_broken.store(false, Ordering::SeqCst);
        *self.offloads.lock() = RxOffloads::default();
        if !self.state.faulted() {
            let _ = self.tap.set_offload(0);
        }
    }
}
