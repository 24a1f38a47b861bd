//! Everything the schema cannot say about a machine file: unique names, slots and host
//! resources, files that must exist, sizes that must fit. Every problem is collected, each with
//! the span of the offending value and, where another place is involved, a second label.
//!
//! The reconciler re-runs exactly this code on every edit of a running machine's file.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use std::os::unix::fs::FileTypeExt;

use crate::contract::DeviceSpec;
use crate::contract::check::{DeviceCheck, FileInfo, Reported};
use crate::contract::units::{FilePath, MIB, TIB, human_size};
use crate::diag::{Diag, Diags};
use crate::hostfile::{self, OpenError, Use};
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
    /// The host files it names, as they were checked.
    files: Known,
}

/// The host files a valid machine file names, as validation found them. Re-validating an
/// edit of a running machine's file takes these as they are (see [`validate_since`]).
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// Input files by (what, absolute path, opened for writing).
    inputs: HashMap<(String, PathBuf, bool), FileInfo>,
    /// Output paths (absolute).
    outputs: std::collections::HashSet<PathBuf>,
}

impl ValidSpec {
    /// The host files it names: inputs as (canonical path, opened for writing), and output
    /// paths (files and sockets vmm creates).
    pub fn host_files(&self) -> (Vec<(PathBuf, bool)>, Vec<PathBuf>) {
        let mut inputs: Vec<(PathBuf, bool)> = self
            .files
            .inputs
            .iter()
            .map(|((_, _, write), info)| (info.path.clone(), *write))
            .collect();
        inputs.sort();
        let mut outputs: Vec<PathBuf> = self.files.outputs.iter().cloned().collect();
        outputs.sort();
        (inputs, outputs)
    }

    pub fn spec(&self) -> &MachineSpec {
        &self.loaded.spec
    }
    pub fn loaded(&self) -> &Loaded {
        &self.loaded
    }
    pub fn into_loaded(self) -> Loaded {
        self.loaded
    }
}

/// Validates a loaded file. Returns the valid spec (with any warnings) or every problem found.
pub fn validate(loaded: Loaded) -> Result<(ValidSpec, Diags), (Loaded, Diags)> {
    validate_since(loaded, None)
}

/// [`validate`] for an edit of a machine whose file `prev` was accepted before (a running VM's
/// file). Host files `prev` named at the same path for the same use are taken as they were
/// then, without touching them: the VM already has them open, and a change to one of them
/// needs a restart anyway, so a kernel being rebuilt (missing for a moment) or a disk image
/// another program holds must not stop a NIC edit. Paths that are new are checked.
pub fn validate_since(
    loaded: Loaded,
    prev: Option<&ValidSpec>,
) -> Result<(ValidSpec, Diags), (Loaded, Diags)> {
    let (diags, files) = check(&loaded, prev.map(|p| &p.files));
    if diags.iter().any(|d| !d.warning) {
        Err((loaded, diags))
    } else {
        Ok((ValidSpec { loaded, files }, diags))
    }
}

/// A claimed host resource or identity: who took it first, and where.
#[derive(Debug)]
struct Claim {
    owner: String,
    span: Range<usize>,
}

/// State of one validation run.
#[derive(Debug)]
pub struct Validator<'a> {
    loaded: &'a Loaded,
    diags: Diags,
    claims: HashMap<(&'static str, String), Claim>,
    prev: Option<&'a Known>,
    files: Known,
}

