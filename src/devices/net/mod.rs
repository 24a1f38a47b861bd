//! virtio-net: a network device backed by a host TAP interface (virtio 1.2 section 5.1).
//!
//! Guest driver: Linux `virtio_net` (ethN). Hot-pluggable into the machine's hotplug slots.
//!
//! One receive queue (0) and one transmit queue (1), no control queue, no multiqueue. The host
//! side is a TAP interface with 12-byte virtio-net headers, the same layout the guest uses, so
//! checksum and TCP segmentation offloads pass through unchanged in both directions.
//!
//! | file        | what                                                                 |
//! |-------------|----------------------------------------------------------------------|
//! | `mod.rs`    | the spec, the device model (features, config space, activation)      |
//! | `tap.rs`    | opening/creating the TAP, its ioctls                                  |
//! | `chain.rs`  | header constants, descriptor chains to host iovecs (shared by rx/tx) |
//! | `tx.rs`     | transmitq → TAP, generic over the guest memory                       |
//! | `rx.rs`     | TAP → receiveq, generic over the guest memory                        |
//! | `worker.rs` | the worker thread (epoll, notifications, host faults)                |
//!
//! `tx` and `rx` take a queue, guest memory and the TAP fd only, so a vhost-user backend can
//! serve the same device. If the TAP goes away under a running VM, the link goes down (config
//! interrupt) and the device keeps completing transmit chains; it never panics.

mod chain;
mod rx;
mod served;
mod tap;
#[cfg(test)]
mod testing;
mod tx;
mod worker;

pub use chain::{
    BadChain, MAX_FRAME_LEN, MAX_SEGMENTS, MAX_TX_LEN, VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VNET_HDR_LEN, is_host_fault,
};
pub use rx::{RxOffloads, RxOutcome, RxStop, fix_rx_header, rx};
pub use served::NetModel;
pub use tap::{TUN_PATH, Tap};
pub use tx::{TxOutcome, TxStop, tx};
pub use worker::spawn_worker;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::contract::check::DeviceCheck;
use crate::contract::units::{DeviceName, MacAddr, PciSlot};
use crate::contract::{
    DeviceError, DeviceKindInfo, DeviceSpec, KindInfo, Needs, ServedInfo, VirtioInfo,
};
use crate::devices::Device;
use crate::hw::served::Served;

/// What a virtio network device is: type 1, receiveq and transmitq (no control queue, no
/// multiqueue), PCI class network controller.
pub const VIRTIO: VirtioInfo = VirtioInfo {
    device_type: 1,
    queue_sizes: std::borrow::Cow::Borrowed(&[QUEUE_SIZE, QUEUE_SIZE]),
    pci_class: (0x02, 0x00),
};

/// A virtio network device on a host TAP interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    /// Unique device name; a running VM's NICs are matched by it across edits.
    pub name: DeviceName,
    /// Host TAP interface, e.g. "tap0": opened if it exists, created if not.
    #[schemars(regex(pattern = r"^[A-Za-z0-9_.-]{1,15}$"))]
    #[schemars(extend("x-invalid" = "is not a TAP interface name"))]
    #[schemars(extend("x-help" = "TAP names have 1–15 characters: letters, digits, `_`, `.` and `-`"))]
    pub tap: String,
    /// Guest MAC address; derived from the machine and device names when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// PCI slot on bus 0; a free hotplug slot (else static slot) when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<PciSlot>,
}

impl NetSpec {
    /// The MAC the guest sees: the configured one, or one derived from `machine/name`.
    pub fn effective_mac(&self, machine: &str) -> MacAddr {
        self.mac
            .unwrap_or_else(|| MacAddr::derived(&format!("{machine}/{}", self.name)))
    }
}

/// The worker's system calls beyond the worker base: frames to and from the TAP (and its
/// offloads, which a served NIC sets from its worker).
pub const SECCOMP: crate::sandbox::Allow = crate::sandbox::Allow {
    kind: "net worker",
    calls: &[
        crate::sandbox::call!(SYS_readv),
        crate::sandbox::call!(SYS_writev),
        crate::sandbox::call!(
            SYS_ioctl,
            1,
            &[
                crate::sandbox::ioctl::TUNSETOFFLOAD,
                crate::sandbox::ioctl::TUNSETVNETHDRSZ
            ]
        ),
    ],
    // Activation and reset set the TAP's offloads to what the driver accepted.
    on_vcpu: &[crate::sandbox::call!(
        SYS_ioctl,
        1,
        &[crate::sandbox::ioctl::TUNSETOFFLOAD]
    )],
};

