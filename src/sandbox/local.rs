//! Other local users: owner-only sockets, the peer's uid, a runtime directory nobody else
//! can have planted.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// The uid of the process at the other end of a unix socket (SO_PEERCRED).
pub fn peer_uid(conn: &impl AsRawFd) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes one ucred into the struct we own, of the length given.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.uid)
}

/// The user vmm runs as, read once before the threads start (their filters need no geteuid).
static OWNER: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

fn owner() -> u32 {
    // SAFETY: geteuid cannot fail.
    *OWNER.get_or_init(|| unsafe { libc::geteuid() })
}

/// Root and the user vmm runs as may use its sockets; nobody else.
pub fn uid_may_connect(uid: u32) -> bool {
    uid == 0 || uid == owner()
}

/// Files and sockets vmm creates are its user's only (0700 from the moment they exist: no
/// window between bind and chmod). Also notes the owner for [`uid_may_connect`].
pub fn owner_only_umask() {
    owner();
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0o077) };
}

/// A socket vmm just bound (0700 from the umask: nobody else could connect in between)
/// becomes 0600, the mode every socket vmm listens on has.
pub fn owner_only_socket(path: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Creates `dir` (mode 0700, parents as needed) or checks the one there: a real directory
/// (not a symlink), owned by this user, that no one else can write to or look into.
pub fn runtime_dir(dir: &Path) -> Result<(), String> {
    let fix = |why: String| {
        format!(
            "runtime directory {}: {why}; remove it, or point XDG_RUNTIME_DIR (or \
             VMM_RUNTIME_DIR) at a directory of your own",
            dir.display()
        )
    };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    format!("cannot create the runtime directory {}: {e}", dir.display())
                })?;
        }
        Err(e) => return Err(fix(e.to_string())),
        Ok(_) => {}
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| fix(e.to_string()))?;
    if m.file_type().is_symlink() {
        return Err(fix("it is a symbolic link".into()));
    }
    if !m.is_dir() {
        return Err(fix("it is not a directory".into()));
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        return Err(fix(format!(
            "it belongs to uid {}, not to you (uid {me})",
            m.uid()
        )));
    }
    let mode = m.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(fix(format!(
            "its mode is {mode:04o}: others can reach it (it must be 0700; `chmod 700` it)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_fresh_runtime_dir_is_0700_and_an_open_one_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/vmm");
        runtime_dir(&d).unwrap();
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        runtime_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = runtime_dir(&d).unwrap_err();
        assert!(e.contains("mode is 0755") && e.contains("chmod 700"), "{e}");
    }

    #[test]
    fn a_symlinked_or_foreign_runtime_dir_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = runtime_dir(&link).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        let file = t.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(runtime_dir(&file).unwrap_err().contains("not a directory"));
        // Owned by someone else (only root can arrange that here).
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            let c = std::ffi::CString::new(real.to_str().unwrap()).unwrap();
            // SAFETY: chown of a path we created.
            assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
            let e = runtime_dir(&real).unwrap_err();
            assert!(e.contains("belongs to uid 65534"), "{e}");
        }
    }

    #[test]
    fn the_peer_of_a_socketpair_is_this_user() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        // SAFETY: geteuid cannot fail.
        assert_eq!(peer_uid(&a), Some(unsafe { libc::geteuid() }));
        assert!(uid_may_connect(0));
        // SAFETY: as above.
        let me = unsafe { libc::geteuid() };
        assert!(uid_may_connect(me));
        assert!(!uid_may_connect(54321) || me == 54321);
    }
}
