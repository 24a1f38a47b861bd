//! The sandbox: a seccomp filter on every thread, and the crash path.
//!
//! Each kind of thread has an allowlist ([`allow`]; a device's worker list is in its file).
//! A thread is started through [`spawn`] and installs its filter first thing, before it
//! touches guest data. Threads inherit the filter of the thread that starts them, so every
//! thread after boot is started by one **launcher** thread whose filter is the union of all
//! lists (a child's filter is then exactly its own): a vCPU that starts a device worker when
//! the driver writes DRIVER_OK asks the launcher, and needs no `clone` itself.
//!
//! A refused call raises SIGSYS ([`Mode::Trap`], the default); the handler writes which
//! thread kind made which call, restores the terminal, has the main thread remove vmm's
//! sockets, and exits 1. [`Mode::Log`] lets the call through and has the kernel log it
//! (`dmesg`: `audit: type=1326 ... comm="vcpu0" ... syscall=N`); [`Mode::Off`] installs
//! nothing. A panic takes the same crash path ([`fatal`]).

mod allow;
pub mod landlock;
mod local;

pub use allow::*;
pub use local::{owner_only_socket, owner_only_umask, peer_uid, runtime_dir, uid_may_connect};

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};
use std::sync::{OnceLock, mpsc};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a refused system call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Kill vmm with a message naming the thread kind and the call (the default).
    Trap,
    /// Allow the call; the kernel logs it (for finding what a list lacks).
    Log,
    /// No filters.
    Off,
}

/// 0: not set up (unit tests, `vmm check`); else Mode as 1 + index.
static MODE: AtomicU8 = AtomicU8::new(0);
/// Every list the launcher may start a thread with (its own filter is their union).
static KINDS: OnceLock<Vec<&'static Allow>> = OnceLock::new();
type Job = Box<dyn FnOnce() + Send>;
static LAUNCHER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
/// Why the launcher could not start threads (its filter was refused).
static LAUNCHER_FAILED: OnceLock<String> = OnceLock::new();

thread_local! {
    /// The kind of the current thread, for the SIGSYS message (const-initialised: reading it
    /// in a signal handler allocates nothing).
    static KIND: Cell<&'static str> = const { Cell::new("new (not yet filtered)") };
    /// Whether this is the thread that runs the main loop (or the thread that set the sandbox
    /// up, before it does): the crash path may remove sockets and restore the terminal here.
    static IS_MAIN: Cell<bool> = const { Cell::new(false) };
}

fn mode() -> Option<Mode> {
    match MODE.load(Ordering::SeqCst) {
        1 => Some(Mode::Trap),
        2 => Some(Mode::Log),
        3 => Some(Mode::Off),
        _ => None,
    }
}

