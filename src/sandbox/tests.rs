//! The filters are real: each test that installs one runs in a child process (this test
//! binary re-run on one test), since a filter cannot be removed from a thread.

use super::*;
use std::process::Command;

/// Runs test `name` in a child with `VMM_SANDBOX_CHILD=1`; its exit code and stderr.
fn in_child(name: &str) -> (Option<i32>, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("VMM_SANDBOX_CHILD", "1")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn child() -> bool {
    std::env::var_os("VMM_SANDBOX_CHILD").is_some()
}

#[test]
fn every_list_compiles() {
    let mut lists: Vec<&Allow> = OWN.to_vec();
    lists.push(&DAEMON);
    for l in lists {
        for action in [SeccompAction::Trap, SeccompAction::Log] {
            let p = build(l.kind, l.calls, action).unwrap();
            assert!(
                p.len() > COMMON.len(),
                "{}: {} instructions",
                l.kind,
                p.len()
            );
        }
    }
    let union = union_of(OWN);
    build("launcher", &union, SeccompAction::Trap).unwrap();
}

#[test]
fn a_refused_call_names_the_thread_kind_and_the_call() {
    if child() {
        MODE.store(1 + Mode::Trap as u8, Ordering::SeqCst);
        install_sigsys_handler();
        enter(&VCPU).unwrap();
        // SAFETY: socket(2) with constant arguments; the filter refuses it.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        write_stderr(b"survived\n");
        return;
    }
    let (code, err) = in_child("sandbox::tests::a_refused_call_names_the_thread_kind_and_the_call");
    assert_eq!(code, Some(EXIT_CRASH), "{err}");
    assert!(
        err.contains("the vcpu thread made system call 41 (socket, arguments 0x2, 0x1, 0x0)"),
        "{err}"
    );
    assert!(!err.contains("survived"), "{err}");
}

#[test]
fn log_mode_lets_the_call_through() {
    if child() {
        MODE.store(1 + Mode::Log as u8, Ordering::SeqCst);
        install_sigsys_handler();
        enter(&VCPU).unwrap();
        // SAFETY: getppid has no preconditions; not in the vCPU list.
        let p = unsafe { libc::getppid() };
        assert!(p > 0);
        write_stderr(b"survived\n");
        return;
    }
    let (code, err) = in_child("sandbox::tests::log_mode_lets_the_call_through");
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("survived"), "{err}");
}

#[test]
fn arguments_are_checked_no_new_code_and_only_listed_ioctls() {
    if child() {
        MODE.store(1 + Mode::Trap as u8, Ordering::SeqCst);
        install_sigsys_handler();
        enter(&WATCHER).unwrap();
        // Plain anonymous memory is fine.
        // SAFETY: a fresh anonymous mapping, unmapped again.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            libc::munmap(p, 4096);
        }
        write_stderr(b"mapped data\n");
        // SAFETY: as above, asking for executable memory: refused.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        write_stderr(b"survived\n");
        return;
    }
    let (code, err) =
        in_child("sandbox::tests::arguments_are_checked_no_new_code_and_only_listed_ioctls");
    assert_eq!(code, Some(EXIT_CRASH), "{err}");
    assert!(err.contains("mapped data"), "{err}");
    assert!(
        err.contains("the watcher thread made system call 9 (mmap, arguments 0x0, 0x1000, 0x5)"),
        "{err}"
    );
    assert!(!err.contains("survived"), "{err}");
}

#[test]
fn the_launcher_starts_filtered_threads() {
    if child() {
        init(Mode::Trap, vec![]).unwrap();
        // A watcher may open files...
        let t = spawn(&WATCHER, false, "w".into(), || {
            std::fs::read("/etc/passwd").map(|b| b.len())
        })
        .unwrap();
        assert!(t.join().unwrap().unwrap() > 0);
        write_stderr(b"watcher read a file\n");
        // ...a vCPU may not (and it is one even though the launcher may).
        let t = spawn(&VCPU, false, "v".into(), || {
            std::fs::File::open("/etc/hostname").is_ok()
        });
        let _ = t.unwrap().join();
        write_stderr(b"survived\n");
        return;
    }
    let (code, err) = in_child("sandbox::tests::the_launcher_starts_filtered_threads");
    assert_eq!(code, Some(EXIT_CRASH), "{err}");
    assert!(err.contains("watcher read a file"), "{err}");
    assert!(
        err.contains("the vcpu thread made system call 257 (openat, "),
        "{err}"
    );
    assert!(!err.contains("survived"), "{err}");
}

#[test]
fn sigsys_message_buffer_formats_numbers() {
    let mut b = [0u8; 32];
    let mut w = Buf { b: &mut b, n: 0 };
    w.num(0);
    w.put(b" ");
    w.num(435);
    w.put(b" ");
    w.num(-7);
    w.put(b" ");
    w.hex(0xae80);
    let n = w.n;
    assert_eq!(&b[..n], b"0 435 -7 0xae80");
    let mut small = [0u8; 4];
    let mut w = Buf {
        b: &mut small,
        n: 0,
    };
    w.put(b"longer than four");
    assert_eq!(w.n, 4);
}

#[test]
fn names_come_from_the_lists() {
    assert_eq!(name_of(libc::SYS_ioctl), "ioctl");
    assert_eq!(name_of(libc::SYS_socket), "socket");
    assert_eq!(strip_sys("SYS_read"), "read");
}
