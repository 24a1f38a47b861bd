//! The guest CPU profile: the host CPU as KVM supports it, minus the features the machine
//! file hides.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// CPU settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CpuSpec {
    /// CPUID features hidden from the guest, e.g. ["avx512f", "x2apic"]. Hiding a feature does
    /// not hide the ones that depend on it (hide "avx2" with "avx").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hide: Vec<CpuFeature>,
}

impl CpuSpec {
    pub fn is_default(&self) -> bool {
        self.hide.is_empty()
    }
}

/// A CPUID register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

macro_rules! features {
    ($( $(#[doc = $doc:literal])* $variant:ident = $name:literal: ($leaf:expr, $sub:expr, $reg:ident, $bit:expr), )*) => {
        /// A CPU feature that can be hidden from the guest (Linux /proc/cpuinfo names).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
        pub enum CpuFeature {
            $( $(#[doc = $doc])* #[serde(rename = $name)] $variant, )*
        }

        impl CpuFeature {
            /// Where CPUID reports the feature: (leaf, subleaf, register, bit).
            pub fn cpuid_bit(self) -> (u32, u32, Reg, u8) {
                match self { $( CpuFeature::$variant => ($leaf, $sub, Reg::$reg, $bit), )* }
            }
            pub fn name(self) -> &'static str {
                match self { $( CpuFeature::$variant => $name, )* }
            }
        }
    };
}

features! {
    /// SSE3.
    Sse3 = "sse3": (1, 0, Ecx, 0),
    /// Carry-less multiplication.
    Pclmulqdq = "pclmulqdq": (1, 0, Ecx, 1),
    /// MONITOR/MWAIT.
    Monitor = "monitor": (1, 0, Ecx, 3),
    /// Supplemental SSE3.
    Ssse3 = "ssse3": (1, 0, Ecx, 9),
    /// Fused multiply-add.
    Fma = "fma": (1, 0, Ecx, 12),
    /// CMPXCHG16B.
    Cx16 = "cx16": (1, 0, Ecx, 13),
    /// Process-context identifiers.
    Pcid = "pcid": (1, 0, Ecx, 17),
    /// SSE4.1.
    Sse41 = "sse4_1": (1, 0, Ecx, 19),
    /// SSE4.2.
    Sse42 = "sse4_2": (1, 0, Ecx, 20),
    /// x2APIC mode of the local APIC.
    X2apic = "x2apic": (1, 0, Ecx, 21),
    /// MOVBE.
    Movbe = "movbe": (1, 0, Ecx, 22),
    /// POPCNT.
    Popcnt = "popcnt": (1, 0, Ecx, 23),
    /// TSC-deadline mode of the local APIC timer.
    TscDeadline = "tsc_deadline_timer": (1, 0, Ecx, 24),
    /// AES instructions.
    Aes = "aes": (1, 0, Ecx, 25),
    /// XSAVE/XRSTOR (hiding it hides AVX too in practice).
    Xsave = "xsave": (1, 0, Ecx, 26),
    /// AVX.
    Avx = "avx": (1, 0, Ecx, 28),
    /// Half-precision conversion.
    F16c = "f16c": (1, 0, Ecx, 29),
    /// RDRAND.
    Rdrand = "rdrand": (1, 0, Ecx, 30),
    /// FSGSBASE instructions.
    Fsgsbase = "fsgsbase": (7, 0, Ebx, 0),
    /// BMI1.
    Bmi1 = "bmi1": (7, 0, Ebx, 3),
    /// AVX2.
    Avx2 = "avx2": (7, 0, Ebx, 5),
    /// Supervisor-mode execution prevention.
    Smep = "smep": (7, 0, Ebx, 7),
    /// BMI2.
    Bmi2 = "bmi2": (7, 0, Ebx, 8),
    /// Enhanced REP MOVSB/STOSB.
    Erms = "erms": (7, 0, Ebx, 9),
    /// INVPCID.
    Invpcid = "invpcid": (7, 0, Ebx, 10),
    /// AVX-512 foundation.
    Avx512f = "avx512f": (7, 0, Ebx, 16),
    /// RDSEED.
    Rdseed = "rdseed": (7, 0, Ebx, 18),
    /// ADX.
    Adx = "adx": (7, 0, Ebx, 19),
    /// Supervisor-mode access prevention.
    Smap = "smap": (7, 0, Ebx, 20),
    /// CLFLUSHOPT.
    Clflushopt = "clflushopt": (7, 0, Ebx, 23),
    /// CLWB.
    Clwb = "clwb": (7, 0, Ebx, 24),
    /// SHA extensions.
    Sha = "sha_ni": (7, 0, Ebx, 29),
    /// User-mode instruction prevention.
    Umip = "umip": (7, 0, Ecx, 2),
    /// Protection keys.
    Pku = "pku": (7, 0, Ecx, 3),
    /// 5-level paging.
    La57 = "la57": (7, 0, Ecx, 16),
    /// RDPID.
    Rdpid = "rdpid": (7, 0, Ecx, 22),
    /// LZCNT (ABM).
    Abm = "abm": (0x8000_0001, 0, Ecx, 5),
    /// 1 GiB pages.
    Pdpe1gb = "pdpe1gb": (0x8000_0001, 0, Edx, 26),
    /// RDTSCP.
    Rdtscp = "rdtscp": (0x8000_0001, 0, Edx, 27),
    /// XSAVEOPT.
    Xsaveopt = "xsaveopt": (0xd, 1, Eax, 0),
    /// XSAVEC.
    Xsavec = "xsavec": (0xd, 1, Eax, 1),
    /// XSAVES.
    Xsaves = "xsaves": (0xd, 1, Eax, 3),
}
