//! What a device kind's own checks ([`super::DeviceSpec::check`]) can ask of validation.
//!
//! Validation of a machine file implements [`DeviceCheck`] with spans into the file; `vmm
//! device` implements it for command-line options. A kind's check is the same code in both.

use std::path::PathBuf;

use super::units::FilePath;
use crate::diag::Diag;

/// Facts about an input file that exists and can be opened.
#[derive(Debug, Clone)]
pub struct FileInfo {
    /// Canonical absolute path.
    pub path: PathBuf,
    /// Bytes (a block device's size).
    pub len: u64,
    pub block_device: bool,
}

/// A diagnostic just reported, to add help to.
#[derive(Debug)]
pub struct Reported<'d>(pub &'d mut Diag);

impl Reported<'_> {
    pub fn help(self, help: impl Into<String>) {
        self.0.help = Some(help.into());
    }
}

/// The context a device's checks run in. `field` names one of the device's keys.
pub trait DeviceCheck {
    /// The machine's name (defaults are derived from it).
    fn machine_name(&self) -> &str;
    /// Reports an error at one of the device's fields.
    fn error(&mut self, field: &str, msg: String) -> Reported<'_>;
    fn warning(&mut self, field: &str, msg: String) -> Reported<'_>;
    /// Claims a host resource or identity (`what`, `value`) for this device; a second claim of
    /// the same value is an error pointing at both.
    fn claim(&mut self, what: &'static str, value: String, field: &str, help: &str);
    /// Checks a disk image: a regular file or a block device, writable if `write`.
    fn disk_image(&mut self, field: &str, path: &FilePath, write: bool) -> Option<FileInfo>;
    /// Checks a path vmm will create (a log file when `socket` is false, a socket): its
    /// directory must exist, and what is there already must be what vmm would make. Opens
    /// nothing. Returns the absolute path.
    fn output_path(&mut self, field: &str, path: &FilePath, socket: bool) -> Option<PathBuf>;
    /// Checks a unix socket another program listens on (a vhost-user back end): it must
    /// exist and be a socket. `help` says what to start. Connects to nothing. Returns the
    /// absolute path.
    fn backend_socket(&mut self, field: &str, path: &FilePath, help: &str) -> Option<PathBuf>;
}

/// Whether `abs` is a socket something may listen on; else what is wrong, and whether it is
/// only that nothing is there yet (a back end not started: a warning until `vmm up`).
pub fn check_backend_socket(abs: &std::path::Path) -> Result<(), (String, bool)> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(abs) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => Err((format!("{} is not a socket", abs.display()), false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err((
            format!(
                "No back end listens at {}: the socket does not exist",
                abs.display()
            ),
            true,
        )),
        Err(e) => Err((
            format!("Cannot reach the socket {}: {e}", abs.display()),
            false,
        )),
    }
}