/// Errors setting up the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("building the seccomp filter of the {0} thread: {1}")]
    Build(&'static str, String),
    #[error("installing the seccomp filter of the {0} thread: {1}")]
    Install(&'static str, String),
    #[error("starting the launcher thread: {0}")]
    Launcher(std::io::Error),
}

/// Sets the sandbox up for `vmm up`: the SIGSYS handler and the launcher thread, whose filter
/// allows every list in `kinds` (device workers) and vmm's own. Call once, first thing.
pub fn init(m: Mode, kinds: Vec<&'static Allow>) -> Result<(), SandboxError> {
    MODE.store(1 + m as u8, Ordering::SeqCst);
    IS_MAIN.with(|m| m.set(true));
    KIND.with(|k| k.set("main"));
    install_sigsys_handler();
    let mut all: Vec<&'static Allow> = allow::OWN.to_vec();
    all.extend(kinds);
    let _ = KINDS.set(all);
    // The launcher installs its filter (the kernel takes ~0.6 ms to take the union) while
    // this thread goes on building the VM; the first thread it starts waits for it.
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("launcher".into())
        .spawn(move || {
            KIND.with(|k| k.set("launcher"));
            block_stop_signals();
            let union = union_of(KINDS.get().map(Vec::as_slice).unwrap_or(&[]));
            if let Err(e) = install("launcher", &union) {
                // Jobs are dropped unrun: `spawn` reports this.
                let _ = LAUNCHER_FAILED.set(e.to_string());
                return;
            }
            for job in rx {
                job();
            }
        })
        .map_err(SandboxError::Launcher)?;
    let _ = LAUNCHER.set(tx);
    Ok(())
}

/// Filters this whole process (every thread, and those it starts) with `list`: for
/// `vmm device`, whose threads the vhost-user crate starts.
pub fn init_process(m: Mode, list: &'static Allow, extra: &[Call]) -> Result<(), SandboxError> {
    MODE.store(1 + m as u8, Ordering::SeqCst);
    PROCESS_WIDE.store(true, Ordering::SeqCst);
    install_sigsys_handler();
    KIND.with(|k| k.set(list.kind));
    let mut calls: Vec<Call> = list.calls.to_vec();
    calls.extend_from_slice(extra);
    calls.extend_from_slice(SPAWN);
    let Some(prog) = compile(list.kind, &calls)? else {
        return Ok(());
    };
    seccompiler::apply_filter_all_threads(&prog)
        .map_err(|e| SandboxError::Install(list.kind, e.to_string()))
}

/// SIGINT, SIGTERM and SIGHUP are the main thread's (read from its signalfd): blocked in the
/// launcher, so in every thread it starts.
fn block_stop_signals() {
    // SAFETY: sigset operations on a set we own; pthread_sigmask on the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn union_of(kinds: &[&'static Allow]) -> Vec<Call> {
    let mut v: Vec<Call> = SPAWN.to_vec();
    for k in kinds {
        v.extend_from_slice(k.calls);
        v.extend_from_slice(k.on_vcpu);
    }
    v.extend_from_slice(WORKER_BASE);
    v
}

/// Installs the filter of `list` on the calling thread (nothing when the sandbox is off or
/// not set up). The thread's calls are then [`COMMON`] and `list`'s; a vCPU's also what every
/// device kind does on a vCPU ([`Allow::on_vcpu`]).
pub fn enter(list: &'static Allow) -> Result<(), SandboxError> {
    KIND.with(|k| k.set(list.kind));
    if list.kind == VCPU.kind {
        let mut calls = list.calls.to_vec();
        for k in KINDS.get().into_iter().flatten() {
            calls.extend_from_slice(k.on_vcpu);
        }
        return install(list.kind, &calls);
    }
    install(list.kind, list.calls)
}

/// [`enter`] for a device worker: its kind's own list and [`WORKER_BASE`].
pub fn enter_worker(list: &'static Allow) -> Result<(), SandboxError> {
    KIND.with(|k| k.set(list.kind));
    let mut calls = list.calls.to_vec();
    calls.extend_from_slice(WORKER_BASE);
    install(list.kind, &calls)
}

fn install(kind: &'static str, calls: &[Call]) -> Result<(), SandboxError> {
    let t = std::time::Instant::now();
    let Some(prog) = compile(kind, calls)? else {
        return Ok(());
    };
    let built = t.elapsed();
    seccompiler::apply_filter(&prog).map_err(|e| SandboxError::Install(kind, e.to_string()))?;
    log::debug!(
        "seccomp: {kind} filter of {} instructions built in {built:?}, installed in {:?}",
        prog.len(),
        t.elapsed() - built
    );
    Ok(())
}

/// The program for COMMON + `calls` in the current mode; `None`: no filter to install.
fn compile(kind: &'static str, calls: &[Call]) -> Result<Option<BpfProgram>, SandboxError> {
    match mode() {
        Some(Mode::Trap) => build(kind, calls, SeccompAction::Trap).map(Some),
        Some(Mode::Log) => build(kind, calls, SeccompAction::Log).map(Some),
        Some(Mode::Off) | None => Ok(None),
    }
}

/// The BPF program allowing COMMON + `calls`; anything else gets `refused`.
pub fn build(
    kind: &'static str,
    calls: &[Call],
    refused: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    let bad = |e: seccompiler::BackendError| SandboxError::Build(kind, e.to_string());
    // Per call: `None` once any list allows it with any arguments, else the alternatives.
    let mut allowed: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    // The same argument value in several lists makes one rule (the launcher's union repeats
    // many: a shorter program costs less on every call and when the kernel takes it).
    let mut seen: std::collections::HashSet<(i64, u8, u64)> = std::collections::HashSet::new();
    for c in COMMON.iter().chain(calls) {
        let entry = allowed.entry(c.nr).or_insert_with(|| Some(Vec::new()));
        let Some(alternatives) = entry else { continue };
        match c.only {
            Only::Any => *entry = None,
            Only::NoExec if !seen.insert((c.nr, 2, u64::MAX)) => {}
            Only::NoExec => {
                let no_exec = SeccompCondition::new(
                    2,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
                    0,
                )
                .map_err(bad)?;
                alternatives.push(SeccompRule::new(vec![no_exec]).map_err(bad)?);
            }
            Only::Arg(i, values) => {
                for v in values.iter().filter(|v| seen.insert((c.nr, i, **v))) {
                    let c = SeccompCondition::new(i, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *v)
                        .map_err(bad)?;
                    alternatives.push(SeccompRule::new(vec![c]).map_err(bad)?);
                }
            }
        }
    }
    // An empty rule list matches on the number alone.
    let rules: BTreeMap<i64, Vec<SeccompRule>> = allowed
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    let filter = SeccompFilter::new(rules, refused, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(bad)?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| bad(e))
}

/// Starts a thread called `name` that first enters `list`'s filter (a device worker's list
/// gets [`WORKER_BASE`] too when `worker`), through the launcher once the sandbox is set up.
pub fn spawn<T: Send + 'static>(
    list: &'static Allow,
    worker: bool,
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    let body = move || {
        let r = if worker {
            enter_worker(list)
        } else {
            enter(list)
        };
        if let Err(e) = r {
            // No thread runs unfiltered when filters are on.
            fatal_message(&format!("vmm: {e}\n"));
        }
        f()
    };
    let Some(launcher) = LAUNCHER.get() else {
        return std::thread::Builder::new().name(name).spawn(body);
    };
    let (tx, rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(std::thread::Builder::new().name(name).spawn(body));
    });
    let gone = || {
        std::io::Error::other(match LAUNCHER_FAILED.get() {
            Some(e) => format!("no thread can start: {e}"),
            None => "the launcher thread is gone".to_string(),
        })
    };
    launcher.send(job).map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())?
}

