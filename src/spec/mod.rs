//! What the user wrote: the machine file's types and how a file becomes a [`MachineSpec`].
//!
//! Loading is: text → [`source::Document`] (value + spans) → JSON Schema check (every type
//! error at once) → serde into [`MachineSpec`]. Spec types are inert data.

pub mod cpu;
pub mod schema;
pub mod source;

use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::contract::DeviceSpec;
use crate::contract::units::{ByteSize, DeviceName, FilePath};
use crate::devices::{AnyDevice, for_each_device_kind};
use crate::diag::{Diag, Report};
use source::{Document, Format, Spans};

macro_rules! define_machine_spec {
    ($( $(#[doc = $doc:literal])* $key:ident => $variant:ident($spec:ty), )*) => {
        /// A vmm machine: memory, vCPUs, what to boot, and its devices.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
        #[serde(deny_unknown_fields)]
        #[schemars(title = "vmm machine file")]
        pub struct MachineSpec {
            /// Machine name, used in logs, for the control socket and to derive MAC addresses.
            pub name: DeviceName,
            /// Guest RAM, e.g. "256M" or "2G"; a multiple of 4K.
            pub memory: ByteSize,
            /// Number of virtual CPUs.
            #[schemars(range(min = 1, max = 254))]
            pub vcpus: u32,
            /// Linux kernel: an uncompressed vmlinux (PVH or 64-bit ELF entry) or a bzImage.
            /// A regular file.
            pub kernel: FilePath,
            /// Initial ramdisk (initramfs) loaded next to the kernel.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub initrd: Option<FilePath>,
            /// Kernel command line, e.g. "console=ttyS0".
            #[serde(default, skip_serializing_if = "String::is_empty")]
            pub cmdline: String,
            /// The guest CPU: which CPUID features to hide.
            #[serde(default, skip_serializing_if = "cpu::CpuSpec::is_default")]
            pub cpu: cpu::CpuSpec,
            /// PCI bus 0 settings.
            #[serde(default, skip_serializing_if = "PciSpec::is_default")]
            pub pci: PciSpec,
            $(
                $(#[doc = $doc])*
                #[serde(default, skip_serializing_if = "Vec::is_empty")]
                pub $key: Vec<$spec>,
            )*
        }

        impl MachineSpec {
            /// Every device with its position in the file ("/net/1"), kind by kind.
            pub fn devices(&self) -> Vec<(String, &dyn DeviceSpec)> {
                let mut all: Vec<(String, &dyn DeviceSpec)> = Vec::new();
                $(
                    for (i, d) in self.$key.iter().enumerate() {
                        all.push((format!("/{}/{i}", stringify!($key)), d));
                    }
                )*
                all
            }

            /// Every device as owned data, kind by kind.
            pub fn owned_devices(&self) -> Vec<AnyDevice> {
                let mut all = Vec::new();
                $( all.extend(self.$key.iter().cloned().map(AnyDevice::from)); )*
                all
            }

            /// Removes the device called `name`; true if there was one.
            pub fn remove_device(&mut self, name: &str) -> bool {
                $(
                    if let Some(i) = self.$key.iter().position(|d| d.name() == name) {
                        self.$key.remove(i);
                        return true;
                    }
                )*
                false
            }
        }
    };
}
for_each_device_kind!(define_machine_spec);

/// PCI bus 0.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PciSpec {
    /// Slots kept free for devices added while the VM runs (the highest-numbered slots).
    /// Hot-pluggable devices without a `slot` go into them first.
    #[serde(default)]
    #[schemars(range(max = 31))]
    pub hotplug_slots: u8,
}

impl PciSpec {
    pub fn is_default(&self) -> bool {
        *self == PciSpec::default()
    }
}

/// A machine file read and type-checked: its text, spans and typed spec.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The path the user gave (for messages).
    pub path: PathBuf,
    /// Absolute directory relative paths in the file are resolved against.
    pub base_dir: PathBuf,
    pub format: Format,
    pub text: String,
    pub spans: Spans,
    pub spec: MachineSpec,
}

impl Loaded {
    /// A report of `diags` against this file's text.
    pub fn report(&self, diags: Vec<Diag>) -> Report {
        Report::new(&self.path.display().to_string(), self.text.clone(), diags)
    }
}

/// The largest machine file vmm reads: 256 KiB (real ones are a few KiB; the 1,000-device
/// benchmark file, far more than bus 0 holds, is ~100 KiB). `vmm check`, `up`, `plan`,
/// `apply`, the watcher and the control socket read no more, which bounds what any input can
/// cost (docs/performance.md: peak RSS and time of the worst inputs found).
pub const MAX_FILE_SIZE: usize = 256 << 10;

/// Reads a machine file: a regular file only (never blocking on a FIFO or a device), at most
/// one byte more than [`MAX_FILE_SIZE`] (the check then says it is too large).
pub fn read_machine_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let opened =
        crate::hostfile::open_input(path, crate::hostfile::Use::Read).map_err(|e| match e {
            crate::hostfile::OpenError::Io(e) => e,
            crate::hostfile::OpenError::Missing => std::io::ErrorKind::NotFound.into(),
            other => std::io::Error::other(other.to_string()),
        })?;
    let mut bytes = Vec::with_capacity((opened.len as usize).min(MAX_FILE_SIZE + 1));
    opened
        .file
        .take(MAX_FILE_SIZE as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Reads and type-checks a machine file. A file that cannot be read gives a report without
/// spans.
pub fn load_file(path: &Path) -> Result<Loaded, Report> {
    match read_machine_file(path) {
        Ok(bytes) => load_bytes(path, bytes),
        Err(e) => {
            let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
            let d = Diag::error(
                "vmm::io",
                format!("Cannot read machine file {}: {e}", abs.display()),
            );
            Err(Report::new(
                &path.display().to_string(),
                String::new(),
                vec![d],
            ))
        }
    }
}

/// Type-checks the bytes of the machine file at `path` (read by the caller: a watcher that
/// already holds them must not read the file twice).
pub fn load_bytes(path: &Path, mut bytes: Vec<u8>) -> Result<Loaded, Report> {
    let name = path.display().to_string();
    if bytes.len() > MAX_FILE_SIZE {
        // Not parsed at all: the start of the file is shown as the place.
        bytes.truncate(MAX_FILE_SIZE);
        let cut = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]).into_owned();
        let mut first_line = cut.find('\n').unwrap_or(cut.len()).min(200);
        while !cut.is_char_boundary(first_line) {
            first_line -= 1;
        }
        let d = Diag::error(
            "vmm::too-large",
            format!(
                "The machine file is larger than {} KiB, the most vmm reads",
                MAX_FILE_SIZE >> 10
            ),
        )
        .label(0..first_line, "the file starts here")
        .help("machine files are a few KiB; is this the right file?");
        return Err(Report::new(&name, cut, vec![d]));
    }
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let text = String::from_utf8_lossy(e.as_bytes()).into_owned();
            let d = Diag::error("vmm::syntax", "The machine file is not valid UTF-8")
                .label(valid..valid + 1, "invalid byte");
            return Err(Report::new(&name, text, vec![d]));
        }
    };
    let base_dir = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    load_str(path, text, Format::of_path(path), base_dir)
}

