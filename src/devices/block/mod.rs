//! virtio-blk: a block device backed by a raw image file (virtio 1.2 section 5.2).
//!
//! Guest driver: Linux `virtio_blk` (/dev/vdX). Hot-pluggable into the machine's hotplug slots.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::contract::check::DeviceCheck;
use crate::contract::units::{DeviceName, FilePath, PciSlot};
use crate::contract::{
    DeviceError, DeviceKindInfo, DeviceSpec, KindInfo, Needs, ServedInfo, VirtioInfo,
};
use crate::devices::Device;
use crate::hw::served::Served;

mod served;
pub use served::BlockModel;

/// What a virtio block device is: type 2, one request queue, PCI class mass storage.
pub const VIRTIO: VirtioInfo = VirtioInfo {
    device_type: 2,
    queue_sizes: std::borrow::Cow::Borrowed(&[QUEUE_SIZE]),
    pci_class: (0x01, 0x00),
};

/// A virtio block device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BlockSpec {
    /// Unique device name.
    pub name: DeviceName,
    /// Raw disk image on the host: a regular file or a block device (not mounted).
    /// Its size is the disk's size.
    pub path: FilePath,
    /// The guest may only read the disk; vmm opens the image read-only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub readonly: bool,
    /// Serial number (ID) the guest sees, up to 20 ASCII characters; the name when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 20))]
    pub serial: Option<String>,
    /// PCI slot on bus 0; a free hotplug slot (else static slot) when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<PciSlot>,
}

/// The worker's system calls beyond the worker base: vectored reads and writes at an offset,
/// flushes, discard and write-zeroes (fallocate).
pub const SECCOMP: crate::sandbox::Allow = crate::sandbox::Allow {
    kind: "block worker",
    calls: &[
        crate::sandbox::call!(SYS_preadv),
        crate::sandbox::call!(SYS_pwritev),
        crate::sandbox::call!(SYS_pread64),
        crate::sandbox::call!(SYS_pwrite64),
        crate::sandbox::call!(SYS_fdatasync),
        crate::sandbox::call!(SYS_fsync),
        crate::sandbox::call!(SYS_fallocate),
    ],
    on_vcpu: &[],
};

/// `vmm plan`'s note next to the removal of a disk from a running VM.
pub const DISK_UNPLUG_NOTE: &str = "unmount it in the guest first: Linux removes a disk that is still mounted, and what its file system had not written is lost";

impl DeviceKindInfo for BlockSpec {
    const INFO: KindInfo = KindInfo {
        key: "block",
        noun: "disk",
        // Plugged once the image is open and locked (a missing or locked image refuses the
        // plug); removed once the guest released it, which closes and unlocks the image.
        hotpluggable: true,
        max_count: None,
        aliases: &["disk", "disks", "drive", "drives"],
        platform: &[],
        vhost_user: Some(ServedInfo {
            front_end: "QEMU: -device vhost-user-blk-pci",
            front_end_keys: &[],
            defaults: &[],
        }),
        seccomp: &SECCOMP,
    };
}

impl DeviceSpec for BlockSpec {
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
        if let Some(file) = cx.disk_image("path", &self.path, !self.readonly) {
            cx.claim(
                "disk image",
                file.path.display().to_string(),
                "path",
                "give each disk its own image",
            );
            if file.len % 512 != 0 {
                cx.warning(
                    "path",
                    format!(
                        "disk image {} is {} bytes, not a multiple of 512: the guest cannot reach the last {} bytes",
                        file.path.display(),
                        file.len,
                        file.len % 512
                    ),
                );
            }
        }
        if let Some(s) = &self.serial
            && !s.chars().all(|c| c.is_ascii_graphic() || c == ' ')
        {
            cx.error("serial", "The serial number must be printable ASCII".into());
        }
    }
    fn unplug_note(&self) -> Option<&'static str> {
        Some(DISK_UNPLUG_NOTE)
    }
    fn describe(&self, _machine: &str) -> Vec<(&'static str, String)> {
        let mut v = vec![("path", self.path.to_string())];
        if self.readonly {
            v.push(("readonly", "true".into()));
        }
        v
    }
}

