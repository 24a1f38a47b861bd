//! Guest RAM: anonymous host mappings for the graph's RAM regions, registered with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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
    #[error("KVM refused guest memory region {slot} at {start:#x} ({size}): {source}")]
    Register {
        slot: u32,
        start: u64,
        size: String,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Maps the graph's RAM (private, anonymous, populated on first touch), left out of core
/// dumps: a crash of vmm never writes the guest's memory (its keys, its data) to disk.
pub fn create(graph: &DeviceGraph) -> Result<GuestMem, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = graph
        .regions
        .iter()
        .filter(|r| r.ram)
        .map(|r| (GuestAddress(r.start), r.size as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map {
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