fn check(loaded: &Loaded, prev: Option<&Known>) -> (Diags, Known) {
    let mut v = Validator {
        loaded,
        diags: Vec::new(),
        claims: HashMap::new(),
        prev,
        files: Known::default(),
    };
    v.machine();
    v.devices();
    let mut diags = v.diags;
    diags.sort_by_key(|d| (d.primary_span().map_or(0, |s| s.start), d.warning));
    (diags, v.files)
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

        let kernel = self.input_file("/kernel", &spec.kernel, Use::Read, "kernel");
        let initrd = spec
            .initrd
            .as_ref()
            .and_then(|p| self.input_file("/initrd", p, Use::Read, "initrd"));
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
        let mut counts: HashMap<&str, usize> = HashMap::new();
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

            let kind = d.info().key;
            let n = counts.entry(kind).or_default();
            *n += 1;
            if let Some(max) = d.info().max_count
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
                self.check_slot(&ptr, d, slot.0, &mut slots);
            }

            let mut cx = FileCheck {
                v: self,
                ptr,
                name: d.name(),
            };
            d.check(&mut cx);
        }
    }

    /// An explicit PCI slot: not the host bridge's, not another device's, and a hotplug slot
    /// only for a hot-pluggable kind. `slots`: slot → (device, pointer of its `slot`).
    fn check_slot(
        &mut self,
        ptr: &str,
        d: &'a dyn DeviceSpec,
        slot: u8,
        slots: &mut HashMap<u8, (&'a str, String)>,
    ) {
        let hotplug_first = 32 - u32::from(self.spec().pci.hotplug_slots);
        let slot_ptr = format!("{ptr}/slot");
        let span = self.span(&slot_ptr);
        if slot == 0 {
            let dd = Diag::error("vmm::slot", "PCI slot 0 is reserved for the host bridge")
                .label(span, "reserved")
                .help("use a slot from 1 to 31, or remove `slot` to get a free one");
            self.push(dd);
            return;
        }
        if let Some((other, other_ptr)) = slots.get(&slot) {
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
            return;
        }
        if u32::from(slot) >= hotplug_first && !d.info().hotpluggable {
            let kind = d.info().key;
            let dd = Diag::error(
                "vmm::slot",
                format!(
                    "PCI slot {slot} is a hotplug slot, and `{kind}` devices cannot be hot-plugged"
                ),
            )
            .label(span, "a hotplug slot")
            .label(
                self.span("/pci/hotplug_slots"),
                format!("makes slots {hotplug_first}–31 hotplug slots"),
            )
            .help(format!(
                "use a slot below {hotplug_first}, or remove `slot`"
            ));
            self.push(dd);
        }
        slots.insert(slot, (d.name(), slot_ptr));
    }

    /// Checks that `path` names what `how` wants (a regular file to read, or a disk image:
    /// a regular file or a block device, writable if the guest may write) without blocking or
    /// opening anything that acts on open (see [`crate::hostfile`]).
    fn input_file(&mut self, ptr: &str, path: &FilePath, how: Use, what: &str) -> Option<FileInfo> {
        let abs = path.resolve(&self.loaded.base_dir);
        let write = matches!(how, Use::Disk { write: true });
        let key = (what.to_string(), abs.clone(), write);
        if let Some(info) = self.prev.and_then(|k| k.inputs.get(&key)) {
            let info = info.clone();
            self.files.inputs.insert(key, info.clone());
            return Some(info);
        }
        let span = self.span(ptr);
        match open_checked(&abs, how, what) {
            Ok(info) => {
                self.files.inputs.insert(key, info.clone());
                Some(info)
            }
            Err((msg, help)) => {
                let mut d = Diag::error("vmm::file", msg).label(span, "this path");
                if !help.is_empty() {
                    d = d.help(help.to_string());
                }
                self.push(d);
                None
            }
        }
    }
}

/// Opens an input file the way [`crate::hostfile`] does and says what it is, or why it cannot
/// be used: (message, help).
fn open_checked(abs: &Path, how: Use, what: &str) -> Result<FileInfo, (String, &'static str)> {
    let opened = hostfile::open_input(abs, how).map_err(|e| {
        let help = match &e {
            OpenError::Missing => {
                "relative paths are resolved against the machine file's directory"
            }
            OpenError::NotWritable(_) => "set `readonly = true` to give the guest a read-only disk",
            OpenError::BusyDevice => "unmount it, or stop the program that holds it",
            OpenError::WrongKind(..) if how == Use::Read => {
                "copy what it gives into a regular file and name that"
            }
            _ => "",
        };
        (format!("The {what} {} {e}", abs.display()), help)
    })?;
    Ok(FileInfo {
        path: std::fs::canonicalize(abs).unwrap_or_else(|_| abs.to_path_buf()),
        len: opened.len,
        block_device: opened.block_device,
    })
}