impl Device for BlockSpec {
    fn build(
        &self,
        at: &crate::contract::Placement,
        m: &mut dyn crate::hw::Machine,
    ) -> Result<(), DeviceError> {
        let path = self.path.resolve(m.base_dir());
        let id = self.serial.clone().unwrap_or_else(|| self.name.to_string());
        let disk = Disk::open(&path, self.readonly, &id).map_err(DeviceError)?;
        log::info!(
            "block `{}`: {} ({} sectors{})",
            self.name,
            path.display(),
            disk.sectors(),
            if self.readonly { ", read-only" } else { "" }
        );
        crate::hw::transport::virtio_pci::plug(
            self.name.as_str(),
            Box::new(Block::new(disk)),
            at,
            m,
        )
    }
    fn served(&self, base: &std::path::Path) -> Option<Result<Box<dyn Served>, DeviceError>> {
        let path = self.path.resolve(base);
        let id = self.serial.clone().unwrap_or_else(|| self.name.to_string());
        Some(
            Disk::open(&path, self.readonly, &id)
                .map(|d| Box::new(BlockModel::new(d)) as Box<dyn Served>)
                .map_err(DeviceError),
        )
    }
}

// ---- The device model -----------------------------------------------------------------------

use std::fs::File;
use std::os::fd::AsRawFd;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::hw::virtio::{
    ActivateError, Activation, BUDGET, STOP_TOKEN, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
    VirtioDevice, Worker, WorkerHandle, WorkerSlot, drain, read_config_bytes, serve_queue,
};

pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments per request (config seg_max); the queue size bounds chains anyway.
pub const SEG_MAX: u32 = 254;

// Features (virtio 1.2 section 5.2.3).
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

// Request types and status (section 5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
const WRITE_ZEROES_UNMAP: u32 = 1;
/// Most discard/write-zeroes segments per request.
const MAX_RANGE_SEGMENTS: u32 = 32;

/// A raw disk image, opened for the device's lifetime (and locked against a second user).
#[derive(Debug)]
pub struct Disk {
    pub file: File,
    /// Size in bytes, rounded down to whole sectors.
    pub size: u64,
    pub readonly: bool,
    pub id: [u8; VIRTIO_BLK_ID_BYTES],
    /// A flush failed since the last device reset: every FLUSH fails until the next one.
    /// After a failed fdatasync the kernel may have dropped the dirty pages it could not
    /// write, and a later fdatasync succeeds without them ("fsyncgate"); a guest told "flushed"
    /// then would believe data durable that is gone.
    flush_failed: std::sync::atomic::AtomicBool,
}

