//! The KVM backend: the only place that talks to /dev/kvm.
//!
//! `run(graph)` builds the VM the device graph describes — memory, in-kernel irqchip with
//! IOAPIC-only interrupt routing (no PIC/PIT path, see docs/architecture.md), vCPUs, ACPI
//! tables, the kernel, the devices — runs it with the guest console on the terminal, and
//! returns how it ended.
//!
//! Threads: one per vCPU (exits are handled on the vCPU's own thread, under the bus read lock
//! and the device's mutex), one per socket backend, and the caller's thread, which waits for the
//! outcome, signals (SIGINT, SIGTERM, SIGHUP) and terminal input. Lock order: bus, then device.

pub mod acpi;
pub mod boot;
mod builder;
pub mod cpu;
pub mod handle;
pub mod live;
pub mod memory;
pub mod vcpu;
mod waiter;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::backend::terminal::RawMode;
use crate::graph::DeviceGraph;
use crate::hw::DeviceError;
use crate::hw::bus::Bus;
use crate::hw::char_io;
use crate::hw::virtio::GuestMem;
use crate::sync::{Rank, RwLock};
use builder::{Builder, Rest};
use handle::KvmHandle;
pub use live::LiveVm;
pub use vcpu::Outcome;
use vcpu::{ExitState, VcpuShared};
use waiter::SignalFd;

/// KVM's TSS needs three pages below 4 GiB, outside RAM and MMIO.
const TSS_ADDR: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("Cannot open /dev/kvm: {0} (is KVM enabled, and may this user open /dev/kvm?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM lacks {0}, which vmm needs")]
    MissingCap(&'static str),
    #[error("The machine has {want} vCPUs; KVM allows at most {max} here")]
    TooManyVcpus { want: u32, max: usize },
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error("ACPI tables: {0}")]
    Acpi(#[from] acpi::AcpiError),
    #[error("Device `{name}`: {source}")]
    Device {
        name: String,
        #[source]
        source: DeviceError,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// How a run ended, and how long it took.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub outcome: Outcome,
    pub elapsed: Duration,
}

/// Builds and runs the machine; returns when the VM has ended and every vCPU thread is gone.
pub fn run(graph: &DeviceGraph) -> Result<RunReport, VmError> {
    run_with(graph, |_| None)
}

/// What [`run_with`]'s caller keeps alive while the VM runs (dropped when it ends).
pub type Guard = Box<dyn std::any::Any>;

/// [`run`], handing the running VM to `on_start` once its vCPUs run; what it returns is
/// dropped when the VM has ended, before the devices are.
pub fn run_with(
    graph: &DeviceGraph,
    on_start: impl FnOnce(Arc<LiveVm>) -> Option<Guard>,
) -> Result<RunReport, VmError> {
    let started = Instant::now();
    let kvm = open_kvm(graph)?;
    log::debug!("kvm opened: {:?}", started.elapsed());
    let (vm, mem, mmio, handle) = create_vm(&kvm, graph, started)?;
    log::debug!("vm and irqchip: {:?}", started.elapsed());
    let entry = load_guest(&mem, graph)?;
    log::debug!("acpi and kernel loaded: {:?}", started.elapsed());

    let exit = Arc::new(ExitState::new().map_err(io_err("eventfd"))?);
    let mut b = Builder::new(
        &vm,
        graph,
        handle.clone(),
        mem.clone(),
        mmio.clone(),
        exit.clone(),
    );
    let hotplug = b.platform(graph)?;
    for d in &graph.devices {
        d.spec
            .device()
            .build(&d.placement, &mut b)
            .map_err(|source| VmError::Device {
                name: d.name.clone(),
                source,
            })?;
    }
    let (
        live,
        Rest {
            pio,
            stdin,
            inputs,
            sockets,
        },
    ) = b.finish(graph, hotplug);
    let fds = create_vcpus(&kvm, &vm, graph, &entry)?;
    log::debug!("vcpus configured: {:?}", started.elapsed());
    // Signals go to a signalfd of this thread; vCPU threads inherit the blocked mask.
    let sigfd = SignalFd::new().map_err(io_err("signalfd"))?;
    vcpu::install_kick_handler().map_err(io_err("installing the vCPU kick handler"))?;
    let shared = VcpuShared {
        pio: Arc::new(RwLock::new(Rank::Bus, pio)),
        mmio,
        exit: exit.clone(),
        handle,
    };
    // Raw mode before the guest runs: its first output and the user's first keys (Ctrl-C
    // included) belong to the guest, not to the terminal's line discipline.
    let raw = stdin
        .as_ref()
        .and_then(|_| RawMode::enter(libc::STDIN_FILENO));
    let threads = spawn_vcpus(fds, &shared, &exit);
    log::info!(
        "{}: {} vCPUs running, set up in {:?}",
        graph.machine,
        threads.len(),
        started.elapsed()
    );
    {
        let guard = if threads.len() == graph.vcpus as usize {
            on_start(live)
        } else {
            None
        };
        waiter::wait(&exit, &sigfd, stdin.as_deref(), &inputs, raw.is_some());
        drop(guard);
        stop_vcpus(&exit, threads);
        drop(raw);
    }
    // The guest's last words, if stdout takes them soon.
    if let Some(o) = char_io::stdout_in_use() {
        o.finish(Duration::from_millis(500));
    }
    drop(sockets);
    let outcome = exit
        .outcome()
        .unwrap_or(Outcome::Stopped("no outcome".into()));
    Ok(RunReport {
        outcome,
        elapsed: started.elapsed(),
    })
}

/// The VM, its guest RAM, the MMIO bus and the interrupt routing.
type NewVm = (Arc<VmFd>, GuestMem, Arc<RwLock<Bus>>, Arc<KvmHandle>);

/// The VM with its guest RAM, in-kernel irqchip, MMIO bus and interrupt routing.
fn create_vm(kvm: &Kvm, graph: &DeviceGraph, started: Instant) -> Result<NewVm, VmError> {
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    // Guest RAM first: registered after the irqchip, the memory slot costs 5-7 ms here.
    let mem = memory::create(graph)?;
    memory::register(&vm, &mem)?;
    log::debug!("memory: {:?}", started.elapsed());
    vm.set_tss_address(TSS_ADDR)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let mmio = Arc::new(RwLock::new(Rank::Bus, Bus::new()));
    let handle =
        KvmHandle::new(vm.clone(), mmio.clone()).map_err(kvm_err("KVM_SET_GSI_ROUTING"))?;
    Ok((vm, mem, mmio, handle))
}

/// Opens /dev/kvm and checks it can run this machine.
fn open_kvm(graph: &DeviceGraph) -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip (KVM_CAP_IRQCHIP)"),
        (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (Cap::Ioeventfd, "ioeventfd (KVM_CAP_IOEVENTFD)"),
        (Cap::UserMemory, "user memory (KVM_CAP_USER_MEMORY)"),
        (Cap::IrqRouting, "IRQ routing (KVM_CAP_IRQ_ROUTING)"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    let max = kvm.get_max_vcpus();
    if graph.vcpus as usize > max {
        return Err(VmError::TooManyVcpus {
            want: graph.vcpus,
            max,
        });
    }
    Ok(kvm)
}

/// Writes the ACPI tables and the kernel (and initrd) into guest memory; the entry point.
fn load_guest(mem: &GuestMem, graph: &DeviceGraph) -> Result<boot::Entry, VmError> {
    let tables = acpi::build(graph, boot::ACPI_START, boot::ACPI_SIZE)?;
    for (addr, bytes) in &tables.blobs {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|_| boot::BootError::Write {
                addr: *addr,
                what: "ACPI tables",
            })?;
    }
    Ok(boot::load(mem, graph, tables.rsdp_addr)?)
}

/// vCPUs: CPU state for all, boot registers for the first. The others wait for INIT/SIPI.
fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    graph: &DeviceGraph,
    entry: &boot::Entry,
) -> Result<Vec<VcpuFd>, VmError> {
    let template = cpu::CpuTemplate::new(kvm, graph.vcpus, &graph.cpu_hide)?;
    let mut fds = Vec::new();
    for id in 0..graph.vcpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        template.configure(id, &fd)?;
        if id == 0 {
            let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            let (regs, sregs) = boot::boot_registers(entry, sregs);
            fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
            fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        }
        fds.push(fd);
    }
    Ok(fds)
}

