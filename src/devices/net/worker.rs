//! The worker thread of a virtio-net device: one epoll loop over the two queue notifications,
//! the TAP and the stop event. It runs the transmit and receive paths, notifies the driver
//! after each batch, stops reading the TAP while the guest has no receive buffers, and turns a
//! vanished TAP into a down link instead of an error.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_queue::QueueT;

use super::{NetState, RxOffloads, RxStop, TxStop, VIRTIO_NET_S_LINK_UP, rx, tx};
use crate::hw::Irq;
use crate::hw::virtio::{
    ActivateError, Activation, ActiveQueue, GuestMem, NeedsReset, STOP_TOKEN, Worker, WorkerHandle,
    drain, notify,
};

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const TAP_TOKEN: u64 = 2;
/// Chains (or reads) per batch before the interrupt and a look at the stop event.
const BUDGET: usize = 256;
/// Batches per wake-up before going back to epoll.
const ROUNDS: usize = 4;
/// Pause after a TAP read error that is not a host fault.
const RX_RETRY: std::time::Duration = std::time::Duration::from_millis(10);

/// Starts the worker of a device whose host side is `tap` (a TAP, or in tests any packet fd).
pub fn spawn_worker<T: AsFd + Send + Sync + 'static>(
    tap: Arc<T>,
    name: String,
    a: Activation,
    state: Arc<NetState>,
) -> Result<WorkerHandle, ActivateError> {
    let n = a.queues.len();
    let mut queues = a.queues.into_iter();
    let (Some(rx), Some(tx), None) = (queues.next(), queues.next(), queues.next()) else {
        return Err(ActivateError(format!(
            "virtio-net needs its receive and transmit queues enabled ({n} of 2 are)"
        )));
    };
    let worker = NetWorker {
        tap,
        name,
        mem: a.mem,
        rx,
        tx,
        offloads: RxOffloads::from_features(a.features),
        state,
        config_irq: a.config_irq,
        needs_reset: a.needs_reset,
        tap_polled: false,
        rx_retry: None,
        rx_broken: false,
        tx_broken: false,
    };
    WorkerHandle::spawn(
        &super::SECCOMP,
        "virtio-net".into(),
        move |stop| match Worker::new(stop) {
            Ok(ep) => worker.run(&ep),
            Err(e) => log::error!("TAP {}: cannot start the device loop: {e}", worker.name),
        },
    )
}

/// The state of one running device: its queues and the TAP.
struct NetWorker<T> {
    tap: Arc<T>,
    name: String,
    mem: GuestMem,
    rx: ActiveQueue,
    tx: ActiveQueue,
    offloads: RxOffloads,
    state: Arc<NetState>,
    config_irq: Arc<dyn Irq>,
    needs_reset: Arc<dyn NeedsReset>,
    /// Whether the TAP is in the epoll set (not while the guest has no receive buffers).
    tap_polled: bool,
    /// After a read error that may heal: when to read the TAP again.
    rx_retry: Option<std::time::Instant>,
    rx_broken: bool,
    tx_broken: bool,
}

/// An error the fd reports without reading it (POLLERR: a deleted TAP; POLLHUP: a closed peer).
fn fd_error(fd: BorrowedFd<'_>) -> Option<io::Error> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd on our stack, timeout 0.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    if r == 1 && p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
        Some(io::Error::other("the interface reports an error"))
    } else {
        None
    }
}

