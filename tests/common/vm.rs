//! Running `vmm up` from tests: a machine file in a temp dir, the guest console on pipes, lines
//! collected by a reader thread, and a watchdog so no test can hang.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use super::{root, skip};

/// True when /dev/kvm can be used; otherwise records a loud skip for `test`.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            skip(test, &format!("needs /dev/kvm ({e})"));
            false
        }
    }
}

/// How long a test waits for a Linux guest under vmm before it gives up: a net for hangs, not
/// a speed check (speed is measured in benches and docs/performance.md). Under PVM the test
/// kernel reaches /init in 50–110 s depending on the host, and a loaded runner can take a few
/// times that.
pub const LINUX_LIMIT: Duration = Duration::from_secs(1200);

/// Holds the right to run a Linux guest; see [`one_linux_guest_at_a_time`].
pub struct LinuxGuest(#[allow(dead_code)] std::fs::File);

/// Linux guests run one at a time (an exclusive lock on a file in the target directory, so
/// also across test binaries and concurrent `cargo test`s): the kernel's boot runs in KVM's
/// instruction emulator, and two of them on two cores took 216 s to /init instead of 104 s.
pub fn one_linux_guest_at_a_time() -> LinuxGuest {
    use std::os::fd::AsRawFd;
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-guest.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return LinuxGuest(f);
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::Interrupted,
            "flock {}: {e}",
            path.display()
        );
    }
}

/// The tiny guests (tests/guest/tiny), built once into target/tiny.
pub fn tiny(name: &str) -> PathBuf {
    let dir = root().join("target/tiny");
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        let st = Command::new(root().join("tests/guest/tiny/build.sh"))
            .arg(&dir)
            .status()
            .expect("build.sh runs");
        assert!(st.success(), "building the tiny guests failed");
    });
    let p = dir.join(format!("{name}.elf"));
    assert!(p.exists(), "no tiny guest {name}");
    p
}

/// A temporary directory only its owner can reach: vmm refuses a runtime directory others
/// can (tempfile's are 0755 under the usual umask).
pub fn private_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}

/// A running `vmm up`.
pub struct Vm {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every line seen so far.
    pub seen: Vec<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    deadline: Instant,
    _dir: Option<tempfile::TempDir>,
}

/// A machine file for a test: `body` is TOML after the standard header; `kernel` is copied in.
pub struct Machine {
    pub dir: tempfile::TempDir,
    pub file: PathBuf,
}

impl Machine {
    pub fn new(kernel: &Path, body: &str) -> Machine {
        let dir = private_dir();
        let file = dir.path().join("m.toml");
        let text = format!("kernel = {:?}\n{body}", kernel.display().to_string());
        std::fs::write(&file, text).unwrap();
        Machine { dir, file }
    }
}

impl Vm {
    /// Starts `vmm up FILE` with extra environment, killing it after `limit`.
    pub fn start(file: &Path, limit: Duration, env: &[(&str, &str)]) -> Vm {
        Vm::start_with_stdout(file, limit, env, Stdio::piped())
    }