/// Type-checks machine file text. `path` names it in messages; `base_dir` resolves its paths.
pub fn load_str(
    path: &Path,
    text: String,
    format: Format,
    base_dir: PathBuf,
) -> Result<Loaded, Report> {
    let name = path.display().to_string();
    let doc: Document = match source::parse(&text, format) {
        Ok(d) => d,
        Err(diags) => return Err(Report::new(&name, text, diags)),
    };
    let diags = schema::check(&doc, &text);
    if !diags.is_empty() {
        return Err(Report::new(&name, text, diags));
    }
    // The schema admitted the value, so this only fails if schema and types disagree.
    let spec: MachineSpec = match serde_path_to_error::deserialize(&doc.value) {
        Ok(s) => s,
        Err(e) => {
            let ptr = pointer_of(e.path());
            let d = Diag::error("vmm::type", capitalise_first(&e.inner().to_string()))
                .label(doc.spans.value(&ptr), "here");
            return Err(Report::new(&name, text, vec![d]));
        }
    };
    Ok(Loaded {
        path: path.to_path_buf(),
        base_dir,
        format,
        text,
        spans: doc.spans,
        spec,
    })
}

fn pointer_of(p: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut s = String::new();
    for seg in p.iter() {
        match seg {
            Segment::Seq { index } => s.push_str(&format!("/{index}")),
            Segment::Map { key } => s.push_str(&format!("/{}", source::escape_token(key))),
            Segment::Enum { variant } => s.push_str(&format!("/{}", source::escape_token(variant))),
            Segment::Unknown => {}
        }
    }
    s
}

fn capitalise_first(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}
