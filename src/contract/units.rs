//! Value types of machine files: sizes, MAC addresses, PCI slots, device names and paths.
//!
//! Each type parses from the string a person writes and serializes back to the same form, so a
//! spec round-trips. Their schemas carry the pattern that `vmm check` and editors enforce; the
//! pattern is strict enough that deserializing a value the schema accepted cannot fail.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// Implements serde for a type through its `FromStr` and `Display`.
macro_rules! string_serde {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = Cow::<str>::deserialize(d)?;
                s.parse().map_err(de::Error::custom)
            }
        }
    };
}

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

/// A size in bytes, written as a number with an optional binary unit: "4096", "64K", "256M",
/// "2G", "1T" (K = KiB = 1024). "MiB"-style suffixes are accepted too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

/// The digits each unit allows are bounded so that no accepted size overflows 64 bits.
pub const BYTE_SIZE_PATTERN: &str =
    "^([0-9]{1,19}|[0-9]{1,16}(K|KiB)|[0-9]{1,13}(M|MiB)|[0-9]{1,10}(G|GiB)|[0-9]{1,7}(T|TiB))$";

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(digits_end);
        if num.is_empty() {
            return Err(format!(
                "`{s}` is not a size: expected a number like \"256M\""
            ));
        }
        let mult = match unit {
            "" | "B" => 1,
            "K" | "KiB" => KIB,
            "M" | "MiB" => MIB,
            "G" | "GiB" => GIB,
            "T" | "TiB" => TIB,
            _ => {
                return Err(format!(
                    "`{s}` has an unknown unit `{unit}`: use K, M, G or T"
                ));
            }
        };
        num.parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .map(ByteSize)
            .ok_or_else(|| format!("`{s}` is too large: sizes must be below 16 EiB"))
    }
}

impl fmt::Display for ByteSize {
    /// The largest unit that divides the size exactly: 268435456 → "256M".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, mult) in [("T", TIB), ("G", GIB), ("M", MIB), ("K", KIB)] {
            if n != 0 && n.is_multiple_of(mult) {
                return write!(f, "{}{unit}", n / mult);
            }
        }
        write!(f, "{n}")
    }
}
string_serde!(ByteSize);

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A size with an optional binary unit: \"64M\", \"2G\" (K = 1024 bytes).",
            "type": "string",
            "pattern": BYTE_SIZE_PATTERN,
            "examples": ["256M", "2G"]
        })
    }
}

/// A human-readable size for messages: 67108864 → "64 MiB", 1536 → "1536 bytes".
pub fn human_size(n: u64) -> String {
    for (unit, mult) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if n >= mult && n.is_multiple_of(mult) {
            return format!("{} {unit}", n / mult);
        }
    }
    if n >= MIB {
        return format!("{:.1} MiB", n as f64 / MIB as f64);
    }
    format!("{n} bytes")
}

/// An Ethernet MAC address, "52:54:00:12:34:56".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

pub const MAC_PATTERN: &str = "^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$";

impl MacAddr {
    /// A locally administered unicast address derived from `seed` (FNV-1a, 64 bit): stable
    /// across versions and machines, so a NIC keeps its MAC for as long as its name.
    pub fn derived(seed: &str) -> MacAddr {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        // 0x02: locally administered, unicast.
        MacAddr([0x02, b[0], b[1], b[2], b[3], b[4]])
    }
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!(
                "`{s}` is not a MAC address like \"52:54:00:12:34:56\""
            ));
        }
        for (o, p) in out.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(format!(
                    "`{s}` is not a MAC address like \"52:54:00:12:34:56\""
                ));
            }
            *o = u8::from_str_radix(p, 16)
                .map_err(|_| format!("`{s}` is not a MAC address like \"52:54:00:12:34:56\""))?;
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}
string_serde!(MacAddr);

impl JsonSchema for MacAddr {
    fn schema_name() -> Cow<'static, str> {
        "MacAddr".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "An Ethernet MAC address, six hex bytes separated by colons.",
            "type": "string",
            "pattern": MAC_PATTERN,
            "examples": ["52:54:00:12:34:56"]
        })
    }
}