// ---- the crash path ------------------------------------------------------------------------

/// The exit code of a crash (a refused call, a panic): a runtime failure.
pub const EXIT_CRASH: i32 = 1;

/// The terminal settings to put back on a crash: fd and termios, set while raw mode is on.
static TERMINAL: std::sync::Mutex<Option<(i32, libc::termios)>> = std::sync::Mutex::new(None);
/// Socket files to remove on a crash (the control socket, character device sockets). A
/// plain std mutex, only ever try-locked on the crash path: it ranks in no lock order.
static SOCKETS: std::sync::Mutex<Vec<CString>> = std::sync::Mutex::new(Vec::new());
/// The main thread's wake-up eventfd: a thread whose filter has no `unlink` asks the main
/// thread to remove the sockets. -1 while no main loop runs.
static MAIN_WAKE: AtomicI32 = AtomicI32::new(-1);
/// One filter for the whole process (`vmm device`): every thread may remove its socket.
static PROCESS_WIDE: AtomicBool = AtomicBool::new(false);

/// Records the settings to restore if vmm crashes while the terminal is raw (`None`: none).
pub fn crash_restores_terminal(saved: Option<(i32, libc::termios)>) {
    if let Ok(mut t) = TERMINAL.lock() {
        *t = saved;
    }
}

