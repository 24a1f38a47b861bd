//! Guest RAM: host mappings for the graph's RAM regions, registered with KVM.
//!
//! By default the RAM is one memfd mapped shared, sealed against growing and shrinking: a
//! vhost-user back end (`[[vhost_user]]`) is handed its descriptor in SET_MEM_TABLE and maps
//! the same pages, and no back end can truncate it under vmm (a shrunk file would SIGBUS vmm
//! on the next guest access). `vmm up --private-ram` maps private anonymous memory instead
//! (no vhost-user devices then); docs/performance.md has the A/B of both.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::contract::units::human_size;
use crate::graph::DeviceGraph;

pub type GuestMem = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("Cannot map {size} of guest memory: {source}")]
    Map {
        size: String,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("Cannot create the {size} memfd for guest memory: {source}")]
    Memfd {
        size: String,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM refused guest memory region {slot} at {start:#x} ({size}): {source}")]
    Register {
        slot: u32,
        start: u64,
        size: String,
        #[source]
        source: kvm_ioctls::Error,
    },
}

static PRIVATE: AtomicBool = AtomicBool::new(false);

/// Whether guest RAM is private anonymous memory (`vmm up --private-ram`) rather than a shared
/// memfd; set once, before the VM is built.
pub fn set_private(private: bool) {
    PRIVATE.store(private, Ordering::Relaxed);
}

/// Whether guest RAM can be shared with a vhost-user back end.
pub fn shared() -> bool {
    !PRIVATE.load(Ordering::Relaxed)
}

/// A memfd of `len` bytes (zero-filled, populated on first touch), sealed so that nobody it is
/// handed to can resize it; close-on-exec.
fn sealed_memfd(len: u64) -> std::io::Result<File> {
    // SAFETY: a NUL-terminated name; the flags are valid; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"vmm-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a memfd we own; the result is checked.
    if unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::F_ADD_SEALS,
            seals,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Maps the graph's RAM (populated on first touch; see the module doc for shared or private),
/// left out of core dumps: a crash of vmm never writes the guest's memory (its keys, its data)
/// to disk.
pub fn create(graph: &DeviceGraph) -> Result<GuestMem, MemoryError> {
    let ram: Vec<(u64, u64)> = graph
        .regions
        .iter()
        .filter(|r| r.ram)
        .map(|r| (r.start, r.size))
        .collect();
    let file = if shared() {
        let total = ram.iter().map(|r| r.1).sum();
        Some(Arc::new(sealed_memfd(total).map_err(|source| {
            MemoryError::Memfd {
                size: human_size(total),
                source,
            }
        })?))
    } else {
        None
    };
    let mut offset = 0;
    let mut ranges = Vec::new();
    for (start, size) in ram {
        let fo = file
            .as_ref()
            .map(|f| FileOffset::from_arc(f.clone(), offset));
        ranges.push((GuestAddress(start), size as usize, fo));
        offset += size;
    }
    let mem =
        GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(|source| MemoryError::Map {
            size: human_size(graph.memory),
            source,
        })?;
    for region in mem.iter() {
        // SAFETY: advice on a live mapping owned by `mem`, of its own length; MADV_DONTDUMP
        // changes no contents. A kernel without it leaves the memory dumpable (logged).
        let r = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_DONTDUMP,
            )
        };
        if r != 0 {
            log::warn!(
                "guest RAM stays in core dumps: madvise(MADV_DONTDUMP): {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(mem)
}

/// Gives every region of `mem` to the VM, one memory slot each.
pub fn register(vm: &VmFd, mem: &GuestMem) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range [as_ptr, as_ptr + len) is a live mapping owned by `mem`, which
        // the caller keeps alive for as long as the VM exists (the VM struct owns both).
        unsafe { vm.set_user_memory_region(r) }.map_err(|source| MemoryError::Register {
            slot: slot as u32,
            start: r.guest_phys_addr,
            size: human_size(r.memory_size),
            source,
        })?;
    }
    Ok(())
}
