//! Loading Linux into guest memory and the boot protocols: PVH (an ELF vmlinux with a PVH entry
//! note), 64-bit ELF entry (a vmlinux without one) and bzImage (64-bit entry of the setup header).
//!
//! Low memory layout (below 1 MiB):
//!
//! | address   | what                                   |
//! |-----------|----------------------------------------|
//! | 0x0500    | GDT (null, code64, code32/data)        |
//! | 0x0520    | IDT (empty)                            |
//! | 0x6000    | PVH hvm_start_info, modlist, memmap    |
//! | 0x7000    | Linux boot_params (zero page)          |
//! | 0x9000    | page tables: PML4, PDPT, PD (1 GiB identity map, 2 MiB pages) |
//! | 0x20000   | kernel command line                    |
//! | 0x9fc00   | reserved to 1 MiB (EBDA, BIOS area); ACPI tables at 0xe0000 |

use std::fs::File;
use std::io::Read;
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemory};

use super::memory::GuestMem;
use crate::contract::units::human_size;
use crate::graph::DeviceGraph;
use crate::graph::layout::{HIGH_RAM_START, PCI_ECAM_SIZE, PCI_ECAM_START};

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x6080;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const EBDA_START: u64 = 0x9fc00;
pub const HIMEM_START: u64 = 0x10_0000;
/// Where the ACPI tables go (the legacy BIOS area, scanned by Linux for the RSDP).
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_SIZE: u64 = 0x20000;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("Cannot read kernel {path}: {source}")]
    KernelIo {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Kernel {path} is neither an ELF vmlinux nor a bzImage")]
    KernelFormat { path: String },
    #[error("Cannot load kernel {path}: {source}")]
    KernelLoad {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("Kernel {path} needs memory up to {end:#x}, but the machine has {mem}")]
    KernelTooBig { path: String, end: u64, mem: String },
    #[error("Cannot read initrd {path}: {source}")]
    InitrdIo {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "Initrd {path} ({size}) does not fit in guest memory: {free} free between the kernel's end ({kernel_end:#x}) and the end of low RAM"
    )]
    InitrdTooBig {
        path: String,
        size: String,
        free: String,
        kernel_end: u64,
    },
    #[error("Cannot write boot data into guest memory at {addr:#x}: {what}")]
    Write { addr: u64, what: &'static str },
    #[error("The kernel command line is too long for the boot protocol")]
    Cmdline,
}

/// How the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh,
    /// 64-bit long mode, identity paging, RSI = boot_params.
    Linux64,
}

/// The result of loading: where and how to enter.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub mode: EntryMode,
    pub rip: u64,
    /// What the kernel image was (for logs).
    pub format: &'static str,
}

/// The memory map the guest gets (e820 / PVH memmap), in address order.
pub fn memory_map(graph: &DeviceGraph) -> Vec<(u64, u64, u32)> {
    let mut map = Vec::new();
    for r in graph.regions.iter().filter(|r| r.ram) {
        if r.start == 0 {
            map.push((0, EBDA_START.min(r.size), E820_RAM));
            if r.size > EBDA_START {
                map.push((EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED));
            }
            if r.size > HIMEM_START {
                map.push((HIMEM_START, r.size - HIMEM_START, E820_RAM));
            }
        } else {
            map.push((r.start, r.size, E820_RAM));
        }
    }
    // Linux uses ECAM only when firmware reserved it.
    map.push((PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED));
    map.sort();
    map
}

fn write<T: ByteValued>(
    mem: &GuestMem,
    addr: u64,
    v: &T,
    what: &'static str,
) -> Result<(), BootError> {
    mem.write_obj(*v, GuestAddress(addr))
        .map_err(|_| BootError::Write { addr, what })
}

/// Loads kernel, initrd and command line; writes the boot structures for the entry mode.
pub fn load(mem: &GuestMem, graph: &DeviceGraph, rsdp: u64) -> Result<Entry, BootError> {
    let kpath = graph.path(&graph.boot.kernel);
    let kname = kpath.display().to_string();
    let kernel = load_kernel(mem, &kpath)?;
    let entry = kernel.entry;
    let low_end = graph
        .regions
        .iter()
        .find(|r| r.ram && r.start == 0)
        .map_or(0, |r| r.end());
    if kernel.end > low_end {
        return Err(BootError::KernelTooBig {
            path: kname,
            end: kernel.end,
            mem: human_size(graph.memory),
        });
    }
    let cmdline = write_cmdline(mem, &graph.boot.cmdline)?;
    // Initrd at the top of low RAM, page aligned.
    let initrd = match &graph.boot.initrd {
        Some(p) => Some(load_initrd(
            mem,
            &graph.path(p),
            kernel.end,
            low_end.min(HIGH_RAM_START),
        )?),
        None => None,
    };
    let map = memory_map(graph);
    match entry.mode {
        EntryMode::Pvh => write_pvh_info(mem, &map, rsdp, initrd)?,
        EntryMode::Linux64 => {
            let params = zero_page(kernel.setup, cmdline, &map, rsdp, initrd);
            write(mem, ZERO_PAGE_ADDR, &params, "boot parameters")?;
        }
    }
    write_gdt_and_page_tables(mem)?;
    log::info!(
        "kernel: {} ({}), entry {:#x}",
        kname,
        entry.format,
        entry.rip
    );
    Ok(entry)
}