/// A slot (device number) on PCI bus 0: 1–31; slot 0 is the host bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PciSlot(pub u8);

impl JsonSchema for PciSlot {
    fn schema_name() -> Cow<'static, str> {
        "PciSlot".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        // 0 passes the schema so that `vmm check` can say why it is reserved.
        json_schema!({
            "description": "Slot (device number) on PCI bus 0, 1–31; slot 0 is the host bridge.",
            "type": "integer",
            "minimum": 0,
            "maximum": 31
        })
    }
}

impl fmt::Display for PciSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A device name: a letter, then letters, digits, `-` or `_`; at most 32 characters.
/// Names identify devices across edits of a machine file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceName(pub String);

pub const NAME_PATTERN: &str = "^[A-Za-z][A-Za-z0-9_-]{0,31}$";

impl DeviceName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DeviceName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut chars = s.chars();
        let ok = s.len() <= 32
            && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if ok {
            Ok(DeviceName(s.to_string()))
        } else {
            Err(format!(
                "`{s}` is not a valid name: use a letter, then letters, digits, `-` or `_` (at most 32)"
            ))
        }
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_serde!(DeviceName);

impl JsonSchema for DeviceName {
    fn schema_name() -> Cow<'static, str> {
        "DeviceName".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A name: a letter, then letters, digits, `-` or `_`; at most 32 characters.",
            "type": "string",
            "pattern": NAME_PATTERN,
            "examples": ["eth0"]
        })
    }
}

/// A host file path as written in the machine file; relative paths are resolved against the
/// machine file's directory.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FilePath(pub String);

impl FilePath {
    pub fn resolve(&self, base: &std::path::Path) -> std::path::PathBuf {
        base.join(&self.0)
    }
}

impl fmt::Display for FilePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl JsonSchema for FilePath {
    fn schema_name() -> Cow<'static, str> {
        "FilePath".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A host path; relative paths are relative to the machine file's directory.",
            "type": "string",
            "minLength": 1
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print_back() {
        for (s, n) in [
            ("4096", 4096),
            ("64K", 65536),
            ("256M", 256 * MIB),
            ("2GiB", 2 * GIB),
        ] {
            let v: ByteSize = s.parse().unwrap();
            assert_eq!(v.0, n, "{s}");
        }
        assert_eq!(ByteSize(256 * MIB).to_string(), "256M");
        assert_eq!(ByteSize(1536).to_string(), "1536");
        assert!("12Q".parse::<ByteSize>().is_err());
        assert!(
            "99999999T"
                .parse::<ByteSize>()
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn size_pattern_admits_no_overflow() {
        let re = regex_lite(BYTE_SIZE_PATTERN);
        for s in [
            "9999999999999999999",
            "9999999999999999K",
            "9999999999999M",
            "9999999999G",
            "9999999T",
        ] {
            assert!(re(s), "{s} should match the pattern");
            assert!(
                s.parse::<ByteSize>().is_ok(),
                "{s} matched but does not parse"
            );
        }
        for s in ["99999999T", "12Q", "", "M", "1.5G"] {
            assert!(!re(s), "{s} should not match");
        }
    }

    /// The schema pattern checked with the same regex engine boon uses.
    fn regex_lite(p: &str) -> impl Fn(&str) -> bool {
        let r = regex::Regex::new(p).unwrap();
        move |s| r.is_match(s)
    }

    #[test]
    fn macs_parse_print_and_derive() {
        let m: MacAddr = "52:54:00:AB:cd:01".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:01");
        assert!("52:54:00:ab:cd".parse::<MacAddr>().is_err());
        let a = MacAddr::derived("dev/eth0");
        assert_eq!(a, MacAddr::derived("dev/eth0"));
        assert_ne!(a, MacAddr::derived("dev/eth1"));
        assert_eq!(a.0[0], 0x02);
        assert!(!a.is_multicast());
    }

    #[test]
    fn names() {
        assert!("eth0".parse::<DeviceName>().is_ok());
        assert!("0eth".parse::<DeviceName>().is_err());
        assert!("a b".parse::<DeviceName>().is_err());
        assert!("a".repeat(33).parse::<DeviceName>().is_err());
    }
}
