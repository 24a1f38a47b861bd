//! Landlock (`vmm up --landlock`): the whole process may reach only the files the machine file
//! names, the directory it lives in, the runtime directory, /dev/kvm and /dev/net/tun. Applied
//! on the main thread before any other thread exists, so every thread inherits it.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus,
};

/// What vmm may do at one path (and beneath it, for a directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileUse {
    /// Read a file, or list and read a directory (kernel, initrd, read-only disks, the
    /// machine file's directory).
    Read,
    /// Read and write a file (writable disks, /dev/kvm, /dev/net/tun).
    ReadWrite,
    /// Create, write and remove entries in a directory (where output files and sockets go).
    Entries,
}

/// The newest Landlock ABI vmm knows; older kernels get what they support (best effort).
const ABI_USED: ABI = ABI::V5;

fn access(u: FileUse) -> BitFlags<AccessFs> {
    let read = AccessFs::from_read(ABI_USED);
    match u {
        FileUse::Read => read | AccessFs::IoctlDev,
        // IoctlDev: KVM, TUN and block-device ioctls on the device files themselves.
        FileUse::ReadWrite => read | AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev,
        FileUse::Entries => {
            read | AccessFs::WriteFile
                | AccessFs::Truncate
                | AccessFs::MakeReg
                | AccessFs::MakeSock
                | AccessFs::RemoveFile
        }
    }
}

/// How much of the ruleset the kernel enforces.
#[derive(Debug, PartialEq, Eq)]
pub enum Enforced {
    Fully,
    Partly,
    /// The kernel has no Landlock: nothing is restricted.
    Not,
}

/// Restricts the calling thread (and the threads it starts later) to `paths`. A path that
/// does not exist is left out (nothing can be done there).
pub fn restrict(paths: &[(PathBuf, FileUse)]) -> Result<Enforced, String> {
    let err = |e: landlock::RulesetError| format!("landlock: {e}");
    let mut rs = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI_USED))
        .map_err(err)?
        .create()
        .map_err(err)?;
    for (p, u) in paths {
        let Ok(fd) = PathFd::new(p) else {
            log::debug!("landlock: {} does not exist; left out", p.display());
            continue;
        };
        // A file takes only the file accesses of its use (the directory ones do not apply).
        let a = if Path::new(p).is_dir() {
            access(*u)
        } else {
            access(*u) & AccessFs::from_file(ABI_USED)
        };
        rs = rs.add_rule(PathBeneath::new(fd, a)).map_err(err)?;
    }
    let status = rs.restrict_self().map_err(err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Enforced::Fully,
        RulesetStatus::PartiallyEnforced => Enforced::Partly,
        RulesetStatus::NotEnforced => Enforced::Not,
    })
}