impl Disk {
    /// Opens `path` (a regular file or a block device, see [`crate::hostfile`]): read-write
    /// unless `readonly`, with an exclusive lock (shared when read-only) so two VMs cannot
    /// write one image.
    pub fn open(path: &std::path::Path, readonly: bool, id: &str) -> Result<Disk, String> {
        let opened =
            crate::hostfile::open_input(path, crate::hostfile::Use::Disk { write: !readonly })
                .map_err(|e| format!("disk image {} {e}", path.display()))?;
        let file = opened.file;
        // Locks QEMU and other vmm processes honour (src/image_lock.rs).
        if let Err(e) = crate::image_lock::lock(&file, !readonly) {
            return Err(format!(
                "disk image {} is in use by another process: {e}",
                path.display()
            ));
        }
        let len = opened.len;
        let mut idb = [0u8; VIRTIO_BLK_ID_BYTES];
        let n = id.len().min(VIRTIO_BLK_ID_BYTES);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Disk {
            file,
            size: len / SECTOR_SIZE * SECTOR_SIZE,
            readonly,
            id: idb,
            flush_failed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// The device was reset: the driver starts over, and FLUSH asks the disk again.
    pub fn reset(&self) {
        self.flush_failed
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// fdatasync, latched: once it failed, it fails until [`Disk::reset`].
    pub fn flush(&self) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if self.flush_failed.load(Ordering::SeqCst) {
            return Err(std::io::Error::other(
                "an earlier flush failed; data written before it may be lost",
            ));
        }
        self.file.sync_data().inspect_err(|_| {
            self.flush_failed.store(true, Ordering::SeqCst);
        })
    }
}

/// One request's pieces, validated against guest memory.
struct Request {
    kind: u32,
    sector: u64,
    /// Data segments as host (pointer, length), in chain order, and whether the device writes
    /// them (device-writable = guest reads).
    data: Vec<(*mut u8, usize, bool)>,
    status: GuestAddress,
}

/// Splits a descriptor chain into header, data and status. `None` when the chain cannot even
/// carry a status byte (it is returned with length 0).
fn parse<M: GuestMemory>(
    mem: &M,
    descs: &[(GuestAddress, u32, bool)],
) -> Option<Result<Request, GuestAddress>> {
    // The status is the last byte of the last writable descriptor.
    let &(last_addr, last_len, last_w) = descs.last()?;
    if !last_w || last_len == 0 {
        return None;
    }
    let status = last_addr.checked_add(u64::from(last_len) - 1)?;
    if !mem.check_range(status, 1, Permissions::Write) {
        return None;
    }
    // The header: the first 16 readable bytes (virtio_blk_outhdr: type, reserved, sector).
    let &(haddr, hlen, hw) = descs.first()?;
    if hw || hlen < 16 {
        return Some(Err(status));
    }
    let mut hdr = [0u8; 16];
    if read_guest(mem, haddr, &mut hdr).is_err() {
        return Some(Err(status));
    }
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or([0; 8]));
    let mut data = Vec::new();
    // Data: what lies between the header and the status byte.
    let mut segments: Vec<(GuestAddress, u64, bool)> = Vec::new();
    if hlen > 16 {
        segments.push((haddr.unchecked_add(16), u64::from(hlen) - 16, false));
    }
    for &(a, l, w) in &descs[1..descs.len() - 1] {
        segments.push((a, u64::from(l), w));
    }
    if last_len > 1 {
        segments.push((last_addr, u64::from(last_len) - 1, true));
    }
    for (a, l, w) in segments {
        if l == 0 {
            continue;
        }
        let perm = if w {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let Ok(iter) = mem.get_slices(a, l as usize, perm) else {
            return Some(Err(status));
        };
        for s in iter {
            let Ok(s) = s else { return Some(Err(status)) };
            data.push((s.ptr_guard_mut().as_ptr(), s.len(), w));
        }
    }
    Some(Ok(Request {
        kind,
        sector,
        data,
        status,
    }))
}

fn read_guest<M: GuestMemory>(mem: &M, addr: GuestAddress, buf: &mut [u8]) -> Result<(), ()> {
    let mut off = 0;
    let iter = mem
        .get_slices(addr, buf.len(), Permissions::Read)
        .map_err(|_| ())?;
    for s in iter {
        let s = s.map_err(|_| ())?;
        s.copy_to(&mut buf[off..off + s.len()]);
        off += s.len();
    }
    (off == buf.len()).then_some(()).ok_or(())
}

fn write_status<M: GuestMemory>(mem: &M, at: GuestAddress, status: u8) {
    if let Ok(mut it) = mem.get_slices(at, 1, Permissions::Write)
        && let Some(Ok(s)) = it.next()
    {
        let _ = s.write_obj(status, 0);
    }
}

/// Reads or writes `segs` at byte `offset` of the image with one preadv/pwritev loop.
fn transfer(
    disk: &Disk,
    offset: u64,
    segs: &[(*mut u8, usize, bool)],
    write: bool,
) -> std::io::Result<usize> {
    let mut iov: Vec<libc::iovec> = segs
        .iter()
        .map(|&(p, l, _)| libc::iovec {
            iov_base: p.cast(),
            iov_len: l,
        })
        .collect();
    let total: usize = segs.iter().map(|s| s.1).sum();
    let mut done = 0usize;
    let mut first = 0usize;
    while done < total {
        let off = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let cnt = (iov.len() - first).min(1024) as libc::c_int;
        // SAFETY: the iovecs point into guest memory validated by `parse` (mapped for the VM's
        // lifetime); the file descriptor is ours.
        let n = unsafe {
            if write {
                libc::pwritev(disk.file.as_raw_fd(), iov[first..].as_ptr(), cnt, off)
            } else {
                libc::preadv(disk.file.as_raw_fd(), iov[first..].as_mut_ptr(), cnt, off)
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            // Reading past the end of a file that shrank under us.
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        let mut n = n as usize;
        done += n;
        while n > 0 && first < iov.len() {
            if n >= iov[first].iov_len {
                n -= iov[first].iov_len;
                first += 1;
            } else {
                // SAFETY: advancing within the same iovec.
                iov[first].iov_base = unsafe { iov[first].iov_base.cast::<u8>().add(n).cast() };
                iov[first].iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(done)
}

/// Executes one request; returns (status, bytes written into the guest).
fn execute(disk: &Disk, r: &Request) -> (u8, u32) {
    let bytes: usize = r.data.iter().map(|s| s.1).sum();
    let writable = r.data.iter().all(|s| s.2);
    let readable = r.data.iter().all(|s| !s.2);
    let in_range = |len: u64| {
        r.sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|o| o.checked_add(len))
            .is_some_and(|end| end <= disk.size)
    };
    match r.kind {
        VIRTIO_BLK_T_IN => {
            if !writable || !(bytes as u64).is_multiple_of(SECTOR_SIZE) || !in_range(bytes as u64) {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            match transfer(disk, r.sector * SECTOR_SIZE, &r.data, false) {
                Ok(n) => (VIRTIO_BLK_S_OK, n as u32),
                Err(e) => {
                    log::warn!("virtio-blk read at sector {}: {e}", r.sector);
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            }
        }
        VIRTIO_BLK_T_OUT => {
            if disk.readonly
                || !readable
                || !(bytes as u64).is_multiple_of(SECTOR_SIZE)
                || !in_range(bytes as u64)
            {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            match transfer(disk, r.sector * SECTOR_SIZE, &r.data, true) {
                Ok(_) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    log::warn!("virtio-blk write at sector {}: {e}", r.sector);
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            if disk.readonly {
                return (VIRTIO_BLK_S_OK, 0);
            }
            match disk.flush() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    log::warn!("virtio-blk flush: {e}");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            }
        }
        VIRTIO_BLK_T_GET_ID if writable => (VIRTIO_BLK_S_OK, get_id(disk, r)),
        VIRTIO_BLK_T_GET_ID => (VIRTIO_BLK_S_IOERR, 0),
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if disk.readonly
                || !readable
                || !bytes.is_multiple_of(16)
                || bytes / 16 > MAX_RANGE_SEGMENTS as usize
            {
                return (VIRTIO_BLK_S_IOERR, 0);
            }
            let mut raw = Vec::with_capacity(bytes);
            for &(p, l, _) in &r.data {
                // SAFETY: `p` points to `l` readable bytes of guest memory validated by `parse`.
                raw.extend_from_slice(unsafe { std::slice::from_raw_parts(p, l) });
            }
            if raw.chunks_exact(16).all(|seg| range_op(disk, r.kind, seg)) {
                (VIRTIO_BLK_S_OK, 0)
            } else {
                (VIRTIO_BLK_S_IOERR, 0)
            }
        }
        _ => (VIRTIO_BLK_S_UNSUPP, 0),
    }
}

/// Copies the disk's id into the request's buffers; the bytes written.
fn get_id(disk: &Disk, r: &Request) -> u32 {
    let mut left = &disk.id[..];
    let mut n = 0u32;
    for &(p, l, _) in &r.data {
        let k = l.min(left.len());
        // SAFETY: `p` points to `l` writable bytes of guest memory validated by `parse`.
        unsafe { std::ptr::copy_nonoverlapping(left.as_ptr(), p, k) };
        left = &left[k..];
        n += k as u32;
    }
    n
}

/// One discard / write-zeroes segment (sector, count, flags); false when it fails or falls
/// outside the disk. A discard the file system cannot do is not an error (the data may stay).
fn range_op(disk: &Disk, kind: u32, seg: &[u8]) -> bool {
    let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
    let count = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
    let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
    let len = u64::from(count) * SECTOR_SIZE;
    let Some(off) = sector
        .checked_mul(SECTOR_SIZE)
        .filter(|o| o.checked_add(len).is_some_and(|e| e <= disk.size))
    else {
        return false;
    };
    let mode = if kind == VIRTIO_BLK_T_DISCARD || flags & WRITE_ZEROES_UNMAP != 0 {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    };
    // SAFETY: fallocate on our file with a range inside the image.
    let rc = unsafe {
        libc::fallocate(
            disk.file.as_raw_fd(),
            mode,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    // No hole punching here: write zeroes the slow way.
    rc == 0 || kind != VIRTIO_BLK_T_WRITE_ZEROES || zero_fill(disk, off, len).is_ok()
}

fn zero_fill(disk: &Disk, mut off: u64, mut len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = vec![0u8; 1 << 20];
    while len > 0 {
        let n = len.min(zeros.len() as u64) as usize;
        disk.file.write_all_at(&zeros[..n], off)?;
        off += n as u64;
        len -= n as u64;
    }
    Ok(())
}

/// Serves at most `budget` available requests of `queue`; returns how many were completed
/// (the caller notifies). A request the guest malformed gets an error status, or length 0 when
/// it has no room for one; nothing here trusts the guest.
pub fn process<M: GuestMemory>(queue: &mut Queue, mem: &M, disk: &Disk, budget: usize) -> usize {
    let mut used = 0;
    while used < budget
        && let Some(chain) = queue.pop_descriptor_chain(mem)
    {
        let head = chain.head_index();
        let descs: Vec<(GuestAddress, u32, bool)> = chain
            .map(|d| (d.addr(), d.len(), d.is_write_only()))
            .collect();
        let len = match parse(mem, &descs) {
            None => 0,
            Some(Err(status_at)) => {
                write_status(mem, status_at, VIRTIO_BLK_S_IOERR);
                1
            }
            Some(Ok(r)) => {
                let (status, n) = execute(disk, &r);
                write_status(mem, r.status, status);
                n + 1
            }
        };
        if queue.add_used(mem, head, len).is_err() {
            break;
        }
        used += 1;
    }
    used
}

/// The virtio_blk_config bytes for `disk` (section 5.2.4).
pub fn config_bytes(disk: &Disk) -> [u8; 60] {
    let mut c = [0u8; 60];
    c[0..8].copy_from_slice(&disk.sectors().to_le_bytes()); // capacity
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
    c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
    let sectors_max = u32::MAX / SECTOR_SIZE as u32;
    c[36..40].copy_from_slice(&sectors_max.to_le_bytes()); // max_discard_sectors
    c[40..44].copy_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes()); // max_discard_seg
    c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
    c[48..52].copy_from_slice(&sectors_max.to_le_bytes()); // max_write_zeroes_sectors
    c[52..56].copy_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

/// Features of a disk.
pub fn features(disk: &Disk) -> u64 {
    let mut f = VIRTIO_F_VERSION_1
        | VIRTIO_F_RING_EVENT_IDX
        | VIRTIO_BLK_F_SEG_MAX
        | VIRTIO_BLK_F_BLK_SIZE
        | VIRTIO_BLK_F_FLUSH;
    if disk.readonly {
        f |= VIRTIO_BLK_F_RO;
    } else {
        f |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
    }
    f
}

/// The virtio-blk device.
#[derive(Debug)]
pub struct Block {
    disk: std::sync::Arc<Disk>,
    config: [u8; 60],
    worker: WorkerSlot,
}

impl Block {
    pub fn new(disk: Disk) -> Block {
        Block {
            config: config_bytes(&disk),
            disk: std::sync::Arc::new(disk),
            worker: WorkerSlot::default(),
        }
    }
}

impl VirtioDevice for Block {
    fn virtio(&self) -> &'static VirtioInfo {
        &VIRTIO
    }
    fn features(&self) -> u64 {
        features(&self.disk)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let Some(q) = a.queues.into_iter().next() else {
            return Err(ActivateError("the request queue is not enabled".into()));
        };
        let (mem, disk, needs_reset) = (a.mem, self.disk.clone(), a.needs_reset);
        let w = WorkerHandle::spawn(&SECCOMP, "virtio-blk".into(), move |stop| {
            let Ok(w) = Worker::new(stop.clone()) else {
                return;
            };
            if w.add(q.kick.as_raw_fd(), 0).is_err() {
                return;
            }
            let (mut queue, kick, irq) = (q.queue, q.kick, q.irq);
            let mut broken = false;
            loop {
                if w.wait(-1).contains(&STOP_TOKEN) {
                    return;
                }
                drain(&kick);
                if broken {
                    continue;
                }
                let stopping = || stop.requested();
                if !serve_queue(&mut queue, &mem, irq.as_ref(), &stopping, |q| {
                    process(q, &mem, &disk, BUDGET) > 0
                }) {
                    needs_reset.needs_reset(
                        "the driver broke the request queue (available index or head out of range)",
                    );
                    broken = true;
                }
            }
        })?;
        self.worker.start(w);
        Ok(())
    }
    fn reset(&mut self) {
        self.worker.reset();
        self.disk.reset();
    }
    fn quiesced(&mut self) -> bool {
        self.worker.quiesced()
    }
}

#[cfg(test)]
mod tests;
