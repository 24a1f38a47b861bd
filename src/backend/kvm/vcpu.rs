//! vCPU threads: run the vCPU, dispatch its port and MMIO exits to the buses, and turn every
//! way a vCPU can stop into an [`Outcome`]. Nothing the guest does here panics vmm: unknown
//! exits and KVM errors end the VM with a message.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::hw::bus::Bus;
use crate::hw::{VmControl, VmRequest};
use crate::sync::{Mutex, Rank, RwLock};

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// ACPI S5.
    PowerOff,
    /// The reset line (i8042) or a KVM reset event.
    Reset,
    /// A triple fault: the CPU reset itself.
    TripleFault,
    /// vmm was asked to stop (signal or console escape).
    Stopped(String),
    /// The VM cannot go on: an emulation failure, a failed entry, an unexpected exit.
    Failed(String),
}

impl Outcome {
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Failed(_))
    }
}

/// The first outcome wins; the main thread waits on `evt`.
#[derive(Debug)]
pub struct ExitState {
    outcome: Mutex<Option<Outcome>>,
    pub evt: EventFd,
    /// Set once the VM is stopping: vCPU threads leave their loops.
    pub stopping: AtomicBool,
}

impl ExitState {
    pub fn new() -> std::io::Result<ExitState> {
        Ok(ExitState {
            outcome: Mutex::new(Rank::Leaf, None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            stopping: AtomicBool::new(false),
        })
    }

    /// Records `o` unless an outcome is already known, and wakes the main thread.
    pub fn finish(&self, o: Outcome) {
        let mut cur = self.outcome.lock();
        if cur.is_none() {
            log::debug!("VM outcome: {o:?}");
            *cur = Some(o);
        }
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome.lock().clone()
    }
}

impl VmControl for ExitState {
    fn request(&self, r: VmRequest) {
        self.finish(match r {
            VmRequest::PowerOff => Outcome::PowerOff,
            VmRequest::Reset => Outcome::Reset,
        });
    }
}

/// What vCPU threads share.
#[derive(Debug, Clone)]
pub struct VcpuShared {
    pub pio: Arc<RwLock<Bus>>,
    pub mmio: Arc<RwLock<Bus>>,
    pub exit: Arc<ExitState>,
    /// Applies MMIO moves devices asked for during an exit, before re-entering the guest.
    pub handle: Arc<super::handle::KvmHandle>,
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs a no-op handler for the kick signal, so it interrupts KVM_RUN (EINTR) instead of
/// killing the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a handler that does nothing (async-signal-safe) and an
    // empty mask is a valid argument; the old action is not needed.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Starts the thread of vCPU `id`.
pub fn spawn(id: u32, mut fd: VcpuFd, shared: VcpuShared) -> std::io::Result<JoinHandle<()>> {
    crate::sandbox::spawn(
        &crate::sandbox::VCPU,
        false,
        format!("vcpu{id}"),
        move || {
            let outcome = run_loop(id, &mut fd, &shared);
            if let Some(o) = outcome {
                shared.exit.finish(o);
            }
        },
    )
}

fn run_loop(id: u32, fd: &mut VcpuFd, s: &VcpuShared) -> Option<Outcome> {
    loop {
        if s.exit.stopping.load(Ordering::SeqCst) {
            return None;
        }
        if s.handle.has_moves() {
            s.handle.apply_moves();
        }
        match fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                let bus = s.pio.read();
                if !bus.read(u64::from(port), data) {
                    log::trace!("vcpu{id}: read of unmapped port {port:#x}");
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let bus = s.pio.read();
                if !bus.write(u64::from(port), data) {
                    log::trace!("vcpu{id}: write to unmapped port {port:#x}");
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                let bus = s.mmio.read();
                if !bus.read(addr, data) {
                    log::debug!("vcpu{id}: read of unmapped MMIO {addr:#x}");
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let bus = s.mmio.read();
                if !bus.write(addr, data) {
                    log::debug!("vcpu{id}: write to unmapped MMIO {addr:#x}");
                }
            }
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel LAPIC, HLT waits in KVM; an exit means nothing can wake us.
                return Some(Outcome::Failed(format!(
                    "vCPU {id} halted with interrupts that cannot wake it"
                )));
            }
            Ok(VcpuExit::Shutdown) => return Some(Outcome::TripleFault),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Outcome::PowerOff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => Outcome::Reset,
                    other => {
                        Outcome::Failed(format!("vCPU {id}: system event {other} (guest crash)"))
                    }
                });
            }
            Ok(VcpuExit::InternalError) => {
                let suberror = internal_suberror(fd);
                let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
                let what = match suberror {
                    1 => "instruction emulation failed",
                    2 => "nested exception while delivering an event",
                    3 => "unexpected exit during event delivery",
                    _ => "internal error",
                };
                return Some(Outcome::Failed(format!(
                    "vCPU {id}: KVM {what} (suberror {suberror}) at RIP {rip:#x}"
                )));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Some(Outcome::Failed(format!(
                    "vCPU {id}: VM entry failed on host CPU {cpu} (hardware reason {reason:#x})"
                )));
            }
            Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                let what = format!("{other:?}");
                let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
                return Some(Outcome::Failed(format!(
                    "vCPU {id}: unexpected KVM exit {what} at RIP {rip:#x}"
                )));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Some(Outcome::Failed(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        }
    }
}

fn internal_suberror(fd: &mut VcpuFd) -> u32 {
    let run = fd.get_kvm_run();
    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal` member of the
    // exit-reason union; reading a plain u32 from it is valid.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}