impl DeviceKindInfo for NetSpec {
    const INFO: KindInfo = KindInfo {
        key: "net",
        noun: "NIC",
        hotpluggable: true,
        max_count: None,
        aliases: &["nic", "nics", "network", "netdev", "tap"],
        platform: &[],
        vhost_user: Some(ServedInfo {
            front_end: "QEMU: -netdev vhost-user with -device virtio-net-pci",
            front_end_keys: &["mac"],
            defaults: &[],
        }),
        seccomp: &SECCOMP,
    };
}

impl DeviceSpec for NetSpec {
    fn info(&self) -> &'static KindInfo {
        &Self::INFO
    }
    fn name(&self) -> &str {
        self.name.as_str()
    }
    fn slot(&self) -> Option<PciSlot> {
        self.slot
    }
    fn needs(&self) -> Needs {
        Needs::VirtioPci(VIRTIO)
    }
    fn check(&self, cx: &mut dyn DeviceCheck) {
        cx.claim(
            "TAP interface",
            self.tap.clone(),
            "tap",
            "give each NIC its own TAP",
        );
        let mac = self.effective_mac(cx.machine_name());
        if let Some(m) = self.mac {
            if m.is_multicast() {
                cx.error("mac", format!("MAC {m} is a multicast address"))
                    .help("the first byte must be even; locally administered unicast MACs start with 02");
            } else if m.0 == [0; 6] {
                cx.error(
                    "mac",
                    "MAC 00:00:00:00:00:00 is not a usable address".into(),
                );
            }
        }
        let (field, help) = if self.mac.is_some() {
            ("mac", "remove `mac` to get one derived from the name")
        } else {
            ("name", "set `mac` explicitly on one of them")
        };
        cx.claim("MAC", mac.to_string(), field, help);
    }
    fn describe(&self, machine: &str) -> Vec<(&'static str, String)> {
        vec![
            ("tap", self.tap.clone()),
            ("mac", self.effective_mac(machine).to_string()),
        ]
    }
}

impl Device for NetSpec {
    fn build(
        &self,
        at: &crate::contract::Placement,
        m: &mut dyn crate::hw::Machine,
    ) -> Result<(), DeviceError> {
        let mac = self.effective_mac(m.machine_name());
        let dev = Net::new(&self.tap, mac.0)?;
        crate::hw::transport::virtio_pci::plug(self.name.as_str(), Box::new(dev), at, m)
    }
    /// The MAC address and link status are the front end's (QEMU's `-device
    /// virtio-net-pci,mac=`); `mac` is not used.
    fn served(&self, _base: &std::path::Path) -> Option<Result<Box<dyn Served>, DeviceError>> {
        Some(
            NetModel::open(&self.tap)
                .map(|m| Box::new(m) as Box<dyn Served>)
                .map_err(|e| DeviceError(e.to_string())),
        )
    }
}

// ---- The device model -----------------------------------------------------------------------

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};

use crate::hw::virtio::{
    ActivateError, Activation, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1, VirtioDevice, WorkerSlot, read_config_bytes,
};

// Feature bits (virtio 1.2 section 5.1.3).
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
/// Not offered: every receive chain holds one whole packet.
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;

/// Config `status` bit: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// What the device offers. The offloads are pass-through: the TAP speaks the same 12-byte
/// header, transmit GSO/checksum requests go to the host kernel unchanged, and the TAP hands us
/// offloaded frames only for what the driver accepted (TUNSETOFFLOAD at activation).
pub const FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_F_RING_EVENT_IDX
    | VIRTIO_F_RING_INDIRECT_DESC
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_STATUS
    | VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;

/// Counters of one device since it was built.
#[derive(Debug, Default)]
pub struct NetStats {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Packets larger than the guest's receive buffer, dropped.
    pub rx_too_big: AtomicU64,
    /// Packets with offloads the driver did not accept, dropped.
    pub rx_dropped: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Packets the TAP refused or that were dropped after a host fault.
    pub tx_dropped: AtomicU64,
    /// Malformed descriptor chains on either queue.
    pub bad_chains: AtomicU64,
    /// TAP reads that failed but not for good (the TAP was read again later).
    pub rx_errors: AtomicU64,
}