/// A socket vmm listens on: removed if vmm crashes.
pub fn register_socket(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    if let (Ok(c), Ok(mut s)) = (CString::new(path.as_os_str().as_bytes()), SOCKETS.lock()) {
        s.push(c);
    }
}

/// The socket is removed by its owner: forget it.
pub fn unregister_socket(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(mut s) = SOCKETS.lock() {
        s.retain(|c| c.as_bytes() != path.as_os_str().as_bytes());
    }
}

/// The calling thread is the main loop, waking on `fd` (an eventfd) to call
/// [`crash_cleanup_and_exit`] when another thread crashes.
pub fn main_loop_wakes_on(fd: i32) {
    IS_MAIN.with(|m| m.set(true));
    MAIN_WAKE.store(fd, Ordering::SeqCst);
}

/// The main loop has ended (its wake-up fd is about to close).
pub fn main_loop_ended() {
    MAIN_WAKE.store(-1, Ordering::SeqCst);
}

fn restore_terminal() {
    if !IS_MAIN.with(|m| m.get()) && !PROCESS_WIDE.load(Ordering::SeqCst) {
        return; // the main thread does it (only its filter has the ioctl)
    }
    if let Ok(t) = TERMINAL.try_lock()
        && let Some((fd, saved)) = *t
    {
        // SAFETY: restores settings saved from the same fd.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    }
}

fn remove_sockets() {
    if let Ok(s) = SOCKETS.try_lock() {
        for c in s.iter() {
            // SAFETY: a NUL-terminated path we own.
            unsafe { libc::unlink(c.as_ptr()) };
        }
    }
}

/// Run by the main loop when woken by a crashing thread: remove the sockets, restore the
/// terminal, exit.
pub fn crash_cleanup_and_exit() -> ! {
    remove_sockets();
    restore_terminal();
    // SAFETY: ends the process at once; the crash message is written.
    unsafe { libc::_exit(EXIT_CRASH) }
}

/// The crash path: the message is written; the terminal is restored and the sockets removed
/// (by the main thread when another thread crashed: only its filter allows `unlink` and the
/// terminal ioctl); exit.
pub fn fatal() -> ! {
    let wake = MAIN_WAKE.load(Ordering::SeqCst);
    let main = IS_MAIN.with(|m| m.get()) || PROCESS_WIDE.load(Ordering::SeqCst);
    if wake >= 0 && !main {
        let one = 1u64.to_ne_bytes();
        let never = 0u32;
        let ts = libc::timespec {
            tv_sec: 2,
            tv_nsec: 0,
        };
        // SAFETY: writes 8 bytes from a local to the main loop's eventfd, then waits for the
        // main thread to end the process: a futex wait on a local nobody wakes, at most 2 s
        // (the main thread may be past its loop).
        unsafe {
            libc::write(wake, one.as_ptr().cast(), 8);
            libc::syscall(
                libc::SYS_futex,
                &never as *const u32,
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                0u32,
                &ts as *const libc::timespec,
            );
        }
    } else if main {
        remove_sockets();
        restore_terminal();
    }
    // SAFETY: ends the process at once.
    unsafe { libc::_exit(EXIT_CRASH) }
}

fn fatal_message(msg: &str) -> ! {
    write_stderr(msg.as_bytes());
    fatal()
}

fn write_stderr(b: &[u8]) {
    // SAFETY: writes bytes we own to stderr; a short write loses part of a message only.
    unsafe { libc::write(2, b.as_ptr().cast(), b.len()) };
}

/// Installs the panic hook: the usual message, then [`fatal`] (restore the terminal, remove
/// sockets, exit 1), as a release build (panic = abort) would, never a half-dead VM.
pub fn crash_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        write_stderr(b"vmm: a thread panicked (a bug in vmm); stopping the VM\n");
        fatal();
    }));
}

fn install_sigsys_handler() {
    // SAFETY: a zeroed sigaction with our SA_SIGINFO handler and an empty mask is valid.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
    }
}