/// [`DeviceCheck`] for a device of a machine file: fields are keys under the device's table,
/// reported with their spans.
struct FileCheck<'c, 'a> {
    v: &'c mut Validator<'a>,
    ptr: String,
    name: &'a str,
}

impl FileCheck<'_, '_> {
    fn field(&self, field: &str) -> String {
        format!("{}/{field}", self.ptr)
    }
}

impl DeviceCheck for FileCheck<'_, '_> {
    fn machine_name(&self) -> &str {
        self.v.spec().name.as_str()
    }

    fn error(&mut self, field: &str, msg: String) -> Reported<'_> {
        let span = self.v.span(&self.field(field));
        Reported(
            self.v
                .push(Diag::error("vmm::device", msg).label(span, "here")),
        )
    }

    fn warning(&mut self, field: &str, msg: String) -> Reported<'_> {
        let span = self.v.span(&self.field(field));
        Reported(
            self.v
                .push(Diag::warning("vmm::device", msg).label(span, "here")),
        )
    }

    fn claim(&mut self, what: &'static str, value: String, field: &str, help: &str) {
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

    /// See [`Validator::input_file`].
    fn disk_image(&mut self, field: &str, path: &FilePath, write: bool) -> Option<FileInfo> {
        self.v
            .input_file(&self.field(field), path, Use::Disk { write }, "disk image")
    }

    /// A socket that is already there is one vmm replaces (left by an earlier run).
    fn output_path(&mut self, field: &str, path: &FilePath, socket: bool) -> Option<PathBuf> {
        let abs = path.resolve(&self.v.loaded.base_dir);
        let span = self.v.span(&self.field(field));
        let parent = abs.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = std::fs::canonicalize(&parent).unwrap_or_else(|_| parent.clone());
        let out = abs.file_name().map_or(dir.clone(), |f| dir.join(f));
        if self.v.prev.is_some_and(|k| k.outputs.contains(&out)) {
            self.v.files.outputs.insert(out.clone());
            return Some(out);
        }
        match check_output_path(&abs, socket) {
            Ok(()) => {}
            Err((msg, help)) => {
                let mut d = Diag::error("vmm::file", msg).label(span, "this path");
                if !help.is_empty() {
                    d = d.help(help.to_string());
                }
                self.v.push(d);
                return None;
            }
        }
        self.v.files.outputs.insert(out.clone());
        Some(out)
    }

    fn backend_socket(&mut self, field: &str, path: &FilePath, help: &str) -> Option<PathBuf> {
        let abs = path.resolve(&self.v.loaded.base_dir);
        let span = self.v.span(&self.field(field));
        match crate::contract::check::check_backend_socket(&abs) {
            Ok(()) => Some(std::fs::canonicalize(&abs).unwrap_or(abs)),
            // A warning while a file is checked or planned (the back end may start later);
            // `vmm up` refuses to start without it (exit 2).
            Err((msg, later)) => {
                let d = if later {
                    Diag::warning(NO_BACK_END, msg)
                } else {
                    Diag::error("vmm::file", msg)
                };
                let d = d.label(span, "this socket").help(help.to_string());
                self.v.push(d);
                None
            }
        }
    }
}

/// The code of the warning that a back end's socket is missing (an error for `vmm up`).
pub const NO_BACK_END: &str = "vmm::no-back-end";

