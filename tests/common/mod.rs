//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The vmm binary under test.
pub fn vmm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vmm"));
    c.current_dir(root())
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    c
}

pub fn run(args: &[&str]) -> Output {
    vmm().args(args).output().expect("vmm runs")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Marks a test as skipped: says so loudly on stderr and in target/test-skips.txt, which the
/// test runner prints at the end. With VMM_NO_SKIP=1 (as in CI) a skip fails the test instead.
pub fn skip(test: &str, reason: &str) {
    if std::env::var_os("VMM_NO_SKIP").is_some_and(|v| v == "1") {
        panic!("{test}: cannot run here ({reason}) and VMM_NO_SKIP=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: {reason}");
    let dir = root().join("target");
    let _ = std::fs::create_dir_all(&dir);
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("test-skips.txt"))
    {
        let _ = writeln!(f, "SKIPPED {test}: {reason}");
    }
}

/// Replaces the repository path in output so snapshots hold on every checkout.
pub fn scrub(s: &str) -> String {
    s.replace(&root().display().to_string(), "$ROOT")
}

/// Whether UPDATE_SNAPSHOTS=1 asks to rewrite snapshots instead of comparing.
pub fn updating() -> bool {
    std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1")
}

/// Compares `actual` with the snapshot file, or rewrites it when updating.
pub fn snapshot(path: &Path, actual: &str) -> Result<(), String> {
    if updating() {
        std::fs::write(path, actual).map_err(|e| e.to_string())?;
        return Ok(());
    }
    let expected = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if expected == actual {
        Ok(())
    } else {
        Err(format!(
            "{} differs (UPDATE_SNAPSHOTS=1 rewrites it)\n--- expected\n{expected}\n--- actual\n{actual}",
            path.display()
        ))
    }
}

/// The guest artifacts (kernel, initramfs) in target/guest, built if missing.
pub fn guest_artifacts() -> PathBuf {
    let dir = root().join("target/guest");
    if !(dir.join("vmlinux").exists() && dir.join("initramfs.cpio").exists()) {
        let st = Command::new(root().join("tests/guest/build.sh"))
            .status()
            .expect("tests/guest/build.sh runs");
        assert!(st.success(), "building the test guest failed");
    }
    dir
}
/// A vhost-user daemon tests/deps.sh built from crates.io into `$VMM_TOOLS` (default
/// ~/.cache/vmm-tools), if it is there.
pub fn tool(name: &str) -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("VMM_TOOLS")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache/vmm-tools"))
        })?;
    let p = dir.join("bin").join(name);
    p.is_file().then_some(p)
}

pub mod qemu;
pub mod qsd;
pub mod tap;
pub mod vm;