/// The system call number a seccomp SIGSYS reports (`si_syscall`, after `si_call_addr`).
fn sigsys_syscall(info: *const libc::siginfo_t) -> i32 {
    // SAFETY: for SIGSYS the kernel fills `_sigsys { void *call_addr; int syscall; .. }` at
    // offset 16 of siginfo_t on x86_64; `info` points at a whole siginfo_t.
    unsafe { *(info.cast::<u8>().add(24).cast::<i32>()) }
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let nr = sigsys_syscall(info);
    // SAFETY: an SA_SIGINFO handler's third argument is the interrupted thread's ucontext;
    // the call's first arguments are in its saved RDI, RSI, RDX.
    let args = unsafe {
        let g = &(*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs;
        [
            g[libc::REG_RDI as usize],
            g[libc::REG_RSI as usize],
            g[libc::REG_RDX as usize],
        ]
    };
    let kind = KIND.with(|k| k.get());
    let mut buf = [0u8; 320];
    let mut w = Buf { b: &mut buf, n: 0 };
    w.put(b"vmm: seccomp: the ");
    w.put(kind.as_bytes());
    w.put(b" thread made system call ");
    w.num(nr as i64);
    w.put(b" (");
    w.put(name_of(nr as i64).as_bytes());
    w.put(b", arguments ");
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            w.put(b", ");
        }
        w.hex(*a as u64);
    }
    w.put(b"), which its allowlist does not permit; stopping vmm (`vmm up --seccomp=log` lets it through and logs it)\n");
    let n = w.n;
    write_stderr(&buf[..n]);
    fatal();
}

/// A fixed buffer written without allocating (for the signal handler).
struct Buf<'a> {
    b: &'a mut [u8],
    n: usize,
}

impl Buf<'_> {
    fn put(&mut self, s: &[u8]) {
        let room = self.b.len() - self.n;
        let k = s.len().min(room);
        self.b[self.n..self.n + k].copy_from_slice(&s[..k]);
        self.n += k;
    }
    fn hex(&mut self, mut v: u64) {
        let mut d = [0u8; 16];
        let mut i = d.len();
        loop {
            i -= 1;
            d[i] = b"0123456789abcdef"[(v & 15) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.put(b"0x");
        self.put(&d[i..]);
    }

    fn num(&mut self, mut v: i64) {
        if v < 0 {
            self.put(b"-");
            v = -v;
        }
        let mut d = [0u8; 20];
        let mut i = d.len();
        loop {
            i -= 1;
            d[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.put(&d[i..]);
    }
}

/// The name of a system call in any of vmm's lists, or a few others a bug might make.
pub fn name_of(nr: i64) -> &'static str {
    const OTHERS: &[Call] = &[
        call!(SYS_getrandom),
        call!(SYS_gettid),
        call!(SYS_getpid),
        call!(SYS_clock_nanosleep),
        call!(SYS_sched_getaffinity),
        call!(SYS_read),
        call!(SYS_execve),
        call!(SYS_fork),
        call!(SYS_vfork),
        call!(SYS_socket),
        call!(SYS_connect),
        call!(SYS_bind),
        call!(SYS_listen),
        call!(SYS_open),
        call!(SYS_openat),
        call!(SYS_unlink),
        call!(SYS_mkdir),
        call!(SYS_kill),
        call!(SYS_ptrace),
        call!(SYS_getpgid),
        call!(SYS_getppid),
        call!(SYS_setsid),
        call!(SYS_chdir),
        call!(SYS_mount),
    ];
    let lists = [COMMON, SPAWN, WORKER_BASE, DAEMON.calls, OTHERS];
    let own = allow::OWN.iter().map(|a| a.calls);
    let kinds = KINDS
        .get()
        .into_iter()
        .flat_map(|v| v.iter().map(|a| a.calls));
    lists
        .into_iter()
        .chain(own)
        .chain(kinds)
        .flatten()
        .find(|c| c.nr == nr)
        .map_or("see /usr/include/asm/unistd_64.h", |c| c.name)
}

#[cfg(test)]
mod tests;