/// A kernel in guest memory.
struct Kernel {
    entry: Entry,
    /// The first byte past the image.
    end: u64,
    /// A bzImage's setup header, the start of its zero page.
    setup: Option<setup_header>,
}

/// Loads an ELF vmlinux (PVH entry when it has one) or a bzImage at 1 MiB.
fn load_kernel(mem: &GuestMem, path: &Path) -> Result<Kernel, BootError> {
    let kname = path.display().to_string();
    let io_err = |source| BootError::KernelIo {
        path: kname.clone(),
        source,
    };
    let mut kernel = open_regular(path).map_err(io_err)?;
    let mut magic = [0u8; 0x206];
    let n = read_up_to(&mut kernel, &mut magic).map_err(io_err)?;
    let is_elf = n >= 4 && magic[..4] == *b"\x7fELF";
    let is_bzimage = n >= 0x206 && magic[0x202..0x206] == *b"HdrS";
    let load_err = |source| BootError::KernelLoad {
        path: kname.clone(),
        source,
    };
    let at = Some(GuestAddress(HIMEM_START));
    if is_elf {
        let r = Elf::load(mem, None, &mut kernel, at).map_err(load_err)?;
        let entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => Entry {
                mode: EntryMode::Pvh,
                rip: addr.raw_value(),
                format: "ELF vmlinux, PVH entry",
            },
            _ => Entry {
                mode: EntryMode::Linux64,
                rip: r.kernel_load.raw_value(),
                format: "ELF vmlinux, 64-bit entry",
            },
        };
        return Ok(Kernel {
            entry,
            end: r.kernel_end,
            setup: None,
        });
    }
    if is_bzimage {
        let r = BzImage::load(mem, None, &mut kernel, at).map_err(load_err)?;
        // The 64-bit entry point is 0x200 past the protected-mode code's start.
        let entry = Entry {
            mode: EntryMode::Linux64,
            rip: r.kernel_load.raw_value() + 0x200,
            format: "bzImage, 64-bit entry",
        };
        return Ok(Kernel {
            entry,
            end: r.kernel_end,
            setup: r.setup_header,
        });
    }
    Err(BootError::KernelFormat { path: kname })
}

/// Writes the NUL-terminated command line; its length.
fn write_cmdline(mem: &GuestMem, cmdline: &str) -> Result<usize, BootError> {
    let cmdline = cmdline.as_bytes();
    if cmdline.len() >= 2048 {
        return Err(BootError::Cmdline);
    }
    let fail = |_| BootError::Write {
        addr: CMDLINE_ADDR,
        what: "command line",
    };
    mem.write_slice(cmdline, GuestAddress(CMDLINE_ADDR))
        .map_err(fail)?;
    mem.write_obj(0u8, GuestAddress(CMDLINE_ADDR + cmdline.len() as u64))
        .map_err(fail)?;
    Ok(cmdline.len())
}

/// The PVH start info, module list (the initrd) and memory map.
fn write_pvh_info(
    mem: &GuestMem,
    map: &[(u64, u64, u32)],
    rsdp: u64,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let m = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        write(mem, PVH_MODLIST_ADDR, &m, "PVH module list")?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    write(mem, PVH_INFO_ADDR, &info, "PVH start info")?;
    for (i, &(addr, size, ty)) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr,
            size,
            type_: ty,
            reserved: 0,
        };
        write(mem, PVH_MEMMAP_ADDR + 24 * i as u64, &e, "PVH memory map")?;
    }
    Ok(())
}