    /// [`Vm::start`] with vmm's stdout given by the caller (e.g. a pipe it never reads); the
    /// console's lines are then not seen here.
    pub fn start_with_stdout(
        file: &Path,
        limit: Duration,
        env: &[(&str, &str)],
        stdout: Stdio,
    ) -> Vm {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
        cmd.arg("up")
            .arg(file)
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(Stdio::piped());
        // Each VM has its own control socket directory: tests never talk to each other's VMs.
        let runtime = private_dir();
        cmd.env("VMM_RUNTIME_DIR", runtime.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut vm = Vm::spawn(cmd, limit);
        vm._dir = Some(runtime);
        vm
    }

    /// Runs `vmm ARGS` against this VM's control socket directory; returns (status, stdout,
    /// stderr).
    pub fn vmm(&self, args: &[&str]) -> (i32, String, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm"));
        cmd.args(args);
        if let Some(d) = &self._dir {
            cmd.env("VMM_RUNTIME_DIR", d.path());
        }
        let out = cmd.output().expect("vmm runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The directory of this VM's control socket.
    pub fn runtime_dir(&self) -> PathBuf {
        self._dir
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_default()
    }

    /// Waits until vmm's stderr contains `pat` `n` times; panics with it on timeout.
    pub fn expect_stderr(&mut self, pat: &str, n: usize) -> String {
        loop {
            let e = self.stderr();
            if e.matches(pat).count() >= n {
                return e;
            }
            if Instant::now() > self.deadline || matches!(self.child.try_wait(), Ok(Some(_))) {
                panic!(
                    "vmm's stderr never had {pat:?} {n} times; it has:\n{e}\nconsole:\n{}",
                    self.seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn spawn(mut cmd: Command, limit: Duration) -> Vm {
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("vmm starts");
        let stdout = child.stdout.take();
        let mut stderr = child.stderr.take().unwrap();
        let (tx, rx) = channel();
        // Without a stdout of ours no line ever comes.
        std::thread::spawn(move || {
            let Some(stdout) = stdout else { return };
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(l) = line else { break };
                let s = String::from_utf8_lossy(&l)
                    .trim_end_matches('\r')
                    .to_string();
                if tx.send(s).is_err() {
                    break;
                }
            }
        });
        let err = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let e2 = err.clone();
        // Appended as it comes, so a running VM's log can be checked.
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                e2.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let stdin = child.stdin.take();
        Vm {
            child,
            stdin,
            lines: rx,
            seen: Vec::new(),
            stderr: err,
            deadline: Instant::now() + limit,
            _dir: None,
        }
    }

    /// Waits for a line containing `pat`; panics (with everything seen) on timeout or exit.
    pub fn expect(&mut self, pat: &str) -> String {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(pat) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!(
                        "timed out waiting for {pat:?}; output:\n{}\nstderr:\n{}",
                        self.seen.join("\n"),
                        self.stderr()
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.child.wait();
                    panic!(
                        "vmm exited before {pat:?}; output:\n{}\nstderr:\n{}",
                        self.seen.join("\n"),
                        self.stderr()
                    );
                }
            }
        }
    }

    pub fn send(&mut self, text: &str) {
        let s = self.stdin.as_mut().expect("stdin open");
        s.write_all(text.as_bytes()).unwrap();
        s.flush().unwrap();
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for vmm to exit (killing it at the deadline); returns (exit code, stdout, stderr).
    pub fn finish(mut self) -> (Option<i32>, String, String) {
        self.close_stdin();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > self.deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "vmm did not exit in time; output:\n{}\nstderr:\n{}",
                    self.seen.join("\n"),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.seen.push(l);
        }
        std::thread::sleep(Duration::from_millis(20));
        (status.code(), self.seen.join("\n"), self.stderr())
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends SIGTERM and waits for vmm to end; returns how long that took and its stderr,
    /// having checked the clean stop (exit 0, "stopped by SIGTERM", no thread left behind).
    pub fn terminate(self) -> (Duration, String) {
        let t = Instant::now();
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let (code, _, err) = self.finish();
        let took = t.elapsed();
        assert_eq!(code, Some(0), "{err}");
        assert!(err.contains("stopped by SIGTERM"), "{err}");
        assert!(
            !err.contains("did not stop within"),
            "a thread was left running:\n{err}"
        );
        (took, err)
    }
}

/// Runs one command in a guest that speaks the test protocol of tests/guest/init and returns
/// the lines it printed (kernel messages, which start with `[`, left out); panics unless it
/// answers `VMM-RC 0`.
pub fn sh(vm: &mut Vm, cmd: &str) -> Vec<String> {
    let start = vm.seen.len();
    vm.send(&format!("{cmd}\n"));
    let rc = vm.expect("VMM-RC ");
    assert_eq!(
        rc.trim(),
        "VMM-RC 0",
        "`{cmd}` failed:\n{}",
        vm.seen[start..].join("\n")
    );
    vm.seen[start..vm.seen.len() - 1]
        .iter()
        .filter(|l| !l.starts_with('['))
        .cloned()
        .collect()
}

/// The value a command printed as `KEY=value`.
pub fn value(lines: &[String], key: &str) -> String {
    let p = format!("{key}=");
    lines
        .iter()
        .find_map(|l| l.find(&p).map(|i| l[i + p.len()..].trim().to_string()))
        .unwrap_or_else(|| panic!("no {key}= in {lines:?}"))
}

/// A test that fails leaves no VM running: the child is killed with its `Vm`.
impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Makes a child die with the thread that spawned it (a test that panics leaks nothing).
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
