//! Everything the schema cannot say about a machine file: unique names, slots and host
//! resources, files that must exist, sizes that must fit. Every problem is collected, each with
//! the span of the offending value and, where another place is involved, a second label.
//!
//! The reconciler re-runs exactly this code on every edit of a running machine's file.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::devices::DeviceKind;
use crate::diag::{Diag, Diags};
use crate::spec::units::{FilePath, MIB, TIB, human_size};
use crate::spec::{Loaded, MachineSpec};

/// Smallest and largest guest memory vmm accepts.
pub const MIN_MEMORY: u64 = 2 * MIB;
pub const MAX_MEMORY: u64 = TIB;
/// Guest page size; memory sizes are multiples of it.
pub const PAGE_SIZE: u64 = 4096;
/// Linux x86 COMMAND_LINE_SIZE, including the terminating NUL.
pub const MAX_CMDLINE: usize = 2048;

/// A machine file that passed validation. Only [`validate`] makes one.
#[derive(Debug, Clone)]
pub struct ValidSpec {
    loaded: Loaded,
}

impl ValidSpec {
    pub fn spec(&self) -> &MachineSpec {
        &self.loaded.spec
    }
    pub fn loaded(&self) -> &Loaded {
        &self.loaded
    }
    pub fn into_loaded(self) -> Loaded {
        self.loaded
    }
    /// Test helper: trust a spec without checking files on disk.
    #[doc(hidden)]
    pub fn assume_valid(loaded: Loaded) -> ValidSpec {
        ValidSpec { loaded }
    }
}

/// Validates a loaded file. Returns the valid spec (with any warnings) or every problem found.
pub fn validate(loaded: Loaded) -> Result<(ValidSpec, Diags), (Loaded, Diags)> {
    let diags = check(&loaded);
    if diags.iter().any(|d| !d.warning) {
        Err((loaded, diags))
    } else {
        Ok((ValidSpec { loaded }, diags))
    }
}

/// A claimed host resource or identity: who took it first, and where.
struct Claim {
    owner: String,
    span: Range<usize>,
}

/// State of one validation run.
pub struct Validator<'a> {
    loaded: &'a Loaded,
    diags: Diags,
    claims: HashMap<(&'static str, String), Claim>,
}

/// Facts about an input file that exists and can be opened.
#[derive(Debug, Clone)]
pub struct FileInfo {
    /// Canonical absolute path.
    pub path: PathBuf,
    pub len: u64,
}

fn check(loaded: &Loaded) -> Diags {
    let mut v = Validator {
        loaded,
        diags: Vec::new(),
        claims: HashMap::new(),
    };
    v.machine();
    v.devices();
    let mut diags = v.diags;
    diags.sort_by_key(|d| (d.primary_span().map_or(0, |s| s.start), d.warning));
    diags
}

