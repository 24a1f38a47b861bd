//! Per-vCPU CPU state: CPUID (KVM's supported set, filtered per vCPU), MSRs, FPU and local APIC.
//!
//! The CPU profile is "host": everything KVM supports, with the topology of this machine
//! (APIC ids 0..n, one package, one thread per core), the hypervisor bit set, XSAVEERPTR
//! advertised (without it Linux takes an AMD FPU path that PVM cannot emulate), minus the
//! features the machine file hides. On PVM hosts the guest command line (`clearcpuid=`) is the
//! reliable way to hide more, because PVM adds host features whatever the requested model.

use kvm_bindings::{CpuId, Msrs, kvm_fpu, kvm_msr_entry};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::spec::cpu::{CpuFeature, Reg};

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_MSR_INDEX_LIST failed: {0}")]
    MsrList(#[source] kvm_ioctls::Error),
    #[error("Setting up vCPU {vcpu}: {what} failed: {source}")]
    Vcpu {
        vcpu: u32,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// What every vCPU's CPU state is derived from.
#[derive(Debug)]
pub struct CpuTemplate {
    supported: CpuId,
    msr_index: Vec<u32>,
    vcpus: u32,
    hide: Vec<CpuFeature>,
}

const HYPERVISOR_BIT: u32 = 1 << 31;
const XSAVEERPTR_BIT: u32 = 1 << 2;

// MSRs set at boot (when KVM lists them).
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

impl CpuTemplate {
    pub fn new(kvm: &Kvm, vcpus: u32, hide: &[CpuFeature]) -> Result<CpuTemplate, CpuError> {
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(CpuError::SupportedCpuid)?;
        let msr_index = kvm
            .get_msr_index_list()
            .map_err(CpuError::MsrList)?
            .as_slice()
            .to_vec();
        Ok(CpuTemplate {
            supported,
            msr_index,
            vcpus,
            hide: hide.to_vec(),
        })
    }

    /// The CPUID table of vCPU `id`.
    pub fn cpuid(&self, id: u32) -> CpuId {
        let mut cpuid = self.supported.clone();
        let n = self.vcpus.max(1);
        // Bits needed to number n cores.
        let core_bits = 32 - (n - 1).leading_zeros();
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => {
                    e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((n.min(255)) << 16);
                    e.ecx |= HYPERVISOR_BIT;
                    if n > 1 {
                        e.edx |= 1 << 28; // HTT: the package has several logical processors
                    }
                }
                4 => {
                    // Cache topology: L1/L2 per core, L3 shared; cores per package in 31:26.
                    let level = (e.eax >> 5) & 0x7;
                    let sharing = if level >= 3 { n - 1 } else { 0 };
                    e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((n - 1) & 0x3f) << 26);
                }
                0xb | 0x1f => {
                    // x2APIC topology: level 0 = SMT (one thread), level 1 = cores.
                    match e.index {
                        0 => {
                            e.eax = 0;
                            e.ebx = 1;
                            e.ecx = 1 << 8;
                        }
                        1 => {
                            e.eax = core_bits;
                            e.ebx = n;
                            e.ecx = (2 << 8) | 1;
                        }
                        i => {
                            e.eax = 0;
                            e.ebx = 0;
                            e.ecx = i & 0xff;
                        }
                    }
                    e.edx = id;
                }
                0x8000_0008 => {
                    e.ebx |= XSAVEERPTR_BIT;
                    e.ecx = (e.ecx & !0xff) | ((n - 1) & 0xff);
                }
                _ => {}
            }
        }
        for f in &self.hide {
            let (leaf, sub, reg, bit) = f.cpuid_bit();
            for e in cpuid
                .as_mut_slice()
                .iter_mut()
                .filter(|e| e.function == leaf && e.index == sub)
            {
                let r = match reg {
                    Reg::Eax => &mut e.eax,
                    Reg::Ebx => &mut e.ebx,
                    Reg::Ecx => &mut e.ecx,
                    Reg::Edx => &mut e.edx,
                };
                *r &= !(1 << bit);
            }
        }
        cpuid
    }

    /// The boot MSRs KVM knows, with their reset values.
    pub fn msrs(&self) -> Vec<kvm_msr_entry> {
        let wanted = [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_TSC, 0),
            (MSR_IA32_MISC_ENABLE, 1),          // fast strings
            (MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, default write-back
        ];
        wanted
            .iter()
            .filter(|(i, _)| self.msr_index.contains(i))
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect()
    }

    /// Applies CPUID, MSRs, FPU and LAPIC setup to vCPU `id`.
    pub fn configure(&self, id: u32, vcpu: &VcpuFd) -> Result<(), CpuError> {
        let err = |what| {
            move |source| CpuError::Vcpu {
                vcpu: id,
                what,
                source,
            }
        };
        vcpu.set_cpuid2(&self.cpuid(id))
            .map_err(err("KVM_SET_CPUID2"))?;
        let entries = self.msrs();
        let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::Vcpu {
            vcpu: id,
            what: "building the MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let set = vcpu.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
        if set != entries.len() {
            log::warn!("vCPU {id}: KVM set {set} of {} boot MSRs", entries.len());
        }
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        vcpu.set_fpu(&fpu).map_err(err("KVM_SET_FPU"))?;
        // LINT0 = ExtINT, LINT1 = NMI, as firmware leaves them.
        let mut lapic = vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        set_lvt(&mut lapic.regs, 0x350, 0b111);
        set_lvt(&mut lapic.regs, 0x360, 0b100);
        vcpu.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;
        Ok(())
    }
}

/// Sets the delivery mode (bits 10:8) of the LVT register at `offset` of the APIC page.
fn set_lvt(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, v) in b.iter_mut().enumerate() {
        *v = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *byte as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_delivery_mode() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[0x350] = 0x10; // vector bits must survive
        set_lvt(&mut regs, 0x350, 0b111);
        assert_eq!(regs[0x350] as u8, 0x10);
        assert_eq!(regs[0x351] as u8, 0x07);
    }
}