/// The Linux zero page: the image's setup header completed as a boot loader does, the e820
/// map, the RSDP and the initrd.
fn zero_page(
    setup: Option<setup_header>,
    cmdline_len: usize,
    map: &[(u64, u64, u32)],
    rsdp: u64,
    initrd: Option<(u64, u64)>,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = setup {
        params.hdr = hdr;
    }
    let hdr = &mut params.hdr;
    hdr.type_of_loader = 0xff;
    hdr.boot_flag = 0xaa55;
    hdr.header = 0x5372_6448; // "HdrS"
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline_len as u32;
    hdr.loadflags |= 0x01; // LOADED_HIGH
    if hdr.kernel_alignment == 0 {
        hdr.kernel_alignment = 0x100_0000;
    }
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    for (i, &(addr, size, ty)) in map.iter().take(params.e820_table.len()).enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: ty,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    params
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Opens a kernel or initrd: only a regular file, never blocking (see [`crate::hostfile`]).
fn open_regular(path: &Path) -> std::io::Result<File> {
    crate::hostfile::open_input(path, crate::hostfile::Use::Read)
        .map(|o| o.file)
        .map_err(|e| match e {
            crate::hostfile::OpenError::Io(e) => e,
            crate::hostfile::OpenError::Missing => std::io::ErrorKind::NotFound.into(),
            other => std::io::Error::other(other.to_string()),
        })
}

fn load_initrd(
    mem: &GuestMem,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let name = path.display().to_string();
    let io = |source| BootError::InitrdIo {
        path: name.clone(),
        source,
    };
    let mut f = open_regular(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let lowest = kernel_end.max(HIMEM_START).next_multiple_of(4096);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= lowest)
        .ok_or_else(|| BootError::InitrdTooBig {
            path: name.clone(),
            size: human_size(size),
            free: human_size(limit.saturating_sub(lowest)),
            kernel_end,
        })?;
    let region_ok = mem.check_range(
        GuestAddress(addr),
        size as usize,
        vm_memory::Permissions::ReadWrite,
    );
    if !region_ok {
        return Err(BootError::InitrdTooBig {
            path: name,
            size: human_size(size),
            free: human_size(limit.saturating_sub(lowest)),
            kernel_end,
        });
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|_| BootError::InitrdIo {
            path: name.clone(),
            source: std::io::Error::other("short read"),
        })?;
    log::info!("initrd: {name} ({}) at {addr:#x}", human_size(size));
    Ok((addr, size))
}

/// GDT entries: null, 64-bit code (0x08), 32-bit code (0x10), data (0x18).
const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
];

fn write_gdt_and_page_tables(mem: &GuestMem) -> Result<(), BootError> {
    for (i, e) in GDT.iter().enumerate() {
        write(mem, GDT_ADDR + 8 * i as u64, e, "GDT")?;
    }
    write(mem, IDT_ADDR, &0u64, "IDT")?;
    // PML4[0] → PDPT, PDPT[0] → PD, PD: 512 × 2 MiB identity pages (present, writable, huge).
    write(mem, PML4_ADDR, &(PDPT_ADDR | 0x3), "page tables")?;
    write(mem, PDPT_ADDR, &(PD_ADDR | 0x3), "page tables")?;
    for i in 0..512u64 {
        write(mem, PD_ADDR + 8 * i, &((i << 21) | 0x83), "page tables")?;
    }
    Ok(())
}

fn segment(selector: u16, gdt_entry: u64) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: ((gdt_entry >> 40) & 0xf) as u8,
        present: ((gdt_entry >> 47) & 1) as u8,
        dpl: ((gdt_entry >> 45) & 3) as u8,
        db: ((gdt_entry >> 54) & 1) as u8,
        s: ((gdt_entry >> 44) & 1) as u8,
        l: ((gdt_entry >> 53) & 1) as u8,
        g: ((gdt_entry >> 55) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Registers of the boot vCPU for `entry`, from `sregs` as KVM initialised them.
pub fn boot_registers(entry: &Entry, mut sregs: kvm_sregs) -> (kvm_regs, kvm_sregs) {
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let data = segment(0x18, GDT[3]);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.rip,
        ..Default::default()
    };
    match entry.mode {
        EntryMode::Pvh => {
            sregs.cs = segment(0x10, GDT[2]);
            sregs.cr0 = 0x1 | 0x10; // PE, ET
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = PVH_INFO_ADDR;
        }
        EntryMode::Linux64 => {
            sregs.cs = segment(0x08, GDT[1]);
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = 0x20; // PAE
            sregs.cr0 = 0x8000_0001 | 0x10; // PG, PE, ET
            sregs.efer = 0x500; // LME, LMA
            regs.rsi = ZERO_PAGE_ADDR;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
        }
    }
    (regs, sregs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode() {
        let cs = segment(0x08, GDT[1]);
        assert_eq!((cs.l, cs.db, cs.type_, cs.present, cs.s), (1, 0, 0xb, 1, 1));
        let cs32 = segment(0x10, GDT[2]);
        assert_eq!((cs32.l, cs32.db, cs32.g), (0, 1, 1));
        let ds = segment(0x18, GDT[3]);
        assert_eq!(ds.type_, 0x3);
    }
}