impl NetStats {
    pub(crate) fn add_tx(&self, o: &TxOutcome) {
        self.tx_packets.fetch_add(o.packets, Ordering::Relaxed);
        self.tx_bytes.fetch_add(o.bytes, Ordering::Relaxed);
        self.tx_dropped.fetch_add(o.dropped, Ordering::Relaxed);
        self.bad_chains.fetch_add(o.bad_chains, Ordering::Relaxed);
    }

    pub(crate) fn add_rx(&self, o: &RxOutcome) {
        self.rx_packets.fetch_add(o.packets, Ordering::Relaxed);
        self.rx_bytes.fetch_add(o.bytes, Ordering::Relaxed);
        self.rx_too_big.fetch_add(o.too_big, Ordering::Relaxed);
        self.rx_dropped.fetch_add(o.dropped, Ordering::Relaxed);
        self.bad_chains.fetch_add(o.bad_chains, Ordering::Relaxed);
    }
}

/// What the device shares with its worker; outlives resets.
#[derive(Debug)]
pub struct NetState {
    /// Config `status`.
    pub(crate) status: AtomicU16,
    /// The TAP failed for good (the warning was logged).
    pub(crate) faulted: AtomicBool,
    pub stats: NetStats,
}

impl NetState {
    pub fn new() -> Arc<NetState> {
        Arc::new(NetState {
            status: AtomicU16::new(VIRTIO_NET_S_LINK_UP),
            faulted: AtomicBool::new(false),
            stats: NetStats::default(),
        })
    }

    pub fn link_up(&self) -> bool {
        self.status.load(Ordering::SeqCst) & VIRTIO_NET_S_LINK_UP != 0
    }

    /// Whether the TAP failed (deleted interface): the link stays down for good.
    pub fn faulted(&self) -> bool {
        self.faulted.load(Ordering::SeqCst)
    }
}

/// The virtio-net device on a TAP interface.
#[derive(Debug)]
pub struct Net {
    tap: Arc<Tap>,
    mac: [u8; 6],
    state: Arc<NetState>,
    worker: WorkerSlot,
}

impl Net {
    /// Opens (or creates) TAP `tap` for a NIC with MAC `mac`.
    pub fn new(tap: &str, mac: [u8; 6]) -> Result<Net, DeviceError> {
        Ok(Net::with_tap(Tap::open(tap)?, mac))
    }