impl<T: AsFd> NetWorker<T> {
    fn run(mut self, ep: &Worker) {
        if let Err(e) = ep
            .add(self.rx.kick.as_raw_fd(), RX_TOKEN)
            .and_then(|()| ep.add(self.tx.kick.as_raw_fd(), TX_TOKEN))
        {
            log::error!("TAP {}: cannot wait for notifications: {e}", self.name);
            return;
        }
        self.start_polling_tap(ep);
        // Whatever the driver queued before the worker started.
        let mut tx_pending = true;
        self.process_rx(ep);
        loop {
            let timeout = match self.rx_retry {
                _ if tx_pending => 0,
                Some(at) => at
                    .saturating_duration_since(std::time::Instant::now())
                    .as_millis() as i32,
                None => -1,
            };
            let events = ep.wait(timeout);
            if events.contains(&STOP_TOKEN) {
                return;
            }
            let mut rx_ready = false;
            if self
                .rx_retry
                .is_some_and(|at| std::time::Instant::now() >= at)
            {
                self.rx_retry = None;
                self.start_polling_tap(ep);
                rx_ready = true;
            }
            for t in events {
                match t {
                    RX_TOKEN => {
                        drain(&self.rx.kick);
                        // New receive buffers: read the TAP again.
                        self.start_polling_tap(ep);
                        rx_ready = true;
                    }
                    TX_TOKEN => {
                        drain(&self.tx.kick);
                        tx_pending = true;
                    }
                    TAP_TOKEN => rx_ready = true,
                    _ => {}
                }
            }
            if tx_pending {
                tx_pending = self.process_tx(ep);
            }
            if rx_ready {
                self.process_rx(ep);
            }
        }
    }

    fn start_polling_tap(&mut self, ep: &Worker) {
        if self.tap_polled || self.rx_broken || self.state.faulted() || self.rx_retry.is_some() {
            return;
        }
        match ep.add(self.tap.as_fd().as_raw_fd(), TAP_TOKEN) {
            Ok(()) => self.tap_polled = true,
            Err(e) => log::error!("TAP {}: cannot wait on it: {e}", self.name),
        }
    }

    fn stop_polling_tap(&mut self, ep: &Worker) {
        if self.tap_polled {
            let _ = ep.remove(self.tap.as_fd().as_raw_fd());
            self.tap_polled = false;
        }
    }

    /// The TAP is gone: link down (configuration interrupt), no more reads; transmit chains
    /// are completed and dropped from now on.
    fn fault(&mut self, ep: &Worker, e: &io::Error) {
        self.stop_polling_tap(ep);
        if self.state.faulted.swap(true, Ordering::SeqCst) {
            return;
        }
        log::warn!(
            "TAP {}: {e}; the guest's link is down and its packets are dropped (was the \
             interface deleted?)",
            self.name
        );
        self.state
            .status
            .fetch_and(!VIRTIO_NET_S_LINK_UP, Ordering::SeqCst);
        self.config_irq.trigger();
    }

    /// Handles transmit chains; true if some may be left (come back without waiting).
    fn process_tx(&mut self, ep: &Worker) -> bool {
        if self.tx_broken {
            return false;
        }
        let _ = self.tx.queue.disable_notification(&self.mem);
        for _ in 0..ROUNDS {
            let tap = (!self.state.faulted()).then(|| self.tap.as_fd());
            let o = tx(&mut self.tx.queue, &self.mem, tap, BUDGET);
            self.state.stats.add_tx(&o);
            if let Some(why) = o.last_bad {
                log::debug!("TAP {}: dropped a bad transmit chain: {why:?}", self.name);
            }
            if o.used > 0 {
                notify(&mut self.tx.queue, &self.mem, self.tx.irq.as_ref());
            }
            match o.stop {
                // The rest of the chains are dropped in the next round.
                TxStop::Fault(e) => self.fault(ep, &e),
                TxStop::RingError(why) => {
                    self.needs_reset.needs_reset(&why);
                    self.tx_broken = true;
                    return false;
                }
                TxStop::Budget => {}
                // With EVENT_IDX this also asks for the next kick; re-check what came meanwhile.
                TxStop::Empty => match self.tx.queue.enable_notification(&self.mem) {
                    Ok(true) => {}
                    Ok(false) | Err(_) => return false,
                },
            }
        }
        true
    }