/// One thread per vCPU; if one cannot start, the VM fails and no more are started.
fn spawn_vcpus(
    fds: Vec<VcpuFd>,
    shared: &VcpuShared,
    exit: &ExitState,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut threads = Vec::new();
    for (id, fd) in fds.into_iter().enumerate() {
        match vcpu::spawn(id as u32, fd, shared.clone()) {
            Ok(t) => threads.push(t),
            Err(e) => {
                exit.finish(Outcome::Failed(format!(
                    "cannot start vCPU thread {id}: {e}"
                )));
                break;
            }
        }
    }
    threads
}

/// Kicks vCPU threads out of KVM_RUN until all have returned.
fn stop_vcpus(exit: &ExitState, threads: Vec<std::thread::JoinHandle<()>>) {
    use std::os::unix::thread::JoinHandleExt;
    exit.stopping
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last_kick: Option<Instant> = None;
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        // Kick (again every 10 ms: a kick can land just before a thread enters KVM_RUN).
        if last_kick.is_none_or(|k| k.elapsed() > Duration::from_millis(10)) {
            for t in threads.iter().filter(|t| !t.is_finished()) {
                // SAFETY: the thread is alive (not finished, not joined): its pthread_t is valid.
                unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
            }
            last_kick = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    for t in threads {
        if t.is_finished() {
            let _ = t.join();
        } else {
            log::error!("a vCPU thread did not stop within 5 s; leaving it");
        }
    }
}