    pub fn with_tap(tap: Tap, mac: [u8; 6]) -> Net {
        Net {
            tap: Arc::new(tap),
            mac,
            state: NetState::new(),
            worker: WorkerSlot::default(),
        }
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    pub fn state(&self) -> &Arc<NetState> {
        &self.state
    }

    /// The virtio_net_config bytes: mac, status.
    pub fn config(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        c[6..].copy_from_slice(&self.state.status.load(Ordering::SeqCst).to_le_bytes());
        c
    }
}

impl VirtioDevice for Net {
    fn virtio(&self) -> &'static VirtioInfo {
        &VIRTIO
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let offloads = RxOffloads::from_features(a.features);
        // Fewer receive offloads are always safe: the TAP then hands over plain frames.
        if !self.state.faulted()
            && let Err(e) = self.tap.set_offload(offloads.tun_flags())
        {
            log::warn!("TAP {}: cannot set offloads: {e}", self.tap.name());
        }
        let name = self.tap.name().to_string();
        let w = spawn_worker(self.tap.clone(), name, a, self.state.clone())?;
        self.worker.start(w);
        Ok(())
    }
    fn quiesced(&mut self) -> bool {
        self.worker.quiesced()
    }
    fn reset(&mut self) {
        self.worker.reset();
        // The TAP stays open for the next driver; no offloaded frames until it negotiates.
        if !self.state.faulted() {
            let _ = self.tap.set_offload(0);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Stop the worker before the TAP closes (the worker holds the last other reference).
        self.worker.stop_all();
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::path::PathBuf;

    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    use super::testing::*;
    use super::*;
    use crate::hw::virtio::GuestMem;

    #[test]
    fn features_and_config() {
        assert_eq!(FEATURES & VIRTIO_NET_F_MRG_RXBUF, 0);
        // Every transmit offload needs VIRTIO_NET_F_CSUM, every receive one GUEST_CSUM.
        assert_ne!(FEATURES & VIRTIO_NET_F_CSUM, 0);
        assert_ne!(FEATURES & VIRTIO_NET_F_GUEST_CSUM, 0);
        assert_eq!(FEATURES & (1 << 17), 0, "no control queue");
        assert_eq!(FEATURES & (1 << 22), 0, "no multiqueue");
    }

    // ---- On a real TAP (needs /dev/net/tun and CAP_NET_ADMIN) ----

    /// Whether TAP tests can run here; says loudly when they cannot.
    fn tun_usable(test: &str) -> bool {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(TUN_PATH)
        {
            Ok(_) => true,
            Err(e) => {
                eprintln!("SKIPPED {test}: cannot open {TUN_PATH}: {e}");
                false
            }
        }
    }

    fn sys(name: &str) -> PathBuf {
        PathBuf::from("/sys/class/net").join(name)
    }

    fn is_up(name: &str) -> bool {
        let flags = std::fs::read_to_string(sys(name).join("flags")).unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        flags & libc::IFF_UP as u32 != 0
    }

    /// A TAP name unique to this test run.
    fn tap_name(tag: &str) -> String {
        format!("vmt{}{tag}", std::process::id() % 100_000)
    }

    fn set_persist(tap: &Tap, on: bool) {
        // SAFETY: TUNSETPERSIST takes its argument by value; the fd is the TAP's.
        let r = unsafe {
            libc::ioctl(
                tap.as_raw_fd(),
                libc::TUNSETPERSIST as _,
                libc::c_ulong::from(on),
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
    }

    #[test]
    fn real_tap_is_created_up_and_removed_with_the_device() {
        if !tun_usable("real_tap_is_created_up_and_removed_with_the_device") {
            return;
        }
        let name = tap_name("c");
        assert!(!sys(&name).exists(), "{name} exists before the test");
        let net = Net::new(&name, [2, 0, 0, 0, 0, 1]).unwrap();
        assert!(net.tap().created());
        assert!(sys(&name).exists());
        assert!(is_up(&name), "{name} is not up");
        let mut c = [0u8; 8];
        net.read_config(0, &mut c);
        assert_eq!(c, [2, 0, 0, 0, 0, 1, 1, 0], "mac, then status = link up");
        drop(net);
        wait_until("the TAP is gone", || !sys(&name).exists());
    }

    #[test]
    fn real_tap_that_exists_is_attached_and_kept() {
        if !tun_usable("real_tap_that_exists_is_attached_and_kept") {
            return;
        }
        let name = tap_name("e");
        let tap = Tap::open(&name).unwrap();
        set_persist(&tap, true);
        drop(tap);
        let net = Net::new(&name, [2, 0, 0, 0, 0, 2]).unwrap();
        assert!(!net.tap().created());
        drop(net);
        assert!(sys(&name).exists(), "a TAP vmm did not create stays");
        let tap = Tap::open(&name).unwrap();
        set_persist(&tap, false);
        drop(tap);
        wait_until("the TAP is gone", || !sys(&name).exists());
    }

    #[test]
    fn real_interfaces_that_are_not_taps_are_refused() {
        if !tun_usable("real_interfaces_that_are_not_taps_are_refused") {
            return;
        }
        let Err(e) = Net::new("lo", [2, 0, 0, 0, 0, 3]) else {
            panic!("lo opened as a TAP");
        };
        assert!(
            e.0.contains("TAP lo") && e.0.contains("not a single-queue TAP"),
            "{e}"
        );
    }

    /// An AF_PACKET socket on interface `name` for EtherType `proto`, non-blocking.
    fn packet_socket(name: &str, proto: u16) -> OwnedFd {
        let ifindex: i32 = std::fs::read_to_string(sys(name).join("ifindex"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: plain socket(2); checked below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(proto.to_be()),
            )
        };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        // SAFETY: a fresh fd we own.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; zero is valid.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto.to_be();
        sa.sll_ifindex = ifindex;
        // SAFETY: binds to an address on our stack of the size given.
        let r = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        sock
    }

    #[test]
    fn real_tap_carries_frames_both_ways() {
        let test = "real_tap_carries_frames_both_ways";
        if !tun_usable(test) {
            return;
        }
        const ETHERTYPE: u16 = 0x88b5; // local experimental
        let name = tap_name("t");
        let mac = [2, 0, 0, 0, 0, 5];
        let mut net = Net::new(&name, mac).unwrap();
        let host = packet_socket(&name, ETHERTYPE);
        let m = mem();
        let rxq = MockSplitQueue::new(&m, 256);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 256);
        let rxbuf = |i: u16| 0x100000 + u64::from(i) * 0x800;
        for i in 0..64u16 {
            rxq.add_desc_chains(&[desc(rxbuf(i), 1526, WRITE)], i)
                .unwrap();
        }
        let (a, drv) = activation(&m, &rxq, &txq);
        net.activate(a).unwrap();
        let frame = |src: [u8; 6], tag: u8| -> Vec<u8> {
            let mut f = vec![0xff; 6];
            f.extend(src);
            f.extend(ETHERTYPE.to_be_bytes());
            f.extend((0..100).map(|i| i ^ tag));
            f
        };

        // Guest to host: header + frame in, the bare frame out on the interface.
        let out = frame(mac, 0x5a);
        m.write_slice(
            &[vec![0u8; VNET_HDR_LEN], out.clone()].concat(),
            GuestAddress(BUF),
        )
        .unwrap();
        txq.add_desc_chains(&[desc(BUF, (VNET_HDR_LEN + out.len()) as u32, 0)], 0)
            .unwrap();
        drv.tx_kick.write(1).unwrap();
        wait_until("the host sees the guest's frame", || {
            recv(&host).is_some_and(|f| f == out)
        });

        // Host to guest: a frame sent out of the interface lands in a receive buffer.
        let inbound = frame([2, 0, 0, 0, 0, 6], 0xa5);
        send(&host, &inbound);
        let found = |m: &GuestMem| {
            (0..rxq.used().idx().load()).any(|i| {
                let e = rxq.used().ring().ref_at(i as usize).unwrap().load();
                let mut b = vec![0u8; e.len() as usize];
                m.read_slice(&mut b, GuestAddress(rxbuf(e.id() as u16)))
                    .unwrap();
                b.len() == VNET_HDR_LEN + inbound.len()
                    && b[VNET_HDR_LEN..] == inbound[..]
                    && b[10..12] == [1, 0]
            })
        };
        wait_until("the guest receives the host's frame", || found(&m));
        assert!(net.state().link_up());
        net.reset();
    }

    #[test]
    fn real_tap_deleted_under_a_running_device_takes_the_link_down() {
        let test = "real_tap_deleted_under_a_running_device_takes_the_link_down";
        if !tun_usable(test) {
            return;
        }
        let name = tap_name("d");
        let mut net = Net::new(&name, [2, 0, 0, 0, 0, 4]).unwrap();
        let m = mem();
        let rxq = MockSplitQueue::new(&m, 256);
        let txq = MockSplitQueue::create(&m, GuestAddress(TXQ), 256);
        // Plenty of receive buffers (the host may send IPv6 neighbour discovery), so the
        // worker keeps watching the TAP.
        for i in 0..64u16 {
            rxq.add_desc_chains(&[desc(0x100000 + u64::from(i) * 0x800, 1526, WRITE)], i)
                .unwrap();
        }
        let (a, drv) = activation(&m, &rxq, &txq);
        net.activate(a).unwrap();
        let deleted = std::process::Command::new("ip")
            .args(["link", "del", &name])
            .status();
        if !deleted.as_ref().is_ok_and(|s| s.success()) {
            eprintln!("SKIPPED {test}: `ip link del {name}` failed: {deleted:?}");
            return;
        }
        wait_until("the link goes down", || !net.state().link_up());
        assert_eq!(drv.config.get(), 1);
        let mut c = [0u8; 8];
        net.read_config(6, &mut c[..2]);
        assert_eq!(c[..2], [0, 0], "status: link down");
        // Transmit chains are completed and dropped.
        m.write_slice(&header_and(60), GuestAddress(BUF)).unwrap();
        txq.add_desc_chains(&[desc(BUF, 72, 0)], 0).unwrap();
        drv.tx_kick.write(1).unwrap();
        wait_until("the chain is completed", || txq.used().idx().load() == 1);
        // A driver reset and a new activation keep the link down without panicking.
        net.reset();
        let (a, _drv) = activation(&m, &rxq, &txq);
        net.activate(a).unwrap();
        assert!(!net.state().link_up());
        net.reset();
    }
}