    /// Moves packets from the TAP to the guest while both have some.
    fn process_rx(&mut self, ep: &Worker) {
        if self.rx_broken || self.state.faulted() {
            return;
        }
        for _ in 0..ROUNDS {
            let o = rx(
                &mut self.rx.queue,
                &self.mem,
                self.tap.as_fd(),
                self.offloads,
                BUDGET,
            );
            self.state.stats.add_rx(&o);
            if let Some(why) = o.last_bad {
                log::debug!("TAP {}: dropped a bad receive chain: {why:?}", self.name);
            }
            if o.used > 0 {
                notify(&mut self.rx.queue, &self.mem, self.rx.irq.as_ref());
            }
            match o.stop {
                // The TAP stays readable (level-triggered) if packets are left.
                RxStop::Drained | RxStop::Budget => return,
                RxStop::Fault(e) => return self.fault(ep, &e),
                RxStop::Error(e) => {
                    // Not a deleted interface: the link stays up and the TAP is read again
                    // after a pause (level-triggered polling would spin on the error).
                    self.state.stats.rx_errors.fetch_add(1, Ordering::Relaxed);
                    log::warn!(
                        "TAP {}: read failed: {e}; reading again in {RX_RETRY:?}",
                        self.name
                    );
                    self.stop_polling_tap(ep);
                    self.rx_retry = Some(std::time::Instant::now() + RX_RETRY);
                    return;
                }
                RxStop::RingError(why) => {
                    self.needs_reset.needs_reset(&why);
                    self.rx_broken = true;
                    return self.stop_polling_tap(ep);
                }
                RxStop::NoBuffers => match self.rx.queue.enable_notification(&self.mem) {
                    // Buffers arrived meanwhile.
                    Ok(true) => {}
                    Ok(false) | Err(_) => break,
                },
            }
        }
        // No receive buffers: leave the TAP alone until the guest kicks the receive queue.
        self.stop_polling_tap(ep);
        if let Some(e) = fd_error(self.tap.as_fd()) {
            self.fault(ep, &e);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::net::testing::*;

    #[test]
    fn worker_moves_packets_and_survives_a_dead_host_end() {
        let m = mem();
        let rxq = MockSplitQueue::new(&m, 256);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 256);
        let (a, drv) = activation(&m, &rxq, &txq);
        let (dev, host) = packet_pair();
        let state = NetState::new();
        let mut w = spawn_worker(Arc::new(dev), "fake0".into(), a, state.clone()).unwrap();

        // Transmit.
        let pkt = header_and(60);
        m.write_slice(&pkt, GuestAddress(BUF)).unwrap();
        txq.add_desc_chains(&[desc(BUF, 72, 0)], 0).unwrap();
        drv.tx_kick.write(1).unwrap();
        wait_until("the frame is sent", || txq.used().idx().load() == 1);
        assert_eq!(recv(&host).unwrap(), pkt);

        // Receive: a packet that waits for a buffer, then the buffer.
        send(&host, &header_and(100));
        std::thread::sleep(Duration::from_millis(20));
        rxq.add_desc_chains(&[desc(BUF + 0x1000, 1526, WRITE)], 0)
            .unwrap();
        drv.rx_kick.write(1).unwrap();
        wait_until("the frame is received", || rxq.used().idx().load() == 1);
        let e = rxq.used().ring().ref_at(0).unwrap().load();
        assert_eq!((e.id(), e.len()), (0, 112));
        assert_eq!(state.stats.rx_packets.load(Ordering::SeqCst), 1);

        // The host end goes away: noticed at the next transmit.
        drop(host);
        txq.add_desc_chains(&[desc(BUF, 72, 0)], 1).unwrap();
        drv.tx_kick.write(1).unwrap();
        wait_until("the link goes down", || !state.link_up());
        assert_eq!(drv.config.get(), 1);
        assert!(state.faulted());
        wait_until("the chain is completed", || txq.used().idx().load() == 2);
        // Later chains are completed and dropped, the device keeps going.
        txq.add_desc_chains(&[desc(BUF, 72, 0)], 2).unwrap();
        drv.tx_kick.write(1).unwrap();
        wait_until("the next chain is completed", || {
            txq.used().idx().load() == 3
        });
        assert_eq!(state.stats.tx_dropped.load(Ordering::SeqCst), 2);
        assert_eq!(drv.config.get(), 1, "one configuration interrupt");
        assert!(drv.resets.0.lock().unwrap().is_empty());
        w.stop();
    }

    #[test]
    fn worker_notices_a_dead_host_end_while_idle() {
        let m = mem();
        let rxq = MockSplitQueue::new(&m, 256);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 256);
        rxq.add_desc_chains(&[desc(BUF, 1526, WRITE)], 0).unwrap();
        let (a, drv) = activation(&m, &rxq, &txq);
        let (dev, host) = packet_pair();
        let state = NetState::new();
        let mut w = spawn_worker(Arc::new(dev), "fake0".into(), a, state.clone()).unwrap();
        drop(host);
        wait_until("the link goes down", || !state.link_up());
        assert_eq!(drv.config.get(), 1);
        // The receive buffer stays the guest's.
        assert_eq!(rxq.used().idx().load(), 0);
        w.stop();
    }