/// Whether vmm may create `abs` (a log file, or a socket when `socket`): its directory exists
/// and what is there already is what vmm would make. Else (message, help).
fn check_output_path(abs: &Path, socket: bool) -> Result<(), (String, &'static str)> {
    let parent = abs.parent().map(Path::to_path_buf).unwrap_or_default();
    if !parent.is_dir() {
        return Err((
            format!("The directory {} does not exist", parent.display()),
            "create the directory, or use a path in an existing one",
        ));
    }
    let problem = match std::fs::symlink_metadata(abs) {
        Err(_) => None,
        Ok(m) if m.is_dir() => Some(("is a directory", "")),
        Ok(m) if socket && !m.file_type().is_socket() => Some((
            "exists and is not a socket",
            "vmm replaces only a socket left by an earlier run: remove it or pick another path",
        )),
        Ok(_) if socket => None,
        Ok(_) => match hostfile::check_output(abs) {
            Ok(()) => None,
            Err(_) if is_dev_null(abs) => Some((
                "is a character device",
                "use `io = \"none\"` to discard the output",
            )),
            Err(_) => Some((
                "is not a regular file",
                "output files are appended to; name a regular file (or a new one), or use a `socket`",
            )),
        },
    };
    match problem {
        None => Ok(()),
        Some((what, help)) => {
            let role = if socket { "socket path" } else { "output file" };
            Err((format!("The {role} {} {what}", abs.display()), help))
        }
    }
}

/// [`DeviceCheck`] for a device given as command-line options (`vmm device <kind> --key
/// value`): the same checks as in a machine file, reported as `--key: message`. Relative paths
/// resolve against `base` (the working directory).
#[derive(Debug)]
pub struct ArgsCheck<'b> {
    base: &'b Path,
    diags: Diags,
}

impl<'b> ArgsCheck<'b> {
    pub fn new(base: &'b Path) -> ArgsCheck<'b> {
        ArgsCheck {
            base,
            diags: Vec::new(),
        }
    }

    /// The problems found: `(error, line)` with lines like `--path: The disk image … (help)`.
    pub fn into_problems(self) -> Vec<(bool, String)> {
        self.diags
            .into_iter()
            .map(|d| {
                let help = d
                    .help
                    .filter(|h| !h.is_empty())
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default();
                (!d.warning, format!("{}{help}", d.message))
            })
            .collect()
    }

    fn report(&mut self, warning: bool, field: &str, msg: String) -> Reported<'_> {
        let msg = format!(
            "--{}: {msg}",
            field.split('/').next().unwrap_or(field).replace('_', "-")
        );
        let d = if warning {
            Diag::warning("vmm::device", msg)
        } else {
            Diag::error("vmm::device", msg)
        };
        self.diags.push(d);
        Reported(self.diags.last_mut().expect("just pushed"))
    }
}

impl DeviceCheck for ArgsCheck<'_> {
    fn machine_name(&self) -> &str {
        "vmm-device"
    }
    fn error(&mut self, field: &str, msg: String) -> Reported<'_> {
        self.report(false, field, msg)
    }
    fn warning(&mut self, field: &str, msg: String) -> Reported<'_> {
        self.report(true, field, msg)
    }
    /// One device: nothing to clash with.
    fn claim(&mut self, _what: &'static str, _value: String, _field: &str, _help: &str) {}
    fn disk_image(&mut self, field: &str, path: &FilePath, write: bool) -> Option<FileInfo> {
        match open_checked(&path.resolve(self.base), Use::Disk { write }, "disk image") {
            Ok(info) => Some(info),
            Err((msg, help)) => {
                let help = help
                    .replace("set `readonly = true`", "pass --readonly")
                    .replace("the machine file's directory", "the working directory");
                self.report(false, field, msg).help(help);
                None
            }
        }
    }
    fn output_path(&mut self, field: &str, path: &FilePath, socket: bool) -> Option<PathBuf> {
        let abs = path.resolve(self.base);
        match check_output_path(&abs, socket) {
            Ok(()) => Some(abs),
            Err((msg, help)) => {
                self.report(false, field, msg).help(help);
                None
            }
        }
    }
    fn backend_socket(&mut self, field: &str, path: &FilePath, help: &str) -> Option<PathBuf> {
        let abs = path.resolve(self.base);
        match crate::contract::check::check_backend_socket(&abs) {
            Ok(()) => Some(abs),
            Err((msg, _)) => {
                self.report(false, field, msg).help(help.to_string());
                None
            }
        }
    }
}

/// Whether `p` is /dev/null (the one character device people name as an output).
fn is_dev_null(p: &Path) -> bool {
    std::fs::canonicalize(p).is_ok_and(|c| c == Path::new("/dev/null"))
}

fn capital(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}
