//! The sandbox on a running VM (tiny guests): every thread filtered, guest RAM out of core
//! dumps, owner-only sockets that check the peer, a runtime directory nobody else planted,
//! a control socket slow clients cannot block. docs/security.md says what each proves.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::vm::{Machine, Vm, kvm_or_skip, tiny};

const LIMIT: Duration = Duration::from_secs(60);
const MACHINE: &str =
    "name = \"sbx\"\nmemory = \"16M\"\nvcpus = 2\n[[serial]]\nname = \"com1\"\nio = \"stdio\"\n";

macro_rules! kvm_test {
    ($name:ident, $body:block) => {
        #[test]
        fn $name() {
            if !kvm_or_skip(stringify!($name)) {
                return;
            }
            $body
        }
    };
}

/// The control socket of `vm`, once it exists (vmm creates it right after the vCPUs start).
fn control_socket(vm: &Vm) -> std::path::PathBuf {
    let sock = vm.runtime_dir().join("sbx.sock");
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    sock
}

fn status_field(pid: i32, task: &str, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/task/{task}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

kvm_test!(every_thread_is_filtered_and_guest_ram_is_not_dumped, {
    let m = Machine::new(&tiny("spin"), MACHINE);
    let mut vm = Vm::start(&m.file, LIMIT, &[]);
    vm.expect("SPINNING");
    // Give the main thread a moment to enter its filter after the guest started.
    std::thread::sleep(Duration::from_millis(200));
    let pid = vm.pid();
    let mut names = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().file_name().into_string().unwrap();
        let name = status_field(pid, &t, "Name:");
        // Mode 2: filter; at least one filter (a thread's own, on top of the launcher's).
        assert_eq!(
            status_field(pid, &t, "Seccomp:"),
            "2",
            "thread {name} is not filtered"
        );
        let n: u32 = status_field(pid, &t, "Seccomp_filters:").parse().unwrap();
        assert!(n >= 1, "thread {name}: {n} filters");
        if name != "launcher" && name != "vmm" {
            assert!(n >= 2, "thread {name} has only the launcher's filter");
        }
        names.push(name);
    }
    for want in [
        "vcpu0",
        "vcpu1",
        "launcher",
        "reconcile",
        "control",
        "machine-watch",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "no {want} thread in {names:?}"
        );
    }
    // The 16 MiB of guest RAM: one mapping, marked "dd" (do not dump).
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut found = false;
    let mut size_kb = 0u64;
    for l in smaps.lines() {
        if let Some(v) = l.strip_prefix("Size:") {
            size_kb = v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
        }
        if let Some(flags) = l.strip_prefix("VmFlags:")
            && size_kb == 16 * 1024
        {
            assert!(
                flags.split_whitespace().any(|f| f == "dd"),
                "guest RAM is dumpable: {flags}"
            );
            found = true;
        }
    }
    assert!(found, "no 16 MiB mapping in smaps");
    let (code, _, err) = vm.vmm(&["stop"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
});

kvm_test!(seccomp_off_and_log_are_there_for_debugging, {
    for mode in ["off", "log"] {
        let m = Machine::new(&tiny("spin"), MACHINE);
        let f = m.file.display().to_string();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"));
        let rt = common::vm::private_dir();
        cmd.args(["up", "--seccomp", mode, &f])
            .env("VMM_RUNTIME_DIR", rt.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut vm = Vm::spawn(cmd, LIMIT);
        vm.expect("SPINNING");
        std::thread::sleep(Duration::from_millis(100));
        let pid = vm.pid();
        let main = pid.to_string();
        let want = if mode == "off" { "0" } else { "2" };
        assert_eq!(
            status_field(pid, &main, "Seccomp:"),
            want,
            "--seccomp {mode}"
        );
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let (code, _, err) = vm.finish();
        assert_eq!(code, Some(0), "{err}");
    }
});

kvm_test!(the_control_socket_is_owner_only_and_checks_the_peer, {
    let m = Machine::new(&tiny("spin"), MACHINE);
    let mut vm = Vm::start(&m.file, LIMIT, &[]);
    vm.expect("SPINNING");
    let sock = control_socket(&vm);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket mode");
    let dir_mode = std::fs::metadata(vm.runtime_dir())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    // Another user: the kernel refuses the connect (0600)...
    let py = |path: &std::path::Path| {
        let script = format!(
            "import os, socket\nos.setgid(65534); os.setuid(65534)\ns = socket.socket(socket.AF_UNIX)\n\
             try:\n    s.connect({:?})\nexcept OSError as e:\n    print('connect', e.errno); raise SystemExit\n\
             try:\n    s.sendall(b'{{\"op\":\"status\"}}\\n')\n    a = s.recv(4096)\nexcept (ConnectionResetError, BrokenPipeError):\n    a = b''  # closed on us: refused\nprint('answer', repr(a))\n",
            path.display().to_string()
        );
        let out = std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // Root can reach the runtime directory's socket only by path; let nobody through the
        // directory to see the socket's own mode at work.
        std::fs::set_permissions(vm.runtime_dir(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let out = py(&sock);
        assert!(out.contains("connect 13"), "a stranger connected: {out}");
        // ...and with the file opened up, vmm itself refuses the stranger (SO_PEERCRED).
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
        let out = py(&sock);
        assert!(
            out.contains("answer b''"),
            "a stranger got an answer: {out}"
        );
        assert!(sock.exists(), "vmm went away: {}", vm.stderr());
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(vm.runtime_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    } else {
        common::skip(
            "the_control_socket_is_owner_only_and_checks_the_peer (stranger part)",
            "needs root to act as another user",
        );
    }
    let (code, out, err) = vm.vmm(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("sbx"), "{out}");
    vm.vmm(&["stop"]);
    let (code, _, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("refused a client of uid Some(65534)"), "{err}");
});

kvm_test!(slow_clients_cannot_hold_the_control_socket, {
    let m = Machine::new(&tiny("spin"), MACHINE);
    let mut vm = Vm::start(&m.file, LIMIT, &[]);
    vm.expect("SPINNING");
    let sock = control_socket(&vm);
    // 16 clients take every slot and trickle a byte every 100 ms, never ending the line.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tricklers = Vec::new();
    for _ in 0..16 {
        let mut s = UnixStream::connect(&sock).unwrap();
        let stop = stop.clone();
        tricklers.push(std::thread::spawn(move || {
            let mut sent = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if s.write_all(b" ").is_err() {
                    break;
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            sent
        }));
    }
    std::thread::sleep(Duration::from_millis(500));
    // The 17th gets its status, within 5 s.
    let t = Instant::now();
    let (code, out, err) = vm.vmm(&["status"]);
    let took = t.elapsed();
    assert_eq!(code, 0, "{err}; vmm says: {}", vm.stderr());
    assert!(out.contains("sbx"), "{out}");
    assert!(took < Duration::from_secs(5), "status took {took:?}");
    // A client that trickles forever is cut off by the whole-request deadline (5 s).
    let mut s = UnixStream::connect(&sock).unwrap();
    let t = Instant::now();
    let mut cut = false;
    while t.elapsed() < Duration::from_secs(12) {
        if s.write_all(b" ").is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(cut, "a trickling client was never cut off");
    assert!(
        t.elapsed() >= Duration::from_secs(4),
        "cut off too early: {:?}",
        t.elapsed()
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for t in tricklers {
        t.join().unwrap();
    }
    vm.vmm(&["stop"]);
    let (code, _, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
});

kvm_test!(a_runtime_directory_others_can_reach_is_refused, {
    let m = Machine::new(&tiny("spin"), MACHINE);
    let rt = tempfile::tempdir().unwrap();
    let dir = rt.path().join("vmm");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("up")
        .arg(&m.file)
        .env("VMM_RUNTIME_DIR", &dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("its mode is 0777") && err.contains("chmod 700"),
        "{err}"
    );
    // A symlink to a good directory is refused too.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = rt.path().join("link");
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("up")
        .arg(&m.file)
        .env("VMM_RUNTIME_DIR", &link)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("symbolic link"), "{err}");
});

/// docs/security.md's table of allowlists says how many calls each thread kind may make;
/// the numbers are the filters' own.
#[test]
fn security_md_counts_match_the_filters() {
    use vmm::sandbox::{self, Allow};
    let doc = std::fs::read_to_string(common::root().join("docs/security.md")).unwrap();
    let devices = vmm::devices::DeviceKind::seccomp_lists();
    let mut kinds: Vec<(&Allow, bool)> = sandbox::OWN.iter().map(|a| (*a, false)).collect();
    kinds.push((&sandbox::DAEMON, false));
    kinds.extend(
        devices
            .iter()
            .filter(|a| a.kind != "none")
            .map(|a| (*a, true)),
    );
    let missing: Vec<String> = kinds
        .into_iter()
        .map(|(list, worker)| format!("| {} | {} |", list.kind, list.count(worker, &devices)))
        .filter(|row| !doc.contains(row))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/security.md lacks the rows {missing:#?}"
    );
}

kvm_test!(landlock_limits_the_vm_to_the_files_its_machine_names, {
    let m = Machine::new(&tiny("spin"), MACHINE);
    let rt = common::vm::private_dir();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"));
    cmd.args(["up", "--landlock"])
        .arg(&m.file)
        .env("VMM_RUNTIME_DIR", rt.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut vm = Vm::spawn(cmd, LIMIT);
    vm.expect("SPINNING");
    // The VM runs and its control socket works (the runtime directory is allowed)...
    let sock = rt.path().join("sbx.sock");
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["status"])
        .env("VMM_RUNTIME_DIR", rt.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...but an edit naming a disk image elsewhere cannot even be read by it, while vmm
    // itself (outside the sandbox, this test) can.
    let elsewhere = tempfile::tempdir().unwrap();
    let img = elsewhere.path().join("d.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let text = std::fs::read_to_string(&m.file).unwrap();
    let edit = format!(
        "{text}[[block]]\nname = \"d\"\npath = {:?}\n",
        img.display().to_string()
    );
    let check = m.dir.path().join("check.toml");
    std::fs::write(&check, &edit).unwrap();
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("check")
        .arg(&check)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    std::fs::write(&m.file, &edit).unwrap();
    let said = vm.expect_stderr("Permission denied", 1);
    assert!(said.contains("d.img"), "{said}");
    std::process::Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("stop")
        .env("VMM_RUNTIME_DIR", rt.path())
        .output()
        .unwrap();
    let (code, _, err) = vm.finish();
    assert_eq!(code, Some(0), "{err}");
});