    #[test]
    fn worker_asks_for_a_reset_on_a_broken_ring() {
        let m = mem();
        let rxq = MockSplitQueue::new(&m, 256);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 256);
        let (a, drv) = activation(&m, &rxq, &txq);
        let (dev, host) = packet_pair();
        let state = NetState::new();
        let mut w = spawn_worker(Arc::new(dev), "fake0".into(), a, state.clone()).unwrap();
        txq.avail().idx().store(5000);
        drv.tx_kick.write(1).unwrap();
        wait_until("a reset is requested", || {
            !drv.resets.0.lock().unwrap().is_empty()
        });
        // Further kicks are ignored, not spun on.
        drv.tx_kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(drv.resets.0.lock().unwrap().len(), 1);
        assert_eq!(recv(&host), None);
        assert!(state.link_up());
        w.stop();
    }

    /// A TAP read that fails for a reason other than a deleted interface (here EISDIR: the
    /// "TAP" is a directory) is tried again after a pause: the link stays up, the receive
    /// buffer stays the guest's, nothing spins. It once took the link down for good.
    #[test]
    fn a_read_error_that_may_heal_keeps_the_link_up() {
        let m = mem();
        let rxq = MockSplitQueue::new(&m, 256);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 256);
        rxq.add_desc_chains(&[desc(BUF, 1526, WRITE)], 0).unwrap();
        let (a, drv) = activation(&m, &rxq, &txq);
        let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
        let state = NetState::new();
        let mut w = spawn_worker(Arc::new(dir), "fake0".into(), a, state.clone()).unwrap();
        wait_until("a few retries", || {
            state.stats.rx_errors.load(Ordering::SeqCst) >= 3
        });
        let errors = state.stats.rx_errors.load(Ordering::SeqCst);
        assert!(state.link_up() && !state.faulted());
        assert_eq!(drv.config.get(), 0);
        assert_eq!(rxq.used().idx().load(), 0, "the buffer stays the guest's");
        // Paced, not spinning: about one try per pause.
        std::thread::sleep(Duration::from_millis(100));
        let more = state.stats.rx_errors.load(Ordering::SeqCst) - errors;
        assert!(more <= 20, "{more} tries in 100 ms");
        w.stop();
    }

    #[test]
    fn activation_needs_both_queues() {
        let m = mem();
        let rxq = MockSplitQueue::new(&m, 256);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 256);
        let (mut a, _drv) = activation(&m, &rxq, &txq);
        a.queues.truncate(1);
        let (dev, _host) = packet_pair();
        let Err(e) = spawn_worker(Arc::new(dev), "fake0".into(), a, NetState::new()) else {
            panic!("started with one queue");
        };
        assert!(e.0.contains("1 of 2"), "{e}");
    }
}