impl<'a> Validator<'a> {
    fn spec(&self) -> &'a MachineSpec {
        &self.loaded.spec
    }

    fn span(&self, ptr: &str) -> Range<usize> {
        self.loaded.spans.value(ptr)
    }

    fn push(&mut self, d: Diag) -> &mut Diag {
        self.diags.push(d);
        self.diags.last_mut().expect("just pushed")
    }

    fn machine(&mut self) {
        let spec = self.spec();
        let mem = spec.memory.bytes();
        if mem < MIN_MEMORY {
            let d = Diag::error(
                "vmm::memory",
                format!("Memory must be at least {}", human_size(MIN_MEMORY)),
            )
            .label(
                self.span("/memory"),
                format!("{} is too small", human_size(mem)),
            );
            self.push(d);
        } else if mem > MAX_MEMORY {
            let d = Diag::error(
                "vmm::memory",
                format!("Memory must be at most {}", human_size(MAX_MEMORY)),
            )
            .label(
                self.span("/memory"),
                format!("{} is too large", human_size(mem)),
            );
            self.push(d);
        } else if !mem.is_multiple_of(PAGE_SIZE) {
            let down = mem / PAGE_SIZE * PAGE_SIZE;
            let d = Diag::error(
                "vmm::memory",
                "Memory must be a multiple of the 4K page size",
            )
            .label(self.span("/memory"), format!("{mem} bytes"))
            .help(format!("use {} or {}", down, down + PAGE_SIZE));
            self.push(d);
        }

        let kernel = self.input_file("/kernel", &spec.kernel, false, "kernel");
        let initrd = spec
            .initrd
            .as_ref()
            .and_then(|p| self.input_file("/initrd", p, false, "initrd"));
        if let (Some(k), Some(i)) = (&kernel, &initrd) {
            // Both must fit in RAM next to each other (the loaders check the exact layout).
            if k.len.saturating_add(i.len) > mem {
                let d = Diag::error(
                    "vmm::memory",
                    format!(
                        "The kernel ({}) and initrd ({}) do not fit in memory ({})",
                        human_size(k.len),
                        human_size(i.len),
                        human_size(mem)
                    ),
                )
                .label(self.span("/initrd"), "this initrd")
                .label(self.span("/memory"), "this much memory")
                .help("raise `memory` or use a smaller initrd");
                self.push(d);
            }
        }
        self.cmdline();
    }

    fn cmdline(&mut self) {
        let cmdline = &self.spec().cmdline;
        if cmdline.len() >= MAX_CMDLINE {
            let d = Diag::error(
                "vmm::cmdline",
                format!(
                    "The kernel command line is {} bytes; Linux takes at most {}",
                    cmdline.len(),
                    MAX_CMDLINE - 1
                ),
            )
            .label(self.span("/cmdline"), "too long");
            self.push(d);
        }
        if let Some((i, c)) = cmdline
            .char_indices()
            .find(|(_, c)| !(' '..='~').contains(c))
        {
            let d = Diag::error(
                "vmm::cmdline",
                format!("The kernel command line contains {c:?} at byte {i}; only printable ASCII is allowed"),
            )
            .label(self.span("/cmdline"), "here")
            .help("separate parameters with spaces, not newlines or tabs");
            self.push(d);
        }
    }

    fn devices(&mut self) {
        let spec = self.spec();
        let hotplug_first = 32 - u32::from(spec.pci.hotplug_slots);
        let mut counts: HashMap<DeviceKind, usize> = HashMap::new();
        // name → pointer of its first use; slot → (device, pointer of its `slot`).
        let mut names: HashMap<&str, String> = HashMap::new();
        let mut slots: HashMap<u8, (&str, String)> = HashMap::new();
        // In file order, so that "first used here" is the first one in the file.
        let mut devices = spec.devices();
        devices.sort_by_key(|(ptr, _)| self.span(ptr).start);
        for (ptr, d) in devices {
            // A default name (rtc, i8042) has no span of its own: `value` falls back to the table.
            let name_ptr = format!("{ptr}/name");
            if let Some(first) = names.get(d.name()) {
                let dd = Diag::error(
                    "vmm::duplicate",
                    format!("The device name `{}` is used twice", d.name()),
                )
                .label(self.span(&name_ptr), "second use")
                .label(self.span(first), "first used here")
                .help("device names must be unique across all kinds");
                self.push(dd);
            } else {
                names.insert(d.name(), name_ptr);
            }

            let kind = d.kind();
            let n = counts.entry(kind).or_default();
            *n += 1;
            if let Some(max) = kind.info().max_count
                && *n == max + 1
            {
                let dd = Diag::error(
                    "vmm::too-many",
                    format!(
                        "A machine can have at most {max} `{kind}` device{}",
                        if max == 1 { "" } else { "s" }
                    ),
                )
                .label(self.span(&ptr), "one too many");
                self.push(dd);
            }

            if let Some(slot) = d.slot() {
                let slot_ptr = format!("{ptr}/slot");
                let span = self.span(&slot_ptr);
                if slot.0 == 0 {
                    let dd = Diag::error("vmm::slot", "PCI slot 0 is reserved for the host bridge")
                        .label(span, "reserved")
                        .help("use a slot from 1 to 31, or remove `slot` to get a free one");
                    self.push(dd);
                } else if let Some((other, other_ptr)) = slots.get(&slot.0) {
                    let dd = Diag::error(
                        "vmm::duplicate",
                        format!(
                            "PCI slot {slot} is used by both `{other}` and `{}`",
                            d.name()
                        ),
                    )
                    .label(span, "second use")
                    .label(self.span(other_ptr), format!("slot {slot} first used here"))
                    .help("remove `slot` from one of them to get a free slot");
                    self.push(dd);
                } else {
                    if u32::from(slot.0) >= hotplug_first && !kind.info().hotpluggable {
                        let dd = Diag::error(
                            "vmm::slot",
                            format!("PCI slot {slot} is a hotplug slot, and `{kind}` devices cannot be hot-plugged"),
                        )
                        .label(span, "a hotplug slot")
                        .label(self.span("/pci/hotplug_slots"), format!("makes slots {hotplug_first}–31 hotplug slots"))
                        .help(format!("use a slot below {hotplug_first}, or remove `slot`"));
                        self.push(dd);
                    }
                    slots.insert(slot.0, (d.name(), slot_ptr));
                }
            }

            let mut cx = DeviceCheck {
                v: self,
                ptr,
                name: d.name(),
                kind,
            };
            d.check(&mut cx);
        }
    }

    /// Checks that `path` names a readable regular file (writable too, if `write`).
    fn input_file(
        &mut self,
        ptr: &str,
        path: &FilePath,
        write: bool,
        what: &str,
    ) -> Option<FileInfo> {
        let abs = path.resolve(&self.loaded.base_dir);
        let span = self.span(ptr);
        let fail = |msg: String, help: &str| {
            let d = Diag::error("vmm::file", msg).label(span.clone(), "this path");
            if help.is_empty() {
                d
            } else {
                d.help(help.to_string())
            }
        };
        let meta = match std::fs::metadata(&abs) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let d = fail(
                    format!("The {what} file {} does not exist", abs.display()),
                    "relative paths are resolved against the machine file's directory",
                );
                self.push(d);
                return None;
            }
            Err(e) => {
                self.push(fail(
                    format!("Cannot access the {what} file {}: {e}", abs.display()),
                    "",
                ));
                return None;
            }
        };
        if meta.is_dir() {
            self.push(fail(
                format!(
                    "The {what} path {} is a directory, not a file",
                    abs.display()
                ),
                "",
            ));
            return None;
        }
        if let Err(e) = std::fs::File::open(&abs) {
            self.push(fail(
                format!("Cannot read the {what} file {}: {e}", abs.display()),
                "",
            ));
            return None;
        }
        if write && !writable(&abs) {
            let e = std::io::Error::last_os_error();
            let d = fail(
                format!("The {what} file {} is not writable: {e}", abs.display()),
                "set `readonly = true` to give the guest a read-only disk",
            );
            self.push(d);
            return None;
        }
        let canonical = std::fs::canonicalize(&abs).unwrap_or(abs);
        Some(FileInfo {
            path: canonical,
            len: meta.len(),
        })
    }
}

/// Whether the calling process may write `path` (access(2), which opens nothing).
fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// What a device's own checks ([`DeviceSpec::check`]) can do.
pub struct DeviceCheck<'c, 'a> {
    v: &'c mut Validator<'a>,
    ptr: String,
    name: &'a str,
    kind: DeviceKind,
}

/// A diagnostic just reported, to add help to.
pub struct Reported<'d>(&'d mut Diag);

impl Reported<'_> {
    pub fn help(self, help: impl Into<String>) {
        self.0.help = Some(help.into());
    }
}

impl DeviceCheck<'_, '_> {
    fn field(&self, field: &str) -> String {
        format!("{}/{field}", self.ptr)
    }

    pub fn machine_name(&self) -> &str {
        self.v.spec().name.as_str()
    }

    /// Reports an error at one of the device's fields.
    pub fn error(&mut self, field: &str, msg: impl Into<String>) -> Reported<'_> {
        let span = self.v.span(&self.field(field));
        Reported(
            self.v
                .push(Diag::error("vmm::device", msg).label(span, "here")),
        )
    }

    pub fn warning(&mut self, field: &str, msg: impl Into<String>) -> Reported<'_> {
        let span = self.v.span(&self.field(field));
        Reported(
            self.v
                .push(Diag::warning("vmm::device", msg).label(span, "here")),
        )
    }

    /// Claims a host resource or identity (`what`, `value`) for this device; a second claim of
    /// the same value is an error pointing at both.
    pub fn claim(&mut self, what: &'static str, value: String, field: &str, help: &str) {
        let span = self.v.span(&self.field(field));
        let name = self.name.to_string();
        match self.v.claims.get(&(what, value.clone())) {
            // Two devices with one name: the duplicate name is the error, not what follows from it.
            Some(first) if first.owner == name => {}
            Some(first) => {
                let mut d = Diag::error(
                    "vmm::duplicate",
                    format!(
                        "{} {value} is already used by `{}`",
                        capital(what),
                        first.owner
                    ),
                )
                .label(span, format!("used again by `{name}`"))
                .label(first.span.clone(), "first used here");
                if !help.is_empty() {
                    d = d.help(help.to_string());
                }
                self.v.push(d);
            }
            None => {
                self.v
                    .claims
                    .insert((what, value), Claim { owner: name, span });
            }
        }
    }

    /// Checks an input file of the device (see [`Validator::input_file`]).
    pub fn input_file(&mut self, field: &str, path: &FilePath, write: bool) -> Option<FileInfo> {
        let what = match self.kind {
            DeviceKind::Block => "disk image",
            _ => "device",
        };
        self.v.input_file(&self.field(field), path, write, what)
    }

    /// Checks a path vmm will create (a log file, a socket): its directory must exist and the
    /// path must not be a directory. Returns the absolute path.
    pub fn output_path(&mut self, field: &str, path: &FilePath) -> Option<PathBuf> {
        let abs = path.resolve(&self.v.loaded.base_dir);
        let span = self.v.span(&self.field(field));
        let parent = abs.parent().map(Path::to_path_buf).unwrap_or_default();
        if !parent.is_dir() {
            let d = Diag::error(
                "vmm::file",
                format!("The directory {} does not exist", parent.display()),
            )
            .label(span, "this path")
            .help("create the directory, or use a path in an existing one");
            self.v.push(d);
            return None;
        }
        if abs.is_dir() {
            let d = Diag::error("vmm::file", format!("{} is a directory", abs.display()))
                .label(span, "this path");
            self.v.push(d);
            return None;
        }
        let dir = std::fs::canonicalize(&parent).unwrap_or(parent);
        Some(abs.file_name().map_or(dir.clone(), |f| dir.join(f)))
    }
}

fn capital(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}
